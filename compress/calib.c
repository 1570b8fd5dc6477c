/*
 * calib.c — fit the 'learned' (and the baseline 'pca') KV codec of a model
 * on calibration text and write its codec file; `kvpark calibrate`.
 *
 * Why each step (DESIGN.md "The KV codec"):
 *   1. Collect, per layer, the first and second moments of the KV rows
 *      x [d = n_kv_heads * head_dim]: keys BEFORE RoPE for 'learned' (the
 *      rotation mixes positions into the basis), as stored for 'pca'; and
 *      for keys the query second moment per KV head group, because a key
 *      error matters through q . (k - k^):  E[(q.dk)^2] = dk^T E[q q^T] dk.
 *   2. Importance matrices (block-diagonal, one head_dim block per KV head g):
 *        M_k[g] = sum over query heads h of group g of E[q_h q_h^T]  (pre-RoPE q)
 *        M_v[g] = sum over h in g of W_O[:, h cols]^T W_O[:, h cols]
 *      plus a ridge of 1e-3 * (mean eigenvalue of the block). 'pca': M = I.
      M_k is averaged over the relative RoPE rotations delta in [0, n_ctx)
      (cal_rope_average): a pre-RoPE key error dk meets a pre-RoPE query as
      q^T R(-delta) dk, so the raw q covariance over-weights directions the
      rotation spreads out. Measured on stories260K (2 bits/value, ppl --codec,
      sink 0, window 0): KL 0.075 with the raw q covariance, 0.056 averaged.
 *   3. Whitened PCA: S = M^{1/2} (symmetric, by eigen-decomposition),
 *      C' = S Cov(x) S = U diag(lambda) U^T (Jacobi), encoder E = U_r^T S,
 *      decoder D = S^{-1} U_r: the reconstruction minimises the weighted
 *      error (x - x^)^T M (x - x^) among rank-r linear codes.
 *   4. Bits: greedy reverse water-filling over ALL layers and K/V at once.
 *      Distortion of latent j with b bits ~ lambda_j 4^-b, lambda normalised
 *      by the coder's total weighted variance (so every layer and K/V counts
 *      its relative error equally: their weights have different units). A
 *      step b -> b+1 gains lambda_j (3/4) 4^-b for C bits per chunk (C + 32
 *      for a dim's first bit: its fp16 min and step); the keys' lambdas are
      multiplied by calib_opts.k_weight (keys are the more sensitive: see
      calib.h). Steps with the largest
 *      gain per bit are taken while the average over all chunks stays within
 *      the target bits per value. 'pca' steps are 0 -> 8 only (int8 latents).
 *   5. Validate on the held-out last 10% of the text (whole n_ctx windows)
 *      through the real encode/decode (calib_codec_error), write the file.
 * Everything runs in a fixed order in double precision: the same inputs
 * give the same file bytes.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "calib.h"
#include "codecfile.h"
#include "compress/codec.h"

#define CALIB_RIDGE 1e-3

calib_opts calib_default_opts(void) {
    calib_opts o = {.n_ctx = 256,
                    .max_tokens = 131072,
                    .bits = 2.0,
                    .chunk = 64,
                    .sink = 4,
                    .window = 64,
                    .kind = CODEC_LEARNED,
                    .k_weight = 4.0,
                    .ranges = 1,
                    .progress = 0};
    return o;
}

/* ---- symmetric Jacobi eigen solver --------------------------------------- */

int calib_jacobi_eig(double *a, int n, double *evals, double *evecs) {
    double *v = evecs;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[(size_t)i * n + j] = i == j;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0, tot = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < n; j++) {
                double x = a[(size_t)i * n + j] * a[(size_t)i * n + j];
                tot += x;
                if (i != j) off += x;
            }
        if (off <= 1e-30 * tot || off == 0) break;
        for (int p = 0; p < n - 1; p++)
            for (int q = p + 1; q < n; q++) {
                double apq = a[(size_t)p * n + q];
                if (fabs(apq) < 1e-300) continue;
                double app = a[(size_t)p * n + p], aqq = a[(size_t)q * n + q];
                double theta = (aqq - app) / (2 * apq);
                double t = (theta >= 0 ? 1.0 : -1.0) / (fabs(theta) + sqrt(theta * theta + 1));
                double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; k++) { /* columns p, q */
                    double akp = a[(size_t)k * n + p], akq = a[(size_t)k * n + q];
                    a[(size_t)k * n + p] = c * akp - s * akq;
                    a[(size_t)k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* rows p, q */
                    double apk = a[(size_t)p * n + k], aqk = a[(size_t)q * n + k];
                    a[(size_t)p * n + k] = c * apk - s * aqk;
                    a[(size_t)q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    double vkp = v[(size_t)k * n + p], vkq = v[(size_t)k * n + q];
                    v[(size_t)k * n + p] = c * vkp - s * vkq;
                    v[(size_t)k * n + q] = s * vkp + c * vkq;
                }
            }
    }
    for (int i = 0; i < n; i++) evals[i] = a[(size_t)i * n + i];
    /* sort descending (selection sort: stable order for equal values) */
    for (int i = 0; i < n; i++) {
        int best = i;
        for (int j = i + 1; j < n; j++)
            if (evals[j] > evals[best]) best = j;
        if (best != i) {
            double t = evals[i];
            evals[i] = evals[best], evals[best] = t;
            for (int k = 0; k < n; k++) {
                double x = v[(size_t)k * n + i];
                v[(size_t)k * n + i] = v[(size_t)k * n + best], v[(size_t)k * n + best] = x;
            }
        }
    }
    /* sign convention: the largest-magnitude entry of each vector is positive */
    for (int j = 0; j < n; j++) {
        int big = 0;
        for (int k = 1; k < n; k++)
            if (fabs(v[(size_t)k * n + j]) > fabs(v[(size_t)big * n + j])) big = k;
        if (v[(size_t)big * n + j] < 0)
            for (int k = 0; k < n; k++) v[(size_t)k * n + j] = -v[(size_t)k * n + j];
    }
    return 0;
}

/* ---- statistics ------------------------------------------------------------- */

typedef struct cal_stats {
    codec_shape s;
    int kind, n_head, d, hd, nkv;
    int collect_kv;   /* 1: moments of K/V rows (fit); 0: only q (error eval) */
    int rope_avg;     /* 1: key weights averaged over relative RoPE rotations */
    int n_ctx;        /* window: the range of relative positions */
    double *sx;       /* [L][2][d] */
    double *sxx;      /* [L][2][d][d] (upper triangle filled) */
    double *sqq;      /* [L][nkv][hd][hd] */
    int64_t *cnt;     /* [L] rows seen */
    float *row;       /* [d] scratch */
} cal_stats;

static void cal_stats_free(cal_stats *st) {
    free(st->sx), free(st->sxx), free(st->sqq), free(st->cnt), free(st->row);
}

static int cal_stats_init(cal_stats *st, const model_hparams *hp, const codec_shape *s, int kind,
                          int collect_kv) {
    memset(st, 0, sizeof *st);
    st->s = *s, st->kind = kind, st->n_head = hp->n_head, st->hd = hp->head_dim, st->nkv = hp->n_kv_heads;
    st->d = st->nkv * st->hd, st->collect_kv = collect_kv;
    const size_t L = (size_t)hp->n_layer, d = (size_t)st->d, hd = (size_t)st->hd;
    st->sx = calloc(L * 2 * d, sizeof(double));
    st->sxx = collect_kv ? calloc(L * 2 * d * d, sizeof(double)) : malloc(1);
    st->sqq = calloc(L * st->nkv * hd * hd, sizeof(double));
    st->cnt = calloc(L, sizeof(int64_t));
    st->row = malloc(d * sizeof(float));
    if (!st->sx || !st->sxx || !st->sqq || !st->cnt || !st->row) {
        cal_stats_free(st);
        return KP_ENOMEM;
    }
    return 0;
}

static void cal_add_row(double *sx, double *sxx, const float *x, int d) {
    for (int i = 0; i < d; i++) {
        sx[i] += x[i];
        double xi = x[i];
        double *r = sxx + (size_t)i * d;
        for (int j = i; j < d; j++) r[j] += xi * x[j];
    }
}

static void cal_probe(void *ud, int layer, const float *q, const float *k, const float *v,
                      const int32_t *pos, const int *seq, int n) {
    (void)seq;
    cal_stats *st = ud;
    const int d = st->d, hd = st->hd, nkv = st->nkv, per = st->n_head / st->nkv;
    for (int t = 0; t < n; t++) {
        const float *qt = q + (size_t)t * st->n_head * hd;
        for (int h = 0; h < st->n_head; h++) {
            const float *qh = qt + (size_t)h * hd;
            double *m = st->sqq + ((size_t)layer * nkv + h / per) * hd * hd;
            for (int i = 0; i < hd; i++)
                for (int j = i; j < hd; j++) m[(size_t)i * hd + j] += (double)qh[i] * qh[j];
        }
        if (!st->collect_kv) continue;
        memcpy(st->row, k + (size_t)t * d, (size_t)d * sizeof(float));
        if (st->kind == CODEC_PCA) codec_rope_row(&st->s, st->row, pos[t], 0);
        cal_add_row(st->sx + ((size_t)layer * 2) * d, st->sxx + ((size_t)layer * 2) * d * d, st->row, d);
        cal_add_row(st->sx + ((size_t)layer * 2 + 1) * d, st->sxx + ((size_t)layer * 2 + 1) * d * d,
                    v + (size_t)t * d, d);
    }
    st->cnt[layer] += n;
}

/* Average a key-importance block over the relative rotations attention
 * applies: a key at position p_k meets a query at p_q = p_k + delta through
 * q^T R(-delta) dk (both pre-RoPE), so the weight of dk is
 *   mean over delta in [0, n_ctx) of R(delta) Q R(delta)^T
 * with R(delta) the RoPE rotation of head_dim dims (identity past n_rot).
 * b [hd][hd] is replaced in place. */
static void cal_rope_average(const codec_shape *s, int n_ctx, double *b) {
    const int hd = s->head_dim, n_rot = KP_MIN(s->n_rot, hd), half = n_rot / 2;
    if (half < 1 || n_ctx < 2) return;
    int *pair = malloc((size_t)hd * sizeof(int)), *partner = malloc((size_t)hd * sizeof(int));
    double *acc = calloc((size_t)hd * hd, sizeof(double)), *cs = malloc((size_t)hd * 2 * sizeof(double));
    double *sg = cs + hd;
    if (!pair || !partner || !acc || !cs) goto out;
    for (int i = 0; i < hd; i++) pair[i] = -1, partner[i] = i;
    for (int p = 0; p < half; p++) {
        int j0 = s->rope_mode == KP_ROPE_NEOX ? p : 2 * p, j1 = s->rope_mode == KP_ROPE_NEOX ? p + half : 2 * p + 1;
        pair[j0] = pair[j1] = p, partner[j0] = j1, partner[j1] = j0;
    }
    const double theta_scale = pow((double)s->rope_base, -2.0 / (double)n_rot);
    for (int delta = 0; delta < n_ctx; delta++) {
        /* R[i][i] = cos, R[i][partner] = -sin for the pair's first dim, +sin for its second */
        for (int i = 0; i < hd; i++) {
            if (pair[i] < 0) {
                cs[i] = 1, sg[i] = 0;
                continue;
            }
            double th = (double)s->rope_freq_scale * delta * pow(theta_scale, pair[i]);
            int first = s->rope_mode == KP_ROPE_NEOX ? i < half : (i % 2) == 0;
            cs[i] = cos(th), sg[i] = first ? -sin(th) : sin(th);
        }
        for (int i = 0; i < hd; i++)
            for (int j = 0; j < hd; j++) {
                const int pi = partner[i], pj = partner[j];
                acc[(size_t)i * hd + j] += cs[i] * (b[(size_t)i * hd + j] * cs[j] + b[(size_t)i * hd + pj] * sg[j]) +
                                           sg[i] * (b[(size_t)pi * hd + j] * cs[j] + b[(size_t)pi * hd + pj] * sg[j]);
            }
    }
    for (int i = 0; i < hd; i++)
        for (int j = 0; j < hd; j++) b[(size_t)i * hd + j] = acc[(size_t)i * hd + j] / n_ctx;
out:
    free(pair), free(partner), free(acc), free(cs);
}

/* Importance matrix of (layer, K/V), block-diagonal [d][d] (zero outside
 * the head blocks), from the query moments (keys) or W_O (values). */
static int cal_importance(model *m, const cal_stats *st, int layer, int is_v, double *M, kp_err *err) {
    const int d = st->d, hd = st->hd, nkv = st->nkv, per = st->n_head / st->nkv;
    memset(M, 0, (size_t)d * d * sizeof(double));
    if (!is_v) {
        double n = (double)KP_MAX(st->cnt[layer], 1);
        double *b = malloc((size_t)hd * hd * sizeof(double));
        if (!b) return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        for (int g = 0; g < nkv; g++) {
            const double *u = st->sqq + ((size_t)layer * nkv + g) * hd * hd; /* upper triangle */
            for (int i = 0; i < hd; i++)
                for (int j = i; j < hd; j++) b[(size_t)i * hd + j] = b[(size_t)j * hd + i] = u[(size_t)i * hd + j] / n;
            if (st->rope_avg) cal_rope_average(&st->s, st->n_ctx, b);
            for (int i = 0; i < hd; i++)
                for (int j = 0; j < hd; j++) M[(size_t)(g * hd + i) * d + g * hd + j] = b[(size_t)i * hd + j];
        }
        free(b);
        return 0;
    }
    const model_hparams *hp = model_hp(m);
    if (hp->n_head * hd != hp->dim)
        return kp_errf(err, KP_EUNSUP, "calibrate: n_head * head_dim (%d) != dim (%d) is not supported",
                       hp->n_head * hd, hp->dim);
    float *wo = model_wo_f32(m, layer);
    if (!wo) return kp_errf(err, KP_ENOMEM, "calibrate: cannot read W_O of layer %d", layer);
    const int dim = hp->dim;
    for (int h = 0; h < st->n_head; h++) {
        const int g = h / per;
        for (int o = 0; o < dim; o++) {
            const float *w = wo + (size_t)o * dim + (size_t)h * hd;
            for (int i = 0; i < hd; i++)
                for (int j = 0; j < hd; j++) M[(size_t)(g * hd + i) * d + g * hd + j] += (double)w[i] * w[j];
        }
    }
    free(wo);
    return 0;
}

/* S = M^{1/2} and Sinv = M^{-1/2} per head block, with a ridge. */
static void cal_sqrt_blocks(const double *M, int d, int hd, double *S, double *Sinv) {
    memset(S, 0, (size_t)d * d * sizeof(double));
    memset(Sinv, 0, (size_t)d * d * sizeof(double));
    double *a = malloc((size_t)hd * hd * sizeof(double)), *ev = malloc((size_t)hd * sizeof(double)),
           *V = malloc((size_t)hd * hd * sizeof(double));
    for (int g = 0; g < d / hd; g++) {
        double tr = 0;
        for (int i = 0; i < hd; i++)
            for (int j = 0; j < hd; j++) a[(size_t)i * hd + j] = M[(size_t)(g * hd + i) * d + g * hd + j];
        for (int i = 0; i < hd; i++) tr += a[(size_t)i * hd + i];
        double ridge = CALIB_RIDGE * (tr > 0 ? tr / hd : 1.0) + 1e-30;
        calib_jacobi_eig(a, hd, ev, V);
        for (int i = 0; i < hd; i++)
            for (int j = 0; j < hd; j++) {
                double s = 0, si = 0;
                for (int k = 0; k < hd; k++) {
                    double lam = fmax(ev[k], 0) + ridge, vv = V[(size_t)i * hd + k] * V[(size_t)j * hd + k];
                    s += vv * sqrt(lam);
                    si += vv / sqrt(lam);
                }
                S[(size_t)(g * hd + i) * d + g * hd + j] = s;
                Sinv[(size_t)(g * hd + i) * d + g * hd + j] = si;
            }
    }
    free(a), free(ev), free(V);
}

/* ---- bit allocation (greedy, a binary heap of candidate steps) ---------- */

typedef struct cal_step {
    double gain_per_bit;
    int idx; /* coder * d + latent */
} cal_step;

static int step_before(const cal_step *a, const cal_step *b) {
    return a->gain_per_bit > b->gain_per_bit || (a->gain_per_bit == b->gain_per_bit && a->idx < b->idx);
}
static void heap_push(cal_step *h, int *n, cal_step s) {
    int i = (*n)++;
    h[i] = s;
    while (i > 0 && step_before(&h[i], &h[(i - 1) / 2])) {
        cal_step t = h[i];
        h[i] = h[(i - 1) / 2], h[(i - 1) / 2] = t;
        i = (i - 1) / 2;
    }
}
static cal_step heap_pop(cal_step *h, int *n) {
    cal_step top = h[0];
    h[0] = h[--(*n)];
    for (int i = 0;;) {
        int l = 2 * i + 1, r = l + 1, b = i;
        if (l < *n && step_before(&h[l], &h[b])) b = l;
        if (r < *n && step_before(&h[r], &h[b])) b = r;
        if (b == i) break;
        cal_step t = h[i];
        h[i] = h[b], h[b] = t;
        i = b;
    }
    return top;
}

/* Relative MSE of the fixed quantiser (ranges 1) of a unit Gaussian with b
 * bits, b = 0..8 (b = 0: the latent is dropped): the optimal uniform
 * quantiser's distortion (J. Max 1960), matching lc_gauss_step. */
static const double cal_gauss_mse[CODECFILE_MAX_BITS + 1] = {
    1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.003490, 0.001035, 0.0003011, 0.0000863,
};

/* Distortion of a latent of normalised variance l with b bits. ranges 0
 * (per-chunk min/max): l 4^-b, a rough high-rate law; ranges 1: the table. */
static double cal_dist(double l, int b, int ranges) {
    if (ranges) return l * cal_gauss_mse[b];
    return b ? l * pow(4.0, -b) : l;
}

/* lam: [n_coders][d] normalised eigenvalues (descending per coder).
 * bits: out [n_coders][d]. side: bits of side info per kept latent per
 * chunk (32 for per-chunk fp16 min and step, 0 for fixed ranges). */
static void cal_allocate(const double *lam, int n_coders, int d, int C, double target, int pca,
                         int ranges, uint8_t *bits) {
    memset(bits, 0, (size_t)n_coders * d);
    const double budget = target * C * (double)d * n_coders, side = ranges ? 0.0 : 32.0;
    double used = 0;
    cal_step *h = malloc((size_t)n_coders * d * sizeof *h);
    int nh = 0;
    /* every coder keeps its first latent (a coder of rank 0 has no file form) */
    for (int c = 0; c < n_coders; c++) {
        bits[(size_t)c * d] = pca ? 8 : 1;
        used += side + (double)C * bits[(size_t)c * d];
    }
    for (int c = 0; c < n_coders; c++)
        for (int j = 0; j < d; j++) {
            int b = bits[(size_t)c * d + j];
            if (pca && b) continue;
            double l = fmax(lam[(size_t)c * d + j], 0);
            double gain = pca ? l : cal_dist(l, b, ranges) - cal_dist(l, b + 1, ranges);
            double cost = pca ? 8.0 * C + side : (b ? C : C + side);
            heap_push(h, &nh, (cal_step){gain / cost, c * d + j});
        }
    while (nh > 0) {
        cal_step s = heap_pop(h, &nh);
        int b = bits[s.idx];
        double cost = pca ? 8.0 * C + side : (b ? C : C + side);
        if (used + cost > budget) continue; /* too big: a cheaper step may still fit */
        used += cost;
        bits[s.idx] = (uint8_t)(pca ? 8 : b + 1);
        if (!pca && b + 1 < CODECFILE_MAX_BITS) {
            double l = fmax(lam[s.idx], 0);
            heap_push(h, &nh, (cal_step){(cal_dist(l, b + 1, ranges) - cal_dist(l, b + 2, ranges)) / C, s.idx});
        }
    }
    free(h);
}

/* ---- running the model ------------------------------------------------------- */

static void cal_progress(int on, const char *what, int64_t done, int64_t total, double t0) {
    if (!on) return;
    double el = kp_now() - t0, eta = done > 0 ? el * (double)(total - done) / (double)done : 0;
    if (isatty(2)) {
        int w = 30, f = total > 0 ? (int)(w * done / total) : w;
        fprintf(stderr, "\r%s [%.*s%*s] %lld/%lld tokens, ETA %.0f s   ", what, f,
                "##############################", w - f, "", (long long)done, (long long)total, eta);
        if (done >= total) fprintf(stderr, "\n");
    } else {
        fprintf(stderr, "%s: %lld/%lld tokens, %.1f s elapsed, ETA %.0f s\n", what, (long long)done,
                (long long)total, el, eta);
    }
}

/* Run the model over tokens[0..n) in windows of n_ctx (fresh cache each),
 * the probe attached; after each window call fn (may be NULL). */
typedef int (*cal_window_fn)(void *ud, kv_cache *kv, int pos0, kp_err *err);
static int cal_run_windows(model *m, const int32_t *tokens, int64_t n, int n_ctx, cal_stats *st,
                           cal_window_fn fn, void *ud, int progress, const char *what, kp_err *err) {
    kv_cache *kv = NULL;
    int rc = model_kv_new(m, &kv, KP_TYPE_F32, n_ctx, err);
    if (rc) return rc;
    model_set_probe(m, cal_probe, st);
    double t0 = kp_now(), last = 0;
    const double every = isatty(2) ? 0.2 : 5.0; /* seconds between progress updates */
    for (int64_t p = 0; p < n && rc == 0; p += n_ctx) {
        int len = (int)KP_MIN((int64_t)n_ctx, n - p);
        kv_truncate(kv, 0);
        model_seq seq = {.kv = kv, .tokens = tokens + p, .n_tokens = len};
        rc = model_forward(m, &seq, 1, err);
        if (rc == 0 && fn) rc = fn(ud, kv, (int)p, err);
        if (p + len >= n || kp_now() - last >= every) {
            cal_progress(progress, what, p + len, n, t0);
            last = kp_now();
        }
    }
    model_set_probe(m, NULL, NULL);
    kv_free(kv);
    return rc;
}

/* ---- weighted error of a codec on text ------------------------------------- */

typedef struct cal_err {
    const codec *c;
    cal_stats *st;
    int chunk;
    double *eerr;  /* [L][2][nkv][hd][hd] sum of dx dx^T */
    double *exx;   /* same, sum of x x^T */
    double *ex;    /* [L][2][d] */
    int64_t rows;  /* per layer */
    float *dec;    /* [chunk][d] */
    uint8_t *buf;
} cal_err;

static int cal_err_window(void *ud, kv_cache *kv, int pos0, kp_err *err) {
    (void)pos0;
    cal_err *e = ud;
    const codec *c = e->c;
    const int d = e->st->d, hd = e->st->hd, nkv = e->st->nkv, L = kv->n_layer;
    const int learned = codec_id_of(c) == CODEC_LEARNED;
    float *xo = malloc((size_t)d * sizeof(float) * 2), *xd = xo + d;
    if (!xo) return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    for (int l = 0; l < L; l++)
        for (int t = 0; t < 2; t++) {
            const float *rows = (const float *)(t ? kv->v[l] : kv->k[l]);
            for (int r0 = 0; r0 < kv->n_pos; r0 += e->chunk) {
                int n = KP_MIN(e->chunk, kv->n_pos - r0);
                codec_chunk ch = {.layer = l, .is_v = t, .pos0 = r0, .n = n, .kv_type = KP_TYPE_F32};
                size_t len;
                int rc = codec_encode(c, &ch, rows + (size_t)r0 * d, e->buf, codec_max_bytes(c, e->chunk), &len, err);
                if (!rc) rc = codec_decode(c, &ch, e->buf, len, e->dec, err);
                if (rc) {
                    free(xo);
                    return rc;
                }
                for (int i = 0; i < n; i++) {
                    memcpy(xo, rows + (size_t)(r0 + i) * d, (size_t)d * sizeof(float));
                    memcpy(xd, e->dec + (size_t)i * d, (size_t)d * sizeof(float));
                    if (!t) { /* key errors are measured before RoPE, where q is */
                        codec_rope_row(&c->shape, xo, r0 + i, 1);
                        codec_rope_row(&c->shape, xd, r0 + i, 1);
                    }
                    (void)learned;
                    double *ex = e->ex + ((size_t)l * 2 + t) * d;
                    for (int k = 0; k < d; k++) ex[k] += xo[k];
                    for (int g = 0; g < nkv; g++) {
                        double *ee = e->eerr + (((size_t)l * 2 + t) * nkv + g) * hd * hd;
                        double *xx = e->exx + (((size_t)l * 2 + t) * nkv + g) * hd * hd;
                        const float *a = xo + g * hd, *b = xd + g * hd;
                        for (int p = 0; p < hd; p++)
                            for (int q = 0; q < hd; q++) {
                                ee[p * hd + q] += (double)(a[p] - b[p]) * (a[q] - b[q]);
                                xx[p * hd + q] += (double)a[p] * a[q];
                            }
                    }
                }
            }
        }
    e->rows += kv->n_pos;
    free(xo);
    return 0;
}

int calib_codec_error(model *m, const codec *c, const int32_t *tokens, size_t n_tokens, int n_ctx,
                      int chunk, double *rel_k, double *rel_v, kp_err *err) {
    const model_hparams *hp = model_hp(m);
    const int L = hp->n_layer, hd = hp->head_dim, nkv = hp->n_kv_heads, d = hd * nkv;
    if (codec_id_of(c) < 0 || chunk < 1 || n_ctx < 1 || n_tokens < 1)
        return kp_errf(err, KP_EINVAL, "calib_codec_error: bad arguments");
    cal_stats st;
    if (cal_stats_init(&st, hp, &c->shape, CODEC_LEARNED, 0))
        return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    st.rope_avg = 1, st.n_ctx = n_ctx;
    cal_err e = {.c = c, .st = &st, .chunk = chunk};
    size_t blk = (size_t)L * 2 * nkv * hd * hd;
    e.eerr = calloc(blk, sizeof(double));
    e.exx = calloc(blk, sizeof(double));
    e.ex = calloc((size_t)L * 2 * d, sizeof(double));
    e.dec = malloc((size_t)chunk * d * sizeof(float));
    e.buf = malloc(codec_max_bytes(c, chunk));
    double *M = malloc((size_t)d * d * sizeof(double));
    int rc = 0;
    if (!e.eerr || !e.exx || !e.ex || !e.dec || !e.buf || !M) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto done;
    }
    rc = cal_run_windows(m, tokens, (int64_t)n_tokens, n_ctx, &st, cal_err_window, &e, 0, "", err);
    if (rc) goto done;
    double num[2] = {0, 0}, den[2] = {0, 0};
    for (int l = 0; l < L; l++)
        for (int t = 0; t < 2; t++) {
            if ((rc = cal_importance(m, &st, l, t, M, err))) goto done;
            const double *ex = e.ex + ((size_t)l * 2 + t) * d;
            for (int g = 0; g < nkv; g++) {
                const double *ee = e.eerr + (((size_t)l * 2 + t) * nkv + g) * hd * hd;
                const double *xx = e.exx + (((size_t)l * 2 + t) * nkv + g) * hd * hd;
                for (int p = 0; p < hd; p++)
                    for (int q = 0; q < hd; q++) {
                        double w = M[(size_t)(g * hd + p) * d + g * hd + q];
                        double cx = xx[p * hd + q] - ex[g * hd + p] * ex[g * hd + q] / (double)e.rows;
                        num[t] += w * ee[p * hd + q];
                        den[t] += w * cx;
                    }
            }
        }
    if (rel_k) *rel_k = den[0] > 0 ? num[0] / den[0] : 0;
    if (rel_v) *rel_v = den[1] > 0 ? num[1] / den[1] : 0;
done:
    free(e.eerr), free(e.exx), free(e.ex), free(e.dec), free(e.buf), free(M);
    cal_stats_free(&st);
    return rc;
}

/* ---- the fit -------------------------------------------------------------------- */

int calib_run(model *m, const int32_t *tokens, size_t n_tokens, const calib_opts *o,
              const char *out_path, calib_report *rep, kp_err *err) {
    const double t0 = kp_now();
    const model_hparams *hp = model_hp(m);
    calib_opts def = calib_default_opts();
    if (!o) o = &def;
    if (o->kind != CODEC_LEARNED && o->kind != CODEC_PCA)
        return kp_errf(err, KP_EINVAL, "calibrate: kind must be learned or pca");
    if (o->n_ctx < 1 || o->chunk < 1 || o->chunk > 65535 || !(o->bits > 0 && o->bits <= 16) || o->sink < 0 ||
        o->window < 0 || !(o->k_weight > 0 && o->k_weight < 1e6))
        return kp_errf(err, KP_EINVAL, "calibrate: bad options (n_ctx %d, chunk %d, bits %g)", o->n_ctx,
                       o->chunk, o->bits);
    const int L = hp->n_layer, hd = hp->head_dim, nkv = hp->n_kv_heads, d = hd * nkv;
    if (d > 4096) return kp_errf(err, KP_EUNSUP, "calibrate: KV rows of %d values are too wide", d);
    if (hp->n_head % nkv) return kp_errf(err, KP_EUNSUP, "calibrate: n_head %% n_kv_heads != 0");
    int64_t n = (int64_t)KP_MIN((int64_t)n_tokens, o->max_tokens > 0 ? o->max_tokens : INT64_MAX);
    int n_ctx = KP_MIN(o->n_ctx, hp->n_ctx_train > 0 ? hp->n_ctx_train : o->n_ctx);
    /* held-out: the last 10% of whole windows (none if fewer than 2 windows) */
    int64_t n_win = (n + n_ctx - 1) / n_ctx, n_val_win = n_win >= 2 ? KP_MAX((int64_t)1, n_win / 10) : 0;
    int64_t n_fit = n_val_win ? (n_win - n_val_win) * n_ctx : n;
    if (n_fit < 2 * (int64_t)d)
        return kp_errf(err, KP_EINVAL, "calibrate: %lld calibration tokens are too few for KV rows of %d "
                       "values; give more text", (long long)n_fit, d);
    codec_shape shape = {.n_layer = L, .n_kv_heads = nkv, .head_dim = hd, .n_rot = hp->n_rot,
                         .rope_mode = hp->rope_mode, .rope_base = hp->rope_base,
                         .rope_freq_scale = hp->rope_freq_scale, .model_fingerprint = model_fingerprint(m)};
    cal_stats st;
    if (cal_stats_init(&st, hp, &shape, o->kind, 1)) return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    st.rope_avg = 1, st.n_ctx = n_ctx;
    const int NC = 2 * L;
    double *M = malloc((size_t)d * d * sizeof(double)), *S = malloc((size_t)d * d * sizeof(double)),
           *Si = malloc((size_t)d * d * sizeof(double)), *C = malloc((size_t)d * d * sizeof(double)),
           *T = malloc((size_t)d * d * sizeof(double)), *ev = malloc((size_t)d * sizeof(double));
    double *lam = malloc((size_t)NC * d * sizeof(double)), *evr = malloc((size_t)NC * d * sizeof(double));
    const int ranges = o->kind == CODEC_LEARNED && o->ranges;
    double *U = malloc((size_t)NC * d * d * sizeof(double));   /* [coder][d][d] eigenvectors (columns) */
    double *Sall = malloc((size_t)NC * d * d * sizeof(double)), *Siall = malloc((size_t)NC * d * d * sizeof(double));
    uint8_t *bits = malloc((size_t)NC * d);
    int *ranks = malloc((size_t)NC * sizeof(int));
    codec *c = NULL;
    int rc = 0;
    if (!M || !S || !Si || !C || !T || !ev || !lam || !evr || !U || !Sall || !Siall || !bits || !ranks) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto done;
    }
    rc = cal_run_windows(m, tokens, n_fit, n_ctx, &st, NULL, NULL, o->progress, "calibrate", err);
    if (rc) goto done;

    for (int l = 0; l < L; l++)
        for (int t = 0; t < 2; t++) {
            const int ci = 2 * l + t;
            const double N = (double)st.cnt[l];
            const double *sx = st.sx + (size_t)ci * d, *sxx = st.sxx + (size_t)ci * d * d;
            for (int i = 0; i < d; i++)
                for (int j = i; j < d; j++)
                    C[(size_t)i * d + j] = C[(size_t)j * d + i] = sxx[(size_t)i * d + j] / N - sx[i] / N * sx[j] / N;
            double *Sc = Sall + (size_t)ci * d * d, *Sic = Siall + (size_t)ci * d * d;
            if (o->kind == CODEC_PCA) {
                for (int i = 0; i < d; i++)
                    for (int j = 0; j < d; j++) Sc[(size_t)i * d + j] = Sic[(size_t)i * d + j] = i == j;
            } else {
                if ((rc = cal_importance(m, &st, l, t, M, err))) goto done;
                cal_sqrt_blocks(M, d, hd, Sc, Sic);
            }
            /* C' = S C S */
            for (int i = 0; i < d; i++)
                for (int j = 0; j < d; j++) {
                    double s = 0;
                    for (int k = 0; k < d; k++) s += Sc[(size_t)i * d + k] * C[(size_t)k * d + j];
                    T[(size_t)i * d + j] = s;
                }
            for (int i = 0; i < d; i++)
                for (int j = 0; j < d; j++) {
                    double s = 0;
                    for (int k = 0; k < d; k++) s += T[(size_t)i * d + k] * Sc[(size_t)k * d + j];
                    C[(size_t)i * d + j] = s;
                }
            for (int i = 0; i < d; i++) /* exact symmetry for Jacobi */
                for (int j = i + 1; j < d; j++)
                    C[(size_t)i * d + j] = C[(size_t)j * d + i] = 0.5 * (C[(size_t)i * d + j] + C[(size_t)j * d + i]);
            calib_jacobi_eig(C, d, ev, U + (size_t)ci * d * d);
            double tot = 0;
            for (int j = 0; j < d; j++) tot += fmax(ev[j], 0);
            for (int j = 0; j < d; j++) lam[(size_t)ci * d + j] = tot > 0 ? fmax(ev[j], 0) / tot : 0;
            for (int j = 0; j < d; j++) evr[(size_t)ci * d + j] = fmax(ev[j], 1e-12 * tot) + 1e-300;
        }

    if (o->kind == CODEC_LEARNED) /* keys' relative error costs k_weight times the values' */
        for (int ci = 0; ci < NC; ci += 2)
            for (int j = 0; j < d; j++) lam[(size_t)ci * d + j] *= o->k_weight;
    cal_allocate(lam, NC, d, o->chunk, o->bits, o->kind == CODEC_PCA, ranges, bits);
    for (int ci = 0; ci < NC; ci++) {
        ranks[ci] = 0;
        for (int j = 0; j < d; j++) ranks[ci] += bits[(size_t)ci * d + j] > 0;
    }
    if ((rc = codec_learned_alloc(&c, &shape, o->kind, ranks, err))) goto done;
    codec_learned *cl = (codec_learned *)c;
    cl->chunk = o->chunk, cl->sink = o->sink, cl->window = o->window;
    cl->ranges = ranges;
    cl->target_bits = (float)o->bits;
    for (int ci = 0; ci < NC; ci++) {
        lc_coder *cd = &cl->coders[ci];
        const double *Uc = U + (size_t)ci * d * d, *Sc = Sall + (size_t)ci * d * d, *Sic = Siall + (size_t)ci * d * d;
        for (int k = 0; k < d; k++) cd->mean[k] = (float)(st.sx[(size_t)ci * d + k] / (double)st.cnt[ci / 2]);
        int r = 0;
        for (int j = 0; j < d; j++) {
            if (!bits[(size_t)ci * d + j]) continue;
            cd->bits[r] = bits[(size_t)ci * d + j];
            /* ranges 1: scale latent j to unit variance on the calibration
             * rows (its variance is the eigenvalue), so the fixed quantiser
             * of lc_fixed_range fits it */
            const double sd = ranges ? sqrt(evr[(size_t)ci * d + j]) : 1.0;
            for (int k = 0; k < d; k++) { /* E row r = u_j^T S / sd ; D column r = S^-1 u_j sd */
                double e = 0, dd = 0;
                for (int p = 0; p < d; p++) {
                    e += Uc[(size_t)p * d + j] * Sc[(size_t)p * d + k];
                    dd += Sic[(size_t)k * d + p] * Uc[(size_t)p * d + j];
                }
                cd->enc[(size_t)r * d + k] = (float)(e / sd);
                cd->dec[(size_t)k * cd->r + r] = (float)(dd * sd);
            }
            r++;
        }
    }
    if ((rc = codec_learned_finish(c, err))) goto done;
    cl->achieved_bits = (float)codec_learned_bits_per_value(c, o->chunk);

    calib_report r = {.tokens_used = n_fit, .bits_per_value = cl->achieved_bits};
    if (n_val_win) {
        if ((rc = calib_codec_error(m, c, tokens + n_fit, (size_t)(n - n_fit), n_ctx, o->chunk, &r.rel_err_k,
                                    &r.rel_err_v, err)))
            goto done;
    }
    if (out_path && (rc = codecfile_write(c, out_path, err))) goto done;
    r.seconds = kp_now() - t0;
    if (rep) *rep = r;
done:
    codec_free(c);
    free(M), free(S), free(Si), free(C), free(T), free(ev), free(lam), free(evr), free(U), free(Sall), free(Siall);
    free(bits), free(ranks);
    cal_stats_free(&st);
    return rc;
}

/* ---- kvpark calibrate ---------------------------------------------------------- */

static void calib_usage(void) {
    fprintf(stderr,
            "usage: kvpark calibrate -m MODEL -f TEXT -o CODEC [--bits B | --ratio R] [--chunk C]\n"
            "                        [--sink S] [--window W] [--kind learned|pca] [-c CTX]\n"
            "                        [--max-tokens N] [-t THREADS] [--k-weight W] [--ranges fixed|chunk]\n"
            "  fits the KV codec of MODEL on TEXT and writes the codec file CODEC\n"
            "  (use it with: kvpark ppl --codec CODEC, or codec = CODEC in the server config)\n");
}

int calib_main(int argc, char **argv) {
    calib_opts o = calib_default_opts();
    const char *mpath = NULL, *text = NULL, *outp = NULL;
    int threads = 0;
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
        if (!strcmp(a, "-h") || !strcmp(a, "--help")) {
            calib_usage();
            return 0;
        } else if (!strcmp(a, "-m") || !strcmp(a, "--model")) { NEEDV; mpath = v; }
        else if (!strcmp(a, "-f") || !strcmp(a, "--file")) { NEEDV; text = v; }
        else if (!strcmp(a, "-o") || !strcmp(a, "--output")) { NEEDV; outp = v; }
        else if (!strcmp(a, "--bits")) { NEEDV; o.bits = atof(v); }
        else if (!strcmp(a, "--ratio")) { NEEDV; o.bits = atof(v) > 0 ? 16.0 / atof(v) : -1; }
        else if (!strcmp(a, "--chunk")) { NEEDV; o.chunk = atoi(v); }
        else if (!strcmp(a, "--k-weight")) { NEEDV; o.k_weight = atof(v); }
        else if (!strcmp(a, "--ranges")) {
            NEEDV;
            if (!strcmp(v, "fixed")) o.ranges = 1;
            else if (!strcmp(v, "chunk")) o.ranges = 0;
            else {
                fprintf(stderr, "kvpark calibrate: --ranges must be fixed or chunk, not '%s'\n", v);
                return 2;
            }
        }
        else if (!strcmp(a, "--sink")) { NEEDV; o.sink = atoi(v); }
        else if (!strcmp(a, "--window")) { NEEDV; o.window = atoi(v); }
        else if (!strcmp(a, "-c") || !strcmp(a, "--ctx")) { NEEDV; o.n_ctx = atoi(v); }
        else if (!strcmp(a, "--max-tokens")) { NEEDV; o.max_tokens = atoll(v); }
        else if (!strcmp(a, "-t") || !strcmp(a, "--threads")) { NEEDV; threads = atoi(v); }
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
    if (!(o.bits > 0 && o.bits <= 16)) {
        fprintf(stderr, "kvpark calibrate: --bits must be in (0, 16] (--ratio R means bits = 16/R)\n");
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
    printf("tokens = %lld\nbits = %.4f\nratio = %.3f\nrel_err_k = %.6f\nrel_err_v = %.6f\nseconds = %.2f\n"
           "wrote %s\n",
           (long long)rep.tokens_used, rep.bits_per_value, 16.0 / rep.bits_per_value, rep.rel_err_k,
           rep.rel_err_v, rep.seconds, outp);
    return 0;
}
