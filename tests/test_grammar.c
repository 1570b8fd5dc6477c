/*
 * test_grammar.c — the grammar engine (engine/grammar.h): schemas accept and
 * reject the right byte strings, every unsupported keyword is a clear error,
 * the token mask equals a brute-force check of every token on the real
 * vocabularies, and random-weight models sampling at temperature 1 through
 * the scheduler under a grammar always write JSON that parses and validates.
 */
#include <math.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#include "bench/bench_grammar.h"
#include "engine/grammar.h"
#include "engine/scheduler.h"
#include "tests/testutil.h"

static gram *compile_ok(const char *schema) {
    gram *g = NULL;
    kp_err err = {0};
    int rc = schema ? gram_compile(&g, schema, strlen(schema), &err) : gram_compile_json_object(&g, &err);
    if (rc) fail_msg("schema %s: %s", schema, err.msg);
    return g;
}

/* 1 if the whole string is accepted and forms a complete value. */
static int accepts(const gram *g, const char *text) {
    gram_state *s = NULL;
    kp_err err = {0};
    assert_int_equal(gram_state_new(&s, g, NULL, &err), 0);
    int ok = gram_state_feed(s, text, strlen(text)) == 0 && gram_state_accepting(s);
    gram_state_free(s);
    return ok;
}

typedef struct acase {
    const char *schema; /* NULL: json_object */
    const char *yes[8];
    const char *no[10];
} acase;

static const acase cases[] = {
    {"{\"type\":\"string\"}",
     {"\"\"", "\"abc\"", "\"a\\\"b\\\\c\\n\\u00e9\"", "\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\"", " \"x\""},
     {"", "\"abc", "abc", "\"a\nb\"", "\"\\x\"", "\"\xc0\xaf\"", "\"\xed\xa0\x80\"", "\"\\ud800\"", "\"\\u0000\"",
      "\"a\" "}},
    {"{\"type\":\"string\",\"minLength\":2,\"maxLength\":3}",
     {"\"ab\"", "\"abc\"", "\"\xc3\xa9\xc3\xa9\"", "\"\\n\\t\""},
     {"\"a\"", "\"abcd\"", "\"\xc3\xa9\""}},
    {"{\"type\":\"integer\"}", {"0", "-7", "123456789", "-0"}, {"01", "1.5", "1e3", "-", "+1", "1234567890123456"}},
    {"{\"type\":\"number\"}", {"0", "-1.25", "3e10", "2.5E-3", "0.0"}, {".5", "1.", "1e", "--1", "00", "1e100"}},
    {"{\"type\":\"boolean\"}", {"true", "false"}, {"tru", "null", "truee", "1"}},
    {"{\"type\":\"null\"}", {"null"}, {"nul", "false"}},
    {"{\"type\":[\"string\",\"null\"]}", {"null", "\"x\""}, {"1", "true"}},
    {"{\"enum\":[\"red\",\"green\",1,12,null]}", {"\"red\"", "\"green\"", "1", "12", "null"},
     {"\"blue\"", "2", "123", "\"re\""}},
    {"{\"const\":{\"a\":[1,2]}}", {"{\"a\":[1,2]}"}, {"{\"a\":[1]}", "{}"}},
    {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":\"integer\"}},"
     "\"required\":[\"name\"],\"additionalProperties\":false}",
     {"{\"name\":\"a\"}", "{\"name\":\"a\",\"age\":3}", "{\"age\":3,\"name\":\"a\"}", "{ \"name\" : \"a\" }"},
     {"{}", "{\"age\":3}", "{\"name\":\"a\",\"x\":1}", "{\"name\":\"a\",\"name\":\"b\"}", "{\"name\":1}",
      "{\"name\":\"a\",}", "{\"name\":\"a\"     }"}},
    {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"integer\"}},\"additionalProperties\":{\"type\":"
     "\"boolean\"}}",
     {"{}", "{\"a\":1,\"b\":true}", "{\"zz\":false}", "{\"ab\":true}", "{\"\":false}"},
     {"{\"b\":1}", "{\"a\":true}", "{\"a\":1,\"a\":2}", "{\"\\u0061\":true}"}},
    {"{\"type\":\"array\",\"items\":{\"type\":\"integer\"},\"minItems\":1,\"maxItems\":3}",
     {"[1]", "[1,2,3]", "[ 1 , 2 ]"}, {"[]", "[1,2,3,4]", "[1,]", "[\"a\"]"}},
    {"{\"type\":\"array\",\"prefixItems\":[{\"type\":\"string\"},{\"type\":\"integer\"}],\"items\":false}",
     {"[\"a\",1]", "[\"a\"]", "[]"}, {"[1]", "[\"a\",1,2]"}},
    {"{\"anyOf\":[{\"type\":\"string\",\"maxLength\":2},{\"type\":\"string\",\"format\":\"date\"}]}",
     {"\"ab\"", "\"2024-02-29\""}, {"\"abc\"", "\"2023-02-29\""}},
    {"{\"type\":\"string\",\"format\":\"date\"}", {"\"2024-12-31\"", "\"2000-02-29\"", "\"2023-04-30\""},
     {"\"2024-13-01\"", "\"2024-04-31\"", "\"1900-02-29\"", "\"2024-00-10\"", "\"2024-1-1\""}},
    {"{\"type\":\"string\",\"format\":\"date-time\"}", {"\"2024-12-31T23:59:59Z\"", "\"2024-01-01T00:00:00+05:30\""},
     {"\"2024-12-31T24:00:00Z\"", "\"2024-12-31 23:59:59Z\"", "\"2024-12-31T23:59:59\""}},
    {"{\"type\":\"string\",\"format\":\"uuid\"}", {"\"123e4567-e89b-12d3-a456-426614174000\""},
     {"\"123e4567e89b12d3a456426614174000\"", "\"123e4567-e89b-12d3-a456-42661417400g\""}},
    {"{\"$defs\":{\"node\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"next\":{\"anyOf\":"
     "[{\"$ref\":\"#/$defs/node\"},{\"type\":\"null\"}]}},\"required\":[\"v\",\"next\"]}},\"$ref\":\"#/$defs/node\"}",
     {"{\"v\":1,\"next\":null}", "{\"v\":1,\"next\":{\"v\":2,\"next\":null}}"}, {"{\"v\":1}", "{\"v\":1,\"next\":3}"}},
    {"{\"definitions\":{\"x\":{\"type\":\"boolean\"}},\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/x\"}}",
     {"[true,false]"}, {"[1]"}},
    {"{\"$defs\":{\"a\":{\"$ref\":\"#/$defs/b\"},\"b\":{\"anyOf\":[{\"$ref\":\"#/$defs/a\"},{\"type\":"
     "\"null\"}]}},\"$ref\":\"#/$defs/a\"}",
     {"null"}, {"1", "nul"}},
    {"{}", {"1", "\"a\"", "{\"a\":[1,{\"b\":null}]}", "[]"}, {"{a:1}", "[1 2]"}},
    {NULL, {"{}", "{\"a\":{\"b\":[1,2.5,\"x\",true,null]}}", "\n{\"k\": \"v\"}"}, {"[]", "1", "{\"a\"}", "{\"a\":}"}},
};

static void test_accept_reject(void **state) {
    (void)state;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        gram *g = compile_ok(cases[i].schema);
        for (int k = 0; k < 8 && cases[i].yes[k]; k++)
            if (!accepts(g, cases[i].yes[k]))
                fail_msg("schema %s should accept %s", cases[i].schema ? cases[i].schema : "json_object",
                         cases[i].yes[k]);
        for (int k = 0; k < 10 && cases[i].no[k]; k++)
            if (accepts(g, cases[i].no[k]))
                fail_msg("schema %s should reject %s", cases[i].schema ? cases[i].schema : "json_object",
                         cases[i].no[k]);
        gram_free(g);
    }
}

/* complete / accepting: a closed object is complete; a number is accepting
 * but not complete; a prefix is neither. A rejected byte leaves the state. */
static void test_complete(void **state) {
    (void)state;
    gram *g = compile_ok("{\"type\":\"object\",\"properties\":{\"n\":{\"type\":\"number\"}},\"required\":[\"n\"]}");
    gram_state *s = NULL;
    assert_int_equal(gram_state_new(&s, g, NULL, NULL), 0);
    assert_int_equal(gram_state_feed(s, "{\"n\":12", 7), 0);
    assert_false(gram_state_accepting(s));
    assert_int_equal(gram_state_feed(s, "x", 1), KP_EINVAL);
    assert_int_equal(gram_state_feed(s, "}", 1), 0);
    assert_true(gram_state_accepting(s));
    assert_true(gram_state_complete(s));
    gram_state_free(s);
    gram_free(g);
    g = compile_ok("{\"type\":\"integer\"}");
    assert_int_equal(gram_state_new(&s, g, NULL, NULL), 0);
    assert_int_equal(gram_state_feed(s, "42", 2), 0);
    assert_true(gram_state_accepting(s));
    assert_false(gram_state_complete(s));
    gram_state_free(s);
    gram_free(g);
}

static void test_errors(void **state) {
    (void)state;
    static const struct {
        const char *schema;
        int code;
        const char *needle;
    } e[] = {
        {"{\"type\":\"string\",\"pattern\":\"a+\"}", KP_EUNSUP, "'pattern' at /"},
        {"{\"type\":\"object\",\"properties\":{\"a\":{\"type\":\"number\",\"minimum\":0}}}", KP_EUNSUP,
         "'minimum' at /properties/a"},
        {"{\"allOf\":[{}]}", KP_EUNSUP, "'allOf'"},
        {"{\"not\":{}}", KP_EUNSUP, "'not'"},
        {"{\"if\":{}}", KP_EUNSUP, "'if'"},
        {"{\"type\":\"object\",\"patternProperties\":{}}", KP_EUNSUP, "'patternProperties'"},
        {"{\"type\":\"array\",\"uniqueItems\":true}", KP_EUNSUP, "'uniqueItems'"},
        {"{\"type\":\"array\",\"contains\":{}}", KP_EUNSUP, "'contains'"},
        {"{\"type\":\"number\",\"multipleOf\":2}", KP_EUNSUP, "'multipleOf'"},
        {"{\"type\":\"string\",\"format\":\"email\"}", KP_EUNSUP, "'format' value 'email'"},
        {"{\"type\":\"array\",\"items\":[{}]}", KP_EUNSUP, "'items' as an array"},
        {"{\"$ref\":\"http://x/y\"}", KP_EINVAL, "'$ref'"},
        {"{\"$ref\":\"#/$defs/missing\"}", KP_EINVAL, "does not resolve"},
        {"{\"type\":\"strang\"}", KP_EINVAL, "'type'"},
        {"{\"enum\":[]}", KP_EINVAL, "'enum'"},
        {"{\"type\":\"string\",\"enum\":[1,2]}", KP_EINVAL, "'enum'"},
        {"{\"type\":\"array\",\"minItems\":3,\"maxItems\":2}", KP_EINVAL, "'minItems'"},
        {"{\"type\":\"string\",\"minLength\":-1}", KP_EINVAL, "'minLength'"},
        {"{\"type\":\"object\",\"properties\":{},\"required\":[\"x\"]}", KP_EUNSUP, "'required'"},
        {"{\"anyOf\":[]}", KP_EINVAL, "'anyOf'"},
        {"{\"$ref\":\"#\",\"type\":\"string\"}", KP_EUNSUP, "next to '$ref'"},
        {"false", KP_EINVAL, "'false'"},
        {"{\"type\":", KP_EINVAL, "not valid JSON"},
        {"[1]", KP_EINVAL, "must be an object"},
    };
    /* limits: a long enum value, too many anyOf schemas, too many properties */
    char *big = malloc(20000);
    snprintf(big, 20000, "{\"enum\":[\"%05000d\"]}", 1);
    gram *g0 = NULL;
    kp_err e0 = {0};
    assert_int_equal(gram_compile(&g0, big, strlen(big), &e0), KP_EUNSUP);
    assert_non_null(strstr(e0.msg, "'enum'"));
    size_t o = (size_t)snprintf(big, 20000, "{\"anyOf\":[");
    for (int i = 0; i < 65; i++) o += (size_t)snprintf(big + o, 20000 - o, "%s{}", i ? "," : "");
    snprintf(big + o, 20000 - o, "]}");
    assert_int_equal(gram_compile(&g0, big, strlen(big), &e0), KP_EUNSUP);
    assert_non_null(strstr(e0.msg, "at most 64"));
    o = (size_t)snprintf(big, 20000, "{\"properties\":{");
    for (int i = 0; i < 65; i++) o += (size_t)snprintf(big + o, 20000 - o, "%s\"p%d\":{}", i ? "," : "", i);
    snprintf(big + o, 20000 - o, "}}");
    assert_int_equal(gram_compile(&g0, big, strlen(big), &e0), KP_EUNSUP);
    assert_non_null(strstr(e0.msg, "'properties'"));
    free(big);
    for (size_t i = 0; i < sizeof e / sizeof e[0]; i++) {
        gram *g = NULL;
        kp_err err = {0};
        int rc = gram_compile(&g, e[i].schema, strlen(e[i].schema), &err);
        if (rc != e[i].code || !strstr(err.msg, e[i].needle))
            fail_msg("schema %s: rc %d msg '%s' (want %d and '%s')", e[i].schema, rc, err.msg, e[i].code,
                     e[i].needle);
        assert_null(g);
    }
}

/* ---- masks against brute force ---- */

static tok_vocab *load_vocab(const char *rel, gguf_file **gf) {
    char *p = tu_shared_path(rel);
    kp_err err = {0};
    tok_vocab *v = NULL;
    if (gguf_open(gf, p, &err) || tok_load(&v, *gf, &err)) fail_msg("%s: %s", rel, err.msg);
    free(p);
    return v;
}

static void check_masks(const char *model_rel) {
    gguf_file *gf = NULL;
    tok_vocab *v = load_vocab(model_rel, &gf);
    gram_vocab *gv = NULL;
    kp_err err = {0};
    assert_int_equal(gram_vocab_new(&gv, v, &err), 0);
    int32_t n = tok_n_vocab(v);
    uint32_t *mask = calloc((size_t)(n + 31) / 32, sizeof(uint32_t));
    static const struct {
        const char *schema;
        const char *prefix;
    } st[] = {
        {NULL, ""},
        {NULL, "{\"ab"},
        {NULL, "{\"a\":"},
        {NULL, "{\"a\":[1,"},
        {NULL, "{\"a\":\"x\\"},
        {NULL, "{\"a\":\"\xc3"},
        {NULL, "{\"a\":-1.5"},
        {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":4},\"id\":{\"type\":"
         "\"integer\"}},\"required\":[\"name\",\"id\"]}", "{\"name\":\"ab"},
        {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"id\":{\"type\":\"integer\"}},"
         "\"required\":[\"name\",\"id\"]}", "{"},
        {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"id\":{\"type\":\"integer\"}},"
         "\"required\":[\"name\",\"id\"]}", "{\"id\":3,"},
        {"{\"type\":\"integer\"}", "12"},
        {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"integer\"},\"nap\":{}},"
         "\"additionalProperties\":{\"type\":\"string\"}}", "{\"na"},
        {"{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"integer\"},\"nap\":{}},"
         "\"additionalProperties\":{\"type\":\"string\"}}", "{\"x"},
        {"{\"enum\":[\"alpha\",\"beta\",\"alphabet\"]}", "\"alpha"},
        {"{\"type\":\"string\",\"format\":\"date\"}", "\"2024-0"},
    };
    for (size_t c = 0; c < sizeof st / sizeof st[0]; c++) {
        gram *g = compile_ok(st[c].schema);
        gram_state *s = NULL;
        assert_int_equal(gram_state_new(&s, g, gv, &err), 0);
        assert_int_equal(gram_state_feed(s, st[c].prefix, strlen(st[c].prefix)), 0);
        int cnt = gram_mask(s, mask);
        int brute = 0;
        for (int32_t id = 0; id < n; id++) {
            gram_state *b = NULL;
            assert_int_equal(gram_state_new(&b, g, gv, &err), 0);
            assert_int_equal(gram_state_feed(b, st[c].prefix, strlen(st[c].prefix)), 0);
            bool ok = gram_state_accept_token(b, id) == 0;
            gram_state_free(b);
            bool m = (mask[id / 32] >> (id % 32)) & 1;
            if (ok != m) {
                char piece[256];
                int l = tok_piece(v, id, false, piece, sizeof piece);
                fail_msg("%s: schema %s after '%s': token %d '%.*s' brute %d mask %d", model_rel,
                         st[c].schema ? st[c].schema : "json_object", st[c].prefix, id, l > 0 ? l : 0, piece, ok, m);
            }
            brute += ok;
        }
        assert_int_equal(cnt, brute);
        assert_true(cnt > 0);
        gram_state_free(s);
        gram_free(g);
    }
    free(mask);
    gram_vocab_free(gv);
    tok_free(v);
    gguf_close(gf);
}

static void test_mask_stories(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    check_masks("models/stories260K.gguf");
}

static void test_mask_gpt2(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/tiny-gpt2.gguf");
    check_masks("models/tiny-gpt2.gguf");
}

/* ---- a small validator for the subset ---- */

static json_t *g_root;

static size_t utf8_len(const char *s) {
    size_t n = 0;
    for (; *s; s++)
        if (((unsigned char)*s & 0xC0) != 0x80) n++;
    return n;
}

static bool valid(json_t *x, json_t *sc);

static bool valid_type(json_t *x, const char *t) {
    if (!strcmp(t, "object")) return json_is_object(x);
    if (!strcmp(t, "array")) return json_is_array(x);
    if (!strcmp(t, "string")) return json_is_string(x);
    if (!strcmp(t, "number")) return json_is_number(x);
    if (!strcmp(t, "integer")) return json_is_integer(x);
    if (!strcmp(t, "boolean")) return json_is_boolean(x);
    if (!strcmp(t, "null")) return json_is_null(x);
    return false;
}

static bool valid(json_t *x, json_t *sc) {
    if (json_is_true(sc)) return true;
    json_t *k;
    if ((k = json_object_get(sc, "$ref"))) {
        const char *r = json_string_value(k);
        json_t *t = g_root;
        if (strcmp(r, "#")) {
            const char *name = strrchr(r, '/') + 1;
            t = json_object_get(json_object_get(g_root, strstr(r, "$defs") ? "$defs" : "definitions"), name);
        }
        return valid(x, t);
    }
    if ((k = json_object_get(sc, "anyOf")) || (k = json_object_get(sc, "oneOf"))) {
        size_t i;
        json_t *a;
        json_array_foreach(k, i, a) if (valid(x, a)) return true;
        return false;
    }
    if ((k = json_object_get(sc, "const")) && !json_equal(x, k)) return false;
    if ((k = json_object_get(sc, "enum"))) {
        bool in = false;
        size_t i;
        json_t *a;
        json_array_foreach(k, i, a) if (json_equal(x, a)) in = true;
        if (!in) return false;
    }
    if ((k = json_object_get(sc, "type"))) {
        if (json_is_string(k) && !valid_type(x, json_string_value(k))) return false;
        if (json_is_array(k)) {
            bool any = false;
            size_t i;
            json_t *a;
            json_array_foreach(k, i, a) if (valid_type(x, json_string_value(a))) any = true;
            if (!any) return false;
        }
    }
    if (json_is_string(x)) {
        size_t l = utf8_len(json_string_value(x));
        if ((k = json_object_get(sc, "minLength")) && l < (size_t)json_integer_value(k)) return false;
        if ((k = json_object_get(sc, "maxLength")) && l > (size_t)json_integer_value(k)) return false;
        if ((k = json_object_get(sc, "format"))) {
            const char *f = json_string_value(k), *s = json_string_value(x);
            if (!strcmp(f, "date") && (l != 10 || s[4] != '-' || s[7] != '-')) return false;
            if (!strcmp(f, "uuid") && (l != 36 || s[8] != '-' || s[23] != '-')) return false;
        }
    }
    if (json_is_object(x)) {
        json_t *props = json_object_get(sc, "properties"), *ap = json_object_get(sc, "additionalProperties");
        size_t i;
        json_t *a;
        json_array_foreach(json_object_get(sc, "required"), i, a) if (!json_object_get(x, json_string_value(a)))
            return false;
        const char *key;
        json_object_foreach(x, key, a) {
            json_t *ps = props ? json_object_get(props, key) : NULL;
            if (ps) {
                if (!valid(a, ps)) return false;
            } else if (json_is_false(ap) || (props && !ap)) return false;
            else if (json_is_object(ap) && !valid(a, ap)) return false;
        }
    }
    if (json_is_array(x)) {
        size_t n = json_array_size(x);
        json_t *pre = json_object_get(sc, "prefixItems"), *it = json_object_get(sc, "items");
        if ((k = json_object_get(sc, "minItems")) && n < (size_t)json_integer_value(k)) return false;
        if ((k = json_object_get(sc, "maxItems")) && n > (size_t)json_integer_value(k)) return false;
        for (size_t i = 0; i < n; i++) {
            json_t *s = i < json_array_size(pre) ? json_array_get(pre, i) : it;
            if (json_is_false(s)) return false;
            if (s && !valid(json_array_get(x, i), s)) return false;
        }
    }
    return true;
}

/* ---- random-weight models under a grammar, through the scheduler ---- */

typedef struct gen_out {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
    int32_t ids[4096];
    int n;
    int n_vocab;
    int masked_steps; /* steps whose logits had a banned (-inf) token */
    bool chose_banned;
} gen_out;

static int gen_on_token(sched_job *j, int32_t id, const float *logits) {
    gen_out *o = j->ud;
    if (o->n < 4096) o->ids[o->n++] = id;
    /* the callback sees the masked logits: the chosen token is allowed, some are not */
    if (isinf(logits[id]) && logits[id] < 0) o->chose_banned = true;
    for (int k = 0; k < o->n_vocab; k++)
        if (isinf(logits[k]) && logits[k] < 0) {
            o->masked_steps++;
            break;
        }
    return 0;
}

static void gen_on_done(sched_job *j) {
    gen_out *o = j->ud;
    pthread_mutex_lock(&o->mu);
    o->done = true;
    pthread_cond_signal(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

static const char *const gen_schemas[] = {
    "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\",\"maxLength\":8},\"age\":{\"type\":"
    "\"integer\"},\"ok\":{\"type\":\"boolean\"}},\"required\":[\"name\",\"age\",\"ok\"],\"additionalProperties\":false}",
    "{\"type\":\"array\",\"items\":{\"enum\":[\"red\",\"green\",\"blue\",3,null]},\"minItems\":2,\"maxItems\":4}",
    "{\"type\":\"object\",\"properties\":{\"when\":{\"type\":\"string\",\"format\":\"date\"},\"id\":{\"type\":"
    "\"string\",\"format\":\"uuid\"},\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":3},"
    "\"maxItems\":3},\"score\":{\"type\":[\"number\",\"null\"]}},\"required\":[\"when\",\"id\",\"tags\",\"score\"]}",
    "{\"$defs\":{\"t\":{\"type\":\"object\",\"properties\":{\"v\":{\"type\":\"integer\"},\"kids\":{\"type\":\"array\","
    "\"items\":{\"$ref\":\"#/$defs/t\"},\"maxItems\":2}},\"required\":[\"v\"],\"additionalProperties\":false}},"
    "\"$ref\":\"#/$defs/t\"}",
    "{\"anyOf\":[{\"type\":\"string\",\"minLength\":1,\"maxLength\":4},{\"type\":\"array\",\"prefixItems\":[{\"type\":"
    "\"boolean\"},{\"const\":\"x\"}],\"items\":false,\"minItems\":2}]}",
};

static void gen_model(const char *rel) {
    char *p = tu_shared_path(rel);
    model *m = NULL;
    kp_err err = {0};
    if (model_load(&m, p, NULL, &err)) fail_msg("%s", err.msg);
    free(p);
    sched *s = NULL;
    assert_int_equal(sched_new(&s, m, NULL, &err), 0);
    const tok_vocab *v = model_vocab(m);
    int32_t prompt[2] = {tok_bos(v) >= 0 ? tok_bos(v) : 0, 10};
    int n_ok = 0;
    for (size_t si = 0; si < sizeof gen_schemas / sizeof gen_schemas[0]; si++) {
        gram *g = compile_ok(gen_schemas[si]);
        g_root = json_loads(gen_schemas[si], 0, NULL);
        for (uint64_t seed = 1; seed <= 4; seed++) {
            static sched_job j;
            static gen_out o;
            memset(&j, 0, sizeof j);
            memset(&o, 0, sizeof o);
            pthread_mutex_init(&o.mu, NULL);
            pthread_cond_init(&o.cv, NULL);
            j.prompt = prompt;
            j.n_prompt = 2;
            j.max_tokens = 1500;
            j.sampling = sample_default_params();
            j.sampling.temperature = 1.0f;
            j.sampling.top_k = 0;
            j.sampling.top_p = 1.0f;
            j.sampling.min_p = 0;
            j.sampling.seed = seed;
            j.grammar = g;
            j.on_token = gen_on_token;
            j.on_done = gen_on_done;
            j.ud = &o;
            o.n_vocab = model_hp(m)->n_vocab;
            atomic_init(&j.cancel, false);
            assert_int_equal(sched_submit(s, &j, &err), 0);
            pthread_mutex_lock(&o.mu);
            while (!o.done) pthread_cond_wait(&o.cv, &o.mu);
            pthread_mutex_unlock(&o.mu);
            char *text = NULL;
            size_t len = 0;
            assert_int_equal(tok_decode(v, o.ids, (size_t)o.n, true, &text, &len, &err), 0);
            assert_false(o.chose_banned);
            assert_int_equal(o.masked_steps, o.n);
            if (j.finish != SCHED_STOP)
                fail_msg("%s schema %zu seed %d: finish %d (%s) after %d tokens: %s", rel, si, (int)seed, j.finish,
                         j.err.msg, o.n, text);
            json_error_t je;
            json_t *x = json_loadb(text, len, JSON_DECODE_ANY, &je);
            if (!x) fail_msg("%s schema %zu seed %d: not JSON (%s): %s", rel, si, (int)seed, je.text, text);
            if (!valid(x, g_root)) fail_msg("%s schema %zu seed %d: invalid: %s", rel, si, (int)seed, text);
            json_decref(x);
            free(text);
            n_ok++;
        }
        json_decref(g_root);
        gram_free(g);
    }
    assert_int_equal(n_ok, 4 * (int)(sizeof gen_schemas / sizeof gen_schemas[0]));
    sched_free(s);
    model_free(m);
}

static void test_generate_gpt2(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/tiny-gpt2.gguf");
    gen_model("models/tiny-gpt2.gguf");
}

static void test_generate_llama(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/tiny-llama-256.gguf");
    gen_model("models/tiny-llama-256.gguf");
}

/* `kvpark bench grammar` runs on a real vocabulary and writes one CSV row
 * per schema with a positive median. */
static void test_bench(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    char *m = tu_shared_path("models/stories260K.gguf");
    char *dir = tu_tmpdir();
    char csv[1024];
    snprintf(csv, sizeof csv, "%s/g.csv", dir);
    char *argv[] = {"grammar", "-m", m, "-n", "40", "--decode-steps", "2", "--csv", csv, NULL};
    assert_int_equal(bench_grammar_main(9, argv), 0);
    char *text = tu_read_file(csv, NULL);
    assert_non_null(text);
    const char *head = "model,n_vocab,schema,steps,median_us,p99_us,max_us,decode_ms\n";
    assert_true(strncmp(text, head, strlen(head)) == 0);
    int rows = 0;
    for (char *line = strchr(text, '\n'); line && line[1]; line = strchr(line + 1, '\n')) {
        rows++;
        assert_non_null(strstr(line, ",512,"));
        double med = 0;
        const char *c = line + 1;
        for (int k = 0; k < 4; k++) c = strchr(c, ',') + 1;
        med = atof(c);
        assert_true(med > 0);
    }
    assert_int_equal(rows, 4);
    free(text);
    tu_rm_rf(dir);
    free(dir);
    free(m);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_accept_reject), cmocka_unit_test(test_complete),
        cmocka_unit_test(test_errors),        cmocka_unit_test(test_mask_stories),
        cmocka_unit_test(test_mask_gpt2),     cmocka_unit_test(test_generate_gpt2),
        cmocka_unit_test(test_generate_llama), cmocka_unit_test(test_bench),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
