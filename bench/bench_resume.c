/*
 * bench_resume.c — `kvpark bench resume`: time-to-first-token (TTFT) of one new
 * user turn for a session of L tokens on four paths (contract in
 * bench_resume.h):
 *
 *   re-prefill  fresh KV, forward the L + T tokens (T = 16 new tokens)
 *   hot         the session's KV is still resident: forward the T tokens
 *   warm        parked (park_save) into the RAM tier of a cas, KV reset;
 *               TTFT = park_restore + forward T
 *   cold        parked durably into the disk tier; the cas is closed and
 *               reopened (no warm copy), the manifest re-read and its keys
 *               re-referenced, every object file fsynced and dropped from the
 *               page cache with posix_fadvise(POSIX_FADV_DONTNEED) (mincore()
 *               then counts the pages still resident, reported);
 *               TTFT = park_restore + forward T
 *
 *   remote      (--remote URL) the session saved on replica A (a store that
 *               writes through to Redis), resumed on replica B: a store on an
 *               empty directory and the same Redis, as a replica that never
 *               saw the session; TTFT = store_load_meta (the record from
 *               Redis) + store_load_kv (its objects from Redis, decoded)
 *               + forward T. A fresh B every repeat (nothing local); its
 *               connection is opened before the clock starts, as a running
 *               replica's pool is.
 *
 *   warm, pipelined   the warm path with the restore split by layer
 *               (park_restore_begin/_layer/_end): a decoder thread decodes
 *               layer after layer while the new turn's forward pass runs,
 *               waiting at each layer (model_set_layer_gate) only until that
 *               layer's rows are in the cache — what the GPU path needs; on
 *               the CPU both compete for the same cores, so it is measured,
 *               not assumed.
 *
 * TTFT here is "prefill the new turn and have the first token's logits"; the
 * reported time is the median over --repeats. The KV buffers are allocated
 * once per context length (a server keeps a pool), so a "reset" is
 * kv_truncate(0). The disk read bandwidth is measured in the same run by
 * reading the (evicted) cold object files with plain read(), then evicting
 * them again before the timed cold resume.
 *
 * From the warm restore times and the stored bytes of each codec we derive
 * the break-even bandwidth: a codec with fewer bytes than `none` but a slower
 * decode resumes faster than `none` when the storage delivers less than
 *   bw = (bytes_none - bytes_codec) / (restore_codec_warm - restore_none_warm).
 */
#include "bench/bench_resume.h"

#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <getopt.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include "compress/codec.h"
#include "compress/quality.h"
#include "kernels/kp.h"
#include "engine/model.h"
#include "storage/cas.h"
#include "storage/park.h"
#include "storage/remote.h"
#include "storage/store.h"
#include "bench/plot.h"
#include "tools/cli.h"

#define BR_MAX_CODECS 16
#define BR_MAX_CTX 32
#define BR_MAX_REPEATS 100
#define BR_PATH_MAX 1200

typedef struct br_opts {
    const char *model, *file, *csv, *plot, *dir;
    const char *remote;               /* --remote URL: the remote column (NULL: not measured) */
    const char *device;               /* --device: cpu (default) | cuda | auto */
    char *codec_list;                 /* strdup of --codec, split in place */
    const char *codecs[BR_MAX_CODECS];
    int n_codecs;
    int ctx[BR_MAX_CTX];
    int n_ctx;
    int repeats;
    int threads;
    int kv_type;
    int turn;                         /* new tokens per user turn (16) */
} br_opts;

/* One (context length, codec) result; times in milliseconds (medians). */
typedef struct br_row {
    int ctx;
    int codec;                        /* index into br_opts.codecs */
    uint64_t bytes_total;
    double prefill_ms, hot_ms, warm_ms, cold_ms;
    double restore_warm_ms, restore_cold_ms;
    double warm_pipe_ms;              /* warm, restore pipelined with the forward pass */
    int tok_pipe;
    double remote_ms, restore_remote_ms; /* the other replica, from Redis (--remote; 0: not measured) */
    int tok_remote;
    double disk_mbps;                 /* read() bandwidth of this row's cold files */
    long resident_pages;              /* object pages still cached after DONTNEED */
    int tok_prefill, tok_hot, tok_warm, tok_cold;
} br_row;

/* ---- small helpers ------------------------------------------------------- */

static int br_cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Median of v[0..n) (sorts v). */
static double br_median(double *v, int n) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, br_cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

static int br_argmax(const float *x, int n) {
    int best = 0;
    for (int i = 1; i < n; i++)
        if (x[i] > x[best]) best = i;
    return best;
}

/* Forward n tokens of one sequence; logits of the last token into `logits`. */
static int br_forward(model *m, kv_cache *kv, const int32_t *tokens, int n, float *logits,
                      kp_err *err) {
    model_seq s = {.kv = kv, .tokens = tokens, .n_tokens = n, .all_logits = false,
                   .logits = logits};
    return model_forward(m, &s, 1, err);
}

/* n token ids: the tokenised file (repeated cyclically if short), else
 * deterministic pseudo-random ids (xorshift64, ids >= 3 to skip the usual
 * special tokens of small vocabularies). */
static int br_make_tokens(model *m, const char *file, int n, int32_t **out, kp_err *err) {
    int32_t *ids = malloc((size_t)n * sizeof *ids);
    if (!ids) return kp_errf(err, KP_ENOMEM, "bench resume: out of memory (%d tokens)", n);
    int n_vocab = model_hp(m)->n_vocab;
    if (file) {
        FILE *f = fopen(file, "rb");
        if (!f) {
            free(ids);
            return kp_errf(err, KP_EIO, "bench resume: cannot open '%s': %s", file, strerror(errno));
        }
        char *text = NULL;
        size_t len = 0, cap = 0, got;
        char buf[65536];
        while ((got = fread(buf, 1, sizeof buf, f)) > 0) {
            if (len + got + 1 > cap) {
                cap = 2 * (len + got + 1);
                char *t = realloc(text, cap);
                if (!t) {
                    free(text);
                    free(ids);
                    fclose(f);
                    return kp_errf(err, KP_ENOMEM, "bench resume: out of memory reading '%s'", file);
                }
                text = t;
            }
            memcpy(text + len, buf, got);
            len += got;
        }
        fclose(f);
        int32_t *tk = NULL;
        size_t nt = 0;
        int rc = tok_encode(model_vocab(m), text ? text : "", len, true, false, &tk, &nt, err);
        free(text);
        if (rc) {
            free(ids);
            return rc;
        }
        if (nt == 0) {
            free(tk);
            free(ids);
            return kp_errf(err, KP_EINVAL, "bench resume: '%s' gives no tokens", file);
        }
        for (int i = 0; i < n; i++) ids[i] = tk[(size_t)i % nt];
        free(tk);
    } else {
        uint64_t s = 0x9E3779B97F4A7C15ull;
        int lo = n_vocab > 3 ? 3 : 0;
        for (int i = 0; i < n; i++) {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ids[i] = lo + (int32_t)(s % (uint64_t)(n_vocab - lo));
        }
    }
    *out = ids;
    return 0;
}

static void br_object_path(const char *dir, cas_key k, char *out, size_t cap) {
    char hex[33];
    cas_key_hex(k, hex);
    snprintf(out, cap, "%s/objects/%.2s/%s.kvo", dir, hex, hex);
}

/* fsync the file and drop its pages from the page cache; *resident += pages
 * still cached afterwards (mincore on a mapping, which faults nothing in). */
static int br_evict(const char *path, long *resident, kp_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kp_errf(err, KP_EIO, "bench resume: cannot open '%s': %s", path, strerror(errno));
    struct stat sb;
    int rc = 0;
    if (fstat(fd, &sb)) rc = kp_errf(err, KP_EIO, "bench resume: stat '%s': %s", path, strerror(errno));
    else if (fsync(fd)) rc = kp_errf(err, KP_EIO, "bench resume: fsync '%s': %s", path, strerror(errno));
    else if ((errno = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)) != 0)
        rc = kp_errf(err, KP_EIO, "bench resume: posix_fadvise(DONTNEED) '%s': %s", path,
                     strerror(errno));
    if (!rc && resident && sb.st_size > 0) {
        long pg = sysconf(_SC_PAGESIZE);
        size_t np = (size_t)((sb.st_size + pg - 1) / pg);
        void *p = mmap(NULL, (size_t)sb.st_size, PROT_READ, MAP_SHARED, fd, 0);
        unsigned char *vec = malloc(np);
        if (p != MAP_FAILED && vec && mincore(p, (size_t)sb.st_size, vec) == 0)
            for (size_t i = 0; i < np; i++) *resident += vec[i] & 1;
        free(vec);
        if (p != MAP_FAILED) munmap(p, (size_t)sb.st_size);
    }
    close(fd);
    return rc;
}

/* Read the whole file with read(); returns bytes read or a negative code. */
static long long br_read_file(const char *path, char *buf, size_t cap, kp_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return kp_errf(err, KP_EIO, "bench resume: cannot open '%s': %s", path, strerror(errno));
    long long total = 0;
    for (;;) {
        ssize_t got = read(fd, buf, cap);
        if (got < 0 && errno == EINTR) continue;
        if (got < 0) {
            close(fd);
            return kp_errf(err, KP_EIO, "bench resume: read '%s': %s", path, strerror(errno));
        }
        if (got == 0) break;
        total += got;
    }
    close(fd);
    return total;
}

static int br_rm_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw) {
    (void)sb, (void)flag, (void)ftw;
    remove(path);
    return 0;
}

/* Remove a directory tree this benchmark created. */
static void br_rm_tree(const char *dir) { nftw(dir, br_rm_one, 16, FTW_DEPTH | FTW_PHYS); }

/* ---- the measurements ---------------------------------------------------- */

typedef struct br_ctx {
    const br_opts *o;
    model *m;
    codec **codecs;
    uint64_t *codec_hash;
    uint64_t fingerprint;
    codec_shape shape;
    const int32_t *tokens;            /* [max ctx + turn] */
    float *logits;                    /* [n_vocab] */
    int n_vocab;
    const char *base;                 /* cold tier parent directory */
    char *io_buf;                     /* read() buffer for the bandwidth probe */
    size_t io_cap;
    double disk_bytes, disk_s;        /* whole-run bandwidth probe totals */
} br_ctx;

/* The layout a session is parked with: the codec file's own (what it was
 * calibrated for, as the server does), else the default. */
static park_layout br_layout(const codec *c) {
    park_layout lay = park_default_layout();
    int lc, ls, lw;
    if (!codec_layout(c, &lc, &ls, &lw)) lay = (park_layout){.sink = ls, .window = lw, .chunk = lc};
    return lay;
}

/* Pipelined restore: a decoder thread publishes how many layers are in the
 * cache; the forward pass's layer gate waits for its layer. */
typedef struct br_pipe {
    park_restorer *pr;
    int n_layer;
    int ready;          /* layers decoded */
    int failed;
    kp_err err;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} br_pipe;

static void *br_pipe_main(void *ud) {
    br_pipe *p = ud;
    for (int l = 0; l < p->n_layer; l++) {
        kp_err e = {0};
        int rc = park_restore_layer(p->pr, l, &e);
        pthread_mutex_lock(&p->mu);
        if (rc) {
            p->failed = 1;
            p->err = e;
        } else {
            p->ready = l + 1;
        }
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
        if (rc) break;
    }
    return NULL;
}

static int br_pipe_gate(void *ud, int layer) {
    br_pipe *p = ud;
    pthread_mutex_lock(&p->mu);
    while (p->ready <= layer && !p->failed) pthread_cond_wait(&p->cv, &p->mu);
    int failed = p->failed;
    pthread_mutex_unlock(&p->mu);
    return failed;
}

/* One pipelined warm resume into dst (empty): TTFT in ms. */
static int br_pipelined(br_ctx *b, cas *cs, const codec *c, const park_manifest *man, kv_cache *dst, int L,
                        double *ms, kp_err *err) {
    br_pipe p = {.n_layer = dst->n_layer};
    pthread_mutex_init(&p.mu, NULL);
    pthread_cond_init(&p.cv, NULL);
    double t0 = kp_now();
    int rc = park_restore_begin(cs, c, man, dst, &p.pr, err); /* fetch + verify: all the I/O */
    pthread_t th;
    bool started = false;
    if (!rc && pthread_create(&th, NULL, br_pipe_main, &p) != 0)
        rc = kp_errf(err, KP_ENOMEM, "bench resume: cannot start the decoder thread");
    else if (!rc)
        started = true;
    if (!rc) {
        /* The rows [0, L) are promised by the decoder: the new turn goes at L. */
        dst->n_pos = L;
        model_set_layer_gate(b->m, br_pipe_gate, &p);
        rc = br_forward(b->m, dst, b->tokens + L, b->o->turn, b->logits, err);
        model_set_layer_gate(b->m, NULL, NULL);
    }
    if (started) pthread_join(th, NULL);
    if (p.pr) {
        int n_pos = dst->n_pos;
        int rc_end = park_restore_end(p.pr, NULL); /* sets n_pos = L when every layer was decoded */
        if (!rc && (rc_end || p.failed)) rc = kp_errf(err, KP_EFORMAT, "bench resume: pipelined restore: %s", p.err.msg);
        dst->n_pos = n_pos;
    }
    *ms = 1e3 * (kp_now() - t0);
    pthread_mutex_destroy(&p.mu);
    pthread_cond_destroy(&p.cv);
    return rc;
}

/* Warm path for one codec: park into a RAM-only cas, then repeats of
 * reset + restore + forward T; then the same, pipelined. */
static int br_warm(br_ctx *b, int ci, kv_cache *sess, kv_cache *dst, int L, br_row *r,
                   kp_err *err) {
    const br_opts *o = b->o;
    park_layout lay = br_layout(b->codecs[ci]);
    cas_opts co = cas_default_opts();
    co.warm_budget = UINT64_C(1) << 40; /* never spill: this is the RAM tier alone */
    cas *cs = NULL;
    park_manifest man = {0};
    park_stats ps = {0};
    double t_ttft[BR_MAX_REPEATS], t_rest[BR_MAX_REPEATS];
    int rc = cas_open(&cs, &co, err);
    if (rc) return rc;
    rc = park_save(cs, b->codecs[ci], b->codec_hash[ci], o->codecs[ci], b->fingerprint, &lay,
                   sess, b->tokens, L, false, &man, &ps, err);
    if (rc) goto out;
    r->bytes_total = ps.bytes_total;
    for (int i = 0; i < o->repeats; i++) {
        kv_truncate(dst, 0);
        double t0 = kp_now();
        if ((rc = park_restore(cs, b->codecs[ci], &man, dst, NULL, err))) goto out;
        double t1 = kp_now();
        if ((rc = br_forward(b->m, dst, b->tokens + L, o->turn, b->logits, err))) goto out;
        double t2 = kp_now();
        t_rest[i] = 1e3 * (t1 - t0);
        t_ttft[i] = 1e3 * (t2 - t0);
    }
    r->tok_warm = br_argmax(b->logits, b->n_vocab);
    r->warm_ms = br_median(t_ttft, o->repeats);
    r->restore_warm_ms = br_median(t_rest, o->repeats);
    for (int i = 0; i < o->repeats; i++) {
        kv_truncate(dst, 0);
        if ((rc = br_pipelined(b, cs, b->codecs[ci], &man, dst, L, &t_ttft[i], err))) goto out;
    }
    r->tok_pipe = br_argmax(b->logits, b->n_vocab);
    r->warm_pipe_ms = br_median(t_ttft, o->repeats);
    park_release(cs, &man);
out:
    park_manifest_free(&man);
    cas_close(cs);
    return rc;
}

/* Cold path for one codec: park durably into DIR, then per repeat: reopen
 * the cas (empty warm tier), re-read the manifest and re-ref its keys, evict
 * the object files from the page cache, restore + forward T. */
static int br_cold(br_ctx *b, int ci, kv_cache *sess, kv_cache *dst, int L, br_row *r,
                   kp_err *err) {
    const br_opts *o = b->o;
    char dir[BR_PATH_MAX], path[BR_PATH_MAX + 64];
    snprintf(dir, sizeof dir, "%s/ctx%d-codec%d", b->base, L, ci);
    if (mkdir(dir, 0700) && errno != EEXIST)
        return kp_errf(err, KP_EIO, "bench resume: cannot create '%s': %s", dir, strerror(errno));
    park_layout lay = br_layout(b->codecs[ci]);
    cas_opts co = cas_default_opts();
    co.dir = dir;
    co.warm_budget = UINT64_C(1) << 40;
    cas *cs = NULL;
    park_manifest man = {0};
    uint8_t *mbytes = NULL;
    size_t mlen = 0;
    double t_ttft[BR_MAX_REPEATS], t_rest[BR_MAX_REPEATS];
    int rc = cas_open(&cs, &co, err);
    if (rc) goto out;
    rc = park_save(cs, b->codecs[ci], b->codec_hash[ci], o->codecs[ci], b->fingerprint, &lay,
                   sess, b->tokens, L, true, &man, NULL, err);
    if (!rc) rc = park_manifest_write(&man, &mbytes, &mlen, err);
    park_manifest_free(&man);
    cas_close(cs);
    cs = NULL;
    if (rc) goto out;

    r->resident_pages = 0;
    for (int i = 0; i < o->repeats; i++) {
        if ((rc = cas_open(&cs, &co, err))) goto out;
        if ((rc = park_manifest_read(mbytes, mlen, &man, err))) goto out;
        for (int s = 0; s < man.n_spans; s++) cas_ref(cs, man.spans[s].key);
        for (int s = 0; s < man.n_spans; s++) {
            br_object_path(dir, man.spans[s].key, path, sizeof path);
            if ((rc = br_evict(path, NULL, err))) goto out;
        }
        if (i == 0) { /* the disk bandwidth probe, then evict again */
            double bytes = 0, t0 = kp_now();
            for (int s = 0; s < man.n_spans; s++) {
                br_object_path(dir, man.spans[s].key, path, sizeof path);
                long long got = br_read_file(path, b->io_buf, b->io_cap, err);
                if (got < 0) {
                    rc = (int)got;
                    goto out;
                }
                bytes += (double)got;
            }
            double dt = kp_now() - t0;
            r->disk_mbps = dt > 0 ? bytes / dt / 1e6 : 0;
            b->disk_bytes += bytes;
            b->disk_s += dt;
            for (int s = 0; s < man.n_spans; s++) {
                br_object_path(dir, man.spans[s].key, path, sizeof path);
                if ((rc = br_evict(path, &r->resident_pages, err))) goto out;
            }
        }
        kv_truncate(dst, 0);
        double t0 = kp_now();
        if ((rc = park_restore(cs, b->codecs[ci], &man, dst, NULL, err))) goto out;
        double t1 = kp_now();
        if ((rc = br_forward(b->m, dst, b->tokens + L, o->turn, b->logits, err))) goto out;
        double t2 = kp_now();
        t_rest[i] = 1e3 * (t1 - t0);
        t_ttft[i] = 1e3 * (t2 - t0);
        park_manifest_free(&man);
        cas_close(cs);
        cs = NULL;
    }
    r->tok_cold = br_argmax(b->logits, b->n_vocab);
    r->cold_ms = br_median(t_ttft, o->repeats);
    r->restore_cold_ms = br_median(t_rest, o->repeats);
out:
    park_manifest_free(&man);
    cas_close(cs);
    free(mbytes);
    br_rm_tree(dir);
    return rc;
}

/* One replica of the remote path: a store on DIR writing through to Redis. */
static int br_replica(br_ctx *b, int ci, const char *dir, store **st, remote **rem, kp_err *err) {
    const br_opts *o = b->o;
    store_opts so = store_default_opts();
    so.dir = dir;
    so.shape = b->shape;
    so.kv_type = o->kv_type;
    so.codec = o->codecs[ci];
    so.layout = br_layout(b->codecs[ci]);
    so.warm_budget = UINT64_C(1) << 40;
    remote_opts ro = remote_default_opts();
    ro.url = o->remote;
    ro.model_hash = b->fingerprint;
    ro.codec_hash = store_remote_codec_hash(&so);
    ro.ttl_s = 3600; /* what the bench leaves behind in a shared Redis expires */
    int rc = remote_open(rem, &ro, err);
    if (rc) return rc;
    so.remote = *rem;
    so.remote_policy = STORE_REMOTE_WRITE_THROUGH;
    if ((rc = store_open(st, &so, err))) {
        remote_close(*rem);
        *rem = NULL;
    }
    return rc;
}

static void br_replica_close(store *st, remote *rem, const char *dir) {
    store_close(st);
    remote_close(rem);
    br_rm_tree(dir);
}

/* Remote path for one codec (see the top of the file). */
static int br_remote(br_ctx *b, int ci, kv_cache *sess, kv_cache *dst, int L, br_row *r, kp_err *err) {
    const br_opts *o = b->o;
    char dir_a[BR_PATH_MAX], dir_b[BR_PATH_MAX], id[24];
    snprintf(dir_a, sizeof dir_a, "%s/remote-a-ctx%d-codec%d", b->base, L, ci);
    snprintf(dir_b, sizeof dir_b, "%s/remote-b-ctx%d-codec%d", b->base, L, ci);
    double t_ttft[BR_MAX_REPEATS], t_rest[BR_MAX_REPEATS];
    store *sa = NULL, *sb = NULL;
    remote *ra = NULL, *rb = NULL;
    store_new_id(id);
    int rc = br_replica(b, ci, dir_a, &sa, &ra, err);
    if (rc) return rc;
    store_item it = {.tokens = b->tokens, .n_tokens = L, .kv = sess};
    kv_truncate(sess, L);
    if ((rc = store_save(sa, id, &it, false, NULL, err))) goto out;
    if (remote_drain(ra, 60000)) {
        remote_stats st;
        remote_get_stats(ra, &st);
        rc = kp_errf(err, KP_EUNAVAIL, "bench resume: the save did not reach Redis at %s: %s", o->remote,
                     st.last_error);
        goto out;
    }
    for (int i = 0; i < o->repeats; i++) {
        if ((rc = br_replica(b, ci, dir_b, &sb, &rb, err))) goto out;
        void *got = NULL;
        size_t n = 0;
        kp_err e2 = {0};
        remote_get_record(rb, "bench-warm-up", &got, &n, NULL, &e2); /* a miss: the connection is pooled */
        free(got);
        kv_truncate(dst, 0);
        int n_tok = 0;
        double t0 = kp_now();
        if ((rc = store_load_meta(sb, id, &n_tok, NULL, NULL, NULL, err))) goto out;
        if ((rc = store_load_kv(sb, id, dst, err))) goto out;
        double t1 = kp_now();
        if (n_tok != L || dst->n_pos != L) {
            rc = kp_errf(err, KP_EFORMAT, "bench resume: replica B restored %d of %d tokens", dst->n_pos, L);
            goto out;
        }
        if ((rc = br_forward(b->m, dst, b->tokens + L, o->turn, b->logits, err))) goto out;
        double t2 = kp_now();
        t_rest[i] = 1e3 * (t1 - t0);
        t_ttft[i] = 1e3 * (t2 - t0);
        br_replica_close(sb, rb, dir_b);
        sb = NULL;
        rb = NULL;
    }
    r->tok_remote = br_argmax(b->logits, b->n_vocab);
    r->remote_ms = br_median(t_ttft, o->repeats);
    r->restore_remote_ms = br_median(t_rest, o->repeats);
out:
    if (sb) br_replica_close(sb, rb, dir_b);
    kp_err e3 = {0};
    store_delete(sa, id, &e3); /* the record leaves Redis too */
    remote_drain(ra, 5000);
    br_replica_close(sa, ra, dir_a);
    return rc;
}

/* All paths for one context length; fills rows[0 .. n_codecs). */
static int br_one_ctx(br_ctx *b, int L, br_row *rows, kp_err *err) {
    const br_opts *o = b->o;
    kv_cache *sess = NULL, *dst = NULL;
    double t[BR_MAX_REPEATS];
    int tok_prefill, tok_hot;
    double prefill_ms, hot_ms;
    int rc = model_kv_new(b->m, &sess, o->kv_type, L + o->turn, err);
    if (!rc) rc = model_kv_new(b->m, &dst, o->kv_type, L + o->turn, err);
    if (rc) goto out;

    /* (a) re-prefill: the whole conversation from text */
    for (int i = 0; i < o->repeats; i++) {
        kv_truncate(sess, 0);
        double t0 = kp_now();
        if ((rc = br_forward(b->m, sess, b->tokens, L + o->turn, b->logits, err))) goto out;
        t[i] = 1e3 * (kp_now() - t0);
    }
    tok_prefill = br_argmax(b->logits, b->n_vocab);
    prefill_ms = br_median(t, o->repeats);

    /* the session itself: L tokens of KV */
    kv_truncate(sess, 0);
    if ((rc = br_forward(b->m, sess, b->tokens, L, NULL, err))) goto out;

    /* (b) hot: only the new turn */
    for (int i = 0; i < o->repeats; i++) {
        double t0 = kp_now();
        if ((rc = br_forward(b->m, sess, b->tokens + L, o->turn, b->logits, err))) goto out;
        t[i] = 1e3 * (kp_now() - t0);
        kv_truncate(sess, L);
    }
    tok_hot = br_argmax(b->logits, b->n_vocab);
    hot_ms = br_median(t, o->repeats);

    for (int ci = 0; ci < o->n_codecs; ci++) {
        br_row *r = &rows[ci];
        memset(r, 0, sizeof *r);
        r->ctx = L;
        r->codec = ci;
        r->prefill_ms = prefill_ms;
        r->hot_ms = hot_ms;
        r->tok_prefill = tok_prefill;
        r->tok_hot = tok_hot;
        if ((rc = br_warm(b, ci, sess, dst, L, r, err))) goto out;   /* (c) */
        if ((rc = br_cold(b, ci, sess, dst, L, r, err))) goto out;   /* (d) */
        if (o->remote && (rc = br_remote(b, ci, sess, dst, L, r, err))) goto out; /* (e) */
        fprintf(stderr, "kvpark: ctx %d codec %s: prefill %.2f ms, hot %.2f, warm %.2f (pipelined %.2f), cold %.2f, "
                "remote %.2f\n", L, o->codecs[ci], r->prefill_ms, r->hot_ms, r->warm_ms, r->warm_pipe_ms, r->cold_ms,
                r->remote_ms);
    }
out:
    kv_free(sess);
    kv_free(dst);
    return rc;
}

/* ---- output -------------------------------------------------------------- */

static double br_ratio(double a, double b) { return b > 0 ? a / b : 0; }

static void br_print_table(const br_opts *o, const br_row *rows, int n) {
    printf("\n| ctx | codec | bytes/token | re-prefill ms | hot ms | warm ms | warm pipelined ms | cold ms | "
           "remote ms | hot x | warm x | cold x | remote x | restore warm ms | restore cold ms | restore remote ms | "
           "disk MB/s | next token pre/hot/warm/pipe/cold/remote |\n");
    printf("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n");
    for (int i = 0; i < n; i++) {
        const br_row *r = &rows[i];
        char rem[24] = "-", remx[24] = "-", remr[24] = "-", remt[16] = "-";
        if (o->remote) {
            snprintf(rem, sizeof rem, "%.3f", r->remote_ms);
            snprintf(remx, sizeof remx, "%.1f", br_ratio(r->prefill_ms, r->remote_ms));
            snprintf(remr, sizeof remr, "%.3f", r->restore_remote_ms);
            snprintf(remt, sizeof remt, "%d", r->tok_remote);
        }
        printf("| %d | %s | %.0f | %.2f | %.3f | %.3f | %.3f | %.3f | %s | %.1f | %.1f | %.1f | %s | %.3f | %.3f | "
               "%s | %.0f | %d/%d/%d/%d/%d/%s |\n",
               r->ctx, o->codecs[r->codec], (double)r->bytes_total / r->ctx, r->prefill_ms,
               r->hot_ms, r->warm_ms, r->warm_pipe_ms, r->cold_ms, rem, br_ratio(r->prefill_ms, r->hot_ms),
               br_ratio(r->prefill_ms, r->warm_ms), br_ratio(r->prefill_ms, r->cold_ms), remx,
               r->restore_warm_ms, r->restore_cold_ms, remr, r->disk_mbps, r->tok_prefill, r->tok_hot,
               r->tok_warm, r->tok_pipe, r->tok_cold, remt);
    }
}

/* Break-even bandwidth of each codec against `none` at each context length. */
static void br_print_breakeven(const br_opts *o, const br_row *rows, int n, double disk_mbps) {
    int none = -1;
    for (int c = 0; c < o->n_codecs; c++)
        if (!strcmp(o->codecs[c], "none")) none = c;
    if (none < 0) {
        printf("\nbreak-even bandwidth: needs codec 'none' in --codec\n");
        return;
    }
    printf("\nBreak-even storage bandwidth vs 'none' (from warm restore times and stored bytes;\n"
           "below it the codec resumes faster than 'none'); measured disk read: %.0f MB/s\n",
           disk_mbps);
    for (int i = 0; i < n; i++) {
        const br_row *r = &rows[i];
        if (r->codec == none) continue;
        const br_row *rn = NULL;
        for (int j = 0; j < n; j++)
            if (rows[j].ctx == r->ctx && rows[j].codec == none) rn = &rows[j];
        if (!rn) continue;
        double db = (double)rn->bytes_total - (double)r->bytes_total;
        double dt = (r->restore_warm_ms - rn->restore_warm_ms) / 1e3;
        printf("  ctx %d, %s: %.0f bytes fewer, decode %+.3f ms: ", r->ctx, o->codecs[r->codec], db,
               dt * 1e3);
        if (db <= 0) printf("never (not smaller)\n");
        else if (dt <= 0) printf("at any bandwidth (no slower to decode)\n");
        else printf("below %.0f MB/s\n", db / dt / 1e6);
    }
}

static int br_write_csv(const br_opts *o, const char *model_name, const br_row *rows, int n,
                        kp_err *err) {
    FILE *f = fopen(o->csv, "w");
    if (!f) return kp_errf(err, KP_EIO, "bench resume: cannot write '%s': %s", o->csv, strerror(errno));
    fprintf(f, "model,ctx,codec,bytes_total,bytes_per_token,prefill_ms,hot_ms,warm_ms,cold_ms,"
               "speedup_hot,speedup_warm,speedup_cold,restore_warm_ms,restore_cold_ms,"
               "disk_read_mbps,cold_resident_pages,prefill_token,hot_token,warm_token,cold_token,"
               "warm_pipelined_ms,pipelined_token,remote_ms,speedup_remote,restore_remote_ms,remote_token\n");
    for (int i = 0; i < n; i++) {
        const br_row *r = &rows[i];
        char rem[96] = ",,,"; /* empty: not measured (no --remote) */
        if (o->remote)
            snprintf(rem, sizeof rem, "%.4f,%.2f,%.4f,%d", r->remote_ms, br_ratio(r->prefill_ms, r->remote_ms),
                     r->restore_remote_ms, r->tok_remote);
        fprintf(f, "%s,%d,%s,%llu,%.2f,%.4f,%.4f,%.4f,%.4f,%.2f,%.2f,%.2f,%.4f,%.4f,%.1f,%ld,%d,%d,%d,%d,%.4f,%d,%s\n",
                model_name, r->ctx, o->codecs[r->codec], (unsigned long long)r->bytes_total,
                (double)r->bytes_total / r->ctx, r->prefill_ms, r->hot_ms, r->warm_ms, r->cold_ms,
                br_ratio(r->prefill_ms, r->hot_ms), br_ratio(r->prefill_ms, r->warm_ms),
                br_ratio(r->prefill_ms, r->cold_ms), r->restore_warm_ms, r->restore_cold_ms,
                r->disk_mbps, r->resident_pages, r->tok_prefill, r->tok_hot, r->tok_warm,
                r->tok_cold, r->warm_pipe_ms, r->tok_pipe, rem);
    }
    int bad = ferror(f);
    if (fclose(f) || bad)
        return kp_errf(err, KP_EIO, "bench resume: error writing '%s'", o->csv);
    fprintf(stderr, "kvpark: wrote %s\n", o->csv);
    return 0;
}

typedef struct br_plot {
    const br_opts *o;
    const char *model_name, *dat;
} br_plot;

static void br_plot_script(FILE *f, const char *term, void *ud) {
    const br_plot *p = ud;
    const br_opts *o = p->o;
    fprintf(f,
            "set terminal %s size 1300,500\nset output '%s'\n"
            "set multiplot layout 1,2 title 'kvpark bench resume: %s'\n"
            "set logscale xy\nset grid\nset key top left\nset xlabel 'context length (tokens)'\n"
            "set ylabel 'TTFT of a 16-token turn (ms)'\n"
            "plot '%s' index 0 using 1:2 with linespoints title 're-prefill', "
            "'' index 0 using 1:3 with linespoints title 'hot'",
            term, o->plot, p->model_name, p->dat);
    for (int c = 0; c < o->n_codecs; c++) {
        fprintf(f, ", '' index %d using 1:2 with linespoints title 'warm %s', "
                   "'' index %d using 1:3 with linespoints title 'cold %s'",
                c + 1, o->codecs[c], c + 1, o->codecs[c]);
        if (o->remote) fprintf(f, ", '' index %d using 1:6 with linespoints title 'remote %s'", c + 1, o->codecs[c]);
    }
    fprintf(f, "\nset ylabel 'speed-up vs re-prefill (x)'\n"
               "plot '%s' index 0 using 1:4 with linespoints title 'hot'", p->dat);
    for (int c = 0; c < o->n_codecs; c++) {
        fprintf(f, ", '' index %d using 1:4 with linespoints title 'warm %s', "
                   "'' index %d using 1:5 with linespoints title 'cold %s'",
                c + 1, o->codecs[c], c + 1, o->codecs[c]);
        if (o->remote) fprintf(f, ", '' index %d using 1:7 with linespoints title 'remote %s'", c + 1, o->codecs[c]);
    }
    fprintf(f, "\nunset multiplot\n");
}

/* PNG: TTFT vs context per path (log-log) and speed-up vs re-prefill. The
 * data goes to PLOT.dat: block 0 = ctx, prefill, hot; block 1+c = ctx, warm,
 * cold, warm x, cold x of codec c. */
static void br_write_plot(const br_opts *o, const char *model_name, const br_row *rows, int n) {
    if (!plot_available()) {
        fprintf(stderr, "kvpark: bench resume: %s not found, skipping --plot\n", PLOT_GNUPLOT);
        return;
    }
    if (!plot_quotable(o->plot) || !plot_quotable(model_name)) {
        fprintf(stderr, "kvpark: bench resume: quote characters in the plot path or model name, "
                        "skipping --plot\n");
        return;
    }
    char dat[BR_PATH_MAX], gp[BR_PATH_MAX];
    plot_sibling(o->plot, ".png", ".dat", dat, sizeof dat);
    plot_sibling(o->plot, ".png", ".gp", gp, sizeof gp);
    FILE *f = fopen(dat, "w");
    if (!f) {
        fprintf(stderr, "kvpark: bench resume: cannot write '%s': %s\n", dat, strerror(errno));
        return;
    }
    for (int i = 0; i < n; i++)
        if (rows[i].codec == 0)
            fprintf(f, "%d %.4f %.4f %.3f\n", rows[i].ctx, rows[i].prefill_ms, rows[i].hot_ms,
                    br_ratio(rows[i].prefill_ms, rows[i].hot_ms));
    for (int c = 0; c < o->n_codecs; c++) {
        fprintf(f, "\n\n");
        for (int i = 0; i < n; i++)
            if (rows[i].codec == c)
                fprintf(f, "%d %.4f %.4f %.3f %.3f %.4f %.3f\n", rows[i].ctx, rows[i].warm_ms, rows[i].cold_ms,
                        br_ratio(rows[i].prefill_ms, rows[i].warm_ms),
                        br_ratio(rows[i].prefill_ms, rows[i].cold_ms), rows[i].remote_ms,
                        br_ratio(rows[i].prefill_ms, rows[i].remote_ms));
    }
    fclose(f);
    br_plot bp = {.o = o, .model_name = model_name, .dat = dat};
    kp_err err = {0};
    if (plot_draw(gp, br_plot_script, &bp, &err) == 0) fprintf(stderr, "kvpark: wrote %s\n", o->plot);
    else fprintf(stderr, "kvpark: bench resume: %s\n", err.msg);
}

/* ---- options and main ---------------------------------------------------- */

static const char br_help[] =
    "usage: kvpark bench resume [-m MODEL] [--codec none,int8,FILE...] [--ctx 128,256,...]\n"
    "       [--repeats 3] [--csv FILE] [--plot FILE.png] [--dir DIR] [-f TEXTFILE]\n"
    "       [-t THREADS] [--kv-type f16|f32|bf16] [--turn 16] [--device cpu|cuda|auto]\n"
    "       [--remote redis://HOST:PORT]\n"
    "Time-to-first-token of one new user turn (--turn tokens: prefill them and get the\n"
    "first token's logits) for a session of L tokens that is (a) re-prefilled from\n"
    "text, (b) hot (KV resident), (c) warm (parked in the RAM tier, restored), (d) cold\n"
    "(parked durably in DIR, cas reopened, files fsynced and evicted from the page cache\n"
    "with posix_fadvise DONTNEED, restored), (e) with --remote, remote: saved by one\n"
    "replica through to that Redis and resumed by another that never saw it (record and\n"
    "objects from Redis, restored). Medians over --repeats; also bytes per\n"
    "token per codec, the disk read bandwidth of the cold files (plain read() after\n"
    "DONTNEED) and the break-even bandwidth below which a codec beats 'none'.\n"
    "Defaults: --codec none,int8; --ctx 128, 256, ... up to min(model context, 2048);\n"
    "token ids from -f TEXTFILE (repeated if short) or deterministic pseudo-random;\n"
    "DIR: a temporary directory under $TMPDIR (removed afterwards).\n";

static int br_usage(const char *msg, const char *arg) {
    fprintf(stderr, "kvpark: bench resume: %s%s%s (see kvpark bench resume --help)\n", msg,
            arg ? ": " : "", arg ? arg : "");
    return 2;
}

enum { BR_OPT_CODEC = 3000, BR_OPT_CTX, BR_OPT_REPEATS, BR_OPT_CSV, BR_OPT_PLOT, BR_OPT_DIR,
       BR_OPT_KV_TYPE, BR_OPT_TURN, BR_OPT_DEVICE, BR_OPT_REMOTE };

static int br_parse(int argc, char **argv, br_opts *o) {
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'},     {"file", required_argument, 0, 'f'},
        {"threads", required_argument, 0, 't'},   {"codec", required_argument, 0, BR_OPT_CODEC},
        {"ctx", required_argument, 0, BR_OPT_CTX}, {"repeats", required_argument, 0, BR_OPT_REPEATS},
        {"csv", required_argument, 0, BR_OPT_CSV}, {"plot", required_argument, 0, BR_OPT_PLOT},
        {"dir", required_argument, 0, BR_OPT_DIR}, {"kv-type", required_argument, 0, BR_OPT_KV_TYPE},
        {"turn", required_argument, 0, BR_OPT_TURN}, {"device", required_argument, 0, BR_OPT_DEVICE},
        {"remote", required_argument, 0, BR_OPT_REMOTE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    const char *codec_arg = "none,int8";
    int c;
    optind = 0; /* full getopt reset: this may run more than once in a process */
    while ((c = getopt_long(argc, argv, "m:f:t:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm': o->model = optarg; break;
        case 'f': o->file = optarg; break;
        case 't':
            if (cli_parse_int(optarg, 0, 1024, &o->threads)) return br_usage("bad -t", optarg);
            break;
        case BR_OPT_CODEC: codec_arg = optarg; break;
        case BR_OPT_CTX: {
            o->n_ctx = 0;
            const char *p = optarg;
            while (*p) {
                size_t k = strcspn(p, ",");
                char *piece = strndup(p, k);
                int v, bad = !piece || cli_parse_int(piece, 1, 1 << 20, &v);
                free(piece);
                if (bad) return br_usage("bad --ctx (a comma-separated list of lengths)", optarg);
                if (o->n_ctx == BR_MAX_CTX) return br_usage("too many --ctx values", optarg);
                o->ctx[o->n_ctx++] = v;
                p += k;
                if (*p) p++;
            }
            if (!o->n_ctx) return br_usage("empty --ctx", optarg);
            break;
        }
        case BR_OPT_REPEATS:
            if (cli_parse_int(optarg, 1, BR_MAX_REPEATS, &o->repeats))
                return br_usage("bad --repeats (1..100)", optarg);
            break;
        case BR_OPT_CSV: o->csv = optarg; break;
        case BR_OPT_PLOT: o->plot = optarg; break;
        case BR_OPT_DIR: o->dir = optarg; break;
        case BR_OPT_REMOTE: {
            remote_url u;
            kp_err e = {0};
            if (remote_url_parse(optarg, &u, &e)) return br_usage(e.msg, optarg);
            o->remote = optarg;
            break;
        }
        case BR_OPT_KV_TYPE:
            if ((o->kv_type = kv_type_from_name(optarg)) < 0)
                return br_usage("bad --kv-type (f32, f16 or bf16)", optarg);
            break;
        case BR_OPT_TURN:
            if (cli_parse_int(optarg, 1, 4096, &o->turn)) return br_usage("bad --turn", optarg);
            break;
        case BR_OPT_DEVICE:
            if (strcmp(optarg, "cpu") && strcmp(optarg, "cuda") && strcmp(optarg, "auto"))
                return br_usage("bad --device (cpu, cuda or auto)", optarg);
            o->device = optarg;
            break;
        case 'h': fputs(br_help, stdout); return 0;
        default: return br_usage("unknown option", NULL);
        }
    }
    if (optind < argc) return br_usage("unexpected argument", argv[optind]);
    if (!(o->codec_list = strdup(codec_arg))) return br_usage("out of memory", NULL);
    for (char *s = o->codec_list, *tok; (tok = strsep(&s, ",")) != NULL;) {
        if (!*tok) return br_usage("empty name in --codec", codec_arg);
        if (o->n_codecs == BR_MAX_CODECS) return br_usage("too many --codec values", codec_arg);
        o->codecs[o->n_codecs++] = tok;
    }
    return -1; /* go on */
}

int bench_resume_main(int argc, char **argv) {
    br_opts o = {.repeats = 3, .kv_type = KP_TYPE_F16, .turn = 16};
    int prc = br_parse(argc, argv, &o);
    if (prc >= 0) {
        free(o.codec_list);
        return prc;
    }
    kp_err err = {0};
    model *m = NULL;
    codec *codecs[BR_MAX_CODECS] = {0};
    uint64_t hashes[BR_MAX_CODECS] = {0};
    int32_t *tokens = NULL;
    float *logits = NULL;
    br_row *rows = NULL;
    char base[BR_PATH_MAX] = "";
    br_ctx b = {.o = &o, .codecs = codecs, .codec_hash = hashes};
    int n_rows = 0, rc;

    char path[1024];
    model_opts mo = model_default_opts();
    mo.n_threads = o.threads;
    if (o.device) mo.backend = o.device;
    if ((rc = model_resolve(o.model, path, sizeof path, &err))) goto out;
    if ((rc = model_load(&m, path, &mo, &err))) goto out;
    const model_hparams *hp = model_hp(m);
    b.m = m;
    b.n_vocab = hp->n_vocab;
    b.fingerprint = model_fingerprint(m);
    codec_shape shape = quality_codec_shape(m);
    b.shape = shape;
    for (int c = 0; c < o.n_codecs; c++) {
        if ((rc = codec_open(&codecs[c], o.codecs[c], &shape, &err))) goto out;
        hashes[c] = park_codec_hash(o.codecs[c]);
    }
    if (!o.n_ctx) {
        int max = hp->n_ctx_train < 2048 ? hp->n_ctx_train : 2048;
        for (int L = 128; L <= max && o.n_ctx < BR_MAX_CTX; L *= 2) o.ctx[o.n_ctx++] = L;
        if (!o.n_ctx) o.ctx[o.n_ctx++] = max > 1 ? max / 2 : 1;
    }
    int max_L = 0;
    for (int i = 0; i < o.n_ctx; i++) max_L = o.ctx[i] > max_L ? o.ctx[i] : max_L;
    if ((rc = br_make_tokens(m, o.file, max_L + o.turn, &tokens, &err))) goto out;
    b.tokens = tokens;
    logits = malloc((size_t)b.n_vocab * sizeof *logits);
    rows = calloc((size_t)o.n_ctx * (size_t)o.n_codecs, sizeof *rows);
    b.logits = logits;
    b.io_cap = 1 << 20;
    b.io_buf = malloc(b.io_cap);
    if (!logits || !rows || !b.io_buf) {
        rc = kp_errf(&err, KP_ENOMEM, "bench resume: out of memory");
        goto out;
    }
    const char *parent = o.dir;
    if (!parent) parent = getenv("TMPDIR");
    if (!parent || !*parent) parent = "/tmp";
    if (o.dir && mkdir(o.dir, 0755) && errno != EEXIST) {
        rc = kp_errf(&err, KP_EIO, "bench resume: cannot create '%s': %s", o.dir, strerror(errno));
        goto out;
    }
    snprintf(base, sizeof base, "%s/kvpark-resume-XXXXXX", parent);
    if (!mkdtemp(base)) {
        rc = kp_errf(&err, KP_EIO, "bench resume: cannot create a directory in '%s': %s", parent,
                     strerror(errno));
        base[0] = 0;
        goto out;
    }
    b.base = base;

    fprintf(stderr,
            "kvpark: bench resume: model %s; kv %s; turn %d tokens; %d repeats (medians)\n"
            "kvpark: cold = parked durably in %s, cas closed and reopened (empty RAM tier), "
            "every object file fsynced and evicted with posix_fadvise(POSIX_FADV_DONTNEED)\n",
            model_desc(m), o.kv_type == KP_TYPE_F16 ? "f16" : o.kv_type == KP_TYPE_F32 ? "f32" : "bf16",
            o.turn, o.repeats, base);
    for (int i = 0; i < o.n_ctx; i++) {
        if ((rc = br_one_ctx(&b, o.ctx[i], rows + n_rows, &err))) goto out;
        n_rows += o.n_codecs;
    }

    const char *model_name = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    long resident = 0;
    for (int i = 0; i < n_rows; i++) resident += rows[i].resident_pages;
    double disk_mbps = b.disk_s > 0 ? b.disk_bytes / b.disk_s / 1e6 : 0;
    printf("model %s (%s), kv %s, new turn %d tokens, medians of %d\n", model_name, model_desc(m),
           o.kv_type == KP_TYPE_F16 ? "f16" : o.kv_type == KP_TYPE_F32 ? "f32" : "bf16", o.turn,
           o.repeats);
    printf("cold = durable objects in %s after fsync + posix_fadvise(POSIX_FADV_DONTNEED) on every "
           "object file, cas reopened (no RAM copy); pages still cached after eviction (mincore): "
           "%ld\n", o.dir ? o.dir : "a temp dir", resident);
    printf("disk read bandwidth (read() of the evicted cold files, whole run): %.0f MB/s "
           "(%.1f MB in %.1f ms)\n", disk_mbps, b.disk_bytes / 1e6, b.disk_s * 1e3);
    br_print_table(&o, rows, n_rows);
    br_print_breakeven(&o, rows, n_rows, disk_mbps);
    fflush(stdout);
    if (o.csv && (rc = br_write_csv(&o, model_name, rows, n_rows, &err))) goto out;
    if (o.plot) br_write_plot(&o, model_name, rows, n_rows);
out:
    if (base[0]) br_rm_tree(base);
    for (int c = 0; c < o.n_codecs; c++) codec_free(codecs[c]);
    model_free(m);
    free(tokens);
    free(logits);
    free(rows);
    free(b.io_buf);
    free(o.codec_list);
    if (rc) {
        fprintf(stderr, "kvpark: bench resume: %s\n", err.msg[0] ? err.msg : kp_strerror(rc));
        return 1;
    }
    return 0;
}
