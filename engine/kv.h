/*
 * kv.h — the live KV cache of one sequence.
 *
 * Layout (what the codec and the session store rely on):
 *   for each layer l:  K[l]  [n_ctx][n_kv_heads][head_dim]   keys AFTER RoPE
 *                      V[l]  [n_ctx][n_kv_heads][head_dim]
 *   elements of kv_type (F32, F16 or BF16), each layer's K and V one
 *   contiguous backend buffer. Rows 0 .. n_pos-1 are filled.
 * So a codec chunk (C consecutive tokens of one layer's K or V, all KV heads)
 * is the contiguous byte range [t0 * row_bytes, (t0 + C) * row_bytes) of
 * K[l] or V[l], with row_bytes = n_kv_heads * head_dim * elem_size: no copy
 * of the world to take one.
 *
 * Contract
 *   - kv_new allocates n_ctx rows per layer on the backend (memory is
 *     reserved up front: n_ctx bounds what the sequence can hold).
 *   - kv_truncate(n) forgets rows >= n (prefix reuse, rollback); the bytes stay
 *     and are overwritten by later tokens.
 *   - The model writes rows at n_pos .. n_pos+n-1 during a forward pass and
 *     then advances n_pos.
 *   - kv_copy_rows is the one copy of KV rows between caches (device <-> host,
 *     host <-> host), converting the element type through f32 when the two
 *     caches differ. A copy that touches device memory must run on the thread
 *     that owns the model (the scheduler's: sched_kv_copy in
 *     engine/scheduler.h); a host-only copy may run on any thread that owns
 *     both caches.
 */
#ifndef KP_KV_H
#define KP_KV_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kernels.h"
#include "kernels/kp.h"

typedef struct kv_cache {
    kp_backend *be;
    int kv_type;     /* KP_TYPE_F32, KP_TYPE_F16 or KP_TYPE_BF16 */
    int n_layer;
    int n_ctx;       /* rows reserved per layer */
    int n_kv_heads;
    int head_dim;
    int n_pos;       /* rows filled */
    size_t row_bytes; /* n_kv_heads * head_dim * element size */
    void **k;        /* [n_layer] -> [n_ctx][n_kv_heads][head_dim] */
    void **v;        /* [n_layer] -> [n_ctx][n_kv_heads][head_dim] */
} kv_cache;

int kv_new(kv_cache **out, kp_backend *be, int kv_type, int n_layer, int n_ctx,
           int n_kv_heads, int head_dim, kp_err *err);
void kv_free(kv_cache *kv);
void kv_truncate(kv_cache *kv, int n_pos);
/* Total bytes reserved, and bytes holding the n_pos filled rows. */
size_t kv_bytes_reserved(const kv_cache *kv);
size_t kv_bytes_used(const kv_cache *kv);
/* True when the cache (or a cache made on backend be) lives in host memory,
 * so other modules may read and write its rows in place. */
bool kv_is_host(const kv_cache *kv);
bool kv_backend_is_host(kp_backend *be);
/* Copy rows [r0, r0 + n) of every layer's K and V from src to dst (same row
 * index in both). The two must have the same n_layer, n_kv_heads and head_dim;
 * their kv_type may differ (F32, F16, BF16: converted through f32). Either may
 * be host or device memory. n_pos of dst is left alone: the caller sets it.
 * KP_EINVAL for mismatched shapes or rows outside either cache, KP_EIO when a
 * device transfer fails, KP_ENOMEM. */
int kv_copy_rows(kv_cache *dst, const kv_cache *src, int r0, int n, kp_err *err);
/* Rows [r0, r0 + n) of one layer's K (v = 0) or V (v = 1) to or from host
 * memory `host` (n * row_bytes bytes, the cache's own element type), wherever
 * the cache lives: what the storage layer uses instead of a backend's
 * download/upload. Called on the thread that owns the cache's device (for a
 * host cache, any thread). KP_EINVAL for a bad layer or rows outside the
 * cache, KP_EIO when a device transfer fails. kv_sync waits for the writes. */
int kv_read_rows(const kv_cache *kv, int layer, int v, int r0, int n, void *host, kp_err *err);
int kv_write_rows(kv_cache *kv, int layer, int v, int r0, int n, const void *host, kp_err *err);
void kv_sync(kv_cache *kv);
/* Parse "f32" | "f16" | "bf16" into a kv type; -1 if unknown. */
int kv_type_from_name(const char *name);

#endif
