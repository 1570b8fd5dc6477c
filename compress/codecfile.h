/*
 * codecfile.h — the in-memory form of a fitted KV codec ('pca' or
 * 'learned', issue 4) and its file: a GGUF container (engine/gguf.h) with
 * `kvpark.codec.*` keys and per-layer F32 tensors, bound to one model by its
 * fingerprint. calib.c fits and writes it; codec_open(path) reads it.
 *
 * File layout (all GGUF, little-endian):
 *   key 0 (always first)  kvpark.codec.checksum  u64  XXH64 (seed 0) of the
 *                         WHOLE file with this key's 8 value bytes (file
 *                         offset 57) read as zero: any flipped byte anywhere
 *                         (header, padding, tensor data) is caught
 *   kvpark.codec.version u32 (1), kvpark.codec.kind str ("learned" | "pca"),
 *   kvpark.codec.model_fingerprint u64, kvpark.codec.{n_layer, n_kv_heads,
 *   head_dim, n_rot, rope_mode, chunk, sink, window} u32,
 *   kvpark.codec.{rope_base, rope_freq_scale, target_bits, achieved_bits} f32
 *   tensors, for each layer l and t in {k, v} (d = n_kv_heads * head_dim,
 *   r = kept latent dims, 1..d):
 *     l.{l}.{t}.mean  F32 ne {d}      mu
 *     l.{l}.{t}.enc   F32 ne {d, r}   E, r rows of d:  z = E (x - mu)
 *     l.{l}.{t}.dec   F32 ne {r, d}   D, d rows of r:  x^ = mu + D z
 *     l.{l}.{t}.bits  F32 ne {r}      bits of latent j, integers 1..8
 */
#ifndef KP_CODECFILE_H
#define KP_CODECFILE_H

#include <stdint.h>

#include "codec_impl.h"

#define CODECFILE_VERSION 1
#define CODECFILE_MAX_BITS 8
#define LC_BLK 16 /* floats per register block of the encode/decode loops */

/* One layer's K or V coder. Arrays point into the codec's single allocation. */
typedef struct lc_coder {
    int r;           /* latent dims kept */
    int bits_sum;    /* sum of bits[] */
    float *mean;     /* [d] */
    float *enc;      /* [r][d] */
    float *dec;      /* [d][r] */
    uint8_t *bits;   /* [r], 1..8 */
    /* Kernel layouts, filled by codec_learned_finish (rows zero-padded to a
     * multiple of LC_BLK floats so the loops run on whole register blocks): */
    int rpad, dpad;  /* r and d rounded up to LC_BLK */
    float *enct;     /* [d][rpad] E transposed */
    float *dect;     /* [r][dpad] D transposed */
} lc_coder;

/* The codec object of 'pca' and 'learned'. `base` comes first so that a
 * codec * is a codec_learned * and codec_free()'s free(c) frees everything
 * (one allocation: the struct, the coders and every array). */
typedef struct codec_learned {
    codec base;
    int kind;        /* CODEC_LEARNED (pre-RoPE keys) or CODEC_PCA (keys as stored) */
    int d;           /* n_kv_heads * head_dim */
    int chunk, sink, window;
    float target_bits, achieved_bits;
    lc_coder *coders; /* [n_layer][2]: index 2*l + is_v */
} codec_learned;

extern const codec_ops codec_ops_pca;
extern const codec_ops codec_ops_learned;

/* Allocate a zeroed codec for `shape` with ranks[2*l + is_v] latent dims
 * (each 1..d); the caller fills mean/enc/dec/bits and then calls
 * codec_learned_finish(). Freed by codec_free(). */
int codec_learned_alloc(codec **out, const codec_shape *shape, int kind, const int *ranks,
                        kp_err *err);
/* Recompute bits_sum and the transposed enct/dect of every coder;
 * KP_EFORMAT if a bit count is outside 1..8. */
int codec_learned_finish(codec *c, kp_err *err);

/* RoPE on one row [n_kv_heads][head_dim] at position pos, the exact twin of
 * the CPU backend's rope (kernels/cpu/ops.c); inverse = 1 undoes it. */
void codec_rope_row(const codec_shape *s, float *x, int pos, int inverse);

/* Average coded bits per value of a chunk of n rows: payload bits (latent
 * codes + per-dim fp16 min and step) / (n * d), averaged over layers and K/V. */
double codec_learned_bits_per_value(const codec *c, int n);

/* Write the codec file (temporary name, fsync, rename). */
int codecfile_write(const codec *c, const char *path, kp_err *err);
/* Read and validate a codec file for a model of `shape`: KP_EFORMAT for a
 * corrupt or truncated file, KP_EMISMATCH for another model's codec. */
int codecfile_open(codec **out, const char *path, const codec_shape *shape, kp_err *err);

#endif
