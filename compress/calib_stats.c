/*
 * calib_stats.c — the measuring half of the calibration (compress/calib.h):
 * the symmetric Jacobi eigen solver (calib_jacobi_eig), the statistics of the
 * K/V rows the model produces on calibration text (means, weighted
 * covariances, the attention each kept row receives: cal_stats_*,
 * cal_attn_window, cal_importance), the greedy bit allocation
 * (cal_allocate, calib_allocate_bits), running the model window by window
 * (cal_run_windows) and the weighted error of a codec on text
 * (calib_codec_error). The fit that uses all this, and calib_run, are in
 * compress/calib.c, whose top comment explains the method step by step;
 * what the two files share is compress/calib_impl.h.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "compress/calib_impl.h"
#include "compress/layout.h"
#include "compress/quality.h"

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


void cal_stats_free(cal_stats *st) {
    free(st->sx), free(st->sxx), free(st->sqq), free(st->cnt), free(st->row);
    free(st->rows), free(st->rows_n);
    free(st->wq), free(st->wk), free(st->wv), free(st->wn), free(st->rowpos), free(st->win_first), free(st->roww);
}

/* Buffers for attention-weighted rows (after cal_stats_init with rows). */
int cal_stats_attn(cal_stats *st, int n_layer, int n_ctx, int window) {
    const size_t L = (size_t)n_layer, n = (size_t)n_ctx, d = (size_t)st->d;
    st->attn = 1, st->attn_window = window, st->n_ctx_buf = n_ctx;
    st->wq = malloc(L * n * st->n_head * st->hd * sizeof(float));
    st->wk = malloc(L * n * d * sizeof(float));
    st->wv = malloc(L * n * d * sizeof(float));
    st->wn = calloc(L, sizeof(int));
    st->rowpos = malloc(L * (size_t)st->rows_cap * sizeof(int));
    st->win_first = calloc(L, sizeof(int64_t));
    st->roww = calloc(L * 2 * (size_t)st->rows_cap, sizeof(float));
    return st->wq && st->wk && st->wv && st->wn && st->rowpos && st->win_first && st->roww ? 0 : KP_ENOMEM;
}

/* rows_cap > 0: also keep a row sample (every rows_stride-th row). */
int cal_stats_init(cal_stats *st, const model_hparams *hp, const codec_shape *s, int kind,
                          int collect_kv, int64_t rows_cap, int64_t rows_stride) {
    memset(st, 0, sizeof *st);
    st->s = *s, st->kind = kind, st->n_head = hp->n_head, st->hd = hp->head_dim, st->nkv = hp->n_kv_heads;
    st->d = st->nkv * st->hd, st->collect_kv = collect_kv;
    const size_t L = (size_t)hp->n_layer, d = (size_t)st->d, hd = (size_t)st->hd;
    st->sx = calloc(L * 2 * d, sizeof(double));
    st->sxx = collect_kv ? calloc(L * 2 * d * d, sizeof(double)) : malloc(1);
    st->sqq = calloc(L * st->nkv * hd * hd, sizeof(double));
    st->cnt = calloc(L, sizeof(int64_t));
    st->row = malloc(d * sizeof(float));
    int bad = !st->sx || !st->sxx || !st->sqq || !st->cnt || !st->row;
    if (!bad && rows_cap > 0) {
        st->rows_cap = rows_cap, st->rows_stride = KP_MAX(rows_stride, (int64_t)1);
        st->rows = malloc(L * 2 * (size_t)rows_cap * d * sizeof(float));
        st->rows_n = calloc(L, sizeof(int64_t));
        bad = !st->rows || !st->rows_n;
    }
    if (bad) {
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

/* Row i of the sample of (layer, K/V): [d] floats. */
float *cal_row(const cal_stats *st, int layer, int is_v, int64_t i) {
    return st->rows + (((size_t)layer * 2 + is_v) * (size_t)st->rows_cap + (size_t)i) * st->d;
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
        const int keep = st->rows && (st->cnt[layer] + t) % st->rows_stride == 0 &&
                         st->rows_n[layer] < st->rows_cap;
        if (!st->collect_kv && !keep && !st->attn) continue;
        memcpy(st->row, k + (size_t)t * d, (size_t)d * sizeof(float));
        if (st->kind == CODEC_PCA) codec_rope_row(&st->s, st->row, pos[t], 0);
        if (st->attn && pos[t] >= 0 && pos[t] < st->n_ctx_buf) {
            const size_t b = (size_t)layer * st->n_ctx_buf + (size_t)pos[t];
            float *qb = st->wq + b * st->n_head * hd, *kb = st->wk + b * d;
            codec_shape qs = st->s;
            qs.n_kv_heads = st->n_head;
            memcpy(qb, qt, (size_t)st->n_head * hd * sizeof(float));
            codec_rope_row(&qs, qb, pos[t], 0);
            memcpy(kb, k + (size_t)t * d, (size_t)d * sizeof(float));
            codec_rope_row(&st->s, kb, pos[t], 0);
            memcpy(st->wv + b * d, v + (size_t)t * d, (size_t)d * sizeof(float));
            st->wn[layer] = KP_MAX(st->wn[layer], pos[t] + 1);
        }
        if (keep) {
            memcpy(cal_row(st, layer, 0, st->rows_n[layer]), st->row, (size_t)d * sizeof(float));
            memcpy(cal_row(st, layer, 1, st->rows_n[layer]), v + (size_t)t * d, (size_t)d * sizeof(float));
            if (st->attn) st->rowpos[(size_t)layer * st->rows_cap + st->rows_n[layer]] = pos[t];
            st->rows_n[layer]++;
        }
        if (!st->collect_kv) continue;
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
int cal_importance(model *m, const cal_stats *st, int layer, int is_v, double *M, kp_err *err) {
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
void cal_sqrt_blocks(const double *M, int d, int hd, double *S, double *Sinv) {
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
 * quantiser's distortion (J. Max 1960), matching lc_gauss_step. The fit
 * replaces it by distortions measured on the calibration latents
 * (cal_curve) when it refines. */
const double cal_gauss_mse[CODECFILE_MAX_BITS + 1] = {
    1.0, 0.3634, 0.1188, 0.03744, 0.01154, 0.003490, 0.001035, 0.0003011, 0.0000863,
};

/* Weighted distortion of latent j of coder c with b bits (0..8), in units
 * the allocator compares across coders. */

/* Greedy reverse water-filling over all coders at once: steps b -> b+1 of
 * one latent (pca: 0 -> 8, int8 latents) are taken by the largest
 * distortion drop per bit while the average stays within `target` bits per
 * value over chunks of C rows. side: bits of side info per kept latent per
 * chunk (ranges 0: 32, fp16 min and step). Every coder keeps its first latent
 * (a coder of rank 0 has no file form). bits: out [n_coders][d]. */
void cal_allocate(int n_coders, int d, int C, double target, int pca, int ranges,
                         cal_dist_fn dist, void *ud, uint8_t *bits) {
    memset(bits, 0, (size_t)n_coders * d);
    const double budget = target * C * (double)d * n_coders, side = ranges ? 0.0 : 32.0;
    double used = 0;
    cal_step *h = malloc((size_t)n_coders * d * sizeof *h);
    if (!h) { /* out of memory: the minimum (still a valid codec) */
        for (int c = 0; c < n_coders; c++) bits[(size_t)c * d] = pca ? 8 : 1;
        return;
    }
    int nh = 0;
    for (int c = 0; c < n_coders; c++) {
        bits[(size_t)c * d] = pca ? 8 : 1;
        used += side + (double)C * bits[(size_t)c * d];
    }
    for (int c = 0; c < n_coders; c++)
        for (int j = 0; j < d; j++) {
            int b = bits[(size_t)c * d + j];
            if (pca && b) continue;
            double gain = pca ? dist(ud, c, j, 0) - dist(ud, c, j, 8) : dist(ud, c, j, b) - dist(ud, c, j, b + 1);
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
            const int c = s.idx / d, j = s.idx % d;
            heap_push(h, &nh, (cal_step){(dist(ud, c, j, b + 1) - dist(ud, c, j, b + 2)) / C, s.idx});
        }
    }
    free(h);
}

typedef struct cal_gauss_ud {
    const double *lam, *sens;
    int d;
} cal_gauss_ud;

static double cal_gauss_dist(void *ud, int c, int j, int b) {
    const cal_gauss_ud *g = ud;
    return (g->sens ? g->sens[c] : 1.0) * fmax(g->lam[(size_t)c * g->d + j], 0) * cal_gauss_mse[b];
}

void calib_allocate_bits(const double *lam, const double *sens, int n_coders, int d, int chunk,
                         double target, uint8_t *bits) {
    cal_gauss_ud g = {lam, sens, d};
    cal_allocate(n_coders, d, chunk, target, 0, 1, cal_gauss_dist, &g, bits);
}

/* ---- running the model ------------------------------------------------------- */

static void cal_progress(const calib_opts *co, const char *what, int64_t done, int64_t total, double t0) {
    double el = kp_now() - t0, eta = done > 0 ? el * (double)(total - done) / (double)done : -1;
    if (co->on_progress) co->on_progress(co->progress_ud, what, done, total, eta);
    if (!co->progress) return;
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
int cal_run_windows(model *m, const int32_t *tokens, int64_t n, int n_ctx, cal_stats *st,
                    cal_window_fn fn, void *ud, const calib_opts *co, int show, const char *what, kp_err *err) {
    kv_cache *kv = NULL;
    int rc = model_kv_new(m, &kv, KP_TYPE_F32, n_ctx, err);
    if (rc) return rc;
    model_set_probe(m, cal_probe, st);
    double t0 = kp_now(), last = 0;
    const double every = isatty(2) ? 0.2 : 5.0; /* seconds between progress updates */
    for (int64_t p = 0; p < n && rc == 0; p += n_ctx) {
        if (co && co->cancel && atomic_load(co->cancel)) {
            rc = kp_errf(err, KP_ECANCELED, "calibrate: canceled");
            break;
        }
        int len = (int)KP_MIN((int64_t)n_ctx, n - p);
        kv_truncate(kv, 0);
        model_seq seq = {.kv = kv, .tokens = tokens + p, .n_tokens = len};
        rc = model_forward(m, &seq, 1, err);
        if (rc == 0 && fn) rc = fn(ud, kv, (int)p, err);
        if (co && show && (p + len >= n || kp_now() - last >= every)) {
            cal_progress(co, what, p + len, n, t0);
            last = kp_now();
        }
    }
    model_set_probe(m, NULL, NULL);
    kv_free(kv);
    return rc;
}

/* Attention weights of the rows kept from the window just run: what an
 * error in row i costs the attention outputs of the queries j that meet it
 * coded, i.e. at distance j - i >= window (closer ones see it lossless),
 * to first order and for independent errors:
 *   values  w_i = mean over those (j, head h) of p_hji^2
 *   keys    w_i = mean over them of p_hji^2 ||v_i - o_hj||^2
 * (o_hj the head's attention output: a logit error moves o along v_i - o),
 * p the causal softmax of q.k / sqrt(head_dim) after RoPE. Every
 * CAL_ATTN_QSTEP-th query is used (the weights are averages). */
#define CAL_ATTN_QSTEP 2
int cal_attn_window(void *ud, kv_cache *kv, int pos0, kp_err *err) {
    (void)kv, (void)pos0;
    cal_stats *st = ud;
    const int hd = st->hd, nh = st->n_head, per = nh / st->nkv, d = st->d, W = st->attn_window;
    const float scale = 1.0f / sqrtf((float)hd);
    const int L = st->s.n_layer;
    for (int l = 0; l < L; l++) {
        const int n = st->wn[l];
        const int64_t i0 = st->win_first[l], i1 = st->rows_n[l];
        st->win_first[l] = i1, st->wn[l] = 0;
        if (i1 <= i0 || n < 1) continue;
        int *kidx = malloc((size_t)n * sizeof(int));
        float *p = malloc((size_t)(n + hd + 2 * (size_t)n * d) * sizeof(float)), *o = p + n, *kt = o + hd,
              *vt = kt + (size_t)n * d;
        double *cnt = calloc((size_t)(i1 - i0), sizeof(double));
        if (!kidx || !p || !cnt) {
            free(kidx), free(p), free(cnt);
            return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        }
        for (int i = 0; i < n; i++) kidx[i] = -1;
        for (int64_t r = i0; r < i1; r++) {
            const int ps = st->rowpos[(size_t)l * st->rows_cap + r];
            if (ps >= 0 && ps < n) kidx[ps] = (int)(r - i0);
        }
        const float *Q = st->wq + (size_t)l * st->n_ctx_buf * nh * hd, *K = st->wk + (size_t)l * st->n_ctx_buf * d,
                    *V = st->wv + (size_t)l * st->n_ctx_buf * d;
        float *wk = st->roww + ((size_t)l * 2) * st->rows_cap, *wv = st->roww + ((size_t)l * 2 + 1) * st->rows_cap;
        /* K and V transposed, [d][n]: the loops over keys below run on
         * contiguous floats (vectorised) */
        for (int i = 0; i < n; i++)
            for (int c = 0; c < d; c++) kt[(size_t)c * n + i] = K[(size_t)i * d + c], vt[(size_t)c * n + i] = V[(size_t)i * d + c];
        for (int h = 0; h < nh; h++) {
            const int g = h / per;
            for (int j = W; j < n; j += CAL_ATTN_QSTEP) {
                const float *qj = Q + ((size_t)j * nh + h) * hd;
                const int m = j + 1;
                for (int i = 0; i < m; i++) p[i] = 0;
                for (int t = 0; t < hd; t++) { /* scores */
                    const float qt = qj[t] * scale, *kc = kt + (size_t)(g * hd + t) * n;
                    for (int i = 0; i < m; i++) p[i] += qt * kc[i];
                }
                float mx = -INFINITY, sum = 0;
                for (int i = 0; i < m; i++) mx = p[i] > mx ? p[i] : mx;
                for (int i = 0; i < m; i++) p[i] = expf(p[i] - mx), sum += p[i];
                const float inv = 1.0f / sum;
                for (int i = 0; i < m; i++) p[i] *= inv;
                for (int t = 0; t < hd; t++) { /* the head's output */
                    const float *vc = vt + (size_t)(g * hd + t) * n;
                    float acc = 0;
                    for (int i = 0; i < m; i++) acc += p[i] * vc[i];
                    o[t] = acc;
                }
                for (int i = 0; i <= j - W; i++) { /* the kept rows it meets coded */
                    if (kidx[i] < 0) continue;
                    const float *vi = V + (size_t)i * d + g * hd;
                    float e = 0;
                    for (int t = 0; t < hd; t++) e += (vi[t] - o[t]) * (vi[t] - o[t]);
                    const float pp = p[i] * p[i];
                    wv[i0 + kidx[i]] += pp;
                    wk[i0 + kidx[i]] += pp * e;
                    cnt[kidx[i]] += 1;
                }
            }
        }
        for (int64_t r = i0; r < i1; r++)
            if (cnt[r - i0] > 0) wk[r] = (float)(wk[r] / cnt[r - i0]), wv[r] = (float)(wv[r] / cnt[r - i0]);
        free(kidx), free(p), free(cnt);
    }
    return 0;
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
    if (cal_stats_init(&st, hp, &c->shape, CODEC_LEARNED, 0, 0, 0))
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
    rc = cal_run_windows(m, tokens, (int64_t)n_tokens, n_ctx, &st, cal_err_window, &e, NULL, 0, "", err);
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
