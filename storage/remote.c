/*
 * remote.c — the Redis remote tier (contract in remote.h).
 *
 * Why Redis and hiredis: the tier shared by replicas must be a system
 * operators already run and trust, with its own memory budget and eviction
 * (maxmemory + allkeys-lru); hiredis is its reference C client (Debian
 * libhiredis-dev). We only use plain commands (SET, GET, EXISTS, EXPIRE,
 * DEL, HMGET) and one Lua script (the versioned record write), so any Redis
 * >= 5 or Valkey works.
 *
 * Connections: hiredis contexts are not thread-safe; a call takes one from a
 * pool (or connects a new one), uses it alone and gives it back; a context
 * that saw an error is freed (the next call reconnects). Every context has
 * the connect timeout and a command (socket) timeout, so a stopped Redis
 * (SIGSTOP, network partition) fails a call after at most those.
 *
 * The writer thread owns the queue's head job while it works on it; jobs are
 * a FIFO, a save of an id that is already waiting (not in flight) replaces
 * that job's content. Backoff doubles from retry_min_ms to retry_max_ms
 * while Redis fails, and resets on success.
 *
 * Counters and the state are under the same mutex (cheap; nothing blocks
 * while it is held: no Redis I/O happens under it).
 */
#include "storage/remote.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>

#include <hiredis/hiredis.h>
#include <sodium.h>
#include <xxhash.h>

#define ROB_MAGIC "KVPKROB1"
#define ROB_HDR 48u
#define RRC_MAGIC "KVPKRRC1"
#define RRC_HDR 40u
#define POOL_MAX 8
#define REMOTE_VALUE_MAX (512ull << 20) /* Redis' own limit on a string */

static const char *const ev_names[REMOTE_EV_N] = {"put", "get", "hit", "miss", "error",
                                                  "retry", "dropped", "timeout", "evicted"};

const char *remote_event_name(int ev) {
    return ev >= 0 && ev < REMOTE_EV_N ? ev_names[ev] : "unknown";
}

const char *remote_state_name(remote_state_t s) {
    return s == REMOTE_UP ? "up" : s == REMOTE_DEGRADED ? "degraded" : "down";
}

/* The record-write script: KEYS[1] record key; ARGV: data, ttl, expected
 * version (-1: any), the owner secret ("" if not known: field k is a copy
 * a replica can find should REMOTE_SECRET_KEY be evicted; remote_share_secret).
 * Returns {1, new version} or {0, current version}. */
static const char REC_SCRIPT[] =
    "local cur = tonumber(redis.call('HGET', KEYS[1], 'v')) or 0\n"
    "local want = tonumber(ARGV[3])\n"
    "if want >= 0 and cur ~= want then return {0, cur} end\n"
    "local nv = cur + 1\n"
    "redis.call('HSET', KEYS[1], 'v', nv, 'd', ARGV[1])\n"
    "if #ARGV[4] > 0 then redis.call('HSET', KEYS[1], 'k', ARGV[4]) end\n"
    "local ttl = tonumber(ARGV[2])\n"
    "if ttl > 0 then redis.call('EXPIRE', KEYS[1], ttl) else redis.call('PERSIST', KEYS[1]) end\n"
    "return {1, nv}\n";

/* The budget (remote.h "The budget"). Every script below starts with NOW:
 * the server's clock in microseconds (TIME is non-deterministic: Redis 5
 * needs effects replication switched on first; later ones have it on).
 *
 * BUDGET_SCRIPT: KEYS[1..3] = b:used, b:lru, b:size; ARGV[1] = the budget,
 * then (key, bytes) pairs to enter (bytes < 0: just remove it from the
 * books, e.g. after a DEL). Returns {keys evicted, bytes used}. */
#define NOW_LUA                                                                                             \
    "if redis.replicate_commands then pcall(redis.replicate_commands) end\n"                              \
    "local t = redis.call('TIME')\n"                                                                      \
    "local now = tonumber(t[1]) * 1000000 + tonumber(t[2])\n"
static const char BUDGET_SCRIPT[] =
    NOW_LUA
    "local used = tonumber(redis.call('GET', KEYS[1])) or 0\n"
    "for i = 2, #ARGV - 1, 2 do\n"
    "  local k, n = ARGV[i], tonumber(ARGV[i + 1])\n"
    "  local old = tonumber(redis.call('HGET', KEYS[3], k)) or 0\n"
    "  if n >= 0 and redis.call('EXISTS', k) == 1 then\n"
    "    redis.call('HSET', KEYS[3], k, n)\n"
    "    redis.call('ZADD', KEYS[2], now, k)\n"
    "    used = used + n - old\n"
    "  else\n"
    "    redis.call('HDEL', KEYS[3], k)\n"
    "    redis.call('ZREM', KEYS[2], k)\n"
    "    used = used - old\n"
    "  end\n"
    "end\n"
    "local budget, ev = tonumber(ARGV[1]), 0\n"
    "while used > budget do\n"
    "  local p = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')\n"
    "  if #p == 0 or tonumber(p[2]) >= now then break end\n"
    "  local n = tonumber(redis.call('HGET', KEYS[3], p[1])) or 0\n"
    "  redis.call('DEL', p[1])\n"
    "  redis.call('ZREM', KEYS[2], p[1])\n"
    "  redis.call('HDEL', KEYS[3], p[1])\n"
    "  used = used - n\n"
    "  ev = ev + 1\n"
    "end\n"
    "if used < 0 then used = 0 end\n"
    "redis.call('SET', KEYS[1], used)\n"
    "return {ev, used}\n";

/* TOUCH_SCRIPT: KEYS[1] = b:lru, KEYS[2] = the key read; moves it to the
 * young end if it is in the books. */
static const char TOUCH_SCRIPT[] =
    NOW_LUA
    "redis.call('ZADD', KEYS[1], 'XX', now, KEYS[2])\n"
    "return 0\n";

typedef struct rjob {
    struct rjob *next;
    char id[REMOTE_ID_MAX + 1];
    bool del;            /* a delete, not a save */
    remote_obj *objs;    /* [n_objs], data copies owned by the job */
    int n_objs;
    uint8_t *rec;
    size_t rec_len;
    uint64_t bytes;
} rjob;

struct remote {
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* queue changed / stop */
    pthread_cond_t cv_idle; /* queue became empty */
    remote_opts o;
    remote_url url;
    char prefix[REMOTE_PREFIX_MAX];
    redisContext *pool[POOL_MAX];
    int n_pool;
    rjob *head, *tail;
    size_t q_jobs;
    uint64_t q_bytes;
    bool inflight;          /* the writer works on head */
    bool stop;
    bool thread_started;
    pthread_t th;
    remote_state_t state;
    bool dropped_since_ok;
    char last_err[KP_ERR_MAX];
    uint64_t ev[REMOTE_EV_N];
    uint64_t used;          /* b:used as the last budget step returned */
    cas_key *known;         /* [known_cap] open addressing, {0,0} = empty: objects this */
    size_t known_cap, n_known; /*   process wrote or saw in Redis (remote_known; advisory) */
    uint8_t secret[256];    /* the deployment's owner secret, once shared (remote_share_secret): */
    size_t secret_len;      /*   re-asserted with every save, should Redis evict it (allkeys-lru) */
};

remote_opts remote_default_opts(void) {
    remote_opts o;
    memset(&o, 0, sizeof o);
    o.connect_timeout_ms = 1000;
    o.command_timeout_ms = 2000;
    o.queue_max_jobs = 256;
    o.queue_max_bytes = 256ull << 20;
    o.retry_min_ms = 50;
    o.retry_max_ms = 2000;
    return o;
}

static void rlogf(const remote *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void rlogf(const remote *r, const char *fmt, ...) {
    if (!r->o.log) return;
    char buf[KP_ERR_MAX + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    r->o.log(r->o.ud, buf);
}

static void count(remote *r, int ev) {
    pthread_mutex_lock(&r->mu);
    r->ev[ev]++;
    pthread_mutex_unlock(&r->mu);
}

/* ---- URLs ------------------------------------------------------------------ */

static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    return -1;
}

/* %-decode [s, s+n) into out (cap bytes incl. NUL). */
static int pct_decode(const char *s, size_t n, char *out, size_t cap, const char *what, kp_err *err) {
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c == '%') {
            if (i + 2 >= n) goto bad;
            int h = hexval(s[i + 1]), l = hexval(s[i + 2]);
            if (h < 0 || l < 0) goto bad;
            c = (char)(h * 16 + l);
            if (!c) goto bad;
            i += 2;
        }
        if (k + 1 >= cap) return kp_errf(err, KP_EINVAL, "remote: the URL's %s is longer than %zu bytes", what, cap - 1);
        out[k++] = c;
    }
    out[k] = 0;
    return 0;
bad:
    return kp_errf(err, KP_EINVAL, "remote: the URL's %s has a bad %%-escape (want %%XX, not %%00)", what);
}

static int parse_int(const char *s, size_t n, long lo, long hi, long *out) {
    if (n == 0 || n > 9) return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9') return -1;
        v = v * 10 + (s[i] - '0');
    }
    if (v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

int remote_url_parse(const char *url, remote_url *u, kp_err *err) {
    memset(u, 0, sizeof *u);
    u->port = REMOTE_DEFAULT_PORT;
    if (!url || !url[0]) return kp_errf(err, KP_EINVAL, "remote: no URL given (want redis://host:port[/db] or unix:/path)");
    for (const char *p = url; *p; p++)
        if ((unsigned char)*p <= ' ' || *p == 0x7f)
            return kp_errf(err, KP_EINVAL, "remote: URL '%.200s' contains a space or control character", url);
    if (!strncmp(url, "unix:", 5)) {
        u->is_unix = true;
        const char *p = url + 5;
        if (!strncmp(p, "//", 2)) p += 2; /* unix:///path */
        const char *q = strchr(p, '?');
        size_t n = q ? (size_t)(q - p) : strlen(p);
        if (n == 0 || p[0] != '/')
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': a unix: URL needs an absolute socket path (unix:/run/redis.sock)", url);
        if (n >= sizeof u->path)
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': the socket path is longer than %zu bytes", url, sizeof u->path - 1);
        memcpy(u->path, p, n);
        if (q) {
            long db;
            if (strncmp(q, "?db=", 4) || parse_int(q + 4, strlen(q + 4), 0, 1000000, &db))
                return kp_errf(err, KP_EINVAL, "remote: '%.200s': after the path only ?db=N (a database number) is understood", url);
            u->db = (int)db;
        }
        return 0;
    }
    if (strncmp(url, "redis://", 8))
        return kp_errf(err, KP_EINVAL, "remote: '%.200s' is not a Redis URL (want redis://[user:password@]host:port[/db] or unix:/path[?db=N]; rediss:// TLS is not supported)", url);
    const char *p = url + 8;
    const char *slash = strchr(p, '/');
    const char *end = slash ? slash : p + strlen(p);
    const char *at = NULL;
    for (const char *x = p; x < end; x++)
        if (*x == '@') at = x; /* the last one: a password may hold an escaped @ only */
    const char *hp = p;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        int rc;
        if (colon) {
            if ((rc = pct_decode(p, (size_t)(colon - p), u->user, sizeof u->user, "user", err))) return rc;
            if ((rc = pct_decode(colon + 1, (size_t)(at - colon - 1), u->password, sizeof u->password, "password", err)))
                return rc;
        } else {
            /* redis://password@host (the old form: no user) */
            if ((rc = pct_decode(p, (size_t)(at - p), u->password, sizeof u->password, "password", err))) return rc;
        }
        if (!u->password[0])
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': an empty password (drop the '@' part, or give one)", url);
        hp = at + 1;
    }
    const char *hend = end;
    const char *pc = NULL;
    if (hp < end && *hp == '[') { /* [v6]:port */
        const char *rb = memchr(hp, ']', (size_t)(end - hp));
        if (!rb) return kp_errf(err, KP_EINVAL, "remote: '%.200s': an IPv6 host needs its closing ']'", url);
        if (rb + 1 < end && rb[1] != ':') return kp_errf(err, KP_EINVAL, "remote: '%.200s': junk after the IPv6 host", url);
        if (rb + 1 < end) pc = rb + 1;
        hend = rb + 1;
        hp++;
        if ((size_t)(rb - hp) >= sizeof u->host || rb == hp)
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': bad IPv6 host", url);
        memcpy(u->host, hp, (size_t)(rb - hp));
    } else {
        pc = memchr(hp, ':', (size_t)(end - hp));
        hend = pc ? pc : end;
        size_t hn = (size_t)(hend - hp);
        if (hn == 0) return kp_errf(err, KP_EINVAL, "remote: '%.200s' names no host (redis://HOST:PORT)", url);
        if (hn >= sizeof u->host) return kp_errf(err, KP_EINVAL, "remote: '%.200s': the host name is too long", url);
        for (size_t i = 0; i < hn; i++) {
            char c = hp[i];
            if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '-' || c == '_'))
                return kp_errf(err, KP_EINVAL, "remote: '%.200s': the host name has a character '%c' no host name has", url, c);
        }
        memcpy(u->host, hp, hn);
    }
    if (pc) {
        long port;
        if (parse_int(pc + 1, (size_t)(end - pc - 1), 1, 65535, &port))
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': the port must be a number 1..65535", url);
        u->port = (int)port;
    }
    if (slash && slash[1]) {
        long db;
        if (parse_int(slash + 1, strlen(slash + 1), 0, 1000000, &db))
            return kp_errf(err, KP_EINVAL, "remote: '%.200s': after the host only /DB (a database number) is understood", url);
        u->db = (int)db;
    }
    return 0;
}

/* ---- connections --------------------------------------------------------------- */

static struct timeval tv_ms(int ms) {
    struct timeval tv = {.tv_sec = ms / 1000, .tv_usec = (ms % 1000) * 1000};
    return tv;
}

/* Note an outcome: ok, or a failure (down = no round trip possible). */
static void note(remote *r, int rc, bool down, const char *msg) {
    pthread_mutex_lock(&r->mu);
    if (rc == 0) {
        r->state = r->dropped_since_ok ? REMOTE_DEGRADED : REMOTE_UP;
        r->dropped_since_ok = false;
    } else {
        r->state = down ? REMOTE_DOWN : REMOTE_DEGRADED;
        snprintf(r->last_err, sizeof r->last_err, "%s", msg);
    }
    pthread_mutex_unlock(&r->mu);
}

static const char *where(const remote *r, char *buf, size_t n) {
    if (r->url.is_unix) snprintf(buf, n, "unix:%s", r->url.path);
    else snprintf(buf, n, "%s:%d", r->url.host, r->url.port);
    return buf;
}

/* A failed round trip on c: classify, count, note. Returns KP_EBUSY. */
static int conn_fail(remote *r, redisContext *c, int saved_errno, kp_err *err) {
    char w[300];
    bool timeout = c && c->err == REDIS_ERR_IO && (saved_errno == EAGAIN || saved_errno == EWOULDBLOCK ||
                                                   saved_errno == ETIMEDOUT || saved_errno == EINPROGRESS);
    if (c && c->err && strstr(c->errstr, "imed out")) timeout = true;
    kp_err e2 = {0};
    kp_errf(&e2, KP_EBUSY, "remote tier unavailable: Redis at %s: %s", where(r, w, sizeof w),
            timeout ? "no answer within the timeout" : c ? (c->err ? c->errstr : "connection failed") : "out of memory");
    pthread_mutex_lock(&r->mu);
    r->ev[REMOTE_EV_ERROR]++;
    if (timeout) r->ev[REMOTE_EV_TIMEOUT]++;
    pthread_mutex_unlock(&r->mu);
    note(r, KP_EBUSY, true, e2.msg);
    return kp_errf(err, KP_EBUSY, "%s", e2.msg);
}

/* A reply that is an error (OOM, NOSCRIPT, WRONGTYPE, ...). */
static int reply_fail(remote *r, const redisReply *rep, const char *what, kp_err *err) {
    kp_err e2 = {0};
    kp_errf(&e2, KP_EIO, "remote: Redis refused %s: %.300s", what, rep ? rep->str : "(no reply)");
    count(r, REMOTE_EV_ERROR);
    note(r, KP_EIO, false, e2.msg);
    return kp_errf(err, KP_EIO, "%s", e2.msg);
}

/* The reply of our scripts, {int, int}: 0, or the error (a Redis error,
 * or a reply of another shape) for WHAT. */
static int reply_int_pair(remote *r, const redisReply *rep, const char *what, kp_err *err) {
    if (rep->type == REDIS_REPLY_ERROR) return reply_fail(r, rep, what, err);
    if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 || rep->element[0]->type != REDIS_REPLY_INTEGER ||
        rep->element[1]->type != REDIS_REPLY_INTEGER) {
        char w[96];
        snprintf(w, sizeof w, "%s (unexpected reply)", what);
        return reply_fail(r, NULL, w, err);
    }
    return 0;
}

static redisReply *cmd(redisContext *c, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    redisReply *rep = redisvCommand(c, fmt, ap);
    va_end(ap);
    return rep;
}

static redisReply *cmdv(redisContext *c, int argc, const char **argv, const size_t *argl) {
    return redisCommandArgv(c, argc, argv, argl);
}

static int conn_setup(remote *r, redisContext *c, kp_err *err) {
    redisReply *rep = NULL;
    if (r->url.password[0]) {
        if (r->url.user[0]) rep = cmd(c, "AUTH %s %s", r->url.user, r->url.password);
        else rep = cmd(c, "AUTH %s", r->url.password);
        if (!rep) return conn_fail(r, c, errno, err);
        if (rep->type == REDIS_REPLY_ERROR) {
            char w[300];
            kp_errf(err, KP_EINVAL, "remote: Redis at %s refused the login of the URL: %.200s",
                    where(r, w, sizeof w), rep->str);
            note(r, KP_EINVAL, true, err ? err->msg : "login refused");
            count(r, REMOTE_EV_ERROR);
            freeReplyObject(rep);
            return KP_EBUSY;
        }
        freeReplyObject(rep);
    }
    if (r->url.db) {
        rep = cmd(c, "SELECT %d", r->url.db);
        if (!rep) return conn_fail(r, c, errno, err);
        if (rep->type == REDIS_REPLY_ERROR) {
            int rc = reply_fail(r, rep, "SELECT of the URL's database", err);
            freeReplyObject(rep);
            return rc == KP_EIO ? KP_EBUSY : rc;
        }
        freeReplyObject(rep);
    }
    return 0;
}

static int conn_get(remote *r, redisContext **out, kp_err *err) {
    *out = NULL;
    pthread_mutex_lock(&r->mu);
    if (r->n_pool) {
        *out = r->pool[--r->n_pool];
        pthread_mutex_unlock(&r->mu);
        return 0;
    }
    pthread_mutex_unlock(&r->mu);
    struct timeval ct = tv_ms(r->o.connect_timeout_ms);
    errno = 0;
    redisContext *c = r->url.is_unix ? redisConnectUnixWithTimeout(r->url.path, ct)
                                     : redisConnectWithTimeout(r->url.host, r->url.port, ct);
    int en = errno;
    if (!c || c->err) {
        int rc = conn_fail(r, c, en, err);
        if (c) redisFree(c);
        return rc;
    }
    if (redisSetTimeout(c, tv_ms(r->o.command_timeout_ms)) != REDIS_OK) {
        int rc = conn_fail(r, c, errno, err);
        redisFree(c);
        return rc;
    }
    int rc = conn_setup(r, c, err);
    if (rc) {
        redisFree(c);
        return rc;
    }
    *out = c;
    return 0;
}

static void conn_put(remote *r, redisContext *c) {
    if (!c) return;
    if (c->err) {
        redisFree(c);
        return;
    }
    pthread_mutex_lock(&r->mu);
    if (r->n_pool < POOL_MAX && !r->stop) {
        r->pool[r->n_pool++] = c;
        c = NULL;
    }
    pthread_mutex_unlock(&r->mu);
    if (c) redisFree(c);
}

/* ---- keys and envelopes ------------------------------------------------------------ */

static void obj_key(const remote *r, cas_key k, char out[REMOTE_PREFIX_MAX + 40]) {
    char hex[33];
    cas_key_hex(k, hex);
    snprintf(out, REMOTE_PREFIX_MAX + 40, "%so:%s", r->prefix, hex);
}

static void rec_key(const remote *r, const char *id, char out[REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8]) {
    snprintf(out, REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8, "%ss:%s", r->prefix, id);
}

/* ---- the budget (remote.h "The budget") ---------------------------------------------- */

static void book_key(const remote *r, const char *which, char out[REMOTE_PREFIX_MAX + 16]) {
    snprintf(out, REMOTE_PREFIX_MAX + 16, "%sb:%s", r->prefix, which);
}

/* One budget step: enters keys[i] at sizes[i] bytes (< 0: out of the
 * books), then evicts while over the budget. No-op without a budget. */
static int budget_step(remote *r, redisContext *c, char *const *keys, const long long *sizes, int n, kp_err *err) {
    if (!r->o.budget_bytes) return 0;
    char used[REMOTE_PREFIX_MAX + 16], lru[REMOTE_PREFIX_MAX + 16], size[REMOTE_PREFIX_MAX + 16], budget[24];
    book_key(r, "used", used);
    book_key(r, "lru", lru);
    book_key(r, "size", size);
    snprintf(budget, sizeof budget, "%llu", (unsigned long long)r->o.budget_bytes);
    int argc = 7 + 2 * n;
    const char **argv = calloc((size_t)argc, sizeof *argv);
    size_t *argl = calloc((size_t)argc, sizeof *argl);
    char (*num)[24] = calloc((size_t)(n ? n : 1), sizeof *num);
    if (!argv || !argl || !num) {
        free(argv);
        free(argl);
        free(num);
        return kp_errf(err, KP_ENOMEM, "remote: out of memory");
    }
    argv[0] = "EVAL", argv[1] = BUDGET_SCRIPT, argv[2] = "3", argv[3] = used, argv[4] = lru, argv[5] = size;
    argv[6] = budget;
    for (int i = 0; i < n; i++) {
        snprintf(num[i], sizeof num[i], "%lld", sizes[i]);
        argv[7 + 2 * i] = keys[i];
        argv[8 + 2 * i] = num[i];
    }
    for (int i = 0; i < argc; i++) argl[i] = i == 1 ? sizeof BUDGET_SCRIPT - 1 : strlen(argv[i]);
    redisReply *rep = cmdv(c, argc, argv, argl);
    int en = errno;
    free(argv);
    free(argl);
    free(num);
    if (!rep) return conn_fail(r, c, en, err);
    int rc = reply_int_pair(r, rep, "a budget step", err);
    if (!rc) {
        long long ev = rep->element[0]->integer;
        pthread_mutex_lock(&r->mu);
        r->ev[REMOTE_EV_EVICTED] += ev > 0 ? (uint64_t)ev : 0;
        r->used = rep->element[1]->integer > 0 ? (uint64_t)rep->element[1]->integer : 0;
        pthread_mutex_unlock(&r->mu);
        if (ev > 0)
            rlogf(r, "remote: the budget (%llu bytes) evicted %lld least recently used keys; %lld bytes in use",
                  (unsigned long long)r->o.budget_bytes, ev, rep->element[1]->integer);
    }
    freeReplyObject(rep);
    return rc;
}

/* A read moves KEY to the young end of the books. Best effort: a failure
 * here fails the read only if the connection broke. */
static int budget_touch(remote *r, redisContext *c, const char *key, kp_err *err) {
    if (!r->o.budget_bytes) return 0;
    char lru[REMOTE_PREFIX_MAX + 16];
    book_key(r, "lru", lru);
    redisReply *rep = cmd(c, "EVAL %s 2 %s %s", TOUCH_SCRIPT, lru, key);
    int en = errno;
    if (!rep) return conn_fail(r, c, en, err);
    if (rep->type == REDIS_REPLY_ERROR) rlogf(r, "remote: the budget's LRU touch failed: %s", rep->str);
    freeReplyObject(rep);
    return 0;
}

static uint8_t *obj_wrap(cas_key k, const void *data, size_t len, size_t *out_len) {
    uint8_t *b = malloc(ROB_HDR + len);
    if (!b) return NULL;
    memcpy(b, ROB_MAGIC, 8);
    kp_put_u64(b + 8, k.hi);
    kp_put_u64(b + 16, k.lo);
    kp_put_u64(b + 24, len);
    kp_put_u64(b + 32, XXH64(len ? data : b, len, 0));
    kp_put_u64(b + 40, XXH64(b, 40, 0));
    if (len) memcpy(b + ROB_HDR, data, len);
    *out_len = ROB_HDR + len;
    return b;
}

static int obj_check(cas_key k, const uint8_t *b, size_t n, const char *hex, kp_err *err) {
    if (n < ROB_HDR || memcmp(b, ROB_MAGIC, 8))
        return kp_errf(err, KP_EFORMAT, "remote: object %s: the value is not a kvpark object (%zu bytes, bad magic)", hex, n);
    if (XXH64(b, 40, 0) != kp_get_u64(b + 40))
        return kp_errf(err, KP_EFORMAT, "remote: object %s: header checksum mismatch", hex);
    if (kp_get_u64(b + 8) != k.hi || kp_get_u64(b + 16) != k.lo)
        return kp_errf(err, KP_EFORMAT, "remote: object %s: the value is another object's", hex);
    if (kp_get_u64(b + 24) != n - ROB_HDR)
        return kp_errf(err, KP_EFORMAT, "remote: object %s: %zu payload bytes, its header says %llu", hex,
                       n - ROB_HDR, (unsigned long long)kp_get_u64(b + 24));
    if (XXH64(n > ROB_HDR ? b + ROB_HDR : b, n - ROB_HDR, 0) != kp_get_u64(b + 32))
        return kp_errf(err, KP_EFORMAT, "remote: object %s: payload checksum mismatch", hex);
    return 0;
}

static uint8_t *rec_wrap(const char *id, const void *data, size_t len, size_t *out_len) {
    uint8_t *b = malloc(RRC_HDR + len);
    if (!b) return NULL;
    memcpy(b, RRC_MAGIC, 8);
    kp_put_u64(b + 8, len);
    kp_put_u64(b + 16, XXH64(len ? data : b, len, 0));
    kp_put_u64(b + 24, XXH64(id, strlen(id), 0));
    kp_put_u64(b + 32, XXH64(b, 32, 0));
    if (len) memcpy(b + RRC_HDR, data, len);
    *out_len = RRC_HDR + len;
    return b;
}

static int rec_check(const char *id, const uint8_t *b, size_t n, kp_err *err) {
    if (n < RRC_HDR || memcmp(b, RRC_MAGIC, 8))
        return kp_errf(err, KP_EFORMAT, "remote: session '%s': the value is not a kvpark record (%zu bytes, bad magic)", id, n);
    if (XXH64(b, 32, 0) != kp_get_u64(b + 32))
        return kp_errf(err, KP_EFORMAT, "remote: session '%s': record header checksum mismatch", id);
    if (kp_get_u64(b + 24) != XXH64(id, strlen(id), 0))
        return kp_errf(err, KP_EFORMAT, "remote: session '%s': the value is another session's record", id);
    if (kp_get_u64(b + 8) != n - RRC_HDR)
        return kp_errf(err, KP_EFORMAT, "remote: session '%s': %zu record bytes, its header says %llu", id,
                       n - RRC_HDR, (unsigned long long)kp_get_u64(b + 8));
    if (XXH64(n > RRC_HDR ? b + RRC_HDR : b, n - RRC_HDR, 0) != kp_get_u64(b + 16))
        return kp_errf(err, KP_EFORMAT, "remote: session '%s': record checksum mismatch", id);
    return 0;
}

static int check_id(const char *id, kp_err *err) {
    size_t n = id ? strlen(id) : 0;
    if (n < 1 || n > REMOTE_ID_MAX)
        return kp_errf(err, KP_EINVAL, "remote: invalid session id (1..%d characters)", REMOTE_ID_MAX);
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-'))
            return kp_errf(err, KP_EINVAL, "remote: invalid session id '%.80s' (A-Z a-z 0-9 _ -)", id);
    }
    return 0;
}

/* ---- objects --------------------------------------------------------------------- */

/* SET one object on c (with TTL). */
static int put_object_on(remote *r, redisContext *c, cas_key k, const void *data, size_t len, kp_err *err) {
    char key[REMOTE_PREFIX_MAX + 40], ttl[24];
    obj_key(r, k, key);
    size_t vl = 0;
    uint8_t *v = obj_wrap(k, data, len, &vl);
    if (!v) return kp_errf(err, KP_ENOMEM, "remote: out of memory (%zu byte object)", len);
    snprintf(ttl, sizeof ttl, "%u", r->o.ttl_s);
    const char *argv[5] = {"SET", key, (const char *)v, "EX", ttl};
    size_t argl[5] = {3, strlen(key), vl, 2, strlen(ttl)};
    redisReply *rep = cmdv(c, r->o.ttl_s ? 5 : 3, argv, argl);
    int en = errno;
    free(v);
    if (!rep) return conn_fail(r, c, en, err);
    int rc = 0;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_fail(r, rep, "an object write", err);
    else count(r, REMOTE_EV_PUT);
    freeReplyObject(rep);
    return rc;
}

int remote_put_object(remote *r, cas_key k, const void *data, size_t len, kp_err *err) {
    if (!r || (!data && len)) return kp_errf(err, KP_EINVAL, "remote: put: bad arguments");
    if (len > REMOTE_VALUE_MAX - ROB_HDR) return kp_errf(err, KP_ERANGE, "remote: object of %zu bytes is too large for Redis", len);
    redisContext *c;
    int rc = conn_get(r, &c, err);
    if (rc) return rc;
    rc = put_object_on(r, c, k, data, len, err);
    if (!rc) {
        char key[REMOTE_PREFIX_MAX + 40], *keys[1] = {key};
        long long sz[1] = {(long long)(len + ROB_HDR)};
        obj_key(r, k, key);
        rc = budget_step(r, c, keys, sz, 1, err);
    }
    conn_put(r, c);
    if (!rc) note(r, 0, false, NULL);
    return rc;
}

int remote_get_object(remote *r, cas_key k, void **data, size_t *len, kp_err *err) {
    *data = NULL;
    *len = 0;
    if (!r) return kp_errf(err, KP_EINVAL, "remote: get: no remote");
    char key[REMOTE_PREFIX_MAX + 40];
    obj_key(r, k, key);
    redisContext *c;
    int rc = conn_get(r, &c, err);
    if (rc) return rc;
    count(r, REMOTE_EV_GET);
    redisReply *rep = cmd(c, "GET %s", key);
    int en = errno;
    if (!rep) {
        rc = conn_fail(r, c, en, err);
        conn_put(r, c);
        return rc;
    }
    if (rep->type == REDIS_REPLY_STRING) budget_touch(r, c, key, NULL);
    conn_put(r, c);
    char hex[33];
    cas_key_hex(k, hex);
    if (rep->type == REDIS_REPLY_NIL) {
        count(r, REMOTE_EV_MISS);
        rc = kp_errf(err, KP_ENOTFOUND, "remote: object %s is not in Redis (evicted, expired or never written)", hex);
        note(r, 0, false, NULL);
    } else if (rep->type == REDIS_REPLY_ERROR) {
        rc = reply_fail(r, rep, "an object read", err);
    } else if (rep->type != REDIS_REPLY_STRING) {
        count(r, REMOTE_EV_ERROR);
        rc = kp_errf(err, KP_EFORMAT, "remote: object %s: the key holds a value of another type", hex);
    } else if ((rc = obj_check(k, (const uint8_t *)rep->str, rep->len, hex, err)) != 0) {
        count(r, REMOTE_EV_ERROR);
        rlogf(r, "%s", err ? err->msg : "remote: a bad object");
    } else {
        size_t n = rep->len - ROB_HDR;
        void *b = malloc(n ? n : 1);
        if (!b) {
            rc = kp_errf(err, KP_ENOMEM, "remote: out of memory (%zu byte object)", n);
        } else {
            if (n) memcpy(b, rep->str + ROB_HDR, n);
            *data = b;
            *len = n;
            count(r, REMOTE_EV_HIT);
            note(r, 0, false, NULL);
        }
    }
    freeReplyObject(rep);
    return rc;
}

int remote_has_object(remote *r, cas_key k, kp_err *err) {
    if (!r) return kp_errf(err, KP_EINVAL, "remote: has: no remote");
    char key[REMOTE_PREFIX_MAX + 40];
    obj_key(r, k, key);
    redisContext *c;
    int rc = conn_get(r, &c, err);
    if (rc) return rc;
    redisReply *rep = cmd(c, "EXISTS %s", key);
    int en = errno;
    if (!rep) rc = conn_fail(r, c, en, err);
    conn_put(r, c);
    if (!rep) return rc;
    if (rep->type == REDIS_REPLY_INTEGER) {
        rc = rep->integer > 0;
        note(r, 0, false, NULL);
    } else {
        rc = reply_fail(r, rep, "EXISTS", err);
    }
    freeReplyObject(rep);
    return rc;
}

/* ---- records ----------------------------------------------------------------------- */

/* The owner secret back into Redis after a record write (remote_keep_secret):
 * NX, never over another replica's. */
static int reassert_secret(remote *r, redisContext *c, kp_err *err) {
    uint8_t sec[sizeof r->secret];
    pthread_mutex_lock(&r->mu);
    size_t n = r->secret_len;
    memcpy(sec, r->secret, n);
    pthread_mutex_unlock(&r->mu);
    if (!n) return 0;
    redisReply *rep = cmd(c, "SET %s %b NX", REMOTE_SECRET_KEY, sec, n);
    int en = errno;
    sodium_memzero(sec, sizeof sec);
    if (!rep) return conn_fail(r, c, en, err);
    int rc = rep->type == REDIS_REPLY_ERROR ? reply_fail(r, rep, "the owner-secret write", err) : 0;
    freeReplyObject(rep);
    return rc;
}

static int put_record_on(remote *r, redisContext *c, const char *id, const void *rec, size_t len,
                         long long expect, long long *version, kp_err *err) {
    char key[REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8], ttl[24], want[24];
    rec_key(r, id, key);
    size_t vl = 0;
    uint8_t *v = rec_wrap(id, rec, len, &vl);
    if (!v) return kp_errf(err, KP_ENOMEM, "remote: out of memory (%zu byte record)", len);
    snprintf(ttl, sizeof ttl, "%u", r->o.ttl_s);
    snprintf(want, sizeof want, "%lld", expect < 0 ? -1ll : expect);
    uint8_t sec[sizeof r->secret];
    pthread_mutex_lock(&r->mu);
    size_t sn = r->secret_len;
    memcpy(sec, r->secret, sn);
    pthread_mutex_unlock(&r->mu);
    const char *argv[8] = {"EVAL", REC_SCRIPT, "1", key, (const char *)v, ttl, want, (const char *)sec};
    size_t argl[8] = {4, sizeof REC_SCRIPT - 1, 1, strlen(key), vl, strlen(ttl), strlen(want), sn};
    redisReply *rep = cmdv(c, 8, argv, argl);
    int en = errno;
    sodium_memzero(sec, sizeof sec);
    free(v);
    if (!rep) return conn_fail(r, c, en, err);
    int rc = reply_int_pair(r, rep, "a session record write", err);
    if (!rc) {
        if (version) *version = rep->element[1]->integer;
        if (rep->element[0]->integer == 1) {
            count(r, REMOTE_EV_PUT);
            rc = reassert_secret(r, c, err);
        } else {
            rc = kp_errf(err, KP_EBUSY, "remote: session '%s' changed meanwhile (version %lld, expected %lld)", id,
                         rep->element[1]->integer, expect);
        }
    }
    freeReplyObject(rep);
    return rc;
}

int remote_put_record(remote *r, const char *id, const void *rec, size_t len, long long expect,
                      long long *version, kp_err *err) {
    int rc = check_id(id, err);
    if (rc) return rc;
    if (!r || (!rec && len)) return kp_errf(err, KP_EINVAL, "remote: put record: bad arguments");
    redisContext *c;
    if ((rc = conn_get(r, &c, err))) return rc;
    rc = put_record_on(r, c, id, rec, len, expect, version, err);
    if (!rc) {
        char key[REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8], *keys[1] = {key};
        long long sz[1] = {(long long)(len + RRC_HDR)};
        rec_key(r, id, key);
        rc = budget_step(r, c, keys, sz, 1, err);
    }
    conn_put(r, c);
    if (!rc || rc == KP_EBUSY) note(r, 0, false, NULL);
    return rc;
}

int remote_get_record(remote *r, const char *id, void **rec, size_t *len, long long *version, kp_err *err) {
    *rec = NULL;
    *len = 0;
    if (version) *version = 0;
    int rc = check_id(id, err);
    if (rc) return rc;
    char key[REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8];
    rec_key(r, id, key);
    redisContext *c;
    if ((rc = conn_get(r, &c, err))) return rc;
    count(r, REMOTE_EV_GET);
    redisReply *rep = cmd(c, "HMGET %s v d", key);
    int en = errno;
    if (!rep) rc = conn_fail(r, c, en, err);
    else if (rep->type == REDIS_REPLY_ARRAY && rep->elements == 2 && rep->element[1]->type == REDIS_REPLY_STRING)
        budget_touch(r, c, key, NULL);
    conn_put(r, c);
    if (!rep) return rc;
    if (rep->type == REDIS_REPLY_ERROR) {
        rc = reply_fail(r, rep, "a session record read", err);
    } else if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2) {
        count(r, REMOTE_EV_ERROR);
        rc = kp_errf(err, KP_EFORMAT, "remote: session '%s': unexpected reply to HMGET", id);
    } else if (rep->element[1]->type == REDIS_REPLY_NIL) {
        count(r, REMOTE_EV_MISS);
        rc = kp_errf(err, KP_ENOTFOUND, "remote: no session '%s' in Redis", id);
        note(r, 0, false, NULL);
    } else if (rep->element[1]->type != REDIS_REPLY_STRING || rep->element[0]->type != REDIS_REPLY_STRING) {
        count(r, REMOTE_EV_ERROR);
        rc = kp_errf(err, KP_EFORMAT, "remote: session '%s': its record key holds something else", id);
    } else if ((rc = rec_check(id, (const uint8_t *)rep->element[1]->str, rep->element[1]->len, err)) != 0) {
        count(r, REMOTE_EV_ERROR);
        rlogf(r, "%s", err ? err->msg : "remote: a bad record");
    } else {
        size_t n = rep->element[1]->len - RRC_HDR;
        void *b = malloc(n ? n : 1);
        if (!b) {
            rc = kp_errf(err, KP_ENOMEM, "remote: out of memory (%zu byte record)", n);
        } else {
            if (n) memcpy(b, rep->element[1]->str + RRC_HDR, n);
            *rec = b;
            *len = n;
            if (version) *version = strtoll(rep->element[0]->str, NULL, 10);
            count(r, REMOTE_EV_HIT);
            note(r, 0, false, NULL);
        }
    }
    freeReplyObject(rep);
    return rc;
}

static int del_record_on(remote *r, redisContext *c, const char *id, kp_err *err) {
    char key[REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8];
    rec_key(r, id, key);
    redisReply *rep = cmd(c, "DEL %s", key);
    int en = errno;
    if (!rep) return conn_fail(r, c, en, err);
    int rc = rep->type == REDIS_REPLY_ERROR ? reply_fail(r, rep, "a session delete", err) : 0;
    freeReplyObject(rep);
    if (!rc) {
        char *keys[1] = {key};
        long long sz[1] = {-1};
        rc = budget_step(r, c, keys, sz, 1, err);
    }
    return rc;
}

int remote_del_record(remote *r, const char *id, kp_err *err) {
    int rc = check_id(id, err);
    if (rc) return rc;
    redisContext *c;
    if ((rc = conn_get(r, &c, err))) return rc;
    rc = del_record_on(r, c, id, err);
    conn_put(r, c);
    if (!rc) note(r, 0, false, NULL);
    return rc;
}

/* ---- the deployment's shared secret -------------------------------------------------- */

/* A copy of the owner secret (n bytes) in field k of any session record
 * under any prefix: SCAN, at most ~10,000 keys looked at. */
static int find_secret_copy(remote *r, redisContext *c, size_t n, uint8_t *out, bool *found, kp_err *err) {
    *found = false;
    char cursor[32] = "0";
    int looked = 0;
    do {
        redisReply *rep = cmd(c, "SCAN %s MATCH kvpark:*:s:* COUNT 1000", cursor);
        int en = errno;
        if (!rep) return conn_fail(r, c, en, err);
        if (rep->type != REDIS_REPLY_ARRAY || rep->elements != 2 || rep->element[0]->type != REDIS_REPLY_STRING ||
            rep->element[1]->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(rep);
            return 0; /* not a Redis we understand here: draw a new one */
        }
        snprintf(cursor, sizeof cursor, "%s", rep->element[0]->str);
        const redisReply *keys = rep->element[1];
        for (size_t i = 0; i < keys->elements && !*found; i++, looked++) {
            if (keys->element[i]->type != REDIS_REPLY_STRING) continue;
            redisReply *k = cmd(c, "HGET %b k", keys->element[i]->str, (size_t)keys->element[i]->len);
            en = errno;
            if (!k) {
                freeReplyObject(rep);
                return conn_fail(r, c, en, err);
            }
            if (k->type == REDIS_REPLY_STRING && (size_t)k->len == n) {
                memcpy(out, k->str, n);
                *found = true;
            }
            freeReplyObject(k);
        }
        freeReplyObject(rep);
    } while (!*found && strcmp(cursor, "0") && looked < 10000);
    return 0;
}

int remote_share_secret(remote *r, const uint8_t *mine, size_t n, uint8_t *out, kp_err *err) {
    if (!r || !mine || !out || n == 0 || n > 256) return kp_errf(err, KP_EINVAL, "remote: share secret: bad arguments");
    redisContext *c;
    int rc = conn_get(r, &c, err);
    if (rc) return rc;
    /* The first replica's secret stands; every later one reads it. Read
     * first: a write may make Redis evict (maxmemory with allkeys-lru), and
     * the key to go could be this very one just before our SET NX. */
    redisReply *rep = cmd(c, "EXISTS %s", REMOTE_SECRET_KEY);
    int en = errno;
    if (!rep) {
        rc = conn_fail(r, c, en, err);
        conn_put(r, c);
        return rc;
    }
    bool there = rep->type == REDIS_REPLY_INTEGER && rep->integer == 1;
    if (rep->type == REDIS_REPLY_ERROR) rc = reply_fail(r, rep, "the owner-secret read", err);
    freeReplyObject(rep);
    uint8_t found[256];
    bool have_copy = false;
    if (!rc && !there) { /* gone (evicted)? records carry copies: the deployment's survives in them */
        rc = find_secret_copy(r, c, n, found, &have_copy, err);
        if (rc) {
            conn_put(r, c);
            return rc;
        }
        if (have_copy) rlogf(r, "remote: the owner secret was missing in Redis (evicted?); restored from a session record");
    }
    if (!rc && !there) {
        rep = cmd(c, "SET %s %b NX", REMOTE_SECRET_KEY, have_copy ? found : mine, n);
        sodium_memzero(found, sizeof found);
        en = errno;
        if (!rep) {
            rc = conn_fail(r, c, en, err);
            conn_put(r, c);
            return rc;
        }
        if (rep->type == REDIS_REPLY_ERROR) rc = reply_fail(r, rep, "the owner-secret write", err);
        freeReplyObject(rep);
    }
    if (!rc) {
        rep = cmd(c, "GET %s", REMOTE_SECRET_KEY);
        en = errno;
        if (!rep) {
            rc = conn_fail(r, c, en, err);
        } else {
            if (rep->type == REDIS_REPLY_ERROR) rc = reply_fail(r, rep, "the owner-secret read", err);
            else if (rep->type != REDIS_REPLY_STRING || rep->len != n)
                rc = kp_errf(err, KP_EFORMAT, "remote: the key '%s' in Redis does not hold a %zu-byte secret "
                             "(delete it to let the next replica draw one: every stored session's owner is "
                             "keyed with it)", REMOTE_SECRET_KEY, n);
            else memcpy(out, rep->str, n);
            freeReplyObject(rep);
        }
    }
    conn_put(r, c);
    if (!rc) remote_keep_secret(r, out, n);
    if (!rc) note(r, 0, false, NULL);
    return rc;
}

void remote_keep_secret(remote *r, const uint8_t *secret, size_t n) {
    if (!r || !secret || n > sizeof r->secret) return;
    pthread_mutex_lock(&r->mu);
    memcpy(r->secret, secret, n);
    r->secret_len = n;
    pthread_mutex_unlock(&r->mu);
}

/* ---- the write queue ------------------------------------------------------------------ */

static void job_free(rjob *j) {
    if (!j) return;
    for (int i = 0; i < j->n_objs; i++) free((void *)j->objs[i].data);
    free(j->objs);
    free(j->rec);
    free(j);
}

/* Objects Redis lacks are SET (pipelined EXISTS first), present ones get
 * their TTL refreshed; then the record. On c, by the writer. */
/* ---- objects known to be in Redis (r->mu held) ------------------------------------------- */

#define KNOWN_MAX (1u << 20) /* 16 MiB of keys at most; then the set starts over */

static bool key_empty(cas_key k) { return !k.hi && !k.lo; }
static size_t known_slot(const remote *r, cas_key k) { return (size_t)(k.hi ^ (k.lo * 0x9e3779b97f4a7c15ull)) & (r->known_cap - 1); }

static bool known_has(const remote *r, cas_key k) {
    if (!r->known || key_empty(k)) return false;
    for (size_t i = known_slot(r, k);; i = (i + 1) & (r->known_cap - 1)) {
        if (key_empty(r->known[i])) return false;
        if (r->known[i].hi == k.hi && r->known[i].lo == k.lo) return true;
    }
}

static void known_add(remote *r, cas_key k) {
    if (key_empty(k) || known_has(r, k)) return;
    if (!r->known || (r->n_known + 1) * 2 > r->known_cap) { /* grow (or start over at the cap) */
        size_t cap = r->known ? r->known_cap * 2 : 1024;
        if (cap > KNOWN_MAX) cap = KNOWN_MAX;
        cas_key *old = r->known;
        size_t old_cap = r->known_cap;
        cas_key *nk = calloc(cap, sizeof *nk);
        if (!nk) return; /* advisory: not knowing only costs a copy */
        r->known = nk;
        r->known_cap = cap;
        r->n_known = 0;
        if (old && cap > old_cap)
            for (size_t i = 0; i < old_cap; i++)
                if (!key_empty(old[i])) known_add(r, old[i]);
        free(old);
    }
    size_t i = known_slot(r, k);
    while (!key_empty(r->known[i])) i = (i + 1) & (r->known_cap - 1);
    r->known[i] = k;
    r->n_known++;
}

/* Removal in a linear-probing table: re-insert the rest of the cluster. */
static void known_forget(remote *r, cas_key k) {
    if (!known_has(r, k)) return;
    size_t i = known_slot(r, k);
    while (r->known[i].hi != k.hi || r->known[i].lo != k.lo) i = (i + 1) & (r->known_cap - 1);
    r->known[i] = (cas_key){0, 0};
    r->n_known--;
    for (size_t j = (i + 1) & (r->known_cap - 1); !key_empty(r->known[j]); j = (j + 1) & (r->known_cap - 1)) {
        cas_key m = r->known[j];
        r->known[j] = (cas_key){0, 0};
        r->n_known--;
        known_add(r, m);
    }
}

int remote_known(remote *r, cas_key k) {
    if (!r) return 0;
    pthread_mutex_lock(&r->mu);
    bool h = known_has(r, k);
    pthread_mutex_unlock(&r->mu);
    return h;
}

static int run_save(remote *r, redisContext *c, rjob *j, kp_err *err) {
    char key[REMOTE_PREFIX_MAX + 40];
    for (int i = 0; i < j->n_objs; i++) {
        obj_key(r, j->objs[i].key, key);
        if (redisAppendCommand(c, "EXISTS %s", key) != REDIS_OK) return conn_fail(r, c, errno, err);
    }
    bool *have = calloc((size_t)(j->n_objs ? j->n_objs : 1), sizeof *have);
    if (!have) return kp_errf(err, KP_ENOMEM, "remote: out of memory");
    int rc = 0;
    for (int i = 0; i < j->n_objs; i++) {
        redisReply *rep = NULL;
        if (redisGetReply(c, (void **)&rep) != REDIS_OK || !rep) {
            free(have);
            return conn_fail(r, c, errno, err);
        }
        if (rep->type == REDIS_REPLY_INTEGER) have[i] = rep->integer > 0;
        else if (!rc) rc = reply_fail(r, rep, "EXISTS", err);
        freeReplyObject(rep);
    }
    int gone = 0;
    for (int i = 0; i < j->n_objs && !rc; i++) {
        if (!have[i] && !j->objs[i].data) { /* sent by key (remote_known) but gone since: evicted */
            pthread_mutex_lock(&r->mu);
            known_forget(r, j->objs[i].key);
            pthread_mutex_unlock(&r->mu);
            gone++;
        } else if (!have[i]) {
            rc = put_object_on(r, c, j->objs[i].key, j->objs[i].data, j->objs[i].len, err);
        } else if (r->o.ttl_s) {
            obj_key(r, j->objs[i].key, key);
            redisReply *rep = cmd(c, "EXPIRE %s %u", key, r->o.ttl_s);
            if (!rep) rc = conn_fail(r, c, errno, err);
            else freeReplyObject(rep);
        }
    }
    free(have);
    if (rc) return rc;
    if (gone)
        rlogf(r, "remote: session '%s': %d of its objects left Redis since this replica wrote them (evicted or "
              "expired); its record goes up without them (a replica reading it recomputes that KV), and its next "
              "save sends them again", j->id, gone);
    if ((rc = put_record_on(r, c, j->id, j->rec, j->rec_len, REMOTE_ANY, NULL, err))) return rc;
    pthread_mutex_lock(&r->mu);
    for (int i = 0; i < j->n_objs; i++)
        if (j->objs[i].data || known_has(r, j->objs[i].key)) known_add(r, j->objs[i].key);
    pthread_mutex_unlock(&r->mu);
    if (!r->o.budget_bytes) return 0;
    /* the budget: every object of the session (new or already there) and its record, in one step */
    char **keys = calloc((size_t)j->n_objs + 1, sizeof *keys);
    long long *sz = calloc((size_t)j->n_objs + 1, sizeof *sz);
    char *kb = calloc((size_t)j->n_objs + 1, REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8);
    if (!keys || !sz || !kb) {
        rc = kp_errf(err, KP_ENOMEM, "remote: out of memory");
    } else {
        for (int i = 0; i <= j->n_objs; i++) keys[i] = kb + (size_t)i * (REMOTE_PREFIX_MAX + REMOTE_ID_MAX + 8);
        for (int i = 0; i < j->n_objs; i++) {
            obj_key(r, j->objs[i].key, keys[i]);
            sz[i] = (long long)(j->objs[i].len + ROB_HDR);
        }
        rec_key(r, j->id, keys[j->n_objs]);
        sz[j->n_objs] = (long long)(j->rec_len + RRC_HDR);
        rc = budget_step(r, c, keys, sz, j->n_objs + 1, err);
    }
    free(keys);
    free(sz);
    free(kb);
    return rc;
}

static void *writer(void *arg) {
    remote *r = arg;
    int backoff = 0;
    pthread_mutex_lock(&r->mu);
    for (;;) {
        while (!r->stop && !r->head) pthread_cond_wait(&r->cv, &r->mu);
        if (r->stop) break;
        rjob *j = r->head;
        r->inflight = true;
        pthread_mutex_unlock(&r->mu);

        kp_err e2 = {0};
        redisContext *c = NULL;
        int rc = conn_get(r, &c, &e2);
        if (!rc) rc = j->del ? del_record_on(r, c, j->id, &e2) : run_save(r, c, j, &e2);
        conn_put(r, c);
        if (!rc) note(r, 0, false, NULL);

        pthread_mutex_lock(&r->mu);
        r->inflight = false;
        if (rc == 0 || rc == KP_ENOMEM || rc == KP_EINVAL) {
            if (rc) {
                r->ev[REMOTE_EV_DROPPED]++;
                r->dropped_since_ok = true;
            }
            r->head = j->next;
            if (!r->head) r->tail = NULL;
            r->q_jobs--;
            r->q_bytes -= j->bytes;
            if (!r->head) pthread_cond_broadcast(&r->cv_idle);
            pthread_mutex_unlock(&r->mu);
            if (rc) rlogf(r, "remote: gave up writing session '%s' to Redis: %s", j->id, e2.msg);
            job_free(j);
            backoff = 0;
            pthread_mutex_lock(&r->mu);
            continue;
        }
        /* retry later, with backoff */
        r->ev[REMOTE_EV_RETRY]++;
        backoff = backoff ? backoff * 2 : r->o.retry_min_ms;
        if (backoff > r->o.retry_max_ms) backoff = r->o.retry_max_ms;
        bool first = backoff == r->o.retry_min_ms;
        pthread_mutex_unlock(&r->mu);
        if (first) rlogf(r, "remote: write of session '%s' failed, retrying with backoff: %s", j->id, e2.msg);
        pthread_mutex_lock(&r->mu);
        struct timespec ts;
        clock_gettime(CLOCK_REALTIME, &ts);
        long long ns = ts.tv_nsec + (long long)backoff * 1000000ll;
        ts.tv_sec += ns / 1000000000ll;
        ts.tv_nsec = ns % 1000000000ll;
        while (!r->stop && pthread_cond_timedwait(&r->cv, &r->mu, &ts) != ETIMEDOUT) {
        }
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static int enqueue(remote *r, rjob *j) {
    pthread_mutex_lock(&r->mu);
    /* a waiting (not in flight) job of the same id is replaced */
    rjob **pp = &r->head;
    if (r->inflight && *pp) pp = &(*pp)->next;
    for (; *pp; pp = &(*pp)->next) {
        rjob *o = *pp;
        if (strcmp(o->id, j->id)) continue;
        j->next = o->next;
        *pp = j;
        if (r->tail == o) r->tail = j;
        r->q_bytes = r->q_bytes - o->bytes + j->bytes;
        pthread_cond_broadcast(&r->cv);
        pthread_mutex_unlock(&r->mu);
        job_free(o);
        return 0;
    }
    if (r->q_jobs >= r->o.queue_max_jobs || r->q_bytes + j->bytes > r->o.queue_max_bytes || r->stop) {
        r->ev[REMOTE_EV_DROPPED]++;
        r->dropped_since_ok = true;
        if (r->state == REMOTE_UP) r->state = REMOTE_DEGRADED;
        size_t qj = r->q_jobs;
        uint64_t qb = r->q_bytes;
        pthread_mutex_unlock(&r->mu);
        rlogf(r, "remote: write queue full (%zu jobs, %llu bytes): session '%s' is not written to Redis "
              "(its local copy stays)", qj, (unsigned long long)qb, j->id);
        job_free(j);
        return KP_EBUSY;
    }
    j->next = NULL;
    if (r->tail) r->tail->next = j;
    else r->head = j;
    r->tail = j;
    r->q_jobs++;
    r->q_bytes += j->bytes;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    return 0;
}

int remote_enqueue_save(remote *r, const char *id, const remote_obj *objs, int n_objs, const void *rec,
                        size_t rec_len) {
    if (!r || check_id(id, NULL) || n_objs < 0 || (n_objs && !objs) || (!rec && rec_len)) return KP_EINVAL;
    rjob *j = calloc(1, sizeof *j);
    if (!j) return KP_ENOMEM;
    snprintf(j->id, sizeof j->id, "%s", id);
    j->objs = calloc((size_t)(n_objs ? n_objs : 1), sizeof *j->objs);
    j->rec = malloc(rec_len ? rec_len : 1);
    if (!j->objs || !j->rec) goto oom;
    if (rec_len) memcpy(j->rec, rec, rec_len);
    j->rec_len = rec_len;
    j->bytes = rec_len;
    for (int i = 0; i < n_objs; i++) {
        void *d = NULL;
        if (objs[i].data) { /* NULL: by key only (remote_known) */
            if (!(d = malloc(objs[i].len ? objs[i].len : 1))) goto oom;
            if (objs[i].len) memcpy(d, objs[i].data, objs[i].len);
            j->bytes += objs[i].len;
        }
        j->objs[i] = (remote_obj){.key = objs[i].key, .data = d, .len = objs[i].len};
        j->n_objs = i + 1;
    }
    return enqueue(r, j);
oom:
    job_free(j);
    return KP_ENOMEM;
}

int remote_enqueue_delete(remote *r, const char *id) {
    if (!r || check_id(id, NULL)) return KP_EINVAL;
    rjob *j = calloc(1, sizeof *j);
    if (!j) return KP_ENOMEM;
    snprintf(j->id, sizeof j->id, "%s", id);
    j->del = true;
    return enqueue(r, j);
}

int remote_drain(remote *r, int timeout_ms) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ns = ts.tv_nsec + (long long)timeout_ms * 1000000ll;
    ts.tv_sec += ns / 1000000000ll;
    ts.tv_nsec = ns % 1000000000ll;
    pthread_mutex_lock(&r->mu);
    int rc = 0;
    while (r->head && rc == 0)
        if (pthread_cond_timedwait(&r->cv_idle, &r->mu, &ts) == ETIMEDOUT) rc = KP_EBUSY;
    if (!r->head) rc = 0;
    pthread_mutex_unlock(&r->mu);
    return rc;
}

/* ---- open / close / stats --------------------------------------------------------------- */

int remote_open(remote **out, const remote_opts *o, kp_err *err) {
    *out = NULL;
    if (!o) return kp_errf(err, KP_EINVAL, "remote: no options");
    remote *r = calloc(1, sizeof *r);
    if (!r) return kp_errf(err, KP_ENOMEM, "remote: out of memory");
    int rc = remote_url_parse(o->url, &r->url, err);
    if (rc) {
        free(r);
        return rc;
    }
    r->o = *o;
    r->o.url = NULL;
    remote_opts d = remote_default_opts();
    if (r->o.connect_timeout_ms <= 0) r->o.connect_timeout_ms = d.connect_timeout_ms;
    if (r->o.command_timeout_ms <= 0) r->o.command_timeout_ms = d.command_timeout_ms;
    if (!r->o.queue_max_jobs) r->o.queue_max_jobs = d.queue_max_jobs;
    if (!r->o.queue_max_bytes) r->o.queue_max_bytes = d.queue_max_bytes;
    if (r->o.retry_min_ms <= 0) r->o.retry_min_ms = d.retry_min_ms;
    if (r->o.retry_max_ms < r->o.retry_min_ms) r->o.retry_max_ms = r->o.retry_min_ms > d.retry_max_ms ? r->o.retry_min_ms : d.retry_max_ms;
    snprintf(r->prefix, sizeof r->prefix, "kvpark:%016llx:%016llx:", (unsigned long long)o->model_hash,
             (unsigned long long)o->codec_hash);
    snprintf(r->last_err, sizeof r->last_err, "not connected yet");
    pthread_mutex_init(&r->mu, NULL);
    pthread_cond_init(&r->cv, NULL);
    pthread_cond_init(&r->cv_idle, NULL);
    if (pthread_create(&r->th, NULL, writer, r)) {
        pthread_cond_destroy(&r->cv);
        pthread_cond_destroy(&r->cv_idle);
        pthread_mutex_destroy(&r->mu);
        free(r);
        return kp_errf(err, KP_ENOMEM, "remote: cannot start the writer thread");
    }
    r->thread_started = true;
    *out = r;
    return 0;
}

void remote_close(remote *r) {
    if (!r) return;
    pthread_mutex_lock(&r->mu);
    r->stop = true;
    pthread_cond_broadcast(&r->cv);
    pthread_mutex_unlock(&r->mu);
    if (r->thread_started) pthread_join(r->th, NULL);
    size_t left = 0;
    for (rjob *j = r->head, *n; j; j = n) {
        n = j->next;
        job_free(j);
        left++;
    }
    if (left) rlogf(r, "remote: closing with %zu writes still queued: they are not in Redis (their local copies stay)", left);
    for (int i = 0; i < r->n_pool; i++) redisFree(r->pool[i]);
    pthread_cond_destroy(&r->cv);
    pthread_cond_destroy(&r->cv_idle);
    pthread_mutex_destroy(&r->mu);
    sodium_memzero(r->secret, sizeof r->secret);
    free(r->known);
    free(r);
}

const char *remote_prefix(const remote *r) { return r->prefix; }

void remote_get_stats(remote *r, remote_stats *st) {
    memset(st, 0, sizeof *st);
    pthread_mutex_lock(&r->mu);
    memcpy(st->events, r->ev, sizeof st->events);
    st->queue_jobs = r->q_jobs;
    st->queue_bytes = r->q_bytes;
    st->state = r->state;
    st->budget_bytes = r->o.budget_bytes;
    st->used_bytes = r->used;
    if (r->state == REMOTE_UP && r->q_jobs * 2 > r->o.queue_max_jobs) st->state = REMOTE_DEGRADED;
    snprintf(st->last_error, sizeof st->last_error, "%s", r->last_err);
    pthread_mutex_unlock(&r->mu);
}

remote_state_t remote_state(remote *r) {
    remote_stats st;
    remote_get_stats(r, &st);
    return st.state;
}
