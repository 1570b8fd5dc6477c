/*
 * test_blob.c — the legacy v1 session blob (storage/blob.h; the tiered store
 * imports these at open): bit-exact round trips of the KV cache for
 * f32/f16/bf16 (150 tokens, not a multiple of the chunk, and 0 tokens),
 * tokens and extra bytes, write stats; chunk sizes; refusal of another model,
 * shape or type (KP_EMISMATCH) and of a too-small cache (KP_ERANGE); every
 * single-byte corruption and every truncation of a small blob refused cleanly
 * with the target cache untouched; a checksum-valid but undecodable LZ4 chunk
 * refused. (Moved here from test_store.c when the store moved to park/cas.)
 */
#include "tests/testutil.h"

#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "engine/kv.h"
#include "storage/blob.h"

#define FP_A 0x1234567890abcdefULL
#define FP_B 0x0badc0ffee123456ULL

/* ---- helpers --------------------------------------------------------------- */

static kp_backend *cpu_backend(void) {
    kp_backend *be = NULL;
    kp_err err = {0};
    if (kp_backend_new(&be, "cpu", 1, &err)) fail_msg("kp_backend_new: %s", err.msg);
    return be;
}

/* A cache with n_pos rows of test data: even layers smooth (LZ4 shrinks
 * them), odd layers random bytes (stored raw). */
static kv_cache *make_kv(kp_backend *be, int type, int n_layer, int n_ctx, int heads, int hd,
                         int n_pos, uint64_t seed) {
    kv_cache *kv = NULL;
    kp_err err = {0};
    if (kv_new(&kv, be, type, n_layer, n_ctx, heads, hd, &err)) fail_msg("kv_new: %s", err.msg);
    size_t bytes = (size_t)n_ctx * kv->row_bytes;
    uint8_t *buf = malloc(bytes);
    assert_non_null(buf);
    uint64_t st = seed | 1;
    for (int l = 0; l < n_layer; l++) {
        for (int s = 0; s < 2; s++) {
            for (size_t i = 0; i < bytes; i++) {
                if (l % 2 == 0) {
                    buf[i] = (uint8_t)((i / 7 + (size_t)l * 3 + (size_t)s) & 0x3f);
                } else {
                    st ^= st << 13;
                    st ^= st >> 7;
                    st ^= st << 17;
                    buf[i] = (uint8_t)(st >> 24);
                }
            }
            kp_backend_ops(be)->upload(be, s ? kv->v[l] : kv->k[l], buf, bytes);
        }
    }
    free(buf);
    kv->n_pos = n_pos;
    return kv;
}

/* 1 if rows [0, n) of every layer's K and V are byte-identical. */
static int kv_rows_equal(const kv_cache *a, const kv_cache *b, int n) {
    size_t bytes = (size_t)n * a->row_bytes;
    uint8_t *x = malloc(bytes + 1), *y = malloc(bytes + 1);
    assert_non_null(x);
    assert_non_null(y);
    int eq = 1;
    for (int l = 0; l < a->n_layer && eq; l++) {
        for (int s = 0; s < 2 && eq; s++) {
            kp_backend_ops(a->be)->download(a->be, x, s ? a->v[l] : a->k[l], bytes);
            kp_backend_ops(b->be)->download(b->be, y, s ? b->v[l] : b->k[l], bytes);
            eq = memcmp(x, y, bytes) == 0;
        }
    }
    free(x);
    free(y);
    return eq;
}

static char *path_join(const char *a, const char *b) {
    char *p = malloc(strlen(a) + strlen(b) + 2);
    assert_non_null(p);
    sprintf(p, "%s/%s", a, b);
    return p;
}

static uint64_t file_size(const char *p) {
    struct stat sb;
    assert_int_equal(stat(p, &sb), 0);
    return (uint64_t)sb.st_size;
}

static void fill_tokens(int32_t *t, int n, int seed) {
    for (int i = 0; i < n; i++) t[i] = (int32_t)((i * 2654435761u + (unsigned)seed) % 32000u) - (i == 3 ? 40000 : 0);
}

/* Write a blob of kv with fingerprint fp; returns 0 or the error. */
static int write_blob(const char *path, uint64_t fp, const kv_cache *kv, const int32_t *tokens,
                      const void *extra, size_t extra_len, blob_stats *st) {
    blob_meta m;
    memset(&m, 0, sizeof m);
    m.model_fingerprint = fp;
    m.n_tokens = kv->n_pos;
    kp_err err = {0};
    int rc = blob_write(path, &m, tokens, extra, extra_len, kv, st, &err);
    if (rc) print_message("blob_write: %s\n", err.msg);
    return rc;
}

/* ---- blob round trips ------------------------------------------------------ */

static void roundtrip_one(int type, int n_tokens) {
    kp_backend *be = cpu_backend();
    char *dir = tu_tmpdir();
    char *path = path_join(dir, "s.kvps");
    const int L = 3, H = 2, D = 16;
    kv_cache *kv = make_kv(be, type, L, 256, H, D, n_tokens, 42 + (uint64_t)type);
    int32_t tokens[256];
    fill_tokens(tokens, n_tokens, type);
    const char extra[] = "sampler-state\0with a NUL inside";
    blob_stats st;
    memset(&st, 0, sizeof st);
    assert_int_equal(write_blob(path, FP_A, kv, tokens, extra, sizeof extra, &st), 0);
    char *tmp = path_join(dir, "s.kvps.tmp");
    assert_false(tu_file_exists(tmp));
    free(tmp);

    /* stats */
    assert_int_equal(st.bytes_written, file_size(path));
    assert_int_equal(st.raw_fp16_bytes, (uint64_t)n_tokens * L * 2 * H * D * 2);
    assert_int_equal(st.raw_kv_bytes, (uint64_t)n_tokens * L * 2 * kv->row_bytes);
    assert_true(st.stored_kv_bytes <= st.raw_kv_bytes);
    if (n_tokens > 0) assert_true(st.stored_kv_bytes < st.raw_kv_bytes); /* even layers shrink */
    assert_true(st.bytes_written > st.stored_kv_bytes);
    assert_true(st.ms >= 0 && st.ms < 10000);

    /* meta */
    blob_meta m;
    int32_t *t2 = NULL;
    void *x2 = NULL;
    size_t xl = 0;
    kp_err err = {0};
    int rc = blob_read_meta(path, &m, &t2, &x2, &xl, &err);
    if (rc) fail_msg("blob_read_meta: %s", err.msg);
    assert_int_equal(m.version, 1);
    assert_int_equal(m.model_fingerprint, FP_A);
    assert_string_equal(m.codec, "none");
    assert_int_equal(m.kv_type, type);
    assert_int_equal(m.n_layer, L);
    assert_int_equal(m.n_kv_heads, H);
    assert_int_equal(m.head_dim, D);
    assert_int_equal(m.chunk_tokens, BLOB_CHUNK_TOKENS_DEFAULT);
    assert_int_equal(m.n_tokens, n_tokens);
    assert_int_equal(m.file_bytes, st.bytes_written);
    assert_int_equal(m.stored_kv_bytes, st.stored_kv_bytes);
    assert_true(m.created_unix_ms > 1600000000000ULL);
    assert_int_equal(xl, sizeof extra);
    assert_memory_equal(x2, extra, sizeof extra);
    if (n_tokens) assert_memory_equal(t2, tokens, (size_t)n_tokens * 4);
    free(t2);
    free(x2);

    /* KV, into a cache holding other data */
    kv_cache *kv2 = make_kv(be, type, L, 200, H, D, 5, 999);
    rc = blob_read_kv(path, FP_A, kv2, &err);
    if (rc) fail_msg("blob_read_kv: %s", err.msg);
    assert_int_equal(kv2->n_pos, n_tokens);
    assert_true(kv_rows_equal(kv, kv2, n_tokens));

    kv_free(kv);
    kv_free(kv2);
    tu_rm_rf(dir);
    free(path);
    free(dir);
    kp_backend_free(be);
}

static void test_roundtrip(void **state) {
    (void)state;
    const int types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};
    const int ns[] = {150, 0, 1, 64, 128};
    for (size_t i = 0; i < KP_ARRAY_LEN(types); i++)
        for (size_t j = 0; j < KP_ARRAY_LEN(ns); j++) roundtrip_one(types[i], ns[j]);
}

/* Chunk sizes other than the default, and no extra bytes. */
static void test_chunk_sizes(void **state) {
    (void)state;
    kp_backend *be = cpu_backend();
    char *dir = tu_tmpdir();
    char *path = path_join(dir, "c.kvps");
    kv_cache *kv = make_kv(be, KP_TYPE_F16, 2, 100, 1, 8, 77, 5);
    int32_t tokens[100];
    fill_tokens(tokens, 77, 1);
    const int cs[] = {1, 7, 77, 1000};
    for (size_t i = 0; i < KP_ARRAY_LEN(cs); i++) {
        blob_meta m;
        memset(&m, 0, sizeof m);
        m.model_fingerprint = FP_A;
        m.n_tokens = 77;
        m.chunk_tokens = cs[i];
        kp_err err = {0};
        assert_int_equal(blob_write(path, &m, tokens, NULL, 0, kv, NULL, &err), 0);
        blob_meta m2;
        void *x = NULL;
        size_t xl = 99;
        assert_int_equal(blob_read_meta(path, &m2, NULL, &x, &xl, &err), 0);
        assert_int_equal(m2.chunk_tokens, cs[i]);
        assert_int_equal(xl, 0);
        free(x);
        kv_cache *kv2 = make_kv(be, KP_TYPE_F16, 2, 100, 1, 8, 0, 6);
        assert_int_equal(blob_read_kv(path, FP_A, kv2, &err), 0);
        assert_int_equal(kv2->n_pos, 77);
        assert_true(kv_rows_equal(kv, kv2, 77));
        kv_free(kv2);
    }
    /* meta n_tokens must match the cache */
    blob_meta m;
    memset(&m, 0, sizeof m);
    m.n_tokens = 76;
    kp_err err = {0};
    assert_int_equal(blob_write(path, &m, tokens, NULL, 0, kv, NULL, &err), KP_EINVAL);
    strcpy(m.codec, "pca-v9");
    m.n_tokens = 77;
    assert_int_equal(blob_write(path, &m, tokens, NULL, 0, kv, NULL, &err), KP_EUNSUP);
    kv_free(kv);
    tu_rm_rf(dir);
    free(path);
    free(dir);
    kp_backend_free(be);
}

static void test_mismatch(void **state) {
    (void)state;
    kp_backend *be = cpu_backend();
    char *dir = tu_tmpdir();
    char *path = path_join(dir, "m.kvps");
    kv_cache *kv = make_kv(be, KP_TYPE_F16, 2, 200, 2, 8, 150, 1);
    int32_t tokens[150];
    fill_tokens(tokens, 150, 0);
    assert_int_equal(write_blob(path, FP_A, kv, tokens, NULL, 0, NULL), 0);
    kp_err err = {0};

    kv_cache *t = make_kv(be, KP_TYPE_F16, 2, 200, 2, 8, 7, 2);
    assert_int_equal(blob_read_kv(path, FP_B, t, &err), KP_EMISMATCH);
    assert_non_null(strstr(err.msg, "model"));
    assert_int_equal(t->n_pos, 7);
    kv_free(t);

    t = make_kv(be, KP_TYPE_F32, 2, 200, 2, 8, 7, 2);
    assert_int_equal(blob_read_kv(path, FP_A, t, &err), KP_EMISMATCH);
    assert_int_equal(t->n_pos, 7);
    kv_free(t);

    t = make_kv(be, KP_TYPE_F16, 3, 200, 2, 8, 7, 2);
    assert_int_equal(blob_read_kv(path, FP_A, t, &err), KP_EMISMATCH);
    kv_free(t);
    t = make_kv(be, KP_TYPE_F16, 2, 200, 1, 16, 7, 2); /* same row bytes, other shape */
    assert_int_equal(blob_read_kv(path, FP_A, t, &err), KP_EMISMATCH);
    kv_free(t);

    t = make_kv(be, KP_TYPE_F16, 2, 149, 2, 8, 7, 2);
    assert_int_equal(blob_read_kv(path, FP_A, t, &err), KP_ERANGE);
    assert_int_equal(t->n_pos, 7);
    kv_free(t);
    t = make_kv(be, KP_TYPE_F16, 2, 150, 2, 8, 7, 2); /* exactly enough */
    assert_int_equal(blob_read_kv(path, FP_A, t, &err), 0);
    assert_int_equal(t->n_pos, 150);
    kv_free(t);

    char *missing = path_join(dir, "nope.kvps");
    assert_int_equal(blob_read_meta(missing, NULL, NULL, NULL, NULL, &err), KP_ENOTFOUND);
    free(missing);
    kv_free(kv);
    tu_rm_rf(dir);
    free(path);
    free(dir);
    kp_backend_free(be);
}

/* ---- corruption --------------------------------------------------------------- */

/* A small blob: F16, 2 layers, 2 heads x 8, 150 tokens (chunks of 64, 64, 22),
 * layer 0 compressible (LZ4 chunks), layer 1 random (raw chunks). */
typedef struct small_blob {
    kp_backend *be;
    char *dir, *path;
    kv_cache *kv, *target, *snapshot;
    uint8_t *bytes;
    size_t n;
} small_blob;

static void small_blob_make(small_blob *b) {
    b->be = cpu_backend();
    b->dir = tu_tmpdir();
    b->path = path_join(b->dir, "x.kvps");
    b->kv = make_kv(b->be, KP_TYPE_F16, 2, 160, 2, 8, 150, 11);
    int32_t tokens[150];
    fill_tokens(tokens, 150, 3);
    const char extra[] = "xyz";
    assert_int_equal(write_blob(b->path, FP_A, b->kv, tokens, extra, 3, NULL), 0);
    b->bytes = (uint8_t *)tu_read_file(b->path, &b->n);
    assert_non_null(b->bytes);
    /* the target holds other data; snapshot is a copy to compare against */
    b->target = make_kv(b->be, KP_TYPE_F16, 2, 160, 2, 8, 9, 77);
    b->snapshot = make_kv(b->be, KP_TYPE_F16, 2, 160, 2, 8, 9, 77);
}

static void small_blob_free(small_blob *b) {
    kv_free(b->kv);
    kv_free(b->target);
    kv_free(b->snapshot);
    free(b->bytes);
    tu_rm_rf(b->dir);
    free(b->path);
    free(b->dir);
    kp_backend_free(b->be);
}

static void test_corrupt_every_byte(void **state) {
    (void)state;
    small_blob b;
    small_blob_make(&b);
    int fd = open(b.path, O_RDWR);
    assert_true(fd >= 0);
    size_t n_meta_fail = 0, n_kv_fail = 0;
    for (size_t off = 0; off < b.n; off++) {
        for (int k = 0; k < 2; k++) {
            uint8_t v = b.bytes[off] ^ (k == 0 ? 0x01 : 0xA5);
            assert_int_equal(pwrite(fd, &v, 1, (off_t)off), 1);
            kp_err err = {0};
            blob_meta m;
            int32_t *t = NULL;
            void *x = NULL;
            int r1 = blob_read_meta(b.path, &m, &t, &x, NULL, &err);
            if (r1 == 0) {
                free(t);
                free(x);
            } else {
                assert_null(t);
                assert_null(x);
                n_meta_fail++;
            }
            int r2 = blob_read_kv(b.path, FP_A, b.target, &err);
            if (r2 != KP_EFORMAT && r2 != KP_EUNSUP)
                fail_msg("offset %zu (xor %d): read_kv returned %d (%s)", off, k, r2, err.msg);
            n_kv_fail++;
            assert_int_equal(b.target->n_pos, 9);
            /* every failure is found before any row is written */
            if (off % 5 == 0) assert_true(kv_rows_equal(b.target, b.snapshot, 160));
            assert_int_equal(pwrite(fd, &b.bytes[off], 1, (off_t)off), 1);
        }
    }
    close(fd);
    print_message("blob of %zu bytes: %zu corruptions refused by read_meta, %zu by read_kv\n",
                  b.n, n_meta_fail, n_kv_fail);
    assert_true(n_meta_fail > 0 && n_meta_fail < 2 * b.n); /* payload flips pass the header */
    /* and the pristine file still restores */
    kp_err err = {0};
    assert_int_equal(blob_read_kv(b.path, FP_A, b.target, &err), 0);
    assert_true(kv_rows_equal(b.kv, b.target, 150));
    small_blob_free(&b);
}

static void test_truncate_and_extend(void **state) {
    (void)state;
    small_blob b;
    small_blob_make(&b);
    int fd = open(b.path, O_RDWR);
    assert_true(fd >= 0);
    for (size_t len = b.n; len-- > 0;) {
        assert_int_equal(ftruncate(fd, (off_t)len), 0);
        kp_err err = {0};
        assert_int_equal(blob_read_meta(b.path, NULL, NULL, NULL, NULL, &err), KP_EFORMAT);
        assert_int_equal(blob_read_kv(b.path, FP_A, b.target, &err), KP_EFORMAT);
        assert_int_equal(b.target->n_pos, 9);
    }
    assert_true(kv_rows_equal(b.target, b.snapshot, 160));
    /* one byte too many */
    assert_int_equal(pwrite(fd, b.bytes, b.n, 0), (ssize_t)b.n);
    uint8_t z = 0;
    assert_int_equal(pwrite(fd, &z, 1, (off_t)b.n), 1);
    kp_err err = {0};
    assert_int_equal(blob_read_meta(b.path, NULL, NULL, NULL, NULL, &err), KP_EFORMAT);
    assert_int_equal(blob_read_kv(b.path, FP_A, b.target, &err), KP_EFORMAT);
    assert_int_equal(b.target->n_pos, 9);
    close(fd);
    small_blob_free(&b);
}

/* A chunk whose checksums are all valid but whose LZ4 data decodes to the
 * wrong size must still be refused (the decoder is bounded by exact sizes). */
static void test_bad_lz4_with_valid_checksums(void **state) {
    (void)state;
    small_blob b;
    small_blob_make(&b);
    /* layout: 128 header + 150*4 tokens + 4 + 3 extra, then 12 table entries */
    size_t table = 128 + 150 * 4 + 4 + 3;
    size_t meta = table + 12 * 32 + 8;
    uint8_t *e = b.bytes + table; /* layer 0 K chunk 0: compressible */
    uint32_t flags, stored;
    memcpy(&flags, e + 16, 4);
    memcpy(&stored, e + 12, 4);
    assert_int_equal(flags, 0);         /* it was LZ4-compressed */
    uint64_t off;
    memcpy(&off, e, 8);
    assert_int_equal(off, meta);
    /* truncate the LZ4 stream's last literal run by garbling its last byte and
     * the token of the first sequence */
    b.bytes[off] ^= 0xF0;
    b.bytes[off + stored - 1] ^= 0x7F;
    uint64_t h = XXH64(b.bytes + off, stored, 0);
    memcpy(e + 24, &h, 8);
    h = XXH64(b.bytes, meta - 8, 0);
    memcpy(b.bytes + meta - 8, &h, 8);
    tu_write_file(b.path, b.bytes, b.n);
    kp_err err = {0};
    assert_int_equal(blob_read_meta(b.path, NULL, NULL, NULL, NULL, &err), 0);
    assert_int_equal(blob_read_kv(b.path, FP_A, b.target, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "layer 0 K chunk 0"));
    assert_int_equal(b.target->n_pos, 9);
    small_blob_free(&b);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_chunk_sizes),
        cmocka_unit_test(test_mismatch),
        cmocka_unit_test(test_corrupt_every_byte),
        cmocka_unit_test(test_truncate_and_extend),
        cmocka_unit_test(test_bad_lz4_with_valid_checksums),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("blob", tests, NULL, NULL);
}
