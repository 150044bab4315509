// STUB: to be implemented (see gpu/backend.h for the contract).
#include <cstdio>
#include <cstdlib>

#include "gpu/cpu/cpu_backend.h"

namespace troupe {

void CpuBackend::RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) {
  std::fprintf(stderr, "CpuBackend::RopeForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) {
  std::fprintf(stderr, "CpuBackend::RopeBackward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  std::fprintf(stderr, "CpuBackend::MlaAttentionForward is not implemented yet\n");
  std::abort();
}

void CpuBackend::MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  std::fprintf(stderr, "CpuBackend::MlaAttentionBackward is not implemented yet\n");
  std::abort();
}

}  // namespace troupe
