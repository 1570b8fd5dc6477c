/*
 * cmd_ppl.c — `kvpark ppl`: perplexity of a model on a text file, as
 * llama-perplexity computes it (engine/eval.h); with --codec NAME|FILE the
 * perplexity with the KV cache parked and resumed through that codec every N
 * tokens, against the uncompressed run (compress/quality.h).
 *
 * Scripts read the last lines: "ppl = X" (and with --codec "ratio = R",
 * "agree = A", "kl = K"). Exit status 0, 1 on a runtime error, 2 on bad
 * usage.
 */
#include <errno.h>
#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "compress/codec.h"
#include "compress/quality.h"
#include "engine/eval.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "tools/cli.h"

/* `kvpark ppl --codec NAME|FILE ...`: prints both perplexities and ends with
 * the four lines ppl = X / ratio = R / agree = A / kl = K (scripts read
 * them). getopt is fully reset first: this may run more than once in a
 * process. */
static int ppl_codec(int argc, char **argv) {
    cli_quality q = {.qo = quality_default_opts()};
    q.qo.n_ctx = 0; /* not given: quality_ctx_for (512, as plain ppl) */
    const char *codec_arg = NULL;
    static const struct option lo[] = {CLI_QUALITY_LONGOPTS,
                                       {"codec", required_argument, 0, CLI_QOPT_CODEC},
                                       {0, 0, 0, 0}};
    int ch;
    optind = 0; /* full getopt reset: this may run more than once in a process */
    while ((ch = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = cli_quality_opt(ch, optarg, &q);
        if (r < 0) return cli_usage_error("ppl", "bad option value");
        if (r > 0) continue;
        if (ch == CLI_QOPT_CODEC) codec_arg = optarg;
        else if (ch == 'h') {
            puts("usage: kvpark ppl [-m MODEL] -f TEXTFILE --codec NAME|FILE [-c CTX (512)] [--chunks N]\n"
                 "       [--park-every N] [--sink S] [--window W] [--chunk C]\n"
                 "       [--kv-type f32|f16|bf16] [-t THREADS]\n"
                 "(--kv-type defaults to f16 here, the server's and llama.cpp's cache; plain ppl: f32)\n"
                 "Perplexity with the KV cache parked and resumed through a codec every N tokens\n"
                 "(default 64): the first S (4) and the last W (64) tokens stay lossless at the\n"
                 "cache's type, the rest goes through the codec in chunks of C (64) aligned after\n"
                 "the sink (the last one may be partial); compared with the uncompressed run.\n"
                 "Codecs: none, fp16, int8, int4, kivi2, or a codec file, whose own sink, window\n"
                 "and chunk (the layout it was calibrated for) are used unless given here.\n"
                 "Ends with 'ppl = X', 'ratio = R' (fp16 bytes / stored bytes after LZ4),\n"
                 "'agree = A' (top-1 agreement) and 'kl = K' (mean KL(p_ref || p), nats).");
            return 0;
        } else return cli_usage_error("ppl", "unknown option");
    }
    if (!q.file) return cli_usage_error("ppl", "missing -f TEXTFILE");
    if (!codec_arg) return cli_usage_error("ppl", "missing --codec NAME|FILE");
    kp_err err = {0};
    model *m = NULL;
    codec *c = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = cli_quality_load_model(&q, &m, &err);
    if (rc) return cli_die(&err, rc);
    if (q.qo.n_ctx == 0) q.qo.n_ctx = quality_ctx_for(m);
    codec_shape shape = quality_codec_shape(m);
    if ((rc = codec_open(&c, codec_arg, &shape, &err))) goto out;
    const int from_file = cli_quality_codec_layout(&q, c);
    if ((rc = cli_tokenize_file(m, q.file, &ids, &n, &err))) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens; model %s; codec %s, ctx %d, park every %d, chunk %d, sink %d, "
            "window %d%s\n", q.file, n, model_desc(m), codec_name(c), q.qo.n_ctx, q.qo.park_every, q.qo.chunk,
            q.qo.sink, q.qo.window, from_file ? " (the codec file's layout where not given)" : "");
    quality_result r;
    double t0 = kp_now();
    if ((rc = quality_eval(m, c, ids, (int64_t)n, &q.qo, &r, &err))) goto out;
    printf("codec = %s\nwindows = %d\nscored = %lld\nseconds = %.2f\n", codec_name(c), r.n_windows,
           (long long)r.n_scored, kp_now() - t0);
    printf("bytes_per_token_layer = %.2f\nencode_gbps = %.3f\ndecode_gbps = %.3f\n",
           r.bytes_per_token_layer, r.encode_gbps, r.decode_gbps);
    printf("ppl_ref = %.4f\nppl = %.4f\nratio = %.4f\nagree = %.6f\nkl = %.6g\n", r.ppl_ref, r.ppl,
           r.ratio, r.agree, r.kl);
    fflush(stdout);
out:
    free(ids);
    codec_free(c);
    model_free(m);
    return rc ? cli_die(&err, rc) : 0;
}

typedef struct ppl_progress {
    double t0;
    double nll;
    int64_t n;
    bool tty;
} ppl_progress;

static void ppl_on_chunk(void *ud, int chunk, int n_chunks, double nll, int n_scored) {
    ppl_progress *p = ud;
    p->nll += nll;
    p->n += n_scored;
    double el = kp_now() - p->t0;
    double eta = el / (chunk + 1) * (n_chunks - chunk - 1);
    if (p->tty)
        fprintf(stderr, "\r[%d/%d] ppl so far %.4f, %.0f s left   ", chunk + 1, n_chunks,
                exp(p->nll / (double)p->n), eta);
    else if ((chunk + 1) % 100 == 0 || chunk + 1 == n_chunks)
        fprintf(stderr, "[%d/%d] ppl so far %.4f\n", chunk + 1, n_chunks, exp(p->nll / (double)p->n));
}

int cmd_ppl(int argc, char **argv) {
    /* with a codec: parked-and-resumed perplexity (compress/quality.h) */
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--codec") || !strncmp(argv[i], "--codec=", 8)) return ppl_codec(argc, argv);
    cli_model_opts co = {.kv_type = KP_TYPE_F32, .n_ctx = 512};
    const char *file = NULL;
    long max_chunks = 0;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"file", required_argument, 0, 'f'},
        {"ctx", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, CLI_OPT_KV_TYPE},
        {"chunks", required_argument, 0, CLI_OPT_CHUNKS}, {"device", required_argument, 0, CLI_OPT_DEVICE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = cli_model_opt(c, optarg, &co);
        if (r < 0) return cli_usage_error("ppl", "bad option value");
        if (r > 0) continue;
        if (c == 'f') file = optarg;
        else if (c == CLI_OPT_CHUNKS) {
            if (cli_parse_long(optarg, 0, 1 << 30, &max_chunks)) return cli_usage_error("ppl", "bad --chunks");
        } else if (c == 'h') {
            puts("usage: kvpark ppl [-m MODEL] -f TEXTFILE [-c CTX] [-b BATCH] [--chunks N]\n"
                 "       [--kv-type f32|f16|bf16] [-t THREADS]\n"
                 "       [--codec NAME|FILE [--park-every N] [--sink S] [--window W] [--chunk C]]\n"
                 "Perplexity as llama-perplexity computes it: non-overlapping windows of CTX\n"
                 "tokens (default 512), scoring the second half of each. Ends with 'ppl = X'.");
            return 0;
        } else return cli_usage_error("ppl", "unknown option");
    }
    if (!file) return cli_usage_error("ppl", "missing -f TEXTFILE");
    kp_err err = {0};
    FILE *fp = fopen(file, "rb");
    if (!fp) {
        fprintf(stderr, "kvpark: cannot open '%s': %s\n", file, strerror(errno));
        return 1;
    }
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    rewind(fp);
    char *text = malloc((size_t)sz + 1);
    if (!text || fread(text, 1, (size_t)sz, fp) != (size_t)sz) {
        fclose(fp);
        free(text);
        fprintf(stderr, "kvpark: cannot read '%s'\n", file);
        return 1;
    }
    fclose(fp);
    model *m = NULL;
    int rc = cli_load_model(&co, &m, &err);
    if (rc) {
        free(text);
        return cli_die(&err, rc);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    double tt = kp_now();
    rc = tok_encode(model_vocab(m), text, (size_t)sz, true, false, &ids, &n, &err);
    free(text);
    if (rc) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens (tokenised in %.2f s); model %s\n", file, n,
            kp_now() - tt, model_desc(m));
    eval_ppl_opts po = eval_default_ppl_opts();
    po.n_ctx = co.n_ctx;
    po.kv_type = co.kv_type;
    po.max_chunks = (int)max_chunks;
    if (co.n_batch > 0) po.n_batch = KP_MAX(co.n_batch, co.n_ctx);
    ppl_progress prog = {.t0 = kp_now(), .tty = isatty(2)};
    po.on_chunk = ppl_on_chunk;
    po.ud = &prog;
    eval_ppl_result res;
    rc = eval_ppl(m, ids, (int64_t)n, &po, &res, &err);
    if (prog.tty) fprintf(stderr, "\n");
    if (!rc) {
        printf("chunks = %d\nscored = %lld\ntokens_per_second = %.0f\nppl = %.4f\n", res.n_chunks,
               (long long)res.n_scored, res.tokens_per_second, res.ppl);
    }
out:
    free(ids);
    model_free(m);
    return rc ? cli_die(&err, rc) : 0;
}
