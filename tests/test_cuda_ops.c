/*
 * test_cuda_ops.c — every op of the CUDA backend (kernels/cuda) against its
 * CPU twin (kernels/cpu/ops.c) on the same random inputs.
 *
 * Each case uploads the inputs, poisons the device output with NaN, runs
 * the CUDA op, downloads, and compares with the CPU op's output within a
 * bound set by the precision of the op (exact for get_rows and kv_store,
 * float rounding for norms and elementwise ops, half-precision rounding for
 * F16/BF16/quantised matmuls, plus the CPU's own q8 activation rounding for
 * quantised weights). NaN never passes.
 *
 * Without a CUDA device (or in a build without CUDA) the op tests print
 * "SKIP: ..." and skip; test_no_device checks what kp_backend_new("cuda")
 * says in that case, and runs everywhere.
 */
#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"

#include "kernels/kernels.h"
#include "kernels/cpu/quant.h"
#ifdef KP_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

/* Whether a libcublas is mapped into this process (/proc/self/maps), and
 * whether it was before any backend existed (set first thing in main). */
static bool cublas_mapped(void) {
    FILE *m = fopen("/proc/self/maps", "r");
    assert_non_null(m);
    char line[4096];
    bool found = false;
    while (!found && fgets(line, sizeof line, m)) found = strstr(line, "/libcublas") != NULL;
    fclose(m);
    return found;
}
static bool cublas_at_start;

typedef struct {
    kp_backend *cpu, *gpu; /* gpu NULL when there is no device */
    const kp_ops *co, *go;
    uint64_t rng;
} fixture;

static int setup(void **state) {
    fixture *f = calloc(1, sizeof *f);
    kp_err err = {0};
    if (!f) return -1;
    if (kp_backend_new(&f->cpu, "cpu", 1, &err)) {
        fprintf(stderr, "cpu backend: %s\n", err.msg);
        return -1;
    }
    f->co = kp_backend_ops(f->cpu);
    if (kp_cuda_available()) {
        if (kp_backend_new(&f->gpu, "cuda", 0, &err)) {
            fprintf(stderr, "cuda backend: %s\n", err.msg);
            return -1;
        }
        f->go = kp_backend_ops(f->gpu);
    }
    f->rng = 0x9e3779b97f4a7c15ull;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    kp_backend_free(f->gpu);
    kp_backend_free(f->cpu);
    free(f);
    return 0;
}

#ifdef KP_HAVE_CUDA
#define REQUIRE_GPU(f)                                                    \
    do {                                                                  \
        if (!(f)->gpu) {                                                  \
            print_message("SKIP: no CUDA device\n");                      \
            skip();                                                       \
        }                                                                 \
    } while (0)
#else
#define REQUIRE_GPU(f)                                                              \
    do {                                                                            \
        (void)(f);                                                                  \
        print_message("SKIP: built without CUDA (-Dcuda=disabled or no nvcc)\n");   \
        skip();                                                                     \
    } while (0)
#endif

/* ---------------------------------------------------------------------- */
/* Helpers                                                                */
/* ---------------------------------------------------------------------- */

static void *xmalloc(size_t bytes) {
    void *p = malloc(bytes ? bytes : 1);
    assert_non_null(p);
    return p;
}

static float *rand_vec(fixture *f, size_t n, float scale) {
    float *x = xmalloc(n * sizeof(float));
    tu_rand_floats(x, n, scale, &f->rng);
    return x;
}

/* A device copy of `bytes` bytes of host memory. */
static void *dev_from(fixture *f, const void *src, size_t bytes) {
    void *d = f->go->alloc(f->gpu, bytes);
    assert_non_null(d);
    assert_int_equal(f->go->upload(f->gpu, d, src, bytes), 0);
    return d;
}

/* A device buffer of n floats, all NaN. */
static float *dev_nan(fixture *f, size_t n) {
    float *h = xmalloc(n * sizeof(float));
    for (size_t i = 0; i < n; i++) h[i] = NAN;
    float *d = dev_from(f, h, n * sizeof(float));
    free(h);
    return d;
}

/* n floats back from the device (waits for queued ops). */
static float *dev_get(fixture *f, const void *d, size_t n) {
    float *h = xmalloc(n * sizeof(float));
    f->go->sync(f->gpu);
    assert_int_equal(f->go->download(f->gpu, h, d, n * sizeof(float)), 0);
    return h;
}

/* Fail unless every got[i] is a number within atol (or atol_v[i]) +
 * rtol*|want[i]| of want[i]. */
static void check_close_v(const char *what, const float *got, const float *want,
                          const double *atol_v, double atol, double rtol, size_t n) {
    for (size_t i = 0; i < n; i++) {
        double tol = (atol_v ? atol_v[i] : atol) + rtol * fabs((double)want[i]);
        double d = fabs((double)got[i] - (double)want[i]);
        if (isnan(got[i]) || isnan(want[i]) || !(d <= tol)) {
            print_message("%s: element %zu: cuda %.9g, cpu %.9g (|diff| %.3g > tol %.3g)\n", what,
                          i, (double)got[i], (double)want[i], d, tol);
            fail();
        }
    }
}

static void check_close(const char *what, const float *got, const float *want, double atol,
                        double rtol, size_t n) {
    check_close_v(what, got, want, NULL, atol, rtol, n);
}

static void check_bits(const char *what, const void *got, const void *want, size_t bytes) {
    if (memcmp(got, want, bytes) != 0) {
        const unsigned char *a = got, *b = want;
        size_t i = 0;
        while (a[i] == b[i]) i++;
        print_message("%s: first differing byte %zu: cuda %02x, cpu %02x\n", what, i, a[i], b[i]);
        fail();
    }
}

/* Random weights [n_rows][n_in] of `type` (host memory) and their
 * dequantised values in *deq. */
static void *make_weights(fixture *f, int type, int64_t n_in, int64_t n_rows, float **deq) {
    size_t rb = kp_type_row_bytes(type, n_in);
    assert_true(rb > 0);
    float *src = rand_vec(f, (size_t)(n_in * n_rows), 1.0f);
    char *w = xmalloc(rb * (size_t)n_rows);
    *deq = xmalloc((size_t)(n_in * n_rows) * sizeof(float));
    for (int64_t r = 0; r < n_rows; r++) {
        assert_int_equal(kp_quant_row(type, src + r * n_in, w + r * rb, n_in), 0);
        assert_int_equal(kp_dequant_row(type, w + r * rb, *deq + r * n_in, n_in), 0);
    }
    free(src);
    return w;
}

static const int all_types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16, KP_TYPE_Q8_0,
                                KP_TYPE_Q4_0, KP_TYPE_Q4_K, KP_TYPE_Q6_K};

/* ---------------------------------------------------------------------- */
/* Backend creation                                                       */
/* ---------------------------------------------------------------------- */

static void test_no_device(void **state) {
    fixture *f = *state;
    kp_err err = {0};
    kp_backend *be = NULL;
    int rc = kp_backend_new(&be, "cuda", 0, &err);
    if (kp_cuda_available()) {
        assert_int_equal(rc, 0);
        assert_string_equal(kp_backend_ops(be)->name, "cuda");
        kp_backend_free(be);
        return;
    }
    assert_int_equal(rc, KP_EUNSUP);
    assert_null(be);
#ifdef KP_HAVE_CUDA
    assert_non_null(strstr(err.msg, "no CUDA device"));
    assert_non_null(strstr(err.msg, "--device cpu"));
#else
    assert_non_null(strstr(err.msg, "-Dcuda=enabled"));
#endif
    assert_null(f->gpu);
}

/* ---------------------------------------------------------------------- */
/* get_rows, matmul                                                       */
/* ---------------------------------------------------------------------- */

static void test_get_rows(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    const int64_t n_in = 512, n_rows = 37;
    const int n = 9;
    int32_t ids[9];
    for (int t = 0; t < n; t++) ids[t] = (int32_t)((t * 7919 + 3) % n_rows);
    ids[n - 1] = ids[0]; /* a repeated id */
    for (size_t ti = 0; ti < KP_ARRAY_LEN(all_types); ti++) {
        const int type = all_types[ti];
        float *deq;
        void *w = make_weights(f, type, n_in, n_rows, &deq);
        size_t wbytes = kp_type_row_bytes(type, n_in) * (size_t)n_rows, ny = (size_t)n * n_in;
        kp_wref hw = {type, n_in, n_rows, w};
        kp_wref dw = {type, n_in, n_rows, dev_from(f, w, wbytes)};
        float *want = xmalloc(ny * sizeof(float));
        f->co->get_rows(f->cpu, want, &hw, ids, n);
        for (int dev_ids = 0; dev_ids < 2; dev_ids++) {
            /* ids from host memory (as the engine passes them), then from device memory */
            int32_t *d_ids = dev_ids ? dev_from(f, ids, sizeof ids) : NULL;
            float *dy = dev_nan(f, ny);
            f->go->get_rows(f->gpu, dy, &dw, dev_ids ? d_ids : ids, n);
            float *got = dev_get(f, dy, ny);
            print_message("get_rows %s%s\n", kp_type_name(type), dev_ids ? " (device ids)" : "");
            check_close("get_rows", got, want, 0, 0, ny); /* exact: same expressions */
            free(got);
            f->go->free(f->gpu, dy);
            if (d_ids) f->go->free(f->gpu, d_ids);
        }
        f->go->free(f->gpu, (void *)dw.data);
        free(want), free(w), free(deq);
    }
}

/* Largest |x| of each activation block of `bs` elements: bounds the CPU's
 * q8 rounding of x (error <= amax/254 per element; amax/127 allowed). */
static double q8_act_bound(const float *x, const float *wrow, int64_t n_in, int bs) {
    double bound = 0.0;
    for (int64_t b = 0; b < n_in; b += bs) {
        double amax = 0.0, wsum = 0.0;
        for (int64_t i = b; i < b + bs && i < n_in; i++) {
            amax = fmax(amax, fabs((double)x[i]));
            wsum += fabs((double)wrow[i]);
        }
        bound += wsum * amax / 127.0;
    }
    return bound;
}

static void test_matmul(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    /* n, n_in, n_out; n_in 100 only for the float types */
    static const int shapes[][3] = {{1, 256, 33}, {5, 512, 70}, {17, 256, 129}, {3, 100, 37}};
    for (size_t ti = 0; ti < KP_ARRAY_LEN(all_types); ti++)
        for (size_t s = 0; s < KP_ARRAY_LEN(shapes); s++) {
            const int type = all_types[ti];
            const int n = shapes[s][0];
            const int64_t n_in = shapes[s][1], n_out = shapes[s][2];
            if (kp_type_row_bytes(type, n_in) == 0) continue;
            const int quant = type != KP_TYPE_F32 && type != KP_TYPE_F16 && type != KP_TYPE_BF16;
            float *deq;
            void *w = make_weights(f, type, n_in, n_out, &deq);
            float *x = rand_vec(f, (size_t)(n * n_in), 2.0f);
            size_t ny = (size_t)n * n_out;
            kp_wref hw = {type, n_in, n_out, w};
            float *want = xmalloc(ny * sizeof(float));
            f->co->matmul(f->cpu, want, x, &hw, n);

            kp_wref dw = {type, n_in, n_out,
                          dev_from(f, w, kp_type_row_bytes(type, n_in) * (size_t)n_out)};
            float *dx = dev_from(f, x, (size_t)(n * n_in) * sizeof(float));
            float *dy = dev_nan(f, ny);
            f->go->matmul(f->gpu, dy, dx, &dw, n);
            float *got = dev_get(f, dy, ny);

            /* tolerance per output: rel * sum|w x| (+ the CPU's q8 activation error) */
            double *atol = xmalloc(ny * sizeof(double));
            const double rel = type == KP_TYPE_F32 ? 2.0 * n_in * 6e-8
                             : quant               ? 2.5e-3
                                                   : 2.0 * n_in * 6e-8 + 1e-6;
            const int bs = type == KP_TYPE_Q8_0 || type == KP_TYPE_Q4_0 ? 32 : 256;
            for (int t = 0; t < n; t++)
                for (int64_t o = 0; o < n_out; o++) {
                    const float *xr = x + t * n_in, *wr = deq + o * n_in;
                    double sabs = 0.0;
                    for (int64_t i = 0; i < n_in; i++) sabs += fabs((double)xr[i] * wr[i]);
                    atol[t * n_out + o] =
                        rel * sabs + 1e-6 + (quant ? q8_act_bound(xr, wr, n_in, bs) : 0.0);
                }
            print_message("matmul %s n=%d n_in=%lld n_out=%lld\n", kp_type_name(type), n,
                          (long long)n_in, (long long)n_out);
            check_close_v("matmul", got, want, atol, 0, 0, ny);
            free(atol), free(got), free(want), free(x), free(w), free(deq);
            f->go->free(f->gpu, dy);
            f->go->free(f->gpu, dx);
            f->go->free(f->gpu, (void *)dw.data);
        }
}

/* ---------------------------------------------------------------------- */
/* Elementwise ops and norms                                              */
/* ---------------------------------------------------------------------- */

static void test_add_bias_add(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    const int n = 7, d = 333;
    const size_t ne = (size_t)n * d;
    float *y = rand_vec(f, ne, 3.0f), *b = rand_vec(f, d, 1.0f), *x = rand_vec(f, ne, 1.0f);
    float *dy = dev_from(f, y, ne * sizeof(float)), *db = dev_from(f, b, d * sizeof(float));
    float *dx = dev_from(f, x, ne * sizeof(float));
    f->co->add_bias(f->cpu, y, b, n, d);
    f->go->add_bias(f->gpu, dy, db, n, d);
    float *got = dev_get(f, dy, ne);
    check_close("add_bias", got, y, 0, 0, ne);
    free(got);
    f->co->add(f->cpu, y, x, (int64_t)ne);
    f->go->add(f->gpu, dy, dx, (int64_t)ne);
    got = dev_get(f, dy, ne);
    check_close("add", got, y, 0, 0, ne);
    free(got), free(y), free(b), free(x);
    f->go->free(f->gpu, dy), f->go->free(f->gpu, db), f->go->free(f->gpu, dx);
}

static void test_norms(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    static const int shapes[][2] = {{3, 64}, {2, 1000}, {5, 4096}};
    for (size_t s = 0; s < KP_ARRAY_LEN(shapes); s++)
        for (int with_w = 0; with_w < 2; with_w++) {
            const int n = shapes[s][0], d = shapes[s][1];
            const size_t ne = (size_t)n * d;
            float *x = rand_vec(f, ne, 4.0f), *w = rand_vec(f, d, 2.0f), *b = rand_vec(f, d, 1.0f);
            float *dx = dev_from(f, x, ne * sizeof(float));
            float *dw = dev_from(f, w, d * sizeof(float)), *db = dev_from(f, b, d * sizeof(float));
            float *want = xmalloc(ne * sizeof(float));
            float *dy = dev_nan(f, ne);
            f->co->rmsnorm(f->cpu, want, x, with_w ? w : NULL, n, d, 1e-5f);
            f->go->rmsnorm(f->gpu, dy, dx, with_w ? dw : NULL, n, d, 1e-5f);
            float *got = dev_get(f, dy, ne);
            check_close("rmsnorm", got, want, 1e-7, 5e-7, ne);
            free(got);
            f->go->free(f->gpu, dy);

            dy = dev_nan(f, ne);
            f->co->layernorm(f->cpu, want, x, with_w ? w : NULL, with_w ? b : NULL, n, d, 1e-5f);
            f->go->layernorm(f->gpu, dy, dx, with_w ? dw : NULL, with_w ? db : NULL, n, d, 1e-5f);
            got = dev_get(f, dy, ne);
            check_close("layernorm", got, want, 2e-6, 1e-6, ne);
            free(got);
            /* in place (y == x), as the engine may call it */
            f->go->rmsnorm(f->gpu, dx, dx, with_w ? dw : NULL, n, d, 1e-5f);
            f->co->rmsnorm(f->cpu, want, x, with_w ? w : NULL, n, d, 1e-5f);
            got = dev_get(f, dx, ne);
            check_close("rmsnorm (in place)", got, want, 1e-7, 5e-7, ne);
            free(got), free(want), free(x), free(w), free(b);
            f->go->free(f->gpu, dy), f->go->free(f->gpu, dx);
            f->go->free(f->gpu, dw), f->go->free(f->gpu, db);
        }
}

static void test_rope(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    static const struct { int n, n_heads, head_dim, n_rot; float base, fs; } cases[] = {
        {5, 4, 64, 64, 10000.0f, 1.0f},
        {3, 2, 128, 64, 500000.0f, 0.5f},
        {4, 8, 8, 8, 10000.0f, 1.0f},
        {2, 3, 80, 80, 1000000.0f, 0.25f},
    };
    for (size_t c = 0; c < KP_ARRAY_LEN(cases); c++)
        for (int mode = 0; mode <= KP_ROPE_NEOX; mode += KP_ROPE_NEOX) {
            const int n = cases[c].n, nh = cases[c].n_heads, hd = cases[c].head_dim;
            const size_t ne = (size_t)n * nh * hd;
            int32_t pos[8];
            for (int t = 0; t < n; t++) pos[t] = t == 0 ? 0 : 977 * t + (int)c * 3001;
            float *x = rand_vec(f, ne, 1.0f);
            float *dx = dev_from(f, x, ne * sizeof(float));
            f->co->rope(f->cpu, x, pos, n, nh, hd, cases[c].n_rot, cases[c].base, cases[c].fs, mode);
            f->go->rope(f->gpu, dx, pos, n, nh, hd, cases[c].n_rot, cases[c].base, cases[c].fs, mode);
            float *got = dev_get(f, dx, ne);
            print_message("rope case %zu mode %d\n", c, mode);
            check_close("rope", got, x, 1e-6, 1e-6, ne);
            free(got), free(x);
            f->go->free(f->gpu, dx);
        }
}

static void test_swiglu_gelu(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    const int n = 5, d = 1001;
    const size_t ne = (size_t)n * d;
    float *g = rand_vec(f, ne, 8.0f), *u = rand_vec(f, ne, 2.0f);
    float *dg = dev_from(f, g, ne * sizeof(float)), *du = dev_from(f, u, ne * sizeof(float));
    float *want = xmalloc(ne * sizeof(float));
    float *dy = dev_nan(f, ne);
    f->co->swiglu(f->cpu, want, g, u, n, d);
    f->go->swiglu(f->gpu, dy, dg, du, n, d);
    float *got = dev_get(f, dy, ne);
    check_close("swiglu", got, want, 1e-7, 2e-6, ne);
    free(got);

    /* gelu in place; inputs span the (-10, 10) table range and beyond */
    float *x = rand_vec(f, ne, 12.0f);
    float *dx = dev_from(f, x, ne * sizeof(float));
    f->co->gelu(f->cpu, x, (int64_t)ne);
    f->go->gelu(f->gpu, dx, (int64_t)ne);
    got = dev_get(f, dx, ne);
    check_close("gelu", got, x, 1e-6, 1e-3, ne); /* results are fp16 values: 1 fp16 ulp */
    free(got), free(x), free(want), free(g), free(u);
    f->go->free(f->gpu, dy), f->go->free(f->gpu, dg), f->go->free(f->gpu, du);
    f->go->free(f->gpu, dx);
}

/* ---------------------------------------------------------------------- */
/* KV cache: kv_store, attention                                          */
/* ---------------------------------------------------------------------- */

static const int kv_types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};

static size_t kv_elem(int t) { return t == KP_TYPE_F32 ? 4 : 2; }

static void test_kv_store(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    const int n = 6, d = 136;
    const size_t ne = (size_t)n * d;
    float *src = rand_vec(f, ne, 100.0f);
    src[0] = 1e-9f, src[1] = 70000.0f, src[2] = -0.0f; /* subnormal f16, f16 overflow, -0 */
    float *dsrc = dev_from(f, src, ne * sizeof(float));
    for (size_t k = 0; k < KP_ARRAY_LEN(kv_types); k++) {
        const int t = kv_types[k];
        const size_t bytes = ne * kv_elem(t);
        void *want = xmalloc(bytes), *got = xmalloc(bytes);
        memset(got, 0xff, bytes);
        void *dd = dev_from(f, got, bytes); /* poisoned: all-ones bytes (NaN) */
        f->co->kv_store(f->cpu, want, t, src, n, d);
        f->go->kv_store(f->gpu, dd, t, dsrc, n, d);
        f->go->sync(f->gpu);
        assert_int_equal(f->go->download(f->gpu, got, dd, bytes), 0);
        print_message("kv_store %s\n", kp_type_name(t));
        check_bits("kv_store", got, want, bytes);
        free(want), free(got);
        f->go->free(f->gpu, dd);
    }
    free(src);
    f->go->free(f->gpu, dsrc);
}

static void test_attention(void **state) {
    fixture *f = *state;
    REQUIRE_GPU(f);
    static const struct { int n_q, pos0, n_head, n_kv, head_dim; } cases[] = {
        {1, 40, 4, 2, 64},   /* decode, GQA */
        {7, 0, 6, 2, 32},    /* prefill from the start */
        {3, 100, 2, 1, 8},   /* tiny heads (stories260K-like), MQA */
        {2, 5, 4, 4, 128},   /* MHA */
        {1, 300, 8, 2, 256}, /* the largest head_dim, longer context */
        {4, 17, 4, 1, 80},   /* head_dim not a multiple of 32 */
    };
    for (size_t c = 0; c < KP_ARRAY_LEN(cases); c++)
        for (size_t k = 0; k < KP_ARRAY_LEN(kv_types); k++) {
            const int t = kv_types[k];
            const int n_q = cases[c].n_q, pos0 = cases[c].pos0, nh = cases[c].n_head,
                      nkv = cases[c].n_kv, hd = cases[c].head_dim;
            const int n_ctx = pos0 + n_q;
            const size_t nqe = (size_t)n_q * nh * hd, nkve = (size_t)n_ctx * nkv * hd;
            float *q = rand_vec(f, nqe, 1.0f);
            float *kf = rand_vec(f, nkve, 1.0f), *vf = rand_vec(f, nkve, 1.0f);
            /* the cache in kv_type, written by the CPU op; the same bytes on the device */
            void *kc = xmalloc(nkve * kv_elem(t)), *vc = xmalloc(nkve * kv_elem(t));
            f->co->kv_store(f->cpu, kc, t, kf, n_ctx, nkv * hd);
            f->co->kv_store(f->cpu, vc, t, vf, n_ctx, nkv * hd);
            void *dk = dev_from(f, kc, nkve * kv_elem(t)), *dv = dev_from(f, vc, nkve * kv_elem(t));
            float *dq = dev_from(f, q, nqe * sizeof(float));
            float *want = xmalloc(nqe * sizeof(float));
            float *dout = dev_nan(f, nqe);
            const float scale = 1.0f / sqrtf((float)hd);
            f->co->attention(f->cpu, want, q, kc, vc, t, n_q, pos0, nh, nkv, hd, scale);
            f->go->attention(f->gpu, dout, dq, dk, dv, t, n_q, pos0, nh, nkv, hd, scale);
            float *got = dev_get(f, dout, nqe);
            print_message("attention case %zu kv %s\n", c, kp_type_name(t));
            check_close("attention", got, want, 2e-5, 1e-4, nqe);
            free(got), free(want), free(q), free(kf), free(vf), free(kc), free(vc);
            f->go->free(f->gpu, dk), f->go->free(f->gpu, dv), f->go->free(f->gpu, dq);
            f->go->free(f->gpu, dout);
        }
}

/* cuBLAS is loaded by the CUDA backend's init, not at program start: a CPU
 * run never maps its ~150 MB (kernels/cuda/blas.cu). With CUDA built, the
 * loader finds the toolkit's library (CI has the toolkit, no GPU). */
static void test_cublas_loaded_lazily(void **state) {
    (void)state;
    assert_false(cublas_at_start);
#ifdef KP_HAVE_CUDA
    const char *path = NULL;
    kp_err err = {0};
    int rc = kp_cuda_blas_load(&path, &err);
    if (rc) fprintf(stderr, "kp_cuda_blas_load: %s\n", err.msg);
    assert_int_equal(rc, 0);
    assert_non_null(path);
    print_message("cuBLAS loaded from %s\n", path);
    assert_true(cublas_mapped());
    assert_int_equal(kp_cuda_blas_load(NULL, &err), 0); /* once per process, then cached */
#else
    assert_false(cublas_mapped());
#endif
}

int main(int argc, char **argv) {
    cublas_at_start = cublas_mapped();
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_cublas_loaded_lazily),
        cmocka_unit_test(test_no_device),
        cmocka_unit_test(test_get_rows),
        cmocka_unit_test(test_matmul),
        cmocka_unit_test(test_add_bias_add),
        cmocka_unit_test(test_norms),
        cmocka_unit_test(test_rope),
        cmocka_unit_test(test_swiglu_gelu),
        cmocka_unit_test(test_kv_store),
        cmocka_unit_test(test_attention),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
