/*
 * tok_pretok.c — the BPE pre-tokenizers (llama.cpp's unicode_regex_split):
 * split a fragment's code points into the pieces BPE then merges, with the
 * regex list of each pre-tokenizer family (gpt-2 / mpt / olmo, llama3,
 * qwen2, deepseek-llm, deepseek-coder, falcon, starcoder / refact, default).
 *
 * Why a file of its own: these are regex engines in miniature, independent
 * of the vocabulary (they see only code points and their Unicode flags). No
 * regex library: the GPT-2 and LLaMA-3 matchers port llama.cpp's own custom
 * matchers, the others reproduce what std::regex does with the patterns
 * llama.cpp gives it (leftmost match; text between matches becomes a piece of
 * its own). Each regex of a pre-tokenizer refines every piece of the
 * previous split. Entry point: tok_pre_tokenize (tok_impl.h).
 */
#include <stdbool.h>
#include <stdlib.h>
#include <string.h>

#include "engine/tok_impl.h"
#include "engine/tok_unicode.h"

/* ------------------------------------------------------------------------ */
/* BPE pre-tokenizers (unicode_regex_split).                                 */
/*                                                                           */
/* The text is a code point array; a split is a list of piece lengths (in    */
/* code points) covering it. Each regex of a pre-tokenizer refines every     */
/* piece of the previous split.                                              */

#define OUT_OF_RANGE 0xFFFFFFFFu

static void split_push(split *s, size_t len)
{
    if (len == 0)
        return;
    if (s->n == s->cap) {
        size_t cap = s->cap ? s->cap * 2 : 64;
        size_t *p = realloc(s->len, cap * sizeof(*p));
        if (!p) {
            s->oom = 1;
            return;
        }
        s->len = p;
        s->cap = cap;
    }
    s->len[s->n++] = len;
}

static inline unsigned f_cat(unsigned f) { return f & TOK_UCAT_MASK; }
static inline bool f_letter(unsigned f) { return f_cat(f) == TOK_UCAT_LETTER; }
static inline bool f_number(unsigned f) { return f_cat(f) == TOK_UCAT_NUMBER; }
static inline bool f_punct(unsigned f) { return f_cat(f) == TOK_UCAT_PUNCT; }
static inline bool f_ws(unsigned f) { return (f & TOK_UFLAG_WS) != 0; }

/* A view of one piece [ini, end) of the text; positions outside read as
 * OUT_OF_RANGE / no flags, as llama.cpp's _get_cpt/_get_flags. */
typedef struct piece_view {
    const cpt_text *t;
    size_t ini, end;
    size_t prev_end;
    split *out;
} piece_view;

static inline uint32_t pv_cpt(const piece_view *p, size_t pos)
{
    return (pos >= p->ini && pos < p->end) ? p->t->cpt[pos] : OUT_OF_RANGE;
}

static inline unsigned pv_fl(const piece_view *p, size_t pos)
{
    return (pos >= p->ini && pos < p->end) ? p->t->fl[pos] : 0;
}

/* Emit the piece ending at `end`; returns its length. */
static size_t pv_add(piece_view *p, size_t end)
{
    size_t len = end - p->prev_end;
    split_push(p->out, len);
    p->prev_end = end;
    return len;
}

/* GPT-2: 's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
 * (port of unicode_regex_split_custom_gpt2) */
static void pre_gpt2(piece_view *p)
{
    for (size_t pos = p->ini; pos < p->end;) {
        uint32_t cpt = pv_cpt(p, pos);
        unsigned f = pv_fl(p, pos);

        if (cpt == '\'' && pos + 1 < p->end) {
            uint32_t nx = pv_cpt(p, pos + 1);
            if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                pos += pv_add(p, pos + 2);
                continue;
            }
            if (pos + 2 < p->end) {
                uint32_t nn = pv_cpt(p, pos + 2);
                if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') ||
                    (nx == 'l' && nn == 'l')) {
                    pos += pv_add(p, pos + 3);
                    continue;
                }
            }
        }

        unsigned f2 = cpt == ' ' ? pv_fl(p, pos + 1) : f;
        if (f_letter(f2)) { /* <space>?\p{L}+ */
            pos += cpt == ' ';
            while (f_letter(f2))
                f2 = pv_fl(p, ++pos);
            pv_add(p, pos);
            continue;
        }
        if (f_number(f2)) { /* <space>?\p{N}+ */
            pos += cpt == ' ';
            while (f_number(f2))
                f2 = pv_fl(p, ++pos);
            pv_add(p, pos);
            continue;
        }
        if (!(f_ws(f2) || f_letter(f2) || f_number(f2)) && f2) { /* <space>?[^\s\p{L}\p{N}]+ */
            pos += cpt == ' ';
            while (!(f_ws(f2) || f_letter(f2) || f_number(f2)) && f2)
                f2 = pv_fl(p, ++pos);
            pv_add(p, pos);
            continue;
        }

        size_t nws = 0;
        while (f_ws(pv_fl(p, pos + nws)))
            nws++;
        if (nws > 1 && pv_cpt(p, pos + nws) != OUT_OF_RANGE) { /* \s+(?!\S) */
            pos += nws - 1;
            pv_add(p, pos);
            continue;
        }
        if (nws > 0) { /* \s+ */
            pos += nws;
            pv_add(p, pos);
            continue;
        }
        pv_add(p, ++pos); /* no match */
    }
}

/* ASCII-only lower-casing is enough here: no other code point lower-cases to
 * one of the letters of the contractions (s t m d r e v l). */
static uint32_t lower_ascii(uint32_t c)
{
    return (c >= 'A' && c <= 'Z') ? c + 32 : c;
}

/* LLaMA-3: (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|
 *          ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
 * (port of unicode_regex_split_custom_llama3). Qwen2 is the same regex with
 * \p{N} instead of \p{N}{1,3}: max_digits 1. */
static void pre_llama3(piece_view *p, size_t max_digits)
{
    for (size_t pos = p->ini; pos < p->end;) {
        uint32_t cpt = pv_cpt(p, pos);
        unsigned f = pv_fl(p, pos);

        if (cpt == '\'' && pos + 1 < p->end) { /* contractions, any case */
            uint32_t nx = lower_ascii(pv_cpt(p, pos + 1));
            if (nx == 's' || nx == 't' || nx == 'm' || nx == 'd') {
                pos += pv_add(p, pos + 2);
                continue;
            }
            if (pos + 2 < p->end) {
                uint32_t nn = lower_ascii(pv_cpt(p, pos + 2));
                if ((nx == 'r' && nn == 'e') || (nx == 'v' && nn == 'e') ||
                    (nx == 'l' && nn == 'l')) {
                    pos += pv_add(p, pos + 3);
                    continue;
                }
            }
        }

        /* [^\r\n\p{L}\p{N}]?\p{L}+ */
        if (!(cpt == '\r' || cpt == '\n' || f_number(f))) {
            if (f_letter(f) || f_letter(pv_fl(p, pos + 1))) {
                pos++;
                while (f_letter(pv_fl(p, pos)))
                    pos++;
                pv_add(p, pos);
                continue;
            }
        }

        if (f_number(f)) { /* \p{N}{1,max_digits} */
            size_t ini = pos;
            while (f_number(pv_fl(p, pos))) {
                if (++pos - ini >= max_digits) {
                    pv_add(p, pos);
                    ini = pos;
                }
            }
            pv_add(p, pos);
            continue;
        }

        /* <space>?[^\s\p{L}\p{N}]+[\r\n]* */
        unsigned f2 = cpt == ' ' ? pv_fl(p, pos + 1) : f;
        if (!(f_ws(f2) || f_letter(f2) || f_number(f2)) && f) {
            pos += cpt == ' ';
            while (!(f_ws(f2) || f_letter(f2) || f_number(f2)) && f2)
                f2 = pv_fl(p, ++pos);
            uint32_t c2 = pv_cpt(p, pos);
            while (c2 == '\r' || c2 == '\n')
                c2 = pv_cpt(p, ++pos);
            pv_add(p, pos);
            continue;
        }

        size_t nws = 0, last_rn = 0;
        while (f_ws(pv_fl(p, pos + nws))) {
            uint32_t c2 = pv_cpt(p, pos + nws);
            if (c2 == '\r' || c2 == '\n')
                last_rn = pos + nws + 1;
            nws++;
        }
        if (last_rn > 0) { /* \s*[\r\n]+ */
            pos = last_rn;
            pv_add(p, pos);
            continue;
        }
        if (nws > 1 && pv_cpt(p, pos + nws) != OUT_OF_RANGE) { /* \s+(?!\S) */
            pos += nws - 1;
            pv_add(p, pos);
            continue;
        }
        if (nws > 0) { /* \s+ */
            pos += nws;
            pv_add(p, pos);
            continue;
        }
        pv_add(p, ++pos);
    }
}

/* Character classes of the std::regex patterns. llama.cpp feeds std::regex
 * either a "collapsed" text (patterns with \p{..}) or the code points with
 * non-ASCII whitespace replaced by U+000B (other patterns); both amount to:
 * ASCII classified as the C locale does, non-ASCII by category, and
 * non-ASCII whitespace matching only \s. */
enum cls {
    CLS_CR_LF,        /* [\r\n] */
    CLS_LETTER,       /* \p{L} */
    CLS_NUMBER,       /* \p{N} */
    CLS_PUNCT,        /* \p{P} */
    CLS_FALCON,       /* [\p{P}\$\+<=>\^~\|`] */
    CLS_DEFAULT,      /* [\p{P}\$\+<=>\^~\|] */
    CLS_DS_LETTER,    /* deepseek-llm [A-Za-zµÀ-Ö...] */
    CLS_DS_PUNCT,     /* deepseek-llm [!-/:-~！-／：-～‘-‟　-。] */
    CLS_CJK,          /* [一-龥ࠀ-一가-퟿] */
};

static bool in_ranges(const uint32_t (*r)[2], size_t n, uint32_t c)
{
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (c < r[mid][0])
            hi = mid;
        else if (c > r[mid][1])
            lo = mid + 1;
        else
            return true;
    }
    return false;
}

static bool cls_match(int cls, uint32_t c, unsigned f)
{
    if (c > 0x7f && f_ws(f))
        return false; /* became \v: matches \s only */
    switch (cls) {
    case CLS_CR_LF:
        return c == '\r' || c == '\n';
    case CLS_LETTER:
        return f_letter(f);
    case CLS_NUMBER:
        return f_number(f);
    case CLS_PUNCT:
        return f_punct(f);
    case CLS_FALCON:
        return f_punct(f) || (c < 0x80 && c && strchr("$+<=>^~|`", (int)c));
    case CLS_DEFAULT:
        return f_punct(f) || (c < 0x80 && c && strchr("$+<=>^~|", (int)c));
    case CLS_DS_LETTER:
        return in_ranges(tok_ucd_deepseek_letters, tok_ucd_deepseek_letters_n, c);
    case CLS_DS_PUNCT:
        return (c >= 0x21 && c <= 0x2f) || (c >= 0x3a && c <= 0x7e) ||
               (c >= 0xff01 && c <= 0xff0f) || (c >= 0xff1a && c <= 0xff5e) ||
               (c >= 0x2018 && c <= 0x201f) || (c >= 0x3000 && c <= 0x3002);
    case CLS_CJK:
        return (c >= 0x4e00 && c <= 0x9fa5) || (c >= 0x0800 && c <= 0x4e00) ||
               (c >= 0xac00 && c <= 0xd7ff);
    }
    return false;
}

static inline bool pv_cls(const piece_view *p, int cls, size_t pos)
{
    return pos < p->end && cls_match(cls, p->t->cpt[pos], p->t->fl[pos]);
}

/* Patterns of the form X, X+ or \s?X+ (regex_search semantics: leftmost
 * match, unmatched text between matches is a piece of its own). */
enum { PAT_ONE, PAT_RUN, PAT_WS_RUN };

static void pre_class(piece_view *p, int cls, int pat)
{
    size_t pos = p->ini;
    while (pos < p->end) {
        size_t start = pos, q;
        if (pat == PAT_WS_RUN && f_ws(p->t->fl[pos]) && pv_cls(p, cls, pos + 1)) {
            q = pos + 1;
        } else if (pv_cls(p, cls, pos)) {
            q = pos;
        } else {
            pos++;
            continue;
        }
        if (pat == PAT_ONE) {
            q++;
        } else {
            while (pv_cls(p, cls, q))
                q++;
        }
        if (start > p->prev_end)
            pv_add(p, start); /* the gap before the match */
        pv_add(p, q);
        pos = q;
    }
    pv_add(p, p->end);
}

/* \s+$ : the trailing whitespace of the piece */
static void pre_trailing_ws(piece_view *p)
{
    size_t q = p->end;
    while (q > p->ini && f_ws(p->t->fl[q - 1]))
        q--;
    pv_add(p, q);
    pv_add(p, p->end);
}

/* [0-9][0-9][0-9] */
static void pre_three_digits(piece_view *p)
{
    size_t pos = p->ini;
    while (pos + 3 <= p->end) {
        const uint32_t *c = p->t->cpt + pos;
        if (c[0] >= '0' && c[0] <= '9' && c[1] >= '0' && c[1] <= '9' && c[2] >= '0' &&
            c[2] <= '9') {
            pv_add(p, pos); /* gap (no-op when empty) */
            pv_add(p, pos + 3);
            pos += 3;
        } else {
            pos++;
        }
    }
    pv_add(p, p->end);
}

/* One step of a pre-tokenizer. */
enum step_kind { ST_GPT2, ST_LLAMA3, ST_QWEN2, ST_CLASS, ST_TRAILING_WS, ST_THREE_DIGITS };

typedef struct pre_step {
    int kind;
    int cls, pat; /* ST_CLASS */
} pre_step;

/* The regex lists of llm_tokenizer_bpe, in order. */
static int pre_steps(int pre, pre_step *st)
{
    int n = 0;
    switch (pre) {
    case PRE_GPT2:
        st[n++] = (pre_step){ST_GPT2, 0, 0};
        break;
    case PRE_LLAMA3:
        st[n++] = (pre_step){ST_LLAMA3, 0, 0};
        break;
    case PRE_QWEN2:
        st[n++] = (pre_step){ST_QWEN2, 0, 0};
        break;
    case PRE_DEEPSEEK_LLM:
        st[n++] = (pre_step){ST_CLASS, CLS_CR_LF, PAT_ONE};
        st[n++] = (pre_step){ST_CLASS, CLS_DS_LETTER, PAT_WS_RUN};
        st[n++] = (pre_step){ST_CLASS, CLS_DS_PUNCT, PAT_WS_RUN};
        st[n++] = (pre_step){ST_TRAILING_WS, 0, 0};
        st[n++] = (pre_step){ST_CLASS, CLS_CJK, PAT_RUN};
        st[n++] = (pre_step){ST_CLASS, CLS_NUMBER, PAT_RUN};
        break;
    case PRE_DEEPSEEK_CODER:
        st[n++] = (pre_step){ST_CLASS, CLS_CR_LF, PAT_ONE};
        st[n++] = (pre_step){ST_CLASS, CLS_LETTER, PAT_WS_RUN};
        st[n++] = (pre_step){ST_CLASS, CLS_PUNCT, PAT_WS_RUN};
        st[n++] = (pre_step){ST_CLASS, CLS_CJK, PAT_RUN};
        st[n++] = (pre_step){ST_CLASS, CLS_NUMBER, PAT_ONE};
        break;
    case PRE_FALCON:
        st[n++] = (pre_step){ST_CLASS, CLS_FALCON, PAT_RUN};
        st[n++] = (pre_step){ST_GPT2, 0, 0};
        st[n++] = (pre_step){ST_THREE_DIGITS, 0, 0};
        break;
    case PRE_STARCODER:
        st[n++] = (pre_step){ST_CLASS, CLS_NUMBER, PAT_ONE};
        st[n++] = (pre_step){ST_GPT2, 0, 0};
        break;
    default: /* PRE_DEFAULT */
        st[n++] = (pre_step){ST_CLASS, CLS_DEFAULT, PAT_RUN};
        st[n++] = (pre_step){ST_GPT2, 0, 0};
        st[n++] = (pre_step){ST_CLASS, CLS_NUMBER, PAT_RUN};
        st[n++] = (pre_step){ST_THREE_DIGITS, 0, 0};
        break;
    }
    return n;
}

/* Split the code points of one fragment into pre-tokens. */
int tok_pre_tokenize(int pre, const cpt_text *t, split *out)
{
    pre_step st[8];
    int nst = pre_steps(pre, st);
    split cur = {0};
    split_push(&cur, t->n);
    for (int s = 0; s < nst && !cur.oom; s++) {
        split next = {0};
        size_t start = 0;
        for (size_t k = 0; k < cur.n; k++) {
            piece_view p = {t, start, start + cur.len[k], start, &next};
            switch (st[s].kind) {
            case ST_GPT2: pre_gpt2(&p); break;
            case ST_LLAMA3: pre_llama3(&p, 3); break;
            case ST_QWEN2: pre_llama3(&p, 1); break;
            case ST_CLASS: pre_class(&p, st[s].cls, st[s].pat); break;
            case ST_TRAILING_WS: pre_trailing_ws(&p); break;
            case ST_THREE_DIGITS: pre_three_digits(&p); break;
            }
            start += cur.len[k];
        }
        free(cur.len);
        cur = next;
    }
    *out = cur;
    return cur.oom ? KP_ENOMEM : 0;
}
