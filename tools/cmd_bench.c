/*
 * cmd_bench.c — `kvpark bench NAME ...`: the benchmarks of bench/, one entry
 * point each, chosen by name.
 *
 * Each benchmark parses its own options (NAME --help); this file only picks
 * it and says which exist. Exit status: the benchmark's, or 2 when NAME is
 * missing or unknown.
 */
#include <stdio.h>
#include <string.h>

#include "bench/bench_codec.h"
#include "bench/bench_engine.h"
#include "bench/bench_gpu.h"
#include "bench/bench_grammar.h"
#include "bench/bench_resume.h"
#include "bench/bench_serve.h"
#include "kernels/kp.h"
#include "tools/cli.h"

/* One row per benchmark: its name after `kvpark bench` and its entry point,
 * called with argv[0] = the name. A new benchmark adds a row here and a line
 * to bench_usage. */
static const struct {
    const char *name;
    int (*main)(int argc, char **argv);
} benches[] = {
    {"engine", bench_engine_main},
    {"serve", bench_serve_main},
    {"codec", bench_codec_main},
    {"resume", bench_resume_main},
    {"gpu", bench_gpu_main},
    {"grammar", bench_grammar_main},
};

static const char bench_usage[] =
    "usage: kvpark bench engine [-m MODEL] [-p 128,512] [-n 128,512] [-r 5]\n"
    "       [--threads-list 1,2] [--kv-type f16] [--csv FILE]\n"
    "       kvpark bench serve [-m MODEL] [--clients 1,8,32] ... (--help)\n"
    "       kvpark bench codec [-m MODEL] -f EVALTEXT [--calib TEXT] ... (--help)\n"
    "       kvpark bench resume [-m MODEL] [--codec none,int8,FILE] ... (--help)\n"
    "       kvpark bench gpu [-m MODEL] [--codec int8,...] [--tokens 4096] ... (--help)\n"
    "       kvpark bench grammar [-m MODEL,...] [-n 300] [--csv FILE] ... (--help)\n";

int cmd_bench(int argc, char **argv) {
    if (argc >= 2)
        for (size_t i = 0; i < KP_ARRAY_LEN(benches); i++)
            if (!strcmp(argv[1], benches[i].name)) return benches[i].main(argc - 1, argv + 1);
    fputs(bench_usage, stderr);
    return 2;
}
