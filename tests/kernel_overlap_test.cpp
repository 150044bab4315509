// The overlap of communication kernels with compute kernels, from a
// device's kernel record (gpu/kernel_overlap.h): unions per kind, then the
// part of the communication time some compute kernel covered.
#include "gpu/kernel_overlap.h"

#include <gtest/gtest.h>

namespace troupe {
namespace {

KernelSpan Comm(uint64_t a, uint64_t b) { return {a, b, true}; }
KernelSpan Compute(uint64_t a, uint64_t b) { return {a, b, false}; }

TEST(KernelOverlap, CountsTheCommunicationTimeComputeCovered) {
  const KernelOverlap o = OverlapOf({Comm(0, 100), Compute(50, 150)});
  EXPECT_DOUBLE_EQ(o.comm_s, 100e-9);
  EXPECT_DOUBLE_EQ(o.compute_s, 100e-9);
  EXPECT_DOUBLE_EQ(o.hidden_s, 50e-9);
  EXPECT_EQ(o.comm_kernels, 1);
  EXPECT_EQ(o.compute_kernels, 1);
}

TEST(KernelOverlap, OverlappingKernelsOfOneKindCountOnce) {
  // Two communication kernels on two streams, [0, 200) together; compute on
  // three streams covers [0, 10) and [150, 300) of it, twice over in places.
  const KernelOverlap o =
      OverlapOf({Compute(250, 300), Comm(50, 200), Compute(0, 10), Comm(0, 100), Compute(150, 260), Compute(5, 8)});
  EXPECT_DOUBLE_EQ(o.comm_s, 200e-9);
  EXPECT_DOUBLE_EQ(o.compute_s, (10 + 150) * 1e-9);
  EXPECT_DOUBLE_EQ(o.hidden_s, (10 + 50) * 1e-9);
  EXPECT_EQ(o.comm_kernels, 2);
  EXPECT_EQ(o.compute_kernels, 4);
}

TEST(KernelOverlap, DisjointEmptyAndInvertedSpans) {
  EXPECT_DOUBLE_EQ(OverlapOf({Comm(0, 100), Compute(100, 200)}).hidden_s, 0.0);  // touching is not overlapping
  EXPECT_DOUBLE_EQ(OverlapOf({}).comm_s, 0.0);
  const KernelOverlap o = OverlapOf({Comm(100, 50), Compute(0, 1000), Comm(7, 7)});
  EXPECT_DOUBLE_EQ(o.comm_s, 0.0);
  EXPECT_DOUBLE_EQ(o.hidden_s, 0.0);
}

TEST(KernelOverlap, NcclKernelsAreCommunication) {
  EXPECT_TRUE(IsCommKernel("ncclDevKernel_SendRecv"));
  EXPECT_TRUE(IsCommKernel("_Z28ncclDevKernel_AllReduce_Sum_f32_RING_LL24ncclDevKernelArgsStorageILm4096EE"));
  EXPECT_FALSE(IsCommKernel("ampere_sgemm_128x64_nn"));
  EXPECT_FALSE(IsCommKernel("_ZN6troupe12_GLOBAL__N_19AddKernelEPfPKfS3_l"));
}

}  // namespace
}  // namespace troupe
