/*
 * test_tools.c — the front ends of tools/ against the library, in process:
 * the one strict number/size parser set every command and benchmark uses
 * (tools/cli.h: range errors, trailing junk, empty strings, overflow, size
 * suffixes), `kvpark ppl --codec` (tools/cmd_ppl.c, run as a process)
 * printing the numbers quality_eval gives for the same options, and the
 * rows `kvpark bench engine` writes for every size x depth.
 */
#include <limits.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compress/codec.h"
#include "compress/quality.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "kernels/kp.h"
#include "tests/testutil.h"
#include "tools/cli.h"

/* Run a shell command, capture stdout (and stderr if merge), return exit status. */
static char out[1 << 16];

/* `kvpark ppl --codec`: the lines scripts read (the last four in this order,
 * ppl_ref before them) carry the numbers quality_eval gives for the same
 * options; a missing --codec is bad usage (2), an unknown codec a runtime
 * error (1). */
static void test_ppl_codec(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("golden/stories260K/ppl_excerpt.txt");
    char *mpath = tu_shared_path("models/stories260K.gguf");
    char *text = tu_shared_path("golden/stories260K/ppl_excerpt.txt");
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s ppl -m '%s' -f '%s' -c 128 --chunks 2 --codec int8 --park-every 32 --chunk 16 "
             "--sink 4 --window 16 -t 1 2>/dev/null", tu_kvpark_bin(), mpath, text);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 0);
    print_message("%s", out);
    char *lines[64];
    int nl = 0;
    for (char *save = NULL, *l = strtok_r(out, "\n", &save); l && nl < 64;
         l = strtok_r(NULL, "\n", &save))
        lines[nl++] = l;
    assert_true(nl >= 5);
    double ppl, ratio, agree, kl, ppl_ref;
    assert_int_equal(sscanf(lines[nl - 4], "ppl = %lf", &ppl), 1);
    assert_int_equal(sscanf(lines[nl - 3], "ratio = %lf", &ratio), 1);
    assert_int_equal(sscanf(lines[nl - 2], "agree = %lf", &agree), 1);
    assert_int_equal(sscanf(lines[nl - 1], "kl = %lf", &kl), 1);
    assert_int_equal(sscanf(lines[nl - 5], "ppl_ref = %lf", &ppl_ref), 1);

    /* the same numbers as the library call with these options */
    kp_err err = {0};
    model_opts mo = model_default_opts();
    mo.n_threads = 1;
    model *m = NULL;
    if (model_load(&m, mpath, &mo, &err)) fail_msg("model_load: %s", err.msg);
    size_t len = 0, n = 0;
    char *txt = tu_read_file(text, &len);
    int32_t *ids = NULL;
    assert_non_null(txt);
    assert_int_equal(tok_encode(model_vocab(m), txt, len, true, false, &ids, &n, &err), 0);
    free(txt);
    quality_opts o = quality_default_opts();
    o.n_ctx = 128;
    o.park_every = 32;
    o.chunk = 16;
    o.sink = 4;
    o.window = 16;
    o.max_chunks = 2;
    codec_shape shape = quality_codec_shape(m);
    codec *c = NULL;
    assert_int_equal(codec_open(&c, "int8", &shape, &err), 0);
    quality_result r;
    if (quality_eval(m, c, ids, (int64_t)n, &o, &r, &err)) fail_msg("quality_eval: %s", err.msg);
    assert_true(fabs(ppl - r.ppl) < 1e-4 && fabs(ppl_ref - r.ppl_ref) < 1e-4);
    assert_true(fabs(ratio - r.ratio) < 1e-4 && fabs(agree - r.agree) < 1e-6);
    assert_true(fabs(kl / r.kl - 1) < 1e-5);
    codec_free(c);
    free(ids);
    model_free(m);

    /* usage errors: missing --codec, unknown codec */
    snprintf(cmd, sizeof cmd, "%s ppl -m '%s' -f '%s' --park-every 8 2>&1", tu_kvpark_bin(), mpath, text);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 2);
    snprintf(cmd, sizeof cmd, "%s ppl -m '%s' -f '%s' --codec int3 2>&1", tu_kvpark_bin(), mpath, text);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 1);
    free(mpath);
    free(text);
}

/* The one strict parser set of every command (tools/cli.h): the whole
 * string must be a number in range; sizes take K/M/G/T (powers of 1024). */
/* `ppl --codec FILE` measures a codec file under the layout it was
 * calibrated for (sink, window, chunk in the file) unless the command line
 * says otherwise, option by option. */
static void test_ppl_codec_file_layout(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("data/tinystories-train-calib.txt");
    TU_SKIP_UNLESS_SHARED("golden/stories260K/ppl_excerpt.txt");
    char *mpath = tu_shared_path("models/stories260K.gguf");
    char *calib = tu_shared_path("data/tinystories-train-calib.txt");
    char *text = tu_shared_path("golden/stories260K/ppl_excerpt.txt");
    char *dir = tu_tmpdir(), cpath[1024], cmd[4096];
    snprintf(cpath, sizeof cpath, "%s/c.kpc", dir);
    snprintf(cmd, sizeof cmd,
             "%s calibrate -m '%s' -f '%s' -o '%s' --bits 2 --sink 0 --window 8 --chunk 32 -c 128 "
             "--max-tokens 4096 --no-sens --no-refine -q -t 1 >/dev/null 2>&1", tu_kvpark_bin(), mpath, calib,
             cpath);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 0);
    static const struct {
        const char *extra, *want;
    } cases[] = {
        {"", "chunk 32, sink 0, window 8 (the codec file's layout where not given)"},
        {"--window 16", "chunk 32, sink 0, window 16 (the codec file's layout where not given)"},
        {"--sink 0 --window 8 --chunk 32", "chunk 32, sink 0, window 8\n"},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        snprintf(cmd, sizeof cmd, "%s ppl -m '%s' -f '%s' -c 128 --chunks 1 --codec '%s' %s -t 1 2>&1 >/dev/null",
                 tu_kvpark_bin(), mpath, text, cpath, cases[i].extra);
        assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 0);
        if (!strstr(out, cases[i].want)) fail_msg("ppl --codec FILE %s: no '%s' in: %s", cases[i].extra, cases[i].want, out);
    }
    tu_rm_rf(dir);
    free(dir), free(mpath), free(calib), free(text);
}

static void test_parsers(void **state) {
    (void)state;
    long v = 7;
    assert_int_equal(cli_parse_long("42", 0, 100, &v), 0);
    assert_int_equal(v, 42);
    assert_int_equal(cli_parse_long("-5", -10, 10, &v), 0);
    assert_int_equal(v, -5);
    assert_int_equal(cli_parse_long("+5", 0, 10, &v), 0);
    assert_int_equal(cli_parse_long("0", 0, 0, &v), 0);
    v = 7;
    static const char *const bad_long[] = {"", "abc", "12x", "1 ", "1.5", "0x10", "-", " ",
                                           "99999999999999999999", "-99999999999999999999"};
    for (size_t i = 0; i < KP_ARRAY_LEN(bad_long); i++) {
        if (cli_parse_long(bad_long[i], LONG_MIN, LONG_MAX, &v) != -1)
            fail_msg("cli_parse_long accepted '%s'", bad_long[i]);
        assert_int_equal(v, 7); /* untouched on error */
    }
    assert_int_equal(cli_parse_long("101", 0, 100, &v), -1); /* range, both ends inclusive */
    assert_int_equal(cli_parse_long("-1", 0, 100, &v), -1);
    assert_int_equal(cli_parse_long("100", 0, 100, &v), 0);
    int iv = 3;
    assert_int_equal(cli_parse_int("65535", 1, 65535, &iv), 0);
    assert_int_equal(iv, 65535);
    assert_int_equal(cli_parse_int("65536", 1, 65535, &iv), -1);
    assert_int_equal(cli_parse_int("4294967297", INT_MIN, INT_MAX, &iv), -1); /* no wrap to 1 */
    assert_int_equal(iv, 65535);

    uint64_t u = 9;
    assert_int_equal(cli_parse_u64("18446744073709551615", &u), 0);
    assert_true(u == UINT64_MAX);
    assert_int_equal(cli_parse_u64("18446744073709551616", &u), -1); /* overflow */
    assert_int_equal(cli_parse_u64("", &u), -1);
    assert_int_equal(cli_parse_u64("7seed", &u), -1);
    assert_int_equal(cli_parse_u64("-1", &u), 0); /* strtoull's wrap, kept for --seed -1 */
    assert_true(u == UINT64_MAX);

    double d = 2;
    assert_int_equal(cli_parse_float("0.25", 0, 1, &d), 0);
    assert_true(d == 0.25);
    assert_int_equal(cli_parse_float("1e-3", 0, 1, &d), 0);
    assert_true(d == 1e-3);
    static const char *const bad_float[] = {"", "x", "0.5x", "nan", "inf", "-inf", "1e999", "1,5"};
    d = 2;
    for (size_t i = 0; i < KP_ARRAY_LEN(bad_float); i++) {
        if (cli_parse_float(bad_float[i], -HUGE_VAL, HUGE_VAL, &d) != -1)
            fail_msg("cli_parse_float accepted '%s'", bad_float[i]);
        assert_true(d == 2);
    }
    assert_int_equal(cli_parse_float("1.0001", 0, 1, &d), -1);
    assert_int_equal(cli_parse_float("-0.1", 0, 1, &d), -1);

    struct {
        const char *s;
        uint64_t want;
    } sizes[] = {
        {"0", 0}, {"1024", 1024}, {"1K", 1024}, {"1k", 1024}, {"1KiB", 1024}, {"1KB", 1024},
        {"512M", 512ull << 20}, {"2G", 2ull << 30}, {"1.5G", 3ull << 29}, {"1T", 1ull << 40},
        {"100b", 100}, {"0.5K", 512},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(sizes); i++) {
        u = 0;
        if (cli_parse_size(sizes[i].s, &u) || u != sizes[i].want)
            fail_msg("cli_parse_size('%s') = %llu, want %llu", sizes[i].s, (unsigned long long)u,
                     (unsigned long long)sizes[i].want);
    }
    static const char *const bad_size[] = {"", "G", "-1", "-1K", "1X", "1KK", "1 G", "1Gx", "1iB",
                                           "nan", "inf", "1e999", "16E", "20000000T"};
    for (size_t i = 0; i < KP_ARRAY_LEN(bad_size); i++) {
        u = 5;
        if (cli_parse_size(bad_size[i], &u) != -1) fail_msg("cli_parse_size accepted '%s'", bad_size[i]);
        assert_true(u == 5);
    }
}

/* `kvpark bench engine -d`: one row per (test, depth), the depth in its own
 * column and in the test's name ("tg4 @ d32", as llama-bench prints it), a
 * positive rate; a bad depth list is bad usage. */
static void test_bench_engine_depth(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *mpath = tu_shared_path("models/stories260K.gguf");
    char csv[] = "/tmp/kvpark-test-bench-engine-XXXXXX";
    int fd = mkstemp(csv);
    assert_true(fd >= 0);
    close(fd);
    char cmd[2048];
    snprintf(cmd, sizeof cmd,
             "%s bench engine -m '%s' -p 8 -n 4 -d 0,32 -r 1 --threads-list 1 --csv '%s' 2>/dev/null",
             tu_kvpark_bin(), mpath, csv);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 0);
    print_message("%s", out);
    assert_non_null(strstr(out, "| tg4 @ d32 |"));
    FILE *f = fopen(csv, "r");
    assert_non_null(f);
    char line[512];
    assert_non_null(fgets(line, sizeof line, f));
    assert_string_equal(line, "model,test,threads,kv_type,tokens,repeats,median_tok_s,min_tok_s,max_tok_s,depth\n");
    const char *want[4][2] = {{"pp8", "0"}, {"tg4", "0"}, {"pp8 @ d32", "32"}, {"tg4 @ d32", "32"}};
    for (int i = 0; i < 4; i++) {
        assert_non_null(fgets(line, sizeof line, f));
        char *fld[10];
        int nf = 0;
        for (char *save = NULL, *t = strtok_r(line, ",\n", &save); t && nf < 10; t = strtok_r(NULL, ",\n", &save))
            fld[nf++] = t;
        assert_int_equal(nf, 10);
        assert_string_equal(fld[1], want[i][0]);
        assert_string_equal(fld[9], want[i][1]);
        assert_true(atof(fld[6]) > 0);
    }
    assert_null(fgets(line, sizeof line, f));
    fclose(f);
    unlink(csv);
    snprintf(cmd, sizeof cmd, "%s bench engine -m '%s' -d 1,x 2>&1", tu_kvpark_bin(), mpath);
    assert_int_equal(tu_run_cmd(cmd, out, sizeof out), 2);
    assert_non_null(strstr(out, "bad -p/-n/-d list"));
    free(mpath);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_parsers),
        cmocka_unit_test(test_ppl_codec),
        cmocka_unit_test(test_ppl_codec_file_layout),
        cmocka_unit_test(test_bench_engine_depth),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("tools", tests, NULL, NULL);
}
