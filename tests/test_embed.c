/*
 * test_embed.c — model_embed (engine/model.h): mean-pooled final-normed
 * hidden states, on the real stories260K model.
 *
 * The check that needs no second implementation: attention is causal, so
 * the hidden states of a prefix do not change when tokens are appended, and
 *   n * E(x[0..n)) - (n-1) * E(x[0..n-1)) = h(x[n-1]),
 * the final-normed hidden state of the last token. Its product with the
 * output matrix must be the logits model_forward gives for that token.
 * Also: several inputs in one call equal one call each; errors.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tests/testutil.h"

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tok.h"

typedef struct {
    model *m;
    gguf_file *gf;
    int32_t toks[64];
    int n;
} fixture;

static int setup(void **state) {
    char *path = tu_shared_path("models/stories260K.gguf");
    fixture *f = calloc(1, sizeof *f);
    kp_err err = {0};
    model_opts mo = model_default_opts();
    mo.n_threads = 1;
    if (model_load(&f->m, path, &mo, &err) || gguf_open(&f->gf, path, &err)) {
        fprintf(stderr, "load: %s\n", err.msg);
        return -1;
    }
    free(path);
    /* a fixed, plausible token sequence: ids of the model's own vocabulary */
    f->n = 24;
    for (int i = 0; i < f->n; i++) f->toks[i] = 1 + (i * 37 + 11) % 500;
    *state = f;
    return 0;
}

static int teardown(void **state) {
    fixture *f = *state;
    if (f) {
        gguf_close(f->gf);
        model_free(f->m);
        free(f);
    }
    return 0;
}

static void test_last_token_logits(void **state) {
    fixture *f = *state;
    const model_hparams *hp = model_hp(f->m);
    const int dim = hp->dim, nv = hp->n_vocab, n = f->n;
    float *e = calloc((size_t)2 * dim, sizeof *e);
    const int32_t *in[2] = {f->toks, f->toks};
    int nt[2] = {n, n - 1};
    kp_err err = {0};
    assert_int_equal(model_embed(f->m, in, nt, 2, KP_TYPE_F32, e, &err), 0);
    float *h = malloc(sizeof *h * (size_t)dim);
    for (int d = 0; d < dim; d++) h[d] = (float)n * e[d] - (float)(n - 1) * e[dim + d];

    /* the reference logits of the last token */
    kv_cache *kv = NULL;
    assert_int_equal(model_kv_new(f->m, &kv, KP_TYPE_F32, n, &err), 0);
    float *want = malloc(sizeof *want * (size_t)nv);
    model_seq q = {.kv = kv, .tokens = f->toks, .n_tokens = n, .logits = want};
    assert_int_equal(model_forward(f->m, &q, 1, &err), 0);
    kv_free(kv);

    const gguf_tensor *w = gguf_find_tensor(f->gf, "output.weight");
    if (!w) w = gguf_find_tensor(f->gf, "token_embd.weight");
    assert_non_null(w);
    assert_int_equal(w->type, KP_TYPE_F32);
    const float *W = w->data; /* [n_vocab][dim] */
    double num = 0, den = 0;
    for (int v = 0; v < nv; v++) {
        double g = 0;
        for (int d = 0; d < dim; d++) g += (double)W[(size_t)v * dim + d] * h[d];
        num += (g - want[v]) * (g - want[v]);
        den += (double)want[v] * want[v];
    }
    print_message("relative error of W . h(last) vs the logits: %.2e\n", sqrt(num / den));
    assert_true(sqrt(num / den) < 1e-3);
    free(h), free(want), free(e);
}

static void test_batch_equals_single(void **state) {
    fixture *f = *state;
    const int dim = model_hp(f->m)->dim;
    const int32_t *in[3] = {f->toks, f->toks + 5, f->toks + 2};
    int nt[3] = {7, 19, 1};
    float *all = malloc(sizeof *all * 3 * (size_t)dim), *one = malloc(sizeof *one * (size_t)dim);
    kp_err err = {0};
    assert_int_equal(model_embed(f->m, in, nt, 3, KP_TYPE_F32, all, &err), 0);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(model_embed(f->m, &in[i], &nt[i], 1, KP_TYPE_F32, one, &err), 0);
        for (int d = 0; d < dim; d++) assert_true(fabsf(all[(size_t)i * dim + d] - one[d]) <= 1e-5f * (1 + fabsf(one[d])));
    }
    /* different inputs give different vectors */
    double diff = 0;
    for (int d = 0; d < dim; d++) diff += fabs(all[d] - all[dim + d]);
    assert_true(diff > 1e-3);
    free(all), free(one);
}

static void test_errors(void **state) {
    fixture *f = *state;
    const int dim = model_hp(f->m)->dim;
    float *out = malloc(sizeof *out * (size_t)dim);
    kp_err err = {0};
    const int32_t *in[1] = {f->toks};
    int zero = 0, big = model_hp(f->m)->n_ctx_train + 1;
    assert_int_equal(model_embed(f->m, in, &zero, 1, KP_TYPE_F32, out, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "empty"));
    assert_int_equal(model_embed(f->m, in, &big, 1, KP_TYPE_F32, out, &err), KP_ERANGE);
    int32_t bad[2] = {3, 1 << 20};
    const int32_t *inb[1] = {bad};
    int two = 2;
    assert_int_equal(model_embed(f->m, inb, &two, 1, KP_TYPE_F32, out, &err), KP_EINVAL);
    assert_int_equal(model_embed(f->m, in, &two, 0, KP_TYPE_F32, out, &err), KP_EINVAL);
    free(out);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    if (!tu_shared_exists("models/stories260K.gguf")) {
        printf("SKIP: no ../shared/models/stories260K.gguf\n");
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_last_token_logits),
        cmocka_unit_test(test_batch_equals_single),
        cmocka_unit_test(test_errors),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
