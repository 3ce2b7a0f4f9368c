#!/usr/bin/env python3
"""Convert a Llama-architecture GGUF (e.g. SmolLM2-135M-Instruct Q4_1) to an HF directory in f32.

Benchmark/reference helper: gives HF transformers (4.40.1 cannot read GGUF) exactly the weights llama.cpp
runs after dequantisation. Reads the GGUF with llama.cpp's own `gguf-py` (from the llama.cpp sources:
$LLAMA_CPP_SRC/gguf-py), dequantises every tensor to f32, undoes llama.cpp's Q/K row permutation, and
writes config.json, model.safetensors, tokenizer.json (byte-level BPE from the GGUF vocabulary) and
tokenizer_config.json (with the chat template). Writes into a temporary directory, then renames.

    ~/.cache/dlo/venv/bin/python scripts/gguf_to_hf.py IN.gguf OUT_DIR [--check]

`--check` reloads OUT_DIR with HF transformers and prints the mean NLL of assets.md's 21-token sentence
(reference: 1.317 nats/token) and the greedy answer to the ChatML prompt "What is the capital of France?".
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np


def find_gguf_py() -> None:
    cache = Path(os.environ.get("DLO_CACHE", Path.home() / ".cache" / "dlo"))
    cands = []
    if os.environ.get("LLAMA_CPP_SRC"):
        cands.append(Path(os.environ["LLAMA_CPP_SRC"]) / "gguf-py")
    cands += [Path(p) / "gguf-py" for p in glob.glob(str(cache / "pkgs/llama-cpp-python/llama_cpp_python-*/vendor/llama.cpp"))]
    cands.append(cache / "llama.cpp-build/src/gguf-py")
    for c in cands:
        if (c / "gguf" / "__init__.py").exists():
            sys.path.insert(0, str(c))
            return
    sys.exit("error: llama.cpp's gguf-py not found; set LLAMA_CPP_SRC or run DLO_FETCH_LLAMA_CPP=1 scripts/fetch-assets.sh")


def field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's rotary row permutation of attn_q / attn_k (per head: (hd/2, 2) → (2, hd/2))."""
    out, inp = w.shape
    return w.reshape(n_head, out // n_head // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def convert(src: Path, dst: Path) -> None:
    find_gguf_py()
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    r = GGUFReader(str(src))
    arch = field(r, "general.architecture")
    if arch != "llama":
        sys.exit(f"error: {src}: general.architecture is {arch!r}, only 'llama' is supported")
    p = f"{arch}."
    n_head = int(field(r, p + "attention.head_count"))
    n_kv = int(field(r, p + "attention.head_count_kv", n_head))
    tensors = {}
    names = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    per_layer = {
        "attn_norm": "input_layernorm",
        "ffn_norm": "post_attention_layernorm",
        "attn_q": "self_attn.q_proj",
        "attn_k": "self_attn.k_proj",
        "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj",
        "ffn_gate": "mlp.gate_proj",
        "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj",
    }
    for t in r.tensors:
        w = np.ascontiguousarray(dequantize(t.data, t.tensor_type).astype(np.float32))
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF dims are fastest-first
        w = w.reshape(shape)
        if t.name in names:
            hf = names[t.name]
        else:
            parts = t.name.split(".")  # blk.N.kind.weight
            if parts[0] != "blk" or parts[2] not in per_layer:
                sys.exit(f"error: {src}: unexpected tensor {t.name}")
            hf = f"model.layers.{parts[1]}.{per_layer[parts[2]]}.{parts[3]}"
            if parts[2] == "attn_q":
                w = unpermute(w, n_head)
            elif parts[2] == "attn_k":
                w = unpermute(w, n_kv)
        tensors[hf] = np.ascontiguousarray(w)
    tied = "lm_head.weight" not in tensors
    vocab, hidden = tensors["model.embed_tokens.weight"].shape
    tokens = [str(x) for x in field(r, "tokenizer.ggml.tokens")]
    eos = field(r, "tokenizer.ggml.eos_token_id")
    bos = field(r, "tokenizer.ggml.bos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab),
        "hidden_size": int(hidden),
        "intermediate_size": int(field(r, p + "feed_forward_length")),
        "num_hidden_layers": int(field(r, p + "block_count")),
        "num_attention_heads": n_head,
        "num_key_value_heads": n_kv,
        "max_position_embeddings": int(field(r, p + "context_length")),
        "rms_norm_eps": float(field(r, p + "attention.layer_norm_rms_epsilon")),
        "rope_theta": float(field(r, p + "rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
        "attention_bias": False,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "torch_dtype": "float32",
        "initializer_range": 0.02,
    }
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}-", dir=dst.parent))
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if field(r, "tokenizer.ggml.model") == "gpt2":
            write_bpe_tokenizer(r, tokens, tmp)
        shutil.rmtree(dst, ignore_errors=True)
        os.replace(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {dst}: {len(tensors)} tensors, tied={tied}")


def write_bpe_tokenizer(r, tokens, out: Path) -> None:
    """tokenizer.json for a byte-level BPE GGUF vocabulary (as assets.md describes for SmolLM2)."""
    merges = [str(m) for m in field(r, "tokenizer.ggml.merges")]
    types = [int(x) for x in field(r, "tokenizer.ggml.token_type")]
    added = [
        {"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for i, ty in enumerate(types) if ty == 3
    ]
    tok = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
            "vocab": {t: i for i, t in enumerate(tokens)},
            "merges": merges,
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    eos = field(r, "tokenizer.ggml.eos_token_id")
    bos = field(r, "tokenizer.ggml.bos_token_id")
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(field(r, "tokenizer.ggml.add_bos_token", False)),
        "bos_token": tokens[int(bos)] if bos is not None else None,
        "eos_token": tokens[int(eos)] if eos is not None else None,
        "pad_token": tokens[int(eos)] if eos is not None else None,
        "chat_template": field(r, "tokenizer.chat_template"),
        "model_max_length": int(field(r, "llama.context_length", 8192)),
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


def check(dst: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(dst)
    model = AutoModelForCausalLM.from_pretrained(dst, torch_dtype=torch.float32).eval()
    text = "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome."
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0]
    nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:]).item()
    print(f"{ids.shape[1]} tokens, mean NLL {nll:.4f} nats/token (reference 1.317)")
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    pids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(pids, max_new_tokens=20, do_sample=False)
    print("greedy answer:", repr(tok.decode(out[0, pids.shape[1]:], skip_special_tokens=True)))


def main() -> None:
    ap = argparse.ArgumentParser(description="GGUF (llama) → HF directory, f32")
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--check", action="store_true", help="reload with HF transformers and print NLL / greedy answer")
    a = ap.parse_args()
    if not a.src.is_file():
        sys.exit(f"error: {a.src}: no such file")
    a.dst.parent.mkdir(parents=True, exist_ok=True)
    convert(a.src, a.dst)
    if a.check:
        check(a.dst)


if __name__ == "__main__":
    main()
