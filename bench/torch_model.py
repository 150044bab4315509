"""PyTorch twin of Troupe's DeepSeek-V3-style model (BRIEF §1, names of §5).

Independent of the C++ code on purpose: tests run both on the same weights
and compare losses and gradients; benchmarks use it as the speed baseline.

What lives here:
  ModelConfig / TrainConfig / load_config   the TOML job config (configs/config.h defaults)
  load_safetensors / save_safetensors       numpy-only safetensors reader/writer
  expected_shapes(cfg)                      every exported tensor name -> shape
  Transformer                               the model; parameter names == exported names
  load_weights(model, path)                 strict load by name (missing/extra/shape = error)
  read_tokens / windows                     llm.c .bin shards -> [N, T+1+D] windows

Shapes in comments: B sequences, T tokens, d width, V vocab, E routed experts,
K experts per token, N = B*T flattened tokens.

Devices and precision: the module runs unchanged on CPU or CUDA, in float32 or
float64, and under torch.autocast(bfloat16) (bf16 matmuls, fp32 parameters,
norms, softmax and losses). Written the ordinary eager way for a GPU: one RoPE
table per forward (non-persistent buffers, not in state_dict), fused causal
attention (F.scaled_dot_product_attention where torch has it, else explicit
masked softmax; the same maths), routed experts by sort-by-expert +
index_select + one SwiGLU per expert + index_add_. The only host sync in a
forward is the per-MoE-layer list of expert sizes (inherent to a per-expert loop).
"""
import json
import math
import struct
import tomllib
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------
# Config (keys and defaults as configs/config.h; unknown keys are ignored)

@dataclass
class ModelConfig:
    vocab_size: int = 2048
    hidden_size: int = 128
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    num_attention_heads: int = 4
    q_lora_rank: int = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    intermediate_size: int = 384
    moe_intermediate_size: int = 64
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 1.0
    norm_topk_prob: bool = True
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    num_nextn_predict_layers: int = 1
    init_std: float = 0.02


@dataclass
class TrainConfig:
    seed: int = 1234
    seq_len: int = 64
    batch_size: int = 8
    steps: int = 400
    lr: float = 3e-3
    warmup_steps: int = 30
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3
    balance_alpha: float = 1e-4
    bias_update_gamma: float = 1e-3


def _fill(cls, table):
    out = cls()
    for f in fields(cls):
        if f.name in table:
            setattr(out, f.name, f.type(table[f.name]) if f.type is not bool else bool(table[f.name]))
    return out


def validate_model_config(m):
    def need(ok, what):
        if not ok:
            raise ValueError(f"config: {what}")
    need(m.qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even")
    need(m.n_group >= 1 and m.n_routed_experts % m.n_group == 0, "n_routed_experts % n_group != 0")
    need(1 <= m.topk_group <= m.n_group, "topk_group must be in [1, n_group]")
    need(1 <= m.num_experts_per_tok <= m.topk_group * (m.n_routed_experts // m.n_group),
         "num_experts_per_tok exceeds the experts of topk_group groups")
    need(0 <= m.first_k_dense_replace, "first_k_dense_replace < 0")


def load_config(toml_path):
    """Returns (ModelConfig, TrainConfig, raw dict) from a Troupe TOML file."""
    with open(toml_path, "rb") as f:
        raw = tomllib.load(f)
    model = _fill(ModelConfig, raw.get("model", {}))
    train = _fill(TrainConfig, raw.get("train", {}))
    validate_model_config(model)
    return model, train, raw


# ----------------------------------------------------------------------------
# safetensors without the safetensors package:
#   u64 LE header length | JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {}} | data

_ST_TO_NP = {"F32": np.float32, "F64": np.float64, "F16": np.float16, "I32": np.int32,
             "I64": np.int64, "U16": np.uint16, "U8": np.uint8, "I8": np.int8}
_NP_TO_ST = {np.dtype(v): k for k, v in _ST_TO_NP.items()}


def load_safetensors(path):
    """Returns ({name: np.ndarray}, metadata dict). BF16 is widened to float32."""
    with open(path, "rb") as f:
        buf = f.read()
    (n,) = struct.unpack("<Q", buf[:8])
    header = json.loads(buf[8:8 + n].decode("utf-8"))
    meta = header.pop("__metadata__", {}) or {}
    data = memoryview(buf)[8 + n:]
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        dt, shape = info["dtype"], tuple(info["shape"])
        raw = data[a:b]
        if dt == "BF16":
            u = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
            arr = u.view(np.float32)
        elif dt in _ST_TO_NP:
            arr = np.frombuffer(raw, dtype=np.dtype(_ST_TO_NP[dt]).newbyteorder("<")).copy()
        else:
            raise ValueError(f"{path}: tensor {name}: unsupported dtype {dt}")
        if arr.size != int(np.prod(shape, dtype=np.int64)):
            raise ValueError(f"{path}: tensor {name}: {arr.size} elements for shape {shape}")
        out[name] = arr.reshape(shape)
    return out, meta


def save_safetensors(path, tensors, metadata=None):
    """tensors: {name: np.ndarray or torch.Tensor}; written in the given order, 8-byte aligned header."""
    header, blobs, off = {}, [], 0
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor):
            t = t.detach().cpu().numpy()
        t = np.ascontiguousarray(t)
        dt = _NP_TO_ST.get(np.dtype(t.dtype.name))
        if dt is None:
            raise ValueError(f"tensor {name}: unsupported numpy dtype {t.dtype}")
        b = t.astype(t.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": dt, "shape": list(t.shape), "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    hj = json.dumps(header, separators=(",", ":")).encode("utf-8")
    hj += b" " * ((8 - len(hj) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(hj)))
        f.write(hj)
        for b in blobs:
            f.write(b)


# ----------------------------------------------------------------------------
# Exported names and shapes (BRIEF §5)

def is_moe_layer(cfg, i):
    return i >= cfg.first_k_dense_replace


def expected_shapes(cfg):
    """Every tensor of a Troupe checkpoint, in model order: name -> shape."""
    d, V = cfg.hidden_size, cfg.vocab_size
    nh, dh, dr, dv = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    dcq, dc = cfg.q_lora_rank, cfg.kv_lora_rank
    E, f = cfg.n_routed_experts, cfg.moe_intermediate_size
    L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
    s = {"model.embed_tokens.weight": (V, d)}
    for i in range(L + D):
        p = f"model.layers.{i}."
        if i >= L:
            s[p + "enorm.weight"] = (d,)
            s[p + "hnorm.weight"] = (d,)
            s[p + "eh_proj.weight"] = (d, 2 * d)
        s[p + "input_layernorm.weight"] = (d,)
        s[p + "self_attn.q_a_proj.weight"] = (dcq, d)
        s[p + "self_attn.q_a_layernorm.weight"] = (dcq,)
        s[p + "self_attn.q_b_proj.weight"] = (nh * (dh + dr), dcq)
        s[p + "self_attn.kv_a_proj_with_mqa.weight"] = (dc + dr, d)
        s[p + "self_attn.kv_a_layernorm.weight"] = (dc,)
        s[p + "self_attn.kv_b_proj.weight"] = (nh * (dh + dv), dc)
        s[p + "self_attn.o_proj.weight"] = (d, nh * dv)
        s[p + "post_attention_layernorm.weight"] = (d,)
        if is_moe_layer(cfg, i):
            s[p + "mlp.gate.weight"] = (E, d)
            s[p + "mlp.gate.e_score_correction_bias"] = (E,)
            for j in range(E):
                for w, shp in (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f))):
                    s[p + f"mlp.experts.{j}.{w}.weight"] = shp
            fs = cfg.n_shared_experts * f
            if fs > 0:
                for w, shp in (("gate_proj", (fs, d)), ("up_proj", (fs, d)), ("down_proj", (d, fs))):
                    s[p + f"mlp.shared_experts.{w}.weight"] = shp
        else:
            fi = cfg.intermediate_size
            for w, shp in (("gate_proj", (fi, d)), ("up_proj", (fi, d)), ("down_proj", (d, fi))):
                s[p + f"mlp.{w}.weight"] = shp
        if i >= L:
            s[p + "shared_head.norm.weight"] = (d,)
    s["model.norm.weight"] = (d,)
    s["lm_head.weight"] = (V, d)
    return s


# ----------------------------------------------------------------------------
# Modules. Attribute names follow the HF DeepseekV3 layout so that
# state_dict() keys are exactly the exported names.

def linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, n, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))
        self.eps = eps

    def forward(self, x):  # (..., n)
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class SwiGLU(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = linear(d, f), linear(d, f), linear(f, d)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def rope_tables(cfg, T):
    """(cos, sin), each (T, d_r/2) float64: angle pos * theta^(-2j/d_r), computed in float64."""
    dr = cfg.qk_rope_head_dim
    j = torch.arange(dr // 2, dtype=torch.float64)
    inv = cfg.rope_theta ** (-2.0 * j / dr)
    ang = torch.arange(T, dtype=torch.float64)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


# Fused attention where this torch has it (2.0+); set to False to force the
# explicit masked softmax. Same maths: softmax(q k^T / sqrt(d_h + d_r), causal) v.
USE_SDPA = hasattr(F, "scaled_dot_product_attention")


def rope(x, cos, sin):
    """x (..., T, n_any, d_r) or (..., T, d_r); cos/sin (T, d_r/2). Rotates pairs (2j, 2j+1)."""
    a, b = x[..., 0::2], x[..., 1::2]
    if x.dim() == 4:  # (B, T, n_h, d_r): broadcast over heads
        cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d, self.nh = cfg.hidden_size, cfg.num_attention_heads
        self.dh, self.dr, self.dv, self.dc = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        self.q_a_proj = linear(d, cfg.q_lora_rank)
        self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
        self.q_b_proj = linear(cfg.q_lora_rank, self.nh * (self.dh + self.dr))
        self.kv_a_proj_with_mqa = linear(d, self.dc + self.dr)
        self.kv_a_layernorm = RMSNorm(self.dc, cfg.rms_norm_eps)
        self.kv_b_proj = linear(self.dc, self.nh * (self.dh + self.dv))
        self.o_proj = linear(self.nh * self.dv, d)

    def forward(self, x, cos, sin):  # x (B, T, d) -> (B, T, d); cos/sin (T, d_r/2) in x's dtype
        B, T, _ = x.shape
        nh, dh, dr, dv = self.nh, self.dh, self.dr, self.dv
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(B, T, nh, dh + dr)
        q_c, q_r = q[..., :dh], rope(q[..., dh:], cos, sin)                  # (B,T,nh,dh), (B,T,nh,dr)
        kv_a = self.kv_a_proj_with_mqa(x)                                      # (B, T, dc+dr)
        c_kv, k_r = self.kv_a_layernorm(kv_a[..., :self.dc]), rope(kv_a[..., self.dc:], cos, sin)
        kv = self.kv_b_proj(c_kv).view(B, T, nh, dh + dv)
        k_c, v = kv[..., :dh], kv[..., dh:]
        qh = torch.cat((q_c, q_r), -1).transpose(1, 2)                        # (B, nh, T, dh+dr)
        kh = torch.cat((k_c, k_r[:, :, None, :].expand(B, T, nh, dr)), -1).transpose(1, 2)
        vh = v.transpose(1, 2)                                                 # (B, nh, T, dv)
        if USE_SDPA:  # default scale is 1/sqrt(q.size(-1)) = 1/sqrt(dh + dr)
            o = F.scaled_dot_product_attention(qh, kh, vh, is_causal=True)
        else:
            att = (qh @ kh.transpose(-1, -2)) * (1.0 / math.sqrt(dh + dr))   # (B, nh, T, T)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(mask, float("-inf")).softmax(-1)
            o = att @ vh
        return self.o_proj(o.transpose(1, 2).reshape(B, T, nh * dv))


class Gate(nn.Module):
    """Router: sigmoid affinities; the bias only steers selection (a buffer, no gradient)."""

    def __init__(self, cfg):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))


class MoE(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.gate = Gate(cfg)
        self.experts = nn.ModuleList(SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size)
                                     for _ in range(cfg.n_routed_experts))
        fs = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = SwiGLU(cfg.hidden_size, fs) if fs > 0 else None

    def route(self, s):
        """s (N, E) affinities -> idx (N, K) chosen experts (by s + b, group-limited)."""
        c = self.cfg
        E, G, M, K = c.n_routed_experts, c.n_group, c.topk_group, c.num_experts_per_tok
        sel = s.detach() + self.gate.e_score_correction_bias.to(s.dtype)        # (N, E)
        N = sel.shape[0]
        if G > 1 and M < G:
            per = max(1, K // M)
            gscore = sel.view(N, G, E // G).topk(per, dim=-1).values.sum(-1)    # (N, G)
            gidx = gscore.topk(M, dim=-1).indices                               # (N, M)
            gmask = torch.zeros(N, G, dtype=torch.bool, device=s.device).scatter_(1, gidx, True)
            sel = sel.masked_fill(~gmask.repeat_interleave(E // G, dim=1), float("-inf"))
        return sel.topk(K, dim=-1).indices

    def forward(self, x, stats):
        """x (B, T, d). Appends to stats: balance loss term and per-expert counts."""
        c = self.cfg
        B, T, d = x.shape
        E, K = c.n_routed_experts, c.num_experts_per_tok
        xf = x.reshape(-1, d)                                                   # (N, d)
        # router logits back in the activations' dtype (a no-op except under
        # autocast, where the matmul is bf16 and routing then works in fp32)
        s = torch.sigmoid((xf @ self.gate.weight.t()).to(xf.dtype))            # (N, E)
        idx = self.route(s)                                                     # (N, K)
        g = s.gather(1, idx)                                                    # (N, K)
        if c.norm_topk_prob:
            g = g / g.sum(-1, keepdim=True)
        g = g * c.routed_scaling_factor
        # routed experts: group the (token, slot) pairs by expert
        flat = idx.reshape(-1)                                                  # (N*K,)
        order = flat.argsort(stable=True)                                       # slots sorted by expert
        counts = torch.bincount(flat, minlength=E)                              # (E,)
        tok = order // K                                                        # token of each sorted slot
        xs = xf.index_select(0, tok)                                            # (N*K, d)
        gs = g.reshape(-1).index_select(0, order)                               # (N*K,)
        sizes = counts.tolist()  # the one host sync of the layer: the per-expert loop needs the sizes
        outs = [self.experts[e](chunk) for e, chunk in enumerate(xs.split(sizes)) if sizes[e]]
        routed = (torch.cat(outs) * gs[:, None]).to(xf.dtype)                  # fp32 combine under autocast
        y = torch.zeros_like(xf).index_add_(0, tok, routed)
        if self.shared_experts is not None:
            y = y + self.shared_experts(xf)
        # sequence-wise balance loss: alpha * mean_b sum_i f_i P_i
        onehot = torch.zeros(B, T * K, E, dtype=x.dtype, device=x.device)
        onehot.scatter_(2, idx.view(B, T * K, 1), 1.0)
        f = onehot.sum(1) * (E / (K * T))                                       # (B, E), constant
        P = (s / s.sum(-1, keepdim=True)).view(B, T, E).mean(1)                  # (B, E)
        stats["balance"].append(stats["alpha"] * (f * P).sum(-1).mean())
        stats["load"].append(counts.detach())
        return y.view(B, T, d)


class Layer(nn.Module):
    def __init__(self, cfg, i, mtp):
        super().__init__()
        d, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.moe = is_moe_layer(cfg, i)
        if mtp:
            self.enorm, self.hnorm = RMSNorm(d, eps), RMSNorm(d, eps)
            self.eh_proj = linear(2 * d, d)
            self.shared_head = nn.Module()
            self.shared_head.norm = RMSNorm(d, eps)
        self.input_layernorm = RMSNorm(d, eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = RMSNorm(d, eps)
        self.mlp = MoE(cfg) if self.moe else SwiGLU(d, cfg.intermediate_size)

    def forward(self, h, stats, cos, sin):  # (B, T, d)
        h = h + self.self_attn(self.input_layernorm(h), cos, sin)
        x = self.post_attention_layernorm(h)
        return h + (self.mlp(x, stats) if self.moe else self.mlp(x))


class Transformer(nn.Module):
    def __init__(self, cfg, train=None):
        super().__init__()
        self.cfg, self.tcfg = cfg, train or TrainConfig()
        L, D = cfg.num_hidden_layers, cfg.num_nextn_predict_layers
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.model.layers = nn.ModuleList(Layer(cfg, i, mtp=i >= L) for i in range(L + D))
        self.model.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        # RoPE tables for seq_len positions, float64 until the model's .to(dtype)
        # casts them; non-persistent, so not part of state_dict / the weights.
        cos, sin = rope_tables(cfg, self.tcfg.seq_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def rope(self, T, dtype, device):
        if T <= self.rope_cos.shape[0]:
            cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        else:
            cos, sin = rope_tables(self.cfg, T)
        return cos.to(dtype=dtype, device=device), sin.to(dtype=dtype, device=device)

    def forward(self, x):
        """x (B, T+1+D) token ids. Returns dict of losses (scalars) and per-layer loads.

        total = main + mtp_lambda/D * sum_k mtp[k] + balance (sum over MoE layers)."""
        c, tc = self.cfg, self.tcfg
        L, D = c.num_hidden_layers, c.num_nextn_predict_layers
        T = x.shape[1] - 1 - D
        stats = {"balance": [], "load": [], "alpha": tc.balance_alpha}
        emb = self.model.embed_tokens
        layers = self.model.layers
        h = emb(x[:, :T])                                                       # (B, T, d)
        cos, sin = self.rope(T, h.dtype, h.device)
        for i in range(L):
            h = layers[i](h, stats, cos, sin)
        logits = self.lm_head(self.model.norm(h))                               # (B, T, V)
        main = F.cross_entropy(logits.reshape(-1, c.vocab_size), x[:, 1:T + 1].reshape(-1))
        mtp = []
        for k in range(1, D + 1):
            m = layers[L + k - 1]
            e = m.enorm(emb(x[:, k:k + T]))
            h = m.eh_proj(torch.cat((e, m.hnorm(h)), -1))
            h = m(h, stats, cos, sin)
            lk = self.lm_head(m.shared_head.norm(h))
            mtp.append(F.cross_entropy(lk.reshape(-1, c.vocab_size), x[:, k + 1:k + 1 + T].reshape(-1)))
        zero = main.new_zeros(())
        balance = torch.stack(stats["balance"]).sum() if stats["balance"] else zero
        total = main + balance
        if D > 0:
            total = total + (tc.mtp_lambda / D) * torch.stack(mtp).sum()
        return {"main": main, "mtp": mtp, "balance": balance, "total": total, "load": stats["load"]}

    def moe_layers(self):
        return [l.mlp for l in self.model.layers if l.moe]

    @torch.no_grad()
    def update_bias(self, loads):
        """Aux-loss-free balancing: b_i += gamma * sign(mean_load - load_i), per MoE layer."""
        g = self.tcfg.bias_update_gamma
        for moe, load in zip(self.moe_layers(), loads):
            load = load.to(moe.gate.e_score_correction_bias.dtype)
            moe.gate.e_score_correction_bias += g * torch.sign(load.mean() - load)


# ----------------------------------------------------------------------------
# Weights by name

def load_weights(model, path):
    """Strict: every exported name present with its shape, nothing extra."""
    tensors, _ = load_safetensors(path)
    state = model.state_dict()
    missing = sorted(set(state) - set(tensors))
    extra = sorted(set(tensors) - set(state))
    bad = sorted(f"{n}: file {tuple(tensors[n].shape)} vs model {tuple(state[n].shape)}"
                 for n in set(state) & set(tensors) if tuple(tensors[n].shape) != tuple(state[n].shape))
    if missing or extra or bad:
        raise ValueError(f"{path}: weights do not match the config:\n"
                         f"  missing ({len(missing)}): {missing[:20]}\n"
                         f"  extra ({len(extra)}): {extra[:20]}\n"
                         f"  mis-shaped ({len(bad)}): {bad[:20]}")
    with torch.no_grad():
        for n, t in state.items():
            t.copy_(torch.from_numpy(np.ascontiguousarray(tensors[n])).to(t.dtype))


def build_model(cfg, train, weights_path=None, dtype=torch.float32, device="cpu"):
    """Built and loaded on the CPU in `dtype`, then moved to `device`."""
    torch.manual_seed(0)
    model = Transformer(cfg, train)
    exp = expected_shapes(cfg)
    got = {n: tuple(t.shape) for n, t in model.state_dict().items()}
    assert got == exp, "internal: module layout differs from expected_shapes()"
    model = model.to(dtype)
    if weights_path:
        load_weights(model, weights_path)
    return model.to(device)


def count_params(cfg, model):
    """(total, active per token): routed experts count K/E of their size, as troupe's CountActiveParams."""
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        active += p.numel() * cfg.num_experts_per_tok // cfg.n_routed_experts if ".mlp.experts." in name else p.numel()
    return total, active


# ----------------------------------------------------------------------------
# Data: llm.c .bin shards (256 x int32 header: magic 20240520, version 1, count; then uint16)

def read_tokens(path):
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(256 * 4), dtype="<i4")
        if header.size != 256 or header[0] != 20240520 or header[1] != 1:
            raise ValueError(f"{path}: not an llm.c token shard (magic/version)")
        n = int(header[2])
        toks = np.frombuffer(f.read(), dtype="<u2")
    if toks.size != n:
        raise ValueError(f"{path}: header says {n} tokens, file holds {toks.size}")
    return toks


def windows(tokens, T, D):
    """(N, T+1+D) int64: windows starting every T tokens, only full ones."""
    n, w = len(tokens), T + 1 + D
    starts = range(0, n - w + 1, T) if n >= w else range(0)
    return np.stack([tokens[s:s + w] for s in starts]).astype(np.int64) if len(starts) else np.zeros((0, w), np.int64)


def write_tokens(path, tokens):
    """Helper for tests: writes an llm.c shard."""
    header = np.zeros(256, dtype="<i4")
    header[:3] = (20240520, 1, len(tokens))
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype="<u2").tobytes())
