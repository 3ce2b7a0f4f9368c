/*
 * Streams a completion from a DLO engine or checkpoint through libdlo's C API.
 *
 *   dlo-example MODEL [PROMPT] [--chat] [--max-tokens N] [--token-ids 1,2,3] [--threads N] [--stats]
 *
 * MODEL is an HF checkpoint directory or a GGUF file. Generation is greedy and prints exactly what
 * `dlo-run MODEL --prompt PROMPT [--chat] --max-tokens N` (or `--token-ids ...`) prints: the text as it is
 * completed, or for a model without a tokenizer the token ids, each followed by a space; then a newline.
 * --stats prints counters (tokens, execution rates, FLOPs) to stderr.
 */
#include <dlo.h>

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int fail(const char *what, dlo_status s) {
    fprintf(stderr, "error: %s: %s (%s)\n", what, dlo_last_error(), dlo_status_name(s));
    return 1;
}

/* Prints each new piece of text, or the token id when the model has no tokenizer. */
static int on_token(int32_t token, const char *piece, size_t piece_len, void *user_data) {
    const int has_tokenizer = *(const int *)user_data;
    if (has_tokenizer) {
        fwrite(piece, 1, piece_len, stdout);
    } else {
        printf("%d ", token);
    }
    return fflush(stdout) != 0; /* nonzero stops generation (e.g. stdout closed) */
}

/* Parses "1,2,3" into a malloc'ed array; returns the count, or -1 on a malformed list. */
static long parse_ids(const char *s, int32_t **out) {
    size_t cap = 1;
    for (const char *p = s; *p; p++) cap += *p == ',';
    int32_t *ids = malloc(cap * sizeof *ids);
    if (!ids) return -1;
    size_t n = 0;
    const char *p = s;
    for (;;) {
        char *end;
        errno = 0;
        long v = strtol(p, &end, 10);
        if (end == p || errno != 0 || v < 0 || v > INT32_MAX || (*end != ',' && *end != '\0')) {
            free(ids);
            return -1;
        }
        ids[n++] = (int32_t)v;
        if (*end == '\0') break;
        p = end + 1;
    }
    *out = ids;
    return (long)n;
}

static int parse_int(const char *s, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || errno != 0 || v < 0 || v > INT32_MAX) return -1;
    *out = (int)v;
    return 0;
}

int main(int argc, char **argv) {
    const char *model = NULL, *prompt = NULL, *ids_arg = NULL;
    int chat = 0, stats = 0, max_tokens = 256, threads = 0;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (!strcmp(a, "--chat")) {
            chat = 1;
        } else if (!strcmp(a, "--stats")) {
            stats = 1;
        } else if (!strcmp(a, "--max-tokens") && i + 1 < argc) {
            if (parse_int(argv[++i], &max_tokens)) {
                fprintf(stderr, "error: --max-tokens needs a non-negative integer\n");
                return 2;
            }
        } else if (!strcmp(a, "--threads") && i + 1 < argc) {
            if (parse_int(argv[++i], &threads)) {
                fprintf(stderr, "error: --threads needs a non-negative integer\n");
                return 2;
            }
        } else if (!strcmp(a, "--token-ids") && i + 1 < argc) {
            ids_arg = argv[++i];
        } else if (a[0] == '-' && a[1] == '-') {
            fprintf(stderr, "error: unknown option %s\n", a);
            return 2;
        } else if (!model) {
            model = a;
        } else if (!prompt) {
            prompt = a;
        } else {
            fprintf(stderr, "error: unexpected argument %s\n", a);
            return 2;
        }
    }
    if (!model) {
        fprintf(stderr, "usage: %s MODEL [PROMPT] [--chat] [--max-tokens N] [--token-ids 1,2,3] "
                        "[--threads N] [--stats]\n", argv[0]);
        return 2;
    }
    if (prompt && ids_arg) {
        fprintf(stderr, "error: give either PROMPT or --token-ids, not both\n");
        return 2;
    }
    if (!prompt && !ids_arg) prompt = "Once upon a time";

    int32_t *ids = NULL;
    long n_ids = 0;
    if (ids_arg && (n_ids = parse_ids(ids_arg, &ids)) < 0) {
        fprintf(stderr, "error: --token-ids: expected comma-separated non-negative integers\n");
        return 2;
    }

    int rc = 1;
    dlo_engine *engine = NULL;
    dlo_session *session = NULL;
    dlo_status s;
    dlo_engine_params ep = dlo_engine_default_params();
    if ((s = dlo_engine_load(model, &ep, &engine)) != DLO_OK) {
        rc = fail("loading the model", s);
        goto done;
    }
    dlo_engine_info info = {0};
    info.struct_size = sizeof info;
    if ((s = dlo_engine_get_info(engine, &info)) != DLO_OK) {
        rc = fail("dlo_engine_get_info", s);
        goto done;
    }
    dlo_session_params sp = dlo_session_default_params();
    sp.max_tokens = max_tokens;
    sp.n_threads = threads;
    if ((s = dlo_session_new(engine, &sp, &session)) != DLO_OK) {
        rc = fail("creating a session", s);
        goto done;
    }
    /* The session keeps the model alive; the engine handle is no longer needed. */
    if ((s = dlo_engine_free(&engine)) != DLO_OK) {
        rc = fail("dlo_engine_free", s);
        goto done;
    }

    int has_tokenizer = info.has_tokenizer;
    dlo_generation_result res = {0};
    res.struct_size = sizeof res;
    if (ids) {
        s = dlo_generate(session, ids, (size_t)n_ids, on_token, &has_tokenizer, &res);
    } else {
        s = dlo_generate_text(session, prompt, chat, on_token, &has_tokenizer, &res);
    }
    if (s != DLO_OK) {
        rc = fail("generating", s);
        goto done;
    }
    printf("\n");

    if (stats) {
        dlo_stats st = {0};
        st.struct_size = sizeof st;
        size_t n_layers = 0;
        if ((s = dlo_session_stats(session, &st)) != DLO_OK) {
            rc = fail("dlo_session_stats", s);
            goto done;
        }
        fprintf(stderr, "prompt %zu tokens, generated %zu (stop reason %d), mean execution rate %.3f\n",
                st.n_prompt_tokens, st.n_generated, (int)res.stop_reason, st.mean_exec_rate);
        fprintf(stderr, "matmul FLOPs %llu (%.3f of dense %llu)\n", (unsigned long long)st.flops,
                st.flops_dense ? (double)st.flops / (double)st.flops_dense : 1.0,
                (unsigned long long)st.flops_dense);
        /* Ask for the size, then fill. */
        s = dlo_session_layer_rates(session, NULL, 0, &n_layers);
        if (s != DLO_ERR_BUFFER_TOO_SMALL && s != DLO_OK) {
            rc = fail("dlo_session_layer_rates", s);
            goto done;
        }
        float *rates = malloc((n_layers ? n_layers : 1) * sizeof *rates);
        if (!rates || (s = dlo_session_layer_rates(session, rates, n_layers, &n_layers)) != DLO_OK) {
            free(rates);
            rc = rates ? fail("dlo_session_layer_rates", s) : 1;
            goto done;
        }
        fprintf(stderr, "layer execution rates (-1 = no router):");
        for (size_t l = 0; l < n_layers; l++) fprintf(stderr, " %.3f", rates[l]);
        fprintf(stderr, "\n");
        free(rates);
    }
    rc = 0;

done:
    dlo_session_free(&session);
    dlo_engine_free(&engine);
    free(ids);
    return rc;
}
