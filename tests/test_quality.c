/*
 * test_quality.c — the "park every N tokens" codec evaluation
 * (compress/quality.h) on stories260K and the golden perplexity excerpt:
 * the parking layout (compress/layout.h, tested alone by test_layout.c) as
 * the evaluation really stores it;
 * codec "none" reproduces eval_ppl exactly (agreement 1, KL 0) and its size
 * is what the raw bytes + headers predict; lossy codecs order as their bit
 * widths say (quality int8 > int4, size int8 < int4 < kivi2); a bigger
 * lossless sink/window stores more. Its front ends are tested where they
 * live: `ppl --codec` in test_cli.c, `bench codec` in test_bench_codec.c.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

#include "compress/quality.h"
#include "engine/eval.h"
#include "engine/tok.h"

#define MODEL_REL "models/stories260K.gguf"
#define TEXT_REL "golden/stories260K/ppl_excerpt.txt"
#define N_WINDOWS 6

typedef struct fixture {
    model *m;
    int32_t *ids;
    size_t n;
} fixture;

static int setup(void **state) {
    if (!tu_shared_exists(MODEL_REL) || !tu_shared_exists(TEXT_REL)) {
        *state = NULL;
        return 0;
    }
    fixture *f = calloc(1, sizeof *f);
    char *p = tu_shared_path(MODEL_REL);
    model_opts mo = model_default_opts();
    kp_err err = {0};
    if (model_load(&f->m, p, &mo, &err)) {
        fprintf(stderr, "model_load: %s\n", err.msg);
        return -1;
    }
    free(p);
    p = tu_shared_path(TEXT_REL);
    size_t len;
    char *text = tu_read_file(p, &len);
    free(p);
    if (!text || tok_encode(model_vocab(f->m), text, len, true, false, &f->ids, &f->n, &err))
        return -1;
    free(text);
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    if (f) {
        model_free(f->m);
        free(f->ids);
        free(f);
    }
    return 0;
}

#define NEED_FIXTURE(f)                                                                   \
    fixture *f = *state;                                                                  \
    if (!f) {                                                                             \
        print_message("SKIP: %s or %s not found (set KVPARK_SHARED)\n", MODEL_REL, TEXT_REL); \
        skip();                                                                           \
    }

/* The small setting of these tests: windows of 128 tokens, parked every 32,
 * chunks of 16, 4 sink and 16 window tokens lossless, an F32 cache (the
 * sizes below are worked out for it; F16 where a test says so). */
static quality_opts small_opts(void) {
    quality_opts o = quality_default_opts();
    o.kv_type = KP_TYPE_F32;
    o.n_ctx = 128;
    o.park_every = 32;
    o.chunk = 16;
    o.sink = 4;
    o.window = 16;
    o.max_chunks = N_WINDOWS;
    return o;
}

static quality_result eval_codec(fixture *f, const char *name, const quality_opts *o) {
    codec_shape shape = quality_codec_shape(f->m);
    codec *c = NULL;
    kp_err err = {0};
    if (codec_open(&c, name, &shape, &err)) fail_msg("codec_open(%s): %s", name, err.msg);
    quality_result r;
    int rc = quality_eval(f->m, c, f->ids, (int64_t)f->n, o, &r, &err);
    if (rc) fail_msg("quality_eval(%s): %s", name, err.msg);
    codec_free(c);
    print_message("%-6s kv %d: ppl %.6f (ref %.6f) agree %.4f kl %.3g ratio %.4f B/tok/layer %.1f "
                  "enc %.2f dec %.2f GB/s\n",
                  name, o->kv_type, r.ppl, r.ppl_ref, r.agree, r.kl, r.ratio,
                  r.bytes_per_token_layer, r.encode_gbps, r.decode_gbps);
    return r;
}

/* Spans of one park under the layout (checked by tests/test_layout.c). */
static int n_spans(int n, const quality_opts *o) {
    layout l = {.sink = o->sink, .window = o->window, .chunk = o->chunk};
    return layout_spans(&l, n, NULL, 0);
}

/* The ratio codec "none" would have if LZ4 found nothing: every span stored
 * as 16-byte header + raw rows, the fp16 size over that, summed over parks. */
static double none_ratio_no_lz4(fixture *f, const quality_opts *o, int elem) {
    const model_hparams *hp = model_hp(f->m);
    double row = (double)hp->n_kv_heads * hp->head_dim, fp16 = 0, stored = 0;
    for (int t = o->park_every; ; t += o->park_every) {
        int n = t < o->n_ctx ? t : o->n_ctx;
        fp16 += 2.0 * row * n * hp->n_layer * 2;
        stored += (elem * row * n + 16.0 * n_spans(n, o)) * hp->n_layer * 2;
        if (n == o->n_ctx) break;
    }
    return fp16 / stored;
}

/* Codec "none": bit-identical to eval_ppl and to the reference run; its size
 * is the raw F32 bytes (ratio ~0.5) or F16 bytes (~1), minus what LZ4 finds. */
static void test_none_is_exact(void **state) {
    NEED_FIXTURE(f);
    quality_opts o = small_opts();
    quality_result r = eval_codec(f, "none", &o);

    eval_ppl_opts po = eval_default_ppl_opts();
    po.n_ctx = o.n_ctx;
    po.max_chunks = N_WINDOWS;
    eval_ppl_result er;
    kp_err err = {0};
    assert_int_equal(eval_ppl(f->m, f->ids, (int64_t)f->n, &po, &er, &err), 0);
    print_message("eval_ppl %.9f, quality none %.9f / ref %.9f\n", er.ppl, r.ppl, r.ppl_ref);
    assert_true(fabs(r.ppl_ref / er.ppl - 1) < 1e-9);
    assert_true(fabs(r.ppl / er.ppl - 1) < 1e-9);
    assert_int_equal(r.n_windows, N_WINDOWS);
    assert_int_equal(r.n_scored, (int64_t)N_WINDOWS * (128 - 1 - 64));
    assert_true(r.agree == 1.0);
    assert_true(fabs(r.kl) < 1e-12);

    double lo = none_ratio_no_lz4(f, &o, 4);
    print_message("none f32: ratio %.4f, without LZ4 %.4f\n", r.ratio, lo);
    assert_true(lo > 0.45 && lo < 0.5);
    assert_true(r.ratio >= lo - 1e-12); /* LZ4 only ever helps */
    assert_true(r.ratio < 0.75);        /* float noise does not compress much */
    assert_true(r.bytes_per_token_layer > 0);

    o.kv_type = KP_TYPE_F16;
    r = eval_codec(f, "none", &o);
    assert_true(r.agree == 1.0 && fabs(r.kl) < 1e-12);
    lo = none_ratio_no_lz4(f, &o, 2);
    print_message("none f16: ratio %.4f, without LZ4 %.4f\n", r.ratio, lo);
    assert_true(lo > 0.9 && lo < 1.0);
    assert_true(r.ratio >= lo - 1e-12 && r.ratio < 1.5);
}

/* Lossy codecs on an F32 cache: fp16 is nearly free, int8 close, int4 and
 * kivi2 worse; sizes order by bit width. */
static void test_codec_ordering(void **state) {
    NEED_FIXTURE(f);
    quality_opts o = small_opts();
    quality_result none = eval_codec(f, "none", &o);
    quality_result fp16 = eval_codec(f, "fp16", &o);
    quality_result i8 = eval_codec(f, "int8", &o);
    quality_result i4 = eval_codec(f, "int4", &o);
    quality_result k2 = eval_codec(f, "kivi2", &o);
    /* the reference run never depends on the codec */
    assert_true(fp16.ppl_ref == none.ppl_ref && k2.ppl_ref == none.ppl_ref);

    assert_true(fp16.agree >= 0.99);
    assert_true(fp16.kl >= 0 && fp16.kl < 1e-4);
    assert_true(i8.agree >= 0.95);
    assert_true(i8.kl > 0 && i8.kl < 1e-2);
    assert_true(i8.kl < i4.kl);
    assert_true(i8.kl < k2.kl);
    assert_true(fp16.kl < i8.kl);
    assert_true(i4.agree <= i8.agree + 1e-12);
    assert_true(k2.ppl != none.ppl);

    assert_true(none.ratio < fp16.ratio);
    assert_true(fp16.ratio < i8.ratio);
    assert_true(i8.ratio < i4.ratio);
    assert_true(i4.ratio < k2.ratio);
    /* the codecs really ran, and were timed */
    assert_true(i8.encode_gbps > 0 && i8.decode_gbps > 0);
    assert_true(fabs(16.0 / i8.ratio * i8.bytes_per_token_layer) > 0);
}

/* More lossless tokens (sink, window) -> more stored bytes, less error. */
static void test_sink_window(void **state) {
    NEED_FIXTURE(f);
    quality_opts o = small_opts();
    quality_result base = eval_codec(f, "int4", &o);
    o.window = 48;
    quality_result wide = eval_codec(f, "int4", &o);
    o = small_opts();
    o.sink = 40;
    quality_result sink = eval_codec(f, "int4", &o);
    assert_true(wide.ratio < base.ratio);
    assert_true(sink.ratio < base.ratio);
    assert_true(wide.kl < base.kl);
    /* everything lossless: int4 becomes exact */
    o = small_opts();
    o.window = 128;
    quality_result all = eval_codec(f, "int4", &o);
    assert_true(all.agree == 1.0 && fabs(all.kl) < 1e-12);
    assert_true(all.encode_gbps == 0);
}

/* The evaluation stores what the layout says: with sink 4 and window 0 in
 * one park of 128 rows, int4 on an F32 cache stores 4 rows raw and 124 coded
 * (64 + 60), not a whole lossless first chunk of 64 F32 rows (the old
 * layout). Stored size sits between the no-LZ4 prediction and 10% under it. */
static void test_layout_in_eval(void **state) {
    NEED_FIXTURE(f);
    quality_opts o = small_opts();
    o.park_every = 128;
    o.chunk = 64;
    o.sink = 4;
    o.window = 0;
    o.max_chunks = 2;
    quality_result r = eval_codec(f, "int4", &o);

    codec_shape shape = quality_codec_shape(f->m);
    codec *c = NULL;
    kp_err err = {0};
    assert_int_equal(codec_open(&c, "int4", &shape, &err), 0);
    const model_hparams *hp = model_hp(f->m);
    double row = (double)hp->n_kv_heads * hp->head_dim;
    double lossless = 16 + 4 * row * 4; /* header + 4 F32 rows */
    double coded = 0, old_layout = 16 + 4 * row * 64;
    for (int is_v = 0; is_v < 2; is_v++) {
        coded += (double)codec_chunk_bytes(c, 64, KP_TYPE_F32, is_v) +
                 (double)codec_chunk_bytes(c, 60, KP_TYPE_F32, is_v);
        old_layout += (double)codec_chunk_bytes(c, 64, KP_TYPE_F32, is_v) / 2;
    }
    codec_free(c);
    double fp16 = 2.0 * row * 128 * 2; /* one layer, K and V */
    double want = fp16 / (2 * lossless + coded);
    double old = fp16 / (2 * old_layout);
    print_message("int4 layout ratio %.4f, predicted %.4f without LZ4 (old layout %.4f)\n",
                  r.ratio, want, old);
    assert_true(r.ratio >= want - 1e-9);
    assert_true(r.ratio < want * 1.1);
    assert_true(old < want * 0.8); /* the test tells the two layouts apart */

    /* where the bits go: the three kinds add up to 16 / ratio; 3 headers of
     * 16 bytes per park, layer and K/V; the 4 lossless F32 rows at most
     * their raw size; LZ4 savings are what the payloads lost */
    const double per = 2.0 * row * 128; /* fp16 bytes per park, layer, K/V */
    print_message("bits: lossless %.4f coded %.4f headers %.4f (lz4 saved %.4f), total %.4f\n",
                  r.bits_lossless, r.bits_coded, r.bits_headers, r.bits_lz4_saved, 16 / r.ratio);
    assert_true(fabs(r.bits_lossless + r.bits_coded + r.bits_headers - 16 / r.ratio) < 1e-9);
    assert_true(fabs(r.bits_headers - 16.0 * 3 * 16 / per) < 1e-9);
    assert_true(r.bits_lossless > 0 && r.bits_lossless <= 16.0 * 4 * row * 4 / per + 1e-9);
    assert_true(r.bits_coded > 0 && r.bits_lz4_saved >= 0);
    /* raw payloads of one layer (K and V): 4 F32 rows each + the coded
     * chunks without their 4 headers */
    assert_true(fabs(r.bits_lossless + r.bits_coded + r.bits_lz4_saved -
                     16.0 * (2 * 4 * row * 4 + coded - 4 * 16) / (2 * per)) < 1e-9);
}

static void test_bad_opts(void **state) {
    NEED_FIXTURE(f);
    codec_shape shape = quality_codec_shape(f->m);
    codec *c = NULL;
    kp_err err = {0};
    assert_int_equal(codec_open(&c, "int8", &shape, &err), 0);
    quality_result r;
    quality_opts o = small_opts();
    o.chunk = 0;
    assert_int_equal(quality_eval(f->m, c, f->ids, (int64_t)f->n, &o, &r, &err), KP_EINVAL);
    o = small_opts();
    assert_int_equal(quality_eval(f->m, c, f->ids, 100, &o, &r, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "fewer than one context"));
    codec_free(c);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_layout_in_eval),
        cmocka_unit_test(test_none_is_exact), cmocka_unit_test(test_codec_ordering),
        cmocka_unit_test(test_sink_window),   cmocka_unit_test(test_bad_opts),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("quality", tests, setup, teardown);
}
