/*
 * ops.c — the CPU op table (kp_cpu_ops): every kernel of kernels.h in C11,
 * vectorised with AVX-512 / AVX2 intrinsics where it pays (scalar fallbacks
 * otherwise) and spread over the backend's thread pool when the work is big
 * enough to repay the hand-off.
 *
 * Numerics follow llama.cpp's CPU backend (ggml) so golden logits match:
 * RMSNorm/LayerNorm sums in double, RoPE angles built by repeated float
 * multiplication, softmax with max subtraction and a double sum, activations
 * converted to the weight's vec_dot type before quantised dot products, GELU
 * through fp16 as ggml's lookup table does. Like ggml on AVX2/AVX-512,
 * softmax and SiLU use a vectorised exp (v8_exp, within ~1 ulp of expf);
 * the portable build uses expf. Every op gives the same result for any
 * thread count (work is split between whole output elements or groups).
 *
 * A backend is used by one thread at a time (the engine's scheduler): its
 * scratch buffers are shared by successive ops.
 *
 * Matrix products (the bulk of the time):
 *   n == 1..KP_GEMV_MAX_N  one dot product per (token, output row), 8 rows
 *                          at a time sharing the activation loads (GEMV).
 *   larger n               cache-blocked GEMM: a block of W (KC inputs x NC
 *                          outputs) is packed into panels of NR outputs laid
 *                          out [k][NR]; a register tile of MR tokens x NR
 *                          outputs is accumulated with broadcast-FMA, so no
 *                          horizontal sums are needed. Each output is summed
 *                          in order k = 0, 1, ... with FMA whatever the
 *                          blocking, so results do not depend on the split.
 *   quantised weights      activations converted once per row with
 *                          kp_quant_row(kp_vec_dot_type(W)), then kp_vec_dot.
 */
#include <math.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__AVX2__) || defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include "kernels/cpu/cpu.h"
#include "kernels/cpu/quant.h"

/* ---------------------------------------------------------------------- */
/* Tuning                                                                 */
/* ---------------------------------------------------------------------- */

/* Below this much work (multiply-adds or element operations) an op runs on
 * the calling thread: waking a worker costs more than the work. */
#define KP_PAR_MIN_WORK (1 << 14)
/* Elementwise ops (add, bias, swiglu, gelu, kv_store) go parallel only above
 * this many elements. */
#define KP_PAR_MIN_ELEMS (1 << 15)
/* Matmuls with at most this many tokens use the GEMV path. */
#ifndef KP_GEMV_MAX_N
#define KP_GEMV_MAX_N 7
#endif
/* GEMM blocking: KC inputs x NC outputs of W are packed at a time. */
#ifndef KP_KC
#define KP_KC 256
#endif
#ifndef KP_NC
#define KP_NC 128
#endif
/* GEMV: rows sharing one pass over the activation row. */
#define KP_GEMV_ROWS 8

/* ---------------------------------------------------------------------- */
/* A tiny vector layer: kp_vf is KP_VL floats                              */
/* ---------------------------------------------------------------------- */

#if defined(__AVX512F__)
#define KP_VL 16
typedef __m512 kp_vf;
static inline kp_vf vf_zero(void) { return _mm512_setzero_ps(); }
static inline kp_vf vf_load(const float *p) { return _mm512_loadu_ps(p); }
static inline void vf_store(float *p, kp_vf v) { _mm512_storeu_ps(p, v); }
static inline kp_vf vf_set1(float x) { return _mm512_set1_ps(x); }
static inline kp_vf vf_fma(kp_vf a, kp_vf b, kp_vf c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vf_hsum(kp_vf v) { return _mm512_reduce_add_ps(v); }
#elif defined(__AVX2__) && defined(__FMA__)
#define KP_VL 8
typedef __m256 kp_vf;
static inline kp_vf vf_zero(void) { return _mm256_setzero_ps(); }
static inline kp_vf vf_load(const float *p) { return _mm256_loadu_ps(p); }
static inline void vf_store(float *p, kp_vf v) { _mm256_storeu_ps(p, v); }
static inline kp_vf vf_set1(float x) { return _mm256_set1_ps(x); }
static inline kp_vf vf_fma(kp_vf a, kp_vf b, kp_vf c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vf_hsum(kp_vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#else
/* Portable fallback: the same arithmetic, one lane at a time. */
#define KP_VL 4
typedef struct { float v[KP_VL]; } kp_vf;
static inline kp_vf vf_zero(void) { kp_vf r = {{0}}; return r; }
static inline kp_vf vf_load(const float *p) { kp_vf r; memcpy(r.v, p, sizeof r.v); return r; }
static inline void vf_store(float *p, kp_vf v) { memcpy(p, v.v, sizeof v.v); }
static inline kp_vf vf_set1(float x) {
    kp_vf r;
    for (int i = 0; i < KP_VL; i++) r.v[i] = x;
    return r;
}
static inline kp_vf vf_fma(kp_vf a, kp_vf b, kp_vf c) {
#ifdef FP_FAST_FMAF /* hardware fma (e.g. aarch64); without it fmaf is a slow libm call */
    for (int i = 0; i < KP_VL; i++) c.v[i] = fmaf(a.v[i], b.v[i], c.v[i]);
#else
    for (int i = 0; i < KP_VL; i++) c.v[i] = a.v[i] * b.v[i] + c.v[i];
#endif
    return c;
}
static inline float vf_hsum(kp_vf v) {
    float s = 0;
    for (int i = 0; i < KP_VL; i++) s += v.v[i];
    return s;
}
#endif

/* GEMM register tile: MR tokens x NR outputs (two vectors). */
#define KP_MR 6
#define KP_NR (2 * KP_VL)

#define KP_INLINE static inline __attribute__((always_inline))

/* ---------------------------------------------------------------------- */
/* Backend state: per-thread scratch                                      */
/* ---------------------------------------------------------------------- */

typedef struct kp_cpu_state {
    int n_threads;
    void **tbuf;   /* [n_threads] per-thread scratch, 64-byte aligned */
    size_t *tcap;  /* [n_threads] bytes */
    void *sbuf;    /* shared scratch (converted activations) */
    size_t scap;
} kp_cpu_state;

/* An op has no way to report failure (kernels.h ops return void); running
 * out of memory for a few KB of scratch is fatal. */
static void cpu_fatal(const char *what) {
    fprintf(stderr, "kvpark: cpu backend: %s\n", what);
    abort();
}

static void *cpu_aligned_alloc(size_t bytes) {
    size_t sz = (bytes + 63) & ~(size_t)63;
    if (sz == 0) sz = 64;
    return aligned_alloc(64, sz);
}

int kp_cpu_count(void) {
#ifdef CPU_COUNT
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) {
        int n = CPU_COUNT(&set);
        if (n > 0) return n;
    }
#endif
    long n = sysconf(_SC_NPROCESSORS_ONLN);
    return n > 0 ? (int)n : 1;
}

int kp_cpu_init(kp_backend *be, kp_err *err) {
    kp_cpu_state *st = calloc(1, sizeof *st);
    if (!st) return kp_errf(err, KP_ENOMEM, "cpu backend: out of memory");
    st->n_threads = be->n_threads > 0 ? be->n_threads : 1;
    st->tbuf = calloc((size_t)st->n_threads, sizeof *st->tbuf);
    st->tcap = calloc((size_t)st->n_threads, sizeof *st->tcap);
    if (!st->tbuf || !st->tcap) {
        free(st->tbuf);
        free(st->tcap);
        free(st);
        return kp_errf(err, KP_ENOMEM, "cpu backend: out of memory");
    }
    be->impl = st;
    return 0;
}

void kp_cpu_release(kp_backend *be) {
    kp_cpu_state *st = be->impl;
    if (!st) return;
    for (int i = 0; i < st->n_threads; i++) free(st->tbuf[i]);
    free(st->tbuf);
    free(st->tcap);
    free(st->sbuf);
    free(st);
    be->impl = NULL;
}

/* Make every thread's scratch at least `bytes` long (called by the calling
 * thread before a parallel run). */
static void cpu_reserve_threads(kp_backend *be, size_t bytes) {
    kp_cpu_state *st = be->impl;
    for (int i = 0; i < st->n_threads; i++) {
        if (st->tcap[i] >= bytes) continue;
        free(st->tbuf[i]);
        st->tbuf[i] = cpu_aligned_alloc(bytes);
        if (!st->tbuf[i]) cpu_fatal("out of memory for per-thread scratch");
        st->tcap[i] = bytes;
    }
}

static void *cpu_thread_buf(kp_backend *be, int ith) {
    return ((kp_cpu_state *)be->impl)->tbuf[ith];
}

static void *cpu_reserve_shared(kp_backend *be, size_t bytes) {
    kp_cpu_state *st = be->impl;
    if (st->scap < bytes) {
        free(st->sbuf);
        st->sbuf = cpu_aligned_alloc(bytes);
        if (!st->sbuf) cpu_fatal("out of memory for activation scratch");
        st->scap = bytes;
    }
    return st->sbuf;
}

/* Run fn on the pool if the work is worth it, else on this thread alone. */
static void cpu_run(kp_backend *be, kp_pool_fn fn, void *arg, int64_t work) {
    if (be->pool && work >= KP_PAR_MIN_WORK)
        kp_pool_run(be->pool, fn, arg);
    else
        fn(arg, 0, 1);
}

/* ---------------------------------------------------------------------- */
/* Memory                                                                 */
/* ---------------------------------------------------------------------- */

static void *cpu_alloc(kp_backend *be, size_t bytes) { return cpu_aligned_alloc(bytes); }
static void cpu_free(kp_backend *be, void *p) { free(p); }
static int cpu_memcpy(kp_backend *be, void *dst, const void *src, size_t bytes) {
    if (bytes) memmove(dst, src, bytes);
    return 0;
}
static void cpu_sync(kp_backend *be) {}

/* ---------------------------------------------------------------------- */
/* Small vector helpers                                                   */
/* ---------------------------------------------------------------------- */

/* sum_i a[i]*b[i]: one vector accumulator, then the tail in order. */
static inline float cpu_dot(const float *a, const float *b, int64_t n) {
    int64_t i = 0;
    float s = 0.0f;
    if (n >= KP_VL) {
        kp_vf acc = vf_zero();
        for (; i + KP_VL <= n; i += KP_VL) acc = vf_fma(vf_load(a + i), vf_load(b + i), acc);
        s = vf_hsum(acc);
    }
#if defined(__AVX512F__)
    if (i + 8 <= n) {
        __m256 acc8 = _mm256_mul_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i));
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc8), _mm256_extractf128_ps(acc8, 1));
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));
        h = _mm_add_ss(h, _mm_movehdup_ps(h));
        s += _mm_cvtss_f32(h);
        i += 8;
    }
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

/* y[i] += a * x[i] */
static inline void cpu_axpy(float *y, float a, const float *x, int64_t n) {
    for (int64_t i = 0; i < n; i++) y[i] += a * x[i];
}

/* 8-wide AVX2 helpers (also used on AVX-512 machines: attention rows and
 * softmax are short, 8 lanes fit them better). */
#if defined(__AVX2__) && defined(__FMA__)
#define KP_HAVE_V8 1

static inline float v8_hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline float v8_hmax(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 vectors of 8 -> one vector of their 8 horizontal sums:
 * out[u] = ((p_u[0]+p_u[1]) + (p_u[2]+p_u[3])) + ((p_u[4]+p_u[5]) + (p_u[6]+p_u[7])). */
static inline __m256 v8_hsum8(const __m256 p[8]) {
    __m256 t0 = _mm256_hadd_ps(p[0], p[1]), t1 = _mm256_hadd_ps(p[2], p[3]);
    __m256 t2 = _mm256_hadd_ps(p[4], p[5]), t3 = _mm256_hadd_ps(p[6], p[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* A kp_vf folded to 8 lanes (lane i + lane i+8 for AVX-512). */
static inline __m256 v8_fold(kp_vf v) {
#if KP_VL == 16
    return _mm256_add_ps(_mm512_castps512_ps256(v),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
#else
    return v;
#endif
}

/* exp(x) for 8 floats, within ~1 ulp of expf (what ggml's softmax and SiLU
 * do too: a vectorised exp, not libm's): x = n ln2 + r with |r| <= ln2/2
 * (Cody-Waite split of ln2), exp(r) by its degree-7 Taylor polynomial
 * (truncation < 1e-8), times 2^n applied in two halves so n = 128 and
 * gradual underflow work. exp(-inf) = 0, exp(+inf) = inf, NaN stays NaN. */
static inline __m256 v8_exp(__m256 x) {
    const __m256 log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f);
    const __m256 ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, ln2_hi, x);
    r = _mm256_fnmadd_ps(n, ln2_lo, r);
    __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    /* clamp n so the integer maths below is defined for huge |x| (those
     * lanes are replaced by 0 / inf anyway) */
    n = _mm256_min_ps(_mm256_max_ps(n, _mm256_set1_ps(-160.0f)), _mm256_set1_ps(160.0f));
    __m256i ni = _mm256_cvtps_epi32(n);
    __m256i n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, s1), s2);
    y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(x, _mm256_set1_ps(-104.0f), _CMP_LT_OQ));
    y = _mm256_blendv_ps(y, _mm256_set1_ps(INFINITY),
                         _mm256_cmp_ps(x, _mm256_set1_ps(88.7228394f), _CMP_GT_OQ));
    return y;
}

/* 8 consecutive KV elements as floats (kv_type a constant after inlining);
 * fp16/bf16 -> f32 is exact, so this equals kp_fp16_to_f32 / kp_bf16_to_f32. */
KP_INLINE __m256 v8_load_kv(int kv_type, const void *base, int64_t i) {
    if (kv_type == KP_TYPE_F32) return _mm256_loadu_ps((const float *)base + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)base + i));
    if (kv_type == KP_TYPE_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

/* ---------------------------------------------------------------------- */
/* get_rows                                                               */
/* ---------------------------------------------------------------------- */

typedef struct {
    float *out;
    const kp_wref *w;
    const int32_t *ids;
    int n;
} get_rows_args;

static void get_rows_worker(void *arg_, int ith, int nth) {
    get_rows_args *a = arg_;
    const kp_wref *w = a->w;
    size_t rb = kp_type_row_bytes(w->type, w->n_in);
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const char *row = (const char *)w->data + (size_t)a->ids[t] * rb;
        float *dst = a->out + t * w->n_in;
        if (w->type == KP_TYPE_F32)
            memcpy(dst, row, (size_t)w->n_in * sizeof(float));
        else if (kp_dequant_row(w->type, row, dst, w->n_in) != 0)
            cpu_fatal("get_rows: weight type cannot be dequantised (unsupported type)");
    }
}

static void cpu_get_rows(kp_backend *be, float *out, const kp_wref *w, const int32_t *ids,
                         int n) {
    if (n <= 0) return;
    if (kp_type_row_bytes(w->type, w->n_in) == 0) cpu_fatal("get_rows: bad weight type or row length");
    get_rows_args a = {out, w, ids, n};
    int64_t work = (int64_t)n * w->n_in * (w->type == KP_TYPE_F32 ? 1 : 4);
    cpu_run(be, get_rows_worker, &a, work >= KP_PAR_MIN_ELEMS ? work : 0);
}

/* ---------------------------------------------------------------------- */
/* matmul, F32 weights                                                    */
/* ---------------------------------------------------------------------- */

/* R consecutive rows of W (each one accumulator), dotted with one x row:
 * y[r] = sum_k W[o+r][k] * x[k]. The vector part runs in steps of KP_VL;
 * with R == 8 the 8 horizontal sums are done together (a tree of hadds,
 * ~3x cheaper than 8 separate ones: for dim-64 rows they cost as much as
 * the multiply-adds); then the tail in order. Threads split rows in whole
 * groups of 8, so which rows take which path never depends on the split. */
KP_INLINE void gemv_rows(int R, const float *w, int64_t ldw, const float *x, int64_t n_in,
                         float *y) {
    kp_vf acc[KP_GEMV_ROWS];
    float s[KP_GEMV_ROWS];
    for (int r = 0; r < R; r++) acc[r] = vf_zero();
    int64_t k = 0;
    for (; k + KP_VL <= n_in; k += KP_VL) {
        kp_vf xv = vf_load(x + k);
        for (int r = 0; r < R; r++) acc[r] = vf_fma(vf_load(w + r * ldw + k), xv, acc[r]);
    }
#if defined(KP_HAVE_V8)
    if (R == 8) {
        __m256 h[8];
        for (int r = 0; r < 8; r++) h[r] = v8_fold(acc[r]);
        _mm256_storeu_ps(s, v8_hsum8(h));
    } else
#endif
        for (int r = 0; r < R; r++) s[r] = n_in >= KP_VL ? vf_hsum(acc[r]) : 0.0f;
    for (; k < n_in; k++)
        for (int r = 0; r < R; r++) s[r] += w[r * ldw + k] * x[k];
    for (int r = 0; r < R; r++) y[r] = s[r];
}

/* Rows [o0, o1) of y[t][:] for every token t: W rows stay in cache across
 * the few tokens of the GEMV path. */
static void gemv_block(float *y, const float *x, const float *w, int64_t n_in, int64_t n_out,
                       int n, int64_t o0, int64_t o1) {
    int64_t o = o0;
    for (; o + KP_GEMV_ROWS <= o1; o += KP_GEMV_ROWS)
        for (int t = 0; t < n; t++)
            gemv_rows(KP_GEMV_ROWS, w + o * n_in, n_in, x + t * n_in, n_in, y + t * n_out + o);
    for (; o < o1; o++)
        for (int t = 0; t < n; t++)
            gemv_rows(1, w + o * n_in, n_in, x + t * n_in, n_in, y + t * n_out + o);
}

#ifdef KP_HAVE_V8
/* Rows ra, rb (k .. k+3 of each) as one vector: ra in the low half. The
 * insert runs on the load ports, which spares the shuffle port. */
static inline __m256 v8_two_rows(const float *ra, const float *rb) {
    return _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(ra)), _mm_loadu_ps(rb), 1);
}

/* Transpose 8 rows x kc columns (rows r, stride ld) into dst[k][0..8)
 * (stride NR), 4 columns at a time: 8 shuffles per 32 floats. */
static void v8_pack8(float *dst, const float *r, int64_t ld, int64_t kc) {
    const float *r0 = r, *r1 = r + ld, *r2 = r + 2 * ld, *r3 = r + 3 * ld;
    const float *r4 = r + 4 * ld, *r5 = r + 5 * ld, *r6 = r + 6 * ld, *r7 = r + 7 * ld;
    for (int64_t k = 0; k < kc; k += 4, dst += 4 * KP_NR) {
        __m256 a0 = v8_two_rows(r0 + k, r4 + k), a1 = v8_two_rows(r1 + k, r5 + k);
        __m256 a2 = v8_two_rows(r2 + k, r6 + k), a3 = v8_two_rows(r3 + k, r7 + k);
        __m256 t0 = _mm256_unpacklo_ps(a0, a1), t1 = _mm256_unpackhi_ps(a0, a1);
        __m256 t2 = _mm256_unpacklo_ps(a2, a3), t3 = _mm256_unpackhi_ps(a2, a3);
        _mm256_storeu_ps(dst, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0)));
        _mm256_storeu_ps(dst + KP_NR, _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2)));
        _mm256_storeu_ps(dst + 2 * KP_NR, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0)));
        _mm256_storeu_ps(dst + 3 * KP_NR, _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2)));
    }
}
#endif

/* Pack W[o0 .. o0+np*NR)[k0 .. k0+kc) into np panels, each [kc][NR]
 * (a transpose, 8 rows x 4 columns at a time through registers where AVX2
 * is there); rows
 * past n_out are zero. */
static void gemm_pack(float *pk, const float *w, int64_t n_in, int64_t n_out, int64_t o0,
                      int np, int64_t k0, int64_t kc) {
    for (int p = 0; p < np; p++) {
        float *dst = pk + (int64_t)p * kc * KP_NR;
        for (int j0 = 0; j0 < KP_NR; j0 += 8) {
            const int64_t ob = o0 + (int64_t)p * KP_NR + j0; /* first of 8 rows */
            const int rows = (int)KP_MAX((int64_t)0, KP_MIN((int64_t)8, n_out - ob));
            int64_t k = 0;
#ifdef KP_HAVE_V8
            if (rows == 8) {
                k = kc & ~(int64_t)3;
                v8_pack8(dst + j0, w + ob * n_in + k0, n_in, k);
            }
#endif
            for (; k < kc; k++)
                for (int j = 0; j < 8; j++)
                    dst[k * KP_NR + j0 + j] = j < rows ? w[(ob + j) * n_in + k0 + k] : 0.0f;
        }
    }
}

/* The register tile: y[t][0..nr) (+)= sum_k x[t][k] * P[k][0..nr) for
 * t < mr (mr is a constant after inlining, so acc stays in registers). */
KP_INLINE void gemm_tile(int mr, int64_t kc, const float *x, int64_t ldx, const float *pk,
                         float *y, int64_t ldy, int nr, int accumulate) {
    kp_vf c0[KP_MR], c1[KP_MR];
    if (!accumulate) {
        for (int t = 0; t < mr; t++) c0[t] = c1[t] = vf_zero();
    } else if (nr == KP_NR) {
        for (int t = 0; t < mr; t++) {
            c0[t] = vf_load(y + t * ldy);
            c1[t] = vf_load(y + t * ldy + KP_VL);
        }
    } else {
        float tmp[KP_NR] = {0};
        for (int t = 0; t < mr; t++) {
            memcpy(tmp, y + t * ldy, (size_t)nr * sizeof(float));
            c0[t] = vf_load(tmp);
            c1[t] = vf_load(tmp + KP_VL);
        }
    }
    for (int64_t k = 0; k < kc; k++) {
        kp_vf b0 = vf_load(pk + k * KP_NR), b1 = vf_load(pk + k * KP_NR + KP_VL);
        for (int t = 0; t < mr; t++) {
            kp_vf a = vf_set1(x[t * ldx + k]);
            c0[t] = vf_fma(a, b0, c0[t]);
            c1[t] = vf_fma(a, b1, c1[t]);
        }
    }
    if (nr == KP_NR) {
        for (int t = 0; t < mr; t++) {
            vf_store(y + t * ldy, c0[t]);
            vf_store(y + t * ldy + KP_VL, c1[t]);
        }
    } else {
        float tmp[KP_NR];
        for (int t = 0; t < mr; t++) {
            vf_store(tmp, c0[t]);
            vf_store(tmp + KP_VL, c1[t]);
            memcpy(y + t * ldy, tmp, (size_t)nr * sizeof(float));
        }
    }
}

static void gemm_tile_any(int mr, int64_t kc, const float *x, int64_t ldx, const float *pk,
                          float *y, int64_t ldy, int nr, int accumulate) {
    switch (mr) {
    case 1: gemm_tile(1, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    case 2: gemm_tile(2, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    case 3: gemm_tile(3, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    case 4: gemm_tile(4, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    case 5: gemm_tile(5, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    default: gemm_tile(KP_MR, kc, x, ldx, pk, y, ldy, nr, accumulate); break;
    }
}

/* y[t0..t1)[panels p0..p1) = x W^T, packing KC x NC blocks of W into pk. */
static void gemm_block(float *y, const float *x, const float *w, int64_t n_in, int64_t n_out,
                       int64_t t0, int64_t t1, int64_t p0, int64_t p1, float *pk) {
    const int np_blk = KP_NC / KP_NR;
    for (int64_t pb = p0; pb < p1; pb += np_blk) {
        int np = (int)KP_MIN((int64_t)np_blk, p1 - pb);
        for (int64_t k0 = 0; k0 < n_in; k0 += KP_KC) {
            int64_t kc = KP_MIN((int64_t)KP_KC, n_in - k0);
            gemm_pack(pk, w, n_in, n_out, pb * KP_NR, np, k0, kc);
            for (int64_t t = t0; t < t1; t += KP_MR) {
                int mr = (int)KP_MIN((int64_t)KP_MR, t1 - t);
                for (int p = 0; p < np; p++) {
                    int64_t o = (pb + p) * KP_NR;
                    int nr = (int)KP_MIN((int64_t)KP_NR, n_out - o);
                    gemm_tile_any(mr, kc, x + t * n_in + k0, n_in, pk + (int64_t)p * kc * KP_NR,
                                  y + t * n_out + o, n_out, nr, k0 > 0);
                }
            }
        }
    }
}

typedef struct {
    kp_backend *be;
    float *y;
    const float *x;
    const float *w;
    int64_t n_in, n_out;
    int n;
} matmul_f32_args;

static void gemv_worker(void *arg_, int ith, int nth) {
    matmul_f32_args *a = arg_;
    /* Split rows in groups of KP_GEMV_ROWS so threads do whole groups. */
    int64_t groups = (a->n_out + KP_GEMV_ROWS - 1) / KP_GEMV_ROWS, lo, hi;
    kp_pool_range(groups, ith, nth, &lo, &hi);
    gemv_block(a->y, a->x, a->w, a->n_in, a->n_out, a->n, lo * KP_GEMV_ROWS,
               KP_MIN(hi * KP_GEMV_ROWS, a->n_out));
}

static void gemm_worker(void *arg_, int ith, int nth) {
    matmul_f32_args *a = arg_;
    int64_t n_panels = (a->n_out + KP_NR - 1) / KP_NR;
    int64_t t0 = 0, t1 = a->n, p0, p1;
    if (n_panels >= nth) {
        kp_pool_range(n_panels, ith, nth, &p0, &p1); /* each thread: some panels, all tokens */
    } else {
        /* Few panels: thread ith takes panel ith % n_panels and a share of
         * the tokens (in whole tiles). */
        int n_split = nth / (int)n_panels;
        int split = ith / (int)n_panels;
        if (split >= n_split) return;
        p0 = ith % n_panels;
        p1 = p0 + 1;
        int64_t tiles = (a->n + KP_MR - 1) / KP_MR, lo, hi;
        kp_pool_range(tiles, split, n_split, &lo, &hi);
        t0 = lo * KP_MR;
        t1 = KP_MIN(hi * KP_MR, (int64_t)a->n);
    }
    if (p0 >= p1 || t0 >= t1) return;
    gemm_block(a->y, a->x, a->w, a->n_in, a->n_out, t0, t1, p0, p1,
               cpu_thread_buf(a->be, ith));
}

static void matmul_f32(kp_backend *be, float *y, const float *x, const kp_wref *w, int n) {
    matmul_f32_args a = {be, y, x, (const float *)w->data, w->n_in, w->n_out, n};
    int64_t work = (int64_t)n * w->n_in * w->n_out;
    if (n <= KP_GEMV_MAX_N) {
        cpu_run(be, gemv_worker, &a, work);
    } else {
        cpu_reserve_threads(be, (size_t)KP_KC * KP_NC * sizeof(float));
        cpu_run(be, gemm_worker, &a, work);
    }
}

/* ---------------------------------------------------------------------- */
/* matmul, quantised / half-precision weights                             */
/* ---------------------------------------------------------------------- */

typedef struct {
    float *y;
    const float *x;
    const kp_wref *w;
    int n;
    int vdt;        /* kp_vec_dot_type(w->type) */
    char *xq;       /* [n][xq_rb] converted activations */
    size_t xq_rb;   /* bytes per converted row */
    size_t w_rb;    /* bytes per weight row */
} matmul_q_args;

static void quant_act_worker(void *arg_, int ith, int nth) {
    matmul_q_args *a = arg_;
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++)
        kp_quant_row_act(a->vdt, a->x + t * a->w->n_in, a->xq + (size_t)t * a->xq_rb, a->w->n_in);
}

static void matmul_q_worker(void *arg_, int ith, int nth) {
    matmul_q_args *a = arg_;
    const kp_wref *w = a->w;
    const int64_t n_out = w->n_out;
    /* Blocks of 16 rows: the weights stay in L1 across all tokens. Within a
     * block, tiles of 4 weight rows x NX tokens (kp_vec_dot_tile: Q8_0 and
     * Q4_0 with VNNI, every block loaded once per tile), else each weight
     * row with NX tokens at once (kp_vec_dot_nx: its blocks are loaded and
     * unpacked once for all of them; bit for bit kp_vec_dot's). */
    const int64_t BR = 16;
    const int NX = 4; /* tokens per kp_vec_dot_nx call: 4 rows of activations stay in L1 too */
    int64_t blocks = (n_out + BR - 1) / BR, lo, hi;
    kp_pool_range(blocks, ith, nth, &lo, &hi);
    for (int64_t b = lo; b < hi; b++) {
        int64_t o0 = b * BR, o1 = KP_MIN(o0 + BR, n_out);
        for (int t = 0; t < a->n; t += NX) {
            const int nx = KP_MIN(NX, a->n - t);
            const char *xq = a->xq + (size_t)t * a->xq_rb;
            float *yt = a->y + (int64_t)t * n_out;
            for (int64_t o = o0; o < o1;) { /* tiles of 4 weight rows where the CPU has them */
                const char *wr = (const char *)w->data + (size_t)o * a->w_rb;
                const int nw = (int)KP_MIN(4, o1 - o);
                if (kp_vec_dot_tile(w->type, w->n_in, wr, a->w_rb, nw, xq, a->xq_rb, nx, yt + o, (size_t)n_out)) {
                    o += nw;
                    continue;
                }
                kp_vec_dot_nx(w->type, w->n_in, wr, xq, a->xq_rb, nx, yt + o, (size_t)n_out);
                o++;
            }
        }
    }
}

static void matmul_quant(kp_backend *be, float *y, const float *x, const kp_wref *w, int n) {
    matmul_q_args a = {y, x, w, n, kp_vec_dot_type(w->type), NULL, 0,
                       kp_type_row_bytes(w->type, w->n_in)};
    a.xq_rb = a.vdt >= 0 ? kp_type_row_bytes(a.vdt, w->n_in) : 0;
    if (a.xq_rb == 0 || a.w_rb == 0)
        cpu_fatal("matmul: unsupported weight type or row length not a multiple of its block");
    a.xq = cpu_reserve_shared(be, a.xq_rb * (size_t)n);
    cpu_run(be, quant_act_worker, &a, (int64_t)n * w->n_in * 8 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
    cpu_run(be, matmul_q_worker, &a, (int64_t)n * w->n_in * w->n_out);
}

static void cpu_matmul(kp_backend *be, float *y, const float *x, const kp_wref *w, int n) {
    if (n <= 0 || w->n_out <= 0) return;
    if (w->type == KP_TYPE_F32)
        matmul_f32(be, y, x, w, n);
    else
        matmul_quant(be, y, x, w, n);
}

/* ---------------------------------------------------------------------- */
/* Elementwise: add_bias, add, swiglu, gelu                               */
/* ---------------------------------------------------------------------- */

typedef struct {
    float *y;
    const float *a, *b;
    int64_t n; /* elements (or rows for add_bias) */
    int64_t d;
} elem_args;

static void add_bias_worker(void *arg_, int ith, int nth) {
    elem_args *e = arg_;
    int64_t lo, hi;
    kp_pool_range(e->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        float *y = e->y + t * e->d;
        for (int64_t i = 0; i < e->d; i++) y[i] += e->b[i];
    }
}

static void cpu_add_bias(kp_backend *be, float *y, const float *b, int n, int d) {
    elem_args e = {y, NULL, b, n, d};
    int64_t elems = (int64_t)n * d;
    cpu_run(be, add_bias_worker, &e, elems >= KP_PAR_MIN_ELEMS ? elems : 0);
}

static void add_worker(void *arg_, int ith, int nth) {
    elem_args *e = arg_;
    int64_t lo, hi;
    kp_pool_range(e->n, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) e->y[i] += e->a[i];
}

static void cpu_add(kp_backend *be, float *y, const float *x, int64_t n) {
    elem_args e = {y, x, NULL, n, 0};
    cpu_run(be, add_worker, &e, n >= KP_PAR_MIN_ELEMS ? n : 0);
}

/* ggml_silu_f32 */
static inline float cpu_silu(float x) { return x / (1.0f + expf(-x)); }

#ifdef KP_HAVE_V8
/* silu(g) * u for 8 lanes: g / (1 + exp(-g)) * u */
static inline __m256 v8_swiglu(__m256 g, __m256 u) {
    __m256 e = v8_exp(_mm256_sub_ps(_mm256_setzero_ps(), g));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), u);
}
#endif

/* Elements are split between threads in whole groups of 8 and the last
 * partial group goes through the same vector code (padded), so every
 * element is computed the same way whatever the thread count. */
static void swiglu_worker(void *arg_, int ith, int nth) {
    elem_args *e = arg_;
    int64_t lo, hi;
    kp_pool_range((e->n + 7) / 8, ith, nth, &lo, &hi);
    lo *= 8;
    hi = KP_MIN(hi * 8, e->n);
#ifdef KP_HAVE_V8
    int64_t i = lo;
    for (; i + 8 <= hi; i += 8)
        _mm256_storeu_ps(e->y + i, v8_swiglu(_mm256_loadu_ps(e->a + i), _mm256_loadu_ps(e->b + i)));
    if (i < hi) {
        float g[8] = {0}, u[8] = {0}, y[8];
        memcpy(g, e->a + i, (size_t)(hi - i) * sizeof(float));
        memcpy(u, e->b + i, (size_t)(hi - i) * sizeof(float));
        _mm256_storeu_ps(y, v8_swiglu(_mm256_loadu_ps(g), _mm256_loadu_ps(u)));
        memcpy(e->y + i, y, (size_t)(hi - i) * sizeof(float));
    }
#else
    for (int64_t i = lo; i < hi; i++) e->y[i] = cpu_silu(e->a[i]) * e->b[i];
#endif
}

static void cpu_swiglu(kp_backend *be, float *out, const float *gate, const float *up, int n,
                       int d) {
    int64_t elems = (int64_t)n * d;
    elem_args e = {out, gate, up, elems, 0};
    /* expf makes each element ~20x a multiply-add: parallel sooner. */
    cpu_run(be, swiglu_worker, &e, elems * 16 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
}

/* ggml computes GELU through a 64K-entry fp16 table: the input is rounded
 * to fp16, the tanh-approximation evaluated in float and the result
 * rounded to fp16 (ggml_vec_gelu_f32 with GGML_GELU_FP16); inputs outside
 * (-10, 10) give 0 or x. Reproduced here without the table. */
static inline float cpu_gelu_f32(float x) {
    const float GELU_COEF_A = 0.044715f;
    const float SQRT_2_OVER_PI = 0.79788456080286535587989211986876f;
    return 0.5f * x * (1.0f + tanhf(SQRT_2_OVER_PI * x * (1.0f + GELU_COEF_A * x * x)));
}

static inline float cpu_gelu(float x) {
    if (x <= -10.0f) return 0.0f;
    if (x >= 10.0f) return x;
    float xh = kp_fp16_to_f32(kp_f32_to_fp16(x));
    return kp_fp16_to_f32(kp_f32_to_fp16(cpu_gelu_f32(xh)));
}

static void gelu_worker(void *arg_, int ith, int nth) {
    elem_args *e = arg_;
    int64_t lo, hi;
    kp_pool_range(e->n, ith, nth, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) e->y[i] = cpu_gelu(e->y[i]);
}

static void cpu_gelu_op(kp_backend *be, float *x, int64_t n) {
    elem_args e = {x, NULL, NULL, n, 0};
    cpu_run(be, gelu_worker, &e, n * 16 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
}

/* ---------------------------------------------------------------------- */
/* Norms                                                                  */
/* ---------------------------------------------------------------------- */

typedef struct {
    float *y;
    const float *x, *w, *b;
    int n, d;
    float eps;
} norm_args;

/* As ggml_compute_forward_rms_norm_f32 followed by ggml_mul:
 * sum of float squares in double, mean as float, scale = 1/sqrtf(mean+eps). */
static void rmsnorm_worker(void *arg_, int ith, int nth) {
    norm_args *a = arg_;
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const float *x = a->x + t * a->d;
        float *y = a->y + t * a->d;
        double sum = 0.0;
        for (int i = 0; i < a->d; i++) sum += (double)(x[i] * x[i]);
        const float mean = (float)(sum / a->d);
        const float scale = 1.0f / sqrtf(mean + a->eps);
        if (a->w)
            for (int i = 0; i < a->d; i++) y[i] = (x[i] * scale) * a->w[i];
        else
            for (int i = 0; i < a->d; i++) y[i] = x[i] * scale;
    }
}

static void cpu_rmsnorm(kp_backend *be, float *y, const float *x, const float *w, int n, int d,
                        float eps) {
    norm_args a = {y, x, w, NULL, n, d, eps};
    int64_t elems = (int64_t)n * d;
    cpu_run(be, rmsnorm_worker, &a, elems * 4 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
}

/* As ggml_compute_forward_norm_f32 (then ggml_mul, ggml_add): mean and
 * variance summed in double, scale = 1/sqrtf(var+eps). */
static void layernorm_worker(void *arg_, int ith, int nth) {
    norm_args *a = arg_;
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        const float *x = a->x + t * a->d;
        float *y = a->y + t * a->d;
        double sum = 0.0;
        for (int i = 0; i < a->d; i++) sum += (double)x[i];
        const float mean = (float)(sum / a->d);
        double sum2 = 0.0;
        for (int i = 0; i < a->d; i++) {
            float v = x[i] - mean;
            y[i] = v;
            sum2 += (double)(v * v);
        }
        const float variance = (float)(sum2 / a->d);
        const float scale = 1.0f / sqrtf(variance + a->eps);
        for (int i = 0; i < a->d; i++) {
            float v = y[i] * scale;
            if (a->w) v = v * a->w[i];
            if (a->b) v = v + a->b[i];
            y[i] = v;
        }
    }
}

static void cpu_layernorm(kp_backend *be, float *y, const float *x, const float *w,
                          const float *b, int n, int d, float eps) {
    norm_args a = {y, x, w, b, n, d, eps};
    int64_t elems = (int64_t)n * d;
    cpu_run(be, layernorm_worker, &a, elems * 4 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
}

/* ---------------------------------------------------------------------- */
/* RoPE                                                                   */
/* ---------------------------------------------------------------------- */

typedef struct {
    float *x;
    const int32_t *pos;
    int n, n_heads, head_dim, n_rot;
    float base, freq_scale;
    int mode;
} rope_args;

/* As ggml_rope (ext_factor 0, attn_factor 1): theta_base starts at pos and
 * is multiplied by theta_scale = base^(-2/n_rot) once per pair; the angle
 * is freq_scale * theta_base; cosf/sinf in float. */
static void rope_worker(void *arg_, int ith, int nth) {
    rope_args *a = arg_;
    enum { CHUNK = 64 };
    float cs[CHUNK], sn[CHUNK];
    const int half = a->n_rot / 2;
    const float theta_scale = powf(a->base, -2.0f / (float)a->n_rot);
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    for (int64_t t = lo; t < hi; t++) {
        float theta_base = (float)a->pos[t];
        float *xt = a->x + t * (int64_t)a->n_heads * a->head_dim;
        for (int i0 = 0; i0 < half; i0 += CHUNK) {
            int m = KP_MIN(CHUNK, half - i0);
            for (int i = 0; i < m; i++) {
                float theta = a->freq_scale * theta_base;
                cs[i] = cosf(theta);
                sn[i] = sinf(theta);
                theta_base *= theta_scale;
            }
            for (int h = 0; h < a->n_heads; h++) {
                float *xh = xt + (int64_t)h * a->head_dim;
                for (int i = 0; i < m; i++) {
                    int p = i0 + i;
                    int j0 = a->mode == KP_ROPE_NEOX ? p : 2 * p;
                    int j1 = a->mode == KP_ROPE_NEOX ? p + half : 2 * p + 1;
                    float x0 = xh[j0], x1 = xh[j1];
                    xh[j0] = x0 * cs[i] - x1 * sn[i];
                    xh[j1] = x0 * sn[i] + x1 * cs[i];
                }
            }
        }
    }
}

static void cpu_rope(kp_backend *be, float *x, const int32_t *pos, int n, int n_heads,
                     int head_dim, int n_rot, float base, float freq_scale, int mode) {
    if (n <= 0 || n_rot <= 0) return;
    rope_args a = {x, pos, n, n_heads, head_dim, KP_MIN(n_rot, head_dim), base, freq_scale, mode};
    /* per token: n_rot/2 cosf+sinf (~40 units each) + rotations */
    int64_t work = (int64_t)n * (a.n_rot / 2) * (40 + 4 * n_heads);
    cpu_run(be, rope_worker, &a, work);
}

/* ---------------------------------------------------------------------- */
/* KV cache: store and attention                                          */
/* ---------------------------------------------------------------------- */

typedef struct {
    void *dst;
    int kv_type;
    const float *src;
    int64_t n; /* elements */
} kv_store_args;

static void kv_store_worker(void *arg_, int ith, int nth) {
    kv_store_args *a = arg_;
    int64_t lo, hi;
    kp_pool_range(a->n, ith, nth, &lo, &hi);
    if (a->kv_type == KP_TYPE_F32) {
        memcpy((float *)a->dst + lo, a->src + lo, (size_t)(hi - lo) * sizeof(float));
    } else if (a->kv_type == KP_TYPE_F16) {
        uint16_t *d = a->dst;
        for (int64_t i = lo; i < hi; i++) d[i] = kp_f32_to_fp16(a->src[i]);
    } else {
        uint16_t *d = a->dst;
        for (int64_t i = lo; i < hi; i++) d[i] = kp_f32_to_bf16(a->src[i]);
    }
}

static void cpu_kv_store(kp_backend *be, void *dst, int kv_type, const float *src, int n, int d) {
    if (kv_type != KP_TYPE_F32 && kv_type != KP_TYPE_F16 && kv_type != KP_TYPE_BF16)
        cpu_fatal("kv_store: KV cache type must be f32, f16 or bf16");
    kv_store_args a = {dst, kv_type, src, (int64_t)n * d};
    cpu_run(be, kv_store_worker, &a, a.n * 4 >= KP_PAR_MIN_ELEMS ? KP_PAR_MIN_WORK : 0);
}

/* Row `idx` (in head_dim units) of a KV cache as f32: a pointer into the
 * cache for F32, else converted into buf (exactly). */
static inline const float *kv_row(int kv_type, const void *base, int64_t idx, int hd, float *buf) {
    if (kv_type == KP_TYPE_F32) return (const float *)base + idx * hd;
    const uint16_t *src = (const uint16_t *)base + idx * hd;
    for (int i = 0; i < hd; i++)
        buf[i] = kv_type == KP_TYPE_F16 ? kp_fp16_to_f32(src[i]) : kp_bf16_to_f32(src[i]);
    return buf;
}

typedef struct {
    kp_backend *be;
    float *out;
    const float *q;
    const void *k, *v;
    int kv_type, n_q, pos0, n_head, n_kv, head_dim;
    float scale;
} attn_args;

/* Portable path (any head_dim, no AVX2): per key a dot product, then
 * softmax with libm expf, then the weighted sum of V rows. */
static void attn_head_scalar(const attn_args *a, const float *q, float *out, int kh, int n_keys,
                             float *s, float *kbuf, float *vbuf) {
    const int hd = a->head_dim;
    float mx = -INFINITY;
    for (int j = 0; j < n_keys; j++) {
        const float *kr = kv_row(a->kv_type, a->k, (int64_t)j * a->n_kv + kh, hd, kbuf);
        s[j] = cpu_dot(q, kr, hd) * a->scale;
        if (s[j] > mx) mx = s[j];
    }
    double sum = 0.0;
    for (int j = 0; j < n_keys; j++) {
        float e = expf(s[j] - mx);
        s[j] = e;
        sum += (double)e;
    }
    const float inv = (float)(1.0 / sum);
    float *acc = kbuf; /* kbuf is free again: accumulate locally, write once */
    for (int d = 0; d < hd; d++) acc[d] = 0.0f;
    for (int j = 0; j < n_keys; j++) {
        const float *vr = kv_row(a->kv_type, a->v, (int64_t)j * a->n_kv + kh, hd, vbuf);
        cpu_axpy(acc, s[j] * inv, vr, hd);
    }
    memcpy(out, acc, (size_t)hd * sizeof(float));
}

#ifdef KP_HAVE_V8
/* out[0 .. 8*nc) = sum_j p[j] * V_j[r .. r + 8*nc), keys in order (nc and
 * kv_type constants after inlining). */
KP_INLINE void attn_v_chunks(int kv_type, int nc, const void *v, int64_t r, int64_t row_stride,
                             const float *p, int n_keys, float *out) {
    __m256 acc[8];
    for (int c = 0; c < nc; c++) acc[c] = _mm256_setzero_ps();
    for (int j = 0; j < n_keys; j++, r += row_stride) {
        const __m256 pj = _mm256_set1_ps(p[j]);
        for (int c = 0; c < nc; c++) acc[c] = _mm256_fmadd_ps(pj, v8_load_kv(kv_type, v, r + 8 * c), acc[c]);
    }
    for (int c = 0; c < nc; c++) _mm256_storeu_ps(out + 8 * c, acc[c]);
}
#endif

#ifdef KP_HAVE_V8
/* AVX2 path for head_dim a multiple of 8 (kv_type constant after inlining).
 *   scores: 8 keys at a time, each dot accumulated in one 8-lane vector,
 *           the 8 vectors reduced together by a tree of hadds;
 *   softmax: vector max, v8_exp, double sum;
 *   output: head_dim >= 32: one accumulator per 8-lane chunk, keys in
 *           order; shorter heads: 4 accumulators over interleaved keys
 *           (hides FMA latency). */
KP_INLINE void attn_head_v8(int kv_type, const attn_args *a, const float *q, float *out, int kh,
                            int n_keys, float *s) {
    const int hd = a->head_dim;
    const int64_t row_stride = (int64_t)a->n_kv * hd; /* elements between keys */
    const int64_t base = (int64_t)kh * hd;
    const __m256 vscale = _mm256_set1_ps(a->scale);

    int j = 0;
    for (; j + 8 <= n_keys; j += 8) {
        /* chunk outer, key inner: 8 independent FMA chains */
        __m256 p[8];
        const int64_t r = base + (int64_t)j * row_stride;
        __m256 qc = _mm256_loadu_ps(q);
        for (int u = 0; u < 8; u++) p[u] = _mm256_mul_ps(qc, v8_load_kv(kv_type, a->k, r + u * row_stride));
        for (int c = 8; c < hd; c += 8) {
            qc = _mm256_loadu_ps(q + c);
            for (int u = 0; u < 8; u++)
                p[u] = _mm256_fmadd_ps(qc, v8_load_kv(kv_type, a->k, r + u * row_stride + c), p[u]);
        }
        _mm256_storeu_ps(s + j, _mm256_mul_ps(v8_hsum8(p), vscale));
    }
    for (; j < n_keys; j++) {
        const int64_t r = base + (int64_t)j * row_stride;
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(q), v8_load_kv(kv_type, a->k, r));
        for (int c = 8; c < hd; c += 8)
            p = _mm256_fmadd_ps(_mm256_loadu_ps(q + c), v8_load_kv(kv_type, a->k, r + c), p);
        s[j] = v8_hsum(p) * a->scale;
    }
    /* pad to a whole vector with -inf: exp gives 0 there */
    const int n_pad = (n_keys + 7) & ~7;
    for (int jj = n_keys; jj < n_pad; jj++) s[jj] = -INFINITY;

    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (j = 0; j < n_pad; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(s + j));
    const __m256 mx = _mm256_set1_ps(v8_hmax(vmax));
    __m256d sum0 = _mm256_setzero_pd(), sum1 = _mm256_setzero_pd();
    for (j = 0; j < n_pad; j += 8) {
        __m256 e = v8_exp(_mm256_sub_ps(_mm256_loadu_ps(s + j), mx));
        _mm256_storeu_ps(s + j, e);
        sum0 = _mm256_add_pd(sum0, _mm256_cvtps_pd(_mm256_castps256_ps128(e)));
        sum1 = _mm256_add_pd(sum1, _mm256_cvtps_pd(_mm256_extractf128_ps(e, 1)));
    }
    double sd[4];
    _mm256_storeu_pd(sd, _mm256_add_pd(sum0, sum1));
    const __m256 inv = _mm256_set1_ps((float)(1.0 / ((sd[0] + sd[1]) + (sd[2] + sd[3]))));
    for (j = 0; j < n_pad; j += 8) _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(s + j), inv));

    if (hd >= 32) {
        /* keys outer, up to 8 chunks of head_dim inner: 4..8 independent
         * accumulators and one pass over V per 64 dims */
        for (int c0 = 0; c0 < hd; c0 += 64) {
            const int nc = KP_MIN(8, (hd - c0) / 8);
            float *o = out + c0;
            const int64_t r = base + c0;
            if (nc == 8) /* constant chunk counts keep acc[] in registers */
                attn_v_chunks(kv_type, 8, a->v, r, row_stride, s, n_keys, o);
            else if (nc == 4)
                attn_v_chunks(kv_type, 4, a->v, r, row_stride, s, n_keys, o);
            else
                for (int c = 0; c < nc; c++)
                    attn_v_chunks(kv_type, 1, a->v, r + 8 * c, row_stride, s, n_keys, o + 8 * c);
        }
    } else {
        /* short heads: per 8-dim chunk, 4 accumulators over interleaved keys */
        for (int c = 0; c < hd; c += 8) {
            __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                             _mm256_setzero_ps()};
            int64_t r = base + c;
            for (j = 0; j + 4 <= n_keys; j += 4, r += 4 * row_stride)
                for (int u = 0; u < 4; u++)
                    acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(s[j + u]),
                                             v8_load_kv(kv_type, a->v, r + u * row_stride), acc[u]);
            for (int u = 0; j < n_keys; j++, u++, r += row_stride)
                acc[u] = _mm256_fmadd_ps(_mm256_set1_ps(s[j]), v8_load_kv(kv_type, a->v, r), acc[u]);
            _mm256_storeu_ps(out + c, _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]),
                                                    _mm256_add_ps(acc[2], acc[3])));
        }
    }
}
#endif

/* One (query i, head h) pair: scores s_j = (q . k_j) * scale for
 * j <= pos0 + i, softmax with max subtraction and a double sum (as
 * ggml_soft_max_ext), then out = sum_j p_j v_j. */
static void attn_one(const attn_args *a, int64_t item, float *s, float *kbuf, float *vbuf) {
    const int i = (int)(item / a->n_head), h = (int)(item % a->n_head);
    const int kh = h / (a->n_head / a->n_kv);
    const int n_keys = a->pos0 + i + 1;
    const float *q = a->q + item * a->head_dim;
    float *out = a->out + item * a->head_dim;
#ifdef KP_HAVE_V8
    if (a->head_dim % 8 == 0) {
        switch (a->kv_type) {
        case KP_TYPE_F32: attn_head_v8(KP_TYPE_F32, a, q, out, kh, n_keys, s); return;
        case KP_TYPE_F16: attn_head_v8(KP_TYPE_F16, a, q, out, kh, n_keys, s); return;
        default: attn_head_v8(KP_TYPE_BF16, a, q, out, kh, n_keys, s); return;
        }
    }
#endif
    attn_head_scalar(a, q, out, kh, n_keys, s, kbuf, vbuf);
}

/* Work split: with many queries (prefill), thread ith takes queries ith,
 * ith+nth, ... (all heads of each, head by head), which evens out the
 * causal triangle and keeps each thread's output rows apart; with few
 * (decode), the (query, head) pairs are cut into contiguous ranges. */
static void attn_worker(void *arg_, int ith, int nth) {
    attn_args *a = arg_;
    float *s = cpu_thread_buf(a->be, ith); /* [pos0 + n_q, padded] scores, then 2 rows */
    float *kbuf = s + (((int64_t)a->pos0 + a->n_q + 15) & ~(int64_t)15);
    float *vbuf = kbuf + ((a->head_dim + 15) & ~15);
    if (a->n_q >= 4 * nth) {
        /* heads outer: one KV head's rows stay in L1/L2 across the queries */
        for (int h = 0; h < a->n_head; h++)
            for (int64_t i = ith; i < a->n_q; i += nth) attn_one(a, i * a->n_head + h, s, kbuf, vbuf);
    } else {
        int64_t lo, hi;
        kp_pool_range((int64_t)a->n_q * a->n_head, ith, nth, &lo, &hi);
        for (int64_t item = lo; item < hi; item++) attn_one(a, item, s, kbuf, vbuf);
    }
}

static void cpu_attention(kp_backend *be, float *out, const float *q, const void *k,
                          const void *v, int kv_type, int n_q, int pos0, int n_head, int n_kv,
                          int head_dim, float scale) {
    if (n_q <= 0) return;
    if (n_kv <= 0 || n_head % n_kv != 0)
        cpu_fatal("attention: n_head must be a multiple of n_kv");
    if (kv_type != KP_TYPE_F32 && kv_type != KP_TYPE_F16 && kv_type != KP_TYPE_BF16)
        cpu_fatal("attention: KV cache type must be f32, f16 or bf16");
    size_t floats = (((size_t)pos0 + n_q + 15) & ~(size_t)15) + 2 * (((size_t)head_dim + 15) & ~(size_t)15);
    cpu_reserve_threads(be, floats * sizeof(float));
    attn_args a = {be, out, q, k, v, kv_type, n_q, pos0, n_head, n_kv, head_dim, scale};
    /* keys visited: n_head * sum_i (pos0 + i + 1), each ~4 * head_dim flops */
    int64_t work = (int64_t)n_head * n_q * ((int64_t)pos0 + (n_q + 1) / 2) * (4 * head_dim);
    cpu_run(be, attn_worker, &a, work);
}

/* ---------------------------------------------------------------------- */

const kp_ops kp_cpu_ops = {
    .name = "cpu",
    .alloc = cpu_alloc,
    .free = cpu_free,
    .upload = cpu_memcpy,
    .download = cpu_memcpy,
    .copy = cpu_memcpy,
    .sync = cpu_sync,
    .get_rows = cpu_get_rows,
    .matmul = cpu_matmul,
    .add_bias = cpu_add_bias,
    .add = cpu_add,
    .rmsnorm = cpu_rmsnorm,
    .layernorm = cpu_layernorm,
    .rope = cpu_rope,
    .swiglu = cpu_swiglu,
    .gelu = cpu_gelu_op,
    .kv_store = cpu_kv_store,
    .attention = cpu_attention,
};
