/*
 * fuzz_park_manifest.c — libFuzzer target for park manifests:
 * park_manifest_read() (storage/park.c), the byte form of a parked
 * session's span list, token ids and codec identity.
 *
 * Why: the manifest is read back from every cold session record at start
 * and before every restore; it decides which objects are fetched and how
 * many rows are written into a KV cache. The target parses the input and,
 * when it is accepted, writes it back with park_manifest_write() and reads
 * that again: the two parses must agree field by field (a manifest the
 * reader accepts is one the writer can reproduce). Input: control byte
 * (FZ_FIX: reseal the trailing XXH64 first), then the manifest.
 */
#include <stdlib.h>
#include <string.h>

#include "storage/park.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static int same(const park_manifest *a, const park_manifest *b) {
    if (a->model_fingerprint != b->model_fingerprint || strcmp(a->codec, b->codec) != 0 ||
        a->codec_hash != b->codec_hash || a->kv_type != b->kv_type ||
        a->layout.sink != b->layout.sink || a->layout.window != b->layout.window ||
        a->layout.chunk != b->layout.chunk || a->n_tokens != b->n_tokens || a->n_spans != b->n_spans)
        return 0;
    if (a->n_tokens && memcmp(a->tokens, b->tokens, (size_t)a->n_tokens * sizeof *a->tokens)) return 0;
    for (int i = 0; i < a->n_spans; i++) {
        const park_span *x = &a->spans[i], *y = &b->spans[i];
        if (x->span.start != y->span.start || x->span.n != y->span.n ||
            x->span.coded != y->span.coded || x->bytes != y->bytes || x->key.hi != y->key.hi ||
            x->key.lo != y->key.lo)
            return 0;
    }
    return 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & FZ_FIX) fz_fix_tail64(buf, len);
    park_manifest m = {0};
    kp_err err = {0};
    int rc = park_manifest_read(buf, len, &m, &err);
    free(buf);
    if (rc) {
        if (rc > 0 || !err.msg[0] || m.tokens || m.spans) __builtin_trap();
        return 0;
    }
    uint8_t *out = NULL;
    size_t out_len = 0;
    if (park_manifest_write(&m, &out, &out_len, &err)) __builtin_trap();
    park_manifest m2 = {0};
    if (park_manifest_read(out, out_len, &m2, &err)) __builtin_trap();
    if (!same(&m, &m2)) __builtin_trap();
    free(out);
    park_manifest_free(&m);
    park_manifest_free(&m2);
    return 0;
}
