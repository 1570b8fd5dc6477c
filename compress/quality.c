/*
 * quality.c — what a KV codec costs a user: the "park every N tokens"
 * evaluation of quality.h (its front ends: `kvpark ppl --codec ...`,
 * tools/cmd_ppl.c, and `kvpark bench codec`, bench/bench_codec.c).
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


quality_opts quality_default_opts(void) {
    quality_opts o = {.n_ctx = 256, .park_every = 64, .chunk = LAYOUT_DEFAULT_CHUNK,
                      .sink = LAYOUT_DEFAULT_SINK, .window = LAYOUT_DEFAULT_WINDOW,
                      .max_chunks = 0, .kv_type = KP_TYPE_F16};
    return o;
}

int quality_layout_ratio(const codec *c, const codec_shape *sh, const layout *lay, int n_pos, int kv_type,
                         double *ratio, double *fixed_bytes, double *coded_values, kp_err *err) {
    if (n_pos < 1) return kp_errf(err, KP_EINVAL, "quality: a parked cache needs at least one row");
    layout_span *sp = NULL;
    int n_sp = 0, rc = layout_spans_alloc(lay, n_pos, &sp, &n_sp, err);
    if (rc) return rc;
    codec *none = NULL;
    if ((rc = codec_open(&none, "none", sh, err))) {
        free(sp);
        return rc;
    }
    const double row_values = (double)sh->n_kv_heads * sh->head_dim;
    double stored = 0, fixed = 0, coded = 0;
    for (int l = 0; l < sh->n_layer; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int i = 0; i < n_sp; i++) {
                const codec *by = sp[i].coded ? c : none;
                double b = (double)codec_chunk_bytes_at(by, sp[i].n, kv_type, kv, l);
                stored += b;
                if (sp[i].coded) fixed += CODEC_CHUNK_HEADER_BYTES, coded += sp[i].n * row_values;
                else fixed += b;
            }
    codec_free(none);
    free(sp);
    const double fp16 = 2.0 * (double)n_pos * row_values * 2.0 * sh->n_layer;
    *ratio = stored > 0 ? fp16 / stored : 0;
    if (fixed_bytes) *fixed_bytes = fixed;
    if (coded_values) *coded_values = coded;
    return 0;
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
    if (len <= CODEC_CHUNK_HEADER_BYTES) {
        p->st_hdr += (double)len;
        return len;
    }
    int pay = (int)(len - CODEC_CHUNK_HEADER_BYTES);
    int z = LZ4_compress_default((const char *)enc + CODEC_CHUNK_HEADER_BYTES, p->lz, pay, p->lz_cap);
    const int kept = z > 0 && z < pay ? z : pay;
    p->st_hdr += CODEC_CHUNK_HEADER_BYTES;
    *(coded ? &p->st_coded : &p->st_lossless) += kept;
    p->lz4_saved += pay - kept;
    return CODEC_CHUNK_HEADER_BYTES + (size_t)kept;
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

int quality_ctx_for(model *m) {
    const int train = model_hp(m)->n_ctx_train;
    return train > 0 && train < QUALITY_DEFAULT_CTX ? train : QUALITY_DEFAULT_CTX;
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
        if (o.cancel && atomic_load(o.cancel)) {
            rc = kp_errf(err, KP_ECANCELED, "quality: canceled");
            goto done;
        }
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
