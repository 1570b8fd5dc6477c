/*
 * fuzz_blob.c — libFuzzer target for legacy v1 session blobs (DIR/ID.kvps,
 * storage/blob.c): blob_read_meta() and, when the header is accepted,
 * blob_read_kv() into a KV cache of the fixture's shape.
 *
 * Why: store_open() imports every legacy blob it finds in the cold
 * directory (store_legacy.c), so a damaged blob must be refused, never
 * crash the server at start; blob_read_kv's contract is that kv->n_pos only
 * moves on success. The blob API takes a path; the target writes the input
 * into an anonymous memory file (memfd) and passes /proc/self/fd/N, so no
 * file system is touched and the reader runs unchanged. Input: control byte
 * (FZ_FIX: reseal the chunk XXH64s and the header XXH64), then the blob.
 */
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "storage/blob.h"
#include "tests/fuzz/fuzz_park_fixture.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* blob.h: header (128), tokens, extra_len + extra, chunk table, header XXH64. */
static void fix_blob(uint8_t *b, size_t len) {
    if (len < BLOB_HEADER_BYTES) return;
    uint64_t nt = kp_get_u32(b + 60), nc = kp_get_u32(b + 72);
    uint64_t p = kp_get_u32(b + 12) + 4 * nt;
    if (p + 4 > len) return;
    uint64_t xl = kp_get_u32(b + p);
    uint64_t table = p + 4 + xl, end = table + (uint64_t)BLOB_CHUNK_ENTRY_BYTES * nc;
    if (end + 8 > len) return;
    for (uint64_t i = 0; i < nc; i++) {
        uint8_t *t = b + table + i * BLOB_CHUNK_ENTRY_BYTES;
        uint64_t off = kp_get_u64(t), stored = kp_get_u32(t + 12);
        if (off <= len && stored <= len - off) kp_put_u64(t + 24, XXH64(b + off, stored, 0));
    }
    kp_put_u64(b + end, XXH64(b, end, 0));
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const fz_park *P = fz_park_fixture();
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & FZ_FIX) fix_blob(buf, len);
    int fd = memfd_create("fuzz-blob", MFD_CLOEXEC);
    if (fd < 0 || (len && write(fd, buf, len) != (ssize_t)len)) abort();
    free(buf);
    char path[64];
    snprintf(path, sizeof path, "/proc/self/fd/%d", fd);
    blob_meta m;
    int32_t *tokens = NULL;
    void *extra = NULL;
    size_t extra_len = 0;
    kp_err err = {0};
    int rc = blob_read_meta(path, &m, &tokens, &extra, &extra_len, &err);
    if (rc == 0) {
        if (!tokens || !extra || m.n_tokens < 0) __builtin_trap();
        volatile int32_t sink = m.n_tokens ? tokens[m.n_tokens - 1] : 0;
        (void)sink;
        kv_cache *kv = P->kv;
        kv->n_pos = 0;
        rc = blob_read_kv(path, FZ_FP, kv, &err);
        if (rc == 0 && kv->n_pos != m.n_tokens) __builtin_trap();
        if (rc != 0 && (rc > 0 || kv->n_pos != 0 || !err.msg[0])) __builtin_trap();
    } else if (rc > 0 || !err.msg[0]) {
        __builtin_trap();
    }
    free(tokens);
    free(extra);
    close(fd);
    return 0;
}
