/*
 * tok.h — tokenizers read from a GGUF file's `tokenizer.ggml.*` keys.
 *
 * Two families, chosen by `tokenizer.ggml.model`:
 *   "llama"  SentencePiece-style (SPM): scores, a space prepended and spaces
 *            replaced by U+2581 "▁", greedy best-score bigram merging as
 *            llama.cpp's llm_tokenizer_spm does, byte fallback <0xXX>.
 *   "gpt2"   byte-level BPE: `tokenizer.ggml.merges` ranks, GPT-2 byte->unicode
 *            mapping, and a pre-tokenizer chosen by `tokenizer.ggml.pre`
 *            ("gpt-2", "llama-bpe"/"llama3", "qwen2", "deepseek-coder",
 *            "deepseek-llm", "falcon", "starcoder", "refact", "mpt", ... ;
 *            unknown names fall back to "gpt-2" with a warning in tok_info).
 *
 * Contract (behaviour is that of llama.cpp's llama_tokenize/detokenize)
 *   - tok_encode(add_special=true) prepends BOS when the vocab says so
 *     (`tokenizer.ggml.add_bos_token`, default true for SPM, false for BPE)
 *     and appends EOS when `add_eos_token` is set.
 *   - parse_special=true turns the text of control/unknown tokens
 *     (token_type 3 and 2, e.g. "<s>", "<|im_start|>") into their ids;
 *     otherwise such text is tokenised as plain text. User-defined tokens
 *     (token_type 4, e.g. deepseek's "ö", mpt's runs of spaces) are split out
 *     ALWAYS, as llama.cpp and HF tokenizers do (the test vectors need it).
 *   - tok_piece() gives the bytes a token stands for (byte tokens give one raw
 *     byte, "▁" becomes " " for SPM, byte-level BPE is un-mapped; control
 *     tokens give their text only if `special`).
 *   - tok_decode() concatenates pieces; with SPM a leading space of the first
 *     piece is dropped unless the previous token is BOS (as llama.cpp).
 *     It is llama_detokenize(remove_special, unparse_special = !remove_special):
 *     remove_special drops a leading BOS / trailing EOS and the text of
 *     control tokens; without it control tokens are rendered ("<s>").
 *     BPE vocabs other than deepseek/qwen2 also "clean spaces" (" ," -> ",").
 *   - Input text is arbitrary bytes: invalid UTF-8 never crashes. SPM
 *     tokenises it byte by byte via fallback; byte-level BPE sees each invalid
 *     byte as U+FFFD, exactly as llama.cpp (so it does not round-trip).
 */
#ifndef KP_TOK_H
#define KP_TOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/gguf.h"
#include "kernels/kp.h"

typedef struct tok_vocab tok_vocab;

enum tok_kind { TOK_SPM = 1, TOK_BPE = 2 };

/* Token attribute bits (from tokenizer.ggml.token_type: 1 normal, 2 unknown,
 * 3 control, 4 user-defined, 5 unused, 6 byte). */
enum tok_type {
    TOK_TYPE_NORMAL = 1,
    TOK_TYPE_UNKNOWN = 2,
    TOK_TYPE_CONTROL = 3,
    TOK_TYPE_USER = 4,
    TOK_TYPE_UNUSED = 5,
    TOK_TYPE_BYTE = 6,
};

int tok_load(tok_vocab **out, const gguf_file *f, kp_err *err);
void tok_free(tok_vocab *v);

int tok_kind(const tok_vocab *v);
int32_t tok_n_vocab(const tok_vocab *v);
int32_t tok_bos(const tok_vocab *v); /* -1 if none */
int32_t tok_eos(const tok_vocab *v); /* -1 if none */
int32_t tok_eot(const tok_vocab *v); /* end-of-turn (<|eot_id|>, <|im_end|>), -1 if none */
bool tok_add_bos(const tok_vocab *v);
/* True for EOS/EOT and other end-of-generation tokens. */
bool tok_is_eog(const tok_vocab *v, int32_t id);
int tok_type(const tok_vocab *v, int32_t id);
/* Raw vocabulary string of a token (as stored in the GGUF). */
const char *tok_text(const tok_vocab *v, int32_t id);
/* Find a token by exact text; -1 if absent. */
int32_t tok_find(const tok_vocab *v, const char *text, size_t len);

/* Tokenise `len` bytes of `text` into a malloc'd array *ids of *n ids. */
int tok_encode(const tok_vocab *v, const char *text, size_t len, bool add_special,
               bool parse_special, int32_t **ids, size_t *n, kp_err *err);

/* Write the bytes of one token into buf (up to cap); return the number of
 * bytes the piece has (may exceed cap: call again with a bigger buffer), or a
 * negative code for an invalid id. */
int tok_piece(const tok_vocab *v, int32_t id, bool special, char *buf, size_t cap);

/* Detokenise n ids into a malloc'd NUL-terminated string (*len bytes).
 * remove_special drops BOS/EOS etc., as llama_detokenize(remove_special). */
int tok_decode(const tok_vocab *v, const int32_t *ids, size_t n, bool remove_special,
               char **out, size_t *len, kp_err *err);

/* A one-line human description ("spm, 512 tokens, bos 1, eos 2"). */
const char *tok_info(const tok_vocab *v);

#endif
