/*
 * http.h — `kvpark serve`: the OpenAI-compatible HTTP server.
 *
 * libmicrohttpd serves every connection from a small pool of event-driven
 * (epoll) threads, so an idle or slow connection costs a socket, not a thread;
 * a request waiting for its tokens is a suspended connection. JSON goes
 * through server/api.c; generation runs on the engine's scheduler (continuous
 * batching); sessions move between hot (live KV), warm (RAM) and cold (disk)
 * tiers through server/sessions.h and the session store (storage/store.h);
 * /metrics speaks Prometheus.
 *
 * Contract
 *   - http_serve() starts listening at once (GET /health answers 503 while the
 *     model loads), loads the model, then serves until SIGINT/SIGTERM, then
 *     stops accepting, cancels running generations and returns 0 — or a
 *     negative code with a message (port in use, model not found, ...).
 *   - $KVPARK_TEST_LOAD_DELAY_MS (tests only) holds the loading state that
 *     long before the model loads, so the 503 answers can be tested.
 *   - Connections: at most max_conns open (RLIMIT_NOFILE is raised to its
 *     hard limit at start, with a warning when that is lower than needed),
 *     max_conns_per_ip from one client address; a connection whose request
 *     (head and body) has not fully arrived request_timeout_s after it opened
 *     or after its previous response is closed; an idle one after timeout_s.
 *     A request being generated is never timed out: its status line waits
 *     for the outcome (non-streaming) or streams as tokens come (SSE).
 *   - Only a reset or a failed write means the client left (its generation
 *     is then cancelled); a half-close after the request is not.
 *   - Every error a client can cause is answered in OpenAI's error shape with
 *     the right status; nothing a client sends can crash the server.
 */
#ifndef KP_HTTP_H
#define KP_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"

#define HTTP_MAX_KEYS 64
/* Tokens one POST /v1/embeddings request may hold in all (its inputs share
 * one forward pass): more is a 400 asking for smaller requests. */
#define HTTP_EMBED_MAX_TOKENS 65536
#define HTTP_MAX_CORS 16

typedef struct http_opts {
    const char *model;        /* path or synthetic:NAME (resolved by the caller) */
    const char *host;         /* IPv4 or IPv6 address, default 127.0.0.1 (:: listens on both) */
    int port;                 /* default 8080 */
    int n_threads;            /* CPU threads for the model (<= 0: all) */
    const char *device;       /* cpu | cuda | auto (NULL = auto) */
    int n_parallel;           /* sequences decoded together (default 4) */
    int queue_max;            /* waiting requests before 429 (default 64) */
    int n_ctx;                /* context per sequence (default: model's, <= 4096) */
    int kv_type;              /* F32 default */
    int max_tokens_default;   /* when a request gives none (default: until EOS/context) */
    size_t max_body;          /* bytes (default 8 MiB) */
    int timeout_s;            /* idle connection timeout (default 60) */
    int request_timeout_s;    /* a request's head and body must arrive within this (default 10) */
    int max_conns;            /* open connections at most (default 16384) */
    int max_conns_per_ip;     /* open connections per client address at most (default 64; 0: no limit) */
    const char *session_dir;  /* cold tier directory, --cold-dir (alias --session-dir); default ./sessions */
    const char *codec;        /* codec for parked sessions: auto, none, int8, ... or a codec file (NULL: none);
                               * auto: server/autocodec.h (a codec file of the model, else int8 while
                               * one is calibrated in the background) */
    const char *calib_text;   /* --calib-text: auto calibrates from this file, not from traffic */
    int64_t calib_tokens;     /* --calib-tokens: tokens auto calibrates on (0: 32768) */
    double calib_max_kl;      /* --calib-max-kl: KL bound of auto's codec on unseen text (0: 0.002) */
    int max_sessions;         /* sessions held in all tiers at most (default 1024) */
    int max_sessions_per_key; /* sessions of one API key at most (0: max_sessions / 4; no keys: max_sessions) */
    double session_ttl_s;     /* unused sessions are deleted after this long (default 86400; 0: never) */
    int park_window;          /* --park-window: exact recent rows with a built-in codec
                               * (0: default 64, -1: none; sess_opts.park_window) */
    int hot_sessions;         /* hot sessions at most (0: no count limit) */
    uint64_t hot_budget;      /* bytes of hot KV (default 2 GiB; 0: no byte limit) */
    uint64_t warm_budget;     /* bytes of parked sessions in RAM (0: default 1 GiB) */
    uint64_t cold_budget;     /* bytes on disk (0: unlimited) */
    double idle_park_s;       /* park sessions idle this long (0: never) */
    const char *remote_url;   /* --remote: the shared Redis tier (NULL: none) */
    int remote_policy;        /* --remote-policy: STORE_REMOTE_WRITE_THROUGH (default) / _WRITE_BACK */
    uint32_t remote_ttl_s;    /* --remote-ttl: expiry in Redis (0: none) */
    uint64_t remote_budget;   /* --remote-budget: bytes in Redis under our prefix (0: none) */
    int remote_timeout_ms;    /* --remote-timeout: no Redis call waits longer (default 2000) */
    const char *chat_template;/* NULL: from the model */
    const char *keys[HTTP_MAX_KEYS]; /* API keys (none: no auth) */
    int n_keys;
    const char *metrics_key;  /* if set, /health and /metrics need it */
    const char *cors_origins[HTTP_MAX_CORS]; /* browser origins allowed (CORS); "*": any; none: no CORS */
    int n_cors;
    int quiet;                /* no per-request log lines */
} http_opts;

http_opts http_default_opts(void);
int http_serve(const http_opts *o, kp_err *err);

#endif
