/*
 * kvpark.c — the `kvpark` command: one binary, thin subcommands over the modules.
 *
 *   kvpark run       -m MODEL -p TEXT [-n N] [--temp T] ...   generate text
 *   kvpark tokenize  -m MODEL [--no-bos] TEXT                  print token ids
 *   kvpark ppl       -m MODEL -f FILE [-c CTX] [-b BATCH]      perplexity
 *   kvpark calibrate -m MODEL -f TEXT -o CODEC ...             fit the learned KV codec
 *   kvpark bench engine|serve|codec|resume ...                 benchmarks (bench/)
 *   kvpark serve     [-m MODEL] [--port 8080] ...              the OpenAI-compatible server
 *
 * This file only picks the subcommand (tools/cmd_*.c, declared in
 * tools/cli.h), which parses its options, loads the model, calls the modules
 * and prints. Errors go to stderr as "kvpark: <message>" with exit status 1
 * (2 for bad usage).
 */
#include <stdio.h>
#include <string.h>

#include "kernels/kp.h"
#include "tools/cli.h"

/* Subcommands: the name users type and its entry point (argv[0] = the name). */
static const struct {
    const char *name;
    int (*main)(int argc, char **argv);
} commands[] = {
    {"run", cmd_run},           {"serve", cmd_serve}, {"tokenize", cmd_tokenize},
    {"ppl", cmd_ppl},           {"bench", cmd_bench}, {"calibrate", cmd_calibrate},
};

static const char *main_help =
    "kvpark " KVPARK_VERSION " — an LLM inference engine that parks idle conversations\n"
    "usage: kvpark COMMAND [options]   (kvpark COMMAND --help for details)\n"
    "  serve      the OpenAI-compatible HTTP server\n"
    "  run        generate text from a prompt\n"
    "  tokenize   print the token ids of a text\n"
    "  ppl        perplexity of a model on a text file (--codec: parked and resumed)\n"
    "  calibrate  fit the learned KV codec of a model on calibration text\n"
    "  bench      benchmarks: bench engine | serve | codec | resume\n"
    "  version    print the version\n";

int main(int argc, char **argv) {
    if (argc < 2 || !strcmp(argv[1], "-h") || !strcmp(argv[1], "--help") || !strcmp(argv[1], "help")) {
        fputs(main_help, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    for (size_t i = 0; i < KP_ARRAY_LEN(commands); i++)
        if (!strcmp(cmd, commands[i].name)) return commands[i].main(argc - 1, argv + 1);
    if (!strcmp(cmd, "version") || !strcmp(cmd, "--version")) {
        printf("kvpark %s\n", KVPARK_VERSION);
        return 0;
    }
    fprintf(stderr, "kvpark: unknown command '%s'\n%s", cmd, main_help);
    return 2;
}
