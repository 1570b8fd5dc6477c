/*
 * ops.cu — the CUDA kernels of kp_cuda_ops other than the matmul (which is
 * cuBLAS, in backend.cu), each the device twin of the CPU op of the same
 * name in kernels/cpu/ops.c and checked against it by tests/test_cuda_ops.c.
 *
 * Numerics follow the CPU op (this file is compiled with -fmad=false, so
 * a*b+c rounds twice as the C code compiled with -ffp-contract=off does):
 *   get_rows / dequant  the CPU's dequantize_row_* expressions, element by
 *                       element: bit-identical results.
 *   kv_store            round-to-nearest-even f16/bf16: bit-identical.
 *   rmsnorm/layernorm   sums in double (order differs: last-bit
 *                       differences in the float mean at most).
 *   rope                theta_scale = powf(base, -2/n_rot) on the host
 *                       (glibc, as the CPU op), the angle by the same
 *                       repeated float multiplication; cosf/sinf are
 *                       CUDA's (<= 2 ulp), so results agree to ~1e-6.
 *   swiglu, gelu        expf/tanhf are CUDA's (<= 2 ulp); gelu goes through
 *                       fp16 as ggml's table does.
 *   attention           one block per (query, head); each warp takes every
 *                       8th key with an online softmax (running max, sum
 *                       and output), warps merged at the end. Same maths as
 *                       the CPU's max-subtracted softmax, different order.
 *                       head_dim <= 256.
 * Every launcher checks the launch and aborts with the op's name on error.
 */
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <math.h>
#include <stdio.h>

#include "kernels/cuda/cuda_impl.h"

#define KP_CU_THREADS 256
#define KP_CU_ATTN_WARPS 8
#define KP_CU_MAX_HEAD_DIM 256

static void kp_cu_launched(const char *what) { kp_cu_check(cudaGetLastError(), what); }

/* Blocks for a grid-stride loop over n elements. */
static unsigned kp_cu_blocks(int64_t n) {
    int64_t b = (n + KP_CU_THREADS - 1) / KP_CU_THREADS;
    if (b > 65535 * 8) b = 65535 * 8;
    return (unsigned)(b > 0 ? b : 1);
}

/* ---------------------------------------------------------------------- */
/* Element conversions and dequantisation                                 */
/* ---------------------------------------------------------------------- */

__device__ __forceinline__ float kp_h2f(uint16_t h) { return __half2float(__ushort_as_half(h)); }
__device__ __forceinline__ float kp_bf2f(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

/* Element j of a row of type T (row = first byte of the row), as the CPU's
 * kp_dequant_row computes it. */
template <int T>
__device__ __forceinline__ float kp_dq(const uint8_t *row, int64_t j) {
    if (T == KP_TYPE_F32) return ((const float *)row)[j];
    if (T == KP_TYPE_F16) return kp_h2f(((const uint16_t *)row)[j]);
    if (T == KP_TYPE_BF16) return kp_bf2f(((const uint16_t *)row)[j]);
    if (T == KP_TYPE_Q8_0) {
        const uint8_t *b = row + (j / KP_QK8_0) * sizeof(kp_block_q8_0);
        const float d = kp_h2f(*(const uint16_t *)b);
        return (float)((const int8_t *)(b + 2))[j % KP_QK8_0] * d;
    }
    if (T == KP_TYPE_Q4_0) {
        const uint8_t *b = row + (j / KP_QK4_0) * sizeof(kp_block_q4_0);
        const float d = kp_h2f(*(const uint16_t *)b);
        const int l = (int)(j % KP_QK4_0);
        const uint8_t *qs = b + 2;
        const int q = l < KP_QK4_0 / 2 ? (qs[l] & 0x0F) - 8 : (qs[l - KP_QK4_0 / 2] >> 4) - 8;
        return (float)q * d;
    }
    if (T == KP_TYPE_Q4_K) {
        const uint8_t *b = row + (j / KP_QK_K) * sizeof(kp_block_q4_K);
        const float d = kp_h2f(((const uint16_t *)b)[0]);
        const float dmin = kp_h2f(((const uint16_t *)b)[1]);
        const uint8_t *scales = b + 4, *qs = b + 4 + KP_K_SCALE_SIZE;
        const int e = (int)(j % KP_QK_K), chunk = e / 64, c = e % 64;
        const int is = 2 * chunk + (c >= 32);
        int sc, m;
        if (is < 4) {
            sc = scales[is] & 63;
            m = scales[is + 4] & 63;
        } else {
            sc = (scales[is + 4] & 0xF) | ((scales[is - 4] >> 6) << 4);
            m = (scales[is + 4] >> 4) | ((scales[is] >> 6) << 4);
        }
        const float d1 = d * (float)sc, m1 = dmin * (float)m;
        const int q = c < 32 ? (qs[chunk * 32 + c] & 0xF) : (qs[chunk * 32 + c - 32] >> 4);
        return d1 * (float)q - m1;
    }
    if (T == KP_TYPE_Q6_K) {
        const uint8_t *b = row + (j / KP_QK_K) * sizeof(kp_block_q6_K);
        const uint8_t *ql = b, *qh = b + KP_QK_K / 2;
        const int8_t *sc = (const int8_t *)(b + KP_QK_K / 2 + KP_QK_K / 4);
        const float d = kp_h2f(*(const uint16_t *)(b + KP_QK_K / 2 + KP_QK_K / 4 + KP_QK_K / 16));
        const int e = (int)(j % KP_QK_K), half = e / 128, quarter = (e % 128) / 32, l = e % 32;
        ql += half * 64;
        qh += half * 32;
        sc += half * 8;
        const int is = l / 16;
        int q;
        switch (quarter) {
        case 0: q = (ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4); break;
        case 1: q = (ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4); break;
        case 2: q = (ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4); break;
        default: q = (ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4); break;
        }
        q -= 32;
        return d * (float)sc[is + 2 * quarter] * (float)q;
    }
    return __int_as_float(0x7fc00000); /* unreachable: launchers check the type */
}

/* out [n][n_in] f32 = rows ids[t] of w. One block per output row. */
template <int T>
__global__ void kp_get_rows_k(float *out, const uint8_t *w, size_t row_bytes, const int32_t *ids,
                              int64_t n_in) {
    const int64_t t = blockIdx.x;
    const uint8_t *row = w + (size_t)ids[t] * row_bytes;
    for (int64_t j = threadIdx.x; j < n_in; j += blockDim.x) out[t * n_in + j] = kp_dq<T>(row, j);
}

/* dst [n_rows][n_in] f16 = rows r0 .. r0+n_rows of w. */
template <int T>
__global__ void kp_dequant_f16_k(__half *dst, const uint8_t *w, size_t row_bytes, int64_t r0,
                                 int64_t n_in, int64_t total) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < total;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / n_in, j = i % n_in;
        dst[i] = __float2half_rn(kp_dq<T>(w + (size_t)(r0 + r) * row_bytes, j));
    }
}

#define KP_CU_TYPE_SWITCH(type, CALL)                                                   \
    switch (type) {                                                                     \
    case KP_TYPE_F32: CALL(KP_TYPE_F32); break;                                         \
    case KP_TYPE_F16: CALL(KP_TYPE_F16); break;                                         \
    case KP_TYPE_BF16: CALL(KP_TYPE_BF16); break;                                       \
    case KP_TYPE_Q8_0: CALL(KP_TYPE_Q8_0); break;                                       \
    case KP_TYPE_Q4_0: CALL(KP_TYPE_Q4_0); break;                                       \
    case KP_TYPE_Q4_K: CALL(KP_TYPE_Q4_K); break;                                       \
    case KP_TYPE_Q6_K: CALL(KP_TYPE_Q6_K); break;                                       \
    default: kp_cu_fatal("weight type not supported by the CUDA backend "              \
                         "(f32 f16 bf16 q8_0 q4_0 q4_K q6_K are)");                      \
    }

void kp_cu_get_rows(kp_backend *be, float *out, const kp_wref *w, const int32_t *ids, int n) {
    if (n <= 0) return;
    kp_cuda_state *st = kp_cu_state(be);
    const size_t rb = kp_type_row_bytes(w->type, w->n_in);
    if (rb == 0) kp_cu_fatal("get_rows: bad weight type or row length");
    if (n > 0x7fffffff) kp_cu_fatal("get_rows: too many rows");
    const int32_t *dids = kp_cu_indices(st, ids, n);
#define KP_GR(T) \
    kp_get_rows_k<T><<<n, KP_CU_THREADS, 0, st->stream>>>(out, (const uint8_t *)w->data, rb, dids, w->n_in)
    KP_CU_TYPE_SWITCH(w->type, KP_GR)
#undef KP_GR
    kp_cu_launched("get_rows");
}

void kp_cu_dequant_f16(kp_cuda_state *st, void *dst, const kp_wref *w, int64_t r0, int64_t n_rows) {
    const size_t rb = kp_type_row_bytes(w->type, w->n_in);
    const int64_t total = n_rows * w->n_in;
    if (rb == 0 || total <= 0) return;
#define KP_DQ(T)                                                                             \
    kp_dequant_f16_k<T><<<kp_cu_blocks(total), KP_CU_THREADS, 0, st->stream>>>(             \
        (__half *)dst, (const uint8_t *)w->data, rb, r0, w->n_in, total)
    KP_CU_TYPE_SWITCH(w->type, KP_DQ)
#undef KP_DQ
    kp_cu_launched("matmul (dequantise weights)");
}

__global__ void kp_f32_to_f16_k(__half *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2half_rn(src[i]);
}

__global__ void kp_f32_to_bf16_k(__nv_bfloat16 *dst, const float *src, int64_t n) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
        dst[i] = __float2bfloat16_rn(src[i]);
}

void kp_cu_f32_to_half(kp_cuda_state *st, void *dst, const float *src, int64_t n, int to_bf16) {
    if (n <= 0) return;
    if (to_bf16)
        kp_f32_to_bf16_k<<<kp_cu_blocks(n), KP_CU_THREADS, 0, st->stream>>>((__nv_bfloat16 *)dst, src, n);
    else
        kp_f32_to_f16_k<<<kp_cu_blocks(n), KP_CU_THREADS, 0, st->stream>>>((__half *)dst, src, n);
    kp_cu_launched("convert activations to f16/bf16");
}

/* ---------------------------------------------------------------------- */
/* Elementwise: add_bias, add, swiglu, gelu, kv_store                     */
/* ---------------------------------------------------------------------- */

#define KP_CU_FOR(i, n) \
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

__global__ void kp_add_bias_k(float *y, const float *b, int64_t n, int64_t d) {
    KP_CU_FOR(i, n) y[i] += b[i % d];
}

__global__ void kp_add_k(float *y, const float *x, int64_t n) {
    KP_CU_FOR(i, n) y[i] += x[i];
}

/* silu(g) * u = g / (1 + exp(-g)) * u, as the CPU op. */
__global__ void kp_swiglu_k(float *out, const float *g, const float *u, int64_t n) {
    KP_CU_FOR(i, n) {
        const float x = g[i];
        out[i] = x / (1.0f + expf(-x)) * u[i];
    }
}

/* ggml's fp16-table GELU (see cpu_gelu in kernels/cpu/ops.c). */
__global__ void kp_gelu_k(float *x, int64_t n) {
    const float GELU_COEF_A = 0.044715f;
    const float SQRT_2_OVER_PI = 0.79788456080286535587989211986876f;
    KP_CU_FOR(i, n) {
        const float v = x[i];
        float r;
        if (v <= -10.0f) {
            r = 0.0f;
        } else if (v >= 10.0f) {
            r = v;
        } else {
            const float xh = __half2float(__float2half_rn(v));
            const float g = 0.5f * xh * (1.0f + tanhf(SQRT_2_OVER_PI * xh * (1.0f + GELU_COEF_A * xh * xh)));
            r = __half2float(__float2half_rn(g));
        }
        x[i] = r;
    }
}

__global__ void kp_kv_store_k(void *dst, int kv_type, const float *src, int64_t n) {
    KP_CU_FOR(i, n) {
        if (kv_type == KP_TYPE_F32)
            ((float *)dst)[i] = src[i];
        else if (kv_type == KP_TYPE_F16)
            ((__half *)dst)[i] = __float2half_rn(src[i]);
        else
            ((__nv_bfloat16 *)dst)[i] = __float2bfloat16_rn(src[i]);
    }
}

void kp_cu_add_bias(kp_backend *be, float *y, const float *b, int n, int d) {
    const int64_t total = (int64_t)n * d;
    if (total <= 0) return;
    kp_add_bias_k<<<kp_cu_blocks(total), KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(y, b, total, d);
    kp_cu_launched("add_bias");
}

void kp_cu_add(kp_backend *be, float *y, const float *x, int64_t n) {
    if (n <= 0) return;
    kp_add_k<<<kp_cu_blocks(n), KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(y, x, n);
    kp_cu_launched("add");
}

void kp_cu_swiglu(kp_backend *be, float *out, const float *gate, const float *up, int n, int d) {
    const int64_t total = (int64_t)n * d;
    if (total <= 0) return;
    kp_swiglu_k<<<kp_cu_blocks(total), KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(out, gate, up, total);
    kp_cu_launched("swiglu");
}

void kp_cu_gelu(kp_backend *be, float *x, int64_t n) {
    if (n <= 0) return;
    kp_gelu_k<<<kp_cu_blocks(n), KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(x, n);
    kp_cu_launched("gelu");
}

void kp_cu_kv_store(kp_backend *be, void *dst, int kv_type, const float *src, int n, int d) {
    if (kv_type != KP_TYPE_F32 && kv_type != KP_TYPE_F16 && kv_type != KP_TYPE_BF16)
        kp_cu_fatal("kv_store: KV cache type must be f32, f16 or bf16");
    const int64_t total = (int64_t)n * d;
    if (total <= 0) return;
    kp_kv_store_k<<<kp_cu_blocks(total), KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(dst, kv_type, src, total);
    kp_cu_launched("kv_store");
}

/* ---------------------------------------------------------------------- */
/* Norms: one block per row, sums in double                               */
/* ---------------------------------------------------------------------- */

/* Sum of v over the block (blockDim.x == KP_CU_THREADS); every thread gets it. */
__device__ double kp_block_sum(double v, double *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    __syncthreads(); /* sh may still be read from a previous call */
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double s = 0.0;
    for (int w = 0; w < KP_CU_THREADS / 32; w++) s += sh[w];
    return s;
}

__global__ void kp_rmsnorm_k(float *y, const float *x, const float *w, int d, float eps) {
    __shared__ double sh[KP_CU_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * d;
    float *yr = y + (int64_t)blockIdx.x * d;
    double sum = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) sum += (double)(xr[i] * xr[i]);
    sum = kp_block_sum(sum, sh);
    const float mean = (float)(sum / d);
    const float scale = 1.0f / sqrtf(mean + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) yr[i] = w ? (xr[i] * scale) * w[i] : xr[i] * scale;
}

__global__ void kp_layernorm_k(float *y, const float *x, const float *w, const float *b, int d,
                               float eps) {
    __shared__ double sh[KP_CU_THREADS / 32];
    const float *xr = x + (int64_t)blockIdx.x * d;
    float *yr = y + (int64_t)blockIdx.x * d;
    double sum = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) sum += (double)xr[i];
    sum = kp_block_sum(sum, sh);
    const float mean = (float)(sum / d);
    double sum2 = 0.0;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        const float v = xr[i] - mean;
        sum2 += (double)(v * v);
    }
    sum2 = kp_block_sum(sum2, sh);
    const float variance = (float)(sum2 / d);
    const float scale = 1.0f / sqrtf(variance + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = (xr[i] - mean) * scale; /* y may alias x: read x before writing */
        if (w) v = v * w[i];
        if (b) v = v + b[i];
        yr[i] = v;
    }
}

void kp_cu_rmsnorm(kp_backend *be, float *y, const float *x, const float *w, int n, int d, float eps) {
    if (n <= 0 || d <= 0) return;
    kp_rmsnorm_k<<<n, KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(y, x, w, d, eps);
    kp_cu_launched("rmsnorm");
}

void kp_cu_layernorm(kp_backend *be, float *y, const float *x, const float *w, const float *b, int n,
                     int d, float eps) {
    if (n <= 0 || d <= 0) return;
    kp_layernorm_k<<<n, KP_CU_THREADS, 0, kp_cu_state(be)->stream>>>(y, x, w, b, d, eps);
    kp_cu_launched("layernorm");
}

/* ---------------------------------------------------------------------- */
/* RoPE                                                                   */
/* ---------------------------------------------------------------------- */

/* One block per token; thread = (head, pair p). The angle of pair p is
 * freq_scale * (pos * theta_scale^p), the power built by p successive
 * float multiplications exactly as the CPU op does. */
__global__ void kp_rope_k(float *x, const int32_t *pos, int n_heads, int head_dim, int half,
                          float theta_scale, float freq_scale, int neox) {
    const int64_t t = blockIdx.x;
    float *xt = x + t * (int64_t)n_heads * head_dim;
    for (int k = threadIdx.x; k < n_heads * half; k += blockDim.x) {
        const int h = k / half, p = k % half;
        float theta_base = (float)pos[t];
        for (int i = 0; i < p; i++) theta_base *= theta_scale;
        const float theta = freq_scale * theta_base;
        const float cs = cosf(theta), sn = sinf(theta);
        float *xh = xt + (int64_t)h * head_dim;
        const int j0 = neox ? p : 2 * p, j1 = neox ? p + half : 2 * p + 1;
        const float x0 = xh[j0], x1 = xh[j1];
        xh[j0] = x0 * cs - x1 * sn;
        xh[j1] = x0 * sn + x1 * cs;
    }
}

void kp_cu_rope(kp_backend *be, float *x, const int32_t *pos, int n, int n_heads, int head_dim,
                int n_rot, float base, float freq_scale, int mode) {
    if (n <= 0 || n_rot <= 0 || n_heads <= 0) return;
    kp_cuda_state *st = kp_cu_state(be);
    n_rot = KP_MIN(n_rot, head_dim);
    const float theta_scale = powf(base, -2.0f / (float)n_rot); /* host powf, as the CPU op */
    const int32_t *dpos = kp_cu_indices(st, pos, n);
    kp_rope_k<<<n, KP_CU_THREADS, 0, st->stream>>>(x, dpos, n_heads, head_dim, n_rot / 2, theta_scale,
                                                   freq_scale, mode == KP_ROPE_NEOX);
    kp_cu_launched("rope");
}

/* ---------------------------------------------------------------------- */
/* Attention                                                              */
/* ---------------------------------------------------------------------- */

template <int KV>
__device__ __forceinline__ float kp_kv_at(const void *base, int64_t i) {
    if (KV == KP_TYPE_F32) return ((const float *)base)[i];
    if (KV == KP_TYPE_F16) return kp_h2f(((const uint16_t *)base)[i]);
    return kp_bf2f(((const uint16_t *)base)[i]);
}

/* grid (n_head, n_q), KP_CU_ATTN_WARPS warps. Lane l holds dims l, l+32,
 * ... of the query and of its warp's running output. */
template <int KV>
__global__ void __launch_bounds__(KP_CU_ATTN_WARPS * 32)
kp_attention_k(float *out, const float *q, const void *k, const void *v, int pos0, int n_head,
               int n_kv, int head_dim, float scale) {
    constexpr int NC = KP_CU_MAX_HEAD_DIM / 32;
    __shared__ float sh_m[KP_CU_ATTN_WARPS], sh_l[KP_CU_ATTN_WARPS];
    __shared__ float sh_acc[KP_CU_ATTN_WARPS][KP_CU_MAX_HEAD_DIM];

    const int h = blockIdx.x, i = blockIdx.y;
    const int kh = h / (n_head / n_kv);
    const int n_keys = pos0 + i + 1;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t item = (int64_t)i * n_head + h;
    const float *qr = q + item * head_dim;
    const int64_t row_stride = (int64_t)n_kv * head_dim;

    float qv[NC], acc[NC];
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const int d = lane + 32 * c;
        qv[c] = d < head_dim ? qr[d] : 0.0f;
        acc[c] = 0.0f;
    }
    float m = -INFINITY, l = 0.0f;
    for (int j = warp; j < n_keys; j += KP_CU_ATTN_WARPS) {
        const int64_t r = (int64_t)j * row_stride + (int64_t)kh * head_dim;
        float s = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = lane + 32 * c;
            if (d < head_dim) s += qv[c] * kp_kv_at<KV>(k, r + d);
        }
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        s *= scale;
        const float m_new = fmaxf(m, s);
        const float corr = expf(m - m_new); /* 0 for the first key (m = -inf) */
        const float p = expf(s - m_new);
        l = l * corr + p;
#pragma unroll
        for (int c = 0; c < NC; c++) {
            const int d = lane + 32 * c;
            if (d < head_dim) acc[c] = acc[c] * corr + p * kp_kv_at<KV>(v, r + d);
        }
        m = m_new;
    }
    if (lane == 0) {
        sh_m[warp] = m;
        sh_l[warp] = l;
    }
#pragma unroll
    for (int c = 0; c < NC; c++) {
        const int d = lane + 32 * c;
        if (d < head_dim) sh_acc[warp][d] = acc[c];
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int w = 0; w < KP_CU_ATTN_WARPS; w++) mx = fmaxf(mx, sh_m[w]);
    float sum = 0.0f;
    for (int w = 0; w < KP_CU_ATTN_WARPS; w++)
        if (sh_m[w] != -INFINITY) sum += sh_l[w] * expf(sh_m[w] - mx);
    const float inv = 1.0f / sum;
    for (int d = threadIdx.x; d < head_dim; d += blockDim.x) {
        float o = 0.0f;
        for (int w = 0; w < KP_CU_ATTN_WARPS; w++)
            if (sh_m[w] != -INFINITY) o += sh_acc[w][d] * expf(sh_m[w] - mx);
        out[item * head_dim + d] = o * inv;
    }
}

void kp_cu_attention(kp_backend *be, float *out, const float *q, const void *k, const void *v,
                     int kv_type, int n_q, int pos0, int n_head, int n_kv, int head_dim, float scale) {
    if (n_q <= 0) return;
    if (n_kv <= 0 || n_head % n_kv != 0) kp_cu_fatal("attention: n_head must be a multiple of n_kv");
    if (head_dim <= 0 || head_dim > KP_CU_MAX_HEAD_DIM)
        kp_cu_fatal("attention: head_dim must be 1..256 on the CUDA backend");
    if (n_q > 65535) kp_cu_fatal("attention: at most 65535 queries per call");
    cudaStream_t s = kp_cu_state(be)->stream;
    const dim3 grid((unsigned)n_head, (unsigned)n_q), block(KP_CU_ATTN_WARPS * 32);
    switch (kv_type) {
    case KP_TYPE_F32:
        kp_attention_k<KP_TYPE_F32><<<grid, block, 0, s>>>(out, q, k, v, pos0, n_head, n_kv, head_dim, scale);
        break;
    case KP_TYPE_F16:
        kp_attention_k<KP_TYPE_F16><<<grid, block, 0, s>>>(out, q, k, v, pos0, n_head, n_kv, head_dim, scale);
        break;
    case KP_TYPE_BF16:
        kp_attention_k<KP_TYPE_BF16><<<grid, block, 0, s>>>(out, q, k, v, pos0, n_head, n_kv, head_dim, scale);
        break;
    default: kp_cu_fatal("attention: KV cache type must be f32, f16 or bf16");
    }
    kp_cu_launched("attention");
}
