#!/usr/bin/env bash
# The main job of the README: set up, build, prepare the Brown corpus once,
# then run a local cluster (coordinator + 2 nodes) that trains the tiny MoE
# model, HTTP API on 127.0.0.1:8080. Extra args go to `troupe run`;
# `--train-only` trains in one process with `troupe train` instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/build.sh
if [ ! -f data/brown/train_000.bin ]; then
  build/cli/troupe data brown --out data/brown --vocab-size 2048
fi
if [ "${1:-}" = "--train-only" ]; then
  shift
  exec build/cli/troupe train --config configs/tiny.toml "$@"
fi
exec build/cli/troupe run configs/tiny.toml --nodes 2 --http 127.0.0.1:8080 "$@"
