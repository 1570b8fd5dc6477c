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
#include "http.h"

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
#include "storage/store.h"

#define KVPARK_VERSION "0.1.0"
#define SESSION_EXTRA_MAGIC 0x4B505853u /* "SXPK": the server's bytes in a blob */

/* ------------------------------------------------------------------ */
/* 1. state                                                            */

typedef struct session {
    char id[STORE_ID_MAX + 1];
    uint64_t owner;        /* XXH64 of the creating API key; 0 = no auth */
    sched_seq *seq;        /* resident KV, or NULL when only on disk */
    int n_tokens;          /* tokens held (resident) or saved (disk) */
    bool on_disk;
    uint64_t disk_bytes;
    double last_use;       /* unix seconds */
    int users;             /* requests currently using it */
    struct session *next;
} session;

typedef struct server {
    http_opts o;
    model *m;
    sched *sch;
    store *st;
    const tok_vocab *vocab;
    enum chat_template tmpl;
    char model_id[256];
    int n_ctx;
    int64_t created;
    atomic_bool ready;
    uint64_t key_hash[HTTP_MAX_KEYS];

    pthread_mutex_t sess_mu;
    session *sessions;

    metrics_registry *reg;
    metrics_family *m_requests, *m_ttft, *m_tpot, *m_duration, *m_prompt_tokens, *m_gen_tokens,
        *m_cache_hits, *m_restore;
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
    session *sess;
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
            r->id[0] ? r->id : "-", r->method, r->url, r->status, r->sess ? r->sess->id : "-", in, cached,
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
    res->session_id = r->sess ? r->sess->id : NULL;
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
        if (r->sess) {
            pthread_mutex_lock(&s->sess_mu);
            r->sess->n_tokens = r->sess->seq ? r->sess->seq->n_tokens : r->sess->n_tokens;
            r->sess->last_use = unix_now();
            pthread_mutex_unlock(&s->sess_mu);
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
            pthread_mutex_unlock(&r->mu);
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

/* Find a session the caller may use (NULL if unknown or another key's). */
static session *session_find(server *s, const char *id, uint64_t owner) {
    for (session *x = s->sessions; x; x = x->next)
        if (!strcmp(x->id, id)) return (x->owner == owner || s->o.n_keys == 0) ? x : NULL;
    return NULL;
}

/* Make a session's KV resident (restore from disk). Caller holds sess_mu. */
static int session_make_resident(server *s, session *x, double *ms, kp_err *err) {
    if (x->seq) {
        if (ms) *ms = 0;
        return 0;
    }
    double t0 = kp_now();
    blob_meta meta;
    int32_t *tokens = NULL;
    void *extra = NULL;
    size_t extra_len = 0;
    int rc = store_load_meta(s->st, x->id, &meta, &tokens, &extra, &extra_len, err);
    if (rc) return rc;
    free(extra);
    sched_seq *q = NULL;
    if ((rc = sched_seq_new(&q, s->m, s->o.kv_type, s->n_ctx, err))) {
        free(tokens);
        return rc;
    }
    if ((int)meta.n_tokens > q->cap) {
        free(tokens);
        sched_seq_free(q);
        return kp_errf(err, KP_ERANGE, "session %s holds %d tokens, more than the server's context of %d",
                       x->id, meta.n_tokens, s->n_ctx);
    }
    if ((rc = store_load_kv(s->st, x->id, q->kv, err))) {
        free(tokens);
        sched_seq_free(q);
        return rc;
    }
    memcpy(q->tokens, tokens, sizeof *tokens * (size_t)meta.n_tokens);
    q->n_tokens = (int)meta.n_tokens;
    free(tokens);
    x->seq = q;
    x->n_tokens = q->n_tokens;
    double dt = kp_now() - t0;
    metrics_observe(s->m_restore, dt, "disk", NULL);
    if (ms) *ms = dt * 1e3;
    return 0;
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
        pthread_mutex_lock(&s->sess_mu);
        session *x = store_id_valid(sid) ? session_find(s, sid, r->owner) : NULL;
        if (!x) {
            pthread_mutex_unlock(&s->sess_mu);
            api_error_unknown_session(&e, sid);
            return reply_error(c, &e);
        }
        rc = session_make_resident(s, x, NULL, &err);
        if (rc) {
            pthread_mutex_unlock(&s->sess_mu);
            api_error_set(&e, 409, "invalid_request_error", "session_unavailable", "session_id",
                          "session %s cannot be restored: %s", x->id, err.msg);
            return reply_error(c, &e);
        }
        x->users++;
        r->sess = x;
        pthread_mutex_unlock(&s->sess_mu);
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
        j->seq = r->sess ? r->sess->seq : NULL;
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
            pthread_mutex_lock(&s->sess_mu);
            r->sess->users--;
            pthread_mutex_unlock(&s->sess_mu);
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
    if (r->sess) MHD_add_response_header(resp, "X-Session-Id", r->sess->id);
    enum MHD_Result ok = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* ------------------------------------------------------------------ */
/* 4. sessions API                                                     */

static const char *session_tier(const session *x) { return x->seq ? "hot" : "disk"; }

static json_t *session_json(server *s, const session *x) {
    size_t bytes = x->seq ? kv_bytes_used(x->seq->kv) : (size_t)x->disk_bytes;
    (void)s;
    return json_pack("{s:s, s:s, s:i, s:s, s:I, s:b, s:I}", "id", x->id, "object", "session", "tokens",
                     x->n_tokens, "tier", session_tier(x), "bytes", (json_int_t)bytes, "saved", x->on_disk,
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

typedef struct save_call {
    server *s;
    session *x;
    blob_stats st;
    int rc;
    kp_err err;
} save_call;

/* Runs on the scheduler thread, between steps: the KV is consistent. */
static void do_save(void *ud) {
    save_call *sc = ud;
    uint8_t extra[12];
    uint32_t magic = SESSION_EXTRA_MAGIC;
    memcpy(extra, &magic, 4);
    memcpy(extra + 4, &sc->x->owner, 8);
    store_item it = {.tokens = sc->x->seq->tokens, .n_tokens = sc->x->seq->n_tokens, .extra = extra,
                     .extra_len = sizeof extra, .kv = sc->x->seq->kv, .codec = "none"};
    sc->rc = store_save(sc->s->st, sc->x->id, &it, &sc->st, &sc->err);
}

static enum MHD_Result handle_sessions(server *s, struct MHD_Connection *c, req_ctx *r, const char *url,
                                       const char *method) {
    api_error e;
    kp_err err = {0};
    const char *rest = url + strlen("/v1/sessions");
    if (*rest == 0 || !strcmp(rest, "/")) {
        if (!strcmp(method, "POST")) { /* create */
            int n_sess = 0;
            pthread_mutex_lock(&s->sess_mu);
            for (session *y = s->sessions; y; y = y->next) n_sess++;
            pthread_mutex_unlock(&s->sess_mu);
            if (n_sess >= s->o.max_sessions) {
                api_error_set(&e, 429, "rate_limit_error", "too_many_sessions", NULL,
                              "the server holds %d sessions, its limit (--max-sessions %d): delete "
                              "sessions you no longer need",
                              n_sess, s->o.max_sessions);
                return reply_error(c, &e);
            }
            session *x = calloc(1, sizeof *x);
            if (!x || store_new_id(x->id) || sched_seq_new(&x->seq, s->m, s->o.kv_type, s->n_ctx, &err)) {
                free(x);
                api_error_server(&e, err.msg[0] ? err.msg : "cannot create a session");
                return reply_error(c, &e);
            }
            x->owner = r->owner;
            x->last_use = unix_now();
            pthread_mutex_lock(&s->sess_mu);
            x->next = s->sessions;
            s->sessions = x;
            json_t *j = session_json(s, x);
            pthread_mutex_unlock(&s->sess_mu);
            return reply_jansson(c, 200, j, x->id);
        }
        if (!strcmp(method, "GET")) { /* list */
            json_t *arr = json_array();
            pthread_mutex_lock(&s->sess_mu);
            for (session *x = s->sessions; x; x = x->next)
                if (x->owner == r->owner || s->o.n_keys == 0) json_array_append_new(arr, session_json(s, x));
            pthread_mutex_unlock(&s->sess_mu);
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
    pthread_mutex_lock(&s->sess_mu);
    session *x = store_id_valid(id) ? session_find(s, id, r->owner) : NULL;
    if (!x) {
        pthread_mutex_unlock(&s->sess_mu);
        api_error_unknown_session(&e, id);
        return reply_error(c, &e);
    }
    if (!*action && !strcmp(method, "GET")) {
        json_t *j = session_json(s, x);
        pthread_mutex_unlock(&s->sess_mu);
        return reply_jansson(c, 200, j, id);
    }
    if (!*action && !strcmp(method, "DELETE")) {
        if (x->users > 0) {
            pthread_mutex_unlock(&s->sess_mu);
            api_error_set(&e, 409, "invalid_request_error", "session_busy", NULL,
                          "session %s is in use by a running request; retry when it finishes", id);
            return reply_error(c, &e);
        }
        for (session **pp = &s->sessions; *pp; pp = &(*pp)->next)
            if (*pp == x) {
                *pp = x->next;
                break;
            }
        pthread_mutex_unlock(&s->sess_mu);
        if (x->on_disk || store_has(s->st, id)) store_delete(s->st, id, NULL);
        sched_seq_free(x->seq);
        free(x);
        return reply_jansson(c, 200, json_pack("{s:s, s:s, s:b}", "id", id, "object", "session.deleted", "deleted", 1), NULL);
    }
    if (!strcmp(action, "restore") && !strcmp(method, "POST")) {
        double ms = 0;
        const char *from = session_tier(x);
        int rc = session_make_resident(s, x, &ms, &err);
        pthread_mutex_unlock(&s->sess_mu);
        if (rc) {
            api_error_set(&e, 409, "invalid_request_error", "session_unavailable", NULL,
                          "session %s cannot be restored: %s", id, err.msg);
            return reply_error(c, &e);
        }
        return reply_jansson(c, 200, json_pack("{s:s, s:s, s:s, s:i, s:f}", "id", id, "object", "session.restore",
                                               "from_tier", from, "tokens", x->n_tokens, "ms", ms), id);
    }
    if (!strcmp(action, "save") && !strcmp(method, "POST")) {
        double ms = 0;
        int rc = session_make_resident(s, x, &ms, &err);
        if (rc) {
            pthread_mutex_unlock(&s->sess_mu);
            api_error_set(&e, 409, "invalid_request_error", "session_unavailable", NULL,
                          "session %s cannot be loaded: %s", id, err.msg);
            return reply_error(c, &e);
        }
        x->users++;
        pthread_mutex_unlock(&s->sess_mu);
        save_call sc = {.s = s, .x = x};
        rc = sched_call(s->sch, do_save, &sc);
        pthread_mutex_lock(&s->sess_mu);
        x->users--;
        if (!rc && !sc.rc) {
            x->on_disk = true;
            x->disk_bytes = sc.st.bytes_written;
        }
        pthread_mutex_unlock(&s->sess_mu);
        if (rc || sc.rc) {
            api_error_set(&e, 500, "server_error", "save_failed", NULL, "saving session %s failed: %s", id,
                          sc.err.msg[0] ? sc.err.msg : "the server is shutting down");
            return reply_error(c, &e);
        }
        double ratio = sc.st.bytes_written ? (double)sc.st.raw_fp16_bytes / (double)sc.st.bytes_written : 0;
        return reply_jansson(c, 200,
                             json_pack("{s:s, s:s, s:i, s:I, s:f, s:f, s:s}", "id", id, "object", "session.save",
                                       "tokens", x->n_tokens, "bytes", (json_int_t)sc.st.bytes_written,
                                       "ratio_vs_fp16", ratio, "ms", sc.st.ms, "codec", "none"),
                             id);
    }
    pthread_mutex_unlock(&s->sess_mu);
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
        if (r->sess) {
            pthread_mutex_lock(&s->sess_mu);
            r->sess->users--;
            pthread_mutex_unlock(&s->sess_mu);
        }
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
    int hot = 0, disk = 0;
    pthread_mutex_lock(&s->sess_mu);
    for (session *x = s->sessions; x; x = x->next) x->seq ? hot++ : disk++;
    pthread_mutex_unlock(&s->sess_mu);
    metrics_set(f, hot, "hot", NULL);
    metrics_set(f, disk, "disk", NULL);
}

static void collect_kv_bytes(metrics_family *f, void *ctx) {
    server *s = ctx;
    double hot = 0, disk = 0;
    pthread_mutex_lock(&s->sess_mu);
    for (session *x = s->sessions; x; x = x->next) {
        if (x->seq) hot += (double)kv_bytes_used(x->seq->kv);
        if (x->on_disk) disk += (double)x->disk_bytes;
    }
    pthread_mutex_unlock(&s->sess_mu);
    metrics_set(f, hot, "hot", NULL);
    metrics_set(f, disk, "disk", NULL);
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
    if (!s->m_requests || !s->m_ttft || !s->m_tpot || !s->m_duration || !s->m_prompt_tokens ||
        !s->m_gen_tokens || !s->m_cache_hits || !s->m_restore)
        return KP_EINVAL;
    if (!metrics_gauge_fn(reg, "kvpark_requests_running", "Requests generating now.", NULL, NULL,
                          collect_running, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_requests_waiting", "Requests queued.", NULL, NULL, collect_waiting, s,
                          err) ||
        !metrics_gauge_fn(reg, "kvpark_sessions", "Sessions by tier.", "tier", NULL, collect_sessions, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_kv_bytes", "KV bytes held, by tier.", "tier", NULL, collect_kv_bytes, s,
                          err))
        return KP_EINVAL;
    return metrics_info(reg, "kvpark_build_info", "kvpark version and backend.", "version", KVPARK_VERSION,
                        "backend", s->o.device && !strcmp(s->o.device, "cuda") ? "cuda"
                                   : (s->o.device && !strcmp(s->o.device, "cpu")) || !kp_cuda_available() ? "cpu"
                                                                                                         : "cuda",
                        err);
}

/* Re-index saved sessions: every blob in the store becomes a disk session. */
static void load_saved_sessions(server *s) {
    store_entry *ents = NULL;
    size_t n = 0;
    if (store_list(s->st, &ents, &n)) return;
    for (size_t i = 0; i < n; i++) {
        blob_meta meta;
        int32_t *tokens = NULL;
        void *extra = NULL;
        size_t extra_len = 0;
        if (store_load_meta(s->st, ents[i].id, &meta, &tokens, &extra, &extra_len, NULL)) continue;
        session *x = calloc(1, sizeof *x);
        if (x) {
            snprintf(x->id, sizeof x->id, "%s", ents[i].id);
            uint32_t magic = 0;
            if (extra_len >= 12) {
                memcpy(&magic, extra, 4);
                if (magic == SESSION_EXTRA_MAGIC) memcpy(&x->owner, (char *)extra + 4, 8);
            }
            x->n_tokens = (int)meta.n_tokens;
            x->on_disk = true;
            x->disk_bytes = ents[i].bytes;
            x->last_use = (double)ents[i].mtime_unix_ms / 1e3;
            x->next = s->sessions;
            s->sessions = x;
        }
        free(tokens);
        free(extra);
    }
    free(ents);
}

http_opts http_default_opts(void) {
    http_opts o = {.host = "127.0.0.1", .port = 8080, .n_parallel = 4, .queue_max = 64,
                   .kv_type = KP_TYPE_F32, .max_body = 8u << 20, .timeout_s = 60,
                   .session_dir = "sessions", .max_sessions = 1024};
    return o;
}

int http_serve(const http_opts *opts, kp_err *err) {
    server *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "out of memory");
    s->o = *opts;
    s->created = (int64_t)unix_now();
    pthread_mutex_init(&s->sess_mu, NULL);
    for (int i = 0; i < s->o.n_keys; i++) s->key_hash[i] = key_hash_of(s->o.keys[i]);
    int rc = setup_metrics(s, err);
    struct MHD_Daemon *d = NULL;
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* threads inherit: only sigwait sees them */
    signal(SIGPIPE, SIG_IGN);
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
    if ((rc = store_open(&s->st, s->o.session_dir, model_fingerprint(s->m), err))) goto done;
    load_saved_sessions(s);
    sched_opts so = sched_default_opts();
    so.n_parallel = s->o.n_parallel;
    so.queue_max = s->o.queue_max;
    so.n_ctx = s->n_ctx;
    so.kv_type = s->o.kv_type;
    if ((rc = sched_new(&s->sch, s->m, &so, err))) goto done;
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
    for (session *x = s->sessions; x;) {
        session *nx = x->next;
        sched_seq_free(x->seq);
        free(x);
        x = nx;
    }
    store_close(s->st);
    model_free(s->m);
    metrics_free(s->reg);
    pthread_mutex_destroy(&s->sess_mu);
    free(s);
    return rc;
}
