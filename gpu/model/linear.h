// Linear layers (y = x W^T, W [out, in]) over the Backend's Matmul. Activations
// may carry head dimensions ([N, H, D]); they are viewed as [N, H*D] matrices
// whose width is the weight's in/out size.
#pragma once

#include "gpu/backend.h"
#include "gpu/model/weight_grads.h"

namespace troupe {

inline Tensor AsRowsOf(const Tensor& t, int64_t width) { return t.Reshape({t.numel() / width, width}); }

// y = x W^T.
inline void Linear(Backend& be, Tensor& y, const Tensor& x, const Tensor& w) {
  Tensor y2 = AsRowsOf(y, w.dim(0));
  be.Matmul(y2, AsRowsOf(x, w.dim(1)), w, false, true, 1.0, 0.0);
}

// dx += dy W;  dW += dy^T x (now, or into `defer` for a later W).
inline void LinearBackward(Backend& be, Tensor& dx, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                           WeightGradQueue* defer = nullptr) {
  Tensor dx2 = AsRowsOf(dx, w.dim(1));
  const Tensor dy2 = AsRowsOf(dy, w.dim(0));
  be.Matmul(dx2, dy2, w, false, false, 1.0, 1.0);
  if (defer) {
    defer->DeferLinear(be, dw, dy2, x);
  } else {
    be.Matmul(dw, dy2, AsRowsOf(x, w.dim(1)), true, false, 1.0, 1.0);
  }
}

}  // namespace troupe
