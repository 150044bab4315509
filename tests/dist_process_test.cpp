// Distributed training across real processes: `troupe train` with a
// [parallel] layout starts one process per rank, talking CURVE-authenticated
// ZeroMQ over loopback. Its losses equal the single-process Trainer's on the
// same global batches; a bad layout is refused before anything starts; a
// rank killed mid-run stops the job with the dead rank named, never a hang.
#include <dirent.h>
#include <fcntl.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <fstream>
#include <random>
#include <regex>
#include <sstream>
#include <thread>

#include "gpu/cpu/cpu_backend.h"
#include "small_job.h"
#include "storage/model_weights.h"
#include "storage/safetensors.h"
#include "test_util.h"
#include "train/checkpointer.h"
#include "train/trainer.h"

namespace troupe {
namespace {

namespace fs = std::filesystem;

std::string ReadFile(const fs::path& p) {
  std::ifstream in(p);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

// The SmallJob model with 4 layers, as the TOML `troupe train` reads.
std::string ConfigToml(const JobConfig& j) {
  const ModelConfig& m = j.model;
  std::ostringstream o;
  o << "[model]\nvocab_size = " << m.vocab_size << "\nhidden_size = " << m.hidden_size
    << "\nnum_hidden_layers = 4\nfirst_k_dense_replace = " << m.first_k_dense_replace
    << "\nnum_attention_heads = " << m.num_attention_heads << "\nq_lora_rank = " << m.q_lora_rank
    << "\nkv_lora_rank = " << m.kv_lora_rank << "\nqk_nope_head_dim = " << m.qk_nope_head_dim
    << "\nqk_rope_head_dim = " << m.qk_rope_head_dim << "\nv_head_dim = " << m.v_head_dim
    << "\nintermediate_size = " << m.intermediate_size << "\nmoe_intermediate_size = " << m.moe_intermediate_size
    << "\nn_routed_experts = " << m.n_routed_experts << "\nnum_experts_per_tok = " << m.num_experts_per_tok
    << "\nn_group = " << m.n_group << "\ntopk_group = " << m.topk_group
    << "\nnum_nextn_predict_layers = " << m.num_nextn_predict_layers << "\n\n[train]\nseq_len = " << j.train.seq_len
    << "\nbatch_size = 16\nsteps = 3\nwarmup_steps = 1\nlr = " << j.train.lr
    << "\neval_every = 0\neval_batches = 1\nlog_every = 1\nthreads = 1\n\n[data]\ntrain_shards = [\""
    << j.data.train_shards[0] << "\"]\nval_shards = [\"" << j.data.val_shards[0] << "\"]\n";
  return o.str();
}

struct Proc {
  pid_t pid = -1;
  fs::path out, err;
};

Proc Start(const fs::path& dir, const std::vector<std::string>& args) {
  Proc p{-1, dir / "launcher.out", dir / "launcher.err"};
  fs::remove(p.out);  // an earlier launcher's lines must not be taken for this one's
  fs::remove(p.err);
  p.pid = fork();
  if (p.pid == 0) {
    const int o = open(p.out.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    const int e = open(p.err.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (o < 0 || e < 0 || dup2(o, 1) < 0 || dup2(e, 2) < 0) _exit(127);
    std::vector<std::string> copy = args;
    std::string bin = TROUPE_BINARY;
    std::vector<char*> argv = {bin.data()};
    for (std::string& a : copy) argv.push_back(a.data());
    argv.push_back(nullptr);
    execv(bin.c_str(), argv.data());
    _exit(127);
  }
  return p;
}

// Exit code, or -1 if still running after `limit` (then it is killed).
int Wait(Proc& p, std::chrono::seconds limit) {
  const auto deadline = std::chrono::steady_clock::now() + limit;
  int status = 0;
  while (waitpid(p.pid, &status, WNOHANG) == 0) {
    if (std::chrono::steady_clock::now() > deadline) {
      kill(-p.pid, SIGKILL);
      kill(p.pid, SIGKILL);
      waitpid(p.pid, &status, 0);
      return -1;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
}

std::vector<double> Losses(const std::string& out) {
  std::vector<double> v;
  std::regex line(R"(step\s+\d+/\d+ \| loss ([0-9.]+))");
  for (std::sregex_iterator it(out.begin(), out.end(), line), end; it != end; ++it) v.push_back(std::stod((*it)[1]));
  return v;
}

// Pids of the rank processes whose command line holds `needle`.
std::vector<pid_t> FindRanks(const std::string& needle, const std::string& rank) {
  std::vector<pid_t> out;
  DIR* d = opendir("/proc");
  while (dirent* e = d ? readdir(d) : nullptr) {
    const pid_t pid = atoi(e->d_name);
    if (pid <= 0) continue;
    std::string cmd = ReadFile(fs::path("/proc") / e->d_name / "cmdline");
    for (char& c : cmd)
      if (c == '\0') c = ' ';
    if (cmd.find(needle) != std::string::npos && cmd.find(" rank --rank " + rank + " ") != std::string::npos)
      out.push_back(pid);
  }
  if (d) closedir(d);
  return out;
}

class DistProcessTest : public ::testing::Test {
 protected:
  void SetUp() override {
    job_ = testing::SmallJob(dir_.path(), 20000);
    config_ = (dir_.path() / "job.toml").string();
    std::ofstream(config_) << ConfigToml(job_);
    JobConfig single = job_;
    single.model.num_hidden_layers = 4;
    single.train.batch_size = 16;
    single.train.steps = 3;
    single.train.warmup_steps = 1;
    CpuBackend be(1);
    auto t = Trainer::Create(be, single);
    ASSERT_TRUE(t.ok()) << t.status().message();
    for (int s = 0; s < 3; ++s) reference_.push_back((*t)->Step()->loss.total);
    reference_weights_ = (dir_.path() / "single.safetensors").string();
    ASSERT_TRUE(ExportWeights(be, single.model, (*t)->model().params(), reference_weights_, {}).ok());
  }

  // The run's exported weights against the single-process run's, tensor by
  // tensor (public DeepSeek-V3 names; expert shards joined back).
  void ExpectSameWeights(const std::string& path) {
    auto got = ReadSafetensors(path);
    auto want = ReadSafetensors(reference_weights_);
    ASSERT_TRUE(got.ok()) << got.status().message();
    ASSERT_TRUE(want.ok());
    ASSERT_EQ(got->names().size(), want->names().size());
    for (const SafeTensor& w : want->tensors()) {
      auto g = got->Get(w.name);
      ASSERT_TRUE(g.ok()) << g.status().message();
      std::vector<float> a = DecodeFloats(**g).value(), b = DecodeFloats(w).value();
      ASSERT_EQ(a.size(), b.size()) << w.name;
      double diff = 0, norm = 0;
      for (size_t i = 0; i < a.size(); ++i) {
        diff += (double(a[i]) - b[i]) * (double(a[i]) - b[i]);
        norm += double(b[i]) * b[i];
      }
      EXPECT_LT(std::sqrt(diff / std::max(norm, 1e-300)), 1e-4) << w.name;
    }
  }

  void ExpectMatches(const std::vector<std::string>& layout) {
    std::vector<std::string> args = {"train",     "--config", config_, "--out", (dir_.path() / "run").string(),
                                     "--timeout", "20"};
    args.insert(args.end(), layout.begin(), layout.end());
    Proc p = Start(dir_.path(), args);
    ASSERT_EQ(Wait(p, std::chrono::seconds(120)), 0) << ReadFile(p.err) << ReadFile(p.out);
    const std::vector<double> got = Losses(ReadFile(p.out));
    ASSERT_EQ(got.size(), reference_.size()) << ReadFile(p.out);
    for (size_t s = 0; s < got.size(); ++s)
      EXPECT_NEAR(got[s], reference_[s], 1e-5 * reference_[s]) << "step " << s + 1 << "\n" << ReadFile(p.out);
    ExpectSameWeights((dir_.path() / "run" / "model.safetensors").string());
  }

  testing::TempDir dir_;
  JobConfig job_;
  std::string config_;
  std::vector<double> reference_;
  std::string reference_weights_;
};

TEST_F(DistProcessTest, DualPipeTwoByTwoProcessesMatchOneProcess) {
  ExpectMatches({"--pp", "2", "--dp", "2", "--schedule", "dualpipe"});
}

TEST_F(DistProcessTest, OneFOneBFourStagesMatchesOneProcess) { ExpectMatches({"--pp", "4", "--schedule", "1f1b"}); }

TEST_F(DistProcessTest, DualPipeVMatchesOneProcess) { ExpectMatches({"--pp", "2", "--schedule", "dualpipev"}); }

TEST_F(DistProcessTest, ExpertParallelPipelineMatchesOneProcess) {
  ExpectMatches({"--pp", "2", "--ep", "2", "--schedule", "dualpipe"});
}

// A checkpoint the 4 processes of a pp2 x ep2 DualPipe run save at step 2
// resumes in 4 processes of a pp4 1F1B run, and in one process, and step 3
// is the single-process run's step 3; a bad --resume is one clear error.
TEST_F(DistProcessTest, CheckpointResumesInAnotherLayoutAndInOneProcess) {
  const std::string ckpt = (dir_.path() / "ckpt").string();
  auto run = [&](std::vector<std::string> extra, const std::string& out) {
    std::vector<std::string> args = {
        "train", "--config",         config_, "--out", (dir_.path() / out).string(), "--timeout",
        "20",    "--checkpoint-dir", ckpt};
    args.insert(args.end(), extra.begin(), extra.end());
    Proc p = Start(dir_.path(), args);
    const int code = Wait(p, std::chrono::seconds(120));
    return std::make_pair(code, ReadFile(p.out) + ReadFile(p.err));
  };
  auto [saved, save_log] =
      run({"--pp", "2", "--ep", "2", "--schedule", "dualpipe", "--steps", "2", "--checkpoint-every", "2"}, "a");
  ASSERT_EQ(saved, 0) << save_log;
  EXPECT_NE(save_log.find("checkpoint ckpt-000001 committed: step 2"), std::string::npos) << save_log;
  for (const auto& [layout, out] : std::vector<std::pair<std::vector<std::string>, std::string>>{
           {{"--pp", "4", "--schedule", "1f1b"}, "b"}, {{}, "c"}}) {
    std::vector<std::string> extra = layout;
    extra.insert(extra.end(), {"--steps", "3", "--resume", "latest", "--checkpoint-every", "0"});
    auto [code, log] = run(extra, out);
    ASSERT_EQ(code, 0) << log;
    EXPECT_NE(log.find("resumed from ckpt-000001"), std::string::npos) << log;
    const std::vector<double> got = Losses(log);
    ASSERT_EQ(got.size(), 1u) << log;
    EXPECT_NEAR(got[0], reference_[2], 1e-5 * reference_[2]) << log;
    ExpectSameWeights((dir_.path() / out / "model.safetensors").string());
  }
  auto [bad, bad_log] = run({"--pp", "2", "--resume", "ckpt-000099"}, "d");
  EXPECT_NE(bad, 0);
  EXPECT_NE(bad_log.find("ckpt-000099"), std::string::npos) << bad_log;
}

// Crash safety of distributed saves: a rank SIGKILLed at a random moment of
// a run that saves every step (so mostly mid-save: capturing, writing,
// replicating or committing) never leaves a checkpoint listed that does not
// verify and load; ids keep growing across trials; the newest resumes.
TEST_F(DistProcessTest, KilledRankDuringSavesNeverLeavesAPartialCheckpoint) {
  const std::string ckpt = (dir_.path() / "ckpt").string();
  std::mt19937 rng(20261206);
  std::string last_id;
  int trials_with_commits = 0;
  for (int trial = 0; trial < 5; ++trial) {
    const std::string run = (dir_.path() / ("crash" + std::to_string(trial))).string();
    Proc p = Start(dir_.path(), {"train", "--config", config_, "--out", run, "--pp", "2", "--dp", "2", "--steps",
                                 "100000", "--checkpoint-every", "1", "--checkpoint-dir", ckpt, "--timeout", "5"});
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (ReadFile(p.out).find(" committed") == std::string::npos && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    std::this_thread::sleep_for(std::chrono::milliseconds(rng() % 400));
    const std::string victim = std::to_string(rng() % 4);
    const std::vector<pid_t> pids = FindRanks(run, victim);
    ASSERT_EQ(pids.size(), 1u) << "rank " << victim << "\n" << ReadFile(p.out) << ReadFile(p.err);
    kill(pids[0], SIGKILL);
    EXPECT_NE(Wait(p, std::chrono::seconds(60)), 0) << "the job went on without rank " << victim;

    auto folder = OpenCheckpointFolder(ckpt);
    ASSERT_TRUE(folder.ok()) << folder.status().message();
    auto listed = folder->catalog->List();
    ASSERT_TRUE(listed.ok()) << listed.status().message();
    if (!listed->empty()) ++trials_with_commits;
    for (const ckpt::Manifest& m : *listed) {
      std::vector<std::string> problems;
      EXPECT_TRUE(ckpt::VerifyCheckpoint(m, folder->store_set, &problems).ok())
          << "trial " << trial << ": " << m.id << " is listed but " << (problems.empty() ? "" : problems[0]);
    }
    if (!listed->empty()) {
      const ckpt::Manifest& newest = listed->back();
      EXPECT_TRUE(ckpt::LoadCheckpoint(newest, folder->store_set).ok()) << newest.id;
      EXPECT_GT(newest.id, last_id) << "ids must never be reused";
      last_id = newest.id;
    }
  }
  ASSERT_GT(trials_with_commits, 0);
  // The newest checkpoint resumes (another layout, to be sure).
  auto folder = OpenCheckpointFolder(ckpt);
  ASSERT_TRUE(folder.ok());
  auto newest = folder->catalog->Latest();
  ASSERT_TRUE(newest.ok());
  const int64_t step = newest->step;
  folder = Status::Ok();  // close the stores before the run opens them
  Proc p = Start(dir_.path(), {"train", "--config", config_, "--out", (dir_.path() / "after").string(), "--pp", "4",
                               "--steps", std::to_string(step + 1), "--resume", "latest", "--checkpoint-dir", ckpt,
                               "--checkpoint-every", "0"});
  ASSERT_EQ(Wait(p, std::chrono::seconds(120)), 0) << ReadFile(p.out) << ReadFile(p.err);
  EXPECT_NE(ReadFile(p.out).find("resumed from " + newest->id), std::string::npos) << ReadFile(p.out);
}

TEST_F(DistProcessTest, ImpossibleLayoutsAreRefusedBeforeAnyRankStarts) {
  const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
      {{"--pp", "3", "--schedule", "dualpipe"}, "even"}, {{"--pp", "8"}, "only 4 layers"},
      {{"--pp", "2", "--dp", "3"}, "does not split"},    {{"--pp", "2", "--schedule", "gpipe"}, "not a schedule"},
      {{"--pp", "2", "--ep", "3"}, "does not divide"},   {{"--ep", "4"}, "n_group"},
  };
  for (const auto& [flags, needle] : cases) {
    std::vector<std::string> args = {"train", "--config", config_, "--out", (dir_.path() / "bad").string()};
    args.insert(args.end(), flags.begin(), flags.end());
    Proc p = Start(dir_.path(), args);
    const int code = Wait(p, std::chrono::seconds(30));
    const std::string err = ReadFile(p.err);
    EXPECT_TRUE(code == 1 || code == 2) << code << " " << err;
    EXPECT_NE(err.find("troupe: error:"), std::string::npos) << err;
    EXPECT_NE(err.find(needle), std::string::npos) << "wanted '" << needle << "' in: " << err;
    EXPECT_FALSE(fs::exists(dir_.path() / "bad" / "dist" / "rank-0.log")) << "a rank was started";
  }
}

TEST_F(DistProcessTest, StoppingOrKillingTheLauncherStopsEveryRank) {
  for (const int signal : {SIGTERM, SIGKILL}) {
    const std::string run = (dir_.path() / ("stop" + std::to_string(signal))).string();
    Proc p = Start(dir_.path(), {"train", "--config", config_, "--out", run, "--pp", "2", "--steps", "100000"});
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
    while (ReadFile(p.out).find("step     1/") == std::string::npos && std::chrono::steady_clock::now() < deadline)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    ASSERT_EQ(FindRanks(run, "1").size(), 1u) << ReadFile(p.out) << ReadFile(p.err);
    kill(p.pid, signal);
    Wait(p, std::chrono::seconds(30));
    // SIGTERM: the launcher stops its ranks, which obey SIGTERM (no SIGKILL
    // after the grace period). SIGKILL: the ranks get SIGTERM from the kernel
    // when their parent dies, never orphaned.
    for (int i = 0; i < 200 && (!FindRanks(run, "0").empty() || !FindRanks(run, "1").empty()); ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    EXPECT_TRUE(FindRanks(run, "0").empty() && FindRanks(run, "1").empty()) << "ranks outlived signal " << signal;
    EXPECT_EQ(ReadFile(p.err).find("did not stop"), std::string::npos) << ReadFile(p.err);
  }
}

TEST_F(DistProcessTest, TheConfigsParallelSectionReachesEveryRank) {
  std::ofstream(config_, std::ios::app) << "\n[parallel]\npp = 2\nschedule = \"dualpipe\"\nsplit_w = false\n";
  Proc p =
      Start(dir_.path(), {"train", "--config", config_, "--out", (dir_.path() / "fused").string(), "--steps", "1"});
  ASSERT_EQ(Wait(p, std::chrono::seconds(60)), 0) << ReadFile(p.err);
  const std::string out = ReadFile(p.out);
  EXPECT_NE(out.find("schedule dualpipe, "), std::string::npos) << out;  // fused: no "(B/W split)"
  EXPECT_EQ(out.find("B/W split"), std::string::npos) << out;
}

TEST_F(DistProcessTest, AKilledRankStopsTheJobAndIsNamed) {
  const std::string run = (dir_.path() / "killed").string();
  Proc p = Start(dir_.path(), {"train", "--config", config_, "--out", run, "--pp", "2", "--dp", "2", "--steps",
                               "100000", "--timeout", "3"});
  // Wait for the first step line, then kill rank 3 as a crash would.
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (ReadFile(p.out).find("step     1/") == std::string::npos && std::chrono::steady_clock::now() < deadline)
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
  std::vector<pid_t> victims = FindRanks(run, "3");
  ASSERT_EQ(victims.size(), 1u) << ReadFile(p.out) << ReadFile(p.err);
  const auto killed_at = std::chrono::steady_clock::now();
  kill(victims[0], SIGKILL);
  const int code = Wait(p, std::chrono::seconds(60));
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - killed_at).count();
  EXPECT_EQ(code, 1) << ReadFile(p.err);
  const std::string err = ReadFile(p.err);
  EXPECT_NE(err.find("rank 3 of 4 failed (signal 9)"), std::string::npos) << err;
  EXPECT_TRUE(FindRanks(run, "0").empty() && FindRanks(run, "1").empty() && FindRanks(run, "2").empty())
      << "survivors left running";
  std::printf("job stopped %.2f s after rank 3 was killed\n", seconds);
}

}  // namespace
}  // namespace troupe
