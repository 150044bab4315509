// STUB: to be implemented (see gpu/backend.h for the contract).
#include "gpu/cuda/cuda_backend.h"

namespace troupe {

void CudaBackend::Matmul(Tensor& c, const Tensor& a, const Tensor& b, bool trans_a, bool trans_b, double alpha, double beta) {
  Fail("Matmul", "not implemented yet");
}

void CudaBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  Fail("GroupedLinearForward", "not implemented yet");
}

void CudaBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  Fail("GroupedLinearBackward", "not implemented yet");
}

void CudaBackend::Add(Tensor& out, const Tensor& a, const Tensor& b) {
  Fail("Add", "not implemented yet");
}

void CudaBackend::Axpy(Tensor& y, double alpha, const Tensor& x) {
  Fail("Axpy", "not implemented yet");
}

void CudaBackend::Scale(Tensor& x, double alpha) {
  Fail("Scale", "not implemented yet");
}

void CudaBackend::ConcatCols(Tensor& out, const Tensor& a, const Tensor& b) {
  Fail("ConcatCols", "not implemented yet");
}

void CudaBackend::ConcatColsBackward(Tensor& da, Tensor& db, const Tensor& dout) {
  Fail("ConcatColsBackward", "not implemented yet");
}

double CudaBackend::Sum(const Tensor& x) {
  Fail("Sum", "not implemented yet");
  return 0.0;
}

double CudaBackend::SumSquares(const Tensor& x) {
  Fail("SumSquares", "not implemented yet");
  return 0.0;
}

void CudaBackend::AdamWStep(Tensor& param, const Tensor& grad, Tensor& m, Tensor& v, const AdamWParams& p) {
  Fail("AdamWStep", "not implemented yet");
}

}  // namespace troupe
