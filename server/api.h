/*
 * api.h — the OpenAI-compatible protocol layer, without HTTP.
 *
 * Why: the HTTP front end (libmicrohttpd) should only move bytes. Everything
 * about the wire format lives here as pure functions, so it can be unit-tested:
 * request JSON -> validated api_request, results -> response JSON, and the
 * OpenAI error shape {"error":{"message","type","param","code"}}.
 *
 * Contract
 *   - api_parse_chat() (POST /v1/chat/completions) and api_parse_completion()
 *     (POST /v1/completions) return 0 and fill *out, or a negative KP_E* code
 *     and fill *err with a 400 error naming the offending field in `param`
 *     (code "invalid_json", "invalid_type" or "invalid_value"; "unsupported"
 *     for things kvpark refuses on purpose). *out is then empty (safe to free).
 *   - Optional fields given as JSON null count as absent. Unknown fields are
 *     ignored, as OpenAI does.
 *   - Bodies nested deeper than API_MAX_DEPTH are refused before jansson sees
 *     them; strings must be valid UTF-8 without \u0000 (jansson checks).
 *   - Roles: system, user, assistant; developer is read as system; tool and
 *     function are refused. content is a string or an array of
 *     {"type":"text","text":...} parts, joined with "\n"; assistant content
 *     may be null (read as ""). `name` is ignored.
 *   - Completion prompt: a string, an array of exactly one string, an array
 *     of token ids, or an array of exactly one array of token ids. Several
 *     prompts would mean several choices, and kvpark makes one choice per
 *     request, so longer arrays are refused ("send one request per prompt").
 *     For /v1/completions `logprobs` is the legacy integer 0..5 (number of
 *     alternatives) or a bool.
 *   - Response builders return malloc'd compact JSON (NULL only when out of
 *     memory). Text is emitted as valid UTF-8: invalid bytes become U+FFFD.
 *     A logprob of -inf (not representable in JSON) is written as -9999.0,
 *     as OpenAI does.
 *   - No global state; ids are made by the caller (api_make_id).
 */
#ifndef KP_API_H
#define KP_API_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/chat.h"
#include "kernels/kp.h"
#include "engine/grammar.h"
#include "engine/sample.h"

#define API_MAX_DEPTH 64
#define API_MAX_STOP 4
#define API_MAX_TOP_LOGPROBS 20
#define API_MAX_LOGIT_BIAS 1024 /* logit_bias entries per request */
#define API_SESSION_ID_MAX 64

/* Server-side limits applied while parsing; NULL = no limits. */
typedef struct api_limits {
    int32_t max_tokens_limit; /* max_tokens above this -> 400; 0 = no limit */
    size_t max_messages;      /* more messages -> 400; 0 = no limit */
} api_limits;

typedef struct api_error {
    int http_status;
    char type[32];   /* "invalid_request_error", "authentication_error", ... */
    char code[32];   /* "" -> null in JSON */
    char param[64];  /* "" -> null in JSON */
    char message[512];
} api_error;

enum api_kind { API_CHAT = 0, API_COMPLETION = 1 };

/* One completion prompt: text, or token ids when text is NULL. */
typedef struct api_prompt {
    char *text;
    int32_t *ids;          /* [n_ids] */
    size_t n_ids;
} api_prompt;

#define API_MAX_PROMPTS 64

typedef struct api_request {
    enum api_kind kind;
    char *model;           /* the "model" string, or NULL (absent / not a string) */
    /* chat: roles are the static strings "system"/"user"/"assistant";
     * contents are owned (malloc'd) by the request. */
    chat_msg *msgs;        /* [n_msgs] */
    size_t n_msgs;
    /* completion prompts */
    api_prompt *prompts;   /* [n_prompts] (1..API_MAX_PROMPTS); one choice each */
    size_t n_prompts;
    int32_t max_tokens;    /* -1 = not given (generate until EOS / context full) */
    sample_params sp;      /* sample_default_params() + the request's fields;
                              seed = SAMPLE_SEED_RANDOM when not given */
    bool has_seed;
    char *stop[API_MAX_STOP];
    int n_stop;
    bool logprobs;
    int top_logprobs;      /* 0..20 */
    bool stream;
    bool include_usage;    /* stream_options.include_usage */
    bool ignore_eos;       /* extension (llama.cpp server): generate past EOS */
    /* logit_bias: token id -> bias in [-100, 100], sorted by id, ids unique
     * and >= 0 (the vocabulary bound is the server's to check) */
    sample_bias *bias;     /* [n_bias] */
    size_t n_bias;
    char session_id[API_SESSION_ID_MAX + 1]; /* "" = none */
    /* chat response_format: NULL for absent / {"type":"text"}; else the
     * compiled grammar of {"type":"json_object"} or of
     * {"type":"json_schema","json_schema":{"name","schema","strict"}}
     * (engine/grammar.h; a schema it does not support is a 400 naming the
     * keyword). Owned by the request. */
    gram *grammar;
} api_request;

int api_parse_chat(const char *body, size_t len, const api_limits *lim, api_request *out,
                   api_error *err);
int api_parse_completion(const char *body, size_t len, const api_limits *lim,
                         api_request *out, api_error *err);
void api_request_free(api_request *r);

/* The body as a JSON object (jansson), after the nesting-depth check every
 * endpoint gets: 0, or a 400 in *e (empty body, bad JSON or UTF-8, too deep,
 * not an object). For parsers of other endpoints (server/api_embed.c). */
struct json_t;
int api_load_object(const char *body, size_t len, struct json_t **root, api_error *e);

/* 1 if s matches [A-Za-z0-9_-]{1,64}. */
bool api_session_id_valid(const char *s);

/* ---- errors ---------------------------------------------------------- */

/* {"error":{"message":...,"type":...,"param":null|"x","code":null|"x"}} */
char *api_error_json(const api_error *e);

/* Fill *e (any field may be "" / NULL -> null); returns KP_EINVAL for 400s
 * and other codes as noted, so error paths read `return api_error_set(...)`. */
int api_error_set(api_error *e, int http_status, const char *type, const char *code,
                  const char *param, const char *fmt, ...)
    __attribute__((format(printf, 6, 7)));
void api_error_bad_key(api_error *e);                         /* 401 */
void api_error_unknown_route(api_error *e, const char *method, const char *path); /* 404 */
void api_error_unknown_session(api_error *e, const char *session_id);            /* 404 */
void api_error_unknown_model(api_error *e, const char *model);                    /* 404 */
void api_error_body_too_large(api_error *e, size_t limit_bytes);                  /* 413 */
void api_error_queue_full(api_error *e, int queue_len);                           /* 429 */
void api_error_not_ready(api_error *e, const char *why /* e.g. "the model is loading" */); /* 503 */
void api_error_server(api_error *e, const char *what);                            /* 500 */
/* 400 context_length_exceeded; param "messages" (chat) or "prompt". */
void api_error_context_overflow(api_error *e, enum api_kind kind, int32_t n_ctx,
                                int32_t n_prompt, int32_t n_completion);

/* ---- responses ------------------------------------------------------- */

enum api_finish { API_FINISH_NONE = 0, API_FINISH_STOP, API_FINISH_LENGTH };

typedef struct api_logprob {
    const char *token;  /* the token's bytes (may be a partial UTF-8 sequence) */
    size_t token_len;
    float logprob;
} api_logprob;

typedef struct api_token_logprob {
    api_logprob tok;          /* the chosen token */
    const api_logprob *top;   /* [n_top] alternatives, most likely first */
    int n_top;
} api_token_logprob;

typedef struct api_result {
    const char *id;           /* "chatcmpl-..." / "cmpl-..." (api_make_id) */
    int64_t created;          /* unix seconds */
    const char *model;        /* echoed back; NULL -> "" */
    const char *session_id;   /* NULL or "" -> field omitted */
    const char *text;         /* content (full response) or delta (chunk) */
    size_t text_len;
    enum api_finish finish;
    bool has_logprobs;        /* false -> "logprobs": null */
    const api_token_logprob *logprobs; /* [n_logprobs], one per token of text */
    size_t n_logprobs;
    size_t text_offset0;      /* completions: characters of the choice's text before
                                 logprobs[0] (a stream's later chunks), for text_offset */
    int32_t prompt_tokens, completion_tokens, cached_tokens;
    bool include_usage;       /* chunks: add "usage": null to non-usage chunks */
} api_result;

/* Characters (Unicode code points) in n bytes of UTF-8: the bytes that do
 * not continue a sequence, so a token ending mid-character counts the
 * character once, where it starts. */
size_t api_utf8_chars(const char *s, size_t n);

/* Writes prefix + 32 hex digits from the two random words into buf. */
void api_make_id(char *buf, size_t cap, const char *prefix, uint64_t r_hi, uint64_t r_lo);

char *api_chat_response_json(const api_result *r);
char *api_completion_response_json(const api_result *r);

enum api_chunk_kind {
    API_CHUNK_ROLE,    /* chat: delta {role:"assistant", content:""} (first chunk) */
    API_CHUNK_CONTENT, /* delta {content: r->text} (+ logprobs of those tokens) */
    API_CHUNK_FINISH,  /* empty delta, finish_reason r->finish */
    API_CHUNK_USAGE,   /* choices [] and usage from r (stream_options.include_usage) */
};
char *api_chat_chunk_json(const api_result *r, enum api_chunk_kind kind);
/* Completion chunks (object "text_completion", choices[0].text); ROLE gives
 * an empty-text chunk. */
char *api_completion_chunk_json(const api_result *r, enum api_chunk_kind kind);

/* "data: <json>\n\n" (malloc'd) and the terminator. */
char *api_sse_event(const char *json);
#define API_SSE_DONE "data: [DONE]\n\n"

/* {"object":"list","data":[{"id","object":"model","created","owned_by":"kvpark"}]} */
char *api_models_json(const char *model_id, int64_t created);
/* GET /v1/models/{id}: the one model object. */
char *api_model_json(const char *model_id, int64_t created);

/* Copy of s[0..len) with invalid UTF-8 replaced by U+FFFD (malloc'd, NUL-terminated;
 * *out_len may be NULL). */
char *api_utf8_sanitize(const char *s, size_t len, size_t *out_len);

#endif
