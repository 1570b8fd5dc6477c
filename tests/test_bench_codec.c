/*
 * test_bench_codec.c — `kvpark bench codec` (bench/bench_codec.c) on
 * stories260K and the golden perplexity excerpt: the tables scripts and
 * people read (every baseline codec, the settings echoed, where the bits
 * go), the bench's own defaults, the CSV columns, the learned and pca
 * codecs calibrated at a --bits target, and the PNG when gnuplot is there.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/bench_codec.h"
#include "tests/testutil.h"

#define MODEL_REL "models/stories260K.gguf"
#define TEXT_REL "golden/stories260K/ppl_excerpt.txt"

static void test_bench_codec(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED(MODEL_REL);
    TU_SKIP_UNLESS_SHARED(TEXT_REL);
    char *mpath = tu_shared_path(MODEL_REL), *text = tu_shared_path(TEXT_REL);
    char *dir = tu_tmpdir();
    char csv[1024], png[1024];
    snprintf(csv, sizeof csv, "%s/codec.csv", dir);
    snprintf(png, sizeof png, "%s/codec.png", dir);
    /* calibrate (if built in) on the small excerpt at one target only */
    char *argv[] = {"codec", "-m", mpath, "-f", text, "--calib", text, "--bits", "2", "-c", "128",
                    "--chunks", "1", "--park-every", "32", "--chunk", "16", "--window", "16",
                    "--sink", "4", "--csv", csv, "--plot", png, NULL};
    char *out = NULL;
    int rc = tu_run_captured(bench_codec_main, 25, argv, &out);
    print_message("%s", out);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "| codec | bits/value |"));
    static const char *const names[] = {"| none |", "| fp16 |", "| int8 |", "| int4 |", "| kivi2 |"};
    for (int i = 0; i < 5; i++) assert_non_null(strstr(out, names[i]));
    /* the bench's own cache default is f16; the given settings are echoed;
     * the second table says where the bits go */
    assert_non_null(strstr(out, "Where the stored bits go"));
    assert_non_null(strstr(out, "| int4 | "));
    assert_non_null(strstr(out, "f16 cache: ctx 128, parked every 32 tokens, chunk 16, sink 4 "
                                "and window 16"));
    free(out);

    /* bench defaults without -c/--window/--sink: ctx min(512, training
     * context), sink 0, window 8 (why: quality.c); --bits 0 calibrates
     * nothing (baselines only) */
    char *argv_d[] = {"codec", "-m", mpath, "-f", text, "--calib", text, "--bits", "0",
                      "--chunks", "1", NULL};
    rc = tu_run_captured(bench_codec_main, 11, argv_d, &out);
    assert_int_equal(rc, 0);
    assert_non_null(strstr(out, "f16 cache: ctx 512, parked every 64 tokens, chunk 64, sink 0 "
                                "and window 8"));
    assert_non_null(strstr(out, "| int4 |"));
    assert_null(strstr(out, "learned@"));
    free(out);

    char *c = tu_read_file(csv, NULL);
    assert_non_null(c);
    assert_true(!strncmp(c, "codec,target_bits,bits_per_value,", 33));
    assert_non_null(strstr(c, ",bits_lossless,bits_coded,bits_headers,bits_lz4_saved\n"));
    int lines = 0;
    for (char *p = c; *p; p++) lines += *p == '\n';
    assert_true(lines >= 6);
    assert_non_null(strstr(c, "\nkivi2,"));
    /* the learned and pca codecs calibrated at --bits 2 (compress/calib.c) */
    assert_non_null(strstr(c, "\nlearned@2,2,"));
    assert_non_null(strstr(c, "\npca@2,2,"));
    free(c);
    if (access("/usr/bin/gnuplot", X_OK) == 0) {
        size_t len = 0;
        char *img = tu_read_file(png, &len);
        assert_non_null(img);
        assert_true(len > 1000 && !memcmp(img, "\x89PNG", 4));
        free(img);
    } else {
        print_message("note: no gnuplot, plot not checked\n");
    }
    unlink(csv);
    unlink(png);
    rmdir(dir);
    free(dir);
    free(mpath);
    free(text);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_bench_codec),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("bench_codec", tests, NULL, NULL);
}
