#!/usr/bin/env python3
"""One DLO training step computed independently in PyTorch (float64), saved as a test fixture.

Writes tests/fixtures/train_step/:
  config.json, model.safetensors  a tiny `llama_dlo_exattn` checkpoint (3 layers, routers on layers 1 and 2)
  batch.json                      the fixed micro-batch: rows of token ids with assistant-label flags, pad id
  expected.json                   CE loss, routing labels / selections / realised capacities per layer, BCE loss,
                                  total loss, router gradients, global grad norm, and the router weights after
                                  one AdamW step (all tensors train; clip 1.0; constant lr, no warmup)

Semantics follow docs/dlo-method.md (the reference implementation): batch-level top-k over real tokens
with k = max(1, ceil(N*c)), ties pass (>=); gate g = 0.5*alpha + beta*(r - 0.5) on executed MLP outputs;
similarity cos(a, a + MLP(norm2(a))) without gradient; cos-global labels with K = ceil(N*L_dlo*c);
BCE (mean over all B*T positions, padding label 0, logs clamped at -100); total = CE + lambda*BCE;
HF-style right padding (padded queries attend causally to real keys, position ids 0..T-1 for all).

Usage: ~/.cache/dlo/venv/bin/python scripts/train_step_reference.py [--out DIR]
"""
import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

V, D, F, L, H, KV, HD = 48, 16, 24, 3, 4, 2, 4
IS_DLO = [False, True, True]
CAPACITY, LAMBDA, ALPHA, BETA, EPS, THETA = 0.75, 1.0, 2.0, 0.05, 1e-5, 10000.0
LR, WD, CLIP = 1e-3, 0.01, 1.0
PAD = 2
ROWS = [
    ([1, 5, 9, 13, 17, 21, 25, 29, 33], [0, 0, 0, 0, 1, 1, 1, 1, 1]),
    ([1, 7, 14, 21, 28, 35], [0, 0, 0, 1, 1, 1]),
    ([1, 40, 3, 44], [0, 0, 1, 1]),
]


def make_weights(seed):
    g = torch.Generator().manual_seed(seed)
    n = lambda *s, std=0.3: torch.randn(*s, generator=g, dtype=torch.float64) * std
    w = {"model.embed_tokens.weight": n(V, D, std=1.0), "lm_head.weight": n(V, D, std=0.3),
         "model.norm.weight": 1.0 + n(D, std=0.1)}
    for l in range(L):
        p = f"model.layers.{l}"
        w[f"{p}.self_attn.q_proj.weight"] = n(H * HD, D)
        w[f"{p}.self_attn.k_proj.weight"] = n(KV * HD, D)
        w[f"{p}.self_attn.v_proj.weight"] = n(KV * HD, D)
        w[f"{p}.self_attn.o_proj.weight"] = n(D, H * HD)
        w[f"{p}.mlp.gate_proj.weight"] = n(F, D)
        w[f"{p}.mlp.up_proj.weight"] = n(F, D)
        w[f"{p}.mlp.down_proj.weight"] = n(D, F)
        w[f"{p}.input_layernorm.weight"] = 1.0 + n(D, std=0.1)
        w[f"{p}.post_attention_layernorm.weight"] = 1.0 + n(D, std=0.1)
        if IS_DLO[l]:
            w[f"model.routers.{l}.weight"] = n(1, D, std=0.5)
    # store in f32 and compute from exactly those values
    return {k: v.float().double() for k, v in w.items()}


def rms(x, w):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def rot(x):
    a, b = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-b, a), -1)


def batch():
    T = max(len(r[0]) for r in ROWS)
    ids, valid, targets = [], [], []
    for r, lab in ROWS:
        for i in range(T):
            real = i < len(r)
            ids.append(r[i] if real else PAD)
            valid.append(real)
            targets.append(r[i + 1] if i + 1 < len(r) and lab[i + 1] else -100)
    return len(ROWS), T, torch.tensor(ids), torch.tensor(valid), torch.tensor(targets)


def forward(w, B, T, ids, valid, dense=False):
    """Returns logits, and per routed layer: scores (graph), exec mask, similarity. `dense`: no routing."""
    h = w["model.embed_tokens.weight"][ids].view(B, T, D)
    pos = torch.arange(T, dtype=torch.float64)
    inv = 1.0 / THETA ** (torch.arange(0, HD, 2, dtype=torch.float64) / HD)
    fr = pos[:, None] * inv[None]
    cos, sin = torch.cat((fr, fr), -1).cos(), torch.cat((fr, fr), -1).sin()
    vm = valid.view(B, T)
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    allowed = causal[None] & vm[:, None, :]  # [B, Tq, Tk]: causal and real key
    N = int(valid.sum())
    traces = []
    for l in range(L):
        p = f"model.layers.{l}"
        routed = IS_DLO[l] and not dense
        if routed:
            z = (h.reshape(B * T, D) @ w[f"model.routers.{l}"+".weight"].T).view(B, T)
            r = torch.sigmoid(z)
            k = max(1, math.ceil(N * min(1.0, CAPACITY)))
            real_scores = r[vm]
            top = torch.sort(real_scores.detach(), descending=True).values
            tau = top[k - 1]
            margin = float(top[k - 1] - top[k]) if k < N else 1.0
            exec_ = vm & (r.detach() >= tau)
        x = rms(h, w[f"{p}.input_layernorm.weight"])
        q = (x @ w[f"{p}.self_attn.q_proj.weight"].T).view(B, T, H, HD).transpose(1, 2)
        kk = (x @ w[f"{p}.self_attn.k_proj.weight"].T).view(B, T, KV, HD).transpose(1, 2)
        vv = (x @ w[f"{p}.self_attn.v_proj.weight"].T).view(B, T, KV, HD).transpose(1, 2)
        q = q * cos + rot(q) * sin
        kk = kk * cos + rot(kk) * sin
        kk = kk.repeat_interleave(H // KV, 1)
        vv = vv.repeat_interleave(H // KV, 1)
        s = q @ kk.transpose(-1, -2) / math.sqrt(HD)
        s = s.masked_fill(~allowed[:, None], float("-inf"))
        a = h + (torch.softmax(s, -1) @ vv).transpose(1, 2).reshape(B, T, H * HD) @ w[f"{p}.self_attn.o_proj.weight"].T

        def mlp(a_):
            y = rms(a_, w[f"{p}.post_attention_layernorm.weight"])
            g_ = torch.nn.functional.silu(y @ w[f"{p}.mlp.gate_proj.weight"].T) * (y @ w[f"{p}.mlp.up_proj.weight"].T)
            return g_ @ w[f"{p}.mlp.down_proj.weight"].T

        m = mlp(a)
        if routed:
            gate = 0.5 * ALPHA + BETA * (r - 0.5)
            h = a + m * gate[..., None] * exec_[..., None].double()
            with torch.no_grad():
                sim = torch.nn.functional.cosine_similarity(a, a + m, dim=-1)
            traces.append(dict(layer=l, scores=r, exec=exec_, sim=sim, margin=margin))
        else:
            h = a + m
    h = rms(h, w["model.norm.weight"])
    return h @ w["lm_head.weight"].T, traces


def step(w):
    B, T, ids, valid, targets = batch()
    params = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    logits, traces = forward(params, B, T, ids, valid)
    ce = torch.nn.functional.cross_entropy(logits.view(B * T, V), targets, ignore_index=-100)
    N = int(valid.sum())
    sims = torch.stack([t["sim"] for t in traces])  # [L_dlo, B, T]
    vm = valid.view(B, T)
    pooled = sims[vm.expand(len(traces), B, T)]
    K = math.ceil(N * len(traces) * CAPACITY)
    srt = torch.sort(pooled).values
    theta = srt[K - 1]
    sim_margin = float(min(srt[K] - srt[K - 1], srt[K - 1] - srt[K - 2]))
    labels = (vm[None] & (sims <= theta)).double()
    scores = torch.stack([t["scores"] for t in traces])
    bce = torch.nn.functional.binary_cross_entropy(scores, labels)
    total = ce + LAMBDA * bce
    total.backward()
    grads = {k: p.grad.clone() for k, p in params.items()}
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
    coef = min(1.0, CLIP / (norm + 1e-6))
    new = {}
    for k, p in params.items():
        g = grads[k] * coef
        decay = not (k.endswith(".bias") or "norm" in k)
        # torch.optim.AdamW, first step
        pw = p.detach() * (1 - LR * WD) if decay else p.detach().clone()
        m = 0.1 * g
        v = 0.001 * g * g
        denom = v.sqrt() / math.sqrt(1 - 0.999) + 1e-8
        new[k] = pw - (LR / (1 - 0.9)) * m / denom
    exp = {
        "ce": float(ce), "route_loss": float(bce), "total": float(total), "grad_norm": norm,
        "n_real": N, "k_global": K, "sim_margin": sim_margin,
        "layers": [
            {
                "layer": t["layer"],
                "exec": [bool(x) for x in t["exec"].flatten()],
                "labels": [float(x) for x in labels[i].flatten()],
                "scores": [float(x) for x in t["scores"].detach().flatten()],
                "similarity": [float(x) for x in t["sim"].flatten()],
                "realised_capacity": float(labels[i].sum()) / N,
                "router_grad": [float(x) for x in grads[f"model.routers.{t['layer']}.weight"].flatten()],
                "router_after": [float(x) for x in new[f"model.routers.{t['layer']}.weight"].flatten()],
                "topk_margin": t["margin"],
            }
            for i, t in enumerate(traces)
        ],
        "lm_head_grad_row0": [float(x) for x in grads["lm_head.weight"][0]],
        "embed_grad_row1": [float(x) for x in grads["model.embed_tokens.weight"][1]],
    }
    return exp, min(t["margin"] for t in traces), sim_margin


def check_against_transformers(w):
    """Our dense forward equals HF transformers' LlamaForCausalLM on the same weights (routers dropped)."""
    try:
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("transformers not available: dense cross-check skipped")
        return
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=F, num_hidden_layers=L, num_attention_heads=H,
                      num_key_value_heads=KV, rms_norm_eps=EPS, rope_theta=THETA, max_position_embeddings=64,
                      tie_word_embeddings=False, attn_implementation="eager")
    m = LlamaForCausalLM(cfg).double().eval()
    m.load_state_dict({k: v for k, v in w.items() if "routers" not in k}, strict=True)
    B, T, ids, valid, _ = batch()
    with torch.no_grad():
        ref = m(input_ids=ids.view(B, T), attention_mask=valid.view(B, T).long()).logits
        ours, _ = forward(w, B, T, ids, valid, dense=True)
    diff = float((ref - ours)[valid.view(B, T)].abs().max())
    # transformers builds the RoPE tables in float32, hence ~1e-6 rather than 1e-12
    assert diff < 1e-4, f"dense forward differs from transformers by {diff}"
    print(f"dense forward matches transformers LlamaForCausalLM (max diff {diff:.1e} on real tokens)")


def main():
    ap = argparse.ArgumentParser()
    here = os.path.dirname(os.path.abspath(__file__))
    ap.add_argument("--out", default=os.path.join(here, "..", "tests", "fixtures", "train_step"))
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    # pick the first seed whose top-k and similarity thresholds are far from ties (f32 vs f64 safe)
    for seed in range(100):
        w = make_weights(seed)
        exp, tm, sm = step(w)
        if tm > 1e-3 and sm > 1e-4:
            break
    else:
        raise SystemExit("no seed with safe margins")
    exp["seed"] = seed
    check_against_transformers(w)
    os.makedirs(args.out, exist_ok=True)
    save_file({k: v.float().contiguous() for k, v in w.items()}, os.path.join(args.out, "model.safetensors"))
    cfg = {
        "architectures": ["LlamaDLOExAttnForCausalLM"], "model_type": "llama_dlo_exattn",
        "vocab_size": V, "hidden_size": D, "intermediate_size": F, "num_hidden_layers": L,
        "num_attention_heads": H, "num_key_value_heads": KV, "head_dim": HD, "hidden_act": "silu",
        "rms_norm_eps": EPS, "rope_theta": THETA, "max_position_embeddings": 64, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": PAD, "torch_dtype": "float32",
        "is_dlo": IS_DLO, "dlo_capacity": CAPACITY, "dlo_loss_coefficient": LAMBDA, "dlo_loss_type": "cos-global",
        "rescale_hidden_states": True, "scale_factor": ALPHA, "scale_gap": BETA, "gate_init_method": "random",
    }
    with open(os.path.join(args.out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    with open(os.path.join(args.out, "batch.json"), "w") as f:
        json.dump({"pad_id": PAD, "rows": [{"ids": r, "labels": [bool(x) for x in lab]} for r, lab in ROWS],
                   "optimizer": {"lr": LR, "weight_decay": WD, "max_grad_norm": CLIP, "schedule": "constant",
                                 "warmup": 0, "train": "all"}}, f, indent=1)
    with open(os.path.join(args.out, "expected.json"), "w") as f:
        json.dump(exp, f, indent=1)
    print(f"seed {seed}: ce {exp['ce']:.6f} bce {exp['route_loss']:.6f} grad norm {exp['grad_norm']:.4f} "
          f"top-k margin {tm:.2e} similarity margin {sm:.2e}")


if __name__ == "__main__":
    main()
