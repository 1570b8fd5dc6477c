/*
 * test_golden.c — the engine against an independent implementation.
 *
 * ../shared/golden/ holds llama.cpp's outputs (see its README): per-position
 * logits of prompts evaluated in one batch, greedy continuations through the
 * KV cache, logits after every decode step, and perplexities. We must match:
 *   - stories260K: |logit diff| <= 1e-4 everywhere, greedy ids identical,
 *     perplexity within 0.1%;
 *   - the tiny models: logits within each model's tolerance, greedy ids up to
 *     the first step whose golden top-1/top-2 margin is below 2x tolerance.
 * Also: several sequences in one batch compute what each computes alone
 * (the base of continuous batching), and an F16 KV cache stays close.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/eval.h"
#include "engine/gguf.h"
#include "engine/model.h"
#include "tests/testutil.h"

static model *load(const char *rel, int n_threads) {
    char *p = tu_shared_path(rel);
    model_opts o = model_default_opts();
    o.n_threads = n_threads;
    model *m = NULL;
    kp_err err = {0};
    int rc = model_load(&m, p, &o, &err);
    if (rc) fail_msg("model_load(%s): %s", p, err.msg);
    free(p);
    return m;
}

static int32_t *json_ids(json_t *arr, size_t *n) {
    *n = json_array_size(arr);
    int32_t *ids = malloc(sizeof *ids * (*n + 1));
    for (size_t i = 0; i < *n; i++) ids[i] = (int32_t)json_integer_value(json_array_get(arr, i));
    return ids;
}

static double diff_json_row(const float *a, json_t *row, int n) {
    assert_int_equal(json_array_size(row), (size_t)n);
    double m = 0;
    for (int i = 0; i < n; i++) {
        double d = fabs((double)a[i] - json_number_value(json_array_get(row, i)));
        if (isnan(a[i])) return INFINITY;
        if (d > m) m = d;
    }
    return m;
}

static int argmax(const float *x, int n) {
    int b = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[b]) b = i;
    return b;
}

/* Check one logits.json file: batch logits, then greedy decoding.
 * `decode` (may be NULL) is the matching decode_logits.json. */
static void check_logits_file(const char *model_rel, const char *golden_rel, const char *decode_rel,
                              double tol, double tight, int kv_type) {
    TU_SKIP_UNLESS_SHARED(model_rel);
    model *m = load(model_rel, 0);
    const int nv = model_hp(m)->n_vocab;
    json_t *g = tu_load_json(golden_rel);
    json_t *dec = decode_rel ? tu_load_json(decode_rel) : NULL;
    json_t *cases = json_object_get(g, "cases");
    assert_true(json_array_size(cases) > 0);
    kp_err err = {0};
    for (size_t ci = 0; ci < json_array_size(cases); ci++) {
        json_t *c = json_array_get(cases, ci);
        size_t n;
        int32_t *ids = json_ids(json_object_get(c, "ids"), &n);
        json_t *glog = json_object_get(c, "logits");
        assert_int_equal(json_array_size(glog), n);

        kv_cache *kv = NULL;
        assert_int_equal(model_kv_new(m, &kv, kv_type, 256, &err), 0);
        float *logits = malloc(sizeof(float) * n * nv);
        model_seq q = {.kv = kv, .tokens = ids, .n_tokens = (int)n, .all_logits = true, .logits = logits};
        int rc = model_forward(m, &q, 1, &err);
        if (rc) fail_msg("forward: %s", err.msg);
        double worst = 0;
        for (size_t t = 0; t < n; t++) {
            double d = diff_json_row(logits + t * nv, json_array_get(glog, t), nv);
            if (d > worst) worst = d;
        }
        print_message("%s case %zu: %zu prompt tokens, max |logit diff| %.3g (golden tol %.3g, "
                      "ours %.3g)\n", model_rel, ci, n, worst, tol, tight);
        assert_true(worst <= tight);

        /* greedy continuation through the KV cache */
        json_t *gr = json_object_get(c, "greedy");
        size_t n_gen;
        int32_t *gids = json_ids(json_object_get(gr, "ids"), &n_gen);
        json_t *margins = json_object_get(gr, "margins");
        json_t *steps = dec ? json_object_get(json_array_get(json_object_get(dec, "cases"), ci), "steps")
                            : NULL;
        /* Teacher forcing: feed the golden ids one by one through the KV
         * cache; wherever the golden top-1/top-2 margin is at least twice our
         * tolerance, our argmax must be the golden id. Without margins
         * (stories260K) every step must match. */
        float *cur = logits + (n - 1) * nv;
        size_t checked = 0, first_low = n_gen;
        double worst_dec = 0;
        for (size_t k = 0; k < n_gen; k++) {
            bool sure = !margins || json_number_value(json_array_get(margins, k)) >= 2 * tight;
            if (!sure && first_low == n_gen) first_low = k;
            if (sure) {
                assert_int_equal(argmax(cur, nv), gids[k]);
                checked++;
            }
            model_seq s = {.kv = kv, .tokens = &gids[k], .n_tokens = 1, .logits = logits};
            if ((rc = model_forward(m, &s, 1, &err))) fail_msg("decode: %s", err.msg);
            cur = logits;
            if (steps && k < json_array_size(steps)) {
                double d = diff_json_row(cur, json_object_get(json_array_get(steps, k), "logits"), nv);
                if (d > worst_dec) worst_dec = d;
            }
        }
        print_message("  greedy: %zu/%zu steps checked (all before step %zu), all identical; "
                      "decode-step max |logit diff| %.3g\n",
                      checked, n_gen, first_low, worst_dec);
        if (!margins) assert_int_equal(checked, n_gen);
        assert_true(checked >= n_gen / 2);
        assert_true(worst_dec <= tol);
        kv_free(kv);
        free(gids);
        free(logits);
        free(ids);
    }
    json_decref(g);
    if (dec) json_decref(dec);
    model_free(m);
}

static void test_stories_logits(void **state) {
    (void)state;
    check_logits_file("models/stories260K.gguf", "golden/stories260K/logits.json",
                      "golden/stories260K/decode_logits.json", 1e-4, 1e-4, KP_TYPE_F32);
}

/* tol: the golden README's tolerance for the model; tight: ours. We quantise
 * activations as llama.cpp's x86 backend does (Q8_0 / Q8_K rows), so Q8_0 and
 * Q4_K_M agree to ~1e-6 and we hold them to 1e-3. Still open: Q4_0 from 30
 * tokens on (~0.08: llama.cpp repacks Q4_0 for a batched GEMM whose
 * activation rounding we do not reproduce yet) and F16/BF16 weights (4e-3 /
 * 2e-2); those are held to the README's bound (Q4_0: 0.1). */
#define TINY(fn, file, tol, tight)                                                        \
    static void test_tiny_##fn(void **state) {                                            \
        (void)state;                                                                      \
        check_logits_file("models/" file ".gguf", "golden/tiny/" file ".logits.json", NULL, tol, \
                          tight, KP_TYPE_F32);                                            \
    }
TINY(llama_f32, "tiny-llama-256", 1e-4, 1e-4)
TINY(llama_q8_0, "tiny-llama-256-Q8_0", 0.25, 1e-3)
TINY(llama_q4_0, "tiny-llama-256-Q4_0", 0.25, 0.1)
TINY(llama_q4_0_pure, "tiny-llama-256-Q4_0-pure", 0.25, 0.1)
TINY(llama_q4_k_m, "tiny-llama-256-Q4_K_M", 0.25, 1e-3)
TINY(llama_f16, "tiny-llama-256-F16", 1e-2, 1e-2)
TINY(llama_bf16, "tiny-llama-256-BF16", 5e-2, 5e-2)
TINY(qwen2, "tiny-qwen2", 1e-2, 1e-2)
TINY(gpt2, "tiny-gpt2", 2e-2, 2e-2)

/* Perplexity on the excerpt at n_ctx 128: 3.7546 (llama-perplexity). */
static void test_stories_ppl_excerpt(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("golden/stories260K/ppl_excerpt.txt");
    model *m = load("models/stories260K.gguf", 0);
    char *p = tu_shared_path("golden/stories260K/ppl_excerpt.txt");
    size_t len;
    char *text = tu_read_file(p, &len);
    assert_non_null(text);
    int32_t *ids;
    size_t n;
    kp_err err = {0};
    assert_int_equal(tok_encode(model_vocab(m), text, len, true, false, &ids, &n, &err), 0);
    assert_int_equal(n, 5193);
    json_t *g = tu_load_json("golden/stories260K/ppl_excerpt_c128.json");
    double want = json_number_value(json_object_get(g, "final_ppl"));
    assert_true(want > 1);
    eval_ppl_opts o = eval_default_ppl_opts();
    o.n_ctx = 128;
    eval_ppl_result r;
    int rc = eval_ppl(m, ids, (int64_t)n, &o, &r, &err);
    if (rc) fail_msg("ppl: %s", err.msg);
    print_message("ppl_excerpt c128: %.6f (golden %.6f), %d chunks, %.0f tok/s\n", r.ppl, want,
                  r.n_chunks, r.tokens_per_second);
    assert_int_equal(r.n_chunks, 40);
    assert_true(fabs(r.ppl / want - 1) < 1e-3);
    /* the same with an F16 KV cache stays within 0.1% too */
    o.kv_type = KP_TYPE_F16;
    assert_int_equal(eval_ppl(m, ids, (int64_t)n, &o, &r, &err), 0);
    print_message("ppl_excerpt c128, f16 KV: %.6f\n", r.ppl);
    assert_true(fabs(r.ppl / want - 1) < 1e-3);
    json_decref(g);
    free(ids);
    free(text);
    free(p);
    model_free(m);
}

/* The whole evaluation file at n_ctx 128: 4.9547 (2183 chunks). Skipped
 * under sanitizers (slow there); the excerpt test covers the same code. */
static void test_stories_ppl_full(void **state) {
    (void)state;
#if defined(__SANITIZE_ADDRESS__)
    print_message("SKIP: full-file perplexity is not run under AddressSanitizer (too slow)\n");
    skip();
#endif
    TU_SKIP_UNLESS_SHARED("data/tinystories-valid-eval.txt");
    model *m = load("models/stories260K.gguf", 0);
    char *p = tu_shared_path("data/tinystories-valid-eval.txt");
    size_t len;
    char *text = tu_read_file(p, &len);
    int32_t *ids;
    size_t n;
    kp_err err = {0};
    assert_int_equal(tok_encode(model_vocab(m), text, len, true, false, &ids, &n, &err), 0);
    assert_int_equal(n, 279496);
    eval_ppl_opts o = eval_default_ppl_opts();
    o.n_ctx = 128;
    eval_ppl_result r;
    assert_int_equal(eval_ppl(m, ids, (int64_t)n, &o, &r, &err), 0);
    print_message("eval file c128: ppl %.6f (golden 4.954673), %d chunks, %.0f tok/s\n", r.ppl,
                  r.n_chunks, r.tokens_per_second);
    assert_int_equal(r.n_chunks, 2183);
    assert_true(fabs(r.ppl / 4.954673 - 1) < 1e-3);
    free(ids);
    free(text);
    free(p);
    model_free(m);
}

/* Several sequences stepping together = each alone (continuous batching),
 * including micro-batch splitting (n_batch smaller than the batch). */
static void test_batched_sequences(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *p = tu_shared_path("models/stories260K.gguf");
    model_opts o = model_default_opts();
    o.n_batch = 7; /* force splitting into micro-batches */
    model *m = NULL;
    kp_err err = {0};
    assert_int_equal(model_load(&m, p, &o, &err), 0);
    model *ref = load("models/stories260K.gguf", 1);
    const int nv = model_hp(m)->n_vocab;
    const int n_seq = 4;
    int32_t prompts[4][12];
    int lens[4] = {12, 3, 9, 1};
    uint64_t s = 7;
    for (int i = 0; i < n_seq; i++)
        for (int t = 0; t < lens[i]; t++) {
            s = s * 6364136223846793005ull + 1;
            prompts[i][t] = t == 0 ? 1 : (int32_t)(3 + (s >> 33) % 500);
        }
    kv_cache *kv[4], *kv_ref[4];
    float *lg = malloc(sizeof(float) * n_seq * 12 * nv), *lr = malloc(sizeof(float) * 12 * nv);
    model_seq seqs[4];
    for (int i = 0; i < n_seq; i++) {
        assert_int_equal(model_kv_new(m, &kv[i], KP_TYPE_F32, 64, &err), 0);
        assert_int_equal(model_kv_new(ref, &kv_ref[i], KP_TYPE_F32, 64, &err), 0);
        seqs[i] = (model_seq){.kv = kv[i], .tokens = prompts[i], .n_tokens = lens[i],
                              .all_logits = true, .logits = lg + (size_t)i * 12 * nv};
    }
    assert_int_equal(model_forward(m, seqs, n_seq, &err), 0);
    for (int step = 0; step < 3; step++) {
        for (int i = 0; i < n_seq; i++) {
            model_seq r = {.kv = kv_ref[i], .tokens = seqs[i].tokens, .n_tokens = seqs[i].n_tokens,
                           .all_logits = true, .logits = lr};
            assert_int_equal(model_forward(ref, &r, 1, &err), 0);
            double d = tu_max_abs_diff(seqs[i].logits, lr, (size_t)seqs[i].n_tokens * nv);
            assert_true(d < 1e-4);
            assert_int_equal(kv[i]->n_pos, kv_ref[i]->n_pos);
        }
        /* next step: one token each, all sequences together */
        static int32_t next[4];
        for (int i = 0; i < n_seq; i++) {
            next[i] = argmax(seqs[i].logits + (size_t)(seqs[i].n_tokens - 1) * nv, nv);
            seqs[i].tokens = &next[i];
            seqs[i].n_tokens = 1;
        }
        assert_int_equal(model_forward(m, seqs, n_seq, &err), 0);
    }
    /* context overflow is refused and leaves the cache untouched */
    int before = kv[0]->n_pos;
    int32_t many[80] = {0};
    model_seq big = {.kv = kv[0], .tokens = many, .n_tokens = 80, .logits = lr};
    assert_int_equal(model_forward(m, &big, 1, &err), KP_ERANGE);
    assert_non_null(strstr(err.msg, "exceed"));
    assert_int_equal(kv[0]->n_pos, before);
    int32_t bad = 100000;
    model_seq badq = {.kv = kv[0], .tokens = &bad, .n_tokens = 1, .logits = lr};
    assert_int_equal(model_forward(m, &badq, 1, &err), KP_EINVAL);
    for (int i = 0; i < n_seq; i++) {
        kv_free(kv[i]);
        kv_free(kv_ref[i]);
    }
    free(lg);
    free(lr);
    free(p);
    model_free(m);
    model_free(ref);
}

/* Same file -> same fingerprint; different weights -> different. */
static void test_fingerprint(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/tiny-llama-256-Q8_0.gguf");
    model *a = load("models/stories260K.gguf", 1), *b = load("models/stories260K.gguf", 1);
    model *c = load("models/tiny-llama-256.gguf", 1), *d = load("models/tiny-llama-256-Q8_0.gguf", 1);
    uint64_t fa = model_fingerprint(a);
    assert_true(fa != 0);
    assert_true(fa == model_fingerprint(b));
    assert_true(fa == model_fingerprint(a)); /* cached */
    assert_true(model_fingerprint(c) != fa);
    assert_true(model_fingerprint(c) != model_fingerprint(d));
    model_free(a);
    model_free(b);
    model_free(c);
    model_free(d);
}

/* The calibration probe sees pre-RoPE keys: rotating them gives exactly the
 * cache rows; it sees every layer once per micro-batch. */
typedef struct probe_rec {
    float k0[64][32];
    int n, calls;
} probe_rec;

static void probe_fn(void *ud, int layer, const float *q, const float *k, const float *v,
                     const int32_t *pos, const int *seq, int n) {
    (void)q; (void)v; (void)seq;
    probe_rec *p = ud;
    p->calls++;
    if (layer != 0) return;
    for (int t = 0; t < n; t++) memcpy(p->k0[pos[t]], k + (size_t)t * 32, sizeof p->k0[0]);
    p->n = n;
}

static void test_probe_and_wo(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load("models/stories260K.gguf", 1);
    probe_rec *p = calloc(1, sizeof *p);
    model_set_probe(m, probe_fn, p);
    kp_err err = {0};
    kv_cache *kv = NULL;
    assert_int_equal(model_kv_new(m, &kv, KP_TYPE_F32, 64, &err), 0);
    int32_t ids[20];
    for (int i = 0; i < 20; i++) ids[i] = i == 0 ? 1 : 300 + i;
    model_seq q = {.kv = kv, .tokens = ids, .n_tokens = 20};
    assert_int_equal(model_forward(m, &q, 1, &err), 0);
    assert_int_equal(p->n, 20);
    assert_int_equal(p->calls, 5);
    const model_hparams *hp = model_hp(m);
    const kp_ops *ops = kp_backend_ops(model_backend(m));
    int32_t pos[20];
    for (int i = 0; i < 20; i++) pos[i] = i;
    ops->rope(model_backend(m), &p->k0[0][0], pos, 20, hp->n_kv_heads, hp->head_dim, hp->n_rot, hp->rope_base,
              hp->rope_freq_scale, hp->rope_mode);
    assert_memory_equal(&p->k0[0][0], kv->k[0], sizeof(float) * 20 * 32);
    model_set_probe(m, NULL, NULL);
    float *wo = model_wo_f32(m, 0);
    assert_non_null(wo);
    assert_null(model_wo_f32(m, 99));
    char *path = tu_shared_path("models/stories260K.gguf");
    gguf_file *gf = NULL;
    assert_int_equal(gguf_open(&gf, path, &err), 0);
    assert_memory_equal(wo, gguf_find_tensor(gf, "blk.0.attn_output.weight")->data, sizeof(float) * 64 * 64);
    gguf_close(gf);
    free(path);
    free(wo);
    kv_free(kv);
    free(p);
    model_free(m);
}

static void test_missing_model(void **state) {
    (void)state;
    model *m = NULL;
    kp_err err = {0};
    int rc = model_load(&m, "/nonexistent/x.gguf", NULL, &err);
    assert_true(rc == KP_EIO || rc == KP_ENOTFOUND);
    assert_null(m);
    assert_true(strlen(err.msg) > 0);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_stories_logits),
        cmocka_unit_test(test_tiny_llama_f32),
        cmocka_unit_test(test_tiny_llama_q8_0),
        cmocka_unit_test(test_tiny_llama_q4_0),
        cmocka_unit_test(test_tiny_llama_q4_0_pure),
        cmocka_unit_test(test_tiny_llama_q4_k_m),
        cmocka_unit_test(test_tiny_llama_f16),
        cmocka_unit_test(test_tiny_llama_bf16),
        cmocka_unit_test(test_tiny_qwen2),
        cmocka_unit_test(test_tiny_gpt2),
        cmocka_unit_test(test_stories_ppl_excerpt),
        cmocka_unit_test(test_stories_ppl_full),
        cmocka_unit_test(test_batched_sequences),
        cmocka_unit_test(test_fingerprint),
        cmocka_unit_test(test_probe_and_wo),
        cmocka_unit_test(test_missing_model),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("golden", tests, NULL, NULL);
}
