/*
 * http.c — `kvpark serve`: OpenAI-compatible routes over libmicrohttpd, the
 * transport half. Generation (a chat/completions request becoming scheduler
 * jobs, its tokens becoming SSE chunks or one JSON body, usage, the
 * per-request log line) is http_gen.c; what the two share is http_impl.h.
 * This file does not know how tokens are generated: a generation route hands
 * the connection to http_gen_start(), and the request's end to
 * http_gen_end() / http_gen_free().
 *
 * Reading guide:
 *   1. server state                                   (http_impl.h)
 *   2. small HTTP helpers: replies, auth              (reply_*, check_key)
 *   3. generation                                     (http_gen.c)
 *   4. the sessions API                               (handle_sessions)
 *   5. routing (handle), request end (completed), metrics and the daemon's
 *      life                                           (http_serve)
 *
 * Threads: libmicrohttpd runs event-driven (epoll) on a small pool of
 * threads (min(4, cores)); a connection is a socket and a little memory, not
 * a thread, so thousands of idle or slow clients cannot lock anyone out. No
 * handler waits for tokens: a generation suspends its connection, and the
 * scheduler's callbacks resume it when bytes or the outcome arrive
 * (http_gen.c). The scheduler thread owns the model and does every device
 * copy. A watchdog thread closes connections whose request has not fully
 * arrived by --request-timeout (libmicrohttpd has only an idle timeout, which
 * a client sending one byte a second never trips). The main thread waits for
 * SIGINT/SIGTERM. The sessions table has one mutex, the connection records
 * another.
 */
#include "server/http.h"

#include <errno.h>
#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>


#include "compress/quality.h"
#include "engine/chat.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "server/api.h"
#include "server/http_impl.h"
#include "server/api_embed.h"
#include "server/metrics.h"
#include "server/sessions.h"

/* ------------------------------------------------------------------ */
/* 2. HTTP helpers                                                     */

/* The status of the last reply queued by this thread, read back by handle()
 * for logs and metrics (a handler runs start to end on one pool thread). */
static _Thread_local int tls_status;
/* The allowed Origin of the request being handled on this thread (its
 * req_ctx's cors, set at the top of every handle() call): responses are
 * queued only from inside handle(), so the headers follow the request. */
static _Thread_local const char *tls_cors;

void http_add_cors(struct MHD_Response *resp) {
    if (!tls_cors) return;
    MHD_add_response_header(resp, "Access-Control-Allow-Origin", tls_cors);
    if (strcmp(tls_cors, "*") != 0) MHD_add_response_header(resp, "Vary", "Origin");
    MHD_add_response_header(resp, "Access-Control-Expose-Headers", "X-Session-Id");
}

/* The value for Access-Control-Allow-Origin: "*" when any origin is allowed,
 * the request's own Origin when it is listed, else NULL (no CORS headers: a
 * browser then refuses the page the answer). */
static const char *cors_allowed(const server *s, struct MHD_Connection *c) {
    if (s->o.n_cors == 0) return NULL;
    const char *origin = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Origin");
    if (!origin) return NULL;
    for (int i = 0; i < s->o.n_cors; i++) {
        if (!strcmp(s->o.cors_origins[i], "*")) return "*";
        if (!strcmp(s->o.cors_origins[i], origin)) return s->o.cors_origins[i];
    }
    return NULL;
}

static enum MHD_Result reply_raw(struct MHD_Connection *c, int status, const char *ctype,
                                 const char *body, size_t len, const char *session_id) {
    tls_status = status;
    struct MHD_Response *r = MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_MUST_COPY);
    if (!r) return MHD_NO;
    MHD_add_response_header(r, "Content-Type", ctype);
    if (session_id && *session_id) MHD_add_response_header(r, "X-Session-Id", session_id);
    /* every 503 is temporary here (loading, shutting down, the remote tier away): say when to retry */
    if (status == 503) MHD_add_response_header(r, "Retry-After", "1");
    http_add_cors(r);
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

static enum MHD_Result health_reply(server *s, struct MHD_Connection *c); /* with the metrics, below */

enum MHD_Result http_reply_error(struct MHD_Connection *c, const api_error *e) {
    return reply_json(c, e->http_status, api_error_json(e), NULL);
}

/* Constant-time comparison of the bearer token with every configured key.
 * The owner ids (s->key_hash) are keyed hashes made by sess_key_owners
 * (never 0 or 1). */
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
    if (!strcmp(url, "/v1/models") || !strncmp(url, "/v1/models/", 11)) return "models";
    if (!strcmp(url, "/health")) return "health";
    if (!strcmp(url, "/metrics")) return "metrics";
    if (!strncmp(url, "/v1/sessions", 12)) return "sessions";
    if (!strcmp(url, "/v1/embeddings")) return "embeddings";
    return "other";
}

/* ------------------------------------------------------------------ */
/* 4. sessions API                                                     */

/* --codec auto: the server's own calibration (autocodec.h). Token counts
 * only for a text file: from traffic they would tell one tenant how much
 * the others send (/metrics has them, for the operator). */
static json_t *calibration_json(autocodec *ac) {
    autocodec_status st;
    autocodec_get(ac, &st);
    json_t *c = json_pack("{s:s, s:s}", "state", autocodec_state_name(st.state), "source",
                          st.from_traffic ? "traffic" : "text");
    if (!c) return json_null();
    if (st.kl_bound > 0) json_object_set_new(c, "kl_bound", json_real(st.kl_bound));
    if (!st.from_traffic) {
        json_object_set_new(c, "tokens", json_integer(st.tokens));
        json_object_set_new(c, "needed", json_integer(st.needed));
    }
    if (st.state == AUTOCODEC_CALIBRATING) {
        json_object_set_new(c, "phase", json_string(st.phase));
        json_object_set_new(c, "progress", json_real(st.progress));
        json_object_set_new(c, "eta_s", st.eta_s >= 0 ? json_real(st.eta_s) : json_null());
    }
    if (st.state == AUTOCODEC_DONE) {
        json_object_set_new(c, "heldout_kl", json_real(st.heldout_kl));
        json_object_set_new(c, "heldout_ratio", json_real(st.heldout_ratio));
        json_object_set_new(c, "bits_per_value", json_real(st.bits));
        json_object_set_new(c, "created", json_integer((json_int_t)st.created));
    }
    if (st.state == AUTOCODEC_DONE || st.state == AUTOCODEC_OFF) { /* its name, not where the server keeps it */
        const char *b = strrchr(st.path, '/');
        json_object_set_new(c, "file", json_string(b ? b + 1 : st.path));
    }
    if (st.state == AUTOCODEC_FAILED) json_object_set_new(c, "error", json_string(st.error));
    return c;
}

/* GET /v1/codec: what parked sessions are coded with now. */
static json_t *codec_json(server *s) {
    store_codec_info ci;
    sess_codec_info(s->sessions, &ci);
    char hex[17];
    snprintf(hex, sizeof hex, "%016llx", (unsigned long long)ci.file_hash);
    json_t *j = json_pack("{s:s, s:s, s:s, s:s, s:o, s:{s:i, s:i, s:i}, s:i}", "object", "codec", "name", ci.name,
                          "kind", ci.kind, "source", ci.file_hash ? "codec file" : "built-in", "file_hash",
                          ci.file_hash ? json_string(hex) : json_null(), "layout", "chunk", ci.layout.chunk, "sink",
                          ci.layout.sink, "window", ci.layout.window, "codec_files", ci.n_files);
    if (j && s->ac) json_object_set_new(j, "calibration", calibration_json(s->ac));
    return j;
}

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
        return http_reply_error(c, &e);
    }
    return reply_json(c, status, txt, sid);
}

/* A session call's error as an HTTP answer. */
static enum MHD_Result reply_sess_error(struct MHD_Connection *c, int rc, const char *id, const char *what,
                                        const kp_err *err) {
    api_error e;
    if (rc == KP_ENOTFOUND) api_error_unknown_session(&e, id);
    else if (rc == KP_EUNAVAIL) /* only in the remote tier, which cannot be reached now */
        api_error_set(&e, 503, "server_error", "remote_unavailable", NULL, "session %s cannot be %s now: %s", id, what,
                      err->msg);
    else if (rc == KP_EBUSY)
        api_error_set(&e, 409, "invalid_request_error", "session_busy", NULL, "%s", err->msg);
    else if (rc == KP_EINVAL)
        api_error_set(&e, 400, "invalid_request_error", "invalid_value", NULL, "%s", err->msg);
    else if (rc == KP_ENOSPC) /* disk full: 507 Insufficient Storage, the reason in the message */
        api_error_set(&e, 507, "server_error", "insufficient_storage", NULL, "session %s cannot be %s: %s", id,
                      what, err->msg);
    else if (rc == KP_EFORMAT || rc == KP_ERANGE)
        api_error_set(&e, 409, "invalid_request_error", "session_unavailable", NULL, "session %s cannot be %s: %s",
                      id, what, err->msg);
    else
        api_error_set(&e, 500, "server_error", "session_failed", NULL, "session %s cannot be %s: %s", id, what,
                      err->msg[0] ? err->msg : "the server is shutting down");
    return http_reply_error(c, &e);
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
                return http_reply_error(c, &e);
            }
            if (rc) {
                api_error_server(&e, err.msg[0] ? err.msg : "cannot create a session");
                return http_reply_error(c, &e);
            }
            return reply_jansson(c, 200, session_json(&info), info.id);
        }
        if (!strcmp(method, "GET")) { /* list */
            sess_info *v = NULL;
            size_t n = 0;
            if (sess_list(s->sessions, r->owner, check, &v, &n)) {
                api_error_server(&e, "out of memory");
                return http_reply_error(c, &e);
            }
            json_t *arr = json_array();
            for (size_t i = 0; i < n; i++) json_array_append_new(arr, session_json(&v[i]));
            free(v);
            return reply_jansson(c, 200, json_pack("{s:s, s:o}", "object", "list", "data", arr), NULL);
        }
        api_error_unknown_route(&e, method, url);
        return http_reply_error(c, &e);
    }
    /* /v1/sessions/{id}[/save|/restore] */
    char id[STORE_ID_MAX + 2] = {0};
    const char *p = rest + 1, *slash = strchr(p, '/');
    size_t idlen = slash ? (size_t)(slash - p) : strlen(p);
    const char *action = slash ? slash + 1 : "";
    if (idlen == 0 || idlen > STORE_ID_MAX) {
        api_error_unknown_route(&e, method, url);
        return http_reply_error(c, &e);
    }
    memcpy(id, p, idlen);
    sess_info info;
    if (!store_id_valid(id) || sess_get(s->sessions, id, r->owner, check, &info)) {
        api_error_unknown_session(&e, id);
        return http_reply_error(c, &e);
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
        if (sess_restored(from)) metrics_observe(s->m_restore, ms / 1e3, from, NULL);
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
                                       "codec", st.codec ? st.codec : sess_codec_name(s->sessions),
                                       "tier", info.tier),
                             id);
    }
    api_error_unknown_route(&e, method, url);
    return http_reply_error(c, &e);
}

/* ------------------------------------------------------------------ */
/* 5. routing and the daemon                                           */

/* A CORS preflight (OPTIONS with Access-Control-Request-Method): answered
 * before any key check, as browsers send it without credentials. 204 with
 * what may follow when the Origin is allowed, else 403. */
static enum MHD_Result preflight(server *s, struct MHD_Connection *c) {
    api_error e;
    if (!tls_cors) {
        api_error_set(&e, 403, "invalid_request_error", "cors_origin_not_allowed", NULL,
                      s->o.n_cors ? "this Origin may not call the API (serve --cors-origin lists who may)"
                                  : "CORS is off: start the server with --cors-origin ORIGIN to allow browser pages");
        return http_reply_error(c, &e);
    }
    tls_status = 204;
    struct MHD_Response *resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
    if (!resp) return MHD_NO;
    http_add_cors(resp);
    MHD_add_response_header(resp, "Access-Control-Allow-Methods", "GET, POST, DELETE, OPTIONS");
    /* the headers the page asked for, if they are plain header names */
    const char *h = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Headers");
    bool plain = h && *h && strlen(h) < 1024;
    for (const char *q = h; plain && *q; q++)
        plain = (*q >= 'a' && *q <= 'z') || (*q >= 'A' && *q <= 'Z') || (*q >= '0' && *q <= '9') || *q == '-' ||
                *q == '_' || *q == ',' || *q == ' ';
    MHD_add_response_header(resp, "Access-Control-Allow-Headers",
                            plain ? h : "Authorization, Content-Type, X-Session-Id");
    MHD_add_response_header(resp, "Access-Control-Max-Age", "600");
    enum MHD_Result ok = MHD_queue_response(c, 204, resp);
    MHD_destroy_response(resp);
    return ok;
}

/* ------------------------------------------------------------------ */
/* embeddings                                                          */

typedef struct embed_call {
    server *s;
    const api_embed_req *q;
    float *vecs; /* [n_inputs][dim] */
    int rc;
    kp_err err;
} embed_call;

static void embed_on_sched(void *ud) { /* on the thread that owns the model */
    embed_call *k = ud;
    k->rc = model_embed(k->s->m, (const int32_t *const *)k->q->inputs, k->q->n_tokens, k->q->n_inputs,
                        k->s->o.kv_type, k->vecs, &k->err);
}

/* POST /v1/embeddings: parsed (server/api_embed.c), all inputs in one forward
 * pass on the scheduler thread between its steps (sched_call: this pool
 * thread waits, as a session save does), normalised, returned. */
static enum MHD_Result handle_embeddings(server *s, struct MHD_Connection *c, req_ctx *r) {
    api_error e;
    api_embed_req q;
    const model_hparams *hp = model_hp(s->m);
    const api_embed_limits lim = {.dim = hp->dim, .max_tokens = KP_MIN(hp->n_ctx_train, s->n_ctx),
                                  .max_inputs = 2048, .max_total = HTTP_EMBED_MAX_TOKENS};
    if (api_parse_embeddings(r->body, r->len, s->vocab, &lim, &q, &e)) return http_reply_error(c, &e);
    embed_call k = {.s = s, .q = &q, .vecs = malloc(sizeof(float) * (size_t)q.n_inputs * hp->dim)};
    if (!k.vecs) {
        api_embed_req_free(&q);
        api_error_server(&e, "out of memory");
        return http_reply_error(c, &e);
    }
    int rc = sched_call(s->sch, embed_on_sched, &k);
    if (!rc) rc = k.rc;
    char *json = NULL;
    if (!rc) {
        for (int i = 0; i < q.n_inputs; i++) api_embed_normalize(k.vecs + (size_t)i * hp->dim, q.dimensions);
        json = api_embed_response(&q, k.vecs, (size_t)hp->dim, s->model_id);
    }
    free(k.vecs);
    api_embed_req_free(&q);
    if (rc == KP_ECANCELED) api_error_not_ready(&e, "the server is shutting down");
    else if (rc) api_error_server(&e, k.err.msg[0] ? k.err.msg : "embedding failed");
    else if (!json) api_error_server(&e, "out of memory");
    if (rc || !json) return http_reply_error(c, &e);
    return reply_json(c, 200, json, NULL);
}

static enum MHD_Result route(server *s, struct MHD_Connection *c, req_ctx *r, const char *url,
                             const char *method) {
    api_error e;
    if (!strcmp(method, "OPTIONS") && MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Access-Control-Request-Method"))
        return preflight(s, c);
    bool open_route = !strcmp(url, "/health") || !strcmp(url, "/metrics");
    if (open_route) {
        if (s->o.metrics_key) {
            const char *k = bearer(c);
            if (!k || !ct_equal(k, s->o.metrics_key)) {
                api_error_bad_key(&e);
                return http_reply_error(c, &e);
            }
        }
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
            api_error_unknown_route(&e, method, url);
            return http_reply_error(c, &e);
        }
        if (!strcmp(url, "/health")) {
            if (!atomic_load(&s->ready)) {
                api_error_not_ready(&e, "the model is loading");
                return http_reply_error(c, &e);
            }
            return health_reply(s, c);
        }
        char *txt = metrics_render(s->reg);
        if (!txt) return MHD_NO;
        enum MHD_Result res = reply_raw(c, 200, "text/plain; version=0.0.4; charset=utf-8", txt, strlen(txt), NULL);
        free(txt);
        return res;
    }
    if (!atomic_load(&s->ready)) {
        api_error_not_ready(&e, "the model is loading");
        return http_reply_error(c, &e);
    }
    if (r->owner == 1) {
        api_error_bad_key(&e);
        return http_reply_error(c, &e);
    }
    if (!strcmp(url, "/v1/chat/completions") && !strcmp(method, "POST"))
        return http_gen_start(s, c, r, API_CHAT);
    if (!strcmp(url, "/v1/completions") && !strcmp(method, "POST"))
        return http_gen_start(s, c, r, API_COMPLETION);
    if (!strcmp(url, "/v1/models") && !strcmp(method, "GET"))
        return reply_json(c, 200, api_models_json(s->model_id, s->created), NULL);
    if (!strncmp(url, "/v1/models/", 11) && url[11] && !strcmp(method, "GET")) {
        if (strcmp(url + 11, s->model_id) != 0) {
            api_error_unknown_model(&e, url + 11);
            return http_reply_error(c, &e);
        }
        return reply_json(c, 200, api_model_json(s->model_id, s->created), NULL);
    }
    if (!strncmp(url, "/v1/sessions", 12) && (url[12] == 0 || url[12] == '/'))
        return handle_sessions(s, c, r, url, method);
    if (!strcmp(url, "/v1/embeddings") && !strcmp(method, "POST")) return handle_embeddings(s, c, r);
    if (!strcmp(url, "/v1/codec") && !strcmp(method, "GET")) return reply_jansson(c, 200, codec_json(s), NULL);
    api_error_unknown_route(&e, method, url);
    return http_reply_error(c, &e);
}

/* The request target as a path: an absolute-URI ("http://host:port/v1/...",
 * which HTTP/1.1 servers must accept) loses its scheme and authority. */
static const char *target_path(const char *url) {
    size_t n = !strncasecmp(url, "http://", 7) ? 7 : !strncasecmp(url, "https://", 8) ? 8 : 0;
    if (!n) return url;
    const char *p = strchr(url + n, '/');
    return p ? p : "/";
}

/* ---- connection records: the request deadline ---------------------- */

static conn_rec *conn_rec_of(struct MHD_Connection *c) {
    const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    return ci ? ci->socket_context : NULL;
}

/* The connection's request is in (waiting false), or a new one may start
 * (waiting true: the deadline runs from now). */
static void conn_set_waiting(server *s, struct MHD_Connection *c, bool waiting) {
    conn_rec *cr = conn_rec_of(c);
    if (!cr) return;
    pthread_mutex_lock(&s->conns_mu);
    cr->waiting = waiting;
    cr->deadline = kp_now() + s->o.request_timeout_s;
    pthread_mutex_unlock(&s->conns_mu);
}

/* libmicrohttpd tells us when a connection opens and closes (it closes the
 * socket only after CLOSED, so a record's fd is valid while it is listed). */
static void on_connection(void *cls, struct MHD_Connection *c, void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
    server *s = cls;
    if (code == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci = MHD_get_connection_info(c, MHD_CONNECTION_INFO_CONNECTION_FD);
        conn_rec *cr = calloc(1, sizeof *cr);
        if (!cr || !ci) { /* no record: no deadline for this one, nothing else lost */
            free(cr);
            return;
        }
        cr->fd = ci->connect_fd;
        cr->waiting = true;
        cr->deadline = kp_now() + s->o.request_timeout_s;
        pthread_mutex_lock(&s->conns_mu);
        cr->next = s->conns;
        if (s->conns) s->conns->prev = cr;
        s->conns = cr;
        pthread_mutex_unlock(&s->conns_mu);
        *socket_context = cr;
    } else if (code == MHD_CONNECTION_NOTIFY_CLOSED && *socket_context) {
        conn_rec *cr = *socket_context;
        pthread_mutex_lock(&s->conns_mu);
        if (cr->prev) cr->prev->next = cr->next;
        else s->conns = cr->next;
        if (cr->next) cr->next->prev = cr->prev;
        pthread_mutex_unlock(&s->conns_mu);
        free(cr);
        *socket_context = NULL;
    }
}

/* Every 250 ms: shut down the sockets of connections past their request
 * deadline; libmicrohttpd then sees the end of the stream and closes them. */
static void *watchdog_main(void *ud) {
    server *s = ud;
    pthread_mutex_lock(&s->conns_mu);
    while (!s->watchdog_stop) {
        double now = kp_now();
        for (conn_rec *cr = s->conns; cr; cr = cr->next)
            if (cr->waiting && !cr->cut && now > cr->deadline) {
                shutdown(cr->fd, SHUT_RDWR);
                cr->cut = true;
            }
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        ts.tv_nsec += 250 * 1000000L;
        if (ts.tv_nsec >= 1000000000L) {
            ts.tv_sec++;
            ts.tv_nsec -= 1000000000L;
        }
        pthread_cond_timedwait(&s->watchdog_cv, &s->conns_mu, &ts);
    }
    pthread_mutex_unlock(&s->conns_mu);
    return NULL;
}

/* Connections with a request in progress (received, not yet answered). */
static int busy_conns(server *s) {
    int n = 0;
    pthread_mutex_lock(&s->conns_mu);
    for (conn_rec *cr = s->conns; cr; cr = cr->next) n += !cr->waiting;
    pthread_mutex_unlock(&s->conns_mu);
    return n;
}

/* libmicrohttpd's own messages (a connection refused at a limit, one cut at
 * its deadline, a write to a client that left), at most one a second: under
 * an attack of thousands of sockets they would flood the log. */
static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
    server *s = cls;
    double now = kp_now();
    pthread_mutex_lock(&s->conns_mu);
    bool show = now - s->log_t >= 1.0;
    int dropped = s->log_dropped;
    if (show) {
        s->log_t = now;
        s->log_dropped = 0;
    } else {
        s->log_dropped++;
    }
    pthread_mutex_unlock(&s->conns_mu);
    if (!show) return;
    char msg[512];
    vsnprintf(msg, sizeof msg, fmt, ap);
    msg[strcspn(msg, "\r\n")] = 0;
    if (dropped) fprintf(stderr, "kvpark: http: %s (%d more such messages in the last second not shown)\n", msg, dropped);
    else fprintf(stderr, "kvpark: http: %s\n", msg);
}

/* ---- the handler ----------------------------------------------------- */

/* A request that frames its body twice (Content-Length and
 * Transfer-Encoding) is how requests are smuggled past a proxy that reads
 * the other header: refuse it and close the connection. */
static enum MHD_Result reply_ambiguous_length(struct MHD_Connection *c, req_ctx *r) {
    api_error e;
    api_error_set(&e, 400, "invalid_request_error", "invalid_request", NULL,
                  "the request has both Content-Length and Transfer-Encoding: send one of them");
    char *json = api_error_json(&e);
    if (!json) return MHD_NO;
    struct MHD_Response *resp = MHD_create_response_from_buffer(strlen(json), json, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(json);
        return MHD_NO;
    }
    MHD_add_response_header(resp, "Content-Type", "application/json");
    MHD_add_response_header(resp, "Connection", "close");
    http_add_cors(resp);
    r->status = 400;
    r->answered = true; /* the body (if any) is not ours to read */
    enum MHD_Result ok = MHD_queue_response(c, 400, resp);
    MHD_destroy_response(resp);
    return ok;
}

static enum MHD_Result handle(void *cls, struct MHD_Connection *c, const char *url, const char *method,
                              const char *version, const char *upload, size_t *upload_size, void **con_cls) {
    (void)version;
    server *s = cls;
    req_ctx *r = *con_cls;
    url = target_path(url);
    tls_cors = r ? r->cors : cors_allowed(s, c);
    if (!r) { /* first call: headers only */
        r = calloc(1, sizeof *r);
        if (!r) return MHD_NO;
        r->s = s;
        r->cors = tls_cors;
        r->t0 = kp_now();
        snprintf(r->method, sizeof r->method, "%s", method);
        snprintf(r->url, sizeof r->url, "%s", url);
        *con_cls = r;
        if (MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length") &&
            MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Transfer-Encoding"))
            return reply_ambiguous_length(c, r);
        r->owner = check_key(s, c);
        const char *cl = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Content-Length");
        if (cl && strtoull(cl, NULL, 10) > s->o.max_body) r->too_large = true;
        return MHD_YES;
    }
    if (r->answered) { /* answered at the headers (ambiguous length) */
        *upload_size = 0;
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
    if (r->gen) return http_gen_reply(c, r); /* a non-streaming generation: wait, or answer */
    if (!r->received) {
        r->received = true;
        conn_set_waiting(s, c, false);
    }
    api_error e;
    enum MHD_Result res;
    if (r->too_large) {
        api_error_body_too_large(&e, s->o.max_body);
        r->status = 413;
        res = http_reply_error(c, &e);
    } else {
        tls_status = 0;
        res = route(s, c, r, url, method);
        if (!r->gen) r->status = tls_status;
    }
    return res;
}

void http_req_finish(req_ctx *r) {
    server *s = r->s;
    char st[8];
    snprintf(st, sizeof st, "%d", r->status ? r->status : 499);
    metrics_inc(s->m_requests, endpoint_label(r->url), st);
    if (strcmp(r->url, "/health") != 0 && strcmp(r->url, "/metrics") != 0) http_gen_log_request(r);
    http_gen_free(r);
    free(r->body);
    free(r);
}

/* The connection's side of a request ended (sent, or the client left). A
 * generation still running is cancelled and finished by its last on_done:
 * nothing waits here. */
static void completed(void *cls, struct MHD_Connection *c, void **con_cls, enum MHD_RequestTerminationCode toe) {
    server *s = cls;
    req_ctx *r = *con_cls;
    *con_cls = NULL;
    conn_set_waiting(s, c, true); /* a kept-alive connection's next request has a deadline too */
    if (!r) return;
    bool ok = toe == MHD_REQUEST_TERMINATED_COMPLETED_OK;
    if (!r->status && !r->gen) r->status = ok ? 200 : 499;
    if (http_gen_end(r, ok)) http_req_finish(r);
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
    remote_stats rs;
    if (sess_remote_stats(s->sessions, &rs) == 0 && rs.budget_bytes)
        metrics_set(f, (double)rs.used_bytes, "remote", NULL);
}

/* GET /health: {"status":"ok"}, and with a remote tier its state:
 * "remote": {"state": "up"|"degraded"|"down", "queued": jobs, "error": last}
 * (and "budget_bytes", "used_bytes" with --remote-budget).
 * The server is healthy whatever Redis does (local sessions are unaffected):
 * the remote state is for dashboards and the operator, not a reason to be
 * taken out of a load balancer. */
static enum MHD_Result health_reply(server *s, struct MHD_Connection *c) {
    remote_stats rs;
    json_t *o = json_pack("{s:s}", "status", "ok");
    if (o && s->sessions && sess_remote_stats(s->sessions, &rs) == 0)
    {
        json_t *ro = json_pack("{s:s,s:I,s:s}", "state", remote_state_name(rs.state), "queued",
                               (json_int_t)rs.queue_jobs, "error", rs.last_error);
        if (ro && rs.budget_bytes) {
            json_object_set_new(ro, "budget_bytes", json_integer((json_int_t)rs.budget_bytes));
            json_object_set_new(ro, "used_bytes", json_integer((json_int_t)rs.used_bytes));
        }
        json_object_set_new(o, "remote", ro);
    }
    char *txt = o ? json_dumps(o, JSON_COMPACT) : NULL;
    json_decref(o);
    return reply_json(c, 200, txt, NULL);
}

/* The remote tier's events since start (remote.h: put, get, hit, miss, error,
 * retry, dropped, timeout), read from its counters at each scrape. */
static void collect_remote(metrics_family *f, void *ctx) {
    server *s = ctx;
    remote_stats rs;
    if (!s->sessions || sess_remote_stats(s->sessions, &rs)) return;
    for (int i = 0; i < REMOTE_EV_N; i++) metrics_set(f, (double)rs.events[i], remote_event_name(i), NULL);
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
    metrics_set(f, (double)n.store.kv_lost, "kv_lost", NULL);
}

/* What parks and saves stored since start (store_stats saved_*): the
 * codec's compression ratio is rate(fp16) / rate(coded). */
/* --codec auto's calibration (autocodec.h): 1 for the state it is in */
static void collect_calib_state(metrics_family *f, void *ctx) {
    server *s = ctx;
    if (!atomic_load(&s->ready) || !s->ac) return;
    autocodec_status st;
    autocodec_get(s->ac, &st);
    for (int i = AUTOCODEC_OFF; i <= AUTOCODEC_FAILED; i++)
        metrics_set(f, st.state == (autocodec_state)i, autocodec_state_name((autocodec_state)i), NULL);
}

static void collect_calib_tokens(metrics_family *f, void *ctx) {
    server *s = ctx;
    if (!atomic_load(&s->ready) || !s->ac) return;
    autocodec_status st;
    autocodec_get(s->ac, &st);
    metrics_set(f, (double)st.tokens, "collected", NULL);
    metrics_set(f, (double)st.needed, "needed", NULL);
}

static void collect_calib_progress(metrics_family *f, void *ctx) {
    server *s = ctx;
    if (!atomic_load(&s->ready) || !s->ac) return;
    autocodec_status st;
    autocodec_get(s->ac, &st);
    metrics_set(f, st.state == AUTOCODEC_DONE ? 1.0 : st.state == AUTOCODEC_CALIBRATING ? st.progress : 0.0,
                NULL, NULL);
}

static void collect_park_bytes(metrics_family *f, void *ctx) {
    server *s = ctx;
    sess_counts n;
    if (!s->sessions) return;
    sess_get_counts(s->sessions, &n);
    metrics_set(f, (double)n.store.saved_fp16_bytes, "fp16", NULL);
    metrics_set(f, (double)n.store.saved_coded_bytes, "coded", NULL);
    metrics_set(f, (double)n.store.saved_new_bytes, "new", NULL);
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
                                          "Session moves between tiers: park (tier: where the parked copy went; "
                                          "cold when it is durable on disk, even while it is also cached in RAM; "
                                          "empty for a session with no tokens), restore (tier: where it came from, "
                                          "as in kvpark_sessions), save (cold), drop (cold tier full), error.",
                                          "event", "tier", err);
    if (!s->m_requests || !s->m_ttft || !s->m_tpot || !s->m_duration || !s->m_prompt_tokens ||
        !s->m_gen_tokens || !s->m_cache_hits || !s->m_restore || !s->m_session_events)
        return KP_EINVAL;
    if (!metrics_gauge_fn(reg, "kvpark_requests_running", "Requests generating now.", NULL, NULL,
                          collect_running, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_requests_waiting", "Requests queued.", NULL, NULL, collect_waiting, s,
                          err) ||
        !metrics_gauge_fn(reg, "kvpark_sessions",
                          "Sessions, each counted once, in the fastest tier it can be resumed from: hot (KV "
                          "resident), warm (every chunk in RAM, even if a saved copy is also on disk), cold (some "
                          "chunk only on disk), empty (no tokens yet).",
                          "tier", NULL, collect_sessions, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_kv_bytes",
                          "Bytes held in each tier, as the budgets count them: hot = KV cache reserved by resident "
                          "sessions (--hot-budget); warm = coded chunks in RAM (--warm-budget); cold = coded "
                          "chunks in files on disk, headers excluded (--cold-budget). A chunk can be in warm and "
                          "cold at once (a saved or spilled session cached in RAM), and a prefix shared by "
                          "sessions is stored once, so these do not split kvpark_sessions' sessions by tier. "
                          "remote (with --remote-budget only) = our values in Redis under this model and codec, "
                          "all replicas together, as the budget's books saw them at this replica's last write.",
                          "tier", NULL, collect_kv_bytes, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_store_events", "Session store events since start: sessions dropped "
                          "(cold tier full), files quarantined, write errors, foreign records, torn writes removed, "
                          "sessions whose KV was found unreadable (kv_lost: their token ids are kept and "
                          "recomputed, kvpark_session_events_total{event=\"recomputed\"}).",
                          "event", NULL, collect_store, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_codec_calibration", "--codec auto: 1 for the state the server's own codec "
                          "calibration is in (off: a codec file was found; collecting: prompts are being "
                          "gathered; calibrating; done: the codec is written and new parks use it; failed: "
                          "see the log, parking stays int8).", "state", NULL, collect_calib_state, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_codec_calibration_tokens", "--codec auto: calibration tokens collected "
                          "and needed.", "kind", NULL, collect_calib_tokens, s, err) ||
        !metrics_gauge_fn(reg, "kvpark_codec_calibration_progress", "--codec auto: progress of the current "
                          "calibration step, 0 to 1 (1 when done).", NULL, NULL, collect_calib_progress, s, err) ||
        !metrics_counter_fn(reg, "kvpark_park_bytes_total", "Bytes of KV parked and saved since start, by kind: "
                            "fp16 (what the KV takes at 16 bits a number), coded (its objects after the codec "
                            "and LZ4; spans shared with an earlier version or session counted again), new "
                            "(object bytes that were not stored yet). The compression ratio is "
                            "rate(fp16) / rate(coded).",
                            "kind", NULL, collect_park_bytes, s, err) ||
        !metrics_counter_fn(reg, "kvpark_remote_events_total", "Remote tier (--remote, Redis) events since start: "
                            "put (a record or object written), get (a read), hit, miss (not there: never written, "
                            "evicted or expired), error, retry (a queued write tried again), dropped (a write "
                            "given up: queue full or shutdown), timeout, evicted (keys --remote-budget removed, "
                            "least recently used first). Absent without --remote.",
                            "event", NULL, collect_remote, s, err))
        return KP_EINVAL;
    /* Every known series at 0 from the first scrape, so rate() sees its first increase. */
    int rc = metrics_declare_sets(reg, metrics_kvpark_series, metrics_n_kvpark_series, err);
    if (rc) return rc;
    return metrics_info(reg, "kvpark_build_info", "kvpark version and backend.", "version", KVPARK_VERSION,
                        "backend", s->o.device && !strcmp(s->o.device, "cuda") ? "cuda"
                                   : (s->o.device && !strcmp(s->o.device, "cpu")) || !kp_cuda_available() ? "cpu"
                                                                                                         : "cuda",
                        err);
}

http_opts http_default_opts(void) {
    http_opts o = {.host = "127.0.0.1", .port = 8080, .n_parallel = 4, .queue_max = 64,
                   .kv_type = KP_TYPE_F32, .max_body = 8u << 20, .timeout_s = 60,
                   .request_timeout_s = 10, .max_conns = 16384, .max_conns_per_ip = 64,
                   .session_dir = "sessions", .max_sessions = 1024, .session_ttl_s = 86400,
                   .hot_budget = 2ull << 30};
    return o;
}

/* Every connection is a file descriptor: raise the soft limit to the hard
 * one, and say so when even that is short of --max-conns. */
static void raise_fd_limit(int max_conns) {
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) != 0) return;
    if (rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
        getrlimit(RLIMIT_NOFILE, &rl);
    }
    rlim_t need = (rlim_t)max_conns + 256; /* model, sessions, logs */
    if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < need)
        fprintf(stderr, "kvpark: warning: the open-file limit is %llu, below --max-conns %d + 256: "
                "connections past ~%llu will be refused (raise it: ulimit -n, LimitNOFILE=)\n",
                (unsigned long long)rl.rlim_cur, max_conns,
                (unsigned long long)(rl.rlim_cur > 256 ? rl.rlim_cur - 256 : 0));
}

/* --host as a socket address: a dotted-quad IPv4 address, or a numeric IPv6
 * one ("::1", "[::1]", "fe80::1%eth0" through getaddrinfo for the scope;
 * "::" for every address of both families). *flags gets the libmicrohttpd
 * IPv6 flags. */
static int parse_host(const char *host, int port, struct sockaddr_storage *ss, unsigned *flags, kp_err *err) {
    memset(ss, 0, sizeof *ss);
    *flags = 0;
    char h[256];
    size_t n = strlen(host);
    if (n >= 2 && host[0] == '[' && host[n - 1] == ']' && n - 2 < sizeof h) {
        memcpy(h, host + 1, n - 2);
        h[n - 2] = 0;
    } else if (n < sizeof h) {
        memcpy(h, host, n + 1);
    } else {
        h[0] = 0;
    }
    struct sockaddr_in *a4 = (struct sockaddr_in *)ss;
    if (inet_pton(AF_INET, h, &a4->sin_addr) == 1) { /* strict dotted quad (getaddrinfo takes "1.2.3") */
        a4->sin_family = AF_INET;
        a4->sin_port = htons((uint16_t)port);
        return 0;
    }
    struct addrinfo hints = {.ai_family = AF_INET6, .ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_PASSIVE}, *ai = NULL;
    if (!h[0] || getaddrinfo(h, NULL, &hints, &ai) != 0 || !ai || ai->ai_addrlen > sizeof *ss) {
        if (ai) freeaddrinfo(ai);
        return kp_errf(err, KP_EINVAL,
                       "--host '%s' is not an IPv4 or IPv6 address (e.g. 127.0.0.1, 0.0.0.0, ::1 or ::)", host);
    }
    memcpy(ss, ai->ai_addr, ai->ai_addrlen);
    freeaddrinfo(ai);
    struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)ss;
    a6->sin6_port = htons((uint16_t)port);
    *flags = IN6_IS_ADDR_UNSPECIFIED(&a6->sin6_addr) ? MHD_USE_DUAL_STACK : MHD_USE_IPv6;
    return 0;
}

/* The replicas of a deployment agree on one owner secret through Redis
 * (store_secret_share) before any owner id is made. Redis may be starting
 * alongside this server (compose, Kubernetes): try for about 10 s. */
static int share_secret(server *s, kp_err *err) {
    remote_opts ro = remote_default_opts();
    ro.url = s->o.remote_url;
    if (s->o.remote_timeout_ms > 0) ro.connect_timeout_ms = ro.command_timeout_ms = s->o.remote_timeout_ms;
    remote *r = NULL;
    int rc = remote_open(&r, &ro, err);
    for (int tries = 1; rc == 0; tries++) {
        rc = store_secret_share(s->o.session_dir, r, err);
        if (rc != KP_EBUSY || tries == 10) break;
        fprintf(stderr, "kvpark: waiting for the remote tier %s: %s\n", s->o.remote_url, err->msg);
        nanosleep(&(struct timespec){1, 0}, NULL);
        rc = 0;
    }
    remote_close(r);
    return rc;
}

/* autocodec_opts.use: new parks use the codec the server calibrated */
static int use_codec(void *ud, const char *path, kp_err *err) {
    server *s = ud;
    return sess_set_codec(s->sessions, path, err);
}

int http_serve(const http_opts *opts, kp_err *err) {
    server *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "out of memory");
    s->o = *opts;
    s->created = (int64_t)unix_now();
    pthread_mutex_init(&s->conns_mu, NULL);
    pthread_cond_init(&s->watchdog_cv, NULL);
    bool watchdog = false;
    /* owner ids before the daemon listens: check_key reads them from the first request on;
     * with a remote tier every replica keys them with the deployment's secret */
    int rc = s->o.remote_url ? share_secret(s, err) : 0;
    if (!rc) rc = sess_key_owners(s->o.session_dir, s->o.keys, s->o.n_keys, s->key_hash, err);
    if (!rc) rc = setup_metrics(s, err);
    struct MHD_Daemon *d = NULL;
    sigset_t sigs;
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGINT);
    sigaddset(&sigs, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &sigs, NULL); /* threads inherit: only sigwait sees them */
    signal(SIGPIPE, SIG_IGN);
    signal(SIGXFSZ, SIG_IGN); /* a file-size limit makes writes fail (EFBIG), reported like a full disk */
    if (rc) goto done;

    struct sockaddr_storage addr;
    unsigned v6 = 0;
    if ((rc = parse_host(s->o.host, s->o.port, &addr, &v6, err))) goto done;
    raise_fd_limit(s->o.max_conns);
    long cores = sysconf(_SC_NPROCESSORS_ONLN);
    unsigned pool = (unsigned)KP_MAX(1, KP_MIN(4, cores));
    d = MHD_start_daemon(MHD_USE_EPOLL_INTERNAL_THREAD | MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG | v6,
                         (uint16_t)s->o.port, NULL, NULL, handle, s, MHD_OPTION_EXTERNAL_LOGGER, on_mhd_log, s,
                         MHD_OPTION_SOCK_ADDR, &addr,
                         MHD_OPTION_THREAD_POOL_SIZE, pool, MHD_OPTION_NOTIFY_COMPLETED, completed, s,
                         MHD_OPTION_NOTIFY_CONNECTION, on_connection, s, MHD_OPTION_CONNECTION_TIMEOUT,
                         (unsigned)s->o.timeout_s, MHD_OPTION_CONNECTION_LIMIT, (unsigned)s->o.max_conns,
                         MHD_OPTION_PER_IP_CONNECTION_LIMIT, (unsigned)s->o.max_conns_per_ip, MHD_OPTION_END);
    if (!d) {
        rc = kp_errf(err, KP_EIO, "cannot listen on %s:%d (%s): is the port in use?", s->o.host, s->o.port,
                     strerror(errno));
        goto done;
    }
    if (pthread_create(&s->watchdog, NULL, watchdog_main, s) != 0) {
        rc = kp_errf(err, KP_ENOMEM, "cannot start the connection watchdog thread");
        goto done;
    }
    watchdog = true;
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
    if (model_max_positions(s->m) && s->n_ctx > model_max_positions(s->m)) {
        /* learned position embeddings end there: past it the model has no position to give */
        rc = kp_errf(err, KP_EINVAL, "--ctx %d is more than %s's %d positions (learned position embeddings); use --ctx %d or less",
                     s->n_ctx, model_hp(s->m)->arch_name, model_max_positions(s->m), model_max_positions(s->m));
        goto done;
    }
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
    /* --codec auto: a codec file of this model, else int8 while one is calibrated */
    char auto_path[AUTOCODEC_PATH_MAX] = "";
    const bool is_auto = s->o.codec && !strcmp(s->o.codec, "auto");
    const char *park_codec = s->o.codec;
    codec_shape shape = quality_codec_shape(s->m);
    if (is_auto) {
        if (autocodec_find(s->o.model, &shape, s->o.remote_url ? NULL : s->o.session_dir, auto_path,
                           sizeof auto_path)) {
            park_codec = auto_path;
            fprintf(stderr, "kvpark: codec auto: parking with %s\n", auto_path);
        } else {
            park_codec = "int8";
            if (s->o.remote_url)
                fprintf(stderr, "kvpark: codec auto: no codec file beside the model; parking with int8 (with "
                                "--remote every replica must park with the same codec: put one from 'kvpark "
                                "calibrate' beside the model, or give --codec FILE)\n");
            else
                fprintf(stderr, "kvpark: codec auto: no codec file for this model (beside it or in %s/autocodec); "
                                "parking with int8 while one is calibrated in the background from %s\n",
                        s->o.session_dir, s->o.calib_text ? s->o.calib_text : "the prompts served");
        }
    }
    sess_opts sso = {.m = s->m, .sch = s->sch, .kv_type = s->o.kv_type, .n_ctx = s->n_ctx,
                     .dir = s->o.session_dir, .codec = park_codec, .park_window = s->o.park_window,
                     .hot_sessions = s->o.hot_sessions,
                     .hot_budget = s->o.hot_budget, .warm_budget = s->o.warm_budget,
                     .cold_budget = s->o.cold_budget, .idle_park_s = s->o.idle_park_s,
                     .max_sessions = s->o.max_sessions, .max_sessions_per_key = s->o.max_sessions_per_key,
                     .session_ttl_s = s->o.session_ttl_s, .keys = s->o.keys, .n_keys = s->o.n_keys,
                     .quiet = s->o.quiet, .remote_url = s->o.remote_url, .remote_policy = s->o.remote_policy,
                     .remote_ttl_s = s->o.remote_ttl_s, .remote_budget = s->o.remote_budget, .remote_timeout_ms = s->o.remote_timeout_ms,
                     .on_event = on_sess_event, .ud = s};
    if ((rc = sess_open(&s->sessions, &sso, err))) goto done;
    if (is_auto && (auto_path[0] || !s->o.remote_url)) {
        autocodec_opts ao = {.model_path = model_path(s->m), .shape = shape, .dir = s->o.session_dir,
                             .calib_text = s->o.calib_text, .tokens = s->o.calib_tokens,
                             .n_ctx = KP_MIN(AUTOCODEC_DEFAULT_CTX, s->n_ctx), .max_kl = s->o.calib_max_kl,
                             .quiet = s->o.quiet, .use = use_codec, .ud = s};
        if ((rc = autocodec_start(&s->ac, &ao, auto_path[0] ? auto_path : NULL, err))) goto done;
    }
    atomic_store(&s->ready, true);
    fprintf(stderr, "kvpark: model %s; template %s; context %d; %d parallel; sessions in %s\n",
            model_desc(s->m), chat_template_name(s->tmpl), s->n_ctx, s->o.n_parallel, s->o.session_dir);
    bool bracket = strchr(s->o.host, ':') && s->o.host[0] != '[';
    fprintf(stderr, "kvpark: listening on http://%s%s%s:%d\n", bracket ? "[" : "", s->o.host, bracket ? "]" : "",
            s->o.port);
    int sig = 0;
    sigwait(&sigs, &sig);
    fprintf(stderr, "kvpark: signal %d: shutting down\n", sig);
    rc = 0;
done:
    atomic_store(&s->ready, false);
    /* sched_stop cancels every generation; each one's on_done resumes its
     * suspended connection (libmicrohttpd must not stop with one suspended) */
    if (s->sch) sched_stop(s->sch);
    /* let those answers (a 503, the end of a stream) go out: at most 2 s */
    for (int i = 0; d && i < 40 && busy_conns(s) > 0; i++) nanosleep(&(struct timespec){0, 50 * 1000000L}, NULL);
    if (watchdog) {
        pthread_mutex_lock(&s->conns_mu);
        s->watchdog_stop = true;
        pthread_cond_signal(&s->watchdog_cv);
        pthread_mutex_unlock(&s->conns_mu);
        pthread_join(s->watchdog, NULL);
    }
    if (d) MHD_stop_daemon(d); /* joins the pool; every connection is closed (records freed) */
    autocodec_free(s->ac); /* a calibration in flight is canceled (it switches the store's codec) */
    /* sessions close before the scheduler is freed: a background park still
     * running hands its device copies to the (stopped) scheduler */
    sess_close(s->sessions); /* hot sessions are parked to disk: a restart loses nothing */
    sched_free(s->sch);
    model_free(s->m);
    metrics_free(s->reg);
    pthread_cond_destroy(&s->watchdog_cv);
    pthread_mutex_destroy(&s->conns_mu);
    free(s);
    return rc;
}
