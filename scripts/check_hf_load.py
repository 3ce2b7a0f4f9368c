#!/usr/bin/env python3
"""Check that an HF directory written by `dlo-compile import` loads in HF transformers.

Usage: ~/.cache/dlo/venv/bin/python scripts/check_hf_load.py DIR [--ids 1,2,3] [--prompt TEXT]
                                                              [--max-new-tokens N] [--gguf-tokenizer FILE]

Loads DIR with AutoModelForCausalLM (and AutoTokenizer when DIR has tokenizer files), prints the logits of
the last position for --ids, and the greedy continuation of --prompt. Without tokenizer files in DIR,
--gguf-tokenizer builds a byte-level BPE tokenizer from a GGUF's metadata (llama.cpp's gguf-py, found via
$GGUF_PY or ~/.cache/dlo/llama.cpp-build/src/gguf-py) only to turn the prompt into ids.
Exit status 0 when everything loaded; the caller judges the text.
"""
import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


def gguf_bpe_tokenizer(path):
    """A `tokenizers.Tokenizer` from GGUF byte-level BPE metadata (the recipe in docs/assets.md)."""
    sys.path.insert(0, os.environ.get("GGUF_PY", os.path.expanduser("~/.cache/dlo/llama.cpp-build/src/gguf-py")))
    from gguf import GGUFReader
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, AddedToken

    r = GGUFReader(path)

    def field(name):
        f = r.fields[name]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    if bytes(r.fields["tokenizer.ggml.model"].parts[-1]).decode() != "gpt2":
        raise SystemExit(f"{path}: only byte-level BPE (tokenizer.ggml.model = gpt2) is handled here")
    tokens, merges = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.merges")
    types = [int(r.fields["tokenizer.ggml.token_type"].parts[i][0]) for i in r.fields["tokenizer.ggml.token_type"].data]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)},
                               merges=[tuple(m.split(" ", 1)) for m in merges]))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--ids", default="1,504,3575,282")
    ap.add_argument("--prompt", default="The capital of France is")
    ap.add_argument("--max-new-tokens", type=int, default=12)
    ap.add_argument("--nll-text", default="The capital of France is Paris. The capital of Germany is Berlin. "
                    "The capital of Italy is Rome.")
    ap.add_argument("--gguf-tokenizer")
    a = ap.parse_args()

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(a.dir, torch_dtype=torch.float32)
    model.eval()
    print(f"loaded {type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters")

    ids = [int(x) for x in a.ids.split(",")]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    print(f"logits for ids {ids}: shape {tuple(logits.shape)}")
    print(f"  last position, first 5: {[round(x, 4) for x in logits[-1, :5].tolist()]}; argmax {int(logits[-1].argmax())}")

    has_tok = os.path.exists(os.path.join(a.dir, "tokenizer.json"))
    if has_tok:
        hf_tok = AutoTokenizer.from_pretrained(a.dir)
        encode = lambda s: hf_tok(s, return_tensors="pt").input_ids[0].tolist()
        decode = lambda t: hf_tok.decode(t, skip_special_tokens=False)
        print(f"tokenizer: {type(hf_tok).__name__} from {a.dir}")
    elif a.gguf_tokenizer:
        t = gguf_bpe_tokenizer(a.gguf_tokenizer)
        encode = lambda s: t.encode(s, add_special_tokens=False).ids
        decode = lambda ids_: t.decode(ids_, skip_special_tokens=False)
        print(f"tokenizer: built from {a.gguf_tokenizer} (DIR has none)")
    else:
        print("no tokenizer in DIR and no --gguf-tokenizer: skipping the text check")
        return
    prompt_ids = encode(a.prompt)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=a.max_new_tokens, do_sample=False)
    text = decode(out[0, len(prompt_ids):].tolist())
    print(f"prompt ids: {prompt_ids}")
    print(f"greedy continuation of {a.prompt!r}: {text!r}")
    print(f"contains 'Paris': {'Paris' in text}")
    nll_ids = encode(a.nll_text)
    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([nll_ids])).logits[0, :-1], dim=-1)
    nll = -lp.gather(1, torch.tensor(nll_ids[1:])[:, None]).mean().item()
    print(f"mean NLL of {a.nll_text!r} ({len(nll_ids)} tokens): {nll:.4f} nats/token")


if __name__ == "__main__":
    main()
