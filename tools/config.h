/*
 * config.h — the YAML config file of `kvpark serve --config FILE` (libyaml).
 *
 * Why: one file an operator (or a Kubernetes ConfigMap) keeps instead of a
 * long command line. The loader does not know any option itself: it reads a
 * table of options (the same table getopt gets) and hands every value, as
 * the text a flag would carry, to the caller's apply function, so a value is
 * valid in the file exactly when it is valid as a flag (one validation path).
 *
 * Contract
 *   - The file is one YAML mapping (an empty file or document is an empty config). Keys are
 *     the long option names; a value is a scalar; an option marked `list`
 *     also takes a sequence of scalars (one apply call per item); a flag
 *     (has_arg == no_argument) takes true/false (yes/no, on/off) and is applied
 *     once when true.
 *   - Errors return -1 with msg = "FILE:LINE: KEY: what" (the line libyaml
 *     reports): an unknown key, a duplicate key, a nested mapping, a sequence
 *     for a non-list key, an alias or anchor, a bad boolean, a value the apply
 *     function refuses (its message follows), a YAML syntax error, an
 *     unreadable file ("cannot open FILE: reason").
 *   - conf_redacted is what --print-config writes instead of a secret; the
 *     apply functions refuse it as a value so a printed config never starts a
 *     server with a key of "<redacted>".
 *   - No state is kept between calls.
 */
#ifndef KP_TOOLS_CONFIG_H
#define KP_TOOLS_CONFIG_H

#include <getopt.h>
#include <stddef.h>

typedef struct conf_opt {
    const char *name; /* the long option name, also the config key */
    int has_arg;      /* required_argument or no_argument (getopt.h) */
    int code;         /* getopt's code for it */
    int list;         /* repeatable: a YAML sequence is allowed */
    int file_ok;      /* 0: command line only (config, print-config, help) */
    const char *def;  /* the default as --print-config shows it (NULL: none, printed as a comment) */
} conf_opt;

/* Apply one value (arg NULL for a flag); 0, or -1 with a message in msg. */
typedef int (*conf_apply_fn)(void *ctx, int code, const char *arg, char *msg, size_t cap);

#define CONF_REDACTED "<redacted>"

int conf_load(const char *path, const conf_opt *opts, int n_opts, conf_apply_fn apply, void *ctx,
              char *msg, size_t cap);

/* Write s as a YAML double-quoted scalar to f. */
#include <stdio.h>
void conf_print_str(FILE *f, const char *s);

#endif
