// What CUDA devices this process can use. Safe to call with no driver.
#pragma once

#include <string>

namespace troupe {

// Number of usable CUDA devices; 0 when there is no GPU or no driver.
int CudaDeviceCount();
// "NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90" or the reason none is usable.
std::string CudaDeviceSummary();

}  // namespace troupe
