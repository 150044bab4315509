// STUB: to be implemented (see gpu/backend.h for the contract).
#include <cstdio>
#include <cstdlib>

#include "gpu/cpu/cpu_backend.h"

namespace troupe {

double CpuBackend::Sum(const Tensor& x) {
  std::fprintf(stderr, "CpuBackend::Sum is not implemented yet\n");
  std::abort();
}

double CpuBackend::SumSquares(const Tensor& x) {
  std::fprintf(stderr, "CpuBackend::SumSquares is not implemented yet\n");
  std::abort();
}

void CpuBackend::AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) {
  std::fprintf(stderr, "CpuBackend::AdamWStep is not implemented yet\n");
  std::abort();
}

}  // namespace troupe
