/*
 * codec_gpu_math.h — the per-element arithmetic of the GPU codec
 * (compress/codec_gpu.cu): reading and writing the codec bitstream of
 * codec_baseline.c and codec_learned.c one value, group or byte at a time.
 *
 * Why a header of its own: every function here is compiled TWICE, as device
 * code by nvcc (-fmad=false) and as host code by the C compiler
 * (-ffp-contract=off), so tests/test_codec_cuda.c can run the very same
 * arithmetic the kernels run on a machine without a GPU and compare it with
 * codec_encode / codec_decode. What the CPU cannot check is only how the
 * kernels tile and schedule these calls (codec.cu).
 *
 * Float operations are written exactly as the CPU codecs write them (same
 * products, same sums in the same order, no FMA), so results are bit-equal.
 * Payload bytes are read and written one byte at a time: a payload in a
 * staging buffer may start at any address.
 *
 * Plain C99 + CUDA qualifiers; nothing here allocates or fails.
 */
#ifndef KP_CODEC_GPU_MATH_H
#define KP_CODEC_GPU_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__cplusplus) && !defined(_Static_assert)
#define _Static_assert static_assert
#endif

#ifdef __cplusplus
extern "C" {
#endif
#include "compress/codec.h"
#include "kernels/kernels.h" /* KP_ROPE_NEOX */
#include "kernels/types.h"
#ifdef __cplusplus
}
#endif

#ifdef __CUDACC__
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define CG_HD static inline __host__ __device__
#else
#define CG_HD static inline
#endif

#define CG_KIVI_TOKENS 32 /* KIVI's token group for keys (codec_baseline.c) */

/* Shape of a baseline chunk (codec_baseline.c's notation). */
typedef struct cg_geom {
    int codec; /* enum codec_id */
    int H, D;  /* n_kv_heads, head_dim */
    int R;     /* H * D values per token row */
    int G, NG; /* values per group along head_dim, groups per head */
} cg_geom;

CG_HD cg_geom cg_geom_of(int codec_id, int H, int D) {
    cg_geom g;
    g.codec = codec_id, g.H = H, g.D = D, g.R = H * D;
    g.G = D < 32 ? D : 32;
    g.NG = (D + g.G - 1) / g.G;
    return g;
}

/* ---- bytes and element types ---------------------------------------------- */

CG_HD uint16_t cg_rd16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
CG_HD void cg_wr16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}

CG_HD float cg_h2f(uint16_t h) {
#ifdef __CUDA_ARCH__
    return __half2float(__ushort_as_half(h));
#else
    return kp_fp16_to_f32(h);
#endif
}

/* Round to nearest even fp16 bits. */
CG_HD uint16_t cg_f2h(float f) {
#ifdef __CUDA_ARCH__
    return __half_as_ushort(__float2half_rn(f));
#else
    return kp_f32_to_fp16(f);
#endif
}

CG_HD float cg_bf2f(uint16_t h) {
    union {
        uint32_t u;
        float f;
    } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

CG_HD uint16_t cg_f2bf(float f) {
#ifdef __CUDA_ARCH__
    return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
    return kp_f32_to_bf16(f);
#endif
}

/* Element idx of rows of kv_type (F32, F16, BF16) as float, and back. */
CG_HD float cg_load(int kv_type, const void *rows, size_t idx) {
    if (kv_type == KP_TYPE_F32) return ((const float *)rows)[idx];
    const uint16_t h = ((const uint16_t *)rows)[idx];
    return kv_type == KP_TYPE_F16 ? cg_h2f(h) : cg_bf2f(h);
}

CG_HD void cg_store(int kv_type, void *rows, size_t idx, float x) {
    if (kv_type == KP_TYPE_F32)
        ((float *)rows)[idx] = x;
    else
        ((uint16_t *)rows)[idx] = kv_type == KP_TYPE_F16 ? cg_f2h(x) : cg_f2bf(x);
}

CG_HD int cg_elem_size(int kv_type) { return kv_type == KP_TYPE_F32 ? 4 : 2; }

/* fp16(x) as float, its bits in *h. */
CG_HD float cg_fp16_round(float x, uint16_t *h) {
    *h = cg_f2h(x);
    return cg_h2f(*h);
}

/* ---- baselines: decode one value ------------------------------------------- */

/* Value (token i, head h, dim k) of a chunk of n rows of fp16, int8, int4 or
 * kivi2 (none is a byte copy), from the payload p. */
CG_HD float cg_baseline_value(const cg_geom *g, int is_v, const uint8_t *p, int n, int i, int h, int k) {
    const size_t th = (size_t)i * g->H + h, nhg = (size_t)n * g->H * g->NG;
    const size_t gi = th * g->NG + (size_t)(k / g->G); /* (token, head, group) */
    switch (g->codec) {
    case CODEC_FP16: return cg_h2f(cg_rd16(p + 2 * (th * g->D + k)));
    case CODEC_INT8: {
        const float d = cg_h2f(cg_rd16(p + 2 * gi));
        return (float)(int8_t)p[2 * nhg + th * g->D + k] * d;
    }
    case CODEC_INT4: {
        const float d = cg_h2f(cg_rd16(p + 2 * gi));
        const uint8_t b = p[2 * nhg + th * (size_t)((g->D + 1) / 2) + k / 2];
        const int q = (k & 1 ? b >> 4 : b & 15) - 8;
        return (float)q * d;
    }
    default: { /* CODEC_KIVI2 */
        const size_t DB = (size_t)(g->D + 3) / 4;
        size_t s_at, m_at, codes;
        if (is_v) { /* per (token, head, group) */
            s_at = 2 * gi, m_at = 2 * nhg + 2 * gi, codes = 4 * nhg;
        } else { /* per channel over token groups of 32 */
            const size_t NT = (size_t)(n + CG_KIVI_TOKENS - 1) / CG_KIVI_TOKENS;
            const size_t ch = (size_t)(i / CG_KIVI_TOKENS) * g->R + (size_t)h * g->D + k;
            s_at = 2 * ch, m_at = 2 * NT * g->R + 2 * ch, codes = 4 * NT * g->R;
        }
        const int u = (p[codes + th * DB + k / 4] >> (2 * (k % 4))) & 3;
        return (float)u * cg_h2f(cg_rd16(p + s_at)) + cg_h2f(cg_rd16(p + m_at));
    }
    }
}

/* ---- baselines: encode one group -------------------------------------------- */

/* int8 or int4 group gi of (token i, head h) of rows [n][H][D] -> its scale
 * and codes in the payload p (codec_baseline.c int8_quant_group /
 * int4_quant_group). */
CG_HD void cg_int_group(const cg_geom *g, int kv_type, const void *rows, uint8_t *p, int n, int i, int h,
                        int gi) {
    const size_t th = (size_t)i * g->H + h, nhg = (size_t)n * g->H * g->NG;
    const size_t x0 = (size_t)i * g->R + (size_t)h * g->D;
    const int lo = gi * g->G, hi = lo + g->G < g->D ? lo + g->G : g->D;
    float amax = 0.0f, m = 0.0f, d;
    uint16_t dh;
    if (g->codec == CODEC_INT8) {
        for (int j = lo; j < hi; j++) {
            const float a = fabsf(cg_load(kv_type, rows, x0 + j));
            amax = a > amax ? a : amax;
        }
        d = cg_fp16_round(amax / 127.0f, &dh);
        const float id = d > 0.0f ? 1.0f / d : 0.0f;
        for (int j = lo; j < hi; j++) {
            float v = cg_load(kv_type, rows, x0 + j) * id;
            v = v >= -127.0f ? v : -127.0f; /* NaN -> -127 */
            v = v <= 127.0f ? v : 127.0f;
            p[2 * nhg + th * g->D + j] = (uint8_t)(int8_t)(int)rintf(v);
        }
    } else { /* CODEC_INT4: scale from the value of largest magnitude, codes q + 8 in nibbles */
        for (int j = lo; j < hi; j++) {
            const float x = cg_load(kv_type, rows, x0 + j);
            if (fabsf(x) > amax) amax = fabsf(x), m = x;
        }
        d = cg_fp16_round(m / -8.0f, &dh);
        const float id = d != 0.0f ? 1.0f / d : 0.0f;
        uint8_t *code = p + 2 * nhg + th * (size_t)((g->D + 1) / 2);
        for (int j = lo; j < hi; j += 2) { /* groups start on even dims: whole bytes */
            int u[2] = {0, 0};
            for (int e = 0; e < 2 && j + e < hi; e++) {
                float v = cg_load(kv_type, rows, x0 + j + e) * id;
                v = v >= -8.0f ? v : -8.0f; /* NaN -> -8 */
                v = v <= 7.0f ? v : 7.0f;
                u[e] = (int)rintf(v) + 8;
            }
            code[j / 2] = (uint8_t)(u[0] | (u[1] << 4));
        }
    }
    cg_wr16(p + 2 * (th * g->NG + gi), dh);
}

/* KIVI's quantiser of a range [mn, mx]: fp16 scale and min bits, and the
 * rounded min and 1/scale to quantise with (codec_baseline.c kivi_params). */
CG_HD void cg_kivi_params(float mn, float mx, uint16_t *sh, uint16_t *mh, float *mq, float *is) {
    const float s = cg_fp16_round((mx - mn) / 3.0f, sh);
    *mq = cg_fp16_round(mn, mh);
    *is = s > 0.0f ? 1.0f / s : 0.0f;
}

CG_HD int cg_kivi_code(float x, float mq, float is) {
    float v = (x - mq) * is;
    v = v >= 0.0f ? v : 0.0f; /* NaN -> 0 */
    v = v <= 3.0f ? v : 3.0f;
    return (int)rintf(v);
}

/* kivi2 VALUES: group gi of (token i, head h) -> scale, min and its code
 * bytes (groups start on multiples of 4 dims: whole bytes). */
CG_HD void cg_kivi_v_group(const cg_geom *g, int kv_type, const void *rows, uint8_t *p, int n, int i,
                           int h, int gi) {
    const size_t th = (size_t)i * g->H + h, nhg = (size_t)n * g->H * g->NG, at = th * g->NG + gi;
    const size_t x0 = (size_t)i * g->R + (size_t)h * g->D;
    const int lo = gi * g->G, hi = lo + g->G < g->D ? lo + g->G : g->D;
    float mn = INFINITY, mx = -INFINITY, mq, is;
    for (int j = lo; j < hi; j++) {
        const float x = cg_load(kv_type, rows, x0 + j);
        mn = x < mn ? x : mn;
        mx = x > mx ? x : mx;
    }
    uint16_t sh, mh;
    cg_kivi_params(mn, mx, &sh, &mh, &mq, &is);
    cg_wr16(p + 2 * at, sh);
    cg_wr16(p + 2 * nhg + 2 * at, mh);
    uint8_t *code = p + 4 * nhg + th * (size_t)((g->D + 3) / 4);
    for (int j = lo; j < hi; j += 4) {
        int b = 0;
        for (int e = 0; e < 4 && j + e < hi; e++) b |= cg_kivi_code(cg_load(kv_type, rows, x0 + j + e), mq, is) << (2 * e);
        code[j / 4] = (uint8_t)b;
    }
}

/* kivi2 KEYS: the (up to) 4 channels of code byte kb of head h over token
 * group ug (rows [32 ug, min(n, 32 ug + 32))) -> their scales and mins and
 * that byte of every row of the group. */
CG_HD void cg_kivi_k_byte(const cg_geom *g, int kv_type, const void *rows, uint8_t *p, int n, int ug,
                          int h, int kb) {
    const size_t NT = (size_t)(n + CG_KIVI_TOKENS - 1) / CG_KIVI_TOKENS;
    const size_t DB = (size_t)(g->D + 3) / 4;
    const int t0 = ug * CG_KIVI_TOKENS, t1 = t0 + CG_KIVI_TOKENS < n ? t0 + CG_KIVI_TOKENS : n;
    const int nc = g->D - 4 * kb < 4 ? g->D - 4 * kb : 4;
    float mq[4] = {0, 0, 0, 0}, is[4] = {0, 0, 0, 0};
    for (int e = 0; e < nc; e++) {
        const size_t c = (size_t)h * g->D + 4 * kb + e; /* channel within a row */
        float mn = INFINITY, mx = -INFINITY;
        for (int t = t0; t < t1; t++) {
            const float x = cg_load(kv_type, rows, (size_t)t * g->R + c);
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
        }
        uint16_t sh, mh;
        cg_kivi_params(mn, mx, &sh, &mh, &mq[e], &is[e]);
        cg_wr16(p + 2 * ((size_t)ug * g->R + c), sh);
        cg_wr16(p + 2 * NT * g->R + 2 * ((size_t)ug * g->R + c), mh);
    }
    for (int t = t0; t < t1; t++) {
        int b = 0;
        for (int e = 0; e < nc; e++)
            b |= cg_kivi_code(cg_load(kv_type, rows, (size_t)t * g->R + (size_t)h * g->D + 4 * kb + e), mq[e],
                              is[e]) << (2 * e);
        p[4 * NT * g->R + ((size_t)t * g->H + h) * DB + kb] = (uint8_t)b;
    }
}

/* ---- pca / learned ---------------------------------------------------------- */

/* Code of b bits at stream bit t of a code stream of ncode bytes (LSB-first;
 * b <= 8, so it lies within two bytes). */
CG_HD uint32_t cg_code_at(const uint8_t *codes, size_t ncode, size_t t, int b) {
    const size_t at = t >> 3;
    uint32_t w = codes[at];
    if (at + 1 < ncode) w |= (uint32_t)codes[at + 1] << 8;
    return (w >> (t & 7)) & ((1u << b) - 1);
}

/* Latent j of a row from its code q: ranges 1 the code itself (the
 * quantiser is folded into the decoder), ranges 0 q * step_j + lo_j with
 * lo [r], step [r] fp16 at the start of the payload p. */
CG_HD float cg_lc_latent(int ranges, uint32_t q, const uint8_t *p, int r, int j) {
    if (ranges) return (float)q;
    return (float)q * cg_h2f(cg_rd16(p + 2 * (size_t)r + 2 * (size_t)j)) + cg_h2f(cg_rd16(p + 2 * (size_t)j));
}

/* Code of latent z with range lo, step st and qm = 2^b - 1 (0 if st is not
 * positive). */
CG_HD uint32_t cg_lc_quant(float z, float lo, float st, float qm) {
    if (!(st > 0.0f)) return 0;
    float v = (z - lo) / st;
    v = v > 0.0f ? v : 0.0f; /* NaN -> 0 */
    v = v < qm ? v : qm;
    return (uint32_t)floorf(v + 0.5f);
}

/* ranges 0: a chunk's range of latent j from its min and max over rows ->
 * fp16 lo and step bits (*lh, *sh) and their float values. */
CG_HD void cg_lc_range(float mn, float mx, int bits, uint16_t *lh, uint16_t *sh, float *lf, float *sf) {
    if (!isfinite(mn) || !isfinite(mx)) mn = mx = 0;
    *lh = cg_f2h(mn);
    *lf = cg_h2f(*lh);
    if (!isfinite(*lf)) *lh = cg_f2h(0.0f), *lf = 0;
    const float qmax = (float)((1 << bits) - 1);
    *sh = cg_f2h((mx - *lf) / qmax);
    *sf = cg_h2f(*sh);
    if (!isfinite(*sf) || *sf < 0) *sh = 0, *sf = 0;
}

/* Byte b of the code stream of n rows with codes q [n][r] (one per byte),
 * bits [r], off [r] (bit of dim j within a row: prefix sums of bits) and B
 * bits per row: the bits of every code that falls in it (zero past the
 * stream). */
CG_HD uint8_t cg_pack_byte(const uint8_t *q, int n, int r, const uint8_t *bits, const int *off, int B,
                           size_t b) {
    const size_t total = (size_t)n * (size_t)B;
    size_t t = 8 * b;
    if (t >= total) return 0;
    int i = (int)(t / (size_t)B), o = (int)(t % (size_t)B);
    int lo = 0, hi = r - 1; /* the last j with off[j] <= o */
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (off[mid] <= o) lo = mid;
        else hi = mid - 1;
    }
    int j = lo, out = 0;
    for (int k = 0; k < 8 && t < total; k++, t++) {
        out |= (int)((q[(size_t)i * r + j] >> (o - off[j])) & 1u) << k;
        if (++o == off[j] + bits[j]) {
            if (++j == r) j = 0, o = 0, i++;
        }
    }
    return (uint8_t)out;
}

/* ---- RoPE --------------------------------------------------------------------- */

/* cos and sin, rounded to float, of pair p's angle at rows i0 .. i0+m-1 of a
 * chunk starting at position pos0 (cs[q * stride], sn[q * stride] for row
 * i0 + q): codec_learned.c's double chain, started at cos/sin(th * pos0)
 * and stepped row by row with the step's cos c1 and sin s1. */
CG_HD void cg_rope_rows(double th, double c1, double s1, int pos0, int i0, int m, float *cs, float *sn,
                        int stride) {
    double c = cos(th * pos0), s = sin(th * pos0);
    for (int i = 0; i < i0 + m; i++) {
        if (i >= i0) cs[(size_t)(i - i0) * stride] = (float)c, sn[(size_t)(i - i0) * stride] = (float)s;
        const double cn = c * c1 - s * s1;
        s = s * c1 + c * s1, c = cn;
    }
}

/* Dim kk of a head (0..head_dim-1) in a RoPE pair? 1 with *p its pair,
 * *partner the other dim and *second whether kk is the pair's second; 0 if
 * the dim is not rotated. */
CG_HD int cg_rope_pair_of(int kk, int half, int neox, int *p, int *partner, int *second) {
    if (kk >= 2 * half) return 0;
    if (neox) {
        *second = kk >= half;
        *p = *second ? kk - half : kk;
        *partner = *second ? kk - half : kk + half;
    } else {
        *second = kk & 1;
        *p = kk / 2;
        *partner = kk ^ 1;
    }
    return 1;
}

/* The rotation of one pair (x0, x1) by (c, s); inverse undoes it. */
CG_HD void cg_rotate(float x0, float x1, float c, float s, int inverse, float *y0, float *y1) {
    const float sv = inverse ? -s : s;
    *y0 = x0 * c - x1 * sv;
    *y1 = x0 * sv + x1 * c;
}

/* Decode work unit u of a head (0 .. units-1, units = head_dim - half when
 * rope, else head_dim): a rotated pair (columns *c0, *c1 of the head, pair
 * *p) or one column (*c1 = *p = -1). */
CG_HD int cg_lc_units(int head_dim, int half, int rope) { return rope ? head_dim - half : head_dim; }

CG_HD void cg_lc_unit_cols(int u, int half, int neox, int rope, int *c0, int *c1, int *p) {
    if (rope && u < half) {
        *p = u;
        *c0 = neox ? u : 2 * u;
        *c1 = neox ? u + half : 2 * u + 1;
    } else {
        *p = *c1 = -1;
        *c0 = rope ? 2 * half + (u - half) : u;
    }
}

/* Encoder input x'_k of row element k (row starting at element row0 of
 * rows): RoPE undone (rope: cs, sn [half] of the row), then the mean taken
 * off (codec_learned.c lc_encode). */
CG_HD float cg_lc_enc_input(int kv_type, const void *rows, size_t row0, int k, int head_dim, int half,
                            int neox, int rope, const float *cs, const float *sn, const float *mean) {
    float x = cg_load(kv_type, rows, row0 + k);
    int p, partner, second;
    const int kk = k % head_dim;
    if (rope && cg_rope_pair_of(kk, half, neox, &p, &partner, &second)) {
        const float y = cg_load(kv_type, rows, row0 + (k - kk) + partner);
        float y0, y1;
        if (second) cg_rotate(y, x, cs[p], sn[p], 1, &y0, &y1), x = y1;
        else cg_rotate(x, y, cs[p], sn[p], 1, &y0, &y1), x = y0;
    }
    return x - mean[k];
}

#endif
