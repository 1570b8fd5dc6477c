/*
 * test_cas.c — the content-addressed chunk store (storage/cas.h): round trips
 * in the warm and cold tiers, durability across close/reopen, warm budget
 * spilling to cold, cold budget eviction order (unreferenced first, then LRU
 * referenced, counted and logged), reference counts and collection, one copy
 * per key, corruption (a flipped payload byte found at get, every header byte
 * and every truncation found at open, a file under another key's name), torn
 * .tmp files removed at open, disk full (a 64 KiB tmpfs), cas_where and
 * cas_persist (warm-only object written down, survives a restart; a failing
 * write keeps the warm copy and leaves no file), and four threads
 * hammering overlapping keys. Everything runs in a fresh temporary directory.
 */
#include "tests/testutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <signal.h>
#include <sys/mount.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>
#include <xxhash.h>

#include "storage/cas.h"

#define HDR 56

/* ---- helpers --------------------------------------------------------------- */

static cas_key key_n(int i) {
    char id[32];
    snprintf(id, sizeof id, "test-key-%d", i);
    return cas_key_of(id, strlen(id));
}

/* Deterministic bytes for object i. */
static uint8_t *obj_bytes(int i, size_t n) {
    uint8_t *b = malloc(n ? n : 1);
    assert_non_null(b);
    uint64_t s = 0x9e3779b97f4a7c15ull * (uint64_t)(i + 1);
    for (size_t j = 0; j < n; j++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        b[j] = (uint8_t)(s >> 32);
    }
    return b;
}

static long file_size(const char *p) {
    struct stat sb;
    return stat(p, &sb) ? -1 : (long)sb.st_size;
}

/* Regular files directly in dir (0 if it does not exist). */
static int count_files(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *de;
    while ((de = readdir(d))) if (de->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

static int count_quarantine(const char *dir) {
    char q[1024];
    snprintf(q, sizeof q, "%s/quarantine", dir);
    return count_files(q);
}

static cas *open_cas(const char *dir, uint64_t warm, uint64_t cold,
                     void (*log)(void *, const char *), void *ud) {
    cas_opts o = cas_default_opts();
    o.dir = dir;
    if (warm) o.warm_budget = warm;
    o.cold_budget = cold;
    o.log = log;
    o.log_ud = ud;
    cas *c = NULL;
    kp_err err = {0};
    if (cas_open(&c, &o, &err)) fail_msg("cas_open: %s", err.msg);
    return c;
}

static void put_ok(cas *c, int i, size_t n, bool durable) {
    uint8_t *b = obj_bytes(i, n);
    kp_err err = {0};
    int rc = cas_put(c, key_n(i), b, n, durable, &err);
    if (rc) fail_msg("cas_put %d: %s", i, err.msg);
    free(b);
}

/* get object i and compare with its expected bytes. */
static void get_ok(cas *c, int i, size_t n) {
    void *d = NULL;
    size_t len = 0;
    kp_err err = {0};
    int rc = cas_get(c, key_n(i), &d, &len, &err);
    if (rc) fail_msg("cas_get %d: %s", i, err.msg);
    assert_int_equal(len, n);
    uint8_t *b = obj_bytes(i, n);
    assert_memory_equal(d, b, n);
    free(b);
    free(d);
}

static int get_rc(cas *c, int i, kp_err *err) {
    void *d = NULL;
    size_t len = 0;
    int rc = cas_get(c, key_n(i), &d, &len, err);
    free(d);
    return rc;
}

/* The log callback: records the messages; calls back into the store to
 * prove it runs with no lock held (a held lock would deadlock here). */
typedef struct logrec {
    cas *c;
    int n;
    char all[8192];
} logrec;

static void log_cb(void *ud, const char *msg) {
    logrec *r = ud;
    if (r->c) {
        cas_stats st;
        cas_get_stats(r->c, &st);
    }
    r->n++;
    size_t used = strlen(r->all);
    snprintf(r->all + used, sizeof r->all - used, "%s\n", msg);
}

/* ---- tests --------------------------------------------------------------------- */

static void test_key(void **state) {
    (void)state;
    cas_key a = key_n(1), b = key_n(1), c = key_n(2);
    assert_true(a.hi == b.hi && a.lo == b.lo);
    assert_false(a.hi == c.hi && a.lo == c.lo);
    XXH128_hash_t h = XXH3_128bits("test-key-1", 10);
    assert_true(a.hi == h.high64 && a.lo == h.low64);
    char hex[33];
    cas_key_hex((cas_key){0x0123456789abcdefull, 0xfedcba9876543210ull}, hex);
    assert_string_equal(hex, "0123456789abcdeffedcba9876543210");
}

static void test_warm_roundtrip(void **state) {
    (void)state;
    cas_opts o = cas_default_opts();
    cas *c = NULL;
    kp_err err = {0};
    assert_int_equal(cas_open(&c, &o, &err), 0);
    put_ok(c, 1, 1000, false);
    put_ok(c, 2, 0, false);
    get_ok(c, 1, 1000);
    get_ok(c, 2, 0);
    assert_true(cas_has(c, key_n(1)));
    assert_false(cas_has(c, key_n(3)));
    assert_int_equal(get_rc(c, 3, &err), KP_ENOTFOUND);
    uint8_t x = 1;
    assert_int_equal(cas_put(c, key_n(4), &x, 1, true, &err), KP_EINVAL); /* no cold tier */
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.hits_warm, 2);
    assert_int_equal(st.misses, 1);
    assert_int_equal(st.warm_objects, 2);
    assert_int_equal(st.warm_bytes, 1000);
    assert_int_equal(st.cold_objects, 0);
    cas_close(c);
}

static void test_durable_reopen(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 1, 5000, true);
    put_ok(c, 2, 3000, false); /* warm only: gone after close */
    char p[1024];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    assert_int_equal(file_size(p), HDR + 5000);
    size_t n = 0;
    char *f = tu_read_file(p, &n);
    assert_non_null(f);
    assert_memory_equal(f, "KVPKOBJ1", 8);
    free(f);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.cold_objects, 1);
    assert_int_equal(st.cold_bytes, 5000);
    cas_close(c);

    c = open_cas(dir, 0, 0, NULL, NULL);
    assert_true(cas_has(c, key_n(1)));
    assert_false(cas_has(c, key_n(2)));
    get_ok(c, 1, 5000);
    get_ok(c, 1, 5000); /* promoted to warm by the first get */
    cas_get_stats(c, &st);
    assert_int_equal(st.hits_cold, 1);
    assert_int_equal(st.hits_warm, 1);
    assert_int_equal(st.cold_objects, 1);
    assert_int_equal(st.quarantined, 0);
    /* a ref of an object known only from disk works after a re-open */
    assert_int_equal(cas_refcount(c, key_n(1)), 0);
    assert_int_equal(cas_ref(c, key_n(1)), 0);
    assert_int_equal(cas_refcount(c, key_n(1)), 1);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

static void test_warm_spill(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 10000, 0, NULL, NULL);
    for (int i = 0; i < 10; i++) put_ok(c, i, 4000, false);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_true(st.warm_bytes <= 10000);
    assert_int_equal(st.warm_objects, 2);
    assert_int_equal(st.spilled, 8);
    assert_int_equal(st.cold_objects, 8);
    assert_int_equal(st.cold_bytes, 8 * 4000);
    /* the two most recent are warm, the oldest are on disk */
    get_ok(c, 9, 4000);
    cas_get_stats(c, &st);
    assert_int_equal(st.hits_warm, 1);
    get_ok(c, 0, 4000);
    cas_get_stats(c, &st);
    assert_int_equal(st.hits_cold, 1);
    for (int i = 0; i < 10; i++) get_ok(c, i, 4000);
    cas_get_stats(c, &st);
    assert_true(st.warm_bytes <= 10000);
    assert_int_equal(st.hits_warm + st.hits_cold, 12);
    /* spilled objects are files, not durable-put ones only */
    char p[1024];
    tu_cas_obj_path(dir, key_n(0), p, sizeof p);
    assert_int_equal(file_size(p), HDR + 4000);
    cas_close(c);
    /* spilled objects survive a restart */
    c = open_cas(dir, 0, 0, NULL, NULL);
    for (int i = 0; i < 8; i++) get_ok(c, i, 4000);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

static void test_cold_budget(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    logrec lr;
    memset(&lr, 0, sizeof lr);
    /* warm of 1 byte: every object ends up cold-only */
    cas *c = open_cas(dir, 1, 3000, log_cb, &lr);
    lr.c = c;
    put_ok(c, 0, 1000, false); assert_int_equal(cas_ref(c, key_n(0)), 0);  /* A */
    put_ok(c, 1, 1000, false);                                             /* B (unref) */
    put_ok(c, 2, 1000, false); assert_int_equal(cas_ref(c, key_n(2)), 0);  /* C */
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.cold_bytes, 3000);
    assert_int_equal(st.warm_bytes, 0);
    /* D: over budget; the unreferenced B goes first, silently */
    put_ok(c, 3, 1000, false); assert_int_equal(cas_ref(c, key_n(3)), 0);
    assert_false(cas_has(c, key_n(1)));
    assert_true(cas_has(c, key_n(0)));
    cas_get_stats(c, &st);
    assert_int_equal(st.dropped, 0);
    assert_int_equal(lr.n, 0);
    char p[1024];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    assert_int_equal(file_size(p), -1);
    /* E: only referenced ones left; the least recently used (A) is dropped */
    put_ok(c, 4, 1000, false);
    assert_false(cas_has(c, key_n(0)));
    assert_true(cas_has(c, key_n(2)));
    assert_true(cas_has(c, key_n(3)));
    assert_true(cas_has(c, key_n(4)));
    cas_get_stats(c, &st);
    assert_int_equal(st.dropped, 1);
    assert_int_equal(st.cold_bytes, 3000);
    assert_int_equal(lr.n, 1);
    char hex[33];
    cas_key_hex(key_n(0), hex);
    assert_non_null(strstr(lr.all, hex));
    assert_non_null(strstr(lr.all, "dropped"));
    /* LRU follows use: touch C, then F pushes out the unreferenced E first,
     * and G (after E is gone) the least recently used referenced one, D */
    assert_int_equal(cas_ref(c, key_n(4)), 0);
    assert_int_equal(cas_unref(c, key_n(4)), 0);
    get_ok(c, 2, 1000);
    put_ok(c, 5, 1000, false); assert_int_equal(cas_ref(c, key_n(5)), 0);
    assert_false(cas_has(c, key_n(4)));
    put_ok(c, 6, 1000, false);
    assert_false(cas_has(c, key_n(3)));
    assert_true(cas_has(c, key_n(2)));
    get_ok(c, 2, 1000);
    get_ok(c, 5, 1000);
    get_ok(c, 6, 1000);
    cas_get_stats(c, &st);
    assert_int_equal(st.dropped, 2);
    assert_int_equal(lr.n, 2);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

static void test_refcount_collect(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 1, 100, true);
    put_ok(c, 2, 100, false);
    put_ok(c, 3, 100, true);
    assert_int_equal(cas_ref(c, key_n(1)), 0);
    assert_int_equal(cas_ref(c, key_n(1)), 0);
    assert_int_equal(cas_ref(c, key_n(2)), 0);
    assert_int_equal(cas_unref(c, key_n(1)), 0);
    assert_int_equal(cas_refcount(c, key_n(1)), 1);
    assert_int_equal(cas_refcount(c, key_n(2)), 1);
    assert_int_equal(cas_refcount(c, key_n(3)), 0);
    assert_int_equal(cas_unref(c, key_n(3)), KP_ERANGE);
    assert_int_equal(cas_ref(c, key_n(9)), KP_ENOTFOUND);
    assert_int_equal(cas_unref(c, key_n(9)), KP_ENOTFOUND);
    /* a second put leaves the refcount alone */
    put_ok(c, 1, 100, true);
    assert_int_equal(cas_refcount(c, key_n(1)), 1);

    assert_int_equal(cas_collect(c), 1); /* 3 */
    assert_false(cas_has(c, key_n(3)));
    char p[1024];
    tu_cas_obj_path(dir, key_n(3), p, sizeof p);
    assert_int_equal(file_size(p), -1);
    assert_int_equal(cas_collect(c), 0);
    assert_int_equal(cas_unref(c, key_n(2)), 0);
    assert_int_equal(cas_collect(c), 1); /* 2 */
    assert_false(cas_has(c, key_n(2)));
    get_ok(c, 1, 100);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.collected, 2);
    assert_int_equal(st.warm_objects, 1);
    assert_int_equal(st.cold_objects, 1);
    cas_close(c);
    /* after a restart refcounts start at 0: collect frees what nobody re-refs */
    c = open_cas(dir, 0, 0, NULL, NULL);
    assert_int_equal(cas_refcount(c, key_n(1)), 0);
    assert_int_equal(cas_collect(c), 1);
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    assert_int_equal(file_size(p), -1);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

static void test_same_key_once(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 7, 2000, true);
    put_ok(c, 7, 2000, true);
    put_ok(c, 7, 2000, false);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.warm_objects, 1);
    assert_int_equal(st.warm_bytes, 2000);
    assert_int_equal(st.cold_objects, 1);
    assert_int_equal(st.cold_bytes, 2000);
    char hex[33], sub[1024];
    cas_key_hex(key_n(7), hex);
    snprintf(sub, sizeof sub, "%s/objects/%.2s", dir, hex);
    assert_int_equal(count_files(sub), 1);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

static void test_corrupt_payload(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    logrec lr;
    memset(&lr, 0, sizeof lr);
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 1, 3000, true);
    put_ok(c, 2, 3000, true);
    cas_close(c);
    char p[1024];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    size_t n = 0;
    char *f = tu_read_file(p, &n);
    assert_non_null(f);
    f[HDR + 1234] ^= 0x10;
    tu_write_file(p, f, n);
    free(f);

    c = open_cas(dir, 0, 0, log_cb, &lr);
    lr.c = c;
    assert_true(cas_has(c, key_n(1))); /* the header is fine: known until read */
    assert_int_equal(cas_ref(c, key_n(1)), 0);
    kp_err err = {0};
    assert_int_equal(get_rc(c, 1, &err), KP_EFORMAT);
    char hex[33];
    cas_key_hex(key_n(1), hex);
    assert_non_null(strstr(err.msg, hex));
    assert_int_equal(file_size(p), -1);
    assert_int_equal(count_quarantine(dir), 1);
    assert_int_equal(lr.n, 1);
    assert_non_null(strstr(lr.all, hex));
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.quarantined, 1);
    assert_int_equal(st.cold_objects, 1);
    assert_false(cas_has(c, key_n(1)));
    assert_int_equal(get_rc(c, 1, &err), KP_ENOTFOUND);
    get_ok(c, 2, 3000); /* the neighbour is unharmed */
    cas_close(c);

    /* truncated while the store runs (the object is cold-only) */
    c = open_cas(dir, 0, 0, NULL, NULL);
    tu_cas_obj_path(dir, key_n(2), p, sizeof p);
    assert_int_equal(truncate(p, HDR + 100), 0);
    assert_int_equal(get_rc(c, 2, &err), KP_EFORMAT);
    assert_int_equal(count_quarantine(dir), 2);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

/* Every single-byte flip of the header, and every truncation / extension,
 * is found at open and quarantined; a good neighbour stays. */
static void test_bad_files_at_open(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 1, 300, true);
    put_ok(c, 2, 300, true);
    cas_close(c);
    char p[1024];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    size_t n = 0;
    char *good = tu_read_file(p, &n);
    assert_non_null(good);
    assert_int_equal(n, HDR + 300);
    char *bad = malloc(n + 1);
    assert_non_null(bad);
    int expect_q = 0;
    for (int pass = 0; pass < 2; pass++) {
        int cases = pass == 0 ? HDR : 7;
        static const long cuts[7] = {0, 1, 8, HDR - 1, HDR, HDR + 299, HDR + 301};
        for (int i = 0; i < cases; i++) {
            size_t len = n;
            memcpy(bad, good, n);
            if (pass == 0) {
                bad[i] ^= 0x01;
            } else {
                len = (size_t)cuts[i];
                if (len > n) bad[n] = 0;
            }
            tu_write_file(p, bad, len);
            c = open_cas(dir, 0, 0, NULL, NULL);
            expect_q++;
            cas_stats st;
            cas_get_stats(c, &st);
            if (st.quarantined != 1)
                fail_msg("pass %d case %d: %d quarantined, expected 1", pass, i,
                         (int)st.quarantined);
            assert_false(cas_has(c, key_n(1)));
            assert_true(cas_has(c, key_n(2)));
            assert_int_equal(file_size(p), -1);
            assert_int_equal(count_quarantine(dir), expect_q);
            cas_close(c);
        }
    }
    free(bad);
    free(good);
    tu_rm_rf(dir);
    free(dir);
}

static void test_tmp_and_names(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 0, 0, NULL, NULL);
    put_ok(c, 1, 500, true);
    cas_close(c);
    char p[1024], hex[33], q[1100];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    size_t n = 0;
    char *good = tu_read_file(p, &n);
    assert_non_null(good);
    cas_key_hex(key_n(1), hex);
    /* torn writes */
    snprintf(q, sizeof q, "%s.tmp", p);
    tu_write_file(q, good, n / 2);
    snprintf(q, sizeof q, "%s/objects/00", dir);
    mkdir(q, 0755);
    snprintf(q, sizeof q, "%s/objects/00/whatever.tmp", dir);
    tu_write_file(q, "x", 1);
    /* not ours: left alone */
    snprintf(q, sizeof q, "%s/objects/00/README", dir);
    tu_write_file(q, "hello", 5);
    /* a good file under another key's name, in the wrong KK dir, in upper case */
    char hex2[33];
    cas_key_hex(key_n(2), hex2);
    snprintf(q, sizeof q, "%s/objects/%.2s", dir, hex2);
    mkdir(q, 0755);
    snprintf(q, sizeof q, "%s/objects/%.2s/%s.kvo", dir, hex2, hex2);
    tu_write_file(q, good, n);
    const char *kk = strncmp(hex, "00", 2) ? "00" : "01";
    snprintf(q, sizeof q, "%s/objects/%s", dir, kk);
    mkdir(q, 0755);
    snprintf(q, sizeof q, "%s/objects/%s/%s.kvo", dir, kk, hex);
    tu_write_file(q, good, n);
    char up[33];
    for (int i = 0; i < 33; i++) up[i] = (char)(hex[i] >= 'a' ? hex[i] - 32 : hex[i]);
    snprintf(q, sizeof q, "%s/objects/%.2s/%s.kvo", dir, hex, up);
    if (strcmp(up, hex)) tu_write_file(q, good, n);
    int n_bad = strcmp(up, hex) ? 3 : 2;

    c = open_cas(dir, 0, 0, NULL, NULL);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.tmp_removed, 2);
    assert_int_equal(st.quarantined, n_bad);
    assert_int_equal(count_quarantine(dir), n_bad);
    assert_int_equal(st.cold_objects, 1);
    assert_false(cas_has(c, key_n(2)));
    get_ok(c, 1, 500);
    snprintf(q, sizeof q, "%s.tmp", p);
    assert_int_equal(file_size(q), -1);
    snprintf(q, sizeof q, "%s/objects/00/README", dir);
    assert_int_equal(file_size(q), 5);
    cas_close(c);
    free(good);
    tu_rm_rf(dir);
    free(dir);
}

static void test_disk_full(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    char mnt[1024];
    snprintf(mnt, sizeof mnt, "%s/mnt", dir);
    assert_int_equal(mkdir(mnt, 0755), 0);
    if (mount("tmpfs", mnt, "tmpfs", 0, "size=64k")) {
        print_message("SKIP: cannot mount a 64 KiB tmpfs (%s); needs root\n", strerror(errno));
        tu_rm_rf(dir);
        free(dir);
        skip();
    }
    logrec lr;
    memset(&lr, 0, sizeof lr);
    cas *c = open_cas(mnt, 1 << 20, 0, log_cb, &lr);
    lr.c = c;
    /* durable puts of 16 KiB until the disk is full */
    int failed_at = -1;
    kp_err err = {0};
    for (int i = 0; i < 10 && failed_at < 0; i++) {
        uint8_t *b = obj_bytes(i, 16384);
        int rc = cas_put(c, key_n(i), b, 16384, true, &err);
        free(b);
        if (rc) {
            assert_int_equal(rc, KP_ENOSPC);
            failed_at = i;
        }
    }
    assert_true(failed_at > 0);
    assert_non_null(strstr(err.msg, "No space"));
    assert_true(lr.n >= 1);
    /* the warm copy is kept and readable; the earlier ones too */
    assert_true(cas_has(c, key_n(failed_at)));
    for (int i = 0; i <= failed_at; i++) get_ok(c, i, 16384);
    /* no torn file left behind */
    char hex[33], tmp[1200];
    cas_key_hex(key_n(failed_at), hex);
    snprintf(tmp, sizeof tmp, "%s/objects/%.2s/%s.kvo.tmp", mnt, hex, hex);
    assert_int_equal(file_size(tmp), -1);
    /* the store keeps working: non-durable puts, and spills that fail keep RAM */
    cas_close(c);
    c = open_cas(mnt, 40000, 0, log_cb, &lr);
    lr.c = c;
    int before = lr.n;
    for (int i = 20; i < 26; i++) put_ok(c, i, 16384, false);
    for (int i = 20; i < 26; i++) get_ok(c, i, 16384);
    assert_true(lr.n > before); /* spill failures were logged */
    for (int i = 0; i < failed_at; i++) get_ok(c, i, 16384);
    cas_close(c);
    umount(mnt);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- where, persist ---------------------------------------------------------- */

static void test_where_and_persist(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 1 << 20, 0, NULL, NULL);
    assert_int_equal(cas_where(c, key_n(1)), 0);
    put_ok(c, 1, 3000, false);
    put_ok(c, 2, 3000, true);
    assert_int_equal(cas_where(c, key_n(1)), CAS_IN_WARM);
    assert_int_equal(cas_where(c, key_n(2)), CAS_IN_WARM | CAS_IN_COLD);
    char p[1200];
    tu_cas_obj_path(dir, key_n(1), p, sizeof p);
    assert_int_equal(file_size(p), -1);
    kp_err err = {0};
    assert_int_equal(cas_persist(c, key_n(1), &err), 0);
    assert_int_equal(file_size(p), 3000 + 56);
    assert_int_equal(cas_where(c, key_n(1)), CAS_IN_WARM | CAS_IN_COLD);
    assert_int_equal(cas_persist(c, key_n(1), &err), 0); /* no-op */
    assert_int_equal(cas_persist(c, key_n(2), &err), 0);
    assert_int_equal(cas_persist(c, key_n(3), &err), KP_ENOTFOUND);
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.cold_objects, 2);
    assert_int_equal(st.cold_bytes, 6000);
    cas_ref(c, key_n(1));
    cas_close(c);
    /* the persisted copy survives a restart */
    c = open_cas(dir, 1 << 20, 0, NULL, NULL);
    assert_int_equal(cas_where(c, key_n(1)), CAS_IN_COLD);
    get_ok(c, 1, 3000);
    assert_int_equal(cas_where(c, key_n(1)), CAS_IN_WARM | CAS_IN_COLD); /* promoted */
    cas_close(c);

    /* a failing write (RLIMIT_FSIZE: EFBIG, as a full disk) keeps the warm copy */
    logrec lr;
    memset(&lr, 0, sizeof lr);
    c = open_cas(dir, 1 << 20, 0, log_cb, &lr);
    lr.c = c;
    put_ok(c, 4, 3000, false);
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*oh)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = 1000;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    int rc = cas_persist(c, key_n(4), &err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, oh);
    assert_int_equal(rc, KP_ENOSPC);
    assert_non_null(strstr(err.msg, "File too large"));
    assert_int_equal(lr.n, 1);
    assert_int_equal(cas_where(c, key_n(4)), CAS_IN_WARM);
    tu_cas_obj_path(dir, key_n(4), p, sizeof p);
    assert_int_equal(file_size(p), -1);
    char t[1300];
    snprintf(t, sizeof t, "%s.tmp", p);
    assert_int_equal(file_size(t), -1);
    get_ok(c, 4, 3000);
    assert_int_equal(cas_persist(c, key_n(4), &err), 0);
    assert_int_equal(cas_where(c, key_n(4)), CAS_IN_WARM | CAS_IN_COLD);
    cas_close(c);

    /* without a cold tier */
    c = open_cas(NULL, 0, 0, NULL, NULL);
    put_ok(c, 1, 10, false);
    assert_int_equal(cas_persist(c, key_n(1), &err), KP_EINVAL);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- concurrency ------------------------------------------------------------- */

#define CT_THREADS 4
#define CT_KEYS 48
#define CT_OPS 3000

typedef struct ct_arg {
    cas *c;
    int tid;
    long refs[CT_KEYS]; /* this thread's net refs */
    long gets, misses;
    int bad;
} ct_arg;

static size_t ct_len(int k) { return 1000 + (size_t)(k % 7) * 500; }

static void *ct_main(void *p) {
    ct_arg *a = p;
    uint64_t s = 0x1234567ull + (uint64_t)a->tid * 7919;
    for (int op = 0; op < CT_OPS; op++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        int k = (int)((s >> 8) % CT_KEYS);
        int what = (int)((s >> 40) % 100);
        if (what < 30) {
            uint8_t *b = obj_bytes(k, ct_len(k));
            if (cas_put(a->c, key_n(k), b, ct_len(k), what < 3, NULL)) a->bad++;
            free(b);
        } else if (what < 65) {
            void *d = NULL;
            size_t len = 0;
            int rc = cas_get(a->c, key_n(k), &d, &len, NULL);
            a->gets++;
            if (rc == KP_ENOTFOUND) {
                a->misses++;
            } else if (rc) {
                a->bad++;
            } else {
                uint8_t *b = obj_bytes(k, ct_len(k));
                if (len != ct_len(k) || memcmp(d, b, len)) a->bad++;
                free(b);
            }
            free(d);
        } else if (what < 82) {
            if (cas_ref(a->c, key_n(k)) == 0) a->refs[k]++;
        } else if (what < 98) {
            if (a->refs[k] > 0) {
                if (cas_unref(a->c, key_n(k))) a->bad++;
                else a->refs[k]--;
            }
        } else {
            cas_collect(a->c);
        }
    }
    return NULL;
}

static void test_concurrency(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    cas *c = open_cas(dir, 20000, 0, NULL, NULL);
    ct_arg args[CT_THREADS];
    pthread_t th[CT_THREADS];
    for (int t = 0; t < CT_THREADS; t++) {
        memset(&args[t], 0, sizeof args[t]);
        args[t].c = c;
        args[t].tid = t;
        assert_int_equal(pthread_create(&th[t], NULL, ct_main, &args[t]), 0);
    }
    long gets = 0, misses = 0;
    for (int t = 0; t < CT_THREADS; t++) {
        pthread_join(th[t], NULL);
        assert_int_equal(args[t].bad, 0);
        gets += args[t].gets;
        misses += args[t].misses;
    }
    cas_stats st;
    cas_get_stats(c, &st);
    assert_int_equal(st.hits_warm + st.hits_cold + st.misses, (uint64_t)gets);
    assert_int_equal(st.misses, (uint64_t)misses);
    assert_true(st.spilled > 0);
    assert_true(st.hits_cold > 0);
    assert_int_equal(st.dropped, 0);
    int referenced = 0;
    for (int k = 0; k < CT_KEYS; k++) {
        long want = 0;
        for (int t = 0; t < CT_THREADS; t++) want += args[t].refs[k];
        assert_int_equal(cas_refcount(c, key_n(k)), (uint64_t)want);
        if (want) referenced++;
    }
    assert_true(referenced > 0);
    cas_collect(c);
    cas_get_stats(c, &st);
    assert_int_equal(st.warm_objects + st.cold_objects >= (uint64_t)referenced, 1);
    int present = 0;
    for (int k = 0; k < CT_KEYS; k++) {
        if (!cas_has(c, key_n(k))) continue;
        present++;
        assert_true(cas_refcount(c, key_n(k)) > 0);
        get_ok(c, k, ct_len(k));
    }
    assert_int_equal(present, referenced);
    cas_close(c);
    tu_rm_rf(dir);
    free(dir);
}

/* cas_put_ref: stored and referenced in one step (park.c used cas_put then
 * cas_ref, and under load another thread's budget enforcement could drop the
 * new, unreferenced object in between: "span vanished right after being
 * stored"). Each call takes one reference; a failed put takes none. */
static void test_put_ref(void **state) {
    (void)state;
    cas *c = open_cas(NULL, 64, 0, NULL, NULL); /* warm only, 64 bytes */
    uint8_t *b = obj_bytes(1, 4096);
    kp_err err = {0};
    assert_int_equal(cas_put_ref(c, key_n(1), b, 4096, false, &err), 0);
    assert_int_equal(cas_refcount(c, key_n(1)), 1);
    get_ok(c, 1, 4096);
    assert_int_equal(cas_put_ref(c, key_n(1), b, 4096, false, &err), 0);
    assert_int_equal(cas_refcount(c, key_n(1)), 2);
    assert_int_equal(cas_put_ref(c, key_n(2), b, 16, true, &err), KP_EINVAL); /* durable without a dir */
    assert_int_equal(cas_refcount(c, key_n(2)), 0);
    free(b);
    cas_close(c);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_key),
        cmocka_unit_test(test_put_ref),
        cmocka_unit_test(test_warm_roundtrip),
        cmocka_unit_test(test_durable_reopen),
        cmocka_unit_test(test_warm_spill),
        cmocka_unit_test(test_cold_budget),
        cmocka_unit_test(test_refcount_collect),
        cmocka_unit_test(test_same_key_once),
        cmocka_unit_test(test_corrupt_payload),
        cmocka_unit_test(test_bad_files_at_open),
        cmocka_unit_test(test_tmp_and_names),
        cmocka_unit_test(test_disk_full),
        cmocka_unit_test(test_where_and_persist),
        cmocka_unit_test(test_concurrency),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
