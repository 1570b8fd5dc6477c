/*
 * testutil.h — helpers shared by the tests: where the shared test data is,
 * reading files and JSON, float comparisons, temporary directories, and the
 * random KV caches, token lists and files the storage tests build.
 *
 * Tests find ../shared through $KVPARK_SHARED (set by tests/meson.build). A
 * test whose data is missing calls skip() with a message, never passes
 * silently.
 */
#ifndef KP_TESTUTIL_H
#define KP_TESTUTIL_H

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>
#include <jansson.h>

#include "engine/kv.h"
#include "kernels/kernels.h"
#include "storage/cas.h"

/* Path under the shared data dir (static buffer per call site is NOT used:
 * returns a malloc'd string; free it). */
char *tu_shared_path(const char *rel);
/* 1 if the shared file exists. */
int tu_shared_exists(const char *rel);
/* Read a whole file; NULL on failure. *len may be NULL. */
char *tu_read_file(const char *path, size_t *len);
/* Load JSON from a shared file; fails the test on error. */
json_t *tu_load_json(const char *rel);
/* A fresh temporary directory (mkdtemp under $TMPDIR or /tmp); malloc'd. */
char *tu_tmpdir(void);
/* Remove dir and everything below it (links not followed); errors ignored. */
void tu_rm_rf(const char *dir);
/* 1 if path exists (stat). */
int tu_file_exists(const char *path);
/* Write n bytes to path (created or truncated); fails the test on error. */
void tu_write_file(const char *path, const void *data, size_t n);
/* Max |a[i]-b[i]| and max relative error |a-b| / max(|b|, floor). */
double tu_max_abs_diff(const float *a, const float *b, size_t n);
double tu_max_rel_err(const float *a, const float *b, size_t n, double floor);
/* Deterministic random floats in [-scale, scale) (xorshift). */
void tu_rand_floats(float *x, size_t n, float scale, uint64_t *state);
/* A synthetic pca/learned codec for `shape` (compress/codecfile.h): random
 * mean, encoder (latents of about unit variance on rows of about unit size),
 * decoder, ranks (1..d; the first coder d) and bit widths (1..8) per coder;
 * ranges 0 (per-chunk) or 1 (fixed). Fails the test if it cannot be made. */
struct codec;
struct codec_shape;
struct codec *tu_learned_codec(const struct codec_shape *shape, int kind, int ranges, uint64_t *st);

/* A KV cache of kv_type on be, [n_layer] x [n_ctx][n_kv_heads][head_dim];
 * fails the test on error. Free with kv_free. */
kv_cache *tu_kv_new(kp_backend *be, int kv_type, int n_layer, int n_ctx, int n_kv_heads,
                    int head_dim);
/* Rows [from, n) of every layer's K and V: random values in [-2, 2) drawn
 * from seed (the same seed gives the same rows); then n_pos = n. */
void tu_kv_fill(kv_cache *kv, int from, int n, uint64_t seed);
/* n token ids in [0, 512) drawn from seed (xorshift); malloc'd, never NULL. */
int32_t *tu_make_tokens(int n, uint64_t seed);
/* The file of object k in the chunk store at dir: dir/objects/HH/HEX.kvo. */
void tu_cas_obj_path(const char *dir, cas_key k, char *out, size_t cap);

/* Run only the cases whose name matches a cmocka pattern ("test_ppl*",
 * "*ppl*"), so one test can be run alone. tu_apply_filter_args() takes the
 * pattern from the program's first argument, else from $KVPARK_TEST_FILTER:
 *   build-test/tests/test_golden '*ppl*'
 *   KVPARK_TEST_FILTER='*ppl*' meson test -C build-test golden
 * Call it first thing in main(int argc, char **argv). tu_apply_filter() is
 * the environment-only form. */
void tu_apply_filter_args(int argc, char **argv);
void tu_apply_filter(void);

#define TU_SKIP_UNLESS_SHARED(rel)                                                   \
    do {                                                                             \
        if (!tu_shared_exists(rel)) {                                                \
            print_message("SKIP: shared test data '%s' not found (set KVPARK_SHARED)\n", \
                          rel);                                                      \
            skip();                                                                  \
        }                                                                            \
    } while (0)

/* Run a shell command, its stdout (NUL-terminated, at most cap - 1 bytes)
 * into out; the exit status, or 128 + the signal that ended it. */
int tu_run_cmd(const char *cmd, char *out, size_t cap);
/* The kvpark binary under test: $KVPARK_BIN, else build/kvpark. */
const char *tu_kvpark_bin(void);
/* Call a CLI entry point (argv[0] = its name) with stdout redirected to a
 * temporary file; returns its status, the captured text (malloc'd) in *out. */
int tu_run_captured(int (*fn)(int, char **), int argc, char **argv, char **out);

/* A redis-server of the test's own on a unix socket in a fresh temp dir
 * (no persistence; it dies with the test: PR_SET_PDEATHSIG). extra: more
 * "--opt", "value" arguments, NULL-ended. tu_redis_init fails the test if
 * redis-server is not on PATH (check tu_on_path first to skip instead);
 * tu_redis_start restarts a killed one on the same socket; tu_redis_done
 * kills it and removes its dir. */
typedef struct tu_redis {
    char dir[512];
    char sock[600];
    char url[640];   /* "unix:<sock>" */
    int pid;
} tu_redis;
int tu_on_path(const char *prog);
void tu_msleep(int ms);
void tu_redis_init(tu_redis *s, const char *const *extra);
void tu_redis_start(tu_redis *s, const char *const *extra);
void tu_redis_kill(tu_redis *s);
void tu_redis_done(tu_redis *s);

#endif
