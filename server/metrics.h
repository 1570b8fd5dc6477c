/*
 * metrics.h — a small Prometheus client for the kvpark server: a registry of
 * counters, gauges and histograms rendered as the Prometheus text exposition
 * format 0.0.4 for GET /metrics.
 *
 * Why our own: the server needs a dozen metrics, updated from the HTTP threads
 * and the scheduler thread at once; a few hundred lines beat a dependency.
 *
 * Model
 *   - A registry owns metric *families*. A family has a name, help text, a
 *     type and 0, 1 or 2 label names. Each distinct tuple of label values is a
 *     *child* (one time series, or one bucket set for a histogram), created on
 *     first use. A family with no labels has its single child created at
 *     registration, so it renders "name 0" before its first update.
 *   - Register every family at startup (metrics_counter / metrics_gauge /
 *     metrics_histogram / metrics_gauge_fn / metrics_info) and keep the
 *     returned metrics_family * handle; the registry owns it.
 *   - Updates take the handle, a value and the label values in order
 *     (NULL for slots the family does not have; NULL for a slot it has reads
 *     as ""):
 *         metrics_inc(m->requests, "chat_completions", "200");
 *         metrics_add(m->prompt_tokens, 412, NULL, NULL);
 *         metrics_observe(m->ttft, 0.183, NULL, NULL);
 *         metrics_set(m->kv_bytes, 1.5e9, "ram", NULL);
 *     Updates never fail loudly: a call on the wrong type, a negative counter
 *     increment or a child that cannot be allocated (out of memory, or more
 *     than METRICS_MAX_CHILDREN distinct label tuples) is dropped.
 *   - A labelled child that is only created by its first update makes
 *     Prometheus miss that first burst: rate() and increase() need a sample
 *     before the change. So declare every label tuple a family can take at
 *     startup (metrics_declare / metrics_declare_sets): it renders at 0 (an
 *     empty histogram) from the first scrape. metrics_kvpark_series lists the
 *     server's tuples.
 *
 * Thread safety: every function may be called from any thread at any time
 * (one mutex per family, one for the registry's family list). Updates are a
 * lock, a search of the family's (few) children and an add.
 *
 * Output: families sorted by name, children sorted by their label values
 * (byte order), so the text is deterministic. Label values are escaped
 * (\\, \", \n), help text likewise (\\, \n). Numbers are printed so that
 * Prometheus parses them back exactly: integers up to 2^53 without exponent,
 * other values with the shortest %g that round-trips, and +Inf / -Inf / NaN.
 */
#ifndef KP_METRICS_H
#define KP_METRICS_H

#include <stdint.h>

#include "kernels/kp.h"

#define METRICS_MAX_LABELS 2
#define METRICS_MAX_BUCKETS 64      /* bucket bounds per histogram, +Inf excluded */
#define METRICS_MAX_CHILDREN 4096   /* label-value tuples per family, then dropped */

typedef enum {
    METRICS_COUNTER = 0,
    METRICS_GAUGE = 1,
    METRICS_HISTOGRAM = 2,
} metrics_type;

typedef struct metrics_registry metrics_registry;
typedef struct metrics_family metrics_family;

/* Called at the start of each metrics_render() for a metrics_gauge_fn family;
 * it sets the current values with metrics_set(f, ...). It must not register
 * families (the registry lock is held) but may update any family. */
typedef void (*metrics_collect_fn)(metrics_family *f, void *ctx);

/* Default histogram bounds for latencies in seconds: 1 ms .. 60 s in a
 * 1-2.5-5 ladder (15 bounds; +Inf is implicit). */
extern const double metrics_latency_buckets[];
extern const int metrics_n_latency_buckets;

/* NULL when out of memory. */
metrics_registry *metrics_new(void);
/* Frees the registry and every family in it; NULL is a no-op. */
void metrics_free(metrics_registry *reg);

/*
 * Register a family. label0 / label1 are the label names (NULL when absent;
 * label1 needs label0). Names must match [a-zA-Z_:][a-zA-Z0-9_:]*, label names
 * [a-zA-Z_][a-zA-Z0-9_]* and not start with "__"; a histogram may not use the
 * label "le". A name already registered is an error. Returns the handle, or
 * NULL with *err filled (KP_EINVAL, KP_ENOMEM).
 */
metrics_family *metrics_counter(metrics_registry *reg, const char *name, const char *help,
                                 const char *label0, const char *label1, kp_err *err);
metrics_family *metrics_gauge(metrics_registry *reg, const char *name, const char *help,
                              const char *label0, const char *label1, kp_err *err);
/* bounds: strictly increasing finite upper bounds (n_bounds in 1..64), copied;
 * bounds == NULL selects metrics_latency_buckets. */
metrics_family *metrics_histogram(metrics_registry *reg, const char *name, const char *help,
                                  const double *bounds, int n_bounds,
                                  const char *label0, const char *label1, kp_err *err);
/* A gauge whose values are set by fn(f, ctx) at each render. */
metrics_family *metrics_gauge_fn(metrics_registry *reg, const char *name, const char *help,
                                 const char *label0, const char *label1,
                                 metrics_collect_fn fn, void *ctx, kp_err *err);
/* A counter whose values are set by fn(f, ctx) at each render (metrics_set),
 * from a count kept elsewhere that only grows (e.g. the remote tier's). */
metrics_family *metrics_counter_fn(metrics_registry *reg, const char *name, const char *help,
                                   const char *label0, const char *label1,
                                   metrics_collect_fn fn, void *ctx, kp_err *err);
/* An info metric: a gauge with up to two labels whose one child is set to 1,
 * e.g. kvpark_build_info{version="0.1.0",backend="cpu"} 1. Pass NULL names for
 * absent labels. Returns 0 or a KP_E* code. */
int metrics_info(metrics_registry *reg, const char *name, const char *help,
                 const char *label0, const char *value0,
                 const char *label1, const char *value1, kp_err *err);

/* Fill out[0..n) with start * factor^i (start > 0, factor > 1). Returns 0 or
 * KP_EINVAL. */
int metrics_exp_buckets(double start, double factor, int n, double *out, kp_err *err);

/* Create the child (l0, l1) at zero if it does not exist yet (an existing
 * child keeps its value). 0, KP_EINVAL (f NULL) or KP_ENOMEM (also past
 * METRICS_MAX_CHILDREN). */
int metrics_declare(metrics_family *f, const char *l0, const char *l1);

/* A family's label tuples, as a product: every value of l0 with every value
 * of l1. Both lists end with NULL; l0 NULL for a family without labels, l1
 * NULL for one with a single label. */
typedef struct metrics_series_set {
    const char *family;
    const char *const *l0;
    const char *const *l1;
} metrics_series_set;

/* metrics_declare for every tuple of sets[0..n). A family name that is not
 * registered is KP_ENOTFOUND, naming it (the table and the registrations have
 * drifted apart: fix the table); KP_ENOMEM as for metrics_declare. */
int metrics_declare_sets(metrics_registry *reg, const metrics_series_set *sets, int n, kp_err *err);

/* kvpark's label tuples: every route (the endpoint label of
 * kvpark_requests_total) with each status it can answer, every session event
 * with the tiers it names, every tier of the per-tier families, every store
 * event. The server declares them at startup. When a new label value is
 * emitted somewhere, add it here (tests/test_metrics.c and
 * tests/integration/metrics.test.mjs check the table against the server). */
extern const metrics_series_set metrics_kvpark_series[];
extern const int metrics_n_kvpark_series;

/* Counter: add v >= 0 (others dropped). Gauge: add v (may be negative). */
void metrics_add(metrics_family *f, double v, const char *l0, const char *l1);
/* metrics_add(f, 1, ...). */
void metrics_inc(metrics_family *f, const char *l0, const char *l1);
/* Gauge: add -1. */
void metrics_dec(metrics_family *f, const char *l0, const char *l1);
/* Gauge: set to v. */
void metrics_set(metrics_family *f, double v, const char *l0, const char *l1);
/* Histogram: record one observation (NaN is dropped). */
void metrics_observe(metrics_family *f, double v, const char *l0, const char *l1);

/* The current value of a counter or gauge child; NaN if the child does not
 * exist or f is a histogram. For tests and logs. */
double metrics_get(metrics_family *f, const char *l0, const char *l1);
/* A histogram child's count and sum; KP_ENOTFOUND if it does not exist. */
int metrics_histogram_get(metrics_family *f, const char *l0, const char *l1,
                          uint64_t *count, double *sum);

metrics_type metrics_family_type(const metrics_family *f);
const char *metrics_family_name(const metrics_family *f);

/* The whole registry in text format 0.0.4 (Content-Type:
 * "text/plain; version=0.0.4; charset=utf-8"). malloc'd, NUL-terminated;
 * free() it. NULL when out of memory. */
char *metrics_render(metrics_registry *reg);

/* Append v to buf (size >= 32) as Prometheus parses it; returns buf. Exposed
 * for tests. */
char *metrics_format_double(double v, char *buf, size_t size);

#endif
