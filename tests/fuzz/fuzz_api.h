/*
 * fuzz_api.h — the body of the two request-parser targets (fuzz_api_chat.c,
 * fuzz_api_completion.c): parse the input as a request body with
 * api_parse_chat() or api_parse_completion() (server/api.c) under server
 * limits, then check what the contract in api.h promises.
 *
 * Why: these bodies come straight from the network, before any
 * authentication of their content. On success the request must be within
 * its documented ranges (roles, stop count, top_logprobs, max_tokens under
 * the limit, a session id the store accepts), and the response built from
 * its text must be valid JSON; on failure the error must be a 400 with a
 * message whose JSON form is valid, and the request must be empty (freeing
 * it again is safe: ASan catches a double free).
 */
#ifndef KP_FUZZ_API_H
#define KP_FUZZ_API_H

#include <jansson.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "server/api.h"
#include "storage/store.h"

#define FZ_API_MAX_TOKENS 4096
#define FZ_API_MAX_MESSAGES 16

static inline void fz_json_ok(char *s) {
    if (!s) __builtin_trap();
    json_error_t je;
    json_t *j = json_loads(s, 0, &je);
    if (!j) __builtin_trap(); /* we wrote JSON that does not parse */
    json_decref(j);
    free(s);
}

static inline void fz_check_ok(const api_request *r, enum api_kind kind) {
    if (r->kind != kind) __builtin_trap();
    if (r->max_tokens != -1 && (r->max_tokens < 1 || r->max_tokens > FZ_API_MAX_TOKENS)) __builtin_trap();
    if (r->n_stop < 0 || r->n_stop > API_MAX_STOP) __builtin_trap();
    for (int i = 0; i < r->n_stop; i++)
        if (!r->stop[i]) __builtin_trap();
    if (r->top_logprobs < 0 || r->top_logprobs > API_MAX_TOP_LOGPROBS) __builtin_trap();
    if (r->session_id[0] && (!api_session_id_valid(r->session_id) || !store_id_valid(r->session_id)))
        __builtin_trap();
    const sample_params *sp = &r->sp;
    if (!(sp->temperature >= 0 && sp->temperature <= 2) || !(sp->top_p > 0 && sp->top_p <= 1) ||
        !(sp->min_p >= 0 && sp->min_p <= 1) || sp->top_k < 0 || !isfinite(sp->presence_penalty) ||
        !isfinite(sp->frequency_penalty) || !(sp->repeat_penalty > 0))
        __builtin_trap();
    const char *text = "";
    size_t text_len = 0;
    if (kind == API_CHAT) {
        if (r->n_msgs < 1 || r->n_msgs > FZ_API_MAX_MESSAGES || !r->msgs) __builtin_trap();
        for (size_t i = 0; i < r->n_msgs; i++) {
            const char *role = r->msgs[i].role;
            if (!role || !r->msgs[i].content ||
                (strcmp(role, "system") && strcmp(role, "user") && strcmp(role, "assistant")))
                __builtin_trap();
        }
        text = r->msgs[r->n_msgs - 1].content;
        text_len = strlen(text);
    } else {
        if (r->n_prompts < 1 || r->n_prompts > API_MAX_PROMPTS || !r->prompts) __builtin_trap();
        for (size_t i = 0; i < r->n_prompts; i++) {
            const api_prompt *p = &r->prompts[i];
            if (!p->text && (!p->ids || p->n_ids < 1)) __builtin_trap();
        }
        if (r->prompts[0].text) {
            text = r->prompts[0].text;
            text_len = strlen(text);
        }
    }
    /* The parsed text echoed back (as if generated): the response builders
     * must emit valid JSON whatever bytes the client sent. */
    api_result res = {.id = "fuzz", .created = 1, .model = r->model, .session_id = r->session_id,
                      .text = text, .text_len = text_len, .finish = API_FINISH_STOP,
                      .prompt_tokens = 1, .completion_tokens = 1};
    fz_json_ok(kind == API_CHAT ? api_chat_response_json(&res) : api_completion_response_json(&res));
    fz_json_ok(kind == API_CHAT ? api_chat_chunk_json(&res, API_CHUNK_CONTENT)
                                : api_completion_chunk_json(&res, API_CHUNK_CONTENT));
}

static inline int fz_api_one(const uint8_t *data, size_t size, enum api_kind kind) {
    const api_limits lim = {.max_tokens_limit = FZ_API_MAX_TOKENS, .max_messages = FZ_API_MAX_MESSAGES};
    api_request r;
    api_error e;
    memset(&e, 0, sizeof e);
    int rc = kind == API_CHAT ? api_parse_chat((const char *)data, size, &lim, &r, &e)
                              : api_parse_completion((const char *)data, size, &lim, &r, &e);
    if (rc == 0) {
        fz_check_ok(&r, kind);
    } else {
        if (rc > 0 || e.http_status != 400 || !e.message[0]) __builtin_trap();
        if (r.msgs || r.prompts || r.model || r.n_stop) __builtin_trap(); /* "*out is then empty" */
        fz_json_ok(api_error_json(&e));
    }
    api_request_free(&r);
    api_request_free(&r); /* freeing an emptied request is safe */
    return 0;
}

#endif
