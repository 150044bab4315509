// ProfilingBackend: wraps a Backend and times every operation on the
// backend's own clock (CUDA events on the GPU), for the per-kernel breakdown
// of `troupe train --profile` and the benchmarks. One backend op is one
// kernel or one cuBLAS call, bar a few small helpers (the table says which
// op, not which kernel inside it).
#pragma once

#include <map>
#include <string>
#include <vector>

#include "gpu/backend.h"

namespace troupe {

class ProfilingBackend final : public Backend {
 public:
  explicit ProfilingBackend(Backend& inner) : inner_(inner) {}

  struct OpStats {
    int64_t calls = 0;
    double ms = 0.0;
  };
  // Resolves the queued timers (waits for the device) into per-op totals.
  std::map<std::string, OpStats> Collect();
  // Forgets everything measured so far.
  void Clear() {
    Collect();
    totals_.clear();
  }
  // "op  calls  ms  share" lines, largest first.
  std::string Report();

  DeviceKind device() const override { return inner_.device(); }
  std::string Describe() const override { return inner_.Describe() + " [profiled]"; }
  Expected<Tensor> Alloc(std::vector<int64_t> shape, DType dtype, std::string name) override {
    return inner_.Alloc(std::move(shape), dtype, std::move(name));
  }
  size_t bytes_in_use() const override { return inner_.bytes_in_use(); }
  size_t peak_bytes() const override { return inner_.peak_bytes(); }
  Status Synchronize() override { return inner_.Synchronize(); }
  std::shared_ptr<uint8_t> AllocStagingHost(size_t bytes) override { return inner_.AllocStagingHost(bytes); }
  Expected<std::shared_ptr<HostCopies>> CopyToHostAsync(
      const std::vector<std::pair<uint8_t*, const Tensor*>>& copies) override {
    return inner_.CopyToHostAsync(copies);
  }
  void FenceHostCopies() override { inner_.FenceHostCopies(); }
  int RecordTimer() override { return inner_.RecordTimer(); }
  Status StartKernelTimeline() override { return inner_.StartKernelTimeline(); }
  Expected<std::vector<KernelSpan>> TakeKernelSpans() override { return inner_.TakeKernelSpans(); }
  double TimerMs(int start, int end) override { return inner_.TimerMs(start, end); }
  void ResetTimers() override { inner_.ResetTimers(); }

  void Zero(Tensor& t) override;
  void CopyFromHost(Tensor& dst, const void* src) override;
  void CopyToHost(void* dst, const Tensor& src) override;
  void Copy(Tensor& dst, const Tensor& src) override;
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

 private:
  struct Pending {
    const char* op;
    int start, end;
  };
  Backend& inner_;
  std::vector<Pending> pending_;
  std::map<std::string, OpStats> totals_;
};

}  // namespace troupe
