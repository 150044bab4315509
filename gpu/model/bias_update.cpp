// Auxiliary-loss-free bias rule; see bias_update.h.
#include "gpu/model/bias_update.h"

#include <algorithm>
#include <cassert>

namespace troupe {

void UpdateRoutingBias(std::vector<float>& bias, const std::vector<int64_t>& load, double gamma) {
  assert(bias.size() == load.size());
  if (load.empty()) return;
  // Compare load_i * E with sum(load) in integers: the sign is exact, no
  // rounding of the mean can turn a balanced expert into an unbalanced one.
  const int64_t n = static_cast<int64_t>(load.size());
  int64_t total = 0;
  for (int64_t l : load) total += l;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t scaled = load[i] * n;  // load_i * E vs mean_load * E = total
    const int sign = scaled < total ? 1 : (scaled > total ? -1 : 0);
    bias[i] = static_cast<float>(static_cast<double>(bias[i]) + gamma * sign);
  }
}

double MaxLoadRatio(const std::vector<int64_t>& load) {
  int64_t total = 0, most = 0;
  for (int64_t x : load) {
    total += x;
    most = std::max(most, x);
  }
  return total > 0 ? static_cast<double>(most) * load.size() / total : 0.0;
}

}  // namespace troupe
