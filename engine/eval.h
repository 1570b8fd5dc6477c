/*
 * eval.h — measuring a model on text: perplexity exactly as llama.cpp's
 * `llama-perplexity` computes it.
 *
 * Method (llama-perplexity, default settings): the caller tokenises the whole
 * file with BOS; it is cut into floor(n_tokens / n_ctx) non-overlapping
 * chunks of n_ctx tokens; each chunk's first token is replaced with BOS; each
 * chunk runs on a fresh KV cache; positions n_ctx/2 .. n_ctx-2 are scored on
 * predicting the next token; PPL = exp(mean negative log-likelihood).
 * Several chunks run together as sequences of one batch (n_batch / n_ctx of
 * them), which changes nothing numerically.
 *
 * A hook lets a caller transform the KV cache between steps (the codec's
 * "park every N tokens" evaluation plugs in here later).
 */
#ifndef KP_EVAL_H
#define KP_EVAL_H

#include <stdint.h>

#include "engine/model.h"

typedef struct eval_ppl_opts {
    int n_ctx;        /* default 512 */
    int n_batch;      /* tokens per forward call (>= n_ctx: several chunks at once); default 2048 */
    int kv_type;      /* default F32 */
    int max_chunks;   /* 0 = all */
    /* called after each chunk: chunk index, its NLL sum and count; may be NULL */
    void (*on_chunk)(void *ud, int chunk, int n_chunks, double nll, int n_scored);
    void *ud;
} eval_ppl_opts;

typedef struct eval_ppl_result {
    double ppl;
    double nll_mean;
    int64_t n_scored;
    int n_chunks;
    double seconds;
    double tokens_per_second;
} eval_ppl_result;

eval_ppl_opts eval_default_ppl_opts(void);
/* log p(target | logits), computed in double as llama.cpp does. */
double eval_log_softmax_at(const float *logits, int n_vocab, int target);
int eval_ppl(model *m, const int32_t *tokens, int64_t n_tokens, const eval_ppl_opts *opts,
             eval_ppl_result *res, kp_err *err);

#endif
