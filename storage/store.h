/*
 * store.h — the session store: where parked conversations (token ids, extra
 * bytes such as sampler state, KV cache) are saved, listed, restored and
 * deleted by id. The server's HTTP threads and the scheduler both call it.
 *
 * Today there is one tier, "disk": a directory of session blobs
 * (storage/blob.h), one file per session, named ID.kvps. The store is
 * written against a small tier interface (store_tier_ops in store.c: save,
 * load_meta, load_kv, remove, scan) so host-RAM and remote tiers, budgets and
 * spill/restore policy can be added without changing this API; entries
 * already carry the name of the tier that holds them.
 *
 * Contract
 *   - store_open creates DIR if needed and re-indexes it: every ID.kvps
 *     whose header validates and whose model fingerprint matches becomes an
 *     entry; files that fail validation are moved to DIR/quarantine/ (kept for
 *     inspection, counted in store_stats); blobs of other models are left in
 *     place and counted as foreign; leftover *.tmp files (torn writes) are
 *     deleted.
 *   - Ids are 1..64 characters of [A-Za-z0-9_-], checked before any file is
 *     touched (KP_EINVAL otherwise): no path traversal. store_new_id makes a
 *     22-character URL-safe base64 id of 128 random bits (getrandom).
 *   - store_save is durable when it returns 0 (blob_write: tmp, fsync,
 *     rename, fsync dir) and replaces an existing entry of the same id.
 *   - store_load_kv restores into kv (same rules as blob_read_kv: kv->n_pos
 *     changes only on success). A blob found corrupt at load time is moved to
 *     quarantine and its entry dropped.
 *   - All calls are thread-safe (one mutex per store; I/O happens under it,
 *     so calls on one store are serialised).
 */
#ifndef KP_STORE_H
#define KP_STORE_H

#include <stddef.h>
#include <stdint.h>

#include "../engine/kp.h"
#include "../engine/kv.h"
#include "blob.h"

#define STORE_ID_MAX 64
#define STORE_TIER_MAX 16

typedef struct store store;

/* What a session is made of, for store_save. */
typedef struct store_item {
    const int32_t *tokens; /* [n_tokens]; n_tokens must equal kv->n_pos */
    int n_tokens;
    const void *extra;     /* opaque (sampler state, server data), may be NULL */
    size_t extra_len;
    const kv_cache *kv;    /* rows 0 .. n_tokens-1 are saved */
    const char *codec;     /* NULL or "none" (only one today) */
    int chunk_tokens;      /* 0 = BLOB_CHUNK_TOKENS_DEFAULT */
} store_item;

typedef struct store_entry {
    char id[STORE_ID_MAX + 1];
    int n_tokens;
    uint64_t bytes;                 /* on the tier (file size) */
    int64_t mtime_unix_ms;          /* last save */
    char tier[STORE_TIER_MAX];      /* "disk" */
} store_entry;

typedef struct store_stats {
    size_t n_entries;
    uint64_t bytes;                 /* sum of entry bytes */
    size_t n_quarantined;           /* files moved to quarantine since open */
    size_t n_tmp_removed;           /* torn writes deleted at open */
    size_t n_foreign;               /* valid blobs of another model, left alone */
} store_stats;

int store_open(store **out, const char *dir, uint64_t model_fingerprint, kp_err *err);
void store_close(store *s);

/* 1 if id is well formed (1..64 chars of [A-Za-z0-9_-]). */
int store_id_valid(const char *id);
/* A fresh random id: 22 chars of URL-safe base64 + NUL. 0 or KP_EIO. */
int store_new_id(char out[23]);

int store_save(store *s, const char *id, const store_item *item, blob_stats *st, kp_err *err);
/* tokens / extra are malloc'd (caller frees); any of them may be NULL. */
int store_load_meta(store *s, const char *id, blob_meta *meta, int32_t **tokens, void **extra,
                    size_t *extra_len, kp_err *err);
int store_load_kv(store *s, const char *id, kv_cache *kv, kp_err *err);
/* KP_ENOTFOUND if there is no such session. */
int store_delete(store *s, const char *id, kp_err *err);
int store_has(store *s, const char *id);
/* Snapshot of the entries, sorted by id; *entries is malloc'd (free it). */
int store_list(store *s, store_entry **entries, size_t *n);
void store_get_stats(store *s, store_stats *st);

#endif
