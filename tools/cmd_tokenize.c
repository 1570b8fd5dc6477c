/*
 * cmd_tokenize.c — `kvpark tokenize`: print the token ids of a text,
 * space-separated, as the model's tokenizer encodes it.
 *
 * Only the vocabulary is read from the GGUF file (no weights, no backend),
 * so it is instant even for large models. Exit status 0, 1 on a runtime
 * error, 2 on bad usage.
 */
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "engine/gguf.h"
#include "engine/model.h"
#include "engine/tok.h"
#include "tools/cli.h"

int cmd_tokenize(int argc, char **argv) {
    cli_model_opts co = {0};
    bool add_bos = true, parse_special = true;
    static const struct option lo[] = {{"model", required_argument, 0, 'm'},
                                       {"no-bos", no_argument, 0, CLI_OPT_NO_BOS},
                                       {"no-parse-special", no_argument, 0, CLI_OPT_NO_PARSE_SPECIAL},
                                       {"help", no_argument, 0, 'h'},
                                       {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:h", lo, NULL)) != -1) {
        if (c == 'm') co.model = optarg;
        else if (c == CLI_OPT_NO_BOS) add_bos = false;
        else if (c == CLI_OPT_NO_PARSE_SPECIAL) parse_special = false;
        else if (c == 'h') {
            puts("usage: kvpark tokenize [-m MODEL] [--no-bos] [--no-parse-special] TEXT\n"
                 "Print the token ids of TEXT, space-separated.");
            return 0;
        } else return cli_usage_error("tokenize", "unknown option");
    }
    if (optind != argc - 1) return cli_usage_error("tokenize", "expected exactly one TEXT argument");
    const char *text = argv[optind];
    kp_err err = {0};
    char path[1024];
    int rc = model_resolve(co.model, path, sizeof path, &err);
    if (rc) return cli_die(&err, rc);
    /* Only the vocabulary is needed: no weights, no backend. */
    gguf_file *gf = NULL;
    tok_vocab *v = NULL;
    if ((rc = gguf_open(&gf, path, &err)) || (rc = tok_load(&v, gf, &err))) {
        gguf_close(gf);
        return cli_die(&err, rc);
    }
    int32_t *ids = NULL;
    size_t n = 0;
    rc = tok_encode(v, text, strlen(text), add_bos, parse_special, &ids, &n, &err);
    if (!rc) {
        for (size_t i = 0; i < n; i++) printf(i ? " %d" : "%d", ids[i]);
        printf("\n");
    }
    free(ids);
    tok_free(v);
    gguf_close(gf);
    return rc ? cli_die(&err, rc) : 0;
}
