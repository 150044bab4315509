// STUB: to be implemented (see gpu/backend.h for the contract).
#include <cstdio>
#include <cstdlib>

#include "gpu/cpu/cpu_backend.h"

namespace troupe {

void CpuBackend::MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias, const RoutingSpec& spec) {
  std::fprintf(stderr, "CpuBackend::MoeRoute is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx, const RoutingSpec& spec) {
  std::fprintf(stderr, "CpuBackend::MoeRouteBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx, int n_experts) {
  std::fprintf(stderr, "CpuBackend::MoePermute is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) {
  std::fprintf(stderr, "CpuBackend::MoePermuteBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  std::fprintf(stderr, "CpuBackend::MoeCombine is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  std::fprintf(stderr, "CpuBackend::MoeCombineBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha) {
  std::fprintf(stderr, "CpuBackend::MoeBalanceLoss is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha, double dloss) {
  std::fprintf(stderr, "CpuBackend::MoeBalanceLossBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) {
  std::fprintf(stderr, "CpuBackend::MoeExpertLoad is not implemented yet\n");
  std::abort();
}

}  // namespace troupe
