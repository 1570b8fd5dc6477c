/*
 * codec_learned_impl.h — a read-only, plain-struct view of one coder
 * (layer, K or V) of a fitted 'pca' / 'learned' codec, for decoders that
 * live outside codec_learned.c: the CUDA codec (compress/codec_gpu.cu)
 * uploads these arrays once, and tests check that a straightforward scalar
 * decoder written from the view reproduces codec_decode().
 *
 * Why a view and not codecfile.h's structs: the view names exactly what the
 * bitstream contract of codec_learned.c needs (no AVX padding rules, no
 * allocation layout), so another decoder depends on the contract, not on
 * how the CPU decoder happens to store things.
 *
 * The contract, per row i of a chunk (d = n_kv_heads * head_dim), as
 * codec_learned.c's header comment states it:
 *   codes   row i starts at stream bit i * bits_sum; dim j at bit
 *           i * bits_sum + (sum of bits[0..j-1]), bits[j] bits, LSB-first
 *           (stream bit t is bit t & 7 of byte t >> 3). The code stream
 *           follows 4 r bytes of fp16 lo[r], step[r] when ranges == 0.
 *   z_j     ranges 1: (float)q_j;  ranges 0: (float)q_j * step_j + lo_j
 *   x_k     dmean[k] + (sum over j = 0..r-1 in order of dect[j][k] * z_j),
 *           each product rounded then added (no FMA), the sum starting at 0
 *   rope    (keys of 'learned' with n_rot > 0) each pair rotated by the
 *           angle (pos0 + i) * rope_th[p], cos/sin stepped row to row in
 *           double from cos/sin(rope_th[p] * pos0) with the step's cos/sin
 *           rope_cos[p] / rope_sin[p], then rounded to float.
 * Encoding (the same, backwards): x' = RoPE^-1(x) - mean; z_j = sum over
 * k = 0..d-1 in order of enc[j][k] * x'_k; codes per codec_learned.c.
 */
#ifndef KP_CODEC_LEARNED_IMPL_H
#define KP_CODEC_LEARNED_IMPL_H

#include <stdint.h>

#include "compress/codec.h"

typedef struct codec_learned_view {
    int kind;             /* CODEC_LEARNED or CODEC_PCA */
    int ranges;           /* 1: fixed quantiser (folded into dect, dmean); 0: lo/step in payload */
    int d;                /* n_kv_heads * head_dim */
    int r;                /* latent dims of this coder */
    int bits_sum;         /* B = sum of bits[]: bits per row */
    int rope;             /* 1: rows are coded before RoPE (learned keys, n_rot > 0) */
    int rope_half;        /* min(n_rot, head_dim) / 2 pairs per head (0: no RoPE) */
    int rope_neox;        /* pair p = dims (p, p + half) if 1, (2p, 2p + 1) if 0 */
    const uint8_t *bits;  /* [r] 1..8 */
    const float *mean;    /* [d] mu */
    const float *enc;     /* [r][d] E */
    const float *enct;    /* [d][rpad] E transposed, zero past r */
    int rpad;
    const float *dect;    /* [r][dpad] decoder, D^T (ranges 1: row j scaled by step_j) */
    int dpad;
    const float *dmean;   /* [d] decoder offset (ranges 1: mu + D lo) */
    const float *qlo, *qstep;     /* [r] ranges 1: the fixed quantiser of each latent */
    const double *rope_th;        /* [rope_half] angle per position of pair p */
    const double *rope_cos, *rope_sin; /* [rope_half] cos / sin of rope_th */
} codec_learned_view;

/* 1 if c is a 'pca' or 'learned' codec. */
int codec_is_learned(const codec *c);

/* The view of coder (layer, is_v) of a pca/learned codec. Pointers point
 * into c and live as long as c. KP_EINVAL for another codec or a layer
 * outside 0..n_layer-1. */
int codec_learned_get_view(const codec *c, int layer, int is_v, codec_learned_view *v, kp_err *err);

#endif
