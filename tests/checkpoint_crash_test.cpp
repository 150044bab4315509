// Crash consistency of checkpoint saves, with real processes: a child saves
// checkpoints in a loop (and applies retention) and is SIGKILLed at a random
// moment; afterwards every committed checkpoint must load bit-exactly, ids
// must only grow, garbage collection must leave exactly the committed ones,
// and checkpoints committed before one crash must survive the later ones.
//
// Shard bytes go to a chunk file per checkpoint and their headers to
// RocksDB without its write-ahead log; ShardStore::Sync() syncs the chunk
// files, then flushes the headers. So a kill before a store's Sync() loses
// that store's headers (the chunk file stays: garbage), and a kill between
// the stores' Sync() calls, or before the commit, leaves complete shards of
// a save that never committed (garbage for CollectGarbage()). After every
// trial no header and no chunk file of an uncommitted save may remain. A
// separate test checks that Sync() alone (no clean close) makes shards
// survive a SIGKILL.
//
// Processes: RocksDB keeps background threads (its Env's thread pools)
// after a database closes, and a fork() of a process that has them gives a
// child whose flushes never run, so its Sync() would hang. So the test
// process forks, before it opens any database, a "spawner" that never
// touches RocksDB; the spawner forks each saver child on request and reports
// its pid. The test process sleeps, SIGKILLs the saver itself, and the
// spawner reaps it and reports the wait status. The children use no gtest
// assertions and end in _exit().
//
// Knobs for manual runs: TROUPE_CRASH_TRIALS (default 25),
// TROUPE_CRASH_MAX_DELAY_MS (default 300), TROUPE_CRASH_VERBOSE=1 (the
// savers' progress and what each store holds after each trial).
#include <fcntl.h>
#include <gtest/gtest.h>
#include <poll.h>
#include <rocksdb/db.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <map>
#include <random>
#include <set>
#include <thread>

#include "rocksdb_keys.h"
#include "storage/checkpoint/catalog.h"
#include "storage/checkpoint/checkpoint_io.h"
#include "storage/checkpoint/shard_store.h"

namespace troupe::ckpt {
namespace {

namespace fs = std::filesystem;
using testing::RawKeys;

constexpr int kKeepLast = 3;  // the saver's retention
int g_ready_fd = -1;          // savers write one byte here once their databases are open

// ------------------------------------------------- what the saver saves

// Deterministic bytes of tensor `index` at `step` (cheap: a 64-bit mix per 8 bytes).
std::vector<uint8_t> StepBytes(int64_t step, int index, size_t n) {
  std::vector<uint8_t> b(n);
  const uint64_t seed =
      static_cast<uint64_t>(step) * 0x9E3779B97F4A7C15ull + static_cast<uint64_t>(index) * 0xBF58476D1CE4E5B9ull;
  for (size_t i = 0; i < n; i += 8) {
    uint64_t x = seed + i * 0x94D049BB133111EBull;
    x ^= x >> 31;
    x *= 0xD6E8FEB86659FD93ull;
    x ^= x >> 32;
    std::memcpy(b.data() + i, &x, std::min<size_t>(8, n - i));
  }
  return b;
}

Snapshot StepSnapshot(int64_t step) {
  Snapshot s;
  s.step = step;
  s.seed = 4242;
  s.loaders["train"] = {static_cast<uint64_t>(step / 7), static_cast<uint64_t>(step % 7)};
  s.metrics["step"] = static_cast<double>(step);
  s.config_text = "crash test";
  struct Spec {
    const char* name;
    std::vector<int64_t> shape;
  };
  // ~0.3 MiB in all (under ASan on a busy VM a save of it takes ~50-100 ms).
  // Every fourth step starts with "big": one row of two almost full chunks
  // (8 MiB more), which makes the save long enough for kills to land in each
  // of its stages: chunk writes (leaving chunks without a header), the
  // stores' syncs, the commit.
  std::vector<Spec> specs = {{"mat", {64, 512}}, {"wide", {3, 12000}}, {"vec", {300}}, {"cube", {4, 5, 6}}};
  if (step % 4 == 0) specs.insert(specs.begin(), {"big", {1, 2 * static_cast<int64_t>(kChunkBytes / 4) - 100}});
  for (size_t i = 0; i < specs.size(); ++i) {
    int64_t n = 1;
    for (int64_t d : specs[i].shape) n *= d;
    s.tensors.push_back({specs[i].name, "F32", specs[i].shape, StepBytes(step, static_cast<int>(i), n * 4)});
  }
  return s;
}

struct Opened {
  std::unique_ptr<Catalog> catalog;
  std::vector<std::unique_ptr<ShardStore>> stores;
  StoreSet set;
};

Expected<Opened> OpenAll(const std::string& dir) {
  Opened o;
  TROUPE_ASSIGN_OR_RETURN(o.catalog, Catalog::Open(dir));
  for (int i = 0; i < 2; ++i) {
    TROUPE_ASSIGN_OR_RETURN(auto st, ShardStore::Open(dir + "/store-" + std::to_string(i), "s" + std::to_string(i)));
    o.set[st->id()] = st.get();
    o.stores.push_back(std::move(st));
  }
  return o;
}

// The saver child: saves step after step until it is killed. Exit codes
// other than death by SIGKILL say what went wrong.
// big_first: start at the next step that holds "big" (else skip it at the start).
[[noreturn]] void SaverMain(const std::string& dir, bool big_first) {
  const auto t0 = std::chrono::steady_clock::now();
  auto ms = [&] { return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count(); };
  const bool verbose = std::getenv("TROUPE_CRASH_VERBOSE") != nullptr;
  auto o = OpenAll(dir);
  if (verbose) std::fprintf(stderr, "saver: opened at %.0f ms\n", ms());
  if (!o.ok()) {
    std::fprintf(stderr, "saver: open: %s\n", o.status().message().c_str());
    _exit(10);
  }
  // Drop what crashed saves left, and apply retention first (so that a kill
  // between a commit and its retention pass, however often repeated, leaves
  // at most kKeepLast + 1 unpinned checkpoints).
  if (!CollectGarbage(*o->catalog, o->set, {kKeepLast, 0}).ok()) _exit(11);
  if (verbose) std::fprintf(stderr, "saver: gc at %.0f ms\n", ms());
  const char ready = 'r';
  if (write(g_ready_fd, &ready, 1) != 1) _exit(15);
  // Steps only have to grow, so the first one can be chosen: savers told to
  // start with a slow "big" save do, the others skip it (else a run of kills
  // inside big saves would pin every saver to that step).
  int64_t step = 1;
  auto latest = o->catalog->Latest();
  if (latest.ok()) {
    step += latest->step;
  } else if (!latest.status().IsNotFound()) {
    _exit(12);
  }
  while ((step % 4 == 0) != big_first) ++step;
  for (bool first = true;; ++step, first = false) {
    Snapshot snap = StepSnapshot(step);
    if (verbose) std::fprintf(stderr, "saver: snapshot at %.0f ms\n", ms());
    if (first && big_first && write(g_ready_fd, "b", 1) != 1) _exit(16);  // the big save starts now
    auto m = SaveCheckpoint(snap, o->set, *o->catalog, {2, 3});
    if (verbose) std::fprintf(stderr, "saver: saved step %lld at %.0f ms\n", static_cast<long long>(step), ms());
    if (!m.ok()) {
      std::fprintf(stderr, "saver: save: %s\n", m.status().message().c_str());
      _exit(13);
    }
    auto dropped = CollectGarbage(*o->catalog, o->set, {kKeepLast, 0});
    if (!dropped.ok()) {
      std::fprintf(stderr, "saver: gc: %s\n", dropped.status().message().c_str());
      _exit(14);
    }
  }
}

// The sync probe: puts a two-chunk shard, syncs, signals; puts a second
// shard without a sync, signals; then waits to be killed.
constexpr int64_t kProbeRows = 3;
std::vector<uint8_t> ProbeBytes(int which) { return StepBytes(1000 + which, 0, 2 * kChunkBytes - 12); }

[[noreturn]] void SyncProbeMain(const std::string& dir) {
  auto st = ShardStore::Open(dir + "/store-0", "s0");
  if (!st.ok()) _exit(20);
  if (!(*st)->Put({"ckpt-000001", "w", 0}, kProbeRows, ProbeBytes(0)).ok()) _exit(21);
  if (!(*st)->Sync().ok()) _exit(22);
  if (write(g_ready_fd, "s", 1) != 1) _exit(23);
  if (!(*st)->Put({"ckpt-000001", "w", kProbeRows}, 2 * kProbeRows, ProbeBytes(1)).ok()) _exit(24);
  if (write(g_ready_fd, "u", 1) != 1) _exit(25);
  for (;;) pause();
}

// ------------------------------------------------------------- spawner

bool WriteAll(int fd, const void* p, size_t n) {
  const char* c = static_cast<const char*>(p);
  while (n > 0) {
    const ssize_t w = write(fd, c, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) return false;
    c += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

bool ReadAll(int fd, void* p, size_t n) {
  char* c = static_cast<char*>(p);
  while (n > 0) {
    const ssize_t r = read(fd, c, n);
    if (r < 0 && errno == EINTR) continue;
    if (r <= 0) return false;
    c += r;
    n -= static_cast<size_t>(r);
  }
  return true;
}

// Spawner: reads a directory name (length-prefixed; length 0 = quit), forks
// a saver in it, writes the saver's pid, reaps it, writes its wait status.
[[noreturn]] void SpawnerMain(int in, int out) {
  for (;;) {
    uint32_t len = 0;
    if (!ReadAll(in, &len, sizeof(len)) || len == 0) _exit(0);
    std::string dir(len, '\0');
    if (!ReadAll(in, dir.data(), len)) _exit(1);
    const pid_t pid = fork();
    if (pid < 0) _exit(2);
    if (pid == 0) {
      close(in);
      close(out);
      if (dir.starts_with("sync:")) SyncProbeMain(dir.substr(5));
      const bool big = dir.starts_with("big:");
      SaverMain(big ? dir.substr(4) : dir, big);
    }
    int32_t p = pid;
    if (!WriteAll(out, &p, sizeof(p))) _exit(3);
    int status = 0;
    while (waitpid(pid, &status, 0) < 0 && errno == EINTR) {
    }
    int32_t st = status;
    if (!WriteAll(out, &st, sizeof(st))) _exit(4);
  }
}

class CheckpointCrashTest : public ::testing::Test {
 protected:
  static void SetUpTestSuite() {
    root_ = (fs::temp_directory_path() / ("troupe_ckpt_crash_" + std::to_string(getpid()))).string();
    fs::remove_all(root_);
    fs::create_directories(root_);
    int to[2], from[2], ready[2];
    ASSERT_EQ(pipe(to), 0);
    ASSERT_EQ(pipe(from), 0);
    ASSERT_EQ(pipe(ready), 0);
    ASSERT_EQ(fcntl(ready[0], F_SETFL, O_NONBLOCK), 0);
    g_ready_fd = ready[1];
    std::fflush(nullptr);
    spawner_ = fork();
    ASSERT_GE(spawner_, 0);
    if (spawner_ == 0) {
      close(to[1]);
      close(from[0]);
      SpawnerMain(to[0], from[1]);
    }
    close(to[0]);
    close(from[1]);
    close(ready[1]);
    to_ = to[1];
    from_ = from[0];
    ready_ = ready[0];
  }
  static void TearDownTestSuite() {
    const uint32_t quit = 0;
    (void)WriteAll(to_, &quit, sizeof(quit));
    close(to_);
    close(from_);
    close(ready_);
    int status = 0;
    waitpid(spawner_, &status, 0);
    fs::remove_all(root_);
  }

  // Runs a saver in `where` and SIGKILLs it `delay_ms` after it has opened
  // its databases (from_spawn: after it was forked, so the kill may land in
  // RocksDB's recovery; big_first: after its first save, a big one, began).
  // The saver must die by that signal (any other end is a failure naming its
  // exit code).
  static void KillAfter(const std::string& where, int delay_ms, bool from_spawn = false, bool big_first = false,
                        bool sync_probe = false) {
    const std::string dir = (sync_probe ? "sync:" : big_first ? "big:" : "") + where;
    const uint32_t len = static_cast<uint32_t>(dir.size());
    ASSERT_TRUE(WriteAll(to_, &len, sizeof(len)) && WriteAll(to_, dir.data(), len));
    int32_t pid = 0;
    ASSERT_TRUE(ReadAll(from_, &pid, sizeof(pid)));
    ASSERT_GT(pid, 0);
    // Signals to wait for: the saver has opened its databases; (big_first)
    // it starts its big save.
    int signals = from_spawn ? 0 : (big_first || sync_probe) ? 2 : 1;
    bool ready = true;
    while (signals > 0 && ready) {
      pollfd p{ready_, POLLIN, 0};
      char c;
      ready = poll(&p, 1, 60000) == 1 && read(ready_, &c, 1) == 1;  // else it died or hung: reported below
      --signals;
    }
    if (ready) std::this_thread::sleep_for(std::chrono::milliseconds(delay_ms));
    kill(pid, SIGKILL);
    int32_t status = 0;
    ASSERT_TRUE(ReadAll(from_, &status, sizeof(status)));  // reaped: its databases are closed
    char drain[16];
    while (read(ready_, drain, sizeof(drain)) > 0) {
    }
    ASSERT_TRUE(WIFSIGNALED(status) && WTERMSIG(status) == SIGKILL)
        << "the saver ended by itself: exit code " << (WIFEXITED(status) ? WEXITSTATUS(status) : -1);
    ASSERT_TRUE(ready) << "the saver never opened its databases";
  }

  static std::string root_;
  static pid_t spawner_;
  static int to_, from_, ready_;
};

std::string CheckpointCrashTest::root_;
pid_t CheckpointCrashTest::spawner_ = -1;
int CheckpointCrashTest::to_ = -1;
int CheckpointCrashTest::from_ = -1;
int CheckpointCrashTest::ready_ = -1;

int64_t IdNumber(const std::string& id) { return std::stoll(id.substr(5)); }

// The checkpoint's bytes are those of its step, exactly.
::testing::AssertionResult LoadsExactly(const Manifest& m, const StoreSet& set, ReadStats* stats = nullptr) {
  auto snap = LoadCheckpoint(m, set, stats);
  if (!snap.ok()) return ::testing::AssertionFailure() << m.id << ": " << snap.status().message();
  const Snapshot want = StepSnapshot(m.step);
  if (snap->tensors.size() != want.tensors.size())
    return ::testing::AssertionFailure() << m.id << ": " << snap->tensors.size() << " tensors";
  for (size_t i = 0; i < want.tensors.size(); ++i) {
    const HostTensor &a = snap->tensors[i], &b = want.tensors[i];
    if (a.name != b.name || a.shape != b.shape || a.dtype != b.dtype || a.bytes != b.bytes)
      return ::testing::AssertionFailure() << m.id << " (step " << m.step << "): tensor " << b.name << " differs";
  }
  if (snap->loaders != want.loaders || snap->seed != want.seed || snap->metrics != want.metrics ||
      snap->config_text != want.config_text)
    return ::testing::AssertionFailure() << m.id << ": metadata differs";
  return ::testing::AssertionSuccess();
}

TEST_F(CheckpointCrashTest, KilledSaversNeverLeaveABrokenOrLostCheckpoint) {
  const std::string dir = root_ + "/loop";
  int trials = 25;
  if (const char* env = std::getenv("TROUPE_CRASH_TRIALS")) trials = std::max(1, std::atoi(env));
  std::mt19937 rng(20240611);
  int max_delay_ms = 300;
  if (const char* env = std::getenv("TROUPE_CRASH_MAX_DELAY_MS")) max_delay_ms = std::max(0, std::atoi(env));
  std::uniform_int_distribution<int> delay(0, max_delay_ms);
  std::set<std::string> pinned;  // must survive every later crash
  std::set<std::string> ever;    // every id ever seen committed
  int64_t max_id = 0;
  const auto start = std::chrono::steady_clock::now();
  for (int trial = 0; trial < trials; ++trial) {
    // Every fifth trial counts from the fork, so some kills land while
    // RocksDB opens and recovers. Every third begins with a big save, and
    // its delay counts from the start of that save and is drawn from five
    // times the range: the big save takes ~0.6-1 s under ASan on this VM
    // (~20 ms in a release build), and its kills should land anywhere in it.
    const bool from_spawn = trial % 5 == 2;
    const bool big_first = trial % 3 == 1 && !from_spawn;
    const int ms = big_first ? delay(rng) * 5 : delay(rng);
    SCOPED_TRACE("trial " + std::to_string(trial) + ", killed " + std::to_string(ms) + " ms after " +
                 (from_spawn  ? "the fork"
                  : big_first ? "its big save began"
                              : "opening"));
    KillAfter(dir, ms, from_spawn, big_first);
    if (HasFatalFailure()) return;

    auto o = OpenAll(dir);
    ASSERT_TRUE(o.ok()) << o.status().message();
    auto list = o->catalog->List();
    ASSERT_TRUE(list.ok()) << list.status().message();
    std::set<std::string> listed;
    int64_t prev_id = 0, prev_step = 0;
    int unpinned = 0;
    for (const Manifest& m : *list) {
      const int64_t n = IdNumber(m.id);
      EXPECT_GT(n, prev_id) << m.id;
      EXPECT_GT(m.step, prev_step) << m.id;
      prev_id = n;
      prev_step = m.step;
      // An id not seen before is newer than every id seen before: never reused.
      if (!ever.count(m.id)) {
        EXPECT_GT(n, max_id) << m.id;
      }
      EXPECT_TRUE(LoadsExactly(m, o->set));
      listed.insert(m.id);
      unpinned += m.pinned ? 0 : 1;
    }
    for (const std::string& id : pinned) EXPECT_TRUE(listed.count(id)) << "pinned " << id << " lost";
    // Retention ran after each commit; a kill between the two leaves one more.
    EXPECT_LE(unpinned, kKeepLast + 1);
    for (const std::string& id : listed) {
      ever.insert(id);
      max_id = std::max(max_id, IdNumber(id));
    }

    // GC keeping everything committed: what stays is exactly the committed set.
    auto dropped = CollectGarbage(*o->catalog, o->set, {1 << 30, 0});
    ASSERT_TRUE(dropped.ok()) << dropped.status().message();
    for (const std::string& id : *dropped) EXPECT_FALSE(listed.count(id)) << id;
    auto after = o->catalog->List();
    ASSERT_TRUE(after.ok());
    ASSERT_EQ(after->size(), list->size());
    for (const Manifest& m : *after) EXPECT_TRUE(LoadsExactly(m, o->set));
    // Pin one checkpoint now and then: it must outlive every later crash and retention pass.
    if (trial % 5 == 4 && !after->empty() && !after->back().pinned) {
      ASSERT_TRUE(o->catalog->SetPinned(after->back().id, true).ok());
      pinned.insert(after->back().id);
    }
    std::vector<std::string> paths;
    for (auto& st : o->stores) {
      paths.push_back(st->path());
      // Chunk files "<id>.chunks": only those of committed checkpoints remain.
      for (const auto& e : fs::directory_iterator(st->chunks_path())) {
        const std::string name = e.path().filename().string();
        EXPECT_TRUE(name.ends_with(".chunks") && listed.count(name.substr(0, name.size() - 7)))
            << st->chunks_path() << " still holds " << name;
      }
    }
    o = Status::Internal("closed");  // close every database before looking at the raw keys
    for (const std::string& path : paths) {
      if (std::getenv("TROUPE_CRASH_VERBOSE")) {
        std::set<std::string> keys_of;
        for (const std::string& key : RawKeys(path)) keys_of.insert(key.substr(0, key.find('/', 2)));
        std::string line;
        for (const std::string& k : keys_of) line += " " + k;
        std::fprintf(stderr, "parent: trial %d (%d ms%s) %s holds%s\n", trial, ms, big_first ? ", big" : "",
                     path.c_str(), line.c_str());
      }
      for (const std::string& key : RawKeys(path)) {
        // "s/<id>/..." and "c/<id>/...": nothing of an uncommitted or expired save is left.
        const std::string id = key.substr(2, key.find('/', 2) - 2);
        EXPECT_TRUE(listed.count(id)) << path << " still holds " << key;
      }
    }
    if (HasFailure()) return;
  }
  const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  std::printf("%d trials in %.1f s: %zu checkpoints committed, %zu pinned, newest id %lld\n", trials, secs, ever.size(),
              pinned.size(), static_cast<long long>(max_id));
  // Not vacuous: the savers got far enough to commit, several times.
  EXPECT_GE(ever.size(), static_cast<size_t>(std::min(trials, 5)));
}

TEST_F(CheckpointCrashTest, SyncAloneMakesShardsSurviveAKill) {
  const std::string dir = root_ + "/sync";
  KillAfter(dir, 0, false, false, /*sync_probe=*/true);
  if (HasFatalFailure()) return;
  auto st = ShardStore::Open(dir + "/store-0", "s0");
  ASSERT_TRUE(st.ok()) << st.status().message();
  auto got = (*st)->Get({"ckpt-000001", "w", 0});
  ASSERT_TRUE(got.ok()) << "a synced shard was lost: " << got.status().message();
  EXPECT_TRUE(*got == ProbeBytes(0));
  // The shard put after the sync may or may not have survived, but never in part.
  auto unsynced = (*st)->Get({"ckpt-000001", "w", kProbeRows});
  if (unsynced.ok()) {
    EXPECT_TRUE(*unsynced == ProbeBytes(1));
  } else {
    EXPECT_TRUE(unsynced.status().IsNotFound()) << unsynced.status().message();
  }
}

TEST_F(CheckpointCrashTest, ACorruptShardOfTheNewestIsReadFromItsReplica) {
  const std::string dir = root_ + "/corrupt";
  // Run savers until something is committed (longer each time).
  for (int ms = 150; ms <= 2400; ms *= 2) {
    KillAfter(dir, ms);
    if (HasFatalFailure()) return;
    auto o = OpenAll(dir);
    ASSERT_TRUE(o.ok()) << o.status().message();
    if (o->catalog->Latest().ok()) break;
  }
  auto o = OpenAll(dir);
  ASSERT_TRUE(o.ok()) << o.status().message();
  auto newest = o->catalog->Latest();
  ASSERT_TRUE(newest.ok()) << newest.status().message();
  // One shard of each of two tensors, corrupted on the store listed first for it.
  for (const char* name : {"wide", "mat"}) {
    const TensorRecord* t = newest->Find(name);
    ASSERT_NE(t, nullptr);
    const ShardRef& ref = t->shards.back();
    ASSERT_EQ(ref.stores.size(), 2u);
    ASSERT_TRUE(o->set.at(ref.stores[0])->CorruptForTest({newest->id, name, ref.row_begin}).ok());
  }
  ReadStats stats;
  EXPECT_TRUE(LoadsExactly(*newest, o->set, &stats));
  EXPECT_EQ(stats.replica_fallbacks, 2);
  EXPECT_EQ(stats.failures.size(), 2u);
  std::vector<std::string> problems;
  EXPECT_TRUE(VerifyCheckpoint(*newest, o->set, &problems).ok());
  EXPECT_EQ(problems.size(), 2u);
  // The damage survives reopening (it is on disk), and so does the fallback.
  o = Status::Internal("closed");
  auto again = OpenAll(dir);
  ASSERT_TRUE(again.ok());
  ReadStats stats2;
  EXPECT_TRUE(LoadsExactly(*newest, again->set, &stats2));
  EXPECT_EQ(stats2.replica_fallbacks, 2);
}

}  // namespace
}  // namespace troupe::ckpt
