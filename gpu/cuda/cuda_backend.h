// CudaBackend: Backend on one NVIDIA GPU (sm_90: H100/H200).
//
// Every operation is queued on the calling thread's lane: a CUDA stream with
// its own cuBLAS handle and workspace. Lane 0 is every thread's unless it
// asks for lane 1 (SetCallerLane): DualPipe's F&B pairs issue their two
// chunks from two threads, one per lane, so the GPU runs one chunk's kernels
// while the other's all-to-all or transfer is in flight. OrderLanes() forks
// and joins them. Host-visible results (CopyToHost, Sum, SumSquares,
// Synchronize) wait for the caller's lane. Tensors are F32 in
// memory. Matmul precision:
//   kFp32: true fp32 GEMMs (no TF32), for parity tests against the CPU;
//   kBf16: GEMM inputs rounded to bf16 on the tensor cores, fp32 accumulation
//          and fp32 storage (master weights and activations stay fp32).
// Launch and asynchronous errors are sticky: the first one is returned by
// Synchronize() and later operations become no-ops, so a fault never passes
// silently into a "successful" step.
#pragma once

#include <array>
#include <atomic>
#include <memory>
#include <string>
#include <vector>

#include "gpu/backend.h"

// Opaque CUDA handles, so this header needs no CUDA include.
struct CUstream_st;
struct cublasContext;
struct cublasLtContext;

namespace troupe {

enum class MatmulPrecision { kFp32, kBf16 };

class CudaBackend final : public Backend {
 public:
  // Fails when no device is usable (message says why).
  static Expected<std::unique_ptr<CudaBackend>> Create(int device, MatmulPrecision precision);
  ~CudaBackend() override;

  DeviceKind device() const override { return DeviceKind::kCuda; }
  std::string Describe() const override;
  MatmulPrecision precision() const { return precision_; }
  int device_index() const { return device_; }
  // The calling thread's lane's stream.
  CUstream_st* stream() const { return lane().stream; }

  Expected<Tensor> Alloc(std::vector<int64_t> shape, DType dtype, std::string name) override;
  size_t bytes_in_use() const override { return in_use_.load(); }
  size_t peak_bytes() const override { return peak_.load(); }
  void Zero(Tensor& t) override;
  void CopyFromHost(Tensor& dst, const void* src) override;
  void CopyToHost(void* dst, const Tensor& src) override;
  void Copy(Tensor& dst, const Tensor& src) override;
  // Page-locked (cudaHostAlloc) memory; the copies run on copy_stream_,
  // which first waits for everything queued on stream_ so far.
  std::shared_ptr<uint8_t> AllocStagingHost(size_t bytes) override;
  Expected<std::shared_ptr<HostCopies>> CopyToHostAsync(
      const std::vector<std::pair<uint8_t*, const Tensor*>>& copies) override;
  void FenceHostCopies() override;
  Status Synchronize() override;
  int RecordTimer() override;
  double TimerMs(int start, int end) override;
  void ResetTimers() override;
  Status StartKernelTimeline() override;
  Expected<std::vector<KernelSpan>> TakeKernelSpans() override;
  // Lanes 0 and 1; false for any other.
  bool SetCallerLane(int lane) override;
  void OrderLanes() override;
  int lanes() const override { return kLanes; }

  void Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
              double beta) override;
  void GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) override;
  void GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                             const Tensor& offsets) override;

  void Add(Tensor& out, const Tensor& a, const Tensor& b) override;
  void Axpy(Tensor& y, double alpha, const Tensor& x) override;
  void Scale(Tensor& x, double alpha) override;
  void ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) override;
  void ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) override;

  void RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) override;
  void RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                       const Tensor& rstd) override;
  void SwiGluForward(Tensor& out, const Tensor& gate_up) override;
  void SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) override;
  void SigmoidForward(Tensor& out, const Tensor& in) override;
  void SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) override;

  void EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) override;
  void EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) override;
  void CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) override;
  void CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) override;

  void RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) override;
  void RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) override;
  void MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope,
                           int seq_len, int head_dim, double scale) override;
  void MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out,
                            const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len,
                            int head_dim, double scale) override;

  void MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias,
                const RoutingSpec& spec) override;
  void MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx,
                        const RoutingSpec& spec) override;
  void MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx,
                  int n_experts) override;
  void MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) override;
  void MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) override;
  void MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted,
                          const Tensor& gate, const Tensor& slot) override;
  void MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha) override;
  void MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha,
                              double dloss) override;
  void MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) override;

  double Sum(const Tensor& x) override;
  double SumSquares(const Tensor& x) override;
  void AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) override;

  // ---- for the kernels in gpu/cuda/*.cu --------------------------------
  // Records a failure (first one wins); `what` names the operation.
  void Fail(const std::string& what, const std::string& why);
  bool failed() const { return failed_.load(); }
  // Scratch device memory of at least `bytes`, valid until the next call on
  // the caller's lane (grown on demand, never shrunk). Out of memory records a
  // failure of operation `op`, naming `purpose`, and returns nullptr.
  void* Workspace(size_t bytes, const char* op = "workspace", const char* purpose = "scratch");
  cublasContext* cublas() const { return lane().cublas; }
  cublasLtContext* cublaslt() const { return cublaslt_; }
  // Returns a tensor's block to the stream-ordered pool (CudaBuffer).
  void Release(void* p, size_t bytes);

 private:
  CudaBackend(int device, MatmulPrecision precision) : device_(device), precision_(precision) {}

  // What one thread's kernels need of their own to run beside another's.
  struct Lane {
    CUstream_st* stream = nullptr;
    cublasContext* cublas = nullptr;  // bound to `stream`; a handle takes one thread at a time
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
    void* passed = nullptr;  // cudaEvent_t for OrderLanes
  };
  static constexpr int kLanes = 2;
  Lane& lane() const;

  int device_;
  MatmulPrecision precision_;
  mutable std::array<Lane, kLanes> lanes_;
  CUstream_st* copy_stream_ = nullptr;    // background device->host copies, created on first use
  std::shared_ptr<HostCopies> unfenced_;  // the latest copies lane 0 has not been ordered after
  cublasLtContext* cublaslt_ = nullptr;   // stateless: streams are passed per call
  std::atomic<size_t> in_use_{0};
  std::atomic<size_t> peak_{0};
  std::atomic<bool> failed_{false};
  std::string first_error_;
  std::vector<void*> timer_events_;  // cudaEvent_t, reused across ResetTimers()
  int timers_used_ = 0;
  std::string name_;
};

}  // namespace troupe
