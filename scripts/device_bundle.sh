#!/usr/bin/env bash
# Packs what the GPU machine needs into .device/ (ignored by git): the built
# binaries plus the Debian .so files they link (CAF, ZeroMQ, RocksDB,
# OpenBLAS, ...). CUDA's own libraries and glibc come from the GPU image.
# The folder is packed into .device.tar.xz (the transfer limit is 64 MiB and
# OpenBLAS alone is 36 MiB unpacked); on the GPU machine:
#   tar -xJf .device.tar.xz && export LD_LIBRARY_PATH=$PWD/.device/lib
# Usage: scripts/device_bundle.sh [binary ...]   (default: troupe + tests)
set -euo pipefail
cd "$(dirname "$0")/.."
for p in /.device/ /.device.tar.xz; do grep -qx "$p" .git/info/exclude 2>/dev/null || echo "$p" >> .git/info/exclude; done
rm -rf .device && mkdir -p .device/bin .device/lib
bins=("$@")
if [ ${#bins[@]} -eq 0 ]; then bins=(build/cli/troupe build/tests/*_test); fi
# The CUDA module is dlopen'ed by troupe, so ldd cannot see it: add it and its needs.
if [ -f build/gpu/libtroupe_cuda.so ]; then cp build/gpu/libtroupe_cuda.so .device/lib/; bins+=(build/gpu/libtroupe_cuda.so); fi
for b in "${bins[@]}"; do [[ $b == *.so ]] || cp "$b" .device/bin/; done
skip='^(libc|libm|libdl|librt|libpthread|ld-linux-x86-64|libcuda|libcudart|libcublas|libcublasLt|libnccl|libnvidia|linux-vdso)\.'
for b in "${bins[@]}"; do ldd "$b"; done | awk '/=> \//{print $3}' | sort -u | while read -r lib; do
  name=$(basename "$lib")
  [[ $name =~ $skip ]] && continue
  cp -L "$lib" .device/lib/
done
# CUPTI (the kernel timeline) is dlopen'ed too, and its records must match
# the headers it was built with: bring ours.
for c in /usr/local/cuda/lib64/libcupti.so.13 /usr/local/cuda/extras/CUPTI/lib64/libcupti.so.13; do
  [ -f "$c" ] && cp -L "$c" .device/lib/ && break
done
strip --strip-unneeded .device/bin/* .device/lib/* 2>/dev/null || true
tar -cJf .device.tar.xz .device
du -sh .device .device.tar.xz
