// STUB: to be implemented (see gpu/backend.h for the contract).
#include "gpu/cuda/cuda_backend.h"

namespace troupe {

void CudaBackend::MoeRoute(Tensor& topk_idx, Tensor& topk_gate, const Tensor& scores, const Tensor& bias, const RoutingSpec& spec) {
  Fail("MoeRoute", "not implemented yet");
}

void CudaBackend::MoeRouteBackward(Tensor& dscores, const Tensor& dgate, const Tensor& scores, const Tensor& topk_idx, const RoutingSpec& spec) {
  Fail("MoeRouteBackward", "not implemented yet");
}

void CudaBackend::MoePermute(Tensor& x_sorted, Tensor& offsets, Tensor& slot, const Tensor& x, const Tensor& topk_idx, int n_experts) {
  Fail("MoePermute", "not implemented yet");
}

void CudaBackend::MoePermuteBackward(Tensor& dx, const Tensor& dx_sorted, const Tensor& slot) {
  Fail("MoePermuteBackward", "not implemented yet");
}

void CudaBackend::MoeCombine(Tensor& y, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  Fail("MoeCombine", "not implemented yet");
}

void CudaBackend::MoeCombineBackward(Tensor& dy_sorted, Tensor& dgate, const Tensor& dy, const Tensor& y_sorted, const Tensor& gate, const Tensor& slot) {
  Fail("MoeCombineBackward", "not implemented yet");
}

void CudaBackend::MoeBalanceLoss(Tensor& loss, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha) {
  Fail("MoeBalanceLoss", "not implemented yet");
}

void CudaBackend::MoeBalanceLossBackward(Tensor& dscores, const Tensor& scores, const Tensor& topk_idx, int seq_len, double alpha, double dloss) {
  Fail("MoeBalanceLossBackward", "not implemented yet");
}

void CudaBackend::MoeExpertLoad(Tensor& counts, const Tensor& topk_idx, int n_experts) {
  Fail("MoeExpertLoad", "not implemented yet");
}

}  // namespace troupe
