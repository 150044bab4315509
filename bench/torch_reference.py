#!/usr/bin/python3
"""CLI around bench/torch_model.py: PyTorch reference losses, gradients and speed.

  loss        --config C --weights W --tokens X.bin [--batches N] [--dtype float64] [--precision bf16]
              JSON {"main", "mtp": [..], "balance", "total", "windows"}: means over the
              first N*batch_size windows in order (all windows if N is omitted).
  grads       --config C --weights W --tokens X.bin --out G.safetensors [--dtype float64]
              gradients of the total loss on the first batch, saved under the weight
              names (every trained parameter; the routing biases have none and are left out).
  train-bench --config C --weights W --tokens X.bin --steps S [--threads N]
              [--precision fp32|bf16] [--compile] [--warmup W]
              S AdamW steps after W warm-up steps (default 8 with --compile, else 3 on
              cuda, 2 on cpu);
              JSON {"tokens_per_s", "step_ms", "peak_mem_bytes", ...}.
  check       --config C --weights W --tokens X.bin
              float64 central finite differences vs autograd on sampled entries of a few tensors.

Every command takes --device cpu|cuda (default cpu). --precision bf16 runs the
forward and the losses under torch.autocast(bfloat16) on fp32 parameters
(bf16 matmuls, fp32 storage and AdamW); it needs --dtype float32.

Here: Debian's /usr/bin/python3 (python3-torch 1.13, CPU). On a GPU machine,
any python with torch >= 2 (CUDA); --compile needs torch.compile (2.0+).
"""
import argparse
import contextlib
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_model as tm  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def get_device(a):
    dev = torch.device(getattr(a, "device", "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch.cuda.is_available() is False")
    return dev


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def autocast(a, dev):
    """bf16: torch.autocast around forward + losses (fp32 parameters); fp32: nothing."""
    if getattr(a, "precision", "fp32") != "bf16":
        return contextlib.nullcontext()
    if a.dtype != "float32":
        raise SystemExit("--precision bf16 needs --dtype float32 (fp32 master weights)")
    return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)


def setup(a):
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    dev = get_device(a)
    cfg, train, _ = tm.load_config(a.config)
    if getattr(a, "batch_size", None):
        train.batch_size = a.batch_size
    model = tm.build_model(cfg, train, a.weights, DTYPES[a.dtype], dev)
    wins = np.concatenate([tm.windows(tm.read_tokens(p), train.seq_len, cfg.num_nextn_predict_layers)
                           for p in a.tokens])
    if len(wins) == 0:
        raise SystemExit("no full window in the token shards")
    return cfg, train, model, torch.from_numpy(wins).to(dev)  # all windows on the device: no copy per step


def first_batch(train, wins):
    if len(wins) < train.batch_size:
        raise SystemExit(f"need {train.batch_size} windows, shards give {len(wins)}")
    return wins[:train.batch_size]


def cmd_loss(a):
    cfg, train, model, wins = setup(a)
    n = len(wins) if a.batches is None else min(len(wins), a.batches * train.batch_size)
    D = cfg.num_nextn_predict_layers
    acc = {"main": 0.0, "mtp": [0.0] * D, "balance": 0.0, "total": 0.0}
    dev = get_device(a)
    with torch.no_grad():
        for s in range(0, n, train.batch_size):
            x = wins[s:min(n, s + train.batch_size)]
            w = len(x) / n  # every loss is a mean over sequences: weight batches by size
            with autocast(a, dev):
                r = model(x)
            acc["main"] += w * r["main"].item()
            acc["balance"] += w * r["balance"].item()
            acc["total"] += w * r["total"].item()
            for k in range(D):
                acc["mtp"][k] += w * r["mtp"][k].item()
    acc["windows"] = n
    acc["device"], acc["dtype"], acc["precision"] = dev.type, a.dtype, a.precision
    print(json.dumps(acc))


def cmd_grads(a):
    _, train, model, wins = setup(a)
    r = model(first_batch(train, wins))
    r["total"].backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = g.detach().to(DTYPES[a.save_dtype]).cpu().numpy()
    meta = {"loss_total": repr(r["total"].item()), "loss_main": repr(r["main"].item()),
            "dtype": a.dtype, "windows": train.batch_size}
    tm.save_safetensors(a.out, out, meta)
    print(json.dumps({"out": a.out, "tensors": len(out), "total": r["total"].item(), "main": r["main"].item()}))


def cmd_train_bench(a):
    """AdamW steps as troupe's: forward, backward, global-norm clip, AdamW, routing-bias update.

    Timed: the `steps` steps after `warmup` ones, between device syncs (the step itself only
    syncs where the eager MoE must: the expert sizes). Losses are read back after the clock stops."""
    dev = get_device(a)
    cfg, train, model, wins = setup(a)
    amp = lambda: autocast(a, dev)  # noqa: E731  (a fresh context per step)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    hp = dict(lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps)
    opt_impl = "foreach"
    if dev.type == "cuda":
        try:  # fused AdamW (torch 2.0+ on CUDA): what a tuned eager run uses
            opt = torch.optim.AdamW(groups, fused=True, **hp)
            opt_impl = "fused"
        except (TypeError, RuntimeError, ValueError):
            opt = torch.optim.AdamW(groups, foreach=True, **hp)
    else:
        opt = torch.optim.AdamW(groups, foreach=True, **hp)
    B, T = train.batch_size, train.seq_len
    nb = len(wins) // B
    if nb == 0:
        raise SystemExit(f"need {B} windows, shards give {len(wins)}")
    total_params, active_params = tm.count_params(cfg, model)
    info = {"device": dev.type, "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "precision": a.precision, "dtype": a.dtype,
            "compile": False, "attention": "sdpa" if tm.USE_SDPA else "math", "adamw": opt_impl,
            "float32_matmul_precision": torch.get_float32_matmul_precision()
            if hasattr(torch, "get_float32_matmul_precision") else "n/a",
            "threads": torch.get_num_threads(), "batch_size": B, "seq_len": T,
            "params": total_params, "active_params": active_params}

    fwd = model
    if a.compile:
        info["compile"] = True
        try:  # the per-expert sizes differ every step: allow recompiles (names vary by version)
            import torch._dynamo as dynamo
            for k in ("cache_size_limit", "recompile_limit", "accumulated_cache_size_limit",
                      "accumulated_recompile_limit"):
                try:
                    if hasattr(dynamo.config, k):
                        setattr(dynamo.config, k, max(getattr(dynamo.config, k), 256))
                except Exception:  # noqa: BLE001  (an alias or a read-only key: keep the default)
                    pass
        except Exception:  # noqa: BLE001  (no dynamo: torch.compile below says so)
            pass
        try:
            fwd = torch.compile(model)
        except Exception as e:  # noqa: BLE001  (torch without compile, missing compiler, ...)
            return compile_unavailable(info, e)

    losses = []

    def step(i):
        x = wins[(i % nb) * B:(i % nb + 1) * B]
        opt.zero_grad(set_to_none=True)
        with amp():
            r = fwd(x)
        r["total"].backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        model.update_bias(r["load"])
        losses.append(r["total"].detach())

    # warm-up: 8 steps with --compile (compilation and the first recompiles), 3 on CUDA,
    # 2 on the CPU (what bench/cpu_train_bench.sh pairs with troupe's 2)
    warm = a.warmup if a.warmup is not None else (8 if a.compile else 3 if dev.type == "cuda" else 2)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    try:
        t0 = time.perf_counter()
        for i in range(warm):
            step(i)
        sync(dev)
        t_warm = time.perf_counter() - t0
        use_events = dev.type == "cuda"
        ev = [torch.cuda.Event(enable_timing=True) for _ in range(a.steps + 1)] if use_events else []
        stamps = []
        t0 = time.perf_counter()
        for i in range(warm, warm + a.steps):
            if use_events:
                ev[i - warm].record()
            else:
                stamps.append(time.perf_counter())
            step(i)
        if use_events:
            ev[a.steps].record()
        sync(dev)
        dt = time.perf_counter() - t0
        stamps.append(time.perf_counter())
    except Exception as e:  # noqa: BLE001
        if not a.compile:
            raise
        return compile_unavailable(info, e)
    if use_events:
        step_ms = [ev[k].elapsed_time(ev[k + 1]) for k in range(a.steps)]
    else:
        step_ms = [1000 * (stamps[k + 1] - stamps[k]) for k in range(a.steps)]
    vals = torch.stack(losses).float().cpu().tolist()
    info.update({"tokens_per_s": B * T * a.steps / dt, "step_ms": 1000 * dt / a.steps,
                 "step_ms_median": float(np.median(step_ms)), "step_ms_min": float(min(step_ms)),
                 "steps": a.steps, "warmup_steps": warm, "warmup_s": t_warm,
                 "first_loss": vals[0], "last_loss": vals[-1]})
    if dev.type == "cuda":
        info["peak_mem_bytes"] = torch.cuda.max_memory_allocated(dev)
        info["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
    print(json.dumps(info))


def compile_unavailable(info, e):
    reason = f"{type(e).__name__}: {e}".strip()
    print(f"torch.compile unavailable: {reason[:4000]}", file=sys.stderr)
    info.update({"compile": "unavailable", "compile_error": reason.splitlines()[0][:500] if reason else "?",
                 "tokens_per_s": None, "step_ms": None})
    print(json.dumps(info))


def cmd_check(a):
    """Central differences in float64 on sampled entries; selection stays fixed for tiny eps."""
    a.dtype = "float64"
    cfg, train, model, wins = setup(a)
    x = first_batch(train, wins)
    r = model(x)
    r["total"].backward()
    params = dict(model.named_parameters())
    names = a.names or [n for n in ("model.embed_tokens.weight",
                                    "model.layers.0.self_attn.q_b_proj.weight",
                                    "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                    f"model.layers.{cfg.first_k_dense_replace}.mlp.gate.weight",
                                    f"model.layers.{cfg.first_k_dense_replace}.mlp.experts.0.down_proj.weight",
                                    f"model.layers.{cfg.num_hidden_layers}.eh_proj.weight",
                                    f"model.layers.{cfg.num_hidden_layers}.hnorm.weight",
                                    "lm_head.weight") if n in params]
    rng = np.random.default_rng(a.seed)
    report, worst = {}, 0.0
    for name in names:
        p = params[name]
        g = p.grad.reshape(-1)
        flat = p.data.view(-1)
        # half the samples where the gradient is largest, half uniformly
        big = torch.topk(g.abs(), min(a.samples // 2, g.numel())).indices.tolist()
        idx = sorted(set(big) | set(rng.choice(g.numel(), min(a.samples - len(big), g.numel()), replace=False).tolist()))
        errs = []
        with torch.no_grad():
            for i in idx:
                old = flat[i].item()
                flat[i] = old + a.eps
                up = model(x)["total"].item()
                flat[i] = old - a.eps
                dn = model(x)["total"].item()
                flat[i] = old
                fd = (up - dn) / (2 * a.eps)
                an = g[i].item()
                errs.append(abs(fd - an) / max(abs(fd), abs(an), a.floor))
        report[name] = {"entries": len(idx), "max_rel_err": max(errs), "max_abs_grad": g.abs().max().item()}
        worst = max(worst, max(errs))
    print(json.dumps({"ok": worst < a.tol, "worst_rel_err": worst, "tol": a.tol, "tensors": report}, indent=1))
    if worst >= a.tol:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)

    def common(p, dtype=True):
        p.add_argument("--config", required=True)
        p.add_argument("--weights", required=True)
        p.add_argument("--tokens", required=True, nargs="+", help="llm.c .bin shard(s), windows taken in order")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
        p.add_argument("--batch-size", type=int, default=None, help="override [train] batch_size")
        p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
        if dtype:
            p.add_argument("--dtype", choices=DTYPES, default="float32")

    def precision(p):
        p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="bf16: torch.autocast(bfloat16) around forward + losses, fp32 parameters")

    p = sub.add_parser("loss")
    common(p)
    precision(p)
    p.add_argument("--batches", type=int, default=None)
    p.set_defaults(fn=cmd_loss)

    p = sub.add_parser("grads")
    common(p)
    p.add_argument("--out", required=True)
    p.add_argument("--save-dtype", choices=DTYPES, default="float32",
                   help="dtype written to the file (default float32, whatever --dtype computed in)")
    p.set_defaults(fn=cmd_grads)

    p = sub.add_parser("train-bench")
    common(p)
    precision(p)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default: 8 with --compile, else 3 on cuda, 2 on cpu)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the model; if that fails, the JSON says compile: unavailable")
    p.set_defaults(fn=cmd_train_bench)

    p = sub.add_parser("check")
    common(p, dtype=False)
    p.add_argument("--names", nargs="*", help="tensors to check (default: a few across the model)")
    p.add_argument("--samples", type=int, default=6, help="entries per tensor")
    p.add_argument("--eps", type=float, default=1e-5, help="step; 1e-5 balances float64 roundoff and truncation")
    p.add_argument("--tol", type=float, default=1e-5, help="max relative error (float64 FD: ~1e-8 expected)")
    p.add_argument("--floor", type=float, default=1e-4, help="relative-error denominator floor (FD abs error is ~1e-10)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(fn=cmd_check)

    a = ap.parse_args()
    a.fn(a)


if __name__ == "__main__":
    main()
