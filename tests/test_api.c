/*
 * test_api.c — the OpenAI protocol layer: every request field valid and
 * invalid (type, range, null = absent), messages and content parts, prompt
 * forms, malformed / deep / non-UTF-8 JSON, the error JSON shape and the
 * standard errors, chat and completion responses and streaming chunks
 * (parsed back with jansson and checked key by key), logprobs, usage, SSE
 * framing, the models list, and a 10k-message request.
 */
#include "tests/testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"

#define MSG1 "\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]"

static void parse_chat_ok(const char *body, api_request *r) {
    api_error e;
    memset(&e, 0, sizeof(e));
    int rc = api_parse_chat(body, strlen(body), NULL, r, &e);
    if (rc != 0) fail_msg("api_parse_chat(%s) failed: %d %s", body, e.http_status, e.message);
}

static void parse_completion_ok(const char *body, api_request *r) {
    api_error e;
    memset(&e, 0, sizeof(e));
    int rc = api_parse_completion(body, strlen(body), NULL, r, &e);
    if (rc != 0) fail_msg("api_parse_completion(%s) failed: %s", body, e.message);
}

/* Expect a 400 with the given param ("" = null), code and message fragment. */
static void expect_err(int chat, const char *body, const char *param, const char *code,
                       const char *frag) {
    api_request r;
    api_error e;
    memset(&e, 0, sizeof(e));
    int rc = chat ? api_parse_chat(body, strlen(body), NULL, &r, &e)
                  : api_parse_completion(body, strlen(body), NULL, &r, &e);
    if (rc >= 0) fail_msg("expected an error for %s", body);
    if (e.http_status != 400 || strcmp(e.param, param) != 0 || strcmp(e.code, code) != 0 ||
        (frag && !strstr(e.message, frag)))
        fail_msg("body %s:\n got %d param '%s' code '%s' msg '%s'\nwant param '%s' code '%s' "
                 "msg containing '%s'",
                 body, e.http_status, e.param, e.code, e.message, param, code,
                 frag ? frag : "");
    assert_string_equal(e.type, "invalid_request_error");
    /* the failed request is empty and safe to free */
    assert_null(r.msgs);
    assert_null(r.model);
    assert_int_equal(r.n_stop, 0);
    api_request_free(&r);
}

static void test_api_chat_defaults(void **state) {
    (void)state;
    api_request r;
    parse_chat_ok("{" MSG1 "}", &r);
    sample_params d = sample_default_params();
    assert_int_equal(r.kind, API_CHAT);
    assert_null(r.model);
    assert_int_equal(r.n_msgs, 1);
    assert_string_equal(r.msgs[0].role, "user");
    assert_string_equal(r.msgs[0].content, "hi");
    assert_int_equal(r.max_tokens, -1);
    assert_true(r.sp.temperature == d.temperature && r.sp.top_p == d.top_p &&
                r.sp.top_k == d.top_k && r.sp.min_p == d.min_p);
    assert_true(r.sp.seed == SAMPLE_SEED_RANDOM);
    assert_false(r.has_seed || r.stream || r.include_usage || r.logprobs);
    assert_int_equal(r.n_stop, 0);
    assert_string_equal(r.session_id, "");
    api_request_free(&r);
}

static void test_api_chat_all_fields(void **state) {
    (void)state;
    api_request r;
    parse_chat_ok("{\"model\":\"m1\",\"messages\":[{\"role\":\"developer\",\"content\":\"sys\"},"
                  "{\"role\":\"user\",\"content\":\"q\",\"name\":\"bob\"},"
                  "{\"role\":\"assistant\",\"content\":null},"
                  "{\"role\":\"system\",\"content\":\"s2\"}],"
                  "\"max_tokens\":10,\"max_completion_tokens\":20,\"temperature\":0,"
                  "\"top_p\":0.5,\"top_k\":7,\"min_p\":0.1,\"seed\":-3,\"stop\":[\"a\",\"bb\"],"
                  "\"presence_penalty\":-2,\"frequency_penalty\":2,\"repeat_penalty\":1.1,"
                  "\"logprobs\":true,\"top_logprobs\":20,\"n\":1,\"user\":\"u\",\"stream\":true,\"ignore_eos\":true,"
                  "\"stream_options\":{\"include_usage\":true},\"session_id\":\"Ab_9-x\","
                  "\"unknown_field\":{\"deep\":[1,2,3]},\"logit_bias\":null}",
                  &r);
    assert_string_equal(r.model, "m1");
    assert_int_equal(r.n_msgs, 4);
    assert_string_equal(r.msgs[0].role, "system");
    assert_string_equal(r.msgs[1].content, "q");
    assert_string_equal(r.msgs[2].role, "assistant");
    assert_string_equal(r.msgs[2].content, "");
    assert_int_equal(r.max_tokens, 20); /* max_completion_tokens wins */
    assert_true(r.ignore_eos);
    assert_true(r.sp.temperature == 0.0f);
    assert_true(r.sp.top_p == 0.5f);
    assert_int_equal(r.sp.top_k, 7);
    assert_true(r.sp.min_p == 0.1f);
    assert_true(r.has_seed);
    assert_true(r.sp.seed == (uint64_t)-3);
    assert_int_equal(r.n_stop, 2);
    assert_string_equal(r.stop[0], "a");
    assert_string_equal(r.stop[1], "bb");
    assert_true(r.sp.presence_penalty == -2.0f && r.sp.frequency_penalty == 2.0f);
    assert_true(r.sp.repeat_penalty == 1.1f);
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 20);
    assert_true(r.stream && r.include_usage);
    assert_string_equal(r.session_id, "Ab_9-x");
    api_request_free(&r);

    /* max_tokens alone; the model echoed whatever it is (non-string -> NULL);
     * nulls are absent; stop as one string; integer numbers accepted */
    parse_chat_ok("{\"model\":42," MSG1 ",\"max_tokens\":5,\"temperature\":2,\"top_p\":1,"
                  "\"stop\":\"\\n\",\"seed\":null,\"n\":null,\"stream\":null,\"top_k\":0,"
                  "\"session_id\":null,\"stream_options\":null}",
                  &r);
    assert_null(r.model);
    assert_int_equal(r.max_tokens, 5);
    assert_true(r.sp.temperature == 2.0f && r.sp.top_p == 1.0f);
    assert_int_equal(r.sp.top_k, 0);
    assert_int_equal(r.n_stop, 1);
    assert_string_equal(r.stop[0], "\n");
    assert_false(r.has_seed);
    api_request_free(&r);
}

static void test_api_chat_invalid_fields(void **state) {
    (void)state;
    static const struct {
        const char *extra, *param, *code, *frag;
    } cases[] = {
        {"\"temperature\":\"hot\"", "temperature", "invalid_type",
         "'temperature' must be a number between 0 and 2"},
        {"\"temperature\":2.5", "temperature", "invalid_value",
         "'temperature' must be a number between 0 and 2"},
        {"\"temperature\":-0.1", "temperature", "invalid_value", NULL},
        {"\"top_p\":0", "top_p", "invalid_value", "'top_p'"},
        {"\"top_p\":1.01", "top_p", "invalid_value", NULL},
        {"\"top_p\":true", "top_p", "invalid_type", NULL},
        {"\"top_k\":-1", "top_k", "invalid_value", NULL},
        {"\"top_k\":1.5", "top_k", "invalid_type", NULL},
        {"\"min_p\":1.5", "min_p", "invalid_value", NULL},
        {"\"min_p\":-1", "min_p", "invalid_value", NULL},
        {"\"seed\":1.5", "seed", "invalid_type", NULL},
        {"\"seed\":\"1\"", "seed", "invalid_type", NULL},
        {"\"max_tokens\":0", "max_tokens", "invalid_value", "positive integer"},
        {"\"max_tokens\":-5", "max_tokens", "invalid_value", NULL},
        {"\"max_tokens\":3.0", "max_tokens", "invalid_type", NULL},
        {"\"max_tokens\":\"10\"", "max_tokens", "invalid_type", NULL},
        {"\"max_tokens\":99999999999", "max_tokens", "invalid_value", NULL},
        {"\"max_completion_tokens\":0", "max_completion_tokens", "invalid_value", NULL},
        {"\"presence_penalty\":2.1", "presence_penalty", "invalid_value", NULL},
        {"\"frequency_penalty\":-3", "frequency_penalty", "invalid_value", NULL},
        {"\"frequency_penalty\":[]", "frequency_penalty", "invalid_type", NULL},
        {"\"repeat_penalty\":0", "repeat_penalty", "invalid_value", NULL},
        {"\"stop\":\"\"", "stop", "invalid_value", NULL},
        {"\"stop\":[\"a\",\"\"]", "stop", "invalid_value", "empty"},
        {"\"stop\":[\"a\",\"b\",\"c\",\"d\",\"e\"]", "stop", "invalid_value", "up to 4"},
        {"\"stop\":[1]", "stop", "invalid_type", NULL},
        {"\"stop\":5", "stop", "invalid_type", NULL},
        {"\"logprobs\":1", "logprobs", "invalid_type", NULL},
        {"\"top_logprobs\":3", "top_logprobs", "invalid_value", "requires 'logprobs'"},
        {"\"logprobs\":false,\"top_logprobs\":3", "top_logprobs", "invalid_value", NULL},
        {"\"logprobs\":true,\"top_logprobs\":21", "top_logprobs", "invalid_value", NULL},
        {"\"logprobs\":true,\"top_logprobs\":-1", "top_logprobs", "invalid_value", NULL},
        {"\"n\":2", "n", "invalid_value",
         "n must be 1: kvpark generates one choice per request"},
        {"\"n\":0", "n", "invalid_value", "n must be 1"},
        {"\"n\":\"1\"", "n", "invalid_type", NULL},
        {"\"user\":5", "user", "invalid_type", NULL},
        {"\"stream\":\"yes\"", "stream", "invalid_type", NULL},
        {"\"ignore_eos\":1", "ignore_eos", "invalid_type", NULL},
        {"\"stream_options\":true", "stream_options", "invalid_type", NULL},
        {"\"stream_options\":{\"include_usage\":1}", "stream_options.include_usage",
         "invalid_type", NULL},
        {"\"session_id\":\"\"", "session_id", "invalid_value", NULL},
        {"\"session_id\":\"a b\"", "session_id", "invalid_value", NULL},
        {"\"session_id\":\"a/b\"", "session_id", "invalid_value", NULL},
        {"\"session_id\":\"0123456789012345678901234567890123456789012345678901234567890123"
         "4\"",
         "session_id", "invalid_value", NULL},
        {"\"session_id\":7", "session_id", "invalid_type", NULL},
        {"\"logit_bias\":[1]", "logit_bias", "invalid_type", NULL},
        {"\"logit_bias\":{\"abc\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"-1\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"-0\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"07\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"99999999999\":1}", "logit_bias", "invalid_value", "token ids"},
        {"\"logit_bias\":{\"5\":\"1\"}", "logit_bias", "invalid_type", "must be a number"},
        {"\"logit_bias\":{\"5\":100.5}", "logit_bias", "invalid_value", "between -100 and 100"},
        {"\"logit_bias\":{\"5\":-101}", "logit_bias", "invalid_value", "between -100 and 100"},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(cases); i++) {
        char body[512];
        snprintf(body, sizeof(body), "{" MSG1 ",%s}", cases[i].extra);
        expect_err(1, body, cases[i].param, cases[i].code, cases[i].frag);
    }
    /* a 64-character session id is fine */
    api_request r;
    parse_chat_ok("{" MSG1 ",\"session_id\":\"0123456789012345678901234567890123456789012345"
                  "678901234567890123\"}",
                  &r);
    assert_int_equal(strlen(r.session_id), 64);
    api_request_free(&r);
    /* logit_bias: sorted by id, ranges kept; null and {} are none */
    parse_chat_ok("{" MSG1 ",\"logit_bias\":{\"300\":-100,\"2\":0.5,\"0\":100}}", &r);
    assert_int_equal(r.n_bias, 3);
    assert_int_equal(r.bias[0].id, 0);
    assert_true(r.bias[0].bias == 100.0f);
    assert_int_equal(r.bias[1].id, 2);
    assert_true(r.bias[1].bias == 0.5f);
    assert_int_equal(r.bias[2].id, 300);
    assert_true(r.bias[2].bias == -100.0f);
    api_request_free(&r);
    parse_chat_ok("{" MSG1 ",\"logit_bias\":null}", &r);
    assert_int_equal(r.n_bias, 0);
    api_request_free(&r);
    parse_chat_ok("{" MSG1 ",\"logit_bias\":{}}", &r);
    assert_int_equal(r.n_bias, 0);
    api_request_free(&r);
    assert_true(api_session_id_valid("a"));
    assert_false(api_session_id_valid(""));
    assert_false(api_session_id_valid("é"));
}

/* response_format: text / absent -> no grammar; json_object and json_schema
 * compile one (it accepts what the schema allows); bad values -> 400 naming
 * the param, an unsupported schema keyword named in the message. */
static void test_api_response_format(void **state) {
    (void)state;
    static const struct {
        const char *extra, *param, *code, *frag;
    } cases[] = {
        {"\"response_format\":\"json\"", "response_format", "invalid_type", NULL},
        {"\"response_format\":{}", "response_format.type", "missing_required_parameter", NULL},
        {"\"response_format\":{\"type\":\"xml\"}", "response_format.type", "invalid_value", "xml"},
        {"\"response_format\":{\"type\":\"json_schema\"}", "response_format.json_schema",
         "missing_required_parameter", NULL},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"schema\":{}}}",
         "response_format.json_schema.name", "missing_required_parameter", NULL},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a b\",\"schema\":{}}}",
         "response_format.json_schema.name", "invalid_value", NULL},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\",\"strict\":1,\"schema\":{}}}",
         "response_format.json_schema.strict", "invalid_type", NULL},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\"}}",
         "response_format.json_schema.schema", "missing_required_parameter", NULL},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\",\"schema\":"
         "{\"type\":\"object\",\"properties\":{\"x\":{\"type\":\"string\",\"pattern\":\"^a\"}}}}}",
         "response_format.json_schema.schema", "unsupported_schema", "'pattern' at /properties/x"},
        {"\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"a\",\"schema\":"
         "{\"type\":\"strang\"}}}",
         "response_format.json_schema.schema", "invalid_schema", "'type'"},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(cases); i++) {
        char body[1024];
        snprintf(body, sizeof(body), "{" MSG1 ",%s}", cases[i].extra);
        expect_err(1, body, cases[i].param, cases[i].code, cases[i].frag);
    }
    api_request r;
    parse_chat_ok("{" MSG1 ",\"response_format\":{\"type\":\"text\"}}", &r);
    assert_null(r.grammar);
    api_request_free(&r);
    parse_chat_ok("{" MSG1 ",\"response_format\":null}", &r);
    assert_null(r.grammar);
    api_request_free(&r);
    parse_chat_ok("{" MSG1 ",\"response_format\":{\"type\":\"json_object\"}}", &r);
    assert_non_null(r.grammar);
    gram_state *gs = NULL;
    assert_int_equal(gram_state_new(&gs, r.grammar, NULL, NULL), 0);
    assert_int_equal(gram_state_feed(gs, "[1]", 3), KP_EINVAL);
    assert_int_equal(gram_state_feed(gs, "{\"a\":1}", 7), 0);
    assert_true(gram_state_complete(gs));
    gram_state_free(gs);
    api_request_free(&r);
    parse_chat_ok("{" MSG1 ",\"response_format\":{\"type\":\"json_schema\",\"json_schema\":{\"name\":\"n_1\","
                  "\"strict\":true,\"schema\":{\"type\":\"object\",\"properties\":{\"k\":{\"enum\":[\"a\",\"b\"]}},"
                  "\"required\":[\"k\"],\"additionalProperties\":false}}}}",
                  &r);
    assert_non_null(r.grammar);
    assert_int_equal(gram_state_new(&gs, r.grammar, NULL, NULL), 0);
    assert_int_equal(gram_state_feed(gs, "{\"k\":\"c\"}", 9), KP_EINVAL);
    assert_int_equal(gram_state_feed(gs, "{\"k\":\"b\"}", 9), 0);
    assert_true(gram_state_complete(gs));
    gram_state_free(gs);
    api_request_free(&r);
}

static void test_api_limits(void **state) {
    (void)state;
    api_limits lim = {.max_tokens_limit = 100, .max_messages = 2};
    api_request r;
    api_error e;
    const char *ok = "{" MSG1 ",\"max_tokens\":100}";
    assert_int_equal(api_parse_chat(ok, strlen(ok), &lim, &r, &e), 0);
    api_request_free(&r);
    const char *big = "{" MSG1 ",\"max_tokens\":101}";
    assert_true(api_parse_chat(big, strlen(big), &lim, &r, &e) < 0);
    assert_string_equal(e.param, "max_tokens");
    assert_non_null(strstr(e.message, "100"));
    const char *many = "{\"messages\":[{\"role\":\"user\",\"content\":\"1\"},{\"role\":\"user\","
                       "\"content\":\"2\"},{\"role\":\"user\",\"content\":\"3\"}]}";
    assert_true(api_parse_chat(many, strlen(many), &lim, &r, &e) < 0);
    assert_string_equal(e.param, "messages");
    api_request_free(&r);
}

static void test_api_messages(void **state) {
    (void)state;
    api_request r;
    /* content parts joined by "\n"; empty parts array -> "" */
    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
                  "\"one\"},{\"type\":\"text\",\"text\":\"two\"}]},{\"role\":\"user\","
                  "\"content\":[]}]}",
                  &r);
    assert_string_equal(r.msgs[0].content, "one\ntwo");
    assert_string_equal(r.msgs[1].content, "");
    api_request_free(&r);
    /* UTF-8 and escapes survive */
    parse_chat_ok("{\"messages\":[{\"role\":\"user\",\"content\":\"caf\\u00e9 \xe2\x82\xac "
                  "\\ud83d\\ude00 \\\"q\\\"\"}]}",
                  &r);
    assert_string_equal(r.msgs[0].content, "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80 \"q\"");
    api_request_free(&r);

    expect_err(1, "{}", "messages", "missing_required_parameter", "'messages' is required");
    expect_err(1, "{\"messages\":null}", "messages", "missing_required_parameter", NULL);
    expect_err(1, "{\"messages\":[]}", "messages", "invalid_value", "at least one");
    expect_err(1, "{\"messages\":{}}", "messages", "invalid_type", NULL);
    expect_err(1, "{\"messages\":[\"hi\"]}", "messages[0]", "invalid_type", NULL);
    expect_err(1, "{\"messages\":[{\"content\":\"x\"}]}", "messages[0].role",
               "missing_required_parameter", NULL);
    expect_err(1, "{\"messages\":[{\"role\":1,\"content\":\"x\"}]}", "messages[0].role",
               "invalid_type", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\"},{\"role\":\"tool\","
                  "\"content\":\"x\"}]}",
               "messages[1].role", "unsupported", "tool");
    expect_err(1, "{\"messages\":[{\"role\":\"function\",\"content\":\"x\"}]}",
               "messages[0].role", "unsupported", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"robot\",\"content\":\"x\"}]}", "messages[0].role",
               "invalid_value", "robot");
    expect_err(1, "{\"messages\":[{\"role\":\"user\"}]}", "messages[0].content",
               "missing_required_parameter", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":null}]}",
               "messages[0].content", "invalid_type", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":5}]}", "messages[0].content",
               "invalid_type", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\",\"text\":"
                  "\"a\"},{\"type\":\"image_url\",\"image_url\":{\"url\":\"x\"}}]}]}",
               "messages[0].content[1]", "unsupported", "image_url");
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"input_audio\"}]}]}",
               "messages[0].content[0]", "unsupported", "input_audio");
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":[{\"type\":\"text\"}]}]}",
               "messages[0].content[0]", "invalid_type", "text");
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":[\"a\"]}]}",
               "messages[0].content[0]", "invalid_type", NULL);
}

static void test_api_bad_json(void **state) {
    (void)state;
    expect_err(1, "{\"messages\": [", "", "invalid_json", "invalid JSON at line 1 column");
    expect_err(1, "{\"a\":1,\n\"b\":}", "", "invalid_json", "invalid JSON at line 2 column");
    expect_err(1, "", "", "invalid_json", NULL);
    expect_err(1, "[1,2]", "", "invalid_type", "must be a JSON object");
    expect_err(1, "42", "", "invalid_type", "must be a JSON object");
    expect_err(1, "\"str\"", "", "invalid_type", NULL);
    expect_err(0, "null", "", "invalid_type", NULL);
    /* invalid UTF-8 (a lone continuation byte, an overlong encoding, a
     * truncated sequence) and \u0000 are refused by jansson */
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\x80z\"}]}", "",
               "invalid_json", "UTF-8");
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xc0\xaf\"}]}", "",
               "invalid_json", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"\xe2\x82\"}]}", "",
               "invalid_json", NULL);
    expect_err(1, "{\"messages\":[{\"role\":\"user\",\"content\":\"a\\u0000b\"}]}", "",
               "invalid_json", NULL);
    /* a body with an embedded NUL byte is not cut short at it */
    api_request r;
    api_error e;
    const char nul_body[] = "{" MSG1 "}\0garbage";
    assert_true(api_parse_chat(nul_body, sizeof(nul_body) - 1, NULL, &r, &e) < 0);
    assert_string_equal(e.code, "invalid_json");
    /* length is honoured: the same bytes without the tail parse */
    assert_int_equal(api_parse_chat(nul_body, strlen(nul_body), NULL, &r, &e), 0);
    api_request_free(&r);
}

static void test_api_deep_nesting(void **state) {
    (void)state;
    size_t depth = 100000;
    char *b = malloc(2 * depth + 64);
    /* jansson on its own refuses it cleanly (its parser has a depth limit) */
    for (size_t i = 0; i < depth; i++) b[i] = '[';
    for (size_t i = 0; i < depth; i++) b[depth + i] = ']';
    json_error_t je;
    json_t *v = json_loadb(b, 2 * depth, 0, &je);
    assert_null(v);
    /* and we refuse it before jansson sees it */
    api_request r;
    api_error e;
    assert_true(api_parse_chat(b, 2 * depth, NULL, &r, &e) < 0);
    assert_string_equal(e.code, "invalid_json");
    assert_non_null(strstr(e.message, "nested deeper than 64"));
    /* deep inside an ignored field of an object, unbalanced */
    int n = sprintf(b, "{" MSG1 ",\"x\":");
    for (size_t i = 0; i < depth; i++) b[n + i] = '{';
    assert_true(api_parse_chat(b, n + depth, NULL, &r, &e) < 0);
    assert_string_equal(e.code, "invalid_json");
    free(b);
    /* brackets inside strings do not count; 60 levels are fine */
    char ok[1024];
    n = sprintf(ok, "{" MSG1 ",\"s\":\"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
                "[[[[[[[[[[[[[[\\\"[[[[\",\"x\":");
    for (int i = 0; i < 60; i++) ok[n++] = '[';
    for (int i = 0; i < 60; i++) ok[n++] = ']';
    ok[n++] = '}';
    ok[n] = 0;
    parse_chat_ok(ok, &r);
    api_request_free(&r);
}

static void test_api_many_messages(void **state) {
    (void)state;
    size_t n = 10000;
    size_t cap = n * 64 + 64;
    char *b = malloc(cap);
    size_t o = (size_t)sprintf(b, "{\"messages\":[");
    for (size_t i = 0; i < n; i++)
        o += (size_t)sprintf(b + o, "%s{\"role\":\"%s\",\"content\":\"m%zu\"}", i ? "," : "",
                             i % 2 ? "assistant" : "user", i);
    o += (size_t)sprintf(b + o, "]}");
    api_request r;
    parse_chat_ok(b, &r);
    assert_int_equal(r.n_msgs, n);
    assert_string_equal(r.msgs[9999].content, "m9999");
    assert_string_equal(r.msgs[9999].role, "assistant");
    api_request_free(&r);
    free(b);
}

static void test_api_completion_prompt(void **state) {
    (void)state;
    api_request r;
    parse_completion_ok("{\"prompt\":\"Once upon\",\"max_tokens\":3,\"logprobs\":2}", &r);
    assert_int_equal(r.kind, API_COMPLETION);
    assert_int_equal(r.n_prompts, 1);
    assert_string_equal(r.prompts[0].text, "Once upon");
    assert_null(r.prompts[0].ids);
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 2);
    api_request_free(&r);
    parse_completion_ok("{\"prompt\":[\"only one\"]}", &r);
    assert_int_equal(r.n_prompts, 1);
    assert_string_equal(r.prompts[0].text, "only one");
    assert_false(r.logprobs);
    api_request_free(&r);
    parse_completion_ok("{\"prompt\":[1,2,30000]}", &r);
    assert_null(r.prompts[0].text);
    assert_int_equal(r.prompts[0].n_ids, 3);
    assert_int_equal(r.prompts[0].ids[2], 30000);
    api_request_free(&r);
    parse_completion_ok("{\"prompt\":[[5,6]],\"logprobs\":true,\"top_logprobs\":4}", &r);
    assert_int_equal(r.prompts[0].n_ids, 2);
    assert_int_equal(r.prompts[0].ids[0], 5);
    assert_int_equal(r.top_logprobs, 4);
    api_request_free(&r);
    parse_completion_ok("{\"prompt\":\"\",\"logprobs\":0}", &r);
    assert_string_equal(r.prompts[0].text, "");
    assert_true(r.logprobs);
    assert_int_equal(r.top_logprobs, 0);
    api_request_free(&r);

    expect_err(0, "{}", "prompt", "missing_required_parameter", NULL);
    expect_err(0, "{\"prompt\":5}", "prompt", "invalid_type", NULL);
    expect_err(0, "{\"prompt\":[]}", "prompt", "invalid_value", NULL);
    /* a batch of prompts: one choice each */
    parse_completion_ok("{\"prompt\":[\"a\",[7,8],\"c\"]}", &r);
    assert_int_equal(r.n_prompts, 3);
    assert_string_equal(r.prompts[0].text, "a");
    assert_int_equal(r.prompts[1].n_ids, 2);
    assert_int_equal(r.prompts[1].ids[1], 8);
    assert_string_equal(r.prompts[2].text, "c");
    api_request_free(&r);
    expect_err(0, "{\"prompt\":[\"a\",5]}", "prompt[1]", "invalid_type", NULL);
    expect_err(0, "{\"prompt\":[[1],[]]}", "prompt[1]", "invalid_value", NULL);
    {
        char big[1024] = "{\"prompt\":[";
        for (int i = 0; i < API_MAX_PROMPTS + 1; i++) strcat(big, i ? ",\"x\"" : "\"x\"");
        strcat(big, "]}");
        expect_err(0, big, "prompt", "invalid_value", "at most");
    }
    expect_err(0, "{\"prompt\":[1,\"a\"]}", "prompt", "invalid_type", "prompt[1]");
    expect_err(0, "{\"prompt\":[1,-2]}", "prompt", "invalid_value", NULL);
    expect_err(0, "{\"prompt\":[[]]}", "prompt[0]", "invalid_value", NULL);
    expect_err(0, "{\"prompt\":[true]}", "prompt[0]", "invalid_type", NULL);
    expect_err(0, "{\"prompt\":\"x\",\"logprobs\":6}", "logprobs", "invalid_value", NULL);
    expect_err(0, "{\"prompt\":\"x\",\"logprobs\":\"2\"}", "logprobs", "invalid_type", NULL);
    expect_err(0, "{\"prompt\":\"x\",\"n\":3}", "n", "invalid_value", "n must be 1");
    expect_err(0, "{\"prompt\":\"x\",\"temperature\":9}", "temperature", "invalid_value", NULL);
}

/* Parse an error JSON and check its exact shape. */
static void check_error_json(const api_error *e, const char *type, const char *param,
                             const char *code, const char *frag) {
    char *s = api_error_json(e);
    assert_non_null(s);
    json_error_t je;
    json_t *root = json_loads(s, 0, &je);
    assert_non_null(root);
    assert_int_equal(json_object_size(root), 1);
    json_t *err = json_object_get(root, "error");
    assert_true(json_is_object(err));
    assert_int_equal(json_object_size(err), 4);
    assert_string_equal(json_string_value(json_object_get(err, "type")), type);
    json_t *p = json_object_get(err, "param"), *c = json_object_get(err, "code");
    if (param) assert_string_equal(json_string_value(p), param);
    else assert_true(json_is_null(p));
    if (code) assert_string_equal(json_string_value(c), code);
    else assert_true(json_is_null(c));
    const char *msg = json_string_value(json_object_get(err, "message"));
    assert_non_null(msg);
    if (frag && !strstr(msg, frag)) fail_msg("message '%s' lacks '%s'", msg, frag);
    json_decref(root);
    free(s);
}

static void test_api_errors(void **state) {
    (void)state;
    api_error e;
    api_request r;
    const char *b = "{" MSG1 ",\"temperature\":3}";
    assert_int_equal(api_parse_chat(b, strlen(b), NULL, &r, &e), KP_EINVAL);
    check_error_json(&e, "invalid_request_error", "temperature", "invalid_value",
                     "'temperature' must be a number between 0 and 2");
    b = "{oops";
    assert_true(api_parse_chat(b, strlen(b), NULL, &r, &e) < 0);
    check_error_json(&e, "invalid_request_error", NULL, "invalid_json", "invalid JSON at line 1");

    api_error_bad_key(&e);
    assert_int_equal(e.http_status, 401);
    check_error_json(&e, "authentication_error", NULL, "invalid_api_key", "API key");
    api_error_unknown_route(&e, "POST", "/v1/nope");
    assert_int_equal(e.http_status, 404);
    check_error_json(&e, "not_found_error", NULL, "unknown_url", "POST /v1/nope");
    api_error_unknown_session(&e, "abc");
    assert_int_equal(e.http_status, 404);
    check_error_json(&e, "not_found_error", "session_id", "session_not_found", "'abc'");
    api_error_body_too_large(&e, 10485760);
    assert_int_equal(e.http_status, 413);
    check_error_json(&e, "invalid_request_error", NULL, "request_too_large", "10485760 bytes");
    api_error_queue_full(&e, 64);
    assert_int_equal(e.http_status, 429);
    check_error_json(&e, "rate_limit_error", NULL, "queue_full", "64 waiting");
    api_error_not_ready(&e, "the model is loading");
    assert_int_equal(e.http_status, 503);
    check_error_json(&e, "server_error", NULL, "not_ready", "the model is loading");
    api_error_server(&e, "disk full");
    assert_int_equal(e.http_status, 500);
    check_error_json(&e, "server_error", NULL, NULL, "disk full");
    api_error_context_overflow(&e, API_CHAT, 2048, 2000, 100);
    assert_int_equal(e.http_status, 400);
    check_error_json(&e, "invalid_request_error", "messages", "context_length_exceeded",
                     "This model's maximum context length is 2048 tokens. However, your "
                     "messages resulted in 2100 tokens (2000 in the messages, 100 in the "
                     "completion).");
    api_error_context_overflow(&e, API_COMPLETION, 512, 600, 16);
    check_error_json(&e, "invalid_request_error", "prompt", "context_length_exceeded",
                     "your prompt resulted in 616 tokens (600 in the prompt, 16 in the");
    /* quotes and newlines in messages are escaped properly */
    api_error_set(&e, 400, "invalid_request_error", NULL, "x", "bad \"q\"\nline");
    check_error_json(&e, "invalid_request_error", "x", NULL, "bad \"q\"\nline");
}

static json_t *load(char *s) {
    assert_non_null(s);
    json_error_t je;
    json_t *v = json_loads(s, 0, &je);
    if (!v) fail_msg("not JSON (%s): %s", je.text, s);
    free(s);
    return v;
}

#define JS(o, k) json_string_value(json_object_get((o), (k)))
#define JI(o, k) json_integer_value(json_object_get((o), (k)))

static void check_usage(json_t *u, int p, int c, int cached) {
    assert_true(json_is_object(u));
    assert_int_equal(JI(u, "prompt_tokens"), p);
    assert_int_equal(JI(u, "completion_tokens"), c);
    assert_int_equal(JI(u, "total_tokens"), p + c);
    assert_int_equal(JI(json_object_get(u, "prompt_tokens_details"), "cached_tokens"), cached);
}

static void test_api_chat_response(void **state) {
    (void)state;
    char id[64];
    api_make_id(id, sizeof(id), "chatcmpl-", 0x0123456789abcdefull, 0xfedcba9876543210ull);
    assert_string_equal(id, "chatcmpl-0123456789abcdeffedcba9876543210");
    api_logprob top0[2] = {{"Hi", 2, -0.1f}, {"Hey", 3, -2.5f}};
    api_logprob top1[1] = {{"\xe2\x82", 2, -INFINITY}};
    api_token_logprob lps[2] = {{{"Hi", 2, -0.1f}, top0, 2}, {{"\xe2\x82", 2, -1.0f}, top1, 1}};
    api_result res = {.id = id, .created = 1700000000, .model = "tiny", .session_id = "s1",
                      .text = "Hi \"you\"\xff", .text_len = 9, .finish = API_FINISH_LENGTH,
                      .has_logprobs = true, .logprobs = lps, .n_logprobs = 2,
                      .prompt_tokens = 12, .completion_tokens = 2, .cached_tokens = 8};
    json_t *o = load(api_chat_response_json(&res));
    assert_string_equal(JS(o, "id"), id);
    assert_string_equal(JS(o, "object"), "chat.completion");
    assert_int_equal(JI(o, "created"), 1700000000);
    assert_string_equal(JS(o, "model"), "tiny");
    assert_string_equal(JS(o, "session_id"), "s1");
    json_t *choices = json_object_get(o, "choices");
    assert_int_equal(json_array_size(choices), 1);
    json_t *c0 = json_array_get(choices, 0);
    assert_int_equal(JI(c0, "index"), 0);
    assert_string_equal(JS(c0, "finish_reason"), "length");
    json_t *msg = json_object_get(c0, "message");
    assert_string_equal(JS(msg, "role"), "assistant");
    assert_string_equal(JS(msg, "content"), "Hi \"you\"\xef\xbf\xbd"); /* bad byte -> U+FFFD */
    json_t *content = json_object_get(json_object_get(c0, "logprobs"), "content");
    assert_int_equal(json_array_size(content), 2);
    json_t *t0 = json_array_get(content, 0);
    assert_string_equal(JS(t0, "token"), "Hi");
    assert_true(fabs(json_real_value(json_object_get(t0, "logprob")) + 0.1) < 1e-6);
    json_t *bytes = json_object_get(t0, "bytes");
    assert_int_equal(json_array_size(bytes), 2);
    assert_int_equal(json_integer_value(json_array_get(bytes, 0)), 'H');
    json_t *tl = json_object_get(t0, "top_logprobs");
    assert_int_equal(json_array_size(tl), 2);
    assert_string_equal(JS(json_array_get(tl, 1), "token"), "Hey");
    assert_non_null(json_object_get(json_array_get(tl, 1), "bytes"));
    json_t *t1 = json_array_get(content, 1);
    /* a partial character: token text sanitised, bytes exact */
    assert_string_equal(JS(t1, "token"), "\xef\xbf\xbd\xef\xbf\xbd");
    assert_int_equal(json_integer_value(json_array_get(json_object_get(t1, "bytes"), 0)), 0xe2);
    json_t *t1top = json_array_get(json_object_get(t1, "top_logprobs"), 0);
    assert_true(json_real_value(json_object_get(t1top, "logprob")) == -9999.0); /* -inf */
    check_usage(json_object_get(o, "usage"), 12, 2, 8);
    json_decref(o);

    /* no logprobs -> null; finish stop; no session -> no field */
    api_result r2 = {.id = "chatcmpl-x", .created = 1, .model = NULL, .text = "ok", .text_len = 2,
                     .finish = API_FINISH_STOP};
    o = load(api_chat_response_json(&r2));
    c0 = json_array_get(json_object_get(o, "choices"), 0);
    assert_true(json_is_null(json_object_get(c0, "logprobs")));
    assert_string_equal(JS(c0, "finish_reason"), "stop");
    assert_null(json_object_get(o, "session_id"));
    assert_string_equal(JS(o, "model"), "");
    json_decref(o);
}

static void test_api_chat_chunks(void **state) {
    (void)state;
    api_result r = {.id = "chatcmpl-1", .created = 5, .model = "m", .session_id = "s",
                    .text = "Hel", .text_len = 3, .finish = API_FINISH_STOP,
                    .prompt_tokens = 4, .completion_tokens = 3, .include_usage = true};
    json_t *o = load(api_chat_chunk_json(&r, API_CHUNK_ROLE));
    assert_string_equal(JS(o, "object"), "chat.completion.chunk");
    assert_string_equal(JS(o, "id"), "chatcmpl-1");
    assert_string_equal(JS(o, "session_id"), "s");
    assert_true(json_is_null(json_object_get(o, "usage")));
    json_t *c0 = json_array_get(json_object_get(o, "choices"), 0);
    json_t *d = json_object_get(c0, "delta");
    assert_string_equal(JS(d, "role"), "assistant");
    assert_string_equal(JS(d, "content"), "");
    assert_true(json_is_null(json_object_get(c0, "finish_reason")));
    json_decref(o);

    o = load(api_chat_chunk_json(&r, API_CHUNK_CONTENT));
    c0 = json_array_get(json_object_get(o, "choices"), 0);
    d = json_object_get(c0, "delta");
    assert_null(json_object_get(d, "role"));
    assert_string_equal(JS(d, "content"), "Hel");
    assert_true(json_is_null(json_object_get(c0, "finish_reason")));
    assert_true(json_is_null(json_object_get(c0, "logprobs")));
    json_decref(o);

    o = load(api_chat_chunk_json(&r, API_CHUNK_FINISH));
    c0 = json_array_get(json_object_get(o, "choices"), 0);
    assert_int_equal(json_object_size(json_object_get(c0, "delta")), 0);
    assert_string_equal(JS(c0, "finish_reason"), "stop");
    json_decref(o);

    o = load(api_chat_chunk_json(&r, API_CHUNK_USAGE));
    assert_int_equal(json_array_size(json_object_get(o, "choices")), 0);
    check_usage(json_object_get(o, "usage"), 4, 3, 0);
    json_decref(o);

    /* without include_usage the other chunks carry no usage key */
    r.include_usage = false;
    o = load(api_chat_chunk_json(&r, API_CHUNK_CONTENT));
    assert_null(json_object_get(o, "usage"));
    json_decref(o);

    /* SSE framing */
    char *ev = api_sse_event("{\"a\":1}");
    assert_string_equal(ev, "data: {\"a\":1}\n\n");
    free(ev);
    assert_string_equal(API_SSE_DONE, "data: [DONE]\n\n");
}

static void test_api_completion_response(void **state) {
    (void)state;
    api_logprob top[2] = {{" upon", 5, -0.2f}, {" a", 2, -1.9f}};
    api_token_logprob lps[2] = {{{" upon", 5, -0.2f}, top, 2}, {{" a", 2, -0.5f}, top + 1, 1}};
    api_result r = {.id = "cmpl-1", .created = 9, .model = "m", .text = " upon a",
                    .text_len = 7, .finish = API_FINISH_LENGTH, .has_logprobs = true,
                    .logprobs = lps, .n_logprobs = 2, .prompt_tokens = 2,
                    .completion_tokens = 2, .cached_tokens = 1};
    json_t *o = load(api_completion_response_json(&r));
    assert_string_equal(JS(o, "object"), "text_completion");
    json_t *c0 = json_array_get(json_object_get(o, "choices"), 0);
    assert_string_equal(JS(c0, "text"), " upon a");
    assert_int_equal(JI(c0, "index"), 0);
    assert_string_equal(JS(c0, "finish_reason"), "length");
    json_t *lp = json_object_get(c0, "logprobs");
    assert_string_equal(json_string_value(json_array_get(json_object_get(lp, "tokens"), 1)),
                        " a");
    assert_true(fabs(json_real_value(json_array_get(json_object_get(lp, "token_logprobs"), 0)) +
                     0.2) < 1e-6);
    json_t *top0 = json_array_get(json_object_get(lp, "top_logprobs"), 0);
    assert_int_equal(json_object_size(top0), 2);
    assert_true(fabs(json_real_value(json_object_get(top0, " a")) + 1.9) < 1e-6);
    assert_int_equal(json_integer_value(json_array_get(json_object_get(lp, "text_offset"), 1)),
                     5);
    check_usage(json_object_get(o, "usage"), 2, 2, 1);
    json_decref(o);

    /* text_offset counts characters, from where the stream's earlier chunks
     * left off: "é" is 2 bytes, 1 character; a token cut inside a character
     * (its first byte, then the rest) counts it once */
    api_token_logprob u8[4] = {{{"\xc3\xa9", 2, -0.1f}, top, 0}, {{"x", 1, -0.1f}, top, 0},
                               {{"\xe2\x82", 2, -0.1f}, top, 0}, {{"\xac!", 2, -0.1f}, top, 0}};
    api_result ru = {.id = "cmpl-2", .text = "\xc3\xa9x\xe2\x82\xac!", .text_len = 7, .has_logprobs = true,
                     .logprobs = u8, .n_logprobs = 4, .text_offset0 = 10};
    o = load(api_completion_chunk_json(&ru, API_CHUNK_CONTENT));
    json_t *offs = json_object_get(json_object_get(json_array_get(json_object_get(o, "choices"), 0), "logprobs"),
                                   "text_offset");
    const int want[4] = {10, 11, 12, 13};
    for (int i = 0; i < 4; i++) assert_int_equal(json_integer_value(json_array_get(offs, (size_t)i)), want[i]);
    json_decref(o);
    assert_int_equal(api_utf8_chars("\xc3\xa9x\xe2\x82\xac!", 7), 4);

    r.has_logprobs = false;
    o = load(api_completion_chunk_json(&r, API_CHUNK_CONTENT));
    assert_string_equal(JS(o, "object"), "text_completion");
    c0 = json_array_get(json_object_get(o, "choices"), 0);
    assert_string_equal(JS(c0, "text"), " upon a");
    assert_true(json_is_null(json_object_get(c0, "finish_reason")));
    json_decref(o);
    o = load(api_completion_chunk_json(&r, API_CHUNK_FINISH));
    c0 = json_array_get(json_object_get(o, "choices"), 0);
    assert_string_equal(JS(c0, "text"), "");
    assert_string_equal(JS(c0, "finish_reason"), "length");
    json_decref(o);
    o = load(api_completion_chunk_json(&r, API_CHUNK_USAGE));
    assert_int_equal(json_array_size(json_object_get(o, "choices")), 0);
    check_usage(json_object_get(o, "usage"), 2, 2, 1);
    json_decref(o);
}

static void test_api_models_and_utf8(void **state) {
    (void)state;
    json_t *o = load(api_models_json("stories15M", 1700000001));
    assert_string_equal(JS(o, "object"), "list");
    json_t *m = json_array_get(json_object_get(o, "data"), 0);
    assert_int_equal(json_array_size(json_object_get(o, "data")), 1);
    assert_string_equal(JS(m, "id"), "stories15M");
    assert_string_equal(JS(m, "object"), "model");
    assert_int_equal(JI(m, "created"), 1700000001);
    assert_string_equal(JS(m, "owned_by"), "kvpark");
    json_decref(o);

    size_t n;
    char *s = api_utf8_sanitize("ok\xc3\xa9", 4, &n);
    assert_string_equal(s, "ok\xc3\xa9");
    assert_int_equal(n, 4);
    free(s);
    /* overlong, surrogate, > U+10FFFF, truncated: each bad byte -> U+FFFD */
    s = api_utf8_sanitize("\xc0\xaf|\xed\xa0\x80|\xf4\x90\x80\x80|\xe2\x82", 15, &n);
    const char *want = "\xef\xbf\xbd\xef\xbf\xbd|\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|"
                       "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd|\xef\xbf\xbd\xef\xbf\xbd";
    assert_string_equal(s, want);
    free(s);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_api_chat_defaults),
        cmocka_unit_test(test_api_chat_all_fields),
        cmocka_unit_test(test_api_chat_invalid_fields),
        cmocka_unit_test(test_api_limits),
        cmocka_unit_test(test_api_messages),
        cmocka_unit_test(test_api_bad_json),
        cmocka_unit_test(test_api_deep_nesting),
        cmocka_unit_test(test_api_many_messages),
        cmocka_unit_test(test_api_completion_prompt),
        cmocka_unit_test(test_api_errors),
        cmocka_unit_test(test_api_chat_response),
        cmocka_unit_test(test_api_chat_chunks),
        cmocka_unit_test(test_api_response_format),
        cmocka_unit_test(test_api_completion_response),
        cmocka_unit_test(test_api_models_and_utf8),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
