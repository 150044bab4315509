#!/usr/bin/env bash
# The test command of the README (and of .ci/run): set up, build, run ctest, then
# the ASan/UBSan (scripts/sanitize.sh) and TSan (scripts/tsan.sh) runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
cd build && ctest --output-on-failure -j "$(nproc)" --label-exclude "slow|bench" "$@"
cd .. && scripts/sanitize.sh
scripts/tsan.sh

