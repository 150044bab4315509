#!/usr/bin/env bash
# The actor code under AddressSanitizer + UndefinedBehaviorSanitizer: builds
# the transport, cluster, process-group, distributed-trainer and -checkpoint tests and the
# CLI (no CUDA) into build-asan/ and runs them. Part of scripts/test.sh, so CI runs it too.
set -euo pipefail
cd "$(dirname "$0")/.."
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DTROUPE_CUDA=OFF -DTROUPE_SANITIZE=ON \
  -DTROUPE_FUZZ=OFF "${launcher[@]}" >/dev/null
targets=(troupe)
for t in tests/transport_*_test.cpp tests/cluster_*_test.cpp tests/process_group_test.cpp tests/dist_trainer_test.cpp \
  tests/dist_checkpoint_test.cpp; do
  targets+=("$(basename "${t%.cpp}")")
done
cmake --build build-asan -j "$(nproc)" --target "${targets[@]}"
cd build-asan
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
ctest --output-on-failure -j "$(nproc)" \
  -R "^(Crc32c|Envelope|Codec|KeysTest|Socket[A-Za-z]*|ClusterTest|Membership|StateStoreTest|StateStore|JobTracker|PlanRanks|RankRendezvous|ChunkOf|FileRendezvous|LocalCollectivesScalar|LocalGroup|ZmqGroupTest|[A-Za-z]*/?LocalCollectives|Layouts/DistributedEquivalence|DistributedTrainer|DistCheckpoint|Layouts/ResumeInAnotherLayout)[./]" "$@"
