/*
 * codec_gpu.c — the host half of compress/codec_gpu.h that every build has:
 * checking a chunk's header without decoding it (what the GPU restore does
 * before it copies a payload to the device) and writing the header of a
 * payload encoded on the device; and, in a build without CUDA
 * (KP_HAVE_CUDA undefined), the device functions as stubs that return
 * KP_EUNSUP saying how to get them. With CUDA they live in
 * compress/codec_gpu.cu.
 *
 * Both are codec.c's own header code (codec_chunk_verify, codec_chunk_seal),
 * so the two paths cannot drift apart; tests/test_codec_cuda.c checks that both
 * functions agree with codec_encode / codec_decode on every codec, and on
 * damaged and mismatched chunks.
 */
#include "compress/codec_gpu.h"

#include <string.h>

#include "compress/codec_impl.h"
#include "kernels/types.h"

int codec_gpu_check_chunk(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len,
                          kp_err *err) {
    if (!c || !ch) return kp_errf(err, KP_EINVAL, "codec check: codec or chunk is NULL");
    return codec_chunk_verify(c, ch, in, len, "check", err);
}

void codec_gpu_seal_chunk(const codec *c, const codec_chunk *ch, uint8_t *chunk, size_t payload_len) {
    codec_chunk_seal(c, ch, chunk, payload_len);
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
