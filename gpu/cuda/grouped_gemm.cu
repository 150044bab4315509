// CUDA grouped GEMMs for the routed experts: rows are sorted by expert
// (offsets[e]..offsets[e+1] belong to expert e) and every expert's product is
// one problem of a grouped or batched cuBLAS call, never a host loop of
// launches per expert.
//
//   GroupedLinearForward    out_e = in_e w_e^T          cublasGemmGroupedBatchedEx
//   GroupedLinearBackward   din_e += dout_e w_e         cublasGemmGroupedBatchedEx
//                           dw_e  += dout_e^T in_e      chunked: one gather, one
//                                                       cublasGemmBatchedEx, one reduction
//
// Row-major on column-major cuBLAS (see dense.cu): row-major C = op(A) op(B)
// is the column-major C^T = op(B)^T op(A)^T.
//
// Why the weight gradient is chunked: its output [O, I] is small and its k
// (the expert's rows) long. For that shape cuBLAS's grouped entry point runs
// no grouped kernel: it launches one split-k GEMM per expert, each a few CTAs
// wide (measured on H100 for moe100m, 512x512 outputs, k ~ 4096: ~5 TFLOP/s,
// 30% of a training step). So every expert's rows are cut into chunks of C
// rows; one batched GEMM (uniform shape, so a real batched kernel with every
// chunk's tiles in one grid) writes each chunk's partial dW into scratch, and
// one kernel adds each expert's partials into dw. Full chunks are read where
// they lie; an expert's shorter last chunk is first copied into a zero-padded
// C-row slot (zero rows add exact zeros), so every chunk has k = C.
//
// Precision: kFp32 runs CUBLAS_COMPUTE_32F (true fp32). kBf16 tries
// CUBLAS_COMPUTE_32F_FAST_16BF; where cuBLAS refuses it for an entry point it
// uses CUBLAS_COMPUTE_32F_FAST_TF32 for that entry point from then on (fp32 in
// and out, reduced-precision tensor-core inputs, fp32 accumulation). With
// cuBLAS 13 on H100 the grouped call refuses FAST_16BF and the batched one
// accepts it (the weight gradient ran equally fast under either). FAST
// compute types need 16-byte aligned matrices; calls with unaligned operands
// use 32F (slower, more accurate, always legal).
//
// Determinism: cuBLAS GEMMs are deterministic for fixed shapes, alignment and
// handle settings; the chunk plan depends only on the offsets and shapes, and
// the partials are summed per element in chunk order (in double): run to run,
// the result is bitwise identical.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "gpu/cuda/cuda_backend.h"
#include "gpu/cuda/kernel_util.cuh"

namespace troupe {
namespace {

using namespace cuda_util;  // the shared launch / check helpers

bool Aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Set once cuBLAS has refused FAST_16BF for an entry point (process-wide: the
// answer depends on the cuBLAS build, not on the backend instance).
std::atomic<bool> g_grouped_bf16_refused{false};
std::atomic<bool> g_batched_bf16_refused{false};

// Runs `call(compute)` under the backend's precision (see the file comment):
// 32F unless kBf16 and `aligned`; FAST_16BF first, FAST_TF32 once cuBLAS has
// refused FAST_16BF for this entry point (`refused`, `api` for messages).
template <typename Call>
void CallWithPrecision(CudaBackend& be, const char* op, bool aligned, std::atomic<bool>& refused, const char* api,
                       const Call& call) {
  const std::string name(api);
  if (be.precision() != MatmulPrecision::kBf16 || !aligned) {
    CublasOk(be, op, call(CUBLAS_COMPUTE_32F), (name + "(32F)").c_str());
    return;
  }
  if (!refused.load()) {
    const cublasStatus_t st = call(CUBLAS_COMPUTE_32F_FAST_16BF);
    if (st == CUBLAS_STATUS_SUCCESS) return;
    if (st != CUBLAS_STATUS_NOT_SUPPORTED && st != CUBLAS_STATUS_INVALID_VALUE) {
      CublasOk(be, op, st, (name + "(FAST_16BF)").c_str());
      return;
    }
    if (!refused.exchange(true)) {
      std::fprintf(stderr, "troupe: cuBLAS refused FAST_16BF for %s (%s); it uses FAST_TF32 instead\n", api,
                   cublasGetStatusString(st));
    }
  }
  CublasOk(be, op, call(CUBLAS_COMPUTE_32F_FAST_TF32), (name + "(FAST_TF32)").c_str());
}

// ---- grouped GEMM ---------------------------------------------------------------

// One problem of a grouped call, in cuBLAS's column-major terms:
// C = op(A) op(B) + beta C, op(A) [m, k], op(B) [k, n], C [m, n].
struct GemmProblem {
  cublasOperation_t ta, tb;
  int m, n, k;
  const float* a;
  int lda;
  const float* b;
  int ldb;
  float beta;
  float* c;
  int ldc;
};

// Runs every problem in ONE cublasGemmGroupedBatchedEx call (one group of
// size 1 per problem: the problems differ in shape). Per the cuBLAS docs the
// pointer arrays (A, B, C) must be in device memory; everything else
// (transposes, m/n/k, leading dimensions, alpha/beta, group sizes) is read
// from host memory during the call, so std::vectors suffice for those.
void GroupedGemm(CudaBackend& be, const char* op, const std::vector<GemmProblem>& probs) {
  if (probs.empty() || be.failed()) return;
  const int count = static_cast<int>(probs.size());
  std::vector<cublasOperation_t> ta(count), tb(count);
  std::vector<int> m(count), n(count), k(count), lda(count), ldb(count), ldc(count), group_size(count, 1);
  std::vector<float> alpha(count, 1.0f), beta(count);
  std::vector<const void*> ptrs(3 * static_cast<size_t>(count));  // [A..., B..., C...]
  bool aligned = true;
  for (int i = 0; i < count; ++i) {
    const GemmProblem& p = probs[i];
    ta[i] = p.ta;
    tb[i] = p.tb;
    m[i] = p.m;
    n[i] = p.n;
    k[i] = p.k;
    lda[i] = p.lda;
    ldb[i] = p.ldb;
    ldc[i] = p.ldc;
    beta[i] = p.beta;
    ptrs[i] = p.a;
    ptrs[count + i] = p.b;
    ptrs[2 * count + i] = p.c;
    aligned = aligned && Aligned16(p.a) && Aligned16(p.b) && Aligned16(p.c);
  }
  // The device copy of the pointer arrays lives in the backend's workspace,
  // which stays valid until the next op queued on this stream (stream order
  // protects it from being overwritten before cuBLAS has read it).
  auto* dptrs = static_cast<const void**>(be.Workspace(ptrs.size() * sizeof(void*), op, "GEMM pointer arrays"));
  if (dptrs == nullptr) return;
  // From pageable memory: returns once `ptrs` has been staged, so the vector
  // may die when we return.
  if (!CudaOk(be, op,
              cudaMemcpyAsync(dptrs, ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, be.stream()),
              "cudaMemcpyAsync(pointer arrays)"))
    return;
  const void* const* d_a = dptrs;
  const void* const* d_b = dptrs + count;
  void* const* d_c = const_cast<void* const*>(dptrs + 2 * count);
  CallWithPrecision(
      be, op, aligned, g_grouped_bf16_refused, "cublasGemmGroupedBatchedEx", [&](cublasComputeType_t compute) {
        return cublasGemmGroupedBatchedEx(be.cublas(), ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                          d_a, CUDA_R_32F, lda.data(), d_b, CUDA_R_32F, ldb.data(), beta.data(), d_c,
                                          CUDA_R_32F, ldc.data(), count, group_size.data(), compute);
      });
}

// ---- chunked expert weight gradient -------------------------------------------

// Copies expert tails into zero-padded slots: slot s holds rows
// [begin[s], begin[s] + count[s]) of x (I wide) and dy (O wide) in its first
// count[s] of C rows, zeros below. Row g = s * C + t; column j < I is x's,
// j >= I is dy's.
struct GatherTailsOp {
  float* xs;
  float* ys;
  const float* x;
  const float* dy;
  const int32_t* begin;
  const int32_t* count;
  int64_t C, I, O;
  __device__ void operator()(int64_t g, int64_t j) const {
    const int64_t s = g / C, t = g - s * C;
    const bool live = t < count[s];
    const int64_t src = begin[s] + t;
    if (j < I) {
      xs[g * I + j] = live ? x[src * I + j] : 0.0f;
    } else {
      ys[g * O + (j - I)] = live ? dy[src * O + (j - I)] : 0.0f;
    }
  }
};

// dw[expert[r]] += partial[first[r]] + ... + partial[first[r + 1] - 1] for
// active expert r, element j of its [O, I]; in double, in chunk order.
struct ReducePartialsOp {
  float* dw;
  const float* partial;
  const int32_t* expert;
  const int32_t* first;
  int64_t oi;
  __device__ void operator()(int64_t r, int64_t j) const {
    float* d = dw + static_cast<int64_t>(expert[r]) * oi + j;
    double s = static_cast<double>(*d);
    const int32_t end = first[r + 1];
    for (int32_t c = first[r]; c < end; ++c) s += static_cast<double>(partial[static_cast<int64_t>(c) * oi + j]);
    *d = static_cast<float>(s);
  }
};

// Most scratch the chunked path takes (Workspace keeps it: it never shrinks).
// Plans needing more have large per-expert outputs (or an enormous batch):
// each expert's GEMM then fills the GPU on its own, and the grouped call is
// used instead.
constexpr size_t kMaxChunkScratch = size_t{1} << 30;

size_t AlignUp(size_t v) { return (v + 255) & ~size_t{255}; }

// Rows per chunk: a power of two (in [64, 8192]) near the C that minimizes
//   (rows / C) * 2 * O * I        the partials, written once and read once
//   + active * C * 6 * (I + O)    the padded tails (C / 2 rows per expert on
//                                 average): gathered, read again by the GEMM
//                                 and multiplied, zeros included
// i.e. C = sqrt(rows O I / (3 active (I + O))); the weight 6 is fitted on
// H100. moe100m (131072 rows, 32 experts, 512x512 and 512x256): C = 512,
// the fastest measured there (the op took 9% longer at 256, 3% at 1024 for
// the 512x512 layer, 28% at 2048).
int64_t ChunkRows(int64_t rows, int64_t active, int64_t I, int64_t O) {
  const double best = std::sqrt(static_cast<double>(rows) * static_cast<double>(O) * static_cast<double>(I) /
                                (3.0 * static_cast<double>(active) * static_cast<double>(I + O)));
  int64_t c = 64;
  while (c < 8192 && static_cast<double>(c) * std::sqrt(2.0) < best) c *= 2;
  return c;
}

// dw_e [O, I] += dy_e^T [O, n_e] x_e [n_e, I] for every expert, as described
// at the top. Returns false, having done nothing, when the scratch would
// exceed kMaxChunkScratch (the caller then uses the grouped call).
bool ChunkedWeightGrad(CudaBackend& be, const char* op, float* dw, const float* x, const float* dy,
                       const std::vector<int32_t>& off, int64_t E, int64_t I, int64_t O) {
  int64_t rows = 0, active = 0;
  for (int64_t e = 0; e < E; ++e) {
    rows += off[e + 1] - off[e];
    active += off[e + 1] > off[e];
  }
  if (active == 0) return true;
  const int64_t C = ChunkRows(rows, active, I, O);
  int64_t chunks = 0, slots = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t n = off[e + 1] - off[e];
    chunks += CeilDiv(n, C);
    slots += n % C != 0;
  }
  // Scratch layout, each part 256-byte aligned: the three pointer arrays and
  // the int32 tables (one host-to-device copy), the partials [chunks, O, I],
  // the padded slots of x [slots, C, I] and of dy [slots, C, O].
  const size_t oi = static_cast<size_t>(O * I);
  const size_t ptr_bytes = 3 * static_cast<size_t>(chunks) * sizeof(void*);
  const size_t table_ints = 2 * static_cast<size_t>(slots) + 2 * static_cast<size_t>(active) + 1;
  const size_t meta_bytes = AlignUp(ptr_bytes + table_ints * sizeof(int32_t));
  const size_t partial_bytes = AlignUp(static_cast<size_t>(chunks) * oi * sizeof(float));
  const size_t xs_bytes = AlignUp(static_cast<size_t>(slots * C * I) * sizeof(float));
  const size_t ys_bytes = AlignUp(static_cast<size_t>(slots * C * O) * sizeof(float));
  const size_t total = meta_bytes + partial_bytes + xs_bytes + ys_bytes;
  if (total > kMaxChunkScratch || !FitsInt(chunks) || !FitsInt(C)) return false;
  auto* base = static_cast<char*>(be.Workspace(total, op, "expert weight-gradient scratch"));
  if (base == nullptr) return true;  // failure recorded
  float* partials = reinterpret_cast<float*>(base + meta_bytes);
  float* xs = reinterpret_cast<float*>(base + meta_bytes + partial_bytes);
  float* ys = reinterpret_cast<float*>(base + meta_bytes + partial_bytes + xs_bytes);

  // Host copy of the metadata: A, B, C pointers per chunk (expert by expert,
  // chunk by chunk: an expert's partials are consecutive), then the tables.
  std::vector<char> meta(ptr_bytes + table_ints * sizeof(int32_t));
  auto* pa = reinterpret_cast<const float**>(meta.data());
  const float** pb = pa + chunks;
  float** pc = const_cast<float**>(pa + 2 * chunks);
  std::vector<int32_t> tail_begin, tail_count, red_expert, red_first;
  int64_t c = 0;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], n = off[e + 1] - off[e];
    if (n == 0) continue;
    red_expert.push_back(static_cast<int32_t>(e));
    red_first.push_back(static_cast<int32_t>(c));
    for (int64_t t = 0; t < n; t += C, ++c) {
      if (n - t >= C) {  // a full chunk, read in place
        pa[c] = x + (r0 + t) * I;
        pb[c] = dy + (r0 + t) * O;
      } else {  // the tail, from its padded slot
        const int64_t s = static_cast<int64_t>(tail_begin.size());
        tail_begin.push_back(static_cast<int32_t>(r0 + t));
        tail_count.push_back(static_cast<int32_t>(n - t));
        pa[c] = xs + s * C * I;
        pb[c] = ys + s * C * O;
      }
      pc[c] = partials + c * static_cast<int64_t>(oi);
    }
  }
  red_first.push_back(static_cast<int32_t>(c));
  int32_t* tables = reinterpret_cast<int32_t*>(meta.data() + ptr_bytes);
  std::copy(tail_begin.begin(), tail_begin.end(), tables);
  std::copy(tail_count.begin(), tail_count.end(), tables + slots);
  std::copy(red_expert.begin(), red_expert.end(), tables + 2 * slots);
  std::copy(red_first.begin(), red_first.end(), tables + 2 * slots + active);
  if (!CudaOk(be, op, cudaMemcpyAsync(base, meta.data(), meta.size(), cudaMemcpyHostToDevice, be.stream()),
              "cudaMemcpyAsync(chunk plan)"))
    return true;
  const auto* d_tables = reinterpret_cast<const int32_t*>(base + ptr_bytes);

  if (slots > 0) {
    LaunchRowCol(be, op, slots * C, I + O, GatherTailsOp{xs, ys, x, dy, d_tables, d_tables + slots, C, I, O});
  }
  // Column-major per chunk: partial^T [I, O] = x_c^T [I, C] dy_c [C, O], (N, T).
  const float one = 1.0f, zero = 0.0f;
  auto** d_ptrs = reinterpret_cast<void**>(base);
  const bool aligned = I % 4 == 0 && O % 4 == 0 && Aligned16(x) && Aligned16(dy);  // partials, slots: 256-aligned
  CallWithPrecision(be, op, aligned, g_batched_bf16_refused, "cublasGemmBatchedEx", [&](cublasComputeType_t compute) {
    return cublasGemmBatchedEx(be.cublas(), CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(I), static_cast<int>(O),
                               static_cast<int>(C), &one, d_ptrs, CUDA_R_32F, static_cast<int>(I), d_ptrs + chunks,
                               CUDA_R_32F, static_cast<int>(O), &zero, d_ptrs + 2 * chunks, CUDA_R_32F,
                               static_cast<int>(I), static_cast<int>(chunks), compute, CUBLAS_GEMM_DEFAULT);
  });
  if (be.failed()) return true;
  LaunchRowCol(
      be, op, active, static_cast<int64_t>(oi),
      ReducePartialsOp{dw, partials, d_tables + 2 * slots, d_tables + 2 * slots + active, static_cast<int64_t>(oi)});
  return true;
}

// Copies the E+1 expert offsets to the host (one small synchronous copy) and
// checks 0 <= offsets[0] <= ... <= offsets[E] <= rows.
bool ReadOffsets(CudaBackend& be, const char* op, const Tensor& offsets, int64_t n_experts, int64_t rows,
                 std::vector<int32_t>* out) {
  if (!Require(be, op, DType::kI32, {&offsets})) return false;
  if (!ShapeOk(
          be, op, offsets.numel() == n_experts + 1,
          "offsets has " + std::to_string(offsets.numel()) + " entries for " + std::to_string(n_experts) + " experts"))
    return false;
  out->resize(static_cast<size_t>(n_experts + 1));
  if (!CudaOk(be, op, cudaMemcpyAsync(out->data(), offsets.raw(), offsets.bytes(), cudaMemcpyDeviceToHost, be.stream()),
              "cudaMemcpyAsync(offsets)") ||
      !CudaOk(be, op, cudaStreamSynchronize(be.stream()), "cudaStreamSynchronize(offsets)"))
    return false;
  const std::vector<int32_t>& o = *out;
  bool ok = o[0] >= 0 && o[n_experts] <= rows;
  for (int64_t e = 0; ok && e < n_experts; ++e) ok = o[e] <= o[e + 1];
  if (!ok) {
    std::string s;
    for (int64_t e = 0; e <= n_experts && e < 17; ++e) s += (e ? "," : "") + std::to_string(o[e]);
    be.Fail(op, "offsets are not non-decreasing within [0, " + std::to_string(rows) + "]: " + s);
  }
  return ok;
}

}  // namespace

// out_e [n_e, O] = in_e [n_e, I] w_e^T [I, O]; column-major:
// out_e^T [O, n_e] = w_e [O, I] in_e^T [I, n_e]: cuBLAS (T, N), m = O, n = n_e, k = I.
void CudaBackend::GroupedLinearForward(Tensor& out, const Tensor& in, const Tensor& w, const Tensor& offsets) {
  static const char* kOp = "GroupedLinearForward";
  if (failed() || !RequireF32(*this, kOp, {&out, &in, &w})) return;
  if (!ShapeOk(*this, kOp, w.ndim() == 3, "w " + w.ShapeString() + " is not [E, O, I]")) return;
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2), R = in.rows();
  if (!ShapeOk(*this, kOp, in.cols() == I && out.cols() == O && out.rows() == R,
               "in " + in.ShapeString() + ", w " + w.ShapeString() + ", out " + out.ShapeString()))
    return;
  if (!CublasDimsOk(*this, kOp, {R, O, I})) return;
  std::vector<int32_t> off;
  if (!ReadOffsets(*this, kOp, offsets, E, R, &off)) return;
  if (O == 0 || off[E] == off[0]) return;
  if (I == 0) {  // an empty dot product: owned rows become 0
    CudaOk(*this, kOp,
           cudaMemsetAsync(out.data<float>() + static_cast<int64_t>(off[0]) * O, 0,
                           static_cast<size_t>(off[E] - off[0]) * O * sizeof(float), stream()),
           "cudaMemsetAsync");
    return;
  }
  const float* x = in.data<float>();  // (R, I)
  const float* wp = w.data<float>();  // (E, O, I)
  float* y = out.data<float>();       // (R, O)
  std::vector<GemmProblem> probs;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    probs.push_back({CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(O), static_cast<int>(rows), static_cast<int>(I),
                     wp + e * O * I, static_cast<int>(I), x + r0 * I, static_cast<int>(I), 0.0f, y + r0 * O,
                     static_cast<int>(O)});
  }
  GroupedGemm(*this, kOp, probs);
}

// Per expert:
//   din_e [n_e, I] += dout_e [n_e, O] w_e [O, I]    one grouped call: cuBLAS (N, N), m = I, n = n_e, k = O
//   dw_e  [O, I]   += dout_e^T [O, n_e] in_e        ChunkedWeightGrad: (N, T), m = I, n = O, k = chunk rows
void CudaBackend::GroupedLinearBackward(Tensor& din, Tensor& dw, const Tensor& dout, const Tensor& in, const Tensor& w,
                                        const Tensor& offsets) {
  static const char* kOp = "GroupedLinearBackward";
  if (failed() || !RequireF32(*this, kOp, {&dout, &in, &w})) return;
  if ((din.defined() && !RequireF32(*this, kOp, {&din})) || (dw.defined() && !RequireF32(*this, kOp, {&dw}))) return;
  if (!ShapeOk(*this, kOp, w.ndim() == 3, "w " + w.ShapeString() + " is not [E, O, I]")) return;
  const int64_t E = w.dim(0), O = w.dim(1), I = w.dim(2), R = in.rows();
  if (!ShapeOk(*this, kOp,
               in.cols() == I && (!din.defined() || din.numel() == in.numel()) &&
                   (!dw.defined() || dw.numel() == w.numel()) && dout.cols() == O && dout.rows() == R,
               "din " + din.ShapeString() + ", dw " + dw.ShapeString() + ", dout " + dout.ShapeString() + ", in " +
                   in.ShapeString() + ", w " + w.ShapeString()))
    return;
  if (!CublasDimsOk(*this, kOp, {R, O, I})) return;
  std::vector<int32_t> off;
  if (!ReadOffsets(*this, kOp, offsets, E, R, &off)) return;
  if (O == 0 || I == 0) return;                             // nothing to add
  const float* x = in.data<float>();                        // (R, I)
  const float* wp = w.data<float>();                        // (E, O, I)
  const float* dy = dout.data<float>();                     // (R, O)
  float* dx = din.defined() ? din.data<float>() : nullptr;  // (R, I)
  float* dwp = dw.defined() ? dw.data<float>() : nullptr;   // (E, O, I)
  std::vector<GemmProblem> input_grads;
  for (int64_t e = 0; dx && e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    input_grads.push_back({CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(I), static_cast<int>(rows), static_cast<int>(O),
                           wp + e * O * I, static_cast<int>(I), dy + r0 * O, static_cast<int>(O), 1.0f, dx + r0 * I,
                           static_cast<int>(I)});
  }
  if (!input_grads.empty()) GroupedGemm(*this, kOp, input_grads);
  if (dwp == nullptr) return;
  if (ChunkedWeightGrad(*this, kOp, dwp, x, dy, off, E, I, O)) return;
  // Shapes too large for the chunk scratch: each expert's GEMM then fills
  // the GPU by itself, and the grouped call (which cuBLAS may run as one
  // launch per problem) is fast enough.
  std::vector<GemmProblem> weight_grads;
  for (int64_t e = 0; e < E; ++e) {
    const int64_t r0 = off[e], rows = off[e + 1] - off[e];
    if (rows == 0) continue;
    weight_grads.push_back({CUBLAS_OP_N, CUBLAS_OP_T, static_cast<int>(I), static_cast<int>(O), static_cast<int>(rows),
                            x + r0 * I, static_cast<int>(I), dy + r0 * O, static_cast<int>(O), 1.0f, dwp + e * O * I,
                            static_cast<int>(I)});
  }
  GroupedGemm(*this, kOp, weight_grads);
}

}  // namespace troupe
