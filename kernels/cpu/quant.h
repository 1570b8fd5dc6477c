/*
 * quant.h — CPU reference (and fast) conversions and dot products for every
 * tensor type kvpark computes with: F32, F16, BF16, Q8_0, Q4_0, Q4_K, Q6_K
 * (plus Q8_K, used only for activations).
 *
 * Contract
 *   - Block layouts are llama.cpp's (kernels/types.h); kp_dequant_row of a
 *     row written by llama-quantize gives the values llama.cpp's
 *     dequantize_row_* gives, bit for bit.
 *   - kp_quant_row() is the reference quantiser for each type (llama.cpp's
 *     quantize_row_*_ref): used by tests, synthetic models and to convert
 *     activations before a dot product.
 *   - To reproduce llama.cpp's numbers, a matrix product with weights of type
 *     W first converts the activation row to kp_vec_dot_type(W) (Q8_0 for
 *     Q4_0/Q8_0, Q8_K for Q4_K/Q6_K, F16 for F16, BF16 for BF16, F32 for F32)
 *     and then calls kp_vec_dot(W, ...), which accumulates as llama.cpp's
 *     ggml_vec_dot_* does (integer sums per block, float scale).
 *   - n must be a multiple of the type's block size; functions return
 *     KP_EINVAL otherwise (kp_vec_dot: caller's job, checked in debug only).
 */
#ifndef KP_QUANT_H
#define KP_QUANT_H

#include <stdint.h>

#include "kernels/types.h"

int kp_dequant_row(int type, const void *src, float *dst, int64_t n);
int kp_quant_row(int type, const float *src, void *dst, int64_t n);
int kp_vec_dot_type(int wtype);
float kp_vec_dot(int wtype, int64_t n, const void *w_row, const void *x_row);

/* Additions (quant.c) ------------------------------------------------------ */

/* The activation quantiser llama.cpp's CPU backend runs on x86 (its
 * type_traits from_float), which is what to use before kp_vec_dot to follow
 * llama.cpp's numbers. It equals kp_quant_row except for Q8_0: llama.cpp's
 * AVX quantize_row_q8_0 scales by 127/amax and rounds ties to even, where
 * quantize_row_q8_0_ref multiplies by 1/(amax/127) and rounds ties away. */
int kp_quant_row_act(int type, const float *src, void *dst, int64_t n);

/* Scalar reference of kp_vec_dot: ggml's generic C code, op for op. The fast
 * kp_vec_dot (AVX2/AVX-512 when compiled in) gives the same integer sums and
 * differs only in float summation order. */
float kp_vec_dot_ref(int wtype, int64_t n, const void *w_row, const void *x_row);

/* out[r] = kp_vec_dot(wtype, n, w + r*w_stride, x_row) for r < nrows: the
 * inner loop of a matmul, with the type dispatch hoisted out. */
void kp_vec_dot_rows(int wtype, int64_t n, int64_t nrows, const void *w, size_t w_stride,
                     const void *x_row, float *out);

/* out[j * out_stride] = kp_vec_dot(wtype, n, w_row, x + j * x_stride) for
 * j < nx, bit for bit, with the weight row loaded and unpacked once per 4
 * activation rows: for multiplying several tokens by the same weights. */
void kp_vec_dot_nx(int wtype, int64_t n, const void *w_row, const void *x, size_t x_stride, int nx,
                   float *out, size_t out_stride);

/* A tile of a matmul: out[j * out_stride + r] = w row r . x row j for
 * r < nw <= 4 (rows w + r * w_stride) and j < nx <= 4 (rows x + j *
 * x_stride), every block of every row loaded once for the tile. Q8_0 and
 * Q4_0 weights (Q8_0 activations) on CPUs with VNNI; returns 1 when done, 0
 * when not available here (the caller uses kp_vec_dot_nx). The integer block
 * sums are kp_vec_dot's; the float terms are summed in another order (one
 * accumulator per output), so results agree within float rounding. */
int kp_vec_dot_tile(int wtype, int64_t n, const void *w, size_t w_stride, int nw, const void *x,
                    size_t x_stride, int nx, float *out, size_t out_stride);

/* Row conversions, vectorised; bit-identical to kp_f32_to_fp16 & co. */
void kp_f32_to_f16_row(const float *src, uint16_t *dst, int64_t n);
void kp_f16_to_f32_row(const uint16_t *src, float *dst, int64_t n);
void kp_f32_to_bf16_row(const float *src, uint16_t *dst, int64_t n);
void kp_bf16_to_f32_row(const uint16_t *src, float *dst, int64_t n);

#endif
