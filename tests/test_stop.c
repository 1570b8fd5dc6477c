/*
 * test_stop.c — the streaming stop-sequence matcher: stop strings split at
 * every position across pieces, overlapping prefixes, several stops, a stop
 * at the very start, no stops, UTF-8 characters split across pieces, and a
 * fuzz test checking that for random texts and random piece splits the
 * concatenated output equals the reference (text cut at the first stop) and
 * that no emitted chunk cuts a UTF-8 character.
 */
#include "tests/testutil.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/stop.h"

/* Output of one run: everything emitted, and how many chunks. */
typedef struct run_out {
    char text[4096];
    size_t len;
    int stopped;
    int bad_utf8_chunk; /* a non-final chunk that ended or began mid-character */
} run_out;

static int is_cont(unsigned char c) { return (c & 0xC0) == 0x80; }

static void append(run_out *o, const char *p, size_t n, int check_utf8) {
    assert_true(o->len + n < sizeof(o->text));
    if (check_utf8 && n > 0) {
        if (is_cont((unsigned char)p[0])) o->bad_utf8_chunk = 1;
        if (stop_utf8_incomplete_tail(p, n) != 0) o->bad_utf8_chunk = 1;
    }
    memcpy(o->text + o->len, p, n);
    o->len += n;
    o->text[o->len] = 0;
}

/* Feed text cut at the given offsets (cuts[0..ncuts) ascending, inside text). */
static run_out run_split(const char *const *stops, int n_stops, const char *text,
                         const size_t *cuts, int ncuts) {
    stop_matcher m;
    kp_err err = {0};
    assert_int_equal(stop_init(&m, stops, n_stops, &err), 0);
    run_out o;
    memset(&o, 0, sizeof(o));
    size_t tl = strlen(text), prev = 0;
    for (int i = 0; i <= ncuts && !o.stopped; i++) {
        size_t end = i < ncuts ? cuts[i] : tl;
        const char *e;
        size_t el;
        int rc = stop_feed(&m, text + prev, end - prev, &e, &el);
        assert_true(rc == 0 || rc == 1);
        append(&o, e, el, 1);
        o.stopped = rc;
        prev = end;
    }
    if (!o.stopped) {
        const char *e;
        size_t el;
        stop_flush(&m, &e, &el);
        append(&o, e, el, 0);
    } else {
        /* once stopped, nothing more comes out */
        const char *e;
        size_t el;
        assert_int_equal(stop_feed(&m, "zz", 2, &e, &el), 1);
        assert_int_equal(el, 0);
        stop_flush(&m, &e, &el);
        assert_int_equal(el, 0);
    }
    stop_free(&m);
    return o;
}

/* Reference: scan the end position forward; the first stop string to end
 * there (the longest if several) cuts the text at its start. */
static size_t ref_cut(const char *const *stops, int n, const char *text, int *stopped) {
    size_t tl = strlen(text);
    *stopped = 0;
    for (size_t end = 1; end <= tl; end++) {
        size_t best_len = 0;
        for (int i = 0; i < n; i++) {
            size_t sl = strlen(stops[i]);
            if (sl <= end && sl > best_len && memcmp(text + end - sl, stops[i], sl) == 0)
                best_len = sl;
        }
        if (best_len) {
            *stopped = 1;
            return end - best_len;
        }
    }
    return tl;
}

static void expect_all_2splits(const char *const *stops, int n, const char *text) {
    int want_stop;
    size_t want = ref_cut(stops, n, text, &want_stop);
    size_t tl = strlen(text);
    /* one piece, every 1-cut, every 2-cut */
    for (size_t a = 0; a <= tl; a++) {
        for (size_t b = a; b <= tl; b++) {
            size_t cuts[2] = {a, b};
            run_out o = run_split(stops, n, text, cuts, 2);
            if (o.len != want || memcmp(o.text, text, want) != 0 || o.stopped != want_stop)
                fail_msg("text '%s' cut at %zu,%zu: got '%s' (stopped %d), want '%.*s' (%d)", text,
                         a, b, o.text, o.stopped, (int)want, text, want_stop);
        }
    }
}

static void test_stop_split_everywhere(void **state) {
    (void)state;
    const char *s1[] = {"</end>"};
    expect_all_2splits(s1, 1, "hello world</end> tail");
    expect_all_2splits(s1, 1, "hello </en world </end");      /* partial, never complete */
    expect_all_2splits(s1, 1, "</e</en</end>");
    /* every single-byte piece */
    const char *text = "abc STOP def";
    size_t cuts[12];
    for (int i = 0; i < 11; i++) cuts[i] = (size_t)i + 1;
    const char *s2[] = {"STOP"};
    run_out o = run_split(s2, 1, text, cuts, 11);
    assert_int_equal(o.stopped, 1);
    assert_string_equal(o.text, "abc ");
}

static void test_stop_overlapping_prefix(void **state) {
    (void)state;
    const char *s[] = {"ab"};
    expect_all_2splits(s, 1, "aab");
    expect_all_2splits(s, 1, "aaaab!");
    const char *s2[] = {"abab"};
    expect_all_2splits(s2, 1, "ababab");
    expect_all_2splits(s2, 1, "abaabab x");
    const char *s3[] = {"aab"};
    expect_all_2splits(s3, 1, "aaab");
    /* aab fed as "a","a","ab": the "a" held back must come out */
    size_t cuts[2] = {1, 2};
    run_out o = run_split(s3, 1, "aaab", cuts, 2);
    assert_string_equal(o.text, "a");
    assert_int_equal(o.stopped, 1);
}

static void test_stop_multiple(void **state) {
    (void)state;
    const char *s[] = {"\n\n", "User:", "###", "Us"};
    expect_all_2splits(s, 4, "Hi there User: more");   /* "Us" wins: starts at same place */
    expect_all_2splits(s, 4, "line\n\nUser:");
    expect_all_2splits(s, 4, "x ## y #\n z ###");
    const char *t[] = {"xyz", "yz"};
    expect_all_2splits(t, 2, "axyz");                   /* both end at 4: longest wins */
    run_out o = run_split(t, 2, "axyz", NULL, 0);
    assert_string_equal(o.text, "a");
    /* a short stop inside a longer one's partial match fires first, however
     * the text is split: "abc" then "b" -> cut before "b" */
    const char *u[] = {"abc", "b"};
    expect_all_2splits(u, 2, "xabcd");
    o = run_split(u, 2, "xabcd", NULL, 0);
    assert_string_equal(o.text, "xa");
}

static void test_stop_at_start_and_none(void **state) {
    (void)state;
    const char *s[] = {"<|im_end|>"};
    run_out o = run_split(s, 1, "<|im_end|>rest", NULL, 0);
    assert_int_equal(o.stopped, 1);
    assert_int_equal(o.len, 0);
    expect_all_2splits(s, 1, "<|im_end|>");
    /* no stops: everything comes out unchanged and as soon as it arrives */
    o = run_split(NULL, 0, "plain text, no stops", NULL, 0);
    assert_int_equal(o.stopped, 0);
    assert_string_equal(o.text, "plain text, no stops");
    stop_matcher m;
    assert_int_equal(stop_init(&m, NULL, 0, NULL), 0);
    const char *e;
    size_t el;
    assert_int_equal(stop_feed(&m, "abc", 3, &e, &el), 0);
    assert_int_equal(el, 3);
    assert_memory_equal(e, "abc", 3);
    stop_free(&m);
    /* empty stop strings are refused */
    const char *bad[] = {"ok", ""};
    kp_err err = {0};
    assert_int_equal(stop_init(&m, bad, 2, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "empty"));
}

static void test_stop_holdback_is_minimal(void **state) {
    (void)state;
    const char *s[] = {"STOP"};
    stop_matcher m;
    assert_int_equal(stop_init(&m, s, 1, NULL), 0);
    const char *e;
    size_t el;
    assert_int_equal(stop_feed(&m, "hello ST", 8, &e, &el), 0);
    assert_int_equal(el, 6); /* "ST" held */
    assert_memory_equal(e, "hello ", 6);
    assert_int_equal(stop_feed(&m, "AR", 2, &e, &el), 0); /* "STAR" cannot start STOP */
    assert_int_equal(el, 4);
    assert_memory_equal(e, "STAR", 4);
    assert_int_equal(stop_feed(&m, "S", 1, &e, &el), 0);
    assert_int_equal(el, 0);
    assert_int_equal(stop_feed(&m, "TO", 2, &e, &el), 0);
    assert_int_equal(el, 0);
    assert_int_equal(stop_feed(&m, "Px", 2, &e, &el), 1);
    assert_int_equal(el, 0);
    stop_free(&m);
}

static void test_stop_utf8_split(void **state) {
    (void)state;
    /* "é" (2 bytes), "€" (3), "😀" (4) split at every byte */
    const char *text = "a\xC3\xA9" "b\xE2\x82\xAC" "c\xF0\x9F\x98\x80" "d";
    expect_all_2splits(NULL, 0, text);
    size_t tl = strlen(text);
    for (size_t a = 0; a <= tl; a++)
        for (size_t b = a; b <= tl; b++) {
            size_t cuts[2] = {a, b};
            run_out o = run_split(NULL, 0, text, cuts, 2);
            if (o.bad_utf8_chunk) fail_msg("a chunk cut a character (cuts %zu,%zu)", a, b);
        }
    /* held-back partial character is released by flush at the end */
    stop_matcher m;
    assert_int_equal(stop_init(&m, NULL, 0, NULL), 0);
    const char *e;
    size_t el;
    assert_int_equal(stop_feed(&m, "x\xE2\x82", 3, &e, &el), 0);
    assert_int_equal(el, 1);
    stop_flush(&m, &e, &el);
    assert_int_equal(el, 2);
    assert_memory_equal(e, "\xE2\x82", 2);
    stop_free(&m);
    /* a multi-byte stop string split inside a character */
    const char *s[] = {"\xE2\x82\xAC\xE2\x82\xAC"};
    expect_all_2splits(s, 1, "price 5\xE2\x82\xAC \xE2\x82\xAC\xE2\x82\xAC!");
    /* incomplete tail detection */
    assert_int_equal(stop_utf8_incomplete_tail("\xF0\x9F\x98", 3), 3);
    assert_int_equal(stop_utf8_incomplete_tail("\xF0\x9F\x98\x80", 4), 0);
    assert_int_equal(stop_utf8_incomplete_tail("ab\xC3", 3), 1);
    assert_int_equal(stop_utf8_incomplete_tail("\x80\x80", 2), 0); /* invalid, not partial */
    assert_int_equal(stop_utf8_incomplete_tail("", 0), 0);
}

static uint64_t rng_next(uint64_t *s) {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    return *s;
}

/* Random texts over a small alphabet (so stops occur and partially occur
 * often), with multi-byte characters; random stops; random splits. */
static void test_stop_fuzz(void **state) {
    (void)state;
    static const char *alpha[] = {"a", "b", "c", " ", "\n", "\xC3\xA9", "\xE2\x82\xAC",
                                  "\xF0\x9F\x98\x80"};
    uint64_t rs = 0x9E3779B97F4A7C15ull;
    int n_stopped = 0;
    for (int iter = 0; iter < 3000; iter++) {
        char text[256] = {0};
        int nch = (int)(rng_next(&rs) % 40);
        for (int i = 0; i < nch; i++) strcat(text, alpha[rng_next(&rs) % 8]);
        char stop_buf[4][32];
        const char *stops[4];
        int n_stops = (int)(rng_next(&rs) % 5);
        for (int k = 0; k < n_stops; k++) {
            stop_buf[k][0] = 0;
            int sl = 1 + (int)(rng_next(&rs) % 4);
            for (int i = 0; i < sl; i++) strcat(stop_buf[k], alpha[rng_next(&rs) % 6]);
            stops[k] = stop_buf[k];
        }
        int want_stop;
        size_t want = ref_cut(stops, n_stops, text, &want_stop);
        n_stopped += want_stop;
        size_t tl = strlen(text);
        for (int split = 0; split < 8; split++) {
            size_t cuts[64];
            int nc = 0;
            for (size_t p = 1; p < tl && nc < 64; p++)
                if (rng_next(&rs) % 3 == 0) cuts[nc++] = p;
            run_out o = run_split(stops, n_stops, text, cuts, nc);
            if (o.len != want || memcmp(o.text, text, want) != 0 || o.stopped != want_stop)
                fail_msg("iter %d: text [%s] with %d stops [%s|%s|%s|%s]: got [%s] want [%.*s]",
                         iter, text, n_stops, n_stops > 0 ? stops[0] : "",
                         n_stops > 1 ? stops[1] : "", n_stops > 2 ? stops[2] : "",
                         n_stops > 3 ? stops[3] : "", o.text, (int)want, text);
            if (o.bad_utf8_chunk) fail_msg("iter %d: a chunk cut a UTF-8 character", iter);
        }
    }
    assert_true(n_stopped > 500); /* the fuzz really exercises stopping */
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stop_split_everywhere),
        cmocka_unit_test(test_stop_overlapping_prefix),
        cmocka_unit_test(test_stop_multiple),
        cmocka_unit_test(test_stop_at_start_and_none),
        cmocka_unit_test(test_stop_holdback_is_minimal),
        cmocka_unit_test(test_stop_utf8_split),
        cmocka_unit_test(test_stop_fuzz),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
