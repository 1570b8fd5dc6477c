/*
 * testutil.c — see testutil.h.
 */
#include "tests/testutil.h"

#include <ftw.h>
#include <math.h>
#include <stdio.h>
#include <sys/wait.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

static const char *shared_dir(void) {
    const char *d = getenv("KVPARK_SHARED");
    return d && *d ? d : "../shared";
}

char *tu_shared_path(const char *rel) {
    const char *d = shared_dir();
    size_t n = strlen(d) + strlen(rel) + 2;
    char *p = malloc(n);
    assert_non_null(p);
    snprintf(p, n, "%s/%s", d, rel);
    return p;
}

int tu_shared_exists(const char *rel) {
    char *p = tu_shared_path(rel);
    struct stat st;
    int ok = stat(p, &st) == 0;
    free(p);
    return ok;
}

char *tu_read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) return NULL;
    if (fseek(f, 0, SEEK_END) != 0) { fclose(f); return NULL; }
    long n = ftell(f);
    if (n < 0) { fclose(f); return NULL; }
    rewind(f);
    char *buf = malloc((size_t)n + 1);
    if (!buf) { fclose(f); return NULL; }
    size_t got = fread(buf, 1, (size_t)n, f);
    fclose(f);
    if (got != (size_t)n) { free(buf); return NULL; }
    buf[n] = 0;
    if (len) *len = (size_t)n;
    return buf;
}

json_t *tu_load_json(const char *rel) {
    char *p = tu_shared_path(rel);
    json_error_t e;
    json_t *j = json_load_file(p, JSON_ALLOW_NUL, &e);
    if (!j) fail_msg("cannot parse %s: %s (line %d)", p, e.text, e.line);
    free(p);
    return j;
}

char *tu_tmpdir(void) {
    const char *t = getenv("TMPDIR");
    char buf[4096];
    snprintf(buf, sizeof buf, "%s/kvpark-test-XXXXXX", t && *t ? t : "/tmp");
    char *d = mkdtemp(buf);
    assert_non_null(d);
    return strdup(d);
}

static int rm_cb(const char *p, const struct stat *sb, int type, struct FTW *f) {
    (void)sb, (void)type, (void)f;
    remove(p);
    return 0;
}

void tu_rm_rf(const char *dir) { nftw(dir, rm_cb, 16, FTW_DEPTH | FTW_PHYS); }

int tu_file_exists(const char *path) {
    struct stat sb;
    return stat(path, &sb) == 0;
}

void tu_write_file(const char *path, const void *data, size_t n) {
    FILE *f = fopen(path, "wb");
    if (!f) fail_msg("cannot create %s", path);
    if (n) assert_int_equal(fwrite(data, 1, n, f), n);
    assert_int_equal(fclose(f), 0);
}

double tu_max_abs_diff(const float *a, const float *b, size_t n) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        double d = fabs((double)a[i] - (double)b[i]);
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        if (d > m) m = d;
    }
    return m;
}

double tu_max_rel_err(const float *a, const float *b, size_t n, double floor) {
    double m = 0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(a[i]) || isnan(b[i])) return INFINITY;
        double d = fabs((double)a[i] - (double)b[i]) / fmax(fabs((double)b[i]), floor);
        if (d > m) m = d;
    }
    return m;
}

void tu_rand_floats(float *x, size_t n, float scale, uint64_t *state) {
    uint64_t s = *state ? *state : 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < n; i++) {
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        x[i] = scale * (2.0f * (float)((s >> 40) * (1.0 / 16777216.0)) - 1.0f);
    }
    *state = s;
}

kv_cache *tu_kv_new(kp_backend *be, int kv_type, int n_layer, int n_ctx, int n_kv_heads,
                    int head_dim) {
    kv_cache *kv = NULL;
    kp_err err = {0};
    if (kv_new(&kv, be, kv_type, n_layer, n_ctx, n_kv_heads, head_dim, &err))
        fail_msg("kv_new: %s", err.msg);
    return kv;
}

void tu_kv_fill(kv_cache *kv, int from, int n, uint64_t seed) {
    const kp_ops *ops = kp_backend_ops(kv->be);
    int d = kv->n_kv_heads * kv->head_dim;
    float *x = malloc((size_t)kv->n_ctx * d * sizeof *x); /* [n - from][n_kv_heads][head_dim] */
    assert_non_null(x);
    for (int l = 0; l < kv->n_layer; l++)
        for (int v = 0; v < 2; v++) {
            uint64_t s = seed * 1000003u + (uint64_t)(l * 2 + v) + 1;
            tu_rand_floats(x, (size_t)(n - from) * d, 2.0f, &s);
            uint8_t *dst = (uint8_t *)(v ? kv->v[l] : kv->k[l]) + (size_t)from * kv->row_bytes;
            if (n > from) ops->kv_store(kv->be, dst, kv->kv_type, x, n - from, d);
        }
    kv->n_pos = n;
    free(x);
}

int32_t *tu_make_tokens(int n, uint64_t seed) {
    int32_t *t = malloc((size_t)(n ? n : 1) * sizeof *t);
    assert_non_null(t);
    for (int i = 0; i < n; i++) {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        t[i] = (int32_t)(seed % 512);
    }
    return t;
}

void tu_cas_obj_path(const char *dir, cas_key k, char *out, size_t cap) {
    char hex[33];
    cas_key_hex(k, hex);
    snprintf(out, cap, "%s/objects/%.2s/%s.kvo", dir, hex, hex);
}

void tu_apply_filter(void) {
    const char *f = getenv("KVPARK_TEST_FILTER");
    if (f && *f) cmocka_set_test_filter(f);
}

void tu_apply_filter_args(int argc, char **argv) {
    if (argc > 1 && argv[1] && *argv[1])
        cmocka_set_test_filter(argv[1]);
    else
        tu_apply_filter();
}

int tu_run_cmd(const char *cmd, char *out, size_t cap) {
    FILE *p = popen(cmd, "r");
    assert_non_null(p);
    size_t n = fread(out, 1, cap - 1, p);
    out[n] = 0;
    int st = pclose(p);
    return WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
}

const char *tu_kvpark_bin(void) {
    const char *b = getenv("KVPARK_BIN");
    return b && *b ? b : "build/kvpark";
}

int tu_run_captured(int (*fn)(int, char **), int argc, char **argv, char **out) {
    char path[] = "/tmp/kvpark-test-captured-XXXXXX";
    int fd = mkstemp(path);
    assert_true(fd >= 0);
    fflush(stdout);
    int saved = dup(1);
    dup2(fd, 1);
    int rc = fn(argc, argv);
    fflush(stdout);
    dup2(saved, 1);
    close(saved);
    close(fd);
    *out = tu_read_file(path, NULL);
    unlink(path);
    assert_non_null(*out);
    return rc;
}
