/*
 * autocodec.h — `--codec auto`: the server finds or makes the learned codec
 * of its model by itself.
 *
 * Why: the learned encoder is what kvpark is for, but a codec file has to be
 * fitted on text the model reads (compress/calib.h). A user who starts the
 * server should get it without running `kvpark calibrate` first. So:
 *
 *   1. autocodec_find() looks for a codec file bound to the model's
 *      fingerprint: beside the model (MODEL.gguf -> MODEL.kvcodec), then the
 *      one the server made earlier (COLD/autocodec/auto-FP.kvcodec). A file of
 *      another model is skipped, with a log line.
 *   2. If there is none, the server parks with int8 and autocodec_start()
 *      fits one in the background: from a text file (--calib-text) or from
 *      the prompts of the requests it serves (autocodec_feed, until `tokens`
 *      are seen). The fit runs on its own thread at the lowest priority
 *      (SCHED_IDLE, nice 19), with its own copy of the model on the CPU and
 *      one thread (the GGUF is mmap'd: the weights are shared), so it takes
 *      only CPU time nobody else wants and never a request's.
 *   3. It searches the bit budget for the smallest codec whose KL on a
 *      held-out part (the last 10% of the tokens) is at most
 *      max_kl / AUTOCODEC_KL_MARGIN, writes it durably (tmp, fsync, rename,
 *      fsync dir) with a JSON sidecar saying how it was made, and hands the
 *      path to opts.use (the server switches the store to it: new parks use
 *      it, sessions parked with int8 stay readable).
 *
 * The margin: the held-out part comes from the same source as the fit (the
 * same text file, or the same traffic); measured on stories-hd64, the KL on
 * the unseen dev file was 1.6x the held-out KL. A bound meant to hold on what
 * users send next therefore searches at half of it.
 *
 * Privacy: prompts fed from traffic (all tenants') are held in RAM only, as
 * token ids, until the fit starts, and freed then; the codec keeps only
 * aggregate statistics (means, principal directions, quantiser ranges).
 * GET /v1/codec shows no token counts of a traffic calibration (they would
 * tell one tenant how much the others send); /metrics (the operator's) does.
 *
 * States (autocodec_get):
 *   off          nothing to do (a codec file was found, or autocodec_start
 *                was not called)
 *   collecting   waiting for traffic: tokens of needed seen
 *   calibrating  loading the model, statistics, search steps, final fit
 *   done         the codec is written and in use (also when found at start
 *                in COLD/autocodec: its sidecar says how it was made)
 *   failed       the error says why; the server goes on parking with int8
 *
 * Thread-safety: autocodec_feed and autocodec_get may be called from any
 * thread; autocodec_free once, after the last feed, before the store closes.
 */
#ifndef KP_AUTOCODEC_H
#define KP_AUTOCODEC_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "compress/codec.h"

#define AUTOCODEC_KL_MARGIN 2.0
#define AUTOCODEC_DEFAULT_TOKENS 32768
#define AUTOCODEC_DEFAULT_MAX_KL 0.002
#define AUTOCODEC_DEFAULT_CTX 512
/* the layout the codec is fitted for: no lossless sink, the last 8 rows exact */
#define AUTOCODEC_SINK 0
#define AUTOCODEC_WINDOW 8
#define AUTOCODEC_PATH_MAX 1024

typedef struct autocodec autocodec;

typedef enum autocodec_state {
    AUTOCODEC_OFF, AUTOCODEC_COLLECTING, AUTOCODEC_CALIBRATING, AUTOCODEC_DONE, AUTOCODEC_FAILED,
} autocodec_state;

const char *autocodec_state_name(autocodec_state s);

/* Switch the server to the codec file at path (0, or an error). */
typedef int (*autocodec_use_fn)(void *ud, const char *path, kp_err *err);

typedef struct autocodec_opts {
    const char *model_path;  /* the server's model (a path or synthetic:NAME), loaded again on the CPU */
    codec_shape shape;       /* its KV shape and fingerprint (quality_codec_shape) */
    const char *dir;         /* the cold directory: the codec goes to DIR/autocodec/ */
    const char *calib_text;  /* NULL: calibrate from traffic (autocodec_feed) */
    int64_t tokens;          /* tokens to calibrate on (0: AUTOCODEC_DEFAULT_TOKENS) */
    int n_ctx;               /* calibration window (0: AUTOCODEC_DEFAULT_CTX; capped by the model's) */
    double max_kl;           /* the KL bound on unseen text (0: AUTOCODEC_DEFAULT_MAX_KL) */
    bool quiet;              /* no progress lines in the log (start, end and errors still) */
    autocodec_use_fn use;
    void *ud;
} autocodec_opts;

typedef struct autocodec_status {
    autocodec_state state;
    bool from_traffic;       /* the tokens come (came) from requests, not a text file */
    int64_t tokens, needed;  /* collected / to collect */
    char phase[64];          /* calibrating: what it is doing ("statistics", "search", "fit", ...) */
    double progress;         /* of the phase, 0..1 */
    double eta_s;            /* seconds left in the phase (< 0: unknown) */
    double kl_bound;         /* the bound (max_kl) and the held-out figures of the codec made */
    double heldout_kl, heldout_ratio, bits;
    double created;          /* unix seconds the codec was written (done) */
    char path[AUTOCODEC_PATH_MAX]; /* done (or off): the codec file */
    char error[512];         /* failed: why */
} autocodec_status;

/* The codec file for this model if there is one: 1 and its path in out,
 * 0 if none (log lines name a file skipped for being another model's).
 * dir NULL: only beside the model (a remote tier: every replica must park
 * with the same codec, and each one's cold directory is its own). */
int autocodec_find(const char *model_path, const codec_shape *shape, const char *dir, char *out, size_t cap);

/* A handle in state done for a codec found at start (reads its sidecar when
 * it is the server's own), or starts the background calibration when
 * found_path is NULL. */
int autocodec_start(autocodec **out, const autocodec_opts *o, const char *found_path, kp_err *err);
/* A prompt of a request (token ids, BOS included): kept while collecting. A
 * prompt that extends one kept earlier (the next turn of a conversation)
 * replaces it; one already contained in a kept prompt is ignored. */
void autocodec_feed(autocodec *a, const int32_t *tokens, size_t n);
void autocodec_get(autocodec *a, autocodec_status *st);
/* Cancels a calibration in flight (nothing is written) and joins it. */
void autocodec_free(autocodec *a);

#endif
