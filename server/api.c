/*
 * api.c — OpenAI-compatible request parsing and response building (see api.h).
 *
 * Parsing is table-free and linear: load the body with jansson (after a cheap
 * nesting-depth scan), then read each known field with a small typed getter
 * that writes a precise 400 error naming the field. Building responses uses
 * jansson objects dumped compactly, so escaping is always right; all text is
 * run through api_utf8_sanitize() first because jansson refuses invalid UTF-8
 * and a model can emit a partial character (a byte token, a cut at max_tokens).
 */
#include "server/api.h"

#include <errno.h>
#include <jansson.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- errors ---------------------------------------------------------- */

static void api_copy(char *dst, size_t cap, const char *src) {
    snprintf(dst, cap, "%s", src ? src : "");
}

int api_error_set(api_error *e, int http_status, const char *type, const char *code,
                  const char *param, const char *fmt, ...) {
    if (e) {
        e->http_status = http_status;
        api_copy(e->type, sizeof(e->type), type);
        api_copy(e->code, sizeof(e->code), code);
        api_copy(e->param, sizeof(e->param), param);
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(e->message, sizeof(e->message), fmt, ap);
        va_end(ap);
    }
    switch (http_status) {
    case 401: case 403: return KP_EINVAL;
    case 404: return KP_ENOTFOUND;
    case 413: return KP_ERANGE;
    case 429: case 503: return KP_EBUSY;
    case 500: return KP_EIO;
    default: return KP_EINVAL;
    }
}

#define API_BAD(e, param, code, ...) \
    api_error_set((e), 400, "invalid_request_error", (code), (param), __VA_ARGS__)

void api_error_bad_key(api_error *e) {
    api_error_set(e, 401, "authentication_error", "invalid_api_key", NULL,
                  "Incorrect or missing API key: send the header 'Authorization: Bearer <key>'");
}

void api_error_unknown_route(api_error *e, const char *method, const char *path) {
    api_error_set(e, 404, "not_found_error", "unknown_url", NULL, "Invalid URL (%s %s)",
                  method ? method : "?", path ? path : "?");
}

void api_error_unknown_session(api_error *e, const char *session_id) {
    api_error_set(e, 404, "not_found_error", "session_not_found", "session_id",
                  "No session '%.64s': it never existed, expired, or belongs to another key; "
                  "omit session_id to start a new conversation", session_id ? session_id : "");
}

void api_error_body_too_large(api_error *e, size_t limit_bytes) {
    api_error_set(e, 413, "invalid_request_error", "request_too_large", NULL,
                  "Request body is too large: the limit is %zu bytes", limit_bytes);
}

void api_error_queue_full(api_error *e, int queue_len) {
    api_error_set(e, 429, "rate_limit_error", "queue_full", NULL,
                  "The server is busy: the request queue is full (%d waiting). Retry later.",
                  queue_len);
}

void api_error_not_ready(api_error *e, const char *why) {
    api_error_set(e, 503, "server_error", "not_ready", NULL,
                  "The server is not ready: %s. Retry shortly.", why ? why : "starting up");
}

void api_error_server(api_error *e, const char *what) {
    api_error_set(e, 500, "server_error", NULL, NULL, "Internal server error: %s",
                  what ? what : "unknown");
}

void api_error_context_overflow(api_error *e, enum api_kind kind, int32_t n_ctx,
                                int32_t n_prompt, int32_t n_completion) {
    const char *what = kind == API_CHAT ? "messages" : "prompt";
    api_error_set(e, 400, "invalid_request_error", "context_length_exceeded", what,
                  "This model's maximum context length is %d tokens. However, your %s "
                  "resulted in %lld tokens (%d in the %s, %d in the completion). Please reduce "
                  "the length of the %s or completion.",
                  (int)n_ctx, what, (long long)n_prompt + n_completion, (int)n_prompt, what,
                  (int)n_completion, what);
}

char *api_error_json(const api_error *e) {
    json_t *inner = json_object();
    json_object_set_new(inner, "message", json_string(e->message));
    json_object_set_new(inner, "type", json_string(e->type[0] ? e->type : "server_error"));
    json_object_set_new(inner, "param", e->param[0] ? json_string(e->param) : json_null());
    json_object_set_new(inner, "code", e->code[0] ? json_string(e->code) : json_null());
    json_t *root = json_object();
    json_object_set_new(root, "error", inner);
    char *s = json_dumps(root, JSON_COMPACT);
    json_decref(root);
    return s;
}

/* ---- parsing: typed getters ------------------------------------------ */
/* Each returns 1 if the field was present and valid, 0 if absent (or null),
 * KP_EINVAL with *e filled if present but wrong. */

static const char *api_type_name(const json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a number";
    case JSON_TRUE: case JSON_FALSE: return "a boolean";
    default: return "null";
    }
}

/* A number in the range, lo exclusive when lo_open. `what` is the range text
 * for the message, e.g. "between 0 and 2". */
static int api_get_number(json_t *root, const char *key, double lo, bool lo_open, double hi,
                          const char *what, double *out, api_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_number(v))
        return API_BAD(e, key, "invalid_type", "'%s' must be a number %s (got %s)", key, what,
                       api_type_name(v));
    double x = json_number_value(v);
    if (!(lo_open ? x > lo : x >= lo) || !(x <= hi))
        return API_BAD(e, key, "invalid_value", "'%s' must be a number %s (got %g)", key, what,
                       x);
    *out = x;
    return 1;
}

static int api_get_int(json_t *root, const char *key, long long lo, long long hi,
                       const char *what, long long *out, api_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_integer(v))
        return API_BAD(e, key, "invalid_type", "'%s' must be %s (got %s)", key, what,
                       api_type_name(v));
    long long x = json_integer_value(v);
    if (x < lo || x > hi)
        return API_BAD(e, key, "invalid_value", "'%s' must be %s (got %lld)", key, what, x);
    *out = x;
    return 1;
}

static int api_get_bool(json_t *root, const char *key, bool *out, api_error *e) {
    json_t *v = json_object_get(root, key);
    if (!v || json_is_null(v)) return 0;
    if (!json_is_boolean(v))
        return API_BAD(e, key, "invalid_type", "'%s' must be a boolean (got %s)", key,
                       api_type_name(v));
    *out = json_is_true(v);
    return 1;
}

static char *api_strdup(const char *s, size_t n) {
    char *d = malloc(n + 1);
    if (d) {
        memcpy(d, s, n);
        d[n] = 0;
    }
    return d;
}

#define API_OOM(e) api_error_set((e), 500, "server_error", NULL, NULL, "out of memory")

bool api_session_id_valid(const char *s) {
    size_t n = 0;
    for (; s[n]; n++) {
        char c = s[n];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '-';
        if (!ok || n >= API_SESSION_ID_MAX) return false;
    }
    return n >= 1;
}

/* Index of the byte where nesting first exceeds max_depth, or -1. Strings
 * are skipped (brackets inside them do not count). Malformed input is left
 * for jansson to report. */
static long api_depth_scan(const char *p, size_t n, int max_depth) {
    int depth = 0;
    bool in_str = false;
    for (size_t i = 0; i < n; i++) {
        char c = p[i];
        if (in_str) {
            if (c == '\\') i++;
            else if (c == '"') in_str = false;
        } else if (c == '"') {
            in_str = true;
        } else if (c == '[' || c == '{') {
            if (++depth > max_depth) return (long)i;
        } else if (c == ']' || c == '}') {
            depth--;
        }
    }
    return -1;
}

static int api_load(const char *body, size_t len, json_t **root, api_error *e) {
    *root = NULL;
    if (!body || len == 0)
        return API_BAD(e, NULL, "invalid_json", "invalid JSON: the request body is empty");
    long at = api_depth_scan(body, len, API_MAX_DEPTH);
    if (at >= 0)
        return API_BAD(e, NULL, "invalid_json",
                       "invalid JSON: nested deeper than %d levels (at byte %ld)", API_MAX_DEPTH,
                       at);
    json_error_t je;
    json_t *v = json_loadb(body, len, JSON_DECODE_ANY, &je);
    if (!v) /* jansson says "unable to decode byte 0x.." for bad UTF-8: name it */
        return API_BAD(e, NULL, "invalid_json", "invalid JSON at line %d column %d: %s%s",
                       je.line, je.column,
                       strstr(je.text, "decode byte") ? "invalid UTF-8, " : "", je.text);
    if (!json_is_object(v)) {
        int rc = API_BAD(e, NULL, "invalid_type",
                         "the request body must be a JSON object (got %s)", api_type_name(v));
        json_decref(v);
        return rc;
    }
    *root = v;
    return 0;
}

int api_load_object(const char *body, size_t len, json_t **root, api_error *e) {
    return api_load(body, len, root, e);
}

/* ---- parsing: fields shared by both endpoints -------------------------- */

static int api_parse_stop(json_t *root, api_request *r, api_error *e) {
    json_t *v = json_object_get(root, "stop");
    if (!v || json_is_null(v)) return 0;
    const char *msg = "'stop' must be a non-empty string or an array of up to 4 non-empty strings";
    if (json_is_string(v)) {
        if (json_string_length(v) == 0) return API_BAD(e, "stop", "invalid_value", "%s", msg);
        r->stop[0] = api_strdup(json_string_value(v), json_string_length(v));
        if (!r->stop[0]) return API_OOM(e);
        r->n_stop = 1;
        return 0;
    }
    if (!json_is_array(v)) return API_BAD(e, "stop", "invalid_type", "%s", msg);
    if (json_array_size(v) > API_MAX_STOP)
        return API_BAD(e, "stop", "invalid_value", "%s (got %zu)", msg, json_array_size(v));
    size_t i;
    json_t *s;
    json_array_foreach(v, i, s) {
        if (!json_is_string(s))
            return API_BAD(e, "stop", "invalid_type", "%s ('stop[%zu]' is %s)", msg, i,
                           api_type_name(s));
        if (json_string_length(s) == 0)
            return API_BAD(e, "stop", "invalid_value", "%s ('stop[%zu]' is empty)", msg, i);
        r->stop[r->n_stop] = api_strdup(json_string_value(s), json_string_length(s));
        if (!r->stop[r->n_stop]) return API_OOM(e);
        r->n_stop++;
    }
    return 0;
}

static int bias_cmp(const void *a, const void *b) {
    const sample_bias *x = a, *y = b;
    return (x->id > y->id) - (x->id < y->id);
}

/* logit_bias: {"<token id>": bias, ...}, bias a number in [-100, 100]
 * (OpenAI's range: +-1 nudges, -100 bans, 100 all but forces). Keys must be
 * base-10 token ids; the vocabulary bound is checked by the server. */
static int api_parse_logit_bias(json_t *root, api_request *r, api_error *e) {
    json_t *lb = json_object_get(root, "logit_bias");
    if (!lb || json_is_null(lb)) return 0;
    if (!json_is_object(lb))
        return API_BAD(e, "logit_bias", "invalid_type",
                       "'logit_bias' must be an object mapping token ids to biases (got %s)", api_type_name(lb));
    size_t n = json_object_size(lb);
    if (n == 0) return 0;
    if (n > API_MAX_LOGIT_BIAS)
        return API_BAD(e, "logit_bias", "invalid_value", "'logit_bias' has %zu entries: at most %d", n,
                       API_MAX_LOGIT_BIAS);
    r->bias = malloc(n * sizeof *r->bias);
    if (!r->bias) return API_OOM(e);
    const char *key;
    json_t *v;
    size_t i = 0;
    json_object_foreach(lb, key, v) {
        char *end = NULL;
        errno = 0;
        long long id = strtoll(key, &end, 10);
        if (!*key || *end || errno || id < 0 || id > INT32_MAX || (key[0] == '0' && key[1]) || key[0] == '+' ||
            key[0] == '-' || key[0] == ' ')
            return API_BAD(e, "logit_bias", "invalid_value",
                           "'logit_bias' keys must be token ids (non-negative integers), not \"%.40s\"", key);
        if (!json_is_number(v))
            return API_BAD(e, "logit_bias", "invalid_type", "logit_bias[\"%.40s\"] must be a number (got %s)",
                           key, api_type_name(v));
        double b = json_number_value(v);
        if (!(b >= -100 && b <= 100))
            return API_BAD(e, "logit_bias", "invalid_value",
                           "logit_bias[\"%.40s\"] is %g: biases must be between -100 and 100", key, b);
        r->bias[i++] = (sample_bias){.id = (int32_t)id, .bias = (float)b};
    }
    /* ids are unique: keys are canonical integers (no sign, no leading 0) and
     * jansson keeps one value per key */
    qsort(r->bias, i, sizeof *r->bias, bias_cmp);
    r->n_bias = i;
    return 0;
}

static int api_parse_common(json_t *root, const api_limits *lim, api_request *r,
                            api_error *e) {
    int rc;
    double x;
    long long k = 0;

    json_t *model = json_object_get(root, "model");
    if (json_is_string(model)) {
        r->model = api_strdup(json_string_value(model), json_string_length(model));
        if (!r->model) return API_OOM(e);
    }

    long long tok_hi = (lim && lim->max_tokens_limit > 0) ? lim->max_tokens_limit : INT32_MAX;
    char what[80];
    snprintf(what, sizeof(what), "a positive integer (at most %lld)", tok_hi);
    r->max_tokens = -1;
    if ((rc = api_get_int(root, "max_tokens", 1, tok_hi, what, &k, e)) < 0) return rc;
    if (rc) r->max_tokens = (int32_t)k;
    if ((rc = api_get_int(root, "max_completion_tokens", 1, tok_hi, what, &k, e)) < 0) return rc;
    if (rc) r->max_tokens = (int32_t)k; /* the newer name wins */

    sample_params *sp = &r->sp;
    if ((rc = api_get_number(root, "temperature", 0, false, 2, "between 0 and 2", &x, e)) < 0)
        return rc;
    if (rc) sp->temperature = (float)x;
    if ((rc = api_get_number(root, "top_p", 0, true, 1, "greater than 0 and at most 1", &x, e)) <
        0)
        return rc;
    if (rc) sp->top_p = (float)x;
    if ((rc = api_get_int(root, "top_k", 0, INT32_MAX, "an integer >= 0 (0 = off)", &k, e)) < 0)
        return rc;
    if (rc) sp->top_k = (int32_t)k;
    if ((rc = api_get_number(root, "min_p", 0, false, 1, "between 0 and 1", &x, e)) < 0)
        return rc;
    if (rc) sp->min_p = (float)x;
    if ((rc = api_get_number(root, "presence_penalty", -2, false, 2, "between -2 and 2", &x,
                             e)) < 0)
        return rc;
    if (rc) sp->presence_penalty = (float)x;
    if ((rc = api_get_number(root, "frequency_penalty", -2, false, 2, "between -2 and 2", &x,
                             e)) < 0)
        return rc;
    if (rc) sp->frequency_penalty = (float)x;
    if ((rc = api_get_number(root, "repeat_penalty", 0, true, 10,
                             "greater than 0 and at most 10 (1 = off)", &x, e)) < 0)
        return rc;
    if (rc) sp->repeat_penalty = (float)x;

    sp->seed = SAMPLE_SEED_RANDOM;
    if ((rc = api_get_int(root, "seed", INT64_MIN, INT64_MAX, "an integer", &k, e)) < 0)
        return rc;
    if (rc) {
        sp->seed = (uint64_t)k;
        r->has_seed = true;
    }

    if ((rc = api_parse_stop(root, r, e)) < 0) return rc;
    if ((rc = api_parse_logit_bias(root, r, e)) < 0) return rc;

    json_t *n = json_object_get(root, "n");
    if (n && !json_is_null(n)) {
        if (!json_is_integer(n))
            return API_BAD(e, "n", "invalid_type", "'n' must be an integer (got %s)",
                           api_type_name(n));
        if (json_integer_value(n) != 1)
            return API_BAD(e, "n", "invalid_value",
                           "n must be 1: kvpark generates one choice per request");
    }

    json_t *user = json_object_get(root, "user");
    if (user && !json_is_null(user) && !json_is_string(user))
        return API_BAD(e, "user", "invalid_type", "'user' must be a string (got %s)",
                       api_type_name(user));

    if ((rc = api_get_bool(root, "stream", &r->stream, e)) < 0) return rc;
    /* llama.cpp server extension: keep generating past end-of-text */
    if ((rc = api_get_bool(root, "ignore_eos", &r->ignore_eos, e)) < 0) return rc;
    json_t *so = json_object_get(root, "stream_options");
    if (so && !json_is_null(so)) {
        if (!json_is_object(so))
            return API_BAD(e, "stream_options", "invalid_type",
                           "'stream_options' must be an object (got %s)", api_type_name(so));
        if ((rc = api_get_bool(so, "include_usage", &r->include_usage, e)) < 0) {
            api_copy(e->param, sizeof(e->param), "stream_options.include_usage");
            return rc;
        }
    }

    json_t *sid = json_object_get(root, "session_id");
    if (sid && !json_is_null(sid)) {
        if (!json_is_string(sid))
            return API_BAD(e, "session_id", "invalid_type",
                           "'session_id' must be a string (got %s)", api_type_name(sid));
        const char *s = json_string_value(sid);
        if (strlen(s) != json_string_length(sid) || !api_session_id_valid(s))
            return API_BAD(e, "session_id", "invalid_value",
                           "'session_id' must be 1 to 64 characters from A-Z a-z 0-9 _ -");
        api_copy(r->session_id, sizeof(r->session_id), s);
    }
    return 0;
}

/* logprobs for chat: bool + top_logprobs 0..20 (needs logprobs). */
static int api_parse_chat_logprobs(json_t *root, api_request *r, api_error *e) {
    int rc;
    long long k = 0;
    if ((rc = api_get_bool(root, "logprobs", &r->logprobs, e)) < 0) return rc;
    if ((rc = api_get_int(root, "top_logprobs", 0, API_MAX_TOP_LOGPROBS,
                          "an integer between 0 and 20", &k, e)) < 0)
        return rc;
    if (rc) {
        if (!r->logprobs)
            return API_BAD(e, "top_logprobs", "invalid_value",
                           "'top_logprobs' requires 'logprobs' to be true");
        r->top_logprobs = (int)k;
    }
    return 0;
}

/* ---- chat ------------------------------------------------------------ */

/* Text of one message's content: a string, or text parts joined by "\n". */
static int api_parse_content(json_t *c, size_t mi, const char *role, char **out, api_error *e) {
    char param[64];
    snprintf(param, sizeof(param), "messages[%zu].content", mi);
    if (!c)
        return API_BAD(e, param, "missing_required_parameter", "'%s' is required", param);
    if (json_is_null(c) && strcmp(role, "assistant") == 0) {
        *out = api_strdup("", 0);
        return *out ? 0 : API_OOM(e);
    }
    if (json_is_string(c)) {
        *out = api_strdup(json_string_value(c), json_string_length(c));
        return *out ? 0 : API_OOM(e);
    }
    if (!json_is_array(c))
        return API_BAD(e, param, "invalid_type",
                       "'%s' must be a string or an array of text parts (got %s)", param,
                       api_type_name(c));
    /* Two passes: validate and size, then copy. */
    size_t total = 0, j;
    json_t *part;
    json_array_foreach(c, j, part) {
        snprintf(param, sizeof(param), "messages[%zu].content[%zu]", mi, j);
        if (!json_is_object(part))
            return API_BAD(e, param, "invalid_type",
                           "'%s' must be an object {\"type\":\"text\",\"text\":...} (got %s)",
                           param, api_type_name(part));
        json_t *type = json_object_get(part, "type");
        if (!json_is_string(type))
            return API_BAD(e, param, "invalid_type", "'%s.type' must be a string", param);
        if (strcmp(json_string_value(type), "text") != 0)
            return API_BAD(e, param, "unsupported",
                           "'%s.type' is '%.40s': kvpark only accepts text content parts",
                           param, json_string_value(type));
        json_t *text = json_object_get(part, "text");
        if (!json_is_string(text))
            return API_BAD(e, param, "invalid_type", "'%s.text' must be a string", param);
        total += json_string_length(text) + (j > 0);
    }
    char *buf = malloc(total + 1), *p = buf;
    if (!buf) return API_OOM(e);
    json_array_foreach(c, j, part) {
        json_t *text = json_object_get(part, "text");
        if (j > 0) *p++ = '\n';
        memcpy(p, json_string_value(text), json_string_length(text));
        p += json_string_length(text);
    }
    *p = 0;
    *out = buf;
    return 0;
}

static int api_parse_messages(json_t *root, const api_limits *lim, api_request *r,
                              api_error *e) {
    json_t *msgs = json_object_get(root, "messages");
    if (!msgs || json_is_null(msgs))
        return API_BAD(e, "messages", "missing_required_parameter", "'messages' is required");
    if (!json_is_array(msgs))
        return API_BAD(e, "messages", "invalid_type",
                       "'messages' must be an array of message objects (got %s)",
                       api_type_name(msgs));
    size_t n = json_array_size(msgs);
    if (n == 0)
        return API_BAD(e, "messages", "invalid_value",
                       "'messages' must contain at least one message");
    if (lim && lim->max_messages > 0 && n > lim->max_messages)
        return API_BAD(e, "messages", "invalid_value",
                       "'messages' has %zu messages; this server accepts at most %zu", n,
                       lim->max_messages);
    r->msgs = calloc(n, sizeof(*r->msgs));
    if (!r->msgs) return API_OOM(e);

    size_t i;
    json_t *m;
    json_array_foreach(msgs, i, m) {
        char param[64];
        snprintf(param, sizeof(param), "messages[%zu]", i);
        if (!json_is_object(m))
            return API_BAD(e, param, "invalid_type", "'%s' must be an object (got %s)", param,
                           api_type_name(m));
        snprintf(param, sizeof(param), "messages[%zu].role", i);
        json_t *role = json_object_get(m, "role");
        if (!role)
            return API_BAD(e, param, "missing_required_parameter", "'%s' is required", param);
        if (!json_is_string(role))
            return API_BAD(e, param, "invalid_type", "'%s' must be a string (got %s)", param,
                           api_type_name(role));
        const char *rs = json_string_value(role);
        const char *norm = NULL;
        if (strcmp(rs, "system") == 0 || strcmp(rs, "developer") == 0) norm = "system";
        else if (strcmp(rs, "user") == 0) norm = "user";
        else if (strcmp(rs, "assistant") == 0) norm = "assistant";
        else if (strcmp(rs, "tool") == 0 || strcmp(rs, "function") == 0)
            return API_BAD(e, param, "unsupported",
                           "'%s' is '%s': kvpark does not support tool or function calls", param,
                           rs);
        else
            return API_BAD(e, param, "invalid_value",
                           "'%s' must be one of 'system', 'user', 'assistant', 'developer' "
                           "(got '%.40s')",
                           param, rs);
        char *content = NULL;
        int rc = api_parse_content(json_object_get(m, "content"), i, norm, &content, e);
        if (rc < 0) return rc;
        r->msgs[i].role = norm;
        r->msgs[i].content = content;
        r->n_msgs = i + 1;
    }
    return 0;
}

static void api_request_init(api_request *r, enum api_kind kind) {
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->sp = sample_default_params();
    r->sp.seed = SAMPLE_SEED_RANDOM;
    r->max_tokens = -1;
}

/* response_format (chat): text, json_object, or json_schema with a schema
 * the grammar engine compiles; anything else is a 400 naming the param. */
static int api_parse_response_format(json_t *root, api_request *r, api_error *e) {
    json_t *rf = json_object_get(root, "response_format");
    if (!rf || json_is_null(rf)) return 0;
    if (!json_is_object(rf))
        return API_BAD(e, "response_format", "invalid_type",
                       "'response_format' must be an object like {\"type\": \"json_object\"} (got %s)",
                       api_type_name(rf));
    json_t *ty = json_object_get(rf, "type");
    if (!json_is_string(ty))
        return API_BAD(e, "response_format.type", ty ? "invalid_type" : "missing_required_parameter",
                       "'response_format.type' must be one of \"text\", \"json_object\", \"json_schema\"");
    const char *t = json_string_value(ty);
    kp_err err = {0};
    if (!strcmp(t, "text")) return 0;
    if (!strcmp(t, "json_object")) {
        if (gram_compile_json_object(&r->grammar, &err)) return API_OOM(e);
        return 0;
    }
    if (strcmp(t, "json_schema"))
        return API_BAD(e, "response_format.type", "invalid_value",
                       "'response_format.type' is \"%.40s\": it must be one of \"text\", \"json_object\", "
                       "\"json_schema\"",
                       t);
    json_t *js = json_object_get(rf, "json_schema");
    if (!json_is_object(js))
        return API_BAD(e, "response_format.json_schema", js ? "invalid_type" : "missing_required_parameter",
                       "'response_format.json_schema' must be an object {\"name\", \"schema\", \"strict\"}");
    json_t *name = json_object_get(js, "name");
    if (!json_is_string(name) || json_string_length(name) < 1 || json_string_length(name) > 64)
        return API_BAD(e, "response_format.json_schema.name", name ? "invalid_value" : "missing_required_parameter",
                       "'response_format.json_schema.name' must be a string of 1 to 64 characters");
    for (const char *c = json_string_value(name); *c; c++)
        if (!((*c >= 'a' && *c <= 'z') || (*c >= 'A' && *c <= 'Z') || (*c >= '0' && *c <= '9') || *c == '_' ||
              *c == '-'))
            return API_BAD(e, "response_format.json_schema.name", "invalid_value",
                           "'response_format.json_schema.name' may only hold a-z, A-Z, 0-9, '_' and '-'");
    json_t *strict = json_object_get(js, "strict");
    if (strict && !json_is_boolean(strict) && !json_is_null(strict))
        return API_BAD(e, "response_format.json_schema.strict", "invalid_type",
                       "'response_format.json_schema.strict' must be a boolean (got %s)", api_type_name(strict));
    json_t *sc = json_object_get(js, "schema");
    if (!sc || (!json_is_object(sc) && !json_is_boolean(sc)))
        return API_BAD(e, "response_format.json_schema.schema", sc ? "invalid_type" : "missing_required_parameter",
                       "'response_format.json_schema.schema' must be a JSON schema object");
    char *text = json_dumps(sc, JSON_COMPACT | JSON_ENCODE_ANY);
    if (!text) return API_OOM(e);
    int rc = gram_compile(&r->grammar, text, strlen(text), &err);
    free(text);
    if (rc == KP_ENOMEM) return API_OOM(e);
    if (rc)
        return API_BAD(e, "response_format.json_schema.schema", rc == KP_EUNSUP ? "unsupported_schema" : "invalid_schema",
                       "'response_format.json_schema.schema': %s", err.msg);
    return 0;
}

int api_parse_chat(const char *body, size_t len, const api_limits *lim, api_request *out,
                   api_error *err) {
    api_request_init(out, API_CHAT);
    json_t *root;
    int rc = api_load(body, len, &root, err);
    if (rc < 0) return rc;
    rc = api_parse_messages(root, lim, out, err);
    if (rc == 0) rc = api_parse_common(root, lim, out, err);
    if (rc == 0) rc = api_parse_chat_logprobs(root, out, err);
    if (rc == 0) rc = api_parse_response_format(root, out, err);
    json_decref(root);
    if (rc < 0) {
        api_request_free(out);
        out->kind = API_CHAT;
    }
    return rc;
}

/* ---- completions ----------------------------------------------------- */

static int api_parse_ids(json_t *arr, const char *param, api_prompt *pr, api_error *e) {
    size_t n = json_array_size(arr), i;
    if (n == 0)
        return API_BAD(e, param, "invalid_value", "'%s' must not be empty", param);
    pr->ids = malloc(n * sizeof(int32_t));
    if (!pr->ids) return API_OOM(e);
    json_t *v;
    json_array_foreach(arr, i, v) {
        if (!json_is_integer(v) || json_integer_value(v) < 0 ||
            json_integer_value(v) > INT32_MAX)
            return API_BAD(e, param, json_is_integer(v) ? "invalid_value" : "invalid_type",
                           "'%s[%zu]' must be a token id (an integer >= 0)", param, i);
        pr->ids[i] = (int32_t)json_integer_value(v);
    }
    pr->n_ids = n;
    return 0;
}

/* One prompt from a string or an array of ids. */
static int api_parse_one_prompt(json_t *p, const char *param, api_prompt *pr, api_error *e) {
    if (json_is_string(p)) {
        pr->text = api_strdup(json_string_value(p), json_string_length(p));
        return pr->text ? 0 : API_OOM(e);
    }
    return api_parse_ids(p, param, pr, e);
}

/* 'prompt': a string, an array of token ids, or an array of strings / id
 * arrays (a batch: one choice per prompt, as OpenAI does). */
static int api_parse_prompt(json_t *root, api_request *r, api_error *e) {
    const char *kinds = "a string, an array of token ids, or an array of strings or of token "
                        "id arrays";
    json_t *p = json_object_get(root, "prompt");
    if (!p || json_is_null(p))
        return API_BAD(e, "prompt", "missing_required_parameter", "'prompt' is required");
    if (!json_is_string(p) && !json_is_array(p))
        return API_BAD(e, "prompt", "invalid_type", "'prompt' must be %s (got %s)", kinds,
                       api_type_name(p));
    size_t n = json_is_string(p) ? 1 : json_array_size(p);
    if (n == 0) return API_BAD(e, "prompt", "invalid_value", "'prompt' must not be empty");
    json_t *first = json_is_array(p) ? json_array_get(p, 0) : p;
    bool batch = json_is_array(p) && !json_is_integer(first);
    if (!batch) n = 1;
    if (n > API_MAX_PROMPTS)
        return API_BAD(e, "prompt", "invalid_value",
                       "'prompt' holds %zu prompts: at most %d per request", n, API_MAX_PROMPTS);
    r->prompts = calloc(n, sizeof *r->prompts);
    if (!r->prompts) return API_OOM(e);
    r->n_prompts = n;
    if (!batch) return api_parse_one_prompt(p, "prompt", &r->prompts[0], e);
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(p, i);
        char param[32];
        snprintf(param, sizeof param, "prompt[%zu]", i);
        if (!json_is_string(x) && !json_is_array(x))
            return API_BAD(e, param, "invalid_type", "'prompt' must be %s (%s is %s)", kinds, param,
                           api_type_name(x));
        int rc = api_parse_one_prompt(x, param, &r->prompts[i], e);
        if (rc) return rc;
    }
    return 0;
}

/* Legacy completions logprobs: integer 0..5 = number of alternatives; a bool
 * is accepted too (true = chosen token only, with top_logprobs if given). */
static int api_parse_completion_logprobs(json_t *root, api_request *r, api_error *e) {
    json_t *v = json_object_get(root, "logprobs");
    if (!v || json_is_null(v)) return api_parse_chat_logprobs(root, r, e);
    if (json_is_integer(v)) {
        long long k = json_integer_value(v);
        if (k < 0 || k > 5)
            return API_BAD(e, "logprobs", "invalid_value",
                           "'logprobs' must be an integer between 0 and 5 (got %lld)", k);
        r->logprobs = true;
        r->top_logprobs = (int)k;
        return 0;
    }
    if (!json_is_boolean(v))
        return API_BAD(e, "logprobs", "invalid_type",
                       "'logprobs' must be an integer between 0 and 5 (got %s)",
                       api_type_name(v));
    return api_parse_chat_logprobs(root, r, e);
}

int api_parse_completion(const char *body, size_t len, const api_limits *lim,
                         api_request *out, api_error *err) {
    api_request_init(out, API_COMPLETION);
    json_t *root;
    int rc = api_load(body, len, &root, err);
    if (rc < 0) return rc;
    rc = api_parse_prompt(root, out, err);
    if (rc == 0) rc = api_parse_common(root, lim, out, err);
    if (rc == 0) rc = api_parse_completion_logprobs(root, out, err);
    json_decref(root);
    if (rc < 0) {
        api_request_free(out);
        out->kind = API_COMPLETION;
    }
    return rc;
}

void api_request_free(api_request *r) {
    if (!r) return;
    free(r->model);
    free(r->bias);
    gram_free(r->grammar);
    for (size_t i = 0; i < r->n_msgs; i++) free((char *)r->msgs[i].content); /* owned */
    free(r->msgs);
    for (size_t i = 0; i < r->n_prompts; i++) {
        free(r->prompts[i].text);
        free(r->prompts[i].ids);
    }
    free(r->prompts);
    for (int i = 0; i < r->n_stop; i++) free(r->stop[i]);
    enum api_kind kind = r->kind;
    memset(r, 0, sizeof(*r));
    r->kind = kind;
    r->max_tokens = -1;
}

/* ---- responses ------------------------------------------------------- */

/* Length of the valid UTF-8 sequence at s (1..4), or 0 if invalid there. */
static size_t api_utf8_seq(const unsigned char *s, size_t n) {
    unsigned c = s[0];
    if (c < 0x80) return 1;
    size_t need;
    unsigned cp, min;
    if (c >= 0xC2 && c <= 0xDF) need = 2, cp = c & 0x1F, min = 0x80;
    else if (c >= 0xE0 && c <= 0xEF) need = 3, cp = c & 0x0F, min = 0x800;
    else if (c >= 0xF0 && c <= 0xF4) need = 4, cp = c & 0x07, min = 0x10000;
    else return 0;
    if (need > n) return 0;
    for (size_t i = 1; i < need; i++) {
        if ((s[i] & 0xC0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if (cp < min || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return 0;
    return need;
}

char *api_utf8_sanitize(const char *s, size_t len, size_t *out_len) {
    char *out = malloc(len * 3 + 1); /* worst case: every byte -> 3-byte U+FFFD */
    if (!out) return NULL;
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < len) {
        size_t k = api_utf8_seq(u + i, len - i);
        if (k) {
            memcpy(out + o, u + i, k);
            o += k;
            i += k;
        } else {
            memcpy(out + o, "\xEF\xBF\xBD", 3);
            o += 3;
            i++;
        }
    }
    out[o] = 0;
    if (out_len) *out_len = o;
    return out;
}

/* A JSON string from bytes, invalid UTF-8 replaced. */
static json_t *api_jstr(const char *s, size_t n) {
    if (!s) return json_string("");
    size_t m;
    char *clean = api_utf8_sanitize(s, n, &m);
    if (!clean) return NULL;
    json_t *v = json_stringn(clean, m);
    free(clean);
    return v;
}

static json_t *api_jlogprob(float lp) {
    return json_real(isfinite(lp) ? (double)lp : -9999.0);
}

static json_t *api_jbytes(const char *s, size_t n) {
    json_t *a = json_array();
    for (size_t i = 0; i < n; i++) json_array_append_new(a, json_integer((unsigned char)s[i]));
    return a;
}

/* {token, logprob, bytes} */
static json_t *api_jtok(const api_logprob *t) {
    json_t *o = json_object();
    json_object_set_new(o, "token", api_jstr(t->token, t->token_len));
    json_object_set_new(o, "logprob", api_jlogprob(t->logprob));
    json_object_set_new(o, "bytes", api_jbytes(t->token, t->token_len));
    return o;
}

/* Chat logprobs: null or {"content":[{token, logprob, bytes, top_logprobs}]} */
static json_t *api_chat_logprobs(const api_result *r) {
    if (!r->has_logprobs) return json_null();
    json_t *content = json_array();
    for (size_t i = 0; i < r->n_logprobs; i++) {
        const api_token_logprob *t = &r->logprobs[i];
        json_t *o = api_jtok(&t->tok);
        json_t *top = json_array();
        for (int j = 0; j < t->n_top; j++) json_array_append_new(top, api_jtok(&t->top[j]));
        json_object_set_new(o, "top_logprobs", top);
        json_array_append_new(content, o);
    }
    json_t *lp = json_object();
    json_object_set_new(lp, "content", content);
    return lp;
}

size_t api_utf8_chars(const char *s, size_t n) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) k += ((unsigned char)s[i] & 0xC0) != 0x80;
    return k;
}

/* Legacy completion logprobs: {tokens, token_logprobs, top_logprobs,
 * text_offset}; text_offset counts characters from the start of the choice's
 * text (as OpenAI's does), across a stream's chunks. */
static json_t *api_completion_logprobs(const api_result *r) {
    if (!r->has_logprobs) return json_null();
    json_t *tokens = json_array(), *lps = json_array(), *tops = json_array(),
           *offs = json_array();
    size_t off = r->text_offset0;
    for (size_t i = 0; i < r->n_logprobs; i++) {
        const api_token_logprob *t = &r->logprobs[i];
        json_array_append_new(tokens, api_jstr(t->tok.token, t->tok.token_len));
        json_array_append_new(lps, api_jlogprob(t->tok.logprob));
        json_t *top = json_object();
        for (int j = 0; j < t->n_top; j++) {
            size_t m;
            char *k = api_utf8_sanitize(t->top[j].token, t->top[j].token_len, &m);
            if (k) json_object_setn_new(top, k, m, api_jlogprob(t->top[j].logprob));
            free(k);
        }
        json_array_append_new(tops, top);
        json_array_append_new(offs, json_integer((json_int_t)off));
        off += api_utf8_chars(t->tok.token, t->tok.token_len);
    }
    json_t *o = json_object();
    json_object_set_new(o, "tokens", tokens);
    json_object_set_new(o, "token_logprobs", lps);
    json_object_set_new(o, "top_logprobs", tops);
    json_object_set_new(o, "text_offset", offs);
    return o;
}

static json_t *api_jfinish(enum api_finish f) {
    if (f == API_FINISH_STOP) return json_string("stop");
    if (f == API_FINISH_LENGTH) return json_string("length");
    return json_null();
}

static json_t *api_usage(const api_result *r) {
    json_t *u = json_object();
    json_object_set_new(u, "prompt_tokens", json_integer(r->prompt_tokens));
    json_object_set_new(u, "completion_tokens", json_integer(r->completion_tokens));
    json_object_set_new(u, "total_tokens",
                        json_integer((json_int_t)r->prompt_tokens + r->completion_tokens));
    json_t *d = json_object();
    json_object_set_new(d, "cached_tokens", json_integer(r->cached_tokens));
    json_object_set_new(u, "prompt_tokens_details", d);
    return u;
}

/* {"id","object","created","model"} — the head every response shares. */
static json_t *api_head(const api_result *r, const char *object) {
    json_t *o = json_object();
    json_object_set_new(o, "id", json_string(r->id ? r->id : ""));
    json_object_set_new(o, "object", json_string(object));
    json_object_set_new(o, "created", json_integer(r->created));
    json_object_set_new(o, "model", api_jstr(r->model ? r->model : "", r->model ? strlen(r->model) : 0));
    return o;
}

static char *api_finish_doc(json_t *o, const api_result *r) {
    if (r->session_id && r->session_id[0])
        json_object_set_new(o, "session_id", json_string(r->session_id));
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

char *api_chat_response_json(const api_result *r) {
    json_t *o = api_head(r, "chat.completion");
    json_t *msg = json_object();
    json_object_set_new(msg, "role", json_string("assistant"));
    json_object_set_new(msg, "content", api_jstr(r->text, r->text_len));
    json_t *ch = json_object();
    json_object_set_new(ch, "index", json_integer(0));
    json_object_set_new(ch, "message", msg);
    json_object_set_new(ch, "logprobs", api_chat_logprobs(r));
    json_object_set_new(ch, "finish_reason", api_jfinish(r->finish));
    json_t *choices = json_array();
    json_array_append_new(choices, ch);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", api_usage(r));
    return api_finish_doc(o, r);
}

char *api_completion_response_json(const api_result *r) {
    json_t *o = api_head(r, "text_completion");
    json_t *ch = json_object();
    json_object_set_new(ch, "text", api_jstr(r->text, r->text_len));
    json_object_set_new(ch, "index", json_integer(0));
    json_object_set_new(ch, "logprobs", api_completion_logprobs(r));
    json_object_set_new(ch, "finish_reason", api_jfinish(r->finish));
    json_t *choices = json_array();
    json_array_append_new(choices, ch);
    json_object_set_new(o, "choices", choices);
    json_object_set_new(o, "usage", api_usage(r));
    return api_finish_doc(o, r);
}

static char *api_chunk(const api_result *r, enum api_chunk_kind kind, bool chat) {
    json_t *o = api_head(r, chat ? "chat.completion.chunk" : "text_completion");
    json_t *choices = json_array();
    if (kind != API_CHUNK_USAGE) {
        json_t *ch = json_object();
        json_object_set_new(ch, "index", json_integer(0));
        bool content = kind == API_CHUNK_CONTENT;
        if (chat) {
            json_t *delta = json_object();
            if (kind == API_CHUNK_ROLE) {
                json_object_set_new(delta, "role", json_string("assistant"));
                json_object_set_new(delta, "content", json_string(""));
            } else if (content) {
                json_object_set_new(delta, "content", api_jstr(r->text, r->text_len));
            }
            json_object_set_new(ch, "delta", delta);
            json_object_set_new(ch, "logprobs",
                                content ? api_chat_logprobs(r) : json_null());
        } else {
            json_object_set_new(ch, "text",
                                content ? api_jstr(r->text, r->text_len) : json_string(""));
            json_object_set_new(ch, "logprobs",
                                content ? api_completion_logprobs(r) : json_null());
        }
        json_object_set_new(ch, "finish_reason",
                            kind == API_CHUNK_FINISH ? api_jfinish(r->finish) : json_null());
        json_array_append_new(choices, ch);
    }
    json_object_set_new(o, "choices", choices);
    if (kind == API_CHUNK_USAGE) json_object_set_new(o, "usage", api_usage(r));
    else if (r->include_usage) json_object_set_new(o, "usage", json_null());
    return api_finish_doc(o, r);
}

char *api_chat_chunk_json(const api_result *r, enum api_chunk_kind kind) {
    return api_chunk(r, kind, true);
}

char *api_completion_chunk_json(const api_result *r, enum api_chunk_kind kind) {
    return api_chunk(r, kind, false);
}

char *api_sse_event(const char *json) {
    size_t n = strlen(json);
    char *s = malloc(n + 9);
    if (!s) return NULL;
    memcpy(s, "data: ", 6);
    memcpy(s + 6, json, n);
    memcpy(s + 6 + n, "\n\n", 3);
    return s;
}

static json_t *api_model_obj(const char *model_id, int64_t created) {
    json_t *m = json_object();
    json_object_set_new(m, "id", api_jstr(model_id, model_id ? strlen(model_id) : 0));
    json_object_set_new(m, "object", json_string("model"));
    json_object_set_new(m, "created", json_integer(created));
    json_object_set_new(m, "owned_by", json_string("kvpark"));
    return m;
}

char *api_model_json(const char *model_id, int64_t created) {
    json_t *m = api_model_obj(model_id, created);
    char *s = json_dumps(m, JSON_COMPACT);
    json_decref(m);
    return s;
}

void api_error_unknown_model(api_error *e, const char *model) {
    api_error_set(e, 404, "invalid_request_error", "model_not_found", "model",
                  "The model '%.128s' does not exist: this server serves one model (GET /v1/models)",
                  model ? model : "");
}

char *api_models_json(const char *model_id, int64_t created) {
    json_t *m = api_model_obj(model_id, created);
    json_t *data = json_array();
    json_array_append_new(data, m);
    json_t *o = json_object();
    json_object_set_new(o, "object", json_string("list"));
    json_object_set_new(o, "data", data);
    char *s = json_dumps(o, JSON_COMPACT);
    json_decref(o);
    return s;
}

void api_make_id(char *buf, size_t cap, const char *prefix, uint64_t r_hi, uint64_t r_lo) {
    snprintf(buf, cap, "%s%016llx%016llx", prefix ? prefix : "", (unsigned long long)r_hi,
             (unsigned long long)r_lo);
}
