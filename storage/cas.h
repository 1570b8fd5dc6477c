/*
 * cas.h — the content-addressed chunk store behind parked sessions.
 *
 * Objects are immutable byte strings (a coded chunk group: one token range of
 * a session's KV, all layers, K and V, already encoded + LZ4'd by the caller)
 * named by a 128-bit key the caller derives from the content's identity
 * (model fingerprint, codec, token ids up to the range's end, layout): two
 * sessions that share a prefix produce the same keys and store the chunk
 * once. Each object has a reference count (how many session manifests use
 * it); objects at zero are collected.
 *
 * Tiers (each with a byte budget):
 *   warm  host RAM: an LRU map key -> bytes
 *   cold  a directory: DIR/objects/KK/KEYHEX.kvo files (KK = first key byte),
 *         each file = header (magic "KVPKOBJ1", key, length, XXH64 of the
 *         payload) + payload; written to a .tmp name, fsynced, renamed, the
 *         directory fsynced.
 * put() stores into warm (and, if `durable`, into cold before returning); when
 * warm exceeds its budget the least recently used objects are written down to
 * cold (if not already there) and dropped from RAM; when cold exceeds its
 * budget, unreferenced objects go first, then the least recently used — and
 * every drop of a referenced object is counted (cas_stats.dropped) and
 * reported through the log callback: never silent.
 * get() looks in warm, then cold (verifying the checksum; a bad file is moved
 * to DIR/quarantine and KP_EFORMAT returned naming the key), and promotes a
 * cold hit to warm.
 * cas_open() re-indexes DIR: good objects are known (refcounts are restored
 * by the session manifests that re-register them: cas_ref), torn .tmp files
 * are removed, corrupt files quarantined and counted.
 *
 * Thread-safe (one mutex; file I/O happens outside it where possible, so a
 * slow disk does not block warm hits).
 */
#ifndef KP_CAS_H
#define KP_CAS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"

typedef struct cas_key {
    uint64_t hi, lo;
} cas_key;

typedef struct cas cas;

typedef struct cas_opts {
    const char *dir;           /* cold tier directory (NULL: no cold tier) */
    uint64_t warm_budget;      /* bytes of payload in RAM (default 1 GiB) */
    uint64_t cold_budget;      /* bytes of payload on disk (default 0 = unlimited) */
    /* called (under no lock) for events worth a log line: "dropped", "quarantined", ... */
    void (*log)(void *ud, const char *msg);
    void *log_ud;
} cas_opts;

typedef struct cas_stats {
    uint64_t warm_bytes, cold_bytes;
    uint64_t warm_objects, cold_objects;
    uint64_t hits_warm, hits_cold, misses;
    uint64_t spilled;          /* objects written down warm -> cold */
    uint64_t dropped;          /* referenced objects dropped because cold was full */
    uint64_t collected;        /* unreferenced objects freed */
    uint64_t quarantined;      /* corrupt files moved aside */
    uint64_t tmp_removed;      /* torn writes removed at open */
} cas_stats;

/* The key of a content identity (XXH3-128 of the bytes). */
cas_key cas_key_of(const void *identity, size_t len);
void cas_key_hex(cas_key k, char out[33]);

cas_opts cas_default_opts(void);
int cas_open(cas **out, const cas_opts *o, kp_err *err);
void cas_close(cas *c);

/* Store bytes under key (no-op if present; its refcount is unchanged). With
 * durable = true the object is in the cold tier (fsynced) when this returns.
 * KP_EIO on a write failure (disk full): the warm copy stays, nothing is lost. */
int cas_put(cas *c, cas_key k, const void *data, size_t len, bool durable, kp_err *err);
/* cas_put plus cas_ref as one step: on success the object is stored and
 * referenced, with no moment in between when a collect or a budget could
 * drop it (an unreferenced new object is fair game for them); on failure no
 * reference is taken. */
int cas_put_ref(cas *c, cas_key k, const void *data, size_t len, bool durable, kp_err *err);
/* Copy of the object's bytes (malloc'd) into *data / *len. KP_ENOTFOUND if
 * absent from every tier, KP_EFORMAT if the cold copy is corrupt. */
int cas_get(cas *c, cas_key k, void **data, size_t *len, kp_err *err);
bool cas_has(cas *c, cas_key k);
/* Reference counting: a manifest that uses an object refs it; releasing the
 * last reference makes it collectable (cas_collect frees it from all tiers). */
int cas_ref(cas *c, cas_key k);
int cas_unref(cas *c, cas_key k);
uint64_t cas_refcount(cas *c, cas_key k);
/* Which tiers hold the object now: CAS_IN_WARM | CAS_IN_COLD, 0 if unknown. */
#define CAS_IN_WARM 1
#define CAS_IN_COLD 2
int cas_where(cas *c, cas_key k);
/* Make an object durable: write its warm copy down to the cold tier (file
 * fsynced, renamed, directory fsynced) unless it is there already; the warm
 * copy stays. 0 when the object is in cold on return; KP_ENOTFOUND if the
 * store does not hold it, KP_EINVAL without a cold tier, KP_EIO on a write
 * failure (the warm copy is kept; logged). */
int cas_persist(cas *c, cas_key k, kp_err *err);
size_t cas_collect(cas *c);
void cas_get_stats(cas *c, cas_stats *st);

#endif
