/*
 * bench_engine.c — `kvpark bench engine`: prefill (ppN) and decode (tgN)
 * tokens/s of the engine alone, the median of --repeats runs after one
 * warm-up, per thread count, like llama-bench (contract in bench_engine.h).
 *
 * Why: the number to compare with llama.cpp on the same model and machine,
 * without HTTP, batching or sessions in the way (bench serve measures those).
 * Each run uses a fresh KV cache and pseudo-random token ids, so repeats and
 * machines see the same work.
 */
#include "bench/bench_engine.h"

#include <errno.h>
#include <getopt.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/kv.h"
#include "engine/model.h"
#include "tools/cli.h"

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* At depth d (d tokens already in the cache, prefilled untimed, as
 * llama-bench's -d): prefill of n_p tokens and decode of n_g tokens, as
 * llama-bench's pp/tg tests (pseudo-random token ids). */
static int bench_once(model *m, int depth, int n_p, int n_g, int kv_type, double *pp_s, double *tg_s,
                      kp_err *err) {
    const model_hparams *hp = model_hp(m);
    kv_cache *kv = NULL;
    int rc = model_kv_new(m, &kv, kv_type, depth + KP_MAX(n_p, n_g) + 1, err);
    if (rc) return rc;
    const int n_ids = KP_MAX(depth, KP_MAX(n_p, 1));
    int32_t *toks = malloc(sizeof *toks * (size_t)n_ids);
    float *logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    if (!toks || !logits) rc = kp_errf(err, KP_ENOMEM, "bench: out of memory");
    uint64_t s = 42;
    for (int i = 0; !rc && i < n_ids; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)((s >> 33) % (uint64_t)hp->n_vocab);
    }
    *pp_s = *tg_s = 0;
    if (!rc && depth > 0) { /* the context the timed part starts from, untimed */
        model_seq q = {.kv = kv, .tokens = toks, .n_tokens = depth, .logits = logits};
        rc = model_forward(m, &q, 1, err);
    }
    if (!rc && n_p > 0) {
        model_seq q = {.kv = kv, .tokens = toks, .n_tokens = n_p, .logits = logits};
        double t0 = kp_now();
        rc = model_forward(m, &q, 1, err);
        *pp_s = kp_now() - t0;
    }
    if (!rc && n_g > 0) {
        kv_truncate(kv, depth);
        int32_t t = 1;
        double t0 = kp_now();
        for (int i = 0; i < n_g && !rc; i++) {
            model_seq q = {.kv = kv, .tokens = &t, .n_tokens = 1, .logits = logits};
            rc = model_forward(m, &q, 1, err);
        }
        *tg_s = kp_now() - t0;
    }
    free(toks);
    free(logits);
    kv_free(kv);
    return rc;
}

int bench_engine_main(int argc, char **argv) {
    cli_model_opts co = {.kv_type = KP_TYPE_F16};
    const char *csv = "bench-out/engine.csv", *plist = "128,512", *nlist = "128,512",
               *tlist = NULL, *dlist = "0";
    long reps = 5;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"kv-type", required_argument, 0, CLI_OPT_KV_TYPE},
        {"csv", required_argument, 0, CLI_OPT_CSV}, {"repeats", required_argument, 0, 'r'},
        {"threads-list", required_argument, 0, CLI_OPT_THREADS_LIST}, {"device", required_argument, 0, CLI_OPT_DEVICE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:n:d:r:h", lo, NULL)) != -1) {
        int r = cli_model_opt(c, optarg, &co);
        if (r < 0) return cli_usage_error("bench", "bad option value");
        if (r > 0) continue;
        if (c == 'p') plist = optarg;
        else if (c == 'n') nlist = optarg;
        else if (c == 'd') dlist = optarg;
        else if (c == 'r') {
            if (cli_parse_long(optarg, 1, 1000, &reps)) return cli_usage_error("bench", "bad -r");
        } else if (c == CLI_OPT_CSV) csv = optarg;
        else if (c == CLI_OPT_THREADS_LIST) tlist = optarg;
        else if (c == 'h') {
            puts("usage: kvpark bench engine [-m MODEL] [-p 128,512] [-n 128,512] [-d 0,2048] [-r 5]\n"
                 "       [--threads-list 1,2] [--kv-type f16] [--csv FILE]\n"
                 "Prefill (pp) and decode (tg) tokens/s, median of -r repeats, like llama-bench.\n"
                 "-d: depths, tokens already in the context when the timed part starts\n"
                 "(prefilled untimed; llama-bench's -d), default 0.");
            return 0;
        } else return cli_usage_error("bench", "unknown option");
    }
    int threads[16], n_threads = 0;
    char buf[256];
    if (tlist) {
        snprintf(buf, sizeof buf, "%s", tlist);
        for (char *tok = strtok(buf, ","); tok && n_threads < 16; tok = strtok(NULL, ",")) {
            long v;
            if (cli_parse_long(tok, 1, 1024, &v)) return cli_usage_error("bench", "bad --threads-list");
            threads[n_threads++] = (int)v;
        }
    } else {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads[n_threads++] = 1;
        if (nc > 1) threads[n_threads++] = (int)nc;
    }
    int sizes[3][16], n_sizes[3] = {0, 0, 0}; /* pp sizes, tg sizes, depths */
    const char *lists[3] = {plist, nlist, dlist};
    for (int k = 0; k < 3; k++) {
        snprintf(buf, sizeof buf, "%s", lists[k]);
        for (char *tok = strtok(buf, ","); tok && n_sizes[k] < 16; tok = strtok(NULL, ",")) {
            long v;
            if (cli_parse_long(tok, 0, 1 << 20, &v)) return cli_usage_error("bench", "bad -p/-n/-d list");
            if (v > 0 || k == 2) sizes[k][n_sizes[k]++] = (int)v;
        }
    }
    if (n_sizes[2] == 0) return cli_usage_error("bench", "bad -p/-n/-d list");
    /* CSV output directory */
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", csv);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        mkdir(dir, 0755);
    }
    FILE *out = fopen(csv, "w");
    if (!out) {
        fprintf(stderr, "kvpark: cannot write '%s': %s\n", csv, strerror(errno));
        return 1;
    }
    fprintf(out, "model,test,threads,kv_type,tokens,repeats,median_tok_s,min_tok_s,max_tok_s,depth\n");
    printf("| model | test | threads | tok/s (median of %ld) | min | max |\n|---|---|---|---|---|---|\n",
           reps);
    kp_err err = {0};
    int rc = 0;
    for (int ti = 0; ti < n_threads && !rc; ti++) {
        cli_model_opts o = co;
        o.threads = threads[ti];
        o.n_batch = 4096;
        model *m = NULL;
        if ((rc = cli_load_model(&o, &m, &err))) break;
        const char *mname = strrchr(model_path(m), '/');
        mname = mname ? mname + 1 : model_path(m);
        for (int di = 0; di < n_sizes[2] && !rc; di++) {
            const int depth = sizes[2][di];
            for (int k = 0; k < 2 && !rc; k++) {
                for (int si = 0; si < n_sizes[k] && !rc; si++) {
                    int n = sizes[k][si];
                    double pp, tg, v[1000];
                    /* warm-up */
                    if ((rc = bench_once(m, depth, k == 0 ? n : 0, k == 1 ? n : 0, o.kv_type, &pp, &tg,
                                         &err)))
                        break;
                    for (int r = 0; r < reps && !rc; r++) {
                        rc = bench_once(m, depth, k == 0 ? n : 0, k == 1 ? n : 0, o.kv_type, &pp, &tg,
                                        &err);
                        v[r] = n / (k == 0 ? pp : tg);
                    }
                    if (rc) break;
                    double med = median(v, (int)reps);
                    char test[48];
                    if (depth > 0) snprintf(test, sizeof test, "%s%d @ d%d", k == 0 ? "pp" : "tg", n, depth);
                    else snprintf(test, sizeof test, "%s%d", k == 0 ? "pp" : "tg", n);
                    printf("| %s | %s | %d | %.0f | %.0f | %.0f |\n", mname, test, threads[ti], med, v[0],
                           v[reps - 1]);
                    fprintf(out, "%s,%s,%d,%s,%d,%ld,%.1f,%.1f,%.1f,%d\n", mname, test, threads[ti],
                            kp_type_name(o.kv_type), n, reps, med, v[0], v[reps - 1], depth);
                    fflush(stdout);
                }
            }
        }
        model_free(m);
    }
    fclose(out);
    if (rc) return cli_die(&err, rc);
    fprintf(stderr, "kvpark: wrote %s\n", csv);
    return 0;
}
