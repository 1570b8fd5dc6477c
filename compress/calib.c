/*
 * calib.c — fit the 'learned' (and the baseline 'pca') KV codec of a model
 * on calibration text and write its codec file (calib_run, behind
 * `kvpark calibrate`). The measuring half (statistics of the K/V rows, the
 * eigen solver, bit allocation, running the model, the weighted error) is
 * compress/calib_stats.c; what both share is compress/calib_impl.h.
 *
 * Why each step (DESIGN.md "The KV codec"). The bitstream is fixed
 * (codec_learned.c): per layer and K/V a linear encoder E, decoder D, mean
 * mu and integer bits per latent through a fixed quantiser. What the fit
 * chooses is only what goes into the codec file.
 *   1. Run the model over the text (held-out: the last 10% of whole n_ctx
 *      windows). Collect, per layer, the moments of the KV rows x [d =
 *      n_kv_heads * head_dim]: keys BEFORE RoPE for 'learned' (the rotation
 *      mixes positions into the basis), as stored for 'pca'; the query
 *      second moment per KV head group, because a key error matters through
 *      q . (k - k^): E[(q.dk)^2] = dk^T E[q q^T] dk; and ('learned') a sample
 *      of the rows themselves, fit and held-out, each with an attention
 *      weight (cal_attn_window): what its coding error costs the attention
 *      outputs of the queries that meet it coded. Weighting the rows this
 *      way: KL 0.0140 -> 0.0113 at 1.5 bits/value, window 8 (stories260K,
 *      `kvpark ppl` on the evaluation text; the numbers below are the same
 *      setting unless said).
 *   2. Importance matrices (block-diagonal, one head_dim block per KV head g):
 *        M_k[g] = sum over query heads h of group g of E[q_h q_h^T]  (pre-RoPE q)
 *        M_v[g] = sum over h in g of W_O[:, h cols]^T W_O[:, h cols]
 *      plus a ridge of 1e-3 * (mean eigenvalue of the block). 'pca': M = I.
 *      M_k is averaged over the relative RoPE rotations delta in [0, n_ctx)
 *      (cal_rope_average): a pre-RoPE key error dk meets a pre-RoPE query as
 *      q^T R(-delta) dk, so the raw q covariance over-weights directions the
 *      rotation spreads out. Measured (2 bits/value, sink 0, window 0): KL
 *      0.075 with the raw q covariance, 0.056 averaged.
 *   3. Whitened PCA: S = M^{1/2} (symmetric, by eigen-decomposition),
 *      C' = S Cov_w(x) S = U diag(lambda) U^T (Jacobi; Cov_w the
 *      attention-weighted covariance), encoder E = U_r^T S, decoder
 *      D = S^{-1} U_r: the reconstruction minimises the weighted error
 *      (x - x^)^T M (x - x^) among rank-r linear codes (the "PCA start").
 *   4. Sensitivity, measured (cal_sensitivity): for each layer and K/V the
 *      held-out next-token KL when it alone is coded, per unit of its
 *      relative weighted error. Keys and values do not compress alike: on
 *      stories260K a value's relative error costs ~50x less KL than a key's,
 *      and layers differ ~10x. KL 0.0112 with the k_weight guess, 0.0067
 *      measured (1.5 bits/value, window 32).
 *   5. Bits: greedy reverse water-filling over ALL layers and K/V at once
 *      (cal_allocate): a step b -> b+1 of latent j gains weight x lambda_j
 *      x (curve_j(b) - curve_j(b+1)) for C bits per chunk (C + 32 for a
 *      dim's first bit with per-chunk ranges), lambda_j its share of the
 *      coder's weighted variance, curve_j the distortion of the fixed
 *      quantiser measured on the weighted latents (cal_curve; the Gaussian
 *      table without them). Steps with the largest gain per bit are taken
 *      while the average stays within the target bits per value. 'pca'
 *      steps are 0 -> 8 only (int8 latents).
 *   6. Refinement (cal_fit_coder): the decoder refitted in closed form with
 *      the quantised latents in the loop (cal_unbiased_decoder), then an
 *      encoder step (cal_pinv_encoder) and the decoder again; every
 *      candidate runs on the held-out slice and the one with the lowest KL
 *      is kept (cal_fit_target): refinement never raises the held-out KL.
 *      The held-out weighted error is reported for each, not used to
 *      choose: fits that lower it by shrinking the reconstruction (least
 *      squares decoders, MSE-optimal quantiser ranges) raise the KL.
 *   7. --max-dppl: bisection over the bit budget, each step a whole fit and
 *      a held-out quality run (never the evaluation text).
 *   8. Validate on the held-out slice through the real encode/decode
 *      (calib_codec_error, before and after refinement), write the file.
 * Everything runs in a fixed order (double precision; the model's forward
 * is deterministic): the same inputs give the same file bytes.
 */
#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "compress/calib.h"
#include "compress/calib_impl.h"
#include "compress/codecfile.h"
#include "compress/codec.h"
#include "compress/layout.h"
#include "compress/quality.h"


calib_opts calib_default_opts(void) {
    calib_opts o = {.n_ctx = 256,
                    .max_tokens = 131072,
                    .bits = 2.0,
                    .ratio = 0,
                    .chunk = LAYOUT_DEFAULT_CHUNK,
                    .sink = LAYOUT_DEFAULT_SINK,
                    .window = LAYOUT_DEFAULT_WINDOW,
                    .kind = CODEC_LEARNED,
                    .k_weight = 4.0,
                    .ranges = 1,
                    .progress = 0,
                    .refine = 1,
                    .sens = 1,
                    .max_dppl = 0,
                    .max_kl = 0,
                    .park_every = 64,
                    .attn = 1,
                    .sens_scale = NULL,
                    .log = NULL};
    return o;
}

/* ---- the fit: working form ------------------------------------------------------ */

#define CAL_MAX_ROWS 32768          /* rows per coder kept for refinement and validation */
#define CAL_ROW_FLOATS (1L << 25)   /* floats of kept fit rows over all coders (128 MiB) */
#define CAL_CURVE_ROWS 4096         /* latent samples per coder for the quantiser curves */
#define CAL_NB (CODECFILE_MAX_BITS + 1)
#define CAL_NCAND 3                 /* refinement candidates: PCA start, decoder, encoder step */

static const char *const cal_cand_name[CAL_NCAND] = {"PCA start", "unbiased decoder", "+ encoder step"};

/* The fixed quantiser of codec_learned.c (ranges 1) for b = 1..8 bits, read
 * from a codec object so that it has one definition: the levels of a latent
 * are lo + q st, q = 0..qm. */
typedef struct cal_qtab {
    double lo[CAL_NB], st[CAL_NB], qm[CAL_NB];
} cal_qtab;

static int cal_qtab_init(cal_qtab *t, kp_err *err) {
    codec_shape s = {.n_layer = 1, .n_kv_heads = 1, .head_dim = CODECFILE_MAX_BITS, .rope_base = 10000.0f,
                     .rope_freq_scale = 1.0f};
    int ranks[2] = {CODECFILE_MAX_BITS, CODECFILE_MAX_BITS};
    codec *c = NULL;
    int rc = codec_learned_alloc(&c, &s, CODEC_LEARNED, ranks, err);
    if (rc) return rc;
    codec_learned *cl = (codec_learned *)c;
    cl->ranges = 1;
    for (int i = 0; i < 2; i++)
        for (int j = 0; j < CODECFILE_MAX_BITS; j++) cl->coders[i].bits[j] = (uint8_t)(j + 1);
    memset(t, 0, sizeof *t);
    if (!(rc = codec_learned_finish(c, err)))
        for (int b = 1; b < CAL_NB; b++)
            t->lo[b] = cl->coders[0].qlo[b - 1], t->st[b] = cl->coders[0].qstep[b - 1], t->qm[b] = (1 << b) - 1;
    codec_free(c);
    return rc;
}

/* The quantised value of latent z with b bits (codec_learned.c's rounding, in double). */
static inline double cal_quant(const cal_qtab *t, int b, double z) {
    double v = (z - t->lo[b]) / t->st[b];
    v = v > 0 ? v : 0;
    v = v < t->qm[b] ? v : t->qm[b];
    return t->lo[b] + floor(v + 0.5) * t->st[b];
}

/* A linear coder in double: z = E (x - mu), x^ = mu + D Q(z), Q the fixed
 * quantiser of bits[j] per latent (mu is the coder's calibration mean). */
typedef struct cal_fit {
    int r;
    uint8_t *bits; /* [d] (first r used) */
    double *E;     /* [d][d] (first r rows used: [r][d]) */
    double *D;     /* [d][d] (used as [d][r]) */
} cal_fit;

/* One layer's K or V during the fit. */
typedef struct cal_coder {
    double *mu;     /* [d] mean of the fit rows */
    double *Mb;     /* [nkv][hd][hd] importance blocks of M */
    double *P;      /* [d][d] row j = u_j^T S: principal coordinate y_j = P_j (x - mu) */
    double *Q;      /* [d][d] column j = S^-1 u_j: x - mu = sum_j y_j Q_j */
    double *sd;     /* [d] standard deviation of y_j (floored) */
    double *lam;    /* [d] var(y_j) / sum of all: the share of the weighted variance */
    double *curve;  /* [d][CAL_NB] measured distortion of the unit latent y_j / sd_j through the
                       fixed quantiser with b bits, relative to its variance (< 0: not yet) */
    float *usamp;   /* [ns][d] unit latents y / sd of a sample of the fit rows */
    float *uw;      /* [ns] their row weights */
    int ns;
    const float *xf, *xv; /* kept fit rows [nf][d] and held-out rows [nv][d] */
    float *wf, *wv; /* their row weights (attention, mean 1), NULL: all 1 */
    int64_t nf, nv;
    double den_v;   /* held-out weighted sum of (x - mu)^T M (x - mu) */
    double weight;  /* allocation weight of a unit of relative error */
    double sens_kl, sens_err; /* sensitivity probe: delta KL, held-out rel err */
    int probe_bits; /* sum of the probe's bits */
    uint8_t *pbits; /* [d] bits of each principal dim in the current allocation (0 dropped) */
    cal_fit cand[CAL_NCAND]; /* the refinement candidates (cand[0] the PCA start) */
    int ncand;      /* how many were made (1 without refinement) */
    double err[CAL_NCAND]; /* their held-out weighted rel err (after 2 round trips) */
    cal_fit *fit;   /* the kept one */
} cal_coder;

typedef struct cal_ctx {
    model *m;
    const calib_opts *o;
    codec_shape shape;
    int L, d, hd, nkv, NC, kind, ranges, curves;
    cal_coder *cc;  /* [NC], index 2 * layer + is_v */
    cal_qtab qt;
    const int32_t *val; /* held-out tokens for quality runs (NULL: none) */
    int64_t n_val;
    quality_opts qo;
    double cand_kl[CAL_NCAND]; /* held-out KL of each candidate (the last refined target) */
    int kept;       /* the candidate kept (all coders) */
    double *scratch; /* [5][d] */
} cal_ctx;

static int cal_fit_alloc(cal_fit *f, int d) {
    f->r = 0;
    f->bits = calloc((size_t)d, 1);
    f->E = calloc((size_t)d * d, sizeof(double));
    f->D = calloc((size_t)d * d, sizeof(double));
    return f->bits && f->E && f->D ? 0 : KP_ENOMEM;
}
static void cal_fit_free(cal_fit *f) { free(f->bits), free(f->E), free(f->D); }
static void cal_fit_copy(cal_fit *to, const cal_fit *from, int d) {
    to->r = from->r;
    memcpy(to->bits, from->bits, (size_t)d);
    memcpy(to->E, from->E, (size_t)d * d * sizeof(double));
    memcpy(to->D, from->D, (size_t)d * d * sizeof(double));
}

static inline double cal_w(const float *w, int64_t i) { return w ? (double)w[i] : 1.0; }

/* e^T M e for M block-diagonal ([nkv] blocks of [hd][hd]). */
static double cal_wnorm(const double *Mb, int nkv, int hd, const double *e) {
    double s = 0;
    for (int g = 0; g < nkv; g++) {
        const double *B = Mb + (size_t)g * hd * hd, *eg = e + (size_t)g * hd;
        for (int p = 0; p < hd; p++) {
            double t = 0;
            for (int q = 0; q < hd; q++) t += B[p * hd + q] * eg[q];
            s += eg[p] * t;
        }
    }
    return s;
}

/* x [d] -> codes' values zq [r] -> xo [d] (xo may be x). */
static void cal_roundtrip(const cal_fit *f, const double *mu, int d, const cal_qtab *t, const double *x,
                          double *xo, double *zq) {
    for (int j = 0; j < f->r; j++) {
        const double *e = f->E + (size_t)j * d;
        double z = 0;
        for (int k = 0; k < d; k++) z += e[k] * (x[k] - mu[k]);
        zq[j] = cal_quant(t, f->bits[j], z);
    }
    for (int k = 0; k < d; k++) {
        const double *dk = f->D + (size_t)k * f->r;
        double s = mu[k];
        for (int j = 0; j < f->r; j++) s += dk[j] * zq[j];
        xo[k] = s;
    }
}

/* Held-out relative weighted error of fit f after one round trip (*loss1)
 * and after two (returned): parking re-encodes decoded rows, so a coder
 * whose decoded rows do not re-encode to the same codes drifts; the second
 * trip sees that. */
static double cal_loss(const cal_ctx *x, const cal_coder *cc, const cal_fit *f, double *loss1) {
    const int d = x->d;
    double *xr = x->scratch, *x1 = xr + d, *x2 = x1 + d, *zq = x2 + d, *e = zq + d;
    double s1 = 0, s2 = 0;
    for (int64_t i = 0; i < cc->nv; i++) {
        const float *row = cc->xv + (size_t)i * d;
        for (int k = 0; k < d; k++) xr[k] = row[k];
        cal_roundtrip(f, cc->mu, d, &x->qt, xr, x1, zq);
        cal_roundtrip(f, cc->mu, d, &x->qt, x1, x2, zq);
        const double w = cal_w(cc->wv, i);
        for (int k = 0; k < d; k++) e[k] = xr[k] - x1[k];
        s1 += w * cal_wnorm(cc->Mb, x->nkv, x->hd, e);
        for (int k = 0; k < d; k++) e[k] = xr[k] - x2[k];
        s2 += w * cal_wnorm(cc->Mb, x->nkv, x->hd, e);
    }
    const double den = cc->den_v > 0 ? cc->den_v : 1;
    if (loss1) *loss1 = s1 / den;
    return s2 / den;
}

/* Measured distortion (relative to its variance) of unit latent j of coder
 * c through the fixed quantiser with b bits, on the (attention-weighted)
 * latents of the fit rows, memoised: the allocator's curves. The Gaussian
 * table (cal_gauss_mse) without rows or curves.
 *
 * The quantiser itself stays the fixed 1.3x-Gaussian one: scaling each
 * latent's levels to its own MSE-optimal range (a measured 0.72-0.86x, i.e.
 * undoing the 1.3x) lowers the held-out weighted error by ~20% but raises
 * the KL: stories260K, 1.5 bits/value, window 8: KL 0.0106 -> 0.0153 (the
 * MSE-optimal levels shrink the reconstruction; see cal_unbiased_decoder). */
static double cal_curve(cal_ctx *x, int c, int j, int b) {
    cal_coder *cc = &x->cc[c];
    double *m = &cc->curve[(size_t)j * CAL_NB + b];
    if (*m >= 0) return *m;
    const float *u = cc->usamp + j;
    double m2 = 0, se = 0;
    for (int i = 0; i < cc->ns; i++) {
        const double v = u[(size_t)i * x->d], e = v - cal_quant(&x->qt, b, v);
        m2 += cc->uw[i] * v * v;
        se += cc->uw[i] * e * e;
    }
    if (b == 0 || !x->curves || cc->ns < 16 || !(m2 > 0)) return *m = cal_gauss_mse[b];
    return *m = se / m2;
}

/* The allocator's distortion of the learned codec: weight of the coder x
 * share of its weighted variance x the latent's curve. */
static double cal_learned_dist(void *ud, int c, int j, int b) {
    cal_ctx *x = ud;
    const cal_coder *cc = &x->cc[c];
    const double crv = x->ranges ? cal_curve(x, c, j, b) : (b ? pow(4.0, -b) : 1.0);
    return cc->weight * cc->lam[j] * crv;
}

/* The closed-form start: kept principal dims j (bits[j] > 0) in order,
 * E_j = P_j / sd_j (unit-variance latents: the fixed quantiser's scale),
 * D_j = Q_j sd_j; E D = I. */
static void cal_fit_pca(cal_ctx *x, int c, const uint8_t *bits, cal_fit *f) {
    const cal_coder *cc = &x->cc[c];
    const int d = x->d;
    f->r = 0;
    for (int j = 0; j < d; j++) f->r += bits[j] > 0;
    for (int j = 0, r = 0; j < d; j++) {
        if (!bits[j]) continue;
        const double s = cc->sd[j];
        f->bits[r] = bits[j];
        for (int k = 0; k < d; k++) {
            f->E[(size_t)r * d + k] = cc->P[(size_t)j * d + k] / s;
            f->D[(size_t)k * f->r + r] = cc->Q[(size_t)k * d + j] * s;
        }
        r++;
    }
}

/* Solve A X = B by Gaussian elimination with partial pivoting: A [n][n]
 * (destroyed), B [n][m] (overwritten by X). -1 if A is singular. */
static int cal_lu_solve(double *A, int n, double *B, int m) {
    for (int k = 0; k < n; k++) {
        int p = k;
        for (int i = k + 1; i < n; i++)
            if (fabs(A[(size_t)i * n + k]) > fabs(A[(size_t)p * n + k])) p = i;
        if (!(fabs(A[(size_t)p * n + k]) > 0)) return -1;
        if (p != k) {
            for (int j = 0; j < n; j++) {
                double t = A[(size_t)k * n + j];
                A[(size_t)k * n + j] = A[(size_t)p * n + j], A[(size_t)p * n + j] = t;
            }
            for (int j = 0; j < m; j++) {
                double t = B[(size_t)k * m + j];
                B[(size_t)k * m + j] = B[(size_t)p * m + j], B[(size_t)p * m + j] = t;
            }
        }
        for (int i = k + 1; i < n; i++) {
            const double f = A[(size_t)i * n + k] / A[(size_t)k * n + k];
            if (f == 0) continue;
            for (int j = k; j < n; j++) A[(size_t)i * n + j] -= f * A[(size_t)k * n + j];
            for (int j = 0; j < m; j++) B[(size_t)i * m + j] -= f * B[(size_t)k * m + j];
        }
    }
    for (int i = n - 1; i >= 0; i--)
        for (int j = 0; j < m; j++) {
            double y = B[(size_t)i * m + j];
            for (int k = i + 1; k < n; k++) y -= A[(size_t)i * n + k] * B[(size_t)k * m + j];
            B[(size_t)i * m + j] = y / A[(size_t)i * n + i];
        }
    return 0;
}

/* Decoder refit with the quantiser in the loop, closed form. With the codes
 * zq of the fit rows under f's encoder (z = E (x - mu) before quantising),
 * the decoder whose error is uncorrelated with the latents,
 *   E_w[(x - mu - D zq) z^T] = 0   ->   D = E_w[(x - mu) z^T] E_w[zq z^T]^-1
 * (E_w: attention-weighted means over the fit rows): the reconstruction is
 * unbiased along every latent instead of shrunk towards the mean. Why not
 * least squares (D = E[(x - mu) zq^T] E[zq zq^T]^-1)? It lowers the
 * weighted error more but shrinks: a shrunk key flattens every attention
 * row and a shrunk value scales every output the same way, errors that add
 * up coherently over the attended rows instead of averaging out as the
 * weighted error assumes. Measured (stories260K, 1.5 bits/value, window 8,
 * `kvpark ppl`): KL 0.0106 (PCA start) -> 0.0113 (least squares) -> 0.0089
 * (this). out gets f's encoder and bits. -1 if E[zq z^T] is singular. */
static int cal_unbiased_decoder(cal_ctx *x, const cal_coder *cc, const cal_fit *f, cal_fit *out, double *G,
                                double *H) {
    const int d = x->d, r = f->r;
    double *xr = x->scratch, *zq = xr + d, *zz = zq + d;
    memset(G, 0, (size_t)r * r * sizeof(double));
    memset(H, 0, (size_t)r * d * sizeof(double));
    for (int64_t i = 0; i < cc->nf; i++) {
        const float *row = cc->xf + (size_t)i * d;
        const double w = cal_w(cc->wf, i);
        if (w <= 0) continue;
        for (int k = 0; k < d; k++) xr[k] = row[k] - cc->mu[k];
        for (int j = 0; j < r; j++) {
            const double *e = f->E + (size_t)j * d;
            double z = 0;
            for (int k = 0; k < d; k++) z += e[k] * xr[k];
            zq[j] = cal_quant(&x->qt, f->bits[j], z);
            zz[j] = z;
        }
        /* G = E[z zq^T], H = E[z (x - mu)^T]: G D^T = H */
        for (int a = 0; a < r; a++) {
            const double wz = w * zz[a];
            for (int b = 0; b < r; b++) G[(size_t)a * r + b] += wz * zq[b];
            for (int k = 0; k < d; k++) H[(size_t)a * d + k] += wz * xr[k];
        }
    }
    if (cal_lu_solve(G, r, H, d)) return -1;
    cal_fit_copy(out, f, d);
    for (int k = 0; k < d; k++)
        for (int j = 0; j < r; j++) out->D[(size_t)k * r + j] = H[(size_t)j * d + k];
    return 0;
}

/* Solve A X = B, A [n][n] symmetric positive definite (destroyed: its
 * Cholesky factor), B [n][m] (overwritten by X). -1 if A is not positive
 * definite. */
static int cal_chol_solve(double *A, int n, double *B, int m) {
    for (int j = 0; j < n; j++) {
        double s = A[(size_t)j * n + j];
        for (int k = 0; k < j; k++) s -= A[(size_t)j * n + k] * A[(size_t)j * n + k];
        if (!(s > 0)) return -1;
        const double l = sqrt(s);
        A[(size_t)j * n + j] = l;
        for (int i = j + 1; i < n; i++) {
            double t = A[(size_t)i * n + j];
            for (int k = 0; k < j; k++) t -= A[(size_t)i * n + k] * A[(size_t)j * n + k];
            A[(size_t)i * n + j] = t / l;
        }
    }
    for (int c = 0; c < m; c++) {
        for (int i = 0; i < n; i++) {
            double y = B[(size_t)i * m + c];
            for (int k = 0; k < i; k++) y -= A[(size_t)i * n + k] * B[(size_t)k * m + c];
            B[(size_t)i * m + c] = y / A[(size_t)i * n + i];
        }
        for (int i = n - 1; i >= 0; i--) {
            double y = B[(size_t)i * m + c];
            for (int k = i + 1; k < n; k++) y -= A[(size_t)k * n + i] * B[(size_t)k * m + c];
            B[(size_t)i * m + c] = y / A[(size_t)i * n + i];
        }
    }
    return 0;
}

/* Encoder step for a fixed decoder: E = (D^T M D)^-1 D^T M, the encoder that
 * minimises the weighted error before quantisation; E D = I, so decoded
 * rows re-encode to the same codes (parking stays idempotent). -1 if
 * D^T M D is singular. */
static int cal_pinv_encoder(cal_ctx *x, const cal_coder *cc, cal_fit *f, double *G, double *H) {
    const int d = x->d, r = f->r, hd = x->hd;
    for (int j = 0; j < r; j++) /* H = (M D)^T [r][d] */
        for (int g = 0; g < x->nkv; g++) {
            const double *B = cc->Mb + (size_t)g * hd * hd;
            for (int p = 0; p < hd; p++) {
                double s = 0;
                for (int q = 0; q < hd; q++) s += B[p * hd + q] * f->D[(size_t)(g * hd + q) * r + j];
                H[(size_t)j * d + g * hd + p] = s;
            }
        }
    for (int a = 0; a < r; a++)
        for (int b = 0; b <= a; b++) {
            double s = 0;
            for (int k = 0; k < d; k++) s += f->D[(size_t)k * r + a] * H[(size_t)b * d + k];
            G[(size_t)a * r + b] = G[(size_t)b * r + a] = s;
        }
    if (cal_chol_solve(G, r, H, d)) return -1;
    memcpy(f->E, H, (size_t)r * d * sizeof(double));
    return 0;
}

/* The candidates of coder c for the bits of its principal dims:
 *   0  the PCA start (cal_fit_pca),
 *   1  its unbiased decoder refit (cal_unbiased_decoder),
 *   2  an encoder step on that decoder (cal_pinv_encoder), then the decoder
 *      refit again for the new codes;
 * with refine 0 only the first. Their held-out weighted errors are kept for
 * the report; cal_fit_target picks one candidate for all coders by the
 * held-out KL. A step that fails (singular system) repeats the previous. */
static int cal_fit_coder(cal_ctx *x, int c, const uint8_t *bits, int refine) {
    cal_coder *cc = &x->cc[c];
    const int d = x->d;
    memcpy(cc->pbits, bits, (size_t)d);
    cal_fit_pca(x, c, bits, &cc->cand[0]);
    cc->ncand = 1;
    cc->fit = &cc->cand[0];
    cc->err[0] = cc->nv ? cal_loss(x, cc, &cc->cand[0], NULL) : 0;
    if (!refine) return 0;
    double *G = malloc((size_t)d * d * sizeof(double)), *H = malloc((size_t)d * d * sizeof(double));
    if (!G || !H) {
        free(G), free(H);
        return KP_ENOMEM;
    }
    cal_fit *c0 = &cc->cand[0], *c1 = &cc->cand[1], *c2 = &cc->cand[2];
    const int enough = cc->nf > 2 * (int64_t)c0->r;
    if (!enough || cal_unbiased_decoder(x, cc, c0, c1, G, H)) cal_fit_copy(c1, c0, d);
    cal_fit_copy(c2, c1, d);
    if (enough && !cal_pinv_encoder(x, cc, c2, G, H)) {
        if (cal_unbiased_decoder(x, cc, c2, c2, G, H)) cal_fit_copy(c2, c1, d);
    } else cal_fit_copy(c2, c1, d);
    cc->ncand = CAL_NCAND;
    for (int k = 1; k < CAL_NCAND; k++) cc->err[k] = cc->nv ? cal_loss(x, cc, &cc->cand[k], NULL) : 0;
    free(G), free(H);
    return 0;
}

/* A codec object from one fit per coder (fits[ci] for coder ci). */
static int cal_make_codec(cal_ctx *x, cal_fit *const *fits, double target, codec **out, kp_err *err) {
    const int d = x->d;
    int *ranks = malloc((size_t)x->NC * sizeof(int));
    if (!ranks) return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    for (int ci = 0; ci < x->NC; ci++) ranks[ci] = fits[ci]->r;
    codec *c = NULL;
    int rc = codec_learned_alloc(&c, &x->shape, x->kind, ranks, err);
    free(ranks);
    if (rc) return rc;
    codec_learned *cl = (codec_learned *)c;
    cl->chunk = x->o->chunk, cl->sink = x->o->sink, cl->window = x->o->window;
    cl->ranges = x->ranges;
    cl->target_bits = (float)target;
    for (int ci = 0; ci < x->NC; ci++) {
        lc_coder *cd = &cl->coders[ci];
        const cal_fit *f = fits[ci];
        for (int k = 0; k < d; k++) cd->mean[k] = (float)x->cc[ci].mu[k];
        for (int j = 0; j < f->r; j++) cd->bits[j] = f->bits[j];
        for (size_t k = 0; k < (size_t)f->r * d; k++) cd->enc[k] = (float)f->E[k];
        for (size_t k = 0; k < (size_t)f->r * d; k++) cd->dec[k] = (float)f->D[k];
    }
    if ((rc = codec_learned_finish(c, err))) {
        codec_free(c);
        return rc;
    }
    cl->achieved_bits = (float)codec_learned_bits_per_value(c, x->o->chunk);
    *out = c;
    return 0;
}

/* Held-out quality of codec c: quality_eval on the held-out tokens with the
 * codec's chunk, sink and window (x->qo). */
static int cal_quality(cal_ctx *x, const codec *c, quality_result *r, kp_err *err) {
    return quality_eval(x->m, c, x->val, x->n_val, &x->qo, r, err);
}

/* Allocate bits for `target` bits per value, fit every coder and build the
 * codec. With refine (and held-out quality runs available) every coder gets
 * its refinement candidates and the codec of each candidate level runs on
 * the held-out slice; the one with the lowest KL is kept, so refinement
 * never raises the held-out KL over the PCA start (the weighted error is
 * reported, not used to choose: see cal_unbiased_decoder). q (may be NULL)
 * gets the kept codec's held-out quality, when measured (*measured = 1). */
static int cal_fit_target(cal_ctx *x, double target, int refine, codec **out, quality_result *q, int *measured,
                          kp_err *err) {
    const int d = x->d, NC = x->NC;
    uint8_t *bits = malloc((size_t)NC * d);
    cal_fit **fp = malloc((size_t)NC * sizeof *fp);
    codec *best = NULL;
    int rc = 0;
    if (measured) *measured = 0;
    if (!bits || !fp) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto out;
    }
    refine = refine && x->kind == CODEC_LEARNED && x->ranges && x->val;
    cal_allocate(NC, d, x->o->chunk, target, x->kind == CODEC_PCA, x->ranges, cal_learned_dist, x, bits);
    for (int ci = 0; ci < NC && !rc; ci++)
        if (cal_fit_coder(x, ci, bits + (size_t)ci * d, refine)) rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    if (rc) goto out;
    x->kept = 0;
    for (int k = 0; k < CAL_NCAND; k++) x->cand_kl[k] = -1;
    if (!refine) {
        for (int ci = 0; ci < NC; ci++) fp[ci] = &x->cc[ci].cand[0];
        rc = cal_make_codec(x, fp, target, &best, err);
        goto out;
    }
    quality_result bq = {0};
    for (int k = 0; k < CAL_NCAND; k++) {
        codec *c = NULL;
        quality_result r;
        for (int ci = 0; ci < NC; ci++) fp[ci] = &x->cc[ci].cand[k];
        if ((rc = cal_make_codec(x, fp, target, &c, err))) goto out;
        if ((rc = cal_quality(x, c, &r, err))) {
            codec_free(c);
            goto out;
        }
        x->cand_kl[k] = r.kl;
        if (!best || r.kl < bq.kl) codec_free(best), best = c, bq = r, x->kept = k;
        else codec_free(c);
    }
    for (int ci = 0; ci < NC; ci++) x->cc[ci].fit = &x->cc[ci].cand[x->kept];
    if (q) *q = bq;
    if (measured) *measured = 1;
out:
    if (rc) codec_free(best), best = NULL;
    *out = best;
    free(bits), free(fp);
    return rc;
}

/* Sensitivity of every coder, measured: the held-out next-token KL when
 * that coder alone is coded by its probe fit (the PCA start of the
 * allocation at the probe target with the prior weights) and every other
 * one at 8 bits and full rank (near-lossless), minus the KL of all at 8
 * bits, divided by the probe's held-out relative weighted error. The
 * allocator then weighs a unit of relative error of coder c by its KL cost
 * instead of a guess (k_weight). Measured on stories260K (1.5 bits/value,
 * window 32, `kvpark ppl`): KL 0.0112 with k_weight 4, 0.0067 with these. */
static int cal_sensitivity(cal_ctx *x, double probe_target, kp_err *err) {
    const int d = x->d, NC = x->NC;
    cal_fit *nl = calloc((size_t)NC, sizeof *nl);
    cal_fit **fp = malloc((size_t)NC * sizeof *fp);
    uint8_t *all8 = malloc((size_t)d);
    codec *c = NULL;
    int rc = 0;
    if (!nl || !fp || !all8) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto out;
    }
    memset(all8, CODECFILE_MAX_BITS, (size_t)d);
    for (int ci = 0; ci < NC; ci++) {
        if (cal_fit_alloc(&nl[ci], d)) {
            rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
            goto out;
        }
        cal_fit_pca(x, ci, all8, &nl[ci]);
        fp[ci] = &nl[ci];
    }
    if ((rc = cal_fit_target(x, probe_target, 0, &c, NULL, NULL, err))) goto out; /* the probe fits */
    codec_free(c), c = NULL;
    quality_result q0;
    if ((rc = cal_make_codec(x, fp, CODECFILE_MAX_BITS, &c, err))) goto out;
    if ((rc = cal_quality(x, c, &q0, err))) goto out;
    codec_free(c), c = NULL;
    double smax = 0;
    for (int ci = 0; ci < NC; ci++) {
        cal_coder *cc = &x->cc[ci];
        quality_result q;
        fp[ci] = cc->fit;
        if ((rc = cal_make_codec(x, fp, probe_target, &c, err))) goto out;
        rc = cal_quality(x, c, &q, err);
        codec_free(c), c = NULL;
        fp[ci] = &nl[ci];
        if (rc) goto out;
        cal_loss(x, cc, cc->fit, &cc->sens_err);
        cc->sens_kl = q.kl - q0.kl;
        cc->probe_bits = 0;
        for (int j = 0; j < cc->fit->r; j++) cc->probe_bits += cc->fit->bits[j];
        cc->weight = fmax(cc->sens_kl, 0) / fmax(cc->sens_err, 1e-12);
        smax = fmax(smax, cc->weight);
    }
    /* a coder whose probe moved nothing still gets a small weight (it keeps
     * its first latent anyway; this orders its further steps) */
    for (int ci = 0; ci < NC; ci++) x->cc[ci].weight = smax > 0 ? fmax(x->cc[ci].weight, 1e-3 * smax) : 1.0;
    if (x->o->log)
        fprintf(x->o->log, "sensitivity (held-out, %lld tokens): KL with every coder at 8 bits %.3g\n",
                (long long)x->n_val, q0.kl);
out:
    codec_free(c);
    for (int ci = 0; nl && ci < NC; ci++) cal_fit_free(&nl[ci]);
    free(nl), free(fp), free(all8);
    return rc;
}

/* The allocation and refinement tables. */
static void cal_log_table(const cal_ctx *x, int sens) {
    FILE *f = x->o->log;
    if (!f) return;
    const int d = x->d;
    fprintf(f, "layer K/V | %s | rank bits/v | bits per latent (principal order) | held-out weighted rel err "
            "(2 round trips): %s%s%s\n",
            sens ? "probe bits/v  dKL  rel err -> weight" : "weight", cal_cand_name[0],
            x->cc[0].ncand > 1 ? " | " : "", x->cc[0].ncand > 1 ? "unbiased decoder | + encoder step" : "");
    for (int ci = 0; ci < x->NC; ci++) {
        const cal_coder *cc = &x->cc[ci];
        int sum = 0;
        for (int j = 0; j < cc->fit->r; j++) sum += cc->fit->bits[j];
        fprintf(f, "%5d  %c  | ", ci / 2, ci % 2 ? 'V' : 'K');
        if (sens)
            fprintf(f, "%.3f %9.3g %7.4f -> %8.3g | ", (double)cc->probe_bits / d, cc->sens_kl, cc->sens_err,
                    cc->weight);
        else
            fprintf(f, "%6.3g | ", cc->weight);
        fprintf(f, "%3d %6.3f | ", cc->fit->r, (double)sum / d);
        for (int j = 0; j < cc->fit->r; j++) fprintf(f, "%d", cc->fit->bits[j]);
        fprintf(f, " |");
        for (int k = 0; k < cc->ncand; k++) fprintf(f, " %.4f", cc->err[k]);
        fprintf(f, "\n");
    }
    if (x->cand_kl[0] >= 0) {
        fprintf(f, "refinement, held-out KL:");
        for (int k = 0; k < CAL_NCAND; k++) fprintf(f, " %s %.5f%s", cal_cand_name[k], x->cand_kl[k], k + 1 < CAL_NCAND ? "," : "");
        fprintf(f, " -> kept: %s\n", cal_cand_name[x->kept]);
    }
}

/* ---- calib_run ------------------------------------------------------------------ */

/* Per layer and K/V: covariance, importance M, whitened PCA -> cc[ci]
 * (mu, M blocks, P, Q, sd, lam) and the unit-latent sample for the curves. */
static int cal_pca(cal_ctx *x, model *m, cal_stats *st, kp_err *err) {
    const int d = x->d, hd = x->hd, nkv = x->nkv;
    double *M = malloc((size_t)d * d * sizeof(double)), *S = malloc((size_t)d * d * sizeof(double)),
           *Si = malloc((size_t)d * d * sizeof(double)), *C = malloc((size_t)d * d * sizeof(double)),
           *T = malloc((size_t)d * d * sizeof(double)), *U = malloc((size_t)d * d * sizeof(double)),
           *ev = malloc((size_t)d * sizeof(double));
    int rc = 0;
    if (!M || !S || !Si || !C || !T || !U || !ev) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto out;
    }
    for (int ci = 0; ci < x->NC; ci++) {
        cal_coder *cc = &x->cc[ci];
        const int l = ci / 2, t = ci % 2;
        const double N = (double)st->cnt[l];
        const double *sx = st->sx + (size_t)ci * d, *sxx = st->sxx + (size_t)ci * d * d;
        for (int i = 0; i < d; i++) cc->mu[i] = sx[i] / N;
        for (int i = 0; i < d; i++)
            for (int j = i; j < d; j++)
                C[(size_t)i * d + j] = C[(size_t)j * d + i] = sxx[(size_t)i * d + j] / N - sx[i] / N * sx[j] / N;
        if (cc->wf) { /* attention-weighted covariance of the kept rows about the mean */
            double sw = 0;
            memset(C, 0, (size_t)d * d * sizeof(double));
            for (int64_t r = 0; r < cc->nf; r++) {
                const float *row = cc->xf + (size_t)r * d;
                const double w = cc->wf[r];
                if (w <= 0) continue;
                sw += w;
                for (int k = 0; k < d; k++) T[k] = row[k] - cc->mu[k];
                for (int i = 0; i < d; i++)
                    for (int j = i; j < d; j++) C[(size_t)i * d + j] += w * T[i] * T[j];
            }
            for (int i = 0; i < d; i++)
                for (int j = i; j < d; j++) C[(size_t)i * d + j] = C[(size_t)j * d + i] = C[(size_t)i * d + j] / (sw > 0 ? sw : 1);
        }
        if (x->kind == CODEC_PCA) {
            for (int i = 0; i < d; i++)
                for (int j = 0; j < d; j++) M[(size_t)i * d + j] = S[(size_t)i * d + j] = Si[(size_t)i * d + j] = i == j;
        } else {
            if ((rc = cal_importance(m, st, l, t, M, err))) goto out;
            cal_sqrt_blocks(M, d, hd, S, Si);
        }
        for (int g = 0; g < nkv; g++)
            for (int p = 0; p < hd; p++)
                for (int q = 0; q < hd; q++)
                    cc->Mb[((size_t)g * hd + p) * hd + q] = M[(size_t)(g * hd + p) * d + g * hd + q];
        /* C' = S C S */
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                double s = 0;
                for (int k = 0; k < d; k++) s += S[(size_t)i * d + k] * C[(size_t)k * d + j];
                T[(size_t)i * d + j] = s;
            }
        for (int i = 0; i < d; i++)
            for (int j = 0; j < d; j++) {
                double s = 0;
                for (int k = 0; k < d; k++) s += T[(size_t)i * d + k] * S[(size_t)k * d + j];
                C[(size_t)i * d + j] = s;
            }
        for (int i = 0; i < d; i++) /* exact symmetry for Jacobi */
            for (int j = i + 1; j < d; j++)
                C[(size_t)i * d + j] = C[(size_t)j * d + i] = 0.5 * (C[(size_t)i * d + j] + C[(size_t)j * d + i]);
        calib_jacobi_eig(C, d, ev, U);
        double tot = 0;
        for (int j = 0; j < d; j++) tot += fmax(ev[j], 0);
        for (int j = 0; j < d; j++) {
            cc->lam[j] = tot > 0 ? fmax(ev[j], 0) / tot : 0;
            cc->sd[j] = sqrt(fmax(ev[j], 1e-12 * tot) + 1e-300);
        }
        /* P row j = u_j^T S, Q column j = S^-1 u_j */
        for (int j = 0; j < d; j++)
            for (int k = 0; k < d; k++) {
                double e = 0, q = 0;
                for (int p = 0; p < d; p++) {
                    e += U[(size_t)p * d + j] * S[(size_t)p * d + k];
                    q += Si[(size_t)k * d + p] * U[(size_t)p * d + j];
                }
                cc->P[(size_t)j * d + k] = e, cc->Q[(size_t)k * d + j] = q;
            }
        /* unit latents of an evenly spread sample of the kept fit rows */
        cc->ns = (int)KP_MIN(cc->nf, (int64_t)CAL_CURVE_ROWS);
        for (int i = 0; i < cc->ns; i++) {
            const int64_t ri = (int64_t)i * (cc->nf / cc->ns);
            const float *row = cc->xf + (size_t)ri * d;
            cc->uw[i] = (float)cal_w(cc->wf, ri);
            for (int k = 0; k < d; k++) T[k] = row[k] - cc->mu[k];
            for (int j = 0; j < d; j++) {
                double y = 0;
                for (int k = 0; k < d; k++) y += cc->P[(size_t)j * d + k] * T[k];
                cc->usamp[(size_t)i * d + j] = (float)(y / cc->sd[j]);
            }
        }
        for (size_t k = 0; k < (size_t)d * CAL_NB; k++) cc->curve[k] = -1;
        /* held-out denominator */
        cc->den_v = 0;
        for (int64_t i = 0; i < cc->nv; i++) {
            const float *row = cc->xv + (size_t)i * d;
            for (int k = 0; k < d; k++) T[k] = row[k] - cc->mu[k];
            cc->den_v += cal_w(cc->wv, i) * cal_wnorm(cc->Mb, nkv, hd, T);
        }
    }
out:
    free(M), free(S), free(Si), free(C), free(T), free(U), free(ev);
    return rc;
}

/* Row weights as the fit uses them: 0 for rows the parking layout never
 * codes (positions < sink), scaled to mean 1 over the fit rows, and capped
 * at CAL_WCAP x the mean: a few rows that draw nearly all attention (the
 * first token of every window, when it is coded) must not make the fit a
 * fit of those few rows (measured on 16K tokens, sink 4: a key coder whose
 * curves followed the sink rows kept its first latent at 1 bit, held-out
 * error 0.24 against 0.02). scale 0: compute the scale from w and return
 * it; else apply it (held-out rows use the fit rows' scale). */
#define CAL_WCAP 30.0
static double cal_norm_weights(float *w, const int *pos, int64_t n, int sink, double scale) {
    for (int64_t i = 0; i < n; i++)
        if (pos[i] < sink) w[i] = 0;
    if (scale <= 0) {
        double sw = 0;
        for (int64_t i = 0; i < n; i++) sw += w[i];
        scale = sw > 0 ? (double)n / sw : 1;
        for (int pass = 0; pass < 2; pass++) { /* cap, then re-scale the capped weights to mean 1 */
            double s2 = 0;
            for (int64_t i = 0; i < n; i++) s2 += fmin(w[i] * scale, CAL_WCAP);
            if (s2 > 0) scale *= (double)n / s2;
        }
    }
    for (int64_t i = 0; i < n; i++) w[i] = (float)fmin(w[i] * scale, CAL_WCAP);
    return scale;
}

static void cal_ctx_free(cal_ctx *x) {
    for (int ci = 0; x->cc && ci < x->NC; ci++) {
        cal_coder *cc = &x->cc[ci];
        free(cc->mu), free(cc->Mb), free(cc->P), free(cc->Q), free(cc->sd), free(cc->lam);
        free(cc->curve), free(cc->usamp), free(cc->uw), free(cc->pbits);
        for (int k = 0; k < CAL_NCAND; k++) cal_fit_free(&cc->cand[k]);
    }
    free(x->cc), free(x->scratch);
}

static int cal_ctx_init(cal_ctx *x, int NC, int d, int hd, int nkv) {
    x->NC = NC, x->d = d, x->hd = hd, x->nkv = nkv;
    x->cc = calloc((size_t)NC, sizeof *x->cc);
    x->scratch = malloc((size_t)5 * d * sizeof(double));
    if (!x->cc || !x->scratch) return KP_ENOMEM;
    for (int ci = 0; ci < NC; ci++) {
        cal_coder *cc = &x->cc[ci];
        cc->mu = malloc((size_t)d * sizeof(double));
        cc->Mb = malloc((size_t)nkv * hd * hd * sizeof(double));
        cc->P = malloc((size_t)d * d * sizeof(double));
        cc->Q = malloc((size_t)d * d * sizeof(double));
        cc->sd = malloc((size_t)d * sizeof(double));
        cc->lam = malloc((size_t)d * sizeof(double));
        cc->curve = malloc((size_t)d * CAL_NB * sizeof(double));
        cc->usamp = malloc((size_t)CAL_CURVE_ROWS * d * sizeof(float));
        cc->pbits = calloc((size_t)d, 1);
        cc->uw = malloc((size_t)CAL_CURVE_ROWS * sizeof(float));
        if (!cc->pbits || !cc->uw || !cc->mu || !cc->Mb || !cc->P || !cc->Q || !cc->sd || !cc->lam || !cc->curve || !cc->usamp)
            return KP_ENOMEM;
        for (int k = 0; k < CAL_NCAND; k++)
            if (cal_fit_alloc(&cc->cand[k], d)) return KP_ENOMEM;
        cc->fit = &cc->cand[0];
    }
    return 0;
}

/* The bits per value in coded chunks that make one n_ctx-token cache parked
 * under lay come out at `ratio` end to end, from the layout's fixed bytes
 * (lossless rows, headers) and its coded values; the fit then lands within
 * a few per cent (scales, rounding of the allocation) and calib_run corrects
 * once. KP_ERANGE, saying what is reachable, when the fixed bytes alone
 * exceed the target or it would need more than the codec's 8 bits. */
static int cal_bits_for_ratio(const codec_shape *sh, const layout *lay, int n_ctx, double ratio, double *bits,
                              kp_err *err) {
    codec *none = NULL;
    double ignored, fixed, vals;
    int rc = codec_open(&none, "none", sh, err);
    if (!rc) rc = quality_layout_ratio(none, sh, lay, n_ctx, KP_TYPE_F16, &ignored, &fixed, &vals, err);
    codec_free(none);
    if (rc) return rc;
    const double fp16 = 2.0 * n_ctx * (double)sh->n_kv_heads * sh->head_dim * 2.0 * sh->n_layer;
    if (vals <= 0)
        return kp_errf(err, KP_ERANGE, "calibrate: --ratio: with sink %d and window %d a %d-token context has "
                       "no coded rows (everything is lossless, 1x): lower --sink/--window or raise -c",
                       lay->sink, lay->window, n_ctx);
    const double budget = fp16 / ratio - fixed;
    if (budget <= 0)
        return kp_errf(err, KP_ERANGE, "calibrate: --ratio %g cannot be reached with sink %d and window %d at "
                       "%d tokens: the lossless rows and chunk headers alone give at most %.2fx; lower "
                       "--window/--sink or raise -c", ratio, lay->sink, lay->window, n_ctx, fp16 / fixed);
    *bits = 8.0 * budget / vals;
    if (*bits > CODECFILE_MAX_BITS)
        return kp_errf(err, KP_ERANGE, "calibrate: --ratio %g needs %.2f bits/value, more than the learned "
                       "codec's %d: use codec int8 or fp16 for so little compression", ratio, *bits,
                       CODECFILE_MAX_BITS);
    return 0;
}

int calib_run(model *m, const int32_t *tokens, size_t n_tokens, const calib_opts *o,
              const char *out_path, calib_report *rep, kp_err *err) {
    const double t0 = kp_now();
    const model_hparams *hp = model_hp(m);
    calib_opts def = calib_default_opts();
    if (!o) o = &def;
    if (o->kind != CODEC_LEARNED && o->kind != CODEC_PCA)
        return kp_errf(err, KP_EINVAL, "calibrate: kind must be learned or pca");
    if (o->n_ctx < 1 || o->chunk < 1 || o->chunk > 65535 || !(o->bits > 0 && o->bits <= 16) || o->sink < 0 ||
        o->window < 0 || !(o->k_weight > 0 && o->k_weight < 1e6) || !(o->max_dppl >= 0) || !(o->max_kl >= 0) || o->park_every < 1)
        return kp_errf(err, KP_EINVAL, "calibrate: bad options (n_ctx %d, chunk %d, bits %g, max_dppl %g, "
                       "park_every %d)", o->n_ctx, o->chunk, o->bits, o->max_dppl, o->park_every);
    if (!(o->ratio >= 0) || (o->ratio > 0) + (o->max_dppl > 0) + (o->max_kl > 0) > 1)
        return kp_errf(err, KP_EINVAL, "calibrate: give one of --bits, --ratio (> 0), --max-dppl and --max-kl");
    const int search = o->max_dppl > 0 || o->max_kl > 0;
    if (search && o->kind != CODEC_LEARNED)
        return kp_errf(err, KP_EINVAL, "calibrate: --max-dppl / --max-kl need --kind learned");
    const int L = hp->n_layer, hd = hp->head_dim, nkv = hp->n_kv_heads, d = hd * nkv, NC = 2 * L;
    if (d > 4096) return kp_errf(err, KP_EUNSUP, "calibrate: KV rows of %d values are too wide", d);
    if (hp->n_head % nkv) return kp_errf(err, KP_EUNSUP, "calibrate: n_head %% n_kv_heads != 0");
    int64_t n = (int64_t)KP_MIN((int64_t)n_tokens, o->max_tokens > 0 ? o->max_tokens : INT64_MAX);
    int n_ctx = KP_MIN(o->n_ctx, hp->n_ctx_train > 0 ? hp->n_ctx_train : o->n_ctx);
    /* held-out: the last 10% of whole windows (none if fewer than 2 windows) */
    int64_t n_win = (n + n_ctx - 1) / n_ctx, n_val_win = n_win >= 2 ? KP_MAX((int64_t)1, n_win / 10) : 0;
    int64_t n_fit = n_val_win ? (n_win - n_val_win) * n_ctx : n, n_val = n - n_fit;
    if (n_fit < 2 * (int64_t)d)
        return kp_errf(err, KP_EINVAL, "calibrate: %lld calibration tokens are too few for KV rows of %d "
                       "values; give more text", (long long)n_fit, d);
    const int learned = o->kind == CODEC_LEARNED, ranges = learned && o->ranges;
    /* held-out quality runs need one whole window of the quality context */
    const int qual = learned && n_val >= n_ctx;
    if (search && !qual)
        return kp_errf(err, KP_EINVAL, "calibrate: --max-dppl / --max-kl need a held-out slice of at least one window "
                       "of %d tokens (the last 10%% of the text): give more text or a smaller -c", n_ctx);
    codec_shape shape = {.n_layer = L, .n_kv_heads = nkv, .head_dim = hd, .n_rot = hp->n_rot,
                         .rope_mode = hp->rope_mode, .rope_base = hp->rope_base,
                         .rope_freq_scale = hp->rope_freq_scale, .model_fingerprint = model_fingerprint(m)};
    /* rows kept for refinement: at most CAL_MAX_ROWS per coder and
     * CAL_ROW_FLOATS in all, spread evenly over the text */
    const int64_t cap_f = learned ? KP_MIN(n_fit, KP_MIN((int64_t)CAL_MAX_ROWS, KP_MAX((int64_t)64,
                                                 (int64_t)CAL_ROW_FLOATS / ((int64_t)NC * d)))) : 0;
    const int64_t cap_v = learned ? KP_MIN(n_val, cap_f) : 0;
    const layout lay = {.sink = o->sink, .window = o->window, .chunk = o->chunk};
    double bits0 = o->bits;
    if (o->ratio > 0) {
        int rc0 = cal_bits_for_ratio(&shape, &lay, n_ctx, o->ratio, &bits0, err);
        if (rc0) return rc0;
        if (o->log)
            fprintf(o->log, "ratio %g end to end (a %d-token cache, sink %d, window %d, chunk %d): start at "
                    "%.4f bits/value in coded chunks\n", o->ratio, n_ctx, o->sink, o->window, o->chunk, bits0);
    }
    cal_stats st, sv;
    memset(&sv, 0, sizeof sv);
    if (cal_stats_init(&st, hp, &shape, o->kind, 1, cap_f, cap_f ? (n_fit + cap_f - 1) / cap_f : 1))
        return kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
    st.rope_avg = 1, st.n_ctx = n_ctx;
    cal_ctx x = {.m = m, .o = o, .shape = shape, .L = L, .kind = o->kind, .ranges = ranges,
                 .curves = 0};
    codec *c = NULL, *c_pca = NULL;
    calib_report r = {.heldout_start = n_fit, .heldout_tokens = n_val};
    int rc = 0;
    if (cal_ctx_init(&x, NC, d, hd, nkv) ||
        (cap_v && cal_stats_init(&sv, hp, &shape, o->kind, 0, cap_v, 1))) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto done;
    }
    sv.n_ctx = n_ctx;
    if ((rc = cal_qtab_init(&x.qt, err))) goto done;
    const int attn = learned && o->attn && cap_f;
    /* the allocator's distortion curves measured on the attention-weighted
     * latents (unweighted ones mislead it: KL 0.0112 -> 0.0135 at 1.5
     * bits/value, window 32; weighted 0.0113 -> 0.0106 at window 8) */
    x.curves = ranges && attn;
    if (attn && (cal_stats_attn(&st, L, n_ctx, o->window) || (cap_v && cal_stats_attn(&sv, L, n_ctx, o->window)))) {
        rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
        goto done;
    }
    rc = cal_run_windows(m, tokens, n_fit, n_ctx, &st, attn ? cal_attn_window : NULL, &st, o, 1,
                         "collecting K/V statistics", err);
    if (!rc && cap_v)
        rc = cal_run_windows(m, tokens + n_fit, n_val, n_ctx, &sv, attn ? cal_attn_window : NULL, &sv, o, 0, "", err);
    if (rc) goto done;
    for (int ci = 0; ci < NC; ci++) {
        cal_coder *cc = &x.cc[ci];
        if (cap_f) cc->xf = cal_row(&st, ci / 2, ci % 2, 0), cc->nf = st.rows_n[ci / 2];
        if (cap_v) cc->xv = cal_row(&sv, ci / 2, ci % 2, 0), cc->nv = sv.rows_n[ci / 2];
        if (attn) {
            cc->wf = st.roww + (size_t)ci * st.rows_cap;
            const double sc = cal_norm_weights(cc->wf, st.rowpos + (size_t)(ci / 2) * st.rows_cap, cc->nf,
                                               o->sink, 0);
            if (cap_v) {
                cc->wv = sv.roww + (size_t)ci * sv.rows_cap;
                cal_norm_weights(cc->wv, sv.rowpos + (size_t)(ci / 2) * sv.rows_cap, cc->nv, o->sink, sc);
            }
            double sw = 0;
            for (int64_t i = 0; i < cc->nf; i++) sw += cc->wf[i];
            if (!(sw > 0)) cc->wf = cc->wv = NULL; /* no query meets a row coded (window >= n_ctx) */
        }
        /* keys' relative error costs k_weight times the values' (the prior) */
        cc->weight = learned && ci % 2 == 0 ? o->k_weight : 1.0;
    }
    if ((rc = cal_pca(&x, m, &st, err))) goto done;

    if (qual) {
        x.val = tokens + n_fit, x.n_val = n_val;
        x.qo = quality_default_opts();
        x.qo.n_ctx = n_ctx, x.qo.park_every = o->park_every, x.qo.chunk = o->chunk, x.qo.sink = o->sink;
        x.qo.window = o->window, x.qo.kv_type = KP_TYPE_F16, x.qo.cancel = o->cancel;
    }
    const int sens = learned && o->sens && qual;
    if (sens && (rc = cal_sensitivity(&x, bits0, err))) goto done;
    if (o->sens_scale)
        for (int ci = 0; ci < NC; ci++) x.cc[ci].weight *= o->sens_scale[ci];

    double target = bits0;
    quality_result qr = {0};
    int have_q = 0;
    if (search) {
        /* bisection over the bit budget in log space: the smallest budget
         * whose held-out Δppl is <= max_dppl (or KL <= max_kl; both fall as
         * bits rise, up to noise: the search trusts that). Starts from 8 bits/value, the most
         * a latent can have; each step is a whole fit (allocation,
         * refinement) and one held-out quality run per candidate. */
        double lo = 1.0 / d, hi = CODECFILE_MAX_BITS, best = -1;
        if (o->log)
            fprintf(o->log, "%s %g%s: bisection over bits/value in [%.4g, %d] on the held-out slice "
                    "(%lld tokens, never the evaluation text)\n", o->max_kl > 0 ? "max-kl" : "max-dppl",
                    o->max_kl > 0 ? o->max_kl : o->max_dppl, o->max_kl > 0 ? "" : "%", lo, CODECFILE_MAX_BITS,
                    (long long)n_val);
        for (int step = 0; step < 12; step++) {
            if (o->on_progress) o->on_progress(o->progress_ud, "bit budget search (fit + held-out run)", step, 12, -1);
            const double b = step == 0 ? hi : sqrt(lo * hi);
            quality_result q;
            int measured = 0;
            if ((rc = cal_fit_target(&x, b, o->refine, &c, &q, &measured, err))) goto done;
            if (!measured) rc = cal_quality(&x, c, &q, err);
            const double ach = ((codec_learned *)c)->achieved_bits;
            codec_free(c), c = NULL;
            if (rc) goto done;
            const double dp = 100.0 * (q.ppl - q.ppl_ref) / q.ppl_ref;
            const int ok = o->max_kl > 0 ? q.kl <= o->max_kl : dp <= o->max_dppl;
            r.search_steps++;
            if (o->log)
                fprintf(o->log, "  step %2d: %.4f bits/value (coded %.4f): ratio %.3f, Δppl %+.3f%%, KL %.4g, "
                        "agree %.4f -> %s\n", step + 1, b, ach, q.ratio, dp, q.kl, q.agree,
                        ok ? "meets the bound" : "too lossy");
            if (ok) best = b, hi = b, qr = q, have_q = 1;
            else if (step == 0) {
                rc = o->max_kl > 0
                         ? kp_errf(err, KP_ERANGE, "calibrate: even %d bits/value give KL %.4g > %g on the "
                                   "held-out slice", CODECFILE_MAX_BITS, q.kl, o->max_kl)
                         : kp_errf(err, KP_ERANGE, "calibrate: even %d bits/value give Δppl %+.3f%% > %g%% on the "
                                   "held-out slice", CODECFILE_MAX_BITS, dp, o->max_dppl);
                goto done;
            } else lo = b;
            if (step > 0 && hi / lo < 1.02) break;
        }
        target = best;
        if (o->log) fprintf(o->log, "%s: chose %.4f bits/value\n", o->max_kl > 0 ? "max-kl" : "max-dppl", target);
    }
    /* the final fit (deterministic: for max_dppl the very codec the search
     * measured, so its held-out numbers stand) */
    if (o->on_progress) o->on_progress(o->progress_ud, "final fit and validation", 0, 1, -1);
    {
        quality_result q;
        int measured = 0;
        if ((rc = cal_fit_target(&x, target, o->refine, &c, &q, &measured, err))) goto done;
        if (o->ratio > 0) {
            /* the coded bytes scale with the bit budget: one correction
             * from the achieved end-to-end ratio, then the fit that is kept */
            double got, fixed, vals;
            if ((rc = quality_layout_ratio(c, &shape, &lay, n_ctx, KP_TYPE_F16, &got, &fixed, &vals, err)))
                goto done;
            const double fp16 = 4.0 * n_ctx * d * L, want_coded = fp16 / o->ratio - fixed,
                         got_coded = fp16 / got - fixed;
            if (fabs(got / o->ratio - 1) > 0.01 && got_coded > 0) {
                const double t2 = KP_MIN((double)CODECFILE_MAX_BITS, target * want_coded / got_coded);
                if (o->log)
                    fprintf(o->log, "ratio: %.4f bits/value gave %.3fx end to end; refit at %.4f\n", target, got,
                            t2);
                codec_free(c), c = NULL;
                target = t2, measured = 0;
                if ((rc = cal_fit_target(&x, target, o->refine, &c, &q, &measured, err))) goto done;
            }
        }
        if (!have_q && measured) qr = q, have_q = 1;
    }
    if ((rc = quality_layout_ratio(c, &shape, &lay, n_ctx, KP_TYPE_F16, &r.ratio_e2e, NULL, NULL, err)))
        goto done;
    r.n_ctx = n_ctx;
    r.target_bits = target;
    r.tokens_used = n_fit, r.bits_per_value = ((codec_learned *)c)->achieved_bits;
    if (qual && !have_q) {
        if ((rc = cal_quality(&x, c, &qr, err))) goto done;
        have_q = 1;
    }
    if (have_q) {
        r.heldout_dppl = 100.0 * (qr.ppl - qr.ppl_ref) / qr.ppl_ref;
        r.heldout_kl = qr.kl, r.heldout_ratio = qr.ratio;
    }
    if (n_val_win) {
        if ((rc = calib_codec_error(m, c, tokens + n_fit, (size_t)n_val, n_ctx, o->chunk, &r.rel_err_k,
                                    &r.rel_err_v, err)))
            goto done;
        r.rel_err_k_pca = r.rel_err_k, r.rel_err_v_pca = r.rel_err_v;
        if (x.kept != 0) { /* before: the PCA start with the same bits */
            cal_fit **fp = malloc((size_t)NC * sizeof *fp);
            if (!fp) {
                rc = kp_errf(err, KP_ENOMEM, "calibrate: out of memory");
                goto done;
            }
            for (int ci = 0; ci < NC; ci++) fp[ci] = &x.cc[ci].cand[0];
            rc = cal_make_codec(&x, fp, target, &c_pca, err);
            free(fp);
            if (!rc) rc = calib_codec_error(m, c_pca, tokens + n_fit, (size_t)n_val, n_ctx, o->chunk,
                                            &r.rel_err_k_pca, &r.rel_err_v_pca, err);
            if (rc) goto done;
        }
    }
    if (o->log) {
        fprintf(o->log, "allocation and fit, target %.4f bits/value -> %.4f coded (weights: %s%s)\n", target,
                r.bits_per_value, sens ? "measured sensitivity" : learned ? "k_weight prior" : "none",
                attn ? ", attention-weighted rows" : "");
        cal_log_table(&x, sens);
        if (n_val_win)
            fprintf(o->log, "held-out weighted rel err through the real codec (%s -> kept): K %.5f -> %.5f, "
                    "V %.5f -> %.5f\n", cal_cand_name[0], r.rel_err_k_pca, r.rel_err_k, r.rel_err_v_pca,
                    r.rel_err_v);
        if (have_q)
            fprintf(o->log, "held-out quality (park every %d, chunk %d, sink %d, window %d): ratio %.3f, "
                    "Δppl %+.3f%%, KL %.4g\n", o->park_every, o->chunk, o->sink, o->window, r.heldout_ratio,
                    r.heldout_dppl, r.heldout_kl);
    }
    if (out_path && (rc = codecfile_write(c, out_path, err))) goto done;
    r.seconds = kp_now() - t0;
    if (rep) *rep = r;
done:
    codec_free(c), codec_free(c_pca);
    cal_ctx_free(&x);
    cal_stats_free(&st), cal_stats_free(&sv);
    return rc;
}
