// CUPTI's activity records of kernels, behind CudaBackend's kernel
// timeline (Backend::TakeKernelSpans). CUPTI is process-wide: one collector
// serves every backend of the process, keeping records by device until a
// backend of that device takes them. libcupti is opened at the first
// start, so a machine without it loses only this measurement.
#pragma once

#include <vector>

#include "common/status.h"
#include "gpu/kernel_overlap.h"

namespace troupe::cuda_timeline {

// Starts collecting kernel records (once per process; later calls do nothing).
Status Start();

// Waits for `device`, flushes CUPTI's buffers and returns the device's
// kernels recorded since the previous take.
Expected<std::vector<KernelSpan>> Take(int device);

}  // namespace troupe::cuda_timeline
