// Auxiliary-loss-free load balancing (BRIEF §1, DeepSeek-V3): the rule that
// moves each routed expert's selection bias toward equal load.
//
// After every optimizer step, with load_i = how many tokens of the whole
// global batch (all replicas) picked expert i and mean_load = sum(load) / E:
//     b_i += gamma * sign(mean_load - load_i),   sign(0) = 0
// An overloaded expert's bias falls, an underloaded one's rises; gradients
// never touch b, and b only shifts selection (s + b), never a gate value.
// Because the loads are global, every replica applies the same update and the
// biases stay identical everywhere. V3 uses gamma = 0.001.
#pragma once

#include <cstdint>
#include <vector>

namespace troupe {

// Precondition: bias.size() == load.size() (one entry per routed expert).
// Pure and deterministic; an empty vector is left alone.
void UpdateRoutingBias(std::vector<float>& bias, const std::vector<int64_t>& load, double gamma);

// max_i load_i / mean load (1 = perfectly balanced); 0 when nothing was routed.
double MaxLoadRatio(const std::vector<int64_t>& load);

}  // namespace troupe
