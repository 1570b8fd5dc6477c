/*
 * cli.h — what the `kvpark` subcommands and the bench front ends share: the
 * error and usage messages, the strict number and size parsers, the options
 * of every command that loads a model, the options of the commands built on
 * the codec quality evaluation, and the subcommand entry points
 * (tools/cmd_*.c; bench entries are in bench/).
 *
 * Why one place: every option of every command is parsed the same strict
 * way (the whole string must be a number in range, or it is a usage error),
 * and the messages users and scripts see read the same everywhere.
 *
 * Contract
 *   - Messages go to stderr: cli_die() prints "kvpark: <message>" and returns
 *     1 (runtime error); cli_usage_error() prints "kvpark CMD: MSG (see
 *     'kvpark CMD --help')" and returns 2 (bad usage). Commands return these
 *     as their exit status.
 *   - The parsers return 0 and write *out, or -1 and leave *out alone. They
 *     accept what strtol/strtod accept (leading blanks, a sign) as the WHOLE
 *     string, nothing after it, within [lo, hi]; errno is left as it was.
 *   - Nothing here keeps state between calls; getopt's globals are the
 *     callers' (each entry point resets optind itself).
 */
#ifndef KP_TOOLS_CLI_H
#define KP_TOOLS_CLI_H

#include <getopt.h>
#include <stdbool.h>
#include <stdint.h>

#include "compress/quality.h"
#include "engine/model.h"
#include "kernels/kp.h"

/* "kvpark: <e->msg or kp_strerror(rc)>" on stderr; returns 1. */
int cli_die(const kp_err *e, int rc);
/* "kvpark CMD: MSG (see 'kvpark CMD --help')" on stderr; returns 2. */
int cli_usage_error(const char *cmd, const char *msg);

/* A base-10 integer in [lo, hi]. */
int cli_parse_long(const char *s, long lo, long hi, long *out);
/* cli_parse_long into an int. */
int cli_parse_int(const char *s, int lo, int hi, int *out);
/* A base-10 unsigned 64-bit integer (as strtoull: a leading '-' negates it
 * modulo 2^64, so "--seed -1" stays a valid seed). */
int cli_parse_u64(const char *s, uint64_t *out);
/* A finite floating-point number in [lo, hi]. */
int cli_parse_float(const char *s, double lo, double hi, double *out);
/* A byte size: a non-negative number (fractions allowed) with an optional K,
 * M, G or T suffix (powers of 1024), "KiB"/"KB" spellings and a trailing "B"
 * accepted; at most 1.8e19 bytes. "512M" = 536870912. */
int cli_parse_size(const char *s, uint64_t *out);

/* Options shared by the subcommands that load a model. */
typedef struct cli_model_opts {
    const char *model;
    const char *device; /* cpu | cuda | auto (NULL = auto) */
    int threads;
    int n_ctx;
    int kv_type;
    int n_batch;
} cli_model_opts;

/* getopt codes of the long options without a short letter, one table for
 * every command (values above any character). */
enum {
    CLI_OPT_TEMP = 1000, CLI_OPT_TOP_K, CLI_OPT_TOP_P, CLI_OPT_MIN_P, CLI_OPT_SEED, CLI_OPT_IDS,
    CLI_OPT_KV_TYPE, CLI_OPT_NO_BOS, CLI_OPT_REPEAT_PENALTY, CLI_OPT_FREQ_PENALTY,
    CLI_OPT_PRES_PENALTY, CLI_OPT_IGNORE_EOS, CLI_OPT_CHUNKS, CLI_OPT_CSV, CLI_OPT_NO_PARSE_SPECIAL,
    CLI_OPT_REPEATS, CLI_OPT_THREADS_LIST, CLI_OPT_CHAT, CLI_OPT_CHAT_TEMPLATE, CLI_OPT_TYPE,
    CLI_OPT_HOST, CLI_OPT_PORT, CLI_OPT_PARALLEL, CLI_OPT_QUEUE, CLI_OPT_API_KEY,
    CLI_OPT_API_KEY_FILE, CLI_OPT_METRICS_KEY, CLI_OPT_MAX_BODY, CLI_OPT_MAX_TOKENS,
    CLI_OPT_SESSION_DIR, CLI_OPT_TIMEOUT, CLI_OPT_QUIET, CLI_OPT_DEVICE, CLI_OPT_MAX_SESSIONS,
    CLI_OPT_CODEC, CLI_OPT_HOT_SESSIONS, CLI_OPT_HOT_BUDGET, CLI_OPT_WARM_BUDGET,
    CLI_OPT_COLD_BUDGET, CLI_OPT_IDLE_PARK,
};

/* Handle an option of cli_model_opts (-m, -t 0..1024, -c 4..2^24, -b 1..2^20,
 * --kv-type, --device cpu|cuda|auto): 1 if consumed, -1 on a bad value, 0 if
 * c is not one of them. */
int cli_model_opt(int c, const char *arg, cli_model_opts *co);

/* Resolve co->model (model_resolve) and load it with co's threads, device
 * (NULL: auto) and batch (0: the default). */
int cli_load_model(const cli_model_opts *co, model **m, kp_err *err);

/* Read a text file and tokenise it with BOS, as llama-perplexity does. */
int cli_tokenize_file(model *m, const char *file, int32_t **ids, size_t *n, kp_err *err);

/* ---- the commands built on compress/quality.h (`ppl --codec`, `bench codec`) ---- */

enum {
    CLI_QOPT_KV_TYPE = 2000, CLI_QOPT_CHUNKS, CLI_QOPT_CODEC, CLI_QOPT_PARK_EVERY, CLI_QOPT_SINK,
    CLI_QOPT_WINDOW, CLI_QOPT_CHUNK, CLI_QOPT_CALIB, CLI_QOPT_CSV, CLI_QOPT_PLOT, CLI_QOPT_BITS,
    CLI_QOPT_MAX_DPPL,
};

typedef struct cli_quality {
    const char *model, *file;
    int threads;
    quality_opts qo;
    bool set_sink, set_window, set_chunk; /* given on the command line */
} cli_quality;

/* -m, -f, -t, -c, -b (accepted, unused), --chunks, --park-every, --sink,
 * --window, --chunk, --kv-type: 1 if consumed, -1 on a bad value, 0 if not
 * one of them. */
int cli_quality_opt(int c, const char *arg, cli_quality *q);

/* Their long options (the short string is "m:f:c:b:t:h"). */
#define CLI_QUALITY_LONGOPTS                                                                      \
    {"model", required_argument, 0, 'm'}, {"file", required_argument, 0, 'f'},                    \
        {"ctx", required_argument, 0, 'c'}, {"batch", required_argument, 0, 'b'},                 \
        {"threads", required_argument, 0, 't'}, {"kv-type", required_argument, 0, CLI_QOPT_KV_TYPE}, \
        {"chunks", required_argument, 0, CLI_QOPT_CHUNKS},                                        \
        {"park-every", required_argument, 0, CLI_QOPT_PARK_EVERY},                                \
        {"sink", required_argument, 0, CLI_QOPT_SINK}, {"window", required_argument, 0, CLI_QOPT_WINDOW}, \
        {"chunk", required_argument, 0, CLI_QOPT_CHUNK}, {"help", no_argument, 0, 'h'}

/* The parking layout a codec file carries (codec_layout) for every one of
 * --sink, --window, --chunk not given on the command line: a codec is
 * measured the way it was calibrated and the server parks with it. Returns
 * 1 when anything was taken from the file, else 0. */
int cli_quality_codec_layout(cli_quality *q, const codec *c);

/* Load q->model on the CPU with q->threads. */
int cli_quality_load_model(const cli_quality *q, model **m, kp_err *err);

/* ---- the subcommands (tools/cmd_*.c); argv[0] is the subcommand's name ---- */

int cmd_run(int argc, char **argv);
int cmd_tokenize(int argc, char **argv);
int cmd_ppl(int argc, char **argv);
int cmd_calibrate(int argc, char **argv);
int cmd_serve(int argc, char **argv);
int cmd_bench(int argc, char **argv);

#endif
