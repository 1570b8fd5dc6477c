/*
 * kv.c — allocation and bookkeeping of a sequence's live KV cache (see kv.h).
 */
#include "engine/kv.h"

#include <stdlib.h>
#include <string.h>

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
