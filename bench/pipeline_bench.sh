#!/usr/bin/env bash
# Pipeline schedules on one model, measured: 1F1B, ZB1P, DualPipe, DualPipeV
# as real processes (one per rank, CURVE ZeroMQ over loopback), CPU backend.
#
#   bench/pipeline_bench.sh [-c CONFIG] [-p PP] [-m MICRO_BATCHES] [-B BATCH] [-s STEPS] [-t THREADS_PER_RANK] [-b TROUPE]
#
# Defaults: configs/small10m.toml, pp 4, 8 micro-batches, 8 steps, threads =
# nproc / pp, build/cli/troupe; -B overrides the config's train.batch_size
# (bigger micro-batches: chunk compute grows, per-transfer latency does not). For each schedule it runs `troupe train --pp
# P --schedule S` and takes rank 0's closing lines: the bubble measured from
# every rank's chunk start/end records (steps 2..S), the bubble the BRIEF's
# table predicts from the measured chunk times, the same schedule simulated
# with those times, and training tokens/s. Prints a markdown table; "vs 1f1b"
# is tokens/s over 1F1B's in the same run. Needs pp x threads cores to mean
# anything: ranks that share cores stretch each other's chunks.
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/small10m.toml
pp=4
micro=8
steps=8
troupe=build/cli/troupe
threads=""
batch=""
while getopts "c:p:m:s:t:b:B:h" opt; do
  case $opt in
    c) config=$OPTARG ;;
    p) pp=$OPTARG ;;
    m) micro=$OPTARG ;;
    s) steps=$OPTARG ;;
    t) threads=$OPTARG ;;
    b) troupe=$OPTARG ;;
    B) batch=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
[ -n "$threads" ] || threads=$(( $(nproc) / pp > 0 ? $(nproc) / pp : 1 ))
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ -n "$batch" ]; then
  sed -E "s/^batch_size *=.*/batch_size = $batch/" "$config" >"$out/config.toml"
  config_name="$config with batch_size $batch"
  config="$out/config.toml"
else
  config_name=$config
fi

echo "config $config_name, pp $pp, $micro micro-batches, $steps steps, $threads threads per rank, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
echo
echo "| schedule | bubble measured | formula | simulated | chunk times (ms) | receive wait rank 0 (ms/step) | tokens/s | vs 1f1b |"
echo "|---|---|---|---|---|---|---|---|"
base=""
for sched in 1f1b zb1p dualpipe dualpipev; do
  log="$out/$sched.log"
  if ! "$troupe" train --config "$config" --pp "$pp" --schedule "$sched" --micro-batches "$micro" --steps "$steps" \
      --threads "$threads" --out "$out/$sched" >"$log" 2>&1; then
    echo "| $sched | refused: $(grep -o 'error: .*' "$log" | head -1) | | | | | | |"
    continue
  fi
  bubble=$(grep '^bubble' "$log")
  measured=$(sed -E 's/.*measured ([0-9.]+%).*/\1/' <<<"$bubble")
  formula=$(sed -E 's/.*formula predicts ([0-9.]+%).*/\1/' <<<"$bubble")
  simulated=$(sed -E 's/.*chunk times ([0-9.]+%).*/\1/' <<<"$bubble")
  wait=$(sed -E 's/.*receive waits ([0-9.]+) ms.*/\1/' <<<"$bubble")
  chunks=$(grep '^pipeline' "$log" | sed -E 's/.*sync; //')
  tps=$(grep '^done:' "$log" | sed -E 's/.*; ([0-9]+) training tokens.*/\1/')
  [ -n "$base" ] || base=$tps
  ratio=$(awk -v a="$tps" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
  echo "| $sched | $measured | $formula | $simulated | $chunks | $wait | $tps | $ratio |"
done
