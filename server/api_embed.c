/*
 * api_embed.c — POST /v1/embeddings request parsing and response building
 * (contract in api_embed.h).
 *
 * Kept apart from api.c because the endpoint shares nothing with the
 * generation requests but the JSON loading (api_load_object) and the error
 * shape. The vectors themselves come from model_embed (engine/model.h), run
 * on the scheduler thread by server/http.c.
 */
#include "server/api_embed.h"

#include <jansson.h>
#include <math.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EMB_BAD(e, param, code, ...) \
    api_error_set((e), 400, "invalid_request_error", (code), (param), __VA_ARGS__)

void api_embed_req_free(api_embed_req *r) {
    if (!r) return;
    for (int i = 0; i < r->n_inputs; i++) free(r->inputs[i]);
    free(r->inputs);
    free(r->n_tokens);
    memset(r, 0, sizeof *r);
}

/* Append one input (ids taken over, freed on failure) after its checks. */
static int add_input(api_embed_req *r, int32_t *ids, size_t n, int index, const api_embed_limits *lim,
                     api_error *e) {
    char param[32];
    snprintf(param, sizeof param, "input[%d]", index);
    if (n == 0) {
        free(ids);
        return EMB_BAD(e, "input", "invalid_value", "'%s' is empty: every input needs at least one token",
                       param);
    }
    if (n > (size_t)lim->max_tokens) {
        free(ids);
        return EMB_BAD(e, "input", "context_length_exceeded",
                       "'%s' has %zu tokens; this model's context is %d tokens: shorten it", param, n,
                       lim->max_tokens);
    }
    if ((size_t)r->total_tokens + n > (size_t)lim->max_total) {
        free(ids);
        return EMB_BAD(e, "input", "context_length_exceeded",
                       "the inputs hold more than %d tokens in all (at '%s'): send fewer per request",
                       lim->max_total, param);
    }
    r->inputs[r->n_inputs] = ids;
    r->n_tokens[r->n_inputs] = (int)n;
    r->n_inputs++;
    r->total_tokens += (int)n;
    return 0;
}

static int text_input(api_embed_req *r, json_t *s, int index, const tok_vocab *v, const api_embed_limits *lim,
                      api_error *e) {
    int32_t *ids = NULL;
    size_t n = 0;
    kp_err err = {0};
    if (json_string_length(s) > 0 &&
        tok_encode(v, json_string_value(s), json_string_length(s), true, false, &ids, &n, &err))
        return api_error_set(e, 500, "server_error", NULL, NULL, "tokenizer: %s", err.msg);
    return add_input(r, ids, n, index, lim, e);
}

static int ids_input(api_embed_req *r, json_t *a, int index, const tok_vocab *v, const api_embed_limits *lim,
                     api_error *e) {
    size_t n = json_array_size(a);
    if (n > (size_t)lim->max_tokens) return add_input(r, NULL, n, index, lim, e);
    int32_t *ids = malloc(sizeof *ids * (n ? n : 1));
    if (!ids) return api_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
    for (size_t i = 0; i < n; i++) {
        json_t *x = json_array_get(a, i);
        json_int_t id = json_is_integer(x) ? json_integer_value(x) : -1;
        if (!json_is_integer(x) || id < 0 || id >= tok_n_vocab(v)) {
            free(ids);
            return EMB_BAD(e, "input", "invalid_value",
                           "'input' token %zu of input %d is not a token id of this model (0..%d)", i, index,
                           tok_n_vocab(v) - 1);
        }
        ids[i] = (int32_t)id;
    }
    return add_input(r, ids, n, index, lim, e);
}

int api_parse_embeddings(const char *body, size_t len, const tok_vocab *vocab, const api_embed_limits *lim,
                         api_embed_req *out, api_error *e) {
    memset(out, 0, sizeof *out);
    json_t *root = NULL;
    int rc = api_load_object(body, len, &root, e);
    if (rc) return rc;
    const char *msg = "'input' must be a non-empty string, an array of strings, an array of token ids, "
                      "or an array of arrays of token ids";
    json_t *in = json_object_get(root, "input");
    size_t n_in = 0;
    bool nested = false; /* an array of inputs (strings or id arrays), not one id array */
    if (!in || json_is_null(in)) {
        rc = EMB_BAD(e, "input", "missing_required_parameter", "'input' is required: %s", msg);
        goto done;
    }
    if (json_is_string(in)) {
        n_in = 1;
    } else if (json_is_array(in) && json_array_size(in) > 0) {
        json_t *first = json_array_get(in, 0);
        nested = json_is_string(first) || json_is_array(first);
        n_in = nested ? json_array_size(in) : 1;
        for (size_t i = 0; nested && i < n_in; i++) {
            json_t *x = json_array_get(in, i);
            if (json_is_string(x) != json_is_string(first) || json_is_array(x) != json_is_array(first)) {
                rc = EMB_BAD(e, "input", "invalid_type", "'input[%zu]' is not of the same kind as 'input[0]': %s",
                             i, msg);
                goto done;
            }
        }
    } else {
        rc = EMB_BAD(e, "input", "invalid_type", "%s", msg);
        goto done;
    }
    if (n_in > (size_t)lim->max_inputs) {
        rc = EMB_BAD(e, "input", "invalid_value", "'input' holds %zu inputs; at most %d per request", n_in,
                     lim->max_inputs);
        goto done;
    }
    json_t *fmt = json_object_get(root, "encoding_format");
    if (fmt && !json_is_null(fmt)) {
        if (json_is_string(fmt) && !strcmp(json_string_value(fmt), "base64")) out->base64 = true;
        else if (!json_is_string(fmt) || strcmp(json_string_value(fmt), "float") != 0) {
            rc = EMB_BAD(e, "encoding_format", "invalid_value", "'encoding_format' must be \"float\" or \"base64\"");
            goto done;
        }
    }
    out->dimensions = lim->dim;
    json_t *dims = json_object_get(root, "dimensions");
    if (dims && !json_is_null(dims)) {
        if (!json_is_integer(dims) || json_integer_value(dims) < 1 || json_integer_value(dims) > lim->dim) {
            rc = EMB_BAD(e, "dimensions", "invalid_value", "'dimensions' must be an integer from 1 to %d (this "
                         "model's embedding size)", lim->dim);
            goto done;
        }
        out->dimensions = (int)json_integer_value(dims);
    }
    json_t *model = json_object_get(root, "model");
    if (model && !json_is_null(model) && !json_is_string(model)) {
        rc = EMB_BAD(e, "model", "invalid_type", "'model' must be a string");
        goto done;
    }
    out->inputs = calloc(n_in, sizeof *out->inputs);
    out->n_tokens = calloc(n_in, sizeof *out->n_tokens);
    if (!out->inputs || !out->n_tokens) {
        rc = api_error_set(e, 500, "server_error", NULL, NULL, "out of memory");
        goto done;
    }
    for (size_t i = 0; i < n_in && !rc; i++) {
        json_t *x = json_is_string(in) ? in : nested ? json_array_get(in, i) : in;
        if (json_is_string(x)) rc = text_input(out, x, (int)i, vocab, lim, e);
        else rc = ids_input(out, x, (int)i, vocab, lim, e);
    }
done:
    json_decref(root);
    if (rc) api_embed_req_free(out);
    return rc;
}

void api_embed_normalize(float *v, int keep) {
    double ss = 0;
    for (int i = 0; i < keep; i++) ss += (double)v[i] * v[i];
    if (ss <= 0) return;
    const float inv = (float)(1.0 / sqrt(ss));
    for (int i = 0; i < keep; i++) v[i] *= inv;
}

char *api_embed_response(const api_embed_req *req, const float *vecs, size_t stride, const char *model_id) {
    json_t *data = json_array();
    const int d = req->dimensions;
    char *b64 = NULL;
    const size_t raw = (size_t)d * 4, b64_len = sodium_base64_ENCODED_LEN(raw, sodium_base64_VARIANT_ORIGINAL);
    uint8_t *le = req->base64 ? malloc(raw) : NULL;
    if (req->base64) b64 = malloc(b64_len);
    if (!data || (req->base64 && (!b64 || !le))) goto oom;
    for (int i = 0; i < req->n_inputs; i++) {
        const float *v = vecs + (size_t)i * stride;
        json_t *emb;
        if (req->base64) {
            for (int k = 0; k < d; k++) { /* little-endian float32, as OpenAI sends it */
                uint32_t u;
                memcpy(&u, &v[k], 4);
                for (int b = 0; b < 4; b++) le[(size_t)k * 4 + b] = (uint8_t)(u >> (8 * b));
            }
            sodium_bin2base64(b64, b64_len, le, raw, sodium_base64_VARIANT_ORIGINAL);
            emb = json_string(b64);
        } else {
            emb = json_array();
            for (int k = 0; emb && k < d; k++)
                if (json_array_append_new(emb, json_real(v[k]))) {
                    json_decref(emb);
                    emb = NULL;
                }
        }
        json_t *item = emb ? json_pack("{s:s, s:i, s:o}", "object", "embedding", "index", i, "embedding", emb) : NULL;
        if (!item || json_array_append_new(data, item)) goto oom;
    }
    json_t *root = json_pack("{s:s, s:o, s:s, s:{s:i, s:i}}", "object", "list", "data", data, "model", model_id,
                             "usage", "prompt_tokens", req->total_tokens, "total_tokens", req->total_tokens);
    data = NULL;
    free(b64);
    free(le);
    if (!root) return NULL;
    char *s = json_dumps(root, JSON_COMPACT | JSON_REAL_PRECISION(9));
    json_decref(root);
    return s;
oom:
    json_decref(data);
    free(b64);
    free(le);
    return NULL;
}
