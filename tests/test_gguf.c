/*
 * test_gguf.c — the GGUF reader and writer (engine/gguf.h) and synthetic
 * models (engine/synth.h).
 *
 * What is checked and why
 *   - Real files from ../shared open and give the facts golden/README.md
 *     states (so the reader agrees with llama.cpp's writer).
 *   - The writer round-trips every metadata type, arrays of every element
 *     type and tensors of several types, in memory and through a file.
 *   - Crafted bad files (a valid writer-made buffer with one field mutated)
 *     are refused with the right code and a message naming the field; every
 *     truncation of a valid file and random byte flips are refused or parsed
 *     without a crash (run under ASan/UBSan to make "no crash" meaningful:
 *     every buffer is malloc'd to its exact size so overreads are caught).
 *   - Synthetic models have the tensor names and shapes of the real models
 *     of the same architecture (stories260K, tiny-qwen2, tiny-gpt2) and the
 *     size synth_size() predicts.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <dirent.h>
#include <sys/stat.h>
#include <unistd.h>

#include "tests/testutil.h"

#include "engine/gguf.h"
#include "engine/synth.h"
#include "kernels/types.h"

/* ------------------------------------------------------------------------ */
/* helpers                                                                   */
/* ------------------------------------------------------------------------ */

static int64_t get_int(const gguf_file *f, const char *key) {
    int64_t v = -12345;
    kp_err e = {0};
    int rc = gguf_get_int(f, key, &v, &e);
    if (rc) fail_msg("key %s: %s", key, e.msg);
    return v;
}

static void assert_str_key(const gguf_file *f, const char *key, const char *want) {
    const char *s;
    size_t n;
    kp_err e = {0};
    int rc = gguf_get_str(f, key, &s, &n, &e);
    if (rc) fail_msg("key %s: %s", key, e.msg);
    assert_int_equal(n, strlen(want));
    assert_memory_equal(s, want, n);
}

static uint64_t rng_next(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static void rand_bytes(uint8_t *p, size_t n, uint64_t *s) {
    for (size_t i = 0; i < n; i++) p[i] = (uint8_t)rng_next(s);
}

/* Open a private exact-size copy (so ASan sees any overread). */
static int open_copy(const uint8_t *buf, size_t n, gguf_file **f, kp_err *e) {
    uint8_t *c = malloc(n ? n : 1);
    assert_non_null(c);
    if (n) memcpy(c, buf, n);
    int rc = gguf_open_mem(f, c, n, e);
    if (rc == 0) {
        /* the file keeps pointing into c: touch everything, then free */
        const gguf_file *g = *f;
        volatile uint64_t sink = 0;
        for (int64_t i = 0; i < gguf_n_kv(g); i++) {
            const char *k = gguf_key(g, i);
            sink += strlen(k);
            if (gguf_kv_type(g, i) == GGUF_VT_ARRAY) {
                gguf_arr a;
                assert_int_equal(gguf_get_arr(g, k, &a, NULL), 0);
                for (uint64_t j = 0; j < a.n; j++) {
                    if (a.type == GGUF_VT_STRING) {
                        const char *s;
                        size_t len;
                        gguf_arr_get_str(&a, j, &s, &len);
                        if (len) sink += (uint8_t)s[0] + (uint8_t)s[len - 1];
                    } else {
                        sink += (uint64_t)gguf_arr_get_int(&a, j);
                    }
                }
            } else if (gguf_kv_type(g, i) == GGUF_VT_STRING) {
                char *d = gguf_get_str_dup(g, k);
                assert_non_null(d);
                free(d);
            } else {
                double x;
                (void)gguf_get_float(g, k, &x, NULL);
            }
            assert_int_equal(gguf_find_key(g, k), i);
        }
        for (int64_t i = 0; i < gguf_n_tensors(g); i++) {
            const gguf_tensor *t = gguf_tensor_at(g, i);
            const uint8_t *d = t->data;
            sink += d[0] + d[t->nbytes - 1];
            assert_ptr_equal(gguf_find_tensor(g, t->name), t);
        }
        (void)sink;
        gguf_close(*f);
        *f = NULL;
    }
    free(c);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* real files                                                                */
/* ------------------------------------------------------------------------ */

static void test_stories260k(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *path = tu_shared_path("models/stories260K.gguf");
    gguf_file *f = NULL;
    kp_err e = {0};
    int rc = gguf_open(&f, path, &e);
    if (rc) fail_msg("%s", e.msg);
    assert_int_equal(gguf_file_size(f), 1185376);
    assert_string_equal(gguf_path(f), path);
    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_alignment(f), 32);
    assert_str_key(f, "general.architecture", "llama");
    assert_str_key(f, "tokenizer.ggml.model", "llama");
    assert_int_equal(get_int(f, "llama.block_count"), 5);
    assert_int_equal(get_int(f, "llama.embedding_length"), 64);
    assert_int_equal(get_int(f, "llama.attention.head_count"), 8);
    assert_int_equal(get_int(f, "llama.attention.head_count_kv"), 4);
    assert_int_equal(get_int(f, "llama.feed_forward_length"), 172);
    assert_int_equal(get_int(f, "llama.rope.dimension_count"), 8);
    assert_int_equal(get_int(f, "tokenizer.ggml.bos_token_id"), 1);
    assert_int_equal(get_int(f, "tokenizer.ggml.eos_token_id"), 2);
    double eps;
    assert_int_equal(gguf_get_float(f, "llama.attention.layer_norm_rms_epsilon", &eps, NULL), 0);
    assert_true(fabs(eps - 1e-5) < 1e-12);
    /* absent key and wrong type */
    int64_t v;
    assert_int_equal(gguf_get_int(f, "llama.rope.freq_base", &v, &e), KP_ENOTFOUND);
    assert_non_null(strstr(e.msg, "llama.rope.freq_base"));
    assert_int_equal(gguf_get_int(f, "general.architecture", &v, &e), KP_EFORMAT);
    assert_non_null(strstr(e.msg, "general.architecture"));
    assert_non_null(strstr(e.msg, "string"));
    const char *s;
    size_t n;
    assert_int_equal(gguf_get_str(f, "llama.block_count", &s, &n, &e), KP_EFORMAT);
    assert_null(gguf_get_str_dup(f, "llama.block_count"));
    char *arch = gguf_get_str_dup(f, "general.architecture");
    assert_string_equal(arch, "llama");
    free(arch);
    bool b;
    assert_int_equal(gguf_get_bool(f, "llama.block_count", &b, NULL), 0);
    assert_true(b);

    /* vocabulary */
    gguf_arr a;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", &a, NULL), 0);
    assert_int_equal(a.type, GGUF_VT_STRING);
    assert_int_equal(a.n, 512);
    gguf_arr_get_str(&a, 1, &s, &n);
    assert_int_equal(n, 3);
    assert_memory_equal(s, "<s>", 3);
    gguf_arr_get_str(&a, 3, &s, &n);
    assert_int_equal(n, 6);
    assert_memory_equal(s, "<0x00>", 6);
    gguf_arr_get_str(&a, 258, &s, &n);
    assert_memory_equal(s, "<0xFF>", 6);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.scores", &a, NULL), 0);
    assert_int_equal(a.type, GGUF_VT_FLOAT32);
    assert_int_equal(a.n, 512);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", &a, NULL), 0);
    assert_int_equal(a.type, GGUF_VT_INT32);
    assert_int_equal(gguf_arr_get_int(&a, 3), 6); /* byte token */
    assert_int_equal(gguf_get_arr(f, "general.architecture", &a, &e), KP_EFORMAT);

    /* tensors */
    assert_int_equal(gguf_n_tensors(f), 48);
    const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
    assert_non_null(t);
    assert_int_equal(t->type, KP_TYPE_F32);
    assert_int_equal(t->n_dims, 2);
    assert_int_equal(t->ne[0], 64);
    assert_int_equal(t->ne[1], 512);
    assert_int_equal(t->ne[2], 1);
    assert_int_equal(t->n_elements, 64 * 512);
    assert_int_equal(t->nbytes, 64 * 512 * 4);
    t = gguf_find_tensor(f, "blk.4.ffn_down.weight");
    assert_non_null(t);
    assert_int_equal(t->ne[0], 172);
    assert_int_equal(t->ne[1], 64);
    assert_non_null(gguf_find_tensor(f, "output.weight"));
    assert_null(gguf_find_tensor(f, "blk.5.ffn_down.weight"));
    assert_null(gguf_find_tensor(f, ""));
    /* norm weights of a trained model: finite and mostly positive */
    t = gguf_find_tensor(f, "output_norm.weight");
    assert_int_equal(t->n_dims, 1);
    float w[64];
    memcpy(w, t->data, sizeof w);
    for (int i = 0; i < 64; i++) assert_true(isfinite(w[i]));
    gguf_close(f);
    free(path);
}

/* Every model and vocabulary file in ../shared opens; a few facts each. */
static void check_dir(const char *rel, int *n_files) {
    char *dir = tu_shared_path(rel);
    DIR *d = opendir(dir);
    if (!d) {
        free(dir);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d))) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".gguf") != 0) continue;
        char path[4096];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        gguf_file *f = NULL;
        kp_err e = {0};
        int rc = gguf_open(&f, path, &e);
        if (rc) fail_msg("%s: %s", path, e.msg);
        (*n_files)++;
        char *arch = gguf_get_str_dup(f, "general.architecture");
        assert_non_null(arch);
        gguf_arr a;
        assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", &a, NULL), 0);
        assert_true(a.n >= 256);
        if (strncmp(de->d_name, "tiny-", 5) == 0) {
            char key[128];
            snprintf(key, sizeof key, "%s.block_count", arch);
            assert_int_equal(get_int(f, key), 2);
            const gguf_tensor *t = gguf_find_tensor(f, "token_embd.weight");
            assert_non_null(t);
            assert_int_equal(t->ne[1], a.n);
        }
        if (strcmp(de->d_name, "tiny-gpt2.gguf") == 0 || strcmp(de->d_name, "tiny-qwen2.gguf") == 0) {
            assert_int_equal(a.n, 50257);
            assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.merges", &a, NULL), 0);
            assert_int_equal(a.n, 50000);
            const char *s;
            size_t n;
            gguf_arr_get_str(&a, 1, &s, &n);
            assert_int_equal(n, 4);
            assert_memory_equal(s, "\xc4\xa0" " a", 4); /* "Ġ a" */
        }
        if (strcmp(de->d_name, "tiny-llama-256-Q4_K_M.gguf") == 0) {
            assert_int_equal(gguf_find_tensor(f, "output.weight")->type, KP_TYPE_Q6_K);
            assert_int_equal(gguf_find_tensor(f, "blk.0.attn_q.weight")->type, KP_TYPE_Q4_K);
            assert_int_equal(gguf_find_tensor(f, "blk.0.attn_norm.weight")->type, KP_TYPE_F32);
        }
        /* every tensor lies inside the file, aligned */
        for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
            const gguf_tensor *t = gguf_tensor_at(f, i);
            assert_true(t->offset % gguf_alignment(f) == 0);
            assert_int_equal(t->nbytes, kp_type_row_bytes(t->type, t->ne[0]) * (size_t)(t->n_elements / t->ne[0]));
        }
        assert_null(gguf_tensor_at(f, gguf_n_tensors(f)));
        assert_null(gguf_tensor_at(f, -1));
        free(arch);
        gguf_close(f);
    }
    closedir(d);
    free(dir);
}

static void test_all_shared_files(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models");
    int n = 0;
    check_dir("models", &n);
    check_dir("golden/vocab", &n);
    assert_true(n >= 10);
}

static void test_open_errors(void **state) {
    (void)state;
    gguf_file *f = NULL;
    kp_err e = {0};
    assert_int_equal(gguf_open(&f, "/nonexistent/dir/x.gguf", &e), KP_ENOTFOUND);
    assert_non_null(strstr(e.msg, "/nonexistent/dir/x.gguf"));
    assert_null(f);
    char *dir = tu_tmpdir();
    assert_int_equal(gguf_open(&f, dir, &e), KP_EIO);
    char path[4096];
    snprintf(path, sizeof path, "%s/empty.gguf", dir);
    FILE *fp = fopen(path, "wb");
    assert_non_null(fp);
    fclose(fp);
    assert_int_equal(gguf_open(&f, path, &e), KP_EFORMAT);
    assert_non_null(strstr(e.msg, "empty.gguf"));
    unlink(path);
    rmdir(dir);
    free(dir);
    assert_int_equal(gguf_open_mem(&f, NULL, 0, &e), KP_EFORMAT);
}

/* ------------------------------------------------------------------------ */
/* writer round trip                                                         */
/* ------------------------------------------------------------------------ */

/* Tensor data produced by a callback: byte i of tensor k is (i*7 + k) & 255. */
static int fill_pattern(void *ctx, int64_t index, void *dst, uint64_t offset, size_t nbytes, kp_err *err) {
    (void)err;
    int *calls = ctx;
    (*calls)++;
    uint8_t *d = dst;
    for (size_t i = 0; i < nbytes; i++) d[i] = (uint8_t)((offset + i) * 7 + (uint64_t)index);
    return 0;
}

static int fill_fail(void *ctx, int64_t index, void *dst, uint64_t offset, size_t nbytes, kp_err *err) {
    (void)ctx; (void)index; (void)dst; (void)offset; (void)nbytes;
    return kp_errf(err, KP_EIO, "fill_fail: disk on fire");
}

typedef struct rt_tensor {
    const char *name;
    int type;
    int n_dims;
    int64_t ne[4];
} rt_tensor;

static const rt_tensor rt_tensors[] = {
    {"t.f32", KP_TYPE_F32, 2, {8, 3, 1, 1}},
    {"t.f16", KP_TYPE_F16, 3, {6, 2, 2, 1}},
    {"t.bf16", KP_TYPE_BF16, 1, {5, 1, 1, 1}},
    {"t.q8_0", KP_TYPE_Q8_0, 2, {64, 3, 1, 1}},
    {"t.q4_0", KP_TYPE_Q4_0, 4, {32, 2, 1, 2}},
    {"t.q4_K", KP_TYPE_Q4_K, 2, {256, 2, 1, 1}},
    {"t.q6_K", KP_TYPE_Q6_K, 2, {512, 1, 1, 1}},
    {"t.cb", KP_TYPE_Q8_0, 2, {32, 1000, 1, 1}}, /* filled by callback */
};

static gguf_writer *make_roundtrip_writer(uint8_t **datas, int *fill_calls, uint32_t alignment) {
    gguf_writer *w = gguf_writer_new();
    assert_non_null(w);
    uint8_t u8 = 200; int8_t i8 = -100; uint16_t u16 = 60000; int16_t i16 = -30000;
    int64_t i64 = -((int64_t)1 << 40); double f64 = 3.141592653589793; uint8_t bo = 1;
    assert_int_equal(gguf_set_val(w, "v.u8", GGUF_VT_UINT8, &u8), 0);
    assert_int_equal(gguf_set_val(w, "v.i8", GGUF_VT_INT8, &i8), 0);
    assert_int_equal(gguf_set_val(w, "v.u16", GGUF_VT_UINT16, &u16), 0);
    assert_int_equal(gguf_set_val(w, "v.i16", GGUF_VT_INT16, &i16), 0);
    assert_int_equal(gguf_set_u32(w, "v.u32", 4000000000u), 0);
    assert_int_equal(gguf_set_i32(w, "v.i32", -2000000000), 0);
    assert_int_equal(gguf_set_f32(w, "v.f32", 0.25f), 0);
    assert_int_equal(gguf_set_bool(w, "v.bool", true), 0);
    assert_int_equal(gguf_set_val(w, "v.bool2", GGUF_VT_BOOL, &bo), 0);
    assert_int_equal(gguf_set_str(w, "v.str", "h\xc3\xa9llo"), 0);
    assert_int_equal(gguf_set_str(w, "v.empty", ""), 0);
    assert_int_equal(gguf_set_u64(w, "v.u64", 18446744073709551615ull), 0);
    assert_int_equal(gguf_set_val(w, "v.i64", GGUF_VT_INT64, &i64), 0);
    assert_int_equal(gguf_set_val(w, "v.f64", GGUF_VT_FLOAT64, &f64), 0);
    /* replace: same key, new type and value */
    assert_int_equal(gguf_set_u32(w, "v.replaced", 1), 0);
    assert_int_equal(gguf_set_str(w, "v.replaced", "second"), 0);
    /* bad arguments */
    assert_int_equal(gguf_set_val(w, "v.bad", GGUF_VT_STRING, "x"), KP_EINVAL);
    assert_int_equal(gguf_set_val(w, "v.bad", GGUF_VT_ARRAY, "x"), KP_EINVAL);
    uint8_t two = 2;
    assert_int_equal(gguf_set_val(w, "v.bad", GGUF_VT_BOOL, &two), KP_EINVAL);
    assert_int_equal(gguf_set_u32(w, "", 1), KP_EINVAL);
    assert_int_equal(gguf_set_arr(w, "v.bad", GGUF_VT_STRING, "x", 1), KP_EINVAL);

    /* arrays of every element type */
    uint8_t a_u8[] = {0, 1, 255};
    int8_t a_i8[] = {-128, 0, 127};
    uint16_t a_u16[] = {0, 65535};
    int16_t a_i16[] = {-32768, 32767, 5};
    uint32_t a_u32[] = {4294967295u, 7};
    int32_t a_i32[] = {-5, 6, 7, -2147483647 - 1};
    float a_f32[] = {1.5f, -2.25f, 1e30f};
    uint8_t a_bool[] = {1, 0, 1, 1};
    uint64_t a_u64[] = {1ull << 63, 3};
    int64_t a_i64[] = {INT64_MIN, INT64_MAX, 0};
    double a_f64[] = {1e-300, -0.5};
    assert_int_equal(gguf_set_arr(w, "a.u8", GGUF_VT_UINT8, a_u8, 3), 0);
    assert_int_equal(gguf_set_arr(w, "a.i8", GGUF_VT_INT8, a_i8, 3), 0);
    assert_int_equal(gguf_set_arr(w, "a.u16", GGUF_VT_UINT16, a_u16, 2), 0);
    assert_int_equal(gguf_set_arr(w, "a.i16", GGUF_VT_INT16, a_i16, 3), 0);
    assert_int_equal(gguf_set_arr(w, "a.u32", GGUF_VT_UINT32, a_u32, 2), 0);
    assert_int_equal(gguf_set_arr(w, "a.i32", GGUF_VT_INT32, a_i32, 4), 0);
    assert_int_equal(gguf_set_arr(w, "a.f32", GGUF_VT_FLOAT32, a_f32, 3), 0);
    assert_int_equal(gguf_set_arr(w, "a.bool", GGUF_VT_BOOL, a_bool, 4), 0);
    assert_int_equal(gguf_set_arr(w, "a.u64", GGUF_VT_UINT64, a_u64, 2), 0);
    assert_int_equal(gguf_set_arr(w, "a.i64", GGUF_VT_INT64, a_i64, 3), 0);
    assert_int_equal(gguf_set_arr(w, "a.f64", GGUF_VT_FLOAT64, a_f64, 2), 0);
    assert_int_equal(gguf_set_arr(w, "a.empty", GGUF_VT_INT32, NULL, 0), 0);
    const char *strs[] = {"", "a", "\xe2\x96\x81hello", "with\nnewline"};
    assert_int_equal(gguf_set_arr_str(w, "a.str", strs, 4), 0);
    assert_int_equal(gguf_set_arr_str(w, "a.str0", NULL, 0), 0);
    if (alignment) assert_int_equal(gguf_set_u32(w, "general.alignment", alignment), 0);

    uint64_t seed = 42;
    kp_err e = {0};
    for (size_t i = 0; i < KP_ARRAY_LEN(rt_tensors); i++) {
        const rt_tensor *r = &rt_tensors[i];
        size_t nbytes = kp_type_row_bytes(r->type, r->ne[0]) * (size_t)(r->ne[1] * r->ne[2] * r->ne[3]);
        datas[i] = malloc(nbytes);
        assert_non_null(datas[i]);
        if (strcmp(r->name, "t.cb") == 0) {
            fill_pattern(&(int){0}, (int64_t)i, datas[i], 0, nbytes, NULL);
            int rc = gguf_add_tensor_cb(w, r->name, r->type, r->n_dims, r->ne, fill_pattern, fill_calls, &e);
            if (rc) fail_msg("%s", e.msg);
        } else {
            rand_bytes(datas[i], nbytes, &seed);
            /* the first half borrowed, the second copied */
            int rc = gguf_add_tensor(w, r->name, r->type, r->n_dims, r->ne, datas[i], i < 3, &e);
            if (rc) fail_msg("%s", e.msg);
        }
    }
    /* bad tensors are refused at add time */
    int64_t ne[4] = {33, 1, 1, 1};
    uint8_t junk[256] = {0};
    assert_int_equal(gguf_add_tensor(w, "bad", KP_TYPE_Q8_0, 1, ne, junk, true, &e), KP_EINVAL);
    assert_non_null(strstr(e.msg, "block size"));
    assert_int_equal(gguf_add_tensor(w, "bad", 99, 1, ne, junk, true, &e), KP_EUNSUP);
    assert_int_equal(gguf_add_tensor(w, "bad", KP_TYPE_F32, 0, ne, junk, true, &e), KP_EINVAL);
    assert_int_equal(gguf_add_tensor(w, "bad", KP_TYPE_F32, 5, ne, junk, true, &e), KP_EINVAL);
    assert_int_equal(gguf_add_tensor(w, "t.f32", KP_TYPE_F32, 1, ne, junk, true, &e), KP_EINVAL);
    assert_non_null(strstr(e.msg, "duplicate"));
    ne[0] = 0;
    assert_int_equal(gguf_add_tensor(w, "bad", KP_TYPE_F32, 1, ne, junk, true, &e), KP_EINVAL);
    return w;
}

static void check_roundtrip(const gguf_file *f, uint8_t **datas, uint32_t alignment) {
    int64_t v;
    double d;
    bool b;
    assert_int_equal(gguf_version(f), 3);
    assert_int_equal(gguf_alignment(f), alignment ? alignment : 32);
    assert_int_equal(gguf_n_kv(f), 29 + (alignment ? 1 : 0));
    assert_int_equal(get_int(f, "v.u8"), 200);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.u8")), GGUF_VT_UINT8);
    assert_int_equal(get_int(f, "v.i8"), -100);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.i8")), GGUF_VT_INT8);
    assert_int_equal(get_int(f, "v.u16"), 60000);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.u16")), GGUF_VT_UINT16);
    assert_int_equal(get_int(f, "v.i16"), -30000);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.i16")), GGUF_VT_INT16);
    assert_int_equal(get_int(f, "v.u32"), 4000000000ll);
    assert_int_equal(get_int(f, "v.i32"), -2000000000);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.i64")), GGUF_VT_INT64);
    assert_true(get_int(f, "v.i64") == -((int64_t)1 << 40));
    assert_int_equal(gguf_get_float(f, "v.f32", &d, NULL), 0);
    assert_true(d == 0.25);
    assert_int_equal(gguf_get_float(f, "v.f64", &d, NULL), 0);
    assert_true(d == 3.141592653589793);
    assert_int_equal(gguf_get_float(f, "v.i32", &d, NULL), 0); /* integers convert */
    assert_true(d == -2000000000.0);
    kp_err e = {0};
    assert_int_equal(gguf_get_int(f, "v.f32", &v, &e), KP_EFORMAT);
    assert_non_null(strstr(e.msg, "v.f32"));
    assert_non_null(strstr(e.msg, "f32"));
    /* u64 above INT64_MAX does not fit an int64 */
    assert_int_equal(gguf_get_int(f, "v.u64", &v, &e), KP_EFORMAT);
    assert_non_null(strstr(e.msg, "v.u64"));
    assert_int_equal(gguf_get_float(f, "v.u64", &d, NULL), 0);
    assert_true(d == 18446744073709551615.0);
    assert_int_equal(gguf_get_bool(f, "v.bool", &b, NULL), 0);
    assert_true(b);
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.bool")), GGUF_VT_BOOL);
    assert_int_equal(gguf_get_bool(f, "v.i8", &b, NULL), 0);
    assert_true(b);
    assert_int_equal(gguf_get_bool(f, "v.str", &b, &e), KP_EFORMAT);
    assert_int_equal(gguf_get_bool(f, "v.f64", &b, &e), KP_EFORMAT);
    assert_str_key(f, "v.str", "h\xc3\xa9llo");
    assert_str_key(f, "v.empty", "");
    assert_str_key(f, "v.replaced", "second");
    assert_int_equal(gguf_kv_type(f, gguf_find_key(f, "v.replaced")), GGUF_VT_STRING);
    assert_int_equal(gguf_find_key(f, "v.bad"), -1);
    assert_int_equal(gguf_find_key(f, "v.u"), -1);
    assert_int_equal(gguf_kv_type(f, -1), GGUF_VT_COUNT);
    assert_null(gguf_key(f, gguf_n_kv(f)));
    /* keys keep insertion order */
    assert_string_equal(gguf_key(f, 0), "v.u8");

    gguf_arr a;
    assert_int_equal(gguf_get_arr(f, "a.u8", &a, NULL), 0);
    assert_int_equal(a.type, GGUF_VT_UINT8);
    assert_int_equal(a.n, 3);
    assert_int_equal(gguf_arr_get_int(&a, 2), 255);
    assert_int_equal(gguf_get_arr(f, "a.i8", &a, NULL), 0);
    assert_int_equal(gguf_arr_get_int(&a, 0), -128);
    assert_int_equal(gguf_get_arr(f, "a.u16", &a, NULL), 0);
    assert_int_equal(gguf_arr_get_int(&a, 1), 65535);
    assert_int_equal(gguf_get_arr(f, "a.i16", &a, NULL), 0);
    assert_int_equal(gguf_arr_get_int(&a, 0), -32768);
    assert_int_equal(gguf_arr_get_int(&a, 2), 5);
    assert_int_equal(gguf_get_arr(f, "a.u32", &a, NULL), 0);
    assert_int_equal(gguf_arr_get_int(&a, 0), 4294967295ll);
    assert_int_equal(gguf_get_arr(f, "a.i32", &a, NULL), 0);
    assert_int_equal(a.n, 4);
    assert_int_equal(gguf_arr_get_int(&a, 3), -2147483648ll);
    assert_true(gguf_arr_get_float(&a, 0) == -5.0);
    assert_int_equal(gguf_get_arr(f, "a.f32", &a, NULL), 0);
    assert_true(gguf_arr_get_float(&a, 1) == -2.25);
    assert_true(gguf_arr_get_float(&a, 2) == (double)1e30f);
    assert_int_equal(gguf_get_arr(f, "a.bool", &a, NULL), 0);
    assert_int_equal(a.type, GGUF_VT_BOOL);
    assert_int_equal(gguf_arr_get_int(&a, 0) * 1000 + gguf_arr_get_int(&a, 1) * 100 + gguf_arr_get_int(&a, 3), 1001);
    assert_int_equal(gguf_get_arr(f, "a.u64", &a, NULL), 0);
    assert_true((uint64_t)gguf_arr_get_int(&a, 0) == 1ull << 63);
    assert_int_equal(gguf_get_arr(f, "a.i64", &a, NULL), 0);
    assert_true(gguf_arr_get_int(&a, 0) == INT64_MIN);
    assert_true(gguf_arr_get_int(&a, 1) == INT64_MAX);
    assert_int_equal(gguf_get_arr(f, "a.f64", &a, NULL), 0);
    assert_true(gguf_arr_get_float(&a, 0) == 1e-300);
    assert_int_equal(gguf_get_arr(f, "a.empty", &a, NULL), 0);
    assert_int_equal(a.n, 0);
    assert_int_equal(a.type, GGUF_VT_INT32);
    assert_int_equal(gguf_get_arr(f, "a.str0", &a, NULL), 0);
    assert_int_equal(a.n, 0);
    assert_int_equal(a.type, GGUF_VT_STRING);
    assert_int_equal(gguf_get_arr(f, "a.str", &a, NULL), 0);
    assert_int_equal(a.n, 4);
    const char *want[] = {"", "a", "\xe2\x96\x81hello", "with\nnewline"};
    for (int i = 3; i >= 0; i--) { /* random access, not just sequential */
        const char *s;
        size_t n;
        gguf_arr_get_str(&a, (uint64_t)i, &s, &n);
        assert_int_equal(n, strlen(want[i]));
        assert_memory_equal(s, want[i], n);
    }
    assert_int_equal(gguf_get_arr(f, "v.u8", &a, &e), KP_EFORMAT);
    assert_int_equal(gguf_get_arr(f, "nope", &a, &e), KP_ENOTFOUND);

    assert_int_equal(gguf_n_tensors(f), KP_ARRAY_LEN(rt_tensors));
    for (size_t i = 0; i < KP_ARRAY_LEN(rt_tensors); i++) {
        const rt_tensor *r = &rt_tensors[i];
        const gguf_tensor *t = gguf_tensor_at(f, (int64_t)i);
        assert_string_equal(t->name, r->name);
        assert_ptr_equal(gguf_find_tensor(f, r->name), t);
        assert_int_equal(t->type, r->type);
        assert_int_equal(t->n_dims, r->n_dims);
        for (int k = 0; k < 4; k++) assert_int_equal(t->ne[k], r->ne[k]);
        assert_int_equal(t->n_elements, r->ne[0] * r->ne[1] * r->ne[2] * r->ne[3]);
        assert_int_equal(t->nbytes, kp_type_row_bytes(r->type, r->ne[0]) * (size_t)(t->n_elements / r->ne[0]));
        assert_true(t->offset % gguf_alignment(f) == 0);
        assert_memory_equal(t->data, datas[i], t->nbytes);
    }
}

static void test_roundtrip_mem_and_file(void **state) {
    (void)state;
    uint32_t aligns[] = {0, 64, 1, 4096};
    for (size_t ai = 0; ai < KP_ARRAY_LEN(aligns); ai++) {
        uint8_t *datas[KP_ARRAY_LEN(rt_tensors)];
        int fill_calls = 0;
        gguf_writer *w = make_roundtrip_writer(datas, &fill_calls, aligns[ai]);
        uint8_t *buf = NULL;
        size_t size = 0;
        kp_err e = {0};
        int rc = gguf_writer_write_mem(w, &buf, &size, &e);
        if (rc) fail_msg("%s", e.msg);
        uint64_t predicted = 0;
        assert_int_equal(gguf_writer_size(w, &predicted, NULL), 0);
        assert_int_equal(predicted, size);
        assert_true(fill_calls >= 1);
        gguf_file *f = NULL;
        rc = gguf_open_mem(&f, buf, size, &e);
        if (rc) fail_msg("%s", e.msg);
        assert_string_equal(gguf_path(f), "");
        check_roundtrip(f, datas, aligns[ai]);
        gguf_close(f);

        /* through a file: same bytes, no .tmp left behind */
        char *dir = tu_tmpdir();
        char path[4096], tmp[8400];
        snprintf(path, sizeof path, "%s/rt.gguf", dir);
        snprintf(tmp, sizeof tmp, "%s.tmp", path);
        fill_calls = 0;
        rc = gguf_writer_write(w, path, &e);
        if (rc) fail_msg("%s", e.msg);
        assert_true(fill_calls >= 1);
        assert_int_not_equal(access(tmp, F_OK), 0);
        size_t flen = 0;
        char *fbuf = tu_read_file(path, &flen);
        assert_non_null(fbuf);
        assert_int_equal(flen, size);
        assert_memory_equal(fbuf, buf, size);
        free(fbuf);
        rc = gguf_open(&f, path, &e);
        if (rc) fail_msg("%s", e.msg);
        check_roundtrip(f, datas, aligns[ai]);
        gguf_close(f);

        /* a failing fill callback leaves no file and no temp file */
        char path2[4200];
        snprintf(path2, sizeof path2, "%s/fail.gguf", dir);
        int64_t ne[2] = {4, 4};
        assert_int_equal(gguf_add_tensor_cb(w, "t.fail", KP_TYPE_F32, 2, ne, fill_fail, NULL, &e), 0);
        assert_int_equal(gguf_writer_write(w, path2, &e), KP_EIO);
        assert_non_null(strstr(e.msg, "disk on fire"));
        assert_int_not_equal(access(path2, F_OK), 0);
        snprintf(tmp, sizeof tmp, "%s.tmp", path2);
        assert_int_not_equal(access(tmp, F_OK), 0);
        /* unwritable destination */
        snprintf(path2, sizeof path2, "%s/no/such/dir/x.gguf", dir);
        assert_int_equal(gguf_writer_write(w, path2, &e), KP_EIO);
        assert_non_null(strstr(e.msg, "no/such/dir"));

        unlink(path);
        rmdir(dir);
        free(dir);
        free(buf);
        gguf_writer_free(w);
        for (size_t i = 0; i < KP_ARRAY_LEN(rt_tensors); i++) free(datas[i]);
    }
    /* bad alignment values are refused by the writer */
    gguf_writer *w = gguf_writer_new();
    uint8_t *buf;
    size_t size;
    kp_err e = {0};
    assert_int_equal(gguf_set_u32(w, "general.alignment", 48), 0);
    assert_int_equal(gguf_writer_write_mem(w, &buf, &size, &e), KP_EINVAL);
    assert_non_null(strstr(e.msg, "alignment"));
    assert_int_equal(gguf_set_i32(w, "general.alignment", 32), 0);
    assert_int_equal(gguf_writer_write_mem(w, &buf, &size, &e), KP_EINVAL);
    gguf_writer_free(w);
    /* an empty writer gives a valid empty file */
    w = gguf_writer_new();
    assert_int_equal(gguf_writer_write_mem(w, &buf, &size, &e), 0);
    assert_int_equal(size, 32); /* 24-byte header padded to 32 */
    gguf_file *f;
    assert_int_equal(gguf_open_mem(&f, buf, 24, &e), 0); /* padding optional without tensors */
    assert_int_equal(gguf_n_kv(f) + gguf_n_tensors(f), 0);
    gguf_close(f);
    free(buf);
    gguf_writer_free(w);
}

/* ------------------------------------------------------------------------ */
/* crafted bad files                                                         */
/* ------------------------------------------------------------------------ */

/* The base file the mutations start from. Tensor "tC" is last and its size
 * is a multiple of 32, so the file has no trailing padding: every
 * truncation of it is invalid. */
static uint8_t *make_base(size_t *size, bool with_alignment) {
    gguf_writer *w = gguf_writer_new();
    assert_non_null(w);
    assert_int_equal(gguf_set_str(w, "general.architecture", "llama"), 0);
    assert_int_equal(gguf_set_u32(w, "test.k1", 7), 0);
    assert_int_equal(gguf_set_u32(w, "test.k2", 8), 0);
    assert_int_equal(gguf_set_bool(w, "test.flag", true), 0);
    int32_t ia[3] = {1, 2, 3};
    assert_int_equal(gguf_set_arr(w, "test.arr", GGUF_VT_INT32, ia, 3), 0);
    const char *sa[2] = {"xy", "zzz"};
    assert_int_equal(gguf_set_arr_str(w, "test.strs", sa, 2), 0);
    if (with_alignment) assert_int_equal(gguf_set_u32(w, "general.alignment", 32), 0);
    static uint8_t data[4096];
    for (size_t i = 0; i < sizeof data; i++) data[i] = (uint8_t)(i * 13 + 1);
    int64_t neA[2] = {8, 2}, neB[2] = {32, 2}, neC[1] = {16};
    assert_int_equal(gguf_add_tensor(w, "tA", KP_TYPE_F32, 2, neA, data, false, NULL), 0);
    assert_int_equal(gguf_add_tensor(w, "tB", KP_TYPE_Q8_0, 2, neB, data, false, NULL), 0);
    assert_int_equal(gguf_add_tensor(w, "tC", KP_TYPE_F16, 1, neC, data, false, NULL), 0);
    uint8_t *buf;
    assert_int_equal(gguf_writer_write_mem(w, &buf, size, NULL), 0);
    gguf_writer_free(w);
    return buf;
}

/* Offset of the first occurrence of a length-prefixed string s (its bytes). */
static size_t find_str(const uint8_t *buf, size_t size, const char *s) {
    size_t n = strlen(s);
    for (size_t i = 8; i + n <= size; i++) {
        uint64_t len;
        memcpy(&len, buf + i - 8, 8);
        if (len == n && memcmp(buf + i, s, n) == 0) return i;
    }
    fail_msg("string '%s' not in base file", s);
    return 0;
}

static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static uint64_t get_u64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Fields of tensor `name` in the base buffer. */
static size_t tinfo_ndims(const uint8_t *b, size_t n, const char *name) { return find_str(b, n, name) + strlen(name); }
static size_t tinfo_ne(const uint8_t *b, size_t n, const char *name, int d) { return tinfo_ndims(b, n, name) + 4 + 8 * (size_t)d; }
static size_t tinfo_type(const uint8_t *b, size_t n, const char *name, int n_dims) { return tinfo_ne(b, n, name, n_dims); }
static size_t tinfo_offset(const uint8_t *b, size_t n, const char *name, int n_dims) { return tinfo_type(b, n, name, n_dims) + 4; }
/* value type field / value of key k */
static size_t kv_type_at(const uint8_t *b, size_t n, const char *key) { return find_str(b, n, key) + strlen(key); }

static void expect_bad(const uint8_t *buf, size_t size, int code, const char *word, const char *label) {
    gguf_file *f = NULL;
    kp_err e = {0};
    int rc = open_copy(buf, size, &f, &e);
    if (rc != code) fail_msg("%s: expected code %d, got %d (%s)", label, code, rc, e.msg);
    assert_int_equal(e.code, code);
    if (!strstr(e.msg, word)) fail_msg("%s: message lacks '%s': %s", label, word, e.msg);
    if (strncmp(e.msg, "gguf: ", 6) != 0) fail_msg("%s: message lacks the 'gguf: ' prefix: %s", label, e.msg);
    assert_null(f);
}

static void test_bad_files(void **state) {
    (void)state;
    size_t n;
    uint8_t *base = make_base(&n, true);
    uint8_t *m = malloc(n);
    assert_non_null(m);
    gguf_file *f = NULL;
    kp_err e = {0};
    assert_int_equal(open_copy(base, n, &f, &e), 0); /* the base itself is valid */

#define MUT(label, code, word, stmt)           \
    do {                                       \
        memcpy(m, base, n);                    \
        stmt;                                  \
        expect_bad(m, n, code, word, label);   \
    } while (0)

    MUT("bad magic", KP_EFORMAT, "magic", m[0] = 'X');
    MUT("version 1", KP_EUNSUP, "version 1", put_u32(m + 4, 1));
    MUT("version 99", KP_EUNSUP, "version 99", put_u32(m + 4, 99));
    MUT("version 0", KP_EUNSUP, "version", put_u32(m + 4, 0));
    MUT("big-endian", KP_EUNSUP, "big-endian", put_u32(m + 4, 0x03000000u));
    MUT("n_tensors huge", KP_EFORMAT, "n_tensors", put_u64(m + 8, 1ull << 60));
    MUT("n_tensors max", KP_EFORMAT, "n_tensors", put_u64(m + 8, UINT64_MAX));
    MUT("n_kv huge", KP_EFORMAT, "n_kv", put_u64(m + 16, 1ull << 40));
    MUT("n_kv max", KP_EFORMAT, "n_kv", put_u64(m + 16, UINT64_MAX));
    MUT("n_kv too many", KP_EFORMAT, "kv", put_u64(m + 16, 9)); /* reads tensor infos as kvs */
    MUT("key length huge", KP_EFORMAT, "string length", put_u64(m + find_str(m, n, "test.k1") - 8, 1ull << 40));
    MUT("key length max", KP_EFORMAT, "string length", put_u64(m + find_str(m, n, "test.k1") - 8, UINT64_MAX));
    MUT("string value length huge", KP_EFORMAT, "string length",
        put_u64(m + kv_type_at(m, n, "general.architecture") + 4, UINT64_MAX - 3));
    MUT("empty key", KP_EFORMAT, "empty", put_u64(m + find_str(m, n, "test.k1") - 8, 0));
    MUT("NUL in key", KP_EFORMAT, "NUL", m[find_str(m, n, "test.k1") + 5] = 0);
    MUT("duplicate key", KP_EFORMAT, "duplicate key", m[find_str(m, n, "test.k2") + 6] = '1');
    MUT("unknown value type", KP_EFORMAT, "value type", put_u32(m + kv_type_at(m, n, "test.k1"), 13));
    MUT("unknown value type max", KP_EFORMAT, "value type", put_u32(m + kv_type_at(m, n, "test.k1"), UINT32_MAX));
    MUT("bool value 2", KP_EFORMAT, "bool", m[kv_type_at(m, n, "test.flag") + 4] = 2);
    MUT("array count huge", KP_EFORMAT, "array count", put_u64(m + kv_type_at(m, n, "test.arr") + 8, 1ull << 50));
    MUT("array count max", KP_EFORMAT, "array count", put_u64(m + kv_type_at(m, n, "test.arr") + 8, UINT64_MAX));
    MUT("string array count huge", KP_EFORMAT, "array count",
        put_u64(m + kv_type_at(m, n, "test.strs") + 8, 1ull << 61));
    MUT("string in array too long", KP_EFORMAT, "array string 1",
        put_u64(m + find_str(m, n, "zzz") - 8, 1ull << 33));
    MUT("nested array", KP_EFORMAT, "nested array", put_u32(m + kv_type_at(m, n, "test.arr") + 4, GGUF_VT_ARRAY));
    MUT("unknown array element type", KP_EFORMAT, "element type",
        put_u32(m + kv_type_at(m, n, "test.arr") + 4, 77));
    MUT("alignment not power of two", KP_EFORMAT, "alignment",
        put_u32(m + kv_type_at(m, n, "general.alignment") + 4, 48));
    MUT("alignment zero", KP_EFORMAT, "alignment", put_u32(m + kv_type_at(m, n, "general.alignment") + 4, 0));
    MUT("alignment too big", KP_EFORMAT, "alignment",
        put_u32(m + kv_type_at(m, n, "general.alignment") + 4, 1u << 21));
    MUT("alignment wrong type", KP_EFORMAT, "alignment must be a u32",
        put_u32(m + kv_type_at(m, n, "general.alignment"), GGUF_VT_INT32));
    MUT("n_dims 0", KP_EFORMAT, "n_dims", put_u32(m + tinfo_ndims(m, n, "tA"), 0));
    MUT("n_dims 5", KP_EFORMAT, "n_dims", put_u32(m + tinfo_ndims(m, n, "tA"), 5));
    MUT("zero dim", KP_EFORMAT, "ne[1]", put_u64(m + tinfo_ne(m, n, "tA", 1), 0));
    MUT("negative dim", KP_EFORMAT, "ne[0]", put_u64(m + tinfo_ne(m, n, "tA", 0), 1ull << 63));
    MUT("dims overflow", KP_EFORMAT, "overflow", {
        put_u64(m + tinfo_ne(m, n, "tA", 0), 1ull << 40);
        put_u64(m + tinfo_ne(m, n, "tA", 1), 1ull << 40);
    });
    MUT("dims too big for file", KP_EFORMAT, "larger than the whole file", put_u64(m + tinfo_ne(m, n, "tA", 1), 1ull << 40));
    MUT("row not multiple of block", KP_EFORMAT, "block size", put_u64(m + tinfo_ne(m, n, "tB", 0), 33));
    MUT("unknown tensor type", KP_EUNSUP, "tensor type 99", put_u32(m + tinfo_type(m, n, "tA", 2), 99));
    MUT("unknown tensor type names tensor", KP_EUNSUP, "'tA'", put_u32(m + tinfo_type(m, n, "tA", 2), 99));
    MUT("removed tensor type 4", KP_EUNSUP, "type 4", put_u32(m + tinfo_type(m, n, "tA", 2), 4));
    MUT("misaligned offset", KP_EFORMAT, "alignment", {
        size_t o = tinfo_offset(m, n, "tB", 2);
        put_u64(m + o, get_u64(m + o) + 1);
    });
    MUT("offset past end", KP_EFORMAT, "past the end", put_u64(m + tinfo_offset(m, n, "tC", 1), 1ull << 40));
    MUT("offset max", KP_EFORMAT, "offset", put_u64(m + tinfo_offset(m, n, "tC", 1), UINT64_MAX - 31));
    MUT("tensor partly past end", KP_EFORMAT, "tensor 2 ('tC')", {
        size_t o = tinfo_offset(m, n, "tC", 1);
        put_u64(m + o, get_u64(m + o) + 32);
    });
    MUT("duplicate tensor name", KP_EFORMAT, "duplicate tensor name", m[find_str(m, n, "tB") + 1] = 'A');
    MUT("NUL in tensor name", KP_EFORMAT, "NUL", m[find_str(m, n, "tB") + 1] = 0);
    MUT("tensor name length huge", KP_EFORMAT, "tensor 1 name", put_u64(m + find_str(m, n, "tB") - 8, 1ull << 62));
#undef MUT

    /* truncations at chosen places, with the field named */
    size_t at_kv = find_str(base, n, "test.k2");
    size_t at_ti = tinfo_ne(base, n, "tB", 1);
    expect_bad(base, 20, KP_EFORMAT, "header", "truncated in header");
    expect_bad(base, 2, KP_EFORMAT, "magic", "truncated in magic");
    expect_bad(base, at_kv, KP_EFORMAT, "truncated", "truncated in kv");
    /* late enough that the counts still fit, so the kv parser sees the end */
    size_t at_strs = find_str(base, n, "zzz") + 1;
    size_t at_align = find_str(base, n, "general.alignment") + 19;
    expect_bad(base, at_strs, KP_EFORMAT, "kv 5 ('test.strs'): array string 1", "truncated in kv array");
    expect_bad(base, at_align, KP_EFORMAT, "kv 6 ('general.alignment'): file ends inside the value type",
               "truncated in kv type");
    expect_bad(base, at_ti + 3, KP_EFORMAT, "tensor 1", "truncated in tensor info");
    expect_bad(base, n - 1, KP_EFORMAT, "past the end", "truncated in data");
    expect_bad(base, n - 40, KP_EFORMAT, "tensor 2 ('tC'): data", "truncated in data");

    /* every truncation is refused, none crashes */
    for (size_t len = 0; len < n; len++) {
        kp_err e2 = {0};
        int rc = open_copy(base, len, &f, &e2);
        if (rc != KP_EFORMAT) fail_msg("truncated to %zu of %zu bytes: rc %d (%s)", len, n, rc, e2.msg);
        assert_true(strlen(e2.msg) > 10);
    }

    /* random byte flips never crash; the parse either fails with a message
     * or succeeds (open_copy then reads every key, element and tensor) */
    uint64_t seed = 1234;
    int n_ok = 0, n_bad = 0;
    for (int it = 0; it < 20000; it++) {
        memcpy(m, base, n);
        int flips = 1 + (int)(rng_next(&seed) % 4);
        for (int k = 0; k < flips; k++) {
            size_t pos = rng_next(&seed) % n;
            uint64_t r = rng_next(&seed);
            /* mostly small changes, sometimes an 0xff/0x00 byte (lengths) */
            m[pos] = (r & 3) == 0 ? 0xff : (r & 3) == 1 ? 0 : (uint8_t)(m[pos] ^ (1u << ((r >> 8) & 7)));
        }
        kp_err e2 = {0};
        int rc = open_copy(m, n, &f, &e2);
        if (rc == 0) n_ok++;
        else {
            n_bad++;
            assert_true(rc == KP_EFORMAT || rc == KP_EUNSUP);
            assert_true(strlen(e2.msg) > 10);
        }
    }
    print_message("byte flips: %d parsed, %d refused\n", n_ok, n_bad);
    assert_true(n_bad > 1000);
    assert_true(n_ok > 100); /* flips in tensor data are harmless */

    free(m);
    free(base);

    /* without general.alignment the default 32 applies */
    base = make_base(&n, false);
    assert_int_equal(gguf_open_mem(&f, base, n, &e), 0);
    assert_int_equal(gguf_alignment(f), 32);
    gguf_close(f);
    free(base);
}

/* ------------------------------------------------------------------------ */
/* synthetic models                                                          */
/* ------------------------------------------------------------------------ */

/* Compare a synthetic file's tensors and arch keys with a real file. */
static void compare_shapes(const gguf_file *syn, const gguf_file *real, const char *arch) {
    assert_int_equal(gguf_n_tensors(syn), gguf_n_tensors(real));
    for (int64_t i = 0; i < gguf_n_tensors(real); i++) {
        const gguf_tensor *r = gguf_tensor_at(real, i);
        const gguf_tensor *s = gguf_find_tensor(syn, r->name);
        if (!s) fail_msg("synthetic model lacks tensor '%s'", r->name);
        assert_int_equal(s->n_dims, r->n_dims);
        for (int d = 0; d < 4; d++)
            if (s->ne[d] != r->ne[d])
                fail_msg("tensor '%s' ne[%d]: synthetic %lld, real %lld", r->name, d, (long long)s->ne[d],
                         (long long)r->ne[d]);
    }
    const char *keys[] = {"embedding_length", "block_count", "feed_forward_length", "attention.head_count",
                          "attention.head_count_kv", "context_length", "rope.dimension_count"};
    for (size_t k = 0; k < KP_ARRAY_LEN(keys); k++) {
        char key[128];
        snprintf(key, sizeof key, "%s.%s", arch, keys[k]);
        int64_t a, b;
        if (gguf_get_int(real, key, &b, NULL) != 0) continue;
        if (gguf_get_int(syn, key, &a, NULL) != 0) fail_msg("synthetic model lacks key '%s'", key);
        assert_int_equal(a, b);
    }
    char *ra = gguf_get_str_dup(real, "general.architecture");
    char *sa = gguf_get_str_dup(syn, "general.architecture");
    assert_string_equal(ra, sa);
    free(ra);
    free(sa);
    const char *same[] = {"tokenizer.ggml.model", "tokenizer.ggml.pre"};
    for (size_t k = 0; k < KP_ARRAY_LEN(same); k++) {
        char *x = gguf_get_str_dup(real, same[k]), *y = gguf_get_str_dup(syn, same[k]);
        if (x) {
            assert_non_null(y);
            assert_string_equal(x, y);
        }
        free(x);
        free(y);
    }
    gguf_arr ar, as;
    assert_int_equal(gguf_get_arr(real, "tokenizer.ggml.tokens", &ar, NULL), 0);
    assert_int_equal(gguf_get_arr(syn, "tokenizer.ggml.tokens", &as, NULL), 0);
    assert_int_equal(as.n, ar.n);
    assert_int_equal(get_int(syn, "tokenizer.ggml.bos_token_id"), get_int(real, "tokenizer.ggml.bos_token_id"));
    assert_int_equal(get_int(syn, "tokenizer.ggml.eos_token_id"), get_int(real, "tokenizer.ggml.eos_token_id"));
}

static int strptrcmp(const void *a, const void *b) { return strcmp(*(char *const *)a, *(char *const *)b); }

/* Token texts of a synthetic vocabulary are unique; BPE merges "A B" join two
 * existing tokens into a later one. */
static void check_vocab(const gguf_file *f) {
    gguf_arr tok;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", &tok, NULL), 0);
    /* uniqueness via sorting pointers */
    typedef struct { const char *s; size_t n; } sv;
    sv *v = malloc(tok.n * sizeof *v);
    assert_non_null(v);
    for (uint64_t i = 0; i < tok.n; i++) gguf_arr_get_str(&tok, i, &v[i].s, &v[i].n);
    for (uint64_t i = 0; i < tok.n; i++) assert_true(v[i].n > 0);
    /* O(n log n) check with qsort on a copy of (text) */
    char **c = malloc(tok.n * sizeof *c);
    for (uint64_t i = 0; i < tok.n; i++) {
        c[i] = malloc(v[i].n + 1);
        memcpy(c[i], v[i].s, v[i].n);
        c[i][v[i].n] = 0;
        assert_int_equal(strlen(c[i]), v[i].n);
    }
    qsort(c, tok.n, sizeof *c, strptrcmp);
    for (uint64_t i = 1; i < tok.n; i++)
        if (strcmp(c[i - 1], c[i]) == 0) fail_msg("duplicate token text '%s'", c[i]);
    for (uint64_t i = 0; i < tok.n; i++) free(c[i]);
    free(c);
    gguf_arr mg;
    if (gguf_get_arr(f, "tokenizer.ggml.merges", &mg, NULL) == 0) {
        assert_true(mg.n > 0);
        assert_true(mg.n < tok.n);
        for (uint64_t i = 0; i < mg.n; i += 97) { /* sample */
            const char *s;
            size_t n;
            gguf_arr_get_str(&mg, i, &s, &n);
            const char *sp = memchr(s, ' ', n);
            assert_non_null(sp);
            /* the joined text is token 256 + i */
            const char *t;
            size_t tn;
            gguf_arr_get_str(&tok, 256 + i, &t, &tn);
            assert_int_equal(tn, n - 1);
            assert_memory_equal(t, s, (size_t)(sp - s));
            assert_memory_equal(t + (sp - s), sp + 1, n - (size_t)(sp - s) - 1);
        }
    }
    free(v);
}


static void test_synth_names_and_sizes(void **state) {
    (void)state;
    const char *const *names = synth_names();
    assert_non_null(names);
    int n = 0;
    bool has8b = false;
    for (; names[n]; n++) has8b |= strcmp(names[n], "llama-3-8b") == 0;
    assert_true(n >= 6);
    assert_true(has8b);
    kp_err e = {0};
    assert_int_equal(synth_write("no-such-model", KP_TYPE_F32, 1, "/tmp/x.gguf", &e), KP_ENOTFOUND);
    assert_non_null(strstr(e.msg, "llama-3-8b"));
    assert_true(synth_size("no-such-model", KP_TYPE_F32) < 0);
    assert_true(synth_size("llama-3-8b", 1234) < 0);
    /* parameter counts of the real models (published figures) */
    struct { const char *name; double params; } real[] = {
        {"llama-3-8b", 8030261248.0},
        {"llama-3.2-1b", 1235814400.0},
        {"qwen2.5-0.5b", 494032768.0},
        {"qwen2.5-7b", 7615616512.0},
        {"gpt2-124m", 124439808.0 + 50257.0 * 768}, /* + untied output.weight copy, as llama.cpp writes it */
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(real); i++) {
        int64_t f32 = synth_size(real[i].name, KP_TYPE_F32);
        int64_t bf16 = synth_size(real[i].name, KP_TYPE_BF16);
        int64_t q8 = synth_size(real[i].name, KP_TYPE_Q8_0);
        int64_t q4 = synth_size(real[i].name, KP_TYPE_Q4_0);
        print_message("%-14s F32 %.3f GB, BF16 %.3f GB, Q8_0 %.3f GB, Q4_0 %.3f GB\n", real[i].name, f32 / 1e9,
                      bf16 / 1e9, q8 / 1e9, q4 / 1e9);
        /* F32: 4 bytes a parameter plus a vocabulary of a few MB */
        assert_true(f32 > 4 * real[i].params);
        assert_true(f32 < 4 * real[i].params * 1.01 + 8e6);
        assert_true(bf16 > 2 * real[i].params);
        assert_true(bf16 < 2 * real[i].params * 1.01 + 8e6);
        assert_true(q8 < bf16 && q4 < q8);
        assert_int_equal(synth_size(real[i].name, KP_TYPE_F16), bf16);
    }
}

static void synth_vs_real(const char *synth_name, const char *real_rel, const char *arch, int type) {
    char *dir = tu_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/%s.gguf", dir, synth_name);
    kp_err e = {0};
    double t0 = kp_now();
    int rc = synth_write(synth_name, type, 7, path, &e);
    if (rc) fail_msg("%s", e.msg);
    double t1 = kp_now();
    gguf_file *f = NULL;
    rc = gguf_open(&f, path, &e);
    if (rc) fail_msg("%s", e.msg);
    print_message("synth %s (%s): %zu bytes in %.2f s\n", synth_name, kp_type_name(type), gguf_file_size(f), t1 - t0);
    assert_int_equal((int64_t)gguf_file_size(f), synth_size(synth_name, type));
    check_vocab(f);
    /* weights: 2-D tensors of the requested type where the row fits the block
     * size, norms F32 and exactly 1, biases 0 */
    int n_main = 0;
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        size_t nl = strlen(t->name);
        if (t->n_dims == 1) {
            assert_int_equal(t->type, KP_TYPE_F32);
            const float *x = t->data;
            float want = strstr(t->name, "norm.weight") ? 1.0f : 0.0f;
            for (int64_t j = 0; j < t->ne[0]; j++) assert_true(x[j] == want);
        } else if (t->ne[0] % kp_type_block(type) == 0) {
            assert_int_equal(t->type, type);
            n_main++;
        }
        if (t->type == KP_TYPE_F32 && t->n_dims == 2) {
            /* ~N(0, 0.02) */
            const float *x = t->data;
            double s = 0, s2 = 0;
            for (int64_t j = 0; j < t->n_elements; j++) {
                s += x[j];
                s2 += (double)x[j] * x[j];
            }
            double mean = s / (double)t->n_elements, sd = sqrt(s2 / (double)t->n_elements - mean * mean);
            if (t->n_elements > 4000) {
                assert_true(fabs(mean) < 0.002);
                assert_true(fabs(sd - 0.02) < 0.002);
            }
        }
        (void)nl;
    }
    assert_true(n_main > 0);
    if (real_rel && tu_shared_exists(real_rel)) {
        char *rp = tu_shared_path(real_rel);
        gguf_file *r = NULL;
        rc = gguf_open(&r, rp, &e);
        if (rc) fail_msg("%s", e.msg);
        compare_shapes(f, r, arch);
        gguf_close(r);
        free(rp);
    }
    /* same seed, same bytes; another seed, other weights */
    char path2[4200];
    snprintf(path2, sizeof path2, "%s/again.gguf", dir);
    rc = synth_write(synth_name, type, 7, path2, &e);
    if (rc) fail_msg("%s", e.msg);
    size_t n1, n2;
    char *b1 = tu_read_file(path, &n1), *b2 = tu_read_file(path2, &n2);
    assert_int_equal(n1, n2);
    assert_memory_equal(b1, b2, n1);
    free(b2);
    rc = synth_write(synth_name, type, 8, path2, &e);
    if (rc) fail_msg("%s", e.msg);
    b2 = tu_read_file(path2, &n2);
    assert_int_equal(n1, n2);
    assert_true(memcmp(b1, b2, n1) != 0);
    free(b1);
    free(b2);
    gguf_close(f);
    unlink(path);
    unlink(path2);
    rmdir(dir);
    free(dir);
}

static void test_synth_stories(void **state) {
    (void)state;
    synth_vs_real("stories260k-shape", "models/stories260K.gguf", "llama", KP_TYPE_F32);
    synth_vs_real("stories260k-shape", "models/stories260K.gguf", "llama", KP_TYPE_F16);
    synth_vs_real("stories260k-shape", NULL, "llama", KP_TYPE_BF16);
}

static void test_synth_stories_vocab(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    char path[4096];
    snprintf(path, sizeof path, "%s/s.gguf", dir);
    kp_err e = {0};
    int rc = synth_write("stories260k-shape", KP_TYPE_F32, 1, path, &e);
    if (rc) fail_msg("%s", e.msg);
    gguf_file *f;
    assert_int_equal(gguf_open(&f, path, &e), 0);
    assert_str_key(f, "tokenizer.ggml.model", "llama");
    gguf_arr a;
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.tokens", &a, NULL), 0);
    const char *s;
    size_t n;
    gguf_arr_get_str(&a, 0, &s, &n);
    assert_int_equal(n, 5);
    assert_memory_equal(s, "<unk>", 5);
    gguf_arr_get_str(&a, 1, &s, &n);
    assert_memory_equal(s, "<s>", 3);
    gguf_arr_get_str(&a, 2, &s, &n);
    assert_memory_equal(s, "</s>", 4);
    gguf_arr_get_str(&a, 3 + 0x41, &s, &n);
    assert_int_equal(n, 6);
    assert_memory_equal(s, "<0x41>", 6);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.scores", &a, NULL), 0);
    assert_int_equal(a.n, 512);
    assert_int_equal(a.type, GGUF_VT_FLOAT32);
    assert_int_equal(gguf_get_arr(f, "tokenizer.ggml.token_type", &a, NULL), 0);
    assert_int_equal(gguf_arr_get_int(&a, 0), 2);
    assert_int_equal(gguf_arr_get_int(&a, 1), 3);
    assert_int_equal(gguf_arr_get_int(&a, 3), 6);
    assert_int_equal(gguf_arr_get_int(&a, 300), 1);
    assert_int_equal(get_int(f, "tokenizer.ggml.unknown_token_id"), 0);
    gguf_close(f);
    unlink(path);
    rmdir(dir);
    free(dir);
}

static void test_synth_other_archs(void **state) {
    (void)state;
    /* tiny shapes of the qwen2 and gpt2 layouts, compared with the real
     * llama.cpp-written files of the same shape */
    synth_vs_real("tiny-qwen2-shape", "models/tiny-qwen2.gguf", "qwen2", KP_TYPE_F32);
    synth_vs_real("tiny-gpt2-shape", "models/tiny-gpt2.gguf", "gpt2", KP_TYPE_F16);
    synth_vs_real("tiny-llama-256-shape", "models/tiny-llama-256.gguf", "llama", KP_TYPE_F32);
}

static void test_synth_quant(void **state) {
    (void)state;
    int types[] = {KP_TYPE_Q8_0, KP_TYPE_Q4_0, KP_TYPE_Q4_K, KP_TYPE_Q6_K};
    for (size_t i = 0; i < KP_ARRAY_LEN(types); i++)
        synth_vs_real("tiny-llama-256-shape", "models/tiny-llama-256.gguf", "llama", types[i]);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories260k),
        cmocka_unit_test(test_all_shared_files),
        cmocka_unit_test(test_open_errors),
        cmocka_unit_test(test_roundtrip_mem_and_file),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_synth_names_and_sizes),
        cmocka_unit_test(test_synth_stories),
        cmocka_unit_test(test_synth_stories_vocab),
        cmocka_unit_test(test_synth_other_archs),
        cmocka_unit_test(test_synth_quant),
    };
    return cmocka_run_group_tests_name("gguf", tests, NULL, NULL);
}
