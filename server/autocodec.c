/*
 * autocodec.c — the server's own codec calibration (`--codec auto`); the
 * contract, the margin and the states are in autocodec.h.
 *
 * One worker thread per server, started only when no codec file was found:
 *
 *   collecting --(needed tokens fed)--> calibrating --(written, in use)--> done
 *        \                                   \--(error)--> failed
 *         \--(free: canceled)--> (thread ends, nothing written)
 *
 * From a text file the thread starts calibrating at once. The thread lowers
 * its own priority first (SCHED_IDLE and nice 19 apply per thread on Linux),
 * so the model's forward passes of the fit only use CPU the scheduler leaves.
 */
#include "server/autocodec.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>

#include "compress/calib.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "storage/fsutil.h"

/* a new prompt is compared with this many of the latest kept ones (the
 * conversation it continues is among the recent ones) */
#define AUTOCODEC_RECENT 64

typedef struct prompt {
    int32_t *ids;
    size_t n;
} prompt;

struct autocodec {
    autocodec_opts o;
    char *model_path, *dir, *calib_text; /* copies of the options' strings */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    autocodec_status st; /* under mu */
    prompt *prompts;     /* under mu: the prompts kept while collecting */
    size_t n_prompts, cap_prompts;
    atomic_int collecting; /* st.state == COLLECTING, read without the lock by feed */
    atomic_int cancel;
    pthread_t th;
    bool started;
    double log_t;        /* when the last progress line went to the log */
};

static const char *const state_names[] = {"off", "collecting", "calibrating", "done", "failed"};

const char *autocodec_state_name(autocodec_state s) {
    return (unsigned)s < sizeof state_names / sizeof state_names[0] ? state_names[s] : "?";
}

static double unix_time(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + ts.tv_nsec * 1e-9;
}

/* DIR/autocodec/auto-FP.kvcodec (ext ".kvcodec") or its sidecar (".json") */
static void own_path(const char *dir, uint64_t fp, const char *ext, char *out, size_t cap) {
    snprintf(out, cap, "%s/autocodec/auto-%016llx%s", dir, (unsigned long long)fp, ext);
}

/* A codec file of this model at path: 1; another model's or unreadable: 0 (logged). */
static int usable(const char *path, const codec_shape *shape) {
    struct stat sb;
    if (stat(path, &sb) != 0) return 0;
    codec *c = NULL;
    kp_err err = {0};
    int rc = codec_open(&c, path, shape, &err);
    codec_free(c);
    if (rc) fprintf(stderr, "kvpark: codec auto: skipping %s: %s\n", path, err.msg);
    return rc == 0;
}

int autocodec_find(const char *model_path, const codec_shape *shape, const char *dir, char *out, size_t cap) {
    /* beside the model: MODEL.gguf -> MODEL.kvcodec (MODEL.kvcodec for a name without .gguf) */
    if (strncmp(model_path, "synthetic:", 10)) {
        size_t n = strlen(model_path);
        if (fs_has_suffix(model_path, ".gguf")) n -= 5;
        if (n + 9 < cap) {
            snprintf(out, cap, "%.*s.kvcodec", (int)n, model_path);
            if (usable(out, shape)) return 1;
        }
    }
    if (dir) {
        own_path(dir, shape->model_fingerprint, ".kvcodec", out, cap);
        if (usable(out, shape)) return 1;
    }
    out[0] = 0;
    return 0;
}

/* ------------------------------------------------------------------ */
/* status                                                              */

static void set_state(autocodec *a, autocodec_state s, const char *phase) {
    pthread_mutex_lock(&a->mu);
    a->st.state = s;
    snprintf(a->st.phase, sizeof a->st.phase, "%s", phase ? phase : "");
    a->st.progress = 0;
    a->st.eta_s = -1;
    pthread_mutex_unlock(&a->mu);
    atomic_store(&a->collecting, s == AUTOCODEC_COLLECTING);
}

static void fail(autocodec *a, const char *msg) {
    pthread_mutex_lock(&a->mu);
    a->st.state = AUTOCODEC_FAILED;
    snprintf(a->st.error, sizeof a->st.error, "%s", msg);
    pthread_mutex_unlock(&a->mu);
    atomic_store(&a->collecting, 0);
    fprintf(stderr, "kvpark: codec auto: calibration failed: %s; parking with int8 (give --codec FILE from "
                    "'kvpark calibrate', or --calib-text FILE)\n", msg);
}

/* calib_opts.on_progress: the phase, its fraction, and a log line every 10 s */
static void on_progress(void *ud, const char *what, int64_t done, int64_t total, double eta_s) {
    autocodec *a = ud;
    const double now = kp_now();
    pthread_mutex_lock(&a->mu);
    snprintf(a->st.phase, sizeof a->st.phase, "%s", what);
    a->st.progress = total > 0 ? (double)done / (double)total : 0;
    a->st.eta_s = eta_s;
    const bool show = !a->o.quiet && (now - a->log_t >= 10 || (total > 0 && done == total));
    if (show) a->log_t = now;
    pthread_mutex_unlock(&a->mu);
    if (show) {
        if (eta_s >= 0)
            fprintf(stderr, "kvpark: codec auto: %s: %lld/%lld, about %.0f s left\n", what, (long long)done,
                    (long long)total, eta_s);
        else
            fprintf(stderr, "kvpark: codec auto: %s: %lld/%lld\n", what, (long long)done, (long long)total);
    }
}

/* ------------------------------------------------------------------ */
/* collecting                                                          */

void autocodec_feed(autocodec *a, const int32_t *tokens, size_t n) {
    if (!a || !n || !atomic_load_explicit(&a->collecting, memory_order_relaxed)) return;
    pthread_mutex_lock(&a->mu);
    if (a->st.state != AUTOCODEC_COLLECTING) goto out;
    size_t lo = a->n_prompts > AUTOCODEC_RECENT ? a->n_prompts - AUTOCODEC_RECENT : 0;
    for (size_t i = a->n_prompts; i-- > lo;) {
        prompt *p = &a->prompts[i];
        if (p->n >= n && !memcmp(p->ids, tokens, n * sizeof *tokens)) goto out; /* seen already */
        if (p->n < n && !memcmp(p->ids, tokens, p->n * sizeof *tokens)) {    /* its next turn */
            int32_t *ids = realloc(p->ids, n * sizeof *ids);
            if (!ids) goto out;
            memcpy(ids + p->n, tokens + p->n, (n - p->n) * sizeof *ids);
            a->st.tokens += (int64_t)(n - p->n);
            p->ids = ids, p->n = n;
            goto check;
        }
    }
    if (a->n_prompts == a->cap_prompts) {
        size_t nc = a->cap_prompts ? 2 * a->cap_prompts : 64;
        prompt *np = realloc(a->prompts, nc * sizeof *np);
        if (!np) goto out;
        a->prompts = np, a->cap_prompts = nc;
    }
    int32_t *ids = malloc(n * sizeof *ids);
    if (!ids) goto out;
    memcpy(ids, tokens, n * sizeof *ids);
    a->prompts[a->n_prompts++] = (prompt){ids, n};
    a->st.tokens += (int64_t)n;
check:
    if (a->st.tokens >= a->st.needed) {
        a->st.state = AUTOCODEC_CALIBRATING;
        snprintf(a->st.phase, sizeof a->st.phase, "starting");
        atomic_store(&a->collecting, 0);
        pthread_cond_signal(&a->cv);
    }
out:
    pthread_mutex_unlock(&a->mu);
}

static void free_prompts(autocodec *a) {
    for (size_t i = 0; i < a->n_prompts; i++) free(a->prompts[i].ids);
    free(a->prompts);
    a->prompts = NULL;
    a->n_prompts = a->cap_prompts = 0;
}

/* ------------------------------------------------------------------ */
/* the worker                                                          */

static int read_text_tokens(model *m, const char *path, int32_t **ids, size_t *n, kp_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) return kp_errf(err, KP_ENOTFOUND, "cannot open --calib-text %s: %s", path, strerror(errno));
    char *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;
    for (;;) {
        if (len == cap) {
            char *nb = realloc(buf, cap = cap ? 2 * cap : 1 << 20);
            if (!nb) { rc = kp_errf(err, KP_ENOMEM, "out of memory reading %s", path); break; }
            buf = nb;
        }
        size_t k = fread(buf + len, 1, cap - len, f);
        if (k == 0) break;
        len += k;
    }
    if (!rc && ferror(f)) rc = kp_errf(err, KP_EIO, "cannot read --calib-text %s", path);
    fclose(f);
    if (!rc) rc = tok_encode(model_vocab(m), buf ? buf : "", len, true, false, ids, n, err);
    free(buf);
    return rc;
}

/* fsync a file written by another module (calib_run writes the codec) */
static int fsync_path(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -1;
    int r = fsync(fd);
    close(fd);
    return r;
}

static int write_sidecar(autocodec *a, const calib_report *rep, double created, kp_err *err) {
    char path[AUTOCODEC_PATH_MAX], tmp[AUTOCODEC_PATH_MAX + 8];
    own_path(a->dir, a->o.shape.model_fingerprint, ".json", path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    json_t *j = json_pack("{s:s, s:s?, s:I, s:i, s:i, s:i, s:f, s:f, s:f, s:f, s:f, s:f}", "source",
                          a->calib_text ? "text" : "traffic", "text", a->calib_text, "tokens", (json_int_t)rep->tokens_used,
                          "n_ctx", rep->n_ctx, "sink", AUTOCODEC_SINK, "window", AUTOCODEC_WINDOW, "kl_bound",
                          a->st.kl_bound, "heldout_kl", rep->heldout_kl, "heldout_ratio", rep->heldout_ratio,
                          "bits", rep->bits_per_value, "seconds", rep->seconds, "created", created);
    char *txt = j ? json_dumps(j, JSON_INDENT(2)) : NULL;
    json_decref(j);
    if (!txt) return kp_errf(err, KP_ENOMEM, "out of memory");
    const char *what = NULL;
    int rc = fs_write_replace(tmp, path, txt, strlen(txt), "\n", 1, &what);
    free(txt);
    if (rc) return kp_errf(err, fs_write_errcode(errno), "cannot write %s (%s: %s)", path, what, strerror(errno));
    return 0;
}

static void *worker_main(void *arg) {
    autocodec *a = arg;
    /* the lowest priority there is, for this thread only (never a request's CPU) */
    struct sched_param sp = {0};
    pthread_setschedparam(pthread_self(), SCHED_IDLE, &sp);
    setpriority(PRIO_PROCESS, (id_t)syscall(SYS_gettid), 19);

    if (!a->calib_text) {
        pthread_mutex_lock(&a->mu);
        while (a->st.state == AUTOCODEC_COLLECTING && !atomic_load(&a->cancel)) pthread_cond_wait(&a->cv, &a->mu);
        pthread_mutex_unlock(&a->mu);
        if (atomic_load(&a->cancel)) return NULL;
    }
    set_state(a, AUTOCODEC_CALIBRATING, "loading the model");
    kp_err err = {0};
    model *m = NULL;
    model_opts mo = model_default_opts();
    mo.backend = "cpu";
    mo.n_threads = 1;
    int32_t *ids = NULL;
    size_t n = 0;
    int rc = model_load(&m, a->model_path, &mo, &err);
    if (!rc && a->calib_text) {
        rc = read_text_tokens(m, a->calib_text, &ids, &n, &err);
    } else if (!rc) {
        /* the prompts, one after another, as a text file's stories are: one
         * BOS at the start. A BOS inside a window is an attention sink the
         * fit would see once per prompt and the server never parks there
         * (measured on stories-hd64 from 40K tokens of prompts: with them kept
         * the search found no budget under 8 bits/value meeting the bound). */
        const int32_t bos = tok_bos(model_vocab(m));
        pthread_mutex_lock(&a->mu);
        size_t total = 0;
        for (size_t i = 0; i < a->n_prompts; i++) total += a->prompts[i].n;
        ids = malloc((total ? total : 1) * sizeof *ids);
        for (size_t i = 0; ids && i < a->n_prompts; i++) {
            const size_t skip = i > 0 && bos >= 0 && a->prompts[i].ids[0] == bos;
            memcpy(ids + n, a->prompts[i].ids + skip, (a->prompts[i].n - skip) * sizeof *ids);
            n += a->prompts[i].n - skip;
        }
        free_prompts(a); /* the traffic is not kept past this point */
        pthread_mutex_unlock(&a->mu);
        if (!ids) rc = kp_errf(&err, KP_ENOMEM, "out of memory");
    }
    char path[AUTOCODEC_PATH_MAX], tmp[AUTOCODEC_PATH_MAX + 8];
    own_path(a->dir, a->o.shape.model_fingerprint, ".kvcodec", path, sizeof path);
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    calib_report rep = {0};
    /* whole windows only: the held-out tenth must hold a whole one (calib.h) */
    int win = a->o.n_ctx;
    if (m && model_hp(m)->n_ctx_train > 0) win = KP_MIN(win, model_hp(m)->n_ctx_train);
    if (!rc) {
        n = KP_MIN(n, (size_t)a->o.tokens);
        n -= n % (size_t)win;
        if (n < 2 * (size_t)win)
            rc = kp_errf(&err, KP_EINVAL, "%s gave %zu tokens (whole windows of %d); at least %d are needed, "
                         "one window held out", a->calib_text ? a->calib_text : "traffic", n, win, 2 * win);
    }
    if (!rc) {
        calib_opts co = calib_default_opts();
        co.n_ctx = win;
        co.max_tokens = a->o.tokens;
        co.max_kl = a->o.max_kl / AUTOCODEC_KL_MARGIN;
        co.sink = AUTOCODEC_SINK;
        co.window = AUTOCODEC_WINDOW;
        co.progress = 0;
        co.log = NULL;
        co.on_progress = on_progress;
        co.progress_ud = a;
        co.cancel = &a->cancel;
        char dir[AUTOCODEC_PATH_MAX];
        snprintf(dir, sizeof dir, "%s/autocodec", a->dir);
        if (fs_mkdir_p(dir)) rc = kp_errf(&err, KP_EIO, "cannot create %s: %s", dir, strerror(errno));
        if (!rc) {
            if (!a->o.quiet)
                fprintf(stderr, "kvpark: codec auto: calibrating on %zu tokens of %s (KL bound %g on unseen text, "
                                "searched at %g on the held-out tenth)\n",
                        n, a->calib_text ? a->calib_text : "traffic", a->o.max_kl,
                        co.max_kl);
            rc = calib_run(m, ids, n, &co, tmp, &rep, &err);
        }
        if (!rc && (fsync_path(tmp) || rename(tmp, path) || fs_fsync_parent_dir(path)))
            rc = kp_errf(&err, fs_write_errcode(errno), "cannot write %s: %s", path, strerror(errno));
        if (rc) unlink(tmp);
    }
    free(ids);
    model_free(m);
    const double created = unix_time();
    if (!rc) rc = write_sidecar(a, &rep, created, &err);
    if (!rc && fs_fsync_parent_dir(path)) rc = kp_errf(&err, KP_EIO, "cannot sync %s", path);
    if (!rc && a->o.use) rc = a->o.use(a->o.ud, path, &err);
    if (rc == KP_ECANCELED || atomic_load(&a->cancel)) return NULL;
    if (rc) {
        fail(a, err.msg);
        return NULL;
    }
    pthread_mutex_lock(&a->mu);
    a->st.state = AUTOCODEC_DONE;
    snprintf(a->st.phase, sizeof a->st.phase, "done");
    a->st.progress = 1, a->st.eta_s = 0;
    a->st.heldout_kl = rep.heldout_kl, a->st.heldout_ratio = rep.heldout_ratio, a->st.bits = rep.bits_per_value;
    a->st.created = created;
    a->st.tokens = rep.tokens_used;
    snprintf(a->st.path, sizeof a->st.path, "%s", path);
    pthread_mutex_unlock(&a->mu);
    fprintf(stderr, "kvpark: codec auto: wrote %s in %.0f s (%lld tokens, %.3f bits/value): held-out ratio %.2fx, "
                    "KL %.3g; new parks use it\n", path, rep.seconds, (long long)rep.tokens_used,
            rep.bits_per_value, rep.heldout_ratio, rep.heldout_kl);
    return NULL;
}

/* ------------------------------------------------------------------ */
/* the handle                                                          */

/* the sidecar of a codec made earlier (missing fields stay 0) */
static void read_sidecar(autocodec *a) {
    char path[AUTOCODEC_PATH_MAX];
    own_path(a->dir, a->o.shape.model_fingerprint, ".json", path, sizeof path);
    json_t *j = json_load_file(path, 0, NULL);
    if (!json_is_object(j)) {
        json_decref(j);
        return;
    }
    const char *src = json_string_value(json_object_get(j, "source"));
    a->st.from_traffic = src && !strcmp(src, "traffic");
    a->st.tokens = json_integer_value(json_object_get(j, "tokens"));
    a->st.kl_bound = json_number_value(json_object_get(j, "kl_bound"));
    a->st.heldout_kl = json_number_value(json_object_get(j, "heldout_kl"));
    a->st.heldout_ratio = json_number_value(json_object_get(j, "heldout_ratio"));
    a->st.bits = json_number_value(json_object_get(j, "bits"));
    a->st.created = json_number_value(json_object_get(j, "created"));
    json_decref(j);
}

int autocodec_start(autocodec **out, const autocodec_opts *o, const char *found_path, kp_err *err) {
    *out = NULL;
    if (!o->model_path || !o->dir) return kp_errf(err, KP_EINVAL, "codec auto: no model or cold directory");
    autocodec *a = calloc(1, sizeof *a);
    if (!a) return kp_errf(err, KP_ENOMEM, "out of memory");
    pthread_mutex_init(&a->mu, NULL);
    pthread_cond_init(&a->cv, NULL);
    a->o = *o;
    if (a->o.tokens <= 0) a->o.tokens = AUTOCODEC_DEFAULT_TOKENS;
    if (a->o.n_ctx <= 0) a->o.n_ctx = AUTOCODEC_DEFAULT_CTX;
    if (!(a->o.max_kl > 0)) a->o.max_kl = AUTOCODEC_DEFAULT_MAX_KL;
    a->model_path = strdup(o->model_path);
    a->dir = strdup(o->dir);
    a->calib_text = o->calib_text ? strdup(o->calib_text) : NULL;
    if (!a->model_path || !a->dir || (o->calib_text && !a->calib_text)) {
        autocodec_free(a);
        return kp_errf(err, KP_ENOMEM, "out of memory");
    }
    a->st.needed = a->o.tokens;
    a->st.kl_bound = a->o.max_kl;
    a->st.eta_s = -1;
    a->st.from_traffic = !a->calib_text;
    a->log_t = kp_now();
    if (found_path) {
        char own[AUTOCODEC_PATH_MAX];
        own_path(a->dir, a->o.shape.model_fingerprint, ".kvcodec", own, sizeof own);
        a->st.state = AUTOCODEC_OFF;
        if (!strcmp(found_path, own)) {
            a->st.state = AUTOCODEC_DONE;
            a->st.kl_bound = 0;
            read_sidecar(a);
        }
        snprintf(a->st.path, sizeof a->st.path, "%s", found_path);
        *out = a;
        return 0;
    }
    a->st.state = a->calib_text ? AUTOCODEC_CALIBRATING : AUTOCODEC_COLLECTING;
    atomic_store(&a->collecting, a->st.state == AUTOCODEC_COLLECTING);
    if (pthread_create(&a->th, NULL, worker_main, a) != 0) {
        autocodec_free(a);
        return kp_errf(err, KP_ENOMEM, "codec auto: cannot start the calibration thread");
    }
    a->started = true;
    *out = a;
    return 0;
}

void autocodec_get(autocodec *a, autocodec_status *st) {
    pthread_mutex_lock(&a->mu);
    *st = a->st;
    pthread_mutex_unlock(&a->mu);
}

void autocodec_free(autocodec *a) {
    if (!a) return;
    if (a->started) {
        atomic_store(&a->cancel, 1);
        pthread_mutex_lock(&a->mu);
        pthread_cond_broadcast(&a->cv);
        pthread_mutex_unlock(&a->mu);
        pthread_join(a->th, NULL);
    }
    free_prompts(a);
    pthread_mutex_destroy(&a->mu);
    pthread_cond_destroy(&a->cv);
    free(a->model_path);
    free(a->dir);
    free(a->calib_text);
    free(a);
}
