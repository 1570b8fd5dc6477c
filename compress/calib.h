/*
 * calib.h — fit the learned KV encoder of a model on calibration text and
 * write the codec file.
 *
 * Method (DESIGN.md "The KV codec"): run the model over calibration text
 * with a probe (model_set_probe) collecting, per layer, keys BEFORE RoPE,
 * values, and the statistics the fit needs: the query covariance per KV head
 * group (keys matter through q.k) and W_O's columns (values matter through
 * W_O v), and a sample of the rows weighted by the attention they draw.
 * Per layer and per K/V: centre, whiten by the importance weight, PCA
 * (closed form), measure each layer's and K/V's sensitivity (held-out KL),
 * allocate bits per latent dimension and per layer / K-V to meet the target
 * (or the smallest size meeting a held-out Δppl bound), refine the decoder
 * and encoder with the quantiser in the loop where the held-out KL says it
 * helps, validate on the held-out slice, write the codec file. calib.c has
 * the why and the measurements.
 *
 * The codec file is a GGUF container (engine/gguf.h) with `kvpark.codec.*`
 * keys and per-layer tensors, bound to the model's fingerprint; codec_open()
 * accepts its path.
 */
#ifndef KP_CALIB_H
#define KP_CALIB_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>

#include "compress/codec.h"
#include "engine/model.h"

typedef struct calib_opts {
    int n_ctx;            /* calibration window (default 256) */
    int64_t max_tokens;   /* calibration tokens used at most (default 131072) */
    double bits;          /* target average bits per KV value in coded chunks (default 2.0);
                             ignored when ratio > 0 */
    double ratio;         /* > 0: the end-to-end target instead: fp16 bytes / stored bytes of one
                             n_ctx-token cache parked under this layout (quality_layout_ratio:
                             lossless sink and window rows, headers, scales, codes); the bits
                             follow from it, and one refit corrects them. 0: use bits */
    /* the parking layout the codec is fitted for (compress/layout.h; written into the codec file) */
    int chunk;            /* tokens per chunk (default LAYOUT_DEFAULT_CHUNK) */
    int sink;             /* first S tokens kept lossless (default LAYOUT_DEFAULT_SINK) */
    int window;           /* last W tokens kept lossless (default LAYOUT_DEFAULT_WINDOW) */
    int kind;             /* CODEC_LEARNED (weighted, pre-RoPE keys) or CODEC_PCA (post-RoPE, plain) */
    double k_weight;      /* learned: bit-allocation weight of the keys' relative error against
                             the values' when sensitivity is not measured (sens 0, or no held-out
                             window), and for the sensitivity probe (default 4: on stories260K,
                             ppl --codec at 2 bits/value had KL 0.056 / 0.036 / 0.040 for
                             weights 1 / 4 / 8) */
    int ranges;           /* learned: 1 (default) fixed quantiser ranges from calibration (latents
                             scaled to unit variance, no side info in chunks); 0 per-chunk fp16
                             min/step per latent (4 bytes per latent per chunk); pca: always 0 */
    int progress;         /* 1: progress bar on a tty / lines otherwise */
    /* learned (all default on; see calib.c for the measurements). The held-out quality runs
     * they need take one whole n_ctx window of held-out text (the last 10%): without it
     * refine and sens do nothing and max_dppl is an error. */
    int refine;           /* ranges 1: decoder refit with the quantised latents in the loop
                             (unbiased closed form), then an encoder step and the decoder again;
                             kept only if the held-out KL falls */
    int sens;             /* 1: bits follow each layer's and K/V's MEASURED sensitivity (held-out
                             next-token KL per unit of weighted error); 0: k_weight for keys */
    double max_dppl;      /* > 0: search (bisection over the bit budget) for the smallest codec
                             whose held-out delta ppl (%) is <= max_dppl; bits is then ignored */
    double max_kl;        /* > 0: the same search with held-out KL (nats) <= max_kl as the bound
                             (what the server's own calibration uses: Δppl can fall under lossy
                             coding, KL cannot); not with max_dppl or ratio */
    int attn;             /* 1: rows weighted by the attention they receive from queries at
                             distance >= window (what their coding error costs) */
    int park_every;       /* held-out quality runs (sensitivity, max_dppl): park every N (64) */
    const double *sens_scale; /* [2 * n_layer] (K of layer l at 2l, V at 2l+1): multiplies the
                             measured sensitivities; NULL = 1 (tests make a layer "more sensitive") */
    FILE *log;            /* human-readable tables (allocation, refinement, search); NULL: quiet */
    /* progress of the long steps (collecting statistics, each fit and held-out
     * run, each search step): called every few seconds and at each step's end
     * with what is being done, done/total units and the seconds left (< 0:
     * unknown). NULL: none (progress above still prints). */
    void (*on_progress)(void *ud, const char *what, int64_t done, int64_t total, double eta_s);
    void *progress_ud;
    const atomic_int *cancel; /* non-NULL and set: stop at the next window (KP_ECANCELED), nothing written */
} calib_opts;

typedef struct calib_report {
    int64_t tokens_used;
    double seconds;
    double bits_per_value; /* achieved average over coded chunks, scales included */
    double rel_err_k, rel_err_v; /* held-out relative weighted reconstruction error */
    double rel_err_k_pca, rel_err_v_pca; /* the same for the PCA start (before refinement;
                                            equal to the above when refinement kept nothing) */
    double target_bits;    /* the bit budget used (max_dppl: the one the search chose) */
    double ratio_e2e;      /* what a user reads: fp16 bytes / stored bytes of one n_ctx-token cache
                              parked with the written codec under its layout, before LZ4 */
    int n_ctx;             /* the context ratio_e2e is for (o->n_ctx capped by the model's) */
    int64_t heldout_start, heldout_tokens; /* the held-out slice: tokens[start, start + n) */
    /* held-out quality of the written codec (quality_eval with chunk, sink, window,
     * park_every, F16 cache; measured for 'learned' when the held-out slice has a whole
     * window, else 0): delta ppl in %, KL, ratio vs fp16 */
    double heldout_dppl, heldout_kl, heldout_ratio;
    int search_steps;      /* max_dppl: codecs evaluated */
} calib_report;

calib_opts calib_default_opts(void);
int calib_run(model *m, const int32_t *tokens, size_t n_tokens, const calib_opts *o,
              const char *out_path, calib_report *rep, kp_err *err);

/* Weighted relative reconstruction error of codec c on text (held-out or
 * evaluation text, never the calibration text): the model runs over tokens
 * in windows of n_ctx, every window's K and V are round-tripped through c in
 * chunks of `chunk` rows (F32), and
 *   rel_k = sum (dk^T M_k dk) / sum ((k - mean)^T M_k (k - mean))   keys before RoPE,
 *   rel_v = the same with M_v = W_O^T W_O blocks,
 * M_k from this text's queries (see calib.c). */
int calib_codec_error(model *m, const codec *c, const int32_t *tokens, size_t n_tokens, int n_ctx,
                      int chunk, double *rel_k, double *rel_v, kp_err *err);

/* Greedy bit allocation of the learned codec with Gaussian latents (the
 * fixed quantiser's distortion table): lam [n_coders][d] the normalised
 * variances of each coder's latents (descending), sens [n_coders] the weight
 * of each coder's relative error (NULL: 1). Steps b -> b+1 of one latent are
 * taken by largest weighted distortion drop per bit while the average stays
 * within target bits per value (chunks of `chunk` rows, no side info); every
 * coder keeps >= 1 latent of >= 1 bit. bits: out [n_coders][d], 0 = dropped. */
void calib_allocate_bits(const double *lam, const double *sens, int n_coders, int d, int chunk,
                         double target, uint8_t *bits);

/* Symmetric eigen-decomposition by cyclic Jacobi rotations: a [n][n] is
 * destroyed; evals [n] descending; evecs [n][n] with eigenvector j in column
 * j (largest-magnitude entry positive). Returns 0. */
int calib_jacobi_eig(double *a, int n, double *evals, double *evecs);

#endif
