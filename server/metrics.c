/*
 * metrics.c — the Prometheus registry behind GET /metrics (see metrics.h for
 * the contract).
 *
 * Layout: the registry keeps its families in an array sorted by name; each
 * family keeps its children in an array sorted by label values. Both are
 * sorted on insert (binary search + memmove), so lookups are O(log n) and
 * rendering walks them in order. A child of a histogram holds per-bucket
 * (non-cumulative) counts; rendering turns them into the cumulative
 * _bucket{le=...} series Prometheus expects.
 *
 * Locking: reg->mu guards the family array; f->mu guards f's children and
 * their values. Updates take only f->mu. Render takes reg->mu, runs the
 * collect callbacks, then takes each f->mu in turn.
 *
 * At the end: metrics_kvpark_series, every label tuple the server's families
 * take, which the server declares at 0 at startup (a series that first
 * appears with its first increment hides that increment from rate()).
 */
#include "server/metrics.h"

#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const double metrics_latency_buckets[] = {
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60,
};
const int metrics_n_latency_buckets = (int)KP_ARRAY_LEN(metrics_latency_buckets);

typedef struct metrics_child {
    char *values[METRICS_MAX_LABELS]; /* label values, "" for NULL */
    double value;                     /* counter / gauge value; histogram sum */
    uint64_t count;                   /* histogram: observations */
    uint64_t *buckets;                /* histogram: [n_bounds + 1], last = above all bounds */
} metrics_child;

struct metrics_family {
    char *name;
    char *help;
    metrics_type type;
    int n_labels;
    char *label_names[METRICS_MAX_LABELS];
    double *bounds; /* histogram: [n_bounds] */
    int n_bounds;
    metrics_collect_fn collect;
    void *collect_ctx;

    pthread_mutex_t mu;
    metrics_child **children; /* [n_children], sorted by values */
    int n_children;
    int cap_children;
};

struct metrics_registry {
    pthread_mutex_t mu;
    metrics_family **families; /* [n_families], sorted by name */
    int n_families;
    int cap_families;
};

/* ---------------------------------------------------------------- registry */

metrics_registry *metrics_new(void) {
    metrics_registry *reg = calloc(1, sizeof(*reg));
    if (!reg) return NULL;
    if (pthread_mutex_init(&reg->mu, NULL) != 0) {
        free(reg);
        return NULL;
    }
    return reg;
}

static void child_free(metrics_child *c) {
    if (!c) return;
    for (int i = 0; i < METRICS_MAX_LABELS; i++) free(c->values[i]);
    free(c->buckets);
    free(c);
}

static void family_free(metrics_family *f) {
    if (!f) return;
    for (int i = 0; i < f->n_children; i++) child_free(f->children[i]);
    free(f->children);
    pthread_mutex_destroy(&f->mu);
    free(f->name);
    free(f->help);
    for (int i = 0; i < METRICS_MAX_LABELS; i++) free(f->label_names[i]);
    free(f->bounds);
    free(f);
}

void metrics_free(metrics_registry *reg) {
    if (!reg) return;
    for (int i = 0; i < reg->n_families; i++) family_free(reg->families[i]);
    free(reg->families);
    pthread_mutex_destroy(&reg->mu);
    free(reg);
}

static int valid_metric_name(const char *s) {
    if (!s || !*s) return 0;
    for (const char *p = s; *p; p++) {
        char c = *p;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' || c == ':' ||
                 (p != s && c >= '0' && c <= '9');
        if (!ok) return 0;
    }
    return 1;
}

static int valid_label_name(const char *s) {
    if (!s || !*s) return 0;
    if (s[0] == '_' && s[1] == '_') return 0; /* reserved for Prometheus */
    for (const char *p = s; *p; p++) {
        char c = *p;
        int ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || c == '_' ||
                 (p != s && c >= '0' && c <= '9');
        if (!ok) return 0;
    }
    return 1;
}

/* Index of the family called name, or -(insertion point) - 1. reg->mu held. */
static int find_family(const metrics_registry *reg, const char *name) {
    int lo = 0, hi = reg->n_families;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = strcmp(reg->families[mid]->name, name);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -lo - 1;
}

static char *dup_or_empty(const char *s) { return strdup(s ? s : ""); }

/* Index of the child with these values, or -(insertion point) - 1. f->mu held. */
static int find_child(const metrics_family *f, const char *const *vals) {
    int lo = 0, hi = f->n_children;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        int c = 0;
        for (int i = 0; i < f->n_labels && c == 0; i++)
            c = strcmp(f->children[mid]->values[i], vals[i]);
        if (c == 0) return mid;
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return -lo - 1;
}

/* The child for (l0, l1), created if absent; NULL when it cannot be. f->mu held. */
static metrics_child *get_child(metrics_family *f, const char *l0, const char *l1) {
    const char *vals[METRICS_MAX_LABELS] = {l0 ? l0 : "", l1 ? l1 : ""};
    int idx = find_child(f, vals);
    if (idx >= 0) return f->children[idx];
    if (f->n_children >= METRICS_MAX_CHILDREN) return NULL;
    int at = -idx - 1;
    if (f->n_children == f->cap_children) {
        int cap = f->cap_children ? f->cap_children * 2 : 4;
        metrics_child **nc = realloc(f->children, (size_t)cap * sizeof(*nc));
        if (!nc) return NULL;
        f->children = nc;
        f->cap_children = cap;
    }
    metrics_child *c = calloc(1, sizeof(*c));
    if (!c) return NULL;
    for (int i = 0; i < f->n_labels; i++) {
        c->values[i] = strdup(vals[i]);
        if (!c->values[i]) {
            child_free(c);
            return NULL;
        }
    }
    if (f->type == METRICS_HISTOGRAM) {
        c->buckets = calloc((size_t)f->n_bounds + 1, sizeof(*c->buckets));
        if (!c->buckets) {
            child_free(c);
            return NULL;
        }
    }
    memmove(&f->children[at + 1], &f->children[at],
            (size_t)(f->n_children - at) * sizeof(*f->children));
    f->children[at] = c;
    f->n_children++;
    return c;
}

static metrics_family *add_family(metrics_registry *reg, metrics_type type, const char *name,
                                  const char *help, const char *label0, const char *label1,
                                  const double *bounds, int n_bounds, metrics_collect_fn fn,
                                  void *ctx, kp_err *err) {
    if (!reg) {
        kp_errf(err, KP_EINVAL, "metrics: registry is NULL");
        return NULL;
    }
    if (!valid_metric_name(name)) {
        kp_errf(err, KP_EINVAL,
                "metrics: invalid metric name '%s'; use [a-zA-Z_:][a-zA-Z0-9_:]*",
                name ? name : "(null)");
        return NULL;
    }
    if (!label0 && label1) {
        kp_errf(err, KP_EINVAL, "metrics: %s: label1 '%s' given without label0", name, label1);
        return NULL;
    }
    const char *labels[METRICS_MAX_LABELS] = {label0, label1};
    int n_labels = label1 ? 2 : label0 ? 1 : 0;
    for (int i = 0; i < n_labels; i++) {
        if (!valid_label_name(labels[i])) {
            kp_errf(err, KP_EINVAL,
                    "metrics: %s: invalid label name '%s'; use [a-zA-Z_][a-zA-Z0-9_]* "
                    "not starting with '__'",
                    name, labels[i]);
            return NULL;
        }
        if (type == METRICS_HISTOGRAM && strcmp(labels[i], "le") == 0) {
            kp_errf(err, KP_EINVAL, "metrics: %s: a histogram may not use the label 'le'",
                    name);
            return NULL;
        }
    }
    if (n_labels == 2 && strcmp(label0, label1) == 0) {
        kp_errf(err, KP_EINVAL, "metrics: %s: label '%s' given twice", name, label0);
        return NULL;
    }
    if (type == METRICS_HISTOGRAM) {
        if (!bounds) {
            bounds = metrics_latency_buckets;
            n_bounds = metrics_n_latency_buckets;
        }
        if (n_bounds < 1 || n_bounds > METRICS_MAX_BUCKETS) {
            kp_errf(err, KP_EINVAL, "metrics: %s: %d bucket bounds; give 1..%d", name,
                    n_bounds, METRICS_MAX_BUCKETS);
            return NULL;
        }
        for (int i = 0; i < n_bounds; i++) {
            if (!isfinite(bounds[i]) || (i > 0 && !(bounds[i] > bounds[i - 1]))) {
                kp_errf(err, KP_EINVAL,
                        "metrics: %s: bucket bounds must be finite and strictly increasing "
                        "(bound %d is %g)",
                        name, i, bounds[i]);
                return NULL;
            }
        }
    }

    metrics_family *f = calloc(1, sizeof(*f));
    if (!f) goto oom;
    if (pthread_mutex_init(&f->mu, NULL) != 0) {
        free(f);
        f = NULL;
        goto oom;
    }
    f->type = type;
    f->n_labels = n_labels;
    f->collect = fn;
    f->collect_ctx = ctx;
    f->name = strdup(name);
    f->help = dup_or_empty(help);
    if (!f->name || !f->help) goto oom;
    for (int i = 0; i < n_labels; i++)
        if (!(f->label_names[i] = strdup(labels[i]))) goto oom;
    if (type == METRICS_HISTOGRAM) {
        f->bounds = malloc((size_t)n_bounds * sizeof(*f->bounds));
        if (!f->bounds) goto oom;
        memcpy(f->bounds, bounds, (size_t)n_bounds * sizeof(*f->bounds));
        f->n_bounds = n_bounds;
    }
    if (n_labels == 0 && !get_child(f, NULL, NULL)) goto oom;

    pthread_mutex_lock(&reg->mu);
    int idx = find_family(reg, name);
    if (idx >= 0) {
        pthread_mutex_unlock(&reg->mu);
        family_free(f);
        kp_errf(err, KP_EINVAL, "metrics: metric '%s' is registered twice", name);
        return NULL;
    }
    if (reg->n_families == reg->cap_families) {
        int cap = reg->cap_families ? reg->cap_families * 2 : 16;
        metrics_family **nf = realloc(reg->families, (size_t)cap * sizeof(*nf));
        if (!nf) {
            pthread_mutex_unlock(&reg->mu);
            goto oom;
        }
        reg->families = nf;
        reg->cap_families = cap;
    }
    int at = -idx - 1;
    memmove(&reg->families[at + 1], &reg->families[at],
            (size_t)(reg->n_families - at) * sizeof(*reg->families));
    reg->families[at] = f;
    reg->n_families++;
    pthread_mutex_unlock(&reg->mu);
    return f;

oom:
    family_free(f);
    kp_errf(err, KP_ENOMEM, "metrics: out of memory registering '%s'", name);
    return NULL;
}

metrics_family *metrics_counter(metrics_registry *reg, const char *name, const char *help,
                                 const char *label0, const char *label1, kp_err *err) {
    return add_family(reg, METRICS_COUNTER, name, help, label0, label1, NULL, 0, NULL, NULL,
                      err);
}

metrics_family *metrics_gauge(metrics_registry *reg, const char *name, const char *help,
                              const char *label0, const char *label1, kp_err *err) {
    return add_family(reg, METRICS_GAUGE, name, help, label0, label1, NULL, 0, NULL, NULL,
                      err);
}

metrics_family *metrics_histogram(metrics_registry *reg, const char *name, const char *help,
                                  const double *bounds, int n_bounds,
                                  const char *label0, const char *label1, kp_err *err) {
    return add_family(reg, METRICS_HISTOGRAM, name, help, label0, label1, bounds, n_bounds,
                      NULL, NULL, err);
}

/* A family whose values fn sets at each render. */
static metrics_family *add_collected(metrics_registry *reg, metrics_type type, const char *name, const char *help,
                                     const char *label0, const char *label1, metrics_collect_fn fn, void *ctx,
                                     kp_err *err) {
    if (!fn) {
        kp_errf(err, KP_EINVAL, "metrics: %s: collect callback is NULL", name ? name : "?");
        return NULL;
    }
    return add_family(reg, type, name, help, label0, label1, NULL, 0, fn, ctx, err);
}

metrics_family *metrics_gauge_fn(metrics_registry *reg, const char *name, const char *help,
                                 const char *label0, const char *label1,
                                 metrics_collect_fn fn, void *ctx, kp_err *err) {
    return add_collected(reg, METRICS_GAUGE, name, help, label0, label1, fn, ctx, err);
}

metrics_family *metrics_counter_fn(metrics_registry *reg, const char *name, const char *help,
                                   const char *label0, const char *label1,
                                   metrics_collect_fn fn, void *ctx, kp_err *err) {
    return add_collected(reg, METRICS_COUNTER, name, help, label0, label1, fn, ctx, err);
}

int metrics_info(metrics_registry *reg, const char *name, const char *help,
                 const char *label0, const char *value0,
                 const char *label1, const char *value1, kp_err *err) {
    kp_err local;
    if (!err) err = &local;
    metrics_family *f = metrics_gauge(reg, name, help, label0, label1, err);
    if (!f) return err->code;
    metrics_set(f, 1, value0, value1);
    return 0;
}

int metrics_exp_buckets(double start, double factor, int n, double *out, kp_err *err) {
    if (!(start > 0) || !(factor > 1) || n < 1 || n > METRICS_MAX_BUCKETS || !out)
        return kp_errf(err, KP_EINVAL,
                       "metrics: exponential buckets need start > 0, factor > 1 and "
                       "1..%d buckets (got start %g, factor %g, n %d)",
                       METRICS_MAX_BUCKETS, start, factor, n);
    double b = start;
    for (int i = 0; i < n; i++, b *= factor) {
        if (!isfinite(b))
            return kp_errf(err, KP_ERANGE, "metrics: exponential bucket %d overflows", i);
        out[i] = b;
    }
    return 0;
}

/* ----------------------------------------------------------------- updates */

void metrics_add(metrics_family *f, double v, const char *l0, const char *l1) {
    if (!f || f->type == METRICS_HISTOGRAM) return;
    if (f->type == METRICS_COUNTER && !(v >= 0)) return; /* also drops NaN */
    pthread_mutex_lock(&f->mu);
    metrics_child *c = get_child(f, l0, l1);
    if (c) c->value += v;
    pthread_mutex_unlock(&f->mu);
}

void metrics_inc(metrics_family *f, const char *l0, const char *l1) { metrics_add(f, 1, l0, l1); }

void metrics_dec(metrics_family *f, const char *l0, const char *l1) {
    if (f && f->type == METRICS_GAUGE) metrics_add(f, -1, l0, l1);
}

void metrics_set(metrics_family *f, double v, const char *l0, const char *l1) {
    /* gauges, and counters whose collect callback reads a count kept elsewhere */
    if (!f || !(f->type == METRICS_GAUGE || (f->type == METRICS_COUNTER && f->collect))) return;
    pthread_mutex_lock(&f->mu);
    metrics_child *c = get_child(f, l0, l1);
    if (c) c->value = v;
    pthread_mutex_unlock(&f->mu);
}

void metrics_observe(metrics_family *f, double v, const char *l0, const char *l1) {
    if (!f || f->type != METRICS_HISTOGRAM || isnan(v)) return;
    /* First bucket whose upper bound is >= v (le is inclusive); n_bounds = +Inf. */
    int lo = 0, hi = f->n_bounds;
    while (lo < hi) {
        int mid = lo + (hi - lo) / 2;
        if (v <= f->bounds[mid]) hi = mid;
        else lo = mid + 1;
    }
    pthread_mutex_lock(&f->mu);
    metrics_child *c = get_child(f, l0, l1);
    if (c) {
        c->buckets[lo]++;
        c->count++;
        c->value += v;
    }
    pthread_mutex_unlock(&f->mu);
}

double metrics_get(metrics_family *f, const char *l0, const char *l1) {
    if (!f || f->type == METRICS_HISTOGRAM) return NAN;
    const char *vals[METRICS_MAX_LABELS] = {l0 ? l0 : "", l1 ? l1 : ""};
    double v = NAN;
    pthread_mutex_lock(&f->mu);
    int idx = find_child(f, vals);
    if (idx >= 0) v = f->children[idx]->value;
    pthread_mutex_unlock(&f->mu);
    return v;
}

int metrics_histogram_get(metrics_family *f, const char *l0, const char *l1,
                          uint64_t *count, double *sum) {
    if (!f || f->type != METRICS_HISTOGRAM) return KP_EINVAL;
    const char *vals[METRICS_MAX_LABELS] = {l0 ? l0 : "", l1 ? l1 : ""};
    int rc = KP_ENOTFOUND;
    pthread_mutex_lock(&f->mu);
    int idx = find_child(f, vals);
    if (idx >= 0) {
        if (count) *count = f->children[idx]->count;
        if (sum) *sum = f->children[idx]->value;
        rc = 0;
    }
    pthread_mutex_unlock(&f->mu);
    return rc;
}

metrics_type metrics_family_type(const metrics_family *f) { return f->type; }
const char *metrics_family_name(const metrics_family *f) { return f->name; }

/* --------------------------------------------------------------- rendering */

char *metrics_format_double(double v, char *buf, size_t size) {
    if (isnan(v)) {
        snprintf(buf, size, "NaN");
    } else if (isinf(v)) {
        snprintf(buf, size, v > 0 ? "+Inf" : "-Inf");
    } else if (v == floor(v) && fabs(v) <= 9007199254740992.0) { /* 2^53: exact integer */
        snprintf(buf, size, "%lld", (long long)v);
    } else {
        /* Shortest %g that reads back as the same double. */
        for (int prec = 15; prec <= 17; prec++) {
            snprintf(buf, size, "%.*g", prec, v);
            if (strtod(buf, NULL) == v) break;
        }
    }
    return buf;
}

/* A growable string; on allocation failure `failed` sticks and appends stop. */
typedef struct {
    char *s;
    size_t len, cap;
    int failed;
} sbuf;

static void sb_putn(sbuf *b, const char *s, size_t n) {
    if (b->failed) return;
    if (b->len + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap : 1024;
        while (cap < b->len + n + 1) cap *= 2;
        char *ns = realloc(b->s, cap);
        if (!ns) {
            b->failed = 1;
            return;
        }
        b->s = ns;
        b->cap = cap;
    }
    memcpy(b->s + b->len, s, n);
    b->len += n;
    b->s[b->len] = '\0';
}

static void sb_puts(sbuf *b, const char *s) { sb_putn(b, s, strlen(s)); }

static void sb_putd(sbuf *b, double v) {
    char tmp[64];
    sb_puts(b, metrics_format_double(v, tmp, sizeof(tmp)));
}

static void sb_putu(sbuf *b, uint64_t v) {
    char tmp[32];
    snprintf(tmp, sizeof(tmp), "%llu", (unsigned long long)v);
    sb_puts(b, tmp);
}

/* Escape for help text (quote = 0: \\ and \n) or a label value (quote = 1:
 * also \"). */
static void sb_put_escaped(sbuf *b, const char *s, int quote) {
    for (const char *p = s; *p; p++) {
        if (*p == '\\') sb_puts(b, "\\\\");
        else if (*p == '\n') sb_puts(b, "\\n");
        else if (quote && *p == '"') sb_puts(b, "\\\"");
        else sb_putn(b, p, 1);
    }
}

/* {a="x",b="y"} plus an optional le="..." (le may be NULL); nothing at all
 * when there are no labels. */
static void sb_put_labels(sbuf *b, const metrics_family *f, const metrics_child *c,
                          const char *le) {
    if (f->n_labels == 0 && !le) return;
    sb_puts(b, "{");
    for (int i = 0; i < f->n_labels; i++) {
        if (i) sb_puts(b, ",");
        sb_puts(b, f->label_names[i]);
        sb_puts(b, "=\"");
        sb_put_escaped(b, c->values[i], 1);
        sb_puts(b, "\"");
    }
    if (le) {
        if (f->n_labels) sb_puts(b, ",");
        sb_puts(b, "le=\"");
        sb_puts(b, le);
        sb_puts(b, "\"");
    }
    sb_puts(b, "}");
}

static void render_family(sbuf *b, metrics_family *f) {
    static const char *type_names[] = {"counter", "gauge", "histogram"};
    sb_puts(b, "# HELP ");
    sb_puts(b, f->name);
    sb_puts(b, " ");
    sb_put_escaped(b, f->help, 0);
    sb_puts(b, "\n# TYPE ");
    sb_puts(b, f->name);
    sb_puts(b, " ");
    sb_puts(b, type_names[f->type]);
    sb_puts(b, "\n");

    pthread_mutex_lock(&f->mu);
    for (int ci = 0; ci < f->n_children; ci++) {
        const metrics_child *c = f->children[ci];
        if (f->type != METRICS_HISTOGRAM) {
            sb_puts(b, f->name);
            sb_put_labels(b, f, c, NULL);
            sb_puts(b, " ");
            sb_putd(b, c->value);
            sb_puts(b, "\n");
            continue;
        }
        uint64_t cum = 0;
        for (int i = 0; i <= f->n_bounds; i++) {
            char le[64];
            if (i < f->n_bounds) metrics_format_double(f->bounds[i], le, sizeof(le));
            else snprintf(le, sizeof(le), "+Inf");
            cum += c->buckets[i];
            sb_puts(b, f->name);
            sb_puts(b, "_bucket");
            sb_put_labels(b, f, c, le);
            sb_puts(b, " ");
            sb_putu(b, cum);
            sb_puts(b, "\n");
        }
        sb_puts(b, f->name);
        sb_puts(b, "_sum");
        sb_put_labels(b, f, c, NULL);
        sb_puts(b, " ");
        sb_putd(b, c->value);
        sb_puts(b, "\n");
        sb_puts(b, f->name);
        sb_puts(b, "_count");
        sb_put_labels(b, f, c, NULL);
        sb_puts(b, " ");
        sb_putu(b, c->count);
        sb_puts(b, "\n");
    }
    pthread_mutex_unlock(&f->mu);
}

char *metrics_render(metrics_registry *reg) {
    sbuf b = {0};
    sb_puts(&b, ""); /* an empty registry renders as "" rather than NULL */
    if (!reg) return b.s;
    pthread_mutex_lock(&reg->mu);
    for (int i = 0; i < reg->n_families; i++)
        if (reg->families[i]->collect)
            reg->families[i]->collect(reg->families[i], reg->families[i]->collect_ctx);
    for (int i = 0; i < reg->n_families; i++) render_family(&b, reg->families[i]);
    pthread_mutex_unlock(&reg->mu);
    if (b.failed) {
        free(b.s);
        return NULL;
    }
    return b.s;
}

/* ------------------------------------------------------ declared children */

int metrics_declare(metrics_family *f, const char *l0, const char *l1) {
    if (!f) return KP_EINVAL;
    pthread_mutex_lock(&f->mu);
    metrics_child *c = get_child(f, l0, l1);
    pthread_mutex_unlock(&f->mu);
    return c ? 0 : KP_ENOMEM;
}

int metrics_declare_sets(metrics_registry *reg, const metrics_series_set *sets, int n, kp_err *err) {
    if (!reg || (n > 0 && !sets)) return kp_errf(err, KP_EINVAL, "metrics: registry or label sets are NULL");
    static const char *const none[] = {NULL, NULL};
    for (int i = 0; i < n; i++) {
        const metrics_series_set *ss = &sets[i];
        pthread_mutex_lock(&reg->mu);
        int idx = ss->family ? find_family(reg, ss->family) : -1;
        metrics_family *f = idx >= 0 ? reg->families[idx] : NULL;
        pthread_mutex_unlock(&reg->mu);
        if (!f)
            return kp_errf(err, KP_ENOTFOUND,
                           "metrics: label sets name the family '%s', which is not registered "
                           "(metrics_kvpark_series and the registrations disagree)",
                           ss->family ? ss->family : "(null)");
        /* An absent list stands for one NULL value, so the loops run once. */
        const char *const *v0 = ss->l0 ? ss->l0 : none;
        const char *const *v1 = ss->l1 ? ss->l1 : none;
        for (int a = 0; a == 0 || v0[a]; a++)
            for (int b = 0; b == 0 || v1[b]; b++)
                if (metrics_declare(f, v0[a], v1[b]))
                    return kp_errf(err, KP_ENOMEM, "metrics: out of memory declaring %s{%s,%s}",
                                   ss->family, v0[a] ? v0[a] : "", v1[b] ? v1[b] : "");
    }
    return 0;
}

/* kvpark's label tuples (metrics.h). Statuses per route, from the server
 * (with the connection and tenant work of issue 11 merged):
 *   every route   400 request smuggling (Content-Length with Transfer-Encoding),
 *                 401 bad key (health and metrics: only with --metrics-key),
 *                 404 unknown route or method, 413 body too large,
 *                 499 client gone before the answer
 *   /v1/...       503 while the model loads
 *   generation    200, 400 bad request / context, 404 unknown session,
 *                 409 session busy, 429 queue full, 500 failed during generation
 *   sessions      200, 400, 404, 409, 429 too many sessions, 500 failed save,
 *                 507 disk full on save
 *   every route   204 / 403: a CORS preflight allowed / refused */
#define S_(...) ((const char *const[]){__VA_ARGS__, NULL})
static const char *const gen_statuses[] = {"200", "400", "401", "404", "409", "413", "429", "499", "500",
                                           "503", NULL};

const metrics_series_set metrics_kvpark_series[] = {
    {"kvpark_requests_total", S_("chat_completions", "completions"), gen_statuses},
    {"kvpark_requests_total", S_("sessions"),
     S_("200", "400", "401", "404", "409", "413", "429", "499", "500", "503", "507")},
    {"kvpark_requests_total", S_("models", "health"), S_("200", "400", "401", "404", "413", "499", "503")},
    {"kvpark_requests_total", S_("metrics"), S_("200", "400", "401", "404", "413", "499")},
    {"kvpark_requests_total", S_("other"), S_("400", "401", "404", "413", "499", "503")},
    {"kvpark_requests_total", S_("embeddings"), S_("200", "400", "401", "404", "413", "499", "500", "503")},
    /* CORS preflights (OPTIONS, any route): 204 allowed, 403 not */
    {"kvpark_requests_total",
     S_("chat_completions", "completions", "sessions", "models", "health", "metrics", "embeddings", "other"),
     S_("204", "403")},
    /* park: the tier it went to (empty: it had no tokens); restore: the tier
     * it came from; error: either; expire: the tier it was deleted from */
    {"kvpark_session_events_total", S_("park", "restore", "error"), S_("warm", "cold")},
    {"kvpark_session_events_total", S_("restore", "error"), S_("remote")},
    /* recomputed: the KV could not be restored from that tier, the token ids
     * could: the next request re-prefills them */
    {"kvpark_session_events_total", S_("recomputed"), S_("warm", "cold", "remote")},
    {"kvpark_session_events_total", S_("park", "error"), S_("empty")},
    {"kvpark_session_events_total", S_("expire"), S_("empty", "hot", "warm", "cold")},
    {"kvpark_session_events_total", S_("save", "drop"), S_("cold")},
    {"kvpark_session_restore_seconds", S_("warm", "cold", "remote"), NULL},
    {"kvpark_sessions", S_("empty", "hot", "warm", "cold"), NULL},
    {"kvpark_kv_bytes", S_("hot", "warm", "cold"), NULL},
    {"kvpark_store_events", S_("dropped", "quarantined", "io_error", "foreign", "torn_write_removed", "kv_lost"), NULL},
};
const int metrics_n_kvpark_series = (int)KP_ARRAY_LEN(metrics_kvpark_series);
#undef S_
