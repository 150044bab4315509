// NCCL between real processes (gpu/device_comm.h, train/parallel/device_comms.h):
// two ranks, forked before anything touches CUDA, exchange their NCCL id over
// a CURVE ZeroMQ group and reduce device memory. With one GPU both ranks
// share it over NCCL's socket transport (each told it is a host of its own);
// with two, each has its own. Also: a rank that stops answering is an error
// within the deadline, not a hang; the CPU backend is refused by name.
// A child exits 77 when it finds no CUDA device, and the test is skipped.
#include <gtest/gtest.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <map>
#include <thread>
#include <vector>

#include "actors/transport/keys.h"
#include "gpu/cpu/cpu_backend.h"
#include "gpu/device_comm.h"
#include "gpu/host_io.h"
#include "test_util.h"
#include "train/parallel/collectives.h"
#include "train/parallel/device_comms.h"
#include "train/parallel/process_group.h"

#if defined(TROUPE_HAVE_CUDA)
#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/cuda_info.h"
#endif

namespace troupe {
namespace {

constexpr int kSkip = 77;

TEST(DeviceCommTest, TheCpuBackendIsRefusedByName) {
  CpuBackend cpu(1);
  auto id = NewDeviceCommId(cpu);
  ASSERT_FALSE(id.ok());
  EXPECT_NE(id.status().message().find("NCCL needs the CUDA backend"), std::string::npos) << id.status().message();
  auto choice = parallel::ChooseDeviceComm("nccl", cpu, 2, 0);
  ASSERT_FALSE(choice.ok());
  EXPECT_NE(choice.status().message().find("parallel.device_comm = \"nccl\" needs the CUDA backend"),
            std::string::npos);
  EXPECT_EQ(parallel::ChooseDeviceComm("auto", cpu, 2, 0).value(), "host");
  EXPECT_FALSE(parallel::ChooseDeviceComm("gpu", cpu, 2, 0).ok());
  // Groups of one need no communicator: nothing to join, nothing to refuse.
  auto groups = parallel::CreateLocalGroup(1);
  auto none = parallel::DeviceComms::Connect(cpu, *groups[0], {parallel::DeviceGroup{{0}}}, {}, 1000);
  ASSERT_TRUE(none.ok()) << none.status().message();
  EXPECT_EQ((*none)->size(), 0u);
  EXPECT_EQ(parallel::GpuOfRank(5, 2), 1);
  EXPECT_EQ(parallel::GpuOfRank(5, 0), 0);
}

// A communicator that only records: its Wait fails when told to.
class RecordingComm final : public DeviceComm {
 public:
  explicit RecordingComm(bool fails) : fails_(fails) {}
  int rank() const override { return 0; }
  int size() const override { return 2; }
  Status AllReduceSum(Tensor&) override { return Status::Ok(); }
  Status ReduceScatterSum(Tensor&, const std::vector<int64_t>&) override { return Status::Ok(); }
  Status AllGather(Tensor&, const std::vector<int64_t>&) override { return Status::Ok(); }
  Status ExchangeRows(const Tensor&, const std::vector<RowBlock>&, Tensor&, const std::vector<RowBlock>&) override {
    return Status::Ok();
  }
  Status Send(const Tensor&, int) override { return Status::Ok(); }
  Status Receive(Tensor&, int) override { return Status::Ok(); }
  Status Wait(int) override { return fails_ ? Status::IOError("rank 2 is gone") : Status::Ok(); }
  void Abort(const std::string& why) override { aborted = why; }
  std::string Describe() const override { return "recording"; }
  std::string aborted;

 private:
  bool fails_;
};

// Calls queued on the other communicators may wait on the same dead member
// (and the backend's stream on them): one failure must abort them all.
TEST(DeviceCommTest, OneFailedWaitAbortsEveryCommunicator) {
  auto first = std::make_unique<RecordingComm>(false), second = std::make_unique<RecordingComm>(true);
  auto link = std::make_unique<RecordingComm>(false);
  RecordingComm *a = first.get(), *b = second.get(), *l = link.get();
  std::map<parallel::DeviceGroup, std::unique_ptr<DeviceComm>> comms;
  comms.emplace(parallel::DeviceGroup{{0, 1}}, std::move(first));
  comms.emplace(parallel::DeviceGroup{{0, 2}}, std::move(second));
  std::map<parallel::DeviceLink, std::unique_ptr<DeviceComm>> links;
  links.emplace(parallel::DeviceLink{0, 1, parallel::TagKind::kActivation}, std::move(link));
  auto all = parallel::DeviceComms::Of(std::move(comms), std::move(links));
  EXPECT_EQ(all->links(), 1u);
  Status s = all->WaitAll(10);
  EXPECT_TRUE(s.IsIOError()) << s.ToString();
  EXPECT_EQ(a->aborted, "rank 2 is gone");
  EXPECT_EQ(b->aborted, "rank 2 is gone");
  EXPECT_EQ(l->aborted, "rank 2 is gone") << "a pipeline link kept its sends queued";
}

#if defined(TROUPE_HAVE_CUDA)

// What one rank does once its communicators are up; returns the exit code.
using Scenario = std::function<int(CudaBackend&, parallel::DeviceComms&, int rank)>;
// The same, given the communicator of the whole group.
using GroupScenario = std::function<int(CudaBackend&, DeviceComm&, int rank)>;

int Check(bool ok, const std::string& what) {
  if (!ok) std::fprintf(stderr, "rank check failed: %s\n", what.c_str());
  return ok ? 0 : 1;
}

int RankMain(int rank, int world, const std::string& dir, const std::vector<parallel::DeviceLink>& links,
             const Scenario& scenario) {
  const int gpus = CudaDeviceCount();
  if (gpus == 0) return kSkip;
  if (gpus < world) {  // as `troupe rank` does for ranks that share a GPU
    ::setenv("NCCL_HOSTID", ("troupe-test-rank-" + std::to_string(rank)).c_str(), 1);
    ::setenv("NCCL_SOCKET_IFNAME", "lo", 0);
    ::setenv("NCCL_IB_DISABLE", "1", 0);
  }
  auto be = CudaBackend::Create(parallel::GpuOfRank(rank, gpus), MatmulPrecision::kFp32);
  if (!be.ok()) return kSkip;
  auto key = transport::GenerateKeyPair();
  if (!key.ok()) return Check(false, key.status().message());
  parallel::FileRendezvous rendezvous(dir);
  auto group = parallel::CreateZmqGroup(rank, world, *key, "tcp://127.0.0.1:0", rendezvous, 30000);
  if (!group.ok()) return Check(false, group.status().message());
  std::vector<int> all;
  for (int r = 0; r < world; ++r) all.push_back(r);
  auto comms = parallel::DeviceComms::Connect(**be, **group, {parallel::DeviceGroup{all}}, links, 8000);
  if (!comms.ok()) return Check(false, comms.status().message());
  return scenario(**be, **comms, rank);
}

// Runs `world` ranks as forked processes; the exit codes, rank by rank.
std::vector<int> RunRanks(int world, const std::vector<parallel::DeviceLink>& links, const Scenario& scenario) {
  testing::TempDir dir;
  std::vector<pid_t> pids;
  for (int r = 0; r < world; ++r) {
    const pid_t pid = fork();
    if (pid == 0) _exit(RankMain(r, world, dir.path().string(), links, scenario));
    pids.push_back(pid);
  }
  std::vector<int> codes;
  for (pid_t pid : pids) {
    int status = 0;
    waitpid(pid, &status, 0);
    codes.push_back(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
  }
  return codes;
}

std::vector<int> RunRanks(int world, const GroupScenario& scenario) {
  return RunRanks(world, {}, [&](CudaBackend& be, parallel::DeviceComms& comms, int rank) {
    std::vector<int> all;
    for (int r = 0; r < world; ++r) all.push_back(r);
    DeviceComm* comm = comms.Find(all);
    return comm ? scenario(be, *comm, rank) : Check(false, "no communicator for the whole group");
  });
}

#define EXPECT_RANKS_PASS(codes)                                                           \
  do {                                                                                     \
    const std::vector<int> c = (codes);                                                    \
    if (c[0] == kSkip || c[1] == kSkip) GTEST_SKIP() << "no CUDA device";                  \
    for (size_t r = 0; r < c.size(); ++r) EXPECT_EQ(c[r], 0) << "rank " << r << " failed"; \
  } while (0)

// Element i of rank r's input: distinct per rank and element, exact in fp32.
float Value(int rank, size_t i) { return static_cast<float>((rank + 1) * 1000 + static_cast<int>(i % 997)); }

Expected<Tensor> Filled(CudaBackend& be, int rank, size_t n) {
  TROUPE_ASSIGN_OR_RETURN(Tensor t, be.Alloc({static_cast<int64_t>(n), 1}, DType::kF32, "data"));
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = Value(rank, i);
  FromHostFloats(be, t, v);
  return t;
}

constexpr size_t kLength = 100003;  // not a multiple of anything NCCL likes

TEST(NcclTest, AllReduceSumsOverTwoProcesses) {
  EXPECT_RANKS_PASS(RunRanks(2, [](CudaBackend& be, DeviceComm& comm, int rank) {
    auto t = Filled(be, rank, kLength);
    if (!t.ok()) return Check(false, t.status().message());
    Status s = comm.AllReduceSum(*t);
    if (s.ok()) s = comm.Wait(30000);
    if (!s.ok()) return Check(false, s.message());
    const std::vector<float> got = ToHostFloats(be, *t);
    for (size_t i = 0; i < kLength; ++i)
      if (got[i] != Value(0, i) + Value(1, i)) return Check(false, "element " + std::to_string(i));
    return Check(comm.size() == 2 && comm.rank() == rank, "size and rank");
  }));
}

// ZeRO-1's halves with uneven chunks: each rank owns ChunkOf's chunk.
TEST(NcclTest, ReduceScatterAndAllGatherUseUnevenChunks) {
  EXPECT_RANKS_PASS(RunRanks(2, [](CudaBackend& be, DeviceComm& comm, int rank) {
    std::vector<int64_t> bounds = {0};
    for (size_t i = 0; i < 2; ++i) {
      const parallel::Chunk c = parallel::ChunkOf(kLength, 2, i);
      bounds.push_back(static_cast<int64_t>(c.offset + c.count));
    }
    auto t = Filled(be, rank, kLength);
    if (!t.ok()) return Check(false, t.status().message());
    Status s = comm.ReduceScatterSum(*t, bounds);
    if (s.ok()) s = comm.Wait(30000);
    if (!s.ok()) return Check(false, s.message());
    std::vector<float> got = ToHostFloats(be, *t);
    for (int64_t i = bounds[rank]; i < bounds[rank + 1]; ++i)
      if (got[i] != Value(0, i) + Value(1, i)) return Check(false, "reduce-scatter element " + std::to_string(i));
    // Every rank's chunk becomes -(its rank + 1); the rest is garbage until gathered.
    for (int64_t i = 0; i < static_cast<int64_t>(kLength); ++i)
      got[i] = (i >= bounds[rank] && i < bounds[rank + 1]) ? -(rank + 1.0f) : 12345.0f;
    FromHostFloats(be, *t, got);
    s = comm.AllGather(*t, bounds);
    if (s.ok()) s = comm.Wait(30000);
    if (!s.ok()) return Check(false, s.message());
    got = ToHostFloats(be, *t);
    for (int64_t i = 0; i < static_cast<int64_t>(kLength); ++i)
      if (got[i] != (i < bounds[1] ? -1.0f : -2.0f)) return Check(false, "all-gather element " + std::to_string(i));
    // Bounds that do not cover the tensor are refused before NCCL sees them.
    Status bad = comm.AllGather(*t, {0, 5, 6});
    return Check(bad.IsInvalidArgument() && bad.message().find("chunk bounds") != std::string::npos, bad.message());
  }));
}

// Rank 1 leaves without joining the all-reduce: rank 0 must fail within the
// deadlines (8 s to connect, as joined; 3 s to finish), name the
// communicator, and fail every later call.
TEST(NcclTest, AMemberThatLeavesIsAnErrorNotAHang) {
  EXPECT_RANKS_PASS(RunRanks(2, [](CudaBackend& be, DeviceComm& comm, int rank) {
    if (rank == 1) return 0;
    auto t = Filled(be, rank, kLength);
    if (!t.ok()) return Check(false, t.status().message());
    const auto start = std::chrono::steady_clock::now();
    Status s = comm.AllReduceSum(*t);
    if (s.ok()) s = comm.Wait(3000);
    const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (Check(!s.ok() && s.IsIOError(), "the all-reduce without its peer returned " + s.ToString()) != 0) return 1;
    if (Check(s.message().find("group of ranks 0,1") != std::string::npos, s.message()) != 0) return 1;
    if (Check(waited < 20, "waited " + std::to_string(waited) + " s") != 0) return 1;
    Status again = comm.AllReduceSum(*t);
    return Check(again.message() == s.message(), "a later call returned " + again.ToString());
  }));
}

// Pipeline links: both ranks send first (on links of their own, so neither
// waits for the other), the sender rewrites its tensor at once (the link sent
// a copy) and frees memory, and each link delivers in order.
TEST(NcclTest, PipelineLinksDeliverInOrderBothWays) {
  using parallel::DeviceLink;
  using parallel::TagKind;
  const DeviceLink forward{0, 1, TagKind::kActivation}, back{1, 0, TagKind::kActivation},
      grads{0, 1, TagKind::kGradient};
  EXPECT_RANKS_PASS(RunRanks(2, {forward, back, grads}, [&](CudaBackend& be, parallel::DeviceComms& comms, int rank) {
    DeviceComm* out = comms.FindLink(rank == 0 ? forward : back);
    DeviceComm* in = comms.FindLink(rank == 0 ? back : forward);
    DeviceComm* g = comms.FindLink(grads);
    if (!out || !in || !g || comms.links() != 3) return Check(false, "missing links");
    auto t = Filled(be, rank, kLength);
    if (!t.ok()) return Check(false, t.status().message());
    const int sends = rank == 0 ? 3 : 2, receives = rank == 0 ? 2 : 3;
    for (int i = 0; i < sends; ++i) {
      FromHostFloats(be, *t, std::vector<float>(kLength, static_cast<float>(100 * rank + i)));
      if (Status s = out->Send(*t, 1); !s.ok()) return Check(false, s.message());
    }
    FromHostFloats(be, *t, std::vector<float>(kLength, -1.0f));  // the sends took copies
    // A tensor freed while both ranks' sends wait for their receivers: a
    // device-wide free (cudaFree) would wait for those sends, on each rank,
    // and neither would reach its receives.
    if (auto scratch = be.Alloc({1 << 20}, DType::kF32, "scratch"); !scratch.ok())
      return Check(false, scratch.status().message());
    if (rank == 0) {
      if (Status s = g->Send(*t, 1); !s.ok()) return Check(false, s.message());
    }
    for (int i = 0; i < receives; ++i) {
      Status s = in->Receive(*t, 0);
      if (s.ok()) s = in->Wait(30000);
      if (!s.ok()) return Check(false, s.message());
      const float want = static_cast<float>(100 * (1 - rank) + i);
      const std::vector<float> got = ToHostFloats(be, *t);
      if (got.front() != want || got.back() != want)
        return Check(false, "transfer " + std::to_string(i) + " carried " + std::to_string(got.front()));
    }
    if (rank == 1) {
      Status s = g->Receive(*t, 0);
      if (s.ok()) s = g->Wait(30000);
      if (!s.ok() || ToHostFloats(be, *t).front() != -1.0f) return Check(false, "gradient link: " + s.ToString());
    }
    Status bad = out->Send(*t, 0);  // to itself
    if (Check(bad.IsInvalidArgument(), "a send to oneself returned " + bad.ToString()) != 0) return 1;
    return Check(comms.WaitAll(30000).ok(), "sends still queued at the end");
  }));
}

// A receive whose sender never sends is an error naming the link, within
// the deadline.
TEST(NcclTest, AReceiveWithoutItsSendIsAnErrorNotAHang) {
  const parallel::DeviceLink link{0, 1, parallel::TagKind::kActivation};
  EXPECT_RANKS_PASS(RunRanks(2, {link}, [&](CudaBackend& be, parallel::DeviceComms& comms, int rank) {
    if (rank == 0) return 0;
    auto t = Filled(be, rank, 1000);
    if (!t.ok()) return Check(false, t.status().message());
    DeviceComm* in = comms.FindLink(link);
    Status s = in->Receive(*t, 0);
    if (s.ok()) s = in->Wait(2000);
    if (Check(s.IsIOError(), "the receive returned " + s.ToString()) != 0) return 1;
    return Check(s.message().find("activation link from rank 0 to rank 1") != std::string::npos, s.message());
  }));
}

// An F&B pair's two threads: one sends on its lane's link while the other
// waits for a receive whose send never comes; when the first lane's chunk
// fails it aborts the other's link, and that wait ends at once with the
// reason instead of at its deadline.
TEST(NcclTest, AnAbortFromThePairsOtherThreadEndsAWait) {
  const parallel::DeviceLink act{0, 1, parallel::TagKind::kActivation}, grad{1, 0, parallel::TagKind::kGradient};
  EXPECT_RANKS_PASS(RunRanks(2, {act, grad}, [&](CudaBackend& be, parallel::DeviceComms& comms, int rank) {
    auto t = Filled(be, rank, 1000);
    if (!t.ok()) return Check(false, t.status().message());
    if (rank == 0) {
      DeviceComm* in = comms.FindLink(grad);
      Status s = in->Receive(*t, 0);
      if (s.ok()) s = in->Wait(20000);
      return Check(s.ok(), "the gradient sent beside the failing wait: " + s.ToString());
    }
    Status sent;
    std::thread other_lane([&] {
      be.SetCallerLane(1);
      DeviceComm* out = comms.FindLink(grad);
      sent = out->Send(*t, 1);
      if (sent.ok()) sent = out->Wait(20000);
      std::this_thread::sleep_for(std::chrono::milliseconds(300));
      comms.FindLink(act)->Abort("the other lane failed");
    });
    auto into = Filled(be, rank, 1000);
    if (!into.ok()) return Check(false, into.status().message());
    DeviceComm* in = comms.FindLink(act);
    Status s = in->Receive(*into, 0);
    if (s.ok()) s = in->Wait(60000);
    other_lane.join();
    if (Check(sent.ok(), "the other lane's send: " + sent.ToString()) != 0) return 1;
    if (Check(s.IsIOError(), "the receive returned " + s.ToString()) != 0) return 1;
    return Check(s.message().find("aborted: the other lane failed") != std::string::npos, s.message());
  }));
}

// An id of the wrong size (a broken or hostile peer sent it over the group)
// is refused before NCCL sees it. Last in the file: it initialises CUDA in
// this process, which the forking tests above must not inherit.
TEST(NcclTest, AnIdOfTheWrongSizeIsRefused) {
  auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
  if (!be.ok()) GTEST_SKIP() << "no CUDA device";
  DeviceCommSpec spec;
  spec.id = {1, 2, 3, 4, 5};
  spec.size = 2;
  spec.rank = 0;
  spec.name = "group of ranks 0,1";
  auto comm = CreateDeviceComm(**be, spec, 1000);
  ASSERT_FALSE(comm.ok());
  EXPECT_NE(comm.status().message().find("an id of 5 bytes is not an NCCL id"), std::string::npos)
      << comm.status().message();
}

#endif  // TROUPE_HAVE_CUDA

}  // namespace
}  // namespace troupe
