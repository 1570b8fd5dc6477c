/*
 * stop.c — streaming stop-sequence matcher (see stop.h for the contract).
 *
 * The pending buffer holds only text not yet emitted. On each feed:
 *   1. drop the bytes emitted by the previous call, append the new piece;
 *   2. find the stop string that completes first in the pending text
 *      (earlier bytes were already proven free of a stop start, see below);
 *      if there is one, emit what precedes it and stop;
 *   3. otherwise hold back the longest suffix that is a proper prefix of a
 *      stop string (a stop could start there and finish in a later piece),
 *      and an incomplete trailing UTF-8 sequence; emit the rest.
 * A byte is emitted only when no stop string can start at it: a stop that
 * starts at position i and runs past the end makes pending[i..] a prefix of
 * that stop, which step 3 holds back. So the pending buffer stays short
 * (at most the longest stop + 3 bytes + one piece).
 */
#include "server/stop.h"

#include <stdlib.h>
#include <string.h>

int stop_init(stop_matcher *m, const char *const *stops, int n, kp_err *err) {
    memset(m, 0, sizeof(*m));
    if (n < 0) return kp_errf(err, KP_EINVAL, "stop: negative number of stop strings (%d)", n);
    if (n > 0) {
        m->stops = calloc((size_t)n, sizeof(*m->stops));
        m->stop_lens = calloc((size_t)n, sizeof(*m->stop_lens));
        if (!m->stops || !m->stop_lens) {
            stop_free(m);
            return kp_errf(err, KP_ENOMEM, "stop: out of memory");
        }
    }
    for (int i = 0; i < n; i++) {
        if (!stops[i] || !stops[i][0]) {
            stop_free(m);
            return kp_errf(err, KP_EINVAL, "stop: stop string %d is empty", i);
        }
        m->stop_lens[i] = strlen(stops[i]);
        m->stops[i] = malloc(m->stop_lens[i] + 1);
        if (!m->stops[i]) {
            stop_free(m);
            return kp_errf(err, KP_ENOMEM, "stop: out of memory");
        }
        memcpy(m->stops[i], stops[i], m->stop_lens[i] + 1);
        m->n = i + 1;
    }
    m->n = n;
    return 0;
}

void stop_free(stop_matcher *m) {
    if (m->stops)
        for (int i = 0; i < m->n; i++) free(m->stops[i]);
    free(m->stops);
    free(m->stop_lens);
    free(m->buf);
    memset(m, 0, sizeof(*m));
}

size_t stop_utf8_incomplete_tail(const char *s, size_t len) {
    const unsigned char *u = (const unsigned char *)s;
    /* Walk back over at most 3 continuation bytes to the lead byte. */
    size_t k = 0;
    while (k < 3 && k < len && (u[len - 1 - k] & 0xC0) == 0x80) k++;
    if (k == len) return 0; /* only continuation bytes: invalid, not incomplete */
    unsigned char lead = u[len - 1 - k];
    size_t need;
    if (lead >= 0xF0 && lead <= 0xF4) need = 4;
    else if (lead >= 0xE0 && lead <= 0xEF) need = 3;
    else if (lead >= 0xC2 && lead <= 0xDF) need = 2;
    else return 0; /* ASCII or an invalid byte: nothing to wait for */
    return (k + 1 < need) ? k + 1 : 0;
}

/* Where to cut for the stop string that completes first in p[0..n): the one
 * whose last byte comes earliest, the longest of those ending at the same
 * byte. This is what feeding the text one byte at a time would give, so the
 * result never depends on how the text was split into pieces. Returns n if
 * no stop string occurs. */
static size_t stop_find_first(const stop_matcher *m, const char *p, size_t n) {
    size_t best_start = n, best_end = (size_t)-1;
    for (int i = 0; i < m->n; i++) {
        const char *hit = memmem(p, n, m->stops[i], m->stop_lens[i]);
        if (!hit) continue;
        size_t start = (size_t)(hit - p), end = start + m->stop_lens[i];
        if (end < best_end || (end == best_end && start < best_start)) {
            best_start = start;
            best_end = end;
        }
    }
    return best_start;
}

/* Longest k < stop_len such that p's last k bytes equal a stop's first k. */
static size_t stop_partial_hold(const stop_matcher *m, const char *p, size_t n) {
    size_t hold = 0;
    for (int i = 0; i < m->n; i++) {
        size_t sl = m->stop_lens[i];
        size_t kmax = KP_MIN(sl - 1, n);
        for (size_t k = kmax; k > hold; k--) {
            if (memcmp(p + n - k, m->stops[i], k) == 0) {
                hold = k;
                break;
            }
        }
    }
    return hold;
}

int stop_feed(stop_matcher *m, const char *piece, size_t len, const char **emit,
              size_t *emit_len) {
    *emit = "";
    *emit_len = 0;
    if (m->stopped) return 1;
    /* 1. Forget what the previous call emitted, append the piece. */
    if (m->start > 0) {
        memmove(m->buf, m->buf + m->start, m->len - m->start);
        m->len -= m->start;
        m->start = 0;
    }
    if (m->len + len + 1 > m->cap) {
        size_t cap = KP_MAX(m->cap * 2, m->len + len + 64);
        char *nb = realloc(m->buf, cap);
        if (!nb) return KP_ENOMEM;
        m->buf = nb;
        m->cap = cap;
    }
    if (len) memcpy(m->buf + m->len, piece, len);
    m->len += len;

    /* 2. A complete stop string? */
    size_t at = stop_find_first(m, m->buf, m->len);
    if (at < m->len) {
        m->stopped = true;
        *emit = m->buf;
        *emit_len = at;
        m->start = m->len; /* nothing else will ever be emitted */
        return 1;
    }
    /* 3. Hold back a possible stop start and an incomplete character. */
    size_t hold = KP_MAX(stop_partial_hold(m, m->buf, m->len),
                         stop_utf8_incomplete_tail(m->buf, m->len));
    *emit = m->buf;
    *emit_len = m->len - hold;
    m->start = m->len - hold;
    return 0;
}

void stop_flush(stop_matcher *m, const char **emit, size_t *emit_len) {
    *emit = "";
    *emit_len = 0;
    if (m->stopped || !m->buf) return;
    *emit = m->buf + m->start;
    *emit_len = m->len - m->start;
    m->start = m->len;
}
