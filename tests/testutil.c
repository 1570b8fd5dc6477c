/*
 * testutil.c — see testutil.h.
 */
#include "tests/testutil.h"
#include "compress/codecfile.h"

#include <ftw.h>
#include <hiredis/hiredis.h>
#include <signal.h>
#include <sys/prctl.h>
#include <time.h>
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

/* ---- a redis-server of our own (tu_redis_*) ---------------------------------- */

int tu_on_path(const char *prog) {
    const char *path = getenv("PATH");
    if (!path) return 0;
    char buf[4096];
    snprintf(buf, sizeof buf, "%s", path);
    for (char *save = NULL, *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        char p[4200];
        snprintf(p, sizeof p, "%s/%s", d, prog);
        if (access(p, X_OK) == 0) return 1;
    }
    return 0;
}

void tu_msleep(int ms) {
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000l};
    nanosleep(&ts, NULL);
}

void tu_redis_start(tu_redis *s, const char *const *extra) {
    if (!tu_on_path("redis-server"))
        fail_msg("redis-server is not on PATH: the remote tier's tests need a real Redis "
                 "(apt-get install redis-server; deploy/install-deps.sh installs it)");
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGKILL); /* a failed test must not leave Redis holding the runner's pipes */
        char log[700];
        snprintf(log, sizeof log, "%s/redis.log", s->dir);
        const char *argv[64] = {"redis-server", "--port", "0", "--unixsocket", s->sock, "--unixsocketperm", "700",
                                "--dir", s->dir, "--save", "", "--appendonly", "no", "--daemonize", "no",
                                "--logfile", log};
        int n = 17;
        for (int i = 0; extra && extra[i] && n < 62; i++) argv[n++] = extra[i];
        argv[n] = NULL;
        execvp("redis-server", (char *const *)argv);
        _exit(127);
    }
    s->pid = pid;
    for (int i = 0; i < 500; i++) { /* until it answers PING (at most 10 s) */
        redisContext *c = redisConnectUnix(s->sock);
        if (c && !c->err) {
            redisReply *r = redisCommand(c, "PING");
            int ok = r && r->type == REDIS_REPLY_STATUS;
            if (r) freeReplyObject(r);
            redisFree(c);
            if (ok) return;
        } else if (c) {
            redisFree(c);
        }
        int st;
        if (waitpid(pid, &st, WNOHANG) == pid) fail_msg("redis-server exited at start (see %s/redis.log)", s->dir);
        tu_msleep(20);
    }
    fail_msg("redis-server did not answer on %s", s->sock);
}

void tu_redis_init(tu_redis *s, const char *const *extra) {
    memset(s, 0, sizeof *s);
    char *d = tu_tmpdir();
    snprintf(s->dir, sizeof s->dir, "%s", d);
    free(d);
    snprintf(s->sock, sizeof s->sock, "%s/redis.sock", s->dir);
    snprintf(s->url, sizeof s->url, "unix:%s", s->sock);
    tu_redis_start(s, extra);
}

void tu_redis_kill(tu_redis *s) {
    if (s->pid <= 0) return;
    kill(s->pid, SIGCONT);
    kill(s->pid, SIGKILL);
    waitpid(s->pid, NULL, 0);
    s->pid = 0;
    unlink(s->sock);
}

void tu_redis_done(tu_redis *s) {
    tu_redis_kill(s);
    tu_rm_rf(s->dir);
}

struct codec *tu_learned_codec(const codec_shape *shape, int kind, int ranges, uint64_t *st) {
    const int L = shape->n_layer, d = shape->n_kv_heads * shape->head_dim;
    int *ranks = malloc(sizeof(int) * 2 * (size_t)L);
    assert_non_null(ranks);
    ranks[0] = d;
    for (int i = 1; i < 2 * L; i++) {
        float u;
        tu_rand_floats(&u, 1, 1.0f, st);
        ranks[i] = 1 + (int)(fabsf(u) * (float)(d - 1));
    }
    codec *c = NULL;
    kp_err err = {0};
    if (codec_learned_alloc(&c, shape, kind, ranks, &err)) fail_msg("codec_learned_alloc: %s", err.msg);
    free(ranks);
    codec_learned *cl = (codec_learned *)c;
    cl->ranges = ranges;
    for (int i = 0; i < 2 * L; i++) {
        lc_coder *cd = &cl->coders[i];
        tu_rand_floats(cd->mean, (size_t)d, 0.5f, st);
        tu_rand_floats(cd->enc, (size_t)d * cd->r, sqrtf(3.0f / d) * 1.5f, st);
        tu_rand_floats(cd->dec, (size_t)d * cd->r, sqrtf(3.0f / cd->r), st);
        for (int j = 0; j < cd->r; j++) cd->bits[j] = (uint8_t)(1 + (j * 5 + i) % 8);
    }
    if (codec_learned_finish(c, &err)) fail_msg("codec_learned_finish: %s", err.msg);
    return c;
}
