#!/usr/bin/env python3
"""Streams a completion from a DLO engine or checkpoint through libdlo's C API with ctypes.

    DLO_LIB=target/release/libdlo.so python3 examples/python/generate.py MODEL [PROMPT] [--chat]
        [--max-tokens N] [--token-ids 1,2,3] [--threads N]

Prints exactly what the C example (examples/c/main.c) and `dlo-run` print with the same settings: the
text as it is completed (or, for a model without a tokenizer, each token id followed by a space), then a
newline. Only the standard library is needed.
"""
import argparse
import ctypes as C
import os
import sys

DLO_OK = 0
DLO_ERR_BUFFER_TOO_SMALL = 4


class EngineParams(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("dtype", C.c_int32), ("n_threads", C.c_int32),
                ("budget", C.c_float)]


class EngineInfo(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("n_vocab", C.c_size_t), ("n_ctx", C.c_size_t),
                ("n_layers", C.c_size_t), ("n_routed_layers", C.c_size_t), ("has_tokenizer", C.c_int32),
                ("has_chat_template", C.c_int32), ("bos_token", C.c_int32), ("eos_token", C.c_int32)]


class SessionParams(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("seed", C.c_uint64), ("n_threads", C.c_int32),
                ("max_tokens", C.c_int32), ("top_k", C.c_int32), ("force_routing", C.c_int32),
                ("temperature", C.c_float), ("top_p", C.c_float), ("budget", C.c_float)]


class GenerationResult(C.Structure):
    _fields_ = [("struct_size", C.c_size_t), ("n_prompt_tokens", C.c_size_t), ("n_generated", C.c_size_t),
                ("stop_reason", C.c_int)]


TOKEN_CALLBACK = C.CFUNCTYPE(C.c_int, C.c_int32, C.POINTER(C.c_char), C.c_size_t, C.c_void_p)


class DloError(RuntimeError):
    pass


def load_library(path):
    lib = C.CDLL(path)
    P = C.c_void_p
    sigs = {
        "dlo_version": (C.c_char_p, []),
        "dlo_last_error": (C.c_char_p, []),
        "dlo_status_name": (C.c_char_p, [C.c_int32]),
        "dlo_engine_default_params": (EngineParams, []),
        "dlo_engine_load": (C.c_int, [C.c_char_p, C.POINTER(EngineParams), C.POINTER(P)]),
        "dlo_engine_free": (C.c_int, [C.POINTER(P)]),
        "dlo_engine_get_info": (C.c_int, [P, C.POINTER(EngineInfo)]),
        "dlo_session_default_params": (SessionParams, []),
        "dlo_session_new": (C.c_int, [P, C.POINTER(SessionParams), C.POINTER(P)]),
        "dlo_session_free": (C.c_int, [C.POINTER(P)]),
        "dlo_generate": (C.c_int, [P, C.POINTER(C.c_int32), C.c_size_t, TOKEN_CALLBACK, P,
                                   C.POINTER(GenerationResult)]),
        "dlo_generate_text": (C.c_int, [P, C.c_char_p, C.c_int32, TOKEN_CALLBACK, P,
                                        C.POINTER(GenerationResult)]),
    }
    for name, (res, args) in sigs.items():
        f = getattr(lib, name)
        f.restype, f.argtypes = res, args
    return lib


def check(lib, status, what):
    if status != DLO_OK:
        raise DloError(f"{what}: {lib.dlo_last_error().decode()} ({lib.dlo_status_name(status).decode()})")


def default_library():
    target = os.environ.get("CARGO_TARGET_DIR") or os.path.join(os.path.dirname(__file__), "..", "..", "target")
    return os.path.join(target, "release", "libdlo.so")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("prompt", nargs="?")
    ap.add_argument("--chat", action="store_true")
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--token-ids")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.prompt is not None and args.token_ids is not None:
        ap.error("give either PROMPT or --token-ids, not both")
    ids = None
    if args.token_ids is not None:
        try:
            ids = [int(t) for t in args.token_ids.split(",")]
        except ValueError:
            ap.error("--token-ids: expected comma-separated integers")
    prompt = args.prompt if args.prompt is not None else "Once upon a time"

    lib = load_library(os.environ.get("DLO_LIB") or default_library())
    engine, session = C.c_void_p(), C.c_void_p()
    try:
        ep = lib.dlo_engine_default_params()
        check(lib, lib.dlo_engine_load(os.fsencode(args.model), C.byref(ep), C.byref(engine)), "loading the model")
        info = EngineInfo(struct_size=C.sizeof(EngineInfo))
        check(lib, lib.dlo_engine_get_info(engine, C.byref(info)), "dlo_engine_get_info")
        sp = lib.dlo_session_default_params()
        sp.max_tokens, sp.n_threads = args.max_tokens, args.threads
        check(lib, lib.dlo_session_new(engine, C.byref(sp), C.byref(session)), "creating a session")

        out = sys.stdout.buffer

        def on_token(token, piece, piece_len, _user_data):
            try:
                out.write(C.string_at(piece, piece_len) if info.has_tokenizer else b"%d " % token)
                out.flush()
                return 0
            except Exception:  # an exception must not cross the C boundary: stop instead
                return 1

        cb = TOKEN_CALLBACK(on_token)  # kept referenced until generation returns
        res = GenerationResult(struct_size=C.sizeof(GenerationResult))
        if ids is not None:
            arr = (C.c_int32 * len(ids))(*ids)
            status = lib.dlo_generate(session, arr, len(ids), cb, None, C.byref(res))
        else:
            status = lib.dlo_generate_text(session, prompt.encode(), int(args.chat), cb, None, C.byref(res))
        check(lib, status, "generating")
        out.write(b"\n")
        out.flush()
        return 0
    except DloError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        lib.dlo_session_free(C.byref(session))
        lib.dlo_engine_free(C.byref(engine))


if __name__ == "__main__":
    sys.exit(main())
