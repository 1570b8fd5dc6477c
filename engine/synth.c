/*
 * synth.c — synthetic GGUF models: the real tensor names, shapes, metadata
 * keys and vocabulary size of a known model, with seeded random weights
 * (contract in synth.h).
 *
 * Why: speed and memory must be measured at real sizes (a Llama-3-8B is 16 GB
 * at BF16) on machines where the real weights are not available. The files
 * use llama.cpp's names and keys, so the same loader path runs as for a
 * downloaded model.
 *
 * How
 *   - A table of shapes (synth_specs) describes each model; build_writer()
 *     turns one into a gguf_writer holding the metadata and one
 *     callback-filled tensor per weight, so the data is produced row by row
 *     while the file is written (nothing model-sized is ever in memory).
 *   - Weights are ~N(0, 0.02): the sum of four 16-bit uniforms from one
 *     splitmix64 draw (Irwin-Hall, cheap: 8 billion values must be quick),
 *     seeded per (seed, tensor, row) so the bytes do not depend on how the
 *     writer chunks the rows. Norm weights are 1 and biases 0, always F32.
 *   - Quantised types come from kp_quant_row (llama.cpp's reference
 *     quantisers). A matrix whose row length is not a multiple of the type's
 *     block size gets a fallback type as llama-quantize does: Q4_0 (for Q4_K)
 *     or Q8_0 (for Q6_K) when the row is a multiple of 32, else F16.
 *   - Vocabularies are synthetic but well formed. Byte-level BPE ("gpt2"):
 *     ids 0..255 are GPT-2's byte alphabet in GPT-2's order, then tokens made
 *     by appending one letter to an earlier token, each with its merge
 *     "A B" (so merges[i] builds token 256+i), then the model's special
 *     tokens at their real ids. SentencePiece ("llama", stories260K):
 *     <unk> <s> </s>, the 256 byte tokens <0xXX>, then pieces built the same
 *     way from "▁" and letters, with decreasing scores.
 */
#include "engine/synth.h"

#include <math.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "kernels/types.h"
#include "kernels/cpu/quant.h"

enum synth_arch { SYNTH_LLAMA, SYNTH_QWEN2, SYNTH_GPT2 };
enum synth_vocab { SYNTH_VOCAB_SPM, SYNTH_VOCAB_BPE };

typedef struct synth_spec {
    const char *name;
    enum synth_arch arch;
    int dim, n_layers, n_head, n_kv, ffn, n_vocab, ctx;
    float rope_base; /* 0: no rope keys (gpt2) */
    float eps;
    bool tied;       /* no output.weight: the output reuses token_embd */
    enum synth_vocab vocab;
    const char *pre; /* tokenizer.ggml.pre (BPE) */
    int first_special;               /* BPE: ids >= this are special tokens */
    const char *const *specials;     /* names for first_special, first_special+1, ... */
    const char *filler;              /* printf format (one int) for the rest */
    int filler_base;                 /* filler number = id - first_special - n_named + filler_base; -1: id */
    int bos, eos;
    int add_bos;                     /* -1: no key */
    const char *chat_template;
} synth_spec;

static const char *const llama3_specials[] = {
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>", "<|reserved_special_token_3|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|reserved_special_token_4|>", "<|eot_id|>", NULL,
};
static const char *const qwen2_specials[] = {
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>", NULL,
};
static const char *const gpt2_specials[] = {"<|endoftext|>", NULL};

/* The instruct models' templates (Meta's and Qwen's, abridged to the parts
 * chat_template_detect() and llama.cpp look at). */
static const char llama3_template[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
    "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + "
    "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}";
static const char chatml_template[] =
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
    "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

/* Real shapes. Llama-3.2-1B's context_length is capped at 8192 (the model
 * says 131072, which only matters for KV-cache sizing; its rope scaling
 * tensor rope_freqs.weight is not written either). eos of the Llama-3 and
 * Qwen2.5 shapes is the instruct models' end-of-turn token. */
static const synth_spec synth_specs[] = {
    {"llama-3-8b", SYNTH_LLAMA, 4096, 32, 32, 8, 14336, 128256, 8192, 500000.0f, 1e-5f, false, SYNTH_VOCAB_BPE,
     "llama-bpe", 128000, llama3_specials, "<|reserved_special_token_%d|>", 5, 128000, 128009, 1, llama3_template},
    {"llama-3.2-1b", SYNTH_LLAMA, 2048, 16, 32, 8, 8192, 128256, 8192, 500000.0f, 1e-5f, true, SYNTH_VOCAB_BPE,
     "llama-bpe", 128000, llama3_specials, "<|reserved_special_token_%d|>", 5, 128000, 128009, 1, llama3_template},
    {"qwen2.5-0.5b", SYNTH_QWEN2, 896, 24, 14, 2, 4864, 151936, 32768, 1000000.0f, 1e-6f, true, SYNTH_VOCAB_BPE,
     "qwen2", 151643, qwen2_specials, "[PAD%d]", -1, 151643, 151645, 0, chatml_template},
    {"qwen2.5-7b", SYNTH_QWEN2, 3584, 28, 28, 4, 18944, 152064, 32768, 1000000.0f, 1e-6f, false, SYNTH_VOCAB_BPE,
     "qwen2", 151643, qwen2_specials, "[PAD%d]", -1, 151643, 151645, 0, chatml_template},
    {"gpt2-124m", SYNTH_GPT2, 768, 12, 12, 12, 3072, 50257, 1024, 0.0f, 1e-5f, false, SYNTH_VOCAB_BPE, "gpt-2",
     50256, gpt2_specials, NULL, 0, 50256, 50256, 0, NULL},
    {"stories260k-shape", SYNTH_LLAMA, 64, 5, 8, 4, 172, 512, 2048, 10000.0f, 1e-5f, false, SYNTH_VOCAB_SPM, NULL,
     0, NULL, NULL, 0, 1, 2, -1, NULL},
    /* the small random-weight models in ../shared/models, for tests */
    {"tiny-llama-256-shape", SYNTH_LLAMA, 256, 2, 4, 2, 512, 512, 256, 10000.0f, 1e-5f, false, SYNTH_VOCAB_SPM, NULL,
     0, NULL, NULL, 0, 1, 2, -1, NULL},
    {"tiny-qwen2-shape", SYNTH_QWEN2, 32, 2, 4, 2, 256, 50257, 256, 1000000.0f, 1e-6f, true, SYNTH_VOCAB_BPE, "qwen2",
     50256, gpt2_specials, NULL, 0, 50256, 50256, 0, NULL},
    {"tiny-gpt2-shape", SYNTH_GPT2, 32, 2, 4, 4, 512, 50257, 256, 0.0f, 1e-5f, false, SYNTH_VOCAB_BPE, "gpt-2", 50256,
     gpt2_specials, NULL, 0, 50256, 50256, 0, NULL},
};

static const char *const synth_name_list[] = {
    "llama-3-8b", "llama-3.2-1b", "qwen2.5-0.5b", "qwen2.5-7b", "gpt2-124m", "stories260k-shape",
    "tiny-llama-256-shape", "tiny-qwen2-shape", "tiny-gpt2-shape", NULL,
};

const char *const *synth_names(void) { return synth_name_list; }

static const synth_spec *find_spec(const char *name) {
    for (size_t i = 0; name && i < KP_ARRAY_LEN(synth_specs); i++)
        if (strcmp(synth_specs[i].name, name) == 0) return &synth_specs[i];
    return NULL;
}

static const char *arch_name(enum synth_arch a) {
    return a == SYNTH_QWEN2 ? "qwen2" : a == SYNTH_GPT2 ? "gpt2" : "llama";
}

/* llama.cpp's llama_ftype for general.file_type. */
static int file_type_of(int type) {
    switch (type) {
    case KP_TYPE_F32: return 0;
    case KP_TYPE_F16: return 1;
    case KP_TYPE_Q4_0: return 2;
    case KP_TYPE_Q8_0: return 7;
    case KP_TYPE_Q4_K: return 15; /* Q4_K_M */
    case KP_TYPE_Q6_K: return 18;
    case KP_TYPE_BF16: return 32;
    default: return -1;
    }
}

static bool type_ok(int type) { return file_type_of(type) >= 0; }

/* The type a matrix with rows of ne0 elements gets when `want` is asked for. */
static int matrix_type(int want, int64_t ne0) {
    if (ne0 % kp_type_block(want) == 0) return want;
    if (want == KP_TYPE_Q4_K && ne0 % 32 == 0) return KP_TYPE_Q4_0;
    if (want == KP_TYPE_Q6_K && ne0 % 32 == 0) return KP_TYPE_Q8_0;
    return KP_TYPE_F16;
}

/* ------------------------------------------------------------------------ */
/* vocabulary                                                                */
/* ------------------------------------------------------------------------ */

/* A growing list of NUL-terminated strings in one arena. */
typedef struct strlist {
    char *arena;
    size_t used, cap;
    size_t *offs;
    size_t n, ncap;
} strlist;

static int sl_add(strlist *l, const char *a, size_t an, const char *b, size_t bn) {
    if (l->n == l->ncap) {
        size_t nc = l->ncap ? l->ncap * 2 : 1024;
        size_t *no = realloc(l->offs, nc * sizeof *no);
        if (!no) return KP_ENOMEM;
        l->offs = no;
        l->ncap = nc;
    }
    size_t need = an + bn + 1;
    if (l->used + need > l->cap) {
        size_t nc = l->cap ? l->cap * 2 : 65536;
        while (nc < l->used + need) nc *= 2;
        char *na = realloc(l->arena, nc);
        if (!na) return KP_ENOMEM;
        l->arena = na;
        l->cap = nc;
    }
    char *d = l->arena + l->used;
    memcpy(d, a, an);
    memcpy(d + an, b, bn);
    d[an + bn] = '\0';
    l->offs[l->n++] = l->used;
    l->used += need;
    return 0;
}

static const char *sl_get(const strlist *l, size_t i) { return l->arena + l->offs[i]; }

static void sl_free(strlist *l) {
    free(l->arena);
    free(l->offs);
}

/* Pointer array for gguf_set_arr_str (valid until the list changes). */
static const char **sl_ptrs(const strlist *l) {
    const char **p = malloc((l->n ? l->n : 1) * sizeof *p);
    if (p)
        for (size_t i = 0; i < l->n; i++) p[i] = sl_get(l, i);
    return p;
}

static size_t utf8_put(char *d, unsigned cp) {
    if (cp < 0x80) { d[0] = (char)cp; return 1; }
    if (cp < 0x800) { d[0] = (char)(0xC0 | (cp >> 6)); d[1] = (char)(0x80 | (cp & 0x3F)); return 2; }
    d[0] = (char)(0xE0 | (cp >> 12));
    d[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
    d[2] = (char)(0x80 | (cp & 0x3F));
    return 3;
}

/* GPT-2's byte_encoder in token-id order: token i stands for byte gpt2_byte(i). */
static int gpt2_byte(int i) {
    if (i < 94) return 33 + i;          /* '!'..'~' */
    if (i < 106) return 161 + i - 94;   /* '¡'..'¬' */
    if (i < 188) return 174 + i - 106;  /* '®'..'ÿ' */
    int k = i - 188;                    /* the rest, in byte order: 0..32, 127..160, 173 */
    if (k <= 32) return k;
    if (k <= 32 + 34) return 127 + k - 33;
    return 173;
}

/* Code point of token i (< 256): printable bytes show as themselves, the
 * others as U+0100 + k in byte order (so byte 32, the space, is 'Ġ' U+0120). */
static unsigned gpt2_cp(int i) { return i < 188 ? (unsigned)gpt2_byte(i) : 256u + (unsigned)(i - 188); }

/* Letters new tokens are built from: the word-start mark, then a-z, A-Z, 0-9. */
static int letters(char out[64][4], const char *word_start) {
    int n = 0;
    strcpy(out[n++], word_start);
    for (char c = 'a'; c <= 'z'; c++) out[n][0] = c, out[n++][1] = 0;
    for (char c = 'A'; c <= 'Z'; c++) out[n][0] = c, out[n++][1] = 0;
    for (char c = '0'; c <= '9'; c++) out[n][0] = c, out[n++][1] = 0;
    return n;
}

/* Append `count` tokens made by extending earlier ones with a letter, breadth
 * first (tokens of length 1 first). Single letters already in the vocabulary
 * (BPE) are not added again; `merges` (may be NULL) gets "A B" per token. */
static int grow_tokens(strlist *tok, strlist *merges, size_t count, char let[64][4], int n_let,
                       const size_t *letter_ids) {
    size_t target = tok->n + count;
    /* queue of token ids to extend: the letters, then every new token */
    size_t q = 0;
    size_t *queue = malloc((target + (size_t)n_let) * sizeof *queue);
    if (!queue) return KP_ENOMEM;
    size_t qn = 0;
    int rc = 0;
    if (letter_ids) {
        for (int i = 0; i < n_let; i++) queue[qn++] = letter_ids[i];
    } else {
        /* SPM: the letters themselves become the first pieces */
        for (int i = 0; i < n_let && tok->n < target && rc == 0; i++) {
            rc = sl_add(tok, let[i], strlen(let[i]), "", 0);
            queue[qn++] = tok->n - 1;
        }
    }
    while (tok->n < target && rc == 0) {
        size_t p = queue[q++];
        for (int i = 0; i < n_let && tok->n < target && rc == 0; i++) {
            /* copy the parent text first: sl_add may move the arena */
            char buf[256];
            size_t pn = strlen(sl_get(tok, p));
            if (pn >= sizeof buf - 8) { rc = KP_EINVAL; break; }
            memcpy(buf, sl_get(tok, p), pn);
            size_t ln = strlen(let[i]);
            rc = sl_add(tok, buf, pn, let[i], ln);
            if (rc == 0 && merges) {
                char m[300];
                memcpy(m, buf, pn);
                m[pn] = ' ';
                rc = sl_add(merges, m, pn + 1, let[i], ln);
            }
            queue[qn++] = tok->n - 1;
        }
    }
    free(queue);
    return rc;
}

static int set_vocab(gguf_writer *w, const synth_spec *s, kp_err *err) {
    strlist tok = {0}, merges = {0};
    int32_t *types = malloc((size_t)s->n_vocab * sizeof *types);
    float *scores = NULL;
    int rc = types ? 0 : KP_ENOMEM;
    char let[64][4];
    if (s->vocab == SYNTH_VOCAB_SPM) {
        int n_let = letters(let, "\xe2\x96\x81"); /* ▁ */
        scores = malloc((size_t)s->n_vocab * sizeof *scores);
        if (!scores) rc = KP_ENOMEM;
        const char *head[3] = {"<unk>", "<s>", "</s>"};
        for (int i = 0; i < 3 && rc == 0; i++) {
            rc = sl_add(&tok, head[i], strlen(head[i]), "", 0);
            types[i] = i == 0 ? 2 : 3;
        }
        for (int b = 0; b < 256 && rc == 0; b++) {
            char t[8];
            snprintf(t, sizeof t, "<0x%02X>", b);
            rc = sl_add(&tok, t, 6, "", 0);
            types[3 + b] = 6;
        }
        if (rc == 0 && s->n_vocab > 259)
            rc = grow_tokens(&tok, NULL, (size_t)s->n_vocab - 259, let, n_let, NULL);
        for (int i = 0; i < s->n_vocab && rc == 0; i++) {
            scores[i] = i < 259 ? 0.0f : -(float)(i - 259);
            if (i >= 259) types[i] = 1;
        }
        if (rc == 0) {
            const char **p = sl_ptrs(&tok);
            if (!p) rc = KP_ENOMEM;
            if (rc == 0) rc = gguf_set_str(w, "tokenizer.ggml.model", "llama");
            if (rc == 0) rc = gguf_set_arr_str(w, "tokenizer.ggml.tokens", p, tok.n);
            if (rc == 0) rc = gguf_set_arr(w, "tokenizer.ggml.scores", GGUF_VT_FLOAT32, scores, tok.n);
            if (rc == 0) rc = gguf_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, types, tok.n);
            if (rc == 0) rc = gguf_set_u32(w, "tokenizer.ggml.unknown_token_id", 0);
            free(p);
        }
    } else {
        int n_let = letters(let, "\xc4\xa0"); /* Ġ, GPT-2's space */
        size_t letter_ids[64];
        for (int i = 0; i < 256 && rc == 0; i++) {
            char t[4];
            size_t n = utf8_put(t, gpt2_cp(i));
            rc = sl_add(&tok, t, n, "", 0);
            types[i] = 1;
        }
        for (int i = 0; i < n_let; i++) {
            int b = i == 0 ? ' ' : (unsigned char)let[i][0];
            for (size_t id = 0; id < 256; id++)
                if (gpt2_byte((int)id) == b) letter_ids[i] = id;
        }
        if (rc == 0)
            rc = grow_tokens(&tok, &merges, (size_t)s->first_special - 256, let, n_let, letter_ids);
        int n_named = 0;
        while (s->specials[n_named]) n_named++;
        for (int id = s->first_special; id < s->n_vocab && rc == 0; id++) {
            int k = id - s->first_special;
            char t[64];
            if (k < n_named)
                snprintf(t, sizeof t, "%s", s->specials[k]);
            else
                snprintf(t, sizeof t, s->filler, s->filler_base < 0 ? id : k - n_named + s->filler_base);
            rc = sl_add(&tok, t, strlen(t), "", 0);
            types[id] = 3;
        }
        for (int id = 256; id < s->first_special; id++) types[id] = 1;
        if (rc == 0) {
            const char **p = sl_ptrs(&tok), **m = sl_ptrs(&merges);
            if (!p || !m) rc = KP_ENOMEM;
            if (rc == 0) rc = gguf_set_str(w, "tokenizer.ggml.model", "gpt2");
            if (rc == 0) rc = gguf_set_str(w, "tokenizer.ggml.pre", s->pre);
            if (rc == 0) rc = gguf_set_arr_str(w, "tokenizer.ggml.tokens", p, tok.n);
            if (rc == 0) rc = gguf_set_arr(w, "tokenizer.ggml.token_type", GGUF_VT_INT32, types, tok.n);
            if (rc == 0) rc = gguf_set_arr_str(w, "tokenizer.ggml.merges", m, merges.n);
            free(p);
            free(m);
        }
    }
    if (rc == 0 && tok.n != (size_t)s->n_vocab) rc = KP_EINVAL;
    if (rc == 0) rc = gguf_set_u32(w, "tokenizer.ggml.bos_token_id", (uint32_t)s->bos);
    if (rc == 0) rc = gguf_set_u32(w, "tokenizer.ggml.eos_token_id", (uint32_t)s->eos);
    if (rc == 0 && s->add_bos >= 0) rc = gguf_set_bool(w, "tokenizer.ggml.add_bos_token", s->add_bos != 0);
    if (rc == 0 && s->chat_template) rc = gguf_set_str(w, "tokenizer.chat_template", s->chat_template);
    sl_free(&tok);
    sl_free(&merges);
    free(types);
    free(scores);
    if (rc) return kp_errf(err, rc, "synth: %s: building the vocabulary failed (%s)", s->name, kp_strerror(rc));
    return 0;
}

/* ------------------------------------------------------------------------ */
/* weights                                                                   */
/* ------------------------------------------------------------------------ */

enum synth_fill { FILL_RANDOM, FILL_ONES, FILL_ZEROS };

typedef struct synth_ctx {
    uint64_t seed;
    /* per tensor, indexed by the writer's tensor index */
    uint8_t *fill;    /* enum synth_fill */
    int *type;
    int64_t *ne0;
} synth_ctx;

static uint64_t splitmix64(uint64_t *s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* n values ~ N(0, sd): Irwin-Hall sum of four 16-bit uniforms, centred and
 * scaled to unit variance (variance of the sum is 4/12). */
static void rand_normal_row(float *x, int64_t n, uint64_t state, float sd) {
    const float scale = sd * 1.7320508f / 65536.0f; /* sqrt(3) / 2^16 */
    for (int64_t i = 0; i < n; i++) {
        uint64_t r = splitmix64(&state);
        uint32_t s = (uint32_t)(r & 0xffff) + (uint32_t)((r >> 16) & 0xffff) + (uint32_t)((r >> 32) & 0xffff) +
                     (uint32_t)(r >> 48);
        x[i] = ((float)s - 131070.0f) * scale; /* mean of the sum is 4 * 65535 / 2 */
    }
}

static int synth_fill_cb(void *vctx, int64_t ti, void *dst, uint64_t offset, size_t nbytes, kp_err *err) {
    const synth_ctx *c = vctx;
    int type = c->type[ti];
    int64_t ne0 = c->ne0[ti];
    size_t row_bytes = kp_type_row_bytes(type, ne0);
    float *row = malloc((size_t)ne0 * sizeof *row);
    if (!row) return kp_errf(err, KP_ENOMEM, "synth: out of memory for a row of %lld floats", (long long)ne0);
    uint64_t r0 = offset / row_bytes, nr = nbytes / row_bytes;
    uint8_t *out = dst;
    int rc = 0;
    for (uint64_t r = 0; r < nr && rc == 0; r++) {
        switch (c->fill[ti]) {
        case FILL_ONES: for (int64_t i = 0; i < ne0; i++) row[i] = 1.0f; break;
        case FILL_ZEROS: memset(row, 0, (size_t)ne0 * sizeof *row); break;
        default: {
            uint64_t st = c->seed ^ 0x5851f42d4c957f2dull;
            uint64_t h = splitmix64(&st) ^ ((uint64_t)ti * 0xd1342543de82ef95ull);
            h = splitmix64(&h) ^ ((r0 + r) * 0x9e3779b97f4a7c15ull);
            rand_normal_row(row, ne0, h, 0.02f);
        }
        }
        uint8_t *d = out + r * row_bytes;
        switch (type) {
        case KP_TYPE_F32: memcpy(d, row, row_bytes); break;
        case KP_TYPE_F16:
            for (int64_t i = 0; i < ne0; i++) {
                uint16_t h = kp_f32_to_fp16(row[i]);
                memcpy(d + 2 * i, &h, 2);
            }
            break;
        case KP_TYPE_BF16:
            for (int64_t i = 0; i < ne0; i++) {
                uint16_t h = kp_f32_to_bf16(row[i]);
                memcpy(d + 2 * i, &h, 2);
            }
            break;
        default:
            rc = kp_quant_row(type, row, d, ne0);
            if (rc) rc = kp_errf(err, rc, "synth: quantising a row of %lld to %s failed", (long long)ne0,
                                 kp_type_name(type));
        }
    }
    free(row);
    return rc;
}

/* ------------------------------------------------------------------------ */
/* the model                                                                 */
/* ------------------------------------------------------------------------ */

typedef struct synth_build {
    gguf_writer *w;
    synth_ctx ctx;
    size_t n, cap;
    int want_type;
} synth_build;

static int add_t(synth_build *b, const char *name, int64_t ne0, int64_t ne1, enum synth_fill fill, kp_err *err) {
    if (b->n == b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 64;
        uint8_t *f = realloc(b->ctx.fill, cap);
        if (f) b->ctx.fill = f;
        int *t = realloc(b->ctx.type, cap * sizeof *t);
        if (t) b->ctx.type = t;
        int64_t *e = realloc(b->ctx.ne0, cap * sizeof *e);
        if (e) b->ctx.ne0 = e;
        if (!f || !t || !e) return kp_errf(err, KP_ENOMEM, "synth: out of memory");
        b->cap = cap;
    }
    int n_dims = ne1 > 0 ? 2 : 1;
    int type = n_dims == 1 ? KP_TYPE_F32 : matrix_type(b->want_type, ne0);
    int64_t ne[2] = {ne0, ne1};
    b->ctx.fill[b->n] = (uint8_t)fill;
    b->ctx.type[b->n] = type;
    b->ctx.ne0[b->n] = ne0;
    b->n++;
    return gguf_add_tensor_cb(b->w, name, type, n_dims, ne, synth_fill_cb, &b->ctx, err);
}

static int add_layer_t(synth_build *b, int layer, const char *suffix, int64_t ne0, int64_t ne1,
                       enum synth_fill fill, kp_err *err) {
    char name[96];
    snprintf(name, sizeof name, "blk.%d.%s", layer, suffix);
    return add_t(b, name, ne0, ne1, fill, err);
}

static int set_key_u32(gguf_writer *w, const char *arch, const char *key, uint32_t v) {
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_set_u32(w, k, v);
}

static int set_key_f32(gguf_writer *w, const char *arch, const char *key, float v) {
    char k[128];
    snprintf(k, sizeof k, "%s.%s", arch, key);
    return gguf_set_f32(w, k, v);
}

static int build(synth_build *b, const synth_spec *s, int type, uint64_t seed, kp_err *err) {
    memset(b, 0, sizeof *b);
    b->w = gguf_writer_new();
    if (!b->w) return kp_errf(err, KP_ENOMEM, "synth: out of memory");
    b->want_type = type;
    b->ctx.seed = seed;
    gguf_writer *w = b->w;
    const char *arch = arch_name(s->arch);
    int hd = s->dim / s->n_head;
    char gname[96];
    snprintf(gname, sizeof gname, "synthetic:%s", s->name);
    int rc = 0;
    if (rc == 0) rc = gguf_set_str(w, "general.architecture", arch);
    if (rc == 0) rc = gguf_set_str(w, "general.name", gname);
    if (rc == 0) rc = gguf_set_u32(w, "general.file_type", (uint32_t)file_type_of(type));
    if (rc == 0 && kp_type_block(type) > 1) rc = gguf_set_u32(w, "general.quantization_version", 2);
    if (rc == 0) rc = gguf_set_u64(w, "kvpark.synthetic.seed", seed);
    if (rc == 0) rc = set_key_u32(w, arch, "context_length", (uint32_t)s->ctx);
    if (rc == 0) rc = set_key_u32(w, arch, "embedding_length", (uint32_t)s->dim);
    if (rc == 0) rc = set_key_u32(w, arch, "block_count", (uint32_t)s->n_layers);
    if (rc == 0) rc = set_key_u32(w, arch, "feed_forward_length", (uint32_t)s->ffn);
    if (rc == 0) rc = set_key_u32(w, arch, "attention.head_count", (uint32_t)s->n_head);
    if (rc == 0) rc = set_key_u32(w, arch, "vocab_size", (uint32_t)s->n_vocab);
    if (s->arch == SYNTH_GPT2) {
        if (rc == 0) rc = set_key_f32(w, arch, "attention.layer_norm_epsilon", s->eps);
    } else {
        if (rc == 0) rc = set_key_u32(w, arch, "attention.head_count_kv", (uint32_t)s->n_kv);
        if (rc == 0) rc = set_key_f32(w, arch, "rope.freq_base", s->rope_base);
        if (rc == 0) rc = set_key_u32(w, arch, "rope.dimension_count", (uint32_t)hd);
        if (rc == 0) rc = set_key_f32(w, arch, "attention.layer_norm_rms_epsilon", s->eps);
    }
    if (rc) return kp_errf(err, rc, "synth: %s: setting metadata failed", s->name);
    if ((rc = set_vocab(w, s, err))) return rc;

    int64_t dim = s->dim, q = (int64_t)s->n_head * hd, kv = (int64_t)s->n_kv * hd, ffn = s->ffn;
    bool gpt2 = s->arch == SYNTH_GPT2, bias = s->arch == SYNTH_QWEN2;
#define ADD(...) do { if ((rc = add_t(b, __VA_ARGS__, err))) return rc; } while (0)
#define ADDL(...) do { if ((rc = add_layer_t(b, __VA_ARGS__, err))) return rc; } while (0)
    ADD("token_embd.weight", dim, s->n_vocab, FILL_RANDOM);
    if (gpt2) ADD("position_embd.weight", dim, s->ctx, FILL_RANDOM);
    ADD("output_norm.weight", dim, 0, FILL_ONES);
    if (gpt2) ADD("output_norm.bias", dim, 0, FILL_ZEROS);
    if (!s->tied) ADD("output.weight", dim, s->n_vocab, FILL_RANDOM);
    for (int l = 0; l < s->n_layers; l++) {
        ADDL(l, "attn_norm.weight", dim, 0, FILL_ONES);
        if (gpt2) {
            ADDL(l, "attn_norm.bias", dim, 0, FILL_ZEROS);
            ADDL(l, "attn_qkv.weight", dim, 3 * dim, FILL_RANDOM);
            ADDL(l, "attn_qkv.bias", 3 * dim, 0, FILL_ZEROS);
            ADDL(l, "attn_output.weight", dim, dim, FILL_RANDOM);
            ADDL(l, "attn_output.bias", dim, 0, FILL_ZEROS);
            ADDL(l, "ffn_norm.weight", dim, 0, FILL_ONES);
            ADDL(l, "ffn_norm.bias", dim, 0, FILL_ZEROS);
            ADDL(l, "ffn_up.weight", dim, ffn, FILL_RANDOM);
            ADDL(l, "ffn_up.bias", ffn, 0, FILL_ZEROS);
            ADDL(l, "ffn_down.weight", ffn, dim, FILL_RANDOM);
            ADDL(l, "ffn_down.bias", dim, 0, FILL_ZEROS);
            continue;
        }
        ADDL(l, "attn_q.weight", dim, q, FILL_RANDOM);
        if (bias) ADDL(l, "attn_q.bias", q, 0, FILL_ZEROS);
        ADDL(l, "attn_k.weight", dim, kv, FILL_RANDOM);
        if (bias) ADDL(l, "attn_k.bias", kv, 0, FILL_ZEROS);
        ADDL(l, "attn_v.weight", dim, kv, FILL_RANDOM);
        if (bias) ADDL(l, "attn_v.bias", kv, 0, FILL_ZEROS);
        ADDL(l, "attn_output.weight", q, dim, FILL_RANDOM);
        ADDL(l, "ffn_norm.weight", dim, 0, FILL_ONES);
        ADDL(l, "ffn_gate.weight", dim, ffn, FILL_RANDOM);
        ADDL(l, "ffn_up.weight", dim, ffn, FILL_RANDOM);
        ADDL(l, "ffn_down.weight", ffn, dim, FILL_RANDOM);
    }
#undef ADD
#undef ADDL
    return 0;
}

static void build_free(synth_build *b) {
    gguf_writer_free(b->w);
    free(b->ctx.fill);
    free(b->ctx.type);
    free(b->ctx.ne0);
}

static int check_args(const synth_spec *s, const char *name, int type, kp_err *err) {
    if (!s) {
        char list[512] = "";
        for (const char *const *n = synth_name_list; *n; n++) {
            strncat(list, *n, sizeof list - strlen(list) - 1);
            if (n[1]) strncat(list, ", ", sizeof list - strlen(list) - 1);
        }
        return kp_errf(err, KP_ENOTFOUND, "synth: unknown model '%s' (known: %s)", name ? name : "(null)", list);
    }
    if (!type_ok(type))
        return kp_errf(err, KP_EUNSUP, "synth: type %d (%s) is not offered; use F32, F16, BF16, Q8_0, Q4_0, Q4_K or Q6_K",
                       type, kp_type_name(type) ? kp_type_name(type) : "unknown");
    return 0;
}

int synth_write(const char *name, int type, uint64_t seed, const char *path, kp_err *err) {
    const synth_spec *s = find_spec(name);
    int rc = check_args(s, name, type, err);
    if (rc) return rc;
    if (!path) return kp_errf(err, KP_EINVAL, "synth: path is NULL");
    synth_build b;
    rc = build(&b, s, type, seed, err);
    if (rc == 0) rc = gguf_writer_write(b.w, path, err);
    build_free(&b);
    return rc;
}

int64_t synth_size(const char *name, int type) {
    const synth_spec *s = find_spec(name);
    if (check_args(s, name, type, NULL)) return -1;
    synth_build b;
    uint64_t size = 0;
    int rc = build(&b, s, type, 0, NULL);
    if (rc == 0) rc = gguf_writer_size(b.w, &size, NULL);
    build_free(&b);
    return rc ? -1 : (int64_t)size;
}
