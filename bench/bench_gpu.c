/*
 * bench_gpu.c — `kvpark bench gpu`: copy ceilings (H2D, D2H, D2D) and the
 * fused codec decode kernel's GB/s against them. The contract is in
 * bench_gpu.h; deploy/gpu-check.sh runs it on a GPU host.
 *
 * Reading guide:
 *   1. options                     (bg_opts, bg_parse)
 *   2. the copy ceilings           (bg_copies: kernels/cuda/copybench.cu)
 *   3. one codec's decode          (bg_codec: encode on the CPU, upload,
 *                                   time one batched launch, check)
 *   4. output                      (bg_print, bg_csv, bg_plot) and main
 *
 * Why the host clock for the decode: codec_gpu_decode_batch is one launch on
 * the context's stream and codec_gpu_sync waits for it, so launch + sync on
 * the host clock is the kernel's time plus a few microseconds of launch
 * latency, small next to the tens of milliseconds of a 4K-token decode; the
 * copies are timed with CUDA events (copybench.cu) because they are the
 * ceilings the decode is compared with.
 */
#include "bench/bench_gpu.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "bench/plot.h"
#include "compress/codec.h"
#include "compress/codec_gpu.h"
#include "compress/layout.h"
#include "compress/quality.h"
#include "engine/model.h"
#include "kernels/kernels.h"
#include "kernels/kp.h"
#include "kernels/types.h"
#include "tools/cli.h"
#if KP_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

/* ---- 1. options ---------------------------------------------------------- */

#define BG_MAX_CODECS 16

typedef struct bg_opts {
    const char *model;                 /* -m (default: the default model) */
    const char *codecs[BG_MAX_CODECS]; /* --codec list */
    int n_codecs;
    char *codec_list;                  /* strdup'd --codec value the names point into */
    int tokens;                        /* --tokens: rows per layer and K/V */
    int kv_type;                       /* --kv-type (cache rows the decode writes) */
    uint64_t copy_bytes;               /* --copy-bytes */
    int repeats;                       /* -r */
    int gpu;                           /* --gpu: device index */
    const char *csv, *plot;
} bg_opts;

/* One result row. */
typedef struct bg_row {
    char test[16];  /* "copy H2D", "decode" */
    char codec[64]; /* codec name or "-" */
    size_t bytes_in, bytes_out;
    double med_ms, min_ms, max_ms;
    double gbps, traffic_gbps, vs_d2d; /* vs_d2d < 0: not applicable */
    const char *check;                 /* "ok", "-" */
} bg_row;

static const char bg_help[] =
    "usage: kvpark bench gpu [-m MODEL] [--codec fp16,int8,int4,kivi2,FILE...] [--tokens 4096]\n"
    "       [--kv-type f16|bf16|f32] [--copy-bytes 256M] [-r 10] [--gpu 0]\n"
    "       [--csv FILE] [--plot FILE.png]\n"
    "The GPU's copy ceilings (H2D and D2H from pinned memory, D2D; CUDA events) and the\n"
    "fused codec decode kernel: --tokens rows of every layer's K and V of MODEL's shape,\n"
    "encoded on the CPU in parking chunks, decoded on the GPU in one launch (median of -r\n"
    "after a warm-up) and checked against the CPU decoder. 'traffic' counts bytes read +\n"
    "written; 'vs D2D' is a decode's traffic over a D2D copy's. Needs a CUDA build and\n"
    "an NVIDIA GPU. Defaults: --codec fp16,int8,int4,kivi2, CSV bench-out/gpu.csv.\n";

static int bg_usage(const char *msg, const char *arg) {
    fprintf(stderr, "kvpark: bench gpu: %s%s%s (see kvpark bench gpu --help)\n", msg, arg ? ": " : "",
            arg ? arg : "");
    return 2;
}

enum { BG_OPT_CODEC = 4000, BG_OPT_TOKENS, BG_OPT_KV_TYPE, BG_OPT_COPY_BYTES, BG_OPT_GPU, BG_OPT_CSV,
       BG_OPT_PLOT };

/* 0 on success, 1 when --help was printed, 2 on bad usage (message printed). */
static int bg_parse(int argc, char **argv, bg_opts *o) {
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'},        {"codec", required_argument, 0, BG_OPT_CODEC},
        {"tokens", required_argument, 0, BG_OPT_TOKENS}, {"kv-type", required_argument, 0, BG_OPT_KV_TYPE},
        {"copy-bytes", required_argument, 0, BG_OPT_COPY_BYTES},
        {"repeats", required_argument, 0, 'r'},      {"gpu", required_argument, 0, BG_OPT_GPU},
        {"csv", required_argument, 0, BG_OPT_CSV},   {"plot", required_argument, 0, BG_OPT_PLOT},
        {"help", no_argument, 0, 'h'},               {0, 0, 0, 0}};
    *o = (bg_opts){.tokens = 4096, .kv_type = KP_TYPE_F16, .copy_bytes = 256ull << 20, .repeats = 10,
                   .csv = "bench-out/gpu.csv"};
    const char *list = "fp16,int8,int4,kivi2";
    int c;
    optind = 1;
    opterr = 0;
    while ((c = getopt_long(argc, argv, ":m:r:h", lo, NULL)) != -1) {
        long v;
        switch (c) {
        case 'm': o->model = optarg; break;
        case BG_OPT_CODEC: list = optarg; break;
        case BG_OPT_TOKENS:
            if (cli_parse_long(optarg, 1, 1 << 20, &v)) return bg_usage("bad --tokens (1..1048576)", optarg);
            o->tokens = (int)v;
            break;
        case BG_OPT_KV_TYPE:
            if (!strcmp(optarg, "f16")) o->kv_type = KP_TYPE_F16;
            else if (!strcmp(optarg, "bf16")) o->kv_type = KP_TYPE_BF16;
            else if (!strcmp(optarg, "f32")) o->kv_type = KP_TYPE_F32;
            else return bg_usage("bad --kv-type (f16, bf16 or f32)", optarg);
            break;
        case BG_OPT_COPY_BYTES:
            if (cli_parse_size(optarg, &o->copy_bytes) || o->copy_bytes < 4096 || o->copy_bytes > (64ull << 30))
                return bg_usage("bad --copy-bytes (4K..64G, e.g. 256M)", optarg);
            break;
        case 'r':
            if (cli_parse_long(optarg, 1, 1000, &v)) return bg_usage("bad -r (1..1000)", optarg);
            o->repeats = (int)v;
            break;
        case BG_OPT_GPU:
            if (cli_parse_long(optarg, 0, 255, &v)) return bg_usage("bad --gpu (a device index)", optarg);
            o->gpu = (int)v;
            break;
        case BG_OPT_CSV: o->csv = optarg; break;
        case BG_OPT_PLOT:
            if (!plot_quotable(optarg)) return bg_usage("--plot path must not contain quotes or backslashes", optarg);
            o->plot = optarg;
            break;
        case 'h': fputs(bg_help, stdout); return 1;
        case ':': return bg_usage("missing value for", argv[optind - 1]);
        default: return bg_usage("unknown option", argv[optind - 1]);
        }
    }
    if (optind < argc) return bg_usage("unexpected argument", argv[optind]);
    o->codec_list = strdup(list);
    if (!o->codec_list) return bg_usage("out of memory", NULL);
    for (char *save = NULL, *t = strtok_r(o->codec_list, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
        if (o->n_codecs == BG_MAX_CODECS) return bg_usage("too many codecs (at most 16)", list);
        o->codecs[o->n_codecs++] = t;
    }
    if (!o->n_codecs) return bg_usage("--codec is empty", list);
    return 0;
}

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

/* Sorts v[0..n) and sets the row's median, min and max. */
static void bg_stats(double *v, int n, bg_row *r) {
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    r->min_ms = v[0];
    r->max_ms = v[n - 1];
    r->med_ms = n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/* ---- 2. the copy ceilings ------------------------------------------------ */

/* rows[0..3) = H2D, D2H, D2D. */
static int bg_copies(const bg_opts *o, bg_row *rows, kp_err *err) {
#if KP_HAVE_CUDA
    static const char *const names[3] = {"copy H2D", "copy D2H", "copy D2D"};
    static const int kinds[3] = {KP_CUDA_COPY_H2D, KP_CUDA_COPY_D2H, KP_CUDA_COPY_D2D};
    double *ms = malloc(sizeof *ms * (size_t)o->repeats);
    if (!ms) return kp_errf(err, KP_ENOMEM, "bench gpu: out of memory");
    for (int k = 0; k < 3; k++) {
        int rc = kp_cuda_copy_times(o->gpu, kinds[k], (size_t)o->copy_bytes, o->repeats, ms, err);
        if (rc) {
            free(ms);
            return rc;
        }
        bg_row *r = &rows[k];
        *r = (bg_row){.bytes_in = (size_t)o->copy_bytes, .bytes_out = (size_t)o->copy_bytes, .vs_d2d = -1,
                      .check = "-"};
        snprintf(r->test, sizeof r->test, "%s", names[k]);
        snprintf(r->codec, sizeof r->codec, "-");
        bg_stats(ms, o->repeats, r);
        r->gbps = (double)o->copy_bytes / (r->med_ms * 1e6);
        r->traffic_gbps = 2.0 * r->gbps;
    }
    free(ms);
    return 0;
#else
    (void)o;
    (void)rows;
    return kp_errf(err, KP_EUNSUP, "bench gpu: no CUDA device: this kvpark was built without CUDA "
                                   "(rebuild with -Dcuda=enabled on a machine with the CUDA toolkit)");
#endif
}

/* ---- 3. one codec's decode ------------------------------------------------- */

/* Deterministic values ~ U(-2, 2) of the cache's type: [n][n_kv_heads][head_dim]. */
static void bg_fill_rows(void *rows, int kv_type, size_t n_values, uint64_t *state) {
    for (size_t i = 0; i < n_values; i++) {
        uint64_t x = *state;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *state = x;
        float f = (float)((double)(x >> 40) / (double)(1ull << 24) * 4.0 - 2.0);
        if (kv_type == KP_TYPE_F32) ((float *)rows)[i] = f;
        else if (kv_type == KP_TYPE_F16) ((uint16_t *)rows)[i] = kp_f32_to_fp16(f);
        else ((uint16_t *)rows)[i] = kp_f32_to_bf16(f);
    }
}

static float bg_value(const void *rows, int kv_type, size_t i) {
    if (kv_type == KP_TYPE_F32) return ((const float *)rows)[i];
    if (kv_type == KP_TYPE_F16) return kp_fp16_to_f32(((const uint16_t *)rows)[i]);
    return kp_bf16_to_f32(((const uint16_t *)rows)[i]);
}

/* Everything one codec's run allocates (freed by bg_codec_free). */
typedef struct bg_run {
    kp_backend *be;
    const kp_ops *ops;
    codec_gpu_ctx *g;
    uint8_t *host;          /* every chunk as codec_encode wrote it, back to back */
    size_t *at;             /* [n_chunks + 1] offsets into host */
    codec_chunk *desc;      /* [n_chunks] */
    codec_gpu_chunk *gc;    /* [n_chunks] */
    uint8_t *d_pay, *d_rows;
    void *h_rows, *h_ref;   /* one chunk's rows: the GPU's, the CPU's */
} bg_run;

static void bg_codec_free(bg_run *r) {
    if (r->be) {
        if (r->d_pay) r->ops->free(r->be, r->d_pay);
        if (r->d_rows) r->ops->free(r->be, r->d_rows);
        kp_backend_free(r->be);
    }
    codec_gpu_free(r->g);
    free(r->host);
    free(r->at);
    free(r->desc);
    free(r->gc);
    free(r->h_rows);
    free(r->h_ref);
}

/* Compare the device rows of every chunk with codec_decode's on the CPU. */
static int bg_check(const bg_opts *o, const codec *c, const codec_shape *sh, bg_run *r, int n_chunks,
                    size_t row_bytes, bool exact, kp_err *err) {
    size_t vals_per_row = (size_t)sh->n_kv_heads * (size_t)sh->head_dim;
    for (int k = 0; k < n_chunks; k++) {
        size_t bytes = (size_t)r->desc[k].n * row_bytes;
        int rc = r->ops->download(r->be, r->h_rows, r->gc[k].rows, bytes);
        if (rc) return kp_errf(err, KP_EIO, "bench gpu: download of decoded rows failed");
        if ((rc = codec_decode(c, &r->desc[k], r->host + r->at[k], r->at[k + 1] - r->at[k], r->h_ref, err)))
            return rc;
        if (exact) {
            if (memcmp(r->h_rows, r->h_ref, bytes))
                return kp_errf(err, KP_EFORMAT, "bench gpu: codec %s: GPU decode of chunk %d (layer %d %c, rows %d..%d) "
                               "differs from the CPU decoder", codec_name(c), k, r->desc[k].layer,
                               r->desc[k].is_v ? 'V' : 'K', r->desc[k].pos0, r->desc[k].pos0 + r->desc[k].n - 1);
            continue;
        }
        size_t nv = (size_t)r->desc[k].n * vals_per_row;
        double max_ref = 0, max_diff = 0;
        for (size_t i = 0; i < nv; i++) {
            double a = bg_value(r->h_rows, o->kv_type, i), b = bg_value(r->h_ref, o->kv_type, i);
            if (!isfinite(a)) max_diff = INFINITY;
            max_ref = fmax(max_ref, fabs(b));
            max_diff = fmax(max_diff, fabs(a - b));
        }
        if (max_diff > 1e-4 * fmax(max_ref, 1e-6))
            return kp_errf(err, KP_EFORMAT, "bench gpu: codec %s: GPU decode of chunk %d differs from the CPU "
                           "decoder by %.3g (max |value| %.3g)", codec_name(c), k, max_diff, max_ref);
    }
    return 0;
}

static int bg_codec(const bg_opts *o, const char *name, const codec_shape *sh, double d2d_traffic, bg_row *row,
                    kp_err *err) {
    bg_run r = {0};
    codec *c = NULL;
    double *ms = NULL;
    int rc = codec_open(&c, name, sh, err);
    if (rc) return rc;
    const int chunk = LAYOUT_DEFAULT_CHUNK;
    const int per_seq = (o->tokens + chunk - 1) / chunk;
    const int n_chunks = sh->n_layer * 2 * per_seq;
    const size_t row_bytes = (size_t)sh->n_kv_heads * (size_t)sh->head_dim * kp_type_block_bytes(o->kv_type);
    r.at = calloc((size_t)n_chunks + 1, sizeof *r.at);
    r.desc = calloc((size_t)n_chunks, sizeof *r.desc);
    r.gc = calloc((size_t)n_chunks, sizeof *r.gc);
    r.h_rows = malloc((size_t)chunk * row_bytes);
    r.h_ref = malloc((size_t)chunk * row_bytes);
    ms = malloc(sizeof *ms * (size_t)o->repeats);
    size_t cap = 0;
    for (int l = 0; l < sh->n_layer; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int p = 0; p < o->tokens; p += chunk) {
                int n = KP_MIN(chunk, o->tokens - p);
                cap += codec_chunk_bytes_at(c, n, o->kv_type, kv, l);
            }
    r.host = malloc(cap ? cap : 1);
    if (!r.at || !r.desc || !r.gc || !r.h_rows || !r.h_ref || !ms || !r.host) {
        rc = kp_errf(err, KP_ENOMEM, "bench gpu: out of memory (%zu MB of encoded chunks)", cap >> 20);
        goto out;
    }
    /* encode every chunk on the CPU: [layer][K, V][chunk] */
    uint64_t seed = 0x9e3779b97f4a7c15ull;
    size_t off = 0, payload = 0, rows_total = 0;
    int k = 0;
    for (int l = 0; l < sh->n_layer; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int p = 0; p < o->tokens; p += chunk, k++) {
                int n = KP_MIN(chunk, o->tokens - p);
                r.desc[k] = (codec_chunk){.layer = l, .is_v = kv, .pos0 = p, .n = n, .kv_type = o->kv_type};
                bg_fill_rows(r.h_rows, o->kv_type, (size_t)n * row_bytes / kp_type_block_bytes(o->kv_type), &seed);
                size_t len = 0;
                if ((rc = codec_encode(c, &r.desc[k], r.h_rows, r.host + off, cap - off, &len, err))) goto out;
                r.at[k] = off;
                off += len;
                payload += len - CODEC_CHUNK_HEADER_BYTES;
                rows_total += (size_t)n * row_bytes;
            }
    r.at[n_chunks] = off;
    /* the device side: payloads packed back to back, rows in cache order */
    if ((rc = kp_backend_new(&r.be, "cuda", o->gpu, err))) goto out;
    r.ops = kp_backend_ops(r.be);
    if ((rc = codec_gpu_new(&r.g, c, o->gpu, err))) goto out;
    r.d_pay = r.ops->alloc(r.be, payload ? payload : 1);
    r.d_rows = r.ops->alloc(r.be, rows_total);
    if (!r.d_pay || !r.d_rows) {
        rc = kp_errf(err, KP_ENOMEM, "bench gpu: cannot allocate %zu MB on the GPU", (payload + rows_total) >> 20);
        goto out;
    }
    size_t pay_off = 0, rows_off = 0;
    for (k = 0; k < n_chunks; k++) {
        size_t plen = r.at[k + 1] - r.at[k] - CODEC_CHUNK_HEADER_BYTES;
        if ((rc = codec_gpu_check_chunk(c, &r.desc[k], r.host + r.at[k], r.at[k + 1] - r.at[k], err))) goto out;
        if (plen && r.ops->upload(r.be, r.d_pay + pay_off, r.host + r.at[k] + CODEC_CHUNK_HEADER_BYTES, plen)) {
            rc = kp_errf(err, KP_EIO, "bench gpu: upload of the payloads failed");
            goto out;
        }
        r.gc[k] = (codec_gpu_chunk){.desc = r.desc[k], .payload = r.d_pay + pay_off, .rows = r.d_rows + rows_off};
        pay_off += plen;
        rows_off += (size_t)r.desc[k].n * row_bytes;
    }
    r.ops->sync(r.be);
    /* warm-up, check, then the timed launches */
    if ((rc = codec_gpu_decode_batch(r.g, n_chunks, r.gc, NULL, err)) || (rc = codec_gpu_sync(r.g, NULL, err)))
        goto out;
    bool exact = strcmp(codec_name(c), "pca") && strcmp(codec_name(c), "learned");
    if ((rc = bg_check(o, c, sh, &r, n_chunks, row_bytes, exact, err))) goto out;
    for (int i = 0; i < o->repeats; i++) {
        double t0 = kp_now();
        if ((rc = codec_gpu_decode_batch(r.g, n_chunks, r.gc, NULL, err)) || (rc = codec_gpu_sync(r.g, NULL, err)))
            goto out;
        ms[i] = (kp_now() - t0) * 1e3;
    }
    *row = (bg_row){.bytes_in = payload, .bytes_out = rows_total, .check = "ok"};
    snprintf(row->test, sizeof row->test, "decode");
    snprintf(row->codec, sizeof row->codec, "%s", name);
    bg_stats(ms, o->repeats, row);
    row->gbps = (double)rows_total / (row->med_ms * 1e6);
    row->traffic_gbps = (double)(payload + rows_total) / (row->med_ms * 1e6);
    row->vs_d2d = d2d_traffic > 0 ? row->traffic_gbps / d2d_traffic : -1;
out:
    bg_codec_free(&r);
    codec_free(c);
    free(ms);
    return rc;
}

/* ---- 4. output and main --------------------------------------------------- */

static void bg_print(const char *dev, const bg_row *rows, int n) {
    printf("\n%s\n\n", dev);
    printf("| test | codec | MB in | MB out | median ms | GB/s | traffic GB/s | vs D2D | check |\n");
    printf("|---|---|---:|---:|---:|---:|---:|---:|---|\n");
    for (int i = 0; i < n; i++) {
        const bg_row *r = &rows[i];
        char vs[32] = "-";
        if (r->vs_d2d >= 0) snprintf(vs, sizeof vs, "%.0f %%", 100 * r->vs_d2d);
        printf("| %s | %s | %.1f | %.1f | %.3f | %.1f | %.1f | %s | %s |\n", r->test, r->codec,
               (double)r->bytes_in / 1e6, (double)r->bytes_out / 1e6, r->med_ms, r->gbps, r->traffic_gbps, vs,
               r->check);
    }
}

static int bg_csv(const bg_opts *o, const char *dev, const bg_row *rows, int n, kp_err *err) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", o->csv);
    char *slash = strrchr(dir, '/');
    if (slash) {
        *slash = 0;
        if (*dir && mkdir(dir, 0755) && errno != EEXIST)
            return kp_errf(err, KP_EIO, "bench gpu: cannot create '%s': %s", dir, strerror(errno));
    }
    FILE *f = fopen(o->csv, "w");
    if (!f) return kp_errf(err, KP_EIO, "bench gpu: cannot write '%s': %s", o->csv, strerror(errno));
    fprintf(f, "device,test,codec,kv_type,tokens,bytes_in,bytes_out,repeats,median_ms,min_ms,max_ms,gbps,"
               "traffic_gbps,vs_d2d,check\n");
    for (int i = 0; i < n; i++) {
        const bg_row *r = &rows[i];
        fprintf(f, "\"%s\",%s,%s,%s,%d,%zu,%zu,%d,%.4f,%.4f,%.4f,%.2f,%.2f,", dev, r->test, r->codec,
                kp_type_name(o->kv_type), r->vs_d2d >= 0 ? o->tokens : 0, r->bytes_in, r->bytes_out, o->repeats,
                r->med_ms, r->min_ms, r->max_ms, r->gbps, r->traffic_gbps);
        if (r->vs_d2d >= 0) fprintf(f, "%.4f", r->vs_d2d);
        fprintf(f, ",%s\n", r->check);
    }
    if (fclose(f)) return kp_errf(err, KP_EIO, "bench gpu: cannot write '%s': %s", o->csv, strerror(errno));
    fprintf(stderr, "kvpark: wrote %s\n", o->csv);
    return 0;
}

typedef struct bg_plot_ud {
    const bg_opts *o;
    const char *dat;
} bg_plot_ud;

static void bg_plot_script(FILE *f, const char *term, void *ud) {
    const bg_plot_ud *p = ud;
    fprintf(f, "set terminal %s size 900,500\nset output '%s'\n", term, p->o->plot);
    fprintf(f, "set title 'kvpark bench gpu: memory traffic (read + write), GB/s'\n");
    fprintf(f, "set style data histogram\nset style fill solid 0.8\nset boxwidth 0.8\n");
    fprintf(f, "set ylabel 'GB/s'\nset xtics rotate by -30\nset grid ytics\nunset key\n");
    fprintf(f, "plot '%s' using 2:xtic(1) lc rgb '#3060a0'\n", p->dat);
}

static void bg_plot(const bg_opts *o, const bg_row *rows, int n) {
    if (!plot_available()) {
        fprintf(stderr, "kvpark: bench gpu: %s not found, skipping --plot\n", PLOT_GNUPLOT);
        return;
    }
    char dat[1100], gp[1100];
    plot_sibling(o->plot, ".png", ".dat", dat, sizeof dat);
    plot_sibling(o->plot, ".png", ".gp", gp, sizeof gp);
    FILE *f = fopen(dat, "w");
    if (!f || !plot_quotable(dat)) {
        if (f) fclose(f);
        fprintf(stderr, "kvpark: bench gpu: cannot write '%s', skipping --plot\n", dat);
        return;
    }
    for (int i = 0; i < n; i++)
        fprintf(f, "\"%s%s%s\" %.2f\n", rows[i].test, rows[i].vs_d2d >= 0 ? " " : "",
                rows[i].vs_d2d >= 0 ? rows[i].codec : "", rows[i].traffic_gbps);
    fclose(f);
    bg_plot_ud ud = {.o = o, .dat = dat};
    kp_err err = {0};
    if (plot_draw(gp, bg_plot_script, &ud, &err) == 0) fprintf(stderr, "kvpark: wrote %s\n", o->plot);
    else fprintf(stderr, "kvpark: bench gpu: %s\n", err.msg);
}

int bench_gpu_main(int argc, char **argv) {
    bg_opts o;
    int prc = bg_parse(argc, argv, &o);
    if (prc) {
        free(o.codec_list);
        return prc == 1 ? 0 : 2;
    }
    kp_err err = {0};
    model *m = NULL;
    bg_row rows[3 + BG_MAX_CODECS];
    int n_rows = 0, rc;
    const char *why = NULL;
    char dev[256] = "";
    if (!codec_gpu_available(&why)) {
        rc = kp_errf(&err, KP_EUNSUP, "bench gpu: no CUDA device: %s", why ? why : "unknown reason");
        goto out;
    }
#if KP_HAVE_CUDA
    {
        char name[128] = "?";
        int ma = 0, mi = 0;
        size_t mem = 0;
        if ((rc = kp_cuda_device_info(o.gpu, name, sizeof name, &ma, &mi, &mem, &err))) goto out;
        snprintf(dev, sizeof dev, "%s (sm_%d%d, %.0f GiB)", name, ma, mi, (double)mem / (1u << 30));
    }
#endif
    char path[1024];
    model_opts mo = model_default_opts();
    mo.backend = "cpu"; /* only the KV shape is used */
    if ((rc = model_resolve(o.model, path, sizeof path, &err))) goto out;
    if ((rc = model_load(&m, path, &mo, &err))) goto out;
    codec_shape shape = quality_codec_shape(m);
    fprintf(stderr, "kvpark: bench gpu: %s; KV %d layers x %d heads x %d, %d tokens, %s rows\n", dev,
            shape.n_layer, shape.n_kv_heads, shape.head_dim, o.tokens, kp_type_name(o.kv_type));
    if ((rc = bg_copies(&o, rows, &err))) goto out;
    n_rows = 3;
    for (int c = 0; c < o.n_codecs; c++) {
        if ((rc = bg_codec(&o, o.codecs[c], &shape, rows[2].traffic_gbps, &rows[n_rows], &err))) goto out;
        n_rows++;
    }
    bg_print(dev, rows, n_rows);
    if ((rc = bg_csv(&o, dev, rows, n_rows, &err))) goto out;
    if (o.plot) bg_plot(&o, rows, n_rows);
out:
    if (rc && n_rows) bg_print(dev, rows, n_rows); /* what was measured before the failure */
    model_free(m);
    free(o.codec_list);
    if (rc) {
        fprintf(stderr, "kvpark: %s\n", err.msg[0] ? err.msg : kp_strerror(rc));
        return 1;
    }
    return 0;
}
