/*
 * codec_learned.c — the fitted KV codecs 'learned' and 'pca' (issue 4):
 * a linear encoder per layer and per K/V, read from a codec file
 * (codecfile.c) and fitted by calib.c.
 *
 * Why: a KV row of d = n_kv_heads * head_dim values lives near a low-
 * dimensional subspace; coding its coordinates in that subspace with few
 * bits (more bits where the model is sensitive) beats quantising every value.
 *
 * Per row x [d] of a chunk (rows pos0 .. pos0+n-1):
 *   learned, keys: x = RoPE^-1(x, pos0 + i) first (keys are fitted before
 *                  RoPE; decode re-applies RoPE at the same position). The
 *                  angles come from lc_rope_table: th_p = freq_scale *
 *                  pow(base^(-2/n_rot), p) and cos/sin(th_p) in double (once,
 *                  at open), cos/sin of pos0 * th_p in double, stepped row to
 *                  row by angle addition in double, rounded to float (a
 *                  decoder on another device must do the same to match bit
 *                  for bit); each pair (x0, x1) -> (x0 c - x1 s, x0 s + x1 c).
 *   z = E (x - mu)            E [r][d], mu [d]   (float32, sums in order k = 0..d-1)
 * 'pca' is the same machinery with keys taken as stored (post-RoPE) and an
 * unweighted fit; calib.c gives each of its kept dims 8 bits (int8 latents).
 *
 * Two kinds of quantiser ranges (codec file key kvpark.codec.ranges):
 *   ranges 1 (learned's default): fixed, calibrated. calib.c scales E and D
 *     so every latent has unit variance on the calibration rows; latent j
 *     with b_j bits uses lo_j = -(2^b_j - 1)/2 * s_j, s_j = 1.3 * g(b_j),
 *     g = the MSE-optimal uniform step for a unit Gaussian (lc_gauss_step;
 *     1.3x because real latents have heavier tails: measured on
 *     stories260K, KL at 2 bits 0.0089 / 0.0062 / 0.0060 for 1.0 / 1.2 /
 *     1.4x). No side info is stored.
 *   ranges 0 (pca; learned files of version 1): per chunk, lo_j and s_j
 *     stored in the payload (below), from the chunk's min and max of z_j.
 *
 * Payload (after the 16-byte chunk header of codec.c), for the coder of
 * (layer, K/V) with r latent dims of bits b_j (1..8), B = sum b_j; its size
 * is exact for that layer (codec.c checks it with ch->layer, no padding):
 *   ranges 0 only:
 *   lo[r]   fp16   lo_j = fp16(min over the chunk's rows of z_j)
 *   step[r] fp16   s_j  = fp16((max_j - lo_j) / (2^b_j - 1))
 *   codes          ceil(n * B / 8) bytes: a bit stream, rows in order, in a
 *                  row dims j = 0..r-1, code q_ij in b_j bits; LSB-first:
 *                  bit k of q goes to stream bit t + k, stream bit t is bit
 *                  (t & 7) of byte (t >> 3); unused bits of the last byte 0.
 *   q_ij = floor(clamp((z_ij - lo_j) / s_j, 0, 2^b_j - 1) + 0.5)  (0 if s_j
 *          is 0 or not finite, or z is NaN)
 *   payload = (ranges 0: 4 r) + ceil(n B / 8) bytes (independent of kv_type).
 * Decode (float32, each product then its sum: no FMA; sums over j = 0..r-1
 * in order):
 *   ranges 0: z^_ij = (float)q_ij * s_j + lo_j;  x^ = mu + D z^
 *   ranges 1: x^ = m + D' q, the quantiser folded into the decoder at open:
 *             D'[k][j] = D[k][j] * s_j, m_k = mu_k + sum_j D[k][j] * lo_j
 *             (codec_learned_finish).
 * Per-chunk ranges cost 32 bits per latent per chunk (~10% at 2 bits) and
 * stretch the levels over the chunk's extremes; the fixed ones clip the
 * rare outliers instead: at 2 bits/value on stories260K, Δppl +2.19% ->
 * +0.56% in `kvpark bench codec`.
 */
#include <math.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <string.h>

#include "codecfile.h"
#include "kernels/cpu/quant.h"
#include "kernels/kernels.h"
#include "kernels/types.h"

/* ---- fixed quantiser (ranges 1) ------------------------------------------ */

/* Step of the MSE-optimal uniform quantiser with 2^b levels for a unit
 * Gaussian (J. Max 1960; Jayant & Noll table 4.4), b = 1..8. */
static const float lc_gauss_step[CODECFILE_MAX_BITS + 1] = {
    0.0f, 1.5958f, 0.9957f, 0.5860f, 0.3352f, 0.1881f, 0.1041f, 0.0569f, 0.0308f,
};

/* The fixed quantiser of a unit-variance latent with b bits: levels
 * lo + q * step, q = 0..2^b-1, symmetric about 0 (float32 arithmetic). */
static void lc_fixed_range(int b, float *lo, float *step) {
    *step = 1.3f * lc_gauss_step[b];
    *lo = -0.5f * (float)((1 << b) - 1) * *step;
}

static size_t lc_layer_payload_bytes(const codec *c, int n, int kv_type, int is_v, int layer);

/* ---- allocation ------------------------------------------------------- */

int codec_learned_alloc(codec **out, const codec_shape *shape, int kind, const int *ranks,
                        kp_err *err) {
    *out = NULL;
    const int L = shape->n_layer, d = shape->n_kv_heads * shape->head_dim;
    if (L < 1 || L > 4096 || shape->n_kv_heads < 1 || shape->head_dim < 1 || d > 65536)
        return kp_errf(err, KP_EINVAL, "codec: bad shape n_layer=%d n_kv_heads=%d head_dim=%d", L,
                       shape->n_kv_heads, shape->head_dim);
    /* one block: struct | coders | per coder: mean, enc, dec (floats) | bits */
    size_t floats = 0, bytes = 0;
    for (int i = 0; i < 2 * L; i++) {
        if (ranks[i] < 1 || ranks[i] > d)
            return kp_errf(err, KP_EFORMAT, "codec: coder %d has rank %d (must be 1..%d)", i,
                           ranks[i], d);
        const size_t rp = ((size_t)ranks[i] + LC_BLK - 1) / LC_BLK * LC_BLK, dp = ((size_t)d + LC_BLK - 1) / LC_BLK * LC_BLK;
        floats += (size_t)d + 2 * (size_t)ranks[i] * d + (size_t)d * rp + (size_t)ranks[i] * dp + 2 * (size_t)ranks[i] + dp;
        bytes += (size_t)ranks[i];
    }
    const int half = KP_MIN(shape->n_rot, shape->head_dim) / 2;
    size_t head = sizeof(codec_learned) + (size_t)2 * L * sizeof(lc_coder);
    head = (head + 7) & ~(size_t)7;
    const size_t th_off = head;
    head += 3 * (size_t)KP_MAX(half, 0) * sizeof(double);
    head = (head + 63) & ~(size_t)63;
    size_t total = head + floats * sizeof(float) + bytes;
    uint8_t *blk = calloc(1, total);
    if (!blk) return kp_errf(err, KP_ENOMEM, "codec: out of memory (%zu bytes)", total);
    codec_learned *cl = (codec_learned *)blk;
    cl->base.ops = kind == CODEC_PCA ? &codec_ops_pca : &codec_ops_learned;
    cl->base.layer_payload_bytes = lc_layer_payload_bytes;
    cl->base.shape = *shape;
    cl->base.group = KP_MIN(32, shape->head_dim);
    cl->base.n_groups = (shape->head_dim + cl->base.group - 1) / cl->base.group;
    cl->kind = kind;
    cl->d = d;
    cl->coders = (lc_coder *)(blk + sizeof(codec_learned));
    /* RoPE angle of pair p per position, th_p = freq_scale * base^(-2p/n_rot),
     * and its cos and sin (in double), for lc_rope_table */
    cl->rope_th = (double *)(blk + th_off);
    if (half > 0) {
        const double theta_scale = pow((double)shape->rope_base, -2.0 / (double)KP_MIN(shape->n_rot, shape->head_dim));
        for (int p = 0; p < half; p++) {
            const double th = (double)shape->rope_freq_scale * pow(theta_scale, p);
            cl->rope_th[p] = th, cl->rope_th[half + p] = cos(th), cl->rope_th[2 * half + p] = sin(th);
        }
    }
    float *fp = (float *)(blk + head);
    uint8_t *bp = blk + head + floats * sizeof(float);
    for (int i = 0; i < 2 * L; i++) {
        lc_coder *cd = &cl->coders[i];
        cd->r = ranks[i];
        cd->mean = fp, fp += d;
        cd->enc = fp, fp += (size_t)cd->r * d;
        cd->dec = fp, fp += (size_t)cd->r * d;
        cd->rpad = (cd->r + LC_BLK - 1) / LC_BLK * LC_BLK, cd->dpad = (d + LC_BLK - 1) / LC_BLK * LC_BLK;
        cd->enct = fp, fp += (size_t)d * cd->rpad;
        cd->dect = fp, fp += (size_t)cd->r * cd->dpad;
        cd->qlo = fp, fp += cd->r;
        cd->qstep = fp, fp += cd->r;
        cd->dmean = fp, fp += cd->dpad;
        cd->bits = bp, bp += cd->r;
    }
    *out = &cl->base;
    return 0;
}

int codec_learned_finish(codec *c, kp_err *err) {
    codec_learned *cl = (codec_learned *)c;
    for (int i = 0; i < 2 * c->shape.n_layer; i++) {
        lc_coder *cd = &cl->coders[i];
        cd->bits_sum = 0;
        for (int j = 0; j < cd->r; j++) {
            if (cd->bits[j] < 1 || cd->bits[j] > CODECFILE_MAX_BITS)
                return kp_errf(err, KP_EFORMAT, "codec: layer %d %s latent %d has %d bits (must be 1..8)",
                               i / 2, i % 2 ? "V" : "K", j, cd->bits[j]);
            cd->bits_sum += cd->bits[j];
            lc_fixed_range(cd->bits[j], &cd->qlo[j], &cd->qstep[j]);
        }
        const int d = cl->d, r = cd->r;
        for (int j = 0; j < r; j++)
            for (int k = 0; k < d; k++) {
                cd->enct[(size_t)k * cd->rpad + j] = cd->enc[(size_t)j * d + k];
                cd->dect[(size_t)j * cd->dpad + k] = cd->dec[(size_t)k * r + j];
            }
        /* ranges 1: the quantiser folded into the decoder (no dequantise
         * step per code): dect[j][k] = D[k][j] * step_j, dmean[k] = mu_k +
         * sum over j = 0..r-1 in order of D[k][j] * lo_j (float multiply,
         * then add). ranges 0: dmean = mu. */
        for (int k = 0; k < d; k++) {
            float m = cd->mean[k];
            for (int j = 0; j < r && cl->ranges; j++) {
                cd->dect[(size_t)j * cd->dpad + k] = cd->dec[(size_t)k * r + j] * cd->qstep[j];
                m += cd->dec[(size_t)k * r + j] * cd->qlo[j];
            }
            cd->dmean[k] = m;
        }
    }
    return 0;
}

/* ---- RoPE twin ------------------------------------------------------------ */

void codec_rope_row(const codec_shape *s, float *x, int pos, int inverse) {
    const int n_rot = KP_MIN(s->n_rot, s->head_dim);
    if (n_rot <= 0) return;
    const int half = n_rot / 2;
    const float theta_scale = powf(s->rope_base, -2.0f / (float)n_rot);
    float theta_base = (float)pos;
    for (int i = 0; i < half; i++) {
        float theta = s->rope_freq_scale * theta_base;
        float cs = cosf(theta), sn = sinf(theta);
        theta_base *= theta_scale;
        if (inverse) sn = -sn;
        int j0 = s->rope_mode == KP_ROPE_NEOX ? i : 2 * i;
        int j1 = s->rope_mode == KP_ROPE_NEOX ? i + half : 2 * i + 1;
        for (int h = 0; h < s->n_kv_heads; h++) {
            float *xh = x + (size_t)h * s->head_dim;
            float x0 = xh[j0], x1 = xh[j1];
            xh[j0] = x0 * cs - x1 * sn;
            xh[j1] = x0 * sn + x1 * cs;
        }
    }
}

/* ---- sizes -------------------------------------------------------------- */

static size_t lc_payload(const codec_learned *cl, const lc_coder *cd, int n) {
    return (cl->ranges ? 0 : 4 * (size_t)cd->r) + ((size_t)n * (size_t)cd->bits_sum + 7) / 8;
}

static size_t lc_layer_payload_bytes(const codec *c, int n, int kv_type, int is_v, int layer) {
    (void)kv_type;
    const codec_learned *cl = (const codec_learned *)c;
    return lc_payload(cl, &cl->coders[2 * layer + (is_v != 0)], n);
}

/* Without a layer (codec_chunk_bytes, codec_max_bytes): the largest. */
static size_t lc_payload_bytes(const codec *c, int n, int kv_type, int is_v) {
    size_t m = 0;
    for (int l = 0; l < c->shape.n_layer; l++) m = KP_MAX(m, lc_layer_payload_bytes(c, n, kv_type, is_v, l));
    return m;
}

size_t codec_learned_payload(const codec *c, int n, int is_v, int layer) {
    return lc_layer_payload_bytes(c, n, 0, is_v, layer);
}

double codec_learned_bits_per_value(const codec *c, int n) {
    const codec_learned *cl = (const codec_learned *)c;
    double bits = 0;
    for (int i = 0; i < 2 * c->shape.n_layer; i++)
        bits += (cl->ranges ? 0 : 32.0 * cl->coders[i].r) + (double)n * cl->coders[i].bits_sum;
    return bits / ((double)n * cl->d * 2 * c->shape.n_layer);
}

/* ---- encode / decode -------------------------------------------------- */

/* acc[0..LC_BLK) += w[0..LC_BLK) * s for every (w, s) pair, in order:
 * out[t] = sum over i = 0..n-1 of w_i[t] * s_i, each a float multiply then
 * a float add (no FMA) so the AVX2 and scalar paths give the same bits. */
static inline void lc_axpy_block(float *out, const float *w, size_t stride, const float *s, int n) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __m256 v = _mm256_set1_ps(s[i]);
        const float *wi = w + (size_t)i * stride;
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(wi), v));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(wi + 8), v));
    }
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out + 8, a1);
#else
    float acc[LC_BLK] = {0};
    for (int i = 0; i < n; i++)
        for (int t = 0; t < LC_BLK; t++) acc[t] += w[(size_t)i * stride + t] * s[i];
    memcpy(out, acc, sizeof acc);
#endif
}


static void load_row(int t, const void *rows, size_t off, float *x, int d) {
    if (t == KP_TYPE_F32)
        memcpy(x, (const float *)rows + off, (size_t)d * sizeof(float));
    else if (t == KP_TYPE_F16)
        kp_f16_to_f32_row((const uint16_t *)rows + off, x, d);
    else
        kp_bf16_to_f32_row((const uint16_t *)rows + off, x, d);
}

static void store_row(int t, void *rows, size_t off, const float *x, int d) {
    if (t == KP_TYPE_F32)
        memcpy((float *)rows + off, x, (size_t)d * sizeof(float));
    else if (t == KP_TYPE_F16)
        kp_f32_to_f16_row(x, (uint16_t *)rows + off, d);
    else
        kp_f32_to_bf16_row(x, (uint16_t *)rows + off, d);
}

/* The same for 4 rows at once (4 independent add chains per register: the
 * loop is bound by add latency otherwise): out[q][t] = sum over i of
 * w_i[t] * s[q * s_stride + i], q = 0..3, in order i = 0..n-1. */
static inline void lc_axpy_block4(float *out, size_t out_stride, const float *w, size_t stride,
                                  const float *s, size_t s_stride, int n) {
#ifdef __AVX2__
    __m256 a[4][2];
    for (int q = 0; q < 4; q++) a[q][0] = a[q][1] = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        const float *wi = w + (size_t)i * stride;
        const __m256 w0 = _mm256_loadu_ps(wi), w1 = _mm256_loadu_ps(wi + 8);
        for (int q = 0; q < 4; q++) {
            const __m256 v = _mm256_set1_ps(s[q * s_stride + i]);
            a[q][0] = _mm256_add_ps(a[q][0], _mm256_mul_ps(w0, v));
            a[q][1] = _mm256_add_ps(a[q][1], _mm256_mul_ps(w1, v));
        }
    }
    for (int q = 0; q < 4; q++) {
        _mm256_storeu_ps(out + q * out_stride, a[q][0]);
        _mm256_storeu_ps(out + q * out_stride + 8, a[q][1]);
    }
#else
    for (int q = 0; q < 4; q++) lc_axpy_block(out + q * out_stride, w, stride, s + q * s_stride, n);
#endif
}

/* The same for 8 rows with AVX-512 (one 16-float register per row; 8
 * independent add chains): the same products and sums in the same order
 * per output as lc_axpy_block, so every path gives the same bits. */
#ifdef __AVX512F__
static inline void lc_axpy_block8(float *out, size_t out_stride, const float *w, size_t stride,
                                  const float *s, size_t s_stride, int n) {
    __m512 a[8];
    for (int q = 0; q < 8; q++) a[q] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __m512 wv = _mm512_loadu_ps(w + (size_t)i * stride);
        for (int q = 0; q < 8; q++)
            a[q] = _mm512_add_ps(a[q], _mm512_mul_ps(wv, _mm512_set1_ps(s[q * s_stride + i])));
    }
    for (int q = 0; q < 8; q++) _mm512_storeu_ps(out + q * out_stride, a[q]);
}
#endif

/* RoPE cos/sin of every row and pair of a chunk: cs, sn [n][half], the
 * angle of row i and pair p is (pos0 + i) * freq_scale * base^(-2p/n_rot),
 * stepped row to row by the angle-addition formulas in double (cos/sin are
 * called once per pair, not once per row), then rounded to float. */
static void lc_rope_table(const codec_learned *cl, int pos0, int n, float *cs, float *sn) {
    const codec_shape *s = &cl->base.shape;
    const int half = KP_MIN(s->n_rot, s->head_dim) / 2;
    for (int p = 0; p < half; p++) {
        const double th = cl->rope_th[p], c1 = cl->rope_th[half + p], s1 = cl->rope_th[2 * half + p];
        double c = cos(th * pos0), sv = sin(th * pos0);
        for (int i = 0; i < n; i++) {
            cs[(size_t)i * half + p] = (float)c, sn[(size_t)i * half + p] = (float)sv;
            const double cn = c * c1 - sv * s1;
            sv = sv * c1 + c * s1, c = cn;
        }
    }
}

/* Rotate one row [n_kv_heads][head_dim] by the table's row (sn negated: undo). */
static void lc_rope_apply(const codec_shape *s, float *x, const float *cs, const float *sn, int inverse) {
    const int n_rot = KP_MIN(s->n_rot, s->head_dim), half = n_rot / 2;
    const int neox = s->rope_mode == KP_ROPE_NEOX;
    int p0 = 0;
#ifdef __AVX2__
    /* normal mode, 4 pairs (8 adjacent floats) at a time: x' = x C + swap(x) S
     * with C = (c0 c0 c1 c1 ..), S = (-s0 s0 -s1 s1 ..) (signs flipped to
     * undo): the same float products and sums as the scalar loop below */
    if (!neox)
        for (; p0 + 4 <= half; p0 += 4) {
            const __m256i dup = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
            const __m256 C = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(cs + p0)), dup);
            __m256 S = _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sn + p0)), dup);
            const __m256 sg = inverse ? _mm256_setr_ps(1, -1, 1, -1, 1, -1, 1, -1)
                                      : _mm256_setr_ps(-1, 1, -1, 1, -1, 1, -1, 1);
            S = _mm256_mul_ps(S, sg); /* exact: a sign flip */
            for (int h = 0; h < s->n_kv_heads; h++) {
                float *xp = x + (size_t)h * s->head_dim + 2 * p0;
                const __m256 v = _mm256_loadu_ps(xp);
                _mm256_storeu_ps(xp, _mm256_add_ps(_mm256_mul_ps(v, C),
                                                   _mm256_mul_ps(_mm256_permute_ps(v, 0xB1), S)));
            }
        }
#endif
    for (int h = 0; h < s->n_kv_heads; h++) {
        float *xh = x + (size_t)h * s->head_dim;
        for (int p = p0; p < half; p++) {
            const int j0 = neox ? p : 2 * p, j1 = neox ? p + half : 2 * p + 1;
            const float c = cs[p], sv = inverse ? -sn[p] : sn[p];
            const float x0 = xh[j0], x1 = xh[j1];
            xh[j0] = x0 * c - x1 * sv;
            xh[j1] = x0 * sv + x1 * c;
        }
    }
}

static int lc_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *payload,
                     kp_err *err) {
    const codec_learned *cl = (const codec_learned *)c;
    if (ch->layer < 0 || ch->layer >= c->shape.n_layer)
        return kp_errf(err, KP_EINVAL, "codec '%s' encode: layer %d outside 0..%d", c->ops->name,
                       ch->layer, c->shape.n_layer - 1);
    const lc_coder *cd = &cl->coders[2 * ch->layer + (ch->is_v != 0)];
    const int d = cl->d, r = cd->r, n = ch->n;
    const int half = KP_MIN(c->shape.n_rot, c->shape.head_dim) / 2;
    const int derot = cl->kind == CODEC_LEARNED && !ch->is_v && half > 0;
    /* scratch: x [d] | z [n][r] | lo, st, inv [r] | rope cs, sn [n][half] */
    float *x = malloc(((size_t)d + (size_t)n * r + 3 * (size_t)r + 2 * (size_t)n * half) * sizeof(float));
    if (!x) return kp_errf(err, KP_ENOMEM, "codec '%s' encode: out of memory", c->ops->name);
    float *z = x + d, *lo = z + (size_t)n * r, *st = lo + r, *qm = st + r, *cs = qm + r,
          *sn = cs + (size_t)n * half;
    if (derot) lc_rope_table(cl, ch->pos0, n, cs, sn);
    for (int i = 0; i < n; i++) {
        load_row(ch->kv_type, rows, (size_t)i * d, x, d);
        if (derot) lc_rope_apply(&c->shape, x, cs + (size_t)i * half, sn + (size_t)i * half, 1);
        for (int k = 0; k < d; k++) x[k] -= cd->mean[k];
        /* z_j = sum over k = 0..d-1 in order of E[j][k] x[k]; vectorised
         * across j, LC_BLK latents at a time held in registers */
        float *zi = z + (size_t)i * r;
        for (int j0 = 0; j0 < r; j0 += LC_BLK) {
            float acc[LC_BLK];
            lc_axpy_block(acc, cd->enct + j0, (size_t)cd->rpad, x, d);
            for (int jj = 0; jj < LC_BLK && j0 + jj < r; jj++) zi[j0 + jj] = acc[jj];
        }
    }
    uint8_t *codes = payload + (cl->ranges ? 0 : 4 * (size_t)r);
    for (int j = 0; j < r && cl->ranges; j++)
        lo[j] = cd->qlo[j], st[j] = cd->qstep[j], qm[j] = (float)((1 << cd->bits[j]) - 1);
    for (int j = 0; j < r && !cl->ranges; j++) {
        uint8_t *lo16 = payload, *st16 = payload + 2 * (size_t)r;
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < n; i++) {
            float v = z[(size_t)i * r + j];
            if (v < mn) mn = v;
            if (v > mx) mx = v;
        }
        if (!isfinite(mn) || !isfinite(mx)) mn = mx = 0;
        uint16_t l16 = kp_f32_to_fp16(mn);
        float lf = kp_fp16_to_f32(l16);
        if (!isfinite(lf)) l16 = kp_f32_to_fp16(0), lf = 0;
        float qmax = (float)((1 << cd->bits[j]) - 1);
        uint16_t s16 = kp_f32_to_fp16((mx - lf) / qmax);
        float sf = kp_fp16_to_f32(s16);
        if (!isfinite(sf) || sf < 0) s16 = 0, sf = 0;
        lo[j] = lf, st[j] = sf, qm[j] = qmax;
        lo16[2 * j] = (uint8_t)l16, lo16[2 * j + 1] = (uint8_t)(l16 >> 8);
        st16[2 * j] = (uint8_t)s16, st16[2 * j + 1] = (uint8_t)(s16 >> 8);
    }
    /* bit writer: codes LSB-first into a 64-bit accumulator, whole bytes out */
    uint64_t acc = 0;
    int nacc = 0;
    uint8_t *o = codes;
    for (int i = 0; i < n; i++) {
        const float *zi = z + (size_t)i * r;
        for (int j = 0; j < r; j++) {
            uint32_t q = 0;
            if (st[j] > 0) {
                float v = (zi[j] - lo[j]) / st[j];
                v = v > 0.0f ? v : 0.0f; /* NaN -> 0 */
                v = v < qm[j] ? v : qm[j];
                q = (uint32_t)floorf(v + 0.5f);
            }
            acc |= (uint64_t)q << nacc;
            nacc += cd->bits[j];
            if (nacc >= 32) {
                for (int k = 0; k < 4; k++) *o++ = (uint8_t)(acc >> (8 * k));
                acc >>= 32, nacc -= 32;
            }
        }
    }
    while (nacc > 0) *o++ = (uint8_t)acc, acc >>= 8, nacc -= 8;
    free(x);
    return 0;
}

static int lc_decode(const codec *c, const codec_chunk *ch, const uint8_t *payload, void *rows,
                     kp_err *err) {
    const codec_learned *cl = (const codec_learned *)c;
    if (ch->layer < 0 || ch->layer >= c->shape.n_layer)
        return kp_errf(err, KP_EINVAL, "codec '%s' decode: layer %d outside 0..%d", c->ops->name,
                       ch->layer, c->shape.n_layer - 1);
    const lc_coder *cd = &cl->coders[2 * ch->layer + (ch->is_v != 0)];
    const int d = cl->d, r = cd->r, n = ch->n;
    const int half = KP_MIN(c->shape.n_rot, c->shape.head_dim) / 2;
    const int rerot = cl->kind == CODEC_LEARNED && !ch->is_v && half > 0;
    const size_t ncode = ((size_t)n * cd->bits_sum + 7) / 8;
    /* scratch: x [8][d] | lo, st [r] | z [n][r] | rope cs, sn [n][half] | codes + 8 zero bytes */
    size_t nf = 8 * (size_t)d + 2 * (size_t)r + (size_t)n * r + 2 * (size_t)n * half;
    float *buf = malloc(nf * sizeof(float) + ncode + 8);
    if (!buf) return kp_errf(err, KP_ENOMEM, "codec '%s' decode: out of memory", c->ops->name);
    float *x = buf, *lo = buf + 8 * (size_t)d, *st = lo + r, *z = st + r, *cs = z + (size_t)n * r,
          *sn = cs + (size_t)n * half;
    uint8_t *codes = (uint8_t *)(buf + nf);
    memcpy(codes, payload + (cl->ranges ? 0 : 4 * (size_t)r), ncode);
    memset(codes + ncode, 0, 8); /* the 8-byte reads below may run past the stream */
    for (int j = 0; j < r; j++) {
        if (cl->ranges) {
            lo[j] = cd->qlo[j], st[j] = cd->qstep[j];
            continue;
        }
        lo[j] = kp_fp16_to_f32((uint16_t)(payload[2 * j] | payload[2 * j + 1] << 8));
        st[j] = kp_fp16_to_f32((uint16_t)(payload[2 * r + 2 * j] | payload[2 * r + 2 * j + 1] << 8));
    }
    if (rerot) lc_rope_table(cl, ch->pos0, n, cs, sn);
    /* 1. unpack and dequantise every row: z [n][r] (ranges 1: z = q, the
     * quantiser is folded into dect and dmean) */
    size_t t = 0;
    const uint8_t *bits = cd->bits;
    for (int i = 0; i < n; i++) {
        float *zi = z + (size_t)i * r;
        if (cl->ranges) {
            for (int j = 0; j < r; j++) {
                const int b = bits[j];
                uint64_t w;
                memcpy(&w, codes + (t >> 3), 8); /* little-endian host (codec.c) */
                zi[j] = (float)((uint32_t)(w >> (t & 7)) & ((1u << b) - 1));
                t += (size_t)b;
            }
            continue;
        }
        for (int j = 0; j < r; j++) {
            const int b = bits[j];
            uint64_t w;
            memcpy(&w, codes + (t >> 3), 8);
            const uint32_t q = (uint32_t)(w >> (t & 7)) & ((1u << b) - 1);
            t += (size_t)b;
            zi[j] = (float)q * st[j] + lo[j];
        }
    }
    /* 2. x = dmean + dect^T z row by row (sums over j = 0..r-1 in order), 4 rows
     * and LC_BLK outputs at a time; then RoPE and the row type */
    for (int i0 = 0; i0 < n; i0 += 8) {
        const int nr = KP_MIN(8, n - i0);
        for (int k0 = 0; k0 < d; k0 += LC_BLK) {
            float acc[8][LC_BLK];
            int q0 = 0;
#ifdef __AVX512F__
            if (nr == 8) {
                lc_axpy_block8(&acc[0][0], LC_BLK, cd->dect + k0, (size_t)cd->dpad, z + (size_t)i0 * r, (size_t)r, r);
                q0 = 8;
            }
#endif
            for (; q0 + 4 <= nr; q0 += 4)
                lc_axpy_block4(&acc[q0][0], LC_BLK, cd->dect + k0, (size_t)cd->dpad, z + (size_t)(i0 + q0) * r, (size_t)r, r);
            for (; q0 < nr; q0++) lc_axpy_block(acc[q0], cd->dect + k0, (size_t)cd->dpad, z + (size_t)(i0 + q0) * r, r);
            for (int q = 0; q < nr; q++)
                for (int kk = 0; kk < LC_BLK && k0 + kk < d; kk++)
                    x[(size_t)q * d + k0 + kk] = cd->dmean[k0 + kk] + acc[q][kk];
        }
        for (int q = 0; q < nr; q++) {
            const int i = i0 + q;
            if (rerot) lc_rope_apply(&c->shape, x + (size_t)q * d, cs + (size_t)i * half, sn + (size_t)i * half, 0);
            store_row(ch->kv_type, rows, (size_t)i * d, x + (size_t)q * d, d);
        }
    }
    free(buf);
    return 0;
}

const codec_ops codec_ops_pca = {"pca", CODEC_PCA, lc_payload_bytes, lc_encode, lc_decode};
const codec_ops codec_ops_learned = {"learned", CODEC_LEARNED, lc_payload_bytes, lc_encode, lc_decode};
