/*
 * eval.c — perplexity as llama-perplexity computes it (see eval.h).
 */
#include "engine/eval.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

eval_ppl_opts eval_default_ppl_opts(void) {
    eval_ppl_opts o = {.n_ctx = 512, .n_batch = 2048, .kv_type = KP_TYPE_F32};
    return o;
}

double eval_log_softmax_at(const float *logits, int n_vocab, int target) {
    float max = logits[0];
    for (int i = 1; i < n_vocab; i++)
        if (logits[i] > max) max = logits[i];
    double sum = 0;
    for (int i = 0; i < n_vocab; i++) sum += exp((double)logits[i] - max);
    return (double)logits[target] - max - log(sum);
}

int eval_ppl(model *m, const int32_t *tokens, int64_t n_tokens, const eval_ppl_opts *opts,
             eval_ppl_result *res, kp_err *err) {
    eval_ppl_opts o = opts ? *opts : eval_default_ppl_opts();
    memset(res, 0, sizeof *res);
    const model_hparams *hp = model_hp(m);
    const int n_ctx = o.n_ctx, nv = hp->n_vocab;
    if (n_ctx < 4) return kp_errf(err, KP_EINVAL, "ppl: context %d is too small (>= 4)", n_ctx);
    int n_chunks = (int)(n_tokens / n_ctx);
    if (o.max_chunks > 0 && n_chunks > o.max_chunks) n_chunks = o.max_chunks;
    if (n_chunks == 0)
        return kp_errf(err, KP_EINVAL,
                       "ppl: the text has %lld tokens, fewer than one context of %d: use a longer "
                       "file or a smaller -c",
                       (long long)n_tokens, n_ctx);
    int32_t bos = tok_bos(model_vocab(m));
    int per_batch = KP_MAX(1, o.n_batch / n_ctx);
    if (per_batch > n_chunks) per_batch = n_chunks;

    kv_cache **kv = calloc((size_t)per_batch, sizeof *kv);
    model_seq *seqs = calloc((size_t)per_batch, sizeof *seqs);
    int32_t *buf = malloc(sizeof *buf * (size_t)per_batch * n_ctx);
    const int first = n_ctx / 2; /* only the second half of each window is scored */
    /* logits of the scored positions only: [per_batch][n_ctx - first][n_vocab] */
    float *logits = malloc(sizeof *logits * (size_t)per_batch * (size_t)(n_ctx - first) * nv);
    int rc = 0;
    if (!kv || !seqs || !buf || !logits) {
        rc = kp_errf(err, KP_ENOMEM, "ppl: out of memory for %d x %d logits", per_batch * n_ctx, nv);
        goto done;
    }
    for (int i = 0; i < per_batch; i++)
        if ((rc = model_kv_new(m, &kv[i], o.kv_type, n_ctx, err))) goto done;

    double nll_total = 0;
    int64_t count = 0;
    double t0 = kp_now();
    for (int c0 = 0; c0 < n_chunks; c0 += per_batch) {
        int nb = KP_MIN(per_batch, n_chunks - c0);
        for (int i = 0; i < nb; i++) {
            int32_t *t = buf + (size_t)i * n_ctx;
            memcpy(t, tokens + (size_t)(c0 + i) * n_ctx, sizeof *t * n_ctx);
            if (bos >= 0) t[0] = bos;
            kv_truncate(kv[i], 0);
            seqs[i] = (model_seq){.kv = kv[i], .tokens = t, .n_tokens = n_ctx, .all_logits = true,
                                  .logits_from = first, .logits = logits + (size_t)i * (n_ctx - first) * nv};
        }
        if ((rc = model_forward(m, seqs, nb, err))) goto done;
        for (int i = 0; i < nb; i++) {
            const int32_t *orig = tokens + (size_t)(c0 + i) * n_ctx;
            double nll = 0;
            for (int j = first; j < n_ctx - 1; j++)
                nll -= eval_log_softmax_at(seqs[i].logits + (size_t)(j - first) * nv, nv, orig[j + 1]);
            nll_total += nll;
            count += n_ctx - 1 - first;
            if (o.on_chunk) o.on_chunk(o.ud, c0 + i, n_chunks, nll, n_ctx - 1 - first);
        }
    }
    res->seconds = kp_now() - t0;
    res->n_chunks = n_chunks;
    res->n_scored = count;
    res->nll_mean = nll_total / (double)count;
    res->ppl = exp(res->nll_mean);
    res->tokens_per_second = (double)n_chunks * n_ctx / res->seconds;
done:
    if (kv)
        for (int i = 0; i < per_batch; i++) kv_free(kv[i]);
    free(kv);
    free(seqs);
    free(buf);
    free(logits);
    return rc;
}
