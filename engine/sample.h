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
 *   - Logit biases (sample_set_bias) are added first, before the penalties.
 *   - sample_logprobs() gives log-softmax of the raw logits (for the API's
 *     `logprobs`), with the top-n ids.
 *
 * Details fixed by sample.c (see its header comment for the full list)
 *   - RNG: xoshiro256** seeded by splitmix64 from the seed; u = (next>>11)*2^-53.
 *     Each sample_next() with temperature > 0 consumes exactly one draw.
 *   - NaN logits are never chosen; all -inf (or all NaN) -> the lowest id that
 *     is not NaN (0 when all are -inf/NaN); +inf logits, if any, share all mass.
 *   - top-p keeps the smallest best-first prefix whose probability (softmax at
 *     temperature 1 over the candidates left by top-k) reaches top_p; min-p
 *     keeps p >= min_p * p_max (same softmax).
 *   - sample_accept() ignores ids outside [0, n_vocab).
 *   - Parameter ranges (sample_check_params): temperature [0, 2], top_p (0, 1],
 *     min_p [0, 1], repeat_penalty (0, 10], frequency/presence_penalty
 *     [-2, 2], penalty_last_n >= -1; top_k <= 0 or >= n_vocab is off.
 */
#ifndef KP_SAMPLE_H
#define KP_SAMPLE_H

#include <stdint.h>

#include "kernels/kp.h"

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

/* One logit bias (OpenAI's logit_bias): added to token id's logit before
 * the chain (penalties, greedy or top-k ...); a bias <= -100 bans the token
 * (its logit becomes -inf). */
typedef struct sample_bias {
    int32_t id;
    float bias;
} sample_bias;

typedef struct sampler sampler;

sample_params sample_default_params(void);
/* Validate ranges (temperature >= 0, top_p in (0,1], ...). */
int sample_check_params(const sample_params *p, kp_err *err);
int sample_new(sampler **out, const sample_params *p, int32_t n_vocab, kp_err *err);
void sample_free(sampler *s);
void sample_reset(sampler *s); /* forget history, re-seed (same resolved seed) */
void sample_accept(sampler *s, int32_t id);
/* The biases applied from the next sample_next() on (copied; n 0 clears).
 * Per request: not part of the saved state. KP_EINVAL for an id outside
 * [0, n_vocab) or a bias that is NaN, with the id in the message. */
int sample_set_bias(sampler *s, const sample_bias *bias, int n, kp_err *err);
int32_t sample_next(sampler *s, const float *logits /* [n_vocab] */);

/* Serialise the sampler's state (params, RNG + history) so a parked session
 * resumes exactly. sample_state_save() returns the bytes needed if buf is
 * NULL, KP_ERANGE if cap is too small, else 0. sample_state_load() replaces
 * params, seed, RNG and history of `s` (made with the same n_vocab, else
 * KP_EMISMATCH); a truncated, corrupt (checksum) or unknown-version state is
 * KP_EFORMAT and leaves `s` untouched. */
size_t sample_state_size(const sampler *s);
int sample_state_save(const sampler *s, void *buf, size_t cap);
int sample_state_load(sampler *s, const void *buf, size_t len, kp_err *err);

/* The seed in use (the OS-drawn one when params.seed was SAMPLE_SEED_RANDOM),
 * so a "random" run can be reported and reproduced. */
uint64_t sample_seed(const sampler *s);
const sample_params *sample_get_params(const sampler *s);
/* Change the chain's parameters, keeping the RNG position and the newest
 * penalty_last_n tokens of history (for a resumed session's next request).
 * p->seed is ignored: the RNG is not re-seeded. */
int sample_set_params(sampler *s, const sample_params *p, kp_err *err);
/* The logits after the penalties, exactly as sample_next() would see them
 * (for debugging, tests, or logprobs of the penalised distribution). */
void sample_penalized_logits(sampler *s, const float *logits, float *out /* [n_vocab] */);

/* log-softmax of logits; fills top_ids/top_lp with the n_top most likely
 * (descending, ties -> lower id first; slots past n_vocab get id -1 and
 * -inf). Returns the log-probability of `id` (NAN if id is out of range).
 * NaN logits get -inf. Allocates a small n_top-sized buffer. */
float sample_logprobs(const float *logits, int32_t n_vocab, int32_t id, int n_top,
                      int32_t *top_ids, float *top_lp);

#endif
