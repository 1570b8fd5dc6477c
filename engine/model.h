/*
 * model.h — a loaded model: hyper-parameters, weights, vocabulary, and the
 * forward pass for the architectures kvpark knows (llama, qwen2, gpt2).
 *
 * Contract
 *   - model_load(path) opens a GGUF (memory-mapped: CPU weights are used in
 *     place, never copied), reads `general.architecture` and the hyper-
 *     parameters, checks that every tensor the architecture needs is present
 *     with the right shape and a supported type (a message names the tensor
 *     otherwise), and loads the tokenizer. "synthetic:NAME" paths are not
 *     handled here (see synth.h: write the file first).
 *   - model_forward() runs one step for a batch of sequences: each sequence
 *     appends its n_tokens tokens at positions kv->n_pos .. (the KV cache
 *     grows), and gets logits for its last token or for every token.
 *     All tokens of all sequences go through each weight matrix together
 *     (matrix-matrix work); attention is per sequence. Long inputs are split
 *     into micro-batches of at most model_opts.n_batch tokens.
 *   - One thread at a time calls model_forward (the scheduler owns the model).
 */
#ifndef KP_MODEL_H
#define KP_MODEL_H

#include <stdbool.h>
#include <stdint.h>

#include "kernels/kernels.h"
#include "kernels/kp.h"
#include "engine/kv.h"
#include "engine/tok.h"

enum model_arch { ARCH_LLAMA = 1, ARCH_QWEN2 = 2, ARCH_GPT2 = 3 };

typedef struct model_hparams {
    int arch;
    char arch_name[32];
    int n_vocab;
    int n_ctx_train;
    int dim;
    int n_layer;
    int n_head;
    int n_kv_heads;
    int head_dim;
    int ffn;
    int n_rot;          /* dims rotated by RoPE (0 = no RoPE, gpt2) */
    int rope_mode;      /* KP_ROPE_NORMAL | KP_ROPE_NEOX */
    float rope_base;
    float rope_freq_scale;
    float norm_eps;
    bool tied_output;   /* logits use token_embd.weight */
    int n_params_m;     /* parameter count in millions (for messages) */
} model_hparams;

typedef struct model_opts {
    const char *backend; /* "cpu" (default), "cuda", or "auto" (cuda when a GPU is present) */
    int n_threads;       /* <= 0: all cores */
    int n_batch;         /* micro-batch size in tokens; default 512 */
} model_opts;

typedef struct model model;

model_opts model_default_opts(void);
int model_load(model **out, const char *path, const model_opts *opts, kp_err *err);
void model_free(model *m);

const model_hparams *model_hp(const model *m);
const tok_vocab *model_vocab(const model *m);
kp_backend *model_backend(const model *m);
const char *model_path(const model *m);
/* Template text from tokenizer.chat_template, or NULL. */
const char *model_chat_template(const model *m);
/* One line: "llama, 5 layers, dim 64, 8 heads (4 kv), vocab 512, f32 (1.1 MB)". */
const char *model_desc(const model *m);
/* The most positions one sequence can hold: n_ctx_train for a model with
 * learned position embeddings (gpt2), 0 (no limit of the model's own) for RoPE. */
int model_max_positions(const model *m);

/* The model's fingerprint: XXH3-64 of the hyper-parameters, every tensor's
 * name, shape and type, and every weight byte. Codec files and parked
 * sessions carry it, so KV made by one model is never fed to another.
 * Computed on first call (reads all weights once: ~1 s per 10 GB) and cached. */
uint64_t model_fingerprint(model *m);

/* A KV cache shaped for this model (n_ctx <= 0: the training context). */
int model_kv_new(const model *m, kv_cache **out, int kv_type, int n_ctx, kp_err *err);

typedef struct model_seq {
    kv_cache *kv;           /* appended to at kv->n_pos */
    const int32_t *tokens;  /* [n_tokens] */
    int n_tokens;
    bool all_logits;        /* logits for every token from logits_from on, else only the last */
    int logits_from;        /* all_logits: the first token index that gets logits (0: all;
                               perplexity scores only the second half of a window) */
    float *logits;          /* out (host memory): [n_tokens - logits_from or 1][n_vocab]; may be NULL */
    float *embd;            /* out (host memory), may be NULL: [dim] += the final-normed hidden
                               state of each of this call's tokens (the sum; mean pooling divides
                               by n_tokens: model_embed) */
} model_seq;

/* Returns KP_ERANGE (sequence untouched) if a sequence would exceed its
 * cache's n_ctx, KP_EINVAL for a token id outside the vocabulary. */
int model_forward(model *m, model_seq *seqs, int n_seqs, kp_err *err);

/* Embeddings of n_inputs token sequences (inputs[i], n_tokens[i] >= 1 each,
 * at most the model's training context): out[i] [dim] = the mean over the
 * sequence's tokens of the final-normed hidden state (the input of the
 * output projection), not normalised. One forward pass for all inputs, each
 * on a fresh cache of kv_type sized to it; no logits computed. Must run
 * where model_forward may (the thread that owns the model). KP_EINVAL for an
 * empty input or a bad id, KP_ERANGE for an input longer than the context. */
int model_embed(model *m, const int32_t *const *inputs, const int *n_tokens, int n_inputs, int kv_type,
                float *out, kp_err *err);

/* A probe sees each layer's activations during model_forward (calibration of
 * the KV codec): q [n][n_head][head_dim] and k [n][n_kv][head_dim] BEFORE
 * RoPE, v [n][n_kv][head_dim], for the n tokens of one micro-batch at
 * positions pos[0..n-1] (host memory; valid only during the call; tokens of
 * several sequences may be mixed: seq[t] says which model_seq each row is).
 * NULL removes it. CPU backend only. */
typedef void (*model_probe_fn)(void *ud, int layer, const float *q, const float *k, const float *v,
                               const int32_t *pos, const int *seq, int n);
void model_set_probe(model *m, model_probe_fn fn, void *ud);
/* A layer gate runs at the start of every layer of model_forward, before the
 * layer reads its KV cache: a pipelined resume blocks there until that
 * layer's restored rows are in the cache (storage/store.h,
 * store_load_kv_layer), so the new tokens' prefill of layer 0 overlaps the
 * decoding of deeper layers. Return non-zero to abandon the forward pass
 * (model_forward then returns KP_ECANCELED). NULL removes it. */
typedef int (*model_layer_gate_fn)(void *ud, int layer);
void model_set_layer_gate(model *m, model_layer_gate_fn fn, void *ud);
/* The output projection of layer l as f32 [dim][dim] (row o = output o; the
 * caller frees it) — what value errors are weighted by. */
float *model_wo_f32(const model *m, int layer);

/* Resolve which model file to use: `cli` (may be NULL), else $KVPARK_MODEL,
 * else the first models/ *.gguf (sorted), else ../shared/models/stories260K.gguf.
 * Writes the chosen path into buf, or returns KP_ENOTFOUND with a message
 * saying how to get a GGUF model. */
int model_find_default(const char *cli, char *buf, size_t cap, kp_err *err);
/* model_find_default, then materialise "synthetic:NAME[:TYPE]" (a GGUF of a
 * real shape with random weights, written to $TMPDIR on first use; TYPE
 * defaults to f32): buf receives a loadable file path. */
int model_resolve(const char *cli, char *buf, size_t cap, kp_err *err);

#endif
