// Backend: every numeric operation the model needs, behind one interface.
//
// The model (gpu/model/) is written once against this class; the CPU backend
// (gpu/cpu/) is the reference, the CUDA backend (gpu/cuda/) implements the same
// methods. Conventions, for every method:
//  - Matrices are row-major; a Tensor of shape [a, b, c] used as a matrix has
//    rows = a*b and cols = c. N is the number of tokens (B sequences of T).
//  - Floating operands of one call share one dtype: F32 or F64 (F64 is for
//    gradient checks on the CPU). Index tensors are I32.
//  - Backward methods ADD into every gradient output ("+="), llm.c style, so a
//    gradient fed by two paths needs no temporary. The few that overwrite say so.
//  - Results do not depend on the number of threads: no reduction is split
//    across threads in a way that depends on the thread count.
//  - Preconditions (shapes, dtypes) are the caller's job; backends assert them.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <new>
#include <string>
#include <utility>
#include <vector>

#include "common/status.h"
#include "gpu/kernel_overlap.h"
#include "gpu/tensor.h"

namespace troupe {

// How the router picks experts (BRIEF §1, device/node-limited routing).
struct RoutingSpec {
  int top_k = 2;          // K: experts per token
  int n_group = 1;        // G: groups the routed experts are split into, evenly
  int topk_group = 1;     // M: groups a token may use
  double scale = 1.0;     // routed_scaling_factor
  bool normalize = true;  // g_i = scale * s_i / sum_{TopK} s_j (else scale * s_i)
};

struct AdamWParams {
  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double weight_decay = 0.0;  // decoupled: p -= lr * wd * p
  int64_t step = 1;           // 1-based, for bias correction
  double grad_scale = 1.0;    // gradients are multiplied by this first (clipping)
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual DeviceKind device() const = 0;
  virtual std::string Describe() const = 0;  // "cpu (2 threads)"

  // ---- memory ------------------------------------------------------------
  // A zero-filled tensor. Fails with OutOfMemory naming `name` and the size.
  virtual Expected<Tensor> Alloc(std::vector<int64_t> shape, DType dtype, std::string name) = 0;
  virtual size_t bytes_in_use() const = 0;
  virtual size_t peak_bytes() const = 0;
  virtual void Zero(Tensor& t) = 0;
  virtual void CopyFromHost(Tensor& dst, const void* src) = 0;  // dst.bytes() bytes
  virtual void CopyToHost(void* dst, const Tensor& src) = 0;    // src.bytes() bytes
  virtual void Copy(Tensor& dst, const Tensor& src) = 0;        // same dtype, same numel

  // ---- device -> host copies beside compute (checkpoint capture) --------
  // Host memory to copy into with CopyToHostAsync: page-locked on CUDA (the
  // copy engine fills it at full bus speed, asynchronously), plain memory
  // elsewhere. Contents unspecified; null when it cannot be had.
  virtual std::shared_ptr<uint8_t> AllocStagingHost(size_t bytes) {
    // new[] without (): no zero fill, so no page is touched before the copy.
    return std::shared_ptr<uint8_t>(new (std::nothrow) uint8_t[bytes], std::default_delete<uint8_t[]>());
  }
  // A queued batch of copies. Wait() blocks until every byte is in host
  // memory and reports a failure of any of them. Thread-safe.
  class HostCopies {
   public:
    virtual ~HostCopies() = default;
    virtual Status Wait() = 0;
  };
  // Copies each tensor (as of now: after everything queued so far) into its
  // destination (AllocStagingHost memory) and returns without waiting: on
  // CUDA the copies run on a side stream while later kernels run. Kernels
  // queued afterwards that overwrite a copied tensor must be preceded by
  // FenceHostCopies() (the device, not the host, then waits for the copies).
  // This base implementation copies synchronously.
  virtual Expected<std::shared_ptr<HostCopies>> CopyToHostAsync(
      const std::vector<std::pair<uint8_t*, const Tensor*>>& copies) {
    for (const auto& [dst, src] : copies) CopyToHost(dst, *src);
    struct Done final : HostCopies {
      Status Wait() override { return Status::Ok(); }
    };
    TROUPE_RETURN_IF_ERROR(Synchronize());
    return std::shared_ptr<HostCopies>(std::make_shared<Done>());
  }
  // Orders every operation queued after this call after the copies of every
  // CopyToHostAsync so far. Cheap when there are none.
  virtual void FenceHostCopies() {}
  // Waits for queued work; returns the first asynchronous failure (a CUDA
  // kernel fault, say) since the last call. The CPU backend is synchronous.
  virtual Status Synchronize() { return Status::Ok(); }
  // Concurrent callers. Lets the calling thread issue kernels at the same
  // time as other threads (DualPipe runs an F&B pair's chunks on two), its
  // kernels using 1/ways of the backend's compute threads (at least one;
  // ways = 1 gives it all of them again). False where calls must come from
  // one thread at a time, as on CUDA, whose one stream would serialise them.
  virtual bool SetCallerShare(int ways) {
    (void)ways;
    return false;
  }
  // The same on a device with streams (CUDA): the calling thread's work goes
  // to lane `lane` (0, every thread's default, or 1), a stream of its own, so
  // two threads' kernels run at once. Lanes are ordered only by OrderLanes():
  // everything queued on any lane after it waits for everything queued on
  // every lane before it. Call it with no other thread issuing work, before
  // a second thread starts (fork) and after it finished (join). False where
  // the backend has no lane `lane`.
  virtual bool SetCallerLane(int lane) { return lane == 0; }
  virtual void OrderLanes() {}
  virtual int lanes() const { return 1; }
  // Profiling: a timestamp queued in order with the work (a CUDA event on
  // the GPU, the wall clock on the CPU); TimerMs(a, b) waits for b and
  // returns the milliseconds between the two. Ids stay valid until ResetTimers().
  virtual int RecordTimer() = 0;
  virtual double TimerMs(int start, int end) = 0;
  virtual void ResetTimers() = 0;
  // The device's record of when its kernels ran (gpu/kernel_overlap.h).
  // After StartKernelTimeline(), each TakeKernelSpans() waits for the device
  // and returns this backend's kernels that ended since the previous take.
  // Costs a little per kernel while on. Unimplemented where the device keeps
  // no such record (the CPU) or its profiling library is missing.
  virtual Status StartKernelTimeline() { return Status::Unimplemented("no kernel timeline on " + Describe()); }
  virtual Expected<std::vector<KernelSpan>> TakeKernelSpans() {
    return Status::Unimplemented("no kernel timeline on " + Describe());
  }

  // ---- dense algebra -----------------------------------------------------
  // c = alpha * op(a) @ op(b) + beta * c, op = transpose when the flag is set.
  virtual void Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha,
                      double beta) = 0;
  // Routed experts, tokens sorted by expert: rows [offsets[e], offsets[e+1])
  // of `in` go through expert e.  in [R, I], w [E, O, I], out [R, O].
  virtual void GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) = 0;
  // din [R, I] +=, dw [E, O, I] +=. An undefined din or dw (Tensor{})
  // skips that half: pipelines run the input half in B and the weight half
  // later, in W (BRIEF §2).
  virtual void GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                     const Tensor& offsets) = 0;

  // ---- elementwise -------------------------------------------------------
  virtual void Add(Tensor& out, const Tensor& a, const Tensor& b) = 0;  // out may alias a or b
  virtual void Axpy(Tensor& y, double alpha, const Tensor& x) = 0;      // y += alpha * x
  virtual void Scale(Tensor& x, double alpha) = 0;                      // x *= alpha
  // out [N, A+B] = [a | b];  backward: da += dout[:, :A], db += dout[:, A:].
  virtual void ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) = 0;
  virtual void ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) = 0;

  // ---- normalisation and activations -------------------------------------
  // out = in / sqrt(mean(in^2) + eps) * w;  in/out [N, C], w [C], rstd [N] saved.
  virtual void RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) = 0;
  virtual void RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                               const Tensor& rstd) = 0;
  // gate_up [N, 2F] (gate columns first); out [N, F] = silu(gate) * up.
  virtual void SwiGluForward(Tensor& out, const Tensor& gate_up) = 0;
  virtual void SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) = 0;
  virtual void SigmoidForward(Tensor& out, const Tensor& in) = 0;
  virtual void SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) = 0;

  // ---- embedding and loss ------------------------------------------------
  // out [N, D] = table[tokens[n]];  table [V, D], tokens I32 [N].
  virtual void EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) = 0;
  virtual void EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) = 0;
  // losses [N] = -log softmax(logits[n])[targets[n]]; a negative target is
  // ignored (loss 0).  logits [N, V].
  virtual void CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) = 0;
  // OVERWRITES dlogits (which may alias logits) with
  // dloss * (softmax(logits) - onehot(target)); ignored rows get 0.
  virtual void CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) = 0;

  // ---- attention (MLA, decoupled RoPE) ------------------------------------
  // Rotates, in place, columns [rot_offset, rot_offset + rot_dim) of every
  // head of x [N, H, Dh]: adjacent pairs (2j, 2j+1) by angle
  // pos * theta^(-2j/rot_dim), pos = n % seq_len.
  virtual void RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) = 0;
  // The inverse rotation, in place on the gradient.
  virtual void RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) = 0;
  // Causal attention inside each sequence of seq_len tokens.
  //   q  [N, H, dh + dr]   per head: content, then rotary
  //   kv [N, H, dh + dv]   per head: key content, then value
  //   k_rope [N, dr]       rotary key, shared by all heads
  //   out [N, H, dv], lse [N, H] (log-sum-exp of the scaled scores, saved)
  // score(i, j) = scale * (q_c,i . k_c,j + q_r,i . k_r,j). The T x T matrix
  // is never stored whole.
  virtual void MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope,
                                   int seq_len, int head_dim, double scale) = 0;
  virtual void MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out,
                                    const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope,
                                    int seq_len, int head_dim, double scale) = 0;

  // ---- mixture of experts -------------------------------------------------
  // scores [N, E] = sigmoid affinities, bias [E]. Picks K experts per token by
  // (score + bias) inside the best topk_group groups; gates use scores only.
  // topk_idx I32 [N, K] (ascending by expert id), topk_gate [N, K].
  virtual void MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias,
                        const RoutingSpec& spec) = 0;
  virtual void MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx,
                                const RoutingSpec& spec) = 0;
  // Stable counting sort of the N*K (token, expert) assignments by expert.
  // x_sorted [N*K, D] (OVERWRITTEN), offsets I32 [E+1], slot I32 [N, K]:
  // the row of x_sorted that assignment (n, k) went to.
  virtual void MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx,
                          int n_experts) = 0;
  virtual void MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) = 0;
  // y [N, D] += sum_k gate[n, k] * y_sorted[slot[n, k]].
  virtual void MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) = 0;
  // OVERWRITES dy_sorted and dgate.
  virtual void MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted,
                                  const Tensor& gate, const Tensor& slot) = 0;
  // Sequence-wise balance loss (BRIEF §1), one value per sequence of seq_len
  // tokens, OVERWRITTEN into loss [N / seq_len]:
  //   alpha * sum_i f_i P_i,  f_i = E/(K T) * #tokens of the sequence that picked i,
  //   P_i = mean_t s_i,t / sum_j s_j,t.   f is a constant for the gradient.
  virtual void MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                              double alpha) = 0;
  // dscores += dloss * d(sum over sequences of the loss)/d(scores).
  virtual void MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len,
                                      double alpha, double dloss) = 0;
  // counts I32 [E] (OVERWRITTEN) = how many tokens picked each expert.
  virtual void MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) = 0;

  // ---- reductions and the optimizer --------------------------------------
  virtual double Sum(const Tensor& x) = 0;         // deterministic order
  virtual double SumSquares(const Tensor& x) = 0;  // deterministic order
  // m = b1 m + (1-b1) g';  v = b2 v + (1-b2) g'^2;  g' = grad_scale * g
  // p -= lr * (mhat / (sqrt(vhat) + eps) + weight_decay * p)
  virtual void AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) = 0;
};

}  // namespace troupe
