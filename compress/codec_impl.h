/*
 * codec_impl.h — what codec.c (open, the chunk header, checksums, dispatch)
 * and the codec implementations (codec_baseline.c, later pca/learned) share.
 * Not for users of the codec: they include codec.h only.
 *
 * Each codec is a constant table of three functions over the PAYLOAD (the
 * bytes after the 16-byte chunk header). codec.c has already checked the
 * chunk (n in 1..65535, kv_type F32/F16/BF16, buffer sizes, and on decode the
 * header and checksum) before calling them, so they cannot fail on bad input;
 * they return KP_ENOMEM at most, and decode does so before writing output.
 */
#ifndef KP_CODEC_IMPL_H
#define KP_CODEC_IMPL_H

#include "compress/codec.h"

typedef struct codec_ops {
    const char *name;
    int id; /* enum codec_id */
    /* Exact payload bytes of a chunk of n rows (0 if it does not fit a size_t). */
    size_t (*payload_bytes)(const codec *c, int n, int kv_type, int is_v);
    /* rows: [n][n_kv_heads][head_dim] of ch->kv_type -> payload_bytes() bytes. */
    int (*encode)(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *payload,
                  kp_err *err);
    /* payload (already validated) -> rows [n][n_kv_heads][head_dim] of ch->kv_type. */
    int (*decode)(const codec *c, const codec_chunk *ch, const uint8_t *payload, void *rows,
                  kp_err *err);
} codec_ops;

struct codec {
    const codec_ops *ops;
    codec_shape shape;
    int group;    /* values per group along head_dim: min(32, head_dim) */
    int n_groups; /* groups per head: ceil(head_dim / group) */
    /* Optional (NULL for the baselines: their size does not depend on the
     * layer): exact payload bytes of a chunk of n rows of `layer`
     * (0..n_layer-1); codec.c sizes and checks every chunk with it, so no
     * padding is stored. ops->payload_bytes then answers the largest over
     * layers (codec_chunk_bytes, codec_max_bytes). Kept here rather than in
     * codec_ops so the baselines' constant tables stay as they are. */
    size_t (*layer_payload_bytes)(const codec *c, int n, int kv_type, int is_v, int layer);
};

/* The baseline codecs (codec_baseline.c). */
extern const codec_ops codec_ops_none;
extern const codec_ops codec_ops_fp16;
extern const codec_ops codec_ops_int8;
extern const codec_ops codec_ops_int4;
extern const codec_ops codec_ops_kivi2;

/* Bytes per element of a KV row type (F32 4, F16/BF16 2), 0 for others. */
size_t codec_elem_size(int kv_type);

#endif
