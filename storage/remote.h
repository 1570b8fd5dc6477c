/*
 * remote.h — the shared remote tier: a Redis client (hiredis) that holds
 * span objects and session records for every replica of a deployment, so a
 * conversation parked on one replica can be resumed on another.
 *
 * Keys (all under a prefix per model + codec, so several models share one
 * Redis, and one model's replicas share everything):
 *   PREFIX = "kvpark:<model-hash>:<codec-hash>:"   (16 hex digits each)
 *   PREFIX "o:" KEYHEX   a span object: the local chunk store's key
 *                        (cas.h, 32 hex digits), value = envelope + payload
 *   PREFIX "s:" ID       a session record: a Redis hash {v: version,
 *                        d: envelope + the store's record bytes, k: a copy
 *                        of the owner secret (remote_share_secret)}
 *   PREFIX "b:used", "b:lru", "b:size"   the budget's books (only with one)
 * Envelopes (little-endian) make every value self-checking:
 *   object: "KVPKROB1", key.hi u64, key.lo u64, payload length u64,
 *           XXH64(payload), XXH64(bytes [0, 40)), payload
 *   record: "KVPKRRC1", payload length u64, XXH64(payload), XXH64(id),
 *           XXH64(bytes [0, 32)), payload
 *
 * Contract
 *   - remote_url_parse(): "redis://[user:password@]host[:port][/db]"
 *     (port 6379 and db 0 by default; user and password may be
 *     %-encoded) or "unix:/abs/path[?db=N]"; anything else is KP_EINVAL
 *     with a message naming what is wrong.
 *   - remote_open() checks the URL and starts the writer thread; it does not
 *     need Redis to be up (the tier starts "down" and connects on first use).
 *   - No call waits for Redis longer than the connect timeout plus the
 *     command timeout per round trip (remote_opts): a dead or stopped Redis
 *     fails a call with KP_EBUSY ("remote tier unavailable", the server's
 *     503 + Retry-After), counted as error / timeout.
 *   - Reads verify every value (magic, header checksum, key or id, length,
 *     payload XXH64): a value evicted (maxmemory allkeys-lru) or expired is
 *     KP_ENOTFOUND (a miss), a value that fails a check is KP_EFORMAT; never
 *     bytes that were not written under that key.
 *   - remote_put_record() writes a record atomically with a version (a Lua
 *     script: read version, compare, HSET v + d, EXPIRE: one atomic step on
 *     the server): with expect = REMOTE_ANY the write always applies (the
 *     last acknowledged write wins); with expect = V it applies only if the
 *     current version is V (compare-and-set), else KP_EBUSY and *version =
 *     the current one. A reader gets one whole record, never a mix.
 *   - remote_enqueue_save(): copies the objects (those given by data; the
 *     others go by key: remote_known) and the record into a
 *     bounded queue and returns at once (never blocks on Redis); the writer
 *     thread writes the objects first (only those Redis lacks; existing ones
 *     get their TTL refreshed), then the record, retrying with exponential
 *     backoff while Redis is down. A newer save of the same id replaces an
 *     older one still waiting. A full queue refuses the job (KP_EBUSY,
 *     counted as dropped, logged): the local copy stays the durable one.
 *   - remote_state(): "up" (last round trip worked, queue not dropping),
 *     "degraded" (reachable but a write failed with a server error, e.g. OOM,
 *     or jobs were dropped since the last success), "down" (last round trip
 *     failed: connect, I/O, timeout), with the last error message.
 *   - Thread-safe: a small pool of connections under one mutex.
 *
 * The budget (remote_opts.budget_bytes, --remote-budget): the bytes of our
 * values under the prefix, shared by every replica (give them all the same
 * value: each step applies the caller's). Redis keeps the books itself, so
 * they are one for all replicas and every step is one atomic Lua script:
 * "b:size" (hash: key -> bytes), "b:lru" (sorted set: key -> last use, the
 * server's clock), "b:used" (their sum). A write (objects, then the record)
 * enters its keys at their sizes; a read (remote_get_object/_record) moves
 * a key to the young end; then, while used > budget, the least recently
 * used keys go (DEL), counted as "evicted" -- never one the step just
 * entered. An object that goes makes the sessions using it recompute their
 * KV from the token ids (store.h "KV lost"); a record that goes makes that
 * session unknown to replicas that do not hold it; objects of deleted
 * sessions age out. A key Redis itself evicted or expired leaves the books
 * when a step meets it (or at its turn in the LRU). The owner secret is
 * outside the prefix and never budgeted.
 */
#ifndef KP_REMOTE_H
#define KP_REMOTE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "storage/cas.h"

#define REMOTE_ANY (-1ll)          /* remote_put_record: no version check */
#define REMOTE_ID_MAX 64
#define REMOTE_PREFIX_MAX 96
#define REMOTE_DEFAULT_PORT 6379

typedef struct remote remote;

typedef struct remote_url {
    bool is_unix;
    char host[256];      /* TCP host */
    int port;
    char path[108];      /* unix socket path */
    char user[128];      /* ACL user ("" = none; AUTH password only) */
    char password[256];  /* "" = no AUTH */
    int db;
} remote_url;

typedef struct remote_opts {
    const char *url;
    uint64_t model_hash;       /* the prefix: which model ... */
    uint64_t codec_hash;       /* ... and which codec/layout/KV type */
    int connect_timeout_ms;    /* default 1000 */
    int command_timeout_ms;    /* default 2000 */
    uint32_t ttl_s;            /* expiry of every key written (0: none) */
    uint64_t budget_bytes;     /* bytes under the prefix at most (0: none; see "The budget") */
    size_t queue_max_jobs;     /* default 256 */
    uint64_t queue_max_bytes;  /* default 256 MiB */
    int retry_min_ms;          /* first backoff (default 50) */
    int retry_max_ms;          /* backoff cap (default 2000) */
    void (*log)(void *ud, const char *msg);
    void *ud;
} remote_opts;

enum {
    REMOTE_EV_PUT, REMOTE_EV_GET, REMOTE_EV_HIT, REMOTE_EV_MISS, REMOTE_EV_ERROR,
    REMOTE_EV_RETRY, REMOTE_EV_DROPPED, REMOTE_EV_TIMEOUT, REMOTE_EV_EVICTED, REMOTE_EV_N
};
/* "put", "get", "hit", "miss", "error", "retry", "dropped", "timeout",
 * "evicted" (keys the budget removed). */
const char *remote_event_name(int ev);

typedef enum { REMOTE_DOWN = 0, REMOTE_UP = 1, REMOTE_DEGRADED = 2 } remote_state_t;

typedef struct remote_stats {
    uint64_t events[REMOTE_EV_N];
    size_t queue_jobs;
    uint64_t queue_bytes;
    remote_state_t state;
    uint64_t budget_bytes;     /* remote_opts.budget_bytes (0: none) */
    uint64_t used_bytes;       /* under the prefix, as the last budget step saw it (0 without a budget) */
    char last_error[KP_ERR_MAX];
} remote_stats;

/* One object of a save job. */
typedef struct remote_obj {
    cas_key key;
    const void *data;    /* NULL: by key only, for an object remote_known() says is there */
    size_t len;          /* its length either way (the budget's books) */
} remote_obj;

remote_opts remote_default_opts(void);
int remote_url_parse(const char *url, remote_url *out, kp_err *err);
int remote_open(remote **out, const remote_opts *o, kp_err *err);
/* Stops the writer (jobs still queued are counted as dropped and logged). */
void remote_close(remote *r);
/* "kvpark:<model>:<codec>:" */
const char *remote_prefix(const remote *r);

int remote_put_object(remote *r, cas_key k, const void *data, size_t len, kp_err *err);
/* *data malloc'd. KP_ENOTFOUND (miss), KP_EFORMAT (bad value), KP_EBUSY. */
int remote_get_object(remote *r, cas_key k, void **data, size_t *len, kp_err *err);
/* 1 present, 0 absent, or a negative error. */
int remote_has_object(remote *r, cas_key k, kp_err *err);

int remote_put_record(remote *r, const char *id, const void *rec, size_t len, long long expect,
                      long long *version, kp_err *err);
int remote_get_record(remote *r, const char *id, void **rec, size_t *len, long long *version,
                      kp_err *err);
int remote_del_record(remote *r, const char *id, kp_err *err);

/* The deployment's owner secret (storage/store.h store_secret): SET NX of
 * mine under REMOTE_SECRET_KEY (outside every model prefix: one deployment,
 * one secret), then GET: *out is the secret the first replica put there, so
 * every replica keys owner ids alike and a session is its key's everywhere.
 * Redis may evict that key (allkeys-lru, also in the background): every
 * record write puts it back (NX) and stores a copy in the record (field k),
 * and a replica that finds the key missing looks for a copy in the records
 * (SCAN, ~10,000 keys at most) before it puts up its own.
 * KP_EBUSY if Redis is unreachable, KP_EFORMAT if the key holds something
 * that is not an n-byte value. */
#define REMOTE_SECRET_KEY "kvpark:owner-secret"
int remote_share_secret(remote *r, const uint8_t *mine, size_t n, uint8_t *out, kp_err *err);
/* Hands r the deployment's secret (n <= 256 bytes; remote_share_secret keeps
 * it too): every record write then puts it back with SET NX, should Redis
 * have lost it (allkeys-lru eviction, a restart without persistence) -- a
 * replica starting then would otherwise draw its own and key owners apart. */
void remote_keep_secret(remote *r, const uint8_t *secret, size_t n);

/* Queue a save (objects first, record last) or a delete. 0 queued, KP_EBUSY
 * queue full (dropped), KP_ENOMEM. */
int remote_enqueue_save(remote *r, const char *id, const remote_obj *objs, int n_objs,
                        const void *rec, size_t rec_len);
int remote_enqueue_delete(remote *r, const char *id);
/* 1 if this process wrote object k to Redis or saw it there in a save, so a
 * save may send it by key only (remote_obj.data NULL) instead of a copy.
 * Advisory: if Redis has dropped it since, the writer finds it missing,
 * forgets it (the next save sends its data) and logs that the record went up
 * without it (a replica reading that record recomputes the KV). */
int remote_known(remote *r, cas_key k);
/* Wait until the queue is empty (0) or timeout_ms passed (KP_EBUSY). */
int remote_drain(remote *r, int timeout_ms);

void remote_get_stats(remote *r, remote_stats *st);
remote_state_t remote_state(remote *r);
/* "up", "down", "degraded". */
const char *remote_state_name(remote_state_t s);

#endif
