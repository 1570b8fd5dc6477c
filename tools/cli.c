/*
 * cli.c — the shared pieces of the `kvpark` front ends (contract in cli.h):
 * messages, the strict parsers, the model and quality options.
 *
 * The parsers wrap strtol/strtoull/strtod and then insist that the whole
 * string was consumed, that no range error was reported and that the value
 * lies within the caller's bounds: "12x", "", "1e999" and "99999999999999999999"
 * are all rejected, where atoi/atof would silently read 12, 0, inf or clamp.
 */
#include "tools/cli.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tok.h"

int cli_die(const kp_err *e, int rc) {
    fprintf(stderr, "kvpark: %s\n", e->msg[0] ? e->msg : kp_strerror(rc));
    return 1;
}

int cli_usage_error(const char *cmd, const char *msg) {
    fprintf(stderr, "kvpark %s: %s (see 'kvpark %s --help')\n", cmd, msg, cmd);
    return 2;
}

int cli_parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    int saved = errno;
    errno = 0;
    long v = strtol(s, &end, 10);
    int bad = errno || end == s || *end || v < lo || v > hi;
    errno = saved;
    if (bad) return -1;
    *out = v;
    return 0;
}

int cli_parse_int(const char *s, int lo, int hi, int *out) {
    long v;
    if (cli_parse_long(s, lo, hi, &v)) return -1;
    *out = (int)v;
    return 0;
}

int cli_parse_u64(const char *s, uint64_t *out) {
    char *end;
    int saved = errno;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    int bad = errno || end == s || *end;
    errno = saved;
    if (bad) return -1;
    *out = (uint64_t)v;
    return 0;
}

int cli_parse_float(const char *s, double lo, double hi, double *out) {
    char *end;
    int saved = errno;
    errno = 0;
    double v = strtod(s, &end);
    int bad = errno || end == s || *end || !isfinite(v) || v < lo || v > hi;
    errno = saved;
    if (bad) return -1;
    *out = v;
    return 0;
}

int cli_parse_size(const char *s, uint64_t *out) {
    char *end;
    int saved = errno;
    errno = 0;
    double v = strtod(s, &end);
    int bad = errno || end == s || !isfinite(v) || v < 0;
    errno = saved;
    if (bad) return -1;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (mul > 1 && *end == 'i') end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v * mul > 1.8e19) return -1;
    *out = (uint64_t)(v * mul);
    return 0;
}

int cli_model_opt(int c, const char *arg, cli_model_opts *co) {
    long v;
    switch (c) {
    case 'm': co->model = arg; return 1;
    case 't':
        if (cli_parse_long(arg, 0, 1024, &v)) return -1;
        co->threads = (int)v;
        return 1;
    case 'c':
        if (cli_parse_long(arg, 4, 1 << 24, &v)) return -1;
        co->n_ctx = (int)v;
        return 1;
    case 'b':
        if (cli_parse_long(arg, 1, 1 << 20, &v)) return -1;
        co->n_batch = (int)v;
        return 1;
    case CLI_OPT_KV_TYPE:
        co->kv_type = kv_type_from_name(arg);
        return co->kv_type < 0 ? -1 : 1;
    case CLI_OPT_DEVICE:
        if (strcmp(arg, "cpu") && strcmp(arg, "cuda") && strcmp(arg, "auto")) return -1;
        co->device = arg;
        return 1;
    }
    return 0;
}

int cli_load_model(const cli_model_opts *co, model **m, kp_err *err) {
    char path[1024];
    int rc = model_resolve(co->model, path, sizeof path, err);
    if (rc) return rc;
    model_opts mo = model_default_opts();
    mo.n_threads = co->threads;
    mo.backend = co->device ? co->device : "auto";
    if (co->n_batch > 0) mo.n_batch = co->n_batch;
    return model_load(m, path, &mo, err);
}

int cli_tokenize_file(model *m, const char *file, int32_t **ids, size_t *n, kp_err *err) {
    FILE *fp = fopen(file, "rb");
    if (!fp) return kp_errf(err, KP_EIO, "cannot open '%s': %s", file, strerror(errno));
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    rewind(fp);
    char *text = sz >= 0 ? malloc((size_t)sz + 1) : NULL;
    if (!text || fread(text, 1, (size_t)sz, fp) != (size_t)sz) {
        fclose(fp);
        free(text);
        return kp_errf(err, KP_EIO, "cannot read '%s'", file);
    }
    fclose(fp);
    int rc = tok_encode(model_vocab(m), text, (size_t)sz, true, false, ids, n, err);
    free(text);
    return rc;
}

int cli_quality_opt(int c, const char *arg, cli_quality *q) {
    switch (c) {
    case 'm': q->model = arg; return 1;
    case 'f': q->file = arg; return 1;
    case 't': return cli_parse_int(arg, 0, 1024, &q->threads) ? -1 : 1;
    case 'c': return cli_parse_int(arg, 4, 1 << 24, &q->qo.n_ctx) ? -1 : 1;
    case 'b': { int b; return cli_parse_int(arg, 1, 1 << 20, &b) ? -1 : 1; } /* accepted, unused */
    case CLI_QOPT_CHUNKS: return cli_parse_int(arg, 0, 1 << 30, &q->qo.max_chunks) ? -1 : 1;
    case CLI_QOPT_PARK_EVERY: return cli_parse_int(arg, 1, 1 << 24, &q->qo.park_every) ? -1 : 1;
    case CLI_QOPT_SINK: q->set_sink = true; return cli_parse_int(arg, 0, 1 << 24, &q->qo.sink) ? -1 : 1;
    case CLI_QOPT_WINDOW: q->set_window = true; return cli_parse_int(arg, 0, 1 << 24, &q->qo.window) ? -1 : 1;
    case CLI_QOPT_CHUNK: q->set_chunk = true; return cli_parse_int(arg, 1, 65535, &q->qo.chunk) ? -1 : 1;
    case CLI_QOPT_KV_TYPE: q->qo.kv_type = kv_type_from_name(arg); return q->qo.kv_type < 0 ? -1 : 1;
    }
    return 0;
}

int cli_quality_codec_layout(cli_quality *q, const codec *c) {
    int chunk, sink, window, took = 0;
    if (codec_layout(c, &chunk, &sink, &window)) return 0; /* a built-in codec: no preferred layout */
    if (!q->set_sink && q->qo.sink != sink) q->qo.sink = sink, took = 1;
    if (!q->set_window && q->qo.window != window) q->qo.window = window, took = 1;
    if (!q->set_chunk && q->qo.chunk != chunk) q->qo.chunk = chunk, took = 1;
    return took;
}

int cli_quality_load_model(const cli_quality *q, model **m, kp_err *err) {
    char path[1024];
    int rc = model_resolve(q->model, path, sizeof path, err);
    if (rc) return rc;
    model_opts mo = model_default_opts();
    mo.n_threads = q->threads;
    return model_load(m, path, &mo, err);
}
