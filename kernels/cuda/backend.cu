/*
 * backend.cu — the CUDA backend's state, memory ops, matrix product and op
 * table (kp_cuda_ops; the other kernels are in ops.cu).
 *
 * One backend = one device, one stream, one cuBLAS handle bound to that
 * stream (cuBLAS itself is loaded at init: blas.cu). Every op is queued on the stream in call order; ops->sync waits.
 * upload/download also wait before returning, so the host buffer can be
 * reused (or read) as soon as they return, as with the CPU backend.
 *
 * Matrix products y [n][n_out] = x [n][n_in] W^T, row-major, are column-
 * major products Y(n_out x n) = W^T X with W seen as an (n_in x n_out)
 * matrix, so cuBLAS is called with (OP_T, OP_N, m = n_out, n, k = n_in):
 *   F32 weights        cublasSgemm (full fp32: TF32 is not enabled).
 *   F16 / BF16 weights the activations are converted to the weight's type
 *                      (as the CPU op does before its dot products), then
 *                      cublasGemmEx with fp32 accumulation and fp32 output.
 *   quantised weights  (Q8_0, Q4_0, Q4_K, Q6_K) dequantised on the fly: a
 *                      chunk of rows (<= 32 MiB of f16) is expanded into a
 *                      scratch buffer, then GemmEx as for F16, chunk by
 *                      chunk. Weights stay quantised in device memory (no
 *                      load-time expansion), at the cost of re-expanding
 *                      them on every matmul. Chosen for simplicity and
 *                      memory; a fused dequant-GEMV kernel is the known
 *                      next step for decode speed.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernels/cuda/cuda_impl.h"

/* Largest dequantised weight chunk (bytes of f16). */
#define KP_CU_WCHUNK_BYTES ((size_t)32 << 20)

/* ---------------------------------------------------------------------- */
/* Errors and scratch                                                     */
/* ---------------------------------------------------------------------- */

void kp_cu_fatal(const char *what) {
    fprintf(stderr, "kvpark: cuda backend: %s\n", what);
    abort();
}

void kp_cu_check(cudaError_t err, const char *what) {
    if (err == cudaSuccess) return;
    fprintf(stderr, "kvpark: cuda backend: %s: %s (%s)\n", what, cudaGetErrorString(err),
            cudaGetErrorName(err));
    abort();
}

static void kp_cu_check_blas(cublasStatus_t s, const char *what) {
    if (s == CUBLAS_STATUS_SUCCESS) return;
    fprintf(stderr, "kvpark: cuda backend: %s: cuBLAS status %d\n", what, (int)s);
    abort();
}

void *kp_cu_reserve(void **buf, size_t *cap, size_t bytes, const char *what) {
    if (*cap >= bytes && *buf) return *buf;
    if (*buf) kp_cu_check(cudaFree(*buf), what); /* synchronises the device */
    *buf = NULL;
    *cap = 0;
    size_t sz = (bytes + 255) & ~(size_t)255;
    kp_cu_check(cudaMalloc(buf, sz ? sz : 256), what);
    *cap = sz;
    return *buf;
}

const int32_t *kp_cu_indices(kp_cuda_state *st, const int32_t *p, int n) {
    cudaPointerAttributes at;
    if (cudaPointerGetAttributes(&at, p) == cudaSuccess &&
        (at.type == cudaMemoryTypeDevice || at.type == cudaMemoryTypeManaged))
        return p;
    (void)cudaGetLastError(); /* an unregistered host pointer is not an error to keep */
    size_t bytes = (size_t)n * sizeof(int32_t);
    void *buf = st->idx;
    kp_cu_reserve(&buf, &st->idx_cap, bytes, "index upload");
    st->idx = (int32_t *)buf;
    kp_cu_check(cudaMemcpyAsync(st->idx, p, bytes, cudaMemcpyHostToDevice, st->stream),
                "index upload");
    /* From pageable memory the copy is staged before cudaMemcpyAsync returns;
     * from pinned memory it is truly asynchronous: wait, so the caller may
     * change its array as soon as the op returns. */
    if (at.type == cudaMemoryTypeHost) kp_cu_check(cudaStreamSynchronize(st->stream), "index upload");
    return st->idx;
}

/* ---------------------------------------------------------------------- */
/* Device discovery, init, release                                        */
/* ---------------------------------------------------------------------- */

extern "C" int kp_cuda_device_count(const char **why) {
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        if (why) *why = cudaGetErrorString(e);
        return 0;
    }
    if (why) *why = n > 0 ? "ok" : "no CUDA-capable device is detected";
    return n;
}

extern "C" int kp_cuda_init(kp_backend *be, int device, kp_err *err) {
    const char *why = NULL;
    int n_dev = kp_cuda_device_count(&why);
    if (n_dev <= 0)
        return kp_errf(err, KP_EUNSUP,
                       "backend: no CUDA device found (%s): use --device cpu, or run on a machine "
                       "with an NVIDIA GPU and driver",
                       why);
    if (device < 0) device = 0;
    if (device >= n_dev)
        return kp_errf(err, KP_EINVAL, "backend: CUDA device %d does not exist (%d found: 0..%d)",
                       device, n_dev, n_dev - 1);

    kp_cuda_state *st = (kp_cuda_state *)calloc(1, sizeof *st);
    if (!st) return kp_errf(err, KP_ENOMEM, "cuda backend: out of memory");
    st->device = device;
    be->impl = st;
    be->ops = &kp_cuda_ops;

    cudaError_t e = cudaSetDevice(device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&st->stream, cudaStreamNonBlocking);
    if (e != cudaSuccess) {
        kp_cuda_release(be);
        return kp_errf(err, KP_EIO, "backend: cannot start CUDA device %d: %s", device,
                       cudaGetErrorString(e));
    }
    st->blas_api = kp_cu_blas(err);
    if (!st->blas_api) {
        kp_cuda_release(be);
        return KP_EUNSUP;
    }
    cublasStatus_t s = st->blas_api->create(&st->blas);
    if (s == CUBLAS_STATUS_SUCCESS) s = st->blas_api->set_stream(st->blas, st->stream);
    if (s == CUBLAS_STATUS_SUCCESS) s = st->blas_api->set_math_mode(st->blas, CUBLAS_DEFAULT_MATH);
    if (s != CUBLAS_STATUS_SUCCESS) {
        kp_cuda_release(be);
        return kp_errf(err, KP_EIO, "backend: cuBLAS initialisation failed on device %d (status %d)",
                       device, (int)s);
    }
    return 0;
}

extern "C" void kp_cuda_release(kp_backend *be) {
    kp_cuda_state *st = kp_cu_state(be);
    if (!st) return;
    cudaSetDevice(st->device);
    if (st->stream) cudaStreamSynchronize(st->stream);
    if (st->blas) st->blas_api->destroy(st->blas);
    cudaFree(st->act);
    cudaFree(st->wbuf);
    cudaFree(st->idx);
    if (st->stream) cudaStreamDestroy(st->stream);
    (void)cudaGetLastError();
    free(st);
    be->impl = NULL;
}

/* ---------------------------------------------------------------------- */
/* Memory                                                                 */
/* ---------------------------------------------------------------------- */

static void *cu_alloc(kp_backend *be, size_t bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, bytes ? bytes : 256) != cudaSuccess) {
        (void)cudaGetLastError();
        return NULL; /* the caller reports out of (device) memory */
    }
    return p;
}

static void cu_free(kp_backend *be, void *p) {
    if (p) kp_cu_check(cudaFree(p), "free");
}

static int cu_memcpy(kp_backend *be, void *dst, const void *src, size_t bytes, cudaMemcpyKind kind,
                     int wait) {
    if (!bytes) return 0;
    kp_cuda_state *st = kp_cu_state(be);
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, kind, st->stream);
    if (e == cudaSuccess && wait) e = cudaStreamSynchronize(st->stream);
    if (e != cudaSuccess) {
        fprintf(stderr, "kvpark: cuda backend: copy of %zu bytes: %s\n", bytes, cudaGetErrorString(e));
        return KP_EIO;
    }
    return 0;
}

static int cu_upload(kp_backend *be, void *dst, const void *src, size_t bytes) {
    return cu_memcpy(be, dst, src, bytes, cudaMemcpyHostToDevice, 1);
}

static int cu_download(kp_backend *be, void *dst, const void *src, size_t bytes) {
    return cu_memcpy(be, dst, src, bytes, cudaMemcpyDeviceToHost, 1);
}

static int cu_copy(kp_backend *be, void *dst, const void *src, size_t bytes) {
    return cu_memcpy(be, dst, src, bytes, cudaMemcpyDeviceToDevice, 0);
}

static void cu_sync(kp_backend *be) {
    kp_cu_check(cudaStreamSynchronize(kp_cu_state(be)->stream), "sync");
}

/* ---------------------------------------------------------------------- */
/* matmul                                                                 */
/* ---------------------------------------------------------------------- */

/* Y[:, o0 .. o0+m) (column-major, ldc n_out) = W16[m rows]^T X16 with fp32
 * accumulation. */
static void cu_gemm_half(kp_cuda_state *st, float *y, int64_t ldy, const void *w, cudaDataType wt,
                         const void *x, int64_t n_in, int64_t m, int n) {
    const float one = 1.0f, zero = 0.0f;
    kp_cu_check_blas(st->blas_api->gemm_ex(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)m, n, (int)n_in, &one, w,
                                  wt, (int)n_in, x, wt, (int)n_in, &zero, y, CUDA_R_32F, (int)ldy,
                                  CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                     "matmul (cublasGemmEx)");
}

static void cu_matmul(kp_backend *be, float *y, const float *x, const kp_wref *w, int n) {
    if (n <= 0 || w->n_out <= 0) return;
    kp_cuda_state *st = kp_cu_state(be);
    const int64_t n_in = w->n_in, n_out = w->n_out;
    if (n_in > 0x7fffffff || n_out > 0x7fffffff) kp_cu_fatal("matmul: matrix too large for cuBLAS");
    if (kp_type_row_bytes(w->type, n_in) == 0)
        kp_cu_fatal("matmul: unsupported weight type or row length not a multiple of its block");

    if (w->type == KP_TYPE_F32) {
        const float one = 1.0f, zero = 0.0f;
        kp_cu_check_blas(st->blas_api->sgemm(st->blas, CUBLAS_OP_T, CUBLAS_OP_N, (int)n_out, n,
                                              (int)n_in, &one, (const float *)w->data, (int)n_in, x,
                                              (int)n_in, &zero, y, (int)n_out),
                         "matmul (cublasSgemm)");
        return;
    }

    /* Activations in the half type the weights are (or are expanded to). */
    const int bf16 = w->type == KP_TYPE_BF16;
    const cudaDataType ht = bf16 ? CUDA_R_16BF : CUDA_R_16F;
    void *xh = kp_cu_reserve(&st->act, &st->act_cap, (size_t)n * n_in * 2, "matmul scratch");
    kp_cu_f32_to_half(st, xh, x, (int64_t)n * n_in, bf16);

    if (w->type == KP_TYPE_F16 || w->type == KP_TYPE_BF16) {
        cu_gemm_half(st, y, n_out, w->data, ht, xh, n_in, n_out, n);
        return;
    }
    if (w->type != KP_TYPE_Q8_0 && w->type != KP_TYPE_Q4_0 && w->type != KP_TYPE_Q4_K &&
        w->type != KP_TYPE_Q6_K)
        kp_cu_fatal("matmul: weight type not supported by the CUDA backend");

    int64_t rows = (int64_t)(KP_CU_WCHUNK_BYTES / ((size_t)n_in * 2));
    if (rows < 1) rows = 1;
    if (rows > n_out) rows = n_out;
    void *wh = kp_cu_reserve(&st->wbuf, &st->wbuf_cap, (size_t)rows * n_in * 2, "matmul scratch");
    for (int64_t r0 = 0; r0 < n_out; r0 += rows) {
        const int64_t m = KP_MIN(rows, n_out - r0);
        kp_cu_dequant_f16(st, wh, w, r0, m);
        cu_gemm_half(st, y + r0, n_out, wh, CUDA_R_16F, xh, n_in, m, n);
    }
}

/* ---------------------------------------------------------------------- */

extern "C" const kp_ops kp_cuda_ops = {
    /* .name = */ "cuda",
    /* .alloc = */ cu_alloc,
    /* .free = */ cu_free,
    /* .upload = */ cu_upload,
    /* .download = */ cu_download,
    /* .copy = */ cu_copy,
    /* .sync = */ cu_sync,
    /* .get_rows = */ kp_cu_get_rows,
    /* .matmul = */ cu_matmul,
    /* .add_bias = */ kp_cu_add_bias,
    /* .add = */ kp_cu_add,
    /* .rmsnorm = */ kp_cu_rmsnorm,
    /* .layernorm = */ kp_cu_layernorm,
    /* .rope = */ kp_cu_rope,
    /* .swiglu = */ kp_cu_swiglu,
    /* .gelu = */ kp_cu_gelu,
    /* .kv_store = */ kp_cu_kv_store,
    /* .attention = */ kp_cu_attention,
};
