/*
 * store_impl.h — what store.c and store_legacy.c share: the record
 * constants, the index entry and the store itself, and the few internal
 * helpers the legacy import calls. Internal to storage/: nothing outside the
 * store includes it (the contract is store.h).
 *
 * Thread rules are store.c's (its top comment): the index and every entry's
 * fields are guarded by store.mu; store_find needs mu held, or the store
 * still private to store_open (the legacy import runs there).
 */
#ifndef KP_STORE_IMPL_H
#define KP_STORE_IMPL_H

#include <pthread.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "storage/cas.h"
#include "storage/park.h"
#include "storage/store.h"

#define STORE_REC_MAGIC "KVPKSREC"
#define STORE_REC_VERSION 1u
#define STORE_REC_HDR 64u
#define STORE_REC_EXT ".kvpm"
#define STORE_TMP_EXT ".tmp"
#define STORE_LEGACY_EXT ".kvps"
#define STORE_EXTRA_MAX (1u << 20)
/* Largest record a reader accepts: header + manifest of 2^24 tokens + extra. */
#define STORE_REC_MAX ((uint64_t)STORE_REC_HDR + 136u + 36ull * ((1u << 24) + 3u) + STORE_EXTRA_MAX)
#define STORE_DIR_MAX 3800 /* so every path fits in STORE_PATH_MAX */
#define STORE_PATH_MAX 4096
#define STORE_DEFAULT_WARM (1ull << 30)

static const char *const store_builtin_codecs[] = {"none", "fp16", "int8", "int4", "kivi2"};
#define STORE_N_BUILTIN ((int)KP_ARRAY_LEN(store_builtin_codecs))

typedef struct store_sess {
    char id[STORE_ID_MAX + 1];
    bool has_data;        /* false: a placeholder held by a first save */
    bool busy;            /* a call works on this id (others wait on cv) */
    bool dead;            /* removed from the index while pinned */
    int pins;             /* restores in flight (begin .. end) */
    park_manifest man;    /* current version; its references are held */
    const codec *cc;      /* decodes man (the store's codec or a built-in) */
    uint8_t *extra;       /* [extra_len], malloc'd (1 byte when empty) */
    size_t extra_len;
    bool durable;         /* man's record is on disk and its objects are cold */
    bool has_old;         /* !durable and the previous durable version is kept: */
    park_manifest old;    /*   its record file is still DIR/sessions/ID.kvpm */
    uint64_t obj_bytes;   /* bytes of man's objects */
    uint64_t rec_bytes;   /* bytes of man's record */
    int64_t mtime_ms;     /* last save */
    uint64_t lru;         /* tick of last use (larger = more recent) */
    bool remote_only;     /* man was read from the remote tier and holds no references:
                           * its objects are fetched into the chunk store by the first
                           * restore (then it is an ordinary warm session) */
} store_sess;

/* One codec of the registry (store.c "codecs"). */
typedef struct store_codec {
    codec *c;
    uint64_t hash;         /* XXH3-64 of the codec file (park_codec_hash); 0 for built-ins */
    char label[64];        /* what manifests name: built-in name or the file's basename */
    park_layout layout;    /* the layout saves with it use (a file's own, or store_opts') */
} store_codec;

struct store {
    pthread_mutex_t mu;
    pthread_cond_t cv;     /* an entry stopped being busy / the evictor finished */
    store_opts o;          /* o.dir and o.codec point at our copies */
    char *dir, *sess_dir, *q_dir;
    cas *cas;
    store_codec *cur;      /* the codec of new saves (read and swapped with mu held:
                              store_set_codec changes it while the store is open) */
    store_codec **codecs;  /* [n_codecs] every codec this store decodes with: the codec
                              files it was given or has kept in DIR/codecs, and the
                              built-ins opened so far; never freed before store_close,
                              so a session's cc stays valid */
    size_t n_codecs;
    store_sess **v;        /* [n] the index */
    size_t n, cap;
    uint64_t tick;
    bool evicting;         /* an enforce_cold is running */
    atomic_ullong qseq;    /* quarantine name sequence */
    store_stats st;        /* store's own counters (cas's added by get_stats) */
};

typedef struct open_ctx {
    uint64_t foreign_model, foreign_codec, foreign_type; /* what to tell the operator */
} open_ctx;

/* A log line (call with mu NOT held). */
void store_logf(const store *s, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* Move path (whose file name is name) to DIR/quarantine/NAME.<ms>.<seq>,
 * never over earlier evidence. 0 on success, -1 with errno. */
int store_quarantine_file(store *s, const char *path, const char *name);
/* The index entry of id, or NULL (mu held). */
store_sess *store_find(const store *s, const char *id);
/* store_save without the public argument checks' wrapper (store.c). */
int store_save_impl(store *s, const char *id, const store_item *it, bool durable, store_save_stats *st,
                    kp_err *err);
/* Parse and check a session record's bytes (format at the top of store.c):
 * 0 and *m, *extra (malloc'd, >= 1 byte), *extra_len, *mtime; else KP_EFORMAT
 * (KP_EUNSUP for a version) with the reason. Also the entry point of the fuzz
 * target tests/fuzz/fuzz_store_record.c. */
int store_rec_parse(const uint8_t *b, size_t len, park_manifest *m, uint8_t **extra,
                    size_t *extra_len, int64_t *mtime, kp_err *err);
/* Record bytes of a version (malloc'd), the format at the top of store.c. */
int store_rec_build(const park_manifest *m, const uint8_t *extra, size_t extra_len, int64_t mtime,
                    uint8_t **out, size_t *len, kp_err *err);
/* The codec that decodes manifests like m, or NULL (foreign). mu held. */
const codec *store_codec_for(store *s, const park_manifest *m);
/* Whether this store can use a record's manifest: 0 and *cc its codec, or
 * why not (*cc NULL): another model, KV type or codec. mu held or at open. */
enum { STORE_FOREIGN_MODEL = 1, STORE_FOREIGN_TYPE, STORE_FOREIGN_CODEC };
int store_foreign(store *s, const park_manifest *m, const codec **cc);
/* True for a tokens-only manifest: token ids, no spans (its KV was lost). */
bool store_kv_lost(const park_manifest *m);
/* Per-id serialisation (mu held): wait until no call works on id, mark it
 * busy and return its entry, or (create) a new placeholder, or NULL. */
store_sess *store_sess_acquire(store *s, const char *id, bool create);
/* The busy holder is done with e; a placeholder that never got data goes. */
void store_sess_release(store *s, store_sess *e);
/* Release a manifest's references and free it (mu NOT held). */
void store_release_manifest(store *s, park_manifest *m);
/* Take a busy entry out of the index, handing its versions to the caller to
 * release with mu NOT held. mu held. */
void store_sess_forget(store *s, store_sess *e, park_manifest *man, park_manifest *old);

/* ---- the remote tier (store_remote.c); every one with mu NOT held ---- */
/* Queue version (m, extra, mtime) of id for Redis: the record, and with
 * with_objects the bytes of every span object (read from the chunk store).
 * Never blocks on Redis; a refused job is logged (the local copy stays). */
void store_remote_push(store *s, const char *id, const park_manifest *m, const uint8_t *extra,
                       size_t extra_len, int64_t mtime, bool with_objects);
/* id is not in the index: read its record from Redis and index it as a
 * remote-only entry. 0, KP_ENOTFOUND (not there either), KP_EUNAVAIL (Redis
 * unreachable: the caller cannot tell), KP_EFORMAT (a record that does not
 * check out, or of a model / codec this store cannot use). */
int store_remote_adopt(store *s, const char *id, kp_err *err);
/* e (busy, ours) is remote-only: bring every object of its manifest into
 * the chunk store (warm) and take the references; then it is local.
 * KP_ENOTFOUND / KP_EFORMAT: an object evicted or damaged in Redis;
 * KP_EUNAVAIL: Redis unreachable. On failure no reference is left. */
int store_remote_fetch(store *s, store_sess *e, kp_err *err);

/* The id of a file name ID + ext, or false. */
bool store_id_of(const char *name, const char *ext, char id[STORE_ID_MAX + 1]);
/* Import every DIR/ID.kvps (legacy v1 blob) as a durable session, then remove
 * it (store_legacy.c). Runs inside store_open, before the store is shared. */
void store_import_legacy(store *s, open_ctx *oc);

#endif
