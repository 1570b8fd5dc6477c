/*
 * fuzz_cas_object.c — libFuzzer target for chunk-store object files
 * (storage/cas.c): the header check at re-index (cas_open) and the full
 * read and verify of a cold object (cas_get).
 *
 * Why: DIR/objects/KK/KEY.kvo files survive crashes, disks and operators;
 * cas_open() must index good files and quarantine bad ones, and cas_get()
 * must refuse a corrupt file with KP_EFORMAT, never hand out bytes that are
 * not the object's. The cas API is path-based (it scans a directory), and a
 * from-memory entry point would split the reader in two, so this target
 * writes the input as an object file into a private scratch directory
 * (under $TMPDIR, else /dev/shm, else /tmp; removed at exit) and opens a store on it:
 * the code under test is exactly the production path. Input: control byte
 * (FZ_FIX: reseal the header and payload XXH64s; FZ_CAS_NAME: name the file
 * after the key in its header, else after a fixed key), then the file.
 * A file that cas_get returns must hold exactly the payload it carried.
 */
#include <dirent.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "storage/cas.h"
#include "tests/fuzz/fuzz_util.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static char g_dir[256];

static void cleanup(void) {
    if (g_dir[0]) fz_rm_tree(g_dir);
}

static const char *scratch(void) {
    if (!g_dir[0]) {
        /* $TMPDIR, else /dev/shm (tmpfs: several times faster than a disk), else /tmp */
        const char *t = getenv("TMPDIR");
        if (!t || !*t) t = access("/dev/shm", W_OK) == 0 ? "/dev/shm" : "/tmp";
        snprintf(g_dir, sizeof g_dir, "%s/kvpark-fuzz-cas-XXXXXX", t);
        if (!mkdtemp(g_dir)) abort();
        atexit(cleanup);
    }
    return g_dir;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    if (size < 1) return 0;
    const char *dir = scratch();
    size_t len = size - 1;
    uint8_t *buf = malloc(len ? len : 1);
    if (!buf) return 0;
    memcpy(buf, data + 1, len);
    if (data[0] & FZ_FIX) fz_fix_cas_object(buf, len);
    cas_key k = {0x0123456789abcdefull, 0xfedcba9876543210ull};
    if ((data[0] & FZ_CAS_NAME) && len >= 32) k = (cas_key){kp_get_u64(buf + 16), kp_get_u64(buf + 24)};
    char hex[33], path[512];
    cas_key_hex(k, hex);
    mkdir(dir, 0700);
    snprintf(path, sizeof path, "%s/objects", dir);
    mkdir(path, 0700);
    snprintf(path, sizeof path, "%s/objects/%.2s", dir, hex);
    mkdir(path, 0700);
    snprintf(path, sizeof path, "%s/objects/%.2s/%s.kvo", dir, hex, hex);
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0 || (len && write(fd, buf, len) != (ssize_t)len)) abort();
    close(fd);

    cas_opts o = cas_default_opts();
    o.dir = dir;
    cas *c = NULL;
    kp_err err = {0};
    if (cas_open(&c, &o, &err)) __builtin_trap(); /* a bad file is quarantined, not an error */
    void *got = NULL;
    size_t got_len = 0;
    int rc = cas_get(c, k, &got, &got_len, &err);
    if (rc == 0) {
        /* accepted: the file is a sealed header naming k, then exactly its payload */
        if (len < 56 || got_len != len - 56 || memcmp(got, buf + 56, got_len) != 0) __builtin_trap();
        free(got);
    } else if (rc > 0 || !err.msg[0]) {
        __builtin_trap();
    }
    cas_close(c);
    free(buf);
    fz_rm_tree(dir); /* the object, the quarantine, everything: next input starts clean */
    return 0;
}
