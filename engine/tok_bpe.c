/*
 * tok_bpe.c — byte-level BPE (llama.cpp's llm_tokenizer_bpe_session): one
 * raw-text fragment becomes code points (invalid UTF-8 -> U+FFFD), then
 * pre-tokens (tok_pretok.c), then GPT-2 byte images, then ids by
 * lowest-rank merging over the vocabulary's merges list.
 *
 * Why a file of its own: BPE is one of the two tokenizer families; the core
 * (tok.c) only hands it fragments between special tokens. It shares the merge
 * queue with SPM (tok_impl.h). Entry point: tok_bpe_tokenize.
 */
#include <stdlib.h>
#include <string.h>

#include "engine/tok_impl.h"
#include "engine/tok_unicode.h"

/* ------------------------------------------------------------------------ */
/* Merges and the GPT-2 byte map.                                            */

/* Rank of merging `left` with `right` (merge text "left right"), -1 if none. */
static int32_t merge_rank(const tok_vocab *v, const char *l, size_t ln, const char *r, size_t rn)
{
    if (!v->n_merges)
        return -1;
    uint64_t h = fnv_update(FNV_INIT, l, ln);
    h = fnv_update(h, " ", 1);
    h = fnv_update(h, r, rn);
    for (uint32_t i = (uint32_t)h & v->merge_mask;; i = (i + 1) & v->merge_mask) {
        int32_t m = v->merge_ht[i];
        if (m < 0)
            return -1;
        const char *t = v->merge_text + v->merge_off[m];
        if (v->merge_len[m] == ln + 1 + rn && memcmp(t, l, ln) == 0 && t[ln] == ' ' &&
            memcmp(t + ln + 1, r, rn) == 0)
            return m;
    }
}

/* GPT-2's byte -> code point map: printable Latin-1 bytes map to themselves,
 * the other 68 bytes to U+0100.. in byte order (inverse: bpe_cpt_to_byte in
 * tok.c, for the pieces). */
static uint32_t bpe_byte_to_cpt(uint8_t b)
{
    if ((b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || b >= 0xae)
        return b;
    if (b <= 0x20)
        return 256 + b;
    if (b <= 0xa0)
        return 256 + 33 + (b - 0x7f); /* 0x7f..0xa0 */
    return 256 + 67;                  /* 0xad */
}

/* ------------------------------------------------------------------------ */
/* BPE (llm_tokenizer_bpe_session).                                          */

/* Queue the merge of symbols l and r if the merges list has it. The queue
 * priority is -rank (ranks are exact in a float: at most 2^24 merges). */
static void bpe_try(const tok_vocab *v, const char *w, const symbols *s, heap *h, int32_t l,
                    int32_t r)
{
    if (l < 0 || r < 0)
        return;
    int32_t rank = merge_rank(v, w + s->off[l], s->len[l], w + s->off[r], s->len[r]);
    if (rank >= 0)
        tok_heap_push(h, (bigram){-(float)rank, l, r, s->len[l] + s->len[r]});
}

/* Merge one byte-encoded pre-token and append its ids. */
static int bpe_word(const tok_vocab *v, const char *w, size_t len, ivec *out)
{
    if (v->ignore_merges) {
        int32_t id = tok_find(v, w, len);
        if (id >= 0) {
            tok_ivec_push(out, id);
            return 0;
        }
    }
    symbols s;
    if (tok_symbols_init(&s, w, len))
        return KP_ENOMEM;
    heap h = {0};
    for (size_t i = 1; i < s.n; i++)
        bpe_try(v, w, &s, &h, (int32_t)i - 1, (int32_t)i);
    while (h.n && !h.oom) {
        bigram b = tok_heap_pop(&h);
        uint32_t ll = s.len[b.left], rl = s.len[b.right];
        if (ll == 0 || rl == 0 || ll + rl != b.size)
            continue; /* outdated */
        tok_symbols_merge(&s, b.left, b.right);
        bpe_try(v, w, &s, &h, s.prev[b.left], b.left);
        bpe_try(v, w, &s, &h, b.left, s.next[b.left]);
    }
    for (int32_t i = 0; i != -1 && s.n && !h.oom; i = s.next[i]) {
        const char *p = w + s.off[i];
        int32_t id = tok_find(v, p, s.len[i]);
        if (id >= 0) {
            tok_ivec_push(out, id);
            continue;
        }
        /* not in the vocab: each raw byte of the text that is a token */
        for (uint32_t j = 0; j < s.len[i]; j++) {
            int32_t b = tok_find(v, p + j, 1);
            if (b >= 0)
                tok_ivec_push(out, b);
        }
    }
    int oom = h.oom;
    free(h.v);
    tok_symbols_free(&s);
    return oom ? KP_ENOMEM : 0;
}

/* One raw-text fragment: code points (invalid UTF-8 -> U+FFFD), pre-tokens,
 * GPT-2 byte images, merges. */
int tok_bpe_tokenize(const tok_vocab *v, const char *text, size_t len, ivec *out)
{
    int rc = KP_ENOMEM;
    uint32_t *cpt = malloc((len + 1) * sizeof(*cpt));
    uint16_t *fl = malloc((len + 1) * sizeof(*fl));
    char *word = NULL;
    split sp = {0};
    if (!cpt || !fl)
        goto done;
    size_t n = 0;
    for (size_t i = 0; i < len;) {
        uint32_t c = tok_utf8_next((const uint8_t *)text, len, &i);
        cpt[n] = c;
        fl[n] = (uint16_t)(F_VALID | tok_ucd_flags(c));
        n++;
    }
    cpt_text t = {cpt, fl, n};
    if (tok_pre_tokenize(v->pre, &t, &sp))
        goto done;

    /* each pre-token: UTF-8 -> bytes -> GPT-2 byte images (<= 2 bytes each) */
    size_t start = 0, max = 0;
    for (size_t k = 0; k < sp.n; k++)
        max = KP_MAX(max, sp.len[k]);
    word = malloc(max * 8 + 1);
    if (!word)
        goto done;
    for (size_t k = 0; k < sp.n; k++) {
        size_t wl = 0;
        for (size_t i = start; i < start + sp.len[k]; i++) {
            char u[4];
            int nb = tok_utf8_put(cpt[i], u);
            for (int j = 0; j < nb; j++)
                wl += (size_t)tok_utf8_put(bpe_byte_to_cpt((uint8_t)u[j]), word + wl);
        }
        start += sp.len[k];
        if (bpe_word(v, word, wl, out))
            goto done;
    }
    rc = 0;
done:
    free(cpt);
    free(fl);
    free(word);
    free(sp.len);
    return rc;
}
