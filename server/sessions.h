/*
 * sessions.h — the server's session table and its tier policy.
 *
 * A session is a conversation named by an unguessable id and owned by one API
 * key. It lives in one tier at a time:
 *
 *   empty  created, no tokens yet (holds nothing)
 *   hot    a live KV cache the scheduler can decode from (a sched_seq)
 *   warm   parked, compressed, in host RAM      \  the session store
 *   cold   parked, compressed, on disk          /  (storage/store.h)
 *
 * Policy (all of it here, so http.c only asks for sessions):
 *   - A request names a session: sess_acquire() makes it hot — at once if it
 *     already is, else by restoring it from the store on the caller's thread
 *     (a KV in device memory is uploaded on the scheduler thread, which owns
 *     the device) — and pins it (users++) until sess_release(). Two requests for the same
 *     parked session restore it once: the second waits for the first.
 *   - Budgets: at most `hot_sessions` hot sessions (0 = no count limit) and
 *     `hot_budget` bytes of hot KV (0 = no byte limit). When a restore or a
 *     new session goes over, the least recently used idle hot sessions are
 *     parked. Sessions idle for `idle_park_s` seconds (0 = never) are parked.
 *     Parking runs on libuv's thread pool, driven by a libuv loop thread (an
 *     async handle to wake it, a timer for the idle scan): it never holds up
 *     the scheduler or other sessions. A pinned session is never parked.
 *   - A parked session that was saved explicitly is parked durably (it stays
 *     acknowledged); an unsaved one goes to the warm tier and reaches disk
 *     when the warm budget pushes it down or at shutdown.
 *   - sess_save() makes a session durable (an explicit save: acknowledged
 *     only when on disk). sess_close() (shutdown) parks every hot session
 *     durably, so a clean restart loses nothing; after kill -9 every session
 *     whose save was acknowledged is still there.
 *   - The store's cold budget may drop whole sessions (LRU, counted, logged):
 *     a dropped session that is not hot disappears from the table.
 *   - Expiry: a session nobody used for session_ttl_s seconds (0 = never) and
 *     that nobody holds is deleted from every tier (the scan runs on the
 *     loop thread's timer), logged one line each, counted (sess_counts
 *     .expired, event "expire"). After a restart, idleness counts from the
 *     session's last save.
 *   - A session whose stored data is found corrupt when restoring fails with
 *     KP_EFORMAT and a message naming it; it is removed (its files are in
 *     quarantine); no other session is affected.
 *
 * Thread-safety: every call may come from any thread. The table's mutex is
 * never held while calling into the store (file I/O, encode, decode).
 */
#ifndef KP_SESSIONS_H
#define KP_SESSIONS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "engine/model.h"
#include "engine/scheduler.h"
#include "storage/store.h"

typedef struct sess_table sess_table;
typedef struct sess sess;

/* Something worth counting happened (metrics). kind: "park", "restore",
 * "drop", "error"; tier: the tier involved ("hot", "warm", "cold", "");
 * seconds: how long it took (0 if not timed). Called with no lock held. */
typedef void (*sess_event_fn)(void *ud, const char *kind, const char *tier, double seconds);

#define SESS_WINDOW_NONE (-1)

typedef struct sess_opts {
    model *m;
    sched *sch;              /* for saves that must run between scheduler steps, and
                              * every device copy of a KV (sched_kv_copy) */
    int kv_type;
    int n_ctx;               /* context of a hot session */
    const char *dir;         /* cold tier directory */
    const char *codec;       /* codec for parking (NULL: none) */
    int park_window;         /* recent rows parked exact with a built-in codec: 0 the
                              * default layout's 64, SESS_WINDOW_NONE none, else that
                              * many (a codec file keeps the layout it was fitted with) */
    int hot_sessions;        /* 0: no count limit */
    uint64_t hot_budget;     /* bytes, 0: no byte limit */
    uint64_t warm_budget;    /* bytes (0: the store's default) */
    uint64_t cold_budget;    /* bytes, 0: unlimited */
    double idle_park_s;      /* 0: never park for idleness */
    int max_sessions;        /* sessions in all tiers at most */
    int max_sessions_per_key;/* sessions of one owner at most (<= 0: max_sessions / 4,
                              * at least 1); with no keys it is max_sessions */
    double session_ttl_s;    /* idle sessions expire after this long (0: never) */
    const char *const *keys; /* the API keys (none: no auth), to migrate the owner ids of */
    int n_keys;              /*   sessions stored by older versions (see sess_key_owners) */
    bool quiet;              /* fewer log lines */
    const char *remote_url;  /* the shared Redis tier (storage/remote.h), NULL: none */
    int remote_policy;       /* STORE_REMOTE_WRITE_THROUGH (default) or _WRITE_BACK */
    uint32_t remote_ttl_s;   /* expiry of what goes to Redis (0: none) */
    uint64_t remote_budget;  /* bytes in Redis under the prefix (0: none; remote.h "The budget") */
    int remote_timeout_ms;   /* no Redis call waits longer (0: remote.h's defaults) */
    sess_event_fn on_event;
    void *ud;
} sess_opts;

typedef struct sess_info {
    char id[STORE_ID_MAX + 1];
    uint64_t owner;
    int n_tokens;
    char tier[STORE_TIER_MAX]; /* empty | hot | warm | cold */
    uint64_t bytes;            /* hot: KV bytes in use; parked: stored bytes */
    bool saved;                /* an acknowledged durable copy exists */
    double last_use;           /* unix seconds */
} sess_info;

typedef struct sess_counts {
    int n_empty, n_hot, n_warm, n_cold;
    uint64_t hot_bytes, warm_bytes, cold_bytes;
    uint64_t expired;        /* sessions deleted for idleness (session_ttl_s) since open */
    uint64_t migrated;       /* stored sessions whose owner id was rewritten keyed at open */
    store_stats store;
} sess_counts;

/* The owner ids of API keys: the first 8 bytes of BLAKE2b-128 of the key
 * (libsodium crypto_generichash) keyed with the store's secret
 * (storage/store.h store_secret, created in dir on first use), never 0 or 1
 * (0: no auth, 1: refused). These ids are what stored sessions record, so
 * the cold dir without its secret reveals nothing about the keys. Sessions
 * stored by older versions recorded an unkeyed XXH64 of the key: sess_open
 * rewrites each one whose owner is the old id of a configured key (logged,
 * counted); one whose key is not configured keeps its old id and is migrated
 * on a later start that has its key, so access is never lost. */
int sess_key_owners(const char *dir, const char *const *keys, int n_keys, uint64_t *owners, kp_err *err);

int sess_open(sess_table **out, const sess_opts *o, kp_err *err);
/* Stops background work, parks every hot session durably, closes the store.
 * Call it once the scheduler is stopped (sched_stop) and before sched_free:
 * its own saves copy a device KV on the calling thread, and a background
 * park still in flight copies through opts.sch until it is joined here. */
void sess_close(sess_table *t);

/* A new empty session. KP_EBUSY (with a message naming the limit and its
 * flag) when max_sessions are held, or (with keys) max_sessions_per_key of
 * this owner. Sessions loaded at open all count, even past a limit (a
 * smaller --max-sessions on restart): none is deleted for it, new ones are
 * refused until deletions or expiry bring the count under the limit. */
int sess_create(sess_table *t, uint64_t owner, sess_info *info, kp_err *err);

/* Make the session hot and pin it. KP_ENOTFOUND: no such session for this
 * owner (owner_check false: any owner). KP_EUNAVAIL: only in a remote tier
 * that cannot be reached (its token ids unknown here: retry). KP_ERANGE /
 * KP_EFORMAT: it cannot be restored (message names it). When its token ids
 * load but its KV does not (lost, damaged, evicted, a codec gone, the
 * remote tier down past its timeout) it is still 0: the sequence holds the
 * token ids over an empty KV, the next job on it prefills them (the
 * scheduler reuses only KV rows), *from is "recomputed", and the event is
 * logged and counted ("recomputed"). *from: the tier it came from ("hot",
 * "empty", "warm", "cold", "remote", "recomputed"); *ms: restore time. A
 * sequence built here carries `owner` as its
 * sched_seq.owner: the jobs run on it must carry the same sched_job.owner
 * or the scheduler treats its KV as another tenant's (nothing reused). */
int sess_acquire(sess_table *t, const char *id, uint64_t owner, bool owner_check, sess **out,
                 char from[STORE_TIER_MAX], double *ms, kp_err *err);
/* True when a sess_acquire with *from = from restored a KV from the store
 * (warm, cold, remote): what kvpark_session_restore_seconds observes. */
bool sess_restored(const char *from);
sched_seq *sess_seq(sess *x);
const char *sess_id(const sess *x);
/* Unpin; `used` = a generation ran on it (its KV changed). */
void sess_release(sess_table *t, sess *x, bool used);

/* Explicit save (durable when it returns 0). st may be NULL. */
/* The codec new parks and saves use (a built-in's name or the codec file's
 * basename; the string lives until sess_close). */
const char *sess_codec_name(sess_table *t);
void sess_codec_info(sess_table *t, store_codec_info *ci);
/* New parks and saves use codec `name` from now on (store_set_codec). */
int sess_set_codec(sess_table *t, const char *name, kp_err *err);
int sess_save(sess_table *t, const char *id, uint64_t owner, bool owner_check, store_save_stats *st,
              sess_info *info, kp_err *err);
/* KP_ENOTFOUND, KP_EBUSY (in use by a request). */
int sess_delete(sess_table *t, const char *id, uint64_t owner, bool owner_check, kp_err *err);
int sess_get(sess_table *t, const char *id, uint64_t owner, bool owner_check, sess_info *info);
/* Sessions of owner (all if !owner_check), sorted by id; *out malloc'd. */
int sess_list(sess_table *t, uint64_t owner, bool owner_check, sess_info **out, size_t *n);
void sess_get_counts(sess_table *t, sess_counts *c);
/* The remote tier's counters and state: 0, or KP_ENOTFOUND without one. */
int sess_remote_stats(sess_table *t, remote_stats *st);
/* Park now every idle hot session (tests, and `kvpark` admin use): waits. */
int sess_park_all(sess_table *t, kp_err *err);

#endif
