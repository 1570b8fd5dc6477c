/*
 * api_embed.h — POST /v1/embeddings: the request parsed into token ids, and
 * the response built from the vectors.
 *
 * Contract
 *   - api_parse_embeddings(body, len, vocab, lim, out, e): `input` is a
 *     non-empty string, an array of 1..lim->max_inputs non-empty strings, an
 *     array of token ids, or an array of arrays of token ids (ids in
 *     0..n_vocab-1). Strings are tokenised as a prompt is (the model's BOS
 *     when it uses one). Each input may hold lim->max_tokens tokens (the
 *     model's context), all of them together lim->max_total; more is 400
 *     context_length_exceeded naming the input. `encoding_format` "float"
 *     (default) or "base64"; `dimensions` 1..lim->dim (default: all);
 *     `model` and `user` are accepted and ignored (one model is served).
 *     Anything else wrong is a 400 in *e naming the field; 0 on success.
 *     out is freed with api_embed_req_free (also after a failure).
 *   - api_embed_normalize(v, keep): the first `keep` values of v scaled
 *     to unit L2 norm (OpenAI's `dimensions`: truncate, then renormalise); a
 *     zero vector stays zero.
 *   - api_embed_response(req, vecs, stride, model_id): the OpenAI list
 *     object, data in input order, each vector the first req->dimensions
 *     values of vecs + i * stride (already normalised), as numbers or as
 *     base64 of little-endian float32; usage.prompt_tokens = total_tokens =
 *     every input token. malloc'd JSON, NULL when out of memory.
 * Pure functions of their arguments; any thread.
 */
#ifndef KP_API_EMBED_H
#define KP_API_EMBED_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tok.h"
#include "server/api.h"

typedef struct api_embed_limits {
    int dim;         /* the model's embedding size */
    int max_tokens;  /* per input (the model's context) */
    int max_inputs;  /* inputs per request */
    int max_total;   /* tokens per request */
} api_embed_limits;

typedef struct api_embed_req {
    int32_t **inputs;  /* [n_inputs][n_tokens[i]] */
    int *n_tokens;     /* [n_inputs] */
    int n_inputs;
    int total_tokens;
    bool base64;
    int dimensions;    /* values returned per vector (<= dim) */
} api_embed_req;

int api_parse_embeddings(const char *body, size_t len, const tok_vocab *vocab, const api_embed_limits *lim,
                         api_embed_req *out, api_error *e);
void api_embed_req_free(api_embed_req *r);
void api_embed_normalize(float *v, int keep);
char *api_embed_response(const api_embed_req *req, const float *vecs, size_t stride, const char *model_id);

#endif
