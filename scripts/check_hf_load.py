#!/usr/bin/env python3
"""Check that an HF directory written by `dlo-compile import` or `dlo-compile train` loads in HF transformers.

Usage: ~/.cache/dlo/venv/bin/python scripts/check_hf_load.py DIR [--ids 1,2,3] [--prompt TEXT]
                                                              [--max-new-tokens N] [--gguf-tokenizer FILE]
                                                              [--logits-out FILE.json]

Loads DIR with `from_pretrained` (and AutoTokenizer when DIR has tokenizer files), prints the logits of the
last position for --ids, and the greedy continuation of --prompt. Without tokenizer files in DIR,
--gguf-tokenizer builds a byte-level BPE tokenizer from a GGUF's metadata (llama.cpp's gguf-py, found via
$GGUF_PY or ~/.cache/dlo/llama.cpp-build/src/gguf-py) only to turn the prompt into ids.
Exit status 0 when everything loaded; the caller judges the text.

A DLO checkpoint (`model_type` llama_dlo / llama_dlo_exattn, routers `model.routers.{l}.weight`) loads its
Llama part with `LlamaForCausalLM.from_pretrained` and runs the reference's routed eval forward over it
(`dlo_reference.py`); its greedy continuation reruns that forward over the whole sequence at every step.

--logits-out FILE.json: only load DIR and write, for --ids, `{"ids": [...], "logits": [[f32 per vocab entry]
per position], "routed": {"<layer>": {"router_logits": [z per position], "exec": [0/1 per position]}}}`
(`routed` is empty for a dense checkpoint); the values are the f32 results, printed exactly.
"""
import argparse
import json
import os
import sys

import torch
from transformers import AutoTokenizer

import dlo_reference


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
    ap.add_argument("--logits-out", help="write the logits (and routing) for --ids to this JSON file and stop")
    a = ap.parse_args()

    torch.manual_seed(0)
    loaded = dlo_reference.load(a.dir)
    model = loaded.model
    kind = f"DLO ({loaded.dlo['skip']} skip, routers on layers {sorted(loaded.routers)})" if loaded.routed else "dense"
    print(f"loaded {type(model).__name__}, {kind}: {sum(p.numel() for p in model.parameters()):,} parameters")

    try:
        ids = [int(x) for x in a.ids.split(",")]
    except ValueError:
        raise SystemExit(f"--ids {a.ids!r}: expected comma-separated token ids")
    vocab = model.config.vocab_size
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise SystemExit(f"--ids: {bad} outside the vocabulary (0..{vocab})")
    if a.logits_out:
        write_logits(loaded, ids, a.logits_out)
        return
    logits = loaded.logits(torch.tensor(ids))
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
    if loaded.routed:
        out_ids = list(prompt_ids)
        for _ in range(a.max_new_tokens):
            out_ids.append(int(loaded.logits(torch.tensor(out_ids))[-1].argmax()))
        new = out_ids[len(prompt_ids):]
    else:
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=a.max_new_tokens, do_sample=False)
        new = out[0, len(prompt_ids):].tolist()
    text = decode(new)
    print(f"prompt ids: {prompt_ids}")
    print(f"greedy continuation of {a.prompt!r}: {text!r}")
    print(f"contains 'Paris': {'Paris' in text}")
    nll_ids = encode(a.nll_text)
    with torch.no_grad():
        lp = torch.log_softmax(loaded.logits(torch.tensor(nll_ids))[:-1], dim=-1)
    nll = -lp.gather(1, torch.tensor(nll_ids[1:])[:, None]).mean().item()
    print(f"mean NLL of {a.nll_text!r} ({len(nll_ids)} tokens): {nll:.4f} nats/token")


def write_logits(loaded, ids, path):
    """The ``--logits-out`` file (see the module docs)."""
    n = torch.tensor(ids)
    if loaded.routed:
        with torch.no_grad():
            logits, trace = dlo_reference.run(loaded.model, n, loaded.dlo, loaded.routers)
    else:
        logits, trace = loaded.logits(n), {}
    doc = {
        "ids": ids,
        "logits": logits.tolist(),
        "routed": {str(l): {"router_logits": z.tolist(), "exec": e.int().tolist()} for l, (z, e) in trace.items()},
    }
    with open(path, "w") as f:
        json.dump(doc, f)
    rates = " ".join(f"{l}:{int(e.sum())}/{len(e)}" for l, (_, e) in trace.items())
    print(f"wrote {path}: logits {tuple(logits.shape)}, max |logit| {logits.abs().max():.4f}"
          + (f"; executed per routed layer {rates}" if rates else ""))


if __name__ == "__main__":
    main()
