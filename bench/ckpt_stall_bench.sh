#!/usr/bin/env bash
# What checkpoints cost training, end to end: the same `troupe train` run with
# saves every EVERY steps and without any, same binary and machine,
# alternating, ROUNDS times each.
#
#   [TROUPE_BIN=build/cli/troupe] bench/ckpt_stall_bench.sh [CONFIG] [STEPS] [EVERY] [ROUNDS] [-- troupe train flags]
#
# Defaults: configs/tiny.toml, 200 steps, a save every 50, 2 rounds. Per run:
# T = the time spent in training steps ("time:" line) + the captures' host
# time ("checkpoint stall:" line). A capture that overlaps the next step (the
# GPU's background copy) shows up as slower steps, so T counts it either way.
#   stall share = (median T with saves - median T without) / median T without
# i.e. the training time saves cost, as a share of the training time. Also
# printed: troupe's own capture times. Checkpoints go to a fresh folder under
# OUT (default /tmp/troupe_ckpt_stall).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${TROUPE_BIN:-build/cli/troupe}
config=${1:-configs/tiny.toml}
steps=${2:-200}
every=${3:-50}
rounds=${4:-2}
shift $(($# < 4 ? $# : 4))
[ "${1:-}" = "--" ] && shift
out=${OUT:-/tmp/troupe_ckpt_stall}
[ -x "$bin" ] || { echo "ckpt_stall_bench: no troupe binary at $bin (set TROUPE_BIN)" >&2; exit 1; }
run() {  # $1 = every; prints "T captures..." for one run
  rm -rf "$out/run"
  local log
  log=$("$bin" train --config "$config" --steps "$steps" --checkpoint-every "$1" --out "$out/run" "${@:2}" 2>&1) || {
    echo "$log" >&2
    echo "ckpt_stall_bench: troupe train failed" >&2
    exit 1
  }
  local step_s stall_s caps
  step_s=$(echo "$log" | sed -n 's/^time: \([0-9.]*\) s in.*/\1/p')
  stall_s=$(echo "$log" | sed -n 's/^checkpoint stall: \([0-9.]*\) s in all.*/\1/p')
  caps=$(echo "$log" | sed -n 's/^checkpoint: step [0-9]* captured in \([0-9.]*\) ms.*/\1/p' | tr '\n' ' ')
  echo "$(python3 -c "print(${step_s:-0} + ${stall_s:-0})") ${caps}"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
with=(); without=(); captures=""
for r in $(seq "$rounds"); do
  line=$(run "$every" "$@"); with+=("${line%% *}"); captures+=" ${line#* }"
  line=$(run 0 "$@"); without+=("${line%% *}")
  echo "round $r: with saves ${with[-1]} s, without ${without[-1]} s" >&2
done
tw=$(printf '%s\n' "${with[@]}" | median)
tn=$(printf '%s\n' "${without[@]}" | median)
echo "config $config, $steps steps, a save every $every steps, $rounds rounds; binary $bin"
echo "training time (steps + capture stalls), median: with saves $tw s, without $tn s"
echo "capture (host stall) per save, ms:$captures"
python3 -c "print('stall share: %.2f%% of training time (target <= 5%%)' % (100.0 * ($tw - $tn) / $tn))"
