/*
 * test_api_embed.c — POST /v1/embeddings parsing and responses
 * (server/api_embed.h) with the stories260K vocabulary: every input form,
 * every 400 with the field it names, the limits, normalisation and
 * truncation, and the base64 encoding (decoded back to the same floats).
 */
#include <math.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "tests/testutil.h"

#include "engine/gguf.h"
#include "engine/tok.h"
#include "server/api_embed.h"

static gguf_file *gf;
static tok_vocab *vocab;
static const api_embed_limits lim = {.dim = 8, .max_tokens = 16, .max_inputs = 4, .max_total = 24};

static int setup(void **state) {
    (void)state;
    char *p = tu_shared_path("models/stories260K.gguf");
    kp_err err = {0};
    int rc = gguf_open(&gf, p, &err) || tok_load(&vocab, gf, &err);
    free(p);
    if (rc) fprintf(stderr, "%s\n", err.msg);
    return rc ? -1 : 0;
}

static int teardown(void **state) {
    (void)state;
    tok_free(vocab);
    gguf_close(gf);
    return 0;
}

static int parse(const char *body, api_embed_req *q, api_error *e) {
    return api_parse_embeddings(body, strlen(body), vocab, &lim, q, e);
}

static void test_inputs(void **state) {
    (void)state;
    api_embed_req q;
    api_error e;
    assert_int_equal(parse("{\"input\":\"Once upon a time\",\"model\":\"x\",\"user\":\"u\"}", &q, &e), 0);
    assert_int_equal(q.n_inputs, 1);
    int32_t *ids = NULL;
    size_t n = 0;
    kp_err err = {0};
    assert_int_equal(tok_encode(vocab, "Once upon a time", 16, true, false, &ids, &n, &err), 0);
    assert_int_equal(q.n_tokens[0], (int)n); /* tokenised as a prompt: BOS included */
    assert_memory_equal(q.inputs[0], ids, n * sizeof *ids);
    assert_int_equal(q.total_tokens, (int)n);
    assert_false(q.base64);
    assert_int_equal(q.dimensions, 8);
    free(ids);
    api_embed_req_free(&q);

    assert_int_equal(parse("{\"input\":[\"a b\",\"c\"],\"encoding_format\":\"base64\",\"dimensions\":3}", &q, &e), 0);
    assert_int_equal(q.n_inputs, 2);
    assert_true(q.base64);
    assert_int_equal(q.dimensions, 3);
    api_embed_req_free(&q);

    assert_int_equal(parse("{\"input\":[5,6,7]}", &q, &e), 0);
    assert_int_equal(q.n_inputs, 1);
    assert_int_equal(q.n_tokens[0], 3);
    assert_int_equal(q.inputs[0][2], 7);
    api_embed_req_free(&q);

    assert_int_equal(parse("{\"input\":[[5],[6,7]]}", &q, &e), 0);
    assert_int_equal(q.n_inputs, 2);
    assert_int_equal(q.n_tokens[1], 2);
    assert_int_equal(q.total_tokens, 3);
    api_embed_req_free(&q);
}

static void test_errors(void **state) {
    (void)state;
    static const struct { const char *body, *param, *code, *msg; } cases[] = {
        {"{}", "input", "missing_required_parameter", "'input' is required"},
        {"{\"input\":null}", "input", "missing_required_parameter", "'input' is required"},
        {"{\"input\":3}", "input", "invalid_type", "'input' must be"},
        {"{\"input\":[]}", "input", "invalid_type", "'input' must be"},
        {"{\"input\":\"\"}", "input", "invalid_value", "'input[0]' is empty"},
        {"{\"input\":[\"a\",\"\"]}", "input", "invalid_value", "'input[1]' is empty"},
        {"{\"input\":[[]]}", "input", "invalid_value", "'input[0]' is empty"},
        {"{\"input\":[\"a\",[1]]}", "input", "invalid_type", "not of the same kind"},
        {"{\"input\":[1,\"a\"]}", "input", "invalid_value", "not a token id"},
        {"{\"input\":[512]}", "input", "invalid_value", "not a token id of this model (0..511)"},
        {"{\"input\":[-1]}", "input", "invalid_value", "not a token id"},
        {"{\"input\":[1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17]}", "input", "context_length_exceeded",
         "has 17 tokens; this model's context is 16"},
        {"{\"input\":[[1,2,3,4,5,6,7,8,9,10],[1,2,3,4,5,6,7,8,9,10],[1,2,3,4,5]]}", "input",
         "context_length_exceeded", "more than 24 tokens in all (at 'input[2]')"},
        {"{\"input\":[\"a\",\"b\",\"c\",\"d\",\"e\"]}", "input", "invalid_value", "5 inputs; at most 4"},
        {"{\"input\":\"a\",\"encoding_format\":\"hex\"}", "encoding_format", "invalid_value", "\"float\" or \"base64\""},
        {"{\"input\":\"a\",\"encoding_format\":1}", "encoding_format", "invalid_value", "\"float\" or \"base64\""},
        {"{\"input\":\"a\",\"dimensions\":0}", "dimensions", "invalid_value", "from 1 to 8"},
        {"{\"input\":\"a\",\"dimensions\":9}", "dimensions", "invalid_value", "from 1 to 8"},
        {"{\"input\":\"a\",\"dimensions\":2.5}", "dimensions", "invalid_value", "from 1 to 8"},
        {"{\"input\":\"a\",\"model\":3}", "model", "invalid_type", "'model' must be a string"},
        {"[1]", "", "invalid_type", "must be a JSON object"},
        {"{\"input\":", "", "invalid_json", "invalid JSON"},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(cases); i++) {
        api_embed_req q;
        api_error e = {0};
        print_message("%s\n", cases[i].body);
        assert_int_equal(parse(cases[i].body, &q, &e), KP_EINVAL);
        assert_int_equal(e.http_status, 400);
        assert_string_equal(e.param, cases[i].param);
        assert_string_equal(e.code, cases[i].code);
        if (!strstr(e.message, cases[i].msg)) fail_msg("message '%s' lacks '%s'", e.message, cases[i].msg);
        assert_null(q.inputs); /* freed on failure */
    }
}

static void test_normalize_and_response(void **state) {
    (void)state;
    float v[2][8] = {{3, 4, 12, 0, 0, 0, 0, 1}, {0, 0, 0, 0, 0, 0, 0, 0}};
    api_embed_normalize(v[0], 2); /* dimensions 2: (3, 4) -> (0.6, 0.8) */
    assert_true(fabsf(v[0][0] - 0.6f) < 1e-6f && fabsf(v[0][1] - 0.8f) < 1e-6f);
    api_embed_normalize(v[1], 8); /* zero stays zero */
    assert_true(v[1][0] == 0.0f);

    api_embed_req q;
    api_error e;
    assert_int_equal(parse("{\"input\":[[1,2],[3]],\"dimensions\":2}", &q, &e), 0);
    char *js = api_embed_response(&q, &v[0][0], 8, "m.gguf");
    json_t *r = json_loads(js, 0, NULL);
    assert_non_null(r);
    assert_string_equal(json_string_value(json_object_get(r, "object")), "list");
    assert_string_equal(json_string_value(json_object_get(r, "model")), "m.gguf");
    assert_int_equal(json_integer_value(json_object_get(json_object_get(r, "usage"), "prompt_tokens")), 3);
    assert_int_equal(json_integer_value(json_object_get(json_object_get(r, "usage"), "total_tokens")), 3);
    json_t *d = json_object_get(r, "data");
    assert_int_equal(json_array_size(d), 2);
    json_t *e0 = json_object_get(json_array_get(d, 0), "embedding");
    assert_int_equal(json_array_size(e0), 2);
    assert_true(fabs(json_real_value(json_array_get(e0, 1)) - 0.8) < 1e-6);
    assert_int_equal(json_integer_value(json_object_get(json_array_get(d, 1), "index")), 1);
    json_decref(r);
    free(js);
    q.base64 = true;
    js = api_embed_response(&q, &v[0][0], 8, "m.gguf");
    r = json_loads(js, 0, NULL);
    const char *b = json_string_value(json_object_get(json_array_get(json_object_get(r, "data"), 0), "embedding"));
    assert_non_null(b);
    unsigned char raw[64];
    size_t n = 0;
    assert_int_equal(sodium_base642bin(raw, sizeof raw, b, strlen(b), NULL, &n, NULL, sodium_base64_VARIANT_ORIGINAL), 0);
    assert_int_equal(n, 8); /* 2 float32 */
    for (int k = 0; k < 2; k++) { /* little-endian */
        uint32_t u = (uint32_t)raw[4 * k] | (uint32_t)raw[4 * k + 1] << 8 | (uint32_t)raw[4 * k + 2] << 16 |
                     (uint32_t)raw[4 * k + 3] << 24;
        float f;
        memcpy(&f, &u, 4);
        assert_true(f == v[0][k]);
    }
    json_decref(r);
    free(js);
    api_embed_req_free(&q);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    if (!tu_shared_exists("models/stories260K.gguf")) {
        printf("SKIP: no ../shared/models/stories260K.gguf\n");
        return 0;
    }
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_inputs),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_normalize_and_response),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
