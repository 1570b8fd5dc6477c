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
 *     too, bit-identical to the scalar reference code kept beside them.
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

#include "kernels/kp.h"

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KP_QUANT_AVX2 1
#endif
#if defined(KP_QUANT_AVX2) && defined(__AVX512F__)
#define KP_QUANT_AVX512 1
#endif

#define KP_GROUP_MAX_EPS 1e-15f
#define KP_AI static inline __attribute__((always_inline))

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

/* fp16 -> f32 inlined here (kp_fp16_to_f32 lives in another file and a call
 * per block would spill every vector register in the dot products). */
static inline float kp_h2f(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return kp_fp16_to_f32(h);
#endif
}

#define KP_H2F(h) kp_h2f(h)
#define KP_F2H(f) kp_f32_to_fp16(f)

/* Q4_K: 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes.
 * Sub-blocks 0-3: low 6 bits of q[j] (scale) and q[j+4] (min). Sub-blocks
 * 4-7: low/high nibble of q[j+4] plus the top 2 bits of q[j-4] / q[j]. */
static inline void kp_q4k_scale_min(int j, const uint8_t *q, uint8_t *sc, uint8_t *m) {
    if (j < 4) {
        *sc = q[j] & 63;
        *m = q[j + 4] & 63;
    } else {
        *sc = (uint8_t)((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
        *m = (uint8_t)((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
    }
}

/* All eight scales and mins at once: out[0..7] = scales, out[8..15] = mins. */
static inline void kp_q4k_unpack_scales(const uint8_t *q, uint8_t out[16]) {
    for (int j = 0; j < 8; j++) kp_q4k_scale_min(j, q, &out[j], &out[8 + j]);
}

/* ---- row conversions (f16 / bf16) ----------------------------------------- */

void kp_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#if defined(KP_QUANT_AVX512)
    for (; i + 16 <= n; i += 16) {
        __m256i h = _mm512_cvtps_ph(_mm512_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm256_storeu_si256((__m256i *)(dst + i), h);
    }
#endif
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8) {
        __m128i h = _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT);
        _mm_storeu_si128((__m128i *)(dst + i), h);
    }
#endif
    for (; i < n; i++) dst[i] = kp_f32_to_fp16(src[i]);
}

void kp_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(KP_QUANT_AVX512)
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(dst + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(src + i))));
#endif
#if defined(__F16C__)
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + i))));
#endif
    for (; i < n; i++) dst[i] = kp_fp16_to_f32(src[i]);
}

void kp_f32_to_bf16_row(const float *src, uint16_t *dst, int64_t n) {
    int64_t i = 0;
#if defined(KP_QUANT_AVX2)
    /* Same integer formula as kp_f32_to_bf16 (not the AVX512-BF16
     * instruction, which flushes subnormals). */
    const __m256i one = _mm256_set1_epi32(1), bias = _mm256_set1_epi32(0x7fff);
    const __m256i absmask = _mm256_set1_epi32(0x7fffffff), inf = _mm256_set1_epi32(0x7f800000);
    const __m256i quiet = _mm256_set1_epi32(64);
    for (; i + 16 <= n; i += 16) {
        __m256i r[2];
        for (int k = 0; k < 2; k++) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(src + i + 8 * k));
            __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(x, 16), one);
            __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(x, _mm256_add_epi32(bias, lsb)), 16);
            __m256i nan = _mm256_or_si256(_mm256_srli_epi32(x, 16), quiet);
            __m256i isnan = _mm256_cmpgt_epi32(_mm256_and_si256(x, absmask), inf);
            r[k] = _mm256_blendv_epi8(rounded, nan, isnan);
        }
        /* packus works per 128-bit lane: fix the order with a 64-bit permute */
        __m256i p = _mm256_packus_epi32(r[0], r[1]);
        p = _mm256_permute4x64_epi64(p, _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)(dst + i), p);
    }
#endif
    for (; i < n; i++) dst[i] = kp_f32_to_bf16(src[i]);
}

void kp_bf16_to_f32_row(const uint16_t *src, float *dst, int64_t n) {
    int64_t i = 0;
#if defined(KP_QUANT_AVX2)
    for (; i + 8 <= n; i += 8) {
        __m256i x = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(src + i)));
        _mm256_storeu_si256((__m256i *)(dst + i), _mm256_slli_epi32(x, 16));
    }
#endif
    for (; i < n; i++) dst[i] = kp_bf16_to_f32(src[i]);
}

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

#if defined(KP_QUANT_AVX2)
/* Max |x| over 32 floats, and the 4 vectors loaded. */
KP_AI float kp_amax32(const float *x, __m256 v[4]) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    return _mm_cvtss_f32(m4);
}

/* 4 vectors of 8 int32 (elements 0..31, values in int8 range) -> 32 int8 in
 * element order (the packs work per 128-bit lane; the permute undoes it). */
KP_AI __m256i kp_pack32_i8(const __m256i q[4]) {
    const __m256i ab = _mm256_packs_epi32(q[0], q[1]), cd = _mm256_packs_epi32(q[2], q[3]);
    return _mm256_permutevar8x32_epi32(_mm256_packs_epi16(ab, cd), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}

/* C roundf (ties away from zero) on 8 floats, exactly: truncate, then step
 * away from zero when the (exact) remainder is >= 0.5 in magnitude. */
KP_AI __m256 kp_roundf8(__m256 v) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    const __m256 t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
    const __m256 frac = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
    const __m256 step = _mm256_or_ps(_mm256_and_ps(v, sign), _mm256_set1_ps(1.0f)); /* +-1 */
    return _mm256_add_ps(t, _mm256_and_ps(_mm256_cmp_ps(frac, _mm256_set1_ps(0.5f), _CMP_GE_OQ), step));
}
#endif

static void kp_quant_q8_0(const float *x, kp_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
#if defined(KP_QUANT_AVX2)
        __m256 v[4];
        const float amax = kp_amax32(x, v);
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = KP_F2H(d);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvttps_epi32(kp_roundf8(_mm256_mul_ps(v[k], _mm256_set1_ps(id))));
        _mm256_storeu_si256((__m256i *)y[i].qs, kp_pack32_i8(q));
#else
        float amax = 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = KP_F2H(d);
        for (int j = 0; j < KP_QK8_0; j++) y[i].qs[j] = (int8_t)roundf(x[j] * id);
#endif
    }
}

/* llama.cpp's x86 quantize_row_q8_0 (AVX): multiplier 127/amax, ties to even. */
static void kp_quant_q8_0_act(const float *x, kp_block_q8_0 *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
#if defined(KP_QUANT_AVX2)
        __m256 v[4];
        const float amax = kp_amax32(x, v);
        y[i].d = KP_F2H(amax / 127.f);
        const __m256 mul = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], mul),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm256_storeu_si256((__m256i *)y[i].qs, kp_pack32_i8(q));
#else
        float amax = 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) amax = fmaxf(amax, fabsf(x[j]));
        y[i].d = KP_F2H(amax / 127.f);
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        for (int j = 0; j < KP_QK8_0; j++) y[i].qs[j] = (int8_t)kp_nearest_int(x[j] * id);
#endif
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

static void kp_quant_q8_K(const float *x, kp_block_q8_K *y, int64_t nb) {
    for (int64_t i = 0; i < nb; i++, x += KP_QK_K) {
        /* max: the first value of largest magnitude, with its sign */
        float max = 0, amax = 0;
#if defined(KP_QUANT_AVX2)
        __m256 v[4];
        for (int c = 0; c < KP_QK_K / 32; c++) amax = fmaxf(amax, kp_amax32(x + 32 * c, v));
        if (amax) {
            const __m256 sign = _mm256_set1_ps(-0.0f), am = _mm256_set1_ps(amax);
            for (int k = 0; k < KP_QK_K / 8; k++) {
                const int mask = _mm256_movemask_ps(
                    _mm256_cmp_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + 8 * k)), am, _CMP_EQ_OQ));
                if (mask) {
                    max = x[8 * k + __builtin_ctz((unsigned)mask)];
                    break;
                }
            }
        }
#else
        for (int j = 0; j < KP_QK_K; j++) {
            const float ax = fabsf(x[j]);
            if (ax > amax) {
                amax = ax;
                max = x[j];
            }
        }
#endif
        if (!amax) {
            /* ggml leaves bsums untouched here; zero is what they sum to */
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
#if defined(KP_QUANT_AVX2)
        /* nearest_int == conversion in the default round-to-nearest-even mode */
        const __m256 is = _mm256_set1_ps(iscale);
        const __m256i top = _mm256_set1_epi32(127), ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
        __m256i sums[8]; /* per 32 elements: 4 lanes of 4-sums for each 16 */
        for (int c = 0; c < KP_QK_K / 32; c++) {
            __m256i q[4];
            for (int k = 0; k < 4; k++)
                q[k] = _mm256_min_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 32 * c + 8 * k), is)), top);
            const __m256i b = kp_pack32_i8(q);
            _mm256_storeu_si256((__m256i *)(y[i].qs + 32 * c), b);
            /* lanes 0-3: 4-sums of bytes 0..15, lanes 4-7: of bytes 16..31
             * (sign trick: |b| * sign(1, b) = b) */
            sums[c] = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, b), ones16);
        }
        /* reduce 4-sums to 16-sums: after two hadds lane l of chunk group g
         * holds bsums[2*(4g+l)] (l < 4) or bsums[2*(4g+l-4)+1]; permute back */
        const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        __m256i bs[2];
        for (int g = 0; g < 2; g++) {
            const __m256i h01 = _mm256_hadd_epi32(sums[4 * g + 0], sums[4 * g + 1]);
            const __m256i h23 = _mm256_hadd_epi32(sums[4 * g + 2], sums[4 * g + 3]);
            bs[g] = _mm256_permutevar8x32_epi32(_mm256_hadd_epi32(h01, h23), perm);
        }
        const __m256i b16 = _mm256_permute4x64_epi64(_mm256_packs_epi32(bs[0], bs[1]), _MM_SHUFFLE(3, 1, 2, 0));
        _mm256_storeu_si256((__m256i *)y[i].bsums, b16);
#else
        for (int j = 0; j < KP_QK_K; j++) {
            const int v = kp_nearest_int(iscale * x[j]);
            y[i].qs[j] = (int8_t)kp_imin(127, v);
        }
        for (int j = 0; j < KP_QK_K / 16; j++) {
            int sum = 0;
            for (int ii = 0; ii < 16; ii++) sum += y[i].qs[j * 16 + ii];
            y[i].bsums[j] = (int16_t)sum;
        }
#endif
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

typedef float (*kp_dot_fn)(int64_t n, const void *w, const void *x);

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
        int sumi0 = 0, sumi1 = 0;
        for (int j = 0; j < KP_QK4_0 / 2; j++) {
            const int v0 = (w[ib].qs[j] & 0x0F) - 8;
            const int v1 = (w[ib].qs[j] >> 4) - 8;
            sumi0 += v0 * x[ib].qs[j];
            sumi1 += v1 * x[ib].qs[j + KP_QK4_0 / 2];
        }
        const int sumi = sumi0 + sumi1;
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

/* ---- dot products: AVX2 / AVX-512 ----------------------------------------- */

#if defined(KP_QUANT_AVX2)

/* Each SIMD kernel is written once, for one weight row against NX (1..4)
 * activation rows x + j*xs, results to out[j*os]. NX is a constant at every
 * call site, so the per-x loops unroll; the weights are loaded and unpacked
 * once per block for all NX rows. With NX = 1 it is the plain dot product, and
 * for any NX each result is bit-identical to it (same operations, same
 * order, per activation row). */
#define KP_NX_MAX 4

static inline float kp_hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

/* 8 int32 lanes: lane k = sum of u[4k..4k+3] * s[4k..4k+3], u unsigned
 * bytes, s signed bytes (without VNNI the products are pairwise-summed in
 * int16 first: callers keep |u*s| pairs below 32767). */
KP_AI __m256i kp_dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* ---- float types ---- */

#if defined(KP_QUANT_AVX512)
#define KP_FV __m512
#define KP_FW 16
#define KP_FZERO() _mm512_setzero_ps()
#define KP_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define KP_FADD(a, b) _mm512_add_ps(a, b)
#define KP_FHSUM(v) _mm512_reduce_add_ps(v)
#define KP_LD_F32(p) _mm512_loadu_ps(p)
#define KP_LD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define KP_LD_BF16(p) \
    _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#else
#define KP_FV __m256
#define KP_FW 8
#define KP_FZERO() _mm256_setzero_ps()
#define KP_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define KP_FADD(a, b) _mm256_add_ps(a, b)
#define KP_FHSUM(v) kp_hsum8(v)
#define KP_LD_F32(p) _mm256_loadu_ps(p)
#define KP_LD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define KP_LD_BF16(p) \
    _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#endif

/* f32: four vector accumulators per x row, summed in float. */
KP_AI void kp_dotk_f32(int64_t n, const void *vw, const uint8_t *x, size_t xs, float *out, size_t os,
                       const int NX) {
    const float *w = vw;
    KP_FV acc[KP_NX_MAX][4];
    for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = KP_FZERO();
    int64_t i = 0;
    for (; i + 4 * KP_FW <= n; i += 4 * KP_FW) {
        KP_FV wv[4];
        for (int k = 0; k < 4; k++) wv[k] = KP_LD_F32(w + i + k * KP_FW);
        for (int j = 0; j < NX; j++) {
            const float *xj = (const float *)(x + j * xs);
            for (int k = 0; k < 4; k++) acc[j][k] = KP_FMA(wv[k], KP_LD_F32(xj + i + k * KP_FW), acc[j][k]);
        }
    }
    for (; i + KP_FW <= n; i += KP_FW) {
        const KP_FV wv = KP_LD_F32(w + i);
        for (int j = 0; j < NX; j++) acc[j][0] = KP_FMA(wv, KP_LD_F32((const float *)(x + j * xs) + i), acc[j][0]);
    }
    for (int j = 0; j < NX; j++) {
        const float *xj = (const float *)(x + j * xs);
        float sumf = KP_FHSUM(KP_FADD(KP_FADD(acc[j][0], acc[j][1]), KP_FADD(acc[j][2], acc[j][3])));
        for (int64_t t = i; t < n; t++) sumf += w[t] * xj[t];
        out[j * os] = sumf;
    }
}

/* f16 and bf16: products of two 16-bit floats are exact in f32, so fused
 * multiply-add and multiply-then-add agree; lanes are summed in float and the
 * total (with the tail) in double, as ggml_vec_dot_f16 does. */
#define KP_DEF_DOTK_HALF(NAME, LD, CVT)                                                                \
    KP_AI void NAME(int64_t n, const void *vw, const uint8_t *x, size_t xs, float *out, size_t os,      \
                    const int NX) {                                                                     \
        const uint16_t *w = vw;                                                                         \
        KP_FV acc[KP_NX_MAX][4];                                                                        \
        for (int j = 0; j < NX; j++) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = KP_FZERO();        \
        int64_t i = 0;                                                                                  \
        for (; i + 4 * KP_FW <= n; i += 4 * KP_FW) {                                                    \
            KP_FV wv[4];                                                                                \
            for (int k = 0; k < 4; k++) wv[k] = LD(w + i + k * KP_FW);                                  \
            for (int j = 0; j < NX; j++) {                                                              \
                const uint16_t *xj = (const uint16_t *)(x + j * xs);                                    \
                for (int k = 0; k < 4; k++) acc[j][k] = KP_FMA(wv[k], LD(xj + i + k * KP_FW), acc[j][k]); \
            }                                                                                           \
        }                                                                                               \
        for (; i + KP_FW <= n; i += KP_FW) {                                                            \
            const KP_FV wv = LD(w + i);                                                                 \
            for (int j = 0; j < NX; j++)                                                                \
                acc[j][0] = KP_FMA(wv, LD((const uint16_t *)(x + j * xs) + i), acc[j][0]);              \
        }                                                                                               \
        for (int j = 0; j < NX; j++) {                                                                  \
            const uint16_t *xj = (const uint16_t *)(x + j * xs);                                        \
            double sum = KP_FHSUM(KP_FADD(KP_FADD(acc[j][0], acc[j][1]), KP_FADD(acc[j][2], acc[j][3]))); \
            for (int64_t t = i; t < n; t++) sum += (double)(CVT(w[t]) * CVT(xj[t]));                    \
            out[j * os] = (float)sum;                                                                   \
        }                                                                                               \
    }

KP_DEF_DOTK_HALF(kp_dotk_f16, KP_LD_F16, kp_h2f)
KP_DEF_DOTK_HALF(kp_dotk_bf16, KP_LD_BF16, kp_bf16_to_f32)

/* ---- Q8_0 / Q4_0 weights . Q8_0 activations ---- */

/* Per block: 8 int32 lanes of exact partial sums, times d_w*d_x, into one of
 * two float accumulators (even / odd blocks). Signed x signed bytes use the
 * sign trick: |w| (unsigned) times x with w's sign (|values| <= 127). */
#define KP_DEF_DOTK_Q8_0(NAME, WBLOCK, WBYTES)                                                          \
    KP_AI void NAME(int64_t n, const void *vw, const uint8_t *x, size_t xs, float *out, size_t os,      \
                    const int NX) {                                                                     \
        const WBLOCK *w = vw;                                                                           \
        const int64_t nb = n / KP_QK8_0;                                                                \
        __m256 acc0[KP_NX_MAX], acc1[KP_NX_MAX];                                                        \
        for (int j = 0; j < NX; j++) acc0[j] = acc1[j] = _mm256_setzero_ps();                           \
        int64_t ib = 0;                                                                                 \
        for (; ib + 2 <= nb; ib += 2) {                                                                 \
            const __m256i qw0 = WBYTES(w[ib].qs), qw1 = WBYTES(w[ib + 1].qs);                           \
            const __m256i aw0 = _mm256_sign_epi8(qw0, qw0), aw1 = _mm256_sign_epi8(qw1, qw1);           \
            const float dw0 = KP_H2F(w[ib].d), dw1 = KP_H2F(w[ib + 1].d);                               \
            for (int j = 0; j < NX; j++) {                                                              \
                const kp_block_q8_0 *xb = (const kp_block_q8_0 *)(x + j * xs) + ib;                     \
                const __m256i p0 =                                                                      \
                    kp_dot_u8s8(aw0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb[0].qs), qw0)); \
                const __m256i p1 =                                                                      \
                    kp_dot_u8s8(aw1, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb[1].qs), qw1)); \
                acc0[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw0 * KP_H2F(xb[0].d)), _mm256_cvtepi32_ps(p0), acc0[j]); \
                acc1[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw1 * KP_H2F(xb[1].d)), _mm256_cvtepi32_ps(p1), acc1[j]); \
            }                                                                                           \
        }                                                                                               \
        if (ib < nb) { /* odd block count: the last block goes to acc0 */                               \
            const __m256i qw0 = WBYTES(w[ib].qs);                                                       \
            const __m256i aw0 = _mm256_sign_epi8(qw0, qw0);                                             \
            const float dw0 = KP_H2F(w[ib].d);                                                          \
            for (int j = 0; j < NX; j++) {                                                              \
                const kp_block_q8_0 *xb = (const kp_block_q8_0 *)(x + j * xs) + ib;                     \
                const __m256i p0 =                                                                      \
                    kp_dot_u8s8(aw0, _mm256_sign_epi8(_mm256_loadu_si256((const __m256i *)xb[0].qs), qw0)); \
                acc0[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw0 * KP_H2F(xb[0].d)), _mm256_cvtepi32_ps(p0), acc0[j]); \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < NX; j++) out[j * os] = kp_hsum8(_mm256_add_ps(acc0[j], acc1[j]));           \
    }

KP_AI __m256i kp_q8_0_bytes(const int8_t *qs) { return _mm256_loadu_si256((const __m256i *)qs); }

/* 32 nibbles of a q4_0 block as bytes 0..15 (low nibbles, elements 0..15)
 * and 16..31 (high nibbles), offset to -8..7. */
KP_AI __m256i kp_q4_0_bytes(const uint8_t *qs) {
    const __m128i t = _mm_loadu_si128((const __m128i *)qs);
    const __m256i b = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
    return _mm256_sub_epi8(_mm256_and_si256(b, _mm256_set1_epi8(0xF)), _mm256_set1_epi8(8));
}

KP_DEF_DOTK_Q8_0(kp_dotk_q8_0, kp_block_q8_0, kp_q8_0_bytes)
KP_DEF_DOTK_Q8_0(kp_dotk_q4_0, kp_block_q4_0, kp_q4_0_bytes)

/* ---- Q4_K / Q6_K weights . Q8_K activations ---- */

KP_AI void kp_dotk_q4_K(int64_t n, const void *vw, const uint8_t *x, size_t xs, float *out, size_t os,
                        const int NX) {
    const kp_block_q4_K *w = vw;
    const int64_t nb = n / KP_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc[KP_NX_MAX];
    __m128 acc_m[KP_NX_MAX];
    for (int j = 0; j < NX; j++) {
        acc[j] = _mm256_setzero_ps();
        acc_m[j] = _mm_setzero_ps();
    }
    for (int64_t i = 0; i < nb; i++) {
        uint8_t sm[16]; /* scales 0..7, mins 8..15 */
        kp_q4k_unpack_scales(w[i].scales, sm);
        const __m128i mins = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i *)(sm + 8)));
        const float dw = KP_H2F(w[i].d), dminw = KP_H2F(w[i].dmin);
        __m256i sumi[KP_NX_MAX];
        for (int j = 0; j < NX; j++) {
            const kp_block_q8_K *xb = (const kp_block_q8_K *)(x + j * xs) + i;
            /* mins: sum_s min_s * (bsums[2s] + bsums[2s+1]) */
            const __m128i b0 = _mm_loadu_si128((const __m128i *)xb->bsums);
            const __m128i b1 = _mm_loadu_si128((const __m128i *)(xb->bsums + 8));
            const __m128i prod = _mm_madd_epi16(mins, _mm_hadd_epi16(b0, b1));
            acc_m[j] = _mm_fmadd_ps(_mm_set1_ps(-(dminw * xb->d)), _mm_cvtepi32_ps(prod), acc_m[j]);
            sumi[j] = _mm256_setzero_si256();
        }
        for (int c = 0; c < 4; c++) { /* 64-element chunks: sub-blocks 2c, 2c+1 */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(w[i].qs + 32 * c));
            const __m256i lo = _mm256_and_si256(q, m4);
            const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
            const __m256i s0 = _mm256_set1_epi16(sm[2 * c]), s1 = _mm256_set1_epi16(sm[2 * c + 1]);
            for (int j = 0; j < NX; j++) {
                const int8_t *q8 = ((const kp_block_q8_K *)(x + j * xs) + i)->qs + 64 * c;
                __m256i p0 = _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)q8)); /* <= 2*15*127 */
                __m256i p1 = _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(q8 + 32)));
                p0 = _mm256_madd_epi16(p0, s0);
                p1 = _mm256_madd_epi16(p1, s1);
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(p0, p1));
            }
        }
        for (int j = 0; j < NX; j++) {
            const float d = dw * ((const kp_block_q8_K *)(x + j * xs) + i)->d;
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) {
        __m128 m = _mm_add_ps(acc_m[j], _mm_movehl_ps(acc_m[j], acc_m[j]));
        m = _mm_add_ss(m, _mm_movehdup_ps(m));
        out[j * os] = kp_hsum8(acc[j]) + _mm_cvtss_f32(m);
    }
}

/* Byte shuffles picking Q6_K scales: mask k gives scale[2k] in bytes 0..7 and
 * scale[2k+1] in bytes 8..15. */
static const uint8_t kp_q6k_scale_shuf[8][16] = {
    {0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1},
    {2, 2, 2, 2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3},
    {4, 4, 4, 4, 4, 4, 4, 4, 5, 5, 5, 5, 5, 5, 5, 5},
    {6, 6, 6, 6, 6, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7},
    {8, 8, 8, 8, 8, 8, 8, 8, 9, 9, 9, 9, 9, 9, 9, 9},
    {10, 10, 10, 10, 10, 10, 10, 10, 11, 11, 11, 11, 11, 11, 11, 11},
    {12, 12, 12, 12, 12, 12, 12, 12, 13, 13, 13, 13, 13, 13, 13, 13},
    {14, 14, 14, 14, 14, 14, 14, 14, 15, 15, 15, 15, 15, 15, 15, 15},
};

/* q6_K . q8_K: the 6-bit values are used unsigned (0..63) and the -32 offset
 * is taken out once per block as 32 * sum_s scale_s * bsums_s. */
KP_AI void kp_dotk_q6_K(int64_t n, const void *vw, const uint8_t *x, size_t xs, float *out, size_t os,
                        const int NX) {
    const kp_block_q6_K *w = vw;
    const int64_t nb = n / KP_QK_K;
    const __m256i m4 = _mm256_set1_epi8(0xF), m3 = _mm256_set1_epi8(3), m30 = _mm256_set1_epi8(0x30);
    __m256 acc[KP_NX_MAX];
    for (int j = 0; j < NX; j++) acc[j] = _mm256_setzero_ps();
    for (int64_t i = 0; i < nb; i++) {
        const __m128i sc8 = _mm_loadu_si128((const __m128i *)w[i].scales);
        const __m256i sc16 = _mm256_cvtepi8_epi16(sc8);
        __m256i sumi[KP_NX_MAX];
        for (int j = 0; j < NX; j++) sumi[j] = _mm256_setzero_si256();
        for (int h = 0; h < 2; h++) { /* 128-element halves */
            const uint8_t *ql = w[i].ql + 64 * h;
            const __m256i qlA = _mm256_loadu_si256((const __m256i *)ql);
            const __m256i qlB = _mm256_loadu_si256((const __m256i *)(ql + 32));
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(w[i].qh + 32 * h));
            __m256i q[4], s[4];
            q[0] = _mm256_or_si256(_mm256_and_si256(qlA, m4), _mm256_slli_epi16(_mm256_and_si256(qh, m3), 4));
            q[1] = _mm256_or_si256(_mm256_and_si256(qlB, m4), _mm256_and_si256(_mm256_slli_epi16(qh, 2), m30));
            q[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlA, 4), m4), _mm256_and_si256(qh, m30));
            q[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(qlB, 4), m4),
                                   _mm256_and_si256(_mm256_srli_epi16(qh, 2), m30));
            for (int k = 0; k < 4; k++)
                s[k] = _mm256_cvtepi8_epi16(
                    _mm_shuffle_epi8(sc8, _mm_loadu_si128((const __m128i *)kp_q6k_scale_shuf[4 * h + k])));
            for (int j = 0; j < NX; j++) {
                const int8_t *q8 = ((const kp_block_q8_K *)(x + j * xs) + i)->qs + 128 * h;
                for (int k = 0; k < 4; k++) {
                    const __m256i p = /* |pair| <= 2*63*127 */
                        _mm256_maddubs_epi16(q[k], _mm256_loadu_si256((const __m256i *)(q8 + 32 * k)));
                    sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(p, s[k]));
                }
            }
        }
        const float dw = KP_H2F(w[i].d);
        for (int j = 0; j < NX; j++) {
            const kp_block_q8_K *xb = (const kp_block_q8_K *)(x + j * xs) + i;
            /* offset term: 32 * sum_s scale_s * bsums_s */
            const __m256i corr =
                _mm256_slli_epi32(_mm256_madd_epi16(sc16, _mm256_loadu_si256((const __m256i *)xb->bsums)), 5);
            const __m256i t = _mm256_sub_epi32(sumi[j], corr);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dw * xb->d), _mm256_cvtepi32_ps(t), acc[j]);
        }
    }
    for (int j = 0; j < NX; j++) out[j * os] = kp_hsum8(acc[j]);
}

/* Instantiations: kp_dot_T_simd (one x row) and kp_dotn_T[NX-1]. */
typedef void (*kp_dotn_fn)(int64_t n, const void *w, const uint8_t *x, size_t xs, float *out, size_t os);

#define KP_INSTANTIATE(T)                                                                                  \
    static float kp_dot_##T##_simd(int64_t n, const void *w, const void *x) {                            \
        float r;                                                                                           \
        kp_dotk_##T(n, w, x, 0, &r, 0, 1);                                                                 \
        return r;                                                                                          \
    }                                                                                                      \
    static void kp_dot_##T##_n1(int64_t n, const void *w, const uint8_t *x, size_t xs, float *o, size_t os) { \
        kp_dotk_##T(n, w, x, xs, o, os, 1);                                                                \
    }                                                                                                      \
    static void kp_dot_##T##_n2(int64_t n, const void *w, const uint8_t *x, size_t xs, float *o, size_t os) { \
        kp_dotk_##T(n, w, x, xs, o, os, 2);                                                                \
    }                                                                                                      \
    static void kp_dot_##T##_n3(int64_t n, const void *w, const uint8_t *x, size_t xs, float *o, size_t os) { \
        kp_dotk_##T(n, w, x, xs, o, os, 3);                                                                \
    }                                                                                                      \
    static void kp_dot_##T##_n4(int64_t n, const void *w, const uint8_t *x, size_t xs, float *o, size_t os) { \
        kp_dotk_##T(n, w, x, xs, o, os, 4);                                                                \
    }                                                                                                      \
    static const kp_dotn_fn kp_dotn_##T[KP_NX_MAX] = {kp_dot_##T##_n1, kp_dot_##T##_n2, kp_dot_##T##_n3,  \
                                                      kp_dot_##T##_n4};

KP_INSTANTIATE(f32)
KP_INSTANTIATE(f16)
KP_INSTANTIATE(bf16)
KP_INSTANTIATE(q8_0)
KP_INSTANTIATE(q4_0)
KP_INSTANTIATE(q4_K)
KP_INSTANTIATE(q6_K)

static const kp_dotn_fn *kp_dotn_table(int wtype) {
    switch (wtype) {
    case KP_TYPE_F32: return kp_dotn_f32;
    case KP_TYPE_F16: return kp_dotn_f16;
    case KP_TYPE_BF16: return kp_dotn_bf16;
    case KP_TYPE_Q8_0: return kp_dotn_q8_0;
    case KP_TYPE_Q4_0: return kp_dotn_q4_0;
    case KP_TYPE_Q4_K: return kp_dotn_q4_K;
    case KP_TYPE_Q6_K: return kp_dotn_q6_K;
    default: return NULL;
    }
}

#endif /* KP_QUANT_AVX2 */

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

static kp_dot_fn kp_dot_ref_fn(int wtype) {
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

static kp_dot_fn kp_dot_fast_fn(int wtype) {
#if defined(KP_QUANT_AVX2)
    switch (wtype) {
    case KP_TYPE_F32: return kp_dot_f32_simd;
    case KP_TYPE_F16: return kp_dot_f16_simd;
    case KP_TYPE_BF16: return kp_dot_bf16_simd;
    case KP_TYPE_Q8_0: return kp_dot_q8_0_simd;
    case KP_TYPE_Q4_0: return kp_dot_q4_0_simd;
    case KP_TYPE_Q4_K: return kp_dot_q4_K_simd;
    case KP_TYPE_Q6_K: return kp_dot_q6_K_simd;
    default: return NULL;
    }
#else
    return kp_dot_ref_fn(wtype);
#endif
}

float kp_vec_dot_ref(int wtype, int64_t n, const void *w_row, const void *x_row) {
    kp_dot_fn f = kp_dot_ref_fn(wtype);
    assert(f && n % kp_type_block(wtype) == 0);
    return f ? f(n, w_row, x_row) : 0.0f;
}

float kp_vec_dot(int wtype, int64_t n, const void *w_row, const void *x_row) {
    assert(kp_dot_fast_fn(wtype) && n % kp_type_block(wtype) == 0);
#if defined(KP_QUANT_AVX2)
    switch (wtype) { /* direct calls: the kernels inline here */
    case KP_TYPE_F32: return kp_dot_f32_simd(n, w_row, x_row);
    case KP_TYPE_F16: return kp_dot_f16_simd(n, w_row, x_row);
    case KP_TYPE_BF16: return kp_dot_bf16_simd(n, w_row, x_row);
    case KP_TYPE_Q8_0: return kp_dot_q8_0_simd(n, w_row, x_row);
    case KP_TYPE_Q4_0: return kp_dot_q4_0_simd(n, w_row, x_row);
    case KP_TYPE_Q4_K: return kp_dot_q4_K_simd(n, w_row, x_row);
    case KP_TYPE_Q6_K: return kp_dot_q6_K_simd(n, w_row, x_row);
    default: return 0.0f;
    }
#else
    kp_dot_fn f = kp_dot_ref_fn(wtype);
    return f ? f(n, w_row, x_row) : 0.0f;
#endif
}

void kp_vec_dot_rows(int wtype, int64_t n, int64_t nrows, const void *w, size_t w_stride,
                     const void *x_row, float *out) {
    kp_dot_fn f = kp_dot_fast_fn(wtype);
    assert(f && n % kp_type_block(wtype) == 0);
    if (!f) return;
    const uint8_t *wr = w;
    for (int64_t r = 0; r < nrows; r++) out[r] = f(n, wr + (size_t)r * w_stride, x_row);
}

void kp_vec_dot_nx(int wtype, int64_t n, const void *w_row, const void *x, size_t x_stride, int nx,
                   float *out, size_t out_stride) {
    assert(kp_dot_fast_fn(wtype) && n % kp_type_block(wtype) == 0);
    const uint8_t *xb = x;
#if defined(KP_QUANT_AVX2)
    const kp_dotn_fn *tab = kp_dotn_table(wtype);
    if (!tab) return;
    while (nx > 0) {
        const int k = nx < KP_NX_MAX ? nx : KP_NX_MAX;
        tab[k - 1](n, w_row, xb, x_stride, out, out_stride);
        xb += (size_t)k * x_stride;
        out += (size_t)k * out_stride;
        nx -= k;
    }
#else
    kp_dot_fn f = kp_dot_ref_fn(wtype);
    if (!f) return;
    for (int j = 0; j < nx; j++) out[(size_t)j * out_stride] = f(n, w_row, xb + (size_t)j * x_stride);
#endif
}
