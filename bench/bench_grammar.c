/*
 * bench_grammar.c — `kvpark bench grammar` (contract in bench_grammar.h).
 *
 * The steps are a random walk through the grammar (a uniformly random
 * allowed token each step), which is what a random-weight model does and
 * which spends most steps inside strings, the states where the most tokens
 * are allowed; structural states are cheaper. Only the tokenizer is read for
 * the mask timing; the model is loaded only to time its decode step.
 */
#include "bench/bench_grammar.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "engine/gguf.h"
#include "engine/grammar.h"
#include "engine/kv.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "tools/cli.h"

static const struct {
    const char *name, *schema; /* schema NULL: json_object */
} bg_schemas[] = {
    {"json_object", NULL},
    {"person", "{\"type\":\"object\",\"properties\":{\"name\":{\"type\":\"string\"},\"age\":{\"type\":\"integer\"},"
               "\"email\":{\"type\":\"string\",\"maxLength\":40},\"ok\":{\"type\":\"boolean\"}},"
               "\"required\":[\"name\",\"age\",\"ok\"],\"additionalProperties\":false}"},
    {"event", "{\"type\":\"object\",\"properties\":{\"when\":{\"type\":\"string\",\"format\":\"date-time\"},"
              "\"id\":{\"type\":\"string\",\"format\":\"uuid\"},\"score\":{\"type\":[\"number\",\"null\"]},"
              "\"tags\":{\"type\":\"array\",\"items\":{\"type\":\"string\",\"maxLength\":8},\"maxItems\":4}},"
              "\"required\":[\"when\",\"id\",\"score\",\"tags\"]}"},
    {"colors", "{\"type\":\"array\",\"items\":{\"enum\":[\"red\",\"green\",\"blue\",\"cyan\",\"magenta\",null,7]},"
               "\"maxItems\":50}"},
};

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static uint64_t bg_rng(uint64_t *s) {
    *s = *s * 6364136223846793005ull + 1442695040888963407ull;
    return *s >> 33;
}

/* One random walk of n steps; the step times (seconds) go to t[0..n). */
static int walk(const gram *g, const gram_vocab *gv, int n, uint64_t seed, double *t, kp_err *err) {
    int32_t nv = gram_vocab_n(gv);
    uint32_t *mask = calloc((size_t)(nv + 31) / 32, sizeof(uint32_t));
    float *logits = malloc(sizeof(float) * (size_t)nv);
    int32_t *allowed = malloc(sizeof(int32_t) * (size_t)nv);
    gram_state *s = NULL;
    int rc = mask && logits && allowed ? gram_state_new(&s, g, gv, err) : kp_errf(err, KP_ENOMEM, "out of memory");
    for (int i = 0; i < n && !rc; i++) {
        for (int32_t k = 0; k < nv; k++) logits[k] = 0;
        double t0 = kp_now();
        int cnt = gram_mask(s, mask);
        gram_apply_mask(mask, logits, nv);
        /* the pick is not timed: it stands for the sampler */
        double t1 = kp_now();
        int na = 0;
        for (int32_t k = 0; k < nv; k++)
            if (mask[k / 32] >> (k % 32) & 1) allowed[na++] = k;
        if (cnt <= 0 || na == 0) {
            rc = kp_errf(err, KP_EINVAL, "grammar bench: no token allowed at step %d", i);
            break;
        }
        int32_t id = allowed[bg_rng(&seed) % (uint64_t)na];
        double t2 = kp_now();
        if (gram_state_accept_token(s, id)) {
            rc = kp_errf(err, KP_EINVAL, "grammar bench: allowed token %d was rejected", id);
            break;
        }
        double t3 = kp_now();
        t[i] = (t1 - t0) + (t3 - t2);
        /* a complete value (or, sometimes, an accepting one): start again */
        if (gram_state_complete(s) || (gram_state_accepting(s) && bg_rng(&seed) % 8 == 0)) {
            gram_state_free(s);
            s = NULL;
            rc = gram_state_new(&s, g, gv, err);
        }
    }
    gram_state_free(s);
    free(mask);
    free(logits);
    free(allowed);
    return rc;
}

/* Median seconds of one single-token decode step of the model. */
static int decode_step(const char *name, int threads, int steps, double *out, kp_err *err) {
    cli_model_opts co = {.model = name, .threads = threads};
    model *m = NULL;
    int rc = cli_load_model(&co, &m, err);
    if (rc) return rc;
    kv_cache *kv = NULL;
    rc = model_kv_new(m, &kv, KP_TYPE_F16, steps + 2, err);
    float *logits = malloc(sizeof(float) * (size_t)model_hp(m)->n_vocab);
    double *v = malloc(sizeof(double) * (size_t)(steps + 1));
    for (int i = 0; i <= steps && !rc; i++) {
        int32_t tk = 1 + i;
        model_seq q = {.kv = kv, .tokens = &tk, .n_tokens = 1, .logits = logits};
        double t0 = kp_now();
        rc = model_forward(m, &q, 1, err);
        v[i] = kp_now() - t0;
    }
    if (!rc) { /* step 0 is a warm-up */
        qsort(v + 1, (size_t)steps, sizeof(double), cmp_double);
        *out = v[1 + steps / 2];
    }
    free(v);
    free(logits);
    kv_free(kv);
    model_free(m);
    return rc;
}

int bench_grammar_main(int argc, char **argv) {
    const char *models = "../shared/models/stories260K.gguf,../shared/models/tiny-gpt2.gguf,"
                         "synthetic:qwen2.5-0.5b:Q8_0";
    const char *csv = "bench-out/grammar.csv";
    long steps = 300, dsteps = 8, threads = 0, seed = 1;
    static const struct option lo[] = {{"csv", required_argument, 0, 'C'},
                                       {"seed", required_argument, 0, 'S'},
                                       {"decode-steps", required_argument, 0, 'D'},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:n:t:h", lo, NULL)) != -1) {
        if (c == 'm') models = optarg;
        else if (c == 'n') {
            if (cli_parse_long(optarg, 1, 1000000, &steps)) return cli_usage_error("bench grammar", "bad -n");
        } else if (c == 't') {
            if (cli_parse_long(optarg, 0, 1024, &threads)) return cli_usage_error("bench grammar", "bad -t");
        } else if (c == 'D') {
            if (cli_parse_long(optarg, 0, 10000, &dsteps))
                return cli_usage_error("bench grammar", "bad --decode-steps");
        } else if (c == 'S') {
            if (cli_parse_long(optarg, 0, 1L << 62, &seed)) return cli_usage_error("bench grammar", "bad --seed");
        } else if (c == 'C') csv = optarg;
        else if (c == 'h') {
            puts("usage: kvpark bench grammar [-m MODEL,MODEL...] [-n STEPS] [--seed S]\n"
                 "       [--decode-steps N] [-t THREADS] [--csv FILE]\n"
                 "Per-decode-step cost of constrained decoding (token mask + apply + advance) on\n"
                 "each model's vocabulary for json_object and three schemas, as a random walk:\n"
                 "median, p99, max in µs, next to the model's decode step (--decode-steps 0: skip).\n"
                 "Defaults: stories260K, tiny-gpt2 and synthetic:qwen2.5-0.5b:Q8_0 (152K tokens),\n"
                 "-n 300, --decode-steps 8, CSV bench-out/grammar.csv.");
            return 0;
        } else return cli_usage_error("bench grammar", "unknown option");
    }
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", csv);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        if (*dir) mkdir(dir, 0755);
    }
    FILE *out = fopen(csv, "w");
    if (!out) {
        fprintf(stderr, "kvpark: cannot write '%s': %s\n", csv, strerror(errno));
        return 1;
    }
    fprintf(out, "model,n_vocab,schema,steps,median_us,p99_us,max_us,decode_ms\n");
    printf("| model | vocab | schema | steps | median µs | p99 µs | max µs | decode step ms | median %% of step |\n"
           "|---|---|---|---|---|---|---|---|---|\n");
    char list[2048];
    snprintf(list, sizeof list, "%s", models);
    kp_err err = {0};
    int rc = 0;
    double *t = malloc(sizeof(double) * (size_t)steps);
    if (!t) {
        fclose(out);
        return 1;
    }
    char *save = NULL;
    for (char *name = strtok_r(list, ",", &save); name && !rc; name = strtok_r(NULL, ",", &save)) {
        char path[1024];
        if ((rc = model_resolve(name, path, sizeof path, &err))) break;
        gguf_file *gf = NULL;
        tok_vocab *v = NULL;
        gram_vocab *gv = NULL;
        if ((rc = gguf_open(&gf, path, &err)) || (rc = tok_load(&v, gf, &err)) ||
            (rc = gram_vocab_new(&gv, v, &err))) {
            tok_free(v);
            gguf_close(gf);
            break;
        }
        double dec = 0;
        if (dsteps > 0 && (rc = decode_step(name, (int)threads, (int)dsteps, &dec, &err))) {
            gram_vocab_free(gv);
            tok_free(v);
            gguf_close(gf);
            break;
        }
        const char *mname = strrchr(name, '/') ? strrchr(name, '/') + 1 : name;
        for (size_t si = 0; si < sizeof bg_schemas / sizeof bg_schemas[0] && !rc; si++) {
            gram *g = NULL;
            rc = bg_schemas[si].schema ? gram_compile(&g, bg_schemas[si].schema, strlen(bg_schemas[si].schema), &err)
                                       : gram_compile_json_object(&g, &err);
            if (!rc) rc = walk(g, gv, (int)steps, (uint64_t)seed + si, t, &err);
            gram_free(g);
            if (rc) break;
            qsort(t, (size_t)steps, sizeof(double), cmp_double);
            double med = t[steps / 2] * 1e6, p99 = t[(size_t)((double)(steps - 1) * 0.99)] * 1e6,
                   mx = t[steps - 1] * 1e6;
            char pct[32] = "-", dms[32] = "-";
            if (dec > 0) {
                snprintf(pct, sizeof pct, "%.2f", med / (dec * 1e6) * 100);
                snprintf(dms, sizeof dms, "%.2f", dec * 1e3);
            }
            printf("| %s | %d | %s | %ld | %.1f | %.1f | %.1f | %s | %s |\n", mname, gram_vocab_n(gv),
                   bg_schemas[si].name, steps, med, p99, mx, dms, pct);
            fprintf(out, "%s,%d,%s,%ld,%.2f,%.2f,%.2f,%.3f\n", mname, gram_vocab_n(gv), bg_schemas[si].name, steps,
                    med, p99, mx, dec * 1e3);
            fflush(stdout);
        }
        gram_vocab_free(gv);
        tok_free(v);
        gguf_close(gf);
    }
    free(t);
    fclose(out);
    if (rc) return cli_die(&err, rc);
    fprintf(stderr, "kvpark: wrote %s\n", csv);
    return 0;
}
