/*
 * cmd_calibrate.c — `kvpark calibrate`: fit the learned (or PCA) KV codec of
 * a model on calibration text and write the codec file (compress/calib.h).
 *
 * A thin front end: options, model load, read and tokenise the text, then
 * calib_run; its tables go to stdout unless -q, and it ends with key = value
 * lines (tokens, bits, ratio, held-out errors and quality) that scripts
 * read. Exit status 0, 1 on a runtime error, 2 on bad usage.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compress/calib.h"
#include "compress/codec.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "tools/cli.h"

static void calib_usage(void) {
    fprintf(stderr,
            "usage: kvpark calibrate -m MODEL -f TEXT -o CODEC [--bits B | --ratio R | --max-dppl P | --max-kl K]\n"
            "                        [--chunk C] [--sink S] [--window W] [--kind learned|pca] [-c CTX]\n"
            "                        [--max-tokens N] [-t THREADS] [--k-weight W] [--ranges fixed|chunk]\n"
            "                        [--no-refine] [--no-sens] [--park-every N] [-q]\n"
            "  fits the KV codec of MODEL on TEXT and writes the codec file CODEC\n"
            "  Use it with: kvpark serve --codec CODEC (parked sessions are coded with it; the\n"
            "  server must run the same model), or kvpark ppl --codec CODEC to measure it.\n"
            "  --bits B       coded bits per value in coded chunks (default 2)\n"
            "  --ratio R      instead: a parked -c-token session is R times smaller than fp16, end to\n"
            "                 end (lossless sink and window rows, headers, scales and codes counted)\n"
            "  --max-dppl P   the smallest codec whose delta perplexity on the held-out last 10%%\n"
            "                 of TEXT is <= P %% (bisection over the bit budget; --bits is ignored)\n"
            "  --max-kl K     the same with the held-out KL to the uncompressed model <= K nats\n"
            "                 (Δppl can fall under lossy coding; KL cannot)\n"
            "  --no-refine    PCA start only (no quantiser scales, no decoder/encoder refits)\n"
            "  --no-sens      bits by the k-weight prior instead of measured sensitivity\n"
            "  --park-every N held-out quality runs park every N tokens (64)\n"
            "  -q             no tables (allocation, refinement, search)\n");
}

int cmd_calibrate(int argc, char **argv) {
    calib_opts o = calib_default_opts();
    const char *mpath = NULL, *text = NULL, *outp = NULL;
    int threads = 0, quiet = 0;
    o.progress = 1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
#define NEEDV                                                                 \
    do {                                                                      \
        if (!v) {                                                             \
            fprintf(stderr, "kvpark calibrate: %s needs a value\n", a);       \
            return 2;                                                         \
        }                                                                     \
        i++;                                                                  \
    } while (0)
/* A whole-string number or bad usage (2), as every command parses them. */
#define INTV(dst)                                                                       \
    do {                                                                                \
        NEEDV;                                                                          \
        if (cli_parse_int(v, INT_MIN, INT_MAX, &(dst))) {                               \
            fprintf(stderr, "kvpark calibrate: bad %s value '%s' (want an integer)\n", a, v); \
            return 2;                                                                   \
        }                                                                               \
    } while (0)
#define FLTV(dst)                                                                       \
    do {                                                                                \
        NEEDV;                                                                          \
        if (cli_parse_float(v, -HUGE_VAL, HUGE_VAL, &(dst))) {                          \
            fprintf(stderr, "kvpark calibrate: bad %s value '%s' (want a number)\n", a, v); \
            return 2;                                                                   \
        }                                                                               \
    } while (0)
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            calib_usage();
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEEDV; mpath = v; }
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { NEEDV; text = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { NEEDV; outp = v; }
        else if (!strcmp(a, "--bits")) FLTV(o.bits);
        else if (!strcmp(a, "--ratio")) {
            FLTV(o.ratio);
            if (!(o.ratio > 1)) {
                fprintf(stderr, "kvpark calibrate: --ratio must be > 1 (fp16 bytes / parked bytes), not '%s'\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--max-dppl")) {
            NEEDV;
            if (cli_parse_float(v, 0, HUGE_VAL, &o.max_dppl) || !(o.max_dppl > 0)) {
                fprintf(stderr, "kvpark calibrate: --max-dppl must be a percentage > 0, not '%s'\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--max-kl")) {
            NEEDV;
            if (cli_parse_float(v, 0, HUGE_VAL, &o.max_kl) || !(o.max_kl > 0)) {
                fprintf(stderr, "kvpark calibrate: --max-kl must be a KL in nats > 0, not '%s'\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--no-refine")) o.refine = 0;
        else if (!strcmp(a, "--no-sens")) o.sens = 0;
        else if (!strcmp(a, "--attn")) o.attn = 1;
        else if (!strcmp(a, "--no-attn")) o.attn = 0;
        else if (!strcmp(a, "-q") || !strcmp(a, "--quiet")) quiet = 1;
        else if (!strcmp(a, "--park-every")) INTV(o.park_every);
        else if (!strcmp(a, "--chunk")) INTV(o.chunk);
        else if (!strcmp(a, "--k-weight")) FLTV(o.k_weight);
        else if (!strcmp(a, "--ranges")) {
            NEEDV;
            if (!strcmp(v, "fixed")) o.ranges = 1;
            else if (!strcmp(v, "chunk")) o.ranges = 0;
            else {
                fprintf(stderr, "kvpark calibrate: --ranges must be fixed or chunk, not '%s'\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--sink")) INTV(o.sink);
        else if (!strcmp(a, "--window")) INTV(o.window);
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) INTV(o.n_ctx);
        else if (!strcmp(a, "--max-tokens")) {
            NEEDV;
            long t;
            if (cli_parse_long(v, LONG_MIN, LONG_MAX, &t)) {
                fprintf(stderr, "kvpark calibrate: bad %s value '%s' (want an integer)\n", a, v);
                return 2;
            }
            o.max_tokens = t;
        }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) INTV(threads);
        else if (!strcmp(a, "--kind")) {
            NEEDV;
            if (!strcmp(v, "learned")) o.kind = CODEC_LEARNED;
            else if (!strcmp(v, "pca")) o.kind = CODEC_PCA;
            else {
                fprintf(stderr, "kvpark calibrate: --kind must be learned or pca, not '%s'\n", v);
                return 2;
            }
        } else {
            fprintf(stderr, "kvpark calibrate: unknown argument '%s'\n", a);
            calib_usage();
            return 2;
        }
#undef NEEDV
    }
    if (!text || !outp) {
        fprintf(stderr, "kvpark calibrate: -f TEXT and -o CODEC are required\n");
        calib_usage();
        return 2;
    }
    if (o.park_every < 1) {
        fprintf(stderr, "kvpark calibrate: --park-every must be >= 1\n");
        return 2;
    }
    if ((o.ratio > 0) + (o.max_dppl > 0) + (o.max_kl > 0) > 1) {
        fprintf(stderr, "kvpark calibrate: give one of --ratio, --max-dppl and --max-kl\n");
        return 2;
    }
    if (!quiet) o.log = stdout;
    if (!(o.bits > 0 && o.bits <= 16)) {
        fprintf(stderr, "kvpark calibrate: --bits must be in (0, 16]\n");
        return 2;
    }
    kp_err err = {0};
    char path[4096];
    if (model_resolve(mpath, path, sizeof path, &err)) {
        fprintf(stderr, "kvpark calibrate: %s\n", err.msg);
        return 1;
    }
    model_opts mo = model_default_opts();
    mo.n_threads = threads;
    model *m = NULL;
    if (model_load(&m, path, &mo, &err)) {
        fprintf(stderr, "kvpark calibrate: %s\n", err.msg);
        return 1;
    }
    FILE *fp = fopen(text, "rb");
    if (!fp) {
        fprintf(stderr, "kvpark calibrate: cannot open %s: %s\n", text, strerror(errno));
        model_free(m);
        return 1;
    }
    char *buf = NULL;
    size_t len = 0, cap = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 1 << 20;
            char *nb = realloc(buf, cap);
            if (!nb) break;
            buf = nb;
        }
        size_t k = fread(buf + len, 1, cap - len, fp);
        if (k == 0) break;
        len += k;
    }
    fclose(fp);
    int32_t *ids = NULL;
    size_t n_ids = 0;
    int rc = buf ? tok_encode(model_vocab(m), buf, len, true, false, &ids, &n_ids, &err)
                 : kp_errf(&err, KP_ENOMEM, "out of memory");
    free(buf);
    calib_report rep = {0};
    if (!rc) {
        if (o.ratio > 0)
            fprintf(stderr, "calibrate: %s, %zu tokens of %s, kind %s, target %.3gx end to end\n", model_desc(m),
                    n_ids, text, o.kind == CODEC_PCA ? "pca" : "learned", o.ratio);
        else if (o.max_dppl > 0)
            fprintf(stderr, "calibrate: %s, %zu tokens of %s, kind %s, target: held-out Δppl <= %g%%\n",
                    model_desc(m), n_ids, text, o.kind == CODEC_PCA ? "pca" : "learned", o.max_dppl);
        else
            fprintf(stderr, "calibrate: %s, %zu tokens of %s, kind %s, target %.3f bits/value\n", model_desc(m),
                    n_ids, text, o.kind == CODEC_PCA ? "pca" : "learned", o.bits);
        rc = calib_run(m, ids, n_ids, &o, outp, &rep, &err);
    }
    free(ids);
    model_free(m);
    if (rc) {
        fprintf(stderr, "kvpark calibrate: %s\n", err.msg);
        return 1;
    }
    /* ratio: end to end, what a parked session of ratio_ctx tokens stores
     * (before LZ4); coded_ratio: the coded chunks' payloads alone */
    printf("tokens = %lld\ntarget_bits = %.4f\nbits = %.4f\ncoded_ratio = %.3f\nratio = %.3f\nratio_ctx = %d\n",
           (long long)rep.tokens_used, rep.target_bits, rep.bits_per_value, 16.0 / rep.bits_per_value,
           rep.ratio_e2e, rep.n_ctx);
    printf("rel_err_k_pca = %.6f\nrel_err_v_pca = %.6f\nrel_err_k = %.6f\nrel_err_v = %.6f\n", rep.rel_err_k_pca,
           rep.rel_err_v_pca, rep.rel_err_k, rep.rel_err_v);
    if (rep.heldout_ratio > 0)
        printf("heldout_ratio = %.4f\nheldout_dppl = %.4f\nheldout_kl = %.6g\n", rep.heldout_ratio,
               rep.heldout_dppl, rep.heldout_kl);
    printf("seconds = %.2f\nwrote %s\n", rep.seconds, outp);
    return 0;
}
