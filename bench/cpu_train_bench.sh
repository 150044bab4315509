#!/usr/bin/env bash
# CPU training speed: troupe vs the PyTorch twin (bench/torch_reference.py
# train-bench) on the same initial weights, data and thread count.
#
#   bench/cpu_train_bench.sh [-s STEPS] [-t "THREADS ..."] [-b TROUPE_BINARY] [CONFIG.toml ...]
#
# Defaults: 30 timed steps, threads = nproc, build/cli/troupe (a Release build:
# scripts/build.sh), configs/tiny.toml and configs/small10m.toml. Both sides
# run S + 2 steps and time the last S (2 warm-up steps): troupe's figure is
# tokens / summed step time over steps 3..S+2, from its per-step log lines
# (the script runs it on a copy of the config with log_every = 1 and
# eval_every = 0, so no evaluation falls inside the timed steps); torch's is
# train-bench's tokens_per_s (AdamW, clip, bias update: the same step).
# Not part of ctest. Prints a markdown table; ratio = troupe / torch (> 1:
# troupe is faster). Both sides use OpenMP, whose spinning barriers collapse
# when the cores are shared: the load column flags rows taken on a busy machine.
set -euo pipefail
cd "$(dirname "$0")/.."

steps=30
threads_list="$(nproc)"
troupe=build/cli/troupe
python=${TORCH_PYTHON:-/usr/bin/python3}  # Debian's has torch; TORCH_PYTHON overrides (e.g. the GPU host's venv)
while getopts "s:t:b:h" opt; do
  case $opt in
    s) steps=$OPTARG ;;
    t) threads_list=$OPTARG ;;
    b) troupe=$OPTARG ;;
    *) sed -n '2,16p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
configs=("$@")
[ ${#configs[@]} -gt 0 ] || configs=(configs/tiny.toml configs/small10m.toml)

[ -x "$troupe" ] || { echo "no $troupe: build first (scripts/build.sh) or pass -b" >&2; exit 1; }
"$python" -c "import torch" 2>/dev/null || { echo "$python cannot import torch" >&2; exit 1; }
shard=data/brown/train_000.bin
if [ ! -f "$shard" ]; then
  echo "creating $shard (troupe data brown)" >&2
  "$troupe" data brown --out data/brown >&2
fi

work=$(mktemp -d /tmp/troupe_cpu_bench.XXXXXX)
trap 'rm -rf "$work"' EXIT
warm=2

rows=()
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .toml)
  for key in log_every eval_every; do
    grep -q "^$key *=" "$cfg" || { echo "$cfg has no $key line" >&2; exit 1; }
  done
  bench_cfg="$work/$name.toml"
  sed -e 's/^log_every *=.*/log_every = 1/' -e 's/^eval_every *=.*/eval_every = 0/' "$cfg" >"$bench_cfg"
  weights="$work/$name.safetensors"
  "$troupe" export --config "$cfg" --out "$weights" >/dev/null
  for n in $threads_list; do
    load=$(cut -d' ' -f1 /proc/loadavg)  # other work on the machine skews both sides: reported per row
    log="$work/$name.t$n.log"
    "$troupe" train --config "$bench_cfg" --weights "$weights" --steps $((steps + warm)) --threads "$n" --device cpu \
      --out "$work/run_$name" >"$log"
    # "step     3/32 | loss ... | 6127 tok/s": harmonic mean over the timed steps
    # (every step has the same B*T tokens, so this is tokens / time).
    ours=$(awk -v w=$warm '/^step .*\| loss .* tok\/s$/ {
             split($2, s, "/"); if (s[1] + 0 > w) { n++; inv += 1 / $(NF - 1) } }
           END { if (n) printf "%.0f", n / inv; else print "nan" }' "$log")
    json=$("$python" bench/torch_reference.py train-bench --config "$cfg" --weights "$weights" \
      --tokens "$shard" --steps "$steps" --threads "$n")
    theirs=$("$python" -c 'import json,sys; print("%.0f" % json.loads(sys.argv[1])["tokens_per_s"])' "$json")
    ratio=$(awk -v a="$ours" -v b="$theirs" 'BEGIN { printf "%.2f", a / b }')
    load="$load-$(cut -d' ' -f1 /proc/loadavg)"
    echo "$name threads=$n: troupe $ours tok/s, torch $theirs tok/s, load $load (torch: $json)" >&2
    rows+=("| $name | $n | $ours | $theirs | $ratio | $load |")
  done
done

echo "CPU training throughput, $steps timed steps after $warm warm-up steps (tokens/s; ratio = troupe / torch;"
echo "load = 1-minute load average before-after the row: above ~0.5 other work competed for the $(nproc) cores)"
echo
echo "| config | threads | troupe tok/s | torch tok/s | ratio | load |"
echo "|---|---:|---:|---:|---:|---|"
printf '%s\n' "${rows[@]}"
