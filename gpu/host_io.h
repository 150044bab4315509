// Moving float tensors between a backend and host vectors, whatever their
// float dtype (F32, F64; BF16 storage is widened).
#pragma once

#include <vector>

#include "gpu/backend.h"

namespace troupe {

std::vector<double> ToHostDoubles(Backend& be, const Tensor& t);
std::vector<float> ToHostFloats(Backend& be, const Tensor& t);
// values.size() must equal t.numel().
void FromHostDoubles(Backend& be, Tensor& t, const std::vector<double>& values);
void FromHostFloats(Backend& be, Tensor& t, const std::vector<float>& values);

}  // namespace troupe
