/*
 * quant.c — conversions between f32 and every tensor type kvpark computes
 * with (F32 F16 BF16 Q8_0 Q4_0 Q4_K Q6_K, plus Q8_K for activations), and
 * the dot products a matmul is made of.
 *
 * Why: to load llama.cpp's GGUF files and reproduce its numbers, block
 * layouts, quantisers and dot products follow ggml (ggml-quants.c,
 * ggml-cpu) operation for operation:
 *   - kp_dequant_row / kp_quant_row are dequantize_row_* / quantize_row_*_ref.
 *   - kp_quant_row_act is what llama.cpp's x86 CPU backend runs on
 *     activations (differs from the reference only for Q8_0).
 *   - kp_vec_dot_ref is ggml's generic C vec_dot (the specification); the
 *     hot kp_vec_dot uses AVX2 (AVX-512 for the float types) when compiled
 *     for it. Integer sums per block are exact either way; only the order in
 *     which per-block float terms are added differs. kp_vec_dot_nx applies
 *     one weight row to up to 4 activation rows per pass, bit-identical to
 *     kp_vec_dot. The quantisers of activations (Q8_0, Q8_K) are vectorised
 *     too, bit-identical to their scalar twins (kp_quant_*_scalar).
 *
 * Where things are:
 *   quant.c      the portable C: dequantisation, the quantisers (the scalar
 *                twins of the vectorised ones included), ggml's reference dot
 *                products, kp_vec_dot_type / kp_vec_dot_ref;
 *   quant_x86.c  the x86 SIMD: f16/bf16 row conversions, the AVX2 paths of
 *                the Q8_0 / Q8_K quantisers, the AVX2 / AVX-512 dot products
 *                and the fast entry points (kp_vec_dot, kp_vec_dot_rows,
 *                kp_vec_dot_nx), each falling back to the code here when not
 *                compiled for AVX2 (or not on x86);
 *   quant_impl.h what both use: the SIMD feature test (KP_QUANT_AVX2 /
 *                KP_QUANT_AVX512), fp16 and Q4_K scale helpers, the twins.
 *
 * Layout reminders (QK_K = 256 elements per super-block):
 *   Q8_0  d (fp16) | qs[32] int8                         x = d * q
 *   Q4_0  d (fp16) | qs[16]: low nibbles = elements 0..15, high = 16..31,
 *                                                         x = d * (q - 8)
 *   Q4_K  d, dmin (fp16) | scales[12]: eight 6-bit scales and eight 6-bit
 *         mins | qs[128]: for each 64-element chunk c, 32 bytes whose low
 *         nibbles are elements 64c..64c+31 and high nibbles 64c+32..64c+63.
 *         Sub-block j (32 elements): x = d*sc[j]*q - dmin*m[j].
 *   Q6_K  ql[128] low 4 bits | qh[64] high 2 bits | scales[16] int8 | d.
 *         Per 128-element half: ql[0..31] low nibble -> elements 0..31,
 *         ql[32..63] low -> 32..63, ql[0..31] high -> 64..95, ql[32..63]
 *         high -> 96..127; qh[l] bits 0-1, 2-3, 4-5, 6-7 are the high bits of
 *         elements l, l+32, l+64, l+96. x = d * scales[e/16] * (q - 32).
 *   Q8_K  d (f32) | qs[256] int8 | bsums[16] = sums of 16 qs each.
 */
#include "kernels/cpu/quant.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/quant_impl.h"
#include "kernels/kp.h"

#define KP_GROUP_MAX_EPS 1e-15f

/* ---- small helpers --------------------------------------------------------- */

/* ggml's nearest_int: round to nearest (ties to even) via the 1.5*2^23 trick.
 * Valid for |f| <= 4194303. */
static inline int kp_nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static inline int kp_imin(int a, int b) { return a < b ? a : b; }
static inline int kp_imax(int a, int b) { return a > b ? a : b; }

/* ---- dequantisation (dequantize_row_*) -------------------------------------- */

static void kp_dequant_q8_0(const kp_block_q8_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = KP_H2F(x[i].d);
        for (int j = 0; j < KP_QK8_0; j++) y[i * KP_QK8_0 + j] = x[i].qs[j] * d;
    }
}

static void kp_dequant_q4_0(const kp_block_q4_0 *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = KP_H2F(x[i].d);
        for (int j = 0; j < KP_QK4_0 / 2; j++) {
            const int x0 = (x[i].qs[j] & 0x0F) - 8;
            const int x1 = (x[i].qs[j] >> 4) - 8;
            y[i * KP_QK4_0 + j] = x0 * d;
            y[i * KP_QK4_0 + j + KP_QK4_0 / 2] = x1 * d;
        }
    }
}

static void kp_dequant_q4_K(const kp_block_q4_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const uint8_t *q = x[i].qs;
        const float d = KP_H2F(x[i].d);
        const float min = KP_H2F(x[i].dmin);
        int is = 0;
        uint8_t sc, m;
        for (int j = 0; j < KP_QK_K; j += 64) {
            kp_q4k_scale_min(is + 0, x[i].scales, &sc, &m);
            const float d1 = d * sc, m1 = min * m;
            kp_q4k_scale_min(is + 1, x[i].scales, &sc, &m);
            const float d2 = d * sc, m2 = min * m;
            for (int l = 0; l < 32; l++) *y++ = d1 * (q[l] & 0xF) - m1;
            for (int l = 0; l < 32; l++) *y++ = d2 * (q[l] >> 4) - m2;
            q += 32;
            is += 2;
        }
    }
}

static void kp_dequant_q6_K(const kp_block_q6_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++) {
        const float d = KP_H2F(x[i].d);
        const uint8_t *ql = x[i].ql;
        const uint8_t *qh = x[i].qh;
        const int8_t *sc = x[i].scales;
        for (int n = 0; n < KP_QK_K; n += 128) {
            for (int l = 0; l < 32; l++) {
                const int is = l / 16;
                const int q1 = (int8_t)((ql[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                const int q2 = (int8_t)((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                const int q3 = (int8_t)((ql[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                const int q4 = (int8_t)((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                y[l + 0] = d * sc[is + 0] * q1;
                y[l + 32] = d * sc[is + 2] * q2;
                y[l + 64] = d * sc[is + 4] * q3;
                y[l + 96] = d * sc[is + 6] * q4;
            }
            y += 128;
            ql += 64;
            qh += 32;
            sc += 8;
        }
    }
}

static void kp_dequant_q8_K(const kp_block_q8_K *x, float *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++)
        for (int j = 0; j < KP_QK_K; j++) y[i * KP_QK_K + j] = x[i].d * x[i].qs[j];
}

int kp_dequant_row(int type, const void *src, float *dst, int64_t n) {
    const int bs = kp_type_block(type);
    if (bs == 0 || n < 0 || n % bs != 0) return KP_EINVAL;
    const int64_t nb = n / bs;
    switch (type) {
    case KP_TYPE_F32: memmove(dst, src, (size_t)n * sizeof(float)); return 0;
    case KP_TYPE_F16: kp_f16_to_f32_row(src, dst, n); return 0;
    case KP_TYPE_BF16: kp_bf16_to_f32_row(src, dst, n); return 0;
    case KP_TYPE_Q8_0: kp_dequant_q8_0(src, dst, nb); return 0;
    case KP_TYPE_Q4_0: kp_dequant_q4_0(src, dst, nb); return 0;
    case KP_TYPE_Q4_K: kp_dequant_q4_K(src, dst, nb); return 0;
    case KP_TYPE_Q6_K: kp_dequant_q6_K(src, dst, nb); return 0;
    case KP_TYPE_Q8_K: kp_dequant_q8_K(src, dst, nb); return 0;
    default: return KP_EUNSUP;
    }
}

/* ---- reference quantisers (quantize_row_*_ref) ---------------------------- */

void kp_quant_q8_0_scalar(const float *x, kp_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = KP_F2H(d);
        for (int j = 0; j < KP_QK8_0; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
    }
}

/* llama.cpp's x86 quantize_row_q8_0 (AVX): multiplier 127/amax, ties to even. */
void kp_quant_q8_0_act_scalar(const float *x, kp_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
        float amax = 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        y[i].d = KP_F2H(amax / 127.f);
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) y[i].qs[j] = (int8_t)kp_nearest_int(x[j] * id);
    }
}

static void kp_quant_q4_0(const float *x, kp_block_q4_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK4_0) {
        float amax = 0.0f, max = 0.0f; /* max: the signed value of largest magnitude */
        for (int j = 0; j < KP_QK4_0; j++) {
            if (amax < fabsf(x[j])) {
                amax = fabsf(x[j]);
                max = x[j];
            }
        }
        const float d = max / -8;
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = KP_F2H(d);
        for (int j = 0; j < KP_QK4_0 / 2; j++) {
            const float x0 = x[j] * id;
            const float x1 = x[KP_QK4_0 / 2 + j] * id;
            const int xi0 = kp_imin(15, (int8_t)(x0 + 8.5f));
            const int xi1 = kp_imin(15, (int8_t)(x1 + 8.5f));
            y[i].qs[j] = (uint8_t)(xi0 | (xi1 << 4));
        }
    }
}

/* ggml's make_qkx2_quants: fit x ~ scale*L + min (L in 0..nmax, min <= 0)
 * minimising the weighted squared error, trying nstep+1 candidate scales.
 * Returns scale; *the_min = -min. */
static float kp_make_qkx2_quants(int n, int nmax, const float *x, const float *weights,
                                 uint8_t *L, float *the_min, uint8_t *Laux, float rmin,
                                 float rdelta, int nstep) {
    float min = x[0], max = x[0];
    float sum_w = weights[0];
    float sum_x = sum_w * x[0];
    for (int i = 1; i < n; i++) {
        if (x[i] < min) min = x[i];
        if (x[i] > max) max = x[i];
        const float w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if (min > 0) min = 0;
    if (max == min) {
        for (int i = 0; i < n; i++) L[i] = 0;
        *the_min = -min;
        return 0.f;
    }
    float iscale = nmax / (max - min);
    float scale = 1 / iscale;
    float best_mad = 0;
    for (int i = 0; i < n; i++) {
        const int l = kp_nearest_int(iscale * (x[i] - min));
        L[i] = (uint8_t)kp_imax(0, kp_imin(nmax, l));
        float diff = scale * L[i] + min - x[i];
        diff = diff * diff;
        best_mad += weights[i] * diff;
    }
    if (nstep < 1) {
        *the_min = -min;
        return scale;
    }
    for (int is = 0; is <= nstep; is++) {
        iscale = (rmin + rdelta * is + nmax) / (max - min);
        float sum_l = 0, sum_l2 = 0, sum_xl = 0;
        for (int i = 0; i < n; i++) {
            int l = kp_nearest_int(iscale * (x[i] - min));
            l = kp_imax(0, kp_imin(nmax, l));
            Laux[i] = (uint8_t)l;
            const float w = weights[i];
            sum_l += w * l;
            sum_l2 += w * l * l;
            sum_xl += w * l * x[i];
        }
        const float D = sum_w * sum_l2 - sum_l * sum_l;
        if (D > 0) {
            float this_scale = (sum_w * sum_xl - sum_x * sum_l) / D;
            float this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D;
            if (this_min > 0) {
                this_min = 0;
                this_scale = sum_xl / sum_l2;
            }
            float mad = 0;
            for (int i = 0; i < n; i++) {
                float diff = this_scale * Laux[i] + this_min - x[i];
                diff = diff * diff;
                mad += weights[i] * diff;
            }
            if (mad < best_mad) {
                for (int i = 0; i < n; i++) L[i] = Laux[i];
                best_mad = mad;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    *the_min = -min;
    return scale;
}

static void kp_quant_q4_K(const float *x, kp_block_q4_K *y, int64_t nb) {
    uint8_t L[KP_QK_K], Laux[32];
    float weights[32], mins[KP_QK_K / 32], scales[KP_QK_K / 32];

    for (int64_t i = 0; i < nb; i++, x += KP_QK_K) {
        float max_scale = 0, max_min = 0; /* scales are >= 0 once the min is taken out */
        for (int j = 0; j < KP_QK_K / 32; j++) {
            float sum_x2 = 0;
            for (int l = 0; l < 32; l++) sum_x2 += x[32 * j + l] * x[32 * j + l];
            const float av_x = sqrtf(sum_x2 / 32);
            for (int l = 0; l < 32; l++) weights[l] = av_x + fabsf(x[32 * j + l]);
            scales[j] = kp_make_qkx2_quants(32, 15, x + 32 * j, weights, L + 32 * j, &mins[j],
                                            Laux, -1.f, 0.1f, 20);
            if (scales[j] > max_scale) max_scale = scales[j];
            if (mins[j] > max_min) max_min = mins[j];
        }

        const float inv_scale = max_scale > 0 ? 63.f / max_scale : 0.f;
        const float inv_min = max_min > 0 ? 63.f / max_min : 0.f;
        memset(y[i].scales, 0, sizeof y[i].scales);
        for (int j = 0; j < KP_QK_K / 32; j++) {
            uint8_t ls = (uint8_t)kp_nearest_int(inv_scale * scales[j]);
            uint8_t lm = (uint8_t)kp_nearest_int(inv_min * mins[j]);
            ls = (uint8_t)kp_imin(63, ls);
            lm = (uint8_t)kp_imin(63, lm);
            if (j < 4) {
                y[i].scales[j] = ls;
                y[i].scales[j + 4] = lm;
            } else {
                y[i].scales[j + 4] = (uint8_t)((ls & 0xF) | ((lm & 0xF) << 4));
                y[i].scales[j - 4] |= (uint8_t)((ls >> 4) << 6);
                y[i].scales[j - 0] |= (uint8_t)((lm >> 4) << 6);
            }
        }
        y[i].d = KP_F2H(max_scale / 63.f);
        y[i].dmin = KP_F2H(max_min / 63.f);

        /* requantise against the scales as stored (6-bit, fp16) */
        for (int j = 0; j < KP_QK_K / 32; j++) {
            uint8_t sc, m;
            kp_q4k_scale_min(j, y[i].scales, &sc, &m);
            const float d = KP_H2F(y[i].d) * sc;
            if (!d) continue;
            const float dm = KP_H2F(y[i].dmin) * m;
            for (int ii = 0; ii < 32; ii++) {
                const int l = kp_nearest_int((x[32 * j + ii] + dm) / d);
                L[32 * j + ii] = (uint8_t)kp_imax(0, kp_imin(15, l));
            }
        }

        uint8_t *q = y[i].qs;
        for (int j = 0; j < KP_QK_K; j += 64) {
            for (int l = 0; l < 32; l++) q[l] = (uint8_t)(L[j + l] | (L[j + l + 32] << 4));
            q += 32;
        }
    }
}

/* ggml's make_qx_quants with rmse_type 1 (weights x^2) and no importance:
 * symmetric quantisation to -nmax..nmax-1, searching 19 scales. Returns the
 * scale (L is written, but q6_K recomputes it). */
static float kp_make_qx_quants(int n, int nmax, const float *x, int8_t *L) {
    float max = 0, amax = 0;
    for (int i = 0; i < n; i++) {
        const float ax = fabsf(x[i]);
        if (ax > amax) {
            amax = ax;
            max = x[i];
        }
    }
    if (amax < KP_GROUP_MAX_EPS) {
        for (int i = 0; i < n; i++) L[i] = 0;
        return 0.f;
    }
    float iscale = -nmax / max;
    float sumlx = 0, suml2 = 0;
    for (int i = 0; i < n; i++) {
        int l = kp_nearest_int(iscale * x[i]);
        l = kp_imax(-nmax, kp_imin(nmax - 1, l));
        L[i] = (int8_t)(l + nmax);
        const float w = x[i] * x[i];
        sumlx += w * x[i] * l;
        suml2 += w * l * l;
    }
    float scale = suml2 ? sumlx / suml2 : 0.0f;
    float best = scale * sumlx;
    for (int is = -9; is <= 9; is++) {
        if (is == 0) continue;
        iscale = -(nmax + 0.1f * is) / max;
        sumlx = suml2 = 0;
        for (int i = 0; i < n; i++) {
            int l = kp_nearest_int(iscale * x[i]);
            l = kp_imax(-nmax, kp_imin(nmax - 1, l));
            const float w = x[i] * x[i];
            sumlx += w * x[i] * l;
            suml2 += w * l * l;
        }
        if (suml2 > 0 && sumlx * sumlx > best * suml2) {
            for (int i = 0; i < n; i++) {
                const int l = kp_nearest_int(iscale * x[i]);
                L[i] = (int8_t)(nmax + kp_imax(-nmax, kp_imin(nmax - 1, l)));
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    return scale;
}

static void kp_quant_q6_K(const float *x, kp_block_q6_K *y, int64_t nb) {
    int8_t L[KP_QK_K];
    float scales[KP_QK_K / 16];

    for (int64_t i = 0; i < nb; i++, x += KP_QK_K) {
        float max_scale = 0, max_abs_scale = 0;
        for (int ib = 0; ib < KP_QK_K / 16; ib++) {
            const float scale = kp_make_qx_quants(16, 32, x + 16 * ib, L + 16 * ib);
            scales[ib] = scale;
            if (fabsf(scale) > max_abs_scale) {
                max_abs_scale = fabsf(scale);
                max_scale = scale;
            }
        }
        if (max_abs_scale < KP_GROUP_MAX_EPS) {
            memset(&y[i], 0, sizeof y[i]);
            y[i].d = KP_F2H(0.f);
            continue;
        }

        const float iscale = -128.f / max_scale;
        y[i].d = KP_F2H(1 / iscale);
        for (int ib = 0; ib < KP_QK_K / 16; ib++)
            y[i].scales[ib] = (int8_t)kp_imin(127, kp_nearest_int(iscale * scales[ib]));

        for (int j = 0; j < KP_QK_K / 16; j++) {
            const float d = KP_H2F(y[i].d) * y[i].scales[j];
            if (!d) continue;
            for (int ii = 0; ii < 16; ii++) {
                int l = kp_nearest_int(x[16 * j + ii] / d);
                l = kp_imax(-32, kp_imin(31, l));
                L[16 * j + ii] = (int8_t)(l + 32);
            }
        }

        uint8_t *ql = y[i].ql, *qh = y[i].qh;
        for (int j = 0; j < KP_QK_K; j += 128) {
            for (int l = 0; l < 32; l++) {
                const uint8_t q1 = L[j + l + 0] & 0xF;
                const uint8_t q2 = L[j + l + 32] & 0xF;
                const uint8_t q3 = L[j + l + 64] & 0xF;
                const uint8_t q4 = L[j + l + 96] & 0xF;
                ql[l + 0] = (uint8_t)(q1 | (q3 << 4));
                ql[l + 32] = (uint8_t)(q2 | (q4 << 4));
                qh[l] = (uint8_t)((L[j + l] >> 4) | ((L[j + l + 32] >> 4) << 2) |
                                  ((L[j + l + 64] >> 4) << 4) | ((L[j + l + 96] >> 4) << 6));
            }
            ql += 64;
            qh += 32;
        }
    }
}

void kp_quant_q8_K_scalar(const float *x, kp_block_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK_K) {
        /* max: the first value of largest magnitude, with its sign */
        float max = 0, amax = 0;
        for (int j = 0; j < KP_QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
        if (!amax) {
            /* ggml leaves bsums untouched here; zero is what they sum to */
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < KP_QK_K; j++) {
            const int v = kp_nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)kp_imin(127, v);
        }
        for (int j = 0; j < KP_QK_K / 16; j++) {
            int sum = 0;
            for (int ii = 0; ii < 16; ii++) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = (int16_t)sum;
        }
        y[i].d = 1 / iscale;
    }
}

static int kp_quant_row_impl(int type, const float *src, void *dst, int64_t n, int act) {
    const int bs = kp_type_block(type);
    if (bs == 0 || n < 0 || n % bs != 0) return KP_EINVAL;
    const int64_t nb = n / bs;
    switch (type) {
    case KP_TYPE_F32: memmove(dst, src, (size_t)n * sizeof(float)); return 0;
    case KP_TYPE_F16: kp_f32_to_f16_row(src, dst, n); return 0;
    case KP_TYPE_BF16: kp_f32_to_bf16_row(src, dst, n); return 0;
    case KP_TYPE_Q8_0:
        if (act)
            kp_quant_q8_0_act(src, dst, nb);
        else
            kp_quant_q8_0(src, dst, nb);
        return 0;
    case KP_TYPE_Q4_0: kp_quant_q4_0(src, dst, nb); return 0;
    case KP_TYPE_Q4_K: kp_quant_q4_K(src, dst, nb); return 0;
    case KP_TYPE_Q6_K: kp_quant_q6_K(src, dst, nb); return 0;
    case KP_TYPE_Q8_K: kp_quant_q8_K(src, dst, nb); return 0;
    default: return KP_EUNSUP;
    }
}

int kp_quant_row(int type, const float *src, void *dst, int64_t n) {
    return kp_quant_row_impl(type, src, dst, n, 0);
}

int kp_quant_row_act(int type, const float *src, void *dst, int64_t n) {
    return kp_quant_row_impl(type, src, dst, n, 1);
}

/* ---- dot products: scalar reference (ggml's generic C) ---------------------- */

static float kp_dot_f32_ref(int64_t n, const void *vw, const void *vx) {
    const float *w = vw, *x = vx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(w[i] * x[i]);
    return (float)sum;
}

static float kp_dot_f16_ref(int64_t n, const void *vw, const void *vx) {
    const uint16_t *w = vw, *x = vx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(KP_H2F(w[i]) * KP_H2F(x[i]));
    return (float)sum;
}

static float kp_dot_bf16_ref(int64_t n, const void *vw, const void *vx) {
    const uint16_t *w = vw, *x = vx;
    double sum = 0.0;
    for (int64_t i = 0; i < n; i++) sum += (double)(kp_bf16_to_f32(w[i]) * kp_bf16_to_f32(x[i]));
    return (float)sum;
}

static float kp_dot_q8_0_ref(int64_t n, const void *vw, const void *vx) {
    const kp_block_q8_0 *w = vw, *x = vx;
    float sumf = 0;
    for (int64_t ib = 0; ib < n / KP_QK8_0; ib++) {
        int sumi = 0;
        for (int j = 0; j < KP_QK8_0; j++) sumi += w[ib].qs[j] * x[ib].qs[j];
        sumf += sumi * (KP_H2F(w[ib].d) * KP_H2F(x[ib].d));
    }
    return sumf;
}

static float kp_dot_q4_0_ref(int64_t n, const void *vw, const void *vx) {
    const kp_block_q4_0 *w = vw;
    const kp_block_q8_0 *x = vx;
    float sumf = 0;
    for (int64_t ib = 0; ib < n / KP_QK4_0; ib++) {
        /* one accumulator: the two-accumulator form of ggml's loop is
         * miscompiled by GCC 12's -O2 vectorizer (wrong sums; -O3 and
         * -fno-tree-vectorize are right). Integer sums: the same result. */
        int sumi = 0;
        for (int j = 0; j < KP_QK4_0 / 2; j++) {
            const int v0 = (w[ib].qs[j] & 0x0F) - 8;
            const int v1 = (w[ib].qs[j] >> 4) - 8;
            sumi += v0 * x[ib].qs[j] + v1 * x[ib].qs[j + KP_QK4_0 / 2];
        }
        sumf += sumi * KP_H2F(w[ib].d) * KP_H2F(x[ib].d);
    }
    return sumf;
}

/* q4_K . q8_K: integer products per 8-lane group with the 6-bit scales; the
 * mins term uses the q8_K block sums (sum_j min_j * sum of x in sub-block j). */
static float kp_dot_q4_K_ref(int64_t n, const void *vw, const void *vx) {
    const kp_block_q4_K *w = vw;
    const kp_block_q8_K *x = vx;
    int8_t aux8[KP_QK_K];
    int16_t aux16[8];
    int32_t aux32[8];
    float sums[8] = {0};
    float sumf = 0;
    for (int64_t i = 0; i < n / KP_QK_K; i++) {
        const uint8_t *q4 = w[i].qs;
        const int8_t *q8 = x[i].qs;
        memset(aux32, 0, sizeof aux32);
        int8_t *a = aux8;
        for (int j = 0; j < KP_QK_K / 64; j++) {
            for (int l = 0; l < 32; l++) a[l] = (int8_t)(q4[l] & 0xF);
            a += 32;
            for (int l = 0; l < 32; l++) a[l] = (int8_t)(q4[l] >> 4);
            a += 32;
            q4 += 32;
        }
        uint8_t sm[16]; /* scales 0..7, mins 8..15 */
        kp_q4k_unpack_scales(w[i].scales, sm);
        int sumi = 0;
        for (int j = 0; j < KP_QK_K / 16; j++) sumi += x[i].bsums[j] * sm[8 + j / 2];
        a = aux8;
        for (int j = 0; j < KP_QK_K / 32; j++) {
            const int32_t scale = sm[j];
            for (int k = 0; k < 4; k++) {
                for (int l = 0; l < 8; l++) aux16[l] = (int16_t)(q8[l] * a[l]);
                for (int l = 0; l < 8; l++) aux32[l] += scale * aux16[l];
                q8 += 8;
                a += 8;
            }
        }
        const float d = KP_H2F(w[i].d) * x[i].d;
        for (int l = 0; l < 8; l++) sums[l] += d * aux32[l];
        const float dmin = KP_H2F(w[i].dmin) * x[i].d;
        sumf -= dmin * sumi;
    }
    for (int l = 0; l < 8; l++) sumf += sums[l];
    return sumf;
}

static float kp_dot_q6_K_ref(int64_t n, const void *vw, const void *vx) {
    const kp_block_q6_K *w = vw;
    const kp_block_q8_K *x = vx;
    int8_t aux8[KP_QK_K];
    int16_t aux16[8];
    int32_t aux32[8];
    float sums[8] = {0};
    float sumf = 0;
    for (int64_t i = 0; i < n / KP_QK_K; i++) {
        const uint8_t *q4 = w[i].ql;
        const uint8_t *qh = w[i].qh;
        const int8_t *q8 = x[i].qs;
        memset(aux32, 0, sizeof aux32);
        int8_t *a = aux8;
        for (int j = 0; j < KP_QK_K; j += 128) {
            for (int l = 0; l < 32; l++) {
                a[l + 0] = (int8_t)((q4[l + 0] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                a[l + 32] = (int8_t)((q4[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                a[l + 64] = (int8_t)((q4[l + 0] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                a[l + 96] = (int8_t)((q4[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            }
            a += 128;
            q4 += 64;
            qh += 32;
        }
        a = aux8;
        for (int j = 0; j < KP_QK_K / 16; j++) {
            const int scale = w[i].scales[j];
            for (int k = 0; k < 2; k++) {
                for (int l = 0; l < 8; l++) aux16[l] = (int16_t)(q8[l] * a[l]);
                for (int l = 0; l < 8; l++) aux32[l] += scale * aux16[l];
                q8 += 8;
                a += 8;
            }
        }
        const float d = KP_H2F(w[i].d) * x[i].d;
        for (int l = 0; l < 8; l++) sums[l] += d * aux32[l];
    }
    for (int l = 0; l < 8; l++) sumf += sums[l];
    return sumf;
}

/* ---- dispatch ------------------------------------------------------------- */

int kp_vec_dot_type(int wtype) {
    switch (wtype) {
    case KP_TYPE_F32: return KP_TYPE_F32;
    case KP_TYPE_F16: return KP_TYPE_F16;
    case KP_TYPE_BF16: return KP_TYPE_BF16;
    case KP_TYPE_Q8_0:
    case KP_TYPE_Q4_0: return KP_TYPE_Q8_0;
    case KP_TYPE_Q4_K:
    case KP_TYPE_Q6_K: return KP_TYPE_Q8_K;
    default: return -1;
    }
}

kp_dot_fn kp_dot_ref_fn(int wtype) {
    switch (wtype) {
    case KP_TYPE_F32: return kp_dot_f32_ref;
    case KP_TYPE_F16: return kp_dot_f16_ref;
    case KP_TYPE_BF16: return kp_dot_bf16_ref;
    case KP_TYPE_Q8_0: return kp_dot_q8_0_ref;
    case KP_TYPE_Q4_0: return kp_dot_q4_0_ref;
    case KP_TYPE_Q4_K: return kp_dot_q4_K_ref;
    case KP_TYPE_Q6_K: return kp_dot_q6_K_ref;
    default: return NULL;
    }
}

float kp_vec_dot_ref(int wtype, int64_t n, const void *w_row, const void *x_row) {
    kp_dot_fn f = kp_dot_ref_fn(wtype);
    assert(f && n % kp_type_block(wtype) == 0);
    return f ? f(n, w_row, x_row) : 0.0f;
}
