/*
 * quant_x86.c — the x86 SIMD half of quant.c: f16/bf16 row conversions
 * (F16C, AVX-512), the AVX2 paths of the activation quantisers (Q8_0, Q8_K)
 * and the AVX2 / AVX-512 dot products, with the fast entry points kp_vec_dot,
 * kp_vec_dot_rows and kp_vec_dot_nx (contract in quant.h).
 *
 * Why a file of its own: the portable code (quant.c) is the specification,
 * ggml's C operation for operation; this file only makes the same numbers
 * faster, so the two can be read (and checked against each other) apart.
 * Integer sums per block are exact either way; the dot products differ from
 * kp_vec_dot_ref only in the order per-block float terms are added, the
 * conversions and quantisers not at all.
 *
 * It compiles anywhere: without AVX2 + FMA + F16C (another CPU, -Dnative=
 * false, or not x86) every function here reduces to its scalar fallback in
 * quant.c (kp_quant_*_scalar, kp_dot_ref_fn) or its scalar tail loop. The
 * feature test is KP_QUANT_AVX2 / KP_QUANT_AVX512 in quant_impl.h.
 */
#include "kernels/cpu/quant.h"

#include <assert.h>
#include <math.h>
#include <string.h>

#include "kernels/cpu/quant_impl.h"
#include "kernels/kp.h"

#define KP_AI static inline __attribute__((always_inline))

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

/* ---- activation quantisers (AVX2 paths) ------------------------------------ */

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

void kp_quant_q8_0(const float *x, kp_block_q8_0 *y, int64_t nb) {
#if defined(KP_QUANT_AVX2)
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
        __m256 v[4];
        const float amax = kp_amax32(x, v);
        const float d = amax / ((1 << 7) - 1);
        const float id = d ? 1.0f / d : 0.0f;
        y[i].d = KP_F2H(d);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvttps_epi32(kp_roundf8(_mm256_mul_ps(v[k], _mm256_set1_ps(id))));
        _mm256_storeu_si256((__m256i *)y[i].qs, kp_pack32_i8(q));
    }
#else
    kp_quant_q8_0_scalar(x, y, nb);
#endif
}

/* llama.cpp's x86 quantize_row_q8_0 (AVX): multiplier 127/amax, ties to even. */
void kp_quant_q8_0_act(const float *x, kp_block_q8_0 *y, int64_t nb) {
#if defined(KP_QUANT_AVX2)
    for (int64_t i = 0; i < nb; i++, x += KP_QK8_0) {
        __m256 v[4];
        const float amax = kp_amax32(x, v);
        y[i].d = KP_F2H(amax / 127.f);
        const __m256 mul = _mm256_set1_ps(amax != 0.0f ? 127.f / amax : 0.0f);
        __m256i q[4];
        for (int k = 0; k < 4; k++)
            q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], mul),
                                                      _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm256_storeu_si256((__m256i *)y[i].qs, kp_pack32_i8(q));
    }
#else
    kp_quant_q8_0_act_scalar(x, y, nb);
#endif
}

void kp_quant_q8_K(const float *x, kp_block_q8_K *y, int64_t nb) {
#if defined(KP_QUANT_AVX2)
    for (int64_t i = 0; i < nb; i++, x += KP_QK_K) {
        /* max: the first value of largest magnitude, with its sign */
        float max = 0, amax = 0;
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
        if (!amax) {
            /* ggml leaves bsums untouched here; zero is what they sum to */
            memset(&y[i], 0, sizeof y[i]);
            continue;
        }
        const float iscale = -127.f / max;
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
        y[i].d = 1 / iscale;
    }
#else
    kp_quant_q8_K_scalar(x, y, nb);
#endif
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

/* ---- Q8_0 / Q4_0 weights . Q8_0 activations: a tile of weight rows ---- */

/* With VNNI (dpbusd: u8 x s8 into int32, accumulating), a tile of NW <= 4
 * weight rows x NX <= 4 activation rows: each block of every row is loaded
 * once for the whole tile. The activations are made unsigned (x + 128: a
 * sign-bit flip) once per row and block, and each weight block's 128 * sum
 * is taken out by starting its dot products from -128 * sum(w): per pair of
 * rows one dpbusd, a conversion, a multiply of the two scales and an FMA.
 * The integer block sums are kp_vec_dot's exactly; the per-block float terms
 * go into one accumulator per output, in block order (kp_vec_dot alternates
 * two), so results agree with it within float rounding, not bit for bit. */
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define KP_HAVE_TILE 1
#define KP_TW 4
KP_AI __m256i kp_dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
    return _mm256_dpbusd_avx_epi32(acc, u, s);
#else
    return _mm256_dpbusd_epi32(acc, u, s);
#endif
}

#define KP_DEF_TILE_Q8_0(NAME, WBLOCK, WBYTES)                                                          \
    KP_AI void NAME(int64_t n, const uint8_t *w, size_t ws, const int NW, const uint8_t *x, size_t xs,  \
                    const int NX, float *out, size_t os) {                                              \
        const int64_t nb = n / KP_QK8_0;                                                                \
        const __m256i off = _mm256_set1_epi8((char)0x80);                                               \
        __m256 acc[KP_TW][KP_NX_MAX];                                                                   \
        for (int r = 0; r < NW; r++)                                                                    \
            for (int j = 0; j < NX; j++) acc[r][j] = _mm256_setzero_ps();                               \
        for (int64_t ib = 0; ib < nb; ib++) {                                                           \
            __m256i wq[KP_TW], nc[KP_TW];                                                               \
            __m256 vdw[KP_TW];                                                                          \
            for (int r = 0; r < NW; r++) {                                                              \
                const WBLOCK *b = (const WBLOCK *)(w + (size_t)r * ws) + ib;                            \
                wq[r] = WBYTES(b->qs);                                                                  \
                nc[r] = _mm256_sub_epi32(_mm256_setzero_si256(), kp_dpbusd(_mm256_setzero_si256(), off, wq[r])); \
                vdw[r] = _mm256_set1_ps(KP_H2F(b->d));                                                  \
            }                                                                                           \
            for (int j = 0; j < NX; j++) {                                                              \
                const kp_block_q8_0 *xb = (const kp_block_q8_0 *)(x + (size_t)j * xs) + ib;             \
                const __m256i xu = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)xb->qs), off);  \
                const __m256 vdx = _mm256_set1_ps(KP_H2F(xb->d));                                       \
                for (int r = 0; r < NW; r++) {                                                          \
                    const __m256i p = kp_dpbusd(nc[r], xu, wq[r]);                                      \
                    acc[r][j] = _mm256_fmadd_ps(_mm256_mul_ps(vdw[r], vdx), _mm256_cvtepi32_ps(p), acc[r][j]); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < NX; j++)                                                                    \
            for (int r = 0; r < NW; r++) out[(size_t)j * os + r] = kp_hsum8(acc[r][j]);                 \
    }

#if defined(__AVX512VNNI__) && defined(__AVX512F__) && defined(__AVX512DQ__)
/* The same tile on 512-bit registers: two blocks per register (block 2k in
 * the low half, 2k+1 in the high one; an odd last block with a zero high
 * half, which adds exact zeros), so each pair of rows costs one dpbusd, a
 * conversion, a multiply and an FMA per two blocks. */
KP_AI __m512i kp_pair_i(__m256i lo, __m256i hi) { return _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1); }
KP_AI __m512 kp_pair_f(float lo, float hi) {
    return _mm512_insertf32x8(_mm512_castps256_ps512(_mm256_set1_ps(lo)), _mm256_set1_ps(hi), 1);
}
#undef KP_DEF_TILE_Q8_0
#define KP_DEF_TILE_Q8_0(NAME, WBLOCK, WBYTES)                                                          \
    KP_AI void NAME(int64_t n, const uint8_t *w, size_t ws, const int NW, const uint8_t *x, size_t xs,  \
                    const int NX, float *out, size_t os) {                                              \
        const int64_t nb = n / KP_QK8_0;                                                                \
        const __m512i off = _mm512_set1_epi8((char)0x80);                                               \
        __m512 acc[KP_TW][KP_NX_MAX];                                                                   \
        for (int r = 0; r < NW; r++)                                                                    \
            for (int j = 0; j < NX; j++) acc[r][j] = _mm512_setzero_ps();                               \
        for (int64_t ib = 0; ib < nb; ib += 2) {                                                        \
            const int two = ib + 1 < nb;                                                                \
            __m512i wq[KP_TW], nc[KP_TW];                                                               \
            __m512 vdw[KP_TW];                                                                          \
            for (int r = 0; r < NW; r++) {                                                              \
                const WBLOCK *b = (const WBLOCK *)(w + (size_t)r * ws) + ib;                            \
                wq[r] = kp_pair_i(WBYTES(b[0].qs), two ? WBYTES(b[1].qs) : _mm256_setzero_si256());     \
                nc[r] = _mm512_sub_epi32(_mm512_setzero_si512(), _mm512_dpbusd_epi32(_mm512_setzero_si512(), off, wq[r])); \
                vdw[r] = kp_pair_f(KP_H2F(b[0].d), two ? KP_H2F(b[1].d) : 0.0f);                        \
            }                                                                                           \
            for (int j = 0; j < NX; j++) {                                                              \
                const kp_block_q8_0 *xb = (const kp_block_q8_0 *)(x + (size_t)j * xs) + ib;             \
                const __m256i x1 = two ? _mm256_loadu_si256((const __m256i *)xb[1].qs) : _mm256_setzero_si256(); \
                const __m512i xu = _mm512_xor_si512(kp_pair_i(_mm256_loadu_si256((const __m256i *)xb[0].qs), x1), off); \
                const __m512 vdx = kp_pair_f(KP_H2F(xb[0].d), two ? KP_H2F(xb[1].d) : 0.0f);            \
                for (int r = 0; r < NW; r++) {                                                          \
                    const __m512i p = _mm512_dpbusd_epi32(nc[r], xu, wq[r]);                            \
                    acc[r][j] = _mm512_fmadd_ps(_mm512_mul_ps(vdw[r], vdx), _mm512_cvtepi32_ps(p), acc[r][j]); \
                }                                                                                       \
            }                                                                                           \
        }                                                                                               \
        for (int j = 0; j < NX; j++)                                                                    \
            for (int r = 0; r < NW; r++)                                                                \
                out[(size_t)j * os + r] = kp_hsum8(_mm256_add_ps(_mm512_castps512_ps256(acc[r][j]),     \
                                                                 _mm512_extractf32x8_ps(acc[r][j], 1))); \
    }
#endif

KP_DEF_TILE_Q8_0(kp_tilek_q8_0, kp_block_q8_0, kp_q8_0_bytes)
KP_DEF_TILE_Q8_0(kp_tilek_q4_0, kp_block_q4_0, kp_q4_0_bytes)

typedef void (*kp_tile_fn)(int64_t n, const uint8_t *w, size_t ws, const uint8_t *x, size_t xs, float *out,
                           size_t os);
#define KP_TILE_ONE(T, NW, NX)                                                                            \
    static void kp_tile_##T##_##NW##x##NX(int64_t n, const uint8_t *w, size_t ws, const uint8_t *x, size_t xs, \
                                          float *out, size_t os) {                                        \
        kp_tilek_##T(n, w, ws, NW, x, xs, NX, out, os);                                                   \
    }
#define KP_TILE_ROW(T, NW) KP_TILE_ONE(T, NW, 1) KP_TILE_ONE(T, NW, 2) KP_TILE_ONE(T, NW, 3) KP_TILE_ONE(T, NW, 4)
#define KP_TILE_TABLE(T)                                                                                  \
    KP_TILE_ROW(T, 1) KP_TILE_ROW(T, 2) KP_TILE_ROW(T, 3) KP_TILE_ROW(T, 4)                               \
    static const kp_tile_fn kp_tiles_##T[KP_TW][KP_NX_MAX] = {                                            \
        {kp_tile_##T##_1x1, kp_tile_##T##_1x2, kp_tile_##T##_1x3, kp_tile_##T##_1x4},                     \
        {kp_tile_##T##_2x1, kp_tile_##T##_2x2, kp_tile_##T##_2x3, kp_tile_##T##_2x4},                     \
        {kp_tile_##T##_3x1, kp_tile_##T##_3x2, kp_tile_##T##_3x3, kp_tile_##T##_3x4},                     \
        {kp_tile_##T##_4x1, kp_tile_##T##_4x2, kp_tile_##T##_4x3, kp_tile_##T##_4x4}};
KP_TILE_TABLE(q8_0)
KP_TILE_TABLE(q4_0)
#endif /* VNNI */

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

int kp_vec_dot_tile(int wtype, int64_t n, const void *w, size_t w_stride, int nw, const void *x,
                    size_t x_stride, int nx, float *out, size_t out_stride) {
#if defined(KP_QUANT_AVX2) && defined(KP_HAVE_TILE)
    const kp_tile_fn(*tab)[KP_NX_MAX] = wtype == KP_TYPE_Q8_0 ? kp_tiles_q8_0 : wtype == KP_TYPE_Q4_0 ? kp_tiles_q4_0 : NULL;
    if (!tab || nw < 1 || nw > KP_TW || nx < 1 || nx > KP_NX_MAX || n % KP_QK8_0) return 0;
    tab[nw - 1][nx - 1](n, w, w_stride, x, x_stride, out, out_stride);
    return 1;
#else
    (void)wtype, (void)n, (void)w, (void)w_stride, (void)nw, (void)x, (void)x_stride, (void)nx, (void)out,
        (void)out_stride;
    return 0;
#endif
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
