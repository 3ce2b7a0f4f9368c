#!/usr/bin/env python3
"""PyTorch side of the training benchmark (`scripts/bench-train.sh`): tokens/s of the same SFT step.

The model is HF transformers' published LLaMA modeling (`LlamaForCausalLM`, SDPA attention); for a DLO checkpoint
(`is_dlo` in config.json) the decoder layers are driven one by one with DLO's training routing added around
them, exactly as `dlo-compile train` computes it (docs/dlo-method.md §4.2, §5; the semantics of
scripts/train_step_reference.py): router z = w·h on the residual entering the layer, r = σ(z), batch-level
top-k over real tokens at capacity c (ties pass), gate 0.5·α + β·(r − 0.5) on the MLP output of selected tokens,
the MLP run densely (its output is the similarity signal), cos(a, a + MLP) without gradient, cos-global labels,
BCE with weight λ, AdamW with global grad-norm clipping. Without `is_dlo` it is plain SFT (HF's own loss path).

Data as `dlo-compile train --pack`: GSM8K question → answer through the model's chat template, loss on the
answer tokens, examples packed into rows of at most --seq-len tokens, --batch rows per step. Prints one JSON
line: {"tokens_per_s": ..., "steps": ..., "tokens": ..., "seconds": ...} over the timed steps (after --warmup).

Usage: ~/.cache/dlo/venv/bin/python scripts/bench_train_torch.py MODEL_DIR --data GSM8K_REQUESTS
       [--batch 4] [--seq-len 256] [--steps 4] [--warmup 1] [--threads N] [--capacity 0.5]
"""
import argparse
import gzip
import json
import math
import random
import time

import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM


def load_model(path):
    cfg = json.load(open(f"{path}/config.json"))
    is_dlo = cfg.get("is_dlo") or [False] * cfg["num_hidden_layers"]
    keep = {k: v for k, v in cfg.items() if not k.startswith("dlo_") and k not in ("is_dlo", "architectures")}
    keep["model_type"] = "llama"
    lc = LlamaConfig(**keep)
    lc._attn_implementation = "sdpa"
    model = LlamaForCausalLM(lc)
    sd = load_file(f"{path}/model.safetensors")
    routers = torch.zeros(lc.num_hidden_layers, lc.hidden_size)
    for l in range(lc.num_hidden_layers):
        w = sd.pop(f"model.routers.{l}.weight", None)
        if w is not None:
            routers[l] = w.float().view(-1)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=False)
    assert not unexpected, unexpected
    assert all(k == "lm_head.weight" for k in missing), missing
    if lc.tie_word_embeddings:
        model.tie_weights()
    model.float().train()
    return model, cfg, is_dlo, torch.nn.Parameter(routers)


def rows_from_gsm8k(path, tok, seq_len, seed):
    examples = []
    with gzip.open(path, "rt") as f:
        for line in f:
            doc = json.loads(line)["doc"]
            user = [{"role": "user", "content": doc["question"]}]
            prompt = tok.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
            full = tok.apply_chat_template(user + [{"role": "assistant", "content": doc["answer"]}], tokenize=True)
            full = full[:seq_len]
            labels = [i >= len(prompt) for i in range(len(full))]
            if any(labels):
                examples.append((full, labels))
    random.Random(seed).shuffle(examples)
    rows = []
    for ids, lab in examples:
        if rows and len(rows[-1][0]) + len(ids) <= seq_len:
            rows[-1][0].extend(ids)
            rows[-1][1].extend(lab)
        else:
            rows.append((list(ids), list(lab)))
    return rows


def make_batch(rows, pad):
    T = max(len(r[0]) for r in rows)
    ids = torch.full((len(rows), T), pad, dtype=torch.long)
    valid = torch.zeros(len(rows), T, dtype=torch.bool)
    targets = torch.full((len(rows), T), -100, dtype=torch.long)
    for b, (r, lab) in enumerate(rows):
        n = len(r)
        ids[b, :n] = torch.tensor(r)
        valid[b, :n] = True
        for i in range(n - 1):
            if lab[i + 1]:
                targets[b, i] = r[i + 1]
    return ids, valid, targets


def dlo_loss(model, routers, cfg, is_dlo, ids, valid, targets, capacity):
    B, T = ids.shape
    inner = model.model
    h = inner.embed_tokens(ids)
    pos = torch.arange(T).unsqueeze(0).expand(B, T)
    allowed = torch.tril(torch.ones(T, T, dtype=torch.bool))[None] & valid[:, None, :]
    mask = torch.zeros(B, 1, T, T).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)
    N = int(valid.sum())
    alpha, beta = cfg.get("scale_factor", 2.0), cfg.get("scale_gap", 0.05)
    rescale = cfg.get("rescale_hidden_states", True)
    scores, sims = [], []
    for l, layer in enumerate(inner.layers):
        x = layer.input_layernorm(h)
        att = layer.self_attn(hidden_states=x, attention_mask=mask, position_ids=pos)[0]
        if not is_dlo[l]:
            a = h + att
            h = a + layer.mlp(layer.post_attention_layernorm(a))
            continue
        r = torch.sigmoid(h @ routers[l])
        k = max(1, math.ceil(N * min(1.0, capacity)))
        tau = torch.topk(r.detach()[valid], k).values[-1]
        sel = (valid & (r.detach() >= tau)).to(h.dtype)
        a = h + att
        m = layer.mlp(layer.post_attention_layernorm(a))
        g = 0.5 * alpha + beta * (r - 0.5) if rescale else torch.ones_like(r)
        with torch.no_grad():
            sims.append(torch.nn.functional.cosine_similarity(a.double(), (a + m).double(), dim=-1))
        h = a + m * (g * sel)[..., None]
        scores.append(r)
    logits = model.lm_head(inner.norm(h))
    ce = torch.nn.functional.cross_entropy(logits.view(B * T, -1), targets.view(-1), ignore_index=-100)
    if not scores:
        return ce
    sims = torch.stack(sims)
    vm = valid[None].expand_as(sims)
    K = math.ceil(N * len(scores) * capacity)
    theta = torch.kthvalue(sims[vm], min(K, int(vm.sum()))).values
    labels = (vm & (sims <= theta)).float()
    bce = torch.nn.functional.binary_cross_entropy(torch.stack(scores), labels)
    return ce + cfg.get("dlo_loss_coefficient", 1.0) * bce


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--data", required=True)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--capacity", type=float, default=0.5)
    ap.add_argument("--lr", type=float, default=2e-5)
    ap.add_argument("--seed", type=int, default=42)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    model, cfg, is_dlo, routers = load_model(args.model)
    tok = AutoTokenizer.from_pretrained(args.model)
    pad = cfg.get("pad_token_id") or cfg.get("eos_token_id") or 0
    rows = rows_from_gsm8k(args.data, tok, args.seq_len, args.seed)
    params = list(model.parameters()) + ([routers] if any(is_dlo) else [])
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    tokens, started = 0, None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            started = time.perf_counter()
        chunk = rows[step * args.batch:(step + 1) * args.batch]
        ids, valid, targets = make_batch(chunk, pad)
        if any(is_dlo):
            loss = dlo_loss(model, routers, cfg, is_dlo, ids, valid, targets, args.capacity)
        else:
            loss = model(input_ids=ids, attention_mask=valid.long(), labels=torch.where(
                torch.cat([torch.full((ids.shape[0], 1), -100), targets[:, :-1]], 1) >= 0,
                ids, torch.full_like(ids, -100))).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if step >= args.warmup:
            tokens += int(valid.sum())
    secs = time.perf_counter() - started
    print(json.dumps({"tokens_per_s": tokens / secs, "steps": args.steps, "tokens": tokens, "seconds": secs,
                      "threads": torch.get_num_threads(), "loss": float(loss)}))


if __name__ == "__main__":
    main()
