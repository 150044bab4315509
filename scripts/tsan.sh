#!/usr/bin/env bash
# The code where threads share state, under ThreadSanitizer: the in-process
# process group and collectives, the pipeline runner's F&B pairs on two
# threads (every dist trainer layout runs its ranks as threads), the
# overlap meter and the device (NCCL) paths driven by CPU stand-ins. Builds
# into build-tsan/ (no CUDA) and runs them. Part of scripts/test.sh, so CI
# runs it too.
#
# The ZeroMQ group's tests are left out: libzmq is not built with TSan, and
# its I/O threads hand buffers over through lock-free pipes TSan cannot see,
# so every transfer reads as a race (scripts/tsan.supp silences the ones
# inside libzmq; the hand-offs to our code would still be reported).
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B build-tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTROUPE_CUDA=OFF -DTROUPE_TSAN=ON \
  -DTROUPE_FUZZ=OFF "${launcher[@]}" >/dev/null
cmake --build build-tsan -j "$(nproc)" --target overlap_test process_group_test dist_trainer_test moe_ep_test bucket_device_test
cd build-tsan
export TSAN_OPTIONS="halt_on_error=1 suppressions=$PWD/../scripts/tsan.supp"
ctest --output-on-failure -j "$(nproc)" \
  -R "^(OverlapMeter|CommWaitObserver|ExpertExchangeHalves|MoeEpDeviceRows|Zero1/BucketDevicePath|LocalGroup|LocalCollectivesScalar|[A-Za-z]*/?LocalCollectives|Layouts/DistributedEquivalence|DistributedTrainer)[./]" "$@"
