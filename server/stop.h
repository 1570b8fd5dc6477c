/*
 * stop.h — streaming stop-sequence matcher for generated text.
 *
 * Why: the API's `stop` strings must be cut out of the output even when one
 * is spread over several tokens, and streamed deltas must never show a part
 * of a stop string that later turns out to be one, nor half of a UTF-8
 * character. The generator feeds each decoded token piece; the matcher says
 * which bytes are safe to send now.
 *
 * Contract
 *   - stop_init() copies the stop strings (empty ones are refused).
 *     n == 0 is allowed: then only the UTF-8 hold-back applies.
 *   - stop_feed() appends a piece and sets *emit / *emit_len to the bytes
 *     safe to emit now (pointer into the matcher, valid until the next call).
 *     Held back: the longest suffix of the pending text that is a proper
 *     prefix of some stop string, and an incomplete trailing UTF-8 sequence.
 *   - A stop string fires as soon as its last byte arrives (as generation
 *     would halt there); if several end at the same byte, the longest wins.
 *     So with stops "abc" and "b", text "abc" stops at "b" (emits "a"),
 *     however it was split: the result is what byte-by-byte feeding gives.
 *     The text before the stop string is emitted, the stop text itself and
 *     anything after it never are, and stop_feed() returns 1; later feeds
 *     emit nothing and return 1 again. Otherwise it returns 0 (or KP_ENOMEM).
 *   - stop_flush() at the end of generation (max_tokens, EOS) emits whatever
 *     is still held back, incomplete UTF-8 included.
 *   - Concatenating everything emitted equals the full text cut where the
 *     first stop string to complete begins, however the text was split.
 *   - If the text is valid UTF-8 and the stop strings are too, every emitted
 *     chunk is valid UTF-8 on its own (cuts fall on character boundaries).
 */
#ifndef KP_STOP_H
#define KP_STOP_H

#include <stdbool.h>
#include <stddef.h>

#include "kernels/kp.h"

typedef struct stop_matcher {
    char **stops;       /* [n] owned copies */
    size_t *stop_lens;  /* [n] */
    int n;
    char *buf;          /* pending text: buf[start..len) not yet emitted */
    size_t start, len, cap;
    bool stopped;
} stop_matcher;

int stop_init(stop_matcher *m, const char *const *stops, int n, kp_err *err);
void stop_free(stop_matcher *m);
/* Returns 1 when stopped, 0 otherwise, KP_ENOMEM if the buffer cannot grow. */
int stop_feed(stop_matcher *m, const char *piece, size_t len, const char **emit,
              size_t *emit_len);
/* Emit everything still held back (nothing once stopped). */
void stop_flush(stop_matcher *m, const char **emit, size_t *emit_len);

/* Length of an incomplete UTF-8 sequence at the end of s[0..len) (0..3):
 * a lead byte followed by fewer continuation bytes than it announces. */
size_t stop_utf8_incomplete_tail(const char *s, size_t len);

#endif
