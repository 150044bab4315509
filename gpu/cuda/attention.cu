// STUB: to be implemented (see gpu/backend.h for the contract).
#include "gpu/cuda/cuda_backend.h"

namespace troupe {

void CudaBackend::RopeForward(Tensor& x, int rot_offset, int rot_dim, int seq_len, double theta) {
  Fail("RopeForward", "not implemented yet");
}

void CudaBackend::RopeBackward(Tensor& dx, int rot_offset, int rot_dim, int seq_len, double theta) {
  Fail("RopeBackward", "not implemented yet");
}

void CudaBackend::MlaAttentionForward(Tensor& out, Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  Fail("MlaAttentionForward", "not implemented yet");
}

void CudaBackend::MlaAttentionBackward(Tensor& dq, Tensor& dkv, Tensor& dk_rope, const Tensor& dout, const Tensor& out, const Tensor& lse, const Tensor& q, const Tensor& kv, const Tensor& k_rope, int seq_len, int head_dim, double scale) {
  Fail("MlaAttentionBackward", "not implemented yet");
}

}  // namespace troupe
