/*
 * test_sample.c — the sampler: parameter checks, greedy (ties, NaN, inf),
 * the documented RNG (known answers computed independently in Python), seed
 * determinism, the sampled distribution against softmax(logits/T) (a fixed
 * seed chi-square), top-k / top-p / min-p supports against brute-force
 * references, each penalty against hand-computed values, state save/load
 * (exact continuation, every corrupted byte refused), log-softmax, and the
 * 128K-vocabulary paths (drawn tokens inside their support; time printed).
 */
#include "tests/testutil.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/sample.h"

/* A parameter set with every filter off: plain softmax(logits / T). */
static sample_params raw_params(float temp, uint64_t seed) {
    sample_params p = sample_default_params();
    p.temperature = temp;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.seed = seed;
    return p;
}

static sampler *new_sampler(const sample_params *p, int32_t n_vocab) {
    sampler *s = NULL;
    kp_err err = {0};
    int rc = sample_new(&s, p, n_vocab, &err);
    if (rc != 0) fail_msg("sample_new: %s", err.msg);
    return s;
}

/* Brute-force greedy reference: lowest id of the largest non-NaN logit. */
static int32_t ref_argmax(const float *x, int32_t n) {
    int32_t best = -1;
    for (int32_t i = 0; i < n; i++)
        if (!isnan(x[i]) && (best < 0 || x[i] > x[best])) best = i;
    return best < 0 ? 0 : best;
}

/* Random logits rounded to a coarse grid so many values tie. */
static void tie_logits(float *x, int32_t n, uint64_t *rs) {
    tu_rand_floats(x, (size_t)n, 4.0f, rs);
    for (int32_t i = 0; i < n; i++) x[i] = roundf(x[i] * 2.0f) / 2.0f;
}

/* ------------------------------------------------------------- params --- */

static void test_params(void **state) {
    (void)state;
    sample_params d = sample_default_params();
    assert_true(d.temperature == 0.8f && d.top_k == 40 && d.top_p == 0.95f &&
                d.min_p == 0.05f && d.repeat_penalty == 1.0f && d.frequency_penalty == 0.0f &&
                d.presence_penalty == 0.0f && d.penalty_last_n == 64);
    assert_true(d.seed == SAMPLE_SEED_RANDOM);
    assert_int_equal(sample_check_params(&d, NULL), 0);

    struct {
        float *field;
        float bad, good;
        const char *name;
    } cases[] = {
        {&d.temperature, -0.1f, 0.0f, "temperature"},
        {&d.temperature, 2.01f, 2.0f, "temperature"},
        {&d.temperature, NAN, 1.0f, "temperature"},
        {&d.top_p, 0.0f, 1.0f, "top_p"},
        {&d.top_p, 1.01f, 0.01f, "top_p"},
        {&d.top_p, NAN, 0.5f, "top_p"},
        {&d.min_p, -0.01f, 0.0f, "min_p"},
        {&d.min_p, 1.5f, 1.0f, "min_p"},
        {&d.min_p, NAN, 0.1f, "min_p"},
        {&d.repeat_penalty, 0.0f, 1.1f, "repeat_penalty"},
        {&d.repeat_penalty, NAN, 1.0f, "repeat_penalty"},
        {&d.repeat_penalty, INFINITY, 10.0f, "repeat_penalty"},
        {&d.frequency_penalty, -2.5f, -2.0f, "frequency_penalty"},
        {&d.frequency_penalty, 2.5f, 2.0f, "frequency_penalty"},
        {&d.frequency_penalty, NAN, 0.0f, "frequency_penalty"},
        {&d.presence_penalty, 2.1f, 2.0f, "presence_penalty"},
        {&d.presence_penalty, NAN, -2.0f, "presence_penalty"},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(cases); i++) {
        sample_params keep = d;
        *cases[i].field = cases[i].bad;
        kp_err err = {0};
        assert_int_equal(sample_check_params(&d, &err), KP_EINVAL);
        if (!strstr(err.msg, cases[i].name))
            fail_msg("message for bad %s does not name it: %s", cases[i].name, err.msg);
        sampler *s = (sampler *)0x1;
        assert_int_equal(sample_new(&s, &d, 100, NULL), KP_EINVAL);
        assert_null(s);
        *cases[i].field = cases[i].good;
        assert_int_equal(sample_check_params(&d, NULL), 0);
        d = keep;
    }
    kp_err err = {0};
    d.temperature = 3.0f;
    sample_check_params(&d, &err);
    assert_non_null(strstr(err.msg, "temperature must be between 0 and 2"));
    d = sample_default_params();
    d.penalty_last_n = -2;
    assert_int_equal(sample_check_params(&d, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "penalty_last_n"));
    d.penalty_last_n = -1;
    assert_int_equal(sample_check_params(&d, NULL), 0);
    sampler *s = NULL;
    assert_int_equal(sample_new(&s, &d, 0, NULL), KP_EINVAL);
    assert_int_equal(sample_check_params(NULL, NULL), KP_EINVAL);
}

/* ------------------------------------------------------------- greedy --- */

static void test_greedy(void **state) {
    (void)state;
    enum { N = 1000 };
    float x[N];
    uint64_t rs = 12345;
    sample_params p = raw_params(0.0f, 1);
    p.top_k = 40; /* filters do not matter for greedy */
    sampler *s = new_sampler(&p, N);
    int ties_seen = 0;
    for (int t = 0; t < 200; t++) {
        tie_logits(x, N, &rs);
        if (t % 3 == 0) x[(t * 37) % N] = NAN;
        int32_t want = ref_argmax(x, N), n_max = 0;
        for (int i = 0; i < N; i++) n_max += x[i] == x[want];
        ties_seen += n_max > 1;
        assert_int_equal(sample_next(s, x), want);
    }
    assert_true(ties_seen > 100); /* the test really exercised ties */

    /* hand-made ties and degenerate vectors */
    float a[5] = {1.0f, 3.0f, -2.0f, 3.0f, 3.0f};
    sampler *s5 = new_sampler(&p, 5);
    assert_int_equal(sample_next(s5, a), 1);
    float b[5] = {NAN, 2.0f, NAN, 2.0f, 1.0f};
    assert_int_equal(sample_next(s5, b), 1);
    float c[5] = {NAN, NAN, NAN, NAN, NAN};
    assert_int_equal(sample_next(s5, c), 0);
    float d[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    assert_int_equal(sample_next(s5, d), 0);
    float e[5] = {NAN, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    assert_int_equal(sample_next(s5, e), 1);
    float f[5] = {1e30f, 2.0f, INFINITY, NAN, INFINITY};
    assert_int_equal(sample_next(s5, f), 2);
    /* the input is not modified */
    float g[5] = {1.0f, 2.0f, 3.0f, 4.0f, 5.0f}, g0[5];
    memcpy(g0, g, sizeof g);
    assert_int_equal(sample_next(s5, g), 4);
    assert_memory_equal(g, g0, sizeof g);
    sample_free(s5);
    sample_free(s);
}

/* The same degenerate vectors when sampling (temperature > 0). */
static void test_degenerate_sampling(void **state) {
    (void)state;
    for (int topk = 0; topk <= 3; topk += 3) {
        sample_params p = raw_params(1.0f, 5);
        p.top_k = topk;
        p.top_p = 0.9f;
        p.min_p = 0.1f;
        sampler *s = new_sampler(&p, 5);
        float c[5] = {NAN, NAN, NAN, NAN, NAN};
        float d[5] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
        float e[5] = {NAN, NAN, -INFINITY, -INFINITY, -INFINITY};
        float f[5] = {1e30f, INFINITY, 2.0f, NAN, INFINITY};
        float g[5] = {NAN, 0.0f, NAN, NAN, NAN};
        int hits[5] = {0};
        for (int i = 0; i < 400; i++) {
            assert_int_equal(sample_next(s, c), 0);
            assert_int_equal(sample_next(s, d), 0);
            assert_int_equal(sample_next(s, e), 2);
            assert_int_equal(sample_next(s, g), 1);
            int32_t t = sample_next(s, f);
            assert_true(t == 1 || t == 4);
            hits[t]++;
        }
        if (topk == 0) assert_true(hits[1] > 100 && hits[4] > 100); /* +inf share */
        sample_free(s);
    }
}

/* ---------------------------------------------------------------- RNG --- */

/* With n equal logits and no filters the draw is floor(u * n), so the ids
 * reveal the RNG's uniforms. Expected values from an independent Python
 * implementation of splitmix64 -> xoshiro256**, u = (next >> 11) * 2^-53. */
static void test_rng_known_answer(void **state) {
    (void)state;
    static const int32_t want42[12] = {83, 378, 680, 924, 991, 769, 719, 850, 761, 583, 682, 290};
    static const int32_t want0[12] = {601, 747, 103, 416, 732, 999, 422, 535, 855, 918, 114, 67};
    float x[1000];
    for (int i = 0; i < 1000; i++) x[i] = 0.25f;
    sample_params p = raw_params(1.0f, 42);
    sampler *s = new_sampler(&p, 1000);
    for (int i = 0; i < 12; i++) assert_int_equal(sample_next(s, x), want42[i]);
    sample_reset(s); /* re-seeds: the same sequence again */
    for (int i = 0; i < 12; i++) assert_int_equal(sample_next(s, x), want42[i]);
    assert_true(sample_seed(s) == 42);
    sample_free(s);
    p.seed = 0;
    s = new_sampler(&p, 1000);
    for (int i = 0; i < 12; i++) assert_int_equal(sample_next(s, x), want0[i]);
    sample_free(s);
}

static void draw_seq(uint64_t seed, int32_t *out, int n) {
    enum { V = 300 };
    float x[V];
    uint64_t rs = 777;
    sample_params p = sample_default_params(); /* the whole default chain */
    p.seed = seed;
    p.repeat_penalty = 1.1f;
    sampler *s = new_sampler(&p, V);
    for (int i = 0; i < n; i++) {
        tu_rand_floats(x, V, 2.0f, &rs);
        out[i] = sample_next(s, x);
        sample_accept(s, out[i]);
    }
    sample_free(s);
}

static void test_seed_determinism(void **state) {
    (void)state;
    enum { N = 1000 };
    int32_t *a = malloc(N * sizeof *a), *b = malloc(N * sizeof *b), *c = malloc(N * sizeof *c);
    draw_seq(1234, a, N);
    draw_seq(1234, b, N);
    draw_seq(1235, c, N);
    assert_memory_equal(a, b, N * sizeof *a);
    int same = 0;
    for (int i = 0; i < N; i++) same += a[i] == c[i];
    assert_true(same < N / 2); /* different seed, mostly different ids */

    /* SAMPLE_SEED_RANDOM: two samplers draw different seeds; the resolved
     * seed reproduces the run. */
    sample_params p = raw_params(1.0f, SAMPLE_SEED_RANDOM);
    sampler *r1 = new_sampler(&p, 10), *r2 = new_sampler(&p, 10);
    assert_true(sample_seed(r1) != sample_seed(r2));
    assert_true(sample_seed(r1) != SAMPLE_SEED_RANDOM);
    p.seed = sample_seed(r1);
    sampler *r3 = new_sampler(&p, 10);
    float x[10] = {0, 0.1f, 0.2f, 0.3f, 0.4f, 0.5f, 0.6f, 0.7f, 0.8f, 0.9f};
    for (int i = 0; i < 100; i++) assert_int_equal(sample_next(r1, x), sample_next(r3, x));
    sample_free(r1);
    sample_free(r2);
    sample_free(r3);
    free(a);
    free(b);
    free(c);
}

/* ------------------------------------------------------- distribution --- */

/* Pearson chi-square of counts against probabilities. */
static double chi2(const int *count, const double *prob, int k, int n) {
    double c = 0;
    for (int i = 0; i < k; i++) {
        double e = prob[i] * n;
        c += (count[i] - e) * (count[i] - e) / e;
    }
    return c;
}

static void softmax_ref(const float *x, int k, double temp, double *p) {
    double m = -INFINITY, sum = 0;
    for (int i = 0; i < k; i++) m = fmax(m, x[i]);
    for (int i = 0; i < k; i++) sum += (p[i] = exp((x[i] - m) / temp));
    for (int i = 0; i < k; i++) p[i] /= sum;
}

static void test_distribution(void **state) {
    (void)state;
    enum { K = 8, N = 40000 };
    const float x[K] = {1.0f, 0.2f, -0.5f, 1.3f, 0.0f, -1.0f, 0.7f, 0.4f};
    const float temps[] = {0.7f, 1.0f, 1.6f};
    /* chi-square, 7 degrees of freedom: P(X > 24.32) = 0.001 */
    const double crit = 24.32;
    for (size_t ti = 0; ti < KP_ARRAY_LEN(temps); ti++) {
        sample_params p = raw_params(temps[ti], 2024 + ti);
        sampler *s = new_sampler(&p, K);
        int count[K] = {0};
        for (int i = 0; i < N; i++) count[sample_next(s, x)]++;
        double want[K], other[K];
        softmax_ref(x, K, temps[ti], want);
        double c = chi2(count, want, K, N);
        print_message("T=%.1f chi2=%.2f (critical %.2f)\n", (double)temps[ti], c, crit);
        assert_true(c < crit);
        /* the test has power: a 25% wrong temperature is rejected */
        softmax_ref(x, K, temps[ti] * 1.25, other);
        double c_wrong = chi2(count, other, K, N);
        print_message("      chi2 against T*1.25: %.1f\n", c_wrong);
        assert_true(c_wrong > 4 * crit);
        sample_free(s);
    }
}

/* Draw n ids; return how often each id was drawn (count[V]). */
static void draw_counts(const sample_params *p, const float *x, int32_t V, int n, int *count) {
    sampler *s = new_sampler(p, V);
    memset(count, 0, (size_t)V * sizeof *count);
    for (int i = 0; i < n; i++) {
        int32_t t = sample_next(s, x);
        assert_true(t >= 0 && t < V);
        count[t]++;
    }
    sample_free(s);
}

static void test_top_k(void **state) {
    (void)state;
    enum { V = 2000 };
    float x[V];
    uint64_t rs = 99;
    /* top_k = 1 is greedy, whatever the temperature and ties */
    sample_params p = raw_params(1.5f, 3);
    p.top_k = 1;
    sampler *s = new_sampler(&p, V);
    for (int t = 0; t < 200; t++) {
        tie_logits(x, V, &rs);
        if (t % 2) x[(t * 13) % V] = NAN;
        assert_int_equal(sample_next(s, x), ref_argmax(x, V));
    }
    sample_free(s);

    /* top_k = 5 with ties at the boundary: ids 10, 20 (4.0), 30 (3.5) and the
     * lowest two of the 3.0 ties (40, 50; not 60, 70) */
    for (int i = 0; i < V; i++) x[i] = -1.0f;
    x[10] = 4.0f, x[20] = 4.0f, x[30] = 3.5f;
    x[40] = 3.0f, x[50] = 3.0f, x[60] = 3.0f, x[70] = 3.0f;
    x[5] = NAN;
    p.top_k = 5;
    p.temperature = 2.0f;
    int count[V];
    draw_counts(&p, x, V, 5000, count);
    for (int i = 0; i < V; i++) {
        int in = i == 10 || i == 20 || i == 30 || i == 40 || i == 50;
        if (in != (count[i] > 0)) fail_msg("top_k=5: id %d drawn %d times", i, count[i]);
    }
    /* within the kept set the probabilities are softmax(x/T) renormalised */
    const float kx[5] = {4.0f, 4.0f, 3.5f, 3.0f, 3.0f};
    const int kid[5] = {10, 20, 30, 40, 50};
    double want[5];
    int kc[5];
    softmax_ref(kx, 5, 2.0, want);
    for (int i = 0; i < 5; i++) kc[i] = count[kid[i]];
    assert_true(chi2(kc, want, 5, 5000) < 18.47); /* df 4, p = 0.001 */
}

/* Reference top-p: sort by (logit desc, id asc), keep the smallest prefix
 * whose softmax mass reaches p. Marks keep[id]. */
static void ref_top_p(const float *x, int32_t V, double top_p, char *keep) {
    int32_t *idx = malloc((size_t)V * sizeof *idx);
    for (int32_t i = 0; i < V; i++) idx[i] = i;
    for (int32_t i = 1; i < V; i++) { /* insertion sort, V is small */
        int32_t v = idx[i], j = i;
        while (j > 0 && (x[idx[j - 1]] < x[v] || (x[idx[j - 1]] == x[v] && idx[j - 1] > v))) {
            idx[j] = idx[j - 1];
            j--;
        }
        idx[j] = v;
    }
    double m = x[idx[0]], total = 0, cum = 0;
    for (int32_t i = 0; i < V; i++) total += exp(x[i] - m);
    memset(keep, 0, (size_t)V);
    for (int32_t i = 0; i < V; i++) {
        keep[idx[i]] = 1;
        cum += exp(x[idx[i]] - m);
        if (cum >= top_p * total) break;
    }
    free(idx);
}

static void test_top_p(void **state) {
    (void)state;
    /* Known answer: probabilities 0.5, 0.3, 0.15, 0.05 at scattered ids. */
    enum { V4 = 4 };
    const float x4[V4] = {logf(0.15f), logf(0.5f), logf(0.05f), logf(0.3f)};
    int c4[V4];
    sample_params p = raw_params(1.0f, 11);
    p.top_p = 0.75f; /* 0.5 < 0.75 <= 0.8: keeps {id1, id3} */
    draw_counts(&p, x4, V4, 8000, c4);
    assert_int_equal(c4[0], 0);
    assert_int_equal(c4[2], 0);
    /* 0.5 : 0.3 renormalised to 0.625 : 0.375 */
    int kc[2] = {c4[1], c4[3]};
    double want[2] = {0.625, 0.375};
    assert_true(chi2(kc, want, 2, 8000) < 10.83);
    p.top_p = 0.45f; /* only the top token */
    draw_counts(&p, x4, V4, 500, c4);
    assert_int_equal(c4[1], 500);
    p.top_p = 0.9f; /* 0.95 needed for all four: keeps three */
    draw_counts(&p, x4, V4, 4000, c4);
    assert_true(c4[0] > 0 && c4[1] > 0 && c4[3] > 0 && c4[2] == 0);
    /* exactly at the boundary: 4 equal logits, mass 0.5 is reached (>=)
     * after two tokens, the lowest ids */
    const float eq[V4] = {1.0f, 1.0f, 1.0f, 1.0f};
    p.top_p = 0.5f;
    draw_counts(&p, eq, V4, 2000, c4);
    assert_true(c4[0] > 0 && c4[1] > 0 && c4[2] == 0 && c4[3] == 0);
    p.top_p = 0.9f;
    p.top_k = 2; /* top-k first: 0.9 of {0.5, 0.3} renormalised -> both */
    draw_counts(&p, x4, V4, 2000, c4);
    assert_true(c4[1] > 0 && c4[3] > 0 && c4[0] == 0 && c4[2] == 0);

    /* A big vocabulary where the kept set is hundreds of tokens, so the
     * lazily sorted head must grow past its first chunks; 200 tied tokens
     * at scattered ids, the rest 3 nats lower. Kept: the 145 lowest of the
     * tied ids (ties go to the lower id). */
    enum { V = 2000 };
    float *x = malloc(V * sizeof *x);
    char *keep = malloc(V);
    int *count = malloc(V * sizeof *count);
    for (int i = 0; i < V; i++) x[i] = -3.0f;
    for (int i = 0; i < 200; i++) x[(i * 17 + 3) % V] = 0.0f;
    x[V - 1] = NAN;
    ref_top_p(x, V - 1, 0.5, keep); /* the reference sees no NaN */
    keep[V - 1] = 0;
    int n_keep = 0;
    for (int i = 0; i < V; i++) n_keep += keep[i];
    assert_int_equal(n_keep, 145); /* 0.5 * (200 + 1799 e^-3) = 144.8 */
    p = raw_params(2.0f, 21);
    p.top_p = 0.5f;
    /* top_k 0: the lazily sorted path; top_k V-1 (every non-NaN logit): the
     * heap path with the same answer (top-p renormalises over top-k's set,
     * so a smaller k would keep fewer) */
    for (int topk = 0; topk <= V - 1; topk += V - 1) {
        p.top_k = topk;
        draw_counts(&p, x, V, 8000, count);
        for (int i = 0; i < V; i++)
            if (keep[i] != (count[i] > 0))
                fail_msg("top_p (top_k %d): id %d keep=%d drawn %d", topk, i, keep[i],
                         count[i]);
    }
    /* random logits: the support matches the reference exactly */
    uint64_t rs = 4242;
    tu_rand_floats(x, V, 3.0f, &rs);
    for (int i = 0; i < V; i++) x[i] = x[i] * 2.0f; /* a peaked distribution */
    ref_top_p(x, V, 0.6, keep);
    n_keep = 0;
    for (int i = 0; i < V; i++) n_keep += keep[i];
    p.top_k = 0;
    p.top_p = 0.6f;
    p.temperature = 2.0f; /* a high temperature hits every kept token */
    draw_counts(&p, x, V, 12000, count);
    int n_drawn = 0, outside = 0;
    for (int i = 0; i < V; i++) {
        n_drawn += count[i] > 0;
        outside += count[i] > 0 && !keep[i];
    }
    print_message("random top_p=0.6: reference keeps %d, drawn %d distinct\n", n_keep, n_drawn);
    assert_int_equal(outside, 0);
    assert_true(n_keep > 64 && n_drawn > n_keep * 9 / 10);
    free(x);
    free(keep);
    free(count);
}

static void test_min_p(void **state) {
    (void)state;
    /* p_i / p_max = e^-i; min_p 0.2 keeps i <= ln 5 = 1.609 -> ids of 0, -1 */
    enum { V = 6 };
    const float x[V] = {-2.0f, 0.0f, -4.0f, -1.0f, -3.0f, NAN};
    int count[V];
    sample_params p = raw_params(1.0f, 31);
    p.min_p = 0.2f;
    draw_counts(&p, x, V, 6000, count);
    assert_true(count[1] > 0 && count[3] > 0);
    assert_true(count[0] == 0 && count[2] == 0 && count[4] == 0 && count[5] == 0);
    int kc[2] = {count[1], count[3]};
    double want[2] = {1.0 / (1.0 + exp(-1.0)), exp(-1.0) / (1.0 + exp(-1.0))};
    assert_true(chi2(kc, want, 2, 6000) < 10.83);
    p.min_p = 0.1f; /* e^-2 = 0.135 >= 0.1 > e^-3: three tokens */
    draw_counts(&p, x, V, 6000, count);
    assert_true(count[1] > 0 && count[3] > 0 && count[0] > 0);
    assert_true(count[2] == 0 && count[4] == 0);
    p.min_p = 1.0f; /* only the maximum (and its ties) */
    draw_counts(&p, x, V, 500, count);
    assert_int_equal(count[1], 500);
    /* with top_k on (the sorted path) the same rule */
    p.min_p = 0.2f;
    p.top_k = 4;
    draw_counts(&p, x, V, 3000, count);
    assert_true(count[1] > 0 && count[3] > 0 && count[0] == 0 && count[4] == 0);
}

/* ---------------------------------------------------------- penalties --- */

static void penalized(sampler *s, const float *x, float *out) { sample_penalized_logits(s, x, out); }

static void test_penalties(void **state) {
    (void)state;
    enum { V = 6 };
    const float x[V] = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f, 1.0f};
    const int32_t hist[] = {0, 1, 0, 4, 2, 0};
    float out[V];

    /* repeat only: positive logits divided, non-positive multiplied, once
     * per distinct token however often it occurred */
    sample_params p = raw_params(0.0f, 1);
    p.repeat_penalty = 1.5f;
    sampler *s = new_sampler(&p, V);
    penalized(s, x, out); /* no history yet: unchanged */
    assert_memory_equal(out, x, sizeof x);
    for (size_t i = 0; i < KP_ARRAY_LEN(hist); i++) sample_accept(s, hist[i]);
    penalized(s, x, out);
    const float want_rep[V] = {2.0f / 1.5f, -1.0f * 1.5f, 0.5f / 1.5f, 3.0f, 0.0f, 1.0f};
    for (int i = 0; i < V; i++) assert_float_equal(out[i], want_rep[i], 1e-6);
    sample_free(s);

    /* frequency only: minus count * f (counts 3, 1, 1, 0, 1, 0) */
    p = raw_params(0.0f, 1);
    p.frequency_penalty = 0.25f;
    s = new_sampler(&p, V);
    for (size_t i = 0; i < KP_ARRAY_LEN(hist); i++) sample_accept(s, hist[i]);
    penalized(s, x, out);
    const float want_freq[V] = {2.0f - 0.75f, -1.25f, 0.25f, 3.0f, -0.25f, 1.0f};
    for (int i = 0; i < V; i++) assert_float_equal(out[i], want_freq[i], 1e-6);
    sample_free(s);

    /* presence only: minus p for every token present */
    p = raw_params(0.0f, 1);
    p.presence_penalty = -0.5f; /* negative encourages */
    s = new_sampler(&p, V);
    for (size_t i = 0; i < KP_ARRAY_LEN(hist); i++) sample_accept(s, hist[i]);
    penalized(s, x, out);
    const float want_pres[V] = {2.5f, -0.5f, 1.0f, 3.0f, 0.5f, 1.0f};
    for (int i = 0; i < V; i++) assert_float_equal(out[i], want_pres[i], 1e-6);
    sample_free(s);

    /* all three (llama.cpp order: repeat, then count*f + presence) */
    p = raw_params(0.0f, 1);
    p.repeat_penalty = 1.5f;
    p.frequency_penalty = 0.25f;
    p.presence_penalty = 0.5f;
    s = new_sampler(&p, V);
    for (size_t i = 0; i < KP_ARRAY_LEN(hist); i++) sample_accept(s, hist[i]);
    penalized(s, x, out);
    const float want_all[V] = {2.0f / 1.5f - 1.25f, -1.5f - 0.75f, 0.5f / 1.5f - 0.75f, 3.0f,
                               -0.75f, 1.0f};
    for (int i = 0; i < V; i++) assert_float_equal(out[i], want_all[i], 1e-6);
    /* greedy sees the penalised logits; the caller's array is untouched */
    float x2[V] = {2.0f, -1.0f, 0.5f, 1.0f, 0.0f, 1.5f};
    float x2c[V];
    memcpy(x2c, x2, sizeof x2);
    assert_int_equal(sample_next(s, x2), 5); /* 0 drops to 0.083 */
    assert_memory_equal(x2, x2c, sizeof x2);
    sample_free(s);

    /* the window: only the last penalty_last_n accepted tokens count */
    p = raw_params(0.0f, 1);
    p.frequency_penalty = 1.0f;
    p.penalty_last_n = 3;
    s = new_sampler(&p, V);
    const int32_t seq[] = {0, 0, 0, 0, 1, 5, 2, 2, 5}; /* last three: 2, 2, 5 */
    for (size_t i = 0; i < KP_ARRAY_LEN(seq); i++) sample_accept(s, seq[i]);
    sample_accept(s, -1); /* out of range ids are ignored */
    sample_accept(s, V);
    penalized(s, x, out);
    const float want_win[V] = {2.0f, -1.0f, -1.5f, 3.0f, 0.0f, 0.0f};
    for (int i = 0; i < V; i++) assert_float_equal(out[i], want_win[i], 1e-6);
    /* reset forgets */
    sample_reset(s);
    penalized(s, x, out);
    assert_memory_equal(out, x, sizeof x);
    sample_free(s);

    /* penalty_last_n = 0: off; -1: the whole history (longer than 64) */
    p.penalty_last_n = 0;
    s = new_sampler(&p, V);
    for (int i = 0; i < 10; i++) sample_accept(s, 0);
    penalized(s, x, out);
    assert_memory_equal(out, x, sizeof x);
    sample_free(s);
    p.penalty_last_n = -1;
    p.frequency_penalty = 0.01f;
    s = new_sampler(&p, V);
    for (int i = 0; i < 500; i++) sample_accept(s, i % 2 ? 3 : 1);
    penalized(s, x, out);
    assert_float_equal(out[1], -1.0f - 2.5f, 1e-5);
    assert_float_equal(out[3], 3.0f - 2.5f, 1e-5);
    sample_free(s);

    /* the default last_n = 64 over a long history */
    p = raw_params(0.0f, 1);
    p.presence_penalty = 1.0f;
    s = new_sampler(&p, V);
    sample_accept(s, 4);
    for (int i = 0; i < 64; i++) sample_accept(s, 2);
    penalized(s, x, out);
    assert_float_equal(out[4], 0.0f, 0); /* pushed out of the window */
    assert_float_equal(out[2], -0.5f, 1e-6);
    sample_free(s);
}

/* Logit biases: added before the chain, <= -100 bans, cleared with n 0,
 * ids checked; the input stays untouched. */
static void test_logit_bias(void **state) {
    (void)state;
    enum { N = 50 };
    float x[N], x0[N];
    for (int i = 0; i < N; i++) x[i] = (float)i * 0.1f; /* argmax 49 */
    memcpy(x0, x, sizeof x);
    sample_params g = raw_params(0.0f, 1);
    sampler *s = new_sampler(&g, N);
    kp_err err = {0};
    sample_bias ban = {.id = 49, .bias = -100};
    assert_int_equal(sample_set_bias(s, &ban, 1, &err), 0);
    assert_int_equal(sample_next(s, x), 48);
    sample_bias up[2] = {{.id = 3, .bias = 5.0f}, {.id = 49, .bias = -0.05f}};
    assert_int_equal(sample_set_bias(s, up, 2, &err), 0);
    assert_int_equal(sample_next(s, x), 3); /* 0.3 + 5 > 4.85 */
    up[0].bias = 4.0f;                      /* 0.3 + 4 < 4.85 */
    assert_int_equal(sample_set_bias(s, up, 2, &err), 0);
    assert_int_equal(sample_next(s, x), 49);
    assert_int_equal(sample_set_bias(s, NULL, 0, &err), 0);
    assert_int_equal(sample_next(s, x), 49);
    assert_memory_equal(x, x0, sizeof x);
    sample_bias bad = {.id = N, .bias = 1};
    assert_int_equal(sample_set_bias(s, &bad, 1, &err), KP_EINVAL);
    assert_non_null(strstr(err.msg, "outside the vocabulary"));
    bad = (sample_bias){.id = 1, .bias = NAN};
    assert_int_equal(sample_set_bias(s, &bad, 1, &err), KP_EINVAL);
    sample_free(s);
    /* sampling: a banned token is never drawn, even the most likely one with
     * every filter off; with penalties on the bias still applies */
    sample_params p = raw_params(1.0f, 7);
    p.top_k = 0, p.top_p = 1, p.min_p = 0, p.repeat_penalty = 1.3f;
    s = new_sampler(&p, N);
    sample_bias bans[2] = {{.id = 48, .bias = -100}, {.id = 49, .bias = -100}};
    assert_int_equal(sample_set_bias(s, bans, 2, &err), 0);
    for (int t = 0; t < 2000; t++) {
        int32_t id = sample_next(s, x);
        assert_true(id >= 0 && id < 48);
        sample_accept(s, id);
    }
    sample_free(s);
}

static void test_set_params(void **state) {
    (void)state;
    enum { V = 6 };
    const float x[V] = {2.0f, -1.0f, 0.5f, 3.0f, 0.0f, 1.0f};
    float out[V];
    sample_params p = raw_params(1.0f, 8);
    p.frequency_penalty = 1.0f;
    p.penalty_last_n = 8;
    sampler *s = new_sampler(&p, V);
    for (int i = 0; i < 8; i++) sample_accept(s, i % 2 ? 0 : 4); /* 4,0,4,0,... */
    p.penalty_last_n = 3; /* keeps the newest three: 4, 0 ... 0, 4, 0 */
    p.seed = 999;         /* ignored */
    assert_int_equal(sample_set_params(s, &p, NULL), 0);
    penalized(s, x, out);
    assert_float_equal(out[0], 0.0f, 1e-6); /* count 2 */
    assert_float_equal(out[4], -1.0f, 1e-6); /* count 1 */
    assert_true(sample_get_params(s)->seed == 8 && sample_get_params(s)->penalty_last_n == 3);
    sample_accept(s, 1);
    penalized(s, x, out);
    assert_float_equal(out[0], 1.0f, 1e-6);  /* window 4, 0, 1 */
    assert_float_equal(out[1], -2.0f, 1e-6);
    p.temperature = -1.0f;
    assert_int_equal(sample_set_params(s, &p, NULL), KP_EINVAL);
    sample_free(s);
}

/* -------------------------------------------------------------- state --- */

static void test_state(void **state) {
    (void)state;
    enum { V = 512, PRE = 40, POST = 200 };
    float *x = malloc(V * sizeof *x);
    uint64_t rs = 55;
    sample_params p = sample_default_params();
    p.temperature = 0.9f;
    p.top_k = 50;
    p.repeat_penalty = 1.3f;
    p.frequency_penalty = 0.4f;
    p.presence_penalty = 0.2f;
    p.penalty_last_n = 16;
    p.seed = 7;
    sampler *a = new_sampler(&p, V);
    for (int i = 0; i < PRE; i++) {
        tu_rand_floats(x, V, 3.0f, &rs);
        sample_accept(a, sample_next(a, x));
    }
    size_t n = sample_state_size(a);
    assert_int_equal(sample_state_save(a, NULL, 0), (int)n);
    assert_int_equal(n, 4 + 4 + 4 + 32 + 16 + 32 + 4 + 16 * 4 + 4); /* full window */
    uint8_t *buf = malloc(n), *bad = malloc(n + 1);
    assert_int_equal(sample_state_save(a, buf, n - 1), KP_ERANGE);
    assert_int_equal(sample_state_save(a, buf, n), 0);

    /* b: another configuration entirely, then the state */
    sample_params q = raw_params(0.3f, 1);
    sampler *b = new_sampler(&q, V);
    sample_accept(b, 3);
    kp_err err = {0};
    assert_int_equal(sample_state_load(b, buf, n, &err), 0);
    assert_memory_equal(sample_get_params(b), sample_get_params(a), sizeof(sample_params));
    uint64_t rs_b = rs;
    for (int i = 0; i < POST; i++) {
        tu_rand_floats(x, V, 3.0f, &rs);
        int32_t ta = sample_next(a, x);
        sample_accept(a, ta);
        int32_t tb = sample_next(b, x);
        sample_accept(b, tb);
        assert_int_equal(ta, tb);
    }

    /* Corruption: every single flipped byte, truncation, extension, a wrong
     * magic or version, and another vocabulary are refused, and a refused
     * load leaves the sampler as it was. */
    sampler *c = new_sampler(&p, V), *c_ref = new_sampler(&p, V);
    for (size_t i = 0; i < n; i++) {
        memcpy(bad, buf, n);
        bad[i] ^= 0x20;
        int rc = sample_state_load(c, bad, n, &err);
        if (rc != KP_EFORMAT) fail_msg("flipped byte %zu: rc %d (%s)", i, rc, err.msg);
    }
    for (size_t len = 0; len < n; len += 7)
        assert_int_equal(sample_state_load(c, buf, len, NULL), KP_EFORMAT);
    memcpy(bad, buf, n);
    bad[n] = 0;
    assert_int_equal(sample_state_load(c, bad, n + 1, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "length"));
    memcpy(bad, buf, n);
    bad[0] = 'X';
    assert_int_equal(sample_state_load(c, bad, n, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "magic"));
    memcpy(bad, buf, n);
    bad[4] = 2;
    assert_int_equal(sample_state_load(c, bad, n, &err), KP_EFORMAT);
    assert_non_null(strstr(err.msg, "version"));
    assert_int_equal(sample_state_load(c, NULL, 0, NULL), KP_EFORMAT);
    sampler *other = new_sampler(&p, V + 1);
    assert_int_equal(sample_state_load(other, buf, n, &err), KP_EMISMATCH);
    sample_free(other);
    for (int i = 0; i < 50; i++) {
        tu_rand_floats(x, V, 3.0f, &rs_b);
        int32_t t1 = sample_next(c, x), t2 = sample_next(c_ref, x);
        sample_accept(c, t1);
        sample_accept(c_ref, t2);
        assert_int_equal(t1, t2);
    }

    /* an empty history round-trips too, and a bigger window grows */
    sample_params w = raw_params(1.0f, 3);
    w.penalty_last_n = -1;
    w.repeat_penalty = 1.2f;
    sampler *e = new_sampler(&w, V), *f = new_sampler(&w, V);
    size_t ne = sample_state_size(e);
    uint8_t *eb = malloc(ne);
    assert_int_equal(sample_state_save(e, eb, ne), 0);
    for (int i = 0; i < 300; i++) sample_accept(f, i % V);
    assert_int_equal(sample_state_load(f, eb, ne, NULL), 0);
    float o1[V], o2[V];
    tu_rand_floats(x, V, 1.0f, &rs);
    penalized(f, x, o1);
    assert_memory_equal(o1, x, V * sizeof *x); /* history gone */
    for (int i = 0; i < 300; i++) {
        sample_accept(e, (i * 7) % V);
        sample_accept(f, (i * 7) % V);
    }
    penalized(e, x, o1);
    penalized(f, x, o2);
    assert_memory_equal(o1, o2, sizeof o1);
    free(eb);
    sample_free(e);
    sample_free(f);

    sample_free(a);
    sample_free(b);
    sample_free(c);
    sample_free(c_ref);
    free(buf);
    free(bad);
    free(x);
}

/* ----------------------------------------------------------- logprobs --- */

static void test_logprobs(void **state) {
    (void)state;
    enum { V = 3000, TOP = 20 };
    float *x = malloc(V * sizeof *x), *y = malloc(V * sizeof *y);
    uint64_t rs = 31337;
    tu_rand_floats(x, V, 8.0f, &rs);
    x[7] = x[8] = 9.0f; /* a tie at the top */
    double sum = 0;
    float *lp = malloc(V * sizeof *lp);
    for (int32_t i = 0; i < V; i++) {
        lp[i] = sample_logprobs(x, V, i, 0, NULL, NULL);
        assert_true(lp[i] <= 0.0f);
        sum += exp(lp[i]);
    }
    assert_true(fabs(sum - 1.0) < 1e-6);
    /* differences are the logit differences */
    assert_float_equal(lp[10] - lp[11], x[10] - x[11], 1e-4);

    int32_t ids[TOP];
    float tlp[TOP];
    float l0 = sample_logprobs(x, V, 0, TOP, ids, tlp);
    assert_float_equal(l0, lp[0], 0);
    assert_int_equal(ids[0], 7);
    assert_int_equal(ids[1], 8);
    for (int i = 0; i < TOP; i++) {
        assert_float_equal(tlp[i], lp[ids[i]], 0);
        if (i > 0) assert_true(tlp[i] <= tlp[i - 1]);
    }
    /* nothing outside the top beats its last entry */
    int above = 0;
    for (int32_t i = 0; i < V; i++) above += x[i] > x[ids[TOP - 1]];
    assert_int_equal(above, TOP - 1);

    /* shift invariance with huge logits (stability) */
    for (int32_t i = 0; i < V; i++) y[i] = x[i] + 1.0e4f;
    float ly = sample_logprobs(y, V, 123, 0, NULL, NULL);
    assert_float_equal(ly, lp[123], 2e-3); /* float rounding of x + 1e4 */
    for (int32_t i = 0; i < V; i++) y[i] = x[i] * 100.0f; /* exp would overflow */
    sum = 0;
    for (int32_t i = 0; i < V; i += 1) sum += exp(sample_logprobs(y, V, i, 0, NULL, NULL));
    assert_true(fabs(sum - 1.0) < 1e-6);

    /* edge cases */
    const float z[4] = {0.0f, NAN, 0.0f, -INFINITY};
    int32_t zi[6];
    float zl[6];
    assert_float_equal(sample_logprobs(z, 4, 0, 6, zi, zl), -logf(2.0f), 1e-6);
    assert_true(isinf(sample_logprobs(z, 4, 1, 0, NULL, NULL)));
    assert_true(isinf(sample_logprobs(z, 4, 3, 0, NULL, NULL)));
    assert_true(isnan(sample_logprobs(z, 4, 4, 0, NULL, NULL)));
    assert_true(isnan(sample_logprobs(z, 4, -1, 0, NULL, NULL)));
    assert_int_equal(zi[0], 0);
    assert_int_equal(zi[1], 2);
    assert_int_equal(zi[2], 3); /* -inf still ranks above NaN (excluded) */
    assert_int_equal(zi[3], -1);
    assert_int_equal(zi[5], -1);
    assert_true(isinf(zl[2]) && isinf(zl[5]));
    free(lp);
    free(x);
    free(y);
}

/* -------------------------------------------------------------- speed --- */

/* 1 if token `id` of the penalised logits pl[V] may come out of top-k (k <= 0:
 * off), top-p and min-p as sample.h defines them: fewer than k logits above
 * it, the softmax mass (temperature 1) of the logits above it short of top_p,
 * and p >= min_p * p_max. Small slack for float rounding at the borders. */
static int in_support(const float *pl, int32_t V, int32_t id, int32_t k, float top_p, float min_p) {
    if (id < 0 || id >= V || !isfinite(pl[id])) return 0;
    float m = -INFINITY;
    for (int32_t i = 0; i < V; i++)
        if (pl[i] > m) m = pl[i];
    int32_t above = 0;
    double mass_above = 0, mass = 0;
    for (int32_t i = 0; i < V; i++) {
        if (!isfinite(pl[i])) continue;
        double e = exp((double)pl[i] - m);
        mass += e;
        if (pl[i] > pl[id]) above++, mass_above += e;
    }
    if (k > 0 && above >= k) return 0;
    if (k <= 0 && top_p < 1.0f && mass_above > (double)top_p * mass * (1 + 1e-6)) return 0;
    if (min_p > 0.0f && (double)pl[id] - m < log((double)min_p) - 1e-5) return 0;
    return 1;
}

/* The 128K-vocabulary paths (top-k 40 with penalties, and top-k off with the
 * lazily sorted top-p): every drawn token lies in the support those filters
 * leave. The time per token is printed as a benchmark, not asserted: a busy
 * machine must not fail the test. */
static void test_speed(void **state) {
    (void)state;
    enum { V = 128000, NVEC = 8, N = 1000, N2 = 100 };
    float *x = malloc((size_t)V * NVEC * sizeof *x);
    float *pl = malloc((size_t)V * sizeof *pl);
    int32_t *ids = malloc(N * sizeof *ids);
    uint64_t rs = 1;
    tu_rand_floats(x, (size_t)V * NVEC, 10.0f, &rs);
    sample_params p = sample_default_params(); /* top_k 40, top_p, min_p */
    p.seed = 1;
    p.repeat_penalty = 1.1f; /* the penalty copy too */
    sampler *s = new_sampler(&p, V);
    double t0 = kp_now();
    for (int i = 0; i < N; i++) {
        ids[i] = sample_next(s, x + (size_t)(i % NVEC) * V);
        sample_accept(s, ids[i]);
    }
    double dt = kp_now() - t0;
    print_message("vocab %d, top_k 40 + penalties: %d tokens in %.3f s (%.1f us/token)\n", V, N,
                  dt, dt / N * 1e6);
    /* replay: the penalties each draw saw, then its support */
    sampler *chk = new_sampler(&p, V);
    for (int i = 0; i < N; i++) {
        sample_penalized_logits(chk, x + (size_t)(i % NVEC) * V, pl);
        if (!in_support(pl, V, ids[i], p.top_k, p.top_p, p.min_p))
            fail_msg("token %d (id %d) outside top_k %d / min_p %g", i, ids[i], p.top_k,
                     (double)p.min_p);
        sample_accept(chk, ids[i]);
    }

    /* top_k off, top_p 0.95: the lazily sorted path */
    p.top_k = 0;
    p.repeat_penalty = 1.0f;
    sampler *s2 = new_sampler(&p, V);
    t0 = kp_now();
    for (int i = 0; i < N2; i++) ids[i] = sample_next(s2, x + (size_t)(i % NVEC) * V);
    dt = kp_now() - t0;
    print_message("vocab %d, top_k off, top_p 0.95: %d tokens in %.3f s (%.0f us/token)\n", V,
                  N2, dt, dt / N2 * 1e6);
    for (int i = 0; i < N2; i++) {
        sample_penalized_logits(s2, x + (size_t)(i % NVEC) * V, pl);
        if (!in_support(pl, V, ids[i], p.top_k, p.top_p, p.min_p))
            fail_msg("token %d (id %d) outside top_p %g / min_p %g", i, ids[i], (double)p.top_p,
                     (double)p.min_p);
    }
    sample_free(s);
    sample_free(chk);
    sample_free(s2);
    free(ids);
    free(pl);
    free(x);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_params),
        cmocka_unit_test(test_greedy),
        cmocka_unit_test(test_degenerate_sampling),
        cmocka_unit_test(test_rng_known_answer),
        cmocka_unit_test(test_seed_determinism),
        cmocka_unit_test(test_distribution),
        cmocka_unit_test(test_top_k),
        cmocka_unit_test(test_top_p),
        cmocka_unit_test(test_min_p),
        cmocka_unit_test(test_penalties),
        cmocka_unit_test(test_logit_bias),
        cmocka_unit_test(test_set_params),
        cmocka_unit_test(test_state),
        cmocka_unit_test(test_logprobs),
        cmocka_unit_test(test_speed),
    };
    return cmocka_run_group_tests_name("sample", tests, NULL, NULL);
}
