#!/usr/bin/env bash
# The main job of the README: set up, build, prepare the Brown corpus once,
# then train the tiny MoE model. Extra args go to `troupe train`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
if [ ! -f data/brown/train_000.bin ]; then
  build/cli/troupe data brown --out data/brown --vocab-size 2048
fi
exec build/cli/troupe train --config configs/tiny.toml "$@"
