// The CUDA backend as a runtime-loaded module (libtroupe_cuda.so).
//
// The CPU path never maps CUDA's libraries (cuBLAS alone is ~500 MB): the
// module is dlopen'ed on first use, from the directory named by
// TROUPE_CUDA_MODULE (if set), beside the executable, ../gpu/ of it (the
// build tree), then the dynamic linker's search path. All three functions are
// safe to call on machines without a GPU, a driver or the module.
#pragma once

#include <memory>
#include <string>

#include "common/status.h"
#include "gpu/backend.h"

namespace troupe {

// Number of usable CUDA devices; 0 when there is no GPU, driver or module.
int CudaDeviceCount();
// "1 x NVIDIA H100 80GB HBM3, 79.1 GiB, sm_90" or the reason none is usable.
std::string CudaDeviceSummary();
// A CudaBackend on `device`; bf16 = tensor-core GEMMs with fp32 storage.
Expected<std::unique_ptr<Backend>> CreateCudaBackend(int device, bool bf16);

}  // namespace troupe
