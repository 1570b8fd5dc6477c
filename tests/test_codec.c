/*
 * test_codec.c — the baseline KV codecs (compress/codec.h): round trips of
 * every codec x element type x shape x row count, error bounds per group
 * derived from the data, sizes against the documented layouts, an
 * independent decoder written from the layout comments (what the CUDA
 * decoder will follow), damaged and mismatched chunks refused without
 * touching the output, and (KVPARK_BENCH_CODEC=1) a small throughput print.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"

#include "compress/codec.h"
#include "kernels/cpu/quant.h"
#include "kernels/types.h"

static const char *const k_codecs[] = {"none", "fp16", "int8", "int4", "kivi2"};
static const int k_types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};
/* stories260K, Llama-3, a remainder group (80 = 32+32+16), odd/unaligned dims */
static const int k_shapes[][2] = {{4, 8}, {8, 128}, {2, 80}, {3, 6}, {1, 5}};
static const int k_rows[] = {64, 1, 37};

static size_t esize(int t) { return t == KP_TYPE_F32 ? 4 : 2; }

static float load(int t, const void *rows, size_t i) {
    if (t == KP_TYPE_F32) return ((const float *)rows)[i];
    uint16_t h = ((const uint16_t *)rows)[i];
    return t == KP_TYPE_F16 ? kp_fp16_to_f32(h) : kp_bf16_to_f32(h);
}

static void store(int t, void *rows, size_t i, float x) {
    if (t == KP_TYPE_F32)
        ((float *)rows)[i] = x;
    else
        ((uint16_t *)rows)[i] = t == KP_TYPE_F16 ? kp_f32_to_fp16(x) : kp_f32_to_bf16(x);
}

/* Half an ulp, relative, of rounding a decoded float to the output type. */
static double out_rel(int t) { return t == KP_TYPE_F32 ? 0.0 : t == KP_TYPE_F16 ? 0x1p-11 : 0x1p-8; }

/* Random KV rows with outliers: channel d % 16 == 3 of every head is 25x
 * larger (keys' outlier channels), and every 7th token 4x larger. */
static void make_rows(int t, void *rows, float *ref, int n, int H, int D, uint64_t *st) {
    const size_t R = (size_t)H * D;
    float *x = malloc((size_t)n * R * sizeof(float));
    tu_rand_floats(x, (size_t)n * R, 1.0f, st);
    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                size_t k = ((size_t)i * H + h) * D + d;
                if (d % 16 == 3) x[k] = x[k] * 25.0f + 3.0f;
                if (i % 7 == 5) x[k] *= 4.0f;
                store(t, rows, k, x[k]);
                ref[k] = load(t, rows, k);
            }
    free(x);
}

/* ---- sizes from the layout comments in codec_baseline.c ---------------------- */

static size_t doc_payload(const char *name, int t, int n, int H, int D, int is_v) {
    const size_t G = D < 32 ? (size_t)D : 32, NG = ((size_t)D + G - 1) / G, R = (size_t)H * D;
    const size_t nh = (size_t)n * H;
    if (!strcmp(name, "none")) return n * R * esize(t);
    if (!strcmp(name, "fp16")) return n * R * 2;
    if (!strcmp(name, "int8")) return nh * NG * 2 + n * R;
    if (!strcmp(name, "int4")) return nh * NG * 2 + nh * (((size_t)D + 1) / 2);
    /* kivi2 */
    size_t codes = nh * (((size_t)D + 3) / 4);
    if (is_v) return nh * NG * 4 + codes;
    return (((size_t)n + 31) / 32) * R * 4 + codes;
}

/* ---- an independent decoder, written from the layout comments --------------- */

static uint16_t rd16(const uint8_t *p) { return (uint16_t)(p[0] | p[1] << 8); }

/* payload -> floats [n][H][D]; only for int8, int4, kivi2. */
static void doc_decode(const char *name, const uint8_t *p, int n, int H, int D, int is_v, float *y) {
    const int G = D < 32 ? D : 32, NG = (D + G - 1) / G;
    const size_t R = (size_t)H * D;
    for (int t = 0; t < n; t++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                const size_t th = (size_t)t * H + h, g = th * NG + d / G;
                float v;
                if (!strcmp(name, "int8")) {
                    const int8_t *q = (const int8_t *)(p + (size_t)n * H * NG * 2);
                    v = (float)q[th * D + d] * kp_fp16_to_f32(rd16(p + 2 * g));
                } else if (!strcmp(name, "int4")) {
                    const uint8_t *code = p + (size_t)n * H * NG * 2 + th * ((D + 1) / 2);
                    int q = (code[d / 2] >> (4 * (d % 2))) & 15;
                    v = (float)(q - 8) * kp_fp16_to_f32(rd16(p + 2 * g));
                } else {
                    const int DB = (D + 3) / 4;
                    float s, m;
                    size_t params;
                    if (is_v) {
                        params = (size_t)n * H * NG;
                        s = kp_fp16_to_f32(rd16(p + 2 * g));
                        m = kp_fp16_to_f32(rd16(p + 2 * (params + g)));
                    } else {
                        params = (size_t)((n + 31) / 32) * R;
                        size_t k = (size_t)(t / 32) * R + (size_t)h * D + d;
                        s = kp_fp16_to_f32(rd16(p + 2 * k));
                        m = kp_fp16_to_f32(rd16(p + 2 * (params + k)));
                    }
                    const uint8_t *code = p + params * 4 + th * DB;
                    int q = (code[d / 4] >> (2 * (d % 4))) & 3;
                    v = (float)q * s + m;
                }
                y[th * D + d] = v;
            }
}

/* ---- error bounds per group, from the input alone ----------------------------- */

/* Max allowed |decoded - ref| for element k; see codec_baseline.c. */
static double bound_of(const char *name, int t, const float *ref, int n, int H, int D, int is_v,
                       int i, int h, int d) {
    const size_t R = (size_t)H * D, k = ((size_t)i * H + h) * D + d;
    const double fp16u = 0x1p-10; /* relative rounding of a stored fp16 scale, with slack */
    double b;
    if (!strcmp(name, "none")) return 0.0;
    if (!strcmp(name, "fp16")) {
        if (t == KP_TYPE_F16) return 0.0;
        return fabs(ref[k]) * 0x1p-11 + 0x1p-25;
    }
    const int G = D < 32 ? D : 32, lo = d / G * G, hi = lo + G < D ? lo + G : D;
    if (!strcmp(name, "int8") || !strcmp(name, "int4")) {
        double amax = 0, m = 0;
        for (int j = lo; j < hi; j++) {
            double a = fabs(ref[(size_t)i * R + (size_t)h * D + j]);
            if (a > amax) {
                amax = a;
                m = ref[(size_t)i * R + (size_t)h * D + j];
            }
        }
        if (!strcmp(name, "int8")) {
            b = amax / 127 * (1 + fp16u) / 2;
        } else {
            double dd = fabs(m) / 8 * (1 + fp16u);
            /* the side opposite m clamps at 7: up to one step there */
            double v = m != 0 ? ref[k] / (m / -8) : 0;
            b = v <= 7.4 ? dd / 2 : dd;
        }
        b += 0x1p-24;
    } else { /* kivi2 */
        double mn = INFINITY, mx = -INFINITY;
        if (is_v) {
            for (int j = lo; j < hi; j++) {
                double x = ref[(size_t)i * R + (size_t)h * D + j];
                mn = fmin(mn, x);
                mx = fmax(mx, x);
            }
        } else {
            int t0 = i / 32 * 32, t1 = t0 + 32 < n ? t0 + 32 : n;
            for (int j = t0; j < t1; j++) {
                double x = ref[(size_t)j * R + (size_t)h * D + d];
                mn = fmin(mn, x);
                mx = fmax(mx, x);
            }
        }
        double s = (mx - mn) / 3;
        b = s / 2 * (1 + fp16u) + 3 * s * fp16u + fabs(mn) * fp16u + 0x1p-24 +
            1e-6 * (fabs(mn) + fabs(mx));
    }
    return b + (fabs(ref[k]) + b) * out_rel(t) + 0x1p-24;
}

/* ---- round trips ---------------------------------------------------------------- */

typedef struct {
    double max_err_over_bound;
    int lossy_seen_error;
} rt_stats;

static void roundtrip_one(const char *name, int t, int H, int D, int n, int is_v, rt_stats *st,
                          uint64_t *rng) {
    codec_shape shape = {.n_layer = 2, .n_kv_heads = H, .head_dim = D};
    codec *c = NULL;
    kp_err err = {0};
    assert_int_equal(codec_open(&c, name, &shape, &err), 0);
    const size_t R = (size_t)H * D, nv = (size_t)n * R;
    void *rows = malloc(nv * esize(t)), *back = malloc(nv * esize(t));
    float *ref = malloc(nv * sizeof(float)), *doc = malloc(nv * sizeof(float));
    make_rows(t, rows, ref, n, H, D, rng);

    codec_chunk ch = {.layer = 1, .is_v = is_v, .pos0 = 128, .n = n, .kv_type = t};
    size_t cap = codec_max_bytes(c, n), len = 0;
    uint8_t *buf = malloc(cap), *buf2 = malloc(cap);
    int rc = codec_encode(c, &ch, rows, buf, cap, &len, &err);
    if (rc) fail_msg("%s encode: %s", name, err.msg);
    size_t want = 16 + doc_payload(name, t, n, H, D, is_v);
    if (len != want)
        fail_msg("%s type %d %dx%d n=%d is_v=%d: %zu bytes, documented %zu", name, t, H, D, n, is_v,
                 len, want);
    assert_int_equal(codec_chunk_bytes(c, n, t, is_v), len);
    assert_true(len <= cap);
    /* deterministic */
    size_t len2 = 0;
    assert_int_equal(codec_encode(c, &ch, rows, buf2, cap, &len2, &err), 0);
    assert_int_equal(len2, len);
    assert_memory_equal(buf, buf2, len);

    memset(back, 0xA5, nv * esize(t));
    rc = codec_decode(c, &ch, buf, len, back, &err);
    if (rc) fail_msg("%s decode: %s", name, err.msg);

    if (!strcmp(name, "none") || (!strcmp(name, "fp16") && t == KP_TYPE_F16))
        assert_memory_equal(rows, back, nv * esize(t));
    int lossy = strcmp(name, "none") && strcmp(name, "fp16");
    if (lossy) doc_decode(name, buf + 16, n, H, D, is_v, doc);

    for (int i = 0; i < n; i++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < D; d++) {
                size_t k = ((size_t)i * H + h) * D + d;
                double y = load(t, back, k), e = fabs(y - ref[k]);
                double b = bound_of(name, t, ref, n, H, D, is_v, i, h, d);
                if (!(e <= b))
                    fail_msg("%s type %d %dx%d n=%d is_v=%d: row %d head %d dim %d: x=%.9g got %.9g, "
                             "err %.3g > bound %.3g",
                             name, t, H, D, n, is_v, i, h, d, ref[k], y, e, b);
                if (b > 0 && e / b > st->max_err_over_bound) st->max_err_over_bound = e / b;
                if (lossy && e > 0) st->lossy_seen_error = 1;
                /* the layout comments decode to the same numbers, bit for bit (F32) */
                if (lossy && t == KP_TYPE_F32 && memcmp(&doc[k], &((float *)back)[k], 4) != 0)
                    fail_msg("%s %dx%d n=%d is_v=%d: documented layout gives %.9g at %zu, codec %.9g",
                             name, H, D, n, is_v, doc[k], k, ((float *)back)[k]);
            }
    free(rows);
    free(back);
    free(ref);
    free(doc);
    free(buf);
    free(buf2);
    codec_free(c);
}

static void test_roundtrip(void **state) {
    uint64_t rng = 0x9e3779b97f4a7c15ull;
    for (size_t ci = 0; ci < KP_ARRAY_LEN(k_codecs); ci++) {
        rt_stats st = {0};
        for (size_t ti = 0; ti < KP_ARRAY_LEN(k_types); ti++)
            for (size_t si = 0; si < KP_ARRAY_LEN(k_shapes); si++)
                for (size_t ni = 0; ni < KP_ARRAY_LEN(k_rows); ni++)
                    for (int is_v = 0; is_v < 2; is_v++)
                        roundtrip_one(k_codecs[ci], k_types[ti], k_shapes[si][0], k_shapes[si][1],
                                      k_rows[ni], is_v, &st, &rng);
        int lossy = ci >= 2;
        if (lossy) assert_true(st.lossy_seen_error); /* it really quantised */
        print_message("%-6s max error / bound = %.3f\n", k_codecs[ci], st.max_err_over_bound);
    }
}

/* fp16 of F32 rows is round-to-nearest-even, as kp_f32_to_fp16. */
static void test_fp16_rounding(void **state) {
    codec_shape shape = {.n_kv_heads = 2, .head_dim = 8};
    codec *c;
    assert_int_equal(codec_open(&c, "fp16", &shape, NULL), 0);
    float x[3 * 16];
    uint64_t rng = 7;
    tu_rand_floats(x, 48, 100.0f, &rng);
    x[0] = 1.0f + 0x1p-11f; /* a tie: rounds to even (1.0) */
    x[1] = 1.0f + 3 * 0x1p-11f; /* a tie: rounds up to even */
    codec_chunk ch = {.n = 3, .kv_type = KP_TYPE_F32};
    uint8_t buf[16 + 96];
    size_t len;
    assert_int_equal(codec_encode(c, &ch, x, buf, sizeof buf, &len, NULL), 0);
    for (int i = 0; i < 48; i++) assert_int_equal(rd16(buf + 16 + 2 * i), kp_f32_to_fp16_soft(x[i]));
    assert_int_equal(rd16(buf + 16), 0x3c00);
    assert_int_equal(rd16(buf + 18), 0x3c02);
    codec_free(c);
}

/* All-zero rows decode to exact zeros; constant rows stay within bounds and
 * are exact where the format can hold them (kivi2, int4 of fp16 input). */
static void test_zero_and_constant(void **state) {
    const int H = 8, D = 128, n = 37;
    const size_t nv = (size_t)n * H * D;
    uint16_t *rows = malloc(nv * 2), *back = malloc(nv * 2);
    for (size_t ci = 0; ci < KP_ARRAY_LEN(k_codecs); ci++) {
        codec_shape shape = {.n_kv_heads = H, .head_dim = D};
        codec *c;
        assert_int_equal(codec_open(&c, k_codecs[ci], &shape, NULL), 0);
        size_t cap = codec_max_bytes(c, n), len;
        uint8_t *buf = malloc(cap);
        const float consts[] = {0.0f, -0.0f, 1.5f, -3.25f, 0.0078125f};
        for (size_t k = 0; k < KP_ARRAY_LEN(consts); k++)
            for (int is_v = 0; is_v < 2; is_v++) {
                for (size_t i = 0; i < nv; i++) rows[i] = kp_f32_to_fp16(consts[k]);
                codec_chunk ch = {.is_v = is_v, .n = n, .kv_type = KP_TYPE_F16};
                assert_int_equal(codec_encode(c, &ch, rows, buf, cap, &len, NULL), 0);
                assert_int_equal(codec_decode(c, &ch, buf, len, back, NULL), 0);
                int exact = ci != 2; /* int8: 127 * fp16(c/127) need not be c */
                for (size_t i = 0; i < nv; i++) {
                    float y = kp_fp16_to_f32(back[i]);
                    assert_false(isnan(y));
                    if (consts[k] == 0.0f) assert_true(y == 0.0f);
                    if (exact)
                        assert_true(y == consts[k]);
                    else
                        assert_true(fabsf(y - consts[k]) <= fabsf(consts[k]) / 127 / 2 * 1.002f);
                }
            }
        free(buf);
        codec_free(c);
    }
    free(rows);
    free(back);
}

/* Compression vs fp16 rows, printed; the documented ratios asserted. */
static void test_ratios(void **state) {
    const int shapes[][2] = {{8, 128}, {4, 8}};
    for (int s = 0; s < 2; s++) {
        codec_shape shape = {.n_kv_heads = shapes[s][0], .head_dim = shapes[s][1]};
        double fp16 = 64.0 * shapes[s][0] * shapes[s][1] * 2;
        for (size_t ci = 0; ci < KP_ARRAY_LEN(k_codecs); ci++) {
            codec *c;
            assert_int_equal(codec_open(&c, k_codecs[ci], &shape, NULL), 0);
            double rk = fp16 / (double)codec_chunk_bytes(c, 64, KP_TYPE_F16, 0);
            double rv = fp16 / (double)codec_chunk_bytes(c, 64, KP_TYPE_F16, 1);
            print_message("%dx%d n=64 %-6s vs fp16: K %.2fx V %.2fx (max_bytes %zu)\n", shapes[s][0],
                          shapes[s][1], k_codecs[ci], rk, rv, codec_max_bytes(c, 64));
            if (s == 0) {
                const double lo[] = {0.99, 0.99, 1.85, 3.5, 5.2};
                assert_true(rk >= lo[ci] && rv >= lo[ci]);
            }
            codec_free(c);
        }
    }
}

/* ---- damage and mismatch -------------------------------------------------------- */

static int decode_untouched(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len,
                            uint8_t *out, size_t out_bytes) {
    memset(out, 0xCD, out_bytes);
    kp_err err = {0};
    int rc = codec_decode(c, ch, in, len, out, &err);
    for (size_t i = 0; i < out_bytes; i++)
        if (out[i] != 0xCD) fail_msg("%s: output written despite rc %d", codec_name(c), rc);
    if (rc) assert_true(err.msg[0] != 0);
    return rc;
}

static void test_corrupt_every_byte(void **state) {
    const int H = 4, D = 8, n = 37, t = KP_TYPE_F16;
    const size_t nv = (size_t)n * H * D;
    uint64_t rng = 11;
    uint16_t *rows = malloc(nv * 2);
    float *ref = malloc(nv * sizeof(float));
    uint8_t *out = malloc(nv * 2);
    make_rows(t, rows, ref, n, H, D, &rng);
    codec_shape shape = {.n_kv_heads = H, .head_dim = D};
    for (size_t ci = 0; ci < KP_ARRAY_LEN(k_codecs); ci++)
        for (int is_v = 0; is_v < 2; is_v++) {
            codec *c;
            assert_int_equal(codec_open(&c, k_codecs[ci], &shape, NULL), 0);
            codec_chunk ch = {.is_v = is_v, .n = n, .kv_type = t};
            size_t cap = codec_max_bytes(c, n) + 1, len;
            uint8_t *buf = malloc(cap), *bad = malloc(cap);
            assert_int_equal(codec_encode(c, &ch, rows, buf, cap, &len, NULL), 0);
            for (size_t i = 0; i < len; i++)
                for (int f = 0; f < 2; f++) {
                    memcpy(bad, buf, len);
                    bad[i] ^= f ? 0x01 : 0xFF;
                    assert_int_equal(decode_untouched(c, &ch, bad, len, out, nv * 2), KP_EFORMAT);
                }
            /* truncated at every length, and one trailing byte */
            for (size_t l = 0; l < len; l++)
                assert_int_equal(decode_untouched(c, &ch, buf, l, out, nv * 2), KP_EFORMAT);
            memcpy(bad, buf, len);
            bad[len] = 0;
            assert_int_equal(decode_untouched(c, &ch, bad, len + 1, out, nv * 2), KP_EFORMAT);
            assert_int_equal(decode_untouched(c, &ch, NULL, len, out, nv * 2), KP_EFORMAT);
            /* intact still decodes */
            assert_int_equal(codec_decode(c, &ch, buf, len, out, NULL), 0);
            free(buf);
            free(bad);
            codec_free(c);
        }
    free(rows);
    free(ref);
    free(out);
}

static void test_mismatch(void **state) {
    const int H = 4, D = 8, n = 16;
    const size_t nv = (size_t)n * H * D;
    float *rows = malloc(nv * 4);
    uint8_t *out = malloc(nv * 4 + 64);
    uint64_t rng = 5;
    tu_rand_floats(rows, nv, 1.0f, &rng);
    codec_shape shape = {.n_kv_heads = H, .head_dim = D};
    codec_shape other = {.n_kv_heads = H, .head_dim = 16};
    codec *c8, *c4, *cw;
    assert_int_equal(codec_open(&c8, "int8", &shape, NULL), 0);
    assert_int_equal(codec_open(&c4, "int4", &shape, NULL), 0);
    assert_int_equal(codec_open(&cw, "int8", &other, NULL), 0);
    codec_chunk ch = {.n = n, .kv_type = KP_TYPE_F32};
    uint8_t buf[4096];
    size_t len;
    assert_int_equal(codec_encode(c8, &ch, rows, buf, sizeof buf, &len, NULL), 0);
    assert_int_equal(decode_untouched(c4, &ch, buf, len, out, nv * 4), KP_EMISMATCH);
    codec_chunk w = ch;
    w.n = n - 1;
    assert_int_equal(decode_untouched(c8, &w, buf, len, out, nv * 4), KP_EMISMATCH);
    w = ch;
    w.kv_type = KP_TYPE_F16;
    assert_int_equal(decode_untouched(c8, &w, buf, len, out, nv * 2), KP_EMISMATCH);
    w = ch;
    w.is_v = 1;
    assert_int_equal(decode_untouched(c8, &w, buf, len, out, nv * 4), KP_EMISMATCH);
    /* same name, another shape: the payload size gives it away */
    assert_int_equal(decode_untouched(cw, &ch, buf, len, out, nv * 4), KP_EMISMATCH);
    /* bad chunks given by the caller */
    w = ch;
    w.n = 0;
    assert_int_equal(codec_decode(c8, &w, buf, len, out, NULL), KP_EINVAL);
    w.n = 70000;
    assert_int_equal(codec_encode(c8, &w, rows, buf, sizeof buf, &len, NULL), KP_EINVAL);
    w = ch;
    w.kv_type = KP_TYPE_Q8_0;
    assert_int_equal(codec_encode(c8, &w, rows, buf, sizeof buf, &len, NULL), KP_EUNSUP);
    /* too small an output buffer: refused, nothing written past cap */
    memset(buf, 0x77, sizeof buf);
    kp_err err = {0};
    assert_int_equal(codec_encode(c8, &ch, rows, buf, 100, &len, &err), KP_ERANGE);
    assert_non_null(strstr(err.msg, "codec_max_bytes"));
    for (size_t i = 0; i < sizeof buf; i++) assert_int_equal(buf[i], 0x77);
    codec_free(c8);
    codec_free(c4);
    codec_free(cw);
    free(rows);
    free(out);
}

/* codec_chunk_peek reads back what codec_encode wrote (the header's byte
 * map), and refuses a short or foreign buffer; codec_chunk_verify is the
 * check codec_decode makes, naming the caller's step. */
static void test_peek_verify(void **state) {
    (void)state;
    const int H = 2, D = 8, n = 5;
    float rows[5 * 2 * 8];
    uint64_t rng = 11;
    tu_rand_floats(rows, KP_ARRAY_LEN(rows), 1.0f, &rng);
    codec_shape shape = {.n_kv_heads = H, .head_dim = D};
    codec *c = NULL;
    assert_int_equal(codec_open(&c, "int8", &shape, NULL), 0);
    codec_chunk ch = {.n = n, .kv_type = KP_TYPE_F16, .is_v = 1};
    uint16_t h[5 * 2 * 8];
    for (size_t i = 0; i < KP_ARRAY_LEN(h); i++) h[i] = kp_f32_to_fp16(rows[i]);
    uint8_t buf[1024];
    size_t len = 0;
    kp_err err = {0};
    assert_int_equal(codec_encode(c, &ch, h, buf, sizeof buf, &len, &err), 0);
    codec_chunk_info hi;
    assert_int_equal(codec_chunk_peek(buf, len, &hi, &err), 0);
    assert_int_equal(hi.codec_id, codec_id_of(c));
    assert_int_equal(hi.kv_type, KP_TYPE_F16);
    assert_int_equal(hi.n, n);
    assert_int_equal(hi.flags, 1);
    assert_int_equal(hi.payload_bytes, len - CODEC_CHUNK_HEADER_BYTES);
    assert_int_equal(codec_chunk_peek(buf, CODEC_CHUNK_HEADER_BYTES - 1, &hi, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "shorter"));
    assert_int_equal(codec_chunk_verify(c, &ch, buf, len, "check", &err), 0);
    buf[len - 1] ^= 1;
    assert_int_equal(codec_chunk_verify(c, &ch, buf, len, "check", &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "' check: chunk checksum mismatch"));
    buf[0] = 'X';
    assert_int_equal(codec_chunk_peek(buf, len, &hi, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "magic"));
    codec_free(c);
}

static void test_open(void **state) {
    codec_shape shape = {.n_kv_heads = 8, .head_dim = 128};
    codec *c = (codec *)&shape;
    kp_err err = {0};
    for (size_t i = 0; i < KP_ARRAY_LEN(k_codecs); i++) {
        assert_int_equal(codec_open(&c, k_codecs[i], &shape, &err), 0);
        assert_string_equal(codec_name(c), k_codecs[i]);
        assert_int_equal(codec_id_of(c), (int)i); /* CODEC_NONE .. CODEC_KIVI2 */
        codec_free(c);
    }
    /* pca / learned come from a codec file (tests/test_calib.c): the bare
     * names ask for one, a missing file is "not found" */
    const char *need_file[] = {"pca", "learned"};
    for (size_t i = 0; i < KP_ARRAY_LEN(need_file); i++) {
        assert_int_equal(codec_open(&c, need_file[i], &shape, &err), KP_EINVAL);
        assert_null(c);
        assert_non_null(strstr(err.msg, "file"));
    }
    const char *missing[] = {"/nonexistent/llama.kpc", "codecs/x.gguf"};
    for (size_t i = 0; i < KP_ARRAY_LEN(missing); i++) {
        assert_int_equal(codec_open(&c, missing[i], &shape, &err), KP_ENOTFOUND);
        assert_null(c);
    }
    assert_int_equal(codec_open(&c, "zstd", &shape, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "kivi2"));
    assert_int_equal(codec_open(&c, "", &shape, &err), KP_EINVAL);
    assert_int_equal(codec_open(&c, NULL, &shape, &err), KP_EINVAL);
    assert_int_equal(codec_open(&c, "int8", NULL, &err), KP_EINVAL);
    codec_shape bad = {.n_kv_heads = 0, .head_dim = 128};
    assert_int_equal(codec_open(&c, "int8", &bad, &err), KP_EINVAL);
    /* max_bytes bounds every type and K/V, and is exact for one of them */
    assert_int_equal(codec_open(&c, "none", &shape, &err), 0);
    assert_int_equal(codec_max_bytes(c, 64), 16 + 64 * 8 * 128 * 4);
    assert_int_equal(codec_max_bytes(c, 0), 0);
    codec_free(c);
}

/* ---- throughput (KVPARK_BENCH_CODEC=1) ------------------------------------------ */

static void test_bench(void **state) {
    const char *e = getenv("KVPARK_BENCH_CODEC");
    if (!e || strcmp(e, "1") != 0) {
        print_message("SKIP: set KVPARK_BENCH_CODEC=1 for the codec throughput print\n");
        skip();
    }
    const int H = 8, D = 128, n = 64;
    const size_t nv = (size_t)n * H * D;
    uint16_t *rows = malloc(nv * 2), *back = malloc(nv * 2);
    float *ref = malloc(nv * sizeof(float));
    uint64_t rng = 3;
    make_rows(KP_TYPE_F16, rows, ref, n, H, D, &rng);
    codec_shape shape = {.n_kv_heads = H, .head_dim = D};
    for (size_t ci = 0; ci < KP_ARRAY_LEN(k_codecs); ci++)
        for (int is_v = 0; is_v < 2; is_v++) {
            codec *c;
            assert_int_equal(codec_open(&c, k_codecs[ci], &shape, NULL), 0);
            codec_chunk ch = {.is_v = is_v, .n = n, .kv_type = KP_TYPE_F16};
            size_t cap = codec_max_bytes(c, n), len = 0;
            uint8_t *buf = malloc(cap);
            int iters = 0;
            double t0 = kp_now(), t1;
            do {
                assert_int_equal(codec_encode(c, &ch, rows, buf, cap, &len, NULL), 0);
                iters++;
            } while ((t1 = kp_now()) - t0 < 0.2);
            double enc = (double)nv * 2 * iters / (t1 - t0) / 1e6;
            iters = 0;
            t0 = kp_now();
            do {
                assert_int_equal(codec_decode(c, &ch, buf, len, back, NULL), 0);
                iters++;
            } while ((t1 = kp_now()) - t0 < 0.2);
            double dec = (double)nv * 2 * iters / (t1 - t0) / 1e6;
            print_message("bench %-6s %s 8x128 x 64 rows F16: encode %7.0f MB/s  decode %7.0f MB/s "
                          "(of fp16 rows)\n", k_codecs[ci], is_v ? "V" : "K", enc, dec);
            free(buf);
            codec_free(c);
        }
    free(rows);
    free(back);
    free(ref);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_open),
        cmocka_unit_test(test_peek_verify),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_fp16_rounding),
        cmocka_unit_test(test_zero_and_constant),
        cmocka_unit_test(test_ratios),
        cmocka_unit_test(test_corrupt_every_byte),
        cmocka_unit_test(test_mismatch),
        cmocka_unit_test(test_bench),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("codec", tests, NULL, NULL);
}
