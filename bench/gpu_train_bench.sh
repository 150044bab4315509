#!/usr/bin/env bash
# GPU training speed: troupe vs the PyTorch twin on the same initial weights,
# shard and batch, with MFU.
#
#   [TROUPE_BIN=build/cli/troupe] [PYTHON=python3] bench/gpu_train_bench.sh [CONFIG.toml] [STEPS]
#
# Defaults: configs/moe100m.toml, 20 timed steps. Environment:
#   TROUPE_BIN        troupe binary (default build/cli/troupe)
#   PYTHON            python with torch (default: python3 if it imports torch, else /usr/bin/python3)
#   OUT               if set, the report goes to $OUT/gpu_bench.txt (and stdout) and the raw
#                     logs to $OUT/gpu_bench_logs.txt (else: report on stdout, logs on stderr)
#   SHARD             token shard (default data/brown/train_000.bin)
#   DEVICE            cuda (default); cpu only to smoke-test the script (troupe bf16 is skipped)
#   PEAK_BF16_TFLOPS  dense bf16 tensor-core peak for MFU (default 989.4: H100 SXM)
#   PEAK_FP32_TFLOPS  fp32 (non-tensor-core) peak for MFU (default 67: H100 SXM)
#   COMPILE_TIMEOUT   seconds allowed for the torch.compile run (default 300)
#   PROFILE_STEPS     steps of the troupe --profile run (default 6; its table covers steps 2..N)
#
# Every run does STEPS + 3 optimizer steps and times the last STEPS (3 warm-up
# steps; torch.compile gets 8). Each step is the whole update: forward, backward,
# global-norm clip, AdamW, routing-bias update. troupe: trained on a copy of the
# config with log_every = 1, eval_every = 0 (evaluation only after the last step,
# outside the timed steps), eval_batches = 1; tok/s = B*T*STEPS / (sum of the
# step times of steps 4..STEPS+3), from its per-step lines (i.e. the harmonic
# mean of their tok/s). torch: bench/torch_reference.py train-bench (eager bf16
# autocast, eager fp32, torch.compile bf16), tok/s = B*T*STEPS / wall time of
# the timed steps between torch.cuda.synchronize() calls.
#
# MFU = tok/s * FLOPs per token / peak, with (L layers + D MTP modules, n_h
# heads, d_qk = qk_nope_head_dim + qk_rope_head_dim, d_v, T = seq_len):
#   FLOPs/token = 6 * N_active + 3 * (L + D) * n_h * (d_qk + d_v) * T
# 6 * N_active: 2 FLOPs per multiply-add of every active weight in the forward,
# x3 for forward + backward (troupe's "M active per token" of its `model:` line:
# routed experts count K/E; the V x d embedding it includes is a lookup, not a
# GEMM, but it stands in exactly for the second pass through the V x d lm_head
# made by the MTP module). Attention: per token and layer the forward's QK^T and
# PV cost 2 * T * n_h * (d_qk + d_v) with full attention, half that causal, x3
# for training. Peaks: bf16 rows against PEAK_BF16_TFLOPS, fp32 rows against
# PEAK_FP32_TFLOPS (troupe --precision fp32 and torch fp32 use true fp32 GEMMs:
# no TF32).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

cfg=${1:-configs/moe100m.toml}
steps=${2:-20}
warm=3
troupe=${TROUPE_BIN:-build/cli/troupe}
device=${DEVICE:-cuda}
shard=${SHARD:-data/brown/train_000.bin}
peak_bf16=${PEAK_BF16_TFLOPS:-989.4}
peak_fp32=${PEAK_FP32_TFLOPS:-67}
compile_timeout=${COMPILE_TIMEOUT:-300}
profile_steps=${PROFILE_STEPS:-6}
if [ -n "${PYTHON:-}" ]; then
  python=$PYTHON
elif python3 -c "import torch" 2>/dev/null; then
  python=python3
else
  python=/usr/bin/python3
fi

die() { echo "gpu_train_bench: $*" >&2; exit 1; }
[ -x "$troupe" ] || die "no troupe binary at $troupe (set TROUPE_BIN)"
[ -f "$cfg" ] || die "no config $cfg"
[ -f "$shard" ] || die "no token shard $shard (set SHARD, or bring data/brown along: it is git-ignored)"
"$python" -c "import torch" 2>/dev/null || die "$python cannot import torch (set PYTHON)"
for key in log_every eval_every eval_batches; do
  grep -q "^$key *=" "$cfg" || die "$cfg has no $key line"
done

if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  report=$OUT/gpu_bench.txt
  logs=$OUT/gpu_bench_logs.txt
  : >"$logs"
else
  report=/dev/stdout
  logs=/dev/stderr
fi
work=$(mktemp -d /tmp/troupe_gpu_bench.XXXXXX)
results=$work/results.jsonl
: >"$results"
summarized=0

log() { echo "$*" >>"$logs"; }
name=$(basename "$cfg" .toml)
bench_cfg=$work/$name.toml
sed -e 's/^log_every *=.*/log_every = 1/' -e 's/^eval_every *=.*/eval_every = 0/' \
    -e 's/^eval_batches *=.*/eval_batches = 1/' "$cfg" >"$bench_cfg"
weights=$work/init.safetensors

# One JSON line per run into $results. troupe's log -> tok/s over steps > warm,
# active params (model: line), peak memory (final val_loss line).
troupe_row() {  # precision log rc
  "$python" - "$1" "$2" "$3" "$warm" >>"$results" <<'EOF'
import json, re, sys
prec, path, rc, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
text = open(path, errors="replace").read()
row = {"system": "troupe", "mode": "native", "precision": prec, "tokens_per_s": None}
m = re.search(r"^model: ([0-9.]+)M parameters, ([0-9.]+)M active per token; batch (\d+) x (\d+)", text, re.M)
if m:
    row.update(params=float(m.group(1)) * 1e6, active_params=float(m.group(2)) * 1e6,
               batch_size=int(m.group(3)), seq_len=int(m.group(4)))
inv, n, ms = 0.0, 0, []
for s, rate in re.findall(r"^step +(\d+)/\d+ \| loss .*\| ([0-9.]+) tok/s$", text, re.M):
    if int(s) > warm and float(rate) > 0:
        inv += 1 / float(rate); n += 1
        if m:
            ms.append(1000 * row["batch_size"] * row["seq_len"] / float(rate))
if n:
    row["tokens_per_s"] = n / inv
    row["steps"] = n
    ms.sort()
    row["step_ms"] = sum(ms) / len(ms) if ms else None
    row["step_ms_median"] = ms[len(ms) // 2] if ms else None
p = re.findall(r"memory [0-9.]+ MiB \(peak ([0-9.]+)\)", text)
if p:
    row["peak_mem_bytes"] = float(p[-1]) * 1048576
d = re.search(r"^troupe train: .* on (.*)$", text, re.M)
if d:
    row["device_name"] = d.group(1)
if rc != 0 or not n:
    row["note"] = f"failed (exit {rc})" if rc != 0 else "no timed step lines"
print(json.dumps(row))
EOF
}

run_troupe() {  # precision
  local prec=$1 lg=$work/troupe_$1.log rc
  if [ "$device" != cuda ] && [ "$prec" = bf16 ]; then
    echo "{\"system\": \"troupe\", \"mode\": \"native\", \"precision\": \"bf16\", \"tokens_per_s\": null, \"note\": \"needs cuda\"}" >>"$results"
    return
  fi
  echo "== troupe train --precision $prec ($((steps + warm)) steps)" >&2
  "$troupe" train --config "$bench_cfg" --weights "$weights" --steps $((steps + warm)) --device "$device" \
    --precision "$prec" --out "$work/run_$prec" >"$lg" 2>&1
  rc=$?
  { echo "==== troupe train --precision $prec (exit $rc)"; cat "$lg"; } >>"$logs"
  troupe_row "$prec" "$lg" "$rc"
}

run_torch() {  # mode(eager|compile) precision
  local mode=$1 prec=$2 lg=$work/torch_$1_$2 rc extra=() to=()
  [ "$mode" = compile ] && extra=(--compile) && to=(timeout --signal=INT --kill-after=30 "$compile_timeout")
  [ "$mode" = eager ] && extra=(--warmup "$warm")
  echo "== torch train-bench $mode $prec ($steps steps)" >&2
  ${to[@]+"${to[@]}"} "$python" bench/torch_reference.py train-bench --config "$cfg" --weights "$weights" --tokens "$shard" \
    --steps "$steps" --device "$device" --precision "$prec" ${extra[@]+"${extra[@]}"} >"$lg.json" 2>"$lg.err"
  rc=$?
  { echo "==== torch train-bench $mode $prec (exit $rc)"; cat "$lg.json"; tail -c 6000 "$lg.err"; } >>"$logs"
  "$python" - "$mode" "$prec" "$lg.json" "$rc" "$compile_timeout" >>"$results" <<'EOF'
import json, sys
mode, prec, path, rc, tmo = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
row = {"system": "torch", "mode": mode, "precision": prec, "tokens_per_s": None}
try:
    row.update(json.loads(open(path).read().strip().splitlines()[-1]))
except Exception:  # noqa: BLE001
    row["note"] = f"timed out after {tmo}s" if rc in (124, 130, 137) else f"failed (exit {rc})"
if row.get("compile") == "unavailable":
    row["note"] = "compile unavailable: " + row.get("compile_error", "?")
row["mode"] = mode  # train-bench's own "compile" key says the same
print(json.dumps(row))
EOF
}

summarize() {
  [ "$summarized" = 1 ] && return
  summarized=1
  "$python" - "$results" "$cfg" "$steps" "$warm" "$peak_bf16" "$peak_fp32" "$device" "$work/profile.txt" >"$work/report.txt" <<'EOF'
import json, sys, tomllib
path, cfg_path, steps, warm, pk_bf16, pk_fp32, device, prof = sys.argv[1:9]
rows = [json.loads(l) for l in open(path) if l.strip()]
with open(cfg_path, "rb") as f:
    raw = tomllib.load(f)
m, t = raw.get("model", {}), raw.get("train", {})
L, D = m.get("num_hidden_layers", 4), m.get("num_nextn_predict_layers", 1)
nh, dh, dr, dv = m.get("num_attention_heads", 4), m.get("qk_nope_head_dim", 32), m.get("qk_rope_head_dim", 16), m.get("v_head_dim", 32)
T, B = t.get("seq_len", 64), t.get("batch_size", 8)
ours = [r for r in rows if r["system"] == "troupe" and r.get("active_params")]
theirs = [r for r in rows if r["system"] == "torch" and r.get("active_params")]
active = ours[0]["active_params"] if ours else (theirs[0]["active_params"] if theirs else None)
attn = 3 * (L + D) * nh * (dh + dr + dv) * T
peaks = {"bf16": float(pk_bf16) * 1e12, "fp32": float(pk_fp32) * 1e12}
out = []
p = out.append
dev = next((r.get("device_name") for r in rows if r["system"] == "torch" and r.get("device_name")), None) \
    or next((r.get("device_name") for r in rows if r.get("device_name")), device)
p(f"GPU training throughput: {cfg_path}, batch {B} x {T} tokens, {steps} timed steps after {warm} warm-up "
  f"steps (torch.compile: 8); device {dev}")
if active:
    flops = 6 * active + attn
    p(f"FLOPs/token = 6 * N_active + 3 * (L+D) * n_h * (d_qk + d_v) * T = 6 * {active / 1e6:.2f}M + "
      f"3 * {L + D} * {nh} * ({dh + dr} + {dv}) * {T} = {6 * active / 1e6:.1f}M + {attn / 1e6:.1f}M = {flops / 1e6:.1f}M")
    if theirs:
        p(f"N_active from troupe's model: line {active / 1e6:.2f}M; torch twin counts {theirs[0]['active_params']:,} "
          f"(total {theirs[0]['params']:,})")
else:
    flops = None
    p("FLOPs/token: unknown (no run reported its active parameters)")
p(f"MFU peaks: bf16 rows {pk_bf16} TFLOP/s (dense bf16 tensor core), fp32 rows {pk_fp32} TFLOP/s "
  f"(fp32 non-tensor core); H100 SXM figures: set PEAK_BF16_TFLOPS / PEAK_FP32_TFLOPS for another part")
p("")
base = next((r["tokens_per_s"] for r in rows if r["system"] == "torch" and r["mode"] == "eager"
             and r["precision"] == "bf16" and r.get("tokens_per_s")), None)
p("| system | precision | mode | tok/s | step ms (mean / median) | MFU | peak memory MiB | vs torch eager bf16 | note |")
p("|---|---|---|---:|---:|---:|---:|---:|---|")
for r in rows:
    tps = r.get("tokens_per_s")
    fmt = lambda v, f: (f % v) if v is not None else "n/a"  # noqa: E731
    mfu = tps * flops / peaks[r["precision"]] if tps and flops else None
    ms = r.get("step_ms")
    med = r.get("step_ms_median")
    pm = r.get("peak_mem_bytes")
    note = r.get("note", "")
    if r["system"] == "torch" and tps:
        note = (note + " " if note else "") + f"attention {r.get('attention')}, AdamW {r.get('adamw')}, torch {r.get('torch')}"
        if r["mode"] == "compile" and r.get("warmup_s") is not None:
            note += f", warm-up incl. compile {r['warmup_s']:.0f}s"
    p(f"| {r['system']} | {r['precision']} | {r['mode']} | {fmt(tps, '%.0f')} | "
      f"{fmt(ms, '%.1f')} / {fmt(med, '%.1f')} | {fmt(mfu * 100 if mfu is not None else None, '%.1f%%')} | "
      f"{fmt(pm / 1048576 if pm else None, '%.0f')} | {fmt(tps / base if tps and base else None, '%.2f')} | {note} |")
p("")
p("tok/s = B*T training tokens per second of step time (whole AdamW step). troupe peak memory: its allocator's "
  "peak (the final val_loss line, evaluation included); torch: torch.cuda.max_memory_allocated.")
try:
    text = open(prof).read()
except OSError:
    text = ""
if text.strip():
    p("")
    p(text.rstrip())
print("\n".join(out))
EOF
  cat "$work/report.txt" >"$report"
  [ -n "${OUT:-}" ] && cat "$work/report.txt"  # the report on stdout too
  return 0
}
trap 'summarize; rm -rf "$work"' EXIT
trap 'echo "gpu_train_bench: interrupted; partial results" >&2; exit 130' INT TERM

echo "== troupe export" >&2
"$troupe" export --config "$cfg" --out "$weights" >>"$logs" 2>&1 || die "troupe export failed"

run_troupe bf16
run_troupe fp32
run_torch eager bf16
run_torch eager fp32
run_torch compile bf16

# troupe's per-op device-time table (bf16 on cuda), top rows.
prec=bf16
[ "$device" = cuda ] || prec=fp32
echo "== troupe train --profile ($profile_steps steps, $prec)" >&2
plog=$work/troupe_profile.log
"$troupe" train --config "$bench_cfg" --weights "$weights" --steps "$profile_steps" --device "$device" \
  --precision "$prec" --profile --out "$work/run_profile" >"$plog" 2>&1
rc=$?
{ echo "==== troupe train --profile (exit $rc)"; cat "$plog"; } >>"$logs"
{
  echo "troupe --profile, $prec, steps 2..$profile_steps (top 25 ops by device time; full table in the logs):"
  awk '/^profile \(/ { on = 1; next } on && /^total/ { print; exit } on { if (++n <= 26) print }' "$plog"
  [ $rc = 0 ] || echo "(profile run failed: exit $rc)"
} >"$work/profile.txt"
