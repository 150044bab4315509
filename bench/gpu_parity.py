#!/usr/bin/env python3
"""Loss parity on the GPU: troupe eval vs the PyTorch twin, same weights, same windows.

    [TROUPE_BIN=.device/bin/troupe] python3 bench/gpu_parity.py \\
        [--config configs/moe100m.toml] [--tokens data/brown/train_000.bin] [--batches 2] \\
        [--weights W.safetensors] [--device cuda] [--skip-cpu]

Without --weights the config's initial weights are exported (`troupe export`).
Runs, on the first BATCHES x batch_size windows of the shard, in order (the
windows `troupe eval --batches` takes):

  torch  float64   on DEVICE   the reference
  torch  float32   on DEVICE   must agree to 1e-5 relative
  torch  bf16      on DEVICE   torch.autocast(bfloat16), fp32 weights: 2e-3
  troupe fp32      on cpu      `troupe eval --device cpu` (F32 CPU backend): 1e-5
  troupe default   on DEVICE   `troupe eval --device cuda`: eval has no --precision
                               and uses bf16 GEMMs on a GPU: 2e-3

and prints the main-head losses with their relative differences to the
float64 reference (and troupe-on-DEVICE vs torch bf16). troupe prints its loss
with 6 decimals (~1e-7 relative at loss ~7). fp32 rows can miss 1e-5 only if a
top-K routing decision flips on a near-tie; bf16 rows differ by bf16 rounding
of the GEMM inputs (expect ~1e-4..1e-3 relative). Exit status 1 if a row is
out of tolerance or a command fails. Gradients are not compared here
(tests/torch_parity_test.cpp on CPU, tests/cuda_model_test.cpp on GPU).

Writes the table to $OUT/gpu_parity.txt too when OUT is set.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TOL_FP32 = 1e-5
TOL_BF16 = 2e-3


def run(cmd, env=None):
    t0 = time.time()
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
    dt = time.time() - t0
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode} after {dt:.1f}s: {' '.join(cmd)}\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p.stdout, dt


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="configs/moe100m.toml")
    ap.add_argument("--tokens", default="data/brown/train_000.bin")
    ap.add_argument("--batches", type=int, default=2, help="batches of [train] batch_size windows (default 2)")
    ap.add_argument("--weights", default=None, help="default: the config's initial weights (troupe export)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    ap.add_argument("--skip-cpu", action="store_true", help="leave out troupe eval --device cpu")
    ap.add_argument("--python", default=os.environ.get("PYTHON", sys.executable),
                    help="interpreter for torch_reference.py (default $PYTHON, else this one)")
    a = ap.parse_args()
    troupe = os.environ.get("TROUPE_BIN", "build/cli/troupe")
    if not os.path.exists(os.path.join(ROOT, troupe)) and not os.path.exists(troupe):
        raise SystemExit(f"no troupe binary at {troupe} (set TROUPE_BIN)")
    for p in (a.config, a.tokens):
        if not os.path.exists(os.path.join(ROOT, p)) and not os.path.exists(p):
            raise SystemExit(f"missing {p}")

    work = tempfile.mkdtemp(prefix="troupe_gpu_parity.")
    weights = a.weights
    if weights is None:
        weights = os.path.join(work, "init.safetensors")
        run([troupe, "export", "--config", a.config, "--out", weights])

    rows, failures, notes = [], [], []

    def torch_loss(dtype, precision):
        out, dt = run([a.python, os.path.join(HERE, "torch_reference.py"), "loss", "--config", a.config,
                       "--weights", weights, "--tokens", a.tokens, "--batches", str(a.batches),
                       "--device", a.device, "--dtype", dtype, "--precision", precision])
        r = json.loads(out.strip().splitlines()[-1])
        return r["main"], r["windows"], dt

    def troupe_eval(device):
        out, dt = run([troupe, "eval", "--config", a.config, "--weights", weights, "--tokens", a.tokens,
                       "--batches", str(a.batches), "--device", device])
        m = re.search(r"loss ([-0-9.eE+naif]+) over (\d+) tokens \((\d+) windows", out)
        if not m:
            raise RuntimeError(f"cannot parse troupe eval output:\n{out}")
        return float(m.group(1)), int(m.group(3)), dt

    def attempt(system, prec, device, tol, fn, *args):
        try:
            loss, windows, dt = fn(*args)
            rows.append({"system": system, "precision": prec, "device": device, "tol": tol,
                         "main": loss, "windows": windows, "s": dt})
        except Exception as e:  # noqa: BLE001  (report and go on)
            failures.append(f"{system} {prec} on {device}: {e}")
            rows.append({"system": system, "precision": prec, "device": device, "tol": tol,
                         "main": None, "windows": None, "s": None})

    attempt("torch", "float64", a.device, None, torch_loss, "float64", "fp32")
    attempt("torch", "float32", a.device, TOL_FP32, torch_loss, "float32", "fp32")
    attempt("torch", "bf16 autocast", a.device, TOL_BF16, torch_loss, "float32", "bf16")
    if not a.skip_cpu:
        attempt("troupe", "fp32", "cpu", TOL_FP32, troupe_eval, "cpu")
    if a.device == "cuda":
        attempt("troupe", "bf16 (eval default)", "cuda", TOL_BF16, troupe_eval, "cuda")

    ref = rows[0]["main"]
    lines = [f"Loss parity: {a.config}, {a.tokens}, first {a.batches} batches; weights {a.weights or 'initial (troupe export)'}",
             "rel diff = |loss - torch float64| / torch float64 (main head, mean over the windows)", "",
             "| system | precision | device | main loss | rel diff vs fp64 | tolerance | ok | windows | seconds |",
             "|---|---|---|---:|---:|---:|---|---:|---:|"]
    windows = {r["windows"] for r in rows if r["windows"] is not None}
    if len(windows) > 1:
        failures.append(f"the runs saw different numbers of windows: {sorted(windows)}")
    for r in rows:
        if r["main"] is None:
            lines.append(f"| {r['system']} | {r['precision']} | {r['device']} | failed | | | NO | | |")
            continue
        if ref is None or r is rows[0]:
            rel, ok = "(reference)" if r is rows[0] else "n/a", "" if r is rows[0] else "?"
        else:
            d = abs(r["main"] - ref) / abs(ref)
            ok = "yes" if d <= r["tol"] else "NO"
            if ok == "NO":
                failures.append(f"{r['system']} {r['precision']} on {r['device']}: rel diff {d:.3e} > {r['tol']:.0e}")
            rel = f"{d:.3e}"
        tol = f"{r['tol']:.0e}" if r["tol"] else ""
        lines.append(f"| {r['system']} | {r['precision']} | {r['device']} | {r['main']:.6f} | {rel} | {tol} | {ok} | "
                     f"{r['windows']} | {r['s']:.1f} |")
    tb = [r for r in rows if r["system"] == "torch" and r["precision"].startswith("bf16") and r["main"] is not None]
    ob = [r for r in rows if r["system"] == "troupe" and r["device"] == "cuda" and r["main"] is not None]
    if tb and ob:
        notes.append(f"troupe cuda (bf16) vs torch bf16 autocast: rel diff "
                     f"{abs(ob[0]['main'] - tb[0]['main']) / abs(tb[0]['main']):.3e}")
    lines += [""] + notes
    if failures:
        lines += ["", "FAILED:"] + ["  " + f.replace("\n", "\n  ") for f in failures]
    else:
        lines += ["", "all rows within tolerance"]
    text = "\n".join(lines) + "\n"
    sys.stdout.write(text)
    shutil.rmtree(work, ignore_errors=True)
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "gpu_parity.txt"), "w") as f:
            f.write(text)
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
