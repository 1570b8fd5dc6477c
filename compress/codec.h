/*
 * codec.h — KV codecs: turn a chunk of live KV rows into bytes and back.
 *
 * A chunk is n consecutive token rows (default 64) of ONE layer's K or V
 * across all KV heads: rows [n][n_kv_heads][head_dim] of the cache's
 * element type (F32, F16 or BF16), exactly the byte range kv.h describes.
 * Keys arrive AFTER RoPE (as the cache holds them); a codec that wants
 * pre-RoPE keys undoes the rotation itself using codec_chunk.pos0 and the
 * model's RoPE parameters, and re-applies it when decoding.
 *
 * Codecs (by name):
 *   none    the rows' bytes as they are (lossless)
 *   fp16    rows as IEEE half (lossless for F16 caches)
 *   int8    per token and head, groups of 32 values: fp16 scale + int8 (like q8_0)
 *   int4    the same with 4-bit values (like q4_0: scale = max/-8)
 *   kivi2   KIVI: 2-bit; keys quantised per channel (over the chunk's tokens),
 *           values per token, each group with fp16 scale and minimum
 *   pca, learned   from a codec file
 *
 * Contract
 *   - codec_encode writes a self-describing chunk: a 16-byte header
 *     (magic "KC", codec id, element type, n rows, K/V flag, payload bytes,
 *     XXH32 checksum of the header's first 12 bytes and the payload; byte map
 *     in codec.c) followed by the payload whose layout each codec
 *     documents in its .c file (codec_baseline.c for the baselines). The bitstream is deterministic and
 *     little-endian; the CUDA decoder reads the same bytes.
 *   - codec_decode checks the header against what the caller expects (codec,
 *     rows, shape) and the checksum BEFORE writing any output; a damaged chunk
 *     is KP_EFORMAT with a message, never a crash, and the output is untouched.
 *   - codec_max_bytes(n) bounds the encoded size of n rows, so callers can
 *     allocate once. LZ4 is applied by the caller (storage) on top.
 *   - Codecs hold no mutable state after open: encode/decode may run on
 *     several threads at once.
 */
#ifndef KP_CODEC_H
#define KP_CODEC_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"

enum codec_id {
    CODEC_NONE = 0,
    CODEC_FP16 = 1,
    CODEC_INT8 = 2,
    CODEC_INT4 = 3,
    CODEC_KIVI2 = 4,
    CODEC_PCA = 5,
    CODEC_LEARNED = 6,
};

/* What a codec needs to know about the model's KV. */
typedef struct codec_shape {
    int n_layer;
    int n_kv_heads;
    int head_dim;
    int n_rot;            /* RoPE dims (0: none) */
    int rope_mode;        /* KP_ROPE_NORMAL | KP_ROPE_NEOX */
    float rope_base;
    float rope_freq_scale;
    uint64_t model_fingerprint;
} codec_shape;

/* Where a chunk sits. */
typedef struct codec_chunk {
    int layer;
    int is_v;             /* 0: keys, 1: values */
    int pos0;             /* position of the first row */
    int n;                /* rows */
    int kv_type;          /* element type of the rows (KP_TYPE_F32/F16/BF16) */
} codec_chunk;

typedef struct codec codec;

/* name: a codec name above, or a path to a codec file (pca, learned). */
int codec_open(codec **out, const char *name, const codec_shape *shape, kp_err *err);
void codec_free(codec *c);
const char *codec_name(const codec *c);
int codec_id_of(const codec *c);
/* codec_chunk_bytes for a known layer: exact for every codec (the
 * baselines' size does not depend on the layer; pca/learned's does, and
 * codec_chunk_bytes answers the largest over layers). 0 if out of range. */
size_t codec_chunk_bytes_at(const codec *c, int n, int kv_type, int is_v, int layer);
/* The parking layout a codec was calibrated for (pca/learned codec files
 * carry chunk rows, lossless sink and window): 0 and the three values, or
 * KP_ENOTFOUND for the built-in codecs (they have no preferred layout). */
int codec_layout(const codec *c, int *chunk, int *sink, int *window);
/* Upper bound of codec_encode's output for a chunk of n rows. */
size_t codec_max_bytes(const codec *c, int n);
/* Exact size of codec_encode's output for n rows of kv_type, keys (is_v 0)
 * or values (1); 0 if n is not 1..65535 or kv_type not F32/F16/BF16.
 * codec_max_bytes(c, n) is its maximum over kv_type and is_v. */
size_t codec_chunk_bytes(const codec *c, int n, int kv_type, int is_v);
/* rows: [n][n_kv_heads][head_dim] of ch->kv_type. */
int codec_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *out, size_t cap,
                 size_t *out_len, kp_err *err);
int codec_decode(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len, void *rows,
                 kp_err *err);

/* The chunk header (byte map at the top of codec.c): its size, and its fields
 * read without decoding (what a store checks before it keeps or ships a
 * chunk). codec_chunk_peek checks only the length and the magic (KP_EFORMAT);
 * codec_chunk_verify makes every check codec_decode makes before it writes a
 * row (length, magic, payload size, checksum, flags, then codec, type, rows,
 * K/V and size against c and ch), its messages naming `what` ("decode",
 * "check"); codec_chunk_seal writes the header of a payload already in place
 * at chunk + CODEC_CHUNK_HEADER_BYTES (as codec_encode does). */
#define CODEC_CHUNK_HEADER_BYTES 16
typedef struct codec_chunk_info {
    int codec_id, kv_type, n; /* enum codec_id, KP_TYPE_*, rows */
    uint16_t flags;           /* bit 0: values (1) or keys (0) */
    uint32_t payload_bytes;   /* bytes after the header */
    uint32_t checksum;        /* as stored */
} codec_chunk_info;
int codec_chunk_peek(const uint8_t *in, size_t len, codec_chunk_info *out, kp_err *err);
int codec_chunk_verify(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len, const char *what,
                       kp_err *err);
void codec_chunk_seal(const codec *c, const codec_chunk *ch, uint8_t *chunk, size_t payload_len);

#endif
