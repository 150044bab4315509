// STUB: to be implemented (see gpu/backend.h for the contract).
#include <cstdio>
#include <cstdlib>

#include "gpu/cpu/cpu_backend.h"

namespace troupe {

void CpuBackend::Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta) {
  std::fprintf(stderr, "CpuBackend::Matmul is not implemented yet\n");
  std::abort();
}

void CpuBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  std::fprintf(stderr, "CpuBackend::GroupedLinearForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  std::fprintf(stderr, "CpuBackend::GroupedLinearBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::Add(Tensor& out, const Tensor& a, const Tensor& b) {
  std::fprintf(stderr, "CpuBackend::Add is not implemented yet\n");
  std::abort();
}

void CpuBackend::Axpy(Tensor& y, double alpha, const Tensor& x) {
  std::fprintf(stderr, "CpuBackend::Axpy is not implemented yet\n");
  std::abort();
}

void CpuBackend::Scale(Tensor& x, double alpha) {
  std::fprintf(stderr, "CpuBackend::Scale is not implemented yet\n");
  std::abort();
}

void CpuBackend::ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) {
  std::fprintf(stderr, "CpuBackend::ConcatCols is not implemented yet\n");
  std::abort();
}

void CpuBackend::ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) {
  std::fprintf(stderr, "CpuBackend::ConcatColsBackward is not implemented yet\n");
  std::abort();
}

}  // namespace troupe
