// How much of the communication kernels' time on a device other kernels
// overlapped, from the device's own record of when each kernel ran (CUDA:
// CUPTI activity records, Backend::TakeKernelSpans). This is what "the
// share of communication hidden behind compute" means on a GPU: host
// threads only see when they waited, not what the device did meanwhile.
#pragma once

#include <cstdint>
#include <string_view>
#include <vector>

namespace troupe {

struct KernelSpan {
  uint64_t start_ns = 0, end_ns = 0;  // device timestamps
  bool comm = false;                  // a communication kernel (NCCL's)
};

struct KernelOverlap {
  double comm_s = 0;     // the union of the communication kernels' intervals
  double compute_s = 0;  // the union of the other kernels' intervals
  double hidden_s = 0;   // the part of comm_s during which some other kernel ran
  int64_t comm_kernels = 0, compute_kernels = 0;
};

// NCCL's kernels (their names, mangled or not, contain "nccl").
inline bool IsCommKernel(std::string_view name) { return name.find("nccl") != std::string_view::npos; }

// Kernels of any streams of one device; their order does not matter.
KernelOverlap OverlapOf(std::vector<KernelSpan> spans);

}  // namespace troupe
