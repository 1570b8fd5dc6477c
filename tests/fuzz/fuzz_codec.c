/*
 * fuzz_codec.c — libFuzzer target for codec chunks: codec_decode()
 * (compress/codec.c, the payload readers in codec_baseline.c and
 * codec_learned.c).
 *
 * Why: a chunk comes back from host RAM, disk or another server and is
 * decoded straight into a live KV cache; the contract (codec.h) is that a
 * damaged or foreign chunk is an error, never a crash, and that the output
 * is untouched unless decoding succeeds. The target decodes the input with
 * each codec kind (the five built-ins and a synthetic pca/learned codec) for
 * the row count, element type, K/V and layer the selector bytes choose
 * (input layout: fuzz_util.h), and checks that a refused chunk left every
 * output byte as it was. With FZ_FIX the chunk's XXH32 is resealed first, so
 * the fuzzer explores the header fields and payload readers.
 */
#include <stdlib.h>
#include <string.h>

#include "tests/fuzz/fuzz_codecs.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define SENTINEL 0xa5

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 6) return 0;
    const uint8_t ctl = data[0];
    const codec *c = fz_codec(data[1] % FZ_N_CODECS);
    codec_chunk ch = {.kv_type = fz_kv_type(data[2] & 3), .is_v = (data[2] >> 2) & 1,
                      .layer = (data[2] >> 3) % FZ_NL, .n = 1 + data[3] % FZ_CODEC_MAX_ROWS,
                      .pos0 = (int)kp_get_u16(data + 4)};
    size_t len = size - 6;
    uint8_t *in = malloc(len ? len : 1);
    if (!in) return 0;
    memcpy(in, data + 6, len);
    if (ctl & FZ_FIX) fz_fix_codec_chunk(in, len);
    const size_t out_bytes = (size_t)ch.n * FZ_NKV * FZ_HD * 4;
    uint8_t *rows = malloc(out_bytes);
    if (!rows) {
        free(in);
        return 0;
    }
    memset(rows, SENTINEL, out_bytes);
    kp_err err = {0};
    int rc = codec_decode(c, &ch, in, len, rows, &err);
    if (rc) {
        if (rc > 0 || !err.msg[0]) __builtin_trap(); /* errors are negative, with a message */
        for (size_t i = 0; i < out_bytes; i++)
            if (rows[i] != SENTINEL) __builtin_trap(); /* a refused chunk wrote output */
    }
    free(rows);
    free(in);
    return 0;
}
