/*
 * test_bench_resume.c — `kvpark bench resume` (bench/bench_resume.c) run
 * in-process on stories260K: the CSV has one row per context length and codec
 * with sane fields, and a session restored from the warm and the cold tier
 * with codec `none` predicts the same next token as the hot session (so the
 * measured paths really resume the conversation); with --remote (a Redis of
 * the test's own) the other replica's resume predicts what the warm one does.
 * Timings are not asserted.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_resume.h"
#include "tests/testutil.h"

#define MODEL_REL "models/stories260K.gguf"
#define N_COLS 26

static const char *csv_header =
    "model,ctx,codec,bytes_total,bytes_per_token,prefill_ms,hot_ms,warm_ms,cold_ms,"
    "speedup_hot,speedup_warm,speedup_cold,restore_warm_ms,restore_cold_ms,"
    "disk_read_mbps,cold_resident_pages,prefill_token,hot_token,warm_token,cold_token,"
    "warm_pipelined_ms,pipelined_token,remote_ms,speedup_remote,restore_remote_ms,remote_token";

/* Split a CSV line (no quoting) into at most max fields, in place. */
static int split(char *line, char **f, int max) {
    int n = 0;
    for (char *s = line, *t; n < max && (t = strsep(&s, ",")) != NULL;) f[n++] = t;
    return n;
}

static void test_csv_and_tokens(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED(MODEL_REL);
    char *model = tu_shared_path(MODEL_REL);
    char *dir = tu_tmpdir();
    char csv[1024], cold[1024];
    snprintf(csv, sizeof csv, "%s/resume.csv", dir);
    snprintf(cold, sizeof cold, "%s/cold", dir);
    char *argv[] = {"resume", "-m", model, "--ctx", "64,128", "--repeats", "1", "--codec",
                    "none,int8", "--csv", csv, "--dir", cold, "-t", "1", NULL};
    assert_int_equal(bench_resume_main(15, argv), 0);

    char *text = tu_read_file(csv, NULL);
    assert_non_null(text);
    char *save = NULL;
    char *line = strtok_r(text, "\n", &save);
    assert_non_null(line);
    assert_string_equal(line, csv_header);
    const int want_ctx[4] = {64, 64, 128, 128};
    const char *want_codec[4] = {"none", "int8", "none", "int8"};
    double bytes[4] = {0};
    int rows = 0;
    while ((line = strtok_r(NULL, "\n", &save)) != NULL) {
        assert_true(rows < 4);
        char *f[N_COLS + 1];
        assert_int_equal(split(line, f, N_COLS + 1), N_COLS);
        assert_string_equal(f[0], "stories260K.gguf");
        assert_int_equal(atoi(f[1]), want_ctx[rows]);
        assert_string_equal(f[2], want_codec[rows]);
        bytes[rows] = atof(f[3]);
        assert_true(bytes[rows] > 0);
        assert_true(atof(f[4]) > 0 && fabs(atof(f[4]) - bytes[rows] / want_ctx[rows]) < 0.01);
        for (int c = 5; c <= 8; c++) assert_true(atof(f[c]) > 0); /* the four TTFTs */
        assert_true(atof(f[12]) > 0 && atof(f[12]) <= atof(f[7])); /* restore within warm TTFT */
        assert_true(atof(f[13]) > 0 && atof(f[13]) <= atof(f[8]));
        assert_true(atof(f[14]) > 0);                               /* disk bandwidth measured */
        int hot = atoi(f[17]), warm = atoi(f[18]), cold_tok = atoi(f[19]), pipe = atoi(f[21]);
        assert_true(hot >= 0 && hot < 512);
        assert_true(atof(f[20]) > 0);       /* pipelined warm TTFT measured */
        assert_int_equal(pipe, warm);       /* pipelining changes the timing, never the result */
        for (int c = 22; c < 26; c++) assert_string_equal(f[c], ""); /* no --remote: not measured */
        if (!strcmp(f[2], "none")) { /* lossless: same next token as the hot session */
            assert_int_equal(warm, hot);
            assert_int_equal(cold_tok, hot);
        }
        rows++;
    }
    assert_int_equal(rows, 4);
    /* int8 stores fewer bytes than none once there are coded chunks (ctx 128). */
    assert_true(bytes[3] < bytes[2]);
    /* bytes grow with the context */
    assert_true(bytes[2] > bytes[0]);
    free(text);
    unlink(csv);
    rmdir(cold); /* bench_resume removed its own subdirectory */
    rmdir(dir);
    free(model);
    free(dir);
}

/* --remote: saved by one replica through to Redis, resumed by another that
 * never saw it; with codec none the same next token as the hot session. */
static void test_remote_column(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED(MODEL_REL);
    if (!tu_on_path("redis-server")) {
        print_message("skipped: redis-server is not installed (deploy/install-deps.sh installs it)\n");
        skip();
    }
    tu_redis rs;
    tu_redis_init(&rs, NULL);
    char *model = tu_shared_path(MODEL_REL);
    char *dir = tu_tmpdir();
    char csv[1024];
    snprintf(csv, sizeof csv, "%s/resume.csv", dir);
    char *argv[] = {"resume", "-m", model, "--ctx", "64", "--repeats", "2", "--codec", "none,int8",
                    "--csv", csv, "--remote", rs.url, "-t", "1", NULL};
    assert_int_equal(bench_resume_main(15, argv), 0);
    char *text = tu_read_file(csv, NULL);
    assert_non_null(text);
    char *save = NULL;
    char *line = strtok_r(text, "\n", &save);
    assert_string_equal(line, csv_header);
    int rows = 0;
    while ((line = strtok_r(NULL, "\n", &save)) != NULL) {
        char *f[N_COLS + 1];
        assert_int_equal(split(line, f, N_COLS + 1), N_COLS);
        assert_true(atof(f[22]) > 0);                              /* remote TTFT */
        assert_true(atof(f[23]) > 0);                              /* its speed-up vs re-prefill */
        assert_true(atof(f[24]) > 0 && atof(f[24]) <= atof(f[22])); /* restore within it */
        assert_int_equal(atoi(f[25]), atoi(f[18])); /* what the warm restore predicts, any codec */
        if (!strcmp(f[2], "none")) assert_int_equal(atoi(f[25]), atoi(f[17])); /* and the hot session's */
        rows++;
    }
    assert_int_equal(rows, 2);
    free(text);
    unlink(csv);
    rmdir(dir);
    free(dir);
    free(model);
    tu_redis_done(&rs);
}

static void test_usage(void **state) {
    (void)state;
    char *help[] = {"resume", "--help", NULL};
    assert_int_equal(bench_resume_main(2, help), 0);
    char *bad[] = {"resume", "--ctx", "12x", NULL};
    assert_int_equal(bench_resume_main(3, bad), 2);
    char *bad2[] = {"resume", "--repeats", "0", NULL};
    assert_int_equal(bench_resume_main(3, bad2), 2);
    char *extra[] = {"resume", "stray", NULL};
    assert_int_equal(bench_resume_main(2, extra), 2);
    char *bad_url[] = {"resume", "--remote", "http://nope", NULL};
    assert_int_equal(bench_resume_main(3, bad_url), 2);
}

static void test_bad_codec(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED(MODEL_REL);
    char *model = tu_shared_path(MODEL_REL);
    char *argv[] = {"resume", "-m", model, "--ctx", "64", "--repeats", "1", "--codec",
                    "none,no-such-codec", NULL};
    assert_int_equal(bench_resume_main(9, argv), 1);
    free(model);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_csv_and_tokens),
        cmocka_unit_test(test_remote_column),
        cmocka_unit_test(test_usage),
        cmocka_unit_test(test_bad_codec),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
