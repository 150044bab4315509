#include "gpu/kernel_overlap.h"

#include <algorithm>
#include <utility>

namespace troupe {
namespace {

using Interval = std::pair<uint64_t, uint64_t>;

// Sorted, disjoint intervals covering the same time as `in`.
std::vector<Interval> Union(std::vector<Interval> in) {
  std::sort(in.begin(), in.end());
  std::vector<Interval> out;
  for (const Interval& i : in) {
    if (i.second <= i.first) continue;
    if (!out.empty() && i.first <= out.back().second) {
      out.back().second = std::max(out.back().second, i.second);
    } else {
      out.push_back(i);
    }
  }
  return out;
}

uint64_t Length(const std::vector<Interval>& v) {
  uint64_t n = 0;
  for (const Interval& i : v) n += i.second - i.first;
  return n;
}

// Length of the intersection of two sorted, disjoint interval lists.
uint64_t Intersection(const std::vector<Interval>& a, const std::vector<Interval>& b) {
  uint64_t n = 0;
  size_t i = 0, j = 0;
  while (i < a.size() && j < b.size()) {
    const uint64_t lo = std::max(a[i].first, b[j].first), hi = std::min(a[i].second, b[j].second);
    if (hi > lo) n += hi - lo;
    if (a[i].second < b[j].second) {
      ++i;
    } else {
      ++j;
    }
  }
  return n;
}

}  // namespace

KernelOverlap OverlapOf(std::vector<KernelSpan> spans) {
  std::vector<Interval> comm, compute;
  KernelOverlap o;
  for (const KernelSpan& s : spans) {
    (s.comm ? comm : compute).emplace_back(s.start_ns, s.end_ns);
    ++(s.comm ? o.comm_kernels : o.compute_kernels);
  }
  const std::vector<Interval> c = Union(std::move(comm)), k = Union(std::move(compute));
  o.comm_s = 1e-9 * static_cast<double>(Length(c));
  o.compute_s = 1e-9 * static_cast<double>(Length(k));
  o.hidden_s = 1e-9 * static_cast<double>(Intersection(c, k));
  return o;
}

}  // namespace troupe
