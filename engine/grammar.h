/*
 * grammar.h — constrained decoding: a JSON-schema subset compiled to a
 * pushdown automaton over bytes, and a token trie that turns an automaton
 * state into the mask of tokens that keep the output valid.
 *
 * Contract
 *   - gram (compiled grammar) and gram_vocab (token trie of one tokenizer)
 *     are immutable once made: share them between jobs and threads.
 *     gram_state is one generation's position: single-threaded.
 *   - gram_compile() accepts this subset of JSON Schema (draft 2020-12):
 *       type (object, array, string, number, integer, boolean, null, or a
 *       list of them), properties, required, additionalProperties (false,
 *       true or a schema; ABSENT means false when `properties` is given and
 *       true otherwise), enum, const, items (a schema or false), prefixItems,
 *       minItems, maxItems, anyOf, oneOf (as anyOf: exclusivity is not
 *       enforced), $ref to "#", "#/$defs/..." or "#/definitions/..."
 *       (recursion allowed, bounded by GRAM_MAX_DEPTH), $defs/definitions,
 *       minLength/maxLength (code points), format date, date-time
 *       (YYYY-MM-DDTHH:MM:SS then Z or +HH:MM/-HH:MM, no fraction) and uuid.
 *       Annotations are ignored: title, description, $schema, $id, $comment,
 *       default, examples, deprecated, readOnly, writeOnly, strict.
 *       Boolean schemas: true = any value; false is an error.
 *     Limits (KP_EUNSUP past them): GRAM_MAX_PROPS, GRAM_MAX_ENUM,
 *     GRAM_MAX_LITERAL, GRAM_MAX_ANYOF, schema nesting 64.
 *     Anything else is KP_EUNSUP with a message naming the keyword and
 *     its JSON pointer ("unsupported keyword 'pattern' at /properties/a"),
 *     a malformed schema is KP_EINVAL (also with the pointer).
 *   - gram_compile_json_object(): any JSON object (response_format
 *     json_object), nesting at most GRAM_MAX_DEPTH.
 *   - Output shape: the value may be preceded by and have between its tokens
 *     at most GRAM_MAX_WS whitespace bytes (space, \n, \t, \r) per gap, so a
 *     model cannot loop on spaces; nothing follows the value. Object
 *     properties come in any order, each at most once; an object closes only
 *     when every required property is present; an additional key never spells a
 *     declared property (and, where the object declares any, has no escapes). Numbers have at most
 *     GRAM_MAX_DIGITS digits in the integer part and in the fraction, 2 in the
 *     exponent. Strings are valid UTF-8 (no overlong forms or surrogates),
 *     control characters only escaped, \u escapes not surrogates or \u0000
 *     (so that every output parses with jansson too).
 *   - gram_state_accepting(): the bytes so far are a complete value (EOS may
 *     follow). gram_state_complete(): and no byte can follow (generation can
 *     end now).
 *   - gram_mask(): sets bit id of mask (uint32_t words, (n_vocab+31)/32) for
 *     every token whose bytes the automaton accepts from the current state,
 *     plus the EOG tokens when the state is accepting. Tokens with no bytes
 *     (control tokens) are never allowed otherwise. It walks the trie once
 *     with the automaton, pruning a subtree at its first rejected byte; in a
 *     plain string it adds the precomputed set of "plain" tokens in bulk and
 *     walks only the others.
 */
#ifndef KP_GRAMMAR_H
#define KP_GRAMMAR_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "engine/tok.h"
#include "kernels/kp.h"

#define GRAM_MAX_DEPTH 32   /* nesting of the automaton's stack */
#define GRAM_MAX_THREADS 8  /* alternative parses followed at once (anyOf) */
#define GRAM_MAX_WS 4       /* whitespace bytes per gap */
#define GRAM_MAX_DIGITS 15  /* digits of a number's integer part / fraction */
#define GRAM_MAX_PROPS 64   /* properties per object schema */
#define GRAM_MAX_ENUM 1024  /* enum values per schema */
#define GRAM_MAX_LITERAL 4096 /* bytes of JSON per enum/const value or property name */
#define GRAM_MAX_ANYOF 64   /* schemas per anyOf/oneOf */

typedef struct gram gram;
typedef struct gram_vocab gram_vocab;
typedef struct gram_state gram_state;

/* Compile a JSON schema given as text (len bytes). */
int gram_compile(gram **out, const char *schema, size_t len, kp_err *err);
/* Any JSON object. */
int gram_compile_json_object(gram **out, kp_err *err);
void gram_free(gram *g);

/* The trie of v's tokens (their tok_piece bytes, special=false). */
int gram_vocab_new(gram_vocab **out, const tok_vocab *v, kp_err *err);
void gram_vocab_free(gram_vocab *gv);
int32_t gram_vocab_n(const gram_vocab *gv);

/* A fresh state at the start of the value. gv may be NULL (then only
 * gram_state_feed works, not the token functions). */
int gram_state_new(gram_state **out, const gram *g, const gram_vocab *gv, kp_err *err);
void gram_state_free(gram_state *s);
/* Feed bytes: 0, or KP_EINVAL when they are rejected (the state is then
 * unchanged). */
int gram_state_feed(gram_state *s, const void *bytes, size_t n);
/* Feed one token's bytes; an EOG token is accepted only when accepting. */
int gram_state_accept_token(gram_state *s, int32_t id);
bool gram_state_accepting(const gram_state *s);
bool gram_state_complete(const gram_state *s);
/* Fill the mask (see above); returns the number of allowed tokens, or
 * KP_ENOMEM (its scratch space is allocated by the first call). */
int gram_mask(gram_state *s, uint32_t *mask);
/* logits[i] = -inf where mask bit i is clear. */
void gram_apply_mask(const uint32_t *mask, float *logits, int32_t n_vocab);

#endif
