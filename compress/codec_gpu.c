/*
 * codec_gpu.c — the host half of compress/codec_gpu.h that every build has:
 * checking a chunk's header without decoding it (what the GPU restore does
 * before it copies a payload to the device) and writing the header of a
 * payload encoded on the device; and, in a build without CUDA
 * (KP_HAVE_CUDA undefined), the device functions as stubs that return
 * KP_EUNSUP saying how to get them. With CUDA they live in
 * compress/codec_gpu.cu.
 *
 * The header's byte map and the order of the checks are codec.c's (its
 * comment is the reference); tests/test_codec_cuda.c checks that both
 * functions agree with codec_encode / codec_decode on every codec, and on
 * damaged and mismatched chunks.
 */
#include "compress/codec_gpu.h"

#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "compress/codec_impl.h"
#include "kernels/types.h"

#define CG_HDR 16
#define CG_FLAG_V 1u

static uint32_t cg_checksum(const uint8_t *hdr, const uint8_t *payload, size_t len) {
    return XXH32(payload, len, XXH32(hdr, 12, 0));
}

int codec_gpu_check_chunk(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len,
                          kp_err *err) {
    if (!c || !ch) return kp_errf(err, KP_EINVAL, "codec check: codec or chunk is NULL");
    const char *nm = codec_name(c);
    if (ch->n < 1 || ch->n > 65535)
        return kp_errf(err, KP_EINVAL, "codec '%s' check: chunk of %d rows (must be 1..65535)", nm, ch->n);
    if (codec_elem_size(ch->kv_type) == 0)
        return kp_errf(err, KP_EUNSUP, "codec '%s' check: KV element type %d is not F32, F16 or BF16", nm,
                       ch->kv_type);
    if (!in || len < CG_HDR)
        return kp_errf(err, KP_EFORMAT, "codec '%s' check: chunk of %zu bytes is shorter than its 16-byte "
                       "header (truncated)", nm, in ? len : 0);
    if (in[0] != 'K' || in[1] != 'C')
        return kp_errf(err, KP_EFORMAT, "codec '%s' check: bad chunk magic %02x %02x (want 'KC')", nm, in[0],
                       in[1]);
    const uint32_t plen = kp_get_u32(in + 8);
    if ((size_t)plen != len - CG_HDR)
        return kp_errf(err, KP_EFORMAT, "codec '%s' check: chunk is %zu bytes but its header says 16 + %u "
                       "(truncated or padded)", nm, len, plen);
    const uint32_t want = kp_get_u32(in + 12), got = cg_checksum(in, in + CG_HDR, plen);
    if (want != got)
        return kp_errf(err, KP_EFORMAT, "codec '%s' check: chunk checksum mismatch (stored %08x, computed "
                       "%08x); the chunk is corrupt", nm, want, got);
    const uint16_t flags = kp_get_u16(in + 6);
    if (flags & ~CG_FLAG_V)
        return kp_errf(err, KP_EFORMAT, "codec '%s' check: unknown chunk flags %04x", nm, flags);
    if (in[2] != codec_id_of(c))
        return kp_errf(err, KP_EMISMATCH, "codec '%s' check: chunk was written by codec id %u, this codec is "
                       "id %d", nm, in[2], codec_id_of(c));
    if (in[3] != ch->kv_type)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' check: chunk holds KV type %u, caller expects %d", nm,
                       in[3], ch->kv_type);
    if (kp_get_u16(in + 4) != ch->n)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' check: chunk holds %u rows, caller expects %d", nm,
                       kp_get_u16(in + 4), ch->n);
    if (((flags & CG_FLAG_V) != 0) != (ch->is_v != 0))
        return kp_errf(err, KP_EMISMATCH, "codec '%s' check: chunk holds %s, caller expects %s", nm,
                       (flags & CG_FLAG_V) ? "values" : "keys", ch->is_v ? "values" : "keys");
    if (c->layer_payload_bytes && (ch->layer < 0 || ch->layer >= c->shape.n_layer))
        return kp_errf(err, KP_EINVAL, "codec '%s' check: layer %d outside 0..%d", nm, ch->layer,
                       c->shape.n_layer - 1);
    const size_t expect = codec_chunk_bytes_at(c, ch->n, ch->kv_type, ch->is_v, ch->layer);
    if (expect != len)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' check: chunk is %zu bytes, %d rows of %d heads x %d dims "
                       "need %zu (made for another KV shape?)", nm, len, ch->n, c->shape.n_kv_heads,
                       c->shape.head_dim, expect);
    return 0;
}

void codec_gpu_seal_chunk(const codec *c, const codec_chunk *ch, uint8_t *chunk, size_t payload_len) {
    chunk[0] = 'K';
    chunk[1] = 'C';
    chunk[2] = (uint8_t)codec_id_of(c);
    chunk[3] = (uint8_t)ch->kv_type;
    kp_put_u16(chunk + 4, (uint16_t)ch->n);
    kp_put_u16(chunk + 6, ch->is_v ? CG_FLAG_V : 0);
    kp_put_u32(chunk + 8, (uint32_t)payload_len);
    kp_put_u32(chunk + 12, cg_checksum(chunk, chunk + CG_HDR, payload_len));
}

#ifndef KP_HAVE_CUDA

/* ---- a build without CUDA ---------------------------------------------------- */

#define CG_NO_CUDA                                                                                 \
    "this build has no CUDA (rebuild with -Dcuda=enabled and the CUDA toolkit); decode chunks on " \
    "the CPU with codec_decode"

int codec_gpu_available(const char **why) {
    if (why) *why = "built without CUDA (-Dcuda=disabled or no nvcc)";
    return 0;
}

int codec_gpu_new(codec_gpu_ctx **out, const codec *c, int device, kp_err *err) {
    if (out) *out = NULL;
    return kp_errf(err, KP_EUNSUP, "codec gpu: %s", CG_NO_CUDA);
}

void codec_gpu_free(codec_gpu_ctx *g) { (void)g; }

int codec_gpu_decode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks, void *stream,
                           kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu decode: %s", CG_NO_CUDA);
}

int codec_gpu_encode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks, void *stream,
                           kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu encode: %s", CG_NO_CUDA);
}

int codec_gpu_encode_to_host(codec_gpu_ctx *g, const codec_chunk *ch, const void *d_rows, uint8_t *out,
                             size_t cap, size_t *out_len, kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu encode: %s", CG_NO_CUDA);
}

int codec_gpu_sync(codec_gpu_ctx *g, void *stream, kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu: %s", CG_NO_CUDA);
}

int codec_gpu_staging_new(codec_gpu_staging **out, int n_buffers, size_t buffer_bytes, kp_err *err) {
    if (out) *out = NULL;
    return kp_errf(err, KP_EUNSUP, "codec gpu staging: %s", CG_NO_CUDA);
}

void codec_gpu_staging_free(codec_gpu_staging *s) { (void)s; }
size_t codec_gpu_staging_buffer_bytes(const codec_gpu_staging *s) { return 0; }
int codec_gpu_staging_n_free(codec_gpu_staging *s) { return 0; }

int codec_gpu_staging_acquire(codec_gpu_staging *s, void **buf, kp_err *err) {
    if (buf) *buf = NULL;
    return kp_errf(err, KP_EUNSUP, "codec gpu staging: %s", CG_NO_CUDA);
}

void codec_gpu_staging_release(codec_gpu_staging *s, void *buf) { (void)s, (void)buf; }

int codec_gpu_restore_begin(codec_gpu_restore **out, codec_gpu_ctx *g, codec_gpu_staging *pool,
                            int max_buffers, kp_err *err) {
    if (out) *out = NULL;
    return kp_errf(err, KP_EUNSUP, "codec gpu restore: %s", CG_NO_CUDA);
}

int codec_gpu_restore_layer(codec_gpu_restore *r, int layer, int n, const codec_gpu_host_chunk *chunks,
                            kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu restore: %s", CG_NO_CUDA);
}

int codec_gpu_restore_layer_ready(codec_gpu_restore *r, int layer, kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu restore: %s", CG_NO_CUDA);
}

int codec_gpu_restore_wait_layer(codec_gpu_restore *r, int layer, kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu restore: %s", CG_NO_CUDA);
}

int codec_gpu_restore_stream_wait(codec_gpu_restore *r, int layer, void *stream, kp_err *err) {
    return kp_errf(err, KP_EUNSUP, "codec gpu restore: %s", CG_NO_CUDA);
}

int codec_gpu_restore_end(codec_gpu_restore *r, kp_err *err) {
    (void)r, (void)err;
    return 0;
}

#endif
