#include "gpu/model/weight_grads.h"

#include "gpu/model/linear.h"

namespace troupe {

Tensor WeightGradQueue::Keep(Backend& be, const Tensor& dy) {
  auto copy = be.Alloc(dy.shape(), dy.dtype(), "grad.deferred_dy");
  if (!copy.ok()) return Tensor{};
  be.Copy(*copy, dy);
  bytes_ += copy->bytes();
  return std::move(copy).value();
}

void WeightGradQueue::DeferLinear(Backend& be, Tensor& dw, const Tensor& dy, const Tensor& x) {
  Tensor kept = Keep(be, dy);
  if (!kept.defined()) {  // no memory for the copy: do it now
    be.Matmul(dw, AsRowsOf(dy, dw.dim(0)), AsRowsOf(x, dw.dim(1)), true, false, 1.0, 1.0);
    return;
  }
  items_.push_back({false, dw, kept, x, Tensor{}, Tensor{}});
}

void WeightGradQueue::DeferGrouped(Backend& be, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w,
                                   const Tensor& offsets) {
  Tensor kept = Keep(be, dy);
  if (!kept.defined()) {
    Tensor no_input;
    be.GroupedLinearBackward(no_input, dw, dy, x, w, offsets);
    return;
  }
  items_.push_back({true, dw, kept, x, w, offsets});
}

void WeightGradQueue::Run(Backend& be) {
  for (Item& it : items_) {
    if (it.grouped) {
      Tensor no_input;
      be.GroupedLinearBackward(no_input, it.dw, it.dy, it.x, it.w, it.offsets);
    } else {
      be.Matmul(it.dw, AsRowsOf(it.dy, it.dw.dim(0)), AsRowsOf(it.x, it.dw.dim(1)), true, false, 1.0, 1.0);
    }
  }
  items_.clear();
  bytes_ = 0;
}

}  // namespace troupe
