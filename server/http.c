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
 * Threads: libmicrohttpd runs one thread per connection (so a handler may
 * wait for its generation), the scheduler thread owns the model, and the
 * main thread waits for SIGINT/SIGTERM. The sessions table has one mutex.
 */
#include "server/http.h"

#include <errno.h>
#include <arpa/inet.h>
#include <jansson.h>
#include <microhttpd.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "engine/chat.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "server/api.h"
#include "server/http_impl.h"
#include "server/metrics.h"
#include "server/sessions.h"

/* ------------------------------------------------------------------ */
/* 2. HTTP helpers                                                     */

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
    if (!strcmp(url, "/v1/models")) return "models";
    if (!strcmp(url, "/health")) return "health";
    if (!strcmp(url, "/metrics")) return "metrics";
    if (!strncmp(url, "/v1/sessions", 12)) return "sessions";
    return "other";
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
        return http_reply_error(c, &e);
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
    return http_reply_error(c, &e);
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
    if (!strncmp(url, "/v1/sessions", 12) && (url[12] == 0 || url[12] == '/'))
        return handle_sessions(s, c, r, url, method);
    api_error_unknown_route(&e, method, url);
    return http_reply_error(c, &e);
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
        res = http_reply_error(c, &e);
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
    http_gen_end(r, toe == MHD_REQUEST_TERMINATED_COMPLETED_OK);
    char st[8];
    snprintf(st, sizeof st, "%d", r->status ? r->status : (toe == MHD_REQUEST_TERMINATED_COMPLETED_OK ? 200 : 499));
    metrics_inc(s->m_requests, endpoint_label(r->url), st);
    if (strcmp(r->url, "/health") != 0 && strcmp(r->url, "/metrics") != 0) http_gen_log_request(r);
    http_gen_free(r);
    free(r->body);
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
                   .session_dir = "sessions", .max_sessions = 1024, .session_ttl_s = 86400,
                   .hot_budget = 2ull << 30};
    return o;
}

int http_serve(const http_opts *opts, kp_err *err) {
    server *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "out of memory");
    s->o = *opts;
    s->created = (int64_t)unix_now();
    /* owner ids before the daemon listens: check_key reads them from the first request on */
    int rc = sess_key_owners(s->o.session_dir, s->o.keys, s->o.n_keys, s->key_hash, err);
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
                     .max_sessions = s->o.max_sessions, .max_sessions_per_key = s->o.max_sessions_per_key,
                     .session_ttl_s = s->o.session_ttl_s, .keys = s->o.keys, .n_keys = s->o.n_keys,
                     .quiet = s->o.quiet, .on_event = on_sess_event, .ud = s};
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
    /* sessions close before the scheduler is freed: a background park still
     * running hands its device copies to the (stopped) scheduler */
    sess_close(s->sessions); /* hot sessions are parked to disk: a restart loses nothing */
    sched_free(s->sch);
    model_free(s->m);
    metrics_free(s->reg);
    free(s);
    return rc;
}
