#!/usr/bin/env python3
"""Check a `dlo-compile build --target onnx` export against the runtime.

    check_onnx.py DIR REFERENCE.safetensors [--token-ids 1,2,3] [--prefill K]

DIR holds prefill.onnx and decode.onnx, f32 or f64 (`--dtype f64`, read from the decode model's cache inputs);
REFERENCE is a `dlo-run MODEL --token-ids IDS --dump FILE` dump (`logits` [n, vocab] f32, or f64 from a runtime
computing in f64, and per routed layer `exec.{l}` u8 and `router_logit.{l}` f32). The token ids come from
--token-ids or from the dump's `token_ids` tensor.

1. `onnx.checker.check_model(path, full_check=True)` on both models (strict shape inference included).
2. onnxruntime (CPU) runs prefill on the first K tokens, then one decode step per remaining token, feeding
   each step's present_* back as past_* (fixed-capacity caches, slot = position).
3. Logits must match the reference within --tol (default 1e-4, absolute; plus --rtol times the position's largest
   |logit|, default 0, for models whose f32 summation-order noise alone exceeds 1e-4), routing decisions must be
   identical, router logits must match within (tol + ε)·max(1, |z|) with ε the reference's own rounding (its
   dtype's machine epsilon: the runtime records z in f32 even when it computes in f64), and across the decode
   steps the routed layers' `If` must have taken both branches (unless --allow-one-sided).

Exit status 0 when everything holds; 1 with the reasons otherwise. Needs numpy, onnx, onnxruntime and
safetensors (all in ~/.cache/dlo/venv).
"""

import argparse
import os
import sys

import numpy as np
import onnx
import onnxruntime as ort
from safetensors.numpy import load_file


def fail(msg):
    print(f"check_onnx: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", help="directory with prefill.onnx and decode.onnx")
    ap.add_argument("reference", help="dlo-run --dump safetensors file")
    ap.add_argument("--token-ids", help="comma-separated token ids (default: the dump's token_ids)")
    ap.add_argument("--prefill", type=int, help="tokens given to prefill (default: half, at least 1)")
    ap.add_argument("--capacity", type=int, help="decode cache capacity (default: number of tokens)")
    ap.add_argument("--tol", type=float, default=1e-4, help="absolute logits tolerance")
    ap.add_argument("--rtol", type=float, default=0.0,
                    help="logits tolerance relative to each position's largest |reference logit|, added to --tol")
    ap.add_argument("--allow-one-sided", action="store_true",
                    help="do not fail when a routed model's If took only one branch during decode")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0 = default)")
    args = ap.parse_args()

    paths = {k: os.path.join(args.dir, f"{k}.onnx") for k in ("prefill", "decode")}
    for k, p in paths.items():
        if not os.path.isfile(p):
            fail(f"{p}: missing")
        try:
            onnx.checker.check_model(p, full_check=True)
        except Exception as e:  # the checker raises several exception types
            fail(f"{p}: onnx.checker (full_check) rejected the model: {e}")
        m = onnx.load(p, load_external_data=False)
        print(f"{p}: checker ok (IR {m.ir_version}, opset "
              f"{[o.version for o in m.opset_import if o.domain in ('', 'ai.onnx')]}, {len(m.graph.node)} nodes)")

    if not os.path.isfile(args.reference):
        fail(f"{args.reference}: missing")
    ref = load_file(args.reference)
    if "logits" not in ref:
        fail(f"{args.reference}: no `logits` tensor (is it a dlo-run --dump file?)")
    if args.token_ids:
        try:
            ids = [int(x) for x in args.token_ids.split(",") if x.strip()]
        except ValueError:
            fail(f"--token-ids: not a comma-separated list of integers: {args.token_ids!r}")
    elif "token_ids" in ref:
        ids = [int(x) for x in ref["token_ids"].reshape(-1)]
    else:
        fail(f"{args.reference}: no `token_ids` tensor; pass --token-ids")
    n = len(ids)
    ref_logits = ref["logits"]
    if ref_logits.dtype not in (np.float32, np.float64):
        fail(f"{args.reference}: logits are {ref_logits.dtype}, expected float32 or float64")
    if ref_logits.shape[0] != n:
        fail(f"{args.reference}: logits has {ref_logits.shape[0]} rows for {n} token ids")
    k = args.prefill if args.prefill is not None else max(1, n // 2)
    if not 1 <= k <= n:
        fail(f"--prefill {k}: must be between 1 and {n}")
    cap = args.capacity or n
    if cap < n:
        fail(f"--capacity {cap}: must be at least the number of tokens ({n})")

    opts = ort.SessionOptions()
    if args.threads:
        opts.intra_op_num_threads = args.threads
    prov = ["CPUExecutionProvider"]
    pre = ort.InferenceSession(paths["prefill"], opts, providers=prov)
    dec = ort.InferenceSession(paths["decode"], opts, providers=prov)
    dec_inputs = {i.name: i for i in dec.get_inputs()}
    layers = sorted(int(name.split(".")[1]) for name in dec_inputs if name.startswith("past_key."))
    if not layers:
        fail(f"{paths['decode']}: no past_key.* inputs (not a dlo decode model?)")
    elem_types = {"tensor(float)": np.float32, "tensor(double)": np.float64}
    cache_type = dec_inputs[f"past_key.{layers[0]}"].type
    if cache_type not in elem_types:
        fail(f"{paths['decode']}: past_key.{layers[0]} is {cache_type}, expected tensor(float) or tensor(double)")
    elem = elem_types[cache_type]
    valid_layers = sorted(int(name.split(".")[1]) for name in dec_inputs if name.startswith("past_valid."))
    routed = sorted(int(o.name.split(".")[1]) for o in dec.get_outputs() if o.name.startswith("exec."))
    for l in routed:
        if f"exec.{l}" not in ref:
            fail(f"{args.reference}: no exec.{l}, but the ONNX model routes layer {l} (wrong reference?)")
    print(f"{n} tokens: prefill {k}, decode {n - k}; {len(layers)} layers, routed {routed}, "
          f"layer-skip {valid_layers}; cache capacity {cap}; model {np.dtype(elem).name}, "
          f"reference logits {ref_logits.dtype.name}")

    problems = []
    worst = {"logits": 0.0, "router": 0.0}
    decode_exec = {l: [0, 0] for l in routed}  # [skipped, executed] over decode steps

    def compare(step_rows, out_logits, outs):
        """Compare rows `step_rows` (positions) of the reference with one run's outputs."""
        want = ref_logits[step_rows].astype(np.float64)
        diff = np.abs(out_logits.astype(np.float64) - want)
        d = float(np.max(diff))
        worst["logits"] = max(worst["logits"], d)
        scale = np.max(np.abs(want), axis=-1, keepdims=True)
        excess = diff - (args.tol + args.rtol * scale)
        if not float(np.max(excess)) <= 0:
            j = np.unravel_index(int(np.argmax(excess)), excess.shape)
            problems.append(f"positions {step_rows[0]}..{step_rows[-1]}: logits differ by up to {d:.3g}; at "
                            f"position {step_rows[j[0]]}, token {j[1]}: {float(out_logits[j]):.6g} vs "
                            f"{float(want[j]):.6g} (tolerance {args.tol:g} + {args.rtol:g}·max|reference|)")
        for l in routed:
            e = outs[f"exec.{l}"].reshape(-1).astype(bool)
            z = outs[f"router_logit.{l}"].reshape(-1)
            re = ref[f"exec.{l}"].reshape(-1)[step_rows].astype(bool)
            rz = ref[f"router_logit.{l}"].reshape(-1)[step_rows]
            dz = np.abs(z.astype(np.float64) - rz) / np.maximum(1.0, np.abs(rz.astype(np.float64)))
            worst["router"] = max(worst["router"], float(dz.max()))
            if not float(dz.max()) <= args.tol + float(np.finfo(rz.dtype).eps):
                problems.append(f"layer {l}, positions {step_rows[0]}..{step_rows[-1]}: router logits differ "
                                f"by {float(dz.max()):.3g} (relative)")
            for j in np.nonzero(e != re)[0]:
                problems.append(f"layer {l}, position {step_rows[j]}: ONNX decided {bool(e[j])}, runtime "
                                f"{bool(re[j])} (z = {float(rz[j]):.6g})")

    # Prefill.
    prompt = np.array([ids[:k]], dtype=np.int64)
    names = [o.name for o in pre.get_outputs()]
    outs = dict(zip(names, pre.run(None, {"input_ids": prompt})))
    compare(list(range(k)), outs["logits"][0], outs)
    cache = {}
    for l in layers:
        for kind in ("key", "value"):
            p = outs[f"present_{kind}.{l}"]
            buf = np.zeros(p.shape[:2] + (cap,) + p.shape[3:], dtype=elem)
            buf[:, :, :k] = p
            cache[f"past_{kind}.{l}"] = buf
    for l in valid_layers:
        buf = np.zeros((1, cap), dtype=bool)
        buf[:, :k] = outs[f"present_valid.{l}"]
        cache[f"past_valid.{l}"] = buf

    # Decode, one token at a time.
    names = [o.name for o in dec.get_outputs()]
    for i in range(k, n):
        feed = dict(cache)
        feed["input_ids"] = np.array([[ids[i]]], dtype=np.int64)
        feed["position_ids"] = np.array([[i]], dtype=np.int64)
        outs = dict(zip(names, dec.run(None, feed)))
        compare([i], outs["logits"][0], outs)
        for l in routed:
            decode_exec[l][int(outs[f"exec.{l}"].reshape(-1)[0])] += 1
        for name in cache:
            cache[name] = outs[name.replace("past_", "present_")]

    print(f"max |Δlogits| = {worst['logits']:.3g}, max relative |Δz| = {worst['router']:.3g}")
    if routed:
        per_layer = ", ".join(f"{l}: {e}/{s + e}" for l, (s, e) in decode_exec.items())
        print(f"decode steps executed per routed layer: {per_layer}")
        skipped = sum(s for s, _ in decode_exec.values())
        executed = sum(e for _, e in decode_exec.values())
        if n > k and (skipped == 0 or executed == 0):
            msg = f"the decode If took only one branch ({executed} executed, {skipped} skipped)"
            if args.allow_one_sided:
                print(f"warning: {msg}")
            else:
                problems.append(msg)
    if problems:
        for p in problems[:40]:
            print(f"  {p}", file=sys.stderr)
        fail(f"{len(problems)} problem(s)")
    print("check_onnx: OK")


if __name__ == "__main__":
    main()
