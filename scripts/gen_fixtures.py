#!/usr/bin/env python3
"""Generate the golden reference fixtures under tests/fixtures/ with HF transformers (PyTorch, CPU).

Run with the project venv (torch 2.3.0, transformers 4.40.1):

    ~/.cache/dlo/venv/bin/python scripts/gen_fixtures.py [--out tests/fixtures]

Every fixture is a small random Llama-family checkpoint in HF layout (``config.json`` + ``model.safetensors``)
plus ``golden.safetensors`` holding fixed ``input_ids`` (i64, ``[n]``) and the reference ``logits`` (f32,
``[n, vocab]``) of one forward pass over them, at positions ``0..n``.

Fixtures:

- ``llama_gqa``: GQA (4 query heads, 2 KV heads), untied lm_head. Also ``logits_bf16``.
- ``llama_tied``: tied embeddings; weights stored in f32 (the others store bf16). Also ``logits_bf16``.
- ``llama3_rope``: ``rope_scaling`` of type ``llama3`` (factor 8, low 1, high 4, original context 32) and 64
  positions, so all three frequency regimes (kept, smoothed, divided) are exercised. transformers 4.40.1
  predates llama3 scaling (added in 4.43), so the scaled inverse frequencies are computed here, following
  HF's later ``_compute_llama3_parameters``, and written into every layer's rotary embedding; the config is
  saved without scaling by HF and the ``rope_scaling`` entry is added to config.json afterwards.
  Also ``logits_bf16``.
- ``dlo_mlp`` (``model_type: llama_dlo_exattn``) and ``dlo_layer`` (``llama_dlo``): DLO-routed checkpoints with
  routers on every layer but layer 0. The reference eval semantics (dlo-method.md §4) are written out in
  PyTorch over the HF modules in ``dlo_reference.py`` (``run``). Besides ``logits``, the golden file holds per
  routed layer ``l``: ``exec.{l}`` (u8, 1 = the token executed the routed unit) and ``router_logit.{l}`` (f32,
  ``z = w·h``).

Numerics: weights are drawn in f32 with HF's initialiser at ``initializer_range=0.2`` (std 0.02 would give
near-zero logits) and norm weights uniform in [0.5, 1.5]. All weights except ``llama_tied``'s are then rounded
to bf16-representable values and stored as bf16: the f32 reference computes on exactly the stored values
(no loss), the files are half the size, and the bf16 reference (``logits_bf16``: the same model cast to
bfloat16, eager attention, RoPE frequencies kept in f32 as current HF does) differs from f32 only by
computing in bf16, not by weight rounding. Router weights are chosen so that roughly half the tokens execute
and no router logit lies near the decision boundary (|z| ≥ 0.05·std(z)), so f32 summation order cannot flip
a decision.

The script checks itself: its explicit layer loop reproduces ``LlamaForCausalLM``'s logits on the dense
fixtures, and on the routed ones with every unit forced on and the gate off it reduces to the dense model.
It is deterministic (fixed seeds, CPU); rerunning it rewrites identical tensors.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from dlo_reference import run

F32 = torch.float32
BF16 = torch.bfloat16


# ----------------------------------------------------------------------------------------------------------
# Model construction


def make_config(
    *,
    vocab: int,
    hidden: int,
    inter: int,
    layers: int,
    heads: int,
    kv_heads: int,
    tied: bool,
    max_pos: int = 256,
) -> LlamaConfig:
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_pos,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        tie_word_embeddings=tied,
        initializer_range=0.2,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        attention_bias=False,
    )
    # Eager attention: the softmax is upcast to f32 as the runtime does; sdpa would be the same in f32.
    cfg._attn_implementation = "eager"
    return cfg


def make_model(cfg: LlamaConfig, seed: int, bf16_weights: bool) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(F32).eval()
    assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention", "expected eager attention"
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=g))
        if bf16_weights:
            for p in model.parameters():
                p.copy_(p.to(BF16).to(F32))
    return model


def llama3_inv_freq(head_dim: int, theta: float, factor: float, low: float, high: float, old_ctx: int) -> torch.Tensor:
    """Llama 3.1 RoPE scaling of the inverse frequencies, in f32 as HF's ``_compute_llama3_parameters``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)


def set_inv_freq(model: LlamaForCausalLM, inv_freq: torch.Tensor) -> None:
    for layer in model.model.layers:
        layer.self_attn.rotary_emb.inv_freq = inv_freq.clone().to(F32)


def to_bf16(model: LlamaForCausalLM) -> LlamaForCausalLM:
    """A bfloat16 copy; the RoPE inverse frequencies stay f32 (``.to`` would round the buffer too)."""
    inv = [layer.self_attn.rotary_emb.inv_freq.clone() for layer in model.model.layers]
    m = LlamaForCausalLM(model.config).eval()
    m.load_state_dict(model.state_dict())
    m = m.to(BF16)
    for layer, f in zip(m.model.layers, inv):
        layer.self_attn.rotary_emb.inv_freq = f.to(F32)
    return m


# ----------------------------------------------------------------------------------------------------------
# Writing


def save_hf(model: LlamaForCausalLM, out: Path, bf16_weights: bool, config_patch: dict | None = None) -> None:
    m = to_bf16(model) if bf16_weights else model
    m.save_pretrained(out, safe_serialization=True)
    if config_patch:
        p = out / "config.json"
        cfg = json.loads(p.read_text())
        cfg.update(config_patch)
        p.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen = out / "generation_config.json"
    if gen.exists():
        gen.unlink()


def meta() -> dict:
    return {
        "generator": "scripts/gen_fixtures.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def save_golden(out: Path, tensors: dict) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "golden.safetensors"), metadata=meta())


def fixed_ids(n: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n,), generator=g, dtype=torch.int64)


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def report(name: str, logits: torch.Tensor, bf16: torch.Tensor | None = None) -> None:
    line = f"{name}: logits {tuple(logits.shape)} std {logits.std():.3f} max|.| {logits.abs().max():.3f}"
    if bf16 is not None:
        line += f"; bf16 vs f32 max diff {max_abs(bf16, logits):.4f}"
    print(line)


# ----------------------------------------------------------------------------------------------------------
# Fixtures


def dense_fixture(out: Path, name: str, cfg: LlamaConfig, seed: int, n_ids: int, bf16_weights: bool, rope=None):
    model = make_model(cfg, seed, bf16_weights)
    patch = None
    if rope is not None:
        inv = llama3_inv_freq(cfg.hidden_size // cfg.num_attention_heads, cfg.rope_theta, **rope)
        set_inv_freq(model, inv)
        patch = {
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": rope["factor"],
                "low_freq_factor": rope["low"],
                "high_freq_factor": rope["high"],
                "original_max_position_embeddings": rope["old_ctx"],
            }
        }
    ids = fixed_ids(n_ids, cfg.vocab_size, seed + 2)
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
        mine, _ = run(model, ids)
        assert max_abs(ref, mine) < 1e-5, f"{name}: explicit loop differs from HF by {max_abs(ref, mine)}"
        mb = to_bf16(model)
        ref_bf16 = mb(ids[None]).logits[0].float()
    d = out / name
    save_hf(model, d, bf16_weights, patch)
    save_golden(d, {"input_ids": ids, "logits": ref, "logits_bf16": ref_bf16})
    report(name, ref, ref_bf16)
    return model


def pick_router(h: torch.Tensor, seed: int, bf16_weights: bool) -> torch.Tensor:
    """A router weight w [d] for residuals ``h: [n, d]``: about half the tokens get z = h·w > 0, none near 0."""
    g = torch.Generator().manual_seed(seed)
    best, best_score = None, -1.0
    for _ in range(200):
        u = torch.randn(h.shape[1], generator=g)
        z = h @ u
        w = u * (2.0 / z.std())  # router logits with std ≈ 2: the gate sees a spread of σ(z)
        if bf16_weights:
            w = w.to(BF16).to(F32)
        z = h @ w
        frac = (z > 0).float().mean().item()
        if not 0.35 <= frac <= 0.65:
            continue
        margin = (z.abs().min() / z.std()).item()
        if margin > best_score:
            best, best_score = w, margin
    assert best is not None and best_score >= 0.05, f"no router with a safe margin (best {best_score})"
    return best


def dlo_fixture(out: Path, name: str, cfg: LlamaConfig, seed: int, n_ids: int, dlo: dict):
    model = make_model(cfg, seed, bf16_weights=True)
    ids = fixed_ids(n_ids, cfg.vocab_size, seed + 2)
    n_layers = cfg.num_hidden_layers
    routers: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        # Choose routers layer by layer: the residual entering layer l depends on the routers below it.
        for l in range(1, n_layers):
            h = capture_input(model, ids, dlo, routers, l)
            routers[l] = pick_router(h, seed * 100 + l, bf16_weights=True)
        logits, trace = run(model, ids, dlo, routers)
        # Self-checks of the reference semantics.
        dense = model(ids[None]).logits[0].float()
        plain = dict(dlo, rescale=False)
        on, _ = run(model, ids, plain, routers, force=True)
        assert max_abs(on, dense) < 1e-5, f"{name}: forced-on routing differs from dense by {max_abs(on, dense)}"
        for l in range(1, n_layers):
            z = trace[l][0]
            assert (z.abs() / z.std()).min() >= 0.05, f"{name}: layer {l} has a router logit near the boundary"
    d = out / name
    save_hf(model, d, bf16_weights=True)
    # The reference's DLO config keys (dlo-method.md §3.6); weights gain model.routers.{l}.weight [1, d].
    cfgp = d / "config.json"
    c = json.loads(cfgp.read_text())
    skip = dlo["skip"]
    c.update(
        {
            "model_type": "llama_dlo_exattn" if skip == "mlp" else "llama_dlo",
            "architectures": ["LlamaDLOExAttnForCausalLM" if skip == "mlp" else "LlamaDLOForCausalLM"],
            "is_dlo": [l in routers for l in range(n_layers)],
            "dlo_capacity": 0.9,
            "dlo_loss_coefficient": 1.0,
            "dlo_loss_type": "cos-global",
            "rescale_hidden_states": dlo["rescale"],
            "scale_factor": dlo["alpha"],
            "scale_gap": dlo["beta"],
            "gate_init_method": "random",
            "use_cache": skip == "mlp",
        }
    )
    cfgp.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")
    from safetensors.torch import load_file

    st = load_file(str(d / "model.safetensors"))
    for l, w in routers.items():
        st[f"model.routers.{l}.weight"] = w.to(BF16)[None].contiguous()
    save_file(st, str(d / "model.safetensors"), metadata={"format": "pt"})
    golden = {"input_ids": ids, "logits": logits}
    rates = []
    for l, (z, e) in trace.items():
        golden[f"router_logit.{l}"] = z
        golden[f"exec.{l}"] = e.to(torch.uint8)
        rates.append(f"{l}:{int(e.sum())}/{len(e)}")
    save_golden(d, golden)
    report(name, logits)
    print(f"  executed per routed layer: {' '.join(rates)}; dense-vs-routed max diff {max_abs(logits, dense):.3f}")


def capture_input(model, ids, dlo, routers, upto: int) -> torch.Tensor:
    """The residual entering layer ``upto`` under ``routers`` (a truncated copy of the model run)."""
    layers = model.model.layers
    saved = list(layers)
    try:
        model.model.layers = torch.nn.ModuleList(saved[:upto])
        captured = {}
        orig_norm = model.model.norm

        class Grab(torch.nn.Module):
            def forward(self, x):
                captured["h"] = x[0].clone()
                return orig_norm(x)

        model.model.norm = Grab()
        try:
            run(model, ids, dlo, routers)
        finally:
            model.model.norm = orig_norm
    finally:
        model.model.layers = torch.nn.ModuleList(saved)
    return captured["h"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "fixtures")
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    # Write into a temporary sibling, then swap each fixture in: never a half-written fixture directory.
    tmp = Path(tempfile.mkdtemp(prefix=".fixtures-", dir=out))
    try:
        gqa = make_config(vocab=256, hidden=64, inter=128, layers=2, heads=4, kv_heads=2, tied=False)
        dense_fixture(tmp, "llama_gqa", gqa, seed=1, n_ids=16, bf16_weights=True)
        tied = make_config(vocab=256, hidden=32, inter=64, layers=2, heads=4, kv_heads=2, tied=True)
        dense_fixture(tmp, "llama_tied", tied, seed=2, n_ids=16, bf16_weights=False)
        # head_dim 16 → wavelengths 6.3 (< 8: kept), 19.9 (8..32: smoothed), ≥ 62.8 (> 32: divided by 8).
        rope = make_config(vocab=128, hidden=32, inter=64, layers=2, heads=2, kv_heads=1, tied=False)
        dense_fixture(
            tmp, "llama3_rope", rope, seed=3, n_ids=64, bf16_weights=True,
            rope={"factor": 8.0, "low": 1.0, "high": 4.0, "old_ctx": 32},
        )
        small = make_config(vocab=128, hidden=32, inter=64, layers=3, heads=4, kv_heads=2, tied=False)
        # mlp skip with the paper's gate (α=2, β=0.05); layer skip with the convert CLI's (α=1, β=1), under
        # which the gate σ(z) visibly scales the MLP output.
        dlo_fixture(tmp, "dlo_mlp", small, seed=4, n_ids=24, dlo={"skip": "mlp", "alpha": 2.0, "beta": 0.05, "rescale": True})
        dlo_fixture(tmp, "dlo_layer", small, seed=5, n_ids=24, dlo={"skip": "layer", "alpha": 1.0, "beta": 1.0, "rescale": True})
        for d in sorted(tmp.iterdir()):
            dest = out / d.name
            if dest.exists():
                shutil.rmtree(dest)
            os.replace(d, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    print(f"wrote {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
