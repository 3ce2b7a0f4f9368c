#!/usr/bin/env python3
"""Prefill and decode throughput of HF transformers (PyTorch, CPU) on an HF directory, measured like llama-bench.

    ~/.cache/dlo/venv/bin/python scripts/bench_hf.py MODEL_DIR [--prompt-tokens 128] [--gen-tokens 64]
        [--threads 2] [--dtype f32|bf16] [--reps 3]

Prefill: one forward pass over a fixed prompt from an empty cache. Decode: single-token steps with the KV
cache from an empty context, feeding each step's argmax. One warm-up, then the mean over --reps, printed as
`prefill_tok_s=X decode_tok_s=Y` (the same line as our benchmark).
"""

import argparse
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    model = AutoModelForCausalLM.from_pretrained(a.model, torch_dtype=dtype).eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 7919 + 13) % vocab for i in range(a.prompt_tokens)]])

    @torch.inference_mode()
    def prefill() -> float:
        t = time.perf_counter()
        out = model(prompt, use_cache=True)
        out.logits[0, -1].argmax().item()
        return time.perf_counter() - t

    @torch.inference_mode()
    def decode() -> float:
        past = None
        tok = prompt[:, :1]
        t = time.perf_counter()
        for _ in range(a.gen_tokens):
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
        return time.perf_counter() - t

    prefill()
    decode()
    pp = [a.prompt_tokens / prefill() for _ in range(a.reps)]
    tg = [a.gen_tokens / decode() for _ in range(a.reps)]
    print(
        f"HF transformers {a.dtype}: pp{a.prompt_tokens} {statistics.mean(pp):.1f} tok/s, "
        f"tg{a.gen_tokens} {statistics.mean(tg):.1f} tok/s ({a.reps} reps, {a.threads} threads)",
        file=sys.stderr,
    )
    print(f"prefill_tok_s={statistics.mean(pp):.2f} decode_tok_s={statistics.mean(tg):.2f}")


if __name__ == "__main__":
    main()
