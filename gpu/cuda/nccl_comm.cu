// DeviceComm over NCCL (gpu/device_comm.h), and the module's C entry points
// for it. Communicators are created non-blocking, so joining and every wait
// poll with a deadline instead of hanging on a member that never comes.
#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/device_comm.h"

namespace troupe {
namespace {

using Clock = std::chrono::steady_clock;

// NCCL calls on independent communicators of one device must not be made
// from several threads at once (NCCL's thread-safety notes); an F&B pair's
// two threads issue on theirs (links, expert rows) side by side. Issuing is
// quick (the communicators are non-blocking); waiting happens outside.
std::mutex g_issue_mu;

std::string NcclVersion() {
  int v = 0;
  ncclGetVersion(&v);
  char buf[32];
  std::snprintf(buf, sizeof buf, "nccl %d.%d.%d", v / 10000, (v / 100) % 100, v % 100);
  return buf;
}

class NcclComm final : public DeviceComm {
 public:
  NcclComm(CudaBackend& be, ncclComm_t comm, cudaStream_t stream, cudaEvent_t ready, cudaEvent_t done,
           DeviceCommSpec spec, int timeout_ms)
      : be_(be),
        comm_(comm),
        stream_(stream),
        ready_(ready),
        done_(done),
        spec_(std::move(spec)),
        timeout_ms_(timeout_ms) {}

  ~NcclComm() override {
    if (!aborted_) {
      // Our queued calls, then finalize (it flushes what peers may still need
      // from us). A peer that is gone must not hold up our exit: a deadline
      // for both, then the abort, which ends kernels that wait on it.
      const auto deadline = Clock::now() + std::chrono::seconds(5);
      while (cudaStreamQuery(stream_) == cudaErrorNotReady && Clock::now() < deadline)
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
      ncclResult_t state = cudaStreamQuery(stream_) == cudaSuccess ? ncclCommFinalize(comm_) : ncclInternalError;
      while (state == ncclInProgress && Clock::now() < deadline) {
        std::this_thread::sleep_for(std::chrono::milliseconds(1));
        ncclCommGetAsyncError(comm_, &state);
      }
      if (state == ncclSuccess)
        ncclCommDestroy(comm_);
      else
        ncclCommAbort(comm_);
    }
    for (Staged& s : staging_) cudaEventDestroy(s.sent);
    cudaEventDestroy(ready_);
    cudaEventDestroy(done_);
    cudaStreamDestroy(stream_);
  }

  int rank() const override { return spec_.rank; }
  int size() const override { return spec_.size; }

  Status AllReduceSum(Tensor& data) override {
    return Issue("all-reduce", [&] {
      return ncclAllReduce(data.raw(), data.raw(), static_cast<size_t>(data.numel()), ncclFloat32, ncclSum, comm_,
                           stream_);
    });
  }

  // One ncclReduce per chunk to its owner, grouped so NCCL runs them as one
  // operation: uneven chunks, which ncclReduceScatter cannot express.
  Status ReduceScatterSum(Tensor& data, const std::vector<int64_t>& bounds) override {
    TROUPE_RETURN_IF_ERROR(CheckBounds(data, bounds, "reduce-scatter"));
    return Issue("reduce-scatter", [&] {
      return PerChunk(data, bounds, [&](float* chunk, size_t n, int owner) {
        return ncclReduce(chunk, chunk, n, ncclFloat32, ncclSum, owner, comm_, stream_);
      });
    });
  }

  Status AllGather(Tensor& data, const std::vector<int64_t>& bounds) override {
    TROUPE_RETURN_IF_ERROR(CheckBounds(data, bounds, "all-gather"));
    return Issue("all-gather", [&] {
      return PerChunk(data, bounds, [&](float* chunk, size_t n, int owner) {
        return ncclBroadcast(chunk, chunk, n, ncclFloat32, owner, comm_, stream_);
      });
    });
  }

  Status ExchangeRows(const Tensor& src, const std::vector<RowBlock>& sends, Tensor& dst,
                      const std::vector<RowBlock>& recvs) override {
    TROUPE_RETURN_IF_ERROR(CheckBlocks(src, sends, "send"));
    TROUPE_RETURN_IF_ERROR(CheckBlocks(dst, recvs, "receive"));
    if (src.cols() != dst.cols())
      return Status::InvalidArgument(spec_.name + " row exchange: " + std::to_string(src.cols()) + " columns sent, " +
                                     std::to_string(dst.cols()) + " received");
    const size_t cols = static_cast<size_t>(src.cols());
    const float* from = src.data<float>();
    float* to = dst.data<float>();
    return Issue("row exchange", [&] {
      ncclResult_t r = ncclGroupStart();
      for (size_t i = 0; r == ncclSuccess && i < sends.size(); ++i)
        if (sends[i].rows > 0)
          r = ncclSend(from + sends[i].row * cols, sends[i].rows * cols, ncclFloat32, sends[i].peer, comm_, stream_);
      for (size_t i = 0; r == ncclSuccess && i < recvs.size(); ++i)
        if (recvs[i].rows > 0)
          r = ncclRecv(to + recvs[i].row * cols, recvs[i].rows * cols, ncclFloat32, recvs[i].peer, comm_, stream_);
      const ncclResult_t end = ncclGroupEnd();
      return r != ncclSuccess ? r : end;
    });
  }

  Status Send(const Tensor& data, int peer) override {
    TROUPE_RETURN_IF_ERROR(CheckPeer(peer, "send"));
    TROUPE_ASSIGN_OR_RETURN(Staged * staged, FreeStaging(data));
    be_.Copy(staged->copy, data);
    const void* from = staged->copy.raw();
    TROUPE_RETURN_IF_ERROR(Issue(
        "send", [&] { return ncclSend(from, data.bytes(), ncclUint8, peer, comm_, stream_); }, Fence::kNone));
    const cudaError_t e = cudaEventRecord(staged->sent, stream_);
    if (e != cudaSuccess) return Fail(std::string("send: CUDA: ") + cudaGetErrorString(e));
    return Status::Ok();
  }

  Status Receive(Tensor& into, int peer) override {
    TROUPE_RETURN_IF_ERROR(CheckPeer(peer, "receive"));
    return Issue("receive", [&] { return ncclRecv(into.raw(), into.bytes(), ncclUint8, peer, comm_, stream_); });
  }

  Status Wait(int timeout_ms) override {
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms < 0 ? 1LL << 40 : timeout_ms);
    for (;;) {
      if (Status s = failure(); !s.ok()) return s;
      const cudaError_t q = cudaEventQuery(done_);
      if (q == cudaSuccess) return Status::Ok();
      if (q != cudaErrorNotReady) return Fail(std::string("CUDA: ") + cudaGetErrorString(q));
      if (std::string error = AsyncError(); !error.empty()) return Fail(error);
      if (Clock::now() >= deadline)
        return Fail("no progress for " + std::to_string(timeout_ms) + " ms (a member stopped or is stuck)");
      std::this_thread::sleep_for(std::chrono::microseconds(200));
    }
  }

  // Thread-safe: the other thread of an F&B pair aborts when its chunk fails.
  void Abort(const std::string& why) override { static_cast<void>(Fail("aborted: " + why)); }

  std::string Describe() const override {
    return NcclVersion() + ", rank " + std::to_string(spec_.rank) + " of " + std::to_string(spec_.size) + " (" +
           spec_.name + ")";
  }

 private:
  // Whether the backend's later kernels wait for a call (a send's source
  // is a staging copy nobody rewrites, so nothing needs to).
  enum class Fence { kBackend, kNone };

  // A send's copy of its tensor, reused once `sent` has passed.
  struct Staged {
    Tensor copy;
    cudaEvent_t sent = nullptr;
  };

  Expected<Staged*> FreeStaging(const Tensor& like) {
    for (Staged& s : staging_)
      if (s.copy.dtype() == like.dtype() && s.copy.numel() == like.numel() && cudaEventQuery(s.sent) == cudaSuccess)
        return &s;
    TROUPE_ASSIGN_OR_RETURN(Tensor copy, be_.Alloc({like.numel()}, like.dtype(), spec_.name + " send staging"));
    cudaEvent_t sent = nullptr;
    const cudaError_t e = cudaEventCreateWithFlags(&sent, cudaEventDisableTiming);
    if (e != cudaSuccess) return Fail(std::string("send: CUDA: ") + cudaGetErrorString(e));
    staging_.push_back(Staged{std::move(copy), sent});
    return &staging_.back();
  }

  Status CheckPeer(int peer, const char* what) const {
    if (peer < 0 || peer >= spec_.size || peer == spec_.rank)
      return Status::InvalidArgument(spec_.name + " " + what + ": peer " + std::to_string(peer) +
                                     " is not another of its " + std::to_string(spec_.size) + " members");
    return Status::Ok();
  }

  template <typename Call>
  Status Issue(const char* what, Call&& call, Fence fence = Fence::kBackend) {
    if (Status s = failure(); !s.ok()) return s;
    // The backend's kernels so far, then this, then the backend's next ones.
    cudaError_t e = cudaEventRecord(ready_, be_.stream());
    if (e == cudaSuccess) e = cudaStreamWaitEvent(stream_, ready_, 0);
    if (e != cudaSuccess) return Fail(std::string(what) + ": CUDA: " + cudaGetErrorString(e));
    ncclResult_t r = ncclSuccess;
    std::string error;
    {
      // comm_ is only read and aborted under mu_ (Abort may come from the other thread).
      std::lock_guard<std::mutex> issuing(g_issue_mu);
      std::lock_guard<std::mutex> lock(mu_);
      if (!failed_.ok()) return failed_;
      r = call();
      if (r != ncclSuccess && r != ncclInProgress) error = Explain(r);
    }
    // A non-blocking communicator may still be connecting peers (NCCL connects
    // lazily, at a peer's first operation): let it, within the join deadline.
    const auto deadline = Clock::now() + std::chrono::milliseconds(timeout_ms_);
    while (r == ncclInProgress && Clock::now() < deadline) {
      std::this_thread::sleep_for(std::chrono::microseconds(100));
      std::lock_guard<std::mutex> lock(mu_);
      if (!failed_.ok()) return failed_;
      ncclCommGetAsyncError(comm_, &r);
      if (r != ncclSuccess && r != ncclInProgress) error = Explain(r);
    }
    if (r == ncclInProgress)
      return Fail(std::string(what) + ": still connecting after " + std::to_string(timeout_ms_) +
                  " ms (a member stopped or is stuck)");
    if (r != ncclSuccess) return Fail(std::string(what) + ": " + error);
    e = cudaEventRecord(done_, stream_);
    if (e == cudaSuccess && fence == Fence::kBackend) e = cudaStreamWaitEvent(be_.stream(), done_, 0);
    if (e != cudaSuccess) return Fail(std::string(what) + ": CUDA: " + cudaGetErrorString(e));
    return Status::Ok();
  }

  // op(chunk, elements, owner) for every non-empty chunk, as one NCCL group.
  template <typename Op>
  ncclResult_t PerChunk(Tensor& data, const std::vector<int64_t>& bounds, Op&& op) {
    ncclResult_t r = ncclGroupStart();
    for (int i = 0; r == ncclSuccess && i < spec_.size; ++i) {
      const size_t n = static_cast<size_t>(bounds[i + 1] - bounds[i]);
      if (n > 0) r = op(data.data<float>() + bounds[i], n, i);
    }
    const ncclResult_t end = ncclGroupEnd();
    return r != ncclSuccess ? r : end;
  }

  Status CheckBounds(const Tensor& data, const std::vector<int64_t>& bounds, const char* what) const {
    bool ok =
        bounds.size() == static_cast<size_t>(spec_.size) + 1 && bounds.front() == 0 && bounds.back() == data.numel();
    for (size_t i = 1; ok && i < bounds.size(); ++i) ok = bounds[i - 1] <= bounds[i];
    if (!ok)
      return Status::InvalidArgument(spec_.name + " " + what + ": chunk bounds must be " +
                                     std::to_string(spec_.size + 1) + " ascending offsets from 0 to " +
                                     std::to_string(data.numel()));
    return Status::Ok();
  }

  Status CheckBlocks(const Tensor& t, const std::vector<RowBlock>& blocks, const char* what) const {
    if (t.dtype() != DType::kF32)
      return Status::InvalidArgument(spec_.name + " row exchange: " + what + " tensor is " + DTypeName(t.dtype()));
    for (const RowBlock& b : blocks) {
      if (b.peer < 0 || b.peer >= spec_.size || b.row < 0 || b.rows < 0 || b.row + b.rows > t.rows())
        return Status::InvalidArgument(spec_.name + " row exchange: " + what + " block (peer " +
                                       std::to_string(b.peer) + ", rows " + std::to_string(b.row) + "+" +
                                       std::to_string(b.rows) + ") is outside " + std::to_string(spec_.size) +
                                       " members or " + std::to_string(t.rows()) + " rows");
    }
    return Status::Ok();
  }

  // The communicator's asynchronous error, explained; empty when none.
  std::string AsyncError() {
    std::lock_guard<std::mutex> lock(mu_);
    if (comm_ == nullptr) return {};
    ncclResult_t async = ncclSuccess;
    ncclCommGetAsyncError(comm_, &async);
    return async == ncclSuccess || async == ncclInProgress ? std::string() : Explain(async);
  }

  // Under mu_, with comm_ live.
  std::string Explain(ncclResult_t r) const {
    std::string s = ncclGetErrorString(r);
    const char* last = ncclGetLastError(comm_);
    if (last != nullptr && *last != '\0') s += std::string(" (") + last + ")";
    return s;
  }

  Status failure() const {
    std::lock_guard<std::mutex> lock(mu_);
    return failed_;
  }

  // Records the first failure, aborts the communicator (its kernels return)
  // and returns that first failure.
  Status Fail(const std::string& why) {
    std::lock_guard<std::mutex> issuing(g_issue_mu);
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_.ok()) {
      failed_ = Status::IOError("NCCL " + spec_.name + " (rank " + std::to_string(spec_.rank) + " of " +
                                std::to_string(spec_.size) + "): " + why);
      ncclCommAbort(comm_);
      comm_ = nullptr;
      aborted_ = true;
    }
    return failed_;
  }

  CudaBackend& be_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  cudaEvent_t ready_, done_;
  DeviceCommSpec spec_;
  int timeout_ms_;  // how long a call may wait for peers to connect
  mutable std::mutex mu_;
  Status failed_;
  bool aborted_ = false;
  std::deque<Staged> staging_;  // a deque: Send holds a pointer while growing it
};

}  // namespace
}  // namespace troupe

namespace {

void CopyMessage(const std::string& msg, char* out, size_t len) {
  if (out != nullptr && len > 0) std::snprintf(out, len, "%s", msg.c_str());
}

}  // namespace

// Writes an ncclUniqueId into out[0..len); returns its size, or -1 with `error` set.
extern "C" int troupe_nccl_unique_id(uint8_t* out, size_t len, char* error, size_t error_len) {
  ncclUniqueId id;
  if (len < sizeof id) {
    CopyMessage("buffer of " + std::to_string(len) + " bytes; an NCCL id needs " + std::to_string(sizeof id), error,
                error_len);
    return -1;
  }
  const ncclResult_t r = ncclGetUniqueId(&id);
  if (r != ncclSuccess) {
    CopyMessage(std::string("ncclGetUniqueId: ") + ncclGetErrorString(r), error, error_len);
    return -1;
  }
  std::memcpy(out, &id, sizeof id);
  return static_cast<int>(sizeof id);
}

// Joins a communicator; returns a heap-allocated DeviceComm (the caller owns
// it) or null with `error` set.
extern "C" troupe::DeviceComm* troupe_nccl_create_comm(troupe::Backend* backend, const uint8_t* id, size_t id_len,
                                                       int size, int rank, const char* name, int timeout_ms,
                                                       char* error, size_t error_len) {
  using namespace troupe;
  const std::string label = name;
  auto fail = [&](const std::string& why) -> DeviceComm* {
    CopyMessage("NCCL " + label + " (rank " + std::to_string(rank) + " of " + std::to_string(size) + "): " + why, error,
                error_len);
    return nullptr;
  };
  auto* be = dynamic_cast<CudaBackend*>(backend);
  if (be == nullptr) return fail("needs the CUDA backend, not " + backend->Describe());
  if (id_len != sizeof(ncclUniqueId)) return fail("an id of " + std::to_string(id_len) + " bytes is not an NCCL id");
  if (size < 1 || rank < 0 || rank >= size) return fail("rank out of range");
  ncclUniqueId uid;
  std::memcpy(&uid, id, sizeof uid);
  cudaSetDevice(be->device_index());
  cudaStream_t stream = nullptr;
  cudaEvent_t ready = nullptr, done = nullptr;
  if (cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) != cudaSuccess ||
      cudaEventCreateWithFlags(&ready, cudaEventDisableTiming) != cudaSuccess ||
      cudaEventCreateWithFlags(&done, cudaEventDisableTiming) != cudaSuccess) {
    const std::string why = cudaGetErrorString(cudaGetLastError());
    if (stream) cudaStreamDestroy(stream);
    if (ready) cudaEventDestroy(ready);
    return fail("CUDA: " + why);
  }
  auto release = [&] {
    cudaEventDestroy(ready);
    cudaEventDestroy(done);
    cudaStreamDestroy(stream);
  };
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  ncclComm_t comm = nullptr;
  ncclResult_t r = ncclCommInitRankConfig(&comm, size, uid, rank, &config);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  while (r == ncclInProgress) {
    if (std::chrono::steady_clock::now() >= deadline) {
      ncclCommAbort(comm);
      release();
      return fail("not every member joined within " + std::to_string(timeout_ms) + " ms");
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
    ncclCommGetAsyncError(comm, &r);
  }
  if (r != ncclSuccess) {
    std::string why = ncclGetErrorString(r);
    const char* last = comm ? ncclGetLastError(comm) : nullptr;
    if (last != nullptr && *last != '\0') why += std::string(" (") + last + ")";
    if (comm) ncclCommAbort(comm);
    release();
    return fail("joining failed: " + why);
  }
  DeviceCommSpec spec;
  spec.size = size;
  spec.rank = rank;
  spec.name = label;
  return new NcclComm(*be, comm, stream, ready, done, std::move(spec), timeout_ms);
}
