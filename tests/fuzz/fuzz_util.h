/*
 * fuzz_util.h — what the fuzz targets (tests/fuzz/fuzz_*.c) and the seed
 * generator (fuzz_make_corpus.c) share: the fixed KV shape the targets
 * decode for, the layout of each target's input, and the checksum fix-ups.
 *
 * Why fix-ups: every on-disk format of kvpark is checksummed (XXH32/XXH64),
 * so a mutated input almost never gets past the checksum and the fuzzer
 * would only ever test "checksum mismatch". Targets whose format carries a
 * checksum therefore read a control byte first: with bit 0 (FZ_FIX) set the
 * harness recomputes every checksum of the input the way the writer would,
 * and the parser sees a well-sealed, otherwise arbitrary input; with it
 * clear the bytes are parsed as they came (the checksum paths stay tested).
 * The parsers themselves are never built differently for fuzzing.
 *
 * Input of each target (after the control byte where there is one):
 *   gguf            the file's bytes (no control byte: GGUF has no checksum)
 *   codec           ctl, codec (mod FZ_N_CODECS), kv_type | is_v << 2 | layer << 3,
 *                   rows - 1 (mod FZ_CODEC_MAX_ROWS), pos0 u16, then the chunk
 *   codecfile       ctl, then the codec file (checked against fz_shape())
 *   park_manifest   ctl, then the manifest bytes
 *   park_object     ctl, span index (mod the fixture's spans), then the object
 *   cas_object      ctl (bit 1: name the file after the key in its header),
 *                   then the object file's bytes
 *   store_record    ctl, then the record bytes
 *   blob            ctl, then a legacy v1 session blob (storage/blob.h)
 *   api_chat, api_completion   the request body (no control byte)
 */
#ifndef KP_FUZZ_UTIL_H
#define KP_FUZZ_UTIL_H

#include <dirent.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

#include "compress/codec.h"
#include "kernels/kernels.h"
#include "kernels/kp.h"

#define FZ_FIX 1u      /* control bit 0: recompute checksums before parsing */
#define FZ_CAS_NAME 2u /* cas_object control bit 1: file named after the header's key */

/* The KV shape every target decodes for: small, so one input costs
 * microseconds, yet with several heads, layers and RoPE. */
#define FZ_NL 2
#define FZ_NKV 2
#define FZ_HD 8
#define FZ_FP 0x6b7670666f7a7a31ull /* the fuzz model's fingerprint */
#define FZ_CODEC_MAX_ROWS 128
#define FZ_N_CODECS 7 /* none, fp16, int8, int4, kivi2, pca, learned */

/* The park_object fixture: a session of FZ_PARK_TOKENS tokens parked with
 * int8 in layout sink FZ_PARK_SINK, window FZ_PARK_WINDOW, chunk FZ_PARK_CHUNK
 * (spans: the lossless sink, two coded chunks, the lossless window). */
#define FZ_PARK_TOKENS 48
#define FZ_PARK_SINK 4
#define FZ_PARK_WINDOW 8
#define FZ_PARK_CHUNK 16
#define FZ_PARK_CODEC "int8"

/* Remove a scratch file or directory tree (targets that go through the
 * file system, and the seed generator). */
static inline void fz_rm_tree(const char *path) {
    DIR *d = opendir(path);
    if (!d) {
        unlink(path);
        return;
    }
    struct dirent *de;
    while ((de = readdir(d)) != NULL) {
        if (!strcmp(de->d_name, ".") || !strcmp(de->d_name, "..")) continue;
        char p[1024];
        snprintf(p, sizeof p, "%s/%s", path, de->d_name);
        fz_rm_tree(p);
    }
    closedir(d);
    rmdir(path);
}

static inline codec_shape fz_shape(void) {
    codec_shape s = {.n_layer = FZ_NL, .n_kv_heads = FZ_NKV, .head_dim = FZ_HD, .n_rot = FZ_HD,
                     .rope_mode = KP_ROPE_NEOX, .rope_base = 10000.f, .rope_freq_scale = 1.f,
                     .model_fingerprint = FZ_FP};
    return s;
}

static inline int fz_kv_type(int i) {
    static const int t[3] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};
    return t[i % 3];
}

/* A deterministic generator for fixtures (xorshift64). */
static inline float fz_rand(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return (float)((*s >> 40) & 0xffffff) / (float)0x800000 - 1.0f; /* [-1, 1) */
}

/* ---- checksum fix-ups (formats: the top comments of the named files) ------- */

/* codec.c chunk: XXH32(payload, seed = XXH32(header[0..12))) at 12. */
static inline void fz_fix_codec_chunk(uint8_t *b, size_t len) {
    if (len < CODEC_CHUNK_HEADER_BYTES) return;
    kp_put_u32(b + 12, XXH32(b + 16, len - 16, XXH32(b, 12, 0)));
}

/* park.c manifest: XXH64 of every byte before the last 8, in the last 8. */
static inline void fz_fix_tail64(uint8_t *b, size_t len) {
    if (len >= 8) kp_put_u64(b + len - 8, XXH64(b, len - 8, 0));
}

/* codecfile.h: XXH64 of the whole file with its 8 bytes at 57 read as zero. */
static inline void fz_fix_codecfile(uint8_t *b, size_t len) {
    if (len < 65) return;
    memset(b + 57, 0, 8);
    kp_put_u64(b + 57, XXH64(b, len, 0));
}

/* store.c record: the manifest inside (its length at 16), the extra bytes'
 * XXH64 at 40, the header's at 56. */
static inline void fz_fix_record(uint8_t *b, size_t len) {
    if (len < 64) return;
    uint32_t ml = kp_get_u32(b + 16);
    if (ml > len - 64) return;
    fz_fix_tail64(b + 64, ml);
    kp_put_u64(b + 40, XXH64(b + 64 + ml, len - 64 - ml, 0));
    kp_put_u64(b + 56, XXH64(b, 56, 0));
}

/* park.c span object with E entries: each entry's payload XXH64, then the
 * table's XXH64 after it. */
static inline void fz_fix_park_object(uint8_t *b, size_t len, uint32_t E) {
    size_t table_end = 48 + (size_t)E * 24;
    if (len < table_end + 8) return;
    size_t pos = table_end + 8;
    for (uint32_t e = 0; e < E; e++) {
        uint8_t *t = b + 48 + (size_t)e * 24;
        uint32_t stored = kp_get_u32(t);
        if (stored > len - pos) break;
        kp_put_u64(t + 16, XXH64(b + pos, stored, 0));
        pos += stored;
    }
    kp_put_u64(b + table_end, XXH64(b, table_end, 0));
}

/* cas.c object file: payload XXH64 at 40, header XXH64 at 48. */
static inline void fz_fix_cas_object(uint8_t *b, size_t len) {
    if (len < 56) return;
    kp_put_u64(b + 40, XXH64(b + 56, len - 56, 0));
    kp_put_u64(b + 48, XXH64(b, 48, 0));
}

#endif
