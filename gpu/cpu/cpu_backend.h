// CpuBackend: the reference implementation of Backend (F32 and F64).
//
// Parallel with OpenMP over independent outputs only, so every result is
// bitwise the same for any thread count. The method bodies are spread over
// gpu/cpu/*.cpp by concern (dense, norm_act, attention, moe, optim).
#pragma once

#include <atomic>
#include <chrono>
#include <vector>

#include "gpu/backend.h"

namespace troupe {

class CpuBackend final : public Backend {
 public:
  // threads <= 0: use every core OpenMP reports.
  explicit CpuBackend(int threads = 0);
  DeviceKind device() const override { return DeviceKind::kCpu; }
  std::string Describe() const override;
  int threads() const { return threads_; }
  // Kernels hold no state between calls, so any number of threads may call at
  // once; each runs its own OpenMP team (its size is a per-thread setting).
  bool SetCallerShare(int ways) override;

  Expected<Tensor> Alloc(std::vector<int64_t> shape, DType dtype, std::string name) override;
  size_t bytes_in_use() const override { return in_use_.load(); }
  size_t peak_bytes() const override { return peak_.load(); }
  void Zero(Tensor& t) override;
  void CopyFromHost(Tensor& dst, const void* src) override;
  void CopyToHost(void* dst, const Tensor& src) override;
  void Copy(Tensor& dst, const Tensor& src) override;
  int RecordTimer() override;
  double TimerMs(int start, int end) override;
  void ResetTimers() override;

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
  void MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                      double alpha) override;
  void MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                              double alpha, double dloss) override;
  void MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) override;

  double Sum(const Tensor& x) override;
  double SumSquares(const Tensor& x) override;
  void AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) override;

  // Called by CpuBuffer's destructor.
  void OnFree(size_t bytes) { in_use_ -= bytes; }

 private:
  int threads_;
  std::atomic<size_t> in_use_{0};
  std::atomic<size_t> peak_{0};
  std::vector<std::chrono::steady_clock::time_point> timers_;
};

}  // namespace troupe
