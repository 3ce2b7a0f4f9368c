"""The reference forward pass of dense and DLO-routed Llama checkpoints, written out in PyTorch over HF modules.

Imported by ``gen_fixtures.py`` (the golden fixtures), ``check_hf_load.py`` (trained checkpoints through
``from_pretrained``) and ``eval_reference.py`` (olmo-eval scoring). Needs torch 2.3.0 + transformers 4.40.1
(``bash scripts/setup-python.sh --fixtures``).

Eval semantics of a routed layer (dlo-method.md §4): the router reads the raw residual entering the layer,
``z = w·h`` (no bias), and the token executes the routed unit iff ``σ(z) > 0.5``. Under ``rescale`` the executed
unit's output is scaled by the gate ``g = α/2 + (σ(z) − 1/2)·β`` (``scale_factor`` α, ``scale_gap`` β).
``llama_dlo_exattn`` skips only the MLP (attention runs for every token); ``llama_dlo`` skips the whole layer:
executed tokens, packed in order, attend causally among themselves only, at their original positions.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

F32 = torch.float32

#: model_type → what a router's skip removes.
DLO_MODEL_TYPES = {"llama_dlo_exattn": "mlp", "llama_dlo": "layer"}


def causal_mask(n: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive causal mask [1, 1, n, n]."""
    m = torch.full((n, n), torch.finfo(dtype).min, dtype=dtype).triu(1)
    return m[None, None]


def attn(layer, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of ``x: [1, n, d]`` (already normalised) at position ids ``pos: [n]``."""
    out, _, _ = layer.self_attn(hidden_states=x, attention_mask=causal_mask(x.shape[1], x.dtype), position_ids=pos[None])
    return out


def run(model: LlamaForCausalLM, ids: torch.Tensor, dlo: dict | None = None, routers: dict | None = None, force=None):
    """Logits ``[n, vocab]`` and, per routed layer, (router logits z, exec mask).

    ``dlo``: None (dense) or {"skip": "mlp"|"layer", "alpha", "beta", "rescale"}; ``routers``: layer → w [d].
    ``force``: None (reference rule: execute iff σ(z) > 0.5) or True/False for every routed unit.
    """
    mm = model.model
    n = ids.shape[0]
    pos = torch.arange(n)
    h = mm.embed_tokens(ids[None])  # [1, n, d]
    trace = {}
    for l, layer in enumerate(mm.layers):
        w = None if routers is None else routers.get(l)
        if w is None:
            a = h + attn(layer, layer.input_layernorm(h), pos)
            h = a + layer.mlp(layer.post_attention_layernorm(a))
            continue
        # Router on the raw residual entering the layer, in the model dtype, no bias (dlo-method.md §4.1).
        z = (h @ w.to(h.dtype))[0]  # [n]
        r = torch.sigmoid(z)
        execute = (r > 0.5) if force is None else torch.full((n,), bool(force))
        g = 0.5 * dlo["alpha"] + (r - 0.5) * dlo["beta"] if dlo["rescale"] else torch.ones_like(r)
        idx = execute.nonzero().flatten()
        if dlo["skip"] == "mlp":
            # Attention for all tokens; MLP only for executed ones, scaled by the gate.
            a = h + attn(layer, layer.input_layernorm(h), pos)
            out = a.clone()
            if len(idx):
                sel = a[0, idx]
                out[0, idx] = sel + layer.mlp(layer.post_attention_layernorm(sel)) * g[idx, None]
        else:
            # Whole-layer skip: executed tokens, packed in order, attend causally among themselves only,
            # at their original positions; skipped tokens pass through unchanged.
            out = h.clone()
            if len(idx):
                hp = h[:, idx]
                a = hp + attn(layer, layer.input_layernorm(hp), pos[idx])
                y = a + layer.mlp(layer.post_attention_layernorm(a)) * g[idx, None]
                out[0, idx] = y[0]
        h = out
        trace[l] = (z.detach().float(), execute.clone())
    h = mm.norm(h)
    logits = model.lm_head(h)[0]
    return logits.detach().float(), trace


class Loaded:
    """A checkpoint loaded through ``from_pretrained``: ``model``, and for DLO checkpoints ``dlo`` (the ``run``
    options) and ``routers`` (layer → w [d]); both None for dense ones."""

    def __init__(self, model, dlo: dict | None, routers: dict | None):
        self.model, self.dlo, self.routers = model, dlo, routers

    @property
    def routed(self) -> bool:
        return self.dlo is not None

    def logits(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, vocab]`` (f32) of one sequence ``ids: [n]``: HF's own forward for dense checkpoints, the
        reference routing (``run``) for DLO ones."""
        with torch.no_grad():
            if self.dlo is None:
                return self.model(ids[None]).logits[0].float()
            return run(self.model, ids, self.dlo, self.routers)[0]


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if not single.is_file():
        raise SystemExit(f"{path}: no model.safetensors (nor model.safetensors.index.json)")
    return [single]


def load(path, dtype: torch.dtype = F32) -> Loaded:
    """Load an HF directory with ``from_pretrained`` (so its safetensors metadata and config go through
    transformers' own checks). Dense: ``AutoModelForCausalLM``. DLO (``model_type`` llama_dlo /
    llama_dlo_exattn): the Llama part with ``LlamaForCausalLM`` (every Llama weight must be in the file, and
    the only extra tensors allowed are the routers ``model.routers.{l}.weight`` of the layers ``is_dlo`` marks),
    then the routers read from the same files. Eager attention."""
    from safetensors import safe_open

    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise SystemExit(f"{path}: no config.json")
    cfg = json.loads(cfg_path.read_text())
    skip = DLO_MODEL_TYPES.get(cfg.get("model_type"))
    kw = dict(torch_dtype=dtype, attn_implementation="eager", output_loading_info=True)
    if skip is None:
        model, info = AutoModelForCausalLM.from_pretrained(path, **kw)
        allowed_extra: set[str] = set()
    else:
        model, info = LlamaForCausalLM.from_pretrained(path, **kw)
        is_dlo = cfg.get("is_dlo")
        n = cfg["num_hidden_layers"]
        if not isinstance(is_dlo, list) or len(is_dlo) != n:
            raise SystemExit(f"{cfg_path}: `is_dlo` must list {n} booleans, one per layer (found {is_dlo!r})")
        allowed_extra = {f"model.routers.{l}.weight" for l, on in enumerate(is_dlo) if on}
    problems = []
    if info["missing_keys"]:
        problems.append(f"missing (left randomly initialised): {sorted(info['missing_keys'])}")
    if info["mismatched_keys"]:
        problems.append(f"wrong shape: {info['mismatched_keys']}")
    extra = set(info["unexpected_keys"]) - allowed_extra
    if extra:
        problems.append(f"not used by the model: {sorted(extra)}")
    if problems:
        raise SystemExit(f"{path}: weights do not match the config: " + "; ".join(problems))
    model = model.to(dtype).eval()
    if type(model.model.layers[0].self_attn).__name__ != "LlamaAttention" and skip is not None:
        raise SystemExit(f"{path}: expected eager LlamaAttention, got {type(model.model.layers[0].self_attn).__name__}")
    if skip is None:
        return Loaded(model, None, None)
    d = cfg["hidden_size"]
    routers = {}
    for f in _safetensors_files(path):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                if k in allowed_extra:
                    routers[int(k.split(".")[2])] = st.get_tensor(k)
    for l in sorted(int(k.split(".")[2]) for k in allowed_extra):
        if l not in routers:
            raise SystemExit(f"{path}: layer {l} is routed (is_dlo) but has no tensor model.routers.{l}.weight")
        if tuple(routers[l].shape) != (1, d):
            raise SystemExit(f"{path}: model.routers.{l}.weight has shape {tuple(routers[l].shape)}, expected (1, {d})")
        routers[l] = routers[l][0].to(dtype)
    dlo = {
        "skip": skip,
        "alpha": float(cfg.get("scale_factor", 2.0)),
        "beta": float(cfg.get("scale_gap", 0.05)),
        "rescale": bool(cfg.get("rescale_hidden_states", True)),
    }
    return Loaded(model, dlo, routers)
