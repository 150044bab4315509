#!/usr/bin/env bash
# Configures and builds Troupe into build/ (Release). Extra args go to cmake.
set -euo pipefail
cd "$(dirname "$0")/.."
cuda_flag=()
if [ ! -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then cuda_flag=(-DTROUPE_CUDA=OFF); fi
launcher=()
if command -v ccache >/dev/null; then launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache); fi
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release "${cuda_flag[@]}" "${launcher[@]}" "$@" >/dev/null
cmake --build build -j "$(nproc)"
