/*
 * quality.h — how a KV codec feels to a user: perplexity, top-1 agreement
 * and KL divergence when the context's KV is parked (encoded, LZ4'd) and
 * resumed (decoded) every N tokens, against the uncompressed run; and the
 * achieved size, counting every stored byte (issue 4).
 *
 * Method: the text is cut into windows of n_ctx tokens as llama-perplexity
 * does (eval.h). Each window is fed park_every tokens at a time; after each
 * step the whole cache so far is parked and resumed, cut into spans by
 * quality_park_layout(): the first `sink` rows and the last `window` rows
 * lossless, the rows between coded in chunks of `chunk` rows. The logits of the second half of each window are
 * compared with the uncompressed run's: PPL, top-1 agreement, mean
 * KL(p_ref || p_codec). Size = fp16 bytes of the parked KV / stored bytes
 * (chunk headers, scales, lossless sink and window tokens, after LZ4).
 */
#ifndef KP_QUALITY_H
#define KP_QUALITY_H

#include <stdint.h>

#include "compress/codec.h"
#include "engine/model.h"

typedef struct quality_opts {
    int n_ctx;        /* default 256 */
    int park_every;   /* default 64 */
    int chunk;        /* default 64 */
    int sink;         /* default 4 */
    int window;       /* default 64 */
    int max_chunks;   /* windows evaluated at most (0 = all) */
    int kv_type;      /* default F32 */
} quality_opts;

typedef struct quality_result {
    double ppl, ppl_ref;      /* with the codec / uncompressed */
    double agree;             /* top-1 agreement 0..1 */
    double kl;                /* mean KL(p_ref || p_codec), nats */
    double ratio;             /* fp16 bytes / stored bytes */
    double bytes_per_token_layer;
    double encode_gbps, decode_gbps; /* of reconstructed fp16 KV, one thread */
    int64_t n_scored;
    int n_windows;
    /* where the stored bytes go, in bits per parked value (fp16 bytes / 2
     * values); the first three add up to 16 / ratio: */
    double bits_lossless;     /* sink and window rows' payloads, after LZ4 */
    double bits_coded;        /* coded chunks' payloads (codes, scales), after LZ4 */
    double bits_headers;      /* 16-byte chunk headers (kept raw) */
    double bits_lz4_saved;    /* what LZ4 took off the payloads (not in the sum) */
} quality_result;

/* One span of a parked cache: rows [start, start + n), coded (1) through the
 * codec or stored lossless (0, codec "none", at the cache's element type). */
typedef struct quality_span {
    int start, n, coded;
} quality_span;

/* The parking layout of a cache of n_pos rows, shared with the session store:
 *   [0, S)            lossless (S = min(sink, n_pos)), cut into pieces of at
 *                     most `chunk` rows starting at 0 (one piece when sink <= chunk);
 *   [S, E)            coded, E = max(S, n_pos - window): chunks aligned at
 *                     S + k*chunk, the last one partial (< chunk rows) when E
 *                     cuts it;
 *   [E, n_pos)        lossless (the recent window), pieces of at most `chunk`
 *                     rows starting at E.
 * Spans come in row order, cover [0, n_pos) exactly, each with 1..chunk rows;
 * there are at most n_pos / chunk + 3 of them. Writes the first min(total,
 * max) spans (spans may be NULL when max is 0) and returns the total, or
 * KP_EINVAL for n_pos < 0, sink < 0, window < 0 or chunk outside 1..65535. */
int quality_park_layout(int n_pos, int sink, int window, int chunk, quality_span *spans, int max);

quality_opts quality_default_opts(void);
int quality_eval(model *m, const codec *c, const int32_t *tokens, int64_t n_tokens,
                 const quality_opts *o, quality_result *res, kp_err *err);
/* The codec shape of a model (for codec_open). */
codec_shape quality_codec_shape(model *m);

#endif
