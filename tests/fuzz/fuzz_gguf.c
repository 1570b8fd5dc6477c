/*
 * fuzz_gguf.c — libFuzzer target for the GGUF reader (engine/gguf.c).
 *
 * Why: gguf_open() parses untrusted model files; a fuzzer explores far more
 * malformed headers than the hand-written cases in test_gguf.c. Each input is
 * parsed with gguf_open_mem() and, when accepted, every key, array element
 * and tensor byte range is touched so ASan catches any pointer the reader
 * hands out that lies outside the input.
 *
 * Built with -Dfuzz=true (tests/fuzz/meson.build) and run by
 * deploy/fuzz.sh [SECONDS] gguf; seeds in tests/fuzz/corpus/gguf (written by
 * fuzz_make_corpus.c with gguf_writer_write_mem). Input: the file's bytes.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "engine/gguf.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    gguf_file *f = NULL;
    kp_err err;
    if (gguf_open_mem(&f, data, size, &err) != 0) return 0;
    volatile uint64_t sink = 0;
    for (int64_t i = 0; i < gguf_n_kv(f); i++) {
        const char *key = gguf_key(f, i);
        sink += strlen(key);
        if (gguf_kv_type(f, i) == GGUF_VT_ARRAY) {
            gguf_arr a;
            if (gguf_get_arr(f, key, &a, NULL) != 0) __builtin_trap();
            for (uint64_t j = 0; j < a.n; j++) {
                if (a.type == GGUF_VT_STRING) {
                    const char *s;
                    size_t n;
                    gguf_arr_get_str(&a, j, &s, &n);
                    if (n) sink += (uint8_t)s[0] + (uint8_t)s[n - 1];
                } else {
                    sink += (uint64_t)gguf_arr_get_int(&a, j);
                    sink += (uint64_t)(gguf_arr_get_float(&a, j) != 0.0);
                }
            }
        } else {
            int64_t v;
            double d;
            const char *s;
            size_t n;
            if (gguf_get_int(f, key, &v, NULL) == 0) sink += (uint64_t)v;
            if (gguf_get_float(f, key, &d, NULL) == 0) sink += (uint64_t)(d != 0.0);
            if (gguf_get_str(f, key, &s, &n, NULL) == 0 && n) sink += (uint8_t)s[n - 1];
        }
        if (gguf_find_key(f, key) != i) __builtin_trap();
    }
    for (int64_t i = 0; i < gguf_n_tensors(f); i++) {
        const gguf_tensor *t = gguf_tensor_at(f, i);
        const uint8_t *p = t->data;
        sink += p[0] + p[t->nbytes - 1];
        if (gguf_find_tensor(f, t->name) != t) __builtin_trap();
    }
    (void)sink;
    gguf_close(f);
    return 0;
}
