/*
 * types.h — tensor element types (numbered exactly as ggml's `ggml_type`, so a
 * GGUF tensor's type field is a kp_type) and their block layouts.
 *
 * Contract
 *   - A row of a quantised type is a sequence of blocks; kp_type_block(t)
 *     elements are stored in kp_type_block_bytes(t) bytes. Row length must be a
 *     multiple of the block size.
 *   - Layouts are bit-exact with llama.cpp (ggml-common.h): a block written by
 *     llama-quantize is read here unchanged.
 *   - kp_type_name() gives "f32", "q4_K", ...; unknown types give NULL.
 */
#ifndef KP_TYPES_H
#define KP_TYPES_H

#include <stddef.h>
#include <stdint.h>

typedef enum kp_type {
    KP_TYPE_F32 = 0,
    KP_TYPE_F16 = 1,
    KP_TYPE_Q4_0 = 2,
    KP_TYPE_Q4_1 = 3,
    KP_TYPE_Q5_0 = 6,
    KP_TYPE_Q5_1 = 7,
    KP_TYPE_Q8_0 = 8,
    KP_TYPE_Q8_1 = 9,
    KP_TYPE_Q2_K = 10,
    KP_TYPE_Q3_K = 11,
    KP_TYPE_Q4_K = 12,
    KP_TYPE_Q5_K = 13,
    KP_TYPE_Q6_K = 14,
    KP_TYPE_Q8_K = 15,
    KP_TYPE_BF16 = 30,
    KP_TYPE_COUNT = 40
} kp_type;

#define KP_QK8_0 32
#define KP_QK4_0 32
#define KP_QK_K 256
#define KP_K_SCALE_SIZE 12

/* ggml's block structs (ggml-common.h), fp16 stored as raw uint16_t. */
typedef struct { uint16_t d; int8_t qs[KP_QK8_0]; } kp_block_q8_0;             /* 34 B  */
typedef struct { uint16_t d; uint8_t qs[KP_QK4_0 / 2]; } kp_block_q4_0;        /* 18 B  */
typedef struct {
    uint16_t d, dmin;
    uint8_t scales[KP_K_SCALE_SIZE];
    uint8_t qs[KP_QK_K / 2];
} kp_block_q4_K;                                                               /* 144 B */
typedef struct {
    uint8_t ql[KP_QK_K / 2];
    uint8_t qh[KP_QK_K / 4];
    int8_t scales[KP_QK_K / 16];
    uint16_t d;
} kp_block_q6_K;                                                               /* 210 B */
typedef struct { float d; int8_t qs[KP_QK_K]; int16_t bsums[KP_QK_K / 16]; } kp_block_q8_K; /* 292 B */

_Static_assert(sizeof(kp_block_q8_0) == 34, "kp_block_q8_0 must match ggml's block_q8_0");
_Static_assert(sizeof(kp_block_q4_0) == 18, "kp_block_q4_0 must match ggml's block_q4_0");
_Static_assert(sizeof(kp_block_q4_K) == 144, "kp_block_q4_K must match ggml's block_q4_K");
_Static_assert(sizeof(kp_block_q6_K) == 210, "kp_block_q6_K must match ggml's block_q6_K");
_Static_assert(sizeof(kp_block_q8_K) == 292, "kp_block_q8_K must match ggml's block_q8_K");

/* Block size in elements (1 for float types) and bytes; 0 if unknown. */
int kp_type_block(int type);
size_t kp_type_block_bytes(int type);
/* Bytes of a row of n elements; 0 if n is not a multiple of the block size
 * or the type is unknown. */
size_t kp_type_row_bytes(int type, int64_t n);
const char *kp_type_name(int type);
/* Types kvpark can compute with (F32 F16 BF16 Q8_0 Q4_0 Q4_K Q6_K). */
int kp_type_supported(int type);

/* Scalar conversions (round-to-nearest-even, as ggml). */
float kp_fp16_to_f32(uint16_t h);
uint16_t kp_f32_to_fp16(float f);
float kp_bf16_to_f32(uint16_t h);
uint16_t kp_f32_to_bf16(float f);
/* Portable fp16 conversions (always compiled); bit-identical to the above,
 * which use F16C instructions when available. For tests and cross-checks. */
float kp_fp16_to_f32_soft(uint16_t h);
uint16_t kp_f32_to_fp16_soft(float f);

#endif
