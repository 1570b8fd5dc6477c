/*
 * cas.c — the content-addressed chunk store (contract in cas.h).
 *
 * One record per known object (cas_obj) lives in a chained hash map keyed by
 * the 128-bit key. A record may hold a warm copy (data != NULL), may have a
 * cold file (in_cold), or both; it is on the warm LRU list while it has a
 * warm copy and on the cold LRU list while it has a file (head = most
 * recently used). A record that has neither is freed.
 *
 * Locking: one mutex guards every record, list and counter. File writes and
 * reads, and copies of large payloads, happen with the mutex released; a
 * record being worked on is "pinned" (pins > 0), which keeps it alive and
 * keeps eviction and collection away from its bytes and its file. A record
 * whose file is being written has `writing` set; a second writer of the same
 * key waits on the condition variable. Small metadata operations (unlink,
 * rename into quarantine) are done under the mutex so they cannot race a
 * writer of the same name.
 *
 * Cold file DIR/objects/KK/KEYHEX.kvo, little-endian:
 *   0  magic "KVPKOBJ1"        8 bytes
 *   8  version (1)             u32
 *   12 header bytes (56)       u32
 *   16 key.hi, key.lo          u64, u64
 *   32 payload length          u64
 *   40 XXH64 of the payload    u64 (seed 0)
 *   48 XXH64 of bytes [0, 48)  u64 (seed 0)
 *   56 payload
 * Re-indexing at open checks the header and the file size only; the payload
 * checksum is verified lazily by every cold read.
 *
 * Log messages are queued while the mutex is held and handed to the log
 * callback after it is released (the callback may call back into the store).
 */
#include "storage/fsutil.h"
#include "storage/cas.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

#define CAS_MAGIC "KVPKOBJ1"
#define CAS_VERSION 1u
#define CAS_HDR_BYTES 56u
#define CAS_EXT ".kvo"
#define CAS_TMP_EXT ".tmp"
#define CAS_DIR_MAX 3800 /* longest DIR accepted, so every path fits in CAS_PATH_MAX */
#define CAS_PATH_MAX 4096
#define CAS_DEFAULT_WARM (1ull << 30)
#define CAS_LOGQ_MAX 32

enum { CAS_WARM = 0, CAS_COLD = 1 };

typedef struct cas_obj cas_obj;

typedef struct cas_link {
    cas_obj *prev, *next;
} cas_link;

typedef struct cas_list {
    cas_obj *head, *tail; /* head = most recently used */
} cas_list;

struct cas_obj {
    cas_key key;
    uint64_t len;      /* payload bytes */
    uint64_t refs;     /* manifests using it (RAM only) */
    uint8_t *data;     /* warm copy [len], or NULL */
    bool in_cold;      /* a published, complete file exists */
    bool writing;      /* its file is being written (always pinned then) */
    int pins;          /* in-flight operations holding this record */
    cas_obj *hnext;    /* hash chain */
    cas_link link[2];  /* [CAS_WARM], [CAS_COLD] */
};

struct cas {
    pthread_mutex_t mu;
    pthread_cond_t cv;    /* signalled when a write finishes */
    char *dir;            /* NULL: no cold tier */
    uint64_t warm_budget, cold_budget;
    void (*log)(void *ud, const char *msg);
    void *log_ud;

    cas_obj **buckets;    /* [n_buckets], n_buckets a power of two */
    size_t n_buckets, n_objs;
    cas_list lru[2];      /* [CAS_WARM], [CAS_COLD] */
    uint64_t quarantine_seq;
    cas_stats st;
};

/* Messages gathered under the lock, emitted after it is released. */
typedef struct cas_logq {
    char *msg[CAS_LOGQ_MAX];
    int n, lost;
} cas_logq;

/* ---- small helpers -------------------------------------------------------- */

static void logq_add(const cas *c, cas_logq *q, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void logq_add(const cas *c, cas_logq *q, const char *fmt, ...) {
    if (!c->log || !q) return;
    if (q->n == CAS_LOGQ_MAX) {
        q->lost++;
        return;
    }
    char buf[KP_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    char *m = strdup(buf);
    if (m) q->msg[q->n++] = m;
    else q->lost++;
}

/* Call with the mutex NOT held. */
static void logq_flush(const cas *c, cas_logq *q) {
    for (int i = 0; i < q->n; i++) {
        if (c->log) c->log(c->log_ud, q->msg[i]);
        free(q->msg[i]);
    }
    if (q->lost && c->log) {
        char buf[96];
        snprintf(buf, sizeof buf, "cas: %d more events not logged", q->lost);
        c->log(c->log_ud, buf);
    }
    q->n = q->lost = 0;
}

cas_key cas_key_of(const void *identity, size_t len) {
    XXH128_hash_t h = XXH3_128bits(identity, len);
    return (cas_key){h.high64, h.low64};
}

void cas_key_hex(cas_key k, char out[33]) {
    snprintf(out, 33, "%016llx%016llx", (unsigned long long)k.hi, (unsigned long long)k.lo);
}

static bool key_eq(cas_key a, cas_key b) { return a.hi == b.hi && a.lo == b.lo; }

cas_opts cas_default_opts(void) {
    cas_opts o;
    memset(&o, 0, sizeof o);
    o.warm_budget = CAS_DEFAULT_WARM;
    return o;
}

/* ---- paths and files ---------------------------------------------------- */

/* DIR/objects/KK/KEYHEX.kvo (+ ".tmp" if tmp). */
static void obj_path(const cas *c, cas_key k, bool tmp, char out[CAS_PATH_MAX]) {
    char hex[33];
    cas_key_hex(k, hex);
    snprintf(out, CAS_PATH_MAX, "%s/objects/%.2s/%s%s%s", c->dir, hex, hex, CAS_EXT,
             tmp ? CAS_TMP_EXT : "");
}

static void make_header(uint8_t h[CAS_HDR_BYTES], cas_key k, const void *data, uint64_t len) {
    memset(h, 0, CAS_HDR_BYTES);
    memcpy(h, CAS_MAGIC, 8);
    kp_put_u32(h + 8, CAS_VERSION);
    kp_put_u32(h + 12, CAS_HDR_BYTES);
    kp_put_u64(h + 16, k.hi);
    kp_put_u64(h + 24, k.lo);
    kp_put_u64(h + 32, len);
    kp_put_u64(h + 40, XXH64(data, (size_t)len, 0));
    kp_put_u64(h + 48, XXH64(h, 48, 0));
}

/* Check a header against a file of file_size bytes; fills *k, *len. NULL if
 * good, else a short reason. */
static const char *check_header(const uint8_t h[CAS_HDR_BYTES], uint64_t file_size, cas_key *k,
                                uint64_t *len) {
    if (memcmp(h, CAS_MAGIC, 8) != 0) return "bad magic";
    if (kp_get_u64(h + 48) != XXH64(h, 48, 0)) return "header checksum mismatch";
    if (kp_get_u32(h + 8) != CAS_VERSION) return "unsupported version";
    if (kp_get_u32(h + 12) != CAS_HDR_BYTES) return "bad header size";
    k->hi = kp_get_u64(h + 16);
    k->lo = kp_get_u64(h + 24);
    *len = kp_get_u64(h + 32);
    if (*len > file_size - CAS_HDR_BYTES || file_size - CAS_HDR_BYTES != *len)
        return "file size does not match the payload length (truncated or extended)";
    return NULL;
}

/* Write the object's file durably: tmp, fsync, rename, fsync the directory
 * (and the objects directory if KK was just created). No lock held. */
static int write_object(const cas *c, cas_key k, const void *data, uint64_t len, kp_err *err) {
    char path[CAS_PATH_MAX], tmp[CAS_PATH_MAX], kdir[CAS_PATH_MAX], odir[CAS_PATH_MAX], hex[33];
    cas_key_hex(k, hex);
    obj_path(c, k, false, path);
    obj_path(c, k, true, tmp);
    snprintf(odir, sizeof odir, "%s/objects", c->dir);
    snprintf(kdir, sizeof kdir, "%s/objects/%.2s", c->dir, hex);
    bool created = false;
    if (mkdir(kdir, 0755) == 0) created = true;
    else if (errno != EEXIST)
        return kp_errf(err, fs_write_errcode(errno), "cas: cannot create '%s' for object %s: %s (the warm copy is "
                       "kept)", kdir, hex, strerror(errno));
    uint8_t h[CAS_HDR_BYTES];
    make_header(h, k, data, len);
    const char *what;
    if (fs_write_replace(tmp, path, h, sizeof h, data, (size_t)len, &what))
        return kp_errf(err, fs_write_errcode(errno), "cas: cannot store object %s (%llu bytes): %s of '%s' failed: "
                       "%s (the warm copy is kept)", hex, (unsigned long long)len, what, tmp,
                       strerror(errno));
    if (fs_fsync_dir(kdir) || (created && fs_fsync_dir(odir)))
        return kp_errf(err, KP_EIO, "cas: object %s written but fsync of its directory failed: %s",
                       hex, strerror(errno));
    return 0;
}

/* Read and verify the object's file; *out is malloc'd [*out_len]. No lock
 * held. KP_ENOTFOUND if the file is gone, KP_EFORMAT if corrupt. */
static int read_object(const cas *c, cas_key k, uint8_t **out, uint64_t *out_len, kp_err *err) {
    char path[CAS_PATH_MAX], hex[33];
    cas_key_hex(k, hex);
    obj_path(c, k, false, path);
    *out = NULL;
    *out_len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return kp_errf(err, KP_ENOTFOUND, "cas: object %s: its file '%s' is gone", hex, path);
        return kp_errf(err, KP_EIO, "cas: cannot open '%s': %s", path, strerror(errno));
    }
    struct stat sb;
    int rc = 0;
    uint8_t h[CAS_HDR_BYTES];
    uint8_t *buf = NULL;
    if (fstat(fd, &sb)) {
        rc = kp_errf(err, KP_EIO, "cas: cannot stat '%s': %s", path, strerror(errno));
        goto out;
    }
    ssize_t got = fs_pread_all(fd, h, sizeof h, 0);
    if (got < 0) {
        rc = kp_errf(err, KP_EIO, "cas: cannot read '%s': %s", path, strerror(errno));
        goto out;
    }
    if ((size_t)got < sizeof h) {
        rc = kp_errf(err, KP_EFORMAT, "cas: object %s is corrupt: file of %lld bytes is shorter "
                     "than its header", hex, (long long)sb.st_size);
        goto out;
    }
    cas_key fk;
    uint64_t len;
    const char *why = check_header(h, (uint64_t)sb.st_size, &fk, &len);
    if (!why && !key_eq(fk, k)) why = "the header names another key";
    if (why) {
        rc = kp_errf(err, KP_EFORMAT, "cas: object %s is corrupt: %s", hex, why);
        goto out;
    }
    buf = malloc(len ? (size_t)len : 1);
    if (!buf) {
        rc = kp_errf(err, KP_ENOMEM, "cas: out of memory reading object %s (%llu bytes)", hex,
                     (unsigned long long)len);
        goto out;
    }
    got = fs_pread_all(fd, buf, (size_t)len, CAS_HDR_BYTES);
    if (got < 0) {
        rc = kp_errf(err, KP_EIO, "cas: cannot read '%s': %s", path, strerror(errno));
    } else if ((uint64_t)got != len) {
        rc = kp_errf(err, KP_EFORMAT, "cas: object %s is corrupt: payload truncated", hex);
    } else if (XXH64(buf, (size_t)len, 0) != kp_get_u64(h + 40)) {
        rc = kp_errf(err, KP_EFORMAT, "cas: object %s is corrupt: payload checksum mismatch", hex);
    }
out:
    close(fd);
    if (rc) {
        free(buf);
        return rc;
    }
    *out = buf;
    *out_len = len;
    return 0;
}

/* Move `path` (file `name`) to DIR/quarantine/NAME.<ms>.<seq>, never over an
 * earlier piece of evidence. 0 on success. Mutex held (or open). */
static int quarantine_file(cas *c, const char *path, const char *name) {
    char q[CAS_PATH_MAX];
    snprintf(q, sizeof q, "%s/quarantine", c->dir);
    return fs_move_aside(q, path, name, c->quarantine_seq++);
}

/* ---- the index: hash map + LRU lists (mutex held) ---------------------------- */

static size_t bucket_of(const cas *c, cas_key k) {
    uint64_t h = k.hi ^ (k.lo * 0x9e3779b97f4a7c15ull);
    return (size_t)(h ^ (h >> 29)) & (c->n_buckets - 1);
}

static cas_obj *find(const cas *c, cas_key k) {
    for (cas_obj *o = c->buckets[bucket_of(c, k)]; o; o = o->hnext)
        if (key_eq(o->key, k)) return o;
    return NULL;
}

static int grow_buckets(cas *c) {
    size_t nb = c->n_buckets * 2;
    cas_obj **b = calloc(nb, sizeof *b);
    if (!b) return KP_ENOMEM;
    cas_obj **old = c->buckets;
    size_t ob = c->n_buckets;
    c->buckets = b;
    c->n_buckets = nb;
    for (size_t i = 0; i < ob; i++) {
        cas_obj *o = old[i];
        while (o) {
            cas_obj *nx = o->hnext;
            size_t j = bucket_of(c, o->key);
            o->hnext = b[j];
            b[j] = o;
            o = nx;
        }
    }
    free(old);
    return 0;
}

/* A new empty record for k (caller sets data or in_cold); NULL on ENOMEM. */
static cas_obj *insert(cas *c, cas_key k, uint64_t len) {
    if (c->n_objs >= c->n_buckets && grow_buckets(c)) return NULL;
    cas_obj *o = calloc(1, sizeof *o);
    if (!o) return NULL;
    o->key = k;
    o->len = len;
    size_t j = bucket_of(c, k);
    o->hnext = c->buckets[j];
    c->buckets[j] = o;
    c->n_objs++;
    return o;
}

static void list_remove(cas_list *l, cas_obj *o, int w) {
    cas_link *ln = &o->link[w];
    if (ln->prev) ln->prev->link[w].next = ln->next;
    else l->head = ln->next;
    if (ln->next) ln->next->link[w].prev = ln->prev;
    else l->tail = ln->prev;
    ln->prev = ln->next = NULL;
}

static void list_push_head(cas_list *l, cas_obj *o, int w) {
    cas_link *ln = &o->link[w];
    ln->prev = NULL;
    ln->next = l->head;
    if (l->head) l->head->link[w].prev = o;
    l->head = o;
    if (!l->tail) l->tail = o;
}

/* Mark o as just used. */
static void touch(cas *c, cas_obj *o) {
    if (o->data) {
        list_remove(&c->lru[CAS_WARM], o, CAS_WARM);
        list_push_head(&c->lru[CAS_WARM], o, CAS_WARM);
    }
    if (o->in_cold) {
        list_remove(&c->lru[CAS_COLD], o, CAS_COLD);
        list_push_head(&c->lru[CAS_COLD], o, CAS_COLD);
    }
}

static void warm_attach(cas *c, cas_obj *o, uint8_t *data) {
    o->data = data;
    list_push_head(&c->lru[CAS_WARM], o, CAS_WARM);
    c->st.warm_bytes += o->len;
    c->st.warm_objects++;
}

static void warm_detach(cas *c, cas_obj *o) {
    free(o->data);
    o->data = NULL;
    list_remove(&c->lru[CAS_WARM], o, CAS_WARM);
    c->st.warm_bytes -= o->len;
    c->st.warm_objects--;
}

static void cold_attach(cas *c, cas_obj *o) {
    o->in_cold = true;
    list_push_head(&c->lru[CAS_COLD], o, CAS_COLD);
    c->st.cold_bytes += o->len;
    c->st.cold_objects++;
}

/* Forget o's file in the index (the caller unlinks or quarantines it). */
static void cold_detach(cas *c, cas_obj *o) {
    o->in_cold = false;
    list_remove(&c->lru[CAS_COLD], o, CAS_COLD);
    c->st.cold_bytes -= o->len;
    c->st.cold_objects--;
}

/* Free o if nothing holds it and no tier has it. */
static void maybe_free(cas *c, cas_obj *o) {
    if (o->pins || o->data || o->in_cold) return;
    cas_obj **pp = &c->buckets[bucket_of(c, o->key)];
    while (*pp != o) pp = &(*pp)->hnext;
    *pp = o->hnext;
    c->n_objs--;
    free(o);
}

/* Drop o's cold file (unlink under the lock, so no writer of the same name
 * can interleave). */
static void cold_drop(cas *c, cas_obj *o) {
    char path[CAS_PATH_MAX];
    obj_path(c, o->key, false, path);
    unlink(path);
    cold_detach(c, o);
}

/* Least recently used unpinned record of list w, preferring refs == 0 when
 * unref_first. */
static cas_obj *pick_victim(cas *c, int w, bool unref_first, const cas_obj *keep) {
    if (unref_first)
        for (cas_obj *o = c->lru[w].tail; o; o = o->link[w].prev)
            if (!o->pins && o->refs == 0 && o != keep) return o;
    for (cas_obj *o = c->lru[w].tail; o; o = o->link[w].prev)
        if (!o->pins && o != keep) return o;
    return NULL;
}

/* o is leaving the last tier that held it: count and log. */
static void note_lost(cas *c, cas_obj *o, cas_logq *q, const char *why) {
    char hex[33];
    cas_key_hex(o->key, hex);
    if (o->refs) {
        c->st.dropped++;
        logq_add(c, q, "cas: dropped object %s (%llu bytes, %llu references): %s", hex,
                 (unsigned long long)o->len, (unsigned long long)o->refs, why);
    } else {
        c->st.collected++;
    }
}

/* Bring cold under its budget: unreferenced objects first, then LRU. `keep`
 * (the object a put just stored, so that its caller can ref it; may be NULL)
 * is never chosen: it is compared, never dereferenced. */
static void cold_enforce(cas *c, cas_logq *q, const cas_obj *keep) {
    if (!c->dir || !c->cold_budget) return;
    while (c->st.cold_bytes > c->cold_budget) {
        cas_obj *o = pick_victim(c, CAS_COLD, true, keep);
        if (!o) break;
        cold_drop(c, o);
        if (!o->data) {
            note_lost(c, o, q, "the cold tier is over its budget");
            maybe_free(c, o);
        }
    }
}

/* Bring warm under its budget: write LRU objects down to cold (or, with no
 * cold tier, drop them: unreferenced first). May release the mutex while a
 * file is written. */
static void warm_enforce(cas *c, cas_logq *q, const cas_obj *keep) {
    while (c->st.warm_bytes > c->warm_budget) {
        if (!c->dir) {
            cas_obj *o = pick_victim(c, CAS_WARM, true, keep);
            if (!o) break;
            warm_detach(c, o);
            note_lost(c, o, q, "the warm tier is over its budget and there is no cold tier");
            maybe_free(c, o);
            continue;
        }
        cas_obj *o = pick_victim(c, CAS_WARM, false, NULL); /* spilling loses nothing */
        if (!o) break;
        if (o->in_cold) {
            warm_detach(c, o);
            continue;
        }
        o->writing = true;
        o->pins++;
        pthread_mutex_unlock(&c->mu);
        kp_err e = {0};
        int rc = write_object(c, o->key, o->data, o->len, &e);
        pthread_mutex_lock(&c->mu);
        o->writing = false;
        o->pins--;
        pthread_cond_broadcast(&c->cv);
        if (rc) {
            /* disk trouble: keep it warm (over budget) rather than lose it */
            logq_add(c, q, "%s; warm tier stays over budget (%llu > %llu bytes)", e.msg,
                     (unsigned long long)c->st.warm_bytes, (unsigned long long)c->warm_budget);
            break;
        }
        cold_attach(c, o);
        c->st.spilled++;
        if (!o->pins && o->data) warm_detach(c, o);
        cold_enforce(c, q, keep);
    }
}

/* ---- re-index at open ------------------------------------------------------ */

static bool is_lower_hex(const char *s, size_t n) {
    for (size_t i = 0; i < n; i++) {
        char ch = s[i];
        if (!((ch >= '0' && ch <= '9') || (ch >= 'a' && ch <= 'f'))) return false;
    }
    return true;
}

typedef struct scan_ent {
    cas_key key;
    uint64_t len;
    int64_t mtime_ns;
} scan_ent;

static int scan_cmp(const void *a, const void *b) {
    int64_t x = ((const scan_ent *)a)->mtime_ns, y = ((const scan_ent *)b)->mtime_ns;
    return (x > y) - (x < y);
}

/* Validate one DIR/objects/KK/NAME file; quarantine it if bad. Adds good
 * ones to *ents. */
static int scan_file(cas *c, const char *kk, const char *name, scan_ent **ents, size_t *n,
                     size_t *cap, cas_logq *q) {
    char path[CAS_PATH_MAX];
    snprintf(path, sizeof path, "%s/objects/%s/%s", c->dir, kk, name);
    struct stat sb;
    if (lstat(path, &sb) || !S_ISREG(sb.st_mode)) return 0;
    if (fs_has_suffix(name, CAS_TMP_EXT)) {
        if (unlink(path) == 0) c->st.tmp_removed++;
        return 0;
    }
    if (!fs_has_suffix(name, CAS_EXT)) return 0; /* not ours: leave it alone */
    const char *why = NULL;
    uint8_t h[CAS_HDR_BYTES];
    cas_key k = {0, 0};
    uint64_t len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return 0; /* cannot read it: leave it, do not index */
    ssize_t got = fs_pread_all(fd, h, sizeof h, 0);
    close(fd);
    if (got < 0) return 0;
    if ((size_t)got < sizeof h) why = "shorter than its header";
    else why = check_header(h, (uint64_t)sb.st_size, &k, &len);
    if (!why) {
        char hex[33], want[40];
        cas_key_hex(k, hex);
        snprintf(want, sizeof want, "%s%s", hex, CAS_EXT);
        if (strcmp(name, want) != 0 || strncmp(kk, hex, 2) != 0)
            why = "its name does not match the key in its header";
    }
    if (why) {
        if (quarantine_file(c, path, name) == 0) {
            c->st.quarantined++;
            logq_add(c, q, "cas: quarantined '%s': %s", path, why);
        }
        return 0;
    }
    if (*n == *cap) {
        size_t nc = *cap ? 2 * *cap : 64;
        scan_ent *e = realloc(*ents, nc * sizeof *e);
        if (!e) return KP_ENOMEM;
        *ents = e;
        *cap = nc;
    }
    (*ents)[(*n)++] = (scan_ent){k, len, (int64_t)sb.st_mtim.tv_sec * 1000000000 + sb.st_mtim.tv_nsec};
    return 0;
}

static int reindex(cas *c, cas_logq *q, kp_err *err) {
    char odir[CAS_PATH_MAX];
    snprintf(odir, sizeof odir, "%s/objects", c->dir);
    DIR *dh = opendir(odir);
    if (!dh) return kp_errf(err, KP_EIO, "cas: cannot open '%s': %s", odir, strerror(errno));
    scan_ent *ents = NULL;
    size_t n = 0, cap = 0;
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(dh)) != NULL) {
        const char *kk = de->d_name;
        if (strlen(kk) != 2 || !is_lower_hex(kk, 2)) continue;
        char sub[CAS_PATH_MAX + 8];
        snprintf(sub, sizeof sub, "%s/%.2s", odir, kk);
        DIR *sh = opendir(sub);
        if (!sh) continue;
        struct dirent *fe;
        while (!rc && (fe = readdir(sh)) != NULL) {
            if (fe->d_name[0] == '.') continue;
            rc = scan_file(c, kk, fe->d_name, &ents, &n, &cap, q);
        }
        closedir(sh);
    }
    closedir(dh);
    if (rc) {
        free(ents);
        return kp_errf(err, rc, "cas: out of memory indexing '%s'", odir);
    }
    /* oldest first, so the newest ends at the head of the cold LRU */
    if (n) qsort(ents, n, sizeof *ents, scan_cmp);
    for (size_t i = 0; i < n; i++) {
        cas_obj *o = insert(c, ents[i].key, ents[i].len);
        if (!o) {
            free(ents);
            return kp_errf(err, KP_ENOMEM, "cas: out of memory indexing '%s'", odir);
        }
        cold_attach(c, o);
    }
    free(ents);
    return 0;
}

/* ---- open / close ------------------------------------------------------------ */

int cas_open(cas **out, const cas_opts *o, kp_err *err) {
    *out = NULL;
    cas_opts d = cas_default_opts();
    if (!o) o = &d;
    if (o->dir && (!o->dir[0] || strlen(o->dir) > CAS_DIR_MAX))
        return kp_errf(err, KP_EINVAL, "cas: cold directory name is empty or longer than %d "
                       "bytes", CAS_DIR_MAX);
    cas *c = calloc(1, sizeof *c);
    if (!c) return kp_errf(err, KP_ENOMEM, "cas: out of memory");
    c->warm_budget = o->warm_budget ? o->warm_budget : CAS_DEFAULT_WARM;
    c->cold_budget = o->cold_budget;
    c->log = o->log;
    c->log_ud = o->log_ud;
    c->n_buckets = 256;
    c->buckets = calloc(c->n_buckets, sizeof *c->buckets);
    pthread_mutex_init(&c->mu, NULL);
    pthread_cond_init(&c->cv, NULL);
    if (!c->buckets) {
        cas_close(c);
        return kp_errf(err, KP_ENOMEM, "cas: out of memory");
    }
    if (o->dir) {
        c->dir = strdup(o->dir);
        if (!c->dir) {
            cas_close(c);
            return kp_errf(err, KP_ENOMEM, "cas: out of memory");
        }
        for (size_t n = strlen(c->dir); n > 1 && c->dir[n - 1] == '/'; n--) c->dir[n - 1] = 0;
        char odir[CAS_PATH_MAX];
        snprintf(odir, sizeof odir, "%s/objects", c->dir);
        if (fs_mkdir_p(odir)) {
            int e = errno;
            cas_close(c);
            return kp_errf(err, KP_EIO, "cas: cannot create directory '%s': %s", odir, strerror(e));
        }
        cas_logq q = {0};
        int rc = reindex(c, &q, err);
        logq_flush(c, &q);
        if (rc) {
            cas_close(c);
            return rc;
        }
    }
    *out = c;
    return 0;
}

void cas_close(cas *c) {
    if (!c) return;
    for (size_t i = 0; c->buckets && i < c->n_buckets; i++) {
        cas_obj *o = c->buckets[i];
        while (o) {
            cas_obj *nx = o->hnext;
            free(o->data);
            free(o);
            o = nx;
        }
    }
    free(c->buckets);
    free(c->dir);
    pthread_cond_destroy(&c->cv);
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* ---- the API ------------------------------------------------------------------- */

/* cas_put, and with take_ref the reference cas_put_ref promises, taken under
 * the same lock hold that finds or inserts the object (and dropped again if
 * the put fails). */
static int put_impl(cas *c, cas_key k, const void *data, size_t len, bool durable, bool take_ref,
                    kp_err *err) {
    if (!c || (len && !data)) return kp_errf(err, KP_EINVAL, "cas: put: NULL argument");
    if (durable && !c->dir)
        return kp_errf(err, KP_EINVAL, "cas: durable put without a cold tier (no directory)");
    cas_logq q = {0};
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    if (!o) {
        /* copy outside the lock, then re-check: another put may have won */
        pthread_mutex_unlock(&c->mu);
        uint8_t *copy = malloc(len ? len : 1);
        if (copy && len) memcpy(copy, data, len);
        pthread_mutex_lock(&c->mu);
        o = find(c, k);
        if (o) {
            free(copy);
        } else {
            o = copy ? insert(c, k, len) : NULL;
            if (!o) {
                free(copy);
                pthread_mutex_unlock(&c->mu);
                return kp_errf(err, KP_ENOMEM, "cas: out of memory storing %zu bytes", len);
            }
            warm_attach(c, o, copy);
        }
    }
    if (take_ref) o->refs++; /* before any unlock below: no collect can take it now */
    touch(c, o);
    if (durable) {
        o->pins++;
        while (o->writing) pthread_cond_wait(&c->cv, &c->mu);
        if (!o->in_cold) {
            o->writing = true;
            pthread_mutex_unlock(&c->mu);
            kp_err e = {0};
            rc = write_object(c, k, data, len, &e);
            pthread_mutex_lock(&c->mu);
            o->writing = false;
            pthread_cond_broadcast(&c->cv);
            if (rc == 0) cold_attach(c, o);
            else logq_add(c, &q, "%s", e.msg);
            if (rc && err) *err = e;
        }
        o->pins--;
    }
    if (take_ref && rc) o->refs--;
    warm_enforce(c, &q, o);
    cold_enforce(c, &q, o);
    pthread_mutex_unlock(&c->mu);
    logq_flush(c, &q);
    return rc;
}

int cas_put(cas *c, cas_key k, const void *data, size_t len, bool durable, kp_err *err) {
    return put_impl(c, k, data, len, durable, false, err);
}

int cas_put_ref(cas *c, cas_key k, const void *data, size_t len, bool durable, kp_err *err) {
    return put_impl(c, k, data, len, durable, true, err);
}

int cas_get(cas *c, cas_key k, void **data, size_t *len, kp_err *err) {
    *data = NULL;
    *len = 0;
    char hex[33];
    cas_key_hex(k, hex);
    cas_logq q = {0};
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    if (!o) {
        c->st.misses++;
        pthread_mutex_unlock(&c->mu);
        return kp_errf(err, KP_ENOTFOUND, "cas: no object %s", hex);
    }
    touch(c, o);
    o->pins++;
    if (o->data) {
        c->st.hits_warm++;
        uint64_t n = o->len;
        pthread_mutex_unlock(&c->mu);
        uint8_t *copy = malloc(n ? (size_t)n : 1);
        if (copy) memcpy(copy, o->data, (size_t)n); /* pinned: data stays */
        pthread_mutex_lock(&c->mu);
        o->pins--;
        maybe_free(c, o);
        pthread_mutex_unlock(&c->mu);
        if (!copy) return kp_errf(err, KP_ENOMEM, "cas: out of memory copying object %s", hex);
        *data = copy;
        *len = (size_t)n;
        return 0;
    }
    /* cold only (a record with neither tier is never visible) */
    pthread_mutex_unlock(&c->mu);
    uint8_t *buf = NULL, *warm = NULL;
    uint64_t n = 0;
    kp_err e = {0};
    int rc = read_object(c, k, &buf, &n, &e);
    if (rc && err) *err = e;
    if (rc == 0) {
        warm = malloc(n ? (size_t)n : 1);
        if (warm) memcpy(warm, buf, (size_t)n);
    }
    pthread_mutex_lock(&c->mu);
    o->pins--;
    if (rc == 0) {
        c->st.hits_cold++;
        if (!o->data && warm && n == o->len) {
            warm_attach(c, o, warm);
            warm = NULL;
            warm_enforce(c, &q, NULL);
        }
    } else if (rc == KP_EFORMAT && o->in_cold) {
        char path[CAS_PATH_MAX], name[40];
        obj_path(c, k, false, path);
        snprintf(name, sizeof name, "%s%s", hex, CAS_EXT);
        cold_detach(c, o);
        if (quarantine_file(c, path, name) == 0) c->st.quarantined++;
        else unlink(path);
        logq_add(c, &q, "%s; moved to %s/quarantine%s", e.msg,
                 c->dir, o->refs ? " (it was referenced: its sessions cannot be restored)" : "");
        maybe_free(c, o);
    } else if (rc == KP_ENOTFOUND && o->in_cold) {
        c->st.misses++;
        cold_detach(c, o);
        maybe_free(c, o);
    } else {
        maybe_free(c, o);
    }
    pthread_mutex_unlock(&c->mu);
    logq_flush(c, &q);
    free(warm);
    if (rc) {
        free(buf);
        return rc;
    }
    *data = buf;
    *len = (size_t)n;
    return 0;
}

bool cas_has(cas *c, cas_key k) {
    pthread_mutex_lock(&c->mu);
    bool has = find(c, k) != NULL;
    pthread_mutex_unlock(&c->mu);
    return has;
}

int cas_ref(cas *c, cas_key k) {
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    if (o) o->refs++;
    pthread_mutex_unlock(&c->mu);
    return o ? 0 : KP_ENOTFOUND;
}

int cas_unref(cas *c, cas_key k) {
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    int rc = 0;
    if (!o) rc = KP_ENOTFOUND;
    else if (o->refs == 0) rc = KP_ERANGE;
    else o->refs--;
    pthread_mutex_unlock(&c->mu);
    return rc;
}

uint64_t cas_refcount(cas *c, cas_key k) {
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    uint64_t r = o ? o->refs : 0;
    pthread_mutex_unlock(&c->mu);
    return r;
}

int cas_where(cas *c, cas_key k) {
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    int w = 0;
    if (o) w = (o->data ? CAS_IN_WARM : 0) | (o->in_cold ? CAS_IN_COLD : 0);
    pthread_mutex_unlock(&c->mu);
    return w;
}

int cas_persist(cas *c, cas_key k, kp_err *err) {
    if (!c) return kp_errf(err, KP_EINVAL, "cas: persist: NULL store");
    if (!c->dir) return kp_errf(err, KP_EINVAL, "cas: persist without a cold tier (no directory)");
    char hex[33];
    cas_key_hex(k, hex);
    cas_logq q = {0};
    int rc = 0;
    pthread_mutex_lock(&c->mu);
    cas_obj *o = find(c, k);
    if (!o) {
        pthread_mutex_unlock(&c->mu);
        return kp_errf(err, KP_ENOTFOUND, "cas: no object %s to persist", hex);
    }
    o->pins++; /* keeps the record, its warm copy and its file where they are */
    while (o->writing) pthread_cond_wait(&c->cv, &c->mu);
    if (!o->in_cold) {
        if (!o->data) {
            /* neither tier: it was dropped while we waited (cannot happen
             * while pinned, but do not write garbage if it ever does) */
            rc = kp_errf(err, KP_ENOTFOUND, "cas: object %s vanished before it was persisted", hex);
        } else {
            o->writing = true;
            pthread_mutex_unlock(&c->mu);
            kp_err e = {0};
            rc = write_object(c, k, o->data, o->len, &e); /* pinned: data stays */
            pthread_mutex_lock(&c->mu);
            o->writing = false;
            pthread_cond_broadcast(&c->cv);
            if (rc == 0) {
                cold_attach(c, o);
            } else {
                logq_add(c, &q, "%s", e.msg);
                if (err) *err = e;
            }
        }
    }
    touch(c, o);
    o->pins--;
    if (rc == 0) cold_enforce(c, &q, o);
    maybe_free(c, o);
    pthread_mutex_unlock(&c->mu);
    logq_flush(c, &q);
    return rc;
}

size_t cas_collect(cas *c) {
    size_t freed = 0;
    pthread_mutex_lock(&c->mu);
    for (size_t i = 0; i < c->n_buckets; i++) {
        cas_obj *o = c->buckets[i];
        while (o) {
            cas_obj *nx = o->hnext; /* maybe_free unlinks o only */
            if (o->refs == 0 && o->pins == 0) {
                if (o->data) warm_detach(c, o);
                if (o->in_cold) cold_drop(c, o);
                maybe_free(c, o);
                freed++;
            }
            o = nx;
        }
    }
    c->st.collected += freed;
    pthread_mutex_unlock(&c->mu);
    return freed;
}

void cas_get_stats(cas *c, cas_stats *st) {
    pthread_mutex_lock(&c->mu);
    *st = c->st;
    pthread_mutex_unlock(&c->mu);
}
