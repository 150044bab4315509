// Weight gradients held back for later: zero-bubble pipelines split a
// backward chunk into B (input gradients, which the previous stage waits
// for) and W (weight gradients, which nobody waits for), and run W where
// the pipeline would otherwise idle (BRIEF §2).
//
// Deferring dW += dy^T x needs dy and x at W time. x is a saved activation
// of the micro-batch (it lives until its slot is released, after W); dy is
// usually a scratch buffer the next layer's backward overwrites, so it is
// copied into the queue. If that copy cannot be allocated, the weight
// gradient is computed at once instead: slower to schedule, never wrong.
#pragma once

#include <vector>

#include "gpu/backend.h"

namespace troupe {

class WeightGradQueue {
 public:
  // dw += dy^T x, later.
  void DeferLinear(Backend& be, Tensor& dw, const Tensor& dy, const Tensor& x);
  // The weight half of GroupedLinearBackward, later; `offsets` is kept by
  // reference like x.
  void DeferGrouped(Backend& be, Tensor& dw, const Tensor& dy, const Tensor& x, const Tensor& w, const Tensor& offsets);
  // Runs every deferred gradient in the order deferred and empties the queue.
  void Run(Backend& be);
  bool empty() const { return items_.empty(); }
  size_t size() const { return items_.size(); }
  // Bytes of dy copies held now.
  size_t bytes() const { return bytes_; }

 private:
  struct Item {
    bool grouped = false;
    Tensor dw, dy, x, w, offsets;
  };
  // A private copy of dy, or dy itself (undefined) when it cannot be allocated.
  Tensor Keep(Backend& be, const Tensor& dy);

  std::vector<Item> items_;
  size_t bytes_ = 0;
};

}  // namespace troupe
