/*
 * sample.c — the sampler: penalties, greedy, top-k / top-p / min-p,
 * temperature and a seeded draw, plus state save/load and log-softmax
 * (contract in sample.h).
 *
 * Why it looks like this
 *   - The chain and the penalty arithmetic follow llama.cpp's default sampler
 *     (llama_sampler_penalties, top_k, top_p, min_p, temp, dist), so the same
 *     settings mean the same thing here as in llama-server. The final draw uses
 *     our own RNG, so ids differ from llama.cpp's for the same seed.
 *   - Vocabularies are 32K-150K entries and a token costs a fraction of a
 *     millisecond on the model side, so the sampler must not sort the whole
 *     vocabulary: top-k keeps a size-k min-heap in one pass over the logits;
 *     top-p with top-k off sorts only as much of the head as it needs
 *     (quickselect a chunk, sort it, grow the chunk 4x until the cumulative
 *     probability reaches p).
 *   - Penalties need the counts of the last `penalty_last_n` tokens; rather
 *     than an n_vocab-sized count table per session we sort a copy of the
 *     (short) window at sample time and run-length it.
 *   - Candidates are always ordered by (logit descending, id ascending), a
 *     strict total order, so ties resolve to the lowest id everywhere and the
 *     result never depends on qsort's instability.
 *
 * Degenerate inputs (documented behaviour, tested)
 *   - NaN logits are never chosen (they are dropped from every candidate set).
 *   - Greedy returns the lowest id holding the maximum of the non-NaN logits;
 *     all NaN -> 0.
 *   - Sampling when every non-NaN logit is -inf returns what greedy returns
 *     (the lowest non-NaN id, i.e. 0 when all are -inf). When some logits are
 *     +inf, only those can be drawn (equally likely).
 *   - Every sample_next() with temperature > 0 consumes exactly one RNG draw
 *     (even in the degenerate cases); greedy consumes none.
 *
 * The RNG
 *   xoshiro256** (Blackman & Vigna), its 4 words seeded with 4 successive
 *   outputs of splitmix64 started at the seed. A uniform double in [0,1) is
 *   (next() >> 11) * 2^-53. The draw: with w_i = exp((l_i - l_max) / T) over
 *   the surviving candidates in candidate order and r = u * sum(w), the token
 *   is the first candidate whose running sum of w exceeds r.
 *
 * State layout (version 1, all little-endian, see sample_state_save)
 *   "KPSM" | u32 version | u32 n_vocab | f32 temperature | i32 top_k |
 *   f32 top_p | f32 min_p | f32 repeat_penalty | f32 frequency_penalty |
 *   f32 presence_penalty | i32 penalty_last_n | u64 params.seed |
 *   u64 resolved seed | u64 rng[4] | u32 n_hist | i32 hist[n_hist] (oldest
 *   first) | u32 FNV-1a of all preceding bytes.
 */
#include "engine/sample.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>
#include <unistd.h>

/* One candidate token: its (possibly penalised) logit and its id. */
typedef struct sample_cand {
    float logit;
    int32_t id;
} sample_cand;

struct sampler {
    sample_params p;
    int32_t n_vocab;
    uint64_t seed;   /* the seed actually used (p.seed unless it was random) */
    uint64_t rng[4]; /* xoshiro256** state */

    /* History ring: the last min(accepted, hist_cap) accepted tokens.
     * hist_cap = penalty_last_n (INT32_MAX when -1). The storage grows by
     * doubling up to hist_cap, so a large window costs nothing until used;
     * while growing nothing is evicted, so hist_head stays 0. */
    int32_t *hist;        /* [hist_alloc] */
    int32_t *hist_sorted; /* [hist_alloc] scratch for counting */
    int32_t hist_alloc, hist_cap, hist_len, hist_head;

    float *pen;        /* [n_vocab] biased and penalised copy of the logits */
    sample_cand *cand; /* [n_vocab] candidates */
    sample_bias *bias; /* [n_bias] logit biases of the current request */
    int n_bias;
};

enum {
    SAMPLE_STATE_VERSION = 1,
    SAMPLE_STATE_FIXED = 4 + 4 + 4 + 8 * 4 + 8 + 8 + 4 * 8 + 4, /* before hist */
};
static const uint8_t sample_magic[4] = {'K', 'P', 'S', 'M'};

/* ---------------------------------------------------------------- RNG --- */

static uint64_t splitmix64(uint64_t *x) {
    uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

static uint64_t xoshiro_next(uint64_t s[4]) {
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

static void rng_seed(uint64_t s[4], uint64_t seed) {
    uint64_t x = seed;
    for (int i = 0; i < 4; i++) s[i] = splitmix64(&x);
}

/* Uniform double in [0, 1) with 53 random bits. */
static double rng_uniform(uint64_t s[4]) { return (double)(xoshiro_next(s) >> 11) * 0x1.0p-53; }

/* A seed from the OS for SAMPLE_SEED_RANDOM; falls back to clock and pid. */
static uint64_t os_random_seed(void) {
    uint64_t v = 0;
    if (getrandom(&v, sizeof v, 0) == (ssize_t)sizeof v) return v;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    uint64_t x = (uint64_t)ts.tv_sec * 1000000007ull ^ (uint64_t)ts.tv_nsec ^
                 ((uint64_t)getpid() << 32);
    return splitmix64(&x);
}

/* ------------------------------------------------------------- params --- */

sample_params sample_default_params(void) {
    sample_params p = {
        .temperature = 0.8f,
        .top_k = 40,
        .top_p = 0.95f,
        .min_p = 0.05f,
        .repeat_penalty = 1.0f,
        .frequency_penalty = 0.0f,
        .presence_penalty = 0.0f,
        .penalty_last_n = 64,
        .seed = SAMPLE_SEED_RANDOM,
    };
    return p;
}

/* Written as !(lo <= x && x <= hi) so NaN fails every check. */
int sample_check_params(const sample_params *p, kp_err *err) {
    if (!p) return kp_errf(err, KP_EINVAL, "sample: no parameters given");
    if (!(p->temperature >= 0.0f && p->temperature <= 2.0f))
        return kp_errf(err, KP_EINVAL, "temperature must be between 0 and 2 (got %g)",
                       (double)p->temperature);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return kp_errf(err, KP_EINVAL,
                       "top_p must be greater than 0 and at most 1 (got %g)",
                       (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return kp_errf(err, KP_EINVAL, "min_p must be between 0 and 1 (got %g)",
                       (double)p->min_p);
    if (!(p->repeat_penalty > 0.0f && p->repeat_penalty <= 10.0f))
        return kp_errf(err, KP_EINVAL,
                       "repeat_penalty must be greater than 0 and at most 10 (got %g; 1 = off)",
                       (double)p->repeat_penalty);
    if (!(p->frequency_penalty >= -2.0f && p->frequency_penalty <= 2.0f))
        return kp_errf(err, KP_EINVAL, "frequency_penalty must be between -2 and 2 (got %g)",
                       (double)p->frequency_penalty);
    if (!(p->presence_penalty >= -2.0f && p->presence_penalty <= 2.0f))
        return kp_errf(err, KP_EINVAL, "presence_penalty must be between -2 and 2 (got %g)",
                       (double)p->presence_penalty);
    if (p->penalty_last_n < -1)
        return kp_errf(err, KP_EINVAL,
                       "penalty_last_n must be -1 (whole history), 0 (off) or positive (got %d)",
                       (int)p->penalty_last_n);
    return KP_OK;
}

static int penalties_active(const sample_params *p) {
    return p->penalty_last_n != 0 &&
           (p->repeat_penalty != 1.0f || p->frequency_penalty != 0.0f ||
            p->presence_penalty != 0.0f);
}

static int32_t hist_cap_for(const sample_params *p) {
    return p->penalty_last_n < 0 ? INT32_MAX : p->penalty_last_n;
}

/* --------------------------------------------------------- life cycle --- */

int sample_new(sampler **out, const sample_params *p, int32_t n_vocab, kp_err *err) {
    *out = NULL;
    int rc = sample_check_params(p, err);
    if (rc) return rc;
    if (n_vocab <= 0)
        return kp_errf(err, KP_EINVAL, "sample: n_vocab must be positive (got %d)",
                       (int)n_vocab);
    sampler *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "sample: out of memory");
    s->p = *p;
    s->n_vocab = n_vocab;
    s->seed = p->seed == SAMPLE_SEED_RANDOM ? os_random_seed() : p->seed;
    s->hist_cap = hist_cap_for(p);
    /* The scratch is sized once here so sample_next never allocates. */
    s->pen = malloc((size_t)n_vocab * sizeof *s->pen);
    s->cand = malloc((size_t)n_vocab * sizeof *s->cand);
    if (!s->pen || !s->cand) {
        sample_free(s);
        return kp_errf(err, KP_ENOMEM, "sample: out of memory for %d-entry vocabulary scratch",
                       (int)n_vocab);
    }
    rng_seed(s->rng, s->seed);
    *out = s;
    return KP_OK;
}

void sample_free(sampler *s) {
    if (!s) return;
    free(s->hist);
    free(s->hist_sorted);
    free(s->pen);
    free(s->cand);
    free(s->bias);
    free(s);
}

int sample_set_bias(sampler *s, const sample_bias *bias, int n, kp_err *err) {
    for (int i = 0; i < n; i++) {
        if (bias[i].id < 0 || bias[i].id >= s->n_vocab)
            return kp_errf(err, KP_EINVAL, "logit bias for token %d: outside the vocabulary (0..%d)",
                           (int)bias[i].id, (int)s->n_vocab - 1);
        if (isnan(bias[i].bias))
            return kp_errf(err, KP_EINVAL, "logit bias for token %d is NaN", (int)bias[i].id);
    }
    sample_bias *copy = NULL;
    if (n > 0) {
        copy = malloc((size_t)n * sizeof *copy);
        if (!copy) return kp_errf(err, KP_ENOMEM, "sampler: out of memory");
        memcpy(copy, bias, (size_t)n * sizeof *copy);
    }
    free(s->bias);
    s->bias = copy;
    s->n_bias = n;
    return 0;
}

void sample_reset(sampler *s) {
    s->hist_len = 0;
    s->hist_head = 0;
    rng_seed(s->rng, s->seed);
}

uint64_t sample_seed(const sampler *s) { return s->seed; }

const sample_params *sample_get_params(const sampler *s) { return &s->p; }

/* Make room for `want` history entries (want <= hist_cap). */
static int hist_reserve(sampler *s, int32_t want) {
    if (want <= s->hist_alloc) return 0;
    int64_t n = s->hist_alloc ? s->hist_alloc : 64;
    while (n < want) n *= 2;
    if (n > s->hist_cap) n = s->hist_cap;
    int32_t *h = realloc(s->hist, (size_t)n * sizeof *h);
    if (!h) return -1;
    s->hist = h;
    int32_t *hs = realloc(s->hist_sorted, (size_t)n * sizeof *hs);
    if (!hs) return -1;
    s->hist_sorted = hs;
    s->hist_alloc = (int32_t)n;
    return 0;
}

void sample_accept(sampler *s, int32_t id) {
    if (id < 0 || id >= s->n_vocab || s->hist_cap == 0) return;
    if (s->hist_len < s->hist_cap) {
        /* Not full yet, so nothing was ever evicted and hist_head is 0. */
        if (hist_reserve(s, s->hist_len + 1) != 0) return; /* OOM: token not recorded */
        s->hist[s->hist_len++] = id;
    } else {
        s->hist[s->hist_head] = id;
        s->hist_head = (s->hist_head + 1) % s->hist_cap;
    }
}

/* The i-th oldest token of the window. */
static int32_t hist_at(const sampler *s, int32_t i) {
    int64_t j = (int64_t)s->hist_head + i;
    if (j >= s->hist_alloc) j -= s->hist_alloc;
    return s->hist[j];
}

int sample_set_params(sampler *s, const sample_params *p, kp_err *err) {
    int rc = sample_check_params(p, err);
    if (rc) return rc;
    int32_t cap = hist_cap_for(p);
    int32_t keep = KP_MIN(s->hist_len, cap);
    int32_t *tmp = NULL;
    if (keep > 0) {
        tmp = malloc((size_t)keep * sizeof *tmp);
        if (!tmp) return kp_errf(err, KP_ENOMEM, "sample: out of memory");
        for (int32_t i = 0; i < keep; i++) tmp[i] = hist_at(s, s->hist_len - keep + i);
    }
    /* Rebuild the ring linearly (oldest first) with the new capacity. */
    free(s->hist);
    free(s->hist_sorted);
    s->hist = s->hist_sorted = NULL;
    s->hist_alloc = s->hist_len = s->hist_head = 0;
    s->hist_cap = cap;
    if (keep > 0 && hist_reserve(s, keep) != 0) {
        free(tmp);
        return kp_errf(err, KP_ENOMEM, "sample: out of memory");
    }
    if (keep > 0) memcpy(s->hist, tmp, (size_t)keep * sizeof *tmp);
    s->hist_len = keep;
    free(tmp);
    uint64_t old_seed = s->p.seed;
    s->p = *p;
    s->p.seed = old_seed; /* the RNG keeps running; see sample.h */
    return KP_OK;
}

/* ---------------------------------------------------------- penalties --- */

static int cmp_i32(const void *a, const void *b) {
    int32_t x = *(const int32_t *)a, y = *(const int32_t *)b;
    return (x > y) - (x < y);
}

/* Returns the logits to sample from: `logits` itself, or s->pen holding a
 * copy with llama.cpp's penalties applied to every token of the window:
 *   repeat:    l > 0 ? l / repeat_penalty : l * repeat_penalty  (once)
 *   then       l -= count * frequency_penalty + (count > 0) * presence_penalty */
/* Logit biases, then penalties, into s->pen (or the logits themselves when
 * neither applies). A bias <= -100 bans its token. */
static const float *apply_penalties(sampler *s, const float *logits) {
    const int pen = penalties_active(&s->p) && s->hist_len > 0;
    if (!pen && s->n_bias == 0) return logits;
    memcpy(s->pen, logits, (size_t)s->n_vocab * sizeof *s->pen);
    for (int i = 0; i < s->n_bias; i++)
        s->pen[s->bias[i].id] = s->bias[i].bias <= -100.0f ? -INFINITY : s->pen[s->bias[i].id] + s->bias[i].bias;
    if (!pen) return s->pen;
    int32_t n = s->hist_len;
    for (int32_t i = 0; i < n; i++) s->hist_sorted[i] = hist_at(s, i);
    qsort(s->hist_sorted, (size_t)n, sizeof *s->hist_sorted, cmp_i32);
    const float rp = s->p.repeat_penalty, fp = s->p.frequency_penalty,
                pp = s->p.presence_penalty;
    for (int32_t i = 0; i < n;) {
        int32_t id = s->hist_sorted[i], count = 0;
        while (i < n && s->hist_sorted[i] == id) i++, count++;
        float l = s->pen[id];
        if (l <= 0.0f)
            l *= rp;
        else
            l /= rp;
        l -= (float)count * fp + (float)(count > 0) * pp;
        s->pen[id] = l;
    }
    return s->pen;
}

void sample_penalized_logits(sampler *s, const float *logits, float *out) {
    const float *L = apply_penalties(s, logits);
    memcpy(out, L, (size_t)s->n_vocab * sizeof *out);
}

/* --------------------------------------------------------- candidates --- */

/* The strict order used everywhere: higher logit first, then lower id. */
static inline int cand_better(const sample_cand *a, const sample_cand *b) {
    return a->logit > b->logit || (a->logit == b->logit && a->id < b->id);
}

static int cand_cmp(const void *a, const void *b) {
    const sample_cand *x = a, *y = b;
    return cand_better(x, y) ? -1 : cand_better(y, x) ? 1 : 0;
}

static inline void cand_swap(sample_cand *a, sample_cand *b) {
    sample_cand t = *a;
    *a = *b;
    *b = t;
}

/* Rearrange c[lo..hi) so that c[lo..mid) holds, in sorted order, the
 * (mid - lo) best candidates of c[lo..hi). Quickselect (Lomuto partition,
 * median-of-three pivot) then qsort of the head; falls back to sorting the
 * whole range if the partitioning degenerates. */
static void cand_partial_sort(sample_cand *c, int32_t lo, int32_t hi, int32_t mid) {
    const int32_t lo0 = lo;
    if (mid >= hi) {
        qsort(c + lo, (size_t)(hi - lo), sizeof *c, cand_cmp);
        return;
    }
    int rounds = 0;
    while (hi - lo > 16) {
        if (++rounds > 64) { /* pathological input: just sort */
            qsort(c + lo, (size_t)(hi - lo), sizeof *c, cand_cmp);
            lo = hi;
            break;
        }
        int32_t m = lo + (hi - lo) / 2, last = hi - 1;
        /* median of three to c[last] */
        if (cand_better(&c[m], &c[lo])) cand_swap(&c[m], &c[lo]);
        if (cand_better(&c[last], &c[lo])) cand_swap(&c[last], &c[lo]);
        if (cand_better(&c[m], &c[last])) cand_swap(&c[m], &c[last]);
        sample_cand pivot = c[last];
        int32_t store = lo;
        for (int32_t i = lo; i < last; i++)
            if (cand_better(&c[i], &pivot)) cand_swap(&c[i], &c[store++]);
        cand_swap(&c[store], &c[last]);
        /* c[lo..store) better than pivot, c[store] pivot, rest worse */
        if (store == mid || store + 1 == mid) {
            lo = hi; /* the boundary is exact */
            break;
        }
        if (mid < store)
            hi = store;
        else
            lo = store + 1;
    }
    if (lo < hi) qsort(c + lo, (size_t)(hi - lo), sizeof *c, cand_cmp);
    qsort(c + lo0, (size_t)(mid - lo0), sizeof *c, cand_cmp);
}

/* min-heap on "worse": h[0] is the worst of the kept candidates. */
static void heap_sift_down(sample_cand *h, int32_t n, int32_t i) {
    for (;;) {
        int32_t l = 2 * i + 1, r = l + 1, w = i;
        if (l < n && cand_better(&h[w], &h[l])) w = l;
        if (r < n && cand_better(&h[w], &h[r])) w = r;
        if (w == i) return;
        cand_swap(&h[i], &h[w]);
        i = w;
    }
}

static void heap_sift_up(sample_cand *h, int32_t i) {
    while (i > 0) {
        int32_t parent = (i - 1) / 2;
        if (!cand_better(&h[parent], &h[i])) return;
        cand_swap(&h[parent], &h[i]);
        i = parent;
    }
}

/* The k best non-NaN logits, sorted best first, in one pass. Returns how
 * many were found (< k only when fewer than k logits are non-NaN). */
static int32_t top_k_select(const float *L, int32_t n, int32_t k, sample_cand *h) {
    int32_t nh = 0, i = 0;
    for (; i < n && nh < k; i++) {
        if (isnan(L[i])) continue;
        h[nh] = (sample_cand){L[i], i};
        heap_sift_up(h, nh++);
    }
    if (nh == k) {
        /* Ids only grow from here, so an equal logit is never better than
         * the root: a strict '>' is the whole test (and NaN fails it). */
        float thr = h[0].logit;
        for (; i < n; i++) {
            float v = L[i];
            if (v > thr) {
                h[0] = (sample_cand){v, i};
                heap_sift_down(h, k, 0);
                thr = h[0].logit;
            }
        }
    }
    qsort(h, (size_t)nh, sizeof *h, cand_cmp);
    return nh;
}

/* Unnormalised probability of logit l at inverse temperature inv_t relative
 * to the maximum m. l == m gives 1, which also makes +inf logits share the
 * mass when m = +inf (and everything finite gets exp(-inf) = 0). */
static inline float cand_weight(float l, float m, float inv_t) {
    if (l == m) return 1.0f;
    return expf((l - m) * inv_t);
}

/* Greedy: lowest id holding the largest non-NaN value; 0 if all are NaN. */
static int32_t argmax_lowest(const float *L, int32_t n) {
    int32_t best = -1;
    float bv = 0.0f;
    for (int32_t i = 0; i < n; i++) {
        if (isnan(L[i])) continue;
        if (best < 0 || L[i] > bv) {
            best = i;
            bv = L[i];
        }
    }
    return best < 0 ? 0 : best;
}

/* top-p: keep the smallest prefix (in candidate order) whose probability
 * (softmax at temperature 1 over the current candidates) reaches top_p, at
 * least one. c[0..sorted) is already sorted; the rest is sorted lazily in
 * growing chunks. */
static int32_t apply_top_p(sample_cand *c, int32_t nc, int32_t sorted, float m, float top_p) {
    double total = 0.0;
    for (int32_t i = 0; i < nc; i++) total += cand_weight(c[i].logit, m, 1.0f);
    const double target = (double)top_p * total;
    double cum = 0.0;
    int32_t chunk = 64;
    for (int32_t i = 0; i < nc; i++) {
        if (i == sorted) {
            int32_t end = (int32_t)KP_MIN((int64_t)nc, (int64_t)i + chunk);
            cand_partial_sort(c, i, nc, end);
            sorted = end;
            chunk = chunk < (1 << 26) ? chunk * 4 : chunk;
        }
        cum += cand_weight(c[i].logit, m, 1.0f);
        if (cum >= target) return i + 1;
    }
    return nc;
}

/* min-p: keep p_i >= min_p * p_max, i.e. l_i - l_max >= log(min_p), keeping
 * the candidates' order. m must be finite. */
static int32_t apply_min_p(sample_cand *c, int32_t nc, float m, float min_p) {
    const double thr = log((double)min_p);
    int32_t w = 0;
    for (int32_t i = 0; i < nc; i++)
        if ((double)c[i].logit - (double)m >= thr) c[w++] = c[i];
    return w;
}

int32_t sample_next(sampler *s, const float *logits) {
    const int32_t n = s->n_vocab;
    const sample_params *p = &s->p;
    const float *L = apply_penalties(s, logits);

    if (p->temperature <= 0.0f) return argmax_lowest(L, n);

    const double u = rng_uniform(s->rng); /* exactly one draw per call */
    sample_cand *c = s->cand;
    int32_t nc, sorted;
    float m;
    if (p->top_k > 0 && p->top_k < n) {
        nc = sorted = top_k_select(L, n, p->top_k, c);
        m = nc > 0 ? c[0].logit : -INFINITY;
    } else {
        nc = sorted = 0;
        m = -INFINITY;
        for (int32_t i = 0; i < n; i++) {
            if (isnan(L[i])) continue;
            c[nc++] = (sample_cand){L[i], i};
            if (L[i] > m) m = L[i];
        }
    }
    if (nc == 0 || m == -INFINITY) return argmax_lowest(L, n); /* all NaN / -inf */

    if (p->top_p < 1.0f) {
        nc = apply_top_p(c, nc, sorted, m, p->top_p);
    }
    if (p->min_p > 0.0f && isfinite(m)) nc = apply_min_p(c, nc, m, p->min_p);

    /* temperature + softmax + draw */
    const float inv_t = 1.0f / p->temperature;
    double total = 0.0;
    for (int32_t i = 0; i < nc; i++) total += cand_weight(c[i].logit, m, inv_t);
    const double r = u * total;
    double cum = 0.0;
    int32_t last = 0;
    for (int32_t i = 0; i < nc; i++) {
        float w = cand_weight(c[i].logit, m, inv_t);
        if (w <= 0.0f) continue;
        cum += w;
        last = i;
        if (r < cum) return c[i].id;
    }
    return c[last].id; /* rounding: r landed on the very end */
}

/* ------------------------------------------------------------ logprobs --- */

/* log-probability of logit l given the maximum m of the non-NaN logits and
 * log_sum = log(sum_i w_i), w_i = exp(l_i - m) (with l == m counting 1). */
static inline float logprob_of(float l, float m, double log_sum) {
    if (isnan(l)) return -INFINITY;
    if (l == m) return (float)(-log_sum);
    return (float)((double)l - (double)m - log_sum);
}

float sample_logprobs(const float *logits, int32_t n_vocab, int32_t id, int n_top,
                      int32_t *top_ids, float *top_lp) {
    /* max and log-sum-exp over the non-NaN logits (NaN counts as -inf);
     * subtracting the max keeps exp() in range, the sum is in double. */
    float m = -INFINITY;
    int32_t n_ok = 0;
    for (int32_t i = 0; i < n_vocab; i++) {
        if (isnan(logits[i])) continue;
        n_ok++;
        if (logits[i] > m) m = logits[i];
    }
    double sum = 0.0;
    if (m == -INFINITY) {
        sum = (double)n_ok; /* all -inf: the limit of equal logits, uniform */
    } else {
        for (int32_t i = 0; i < n_vocab; i++)
            if (!isnan(logits[i])) sum += cand_weight(logits[i], m, 1.0f);
    }
    const double log_sum = n_ok > 0 ? log(sum) : INFINITY; /* all NaN: all -inf */

    if (n_top > 0 && top_ids && top_lp) {
        int32_t k = (int32_t)KP_MIN((int64_t)n_top, (int64_t)n_vocab);
        sample_cand *h = k > 0 ? malloc((size_t)k * sizeof *h) : NULL;
        int32_t got = h ? top_k_select(logits, n_vocab, k, h) : 0;
        for (int i = 0; i < n_top; i++) {
            top_ids[i] = i < got ? h[i].id : -1;
            top_lp[i] = i < got ? logprob_of(h[i].logit, m, log_sum) : -INFINITY;
        }
        free(h);
    }
    if (id < 0 || id >= n_vocab) return NAN;
    return logprob_of(logits[id], m, log_sum);
}

/* -------------------------------------------------------------- state --- */

static uint32_t fnv1a32(const uint8_t *p, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* Cursor forms of the base's little-endian accessors (kernels/kp.h). */
static uint8_t *put_u32(uint8_t *b, uint32_t v) { return kp_put_u32(b, v), b + 4; }
static uint8_t *put_u64(uint8_t *b, uint64_t v) { return kp_put_u64(b, v), b + 8; }
static uint8_t *put_f32(uint8_t *b, float f) { return kp_put_f32(b, f), b + 4; }
static uint32_t get_u32(const uint8_t **b) { return *b += 4, kp_get_u32(*b - 4); }
static uint64_t get_u64(const uint8_t **b) { return *b += 8, kp_get_u64(*b - 8); }
static float get_f32(const uint8_t **b) { return *b += 4, kp_get_f32(*b - 4); }

size_t sample_state_size(const sampler *s) {
    return (size_t)SAMPLE_STATE_FIXED + 4 * (size_t)s->hist_len + 4;
}

int sample_state_save(const sampler *s, void *buf, size_t cap) {
    size_t need = sample_state_size(s);
    if (!buf) return (int)need;
    if (cap < need) return KP_ERANGE;
    uint8_t *b = buf;
    memcpy(b, sample_magic, 4);
    b += 4;
    b = put_u32(b, SAMPLE_STATE_VERSION);
    b = put_u32(b, (uint32_t)s->n_vocab);
    b = put_f32(b, s->p.temperature);
    b = put_u32(b, (uint32_t)s->p.top_k);
    b = put_f32(b, s->p.top_p);
    b = put_f32(b, s->p.min_p);
    b = put_f32(b, s->p.repeat_penalty);
    b = put_f32(b, s->p.frequency_penalty);
    b = put_f32(b, s->p.presence_penalty);
    b = put_u32(b, (uint32_t)s->p.penalty_last_n);
    b = put_u64(b, s->p.seed);
    b = put_u64(b, s->seed);
    for (int i = 0; i < 4; i++) b = put_u64(b, s->rng[i]);
    b = put_u32(b, (uint32_t)s->hist_len);
    for (int32_t i = 0; i < s->hist_len; i++) b = put_u32(b, (uint32_t)hist_at(s, i));
    b = put_u32(b, fnv1a32(buf, (size_t)(b - (uint8_t *)buf)));
    return KP_OK;
}

int sample_state_load(sampler *s, const void *buf, size_t len, kp_err *err) {
    const uint8_t *b0 = buf, *b = buf;
    if (!buf || len < (size_t)SAMPLE_STATE_FIXED + 4)
        return kp_errf(err, KP_EFORMAT,
                       "sample state: %zu bytes is too short (at least %d); the state is "
                       "truncated",
                       len, SAMPLE_STATE_FIXED + 4);
    if (memcmp(b, sample_magic, 4) != 0)
        return kp_errf(err, KP_EFORMAT,
                       "sample state: bad magic %02x%02x%02x%02x (expected 'KPSM'); not a "
                       "sampler state",
                       b[0], b[1], b[2], b[3]);
    b += 4;
    uint32_t version = get_u32(&b);
    if (version != SAMPLE_STATE_VERSION)
        return kp_errf(err, KP_EFORMAT,
                       "sample state: version %u is not supported (this build reads %d)",
                       version, SAMPLE_STATE_VERSION);
    uint32_t n_vocab = get_u32(&b);
    sample_params p;
    p.temperature = get_f32(&b);
    p.top_k = (int32_t)get_u32(&b);
    p.top_p = get_f32(&b);
    p.min_p = get_f32(&b);
    p.repeat_penalty = get_f32(&b);
    p.frequency_penalty = get_f32(&b);
    p.presence_penalty = get_f32(&b);
    p.penalty_last_n = (int32_t)get_u32(&b);
    p.seed = get_u64(&b);
    uint64_t seed = get_u64(&b);
    uint64_t rng[4];
    for (int i = 0; i < 4; i++) rng[i] = get_u64(&b);
    uint32_t n_hist = get_u32(&b);
    size_t expect = (size_t)SAMPLE_STATE_FIXED + 4 * (size_t)n_hist + 4;
    if (n_hist > (UINT32_MAX - SAMPLE_STATE_FIXED - 8) / 4 || len != expect)
        return kp_errf(err, KP_EFORMAT,
                       "sample state: length %zu does not match its %u history tokens "
                       "(expected %zu bytes); the state is truncated or corrupt",
                       len, n_hist, expect);
    uint32_t sum_stored;
    {
        const uint8_t *t = b0 + len - 4;
        sum_stored = get_u32(&t);
    }
    if (fnv1a32(b0, len - 4) != sum_stored)
        return kp_errf(err, KP_EFORMAT, "sample state: checksum mismatch; the state is corrupt");
    if (n_vocab != (uint32_t)s->n_vocab)
        return kp_errf(err, KP_EMISMATCH,
                       "sample state: made for a vocabulary of %u tokens, this sampler has "
                       "%d; it belongs to another model",
                       n_vocab, (int)s->n_vocab);
    kp_err perr;
    if (sample_check_params(&p, &perr) != 0)
        return kp_errf(err, KP_EFORMAT, "sample state: bad parameters: %s", perr.msg);
    if ((rng[0] | rng[1] | rng[2] | rng[3]) == 0)
        return kp_errf(err, KP_EFORMAT, "sample state: RNG state is all zero; corrupt");
    int32_t cap = hist_cap_for(&p);
    if ((int64_t)n_hist > (int64_t)cap)
        return kp_errf(err, KP_EFORMAT,
                       "sample state: %u history tokens but penalty_last_n allows %d",
                       n_hist, (int)cap);
    const uint8_t *hb = b;
    for (uint32_t i = 0; i < n_hist; i++) {
        int32_t id = (int32_t)get_u32(&hb);
        if (id < 0 || id >= s->n_vocab)
            return kp_errf(err, KP_EFORMAT,
                           "sample state: history token %u is id %d, outside the vocabulary "
                           "(%d tokens)",
                           i, (int)id, (int)s->n_vocab);
    }

    /* Everything checks out: build the new ring, then commit. */
    int32_t alloc = n_hist > 0 ? (int32_t)n_hist : 0;
    int32_t *h = NULL, *hs = NULL;
    if (alloc > 0) {
        h = malloc((size_t)alloc * sizeof *h);
        hs = malloc((size_t)alloc * sizeof *hs);
        if (!h || !hs) {
            free(h);
            free(hs);
            return kp_errf(err, KP_ENOMEM, "sample state: out of memory");
        }
        for (int32_t i = 0; i < alloc; i++) h[i] = (int32_t)get_u32(&b);
    }
    free(s->hist);
    free(s->hist_sorted);
    s->hist = h;
    s->hist_sorted = hs;
    s->hist_alloc = alloc;
    s->hist_len = alloc;
    s->hist_head = 0;
    s->hist_cap = cap;
    s->p = p;
    s->seed = seed;
    memcpy(s->rng, rng, sizeof rng);
    return KP_OK;
}
