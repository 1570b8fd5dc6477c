/*
 * types.c — the table of tensor element types (block size, block bytes, name)
 * and scalar fp16 / bf16 <-> f32 conversions.
 *
 * Why: every module that touches tensor data (GGUF reader, kernels, KV cache)
 * needs the same answer to "how many bytes is a row of this type" and the
 * same half-precision rounding as llama.cpp, or results drift. Block sizes and
 * names are ggml's (ggml.c type_traits); conversions round to nearest even
 * exactly as the x86 F16C instructions (which ggml uses) do.
 *
 * The fp16 conversion has two implementations giving identical bits: F16C
 * instructions when the compiler targets them, and a portable bit-twiddling
 * version (kp_*_soft, always compiled, used by the tests to cross-check).
 */
#include "kernels/types.h"

#include <string.h>

#if defined(__F16C__)
#include <immintrin.h>
#endif

typedef struct kp_type_info {
    const char *name;
    int block;          /* elements per block */
    size_t block_bytes; /* bytes per block */
    int supported;      /* kvpark can compute with it */
} kp_type_info;

/* Indexed by kp_type; gaps (ggml's removed types 4, 5, ...) stay zero. */
static const kp_type_info kp_types[KP_TYPE_COUNT] = {
    [KP_TYPE_F32] = {"f32", 1, 4, 1},
    [KP_TYPE_F16] = {"f16", 1, 2, 1},
    [KP_TYPE_Q4_0] = {"q4_0", 32, 18, 1},
    [KP_TYPE_Q4_1] = {"q4_1", 32, 20, 0},
    [KP_TYPE_Q5_0] = {"q5_0", 32, 22, 0},
    [KP_TYPE_Q5_1] = {"q5_1", 32, 24, 0},
    [KP_TYPE_Q8_0] = {"q8_0", 32, 34, 1},
    [KP_TYPE_Q8_1] = {"q8_1", 32, 36, 0},
    [KP_TYPE_Q2_K] = {"q2_K", 256, 84, 0},
    [KP_TYPE_Q3_K] = {"q3_K", 256, 110, 0},
    [KP_TYPE_Q4_K] = {"q4_K", 256, 144, 1},
    [KP_TYPE_Q5_K] = {"q5_K", 256, 176, 0},
    [KP_TYPE_Q6_K] = {"q6_K", 256, 210, 1},
    [KP_TYPE_Q8_K] = {"q8_K", 256, 292, 0},
    [KP_TYPE_BF16] = {"bf16", 1, 2, 1},
};

static const kp_type_info *kp_type_get(int type) {
    if (type < 0 || type >= KP_TYPE_COUNT || kp_types[type].block == 0) return NULL;
    return &kp_types[type];
}

int kp_type_block(int type) {
    const kp_type_info *t = kp_type_get(type);
    return t ? t->block : 0;
}

size_t kp_type_block_bytes(int type) {
    const kp_type_info *t = kp_type_get(type);
    return t ? t->block_bytes : 0;
}

size_t kp_type_row_bytes(int type, int64_t n) {
    const kp_type_info *t = kp_type_get(type);
    if (!t || n < 0 || n % t->block != 0) return 0;
    return (size_t)(n / t->block) * t->block_bytes;
}

const char *kp_type_name(int type) {
    const kp_type_info *t = kp_type_get(type);
    return t ? t->name : NULL;
}

int kp_type_supported(int type) {
    const kp_type_info *t = kp_type_get(type);
    return t ? t->supported : 0;
}

static inline uint32_t kp_f32_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float kp_bits_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* ---- fp16, portable ------------------------------------------------------ */

float kp_fp16_to_f32_soft(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ff;
    if (exp == 0x1f) /* inf, or NaN made quiet with its payload kept (as F16C) */
        return kp_bits_f32(sign | 0x7f800000 | (mant << 13) | (mant ? 0x400000u : 0));
    if (exp == 0) {
        if (mant == 0) return kp_bits_f32(sign);
        /* subnormal: mant * 2^-24, exact in f32 */
        float v = (float)mant * (1.0f / 16777216.0f);
        return sign ? -v : v;
    }
    return kp_bits_f32(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t kp_f32_to_fp16_soft(float f) {
    uint32_t x = kp_f32_bits(f);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    uint32_t ax = x & 0x7fffffff;

    if (ax > 0x7f800000) /* NaN: quieten, keep the top payload bits (as F16C) */
        return sign | 0x7e00 | (uint16_t)((ax >> 13) & 0x3ff);
    if (ax >= 0x47800000) /* >= 65536 (or inf): infinity */
        return sign | 0x7c00;
    if (ax >= 0x38800000) { /* result is normal (or rounds up to inf) */
        uint32_t h = (ax - 0x38000000) >> 13; /* rebias exponent 127 -> 15 */
        uint32_t rem = ax & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1))) h++; /* carry is fine */
        return sign | (uint16_t)h;
    }
    if (ax <= 0x33000000) /* <= 2^-25: rounds to zero (tie goes to even 0) */
        return sign;
    /* result is subnormal: value = m * 2^(e-150), unit 2^-24 */
    uint32_t e = ax >> 23;
    uint32_t m = (ax & 0x7fffff) | 0x800000;
    uint32_t shift = 126 - e; /* 14..24 */
    uint32_t h = m >> shift;
    uint32_t rem = m & ((1u << shift) - 1);
    uint32_t half = 1u << (shift - 1);
    if (rem > half || (rem == half && (h & 1))) h++;
    return sign | (uint16_t)h;
}

/* ---- fp16, public ---------------------------------------------------------- */

float kp_fp16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    return kp_fp16_to_f32_soft(h);
#endif
}

uint16_t kp_f32_to_fp16(float f) {
#if defined(__F16C__)
    return (uint16_t)_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    return kp_f32_to_fp16_soft(f);
#endif
}

/* ---- bf16 (ggml_compute_fp32_to_bf16 / bf16_to_fp32) ----------------------- */

float kp_bf16_to_f32(uint16_t h) {
    return kp_bits_f32((uint32_t)h << 16);
}

uint16_t kp_f32_to_bf16(float f) {
    uint32_t x = kp_f32_bits(f);
    if ((x & 0x7fffffff) > 0x7f800000) /* NaN: force quiet */
        return (uint16_t)((x >> 16) | 64);
    return (uint16_t)((x + (0x7fff + ((x >> 16) & 1))) >> 16);
}
