/*
 * test_sessions.c — the session table's limits, lifetime and owner ids
 * (server/sessions.h) on stories260K:
 *   - --max-sessions-per-key: one key at its limit does not block another;
 *     without keys the global limit is the only one; messages name the flag;
 *   - --session-ttl: an idle session is deleted from every tier (its record
 *     too), counted and reported as "expire"; a session in use stays;
 *   - a table opened on more stored sessions than max_sessions keeps them
 *     all and refuses new ones until under the cap;
 *   - owner ids are keyed (not the XXH64 of the key); a record written by an
 *     older version (magic "SXPK", unkeyed id) is found by its key after the
 *     upgrade and rewritten keyed; one whose key is not configured keeps its
 *     id (no access lost) and is migrated when its key is configured;
 *   - a hot session's sequence carries its owner (the scheduler's prefix
 *     reuse is scoped by it).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "compress/quality.h"
#include "engine/scheduler.h"
#include "server/sessions.h"
#include "storage/store.h"
#include "tests/testutil.h"

#define MAGIC_V1 0x4B505853u /* "SXPK": an older version's record (unkeyed owner) */
#define MAGIC_V2 0x32505853u /* "SXP2": keyed owner */

static model *g_m;
static sched *g_s;

static int setup(void **state) {
    (void)state;
    if (!tu_shared_exists("models/stories260K.gguf")) return 0;
    char *p = tu_shared_path("models/stories260K.gguf");
    kp_err err = {0};
    if (model_load(&g_m, p, NULL, &err)) fail_msg("%s", err.msg);
    free(p);
    if (sched_new(&g_s, g_m, NULL, &err)) fail_msg("%s", err.msg);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    sched_free(g_s);
    model_free(g_m);
    return 0;
}

static atomic_int g_expire_events;
static void on_event(void *ud, const char *kind, const char *tier, double secs) {
    (void)ud, (void)tier, (void)secs;
    if (!strcmp(kind, "expire")) atomic_fetch_add(&g_expire_events, 1);
}

static sess_opts opts(const char *dir) {
    sess_opts o = {.m = g_m, .sch = g_s, .kv_type = KP_TYPE_F32, .n_ctx = 64, .dir = dir, .max_sessions = 100,
                   .quiet = true, .on_event = on_event};
    return o;
}

static sess_table *open_table(const sess_opts *o) {
    sess_table *t = NULL;
    kp_err err = {0};
    if (sess_open(&t, o, &err)) fail_msg("sess_open: %s", err.msg);
    return t;
}

static uint64_t legacy_id(const char *key) { /* what older versions recorded */
    uint64_t h = XXH64(key, strlen(key), 0x6b7670);
    return h < 2 ? h + 2 : h;
}

/* Store a session of n tokens directly, with the server's 12 extra bytes. */
static void store_raw(const char *dir, const char *id, int n, uint32_t magic, uint64_t owner) {
    store_opts so = store_default_opts();
    so.dir = dir;
    so.shape = quality_codec_shape(g_m);
    so.kv_type = KP_TYPE_F32;
    store *st = NULL;
    kp_err err = {0};
    if (store_open(&st, &so, &err)) fail_msg("store_open: %s", err.msg);
    sched_seq *q = NULL;
    assert_int_equal(sched_seq_new(&q, g_m, KP_TYPE_F32, 64, &err), 0);
    tu_kv_fill(q->kv, 0, n, 7);
    q->kv->n_pos = n;
    int32_t *tok = tu_make_tokens(n, 3);
    uint8_t extra[12];
    memcpy(extra, &magic, 4);
    memcpy(extra + 4, &owner, 8);
    store_item it = {.tokens = tok, .n_tokens = n, .extra = extra, .extra_len = sizeof extra, .kv = q->kv};
    if (store_save(st, id, &it, true, NULL, &err)) fail_msg("store_save: %s", err.msg);
    free(tok);
    sched_seq_free(q);
    store_close(st);
}

/* The 12 extra bytes of a stored session, read by a store of its own. */
static void stored_owner(const char *dir, const char *id, uint32_t *magic, uint64_t *owner) {
    store_opts so = store_default_opts();
    so.dir = dir;
    so.shape = quality_codec_shape(g_m);
    so.kv_type = KP_TYPE_F32;
    store *st = NULL;
    kp_err err = {0};
    if (store_open(&st, &so, &err)) fail_msg("store_open: %s", err.msg);
    void *x = NULL;
    size_t xl = 0;
    if (store_load_meta(st, id, NULL, NULL, &x, &xl, &err)) fail_msg("store_load_meta: %s", err.msg);
    assert_int_equal(xl, 12);
    memcpy(magic, x, 4);
    memcpy(owner, (char *)x + 4, 8);
    free(x);
    store_close(st);
}

static void test_limits(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *dir = tu_tmpdir();
    const char *keys[] = {"key-a", "key-b"};
    uint64_t own[2];
    kp_err err = {0};
    assert_int_equal(sess_key_owners(dir, keys, 2, own, &err), 0);
    assert_int_not_equal(own[0], own[1]);
    assert_int_not_equal(own[0], legacy_id(keys[0])); /* keyed, not the bare hash of the key */
    assert_true(own[0] > 1 && own[1] > 1);
    sess_opts o = opts(dir);
    o.keys = keys;
    o.n_keys = 2;
    o.max_sessions_per_key = 2;
    sess_table *t = open_table(&o);
    sess_info info;
    for (int i = 0; i < 2; i++) assert_int_equal(sess_create(t, own[0], &info, &err), 0);
    assert_int_equal(sess_create(t, own[0], &info, &err), KP_EBUSY);
    assert_non_null(strstr(err.msg, "--max-sessions-per-key 2"));
    for (int i = 0; i < 2; i++) assert_int_equal(sess_create(t, own[1], &info, &err), 0);
    assert_int_equal(sess_create(t, own[1], &info, &err), KP_EBUSY);
    /* a hot session's sequence is its owner's */
    sess *x = NULL;
    char from[STORE_TIER_MAX];
    assert_int_equal(sess_acquire(t, info.id, own[1], true, &x, from, NULL, &err), 0);
    assert_int_equal(sess_seq(x)->owner, own[1]);
    sess_release(t, x, false);
    assert_int_equal(sess_delete(t, info.id, own[1], true, &err), 0);
    assert_int_equal(sess_create(t, own[1], &info, &err), 0);
    sess_close(t);
    tu_rm_rf(dir);

    /* no keys: the global limit only */
    o = opts(dir);
    o.max_sessions = 3;
    t = open_table(&o);
    for (int i = 0; i < 3; i++) assert_int_equal(sess_create(t, 0, &info, &err), 0);
    assert_int_equal(sess_create(t, 0, &info, &err), KP_EBUSY);
    assert_non_null(strstr(err.msg, "--max-sessions 3"));
    sess_close(t);
    tu_rm_rf(dir);
    free(dir);
}

static void test_ttl(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *dir = tu_tmpdir();
    store_raw(dir, "cold1", 20, MAGIC_V2, 0);
    sess_opts o = opts(dir);
    o.session_ttl_s = 1.0;
    atomic_store(&g_expire_events, 0);
    sess_table *t = open_table(&o); /* cold1 was saved just now: idle from then */
    sess_info a, b;
    kp_err err = {0};
    assert_int_equal(sess_create(t, 0, &a, &err), 0);
    assert_int_equal(sess_create(t, 0, &b, &err), 0);
    sess *held = NULL;
    assert_int_equal(sess_acquire(t, b.id, 0, false, &held, NULL, NULL, &err), 0);
    sess_info tmp;
    for (int i = 0; i < 2000 && (sess_get(t, a.id, 0, false, &tmp) == 0 || sess_get(t, "cold1", 0, false, &tmp) == 0); i++)
        usleep(10000); /* the test's own timeout catches a hang */
    assert_int_equal(sess_get(t, a.id, 0, false, &tmp), KP_ENOTFOUND);
    assert_int_equal(sess_get(t, "cold1", 0, false, &tmp), KP_ENOTFOUND);
    assert_int_equal(sess_get(t, b.id, 0, false, &tmp), 0); /* in use: kept */
    char rec[4096];
    snprintf(rec, sizeof rec, "%s/sessions/cold1.kvpm", dir);
    assert_false(tu_file_exists(rec));
    sess_counts c;
    sess_get_counts(t, &c);
    assert_int_equal(c.expired, 2);
    assert_int_equal(atomic_load(&g_expire_events), 2);
    sess_release(t, held, false);
    for (int i = 0; i < 2000 && sess_get(t, b.id, 0, false, &tmp) == 0; i++) usleep(10000);
    assert_int_equal(sess_get(t, b.id, 0, false, &tmp), KP_ENOTFOUND);
    sess_get_counts(t, &c);
    assert_int_equal(c.expired, 3);
    sess_close(t);
    tu_rm_rf(dir);
    free(dir);
}

static void test_restart_over_cap(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *dir = tu_tmpdir();
    const char *ids[] = {"s1", "s2", "s3"};
    for (int i = 0; i < 3; i++) store_raw(dir, ids[i], 10 + i, MAGIC_V2, 0);
    sess_opts o = opts(dir);
    o.max_sessions = 2;
    sess_table *t = open_table(&o);
    sess_info *v = NULL;
    size_t n = 0;
    assert_int_equal(sess_list(t, 0, false, &v, &n), 0);
    assert_int_equal(n, 3); /* every stored session is kept */
    free(v);
    sess_info info;
    kp_err err = {0};
    assert_int_equal(sess_create(t, 0, &info, &err), KP_EBUSY);
    assert_non_null(strstr(err.msg, "--max-sessions 2"));
    assert_int_equal(sess_delete(t, "s1", 0, false, &err), 0);
    assert_int_equal(sess_create(t, 0, &info, &err), KP_EBUSY); /* 2 = the cap */
    assert_int_equal(sess_delete(t, "s2", 0, false, &err), 0);
    assert_int_equal(sess_create(t, 0, &info, &err), 0);
    sess *x = NULL;
    char from[STORE_TIER_MAX];
    assert_int_equal(sess_acquire(t, "s3", 0, false, &x, from, NULL, &err), 0);
    assert_string_equal(from, "cold");
    assert_int_equal(sess_seq(x)->n_tokens, 12);
    sess_release(t, x, false);
    sess_close(t);
    tu_rm_rf(dir);
    free(dir);
}

static void test_owner_migration(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *dir = tu_tmpdir();
    store_raw(dir, "oldA", 12, MAGIC_V1, legacy_id("key-a"));
    store_raw(dir, "oldZ", 12, MAGIC_V1, legacy_id("key-z"));
    const char *keys[] = {"key-a", "key-b"};
    uint64_t own[2];
    kp_err err = {0};
    assert_int_equal(sess_key_owners(dir, keys, 2, own, &err), 0);
    sess_opts o = opts(dir);
    o.keys = keys;
    o.n_keys = 2;
    sess_table *t = open_table(&o);
    sess_info info;
    assert_int_equal(sess_get(t, "oldA", own[0], true, &info), 0);
    assert_int_equal(sess_get(t, "oldA", own[1], true, &info), KP_ENOTFOUND);
    assert_int_equal(sess_get(t, "oldA", legacy_id("key-a"), true, &info), KP_ENOTFOUND);
    /* key-z is not configured: its session keeps its id, nobody else gets it */
    assert_int_equal(sess_get(t, "oldZ", own[0], true, &info), KP_ENOTFOUND);
    assert_int_equal(sess_get(t, "oldZ", legacy_id("key-z"), true, &info), 0);
    sess_counts c;
    sess_get_counts(t, &c);
    assert_int_equal(c.migrated, 1);
    sess *x = NULL;
    char from[STORE_TIER_MAX];
    assert_int_equal(sess_acquire(t, "oldA", own[0], true, &x, from, NULL, &err), 0);
    assert_int_equal(sess_seq(x)->n_tokens, 12);
    sess_release(t, x, false);
    sess_close(t);
    uint32_t magic;
    uint64_t owner;
    stored_owner(dir, "oldA", &magic, &owner);
    assert_int_equal(magic, MAGIC_V2);
    assert_int_equal(owner, own[0]);
    stored_owner(dir, "oldZ", &magic, &owner);
    assert_int_equal(magic, MAGIC_V1);
    assert_int_equal(owner, legacy_id("key-z"));

    /* a later start with key-z configured migrates its session too */
    const char *keys2[] = {"key-a", "key-z"};
    uint64_t own2[2];
    assert_int_equal(sess_key_owners(dir, keys2, 2, own2, &err), 0);
    assert_int_equal(own2[0], own[0]); /* same directory, same secret */
    o.keys = keys2;
    t = open_table(&o);
    assert_int_equal(sess_get(t, "oldZ", own2[1], true, &info), 0);
    assert_int_equal(sess_get(t, "oldA", own2[0], true, &info), 0);
    sess_get_counts(t, &c);
    assert_int_equal(c.migrated, 1);
    sess_close(t);
    stored_owner(dir, "oldZ", &magic, &owner);
    assert_int_equal(magic, MAGIC_V2);
    assert_int_equal(owner, own2[1]);

    /* another directory has another secret: other ids for the same key */
    char *dir2 = tu_tmpdir();
    uint64_t own3[2];
    assert_int_equal(sess_key_owners(dir2, keys, 2, own3, &err), 0);
    assert_int_not_equal(own3[0], own[0]);
    tu_rm_rf(dir2);
    free(dir2);
    tu_rm_rf(dir);
    free(dir);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_limits),
        cmocka_unit_test(test_ttl),
        cmocka_unit_test(test_restart_over_cap),
        cmocka_unit_test(test_owner_migration),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("sessions", tests, setup, teardown);
}
