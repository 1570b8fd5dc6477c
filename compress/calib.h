/*
 * calib.h — fit the learned KV encoder of a model on calibration text and
 * write the codec file (issue 4).
 *
 * Method (DESIGN.md "The KV codec"): run the model over calibration text
 * with a probe (model_set_probe) collecting, per layer, keys BEFORE RoPE,
 * values, and the statistics the fit needs: the query covariance per KV head
 * group (keys matter through q.k) and W_O's columns (values matter through
 * W_O v). Per layer and per K/V: centre, whiten by the importance weight,
 * PCA (closed form; refined by gradient steps where it helps), allocate bits
 * per latent dimension (and per layer / K-V) to meet the target, validate on
 * a held-out slice, write the codec file.
 *
 * The codec file is a GGUF container (engine/gguf.h) with `kvpark.codec.*`
 * keys and per-layer tensors, bound to the model's fingerprint; codec_open()
 * accepts its path.
 */
#ifndef KP_CALIB_H
#define KP_CALIB_H

#include <stddef.h>
#include <stdint.h>

#include "compress/codec.h"
#include "engine/model.h"

typedef struct calib_opts {
    int n_ctx;            /* calibration window (default 256) */
    int64_t max_tokens;   /* calibration tokens used at most (default 131072) */
    double bits;          /* target average bits per KV value in coded chunks (default 2.0);
                             --ratio R sets bits = 16 / R (before overheads) */
    int chunk;            /* tokens per chunk (default 64) */
    int sink;             /* first S tokens kept lossless (default 4) */
    int window;           /* last W tokens kept lossless (default 64) */
    int kind;             /* CODEC_LEARNED (weighted, pre-RoPE keys) or CODEC_PCA (post-RoPE, plain) */
    double k_weight;      /* learned: bit-allocation weight of the keys' relative error against
                             the values' (default 4: on stories260K, ppl --codec at 2 bits/value
                             had KL 0.056 / 0.036 / 0.040 for weights 1 / 4 / 8) */
    int ranges;           /* learned: 1 (default) fixed quantiser ranges from calibration (latents
                             scaled to unit variance, no side info in chunks); 0 per-chunk fp16
                             min/step per latent (4 bytes per latent per chunk); pca: always 0 */
    int progress;         /* 1: progress bar on a tty / lines otherwise */
} calib_opts;

typedef struct calib_report {
    int64_t tokens_used;
    double seconds;
    double bits_per_value; /* achieved average over coded chunks, scales included */
    double rel_err_k, rel_err_v; /* held-out relative weighted reconstruction error */
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

/* Symmetric eigen-decomposition by cyclic Jacobi rotations: a [n][n] is
 * destroyed; evals [n] descending; evecs [n][n] with eigenvector j in column
 * j (largest-magnitude entry positive). Returns 0. */
int calib_jacobi_eig(double *a, int n, double *evals, double *evecs);

/* `kvpark calibrate ...` (argv[0] = "calibrate"); returns the exit status. */
int calib_main(int argc, char **argv);

#endif
