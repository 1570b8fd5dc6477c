/*
 * cmd_run.c — `kvpark run`: generate a continuation of a prompt and stream
 * it (only the new text, or the token ids with --ids) to stdout.
 *
 * A thin front end: options (tools/cli.h), model load, optional chat
 * template, tokenise, prefill, then sample token by token until the limit,
 * end of text or a full context; speeds go to stderr. Exit status 0, 1 on a
 * runtime error, 2 on bad usage.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/chat.h"
#include "engine/model.h"
#include "engine/sample.h"
#include "engine/tok.h"
#include "tools/cli.h"

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

int cmd_run(int argc, char **argv) {
    cli_model_opts co = {.kv_type = KP_TYPE_F32};
    const char *prompt = NULL, *tmpl_name = NULL;
    long n_predict = 128;
    bool ids_only = false, ignore_eos = false, chat = false;
    sample_params sp = sample_default_params();
    sp.seed = SAMPLE_SEED_RANDOM;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'}, {"prompt", required_argument, 0, 'p'},
        {"n-predict", required_argument, 0, 'n'}, {"threads", required_argument, 0, 't'},
        {"ctx", required_argument, 0, 'c'}, {"temp", required_argument, 0, CLI_OPT_TEMP},
        {"top-k", required_argument, 0, CLI_OPT_TOP_K}, {"top-p", required_argument, 0, CLI_OPT_TOP_P},
        {"min-p", required_argument, 0, CLI_OPT_MIN_P}, {"seed", required_argument, 0, CLI_OPT_SEED},
        {"repeat-penalty", required_argument, 0, CLI_OPT_REPEAT_PENALTY},
        {"frequency-penalty", required_argument, 0, CLI_OPT_FREQ_PENALTY},
        {"presence-penalty", required_argument, 0, CLI_OPT_PRES_PENALTY},
        {"ids", no_argument, 0, CLI_OPT_IDS}, {"ignore-eos", no_argument, 0, CLI_OPT_IGNORE_EOS},
        {"kv-type", required_argument, 0, CLI_OPT_KV_TYPE}, {"chat", no_argument, 0, CLI_OPT_CHAT},
        {"device", required_argument, 0, CLI_OPT_DEVICE},
        {"chat-template", required_argument, 0, CLI_OPT_CHAT_TEMPLATE},
        {"help", no_argument, 0, 'h'}, {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:p:n:t:c:h", lo, NULL)) != -1) {
        int r = cli_model_opt(c, optarg, &co);
        if (r < 0) return cli_usage_error("run", "bad option value");
        if (r > 0) continue;
        double d;
        long v;
        switch (c) {
        case 'p': prompt = optarg; break;
        case 'n':
            if (cli_parse_long(optarg, -1, 1 << 24, &n_predict)) return cli_usage_error("run", "bad -n");
            break;
        case CLI_OPT_TEMP:
            if (cli_parse_float(optarg, 0, 100, &d)) return cli_usage_error("run", "bad --temp");
            sp.temperature = (float)d;
            break;
        case CLI_OPT_TOP_K:
            if (cli_parse_long(optarg, 0, 1 << 24, &v)) return cli_usage_error("run", "bad --top-k");
            sp.top_k = (int32_t)v;
            break;
        case CLI_OPT_TOP_P:
            if (cli_parse_float(optarg, 0, 1, &d)) return cli_usage_error("run", "bad --top-p");
            sp.top_p = (float)d;
            break;
        case CLI_OPT_MIN_P:
            if (cli_parse_float(optarg, 0, 1, &d)) return cli_usage_error("run", "bad --min-p");
            sp.min_p = (float)d;
            break;
        case CLI_OPT_REPEAT_PENALTY:
            if (cli_parse_float(optarg, 0, 100, &d)) return cli_usage_error("run", "bad --repeat-penalty");
            sp.repeat_penalty = (float)d;
            break;
        case CLI_OPT_FREQ_PENALTY:
            if (cli_parse_float(optarg, -2, 2, &d)) return cli_usage_error("run", "bad --frequency-penalty");
            sp.frequency_penalty = (float)d;
            break;
        case CLI_OPT_PRES_PENALTY:
            if (cli_parse_float(optarg, -2, 2, &d)) return cli_usage_error("run", "bad --presence-penalty");
            sp.presence_penalty = (float)d;
            break;
        case CLI_OPT_SEED: {
            uint64_t s;
            if (cli_parse_u64(optarg, &s)) return cli_usage_error("run", "bad --seed");
            sp.seed = s;
            break;
        }
        case CLI_OPT_IDS: ids_only = true; break;
        case CLI_OPT_IGNORE_EOS: ignore_eos = true; break;
        case CLI_OPT_CHAT: chat = true; break;
        case CLI_OPT_CHAT_TEMPLATE: tmpl_name = optarg; break;
        case 'h': fputs(run_help, stdout); return 0;
        default: return cli_usage_error("run", "unknown option");
        }
    }
    if (!prompt) return cli_usage_error("run", "missing -p TEXT");
    if (optind < argc) return cli_usage_error("run", "unexpected argument");
    if (n_predict < 0) n_predict = 1 << 24;

    kp_err err = {0};
    model *m = NULL;
    int rc = cli_load_model(&co, &m, &err);
    if (rc) return cli_die(&err, rc);
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
    return cli_die(&err, rc);
}
