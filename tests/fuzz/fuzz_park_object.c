/*
 * fuzz_park_object.c — libFuzzer target for the span objects of parked
 * sessions: park_restore() (storage/park.c: the object header and entry
 * table check, LZ4 decompression, and the codec chunks inside).
 *
 * Why: the objects live in host RAM, on disk and (later) in remote tiers,
 * shared between sessions by content address; restoring one writes into a
 * live KV cache. The contract (park.h) is that a missing or corrupt object
 * is an error naming the span, never a crash, and that kv->n_pos only moves
 * on success. The target restores the fixture session (fuzz_park_fixture.h:
 * four spans, lossless and int8-coded) with the input in place of one span's
 * object (input: control byte, FZ_FIX: reseal the entry and table XXH64s;
 * span index; the object) and the genuine objects for the others.
 */
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz/fuzz_park_fixture.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 2) return 0;
    const fz_park *P = fz_park_fixture();
    const int target = data[1] % P->man.n_spans;
    size_t len = size - 2;
    uint8_t *obj = malloc(len ? len : 1);
    if (!obj) return 0;
    memcpy(obj, data + 2, len);
    if (data[0] & FZ_FIX) fz_fix_park_object(obj, len, 2u * FZ_NL);
    cas *store = NULL;
    kp_err err = {0};
    if (cas_open(&store, NULL, &err)) __builtin_trap();
    for (int i = 0; i < P->man.n_spans; i++) {
        const void *b = i == target ? obj : P->obj[i];
        size_t n = i == target ? len : P->obj_len[i];
        if (cas_put(store, P->man.spans[i].key, b, n, false, &err)) __builtin_trap();
    }
    free(obj);
    kv_cache *kv = P->kv;
    kv->n_pos = 0;
    int rc = park_restore(store, P->c, &P->man, kv, NULL, &err);
    if (rc == 0 && kv->n_pos != FZ_PARK_TOKENS) __builtin_trap();
    if (rc != 0 && (rc > 0 || kv->n_pos != 0 || !err.msg[0])) __builtin_trap();
    cas_close(store);
    return 0;
}
