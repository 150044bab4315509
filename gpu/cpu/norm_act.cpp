// STUB: to be implemented (see gpu/backend.h for the contract).
#include <cstdio>
#include <cstdlib>

#include "gpu/cpu/cpu_backend.h"

namespace troupe {

void CpuBackend::RmsNormForward(Tensor& out, Tensor& rstd, const Tensor& in, const Tensor& w, double eps) {
  std::fprintf(stderr, "CpuBackend::RmsNormForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::RmsNormBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& rstd) {
  std::fprintf(stderr, "CpuBackend::RmsNormBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::SwiGluForward(Tensor& out, const Tensor& gate_up) {
  std::fprintf(stderr, "CpuBackend::SwiGluForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::SwiGluBackward(Tensor& dgate_up, const Tensor& dout, const Tensor& gate_up) {
  std::fprintf(stderr, "CpuBackend::SwiGluBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::SigmoidForward(Tensor& out, const Tensor& in) {
  std::fprintf(stderr, "CpuBackend::SigmoidForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::SigmoidBackward(Tensor& din, const Tensor& dout, const Tensor& out) {
  std::fprintf(stderr, "CpuBackend::SigmoidBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::EmbeddingForward(Tensor& out, const Tensor& tokens, const Tensor& table) {
  std::fprintf(stderr, "CpuBackend::EmbeddingForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::EmbeddingBackward(Tensor& dtable, const Tensor& dout, const Tensor& tokens) {
  std::fprintf(stderr, "CpuBackend::EmbeddingBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::CrossEntropyForward(Tensor& losses, const Tensor& logits, const Tensor& targets) {
  std::fprintf(stderr, "CpuBackend::CrossEntropyForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::CrossEntropyBackward(Tensor& dlogits, const Tensor& logits, const Tensor& targets, double dloss) {
  std::fprintf(stderr, "CpuBackend::CrossEntropyBackward is not implemented yet\n");
  std::abort();
}

}  // namespace troupe
