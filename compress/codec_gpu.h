/*
 * codec_gpu.h — KV codec chunks decoded (and encoded) on a CUDA device,
 * from and to the exact bitstream of the CPU codec (codec.h), plus the
 * host-side pieces of a pipelined restore: a pinned staging pool and a
 * two-stream copy/decode pipeline with per-layer readiness.
 *
 * Plain C, no CUDA headers: streams are passed as `void *` (a cudaStream_t;
 * NULL = the context's own stream). The implementation is
 * compress/codec_gpu.cu (design notes at its top); in a build without CUDA
 * (compress/codec_gpu.c) every device function returns KP_EUNSUP with a
 * message, and only the host helpers at the end of this file work.
 *
 * Contract
 *   - codec_gpu_new(&g, c, device) uploads the codec's constant tables
 *     (pca/learned: every layer's decoder, encoder, mean, bit allocation,
 *     fixed ranges and RoPE angles) once; c must outlive g. One context per
 *     (codec, device); a context may be shared by threads (its descriptor
 *     ring is locked), the kernels it launches run concurrently.
 *   - codec_gpu_decode_batch: every chunk's payload (the bytes AFTER the
 *     16-byte chunk header) is already in device memory and its header was
 *     checked on the host (codec_gpu_check_chunk, or codec.c's decode
 *     checks); rows receive [n][n_kv_heads][head_dim] of desc.kv_type (F32,
 *     F16, BF16). ONE kernel launch per call, whatever the mix of layers,
 *     K/V and row counts; queued on `stream`, asynchronous: payloads must
 *     stay valid and rows must not be read until the stream has passed it.
 *     Results equal codec_decode's: bit for bit for the baselines; for
 *     pca/learned the same float operations in the same order, so bit for
 *     bit except that the RoPE start angle's double cos/sin is CUDA's
 *     (<= 2 ulp in double), which may move a re-rotated key by 1 float ulp.
 *   - codec_gpu_encode_batch: rows (device) -> payloads (device, exactly
 *     codec_chunk_bytes_at() - 16 bytes each), the SAME bytes codec_encode
 *     writes (same caveat for learned keys: a code may differ by one step
 *     where the 1-ulp angle difference crosses a rounding boundary). All
 *     codecs: none, fp16, int8, int4, kivi2, pca, learned.
 *   - codec_gpu_encode_to_host: one chunk encoded on the device, only the
 *     compressed payload downloaded, header written on the host: out holds
 *     what codec_encode would write. Synchronous.
 *   - Errors (bad arguments, CUDA failures) return a negative KP_E* with a
 *     message; nothing aborts.
 *
 * Pipelined restore (see codec.cu): codec_gpu_restore_begin takes pinned
 * buffers from a staging pool; codec_gpu_restore_layer(l) checks layer l's
 * chunks on the host, packs their payloads into a pinned buffer, queues the
 * H2D copy on a copy stream and the decode on a compute stream (which waits
 * only for that copy), so the copy of layer l+1 overlaps the decode of
 * layer l. codec_gpu_restore_layer_ready / _wait_layer / _stream_wait tell
 * a caller (or make its stream wait until) layer l is in the cache.
 */
#ifndef KP_CODEC_GPU_H
#define KP_CODEC_GPU_H

#include <stddef.h>
#include <stdint.h>

#include "compress/codec.h"

typedef struct codec_gpu_ctx codec_gpu_ctx;
typedef struct codec_gpu_staging codec_gpu_staging;
typedef struct codec_gpu_restore codec_gpu_restore;

/* One chunk of a device batch. */
typedef struct codec_gpu_chunk {
    codec_chunk desc; /* layer, is_v, pos0, n, kv_type: as for codec_decode */
    void *payload;    /* device: the payload (after the header); decode reads, encode writes */
    void *rows;       /* device: [n][n_kv_heads][head_dim] of desc.kv_type; decode writes,
                         encode reads */
} codec_gpu_chunk;

/* 1 if this build has CUDA and a device is present; *why (may be NULL)
 * says why not. Never crashes without a driver. */
int codec_gpu_available(const char **why);

int codec_gpu_new(codec_gpu_ctx **out, const codec *c, int device, kp_err *err);
void codec_gpu_free(codec_gpu_ctx *g);

int codec_gpu_decode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks,
                           void *stream, kp_err *err);
int codec_gpu_encode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks,
                           void *stream, kp_err *err);
/* d_rows: device rows of ch; out (host, cap bytes >= codec_chunk_bytes_at)
 * receives header + payload; *out_len its length. */
int codec_gpu_encode_to_host(codec_gpu_ctx *g, const codec_chunk *ch, const void *d_rows,
                             uint8_t *out, size_t cap, size_t *out_len, kp_err *err);
/* Wait for everything queued on stream (NULL: the context's stream). */
int codec_gpu_sync(codec_gpu_ctx *g, void *stream, kp_err *err);

/* ---- pinned staging pool ---------------------------------------------------
 * n_buffers page-locked host buffers of buffer_bytes each (cudaMallocHost),
 * allocated once. acquire hands out a free one (KP_EBUSY when all are out:
 * the pool never blocks and never grows); release gives it back. Thread-safe. */
int codec_gpu_staging_new(codec_gpu_staging **out, int n_buffers, size_t buffer_bytes, kp_err *err);
void codec_gpu_staging_free(codec_gpu_staging *s); /* every buffer must be released */
size_t codec_gpu_staging_buffer_bytes(const codec_gpu_staging *s);
int codec_gpu_staging_n_free(codec_gpu_staging *s);
int codec_gpu_staging_acquire(codec_gpu_staging *s, void **buf, kp_err *err);
void codec_gpu_staging_release(codec_gpu_staging *s, void *buf);

/* ---- pipelined restore -------------------------------------------------------- */

/* A chunk as the host holds it (e.g. read back from the store, LZ4 undone). */
typedef struct codec_gpu_host_chunk {
    codec_chunk desc;     /* desc.layer must be the layer it is submitted for */
    const uint8_t *bytes; /* host: the whole chunk, header + payload, as codec_encode wrote it */
    size_t len;
    void *rows;           /* device: its rows in the KV cache */
} codec_gpu_host_chunk;

/* Start a restore of up to the codec's n_layer layers; takes up to
 * max_buffers (>= 1; 2 double-buffers) buffers from pool until _end. */
int codec_gpu_restore_begin(codec_gpu_restore **out, codec_gpu_ctx *g, codec_gpu_staging *pool,
                            int max_buffers, kp_err *err);
/* Check, stage and queue the chunks of one layer (K and V, any number of
 * chunks; split into several batches when they exceed a staging buffer).
 * May block until a staging buffer's previous copy has finished. A layer may
 * be submitted more than once; readiness then refers to the latest call. */
int codec_gpu_restore_layer(codec_gpu_restore *r, int layer, int n, const codec_gpu_host_chunk *chunks,
                            kp_err *err);
/* 1 if layer's decoded rows are in the cache, 0 if not yet; KP_EINVAL if
 * the layer was never submitted, KP_EIO on a CUDA error. Never blocks. */
int codec_gpu_restore_layer_ready(codec_gpu_restore *r, int layer, kp_err *err);
/* Block the host until layer is in the cache. */
int codec_gpu_restore_wait_layer(codec_gpu_restore *r, int layer, kp_err *err);
/* Make `stream` (a cudaStream_t, e.g. the backend's) wait on the device
 * until layer is in the cache, without blocking the host. */
int codec_gpu_restore_stream_wait(codec_gpu_restore *r, int layer, void *stream, kp_err *err);
/* Wait for everything, give the buffers back, free r (also after errors). */
int codec_gpu_restore_end(codec_gpu_restore *r, kp_err *err);

/* ---- host helpers (every build) ------------------------------------------------- */

/* The checks codec_decode makes before it writes output (header, checksum,
 * codec, kv_type, rows, K/V, layer, exact size), without decoding: 0 or the
 * same KP_E* code codec_decode would return for that chunk. */
int codec_gpu_check_chunk(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len,
                          kp_err *err);
/* Write the 16-byte header of chunk (its payload, payload_len bytes, is
 * already at chunk + 16) exactly as codec_encode does. */
void codec_gpu_seal_chunk(const codec *c, const codec_chunk *ch, uint8_t *chunk, size_t payload_len);

#endif
