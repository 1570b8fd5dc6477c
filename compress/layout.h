/*
 * layout.h — the parking layout: how the n rows of a parked KV cache are cut
 * into spans that are either coded (through a KV codec) or kept lossless.
 *
 * Why one module: calibration fits a codec for a layout, the quality harness
 * measures a codec under one, parking stores the spans it gives and the
 * manifest reader refuses spans that do not follow it. All of them must cut
 * a cache the same way, so the layout, its defaults and the cutting live
 * here and nowhere else.
 *
 * For a cache of n rows, sink S, window W, chunk C:
 *
 *     rows  0 ... S-1 | S ... S+C-1 | S+C ... S+2C-1 | ... E-1 | E ... n-1
 *           lossless  |  coded      |  coded         | coded   | lossless
 *           (sink)    |  C rows     |  C rows        | <= C    | (window)
 *
 *   S is min(sink, n) and E = max(S, n - W). Coded chunks are aligned at
 *   S + k*C, so the sink does not drag a whole chunk into lossless storage;
 *   the last coded chunk is partial when n - W cuts it (codecs take any
 *   1..65535 rows). When n < S + W nothing is coded. Lossless runs longer
 *   than C are cut into pieces of at most C rows (one codec chunk header
 *   each), so buffers for C rows always do.
 *   Example: n 128, S 4, W 0, C 64 -> [0,4) lossless, [4,68) coded,
 *   [68,128) coded (60 rows).
 *
 * Contract: pure functions of their arguments, no state; any thread.
 */
#ifndef KP_LAYOUT_H
#define KP_LAYOUT_H

#include "kernels/kp.h"

/* The defaults of the session store, `kvpark ppl`, and `kvpark calibrate`
 * (`kvpark bench codec` has its own, measured in compress/quality.c):
 *   sink 4    the first tokens are attention sinks: every later query puts
 *             weight on them, so an error there is felt everywhere, and
 *             keeping 4 rows lossless is cheap;
 *   window 64 the most recent tokens are the ones attention reads most, and
 *             they are re-parked every time a conversation goes idle: keeping
 *             one chunk's worth lossless keeps the error from compounding
 *             where it hurts and avoids re-coding rows that will be coded
 *             again as whole chunks later;
 *   chunk 64  rows per coded chunk: large enough that a chunk's 16-byte
 *             header and per-chunk scales are a small share of its bytes,
 *             small enough that a shared prefix (a system prompt) shares most
 *             of its chunks and a torn write loses little. */
#define LAYOUT_DEFAULT_SINK 4
#define LAYOUT_DEFAULT_WINDOW 64
#define LAYOUT_DEFAULT_CHUNK 64
/* A codec chunk holds 1..65535 rows (its header's row count is a u16). */
#define LAYOUT_MAX_CHUNK 65535

typedef struct layout {
    int sink;    /* S: first rows kept lossless, >= 0 */
    int window;  /* W: last rows kept lossless, >= 0 */
    int chunk;   /* C: rows per coded chunk (and at most per lossless piece), 1..65535 */
} layout;

/* One span of a parked cache: rows [start, start + n), coded (1) through the
 * codec or stored lossless (0, codec "none", at the cache's element type). */
typedef struct layout_span {
    int start, n;
    int coded;
} layout_span;

/* {LAYOUT_DEFAULT_SINK, LAYOUT_DEFAULT_WINDOW, LAYOUT_DEFAULT_CHUNK}. */
layout layout_default(void);

/* 0 when lay is usable (sink >= 0, window >= 0, chunk 1..65535), else
 * KP_EINVAL with a message naming the bad field. */
int layout_check(const layout *lay, kp_err *err);

/* Upper bound of the number of spans of n_pos rows: n_pos / chunk + 3
 * (0 for a bad layout or n_pos < 0). */
int layout_max_spans(const layout *lay, int n_pos);

/* The spans of a cache of n_pos rows, in row order: they cover [0, n_pos)
 * exactly, each with 1..chunk rows, as the map above says. Writes the first
 * min(total, max) spans (spans may be NULL when max is 0) and returns the
 * total, or KP_EINVAL for n_pos < 0 or a layout layout_check refuses. */
int layout_spans(const layout *lay, int n_pos, layout_span *spans, int max);

/* The same into a malloc'd array: *out (NULL when there are no spans, else
 * free() it) and *n_out. KP_EINVAL for a bad layout, KP_ENOMEM. */
int layout_spans_alloc(const layout *lay, int n_pos, layout_span **out, int *n_out, kp_err *err);

#endif
