#!/usr/bin/python3
"""CLI around bench/torch_model.py: PyTorch reference losses, gradients and speed.

  loss        --config C --weights W --tokens X.bin [--batches N] [--dtype float64]
              JSON {"main", "mtp": [..], "balance", "total", "windows"}: means over the
              first N*batch_size windows in order (all windows if N is omitted).
  grads       --config C --weights W --tokens X.bin --out G.safetensors [--dtype float64]
              gradients of the total loss on the first batch, saved under the weight
              names (every trained parameter; the routing biases have none and are left out).
  train-bench --config C --weights W --tokens X.bin --steps S --threads N
              S AdamW steps after 2 warm-up steps; JSON {"tokens_per_s", "step_ms", ...}.
  check       --config C --weights W --tokens X.bin
              float64 central finite differences vs autograd on sampled entries of a few tensors.

Run with Debian's /usr/bin/python3 (python3-torch 1.13).
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch_model as tm  # noqa: E402

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def setup(a):
    if getattr(a, "threads", None):
        torch.set_num_threads(a.threads)
    cfg, train, _ = tm.load_config(a.config)
    if getattr(a, "batch_size", None):
        train.batch_size = a.batch_size
    model = tm.build_model(cfg, train, a.weights, DTYPES[a.dtype])
    wins = np.concatenate([tm.windows(tm.read_tokens(p), train.seq_len, cfg.num_nextn_predict_layers)
                           for p in a.tokens])
    if len(wins) == 0:
        raise SystemExit("no full window in the token shards")
    return cfg, train, model, torch.from_numpy(wins)


def first_batch(train, wins):
    if len(wins) < train.batch_size:
        raise SystemExit(f"need {train.batch_size} windows, shards give {len(wins)}")
    return wins[:train.batch_size]


def cmd_loss(a):
    cfg, train, model, wins = setup(a)
    n = len(wins) if a.batches is None else min(len(wins), a.batches * train.batch_size)
    D = cfg.num_nextn_predict_layers
    acc = {"main": 0.0, "mtp": [0.0] * D, "balance": 0.0, "total": 0.0}
    with torch.no_grad():
        for s in range(0, n, train.batch_size):
            x = wins[s:min(n, s + train.batch_size)]
            w = len(x) / n  # every loss is a mean over sequences: weight batches by size
            r = model(x)
            acc["main"] += w * r["main"].item()
            acc["balance"] += w * r["balance"].item()
            acc["total"] += w * r["total"].item()
            for k in range(D):
                acc["mtp"][k] += w * r["mtp"][k].item()
    acc["windows"] = n
    print(json.dumps(acc))


def cmd_grads(a):
    _, train, model, wins = setup(a)
    r = model(first_batch(train, wins))
    r["total"].backward()
    out = {}
    for name, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        out[name] = g.detach().to(DTYPES[a.save_dtype]).numpy()
    meta = {"loss_total": repr(r["total"].item()), "loss_main": repr(r["main"].item()),
            "dtype": a.dtype, "windows": train.batch_size}
    tm.save_safetensors(a.out, out, meta)
    print(json.dumps({"out": a.out, "tensors": len(out), "total": r["total"].item(), "main": r["main"].item()}))


def cmd_train_bench(a):
    cfg, train, model, wins = setup(a)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": train.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=train.lr, betas=(train.beta1, train.beta2), eps=train.adam_eps, foreach=True)
    B, T = train.batch_size, train.seq_len
    nb = len(wins) // B
    if nb == 0:
        raise SystemExit(f"need {B} windows, shards give {len(wins)}")
    losses = []

    def step(i):
        x = wins[(i % nb) * B:(i % nb + 1) * B]
        opt.zero_grad(set_to_none=True)
        r = model(x)
        r["total"].backward()
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
        opt.step()
        model.update_bias(r["load"])
        losses.append(r["total"].item())

    warm = 2
    for i in range(warm):
        step(i)
    t0 = time.perf_counter()
    for i in range(warm, warm + a.steps):
        step(i)
    dt = time.perf_counter() - t0
    print(json.dumps({"tokens_per_s": B * T * a.steps / dt, "step_ms": 1000 * dt / a.steps,
                      "steps": a.steps, "threads": torch.get_num_threads(), "batch_size": B, "seq_len": T,
                      "dtype": a.dtype, "first_loss": losses[0], "last_loss": losses[-1]}))


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
        if dtype:
            p.add_argument("--dtype", choices=DTYPES, default="float32")

    p = sub.add_parser("loss")
    common(p)
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
    p.add_argument("--steps", type=int, default=10)
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
