/*
 * sessions.c — the server's session table and tier policy (see sessions.h).
 *
 * Why a module of its own: http.c speaks HTTP, the store (storage/store.h)
 * moves bytes between RAM and disk; deciding WHEN a session moves (budgets,
 * idleness, explicit saves, shutdown) and making sure no two threads move
 * the same session at once is a small state machine that deserves one place.
 *
 * Each session has a state guarded by the table mutex:
 *
 *   IDLE        nobody is moving it (it may be hot and in use: users > 0)
 *   RESTORING   a thread is bringing it back from the store
 *   PARKING     a thread is writing it to the store (then drops the KV)
 *   SAVING      a thread is writing it to the store durably (keeps the KV)
 *   EXPIRING    the loop thread is deleting it for idleness (then it is gone)
 *
 * and independently it holds one tier (what tier_of reports): `hot` (seq set:
 * a live KV), `warm` or `cold` (stored: the store's tier of its record),
 * `empty` (neither). "gone" below means unlinked from the table (freed by
 * the last unref). Every change of state or tier, and who makes it:
 *
 *   (none)           -> empty IDLE      : sess_create (fewer than max_sessions)
 *   (none)           -> warm/cold IDLE  : load_index in sess_open, per stored
 *                                         session whose metadata loads
 *   empty/warm/cold IDLE -> RESTORING   : sess_acquire (not hot)
 *   RESTORING        -> hot IDLE        : sess_acquire, the KV is built (empty)
 *                                         or restored (load_hot); users++
 *   RESTORING        -> hot IDLE        : sess_acquire, the token ids loaded
 *                                         but the KV did not (kv_recomputable:
 *                                         "recomputed"); the seq holds the ids
 *                                         over 0 KV rows until a job prefills
 *                                         them; users++
 *   RESTORING        -> same tier IDLE  : sess_acquire, restore failed with
 *                                         any other error but EFORMAT /
 *                                         ENOTFOUND
 *   RESTORING        -> gone            : sess_acquire, the token ids failed
 *                                         to load with EFORMAT or ENOTFOUND
 *                                         (stored = false)
 *   hot IDLE         -> hot IDLE        : sess_acquire (users++), sess_release
 *                                         (users--; dirty if the KV was used)
 *   hot IDLE         -> PARKING         : schedule_parks (users == 0, past
 *                                         retry_park, idle for idle_park_s or
 *                                         the hot tier over budget);
 *                                         sess_park_all (users == 0)
 *   PARKING          -> empty IDLE      : park_finish, parked with 0 tokens
 *   PARKING          -> warm IDLE       : park_finish, !saved (a warm store_save,
 *                                         or none when stored and not dirty)
 *   PARKING          -> cold IDLE       : park_finish, saved (a durable
 *                                         store_save, or none as above)
 *   PARKING          -> hot IDLE        : park_finish, the save failed (next
 *                                         try after SESS_PARK_RETRY_S)
 *   hot IDLE         -> SAVING          : sess_save, tokens > 0 and (dirty,
 *                                         users > 0, !stored or !saved)
 *   SAVING           -> hot IDLE        : sess_save (success: stored, saved,
 *                                         !dirty; failure: unchanged)
 *   warm IDLE        -> SAVING          : sess_save, stored && !saved, not hot
 *   SAVING           -> cold IDLE       : sess_save, store_flush succeeded
 *                                         (saved); on failure back to warm IDLE
 *   warm             -> cold            : the store itself (warm budget spill)
 *   warm/cold IDLE   -> gone            : store_dropped (the store dropped it:
 *                                         not hot, users == 0)
 *   hot              -> hot             : store_dropped (stored = saved =
 *                                         false, dirty = true)
 *   any IDLE         -> gone            : sess_delete (users == 0, else EBUSY)
 *   any IDLE         -> EXPIRING        : expire_idle, the loop thread's timer
 *                                         (users == 0, refs == 0, unused for
 *                                         session_ttl_s)
 *   EXPIRING         -> gone            : expire_idle, its stored copy deleted
 *                                         (logged and counted first)
 *   hot              -> (saved, freed)  : sess_close (durable store_hot of
 *                                         each dirty or unstored hot session)
 *
 * Any thread that wants to move or use a session waits until it is IDLE,
 * then sets the state, drops the mutex, does the slow work (store calls:
 * file I/O, encode, decode), re-takes the mutex and sets IDLE again with a
 * broadcast. So a second request for a session being restored simply waits
 * for the first restore, and a request never sees a half-parked KV.
 *
 * Lifetime: `refs` counts threads holding a pointer to the session (waiters,
 * users, the parker). A deleted or dropped session is unlinked at once
 * (`gone`) and freed by whoever drops the last reference.
 *
 * Background parking: one libuv loop thread owns an async handle (woken by
 * any thread when the hot tier may be over budget) and a timer (the idle
 * scan); it picks victims under the mutex and hands each to libuv's thread
 * pool (uv_queue_work), where the encode + store happen.
 *
 * Device KV: when the backend's KV is host memory (kv_backend_is_host) the
 * store reads and writes it in place, no copy. Otherwise a session is staged
 * through a host KV, and the copy between the two (sched_kv_copy) runs on
 * the scheduler thread, which owns the model and the device; the encode,
 * decode and file I/O stay on the thread that parks, saves or restores.
 * KVPARK_TEST_STAGE_KV=1 forces the staged path on the CPU (tests).
 */
#include "server/sessions.h"

#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <sodium.h>
#include <uv.h>
#include <xxhash.h>

#include "compress/quality.h"
#include "kernels/kernels.h"

/* The server's bytes in a stored session: magic u32 + owner u64. "SXP2": the
 * owner is keyed (sess_key_owners); "SXPK" (older versions): it is an
 * unkeyed XXH64 of the key, migrated at open (load_index). */
#define SESS_EXTRA_MAGIC 0x32505853u
#define SESS_EXTRA_MAGIC_V1 0x4B505853u
#define SESS_EXTRA_BYTES 12
#define SESS_PARK_RETRY_S 10         /* a session that failed to park waits this long */

enum sess_state { SS_IDLE = 0, SS_RESTORING, SS_PARKING, SS_SAVING, SS_EXPIRING };

struct sess {
    char id[STORE_ID_MAX + 1];
    uint64_t owner;
    sched_seq *seq;     /* hot KV, or NULL */
    int n_tokens;       /* tokens held (hot) or stored */
    bool stored;        /* the store holds a version of it */
    bool saved;         /* that version was saved explicitly: keep it durable */
    bool dirty;         /* the hot KV is newer than the stored version */
    int state;          /* enum sess_state */
    int users;          /* requests using the hot KV */
    int refs;           /* threads holding this pointer */
    bool gone;          /* unlinked from the table */
    double last_use;    /* unix seconds */
    double retry_park;  /* after a failed park: not before this time (unix seconds) */
    struct sess *next;
};

struct sess_table {
    sess_opts o;
    store *st;
    remote *rem;            /* the shared tier under the store (NULL: none); closed after it */
    bool host_kv;           /* the backend's KV is host memory: the store reads it in place */
    kp_backend *host_be;    /* else: a CPU backend for host copies of the KV (staging) */
    size_t seq_bytes;       /* KV bytes of one hot session */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    sess *list;
    int n;

    /* background parking */
    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t timer;
    uv_thread_t thr;
    bool uv_running;
    atomic_bool stopping;

    int per_key;            /* sessions of one owner at most (max_sessions without keys) */
    uint64_t n_expired;     /* deleted for idleness since open (mu) */
    uint64_t n_migrated;    /* owner ids rewritten keyed at open */
    uint64_t *key_new;      /* [n_key_ids] the configured keys' owner ids (keyed) */
    uint64_t *key_old;      /* [n_key_ids] what older versions recorded for them */
    int n_key_ids;
    bool test_legacy;       /* KVPARK_TEST_LEGACY_OWNER=1: write records as older versions did */
};

typedef struct park_req {
    uv_work_t w;
    sess_table *t;
    sess *x;
    int rc;
    double secs;
    kp_err err;
    char tier[STORE_TIER_MAX];
} park_req;

static double unix_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

static void sess_log(sess_table *t, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void sess_log(sess_table *t, const char *fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "kvpark: %s\n", buf);
}

static void event(sess_table *t, const char *kind, const char *tier, double secs) {
    if (t->o.on_event) t->o.on_event(t->o.ud, kind, tier, secs);
}

static void kick(sess_table *t) {
    if (t->uv_running && !atomic_load(&t->stopping)) uv_async_send(&t->wake);
}

/* ---- owner ids -------------------------------------------------------------- */

/* What versions before the keyed ids recorded (http.c's old key_hash_of). */
static uint64_t legacy_owner(const char *key) {
    uint64_t h = XXH64(key, strlen(key), 0x6b7670);
    return h < 2 ? h + 2 : h;
}

static uint64_t keyed_owner(const uint8_t secret[STORE_SECRET_BYTES], const char *key) {
    uint8_t h[crypto_generichash_BYTES_MIN]; /* 16: BLAKE2b's shortest output */
    crypto_generichash(h, sizeof h, (const unsigned char *)key, strlen(key), secret, STORE_SECRET_BYTES);
    uint64_t v;
    memcpy(&v, h, sizeof v);
    return v < 2 ? v + 2 : v;
}

int sess_key_owners(const char *dir, const char *const *keys, int n_keys, uint64_t *owners, kp_err *err) {
    if (n_keys <= 0) return 0;
    uint8_t secret[STORE_SECRET_BYTES];
    int rc = store_secret(dir, secret, err);
    if (rc) return rc;
    for (int i = 0; i < n_keys; i++) owners[i] = keyed_owner(secret, keys[i]);
    sodium_memzero(secret, sizeof secret);
    return 0;
}

/* ---- the table (t->mu held) ------------------------------------------------ */

static sess *find_locked(sess_table *t, const char *id, uint64_t owner, bool owner_check) {
    if (!store_id_valid(id)) return NULL;
    for (sess *x = t->list; x; x = x->next)
        if (!strcmp(x->id, id)) return (!owner_check || x->owner == owner) ? x : NULL;
    return NULL;
}

static void unlink_locked(sess_table *t, sess *x) {
    for (sess **pp = &t->list; *pp; pp = &(*pp)->next)
        if (*pp == x) {
            *pp = x->next;
            t->n--;
            break;
        }
    x->gone = true;
}

/* Drop a reference; free a gone session nobody holds. Returns the KV to
 * free outside the lock (or NULL). */
static sched_seq *unref_locked(sess *x, sess **to_free) {
    x->refs--;
    *to_free = NULL;
    if (x->gone && x->refs == 0) {
        sched_seq *q = x->seq;
        x->seq = NULL;
        *to_free = x;
        return q;
    }
    return NULL;
}

static void unref(sess_table *t, sess *x) {
    sess *f;
    sched_seq *q = unref_locked(x, &f);
    pthread_mutex_unlock(&t->mu);
    sched_seq_free(q);
    free(f);
    pthread_mutex_lock(&t->mu);
}

/* Wait until nobody moves x (t->mu held, caller holds a ref). false if it
 * went away meanwhile. */
static bool wait_idle_locked(sess_table *t, sess *x) {
    while (x->state != SS_IDLE && !x->gone) pthread_cond_wait(&t->cv, &t->mu);
    return !x->gone;
}

/* Find id (for owner), take a reference and wait until nobody moves it.
 * On success t->mu is HELD and *out is the session; else t->mu is released
 * and KP_ENOTFOUND returned. Release with unref() under the mutex. */
/* id is not in the table: with a remote tier it may be another replica's.
 * The store reads its record from Redis (store_load_meta adopts it, tier
 * "remote"); it joins the table as a stored session with the owner its
 * record names (the replicas share the owner secret: store_secret_share).
 * 0, KP_ENOTFOUND, or KP_EUNAVAIL (Redis unreachable: 503). t->mu NOT held. */
static int adopt_remote(sess_table *t, const char *id, kp_err *err) {
    if (!t->rem || !store_id_valid(id)) return kp_errf(err, KP_ENOTFOUND, "no session %s", id);
    void *extra = NULL;
    size_t extra_len = 0;
    int n_tokens = 0;
    int rc = store_load_meta(t->st, id, &n_tokens, NULL, &extra, &extra_len, err);
    if (rc == KP_EFORMAT) rc = kp_errf(err, KP_ENOTFOUND, "no session %s", id); /* logged by the store */
    if (rc) return rc;
    uint32_t magic = 0;
    uint64_t owner = 0;
    if (extra && extra_len >= SESS_EXTRA_BYTES) {
        memcpy(&magic, extra, 4);
        if (magic == SESS_EXTRA_MAGIC) memcpy(&owner, (char *)extra + 4, 8);
    }
    free(extra);
    sess *x = calloc(1, sizeof *x);
    if (!x) return kp_errf(err, KP_ENOMEM, "out of memory");
    snprintf(x->id, sizeof x->id, "%s", id);
    x->owner = owner;
    x->n_tokens = n_tokens;
    x->stored = true;
    x->saved = true; /* acknowledged by the replica that saved it */
    x->last_use = unix_now();
    pthread_mutex_lock(&t->mu);
    if (find_locked(t, id, 0, false)) { /* a concurrent request adopted it first */
        pthread_mutex_unlock(&t->mu);
        free(x);
        return 0;
    }
    x->next = t->list;
    t->list = x;
    t->n++;
    pthread_mutex_unlock(&t->mu);
    return 0;
}

static int grab(sess_table *t, const char *id, uint64_t owner, bool owner_check, sess **out, kp_err *err) {
    pthread_mutex_lock(&t->mu);
    sess *x = find_locked(t, id, owner, owner_check);
    if (!x && t->rem && !find_locked(t, id, 0, false)) {
        pthread_mutex_unlock(&t->mu);
        int rc = adopt_remote(t, id, err);
        if (rc) return rc;
        pthread_mutex_lock(&t->mu);
        x = find_locked(t, id, owner, owner_check);
    }
    if (!x) {
        pthread_mutex_unlock(&t->mu);
        return kp_errf(err, KP_ENOTFOUND, "no session %s", id);
    }
    x->refs++;
    if (!wait_idle_locked(t, x)) {
        unref(t, x);
        pthread_mutex_unlock(&t->mu);
        return kp_errf(err, KP_ENOTFOUND, "session %s was deleted", id);
    }
    *out = x;
    return 0;
}

static void tier_of(const sess *x, const store_entry *e, char out[STORE_TIER_MAX]) {
    if (x->seq) snprintf(out, STORE_TIER_MAX, "hot");
    else if (x->stored && e) snprintf(out, STORE_TIER_MAX, "%s", e->tier);
    else if (x->stored) snprintf(out, STORE_TIER_MAX, "cold");
    else snprintf(out, STORE_TIER_MAX, "empty");
}

static void info_locked(sess_table *t, const sess *x, const store_entry *e, sess_info *info) {
    memset(info, 0, sizeof *info);
    snprintf(info->id, sizeof info->id, "%s", x->id);
    info->owner = x->owner;
    info->n_tokens = x->seq ? x->seq->n_tokens : x->n_tokens;
    tier_of(x, e, info->tier);
    info->bytes = x->seq ? kv_bytes_used(x->seq->kv) : (e ? e->bytes : 0);
    info->saved = x->saved;
    info->last_use = x->last_use;
    (void)t;
}

/* ---- store plumbing ------------------------------------------------------- */

static void make_extra(const sess_table *t, const sess *x, uint8_t extra[SESS_EXTRA_BYTES]) {
    uint32_t magic = SESS_EXTRA_MAGIC;
    uint64_t owner = x->owner;
    /* Tests only: what an older version wrote (the unkeyed owner id), so the
     * upgrade of a cold dir can be tested end to end. */
    for (int i = 0; t->test_legacy && i < t->n_key_ids; i++)
        if (t->key_new[i] == owner) {
            magic = SESS_EXTRA_MAGIC_V1;
            owner = t->key_old[i];
        }
    memcpy(extra, &magic, 4); /* host order, as every version wrote it */
    memcpy(extra + 4, &owner, 8);
}

/* A host-memory KV of n rows shaped like `like` (staging for a KV that lives
 * in device memory: the store reads and writes host memory). */
static int staging_new(sess_table *t, const kv_cache *like, int n, kv_cache **out, kp_err *err) {
    return kv_new(out, t->host_be, like->kv_type, like->n_layer, n > 0 ? n : 1, like->n_kv_heads, like->head_dim,
                  err);
}

/* Write x's hot KV to the store. The caller made x PARKING or SAVING (so no
 * request starts on it) and, unless on the scheduler thread, made sure no
 * job runs on it. A KV in device memory is staged through host memory; the
 * copy runs on the thread that owns the model (sched_kv_copy through sch;
 * sch NULL: the scheduler is gone and the caller is the only thread left). */
static int store_hot(sess_table *t, sched *sch, sess *x, bool durable, store_save_stats *st, kp_err *err) {
    if (x->seq->kv->n_pos < x->seq->n_tokens) { /* its KV was lost, no request has recomputed it yet */
        if (x->stored) return durable ? store_flush(t->st, x->id, err) : 0; /* the store holds its token ids */
        return kp_errf(err, KP_ELOST, "session %s: its KV was lost and has not been recomputed yet: send a "
                       "request on it first", x->id);
    }
    uint8_t extra[SESS_EXTRA_BYTES];
    make_extra(t, x, extra);
    /* scope = owner: stored spans are shared between sessions of one key only */
    store_item it = {.tokens = x->seq->tokens, .n_tokens = x->seq->n_tokens, .extra = extra,
                     .extra_len = sizeof extra, .kv = x->seq->kv, .scope = t->test_legacy ? 0 : x->owner};
    if (t->host_kv) return store_save(t->st, x->id, &it, durable, st, err);
    kv_cache *h = NULL;
    int rc = staging_new(t, x->seq->kv, it.n_tokens, &h, err);
    if (!rc) rc = sched_kv_copy(sch, h, x->seq->kv, 0, it.n_tokens, err);
    if (!rc) {
        h->n_pos = it.n_tokens;
        it.kv = h;
        rc = store_save(t->st, x->id, &it, durable, st, err);
    }
    kv_free(h);
    return rc;
}

/* A restore that failed with rc can be made good by recomputing the KV from
 * the session's token ids (which loaded): its KV was lost (damaged, evicted,
 * a codec gone: KP_ELOST, KP_EFORMAT, KP_EUNSUP, KP_EMISMATCH), a remote tier
 * is down past its timeout (KP_EUNAVAIL), or a disk read failed (KP_EIO).
 * Not: out of memory, shutting down, busy (the same request would fail). */
static bool kv_recomputable(int rc) {
    return rc == KP_ELOST || rc == KP_EFORMAT || rc == KP_EUNSUP || rc == KP_EMISMATCH || rc == KP_EUNAVAIL ||
           rc == KP_EIO || rc == KP_ENOTFOUND;
}

/* Restore the stored KV of id into kv (n_tokens rows), staging if needed:
 * the store decodes into host memory on the caller's thread, the upload runs
 * on the scheduler thread. */
static int load_hot(sess_table *t, const char *id, kv_cache *kv, int n_tokens, kp_err *err) {
    if (t->host_kv) return store_load_kv(t->st, id, kv, err);
    kv_cache *h = NULL;
    int rc = staging_new(t, kv, n_tokens, &h, err);
    if (!rc) rc = store_load_kv(t->st, id, h, err);
    if (!rc) rc = sched_kv_copy(t->o.sch, kv, h, 0, n_tokens, err);
    if (!rc) kv->n_pos = n_tokens;
    kv_free(h);
    return rc;
}

static void store_log(void *ud, const char *msg) {
    (void)ud;
    fprintf(stderr, "kvpark: store: %s\n", msg);
}

/* The store dropped a session (cold tier full) or forgot a corrupt one. */
static void store_dropped(void *ud, const char *id) {
    sess_table *t = ud;
    pthread_mutex_lock(&t->mu);
    sess *x = find_locked(t, id, 0, false);
    if (x) {
        x->stored = false;
        x->saved = false;
        if (!x->seq && x->state == SS_IDLE && x->users == 0) {
            unlink_locked(t, x);
            x->refs++;
            unref(t, x);
        } else if (x->seq) {
            x->dirty = true;
        }
    }
    pthread_mutex_unlock(&t->mu);
    event(t, "drop", "cold", 0);
}

/* ---- parking -------------------------------------------------------------- */

/* Park x (state already PARKING, a ref held, users == 0). Runs without the
 * mutex. On success the KV is freed by park_finish. */
static int park_one(sess_table *t, sess *x, char tier[STORE_TIER_MAX], kp_err *err) {
    if (x->seq->n_tokens == 0) {
        snprintf(tier, STORE_TIER_MAX, "empty");
        return 0;
    }
    if (x->stored && !x->dirty) { /* the store already holds exactly this */
        snprintf(tier, STORE_TIER_MAX, x->saved ? "cold" : "warm");
        return 0;
    }
    if (x->seq->kv->n_pos < x->seq->n_tokens && !x->stored) {
        /* its KV was lost, not recomputed, and the store dropped its token ids
         * meanwhile (cold budget): only the rows the KV holds can be kept */
        sess_log(t, "session %s: parked with %d of its %d tokens (its KV was lost and no request recomputed it)",
                 x->id, x->seq->kv->n_pos, x->seq->n_tokens);
        x->seq->n_tokens = x->seq->kv->n_pos;
        if (x->seq->n_tokens == 0) {
            snprintf(tier, STORE_TIER_MAX, "empty");
            return 0;
        }
    }
    snprintf(tier, STORE_TIER_MAX, x->saved ? "cold" : "warm");
    return store_hot(t, t->o.sch, x, x->saved, NULL, err);
}

static void park_finish(sess_table *t, sess *x, int rc, const kp_err *err) {
    sched_seq *drop = NULL;
    pthread_mutex_lock(&t->mu);
    if (!rc) {
        if (x->seq->n_tokens > 0) {
            x->stored = true;
            x->n_tokens = x->seq->n_tokens;
        } else {
            x->n_tokens = 0;
        }
        x->dirty = false;
        drop = x->seq;
        x->seq = NULL;
    } else {
        sess_log(t, "parking session %s failed, it stays hot (next try in %d s or after its next use): %s",
                 x->id, SESS_PARK_RETRY_S, err->msg);
        x->retry_park = unix_now() + SESS_PARK_RETRY_S;
    }
    x->state = SS_IDLE;
    pthread_cond_broadcast(&t->cv);
    sess *f;
    sched_seq *q = unref_locked(x, &f);
    pthread_mutex_unlock(&t->mu);
    sched_seq_free(drop);
    sched_seq_free(q);
    free(f);
}

static void park_work(uv_work_t *w) {
    park_req *p = w->data;
    double t0 = kp_now();
    p->rc = park_one(p->t, p->x, p->tier, &p->err);
    p->secs = kp_now() - t0;
}

static void park_after(uv_work_t *w, int status) {
    park_req *p = w->data;
    (void)status;
    park_finish(p->t, p->x, p->rc, &p->err);
    event(p->t, p->rc ? "error" : "park", p->tier, p->secs);
    free(p);
}

static int by_last_use(const void *a, const void *b) {
    const sess *x = *(sess *const *)a, *y = *(sess *const *)b;
    return (x->last_use > y->last_use) - (x->last_use < y->last_use);
}

/* Pick what to park now and queue it (loop thread). */
static void schedule_parks(sess_table *t) {
    if (atomic_load(&t->stopping)) return;
    pthread_mutex_lock(&t->mu);
    int n_hot = 0;
    sess **cand = malloc(sizeof *cand * (size_t)(t->n > 0 ? t->n : 1));
    int n_cand = 0;
    for (sess *x = t->list; x; x = x->next) {
        if (!x->seq || x->state == SS_PARKING) continue;
        n_hot++;
        if (cand && x->state == SS_IDLE && x->users == 0 && x->retry_park <= unix_now()) cand[n_cand++] = x;
    }
    if (cand) qsort(cand, (size_t)n_cand, sizeof *cand, by_last_use);
    double now = unix_now();
    int over_count = t->o.hot_sessions > 0 ? n_hot - t->o.hot_sessions : 0;
    int64_t over_bytes = t->o.hot_budget > 0 ? (int64_t)((uint64_t)n_hot * t->seq_bytes) - (int64_t)t->o.hot_budget : 0;
    park_req *queue[64];
    int nq = 0;
    for (int i = 0; i < n_cand && nq < 64; i++) {
        sess *x = cand[i];
        bool idle = t->o.idle_park_s > 0 && now - x->last_use >= t->o.idle_park_s;
        bool budget = over_count > 0 || over_bytes > 0;
        if (!idle && !budget) continue;
        park_req *p = calloc(1, sizeof *p);
        if (!p) break;
        p->t = t;
        p->x = x;
        p->w.data = p;
        x->state = SS_PARKING;
        x->refs++;
        queue[nq++] = p;
        over_count--;
        over_bytes -= (int64_t)t->seq_bytes;
    }
    pthread_mutex_unlock(&t->mu);
    free(cand);
    for (int i = 0; i < nq; i++)
        if (uv_queue_work(&t->loop, &queue[i]->w, park_work, park_after)) { /* cannot happen on a live loop */
            park_finish(t, queue[i]->x, KP_EIO, &(kp_err){.msg = "cannot queue the work"});
            free(queue[i]);
        }
}

static void on_wake(uv_async_t *a) {
    sess_table *t = a->data;
    if (atomic_load(&t->stopping)) {
        uv_timer_stop(&t->timer);
        uv_close((uv_handle_t *)&t->timer, NULL);
        uv_close((uv_handle_t *)&t->wake, NULL);
        return;
    }
    schedule_parks(t);
}

/* Delete every session idle for session_ttl_s that nobody holds or moves
 * (loop thread). Each goes from every tier, with a log line and a count;
 * while its stored copy is deleted it is EXPIRING (requests for it wait),
 * and it leaves the table only once the log line and the count are out, so
 * whoever sees it gone also sees why. */
static void expire_idle(sess_table *t) {
    if (t->o.session_ttl_s <= 0 || atomic_load(&t->stopping)) return;
    for (;;) {
        pthread_mutex_lock(&t->mu);
        double now = unix_now();
        sess *x = t->list;
        while (x && !(x->state == SS_IDLE && x->users == 0 && x->refs == 0 &&
                      now - x->last_use >= t->o.session_ttl_s))
            x = x->next;
        if (!x) {
            pthread_mutex_unlock(&t->mu);
            return;
        }
        char tier[STORE_TIER_MAX];
        tier_of(x, NULL, tier);
        double idle = now - x->last_use;
        bool stored = x->stored;
        x->refs++;
        x->state = SS_EXPIRING;
        pthread_mutex_unlock(&t->mu);
        kp_err err = {0};
        store_entry e;
        if (stored && strcmp(tier, "hot") != 0 && !store_stat(t->st, x->id, &e)) snprintf(tier, sizeof tier, "%s", e.tier);
        int rc = stored ? store_delete(t->st, x->id, &err) : 0;
        if (rc == KP_ENOTFOUND) rc = 0;
        if (rc)
            sess_log(t, "sessions: session %s expired (idle %.0f s, --session-ttl %g) but its stored copy "
                     "cannot be deleted: %s", x->id, idle, t->o.session_ttl_s, err.msg);
        else
            sess_log(t, "sessions: session %s expired: idle %.0f s, over --session-ttl %g s; deleted from "
                     "every tier (it was %s)", x->id, idle, t->o.session_ttl_s, tier);
        event(t, "expire", tier, 0);
        pthread_mutex_lock(&t->mu);
        t->n_expired++;
        x->stored = false;
        if (!x->gone) unlink_locked(t, x);
        x->state = SS_IDLE;
        pthread_cond_broadcast(&t->cv);
        unref(t, x); /* frees it, and its hot KV */
        pthread_mutex_unlock(&t->mu);
    }
}

static void on_timer(uv_timer_t *tm) {
    expire_idle(tm->data);
    if (((sess_table *)tm->data)->o.idle_park_s > 0) schedule_parks(tm->data);
}

static void loop_main(void *arg) {
    sess_table *t = arg;
    uv_run(&t->loop, UV_RUN_DEFAULT);
}

/* ---- open / close --------------------------------------------------------- */

/* An older version's owner id (unkeyed) -> the keyed id of the same key, or
 * 0 when no configured key has it. */
static uint64_t migrate_owner(const uint64_t *old_ids, const uint64_t *new_ids, int n, uint64_t owner) {
    for (int i = 0; i < n; i++)
        if (old_ids[i] == owner) return new_ids[i];
    return 0;
}

static int load_index(sess_table *t) {
    store_entry *ents = NULL;
    size_t n = 0;
    if (store_list(t->st, &ents, &n)) return 0;
    int nk = t->n_key_ids, failed = 0;
    const uint64_t *old_ids = t->key_old, *new_ids = t->key_new;
    for (size_t i = 0; i < n; i++) {
        void *extra = NULL;
        size_t extra_len = 0;
        int n_tokens = 0;
        if (store_load_meta(t->st, ents[i].id, &n_tokens, NULL, &extra, &extra_len, NULL)) continue;
        sess *x = calloc(1, sizeof *x);
        if (x) {
            snprintf(x->id, sizeof x->id, "%s", ents[i].id);
            uint32_t magic = 0;
            if (extra && extra_len >= SESS_EXTRA_BYTES) {
                memcpy(&magic, extra, 4);
                if (magic == SESS_EXTRA_MAGIC || magic == SESS_EXTRA_MAGIC_V1) memcpy(&x->owner, (char *)extra + 4, 8);
            }
            uint64_t keyed = magic == SESS_EXTRA_MAGIC_V1 && x->owner >= 2 ? migrate_owner(old_ids, new_ids, nk, x->owner) : 0;
            if (keyed) { /* rewrite the record with the keyed id; in memory it is keyed either way */
                x->owner = keyed;
                uint8_t nx[SESS_EXTRA_BYTES];
                make_extra(t, x, nx);
                memcpy(extra, nx, sizeof nx);
                kp_err e = {0};
                if (store_set_extra(t->st, x->id, extra, extra_len, &e)) {
                    failed++;
                    sess_log(t, "sessions: session %s: cannot rewrite its owner id keyed (tried again at the "
                             "next start; it stays reachable by its key): %s", x->id, e.msg);
                } else {
                    t->n_migrated++;
                }
            }
            x->n_tokens = n_tokens;
            x->stored = true;
            x->saved = ents[i].durable;
            x->last_use = (double)ents[i].mtime_unix_ms / 1e3;
            x->next = t->list;
            t->list = x;
            t->n++;
        }
        free(extra);
    }
    free(ents);
    if (t->n_migrated || failed)
        sess_log(t, "sessions: %llu stored sessions of older versions now record their owner as a keyed hash "
                 "(%d could not be rewritten)", (unsigned long long)t->n_migrated, failed);
    return (int)n;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Loaded sessions over a limit stay (none is ever deleted for a limit): say
 * so, and that new sessions are refused until the count is under it. */
static void log_over_caps(sess_table *t) {
    if (t->n > t->o.max_sessions)
        sess_log(t, "sessions: %d stored sessions loaded, more than --max-sessions %d: all are kept, and "
                 "new sessions are refused (429) until fewer than %d remain (delete sessions, let them "
                 "expire, or raise --max-sessions)", t->n, t->o.max_sessions, t->o.max_sessions);
    if (t->o.n_keys <= 0) return;
    /* per owner: count in one pass over a sorted copy of the owners */
    uint64_t *v = malloc(sizeof *v * (size_t)(t->n > 0 ? t->n : 1));
    if (!v) return;
    int n = 0;
    for (sess *x = t->list; x; x = x->next) v[n++] = x->owner;
    qsort(v, (size_t)n, sizeof *v, cmp_u64);
    int over = 0;
    for (int i = 0, j; i < n; i = j) {
        for (j = i; j < n && v[j] == v[i]; j++) {}
        if (j - i > t->per_key) over++;
    }
    if (over)
        sess_log(t, "sessions: %d API keys hold more stored sessions than --max-sessions-per-key %d: all are "
                 "kept; those keys cannot create sessions until under it", over, t->per_key);
    free(v);
}

int sess_open(sess_table **out, const sess_opts *o, kp_err *err) {
    *out = NULL;
    sess_table *t = calloc(1, sizeof *t);
    if (!t) return kp_errf(err, KP_ENOMEM, "out of memory");
    t->o = *o;
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, NULL);
    atomic_init(&t->stopping, false);
    t->host_kv = kv_backend_is_host(model_backend(o->m));
    /* Tests only: stage the KV through host copies even on the CPU backend, so
     * the path a GPU takes is exercised where there is no GPU. */
    const char *stage = getenv("KVPARK_TEST_STAGE_KV");
    if (stage && *stage == '1') t->host_kv = false;
    if (!t->host_kv) {
        int rc = kp_backend_new(&t->host_be, "cpu", 1, err);
        if (rc) {
            free(t);
            return rc;
        }
    }
    const model_hparams *hp = model_hp(o->m);
    size_t elem = o->kv_type == KP_TYPE_F32 ? 4 : 2;
    t->seq_bytes = (size_t)hp->n_layer * 2 * (size_t)o->n_ctx * (size_t)hp->n_kv_heads * (size_t)hp->head_dim * elem;

    store_opts so = store_default_opts();
    so.dir = o->dir;
    so.shape = quality_codec_shape(o->m);
    so.kv_type = o->kv_type;
    so.codec = o->codec;
    if (o->park_window) {
        so.layout = park_default_layout();
        so.layout.window = o->park_window == SESS_WINDOW_NONE ? 0 : o->park_window;
    }
    if (o->warm_budget) so.warm_budget = o->warm_budget;
    so.cold_budget = o->cold_budget;
    so.log = store_log;
    so.on_drop = store_dropped;
    so.ud = t;
    if (o->remote_url) {
        remote_opts ro = remote_default_opts();
        ro.url = o->remote_url;
        ro.model_hash = so.shape.model_fingerprint;
        ro.codec_hash = store_remote_codec_hash(&so);
        ro.ttl_s = o->remote_ttl_s;
        ro.budget_bytes = o->remote_budget;
        if (o->remote_timeout_ms > 0) ro.connect_timeout_ms = ro.command_timeout_ms = o->remote_timeout_ms;
        ro.log = store_log;
        ro.ud = t;
        int rrc = ro.codec_hash ? remote_open(&t->rem, &ro, err)
                                : kp_errf(err, KP_EIO, "cannot read the codec file '%s' to name its remote keys", o->codec);
        uint8_t secret[STORE_SECRET_BYTES]; /* the deployment's by now (http.c share_secret) */
        if (!rrc && !(rrc = store_secret(so.dir, secret, err))) remote_keep_secret(t->rem, secret, sizeof secret);
        sodium_memzero(secret, sizeof secret);
        if (rrc) remote_close(t->rem);
        if (rrc) {
            kp_backend_free(t->host_be);
            free(t);
            return rrc;
        }
        so.remote = t->rem;
        so.remote_policy = o->remote_policy;
        fprintf(stderr, "kvpark: sessions: remote tier %s (keys %s*), %s\n", o->remote_url, remote_prefix(t->rem),
                o->remote_policy == STORE_REMOTE_WRITE_BACK ? "write-back" : "write-through");
    }
    int rc = store_open(&t->st, &so, err);
    if (rc) {
        remote_close(t->rem);
        kp_backend_free(t->host_be);
        free(t);
        return rc;
    }
    t->per_key = t->o.n_keys <= 0 ? t->o.max_sessions
                 : t->o.max_sessions_per_key > 0 ? t->o.max_sessions_per_key
                 : KP_MAX(1, t->o.max_sessions / 4);
    /* the configured keys' owner ids, keyed and as older versions made them (migration) */
    if (o->n_keys > 0 && (t->key_new = calloc((size_t)o->n_keys * 2, sizeof *t->key_new))) {
        t->key_old = t->key_new + o->n_keys;
        int krc = sess_key_owners(o->dir, o->keys, o->n_keys, t->key_new, err);
        if (krc) {
            store_close(t->st);
            remote_close(t->rem);
            free(t->key_new);
            kp_backend_free(t->host_be);
            free(t);
            return krc;
        }
        for (int k = 0; k < o->n_keys; k++) t->key_old[k] = legacy_owner(o->keys[k]);
        t->n_key_ids = o->n_keys;
    }
    const char *legacy = getenv("KVPARK_TEST_LEGACY_OWNER");
    t->test_legacy = legacy && *legacy == '1';
    int n = load_index(t);
    log_over_caps(t);
    store_stats ss;
    store_get_stats(t->st, &ss);
    fprintf(stderr,
            "kvpark: sessions: %d parked in %s (codec %s); %llu quarantined, %llu foreign, %llu imported\n", n,
            o->dir, store_codec_name(t->st), (unsigned long long)ss.quarantined, (unsigned long long)ss.foreign,
            (unsigned long long)ss.imported);
    if (!t->host_kv)
        fprintf(stderr, "kvpark: sessions: the KV cache is in device memory: parked sessions are staged "
                        "through host memory\n");

    if (uv_loop_init(&t->loop) || uv_async_init(&t->loop, &t->wake, on_wake) || uv_timer_init(&t->loop, &t->timer)) {
        store_close(t->st);
        remote_close(t->rem);
        kp_backend_free(t->host_be);
        free(t->key_new);
        free(t);
        return kp_errf(err, KP_EIO, "cannot start the session parking loop (libuv)");
    }
    t->wake.data = t;
    t->timer.data = t;
    if (o->idle_park_s > 0 || o->session_ttl_s > 0) { /* one timer: idle parking and expiry */
        double every = 1.0;
        if (o->idle_park_s > 0) every = KP_MIN(every, o->idle_park_s / 4);
        if (o->session_ttl_s > 0) every = KP_MIN(every, o->session_ttl_s / 4);
        if (every < 0.02) every = 0.02;
        uv_timer_start(&t->timer, on_timer, (uint64_t)(every * 1e3), (uint64_t)(every * 1e3));
    }
    if (uv_thread_create(&t->thr, loop_main, t)) {
        uv_close((uv_handle_t *)&t->wake, NULL);
        uv_close((uv_handle_t *)&t->timer, NULL);
        uv_run(&t->loop, UV_RUN_DEFAULT);
        uv_loop_close(&t->loop);
        store_close(t->st);
        remote_close(t->rem);
        kp_backend_free(t->host_be);
        free(t->key_new);
        free(t);
        return kp_errf(err, KP_EIO, "cannot start the session parking thread");
    }
    t->uv_running = true;
    *out = t;
    return 0;
}

void sess_close(sess_table *t) {
    if (!t) return;
    if (t->uv_running) {
        atomic_store(&t->stopping, true);
        uv_async_send(&t->wake);
        uv_thread_join(&t->thr); /* returns once queued parks are done and the handles closed */
        uv_loop_close(&t->loop);
        t->uv_running = false;
    }
    /* Shutdown: every hot session with something new goes to disk. */
    int parked = 0, failed = 0;
    for (sess *x = t->list; x; x = x->next) {
        if (!x->seq || x->seq->n_tokens == 0 || (x->stored && !x->dirty)) continue;
        kp_err err = {0};
        if (store_hot(t, NULL, x, true, NULL, &err)) { /* the scheduler is stopped: copy here */
            failed++;
            fprintf(stderr, "kvpark: sessions: cannot save session %s at shutdown: %s\n", x->id, err.msg);
        } else {
            parked++;
        }
    }
    if (parked || failed)
        fprintf(stderr, "kvpark: sessions: %d hot sessions saved at shutdown, %d failed\n", parked, failed);
    store_close(t->st); /* flushes warm-only sessions */
    if (t->rem) { /* what is still queued for Redis: a few seconds to go out */
        if (remote_drain(t->rem, 5000))
            fprintf(stderr, "kvpark: sessions: the remote tier did not take every queued write before shutdown "
                            "(the local copies are durable)\n");
        remote_close(t->rem);
    }
    for (sess *x = t->list; x;) {
        sess *nx = x->next;
        sched_seq_free(x->seq);
        free(x);
        x = nx;
    }
    kp_backend_free(t->host_be);
    free(t->key_new);
    pthread_mutex_destroy(&t->mu);
    pthread_cond_destroy(&t->cv);
    free(t);
}

/* ---- the API -------------------------------------------------------------- */

int sess_create(sess_table *t, uint64_t owner, sess_info *info, kp_err *err) {
    sess *x = calloc(1, sizeof *x);
    if (!x) return kp_errf(err, KP_ENOMEM, "out of memory");
    if (store_new_id(x->id)) {
        free(x);
        return kp_errf(err, KP_EIO, "cannot draw a random session id");
    }
    x->owner = owner;
    x->last_use = unix_now();
    pthread_mutex_lock(&t->mu);
    if (t->n >= t->o.max_sessions) {
        int n = t->n;
        pthread_mutex_unlock(&t->mu);
        free(x);
        return kp_errf(err, KP_EBUSY,
                       "the server holds %d sessions, its limit (--max-sessions %d): delete sessions you no "
                       "longer need",
                       n, t->o.max_sessions);
    }
    if (t->o.n_keys > 0) {
        int mine = 0;
        for (sess *y = t->list; y; y = y->next) mine += y->owner == owner;
        if (mine >= t->per_key) {
            pthread_mutex_unlock(&t->mu);
            free(x);
            return kp_errf(err, KP_EBUSY,
                           "this API key holds %d sessions, its limit (--max-sessions-per-key %d): delete "
                           "sessions you no longer need",
                           mine, t->per_key);
        }
    }
    x->next = t->list;
    t->list = x;
    t->n++;
    if (info) info_locked(t, x, NULL, info);
    pthread_mutex_unlock(&t->mu);
    return 0;
}

sched_seq *sess_seq(sess *x) { return x->seq; }
const char *sess_id(const sess *x) { return x->id; }

int sess_acquire(sess_table *t, const char *id, uint64_t owner, bool owner_check, sess **out,
                 char from[STORE_TIER_MAX], double *ms, kp_err *err) {
    *out = NULL;
    if (ms) *ms = 0;
    sess *x = NULL;
    int grc = grab(t, id, owner, owner_check, &x, err);
    if (grc) return grc;
    if (x->seq) { /* hot */
        x->users++;
        x->last_use = unix_now();
        pthread_mutex_unlock(&t->mu);
        if (from) snprintf(from, STORE_TIER_MAX, "hot");
        *out = x;
        return 0;
    }
    bool stored = x->stored;
    x->state = SS_RESTORING;
    pthread_mutex_unlock(&t->mu);

    /* slow part, no lock held */
    double t0 = kp_now();
    char tier[STORE_TIER_MAX] = "empty";
    sched_seq *q = NULL;
    int32_t *tokens = NULL;
    int n_tokens = 0;
    bool recompute = false;
    kp_err why = {0};
    int rc = sched_seq_new(&q, t->o.m, t->o.kv_type, t->o.n_ctx, err);
    if (!rc) q->owner = owner; /* its jobs' owner (sched_job.owner): the caller passed the check */
    if (!rc && stored) {
        store_entry e;
        if (!store_stat(t->st, id, &e)) snprintf(tier, sizeof tier, "%s", e.tier);
        rc = store_load_meta(t->st, id, &n_tokens, &tokens, NULL, NULL, err);
        if (!rc && n_tokens > q->cap)
            rc = kp_errf(err, KP_ERANGE, "session %s holds %d tokens, more than the server's context of %d (-c)",
                         id, n_tokens, t->o.n_ctx);
        if (!rc && (rc = load_hot(t, id, q->kv, n_tokens, &why)) != 0) {
            if (kv_recomputable(rc)) { /* the token ids are here: the next job prefills them */
                kv_truncate(q->kv, 0);
                recompute = true;
                rc = 0;
            } else {
                kp_errf(err, rc, "%s", why.msg);
            }
        }
        if (!rc) {
            memcpy(q->tokens, tokens, sizeof *tokens * (size_t)n_tokens);
            q->n_tokens = n_tokens;
        }
    }
    free(tokens);
    double secs = kp_now() - t0;

    pthread_mutex_lock(&t->mu);
    x->state = SS_IDLE;
    pthread_cond_broadcast(&t->cv);
    if (rc) {
        sched_seq *drop = q;
        if (rc == KP_EFORMAT || rc == KP_ENOTFOUND) { /* the store has forgotten it */
            x->stored = false;
            if (!x->gone) unlink_locked(t, x);
        }
        unref(t, x);
        pthread_mutex_unlock(&t->mu);
        sched_seq_free(drop);
        event(t, "error", tier, secs);
        return rc;
    }
    x->seq = q;
    x->dirty = false;
    x->users++;
    x->last_use = unix_now();
    pthread_mutex_unlock(&t->mu);
    if (ms) *ms = secs * 1e3;
    if (recompute) {
        sess_log(t, "session %s: its KV cannot be restored from %s (%s); its %d tokens are recomputed by its "
                 "next request", id, tier, why.msg, n_tokens);
    }
    if (from) snprintf(from, STORE_TIER_MAX, "%s", recompute ? "recomputed" : tier);
    if (stored) event(t, recompute ? "recomputed" : "restore", tier, secs);
    kick(t); /* the hot tier grew */
    *out = x;
    return 0;
}

bool sess_restored(const char *from) {
    return strcmp(from, "hot") != 0 && strcmp(from, "empty") != 0 && strcmp(from, "recomputed") != 0;
}

void sess_release(sess_table *t, sess *x, bool used) {
    pthread_mutex_lock(&t->mu);
    x->users--;
    x->last_use = unix_now();
    x->retry_park = 0;
    if (used && x->seq) {
        x->dirty = true;
        x->n_tokens = x->seq->n_tokens;
    }
    unref(t, x);
    pthread_mutex_unlock(&t->mu);
    kick(t);
}

typedef struct save_call {
    sess_table *t;
    sess *x;
    store_save_stats *st;
    int rc;
    kp_err *err;
} save_call;

static void save_on_sched(void *ud) {
    save_call *c = ud;
    c->rc = store_hot(c->t, c->t->o.sch, c->x, true, c->st, c->err); /* on the scheduler thread: copies run here */
}

const char *sess_codec_name(sess_table *t) { return store_codec_name(t->st); }
void sess_codec_info(sess_table *t, store_codec_info *ci) { store_codec_get(t->st, ci); }
int sess_set_codec(sess_table *t, const char *name, kp_err *err) { return store_set_codec(t->st, name, err); }

int sess_save(sess_table *t, const char *id, uint64_t owner, bool owner_check, store_save_stats *st,
              sess_info *info, kp_err *err) {
    store_save_stats local = {0};
    if (!st) st = &local;
    memset(st, 0, sizeof *st);
    sess *x = NULL;
    int grc = grab(t, id, owner, owner_check, &x, err);
    if (grc) return grc;
    int rc = 0;
    if (x->seq && x->seq->n_tokens == 0) {
        rc = kp_errf(err, KP_EINVAL, "session %s is empty: send a request on it before saving it", id);
    } else if (x->seq && (x->dirty || x->users > 0 || !x->stored || !x->saved)) {
        /* users > 0: a request holds the KV and may have changed it; `dirty`
         * is only set when it lets go, so the stored copy cannot be trusted */
        bool busy = x->users > 0;
        x->state = SS_SAVING;
        pthread_mutex_unlock(&t->mu);
        if (busy) { /* a request is generating on it: save between two scheduler steps */
            save_call c = {.t = t, .x = x, .st = st, .err = err};
            rc = sched_call(t->o.sch, save_on_sched, &c);
            if (rc) rc = kp_errf(err, rc, "the server is shutting down");
            else rc = c.rc;
        } else {
            rc = store_hot(t, t->o.sch, x, true, st, err);
        }
        pthread_mutex_lock(&t->mu);
        x->state = SS_IDLE;
        pthread_cond_broadcast(&t->cv);
        if (!rc) {
            x->stored = x->saved = true;
            x->dirty = false;
            x->n_tokens = x->seq->n_tokens;
        }
    } else if (x->stored && !x->saved) { /* warm only: write it down */
        x->state = SS_SAVING;
        pthread_mutex_unlock(&t->mu);
        rc = store_flush(t->st, id, err);
        pthread_mutex_lock(&t->mu);
        x->state = SS_IDLE;
        pthread_cond_broadcast(&t->cv);
        if (!rc) x->saved = true;
    } else if (!x->stored) {
        rc = kp_errf(err, KP_EINVAL, "session %s is empty: send a request on it before saving it", id);
    }
    store_entry e;
    bool have_e = false;
    if (!rc && info) {
        pthread_mutex_unlock(&t->mu);
        have_e = store_stat(t->st, id, &e) == 0;
        pthread_mutex_lock(&t->mu);
        info_locked(t, x, have_e ? &e : NULL, info);
    }
    if (!rc && st->bytes_total == 0 && have_e) st->bytes_total = e.bytes;
    unref(t, x);
    pthread_mutex_unlock(&t->mu);
    if (!rc) event(t, "save", "cold", st->ms / 1e3);
    return rc;
}

int sess_delete(sess_table *t, const char *id, uint64_t owner, bool owner_check, kp_err *err) {
    sess *x = NULL;
    int grc = grab(t, id, owner, owner_check, &x, err);
    if (grc) return grc;
    if (x->users > 0) {
        unref(t, x);
        pthread_mutex_unlock(&t->mu);
        return kp_errf(err, KP_EBUSY, "session %s is in use by a running request; retry when it finishes", id);
    }
    bool stored = x->stored;
    unlink_locked(t, x);
    x->stored = false;
    pthread_mutex_unlock(&t->mu);
    int rc = stored ? store_delete(t->st, id, err) : 0;
    if (rc == KP_ENOTFOUND) rc = 0; /* dropped by the store meanwhile: gone either way */
    pthread_mutex_lock(&t->mu);
    unref(t, x);
    pthread_mutex_unlock(&t->mu);
    return rc;
}

int sess_get(sess_table *t, const char *id, uint64_t owner, bool owner_check, sess_info *info) {
    store_entry e;
    bool have_e = store_stat(t->st, id, &e) == 0;
    pthread_mutex_lock(&t->mu);
    sess *x = find_locked(t, id, owner, owner_check);
    if (x) info_locked(t, x, have_e ? &e : NULL, info);
    pthread_mutex_unlock(&t->mu);
    return x ? 0 : KP_ENOTFOUND;
}

static int by_id(const void *a, const void *b) {
    return strcmp(((const sess_info *)a)->id, ((const sess_info *)b)->id);
}

static const store_entry *entry_of(const store_entry *ents, size_t n, const char *id) {
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        int c = strcmp(ents[mid].id, id);
        if (!c) return &ents[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

int sess_list(sess_table *t, uint64_t owner, bool owner_check, sess_info **out, size_t *n_out) {
    *out = NULL;
    *n_out = 0;
    store_entry *ents = NULL;
    size_t n_ents = 0;
    if (store_list(t->st, &ents, &n_ents)) n_ents = 0;
    pthread_mutex_lock(&t->mu);
    sess_info *v = malloc(sizeof *v * (size_t)(t->n > 0 ? t->n : 1));
    size_t k = 0;
    if (v)
        for (sess *x = t->list; x; x = x->next)
            if (!owner_check || x->owner == owner) info_locked(t, x, entry_of(ents, n_ents, x->id), &v[k++]);
    pthread_mutex_unlock(&t->mu);
    free(ents);
    if (!v) return KP_ENOMEM;
    qsort(v, k, sizeof *v, by_id);
    *out = v;
    *n_out = k;
    return 0;
}

int sess_remote_stats(sess_table *t, remote_stats *st) {
    if (!t || !t->rem) return KP_ENOTFOUND;
    remote_get_stats(t->rem, st);
    return 0;
}

void sess_get_counts(sess_table *t, sess_counts *c) {
    memset(c, 0, sizeof *c);
    store_entry *ents = NULL;
    size_t n_ents = 0;
    if (store_list(t->st, &ents, &n_ents)) n_ents = 0;
    store_get_stats(t->st, &c->store);
    pthread_mutex_lock(&t->mu);
    for (sess *x = t->list; x; x = x->next) {
        if (x->seq) {
            c->n_hot++;
            c->hot_bytes += kv_bytes_reserved(x->seq->kv);
            continue;
        }
        const store_entry *e = x->stored ? entry_of(ents, n_ents, x->id) : NULL;
        if (!x->stored) c->n_empty++;
        else if (e && !strcmp(e->tier, "warm")) c->n_warm++;
        else c->n_cold++;
    }
    c->expired = t->n_expired;
    c->migrated = t->n_migrated;
    pthread_mutex_unlock(&t->mu);
    c->warm_bytes = c->store.warm_bytes;
    c->cold_bytes = c->store.cold_bytes;
    free(ents);
}

int sess_park_all(sess_table *t, kp_err *err) {
    int failed = 0;
    for (;;) {
        pthread_mutex_lock(&t->mu);
        sess *x = t->list;
        while (x && !(x->seq && x->state == SS_IDLE && x->users == 0)) x = x->next;
        if (!x) {
            pthread_mutex_unlock(&t->mu);
            break;
        }
        x->state = SS_PARKING;
        x->refs++;
        pthread_mutex_unlock(&t->mu);
        char tier[STORE_TIER_MAX];
        kp_err e = {0};
        double t0 = kp_now();
        int rc = park_one(t, x, tier, &e);
        park_finish(t, x, rc, &e);
        event(t, rc ? "error" : "park", tier, kp_now() - t0);
        if (rc) {
            failed++;
            if (err) *err = e;
            break; /* it stays hot: do not loop on it forever */
        }
    }
    return failed ? KP_EIO : 0;
}
