/*
 * http_gen.c — generation for `kvpark serve`: a chat/completions request
 * becomes one scheduler job per prompt (engine/scheduler.h); each job's
 * tokens are turned into text (stop sequences held back, server/stop.h),
 * then into SSE chunks as they come or into one JSON body at the end;
 * usage and timing go to the metrics and to the per-request log line.
 *
 * Why a file of its own: this is the part that knows the engine; the
 * transport (http.c) only routes a request here (http_gen_start) and tells
 * it when the request ended (http_gen_end, http_gen_free), so the connection
 * model can change without touching how tokens are generated.
 *
 * Threads: on_token / on_done run on the scheduler thread and append to the
 * request's output under gen_req.mu. Nothing here waits for a token on a
 * libmicrohttpd thread: a streaming response's reader (gen_reader) hands
 * over what is there and suspends the connection when nothing is; a
 * non-streaming request suspends its connection (on the handler's call after
 * the one that submitted, see http_gen_start) until every job has ended, and
 * only then queues its status line and body. The scheduler's callbacks
 * resume the connection when bytes or the outcome arrive. Who
 * suspended is recorded under the mutex (gen_req.suspended); whoever clears
 * that flag resumes the connection, after unlocking. A client that left is
 * noticed by libmicrohttpd (a reset, a failed write), never by peeking at
 * the socket: a half-close after the request is a normal client. When the
 * connection ends first, its jobs are cancelled and the last on_done
 * finishes the request (http_req_finish), so no thread waits for them.
 */
#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

#include "engine/chat.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tok.h"
#include "server/api.h"
#include "server/http_impl.h"
#include "server/metrics.h"
#include "server/sessions.h"
#include "server/stop.h"

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
    size_t lp_chars;        /* characters of the tokens whose logprobs were streamed */
    bool submitted, done;
} gen_part;

/* A generation request's state (r->g), guarded by mu from the moment its
 * jobs are submitted: the scheduler thread adds output, a libmicrohttpd
 * thread hands it to the client. */
struct gen_req {
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
    pthread_cond_t cv;      /* n_done changed (only an aborted start waits on it) */
    bool finished;          /* every part ended and the output is complete */
    char *out;              /* bytes to send */
    size_t out_len, out_cap, out_pos;
    struct MHD_Connection *conn;
    bool suspended;         /* conn waits for output: whoever clears this resumes it */
    bool conn_closed;       /* the connection is gone: the last on_done finishes the request */
    bool client_left;       /* it ended before the whole response was sent */
};

/* Under mu: the connection to resume once mu is released, if it waits and
 * there is something for it (new bytes or the end); NULL otherwise. A
 * suspended connection cannot close, so it is still there after unlocking. */
static struct MHD_Connection *take_wakeup(gen_req *g) {
    if (!g->suspended || (g->out_pos == g->out_len && !g->finished)) return NULL;
    g->suspended = false;
    return g->conn;
}

static void settle(req_ctx *r);

static void totals(const req_ctx *r, int *in, int *cached, int *out, double *ttft) {
    *in = *cached = *out = 0;
    *ttft = 0;
    for (int i = 0; i < r->g->n_parts; i++) {
        const gen_part *p = &r->g->parts[i];
        if (!p->submitted) continue;
        *in += p->n_prompt;
        *cached += p->job.n_cached;
        *out += p->job.n_generated;
        if (p->job.t_first_token > 0 && (*ttft == 0 || p->job.t_first_token - p->job.t_submit < *ttft))
            *ttft = p->job.t_first_token - p->job.t_submit;
    }
}

void http_gen_log_request(req_ctx *r) {
    if (r->s->o.quiet) return;
    int in = 0, cached = 0, out = 0;
    double ttft = 0;
    const gen_req *g = r->g;
    if (g) totals(r, &in, &cached, &out, &ttft);
    fprintf(stderr, "kvpark: %s %s %s status=%d session=%s in=%d cached=%d out=%d ttft=%.1fms total=%.1fms\n",
            g && g->id[0] ? g->id : "-", r->method, r->url, r->status, g && g->sess_id[0] ? g->sess_id : "-", in,
            cached, out, ttft * 1e3, (kp_now() - r->t0) * 1e3);
}

/* ------------------------------------------------------------------ */
/* the jobs' output: text, SSE chunks, the response                     */

static void fill_result(gen_part *p, api_result *res, const char *text, size_t len) {
    req_ctx *r = p->r;
    memset(res, 0, sizeof *res);
    res->id = r->g->id;
    res->created = r->g->created;
    res->model = r->g->req.model ? r->g->req.model : r->s->model_id;
    res->session_id = r->g->sess_id[0] ? r->g->sess_id : NULL;
    res->text = text;
    res->text_len = len;
    res->prompt_tokens = p->n_prompt;
    res->completion_tokens = p->job.n_generated;
    res->cached_tokens = p->job.n_cached;
    res->include_usage = r->g->req.include_usage;
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

/* Append one SSE event with a chunk of the given kind (caller holds r->g->mu). */
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
    if (with_lps && r->g->req.logprobs && p->lps_sent < p->n_lps) {
        lp_views(p, p->lps_sent, p->n_lps, &v, &tops);
        if (v && tops) {
            res.has_logprobs = true;
            res.logprobs = v;
            res.n_logprobs = p->n_lps - p->lps_sent;
            res.text_offset0 = p->lp_chars;
            for (size_t i = 0; i < res.n_logprobs; i++) p->lp_chars += api_utf8_chars(v[i].tok.token, v[i].tok.token_len);
            p->lps_sent = p->n_lps;
        }
    }
    char *json = r->g->kind == API_CHAT ? api_chat_chunk_json(&res, kind) : api_completion_chunk_json(&res, kind);
    if (kind != API_CHUNK_USAGE) json = with_index(json, p->index);
    char *ev = json ? api_sse_event(json) : NULL;
    if (ev) buf_append(&r->g->out, &r->g->out_len, &r->g->out_cap, ev, strlen(ev));
    free(ev);
    free(json);
    free(v);
    free(tops);
}

/* Text that passed the stop matcher: keep it, and stream it. */
static void emit_text(gen_part *p, const char *t, size_t n) {
    if (n == 0) return;
    buf_append(&p->text, &p->text_len, &p->text_cap, t, n);
    if (p->r->g->stream) push_chunk(p, API_CHUNK_CONTENT, t, n, true);
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
    int n_top = p->r->g->req.top_logprobs;
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
    pthread_mutex_lock(&r->g->mu);
    if (r->g->req.logprobs) record_logprobs(p, id, logits);
    const char *emit;
    size_t emit_len;
    int stopped = stop_feed(&p->stop, piece, (size_t)len, &emit, &emit_len);
    emit_text(p, emit, emit_len);
    struct MHD_Connection *wake = take_wakeup(r->g);
    pthread_mutex_unlock(&r->g->mu);
    if (wake) MHD_resume_connection(wake);
    return stopped;
}

/* The whole non-streaming response once every part has ended (r->g->mu held). */
static void finish_response(req_ctx *r) {
    if (r->status >= 400) { /* 500: a job failed; 499 with the client still here: the server stops */
        api_error e;
        const char *msg = "generation failed";
        for (int i = 0; i < r->g->n_parts; i++)
            if (r->g->parts[i].job.finish == SCHED_ERROR && r->g->parts[i].job.err.msg[0]) msg = r->g->parts[i].job.err.msg;
        if (r->status >= 500) api_error_server(&e, msg);
        else api_error_not_ready(&e, "the server is shutting down");
        r->status = e.http_status;
        char *json = api_error_json(&e);
        if (json) buf_append(&r->g->out, &r->g->out_len, &r->g->out_cap, json, strlen(json));
        free(json);
        return;
    }
    json_t *all = NULL;
    for (int i = 0; i < r->g->n_parts; i++) {
        gen_part *p = &r->g->parts[i];
        api_result res;
        fill_result(p, &res, p->text ? p->text : "", p->text_len);
        api_token_logprob *v = NULL;
        api_logprob *tops = NULL;
        if (r->g->req.logprobs) {
            lp_views(p, 0, p->n_lps, &v, &tops);
            if (v && tops) {
                res.has_logprobs = true;
                res.logprobs = v;
                res.n_logprobs = p->n_lps;
            }
        }
        if (r->g->n_parts > 1) { /* usage of the whole request on every choice's draft */
            int in, cached, out;
            double ttft;
            totals(r, &in, &cached, &out, &ttft);
            res.prompt_tokens = in;
            res.cached_tokens = cached;
            res.completion_tokens = out;
        }
        char *json = r->g->kind == API_CHAT ? api_chat_response_json(&res) : api_completion_response_json(&res);
        free(v);
        free(tops);
        json = with_index(json, p->index);
        if (r->g->n_parts == 1) {
            if (json) buf_append(&r->g->out, &r->g->out_len, &r->g->out_cap, json, strlen(json));
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
    if (txt) buf_append(&r->g->out, &r->g->out_len, &r->g->out_cap, txt, strlen(txt));
    free(txt);
}

static void on_done(sched_job *job) {
    gen_part *p = job->ud;
    req_ctx *r = p->r;
    server *s = r->s;
    pthread_mutex_lock(&r->g->mu);
    const char *emit;
    size_t emit_len;
    if (job->finish != SCHED_STOP || !p->stop.stopped) {
        stop_flush(&p->stop, &emit, &emit_len);
        emit_text(p, emit, emit_len);
    }
    if (job->finish == SCHED_ERROR) r->status = 500;
    else if (job->finish == SCHED_CANCELED && r->status < 500) r->status = 499;
    else if (r->g->stream) push_chunk(p, API_CHUNK_FINISH, "", 0, false);
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
    if (++r->g->n_done == r->g->n_parts) { /* the last part: complete the response */
        if (r->g->stream) {
            if (r->status < 400) {
                if (r->g->req.include_usage) push_chunk(p, API_CHUNK_USAGE, "", 0, false);
                buf_append(&r->g->out, &r->g->out_len, &r->g->out_cap, API_SSE_DONE, strlen(API_SSE_DONE));
            }
        } else {
            finish_response(r);
        }
        r->g->finished = true;
    }
    bool last = r->g->finished;
    bool orphan = last && r->g->conn_closed;
    struct MHD_Connection *wake = take_wakeup(r->g);
    pthread_cond_broadcast(&r->g->cv);
    pthread_mutex_unlock(&r->g->mu);
    /* From here r is the connection's again (or ours alone, if it is gone). */
    if (wake) MHD_resume_connection(wake);
    if (orphan) { /* the client left first: nobody else will end the request */
        settle(r);
        http_req_finish(r);
    }
}

static void cancel_all(req_ctx *r) {
    for (int i = 0; i < r->g->n_parts; i++) atomic_store(&r->g->parts[i].job.cancel, true);
}

/* Unpin the session (r->g->mu held by the caller, or the jobs ended and the
 * connection is gone); returns it for sess_release after unlocking. */
static sess *take_session(req_ctx *r) {
    sess *x = r->g->sess;
    r->g->sess = NULL;
    return x;
}

/* libmicrohttpd pulls the SSE body from here (on a pool thread): hand over
 * the bytes that are there; with none yet, suspend the connection and
 * return 0 (on_token / on_done resume it). */
static ssize_t gen_reader(void *cls, uint64_t pos, char *buf, size_t max) {
    (void)pos;
    req_ctx *r = cls;
    gen_req *g = r->g;
    pthread_mutex_lock(&g->mu);
    if (g->out_pos < g->out_len) {
        size_t n = KP_MIN(max, g->out_len - g->out_pos);
        memcpy(buf, g->out + g->out_pos, n);
        g->out_pos += n;
        pthread_mutex_unlock(&g->mu);
        return (ssize_t)n;
    }
    if (g->finished) {
        /* Every byte is handed over: unpin the session now, before the
         * client can see the end of the response, so that its next
         * request (a DELETE, a save) does not find it "in use". */
        sess *x = take_session(r);
        pthread_mutex_unlock(&g->mu);
        if (x) sess_release(r->s->sessions, x, true);
        return r->status >= 500 ? MHD_CONTENT_READER_END_WITH_ERROR : MHD_CONTENT_READER_END_OF_STREAM;
    }
    /* Suspend under the mutex: a callback sees `suspended` only once the
     * connection really is suspended, so its resume always matches. */
    g->suspended = true;
    MHD_suspend_connection(g->conn);
    pthread_mutex_unlock(&g->mu);
    return 0;
}

/* A session's next turn, token for token (the reply as the model wrote it).
 * The client sends the conversation back as text; its canonical tokens P
 * may split the previous reply differently from the tokens S the model
 * generated (and the session's KV holds), which would cost a re-prefill of
 * the reply. When S spells a prefix of P's bytes that ends on a token
 * boundary of P (specials spelled out, so a control token never matches
 * plain text), the prompt becomes S + the rest of P: the same text, and
 * every session token reused. Returns 1 when spliced, 0 when P is kept. */
static int splice_session_prefix(const tok_vocab *v, const sched_seq *q, gen_part *p) {
    const int32_t *S = q->tokens;
    const int nS = q->n_tokens, nP = p->n_prompt;
    int lcp = 0;
    while (lcp < nS && lcp < nP && S[lcp] == p->prompt[lcp]) lcp++;
    if (nS == 0 || lcp == nS) return 0; /* nothing to gain */
    char piece[256];
    size_t nb = 0, cap = 4096;
    char *bytes = malloc(cap);
    for (int i = 0; bytes && i < nS; i++) { /* the bytes S spells */
        int k = tok_piece(v, S[i], true, piece, sizeof piece);
        if (k < 0 || k > (int)sizeof piece) {
            free(bytes);
            return 0;
        }
        if (nb + (size_t)k > cap) {
            char *nbuf = realloc(bytes, cap = 2 * (nb + (size_t)k));
            if (!nbuf) {
                free(bytes);
                return 0;
            }
            bytes = nbuf;
        }
        memcpy(bytes + nb, piece, (size_t)k);
        nb += (size_t)k;
    }
    if (!bytes) return 0;
    size_t at = 0;
    int k = 0;
    while (k < nP && at < nb) { /* P's tokens while they spell the same bytes */
        int m = tok_piece(v, p->prompt[k], true, piece, sizeof piece);
        if (m < 0 || m > (int)sizeof piece || at + (size_t)m > nb || memcmp(bytes + at, piece, (size_t)m) != 0) break;
        at += (size_t)m;
        k++;
    }
    free(bytes);
    if (at != nb || k >= nP) return 0; /* no boundary at the end of S, or nothing new after it */
    int32_t *np = malloc(sizeof *np * (size_t)(nS + nP - k));
    if (!np) return 0;
    memcpy(np, S, sizeof *np * (size_t)nS);
    memcpy(np + nS, p->prompt + k, sizeof *np * (size_t)(nP - k));
    free(p->prompt);
    p->prompt = np;
    p->n_prompt = nS + nP - k;
    return 1;
}

/* Tokenise prompt i of the request into p->prompt; an api_error on failure. */
static int tokenize_part(server *s, req_ctx *r, int i, gen_part *p, api_error *e) {
    kp_err err = {0};
    size_t n = 0;
    int rc = 0;
    char param[32];
    if (r->g->kind == API_CHAT) snprintf(param, sizeof param, "messages");
    else if (r->g->req.n_prompts > 1) snprintf(param, sizeof param, "prompt[%d]", i);
    else snprintf(param, sizeof param, "prompt");
    if (r->g->kind == API_CHAT) {
        char *text = NULL;
        int32_t b = tok_bos(s->vocab), eo = tok_eos(s->vocab);
        rc = chat_apply(s->tmpl, r->g->req.msgs, r->g->req.n_msgs, true, b >= 0 ? tok_text(s->vocab, b) : "",
                        eo >= 0 ? tok_text(s->vocab, eo) : "", &text, &err);
        if (!rc) rc = tok_encode(s->vocab, text, strlen(text), true, true, &p->prompt, &n, &err);
        free(text);
    } else if (r->g->req.prompts[i].text) {
        const char *t = r->g->req.prompts[i].text;
        rc = tok_encode(s->vocab, t, strlen(t), true, true, &p->prompt, &n, &err);
    } else {
        const api_prompt *ap = &r->g->req.prompts[i];
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
    /* (the context check follows; a --max-body of gigabytes must not wrap the int) */
    p->n_prompt = n > INT32_MAX ? INT32_MAX : (int)n;
    return 0;
}

enum MHD_Result http_gen_start(server *s, struct MHD_Connection *c, req_ctx *r, enum api_kind kind) {
    api_error e;
    memset(&e, 0, sizeof e);
    r->g = calloc(1, sizeof *r->g);
    if (!r->g) {
        api_error_server(&e, "out of memory");
        return http_reply_error(c, &e);
    }
    r->g->conn = c;
    pthread_mutex_init(&r->g->mu, NULL);
    pthread_cond_init(&r->g->cv, NULL);
    api_limits lim = {.max_tokens_limit = 0, .max_messages = 0};
    int rc = kind == API_CHAT ? api_parse_chat(r->body ? r->body : "", r->len, &lim, &r->g->req, &e)
                              : api_parse_completion(r->body ? r->body : "", r->len, &lim, &r->g->req, &e);
    if (rc) return http_reply_error(c, &e);
    r->g->kind = kind;
    r->g->stream = r->g->req.stream;
    r->g->n_parts = kind == API_CHAT ? 1 : (int)r->g->req.n_prompts;
    r->g->parts = calloc((size_t)r->g->n_parts, sizeof *r->g->parts);
    if (!r->g->parts) {
        api_error_server(&e, "out of memory");
        return http_reply_error(c, &e);
    }

    /* the prompts and the token budget */
    int32_t max_tokens = r->g->req.max_tokens;
    bool explicit_max = max_tokens > 0;
    if (!explicit_max) max_tokens = s->o.max_tokens_default > 0 ? s->o.max_tokens_default : s->n_ctx;
    for (int i = 0; i < r->g->n_parts; i++) {
        gen_part *p = &r->g->parts[i];
        p->r = r;
        p->index = i;
        if (tokenize_part(s, r, i, p, &e)) return http_reply_error(c, &e);
        /* in 64 bits: max_tokens may be up to INT32_MAX (issue 11: the int sum wrapped) */
        if (p->n_prompt >= s->n_ctx || (explicit_max && (int64_t)p->n_prompt + max_tokens > s->n_ctx)) {
            api_error_context_overflow(&e, kind, s->n_ctx, p->n_prompt, explicit_max ? max_tokens : 0);
            return http_reply_error(c, &e);
        }
    }

    /* logit_bias ids against this model's vocabulary (sorted: the last is the largest) */
    const api_request *q = &r->g->req;
    if (q->n_bias && q->bias[q->n_bias - 1].id >= model_hp(s->m)->n_vocab) {
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", "logit_bias",
                      "logit_bias names token %d, outside the vocabulary (0..%d)", (int)q->bias[q->n_bias - 1].id,
                      model_hp(s->m)->n_vocab - 1);
        return http_reply_error(c, &e);
    }

    /* the session */
    const char *hsid = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "X-Session-Id");
    const char *sid = r->g->req.session_id[0] ? r->g->req.session_id : hsid;
    if (r->g->req.session_id[0] && hsid && *hsid && strcmp(hsid, r->g->req.session_id) != 0) {
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", "session_id",
                      "the X-Session-Id header (%.64s) and the body's session_id (%s) name different "
                      "sessions", hsid, r->g->req.session_id);
        return http_reply_error(c, &e);
    }
    if (sid && *sid && r->g->n_parts > 1) {
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", "session_id",
                      "a session holds one conversation: send one prompt per request on a session");
        return http_reply_error(c, &e);
    }
    if (sid && *sid) {
        kp_err err = {0};
        char from[STORE_TIER_MAX];
        double ms = 0;
        rc = sess_acquire(s->sessions, sid, r->owner, s->o.n_keys > 0, &r->g->sess, from, &ms, &err);
        if (rc == KP_ENOTFOUND) {
            api_error_unknown_session(&e, sid);
            return http_reply_error(c, &e);
        }
        if (rc == KP_EUNAVAIL) { /* only in the remote tier, which cannot be reached now: retry */
            api_error_set(&e, 503, "server_error", "remote_unavailable", "session_id",
                          "session %s cannot be restored now: %s", sid, err.msg);
            return http_reply_error(c, &e);
        }
        if (rc) {
            api_error_set(&e, 409, "invalid_request_error", "session_unavailable", "session_id",
                          "session %s cannot be restored: %s", sid, err.msg);
            return http_reply_error(c, &e);
        }
        snprintf(r->g->sess_id, sizeof r->g->sess_id, "%s", sess_id(r->g->sess));
        gen_part *p0 = &r->g->parts[0];
        if (kind == API_CHAT && splice_session_prefix(s->vocab, sess_seq(r->g->sess), p0) &&
            (p0->n_prompt >= s->n_ctx || (explicit_max && (int64_t)p0->n_prompt + max_tokens > s->n_ctx))) {
            api_error_context_overflow(&e, kind, s->n_ctx, p0->n_prompt, explicit_max ? max_tokens : 0);
            sess_release(s->sessions, r->g->sess, false);
            r->g->sess = NULL;
            return http_reply_error(c, &e);
        }
        if (sess_restored(from)) metrics_observe(s->m_restore, ms / 1e3, from, NULL);
    }

    uint64_t rnd[2] = {0, 0};
    if (getrandom(rnd, sizeof rnd, 0) != (ssize_t)sizeof rnd) rnd[0] = (uint64_t)(kp_now() * 1e9);
    api_make_id(r->g->id, sizeof r->g->id, kind == API_CHAT ? "chatcmpl-" : "cmpl-", rnd[0], rnd[1]);
    r->g->created = (int64_t)unix_now();
    r->status = 200;

    /* one scheduler job per part */
    int submitted = 0;
    kp_err err = {0};
    for (int i = 0; i < r->g->n_parts && !rc; i++) {
        gen_part *p = &r->g->parts[i];
        if ((rc = stop_init(&p->stop, (const char *const *)r->g->req.stop, r->g->req.n_stop, &err))) break;
        sched_job *j = &p->job;
        memset(j, 0, sizeof *j);
        j->seq = r->g->sess ? sess_seq(r->g->sess) : NULL;
        j->owner = r->owner; /* prefix reuse stays within this key (scheduler.h) */
        j->prompt = p->prompt;
        j->n_prompt = p->n_prompt;
        j->max_tokens = KP_MIN(max_tokens, s->n_ctx - p->n_prompt);
        j->ignore_eos = r->g->req.ignore_eos;
        j->sampling = r->g->req.sp;
        j->bias = r->g->req.bias;
        j->n_bias = (int)r->g->req.n_bias;
        j->grammar = r->g->req.grammar; /* response_format (owned by req, outlives the job) */
        j->on_token = on_token;
        j->on_done = on_done;
        j->ud = p;
        atomic_init(&j->cancel, false);
        /* Mark the part submitted before it is: its on_done may run before
         * sched_submit returns, and the usage it reports counts the
         * submitted parts. */
        pthread_mutex_lock(&r->g->mu);
        if (r->g->stream) push_chunk(p, API_CHUNK_ROLE, "", 0, false);
        p->submitted = true;
        pthread_mutex_unlock(&r->g->mu);
        if ((rc = sched_submit(s->sch, j, &err))) {
            pthread_mutex_lock(&r->g->mu);
            p->submitted = false;
            pthread_mutex_unlock(&r->g->mu);
            break;
        }
        submitted++;
        autocodec_feed(s->ac, p->prompt, (size_t)p->n_prompt); /* --codec auto from traffic (a copy, RAM only) */
    }
    if (rc) {
        /* take back what was submitted, then answer with the error */
        pthread_mutex_lock(&r->g->mu);
        cancel_all(r);
        r->g->n_parts = submitted; /* on_done counts against the submitted parts only */
        while (r->g->n_done < submitted) pthread_cond_wait(&r->g->cv, &r->g->mu);
        pthread_mutex_unlock(&r->g->mu);
        if (r->g->sess) {
            sess_release(s->sessions, r->g->sess, submitted > 0);
            r->g->sess = NULL;
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
        return http_reply_error(c, &e);
    }
    r->gen = true;
    /* Non-streaming: no answer yet. libmicrohttpd calls the handler again
     * on its next turn (http_gen_reply suspends there until the outcome).
     * Not suspending here, in the pass that read the request, matters:
     * libmicrohttpd 0.9.75 keeps that pass's "read" interest across a
     * suspension, and a resumed connection whose client half-closed would
     * read the end of stream and be dropped as gone. */
    if (!r->g->stream) return MHD_YES;
    struct MHD_Response *resp = MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 16 * 1024, gen_reader, r, NULL);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", r->g->stream ? "text/event-stream" : "application/json");
    if (r->g->stream) MHD_add_response_header(resp, "Cache-Control", "no-cache");
    if (r->g->sess) MHD_add_response_header(resp, "X-Session-Id", sess_id(r->g->sess));
    http_add_cors(resp);
    enum MHD_Result ok = MHD_queue_response(c, 200, resp);
    MHD_destroy_response(resp);
    return ok;
}


/* ------------------------------------------------------------------ */
/* the request's end                                                   */

enum MHD_Result http_gen_reply(struct MHD_Connection *c, req_ctx *r) {
    gen_req *g = r->g;
    pthread_mutex_lock(&g->mu);
    if (!g->finished) { /* wait without a thread: the last on_done resumes the connection */
        g->suspended = true;
        MHD_suspend_connection(c);
        pthread_mutex_unlock(&g->mu);
        return MHD_YES;
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(g->out_len, g->out ? g->out : (char *)"",
                                                                MHD_RESPMEM_MUST_COPY);
    sess *x = take_session(r); /* unpinned before the client sees the answer (see gen_reader) */
    pthread_mutex_unlock(&g->mu);
    if (x) sess_release(r->s->sessions, x, true);
    if (!resp) return MHD_NO;
    MHD_add_response_header(resp, "Content-Type", "application/json");
    if (g->sess_id[0]) MHD_add_response_header(resp, "X-Session-Id", g->sess_id);
    http_add_cors(resp);
    enum MHD_Result ok = MHD_queue_response(c, (unsigned)r->status, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* The request is over on both sides: its final status, the session back,
 * the duration. */
static void settle(req_ctx *r) {
    if (r->g->client_left && r->status == 200) r->status = 499;
    sess *x = take_session(r);
    if (x) sess_release(r->s->sessions, x, true);
    metrics_observe(r->s->m_duration, kp_now() - r->t0, NULL, NULL);
}

bool http_gen_end(req_ctx *r, bool completed_ok) {
    if (!r->gen) return true;
    pthread_mutex_lock(&r->g->mu);
    r->g->conn_closed = true;
    r->g->client_left = !completed_ok;
    bool done = r->g->finished;
    if (!done) cancel_all(r); /* the last on_done settles and finishes it */
    pthread_mutex_unlock(&r->g->mu);
    if (done) settle(r);
    return done;
}

void http_gen_free(req_ctx *r) {
    gen_req *g = r->g;
    if (!g) return;
    if (g->parts) {
        int n = g->req.n_prompts > 0 ? (int)g->req.n_prompts : 1; /* every allocated part */
        for (int i = 0; i < n; i++) {
            stop_free(&g->parts[i].stop);
            free(g->parts[i].prompt);
            free(g->parts[i].text);
            free(g->parts[i].lps);
        }
        free(g->parts);
    }
    api_request_free(&g->req);
    free(g->out);
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g);
    r->g = NULL;
}
