/*
 * test_remote.c — the Redis remote tier (storage/remote.h) against a REAL
 * redis-server that each test starts itself (found on PATH; missing = the
 * test fails, CI installs it: deploy/install-deps.sh) on a unix socket in a
 * fresh temp dir, without persistence, and stops at the end:
 *   - URL parsing: good forms and bad ones with clear errors;
 *   - object and record round trips, TTL set, prefix isolation of two models;
 *   - versioned records: compare-and-set, and two threads writing one id:
 *     every read is one whole write, the final value is the write with the
 *     highest acknowledged version;
 *   - garbage values (wrong magic, another key's object, flipped payload,
 *     truncated, wrong type) are KP_EFORMAT, absent ones KP_ENOTFOUND;
 *   - maxmemory + allkeys-lru eviction: every read is a clean hit or miss;
 *   - Redis killed mid-traffic: calls fail with KP_EBUSY, the state is down,
 *     queued writes retry and drain once a new Redis listens; a stopped
 *     (SIGSTOP) Redis: calls fail within the command timeout (counted as
 *     timeouts), not hang;
 *   - the write queue is bounded: a full queue drops (counted), never blocks;
 *   - the session store on top (storage/store.h remote tier): two stores
 *     ("replicas", two cold dirs) on one Redis: a save on A loads on B
 *     byte-identical (tokens, extra, KV), reported tier "remote"; deletes
 *     propagate; evicted objects are a clean failure; write-back policy.
 */
#include "tests/testutil.h"

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <hiredis/hiredis.h>

#include <signal.h>
#include <sys/prctl.h>

#include "storage/cas.h"
#include "storage/remote.h"
#include "storage/store.h"

#ifndef STORE_REMOTE
#define STORE_REMOTE 1
#endif

static kp_backend *g_be; /* one CPU backend for the store tests */

/* A raw command on the test's own connection. */
static redisReply *raw(tu_redis *s, const char *fmt, ...) {
    redisContext *c = redisConnectUnix(s->sock);
    assert_true(c && !c->err);
    va_list ap;
    va_start(ap, fmt);
    redisReply *r = redisvCommand(c, fmt, ap);
    va_end(ap);
    redisFree(c);
    assert_non_null(r);
    return r;
}

static remote *open_remote(const tu_redis *s, uint64_t model, uint64_t codec_h) {
    remote_opts o = remote_default_opts();
    o.url = s->url;
    o.model_hash = model;
    o.codec_hash = codec_h;
    o.connect_timeout_ms = 300;
    o.command_timeout_ms = 300;
    o.retry_min_ms = 10;
    o.retry_max_ms = 100;
    remote *r = NULL;
    kp_err err = {0};
    if (remote_open(&r, &o, &err)) fail_msg("remote_open: %s", err.msg);
    return r;
}

static cas_key key_n(int i) {
    char id[32];
    snprintf(id, sizeof id, "object-%d", i);
    return cas_key_of(id, strlen(id));
}

static uint8_t *bytes_n(int i, size_t n) {
    uint8_t *b = malloc(n);
    for (size_t k = 0; k < n; k++) b[k] = (uint8_t)(i * 31 + k * 7);
    return b;
}

/* ---- URLs ---------------------------------------------------------------------- */

static void test_urls(void **state) {
    (void)state;
    remote_url u;
    kp_err err = {0};
    assert_int_equal(remote_url_parse("redis://localhost:6380/2", &u, &err), 0);
    assert_false(u.is_unix);
    assert_string_equal(u.host, "localhost");
    assert_int_equal(u.port, 6380);
    assert_int_equal(u.db, 2);
    assert_int_equal(remote_url_parse("redis://alice:s%40cret:x@10.0.0.5:7000", &u, &err), 0);
    assert_string_equal(u.user, "alice");
    assert_string_equal(u.password, "s@cret:x");
    assert_string_equal(u.host, "10.0.0.5");
    assert_int_equal(u.port, 7000);
    assert_int_equal(u.db, 0);
    assert_int_equal(remote_url_parse("redis://pw@h", &u, &err), 0);
    assert_string_equal(u.user, "");
    assert_string_equal(u.password, "pw");
    assert_int_equal(u.port, 6379);
    assert_int_equal(remote_url_parse("redis://[::1]:6390", &u, &err), 0);
    assert_string_equal(u.host, "::1");
    assert_int_equal(u.port, 6390);
    assert_int_equal(remote_url_parse("unix:/run/redis/redis.sock?db=3", &u, &err), 0);
    assert_true(u.is_unix);
    assert_string_equal(u.path, "/run/redis/redis.sock");
    assert_int_equal(u.db, 3);

    static const struct { const char *url, *says; } bad[] = {
        {"", "no URL"},
        {"http://localhost:6379", "not a Redis URL"},
        {"rediss://localhost:6379", "TLS"},
        {"redis://", "no host"},
        {"redis://:6379", "no host"},
        {"redis://host:0", "port"},
        {"redis://host:65536", "port"},
        {"redis://host:12ab", "port"},
        {"redis://host:6379/x", "database"},
        {"redis://host:6379/-1", "database"},
        {"redis://ho st:1", "space"},
        {"redis://h$st:1", "character"},
        {"redis://user:@host:1", "empty password"},
        {"redis://u:p%4@host:1", "escape"},
        {"redis://u:p%00@host:1", "escape"},
        {"redis://[::1:6379", "']'"},
        {"unix:", "absolute"},
        {"unix:relative.sock", "absolute"},
        {"unix:/tmp/r.sock?db=", "db=N"},
        {"unix:/tmp/r.sock?foo=1", "db=N"},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(bad); i++) {
        memset(&err, 0, sizeof err);
        int rc = remote_url_parse(bad[i].url, &u, &err);
        if (rc != KP_EINVAL || !strstr(err.msg, bad[i].says))
            fail_msg("'%s': rc %d, message '%s' (want KP_EINVAL saying '%s')", bad[i].url, rc, err.msg, bad[i].says);
    }
    /* a long socket path */
    char longp[300] = "unix:/";
    memset(longp + 6, 'a', 200);
    longp[206] = 0;
    assert_int_equal(remote_url_parse(longp, &u, &err), KP_EINVAL);
    /* remote_open refuses a bad URL the same way */
    remote_opts o = remote_default_opts();
    o.url = "redis//nohost";
    remote *r = NULL;
    assert_int_equal(remote_open(&r, &o, &err), KP_EINVAL);
    assert_null(r);
}

/* ---- round trips, TTL, prefixes -------------------------------------------------- */

static void test_roundtrip_and_prefix(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    remote *a = open_remote(&s, 0x1111, 0xaaaa);
    remote *b = open_remote(&s, 0x2222, 0xaaaa);
    kp_err err = {0};
    assert_string_equal(remote_prefix(a), "kvpark:0000000000001111:000000000000aaaa:");
    assert_int_equal(remote_state(a), REMOTE_DOWN); /* nothing tried yet */

    uint8_t *d = bytes_n(1, 10000);
    assert_int_equal(remote_put_object(a, key_n(1), d, 10000, &err), 0);
    assert_int_equal(remote_state(a), REMOTE_UP);
    assert_int_equal(remote_has_object(a, key_n(1), &err), 1);
    assert_int_equal(remote_has_object(b, key_n(1), &err), 0); /* another model's prefix */
    void *got = NULL;
    size_t n = 0;
    assert_int_equal(remote_get_object(a, key_n(1), &got, &n, &err), 0);
    assert_int_equal(n, 10000);
    assert_memory_equal(got, d, n);
    free(got);
    assert_int_equal(remote_get_object(b, key_n(1), &got, &n, &err), KP_ENOTFOUND);
    assert_null(got);
    assert_int_equal(remote_get_object(a, key_n(2), &got, &n, &err), KP_ENOTFOUND);
    /* an empty object is fine too */
    assert_int_equal(remote_put_object(a, key_n(3), "", 0, &err), 0);
    assert_int_equal(remote_get_object(a, key_n(3), &got, &n, &err), 0);
    assert_int_equal(n, 0);
    free(got);

    /* records: same id, two models, two values */
    long long va = 0, vb = 0;
    assert_int_equal(remote_put_record(a, "sess-1", "record of A", 11, REMOTE_ANY, &va, &err), 0);
    assert_int_equal(remote_put_record(b, "sess-1", "record of B!", 12, REMOTE_ANY, &vb, &err), 0);
    assert_int_equal(va, 1);
    assert_int_equal(vb, 1);
    long long v = 0;
    assert_int_equal(remote_get_record(a, "sess-1", &got, &n, &v, &err), 0);
    assert_int_equal(n, 11);
    assert_memory_equal(got, "record of A", 11);
    assert_int_equal(v, 1);
    free(got);
    assert_int_equal(remote_get_record(b, "sess-1", &got, &n, &v, &err), 0);
    assert_int_equal(n, 12);
    assert_memory_equal(got, "record of B!", 12);
    free(got);
    assert_int_equal(remote_get_record(a, "nope", &got, &n, &v, &err), KP_ENOTFOUND);
    assert_int_equal(remote_get_record(a, "../x", &got, &n, &v, &err), KP_EINVAL);
    /* compare-and-set */
    assert_int_equal(remote_put_record(a, "sess-1", "v2", 2, 1, &v, &err), 0);
    assert_int_equal(v, 2);
    assert_int_equal(remote_put_record(a, "sess-1", "stale", 5, 1, &v, &err), KP_EBUSY);
    assert_int_equal(v, 2);
    assert_int_equal(remote_get_record(a, "sess-1", &got, &n, &v, &err), 0);
    assert_memory_equal(got, "v2", 2);
    free(got);
    assert_int_equal(remote_del_record(a, "sess-1", &err), 0);
    assert_int_equal(remote_get_record(a, "sess-1", &got, &n, &v, &err), KP_ENOTFOUND);
    assert_int_equal(remote_get_record(b, "sess-1", &got, &n, &v, &err), 0); /* B's untouched */
    free(got);

    remote_stats st;
    remote_get_stats(a, &st);
    assert_true(st.events[REMOTE_EV_PUT] >= 4);
    assert_true(st.events[REMOTE_EV_HIT] >= 3);
    assert_true(st.events[REMOTE_EV_MISS] >= 2);
    assert_int_equal(st.events[REMOTE_EV_ERROR], 0);
    remote_close(a);
    remote_close(b);

    /* TTL: every key written gets it */
    remote_opts o = remote_default_opts();
    o.url = s.url;
    o.ttl_s = 1000;
    remote *t = NULL;
    assert_int_equal(remote_open(&t, &o, &err), 0);
    assert_int_equal(remote_put_object(t, key_n(9), d, 100, &err), 0);
    assert_int_equal(remote_put_record(t, "ttl", "x", 1, REMOTE_ANY, NULL, &err), 0);
    char k[200], hex[33];
    cas_key_hex(key_n(9), hex);
    snprintf(k, sizeof k, "%so:%s", remote_prefix(t), hex);
    redisReply *rr = raw(&s, "TTL %s", k);
    assert_true(rr->integer > 900 && rr->integer <= 1000);
    freeReplyObject(rr);
    snprintf(k, sizeof k, "%ss:ttl", remote_prefix(t));
    rr = raw(&s, "TTL %s", k);
    assert_true(rr->integer > 900 && rr->integer <= 1000);
    freeReplyObject(rr);
    remote_close(t);
    free(d);
    tu_redis_done(&s);
}

/* ---- garbage --------------------------------------------------------------------------- */

static void test_garbage(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    remote *r = open_remote(&s, 1, 2);
    kp_err err = {0};
    uint8_t *d = bytes_n(5, 4096);
    assert_int_equal(remote_put_object(r, key_n(1), d, 4096, &err), 0);
    assert_int_equal(remote_put_object(r, key_n(2), d, 4096, &err), 0);
    char k1[200], k2[200], hex[33];
    cas_key_hex(key_n(1), hex);
    snprintf(k1, sizeof k1, "%so:%s", remote_prefix(r), hex);
    cas_key_hex(key_n(2), hex);
    snprintf(k2, sizeof k2, "%so:%s", remote_prefix(r), hex);
    redisReply *rr = raw(&s, "GET %s", k1);
    size_t vl = rr->len;
    uint8_t *good = malloc(vl);
    memcpy(good, rr->str, vl);
    freeReplyObject(rr);
    void *got = NULL;
    size_t n = 0;

    /* a flipped payload byte, a flipped header byte, truncated, plain garbage */
    size_t flips[] = {vl - 1, 60, 30, 3};
    for (size_t i = 0; i < KP_ARRAY_LEN(flips); i++) {
        uint8_t *b = malloc(vl);
        memcpy(b, good, vl);
        b[flips[i]] ^= 0x40;
        freeReplyObject(raw(&s, "SET %s %b", k1, b, vl));
        free(b);
        assert_int_equal(remote_get_object(r, key_n(1), &got, &n, &err), KP_EFORMAT);
        assert_null(got);
    }
    freeReplyObject(raw(&s, "SET %s %b", k1, good, vl - 10));
    assert_int_equal(remote_get_object(r, key_n(1), &got, &n, &err), KP_EFORMAT);
    freeReplyObject(raw(&s, "SET %s hello", k1));
    assert_int_equal(remote_get_object(r, key_n(1), &got, &n, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "not a kvpark object"));
    /* another object's (valid) value under this key */
    rr = raw(&s, "GET %s", k2);
    freeReplyObject(raw(&s, "SET %s %b", k1, rr->str, rr->len));
    freeReplyObject(rr);
    assert_int_equal(remote_get_object(r, key_n(1), &got, &n, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "another object"));
    /* a key of another type */
    freeReplyObject(raw(&s, "DEL %s", k1));
    freeReplyObject(raw(&s, "LPUSH %s x", k1));
    assert_int_equal(remote_get_object(r, key_n(1), &got, &n, &err), KP_EIO);
    /* the intact one is still fine */
    assert_int_equal(remote_get_object(r, key_n(2), &got, &n, &err), 0);
    assert_memory_equal(got, d, 4096);
    free(got);

    /* records: another id's record, garbage, a flipped byte */
    assert_int_equal(remote_put_record(r, "a", "AAAA", 4, REMOTE_ANY, NULL, &err), 0);
    assert_int_equal(remote_put_record(r, "b", "BBBB", 4, REMOTE_ANY, NULL, &err), 0);
    char ka[200], kb[200];
    snprintf(ka, sizeof ka, "%ss:a", remote_prefix(r));
    snprintf(kb, sizeof kb, "%ss:b", remote_prefix(r));
    rr = raw(&s, "HGET %s d", kb);
    freeReplyObject(raw(&s, "HSET %s d %b", ka, rr->str, rr->len));
    uint8_t *flip = malloc(rr->len);
    memcpy(flip, rr->str, rr->len);
    flip[rr->len - 1] ^= 1;
    freeReplyObject(raw(&s, "HSET %s d %b", kb, flip, rr->len));
    freeReplyObject(rr);
    free(flip);
    long long v;
    assert_int_equal(remote_get_record(r, "a", &got, &n, &v, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "another session"));
    assert_int_equal(remote_get_record(r, "b", &got, &n, &v, &err), KP_EFORMAT);
    freeReplyObject(raw(&s, "HSET %s d junk", ka));
    assert_int_equal(remote_get_record(r, "a", &got, &n, &v, &err), KP_EFORMAT);
    remote_stats st;
    remote_get_stats(r, &st);
    assert_true(st.events[REMOTE_EV_ERROR] >= 10);
    free(good);
    free(d);
    remote_close(r);
    tu_redis_done(&s);
}

/* ---- concurrent writers of one id --------------------------------------------------- */

#define CW_LEN 200000
#define CW_N 40

typedef struct cw_arg {
    remote *r;
    int who;
    long long versions[CW_N];
    int torn;
} cw_arg;

/* Value of (who, i): a header and CW_LEN bytes all derived from it. */
static void cw_fill(uint8_t *b, int who, int i) {
    b[0] = (uint8_t)who;
    b[1] = (uint8_t)i;
    for (size_t k = 2; k < CW_LEN; k++) b[k] = (uint8_t)(who * 97 + i * 13 + k);
}

static int cw_consistent(const uint8_t *b, size_t n) {
    if (n != CW_LEN) return 0;
    for (size_t k = 2; k < n; k++)
        if (b[k] != (uint8_t)(b[0] * 97 + b[1] * 13 + k)) return 0;
    return 1;
}

static void *cw_thread(void *p) {
    cw_arg *a = p;
    uint8_t *b = malloc(CW_LEN);
    for (int i = 0; i < CW_N; i++) {
        cw_fill(b, a->who, i);
        kp_err err = {0};
        if (remote_put_record(a->r, "shared", b, CW_LEN, REMOTE_ANY, &a->versions[i], &err)) a->versions[i] = -1;
        void *got = NULL;
        size_t n = 0;
        if (remote_get_record(a->r, "shared", &got, &n, NULL, &err) == 0 && !cw_consistent(got, n)) a->torn++;
        free(got);
    }
    free(b);
    return NULL;
}

static void test_concurrent_writers(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    /* two "replicas": two handles (own connections) of one model */
    cw_arg a = {.r = open_remote(&s, 7, 7), .who = 1}, b = {.r = open_remote(&s, 7, 7), .who = 2};
    pthread_t ta, tb;
    pthread_create(&ta, NULL, cw_thread, &a);
    pthread_create(&tb, NULL, cw_thread, &b);
    pthread_join(ta, NULL);
    pthread_join(tb, NULL);
    assert_int_equal(a.torn + b.torn, 0);
    /* versions: 1..2*CW_N, each acknowledged exactly once */
    int seen[2 * CW_N + 1] = {0};
    long long maxv = 0;
    int last_who = 0, last_i = 0;
    for (int i = 0; i < CW_N; i++) {
        assert_true(a.versions[i] >= 1 && a.versions[i] <= 2 * CW_N);
        assert_true(b.versions[i] >= 1 && b.versions[i] <= 2 * CW_N);
        seen[a.versions[i]]++;
        seen[b.versions[i]]++;
        if (a.versions[i] > maxv) maxv = a.versions[i], last_who = 1, last_i = i;
        if (b.versions[i] > maxv) maxv = b.versions[i], last_who = 2, last_i = i;
    }
    for (int v = 1; v <= 2 * CW_N; v++) assert_int_equal(seen[v], 1);
    void *got = NULL;
    size_t n = 0;
    long long v = 0;
    kp_err err = {0};
    assert_int_equal(remote_get_record(a.r, "shared", &got, &n, &v, &err), 0);
    assert_int_equal(v, maxv);
    assert_true(cw_consistent(got, n));
    assert_int_equal(((uint8_t *)got)[0], last_who); /* the last acknowledged write won */
    assert_int_equal(((uint8_t *)got)[1], last_i);
    free(got);
    remote_close(a.r);
    remote_close(b.r);
    tu_redis_done(&s);
}

/* ---- eviction -------------------------------------------------------------------------- */

static void test_eviction(void **state) {
    (void)state;
    tu_redis s;
    const char *const extra[] = {"--maxmemory", "3mb", "--maxmemory-policy", "allkeys-lru", NULL};
    tu_redis_init(&s, extra);
    remote *r = open_remote(&s, 3, 3);
    kp_err err = {0};
    enum { N = 200, SZ = 65536 };
    int put_ok = 0;
    for (int i = 0; i < N; i++) {
        uint8_t *d = bytes_n(i, SZ);
        if (remote_put_object(r, key_n(i), d, SZ, &err) == 0) put_ok++;
        if (i % 10 == 0) {
            char id[16];
            snprintf(id, sizeof id, "s%d", i);
            remote_put_record(r, id, d, 1000, REMOTE_ANY, NULL, &err);
        }
        free(d);
    }
    assert_int_equal(put_ok, N);
    int hits = 0, misses = 0;
    for (int i = 0; i < N; i++) {
        void *got = NULL;
        size_t n = 0;
        int rc = remote_get_object(r, key_n(i), &got, &n, &err);
        if (rc == 0) {
            uint8_t *d = bytes_n(i, SZ);
            assert_int_equal(n, SZ);
            assert_memory_equal(got, d, SZ);
            free(d);
            free(got);
            hits++;
        } else {
            if (rc != KP_ENOTFOUND) fail_msg("object %d: rc %d (%s), want a hit or a clean miss", i, rc, err.msg);
            misses++;
        }
    }
    print_message("eviction: %d hits, %d misses of %d objects of %d bytes under maxmemory 3mb\n", hits, misses, N,
                  SZ);
    assert_true(misses > N / 2); /* 13 MB written into 3 MB */
    assert_true(hits > 0);
    for (int i = 0; i < N; i += 10) {
        char id[16];
        snprintf(id, sizeof id, "s%d", i);
        void *got = NULL;
        size_t n = 0;
        int rc = remote_get_record(r, id, &got, &n, NULL, &err);
        assert_true(rc == 0 || rc == KP_ENOTFOUND);
        if (rc == 0) assert_int_equal(n, 1000);
        free(got);
    }
    remote_close(r);
    tu_redis_done(&s);
}

/* ---- --remote-budget ------------------------------------------------------------------ */

static remote *open_budgeted(const tu_redis *s, uint64_t budget) {
    remote_opts o = remote_default_opts();
    o.url = s->url;
    o.model_hash = 5;
    o.codec_hash = 5;
    o.budget_bytes = budget;
    o.retry_min_ms = 10;
    o.retry_max_ms = 100;
    remote *r = NULL;
    kp_err err = {0};
    if (remote_open(&r, &o, &err)) fail_msg("remote_open: %s", err.msg);
    return r;
}

/* Session i of the budget test: its own object (SZ bytes), an object every
 * session shares, and a record. */
enum { BSZ = 32768 };
static void budget_save(remote *r, int i, const uint8_t *shared) {
    uint8_t *d = bytes_n(1000 + i, BSZ);
    remote_obj objs[2] = {{key_n(1000 + i), d, BSZ}, {key_n(999), shared, BSZ}};
    char id[16], rec[64];
    snprintf(id, sizeof id, "b%d", i);
    int rl = snprintf(rec, sizeof rec, "record of session %d", i);
    assert_int_equal(remote_enqueue_save(r, id, objs, 2, rec, (size_t)rl), 0);
    free(d);
    assert_int_equal(remote_drain(r, 10000), 0);
}

/* 0 whole (record + own object + the shared one), 1 some part gone, 2 all gone. */
static int budget_state(remote *r, int i) {
    char id[16];
    snprintf(id, sizeof id, "b%d", i);
    void *got = NULL;
    size_t n = 0;
    kp_err err = {0};
    int rc = remote_get_record(r, id, &got, &n, NULL, &err);
    free(got);
    assert_true(rc == 0 || rc == KP_ENOTFOUND);
    int rec = rc == 0;
    rc = remote_get_object(r, key_n(1000 + i), &got, &n, &err);
    free(got);
    assert_true(rc == 0 || rc == KP_ENOTFOUND);
    int obj = rc == 0;
    return rec && obj ? 0 : !rec && !obj ? 2 : 1;
}

/* What the books say is what Redis holds: b:used = the sum of our values' sizes. */
static long long budget_real_bytes(tu_redis *s, const char *prefix) {
    redisReply *k = raw(s, "KEYS %s*", prefix);
    long long sum = 0;
    for (size_t i = 0; i < k->elements; i++) {
        const char *key = k->element[i]->str;
        const char *tail = key + strlen(prefix);
        if (!strncmp(tail, "o:", 2)) {
            redisReply *l = raw(s, "STRLEN %s", key);
            sum += l->integer;
            freeReplyObject(l);
        } else if (!strncmp(tail, "s:", 2)) {
            redisReply *l = raw(s, "HSTRLEN %s d", key);
            sum += l->integer;
            freeReplyObject(l);
        }
    }
    freeReplyObject(k);
    return sum;
}

static void test_budget(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    const uint64_t budget = 12 * (BSZ + 48) + 1000; /* room for about 11 sessions' own objects */
    remote *a = open_budgeted(&s, budget), *b = open_budgeted(&s, budget);
    uint8_t *shared = bytes_n(999, BSZ);
    char used_key[REMOTE_PREFIX_MAX + 16];
    snprintf(used_key, sizeof used_key, "%sb:used", remote_prefix(a));

    for (int i = 0; i < 8; i++) budget_save(a, i, shared);
    remote_stats st;
    remote_get_stats(a, &st);
    assert_int_equal(st.events[REMOTE_EV_EVICTED], 0);
    assert_int_equal(st.budget_bytes, budget);
    assert_int_equal((long long)st.used_bytes, budget_real_bytes(&s, remote_prefix(a)));
    assert_int_equal(budget_state(a, 0), 0); /* a read: session 0 is now the youngest */
    /* replica b writes into the same books */
    for (int i = 8; i < 16; i++) budget_save(b, i, shared);
    remote_get_stats(b, &st);
    print_message("budget: %llu of %llu bytes in use after 16 sessions; %llu keys evicted\n",
                  (unsigned long long)st.used_bytes, (unsigned long long)budget,
                  (unsigned long long)st.events[REMOTE_EV_EVICTED]);
    assert_true(st.events[REMOTE_EV_EVICTED] > 0);
    assert_true(st.used_bytes <= budget);
    assert_int_equal((long long)st.used_bytes, budget_real_bytes(&s, remote_prefix(a)));
    redisReply *u = raw(&s, "GET %s", used_key);
    assert_int_equal(strtoll(u->str, NULL, 10), (long long)st.used_bytes);
    freeReplyObject(u);
    /* least recently used first: 1 went before 0 (read since); the newest are whole */
    assert_int_equal(budget_state(a, 1), 2);
    assert_int_not_equal(budget_state(a, 0), 2);
    for (int i = 12; i < 16; i++) assert_int_equal(budget_state(a, i), 0);
    /* the shared object is used by every save: never the oldest, never evicted */
    void *got = NULL;
    size_t n = 0;
    kp_err err = {0};
    assert_int_equal(remote_get_object(a, key_n(999), &got, &n, &err), 0);
    assert_memory_equal(got, shared, BSZ);
    free(got);
    /* a delete leaves the books */
    assert_int_equal(remote_del_record(a, "b15", &err), 0);
    remote_get_stats(a, &st);
    assert_int_equal((long long)st.used_bytes, budget_real_bytes(&s, remote_prefix(a)));
    /* a key Redis lost by itself (its own eviction, expiry): the next save that needs it writes it again,
     * and the books still agree with what Redis holds */
    char okey[REMOTE_PREFIX_MAX + 40], hex[33];
    cas_key_hex(key_n(1014), hex);
    snprintf(okey, sizeof okey, "%so:%s", remote_prefix(a), hex);
    freeReplyObject(raw(&s, "DEL %s", okey));
    budget_save(a, 14, shared);
    budget_save(a, 16, shared);
    remote_get_stats(a, &st);
    assert_int_equal((long long)st.used_bytes, budget_real_bytes(&s, remote_prefix(a)));
    free(shared);
    remote_close(a);
    remote_close(b);
    tu_redis_done(&s);
}

/* Objects a save wrote are known (remote_known): the next save sends them by
 * key only; one that left Redis meanwhile is forgotten, the record still goes
 * up, and the save after that sends its data again. Many keys: the set
 * grows and forgets correctly. */
static void test_known_objects(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    remote *r = open_remote(&s, 6, 6);
    kp_err err = {0};
    uint8_t *d = bytes_n(7, 4000);
    remote_obj objs[3] = {{key_n(1), d, 4000}, {key_n(2), d, 2000}, {key_n(3), d, 1000}};
    assert_false(remote_known(r, key_n(1)));
    assert_int_equal(remote_enqueue_save(r, "k", objs, 3, "v1", 2), 0);
    assert_int_equal(remote_drain(r, 10000), 0);
    for (int i = 1; i <= 3; i++) assert_true(remote_known(r, key_n(i)));
    /* by key: nothing copied, the record updated */
    remote_obj by_key[3] = {{key_n(1), NULL, 4000}, {key_n(2), NULL, 2000}, {key_n(3), NULL, 1000}};
    remote_stats st0, st1;
    remote_get_stats(r, &st0);
    assert_int_equal(remote_enqueue_save(r, "k", by_key, 3, "v2", 2), 0);
    assert_int_equal(remote_drain(r, 10000), 0);
    remote_get_stats(r, &st1);
    assert_int_equal(st1.events[REMOTE_EV_PUT] - st0.events[REMOTE_EV_PUT], 1); /* the record only */
    void *got = NULL;
    size_t n = 0;
    assert_int_equal(remote_get_record(r, "k", &got, &n, NULL, &err), 0);
    assert_memory_equal(got, "v2", 2);
    free(got);
    /* object 2 leaves Redis (evicted): the key-only save forgets it, the record goes up */
    char okey[REMOTE_PREFIX_MAX + 40], hex[33];
    cas_key_hex(key_n(2), hex);
    snprintf(okey, sizeof okey, "%so:%s", remote_prefix(r), hex);
    freeReplyObject(raw(&s, "DEL %s", okey));
    assert_int_equal(remote_enqueue_save(r, "k", by_key, 3, "v3", 2), 0);
    assert_int_equal(remote_drain(r, 10000), 0);
    assert_false(remote_known(r, key_n(2)));
    assert_true(remote_known(r, key_n(1)) && remote_known(r, key_n(3)));
    assert_int_equal(remote_get_record(r, "k", &got, &n, NULL, &err), 0);
    assert_memory_equal(got, "v3", 2);
    free(got);
    assert_int_equal(remote_get_object(r, key_n(2), &got, &n, &err), KP_ENOTFOUND);
    /* with its data again: back in Redis, known again */
    assert_int_equal(remote_enqueue_save(r, "k", objs, 3, "v4", 2), 0);
    assert_int_equal(remote_drain(r, 10000), 0);
    assert_true(remote_known(r, key_n(2)));
    assert_int_equal(remote_get_object(r, key_n(2), &got, &n, &err), 0);
    assert_int_equal(n, 2000);
    free(got);
    /* 3000 keys: the set grows; every one known, others not */
    enum { NK = 3000 };
    remote_obj *many = calloc(NK, sizeof *many);
    for (int i = 0; i < NK; i++) many[i] = (remote_obj){key_n(10000 + i), d, 16};
    assert_int_equal(remote_enqueue_save(r, "many", many, NK, "m", 1), 0);
    assert_int_equal(remote_drain(r, 20000), 0);
    for (int i = 0; i < NK; i++) assert_true(remote_known(r, key_n(10000 + i)));
    assert_false(remote_known(r, key_n(99999)));
    /* forgetting keys in the middle of clusters keeps the others findable */
    for (int i = 0; i < NK; i += 3) {
        cas_key_hex(key_n(10000 + i), hex);
        snprintf(okey, sizeof okey, "%so:%s", remote_prefix(r), hex);
        freeReplyObject(raw(&s, "DEL %s", okey));
        many[i].data = NULL;
    }
    assert_int_equal(remote_enqueue_save(r, "many", many, NK, "m2", 2), 0);
    assert_int_equal(remote_drain(r, 20000), 0);
    for (int i = 0; i < NK; i++) assert_int_equal(remote_known(r, key_n(10000 + i)), i % 3 != 0);
    free(many);
    free(d);
    remote_close(r);
    tu_redis_done(&s);
}

/* ---- Redis killed, stopped; the queue ----------------------------------------------------- */

static void test_killed_and_queue(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    remote *r = open_remote(&s, 4, 4);
    kp_err err = {0};
    uint8_t *d = bytes_n(1, 5000);
    assert_int_equal(remote_put_object(r, key_n(0), d, 5000, &err), 0);
    tu_redis_kill(&s);
    /* calls fail (no hang) with the tier's error, the state says down */
    void *got = NULL;
    size_t n = 0;
    assert_int_equal(remote_get_object(r, key_n(0), &got, &n, &err), KP_EBUSY);
    assert_non_null(strstr(err.msg, "remote tier unavailable"));
    assert_int_equal(remote_put_object(r, key_n(1), d, 10, &err), KP_EBUSY);
    assert_int_equal(remote_state(r), REMOTE_DOWN);
    /* queued writes: accepted at once, retried in the background */
    for (int i = 0; i < 5; i++) {
        char id[16];
        snprintf(id, sizeof id, "q%d", i);
        remote_obj objs[2] = {{key_n(100 + i), d, 5000}, {key_n(200), d, 100}};
        char rec[32];
        int rl = snprintf(rec, sizeof rec, "record %d", i);
        assert_int_equal(remote_enqueue_save(r, id, objs, 2, rec, (size_t)rl), 0);
    }
    /* a newer save of q0 replaces the waiting one (or follows the in-flight one) */
    remote_obj o0 = {key_n(100), d, 5000};
    assert_int_equal(remote_enqueue_save(r, "q0", &o0, 1, "newest", 6), 0);
    assert_int_equal(remote_drain(r, 200), KP_EBUSY); /* cannot drain while Redis is gone */
    remote_stats st;
    remote_get_stats(r, &st);
    assert_true(st.queue_jobs >= 5);
    assert_true(st.events[REMOTE_EV_RETRY] >= 1);
    assert_int_equal(st.state, REMOTE_DOWN);
    assert_non_null(strstr(st.last_error, "unavailable"));
    /* a fresh (empty) Redis on the same socket: the queue drains */
    tu_redis_start(&s, NULL);
    assert_int_equal(remote_drain(r, 20000), 0);
    for (int i = 0; i < 5; i++) {
        char id[16], want[32];
        snprintf(id, sizeof id, "q%d", i);
        int wl = i ? snprintf(want, sizeof want, "record %d", i) : snprintf(want, sizeof want, "newest");
        assert_int_equal(remote_get_record(r, id, &got, &n, NULL, &err), 0);
        assert_int_equal(n, (size_t)wl);
        assert_memory_equal(got, want, n);
        free(got);
        assert_int_equal(remote_get_object(r, key_n(100 + i), &got, &n, &err), 0); /* objects first */
        assert_memory_equal(got, d, 5000);
        free(got);
    }
    assert_int_equal(remote_state(r), REMOTE_UP);
    /* a delete goes through the queue as well */
    assert_int_equal(remote_enqueue_delete(r, "q1"), 0);
    assert_int_equal(remote_drain(r, 20000), 0);
    assert_int_equal(remote_get_record(r, "q1", &got, &n, NULL, &err), KP_ENOTFOUND);

    /* a stopped Redis: calls come back within the command timeout, as timeouts */
    kill(s.pid, SIGSTOP);
    remote_get_stats(r, &st);
    uint64_t t0 = st.events[REMOTE_EV_TIMEOUT];
    assert_int_equal(remote_get_object(r, key_n(100), &got, &n, &err), KP_EBUSY);
    remote_get_stats(r, &st);
    assert_true(st.events[REMOTE_EV_TIMEOUT] > t0);
    assert_int_equal(st.state, REMOTE_DOWN);
    kill(s.pid, SIGCONT);
    assert_int_equal(remote_get_object(r, key_n(100), &got, &n, &err), 0);
    free(got);
    remote_close(r);

    /* the queue is bounded: with Redis gone, the third job is dropped at once */
    tu_redis_kill(&s);
    remote_opts o = remote_default_opts();
    o.url = s.url;
    o.queue_max_jobs = 2;
    o.connect_timeout_ms = 100;
    r = NULL;
    assert_int_equal(remote_open(&r, &o, &err), 0);
    assert_int_equal(remote_enqueue_save(r, "x1", NULL, 0, "1", 1), 0);
    assert_int_equal(remote_enqueue_save(r, "x2", NULL, 0, "2", 1), 0);
    assert_int_equal(remote_enqueue_save(r, "x3", NULL, 0, "3", 1), KP_EBUSY);
    remote_get_stats(r, &st);
    assert_int_equal(st.events[REMOTE_EV_DROPPED], 1);
    assert_int_equal(st.queue_jobs, 2);
    remote_close(r); /* does not wait for Redis */
    free(d);
    tu_redis_done(&s);
}

#if STORE_REMOTE
/* ---- the session store on the remote tier -------------------------------------------- */

#define NL 3
#define NKV 2
#define HD 8
#define NCTX 256

static store *open_store(const char *dir, const char *url, remote **rem, int policy, uint64_t cold_budget) {
    store_opts o = store_default_opts();
    o.dir = dir;
    o.shape = (codec_shape){.n_layer = NL, .n_kv_heads = NKV, .head_dim = HD, .model_fingerprint = 0xfeedull};
    o.kv_type = KP_TYPE_F32;
    o.layout = (park_layout){.sink = 4, .window = 16, .chunk = 16};
    o.cold_budget = cold_budget;
    kp_err err = {0};
    remote_opts ro = remote_default_opts();
    ro.url = url;
    ro.connect_timeout_ms = 300;
    ro.command_timeout_ms = 300;
    ro.retry_min_ms = 10;
    ro.model_hash = o.shape.model_fingerprint;
    ro.codec_hash = store_remote_codec_hash(&o);
    if (remote_open(rem, &ro, &err)) fail_msg("remote_open: %s", err.msg);
    o.remote = *rem;
    o.remote_policy = policy;
    store *s = NULL;
    if (store_open(&s, &o, &err)) fail_msg("store_open: %s", err.msg);
    return s;
}

static int kv_rows_equal(const kv_cache *a, const kv_cache *b, int n) {
    for (int l = 0; l < NL; l++) {
        if (memcmp(a->k[l], b->k[l], (size_t)n * a->row_bytes)) return 0;
        if (memcmp(a->v[l], b->v[l], (size_t)n * a->row_bytes)) return 0;
    }
    return 1;
}

static void test_store_two_replicas(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    char *da = tu_tmpdir(), *db = tu_tmpdir();
    remote *ra = NULL, *rb = NULL;
    store *A = open_store(da, s.url, &ra, STORE_REMOTE_WRITE_THROUGH, 0);
    store *B = open_store(db, s.url, &rb, STORE_REMOTE_WRITE_THROUGH, 0);
    kp_err err = {0};

    kv_cache *kv = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    tu_kv_fill(kv, 0, 100, 42);
    int32_t *tok = tu_make_tokens(100, 7);
    store_item it = {.tokens = tok, .n_tokens = 100, .extra = "owner=abc", .extra_len = 9, .kv = kv};
    assert_int_equal(store_save(A, "conv-1", &it, true, NULL, &err), 0);
    assert_int_equal(remote_drain(ra, 20000), 0);
    assert_false(store_has(B, "conv-1")); /* B never saw it locally ... */

    /* ... and resumes it from Redis */
    int nt = 0;
    int32_t *t2 = NULL;
    void *x2 = NULL;
    size_t xl = 0;
    assert_int_equal(store_load_meta(B, "conv-1", &nt, &t2, &x2, &xl, &err), 0);
    assert_int_equal(nt, 100);
    assert_memory_equal(t2, tok, 100 * sizeof *tok);
    assert_int_equal(xl, 9);
    assert_memory_equal(x2, "owner=abc", 9);
    free(t2);
    free(x2);
    store_entry e;
    assert_int_equal(store_stat(B, "conv-1", &e), 0);
    assert_string_equal(e.tier, "remote");
    kv_cache *kb = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    assert_int_equal(store_load_kv(B, "conv-1", kb, &err), 0);
    assert_int_equal(kb->n_pos, 100);
    assert_true(kv_rows_equal(kv, kb, 100));
    assert_int_equal(store_stat(B, "conv-1", &e), 0);
    assert_string_not_equal(e.tier, "remote"); /* local now */

    /* B continues the conversation; A (which has an older local copy)
     * drops its copy and loads B's through Redis after a delete+reload */
    tu_kv_fill(kv, 100, 120, 43); /* rows 100..119 */
    int32_t *tok2 = tu_make_tokens(120, 7);
    memcpy(tok2, tok, 100 * sizeof *tok);
    store_item it2 = {.tokens = tok2, .n_tokens = 120, .extra = "owner=abc", .extra_len = 9, .kv = kv};
    assert_int_equal(store_save(B, "conv-1", &it2, true, NULL, &err), 0);
    assert_int_equal(remote_drain(rb, 20000), 0);

    /* a session unknown to Redis and locally is a plain miss */
    assert_int_equal(store_load_meta(B, "nope", &nt, NULL, NULL, NULL, &err), KP_ENOTFOUND);

    /* delete on B: gone from Redis too, so a third replica cannot resurrect it */
    assert_int_equal(store_delete(B, "conv-1", &err), 0);
    assert_int_equal(remote_drain(rb, 20000), 0);
    char *dc = tu_tmpdir();
    remote *rc = NULL;
    store *C = open_store(dc, s.url, &rc, STORE_REMOTE_WRITE_THROUGH, 0);
    assert_int_equal(store_load_meta(C, "conv-1", &nt, NULL, NULL, NULL, &err), KP_ENOTFOUND);

    /* an object evicted from Redis: the KV is lost (KP_ELOST), nothing of the
     * objects stays behind on C, and the token ids stay (to be recomputed) */
    kv->n_pos = 100; /* it: the first 100 rows */
    assert_int_equal(store_save(A, "conv-2", &it, true, NULL, &err), 0);
    assert_int_equal(remote_drain(ra, 20000), 0);
    char pat[300];
    snprintf(pat, sizeof pat, "%so:*", remote_prefix(rc));
    redisReply *keys = raw(&s, "KEYS %s", pat);
    assert_true(keys->elements >= 2);
    /* every object: conv-2 shares its content keys with conv-1's versions, so
     * one key picked at random may be one conv-2 does not use */
    for (size_t i = 0; i < keys->elements; i++) freeReplyObject(raw(&s, "DEL %s", keys->element[i]->str));
    freeReplyObject(keys);
    int32_t *tl = NULL;
    assert_int_equal(store_load_meta(C, "conv-2", &nt, &tl, NULL, NULL, &err), 0); /* the record is there */
    assert_int_equal(nt, 100);
    free(tl);
    kv_cache *kc = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    assert_int_equal(store_load_kv(C, "conv-2", kc, &err), KP_ELOST);
    assert_non_null(strstr(err.msg, "conv-2"));
    assert_int_equal(kc->n_pos, 0);
    store_entry se;
    assert_int_equal(store_stat(C, "conv-2", &se), 0);
    assert_true(se.kv_lost);
    assert_int_equal(se.n_tokens, 100);
    assert_string_equal(se.tier, "warm");
    tl = NULL;
    assert_int_equal(store_load_meta(C, "conv-2", &nt, &tl, NULL, NULL, &err), 0);
    assert_int_equal(nt, 100);
    assert_memory_equal(tl, tok, 100 * sizeof *tok);
    free(tl);
    assert_int_equal(store_load_kv(C, "conv-2", kc, &err), KP_ELOST); /* until the next save */
    store_stats cst;
    store_get_stats(C, &cst);
    assert_int_equal(cst.kv_lost, 1);
    /* recomputed and saved again: an ordinary version */
    assert_int_equal(store_save(C, "conv-2", &it, true, NULL, &err), 0);
    assert_int_equal(store_load_kv(C, "conv-2", kc, &err), 0);
    assert_true(kv_rows_equal(kv, kc, 100));
    assert_int_equal(store_stat(C, "conv-2", &se), 0);
    assert_false(se.kv_lost);
    kv_free(kc);

    /* Redis down: a session only in Redis is KP_EUNAVAIL (503), local ones unaffected */
    tu_redis_kill(&s);
    assert_int_equal(store_load_meta(C, "conv-9", &nt, NULL, NULL, NULL, &err), KP_EUNAVAIL);
    kv_cache *ka = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    assert_int_equal(store_load_kv(A, "conv-2", ka, &err), 0);
    assert_true(kv_rows_equal(kv, ka, 100));
    assert_int_equal(store_save(A, "conv-3", &it, true, NULL, &err), 0); /* queued, never blocks */

    store_close(A);
    store_close(B);
    store_close(C);
    remote_close(ra);
    remote_close(rb);
    remote_close(rc);
    kv_free(kv);
    kv_free(kb);
    kv_free(ka);
    free(tok);
    free(tok2);
    tu_rm_rf(da);
    tu_rm_rf(db);
    tu_rm_rf(dc);
    free(da);
    free(db);
    free(dc);
    tu_redis_done(&s);
}

/* Every replica keys owner ids with one secret: the first one's, through Redis. */
static void test_secret_share(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    char *da = tu_tmpdir(), *db = tu_tmpdir(), *dc = tu_tmpdir();
    remote *ra = NULL, *rb = NULL, *rc = NULL;
    store *A = open_store(da, s.url, &ra, STORE_REMOTE_WRITE_THROUGH, 0);
    kp_err err = {0};
    uint8_t sa[STORE_SECRET_BYTES], sb[STORE_SECRET_BYTES], sc[STORE_SECRET_BYTES];
    assert_int_equal(store_secret(da, sa, &err), 0);
    assert_int_equal(store_secret_share(da, ra, &err), 0); /* the first: its own goes up */
    uint8_t again[STORE_SECRET_BYTES];
    assert_int_equal(store_secret(da, again, &err), 0);
    assert_memory_equal(sa, again, sizeof sa);

    /* a fresh replica (its own secret drawn, no sessions): takes the deployment's */
    store *B = open_store(db, s.url, &rb, STORE_REMOTE_WRITE_THROUGH, 0);
    assert_int_equal(store_secret(db, sb, &err), 0);
    assert_memory_not_equal(sa, sb, sizeof sa);
    assert_int_equal(store_secret_share(db, rb, &err), 0);
    assert_int_equal(store_secret(db, sb, &err), 0);
    assert_memory_equal(sa, sb, sizeof sa);

    /* a replica whose dir holds sessions keyed with another secret: refused, nothing changed */
    store *C = open_store(dc, s.url, &rc, STORE_REMOTE_WRITE_BACK, 0);
    kv_cache *kv = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    tu_kv_fill(kv, 0, 40, 3);
    int32_t *tok = tu_make_tokens(40, 3);
    store_item it = {.tokens = tok, .n_tokens = 40, .kv = kv};
    assert_int_equal(store_save(C, "mine", &it, true, NULL, &err), 0);
    assert_int_equal(store_secret(dc, sc, &err), 0);
    assert_int_equal(store_secret_share(dc, rc, &err), KP_EMISMATCH);
    assert_non_null(strstr(err.msg, "empty --cold-dir"));
    assert_int_equal(store_secret(dc, again, &err), 0);
    assert_memory_equal(sc, again, sizeof sc);

    /* the secret key evicted (allkeys-lru): every record A writes carries a copy
     * (field k), so the next fresh replica still takes the deployment's */
    assert_int_equal(store_save(A, "conv-a", &it, true, NULL, &err), 0);
    assert_int_equal(remote_drain(ra, 10000), 0);
    freeReplyObject(raw(&s, "DEL %s", REMOTE_SECRET_KEY));
    char *dd = tu_tmpdir();
    remote *rd = NULL;
    store *D = open_store(dd, s.url, &rd, STORE_REMOTE_WRITE_THROUGH, 0);
    uint8_t sd[STORE_SECRET_BYTES];
    assert_int_equal(store_secret_share(dd, rd, &err), 0);
    assert_int_equal(store_secret(dd, sd, &err), 0);
    assert_memory_equal(sa, sd, sizeof sa);
    redisReply *k = raw(&s, "GET %s", REMOTE_SECRET_KEY); /* and it is back under its key */
    assert_int_equal(k->type, REDIS_REPLY_STRING);
    assert_memory_equal(k->str, sa, sizeof sa);
    freeReplyObject(k);
    store_close(D);
    remote_close(rd);
    tu_rm_rf(dd);
    free(dd);

    /* Redis down: a clear KP_EBUSY */
    tu_redis_kill(&s);
    assert_int_equal(store_secret_share(db, rb, &err), KP_EBUSY);

    store_close(A);
    store_close(B);
    store_close(C);
    remote_close(ra);
    remote_close(rb);
    remote_close(rc);
    kv_free(kv);
    free(tok);
    tu_rm_rf(da);
    tu_rm_rf(db);
    tu_rm_rf(dc);
    free(da);
    free(db);
    free(dc);
    tu_redis_done(&s);
}

static void test_store_write_back(void **state) {
    (void)state;
    tu_redis s;
    tu_redis_init(&s, NULL);
    char *da = tu_tmpdir(), *db = tu_tmpdir();
    remote *ra = NULL, *rb = NULL;
    /* A: write-back, a cold budget that holds one session */
    store *A = open_store(da, s.url, &ra, STORE_REMOTE_WRITE_BACK, 0);
    kp_err err = {0};
    kv_cache *kv = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    tu_kv_fill(kv, 0, 100, 5);
    int32_t *tok = tu_make_tokens(100, 9);
    store_item it = {.tokens = tok, .n_tokens = 100, .kv = kv};
    store_save_stats ss;
    assert_int_equal(store_save(A, "wb-1", &it, true, &ss, &err), 0);
    assert_int_equal(remote_drain(ra, 20000), 0);
    void *got = NULL;
    size_t n = 0;
    assert_int_equal(remote_get_record(ra, "wb-1", &got, &n, NULL, &err), KP_ENOTFOUND); /* not written through */
    store_close(A);
    A = open_store(da, s.url, &rb, STORE_REMOTE_WRITE_BACK, ss.bytes_total + ss.bytes_total / 2);
    int32_t *tok2 = tu_make_tokens(100, 10);
    store_item it2 = {.tokens = tok2, .n_tokens = 100, .kv = kv};
    assert_int_equal(store_save(A, "wb-2", &it2, true, NULL, &err), 0); /* evicts wb-1 from cold ... */
    assert_false(store_has(A, "wb-1"));
    assert_int_equal(remote_drain(rb, 20000), 0);
    assert_int_equal(remote_get_record(rb, "wb-1", &got, &n, NULL, &err), 0); /* ... into Redis */
    free(got);
    /* and it comes back from there */
    kv_cache *k2 = tu_kv_new(g_be, KP_TYPE_F32, NL, NCTX, NKV, HD);
    store_close(A);
    remote_close(ra);
    A = open_store(db, s.url, &ra, STORE_REMOTE_WRITE_BACK, 0);
    assert_int_equal(store_load_kv(A, "wb-1", k2, &err), 0);
    assert_true(kv_rows_equal(kv, k2, 100));
    store_close(A);
    remote_close(ra);
    remote_close(rb);
    kv_free(kv);
    kv_free(k2);
    free(tok);
    free(tok2);
    tu_rm_rf(da);
    tu_rm_rf(db);
    free(da);
    free(db);
    tu_redis_done(&s);
}

#endif

static int setup(void **state) {
    (void)state;
    kp_err err = {0};
    if (kp_backend_new(&g_be, "cpu", 1, &err)) fail_msg("backend: %s", err.msg);
    signal(SIGPIPE, SIG_IGN);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    kp_backend_free(g_be);
    return 0;
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_urls),
        cmocka_unit_test(test_roundtrip_and_prefix),
        cmocka_unit_test(test_garbage),
        cmocka_unit_test(test_concurrent_writers),
        cmocka_unit_test(test_eviction),
        cmocka_unit_test(test_budget),
        cmocka_unit_test(test_known_objects),
        cmocka_unit_test(test_killed_and_queue),
#if STORE_REMOTE
        cmocka_unit_test(test_store_two_replicas),
        cmocka_unit_test(test_store_write_back),
        cmocka_unit_test(test_secret_share),
#endif
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("remote", tests, setup, teardown);
}
