/*
 * quant_impl.h — what the portable quantisation code (quant.c) and its x86
 * SIMD half (quant_x86.c) share; internal to kernels/cpu/quant*.c, the
 * contract is quant.h.
 *
 * Why a header: both files must make the same choice of SIMD paths (one
 * feature test, below) and convert fp16 the same inlined way, and each calls
 * into the other: the quantiser table (quant.c) calls the activation
 * quantisers that have AVX2 paths (quant_x86.c), and those, without AVX2,
 * fall back to their scalar twins (quant.c), as the fast dot products fall
 * back to kp_dot_ref_fn. Pure functions; no state, any thread.
 */
#ifndef KP_QUANT_IMPL_H
#define KP_QUANT_IMPL_H

#include <stdint.h>

#include "kernels/cpu/quant.h"
#include "kernels/types.h"

#if defined(__AVX2__) || defined(__F16C__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define KP_QUANT_AVX2 1
#endif
#if defined(KP_QUANT_AVX2) && defined(__AVX512F__)
#define KP_QUANT_AVX512 1
#endif

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

/* Quantisers with an AVX2 path (quant_x86.c): bit-identical to the scalar
 * twins below (quant.c), which they call when not compiled for AVX2. nb is
 * the number of blocks. kp_quant_q8_0 is quantize_row_q8_0_ref;
 * kp_quant_q8_0_act is llama.cpp's x86 quantize_row_q8_0 (multiplier
 * 127/amax, ties to even); kp_quant_q8_K is quantize_row_q8_K_ref. */
void kp_quant_q8_0(const float *x, kp_block_q8_0 *y, int64_t nb);
void kp_quant_q8_0_act(const float *x, kp_block_q8_0 *y, int64_t nb);
void kp_quant_q8_K(const float *x, kp_block_q8_K *y, int64_t nb);
void kp_quant_q8_0_scalar(const float *x, kp_block_q8_0 *y, int64_t nb);
void kp_quant_q8_0_act_scalar(const float *x, kp_block_q8_0 *y, int64_t nb);
void kp_quant_q8_K_scalar(const float *x, kp_block_q8_K *y, int64_t nb);

/* ggml's generic C dot product of one weight row of type wtype with one
 * activation row of kp_vec_dot_type(wtype) (quant.c); NULL for other types. */
typedef float (*kp_dot_fn)(int64_t n, const void *w, const void *x);
kp_dot_fn kp_dot_ref_fn(int wtype);

#endif
