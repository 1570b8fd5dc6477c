/*
 * test_park.c — parking a KV cache into the chunk store and back
 * (storage/park.h), on the CPU backend with caches of stories260K's KV shape
 * (5 layers, 4 KV heads, head_dim 8) filled with random rows, F32 and F16:
 *   - codec "none": bit-exact round trips for 0, 1, S+W-1, 150 and 200 tokens
 *     under several layouts (S = 0, W = 0, odd sizes), spans = the layout;
 *   - codec "int8": coded spans within int8 error (and really coded),
 *     lossless spans bit-exact;
 *   - prefix sharing: two sessions sharing 130 tokens (and their rows) store
 *     the shared spans once (same keys, refcount 2, spans_reused, fewer new
 *     bytes); releasing one leaves the other restorable; releasing both lets
 *     cas_collect free everything;
 *   - keys change with the model fingerprint, codec, codec hash, tokens;
 *   - scopes: nothing shared across scopes, everything within one; scope 0
 *     is unscoped (manifest version 1), a scoped manifest is version 2;
 *   - durable save, close, reopen, re-ref from the manifest bytes, restore;
 *   - corruption: a flipped byte in a cold file, every flipped byte and
 *     truncations of an object in the warm tier, garbage under a key: restore
 *     fails naming the span and leaves n_pos alone; a save meeting a garbage
 *     object leaves no references behind;
 *   - manifest bytes: round trip, every flipped byte and every truncation refused;
 *   - layer-by-layer restore (begin/layer/end): same rows as park_restore,
 *     layers in order only, begin holds everything it needs (manifest and
 *     objects may go), abandoned handles keep n_pos, a missing object fails
 *     begin; park_codec_hash of files (0 for built-in names).
 */
#include "tests/testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "compress/layout.h"
#include "kernels/kernels.h"
#include "kernels/types.h"
#include "storage/park.h"

#define NL 5
#define NKV 4
#define HD 8
#define NCTX 256
#define FP_A 0x1234567890abcdefull

/* ---- helpers --------------------------------------------------------------- */

typedef struct fx {
    kp_backend *be;
    codec *none, *int8;
} fx;

static int setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    kp_err err = {0};
    if (kp_backend_new(&f->be, "cpu", 1, &err)) fail_msg("backend: %s", err.msg);
    codec_shape sh = {.n_layer = NL, .n_kv_heads = NKV, .head_dim = HD, .n_rot = HD,
                      .rope_base = 10000.f, .rope_freq_scale = 1.f, .model_fingerprint = FP_A};
    if (codec_open(&f->none, "none", &sh, &err)) fail_msg("codec none: %s", err.msg);
    if (codec_open(&f->int8, "int8", &sh, &err)) fail_msg("codec int8: %s", err.msg);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fx *f = *state;
    codec_free(f->none);
    codec_free(f->int8);
    kp_backend_free(f->be);
    free(f);
    return 0;
}

static kv_cache *new_kv(fx *f, int type) { return tu_kv_new(f->be, type, NL, NCTX, NKV, HD); }

/* Copy rows [0, n) of every layer from a to b. */
static void copy_rows(kv_cache *b, const kv_cache *a, int n) {
    for (int l = 0; l < NL; l++) {
        memcpy(b->k[l], a->k[l], (size_t)n * a->row_bytes);
        memcpy(b->v[l], a->v[l], (size_t)n * a->row_bytes);
    }
}

static float elem(const kv_cache *kv, const void *base, size_t i) {
    if (kv->kv_type == KP_TYPE_F32) return ((const float *)base)[i];
    return kp_fp16_to_f32(((const uint16_t *)base)[i]);
}

/* Compare rows [r0, r1) of a and b: bit-exact (tol < 0) or within tol.
 * Returns the max abs difference. */
static double cmp_rows(const kv_cache *a, const kv_cache *b, int r0, int r1, double tol) {
    double mx = 0;
    size_t d = NKV * HD;
    for (int l = 0; l < NL; l++)
        for (int v = 0; v < 2; v++) {
            const uint8_t *pa = v ? a->v[l] : a->k[l];
            const uint8_t *pb = v ? b->v[l] : b->k[l];
            if (tol < 0) {
                if (r1 > r0 && memcmp(pa + (size_t)r0 * a->row_bytes, pb + (size_t)r0 * b->row_bytes,
                                      (size_t)(r1 - r0) * a->row_bytes) != 0)
                    fail_msg("layer %d %s rows %d..%d differ", l, v ? "V" : "K", r0, r1 - 1);
                continue;
            }
            for (size_t i = (size_t)r0 * d; i < (size_t)r1 * d; i++) {
                double e = fabs((double)elem(a, pa, i) - (double)elem(b, pb, i));
                if (e > mx) mx = e;
            }
        }
    if (tol >= 0 && mx > tol) fail_msg("rows %d..%d differ by %g > %g", r0, r1 - 1, mx, tol);
    return mx;
}

static cas *open_cas(const char *dir) {
    cas_opts o = cas_default_opts();
    o.dir = dir;
    cas *c = NULL;
    kp_err err = {0};
    if (cas_open(&c, &o, &err)) fail_msg("cas_open: %s", err.msg);
    return c;
}

static void save_ok(cas *st, const codec *c, uint64_t fp, const park_layout *lay,
                    const kv_cache *kv, const int32_t *tok, int n, bool durable, park_manifest *m,
                    park_stats *ps) {
    kp_err err = {0};
    int rc = park_save(st, c, 0, codec_name(c), fp, lay, kv, tok, n, durable, m, ps, &err);
    if (rc) fail_msg("park_save (%d tokens): %s", n, err.msg);
}

static void restore_ok(cas *st, const codec *c, const park_manifest *m, kv_cache *kv) {
    kp_err err = {0};
    int rc = park_restore(st, c, m, kv, NULL, &err);
    if (rc) fail_msg("park_restore: %s", err.msg);
    assert_int_equal(kv->n_pos, m->n_tokens);
}

/* The manifest's spans are exactly layout_spans's. */
static void check_spans(const park_manifest *m) {
    layout_span qs[64];
    int ns = layout_spans(&m->layout, m->n_tokens, qs, 64);
    assert_int_equal(ns, m->n_spans);
    for (int i = 0; i < ns; i++) {
        assert_int_equal(m->spans[i].span.start, qs[i].start);
        assert_int_equal(m->spans[i].span.n, qs[i].n);
        assert_int_equal(m->spans[i].span.coded, qs[i].coded != 0);
        assert_true(m->spans[i].bytes > 0);
    }
}

/* ---- round trips ------------------------------------------------------------- */

static void test_roundtrip_none(void **state) {
    fx *f = *state;
    const park_layout lays[] = {{4, 64, 64}, {0, 0, 64}, {4, 0, 16}, {0, 64, 32}, {7, 5, 20}};
    const int types[] = {KP_TYPE_F32, KP_TYPE_F16};
    for (size_t ti = 0; ti < 2; ti++) {
        kv_cache *src = new_kv(f, types[ti]);
        tu_kv_fill(src, 0, 200, 1 + ti);
        int32_t *tok = tu_make_tokens(200, 7);
        for (size_t li = 0; li < KP_ARRAY_LEN(lays); li++) {
            const park_layout *lay = &lays[li];
            int ns[] = {0, 1, lay->sink + lay->window - 1, 150, 200};
            cas *st = open_cas(NULL);
            for (size_t k = 0; k < KP_ARRAY_LEN(ns); k++) {
                int n = ns[k] < 0 ? 0 : ns[k];
                src->n_pos = 200;
                park_manifest m;
                park_stats ps;
                save_ok(st, f->none, FP_A, lay, src, tok, n, false, &m, &ps);
                check_spans(&m);
                assert_int_equal(ps.fp16_bytes, (uint64_t)n * NL * 2 * NKV * HD * 2);
                kv_cache *dst = new_kv(f, types[ti]);
                dst->n_pos = 3;
                restore_ok(st, f->none, &m, dst);
                cmp_rows(src, dst, 0, n, -1);
                kv_free(dst);
                assert_int_equal(park_release(st, &m), 0);
                park_manifest_free(&m);
            }
            cas_collect(st);
            cas_stats cs;
            cas_get_stats(st, &cs);
            assert_int_equal(cs.warm_objects, 0);
            cas_close(st);
        }
        free(tok);
        kv_free(src);
    }
}

static void test_roundtrip_int8(void **state) {
    fx *f = *state;
    const int types[] = {KP_TYPE_F32, KP_TYPE_F16};
    park_layout lay = park_default_layout(); /* 4, 64, 64 */
    lay.window = 32;
    for (size_t ti = 0; ti < 2; ti++) {
        kv_cache *src = new_kv(f, types[ti]);
        tu_kv_fill(src, 0, 200, 11 + ti);
        int32_t *tok = tu_make_tokens(200, 3);
        cas *st = open_cas(NULL);
        park_manifest m;
        park_stats ps;
        save_ok(st, f->int8, FP_A, &lay, src, tok, 200, false, &m, &ps);
        check_spans(&m);
        assert_true(ps.bytes_total < ps.fp16_bytes); /* int8 beats fp16 overall */
        kv_cache *dst = new_kv(f, types[ti]);
        restore_ok(st, f->int8, &m, dst);
        for (int i = 0; i < m.n_spans; i++) {
            const layout_span *s = &m.spans[i].span;
            if (!s->coded) {
                cmp_rows(src, dst, s->start, s->start + s->n, -1);
            } else {
                /* |x| < 2: int8 step 2/127, error <= half a step (+ fp16 scale rounding). */
                double e = cmp_rows(src, dst, s->start, s->start + s->n, 0.01);
                assert_true(e > 0); /* really went through the lossy codec */
            }
        }
        /* restoring with the wrong codec is refused, naming the span */
        kv_cache *d2 = new_kv(f, types[ti]);
        kp_err err = {0};
        assert_int_equal(park_restore(st, f->none, &m, d2, NULL, &err), KP_EMISMATCH);
        assert_non_null(strstr(err.msg, "span"));
        assert_int_equal(d2->n_pos, 0);
        kv_free(d2);
        kv_free(dst);
        park_release(st, &m);
        park_manifest_free(&m);
        cas_close(st);
        free(tok);
        kv_free(src);
    }
}

/* ---- sharing, keys ------------------------------------------------------------ */

static void test_prefix_sharing(void **state) {
    fx *f = *state;
    park_layout lay = park_default_layout(); /* S 4, W 64, C 64 */
    kv_cache *a = new_kv(f, KP_TYPE_F16), *b = new_kv(f, KP_TYPE_F16);
    tu_kv_fill(a, 0, 200, 21);
    tu_kv_fill(b, 0, 200, 22);
    copy_rows(b, a, 130);
    int32_t *ta = tu_make_tokens(200, 5), *tb = tu_make_tokens(200, 6);
    memcpy(tb, ta, 130 * sizeof *ta);
    cas *st = open_cas(NULL);
    park_manifest ma, mb;
    park_stats sa, sb;
    save_ok(st, f->int8, FP_A, &lay, a, ta, 200, false, &ma, &sa);
    save_ok(st, f->int8, FP_A, &lay, b, tb, 200, false, &mb, &sb);
    assert_int_equal(sa.spans_reused, 0);
    assert_int_equal(ma.n_spans, mb.n_spans);
    int shared = 0, shared_coded = 0;
    for (int i = 0; i < ma.n_spans; i++) {
        bool eq = ma.spans[i].key.hi == mb.spans[i].key.hi && ma.spans[i].key.lo == mb.spans[i].key.lo;
        bool want = ma.spans[i].span.start + ma.spans[i].span.n <= 130;
        assert_int_equal(eq, want);
        if (eq) {
            shared++;
            shared_coded += ma.spans[i].span.coded;
            assert_int_equal(cas_refcount(st, ma.spans[i].key), 2);
            assert_int_equal(ma.spans[i].bytes, mb.spans[i].bytes);
        } else {
            assert_int_equal(cas_refcount(st, ma.spans[i].key), 1);
            assert_int_equal(cas_refcount(st, mb.spans[i].key), 1);
        }
    }
    assert_true(shared_coded >= 1);
    assert_int_equal(sb.spans_reused, shared);
    assert_true(sb.bytes_new < sa.bytes_new);
    assert_int_equal(sa.bytes_new, sa.bytes_total);
    uint64_t tot_a = 0, tot_b = 0;
    for (int i = 0; i < ma.n_spans; i++) tot_a += ma.spans[i].bytes, tot_b += mb.spans[i].bytes;
    assert_int_equal(sa.bytes_total, tot_a);
    assert_int_equal(sb.bytes_total, tot_b);
    cas_stats cs;
    cas_get_stats(st, &cs);
    assert_int_equal(cs.warm_objects, (uint64_t)(ma.n_spans + mb.n_spans - shared));

    /* release A: B still restores; only A's own objects are collectable */
    assert_int_equal(park_release(st, &ma), 0);
    assert_int_equal(cas_collect(st), (size_t)(ma.n_spans - shared));
    kv_cache *r = new_kv(f, KP_TYPE_F16);
    restore_ok(st, f->int8, &mb, r);
    for (int i = 0; i < mb.n_spans; i++)
        cmp_rows(b, r, mb.spans[i].span.start, mb.spans[i].span.start + mb.spans[i].span.n,
                 mb.spans[i].span.coded ? 0.01 : -1);
    /* A cannot be restored any more */
    kv_cache *r2 = new_kv(f, KP_TYPE_F16);
    kp_err err = {0};
    assert_int_equal(park_restore(st, f->int8, &ma, r2, NULL, &err), KP_ENOTFOUND);
    assert_int_equal(r2->n_pos, 0);
    assert_int_equal(park_release(st, &mb), 0);
    assert_int_equal(cas_collect(st), (size_t)mb.n_spans);
    cas_get_stats(st, &cs);
    assert_int_equal(cs.warm_objects, 0);
    assert_int_equal(cs.warm_bytes, 0);

    kv_free(r);
    kv_free(r2);
    park_manifest_free(&ma);
    park_manifest_free(&mb);
    cas_close(st);
    free(ta);
    free(tb);
    kv_free(a);
    kv_free(b);
}

static int n_equal_keys(const park_manifest *x, const park_manifest *y) {
    int n = 0;
    for (int i = 0; i < x->n_spans && i < y->n_spans; i++)
        n += x->spans[i].key.hi == y->spans[i].key.hi && x->spans[i].key.lo == y->spans[i].key.lo;
    return n;
}

static void test_keys(void **state) {
    fx *f = *state;
    park_layout lay = park_default_layout();
    kv_cache *a = new_kv(f, KP_TYPE_F32);
    tu_kv_fill(a, 0, 150, 31);
    int32_t *t = tu_make_tokens(150, 9);
    cas *st = open_cas(NULL);
    park_manifest m0, m1, m2, m3, m4;
    kp_err err = {0};
    save_ok(st, f->int8, FP_A, &lay, a, t, 150, false, &m0, NULL);
    save_ok(st, f->int8, FP_A, &lay, a, t, 150, false, &m1, NULL);
    assert_int_equal(n_equal_keys(&m0, &m1), m0.n_spans); /* deterministic */
    save_ok(st, f->int8, FP_A + 1, &lay, a, t, 150, false, &m2, NULL);
    assert_int_equal(n_equal_keys(&m0, &m2), 0); /* model */
    save_ok(st, f->none, FP_A, &lay, a, t, 150, false, &m3, NULL);
    assert_int_equal(n_equal_keys(&m0, &m3), 0); /* codec */
    assert_int_equal(park_save(st, f->int8, 42, "int8", FP_A, &lay, a, t, 150, false, &m4, NULL,
                               &err), 0);
    assert_int_equal(n_equal_keys(&m0, &m4), 0); /* codec hash */
    park_manifest_free(&m4);
    t[0] ^= 1;
    save_ok(st, f->int8, FP_A, &lay, a, t, 150, false, &m4, NULL);
    assert_int_equal(n_equal_keys(&m0, &m4), 0); /* first token */
    park_manifest *ms[] = {&m0, &m1, &m2, &m3, &m4};
    for (int i = 0; i < 5; i++) {
        park_release(st, ms[i]);
        park_manifest_free(ms[i]);
    }
    cas_collect(st);
    cas_close(st);
    free(t);
    kv_free(a);
}

/* Scopes (tenants): the same tokens and rows saved under two scopes share
 * nothing (other keys, each stored in full, so a save's new bytes tell
 * nothing about another scope); within one scope everything is shared;
 * scope 0 keys are the unscoped ones; the scope round-trips in the manifest
 * (version 2; unscoped stays version 1) and a scoped session restores only
 * under its own scope. */
static void test_scopes(void **state) {
    fx *f = *state;
    park_layout lay = park_default_layout();
    kv_cache *a = new_kv(f, KP_TYPE_F32);
    tu_kv_fill(a, 0, 150, 41);
    int32_t *t = tu_make_tokens(150, 19);
    cas *st = open_cas(NULL);
    park_manifest m0, mz, ma, ma2, mb;
    park_stats s0, sa, sa2, sb;
    kp_err err = {0};
    const char *cn = codec_name(f->int8);
    save_ok(st, f->int8, FP_A, &lay, a, t, 150, false, &m0, &s0);
    assert_int_equal(park_save_scoped(st, f->int8, 0, cn, FP_A, 0, &lay, a, t, 150, false, &mz, NULL, &err), 0);
    assert_int_equal(park_save_scoped(st, f->int8, 0, cn, FP_A, 7, &lay, a, t, 150, false, &ma, &sa, &err), 0);
    assert_int_equal(park_save_scoped(st, f->int8, 0, cn, FP_A, 7, &lay, a, t, 150, false, &ma2, &sa2, &err), 0);
    assert_int_equal(park_save_scoped(st, f->int8, 0, cn, FP_A, 9, &lay, a, t, 150, false, &mb, &sb, &err), 0);
    assert_int_equal(n_equal_keys(&m0, &mz), m0.n_spans); /* scope 0 = unscoped */
    assert_int_equal(n_equal_keys(&m0, &ma), 0);
    assert_int_equal(n_equal_keys(&ma, &mb), 0);
    assert_int_equal(n_equal_keys(&ma, &ma2), ma.n_spans);
    assert_int_equal(sa.spans_reused, 0);
    assert_int_equal(sa.bytes_new, sa.bytes_total);
    assert_int_equal(sb.spans_reused, 0);
    assert_int_equal(sb.bytes_new, sb.bytes_total);
    assert_int_equal(sb.bytes_new, s0.bytes_new);
    assert_int_equal(sa2.spans_reused, ma.n_spans);
    assert_int_equal(sa2.bytes_new, 0);
    assert_int_equal(ma.scope, 7);
    assert_int_equal(m0.scope, 0);

    uint8_t *b = NULL, *b0 = NULL;
    size_t len = 0, len0 = 0;
    assert_int_equal(park_manifest_write(&mb, &b, &len, &err), 0);
    assert_int_equal(park_manifest_write(&m0, &b0, &len0, &err), 0);
    assert_int_equal(kp_get_u32(b + 8), 2);
    assert_int_equal(kp_get_u32(b0 + 8), 1);
    assert_int_equal(kp_get_u64(b0 + 120), 0);
    park_manifest r;
    assert_int_equal(park_manifest_read(b, len, &r, &err), 0);
    assert_int_equal(r.scope, 9);
    kv_cache *back = new_kv(f, KP_TYPE_F32);
    restore_ok(st, f->int8, &r, back);
    for (int i = 0; i < r.n_spans; i++)
        cmp_rows(a, back, r.spans[i].span.start, r.spans[i].span.start + r.spans[i].span.n,
                 r.spans[i].span.coded ? 0.05 : -1);
    r.scope = 7; /* claimed under another scope: the keys do not match */
    kv_cache *other = new_kv(f, KP_TYPE_F32);
    assert_int_equal(park_restore(st, f->int8, &r, other, NULL, &err), KP_EMISMATCH);
    assert_int_equal(other->n_pos, 0);
    park_manifest_free(&r);
    free(b);
    free(b0);
    park_manifest *ms[] = {&m0, &mz, &ma, &ma2, &mb};
    for (int i = 0; i < 5; i++) {
        park_release(st, ms[i]);
        park_manifest_free(ms[i]);
    }
    cas_collect(st);
    cas_close(st);
    free(t);
    kv_free(a);
    kv_free(back);
    kv_free(other);
}

/* ---- durability, corruption ---------------------------------------------------- */

static void test_durable_reopen_and_cold_corruption(void **state) {
    fx *f = *state;
    char *dir = tu_tmpdir();
    park_layout lay = {4, 32, 32};
    kv_cache *a = new_kv(f, KP_TYPE_F16);
    tu_kv_fill(a, 0, 180, 41);
    int32_t *t = tu_make_tokens(180, 11);
    cas *st = open_cas(dir);
    park_manifest m;
    save_ok(st, f->none, FP_A, &lay, a, t, 180, true, &m, NULL);
    uint8_t *mb = NULL;
    size_t mlen = 0;
    kp_err err = {0};
    assert_int_equal(park_manifest_write(&m, &mb, &mlen, &err), 0);
    park_manifest_free(&m);
    cas_close(st);

    /* restart: re-index, re-ref from the manifest, restore */
    st = open_cas(dir);
    park_manifest r;
    if (park_manifest_read(mb, mlen, &r, &err)) fail_msg("manifest read: %s", err.msg);
    for (int i = 0; i < r.n_spans; i++) assert_int_equal(cas_ref(st, r.spans[i].key), 0);
    kv_cache *b = new_kv(f, KP_TYPE_F16);
    restore_ok(st, f->none, &r, b);
    cmp_rows(a, b, 0, 180, -1);
    cas_close(st);

    /* flip a payload byte of span 2's cold file: restore fails naming span 2 */
    char p[1024];
    tu_cas_obj_path(dir, r.spans[2].key, p, sizeof p);
    FILE *fp = fopen(p, "r+b");
    assert_non_null(fp);
    fseek(fp, 300, SEEK_SET);
    int ch = fgetc(fp);
    fseek(fp, 300, SEEK_SET);
    fputc(ch ^ 0x10, fp);
    fclose(fp);
    st = open_cas(dir);
    for (int i = 0; i < r.n_spans; i++) cas_ref(st, r.spans[i].key);
    kv_cache *c = new_kv(f, KP_TYPE_F16);
    c->n_pos = 7;
    int rc = park_restore(st, f->none, &r, c, NULL, &err);
    assert_true(rc < 0);
    assert_int_equal(c->n_pos, 7);
    char want[64];
    snprintf(want, sizeof want, "span 2 (tokens %d..%d", r.spans[2].span.start,
             r.spans[2].span.start + r.spans[2].span.n - 1);
    if (!strstr(err.msg, want)) fail_msg("error does not name the span: %s", err.msg);

    park_release(st, &r);
    park_manifest_free(&r);
    cas_close(st);
    free(mb);
    kv_free(a);
    kv_free(b);
    kv_free(c);
    free(t);
    tu_rm_rf(dir);
    free(dir);
}

/* Copy every object of m from src to a fresh store, replacing span `bad`'s
 * object by (obj, len); returns the store with m's references taken. */
static cas *clone_with(cas *src, const park_manifest *m, int bad, const void *obj, size_t len) {
    cas *d = open_cas(NULL);
    for (int i = 0; i < m->n_spans; i++) {
        void *data = NULL;
        size_t n = 0;
        if (i == bad) {
            assert_int_equal(cas_put(d, m->spans[i].key, obj, len, false, NULL), 0);
        } else {
            assert_int_equal(cas_get(src, m->spans[i].key, &data, &n, NULL), 0);
            assert_int_equal(cas_put(d, m->spans[i].key, data, n, false, NULL), 0);
        }
        free(data);
        cas_ref(d, m->spans[i].key);
    }
    return d;
}

static void test_warm_corruption_every_byte(void **state) {
    fx *f = *state;
    park_layout lay = {2, 3, 4};
    kv_cache *a = new_kv(f, KP_TYPE_F32);
    tu_kv_fill(a, 0, 12, 51);
    int32_t *t = tu_make_tokens(12, 13);
    cas *st = open_cas(NULL);
    park_manifest m;
    save_ok(st, f->int8, FP_A, &lay, a, t, 12, false, &m, NULL);
    const int bad = 1; /* a coded span */
    assert_true(m.spans[bad].span.coded);
    void *obj = NULL;
    size_t len = 0;
    assert_int_equal(cas_get(st, m.spans[bad].key, &obj, &len, NULL), 0);
    assert_int_equal(len, m.spans[bad].bytes);
    uint8_t *cp = malloc(len);
    char want[64];
    snprintf(want, sizeof want, "span %d (tokens %d..%d", bad, m.spans[bad].span.start,
             m.spans[bad].span.start + m.spans[bad].span.n - 1);
    kv_cache *dst = new_kv(f, KP_TYPE_F32);
    /* the intact clone restores */
    cas *d = clone_with(st, &m, bad, obj, len);
    restore_ok(d, f->int8, &m, dst);
    cas_close(d);
    for (size_t pos = 0; pos < len + 2; pos++) {
        size_t n = len;
        memcpy(cp, obj, len);
        if (pos < len) cp[pos] ^= (uint8_t)(1u << (pos % 8));
        else n = pos == len ? len - 1 : len / 2; /* truncations */
        d = clone_with(st, &m, bad, cp, n);
        dst->n_pos = 5;
        kp_err err = {0};
        int rc = park_restore(d, f->int8, &m, dst, NULL, &err);
        if (rc == 0) fail_msg("flipped byte %zu of %zu not detected", pos, len);
        assert_int_equal(dst->n_pos, 5);
        if (!strstr(err.msg, want)) fail_msg("byte %zu: error does not name the span: %s", pos, err.msg);
        cas_close(d);
    }
    /* garbage under a key */
    memset(cp, 0xab, len);
    d = clone_with(st, &m, 0, cp, 100);
    kp_err err = {0};
    assert_true(park_restore(d, f->int8, &m, dst, NULL, &err) < 0);
    assert_non_null(strstr(err.msg, "span 0 (tokens 0..1"));
    cas_close(d);

    /* a save meeting a garbage object under a shared key fails and leaves
     * no references behind */
    cas *g = open_cas(NULL);
    assert_int_equal(cas_put(g, m.spans[bad].key, cp, 64, false, NULL), 0);
    park_manifest m2;
    assert_true(park_save(g, f->int8, 0, "int8", FP_A, &lay, a, t, 12, false, &m2, NULL, &err) < 0);
    assert_non_null(strstr(err.msg, "span 1"));
    assert_int_equal(cas_refcount(g, m.spans[0].key), 0);
    assert_int_equal(cas_refcount(g, m.spans[bad].key), 0);
    cas_close(g);

    kv_free(dst);
    free(cp);
    free(obj);
    park_release(st, &m);
    park_manifest_free(&m);
    cas_close(st);
    free(t);
    kv_free(a);
}

/* ---- manifest bytes ------------------------------------------------------------ */

static void test_manifest_bytes(void **state) {
    fx *f = *state;
    park_layout lay = {4, 16, 16};
    kv_cache *a = new_kv(f, KP_TYPE_F16);
    tu_kv_fill(a, 0, 70, 61);
    int32_t *t = tu_make_tokens(70, 17);
    cas *st = open_cas(NULL);
    park_manifest m;
    kp_err err = {0};
    assert_int_equal(park_save(st, f->int8, 0xfeed, "/models/x.codec", FP_A, &lay, a, t, 70,
                               false, &m, NULL, &err), 0);
    uint8_t *b = NULL;
    size_t len = 0;
    assert_int_equal(park_manifest_write(&m, &b, &len, &err), 0);
    assert_int_equal(len, 136 + 4 * 70 + 32 * (size_t)m.n_spans);
    park_manifest r;
    assert_int_equal(park_manifest_read(b, len, &r, &err), 0);
    assert_int_equal(r.model_fingerprint, FP_A);
    assert_string_equal(r.codec, "/models/x.codec");
    assert_int_equal(r.codec_hash, 0xfeed);
    assert_int_equal(r.kv_type, KP_TYPE_F16);
    assert_int_equal(r.layout.sink, 4);
    assert_int_equal(r.layout.window, 16);
    assert_int_equal(r.layout.chunk, 16);
    assert_int_equal(r.n_tokens, 70);
    assert_memory_equal(r.tokens, t, 70 * sizeof *t);
    assert_int_equal(r.n_spans, m.n_spans);
    for (int i = 0; i < m.n_spans; i++) {
        assert_int_equal(r.spans[i].span.start, m.spans[i].span.start);
        assert_int_equal(r.spans[i].span.n, m.spans[i].span.n);
        assert_int_equal(r.spans[i].span.coded, m.spans[i].span.coded);
        assert_int_equal(r.spans[i].bytes, m.spans[i].bytes);
        assert_int_equal(r.spans[i].key.hi, m.spans[i].key.hi);
        assert_int_equal(r.spans[i].key.lo, m.spans[i].key.lo);
    }
    park_manifest_free(&r);

    uint8_t *c = malloc(len + 1);
    for (size_t i = 0; i < len; i++) {
        memcpy(c, b, len);
        c[i] ^= (uint8_t)(1u << (i % 8));
        park_manifest x = {0};
        if (park_manifest_read(c, len, &x, &err) == 0) fail_msg("flipped byte %zu accepted", i);
        assert_null(x.tokens);
    }
    for (size_t n = 0; n < len; n++) {
        park_manifest x = {0};
        if (park_manifest_read(b, n, &x, &err) == 0) fail_msg("truncation to %zu accepted", n);
    }
    memcpy(c, b, len);
    c[len] = 0;
    park_manifest x = {0};
    assert_true(park_manifest_read(c, len + 1, &x, &err) < 0);

    /* an empty session round-trips too */
    park_manifest e;
    assert_int_equal(park_save(st, f->none, 0, NULL, FP_A, &lay, a, t, 0, false, &e, NULL, &err), 0);
    assert_int_equal(e.n_spans, 0);
    uint8_t *eb = NULL;
    size_t elen = 0;
    assert_int_equal(park_manifest_write(&e, &eb, &elen, &err), 0);
    assert_int_equal(park_manifest_read(eb, elen, &x, &err), 0);
    assert_int_equal(x.n_tokens, 0);
    assert_string_equal(x.codec, "none");
    park_manifest_free(&x);
    park_manifest_free(&e);
    free(eb);

    free(c);
    free(b);
    park_release(st, &m);
    park_manifest_free(&m);
    cas_close(st);
    free(t);
    kv_free(a);
}

/* ---- layer-by-layer restore, codec hash -------------------------------------- */

static void test_restore_by_layer(void **state) {
    fx *f = *state;
    park_layout lay = {4, 16, 16};
    kv_cache *src = new_kv(f, KP_TYPE_F16);
    tu_kv_fill(src, 0, 150, 71);
    int32_t *tok = tu_make_tokens(150, 71);
    cas *st = open_cas(NULL);
    park_manifest m;
    save_ok(st, f->int8, FP_A, &lay, src, tok, 150, false, &m, NULL);
    kv_cache *a = new_kv(f, KP_TYPE_F16), *b = new_kv(f, KP_TYPE_F16);
    restore_ok(st, f->int8, &m, a);

    /* begin fetches everything: the manifest may go, the objects too */
    park_manifest m2;
    uint8_t *mb = NULL;
    size_t ml = 0;
    kp_err err = {0};
    assert_int_equal(park_manifest_write(&m, &mb, &ml, &err), 0);
    assert_int_equal(park_manifest_read(mb, ml, &m2, &err), 0);
    park_restorer *r = NULL;
    b->n_pos = 5;
    assert_int_equal(park_restore_begin(st, f->int8, &m2, b, &r, &err), 0);
    park_manifest_free(&m2);
    park_release(st, &m);
    assert_true(cas_collect(st) > 0);
    assert_int_equal(park_restore_layer(r, 1, &err), KP_EINVAL); /* order */
    for (int l = 0; l < NL; l++) {
        assert_int_equal(park_restore_layer(r, l, &err), 0);
        assert_memory_equal(a->k[l], b->k[l], 150 * a->row_bytes);
        assert_memory_equal(a->v[l], b->v[l], 150 * a->row_bytes);
        assert_int_equal(b->n_pos, 5);
    }
    assert_int_equal(park_restore_layer(r, NL, &err), KP_EINVAL);
    park_stats ps;
    assert_int_equal(park_restore_end(r, &ps), 0);
    assert_int_equal(b->n_pos, 150);
    assert_true(ps.bytes_total > 0);
    assert_int_equal(ps.fp16_bytes, 150ull * NL * 2 * NKV * HD * 2);

    /* abandoned: n_pos stays, the handle is freed */
    save_ok(st, f->int8, FP_A, &lay, src, tok, 150, false, &m2, NULL);
    kv_cache *c = new_kv(f, KP_TYPE_F16);
    c->n_pos = 9;
    assert_int_equal(park_restore_begin(st, f->int8, &m2, c, &r, &err), 0);
    assert_int_equal(park_restore_layer(r, 0, &err), 0);
    assert_int_equal(park_restore_end(r, NULL), KP_ECANCELED);
    assert_int_equal(c->n_pos, 9);
    assert_int_equal(park_restore_begin(st, f->int8, &m2, c, &r, &err), 0);
    assert_int_equal(park_restore_end(r, NULL), KP_ECANCELED);
    assert_int_equal(c->n_pos, 9);
    /* a missing object fails begin, naming the span; nothing written */
    park_release(st, &m2);
    cas_collect(st);
    r = (park_restorer *)1;
    assert_int_equal(park_restore_begin(st, f->int8, &m2, c, &r, &err), KP_ENOTFOUND);
    assert_null(r);
    assert_non_null(strstr(err.msg, "span 0"));
    assert_int_equal(c->n_pos, 9);
    park_manifest_free(&m2);
    park_manifest_free(&m);
    free(mb);
    kv_free(a);
    kv_free(b);
    kv_free(c);
    kv_free(src);
    free(tok);
    cas_close(st);
}

static void test_codec_hash(void **state) {
    (void)state;
    assert_int_equal(park_codec_hash("int8"), 0);
    assert_int_equal(park_codec_hash(NULL), 0);
    char *dir = tu_tmpdir();
    char p[1024], q[1024];
    snprintf(p, sizeof p, "%s/a.kvc", dir);
    snprintf(q, sizeof q, "%s/b.kvc", dir);
    assert_int_equal(park_codec_hash(p), 0); /* missing */
    FILE *fa = fopen(p, "wb"), *fb = fopen(q, "wb");
    /* larger than one read buffer, differing in the last byte */
    for (int i = 0; i < 100000; i++) {
        fputc(i & 0xff, fa);
        fputc(i == 99999 ? 1 : (i & 0xff), fb);
    }
    fclose(fa);
    fclose(fb);
    uint64_t ha = park_codec_hash(p), hb = park_codec_hash(q);
    assert_true(ha != 0 && hb != 0 && ha != hb);
    assert_true(park_codec_hash(p) == ha);
    assert_int_equal(park_codec_hash(dir), 0); /* a directory is not a codec file */
    tu_rm_rf(dir);
    free(dir);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_roundtrip_none),
        cmocka_unit_test(test_roundtrip_int8),
        cmocka_unit_test(test_prefix_sharing),
        cmocka_unit_test(test_keys),
        cmocka_unit_test(test_scopes),
        cmocka_unit_test(test_durable_reopen_and_cold_corruption),
        cmocka_unit_test(test_warm_corruption_every_byte),
        cmocka_unit_test(test_manifest_bytes),
        cmocka_unit_test(test_restore_by_layer),
        cmocka_unit_test(test_codec_hash),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
