/*
 * fuzz_codecs.h — the codecs the fuzz targets decode with, built once per
 * process: the five built-in codecs by name and a synthetic pca and learned
 * codec (random weights, every rank 1..d and bit width 1..8 used) for
 * fz_shape(). Shared by fuzz_codec.c and the seed generator so that the
 * seeds are chunks these very codecs wrote. Test code: the table is the
 * harness's own process-wide fixture, not library state.
 */
#ifndef KP_FUZZ_CODECS_H
#define KP_FUZZ_CODECS_H

#include <stdio.h>
#include <stdlib.h>

#include "compress/codecfile.h"
#include "tests/fuzz/fuzz_util.h"

static const char *const fz_codec_names[FZ_N_CODECS] = {"none", "fp16", "int8", "int4",
                                                        "kivi2", "pca", "learned"};

/* A synthetic pca (kind CODEC_PCA) or learned codec with ranges 0 or 1. */
static inline codec *fz_make_learned(int kind, int ranges, uint64_t seed) {
    codec_shape s = fz_shape();
    const int d = FZ_NKV * FZ_HD;
    int ranks[2 * FZ_NL];
    for (int i = 0; i < 2 * FZ_NL; i++) ranks[i] = i == 0 ? d : 1 + (int)((seed >> (4 * i)) % (uint64_t)d);
    codec *c = NULL;
    kp_err err = {0};
    if (codec_learned_alloc(&c, &s, kind, ranks, &err)) {
        fprintf(stderr, "fuzz: codec_learned_alloc: %s\n", err.msg);
        abort();
    }
    codec_learned *cl = (codec_learned *)c;
    cl->ranges = ranges;
    cl->chunk = FZ_PARK_CHUNK, cl->sink = FZ_PARK_SINK, cl->window = FZ_PARK_WINDOW;
    uint64_t st = seed | 1;
    for (int i = 0; i < 2 * FZ_NL; i++) {
        lc_coder *cd = &cl->coders[i];
        for (int j = 0; j < d; j++) cd->mean[j] = 0.5f * fz_rand(&st);
        for (int j = 0; j < d * cd->r; j++) cd->enc[j] = 0.3f * fz_rand(&st);
        for (int j = 0; j < d * cd->r; j++) cd->dec[j] = 0.3f * fz_rand(&st);
        for (int j = 0; j < cd->r; j++) cd->bits[j] = (uint8_t)(1 + (j * 5 + i) % CODECFILE_MAX_BITS);
    }
    if (codec_learned_finish(c, &err)) {
        fprintf(stderr, "fuzz: codec_learned_finish: %s\n", err.msg);
        abort();
    }
    return c;
}

/* The codec of index i (0..FZ_N_CODECS-1), opened on first use. */
static inline const codec *fz_codec(int i) {
    static codec *tab[FZ_N_CODECS];
    if (!tab[i]) {
        if (i >= 5) {
            tab[i] = fz_make_learned(i == 5 ? CODEC_PCA : CODEC_LEARNED, i == 6, 0x5eed0000u + (uint64_t)i);
        } else {
            codec_shape s = fz_shape();
            kp_err err = {0};
            if (codec_open(&tab[i], fz_codec_names[i], &s, &err)) {
                fprintf(stderr, "fuzz: codec_open %s: %s\n", fz_codec_names[i], err.msg);
                abort();
            }
        }
    }
    return tab[i];
}

#endif
