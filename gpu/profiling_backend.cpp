#include "gpu/profiling_backend.h"

#include <algorithm>
#include <cstdio>

namespace troupe {

std::map<std::string, ProfilingBackend::OpStats> ProfilingBackend::Collect() {
  for (const Pending& p : pending_) {
    OpStats& s = totals_[p.op];
    s.calls += 1;
    s.ms += inner_.TimerMs(p.start, p.end);
  }
  pending_.clear();
  inner_.ResetTimers();
  return totals_;
}

std::string ProfilingBackend::Report() {
  std::map<std::string, OpStats> stats = Collect();
  std::vector<std::pair<std::string, OpStats>> rows(stats.begin(), stats.end());
  std::sort(rows.begin(), rows.end(), [](const auto& a, const auto& b) { return a.second.ms > b.second.ms; });
  double total = 0.0;
  for (const auto& r : rows) total += r.second.ms;
  std::string out;
  char line[256];
  std::snprintf(line, sizeof line, "%-24s %10s %12s %7s\n", "op", "calls", "ms", "share");
  out += line;
  for (const auto& [op, s] : rows) {
    std::snprintf(line, sizeof line, "%-24s %10lld %12.3f %6.1f%%\n", op.c_str(), static_cast<long long>(s.calls), s.ms,
                  total > 0 ? 100.0 * s.ms / total : 0.0);
    out += line;
  }
  std::snprintf(line, sizeof line, "%-24s %10s %12.3f %6.1f%%\n", "total (device time)", "", total, 100.0);
  out += line;
  return out;
}

void ProfilingBackend::Zero(Tensor& t) {
  const int start = inner_.RecordTimer();
  inner_.Zero(t);
  pending_.push_back({"Zero", start, inner_.RecordTimer()});
}

void ProfilingBackend::CopyFromHost(Tensor& dst, const void* src) {
  const int start = inner_.RecordTimer();
  inner_.CopyFromHost(dst, src);
  pending_.push_back({"CopyFromHost", start, inner_.RecordTimer()});
}

void ProfilingBackend::CopyToHost(void* dst, const Tensor& src) {
  const int start = inner_.RecordTimer();
  inner_.CopyToHost(dst, src);
  pending_.push_back({"CopyToHost", start, inner_.RecordTimer()});
}

void ProfilingBackend::Copy(Tensor& dst, const Tensor& src) {
  const int start = inner_.RecordTimer();
  inner_.Copy(dst, src);
  pending_.push_back({"Copy", start, inner_.RecordTimer()});
}

void ProfilingBackend::Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta) {
  const int start = inner_.RecordTimer();
  inner_.Matmul(c, a, b, trans_a, trans_b, alpha, beta);
  pending_.push_back({"Matmul", start, inner_.RecordTimer()});
}

void ProfilingBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  const int start = inner_.RecordTimer();
  inner_.GroupedLinearForward(out, in, w, offsets);
  pending_.push_back({"GroupedLinearForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  const int start = inner_.RecordTimer();
  inner_.GroupedLinearBackward(din, dw, dout, in, w, offsets);
  pending_.push_back({"GroupedLinearBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::Add(Tensor& out, const Tensor& a, const Tensor& b) {
  const int start = inner_.RecordTimer();
  inner_.Add(out, a, b);
  pending_.push_back({"Add", start, inner_.RecordTimer()});
}

void ProfilingBackend::Axpy(Tensor& y, double alpha, const Tensor& x) {
  const int start = inner_.RecordTimer();
  inner_.Axpy(y, alpha, x);
  pending_.push_back({"Axpy", start, inner_.RecordTimer()});
}

void ProfilingBackend::Scale(Tensor& x, double alpha) {
  const int start = inner_.RecordTimer();
  inner_.Scale(x, alpha);
  pending_.push_back({"Scale", start, inner_.RecordTimer()});
}

void ProfilingBackend::ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) {
  const int start = inner_.RecordTimer();
  inner_.ConcatCols(out, a, b);
  pending_.push_back({"ConcatCols", start, inner_.RecordTimer()});
}

void ProfilingBackend::ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) {
  const int start = inner_.RecordTimer();
  inner_.ConcatColsBackward(da, db, dout);
  pending_.push_back({"ConcatColsBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) {
  const int start = inner_.RecordTimer();
  inner_.RmsNormForward(out, rstd, in, w, eps);
  pending_.push_back({"RmsNormForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& rstd) {
  const int start = inner_.RecordTimer();
  inner_.RmsNormBackward(din, dw, dout, in, w, rstd);
  pending_.push_back({"RmsNormBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::SwiGluForward(Tensor& out, const Tensor& gate_up) {
  const int start = inner_.RecordTimer();
  inner_.SwiGluForward(out, gate_up);
  pending_.push_back({"SwiGluForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) {
  const int start = inner_.RecordTimer();
  inner_.SwiGluBackward(dgate_up, dout, gate_up);
  pending_.push_back({"SwiGluBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::SigmoidForward(Tensor& out, const Tensor& in) {
  const int start = inner_.RecordTimer();
  inner_.SigmoidForward(out, in);
  pending_.push_back({"SigmoidForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) {
  const int start = inner_.RecordTimer();
  inner_.SigmoidBackward(din, dout, out);
  pending_.push_back({"SigmoidBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) {
  const int start = inner_.RecordTimer();
  inner_.EmbeddingForward(out, tokens, table);
  pending_.push_back({"EmbeddingForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) {
  const int start = inner_.RecordTimer();
  inner_.EmbeddingBackward(dtable, dout, tokens);
  pending_.push_back({"EmbeddingBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) {
  const int start = inner_.RecordTimer();
  inner_.CrossEntropyForward(losses, logits, targets);
  pending_.push_back({"CrossEntropyForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) {
  const int start = inner_.RecordTimer();
  inner_.CrossEntropyBackward(dlogits, logits, targets, dloss);
  pending_.push_back({"CrossEntropyBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) {
  const int start = inner_.RecordTimer();
  inner_.RopeForward(x, rot_offset, rot_dim, seq_len, theta);
  pending_.push_back({"RopeForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) {
  const int start = inner_.RecordTimer();
  inner_.RopeBackward(dx, rot_offset, rot_dim, seq_len, theta);
  pending_.push_back({"RopeBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  const int start = inner_.RecordTimer();
  inner_.MlaAttentionForward(out, lse, q, kv, k_rope, seq_len, head_dim, scale);
  pending_.push_back({"MlaAttentionForward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  const int start = inner_.RecordTimer();
  inner_.MlaAttentionBackward(dq, dkv, dk_rope, dout, out, lse, q, kv, k_rope, seq_len, head_dim, scale);
  pending_.push_back({"MlaAttentionBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias, const RoutingSpec& spec) {
  const int start = inner_.RecordTimer();
  inner_.MoeRoute(topk_idx, topk_gate, scores, bias, spec);
  pending_.push_back({"MoeRoute", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx, const RoutingSpec& spec) {
  const int start = inner_.RecordTimer();
  inner_.MoeRouteBackward(dscores, dgate, scores, topk_idx, spec);
  pending_.push_back({"MoeRouteBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx, int n_experts) {
  const int start = inner_.RecordTimer();
  inner_.MoePermute(x_sorted, offsets, slot, x, topk_idx, n_experts);
  pending_.push_back({"MoePermute", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) {
  const int start = inner_.RecordTimer();
  inner_.MoePermuteBackward(dx, dx_sorted, slot);
  pending_.push_back({"MoePermuteBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  const int start = inner_.RecordTimer();
  inner_.MoeCombine(y, y_sorted, gate, slot);
  pending_.push_back({"MoeCombine", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  const int start = inner_.RecordTimer();
  inner_.MoeCombineBackward(dy_sorted, dgate, dy, y_sorted, gate, slot);
  pending_.push_back({"MoeCombineBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha) {
  const int start = inner_.RecordTimer();
  inner_.MoeBalanceLoss(loss, scores, topk_idx, seq_len, alpha);
  pending_.push_back({"MoeBalanceLoss", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha, double dloss) {
  const int start = inner_.RecordTimer();
  inner_.MoeBalanceLossBackward(dscores, scores, topk_idx, seq_len, alpha, dloss);
  pending_.push_back({"MoeBalanceLossBackward", start, inner_.RecordTimer()});
}

void ProfilingBackend::MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) {
  const int start = inner_.RecordTimer();
  inner_.MoeExpertLoad(counts, topk_idx, n_experts);
  pending_.push_back({"MoeExpertLoad", start, inner_.RecordTimer()});
}

double ProfilingBackend::Sum(const Tensor& x) {
  const int start = inner_.RecordTimer();
  const double r = inner_.Sum(x);
  pending_.push_back({"Sum", start, inner_.RecordTimer()});
  return r;
}

double ProfilingBackend::SumSquares(const Tensor& x) {
  const int start = inner_.RecordTimer();
  const double r = inner_.SumSquares(x);
  pending_.push_back({"SumSquares", start, inner_.RecordTimer()});
  return r;
}

void ProfilingBackend::AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) {
  const int start = inner_.RecordTimer();
  inner_.AdamWStep(param, grad, m, v, p);
  pending_.push_back({"AdamWStep", start, inner_.RecordTimer()});
}

}  // namespace troupe
