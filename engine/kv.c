/*
 * kv.c — allocation and bookkeeping of a sequence's live KV cache (see kv.h).
 */
#include "engine/kv.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/types.h"

int kv_type_from_name(const char *name) {
    if (!name) return -1;
    if (!strcmp(name, "f32")) return KP_TYPE_F32;
    if (!strcmp(name, "f16")) return KP_TYPE_F16;
    if (!strcmp(name, "bf16")) return KP_TYPE_BF16;
    return -1;
}

int kv_new(kv_cache **out, kp_backend *be, int kv_type, int n_layer, int n_ctx, int n_kv_heads,
           int head_dim, kp_err *err) {
    *out = NULL;
    if (kv_type != KP_TYPE_F32 && kv_type != KP_TYPE_F16 && kv_type != KP_TYPE_BF16)
        return kp_errf(err, KP_EINVAL, "kv: cache type %d is not one of f32, f16, bf16", kv_type);
    if (n_layer <= 0 || n_ctx <= 0 || n_kv_heads <= 0 || head_dim <= 0)
        return kp_errf(err, KP_EINVAL, "kv: bad shape (layers %d, ctx %d, kv heads %d, head_dim %d)",
                       n_layer, n_ctx, n_kv_heads, head_dim);
    kv_cache *kv = calloc(1, sizeof *kv);
    if (!kv) return kp_errf(err, KP_ENOMEM, "kv: out of memory");
    kv->be = be;
    kv->kv_type = kv_type;
    kv->n_layer = n_layer;
    kv->n_ctx = n_ctx;
    kv->n_kv_heads = n_kv_heads;
    kv->head_dim = head_dim;
    kv->row_bytes = (size_t)n_kv_heads * head_dim * (kv_type == KP_TYPE_F32 ? 4 : 2);
    kv->k = calloc((size_t)n_layer, sizeof *kv->k);
    kv->v = calloc((size_t)n_layer, sizeof *kv->v);
    if (!kv->k || !kv->v) {
        kv_free(kv);
        return kp_errf(err, KP_ENOMEM, "kv: out of memory");
    }
    const kp_ops *ops = kp_backend_ops(be);
    size_t bytes = (size_t)n_ctx * kv->row_bytes;
    for (int l = 0; l < n_layer; l++) {
        kv->k[l] = ops->alloc(be, bytes);
        kv->v[l] = ops->alloc(be, bytes);
        if (!kv->k[l] || !kv->v[l]) {
            kv_free(kv);
            return kp_errf(err, KP_ENOMEM,
                           "kv: cannot allocate the KV cache (%d layers x 2 x %zu bytes for %d "
                           "tokens): use a smaller context",
                           n_layer, bytes, n_ctx);
        }
    }
    *out = kv;
    return 0;
}

void kv_free(kv_cache *kv) {
    if (!kv) return;
    const kp_ops *ops = kp_backend_ops(kv->be);
    for (int l = 0; l < kv->n_layer; l++) {
        if (kv->k && kv->k[l]) ops->free(kv->be, kv->k[l]);
        if (kv->v && kv->v[l]) ops->free(kv->be, kv->v[l]);
    }
    free(kv->k);
    free(kv->v);
    free(kv);
}

void kv_truncate(kv_cache *kv, int n_pos) {
    if (n_pos < 0) n_pos = 0;
    if (n_pos < kv->n_pos) kv->n_pos = n_pos;
}

size_t kv_bytes_reserved(const kv_cache *kv) {
    return (size_t)2 * kv->n_layer * kv->n_ctx * kv->row_bytes;
}

size_t kv_bytes_used(const kv_cache *kv) {
    return (size_t)2 * kv->n_layer * kv->n_pos * kv->row_bytes;
}

bool kv_backend_is_host(kp_backend *be) {
    const kp_ops *ops = be ? kp_backend_ops(be) : NULL;
    return ops && !strcmp(ops->name, "cpu");
}

bool kv_is_host(const kv_cache *kv) { return kv && kv_backend_is_host(kv->be); }

static float elem_get(int t, const uint8_t *p, size_t i) {
    if (t == KP_TYPE_F32) {
        float f;
        memcpy(&f, p + 4 * i, 4);
        return f;
    }
    uint16_t h;
    memcpy(&h, p + 2 * i, 2);
    return t == KP_TYPE_F16 ? kp_fp16_to_f32(h) : kp_bf16_to_f32(h);
}

static void elem_put(int t, uint8_t *p, size_t i, float f) {
    if (t == KP_TYPE_F32) {
        memcpy(p + 4 * i, &f, 4);
        return;
    }
    uint16_t h = t == KP_TYPE_F16 ? kp_f32_to_fp16(f) : kp_f32_to_bf16(f);
    memcpy(p + 2 * i, &h, 2);
}

static int kv_rows_check(const kv_cache *kv, int layer, int v, int r0, int n, kp_err *err) {
    if (layer < 0 || layer >= kv->n_layer || (v != 0 && v != 1))
        return kp_errf(err, KP_EINVAL, "kv: no layer %d %s in a cache of %d layers", layer, v ? "V" : "K",
                       kv->n_layer);
    if (r0 < 0 || n < 0 || r0 + n > kv->n_ctx)
        return kp_errf(err, KP_EINVAL, "kv: rows [%d, %d) are outside the cache (%d rows)", r0, r0 + n, kv->n_ctx);
    return 0;
}

int kv_read_rows(const kv_cache *kv, int layer, int v, int r0, int n, void *host, kp_err *err) {
    int rc = kv_rows_check(kv, layer, v, r0, n, err);
    if (rc || n == 0) return rc;
    const uint8_t *p = (const uint8_t *)(v ? kv->v[layer] : kv->k[layer]) + (size_t)r0 * kv->row_bytes;
    if (kp_backend_ops(kv->be)->download(kv->be, host, p, (size_t)n * kv->row_bytes))
        return kp_errf(err, KP_EIO, "kv: reading layer %d %s rows [%d, %d) from the device failed", layer,
                       v ? "V" : "K", r0, r0 + n);
    return 0;
}

int kv_write_rows(kv_cache *kv, int layer, int v, int r0, int n, const void *host, kp_err *err) {
    int rc = kv_rows_check(kv, layer, v, r0, n, err);
    if (rc || n == 0) return rc;
    uint8_t *p = (uint8_t *)(v ? kv->v[layer] : kv->k[layer]) + (size_t)r0 * kv->row_bytes;
    if (kp_backend_ops(kv->be)->upload(kv->be, p, host, (size_t)n * kv->row_bytes))
        return kp_errf(err, KP_EIO, "kv: writing layer %d %s rows [%d, %d) to the device failed", layer,
                       v ? "V" : "K", r0, r0 + n);
    return 0;
}

void kv_sync(kv_cache *kv) {
    const kp_ops *ops = kp_backend_ops(kv->be);
    if (ops->sync) ops->sync(kv->be);
}

int kv_copy_rows(kv_cache *dst, const kv_cache *src, int r0, int n, kp_err *err) {
    if (dst->n_layer != src->n_layer || dst->n_kv_heads != src->n_kv_heads || dst->head_dim != src->head_dim)
        return kp_errf(err, KP_EINVAL,
                       "kv: cannot copy between caches of different shapes (%d x %d x %d vs %d x %d x %d)",
                       src->n_layer, src->n_kv_heads, src->head_dim, dst->n_layer, dst->n_kv_heads, dst->head_dim);
    if (r0 < 0 || n < 0 || r0 + n > src->n_ctx || r0 + n > dst->n_ctx)
        return kp_errf(err, KP_EINVAL, "kv: rows [%d, %d) are outside a cache (%d and %d rows)", r0, r0 + n,
                       src->n_ctx, dst->n_ctx);
    if (n == 0) return 0;
    bool s_host = kv_is_host(src), d_host = kv_is_host(dst);
    bool same = src->kv_type == dst->kv_type;
    const kp_ops *s_ops = kp_backend_ops(src->be), *d_ops = kp_backend_ops(dst->be);
    size_t s_bytes = (size_t)n * src->row_bytes, d_bytes = (size_t)n * dst->row_bytes;
    size_t n_elem = (size_t)n * (size_t)src->n_kv_heads * (size_t)src->head_dim;
    /* a host copy of the source rows when the source is on the device and the
     * rows cannot go straight into dst; a converted copy for a device dst */
    uint8_t *sbuf = !s_host && (!same || !d_host) ? malloc(s_bytes) : NULL;
    uint8_t *dbuf = !same && !d_host ? malloc(d_bytes) : NULL;
    if ((!s_host && (!same || !d_host) && !sbuf) || (!same && !d_host && !dbuf)) {
        free(sbuf);
        free(dbuf);
        return kp_errf(err, KP_ENOMEM, "kv: out of memory copying %d KV rows", n);
    }
    int rc = 0;
    for (int l = 0; l < src->n_layer && !rc; l++)
        for (int v = 0; v < 2 && !rc; v++) {
            const uint8_t *sp = (const uint8_t *)(v ? src->v[l] : src->k[l]) + (size_t)r0 * src->row_bytes;
            uint8_t *dp = (uint8_t *)(v ? dst->v[l] : dst->k[l]) + (size_t)r0 * dst->row_bytes;
            const uint8_t *rows = sp; /* the source rows in host memory */
            if (!s_host) {
                if (same && d_host) { /* straight into dst */
                    if (s_ops->download(src->be, dp, sp, s_bytes)) rc = KP_EIO;
                    continue;
                }
                if (s_ops->download(src->be, sbuf, sp, s_bytes)) {
                    rc = KP_EIO;
                    continue;
                }
                rows = sbuf;
            }
            if (same) {
                if (d_host) memcpy(dp, rows, s_bytes);
                else if (d_ops->upload(dst->be, dp, rows, s_bytes)) rc = KP_EIO;
                continue;
            }
            uint8_t *out = d_host ? dp : dbuf;
            for (size_t i = 0; i < n_elem; i++) elem_put(dst->kv_type, out, i, elem_get(src->kv_type, rows, i));
            if (!d_host && d_ops->upload(dst->be, dp, dbuf, d_bytes)) rc = KP_EIO;
        }
    free(sbuf);
    free(dbuf);
    if (rc) return kp_errf(err, rc, "kv: copying the KV cache %s the device failed", s_host ? "to" : "from");
    return 0;
}
