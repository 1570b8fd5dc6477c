/*
 * layout.c — cutting a parked cache into coded and lossless spans (the map
 * and the defaults' reasons are in layout.h).
 *
 * Each of the three runs (sink, coded middle, window) is cut by the same
 * rule: pieces of at most `chunk` rows whose boundaries fall at
 * base + k*chunk, base being where the run starts. Only the middle run is
 * coded; cutting the lossless runs as well keeps every span within one
 * chunk's buffers.
 */
#include "compress/layout.h"

#include <stdlib.h>

layout layout_default(void) {
    layout l = {.sink = LAYOUT_DEFAULT_SINK, .window = LAYOUT_DEFAULT_WINDOW,
                .chunk = LAYOUT_DEFAULT_CHUNK};
    return l;
}

int layout_check(const layout *lay, kp_err *err) {
    if (!lay) return kp_errf(err, KP_EINVAL, "layout: NULL layout");
    if (lay->sink < 0 || lay->window < 0)
        return kp_errf(err, KP_EINVAL, "layout: sink %d and window %d must be >= 0", lay->sink,
                       lay->window);
    if (lay->chunk < 1 || lay->chunk > LAYOUT_MAX_CHUNK)
        return kp_errf(err, KP_EINVAL, "layout: chunk of %d rows (must be 1..%d)", lay->chunk,
                       LAYOUT_MAX_CHUNK);
    return 0;
}

int layout_max_spans(const layout *lay, int n_pos) {
    if (n_pos < 0 || layout_check(lay, NULL)) return 0;
    return n_pos / lay->chunk + 3;
}

/* Append the pieces of [a, b), at most `chunk` rows each, cut at base + k*chunk. */
static int layout_add(int a, int b, int base, int chunk, int coded, layout_span *spans, int max,
                      int k) {
    while (a < b) {
        long long next = base + ((long long)(a - base) / chunk + 1) * chunk; /* boundary after a */
        int end = next < b ? (int)next : b;
        if (k < max) spans[k] = (layout_span){.start = a, .n = end - a, .coded = coded};
        k++;
        a = end;
    }
    return k;
}

int layout_spans(const layout *lay, int n_pos, layout_span *spans, int max) {
    if (n_pos < 0 || layout_check(lay, NULL)) return KP_EINVAL;
    if (!spans || max < 0) max = 0;
    const int chunk = lay->chunk;
    int s = KP_MIN(lay->sink, n_pos);
    int e = n_pos - lay->window > s ? n_pos - lay->window : s; /* no overflow: both >= 0 */
    int k = layout_add(0, s, 0, chunk, 0, spans, max, 0);
    k = layout_add(s, e, s, chunk, 1, spans, max, k);
    return layout_add(e, n_pos, e, chunk, 0, spans, max, k);
}

int layout_spans_alloc(const layout *lay, int n_pos, layout_span **out, int *n_out, kp_err *err) {
    if (!out || !n_out) return kp_errf(err, KP_EINVAL, "layout: NULL output");
    *out = NULL;
    *n_out = 0;
    int rc = layout_check(lay, err);
    if (rc) return rc;
    int ns = layout_spans(lay, n_pos, NULL, 0);
    if (ns < 0)
        return kp_errf(err, KP_EINVAL, "layout: %d rows (must be >= 0)", n_pos);
    if (ns == 0) return 0;
    layout_span *sp = malloc((size_t)ns * sizeof *sp);
    if (!sp) return kp_errf(err, KP_ENOMEM, "layout: out of memory (%d spans)", ns);
    layout_spans(lay, n_pos, sp, ns);
    *out = sp;
    *n_out = ns;
    return 0;
}
