/*
 * model.c — load a GGUF model and run its forward pass (see model.h).
 *
 * Reading guide (top to bottom, as in llama2.c):
 *   1. hyper-parameters from GGUF metadata       (load_hparams)
 *   2. weights: look up, check shape and type   (load_weights)
 *   3. scratch buffers for a micro-batch        (ensure_scratch)
 *   4. the forward pass for one micro-batch      (forward_ubatch)
 *        embed -> per layer [norm, QKV, RoPE, KV store, attention, out-proj,
 *        residual, norm, FFN, residual] -> final norm -> logits
 *   5. model_forward: split into micro-batches, gather logits.
 *
 * Numerics follow llama.cpp's CPU graph (the golden data's source): the same
 * operation order, RMSNorm in double, RoPE angles in float.
 */
#include "engine/model.h"

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>

#include "engine/gguf.h"
#include "engine/synth.h"
#include "kernels/cpu/quant.h"

/* xxhash as a header-only library (XXH_INLINE_ALL): no link dependency. */
/* Rows of logits computed at once: bounds the logits scratch at
 * [64][n_vocab] (8 MB for a 32K vocabulary) instead of [n_batch][n_vocab]
 * (64 MB at 512), at no cost in speed (the output matmul is already wide). */
#define MODEL_LOGIT_ROWS 64

#define XXH_INLINE_ALL
#include <xxhash.h>

/* One layer's weights. Unused ones (per architecture) are zeroed. */
typedef struct layer_w {
    const float *attn_norm, *attn_norm_b;   /* [dim] */
    kp_wref wq, wk, wv, wqkv, wo;           /* [out][in] */
    const float *bq, *bk, *bv, *bqkv, *bo;  /* biases (qwen2, gpt2) */
    const float *ffn_norm, *ffn_norm_b;     /* [dim] */
    kp_wref w_gate, w_up, w_down;
    const float *b_up, *b_down;             /* gpt2 */
} layer_w;

/* Activations of one micro-batch of n tokens (all backend memory). */
typedef struct scratch {
    int cap;          /* tokens the buffers hold */
    float *x;         /* [n][dim]    residual stream */
    float *h;         /* [n][dim]    normed input of a block */
    float *q;         /* [n][n_head][head_dim] */
    float *k;         /* [n][n_kv][head_dim] */
    float *v;         /* [n][n_kv][head_dim] */
    float *qkv;       /* [n][dim + 2 kv_dim] (gpt2 fused) */
    float *att;       /* [n][n_head][head_dim] */
    float *ff_a;      /* [n][ffn] */
    float *ff_b;      /* [n][ffn] */
    float *last;      /* [n][dim]    rows that need logits */
    float *logits;    /* [n][n_vocab] */
    int32_t *ids;     /* [n] (host) */
    int32_t *pos;     /* [n] (host) */
} scratch;

struct model {
    char *path;
    gguf_file *gf;
    model_hparams hp;
    tok_vocab *vocab;
    char *chat_template;
    kp_backend *be;
    const kp_ops *ops;
    int n_batch;
    char desc[256];

    kp_wref tok_embd;   /* [n_vocab][dim] */
    kp_wref pos_embd;   /* [n_ctx_train][dim] (gpt2) */
    kp_wref output;     /* [n_vocab][dim] */
    const float *out_norm, *out_norm_b;
    layer_w *layers;    /* [n_layer] */
    bool on_cpu;        /* weights used in place from the mapping */
    void **dev;         /* [n_dev] backend copies of the weights (non-CPU backends) */
    int n_dev, cap_dev;
    uint64_t fingerprint; /* 0 until model_fingerprint() computes it */
    model_probe_fn probe;
    void *probe_ud;
    int *probe_seq;       /* [n_batch] sequence index of each micro-batch row */
    model_layer_gate_fn gate;
    void *gate_ud;

    scratch s;
};

/* ------------------------------------------------------------------ */
/* 1. hyper-parameters                                                 */

static int get_int_key(const gguf_file *f, const char *arch, const char *suffix, int64_t def,
                       bool required, int64_t lo, int64_t hi, int64_t *out, kp_err *err) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_int(f, key, out, err);
    if (rc == KP_ENOTFOUND) {
        if (required)
            return kp_errf(err, KP_EFORMAT, "model: required metadata key '%s' is missing", key);
        *out = def;
        return 0;
    }
    if (rc) return rc;
    if (*out < lo || *out > hi)
        return kp_errf(err, KP_EFORMAT, "model: metadata '%s' = %lld is out of range [%lld, %lld]",
                       key, (long long)*out, (long long)lo, (long long)hi);
    return 0;
}

static int get_float_key(const gguf_file *f, const char *arch, const char *suffix, double def,
                         double *out, kp_err *err) {
    char key[128];
    snprintf(key, sizeof key, "%s.%s", arch, suffix);
    int rc = gguf_get_float(f, key, out, err);
    if (rc == KP_ENOTFOUND) {
        *out = def;
        return 0;
    }
    if (rc) return rc;
    if (!isfinite(*out))
        return kp_errf(err, KP_EFORMAT, "model: metadata '%s' is not a finite number", key);
    return 0;
}

static int load_hparams(model *m, kp_err *err) {
    model_hparams *hp = &m->hp;
    const char *arch = NULL;
    size_t alen = 0;
    int rc = gguf_get_str(m->gf, "general.architecture", &arch, &alen, err);
    if (rc == KP_ENOTFOUND)
        return kp_errf(err, KP_EFORMAT, "model: %s has no 'general.architecture' key", m->path);
    if (rc) return rc;
    if (alen >= sizeof hp->arch_name) alen = sizeof hp->arch_name - 1;
    memcpy(hp->arch_name, arch, alen);
    hp->arch_name[alen] = 0;
    const char *a = hp->arch_name;
    if (!strcmp(a, "llama")) hp->arch = ARCH_LLAMA;
    else if (!strcmp(a, "qwen2")) hp->arch = ARCH_QWEN2;
    else if (!strcmp(a, "gpt2")) hp->arch = ARCH_GPT2;
    else
        return kp_errf(err, KP_EUNSUP,
                       "model: architecture '%s' is not supported (kvpark runs llama, qwen2, gpt2)", a);

    int64_t v;
    if ((rc = get_int_key(m->gf, a, "embedding_length", 0, true, 1, 1 << 16, &v, err))) return rc;
    hp->dim = (int)v;
    if ((rc = get_int_key(m->gf, a, "block_count", 0, true, 1, 1024, &v, err))) return rc;
    hp->n_layer = (int)v;
    if ((rc = get_int_key(m->gf, a, "feed_forward_length", 0, true, 1, 1 << 20, &v, err))) return rc;
    hp->ffn = (int)v;
    if ((rc = get_int_key(m->gf, a, "attention.head_count", 0, true, 1, 1024, &v, err))) return rc;
    hp->n_head = (int)v;
    if ((rc = get_int_key(m->gf, a, "attention.head_count_kv", hp->n_head, false, 1, hp->n_head, &v,
                          err)))
        return rc;
    hp->n_kv_heads = (int)v;
    if ((rc = get_int_key(m->gf, a, "context_length", 2048, false, 1, 1 << 24, &v, err))) return rc;
    hp->n_ctx_train = (int)v;
    if (hp->dim % hp->n_head)
        return kp_errf(err, KP_EFORMAT, "model: embedding_length %d is not a multiple of head_count %d",
                       hp->dim, hp->n_head);
    if (hp->n_head % hp->n_kv_heads)
        return kp_errf(err, KP_EFORMAT, "model: head_count %d is not a multiple of head_count_kv %d",
                       hp->n_head, hp->n_kv_heads);
    hp->head_dim = hp->dim / hp->n_head;

    double d;
    if (hp->arch == ARCH_GPT2) {
        if ((rc = get_float_key(m->gf, a, "attention.layer_norm_epsilon", 1e-5, &d, err))) return rc;
        hp->norm_eps = (float)d;
        hp->n_rot = 0;
    } else {
        if ((rc = get_float_key(m->gf, a, "attention.layer_norm_rms_epsilon", 1e-5, &d, err)))
            return rc;
        hp->norm_eps = (float)d;
        if ((rc = get_int_key(m->gf, a, "rope.dimension_count", hp->head_dim, false, 2, hp->head_dim,
                              &v, err)))
            return rc;
        if (v % 2) return kp_errf(err, KP_EFORMAT, "model: rope.dimension_count %lld is odd", (long long)v);
        hp->n_rot = (int)v;
        hp->rope_mode = hp->arch == ARCH_QWEN2 ? KP_ROPE_NEOX : KP_ROPE_NORMAL;
    }
    if ((rc = get_float_key(m->gf, a, "rope.freq_base", 10000.0, &d, err))) return rc;
    hp->rope_base = (float)d;
    hp->rope_freq_scale = 1.0f;
    char key[128];
    snprintf(key, sizeof key, "%s.rope.scaling.type", a);
    char *stype = gguf_get_str_dup(m->gf, key);
    if (stype && strcmp(stype, "none") != 0) {
        if (!strcmp(stype, "linear")) {
            if ((rc = get_float_key(m->gf, a, "rope.scaling.factor", 1.0, &d, err))) {
                free(stype);
                return rc;
            }
            if (d > 0) hp->rope_freq_scale = (float)(1.0 / d);
        } else {
            kp_errf(err, KP_EUNSUP, "model: RoPE scaling type '%s' is not supported (only linear)",
                    stype);
            free(stype);
            return KP_EUNSUP;
        }
    }
    free(stype);
    if (gguf_find_tensor(m->gf, "rope_freqs.weight"))
        return kp_errf(err, KP_EUNSUP,
                       "model: per-dimension RoPE frequency factors (rope_freqs.weight, Llama 3.1 "
                       "style long-context scaling) are not supported yet");
    return 0;
}

/* ------------------------------------------------------------------ */
/* 2. weights                                                          */

/* Find a 2-D weight [rows][cols]; cols = row length (ne[0]). */
static int need_matrix(model *m, const char *name, int64_t cols, int64_t rows, bool optional,
                       kp_wref *w, kp_err *err) {
    const gguf_tensor *t = gguf_find_tensor(m->gf, name);
    memset(w, 0, sizeof *w);
    if (!t) {
        if (optional) return 0;
        return kp_errf(err, KP_EFORMAT, "model: tensor '%s' is missing from %s", name, m->path);
    }
    if (t->n_dims > 2 || t->ne[0] != cols || t->ne[1] != rows)
        return kp_errf(err, KP_EFORMAT,
                       "model: tensor '%s' has shape [%lld, %lld] (n_dims %d), expected [%lld, %lld]",
                       name, (long long)t->ne[0], (long long)t->ne[1], t->n_dims, (long long)cols,
                       (long long)rows);
    if (!kp_type_supported(t->type))
        return kp_errf(err, KP_EUNSUP,
                       "model: tensor '%s' has type %s (%d), which kvpark cannot compute with "
                       "(supported: f32 f16 bf16 q8_0 q4_0 q4_K q6_K)",
                       name, kp_type_name(t->type) ? kp_type_name(t->type) : "?", t->type);
    w->type = t->type;
    w->n_in = cols;
    w->n_out = rows;
    w->data = t->data;
    return 0;
}

/* A 1-D F32 vector of n floats (norm weights, biases). */
static int need_vector(model *m, const char *name, int64_t n, bool optional, const float **out,
                       kp_err *err) {
    const gguf_tensor *t = gguf_find_tensor(m->gf, name);
    *out = NULL;
    if (!t) {
        if (optional) return 0;
        return kp_errf(err, KP_EFORMAT, "model: tensor '%s' is missing from %s", name, m->path);
    }
    if (t->n_elements != n)
        return kp_errf(err, KP_EFORMAT, "model: tensor '%s' has %lld elements, expected %lld", name,
                       (long long)t->n_elements, (long long)n);
    if (t->type != KP_TYPE_F32)
        return kp_errf(err, KP_EUNSUP, "model: tensor '%s' must be f32 (it is %s)", name,
                       kp_type_name(t->type) ? kp_type_name(t->type) : "?");
    *out = t->data;
    return 0;
}

static int load_weights(model *m, kp_err *err) {
    model_hparams *hp = &m->hp;
    const int dim = hp->dim, kvd = hp->n_kv_heads * hp->head_dim;
    int rc;
    const gguf_tensor *te = gguf_find_tensor(m->gf, "token_embd.weight");
    if (!te) return kp_errf(err, KP_EFORMAT, "model: tensor 'token_embd.weight' is missing");
    hp->n_vocab = (int)te->ne[1];
    if ((rc = need_matrix(m, "token_embd.weight", dim, hp->n_vocab, false, &m->tok_embd, err)))
        return rc;
    if ((rc = need_matrix(m, "output.weight", dim, hp->n_vocab, true, &m->output, err))) return rc;
    hp->tied_output = m->output.data == NULL;
    if (hp->tied_output) m->output = m->tok_embd;
    bool gpt2 = hp->arch == ARCH_GPT2;
    if ((rc = need_vector(m, "output_norm.weight", dim, false, &m->out_norm, err))) return rc;
    if ((rc = need_vector(m, "output_norm.bias", dim, !gpt2, &m->out_norm_b, err))) return rc;
    if (gpt2 && (rc = need_matrix(m, "position_embd.weight", dim, hp->n_ctx_train, false,
                                  &m->pos_embd, err)))
        return rc;

    m->layers = calloc((size_t)hp->n_layer, sizeof *m->layers);
    if (!m->layers) return kp_errf(err, KP_ENOMEM, "model: out of memory");
    char name[128];
#define NAME(suffix) (snprintf(name, sizeof name, "blk.%d." suffix, l), name)
    for (int l = 0; l < hp->n_layer; l++) {
        layer_w *L = &m->layers[l];
        if ((rc = need_vector(m, NAME("attn_norm.weight"), dim, false, &L->attn_norm, err))) return rc;
        if ((rc = need_vector(m, NAME("ffn_norm.weight"), dim, false, &L->ffn_norm, err))) return rc;
        if ((rc = need_matrix(m, NAME("attn_output.weight"), dim, dim, false, &L->wo, err))) return rc;
        if ((rc = need_matrix(m, NAME("ffn_up.weight"), dim, hp->ffn, false, &L->w_up, err))) return rc;
        if ((rc = need_matrix(m, NAME("ffn_down.weight"), hp->ffn, dim, false, &L->w_down, err)))
            return rc;
        if (gpt2) {
            if ((rc = need_vector(m, NAME("attn_norm.bias"), dim, false, &L->attn_norm_b, err))) return rc;
            if ((rc = need_vector(m, NAME("ffn_norm.bias"), dim, false, &L->ffn_norm_b, err))) return rc;
            if ((rc = need_matrix(m, NAME("attn_qkv.weight"), dim, dim + 2 * kvd, false, &L->wqkv, err)))
                return rc;
            if ((rc = need_vector(m, NAME("attn_qkv.bias"), dim + 2 * kvd, false, &L->bqkv, err))) return rc;
            if ((rc = need_vector(m, NAME("attn_output.bias"), dim, false, &L->bo, err))) return rc;
            if ((rc = need_vector(m, NAME("ffn_up.bias"), hp->ffn, false, &L->b_up, err))) return rc;
            if ((rc = need_vector(m, NAME("ffn_down.bias"), dim, false, &L->b_down, err))) return rc;
        } else {
            bool bias = hp->arch == ARCH_QWEN2;
            if ((rc = need_matrix(m, NAME("attn_q.weight"), dim, dim, false, &L->wq, err))) return rc;
            if ((rc = need_matrix(m, NAME("attn_k.weight"), dim, kvd, false, &L->wk, err))) return rc;
            if ((rc = need_matrix(m, NAME("attn_v.weight"), dim, kvd, false, &L->wv, err))) return rc;
            if ((rc = need_matrix(m, NAME("ffn_gate.weight"), dim, hp->ffn, false, &L->w_gate, err)))
                return rc;
            if ((rc = need_vector(m, NAME("attn_q.bias"), dim, !bias, &L->bq, err))) return rc;
            if ((rc = need_vector(m, NAME("attn_k.bias"), kvd, !bias, &L->bk, err))) return rc;
            if ((rc = need_vector(m, NAME("attn_v.bias"), kvd, !bias, &L->bv, err))) return rc;
        }
    }
#undef NAME
    double params = 0;
    for (int64_t i = 0; i < gguf_n_tensors(m->gf); i++) params += (double)gguf_tensor_at(m->gf, i)->n_elements;
    hp->n_params_m = (int)(params / 1e6 + 0.5);
    return 0;
}

/* ------------------------------------------------------------------ */
/* 3. scratch                                                          */

static void free_scratch(model *m) {
    scratch *s = &m->s;
    float **bufs[] = {&s->x, &s->h, &s->q, &s->k, &s->v, &s->qkv, &s->att,
                      &s->ff_a, &s->ff_b, &s->last, &s->logits};
    for (size_t i = 0; i < KP_ARRAY_LEN(bufs); i++) {
        if (*bufs[i]) m->ops->free(m->be, *bufs[i]);
        *bufs[i] = NULL;
    }
    free(s->ids);
    free(s->pos);
    s->ids = s->pos = NULL;
    s->cap = 0;
}

static int ensure_scratch(model *m, int n, kp_err *err) {
    scratch *s = &m->s;
    if (n <= s->cap) return 0;
    free_scratch(m);
    const model_hparams *hp = &m->hp;
    size_t kvd = (size_t)hp->n_kv_heads * hp->head_dim, N = (size_t)n;
    struct { float **p; size_t floats; } want[] = {
        {&s->x, N * hp->dim},          {&s->h, N * hp->dim},
        {&s->q, N * hp->dim},          {&s->k, N * kvd},
        {&s->v, N * kvd},              {&s->qkv, N * (hp->dim + 2 * kvd)},
        {&s->att, N * hp->dim},        {&s->ff_a, N * hp->ffn},
        {&s->ff_b, N * hp->ffn},       {&s->last, N * hp->dim},
        {&s->logits, (size_t)KP_MIN(n, MODEL_LOGIT_ROWS) * hp->n_vocab},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(want); i++) {
        *want[i].p = m->ops->alloc(m->be, want[i].floats * sizeof(float));
        if (!*want[i].p) {
            free_scratch(m);
            return kp_errf(err, KP_ENOMEM, "model: cannot allocate %zu bytes of activations",
                           want[i].floats * sizeof(float));
        }
    }
    s->ids = malloc(N * sizeof *s->ids);
    s->pos = malloc(N * sizeof *s->pos);
    if (!s->ids || !s->pos) {
        free_scratch(m);
        return kp_errf(err, KP_ENOMEM, "model: out of memory");
    }
    s->cap = n;
    return 0;
}

/* ------------------------------------------------------------------ */
/* load / free                                                         */

/* Non-CPU backends: copy every weight to the backend once and point the
 * model at the copies (quantised types stay quantised; the backend's matmul
 * handles them). Host pointers are no longer used by the forward pass. */
static int upload_one(model *m, const void **data, size_t bytes, kp_err *err) {
    if (!*data) return 0;
    if (m->n_dev == m->cap_dev) {
        int nc = m->cap_dev ? m->cap_dev * 2 : 64;
        void **p = realloc(m->dev, sizeof *p * (size_t)nc);
        if (!p) return kp_errf(err, KP_ENOMEM, "model: out of memory");
        m->dev = p;
        m->cap_dev = nc;
    }
    void *d = m->ops->alloc(m->be, bytes);
    if (!d) return kp_errf(err, KP_ENOMEM, "model: cannot allocate %zu bytes of weights on the %s backend",
                           bytes, m->ops->name);
    m->dev[m->n_dev++] = d;
    int rc = m->ops->upload(m->be, d, *data, bytes);
    if (rc) return kp_errf(err, rc, "model: uploading %zu bytes of weights failed", bytes);
    *data = d;
    return 0;
}

static int upload_matrix(model *m, kp_wref *w, kp_err *err) {
    if (!w->data) return 0;
    return upload_one(m, &w->data, kp_type_row_bytes(w->type, w->n_in) * (size_t)w->n_out, err);
}

static int upload_vector(model *m, const float **v, int64_t n, kp_err *err) {
    return upload_one(m, (const void **)v, sizeof(float) * (size_t)n, err);
}

static int upload_weights(model *m, kp_err *err) {
    const model_hparams *hp = &m->hp;
    const int64_t dim = hp->dim, kvd = (int64_t)hp->n_kv_heads * hp->head_dim, ffn = hp->ffn;
    int rc = 0;
    bool tied = hp->tied_output;
    if ((rc = upload_matrix(m, &m->tok_embd, err))) return rc;
    if (tied) m->output = m->tok_embd;
    else if ((rc = upload_matrix(m, &m->output, err))) return rc;
    if ((rc = upload_matrix(m, &m->pos_embd, err))) return rc;
    if ((rc = upload_vector(m, &m->out_norm, dim, err)) || (rc = upload_vector(m, &m->out_norm_b, dim, err)))
        return rc;
    for (int l = 0; l < hp->n_layer; l++) {
        layer_w *L = &m->layers[l];
        kp_wref *mats[] = {&L->wq, &L->wk, &L->wv, &L->wqkv, &L->wo, &L->w_gate, &L->w_up, &L->w_down};
        for (size_t i = 0; i < KP_ARRAY_LEN(mats); i++)
            if ((rc = upload_matrix(m, mats[i], err))) return rc;
        struct { const float **p; int64_t n; } vecs[] = {
            {&L->attn_norm, dim}, {&L->attn_norm_b, dim}, {&L->ffn_norm, dim}, {&L->ffn_norm_b, dim},
            {&L->bq, dim}, {&L->bk, kvd}, {&L->bv, kvd}, {&L->bqkv, dim + 2 * kvd}, {&L->bo, dim},
            {&L->b_up, ffn}, {&L->b_down, dim}};
        for (size_t i = 0; i < KP_ARRAY_LEN(vecs); i++)
            if ((rc = upload_vector(m, vecs[i].p, vecs[i].n, err))) return rc;
    }
    return 0;
}

model_opts model_default_opts(void) {
    model_opts o = {.backend = "cpu", .n_threads = 0, .n_batch = 512};
    return o;
}

int model_load(model **out, const char *path, const model_opts *opts, kp_err *err) {
    model_opts o = opts ? *opts : model_default_opts();
    if (o.n_batch <= 0) o.n_batch = 512;
    if (!o.backend) o.backend = "cpu";
    *out = NULL;
    model *m = calloc(1, sizeof *m);
    if (!m) return kp_errf(err, KP_ENOMEM, "model: out of memory");
    m->path = strdup(path);
    m->n_batch = o.n_batch;
    int rc = gguf_open(&m->gf, path, err);
    if (rc) goto fail;
    if ((rc = load_hparams(m, err))) goto fail;
    if ((rc = load_weights(m, err))) goto fail;
    if ((rc = tok_load(&m->vocab, m->gf, err))) goto fail;
    if (tok_n_vocab(m->vocab) > m->hp.n_vocab) {
        rc = kp_errf(err, KP_EFORMAT, "model: the vocabulary has %d tokens but token_embd.weight has %d rows",
                     tok_n_vocab(m->vocab), m->hp.n_vocab);
        goto fail;
    }
    m->chat_template = gguf_get_str_dup(m->gf, "tokenizer.chat_template");
    if (!strcmp(o.backend, "auto")) o.backend = kp_cuda_available() ? "cuda" : "cpu";
    /* for "cuda" the n_threads argument of kp_backend_new is the device index */
    if ((rc = kp_backend_new(&m->be, o.backend, strcmp(o.backend, "cpu") ? 0 : o.n_threads, err)))
        goto fail;
    m->ops = kp_backend_ops(m->be);
    m->on_cpu = strcmp(o.backend, "cpu") == 0;
    if (!m->on_cpu && (rc = upload_weights(m, err))) goto fail;
    const model_hparams *hp = &m->hp;
    snprintf(m->desc, sizeof m->desc,
             "%s, %d layers, dim %d, %d heads (%d kv, head_dim %d), ffn %d, vocab %d, %s weights, "
             "%.1f MB",
             hp->arch_name, hp->n_layer, hp->dim, hp->n_head, hp->n_kv_heads, hp->head_dim, hp->ffn,
             hp->n_vocab, kp_type_name(m->layers[0].wo.type), (double)gguf_file_size(m->gf) / 1e6);
    *out = m;
    return 0;
fail:
    model_free(m);
    return rc;
}

void model_free(model *m) {
    if (!m) return;
    if (m->be) {
        free_scratch(m);
        for (int i = 0; i < m->n_dev; i++) m->ops->free(m->be, m->dev[i]);
        kp_backend_free(m->be);
    }
    free(m->dev);
    tok_free(m->vocab);
    gguf_close(m->gf);
    free(m->layers);
    free(m->probe_seq);
    free(m->chat_template);
    free(m->path);
    free(m);
}

const model_hparams *model_hp(const model *m) { return &m->hp; }
const tok_vocab *model_vocab(const model *m) { return m->vocab; }
kp_backend *model_backend(const model *m) { return m->be; }
const char *model_path(const model *m) { return m->path; }
const char *model_chat_template(const model *m) { return m->chat_template; }
const char *model_desc(const model *m) { return m->desc; }
int model_max_positions(const model *m) { return m->hp.arch == ARCH_GPT2 ? m->hp.n_ctx_train : 0; }

void model_set_probe(model *m, model_probe_fn fn, void *ud) {
    if (!m->on_cpu) fn = NULL; /* activations live in device memory */
    free(m->probe_seq);
    m->probe_seq = fn ? calloc((size_t)m->n_batch, sizeof *m->probe_seq) : NULL;
    m->probe = m->probe_seq ? fn : NULL;
    m->probe_ud = ud;
}

void model_set_layer_gate(model *m, model_layer_gate_fn fn, void *ud) {
    m->gate = fn;
    m->gate_ud = ud;
}

float *model_wo_f32(const model *m, int layer) {
    if (layer < 0 || layer >= m->hp.n_layer) return NULL;
    char name[64];
    snprintf(name, sizeof name, "blk.%d.attn_output.weight", layer);
    const gguf_tensor *t = gguf_find_tensor(m->gf, name); /* host memory on every backend */
    if (!t) return NULL;
    const kp_wref wh = {.type = t->type, .n_in = t->ne[0], .n_out = t->ne[1], .data = t->data};
    const kp_wref *w = &wh;
    float *out = malloc(sizeof(float) * (size_t)w->n_in * (size_t)w->n_out);
    if (!out) return NULL;
    size_t rb = kp_type_row_bytes(w->type, w->n_in);
    for (int64_t o = 0; o < w->n_out; o++)
        if (kp_dequant_row(w->type, (const char *)w->data + (size_t)o * rb, out + o * w->n_in, w->n_in)) {
            free(out);
            return NULL;
        }
    return out;
}

uint64_t model_fingerprint(model *m) {
    if (m->fingerprint) return m->fingerprint;
    XXH3_state_t *st = XXH3_createState();
    if (!st) return 0;
    XXH3_64bits_reset(st);
    const model_hparams *hp = &m->hp;
    int32_t ints[] = {hp->arch, hp->n_vocab, hp->n_ctx_train, hp->dim, hp->n_layer, hp->n_head,
                      hp->n_kv_heads, hp->head_dim, hp->ffn, hp->n_rot, hp->rope_mode};
    float floats[] = {hp->rope_base, hp->rope_freq_scale, hp->norm_eps};
    XXH3_64bits_update(st, ints, sizeof ints);
    XXH3_64bits_update(st, floats, sizeof floats);
    for (int64_t i = 0; i < gguf_n_tensors(m->gf); i++) {
        const gguf_tensor *t = gguf_tensor_at(m->gf, i);
        XXH3_64bits_update(st, t->name, strlen(t->name) + 1);
        XXH3_64bits_update(st, &t->type, sizeof t->type);
        XXH3_64bits_update(st, t->ne, sizeof t->ne);
        XXH3_64bits_update(st, t->data, t->nbytes);
    }
    uint64_t h = XXH3_64bits_digest(st);
    XXH3_freeState(st);
    m->fingerprint = h ? h : 1; /* 0 means "not computed" */
    return m->fingerprint;
}

int model_kv_new(const model *m, kv_cache **out, int kv_type, int n_ctx, kp_err *err) {
    if (n_ctx <= 0) n_ctx = m->hp.n_ctx_train;
    return kv_new(out, m->be, kv_type, m->hp.n_layer, n_ctx, m->hp.n_kv_heads, m->hp.head_dim, err);
}

/* ------------------------------------------------------------------ */
/* 4. the forward pass of one micro-batch                              */

/* A micro-batch: sequences with their slice of the n tokens in s->ids. */
typedef struct ubatch_seq {
    kv_cache *kv;
    int seq;         /* index into the caller's model_seq array */
    int t0, n;       /* rows t0 .. t0+n-1 of the micro-batch */
    int pos0;        /* position of the first token */
} ubatch_seq;

static int forward_ubatch(model *m, const ubatch_seq *us, int n_us, int n) {
    const kp_ops *ops = m->ops;
    kp_backend *be = m->be;
    const model_hparams *hp = &m->hp;
    scratch *s = &m->s;
    const int dim = hp->dim, hd = hp->head_dim, kvd = hp->n_kv_heads * hd;
    const float scale = 1.0f / sqrtf((float)hd);

    /* embeddings: x [n][dim] */
    ops->get_rows(be, s->x, &m->tok_embd, s->ids, n);
    if (hp->arch == ARCH_GPT2) {
        ops->get_rows(be, s->h, &m->pos_embd, s->pos, n);
        ops->add(be, s->x, s->h, (int64_t)n * dim);
    }

    for (int l = 0; l < hp->n_layer; l++) {
        const layer_w *L = &m->layers[l];
        if (m->gate && m->gate(m->gate_ud, l)) return KP_ECANCELED;
        /* attention block */
        if (hp->arch == ARCH_GPT2) {
            ops->layernorm(be, s->h, s->x, L->attn_norm, L->attn_norm_b, n, dim, hp->norm_eps);
            ops->matmul(be, s->qkv, s->h, &L->wqkv, n);
            ops->add_bias(be, s->qkv, L->bqkv, n, dim + 2 * kvd);
            /* split fused rows [n][q | k | v] into q, k, v */
            for (int t = 0; t < n; t++) {
                const float *row = s->qkv + (size_t)t * (dim + 2 * kvd);
                ops->copy(be, s->q + (size_t)t * dim, row, (size_t)dim * sizeof(float));
                ops->copy(be, s->k + (size_t)t * kvd, row + dim, (size_t)kvd * sizeof(float));
                ops->copy(be, s->v + (size_t)t * kvd, row + dim + kvd, (size_t)kvd * sizeof(float));
            }
            if (m->probe) m->probe(m->probe_ud, l, s->q, s->k, s->v, s->pos, m->probe_seq, n);
        } else {
            ops->rmsnorm(be, s->h, s->x, L->attn_norm, n, dim, hp->norm_eps);
            ops->matmul(be, s->q, s->h, &L->wq, n);
            ops->matmul(be, s->k, s->h, &L->wk, n);
            ops->matmul(be, s->v, s->h, &L->wv, n);
            if (L->bq) ops->add_bias(be, s->q, L->bq, n, dim);
            if (L->bk) ops->add_bias(be, s->k, L->bk, n, kvd);
            if (L->bv) ops->add_bias(be, s->v, L->bv, n, kvd);
            if (m->probe) m->probe(m->probe_ud, l, s->q, s->k, s->v, s->pos, m->probe_seq, n);
            ops->rope(be, s->q, s->pos, n, hp->n_head, hd, hp->n_rot, hp->rope_base,
                      hp->rope_freq_scale, hp->rope_mode);
            ops->rope(be, s->k, s->pos, n, hp->n_kv_heads, hd, hp->n_rot, hp->rope_base,
                      hp->rope_freq_scale, hp->rope_mode);
        }
        /* per sequence: append K/V rows to its cache, attend over the cache */
        for (int i = 0; i < n_us; i++) {
            const ubatch_seq *u = &us[i];
            kv_cache *kv = u->kv;
            uint8_t *kdst = (uint8_t *)kv->k[l] + (size_t)u->pos0 * kv->row_bytes;
            uint8_t *vdst = (uint8_t *)kv->v[l] + (size_t)u->pos0 * kv->row_bytes;
            ops->kv_store(be, kdst, kv->kv_type, s->k + (size_t)u->t0 * kvd, u->n, kvd);
            ops->kv_store(be, vdst, kv->kv_type, s->v + (size_t)u->t0 * kvd, u->n, kvd);
            ops->attention(be, s->att + (size_t)u->t0 * dim, s->q + (size_t)u->t0 * dim, kv->k[l],
                           kv->v[l], kv->kv_type, u->n, u->pos0, hp->n_head, hp->n_kv_heads, hd,
                           scale);
        }
        ops->matmul(be, s->h, s->att, &L->wo, n);
        if (L->bo) ops->add_bias(be, s->h, L->bo, n, dim);
        ops->add(be, s->x, s->h, (int64_t)n * dim);

        /* feed-forward block */
        if (hp->arch == ARCH_GPT2) {
            ops->layernorm(be, s->h, s->x, L->ffn_norm, L->ffn_norm_b, n, dim, hp->norm_eps);
            ops->matmul(be, s->ff_a, s->h, &L->w_up, n);
            ops->add_bias(be, s->ff_a, L->b_up, n, hp->ffn);
            ops->gelu(be, s->ff_a, (int64_t)n * hp->ffn);
        } else {
            ops->rmsnorm(be, s->h, s->x, L->ffn_norm, n, dim, hp->norm_eps);
            ops->matmul(be, s->ff_a, s->h, &L->w_gate, n);
            ops->matmul(be, s->ff_b, s->h, &L->w_up, n);
            ops->swiglu(be, s->ff_a, s->ff_a, s->ff_b, n, hp->ffn);
        }
        ops->matmul(be, s->h, s->ff_a, &L->w_down, n);
        if (L->b_down) ops->add_bias(be, s->h, L->b_down, n, dim);
        ops->add(be, s->x, s->h, (int64_t)n * dim);
    }
    return 0;
}

/* Final norm + logits for `n_rows` (<= MODEL_LOGIT_ROWS) rows of s->x listed
 * in rows[]; result in s->logits [n_rows][n_vocab]. */
static void compute_logits(model *m, const int *rows, int n_rows) {
    const kp_ops *ops = m->ops;
    scratch *s = &m->s;
    const int dim = m->hp.dim;
    for (int i = 0; i < n_rows; i++)
        ops->copy(m->be, s->h + (size_t)i * dim, s->x + (size_t)rows[i] * dim, (size_t)dim * sizeof(float));
    if (m->hp.arch == ARCH_GPT2)
        ops->layernorm(m->be, s->last, s->h, m->out_norm, m->out_norm_b, n_rows, dim, m->hp.norm_eps);
    else
        ops->rmsnorm(m->be, s->last, s->h, m->out_norm, n_rows, dim, m->hp.norm_eps);
    ops->matmul(m->be, s->logits, s->last, &m->output, n_rows);
}

/* Final norm of rows [t0, t0 + n) of s->x, added to embd [dim] (host). */
static int embed_rows(model *m, int t0, int n, float *embd, kp_err *err) {
    const kp_ops *ops = m->ops;
    scratch *s = &m->s;
    const int dim = m->hp.dim;
    float *tmp = malloc(sizeof *tmp * (size_t)n * dim);
    if (!tmp) return kp_errf(err, KP_ENOMEM, "model: out of memory");
    if (m->hp.arch == ARCH_GPT2)
        ops->layernorm(m->be, s->last, s->x + (size_t)t0 * dim, m->out_norm, m->out_norm_b, n, dim, m->hp.norm_eps);
    else
        ops->rmsnorm(m->be, s->last, s->x + (size_t)t0 * dim, m->out_norm, n, dim, m->hp.norm_eps);
    ops->download(m->be, tmp, s->last, (size_t)n * dim * sizeof(float));
    for (int t = 0; t < n; t++)
        for (int d = 0; d < dim; d++) embd[d] += tmp[(size_t)t * dim + d];
    free(tmp);
    return 0;
}

/* ------------------------------------------------------------------ */
/* 5. model_forward                                                    */

int model_forward(model *m, model_seq *seqs, int n_seqs, kp_err *err) {
    const model_hparams *hp = &m->hp;
    for (int i = 0; i < n_seqs; i++) {
        const model_seq *q = &seqs[i];
        if (q->n_tokens < 0 || (q->n_tokens > 0 && !q->tokens))
            return kp_errf(err, KP_EINVAL, "model: sequence %d: bad token array", i);
        if (q->logits_from < 0 || (q->all_logits && q->n_tokens > 0 && q->logits_from >= q->n_tokens))
            return kp_errf(err, KP_EINVAL, "model: sequence %d: logits_from %d is outside its %d tokens", i,
                           q->logits_from, q->n_tokens);
        if (q->kv->n_pos + q->n_tokens > q->kv->n_ctx)
            return kp_errf(err, KP_ERANGE,
                           "model: sequence %d: %d cached + %d new tokens exceed the context of %d "
                           "tokens",
                           i, q->kv->n_pos, q->n_tokens, q->kv->n_ctx);
        if (model_max_positions(m) && q->kv->n_pos + q->n_tokens > model_max_positions(m))
            return kp_errf(err, KP_ERANGE,
                           "model: sequence %d: %d tokens exceed the model's %d learned positions", i,
                           q->kv->n_pos + q->n_tokens, hp->n_ctx_train);
        for (int t = 0; t < q->n_tokens; t++)
            if (q->tokens[t] < 0 || q->tokens[t] >= hp->n_vocab)
                return kp_errf(err, KP_EINVAL, "model: token id %d is outside the vocabulary (0..%d)",
                               q->tokens[t], hp->n_vocab - 1);
    }
    int rc = ensure_scratch(m, m->n_batch, err);
    if (rc) return rc;

    /* Walk the sequences, filling micro-batches of up to n_batch tokens.
     * done[i] = tokens of sequence i already processed. */
    int *done = calloc((size_t)n_seqs + 1, sizeof *done);
    ubatch_seq *us = calloc((size_t)n_seqs + 1, sizeof *us);
    int *rows = malloc(sizeof *rows * (size_t)m->n_batch);
    int *row_seq = malloc(sizeof *row_seq * (size_t)m->n_batch);
    int *row_dst = malloc(sizeof *row_dst * (size_t)m->n_batch);
    if (!done || !us || !rows || !row_seq || !row_dst) {
        free(done); free(us); free(rows); free(row_seq); free(row_dst);
        return kp_errf(err, KP_ENOMEM, "model: out of memory");
    }
    const size_t nv = (size_t)hp->n_vocab;
    int cur = 0;
    for (;;) {
        int n = 0, n_us = 0;
        while (cur < n_seqs && n < m->n_batch) {
            model_seq *q = &seqs[cur];
            int take = KP_MIN(q->n_tokens - done[cur], m->n_batch - n);
            if (take > 0) {
                ubatch_seq *u = &us[n_us++];
                u->kv = q->kv;
                u->seq = cur;
                u->t0 = n;
                u->n = take;
                u->pos0 = q->kv->n_pos;
                for (int t = 0; t < take; t++) {
                    m->s.ids[n + t] = q->tokens[done[cur] + t];
                    m->s.pos[n + t] = u->pos0 + t;
                    if (m->probe_seq) m->probe_seq[n + t] = cur;
                }
                n += take;
                done[cur] += take;
            }
            if (done[cur] >= q->n_tokens) cur++;
            else break; /* batch full */
        }
        if (n == 0) break;
        if (forward_ubatch(m, us, n_us, n)) { /* a layer gate gave up: n_pos unchanged */
            m->ops->sync(m->be);
            free(done); free(us); free(rows); free(row_seq); free(row_dst);
            return kp_errf(err, KP_ECANCELED, "model: forward pass abandoned by its layer gate");
        }

        /* embeddings first: compute_logits reuses the same scratch rows */
        for (int i = 0; i < n_us; i++)
            if (seqs[us[i].seq].embd && (rc = embed_rows(m, us[i].t0, us[i].n, seqs[us[i].seq].embd, err))) {
                m->ops->sync(m->be);
                free(done); free(us); free(rows); free(row_seq); free(row_dst);
                return rc;
            }
        /* which rows need logits, and where they go: all of them at once */
        int n_rows = 0;
        for (int i = 0; i < n_us; i++) {
            ubatch_seq *u = &us[i];
            model_seq *q = &seqs[u->seq];
            u->kv->n_pos += u->n;
            if (!q->logits) continue;
            int first_tok = done[u->seq] - u->n; /* index in q->tokens of row t0 */
            for (int t = 0; t < u->n; t++) {
                int tok_i = first_tok + t;
                if (q->all_logits ? tok_i >= q->logits_from : tok_i == q->n_tokens - 1) {
                    rows[n_rows] = u->t0 + t;
                    row_seq[n_rows] = u->seq;
                    row_dst[n_rows] = q->all_logits ? tok_i - q->logits_from : 0;
                    n_rows++;
                }
            }
        }
        /* in blocks of MODEL_LOGIT_ROWS: the logits scratch stays small
         * ([MODEL_LOGIT_ROWS][n_vocab], not [n_batch][n_vocab]) */
        for (int r0 = 0; r0 < n_rows; r0 += MODEL_LOGIT_ROWS) {
            const int nr = KP_MIN(MODEL_LOGIT_ROWS, n_rows - r0);
            compute_logits(m, rows + r0, nr);
            for (int r = 0; r < nr; r++)
                m->ops->download(m->be, seqs[row_seq[r0 + r]].logits + (size_t)row_dst[r0 + r] * nv,
                                 m->s.logits + (size_t)r * nv, nv * sizeof(float));
        }
        if (cur >= n_seqs) break;
    }
    m->ops->sync(m->be);
    free(done); free(us); free(rows); free(row_seq); free(row_dst);
    return 0;
}

int model_embed(model *m, const int32_t *const *inputs, const int *n_tokens, int n_inputs, int kv_type,
                float *out, kp_err *err) {
    const int dim = m->hp.dim;
    if (n_inputs < 1) return kp_errf(err, KP_EINVAL, "model: no input to embed");
    for (int i = 0; i < n_inputs; i++) {
        if (n_tokens[i] < 1) return kp_errf(err, KP_EINVAL, "model: embedding input %d is empty", i);
        if (n_tokens[i] > m->hp.n_ctx_train)
            return kp_errf(err, KP_ERANGE, "model: embedding input %d has %d tokens, more than the model's "
                           "context of %d", i, n_tokens[i], m->hp.n_ctx_train);
    }
    model_seq *q = calloc((size_t)n_inputs, sizeof *q);
    if (!q) return kp_errf(err, KP_ENOMEM, "model: out of memory");
    memset(out, 0, sizeof *out * (size_t)n_inputs * dim);
    int rc = 0;
    for (int i = 0; i < n_inputs && !rc; i++) {
        rc = model_kv_new(m, &q[i].kv, kv_type, n_tokens[i], err);
        q[i].tokens = inputs[i];
        q[i].n_tokens = n_tokens[i];
        q[i].embd = out + (size_t)i * dim;
    }
    if (!rc) rc = model_forward(m, q, n_inputs, err);
    for (int i = 0; i < n_inputs; i++) {
        if (!rc)
            for (int d = 0; d < dim; d++) q[i].embd[d] /= (float)n_tokens[i];
        kv_free(q[i].kv);
    }
    free(q);
    return rc;
}

/* ------------------------------------------------------------------ */
/* default model lookup                                                */

static int file_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0 && S_ISREG(st.st_mode);
}

static int path_exists(const char *p) {
    struct stat st;
    return stat(p, &st) == 0;
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

int model_find_default(const char *cli, char *buf, size_t cap, kp_err *err) {
    if (cli && *cli) {
        if (strncmp(cli, "synthetic:", 10) != 0 && !path_exists(cli))
            return kp_errf(err, KP_ENOTFOUND, "model file '%s' does not exist", cli);
        snprintf(buf, cap, "%s", cli);
        return 0;
    }
    const char *env = getenv("KVPARK_MODEL");
    if (env && *env) {
        if (strncmp(env, "synthetic:", 10) != 0 && !path_exists(env))
            return kp_errf(err, KP_ENOTFOUND, "$KVPARK_MODEL names '%s', which does not exist", env);
        snprintf(buf, cap, "%s", env);
        return 0;
    }
    DIR *d = opendir("models");
    if (d) {
        char *names[256];
        int n = 0;
        struct dirent *e;
        while ((e = readdir(d)) && n < 256) {
            size_t l = strlen(e->d_name);
            if (l > 5 && !strcmp(e->d_name + l - 5, ".gguf")) names[n++] = strdup(e->d_name);
        }
        closedir(d);
        qsort(names, (size_t)n, sizeof *names, cmp_str);
        int found = 0;
        for (int i = 0; i < n; i++) {
            if (!found) {
                snprintf(buf, cap, "models/%s", names[i]);
                found = file_exists(buf);
            }
            free(names[i]);
        }
        if (found) return 0;
    }
    const char *fallback = "../shared/models/stories260K.gguf";
    if (file_exists(fallback)) {
        snprintf(buf, cap, "%s", fallback);
        return 0;
    }
    return kp_errf(err, KP_ENOTFOUND,
                   "no model found: pass -m FILE.gguf, set $KVPARK_MODEL, or put a GGUF file in "
                   "./models/ (for example stories260K.gguf from the ggml-org/models repository on "
                   "Hugging Face, tinyllamas/stories260K.gguf; kvpark never downloads anything "
                   "itself)");
}

/* "synthetic:NAME[:TYPE]" is written under $TMPDIR once (see synth.h) and
 * that file is used from then on. */
int model_resolve(const char *cli, char *path, size_t cap, kp_err *err) {
    int rc = model_find_default(cli, path, cap, err);
    if (rc) return rc;
    if (strncmp(path, "synthetic:", 10) != 0) return 0;
    char name[128];
    snprintf(name, sizeof name, "%s", path + 10);
    int type = KP_TYPE_F32;
    char *colon = strchr(name, ':');
    if (colon) {
        *colon = 0;
        const char *tn = colon + 1;
        int found = -1;
        for (int t = 0; t < KP_TYPE_COUNT; t++)
            if (kp_type_name(t) && !strcasecmp(kp_type_name(t), tn)) found = t;
        if (found < 0) return kp_errf(err, KP_EINVAL, "unknown tensor type '%s' in '%s'", tn, path);
        type = found;
    }
    const char *tmp = getenv("TMPDIR");
    char out[1024];
    snprintf(out, sizeof out, "%s/kvpark-synthetic-%s-%s.gguf", tmp && *tmp ? tmp : "/tmp", name,
             kp_type_name(type));
    struct stat st;
    if (stat(out, &st) != 0) {
        fprintf(stderr, "kvpark: writing synthetic model %s (%s, ~%.1f GB) to %s\n", name,
                kp_type_name(type), (double)synth_size(name, type) / 1e9, out);
        if ((rc = synth_write(name, type, 1234, out, err))) return rc;
    }
    snprintf(path, cap, "%s", out);
    return 0;
}

