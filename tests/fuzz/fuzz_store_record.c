/*
 * fuzz_store_record.c — libFuzzer target for session records
 * (DIR/sessions/ID.kvpm): store_rec_parse() (storage/store.c), the header,
 * the park manifest inside it and the server's extra bytes.
 *
 * Why: store_open() parses every record in the cold directory at start, and
 * a record that fails must be quarantined, not crash the server that is
 * coming up with everyone's sessions. The target parses the input; when it
 * is accepted, the manifest must say as many tokens as the header and the
 * extra bytes must be a copy (it is freed, so ASan sees a use of the
 * input's storage). Input: control byte (FZ_FIX: reseal the manifest's,
 * the extra bytes' and the header's XXH64), then the record.
 */
#include <stdlib.h>
#include <string.h>

#include "storage/store_impl.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & FZ_FIX) fz_fix_record(buf, len);
    park_manifest m;
    uint8_t *extra = NULL;
    size_t extra_len = 0;
    int64_t mtime = 0;
    kp_err err = {0};
    int rc = store_rec_parse(buf, len, &m, &extra, &extra_len, &mtime, &err);
    if (rc == 0) {
        if (m.n_tokens < 1 || (uint32_t)m.n_tokens != kp_get_u32(buf + 24) || !extra ||
            extra_len != kp_get_u32(buf + 20) || (extra_len && memcmp(extra, buf + len - extra_len, extra_len)))
            __builtin_trap();
        free(buf);
        volatile uint8_t sink = extra[extra_len ? extra_len - 1 : 0];
        (void)sink;
        free(extra);
        park_manifest_free(&m);
    } else {
        if (rc > 0 || !err.msg[0] || extra || m.tokens || m.spans) __builtin_trap();
        free(buf);
    }
    return 0;
}
