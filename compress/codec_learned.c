/*
 * codec_learned.c — the fitted KV codecs 'learned' and 'pca':
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
 *                  angles come from lc_rope_start/rows: th_p = freq_scale *
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
 *
 * Speed (one core; the arithmetic above is unchanged, every path gives the
 * same bits): decode unpacks 8 codes per AVX2 step with shuffle and shift
 * tables per (row mod 8, group of 8 dims) -- 8 rows take exactly B bytes, so
 * the tables repeat (lc_unpack) -- then projects 8 rows at once with dmean
 * added in the same register pass; the RoPE angle chain is stepped per block
 * of 8 rows so it overlaps the projection; small chunks use stack scratch.
 * stories260K, `kvpark bench codec`: decode 0.5-0.76 -> 1.2-1.4 GB/s.
 */
#include <math.h>
#include <stdlib.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#include <string.h>

#include "compress/codecfile.h"
#include "compress/codec_learned_impl.h"
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
     * and its cos and sin (in double), for lc_rope_start */
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
 * acc[t] = sum over i = 0..n-1 of w_i[t] * s_i, each a float multiply then
 * a float add (no FMA) so the AVX2 and scalar paths give the same bits;
 * out[t] = bias[t] + acc[t] (one more float add), or acc[t] if bias is NULL. */
static inline void lc_axpy_block(float *out, const float *w, size_t stride, const float *s, int n,
                                 const float *bias) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __m256 v = _mm256_set1_ps(s[i]);
        const float *wi = w + (size_t)i * stride;
        a0 = _mm256_add_ps(a0, _mm256_mul_ps(_mm256_loadu_ps(wi), v));
        a1 = _mm256_add_ps(a1, _mm256_mul_ps(_mm256_loadu_ps(wi + 8), v));
    }
    if (bias) a0 = _mm256_add_ps(_mm256_loadu_ps(bias), a0), a1 = _mm256_add_ps(_mm256_loadu_ps(bias + 8), a1);
    _mm256_storeu_ps(out, a0);
    _mm256_storeu_ps(out + 8, a1);
#else
    float acc[LC_BLK] = {0};
    for (int i = 0; i < n; i++)
        for (int t = 0; t < LC_BLK; t++) acc[t] += w[(size_t)i * stride + t] * s[i];
    for (int t = 0; t < LC_BLK; t++) out[t] = bias ? bias[t] + acc[t] : acc[t];
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
                                  const float *s, size_t s_stride, int n, const float *bias) {
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
    for (int q = 0; q < 4 && bias; q++) {
        a[q][0] = _mm256_add_ps(_mm256_loadu_ps(bias), a[q][0]);
        a[q][1] = _mm256_add_ps(_mm256_loadu_ps(bias + 8), a[q][1]);
    }
    for (int q = 0; q < 4; q++) {
        _mm256_storeu_ps(out + q * out_stride, a[q][0]);
        _mm256_storeu_ps(out + q * out_stride + 8, a[q][1]);
    }
#else
    for (int q = 0; q < 4; q++) lc_axpy_block(out + q * out_stride, w, stride, s + q * s_stride, n, bias);
#endif
}

/* The same for 8 rows with AVX-512 (one 16-float register per row; 8
 * independent add chains): the same products and sums in the same order
 * per output as lc_axpy_block, so every path gives the same bits. */
#ifdef __AVX512F__
static inline void lc_axpy_block8(float *out, size_t out_stride, const float *w, size_t stride,
                                  const float *s, size_t s_stride, int n, const float *bias) {
    __m512 a[8];
    for (int q = 0; q < 8; q++) a[q] = _mm512_setzero_ps();
    for (int i = 0; i < n; i++) {
        const __m512 wv = _mm512_loadu_ps(w + (size_t)i * stride);
        for (int q = 0; q < 8; q++)
            a[q] = _mm512_add_ps(a[q], _mm512_mul_ps(wv, _mm512_set1_ps(s[q * s_stride + i])));
    }
    if (bias)
        for (int q = 0; q < 8; q++) a[q] = _mm512_add_ps(_mm512_loadu_ps(bias), a[q]);
    for (int q = 0; q < 8; q++) _mm512_storeu_ps(out + q * out_stride, a[q]);
}
#endif

/* RoPE cos/sin of the rows of a chunk: the angle of row i and pair p is
 * (pos0 + i) * freq_scale * base^(-2p/n_rot), stepped row to row by the
 * angle-addition formulas in double (cos/sin are called once per pair, not
 * once per row), then rounded to float. rs [4][half] (double) holds the
 * state: cos and sin of the current row's angle and of the step. */
static void lc_rope_start(const codec_learned *cl, int pos0, double *rs) {
    const codec_shape *s = &cl->base.shape;
    const int half = KP_MIN(s->n_rot, s->head_dim) / 2;
    for (int p = 0; p < half; p++) {
        const double th = cl->rope_th[p];
        rs[p] = cos(th * pos0), rs[half + p] = sin(th * pos0);
        rs[2 * half + p] = cl->rope_th[half + p], rs[3 * half + p] = cl->rope_th[2 * half + p];
    }
}

/* cs, sn [m][half] of the next m rows, and step the state past them. The
 * chains of the pairs are independent (the inner loop vectorises), each
 * does exactly the double operations of a plain per-pair loop. */
static void lc_rope_rows(int half, double *rs, int m, float *cs, float *sn) {
    double *restrict c = rs, *restrict sv = rs + half;
    const double *restrict c1 = rs + 2 * half, *restrict s1 = rs + 3 * half;
    for (int i = 0; i < m; i++) {
        float *restrict ci = cs + (size_t)i * half, *restrict si = sn + (size_t)i * half;
        for (int p = 0; p < half; p++) {
            ci[p] = (float)c[p], si[p] = (float)sv[p];
            const double cn = c[p] * c1[p] - sv[p] * s1[p];
            sv[p] = sv[p] * c1[p] + c[p] * s1[p], c[p] = cn;
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

/* Unpack the codes of n rows into z [n][zs] (zs = r rounded up to 8; the
 * lanes j >= r are 0): z_ij = (float)q_ij, or with lo/st given (ranges 0)
 * (float)q_ij * st_j + lo_j (a float multiply, then an add). off [r] is the
 * bit offset of dim j within a row of B bits; codes must be followed by 32
 * zero bytes (the vector loads read up to 16 bytes past a code's byte);
 * off holds zs entries (any values past r: those lanes are masked to 0).
 * lo and st, when given, hold zs entries (zero past r). */
static void lc_unpack(const uint8_t *codes, int n, int r, const uint8_t *bits, const int *off, int B,
                      const float *lo, const float *st, float *z, int zs) {
#ifdef __AVX2__
    /* 8 rows take exactly B bytes, so the byte and bit position of dim j in
     * row i = 8m + q is m B + ((q B + off_j) >> 3) and (q B + off_j) & 7:
     * for each q (0..7) and group of 8 dims a shuffle picks each dim's 4
     * bytes out of 16 loaded at the group's first byte, then a per-lane
     * shift and mask leave the code. Tables for up to UG groups at a time. */
    enum { UG = 8 };
    const int ng = zs / 8;
    for (int g0 = 0; g0 < ng; g0 += UG) {
        const int gn = KP_MIN(UG, ng - g0);
        __m256i shuf[8][UG], shr[8][UG], msk[UG];
        int base[8][UG];
        for (int g = 0; g < gn; g++) {
            const int j0 = 8 * (g0 + g);
            int m[8];
            for (int l = 0; l < 8; l++) m[l] = j0 + l < r ? (1 << bits[j0 + l]) - 1 : 0;
            msk[g] = _mm256_loadu_si256((const __m256i *)m);
            const __m256i o = _mm256_loadu_si256((const __m256i *)(off + j0));
            for (int q = 0; q < 8; q++) {
                /* lane l: stream bit p_l = q B + off_j of its code, byte
                 * p_l >> 3 relative to lane 0's (0..7 for codes j < r: 8
                 * codes of <= 8 bits), shuffle bytes rel .. rel + 3 */
                const int p0 = q * B + off[j0];
                const __m256i p = _mm256_add_epi32(_mm256_set1_epi32(q * B), o);
                const __m256i rel = _mm256_sub_epi32(_mm256_srli_epi32(p, 3), _mm256_set1_epi32(p0 >> 3));
                base[q][g] = p0 >> 3;
                shuf[q][g] = _mm256_add_epi32(_mm256_mullo_epi32(rel, _mm256_set1_epi32(0x01010101)),
                                              _mm256_set1_epi32(0x03020100));
                shr[q][g] = _mm256_and_si256(p, _mm256_set1_epi32(7));
            }
        }
        for (int i = 0; i < n; i++) {
            const int q = i & 7;
            const uint8_t *row = codes + (size_t)(i >> 3) * B;
            float *zi = z + (size_t)i * zs + 8 * g0;
            for (int g = 0; g < gn; g++) {
                __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(row + base[q][g])));
                v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_shuffle_epi8(v, shuf[q][g]), shr[q][g]), msk[g]);
                __m256 f = _mm256_cvtepi32_ps(v);
                if (lo)
                    f = _mm256_add_ps(_mm256_mul_ps(f, _mm256_loadu_ps(st + 8 * (g0 + g))),
                                      _mm256_loadu_ps(lo + 8 * (g0 + g)));
                _mm256_storeu_ps(zi + 8 * g, f);
            }
        }
    }
#else
    (void)off;
    size_t t = 0;
    for (int i = 0; i < n; i++) {
        float *zi = z + (size_t)i * zs;
        for (int j = 0; j < r; j++) {
            const int b = bits[j];
            uint64_t w;
            memcpy(&w, codes + (t >> 3), 8); /* little-endian host (codec.c) */
            const uint32_t q = (uint32_t)(w >> (t & 7)) & ((1u << b) - 1);
            t += (size_t)b;
            zi[j] = lo ? (float)q * st[j] + lo[j] : (float)q;
        }
        for (int j = r; j < zs; j++) zi[j] = 0;
    }
    (void)B;
#endif
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
    const int zs = cd->rpad; /* z row stride: whole register blocks */
    /* scratch: rope state [4][half] (double) | x [8][d] | z [n][zs] | lo, st, inv [r] |
     * rope cs, sn [n][half] */
    double small[2048]; /* 16 KiB: a small model's chunk needs no malloc */
    const size_t need = 4 * (size_t)half * sizeof(double) +
                        (8 * (size_t)d + (size_t)n * zs + 3 * (size_t)r + 2 * (size_t)n * half) * sizeof(float);
    double *rs = need <= sizeof small ? small : malloc(need);
    if (!rs) return kp_errf(err, KP_ENOMEM, "codec '%s' encode: out of memory", c->ops->name);
    float *x = (float *)(rs + 4 * (size_t)half);
    float *z = x + 8 * (size_t)d, *lo = z + (size_t)n * zs, *st = lo + r, *qm = st + r, *cs = qm + r,
          *sn = cs + (size_t)n * half;
    if (derot) lc_rope_start(cl, ch->pos0, rs), lc_rope_rows(half, rs, n, cs, sn);
    for (int i0 = 0; i0 < n; i0 += 8) {
        const int nr = KP_MIN(8, n - i0);
        for (int q = 0; q < nr; q++) {
            const int i = i0 + q;
            float *xq = x + (size_t)q * d;
            load_row(ch->kv_type, rows, (size_t)i * d, xq, d);
            if (derot) lc_rope_apply(&c->shape, xq, cs + (size_t)i * half, sn + (size_t)i * half, 1);
            for (int k = 0; k < d; k++) xq[k] -= cd->mean[k];
        }
        /* z_j = sum over k = 0..d-1 in order of E[j][k] x[k]; vectorised
         * across j, LC_BLK latents at a time held in registers, up to 8
         * rows at once (independent add chains) */
        for (int j0 = 0; j0 < r; j0 += LC_BLK) {
            float *zo = z + (size_t)i0 * zs + j0;
            int q0 = 0;
#ifdef __AVX512F__
            if (nr == 8) {
                lc_axpy_block8(zo, (size_t)zs, cd->enct + j0, (size_t)cd->rpad, x, (size_t)d, d, NULL);
                q0 = 8;
            }
#endif
            for (; q0 + 4 <= nr; q0 += 4)
                lc_axpy_block4(zo + (size_t)q0 * zs, (size_t)zs, cd->enct + j0, (size_t)cd->rpad,
                               x + (size_t)q0 * d, (size_t)d, d, NULL);
            for (; q0 < nr; q0++)
                lc_axpy_block(zo + (size_t)q0 * zs, cd->enct + j0, (size_t)cd->rpad, x + (size_t)q0 * d, d, NULL);
        }
    }
    uint8_t *codes = payload + (cl->ranges ? 0 : 4 * (size_t)r);
    for (int j = 0; j < r && cl->ranges; j++)
        lo[j] = cd->qlo[j], st[j] = cd->qstep[j], qm[j] = (float)((1 << cd->bits[j]) - 1);
    for (int j = 0; j < r && !cl->ranges; j++) {
        uint8_t *lo16 = payload, *st16 = payload + 2 * (size_t)r;
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < n; i++) {
            float v = z[(size_t)i * zs + j];
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
        const float *zi = z + (size_t)i * zs;
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
    if (rs != small) free(rs);
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
    const int zs = (r + 7) / 8 * 8;
    /* scratch: rope state [4][half] (double) | x [8][dpad] | lo, st [zs] |
     * z [n][zs] | rope cs, sn [8][half] | off [zs] (int) | codes + 32 zero bytes */
    size_t nf = 8 * (size_t)half + 8 * (size_t)cd->dpad + 2 * (size_t)zs + (size_t)n * zs + 16 * (size_t)half +
                (size_t)zs;
    double small[2048]; /* 16 KiB: a small model's chunk needs no malloc */
    const size_t need = nf * sizeof(float) + ncode + 32;
    float *buf = need <= sizeof small ? (float *)small : malloc(need);
    if (!buf) return kp_errf(err, KP_ENOMEM, "codec '%s' decode: out of memory", c->ops->name);
    double *rs = (double *)buf;
    float *x = buf + 8 * (size_t)half, *lo = x + 8 * (size_t)cd->dpad, *st = lo + zs, *z = st + zs,
          *cs = z + (size_t)n * zs, *sn = cs + 8 * (size_t)half;
    int *off = (int *)(sn + 8 * (size_t)half);
    uint8_t *codes = (uint8_t *)(buf + nf);
    memcpy(codes, payload + (cl->ranges ? 0 : 4 * (size_t)r), ncode);
    memset(codes + ncode, 0, 32); /* the vector reads below may run past the stream */
    for (int j = 0, o = 0; j < zs; j++) off[j] = o, o += j < r ? cd->bits[j] : 0;
    for (int j = 0; j < zs; j++) {
        if (cl->ranges || j >= r) {
            lo[j] = st[j] = 0; /* ranges 1: the quantiser is folded into dect */
            continue;
        }
        lo[j] = kp_fp16_to_f32((uint16_t)(payload[2 * j] | payload[2 * j + 1] << 8));
        st[j] = kp_fp16_to_f32((uint16_t)(payload[2 * r + 2 * j] | payload[2 * r + 2 * j + 1] << 8));
    }
    if (rerot) lc_rope_start(cl, ch->pos0, rs);
    /* 1. unpack and dequantise every row: z [n][zs] (ranges 1: z = q, the
     * quantiser is folded into dect and dmean) */
    lc_unpack(codes, n, r, cd->bits, off, cd->bits_sum, cl->ranges ? NULL : lo, cl->ranges ? NULL : st, z, zs);
    /* 2. x = dmean + dect^T z row by row (sums over j = 0..r-1 in order, then
     * dmean added), 8 or 4 rows and LC_BLK outputs at a time straight into
     * x [8][dpad]; then RoPE and the row type */
    const int dp = cd->dpad;
    for (int i0 = 0; i0 < n; i0 += 8) {
        const int nr = KP_MIN(8, n - i0);
        /* the angles of these rows (a latency-bound chain in double that
         * overlaps with the projection below) */
        if (rerot) lc_rope_rows(half, rs, nr, cs, sn);
        for (int k0 = 0; k0 < d; k0 += LC_BLK) {
            const float *zq = z + (size_t)i0 * zs;
            int q0 = 0;
#ifdef __AVX512F__
            if (nr == 8) {
                lc_axpy_block8(x + k0, (size_t)dp, cd->dect + k0, (size_t)dp, zq, (size_t)zs, r, cd->dmean + k0);
                q0 = 8;
            }
#endif
            for (; q0 + 4 <= nr; q0 += 4)
                lc_axpy_block4(x + (size_t)q0 * dp + k0, (size_t)dp, cd->dect + k0, (size_t)dp,
                               zq + (size_t)q0 * zs, (size_t)zs, r, cd->dmean + k0);
            for (; q0 < nr; q0++)
                lc_axpy_block(x + (size_t)q0 * dp + k0, cd->dect + k0, (size_t)dp, zq + (size_t)q0 * zs, r,
                              cd->dmean + k0);
        }
        for (int q = 0; q < nr; q++) {
            const int i = i0 + q;
            if (rerot) lc_rope_apply(&c->shape, x + (size_t)q * dp, cs + (size_t)q * half, sn + (size_t)q * half, 0);
            store_row(ch->kv_type, rows, (size_t)i * d, x + (size_t)q * dp, d);
        }
    }
    if (buf != (float *)small) free(buf);
    return 0;
}

const codec_ops codec_ops_pca = {"pca", CODEC_PCA, lc_payload_bytes, lc_encode, lc_decode};
const codec_ops codec_ops_learned = {"learned", CODEC_LEARNED, lc_payload_bytes, lc_encode, lc_decode};

/* ---- a plain view for other decoders (codec_learned_impl.h) ------------- */

int codec_is_learned(const codec *c) {
    return c && (c->ops == &codec_ops_pca || c->ops == &codec_ops_learned);
}

int codec_learned_get_view(const codec *c, int layer, int is_v, codec_learned_view *v, kp_err *err) {
    if (!codec_is_learned(c) || !v)
        return kp_errf(err, KP_EINVAL, "codec '%s' is not a pca/learned codec (or no view given)",
                       codec_name(c));
    if (layer < 0 || layer >= c->shape.n_layer)
        return kp_errf(err, KP_EINVAL, "codec '%s': layer %d outside 0..%d", codec_name(c), layer,
                       c->shape.n_layer - 1);
    const codec_learned *cl = (const codec_learned *)c;
    const lc_coder *cd = &cl->coders[2 * layer + (is_v != 0)];
    const int half = KP_MIN(c->shape.n_rot, c->shape.head_dim) / 2;
    *v = (codec_learned_view){
        .kind = cl->kind,
        .ranges = cl->ranges,
        .d = cl->d,
        .r = cd->r,
        .bits_sum = cd->bits_sum,
        .rope = cl->kind == CODEC_LEARNED && !is_v && half > 0,
        .rope_half = KP_MAX(half, 0),
        .rope_neox = c->shape.rope_mode == KP_ROPE_NEOX,
        .bits = cd->bits,
        .mean = cd->mean,
        .enc = cd->enc,
        .enct = cd->enct,
        .rpad = cd->rpad,
        .dect = cd->dect,
        .dpad = cd->dpad,
        .dmean = cd->dmean,
        .qlo = cd->qlo,
        .qstep = cd->qstep,
        .rope_th = half > 0 ? cl->rope_th : NULL,
        .rope_cos = half > 0 ? cl->rope_th + half : NULL,
        .rope_sin = half > 0 ? cl->rope_th + 2 * half : NULL,
    };
    return 0;
}
