/*
 * quality.h — how a KV codec feels to a user: perplexity, top-1 agreement
 * and KL divergence when the context's KV is parked (encoded, LZ4'd) and
 * resumed (decoded) every N tokens, against the uncompressed run; and the
 * achieved size, counting every stored byte.
 *
 * Method: the text is cut into windows of n_ctx tokens as llama-perplexity
 * does (eval.h). Each window is fed park_every tokens at a time; after each
 * step the whole cache so far is parked and resumed, cut into spans by the
 * parking layout (compress/layout.h): the first `sink` rows and the last
 * `window` rows lossless, the rows between coded in chunks of `chunk` rows.
 * The logits of the second half of each window are
 * compared with the uncompressed run's: PPL, top-1 agreement, mean
 * KL(p_ref || p_codec). Size = fp16 bytes of the parked KV / stored bytes
 * (chunk headers, scales, lossless sink and window tokens, after LZ4).
 */
#ifndef KP_QUALITY_H
#define KP_QUALITY_H

#include <stdatomic.h>
#include <stdint.h>

#include "compress/codec.h"
#include "compress/layout.h"
#include "engine/model.h"

typedef struct quality_opts {
    int n_ctx;        /* default 256 */
    int park_every;   /* default 64 */
    int chunk;        /* the parking layout's (layout.h): default LAYOUT_DEFAULT_CHUNK */
    int sink;         /* default LAYOUT_DEFAULT_SINK */
    int window;       /* default LAYOUT_DEFAULT_WINDOW */
    int max_chunks;   /* windows evaluated at most (0 = all) */
    int kv_type;      /* default F16: the server's and llama.cpp's cache, so codec "none" is ~1x */
    const atomic_int *cancel; /* non-NULL and set: stop before the next window (KP_ECANCELED) */
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

quality_opts quality_default_opts(void);
int quality_eval(model *m, const codec *c, const int32_t *tokens, int64_t n_tokens,
                 const quality_opts *o, quality_result *res, kp_err *err);
/* What parking one cache of n_pos rows under layout lay stores, before LZ4
 * (which can only make it smaller): coded spans through c, lossless spans
 * through codec "none" at kv_type, one chunk header per span, for every
 * layer's K and V of shape sh. *ratio = fp16 bytes of those rows / stored
 * bytes; *fixed_bytes (may be NULL) = the bytes that do not depend on c
 * (lossless rows and every header), *coded_values (may be NULL) = values in
 * coded spans. This is the end-to-end ratio a user reads off a parked
 * session of n_pos tokens. KP_EINVAL for a bad layout or n_pos < 1. */
int quality_layout_ratio(const codec *c, const codec_shape *sh, const layout *lay, int n_pos, int kv_type,
                         double *ratio, double *fixed_bytes, double *coded_values, kp_err *err);
/* The context codec measurements use unless told (ppl --codec, bench codec:
 * the same as plain ppl): 512, or the model's training context if smaller. */
#define QUALITY_DEFAULT_CTX 512
int quality_ctx_for(model *m);
/* The codec shape of a model (for codec_open). */
codec_shape quality_codec_shape(model *m);

#endif
