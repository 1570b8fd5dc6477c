/*
 * test_kv.c — kv_copy_rows, the one copy of KV rows between caches: every
 * pair of element types (F32, F16, BF16, converted through f32) keeps values
 * within the precision of the narrower type, only the named rows move, and
 * bad shapes or row ranges are refused with a message; and kv_read_rows /
 * kv_write_rows, the storage layer's way to one layer's rows.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/kv.h"
#include "tests/testutil.h"

enum { N_LAYER = 3, N_CTX = 24, N_KVH = 2, HEAD_DIM = 8, ROW = N_KVH * HEAD_DIM };

static kp_backend *cpu(void) {
    kp_backend *be = NULL;
    kp_err err = {0};
    if (kp_backend_new(&be, "cpu", 1, &err)) fail_msg("%s", err.msg);
    return be;
}

static kv_cache *mk(kp_backend *be, int type) {
    kv_cache *kv = NULL;
    kp_err err = {0};
    if (kv_new(&kv, be, type, N_LAYER, N_CTX, N_KVH, HEAD_DIM, &err)) fail_msg("%s", err.msg);
    for (int l = 0; l < N_LAYER; l++) {
        memset(kv->k[l], 0, (size_t)N_CTX * kv->row_bytes);
        memset(kv->v[l], 0, (size_t)N_CTX * kv->row_bytes);
    }
    return kv;
}

/* Relative error one trip through type t may add (half an ulp, with room). */
static double tol_of(int t) { return t == KP_TYPE_F32 ? 1e-7 : t == KP_TYPE_F16 ? 1.5e-3 : 1e-2; }

static const int types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};

/* f32 -> a -> b -> f32 over rows [r0, r0+n): values within tolerance, rows
 * outside the range untouched (still zero). */
static void test_copy_rows_types(void **state) {
    (void)state;
    kp_backend *be = cpu();
    uint64_t rng = 7;
    kv_cache *ref = mk(be, KP_TYPE_F32);
    for (int l = 0; l < N_LAYER; l++) {
        tu_rand_floats(ref->k[l], (size_t)N_CTX * ROW, 4.0f, &rng);
        tu_rand_floats(ref->v[l], (size_t)N_CTX * ROW, 4.0f, &rng);
    }
    const int ranges[][2] = {{0, N_CTX}, {5, 7}, {N_CTX - 1, 1}, {3, 0}};
    for (size_t ai = 0; ai < KP_ARRAY_LEN(types); ai++)
        for (size_t bi = 0; bi < KP_ARRAY_LEN(types); bi++)
            for (size_t ri = 0; ri < KP_ARRAY_LEN(ranges); ri++) {
                int r0 = ranges[ri][0], n = ranges[ri][1];
                kv_cache *a = mk(be, types[ai]), *b = mk(be, types[bi]), *out = mk(be, KP_TYPE_F32);
                kp_err err = {0};
                assert_int_equal(kv_copy_rows(a, ref, r0, n, &err), 0);
                assert_int_equal(kv_copy_rows(b, a, r0, n, &err), 0);
                assert_int_equal(kv_copy_rows(out, b, r0, n, &err), 0);
                double tol = tol_of(types[ai]) + tol_of(types[bi]);
                for (int l = 0; l < N_LAYER; l++)
                    for (int v = 0; v < 2; v++) {
                        const float *x = v ? ref->v[l] : ref->k[l];
                        const float *y = v ? out->v[l] : out->k[l];
                        if (n > 0) {
                            double e = tu_max_rel_err(y + (size_t)r0 * ROW, x + (size_t)r0 * ROW,
                                                      (size_t)n * ROW, 1e-3);
                            if (e > tol)
                                fail_msg("%d -> %d rows [%d, %d) layer %d %c: rel err %g > %g", types[ai],
                                         types[bi], r0, r0 + n, l, v ? 'V' : 'K', e, tol);
                        }
                        for (int r = 0; r < N_CTX; r++) {
                            if (r >= r0 && r < r0 + n) continue;
                            for (int i = 0; i < ROW; i++) assert_true(y[(size_t)r * ROW + i] == 0.0f);
                        }
                    }
                assert_int_equal(out->n_pos, 0); /* the caller sets n_pos */
                kv_free(a);
                kv_free(b);
                kv_free(out);
            }
    kv_free(ref);
    kp_backend_free(be);
}

/* Same type: the bytes are copied exactly. */
static void test_copy_rows_same_type_exact(void **state) {
    (void)state;
    kp_backend *be = cpu();
    for (size_t ti = 0; ti < KP_ARRAY_LEN(types); ti++) {
        kv_cache *a = mk(be, types[ti]), *b = mk(be, types[ti]);
        for (int l = 0; l < N_LAYER; l++)
            for (size_t i = 0; i < (size_t)N_CTX * a->row_bytes; i++) {
                ((unsigned char *)a->k[l])[i] = (unsigned char)(i * 7 + l);
                ((unsigned char *)a->v[l])[i] = (unsigned char)(i * 13 + l);
            }
        kp_err err = {0};
        assert_int_equal(kv_copy_rows(b, a, 2, 9, &err), 0);
        for (int l = 0; l < N_LAYER; l++) {
            size_t off = 2 * a->row_bytes, len = 9 * a->row_bytes;
            assert_memory_equal((char *)b->k[l] + off, (char *)a->k[l] + off, len);
            assert_memory_equal((char *)b->v[l] + off, (char *)a->v[l] + off, len);
        }
        kv_free(a);
        kv_free(b);
    }
    kp_backend_free(be);
}

static void test_copy_rows_refuses(void **state) {
    (void)state;
    kp_backend *be = cpu();
    kv_cache *a = mk(be, KP_TYPE_F32), *b = NULL;
    kp_err err = {0};
    assert_int_equal(kv_new(&b, be, KP_TYPE_F32, N_LAYER, N_CTX, N_KVH, HEAD_DIM * 2, &err), 0);
    assert_int_equal(kv_copy_rows(b, a, 0, 1, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "shape"));
    kv_cache *c = NULL;
    assert_int_equal(kv_new(&c, be, KP_TYPE_F16, N_LAYER, 4, N_KVH, HEAD_DIM, &err), 0);
    assert_int_equal(kv_copy_rows(c, a, 2, 3, &err), KP_EINVAL); /* c has 4 rows */
    assert_non_null(strstr(err.msg, "outside"));
    assert_int_equal(kv_copy_rows(a, a, -1, 1, &err), KP_EINVAL);
    assert_int_equal(kv_copy_rows(c, a, 0, 4, &err), 0);
    assert_true(kv_is_host(a));
    assert_true(kv_backend_is_host(be));
    kv_free(a);
    kv_free(b);
    kv_free(c);
    kp_backend_free(be);
}

/* kv_read_rows / kv_write_rows move exactly the named rows of one layer's K
 * or V, byte for byte, and refuse a bad layer, K/V selector or row range. */
static void test_read_write_rows(void **state) {
    (void)state;
    kp_backend *be = cpu();
    kv_cache *kv = mk(be, KP_TYPE_F16);
    kp_err err = {0};
    uint8_t in[5 * ROW * 2], out[5 * ROW * 2];
    for (size_t i = 0; i < sizeof in; i++) in[i] = (uint8_t)(i * 7 + 3);
    assert_int_equal(kv_write_rows(kv, 1, 1, 7, 5, in, &err), 0);
    kv_sync(kv);
    assert_memory_equal((uint8_t *)kv->v[1] + 7 * kv->row_bytes, in, sizeof in);
    for (int l = 0; l < N_LAYER; l++) /* nothing else moved */
        for (size_t i = 0; i < (size_t)N_CTX * kv->row_bytes; i++) {
            assert_int_equal(((uint8_t *)kv->k[l])[i], 0);
            if (l != 1 && ((uint8_t *)kv->v[l])[i]) fail_msg("layer %d V byte %zu written", l, i);
        }
    assert_int_equal(kv_read_rows(kv, 1, 1, 7, 5, out, &err), 0);
    assert_memory_equal(out, in, sizeof in);
    assert_int_equal(kv_read_rows(kv, N_LAYER, 0, 0, 1, out, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "layer"));
    assert_int_equal(kv_write_rows(kv, 0, 2, 0, 1, in, &err), KP_EINVAL);
    assert_int_equal(kv_write_rows(kv, 0, 0, N_CTX - 2, 3, in, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "outside"));
    assert_int_equal(kv_read_rows(kv, 0, 0, -1, 1, out, &err), KP_EINVAL);
    assert_int_equal(kv_read_rows(kv, 0, 0, 3, 0, out, &err), 0);
    kv_free(kv);
    kp_backend_free(be);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_copy_rows_types),
        cmocka_unit_test(test_copy_rows_same_type_exact),
        cmocka_unit_test(test_copy_rows_refuses),
        cmocka_unit_test(test_read_write_rows),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("kv", tests, NULL, NULL);
}
