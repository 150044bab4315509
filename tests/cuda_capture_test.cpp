// Checkpoint capture on the GPU: CopyToHostAsync copies on a side stream
// into page-locked memory while later kernels run, and FenceHostCopies
// keeps a kernel that overwrites a copied tensor behind the copy; a Trainer
// capture taken that way is the state at the capture, although training has
// gone on by the time its bytes are read. Skipped (with the reason) where no
// CUDA device is usable.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "gpu/host_io.h"
#include "small_job.h"
#include "test_util.h"
#include "train/trainer.h"

#if defined(TROUPE_HAVE_CUDA)
#include "gpu/cuda/cuda_backend.h"
#endif

namespace troupe {
namespace {

#if defined(TROUPE_HAVE_CUDA)

std::unique_ptr<CudaBackend> MakeGpu() {
  auto be = CudaBackend::Create(0, MatmulPrecision::kFp32);
  return be.ok() ? std::move(be).value() : nullptr;
}

// 64 Mi floats (256 MiB): the copy takes milliseconds, long enough for an
// unfenced kernel to overtake it.
TEST(CudaCaptureTest, BackgroundCopyIsTheTensorAsItWasWhenQueued) {
  auto be = MakeGpu();
  if (!be) GTEST_SKIP() << "no CUDA device";
  const int64_t n = 64 << 20;
  auto x = be->Alloc({n / 1024, 1024}, DType::kF32, "x");
  ASSERT_TRUE(x.ok()) << x.status().message();
  std::vector<float> values(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) values[i] = static_cast<float>(i % 4093) * 0.25f;
  FromHostFloats(*be, *x, values);
  std::shared_ptr<uint8_t> staging = be->AllocStagingHost(x->bytes());
  ASSERT_NE(staging, nullptr);
  std::memset(staging.get(), 0xff, x->bytes());
  auto copies = be->CopyToHostAsync({{staging.get(), &*x}});
  ASSERT_TRUE(copies.ok()) << copies.status().message();
  be->FenceHostCopies();
  be->Scale(*x, 2.0);  // queued right behind the copy: must not be seen by it
  ASSERT_TRUE((*copies)->Wait().ok());
  EXPECT_EQ(std::memcmp(staging.get(), values.data(), x->bytes()), 0) << "the copy saw a later write";
  const std::vector<float> now = ToHostFloats(*be, *x);
  EXPECT_EQ(now[4092], values[4092] * 2.0f) << "the kernel behind the fence did not run";
  EXPECT_TRUE(be->Synchronize().ok());
}

TEST(CudaCaptureTest, TrainerCaptureIsTheStateAtTheCaptureWhileTrainingGoesOn) {
  auto be = MakeGpu();
  if (!be) GTEST_SKIP() << "no CUDA device";
  testing::TempDir dir;
  JobConfig job = testing::SmallJob(dir.path());
  auto t = Trainer::Create(*be, job);
  ASSERT_TRUE(t.ok()) << t.status().message();
  for (int s = 0; s < 3; ++s) ASSERT_TRUE((*t)->Step().ok());
  auto snap = (*t)->Capture({{"loss", 1.0}});
  ASSERT_TRUE(snap.ok()) << snap.status().message();
  // The same state, copied synchronously (nothing queued in between).
  std::map<std::string, std::vector<float>> want;
  for (ParamRef& p : ListParams((*t)->model().params())) want[p.name] = ToHostFloats(*be, *p.tensor);
  for (int s = 0; s < 2; ++s) ASSERT_TRUE((*t)->Step().ok());  // overwrites every weight
  ASSERT_TRUE(snap->WaitReady().ok());
  int compared = 0;
  for (const ckpt::HostTensor& h : snap->tensors) {
    auto it = want.find(h.name);
    if (it == want.end()) continue;
    ASSERT_EQ(h.data().size(), it->second.size() * sizeof(float)) << h.name;
    EXPECT_EQ(std::memcmp(h.data().data(), it->second.data(), h.data().size()), 0) << h.name;
    ++compared;
  }
  EXPECT_EQ(compared, static_cast<int>(want.size()));
  // A second capture while the first snapshot lives gets its own arena.
  auto second = (*t)->Capture({});
  ASSERT_TRUE(second.ok());
  ASSERT_TRUE(second->WaitReady().ok());
  EXPECT_NE(second->tensors[0].data().data(), snap->tensors[0].data().data());
}

#else

TEST(CudaCaptureTest, NotBuilt) { GTEST_SKIP() << "no CUDA device: built without TROUPE_CUDA"; }

#endif

}  // namespace
}  // namespace troupe
