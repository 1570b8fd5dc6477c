/*
 * http.c — `kvpark serve`: OpenAI-compatible routes over libmicrohttpd.
 *
 * Reading guide:
 *   1. server state, sessions table, metrics          (struct server, session)
 *   2. small HTTP helpers: replies, auth, logging     (reply_*, check_key)
 *   3. generation: a request becomes a scheduler job; its tokens are turned
 *      into text (stop sequences held back), SSE chunks or one JSON body,
 *      streamed by a content-reader callback          (gen_*, on_token, on_done)
 *   4. the sessions API                               (sessions_*)
 *   5. routing (handle) and the daemon's life         (http_serve)
 *
 * Threads: libmicrohttpd runs one thread per connection (so a handler may
 * wait for its generation), the scheduler thread owns the model, and the
 * main thread waits for SIGINT/SIGTERM. The sessions table has one mutex.
 */
#include "server/http.h"

#include <errno.h>
#include <arpa/inet.h>
#include <jansson.h>
#include <microhttpd.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "engine/chat.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tok.h"
#include "server/api.h"
#include "server/metrics.h"
#include "server/stop.h"
#include "server/sessions.h"

/* ------------------------------------------------------------------ */
/* 1. state                                                            */

typedef struct server {
    http_opts o;
    model *m;
    sched *sch;
    sess_table *sessions;
    const tok_vocab *vocab;
    enum chat_template tmpl;
    char model_id[256];
    char codec_name[256];
    int n_ctx;
    int64_t created;
    atomic_bool ready;
    uint64_t key_hash[HTTP_MAX_KEYS];

    metrics_registry *reg;
    metrics_family *m_requests, *m_ttft, *m_tpot, *m_duration, *m_prompt_tokens, *m_gen_tokens,
        *m_cache_hits, *m_restore, *m_parks, *m_session_events;
} server;

/* ------------------------------------------------------------------ */
/* 2. HTTP helpers                                                     */

static double unix_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* The status of the last reply queued on this connection's thread (one
 * thread per connection), read back by handle() for logs and metrics. */
static _Thread_local int tls_status;

static enum MHD_Result reply_raw(struct MHD_Connection *c, int status, const char *ctype,
                                 const char *body, size_t len, const char *session_id) {
    tls_status = status;
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", ctype);
    if (session_id && *session_id) MHD_add_response_header(r, "X-Session-Id", session_id);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)status, r);
    MHD_destroy_response(r);
    return ok;
}

static enum MHD_Result reply_json(struct MHD_Connection *c, int status, char *json /* freed */,
                                  const char *session_id) {
    if (!json) return MHD_NO;
    enum MHD_Result ok = reply_raw(c, status, "application/json", json, strlen(json), session_id);
    free(json);
    return ok;
}

static enum MHD_Result reply_error(struct MHD_Connection *c, const api_error *e) {
    return reply_json(c, e->http_status, api_error_json(e), NULL);
}

/* Constant-time comparison of the bearer token with every configured key.
 * Returns the key's hash (owner id), 0 when auth is off, or 1 on failure
 * (hashes 0 and 1 are avoided for real keys by construction below). */
static uint64_t key_hash_of(const char *key) {
    uint64_t h = XXH64(key, strlen(key), 0x6b7670);
    return h < 2 ? h + 2 : h;
}

static bool ct_equal(const char *a, const char *b) {
    size_t la = strlen(a), lb = strlen(b);
    unsigned char d = (unsigned char)(la != lb);
    for (size_t i = 0; i < la; i++) d |= (unsigned char)(a[i] ^ b[i % (lb ? lb : 1)]);
    return d == 0;
}

static const char *bearer(struct MHD_Connection *c) {
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0) return NULL;
    h += 7;
    while (*h == ' ') h++;
    return h;
}

/* 0: no auth configured; a key hash: authorised; 1: refused. */
static uint64_t check_key(server *s, struct MHD_Connection *c) {
    if (s->o.n_keys == 0) return 0;
    const char *k = bearer(c);
    if (!k) return 1;
    uint64_t found = 1;
    for (int i = 0; i < s->o.n_keys; i++)
        if (ct_equal(k, s->o.keys[i])) found = s->key_hash[i]; /* no early exit */
    return found;
}

static const char *endpoint_label(const char *url) {
    if (!strcmp(url, "/v1/chat/completions")) return "chat_completions";
    if (!strcmp(url, "/v1/completions")) return "completions";
    if (!strcmp(url, "/v1/models")) return "models";
    if (!strcmp(url, "/health")) return "health";
    if (!strcmp(url, "/metrics")) return "metrics";
    if (!strncmp(url, "/v1/sessions", 12)) return "sessions";
    return "other";
}

/* ------------------------------------------------------------------ */
/* per-request state                                                   */

typedef struct lp_entry {
    char tok[64];
    size_t tok_len;
    float lp;
    int n_top;
    char top_tok[API_MAX_TOP_LOGPROBS][64];
    size_t top_len[API_MAX_TOP_LOGPROBS];
    float top_lp[API_MAX_TOP_LOGPROBS];
} lp_entry;

typedef struct req_ctx req_ctx;

/* One choice being generated: a completion request with a batch of prompts
 * has several parts, every other request exactly one. */
typedef struct gen_part {
    req_ctx *r;
    int index;              /* choices[index] */
    sched_job job;
    int32_t *prompt;
    int n_prompt;
    stop_matcher stop;
    char *text;             /* generated text so far (after stop handling) */
    size_t text_len, text_cap;
    lp_entry *lps;          /* [n_lps] when logprobs were asked */
    size_t n_lps, cap_lps, lps_sent;
    bool submitted, done;
} gen_part;

struct req_ctx {
    server *s;
    /* request body */
    char *body;
    size_t len, cap;
    bool too_large;
    uint64_t owner;
    double t0;
    char method[8];
    char url[256];
    int status;
    /* generation */
    bool gen;               /* jobs were submitted and a streaming response queued */
    bool stream;
    enum api_kind kind;
    api_request req;
    gen_part *parts;        /* [n_parts] */
    int n_parts, n_done;
    sess *sess;             /* pinned until the response is complete (then NULL) */
    char sess_id[STORE_ID_MAX + 1]; /* its id, for the log after it was released */
    char id[64];
    int64_t created;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool finished;          /* every part ended and the output is complete */
    char *out;              /* bytes to send */
    size_t out_len, out_cap, out_pos;
    int fd;                 /* the client socket, to notice a hang-up */
};

static int buf_append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    if (*len + n + 1 > *cap) {
        size_t nc = (*cap ? *cap * 2 : 1024);
        while (nc < *len + n + 1) nc *= 2;
        char *p = realloc(*buf, nc);
        if (!p) return KP_ENOMEM;
        *buf = p;
        *cap = nc;
    }
    memcpy(*buf + *len, data, n);
    *len += n;
    (*buf)[*len] = 0;
    return 0;
}

static void totals(const req_ctx *r, int *in, int *cached, int *out, double *ttft) {
    *in = *cached = *out = 0;
    *ttft = 0;
    for (int i = 0; i < r->n_parts; i++) {
        const gen_part *p = &r->parts[i];
        if (!p->submitted) continue;
        *in += p->n_prompt;
        *cached += p->job.n_cached;
        *out += p->job.n_generated;
        if (p->job.t_first_token > 0 && (*ttft == 0 || p->job.t_first_token - p->job.t_submit < *ttft))
            *ttft = p->job.t_first_token - p->job.t_submit;
    }
}

static void log_request(req_ctx *r) {
    if (r->s->o.quiet) return;
    int in, cached, out;
    double ttft;
    totals(r, &in, &cached, &out, &ttft);
    fprintf(stderr, "kvpark: %s %s %s status=%d session=%s in=%d cached=%d out=%d ttft=%.1fms total=%.1fms\n",
            r->id[0] ? r->id : "-", r->method, r->url, r->status, r->sess_id[0] ? r->sess_id : "-", in, cached,
            out, ttft * 1e3, (kp_now() - r->t0) * 1e3);
}

/* ------------------------------------------------------------------ */
/* 3. generation                                                       */

static void fill_result(gen_part *p, api_result *res, const char *text, size_t len) {
    req_ctx *r = p->r;
    memset(res, 0, sizeof *res);
    res->id = r->id;
    res->created = r->created;
    res->model = r->req.model ? r->req.model : r->s->model_id;
    res->session_id = r->sess_id[0] ? r->sess_id : NULL;
    res->text = text;
    res->text_len = len;
    res->prompt_tokens = p->n_prompt;
    res->completion_tokens = p->job.n_generated;
    res->cached_tokens = p->job.n_cached;
    res->include_usage = r->req.include_usage;
    res->finish = p->job.finish == SCHED_LENGTH ? API_FINISH_LENGTH : API_FINISH_STOP;
}

/* Build api_token_logprob views over lps[from, to). Caller frees *out and *tops. */
static void lp_views(gen_part *p, size_t from, size_t to, api_token_logprob **out, api_logprob **tops) {
    size_t n = to - from;
    *out = calloc(n ? n : 1, sizeof **out);
    *tops = calloc((n ? n : 1) * API_MAX_TOP_LOGPROBS, sizeof **tops);
    if (!*out || !*tops) return;
    for (size_t i = 0; i < n; i++) {
        lp_entry *e = &p->lps[from + i];
        api_token_logprob *t = &(*out)[i];
        t->tok = (api_logprob){e->tok, e->tok_len, e->lp};
        api_logprob *tp = *tops + i * API_MAX_TOP_LOGPROBS;
        for (int k = 0; k < e->n_top; k++) tp[k] = (api_logprob){e->top_tok[k], e->top_len[k], e->top_lp[k]};
        t->top = tp;
        t->n_top = e->n_top;
    }
}

/* Set choices[*].index of a response or chunk to `index` (batches only). */
static char *with_index(char *json, int index) {
    if (!json || index == 0) return json;
    json_t *j = json_loads(json, 0, NULL);
    json_t *ch = j ? json_object_get(j, "choices") : NULL;
    for (size_t i = 0; i < json_array_size(ch); i++)
        json_object_set_new(json_array_get(ch, i), "index", json_integer(index));
    char *out = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!out) return json;
    free(json);
    return out;
}

/* Append one SSE event with a chunk of the given kind (caller holds r->mu). */
static void push_chunk(gen_part *p, enum api_chunk_kind kind, const char *text, size_t len,
                       bool with_lps) {
    req_ctx *r = p->r;
    api_result res;
    fill_result(p, &res, text, len);
    if (kind == API_CHUNK_USAGE) { /* usage of the whole request */
        int in, cached, out;
        double ttft;
        totals(r, &in, &cached, &out, &ttft);
        res.prompt_tokens = in;
        res.cached_tokens = cached;
        res.completion_tokens = out;
    }
    api_token_logprob *v = NULL;
    api_logprob *tops = NULL;
    if (with_lps && r->req.logprobs && p->lps_sent < p->n_lps) {
        lp_views(p, p->lps_sent, p->n_lps, &v, &tops);
        if (v && tops) {
            res.has_logprobs = true;
            res.logprobs = v;
            res.n_logprobs = p->n_lps - p->lps_sent;
            p->lps_sent = p->n_lps;
        }
    }
    char *json = r->kind == API_CHAT ? api_chat_chunk_json(&res, kind) : api_completion_chunk_json(&res, kind);
    if (kind != API_CHUNK_USAGE) json = with_index(json, p->index);
    char *ev = json ? api_sse_event(json) : NULL;
    if (ev) buf_append(&r->out, &r->out_len, &r->out_cap, ev, strlen(ev));
    free(ev);
    free(json);
    free(v);
    free(tops);
}

/* Text that passed the stop matcher: keep it, and stream it. */
static void emit_text(gen_part *p, const char *t, size_t n) {
    if (n == 0) return;
    buf_append(&p->text, &p->text_len, &p->text_cap, t, n);
    if (p->r->stream) push_chunk(p, API_CHUNK_CONTENT, t, n, true);
}

static void record_logprobs(gen_part *p, int32_t id, const float *logits) {
    server *s = p->r->s;
    if (p->n_lps == p->cap_lps) {
        size_t nc = p->cap_lps ? p->cap_lps * 2 : 64;
        lp_entry *np = realloc(p->lps, nc * sizeof *np);
        if (!np) return;
        p->lps = np;
        p->cap_lps = nc;
    }
    lp_entry *e = &p->lps[p->n_lps++];
    memset(e, 0, sizeof *e);
    int32_t top_ids[API_MAX_TOP_LOGPROBS];
    float top_lp[API_MAX_TOP_LOGPROBS];
    int n_top = p->r->req.top_logprobs;
    e->lp = sample_logprobs(logits, model_hp(s->m)->n_vocab, id, n_top, top_ids, top_lp);
    int len = tok_piece(s->vocab, id, false, e->tok, sizeof e->tok);
    e->tok_len = len > 0 ? (size_t)KP_MIN(len, (int)sizeof e->tok) : 0;
    e->n_top = n_top;
    for (int k = 0; k < n_top; k++) {
        len = tok_piece(s->vocab, top_ids[k], false, e->top_tok[k], sizeof e->top_tok[k]);
        e->top_len[k] = len > 0 ? (size_t)KP_MIN(len, (int)sizeof e->top_tok[k]) : 0;
        e->top_lp[k] = top_lp[k];
    }
}

static int on_token(sched_job *job, int32_t id, const float *logits) {
    gen_part *p = job->ud;
    req_ctx *r = p->r;
    char piece[256];
    int len = tok_piece(r->s->vocab, id, false, piece, sizeof piece);
    if (len < 0) len = 0;
    if (len > (int)sizeof piece) len = (int)sizeof piece;
    pthread_mutex_lock(&r->mu);
    if (r->req.logprobs) record_logprobs(p, id, logits);
    const char *emit;
    size_t emit_len;
    int stopped = stop_feed(&p->stop, piece, (size_t)len, &emit, &emit_len);
    emit_text(p, emit, emit_len);
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return stopped;
}

/* The whole non-streaming response once every part has ended (r->mu held). */
static void finish_response(req_ctx *r) {
    if (r->status >= 500) {
        api_error e;
        const char *msg = "generation failed";
        for (int i = 0; i < r->n_parts; i++)
            if (r->parts[i].job.finish == SCHED_ERROR && r->parts[i].job.err.msg[0]) msg = r->parts[i].job.err.msg;
        api_error_server(&e, msg);
        char *json = api_error_json(&e);
        if (json) buf_append(&r->out, &r->out_len, &r->out_cap, json, strlen(json));
        free(json);
        return;
    }
    json_t *all = NULL;
    for (int i = 0; i < r->n_parts; i++) {
        gen_part *p = &r->parts[i];
        api_result res;
        fill_result(p, &res, p->text ? p->text : "", p->text_len);
        api_token_logprob *v = NULL;
        api_logprob *tops = NULL;
        if (r->req.logprobs) {
            lp_views(p, 0, p->n_lps, &v, &tops);
            if (v && tops) {
                res.has_logprobs = true;
                res.logprobs = v;
                res.n_logprobs = p->n_lps;
            }
        }
        if (r->n_parts > 1) { /* usage of the whole request on every choice's draft */
            int in, cached, out;
            double ttft;
            totals(r, &in, &cached, &out, &ttft);
            res.prompt_tokens = in;
            res.cached_tokens = cached;
            res.completion_tokens = out;
        }
        char *json = r->kind == API_CHAT ? api_chat_response_json(&res) : api_completion_response_json(&res);
        free(v);
        free(tops);
        json = with_index(json, p->index);
        if (r->n_parts == 1) {
            if (json) buf_append(&r->out, &r->out_len, &r->out_cap, json, strlen(json));
            free(json);
            return;
        }
        json_t *j = json ? json_loads(json, 0, NULL) : NULL;
        free(json);
        if (!j) continue;
        if (!all) all = j;
        else {
            json_array_extend(json_object_get(all, "choices"), json_object_get(j, "choices"));
            json_decref(j);
        }
    }
    char *txt = all ? json_dumps(all, JSON_COMPACT) : NULL;
    json_decref(all);
    if (txt) buf_append(&r->out, &r->out_len, &r->out_cap, txt, strlen(txt));
    free(txt);
}

static void on_done(sched_job *job) {
    gen_part *p = job->ud;
    req_ctx *r = p->r;
    server *s = r->s;
    pthread_mutex_lock(&r->mu);
    const char *emit;
    size_t emit_len;
    if (job->finish != SCHED_STOP || !p->stop.stopped) {
        stop_flush(&p->stop, &emit, &emit_len);
        emit_text(p, emit, emit_len);
    }
    if (job->finish == SCHED_ERROR) r->status = 500;
    else if (job->finish == SCHED_CANCELED && r->status < 500) r->status = 499;
    else if (r->stream) push_chunk(p, API_CHUNK_FINISH, "", 0, false);
    if (job->finish != SCHED_ERROR && job->finish != SCHED_CANCELED) {
        metrics_add(s->m_prompt_tokens, p->n_prompt, NULL, NULL);
        metrics_add(s->m_gen_tokens, job->n_generated, NULL, NULL);
        metrics_add(s->m_cache_hits, job->n_cached, NULL, NULL);
        if (job->t_first_token > 0) {
            metrics_observe(s->m_ttft, job->t_first_token - job->t_submit, NULL, NULL);
            if (job->n_generated > 1)
                metrics_observe(s->m_tpot, (job->t_done - job->t_first_token) / (job->n_generated - 1),
                                NULL, NULL);
        }
    }
    p->done = true;
    if (++r->n_done == r->n_parts) { /* the last part: complete the response */
        if (r->stream) {
            if (r->status < 400) {
                if (r->req.include_usage) push_chunk(p, API_CHUNK_USAGE, "", 0, false);
                buf_append(&r->out, &r->out_len, &r->out_cap, API_SSE_DONE, strlen(API_SSE_DONE));
            }
        } else {
            finish_response(r);
        }
        r->finished = true;
    }
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
}

static void cancel_all(req_ctx *r) {
    for (int i = 0; i < r->n_parts; i++) atomic_store(&r->parts[i].job.cancel, true);
}

static bool client_gone(int fd) {
    if (fd < 0) return false;
    struct pollfd p = {.fd = fd, .events = POLLRDHUP};
    return poll(&p, 1, 0) > 0 && (p.revents & (POLLRDHUP | POLLHUP | POLLERR));
}

/* libmicrohttpd pulls the response body from here (on the connection's own
 * thread): wait for bytes, hand them over; notice a client that left. */
static ssize_t gen_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    req_ctx *r = cls;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        if (r->out_pos < r->out_len) {
            size_t n = KP_MIN(max, r->out_len - r->out_pos);
            memcpy(buf, r->out + r->out_pos, n);
            r->out_pos += n;
            pthread_mutex_unlock(&r->mu);
            return (ssize_t)n;
        }
        if (r->finished) {
            /* Every byte is handed over: unpin the session now, before the
             * client can see the end of the response, so that its next
             * request (a DELETE, a save) does not find it "in use". */
            sess *x = r->sess;
            r->sess = NULL;
            pthread_mutex_unlock(&r->mu);
            if (x) sess_release(r->s->sessions, x, true);
            return r->status >= 500 && r->stream ? MHD_CONTENT_READER_END_WITH_ERROR
                                                 : MHD_CONTENT_READER_END_OF_STREAM;
        }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 100 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&r->cv, &r->mu, &ts);
        if (!r->finished && r->out_pos == r->out_len && client_gone(r->fd)) {
            cancel_all(r);
            pthread_mutex_unlock(&r->mu);
            return MHD_CONTENT_READER_END_WITH_ERROR;
        }
    }
}

/* Tokenise prompt i of the request into p->prompt; an api_error on failure. */
static int tokenize_part(server *s, req_ctx *r, int i, gen_part *p, api_error *e) {
    kp_err err = {0};
    size_t n = 0;
    int rc = 0;
    char param[32];
    if (r->kind == API_CHAT) snprintf(param, sizeof param, "messages");
    else if (r->req.n_prompts > 1) snprintf(param, sizeof param, "prompt[%d]", i);
    else snprintf(param, sizeof param, "prompt");
    if (r->kind == API_CHAT) {
        char *text = NULL;
        int32_t b = tok_bos(s->vocab), eo = tok_eos(s->vocab);
        rc = chat_apply(s->tmpl, r->req.msgs, r->req.n_msgs, true, b >= 0 ? tok_text(s->vocab, b) : "",
                        eo >= 0 ? tok_text(s->vocab, eo) : "", &text, &err);
        if (!rc) rc = tok_encode(s->vocab, text, strlen(text), true, true, &p->prompt, &n, &err);
        free(text);
    } else if (r->req.prompts[i].text) {
        const char *t = r->req.prompts[i].text;
        rc = tok_encode(s->vocab, t, strlen(t), true, true, &p->prompt, &n, &err);
    } else {
        const api_prompt *ap = &r->req.prompts[i];
        n = ap->n_ids;
        p->prompt = malloc(sizeof *p->prompt * (n ? n : 1));
        if (!p->prompt) return api_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        memcpy(p->prompt, ap->ids, sizeof *p->prompt * n);
        for (size_t k = 0; k < n; k++)
            if (p->prompt[k] < 0 || p->prompt[k] >= model_hp(s->m)->n_vocab)
                return api_error_set(e, 400, "invalid_request_error", "invalid_value", param,
                                     "token id %d in 'prompt' is outside the vocabulary (0..%d)", p->prompt[k],
                                     model_hp(s->m)->n_vocab - 1);
    }
    if (rc)
        return api_error_set(e, 400, "invalid_request_error", "invalid_value", param, "%s",
                             err.msg[0] ? err.msg : "cannot tokenise the prompt");
    if (n == 0) return api_error_set(e, 400, "invalid_request_error", "invalid_value", param, "the prompt is empty");
    p->n_prompt = (int)n;
    return 0;
}

static enum MHD_Result start_generation(server *s, struct MHD_Connection *c, req_ctx *r,
                                        enum api_kind kind) {
    api_error e;
    memset(&e, 0, sizeof e);
    api_limits lim = {.max_tokens_limit = 0, .max_messages = 0};
    int rc = kind == API_CHAT ? api_parse_chat(r->body ? r->body : "", r->len, &lim, &r->req, &e)
                              : api_parse_completion(r->body ? r->body : "", r->len, &lim, &r->req, &e);
    if (rc) return reply_error(c, &e);
    r->kind = kind;
    r->stream = r->req.stream;
    r->n_parts = kind == API_CHAT ? 1 : (int)r->req.n_prompts;
    r->parts = calloc((size_t)r->n_parts, sizeof *r->parts);
    if (!r->parts) {
        api_error_server(&e, "out of memory");
        return reply_error(c, &e);
    }

    /* the prompts and the token budget */
    int32_t max_tokens = r->req.max_tokens;
    bool explicit_max = max_tokens > 0;
    if (!explicit_max) max_tokens = s->o.max_tokens_default > 0 ? s->o.max_tokens_default : s->n_ctx;
    for (int i = 0; i < r->n_parts; i++) {
        gen_part *p = &r->parts[i];
        p->r = r;
        p->index = i;
        if (tokenize_part(s, r, i, p, &e)) return reply_error(c, &e);
        if (p->n_prompt >= s->n_ctx || (explicit_max && p->n_prompt + max_tokens > s->n_ctx)) {
            api_error_context_overflow(&e, kind, s->n_ctx, p->n_prompt, explicit_max ? max_tokens : 0);
            return reply_error(c, &e);
        }
    }

    /* the session */
    const char *hsid = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Session-Id");
    const char *sid = r->req.session_id[0] ? r->req.session_id : hsid;
    if (r->req.session_id[0] && hsid && *hsid && strcmp(hsid, r->req.session_id) != 0) {
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", "session_id",
                      "the X-Session-Id header (%.64s) and the body's session_id (%s) name different "
                      "sessions", hsid, r->req.session_id);
        return reply_error(c, &e);
    }
    if (sid && *sid && r->n_parts > 1) {
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", "session_id",
                      "a session holds one conversation: send one prompt per request on a session");
        return reply_error(c, &e);
    }
    if (sid && *sid) {
        kp_err err = {0};
        char from[STORE_TIER_MAX];
        double ms = 0;
        rc = sess_acquire(s->sessions, sid, r->owner, s->o.n_keys > 0, &r->sess, from, &ms, &err);
        if (rc == KP_ENOTFOUND) {
            api_error_unknown_session(&e, sid);
            return reply_error(c, &e);
        }
        if (rc) {
            api_error_set(&e, 409, "invalid_request_error", "session_unavailable", "session_id",
                          "session %s cannot be restored: %s", sid, err.msg);
            return reply_error(c, &e);
        }
        snprintf(r->sess_id, sizeof r->sess_id, "%s", sess_id(r->sess));
        if (strcmp(from, "hot") != 0 && strcmp(from, "empty") != 0) metrics_observe(s->m_restore, ms / 1e3, from, NULL);
    }

    uint64_t rnd[2] = {0, 0};
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) rnd[0] = (uint64_t)(kp_now() * 1e9);
    api_make_id(r->id, sizeof r->id, kind == API_CHAT ? "chatcmpl-" : "cmpl-", rnd[0], rnd[1]);
    r->created = (int64_t)unix_now();
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
    r->fd = ci ? ci->connect_fd : -1;
    r->status = 200;

    /* one scheduler job per part */
    int submitted = 0;
    kp_err err = {0};
    for (int i = 0; i < r->n_parts && !rc; i++) {
        gen_part *p = &r->parts[i];
        if ((rc = stop_init(&p->stop, (const char *const *)r->req.stop, r->req.n_stop, &err))) break;
        sched_job *j = &p->job;
        memset(j, 0, sizeof *j);
        j->seq = r->sess ? sess_seq(r->sess) : NULL;
        j->prompt = p->prompt;
        j->n_prompt = p->n_prompt;
        j->max_tokens = KP_MIN(max_tokens, s->n_ctx - p->n_prompt);
        j->ignore_eos = r->req.ignore_eos;
        j->sampling = r->req.sp;
        j->on_token = on_token;
        j->on_done = on_done;
        j->ud = p;
        atomic_init(&j->cancel, false);
        if (r->stream) {
            pthread_mutex_lock(&r->mu);
            push_chunk(p, API_CHUNK_ROLE, "", 0, false);
            pthread_mutex_unlock(&r->mu);
        }
        if ((rc = sched_submit(s->sch, j, &err))) break;
        p->submitted = true;
        submitted++;
    }
    if (rc) {
        /* take back what was submitted, then answer with the error */
        pthread_mutex_lock(&r->mu);
        cancel_all(r);
        r->n_parts = submitted; /* on_done counts against the submitted parts only */
        while (r->n_done < submitted) pthread_cond_wait(&r->cv, &r->mu);
        pthread_mutex_unlock(&r->mu);
        if (r->sess) {
            sess_release(s->sessions, r->sess, submitted > 0);
            r->sess = NULL;
        }
        if (rc == KP_EBUSY) {
            int waiting = 0;
            sched_stats(s->sch, NULL, &waiting);
            api_error_queue_full(&e, waiting);
        } else if (rc == KP_ECANCELED) {
            api_error_not_ready(&e, "the server is shutting down");
        } else {
            api_error_set(&e, 400, "invalid_request_error", "invalid_value", NULL, "%s", err.msg);
        }
        return reply_error(c, &e);
    }
    r->gen = true;
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, gen_reader, r, NULL);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", r->stream ? "text/event-stream" : "application/json");
    if (r->stream) MHD_add_response_header(resp, "Cache-Control", "no-cache");
    if (r->sess) MHD_add_response_header(resp, "X-Session-Id", sess_id(r->sess));
    enum MHD_Result ok = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* ------------------------------------------------------------------ */
/* 4. sessions API                                                     */

static json_t *session_json(const sess_info *x) {
    return json_pack("{s:s, s:s, s:i, s:s, s:I, s:b, s:I}", "id", x->id, "object", "session", "tokens",
                     x->n_tokens, "tier", x->tier, "bytes", (json_int_t)x->bytes, "saved", x->saved,
                     "last_used", (json_int_t)x->last_use);
}

static enum MHD_Result reply_jansson(struct MHD_Connection *c, int status, json_t *j, const char *sid) {
    char *txt = j ? json_dumps(j, JSON_COMPACT) : NULL;
    json_decref(j);
    if (!txt) {
        api_error e;
        api_error_server(&e, "out of memory");
        return reply_error(c, &e);
    }
    return reply_json(c, status, txt, sid);
}

/* A session call's error as an HTTP answer. */
static enum MHD_Result reply_sess_error(struct MHD_Connection *c, int rc, const char *id, const char *what,
                                        const kp_err *err) {
    api_error e;
    if (rc == KP_ENOTFOUND) api_error_unknown_session(&e, id);
    else if (rc == KP_EBUSY)
        api_error_set(&e, 409, "invalid_request_error", "session_busy", NULL, "%s", err->msg);
    else if (rc == KP_EINVAL)
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", NULL, "%s", err->msg);
    else if (rc == KP_EFORMAT || rc == KP_ERANGE)
        api_error_set(&e, 409, "invalid_request_error", "session_unavailable", NULL, "session %s cannot be %s: %s",
                      id, what, err->msg);
    else
        api_error_set(&e, 500, "server_error", "session_failed", NULL, "session %s cannot be %s: %s", id, what,
                      err->msg[0] ? err->msg : "the server is shutting down");
    return reply_error(c, &e);
}

static enum MHD_Result handle_sessions(server *s, struct MHD_Connection *c, req_ctx *r, const char *url,
                                       const char *method) {
    api_error e;
    kp_err err = {0};
    bool check = s->o.n_keys > 0;
    const char *rest = url + strlen("/v1/sessions");
    if (*rest == 0 || !strcmp(rest, "/")) {
        if (!strcmp(method, "POST")) { /* create */
            sess_info info;
            int rc = sess_create(s->sessions, r->owner, &info, &err);
            if (rc == KP_EBUSY) {
                api_error_set(&e, 429, "rate_limit_error", "too_many_sessions", NULL, "%s", err.msg);
                return reply_error(c, &e);
            }
            if (rc) {
                api_error_server(&e, err.msg[0] ? err.msg : "cannot create a session");
                return reply_error(c, &e);
            }
            return reply_jansson(c, 200, session_json(&info), info.id);
        }
        if (!strcmp(method, "GET")) { /* list */
            sess_info *v = NULL;
            size_t n = 0;
            if (sess_list(s->sessions, r->owner, check, &v, &n)) {
                api_error_server(&e, "out of memory");
                return reply_error(c, &e);
            }
            json_t *arr = json_array();
            for (size_t i = 0; i < n; i++) json_array_append_new(arr, session_json(&v[i]));
            free(v);
            return reply_jansson(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", arr), NULL);
        }
        api_error_unknown_route(&e, method, url);
        return reply_error(c, &e);
    }
    /* /v1/sessions/{id}[/save|/restore] */
    char id[STORE_ID_MAX + 2] = {0};
    const char *p = rest + 1, *slash = strchr(p, '/');
    size_t idlen = slash ? (size_t)(slash - p) : strlen(p);
    const char *action = slash ? slash + 1 : "";
    if (idlen == 0 || idlen > STORE_ID_MAX) {
        api_error_unknown_route(&e, method, url);
        return reply_error(c, &e);
    }
    memcpy(id, p, idlen);
    sess_info info;
    if (!store_id_valid(id) || sess_get(s->sessions, id, r->owner, check, &info)) {
        api_error_unknown_session(&e, id);
        return reply_error(c, &e);
    }
    if (!*action && !strcmp(method, "GET")) return reply_jansson(c, 200, session_json(&info), id);
    if (!*action && !strcmp(method, "DELETE")) {
        int rc = sess_delete(s->sessions, id, r->owner, check, &err);
        if (rc) return reply_sess_error(c, rc, id, "deleted", &err);
        return reply_jansson(c, 200, json_pack("{s:s, s:s, s:b}", "id", id, "object", "session.deleted", "deleted", 1), NULL);
    }
    if (!strcmp(action, "restore") && !strcmp(method, "POST")) {
        double ms = 0;
        char from[STORE_TIER_MAX];
        sess *x = NULL;
        int rc = sess_acquire(s->sessions, id, r->owner, check, &x, from, &ms, &err);
        if (rc) return reply_sess_error(c, rc, id, "restored", &err);
        int n_tokens = sess_seq(x)->n_tokens;
        sess_release(s->sessions, x, false);
        if (strcmp(from, "hot") != 0 && strcmp(from, "empty") != 0) metrics_observe(s->m_restore, ms / 1e3, from, NULL);
        return reply_jansson(c, 200, json_pack("{s:s, s:s, s:s, s:i, s:f}", "id", id, "object", "session.restore",
                                               "from_tier", from, "tokens", n_tokens, "ms", ms), id);
    }
    if (!strcmp(action, "save") && !strcmp(method, "POST")) {
        store_save_stats st = {0};
        int rc = sess_save(s->sessions, id, r->owner, check, &st, &info, &err);
        if (rc) return reply_sess_error(c, rc, id, "saved", &err);
        double ratio = st.bytes_total ? (double)st.fp16_bytes / (double)st.bytes_total : 0;
        return reply_jansson(c, 200,
                             json_pack("{s:s, s:s, s:i, s:I, s:I, s:f, s:f, s:s, s:s}", "id", id, "object",
                                       "session.save", "tokens", info.n_tokens, "bytes", (json_int_t)info.bytes,
                                       "bytes_new", (json_int_t)st.bytes_new, "ratio_vs_fp16", ratio, "ms", st.ms,
                                       "codec", s->codec_name, "tier", info.tier),
                             id);
    }
    api_error_unknown_route(&e, method, url);
    return reply_error(c, &e);
}

/* ------------------------------------------------------------------ */
/* 5. routing and the daemon                                           */

static enum MHD_Result route(server *s, struct MHD_Connection *c, req_ctx *r, const char *url,
                             const char *method) {
    api_error e;
    bool open_route = !strcmp(url, "/health") || !strcmp(url, "/metrics");
    if (open_route) {
        if (s->o.metrics_key) {
            const char *k = bearer(c);
            if (!k || !ct_equal(k, s->o.metrics_key)) {
                api_error_bad_key(&e);
                return reply_error(c, &e);
            }
        }
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
            api_error_unknown_route(&e, method, url);
            return reply_error(c, &e);
        }
        if (!strcmp(url, "/health")) {
            if (!atomic_load(&s->ready)) {
                api_error_not_ready(&e, "the model is loading");
                return reply_error(c, &e);
            }
            const char *ok = "{\"status\":\"ok\"}";
            return reply_raw(c, 200, "application/json", ok, strlen(ok), NULL);
        }
        char *txt = metrics_render(s->reg);
        if (!txt) return MHD_NO;
        enum MHD_Result res = reply_raw(c, 200, "text/plain; version=0.0.4; charset=utf-8", txt, strlen(txt), NULL);
        free(txt);
        return res;
    }
    if (!atomic_load(&s->ready)) {
        api_error_not_ready(&e, "the model is loading");
        return reply_error(c, &e);
    }
    if (r->owner == 1) {
        api_error_bad_key(&e);
        return reply_error(c, &e);
    }
    if (!strcmp(url, "/v1/chat/completions") && !strcmp(method, "POST"))
        return start_generation(s, c, r, API_CHAT);
    if (!strcmp(url, "/v1/completions") && !strcmp(method, "POST"))
        return start_generation(s, c, r, API_COMPLETION);
    if (!strcmp(url, "/v1/models") && !strcmp(method, "GET"))
        return reply_json(c, 200, api_models_json(s->model_id, s->created), NULL);
    if (!strncmp(url, "/v1/sessions", 12) && (url[12] == 0 || url[12] == '/'))
        return handle_sessions(s, c, r, url, method);
    api_error_unknown_route(&e, method, url);
    return reply_error(c, &e);
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    (void)version;
    server *s = cls;
    req_ctx *r = *con_cls;
    if (!r) { /* first call: headers only */
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->s = s;
        r->t0 = kp_now();
        r->fd = -1;
        pthread_mutex_init(&r->mu, NULL);
        pthread_cond_init(&r->cv, NULL);
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->url, sizeof r->url, "%s", url);
        r->owner = check_key(s, c);
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > s->o.max_body) r->too_large = true;
        *con_cls = r;
        return MHD_YES;
    }
    if (*upload_size) { /* body bytes */
        if (!r->too_large && r->len + *upload_size > s->o.max_body) {
            r->too_large = true;
            free(r->body);
            r->body = NULL;
            r->len = r->cap = 0;
        }
        if (!r->too_large && buf_append(&r->body, &r->len, &r->cap, upload, *upload_size)) r->too_large = true;
        *upload_size = 0;
        return MHD_YES;
    }
    api_error e;
    enum MHD_Result res;
    if (r->too_large) {
        api_error_body_too_large(&e, s->o.max_body);
        r->status = 413;
        res = reply_error(c, &e);
    } else {
        tls_status = 0;
        res = route(s, c, r, url, method);
        if (!r->gen) r->status = tls_status;
    }
    return res;
}

/* Per-request cleanup; for generations, waits until the job has ended. */
static void completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    (void)c;
    server *s = cls;
    req_ctx *r = *con_cls;
    if (!r) return;
    if (r->gen) {
        pthread_mutex_lock(&r->mu);
        if (!r->finished) {
            cancel_all(r);
            while (!r->finished) pthread_cond_wait(&r->cv, &r->mu);
        }
        pthread_mutex_unlock(&r->mu);
        if (toe != MHD_REQUEST_TERMINATED_COMPLETED_OK && r->status == 200) r->status = 499;
        if (r->sess) sess_release(s->sessions, r->sess, true);
        metrics_observe(s->m_duration, kp_now() - r->t0, NULL, NULL);
    }
    char st[8];
    snprintf(st, sizeof st, "%d", r->status ? r->status : (toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? 200 : 499));
    metrics_inc(s->m_requests, endpoint_label(r->url), st);
    if (strcmp(r->url, "/health") != 0 && strcmp(r->url, "/metrics") != 0) log_request(r);
    if (r->parts) {
        int n = r->req.n_prompts > 0 ? (int)r->req.n_prompts : 1; /* every allocated part */
        for (int i = 0; i < n; i++) {
            stop_free(&r->parts[i].stop);
            free(r->parts[i].prompt);
            free(r->parts[i].text);
            free(r->parts[i].lps);
        }
        free(r->parts);
    }
    api_request_free(&r->req);
    free(r->body);
    free(r->out);
    pthread_mutex_destroy(&r->mu);
    pthread_cond_destroy(&r->cv);
    free(r);
    *con_cls = NULL;
}

/* Gauges computed at scrape time. */
static void collect_running(metrics_family *f, void *ctx) {
    server *s = ctx;
    int running = 0, waiting = 0;
    if (s->sch) sched_stats(s->sch, &running, &waiting);
    metrics_set(f, running, NULL, NULL);
}

static void collect_waiting(metrics_family *f, void *ctx) {
    server *s = ctx;
    int running = 0, waiting = 0;
    if (s->sch) sched_stats(s->sch, &running, &waiting);
    metrics_set(f, waiting, NULL, NULL);
}

static void collect_sessions(metrics_family *f, void *ctx) {
    server *s = ctx;
    sess_counts n;
    if (!s->sessions) return;
    sess_get_counts(s->sessions, &n);
    metrics_set(f, n.n_empty, "empty", NULL);
    metrics_set(f, n.n_hot, "hot", NULL);
    metrics_set(f, n.n_warm, "warm", NULL);
    metrics_set(f, n.n_cold, "cold", NULL);
}

static void collect_kv_bytes(metrics_family *f, void *ctx) {
    server *s = ctx;
    sess_counts n;
    if (!s->sessions) return;
    sess_get_counts(s->sessions, &n);
    metrics_set(f, (double)n.hot_bytes, "hot", NULL);
    metrics_set(f, (double)n.warm_bytes, "warm", NULL);
    metrics_set(f, (double)n.cold_bytes, "cold", NULL);
}

/* The store's cumulative counts since start (gauges computed at scrape time:
 * they only grow while the server runs). */
static void collect_store(metrics_family *f, void *ctx) {
    server *s = ctx;
    sess_counts n;
    if (!s->sessions) return;
    sess_get_counts(s->sessions, &n);
    metrics_set(f, (double)n.store.dropped, "dropped", NULL);
    metrics_set(f, (double)n.store.quarantined, "quarantined", NULL);
    metrics_set(f, (double)n.store.io_errors, "io_error", NULL);
    metrics_set(f, (double)n.store.foreign, "foreign", NULL);
    metrics_set(f, (double)n.store.tmp_removed, "torn_write_removed", NULL);
}

/* sessions.c reports parks, restores, saves, drops and errors here. */
static void on_sess_event(void *ud, const char *kind, const char *tier, double secs) {
    server *s = ud;
    (void)secs;
    metrics_inc(s->m_session_events, kind, tier && *tier ? tier : "none");
}

static int setup_metrics(server *s, kp_err *err) {
    metrics_registry *reg = s->reg = metrics_new();
    if (!reg) return kp_errf(err, KP_ENOMEM, "out of memory");
    s->m_requests = metrics_counter(reg, "kvpark_requests_total", "HTTP requests by endpoint and status.",
                                    "endpoint", "status", err);
    s->m_ttft = metrics_histogram(reg, "kvpark_time_to_first_token_seconds",
                                  "Time from request to first generated token.", NULL, 0, NULL, NULL, err);
    s->m_tpot = metrics_histogram(reg, "kvpark_time_per_output_token_seconds",
                                  "Mean time per generated token after the first, per request.", NULL, 0, NULL,
                                  NULL, err);
    s->m_duration = metrics_histogram(reg, "kvpark_request_duration_seconds",
                                      "Duration of generation requests.", NULL, 0, NULL, NULL, err);
    s->m_prompt_tokens = metrics_counter(reg, "kvpark_prompt_tokens_total", "Prompt tokens processed.", NULL,
                                         NULL, err);
    s->m_gen_tokens = metrics_counter(reg, "kvpark_generation_tokens_total", "Tokens generated.", NULL, NULL, err);
    s->m_cache_hits = metrics_counter(reg, "kvpark_prefix_cache_hit_tokens_total",
                                      "Prompt tokens reused from a cached prefix.", NULL, NULL, err);
    s->m_restore = metrics_histogram(reg, "kvpark_session_restore_seconds",
                                     "Time to make a parked session resident, by source tier.", NULL, 0, "tier",
                                     NULL, err);
    s->m_session_events = metrics_counter(reg, "kvpark_session_events_total",
                                          "Session moves between tiers: park (to tier), restore (from tier), "
                                          "save, drop (cold tier full), error.",
                                          "event", "tier", err);
    if (!s->m_requests || !s->m_ttft || !s->m_tpot || !s->m_duration || !s->m_prompt_tokens ||
        !s->m_gen_tokens || !s->m_cache_hits || !s->m_restore || !s->m_session_events)
        return KP_EINVAL;
    if (!metrics_gauge_fn(reg, "kvpark_requests_running", "Requests generating now.", NULL, NULL,
                          collect_running, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_requests_waiting", "Requests queued.", NULL, NULL, collect_waiting, s,
                          err) ||
        !metrics_gauge_fn(reg, "kvpark_sessions", "Sessions by tier.", "tier", NULL, collect_sessions, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_kv_bytes", "KV bytes held, by tier.", "tier", NULL, collect_kv_bytes, s,
                          err) ||
        !metrics_gauge_fn(reg, "kvpark_store_events", "Session store events since start: sessions dropped "
                          "(cold tier full), files quarantined, write errors, foreign records, torn writes removed.",
                          "event", NULL, collect_store, s, err))
        return KP_EINVAL;
    return metrics_info(reg, "kvpark_build_info", "kvpark version and backend.", "version", KVPARK_VERSION,
                        "backend", s->o.device && !strcmp(s->o.device, "cuda") ? "cuda"
                                   : (s->o.device && !strcmp(s->o.device, "cpu")) || !kp_cuda_available() ? "cpu"
                                                                                                         : "cuda",
                        err);
}

http_opts http_default_opts(void) {
    http_opts o = {.host = "127.0.0.1", .port = 8080, .n_parallel = 4, .queue_max = 64,
                   .kv_type = KP_TYPE_F32, .max_body = 8u << 20, .timeout_s = 60,
                   .session_dir = "sessions", .max_sessions = 1024, .hot_budget = 2ull << 30};
    return o;
}

int http_serve(const http_opts *opts, kp_err *err) {
    server *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "out of memory");
    s->o = *opts;
    s->created = (int64_t)unix_now();
    for (int i = 0; i < s->o.n_keys; i++) s->key_hash[i] = key_hash_of(s->o.keys[i]);
    int rc = setup_metrics(s, err);
    struct MHD_Daemon *d = NULL;
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* threads inherit: only sigwait sees them */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN); /* a file-size limit makes writes fail (EFBIG), reported like a full disk */
    if (rc) goto done;

    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)s->o.port)};
    if (inet_pton(AF_INET, s->o.host, &addr.sin_addr) != 1) {
        rc = kp_errf(err, KP_EINVAL, "--host '%s' is not an IPv4 address (e.g. 127.0.0.1 or 0.0.0.0)", s->o.host);
        goto done;
    }
    d = MHD_start_daemon(MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_ERROR_LOG,
                         (uint16_t)s->o.port, NULL, NULL, handle, s, MHD_OPTION_SOCK_ADDR, &addr,
                         MHD_OPTION_NOTIFY_COMPLETED, completed, s, MHD_OPTION_CONNECTION_TIMEOUT,
                         (unsigned)s->o.timeout_s, MHD_OPTION_CONNECTION_LIMIT, 1024u, MHD_OPTION_END);
    if (!d) {
        rc = kp_errf(err, KP_EIO, "cannot listen on %s:%d (%s): is the port in use?", s->o.host, s->o.port,
                     strerror(errno));
        goto done;
    }
    fprintf(stderr, "kvpark: loading %s\n", s->o.model);
    /* Tests only: hold the "loading" state so the 503 answers can be checked
     * (a tiny model loads in milliseconds). */
    const char *delay = getenv("KVPARK_TEST_LOAD_DELAY_MS");
    if (delay && atoi(delay) > 0) {
        struct timespec ts = {.tv_sec = atoi(delay) / 1000, .tv_nsec = (long)(atoi(delay) % 1000) * 1000000L};
        nanosleep(&ts, NULL);
    }
    model_opts mo = model_default_opts();
    mo.n_threads = s->o.n_threads;
    mo.backend = s->o.device ? s->o.device : "auto";
    if ((rc = model_load(&s->m, s->o.model, &mo, err))) goto done;
    s->vocab = model_vocab(s->m);
    s->n_ctx = s->o.n_ctx > 0 ? s->o.n_ctx : KP_MIN(model_hp(s->m)->n_ctx_train, 4096);
    if (s->o.chat_template) {
        int t = chat_template_from_name(s->o.chat_template);
        if (t < 0) {
            rc = kp_errf(err, KP_EINVAL, "unknown --chat-template '%s' (chatml, llama2, llama3, plain)",
                         s->o.chat_template);
            goto done;
        }
        s->tmpl = (enum chat_template)t;
    } else {
        s->tmpl = chat_template_detect(model_chat_template(s->m));
    }
    const char *base = strrchr(s->o.model, '/');
    snprintf(s->model_id, sizeof s->model_id, "%s", base ? base + 1 : s->o.model);
    sched_opts so = sched_default_opts();
    so.n_parallel = s->o.n_parallel;
    so.queue_max = s->o.queue_max;
    so.n_ctx = s->n_ctx;
    so.kv_type = s->o.kv_type;
    if ((rc = sched_new(&s->sch, s->m, &so, err))) goto done;
    sess_opts sso = {.m = s->m, .sch = s->sch, .kv_type = s->o.kv_type, .n_ctx = s->n_ctx,
                     .dir = s->o.session_dir, .codec = s->o.codec, .hot_sessions = s->o.hot_sessions,
                     .hot_budget = s->o.hot_budget, .warm_budget = s->o.warm_budget,
                     .cold_budget = s->o.cold_budget, .idle_park_s = s->o.idle_park_s,
                     .max_sessions = s->o.max_sessions, .quiet = s->o.quiet, .on_event = on_sess_event, .ud = s};
    if ((rc = sess_open(&s->sessions, &sso, err))) goto done;
    snprintf(s->codec_name, sizeof s->codec_name, "%s", s->o.codec ? s->o.codec : "none");
    atomic_store(&s->ready, true);
    fprintf(stderr, "kvpark: model %s; template %s; context %d; %d parallel; sessions in %s\n",
            model_desc(s->m), chat_template_name(s->tmpl), s->n_ctx, s->o.n_parallel, s->o.session_dir);
    fprintf(stderr, "kvpark: listening on http://%s:%d\n", s->o.host, s->o.port);
    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "kvpark: signal %d: shutting down\n", sig);
    rc = 0;
done:
    atomic_store(&s->ready, false);
    if (s->sch) sched_stop(s->sch); /* cancels generations: readers finish */
    if (d) MHD_stop_daemon(d);       /* joins every connection thread */
    sched_free(s->sch);
    sess_close(s->sessions); /* hot sessions are parked to disk: a restart loses nothing */
    model_free(s->m);
    metrics_free(s->reg);
    free(s);
    return rc;
}
