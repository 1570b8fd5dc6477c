/*
 * cmd_serve.c — `kvpark serve`: the OpenAI-compatible HTTP server
 * (server/http.h) with its session tiers, configured from the command line.
 *
 * A thin front end: every option maps to one field of http_opts; the model
 * path is resolved here so a bad -m fails before the server starts. The
 * server runs until SIGINT/SIGTERM. Exit status 0, 1 on a runtime error, 2
 * on bad usage.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "server/http.h"
#include "tools/cli.h"

static const char *serve_help =
    "usage: kvpark serve [-m MODEL] [options]\n"
    "OpenAI-compatible HTTP server (chat/completions, completions, models, sessions,\n"
    "health, metrics). Stops cleanly on SIGINT/SIGTERM.\n"
    "  -m, --model PATH         GGUF model (default lookup as for 'kvpark run')\n"
    "      --host ADDR          IPv4 or IPv6 address to listen on (default 127.0.0.1;\n"
    "                           :: listens on every address of both families)\n"
    "      --port N             TCP port (default 8080)\n"
    "      --parallel N         sequences decoded together (default 4)\n"
    "      --queue N            requests waiting before 429 (default 64)\n"
    "  -c, --ctx N              context per sequence (default: the model's, at most 4096)\n"
    "      --kv-type T          f32 | f16 | bf16 (default f32)\n"
    "  -t, --threads N          CPU threads (default: all cores)\n"
    "      --device D           cpu | cuda | auto (default auto: cuda when a GPU is present)\n"
    "      --api-key KEY        require 'Authorization: Bearer KEY' (repeatable)\n"
    "      --api-key-file FILE  one key per line (blank lines and # comments ignored)\n"
    "      --metrics-key KEY    also protect /health and /metrics with this key\n"
    "      --max-body BYTES     largest request body (default 8388608)\n"
    "      --max-tokens N       default max_tokens when a request gives none\n"
    "                           (default: until end of text or the context is full)\n"
    "Sessions and their tiers (hot: live KV; warm: compressed in RAM; cold: on disk):\n"
    "      --cold-dir DIR       where parked and saved sessions live (default ./sessions;\n"
    "                           --session-dir is the same option)\n"
    "      --codec C            codec for parked sessions: none (lossless, default), fp16,\n"
    "                           int8, int4, kivi2, or a codec file from 'kvpark calibrate'\n"
    "      --hot-sessions N     hot sessions at most, then the least recently used idle\n"
    "                           ones are parked (default 0: no count limit)\n"
    "      --hot-budget SIZE    bytes of hot KV at most (default 2G; 0: no limit)\n"
    "      --warm-budget SIZE   bytes of parked sessions kept in RAM (default 1G); the\n"
    "                           least recently used go down to disk\n"
    "      --cold-budget SIZE   bytes on disk (default 0: unlimited); over it the least\n"
    "                           recently used sessions are dropped (logged, counted)\n"
    "      --idle-park S        park sessions idle for S seconds (default 0: only on\n"
    "                           budget pressure); fractions allowed\n"
    "      --max-sessions N     sessions held in all tiers at most (default 1024), then 429\n"
    "      --max-sessions-per-key N  sessions one API key may hold (default: a quarter of\n"
    "                           --max-sessions; without keys: --max-sessions), then 429\n"
    "      --session-ttl S      delete sessions unused for S seconds, from every tier\n"
    "                           (default 86400 = 24 h; 0: never); logged and counted\n"
    "  SIZE: bytes, or a number with K, M, G or T (powers of 1024), e.g. 512M\n"
    "      --chat-template T    chatml | llama2 | llama3 | plain (default: from the model)\n"
    "      --timeout S          idle connection timeout in seconds (default 60); a request\n"
    "                           being generated or streamed is never cut by it\n"
    "      --request-timeout S  a request's head and body must arrive within S seconds of\n"
    "                           its connection opening or of the previous response (default 10)\n"
    "      --max-conns N        open connections at most (default 16384)\n"
    "      --max-conns-per-ip N open connections from one client address at most\n"
    "                           (default 64; 0: no limit)\n"
    "      --cors-origin O      let browser pages from origin O (https://app.example:8443,\n"
    "                           or * for any) call the API: preflights answered without a\n"
    "                           key, Access-Control-* headers on every response (repeatable)\n"
    "      --quiet              no per-request log lines\n";

/* Read --api-key-file into o->keys; the copies go to key_store (freed by the caller). */
static int read_key_file(const char *path, http_opts *o, char **key_store) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvpark: cannot open --api-key-file '%s': %s\n", path, strerror(errno));
        return -1;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t n = strcspn(p, "\r\n");
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
        p[n] = 0;
        if (!*p || *p == '#') continue;
        if (o->n_keys >= HTTP_MAX_KEYS) {
            fprintf(stderr, "kvpark: more than %d API keys\n", HTTP_MAX_KEYS);
            fclose(f);
            return -1;
        }
        key_store[o->n_keys] = strdup(p);
        o->keys[o->n_keys] = key_store[o->n_keys];
        o->n_keys++;
    }
    fclose(f);
    return 0;
}

/* getopt codes of serve's own options (above cli.h's shared table). */
enum { OPT_REQUEST_TIMEOUT = 0x1000, OPT_MAX_CONNS, OPT_MAX_CONNS_PER_IP, SERVE_OPT_MAX_SESSIONS_PER_KEY,
       SERVE_OPT_SESSION_TTL, SERVE_OPT_CORS_ORIGIN };

/* An origin as browsers send it: "*", or scheme://host[:port] with no path,
 * no spaces or controls (it is echoed in a response header). */
static bool cors_origin_ok(const char *o) {
    if (!strcmp(o, "*")) return true;
    const char *p = strstr(o, "://");
    if (!p || p == o || !p[3]) return false;
    for (const char *q = o; *q; q++)
        if ((unsigned char)*q <= ' ' || *q == 0x7f || *q == ',' || (q > p + 2 && *q == '/')) return false;
    return true;
}

int cmd_serve(int argc, char **argv) {
    cli_model_opts co = {.kv_type = KP_TYPE_F32};
    http_opts ho = http_default_opts();
    char *key_store[HTTP_MAX_KEYS] = {0};
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"ctx", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, CLI_OPT_KV_TYPE},
        {"host", required_argument, 0, CLI_OPT_HOST}, {"port", required_argument, 0, CLI_OPT_PORT},
        {"parallel", required_argument, 0, CLI_OPT_PARALLEL}, {"queue", required_argument, 0, CLI_OPT_QUEUE},
        {"api-key", required_argument, 0, CLI_OPT_API_KEY},
        {"api-key-file", required_argument, 0, CLI_OPT_API_KEY_FILE},
        {"metrics-key", required_argument, 0, CLI_OPT_METRICS_KEY},
        {"max-body", required_argument, 0, CLI_OPT_MAX_BODY},
        {"max-tokens", required_argument, 0, CLI_OPT_MAX_TOKENS},
        {"session-dir", required_argument, 0, CLI_OPT_SESSION_DIR},
        {"cold-dir", required_argument, 0, CLI_OPT_SESSION_DIR},
        {"max-sessions", required_argument, 0, CLI_OPT_MAX_SESSIONS},
        {"max-sessions-per-key", required_argument, 0, SERVE_OPT_MAX_SESSIONS_PER_KEY},
        {"session-ttl", required_argument, 0, SERVE_OPT_SESSION_TTL},
        {"codec", required_argument, 0, CLI_OPT_CODEC},
        {"hot-sessions", required_argument, 0, CLI_OPT_HOT_SESSIONS},
        {"hot-budget", required_argument, 0, CLI_OPT_HOT_BUDGET},
        {"warm-budget", required_argument, 0, CLI_OPT_WARM_BUDGET},
        {"cold-budget", required_argument, 0, CLI_OPT_COLD_BUDGET},
        {"idle-park", required_argument, 0, CLI_OPT_IDLE_PARK},
        {"chat-template", required_argument, 0, CLI_OPT_CHAT_TEMPLATE},
        {"timeout", required_argument, 0, CLI_OPT_TIMEOUT}, {"quiet", no_argument, 0, CLI_OPT_QUIET},
        {"device", required_argument, 0, CLI_OPT_DEVICE},
        {"request-timeout", required_argument, 0, OPT_REQUEST_TIMEOUT},
        {"max-conns", required_argument, 0, OPT_MAX_CONNS},
        {"max-conns-per-ip", required_argument, 0, OPT_MAX_CONNS_PER_IP},
        {"cors-origin", required_argument, 0, SERVE_OPT_CORS_ORIGIN},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:c:t:h", lo, NULL)) != -1) {
        int r = cli_model_opt(c, optarg, &co);
        if (r < 0) return cli_usage_error("serve", "bad option value");
        if (r > 0) continue;
        long v;
        switch (c) {
        case CLI_OPT_HOST: ho.host = optarg; break;
        case CLI_OPT_PORT:
            if (cli_parse_long(optarg, 0, 65535, &v)) return cli_usage_error("serve", "bad --port");
            ho.port = (int)v;
            break;
        case CLI_OPT_PARALLEL:
            if (cli_parse_long(optarg, 1, 1024, &v)) return cli_usage_error("serve", "bad --parallel (1..1024)");
            ho.n_parallel = (int)v;
            break;
        case CLI_OPT_QUEUE:
            if (cli_parse_long(optarg, 0, 1 << 20, &v)) return cli_usage_error("serve", "bad --queue");
            ho.queue_max = (int)v;
            break;
        case CLI_OPT_API_KEY:
            if (ho.n_keys >= HTTP_MAX_KEYS || !*optarg) return cli_usage_error("serve", "bad --api-key");
            ho.keys[ho.n_keys++] = optarg;
            break;
        case CLI_OPT_API_KEY_FILE:
            if (read_key_file(optarg, &ho, key_store)) return 1;
            break;
        case CLI_OPT_METRICS_KEY: ho.metrics_key = optarg; break;
        case CLI_OPT_MAX_BODY:
            if (cli_parse_long(optarg, 1024, 1L << 32, &v)) return cli_usage_error("serve", "bad --max-body");
            ho.max_body = (size_t)v;
            break;
        case CLI_OPT_MAX_TOKENS:
            if (cli_parse_long(optarg, 1, 1 << 24, &v)) return cli_usage_error("serve", "bad --max-tokens");
            ho.max_tokens_default = (int)v;
            break;
        case CLI_OPT_SESSION_DIR: ho.session_dir = optarg; break;
        case CLI_OPT_MAX_SESSIONS:
            if (cli_parse_long(optarg, 1, 1 << 24, &v)) return cli_usage_error("serve", "bad --max-sessions");
            ho.max_sessions = (int)v;
            break;
        case SERVE_OPT_MAX_SESSIONS_PER_KEY:
            if (cli_parse_long(optarg, 1, 1 << 24, &v)) return cli_usage_error("serve", "bad --max-sessions-per-key");
            ho.max_sessions_per_key = (int)v;
            break;
        case SERVE_OPT_SESSION_TTL: {
            double d;
            if (cli_parse_float(optarg, 0, 1e9, &d)) return cli_usage_error("serve", "bad --session-ttl (seconds)");
            ho.session_ttl_s = d;
            break;
        }
        case CLI_OPT_CHAT_TEMPLATE: ho.chat_template = optarg; break;
        case CLI_OPT_CODEC: ho.codec = optarg; break;
        case CLI_OPT_HOT_SESSIONS:
            if (cli_parse_long(optarg, 0, 1 << 24, &v)) return cli_usage_error("serve", "bad --hot-sessions");
            ho.hot_sessions = (int)v;
            break;
        case CLI_OPT_HOT_BUDGET:
            if (cli_parse_size(optarg, &ho.hot_budget)) return cli_usage_error("serve", "bad --hot-budget (e.g. 4G)");
            break;
        case CLI_OPT_WARM_BUDGET:
            if (cli_parse_size(optarg, &ho.warm_budget)) return cli_usage_error("serve", "bad --warm-budget (e.g. 1G)");
            break;
        case CLI_OPT_COLD_BUDGET:
            if (cli_parse_size(optarg, &ho.cold_budget)) return cli_usage_error("serve", "bad --cold-budget (e.g. 100G)");
            break;
        case CLI_OPT_IDLE_PARK: {
            double d;
            if (cli_parse_float(optarg, 0, 1e9, &d)) return cli_usage_error("serve", "bad --idle-park (seconds)");
            ho.idle_park_s = d;
            break;
        }
        case CLI_OPT_TIMEOUT:
            if (cli_parse_long(optarg, 1, 86400, &v)) return cli_usage_error("serve", "bad --timeout");
            ho.timeout_s = (int)v;
            break;
        case OPT_REQUEST_TIMEOUT:
            if (cli_parse_long(optarg, 1, 86400, &v)) return cli_usage_error("serve", "bad --request-timeout");
            ho.request_timeout_s = (int)v;
            break;
        case OPT_MAX_CONNS:
            if (cli_parse_long(optarg, 1, 1 << 20, &v)) return cli_usage_error("serve", "bad --max-conns");
            ho.max_conns = (int)v;
            break;
        case OPT_MAX_CONNS_PER_IP:
            if (cli_parse_long(optarg, 0, 1 << 20, &v)) return cli_usage_error("serve", "bad --max-conns-per-ip");
            ho.max_conns_per_ip = (int)v;
            break;
        case SERVE_OPT_CORS_ORIGIN:
            if (ho.n_cors >= HTTP_MAX_CORS || !cors_origin_ok(optarg))
                return cli_usage_error("serve", "bad --cors-origin (scheme://host[:port] or *, at most 16)");
            ho.cors_origins[ho.n_cors++] = optarg;
            break;
        case CLI_OPT_QUIET: ho.quiet = 1; break;
        case 'h': fputs(serve_help, stdout); return 0;
        default: return cli_usage_error("serve", "unknown option");
        }
    }
    if (optind < argc) return cli_usage_error("serve", "unexpected argument");
    kp_err err = {0};
    char path[1024];
    int rc = model_resolve(co.model, path, sizeof path, &err);
    if (rc) return cli_die(&err, rc);
    ho.model = path;
    ho.n_threads = co.threads;
    ho.device = co.device;
    ho.n_ctx = co.n_ctx;
    ho.kv_type = co.kv_type;
    rc = http_serve(&ho, &err);
    for (int i = 0; i < HTTP_MAX_KEYS; i++) free(key_store[i]);
    return rc ? cli_die(&err, rc) : 0;
}
