/*
 * tok_impl.h — what the tokenizer's files share (internal to engine/tok*.c;
 * the contract is tok.h): the vocabulary, the merge queue and UTF-8 helpers
 * defined in tok.c, and the two internal entry points: tok_bpe_tokenize
 * (tok_bpe.c) and tok_pre_tokenize (tok_pretok.c).
 *
 * Why a header: BPE and the pre-tokenizers are files of their own (see the
 * map at the top of tok.c), but BPE reads the vocabulary's merges and uses the
 * same merge queue as SPM. Threads: as tok.h (a tok_vocab is read-only after
 * tok_load; the helpers touch only what they are given).
 */
#ifndef KP_TOK_IMPL_H
#define KP_TOK_IMPL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tok.h"

/* ------------------------------------------------------------------------ */
/* Token attributes: llama.cpp's llama_token_attr bits, plus our EOG mark.  */

enum {
    ATTR_UNKNOWN = 1 << 0,
    ATTR_UNUSED = 1 << 1,
    ATTR_NORMAL = 1 << 2,
    ATTR_CONTROL = 1 << 3,
    ATTR_USER = 1 << 4,
    ATTR_BYTE = 1 << 5,
    ATTR_LSTRIP = 1 << 7,
    ATTR_RSTRIP = 1 << 8,
    ATTR_EOG = 1 << 14, /* ends generation (EOS, EOT, <|im_end|>, ...) */
};

/* BPE pre-tokenizers (llama_vocab_pre_type, grouped by regex set). */
enum tok_pre {
    PRE_DEFAULT,        /* no tokenizer.ggml.pre: llama.cpp's "default" set */
    PRE_GPT2,           /* gpt-2, mpt, olmo, ... */
    PRE_LLAMA3,         /* llama-bpe, llama3, dbrx, smaug-bpe, chatglm-bpe */
    PRE_QWEN2,          /* qwen2, stablelm2, ...: llama3 with single digits */
    PRE_DEEPSEEK_LLM,
    PRE_DEEPSEEK_CODER,
    PRE_FALCON,
    PRE_STARCODER,      /* starcoder, refact, command-r, smollm, ... */
};

/* ------------------------------------------------------------------------ */
/* The vocabulary.                                                           */

struct tok_vocab {
    int kind; /* TOK_SPM / TOK_BPE */
    int pre;  /* enum tok_pre (BPE only) */
    int32_t n;

    /* token texts, NUL-terminated, packed in one buffer */
    char *text;          /* [total bytes] */
    uint32_t *text_off;  /* [n] */
    uint32_t *text_len;  /* [n] */
    float *score;        /* [n] */
    uint16_t *attr;      /* [n] ATTR_* bits */

    /* token_to_piece(special=true) of every token, as llama.cpp caches it */
    char *piece;         /* [total bytes] */
    uint32_t *piece_off; /* [n] */
    uint32_t *piece_len; /* [n] */

    /* open-addressing hash: text -> id (-1 = empty slot) */
    int32_t *tok_ht;
    uint32_t tok_mask;

    /* BPE merges "left right" -> rank, same hashing */
    char *merge_text;
    uint32_t *merge_off, *merge_len;
    int32_t n_merges;
    int32_t *merge_ht;
    uint32_t merge_mask;

    /* control / user-defined / unknown tokens, longest text first */
    int32_t *special;
    int32_t n_special;

    int32_t byte_tok[256]; /* SPM byte-fallback token of each byte, -1 if none */

    /* SPM: bitset over hashes of the adjacent character pairs inside tokens.
     * Where two neighbouring characters of the input are a pair no token
     * contains, no merge can ever cross, so the text is cut there and the
     * pieces are merged separately: same result, much smaller queues. */
    uint64_t *pair_bits; /* [PAIR_WORDS] */

    int32_t bos, eos, eot, eom, unk, pad;
    bool add_bos, add_eos, add_space_prefix, clean_spaces, ignore_merges;
    char info[256];
};

/* ------------------------------------------------------------------------ */
/* Shared helpers (tok.c): growable id vector, hashing, UTF-8.               */

typedef struct ivec {
    int32_t *v;
    size_t n, cap;
    int oom;
} ivec;

void tok_ivec_push(ivec *a, int32_t x); /* sets a->oom when out of memory */

#define FNV_INIT 1469598103934665603ULL

static inline uint64_t fnv_update(uint64_t h, const void *data, size_t len)
{
    const uint8_t *p = data;
    for (size_t i = 0; i < len; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    return h;
}

/* Decode one code point at s[*i] as llama.cpp's unicode_cpt_from_utf8 does;
 * an invalid sequence consumes one byte and gives U+FFFD. */
uint32_t tok_utf8_next(const uint8_t *s, size_t n, size_t *i);
/* Encode a code point into out[0..4); returns the byte count (1..4). */
int tok_utf8_put(uint32_t c, char *out);

/* ------------------------------------------------------------------------ */
/* Priority queue of candidate merges (binary heap), shared by SPM and BPE.  */
/* SPM: highest score first; BPE: lowest rank first (stored as -rank).       */
/* Ties: leftmost first, as llama.cpp's comparators. (tok.c)                 */

typedef struct bigram {
    float prio;
    int32_t left, right;
    uint32_t size; /* byte length of the merged text when queued */
} bigram;

typedef struct heap {
    bigram *v;
    size_t n, cap;
    int oom;
} heap;

void tok_heap_push(heap *h, bigram b); /* sets h->oom when out of memory */
bigram tok_heap_pop(heap *h);          /* h->n > 0 */

/* Symbols of a merge session: a doubly linked list over pieces of one text;
 * merging grows the left symbol and empties the right one. */
typedef struct symbols {
    int32_t *prev, *next;
    uint32_t *off, *len;
    size_t n;
} symbols;

/* Split text into UTF-8 characters (by lead byte, clipped at the end);
 * 0 or KP_ENOMEM. */
int tok_symbols_init(symbols *s, const char *text, size_t len);
void tok_symbols_free(symbols *s);
/* Merge symbol `right` into `left` (its successor). */
void tok_symbols_merge(symbols *s, int32_t left, int32_t right);

/* ------------------------------------------------------------------------ */
/* BPE pre-tokenizers (tok_pretok.c).                                        */
/*                                                                           */
/* The text is a code point array; a split is a list of piece lengths (in    */
/* code points) covering it.                                                 */

#define F_VALID 0x100u          /* flags of a position inside the piece */

typedef struct cpt_text {
    const uint32_t *cpt; /* [n] code points */
    const uint16_t *fl;  /* [n] F_VALID | tok_ucd_flags(cpt) */
    size_t n;
} cpt_text;

typedef struct split {
    size_t *len;
    size_t n, cap;
    int oom;
} split;

/* Split the code points of one fragment into pre-tokens with the regexes of
 * pre-tokenizer `pre` (enum tok_pre); *out is malloc'd (free out->len) and
 * covers all of t. 0 or KP_ENOMEM. */
int tok_pre_tokenize(int pre, const cpt_text *t, split *out);

/* ------------------------------------------------------------------------ */
/* BPE (tok_bpe.c).                                                          */

/* Tokenise one raw-text fragment (no special tokens in it) with the
 * vocabulary's pre-tokenizer and merges, appending ids to *out. 0 or
 * KP_ENOMEM. */
int tok_bpe_tokenize(const tok_vocab *v, const char *text, size_t len, ivec *out);

#endif
