#!/usr/bin/python3
"""Writes a random-weights Troupe checkpoint (safetensors, fp32) for a config.

Matrices ~ normal(0, init_std), RMSNorm weights 1, routing biases 0 (or
normal(0, --bias-std) to exercise biased routing in tests). Deterministic in
--seed. Needs only numpy (torch is imported by torch_model but not used here).

  /usr/bin/python3 bench/make_random_weights.py --config configs/tiny.toml --out /tmp/w.safetensors
"""
import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_model import expected_shapes, load_config, save_safetensors  # noqa: E402


def random_weights(cfg, seed, bias_std=0.0):
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in expected_shapes(cfg).items():
        if len(shape) >= 2:
            out[name] = rng.normal(0.0, cfg.init_std, size=shape).astype(np.float32)
        elif name.endswith("e_score_correction_bias"):
            out[name] = (rng.normal(0.0, bias_std, size=shape) if bias_std > 0 else np.zeros(shape)).astype(np.float32)
        else:
            out[name] = np.ones(shape, dtype=np.float32)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bias-std", type=float, default=0.0, help="std of the routing biases (default 0: zeros)")
    a = ap.parse_args()
    cfg, _, _ = load_config(a.config)
    w = random_weights(cfg, a.seed, a.bias_std)
    save_safetensors(a.out, w, {"format": "pt", "source": "bench/make_random_weights.py", "seed": a.seed})
    n = sum(v.size for v in w.values())
    print(f"wrote {a.out}: {len(w)} tensors, {n} parameters")


if __name__ == "__main__":
    main()
