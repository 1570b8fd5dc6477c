/*
 * test_quant.c — tensor types (kernels/cpu/types.c) and quantisation / dot
 * products (kernels/cpu/quant.c).
 *
 * What is checked, and against what:
 *   - the type table (block sizes, bytes, names) and ggml's struct sizes;
 *   - fp16 / bf16 conversions against bit patterns worked out by hand, the
 *     F16C path against the portable one (all 65536 halves, millions of
 *     floats), row conversions against the scalar ones;
 *   - dequantisation of hand-built blocks against values computed here from
 *     the format definition (Q4_K 6-bit scale/min packing, Q6_K ql/qh split);
 *   - quantise -> dequantise error bounds, bsums, Q4_0/Q8_0 idempotence;
 *   - kp_vec_dot (SIMD) against kp_vec_dot_ref (ggml's scalar code) and both
 *     against a double dot product of the dequantised rows; exact equality
 *     where every float step is exact;
 *   - bit-exactness with llama.cpp: the tiny-llama-256 models were written by
 *     llama-quantize from the F32 model without an imatrix, i.e. with the
 *     reference quantisers; re-quantising the F32 tensors here must give the
 *     same bytes. A minimal GGUF walker lives in this file (the real reader
 *     is another module's and is tested there).
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "tests/testutil.h"

#include "kernels/cpu/quant.h"
#include "kernels/kp.h"
#include "kernels/types.h"

static float tq_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint32_t tq_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static uint64_t tq_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* ---------------------------------------------------------------------- */
/* Type table                                                             */
/* ---------------------------------------------------------------------- */

static void test_type_table(void **state) {
    (void)state;
    static const struct {
        int type, block;
        size_t bytes;
        const char *name;
        int supported;
    } want[] = {
        {KP_TYPE_F32, 1, 4, "f32", 1},      {KP_TYPE_F16, 1, 2, "f16", 1},
        {KP_TYPE_Q4_0, 32, 18, "q4_0", 1},  {KP_TYPE_Q4_1, 32, 20, "q4_1", 0},
        {KP_TYPE_Q5_0, 32, 22, "q5_0", 0},  {KP_TYPE_Q5_1, 32, 24, "q5_1", 0},
        {KP_TYPE_Q8_0, 32, 34, "q8_0", 1},  {KP_TYPE_Q8_1, 32, 36, "q8_1", 0},
        {KP_TYPE_Q2_K, 256, 84, "q2_K", 0}, {KP_TYPE_Q3_K, 256, 110, "q3_K", 0},
        {KP_TYPE_Q4_K, 256, 144, "q4_K", 1}, {KP_TYPE_Q5_K, 256, 176, "q5_K", 0},
        {KP_TYPE_Q6_K, 256, 210, "q6_K", 1}, {KP_TYPE_Q8_K, 256, 292, "q8_K", 0},
        {KP_TYPE_BF16, 1, 2, "bf16", 1},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(want); i++) {
        assert_int_equal(kp_type_block(want[i].type), want[i].block);
        assert_int_equal(kp_type_block_bytes(want[i].type), want[i].bytes);
        assert_string_equal(kp_type_name(want[i].type), want[i].name);
        assert_int_equal(kp_type_supported(want[i].type), want[i].supported);
        assert_int_equal(kp_type_row_bytes(want[i].type, 4 * want[i].block), 4 * want[i].bytes);
        if (want[i].block > 1) assert_int_equal(kp_type_row_bytes(want[i].type, want[i].block + 1), 0);
    }
    assert_int_equal(kp_type_row_bytes(KP_TYPE_Q4_K, 4096), 16 * 144);
    assert_int_equal(kp_type_row_bytes(KP_TYPE_F16, 7), 14);
    assert_int_equal(kp_type_row_bytes(KP_TYPE_Q8_0, 0), 0);
    /* removed / unknown ggml types */
    const int bad[] = {-1, 4, 5, 16, 29, 31, 39, 40, 1000};
    for (size_t i = 0; i < KP_ARRAY_LEN(bad); i++) {
        assert_int_equal(kp_type_block(bad[i]), 0);
        assert_int_equal(kp_type_block_bytes(bad[i]), 0);
        assert_int_equal(kp_type_row_bytes(bad[i], 32), 0);
        assert_null(kp_type_name(bad[i]));
        assert_int_equal(kp_type_supported(bad[i]), 0);
    }
    assert_int_equal(sizeof(kp_block_q8_0), 34);
    assert_int_equal(sizeof(kp_block_q4_0), 18);
    assert_int_equal(sizeof(kp_block_q4_K), 144);
    assert_int_equal(sizeof(kp_block_q6_K), 210);
    assert_int_equal(sizeof(kp_block_q8_K), 292);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_F32), KP_TYPE_F32);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_F16), KP_TYPE_F16);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_BF16), KP_TYPE_BF16);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_Q8_0), KP_TYPE_Q8_0);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_Q4_0), KP_TYPE_Q8_0);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_Q4_K), KP_TYPE_Q8_K);
    assert_int_equal(kp_vec_dot_type(KP_TYPE_Q6_K), KP_TYPE_Q8_K);
}

/* ---------------------------------------------------------------------- */
/* fp16 / bf16                                                            */
/* ---------------------------------------------------------------------- */

static void test_fp16_known(void **state) {
    (void)state;
    static const struct {
        uint32_t f;
        uint16_t h;
    } to_half[] = {
        {0x3f800000, 0x3c00}, /* 1.0 */
        {0xc0200000, 0xc100}, /* -2.5 */
        {0x00000000, 0x0000}, {0x80000000, 0x8000}, /* +-0 */
        {0x477fe000, 0x7bff}, /* 65504, the largest half */
        {0x477fefff, 0x7bff}, /* just below 65520: rounds down */
        {0x477ff000, 0x7c00}, /* 65520: tie, rounds to even = inf */
        {0x47800000, 0x7c00}, {0x7f7fffff, 0x7c00}, {0xff7fffff, 0xfc00}, /* overflow */
        {0x7f800000, 0x7c00}, {0xff800000, 0xfc00}, /* inf */
        {0x33800000, 0x0001}, /* 2^-24, smallest subnormal */
        {0x33000000, 0x0000}, /* 2^-25: tie between 0 and 2^-24 -> 0 (even) */
        {0x33000001, 0x0001}, /* just above the tie */
        {0x33c00000, 0x0002}, /* 1.5 * 2^-24: tie between 1 and 2 -> 2 */
        {0x34200000, 0x0002}, /* 2.5 * 2^-24: tie between 2 and 3 -> 2 */
        {0x387fc000, 0x03ff}, /* largest subnormal 1023 * 2^-24 */
        {0x387fe000, 0x0400}, /* 1023.5 * 2^-24 -> smallest normal (tie to even) */
        {0x38800000, 0x0400}, /* 2^-14 */
        {0x3f801000, 0x3c00}, /* 1 + 2^-11: tie -> 1.0 (even) */
        {0x3f801001, 0x3c01}, /* just above the tie */
        {0x3f803000, 0x3c02}, /* 1 + 3*2^-11: tie between 0x3c01 and 0x3c02 -> even */
        {0x3eaaaaab, 0x3555}, /* 1/3 */
        {0x7fc00000, 0x7e00}, /* quiet NaN */
        {0xffc00000, 0xfe00},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(to_half); i++) {
        const float f = tq_bits_f32(to_half[i].f);
        if (kp_f32_to_fp16(f) != to_half[i].h || kp_f32_to_fp16_soft(f) != to_half[i].h)
            fail_msg("f32 %08x -> half %04x / soft %04x, want %04x", to_half[i].f, kp_f32_to_fp16(f),
                     kp_f32_to_fp16_soft(f), to_half[i].h);
    }
    /* signalling NaN payloads become quiet NaNs, never infinities */
    const uint16_t hs = kp_f32_to_fp16(tq_bits_f32(0x7f800001));
    assert_true((hs & 0x7c00) == 0x7c00 && (hs & 0x3ff) != 0);

    static const struct {
        uint16_t h;
        uint32_t f;
    } to_float[] = {
        {0x3c00, 0x3f800000}, {0xc100, 0xc0200000}, {0x7bff, 0x477fe000}, {0x0001, 0x33800000},
        {0x8001, 0xb3800000}, {0x03ff, 0x387fc000}, {0x0400, 0x38800000}, {0x7c00, 0x7f800000},
        {0xfc00, 0xff800000}, {0x0000, 0x00000000}, {0x8000, 0x80000000}, {0x3555, 0x3eaaa000},
        {0x7e00, 0x7fc00000},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(to_float); i++) {
        assert_int_equal(tq_f32_bits(kp_fp16_to_f32(to_float[i].h)), to_float[i].f);
        assert_int_equal(tq_f32_bits(kp_fp16_to_f32_soft(to_float[i].h)), to_float[i].f);
    }
}

/* The F16C path and the portable one agree bit for bit. */
static void test_fp16_soft_vs_hard(void **state) {
    (void)state;
    for (uint32_t h = 0; h < 65536; h++) {
        const float a = kp_fp16_to_f32((uint16_t)h), b = kp_fp16_to_f32_soft((uint16_t)h);
        if (tq_f32_bits(a) != tq_f32_bits(b)) fail_msg("half %04x: %08x vs soft %08x", h, tq_f32_bits(a), tq_f32_bits(b));
        /* round trip of every non-NaN half is exact */
        if ((h & 0x7c00) != 0x7c00 || (h & 0x3ff) == 0) assert_int_equal(kp_f32_to_fp16(a), h);
    }
    /* every float whose exponent is in the half range, with random mantissas,
     * plus fully random bit patterns */
    uint64_t s = 12345;
    for (uint32_t e = 90; e <= 150; e++) {
        for (int k = 0; k < 20000; k++) {
            const uint32_t u = ((uint32_t)tq_next(&s) & 0x807fffff) | (e << 23);
            const float f = tq_bits_f32(u);
            if (kp_f32_to_fp16(f) != kp_f32_to_fp16_soft(f))
                fail_msg("f32 %08x: %04x vs soft %04x", u, kp_f32_to_fp16(f), kp_f32_to_fp16_soft(f));
        }
    }
    for (int k = 0; k < 1000000; k++) {
        const uint32_t u = (uint32_t)tq_next(&s);
        const float f = tq_bits_f32(u);
        if (kp_f32_to_fp16(f) != kp_f32_to_fp16_soft(f))
            fail_msg("f32 %08x: %04x vs soft %04x", u, kp_f32_to_fp16(f), kp_f32_to_fp16_soft(f));
    }
}

static void test_bf16_known(void **state) {
    (void)state;
    static const struct {
        uint32_t f;
        uint16_t b;
    } to_bf[] = {
        {0x3f800000, 0x3f80}, /* 1.0 */
        {0xc0200000, 0xc020}, /* -2.5 */
        {0x3f808000, 0x3f80}, /* tie, lsb even -> down */
        {0x3f818000, 0x3f82}, /* tie, lsb odd -> up */
        {0x3f808001, 0x3f81}, /* above the tie */
        {0x3f807fff, 0x3f80},
        {0x7f7fffff, 0x7f80}, /* max float rounds to inf */
        {0x7f800000, 0x7f80}, {0xff800000, 0xff80},
        {0x7f800001, 0x7fc0}, /* signalling NaN -> quiet (ggml: |= 64) */
        {0xffc00000, 0xffc0},
        {0x00000001, 0x0000}, /* subnormals round, not flushed */
        {0x00018000, 0x0002},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(to_bf); i++) {
        if (kp_f32_to_bf16(tq_bits_f32(to_bf[i].f)) != to_bf[i].b)
            fail_msg("f32 %08x -> bf16 %04x, want %04x", to_bf[i].f, kp_f32_to_bf16(tq_bits_f32(to_bf[i].f)),
                     to_bf[i].b);
    }
    for (uint32_t h = 0; h < 65536; h++) assert_int_equal(tq_f32_bits(kp_bf16_to_f32((uint16_t)h)), h << 16);
}

/* Row conversions (SIMD) equal the scalar ones, including tails. */
static void test_row_conversions(void **state) {
    (void)state;
    enum { N = 4099 };
    float *f = malloc(N * sizeof *f), *g = malloc(N * sizeof *g);
    uint16_t *h = malloc(N * sizeof *h);
    uint64_t s = 777;
    for (int i = 0; i < N; i++) {
        uint32_t u = (uint32_t)tq_next(&s);
        if (i % 3 == 0) u = (u & 0x81ffffff) | 0x38000000; /* near 1: typical values */
        f[i] = tq_bits_f32(u);
    }
    f[5] = tq_bits_f32(0x7f800001);
    f[6] = tq_bits_f32(0xff800000);
    f[7] = tq_bits_f32(0x00000123);
    const int lens[] = {0, 1, 7, 8, 15, 16, 17, 31, 33, 64, 100, N};
    for (size_t li = 0; li < KP_ARRAY_LEN(lens); li++) {
        const int n = lens[li];
        kp_f32_to_f16_row(f, h, n);
        for (int i = 0; i < n; i++) assert_int_equal(h[i], kp_f32_to_fp16(f[i]));
        kp_f16_to_f32_row(h, g, n);
        for (int i = 0; i < n; i++) assert_int_equal(tq_f32_bits(g[i]), tq_f32_bits(kp_fp16_to_f32(h[i])));
        kp_f32_to_bf16_row(f, h, n);
        for (int i = 0; i < n; i++) assert_int_equal(h[i], kp_f32_to_bf16(f[i]));
        kp_bf16_to_f32_row(h, g, n);
        for (int i = 0; i < n; i++) assert_int_equal(tq_f32_bits(g[i]), (uint32_t)h[i] << 16);
    }
    free(f);
    free(g);
    free(h);
}

/* ---------------------------------------------------------------------- */
/* Hand-built blocks                                                      */
/* ---------------------------------------------------------------------- */

static void test_dequant_q8_0_q4_0_blocks(void **state) {
    (void)state;
    kp_block_q8_0 b8[2];
    b8[0].d = 0x3800; /* 0.5 */
    b8[1].d = 0xc400; /* -4 */
    for (int j = 0; j < 32; j++) {
        b8[0].qs[j] = (int8_t)(j - 16);
        b8[1].qs[j] = (int8_t)(j % 2 ? 127 : -127);
    }
    float y[64];
    assert_int_equal(kp_dequant_row(KP_TYPE_Q8_0, b8, y, 64), 0);
    for (int j = 0; j < 32; j++) assert_true(y[j] == 0.5f * (j - 16));
    assert_true(y[0] == -8.0f && y[31] == 7.5f);
    assert_true(y[32] == 508.0f && y[33] == -508.0f);

    /* Q4_0: byte j holds element j (low nibble) and element j+16 (high) */
    kp_block_q4_0 b4;
    b4.d = 0x4000; /* 2.0 */
    for (int j = 0; j < 16; j++) b4.qs[j] = (uint8_t)((j & 0xF) | ((15 - j) << 4));
    assert_int_equal(kp_dequant_row(KP_TYPE_Q4_0, &b4, y, 32), 0);
    for (int j = 0; j < 16; j++) {
        assert_true(y[j] == 2.0f * (j - 8));
        assert_true(y[j + 16] == 2.0f * (7 - j));
    }
    assert_true(y[0] == -16.0f && y[15] == 14.0f && y[16] == 14.0f && y[31] == -16.0f);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q4_0, &b4, y, 31), KP_EINVAL);
}

/* Q4_K: scales[12] packs 8 six-bit scales and mins. Bytes chosen so every
 * field is distinct; the expected values are worked out by hand below. */
static void test_dequant_q4_K_block(void **state) {
    (void)state;
    kp_block_q4_K b;
    b.d = 0x3c00;    /* 1.0 */
    b.dmin = 0x3800; /* 0.5 */
    const uint8_t sc[12] = {0x41, 0x82, 0xC3, 0x04, 0x45, 0x06, 0x87, 0xC8, 0x21, 0x43, 0x65, 0x87};
    memcpy(b.scales, sc, 12);
    /* sub-blocks 0-3: scale = byte j & 63, min = byte j+4 & 63
     * sub-blocks 4-7: scale = (byte j+4 & 15) | (byte j-4 >> 6) << 4
     *                 min   = (byte j+4 >> 4) | (byte j   >> 6) << 4 */
    const int want_sc[8] = {1, 2, 3, 4, 1 | 1 << 4, 3 | 2 << 4, 5 | 3 << 4, 7 | 0 << 4};
    const int want_m[8] = {5, 6, 7, 8, 2 | 1 << 4, 4 | 0 << 4, 6 | 2 << 4, 8 | 3 << 4};
    for (int i = 0; i < 128; i++) b.qs[i] = (uint8_t)(((i * 7) & 0xF) | (((i * 3 + 1) & 0xF) << 4));
    float y[256];
    assert_int_equal(kp_dequant_row(KP_TYPE_Q4_K, &b, y, 256), 0);
    for (int e = 0; e < 256; e++) {
        const int chunk = e / 64, r = e % 64, j = e / 32;
        const uint8_t byte = b.qs[32 * chunk + r % 32];
        const int q = r < 32 ? (byte & 0xF) : (byte >> 4);
        const float want = 1.0f * want_sc[j] * q - 0.5f * want_m[j];
        if (y[e] != want) fail_msg("q4_K element %d: %g, want %g", e, y[e], want);
    }
    /* a few by hand: e=0: q=0 -> -0.5*5; e=32: high nibble of qs[0] = 1 ->
     * 2*1 - 0.5*6; e=255: high nibble of qs[127] = (127*3+1)&15 = 14 ->
     * 7*14 - 0.5*56 */
    assert_true(y[0] == -2.5f);
    assert_true(y[32] == -1.0f);
    assert_true(y[255] == 70.0f);
    /* e=128 (sub-block 4): low nibble of qs[64] = 448&15 = 0 -> -0.5*18 */
    assert_true(y[128] == -9.0f);
}

/* Q6_K: per 128-element half, ql[0..31] low/high nibbles and ql[32..63]
 * low/high nibbles are the low 4 bits of elements l, l+64, l+32, l+96; qh[l]
 * holds the two high bits of l, l+32, l+64, l+96. */
static void test_dequant_q6_K_block(void **state) {
    (void)state;
    kp_block_q6_K b;
    for (int i = 0; i < 128; i++) b.ql[i] = (uint8_t)(i * 37 + 11);
    for (int i = 0; i < 64; i++) b.qh[i] = (uint8_t)(i * 101 + 7);
    for (int i = 0; i < 16; i++) b.scales[i] = (int8_t)(i * 17 - 128); /* -128 .. 127 */
    b.d = 0x3400; /* 0.25 */
    float y[256];
    assert_int_equal(kp_dequant_row(KP_TYPE_Q6_K, &b, y, 256), 0);
    for (int e = 0; e < 256; e++) {
        const int h = e / 128, r = e % 128, g = r / 32, l = r % 32;
        const uint8_t lbyte = b.ql[64 * h + l + ((g & 1) ? 32 : 0)];
        const int lo = g < 2 ? (lbyte & 0xF) : (lbyte >> 4);
        const int hi = (b.qh[32 * h + l] >> (2 * g)) & 3;
        const int q = (lo | hi << 4) - 32;
        const float want = 0.25f * b.scales[e / 16] * q;
        if (y[e] != want) fail_msg("q6_K element %d: %g, want %g", e, y[e], want);
    }
    /* by hand: e=0: ql[0]=11 -> lo 11, qh[0]=7 -> bits 0-1 = 3 -> q = 59-32 =
     * 27, scale[0] = -128 -> 0.25*-128*27 */
    assert_true(y[0] == -864.0f);
    /* e=96+128=224: h=1, g=3, l=0: ql[64+32]=96*37+11=3563&255=235 -> high
     * nibble 14; qh[32] = 32*101+7 = 3239&255 = 167 -> bits 6-7 = 2 -> q =
     * 46-32 = 14; scale[14] = 14*17-128 = 110 */
    assert_true(y[224] == 0.25f * 110 * 14);
}

static void test_dequant_q8_K_block(void **state) {
    (void)state;
    kp_block_q8_K b;
    memset(&b, 0, sizeof b);
    b.d = 0.25f;
    for (int i = 0; i < 256; i++) b.qs[i] = (int8_t)(i - 128);
    float y[256];
    assert_int_equal(kp_dequant_row(KP_TYPE_Q8_K, &b, y, 256), 0);
    for (int i = 0; i < 256; i++) assert_true(y[i] == 0.25f * (i - 128));
}

/* ---------------------------------------------------------------------- */
/* Quantise -> dequantise                                                 */
/* ---------------------------------------------------------------------- */

static void tq_rms(const float *a, const float *b, int n, double *rms_err, double *rms) {
    double e = 0, s = 0;
    for (int i = 0; i < n; i++) {
        e += ((double)a[i] - b[i]) * ((double)a[i] - b[i]);
        s += (double)b[i] * b[i];
    }
    *rms_err = sqrt(e / n);
    *rms = sqrt(s / n);
}

static void test_roundtrip(void **state) {
    (void)state;
    enum { N = 256 * 64 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    void *q = malloc(N * 4);
    uint64_t s = 99;
    tu_rand_floats(x, N, 3.0f, &s);
    /* vary the magnitude per 32-block, and include an all-zero block */
    for (int i = 0; i < N; i++) x[i] *= 1.0f + (float)((i / 32) % 7);
    memset(x + 256, 0, 256 * sizeof *x);

    /* Q8_0: |err| <= d/2 per block, d as stored (fp16) plus the fp16 rounding
     * of the scale used to quantise (|q| <= 127) */
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_0, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q8_0, q, y, N), 0);
    for (int b = 0; b < N / 32; b++) {
        const float d = fabsf(kp_fp16_to_f32(((kp_block_q8_0 *)q)[b].d));
        for (int j = 0; j < 32; j++) {
            const float err = fabsf(x[32 * b + j] - y[32 * b + j]);
            if (err > d * (0.5f + 127.0f / 2048.0f) + 1e-30f) fail_msg("q8_0 block %d: err %g, d %g", b, err, d);
        }
    }
    /* Q4_0: |err| <= |d| (the value of largest magnitude maps to -8; its
     * opposite clamps at +7), most within |d|/2 */
    assert_int_equal(kp_quant_row(KP_TYPE_Q4_0, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q4_0, q, y, N), 0);
    for (int b = 0; b < N / 32; b++) {
        const float d = fabsf(kp_fp16_to_f32(((kp_block_q4_0 *)q)[b].d));
        for (int j = 0; j < 32; j++) {
            const float err = fabsf(x[32 * b + j] - y[32 * b + j]);
            if (err > d * (1.0f + 16.0f / 2048.0f) + 1e-30f) fail_msg("q4_0 block %d: err %g, d %g", b, err, d);
        }
    }
    double rms_err, rms;
    tq_rms(y, x, N, &rms_err, &rms);
    assert_true(rms_err < 0.09 * rms); /* uniform data: step 2*amax/15 -> ~0.07 */

    /* Q8_K: exact f32 scale, |err| <= |d|/2; bsums are the block sums */
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_K, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q8_K, q, y, N), 0);
    for (int b = 0; b < N / 256; b++) {
        const kp_block_q8_K *k = (const kp_block_q8_K *)q + b;
        for (int j = 0; j < 256; j++) {
            const float err = fabsf(x[256 * b + j] - y[256 * b + j]);
            if (err > fabsf(k->d) * 0.5001f) fail_msg("q8_K block %d: err %g, d %g", b, err, k->d);
            assert_true(k->qs[j] >= -127 && k->qs[j] <= 127);
        }
        for (int j = 0; j < 16; j++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += k->qs[16 * j + i];
            assert_int_equal(k->bsums[j], sum);
        }
    }
    assert_true(((const kp_block_q8_K *)q)[1].d == 0.0f); /* the zero block */

    /* Q4_K and Q6_K: the reference quantisers' typical accuracy on uniform
     * data (measured: ~0.07 and ~0.02 of the rms), with margin */
    assert_int_equal(kp_quant_row(KP_TYPE_Q4_K, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q4_K, q, y, N), 0);
    tq_rms(y, x, N, &rms_err, &rms);
    print_message("q4_K rms err / rms = %.4f\n", rms_err / rms);
    assert_true(rms_err < 0.09 * rms);
    for (int i = 256; i < 512; i++) assert_true(y[i] == 0.0f);
    assert_int_equal(kp_quant_row(KP_TYPE_Q6_K, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_Q6_K, q, y, N), 0);
    tq_rms(y, x, N, &rms_err, &rms);
    print_message("q6_K rms err / rms = %.4f\n", rms_err / rms);
    assert_true(rms_err < 0.025 * rms);
    for (int i = 256; i < 512; i++) assert_true(y[i] == 0.0f);

    /* F16 / BF16 relative error */
    assert_int_equal(kp_quant_row(KP_TYPE_F16, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_F16, q, y, N), 0);
    for (int i = 0; i < N; i++) assert_true(fabsf(x[i] - y[i]) <= fabsf(x[i]) * (1.0f / 2048) + 3e-8f);
    assert_int_equal(kp_quant_row(KP_TYPE_BF16, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_BF16, q, y, N), 0);
    for (int i = 0; i < N; i++) assert_true(fabsf(x[i] - y[i]) <= fabsf(x[i]) * (1.0f / 256));
    assert_int_equal(kp_quant_row(KP_TYPE_F32, x, q, N), 0);
    assert_int_equal(kp_dequant_row(KP_TYPE_F32, q, y, N), 0);
    assert_memory_equal(x, y, N * sizeof *x);

    /* bad lengths and unsupported types */
    assert_int_equal(kp_quant_row(KP_TYPE_Q4_K, x, q, 255), KP_EINVAL);
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_0, x, q, 33), KP_EINVAL);
    assert_int_equal(kp_quant_row(4, x, q, 32), KP_EINVAL);
    assert_true(kp_quant_row(KP_TYPE_Q5_K, x, q, 256) < 0);
    assert_true(kp_dequant_row(KP_TYPE_Q2_K, q, y, 256) < 0);
    free(x);
    free(y);
    free(q);
}

/* Re-quantising dequantised Q4_0 / Q8_0 reproduces the bytes. */
static void test_idempotence(void **state) {
    (void)state;
    enum { N = 32 * 512 };
    float *x = malloc(N * sizeof *x), *y = malloc(N * sizeof *y);
    uint8_t *q1 = malloc(N * 2), *q2 = malloc(N * 2);
    uint64_t s = 4242;
    tu_rand_floats(x, N, 1.0f, &s);
    for (int i = 0; i < N; i++) x[i] *= (float)(1 + (i / 32) % 13) * 0.37f;
    const int types[] = {KP_TYPE_Q4_0, KP_TYPE_Q8_0};
    for (int t = 0; t < 2; t++) {
        const size_t bytes = kp_type_row_bytes(types[t], N);
        assert_int_equal(kp_quant_row(types[t], x, q1, N), 0);
        assert_int_equal(kp_dequant_row(types[t], q1, y, N), 0);
        assert_int_equal(kp_quant_row(types[t], y, q2, N), 0);
        assert_memory_equal(q1, q2, bytes);
    }
    free(x);
    free(y);
    free(q1);
    free(q2);
}

/* The SIMD Q8_0 / Q8_K quantisers against ggml's scalar definitions written
 * out here (quantize_row_q8_0_ref: roundf(x / d); quantize_row_q8_K_ref:
 * nearest_int(-127/max * x) with max the first value of largest magnitude),
 * on random data and on rows full of exact .5 ties. */
static int tq_nearest_int(float f) {
    float v = f + 12582912.f;
    int32_t i;
    memcpy(&i, &v, sizeof i);
    return (i & 0x007fffff) - 0x00400000;
}

static void test_quant_definitions(void **state) {
    (void)state;
    enum { N = 256 * 16 };
    float *x = malloc(N * sizeof *x);
    kp_block_q8_0 *q0 = malloc(N / 32 * sizeof *q0);
    kp_block_q8_K *qk = malloc(N / 256 * sizeof *qk);
    uint64_t s = 1;
    tu_rand_floats(x, N, 3.0f, &s);
    /* block 0 (both types): max magnitude 127, values k + 0.5 (exact ties);
     * a +127 after the first -127 must not win */
    x[0] = -127.0f;
    for (int j = 1; j < 256; j++) x[j] = (float)((j * 37) % 253 - 126) + 0.5f;
    x[200] = 127.0f;
    x[32] = 127.0f; /* q8_0 block 1: amax 127 too */
    /* a block with repeated max magnitudes of both signs, and a zero block */
    for (int j = 0; j < 256; j++) x[256 + j] = (j % 5 == 0) ? (j % 2 ? 2.0f : -2.0f) : x[256 + j] * 0.5f;
    memset(x + 512, 0, 256 * sizeof *x);
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_0, x, q0, N), 0);
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * b + j]));
        const float d = amax / 127, id = d ? 1.0f / d : 0.0f;
        assert_int_equal(q0[b].d, kp_f32_to_fp16(d));
        for (int j = 0; j < 32; j++) {
            const int want = (int)roundf(x[32 * b + j] * id);
            if (q0[b].qs[j] != want) fail_msg("q8_0 block %d elt %d: %d want %d", b, j, q0[b].qs[j], want);
        }
    }
    assert_int_equal(q0[0].qs[1], -89); /* -88.5 -> -89 (away from zero) */
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_K, x, qk, N), 0);
    for (int b = 0; b < N / 256; b++) {
        const float *xb = x + 256 * b;
        float max = 0, amax = 0;
        for (int j = 0; j < 256; j++)
            if (fabsf(xb[j]) > amax) {
                amax = fabsf(xb[j]);
                max = xb[j];
            }
        if (!amax) {
            assert_true(qk[b].d == 0.0f);
            for (int j = 0; j < 256; j++) assert_int_equal(qk[b].qs[j], 0);
            for (int j = 0; j < 16; j++) assert_int_equal(qk[b].bsums[j], 0);
            continue;
        }
        const float iscale = -127.f / max;
        assert_true(qk[b].d == 1 / iscale);
        for (int j = 0; j < 256; j++) {
            int want = tq_nearest_int(iscale * xb[j]);
            if (want > 127) want = 127;
            if (qk[b].qs[j] != want) fail_msg("q8_K block %d elt %d: %d want %d", b, j, qk[b].qs[j], want);
        }
        for (int j = 0; j < 16; j++) {
            int sum = 0;
            for (int i = 0; i < 16; i++) sum += qk[b].qs[16 * j + i];
            assert_int_equal(qk[b].bsums[j], sum);
        }
    }
    /* block 0: max = -127 (first), iscale = 1: ties to even, +127 stays 127 */
    assert_true(qk[0].d == 1.0f);
    assert_int_equal(qk[0].qs[0], -127);
    assert_int_equal(qk[0].qs[200], 127);
    assert_int_equal(qk[0].qs[1], -88); /* -88.5 -> -88 (even) */
    /* block 1: the first of the +-2 values is -2 (j = 0) */
    assert_true(qk[1].d == 1 / (-127.f / -2.0f));
    assert_int_equal(qk[1].qs[0], -127);
    assert_int_equal(qk[1].qs[5], 127);
    free(x);
    free(q0);
    free(qk);
}

/* kp_quant_row_act(Q8_0) is llama.cpp's x86 activation quantiser: scale
 * 127/amax, ties to even; checked against that definition written here. */
static void test_quant_act(void **state) {
    (void)state;
    enum { N = 32 * 64 };
    float *x = malloc(N * sizeof *x);
    kp_block_q8_0 *q = malloc(N / 32 * sizeof *q);
    uint64_t s = 31337;
    tu_rand_floats(x, N, 2.0f, &s);
    /* a block where x*127/amax hits exact .5 ties: amax = 127, values k+0.5 */
    for (int j = 0; j < 32; j++) x[j] = (j == 0) ? 127.0f : (float)(j - 16) + 0.5f;
    memset(x + 64, 0, 32 * sizeof *x);
    assert_int_equal(kp_quant_row_act(KP_TYPE_Q8_0, x, q, N), 0);
    for (int b = 0; b < N / 32; b++) {
        float amax = 0;
        for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(x[32 * b + j]));
        assert_int_equal(q[b].d, kp_f32_to_fp16(amax / 127.f));
        const float id = amax != 0 ? 127.f / amax : 0.f;
        for (int j = 0; j < 32; j++) {
            const int want = (int)nearbyintf(x[32 * b + j] * id);
            if (q[b].qs[j] != want) fail_msg("act q8_0 block %d elt %d: %d want %d", b, j, q[b].qs[j], want);
        }
    }
    /* ties to even: -14.5 -> -14, -13.5 -> -14, 0.5 -> 0, 1.5 -> 2 */
    assert_int_equal(q[0].qs[0], 127);
    assert_int_equal(q[0].qs[1], -14);
    assert_int_equal(q[0].qs[2], -14);
    assert_int_equal(q[0].qs[16], 0);
    assert_int_equal(q[0].qs[17], 2);
    /* the reference quantiser rounds those ties away from zero instead */
    kp_block_q8_0 r;
    assert_int_equal(kp_quant_row(KP_TYPE_Q8_0, x, &r, 32), 0);
    assert_int_equal(r.qs[1], -15);
    assert_int_equal(r.qs[2], -14);
    assert_int_equal(r.qs[16], 1);
    assert_int_equal(r.qs[17], 2);
    /* other types: identical to kp_quant_row */
    uint8_t *a = malloc(N * 4), *b2 = malloc(N * 4);
    const int types[] = {KP_TYPE_Q8_K, KP_TYPE_F16, KP_TYPE_BF16, KP_TYPE_F32};
    for (int t = 0; t < 4; t++) {
        assert_int_equal(kp_quant_row_act(types[t], x, a, N), 0);
        assert_int_equal(kp_quant_row(types[t], x, b2, N), 0);
        assert_memory_equal(a, b2, kp_type_row_bytes(types[t], N));
    }
    free(a);
    free(b2);
    free(x);
    free(q);
}

/* ---------------------------------------------------------------------- */
/* Dot products                                                           */
/* ---------------------------------------------------------------------- */

static const int tq_dot_types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16, KP_TYPE_Q8_0,
                                   KP_TYPE_Q4_0, KP_TYPE_Q4_K, KP_TYPE_Q6_K};

/* Random rows: w quantised to wtype, x to its vec_dot type; the fast and the
 * reference dot product against the double dot of the dequantised rows,
 * relative to sum |w_i x_i| (which bounds every partial sum). */
static void test_vec_dot_random(void **state) {
    (void)state;
    enum { NMAX = 4096 };
    float *wf = malloc(NMAX * sizeof *wf), *xf = malloc(NMAX * sizeof *xf);
    float *wd = malloc(NMAX * sizeof *wd), *xd = malloc(NMAX * sizeof *xd);
    uint8_t *wq = malloc(NMAX * 4), *xq = malloc(NMAX * 4);
    uint64_t s = 2024;
    const int lens[] = {256, 512, 768, 4096, 1000, 33, 7};
    for (size_t ti = 0; ti < KP_ARRAY_LEN(tq_dot_types); ti++) {
        const int wt = tq_dot_types[ti], xt = kp_vec_dot_type(wt);
        for (size_t li = 0; li < KP_ARRAY_LEN(lens); li++) {
            const int n = lens[li];
            if (n % kp_type_block(wt) != 0) continue;
            for (int rep = 0; rep < 4; rep++) {
                tu_rand_floats(wf, n, 1.0f, &s);
                tu_rand_floats(xf, n, 4.0f, &s);
                if (rep == 1) /* skewed: one large value per block */
                    for (int i = 0; i < n; i += 37) xf[i] *= 30.0f;
                if (rep == 2) /* mostly positive products: no cancellation */
                    for (int i = 0; i < n; i++) xf[i] = fabsf(xf[i]) * (wf[i] < 0 ? -1.0f : 1.0f);
                assert_int_equal(kp_quant_row(wt, wf, wq, n), 0);
                if (rep == 3)
                    assert_int_equal(kp_quant_row_act(xt, xf, xq, n), 0);
                else
                    assert_int_equal(kp_quant_row(xt, xf, xq, n), 0);
                assert_int_equal(kp_dequant_row(wt, wq, wd, n), 0);
                assert_int_equal(kp_dequant_row(xt, xq, xd, n), 0);
                double exact = 0, mag = 0;
                for (int i = 0; i < n; i++) {
                    exact += (double)wd[i] * xd[i];
                    mag += fabs((double)wd[i] * xd[i]);
                }
                const float fast = kp_vec_dot(wt, n, wq, xq);
                const float ref = kp_vec_dot_ref(wt, n, wq, xq);
                /* float accumulation over n terms; the scale products round
                 * once or twice per block */
                const double tol = 4e-7 * mag * (1 + sqrt((double)n) / 4) + 1e-30;
                if (fabs(fast - exact) > tol || fabs(ref - exact) > tol || fabs(fast - ref) > tol)
                    fail_msg("%s n=%d rep=%d: fast %.9g ref %.9g exact %.9g (sum|.| %g)", kp_type_name(wt), n, rep,
                             fast, ref, exact, mag);
            }
        }
    }
    free(wf);
    free(xf);
    free(wd);
    free(xd);
    free(wq);
    free(xq);
}

/* Blocks with power-of-two scales and extreme integers: every float step is
 * exact, so fast == ref == the integer dot product, exactly. */
static void test_vec_dot_exact(void **state) {
    (void)state;
    enum { NB = 8 };
    uint64_t s = 555;
    for (int rep = 0; rep < 50; rep++) {
        const int extreme = rep < 10;
        /* Q8_0 . Q8_0 and Q4_0 . Q8_0 */
        kp_block_q8_0 w8[NB], x8[NB];
        kp_block_q4_0 w4[NB];
        int64_t want8 = 0, want4 = 0;
        for (int b = 0; b < NB; b++) {
            w8[b].d = x8[b].d = w4[b].d = 0x3c00;
            for (int j = 0; j < 32; j++) {
                w8[b].qs[j] = (int8_t)(extreme ? (j % 2 ? 127 : -127) : (int)(tq_next(&s) % 255) - 127);
                x8[b].qs[j] = (int8_t)(extreme ? (j % 3 ? -127 : 127) : (int)(tq_next(&s) % 255) - 127);
                want8 += w8[b].qs[j] * x8[b].qs[j];
            }
            for (int j = 0; j < 16; j++) {
                const int lo = extreme ? 0 : (int)(tq_next(&s) % 16), hi = extreme ? 15 : (int)(tq_next(&s) % 16);
                w4[b].qs[j] = (uint8_t)(lo | hi << 4);
                want4 += (lo - 8) * x8[b].qs[j] + (hi - 8) * x8[b].qs[j + 16];
            }
        }
        assert_true(kp_vec_dot(KP_TYPE_Q8_0, 32 * NB, w8, x8) == (float)want8);
        assert_true(kp_vec_dot_ref(KP_TYPE_Q8_0, 32 * NB, w8, x8) == (float)want8);
        assert_true(kp_vec_dot(KP_TYPE_Q4_0, 32 * NB, w4, x8) == (float)want4);
        assert_true(kp_vec_dot_ref(KP_TYPE_Q4_0, 32 * NB, w4, x8) == (float)want4);

        /* Q4_K . Q8_K and Q6_K . Q8_K with unit scales: every partial sum is
         * an integer below 2^24. Extremes (one super-block): all q4 = 15 with
         * all 6-bit scales and mins = 31; all q6 = 63 (+31) with scales +-8;
         * q8 = +127 then -127. Otherwise two random super-blocks. */
        const int nbk = extreme ? 1 : 2;
        kp_block_q8_K xk[2];
        kp_block_q4_K w4k[2];
        kp_block_q6_K w6k[2];
        for (int b = 0; b < nbk; b++) {
            xk[b].d = 1.0f;
            for (int j = 0; j < 256; j++)
                xk[b].qs[j] = (int8_t)(extreme ? (j < 128 ? 127 : -127) : (int)(tq_next(&s) % 255) - 127);
            for (int j = 0; j < 16; j++) {
                int sum = 0;
                for (int i = 0; i < 16; i++) sum += xk[b].qs[16 * j + i];
                xk[b].bsums[j] = (int16_t)sum;
            }
            w4k[b].d = 0x3c00;
            w4k[b].dmin = 0x3c00;
            for (int i = 0; i < 12; i++) w4k[b].scales[i] = extreme ? (i < 8 ? 0x5F : 0xFF) : (uint8_t)tq_next(&s);
            for (int i = 0; i < 128; i++) w4k[b].qs[i] = extreme ? 0xFF : (uint8_t)tq_next(&s);
            w6k[b].d = 0x3c00;
            for (int i = 0; i < 128; i++) w6k[b].ql[i] = extreme ? 0xFF : (uint8_t)tq_next(&s);
            for (int i = 0; i < 64; i++) w6k[b].qh[i] = extreme ? 0xFF : (uint8_t)tq_next(&s);
            for (int i = 0; i < 16; i++)
                w6k[b].scales[i] = (int8_t)(extreme ? (i % 2 ? 8 : -8) : (int)(tq_next(&s) % 256) - 128);
        }
        const int n = 256 * nbk;
        float wd[512], xd[512];
        if (extreme) {
            /* the packing gives scale 31 and min 31 for all eight sub-blocks */
            assert_int_equal(kp_dequant_row(KP_TYPE_Q4_K, w4k, wd, 256), 0);
            for (int i = 0; i < 256; i++) assert_true(wd[i] == 31.0f * 15 - 31.0f);
        }
        /* expected from the dequantised rows (small integers: exact) */
        assert_int_equal(kp_dequant_row(KP_TYPE_Q8_K, xk, xd, n), 0);
        double e4 = 0, e6 = 0;
        assert_int_equal(kp_dequant_row(KP_TYPE_Q4_K, w4k, wd, n), 0);
        for (int i = 0; i < n; i++) e4 += (double)wd[i] * xd[i];
        assert_int_equal(kp_dequant_row(KP_TYPE_Q6_K, w6k, wd, n), 0);
        for (int i = 0; i < n; i++) e6 += (double)wd[i] * xd[i];
        assert_true(fabs(e4) < 16777216.0 && fabs(e6) < 16777216.0);
        const float f4 = kp_vec_dot(KP_TYPE_Q4_K, n, w4k, xk), r4 = kp_vec_dot_ref(KP_TYPE_Q4_K, n, w4k, xk);
        const float f6 = kp_vec_dot(KP_TYPE_Q6_K, n, w6k, xk), r6 = kp_vec_dot_ref(KP_TYPE_Q6_K, n, w6k, xk);
        if ((double)f4 != e4 || (double)r4 != e4)
            fail_msg("q4_K rep %d: fast %.9g ref %.9g want %.9g", rep, f4, r4, e4);
        if ((double)f6 != e6 || (double)r6 != e6)
            fail_msg("q6_K rep %d: fast %.9g ref %.9g want %.9g", rep, f6, r6, e6);
    }
}

/* kp_vec_dot_rows and kp_vec_dot_nx equal kp_vec_dot call by call, bit for
 * bit (batching must not change results). */
static void test_vec_dot_rows(void **state) {
    (void)state;
    enum { NMAX = 1280, R = 9 };
    float *w = malloc(NMAX * R * sizeof *w), *x = malloc(NMAX * sizeof *x);
    uint8_t *wq = malloc(NMAX * R * 4), *xq = malloc(NMAX * 4), *xs = malloc(NMAX * R * 4);
    uint64_t s = 8;
    tu_rand_floats(w, NMAX * R, 1.0f, &s);
    tu_rand_floats(x, NMAX, 1.0f, &s);
    for (size_t ti = 0; ti < KP_ARRAY_LEN(tq_dot_types); ti++) {
        const int wt = tq_dot_types[ti], xt = kp_vec_dot_type(wt);
        /* 1056 and 1064: tails after the 64-wide float loops */
        const int lens[] = {1280, 1056, 1064};
        for (size_t li = 0; li < KP_ARRAY_LEN(lens); li++) {
            const int n = lens[li];
            if (n % kp_type_block(wt) != 0) continue;
            const size_t rb = kp_type_row_bytes(wt, n), xrb = kp_type_row_bytes(xt, n);
            for (int r = 0; r < R; r++) assert_int_equal(kp_quant_row(wt, w + r * n, wq + r * rb, n), 0);
            assert_int_equal(kp_quant_row(xt, x, xq, n), 0);
            float out[R];
            kp_vec_dot_rows(wt, n, R, wq, rb, xq, out);
            for (int r = 0; r < R; r++) assert_true(out[r] == kp_vec_dot(wt, n, wq + r * rb, xq));
            /* nx: weight row 1 against the R rows of w quantised as activations */
            for (int r = 0; r < R; r++) assert_int_equal(kp_quant_row(xt, w + r * n, xs + r * xrb, n), 0);
            for (int nx = 1; nx <= R; nx++) {
                float o2[2 * R];
                for (int i = 0; i < 2 * R; i++) o2[i] = NAN;
                kp_vec_dot_nx(wt, n, wq + rb, xs, xrb, nx, o2, 2);
                for (int j = 0; j < nx; j++) {
                    const float want = kp_vec_dot(wt, n, wq + rb, xs + j * xrb);
                    if (memcmp(&o2[2 * j], &want, sizeof want) != 0)
                        fail_msg("%s n=%d nx=%d j=%d: %.9g vs %.9g", kp_type_name(wt), n, nx, j, o2[2 * j], want);
                }
                for (int j = nx; j < R; j++) assert_true(isnan(o2[2 * j]));
                for (int j = 0; j < R; j++) assert_true(isnan(o2[2 * j + 1]));
            }
        }
    }
    free(w);
    free(x);
    free(wq);
    free(xq);
    free(xs);
}

/* kp_vec_dot_tile (Q8_0, Q4_0 weights with VNNI): every tile shape against
 * the scalar reference of each pair, within the float tolerance of
 * test_vec_dot_random (the integer block sums are the same; the float order
 * differs), and nothing written outside the tile. Skips where the CPU or
 * build has no tile (kp_vec_dot_tile returns 0: the matmul uses nx). */
static void test_vec_dot_tile(void **state) {
    (void)state;
    enum { N = 1024, R = 4 };
    const int types[] = {KP_TYPE_Q8_0, KP_TYPE_Q4_0};
    float *w = malloc(N * R * sizeof *w), *x = malloc(N * R * sizeof *x);
    uint8_t *wq = malloc(N * R * 2), *xq = malloc(N * R * 2);
    uint64_t s = 77;
    int done = 0;
    for (size_t ti = 0; ti < KP_ARRAY_LEN(types); ti++) {
        const int wt = types[ti], xt = kp_vec_dot_type(wt);
        for (int rep = 0; rep < 3; rep++) {
            tu_rand_floats(w, N * R, 1.0f, &s);
            tu_rand_floats(x, N * R, rep == 2 ? 40.0f : 4.0f, &s);
            const int n = rep == 1 ? 32 * 5 : N; /* an odd block count too */
            const size_t rb = kp_type_row_bytes(wt, n), xrb = kp_type_row_bytes(xt, n);
            for (int r = 0; r < R; r++) {
                assert_int_equal(kp_quant_row(wt, w + r * n, wq + r * rb, n), 0);
                assert_int_equal(kp_quant_row_act(xt, x + r * n, xq + r * xrb, n), 0);
            }
            for (int nw = 1; nw <= R; nw++)
                for (int nx = 1; nx <= R; nx++) {
                    float out[R * (R + 1)];
                    for (int i = 0; i < R * (R + 1); i++) out[i] = NAN;
                    if (!kp_vec_dot_tile(wt, n, wq, rb, nw, xq, xrb, nx, out, R + 1)) continue;
                    done++;
                    for (int j = 0; j < R; j++)
                        for (int r = 0; r <= R; r++) {
                            const float got = out[j * (R + 1) + r];
                            if (j >= nx || r >= nw) {
                                assert_true(isnan(got));
                                continue;
                            }
                            const float ref = kp_vec_dot_ref(wt, n, wq + r * rb, xq + j * xrb);
                            double mag = 0;
                            float wd[N], xd[N];
                            kp_dequant_row(wt, wq + r * rb, wd, n);
                            kp_dequant_row(xt, xq + j * xrb, xd, n);
                            for (int i = 0; i < n; i++) mag += fabs((double)wd[i] * xd[i]);
                            const double tol = 4e-7 * mag * (1 + sqrt((double)n) / 4) + 1e-30;
                            if (fabs((double)got - ref) > tol)
                                fail_msg("%s n=%d tile %dx%d (%d,%d): %.9g vs ref %.9g (tol %g)", kp_type_name(wt), n,
                                         nw, nx, r, j, got, ref, tol);
                        }
                }
        }
    }
    if (!done) print_message("skipped: no VNNI tile in this build (kp_vec_dot_tile returns 0)\n");
    free(w);
    free(x);
    free(wq);
    free(xq);
}

/* ---------------------------------------------------------------------- */
/* Bit-exactness with llama-quantize (tiny-llama-256 models)              */
/* ---------------------------------------------------------------------- */

typedef struct tq_tensor {
    char name[128];
    int type;
    int64_t ne0, nrows;
    const uint8_t *data;
} tq_tensor;

typedef struct tq_gguf {
    char *buf;
    size_t len, pos;
    int n;
    tq_tensor *t;
} tq_gguf;

static int tq_rd(tq_gguf *g, void *out, size_t n) {
    if (g->pos + n > g->len) return -1;
    memcpy(out, g->buf + g->pos, n);
    g->pos += n;
    return 0;
}

static uint64_t tq_u64(tq_gguf *g) {
    uint64_t v = 0;
    if (tq_rd(g, &v, 8)) fail_msg("gguf truncated");
    return v;
}

static uint32_t tq_u32(tq_gguf *g) {
    uint32_t v = 0;
    if (tq_rd(g, &v, 4)) fail_msg("gguf truncated");
    return v;
}

static void tq_skip_value(tq_gguf *g, uint32_t type) {
    static const size_t size[13] = {1, 1, 2, 2, 4, 4, 4, 1, 0, 0, 8, 8, 8};
    if (type == 8) {
        g->pos += tq_u64(g);
    } else if (type == 9) {
        const uint32_t et = tq_u32(g);
        const uint64_t count = tq_u64(g);
        for (uint64_t i = 0; i < count; i++) tq_skip_value(g, et);
    } else if (type < 13) {
        g->pos += size[type];
    } else {
        fail_msg("gguf: bad value type %u", type);
    }
}

/* Minimal GGUF v3 walk: tensor names, types, shapes, data pointers. */
static void tq_gguf_load(tq_gguf *g, const char *rel) {
    char *path = tu_shared_path(rel);
    memset(g, 0, sizeof *g);
    g->buf = tu_read_file(path, &g->len);
    free(path);
    assert_non_null(g->buf);
    assert_true(g->len > 24 && memcmp(g->buf, "GGUF", 4) == 0);
    g->pos = 8;
    const uint64_t n_tensors = tq_u64(g), n_kv = tq_u64(g);
    uint32_t alignment = 32;
    for (uint64_t i = 0; i < n_kv; i++) {
        const uint64_t klen = tq_u64(g);
        const char *key = g->buf + g->pos;
        g->pos += klen;
        const uint32_t type = tq_u32(g);
        if (klen == 17 && memcmp(key, "general.alignment", 17) == 0 && type == 4)
            alignment = tq_u32(g);
        else
            tq_skip_value(g, type);
    }
    g->n = (int)n_tensors;
    g->t = calloc(n_tensors, sizeof *g->t);
    uint64_t *offs = calloc(n_tensors, sizeof *offs);
    for (uint64_t i = 0; i < n_tensors; i++) {
        const uint64_t nlen = tq_u64(g);
        assert_true(nlen < sizeof g->t[i].name);
        assert_int_equal(tq_rd(g, g->t[i].name, nlen), 0);
        const uint32_t nd = tq_u32(g);
        g->t[i].nrows = 1;
        for (uint32_t d = 0; d < nd; d++) {
            const int64_t ne = (int64_t)tq_u64(g);
            if (d == 0)
                g->t[i].ne0 = ne;
            else
                g->t[i].nrows *= ne;
        }
        g->t[i].type = (int)tq_u32(g);
        offs[i] = tq_u64(g);
    }
    const size_t data0 = (g->pos + alignment - 1) / alignment * alignment;
    for (uint64_t i = 0; i < n_tensors; i++) {
        const size_t bytes = kp_type_row_bytes(g->t[i].type, g->t[i].ne0) * (size_t)g->t[i].nrows;
        assert_true(bytes > 0 && data0 + offs[i] + bytes <= g->len);
        g->t[i].data = (const uint8_t *)g->buf + data0 + offs[i];
    }
    free(offs);
}

static void tq_gguf_free(tq_gguf *g) {
    free(g->buf);
    free(g->t);
}

static const tq_tensor *tq_find(const tq_gguf *g, const char *name) {
    for (int i = 0; i < g->n; i++)
        if (strcmp(g->t[i].name, name) == 0) return &g->t[i];
    return NULL;
}

static void test_llama_quantize_bit_exact(void **state) {
    (void)state;
    static const char *models[] = {
        "models/tiny-llama-256-Q8_0.gguf",  "models/tiny-llama-256-Q4_0.gguf",
        "models/tiny-llama-256-Q4_0-pure.gguf", "models/tiny-llama-256-Q4_K_M.gguf",
        "models/tiny-llama-256-F16.gguf",   "models/tiny-llama-256-BF16.gguf",
    };
    TU_SKIP_UNLESS_SHARED("models/tiny-llama-256.gguf");
    tq_gguf src;
    tq_gguf_load(&src, "models/tiny-llama-256.gguf");
    int types_seen[KP_TYPE_COUNT] = {0};
    for (size_t m = 0; m < KP_ARRAY_LEN(models); m++) {
        TU_SKIP_UNLESS_SHARED(models[m]);
        tq_gguf g;
        tq_gguf_load(&g, models[m]);
        int64_t rows = 0, bad_rows = 0;
        for (int i = 0; i < g.n; i++) {
            const tq_tensor *t = &g.t[i];
            if (t->type == KP_TYPE_F32) continue;
            const tq_tensor *f = tq_find(&src, t->name);
            assert_non_null(f);
            assert_int_equal(f->type, KP_TYPE_F32);
            assert_int_equal(f->ne0, t->ne0);
            assert_int_equal(f->nrows, t->nrows);
            assert_true(kp_type_supported(t->type));
            types_seen[t->type]++;
            const size_t rb = kp_type_row_bytes(t->type, t->ne0);
            uint8_t *q = malloc(rb);
            float *deq = malloc(t->ne0 * sizeof *deq);
            for (int64_t r = 0; r < t->nrows; r++) {
                const float *x = (const float *)f->data + r * f->ne0;
                assert_int_equal(kp_quant_row(t->type, x, q, t->ne0), 0);
                rows++;
                if (memcmp(q, t->data + r * rb, rb) != 0) {
                    if (bad_rows++ < 3) {
                        size_t k = 0;
                        while (q[k] == t->data[r * rb + k]) k++;
                        print_message("%s %s row %lld: first differing byte %zu (%02x vs file %02x)\n", models[m],
                                      t->name, (long long)r, k, q[k], t->data[r * rb + k]);
                    }
                }
                /* and the file's row dequantises close to the source */
                assert_int_equal(kp_dequant_row(t->type, t->data + r * rb, deq, t->ne0), 0);
                double e = 0, s2 = 0;
                for (int64_t k = 0; k < t->ne0; k++) {
                    e += ((double)deq[k] - x[k]) * ((double)deq[k] - x[k]);
                    s2 += (double)x[k] * x[k];
                }
                if (!(e <= 0.0225 * s2 + 1e-30)) /* rms error <= 15%: Q4_0 on Gaussian data is ~10% */
                    fail_msg("%s %s row %lld: rms err %g of rms %g", models[m], t->name, (long long)r, sqrt(e / t->ne0), sqrt(s2 / t->ne0));
            }
            free(q);
            free(deq);
        }
        print_message("%s: %lld rows, %lld differ from llama-quantize\n", models[m], (long long)rows,
                      (long long)bad_rows);
        assert_true(rows > 0);
        assert_int_equal(bad_rows, 0);
        tq_gguf_free(&g);
    }
    /* every weight type kvpark computes with was covered */
    assert_true(types_seen[KP_TYPE_Q8_0] && types_seen[KP_TYPE_Q4_0] && types_seen[KP_TYPE_Q4_K] &&
                types_seen[KP_TYPE_Q6_K] && types_seen[KP_TYPE_F16] && types_seen[KP_TYPE_BF16]);
    tq_gguf_free(&src);
}

/* KVPARK_BENCH_QUANT=1: time kp_vec_dot_rows (fast and reference) per type
 * on matrices of small-model shapes. Prints, never fails. */
static double tq_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static float tq_ref_rows(int wt, int64_t n, int64_t nrows, const uint8_t *w, size_t rb, const void *x, float *out) {
    for (int64_t r = 0; r < nrows; r++) out[r] = kp_vec_dot_ref(wt, n, w + r * rb, x);
    return out[0];
}

static void test_bench(void **state) {
    (void)state;
    const char *env = getenv("KVPARK_BENCH_QUANT");
    if (!env || !*env || *env == '0') skip();
    {
        enum { N = 4096, REP = 200 };
        float *x = malloc(N * sizeof *x);
        uint8_t *q = malloc(N * 4);
        uint64_t s = 5;
        tu_rand_floats(x, N, 1.0f, &s);
        const int qt[] = {KP_TYPE_Q8_0, KP_TYPE_Q8_K, KP_TYPE_F16, KP_TYPE_BF16};
        for (size_t i = 0; i < KP_ARRAY_LEN(qt); i++) {
            for (int act = 0; act < 2; act++) {
                double t0 = tq_now();
                for (int r = 0; r < REP; r++) (act ? kp_quant_row_act : kp_quant_row)(qt[i], x, q, N);
                print_message("quant%s %-5s %6.2f ns/elt\n", act ? "_act" : "    ", kp_type_name(qt[i]),
                              (tq_now() - t0) / REP / N * 1e9);
            }
        }
        free(x);
        free(q);
    }
    const int ns[] = {256, 512, 2048};
    for (size_t ni = 0; ni < KP_ARRAY_LEN(ns); ni++) {
        const int n = ns[ni], nrows = 8 * 1048576 / n / 4; /* 8 MiB of f32 weights */
        float *wf = malloc((size_t)n * nrows * sizeof *wf), *xf = malloc(n * sizeof *xf);
        float *out = malloc(nrows * sizeof *out);
        uint8_t *wq = malloc((size_t)n * nrows * 4), *xq = malloc(n * 4 * 4);
        float *out4 = malloc(nrows * 4 * sizeof *out4);
        uint64_t s = 1;
        tu_rand_floats(wf, (size_t)n * nrows, 1.0f, &s);
        tu_rand_floats(xf, n, 1.0f, &s);
        for (size_t ti = 0; ti < KP_ARRAY_LEN(tq_dot_types); ti++) {
            const int wt = tq_dot_types[ti];
            const size_t rb = kp_type_row_bytes(wt, n);
            for (int r = 0; r < nrows; r++) kp_quant_row(wt, wf + (size_t)r * n, wq + r * rb, n);
            const size_t xrb = kp_type_row_bytes(kp_vec_dot_type(wt), n);
            for (int j = 0; j < 4; j++) kp_quant_row(kp_vec_dot_type(wt), xf, xq + j * xrb, n);
            double best = 1e9, best_ref = 1e9, best4 = 1e9;
            for (int it = 0; it < 3; it++) {
                double t0 = tq_now();
                for (int r = 0; r < nrows; r++) kp_vec_dot_nx(wt, n, wq + r * rb, xq, xrb, 4, out4 + r, nrows);
                if (tq_now() - t0 < best4) best4 = tq_now() - t0;
            }
            for (int it = 0; it < 5; it++) {
                double t0 = tq_now();
                kp_vec_dot_rows(wt, n, nrows, wq, rb, xq, out);
                double t1 = tq_now();
                if (it < 2) tq_ref_rows(wt, n, nrows, wq, rb, xq, out);
                double t2 = tq_now();
                if (t1 - t0 < best) best = t1 - t0;
                if (it < 2 && t2 - t1 < best_ref) best_ref = t2 - t1;
            }
            print_message("n=%5d %-5s %7.1f ns/row  %6.2f GB/s  %6.1f Gmac/s  (ref %7.1f ns/row, x%.1f; "
                          "nx=4: %6.1f ns/row/x)\n", n,
                          kp_type_name(wt), best / nrows * 1e9, rb * (double)nrows / best * 1e-9,
                          (double)n * nrows / best * 1e-9, best_ref / nrows * 1e9, best_ref / best,
                          best4 / nrows / 4 * 1e9);
        }
        free(wf);
        free(xf);
        free(out);
        free(wq);
        free(xq);
        free(out4);
    }
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_type_table),
        cmocka_unit_test(test_fp16_known),
        cmocka_unit_test(test_fp16_soft_vs_hard),
        cmocka_unit_test(test_bf16_known),
        cmocka_unit_test(test_row_conversions),
        cmocka_unit_test(test_dequant_q8_0_q4_0_blocks),
        cmocka_unit_test(test_dequant_q4_K_block),
        cmocka_unit_test(test_dequant_q6_K_block),
        cmocka_unit_test(test_dequant_q8_K_block),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_idempotence),
        cmocka_unit_test(test_quant_definitions),
        cmocka_unit_test(test_quant_act),
        cmocka_unit_test(test_vec_dot_random),
        cmocka_unit_test(test_vec_dot_exact),
        cmocka_unit_test(test_vec_dot_rows),
        cmocka_unit_test(test_vec_dot_tile),
        cmocka_unit_test(test_llama_quantize_bit_exact),
        cmocka_unit_test(test_bench),
    };
    return cmocka_run_group_tests_name("quant", tests, NULL, NULL);
}
