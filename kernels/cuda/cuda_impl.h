/*
 * cuda_impl.h — shared by the CUDA backend's .cu files only (never by C
 * code): the backend's private state and the launchers each file provides.
 *
 * backend.cu owns the state (stream, cuBLAS handle, scratch), memory, the
 * matmul (cuBLAS, loaded by blas.cu) and the op table; ops.cu holds every other kernel and
 * its launcher. Launchers queue work on st->stream and check the launch.
 */
#ifndef KP_CUDA_IMPL_H
#define KP_CUDA_IMPL_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

/* The project's C headers use C11 _Static_assert, which C++ spells
 * static_assert. */
#ifndef _Static_assert
#define _Static_assert static_assert
#endif

extern "C" {
#include "kernels/cpu/cpu.h" /* struct kp_backend (shared by every backend) */
#include "kernels/cuda/cuda.h"
}

/* The cuBLAS entry points the backend calls, resolved at run time (blas.cu:
 * the library is dlopen'ed by kp_cuda_init, not linked). */
typedef struct kp_cu_blas_api {
    cublasStatus_t (*create)(cublasHandle_t *handle);
    cublasStatus_t (*destroy)(cublasHandle_t handle);
    cublasStatus_t (*set_stream)(cublasHandle_t handle, cudaStream_t stream);
    cublasStatus_t (*set_math_mode)(cublasHandle_t handle, cublasMath_t mode);
    cublasStatus_t (*sgemm)(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m,
                            int n, int k, const float *alpha, const float *a, int lda,
                            const float *b, int ldb, const float *beta, float *c, int ldc);
    cublasStatus_t (*gemm_ex)(cublasHandle_t handle, cublasOperation_t ta, cublasOperation_t tb, int m,
                              int n, int k, const void *alpha, const void *a, cudaDataType at,
                              int lda, const void *b, cudaDataType bt, int ldb, const void *beta,
                              void *c, cudaDataType ct, int ldc, cublasComputeType_t compute,
                              cublasGemmAlgo_t algo);
} kp_cu_blas_api;

/* The loaded table, or NULL with a message in err (KP_EUNSUP) when cuBLAS
 * cannot be loaded. Loads it on the first call; thread-safe. */
const kp_cu_blas_api *kp_cu_blas(kp_err *err);

typedef struct kp_cuda_state {
    int device;
    cudaStream_t stream;
    const kp_cu_blas_api *blas_api; /* set by kp_cuda_init before st->blas is made */
    cublasHandle_t blas;
    /* Scratch (device memory), grown on demand; cudaFree synchronises the
     * device, so growing never pulls memory from under a queued kernel. */
    void *act;       /* activations converted to f16/bf16 for GemmEx */
    size_t act_cap;
    void *wbuf;      /* a chunk of quantised weight rows dequantised to f16 */
    size_t wbuf_cap;
    int32_t *idx;    /* get_rows ids / rope positions copied from the host */
    size_t idx_cap;  /* bytes */
} kp_cuda_state;

static inline kp_cuda_state *kp_cu_state(kp_backend *be) { return (kp_cuda_state *)be->impl; }

/* Abort with a message naming the op if err is not cudaSuccess. */
void kp_cu_check(cudaError_t err, const char *what);
[[noreturn]] void kp_cu_fatal(const char *what);
/* A device buffer at least `bytes` long in *buf (capacity *cap). */
void *kp_cu_reserve(void **buf, size_t *cap, size_t bytes, const char *what);
/* ids / positions as a device pointer: p itself if it is device memory,
 * else a copy in st->idx queued on the stream. */
const int32_t *kp_cu_indices(kp_cuda_state *st, const int32_t *p, int n);

/* Dequantise rows [r0, r0 + n_rows) of w into dst [n_rows][w->n_in] f16
 * (ops.cu). */
void kp_cu_dequant_f16(kp_cuda_state *st, void *dst, const kp_wref *w, int64_t r0,
                       int64_t n_rows);
/* dst [n] = src [n] converted to f16 (to_bf16 = 0) or bf16 (ops.cu). */
void kp_cu_f32_to_half(kp_cuda_state *st, void *dst, const float *src, int64_t n, int to_bf16);

/* The ops of kernels.h implemented in ops.cu. */
void kp_cu_get_rows(kp_backend *be, float *out, const kp_wref *w, const int32_t *ids, int n);
void kp_cu_add_bias(kp_backend *be, float *y, const float *b, int n, int d);
void kp_cu_add(kp_backend *be, float *y, const float *x, int64_t n);
void kp_cu_rmsnorm(kp_backend *be, float *y, const float *x, const float *w, int n, int d,
                   float eps);
void kp_cu_layernorm(kp_backend *be, float *y, const float *x, const float *w, const float *b,
                     int n, int d, float eps);
void kp_cu_rope(kp_backend *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                int n_rot, float base, float freq_scale, int mode);
void kp_cu_swiglu(kp_backend *be, float *out, const float *gate, const float *up, int n, int d);
void kp_cu_gelu(kp_backend *be, float *x, int64_t n);
void kp_cu_kv_store(kp_backend *be, void *dst, int kv_type, const float *src, int n, int d);
void kp_cu_attention(kp_backend *be, float *out, const float *q, const void *k, const void *v,
                     int kv_type, int n_q, int pos0, int n_head, int n_kv, int head_dim,
                     float scale);

#endif
