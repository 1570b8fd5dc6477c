/*
 * codec_baseline.c — the baseline KV codecs: none, fp16, int8, int4, kivi2.
 *
 * They are the yardsticks every learned codec is compared with, and plain
 * user choices. Each turns a chunk of rows [n][H][D] (H = n_kv_heads,
 * D = head_dim) of F32, F16 or BF16 into the PAYLOAD that follows the
 * 16-byte chunk header (codec.c) and back. codec.c has checked the chunk
 * and, on decode, the header and checksum before these functions run.
 *
 * Byte layouts (a CUDA decoder reads the same bytes). All multi-byte values
 * little-endian; "fp16" = IEEE binary16 bits. Every array is dense, packed
 * one after another from payload offset 0 in the order listed, no padding
 * between arrays. Notation:
 *   R  = H * D              values per token row
 *   G  = min(32, D)         values per group along head_dim
 *   NG = ceil(D / G)        groups per (token, head); group g covers dims
 *                           [g*G, min(D, g*G + G)): when D is not a multiple
 *                           of 32 (D > 32) the last group is shorter
 *   es = 4 (F32) or 2 (F16, BF16)
 *
 * none   payload = n*R*es bytes: the rows as they are, [n][H][D] of kv_type.
 *
 * fp16   payload = n*R*2 bytes: [n][H][D] fp16, converted from kv_type with
 *        round-to-nearest-even (F16 rows are copied bit for bit). Decode
 *        converts back (to BF16 with round-to-nearest-even).
 *
 * int8   per token, head and group (like ggml's q8_0):
 *          scale[n][H][NG]  fp16   d = fp16(amax / 127), amax = max |x| of the group
 *          q[n][H][D]       int8   q = round_half_even(x / d) clamped to [-127, 127]
 *        payload = 2*n*H*NG + n*R bytes.   value = (float)q * d
 *        (q is computed against the fp16-rounded d, so |x - value| <= d/2.)
 *
 * int4   per token, head and group (like ggml's q4_0):
 *          scale[n][H][NG]       fp16  d = fp16(m / -8), m = the group's value of
 *                                      largest magnitude (first one, with its sign)
 *          code[n][H][ceil(D/2)] u8    byte k of a (token, head) holds dim 2k in
 *                                      bits 0..3 and dim 2k+1 in bits 4..7 (zero
 *                                      if 2k+1 == D); q = round_half_even(x / d)
 *                                      clamped to [-8, 7], stored as q + 8 (0..15)
 *        payload = 2*n*H*NG + n*H*ceil(D/2) bytes.   value = (float)(code - 8) * d
 *        (|x - value| <= |d|/2, except values on the opposite side of m near
 *        -m, which clamp to 7 and err by up to |d|, as in q4_0.)
 *
 * kivi2  KIVI (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit
 *        quantization for KV cache"): 2-bit asymmetric codes, each group with
 *          s = fp16((max - min) / 3), mn = fp16(min),
 *          q = round_half_even((x - mn) / s) clamped to [0, 3] (0 if s == 0),
 *          value = (float)q * s + mn   (float32 multiply, then add: no FMA)
 *        Codes are packed 4 to a byte, each (token, head) starting on a byte:
 *          code[n][H][ceil(D/4)] u8: byte k holds dims 4k..4k+3, dim 4k+i in
 *          bits 2i..2i+1 (bits past D are zero).
 *        VALUES (is_v = 1) are grouped per token, G values along head_dim:
 *          scale[n][H][NG] fp16, min[n][H][NG] fp16, code[n][H][ceil(D/4)]
 *          payload = 4*n*H*NG + n*H*ceil(D/4) bytes
 *        KEYS (is_v = 0) are grouped per channel (head, dim) over groups of
 *        32 consecutive tokens of the chunk (KIVI's G = 32; the last token
 *        group has n mod 32 tokens when n is not a multiple of 32). With
 *        NT = ceil(n / 32) and token group u = rows [32u, min(n, 32u + 32)):
 *          scale[NT][H][D] fp16, min[NT][H][D] fp16, code[n][H][ceil(D/4)]
 *          payload = 4*NT*R + n*H*ceil(D/4) bytes
 *        (KIVI keeps the most recent tokens in fp16; that is the session's
 *        policy, not the chunk codec's.)
 *
 * Inputs are assumed finite and within fp16 range for the lossy codecs;
 * NaN/Inf give unspecified values (never undefined behaviour: every float
 * is clamped before it is turned into an integer).
 *
 * Loops run a row at a time: convert the row to float once (kernels/cpu
 * row converters), then simple loops over contiguous arrays that the
 * compiler vectorises; the reverse on decode.
 */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "compress/codec_impl.h"
#include "kernels/cpu/quant.h"
#include "kernels/types.h"

#define KIVI_TOKEN_GROUP 32

/* ---- helpers -------------------------------------------------------------- */

/* A row of n values of kv_type as float: the row itself for F32, else
 * converted into tmp. */
static const float *row_as_f32(int kv_type, const void *src, float *tmp, int64_t n) {
    switch (kv_type) {
    case KP_TYPE_F16: kp_f16_to_f32_row(src, tmp, n); return tmp;
    case KP_TYPE_BF16: kp_bf16_to_f32_row(src, tmp, n); return tmp;
    default: return src;
    }
}

/* Where to build a decoded row: straight into the output for F32. */
static float *row_f32_target(int kv_type, void *dst, float *tmp) {
    return kv_type == KP_TYPE_F32 ? dst : tmp;
}

/* Finish a decoded row built by row_f32_target(). */
static void row_store(int kv_type, const float *f, void *dst, int64_t n) {
    switch (kv_type) {
    case KP_TYPE_F16: kp_f32_to_f16_row(f, dst, n); break;
    case KP_TYPE_BF16: kp_f32_to_bf16_row(f, dst, n); break;
    default: break; /* F32: already in place */
    }
}

static float fp16_round(float x, uint16_t *h) {
    *h = kp_f32_to_fp16(x);
    return kp_fp16_to_f32(*h);
}

static size_t row_values(const codec *c) {
    return (size_t)c->shape.n_kv_heads * (size_t)c->shape.head_dim;
}

static int scratch_alloc(void **p, size_t bytes, const codec *c, kp_err *err) {
    *p = malloc(bytes ? bytes : 1);
    if (!*p) return kp_errf(err, KP_ENOMEM, "codec '%s': out of memory (%zu bytes)", c->ops->name, bytes);
    return 0;
}

/* ---- none ----------------------------------------------------------------- */

static size_t none_bytes(const codec *c, int n, int kv_type, int is_v) {
    return (size_t)n * row_values(c) * codec_elem_size(kv_type);
}

static int none_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    memcpy(p, rows, none_bytes(c, ch->n, ch->kv_type, ch->is_v));
    return 0;
}

static int none_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    memcpy(rows, p, none_bytes(c, ch->n, ch->kv_type, ch->is_v));
    return 0;
}

const codec_ops codec_ops_none = {"none", CODEC_NONE, none_bytes, none_encode, none_decode};

/* ---- fp16 ----------------------------------------------------------------- */

static size_t fp16_bytes(const codec *c, int n, int kv_type, int is_v) {
    return (size_t)n * row_values(c) * 2;
}

static int fp16_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    const size_t R = row_values(c), total = (size_t)ch->n * R;
    uint16_t *dst = (uint16_t *)p;
    if (ch->kv_type == KP_TYPE_F16) {
        memcpy(dst, rows, total * 2);
    } else if (ch->kv_type == KP_TYPE_F32) {
        kp_f32_to_f16_row(rows, dst, (int64_t)total);
    } else { /* BF16 -> float -> fp16, a row at a time */
        float *tmp;
        int rc = scratch_alloc((void **)&tmp, R * sizeof(float), c, err);
        if (rc) return rc;
        for (int t = 0; t < ch->n; t++) {
            kp_bf16_to_f32_row((const uint16_t *)rows + (size_t)t * R, tmp, (int64_t)R);
            kp_f32_to_f16_row(tmp, dst + (size_t)t * R, (int64_t)R);
        }
        free(tmp);
    }
    return 0;
}

static int fp16_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    const size_t R = row_values(c), total = (size_t)ch->n * R;
    const uint16_t *src = (const uint16_t *)p;
    if (ch->kv_type == KP_TYPE_F16) {
        memcpy(rows, src, total * 2);
    } else if (ch->kv_type == KP_TYPE_F32) {
        kp_f16_to_f32_row(src, rows, (int64_t)total);
    } else {
        float *tmp;
        int rc = scratch_alloc((void **)&tmp, R * sizeof(float), c, err);
        if (rc) return rc;
        for (int t = 0; t < ch->n; t++) {
            kp_f16_to_f32_row(src + (size_t)t * R, tmp, (int64_t)R);
            kp_f32_to_bf16_row(tmp, (uint16_t *)rows + (size_t)t * R, (int64_t)R);
        }
        free(tmp);
    }
    return 0;
}

const codec_ops codec_ops_fp16 = {"fp16", CODEC_FP16, fp16_bytes, fp16_encode, fp16_decode};

/* ---- int8 ----------------------------------------------------------------- */

static size_t int8_bytes(const codec *c, int n, int kv_type, int is_v) {
    const size_t nh = (size_t)n * (size_t)c->shape.n_kv_heads;
    return nh * (size_t)c->n_groups * 2 + nh * (size_t)c->shape.head_dim;
}

/* x[len] -> q[len], returns the fp16 scale. */
static uint16_t int8_quant_group(const float *x, int8_t *q, int len) {
    float amax = 0.0f;
    for (int j = 0; j < len; j++) {
        float a = fabsf(x[j]);
        amax = a > amax ? a : amax;
    }
    uint16_t h;
    const float d = fp16_round(amax / 127.0f, &h);
    const float id = d > 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < len; j++) {
        float v = x[j] * id;
        v = v >= -127.0f ? v : -127.0f; /* NaN -> -127 */
        v = v <= 127.0f ? v : 127.0f;
        q[j] = (int8_t)(int)rintf(v);
    }
    return h;
}

static int int8_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    uint16_t *scale = (uint16_t *)p;
    int8_t *q = (int8_t *)(p + (size_t)ch->n * H * NG * 2);
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float), c, err);
    if (rc) return rc;
    for (int t = 0; t < ch->n; t++) {
        const float *x = row_as_f32(ch->kv_type, (const uint8_t *)rows + (size_t)t * R * es, tmp, (int64_t)R);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, len = KP_MIN(G, D - lo);
                scale[th * NG + g] = int8_quant_group(x + (size_t)h * D + lo, q + th * D + lo, len);
            }
        }
    }
    free(tmp);
    return 0;
}

static int int8_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    const uint16_t *scale = (const uint16_t *)p;
    const int8_t *q = (const int8_t *)(p + (size_t)ch->n * H * NG * 2);
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float), c, err);
    if (rc) return rc;
    for (int t = 0; t < ch->n; t++) {
        void *dst = (uint8_t *)rows + (size_t)t * R * es;
        float *f = row_f32_target(ch->kv_type, dst, tmp);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            const int8_t *qh = q + th * D;
            float *fh = f + (size_t)h * D;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, hi = KP_MIN(D, lo + G);
                const float d = kp_fp16_to_f32(scale[th * NG + g]);
                for (int j = lo; j < hi; j++) fh[j] = (float)qh[j] * d;
            }
        }
        row_store(ch->kv_type, f, dst, (int64_t)R);
    }
    free(tmp);
    return 0;
}

const codec_ops codec_ops_int8 = {"int8", CODEC_INT8, int8_bytes, int8_encode, int8_decode};

/* ---- int4 ----------------------------------------------------------------- */

static size_t int4_bytes(const codec *c, int n, int kv_type, int is_v) {
    const size_t nh = (size_t)n * (size_t)c->shape.n_kv_heads;
    return nh * (size_t)c->n_groups * 2 + nh * (size_t)((c->shape.head_dim + 1) / 2);
}

/* x[len] -> codes u[len] in 0..15, returns the fp16 scale. */
static uint16_t int4_quant_group(const float *x, uint8_t *u, int len) {
    float amax = 0.0f, m = 0.0f;
    for (int j = 0; j < len; j++) {
        if (fabsf(x[j]) > amax) {
            amax = fabsf(x[j]);
            m = x[j];
        }
    }
    uint16_t h;
    const float d = fp16_round(m / -8.0f, &h);
    const float id = d != 0.0f ? 1.0f / d : 0.0f;
    for (int j = 0; j < len; j++) {
        float v = x[j] * id;
        v = v >= -8.0f ? v : -8.0f; /* NaN -> -8 */
        v = v <= 7.0f ? v : 7.0f;
        u[j] = (uint8_t)((int)rintf(v) + 8);
    }
    return h;
}

static int int4_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const int DB = (D + 1) / 2; /* code bytes per (token, head) */
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    uint16_t *scale = (uint16_t *)p;
    uint8_t *code = p + (size_t)ch->n * H * NG * 2;
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float) + (size_t)D + 1, c, err);
    if (rc) return rc;
    uint8_t *u = (uint8_t *)(tmp + R); /* [D + 1] codes of one head */
    for (int t = 0; t < ch->n; t++) {
        const float *x = row_as_f32(ch->kv_type, (const uint8_t *)rows + (size_t)t * R * es, tmp, (int64_t)R);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, len = KP_MIN(G, D - lo);
                scale[th * NG + g] = int4_quant_group(x + (size_t)h * D + lo, u + lo, len);
            }
            u[D] = 0; /* the unused high nibble when D is odd */
            uint8_t *b = code + th * DB;
            for (int k = 0; k < DB; k++) b[k] = (uint8_t)(u[2 * k] | ((u[2 * k + 1] & 15) << 4));
        }
    }
    free(tmp);
    return 0;
}

static int int4_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const int DB = (D + 1) / 2;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    const uint16_t *scale = (const uint16_t *)p;
    const uint8_t *code = p + (size_t)ch->n * H * NG * 2;
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float) + (size_t)D + 1, c, err);
    if (rc) return rc;
    int8_t *v = (int8_t *)(tmp + R); /* [D + 1] signed values of one head */
    for (int t = 0; t < ch->n; t++) {
        void *dst = (uint8_t *)rows + (size_t)t * R * es;
        float *f = row_f32_target(ch->kv_type, dst, tmp);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            const uint8_t *b = code + th * DB;
            for (int k = 0; k < DB; k++) {
                v[2 * k] = (int8_t)((b[k] & 15) - 8);
                v[2 * k + 1] = (int8_t)((b[k] >> 4) - 8);
            }
            float *fh = f + (size_t)h * D;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, hi = KP_MIN(D, lo + G);
                const float d = kp_fp16_to_f32(scale[th * NG + g]);
                for (int j = lo; j < hi; j++) fh[j] = (float)v[j] * d;
            }
        }
        row_store(ch->kv_type, f, dst, (int64_t)R);
    }
    free(tmp);
    return 0;
}

const codec_ops codec_ops_int4 = {"int4", CODEC_INT4, int4_bytes, int4_encode, int4_decode};

/* ---- kivi2 ---------------------------------------------------------------- */

static int kivi_token_groups(int n) { return (n + KIVI_TOKEN_GROUP - 1) / KIVI_TOKEN_GROUP; }

static size_t kivi2_bytes(const codec *c, int n, int kv_type, int is_v) {
    const size_t nh = (size_t)n * (size_t)c->shape.n_kv_heads;
    const size_t codes = nh * (size_t)((c->shape.head_dim + 3) / 4);
    if (is_v) return nh * (size_t)c->n_groups * 4 + codes;
    return (size_t)kivi_token_groups(n) * row_values(c) * 4 + codes;
}

/* A group's range [mn, mx] -> fp16 scale and min; *mq, *is: the rounded min
 * and 1/scale (0 for a constant group) to quantise with. */
static void kivi_params(float mn, float mx, uint16_t *sh, uint16_t *mh, float *mq, float *is) {
    const float s = fp16_round((mx - mn) / 3.0f, sh);
    *mq = fp16_round(mn, mh);
    *is = s > 0.0f ? 1.0f / s : 0.0f;
}

static uint8_t kivi_code(float x, float mq, float is) {
    float v = (x - mq) * is;
    v = v >= 0.0f ? v : 0.0f; /* NaN -> 0 */
    v = v <= 3.0f ? v : 3.0f;
    return (uint8_t)(int)rintf(v);
}

/* D codes u[] -> ceil(D/4) bytes (bits past D zero). */
static void kivi_pack(const uint8_t *u, uint8_t *b, int D) {
    const int full = D / 4;
    for (int k = 0; k < full; k++)
        b[k] = (uint8_t)(u[4 * k] | (u[4 * k + 1] << 2) | (u[4 * k + 2] << 4) | (u[4 * k + 3] << 6));
    if (D % 4) {
        uint8_t last = 0;
        for (int i = 0; i < D % 4; i++) last |= (uint8_t)(u[4 * full + i] << (2 * i));
        b[full] = last;
    }
}

/* ceil(D/4) bytes -> D codes u[]. */
static void kivi_unpack(const uint8_t *b, uint8_t *u, int D) {
    const int full = D / 4;
    for (int k = 0; k < full; k++) {
        u[4 * k] = b[k] & 3;
        u[4 * k + 1] = (b[k] >> 2) & 3;
        u[4 * k + 2] = (b[k] >> 4) & 3;
        u[4 * k + 3] = (uint8_t)(b[k] >> 6);
    }
    for (int i = 0; i < D % 4; i++) u[4 * full + i] = (b[full] >> (2 * i)) & 3;
}

/* Values: per token, head and group of G dims. */
static int kivi2_encode_v(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const int DB = (D + 3) / 4;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type), nhg = (size_t)ch->n * H * NG;
    uint16_t *scale = (uint16_t *)p, *mins = scale + nhg;
    uint8_t *code = p + nhg * 4;
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float) + (size_t)D + 4, c, err);
    if (rc) return rc;
    uint8_t *u = (uint8_t *)(tmp + R); /* [D] codes of one head */
    for (int t = 0; t < ch->n; t++) {
        const float *x = row_as_f32(ch->kv_type, (const uint8_t *)rows + (size_t)t * R * es, tmp, (int64_t)R);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            const float *xh = x + (size_t)h * D;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, hi = KP_MIN(D, lo + G);
                float mn = INFINITY, mx = -INFINITY, mq, is;
                for (int j = lo; j < hi; j++) {
                    mn = xh[j] < mn ? xh[j] : mn;
                    mx = xh[j] > mx ? xh[j] : mx;
                }
                kivi_params(mn, mx, &scale[th * NG + g], &mins[th * NG + g], &mq, &is);
                for (int j = lo; j < hi; j++) u[j] = kivi_code(xh[j], mq, is);
            }
            kivi_pack(u, code + th * DB, D);
        }
    }
    free(tmp);
    return 0;
}

static int kivi2_decode_v(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, G = c->group, NG = c->n_groups;
    const int DB = (D + 3) / 4;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type), nhg = (size_t)ch->n * H * NG;
    const uint16_t *scale = (const uint16_t *)p, *mins = scale + nhg;
    const uint8_t *code = p + nhg * 4;
    float *tmp;
    int rc = scratch_alloc((void **)&tmp, R * sizeof(float) + (size_t)D + 4, c, err);
    if (rc) return rc;
    uint8_t *u = (uint8_t *)(tmp + R);
    for (int t = 0; t < ch->n; t++) {
        void *dst = (uint8_t *)rows + (size_t)t * R * es;
        float *f = row_f32_target(ch->kv_type, dst, tmp);
        for (int h = 0; h < H; h++) {
            const size_t th = (size_t)t * H + h;
            kivi_unpack(code + th * DB, u, D);
            float *fh = f + (size_t)h * D;
            for (int g = 0; g < NG; g++) {
                const int lo = g * G, hi = KP_MIN(D, lo + G);
                const float s = kp_fp16_to_f32(scale[th * NG + g]);
                const float m = kp_fp16_to_f32(mins[th * NG + g]);
                for (int j = lo; j < hi; j++) fh[j] = (float)u[j] * s + m;
            }
        }
        row_store(ch->kv_type, f, dst, (int64_t)R);
    }
    free(tmp);
    return 0;
}

/* Keys: per channel (head, dim) over groups of up to 32 tokens. Two passes
 * per token group (range, then codes), converting each row again rather than
 * holding 32 rows of floats. */
static int kivi2_encode_k(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, NT = kivi_token_groups(ch->n);
    const int DB = (D + 3) / 4;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    uint16_t *scale = (uint16_t *)p, *mins = scale + (size_t)NT * R;
    uint8_t *code = p + (size_t)NT * R * 4;
    float *buf;
    /* tmp row, mn/mq, mx/is per channel, then the codes of a row */
    int rc = scratch_alloc((void **)&buf, R * 3 * sizeof(float) + R + 4, c, err);
    if (rc) return rc;
    float *tmp = buf, *mn = buf + R, *mx = buf + 2 * R;
    uint8_t *u = (uint8_t *)(buf + 3 * R);
    for (int ug = 0; ug < NT; ug++) {
        const int t0 = ug * KIVI_TOKEN_GROUP, t1 = KP_MIN(ch->n, t0 + KIVI_TOKEN_GROUP);
        for (size_t i = 0; i < R; i++) {
            mn[i] = INFINITY;
            mx[i] = -INFINITY;
        }
        for (int t = t0; t < t1; t++) {
            const float *x = row_as_f32(ch->kv_type, (const uint8_t *)rows + (size_t)t * R * es, tmp, (int64_t)R);
            for (size_t i = 0; i < R; i++) {
                mn[i] = x[i] < mn[i] ? x[i] : mn[i];
                mx[i] = x[i] > mx[i] ? x[i] : mx[i];
            }
        }
        /* mn becomes the rounded min, mx 1/scale */
        for (size_t i = 0; i < R; i++)
            kivi_params(mn[i], mx[i], &scale[(size_t)ug * R + i], &mins[(size_t)ug * R + i], &mn[i], &mx[i]);
        for (int t = t0; t < t1; t++) {
            const float *x = row_as_f32(ch->kv_type, (const uint8_t *)rows + (size_t)t * R * es, tmp, (int64_t)R);
            for (size_t i = 0; i < R; i++) u[i] = kivi_code(x[i], mn[i], mx[i]);
            for (int h = 0; h < H; h++)
                kivi_pack(u + (size_t)h * D, code + ((size_t)t * H + h) * DB, D);
        }
    }
    free(buf);
    return 0;
}

static int kivi2_decode_k(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, NT = kivi_token_groups(ch->n);
    const int DB = (D + 3) / 4;
    const size_t R = row_values(c), es = codec_elem_size(ch->kv_type);
    const uint16_t *scale = (const uint16_t *)p, *mins = scale + (size_t)NT * R;
    const uint8_t *code = p + (size_t)NT * R * 4;
    float *buf;
    int rc = scratch_alloc((void **)&buf, R * 3 * sizeof(float) + R + 4, c, err);
    if (rc) return rc;
    float *tmp = buf, *sf = buf + R, *mf = buf + 2 * R;
    uint8_t *u = (uint8_t *)(buf + 3 * R);
    for (int ug = 0; ug < NT; ug++) {
        const int t0 = ug * KIVI_TOKEN_GROUP, t1 = KP_MIN(ch->n, t0 + KIVI_TOKEN_GROUP);
        kp_f16_to_f32_row(scale + (size_t)ug * R, sf, (int64_t)R);
        kp_f16_to_f32_row(mins + (size_t)ug * R, mf, (int64_t)R);
        for (int t = t0; t < t1; t++) {
            void *dst = (uint8_t *)rows + (size_t)t * R * es;
            float *f = row_f32_target(ch->kv_type, dst, tmp);
            if (D % 4 == 0) /* no padding: the heads' codes are one run */
                kivi_unpack(code + (size_t)t * H * DB, u, (int)R);
            else
                for (int h = 0; h < H; h++)
                    kivi_unpack(code + ((size_t)t * H + h) * DB, u + (size_t)h * D, D);
            for (size_t i = 0; i < R; i++) f[i] = (float)u[i] * sf[i] + mf[i];
            row_store(ch->kv_type, f, dst, (int64_t)R);
        }
    }
    free(buf);
    return 0;
}

static int kivi2_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p, kp_err *err) {
    return ch->is_v ? kivi2_encode_v(c, ch, rows, p, err) : kivi2_encode_k(c, ch, rows, p, err);
}

static int kivi2_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows, kp_err *err) {
    return ch->is_v ? kivi2_decode_v(c, ch, p, rows, err) : kivi2_decode_k(c, ch, p, rows, err);
}

const codec_ops codec_ops_kivi2 = {"kivi2", CODEC_KIVI2, kivi2_bytes, kivi2_encode, kivi2_decode};
