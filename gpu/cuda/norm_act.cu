// STUB: to be implemented (see gpu/backend.h for the contract).
#include "gpu/cuda/cuda_backend.h"

namespace troupe {

void CudaBackend::RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) {
  Fail("RmsNormForward", "not implemented yet");
}

void CudaBackend::RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& rstd) {
  Fail("RmsNormBackward", "not implemented yet");
}

void CudaBackend::SwiGluForward(Tensor& out, const Tensor& gate_up) {
  Fail("SwiGluForward", "not implemented yet");
}

void CudaBackend::SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) {
  Fail("SwiGluBackward", "not implemented yet");
}

void CudaBackend::SigmoidForward(Tensor& out, const Tensor& in) {
  Fail("SigmoidForward", "not implemented yet");
}

void CudaBackend::SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) {
  Fail("SigmoidBackward", "not implemented yet");
}

void CudaBackend::EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) {
  Fail("EmbeddingForward", "not implemented yet");
}

void CudaBackend::EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) {
  Fail("EmbeddingBackward", "not implemented yet");
}

void CudaBackend::CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) {
  Fail("CrossEntropyForward", "not implemented yet");
}

void CudaBackend::CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) {
  Fail("CrossEntropyBackward", "not implemented yet");
}

}  // namespace troupe
