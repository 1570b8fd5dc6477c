/*
 * kernels.h — the numeric operations of a forward pass, as one table per
 * backend (kp_ops). The engine calls only these; a backend owns where the
 * buffers live (host memory for "cpu", device memory for "cuda").
 *
 * Contract
 *   - kp_backend_new("cpu", n_threads) / ("cuda", device) create a backend;
 *     kp_backend_ops() gives its table. Every buffer passed to an op was
 *     allocated with ops->alloc of the same backend (or is a weight uploaded
 *     with ops->upload).
 *   - Ops are asynchronous on the CUDA backend (ordered on one stream);
 *     ops->sync waits. CPU ops are synchronous and multi-threaded on the
 *     backend's persistent thread pool.
 *   - Shapes are row-major, fastest dimension last in the comment:
 *       x [n][d] means n rows of d floats.
 *   - Weights are 2-D matrices as GGUF stores them: kp_wref{type, n_in
 *     (row length, ggml ne[0]), n_out (rows, ne[1]), data}. A matmul computes
 *     y[t][o] = sum_i x[t][i] * W[o][i]   (y = x W^T).
 *   - The KV cache holds elements of kv_type (F32, F16 or BF16), one layer's
 *     K as [n_ctx][n_kv_heads][head_dim] (keys AFTER RoPE), V likewise.
 *   - Every CUDA op has this CPU op as its reference (tests/test_cuda_ops.c).
 */
#ifndef KP_KERNELS_H
#define KP_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "kernels/types.h"

typedef struct kp_backend kp_backend;

typedef struct kp_wref {
    int type;
    int64_t n_in;  /* row length (ne[0]) */
    int64_t n_out; /* number of rows (ne[1]) */
    const void *data;
} kp_wref;

enum kp_rope_mode { KP_ROPE_NORMAL = 0 /* pairs (2i, 2i+1) */, KP_ROPE_NEOX = 2 /* pairs (i, i+n_rot/2) */ };

typedef struct kp_ops {
    const char *name;
    /* memory */
    void *(*alloc)(kp_backend *be, size_t bytes);
    void (*free)(kp_backend *be, void *p);
    int (*upload)(kp_backend *be, void *dst, const void *src, size_t bytes);   /* host -> backend */
    int (*download)(kp_backend *be, void *dst, const void *src, size_t bytes); /* backend -> host */
    int (*copy)(kp_backend *be, void *dst, const void *src, size_t bytes);     /* backend -> backend */
    void (*sync)(kp_backend *be);

    /* out[t][:] = row ids[t] of W (any supported type), as f32. out [n][W.n_in] */
    void (*get_rows)(kp_backend *be, float *out, const kp_wref *w, const int32_t *ids, int n);
    /* y [n][W.n_out] = x [n][W.n_in] * W^T */
    void (*matmul)(kp_backend *be, float *y, const float *x, const kp_wref *w, int n);
    /* y[t][:] += b[:]    y [n][d], b [d] */
    void (*add_bias)(kp_backend *be, float *y, const float *b, int n, int d);
    /* y[i] += x[i]    n elements */
    void (*add)(kp_backend *be, float *y, const float *x, int64_t n);
    /* y [n][d] = x / rms(x) * w  (w may be NULL) */
    void (*rmsnorm)(kp_backend *be, float *y, const float *x, const float *w, int n, int d,
                    float eps);
    /* y [n][d] = (x - mean) / sqrt(var + eps) * w + b */
    void (*layernorm)(kp_backend *be, float *y, const float *x, const float *w, const float *b,
                      int n, int d, float eps);
    /* Rotate the first n_rot dims of each head in place. x [n][n_heads][head_dim],
     * pos [n]: theta_i = pos * freq_scale * base^(-2i/n_rot). */
    void (*rope)(kp_backend *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                 int n_rot, float base, float freq_scale, int mode);
    /* out [n][d] = silu(gate) * up */
    void (*swiglu)(kp_backend *be, float *out, const float *gate, const float *up, int n, int d);
    /* x [n] = gelu(x) (tanh approximation, as ggml) */
    void (*gelu)(kp_backend *be, float *x, int64_t n);
    /* Convert f32 rows into the KV cache's element type:
     * dst [n][d] (kv_type) = src [n][d] (f32). */
    void (*kv_store)(kp_backend *be, void *dst, int kv_type, const float *src, int n, int d);
    /* Causal attention of one sequence.
     *   q   [n_q][n_head][head_dim]  queries at positions pos0 .. pos0+n_q-1
     *   k,v [>= pos0+n_q][n_kv][head_dim] of kv_type (the cache, rows 0..)
     *   out [n_q][n_head][head_dim]
     * Query head h uses KV head h / (n_head / n_kv). Query i attends to
     * key rows 0 .. pos0+i. scale multiplies q.k (usually 1/sqrt(head_dim)). */
    void (*attention)(kp_backend *be, float *out, const float *q, const void *k, const void *v,
                      int kv_type, int n_q, int pos0, int n_head, int n_kv, int head_dim,
                      float scale);
} kp_ops;

/* name: "cpu" or "cuda". For "cpu", n_threads <= 0 means all cores. */
int kp_backend_new(kp_backend **out, const char *name, int n_threads, kp_err *err);
void kp_backend_free(kp_backend *be);
const kp_ops *kp_backend_ops(const kp_backend *be);
int kp_backend_threads(const kp_backend *be);
/* True if this build has CUDA and a device is present. */
int kp_cuda_available(void);

#endif
