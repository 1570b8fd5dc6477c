/*
 * http_impl.h — what the two halves of `kvpark serve` share: the server
 * state, one request's transport state, the reply and buffer helpers
 * (http.c), and the generation entry points (http_gen.c). Internal to
 * server/http*.c; the contract is http.h.
 *
 * The seam: http.c (libmicrohttpd daemon, connections, auth, body limits,
 * routes, errors) knows a generation only as the opaque gen_req behind
 * req_ctx.g and the four http_gen_* calls below; http_gen.c builds the
 * scheduler jobs, streams the tokens and accounts for them.
 *
 * Threads: libmicrohttpd calls the handlers of a connection on one of its
 * pool threads at a time, never two at once, so a req_ctx needs no lock of
 * its own; its gen_req is also written by the scheduler thread (on_token /
 * on_done), under gen_req's mutex. A connection waiting for output is
 * suspended; the scheduler's callbacks resume it (never under that mutex).
 * A request whose connection closed while its jobs still run is finished by
 * the last on_done (http_req_finish on the scheduler thread). server is
 * written only before `ready` is set and read after, except the connection
 * records (conns, under conns_mu).
 */
#ifndef KP_HTTP_IMPL_H
#define KP_HTTP_IMPL_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <time.h>

#include <microhttpd.h>
#include <pthread.h>

#include "engine/chat.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "engine/tok.h"
#include "server/api.h"
#include "server/autocodec.h"
#include "server/http.h"
#include "server/metrics.h"
#include "server/sessions.h"

/* ------------------------------------------------------------------ */
/* 1. state                                                            */

/* One open connection, for the request deadline (http.c): from its start or
 * its previous response until its request is fully received. */
typedef struct conn_rec {
    struct conn_rec *prev, *next;
    int fd;
    bool waiting;           /* a request is (being) received: the deadline applies */
    bool cut;               /* already shut down for missing the deadline */
    double deadline;        /* kp_now() by which the request must be in */
} conn_rec;

typedef struct server {
    http_opts o;
    model *m;
    sched *sch;
    sess_table *sessions;
    autocodec *ac;            /* --codec auto: the codec found or being calibrated (else NULL) */
    const tok_vocab *vocab;
    enum chat_template tmpl;
    char model_id[256];
    int n_ctx;
    int64_t created;
    atomic_bool ready;
    uint64_t key_hash[HTTP_MAX_KEYS];

    pthread_mutex_t conns_mu; /* guards conns and every conn_rec */
    conn_rec *conns;          /* open connections (request deadline) */
    pthread_t watchdog;       /* closes connections past their deadline */
    pthread_cond_t watchdog_cv;
    bool watchdog_stop;       /* under conns_mu */
    double log_t;             /* libmicrohttpd's messages: when the last was shown (under conns_mu) */
    int log_dropped;          /* and how many since were not (under conns_mu) */

    metrics_registry *reg;
    metrics_family *m_requests, *m_ttft, *m_tpot, *m_duration, *m_prompt_tokens, *m_gen_tokens,
        *m_cache_hits, *m_restore, *m_parks, *m_session_events;
} server;

/* ------------------------------------------------------------------ */
/* per-request state                                                   */

typedef struct gen_req gen_req; /* a generation's state, in http_gen.c */

/* One request, from its headers to its end. */
typedef struct req_ctx {
    server *s;
    /* request body */
    char *body;
    size_t len, cap;
    bool too_large;
    uint64_t owner;         /* check_key(): 0 no auth, 1 refused, else the key's hash */
    const char *cors;       /* Access-Control-Allow-Origin to send (server options' string), or NULL */
    double t0;
    char method[8];
    char url[256];
    int status;
    bool received;          /* the whole request is in (the deadline no longer applies) */
    bool answered;          /* answered from its headers alone (the body is ignored) */
    /* generation (http_gen.c) */
    bool gen;               /* jobs were submitted (the response waits for them) */
    gen_req *g;             /* its state, from http_gen_start to http_gen_free (else NULL) */
} req_ctx;

/* ------------------------------------------------------------------ */
/* helpers                                                             */

static inline double unix_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static inline int buf_append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
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

/* Queue `e` as an OpenAI error body with its HTTP status (http.c). */
/* CORS: the Access-Control-* headers of the request being handled on this
 * thread (none when CORS is off or its Origin is not allowed); every
 * response is given them just before it is queued. */
void http_add_cors(struct MHD_Response *resp);
enum MHD_Result http_reply_error(struct MHD_Connection *c, const api_error *e);
/* The request is over on both sides (connection and jobs): count it, log
 * it, free r (http.c). */
void http_req_finish(req_ctx *r);

/* ------------------------------------------------------------------ */
/* generation (http_gen.c)                                             */

/* POST /v1/chat/completions and /v1/completions: parse the body, tokenise,
 * take the session, submit one scheduler job per prompt; then either queue
 * the SSE response (streamed from the jobs' output, the connection suspended
 * whenever no bytes are ready) or return with no answer yet (http_gen_reply,
 * on the handler's next call, waits for the outcome and queues the one JSON
 * body with its real status);
 * or queue an error answer. Sets r->gen once the jobs run and r->g as soon
 * as any generation state exists. */
enum MHD_Result http_gen_start(server *s, struct MHD_Connection *c, req_ctx *r, enum api_kind kind);
/* The handler is called again for a non-streaming generation: suspend the
 * connection until every job has ended (the last on_done resumes it), then
 * queue the response with its real status. */
enum MHD_Result http_gen_reply(struct MHD_Connection *c, req_ctx *r);
/* The connection's side of the request ended (completed_ok: the response
 * was sent whole). Returns true when the request is over (the caller calls
 * http_req_finish); false when its jobs still run: they are cancelled and
 * the last on_done finishes the request. Settles r->status (499 for a
 * client that left), releases the session, observes the duration. */
bool http_gen_end(req_ctx *r, bool completed_ok);
/* The per-request log line on stderr (unless quiet), with the generation's
 * token counts when there was one. */
void http_gen_log_request(req_ctx *r);
/* Free r->g (NULL is fine); the jobs must have ended. */
void http_gen_free(req_ctx *r);

#endif
