/*
 * cmd_serve.c — `kvpark serve`: the OpenAI-compatible HTTP server
 * (server/http.h) with its session tiers, configured from the command line
 * and/or a YAML config file (--config, tools/config.h).
 *
 * A thin front end: every option maps to one field of http_opts. One table
 * (serve_opts) lists every option once: getopt's long options are built from
 * it and the config loader takes its keys from it, and both hand a value to
 * the same serve_apply(), so a value is valid in the file exactly when it is
 * valid as a flag. Order: defaults, then the file, then the flags (a flag
 * overrides the file wherever it stands on the command line; a list option
 * given as flags replaces the file's list). The model path is resolved here
 * so a bad -m fails before the server starts. The server runs until
 * SIGINT/SIGTERM. Exit status 0, 1 on a runtime error, 2 on bad usage or a
 * bad config file.
 */
#include <errno.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/model.h"
#include "server/http.h"
#include "server/sessions.h"
#include "storage/store.h"
#include "tools/cli.h"
#include "tools/config.h"

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
    "      --codec C            codec for parked sessions: auto (default), none (lossless),\n"
    "                           fp16, int8, int4, kivi2, or a codec file from 'kvpark\n"
    "                           calibrate'. auto: the model's codec file (MODEL.kvcodec\n"
    "                           beside MODEL.gguf, or the one the server made in the cold\n"
    "                           dir's autocodec/); without one it parks with int8 and\n"
    "                           calibrates a learned codec in the background at the lowest\n"
    "                           priority, from the prompts it serves (or --calib-text), then\n"
    "                           parks with that (GET /v1/codec shows the state)\n"
    "      --calib-text FILE    auto: calibrate from this text instead of the prompts served\n"
    "      --calib-tokens N     auto: tokens to calibrate on (default 32768)\n"
    "      --calib-max-kl K     auto: the codec's KL bound on unseen text, in nats per token\n"
    "                           (default 0.002; searched at half of it on a held-out tenth)\n"
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
    "      --remote URL         a Redis shared by every replica, below cold:\n"
    "                           redis://[user:password@]host[:port][/db] or unix:/path;\n"
    "                           a replica resumes sessions any other one saved\n"
    "      --remote-policy P    write-through (default: every save also goes to Redis,\n"
    "                           so any replica can resume it at once and a dead replica\n"
    "                           loses nothing) or write-back (only what the cold budget\n"
    "                           drops goes there)\n"
    "      --remote-ttl S       keys in Redis expire S seconds after their last write\n"
    "                           (default 0: never)\n"
    "      --remote-budget SIZE bytes kvpark keeps in Redis for this model and codec, all\n"
    "                           replicas together (default 0: unlimited; give every\n"
    "                           replica the same); over it the least recently used\n"
    "                           objects and records go (an object gone: its sessions are\n"
    "                           recomputed from their token ids); logged, counted\n"
    "      --remote-timeout MS  no Redis call waits longer (default 2000); a session only\n"
    "                           in an unreachable Redis answers 503 with Retry-After\n"
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
    "      --quiet              no per-request log lines\n"
    "Configuration:\n"
    "      --config FILE        read options from a YAML file: the keys are the long option\n"
    "                           names above (port: 8080, api-key: [k1, k2], quiet: true);\n"
    "                           flags given here override it (see deploy/kvpark.yaml.example)\n"
    "      --print-config       print the effective configuration (defaults, file, flags) as\n"
    "                           YAML --config accepts, and exit; API keys and the metrics key\n"
    "                           are printed as \"<redacted>\" (refused when read back: put\n"
    "                           the real keys, or use api-key-file)\n"
    "      --profile P          codec shorthand: fast (fp16, last 64 rows exact), balanced\n"
    "                           (int8, last 64 exact), small (int4, last 16 exact); the\n"
    "                           first 4 rows stay exact in all; --codec overrides it\n"
    "      --park-window N      with a built-in codec, park the last N rows of a session\n"
    "                           exact (default 64, or the profile's; 0: none)\n";

/* Read --api-key-file into o->keys after the n already there; the copies go to key_store (freed by the caller). */
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
       SERVE_OPT_SESSION_TTL, SERVE_OPT_CORS_ORIGIN, SERVE_OPT_CONFIG, SERVE_OPT_PRINT_CONFIG,
       SERVE_OPT_PROFILE, SERVE_OPT_PARK_WINDOW, SERVE_OPT_REMOTE, SERVE_OPT_REMOTE_POLICY, SERVE_OPT_REMOTE_TTL,
       SERVE_OPT_REMOTE_TIMEOUT, SERVE_OPT_REMOTE_BUDGET, SERVE_OPT_CALIB_TEXT, SERVE_OPT_CALIB_TOKENS,
       SERVE_OPT_CALIB_MAX_KL };

#define RA required_argument
#define NA no_argument
/* Every option of serve, once: name, argument, getopt code, repeatable, allowed in the file,
 * the default --print-config shows. Adding an option is one line here and one case in
 * serve_apply(). */
static const conf_opt serve_opts[] = {
    {"model", RA, 'm', 0, 1, NULL},
    {"host", RA, CLI_OPT_HOST, 0, 1, "127.0.0.1"},
    {"port", RA, CLI_OPT_PORT, 0, 1, "8080"},
    {"parallel", RA, CLI_OPT_PARALLEL, 0, 1, "4"},
    {"queue", RA, CLI_OPT_QUEUE, 0, 1, "64"},
    {"ctx", RA, 'c', 0, 1, NULL},
    {"kv-type", RA, CLI_OPT_KV_TYPE, 0, 1, "f32"},
    {"threads", RA, 't', 0, 1, NULL},
    {"device", RA, CLI_OPT_DEVICE, 0, 1, "auto"},
    {"api-key", RA, CLI_OPT_API_KEY, 1, 1, NULL},
    {"api-key-file", RA, CLI_OPT_API_KEY_FILE, 0, 1, NULL},
    {"metrics-key", RA, CLI_OPT_METRICS_KEY, 0, 1, NULL},
    {"max-body", RA, CLI_OPT_MAX_BODY, 0, 1, "8388608"},
    {"max-tokens", RA, CLI_OPT_MAX_TOKENS, 0, 1, NULL},
    {"cold-dir", RA, CLI_OPT_SESSION_DIR, 0, 1, "./sessions"},
    {"session-dir", RA, CLI_OPT_SESSION_DIR, 0, 0, NULL}, /* alias of cold-dir: flag only */
    {"profile", RA, SERVE_OPT_PROFILE, 0, 1, NULL},
    {"codec", RA, CLI_OPT_CODEC, 0, 1, NULL}, /* not set: auto, or the profile's */
    {"calib-text", RA, SERVE_OPT_CALIB_TEXT, 0, 1, NULL},
    {"calib-tokens", RA, SERVE_OPT_CALIB_TOKENS, 0, 1, NULL},  /* not set: 32768 (a set one needs codec auto) */
    {"calib-max-kl", RA, SERVE_OPT_CALIB_MAX_KL, 0, 1, NULL},  /* not set: 0.002 */
    {"park-window", RA, SERVE_OPT_PARK_WINDOW, 0, 1, "64"},
    {"hot-sessions", RA, CLI_OPT_HOT_SESSIONS, 0, 1, "0"},
    {"hot-budget", RA, CLI_OPT_HOT_BUDGET, 0, 1, "2G"},
    {"warm-budget", RA, CLI_OPT_WARM_BUDGET, 0, 1, "1G"},
    {"cold-budget", RA, CLI_OPT_COLD_BUDGET, 0, 1, "0"},
    {"idle-park", RA, CLI_OPT_IDLE_PARK, 0, 1, "0"},
    {"remote", RA, SERVE_OPT_REMOTE, 0, 1, NULL},
    {"remote-policy", RA, SERVE_OPT_REMOTE_POLICY, 0, 1, "write-through"},
    {"remote-ttl", RA, SERVE_OPT_REMOTE_TTL, 0, 1, "0"},
    {"remote-budget", RA, SERVE_OPT_REMOTE_BUDGET, 0, 1, "0"},
    {"remote-timeout", RA, SERVE_OPT_REMOTE_TIMEOUT, 0, 1, "2000"},
    {"max-sessions", RA, CLI_OPT_MAX_SESSIONS, 0, 1, "1024"},
    {"max-sessions-per-key", RA, SERVE_OPT_MAX_SESSIONS_PER_KEY, 0, 1, NULL},
    {"session-ttl", RA, SERVE_OPT_SESSION_TTL, 0, 1, "86400"},
    {"chat-template", RA, CLI_OPT_CHAT_TEMPLATE, 0, 1, NULL},
    {"timeout", RA, CLI_OPT_TIMEOUT, 0, 1, "60"},
    {"request-timeout", RA, OPT_REQUEST_TIMEOUT, 0, 1, "10"},
    {"max-conns", RA, OPT_MAX_CONNS, 0, 1, "16384"},
    {"max-conns-per-ip", RA, OPT_MAX_CONNS_PER_IP, 0, 1, "64"},
    {"cors-origin", RA, SERVE_OPT_CORS_ORIGIN, 1, 1, NULL},
    {"quiet", NA, CLI_OPT_QUIET, 0, 1, NULL},
    {"config", RA, SERVE_OPT_CONFIG, 0, 0, NULL},
    {"print-config", NA, SERVE_OPT_PRINT_CONFIG, 0, 0, NULL},
    {"help", NA, 'h', 0, 0, NULL},
};
#define N_SERVE_OPTS ((int)(sizeof serve_opts / sizeof serve_opts[0]))

/* The profiles (--profile): a built-in codec and a lossless recent window
 * each (the first 4 rows, the attention sink, stay exact in all). fast: 16
 * bits a number, nothing to decode but a conversion; balanced: 8 bits;
 * small: 4 bits and only the last 16 rows exact (the default window is 64). */
static const struct { const char *name, *codec; int window; } serve_profiles[] = {
    {"fast", "fp16", 64}, {"balanced", "int8", 64}, {"small", "int4", 16}};

/* Everything serve collects before it starts. */
typedef struct serve_st {
    cli_model_opts co;
    http_opts ho;
    int src;                         /* 0: the config file, 1: the command line */
    const char *val[N_SERVE_OPTS];   /* the last value of each option, for --print-config */
    const char *keys[HTTP_MAX_KEYS]; /* --api-key values */
    int n_keys, keys_src, cors_src;
    const char *key_file, *profile;
    int profile_window;              /* the profile's window (0: none chosen) */
    char **strs;                     /* copies of the file's values (freed at the end) */
    int n_strs;
} serve_st;

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

#define BAD(...) return snprintf(msg, cap, __VA_ARGS__), -1

/* Apply one option's value to st (the flag's text; NULL for a flag): the only
 * place a value is checked, for the command line and the file alike. */
static int serve_apply(void *ctx, int c, const char *arg, char *msg, size_t cap) {
    serve_st *st = ctx;
    http_opts *ho = &st->ho;
    int r = cli_model_opt(c, arg, &st->co);
    if (r < 0) {
        if (c == CLI_OPT_DEVICE) BAD("bad device '%s' (cpu, cuda or auto)", arg);
        if (c == CLI_OPT_KV_TYPE) BAD("bad kv-type '%s' (f32, f16 or bf16)", arg);
        BAD("bad value '%s'", arg);
    }
    if (r > 0) goto record;
    long v;
    double d;
    switch (c) {
    case CLI_OPT_HOST: ho->host = arg; break;
    case CLI_OPT_PORT:
        if (cli_parse_long(arg, 0, 65535, &v)) BAD("bad port '%s' (0..65535)", arg);
        ho->port = (int)v;
        break;
    case CLI_OPT_PARALLEL:
        if (cli_parse_long(arg, 1, 1024, &v)) BAD("bad parallel '%s' (1..1024)", arg);
        ho->n_parallel = (int)v;
        break;
    case CLI_OPT_QUEUE:
        if (cli_parse_long(arg, 0, 1 << 20, &v)) BAD("bad queue '%s'", arg);
        ho->queue_max = (int)v;
        break;
    case CLI_OPT_API_KEY:
        if (!strcmp(arg, CONF_REDACTED))
            BAD("api-key is \"%s\" (as --print-config prints it): give the real key", CONF_REDACTED);
        if (st->keys_src != st->src) st->n_keys = 0, st->keys_src = st->src; /* flags replace the file's list */
        if (st->n_keys >= HTTP_MAX_KEYS || !*arg) BAD("bad api-key (empty, or more than %d)", HTTP_MAX_KEYS);
        st->keys[st->n_keys++] = arg;
        break;
    case CLI_OPT_API_KEY_FILE: st->key_file = arg; break;
    case CLI_OPT_METRICS_KEY:
        if (!strcmp(arg, CONF_REDACTED))
            BAD("metrics-key is \"%s\" (as --print-config prints it): give the real key", CONF_REDACTED);
        ho->metrics_key = arg;
        break;
    case CLI_OPT_MAX_BODY:
        if (cli_parse_long(arg, 1024, 1L << 32, &v)) BAD("bad max-body '%s' (1024..4294967296)", arg);
        ho->max_body = (size_t)v;
        break;
    case CLI_OPT_MAX_TOKENS:
        if (cli_parse_long(arg, 1, 1 << 24, &v)) BAD("bad max-tokens '%s'", arg);
        ho->max_tokens_default = (int)v;
        break;
    case CLI_OPT_SESSION_DIR: ho->session_dir = arg; break;
    case CLI_OPT_MAX_SESSIONS:
        if (cli_parse_long(arg, 1, 1 << 24, &v)) BAD("bad max-sessions '%s'", arg);
        ho->max_sessions = (int)v;
        break;
    case SERVE_OPT_MAX_SESSIONS_PER_KEY:
        if (cli_parse_long(arg, 1, 1 << 24, &v)) BAD("bad max-sessions-per-key '%s'", arg);
        ho->max_sessions_per_key = (int)v;
        break;
    case SERVE_OPT_SESSION_TTL:
        if (cli_parse_float(arg, 0, 1e9, &d)) BAD("bad session-ttl '%s' (seconds)", arg);
        ho->session_ttl_s = d;
        break;
    case CLI_OPT_CHAT_TEMPLATE: ho->chat_template = arg; break;
    case CLI_OPT_CODEC: ho->codec = arg; break;
    case SERVE_OPT_CALIB_TEXT: ho->calib_text = arg; break;
    case SERVE_OPT_CALIB_TOKENS:
        if (cli_parse_long(arg, 64, 1L << 30, &v)) BAD("bad calib-tokens '%s' (64..2^30)", arg);
        ho->calib_tokens = v;
        break;
    case SERVE_OPT_CALIB_MAX_KL:
        if (cli_parse_float(arg, 1e-6, 10, &d)) BAD("bad calib-max-kl '%s' (nats per token, e.g. 0.002)", arg);
        ho->calib_max_kl = d;
        break;
    case SERVE_OPT_PROFILE: {
        int i, n = (int)(sizeof serve_profiles / sizeof serve_profiles[0]);
        for (i = 0; i < n && strcmp(arg, serve_profiles[i].name); i++) {}
        if (i == n) BAD("bad profile '%s' (fast, balanced or small)", arg);
        st->profile = serve_profiles[i].codec;
        st->profile_window = serve_profiles[i].window;
        break;
    }
    case SERVE_OPT_PARK_WINDOW:
        if (cli_parse_long(arg, 0, 1 << 20, &v)) BAD("bad park-window '%s' (rows, 0..1048576)", arg);
        ho->park_window = v ? (int)v : SESS_WINDOW_NONE; /* nonzero: given */
        break;
    case CLI_OPT_HOT_SESSIONS:
        if (cli_parse_long(arg, 0, 1 << 24, &v)) BAD("bad hot-sessions '%s'", arg);
        ho->hot_sessions = (int)v;
        break;
    case CLI_OPT_HOT_BUDGET:
        if (cli_parse_size(arg, &ho->hot_budget)) BAD("bad hot-budget '%s' (e.g. 4G)", arg);
        break;
    case CLI_OPT_WARM_BUDGET:
        if (cli_parse_size(arg, &ho->warm_budget)) BAD("bad warm-budget '%s' (e.g. 1G)", arg);
        break;
    case CLI_OPT_COLD_BUDGET:
        if (cli_parse_size(arg, &ho->cold_budget)) BAD("bad cold-budget '%s' (e.g. 100G)", arg);
        break;
    case SERVE_OPT_REMOTE: {
        remote_url u;
        kp_err e = {0};
        if (remote_url_parse(arg, &u, &e)) BAD("bad remote '%s': %s", arg, e.msg);
        if (strstr(arg, CONF_REDACTED))
            BAD("remote has \"%s\" in it (as --print-config prints a password): give the real URL", CONF_REDACTED);
        ho->remote_url = arg;
        break;
    }
    case SERVE_OPT_REMOTE_POLICY:
        if (!strcmp(arg, "write-through")) ho->remote_policy = STORE_REMOTE_WRITE_THROUGH;
        else if (!strcmp(arg, "write-back")) ho->remote_policy = STORE_REMOTE_WRITE_BACK;
        else BAD("bad remote-policy '%s' (write-through or write-back)", arg);
        break;
    case SERVE_OPT_REMOTE_TTL:
        if (cli_parse_long(arg, 0, 1L << 31, &v)) BAD("bad remote-ttl '%s' (seconds, 0: no expiry)", arg);
        ho->remote_ttl_s = (uint32_t)v;
        break;
    case SERVE_OPT_REMOTE_BUDGET:
        if (cli_parse_size(arg, &ho->remote_budget)) BAD("bad remote-budget '%s' (e.g. 8G; 0: none)", arg);
        break;
    case SERVE_OPT_REMOTE_TIMEOUT:
        if (cli_parse_long(arg, 10, 600000, &v)) BAD("bad remote-timeout '%s' (milliseconds, 10..600000)", arg);
        ho->remote_timeout_ms = (int)v;
        break;
    case CLI_OPT_IDLE_PARK:
        if (cli_parse_float(arg, 0, 1e9, &d)) BAD("bad idle-park '%s' (seconds)", arg);
        ho->idle_park_s = d;
        break;
    case CLI_OPT_TIMEOUT:
        if (cli_parse_long(arg, 1, 86400, &v)) BAD("bad timeout '%s' (1..86400)", arg);
        ho->timeout_s = (int)v;
        break;
    case OPT_REQUEST_TIMEOUT:
        if (cli_parse_long(arg, 1, 86400, &v)) BAD("bad request-timeout '%s' (1..86400)", arg);
        ho->request_timeout_s = (int)v;
        break;
    case OPT_MAX_CONNS:
        if (cli_parse_long(arg, 1, 1 << 20, &v)) BAD("bad max-conns '%s'", arg);
        ho->max_conns = (int)v;
        break;
    case OPT_MAX_CONNS_PER_IP:
        if (cli_parse_long(arg, 0, 1 << 20, &v)) BAD("bad max-conns-per-ip '%s'", arg);
        ho->max_conns_per_ip = (int)v;
        break;
    case SERVE_OPT_CORS_ORIGIN:
        if (st->cors_src != st->src) ho->n_cors = 0, st->cors_src = st->src;
        if (ho->n_cors >= HTTP_MAX_CORS || !cors_origin_ok(arg))
            BAD("bad cors-origin '%s' (scheme://host[:port] or *, at most %d)", arg, HTTP_MAX_CORS);
        ho->cors_origins[ho->n_cors++] = arg;
        break;
    case CLI_OPT_QUIET: ho->quiet = 1; break;
    default: BAD("unknown option");
    }
record:
    for (int i = 0; i < N_SERVE_OPTS; i++)
        if (serve_opts[i].code == c) st->val[i] = arg ? arg : "true";
    return 0;
}

/* The file's values are freed with their YAML events: keep a copy. */
static int serve_apply_copy(void *ctx, int c, const char *arg, char *msg, size_t cap) {
    serve_st *st = ctx;
    if (arg) {
        char **n = realloc(st->strs, sizeof *n * (size_t)(st->n_strs + 1));
        char *dup = strdup(arg);
        if (!n || !dup) {
            free(dup);
            if (n) st->strs = n;
            BAD("out of memory");
        }
        st->strs = n;
        st->strs[st->n_strs++] = dup;
        arg = dup;
    }
    return serve_apply(ctx, c, arg, msg, cap);
}

/* --print-config: every file key, its effective value (secrets redacted). */
static void serve_print_config(const serve_st *st) {
    printf("# kvpark serve: effective configuration (defaults, then --config, then flags).\n"
           "# API keys and the metrics key are shown as \"%s\": replace them before using this\n"
           "# file with --config (a redacted value is refused there).\n", CONF_REDACTED);
    for (int i = 0; i < N_SERVE_OPTS; i++) {
        const conf_opt *o = &serve_opts[i];
        if (!o->file_ok) continue;
        const char *v = st->val[i] ? st->val[i] : o->def;
        switch (o->code) {
        case CLI_OPT_API_KEY:
            printf("api-key: [");
            for (int k = 0; k < st->n_keys; k++) printf("%s\"%s\"", k ? ", " : "", CONF_REDACTED);
            printf("]  # %d key(s)\n", st->n_keys);
            continue;
        case SERVE_OPT_CORS_ORIGIN:
            printf("cors-origin: [");
            for (int k = 0; k < st->ho.n_cors; k++) {
                if (k) printf(", ");
                conf_print_str(stdout, st->ho.cors_origins[k]);
            }
            printf("]\n");
            continue;
        case CLI_OPT_QUIET: printf("quiet: %s\n", st->ho.quiet ? "true" : "false"); continue;
        case SERVE_OPT_PARK_WINDOW: /* the effective window: a profile's, unless given */
            if (!st->val[i] && st->ho.park_window > 0) {
                printf("park-window: \"%d\"\n", st->ho.park_window);
                continue;
            }
            break;
        case SERVE_OPT_REMOTE: { /* a password in the URL is not printed */
            const char *at = v ? strrchr(v, '@') : NULL, *sch = v ? strstr(v, "://") : NULL;
            if (at && sch && sch < at) {
                printf("remote: \"%.*s%s@%s\"\n", (int)(sch + 3 - v), v, CONF_REDACTED, at + 1);
                continue;
            }
            break;
        }
        case CLI_OPT_METRICS_KEY:
            if (st->ho.metrics_key) {
                printf("metrics-key: \"%s\"\n", CONF_REDACTED);
                continue;
            }
            break;
        }
        if (!v) {
            printf("# %s: (not set)\n", o->name);
            continue;
        }
        printf("%s: ", o->name);
        conf_print_str(stdout, v);
        putchar('\n');
    }
}

static int serve_finish(serve_st *st, char **key_store, int rc) {
    for (int i = 0; i < HTTP_MAX_KEYS; i++) free(key_store[i]);
    for (int i = 0; i < st->n_strs; i++) free(st->strs[i]);
    free(st->strs);
    return rc;
}

int cmd_serve(int argc, char **argv) {
    serve_st st = {.co = {.kv_type = KP_TYPE_F32}, .ho = http_default_opts(), .keys_src = -1, .cors_src = -1};
    char *key_store[HTTP_MAX_KEYS] = {0};
    struct option lo[N_SERVE_OPTS + 1];
    for (int i = 0; i < N_SERVE_OPTS; i++)
        lo[i] = (struct option){serve_opts[i].name, serve_opts[i].has_arg, 0, serve_opts[i].code};
    lo[N_SERVE_OPTS] = (struct option){0, 0, 0, 0};
    const char *config = NULL;
    int print_config = 0, c;
    char msg[1024];
    /* Pass 1: --config, --print-config, --help and unknown options, wherever they are. */
    optind = 0;
    while ((c = getopt_long(argc, argv, "m:c:t:h", lo, NULL)) != -1) {
        if (c == SERVE_OPT_CONFIG) config = optarg;
        else if (c == SERVE_OPT_PRINT_CONFIG) print_config = 1;
        else if (c == 'h') return fputs(serve_help, stdout), 0;
        else if (c == '?') return cli_usage_error("serve", "unknown option");
    }
    if (optind < argc) return cli_usage_error("serve", "unexpected argument");
    /* The file, then pass 2: the flags over it. */
    if (config && conf_load(config, serve_opts, N_SERVE_OPTS, serve_apply_copy, &st, msg, sizeof msg)) {
        fprintf(stderr, "kvpark serve: %s\n", msg);
        return serve_finish(&st, key_store, 2);
    }
    st.src = 1;
    optind = 0;
    while ((c = getopt_long(argc, argv, "m:c:t:h", lo, NULL)) != -1) {
        if (c == SERVE_OPT_CONFIG || c == SERVE_OPT_PRINT_CONFIG) continue;
        if (serve_apply(&st, c, optarg, msg, sizeof msg)) {
            fprintf(stderr, "kvpark serve: %s (see 'kvpark serve --help')\n", msg);
            return serve_finish(&st, key_store, 2);
        }
    }
    http_opts *ho = &st.ho;
    if (!ho->codec && st.profile) { /* an explicit codec overrides the whole profile */
        ho->codec = st.profile;
        if (!ho->park_window) ho->park_window = st.profile_window;
    }
    if (!ho->codec) ho->codec = "auto"; /* the learned codec, found or calibrated (server/autocodec.h) */
    const bool is_auto = !strcmp(ho->codec, "auto");
    if (!is_auto && (ho->calib_text || ho->calib_tokens || ho->calib_max_kl)) {
        fprintf(stderr, "kvpark serve: calib-text, calib-tokens and calib-max-kl apply to --codec auto, not "
                        "'%s'\n", ho->codec);
        return serve_finish(&st, key_store, 2);
    }
    if (ho->park_window && !is_auto && !store_codec_builtin(ho->codec)) {
        fprintf(stderr, "kvpark serve: park-window applies to the built-in codecs (none, fp16, int8, int4, "
                        "kivi2); the codec file '%s' parks with the window it was calibrated with "
                        "(kvpark calibrate --window N)\n", ho->codec);
        return serve_finish(&st, key_store, 2);
    }
    if (print_config) {
        serve_print_config(&st);
        return serve_finish(&st, key_store, 0);
    }
    for (int i = 0; i < st.n_keys; i++) ho->keys[ho->n_keys++] = st.keys[i];
    if (st.key_file && read_key_file(st.key_file, ho, key_store)) return serve_finish(&st, key_store, 1);
    kp_err err = {0};
    char path[1024];
    int rc = model_resolve(st.co.model, path, sizeof path, &err);
    if (rc) return serve_finish(&st, key_store, cli_die(&err, rc));
    ho->model = path;
    ho->n_threads = st.co.threads;
    ho->device = st.co.device;
    ho->n_ctx = st.co.n_ctx;
    ho->kv_type = st.co.kv_type;
    rc = http_serve(ho, &err);
    return serve_finish(&st, key_store, rc ? cli_die(&err, rc) : 0);
}
