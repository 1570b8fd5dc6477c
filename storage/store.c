/*
 * store.c — the session store (see store.h): an index of sessions by id over
 * a list of tiers. Today the only tier is "disk" (a directory of ID.kvps
 * blobs); a tier is a small table of functions so that a host-RAM or remote
 * tier, and the policy moving sessions between tiers, can be added here
 * without changing the API the server codes against.
 *
 * The index is a plain array searched linearly: thousands of sessions cost
 * microseconds next to the file I/O of any call.
 */
#include "fsutil.h"
#include "store.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define STORE_EXT ".kvps"
#define STORE_QUARANTINE "quarantine"

/* ---- the tier interface --------------------------------------------------- */

typedef struct store_tier_ops {
    const char *name;
    int (*save)(void *ctx, const char *id, const blob_meta *meta, const store_item *item,
                blob_stats *st, kp_err *err);
    int (*load_meta)(void *ctx, const char *id, blob_meta *meta, int32_t **tokens, void **extra,
                     size_t *extra_len, kp_err *err);
    int (*load_kv)(void *ctx, const char *id, uint64_t fingerprint, kv_cache *kv, kp_err *err);
    int (*remove)(void *ctx, const char *id, kp_err *err);
    /* Move a corrupt item out of the way (kept for inspection). */
    void (*quarantine)(void *ctx, const char *id);
    /* Bytes and mtime of an item, after a save. */
    int (*stat)(void *ctx, const char *id, uint64_t *bytes, int64_t *mtime_ms);
} store_tier_ops;

/* ---- the disk tier: DIR/ID.kvps ------------------------------------------ */

typedef struct disk_tier {
    char *dir;
} disk_tier;

/* DIR/ID.kvps into buf; id is already validated (<= 64 chars). */
static void disk_path(const disk_tier *d, const char *id, char *buf, size_t cap) {
    snprintf(buf, cap, "%s/%s%s", d->dir, id, STORE_EXT);
}

static size_t disk_path_cap(const disk_tier *d) {
    return strlen(d->dir) + STORE_ID_MAX + sizeof STORE_EXT + sizeof STORE_QUARANTINE + 40;
}

static int disk_save(void *ctx, const char *id, const blob_meta *meta, const store_item *item,
                     blob_stats *st, kp_err *err) {
    disk_tier *d = ctx;
    size_t cap = disk_path_cap(d);
    char *p = malloc(cap);
    if (!p) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    disk_path(d, id, p, cap);
    int rc = blob_write(p, meta, item->tokens, item->extra, item->extra_len, item->kv, st, err);
    free(p);
    return rc;
}

static int disk_load_meta(void *ctx, const char *id, blob_meta *meta, int32_t **tokens,
                          void **extra, size_t *extra_len, kp_err *err) {
    disk_tier *d = ctx;
    size_t cap = disk_path_cap(d);
    char *p = malloc(cap);
    if (!p) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    disk_path(d, id, p, cap);
    int rc = blob_read_meta(p, meta, tokens, extra, extra_len, err);
    free(p);
    return rc;
}

static int disk_load_kv(void *ctx, const char *id, uint64_t fingerprint, kv_cache *kv,
                        kp_err *err) {
    disk_tier *d = ctx;
    size_t cap = disk_path_cap(d);
    char *p = malloc(cap);
    if (!p) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    disk_path(d, id, p, cap);
    int rc = blob_read_kv(p, fingerprint, kv, err);
    free(p);
    return rc;
}

static int disk_remove(void *ctx, const char *id, kp_err *err) {
    disk_tier *d = ctx;
    size_t cap = disk_path_cap(d);
    char *p = malloc(cap);
    if (!p) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    disk_path(d, id, p, cap);
    int rc = 0;
    if (unlink(p) && errno != ENOENT)
        rc = kp_errf(err, KP_EIO, "store: cannot delete '%s': %s", p, strerror(errno));
    free(p);
    return rc;
}

static int64_t now_unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Move DIR/NAME to DIR/quarantine/NAME.<unix ms> (never overwrites evidence). */
static int disk_quarantine_name(const disk_tier *d, const char *name) {
    size_t cap = strlen(d->dir) + strlen(name) + sizeof STORE_QUARANTINE + 48;
    char *from = malloc(cap), *to = malloc(cap);
    int rc = -1;
    if (from && to) {
        snprintf(to, cap, "%s/%s", d->dir, STORE_QUARANTINE);
        if (mkdir(to, 0755) == 0 || errno == EEXIST) {
            snprintf(from, cap, "%s/%s", d->dir, name);
            snprintf(to, cap, "%s/%s/%s.%lld", d->dir, STORE_QUARANTINE, name,
                     (long long)now_unix_ms());
            rc = rename(from, to);
        }
    }
    free(from);
    free(to);
    return rc;
}

static void disk_quarantine(void *ctx, const char *id) {
    char name[STORE_ID_MAX + sizeof STORE_EXT];
    snprintf(name, sizeof name, "%s%s", id, STORE_EXT);
    disk_quarantine_name(ctx, name);
}

static int disk_stat(void *ctx, const char *id, uint64_t *bytes, int64_t *mtime_ms) {
    disk_tier *d = ctx;
    size_t cap = disk_path_cap(d);
    char *p = malloc(cap);
    if (!p) return KP_ENOMEM;
    disk_path(d, id, p, cap);
    struct stat sb;
    int rc = stat(p, &sb);
    free(p);
    if (rc) return KP_EIO;
    *bytes = (uint64_t)sb.st_size;
    *mtime_ms = (int64_t)sb.st_mtim.tv_sec * 1000 + sb.st_mtim.tv_nsec / 1000000;
    return 0;
}

static const store_tier_ops disk_ops = {
    .name = "disk",
    .save = disk_save,
    .load_meta = disk_load_meta,
    .load_kv = disk_load_kv,
    .remove = disk_remove,
    .quarantine = disk_quarantine,
    .stat = disk_stat,
};

/* ---- the store -------------------------------------------------------------- */

typedef struct store_tier {
    const store_tier_ops *ops;
    void *ctx;
} store_tier;

struct store {
    pthread_mutex_t mu;
    uint64_t fingerprint;
    disk_tier disk;
    store_tier tiers[1];  /* [0] = disk; more tiers go here */
    int n_tiers;
    store_entry *entries; /* [n_entries], unordered */
    int *entry_tier;      /* [n_entries] index into tiers */
    size_t n_entries, cap_entries;
    store_stats stats;    /* n_quarantined, n_tmp_removed, n_foreign */
};

int store_id_valid(const char *id) {
    if (!id) return 0;
    size_t n = 0;
    for (; id[n]; n++) {
        char c = id[n];
        int ok = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
                 c == '_' || c == '-';
        if (!ok || n >= STORE_ID_MAX) return 0;
    }
    return n >= 1;
}

int store_new_id(char out[23]) {
    static const char b64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    uint8_t r[16];
    size_t got = 0;
    while (got < sizeof r) {
        ssize_t n = getrandom(r + got, sizeof r - got, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            out[0] = 0;
            return KP_EIO;
        }
        got += (size_t)n;
    }
    /* 128 bits -> 22 six-bit digits (the last holds 2 bits) */
    int bit = 0;
    for (int i = 0; i < 22; i++, bit += 6) {
        int v = 0;
        for (int j = 0; j < 6; j++) {
            int b = bit + j;
            int x = b < 128 ? (r[b / 8] >> (7 - b % 8)) & 1 : 0;
            v = (v << 1) | x;
        }
        out[i] = b64[v];
    }
    out[22] = 0;
    return 0;
}

static long find_entry(const store *s, const char *id) {
    for (size_t i = 0; i < s->n_entries; i++)
        if (!strcmp(s->entries[i].id, id)) return (long)i;
    return -1;
}

static void drop_entry(store *s, long i) {
    s->n_entries--;
    s->entries[i] = s->entries[s->n_entries];
    s->entry_tier[i] = s->entry_tier[s->n_entries];
}

/* Insert or update the entry for id on tier t. */
static int put_entry(store *s, const char *id, int t, int n_tokens, uint64_t bytes,
                     int64_t mtime_ms) {
    long i = find_entry(s, id);
    if (i < 0) {
        if (s->n_entries == s->cap_entries) {
            size_t nc = s->cap_entries ? 2 * s->cap_entries : 16;
            store_entry *e = realloc(s->entries, nc * sizeof *e);
            if (!e) return KP_ENOMEM;
            s->entries = e;
            int *et = realloc(s->entry_tier, nc * sizeof *et);
            if (!et) return KP_ENOMEM;
            s->entry_tier = et;
            s->cap_entries = nc;
        }
        i = (long)s->n_entries++;
    }
    store_entry *e = &s->entries[i];
    memset(e, 0, sizeof *e);
    snprintf(e->id, sizeof e->id, "%s", id);
    e->n_tokens = n_tokens;
    e->bytes = bytes;
    e->mtime_unix_ms = mtime_ms;
    snprintf(e->tier, sizeof e->tier, "%s", s->tiers[t].ops->name);
    s->entry_tier[i] = t;
    return 0;
}

/* Scan the disk tier's directory: delete torn writes, index valid blobs of
 * this model, quarantine the rest. */
static int store_reindex_disk(store *s, kp_err *err) {
    disk_tier *d = &s->disk;
    DIR *dh = opendir(d->dir);
    if (!dh) return kp_errf(err, KP_EIO, "store: cannot open '%s': %s", d->dir, strerror(errno));
    struct dirent *de;
    int rc = 0;
    while ((de = readdir(dh)) != NULL) {
        const char *name = de->d_name;
        struct stat sb;
        if (fstatat(dirfd(dh), name, &sb, AT_SYMLINK_NOFOLLOW) || !S_ISREG(sb.st_mode)) continue;
        if (fs_has_suffix(name, ".tmp")) {
            if (unlinkat(dirfd(dh), name, 0) == 0) s->stats.n_tmp_removed++;
            continue;
        }
        if (!fs_has_suffix(name, STORE_EXT)) continue;
        char id[STORE_ID_MAX + 1];
        size_t n = strlen(name) - strlen(STORE_EXT);
        if (n == 0 || n > STORE_ID_MAX) continue; /* not a name we would have written */
        memcpy(id, name, n);
        id[n] = 0;
        if (!store_id_valid(id)) continue;
        blob_meta m;
        kp_err e2;
        int r = disk_load_meta(d, id, &m, NULL, NULL, NULL, &e2);
        if (r == KP_EFORMAT || r == KP_EUNSUP) {
            if (disk_quarantine_name(d, name) == 0) s->stats.n_quarantined++;
            continue;
        }
        if (r) continue; /* I/O trouble: leave it, do not index */
        if (m.model_fingerprint != s->fingerprint) {
            s->stats.n_foreign++;
            continue;
        }
        int64_t mt = (int64_t)sb.st_mtim.tv_sec * 1000 + sb.st_mtim.tv_nsec / 1000000;
        if (put_entry(s, id, 0, m.n_tokens, (uint64_t)sb.st_size, mt)) {
            rc = kp_errf(err, KP_ENOMEM, "store: out of memory indexing '%s'", d->dir);
            break;
        }
    }
    closedir(dh);
    return rc;
}

int store_open(store **out, const char *dir, uint64_t model_fingerprint, kp_err *err) {
    *out = NULL;
    if (!dir || !dir[0]) return kp_errf(err, KP_EINVAL, "store: empty directory name");
    if (fs_mkdir_p(dir))
        return kp_errf(err, KP_EIO, "store: cannot create directory '%s': %s", dir, strerror(errno));
    store *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    s->disk.dir = strdup(dir);
    if (!s->disk.dir) {
        free(s);
        return kp_errf(err, KP_ENOMEM, "store: out of memory");
    }
    /* strip trailing slashes (keep "/" itself) */
    for (size_t n = strlen(s->disk.dir); n > 1 && s->disk.dir[n - 1] == '/'; n--)
        s->disk.dir[n - 1] = 0;
    pthread_mutex_init(&s->mu, NULL);
    s->fingerprint = model_fingerprint;
    s->tiers[0] = (store_tier){&disk_ops, &s->disk};
    s->n_tiers = 1;
    int rc = store_reindex_disk(s, err);
    if (rc) {
        store_close(s);
        return rc;
    }
    *out = s;
    return 0;
}

void store_close(store *s) {
    if (!s) return;
    pthread_mutex_destroy(&s->mu);
    free(s->entries);
    free(s->entry_tier);
    free(s->disk.dir);
    free(s);
}

#define CHECK_ID(id)                                                                          \
    do {                                                                                      \
        if (!store_id_valid(id))                                                              \
            return kp_errf(err, KP_EINVAL, "store: invalid session id '%.80s' (1..%d chars of " \
                           "A-Z a-z 0-9 _ -)", (id) ? (id) : "(null)", STORE_ID_MAX);          \
    } while (0)

int store_save(store *s, const char *id, const store_item *item, blob_stats *st, kp_err *err) {
    CHECK_ID(id);
    if (!item || !item->kv) return kp_errf(err, KP_EINVAL, "store: save: no item or KV cache");
    blob_meta m;
    memset(&m, 0, sizeof m);
    m.model_fingerprint = s->fingerprint;
    if (item->codec) {
        if (strlen(item->codec) >= BLOB_CODEC_MAX)
            return kp_errf(err, KP_EINVAL, "store: codec name '%.40s' is too long", item->codec);
        snprintf(m.codec, sizeof m.codec, "%s", item->codec);
    }
    m.chunk_tokens = item->chunk_tokens;
    m.n_tokens = item->n_tokens;
    pthread_mutex_lock(&s->mu);
    const int t = 0; /* new sessions go to the disk tier */
    const store_tier *tier = &s->tiers[t];
    int rc = tier->ops->save(tier->ctx, id, &m, item, st, err);
    if (rc == 0) {
        uint64_t bytes = 0;
        int64_t mt = 0;
        if (tier->ops->stat(tier->ctx, id, &bytes, &mt)) mt = now_unix_ms();
        if (put_entry(s, id, t, item->n_tokens, bytes, mt))
            rc = kp_errf(err, KP_ENOMEM, "store: out of memory adding session '%s'", id);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* After a load failed with rc: a corrupt item is quarantined and forgotten. */
static void after_load_failure(store *s, long i, int rc) {
    if (rc != KP_EFORMAT && rc != KP_EUNSUP && rc != KP_ENOTFOUND) return;
    const store_tier *tier = &s->tiers[s->entry_tier[i]];
    if (rc != KP_ENOTFOUND) {
        tier->ops->quarantine(tier->ctx, s->entries[i].id);
        s->stats.n_quarantined++;
    }
    drop_entry(s, i);
}

int store_load_meta(store *s, const char *id, blob_meta *meta, int32_t **tokens, void **extra,
                    size_t *extra_len, kp_err *err) {
    CHECK_ID(id);
    pthread_mutex_lock(&s->mu);
    int rc;
    long i = find_entry(s, id);
    if (i < 0) {
        rc = kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    } else {
        const store_tier *tier = &s->tiers[s->entry_tier[i]];
        blob_meta m;
        rc = tier->ops->load_meta(tier->ctx, id, &m, tokens, extra, extra_len, err);
        if (rc == 0 && m.model_fingerprint != s->fingerprint) {
            if (tokens) { free(*tokens); *tokens = NULL; }
            if (extra) { free(*extra); *extra = NULL; }
            if (extra_len) *extra_len = 0;
            rc = kp_errf(err, KP_EMISMATCH, "store: session '%s' belongs to model %016llx, not "
                         "%016llx", id, (unsigned long long)m.model_fingerprint,
                         (unsigned long long)s->fingerprint);
        } else if (rc == 0 && meta) {
            *meta = m;
        }
        if (rc) after_load_failure(s, i, rc);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int store_load_kv(store *s, const char *id, kv_cache *kv, kp_err *err) {
    CHECK_ID(id);
    if (!kv) return kp_errf(err, KP_EINVAL, "store: load_kv: no KV cache");
    pthread_mutex_lock(&s->mu);
    int rc;
    long i = find_entry(s, id);
    if (i < 0) {
        rc = kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    } else {
        const store_tier *tier = &s->tiers[s->entry_tier[i]];
        rc = tier->ops->load_kv(tier->ctx, id, s->fingerprint, kv, err);
        if (rc) after_load_failure(s, i, rc);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int store_delete(store *s, const char *id, kp_err *err) {
    CHECK_ID(id);
    pthread_mutex_lock(&s->mu);
    int rc;
    long i = find_entry(s, id);
    if (i < 0) {
        rc = kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    } else {
        const store_tier *tier = &s->tiers[s->entry_tier[i]];
        rc = tier->ops->remove(tier->ctx, id, err);
        if (rc == 0) drop_entry(s, i);
    }
    pthread_mutex_unlock(&s->mu);
    return rc;
}

int store_has(store *s, const char *id) {
    if (!store_id_valid(id)) return 0;
    pthread_mutex_lock(&s->mu);
    int has = find_entry(s, id) >= 0;
    pthread_mutex_unlock(&s->mu);
    return has;
}

static int entry_cmp(const void *a, const void *b) {
    return strcmp(((const store_entry *)a)->id, ((const store_entry *)b)->id);
}

int store_list(store *s, store_entry **entries, size_t *n) {
    *entries = NULL;
    *n = 0;
    pthread_mutex_lock(&s->mu);
    size_t cnt = s->n_entries;
    store_entry *e = malloc((cnt ? cnt : 1) * sizeof *e);
    if (e && cnt) memcpy(e, s->entries, cnt * sizeof *e);
    pthread_mutex_unlock(&s->mu);
    if (!e) return KP_ENOMEM;
    qsort(e, cnt, sizeof *e, entry_cmp);
    *entries = e;
    *n = cnt;
    return 0;
}

void store_get_stats(store *s, store_stats *st) {
    pthread_mutex_lock(&s->mu);
    *st = s->stats;
    st->n_entries = s->n_entries;
    st->bytes = 0;
    for (size_t i = 0; i < s->n_entries; i++) st->bytes += s->entries[i].bytes;
    pthread_mutex_unlock(&s->mu);
}
