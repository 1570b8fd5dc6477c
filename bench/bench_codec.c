/*
 * bench_codec.c — `kvpark bench codec`: every KV codec through the "park
 * every N tokens" evaluation of compress/quality.h, side by side (contract
 * in bench_codec.h).
 *
 * The baselines (none, fp16, int8, int4, kivi2) are opened by name; the
 * learned and pca codecs are calibrated (compress/calib.h) on the
 * calibration text at every --bits target into temporary codec files, and
 * with --max-dppl one more learned codec is sized by calibrate's search. A
 * calibration that fails is reported and skipped, so the baselines always
 * make a table. Each row is quality_eval on the evaluation text, never the
 * calibration text.
 */
#include "bench/bench_codec.h"

#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "bench/plot.h"
#include "compress/calib.h"
#include "compress/codec.h"
#include "compress/quality.h"
#include "engine/model.h"
#include "tools/cli.h"

typedef struct bc_row {
    char name[48];
    double target_bits;   /* learned/pca: the calibration target; 0 otherwise */
    double coded_bits;    /* bits per value of one coded chunk (nominal, before LZ4) */
    quality_result r;
} bc_row;

static void bc_print_table(const bc_row *rows, int n) {
    printf("| codec | bits/value | coded bits | ratio vs fp16 | Δppl %% | top-1 agree | KL | "
           "encode GB/s | decode GB/s |\n");
    printf("|---|---:|---:|---:|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        printf("| %s | %.3f | %.3f | %.3f | %+.3f | %.4f | %.3g | %.3f | %.3f |\n", rows[i].name,
               r->ratio > 0 ? 16.0 / r->ratio : 0, rows[i].coded_bits, r->ratio,
               100.0 * (r->ppl - r->ppl_ref) / r->ppl_ref, r->agree, r->kl, r->encode_gbps,
               r->decode_gbps);
    }
}

/* Where the bits go: bits per parked value by kind (they add up to the
 * bits/value column). */
static void bc_print_breakdown(const bc_row *rows, int n) {
    printf("\nWhere the stored bits go (bits per parked value; lossless + coded + headers = "
           "bits/value):\n\n");
    printf("| codec | lossless sink+window rows | coded chunks | chunk headers | bits/value | "
           "LZ4 saved |\n");
    printf("|---|---:|---:|---:|---:|---:|\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        printf("| %s | %.3f | %.3f | %.3f | %.3f | %.3f |\n", rows[i].name, r->bits_lossless,
               r->bits_coded, r->bits_headers, r->ratio > 0 ? 16.0 / r->ratio : 0, r->bits_lz4_saved);
    }
}

static int bc_write_csv(const char *path, const bc_row *rows, int n, kp_err *err) {
    FILE *f = fopen(path, "w");
    if (!f) return kp_errf(err, KP_EIO, "cannot write '%s': %s", path, strerror(errno));
    fprintf(f, "codec,target_bits,bits_per_value,coded_bits,ratio,ppl_ref,ppl,dppl_pct,agree,kl,"
               "encode_gbps,decode_gbps,windows,scored,bits_lossless,bits_coded,bits_headers,bits_lz4_saved\n");
    for (int i = 0; i < n; i++) {
        const quality_result *r = &rows[i].r;
        fprintf(f, "%s,%g,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6f,%.6g,%.6f,%.6f,%d,%lld,%.6f,%.6f,%.6f,%.6f\n",
                rows[i].name, rows[i].target_bits, r->ratio > 0 ? 16.0 / r->ratio : 0, rows[i].coded_bits,
                r->ratio, r->ppl_ref, r->ppl, 100.0 * (r->ppl - r->ppl_ref) / r->ppl_ref, r->agree,
                r->kl, r->encode_gbps, r->decode_gbps, r->n_windows, (long long)r->n_scored,
                r->bits_lossless, r->bits_coded, r->bits_headers, r->bits_lz4_saved);
    }
    if (fclose(f)) return kp_errf(err, KP_EIO, "cannot write '%s'", path);
    return 0;
}

typedef struct bc_plot_ud {
    const char *png, *dat;
} bc_plot_ud;

static void bc_plot_script(FILE *f, const char *term, void *ud) {
    const bc_plot_ud *p = ud;
    fprintf(f,
            "set terminal %s noenhanced size 900,600\n"
            "set output '%s'\n"
            "set title 'KV codecs: distance to the uncompressed model vs size'\n"
            "set xlabel 'compression ratio vs fp16 (all stored bytes, after LZ4)'\n"
            "set ylabel 'KL(uncompressed || parked), nats per token'\n"
            "set logscale xy\n"
            "set grid xtics ytics mxtics mytics\n"
            "plot '%s' using 1:2 with points pt 7 ps 1.3 notitle, \\\n"
            "     '%s' using 1:2:3 with labels offset char 0,1 notitle\n",
            term, p->png, p->dat, p->dat);
}

/* KL against ratio on log scales, one labelled point per codec, via gnuplot
 * (KL, not Δppl: perplexity can fall under lossy coding, KL cannot); a
 * lossless codec's KL of 0 is drawn at 1e-7, the plot's floor. The data and
 * the script are temporary files. */
static int bc_plot(const char *png, const bc_row *rows, int n, kp_err *err) {
    if (!plot_available()) {
        fprintf(stderr, "kvpark: note: %s not found, no plot written (apt-get install gnuplot)\n",
                PLOT_GNUPLOT);
        return 0;
    }
    char dat[] = "/tmp/kvpark-codec-XXXXXX", gp[] = "/tmp/kvpark-codec-gp-XXXXXX";
    int fd = mkstemp(dat);
    if (fd < 0) return kp_errf(err, KP_EIO, "plot: cannot create a temporary file");
    FILE *f = fdopen(fd, "w");
    if (!f) {
        close(fd);
        unlink(dat);
        return kp_errf(err, KP_EIO, "plot: cannot write a temporary file");
    }
    for (int i = 0; i < n; i++)
        fprintf(f, "%.6f %.6g \"%s\"\n", rows[i].r.ratio, rows[i].r.kl > 1e-7 ? rows[i].r.kl : 1e-7,
                rows[i].name);
    fclose(f);
    int rc = 0, gfd = mkstemp(gp);
    if (gfd < 0) {
        rc = kp_errf(err, KP_EIO, "plot: cannot create a temporary file");
    } else {
        close(gfd);
        bc_plot_ud ud = {.png = png, .dat = dat};
        kp_err e2 = {0};
        if (plot_draw(gp, bc_plot_script, &ud, &e2))
            rc = kp_errf(err, KP_EIO, "plot: gnuplot failed writing '%s'", png);
        unlink(gp);
    }
    unlink(dat);
    return rc;
}

/* Evaluate one codec and append a row. */
static int bc_one(model *m, const char *name_or_path, const char *label, double target,
                  const int32_t *ids, size_t n, const quality_opts *qo, bc_row *row, kp_err *err) {
    codec_shape shape = quality_codec_shape(m);
    codec *c = NULL;
    int rc = codec_open(&c, name_or_path, &shape, err);
    if (rc) return rc;
    memset(row, 0, sizeof *row);
    snprintf(row->name, sizeof row->name, "%s", label ? label : codec_name(c));
    row->target_bits = target;
    const model_hparams *hp = model_hp(m);
    double vals = (double)qo->chunk * hp->n_kv_heads * hp->head_dim;
    double coded = 0; /* exact bytes of a full chunk, averaged over layers and K/V */
    for (int l = 0; l < hp->n_layer; l++)
        coded += (double)(codec_chunk_bytes_at(c, qo->chunk, qo->kv_type, 0, l) +
                          codec_chunk_bytes_at(c, qo->chunk, qo->kv_type, 1, l));
    row->coded_bits = 8.0 * coded / (2.0 * hp->n_layer * vals);
    double t0 = kp_now();
    rc = quality_eval(m, c, ids, (int64_t)n, qo, &row->r, err);
    if (!rc)
        fprintf(stderr, "kvpark: %-12s ratio %.3f  ppl %.4f (ref %.4f)  agree %.4f  kl %.3g  [%.1f s]\n",
                row->name, row->r.ratio, row->r.ppl, row->r.ppl_ref, row->r.agree, row->r.kl,
                kp_now() - t0);
    codec_free(c);
    return rc;
}

/* Default calibration text: $KVPARK_SHARED/data/..., else ../shared/data/... */
static void bc_default_calib(char *buf, size_t cap) {
    const char *sh = getenv("KVPARK_SHARED");
    snprintf(buf, cap, "%s/data/tinystories-train-calib.txt", sh && *sh ? sh : "../shared");
}

/* Calibrate learned and pca codecs on `calib` text at every target of
 * bits_list ("1,1.5,2") and evaluate each; with max_dppl > 0 also a learned
 * codec sized by `calibrate --max-dppl` on the calibration text's held-out
 * slice (row "learned<=P%"). A calibration that fails is reported and
 * skipped (the baselines still make a table). */
static int bc_learned(model *m, const char *calib, const char *bits_list, double max_dppl,
                      const int32_t *ids, size_t n, const quality_opts *qo, bc_row *rows, int *nrows,
                      int max_rows, kp_err *err) {
    int32_t *cids = NULL;
    size_t cn = 0;
    kp_err e2 = {0};
    if (cli_tokenize_file(m, calib, &cids, &cn, &e2)) {
        fprintf(stderr, "kvpark: note: %s: learned/pca codecs skipped (pass --calib TEXT)\n",
                e2.msg);
        return 0;
    }
    int rc = 0;
    for (int kind = 0; kind < 3 && !rc; kind++) { /* learned, pca, learned by max_dppl */
        char list[256], *save = NULL;
        snprintf(list, sizeof list, "%s", kind < 2 ? bits_list : max_dppl > 0 ? "2" : "");
        for (char *tk = strtok_r(list, ",", &save); tk && !rc; tk = strtok_r(NULL, ",", &save)) {
            double bits = strtod(tk, NULL);
            if (!(bits > 0 && bits <= 16) || *nrows >= max_rows) continue;
            calib_opts co = calib_default_opts();
            co.kind = kind == 1 ? CODEC_PCA : CODEC_LEARNED;
            co.bits = bits;
            co.max_dppl = kind == 2 ? max_dppl : 0;
            co.n_ctx = qo->n_ctx;
            co.chunk = qo->chunk;
            co.sink = qo->sink;
            co.window = qo->window;
            co.park_every = qo->park_every;
            char label[48];
            if (kind == 2) snprintf(label, sizeof label, "learned<=%g%%", max_dppl);
            else snprintf(label, sizeof label, "%s@%g", kind == 0 ? "learned" : "pca", bits);
            char path[] = "/tmp/kvpark-codec-calib-XXXXXX";
            int fd = mkstemp(path);
            if (fd < 0) {
                rc = kp_errf(err, KP_EIO, "bench codec: cannot create a temporary codec file");
                break;
            }
            close(fd);
            fprintf(stderr, "kvpark: calibrating %s on %s ...\n", label, calib);
            calib_report rep;
            e2 = (kp_err){0};
            int crc = calib_run(m, cids, cn, &co, path, &rep, &e2);
            if (!crc && co.kind == CODEC_LEARNED)
                fprintf(stderr, "kvpark: %s: %.3f bits/value, held-out (calibration text) ratio %.3f, "
                        "Δppl %+.3f%%, KL %.3g [%.1f s]\n", label, rep.target_bits, rep.heldout_ratio,
                        rep.heldout_dppl, rep.heldout_kl, rep.seconds);
            if (!crc) crc = bc_one(m, path, label, rep.target_bits, ids, n, qo, &rows[*nrows], &e2);
            if (!crc) (*nrows)++;
            else fprintf(stderr, "kvpark: note: %s skipped: %s\n", label, e2.msg);
            unlink(path);
        }
    }
    free(cids);
    return rc;
}

/* The bench's own defaults (bench_codec.h): a realistic context, a short recent
 * window, no sink, and llama.cpp's default F16 cache.
 *
 * Why window 8 and sink 0: lossless rows cost 16 bits per value, so they
 * bound the ratio: parking every 64 tokens up to 512, S + W lossless rows
 * per park cap it at 2304 / (8 (S + W)), 8x for S 4 + W 32, whatever the
 * codec does. Measured on stories260K (learned, --bits 1.5, evaluation
 * text, 20 windows; ratio / Δppl): W 32 S 4 4.74x / +0.26%; W 16 S 0
 * 6.80x / +0.65%; W 8 S 0 8.15x / +0.62%; W 4 S 0 9.01x / +0.92%; W 0 S 0
 * 10.3x / +2.23%. At W 8 the sink changes nothing measurable (S 0 / 1 / 4:
 * KL 0.0085 / 0.0084 / 0.0086) and costs 3% / 10% of the ratio. Models with
 * strong attention sinks may want --sink 1..4: it is a codec parameter. */
#define BC_WINDOW 8
#define BC_SINK 0

int bench_codec_main(int argc, char **argv) {
    cli_quality q = {.qo = quality_default_opts()};
    q.qo.n_ctx = 0; /* 0: not given; min(512, the model's training context) */
    q.qo.window = BC_WINDOW;
    q.qo.sink = BC_SINK;
    q.qo.kv_type = KP_TYPE_F16;
    const char *calib = NULL, *csv = NULL, *plot = NULL;
    char bits_list[256] = "1,1.25,1.5,2,3,4,8";
    double max_dppl = 0;
    static const struct option lo[] = {CLI_QUALITY_LONGOPTS,
                                       {"calib", required_argument, 0, CLI_QOPT_CALIB},
                                       {"csv", required_argument, 0, CLI_QOPT_CSV},
                                       {"plot", required_argument, 0, CLI_QOPT_PLOT},
                                       {"bits", required_argument, 0, CLI_QOPT_BITS},
                                       {"max-dppl", required_argument, 0, CLI_QOPT_MAX_DPPL},
                                       {0, 0, 0, 0}};
    int ch;
    optind = 0;
    while ((ch = getopt_long(argc, argv, "m:f:c:b:t:h", lo, NULL)) != -1) {
        int r = cli_quality_opt(ch, optarg, &q);
        if (r < 0) return cli_usage_error("bench codec", "bad option value");
        if (r > 0) continue;
        if (ch == CLI_QOPT_CALIB) calib = optarg;
        else if (ch == CLI_QOPT_CSV) csv = optarg;
        else if (ch == CLI_QOPT_PLOT) plot = optarg;
        else if (ch == CLI_QOPT_BITS) snprintf(bits_list, sizeof bits_list, "%s", optarg);
        else if (ch == CLI_QOPT_MAX_DPPL) {
            if (cli_parse_float(optarg, 0, HUGE_VAL, &max_dppl) || !(max_dppl > 0))
                return cli_usage_error("bench codec", "--max-dppl needs a percentage > 0");
        }
        else if (ch == 'h') {
            puts("usage: kvpark bench codec [-m MODEL] -f EVALTEXT [--calib CALIBTEXT]\n"
                 "       [--bits 1,1.25,1.5,2,3,4,8] [--max-dppl P] [--csv FILE] [--plot FILE.png]\n"
                 "       [-c CTX] [--chunks N]\n"
                 "       [--park-every N] [--sink S] [--window W] [--chunk C] [--kv-type T] [-t N]\n"
                 "Every baseline codec (none, fp16, int8, int4, kivi2) and the learned/pca codecs\n"
                 "calibrated on CALIBTEXT at each --bits target, evaluated as 'kvpark ppl --codec'\n"
                 "does: a markdown table of bits/value, ratio vs fp16, Δppl %, top-1 agreement,\n"
                 "KL and encode/decode GB/s, then where the stored bits go; --csv writes it,\n"
                 "--plot draws Δppl vs ratio. --max-dppl P adds a learned codec sized by\n"
                 "'kvpark calibrate --max-dppl P' on the calibration text's held-out slice.\n"
                 "Defaults: -c min(512, training context), --park-every 64, --chunk 64, --sink 0,\n"
                 "--window 8, --kv-type f16. Ratio = fp16 bytes of the parked KV / every stored\n"
                 "byte (headers, scales, LZ4); sink and window rows are stored lossless at the\n"
                 "cache's type. GB/s: fp16-equivalent bytes per second of one thread.");
            return 0;
        } else return cli_usage_error("bench codec", "unknown option");
    }
    if (!q.file) return cli_usage_error("bench codec", "missing -f EVALTEXT");
    kp_err err = {0};
    model *m = NULL;
    int32_t *ids = NULL;
    size_t n = 0;
    bc_row rows[64];
    int nrows = 0;
    int rc = cli_quality_load_model(&q, &m, &err);
    if (rc) return cli_die(&err, rc);
    if (q.qo.n_ctx == 0) q.qo.n_ctx = quality_ctx_for(m);
    if ((rc = cli_tokenize_file(m, q.file, &ids, &n, &err))) goto out;
    fprintf(stderr, "kvpark: %s: %zu tokens; model %s; ctx %d, park every %d, chunk %d, sink %d, "
            "window %d\n", q.file, n, model_desc(m), q.qo.n_ctx, q.qo.park_every, q.qo.chunk,
            q.qo.sink, q.qo.window);

    static const char *const baselines[] = {"none", "fp16", "int8", "int4", "kivi2"};
    for (size_t i = 0; i < sizeof baselines / sizeof *baselines; i++)
        if ((rc = bc_one(m, baselines[i], NULL, 0, ids, n, &q.qo, &rows[nrows++], &err)))
            goto out;

    /* Learned and PCA codecs, calibrated at each bits target. */
    char calib_default[1024];
    if (!calib) {
        bc_default_calib(calib_default, sizeof calib_default);
        calib = calib_default;
    }
    if ((rc = bc_learned(m, calib, bits_list, max_dppl, ids, n, &q.qo, rows, &nrows, 64, &err)))
        goto out;

    const char *kvn = q.qo.kv_type == KP_TYPE_F32   ? "f32"
                      : q.qo.kv_type == KP_TYPE_F16 ? "f16"
                                                    : "bf16";
    printf("KV codecs on %s, %s cache: ctx %d, parked every %d tokens, chunk %d, sink %d and "
           "window %d lossless (at the cache's type); ratio = fp16 bytes / all stored bytes; "
           "GB/s = fp16-equivalent, one thread.\n\n",
           model_desc(m), kvn, q.qo.n_ctx, q.qo.park_every, q.qo.chunk, q.qo.sink, q.qo.window);
    bc_print_table(rows, nrows);
    bc_print_breakdown(rows, nrows);
    fflush(stdout);
    if (csv && (rc = bc_write_csv(csv, rows, nrows, &err))) goto out;
    if (plot && (rc = bc_plot(plot, rows, nrows, &err))) goto out;
out:
    free(ids);
    model_free(m);
    return rc ? cli_die(&err, rc) : 0;
}
