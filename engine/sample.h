/*
 * sample.h — turn a logit vector into the next token id.
 *
 * Contract
 *   - A sampler is created from sample_params and owns its RNG (seeded from
 *     params.seed; seed 0xFFFFFFFF = random from the OS). Same seed + same
 *     logits sequence -> same tokens, on every platform (the RNG is a fixed
 *     algorithm, not rand()).
 *   - Order of the chain, as llama.cpp's default: penalties (repetition,
 *     frequency, presence over the last `penalty_last_n` tokens), then
 *     temperature <= 0 -> greedy (argmax, lowest id wins ties); otherwise
 *     top-k -> top-p -> min-p -> temperature -> softmax -> draw.
 *   - sample_accept() records a chosen token (prompt tokens too) so the
 *     penalties see it. The logits passed in are not modified.
 *   - sample_logprobs() gives log-softmax of the raw logits (for the API's
 *     `logprobs`), with the top-n ids.
 */
#ifndef KP_SAMPLE_H
#define KP_SAMPLE_H

#include <stdint.h>

#include "kp.h"

typedef struct sample_params {
    float temperature;   /* 0 = greedy; default 0.8 */
    int32_t top_k;       /* <= 0 = off; default 40 */
    float top_p;         /* 1 = off; default 0.95 */
    float min_p;         /* 0 = off; default 0.05 */
    float repeat_penalty;    /* 1 = off */
    float frequency_penalty; /* 0 = off */
    float presence_penalty;  /* 0 = off */
    int32_t penalty_last_n;  /* default 64; -1 = whole history */
    uint64_t seed;
} sample_params;

#define SAMPLE_SEED_RANDOM 0xFFFFFFFFull

typedef struct sampler sampler;

sample_params sample_default_params(void);
/* Validate ranges (temperature >= 0, top_p in (0,1], ...). */
int sample_check_params(const sample_params *p, kp_err *err);
int sample_new(sampler **out, const sample_params *p, int32_t n_vocab, kp_err *err);
void sample_free(sampler *s);
void sample_reset(sampler *s); /* forget history, re-seed */
void sample_accept(sampler *s, int32_t id);
int32_t sample_next(sampler *s, const float *logits /* [n_vocab] */);

/* Serialise the sampler's state (RNG + history) so a parked session resumes
 * exactly: returns bytes needed if buf is NULL. */
size_t sample_state_size(const sampler *s);
int sample_state_save(const sampler *s, void *buf, size_t cap);
int sample_state_load(sampler *s, const void *buf, size_t len, kp_err *err);

/* log-softmax of logits; fills top_ids/top_lp with the n_top most likely
 * (descending). Returns the log-probability of `id`. */
float sample_logprobs(const float *logits, int32_t n_vocab, int32_t id, int n_top,
                      int32_t *top_ids, float *top_lp);

#endif
