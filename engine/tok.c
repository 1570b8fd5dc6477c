/*
 * tok.c — SentencePiece-style (SPM) and byte-level BPE tokenizers read from a
 * GGUF file's `tokenizer.ggml.*` keys (contract in tok.h).
 *
 * Why this shape: the ids must be exactly those llama.cpp produces (golden
 * tests, prompt caches and session files are keyed by token ids), so every
 * step below mirrors llama-vocab.cpp / unicode.cpp, including their quirks:
 *
 *   encode  = split out special-token text (tokenizer_st_partition)
 *             -> per text fragment: SPM (escape spaces, greedy best-score
 *                bigram merging, byte fallback) or BPE (pre-tokenizer regex
 *                split, GPT-2 byte->unicode mapping, lowest-rank merging)
 *   decode  = per-token pieces (cached at load), SPM leading-space removal,
 *             BPE "clean spaces" passes.
 *
 * Where things are:
 *   tok.c         the core: vocabulary loading (tokens, scores, types,
 *                 merges, special tokens, piece cache), the merge queue both
 *                 tokenizers use, SPM, special-token partitioning, encode /
 *                 decode and the public tok_* API;
 *   tok_bpe.c     BPE: a fragment's code points, pre-tokens, GPT-2 byte
 *                 images and lowest-rank merging;
 *   tok_pretok.c  the BPE pre-tokenizers (the regexes of gpt-2, llama3,
 *                 qwen2, deepseek, falcon, starcoder, default), as small
 *                 hand-written matchers (no regex library): the GPT-2 and
 *                 LLaMA-3 ones port llama.cpp's own custom matchers, the
 *                 others reproduce what std::regex does with the patterns
 *                 llama.cpp gives it;
 *   tok_impl.h    what they share: struct tok_vocab, the merge queue and
 *                 UTF-8 helpers, the two internal entry points.
 *   tok_unicode.c the generated Unicode tables.
 *
 * Everything a vocabulary needs lives in one tok_vocab (immutable after
 * tok_load, so one vocab may be shared by threads); every encode call uses
 * only its own scratch memory.
 */
#include "engine/tok.h"

#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tok_impl.h"

static const char *const pre_names[] = {
    [PRE_DEFAULT] = "default",          [PRE_GPT2] = "gpt-2",
    [PRE_LLAMA3] = "llama3",            [PRE_QWEN2] = "qwen2",
    [PRE_DEEPSEEK_LLM] = "deepseek-llm", [PRE_DEEPSEEK_CODER] = "deepseek-coder",
    [PRE_FALCON] = "falcon",            [PRE_STARCODER] = "starcoder",
};

/* tokenizer.ggml.pre names llama.cpp knows whose regexes we implement, with
 * the per-name options llama.cpp sets (llama_vocab::impl::load). */
static const struct pre_entry {
    const char *name;
    int pre;
    bool clean_spaces;  /* detokenizer " ," -> "," etc. */
    bool ignore_merges; /* a whole pre-token that is in the vocab is used as is */
    bool add_bos;       /* default of add_bos for this pre-tokenizer */
} pre_table[] = {
    {"default", PRE_DEFAULT, true, false, false},
    {"llama3", PRE_LLAMA3, true, true, true},
    {"llama-v3", PRE_LLAMA3, true, true, true},
    {"llama-bpe", PRE_LLAMA3, true, true, true},
    {"falcon3", PRE_LLAMA3, true, true, true},
    {"pixtral", PRE_LLAMA3, true, true, true},
    {"dbrx", PRE_LLAMA3, true, false, false},
    {"smaug-bpe", PRE_LLAMA3, true, false, false},
    {"chatglm-bpe", PRE_LLAMA3, true, false, false},
    {"glm4", PRE_LLAMA3, true, false, false},
    {"deepseek-llm", PRE_DEEPSEEK_LLM, false, false, false},
    {"deepseek-coder", PRE_DEEPSEEK_CODER, false, false, false},
    {"falcon", PRE_FALCON, true, false, false},
    {"mpt", PRE_GPT2, true, false, false},
    {"starcoder", PRE_STARCODER, true, false, false},
    {"refact", PRE_STARCODER, true, false, false},
    {"command-r", PRE_STARCODER, false, false, false},
    {"smollm", PRE_STARCODER, false, false, false},
    {"codeshell", PRE_STARCODER, true, false, false},
    {"exaone", PRE_STARCODER, true, false, false},
    {"minerva-7b", PRE_STARCODER, true, false, false},
    {"gpt-2", PRE_GPT2, true, false, false},
    {"phi-2", PRE_GPT2, true, false, false},
    {"jina-es", PRE_GPT2, true, false, false},
    {"jina-de", PRE_GPT2, true, false, false},
    {"gigachat", PRE_GPT2, true, false, false},
    {"jina-v1-en", PRE_GPT2, true, false, false},
    {"jina-v2-es", PRE_GPT2, true, false, false},
    {"jina-v2-de", PRE_GPT2, true, false, false},
    {"jina-v2-code", PRE_GPT2, true, false, false},
    {"roberta-bpe", PRE_GPT2, true, false, false},
    {"olmo", PRE_GPT2, true, false, false},
    {"jais", PRE_GPT2, true, false, false},
    {"exaone4", PRE_GPT2, true, false, false},
    {"trillion", PRE_GPT2, false, false, false},
    {"qwen2", PRE_QWEN2, false, false, false},
    {"deepseek-r1-qwen", PRE_QWEN2, false, false, false},
    {"stablelm2", PRE_QWEN2, true, false, false},
    {"megrez", PRE_QWEN2, true, false, false},
    {"hunyuan", PRE_QWEN2, false, false, false},
};

/* ------------------------------------------------------------------------ */
/* Small helpers: growable id vector, hashing, UTF-8.                        */

void tok_ivec_push(ivec *a, int32_t x)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 64;
        int32_t *p = realloc(a->v, cap * sizeof(*p));
        if (!p) {
            a->oom = 1;
            return;
        }
        a->v = p;
        a->cap = cap;
    }
    a->v[a->n++] = x;
}

static uint32_t ht_size_for(size_t n)
{
    uint32_t sz = 16;
    while (sz < 2 * n + 1)
        sz *= 2;
    return sz;
}

/* Number of bytes of the UTF-8 sequence a lead byte announces, as llama.cpp's
 * unicode_len_utf8 (continuation and invalid bytes count as 1). */
static size_t utf8_len(uint8_t c)
{
    static const uint8_t lookup[16] = {1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 3, 4};
    return lookup[c >> 4];
}

/* Decode one code point at s[*i] as llama.cpp's unicode_cpt_from_utf8 does;
 * an invalid sequence consumes one byte and gives U+FFFD. */
uint32_t tok_utf8_next(const uint8_t *s, size_t n, size_t *i)
{
    size_t o = *i;
    uint8_t c = s[o];
    if (!(c & 0x80)) {
        *i = o + 1;
        return c;
    }
    if (!(c & 0x40))
        goto bad;
    if (!(c & 0x20)) {
        if (o + 1 >= n || (s[o + 1] & 0xc0) != 0x80)
            goto bad;
        *i = o + 2;
        return ((uint32_t)(c & 0x1f) << 6) | (s[o + 1] & 0x3f);
    }
    if (!(c & 0x10)) {
        if (o + 2 >= n || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80)
            goto bad;
        *i = o + 3;
        return ((uint32_t)(c & 0x0f) << 12) | ((uint32_t)(s[o + 1] & 0x3f) << 6) |
               (s[o + 2] & 0x3f);
    }
    if (!(c & 0x08)) {
        if (o + 3 >= n || (s[o + 1] & 0xc0) != 0x80 || (s[o + 2] & 0xc0) != 0x80 ||
            (s[o + 3] & 0xc0) != 0x80)
            goto bad;
        *i = o + 4;
        return ((uint32_t)(c & 0x07) << 18) | ((uint32_t)(s[o + 1] & 0x3f) << 12) |
               ((uint32_t)(s[o + 2] & 0x3f) << 6) | (s[o + 3] & 0x3f);
    }
bad:
    *i = o + 1;
    return 0xFFFD;
}

/* Encode a code point; returns the byte count (1..4). Values past U+10FFFF
 * (which the decoder above can produce from F4..F7 lead bytes; llama.cpp
 * throws on them) keep their 4-byte form. */
int tok_utf8_put(uint32_t c, char *out)
{
    if (c < 0x80) {
        out[0] = (char)c;
        return 1;
    }
    if (c < 0x800) {
        out[0] = (char)(0xc0 | (c >> 6));
        out[1] = (char)(0x80 | (c & 0x3f));
        return 2;
    }
    if (c < 0x10000) {
        out[0] = (char)(0xe0 | (c >> 12));
        out[1] = (char)(0x80 | ((c >> 6) & 0x3f));
        out[2] = (char)(0x80 | (c & 0x3f));
        return 3;
    }
    out[0] = (char)(0xf0 | ((c >> 18) & 0x07));
    out[1] = (char)(0x80 | ((c >> 12) & 0x3f));
    out[2] = (char)(0x80 | ((c >> 6) & 0x3f));
    out[3] = (char)(0x80 | (c & 0x3f));
    return 4;
}

/* Inverse of bpe_byte_to_cpt (tok_bpe.c); -1 if the code point is not a byte
 * image. */
static int bpe_cpt_to_byte(uint32_t c)
{
    if ((c >= 0x21 && c <= 0x7e) || (c >= 0xa1 && c <= 0xac) || (c >= 0xae && c <= 0xff))
        return (int)c;
    if (c >= 256 && c <= 256 + 32)
        return (int)(c - 256);
    if (c >= 256 + 33 && c <= 256 + 66)
        return (int)(c - 256 - 33 + 0x7f);
    if (c == 256 + 67)
        return 0xad;
    return -1;
}

/* ------------------------------------------------------------------------ */
/* Lookups.                                                                  */

static const char *tok_str(const tok_vocab *v, int32_t id)
{
    return v->text + v->text_off[id];
}

int32_t tok_find(const tok_vocab *v, const char *s, size_t len)
{
    if (!v || (!s && len))
        return -1;
    uint32_t h = (uint32_t)fnv_update(FNV_INIT, s, len);
    for (uint32_t i = h & v->tok_mask;; i = (i + 1) & v->tok_mask) {
        int32_t id = v->tok_ht[i];
        if (id < 0)
            return -1;
        if (v->text_len[id] == len && memcmp(tok_str(v, id), s, len) == 0)
            return id;
    }
}

/* ------------------------------------------------------------------------ */
/* Priority queue of candidate merges (binary heap), shared by SPM and BPE.  */
/* SPM: highest score first; BPE: lowest rank first (stored as -rank).       */
/* Ties: leftmost first, as llama.cpp's comparators.                         */

static int bigram_before(const bigram *a, const bigram *b)
{
    return a->prio > b->prio || (a->prio == b->prio && a->left < b->left);
}

void tok_heap_push(heap *h, bigram b)
{
    if (h->n == h->cap) {
        size_t cap = h->cap ? h->cap * 2 : 64;
        bigram *p = realloc(h->v, cap * sizeof(*p));
        if (!p) {
            h->oom = 1;
            return;
        }
        h->v = p;
        h->cap = cap;
    }
    size_t i = h->n++;
    while (i > 0) {
        size_t parent = (i - 1) / 2;
        if (!bigram_before(&b, &h->v[parent]))
            break;
        h->v[i] = h->v[parent];
        i = parent;
    }
    h->v[i] = b;
}

bigram tok_heap_pop(heap *h)
{
    bigram top = h->v[0];
    bigram last = h->v[--h->n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= h->n)
            break;
        if (c + 1 < h->n && bigram_before(&h->v[c + 1], &h->v[c]))
            c++;
        if (!bigram_before(&h->v[c], &last))
            break;
        h->v[i] = h->v[c];
        i = c;
    }
    if (h->n)
        h->v[i] = last;
    return top;
}

void tok_symbols_free(symbols *s)
{
    free(s->prev);
    free(s->next);
    free(s->off);
    free(s->len);
}

/* Split text into UTF-8 characters (by lead byte, clipped at the end). */
int tok_symbols_init(symbols *s, const char *text, size_t len)
{
    memset(s, 0, sizeof(*s));
    s->prev = malloc((len + 1) * sizeof(int32_t));
    s->next = malloc((len + 1) * sizeof(int32_t));
    s->off = malloc((len + 1) * sizeof(uint32_t));
    s->len = malloc((len + 1) * sizeof(uint32_t));
    if (!s->prev || !s->next || !s->off || !s->len) {
        tok_symbols_free(s);
        return KP_ENOMEM;
    }
    size_t off = 0, n = 0;
    while (off < len) {
        size_t l = utf8_len((uint8_t)text[off]);
        if (l > len - off)
            l = len - off;
        s->off[n] = (uint32_t)off;
        s->len[n] = (uint32_t)l;
        s->prev[n] = (int32_t)n - 1;
        off += l;
        s->next[n] = off == len ? -1 : (int32_t)n + 1;
        n++;
    }
    s->n = n;
    return 0;
}

/* Merge symbol `right` into `left` (its successor). */
void tok_symbols_merge(symbols *s, int32_t left, int32_t right)
{
    s->len[left] += s->len[right];
    s->len[right] = 0;
    s->next[left] = s->next[right];
    if (s->next[right] >= 0)
        s->prev[s->next[right]] = left;
}

/* ------------------------------------------------------------------------ */
/* SPM (llm_tokenizer_spm_session).                                          */

#define PAIR_LOG2 21
#define PAIR_WORDS ((1u << PAIR_LOG2) / 64)

static uint32_t pair_slot(const char *p, size_t n)
{
    return (uint32_t)(fnv_update(FNV_INIT, p, n) >> (64 - PAIR_LOG2));
}

/* May a token contain the characters p[0..l1) p[l1..l1+l2) side by side?
 * (false positives only cost speed) */
static bool pair_possible(const tok_vocab *v, const char *p, size_t l1, size_t l2)
{
    uint32_t h = pair_slot(p, l1 + l2);
    return (v->pair_bits[h / 64] >> (h % 64)) & 1;
}

static int spm_tokenize(const tok_vocab *v, const char *text, size_t len, ivec *out);

/* Cut the text where no merge can cross and tokenise each piece. The cuts
 * are at character boundaries of the whole text, so every piece splits into
 * the same characters as it would inside the whole; merges inside different
 * pieces never interact, and the queue order restricted to one piece is the
 * same, so the ids are exactly those of one big session. */
static int spm_tokenize_cut(const tok_vocab *v, const char *text, size_t len, ivec *out)
{
    size_t seg = 0, prev = 0, prev_len = 0;
    for (size_t off = 0; off < len;) {
        size_t l = utf8_len((uint8_t)text[off]);
        if (l > len - off)
            l = len - off;
        if (off > 0 && !pair_possible(v, text + prev, prev_len, l)) {
            int rc = spm_tokenize(v, text + seg, off - seg, out);
            if (rc)
                return rc;
            seg = off;
        }
        prev = off;
        prev_len = l;
        off += l;
    }
    return spm_tokenize(v, text + seg, len - seg, out);
}

static void spm_try_bigram(const tok_vocab *v, const char *text, const symbols *s, heap *h,
                           int32_t left, int32_t right)
{
    if (left < 0 || right < 0)
        return;
    /* adjacent symbols are adjacent in the text */
    uint32_t size = s->len[left] + s->len[right];
    int32_t id = tok_find(v, text + s->off[left], size);
    if (id < 0)
        return;
    tok_heap_push(h, (bigram){v->score[id], left, right, size});
}

static int spm_tokenize(const tok_vocab *v, const char *text, size_t len, ivec *out)
{
    if (len == 0)
        return 0;
    symbols s;
    if (tok_symbols_init(&s, text, len))
        return KP_ENOMEM;
    heap h = {0};
    for (size_t i = 1; i < s.n; i++)
        spm_try_bigram(v, text, &s, &h, (int32_t)i - 1, (int32_t)i);

    /* keep merging the best-scoring pair while one exists */
    while (h.n && !h.oom) {
        bigram b = tok_heap_pop(&h);
        uint32_t ll = s.len[b.left], rl = s.len[b.right];
        if (ll == 0 || rl == 0 || ll + rl != b.size)
            continue; /* stale: one side already merged elsewhere */
        tok_symbols_merge(&s, b.left, b.right);
        spm_try_bigram(v, text, &s, &h, s.prev[b.left], b.left);
        spm_try_bigram(v, text, &s, &h, b.left, s.next[b.left]);
    }

    /* resegment: a symbol is a token, or falls back to byte tokens. (Merged
     * symbols are always tokens, so llama.cpp's rev_merge path never runs.) */
    for (int32_t i = 0; i != -1 && !h.oom; i = s.next[i]) {
        const char *p = text + s.off[i];
        int32_t id = tok_find(v, p, s.len[i]);
        if (id >= 0) {
            tok_ivec_push(out, id);
            continue;
        }
        for (uint32_t j = 0; j < s.len[i]; j++) {
            int32_t b = v->byte_tok[(uint8_t)p[j]];
            if (b < 0)
                b = v->unk; /* llama.cpp throws here; unk is the kind choice */
            if (b >= 0)
                tok_ivec_push(out, b);
        }
    }
    int oom = h.oom;
    free(h.v);
    tok_symbols_free(&s);
    return oom ? KP_ENOMEM : 0;
}

/* ------------------------------------------------------------------------ */
/* Special tokens in the text (tokenizer_st_partition).                      */

typedef struct frag {
    int32_t tok; /* -1: raw text [off, off+len) */
    size_t off, len;
} frag;

typedef struct fvec {
    frag *v;
    size_t n, cap;
    int oom;
} fvec;

static void fvec_push(fvec *a, frag f)
{
    if (a->n == a->cap) {
        size_t cap = a->cap ? a->cap * 2 : 16;
        frag *p = realloc(a->v, cap * sizeof(*p));
        if (!p) {
            a->oom = 1;
            return;
        }
        a->v = p;
        a->cap = cap;
    }
    a->v[a->n++] = f;
}

/* For each special token, longest first, cut every raw fragment at each of
 * its occurrences. Control and unknown tokens only when parse_special;
 * user-defined tokens always (as llama.cpp / HF tokenizers). */
static uint32_t tri_slot(const char *p)
{
    return (uint32_t)(fnv_update(FNV_INIT, p, 3) >> 48);
}

static bool bit_get(const uint64_t *b, uint32_t i) { return (b[i / 64] >> (i % 64)) & 1; }
static void bit_set(uint64_t *b, uint32_t i) { b[i / 64] |= 1ull << (i % 64); }

static int partition(const tok_vocab *v, const char *text, size_t len, bool parse_special,
                     fvec *out)
{
    fvec cur = {0};
    if (len)
        fvec_push(&cur, (frag){-1, 0, len});

    /* Which bytes, byte pairs and (hashed) byte triples occur in the text: a
     * special token whose start is absent cannot occur, so its search is
     * skipped (vocabularies with thousands of user-defined tokens). */
    uint64_t *seen = NULL;
    if (len >= 64 && v->n_special > 4) {
        seen = calloc(4 + 1024 + 1024, sizeof(uint64_t));
        if (!seen)
            return KP_ENOMEM;
        const uint8_t *u = (const uint8_t *)text;
        for (size_t i = 0; i < len; i++) {
            bit_set(seen, u[i]);
            if (i + 1 < len)
                bit_set(seen + 4, (uint32_t)u[i] << 8 | u[i + 1]);
            if (i + 2 < len)
                bit_set(seen + 4 + 1024, tri_slot(text + i));
        }
    }

    for (int32_t k = 0; k < v->n_special && !cur.oom; k++) {
        int32_t id = v->special[k];
        uint16_t at = v->attr[id];
        if (!parse_special && (at & (ATTR_CONTROL | ATTR_UNKNOWN)))
            continue;
        const char *st = tok_str(v, id);
        size_t sl = v->text_len[id];
        if (seen) {
            const uint8_t *su = (const uint8_t *)st;
            if (sl > len || !bit_get(seen, su[0]) ||
                (sl >= 2 && !bit_get(seen + 4, (uint32_t)su[0] << 8 | su[1])) ||
                (sl >= 3 && !bit_get(seen + 4 + 1024, tri_slot(st))))
                continue;
        }
        fvec next = {0};
        for (size_t i = 0; i < cur.n; i++) {
            frag f = cur.v[i];
            if (f.tok >= 0) {
                fvec_push(&next, f);
                continue;
            }
            size_t off = f.off, rem = f.len;
            for (;;) {
                const char *m = memmem(text + off, rem, st, sl);
                if (!m) {
                    if (rem)
                        fvec_push(&next, (frag){-1, off, rem});
                    break;
                }
                size_t mpos = (size_t)(m - text);
                size_t left = mpos - off;
                if (at & ATTR_LSTRIP)
                    while (left > 0 && isspace((unsigned char)text[off + left - 1]))
                        left--;
                if (left)
                    fvec_push(&next, (frag){-1, off, left});
                fvec_push(&next, (frag){id, 0, 0});
                size_t roff = mpos + sl, rlen = off + rem - roff;
                if (at & ATTR_RSTRIP)
                    while (rlen > 0 && isspace((unsigned char)text[roff])) {
                        roff++;
                        rlen--;
                    }
                off = roff;
                rem = rlen;
                if (!rem)
                    break;
            }
        }
        free(cur.v);
        cur = next;
    }
    free(seen);
    *out = cur;
    return cur.oom ? KP_ENOMEM : 0;
}

/* ------------------------------------------------------------------------ */
/* Encode.                                                                   */

int tok_encode(const tok_vocab *v, const char *text, size_t len, bool add_special,
               bool parse_special, int32_t **ids, size_t *n, kp_err *err)
{
    if (!v || !ids || !n || (!text && len))
        return kp_errf(err, KP_EINVAL, "tok_encode: NULL argument");
    *ids = NULL;
    *n = 0;
    ivec out = {0};
    fvec fr = {0};
    char *buf = NULL;
    int rc = partition(v, text, len, parse_special, &fr);
    if (rc)
        goto done;

    if (add_special && v->add_bos && v->bos >= 0)
        tok_ivec_push(&out, v->bos);

    if (v->kind == TOK_SPM) {
        /* each raw fragment: " " prefix after a special (or at the start),
         * spaces -> U+2581, then the SPM merge */
        size_t maxlen = 0;
        for (size_t i = 0; i < fr.n; i++)
            maxlen = KP_MAX(maxlen, fr.v[i].len);
        buf = malloc(3 * (maxlen + 1));
        if (!buf) {
            rc = KP_ENOMEM;
            goto done;
        }
        bool prev_special = true;
        for (size_t i = 0; i < fr.n && !rc; i++) {
            if (fr.v[i].tok >= 0) {
                tok_ivec_push(&out, fr.v[i].tok);
                prev_special = true;
                continue;
            }
            size_t bl = 0;
            const char *s = text + fr.v[i].off;
            if (v->add_space_prefix && prev_special) {
                memcpy(buf, "\xe2\x96\x81", 3);
                bl = 3;
            }
            for (size_t j = 0; j < fr.v[i].len; j++) {
                if (s[j] == ' ') {
                    memcpy(buf + bl, "\xe2\x96\x81", 3);
                    bl += 3;
                } else {
                    buf[bl++] = s[j];
                }
            }
            rc = spm_tokenize_cut(v, buf, bl, &out);
            prev_special = false;
        }
    } else {
        for (size_t i = 0; i < fr.n && !rc; i++) {
            if (fr.v[i].tok >= 0)
                tok_ivec_push(&out, fr.v[i].tok);
            else
                rc = tok_bpe_tokenize(v, text + fr.v[i].off, fr.v[i].len, &out);
        }
    }
    if (!rc && add_special && v->add_eos && v->eos >= 0)
        tok_ivec_push(&out, v->eos);
    if (!rc && out.oom)
        rc = KP_ENOMEM;
done:
    free(fr.v);
    free(buf);
    if (rc) {
        free(out.v);
        return kp_errf(err, rc, "tok_encode: %s while tokenising %zu bytes",
                       kp_strerror(rc), len);
    }
    if (!out.v) { /* empty result: still hand back a freeable pointer */
        out.v = malloc(sizeof(int32_t));
        if (!out.v)
            return kp_errf(err, KP_ENOMEM, "tok_encode: out of memory");
    }
    *ids = out.v;
    *n = out.n;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Pieces and decode.                                                        */

int tok_piece(const tok_vocab *v, int32_t id, bool special, char *buf, size_t cap)
{
    if (!v || id < 0 || id >= v->n)
        return KP_EINVAL;
    if (!special && (v->attr[id] & (ATTR_UNKNOWN | ATTR_CONTROL)))
        return 0;
    size_t len = v->piece_len[id];
    if (buf && len <= cap)
        memcpy(buf, v->piece + v->piece_off[id], len);
    return (int)len;
}

int tok_decode(const tok_vocab *v, const int32_t *ids, size_t n, bool remove_special,
               char **out, size_t *len, kp_err *err)
{
    if (!v || !out || (!ids && n))
        return kp_errf(err, KP_EINVAL, "tok_decode: NULL argument");
    *out = NULL;
    if (len)
        *len = 0;
    for (size_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= v->n)
            return kp_errf(err, KP_EINVAL,
                           "tok_decode: token %zu has id %d, outside the vocabulary (0..%d)",
                           i, ids[i], v->n - 1);

    /* llama_detokenize(remove_special, unparse_special = !remove_special) */
    bool unparse = !remove_special;
    bool remove_space = v->add_space_prefix;
    if (remove_special && v->add_bos && n > 0 && ids[0] == v->bos) {
        remove_space = false;
        ids++;
        n--;
    }
    if (remove_special && v->add_eos && n > 0 && ids[n - 1] == v->eos)
        n--;

    size_t total = 0;
    for (size_t i = 0; i < n; i++)
        total += v->piece_len[ids[i]];
    char *t = malloc(total + 1);
    if (!t)
        return kp_errf(err, KP_ENOMEM, "tok_decode: out of memory (%zu bytes)", total + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        int32_t id = ids[i];
        const char *p = v->piece + v->piece_off[id];
        size_t pl = v->piece_len[id];
        if (!unparse && (v->attr[id] & (ATTR_UNKNOWN | ATTR_CONTROL)))
            pl = 0;
        if (remove_space && pl > 0 && p[0] == ' ') {
            p++;
            pl--;
        }
        remove_space = false;
        memcpy(t + k, p, pl);
        k += pl;
    }

    if (v->clean_spaces && k > 0) {
        /* pass 1: " ?" " !" " ." " ," lose the space */
        size_t m = 1;
        for (size_t i = 1; i < k; i++) {
            char x = t[i];
            if (t[i - 1] == ' ' && (x == '?' || x == '!' || x == '.' || x == ','))
                m--;
            t[m++] = x;
        }
        k = m;
        /* pass 2: " ' " -> "'" */
        m = 1;
        for (size_t i = 1; i < k; i++) {
            char x = t[i];
            if (x == '\'' && i + 1 < k && t[i - 1] == ' ' && t[i + 1] == ' ') {
                m--;
                t[++i] = '\0';
            }
            t[m++] = x;
        }
        k = m;
        /* pass 3: " 's" " 'm" " 're" " 've" lose the space */
        m = 1;
        for (size_t i = 1; i < k; i++) {
            char x = t[i];
            if (t[i - 1] == ' ' && x == '\'' && i + 1 < k) {
                char x1 = t[i + 1];
                if (x1 == 's' || x1 == 'm')
                    m--;
                else if (i + 2 < k && ((x1 == 'r' && t[i + 2] == 'e') ||
                                       (x1 == 'v' && t[i + 2] == 'e')))
                    m--;
            }
            t[m++] = x;
        }
        k = m;
    }
    t[k] = '\0';
    *out = t;
    if (len)
        *len = k;
    return 0;
}

/* ------------------------------------------------------------------------ */
/* Accessors.                                                                */

int tok_kind(const tok_vocab *v) { return v->kind; }
int32_t tok_n_vocab(const tok_vocab *v) { return v->n; }
int32_t tok_bos(const tok_vocab *v) { return v->bos; }
int32_t tok_eos(const tok_vocab *v) { return v->eos; }
int32_t tok_eot(const tok_vocab *v) { return v->eot; }
bool tok_add_bos(const tok_vocab *v) { return v->add_bos; }
const char *tok_info(const tok_vocab *v) { return v->info; }

bool tok_is_eog(const tok_vocab *v, int32_t id)
{
    return v && id >= 0 && id < v->n && (v->attr[id] & ATTR_EOG);
}

int tok_type(const tok_vocab *v, int32_t id)
{
    if (!v || id < 0 || id >= v->n)
        return KP_EINVAL;
    uint16_t a = v->attr[id];
    if (a & ATTR_CONTROL) return TOK_TYPE_CONTROL;
    if (a & ATTR_USER) return TOK_TYPE_USER;
    if (a & ATTR_UNKNOWN) return TOK_TYPE_UNKNOWN;
    if (a & ATTR_BYTE) return TOK_TYPE_BYTE;
    if (a & ATTR_UNUSED) return TOK_TYPE_UNUSED;
    if (a & ATTR_NORMAL) return TOK_TYPE_NORMAL;
    return 0; /* undefined */
}

const char *tok_text(const tok_vocab *v, int32_t id)
{
    if (!v || id < 0 || id >= v->n)
        return NULL;
    return tok_str(v, id);
}

/* ------------------------------------------------------------------------ */
/* Load.                                                                     */

void tok_free(tok_vocab *v)
{
    if (!v)
        return;
    free(v->text);
    free(v->text_off);
    free(v->text_len);
    free(v->score);
    free(v->attr);
    free(v->piece);
    free(v->piece_off);
    free(v->piece_len);
    free(v->tok_ht);
    free(v->merge_text);
    free(v->merge_off);
    free(v->merge_len);
    free(v->merge_ht);
    free(v->special);
    free(v->pair_bits);
    free(v);
}

/* The piece of a token as llama.cpp's token_to_piece(special=true). */
static size_t make_piece(const tok_vocab *v, int32_t id, char *out)
{
    const char *t = tok_str(v, id);
    size_t tl = v->text_len[id];
    uint16_t a = v->attr[id];
    if (a & (ATTR_UNKNOWN | ATTR_CONTROL | ATTR_USER)) {
        memcpy(out, t, tl);
        return tl;
    }
    if (a & ATTR_NORMAL) {
        size_t k = 0;
        if (v->kind == TOK_SPM) { /* U+2581 -> ' ' */
            for (size_t i = 0; i < tl;) {
                if (i + 3 <= tl && memcmp(t + i, "\xe2\x96\x81", 3) == 0) {
                    out[k++] = ' ';
                    i += 3;
                } else {
                    out[k++] = t[i++];
                }
            }
            return k;
        }
        /* byte-level BPE: every code point back to its byte */
        for (size_t i = 0; i < tl;) {
            uint32_t c = tok_utf8_next((const uint8_t *)t, tl, &i);
            int b = bpe_cpt_to_byte(c);
            if (b >= 0) {
                out[k++] = (char)b;
            } else { /* as llama_decode_text */
                char u[4];
                int nb = tok_utf8_put(c, u);
                k += (size_t)sprintf(out + k, "[UNK_BYTE_0x");
                for (int j = 0; j < nb; j++)
                    k += (size_t)sprintf(out + k, "%02x", (uint8_t)u[j]);
                memcpy(out + k, t, tl);
                k += tl;
                out[k++] = ']';
            }
        }
        return k;
    }
    if (a & ATTR_BYTE) { /* "<0xXX>" */
        if (tl >= 5) {
            char hex[3] = {t[3], t[4], 0};
            out[0] = (char)strtol(hex, NULL, 16);
            return 1;
        }
        return 0;
    }
    return 0; /* unused / undefined tokens have no text */
}

/* Worst-case piece size of a token text of tl bytes (every code point
 * may expand to "[UNK_BYTE_0x" + 8 hex digits + the text + "]"). */
static size_t piece_bound(size_t tl)
{
    return tl * (tl + 24) + 16;
}

static int build_hash(tok_vocab *v, kp_err *err)
{
    v->tok_mask = ht_size_for((size_t)v->n) - 1;
    v->tok_ht = malloc(((size_t)v->tok_mask + 1) * sizeof(int32_t));
    if (!v->tok_ht)
        return kp_errf(err, KP_ENOMEM, "tok: out of memory");
    memset(v->tok_ht, 0xff, ((size_t)v->tok_mask + 1) * sizeof(int32_t));
    for (int32_t id = 0; id < v->n; id++) {
        const char *s = tok_str(v, id);
        size_t len = v->text_len[id];
        uint32_t i = (uint32_t)fnv_update(FNV_INIT, s, len) & v->tok_mask;
        for (;; i = (i + 1) & v->tok_mask) {
            int32_t o = v->tok_ht[i];
            if (o < 0) {
                v->tok_ht[i] = id;
                break;
            }
            if (v->text_len[o] == len && memcmp(tok_str(v, o), s, len) == 0)
                return kp_errf(err, KP_EFORMAT,
                               "tok: duplicate token in vocabulary: '%.*s' has ids %d and %d",
                               (int)KP_MIN(len, 64), s, o, id);
        }
    }
    return 0;
}

static int load_merges(tok_vocab *v, const gguf_file *f, kp_err *err)
{
    gguf_arr a;
    int rc = gguf_get_arr(f, "tokenizer.ggml.merges", &a, NULL);
    if (rc == KP_ENOTFOUND)
        return kp_errf(err, KP_EFORMAT,
                       "tok: BPE vocabulary without tokenizer.ggml.merges; re-convert the model");
    if (rc || a.type != GGUF_VT_STRING)
        return kp_errf(err, KP_EFORMAT, "tok: tokenizer.ggml.merges is not a string array");
    if (a.n > (1u << 24))
        return kp_errf(err, KP_EUNSUP, "tok: %llu merges (more than 2^24)",
                       (unsigned long long)a.n);
    size_t total = 0;
    for (uint64_t i = 0; i < a.n; i++) {
        const char *s;
        size_t l;
        gguf_arr_get_str(&a, i, &s, &l);
        total += l + 1;
    }
    v->n_merges = (int32_t)a.n;
    v->merge_text = malloc(total + 1);
    v->merge_off = malloc((a.n + 1) * sizeof(uint32_t));
    v->merge_len = malloc((a.n + 1) * sizeof(uint32_t));
    v->merge_mask = ht_size_for(a.n) - 1;
    v->merge_ht = malloc(((size_t)v->merge_mask + 1) * sizeof(int32_t));
    if (!v->merge_text || !v->merge_off || !v->merge_len || !v->merge_ht || total > UINT32_MAX)
        return kp_errf(err, KP_ENOMEM, "tok: out of memory for %llu merges",
                       (unsigned long long)a.n);
    memset(v->merge_ht, 0xff, ((size_t)v->merge_mask + 1) * sizeof(int32_t));
    size_t off = 0;
    for (uint64_t i = 0; i < a.n; i++) {
        const char *s;
        size_t l;
        gguf_arr_get_str(&a, i, &s, &l);
        memcpy(v->merge_text + off, s, l);
        v->merge_text[off + l] = 0;
        v->merge_off[i] = (uint32_t)off;
        v->merge_len[i] = (uint32_t)l;
        off += l + 1;
        /* the first occurrence of a pair keeps its rank */
        uint32_t h = (uint32_t)fnv_update(FNV_INIT, s, l) & v->merge_mask;
        for (;; h = (h + 1) & v->merge_mask) {
            int32_t o = v->merge_ht[h];
            if (o < 0) {
                v->merge_ht[h] = (int32_t)i;
                break;
            }
            if (v->merge_len[o] == l && memcmp(v->merge_text + v->merge_off[o], s, l) == 0)
                break;
        }
    }
    return 0;
}

/* Optional special-token id key: keeps *id when absent or out of range. */
static void load_id(const gguf_file *f, const char *key, int32_t n, int32_t *id)
{
    if (*id >= n)
        *id = -1;
    int64_t x;
    if (gguf_get_int(f, key, &x, NULL) == 0 && x >= 0 && x < n)
        *id = (int32_t)x;
}

static void load_bool(const gguf_file *f, const char *key, bool *b)
{
    bool x;
    if (gguf_get_bool(f, key, &x, NULL) == 0)
        *b = x;
}

/* First token, in list order, whose text is one of `names`; -1 if none. */
static int32_t find_any(const tok_vocab *v, const char *const *names, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        int32_t id = tok_find(v, names[i], strlen(names[i]));
        if (id >= 0)
            return id;
    }
    return -1;
}

/* End-of-generation and other control tokens found by text, as llama.cpp's
 * "auto-detect special tokens by text" (a found token becomes CONTROL).
 * Where llama.cpp takes whichever match its hash map yields first, we take
 * the first of the list. */
static void detect_specials(tok_vocab *v)
{
    static const char *const eot_names[] = {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|end_of_text|>", "<EOT>", "_<EOT>", "<\xef\xbd\x9c" "end\xe2\x96\x81of\xe2\x96\x81"
        "sentence\xef\xbd\x9c>", "<end_of_utterance>"};
    static const char *const eom_names[] = {"<|eom_id|>"};
    static const char *const fim_pre[] = {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>",
                                          "<\xef\xbd\x9c" "fim\xe2\x96\x81" "begin\xef\xbd\x9c>",
                                          "<PRE>", "\xe2\x96\x81<PRE>"};
    static const char *const fim_suf[] = {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>",
                                          "<\xef\xbd\x9c" "fim\xe2\x96\x81" "hole\xef\xbd\x9c>",
                                          "<SUF>", "\xe2\x96\x81<SUF>"};
    static const char *const fim_mid[] = {"<|fim_middle|>", "<fim-middle>", "<fim_middle>",
                                          "<\xef\xbd\x9c" "fim\xe2\x96\x81" "end\xef\xbd\x9c>",
                                          "<MID>", "\xe2\x96\x81<MID>"};
    static const char *const fim_pad[] = {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>"};
    static const char *const fim_rep[] = {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>",
                                          "<REPO>", "<reponame>"};
    static const char *const fim_sep[] = {"<|file_sep|>"};
    static const char *const eog_names[] = {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
        "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>"};

    if (v->eot < 0)
        v->eot = find_any(v, eot_names, KP_ARRAY_LEN(eot_names));
    if (v->eom < 0)
        v->eom = find_any(v, eom_names, KP_ARRAY_LEN(eom_names));
    int32_t ctl[9] = {
        v->eot, v->eom,
        find_any(v, fim_pre, KP_ARRAY_LEN(fim_pre)),
        find_any(v, fim_suf, KP_ARRAY_LEN(fim_suf)),
        find_any(v, fim_mid, KP_ARRAY_LEN(fim_mid)),
        find_any(v, fim_pad, KP_ARRAY_LEN(fim_pad)),
        find_any(v, fim_rep, KP_ARRAY_LEN(fim_rep)),
        find_any(v, fim_sep, KP_ARRAY_LEN(fim_sep)),
        -1};
    for (int i = 0; i < 8; i++)
        if (ctl[i] >= 0)
            v->attr[ctl[i]] |= ATTR_CONTROL;
    for (int i = 5; i < 8; i++) /* fim pad / repo / sep end generation */
        if (ctl[i] >= 0)
            v->attr[ctl[i]] |= ATTR_EOG;
    for (size_t i = 0; i < KP_ARRAY_LEN(eog_names); i++) {
        int32_t id = tok_find(v, eog_names[i], strlen(eog_names[i]));
        if (id >= 0)
            v->attr[id] |= ATTR_EOG | ATTR_CONTROL;
    }
    if (v->eos >= 0)
        v->attr[v->eos] |= ATTR_EOG;
    if (v->eot >= 0)
        v->attr[v->eot] |= ATTR_EOG;
    if (v->eom >= 0)
        v->attr[v->eom] |= ATTR_EOG;
}

/* Special-token order: longer text first; equal lengths by id. */
typedef struct spec_key {
    uint32_t len;
    int32_t id;
} spec_key;

static int spec_cmp(const void *a, const void *b)
{
    const spec_key *x = a, *y = b;
    if (x->len != y->len)
        return x->len > y->len ? -1 : 1;
    return (x->id > y->id) - (x->id < y->id);
}

int tok_load(tok_vocab **out, const gguf_file *f, kp_err *err)
{
    if (!out || !f)
        return kp_errf(err, KP_EINVAL, "tok_load: NULL argument");
    *out = NULL;
    int rc;
    tok_vocab *v = calloc(1, sizeof(*v));
    if (!v)
        return kp_errf(err, KP_ENOMEM, "tok_load: out of memory");

    /* family */
    const char *model;
    size_t model_len;
    if (gguf_get_str(f, "tokenizer.ggml.model", &model, &model_len, NULL)) {
        rc = kp_errf(err, KP_EFORMAT, "tok: no tokenizer.ggml.model string in the GGUF file");
        goto fail;
    }
    if (model_len == 5 && memcmp(model, "llama", 5) == 0) {
        v->kind = TOK_SPM;
    } else if (model_len == 4 && memcmp(model, "gpt2", 4) == 0) {
        v->kind = TOK_BPE;
    } else {
        rc = kp_errf(err, KP_EUNSUP,
                     "tok: tokenizer.ggml.model '%.*s' is not supported (only 'llama' SPM and "
                     "'gpt2' BPE)", (int)KP_MIN(model_len, 64), model);
        goto fail;
    }

    /* tokens */
    gguf_arr ta;
    if (gguf_get_arr(f, "tokenizer.ggml.tokens", &ta, NULL) || ta.type != GGUF_VT_STRING) {
        rc = kp_errf(err, KP_EFORMAT,
                     "tok: tokenizer.ggml.tokens is missing or not a string array");
        goto fail;
    }
    if (ta.n == 0 || ta.n > INT32_MAX / 2) {
        rc = kp_errf(err, KP_EFORMAT, "tok: tokenizer.ggml.tokens has %llu entries",
                     (unsigned long long)ta.n);
        goto fail;
    }
    v->n = (int32_t)ta.n;
    size_t total = 0;
    for (int32_t i = 0; i < v->n; i++) {
        const char *s;
        size_t l;
        gguf_arr_get_str(&ta, (uint64_t)i, &s, &l);
        total += (l ? l : 24) + 1;
    }
    v->text = malloc(total);
    v->text_off = malloc((size_t)v->n * sizeof(uint32_t));
    v->text_len = malloc((size_t)v->n * sizeof(uint32_t));
    v->score = calloc((size_t)v->n, sizeof(float));
    v->attr = malloc((size_t)v->n * sizeof(uint16_t));
    v->piece_off = malloc((size_t)v->n * sizeof(uint32_t));
    v->piece_len = malloc((size_t)v->n * sizeof(uint32_t));
    if (!v->text || !v->text_off || !v->text_len || !v->score || !v->attr || !v->piece_off ||
        !v->piece_len || total > UINT32_MAX) {
        rc = kp_errf(err, KP_ENOMEM, "tok: out of memory for %d tokens", v->n);
        goto fail;
    }
    size_t off = 0;
    for (int32_t i = 0; i < v->n; i++) {
        const char *s;
        size_t l;
        gguf_arr_get_str(&ta, (uint64_t)i, &s, &l);
        v->text_off[i] = (uint32_t)off;
        if (l == 0) { /* as llama.cpp: an empty token gets a placeholder text */
            l = (size_t)snprintf(v->text + off, 24, "[EMPTY_%d]", i);
        } else {
            memcpy(v->text + off, s, l);
        }
        v->text[off + l] = 0;
        v->text_len[i] = (uint32_t)l;
        off += l + 1;
    }

    /* scores (f32 or i32) and types */
    gguf_arr sa;
    rc = gguf_get_arr(f, "tokenizer.ggml.scores", &sa, NULL);
    if (rc != 0 && rc != KP_ENOTFOUND) {
        rc = kp_errf(err, KP_EFORMAT, "tok: tokenizer.ggml.scores is not an array");
        goto fail;
    }
    if (rc == 0) {
        if ((sa.type != GGUF_VT_FLOAT32 && sa.type != GGUF_VT_INT32) || sa.n < ta.n) {
            rc = kp_errf(err, KP_EFORMAT,
                         "tok: tokenizer.ggml.scores must be an f32/i32 array of %d entries",
                         v->n);
            goto fail;
        }
        for (int32_t i = 0; i < v->n; i++)
            v->score[i] = (float)gguf_arr_get_float(&sa, (uint64_t)i);
    }
    gguf_arr ya;
    rc = gguf_get_arr(f, "tokenizer.ggml.token_type", &ya, NULL);
    bool have_types = rc == 0;
    if ((rc != 0 && rc != KP_ENOTFOUND) ||
        (have_types && (ya.type != GGUF_VT_INT32 || ya.n < ta.n))) {
        rc = kp_errf(err, KP_EFORMAT,
                     "tok: tokenizer.ggml.token_type must be an i32 array of %d entries", v->n);
        goto fail;
    }
    for (int32_t i = 0; i < v->n; i++) {
        int64_t t = have_types ? gguf_arr_get_int(&ya, (uint64_t)i) : TOK_TYPE_NORMAL;
        switch (t) {
        case TOK_TYPE_NORMAL: v->attr[i] = ATTR_NORMAL; break;
        case TOK_TYPE_UNKNOWN: v->attr[i] = ATTR_UNKNOWN; break;
        case TOK_TYPE_CONTROL: v->attr[i] = ATTR_CONTROL; break;
        case TOK_TYPE_USER: v->attr[i] = ATTR_USER; break;
        case TOK_TYPE_UNUSED: v->attr[i] = ATTR_UNUSED; break;
        case TOK_TYPE_BYTE: v->attr[i] = ATTR_BYTE; break;
        default: v->attr[i] = 0; break; /* undefined */
        }
    }
    if ((rc = build_hash(v, err)))
        goto fail;

    /* options and special ids, with llama.cpp's defaults */
    char pre_warn[96] = "";
    if (v->kind == TOK_SPM) {
        v->bos = 1;
        v->eos = 2;
        v->unk = 0;
        v->add_bos = true;
        v->add_space_prefix = true;
        v->clean_spaces = false;
    } else {
        v->bos = 11;
        v->eos = 11;
        v->unk = -1;
        v->add_bos = false;
        v->add_space_prefix = false;
        v->clean_spaces = true;
        v->pre = PRE_DEFAULT;
        const char *pre;
        size_t pre_len;
        if (gguf_get_str(f, "tokenizer.ggml.pre", &pre, &pre_len, NULL) == 0) {
            const struct pre_entry *e = NULL;
            for (size_t i = 0; i < KP_ARRAY_LEN(pre_table); i++)
                if (strlen(pre_table[i].name) == pre_len &&
                    memcmp(pre_table[i].name, pre, pre_len) == 0)
                    e = &pre_table[i];
            if (!e) {
                e = &pre_table[KP_ARRAY_LEN(pre_table) - 1];
                for (size_t i = 0; i < KP_ARRAY_LEN(pre_table); i++)
                    if (strcmp(pre_table[i].name, "gpt-2") == 0)
                        e = &pre_table[i];
                snprintf(pre_warn, sizeof(pre_warn),
                         " (WARNING: unknown pre-tokenizer '%.*s', using gpt-2)",
                         (int)KP_MIN(pre_len, 40), pre);
            }
            v->pre = e->pre;
            v->clean_spaces = e->clean_spaces;
            v->ignore_merges = e->ignore_merges;
            v->add_bos = e->add_bos;
        } else {
            snprintf(pre_warn, sizeof(pre_warn), " (no tokenizer.ggml.pre: llama.cpp default)");
        }
        if ((rc = load_merges(v, f, err)))
            goto fail;
    }
    v->eot = v->eom = v->pad = -1;
    load_id(f, "tokenizer.ggml.bos_token_id", v->n, &v->bos);
    load_id(f, "tokenizer.ggml.eos_token_id", v->n, &v->eos);
    load_id(f, "tokenizer.ggml.eot_token_id", v->n, &v->eot);
    load_id(f, "tokenizer.ggml.eom_token_id", v->n, &v->eom);
    load_id(f, "tokenizer.ggml.unknown_token_id", v->n, &v->unk);
    load_id(f, "tokenizer.ggml.padding_token_id", v->n, &v->pad);
    load_bool(f, "tokenizer.ggml.add_space_prefix", &v->add_space_prefix);
    load_bool(f, "tokenizer.ggml.add_bos_token", &v->add_bos);
    load_bool(f, "tokenizer.ggml.add_eos_token", &v->add_eos);
    if (v->add_bos && v->bos < 0) {
        rc = kp_errf(err, KP_EFORMAT,
                     "tok: tokenizer.ggml.add_bos_token is true, but there is no BOS token id");
        goto fail;
    }
    if (v->add_eos && v->eos < 0) {
        rc = kp_errf(err, KP_EFORMAT,
                     "tok: tokenizer.ggml.add_eos_token is true, but there is no EOS token id");
        goto fail;
    }
    detect_specials(v);

    /* byte fallback (SPM): "<0xXX>", else the byte itself as a token */
    for (int b = 0; b < 256; b++) {
        char hex[8];
        snprintf(hex, sizeof(hex), "<0x%02X>", b);
        v->byte_tok[b] = tok_find(v, hex, 6);
        if (v->byte_tok[b] < 0) {
            char c = (char)b;
            v->byte_tok[b] = tok_find(v, &c, 1);
        }
    }

    /* SPM: the character pairs that occur inside tokens */
    if (v->kind == TOK_SPM) {
        v->pair_bits = calloc(PAIR_WORDS, sizeof(uint64_t));
        if (!v->pair_bits) {
            rc = kp_errf(err, KP_ENOMEM, "tok: out of memory");
            goto fail;
        }
        for (int32_t i = 0; i < v->n; i++) {
            const char *t = tok_str(v, i);
            size_t tl = v->text_len[i], prev = 0, prev_len = 0;
            for (size_t o = 0; o < tl;) {
                size_t l = KP_MIN(utf8_len((uint8_t)t[o]), tl - o);
                if (o > 0) {
                    uint32_t h = pair_slot(t + prev, prev_len + l);
                    v->pair_bits[h / 64] |= 1ull << (h % 64);
                }
                prev = o;
                prev_len = l;
                o += l;
            }
        }
    }

    /* special tokens, longest first */
    spec_key *keys = malloc((size_t)v->n * sizeof(*keys));
    v->special = malloc((size_t)v->n * sizeof(int32_t));
    if (!keys || !v->special) {
        free(keys);
        rc = kp_errf(err, KP_ENOMEM, "tok: out of memory");
        goto fail;
    }
    for (int32_t i = 0; i < v->n; i++)
        if (v->attr[i] & (ATTR_CONTROL | ATTR_USER | ATTR_UNKNOWN))
            keys[v->n_special++] = (spec_key){v->text_len[i], i};
    qsort(keys, (size_t)v->n_special, sizeof(*keys), spec_cmp);
    for (int32_t i = 0; i < v->n_special; i++)
        v->special[i] = keys[i].id;
    free(keys);

    /* Phi-3 (by general.name, as llama.cpp): specials swallow the whitespace
     * after them, except <unk>, <s> and <|endoftext|>. */
    const char *name;
    size_t name_len;
    if (gguf_get_str(f, "general.name", &name, &name_len, NULL) == 0) {
        char lower[128];
        size_t l = KP_MIN(name_len, sizeof(lower) - 1);
        for (size_t i = 0; i < l; i++)
            lower[i] = (char)tolower((unsigned char)name[i]);
        lower[l] = 0;
        if (strstr(lower, "phi-3") || strstr(lower, "phi3")) {
            for (int32_t i = 0; i < v->n_special; i++)
                v->attr[v->special[i]] |= ATTR_RSTRIP;
            static const char *const keep[] = {"<unk>", "<s>", "<|endoftext|>"};
            int32_t id = tok_find(v, "</s>", 4);
            if (id >= 0)
                v->attr[id] |= ATTR_RSTRIP;
            for (size_t i = 0; i < KP_ARRAY_LEN(keep); i++)
                if ((id = tok_find(v, keep[i], strlen(keep[i]))) >= 0)
                    v->attr[id] &= (uint16_t)~ATTR_RSTRIP;
        }
    }

    /* piece cache */
    size_t maxtl = 0, cap = 0;
    for (int32_t i = 0; i < v->n; i++)
        maxtl = KP_MAX(maxtl, (size_t)v->text_len[i]);
    char *tmp = malloc(piece_bound(maxtl));
    bool pieces_ok = tmp != NULL;
    off = 0;
    for (int32_t i = 0; i < v->n && pieces_ok; i++) {
        size_t pl = make_piece(v, i, tmp);
        if (off + pl > cap || !v->piece) {
            size_t ncap = KP_MAX(2 * cap, off + pl + 4096);
            char *p = realloc(v->piece, ncap);
            if (!p || ncap > UINT32_MAX) {
                if (p)
                    v->piece = p;
                pieces_ok = false;
                break;
            }
            v->piece = p;
            cap = ncap;
        }
        memcpy(v->piece + off, tmp, pl);
        v->piece_off[i] = (uint32_t)off;
        v->piece_len[i] = (uint32_t)pl;
        off += pl;
    }
    free(tmp);
    if (!pieces_ok) {
        rc = kp_errf(err, KP_ENOMEM, "tok: out of memory for the piece cache");
        goto fail;
    }

    if (v->kind == TOK_SPM)
        snprintf(v->info, sizeof(v->info), "spm, %d tokens, bos %d, eos %d%s", v->n, v->bos,
                 v->eos, v->add_bos ? "" : " (no bos added)");
    else
        snprintf(v->info, sizeof(v->info), "bpe (pre %s), %d tokens, %d merges, bos %d, eos %d%s%s",
                 pre_names[v->pre], v->n, v->n_merges, v->bos, v->eos,
                 v->add_bos ? ", bos added" : "", pre_warn);
    *out = v;
    return 0;
fail:
    tok_free(v);
    return rc;
}
