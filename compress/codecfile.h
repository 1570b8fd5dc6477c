/*
 * codecfile.h — the in-memory form of a fitted KV codec ('pca' or
 * 'learned') and its file: a GGUF container (engine/gguf.h) with
 * `kvpark.codec.*` keys and per-layer F32 tensors, bound to one model by its
 * fingerprint. calib.c fits and writes it; codec_open(path) reads it.
 *
 * File layout (all GGUF, little-endian):
 *   key 0 (always first)  kvpark.codec.checksum  u64  XXH64 (seed 0) of the
 *                         WHOLE file with this key's 8 value bytes (file
 *                         offset 57) read as zero: any flipped byte anywhere
 *                         (header, padding, tensor data) is caught
 *   kvpark.codec.version u32 (2; version 1 files, which lack .ranges, are read
 *   as ranges 0), kvpark.codec.ranges u32 (0: per-chunk min/step side info
 *   in every chunk, 1: fixed calibrated ranges, see codec_learned.c),
 *   kvpark.codec.kind str ("learned" | "pca"),
 *   kvpark.codec.model_fingerprint u64, kvpark.codec.{n_layer, n_kv_heads,
 *   head_dim, n_rot, rope_mode, chunk, sink, window} u32,
 *   kvpark.codec.{rope_base, rope_freq_scale, target_bits, achieved_bits} f32
 *   tensors, for each layer l and t in {k, v} (d = n_kv_heads * head_dim,
 *   r = kept latent dims, 1..d):
 *     l.{l}.{t}.mean  F32 ne {d}      mu
 *     l.{l}.{t}.enc   F32 ne {d, r}   E, r rows of d:  z = E (x - mu)
 *     l.{l}.{t}.dec   F32 ne {r, d}   D, d rows of r:  x^ = mu + D z
 *     l.{l}.{t}.bits  F32 ne {r}      bits of latent j, integers 1..8
 *   With ranges 1 the fit scales E and D so that every latent has unit
 *   variance on the calibration data; the quantiser of latent j is then a
 *   fixed function of b_j alone (codec_learned.c), so no tensor is added.
 */
#ifndef KP_CODECFILE_H
#define KP_CODECFILE_H

#include <stdint.h>

#include "compress/codec_impl.h"

#define CODECFILE_VERSION 2
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
    float *qlo, *qstep; /* [r] ranges 1: the fixed quantiser of each latent
                           (lc_fixed_range of bits[j]); filled by finish */
    float *dmean;    /* [dpad] decoder offset: mean, or with ranges 1 mean + D lo
                        (and dect then holds D diag(step)); filled by finish */
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
    int ranges;      /* 0: per-chunk min/step in the payload, 1: fixed (calibrated) */
    float target_bits, achieved_bits;
    lc_coder *coders; /* [n_layer][2]: index 2*l + is_v */
    double *rope_th;  /* [3][n_rot/2]: angle per position of each RoPE pair, its cos, its sin */
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

/* Exact payload bytes (after the chunk header) of a chunk of n rows of
 * (layer, K/V) of a pca/learned codec. */
size_t codec_learned_payload(const codec *c, int n, int is_v, int layer);

/* Average coded bits per value of a chunk of n rows: payload bits (latent
 * codes, + per-dim fp16 min and step with ranges 0) / (n * d), averaged over layers and K/V. */
double codec_learned_bits_per_value(const codec *c, int n);

/* Write the codec file (temporary name, fsync, rename). */
int codecfile_write(const codec *c, const char *path, kp_err *err);
/* Read and validate a codec file for a model of `shape`: KP_EFORMAT for a
 * corrupt or truncated file, KP_EMISMATCH for another model's codec. */
int codecfile_open(codec **out, const char *path, const codec_shape *shape, kp_err *err);
/* The same from the file's bytes (path only names it in messages; the fuzz
 * target tests/fuzz/fuzz_codecfile.c calls this). buf is read, and its 8
 * checksum bytes are zeroed while hashing and restored before returning; the
 * codec keeps no pointer into it. */
int codecfile_open_mem(codec **out, uint8_t *buf, size_t len, const char *path, const codec_shape *shape,
                       kp_err *err);

#endif
