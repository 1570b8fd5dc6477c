/*
 * blob.h — the session blob: one file holding everything needed to resume a
 * conversation (token ids, opaque extra bytes such as the sampler state, and
 * the KV cache), checksummed so that a torn or corrupted file is refused
 * rather than decoded into garbage.
 *
 * File format v1 (all integers little-endian):
 *
 *   offset size  field
 *   ------ ----  -----------------------------------------------------------
 *        0    8  magic            "KVPKSESS"
 *        8    4  version          1
 *       12    4  header_bytes     size of this fixed header (128)
 *       16    8  model_fingerprint  the model the KV was computed with
 *       24   16  codec            NUL-padded name; "none" = raw KV rows
 *       40    4  kv_type          KP_TYPE_F32 / F16 / BF16 (kernels/types.h)
 *       44    4  n_layer
 *       48    4  n_kv_heads
 *       52    4  head_dim
 *       56    4  chunk_tokens     rows per chunk (default 64)
 *       60    4  n_tokens         tokens (= KV rows) stored
 *       64    8  created_unix_ms  wall-clock time of the write
 *       72    4  n_chunks         n_layer * 2 * ceil(n_tokens / chunk_tokens)
 *       76   52  reserved         zero
 *
 *   header_bytes         tokens      i32 [n_tokens]
 *   then                 extra_len   u32, then extra bytes [extra_len]
 *   then                 chunk table [n_chunks] entries of 32 bytes, ordered
 *                        for each layer l, for K then V, for each chunk c:
 *                          u64 offset        absolute file offset of the payload
 *                          u32 raw_bytes     rows * n_kv_heads * head_dim * elem
 *                          u32 stored_bytes  bytes in the file
 *                          u32 flags         bit 0: stored raw (LZ4 did not shrink it)
 *                          u32 reserved      zero
 *                          u64 xxh64         XXH64(seed 0) of the stored bytes
 *   then                 header_xxh64 u64: XXH64(seed 0) of every byte before it
 *   then                 chunk payloads, contiguous, in table order; the file
 *                        ends exactly after the last one.
 *
 *   Chunk c of layer l's K covers rows [c*chunk_tokens, min((c+1)*chunk_tokens,
 *   n_tokens)) of K[l]; its raw bytes are those rows exactly as the engine
 *   holds them (codec "none": a bit-exact round trip), compressed with
 *   LZ4_compress_default unless that does not make them smaller.
 *
 * Contract
 *   - blob_write writes PATH.tmp, fsyncs it, renames it to PATH and fsyncs
 *     the directory: when it returns 0 the blob is durable. On error no PATH is
 *     created or replaced (PATH.tmp is removed).
 *   - blob_read_meta validates magic, version, header checksum, the bounds of
 *     every field and the file size against the chunk table; it never reads a
 *     chunk payload.
 *   - blob_read_kv additionally checks the model fingerprint and KV shape
 *     (KP_EMISMATCH), that kv->n_ctx >= n_tokens (KP_ERANGE), and every chunk's
 *     checksum (KP_EFORMAT naming layer, K/V and chunk index) BEFORE it writes
 *     any KV row; kv->n_pos is set to n_tokens only after full success and is
 *     left unchanged on any error.
 *   - KV bytes move through kv_read_rows / kv_write_rows (engine/kv.h), so the
 *     cache may live on any backend.
 */
#ifndef KP_BLOB_H
#define KP_BLOB_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "engine/kv.h"

#define BLOB_MAGIC "KVPKSESS"
#define BLOB_VERSION 1
#define BLOB_HEADER_BYTES 128
#define BLOB_CODEC_MAX 16
#define BLOB_CHUNK_TOKENS_DEFAULT 64
#define BLOB_CHUNK_ENTRY_BYTES 32
#define BLOB_CHUNK_FLAG_RAW 1u

/* Limits a reader enforces before allocating anything. */
#define BLOB_MAX_LAYERS 4096
#define BLOB_MAX_KV_HEADS 4096
#define BLOB_MAX_HEAD_DIM 65536
#define BLOB_MAX_CHUNK_TOKENS 65536
#define BLOB_MAX_TOKENS (1 << 24)
#define BLOB_MAX_EXTRA (1u << 30)

typedef struct blob_meta {
    uint64_t model_fingerprint;
    char codec[BLOB_CODEC_MAX]; /* NUL-terminated; "" on write means "none" */
    int kv_type;
    int n_layer;
    int n_kv_heads;
    int head_dim;
    int chunk_tokens;           /* 0 on write means BLOB_CHUNK_TOKENS_DEFAULT */
    int n_tokens;
    uint64_t created_unix_ms;   /* 0 on write means "now" */
    /* Filled by blob_read_meta only: */
    uint32_t version;
    uint64_t file_bytes;
    uint64_t stored_kv_bytes;   /* sum of chunk stored_bytes */
} blob_meta;

typedef struct blob_stats {
    uint64_t bytes_written;     /* whole file */
    uint64_t raw_fp16_bytes;    /* n_tokens * n_layer * 2 * n_kv_heads * head_dim * 2 */
    uint64_t raw_kv_bytes;      /* the KV rows as held (kv_type element size) */
    uint64_t stored_kv_bytes;   /* chunk payload bytes in the file */
    double ms;                  /* wall time of the call, fsyncs included */
} blob_stats;

/* Write a blob of kv's first meta->n_tokens rows (must equal kv->n_pos).
 * meta supplies model_fingerprint, codec ("none" or ""), chunk_tokens and
 * created_unix_ms (0 = now); the shape comes from kv. tokens has n_tokens ids.
 * st may be NULL. */
int blob_write(const char *path, const blob_meta *meta, const int32_t *tokens,
               const void *extra, size_t extra_len, const kv_cache *kv, blob_stats *st,
               kp_err *err);

/* Read and validate the header. tokens / extra (malloc'd, caller frees) may
 * be NULL if not wanted; *extra is non-NULL (1 byte) even if extra_len is 0. */
int blob_read_meta(const char *path, blob_meta *meta, int32_t **tokens, void **extra,
                   size_t *extra_len, kp_err *err);

/* Restore the KV rows into kv (see the contract above). */
int blob_read_kv(const char *path, uint64_t expect_fingerprint, kv_cache *kv, kp_err *err);

/* Bytes of one element of a kv type (4 or 2); 0 if unknown. */
size_t blob_elem_size(int kv_type);

#endif
