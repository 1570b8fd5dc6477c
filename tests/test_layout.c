/*
 * test_layout.c — the parking layout (compress/layout.h), no model needed:
 *   - hand-worked cases: the sink alone, coded chunks aligned after the sink,
 *     a partial last coded chunk, the recent window, lossless runs longer
 *     than a chunk cut into pieces, n < sink, n < sink + window, n = sink +
 *     window, window 0, sink 0, an empty cache;
 *   - bad arguments (KP_EINVAL), a short output array (the first spans and
 *     the total), layout_check's messages, layout_default and its constants;
 *   - invariants over a grid: spans tile [0, n) exactly once in order with
 *     1..C rows each, the sink and window rows lossless, coded spans whole
 *     chunks aligned at S + k*C except the one n - W cuts, at most
 *     layout_max_spans of them;
 *   - layout_spans_alloc gives the same spans;
 *   - the same spans as the function that cut parked caches before this
 *     module existed (kept below, verbatim but for names, as the reference):
 *     manifests written by older builds must still read.
 */
#include "tests/testutil.h"

#include <stdlib.h>
#include <string.h>

#include "compress/layout.h"

/* ---- the reference: the cutting the quality harness and parking used ---- */

typedef struct ref_span {
    int start, n, coded;
} ref_span;

static int ref_add_spans(int a, int b, int base, int chunk, int coded, ref_span *spans, int max,
                         int k) {
    while (a < b) {
        long long next = base + ((long long)(a - base) / chunk + 1) * chunk;
        int end = next < b ? (int)next : b;
        if (k < max) spans[k] = (ref_span){.start = a, .n = end - a, .coded = coded};
        k++;
        a = end;
    }
    return k;
}

static int ref_park_layout(int n_pos, int sink, int window, int chunk, ref_span *spans, int max) {
    if (n_pos < 0 || sink < 0 || window < 0 || chunk < 1 || chunk > 65535) return KP_EINVAL;
    if (!spans || max < 0) max = 0;
    int s = KP_MIN(sink, n_pos);
    int e = n_pos - window > s ? n_pos - window : s;
    int k = ref_add_spans(0, s, 0, chunk, 0, spans, max, 0);
    k = ref_add_spans(s, e, s, chunk, 1, spans, max, k);
    return ref_add_spans(e, n_pos, e, chunk, 0, spans, max, k);
}

/* ---- helpers ---------------------------------------------------------------- */

static int spans_of(int n, int S, int W, int C, layout_span *sp, int max) {
    layout l = {.sink = S, .window = W, .chunk = C};
    return layout_spans(&l, n, sp, max);
}

/* Check layout_spans(n, S, W, C) against an expected list of {start, n,
 * coded} triples (ne of them). */
static void check_layout(int n, int S, int W, int C, const int (*want)[3], int ne) {
    layout_span sp[64];
    int k = spans_of(n, S, W, C, sp, 64);
    print_message("layout n %d S %d W %d C %d: %d spans\n", n, S, W, C, k);
    assert_int_equal(k, ne);
    for (int i = 0; i < k; i++) {
        assert_int_equal(sp[i].start, want[i][0]);
        assert_int_equal(sp[i].n, want[i][1]);
        assert_int_equal(sp[i].coded, want[i][2]);
    }
}

/* ---- tests ------------------------------------------------------------------ */

static void test_defaults(void **state) {
    (void)state;
    layout d = layout_default();
    assert_int_equal(d.sink, LAYOUT_DEFAULT_SINK);
    assert_int_equal(d.window, LAYOUT_DEFAULT_WINDOW);
    assert_int_equal(d.chunk, LAYOUT_DEFAULT_CHUNK);
    /* the values every parked session so far was keyed with */
    assert_int_equal(d.sink, 4);
    assert_int_equal(d.window, 64);
    assert_int_equal(d.chunk, 64);
    assert_int_equal(layout_check(&d, NULL), 0);
    /* positional initialisers read sink, window, chunk */
    layout p = {2, 3, 4};
    assert_int_equal(p.sink, 2);
    assert_int_equal(p.window, 3);
    assert_int_equal(p.chunk, 4);
}

/* The layout on hand-worked cases. */
static void test_cases(void **state) {
    (void)state;
    /* the sink alone, coded chunks aligned at S + k*C, the last one partial */
    static const int a[][3] = {{0, 4, 0}, {4, 64, 1}, {68, 60, 1}};
    check_layout(128, 4, 0, 64, a, 3);
    /* with a window: the coded run ends at n - W, partially */
    static const int b[][3] = {{0, 4, 0}, {4, 64, 1}, {68, 28, 1}, {96, 32, 0}};
    check_layout(128, 4, 32, 64, b, 4);
    /* S = 0, W = 0: plain chunks from 0 */
    static const int c[][3] = {{0, 64, 1}, {64, 64, 1}, {128, 2, 1}};
    check_layout(130, 0, 0, 64, c, 3);
    /* S = 0 with a window */
    static const int c2[][3] = {{0, 16, 1}, {16, 4, 1}, {20, 10, 0}};
    check_layout(30, 0, 10, 16, c2, 3);
    /* n < S + W: nothing coded, the sink first, the rest is window */
    static const int d[][3] = {{0, 4, 0}, {4, 20, 0}};
    check_layout(24, 4, 32, 64, d, 2);
    /* n < S: only (part of) the sink */
    static const int e1[][3] = {{0, 3, 0}};
    check_layout(3, 4, 32, 64, e1, 1);
    check_layout(3, 4, 0, 64, e1, 1);
    /* n = S + W exactly: no coded span */
    static const int g[][3] = {{0, 4, 0}, {4, 16, 0}};
    check_layout(20, 4, 16, 16, g, 2);
    /* n = S + W + 1: one coded row */
    static const int g1[][3] = {{0, 4, 0}, {4, 1, 1}, {5, 16, 0}};
    check_layout(21, 4, 16, 16, g1, 3);
    /* window 0: coded up to the end */
    static const int w0[][3] = {{0, 4, 0}, {4, 16, 1}, {20, 16, 1}, {36, 1, 1}};
    check_layout(37, 4, 0, 16, w0, 4);
    /* lossless runs longer than C are cut into pieces of C from their start */
    static const int h[][3] = {{0, 16, 0}, {16, 16, 0}, {32, 8, 0}, {40, 16, 1},
                               {56, 4, 1},  {60, 16, 0}, {76, 4, 0}};
    check_layout(80, 40, 20, 16, h, 7);
    /* the defaults on a cache of 200 rows */
    static const int df[][3] = {{0, 4, 0}, {4, 64, 1}, {68, 64, 1}, {132, 4, 1}, {136, 64, 0}};
    check_layout(200, 4, 64, 64, df, 5);
    /* empty cache */
    assert_int_equal(spans_of(0, 4, 32, 64, NULL, 0), 0);
}

static void test_bad_args(void **state) {
    (void)state;
    assert_int_equal(spans_of(-1, 4, 32, 64, NULL, 0), KP_EINVAL);
    assert_int_equal(spans_of(10, -1, 0, 64, NULL, 0), KP_EINVAL);
    assert_int_equal(spans_of(10, 0, -1, 64, NULL, 0), KP_EINVAL);
    assert_int_equal(spans_of(10, 0, 0, 0, NULL, 0), KP_EINVAL);
    assert_int_equal(spans_of(10, 0, 0, 65536, NULL, 0), KP_EINVAL);
    assert_int_equal(spans_of(10, 0, 0, 65535, NULL, 0), 1);
    assert_int_equal(layout_spans(NULL, 10, NULL, 0), KP_EINVAL);
    kp_err e = {0};
    layout l = {.sink = 4, .window = 64, .chunk = 0};
    assert_int_equal(layout_check(&l, &e), KP_EINVAL);
    assert_non_null(strstr(e.msg, "chunk of 0 rows"));
    l = (layout){.sink = -2, .window = 64, .chunk = 64};
    assert_int_equal(layout_check(&l, &e), KP_EINVAL);
    assert_non_null(strstr(e.msg, "sink -2"));
    assert_int_equal(layout_max_spans(&l, 100), 0);
    l = layout_default();
    assert_int_equal(layout_max_spans(&l, -1), 0);
    assert_int_equal(layout_max_spans(&l, 200), 200 / 64 + 3);
    /* max smaller than the total: the first max spans, the total returned */
    layout_span sp[2] = {{-1, -1, -1}, {-1, -1, -1}};
    assert_int_equal(spans_of(128, 4, 0, 64, sp, 1), 3);
    assert_true(sp[0].start == 0 && sp[0].n == 4 && sp[0].coded == 0);
    assert_int_equal(sp[1].start, -1);
    /* a negative max writes nothing */
    assert_int_equal(spans_of(128, 4, 0, 64, sp, -5), 3);
    assert_int_equal(sp[1].start, -1);
    /* the allocating form */
    layout_span *out = (layout_span *)sp;
    int n = 7;
    l = (layout){.sink = 4, .window = 4, .chunk = 0};
    assert_int_equal(layout_spans_alloc(&l, 10, &out, &n, &e), KP_EINVAL);
    assert_null(out);
    assert_int_equal(n, 0);
    l = layout_default();
    assert_int_equal(layout_spans_alloc(&l, -1, &out, &n, &e), KP_EINVAL);
    assert_int_equal(layout_spans_alloc(&l, 0, &out, &n, &e), 0);
    assert_null(out);
    assert_int_equal(n, 0);
}

/* Invariants over a grid, the allocating form, and the reference. */
static void test_grid(void **state) {
    (void)state;
    static const int Ss[] = {0, 1, 4, 40, 64}, Ws[] = {0, 1, 16, 32, 64, 100},
                     Cs[] = {1, 7, 16, 64, 65535};
    layout_span big[1024];
    ref_span ref[1024];
    int cases = 0;
    for (int n = 0; n <= 300; n += (n < 40 ? 1 : 3))
        for (size_t i = 0; i < KP_ARRAY_LEN(Ss); i++)
            for (size_t j = 0; j < KP_ARRAY_LEN(Ws); j++)
                for (size_t l = 0; l < KP_ARRAY_LEN(Cs); l++) {
                    int S = Ss[i], W = Ws[j], C = Cs[l];
                    layout lay = {.sink = S, .window = W, .chunk = C};
                    int k = layout_spans(&lay, n, big, 1024);
                    assert_true(k >= 0 && k <= layout_max_spans(&lay, n));
                    /* the reference gives the same spans */
                    int kr = ref_park_layout(n, S, W, C, ref, 1024);
                    assert_int_equal(k, kr);
                    for (int q = 0; q < k; q++) {
                        assert_int_equal(big[q].start, ref[q].start);
                        assert_int_equal(big[q].n, ref[q].n);
                        assert_int_equal(big[q].coded, ref[q].coded);
                    }
                    /* tiling and the lossless / coded rule */
                    int at = 0, s_end = n < S ? n : S, e = n - W > s_end ? n - W : s_end;
                    for (int q = 0; q < k; q++) {
                        assert_int_equal(big[q].start, at);
                        assert_true(big[q].n >= 1 && big[q].n <= C);
                        int coded = at >= s_end && at < e;
                        assert_int_equal(big[q].coded, coded);
                        if (coded) {
                            assert_int_equal((at - S) % C, 0);
                            assert_true(at + big[q].n <= e);
                            /* whole chunks, but for the one n - W cuts */
                            if (at + big[q].n < e) assert_int_equal(big[q].n, C);
                        } else {
                            assert_true(at + big[q].n <= s_end || at >= e);
                        }
                        at += big[q].n;
                    }
                    assert_int_equal(at, n);
                    /* the allocating form */
                    layout_span *a = NULL;
                    int na = -1;
                    assert_int_equal(layout_spans_alloc(&lay, n, &a, &na, NULL), 0);
                    assert_int_equal(na, k);
                    assert_true(k == 0 ? a == NULL : memcmp(a, big, (size_t)k * sizeof *a) == 0);
                    free(a);
                    cases++;
                }
    print_message("%d layouts checked\n", cases);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_defaults),
        cmocka_unit_test(test_cases),
        cmocka_unit_test(test_bad_args),
        cmocka_unit_test(test_grid),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("layout", tests, NULL, NULL);
}
