/*
 * test_metrics.c — the Prometheus client (server/metrics.c): registration
 * checks, number formatting, the exact text of counters, gauges, histograms
 * (cumulative buckets, +Inf, _sum, _count) and escaped label values, the full
 * set of kvpark metrics validated by `promtool check metrics`, callback
 * gauges, the server's label tuples declared at 0 before any update
 * (metrics_kvpark_series), and exact totals under 4 concurrent writer threads.
 */
#include "tests/testutil.h"

#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#include "server/metrics.h"

/* Fail unless `line` (without its newline) is a whole line of text. */
static void assert_has_line(const char *text, const char *line) {
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++) {
        int starts = (p == text || p[-1] == '\n');
        int ends = (p[n] == '\n' || p[n] == '\0');
        if (starts && ends) return;
    }
    print_message("missing line: %s\n--- rendered ---\n%s", line, text);
    fail();
}

static void assert_no_substr(const char *text, const char *s) {
    if (strstr(text, s)) {
        print_message("unexpected '%s' in:\n%s", s, text);
        fail();
    }
}

/* Position of a line in text (for order checks); fails if absent. */
static const char *line_pos(const char *text, const char *line) {
    assert_has_line(text, line);
    size_t n = strlen(line);
    for (const char *p = text; (p = strstr(p, line)) != NULL; p++)
        if ((p == text || p[-1] == '\n') && (p[n] == '\n' || p[n] == '\0')) return p;
    return NULL;
}

static void test_format_double(void **state) {
    (void)state;
    char buf[64];
    assert_string_equal(metrics_format_double(0, buf, sizeof(buf)), "0");
    assert_string_equal(metrics_format_double(-0.0, buf, sizeof(buf)), "0");
    assert_string_equal(metrics_format_double(42, buf, sizeof(buf)), "42");
    assert_string_equal(metrics_format_double(-7, buf, sizeof(buf)), "-7");
    assert_string_equal(metrics_format_double(1e15, buf, sizeof(buf)), "1000000000000000");
    assert_string_equal(metrics_format_double(9007199254740992.0, buf, sizeof(buf)),
                        "9007199254740992");
    assert_string_equal(metrics_format_double(0.001, buf, sizeof(buf)), "0.001");
    assert_string_equal(metrics_format_double(2.5, buf, sizeof(buf)), "2.5");
    assert_string_equal(metrics_format_double(0.1 + 0.2, buf, sizeof(buf)),
                        "0.30000000000000004");
    assert_string_equal(metrics_format_double(INFINITY, buf, sizeof(buf)), "+Inf");
    assert_string_equal(metrics_format_double(-INFINITY, buf, sizeof(buf)), "-Inf");
    assert_string_equal(metrics_format_double(NAN, buf, sizeof(buf)), "NaN");
    /* Large and tiny values round-trip through strtod. */
    double vals[] = {1e300, 3.0e-9, 1.0 / 3.0, 123456789.125, 1e20, -2.5e-7};
    for (size_t i = 0; i < KP_ARRAY_LEN(vals); i++) {
        metrics_format_double(vals[i], buf, sizeof(buf));
        assert_true(strtod(buf, NULL) == vals[i]);
    }
}

static void test_registration_errors(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    assert_non_null(reg);
    kp_err err = {0};

    assert_null(metrics_counter(reg, "9bad", "h", NULL, NULL, &err));
    assert_int_equal(err.code, KP_EINVAL);
    assert_non_null(strstr(err.msg, "9bad"));
    assert_null(metrics_counter(reg, "has-dash", "h", NULL, NULL, &err));
    assert_null(metrics_counter(reg, "", "h", NULL, NULL, &err));
    assert_null(metrics_counter(reg, "ok_total", "h", "bad label", NULL, &err));
    assert_null(metrics_counter(reg, "ok_total", "h", "__reserved", NULL, &err));
    assert_null(metrics_counter(reg, "ok_total", "h", NULL, "status", &err));
    assert_null(metrics_counter(reg, "ok_total", "h", "a", "a", &err));
    assert_null(metrics_histogram(reg, "h_seconds", "h", NULL, 0, "le", NULL, &err));
    double bad[] = {1, 1};
    assert_null(metrics_histogram(reg, "h_seconds", "h", bad, 2, NULL, NULL, &err));
    double bad_inf[] = {1, INFINITY};
    assert_null(metrics_histogram(reg, "h_seconds", "h", bad_inf, 2, NULL, NULL, &err));
    assert_null(metrics_histogram(reg, "h_seconds", "h", bad, 0, NULL, NULL, &err));
    assert_null(metrics_gauge_fn(reg, "g", "h", NULL, NULL, NULL, NULL, &err));

    /* Colons are allowed in metric names, not in label names. */
    assert_non_null(metrics_counter(reg, "ns:ok_total", "h", "a_1", NULL, &err));
    assert_null(metrics_counter(reg, "x_total", "h", "a:b", NULL, &err));

    /* Same name twice (any type) is refused; the first stays usable. */
    metrics_family *c = metrics_counter(reg, "dup_total", "h", NULL, NULL, &err);
    assert_non_null(c);
    assert_null(metrics_gauge(reg, "dup_total", "h", NULL, NULL, &err));
    assert_non_null(strstr(err.msg, "twice"));
    metrics_inc(c, NULL, NULL);
    assert_true(metrics_get(c, NULL, NULL) == 1);

    /* err may be NULL. */
    assert_null(metrics_counter(reg, "-", "h", NULL, NULL, NULL));

    double eb[4];
    assert_int_equal(metrics_exp_buckets(0.5, 2, 4, eb, &err), 0);
    assert_true(eb[0] == 0.5 && eb[1] == 1 && eb[2] == 2 && eb[3] == 4);
    assert_int_equal(metrics_exp_buckets(0, 2, 4, eb, &err), KP_EINVAL);
    assert_int_equal(metrics_exp_buckets(1, 1, 4, eb, &err), KP_EINVAL);
    assert_int_equal(metrics_exp_buckets(1e300, 1e10, 4, eb, &err), KP_ERANGE);

    /* Default latency buckets: 1 ms .. 60 s, increasing. */
    assert_true(metrics_latency_buckets[0] == 0.001);
    assert_true(metrics_latency_buckets[metrics_n_latency_buckets - 1] == 60);
    for (int i = 1; i < metrics_n_latency_buckets; i++)
        assert_true(metrics_latency_buckets[i] > metrics_latency_buckets[i - 1]);

    metrics_free(reg);
    metrics_free(NULL);
}

static void test_counter_gauge_text(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    metrics_family *req = metrics_counter(reg, "kvpark_requests_total",
                                          "Requests by endpoint and status.", "endpoint",
                                          "status", &err);
    metrics_family *tok = metrics_counter(reg, "kvpark_prompt_tokens_total",
                                          "Prompt tokens processed.", NULL, NULL, &err);
    metrics_family *run = metrics_gauge(reg, "kvpark_requests_running",
                                        "Requests being decoded.", NULL, NULL, &err);
    assert_non_null(req);
    assert_non_null(tok);
    assert_non_null(run);

    metrics_inc(req, "completions", "200");
    metrics_inc(req, "chat_completions", "200");
    metrics_inc(req, "chat_completions", "200");
    metrics_inc(req, "chat_completions", "400");
    metrics_add(req, -5, "chat_completions", "400"); /* negative: dropped */
    metrics_add(req, NAN, "chat_completions", "400"); /* NaN: dropped */
    metrics_set(req, 99, "chat_completions", "400");  /* wrong type: dropped */
    metrics_observe(req, 1, "chat_completions", "400");
    metrics_add(tok, 412, NULL, NULL);
    metrics_add(tok, 0.5, NULL, NULL);
    metrics_inc(run, NULL, NULL);
    metrics_inc(run, NULL, NULL);
    metrics_dec(run, NULL, NULL);
    metrics_add(run, -3, NULL, NULL);

    assert_true(metrics_get(req, "chat_completions", "200") == 2);
    assert_true(isnan(metrics_get(req, "embeddings", "200")));

    char *text = metrics_render(reg);
    assert_non_null(text);
    const char *expected =
        "# HELP kvpark_prompt_tokens_total Prompt tokens processed.\n"
        "# TYPE kvpark_prompt_tokens_total counter\n"
        "kvpark_prompt_tokens_total 412.5\n"
        "# HELP kvpark_requests_running Requests being decoded.\n"
        "# TYPE kvpark_requests_running gauge\n"
        "kvpark_requests_running -2\n"
        "# HELP kvpark_requests_total Requests by endpoint and status.\n"
        "# TYPE kvpark_requests_total counter\n"
        "kvpark_requests_total{endpoint=\"chat_completions\",status=\"200\"} 2\n"
        "kvpark_requests_total{endpoint=\"chat_completions\",status=\"400\"} 1\n"
        "kvpark_requests_total{endpoint=\"completions\",status=\"200\"} 1\n";
    assert_string_equal(text, expected);

    /* Rendering twice gives the same text. */
    char *again = metrics_render(reg);
    assert_string_equal(text, again);
    free(again);
    free(text);

    /* An empty registry renders as an empty string. */
    metrics_registry *empty = metrics_new();
    char *e = metrics_render(empty);
    assert_non_null(e);
    assert_string_equal(e, "");
    free(e);
    metrics_free(empty);
    metrics_free(reg);
}

static void test_histogram_text(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    double bounds[] = {0.1, 0.5, 1, 2.5};
    metrics_family *h = metrics_histogram(reg, "kvpark_session_restore_seconds",
                                          "Time to restore a parked session.", bounds, 4,
                                          "tier", NULL, &err);
    assert_non_null(h);
    /* ssd: 0.05, 0.1 (le is inclusive), 0.3, 1, 2, 7, 100 */
    double ssd[] = {0.05, 0.1, 0.3, 1, 2, 7, 100};
    for (size_t i = 0; i < KP_ARRAY_LEN(ssd); i++) metrics_observe(h, ssd[i], "ssd", NULL);
    metrics_observe(h, 0.25, "ram", NULL);
    metrics_observe(h, 0.25, "ram", NULL);
    metrics_observe(h, NAN, "ram", NULL); /* dropped */
    metrics_observe(h, -1, "ram", NULL);  /* counts in the first bucket */

    uint64_t count = 0;
    double sum = 0;
    assert_int_equal(metrics_histogram_get(h, "ssd", NULL, &count, &sum), 0);
    assert_int_equal(count, 7);
    assert_true(sum == 0.05 + 0.1 + 0.3 + 1 + 2 + 7 + 100);
    assert_int_equal(metrics_histogram_get(h, "gpu", NULL, &count, &sum), KP_ENOTFOUND);

    char *text = metrics_render(reg);
    assert_non_null(text);
    const char *expected =
        "# HELP kvpark_session_restore_seconds Time to restore a parked session.\n"
        "# TYPE kvpark_session_restore_seconds histogram\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ram\",le=\"0.1\"} 1\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ram\",le=\"0.5\"} 3\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ram\",le=\"1\"} 3\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ram\",le=\"2.5\"} 3\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ram\",le=\"+Inf\"} 3\n"
        "kvpark_session_restore_seconds_sum{tier=\"ram\"} -0.5\n"
        "kvpark_session_restore_seconds_count{tier=\"ram\"} 3\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ssd\",le=\"0.1\"} 2\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ssd\",le=\"0.5\"} 3\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ssd\",le=\"1\"} 4\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ssd\",le=\"2.5\"} 5\n"
        "kvpark_session_restore_seconds_bucket{tier=\"ssd\",le=\"+Inf\"} 7\n"
        "kvpark_session_restore_seconds_sum{tier=\"ssd\"} 110.45\n"
        "kvpark_session_restore_seconds_count{tier=\"ssd\"} 7\n";
    assert_string_equal(text, expected);
    free(text);

    /* Unlabelled histogram with default buckets: present (all zero) before
     * any observation, one le per default bound plus +Inf. */
    metrics_family *d = metrics_histogram(reg, "kvpark_request_duration_seconds",
                                          "End-to-end request time.", NULL, 0, NULL, NULL,
                                          &err);
    assert_non_null(d);
    text = metrics_render(reg);
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"0.001\"} 0");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"0.0025\"} 0");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"60\"} 0");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"+Inf\"} 0");
    assert_has_line(text, "kvpark_request_duration_seconds_sum 0");
    assert_has_line(text, "kvpark_request_duration_seconds_count 0");
    int n_le = 0;
    for (const char *p = text; (p = strstr(p, "kvpark_request_duration_seconds_bucket")); p++)
        n_le++;
    assert_int_equal(n_le, metrics_n_latency_buckets + 1);
    free(text);
    metrics_observe(d, 0.0025, NULL, NULL);
    metrics_observe(d, 61, NULL, NULL);
    text = metrics_render(reg);
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"0.001\"} 0");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"0.0025\"} 1");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"60\"} 1");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"+Inf\"} 2");
    assert_has_line(text, "kvpark_request_duration_seconds_sum 61.0025");
    assert_has_line(text, "kvpark_request_duration_seconds_count 2");
    free(text);
    metrics_free(reg);
}

static void test_escaping(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    metrics_family *g = metrics_gauge(reg, "kvpark_kv_bytes", "KV bytes per tier.\nSecond \\ line.",
                                      "tier", NULL, &err);
    assert_non_null(g);
    metrics_set(g, 1.5e9, "a\"b\\c\nd", NULL);
    metrics_set(g, 2, NULL, NULL); /* NULL value reads as "" */
    assert_true(metrics_get(g, "", NULL) == 2);
    char *text = metrics_render(reg);
    assert_has_line(text, "# HELP kvpark_kv_bytes KV bytes per tier.\\nSecond \\\\ line.");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"a\\\"b\\\\c\\nd\"} 1500000000");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"\"} 2");
    /* The empty value sorts first. */
    assert_true(line_pos(text, "kvpark_kv_bytes{tier=\"\"} 2") <
                line_pos(text, "kvpark_kv_bytes{tier=\"a\\\"b\\\\c\\nd\"} 1500000000"));
    free(text);

    metrics_set(g, INFINITY, "inf", NULL);
    metrics_set(g, -INFINITY, "minf", NULL);
    metrics_set(g, NAN, "nan", NULL);
    text = metrics_render(reg);
    assert_has_line(text, "kvpark_kv_bytes{tier=\"inf\"} +Inf");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"minf\"} -Inf");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"nan\"} NaN");
    free(text);
    metrics_free(reg);
}

/* Run `promtool check metrics` on text; returns its exit status, or -1 if
 * promtool is missing. Output (lint problems) goes to *out (malloc'd). */
static int promtool_check(const char *text, char **out) {
    *out = NULL;
    const char *promtool = "/usr/bin/promtool";
    if (access(promtool, X_OK) != 0) return -1;
    char *dir = tu_tmpdir();
    assert_non_null(dir);
    char out_path[512], cmd[1200];
    snprintf(out_path, sizeof(out_path), "%s/promtool.out", dir);
    /* Pipe the text into promtool; its report goes to a file. */
    snprintf(cmd, sizeof(cmd), "%s check metrics > '%s' 2>&1", promtool, out_path);
    FILE *p = popen(cmd, "w");
    assert_non_null(p);
    fputs(text, p);
    int st = pclose(p);
    *out = tu_read_file(out_path, NULL);
    remove(out_path);
    rmdir(dir);
    free(dir);
    assert_true(WIFEXITED(st));
    return WEXITSTATUS(st);
}

typedef struct {
    double ram, ssd;
} tier_counts;

static void collect_sessions(metrics_family *f, void *ctx) {
    const tier_counts *tc = ctx;
    metrics_set(f, tc->ram, "ram", NULL);
    metrics_set(f, tc->ssd, "ssd", NULL);
}

static void test_kvpark_metrics_promtool(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    double tpot_bounds[12];
    assert_int_equal(metrics_exp_buckets(0.0025, 2, 12, tpot_bounds, &err), 0);

    metrics_family *requests = metrics_counter(reg, "kvpark_requests_total",
        "HTTP requests by endpoint and status code.", "endpoint", "status", &err);
    metrics_family *prompt = metrics_counter(reg, "kvpark_prompt_tokens_total",
        "Prompt tokens processed (prefill).", NULL, NULL, &err);
    metrics_family *gen = metrics_counter(reg, "kvpark_generation_tokens_total",
        "Tokens generated.", NULL, NULL, &err);
    metrics_family *hit = metrics_counter(reg, "kvpark_prefix_cache_hit_tokens_total",
        "Prompt tokens served from a cached or parked prefix.", NULL, NULL, &err);
    metrics_family *ttft = metrics_histogram(reg, "kvpark_time_to_first_token_seconds",
        "Time from request arrival to the first generated token.", NULL, 0, NULL, NULL, &err);
    metrics_family *tpot = metrics_histogram(reg, "kvpark_time_per_output_token_seconds",
        "Time per generated token after the first.", tpot_bounds, 12, NULL, NULL, &err);
    metrics_family *dur = metrics_histogram(reg, "kvpark_request_duration_seconds",
        "End-to-end request time.", NULL, 0, NULL, NULL, &err);
    metrics_family *restore = metrics_histogram(reg, "kvpark_session_restore_seconds",
        "Time to bring a parked session back into the GPU/CPU KV cache.", NULL, 0, "tier",
        NULL, &err);
    metrics_family *running = metrics_gauge(reg, "kvpark_requests_running",
        "Requests being decoded.", NULL, NULL, &err);
    metrics_family *waiting = metrics_gauge(reg, "kvpark_requests_waiting",
        "Requests queued for a slot.", NULL, NULL, &err);
    tier_counts tc = {3, 17};
    metrics_family *sessions = metrics_gauge_fn(reg, "kvpark_sessions",
        "Parked sessions per storage tier.", "tier", NULL, collect_sessions, &tc, &err);
    metrics_family *kvb = metrics_gauge(reg, "kvpark_kv_bytes",
        "KV cache bytes per storage tier.", "tier", NULL, &err);
    assert_int_equal(metrics_info(reg, "kvpark_build_info",
        "Build information; the value is always 1.", "version", "0.1.0", "backend", "cpu",
        &err), 0);
    assert_non_null(requests);
    assert_non_null(prompt);
    assert_non_null(gen);
    assert_non_null(hit);
    assert_non_null(ttft);
    assert_non_null(tpot);
    assert_non_null(dur);
    assert_non_null(restore);
    assert_non_null(running);
    assert_non_null(waiting);
    assert_non_null(sessions);
    assert_non_null(kvb);

    /* Before any traffic: valid too (labelled families have HELP/TYPE only). */
    char *text = metrics_render(reg);
    char *out = NULL;
    int rc = promtool_check(text, &out);
    if (rc == -1) {
        free(text);
        metrics_free(reg);
        print_message("SKIP: promtool is missing (/usr/bin/promtool); install prometheus\n");
        skip();
    }
    if (rc != 0 || (out && *out)) print_message("promtool (rc %d):\n%s\n%s", rc, out, text);
    assert_int_equal(rc, 0);
    assert_true(!out || !*out);
    free(out);
    free(text);

    /* Some traffic. */
    metrics_inc(requests, "chat_completions", "200");
    metrics_inc(requests, "chat_completions", "200");
    metrics_inc(requests, "completions", "400");
    metrics_inc(requests, "weird\"end\\point\n", "500");
    metrics_add(prompt, 1000, NULL, NULL);
    metrics_add(gen, 250, NULL, NULL);
    metrics_add(hit, 768, NULL, NULL);
    metrics_observe(ttft, 0.183, NULL, NULL);
    metrics_observe(ttft, 0.021, NULL, NULL);
    for (int i = 0; i < 250; i++) metrics_observe(tpot, 0.004 + 0.0001 * (i % 7), NULL, NULL);
    metrics_observe(dur, 1.7, NULL, NULL);
    metrics_observe(dur, 120, NULL, NULL);
    metrics_observe(restore, 0.012, "ram", NULL);
    metrics_observe(restore, 0.4, "ssd", NULL);
    metrics_inc(running, NULL, NULL);
    metrics_set(waiting, 4, NULL, NULL);
    metrics_set(kvb, 1073741824.0, "gpu", NULL);
    metrics_set(kvb, 5.5e10, "ssd", NULL);

    text = metrics_render(reg);
    rc = promtool_check(text, &out);
    if (rc != 0 || (out && *out)) print_message("promtool (rc %d):\n%s\n%s", rc, out, text);
    assert_int_equal(rc, 0);
    assert_true(!out || !*out);
    free(out);

    assert_has_line(text, "kvpark_build_info{version=\"0.1.0\",backend=\"cpu\"} 1");
    assert_has_line(text, "kvpark_sessions{tier=\"ram\"} 3");
    assert_has_line(text, "kvpark_sessions{tier=\"ssd\"} 17");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"weird\\\"end\\\\point\\n\",status=\"500\"} 1");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"chat_completions\",status=\"200\"} 2");
    assert_has_line(text, "kvpark_prefix_cache_hit_tokens_total 768");
    assert_has_line(text, "kvpark_time_to_first_token_seconds_bucket{le=\"0.025\"} 1");
    assert_has_line(text, "kvpark_time_to_first_token_seconds_bucket{le=\"0.25\"} 2");
    assert_has_line(text, "kvpark_time_to_first_token_seconds_count 2");
    assert_has_line(text, "kvpark_time_to_first_token_seconds_sum 0.204");
    assert_has_line(text, "kvpark_time_per_output_token_seconds_bucket{le=\"0.0025\"} 0");
    assert_has_line(text, "kvpark_time_per_output_token_seconds_bucket{le=\"0.005\"} 250");
    assert_has_line(text, "kvpark_time_per_output_token_seconds_count 250");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"60\"} 1");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"+Inf\"} 2");
    assert_has_line(text, "kvpark_session_restore_seconds_count{tier=\"ssd\"} 1");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"gpu\"} 1073741824");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"ssd\"} 55000000000");
    assert_no_substr(text, "e+");
    /* Families in name order. */
    assert_true(line_pos(text, "# TYPE kvpark_build_info gauge") <
                line_pos(text, "# TYPE kvpark_generation_tokens_total counter"));
    assert_true(line_pos(text, "# TYPE kvpark_requests_running gauge") <
                line_pos(text, "# TYPE kvpark_requests_total counter"));
    free(text);

    /* The callback runs at each render. */
    tc.ram = 0;
    tc.ssd = 20;
    text = metrics_render(reg);
    assert_has_line(text, "kvpark_sessions{tier=\"ram\"} 0");
    assert_has_line(text, "kvpark_sessions{tier=\"ssd\"} 20");
    free(text);

    /* promtool must actually catch errors (so the checks above mean something). */
    rc = promtool_check("# TYPE x counter\nx{a=\"1\"} 1\nx{a=\"1\"} 2\nbad line\n", &out);
    assert_int_not_equal(rc, 0);
    free(out);
    metrics_free(reg);
}

/* ---- declared series: present at 0 before the first update ---- */

static void noop_collect(metrics_family *f, void *ctx) {
    (void)f;
    (void)ctx;
}

/* The labelled families the server registers (server/http.c setup_metrics):
 * names and label names, so each tuple of metrics_kvpark_series finds its
 * family and the test knows how its lines read. */
typedef struct {
    const char *name, *label0, *label1;
    metrics_type type;
} family_shape;

static const family_shape server_families[] = {
    {"kvpark_requests_total", "endpoint", "status", METRICS_COUNTER},
    {"kvpark_session_events_total", "event", "tier", METRICS_COUNTER},
    {"kvpark_session_restore_seconds", "tier", NULL, METRICS_HISTOGRAM},
    {"kvpark_sessions", "tier", NULL, METRICS_GAUGE},
    {"kvpark_kv_bytes", "tier", NULL, METRICS_GAUGE},
    {"kvpark_store_events", "event", NULL, METRICS_GAUGE},
};

static const family_shape *shape_of(const char *name) {
    for (size_t i = 0; i < KP_ARRAY_LEN(server_families); i++)
        if (!strcmp(server_families[i].name, name)) return &server_families[i];
    print_message("metrics_kvpark_series names '%s', which the server does not register\n", name);
    fail();
    return NULL;
}

static metrics_family *register_like_server(metrics_registry *reg) {
    kp_err err = {0};
    metrics_family *requests = NULL;
    for (size_t i = 0; i < KP_ARRAY_LEN(server_families); i++) {
        const family_shape *fs = &server_families[i];
        metrics_family *f =
            fs->type == METRICS_HISTOGRAM
                ? metrics_histogram(reg, fs->name, "h", NULL, 0, fs->label0, fs->label1, &err)
            : fs->type == METRICS_COUNTER ? metrics_counter(reg, fs->name, "h", fs->label0, fs->label1, &err)
                                          : metrics_gauge_fn(reg, fs->name, "h", fs->label0, fs->label1,
                                                             noop_collect, NULL, &err);
        assert_non_null(f);
        if (i == 0) requests = f;
    }
    return requests;
}

static void test_declared_series(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    metrics_family *requests = register_like_server(reg);

    /* Before declaring: labelled families have no samples (what Prometheus
     * saw before the fix: no series until the first increment). */
    char *text = metrics_render(reg);
    assert_no_substr(text, "kvpark_requests_total{");
    free(text);

    /* A child updated before the declaration keeps its value. */
    metrics_inc(requests, "chat_completions", "500");
    assert_int_equal(metrics_declare_sets(reg, metrics_kvpark_series, metrics_n_kvpark_series, &err), 0);
    /* Declaring twice changes nothing. */
    assert_int_equal(metrics_declare_sets(reg, metrics_kvpark_series, metrics_n_kvpark_series, &err), 0);
    text = metrics_render(reg);
    assert_has_line(text, "kvpark_requests_total{endpoint=\"chat_completions\",status=\"500\"} 1");
    /* The series a user looks for first. */
    assert_has_line(text, "kvpark_requests_total{endpoint=\"chat_completions\",status=\"200\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"chat_completions\",status=\"400\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"completions\",status=\"429\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"sessions\",status=\"404\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"health\",status=\"200\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"other\",status=\"404\"} 0");
    assert_has_line(text, "kvpark_session_events_total{event=\"park\",tier=\"warm\"} 0");
    assert_has_line(text, "kvpark_session_events_total{event=\"restore\",tier=\"cold\"} 0");
    assert_has_line(text, "kvpark_session_events_total{event=\"save\",tier=\"cold\"} 0");
    assert_has_line(text, "kvpark_session_events_total{event=\"expire\",tier=\"hot\"} 0");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"sessions\",status=\"507\"} 0");
    assert_has_line(text, "kvpark_session_restore_seconds_bucket{tier=\"warm\",le=\"+Inf\"} 0");
    assert_has_line(text, "kvpark_session_restore_seconds_count{tier=\"cold\"} 0");
    assert_has_line(text, "kvpark_sessions{tier=\"hot\"} 0");
    assert_has_line(text, "kvpark_kv_bytes{tier=\"cold\"} 0");
    assert_has_line(text, "kvpark_store_events{event=\"dropped\"} 0");
    /* Per route, not one product of every route and every status. */
    assert_no_substr(text, "endpoint=\"metrics\",status=\"503\"");

    /* Every tuple of the table renders at 0 (the 500 above aside). */
    int n_lines = 0;
    for (int i = 0; i < metrics_n_kvpark_series; i++) {
        const metrics_series_set *ss = &metrics_kvpark_series[i];
        const family_shape *fs = shape_of(ss->family);
        assert_non_null(ss->l0);
        assert_true((ss->l1 != NULL) == (fs->label1 != NULL));
        for (int a = 0; ss->l0[a]; a++) {
            for (int b = 0; b == 0 || (ss->l1 && ss->l1[b]); b++) {
                char line[400];
                if (fs->label1 && !strcmp(ss->l0[a], "chat_completions") && !strcmp(ss->l1[b], "500"))
                    continue;
                if (fs->label1)
                    snprintf(line, sizeof line, "%s{%s=\"%s\",%s=\"%s\"} 0", fs->name, fs->label0, ss->l0[a],
                             fs->label1, ss->l1[b]);
                else
                    snprintf(line, sizeof line, "%s%s{%s=\"%s\"} 0", fs->name,
                             fs->type == METRICS_HISTOGRAM ? "_count" : "", fs->label0, ss->l0[a]);
                assert_has_line(text, line);
                n_lines++;
            }
        }
    }
    assert_true(n_lines >= 60);

    /* promtool accepts it (each declared child is a complete series). */
    char *out = NULL;
    int rc = promtool_check(text, &out);
    if (rc != -1) {
        if (rc != 0 || (out && *out)) print_message("promtool (rc %d):\n%s\n%s", rc, out, text);
        assert_int_equal(rc, 0);
    }
    free(out);
    free(text);

    /* A table naming a family nobody registered is an error naming it. */
    static const char *const vals[] = {"x", NULL};
    const metrics_series_set bad[] = {{"kvpark_renamed_total", vals, NULL}};
    assert_int_equal(metrics_declare_sets(reg, bad, 1, &err), KP_ENOTFOUND);
    assert_non_null(strstr(err.msg, "kvpark_renamed_total"));
    assert_int_equal(metrics_declare(NULL, "a", "b"), KP_EINVAL);
    metrics_free(reg);
}

/* ---- concurrency: 4 threads x 100k increments on shared families ---- */

#define N_THREADS 4
#define N_INCS 100000

typedef struct {
    metrics_family *counter, *hist, *gauge;
    metrics_registry *reg;
    int id;
} worker_arg;

static void *worker(void *p) {
    worker_arg *a = p;
    static const char *statuses[] = {"200", "400", "500"};
    for (int i = 0; i < N_INCS; i++) {
        metrics_inc(a->counter, "chat_completions", statuses[i % 3]);
        metrics_observe(a->hist, (i % 2) ? 0.002 : 5.0, NULL, NULL);
        metrics_add(a->gauge, (a->id % 2) ? 1 : -1, NULL, NULL);
        if (a->id == 0 && i % 20000 == 0) free(metrics_render(a->reg)); /* render meanwhile */
    }
    return NULL;
}

static void test_concurrency(void **state) {
    (void)state;
    metrics_registry *reg = metrics_new();
    kp_err err = {0};
    metrics_family *c = metrics_counter(reg, "kvpark_requests_total", "h", "endpoint", "status",
                                        &err);
    metrics_family *h = metrics_histogram(reg, "kvpark_request_duration_seconds", "h", NULL, 0,
                                          NULL, NULL, &err);
    metrics_family *g = metrics_gauge(reg, "kvpark_requests_waiting", "h", NULL, NULL, &err);
    assert_non_null(c);
    assert_non_null(h);
    assert_non_null(g);
    pthread_t th[N_THREADS];
    worker_arg args[N_THREADS];
    for (int t = 0; t < N_THREADS; t++) {
        args[t] = (worker_arg){c, h, g, reg, t};
        assert_int_equal(pthread_create(&th[t], NULL, worker, &args[t]), 0);
    }
    for (int t = 0; t < N_THREADS; t++) pthread_join(th[t], NULL);

    double total = metrics_get(c, "chat_completions", "200") +
                   metrics_get(c, "chat_completions", "400") +
                   metrics_get(c, "chat_completions", "500");
    assert_true(total == (double)N_THREADS * N_INCS);
    assert_true(metrics_get(c, "chat_completions", "200") == N_THREADS * 33334.0);
    assert_true(metrics_get(g, NULL, NULL) == 0);
    uint64_t count = 0;
    double sum = 0;
    assert_int_equal(metrics_histogram_get(h, NULL, NULL, &count, &sum), 0);
    assert_int_equal(count, (uint64_t)N_THREADS * N_INCS);

    char *text = metrics_render(reg);
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"0.0025\"} 200000");
    assert_has_line(text, "kvpark_request_duration_seconds_bucket{le=\"5\"} 400000");
    assert_has_line(text, "kvpark_request_duration_seconds_count 400000");
    assert_has_line(text, "kvpark_requests_total{endpoint=\"chat_completions\",status=\"500\"} 133332");
    free(text);
    metrics_free(reg);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_format_double),
        cmocka_unit_test(test_registration_errors),
        cmocka_unit_test(test_counter_gauge_text),
        cmocka_unit_test(test_histogram_text),
        cmocka_unit_test(test_escaping),
        cmocka_unit_test(test_kvpark_metrics_promtool),
        cmocka_unit_test(test_declared_series),
        cmocka_unit_test(test_concurrency),
    };
    return cmocka_run_group_tests_name("metrics", tests, NULL, NULL);
}
