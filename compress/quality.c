/*
 * quality.c — what a KV codec costs a user: the "park every N tokens"
 * evaluation of quality.h, and the two CLI front ends built on it
 * (`kvpark ppl --codec ...` and `kvpark bench codec`).
 *
 * Why: a codec's reconstruction error says little about what users see. What
 * matters is how the next-token distribution moves once a conversation has
 * been parked (encoded, LZ4'd, stored) and resumed (decoded) — possibly many
 * times — and how many bytes were really stored for it, headers, scales and
 * lossless sink/window tokens included.
 *
 * Method, per window of n_ctx tokens (cut as llama-perplexity does, eval.h):
 *   1. reference: the whole window in one forward pass on a fresh cache
 *      (exactly eval_ppl's numbers);
 *   2. parked run: the same tokens fed park_every at a time; after EVERY feed
 *      the cache so far is parked and resumed in place (park()).
 *      Parking re-encodes the CURRENT cache rows, i.e. rows that an earlier
 *      park already decoded: that is what a real session does when it is
 *      resumed and parked again, so the error compounds realistically (a
 *      lossy codec meets its own output; int8 on int8-decoded rows is nearly
 *      idempotent, a learned projection may not be).
 *   3. positions n_ctx/2 .. n_ctx-2 are scored: NLL of the next token under
 *      both runs (PPL, PPL_ref), top-1 agreement of the two argmaxes, and
 *      KL(p_ref || p_codec), everything in double from log-softmax.
 *
 * Parking layout: compress/layout.h (the session store uses the same one):
 * the first S rows and the last W rows lossless, the rows between coded in
 * chunks of C rows aligned at S + k*C.
 *
 * Size accounting, per park, for every layer and K/V, span by span:
 *   - coded spans go through the codec under test; lossless spans through
 *     codec "none", i.e. the cache's own bits (4 bytes/value on F32, 2 on
 *     F16/BF16: `kvpark bench codec` therefore defaults to an F16 cache, as
 *     llama.cpp does);
 *   - stored bytes = 16-byte chunk header + min(LZ4(payload), payload): the
 *     header stays raw so a reader can check it before decompressing, and a
 *     payload LZ4 cannot shrink is stored as is.
 *   ratio (vs fp16) = sum over parks of the fp16 size of all parked rows
 *           (n_pos * n_layer * 2 * n_kv_heads * head_dim * 2 bytes)
 *         / sum over parks of stored bytes.
 *   So on an F32 cache codec "none" has ratio ~0.5 (4-byte values, before
 *   what LZ4 finds), and ~1 on an F16 cache.
 *   Encode/decode GB/s time only the codec_encode / codec_decode calls of
 *   coded chunks, counting their fp16-equivalent bytes (one thread).
 *
 * Rows travel through the backend's download/upload, so a device cache works
 * as well as a host one.
 */
#include "compress/quality.h"

#include <errno.h>
#include <getopt.h>
#include <lz4.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "compress/calib.h"
#include "engine/eval.h"
#include "engine/kv.h"
#include "engine/tok.h"

#define QUALITY_HDR_BYTES 16 /* codec.c's chunk header */

quality_opts quality_default_opts(void) {
    quality_opts o = {.n_ctx = 256, .park_every = 64, .chunk = LAYOUT_DEFAULT_CHUNK,
                      .sink = LAYOUT_DEFAULT_SINK, .window = LAYOUT_DEFAULT_WINDOW,
                      .max_chunks = 0, .kv_type = KP_TYPE_F32};
    return o;
}

codec_shape quality_codec_shape(model *m) {
    const model_hparams *hp = model_hp(m);
    codec_shape s = {.n_layer = hp->n_layer, .n_kv_heads = hp->n_kv_heads, .head_dim = hp->head_dim,
                     .n_rot = hp->n_rot, .rope_mode = hp->rope_mode, .rope_base = hp->rope_base,
                     .rope_freq_scale = hp->rope_freq_scale,
                     .model_fingerprint = model_fingerprint(m)};
    return s;
}

/* ---- parking ------------------------------------------------------------ */

/* Buffers and running totals of the parked run. */
typedef struct quality_park {
    const codec *c;        /* the codec under test */
    const codec *none;     /* lossless chunks */
    const quality_opts *o;
    uint8_t *host;         /* [n_ctx][row_bytes]: one layer's K or V, host copy */
    uint8_t *enc;          /* one encoded chunk */
    size_t enc_cap;
    char *lz;              /* LZ4 output of one payload */
    int lz_cap;
    double stored;         /* bytes, all parks */
    double st_lossless, st_coded, st_hdr, lz4_saved; /* stored bytes by kind, LZ4 savings */
    double fp16;           /* fp16 bytes of the parked rows, all parks */
    double token_layers;   /* n_pos * n_layer, all parks */
    double coded_fp16;     /* fp16 bytes that went through the codec */
    double enc_s, dec_s;   /* seconds in codec_encode / codec_decode */
    layout lay;            /* o's sink, window, chunk */
    layout_span *spans;    /* [max_spans]: the spans of one park */
    int max_spans;
} quality_park;

/* Bytes one encoded chunk takes in storage: raw header + LZ4'd payload
 * (counted by kind: coded or lossless payload, header, LZ4 savings). */
static size_t quality_stored_bytes(quality_park *p, const uint8_t *enc, size_t len, int coded) {
    if (len <= QUALITY_HDR_BYTES) {
        p->st_hdr += (double)len;
        return len;
    }
    int pay = (int)(len - QUALITY_HDR_BYTES);
    int z = LZ4_compress_default((const char *)enc + QUALITY_HDR_BYTES, p->lz, pay, p->lz_cap);
    const int kept = z > 0 && z < pay ? z : pay;
    p->st_hdr += QUALITY_HDR_BYTES;
    *(coded ? &p->st_coded : &p->st_lossless) += kept;
    p->lz4_saved += pay - kept;
    return QUALITY_HDR_BYTES + (size_t)kept;
}

/* Park and resume the cache: every span (layout_spans) of every
 * layer's K and V is encoded and counted; coded spans are decoded back in
 * place. */
static int quality_park_kv(quality_park *p, kv_cache *kv, kp_err *err) {
    const quality_opts *o = p->o;
    const kp_ops *ops = kp_backend_ops(kv->be);
    const int n = kv->n_pos;
    const size_t rb = kv->row_bytes;
    const double row_fp16 = (double)kv->n_kv_heads * kv->head_dim * 2;
    int ns = layout_spans(&p->lay, n, p->spans, p->max_spans);
    if (ns < 0 || ns > p->max_spans)
        return kp_errf(err, KP_EINVAL, "quality: no parking layout for %d rows (chunk %d)", n,
                       o->chunk);
    int rc;
    for (int l = 0; l < kv->n_layer; l++) {
        for (int is_v = 0; is_v < 2; is_v++) {
            uint8_t *dev = is_v ? kv->v[l] : kv->k[l];
            if ((rc = ops->download(kv->be, p->host, dev, (size_t)n * rb)))
                return kp_errf(err, rc, "quality: cannot read the KV cache of layer %d", l);
            for (int i = 0; i < ns; i++) {
                const layout_span *sp = &p->spans[i];
                codec_chunk ch = {.layer = l, .is_v = is_v, .pos0 = sp->start, .n = sp->n,
                                  .kv_type = kv->kv_type};
                uint8_t *rows = p->host + (size_t)sp->start * rb;
                size_t len = 0;
                double t0 = kp_now();
                rc = codec_encode(sp->coded ? p->c : p->none, &ch, rows, p->enc, p->enc_cap, &len,
                                  err);
                if (rc) return rc;
                if (sp->coded) p->enc_s += kp_now() - t0;
                p->stored += (double)quality_stored_bytes(p, p->enc, len, sp->coded);
                if (!sp->coded) continue;
                t0 = kp_now();
                if ((rc = codec_decode(p->c, &ch, p->enc, len, rows, err))) return rc;
                p->dec_s += kp_now() - t0;
                p->coded_fp16 += row_fp16 * sp->n;
                if ((rc = ops->upload(kv->be, dev + (size_t)sp->start * rb, rows,
                                      (size_t)sp->n * rb)))
                    return kp_errf(err, rc, "quality: cannot write the KV cache of layer %d", l);
            }
        }
    }
    p->fp16 += row_fp16 * n * kv->n_layer * 2;
    p->token_layers += (double)n * kv->n_layer;
    return 0;
}

/* ---- scoring -------------------------------------------------------------- */

/* out[i] = log softmax(logits)[i] in double, computed as eval_log_softmax_at
 * does (same max, same sum order) so codec "none" reproduces eval_ppl. */
static void quality_log_softmax(const float *logits, int nv, double *out) {
    float max = logits[0];
    for (int i = 1; i < nv; i++)
        if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < nv; i++) sum += exp((double)logits[i] - max);
    double lse = log(sum);
    for (int i = 0; i < nv; i++) out[i] = (double)logits[i] - max - lse;
}

static int quality_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

int quality_eval(model *m, const codec *c, const int32_t *tokens, int64_t n_tokens,
                 const quality_opts *opts, quality_result *res, kp_err *err) {
    quality_opts o = opts ? *opts : quality_default_opts();
    memset(res, 0, sizeof *res);
    const model_hparams *hp = model_hp(m);
    const int n_ctx = o.n_ctx, nv = hp->n_vocab;
    if (n_ctx < 4) return kp_errf(err, KP_EINVAL, "quality: context %d is too small (>= 4)", n_ctx);
    if (o.park_every < 1 || o.chunk < 1 || o.chunk > 65535 || o.sink < 0 || o.window < 0)
        return kp_errf(err, KP_EINVAL,
                       "quality: need park_every >= 1, chunk 1..65535, sink >= 0, window >= 0 "
                       "(got %d, %d, %d, %d)", o.park_every, o.chunk, o.sink, o.window);
    int n_win = (int)(n_tokens / n_ctx);
    if (o.max_chunks > 0 && n_win > o.max_chunks) n_win = o.max_chunks;
    if (n_win == 0)
        return kp_errf(err, KP_EINVAL,
                       "quality: the text has %lld tokens, fewer than one context of %d: use a "
                       "longer file or a smaller -c", (long long)n_tokens, n_ctx);

    codec_shape shape = quality_codec_shape(m);
    quality_park p = {.c = c, .o = &o,
                      .lay = {.sink = o.sink, .window = o.window, .chunk = o.chunk}};
    codec *none = NULL;
    kv_cache *kv = NULL;
    int32_t *win = malloc(sizeof *win * (size_t)n_ctx);
    float *lref = malloc(sizeof *lref * (size_t)n_ctx * nv);
    float *lcod = malloc(sizeof *lcod * (size_t)n_ctx * nv);
    double *pr = malloc(sizeof *pr * (size_t)nv), *pc = malloc(sizeof *pc * (size_t)nv);
    int rc = 0;
    if (!win || !lref || !lcod || !pr || !pc) {
        rc = kp_errf(err, KP_ENOMEM, "quality: out of memory for 2 x %d x %d logits", n_ctx, nv);
        goto done;
    }
    if ((rc = codec_open(&none, "none", &shape, err))) goto done;
    if ((rc = model_kv_new(m, &kv, o.kv_type, n_ctx, err))) goto done;
    p.none = none;
    p.enc_cap = KP_MAX(codec_max_bytes(c, o.chunk), codec_max_bytes(none, o.chunk));
    p.lz_cap = LZ4_compressBound((int)p.enc_cap);
    p.enc = malloc(p.enc_cap);
    p.lz = malloc((size_t)p.lz_cap);
    p.host = malloc((size_t)n_ctx * kv->row_bytes);
    p.max_spans = layout_max_spans(&p.lay, n_ctx);
    p.spans = malloc(sizeof *p.spans * (size_t)p.max_spans);
    if (!p.enc || !p.lz || !p.host || !p.spans) {
        rc = kp_errf(err, KP_ENOMEM, "quality: out of memory for chunk buffers");
        goto done;
    }

    const int32_t bos = tok_bos(model_vocab(m));
    const int first = n_ctx / 2;
    double nll = 0, nll_ref = 0, kl = 0;
    int64_t agree = 0, count = 0;
    for (int w = 0; w < n_win; w++) {
        memcpy(win, tokens + (size_t)w * n_ctx, sizeof *win * (size_t)n_ctx);
        if (bos >= 0) win[0] = bos;
        /* 1. reference: one pass, as eval_ppl */
        kv_truncate(kv, 0);
        model_seq s = {.kv = kv, .tokens = win, .n_tokens = n_ctx, .all_logits = true,
                       .logits = lref};
        if ((rc = model_forward(m, &s, 1, err))) goto done;
        /* 2. parked run */
        kv_truncate(kv, 0);
        for (int t = 0; t < n_ctx; t += o.park_every) {
            int k = KP_MIN(o.park_every, n_ctx - t);
            s = (model_seq){.kv = kv, .tokens = win + t, .n_tokens = k, .all_logits = true,
                            .logits = lcod + (size_t)t * nv};
            if ((rc = model_forward(m, &s, 1, err))) goto done;
            if ((rc = quality_park_kv(&p, kv, err))) goto done;
        }
        /* 3. score */
        const int32_t *orig = tokens + (size_t)w * n_ctx;
        for (int j = first; j < n_ctx - 1; j++) {
            const float *fr = lref + (size_t)j * nv, *fc = lcod + (size_t)j * nv;
            quality_log_softmax(fr, nv, pr);
            quality_log_softmax(fc, nv, pc);
            nll_ref -= pr[orig[j + 1]];
            nll -= pc[orig[j + 1]];
            double d = 0;
            for (int i = 0; i < nv; i++) d += exp(pr[i]) * (pr[i] - pc[i]);
            kl += d;
            agree += quality_argmax(fr, nv) == quality_argmax(fc, nv);
            count++;
        }
    }
    res->n_windows = n_win;
    res->n_scored = count;
    res->ppl = exp(nll / (double)count);
    res->ppl_ref = exp(nll_ref / (double)count);
    res->agree = (double)agree / (double)count;
    res->kl = kl / (double)count;
    res->ratio = p.stored > 0 ? p.fp16 / p.stored : 0;
    res->bytes_per_token_layer = p.token_layers > 0 ? p.stored / p.token_layers : 0;
    res->encode_gbps = p.enc_s > 0 ? p.coded_fp16 / p.enc_s / 1e9 : 0;
    res->decode_gbps = p.dec_s > 0 ? p.coded_fp16 / p.dec_s / 1e9 : 0;
    if (p.fp16 > 0) { /* bytes * 8 / (fp16 bytes / 2) */
        res->bits_lossless = 16.0 * p.st_lossless / p.fp16;
        res->bits_coded = 16.0 * p.st_coded / p.fp16;
        res->bits_headers = 16.0 * p.st_hdr / p.fp16;
        res->bits_lz4_saved = 16.0 * p.lz4_saved / p.fp16;
    }
done:
    kv_free(kv);
    codec_free(none);
    free(p.enc);
    free(p.lz);
    free(p.host);
    free(p.spans);
    free(win);
    free(lref);
    free(lcod);
    free(pr);
    free(pc);
    return rc;
}

/* ---- shared CLI helpers ------------------------------------------------------ */

static int quality_parse_int(const char *s, long lo, long hi, int *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = (int)v;
    return 0;
}

static int quality_usage(const char *cmd, const char *msg) {
    fprintf(stderr, "kvpark %s: %s (see 'kvpark %s --help')\n", cmd, msg, cmd);
    return 2;
}

static int quality_die(const kp_err *e, int rc) {
    fprintf(stderr, "kvpark: %s\n", e->msg[0] ? e->msg : kp_strerror(rc));
    return 1;
}

/* Read a text file and tokenise it with BOS (as llama-perplexity). */
static int quality_tokenize_file(model *m, const char *file, int32_t **ids, size_t *n, kp_err *err) {
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

static int quality_load_model(const char *cli, int threads, model **m, kp_err *err) {
    char path[1024];
    int rc = model_resolve(cli, path, sizeof path, err);
    if (rc) return rc;
    model_opts mo = model_default_opts();
    mo.n_threads = threads;
    return model_load(m, path, &mo, err);
}

/* Options both commands share. */
enum {
    QOPT_KV_TYPE = 2000, QOPT_CHUNKS, QOPT_CODEC, QOPT_PARK_EVERY, QOPT_SINK, QOPT_WINDOW,
    QOPT_CHUNK, QOPT_CALIB, QOPT_CSV, QOPT_PLOT, QOPT_BITS, QOPT_MAX_DPPL,
};

typedef struct quality_cli {
    const char *model, *file;
    int threads;
    quality_opts qo;
} quality_cli;

/* 1 if consumed, -1 on a bad value, 0 if not a shared option. */
static int quality_common_opt(int c, const char *arg, quality_cli *q) {
    switch (c) {
    case 'm': q->model = arg; return 1;
    case 'f': q->file = arg; return 1;
    case 't': return quality_parse_int(arg, 0, 1024, &q->threads) ? -1 : 1;
    case 'c': return quality_parse_int(arg, 4, 1 << 24, &q->qo.n_ctx) ? -1 : 1;
    case 'b': { int b; return quality_parse_int(arg, 1, 1 << 20, &b) ? -1 : 1; } /* accepted, unused */
    case QOPT_CHUNKS: return quality_parse_int(arg, 0, 1 << 30, &q->qo.max_chunks) ? -1 : 1;
    case QOPT_PARK_EVERY: return quality_parse_int(arg, 1, 1 << 24, &q->qo.park_every) ? -1 : 1;
    case QOPT_SINK: return quality_parse_int(arg, 0, 1 << 24, &q->qo.sink) ? -1 : 1;
    case QOPT_WINDOW: return quality_parse_int(arg, 0, 1 << 24, &q->qo.window) ? -1 : 1;
    case QOPT_CHUNK: return quality_parse_int(arg, 1, 65535, &q->qo.chunk) ? -1 : 1;
    case QOPT_KV_TYPE: q->qo.kv_type = kv_type_from_name(arg); return q->qo.kv_type < 0 ? -1 : 1;
    }
    return 0;
}

#define QUALITY_COMMON_LONGOPTS                                                                 \
    {"model", required_argument, 0, 'm'}, {"file", required_argument, 0, 'f'},                  \
        {"ctx", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},               \
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, QOPT_KV_TYPE}, \
        {"chunks", required_argument, 0, QOPT_CHUNKS},                                          \
        {"park-every", required_argument, 0, QOPT_PARK_EVERY},                                  \
        {"sink", required_argument, 0, QOPT_SINK}, {"window", required_argument, 0, QOPT_WINDOW}, \
        {"chunk", required_argument, 0, QOPT_CHUNK}, {"help", no_argument, 0, 'h'}

/* ---- kvpark ppl --codec ----------------------------------------------------- */

int quality_ppl_main(int argc, char **argv) {
    quality_cli q = {.qo = quality_default_opts()};
    const char *codec_arg = NULL;
    static const struct option lo[] = {QUALITY_COMMON_LONGOPTS,
                                       {"codec", required_argument, 0, QOPT_CODEC},
                                       {0, 0, 0, 0}};
    int ch;
    optind = 0; /* full getopt reset: this may run more than once in a process */
    while ((ch = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = quality_common_opt(ch, optarg, &q);
        if (r < 0) return quality_usage("ppl", "bad option value");
        if (r > 0) continue;
        if (ch == QOPT_CODEC) codec_arg = optarg;
        else if (ch == 'h') {
            puts("usage: kvpark ppl [-m MODEL] -f TEXTFILE --codec NAME|FILE [-c CTX] [--chunks N]\n"
                 "       [--park-every N] [--sink S] [--window W] [--chunk C]\n"
                 "       [--kv-type f32|f16|bf16] [-t THREADS]\n"
                 "Perplexity with the KV cache parked and resumed through a codec every N tokens\n"
                 "(default 64): the first S (4) and the last W (64) tokens stay lossless at the\n"
                 "cache's type, the rest goes through the codec in chunks of C (64) aligned after\n"
                 "the sink (the last one may be partial); compared with the uncompressed run. Codecs: none, fp16, int8, int4, kivi2, or a codec file.\n"
                 "Ends with 'ppl = X', 'ratio = R' (fp16 bytes / stored bytes after LZ4),\n"
                 "'agree = A' (top-1 agreement) and 'kl = K' (mean KL(p_ref || p), nats).");
            return 0;
        } else return quality_usage("ppl", "unknown option");
    }
    if (!q.file) return quality_usage("ppl", "missing -f TEXTFILE");
    if (!codec_arg) return quality_usage("ppl", "missing --codec NAME|FILE");
    kp_err err = {0};
    model *m = NULL;
    codec *c = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = quality_load_model(q.model, q.threads, &m, &err);
    if (rc) return quality_die(&err, rc);
    codec_shape shape = quality_codec_shape(m);
    if ((rc = codec_open(&c, codec_arg, &shape, &err))) goto out;
    if ((rc = quality_tokenize_file(m, q.file, &ids, &n, &err))) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens; model %s; codec %s, park every %d, chunk %d, sink %d, "
            "window %d\n", q.file, n, model_desc(m), codec_name(c), q.qo.park_every, q.qo.chunk,
            q.qo.sink, q.qo.window);
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
    return rc ? quality_die(&err, rc) : 0;
}

/* ---- kvpark bench codec ------------------------------------------------------ */

typedef struct quality_row {
    char name[48];
    double target_bits;   /* learned/pca: the calibration target; 0 otherwise */
    double coded_bits;    /* bits per value of one coded chunk (nominal, before LZ4) */
    quality_result r;
} quality_row;

static void quality_print_table(const quality_row *rows, int n) {
    printf("| codec | bits/value | coded bits | ratio vs fp16 | Δppl %% | top-1 agree | KL | "
           "encode GB/s | decode GB/s |\n");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        printf("| %s | %.3f | %.3f | %.3f | %+.3f | %.4f | %.3g | %.3f | %.3f |\n", rows[i].name,
               r->ratio > 0 ? 16.0 / r->ratio : 0, rows[i].coded_bits, r->ratio,
               100.0 * (r->ppl - r->ppl_ref) / r->ppl_ref, r->agree, r->kl, r->encode_gbps,
               r->decode_gbps);
    }
}

/* Where the bits go: bits per parked value by kind (they add up to the
 * bits/value column). */
static void quality_print_breakdown(const quality_row *rows, int n) {
    printf("\nWhere the stored bits go (bits per parked value; lossless + coded + headers = "
           "bits/value):\n\n");
    printf("| codec | lossless sink+window rows | coded chunks | chunk headers | bits/value | "
           "LZ4 saved |\n");
    printf("|---|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        printf("| %s | %.3f | %.3f | %.3f | %.3f | %.3f |\n", rows[i].name, r->bits_lossless,
               r->bits_coded, r->bits_headers, r->ratio > 0 ? 16.0 / r->ratio : 0, r->bits_lz4_saved);
    }
}

static int quality_write_csv(const char *path, const quality_row *rows, int n, kp_err *err) {
    FILE *f = fopen(path, "w");
    if (!f) return kp_errf(err, KP_EIO, "cannot write '%s': %s", path, strerror(errno));
    fprintf(f, "codec,target_bits,bits_per_value,coded_bits,ratio,ppl_ref,ppl,dppl_pct,agree,kl,"
               "encode_gbps,decode_gbps,windows,scored,bits_lossless,bits_coded,bits_headers,bits_lz4_saved\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        fprintf(f, "%s,%g,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6g,%.6f,%.6f,%d,%lld,%.6f,%.6f,%.6f,%.6f\n",
                rows[i].name, rows[i].target_bits, r->ratio > 0 ? 16.0 / r->ratio : 0, rows[i].coded_bits,
                r->ratio, r->ppl_ref, r->ppl, 100.0 * (r->ppl - r->ppl_ref) / r->ppl_ref, r->agree,
                r->kl, r->encode_gbps, r->decode_gbps, r->n_windows, (long long)r->n_scored,
                r->bits_lossless, r->bits_coded, r->bits_headers, r->bits_lz4_saved);
    }
    if (fclose(f)) return kp_errf(err, KP_EIO, "cannot write '%s'", path);
    return 0;
}

/* Δppl % against ratio, one labelled point per codec, via gnuplot. */
static int quality_plot(const char *png, const quality_row *rows, int n, kp_err *err) {
    const char *gp = "/usr/bin/gnuplot";
    if (access(gp, X_OK) != 0) {
        fprintf(stderr, "kvpark: note: %s not found, no plot written (apt-get install gnuplot)\n",
                gp);
        return 0;
    }
    char dat[] = "/tmp/kvpark-codec-XXXXXX";
    int fd = mkstemp(dat);
    if (fd < 0) return kp_errf(err, KP_EIO, "plot: cannot create a temporary file");
    FILE *f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        unlink(dat);
        return kp_errf(err, KP_EIO, "plot: cannot write a temporary file");
    }
    for (int i = 0; i < n; i++)
        fprintf(f, "%.6f %.6f \"%s\"\n", rows[i].r.ratio,
                100.0 * (rows[i].r.ppl - rows[i].r.ppl_ref) / rows[i].r.ppl_ref, rows[i].name);
    fclose(f);
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "%s 2>&1", gp);
    FILE *g = popen(cmd, "w");
    int rc = 0;
    if (!g) rc = kp_errf(err, KP_EIO, "plot: cannot run %s", gp);
    else {
        fprintf(g,
                "set terminal pngcairo noenhanced size 900,600\n"
                "set output '%s'\n"
                "set title 'KV codecs: perplexity cost vs size'\n"
                "set xlabel 'compression ratio vs fp16 (all stored bytes, after LZ4)'\n"
                "set ylabel 'Δppl %%'\n"
                "set grid\n"
                "plot '%s' using 1:2 with points pt 7 ps 1.3 notitle, \\\n"
                "     '%s' using 1:2:3 with labels offset char 0,1 notitle\n",
                png, dat, dat);
        int st = pclose(g);
        if (st != 0) rc = kp_errf(err, KP_EIO, "plot: gnuplot failed writing '%s'", png);
    }
    unlink(dat);
    return rc;
}

/* Evaluate one codec and append a row. */
static int quality_bench_one(model *m, const char *name_or_path, const char *label, double target,
                             const int32_t *ids, size_t n, const quality_opts *qo, quality_row *row,
                             kp_err *err) {
    codec_shape shape = quality_codec_shape(m);
    codec *c = NULL;
    int rc = codec_open(&c, name_or_path, &shape, err);
    if (rc) return rc;
    memset(row, 0, sizeof *row);
    snprintf(row->name, sizeof row->name, "%s", label ? label : codec_name(c));
    row->target_bits = target;
    const model_hparams *hp = model_hp(m);
    double vals = (double)qo->chunk * hp->n_kv_heads * hp->head_dim;
    double coded = 0; /* exact bytes of a full chunk, averaged over layers and K/V */
    for (int l = 0; l < hp->n_layer; l++)
        coded += (double)(codec_chunk_bytes_at(c, qo->chunk, qo->kv_type, 0, l) +
                          codec_chunk_bytes_at(c, qo->chunk, qo->kv_type, 1, l));
    row->coded_bits = 8.0 * coded / (2.0 * hp->n_layer * vals);
    double t0 = kp_now();
    rc = quality_eval(m, c, ids, (int64_t)n, qo, &row->r, err);
    if (!rc)
        fprintf(stderr, "kvpark: %-12s ratio %.3f  ppl %.4f (ref %.4f)  agree %.4f  kl %.3g  [%.1f s]\n",
                row->name, row->r.ratio, row->r.ppl, row->r.ppl_ref, row->r.agree, row->r.kl,
                kp_now() - t0);
    codec_free(c);
    return rc;
}

/* Default calibration text: $KVPARK_SHARED/data/..., else ../shared/data/... */
static void quality_default_calib(char *buf, size_t cap) {
    const char *sh = getenv("KVPARK_SHARED");
    snprintf(buf, cap, "%s/data/tinystories-train-calib.txt", sh && *sh ? sh : "../shared");
}

/* Calibrate learned and pca codecs on `calib` text at every target of
 * bits_list ("1,1.5,2") and evaluate each; with max_dppl > 0 also a learned
 * codec sized by `calibrate --max-dppl` on the calibration text's held-out
 * slice (row "learned<=P%"). A calibration that fails is reported and
 * skipped (the baselines still make a table). */
static int quality_bench_learned(model *m, const char *calib, const char *bits_list, double max_dppl,
                                 const int32_t *ids, size_t n, const quality_opts *qo,
                                 quality_row *rows, int *nrows, int max_rows, kp_err *err) {
    int32_t *cids = NULL;
    size_t cn = 0;
    kp_err e2 = {0};
    if (quality_tokenize_file(m, calib, &cids, &cn, &e2)) {
        fprintf(stderr, "kvpark: note: %s: learned/pca codecs skipped (pass --calib TEXT)\n",
                e2.msg);
        return 0;
    }
    int rc = 0;
    for (int kind = 0; kind < 3 && !rc; kind++) { /* learned, pca, learned by max_dppl */
        char list[256], *save = NULL;
        snprintf(list, sizeof list, "%s", kind < 2 ? bits_list : max_dppl > 0 ? "2" : "");
        for (char *tk = strtok_r(list, ",", &save); tk && !rc; tk = strtok_r(NULL, ",", &save)) {
            double bits = strtod(tk, NULL);
            if (!(bits > 0 && bits <= 16) || *nrows >= max_rows) continue;
            calib_opts co = calib_default_opts();
            co.kind = kind == 1 ? CODEC_PCA : CODEC_LEARNED;
            co.bits = bits;
            co.max_dppl = kind == 2 ? max_dppl : 0;
            co.n_ctx = qo->n_ctx;
            co.chunk = qo->chunk;
            co.sink = qo->sink;
            co.window = qo->window;
            co.park_every = qo->park_every;
            char label[48];
            if (kind == 2) snprintf(label, sizeof label, "learned<=%g%%", max_dppl);
            else snprintf(label, sizeof label, "%s@%g", kind == 0 ? "learned" : "pca", bits);
            char path[] = "/tmp/kvpark-codec-calib-XXXXXX";
            int fd = mkstemp(path);
            if (fd < 0) {
                rc = kp_errf(err, KP_EIO, "bench codec: cannot create a temporary codec file");
                break;
            }
            close(fd);
            fprintf(stderr, "kvpark: calibrating %s on %s ...\n", label, calib);
            calib_report rep;
            e2 = (kp_err){0};
            int crc = calib_run(m, cids, cn, &co, path, &rep, &e2);
            if (!crc && co.kind == CODEC_LEARNED)
                fprintf(stderr, "kvpark: %s: %.3f bits/value, held-out (calibration text) ratio %.3f, "
                        "Δppl %+.3f%%, KL %.3g [%.1f s]\n", label, rep.target_bits, rep.heldout_ratio,
                        rep.heldout_dppl, rep.heldout_kl, rep.seconds);
            if (!crc) crc = quality_bench_one(m, path, label, rep.target_bits, ids, n, qo, &rows[*nrows], &e2);
            if (!crc) (*nrows)++;
            else fprintf(stderr, "kvpark: note: %s skipped: %s\n", label, e2.msg);
            unlink(path);
        }
    }
    free(cids);
    return rc;
}

/* The bench's own defaults (quality.h): a realistic context, a short recent
 * window, no sink, and llama.cpp's default F16 cache.
 *
 * Why window 8 and sink 0: lossless rows cost 16 bits per value, so they
 * bound the ratio: parking every 64 tokens up to 512, S + W lossless rows
 * per park cap it at 2304 / (8 (S + W)), 8x for S 4 + W 32, whatever the
 * codec does. Measured on stories260K (learned, --bits 1.5, evaluation
 * text, 20 windows; ratio / Δppl): W 32 S 4 4.74x / +0.26%; W 16 S 0
 * 6.80x / +0.65%; W 8 S 0 8.15x / +0.62%; W 4 S 0 9.01x / +0.92%; W 0 S 0
 * 10.3x / +2.23%. At W 8 the sink changes nothing measurable (S 0 / 1 / 4:
 * KL 0.0085 / 0.0084 / 0.0086) and costs 3% / 10% of the ratio. Models with
 * strong attention sinks may want --sink 1..4: it is a codec parameter. */
#define QUALITY_BENCH_CTX 512
#define QUALITY_BENCH_WINDOW 8
#define QUALITY_BENCH_SINK 0

int quality_bench_main(int argc, char **argv) {
    quality_cli q = {.qo = quality_default_opts()};
    q.qo.n_ctx = 0; /* 0: not given; min(512, the model's training context) */
    q.qo.window = QUALITY_BENCH_WINDOW;
    q.qo.sink = QUALITY_BENCH_SINK;
    q.qo.kv_type = KP_TYPE_F16;
    const char *calib = NULL, *csv = NULL, *plot = NULL;
    char bits_list[256] = "1,1.25,1.5,2,3,4,8";
    double max_dppl = 0;
    static const struct option lo[] = {QUALITY_COMMON_LONGOPTS,
                                       {"calib", required_argument, 0, QOPT_CALIB},
                                       {"csv", required_argument, 0, QOPT_CSV},
                                       {"plot", required_argument, 0, QOPT_PLOT},
                                       {"bits", required_argument, 0, QOPT_BITS},
                                       {"max-dppl", required_argument, 0, QOPT_MAX_DPPL},
                                       {0, 0, 0, 0}};
    int ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = quality_common_opt(ch, optarg, &q);
        if (r < 0) return quality_usage("bench codec", "bad option value");
        if (r > 0) continue;
        if (ch == QOPT_CALIB) calib = optarg;
        else if (ch == QOPT_CSV) csv = optarg;
        else if (ch == QOPT_PLOT) plot = optarg;
        else if (ch == QOPT_BITS) snprintf(bits_list, sizeof bits_list, "%s", optarg);
        else if (ch == QOPT_MAX_DPPL) {
            char *end;
            max_dppl = strtod(optarg, &end);
            if (end == optarg || *end || !(max_dppl > 0))
                return quality_usage("bench codec", "--max-dppl needs a percentage > 0");
        }
        else if (ch == 'h') {
            puts("usage: kvpark bench codec [-m MODEL] -f EVALTEXT [--calib CALIBTEXT]\n"
                 "       [--bits 1,1.25,1.5,2,3,4,8] [--max-dppl P] [--csv FILE] [--plot FILE.png]\n"
                 "       [-c CTX] [--chunks N]\n"
                 "       [--park-every N] [--sink S] [--window W] [--chunk C] [--kv-type T] [-t N]\n"
                 "Every baseline codec (none, fp16, int8, int4, kivi2) and the learned/pca codecs\n"
                 "calibrated on CALIBTEXT at each --bits target, evaluated as 'kvpark ppl --codec'\n"
                 "does: a markdown table of bits/value, ratio vs fp16, Δppl %, top-1 agreement,\n"
                 "KL and encode/decode GB/s, then where the stored bits go; --csv writes it,\n"
                 "--plot draws Δppl vs ratio. --max-dppl P adds a learned codec sized by\n"
                 "'kvpark calibrate --max-dppl P' on the calibration text's held-out slice.\n"
                 "Defaults: -c min(512, training context), --park-every 64, --chunk 64, --sink 0,\n"
                 "--window 8, --kv-type f16. Ratio = fp16 bytes of the parked KV / every stored\n"
                 "byte (headers, scales, LZ4); sink and window rows are stored lossless at the\n"
                 "cache's type. GB/s: fp16-equivalent bytes per second of one thread.");
            return 0;
        } else return quality_usage("bench codec", "unknown option");
    }
    if (!q.file) return quality_usage("bench codec", "missing -f EVALTEXT");
    kp_err err = {0};
    model *m = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    quality_row rows[64];
    int nrows = 0;
    int rc = quality_load_model(q.model, q.threads, &m, &err);
    if (rc) return quality_die(&err, rc);
    if (q.qo.n_ctx == 0) {
        int train = model_hp(m)->n_ctx_train;
        q.qo.n_ctx = train > 0 && train < QUALITY_BENCH_CTX ? train : QUALITY_BENCH_CTX;
    }
    if ((rc = quality_tokenize_file(m, q.file, &ids, &n, &err))) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens; model %s; ctx %d, park every %d, chunk %d, sink %d, "
            "window %d\n", q.file, n, model_desc(m), q.qo.n_ctx, q.qo.park_every, q.qo.chunk,
            q.qo.sink, q.qo.window);

    static const char *const baselines[] = {"none", "fp16", "int8", "int4", "kivi2"};
    for (size_t i = 0; i < sizeof baselines / sizeof *baselines; i++)
        if ((rc = quality_bench_one(m, baselines[i], NULL, 0, ids, n, &q.qo, &rows[nrows++], &err)))
            goto out;

    /* Learned and PCA codecs, calibrated at each bits target. */
    char calib_default[1024];
    if (!calib) {
        quality_default_calib(calib_default, sizeof calib_default);
        calib = calib_default;
    }
    if ((rc = quality_bench_learned(m, calib, bits_list, max_dppl, ids, n, &q.qo, rows, &nrows, 64, &err)))
        goto out;

    const char *kvn = q.qo.kv_type == KP_TYPE_F32   ? "f32"
                      : q.qo.kv_type == KP_TYPE_F16 ? "f16"
                                                    : "bf16";
    printf("KV codecs on %s, %s cache: ctx %d, parked every %d tokens, chunk %d, sink %d and "
           "window %d lossless (at the cache's type); ratio = fp16 bytes / all stored bytes; "
           "GB/s = fp16-equivalent, one thread.\n\n",
           model_desc(m), kvn, q.qo.n_ctx, q.qo.park_every, q.qo.chunk, q.qo.sink, q.qo.window);
    quality_print_table(rows, nrows);
    quality_print_breakdown(rows, nrows);
    fflush(stdout);
    if (csv && (rc = quality_write_csv(csv, rows, nrows, &err))) goto out;
    if (plot && (rc = quality_plot(plot, rows, nrows, &err))) goto out;
out:
    free(ids);
    model_free(m);
    return rc ? quality_die(&err, rc) : 0;
}
