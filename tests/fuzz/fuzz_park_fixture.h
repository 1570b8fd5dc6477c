/*
 * fuzz_park_fixture.h — the parked session fuzz_park_object.c restores
 * (and the seed generator writes out): FZ_PARK_TOKENS tokens of random F16
 * KV in fz_shape(), parked with FZ_PARK_CODEC into a RAM-only chunk store in
 * the layout of fuzz_util.h; kept as its manifest and a copy of every span's
 * object. Built once per process (test fixture, not library state).
 */
#ifndef KP_FUZZ_PARK_FIXTURE_H
#define KP_FUZZ_PARK_FIXTURE_H

#include <stdio.h>
#include <stdlib.h>

#include "engine/kv.h"
#include "storage/park.h"
#include "tests/fuzz/fuzz_codecs.h"

typedef struct fz_park {
    kp_backend *be;
    const codec *c;
    park_manifest man;
    uint8_t **obj;   /* [man.n_spans] */
    size_t *obj_len; /* [man.n_spans] */
    kv_cache *kv;    /* restore target: FZ_PARK_TOKENS rows */
    kv_cache *src;   /* the session's KV (the seed generator saves it again) */
    int32_t tokens[FZ_PARK_TOKENS];
} fz_park;

static inline void fz_die(const char *what, const kp_err *err) {
    fprintf(stderr, "fuzz: park fixture: %s: %s\n", what, err->msg);
    abort();
}

static inline const fz_park *fz_park_fixture(void) {
    static fz_park P;
    if (P.be) return &P;
    kp_err err = {0};
    if (kp_backend_new(&P.be, "cpu", 1, &err)) fz_die("backend", &err);
    P.c = fz_codec(2); /* FZ_PARK_CODEC */
    kv_cache *src = NULL;
    if (kv_new(&P.src, P.be, KP_TYPE_F16, FZ_NL, FZ_PARK_TOKENS, FZ_NKV, FZ_HD, &err)) fz_die("kv", &err);
    src = P.src;
    if (kv_new(&P.kv, P.be, KP_TYPE_F16, FZ_NL, FZ_PARK_TOKENS, FZ_NKV, FZ_HD, &err)) fz_die("kv", &err);
    const int d = FZ_NKV * FZ_HD;
    float x[FZ_PARK_TOKENS * FZ_NKV * FZ_HD];
    uint64_t st = 0xfa11u;
    for (int l = 0; l < FZ_NL; l++)
        for (int v = 0; v < 2; v++) {
            for (int i = 0; i < FZ_PARK_TOKENS * d; i++) x[i] = 2.0f * fz_rand(&st);
            kp_backend_ops(P.be)->kv_store(P.be, v ? src->v[l] : src->k[l], KP_TYPE_F16, x,
                                           FZ_PARK_TOKENS, d);
        }
    src->n_pos = FZ_PARK_TOKENS;
    int32_t *tokens = P.tokens;
    for (int i = 0; i < FZ_PARK_TOKENS; i++) tokens[i] = (i * 37 + 11) % 500;
    cas *store = NULL;
    if (cas_open(&store, NULL, &err)) fz_die("cas", &err);
    park_layout lay = {.sink = FZ_PARK_SINK, .window = FZ_PARK_WINDOW, .chunk = FZ_PARK_CHUNK};
    park_stats ps;
    if (park_save(store, P.c, 0, FZ_PARK_CODEC, FZ_FP, &lay, src, tokens, FZ_PARK_TOKENS, false,
                  &P.man, &ps, &err))
        fz_die("park_save", &err);
    P.obj = calloc((size_t)P.man.n_spans, sizeof *P.obj);
    P.obj_len = calloc((size_t)P.man.n_spans, sizeof *P.obj_len);
    if (!P.obj || !P.obj_len) abort();
    for (int i = 0; i < P.man.n_spans; i++) {
        void *p = NULL;
        if (cas_get(store, P.man.spans[i].key, &p, &P.obj_len[i], &err)) fz_die("cas_get", &err);
        P.obj[i] = p;
    }
    cas_close(store);
    return &P;
}

#endif
