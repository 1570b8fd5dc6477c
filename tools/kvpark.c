/*
 * main.c — the `kvpark` command: one binary, thin subcommands over the modules.
 *
 *   kvpark run       -m MODEL -p TEXT [-n N] [--temp T] ...   generate text
 *   kvpark tokenize  -m MODEL [--no-bos] TEXT                  print token ids
 *   kvpark ppl       -m MODEL -f FILE [-c CTX] [-b BATCH]      perplexity
 *   kvpark bench engine -m MODEL                               prefill/decode speed
 *   kvpark serve     [-m MODEL] [--port 8080] ...              the OpenAI-compatible server
 *
 * Each subcommand parses its options, loads the model, calls the engine and
 * prints. Errors go to stderr as "kvpark: <message>" with exit status 1
 * (2 for bad usage).
 */
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/chat.h"
#include "engine/eval.h"
#include "engine/model.h"
#include "engine/sample.h"
#include "engine/synth.h"
#include "engine/tok.h"
#include "compress/calib.h"
#include "compress/quality.h"
#include "bench/bench_serve.h"
#include "bench/bench_resume.h"
#include "server/http.h"

static int die(const kp_err *e, int rc) {
    fprintf(stderr, "kvpark: %s\n", e->msg[0] ? e->msg : kp_strerror(rc));
    return 1;
}

static int usage_error(const char *cmd, const char *msg) {
    fprintf(stderr, "kvpark %s: %s (see 'kvpark %s --help')\n", cmd, msg, cmd);
    return 2;
}

/* Parse a number option strictly: the whole string must be a number in range. */
static int parse_long(const char *s, long lo, long hi, long *out) {
    char *end;
    errno = 0;
    long v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* A byte size: a number with an optional K, M, G or T suffix (powers of
 * 1024; "KiB"/"KB" spellings and a trailing "B" accepted). */
static int parse_size(const char *s, uint64_t *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || !isfinite(v) || v < 0) return -1;
    double mul = 1;
    switch (*end) {
    case 'k': case 'K': mul = 1024.0; end++; break;
    case 'm': case 'M': mul = 1024.0 * 1024; end++; break;
    case 'g': case 'G': mul = 1024.0 * 1024 * 1024; end++; break;
    case 't': case 'T': mul = 1024.0 * 1024 * 1024 * 1024; end++; break;
    default: break;
    }
    if (mul > 1 && *end == 'i') end++;
    if (*end == 'B' || *end == 'b') end++;
    if (*end || v * mul > 1.8e19) return -1;
    *out = (uint64_t)(v * mul);
    return 0;
}

static int parse_float(const char *s, double lo, double hi, double *out) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end || !isfinite(v) || v < lo || v > hi) return -1;
    *out = v;
    return 0;
}

/* Options shared by the subcommands that load a model. */
typedef struct common_opts {
    const char *model;
    const char *device; /* cpu | cuda | auto (NULL = auto) */
    int threads;
    int n_ctx;
    int kv_type;
    int n_batch;
} common_opts;

enum {
    OPT_TEMP = 1000, OPT_TOP_K, OPT_TOP_P, OPT_MIN_P, OPT_SEED, OPT_IDS, OPT_KV_TYPE, OPT_NO_BOS,
    OPT_REPEAT_PENALTY, OPT_FREQ_PENALTY, OPT_PRES_PENALTY, OPT_IGNORE_EOS, OPT_CHUNKS, OPT_CSV,
    OPT_NO_PARSE_SPECIAL, OPT_REPEATS, OPT_THREADS_LIST, OPT_CHAT, OPT_CHAT_TEMPLATE, OPT_TYPE,
    OPT_HOST, OPT_PORT, OPT_PARALLEL, OPT_QUEUE, OPT_API_KEY, OPT_API_KEY_FILE, OPT_METRICS_KEY,
    OPT_MAX_BODY, OPT_MAX_TOKENS, OPT_SESSION_DIR, OPT_TIMEOUT, OPT_QUIET, OPT_DEVICE, OPT_MAX_SESSIONS,
    OPT_CODEC, OPT_HOT_SESSIONS, OPT_HOT_BUDGET, OPT_WARM_BUDGET, OPT_COLD_BUDGET, OPT_IDLE_PARK,
};

/* Handle an option common to model-loading commands; 1 if consumed, -1 on a bad value. */
static int common_opt(int c, const char *arg, common_opts *co) {
    long v;
    switch (c) {
    case 'm': co->model = arg; return 1;
    case 't':
        if (parse_long(arg, 0, 1024, &v)) return -1;
        co->threads = (int)v;
        return 1;
    case 'c':
        if (parse_long(arg, 4, 1 << 24, &v)) return -1;
        co->n_ctx = (int)v;
        return 1;
    case 'b':
        if (parse_long(arg, 1, 1 << 20, &v)) return -1;
        co->n_batch = (int)v;
        return 1;
    case OPT_KV_TYPE:
        co->kv_type = kv_type_from_name(arg);
        return co->kv_type < 0 ? -1 : 1;
    case OPT_DEVICE:
        if (strcmp(arg, "cpu") && strcmp(arg, "cuda") && strcmp(arg, "auto")) return -1;
        co->device = arg;
        return 1;
    }
    return 0;
}

static int load_model(const common_opts *co, model **m, kp_err *err) {
    char path[1024];
    int rc = model_resolve(co->model, path, sizeof path, err);
    if (rc) return rc;
    model_opts mo = model_default_opts();
    mo.n_threads = co->threads;
    mo.backend = co->device ? co->device : "auto";
    if (co->n_batch > 0) mo.n_batch = co->n_batch;
    return model_load(m, path, &mo, err);
}

/* ------------------------------------------------------------------ */
/* kvpark run                                                          */

static const char *run_help =
    "usage: kvpark run [-m MODEL] -p TEXT [options]\n"
    "Generate a continuation of TEXT and stream it (only the new text) to stdout.\n"
    "  -m, --model PATH       GGUF model (default: $KVPARK_MODEL, models/*.gguf,\n"
    "                         ../shared/models/stories260K.gguf); synthetic:NAME[:TYPE] for a\n"
    "                         random-weight model of a real shape\n"
    "  -p, --prompt TEXT      the prompt\n"
    "  -n, --n-predict N      tokens to generate (default 128)\n"
    "      --temp T           temperature; 0 = greedy (default 0.8)\n"
    "      --top-k K          (default 40; 0 = off)\n"
    "      --top-p P          (default 0.95; 1 = off)\n"
    "      --min-p P          (default 0.05; 0 = off)\n"
    "      --repeat-penalty R, --frequency-penalty F, --presence-penalty P\n"
    "      --seed S           RNG seed (default: random)\n"
    "      --chat             treat TEXT as a user message and apply the chat template\n"
    "      --chat-template T  chatml | llama2 | llama3 | plain (default: from the model)\n"
    "      --ignore-eos       keep generating past end-of-text\n"
    "      --ids              print generated token ids (space-separated) instead of text\n"
    "  -c, --ctx N            context length (default: the model's, at most 4096)\n"
    "      --kv-type T        f32 | f16 | bf16 (default f32)\n"
    "  -t, --threads N        CPU threads (default: all cores)\n"
    "      --device D         cpu | cuda | auto (default auto: cuda when a GPU is present)\n";

static int cmd_run(int argc, char **argv) {
    common_opts co = {.kv_type = KP_TYPE_F32};
    const char *prompt = NULL, *tmpl_name = NULL;
    long n_predict = 128;
    bool ids_only = false, ignore_eos = false, chat = false;
    sample_params sp = sample_default_params();
    sp.seed = SAMPLE_SEED_RANDOM;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"n-predict", required_argument, 0, 'n'}, {"threads", required_argument, 0, 't'},
        {"ctx", required_argument, 0, 'c'}, {"temp", required_argument, 0, OPT_TEMP},
        {"top-k", required_argument, 0, OPT_TOP_K}, {"top-p", required_argument, 0, OPT_TOP_P},
        {"min-p", required_argument, 0, OPT_MIN_P}, {"seed", required_argument, 0, OPT_SEED},
        {"repeat-penalty", required_argument, 0, OPT_REPEAT_PENALTY},
        {"frequency-penalty", required_argument, 0, OPT_FREQ_PENALTY},
        {"presence-penalty", required_argument, 0, OPT_PRES_PENALTY},
        {"ids", no_argument, 0, OPT_IDS}, {"ignore-eos", no_argument, 0, OPT_IGNORE_EOS},
        {"kv-type", required_argument, 0, OPT_KV_TYPE}, {"chat", no_argument, 0, OPT_CHAT},
        {"device", required_argument, 0, OPT_DEVICE},
        {"chat-template", required_argument, 0, OPT_CHAT_TEMPLATE},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:n:t:c:h", lo, NULL)) != -1) {
        int r = common_opt(c, optarg, &co);
        if (r < 0) return usage_error("run", "bad option value");
        if (r > 0) continue;
        double d;
        long v;
        switch (c) {
        case 'p': prompt = optarg; break;
        case 'n':
            if (parse_long(optarg, -1, 1 << 24, &n_predict)) return usage_error("run", "bad -n");
            break;
        case OPT_TEMP:
            if (parse_float(optarg, 0, 100, &d)) return usage_error("run", "bad --temp");
            sp.temperature = (float)d;
            break;
        case OPT_TOP_K:
            if (parse_long(optarg, 0, 1 << 24, &v)) return usage_error("run", "bad --top-k");
            sp.top_k = (int32_t)v;
            break;
        case OPT_TOP_P:
            if (parse_float(optarg, 0, 1, &d)) return usage_error("run", "bad --top-p");
            sp.top_p = (float)d;
            break;
        case OPT_MIN_P:
            if (parse_float(optarg, 0, 1, &d)) return usage_error("run", "bad --min-p");
            sp.min_p = (float)d;
            break;
        case OPT_REPEAT_PENALTY:
            if (parse_float(optarg, 0, 100, &d)) return usage_error("run", "bad --repeat-penalty");
            sp.repeat_penalty = (float)d;
            break;
        case OPT_FREQ_PENALTY:
            if (parse_float(optarg, -2, 2, &d)) return usage_error("run", "bad --frequency-penalty");
            sp.frequency_penalty = (float)d;
            break;
        case OPT_PRES_PENALTY:
            if (parse_float(optarg, -2, 2, &d)) return usage_error("run", "bad --presence-penalty");
            sp.presence_penalty = (float)d;
            break;
        case OPT_SEED: {
            char *end;
            errno = 0;
            unsigned long long s = strtoull(optarg, &end, 10);
            if (errno || *end || end == optarg) return usage_error("run", "bad --seed");
            sp.seed = s;
            break;
        }
        case OPT_IDS: ids_only = true; break;
        case OPT_IGNORE_EOS: ignore_eos = true; break;
        case OPT_CHAT: chat = true; break;
        case OPT_CHAT_TEMPLATE: tmpl_name = optarg; break;
        case 'h': fputs(run_help, stdout); return 0;
        default: return usage_error("run", "unknown option");
        }
    }
    if (!prompt) return usage_error("run", "missing -p TEXT");
    if (optind < argc) return usage_error("run", "unexpected argument");
    if (n_predict < 0) n_predict = 1 << 24;

    kp_err err = {0};
    model *m = NULL;
    int rc = load_model(&co, &m, &err);
    if (rc) return die(&err, rc);
    const tok_vocab *vocab = model_vocab(m);
    const model_hparams *hp = model_hp(m);
    if ((rc = sample_check_params(&sp, &err))) goto fail;

    char *text = NULL;
    bool parse_special = false;
    if (chat) {
        int t = tmpl_name ? chat_template_from_name(tmpl_name)
                          : (int)chat_template_detect(model_chat_template(m));
        if (t < 0) {
            rc = kp_errf(&err, KP_EINVAL, "unknown chat template '%s'", tmpl_name);
            goto fail;
        }
        chat_msg msg = {.role = "user", .content = prompt};
        int32_t b = tok_bos(vocab), e = tok_eos(vocab);
        if ((rc = chat_apply((enum chat_template)t, &msg, 1, true, b >= 0 ? tok_text(vocab, b) : "",
                             e >= 0 ? tok_text(vocab, e) : "", &text, &err)))
            goto fail;
        parse_special = true;
    }
    int32_t *ids = NULL;
    size_t n_ids = 0;
    const char *src = text ? text : prompt;
    if ((rc = tok_encode(vocab, src, strlen(src), true, parse_special, &ids, &n_ids, &err))) {
        free(text);
        goto fail;
    }
    free(text);
    if (n_ids == 0) {
        rc = kp_errf(&err, KP_EINVAL, "the prompt is empty after tokenisation");
        free(ids);
        goto fail;
    }
    int n_ctx = co.n_ctx > 0 ? co.n_ctx : KP_MIN(hp->n_ctx_train, 4096);
    if ((long)n_ids + n_predict > n_ctx) n_predict = n_ctx - (long)n_ids;
    if (n_predict <= 0) {
        rc = kp_errf(&err, KP_ERANGE, "the prompt has %zu tokens: no room left in a context of %d",
                     n_ids, n_ctx);
        free(ids);
        goto fail;
    }
    kv_cache *kv = NULL;
    sampler *smp = NULL;
    float *logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    if (!logits || (rc = model_kv_new(m, &kv, co.kv_type, n_ctx, &err)) ||
        (rc = sample_new(&smp, &sp, hp->n_vocab, &err))) {
        if (!rc) rc = kp_errf(&err, KP_ENOMEM, "out of memory");
        free(ids);
        free(logits);
        kv_free(kv);
        goto fail;
    }
    for (size_t i = 0; i < n_ids; i++) sample_accept(smp, ids[i]);

    double t0 = kp_now();
    model_seq seq = {.kv = kv, .tokens = ids, .n_tokens = (int)n_ids, .logits = logits};
    rc = model_forward(m, &seq, 1, &err);
    double t_prompt = kp_now() - t0;
    int n_gen = 0;
    char piece[256];
    double t1 = kp_now();
    while (!rc && n_gen < n_predict) {
        int32_t next = sample_next(smp, logits);
        sample_accept(smp, next);
        if (!ignore_eos && tok_is_eog(vocab, next)) break;
        n_gen++;
        if (ids_only) {
            printf(n_gen > 1 ? " %d" : "%d", next);
        } else {
            int len = tok_piece(vocab, next, false, piece, sizeof piece);
            if (len > 0) fwrite(piece, 1, (size_t)KP_MIN(len, (int)sizeof piece), stdout);
        }
        fflush(stdout);
        if (n_gen >= n_predict) break;
        seq = (model_seq){.kv = kv, .tokens = &next, .n_tokens = 1, .logits = logits};
        rc = model_forward(m, &seq, 1, &err);
    }
    double t_gen = kp_now() - t1;
    printf("\n");
    fprintf(stderr, "kvpark: prompt %zu tokens in %.2f ms (%.0f tok/s); generated %d tokens in %.2f ms "
            "(%.0f tok/s); %d threads\n",
            n_ids, t_prompt * 1e3, n_ids / t_prompt, n_gen, t_gen * 1e3,
            n_gen > 0 ? n_gen / t_gen : 0.0, kp_backend_threads(model_backend(m)));
    sample_free(smp);
    kv_free(kv);
    free(logits);
    free(ids);
    if (rc) goto fail;
    model_free(m);
    return 0;
fail:
    model_free(m);
    return die(&err, rc);
}

/* ------------------------------------------------------------------ */
/* kvpark tokenize                                                     */

static int cmd_tokenize(int argc, char **argv) {
    common_opts co = {0};
    bool add_bos = true, parse_special = true;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"no-bos", no_argument, 0, OPT_NO_BOS},
                                       {"no-parse-special", no_argument, 0, OPT_NO_PARSE_SPECIAL},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", lo, NULL)) != -1) {
        if (c == 'm') co.model = optarg;
        else if (c == OPT_NO_BOS) add_bos = false;
        else if (c == OPT_NO_PARSE_SPECIAL) parse_special = false;
        else if (c == 'h') {
            puts("usage: kvpark tokenize [-m MODEL] [--no-bos] [--no-parse-special] TEXT\n"
                 "Print the token ids of TEXT, space-separated.");
            return 0;
        } else return usage_error("tokenize", "unknown option");
    }
    if (optind != argc - 1) return usage_error("tokenize", "expected exactly one TEXT argument");
    const char *text = argv[optind];
    kp_err err = {0};
    char path[1024];
    int rc = model_resolve(co.model, path, sizeof path, &err);
    if (rc) return die(&err, rc);
    /* Only the vocabulary is needed: no weights, no backend. */
    gguf_file *gf = NULL;
    tok_vocab *v = NULL;
    if ((rc = gguf_open(&gf, path, &err)) || (rc = tok_load(&v, gf, &err))) {
        gguf_close(gf);
        return die(&err, rc);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    rc = tok_encode(v, text, strlen(text), add_bos, parse_special, &ids, &n, &err);
    if (!rc) {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    tok_free(v);
    gguf_close(gf);
    return rc ? die(&err, rc) : 0;
}

/* ------------------------------------------------------------------ */
/* kvpark ppl                                                          */

typedef struct ppl_progress {
    double t0;
    double nll;
    int64_t n;
    bool tty;
} ppl_progress;

static void ppl_on_chunk(void *ud, int chunk, int n_chunks, double nll, int n_scored) {
    ppl_progress *p = ud;
    p->nll += nll;
    p->n += n_scored;
    double el = kp_now() - p->t0;
    double eta = el / (chunk + 1) * (n_chunks - chunk - 1);
    if (p->tty)
        fprintf(stderr, "\r[%d/%d] ppl so far %.4f, %.0f s left   ", chunk + 1, n_chunks,
                exp(p->nll / (double)p->n), eta);
    else if ((chunk + 1) % 100 == 0 || chunk + 1 == n_chunks)
        fprintf(stderr, "[%d/%d] ppl so far %.4f\n", chunk + 1, n_chunks, exp(p->nll / (double)p->n));
}

static int cmd_ppl(int argc, char **argv) {
    /* with a codec: parked-and-resumed perplexity (compress/quality.c) */
    for (int i = 1; i < argc; i++)
        if (!strcmp(argv[i], "--codec") || !strncmp(argv[i], "--codec=", 8)) return quality_ppl_main(argc, argv);
    common_opts co = {.kv_type = KP_TYPE_F32, .n_ctx = 512};
    const char *file = NULL;
    long max_chunks = 0;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"file", required_argument, 0, 'f'},
        {"ctx", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, OPT_KV_TYPE},
        {"chunks", required_argument, 0, OPT_CHUNKS}, {"device", required_argument, 0, OPT_DEVICE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = common_opt(c, optarg, &co);
        if (r < 0) return usage_error("ppl", "bad option value");
        if (r > 0) continue;
        if (c == 'f') file = optarg;
        else if (c == OPT_CHUNKS) {
            if (parse_long(optarg, 0, 1 << 30, &max_chunks)) return usage_error("ppl", "bad --chunks");
        } else if (c == 'h') {
            puts("usage: kvpark ppl [-m MODEL] -f TEXTFILE [-c CTX] [-b BATCH] [--chunks N]\n"
                 "       [--kv-type f32|f16|bf16] [-t THREADS]\n"
                 "       [--codec NAME|FILE [--park-every N] [--sink S] [--window W] [--chunk C]]\n"
                 "Perplexity as llama-perplexity computes it: non-overlapping windows of CTX\n"
                 "tokens (default 512), scoring the second half of each. Ends with 'ppl = X'.");
            return 0;
        } else return usage_error("ppl", "unknown option");
    }
    if (!file) return usage_error("ppl", "missing -f TEXTFILE");
    kp_err err = {0};
    FILE *fp = fopen(file, "rb");
    if (!fp) {
        fprintf(stderr, "kvpark: cannot open '%s': %s\n", file, strerror(errno));
        return 1;
    }
    fseek(fp, 0, SEEK_END);
    long sz = ftell(fp);
    rewind(fp);
    char *text = malloc((size_t)sz + 1);
    if (!text || fread(text, 1, (size_t)sz, fp) != (size_t)sz) {
        fclose(fp);
        free(text);
        fprintf(stderr, "kvpark: cannot read '%s'\n", file);
        return 1;
    }
    fclose(fp);
    model *m = NULL;
    int rc = load_model(&co, &m, &err);
    if (rc) {
        free(text);
        return die(&err, rc);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    double tt = kp_now();
    rc = tok_encode(model_vocab(m), text, (size_t)sz, true, false, &ids, &n, &err);
    free(text);
    if (rc) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens (tokenised in %.2f s); model %s\n", file, n,
            kp_now() - tt, model_desc(m));
    eval_ppl_opts po = eval_default_ppl_opts();
    po.n_ctx = co.n_ctx;
    po.kv_type = co.kv_type;
    po.max_chunks = (int)max_chunks;
    if (co.n_batch > 0) po.n_batch = KP_MAX(co.n_batch, co.n_ctx);
    ppl_progress prog = {.t0 = kp_now(), .tty = isatty(2)};
    po.on_chunk = ppl_on_chunk;
    po.ud = &prog;
    eval_ppl_result res;
    rc = eval_ppl(m, ids, (int64_t)n, &po, &res, &err);
    if (prog.tty) fprintf(stderr, "\n");
    if (!rc) {
        printf("chunks = %d\nscored = %lld\ntokens_per_second = %.0f\nppl = %.4f\n", res.n_chunks,
               (long long)res.n_scored, res.tokens_per_second, res.ppl);
    }
out:
    free(ids);
    model_free(m);
    return rc ? die(&err, rc) : 0;
}

/* ------------------------------------------------------------------ */
/* kvpark bench engine                                                 */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double median(double *v, int n) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* Prefill of n_p tokens and decode of n_g tokens on a fresh cache, as
 * llama-bench's pp/tg tests (random token ids). */
static int bench_once(model *m, int n_p, int n_g, int kv_type, double *pp_s, double *tg_s,
                      kp_err *err) {
    const model_hparams *hp = model_hp(m);
    kv_cache *kv = NULL;
    int rc = model_kv_new(m, &kv, kv_type, KP_MAX(n_p, n_g) + 1, err);
    if (rc) return rc;
    int32_t *toks = malloc(sizeof *toks * (size_t)KP_MAX(n_p, 1));
    float *logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    uint64_t s = 42;
    for (int i = 0; i < n_p; i++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        toks[i] = (int32_t)((s >> 33) % (uint64_t)hp->n_vocab);
    }
    *pp_s = *tg_s = 0;
    if (n_p > 0) {
        model_seq q = {.kv = kv, .tokens = toks, .n_tokens = n_p, .logits = logits};
        double t0 = kp_now();
        rc = model_forward(m, &q, 1, err);
        *pp_s = kp_now() - t0;
    }
    if (!rc && n_g > 0) {
        kv_truncate(kv, 0);
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

static int cmd_bench(int argc, char **argv) {
    if (argc >= 2 && !strcmp(argv[1], "serve")) return bench_serve_main(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "codec")) return quality_bench_main(argc - 1, argv + 1);
    if (argc >= 2 && !strcmp(argv[1], "resume")) return bench_resume_main(argc - 1, argv + 1);
    if (argc < 2 || strcmp(argv[1], "engine") != 0) {
        fprintf(stderr, "usage: kvpark bench engine [-m MODEL] [-p 128,512] [-n 128,512] [-r 5]\n"
                        "       [--threads-list 1,2] [--kv-type f16] [--csv FILE]\n"
                        "       kvpark bench serve [-m MODEL] [--clients 1,8,32] ... (--help)\n"
                        "       kvpark bench codec [-m MODEL] -f EVALTEXT [--calib TEXT] ... (--help)\n"
                        "       kvpark bench resume [-m MODEL] [--codec none,int8,FILE] ... (--help)\n");
        return 2;
    }
    argc--;
    argv++;
    common_opts co = {.kv_type = KP_TYPE_F16};
    const char *csv = "bench-out/engine.csv", *plist = "128,512", *nlist = "128,512",
               *tlist = NULL;
    long reps = 5;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"kv-type", required_argument, 0, OPT_KV_TYPE},
        {"csv", required_argument, 0, OPT_CSV}, {"repeats", required_argument, 0, 'r'},
        {"threads-list", required_argument, 0, OPT_THREADS_LIST}, {"device", required_argument, 0, OPT_DEVICE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:n:r:h", lo, NULL)) != -1) {
        int r = common_opt(c, optarg, &co);
        if (r < 0) return usage_error("bench", "bad option value");
        if (r > 0) continue;
        if (c == 'p') plist = optarg;
        else if (c == 'n') nlist = optarg;
        else if (c == 'r') {
            if (parse_long(optarg, 1, 1000, &reps)) return usage_error("bench", "bad -r");
        } else if (c == OPT_CSV) csv = optarg;
        else if (c == OPT_THREADS_LIST) tlist = optarg;
        else if (c == 'h') {
            puts("usage: kvpark bench engine [-m MODEL] [-p 128,512] [-n 128,512] [-r 5]\n"
                 "       [--threads-list 1,2] [--kv-type f16] [--csv FILE]\n"
                 "Prefill (pp) and decode (tg) tokens/s, median of -r repeats, like llama-bench.");
            return 0;
        } else return usage_error("bench", "unknown option");
    }
    int threads[16], n_threads = 0;
    char buf[256];
    if (tlist) {
        snprintf(buf, sizeof buf, "%s", tlist);
        for (char *tok = strtok(buf, ","); tok && n_threads < 16; tok = strtok(NULL, ",")) {
            long v;
            if (parse_long(tok, 1, 1024, &v)) return usage_error("bench", "bad --threads-list");
            threads[n_threads++] = (int)v;
        }
    } else {
        long nc = sysconf(_SC_NPROCESSORS_ONLN);
        threads[n_threads++] = 1;
        if (nc > 1) threads[n_threads++] = (int)nc;
    }
    int sizes[2][16], n_sizes[2] = {0, 0};
    const char *lists[2] = {plist, nlist};
    for (int k = 0; k < 2; k++) {
        snprintf(buf, sizeof buf, "%s", lists[k]);
        for (char *tok = strtok(buf, ","); tok && n_sizes[k] < 16; tok = strtok(NULL, ",")) {
            long v;
            if (parse_long(tok, 0, 1 << 20, &v)) return usage_error("bench", "bad -p/-n list");
            if (v > 0) sizes[k][n_sizes[k]++] = (int)v;
        }
    }
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
    fprintf(out, "model,test,threads,kv_type,tokens,repeats,median_tok_s,min_tok_s,max_tok_s\n");
    printf("| model | test | threads | tok/s (median of %ld) | min | max |\n|---|---|---|---|---|---|\n",
           reps);
    kp_err err = {0};
    int rc = 0;
    for (int ti = 0; ti < n_threads && !rc; ti++) {
        common_opts o = co;
        o.threads = threads[ti];
        o.n_batch = 4096;
        model *m = NULL;
        if ((rc = load_model(&o, &m, &err))) break;
        const char *mname = strrchr(model_path(m), '/');
        mname = mname ? mname + 1 : model_path(m);
        for (int k = 0; k < 2 && !rc; k++) {
            for (int si = 0; si < n_sizes[k] && !rc; si++) {
                int n = sizes[k][si];
                double pp, tg, v[1000];
                /* warm-up */
                if ((rc = bench_once(m, k == 0 ? n : 0, k == 1 ? n : 0, o.kv_type, &pp, &tg, &err)))
                    break;
                for (int r = 0; r < reps && !rc; r++) {
                    rc = bench_once(m, k == 0 ? n : 0, k == 1 ? n : 0, o.kv_type, &pp, &tg, &err);
                    v[r] = n / (k == 0 ? pp : tg);
                }
                if (rc) break;
                double med = median(v, (int)reps);
                char test[32];
                snprintf(test, sizeof test, "%s%d", k == 0 ? "pp" : "tg", n);
                printf("| %s | %s | %d | %.0f | %.0f | %.0f |\n", mname, test, threads[ti], med, v[0],
                       v[reps - 1]);
                fprintf(out, "%s,%s,%d,%s,%d,%ld,%.1f,%.1f,%.1f\n", mname, test, threads[ti],
                        kp_type_name(o.kv_type), n, reps, med, v[0], v[reps - 1]);
                fflush(stdout);
            }
        }
        model_free(m);
    }
    fclose(out);
    if (rc) return die(&err, rc);
    fprintf(stderr, "kvpark: wrote %s\n", csv);
    return 0;
}


/* ------------------------------------------------------------------ */
/* kvpark serve                                                        */

static const char *serve_help =
    "usage: kvpark serve [-m MODEL] [options]\n"
    "OpenAI-compatible HTTP server (chat/completions, completions, models, sessions,\n"
    "health, metrics). Stops cleanly on SIGINT/SIGTERM.\n"
    "  -m, --model PATH         GGUF model (default lookup as for 'kvpark run')\n"
    "      --host ADDR          IPv4 address to listen on (default 127.0.0.1)\n"
    "      --port N             TCP port (default 8080)\n"
    "      --parallel N         sequences decoded together (default 4)\n"
    "      --queue N            requests waiting before 429 (default 64)\n"
    "  -c, --ctx N              context per sequence (default: the model's, at most 4096)\n"
    "      --kv-type T          f32 | f16 | bf16 (default f32)\n"
    "  -t, --threads N          CPU threads (default: all cores)\n"
    "      --device D           cpu | cuda | auto (default auto: cuda when a GPU is present)\n"
    "      --api-key KEY        require 'Authorization: Bearer KEY' (repeatable)\n"
    "      --api-key-file FILE  one key per line (blank lines and # comments ignored)\n"
    "      --metrics-key KEY    also protect /health and /metrics with this key\n"
    "      --max-body BYTES     largest request body (default 8388608)\n"
    "      --max-tokens N       default max_tokens when a request gives none\n"
    "                           (default: until end of text or the context is full)\n"
    "Sessions and their tiers (hot: live KV; warm: compressed in RAM; cold: on disk):\n"
    "      --cold-dir DIR       where parked and saved sessions live (default ./sessions;\n"
    "                           --session-dir is the same option)\n"
    "      --codec C            codec for parked sessions: none (lossless, default), fp16,\n"
    "                           int8, int4, kivi2, or a codec file from 'kvpark calibrate'\n"
    "      --hot-sessions N     hot sessions at most, then the least recently used idle\n"
    "                           ones are parked (default 0: no count limit)\n"
    "      --hot-budget SIZE    bytes of hot KV at most (default 2G; 0: no limit)\n"
    "      --warm-budget SIZE   bytes of parked sessions kept in RAM (default 1G); the\n"
    "                           least recently used go down to disk\n"
    "      --cold-budget SIZE   bytes on disk (default 0: unlimited); over it the least\n"
    "                           recently used sessions are dropped (logged, counted)\n"
    "      --idle-park S        park sessions idle for S seconds (default 0: only on\n"
    "                           budget pressure); fractions allowed\n"
    "      --max-sessions N     sessions held in all tiers at most (default 1024), then 429\n"
    "  SIZE: bytes, or a number with K, M, G or T (powers of 1024), e.g. 512M\n"
    "      --chat-template T    chatml | llama2 | llama3 | plain (default: from the model)\n"
    "      --timeout S          idle connection timeout in seconds (default 60)\n"
    "      --quiet              no per-request log lines\n";

static char *key_store[HTTP_MAX_KEYS];

static int read_key_file(const char *path, http_opts *o) {
    FILE *f = fopen(path, "r");
    if (!f) {
        fprintf(stderr, "kvpark: cannot open --api-key-file '%s': %s\n", path, strerror(errno));
        return -1;
    }
    char line[1024];
    while (fgets(line, sizeof line, f)) {
        char *p = line;
        while (*p == ' ' || *p == '\t') p++;
        size_t n = strcspn(p, "\r\n");
        while (n > 0 && (p[n - 1] == ' ' || p[n - 1] == '\t')) n--;
        p[n] = 0;
        if (!*p || *p == '#') continue;
        if (o->n_keys >= HTTP_MAX_KEYS) {
            fprintf(stderr, "kvpark: more than %d API keys\n", HTTP_MAX_KEYS);
            fclose(f);
            return -1;
        }
        key_store[o->n_keys] = strdup(p);
        o->keys[o->n_keys] = key_store[o->n_keys];
        o->n_keys++;
    }
    fclose(f);
    return 0;
}

static int cmd_serve(int argc, char **argv) {
    common_opts co = {.kv_type = KP_TYPE_F32};
    http_opts ho = http_default_opts();
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"ctx", required_argument, 0, 'c'},
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, OPT_KV_TYPE},
        {"host", required_argument, 0, OPT_HOST}, {"port", required_argument, 0, OPT_PORT},
        {"parallel", required_argument, 0, OPT_PARALLEL}, {"queue", required_argument, 0, OPT_QUEUE},
        {"api-key", required_argument, 0, OPT_API_KEY},
        {"api-key-file", required_argument, 0, OPT_API_KEY_FILE},
        {"metrics-key", required_argument, 0, OPT_METRICS_KEY},
        {"max-body", required_argument, 0, OPT_MAX_BODY},
        {"max-tokens", required_argument, 0, OPT_MAX_TOKENS},
        {"session-dir", required_argument, 0, OPT_SESSION_DIR},
        {"cold-dir", required_argument, 0, OPT_SESSION_DIR},
        {"max-sessions", required_argument, 0, OPT_MAX_SESSIONS},
        {"codec", required_argument, 0, OPT_CODEC},
        {"hot-sessions", required_argument, 0, OPT_HOT_SESSIONS},
        {"hot-budget", required_argument, 0, OPT_HOT_BUDGET},
        {"warm-budget", required_argument, 0, OPT_WARM_BUDGET},
        {"cold-budget", required_argument, 0, OPT_COLD_BUDGET},
        {"idle-park", required_argument, 0, OPT_IDLE_PARK},
        {"chat-template", required_argument, 0, OPT_CHAT_TEMPLATE},
        {"timeout", required_argument, 0, OPT_TIMEOUT}, {"quiet", no_argument, 0, OPT_QUIET},
        {"device", required_argument, 0, OPT_DEVICE},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:c:t:h", lo, NULL)) != -1) {
        int r = common_opt(c, optarg, &co);
        if (r < 0) return usage_error("serve", "bad option value");
        if (r > 0) continue;
        long v;
        switch (c) {
        case OPT_HOST: ho.host = optarg; break;
        case OPT_PORT:
            if (parse_long(optarg, 0, 65535, &v)) return usage_error("serve", "bad --port");
            ho.port = (int)v;
            break;
        case OPT_PARALLEL:
            if (parse_long(optarg, 1, 1024, &v)) return usage_error("serve", "bad --parallel (1..1024)");
            ho.n_parallel = (int)v;
            break;
        case OPT_QUEUE:
            if (parse_long(optarg, 0, 1 << 20, &v)) return usage_error("serve", "bad --queue");
            ho.queue_max = (int)v;
            break;
        case OPT_API_KEY:
            if (ho.n_keys >= HTTP_MAX_KEYS || !*optarg) return usage_error("serve", "bad --api-key");
            ho.keys[ho.n_keys++] = optarg;
            break;
        case OPT_API_KEY_FILE:
            if (read_key_file(optarg, &ho)) return 1;
            break;
        case OPT_METRICS_KEY: ho.metrics_key = optarg; break;
        case OPT_MAX_BODY:
            if (parse_long(optarg, 1024, 1L << 32, &v)) return usage_error("serve", "bad --max-body");
            ho.max_body = (size_t)v;
            break;
        case OPT_MAX_TOKENS:
            if (parse_long(optarg, 1, 1 << 24, &v)) return usage_error("serve", "bad --max-tokens");
            ho.max_tokens_default = (int)v;
            break;
        case OPT_SESSION_DIR: ho.session_dir = optarg; break;
        case OPT_MAX_SESSIONS:
            if (parse_long(optarg, 1, 1 << 24, &v)) return usage_error("serve", "bad --max-sessions");
            ho.max_sessions = (int)v;
            break;
        case OPT_CHAT_TEMPLATE: ho.chat_template = optarg; break;
        case OPT_CODEC: ho.codec = optarg; break;
        case OPT_HOT_SESSIONS:
            if (parse_long(optarg, 0, 1 << 24, &v)) return usage_error("serve", "bad --hot-sessions");
            ho.hot_sessions = (int)v;
            break;
        case OPT_HOT_BUDGET:
            if (parse_size(optarg, &ho.hot_budget)) return usage_error("serve", "bad --hot-budget (e.g. 4G)");
            break;
        case OPT_WARM_BUDGET:
            if (parse_size(optarg, &ho.warm_budget)) return usage_error("serve", "bad --warm-budget (e.g. 1G)");
            break;
        case OPT_COLD_BUDGET:
            if (parse_size(optarg, &ho.cold_budget)) return usage_error("serve", "bad --cold-budget (e.g. 100G)");
            break;
        case OPT_IDLE_PARK: {
            double d;
            if (parse_float(optarg, 0, 1e9, &d)) return usage_error("serve", "bad --idle-park (seconds)");
            ho.idle_park_s = d;
            break;
        }
        case OPT_TIMEOUT:
            if (parse_long(optarg, 1, 86400, &v)) return usage_error("serve", "bad --timeout");
            ho.timeout_s = (int)v;
            break;
        case OPT_QUIET: ho.quiet = 1; break;
        case 'h': fputs(serve_help, stdout); return 0;
        default: return usage_error("serve", "unknown option");
        }
    }
    if (optind < argc) return usage_error("serve", "unexpected argument");
    kp_err err = {0};
    char path[1024];
    int rc = model_resolve(co.model, path, sizeof path, &err);
    if (rc) return die(&err, rc);
    ho.model = path;
    ho.n_threads = co.threads;
    ho.device = co.device;
    ho.n_ctx = co.n_ctx;
    ho.kv_type = co.kv_type;
    rc = http_serve(&ho, &err);
    for (int i = 0; i < HTTP_MAX_KEYS; i++) free(key_store[i]);
    return rc ? die(&err, rc) : 0;
}

/* ------------------------------------------------------------------ */

static const char *main_help =
    "kvpark " KVPARK_VERSION " — an LLM inference engine that parks idle conversations\n"
    "usage: kvpark COMMAND [options]   (kvpark COMMAND --help for details)\n"
    "  serve      the OpenAI-compatible HTTP server\n"
    "  run        generate text from a prompt\n"
    "  tokenize   print the token ids of a text\n"
    "  ppl        perplexity of a model on a text file (--codec: parked and resumed)\n"
    "  calibrate  fit the learned KV codec of a model on calibration text\n"
    "  bench      benchmarks: bench engine | serve | codec | resume\n"
    "  version    print the version\n";

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        fputs(main_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    if (!strcmp(cmd, "run")) return cmd_run(argc - 1, argv + 1);
    if (!strcmp(cmd, "serve")) return cmd_serve(argc - 1, argv + 1);
    if (!strcmp(cmd, "tokenize")) return cmd_tokenize(argc - 1, argv + 1);
    if (!strcmp(cmd, "ppl")) return cmd_ppl(argc - 1, argv + 1);
    if (!strcmp(cmd, "bench")) return cmd_bench(argc - 1, argv + 1);
    if (!strcmp(cmd, "calibrate")) return calib_main(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("kvpark %s\n", KVPARK_VERSION);
        return 0;
    }
    fprintf(stderr, "kvpark: unknown command '%s'\n%s", cmd, main_help);
    return 2;
}
