/*
 * store.c — the tiered session store (contract in store.h).
 *
 * Why this shape: the heavy part of a session (its KV) already has a home
 * that deduplicates shared prefixes and knows about RAM and disk tiers: the
 * content-addressed chunk store (cas.h) fed by park.h. What is left for the
 * store is the small per-session record (manifest + the server's extra
 * bytes), an index by id, durability of that record, the cold budget at
 * session granularity, recovery at open, and per-id serialisation.
 *
 * ---- Session record DIR/sessions/ID.kvpm, little-endian -------------------
 *    0  magic "KVPKSREC"                     8 bytes
 *    8  version (1)                          u32
 *   12  header bytes H (64)                  u32
 *   16  manifest bytes M                     u32
 *   20  extra bytes X                        u32 (<= STORE_EXTRA_MAX, 1 MiB)
 *   24  n_tokens                             u32 (must equal the manifest's)
 *   28  flags (0)                            u32
 *   32  mtime: unix ms of the save           i64
 *   40  XXH64 of the extra bytes             u64 (seed 0)
 *   48  reserved (0)                         u64
 *   56  XXH64 of bytes [0, 56)               u64 (seed 0)
 *   64  manifest                             M bytes: park_manifest_write's
 *                                            form (own magic, version, XXH64)
 *   64 + M  extra bytes                      X bytes
 * total = 64 + M + X exactly. The reader checks the length against the
 * header, the header checksum, the version, every reserved field, the
 * manifest (park_manifest_read: checksum, ranges, layout), that both agree on
 * n_tokens, and the extra checksum. Anything wrong: the file is moved to
 * DIR/quarantine/ (counted, logged), never deleted.
 * Written as ID.kvpm.tmp, fsynced, renamed over ID.kvpm, directory fsynced:
 * the rename is the commit point of a durable save.
 *
 * ---- Index and locking ------------------------------------------------------
 * The index is an array of pointers to store_sess (searched linearly:
 * thousands of sessions cost microseconds next to any file I/O). One mutex
 * (mu) guards the index, every entry's fields and the counters; it is never
 * held during file I/O, encoding or decoding, nor during any cas call (the
 * cas has its own lock; list/stat copy the keys out and ask the cas after).
 * Per-id serialisation: a call that works on an id marks its entry `busy`
 * (a first save inserts a placeholder entry, has_data = false, that no
 * reader sees); a second call on the same id waits on the condition variable
 * until busy is clear, then looks the id up again. Calls on different ids run
 * in parallel. The busy holder is the only writer of its entry's version
 * fields; it changes them under mu so readers (list, stat, load_meta) see a
 * consistent version.
 * A restore pins its entry (pins > 0) from begin() to end(): the cold-budget
 * evictor skips pinned entries. A pinned entry removed from the index
 * (deleted meanwhile) is marked dead and freed by the last unpin.
 *
 * ---- Versions and durability ------------------------------------------------
 * Every entry holds references (cas_ref) on the objects of its current
 * manifest `man`. A durable save writes the objects to the cold tier
 * (park_save durable + cas_persist for reused ones), then the record; only
 * then are the previous version's references released (and unreferenced
 * objects collected). A non-durable save keeps the record in RAM; if the
 * previous version was durable its manifest is kept as `old` (references
 * held, record file left in place) so that a crash before store_flush brings
 * back the last durable version rather than nothing. Flush writes the
 * record and releases `old`.
 *
 * ---- Cold budget --------------------------------------------------------------
 * The cas is opened with cold_budget 0 (it never drops referenced objects);
 * the store enforces opts.cold_budget (cas cold_bytes: object bytes on disk)
 * at session granularity after every save and flush and at open: while over
 * budget, the least recently used session that is not pinned, not busy and
 * not the one just saved is dropped (record unlinked, references released,
 * objects collected), counted, logged and reported via on_drop. One evictor
 * runs at a time. A session that alone needs more than the budget is refused
 * at save time (KP_ERANGE: a budget, not a full disk, which is KP_ENOSPC) and the previous
 * version stays. Between saves the cold tier can run over budget for a
 * while: loads promote objects to warm and the warm budget spills others
 * down. Objects of foreign records (another model / KV type / codec file)
 * stay referenced while the store is open, so collection keeps them for the
 * server that can use them; they count in cold bytes and are never dropped.
 * Victims are chosen by session LRU alone (dropping a session whose objects
 * are shared or still warm may free fewer cold bytes than it holds).
 *
 * Log messages and on_drop are never called with mu held.
 *
 * The import of legacy v1 blobs at open is in store_legacy.c; what the two
 * files share (the structs, the record constants, a few helpers) is in
 * store_impl.h.
 */
#include "storage/fsutil.h"
#include "storage/store.h"
#include "storage/store_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <sodium.h>
#include <xxhash.h>


/* ---- small helpers ------------------------------------------------------------ */


static int64_t now_unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* A log line (call with mu NOT held). */
void store_logf(const store *s, const char *fmt, ...) {
    if (!s->o.log) return;
    char buf[KP_ERR_MAX + 256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    s->o.log(s->o.ud, buf);
}

static void store_cas_log(void *ud, const char *msg) {
    const store *s = ud;
    if (s->o.log) s->o.log(s->o.ud, msg);
}

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

store_opts store_default_opts(void) {
    store_opts o;
    memset(&o, 0, sizeof o);
    o.kv_type = KP_TYPE_F32;
    o.layout = layout_default();
    o.warm_budget = STORE_DEFAULT_WARM;
    return o;
}

const char *store_codec_name(store *s) {
    pthread_mutex_lock(&s->mu);
    const char *r = s->cur->label; /* entries live until store_close */
    pthread_mutex_unlock(&s->mu);
    return r;
}

cas *store_cas(store *s) { return s ? s->cas : NULL; }

#define CHECK_ID(id)                                                                          \
    do {                                                                                      \
        if (!store_id_valid(id))                                                              \
            return kp_errf(err, KP_EINVAL, "store: invalid session id '%.80s' (1..%d chars of " \
                           "A-Z a-z 0-9 _ -)", (id) ? (id) : "(null)", STORE_ID_MAX);          \
    } while (0)

/* ---- paths and files ---------------------------------------------------------- */

static void rec_path(const store *s, const char *id, bool tmp, char out[STORE_PATH_MAX]) {
    snprintf(out, STORE_PATH_MAX, "%s/%s%s%s", s->sess_dir, id, STORE_REC_EXT,
             tmp ? STORE_TMP_EXT : "");
}

/* Move path (whose file name is name) to DIR/quarantine/NAME.<ms>.<seq>,
 * never over earlier evidence. 0 on success, -1 with errno. */
int store_quarantine_file(store *s, const char *path, const char *name) {
    return fs_move_aside(s->q_dir, path, name, atomic_fetch_add(&s->qseq, 1));
}

/* Quarantine DIR/sessions/ID.kvpm; counts it. mu NOT held. */
static void store_quarantine_record(store *s, const char *id, const char *why) {
    char path[STORE_PATH_MAX], name[STORE_ID_MAX + 16];
    rec_path(s, id, false, path);
    snprintf(name, sizeof name, "%s%s", id, STORE_REC_EXT);
    if (store_quarantine_file(s, path, name) == 0) {
        pthread_mutex_lock(&s->mu);
        s->st.quarantined++;
        pthread_mutex_unlock(&s->mu);
        store_logf(s, "store: session '%s': record moved to %s: %s", id, s->q_dir, why);
    } else if (errno != ENOENT) {
        store_logf(s, "store: session '%s': cannot move its record '%s' to quarantine (%s): %s",
                   id, path, strerror(errno), why);
    }
}

/* Read a whole file (at most max bytes) into a malloc'd buffer. */
static int read_all(const char *path, uint64_t max, uint8_t **out, size_t *len, kp_err *err) {
    *out = NULL;
    *len = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kp_errf(err, errno == ENOENT ? KP_ENOTFOUND : KP_EIO,
                               "store: cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb)) {
        int e = errno;
        close(fd);
        return kp_errf(err, KP_EIO, "store: cannot stat '%s': %s", path, strerror(e));
    }
    if ((uint64_t)sb.st_size > max) {
        close(fd);
        return kp_errf(err, KP_EFORMAT, "store: '%s' is %lld bytes, more than a record can be",
                       path, (long long)sb.st_size);
    }
    size_t n = (size_t)sb.st_size;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        close(fd);
        return kp_errf(err, KP_ENOMEM, "store: out of memory reading '%s'", path);
    }
    ssize_t got = fs_pread_all(fd, buf, n, 0);
    int e = errno;
    close(fd);
    if (got < 0 || (size_t)got != n) {
        free(buf);
        return kp_errf(err, KP_EIO, "store: cannot read '%s': %s", path,
                       got < 0 ? strerror(e) : "file shrank while reading");
    }
    *out = buf;
    *len = n;
    return 0;
}

/* ---- records ---------------------------------------------------------------------- */

/* The record bytes of a version (malloc'd). */
int store_rec_build(const park_manifest *m, const uint8_t *extra, size_t extra_len, int64_t mtime,
                     uint8_t **out, size_t *len, kp_err *err) {
    uint8_t *mb = NULL;
    size_t ml = 0;
    int rc = park_manifest_write(m, &mb, &ml, err);
    if (rc) return rc;
    size_t n = STORE_REC_HDR + ml + extra_len;
    uint8_t *b = calloc(1, n);
    if (!b) {
        free(mb);
        return kp_errf(err, KP_ENOMEM, "store: out of memory (%zu byte record)", n);
    }
    memcpy(b, STORE_REC_MAGIC, 8);
    kp_put_u32(b + 8, STORE_REC_VERSION);
    kp_put_u32(b + 12, STORE_REC_HDR);
    kp_put_u32(b + 16, (uint32_t)ml);
    kp_put_u32(b + 20, (uint32_t)extra_len);
    kp_put_u32(b + 24, (uint32_t)m->n_tokens);
    kp_put_u64(b + 32, (uint64_t)mtime);
    kp_put_u64(b + 40, XXH64(extra_len ? extra : b, extra_len, 0));
    kp_put_u64(b + 56, XXH64(b, 56, 0));
    memcpy(b + STORE_REC_HDR, mb, ml);
    if (extra_len) memcpy(b + STORE_REC_HDR + ml, extra, extra_len);
    free(mb);
    *out = b;
    *len = n;
    return 0;
}

static size_t rec_size(const park_manifest *m, size_t extra_len) {
    return STORE_REC_HDR + 136 + 4 * (size_t)m->n_tokens + 32 * (size_t)m->n_spans + extra_len;
}

/* Parse and check record bytes. KP_EFORMAT (or KP_EUNSUP for a version)
 * with the reason; on success *m, *extra (malloc'd, >= 1 byte), *mtime. */
int store_rec_parse(const uint8_t *b, size_t len, park_manifest *m, uint8_t **extra,
                    size_t *extra_len, int64_t *mtime, kp_err *err) {
    memset(m, 0, sizeof *m);
    *extra = NULL;
    *extra_len = 0;
    if (len < STORE_REC_HDR)
        return kp_errf(err, KP_EFORMAT, "record of %zu bytes is shorter than its header", len);
    if (memcmp(b, STORE_REC_MAGIC, 8) != 0) return kp_errf(err, KP_EFORMAT, "bad record magic");
    if (XXH64(b, 56, 0) != kp_get_u64(b + 56))
        return kp_errf(err, KP_EFORMAT, "record header checksum mismatch");
    if (kp_get_u32(b + 8) != STORE_REC_VERSION)
        return kp_errf(err, KP_EUNSUP, "record version %u is not supported (want %u)",
                       kp_get_u32(b + 8), STORE_REC_VERSION);
    if (kp_get_u32(b + 12) != STORE_REC_HDR || kp_get_u32(b + 28) != 0 || kp_get_u64(b + 48) != 0)
        return kp_errf(err, KP_EFORMAT, "record header has unknown fields");
    uint32_t ml = kp_get_u32(b + 16), xl = kp_get_u32(b + 20), nt = kp_get_u32(b + 24);
    if (xl > STORE_EXTRA_MAX)
        return kp_errf(err, KP_EFORMAT, "record claims %u extra bytes (max %u)", xl,
                       STORE_EXTRA_MAX);
    if ((uint64_t)STORE_REC_HDR + ml + xl != (uint64_t)len)
        return kp_errf(err, KP_EFORMAT, "record is %zu bytes, its header says %llu (truncated or "
                       "padded)", len, (unsigned long long)STORE_REC_HDR + ml + xl);
    const uint8_t *x = b + STORE_REC_HDR + ml;
    if (XXH64(xl ? x : b, xl, 0) != kp_get_u64(b + 40))
        return kp_errf(err, KP_EFORMAT, "extra bytes checksum mismatch");
    kp_err e2 = {0};
    int rc = park_manifest_read(b + STORE_REC_HDR, ml, m, &e2);
    if (rc) return kp_errf(err, rc == KP_ENOMEM ? rc : KP_EFORMAT, "%s", e2.msg);
    if ((uint32_t)m->n_tokens != nt || m->n_tokens < 1) {
        park_manifest_free(m);
        return kp_errf(err, KP_EFORMAT, "record says %u tokens, its manifest %d", nt, m->n_tokens);
    }
    uint8_t *xc = malloc(xl ? xl : 1);
    if (!xc) {
        park_manifest_free(m);
        return kp_errf(err, KP_ENOMEM, "out of memory (%u extra bytes)", xl);
    }
    if (xl) memcpy(xc, x, xl);
    *extra = xc;
    *extra_len = xl;
    *mtime = (int64_t)kp_get_u64(b + 32);
    return 0;
}

/* Write the record of id durably (tmp, fsync, rename, fsync dir). */
static int rec_write(store *s, const char *id, const uint8_t *buf, size_t len, kp_err *err) {
    char path[STORE_PATH_MAX], tmp[STORE_PATH_MAX];
    rec_path(s, id, false, path);
    rec_path(s, id, true, tmp);
    const char *what;
    if (fs_write_replace(tmp, path, buf, len, NULL, 0, &what))
        return kp_errf(err, fs_write_errcode(errno), "store: session '%s': %s of '%s' failed: %s", id, what, tmp,
                       strerror(errno));
    /* The rename is the commit point: a failing directory fsync cannot undo
     * it, so it is logged rather than reported as a failed save. */
    if (fs_fsync_dir(s->sess_dir))
        store_logf(s, "store: session '%s': record renamed into place but fsync of '%s' failed: "
                   "%s", id, s->sess_dir, strerror(errno));
    return 0;
}

/* Unlink id's record (ENOENT is fine). 0 or -1 with errno. */
static int rec_unlink(store *s, const char *id) {
    char path[STORE_PATH_MAX];
    rec_path(s, id, false, path);
    if (unlink(path) && errno != ENOENT) return -1;
    fs_fsync_dir(s->sess_dir);
    return 0;
}

/* ---- codecs -----------------------------------------------------------------------
 *
 * The registry: every codec this store decodes with, each opened once and
 * kept until store_close (a session's cc points into it). A manifest names
 * its codec by label and, for a codec file, by the XXH3 of the file's bytes
 * (park_codec_hash); a built-in by its name alone.
 *
 * Codec files are kept: the store copies every codec file it saves with
 * into DIR/codecs/HASH.kvcodec (durably, before the first save with it) and
 * opens every file there at open, so a session parked with an earlier codec
 * (another --codec, a codec the server calibrated itself and replaced) stays
 * readable after the original file is gone. A file there of another model is
 * left alone (codec_open refuses its fingerprint). Kept files are never
 * removed by the store: they are small next to the sessions they decode.
 */

static store_codec *codec_find(const store *s, uint64_t hash, const char *label) {
    for (size_t i = 0; i < s->n_codecs; i++) {
        store_codec *ce = s->codecs[i];
        if (hash ? ce->hash == hash : (ce->hash == 0 && strcmp(ce->label, label) == 0)) return ce;
    }
    return NULL;
}

static int codec_add(store *s, store_codec *ce, kp_err *err) {
    store_codec **nv = realloc(s->codecs, (s->n_codecs + 1) * sizeof *nv);
    if (!nv) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    s->codecs = nv;
    s->codecs[s->n_codecs++] = ce;
    return 0;
}

/* Open a codec (a built-in name or a codec file's path) as a registry entry;
 * not added. */
static int codec_ent_open(store *s, const char *name, store_codec **out, kp_err *err) {
    *out = NULL;
    store_codec *ce = calloc(1, sizeof *ce);
    if (!ce) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    int rc = codec_open(&ce->c, name, &s->o.shape, err);
    if (rc) {
        free(ce);
        return rc;
    }
    ce->layout = s->o.layout;
    /* A calibrated codec brings the layout it was fitted and measured with
     * (lossless sink and window, chunk rows): park with exactly that. */
    int lc, ls, lw;
    if (!codec_layout(ce->c, &lc, &ls, &lw)) ce->layout = (park_layout){.sink = ls, .window = lw, .chunk = lc};
    if (store_codec_builtin(name)) {
        snprintf(ce->label, sizeof ce->label, "%s", name); /* a file of that name in the cwd is not the codec */
    } else {
        ce->hash = park_codec_hash(name);
        if (!ce->hash) {
            codec_free(ce->c);
            free(ce);
            return kp_errf(err, KP_EIO, "store: cannot read codec file '%s' to identify it", name);
        }
        const char *base = strrchr(name, '/');
        snprintf(ce->label, sizeof ce->label, "%s", base ? base + 1 : name);
    }
    *out = ce;
    return 0;
}

static void codec_ent_free(store_codec *ce) {
    if (!ce) return;
    codec_free(ce->c);
    free(ce);
}

static void codec_kept_path(const store *s, uint64_t hash, char *path, size_t n) {
    snprintf(path, n, "%s/codecs/%016llx.kvcodec", s->dir, (unsigned long long)hash);
}

/* Copy the codec file src into DIR/codecs (durable) unless a copy is there. */
static int codec_keep(store *s, const store_codec *ce, const char *src, kp_err *err) {
    char path[STORE_DIR_MAX + 64], tmp[STORE_DIR_MAX + 80], dir[STORE_DIR_MAX + 16];
    codec_kept_path(s, ce->hash, path, sizeof path);
    if (park_codec_hash(path) == ce->hash) return 0;
    snprintf(dir, sizeof dir, "%s/codecs", s->dir);
    if (fs_mkdir_p(dir))
        return kp_errf(err, KP_EIO, "store: cannot create '%s': %s", dir, strerror(errno));
    FILE *f = fopen(src, "rb");
    if (!f) return kp_errf(err, KP_EIO, "store: cannot read codec file '%s': %s", src, strerror(errno));
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0, got;
    int rc = 0;
    do {
        if (len == cap) {
            uint8_t *nb = realloc(buf, cap = cap ? 2 * cap : 1 << 16);
            if (!nb) {
                rc = kp_errf(err, KP_ENOMEM, "store: out of memory reading '%s'", src);
                break;
            }
            buf = nb;
        }
        got = fread(buf + len, 1, cap - len, f);
        len += got;
    } while (got > 0);
    if (!rc && ferror(f)) rc = kp_errf(err, KP_EIO, "store: cannot read codec file '%s'", src);
    fclose(f);
    if (!rc && XXH3_64bits(buf, len) != ce->hash)
        rc = kp_errf(err, KP_EIO, "store: codec file '%s' changed while it was read; not kept", src);
    if (!rc) {
        snprintf(tmp, sizeof tmp, "%s.%d.tmp", path, (int)getpid());
        const char *what = "write";
        if (fs_write_replace(tmp, path, buf, len, NULL, 0, &what))
            rc = kp_errf(err, fs_write_errcode(errno), "store: cannot keep codec file '%s' as '%s' (%s): %s",
                         src, path, what, strerror(errno));
        else
            fs_fsync_dir(dir);
    }
    free(buf);
    return rc;
}

/* Open every kept codec file of this model in DIR/codecs (at open). */
static void codec_load_kept(store *s) {
    char dir[STORE_DIR_MAX + 16];
    snprintf(dir, sizeof dir, "%s/codecs", s->dir);
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *de;
    while ((de = readdir(d))) {
        if (!fs_has_suffix(de->d_name, ".kvcodec")) continue;
        char path[STORE_DIR_MAX + 300];
        snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
        uint64_t h = park_codec_hash(path);
        if (!h || codec_find(s, h, NULL)) continue;
        store_codec *ce = NULL;
        kp_err e2 = {0};
        if (codec_ent_open(s, path, &ce, &e2)) continue; /* another model's, or unreadable */
        if (codec_add(s, ce, &e2)) codec_ent_free(ce);
    }
    closedir(d);
}

/* The codec that decodes manifests like m, or NULL (foreign). mu held or
 * at open. */
const codec *store_codec_for(store *s, const park_manifest *m) {
    store_codec *ce = codec_find(s, m->codec_hash, m->codec);
    if (ce) return ce->c;
    if (m->codec_hash || !store_codec_builtin(m->codec)) return NULL;
    kp_err e2 = {0};
    if (codec_ent_open(s, m->codec, &ce, &e2)) return NULL;
    if (codec_add(s, ce, &e2)) {
        codec_ent_free(ce);
        return NULL;
    }
    return ce->c;
}

/* Open name (built-in or file), keep a file's copy, register it. */
static int codec_register(store *s, const char *name, store_codec **out, kp_err *err) {
    store_codec *ce = NULL;
    int rc = codec_ent_open(s, name, &ce, err);
    if (rc) return rc;
    if (ce->hash && (rc = codec_keep(s, ce, name, err))) {
        codec_ent_free(ce);
        return rc;
    }
    pthread_mutex_lock(&s->mu);
    store_codec *have = codec_find(s, ce->hash, ce->label);
    if (have) {
        *out = have; /* its label stays: other threads may be reading it */
    } else if (!(rc = codec_add(s, ce, err))) {
        *out = ce;
        ce = NULL;
    }
    pthread_mutex_unlock(&s->mu);
    codec_ent_free(ce);
    return rc;
}

void store_codec_get(store *s, store_codec_info *ci) {
    pthread_mutex_lock(&s->mu);
    const store_codec *ce = s->cur;
    *ci = (store_codec_info){.name = ce->label, .kind = codec_name(ce->c), .file_hash = ce->hash,
                             .layout = ce->layout};
    for (size_t i = 0; i < s->n_codecs; i++) ci->n_files += s->codecs[i]->hash != 0;
    pthread_mutex_unlock(&s->mu);
}

int store_set_codec(store *s, const char *name, kp_err *err) {
    if (!s || !name || !name[0]) return kp_errf(err, KP_EINVAL, "store: no codec given");
    if (s->o.remote)
        return kp_errf(err, KP_EUNSUP, "store: the codec cannot change while a remote tier is used "
                       "(every replica must park with the same codec)");
    store_codec *ce = NULL;
    int rc = codec_register(s, name, &ce, err);
    if (rc) return rc;
    pthread_mutex_lock(&s->mu);
    s->cur = ce;
    pthread_mutex_unlock(&s->mu);
    store_logf(s, "store: new saves park with codec '%s' (chunk %d, sink %d, window %d)", ce->label,
               ce->layout.chunk, ce->layout.sink, ce->layout.window);
    return 0;
}

/* ---- the index (mu held) ------------------------------------------------------------ */

int store_foreign(store *s, const park_manifest *m, const codec **cc) {
    *cc = NULL;
    if (m->model_fingerprint != s->o.shape.model_fingerprint) return STORE_FOREIGN_MODEL;
    if (m->kv_type != s->o.kv_type) return STORE_FOREIGN_TYPE;
    if (!(*cc = store_codec_for(s, m))) return STORE_FOREIGN_CODEC;
    return 0;
}

store_sess *store_find(const store *s, const char *id) {
    for (size_t i = 0; i < s->n; i++)
        if (strcmp(s->v[i]->id, id) == 0) return s->v[i];
    return NULL;
}

static int index_add(store *s, store_sess *e) {
    if (s->n == s->cap) {
        size_t nc = s->cap ? 2 * s->cap : 16;
        store_sess **nv = realloc(s->v, nc * sizeof *nv);
        if (!nv) return KP_ENOMEM;
        s->v = nv;
        s->cap = nc;
    }
    s->v[s->n++] = e;
    return 0;
}

static void sess_free(store_sess *e) {
    if (!e) return;
    park_manifest_free(&e->man);
    park_manifest_free(&e->old);
    free(e->extra);
    free(e);
}

/* Take e out of the index; free it unless a restore still pins it. */
static void index_remove(store *s, store_sess *e) {
    for (size_t i = 0; i < s->n; i++)
        if (s->v[i] == e) {
            s->v[i] = s->v[--s->n];
            break;
        }
    if (e->pins) e->dead = true;
    else sess_free(e);
}

/* Wait until no call works on id, then mark it busy. Returns its entry, or
 * (create) a new placeholder, or NULL (absent; with create: out of memory). */
store_sess *store_sess_acquire(store *s, const char *id, bool create) {
    for (;;) {
        store_sess *e = store_find(s, id);
        if (!e) {
            if (!create) return NULL;
            e = calloc(1, sizeof *e);
            if (!e || index_add(s, e)) {
                free(e);
                return NULL;
            }
            snprintf(e->id, sizeof e->id, "%s", id);
            e->busy = true;
            return e;
        }
        if (!e->busy) {
            e->busy = true;
            return e;
        }
        pthread_cond_wait(&s->cv, &s->mu);
    }
}

/* The busy holder is done with e. A placeholder that never got data goes. */
void store_sess_release(store *s, store_sess *e) {
    e->busy = false;
    if (!e->has_data) index_remove(s, e);
    pthread_cond_broadcast(&s->cv);
}

/* Release a manifest's references and free it (mu NOT held). */
void store_release_manifest(store *s, park_manifest *m) {
    if (m->n_spans) park_release(s->cas, m);
    park_manifest_free(m);
}

/* A manifest of a session whose KV is lost: its token ids (and codec, layout)
 * and no spans. store_load_kv answers KP_ELOST for it; the caller recomputes
 * the KV from the tokens and its next save is an ordinary version again. */
bool store_kv_lost(const park_manifest *m) { return m->n_tokens > 0 && m->n_spans == 0; }

/* *out = m without its spans (tokens copied). */
static int tokens_only(const park_manifest *m, park_manifest *out, kp_err *err) {
    *out = *m;
    out->spans = NULL;
    out->n_spans = 0;
    out->tokens = malloc(sizeof *out->tokens * (size_t)(m->n_tokens > 0 ? m->n_tokens : 1));
    if (!out->tokens) {
        memset(out, 0, sizeof *out);
        return kp_errf(err, KP_ENOMEM, "store: out of memory (%d token ids)", m->n_tokens);
    }
    if (m->n_tokens > 0) memcpy(out->tokens, m->tokens, sizeof *out->tokens * (size_t)m->n_tokens);
    return 0;
}

/* Write id's tokens-only record (lost: a tokens_only manifest), in place of
 * whatever record it had. 0 or a negative code (logged by the caller). */
static int write_lost_record(store *s, const char *id, const park_manifest *lost, const uint8_t *extra,
                             size_t extra_len, int64_t mtime, size_t *rec_len, kp_err *err) {
    uint8_t *rec = NULL;
    int rc = store_rec_build(lost, extra, extra_len, mtime, &rec, rec_len, err);
    if (!rc) rc = rec_write(s, id, rec, *rec_len, err);
    free(rec);
    return rc;
}

/* Take a busy entry out of the index, handing its versions to the caller
 * (who releases them with mu NOT held: readers never see a half-released
 * manifest). mu held. */
void store_sess_forget(store *s, store_sess *e, park_manifest *man, park_manifest *old) {
    if (e->remote_only) park_manifest_free(&e->man); /* it holds no references */
    *man = e->man;
    *old = e->old;
    memset(&e->man, 0, sizeof e->man);
    memset(&e->old, 0, sizeof e->old);
    e->has_data = false;
    e->has_old = false;
    e->busy = false;
    index_remove(s, e);
    pthread_cond_broadcast(&s->cv);
}

/* ---- cold budget --------------------------------------------------------------------- */

/* Drop whole sessions, least recently used first, until the cold tier is
 * within budget; never keep_id, a pinned or a busy session. mu NOT held. */
static void enforce_cold(store *s, const char *keep_id) {
    if (!s->o.cold_budget) return;
    pthread_mutex_lock(&s->mu);
    while (s->evicting) pthread_cond_wait(&s->cv, &s->mu);
    s->evicting = true;
    pthread_mutex_unlock(&s->mu);
    bool stuck_logged = false;
    for (;;) {
        cas_stats cs;
        cas_get_stats(s->cas, &cs);
        if (cs.cold_bytes <= s->o.cold_budget) break;
        pthread_mutex_lock(&s->mu);
        store_sess *v = NULL;
        for (size_t i = 0; i < s->n; i++) {
            store_sess *e = s->v[i];
            if (!e->has_data || e->busy || e->pins || e->remote_only || (keep_id && !strcmp(e->id, keep_id)))
                continue;
            if (!v || e->lru < v->lru) v = e;
        }
        if (!v) {
            pthread_mutex_unlock(&s->mu);
            if (!stuck_logged)
                store_logf(s, "store: cold tier holds %llu bytes, over its budget of %llu, but "
                           "no session can be dropped now (the others are in use, or the bytes "
                           "belong to the session just saved or to foreign sessions)",
                           (unsigned long long)cs.cold_bytes,
                           (unsigned long long)s->o.cold_budget);
            break;
        }
        v->busy = true;
        char id[STORE_ID_MAX + 1];
        snprintf(id, sizeof id, "%s", v->id);
        uint64_t bytes = v->obj_bytes + v->rec_bytes;
        bool on_disk = v->durable || v->has_old;
        pthread_mutex_unlock(&s->mu);
        /* write-back: the session leaves this replica for the remote tier (v is
         * busy: its version is stable without the lock) */
        if (s->o.remote && s->o.remote_policy == STORE_REMOTE_WRITE_BACK)
            store_remote_push(s, id, &v->man, v->extra, v->extra_len, v->mtime_ms, true);

        if (on_disk && rec_unlink(s, id))
            store_logf(s, "store: dropping session '%s': cannot remove its record: %s", id,
                       strerror(errno));
        park_manifest m1, m2;
        pthread_mutex_lock(&s->mu);
        s->st.dropped++;
        store_sess_forget(s, v, &m1, &m2);
        pthread_mutex_unlock(&s->mu);
        store_release_manifest(s, &m1);
        store_release_manifest(s, &m2);
        cas_collect(s->cas);
        store_logf(s, "store: dropped session '%s' (%llu bytes, least recently used): the cold "
                   "tier held %llu bytes, over its budget of %llu bytes (--cold-budget)", id,
                   (unsigned long long)bytes, (unsigned long long)cs.cold_bytes,
                   (unsigned long long)s->o.cold_budget);
        if (s->o.on_drop) s->o.on_drop(s->o.ud, id);
        stuck_logged = true;
    }
    pthread_mutex_lock(&s->mu);
    s->evicting = false;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
}

/* ---- save / flush ---------------------------------------------------------------------- */

/* Every object of m into the cold tier. */
static int persist_all(store *s, const char *id, const park_manifest *m, kp_err *err) {
    for (int i = 0; i < m->n_spans; i++) {
        kp_err e2 = {0};
        int rc = cas_persist(s->cas, m->spans[i].key, &e2);
        if (rc)
            return kp_errf(err, rc == KP_ENOTFOUND ? KP_EFORMAT : rc,
                           "store: session '%s': span %d (tokens %d..%d) cannot be made durable: "
                           "%s", id, i, m->spans[i].span.start,
                           m->spans[i].span.start + m->spans[i].span.n - 1, e2.msg);
    }
    return 0;
}

/* The save proper; e is busy (ours). */
static int save_work(store *s, store_sess *e, const store_item *it, bool durable,
                     store_save_stats *st, kp_err *err) {
    double t0 = kp_now();
    const char *id = e->id;
    park_manifest nm;
    park_stats ps;
    pthread_mutex_lock(&s->mu);
    const store_codec *cur = s->cur; /* store_set_codec may change it meanwhile */
    pthread_mutex_unlock(&s->mu);
    int rc = park_save_scoped(s->cas, cur->c, cur->hash, cur->label,
                       s->o.shape.model_fingerprint, it->scope, &cur->layout, it->kv, it->tokens,
                       it->n_tokens, durable, &nm, &ps, err);
    if (rc) {
        cas_collect(s->cas); /* objects put before the failure */
        return rc;
    }
    uint8_t *extra = malloc(it->extra_len ? it->extra_len : 1);
    uint8_t *rec = NULL;
    size_t rec_len = rec_size(&nm, it->extra_len);
    if (!extra) {
        rc = kp_errf(err, KP_ENOMEM, "store: out of memory (%zu extra bytes)", it->extra_len);
        goto fail;
    }
    if (it->extra_len) memcpy(extra, it->extra, it->extra_len);
    if (s->o.cold_budget && ps.bytes_total > s->o.cold_budget) {
        rc = kp_errf(err, KP_ERANGE, "store: session '%s' needs %llu bytes of objects, more than "
                     "the whole cold budget of %llu bytes (raise --cold-budget or use a smaller "
                     "codec); its previous version is kept", id,
                     (unsigned long long)ps.bytes_total, (unsigned long long)s->o.cold_budget);
        goto fail;
    }
    int64_t mtime = now_unix_ms();
    if (durable) {
        if ((rc = persist_all(s, id, &nm, err))) goto fail;
        if ((rc = store_rec_build(&nm, extra, it->extra_len, mtime, &rec, &rec_len, err))) goto fail;
        if ((rc = rec_write(s, id, rec, rec_len, err))) goto fail;
        free(rec);
        rec = NULL;
    }

    /* Commit: swap the new version in; release what it replaces. */
    park_manifest rel1 = {0}, rel2 = {0};
    pthread_mutex_lock(&s->mu);
    if (durable) {
        if (e->has_data) rel1 = e->man;
        if (e->has_old) rel2 = e->old;
        memset(&e->old, 0, sizeof e->old);
        e->has_old = false;
    } else if (e->has_data && e->durable) {
        e->old = e->man; /* the record on disk: kept until flush */
        e->has_old = true;
    } else if (e->has_data) {
        rel1 = e->man;
    }
    if (e->remote_only) { /* what the save replaces held no references */
        park_manifest_free(&rel1);
        memset(&rel1, 0, sizeof rel1);
        e->remote_only = false;
    }
    e->man = nm;
    e->cc = cur->c;
    free(e->extra);
    e->extra = extra;
    e->extra_len = it->extra_len;
    e->durable = durable;
    e->obj_bytes = ps.bytes_total;
    e->rec_bytes = rec_len;
    e->mtime_ms = mtime;
    e->lru = ++s->tick;
    e->has_data = true;
    s->st.saves++;
    s->st.saved_fp16_bytes += ps.fp16_bytes;
    s->st.saved_coded_bytes += ps.bytes_total;
    s->st.saved_new_bytes += ps.bytes_new;
    pthread_mutex_unlock(&s->mu);
    bool collect = rel1.n_spans || rel2.n_spans;
    store_release_manifest(s, &rel1); /* tokens-only versions (store_kv_lost) hold no spans */
    store_release_manifest(s, &rel2);
    if (collect) cas_collect(s->cas);
    if (s->o.remote && s->o.remote_policy == STORE_REMOTE_WRITE_THROUGH)
        store_remote_push(s, id, &e->man, e->extra, e->extra_len, mtime, true);
    if (st) {
        st->bytes_new = ps.bytes_new;
        st->bytes_total = ps.bytes_total;
        st->fp16_bytes = ps.fp16_bytes;
        st->spans_reused = ps.spans_reused;
        st->ms = (kp_now() - t0) * 1e3;
        st->codec = cur->label;
    }
    return 0;

fail:
    free(rec);
    free(extra);
    store_release_manifest(s, &nm);
    cas_collect(s->cas);
    return rc;
}

static int check_kv_shape(const store *s, const kv_cache *kv, const char *what, kp_err *err) {
    const codec_shape *sh = &s->o.shape;
    if (kv->n_layer != sh->n_layer || kv->n_kv_heads != sh->n_kv_heads ||
        kv->head_dim != sh->head_dim)
        return kp_errf(err, KP_EMISMATCH, "store: %s: KV cache of %d layers x %d heads x %d dims, "
                       "the store holds %d x %d x %d", what, kv->n_layer, kv->n_kv_heads,
                       kv->head_dim, sh->n_layer, sh->n_kv_heads, sh->head_dim);
    return 0;
}

int store_save_impl(store *s, const char *id, const store_item *it, bool durable,
                     store_save_stats *st, kp_err *err) {
    if (st) memset(st, 0, sizeof *st);
    CHECK_ID(id);
    if (!it || !it->kv || !it->tokens)
        return kp_errf(err, KP_EINVAL, "store: save '%s': no item, tokens or KV cache", id);
    if (it->n_tokens < 1 || it->n_tokens != it->kv->n_pos)
        return kp_errf(err, KP_EINVAL, "store: save '%s': %d tokens but the KV cache holds %d "
                       "rows (need tokens = rows >= 1)", id, it->n_tokens, it->kv->n_pos);
    if (it->extra_len > STORE_EXTRA_MAX || (it->extra_len && !it->extra))
        return kp_errf(err, KP_EINVAL, "store: save '%s': %zu extra bytes (max %u)", id,
                       it->extra_len, STORE_EXTRA_MAX);
    for (int i = 0; i < it->n_tokens; i++)
        if (it->tokens[i] < 0)
            return kp_errf(err, KP_EINVAL, "store: save '%s': token %d has a negative id %d", id,
                           i, (int)it->tokens[i]);
    int rc = check_kv_shape(s, it->kv, "save", err);
    if (rc) return rc;
    if (it->kv->kv_type != s->o.kv_type)
        return kp_errf(err, KP_EMISMATCH, "store: save '%s': KV cache of type %d, the store "
                       "holds type %d", id, it->kv->kv_type, s->o.kv_type);

    pthread_mutex_lock(&s->mu);
    store_sess *e = store_sess_acquire(s, id, true);
    pthread_mutex_unlock(&s->mu);
    if (!e) return kp_errf(err, KP_ENOMEM, "store: out of memory adding session '%s'", id);

    rc = save_work(s, e, it, durable, st, err);

    pthread_mutex_lock(&s->mu);
    if (rc == KP_EIO || rc == KP_ENOSPC) s->st.io_errors++;
    store_sess_release(s, e);
    pthread_mutex_unlock(&s->mu);
    if (rc == KP_EIO || rc == KP_ENOSPC) store_logf(s, "store: save of session '%s' failed (previous version kept): %s",
                                 id, err ? err->msg : "I/O error");
    if (rc == 0) enforce_cold(s, id);
    return rc;
}

int store_save(store *s, const char *id, const store_item *item, bool durable, store_save_stats *st,
               kp_err *err) {
    if (!s) return kp_errf(err, KP_EINVAL, "store: save: NULL store");
    return store_save_impl(s, id, item, durable, st, err);
}

/* Make e's current version durable; e is busy (ours). */
static int flush_work(store *s, store_sess *e, kp_err *err) {
    if (e->durable || e->remote_only) return 0; /* remote-only: its durable copy is Redis's */
    int rc = persist_all(s, e->id, &e->man, err);
    if (rc) return rc;
    uint8_t *rec = NULL;
    size_t len = 0;
    if ((rc = store_rec_build(&e->man, e->extra, e->extra_len, e->mtime_ms, &rec, &len, err))) return rc;
    rc = rec_write(s, e->id, rec, len, err);
    free(rec);
    if (rc) return rc;
    park_manifest rel = {0};
    pthread_mutex_lock(&s->mu);
    if (e->has_old) rel = e->old;
    memset(&e->old, 0, sizeof e->old);
    e->has_old = false;
    e->durable = true;
    e->rec_bytes = len;
    pthread_mutex_unlock(&s->mu);
    bool collect = rel.n_spans > 0;
    store_release_manifest(s, &rel);
    if (collect) cas_collect(s->cas);
    return 0;
}

int store_flush(store *s, const char *id, kp_err *err) {
    CHECK_ID(id);
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_sess_acquire(s, id, false);
    pthread_mutex_unlock(&s->mu);
    if (!e) return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    int rc = flush_work(s, e, err);
    pthread_mutex_lock(&s->mu);
    if (rc == KP_EIO || rc == KP_ENOSPC) s->st.io_errors++;
    store_sess_release(s, e);
    pthread_mutex_unlock(&s->mu);
    if (rc == 0) enforce_cold(s, id);
    return rc;
}

/* Replace e's extra bytes; e is busy (ours). A durable record is rewritten
 * (same manifest and mtime) before the swap, so on failure nothing changed. */
static int set_extra_work(store *s, store_sess *e, const void *extra, size_t extra_len, kp_err *err) {
    uint8_t *x = malloc(extra_len ? extra_len : 1);
    if (!x) return kp_errf(err, KP_ENOMEM, "store: out of memory (%zu extra bytes)", extra_len);
    if (extra_len) memcpy(x, extra, extra_len);
    int rc = 0;
    size_t len = e->rec_bytes;
    if (e->durable) {
        uint8_t *rec = NULL;
        rc = store_rec_build(&e->man, x, extra_len, e->mtime_ms, &rec, &len, err);
        if (!rc) rc = rec_write(s, e->id, rec, len, err);
        free(rec);
    }
    if (rc) {
        free(x);
        return rc;
    }
    pthread_mutex_lock(&s->mu);
    free(e->extra);
    e->extra = x;
    e->extra_len = extra_len;
    if (e->durable) e->rec_bytes = len;
    pthread_mutex_unlock(&s->mu);
    if (s->o.remote && (s->o.remote_policy == STORE_REMOTE_WRITE_THROUGH || e->remote_only))
        store_remote_push(s, e->id, &e->man, e->extra, e->extra_len, e->mtime_ms, false);
    return 0;
}

int store_set_extra(store *s, const char *id, const void *extra, size_t extra_len, kp_err *err) {
    CHECK_ID(id);
    if (extra_len > STORE_EXTRA_MAX || (extra_len && !extra))
        return kp_errf(err, KP_EINVAL, "store: '%s': %zu extra bytes (max %u)", id, extra_len, STORE_EXTRA_MAX);
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_sess_acquire(s, id, false);
    pthread_mutex_unlock(&s->mu);
    if (!e) return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    int rc = set_extra_work(s, e, extra, extra_len, err);
    pthread_mutex_lock(&s->mu);
    if (rc == KP_EIO || rc == KP_ENOSPC) s->st.io_errors++;
    store_sess_release(s, e);
    pthread_mutex_unlock(&s->mu);
    return rc;
}

/* ---- the per-store secret ------------------------------------------------------------- */

int store_secret(const char *dir, uint8_t out[STORE_SECRET_BYTES], kp_err *err) {
    char path[STORE_PATH_MAX], tmp[STORE_PATH_MAX];
    if (!dir || strlen(dir) > STORE_DIR_MAX)
        return kp_errf(err, KP_EINVAL, "store: the directory name is missing or too long");
    if (fs_mkdir_p(dir))
        return kp_errf(err, KP_EIO, "store: cannot create '%s': %s", dir, strerror(errno));
    if (sodium_init() < 0) return kp_errf(err, KP_EIO, "store: libsodium cannot start (no random source?)");
    snprintf(path, sizeof path, "%s/%s", dir, STORE_SECRET_FILE);
    for (int attempt = 0; attempt < 2; attempt++) {
        int fd = open(path, O_RDONLY | O_CLOEXEC | O_NOFOLLOW);
        if (fd >= 0) {
            struct stat sb;
            uint8_t buf[STORE_SECRET_BYTES + 1];
            ssize_t n = fstat(fd, &sb) ? -1 : fs_pread_all(fd, buf, sizeof buf, 0);
            if (n >= 0 && (sb.st_mode & 077)) fchmod(fd, 0600); /* a copy made readable: narrow it again */
            close(fd);
            if (n != STORE_SECRET_BYTES)
                return kp_errf(err, KP_EFORMAT,
                               "store: '%s' holds %zd bytes, not the %d of a store secret: it was damaged. "
                               "It keys the owner ids of the stored sessions, so it is not replaced: "
                               "restore it from a backup (a new one would make every stored session "
                               "unreachable by its key)",
                               path, n, STORE_SECRET_BYTES);
            memcpy(out, buf, STORE_SECRET_BYTES);
            return 0;
        }
        if (errno != ENOENT)
            return kp_errf(err, KP_EIO, "store: cannot read the store secret '%s': %s", path, strerror(errno));
        /* First start on this directory: draw one, write it to a private tmp
         * file and link it into place: link never replaces, so two servers
         * starting together end up with the same secret (the loser reads the
         * winner's on the next turn of the loop). */
        uint8_t key[STORE_SECRET_BYTES];
        randombytes_buf(key, sizeof key);
        snprintf(tmp, sizeof tmp, "%s/%s.%ld%s", dir, STORE_SECRET_FILE, (long)getpid(), STORE_TMP_EXT);
        fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
        int e = 0;
        if (fd < 0 || fs_write_all(fd, key, sizeof key) || fsync(fd)) e = errno;
        if (fd >= 0) close(fd);
        if (!e && link(tmp, path) && errno != EEXIST) e = errno;
        unlink(tmp);
        sodium_memzero(key, sizeof key);
        if (e)
            return kp_errf(err, fs_write_errcode(e), "store: cannot create the store secret '%s': %s", path,
                           strerror(e));
        fs_fsync_dir(dir);
    }
    return kp_errf(err, KP_EIO, "store: the store secret '%s' vanished while it was being created", path);
}

/* ---- load ------------------------------------------------------------------------------ */

int store_load_meta(store *s, const char *id, int *n_tokens, int32_t **tokens, void **extra,
                    size_t *extra_len, kp_err *err) {
    if (tokens) *tokens = NULL;
    if (extra) *extra = NULL;
    if (extra_len) *extra_len = 0;
    if (n_tokens) *n_tokens = 0;
    CHECK_ID(id);
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_find(s, id);
    if ((!e || !e->has_data) && s->o.remote) { /* not here: perhaps another replica's */
        pthread_mutex_unlock(&s->mu);
        int rc = store_remote_adopt(s, id, err);
        if (rc) return rc;
        pthread_mutex_lock(&s->mu);
        e = store_find(s, id);
    }
    if (!e || !e->has_data) {
        pthread_mutex_unlock(&s->mu);
        return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    }
    /* Small copies (tokens, <= 1 MiB extra) under the lock: a concurrent save
     * swaps versions under it, so this is one consistent version. */
    int n = e->man.n_tokens;
    int32_t *t = tokens ? malloc((size_t)n * sizeof *t) : NULL;
    void *x = extra ? malloc(e->extra_len ? e->extra_len : 1) : NULL;
    if ((tokens && !t) || (extra && !x)) {
        pthread_mutex_unlock(&s->mu);
        free(t);
        free(x);
        return kp_errf(err, KP_ENOMEM, "store: out of memory loading session '%s'", id);
    }
    if (t) memcpy(t, e->man.tokens, (size_t)n * sizeof *t);
    if (x && e->extra_len) memcpy(x, e->extra, e->extra_len);
    if (extra_len) *extra_len = e->extra_len;
    e->lru = ++s->tick;
    pthread_mutex_unlock(&s->mu);
    if (n_tokens) *n_tokens = n;
    if (tokens) *tokens = t;
    if (extra) *extra = x;
    return 0;
}

struct store_restore {
    store *s;
    store_sess *e;        /* pinned */
    park_restorer *pr;
};

/* A restore found e's KV unreadable (an object missing or corrupt here, or
 * evicted or corrupt in the remote tier): its record goes to quarantine (the
 * evidence), its references are released, and it stays indexed as a
 * tokens-only version (store_kv_lost), written back as its record when it
 * had one on disk, so the caller can recompute the KV from its token ids,
 * now and after a restart. Out of memory: forgotten instead (on_drop). e is
 * busy and pinned (ours); mu NOT held. */
static void lose_kv(store *s, store_sess *e, const char *why) {
    char id[STORE_ID_MAX + 1];
    snprintf(id, sizeof id, "%s", e->id);
    bool on_disk = e->durable || e->has_old;
    park_manifest lost, m1 = {0}, m2 = {0};
    kp_err e2 = {0};
    if (tokens_only(&e->man, &lost, &e2)) {
        if (on_disk) store_quarantine_record(s, id, why);
        pthread_mutex_lock(&s->mu);
        e->pins--;
        store_sess_forget(s, e, &m1, &m2);
        pthread_mutex_unlock(&s->mu);
        store_release_manifest(s, &m1);
        store_release_manifest(s, &m2);
        cas_collect(s->cas);
        store_logf(s, "store: session '%s' is damaged and was forgotten (%s): %s", id, e2.msg, why);
        if (s->o.on_drop) s->o.on_drop(s->o.ud, id);
        return;
    }
    size_t rec_len = 0;
    bool durable = false;
    if (on_disk) {
        store_quarantine_record(s, id, why);
        if (write_lost_record(s, id, &lost, e->extra, e->extra_len, e->mtime_ms, &rec_len, &e2) == 0)
            durable = true;
        else
            store_logf(s, "store: session '%s': its token ids cannot be written down (%s); they are kept "
                       "in memory only", id, e2.msg);
    }
    pthread_mutex_lock(&s->mu);
    bool held = !e->remote_only; /* a remote-only version holds no references */
    m1 = e->man;
    if (e->has_old) m2 = e->old;
    e->man = lost;
    memset(&e->old, 0, sizeof e->old);
    e->has_old = false;
    e->remote_only = false;
    e->durable = durable;
    e->obj_bytes = 0;
    e->rec_bytes = durable ? rec_len : 0;
    e->pins--;
    e->busy = false;
    s->st.kv_lost++;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (held) store_release_manifest(s, &m1);
    else park_manifest_free(&m1);
    store_release_manifest(s, &m2);
    cas_collect(s->cas);
    store_logf(s, "store: session '%s': its KV cannot be read (%s); its %d token ids are kept, and its KV "
               "is recomputed from them when it is next used", id, why, lost.n_tokens);
}

int store_load_kv_begin(store *s, const char *id, kv_cache *kv, store_restore **out, kp_err *err) {
    if (out) *out = NULL;
    CHECK_ID(id);
    if (!kv || !out) return kp_errf(err, KP_EINVAL, "store: load '%s': no KV cache", id);
    int rc = check_kv_shape(s, kv, "load", err);
    if (rc) return rc;
    store_restore *r = calloc(1, sizeof *r);
    if (!r) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_sess_acquire(s, id, false);
    if (!e && s->o.remote) { /* not here: perhaps another replica's */
        pthread_mutex_unlock(&s->mu);
        rc = store_remote_adopt(s, id, err);
        if (rc) {
            free(r);
            return rc;
        }
        pthread_mutex_lock(&s->mu);
        e = store_sess_acquire(s, id, false);
    }
    if (!e) {
        pthread_mutex_unlock(&s->mu);
        free(r);
        return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    }
    e->pins++;
    e->lru = ++s->tick;
    pthread_mutex_unlock(&s->mu);

    kp_err e2 = {0};
    if (e->remote_only && (rc = store_remote_fetch(s, e, &e2)) != 0) {
        if (rc == KP_EUNAVAIL || rc == KP_ENOMEM) { /* nothing changed: try again later */
            pthread_mutex_lock(&s->mu);
            e->pins--;
            store_sess_release(s, e);
            pthread_mutex_unlock(&s->mu);
            free(r);
            return kp_errf(err, rc, "%s", e2.msg);
        }
        /* evicted or damaged in Redis: the token ids remain */
        char why[KP_ERR_MAX + 32];
        snprintf(why, sizeof why, "the remote tier lost it: %s", e2.msg);
        lose_kv(s, e, why);
        free(r);
        return kp_errf(err, KP_ELOST, "store: session '%s': its KV is not in the remote tier any more (an "
                       "object evicted or corrupt): %s", id, e2.msg);
    }
    if (store_kv_lost(&e->man)) {
        int nt = e->man.n_tokens;
        pthread_mutex_lock(&s->mu);
        e->pins--;
        store_sess_release(s, e);
        pthread_mutex_unlock(&s->mu);
        free(r);
        return kp_errf(err, KP_ELOST, "store: session '%s' holds its %d token ids but no KV (it was lost "
                       "earlier): recompute it", id, nt);
    }
    rc = park_restore_begin(s->cas, e->cc, &e->man, kv, &r->pr, &e2);
    if (rc == KP_EFORMAT || rc == KP_ENOTFOUND) {
        char why[KP_ERR_MAX];
        snprintf(why, sizeof why, "%s", e2.msg);
        lose_kv(s, e, why);
        free(r);
        return kp_errf(err, KP_ELOST, "store: session '%s': its KV is damaged (the record was moved to "
                       "quarantine; its token ids are kept): %s", id, why);
    }
    pthread_mutex_lock(&s->mu);
    e->busy = false;
    if (rc) e->pins--;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        free(r);
        return kp_errf(err, rc, "store: session '%s': %s", id, e2.msg);
    }
    r->s = s;
    r->e = e;
    *out = r;
    return 0;
}

int store_load_kv_layer(store_restore *r, int layer, kp_err *err) {
    if (!r) return kp_errf(err, KP_EINVAL, "store: load layer: NULL handle");
    kp_err e2 = {0};
    int rc = park_restore_layer(r->pr, layer, &e2);
    if (rc) return kp_errf(err, rc, "store: session '%s': %s", r->e->id, e2.msg);
    return 0;
}

void store_load_kv_end(store_restore *r) {
    if (!r) return;
    int rc = park_restore_end(r->pr, NULL);
    store *s = r->s;
    pthread_mutex_lock(&s->mu);
    if (rc == 0) s->st.loads++;
    if (--r->e->pins == 0 && r->e->dead) sess_free(r->e);
    pthread_mutex_unlock(&s->mu);
    free(r);
}

int store_load_kv(store *s, const char *id, kv_cache *kv, kp_err *err) {
    store_restore *r = NULL;
    int rc = store_load_kv_begin(s, id, kv, &r, err);
    if (rc) return rc;
    for (int l = 0; l < kv->n_layer && rc == 0; l++) rc = store_load_kv_layer(r, l, err);
    store_load_kv_end(r);
    return rc;
}

/* ---- delete, has, stat, list, stats ------------------------------------------------------ */

int store_delete(store *s, const char *id, kp_err *err) {
    CHECK_ID(id);
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_sess_acquire(s, id, false);
    pthread_mutex_unlock(&s->mu);
    if (!e && s->o.remote) { /* only in Redis? then it goes from there */
        int rc = store_remote_adopt(s, id, err);
        if (rc) return rc;
        pthread_mutex_lock(&s->mu);
        e = store_sess_acquire(s, id, false);
        pthread_mutex_unlock(&s->mu);
    }
    if (!e) return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    if ((e->durable || e->has_old) && rec_unlink(s, id)) {
        int en = errno;
        pthread_mutex_lock(&s->mu);
        store_sess_release(s, e);
        pthread_mutex_unlock(&s->mu);
        return kp_errf(err, KP_EIO, "store: cannot delete session '%s': removing its record "
                       "failed: %s", id, strerror(en));
    }
    park_manifest m1, m2;
    pthread_mutex_lock(&s->mu);
    store_sess_forget(s, e, &m1, &m2);
    pthread_mutex_unlock(&s->mu);
    store_release_manifest(s, &m1);
    store_release_manifest(s, &m2);
    cas_collect(s->cas);
    /* so that no replica resumes it from there (queued: never waits on Redis) */
    if (s->o.remote && remote_enqueue_delete(s->o.remote, id))
        store_logf(s, "store: session '%s' deleted here; its delete could not be queued for the remote tier", id);
    return 0;
}

int store_has(store *s, const char *id) {
    if (!s || !store_id_valid(id)) return 0;
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_find(s, id);
    int has = e && e->has_data;
    pthread_mutex_unlock(&s->mu);
    return has;
}

/* An entry's public view plus its keys, copied under mu; the tier is
 * filled afterwards (cas_where, no store lock). */
typedef struct snap {
    store_entry ent;
    cas_key *keys;
    int n_keys;
    bool remote;     /* remote-only: nothing local */
} snap;

static int snap_take(const store_sess *e, snap *sn) {
    memset(sn, 0, sizeof *sn);
    snprintf(sn->ent.id, sizeof sn->ent.id, "%s", e->id);
    sn->ent.n_tokens = e->man.n_tokens;
    sn->ent.bytes = e->obj_bytes + e->rec_bytes;
    sn->ent.mtime_unix_ms = e->mtime_ms;
    sn->ent.durable = e->durable;
    sn->ent.kv_lost = store_kv_lost(&e->man);
    sn->remote = e->remote_only;
    sn->n_keys = e->man.n_spans;
    sn->keys = malloc((size_t)(sn->n_keys ? sn->n_keys : 1) * sizeof *sn->keys);
    if (!sn->keys) return KP_ENOMEM;
    for (int i = 0; i < sn->n_keys; i++) sn->keys[i] = e->man.spans[i].key;
    return 0;
}

/* "warm" if every object is in RAM, else "cold". */
static void snap_tier(store *s, snap *sn) {
    bool warm = sn->n_keys > 0 || (sn->ent.kv_lost && !sn->ent.durable); /* tokens only: where the record is */
    for (int i = 0; i < sn->n_keys && warm; i++)
        if (!(cas_where(s->cas, sn->keys[i]) & CAS_IN_WARM)) warm = false;
    snprintf(sn->ent.tier, sizeof sn->ent.tier, "%s", sn->remote ? "remote" : warm ? "warm" : "cold");
    free(sn->keys);
    sn->keys = NULL;
}

int store_stat(store *s, const char *id, store_entry *out) {
    if (!s || !store_id_valid(id) || !out) return KP_EINVAL;
    pthread_mutex_lock(&s->mu);
    store_sess *e = store_find(s, id);
    if (!e || !e->has_data) {
        pthread_mutex_unlock(&s->mu);
        return KP_ENOTFOUND;
    }
    snap sn;
    int rc = snap_take(e, &sn);
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        free(sn.keys);
        return rc;
    }
    snap_tier(s, &sn);
    *out = sn.ent;
    return 0;
}

/* Snapshots of every entry (malloc'd array). */
static int snap_all(store *s, snap **out, size_t *n_out) {
    *out = NULL;
    *n_out = 0;
    pthread_mutex_lock(&s->mu);
    snap *v = calloc(s->n ? s->n : 1, sizeof *v);
    size_t k = 0;
    int rc = v ? 0 : KP_ENOMEM;
    for (size_t i = 0; i < s->n && !rc; i++) {
        if (!s->v[i]->has_data) continue;
        rc = snap_take(s->v[i], &v[k]);
        k++;
    }
    pthread_mutex_unlock(&s->mu);
    if (rc) {
        for (size_t i = 0; v && i < k; i++) free(v[i].keys);
        free(v);
        return rc;
    }
    for (size_t i = 0; i < k; i++) snap_tier(s, &v[i]);
    *out = v;
    *n_out = k;
    return 0;
}

static int entry_cmp(const void *a, const void *b) {
    return strcmp(((const store_entry *)a)->id, ((const store_entry *)b)->id);
}

int store_list(store *s, store_entry **entries, size_t *n) {
    *entries = NULL;
    *n = 0;
    snap *v = NULL;
    size_t k = 0;
    int rc = snap_all(s, &v, &k);
    if (rc) return rc;
    store_entry *e = malloc((k ? k : 1) * sizeof *e);
    if (!e) {
        free(v);
        return KP_ENOMEM;
    }
    for (size_t i = 0; i < k; i++) e[i] = v[i].ent;
    free(v);
    qsort(e, k, sizeof *e, entry_cmp);
    *entries = e;
    *n = k;
    return 0;
}

void store_get_stats(store *s, store_stats *st) {
    memset(st, 0, sizeof *st);
    snap *v = NULL;
    size_t k = 0;
    if (snap_all(s, &v, &k) == 0) {
        for (size_t i = 0; i < k; i++) {
            if (!strcmp(v[i].ent.tier, "warm")) st->n_warm++;
            else st->n_cold++;
        }
        free(v);
    }
    cas_stats cs;
    cas_get_stats(s->cas, &cs);
    pthread_mutex_lock(&s->mu);
    store_stats own = s->st;
    size_t n = 0;
    for (size_t i = 0; i < s->n; i++) n += s->v[i]->has_data;
    pthread_mutex_unlock(&s->mu);
    st->n_entries = n;
    st->warm_bytes = cs.warm_bytes;
    st->cold_bytes = cs.cold_bytes;
    st->saves = own.saves;
    st->loads = own.loads;
    st->dropped = own.dropped;
    st->quarantined = own.quarantined + cs.quarantined;
    st->tmp_removed = own.tmp_removed + cs.tmp_removed;
    st->foreign = own.foreign;
    st->imported = own.imported;
    st->io_errors = own.io_errors;
    st->kv_lost = own.kv_lost;
    st->saved_fp16_bytes = own.saved_fp16_bytes;
    st->saved_coded_bytes = own.saved_coded_bytes;
    st->saved_new_bytes = own.saved_new_bytes;
}

/* ---- open: re-index records ------------------------------------------------------------- */

/* One DIR/sessions/ID.kvpm at open. */
static int reindex_one(store *s, const char *id, const char *path, open_ctx *oc, kp_err *err) {
    uint8_t *buf = NULL;
    size_t len = 0;
    kp_err e2 = {0};
    int rc = read_all(path, STORE_REC_MAX, &buf, &len, &e2);
    if (rc == KP_ENOMEM) return kp_errf(err, rc, "%s", e2.msg);
    if (rc == KP_EFORMAT) {
        store_quarantine_record(s, id, e2.msg);
        return 0;
    }
    if (rc) {
        store_logf(s, "store: session '%s' not indexed: %s", id, e2.msg);
        return 0;
    }
    park_manifest m;
    uint8_t *extra = NULL;
    size_t extra_len = 0;
    int64_t mtime = 0;
    rc = store_rec_parse(buf, len, &m, &extra, &extra_len, &mtime, &e2);
    free(buf);
    if (rc == KP_ENOMEM) return kp_errf(err, rc, "store: %s", e2.msg);
    if (rc) {
        store_quarantine_record(s, id, e2.msg);
        return 0;
    }
    const codec *cc = NULL;
    int foreign = store_foreign(s, &m, &cc);
    if (foreign == STORE_FOREIGN_MODEL) oc->foreign_model++;
    else if (foreign == STORE_FOREIGN_TYPE) oc->foreign_type++;
    else if (foreign == STORE_FOREIGN_CODEC) oc->foreign_codec++;
    if (foreign == STORE_FOREIGN_CODEC && m.n_tokens > 0) {
        /* This model and KV type, but a codec this server was not given (its
         * codec file gone or changed, another --codec): the token ids are
         * good, so the session is indexed as tokens only (store.h "KV lost")
         * and its KV recomputed when it is used. Its record and objects stay
         * as they are (referenced: the collect keeps them) for a server given
         * that codec, until this session is saved again or deleted. */
        for (int i = 0; i < m.n_spans; i++) cas_ref(s->cas, m.spans[i].key);
        park_manifest lost;
        kp_err e3 = {0};
        rc = tokens_only(&m, &lost, &e3);
        park_manifest_free(&m);
        if (rc) {
            free(extra);
            return kp_errf(err, rc, "%s", e3.msg);
        }
        m = lost;
        cc = s->cur->c;
        s->st.kv_lost++;
    }
    if (!cc) {
        /* Left in place, and so are its objects: they are referenced (for as
         * long as the store is open) so that the collect below keeps them
         * for the server that can use this session. */
        s->st.foreign++;
        for (int i = 0; i < m.n_spans; i++) cas_ref(s->cas, m.spans[i].key);
        park_manifest_free(&m);
        free(extra);
        return 0;
    }
    uint64_t obj_bytes = 0;
    for (int i = 0; i < m.n_spans; i++) {
        if (cas_has(s->cas, m.spans[i].key)) {
            obj_bytes += m.spans[i].bytes;
            continue;
        }
        char hex[33], why[160];
        cas_key_hex(m.spans[i].key, hex);
        snprintf(why, sizeof why, "its object %s (span %d, tokens %d..%d) is missing", hex, i,
                 m.spans[i].span.start, m.spans[i].span.start + m.spans[i].span.n - 1);
        /* the evidence aside, the token ids kept (store_kv_lost): the KV is recomputed */
        store_quarantine_record(s, id, why);
        park_manifest lost;
        kp_err e3 = {0};
        rc = tokens_only(&m, &lost, &e3);
        park_manifest_free(&m);
        if (!rc) rc = write_lost_record(s, id, &lost, extra, extra_len, mtime, &len, &e3);
        if (rc) {
            store_logf(s, "store: session '%s' forgotten: its token ids cannot be kept: %s", id, e3.msg);
            park_manifest_free(&lost);
            free(extra);
            return rc == KP_ENOMEM ? kp_errf(err, rc, "%s", e3.msg) : 0;
        }
        store_logf(s, "store: session '%s': its KV is lost (%s); its %d token ids are kept, and its KV is "
                   "recomputed from them when it is next used", id, why, lost.n_tokens);
        s->st.kv_lost++;
        m = lost;
        obj_bytes = 0;
        break;
    }
    store_sess *e = calloc(1, sizeof *e);
    if (!e || index_add(s, e)) {
        free(e);
        park_manifest_free(&m);
        free(extra);
        return kp_errf(err, KP_ENOMEM, "store: out of memory indexing '%s'", s->sess_dir);
    }
    for (int i = 0; i < m.n_spans; i++) cas_ref(s->cas, m.spans[i].key);
    snprintf(e->id, sizeof e->id, "%s", id);
    e->has_data = true;
    e->man = m;
    e->cc = cc;
    e->extra = extra;
    e->extra_len = extra_len;
    e->durable = true;
    e->obj_bytes = obj_bytes;
    e->rec_bytes = len;
    e->mtime_ms = mtime;
    return 0;
}

/* The id of a file name ID + ext, or false. */
bool store_id_of(const char *name, const char *ext, char id[STORE_ID_MAX + 1]) {
    if (!fs_has_suffix(name, ext)) return false;
    size_t n = strlen(name) - strlen(ext);
    if (n == 0 || n > STORE_ID_MAX) return false;
    memcpy(id, name, n);
    id[n] = 0;
    return store_id_valid(id);
}

static int lru_cmp(const void *a, const void *b) {
    const store_sess *x = *(store_sess *const *)a, *y = *(store_sess *const *)b;
    return (x->mtime_ms > y->mtime_ms) - (x->mtime_ms < y->mtime_ms);
}

static int reindex_sessions(store *s, open_ctx *oc, kp_err *err) {
    DIR *dh = opendir(s->sess_dir);
    if (!dh) return kp_errf(err, KP_EIO, "store: cannot open '%s': %s", s->sess_dir, strerror(errno));
    int rc = 0;
    struct dirent *de;
    while (!rc && (de = readdir(dh)) != NULL) {
        const char *name = de->d_name;
        struct stat sb;
        if (fstatat(dirfd(dh), name, &sb, AT_SYMLINK_NOFOLLOW) || !S_ISREG(sb.st_mode)) continue;
        if (fs_has_suffix(name, STORE_TMP_EXT)) {
            if (unlinkat(dirfd(dh), name, 0) == 0) {
                s->st.tmp_removed++;
                store_logf(s, "store: removed torn write '%s/%s'", s->sess_dir, name);
            }
            continue;
        }
        char id[STORE_ID_MAX + 1], path[STORE_PATH_MAX];
        if (!store_id_of(name, STORE_REC_EXT, id)) continue; /* not ours: leave it alone */
        snprintf(path, sizeof path, "%s/%s", s->sess_dir, name);
        rc = reindex_one(s, id, path, oc, err);
    }
    closedir(dh);
    if (rc) return rc;
    /* least recently saved first, so LRU ticks follow the save times */
    if (s->n) qsort(s->v, s->n, sizeof *s->v, lru_cmp);
    for (size_t i = 0; i < s->n; i++) s->v[i]->lru = ++s->tick;
    return 0;
}

/* ---- open / close ------------------------------------------------------------------------ */

int store_codec_builtin(const char *name) {
    for (int i = 0; name && i < STORE_N_BUILTIN; i++)
        if (!strcmp(name, store_builtin_codecs[i])) return 1;
    return 0;
}

int store_open(store **out, const store_opts *o, kp_err *err) {
    *out = NULL;
    if (!o || !o->dir || !o->dir[0])
        return kp_errf(err, KP_EINVAL, "store: no directory given (--session-dir)");
    if (strlen(o->dir) > STORE_DIR_MAX)
        return kp_errf(err, KP_EINVAL, "store: directory name longer than %d bytes", STORE_DIR_MAX);
    const codec_shape *sh = &o->shape;
    if (sh->n_layer < 1 || sh->n_kv_heads < 1 || sh->head_dim < 1)
        return kp_errf(err, KP_EINVAL, "store: bad KV shape %d layers x %d heads x %d dims",
                       sh->n_layer, sh->n_kv_heads, sh->head_dim);
    if (o->kv_type != KP_TYPE_F32 && o->kv_type != KP_TYPE_F16 && o->kv_type != KP_TYPE_BF16)
        return kp_errf(err, KP_EINVAL, "store: kv_type %d is not f32/f16/bf16", o->kv_type);
    store *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "store: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    s->o = *o;
    if (s->o.layout.chunk <= 0) s->o.layout = layout_default();
    if (!s->o.warm_budget) s->o.warm_budget = STORE_DEFAULT_WARM;
    size_t dl = strlen(o->dir);
    s->dir = strdup(o->dir);
    s->sess_dir = malloc(dl + 16);
    s->q_dir = malloc(dl + 16);
    int rc = 0;
    if (!s->dir || !s->sess_dir || !s->q_dir) {
        rc = kp_errf(err, KP_ENOMEM, "store: out of memory");
        goto fail;
    }
    for (size_t n = strlen(s->dir); n > 1 && s->dir[n - 1] == '/'; n--) s->dir[n - 1] = 0;
    s->o.dir = s->dir;
    snprintf(s->sess_dir, dl + 16, "%s/sessions", s->dir);
    snprintf(s->q_dir, dl + 16, "%s/quarantine", s->dir);
    if (fs_mkdir_p(s->sess_dir) || (mkdir(s->q_dir, 0755) && errno != EEXIST)) {
        rc = kp_errf(err, KP_EIO, "store: cannot create directories under '%s': %s", s->dir,
                     strerror(errno));
        goto fail;
    }

    /* the codec of new saves, then the codec files kept from earlier runs */
    if ((rc = codec_register(s, o->codec && o->codec[0] ? o->codec : "none", &s->cur, err))) goto fail;
    s->o.codec = s->cur->label;
    codec_load_kept(s);

    cas_opts co = cas_default_opts();
    co.dir = s->dir;
    co.warm_budget = s->o.warm_budget;
    co.cold_budget = 0; /* the store enforces its budget per session */
    co.log = store_cas_log;
    co.log_ud = s;
    if ((rc = cas_open(&s->cas, &co, err))) goto fail;

    open_ctx oc = {0};
    if ((rc = reindex_sessions(s, &oc, err))) goto fail;
    size_t freed = cas_collect(s->cas);
    if (freed) store_logf(s, "store: collected %zu objects no session uses", freed);
    store_import_legacy(s, &oc);
    if (oc.foreign_model || oc.foreign_type)
        store_logf(s, "store: left alone in '%s': %llu sessions of another model, %llu of "
                   "another KV type (start a server with that model / --kv-type to use them, or "
                   "delete them)", s->dir, (unsigned long long)oc.foreign_model,
                   (unsigned long long)oc.foreign_type);
    if (oc.foreign_codec)
        store_logf(s, "store: %llu sessions in '%s' were parked with a codec this server was not "
                   "given (a codec file gone or changed, another --codec): their token ids are "
                   "kept and their KV is recomputed when they are next used; their files stay "
                   "as they are until each is saved again (start a server with that --codec to "
                   "restore them instead)", (unsigned long long)oc.foreign_codec, s->dir);
    enforce_cold(s, NULL);
    *out = s;
    return 0;
fail:
    store_close(s);
    return rc;
}

void store_close(store *s) {
    if (!s) return;
    /* make every warm-only session durable */
    for (size_t i = 0; s->cas && i < s->n; i++) {
        store_sess *e = s->v[i];
        if (!e->has_data || e->durable) continue;
        kp_err e2 = {0};
        if (flush_work(s, e, &e2))
            store_logf(s, "store: closing: session '%s' could not be made durable and is lost: %s",
                       e->id, e2.msg);
    }
    for (size_t i = 0; i < s->n; i++) sess_free(s->v[i]);
    free(s->v);
    for (size_t i = 0; i < s->n_codecs; i++) codec_ent_free(s->codecs[i]);
    free(s->codecs);
    cas_close(s->cas);
    free(s->dir);
    free(s->sess_dir);
    free(s->q_dir);
    pthread_cond_destroy(&s->cv);
    pthread_mutex_destroy(&s->mu);
    free(s);
}
