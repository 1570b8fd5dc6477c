/*
 * test_store.c — the tiered session store (storage/store.h) on the CPU
 * backend with a small KV shape (3 layers x 2 KV heads x 8 dims; layout sink
 * 4, window 16, chunk 16 so a session of 100 tokens is 7 span objects),
 * F32 and F16 caches filled with random rows:
 *   - ids: validation, no path traversal, fresh ids;
 *   - round trips bit-identical with codec none (durable and not), int8
 *     within tolerance (lossless spans exact), shape / type / room refused;
 *   - reopen: durable sessions come back, warm-only ones after store_close
 *     flushed them; a "crash" (child _exit without close) after a
 *     non-durable save brings back the last durable version;
 *   - legacy v1 blobs imported at open (F16 blob into an F32 store
 *     converted), foreign blobs left alone, corrupt ones quarantined;
 *   - shared-prefix dedup (refcounts, bytes_new), resave with a longer
 *     conversation (spans reused, old objects released), delete releases
 *     objects (files gone), foreign records keep their objects;
 *   - cold budget: LRU sessions dropped and counted, never the pinned or the
 *     just-saved one, a session bigger than the budget refused; warm budget
 *     spills to cold;
 *   - corruption: flips in every region of a record and truncations
 *     quarantined at open, a corrupt object fails the load with KP_ELOST
 *     naming the session (record quarantined, its token ids kept as a
 *     tokens-only record across a restart until the next save, others fine),
 *     a missing object at open the same, torn .tmp removed;
 *   - disk full (RLIMIT_FSIZE: writes fail with EFBIG): the save fails with
 *     KP_ENOSPC, the previous version stays restorable, no references leak;
 *   - the per-store secret: created once with mode 0600, read back the same,
 *     a damaged one refused (never replaced); store_set_extra rewrites a
 *     durable record's extra bytes (survives reopen) and a warm one's;
 *   - scopes: spans are shared within one scope only;
 *   - pipelined begin/layer/end equals store_load_kv; abandoned keeps n_pos;
 *   - 8 threads saving / loading / deleting overlapping ids (with and
 *     without a cold budget): every load self-consistent, and no reference
 *     or object left once everything is deleted.
 */
#include "tests/testutil.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "kernels/types.h"
#include "compress/codecfile.h"
#include "storage/blob.h"
#include "storage/cas.h"
#include "storage/park.h"
#include "storage/store.h"

#define NL 3
#define NKV 2
#define HD 8
#define NCTX 256
#define FP_A 0x1234567890abcdefull
#define FP_B 0x0badc0ffee123456ull
#define PATHN 1400

/* ---- helpers --------------------------------------------------------------- */

static kp_backend *g_be; /* one CPU backend for the whole program */

static kv_cache *new_kv(int type) { return tu_kv_new(g_be, type, NL, NCTX, NKV, HD); }

static int rows_equal(const kv_cache *a, const kv_cache *b, int n) {
    for (int l = 0; l < NL; l++) {
        if (memcmp(a->k[l], b->k[l], (size_t)n * a->row_bytes)) return 0;
        if (memcmp(a->v[l], b->v[l], (size_t)n * a->row_bytes)) return 0;
    }
    return 1;
}

/* What the store reported through its callbacks. */
typedef struct logrec {
    pthread_mutex_t mu;
    int n_log, n_drop;
    char last[600];
    char all[16384];
    char dropped[64][65];
} logrec;

static void log_cb(void *ud, const char *msg) {
    logrec *lr = ud;
    pthread_mutex_lock(&lr->mu);
    lr->n_log++;
    snprintf(lr->last, sizeof lr->last, "%s", msg);
    size_t l = strlen(lr->all);
    if (l + strlen(msg) + 2 < sizeof lr->all) {
        strcat(lr->all, msg);
        strcat(lr->all, "\n");
    }
    pthread_mutex_unlock(&lr->mu);
}

static void drop_cb(void *ud, const char *id) {
    logrec *lr = ud;
    pthread_mutex_lock(&lr->mu);
    if (lr->n_drop < 64) snprintf(lr->dropped[lr->n_drop], 65, "%s", id);
    lr->n_drop++;
    pthread_mutex_unlock(&lr->mu);
}

static logrec *logrec_new(void) {
    logrec *lr = calloc(1, sizeof *lr);
    pthread_mutex_init(&lr->mu, NULL);
    return lr;
}
static void logrec_free(logrec *lr) {
    pthread_mutex_destroy(&lr->mu);
    free(lr);
}

typedef struct sopts {
    const char *codec;
    int kv_type;
    uint64_t fp;
    uint64_t warm, cold;
    logrec *lr;
} sopts;

static store *open_store_o(const char *dir, sopts so) {
    store_opts o = store_default_opts();
    o.dir = dir;
    o.shape = (codec_shape){.n_layer = NL, .n_kv_heads = NKV, .head_dim = HD, .n_rot = HD,
                            .rope_base = 10000.f, .rope_freq_scale = 1.f,
                            .model_fingerprint = so.fp ? so.fp : FP_A};
    o.kv_type = so.kv_type;
    o.codec = so.codec;
    o.layout = (park_layout){.sink = 4, .window = 16, .chunk = 16};
    if (so.warm) o.warm_budget = so.warm;
    o.cold_budget = so.cold;
    if (so.lr) {
        o.log = log_cb;
        o.on_drop = drop_cb;
        o.ud = so.lr;
    }
    store *s = NULL;
    kp_err err = {0};
    if (store_open(&s, &o, &err)) fail_msg("store_open: %s", err.msg);
    return s;
}

static store *open_store(const char *dir, logrec *lr) {
    return open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .lr = lr});
}

/* Save a session of n tokens (token seed tseed, rows seed rseed). */
static void save_ok(store *s, const char *id, int type, int n, uint64_t tseed, uint64_t rseed,
                    bool durable, store_save_stats *st) {
    kv_cache *kv = new_kv(type);
    tu_kv_fill(kv, 0, n, rseed);
    int32_t *tok = tu_make_tokens(n, tseed);
    char extra[32];
    snprintf(extra, sizeof extra, "extra-%s-%d", id, n);
    store_item it = {.tokens = tok, .n_tokens = n, .extra = extra, .extra_len = strlen(extra),
                     .kv = kv};
    kp_err err = {0};
    int rc = store_save(s, id, &it, durable, st, &err);
    if (rc) fail_msg("store_save '%s': %s", id, err.msg);
    free(tok);
    kv_free(kv);
}

/* Load id and compare with what save_ok(n, tseed, rseed) saved (bit-exact). */
static void load_check(store *s, const char *id, int type, int n, uint64_t tseed, uint64_t rseed) {
    kv_cache *want = new_kv(type), *got = new_kv(type);
    tu_kv_fill(want, 0, n, rseed);
    tu_kv_fill(got, 0, NCTX, 999); /* other data everywhere */
    got->n_pos = 3;
    kp_err err = {0};
    int rc = store_load_kv(s, id, got, &err);
    if (rc) fail_msg("store_load_kv '%s': %s", id, err.msg);
    assert_int_equal(got->n_pos, n);
    assert_true(rows_equal(want, got, n));
    int nt = 0;
    int32_t *tok = NULL;
    void *x = NULL;
    size_t xl = 0;
    assert_int_equal(store_load_meta(s, id, &nt, &tok, &x, &xl, &err), 0);
    assert_int_equal(nt, n);
    int32_t *t2 = tu_make_tokens(n, tseed);
    assert_memory_equal(tok, t2, (size_t)n * sizeof *tok);
    char extra[32];
    snprintf(extra, sizeof extra, "extra-%s-%d", id, n);
    assert_int_equal(xl, strlen(extra));
    assert_memory_equal(x, extra, xl);
    free(t2);
    free(tok);
    free(x);
    kv_free(want);
    kv_free(got);
}

static void rec_file(const char *dir, const char *id, char *out) {
    snprintf(out, PATHN, "%s/sessions/%s.kvpm", dir, id);
}

/* The manifest in a record file (offset 64, length at 16). */
static void read_manifest(const char *dir, const char *id, park_manifest *m) {
    char p[PATHN];
    rec_file(dir, id, p);
    size_t n = 0;
    uint8_t *b = (uint8_t *)tu_read_file(p, &n);
    assert_non_null(b);
    uint32_t ml;
    memcpy(&ml, b + 16, 4);
    kp_err err = {0};
    if (park_manifest_read(b + 64, ml, m, &err)) fail_msg("manifest of '%s': %s", id, err.msg);
    free(b);
}

static void obj_file(const char *dir, cas_key k, char *out) {
    char hex[33];
    cas_key_hex(k, hex);
    snprintf(out, PATHN, "%s/objects/%.2s/%s.kvo", dir, hex, hex);
}

static int count_files(const char *dir, const char *suffix) {
    DIR *d = opendir(dir);
    if (!d) return 0;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.') continue;
        char p[PATHN];
        snprintf(p, sizeof p, "%s/%s", dir, e->d_name);
        struct stat sb;
        if (lstat(p, &sb)) continue;
        if (S_ISDIR(sb.st_mode)) n += count_files(p, suffix);
        else if (!suffix || (strlen(e->d_name) >= strlen(suffix) &&
                             !strcmp(e->d_name + strlen(e->d_name) - strlen(suffix), suffix)))
            n++;
    }
    closedir(d);
    return n;
}

static int count_objects(const char *dir) {
    char p[PATHN];
    snprintf(p, sizeof p, "%s/objects", dir);
    return count_files(p, ".kvo");
}

static int count_quarantine(const char *dir) {
    char p[PATHN];
    snprintf(p, sizeof p, "%s/quarantine", dir);
    return count_files(p, NULL);
}

/* ---- ids ------------------------------------------------------------------------ */

static void test_ids(void **state) {
    (void)state;
    assert_true(store_id_valid("a"));
    assert_true(store_id_valid("Az09_-"));
    char l64[65], l65[66];
    memset(l64, 'x', 64), l64[64] = 0;
    memset(l65, 'x', 65), l65[65] = 0;
    assert_true(store_id_valid(l64));
    assert_false(store_id_valid(l65));
    const char *bad[] = {"", "../x", "a/b", "..", ".", "a b", "a.kvpm", "x\n", "é"};
    for (size_t i = 0; i < KP_ARRAY_LEN(bad); i++) assert_false(store_id_valid(bad[i]));
    assert_false(store_id_valid(NULL));
    char id[23], id2[23];
    assert_int_equal(store_new_id(id), 0);
    assert_int_equal(store_new_id(id2), 0);
    assert_int_equal(strlen(id), 22);
    assert_true(store_id_valid(id));
    assert_string_not_equal(id, id2);

    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    kv_cache *kv = new_kv(KP_TYPE_F32);
    tu_kv_fill(kv, 0, 10, 1);
    int32_t *tok = tu_make_tokens(10, 1);
    store_item it = {.tokens = tok, .n_tokens = 10, .kv = kv};
    kp_err err = {0};
    for (size_t i = 0; i < KP_ARRAY_LEN(bad); i++) {
        assert_int_equal(store_save(s, bad[i], &it, true, NULL, &err), KP_EINVAL);
        assert_int_equal(store_load_kv(s, bad[i], kv, &err), KP_EINVAL);
        assert_int_equal(store_delete(s, bad[i], &err), KP_EINVAL);
        assert_int_equal(store_load_meta(s, bad[i], NULL, NULL, NULL, NULL, &err), KP_EINVAL);
        assert_int_equal(store_flush(s, bad[i], &err), KP_EINVAL);
        assert_false(store_has(s, bad[i]));
    }
    char p[PATHN];
    snprintf(p, sizeof p, "%s/x.kvpm", dir);
    assert_false(tu_file_exists(p));
    assert_int_equal(count_files(dir, NULL), 0);
    assert_int_equal(store_load_kv(s, "nope", kv, &err), KP_ENOTFOUND);
    assert_int_equal(store_delete(s, "nope", &err), KP_ENOTFOUND);
    assert_int_equal(store_flush(s, "nope", &err), KP_ENOTFOUND);
    store_entry e;
    assert_int_equal(store_stat(s, "nope", &e), KP_ENOTFOUND);
    /* bad items */
    it.n_tokens = 9;
    assert_int_equal(store_save(s, "a", &it, true, NULL, &err), KP_EINVAL);
    it.n_tokens = 10;
    it.extra_len = (1u << 20) + 1;
    it.extra = tok;
    assert_int_equal(store_save(s, "a", &it, true, NULL, &err), KP_EINVAL);
    it.extra_len = 0;
    tok[3] = -5; /* token ids are >= 0 (the manifest stores them as u32) */
    assert_int_equal(store_save(s, "a", &it, true, NULL, &err), KP_EINVAL);
    it.tokens = NULL;
    assert_int_equal(store_save(s, "a", &it, true, NULL, &err), KP_EINVAL);
    assert_false(store_has(s, "a"));
    store_close(s);
    kv_free(kv);
    free(tok);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- round trips ------------------------------------------------------------------- */

static void test_roundtrip(void **state) {
    (void)state;
    const int types[] = {KP_TYPE_F32, KP_TYPE_F16};
    for (int ti = 0; ti < 2; ti++) {
        int type = types[ti];
        char *dir = tu_tmpdir();
        store *s = open_store_o(dir, (sopts){.kv_type = type});
        assert_string_equal(store_codec_name(s), "none");
        store_save_stats st;
        save_ok(s, "dur", type, 100, 1, 1, true, &st);
        assert_true(st.bytes_new > 0);
        assert_int_equal(st.bytes_total, st.bytes_new);
        assert_int_equal(st.spans_reused, 0);
        assert_int_equal(st.fp16_bytes, 100ull * NL * 2 * NKV * HD * 2);
        save_ok(s, "warm1", type, 77, 2, 2, false, NULL);
        save_ok(s, "one", type, 1, 3, 3, true, NULL);
        load_check(s, "dur", type, 100, 1, 1);
        load_check(s, "warm1", type, 77, 2, 2);
        load_check(s, "one", type, 1, 3, 3);
        store_entry e;
        assert_int_equal(store_stat(s, "dur", &e), 0);
        assert_string_equal(e.id, "dur");
        assert_int_equal(e.n_tokens, 100);
        assert_true(e.durable);
        assert_true(e.bytes > st.bytes_total);
        assert_true(e.mtime_unix_ms > 1600000000000ll);
        assert_string_equal(e.tier, "warm"); /* a durable put keeps a warm copy */
        assert_int_equal(store_stat(s, "warm1", &e), 0);
        assert_false(e.durable);
        assert_string_equal(e.tier, "warm");
        char p[PATHN];
        rec_file(dir, "warm1", p);
        assert_false(tu_file_exists(p));
        rec_file(dir, "dur", p);
        assert_true(tu_file_exists(p));

        /* refused: other shape, other type, too little room; n_pos unchanged */
        kp_err err = {0};
        kv_cache *small = NULL;
        assert_int_equal(kv_new(&small, g_be, type, NL, 50, NKV, HD, &err), 0);
        small->n_pos = 5;
        assert_int_equal(store_load_kv(s, "dur", small, &err), KP_ERANGE);
        assert_int_equal(small->n_pos, 5);
        kv_free(small);
        kv_cache *other = NULL;
        assert_int_equal(kv_new(&other, g_be, type, NL + 1, NCTX, NKV, HD, &err), 0);
        assert_int_equal(store_load_kv(s, "dur", other, &err), KP_EMISMATCH);
        other->n_pos = 10;
        int32_t tk[10] = {0};
        store_item it = {.tokens = tk, .n_tokens = 10, .kv = other};
        assert_int_equal(store_save(s, "x", &it, true, NULL, &err), KP_EMISMATCH);
        kv_free(other);
        kv_cache *wt = new_kv(type == KP_TYPE_F32 ? KP_TYPE_F16 : KP_TYPE_F32);
        wt->n_pos = 7;
        assert_int_equal(store_load_kv(s, "dur", wt, &err), KP_EMISMATCH);
        assert_int_equal(wt->n_pos, 7);
        kv_free(wt);
        assert_true(store_has(s, "dur")); /* not forgotten: nothing was corrupt */

        store_entry *ents = NULL;
        size_t n = 0;
        assert_int_equal(store_list(s, &ents, &n), 0);
        assert_int_equal(n, 3);
        assert_string_equal(ents[0].id, "dur");
        assert_string_equal(ents[1].id, "one");
        assert_string_equal(ents[2].id, "warm1");
        free(ents);
        store_stats ss;
        store_get_stats(s, &ss);
        assert_int_equal(ss.n_entries, 3);
        assert_int_equal(ss.n_warm, 3);
        assert_int_equal(ss.saves, 3);
        assert_int_equal(ss.loads, 3);
        assert_int_equal(ss.quarantined, 0);
        store_close(s);
        tu_rm_rf(dir);
        free(dir);
    }
}

static double max_diff_f32(const kv_cache *a, const kv_cache *b, int r0, int r1) {
    double mx = 0;
    size_t d = NKV * HD;
    for (int l = 0; l < NL; l++)
        for (int v = 0; v < 2; v++) {
            const float *x = v ? a->v[l] : a->k[l], *y = v ? b->v[l] : b->k[l];
            for (size_t i = (size_t)r0 * d; i < (size_t)r1 * d; i++)
                mx = fmax(mx, fabs((double)x[i] - (double)y[i]));
        }
    return mx;
}

static void test_int8_and_lazy_codec(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store_o(dir, (sopts){.codec = "int8", .kv_type = KP_TYPE_F32});
    assert_string_equal(store_codec_name(s), "int8");
    store_save_stats st;
    save_ok(s, "q", KP_TYPE_F32, 120, 5, 5, true, &st);
    assert_true(st.bytes_total < st.fp16_bytes); /* really coded */
    kv_cache *want = new_kv(KP_TYPE_F32), *got = new_kv(KP_TYPE_F32);
    tu_kv_fill(want, 0, 120, 5);
    kp_err err = {0};
    assert_int_equal(store_load_kv(s, "q", got, &err), 0);
    assert_int_equal(got->n_pos, 120);
    /* sink [0,4) and window [104,120) lossless, [4,104) int8 (|x| <= 2) */
    assert_true(max_diff_f32(want, got, 0, 4) == 0);
    assert_true(max_diff_f32(want, got, 104, 120) == 0);
    double e = max_diff_f32(want, got, 4, 104);
    assert_true(e > 0 && e < 2.0 / 127 + 1e-3);
    store_close(s);

    /* a store whose own codec is "none" opens int8 for this session lazily */
    s = open_store(dir, NULL);
    assert_true(store_has(s, "q"));
    tu_kv_fill(got, 0, NCTX, 9);
    kv_cache *got2 = new_kv(KP_TYPE_F32);
    assert_int_equal(store_load_kv(s, "q", got2, &err), 0);
    assert_int_equal(store_load_kv(s, "q", got, &err), 0);
    assert_true(rows_equal(got, got2, 120)); /* deterministic */
    assert_true(max_diff_f32(want, got, 4, 104) == e);
    store_close(s);
    kv_free(want);
    kv_free(got);
    kv_free(got2);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- codec files: kept, switched at run time -------------------------------------- */

/* A synthetic learned codec file for the store's shape (model fp), its
 * layout chunk 16, sink 4, window 8; path: DIR/NAME. */
static void write_codec_file(const char *path, uint64_t fp, uint64_t seed) {
    codec_shape sh = {.n_layer = NL, .n_kv_heads = NKV, .head_dim = HD, .n_rot = HD,
                      .rope_base = 10000.f, .rope_freq_scale = 1.f, .model_fingerprint = fp};
    uint64_t st = seed;
    codec *c = tu_learned_codec(&sh, CODEC_LEARNED, 1, &st);
    codec_learned *cl = (codec_learned *)c;
    cl->chunk = 16;
    cl->sink = 4;
    cl->window = 8;
    kp_err err = {0};
    if (codecfile_write(c, path, &err)) fail_msg("codecfile_write: %s", err.msg);
    codec_free(c);
}

static kv_cache *load_rows(store *s, const char *id, int n) {
    kv_cache *got = new_kv(KP_TYPE_F32);
    kp_err err = {0};
    if (store_load_kv(s, id, got, &err)) fail_msg("store_load_kv '%s': %s", id, err.msg);
    assert_int_equal(got->n_pos, n);
    return got;
}

static void test_codec_files(void **state) {
    (void)state;
    char *dir = tu_tmpdir(), *src = tu_tmpdir();
    char pa[PATHN], pb[PATHN], pc[PATHN], kept[PATHN];
    snprintf(pa, sizeof pa, "%s/a.kvcodec", src);
    snprintf(pb, sizeof pb, "%s/b.kvcodec", src);
    snprintf(pc, sizeof pc, "%s/other-model.kvcodec", src);
    write_codec_file(pa, FP_A, 1);
    write_codec_file(pb, FP_A, 2);
    write_codec_file(pc, FP_B, 3);
    snprintf(kept, sizeof kept, "%s/codecs", dir);

    /* parked with a: the file is kept before the save; the codec's own layout */
    store *s = open_store_o(dir, (sopts){.codec = pa, .kv_type = KP_TYPE_F32});
    assert_string_equal(store_codec_name(s), "a.kvcodec");
    assert_int_equal(count_files(kept, ".kvcodec"), 1);
    save_ok(s, "sa", KP_TYPE_F32, 120, 1, 1, true, NULL);
    park_manifest m;
    read_manifest(dir, "sa", &m);
    assert_string_equal(m.codec, "a.kvcodec");
    assert_true(m.codec_hash != 0);
    assert_int_equal(m.layout.window, 8);
    park_manifest_free(&m);
    kv_cache *ra = load_rows(s, "sa", 120);
    kv_cache *want = new_kv(KP_TYPE_F32);
    tu_kv_fill(want, 0, 120, 1);
    assert_true(max_diff_f32(want, ra, 4, 112) > 0); /* really coded */
    assert_true(max_diff_f32(want, ra, 112, 120) == 0); /* the codec's window, not the store's 16 */

    /* switched to b at run time: new saves use b, sa still decodes with a */
    kp_err err = {0};
    assert_int_equal(store_set_codec(s, pb, &err), 0);
    assert_string_equal(store_codec_name(s), "b.kvcodec");
    assert_int_equal(count_files(kept, ".kvcodec"), 2);
    save_ok(s, "sb", KP_TYPE_F32, 100, 2, 2, true, NULL);
    read_manifest(dir, "sb", &m);
    assert_string_equal(m.codec, "b.kvcodec");
    park_manifest_free(&m);
    kv_cache *ra2 = load_rows(s, "sa", 120), *rb = load_rows(s, "sb", 100);
    assert_true(rows_equal(ra, ra2, 120));
    kv_free(ra2);
    /* another model's codec file is refused and changes nothing */
    assert_int_equal(store_set_codec(s, pc, &err), KP_EMISMATCH);
    assert_string_equal(store_codec_name(s), "b.kvcodec");
    assert_int_equal(store_set_codec(s, "/nonexistent/x.kvcodec", &err), KP_ENOTFOUND);
    assert_int_equal(store_set_codec(s, "int8", &err), 0);
    assert_string_equal(store_codec_name(s), "int8");
    save_ok(s, "s8", KP_TYPE_F32, 50, 3, 3, true, NULL);
    store_close(s);

    /* the original files gone, another codec given: every session restores
     * exactly as before from the kept copies; the other model's file is not kept */
    assert_int_equal(unlink(pa), 0);
    assert_int_equal(unlink(pb), 0);
    s = open_store_o(dir, (sopts){.codec = "none", .kv_type = KP_TYPE_F32});
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.kv_lost, 0);
    assert_int_equal(ss.foreign, 0);
    ra2 = load_rows(s, "sa", 120);
    kv_cache *rb2 = load_rows(s, "sb", 100), *r8 = load_rows(s, "s8", 50);
    assert_true(rows_equal(ra, ra2, 120));
    assert_true(rows_equal(rb, rb2, 100));
    kv_free(ra2);
    kv_free(rb2);
    kv_free(r8);
    assert_int_equal(count_files(kept, ".kvcodec"), 2);
    store_close(s);

    /* the kept copies gone too: a's and b's sessions keep their token ids
     * (KV lost, recomputed by the server); int8's restores */
    DIR *d = opendir(kept);
    struct dirent *de;
    while ((de = readdir(d))) {
        if (de->d_name[0] == '.') continue;
        char p[2 * PATHN];
        snprintf(p, sizeof p, "%s/%s", kept, de->d_name);
        assert_int_equal(unlink(p), 0);
    }
    closedir(d);
    s = open_store_o(dir, (sopts){.codec = "none", .kv_type = KP_TYPE_F32});
    store_get_stats(s, &ss);
    assert_int_equal(ss.kv_lost, 2);
    kv_cache *got = new_kv(KP_TYPE_F32);
    assert_int_equal(store_load_kv(s, "sa", got, &err), KP_ELOST);
    int nt = 0;
    int32_t *tok = NULL;
    void *x = NULL;
    size_t xl = 0;
    assert_int_equal(store_load_meta(s, "sa", &nt, &tok, &x, &xl, &err), 0);
    assert_int_equal(nt, 120);
    free(tok);
    free(x);
    r8 = load_rows(s, "s8", 50);
    kv_free(r8);
    kv_free(got);
    store_close(s);

    kv_free(ra);
    kv_free(rb);
    kv_free(want);
    tu_rm_rf(dir);
    tu_rm_rf(src);
    free(dir);
    free(src);
}

/* ---- reopen, flush, crash ----------------------------------------------------------- */

static void test_reopen_and_flush(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    save_ok(s, "d", KP_TYPE_F32, 100, 1, 1, true, NULL);
    save_ok(s, "w", KP_TYPE_F32, 60, 2, 2, false, NULL);
    save_ok(s, "f", KP_TYPE_F32, 40, 3, 3, false, NULL);
    kp_err err = {0};
    assert_int_equal(store_flush(s, "f", &err), 0);
    assert_int_equal(store_flush(s, "f", &err), 0); /* no-op */
    store_entry e;
    assert_int_equal(store_stat(s, "f", &e), 0);
    assert_true(e.durable);
    char p[PATHN];
    rec_file(dir, "f", p);
    assert_true(tu_file_exists(p));
    rec_file(dir, "w", p);
    assert_false(tu_file_exists(p));
    store_close(s); /* flushes "w" */
    assert_true(tu_file_exists(p));

    s = open_store(dir, NULL);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.n_entries, 3);
    assert_int_equal(ss.n_cold, 3);
    assert_int_equal(ss.quarantined, 0);
    assert_int_equal(store_stat(s, "w", &e), 0);
    assert_true(e.durable);
    assert_string_equal(e.tier, "cold");
    load_check(s, "d", KP_TYPE_F32, 100, 1, 1);
    load_check(s, "w", KP_TYPE_F32, 60, 2, 2);
    load_check(s, "f", KP_TYPE_F32, 40, 3, 3);
    assert_int_equal(store_stat(s, "w", &e), 0);
    assert_string_equal(e.tier, "warm"); /* promoted by the load */

    /* a crash after a non-durable resave brings back the durable version */
    store_close(s);
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0) {
        store *s2 = open_store(dir, NULL);
        kv_cache *kv = new_kv(KP_TYPE_F32);
        tu_kv_fill(kv, 0, 130, 1);
        int32_t *tok = tu_make_tokens(130, 1);
        store_item it = {.tokens = tok, .n_tokens = 130, .kv = kv};
        int rc = store_save(s2, "d", &it, false, NULL, NULL);
        _exit(rc == 0 && store_has(s2, "d") ? 0 : 1); /* no close: a crash */
    }
    int wst = 0;
    assert_int_equal(waitpid(pid, &wst, 0), pid);
    assert_true(WIFEXITED(wst) && WEXITSTATUS(wst) == 0);
    s = open_store(dir, NULL);
    load_check(s, "d", KP_TYPE_F32, 100, 1, 1);

    /* and a non-durable resave that is flushed replaces it for good */
    save_ok(s, "d", KP_TYPE_F32, 130, 1, 1, false, NULL);
    load_check(s, "d", KP_TYPE_F32, 130, 1, 1);
    store_close(s);
    s = open_store(dir, NULL);
    load_check(s, "d", KP_TYPE_F32, 130, 1, 1);
    store_get_stats(s, &ss);
    assert_int_equal(ss.quarantined, 0);
    store_close(s);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- legacy import ---------------------------------------------------------------- */

static void write_blob(const char *dir, const char *id, uint64_t fp, int type, int n, uint64_t tseed,
                       uint64_t rseed) {
    kv_cache *kv = new_kv(type);
    tu_kv_fill(kv, 0, n, rseed);
    int32_t *tok = tu_make_tokens(n, tseed);
    char extra[32], p[PATHN];
    snprintf(extra, sizeof extra, "extra-%s-%d", id, n);
    snprintf(p, sizeof p, "%s/%s.kvps", dir, id);
    blob_meta m;
    memset(&m, 0, sizeof m);
    m.model_fingerprint = fp;
    m.n_tokens = n;
    kp_err err = {0};
    if (blob_write(p, &m, tok, extra, strlen(extra), kv, NULL, &err)) fail_msg("blob: %s", err.msg);
    free(tok);
    kv_free(kv);
}

static void test_legacy_import(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    write_blob(dir, "L1", FP_A, KP_TYPE_F32, 100, 11, 11);
    write_blob(dir, "L2", FP_A, KP_TYPE_F16, 70, 12, 12);
    write_blob(dir, "Lforeign", FP_B, KP_TYPE_F32, 50, 13, 13);
    write_blob(dir, "Lbad", FP_A, KP_TYPE_F32, 50, 14, 14);
    char p[PATHN];
    snprintf(p, sizeof p, "%s/Lbad.kvps", dir);
    int fd = open(p, O_RDWR);
    uint8_t z = 0x5a;
    assert_int_equal(pwrite(fd, &z, 1, 30), 1); /* header */
    close(fd);
    logrec *lr = logrec_new();
    store *s = open_store(dir, lr);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.imported, 2);
    assert_int_equal(ss.foreign, 1);
    assert_int_equal(ss.quarantined, 1);
    assert_int_equal(ss.saves, 0);
    assert_int_equal(ss.n_entries, 2);
    assert_non_null(strstr(lr->all, "imported legacy session 'L1'"));
    snprintf(p, sizeof p, "%s/L1.kvps", dir);
    assert_false(tu_file_exists(p));
    snprintf(p, sizeof p, "%s/L2.kvps", dir);
    assert_false(tu_file_exists(p));
    snprintf(p, sizeof p, "%s/Lforeign.kvps", dir);
    assert_true(tu_file_exists(p));
    snprintf(p, sizeof p, "%s/Lbad.kvps", dir);
    assert_false(tu_file_exists(p));
    assert_int_equal(count_quarantine(dir), 1);
    rec_file(dir, "L1", p);
    assert_true(tu_file_exists(p)); /* durable */
    load_check(s, "L1", KP_TYPE_F32, 100, 11, 11);
    /* L2 was F16: converted to the store's F32, exactly */
    kv_cache *h = new_kv(KP_TYPE_F16), *want = new_kv(KP_TYPE_F32), *got = new_kv(KP_TYPE_F32);
    tu_kv_fill(h, 0, 70, 12);
    for (int l = 0; l < NL; l++)
        for (size_t i = 0; i < 70 * NKV * HD; i++) {
            ((float *)want->k[l])[i] = kp_fp16_to_f32(((uint16_t *)h->k[l])[i]);
            ((float *)want->v[l])[i] = kp_fp16_to_f32(((uint16_t *)h->v[l])[i]);
        }
    kp_err err = {0};
    assert_int_equal(store_load_kv(s, "L2", got, &err), 0);
    assert_int_equal(got->n_pos, 70);
    assert_true(rows_equal(want, got, 70));
    kv_free(h);
    kv_free(want);
    kv_free(got);
    store_close(s);
    /* again: nothing more to import, the sessions are there */
    s = open_store(dir, NULL);
    store_get_stats(s, &ss);
    assert_int_equal(ss.imported, 0);
    assert_int_equal(ss.n_entries, 2);
    assert_int_equal(ss.foreign, 1);
    load_check(s, "L1", KP_TYPE_F32, 100, 11, 11);
    store_close(s);
    logrec_free(lr);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- sharing, resave, delete ------------------------------------------------------------ */

static void test_dedup_and_delete(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    cas *c = store_cas(s);
    /* A: 100 tokens. B: the same first 36 tokens and rows (sink [0,4) and two
     * coded chunks [4,20) [20,36)), then its own. */
    kv_cache *kv = new_kv(KP_TYPE_F32);
    tu_kv_fill(kv, 0, 100, 1);
    int32_t *ta = tu_make_tokens(100, 1), *tb = tu_make_tokens(90, 1);
    for (int i = 36; i < 90; i++) tb[i] = 600 + i;
    store_item ia = {.tokens = ta, .n_tokens = 100, .kv = kv};
    store_save_stats sa, sb;
    kp_err err = {0};
    assert_int_equal(store_save(s, "A", &ia, true, &sa, &err), 0);
    tu_kv_fill(kv, 36, 90, 2);
    store_item ib = {.tokens = tb, .n_tokens = 90, .kv = kv};
    assert_int_equal(store_save(s, "B", &ib, true, &sb, &err), 0);
    assert_int_equal(sa.spans_reused, 0);
    assert_int_equal(sb.spans_reused, 3);
    assert_true(sb.bytes_new < sa.bytes_new);
    assert_true(sb.bytes_new < sb.bytes_total);
    park_manifest ma, mb;
    read_manifest(dir, "A", &ma);
    read_manifest(dir, "B", &mb);
    assert_int_equal(ma.n_spans, 7);
    for (int i = 0; i < 3; i++) {
        assert_true(ma.spans[i].key.hi == mb.spans[i].key.hi && ma.spans[i].key.lo == mb.spans[i].key.lo);
        assert_int_equal(cas_refcount(c, ma.spans[i].key), 2);
    }
    for (int i = 3; i < ma.n_spans; i++) assert_int_equal(cas_refcount(c, ma.spans[i].key), 1);
    int n_obj = count_objects(dir);
    assert_int_equal(n_obj, ma.n_spans + mb.n_spans - 3);

    /* B restores with A's rows for the shared prefix */
    kv_cache *got = new_kv(KP_TYPE_F32);
    assert_int_equal(store_load_kv(s, "B", got, &err), 0);
    assert_true(rows_equal(kv, got, 90));

    /* delete A: its own objects go, the shared ones stay */
    assert_int_equal(store_delete(s, "A", &err), 0);
    assert_false(store_has(s, "A"));
    assert_int_equal(store_delete(s, "A", &err), KP_ENOTFOUND);
    char p[PATHN];
    rec_file(dir, "A", p);
    assert_false(tu_file_exists(p));
    for (int i = 0; i < 3; i++) assert_int_equal(cas_refcount(c, ma.spans[i].key), 1);
    for (int i = 3; i < ma.n_spans; i++) {
        obj_file(dir, ma.spans[i].key, p);
        assert_false(tu_file_exists(p));
        assert_false(cas_has(c, ma.spans[i].key));
    }
    assert_int_equal(count_objects(dir), mb.n_spans);
    tu_kv_fill(got, 0, NCTX, 5);
    assert_int_equal(store_load_kv(s, "B", got, &err), 0);
    assert_true(rows_equal(kv, got, 90));
    assert_int_equal(store_delete(s, "B", &err), 0);
    assert_int_equal(count_objects(dir), 0);
    cas_stats cs;
    cas_get_stats(c, &cs);
    assert_int_equal(cs.warm_objects + cs.cold_objects, 0);
    store_close(s);
    park_manifest_free(&ma);
    park_manifest_free(&mb);
    free(ta);
    free(tb);
    kv_free(kv);
    kv_free(got);
    tu_rm_rf(dir);
    free(dir);
}

static void test_resave_longer(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    cas *c = store_cas(s);
    save_ok(s, "X", KP_TYPE_F32, 100, 1, 1, true, NULL);
    park_manifest m1, m2;
    read_manifest(dir, "X", &m1);
    store_save_stats st;
    /* the same conversation, 40 tokens longer: same prefix tokens and rows */
    save_ok(s, "X", KP_TYPE_F32, 140, 1, 1, true, &st);
    read_manifest(dir, "X", &m2);
    assert_int_equal(m2.n_tokens, 140);
    /* sink + coded [4..84) are the same spans: 6 reused */
    assert_int_equal(st.spans_reused, 6);
    assert_true(st.bytes_new < st.bytes_total);
    for (int i = 0; i < 6; i++) assert_int_equal(cas_refcount(c, m1.spans[i].key), 1);
    /* the old window span [84,100) is released and gone */
    cas_key old_win = m1.spans[6].key;
    assert_int_equal(m1.spans[6].span.start, 84);
    assert_false(cas_has(c, old_win));
    char p[PATHN];
    obj_file(dir, old_win, p);
    assert_false(tu_file_exists(p));
    assert_int_equal(count_objects(dir), m2.n_spans);
    for (int i = 0; i < m2.n_spans; i++) assert_int_equal(cas_refcount(c, m2.spans[i].key), 1);
    load_check(s, "X", KP_TYPE_F32, 140, 1, 1);
    /* non-durable resave, even longer: the durable version stays referenced */
    save_ok(s, "X", KP_TYPE_F32, 150, 1, 1, false, NULL);
    for (int i = 0; i < m2.n_spans; i++) assert_true(cas_refcount(c, m2.spans[i].key) >= 1);
    load_check(s, "X", KP_TYPE_F32, 150, 1, 1);
    kp_err err = {0};
    assert_int_equal(store_flush(s, "X", &err), 0);
    park_manifest m3;
    read_manifest(dir, "X", &m3);
    assert_int_equal(m3.n_tokens, 150);
    assert_int_equal(count_objects(dir), m3.n_spans);
    store_close(s);
    s = open_store(dir, NULL);
    load_check(s, "X", KP_TYPE_F32, 150, 1, 1);
    store_close(s);
    park_manifest_free(&m1);
    park_manifest_free(&m2);
    park_manifest_free(&m3);
    tu_rm_rf(dir);
    free(dir);
}

static void test_foreign_records(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    save_ok(s, "mine", KP_TYPE_F32, 100, 1, 1, true, NULL);
    store_close(s);
    int n_obj = count_objects(dir);
    logrec *lr = logrec_new();
    /* another model; then another KV type: left alone, objects kept */
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .fp = FP_B, .lr = lr});
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.foreign, 1);
    assert_int_equal(ss.n_entries, 0);
    assert_non_null(strstr(lr->all, "another model"));
    save_ok(s, "theirs", KP_TYPE_F32, 30, 2, 2, true, NULL);
    store_close(s);
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F16});
    store_get_stats(s, &ss);
    assert_int_equal(ss.foreign, 2);
    assert_int_equal(ss.n_entries, 0);
    store_close(s);
    assert_true(count_objects(dir) > n_obj);
    s = open_store(dir, NULL);
    store_get_stats(s, &ss);
    assert_int_equal(ss.foreign, 1);
    assert_int_equal(ss.quarantined, 0);
    load_check(s, "mine", KP_TYPE_F32, 100, 1, 1);
    store_close(s);
    logrec_free(lr);
    tu_rm_rf(dir);
    free(dir);
}

/* store_stats saved_*: what every save stored, summed (the server's
 * kvpark_park_bytes_total); a second save of the same KV adds coded bytes
 * again but (its spans shared) no new ones. */
static void test_saved_bytes(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store_o(dir, (sopts){.codec = "int8", .kv_type = KP_TYPE_F32});
    store_save_stats a, b;
    save_ok(s, "x", KP_TYPE_F32, 100, 1, 1, false, &a);
    save_ok(s, "y", KP_TYPE_F32, 100, 1, 1, false, &b); /* the same tokens and rows */
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.saved_fp16_bytes, a.fp16_bytes + b.fp16_bytes);
    assert_int_equal(ss.saved_coded_bytes, a.bytes_total + b.bytes_total);
    assert_int_equal(ss.saved_new_bytes, a.bytes_new + b.bytes_new);
    assert_true(a.fp16_bytes > 0 && a.bytes_total > 0);
    assert_int_equal(b.bytes_new, 0);
    assert_true(ss.saved_new_bytes < ss.saved_coded_bytes);
    store_close(s);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- budgets -------------------------------------------------------------------------- */

static void test_cold_budget(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    /* measure one session of 100 tokens */
    store *s = open_store(dir, NULL);
    store_save_stats st;
    save_ok(s, "m", KP_TYPE_F32, 100, 1, 1, true, &st);
    store_close(s);
    tu_rm_rf(dir);
    uint64_t one = st.bytes_total, budget = one * 3 + one / 2;

    logrec *lr = logrec_new();
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .cold = budget, .lr = lr});
    save_ok(s, "s1", KP_TYPE_F32, 100, 1, 1, true, NULL);
    save_ok(s, "s2", KP_TYPE_F32, 100, 2, 2, true, NULL);
    save_ok(s, "s3", KP_TYPE_F32, 100, 3, 3, true, NULL);
    assert_int_equal(lr->n_drop, 0);
    kp_err err = {0};
    assert_int_equal(store_load_meta(s, "s1", NULL, NULL, NULL, NULL, &err), 0); /* s1 used */
    save_ok(s, "s4", KP_TYPE_F32, 100, 4, 4, true, NULL);
    assert_int_equal(lr->n_drop, 1);
    assert_string_equal(lr->dropped[0], "s2"); /* the least recently used */
    assert_non_null(strstr(lr->all, "dropped session 's2'"));
    char bud[32];
    snprintf(bud, sizeof bud, "%llu", (unsigned long long)budget);
    assert_non_null(strstr(lr->all, bud));
    assert_false(store_has(s, "s2"));
    char p[PATHN];
    rec_file(dir, "s2", p);
    assert_false(tu_file_exists(p));
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.dropped, 1);
    assert_true(ss.cold_bytes <= budget);

    /* a pinned session is never dropped: s3 is now the LRU but being read */
    kv_cache *kv = new_kv(KP_TYPE_F32);
    store_restore *r = NULL;
    assert_int_equal(store_load_kv_begin(s, "s3", kv, &r, &err), 0);
    assert_int_equal(store_load_meta(s, "s1", NULL, NULL, NULL, NULL, &err), 0);
    assert_int_equal(store_load_meta(s, "s4", NULL, NULL, NULL, NULL, &err), 0);
    save_ok(s, "s5", KP_TYPE_F32, 100, 5, 5, true, NULL);
    assert_int_equal(lr->n_drop, 2);
    assert_string_equal(lr->dropped[1], "s1");
    assert_true(store_has(s, "s3"));
    for (int l = 0; l < NL; l++) assert_int_equal(store_load_kv_layer(r, l, &err), 0);
    store_load_kv_end(r);
    assert_int_equal(kv->n_pos, 100);
    load_check(s, "s3", KP_TYPE_F32, 100, 3, 3);

    /* the one just saved is never dropped, even when it is all that fits */
    save_ok(s, "big", KP_TYPE_F32, 250, 6, 6, true, &st);
    assert_true(st.bytes_total > 2 * one);
    assert_true(store_has(s, "big"));
    store_get_stats(s, &ss);
    assert_true(ss.cold_bytes <= budget);
    assert_true(ss.dropped >= 3);

    /* a smaller budget at open drops the least recently saved first */
    store_close(s);
    uint64_t big_bytes = st.bytes_total;
    uint64_t b2 = big_bytes + one / 2;
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .cold = b2, .lr = lr});
    assert_true(store_has(s, "big"));
    assert_false(store_has(s, "s3"));
    store_get_stats(s, &ss);
    assert_int_equal(ss.n_entries, 1);
    assert_true(ss.dropped <= 1); /* s3, unless the save of big dropped it already */
    assert_true(ss.cold_bytes <= b2);
    load_check(s, "big", KP_TYPE_F32, 250, 6, 6);
    store_close(s);
    tu_rm_rf(dir);

    /* a session bigger than the whole budget is refused; the previous
     * version stays and nothing leaks */
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .cold = one + one / 2, .lr = lr});
    save_ok(s, "v", KP_TYPE_F32, 100, 8, 8, true, NULL);
    cas_stats c0, c1;
    cas_get_stats(store_cas(s), &c0);
    kv_cache *kb = new_kv(KP_TYPE_F32);
    tu_kv_fill(kb, 0, 256, 8);
    int32_t *tok = tu_make_tokens(256, 8);
    store_item it = {.tokens = tok, .n_tokens = 256, .kv = kb};
    int rc = store_save(s, "v", &it, true, NULL, &err);
    assert_int_equal(rc, KP_ERANGE);
    assert_non_null(strstr(err.msg, "cold budget"));
    rc = store_save(s, "v", &it, false, NULL, &err);
    assert_int_equal(rc, KP_ERANGE);
    cas_get_stats(store_cas(s), &c1);
    assert_int_equal(c1.cold_objects, c0.cold_objects);
    assert_int_equal(c1.warm_objects, c0.warm_objects);
    load_check(s, "v", KP_TYPE_F32, 100, 8, 8);
    park_manifest m;
    read_manifest(dir, "v", &m);
    for (int i = 0; i < m.n_spans; i++) assert_int_equal(cas_refcount(store_cas(s), m.spans[i].key), 1);
    park_manifest_free(&m);
    store_close(s);
    free(tok);
    kv_free(kb);
    kv_free(kv);
    logrec_free(lr);
    tu_rm_rf(dir);
    free(dir);
}

static void test_warm_budget(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    store_save_stats st;
    save_ok(s, "m", KP_TYPE_F32, 100, 1, 1, false, &st);
    store_close(s);
    tu_rm_rf(dir);
    uint64_t warm = st.bytes_total + st.bytes_total / 2;
    s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .warm = warm});
    for (int i = 0; i < 4; i++) {
        char id[8];
        snprintf(id, sizeof id, "w%d", i);
        save_ok(s, id, KP_TYPE_F32, 100, 10 + i, 10 + i, false, NULL);
    }
    store_stats ss;
    store_get_stats(s, &ss);
    assert_true(ss.warm_bytes <= warm);
    assert_true(ss.cold_bytes >= 2 * st.bytes_total); /* spilled */
    assert_int_equal(ss.n_entries, 4);
    assert_true(ss.n_cold >= 2);
    store_entry e;
    assert_int_equal(store_stat(s, "w0", &e), 0);
    assert_string_equal(e.tier, "cold");
    assert_false(e.durable); /* spilled objects do not make a record */
    assert_int_equal(store_stat(s, "w3", &e), 0);
    assert_string_equal(e.tier, "warm");
    for (int i = 0; i < 4; i++) {
        char id[8];
        snprintf(id, sizeof id, "w%d", i);
        load_check(s, id, KP_TYPE_F32, 100, 10 + i, 10 + i);
    }
    store_get_stats(s, &ss);
    assert_true(ss.warm_bytes <= warm);
    store_close(s);
    s = open_store(dir, NULL);
    store_get_stats(s, &ss);
    assert_int_equal(ss.n_entries, 4);
    load_check(s, "w0", KP_TYPE_F32, 100, 10, 10);
    store_close(s);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- corruption ---------------------------------------------------------------------- */

/* Write bytes as A's record, open, expect A quarantined and B intact. */
static void expect_quarantined(const char *dir, const uint8_t *b, size_t n, const char *what,
                               size_t off) {
    char p[PATHN];
    rec_file(dir, "A", p);
    tu_write_file(p, b, n);
    logrec *lr = logrec_new();
    store *s = open_store(dir, lr);
    store_stats ss;
    store_get_stats(s, &ss);
    if (store_has(s, "A") || ss.quarantined != 1)
        fail_msg("%s at %zu: not quarantined (has %d, quarantined %llu)", what, off,
                 store_has(s, "A"), (unsigned long long)ss.quarantined);
    assert_false(tu_file_exists(p));
    assert_true(store_has(s, "B"));
    assert_non_null(strstr(lr->all, "session 'A'"));
    store_close(s);
    logrec_free(lr);
}

static void test_corrupt_records(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    /* B has the same tokens and rows, so A's objects stay referenced */
    save_ok(s, "A", KP_TYPE_F32, 100, 1, 1, true, NULL);
    save_ok(s, "B", KP_TYPE_F32, 100, 1, 1, true, NULL);
    store_close(s);
    char p[PATHN];
    rec_file(dir, "A", p);
    size_t n = 0;
    uint8_t *good = (uint8_t *)tu_read_file(p, &n);
    assert_non_null(good);
    uint32_t ml, xl;
    memcpy(&ml, good + 16, 4);
    memcpy(&xl, good + 20, 4);
    assert_int_equal(n, 64 + ml + xl);
    assert_true(xl > 0);
    uint8_t *b = malloc(n + 1);
    int tried = 0;
    for (size_t off = 0; off < n; off++) {
        /* every byte of the header and the extra, every 5th of the manifest */
        if (off >= 64 && off < 64 + ml && off % 5 && off != 64 + ml - 1) continue;
        memcpy(b, good, n);
        b[off] ^= (uint8_t)(1u << (off % 8));
        expect_quarantined(dir, b, n, "flip", off);
        tried++;
    }
    const size_t cuts[] = {0, 1, 63, 64, 65, 64 + ml / 2, 64 + ml, n - 1};
    for (size_t i = 0; i < KP_ARRAY_LEN(cuts); i++) expect_quarantined(dir, good, cuts[i], "cut", cuts[i]);
    memcpy(b, good, n);
    b[n] = 0;
    expect_quarantined(dir, b, n + 1, "extended", n);
    print_message("record of %zu bytes: %d flips + %zu cuts quarantined\n", n, tried,
                  KP_ARRAY_LEN(cuts));
    assert_int_equal(count_quarantine(dir), tried + (int)KP_ARRAY_LEN(cuts) + 1);

    /* the pristine bytes come back, plus a torn .tmp and junk are handled */
    tu_write_file(p, good, n);
    char t[PATHN + 8];
    snprintf(t, sizeof t, "%s.tmp", p);
    tu_write_file(t, good, n / 2);
    char junk[PATHN];
    snprintf(junk, sizeof junk, "%s/sessions/junk.kvpm", dir);
    tu_write_file(junk, "hello", 5);
    char other[PATHN];
    snprintf(other, sizeof other, "%s/sessions/README", dir);
    tu_write_file(other, "hi", 2);
    s = open_store(dir, NULL);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.quarantined, 1);
    assert_int_equal(ss.tmp_removed, 1);
    assert_false(tu_file_exists(t));
    assert_true(tu_file_exists(other)); /* not ours: left alone */
    assert_false(tu_file_exists(junk));
    load_check(s, "A", KP_TYPE_F32, 100, 1, 1);
    load_check(s, "B", KP_TYPE_F32, 100, 1, 1);
    store_close(s);
    free(b);
    free(good);
    tu_rm_rf(dir);
    free(dir);
}

static void test_corrupt_object(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    /* A and C share the sink and first chunk ([0,20)); B is separate */
    save_ok(s, "A", KP_TYPE_F32, 100, 1, 1, true, NULL);
    save_ok(s, "B", KP_TYPE_F32, 100, 2, 2, true, NULL);
    kv_cache *kv = new_kv(KP_TYPE_F32);
    tu_kv_fill(kv, 0, 100, 1);
    tu_kv_fill(kv, 20, 60, 3);
    int32_t *tc = tu_make_tokens(60, 1);
    for (int i = 20; i < 60; i++) tc[i] = 700 + i;
    store_item ic = {.tokens = tc, .n_tokens = 60, .kv = kv};
    kp_err err = {0};
    assert_int_equal(store_save(s, "C", &ic, true, NULL, &err), 0);
    park_manifest ma;
    read_manifest(dir, "A", &ma);
    store_close(s);

    /* flip a byte in A's own coded chunk [36,52) on disk */
    char p[PATHN];
    obj_file(dir, ma.spans[3].key, p);
    assert_int_equal(ma.spans[3].span.start, 36);
    int fd = open(p, O_RDWR);
    assert_true(fd >= 0);
    uint8_t v;
    assert_int_equal(pread(fd, &v, 1, 200), 1);
    v ^= 0x10;
    assert_int_equal(pwrite(fd, &v, 1, 200), 1);
    close(fd);

    logrec *lr = logrec_new();
    s = open_store(dir, lr);
    assert_true(store_has(s, "A")); /* payloads are verified when read */
    kv_cache *got = new_kv(KP_TYPE_F32);
    got->n_pos = 4;
    int rc = store_load_kv(s, "A", got, &err);
    assert_int_equal(rc, KP_ELOST);
    assert_non_null(strstr(err.msg, "'A'"));
    assert_int_equal(got->n_pos, 4);
    /* A keeps its token ids (to be recomputed), nothing else */
    assert_true(store_has(s, "A"));
    assert_int_equal(store_load_kv(s, "A", got, &err), KP_ELOST);
    assert_int_equal(got->n_pos, 4);
    int nt = 0;
    int32_t *ta = NULL;
    assert_int_equal(store_load_meta(s, "A", &nt, &ta, NULL, NULL, &err), 0);
    int32_t *want_a = tu_make_tokens(100, 1);
    assert_int_equal(nt, 100);
    assert_memory_equal(ta, want_a, 100 * sizeof *ta);
    free(ta);
    store_entry se;
    assert_int_equal(store_stat(s, "A", &se), 0);
    assert_true(se.kv_lost);
    assert_string_equal(se.tier, "cold");
    rec_file(dir, "A", p);
    assert_true(tu_file_exists(p)); /* its tokens-only record, in place of the old one */
    assert_int_equal(lr->n_drop, 0);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.quarantined, 2); /* the object (cas) and the record */
    assert_int_equal(ss.kv_lost, 1);
    assert_int_equal(count_quarantine(dir), 2);
    load_check(s, "B", KP_TYPE_F32, 100, 2, 2);
    assert_int_equal(store_load_kv(s, "C", got, &err), 0);
    assert_true(rows_equal(kv, got, 60));
    /* A's references were released: the shared spans are C's alone */
    assert_int_equal(cas_refcount(store_cas(s), ma.spans[0].key), 1);
    assert_int_equal(cas_refcount(store_cas(s), ma.spans[1].key), 1);
    assert_false(cas_has(store_cas(s), ma.spans[6].key));
    store_close(s);

    /* after a restart A is still its token ids; a save makes it whole again */
    logrec *lr2 = logrec_new();
    s = open_store(dir, lr2);
    if (store_stat(s, "A", &se)) fail_msg("A lost at reopen: %s", lr2->all);
    logrec_free(lr2);
    assert_true(se.kv_lost);
    assert_int_equal(se.n_tokens, 100);
    assert_int_equal(store_load_kv(s, "A", got, &err), KP_ELOST);
    save_ok(s, "A", KP_TYPE_F32, 100, 1, 1, true, NULL);
    load_check(s, "A", KP_TYPE_F32, 100, 1, 1);
    free(want_a);
    store_close(s);

    /* a missing object: B's record is quarantined at open, its token ids kept */
    park_manifest mb;
    read_manifest(dir, "B", &mb);
    obj_file(dir, mb.spans[2].key, p);
    assert_int_equal(unlink(p), 0);
    s = open_store(dir, NULL);
    assert_true(store_has(s, "B"));
    assert_int_equal(store_stat(s, "B", &se), 0);
    assert_true(se.kv_lost);
    assert_int_equal(se.n_tokens, 100);
    assert_int_equal(store_load_kv(s, "B", got, &err), KP_ELOST);
    assert_true(store_has(s, "C"));
    store_get_stats(s, &ss);
    assert_int_equal(ss.quarantined, 1);
    assert_int_equal(ss.kv_lost, 1);
    assert_int_equal(store_load_kv(s, "C", got, &err), 0);
    /* and it is gone when deleted */
    assert_int_equal(store_delete(s, "B", &err), 0);
    store_close(s);
    s = open_store(dir, NULL);
    assert_false(store_has(s, "B"));
    assert_true(store_has(s, "C"));
    store_close(s);
    park_manifest_free(&ma);
    park_manifest_free(&mb);
    logrec_free(lr);
    free(tc);
    kv_free(kv);
    kv_free(got);
    tu_rm_rf(dir);
    free(dir);
}

static void test_torn_tmp(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    save_ok(s, "A", KP_TYPE_F32, 50, 1, 1, true, NULL);
    park_manifest m;
    read_manifest(dir, "A", &m);
    store_close(s);
    char p[PATHN], t[PATHN + 8];
    snprintf(t, sizeof t, "%s/sessions/Z.kvpm.tmp", dir);
    tu_write_file(t, "torn", 4);
    obj_file(dir, m.spans[0].key, p);
    char t2[PATHN + 8];
    snprintf(t2, sizeof t2, "%s.tmp", p);
    tu_write_file(t2, "torn", 4);
    s = open_store(dir, NULL);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.tmp_removed, 2);
    assert_false(tu_file_exists(t));
    assert_false(tu_file_exists(t2));
    load_check(s, "A", KP_TYPE_F32, 50, 1, 1);
    store_close(s);
    park_manifest_free(&m);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- disk full -------------------------------------------------------------------------- */

/* Save under RLIMIT_FSIZE = limit bytes (SIGXFSZ ignored: writes past it
 * fail with EFBIG, as on a full disk). */
static int save_limited(store *s, const char *id, int n, uint64_t seed, bool durable, rlim_t limit,
                        kp_err *err) {
    kv_cache *kv = new_kv(KP_TYPE_F32);
    tu_kv_fill(kv, 0, n, seed);
    int32_t *tok = tu_make_tokens(n, seed);
    char extra[32];
    snprintf(extra, sizeof extra, "extra-%s-%d", id, n);
    store_item it = {.tokens = tok, .n_tokens = n, .extra = extra, .extra_len = strlen(extra),
                     .kv = kv};
    struct rlimit old, lim;
    assert_int_equal(getrlimit(RLIMIT_FSIZE, &old), 0);
    void (*oh)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = limit;
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &lim), 0);
    int rc = store_save(s, id, &it, durable, NULL, err);
    assert_int_equal(setrlimit(RLIMIT_FSIZE, &old), 0);
    signal(SIGXFSZ, oh);
    free(tok);
    kv_free(kv);
    return rc;
}

static void test_disk_full(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    logrec *lr = logrec_new();
    store *s = open_store(dir, lr);
    cas *c = store_cas(s);
    save_ok(s, "X", KP_TYPE_F32, 100, 1, 1, true, NULL);
    park_manifest m1;
    read_manifest(dir, "X", &m1);
    char p[PATHN];
    rec_file(dir, "X", p);
    size_t n0 = 0;
    char *rec0 = tu_read_file(p, &n0);
    cas_stats c0, c1;
    cas_get_stats(c, &c0);

    /* 1: the new objects cannot be written */
    kp_err err = {0};
    int rc = save_limited(s, "X", 140, 1, true, 512, &err);
    assert_int_equal(rc, KP_ENOSPC); /* 507 in the server, not a generic 500 */
    print_message("disk full (objects): %s\n", err.msg);
    assert_non_null(strstr(err.msg, "File too large"));
    assert_non_null(strstr(err.msg, dir));
    cas_get_stats(c, &c1);
    assert_int_equal(c1.cold_objects, c0.cold_objects);
    assert_int_equal(c1.warm_objects, c0.warm_objects);
    for (int i = 0; i < m1.n_spans; i++) assert_int_equal(cas_refcount(c, m1.spans[i].key), 1);
    load_check(s, "X", KP_TYPE_F32, 100, 1, 1);

    /* 2: every object exists, only the record cannot be written */
    rc = save_limited(s, "X", 100, 1, true, 100, &err);
    assert_int_equal(rc, KP_ENOSPC); /* 507 in the server, not a generic 500 */
    print_message("disk full (record): %s\n", err.msg);
    assert_non_null(strstr(err.msg, "sessions/X.kvpm"));
    for (int i = 0; i < m1.n_spans; i++) assert_int_equal(cas_refcount(c, m1.spans[i].key), 1);
    size_t n1 = 0;
    char *rec1 = tu_read_file(p, &n1);
    assert_int_equal(n1, n0);
    assert_memory_equal(rec0, rec1, n0);
    free(rec1);
    char t[PATHN + 8];
    snprintf(t, sizeof t, "%s.tmp", p);
    assert_false(tu_file_exists(t));

    /* 3: a new session: nothing left behind */
    rc = save_limited(s, "Y", 60, 2, true, 512, &err);
    assert_int_equal(rc, KP_ENOSPC); /* 507 in the server, not a generic 500 */
    assert_false(store_has(s, "Y"));
    cas_get_stats(c, &c1);
    assert_int_equal(c1.cold_objects + c1.warm_objects, c0.cold_objects + c0.warm_objects);

    /* 4: a non-durable save works (RAM); its flush fails, then succeeds */
    rc = save_limited(s, "Y", 60, 2, false, 512, &err);
    assert_int_equal(rc, 0);
    struct rlimit old, lim;
    getrlimit(RLIMIT_FSIZE, &old);
    void (*oh)(int) = signal(SIGXFSZ, SIG_IGN);
    lim = old;
    lim.rlim_cur = 512;
    setrlimit(RLIMIT_FSIZE, &lim);
    rc = store_flush(s, "Y", &err);
    setrlimit(RLIMIT_FSIZE, &old);
    signal(SIGXFSZ, oh);
    assert_int_equal(rc, KP_ENOSPC); /* 507 in the server, not a generic 500 */
    store_entry e;
    assert_int_equal(store_stat(s, "Y", &e), 0);
    assert_false(e.durable);
    assert_int_equal(store_flush(s, "Y", &err), 0);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.io_errors, 4);
    assert_true(lr->n_log >= 3);
    store_close(s);
    s = open_store(dir, NULL);
    load_check(s, "X", KP_TYPE_F32, 100, 1, 1);
    load_check(s, "Y", KP_TYPE_F32, 60, 2, 2);
    store_close(s);
    free(rec0);
    park_manifest_free(&m1);
    logrec_free(lr);
    tu_rm_rf(dir);
    free(dir);
}

/* Scopes: sessions share stored spans only within one scope (the server's
 * owner): B's save of exactly A's session stores everything anew; A's second
 * session reuses all of A's; both restore; the scope survives a reopen. */
static void test_scopes(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    kv_cache *kv = new_kv(KP_TYPE_F32);
    tu_kv_fill(kv, 0, 100, 5);
    int32_t *tok = tu_make_tokens(100, 5);
    const char *ids[] = {"A1", "B1", "A2"};
    uint64_t scopes[] = {7, 9, 7};
    store_save_stats st[3];
    kp_err err = {0};
    for (int i = 0; i < 3; i++) {
        char extra[32];
        snprintf(extra, sizeof extra, "extra-%s-%d", ids[i], 100);
        store_item it = {.tokens = tok, .n_tokens = 100, .extra = extra, .extra_len = strlen(extra), .kv = kv,
                         .scope = scopes[i]};
        if (store_save(s, ids[i], &it, true, &st[i], &err)) fail_msg("store_save: %s", err.msg);
    }
    assert_int_equal(st[0].spans_reused, 0);
    assert_int_equal(st[1].spans_reused, 0);
    assert_int_equal(st[1].bytes_new, st[0].bytes_new);
    assert_true(st[2].spans_reused > 0);
    assert_int_equal(st[2].bytes_new, 0);
    store_close(s);
    s = open_store(dir, NULL);
    for (int i = 0; i < 3; i++) load_check(s, ids[i], KP_TYPE_F32, 100, 5, 5);
    park_manifest m;
    read_manifest(dir, "B1", &m);
    assert_int_equal(m.scope, 9);
    park_manifest_free(&m);
    store_close(s);
    free(tok);
    kv_free(kv);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- the per-store secret, store_set_extra ------------------------------------------ */

static void test_secret(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    char sub[PATHN], path[PATHN + 32];
    snprintf(sub, sizeof sub, "%s/new/cold", dir); /* created on demand */
    snprintf(path, sizeof path, "%s/%s", sub, STORE_SECRET_FILE);
    uint8_t a[STORE_SECRET_BYTES], b[STORE_SECRET_BYTES], zero[STORE_SECRET_BYTES] = {0};
    kp_err err = {0};
    assert_int_equal(store_secret(sub, a, &err), 0);
    struct stat sb;
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    assert_int_equal(sb.st_size, STORE_SECRET_BYTES);
    assert_memory_not_equal(a, zero, sizeof a);
    assert_int_equal(store_secret(sub, b, &err), 0);
    assert_memory_equal(a, b, sizeof a);
    /* a store opened on the directory leaves it alone */
    store *s = open_store(sub, NULL);
    store_close(s);
    assert_int_equal(store_secret(sub, b, &err), 0);
    assert_memory_equal(a, b, sizeof a);
    /* made readable by a careless copy: narrowed again */
    assert_int_equal(chmod(path, 0644), 0);
    assert_int_equal(store_secret(sub, b, &err), 0);
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_mode & 0777, 0600);
    /* damaged: refused, and kept as it is */
    FILE *f = fopen(path, "wb");
    fwrite("short", 1, 5, f);
    fclose(f);
    assert_int_equal(store_secret(sub, b, &err), KP_EFORMAT);
    print_message("damaged secret: %s\n", err.msg);
    assert_non_null(strstr(err.msg, STORE_SECRET_FILE));
    assert_int_equal(stat(path, &sb), 0);
    assert_int_equal(sb.st_size, 5);
    /* another directory, another secret */
    char other[PATHN];
    snprintf(other, sizeof other, "%s/other", dir);
    assert_int_equal(store_secret(other, b, &err), 0);
    assert_memory_not_equal(a, b, sizeof a);
    tu_rm_rf(dir);
    free(dir);
}

static void test_set_extra(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store(dir, NULL);
    save_ok(s, "D", KP_TYPE_F32, 50, 1, 1, true, NULL);  /* durable */
    save_ok(s, "W", KP_TYPE_F32, 40, 2, 2, false, NULL); /* warm only */
    kp_err err = {0};
    assert_int_equal(store_set_extra(s, "D", "new-owner-D", 11, &err), 0);
    assert_int_equal(store_set_extra(s, "W", "new-owner-W", 11, &err), 0);
    assert_int_equal(store_set_extra(s, "nope", "x", 1, &err), KP_ENOTFOUND);
    assert_int_equal(store_set_extra(s, "../x", "x", 1, &err), KP_EINVAL);
    for (int reopen = 0; reopen < 2; reopen++) {
        for (int i = 0; i < 2; i++) {
            const char *id = i ? "W" : "D";
            void *x = NULL;
            size_t xl = 0;
            int nt = 0;
            assert_int_equal(store_load_meta(s, id, &nt, NULL, &x, &xl, &err), 0);
            assert_int_equal(nt, i ? 40 : 50);
            assert_int_equal(xl, 11);
            assert_memory_equal(x, i ? "new-owner-W" : "new-owner-D", 11);
            free(x);
            /* the KV is untouched */
            kv_cache *want = new_kv(KP_TYPE_F32), *got = new_kv(KP_TYPE_F32);
            tu_kv_fill(want, 0, nt, i ? 2 : 1);
            assert_int_equal(store_load_kv(s, id, got, &err), 0);
            assert_true(rows_equal(want, got, nt));
            kv_free(want);
            kv_free(got);
        }
        store_close(s); /* flushes W */
        s = open_store(dir, NULL);
    }
    store_close(s);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- pipelined restore ------------------------------------------------------------------- */

static void test_pipelined(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    store *s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F16, .codec = "int8"});
    save_ok(s, "P", KP_TYPE_F16, 120, 1, 1, true, NULL);
    kv_cache *a = new_kv(KP_TYPE_F16), *b = new_kv(KP_TYPE_F16);
    kp_err err = {0};
    assert_int_equal(store_load_kv(s, "P", a, &err), 0);
    store_restore *r = NULL;
    assert_int_equal(store_load_kv_begin(s, "P", b, &r, &err), 0);
    assert_int_equal(b->n_pos, 0);
    assert_int_equal(store_load_kv_layer(r, 1, &err), KP_EINVAL); /* out of order */
    for (int l = 0; l < NL; l++) {
        assert_int_equal(store_load_kv_layer(r, l, &err), 0);
        /* layer l is usable now */
        assert_memory_equal(a->k[l], b->k[l], 120 * a->row_bytes);
        assert_memory_equal(a->v[l], b->v[l], 120 * a->row_bytes);
        assert_int_equal(b->n_pos, 0);
    }
    store_load_kv_end(r);
    assert_int_equal(b->n_pos, 120);
    assert_true(rows_equal(a, b, 120));

    /* abandoned after one layer: n_pos unchanged */
    kv_cache *c = new_kv(KP_TYPE_F16);
    c->n_pos = 7;
    assert_int_equal(store_load_kv_begin(s, "P", c, &r, &err), 0);
    assert_int_equal(store_load_kv_layer(r, 0, &err), 0);
    store_load_kv_end(r);
    assert_int_equal(c->n_pos, 7);
    /* abandoned right away */
    assert_int_equal(store_load_kv_begin(s, "P", c, &r, &err), 0);
    store_load_kv_end(r);
    assert_int_equal(c->n_pos, 7);

    /* deleted while a handle is open: the handle still completes */
    assert_int_equal(store_load_kv_begin(s, "P", c, &r, &err), 0);
    assert_int_equal(store_delete(s, "P", &err), 0);
    assert_false(store_has(s, "P"));
    for (int l = 0; l < NL; l++) assert_int_equal(store_load_kv_layer(r, l, &err), 0);
    store_load_kv_end(r);
    assert_int_equal(c->n_pos, 120);
    assert_true(rows_equal(a, c, 120));
    assert_int_equal(count_objects(dir), 0);
    store_stats ss;
    store_get_stats(s, &ss);
    assert_int_equal(ss.loads, 3);
    store_close(s);
    kv_free(a);
    kv_free(b);
    kv_free(c);
    tu_rm_rf(dir);
    free(dir);
}

/* ---- threads ---------------------------------------------------------------------------- */

#define TH_N 8
#define TH_IDS 6
#define TH_OPS 50

/* A self-describing session: version v has 20 + v % 80 tokens whose first
 * token is v, and rows of seed v; a load can check what it got. */
static int th_len(int v) { return 20 + v % 80; }

typedef struct th_arg {
    store *s;
    int tid;
    int bad;
    int loads_ok;
    char msg[600];
} th_arg;

static void *th_main(void *p) {
    th_arg *a = p;
    kv_cache *kv = new_kv(KP_TYPE_F32), *want = new_kv(KP_TYPE_F32);
    uint64_t r = 0x9e3779b97f4a7c15ull * (uint64_t)(a->tid + 1);
    for (int op = 0; op < TH_OPS && !a->bad; op++) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        char id[8];
        snprintf(id, sizeof id, "t%d", (int)(r % TH_IDS));
        int what = (int)((r >> 20) % 10);
        kp_err err = {0};
        if (what < 4) {
            int v = a->tid * 1000 + op;
            int n = th_len(v);
            tu_kv_fill(kv, 0, n, (uint64_t)v);
            int32_t *tok = tu_make_tokens(n, (uint64_t)v);
            tok[0] = v;
            store_item it = {.tokens = tok, .n_tokens = n, .kv = kv};
            int rc = store_save(a->s, id, &it, (r >> 40) & 1, NULL, &err);
            if (rc && rc != KP_ERANGE) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "save %s: %s", id, err.msg);
            }
            free(tok);
        } else if (what < 8) {
            kv->n_pos = 0;
            int rc = store_load_kv(a->s, id, kv, &err);
            if (rc == KP_ENOTFOUND) continue;
            if (rc) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "load %s: %s", id, err.msg);
                break;
            }
            /* the first K value of layer 0 tells the version: check all */
            int found = -1;
            for (int v0 = 0; v0 < TH_N * 1000 && found < 0; v0 += 1000)
                for (int v = v0; v < v0 + TH_OPS; v++) {
                    if (th_len(v) != kv->n_pos) continue;
                    tu_kv_fill(want, 0, 1, (uint64_t)v);
                    if (!memcmp(want->k[0], kv->k[0], want->row_bytes)) {
                        found = v;
                        break;
                    }
                }
            if (found < 0) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "load %s: rows of no known version", id);
                break;
            }
            tu_kv_fill(want, 0, th_len(found), (uint64_t)found);
            if (!rows_equal(want, kv, th_len(found))) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "load %s: version %d rows differ", id, found);
            }
            a->loads_ok++;
        } else if (what == 8) {
            int rc = store_delete(a->s, id, &err);
            if (rc && rc != KP_ENOTFOUND) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "delete %s: %s", id, err.msg);
            }
        } else {
            int nt = 0;
            int32_t *tok = NULL;
            int rc = store_load_meta(a->s, id, &nt, &tok, NULL, NULL, &err);
            if (rc == 0 && (nt != th_len(tok[0]))) {
                a->bad = 1;
                snprintf(a->msg, sizeof a->msg, "meta %s: %d tokens for version %d", id, nt, tok[0]);
            }
            free(tok);
            if (rc == 0 && (r >> 50) & 1) {
                rc = store_flush(a->s, id, &err);
                if (rc && rc != KP_ENOTFOUND) {
                    a->bad = 1;
                    snprintf(a->msg, sizeof a->msg, "flush %s: %s", id, err.msg);
                }
            }
        }
    }
    kv_free(kv);
    kv_free(want);
    return NULL;
}

static void threads_run(uint64_t cold_budget) {
    char *dir = tu_tmpdir();
    logrec *lr = logrec_new();
    store *s = open_store_o(dir, (sopts){.kv_type = KP_TYPE_F32, .cold = cold_budget,
                                         .warm = 60000, .lr = lr});
    pthread_t th[TH_N];
    th_arg args[TH_N];
    for (int i = 0; i < TH_N; i++) {
        memset(&args[i], 0, sizeof args[i]);
        args[i].s = s;
        args[i].tid = i;
        assert_int_equal(pthread_create(&th[i], NULL, th_main, &args[i]), 0);
    }
    int loads = 0;
    for (int i = 0; i < TH_N; i++) {
        pthread_join(th[i], NULL);
        if (args[i].bad) fail_msg("thread %d: %s", i, args[i].msg);
        loads += args[i].loads_ok;
    }
    store_stats ss;
    store_get_stats(s, &ss);
    print_message("threads (cold budget %llu): %d good loads, %llu saves, %llu dropped, "
                  "%zu sessions left\n", (unsigned long long)cold_budget, loads,
                  (unsigned long long)ss.saves, (unsigned long long)ss.dropped, ss.n_entries);
    assert_int_equal(ss.quarantined, 0);
    if (cold_budget) {
        /* loads promote and spill objects between saves; the next save
         * brings the cold tier back within budget */
        save_ok(s, "final", KP_TYPE_F32, 30, 1, 1, true, NULL);
        store_get_stats(s, &ss);
        assert_true(ss.cold_bytes <= cold_budget);
    }
    store_close(s);
    /* everything left is intact after a reopen; deleting it all leaves no
     * object and no reference behind */
    s = open_store(dir, NULL);
    store_entry *ents = NULL;
    size_t n = 0;
    assert_int_equal(store_list(s, &ents, &n), 0);
    kv_cache *kv = new_kv(KP_TYPE_F32);
    kp_err err = {0};
    for (size_t i = 0; i < n; i++) {
        if (store_load_kv(s, ents[i].id, kv, &err)) fail_msg("%s", err.msg);
        assert_int_equal(store_delete(s, ents[i].id, &err), 0);
    }
    free(ents);
    kv_free(kv);
    cas_stats cs;
    cas_get_stats(store_cas(s), &cs);
    assert_int_equal(cs.warm_objects + cs.cold_objects, 0);
    assert_int_equal(count_objects(dir), 0);
    store_close(s);
    logrec_free(lr);
    tu_rm_rf(dir);
    free(dir);
}

static void test_threads(void **state) {
    (void)state;
    threads_run(0);
    threads_run(120000);
}

/* ---- main --------------------------------------------------------------------------------- */

static int setup(void **state) {
    (void)state;
    kp_err err = {0};
    if (kp_backend_new(&g_be, "cpu", 1, &err)) fail_msg("backend: %s", err.msg);
    return 0;
}

static int teardown(void **state) {
    (void)state;
    kp_backend_free(g_be);
    return 0;
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_roundtrip),
        cmocka_unit_test(test_int8_and_lazy_codec),
        cmocka_unit_test(test_codec_files),
        cmocka_unit_test(test_reopen_and_flush),
        cmocka_unit_test(test_legacy_import),
        cmocka_unit_test(test_dedup_and_delete),
        cmocka_unit_test(test_resave_longer),
        cmocka_unit_test(test_foreign_records),
        cmocka_unit_test(test_saved_bytes),
        cmocka_unit_test(test_cold_budget),
        cmocka_unit_test(test_warm_budget),
        cmocka_unit_test(test_corrupt_records),
        cmocka_unit_test(test_corrupt_object),
        cmocka_unit_test(test_torn_tmp),
        cmocka_unit_test(test_disk_full),
        cmocka_unit_test(test_secret),
        cmocka_unit_test(test_set_extra),
        cmocka_unit_test(test_scopes),
        cmocka_unit_test(test_pipelined),
        cmocka_unit_test(test_threads),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("store", tests, setup, teardown);
}
