#!/usr/bin/env bash
# Pipeline schedules on one model, measured: 1F1B, ZB1P, DualPipe, DualPipeV
# as real processes (one per rank, CURVE ZeroMQ over loopback), CPU backend.
#
#   bench/pipeline_bench.sh [-c CONFIG] [-p PP] [-e EP] [-m MICRO_BATCHES] [-B BATCH] [-s STEPS] [-t THREADS_PER_RANK] [-d DEVICE] [-n DEVICE_COMM] [-b TROUPE]
#
# Defaults: configs/small10m.toml, pp 4, ep 1, 8 micro-batches, 8 steps,
# threads = nproc / (pp ep), device cpu, build/cli/troupe; -B overrides the config's
# train.batch_size (bigger micro-batches: chunk compute grows, per-transfer
# latency does not). For each schedule it runs `troupe train --pp P --ep E
# --schedule S` and takes rank 0's closing lines: the bubble measured from
# every rank's chunk start/end records (steps 2..S), the bubble the BRIEF's
# table predicts from the measured chunk times, the same schedule simulated
# with those times, the chunks' receive waits (pipeline transfers and expert
# all-to-alls, summed over ranks) and the share of them hidden behind the
# other chunk of an F&B pair, and training tokens/s. DualPipe and DualPipeV
# run twice: with parallel.overlap_pairs = "on" (pairs on two threads) and
# "off" (F then B on one thread: the -serial rows). Prints a markdown table; "vs 1f1b" is
# tokens/s over 1F1B's in the same run. Needs pp x ep x threads cores to mean
# anything: ranks that share cores stretch each other's chunks. On GPUs
# (-d cuda) -n sets parallel.device_comm (auto, nccl, host): how gradient
# buckets, expert rows and stage-to-stage transfers travel (docs/parallel.md, "NCCL on GPU ranks"),
# and the runs take --kernel-timeline: the "device" column is the share of
# the NCCL kernels' time during which compute kernels ran (CUPTI records).
set -euo pipefail
cd "$(dirname "$0")/.."

config=configs/small10m.toml
pp=4
ep=1
device=cpu
micro=8
steps=8
troupe=build/cli/troupe
threads=""
batch=""
device_comm=auto
while getopts "c:p:e:m:s:t:d:n:b:B:h" opt; do
  case $opt in
    c) config=$OPTARG ;;
    p) pp=$OPTARG ;;
    e) ep=$OPTARG ;;
    d) device=$OPTARG ;;
    n) device_comm=$OPTARG ;;
    m) micro=$OPTARG ;;
    s) steps=$OPTARG ;;
    t) threads=$OPTARG ;;
    b) troupe=$OPTARG ;;
    B) batch=$OPTARG ;;
    *) sed -n '2,23p' "$0"; exit 2 ;;
  esac
done
ranks=$((pp * ep))
[ -n "$threads" ] || threads=$(( $(nproc) / ranks > 0 ? $(nproc) / ranks : 1 ))
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
if [ -n "$batch" ]; then
  sed -E "s/^batch_size *=.*/batch_size = $batch/" "$config" >"$out/config.toml"
  config_name="$config with batch_size $batch"
  config="$out/config.toml"
else
  config_name=$config
fi

# The config with parallel.overlap_pairs set to $1 (and device_comm), into $out/pairs-$1.toml.
with_pairs() {
  if grep -q '^\[parallel\]' "$config"; then
    sed -E "/^\[parallel\]/a overlap_pairs = \"$1\"\ndevice_comm = \"$device_comm\"" "$config" >"$out/pairs-$1.toml"
  else
    { cat "$config"; printf '\n[parallel]\noverlap_pairs = "%s"\ndevice_comm = "%s"\n' "$1" "$device_comm"; } >"$out/pairs-$1.toml"
  fi
}
with_pairs on
with_pairs off

echo "config $config_name, device $device (device_comm $device_comm), pp $pp, ep $ep, $micro micro-batches, $steps steps, $threads threads per rank, $(nproc) cores, load $(cut -d' ' -f1 /proc/loadavg)"
echo
echo "| schedule | bubble measured | formula | simulated | chunk times (ms) | chunk waits (ms/step, all ranks) | hidden by pairs | device: NCCL time overlapped | tokens/s | vs 1f1b |"
echo "|---|---|---|---|---|---|---|---|---|---|"
base=""
timeline=()
[ "$device" = cuda ] && timeline=(--kernel-timeline)
for run in 1f1b zb1p dualpipe dualpipe-serial dualpipev dualpipev-serial; do
  sched=${run%-serial}
  cfg=$out/pairs-on.toml
  [ "$run" = "$sched" ] || cfg=$out/pairs-off.toml
  log="$out/$run.log"
  if ! "$troupe" train --config "$cfg" --pp "$pp" --ep "$ep" --schedule "$sched" --micro-batches "$micro" --steps "$steps" \
      --device "$device" --threads "$threads" --out "$out/$run" "${timeline[@]}" >"$log" 2>&1; then
    echo "| $run | refused: $(grep -o 'error: .*' "$log" | head -1) | | | | | | | | |"
    continue
  fi
  bubble=$(grep '^bubble' "$log")
  measured=$(sed -E 's/.*measured ([0-9.]+%).*/\1/' <<<"$bubble")
  formula=$(sed -E 's/.*formula predicts ([0-9.]+%).*/\1/' <<<"$bubble")
  simulated=$(sed -E 's/.*chunk times ([0-9.]+%).*/\1/' <<<"$bubble")
  comm=$(grep '^communication' "$log")
  wait=$(sed -E 's/.*waited ([0-9.]+) ms.*/\1/' <<<"$comm")
  hidden=$(grep -o '[0-9.]*% of it hidden' <<<"$comm" | sed 's/ of it hidden//' || true)
  chunks=$(grep '^pipeline' "$log" | grep -v '^pipeline transfers' | sed -E 's/.*sync; //')
  overlapped=$(grep '^device timeline' "$log" | grep -o '([0-9.]*% of it hidden)' | tr -d '()' | sed 's/ of it hidden//' || true)
  tps=$(grep '^done:' "$log" | sed -E 's/.*; ([0-9]+) training tokens.*/\1/')
  [ -n "$base" ] || base=$tps
  ratio=$(awk -v a="$tps" -v b="$base" 'BEGIN { printf "%.2f", a / b }')
  echo "| $run | $measured | $formula | $simulated | $chunks | $wait | ${hidden:--} | ${overlapped:--} | $tps | $ratio |"
done
