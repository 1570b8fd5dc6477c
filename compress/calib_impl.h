/*
 * calib_impl.h — what the two halves of the calibration share
 * (compress/calib_stats.c: the eigen solver, statistics of K/V rows, bit
 * allocation, running the model over the text and the weighted error of a
 * codec; compress/calib.c: the fit, its refinement and calib_run). Internal
 * to compress/calib*.c; the public contract is compress/calib.h.
 */
#ifndef KP_CALIB_IMPL_H
#define KP_CALIB_IMPL_H

#include <stdint.h>

#include "compress/calib.h"
#include "compress/codec.h"
#include "compress/codecfile.h"
#include "engine/kv.h"
#include "engine/model.h"

#define CALIB_RIDGE 1e-3

typedef struct cal_stats {
    codec_shape s;
    int kind, n_head, d, hd, nkv;
    int collect_kv;   /* 1: moments of K/V rows (fit); 0: only q (error eval) */
    int rope_avg;     /* 1: key weights averaged over relative RoPE rotations */
    int n_ctx;        /* window: the range of relative positions */
    double *sx;       /* [L][2][d] */
    double *sxx;      /* [L][2][d][d] (upper triangle filled) */
    double *sqq;      /* [L][nkv][hd][hd] */
    int64_t *cnt;     /* [L] rows seen */
    float *row;       /* [d] scratch */
    /* optional row sample (refinement and validation need the rows
     * themselves): every rows_stride-th row of each layer, at most rows_cap
     * (spread over all windows: measured better than whole windows, KL
     * 0.0085 against 0.0106 at 1.5 bits/value, window 8) */
    float *rows;      /* [L][2][rows_cap][d], keys as the coder sees them, or NULL */
    int64_t rows_cap, rows_stride;
    int64_t *rows_n;  /* [L] rows kept */
    /* attention weights of the kept rows (calib_opts.attn): the window's q
     * and k (after RoPE) and v are buffered per layer; once the window is
     * complete, cal_attn_window gives each kept row its weight */
    int attn, attn_window, n_ctx_buf;
    float *wq, *wk, *wv;  /* [L][n_ctx][n_head * hd], [L][n_ctx][d], [L][n_ctx][d] */
    int *wn;              /* [L] positions buffered in the current window */
    int *rowpos;          /* [L][rows_cap] position of each kept row in its window */
    int64_t *win_first;   /* [L] first kept row of the current window */
    float *roww;          /* [L][2][rows_cap] weight of each kept row (K, V) */
} cal_stats;

typedef int (*cal_window_fn)(void *ud, kv_cache *kv, int pos0, kp_err *err);
typedef double (*cal_dist_fn)(void *ud, int c, int j, int b);

extern const double cal_gauss_mse[CODECFILE_MAX_BITS + 1];

void cal_allocate(int n_coders, int d, int C, double target, int pca, int ranges,
                         cal_dist_fn dist, void *ud, uint8_t *bits);
int cal_attn_window(void *ud, kv_cache *kv, int pos0, kp_err *err);
int cal_importance(model *m, const cal_stats *st, int layer, int is_v, double *M, kp_err *err);
float *cal_row(const cal_stats *st, int layer, int is_v, int64_t i);
/* co (may be NULL): its cancel flag is checked before every window; with
 * show, progress goes to stderr (co->progress) and co->on_progress as `what`. */
int cal_run_windows(model *m, const int32_t *tokens, int64_t n, int n_ctx, cal_stats *st,
                    cal_window_fn fn, void *ud, const calib_opts *co, int show, const char *what, kp_err *err);
void cal_sqrt_blocks(const double *M, int d, int hd, double *S, double *Sinv);
int cal_stats_attn(cal_stats *st, int n_layer, int n_ctx, int window);
void cal_stats_free(cal_stats *st);
int cal_stats_init(cal_stats *st, const model_hparams *hp, const codec_shape *s, int kind,
                          int collect_kv, int64_t rows_cap, int64_t rows_stride);

#endif
