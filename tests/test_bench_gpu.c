/*
 * test_bench_gpu.c — `kvpark bench gpu` (bench/bench_gpu.c): usage is
 * checked before any device call (so a typo on a GPU host costs no GPU
 * time), a machine without a GPU gets status 1 and a message that says so,
 * and, on a GPU, a small run on stories260K writes a CSV whose every row is
 * measured and whose every decode was checked against the CPU decoder.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_gpu.h"
#include "compress/codec_gpu.h"
#include "tests/testutil.h"

#define MODEL_REL "models/stories260K.gguf"

static void test_usage(void **state) {
    (void)state;
    char *out = NULL;
    char *help[] = {"gpu", "--help", NULL};
    assert_int_equal(tu_run_captured(bench_gpu_main, 2, help, &out), 0);
    assert_non_null(strstr(out, "usage: kvpark bench gpu"));
    free(out);
    /* every bad value is status 2, whether or not a GPU is there */
    char *bad[][3] = {{"gpu", "--tokens", "0"},       {"gpu", "--tokens", "12x"},
                      {"gpu", "--kv-type", "q4_0"},   {"gpu", "-r", "0"},
                      {"gpu", "--copy-bytes", "1"},   {"gpu", "--gpu", "-1"},
                      {"gpu", "--codec", ","},        {"gpu", "--plot", "a'b.png"},
                      {"gpu", "--bogus", "1"},        {"gpu", "stray", "arg"}};
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        int rc = tu_run_captured(bench_gpu_main, 3, bad[i], &out);
        if (rc != 2) fail_msg("bench gpu %s %s: status %d, want 2", bad[i][1], bad[i][2], rc);
        free(out);
    }
}

static void test_without_gpu(void **state) {
    (void)state;
    const char *why = NULL;
    if (codec_gpu_available(&why)) {
        print_message("SKIP: a GPU is present; test_on_gpu covers this machine\n");
        skip();
    }
    char *out = NULL;
    char *argv[] = {"gpu", "-r", "1", NULL};
    /* status 1 (a runtime error, not bad usage); the message goes to stderr */
    assert_int_equal(tu_run_captured(bench_gpu_main, 3, argv, &out), 1);
    free(out);
}

static void test_on_gpu(void **state) {
    (void)state;
    const char *why = NULL;
    if (!codec_gpu_available(&why)) {
        print_message("SKIP: no CUDA device (%s)\n", why);
        skip();
    }
    TU_SKIP_UNLESS_SHARED(MODEL_REL);
    char *mpath = tu_shared_path(MODEL_REL), *dir = tu_tmpdir();
    char csv[1024];
    snprintf(csv, sizeof csv, "%s/gpu.csv", dir);
    char *argv[] = {"gpu", "-m", mpath, "--tokens", "300", "-r", "2", "--copy-bytes", "8M",
                    "--codec", "fp16,int8,int4,kivi2", "--csv", csv, NULL};
    char *out = NULL;
    assert_int_equal(tu_run_captured(bench_gpu_main, 13, argv, &out), 0);
    assert_non_null(strstr(out, "| copy D2D |"));
    free(out);
    char *text = tu_read_file(csv, NULL);
    assert_non_null(text);
    /* header + 3 copies + 4 decodes, each decode checked ("ok") */
    int lines = 0, ok = 0;
    for (char *p = text; (p = strchr(p, '\n')); p++) lines++;
    for (char *p = text; (p = strstr(p, ",ok\n")); p++) ok++;
    assert_int_equal(lines, 8);
    assert_int_equal(ok, 4);
    free(text);
    unlink(csv);
    rmdir(dir);
    free(dir);
    free(mpath);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_usage),
        cmocka_unit_test(test_without_gpu),
        cmocka_unit_test(test_on_gpu),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("bench_gpu", tests, NULL, NULL);
}
