/*
 * fuzz_codecfile.c — libFuzzer target for codec files (pca / learned):
 * codecfile_open_mem() (compress/codecfile.c), which reads the GGUF
 * container, the kvpark.codec.* keys and the per-layer tensors, and checks
 * them against the model's KV shape.
 *
 * Why: `--codec FILE` and every cold session parked with a learned codec
 * depend on this reader; a codec file is user-supplied and may be truncated
 * or damaged. A file it accepts must then work: the target encodes a chunk
 * of every layer's K and V with the opened codec and decodes it again (both
 * must succeed), so a reader that accepts inconsistent ranks or sizes shows
 * up as an ASan report or a trap. Input: control byte (FZ_FIX: reseal the
 * file's XXH64 first), then the file; shape fz_shape() (fuzz_util.h).
 */
#include <stdlib.h>
#include <string.h>

#include "compress/codecfile.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define ROWS 5

static void exercise(const codec *c) {
    const int d = FZ_NKV * FZ_HD;
    float x[ROWS * FZ_NKV * FZ_HD], y[ROWS * FZ_NKV * FZ_HD];
    uint64_t st = 0x1234567;
    for (int i = 0; i < ROWS * d; i++) x[i] = fz_rand(&st);
    size_t cap = codec_max_bytes(c, ROWS);
    uint8_t *buf = malloc(cap ? cap : 1);
    if (!buf) return;
    for (int l = 0; l < FZ_NL; l++)
        for (int v = 0; v < 2; v++) {
            codec_chunk ch = {.layer = l, .is_v = v, .pos0 = 3, .n = ROWS, .kv_type = KP_TYPE_F32};
            size_t len = 0;
            kp_err err = {0};
            if (codec_encode(c, &ch, x, buf, cap, &len, &err)) __builtin_trap();
            if (len != codec_chunk_bytes_at(c, ROWS, KP_TYPE_F32, v, l)) __builtin_trap();
            if (codec_decode(c, &ch, buf, len, y, &err)) __builtin_trap();
        }
    free(buf);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & FZ_FIX) fz_fix_codecfile(buf, len);
    codec_shape shape = fz_shape();
    codec *c = NULL;
    kp_err err = {0};
    int rc = codecfile_open_mem(&c, buf, len, "fuzz", &shape, &err);
    free(buf); /* the codec must not point into the file's bytes */
    if (rc == 0) {
        exercise(c);
        codec_free(c);
    } else if (rc > 0 || c) {
        __builtin_trap();
    }
    return 0;
}
