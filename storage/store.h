/*
 * store.h — the tiered session store: where parked conversations live when
 * they are not hot. The server keeps hot sessions (a live KV cache
 * in the scheduler); everything below hot is this module.
 *
 *   warm   host RAM, compressed    (the cas RAM tier, --warm-budget)
 *   cold   disk, compressed        (DIR, --cold-dir / --session-dir, --cold-budget)
 *
 * A session in the store = a manifest (storage/park.h: token ids, codec,
 * layout, the content keys of its spans) + the server's opaque extra bytes,
 * and the span objects in the content-addressed chunk store (storage/cas.h)
 * under DIR/objects. Sessions sharing a prefix share those objects (stored
 * once, reference counted).
 *
 * Files, all little-endian, all written tmp + fsync + rename + fsync(dir):
 *   DIR/sessions/ID.kvpm    session record, format documented in store.c:
 *                           header (magic, version, lengths, XXH64), the
 *                           park manifest bytes (own checksum), extra bytes
 *                           (own XXH64).
 *   DIR/objects/KK/KEY.kvo  span objects (cas.h)
 *   DIR/quarantine/         corrupt files moved aside, never deleted
 *   DIR/codecs/HASH.kvcodec copies of the codec files sessions were parked
 *                           with (HASH: XXH3-64 of the file, 16 hex digits)
 *   DIR/owner.secret        32 random bytes, mode 0600: the key of the
 *                           server's owner ids (store_secret)
 *   DIR/ID.kvps             legacy v1 session blobs (storage/blob.h): imported
 *                           at open (parked with the store's codec, the blob
 *                           removed only after the import is durable).
 *
 * Contract
 *   - store_open() creates DIR (and its subdirectories) if needed, opens the
 *     chunk store, and re-indexes: every ID.kvpm whose header, checksums and
 *     model fingerprint validate, and whose codec the store can open (its own
 *     codec, or a built-in codec named by the manifest: none, fp16, int8, int4,
 *     kivi2) becomes a cold session and re-references its objects; a session
 *     whose objects are not all present has its record quarantined (counted,
 *     logged) and keeps its token ids (a tokens-only record, "KV lost" below);
 *     corrupt files are quarantined; records of another model or KV type are
 *     left in place and counted as foreign (logged once with what to do); a
 *     record of this model made with a codec file the store was not given is
 *     indexed tokens only ("KV lost": recomputed), its files left as they
 *     are until the session is saved again; leftover *.tmp files are removed; then
 *     unreferenced objects are collected.
 *   - Ids: 1..64 characters of [A-Za-z0-9_-], checked before any file is
 *     touched (KP_EINVAL otherwise). store_new_id: 22 chars, 128 random bits.
 *   - store_save(durable = true): the span objects are in the cold tier and
 *     the record is fsynced and renamed into place when it returns 0: the save
 *     may be acknowledged. store_save(durable = false): the objects go to the
 *     warm tier (and are spilled down when warm is over budget) and the record
 *     is kept in RAM; store_flush() or store_close() makes it durable.
 *     Either way a save replaces the id's previous version atomically (the old
 *     version's references are released only after the new one is in place)
 *     and a failure (KP_ENOSPC: disk full, quota or file-size limit; KP_EIO)
 *     leaves the previous version intact.
 *   - Budgets: the warm tier holds at most warm_budget bytes of objects (LRU
 *     objects are written down to cold). The cold tier holds at most
 *     cold_budget bytes (0 = unlimited): over it, whole sessions are dropped,
 *     least recently used first, never a session that is pinned (being read)
 *     and never the one just saved; every drop is counted
 *     (store_stats.dropped) and reported through opts.log and opts.on_drop.
 *   - store_load_kv() restores the session's KV rows into kv (kv->n_pos is
 *     changed only on success; kv must have the store's shape and room).
 *   - KV lost: a missing or corrupt object (found at open or by a load), an
 *     object the remote tier evicted, or a codec the store was not given
 *     (found at open; nothing is quarantined then), fails the load with KP_ELOST and a
 *     message naming the session; the session's record is moved to
 *     quarantine (the evidence), its references are released, and it stays
 *     indexed with its token ids and extra bytes only (a tokens-only record
 *     in place of the old one when that was on disk), so the caller can
 *     recompute the KV from the tokens (load_meta still works; load_kv keeps
 *     answering KP_ELOST until the next save, an ordinary version again).
 *     Other sessions are untouched, except those that shared the corrupt
 *     object, which are found the same way when loaded. Only a record whose
 *     token ids cannot be read is forgotten.
 *   - store_load_kv_begin/_layer/_end: the same restore, layer by layer, so a
 *     caller can start using layer l while deeper layers are still decoding
 *     (pipelined resume). See the functions.
 *   - store_delete() removes the record and releases its objects.
 *   - Codec files are kept: every codec file the store parks with is copied
 *     to DIR/codecs/HASH.kvcodec (durable, before its first save), and every
 *     file there of this model is opened at open, so sessions parked with an
 *     earlier codec stay readable when the original file is gone or the
 *     server is given another --codec (store_set_codec switches at run time).
 *   - Remote tier (opts.remote, storage/remote.h; store_remote.c): under
 *     write-through (the default) every save is also queued for Redis (record
 *     + objects; never blocking the caller); under write-back a session goes
 *     there when the cold budget drops it here. An id this store does not
 *     hold is looked up in Redis by load_meta / load_kv / delete: found, it is
 *     indexed as tier "remote" and its first restore brings its objects here
 *     (then it is a warm session). Redis unreachable: those calls are
 *     KP_EUNAVAIL and change nothing; calls on local sessions never wait on it.
 *     An object evicted or corrupt in Redis: the load is KP_ELOST (above).
 *     store_delete queues the
 *     delete for Redis too, so no replica resumes a deleted session; a drop
 *     by the cold budget does not (Redis keeps the session).
 *   - All calls are thread-safe. The index mutex is never held during file
 *     I/O, encoding or decoding: a slow disk does not block other sessions'
 *     calls. Concurrent calls on the SAME id are serialised by the store.
 */
#ifndef KP_STORE_H
#define KP_STORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "compress/codec.h"
#include "kernels/kp.h"
#include "engine/kv.h"
#include "storage/park.h"
#include "storage/remote.h"

#define STORE_ID_MAX 64
#define STORE_TIER_MAX 16

typedef struct store store;

typedef struct store_opts {
    const char *dir;            /* cold tier directory (required) */
    codec_shape shape;          /* the model's KV shape + fingerprint (codec_shape) */
    int kv_type;                /* element type of the caches saved (KP_TYPE_F32/F16/BF16) */
    const char *codec;          /* codec for new saves: a built-in name or a codec file (NULL: "none") */
    park_layout layout;         /* lossless sink/window, chunk rows (park_default_layout()) */
    uint64_t warm_budget;       /* bytes (default 1 GiB) */
    uint64_t cold_budget;       /* bytes (0 = unlimited) */
    void (*log)(void *ud, const char *msg);         /* events worth a log line */
    void (*on_drop)(void *ud, const char *id);      /* a session was dropped (budget / corrupt) */
    void *ud;
    remote *remote;             /* the shared tier below cold (storage/remote.h), NULL: none;
                                 * not owned: close it after store_close */
    int remote_policy;          /* STORE_REMOTE_WRITE_THROUGH (default) or _WRITE_BACK */
} store_opts;

/* How saves reach the remote tier (store_opts.remote_policy):
 *   WRITE_THROUGH  every save is queued for Redis as it is made (the default:
 *                  any replica can resume a conversation the moment its save
 *                  is acknowledged, and a replica that dies loses nothing);
 *   WRITE_BACK     a session goes to Redis only when the cold budget drops it
 *                  here (less Redis traffic and memory; another replica sees
 *                  a session only once this one let it go). */
enum { STORE_REMOTE_WRITE_THROUGH = 0, STORE_REMOTE_WRITE_BACK = 1 };

/* The codec part of the remote key prefix (remote_opts.codec_hash) for a
 * store opened with o: the codec's identity (a built-in's name, a codec
 * file's content hash) and the KV element type, so replicas share exactly
 * the sessions they can decode. 0 if a codec file cannot be read. */
uint64_t store_remote_codec_hash(const store_opts *o);

/* What a session is made of, for store_save. */
typedef struct store_item {
    const int32_t *tokens; /* [n_tokens]; n_tokens must equal kv->n_pos, >= 1 */
    int n_tokens;
    const void *extra;     /* opaque (sampler state, server data), may be NULL */
    size_t extra_len;      /* <= 1 MiB */
    const kv_cache *kv;    /* rows 0 .. n_tokens-1 are saved */
    uint64_t scope;        /* spans are shared only with sessions of the same scope
                            * (park_save_scoped: the server passes the owner); 0: all */
} store_item;

typedef struct store_entry {
    char id[STORE_ID_MAX + 1];
    int n_tokens;
    uint64_t bytes;                 /* bytes of its objects + record */
    int64_t mtime_unix_ms;          /* last save */
    char tier[STORE_TIER_MAX];      /* "warm" (every object in RAM), "cold", or "remote"
                                     * (known from the remote tier; nothing local yet) */
    bool durable;                   /* record and objects are on disk */
    bool kv_lost;                   /* only its token ids are left: store_load_kv is KP_ELOST */
} store_entry;

typedef struct store_save_stats {
    uint64_t bytes_new;      /* object bytes this save added */
    uint64_t bytes_total;    /* object bytes the session uses */
    uint64_t fp16_bytes;     /* what the KV would take as fp16 */
    int spans_reused;        /* spans already stored (shared prefix / previous save) */
    double ms;
    const char *codec;       /* the codec this save parked with (lives until store_close);
                                NULL when nothing was written */
} store_save_stats;

typedef struct store_stats {
    size_t n_entries;
    size_t n_warm, n_cold;          /* by tier as in store_entry.tier */
    uint64_t warm_bytes, cold_bytes;/* object bytes per tier (cas_stats) */
    uint64_t saves, loads;
    uint64_t dropped;               /* sessions dropped: cold tier over budget */
    uint64_t quarantined;           /* records + objects moved to quarantine since open */
    uint64_t tmp_removed;           /* torn writes removed at open */
    uint64_t foreign;               /* records of another model / KV type, left alone */
    uint64_t imported;              /* legacy v1 blobs imported at open */
    uint64_t io_errors;             /* failed writes (disk full, ...) */
    uint64_t kv_lost;               /* sessions whose KV was found unreadable (token ids kept) */
    /* what the saves since open stored, summed (store_save_stats): the KV at
     * fp16, its coded objects (shared spans counted in every save using them:
     * the codec's ratio is fp16 / coded) and the object bytes that were new */
    uint64_t saved_fp16_bytes, saved_coded_bytes, saved_new_bytes;
} store_stats;

store_opts store_default_opts(void);
int store_open(store **out, const store_opts *o, kp_err *err);
/* Makes every warm-only session durable (errors logged), then frees. */
void store_close(store *s);

/* 1 if id is well formed (1..64 chars of [A-Za-z0-9_-]). */
int store_id_valid(const char *id);
/* A fresh random id: 22 chars of URL-safe base64 + NUL. 0 or KP_EIO. */
int store_new_id(char out[23]);
/* 1 if name is a built-in codec (none, fp16, int8, int4, kivi2), which
 * parks with the layout given in store_opts; 0 for anything else (a codec
 * file, which brings the layout it was calibrated with). */
int store_codec_builtin(const char *name);
/* The codec new saves use ("none", "int8", or the codec file's name; the
 * string lives until store_close). */
const char *store_codec_name(store *s);
/* From now on new saves park with codec `name` (a built-in or a codec file
 * of this model, parked with the layout the file carries): the file is kept
 * in DIR/codecs first (so its sessions stay readable after it is gone), then
 * the switch is made; saves already encoding finish with the codec they
 * started with. Sessions parked earlier keep decoding with their own codec.
 * KP_EUNSUP with a remote tier (its keys are named by one codec, shared by
 * every replica); the codec_open errors for a bad file (another model's:
 * KP_EMISMATCH). On error nothing changes. */
int store_set_codec(store *s, const char *name, kp_err *err);
/* What new saves park with, for GET /v1/codec. Strings live until store_close. */
typedef struct store_codec_info {
    const char *name;      /* a built-in's name or the codec file's basename */
    const char *kind;      /* codec kind: none, fp16, int8, int4, kivi2, pca, learned */
    uint64_t file_hash;    /* XXH3-64 of the codec file (its DIR/codecs/HASH.kvcodec); 0: built-in */
    park_layout layout;    /* lossless sink and window rows, chunk rows */
    int n_files;           /* codec files this store decodes with (kept in DIR/codecs) */
} store_codec_info;
void store_codec_get(store *s, store_codec_info *ci);

int store_save(store *s, const char *id, const store_item *item, bool durable, store_save_stats *st,
               kp_err *err);
/* Make a warm-only session durable (no-op if it already is). */
int store_flush(store *s, const char *id, kp_err *err);
/* tokens / extra are malloc'd (caller frees); any out pointer may be NULL. */
int store_load_meta(store *s, const char *id, int *n_tokens, int32_t **tokens, void **extra,
                    size_t *extra_len, kp_err *err);
int store_load_kv(store *s, const char *id, kv_cache *kv, kp_err *err);

/* Pipelined restore. begin() fetches and verifies every object of the
 * session (all I/O and checksums happen here: after it returns 0 only
 * decoding remains, which cannot fail on verified data); layer(l) decodes
 * layer l's rows into kv (call for l = 0, 1, ..., n_layer-1, in order, from
 * one thread); end() sets kv->n_pos (if every layer was decoded) and frees
 * the handle. A handle abandoned midway (end() before the last layer)
 * leaves kv->n_pos unchanged. */
typedef struct store_restore store_restore;
int store_load_kv_begin(store *s, const char *id, kv_cache *kv, store_restore **out, kp_err *err);
int store_load_kv_layer(store_restore *r, int layer, kp_err *err);
void store_load_kv_end(store_restore *r);

/* Replace the server's extra bytes of a stored session (the KV and tokens
 * stay): a durable session's record is rewritten durably (tmp + fsync +
 * rename) before it returns 0; on failure the previous record is intact.
 * KP_ENOTFOUND if there is no such session. */
int store_set_extra(store *s, const char *id, const void *extra, size_t extra_len, kp_err *err);

/* The store directory's secret: STORE_SECRET_BYTES random bytes in
 * DIR/STORE_SECRET_FILE, mode 0600, drawn (libsodium randombytes_buf) on the
 * first call for a directory (DIR is created if needed) and read on every
 * later one. The server keys its owner ids with it (server/sessions.h), so
 * what is on disk cannot be brute-forced back to API keys without it. A
 * damaged secret (wrong size) is KP_EFORMAT and never replaced: replacing it
 * would orphan every stored session. A group/world-readable one is narrowed
 * to 0600. */
#define STORE_SECRET_BYTES 32
#define STORE_SECRET_FILE "owner.secret"
int store_secret(const char *dir, uint8_t out[STORE_SECRET_BYTES], kp_err *err);

/* With a remote tier, every replica must key owner ids alike: the first
 * replica's secret goes to Redis (remote_share_secret) and a later one whose
 * DIR secret differs takes the deployment's, written durably into DIR --
 * unless DIR already holds sessions keyed with its own (KP_EMISMATCH, with
 * what to do). KP_EBUSY if Redis cannot be reached. */
int store_secret_share(const char *dir, remote *r, kp_err *err);

/* KP_ENOTFOUND if there is no such session. */
int store_delete(store *s, const char *id, kp_err *err);
int store_has(store *s, const char *id);
/* One entry (KP_ENOTFOUND if none). */
int store_stat(store *s, const char *id, store_entry *e);
/* Snapshot of the entries, sorted by id; *entries is malloc'd (free it). */
int store_list(store *s, store_entry **entries, size_t *n);
void store_get_stats(store *s, store_stats *st);
/* The chunk store under the session store (owned by s; for tests and
 * metrics: cas_refcount, cas_get_stats). */
cas *store_cas(store *s);

#endif
