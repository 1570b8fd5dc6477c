/*
 * config.c — the YAML loader of `kvpark serve --config` (contract in
 * config.h), an event-level walk over libyaml's parser: the shape allowed is
 * small (one mapping of scalars and sequences of scalars) and everything
 * else is refused with the key and the line it is on.
 */
#include "tools/config.h"

#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <yaml.h>

static int conf_fail(char *msg, size_t cap, const char *path, const yaml_event_t *ev, const char *key,
                     const char *fmt, ...) {
    char what[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(what, sizeof what, fmt, ap);
    va_end(ap);
    unsigned long line = ev ? (unsigned long)ev->start_mark.line + 1 : 0;
    if (key) snprintf(msg, cap, "%s:%lu: %s: %s", path, line, key, what);
    else snprintf(msg, cap, "%s:%lu: %s", path, line, what);
    return -1;
}

static int conf_bool(const char *s, int *out) {
    static const char *t[] = {"true", "yes", "on", "1"}, *f[] = {"false", "no", "off", "0"};
    for (int i = 0; i < 4; i++) {
        if (!strcasecmp(s, t[i])) return *out = 1, 0;
        if (!strcasecmp(s, f[i])) return *out = 0, 0;
    }
    return -1;
}

/* A node that must carry no anchor or tag of its own (aliases are refused where they appear). */
static const char *conf_anchor(const yaml_event_t *ev) {
    if (ev->type == YAML_SCALAR_EVENT) return (const char *)ev->data.scalar.anchor;
    if (ev->type == YAML_SEQUENCE_START_EVENT) return (const char *)ev->data.sequence_start.anchor;
    if (ev->type == YAML_MAPPING_START_EVENT) return (const char *)ev->data.mapping_start.anchor;
    return NULL;
}

static int conf_apply(const char *path, const yaml_event_t *ev, const conf_opt *o, const char *val,
                      conf_apply_fn apply, void *ctx, char *msg, size_t cap) {
    char why[400] = "";
    if (o->has_arg == no_argument) {
        int b;
        if (conf_bool(val, &b))
            return conf_fail(msg, cap, path, ev, o->name, "'%s' is not a boolean (true or false)", val);
        if (!b) return 0;
        val = NULL;
    } else if (!*val) {
        return conf_fail(msg, cap, path, ev, o->name, "empty value");
    }
    if (apply(ctx, o->code, val, why, sizeof why))
        return conf_fail(msg, cap, path, ev, o->name, "%s", why[0] ? why : "bad value");
    return 0;
}

int conf_load(const char *path, const conf_opt *opts, int n_opts, conf_apply_fn apply, void *ctx,
              char *msg, size_t cap) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        snprintf(msg, cap, "cannot open config file '%s': %s", path, strerror(errno));
        return -1;
    }
    yaml_parser_t p;
    if (!yaml_parser_initialize(&p)) {
        fclose(f);
        snprintf(msg, cap, "%s: cannot start the YAML parser (out of memory)", path);
        return -1;
    }
    yaml_parser_set_input_file(&p, f);
    char *seen = calloc((size_t)n_opts + 1, 1);
    int rc = seen ? 0 : -1, depth = 0, docs = 0;
    const conf_opt *cur = NULL; /* the key whose value comes next */
    int in_seq = 0;
    if (!seen) snprintf(msg, cap, "%s: out of memory", path);
    while (!rc) {
        yaml_event_t ev;
        if (!yaml_parser_parse(&p, &ev)) {
            snprintf(msg, cap, "%s:%lu: YAML error: %s%s%s", path, (unsigned long)p.problem_mark.line + 1,
                     p.problem ? p.problem : "syntax error", p.context ? " " : "", p.context ? p.context : "");
            rc = -1;
            break;
        }
        int done = ev.type == YAML_STREAM_END_EVENT;
        const char *key = cur ? cur->name : NULL;
        if (ev.type == YAML_ALIAS_EVENT || conf_anchor(&ev)) {
            rc = conf_fail(msg, cap, path, &ev, key, "YAML anchors and aliases are not supported");
        } else switch (ev.type) {
        case YAML_DOCUMENT_START_EVENT:
            if (++docs > 1) rc = conf_fail(msg, cap, path, &ev, NULL, "only one YAML document is allowed");
            break;
        case YAML_MAPPING_START_EVENT:
            if (depth == 0) depth = 1;
            else rc = conf_fail(msg, cap, path, &ev, key, "nested mappings are not allowed (a value is a scalar%s)",
                                cur && cur->list ? " or a list of scalars" : "");
            break;
        case YAML_MAPPING_END_EVENT: depth = 0; break;
        case YAML_SEQUENCE_START_EVENT:
            if (depth == 0) rc = conf_fail(msg, cap, path, &ev, NULL, "the config must be a mapping of option: value");
            else if (!cur) rc = conf_fail(msg, cap, path, &ev, NULL, "a key must be a plain name");
            else if (in_seq) rc = conf_fail(msg, cap, path, &ev, key, "nested lists are not allowed");
            else if (!cur->list) rc = conf_fail(msg, cap, path, &ev, key, "takes one value, not a list");
            else in_seq = 1;
            break;
        case YAML_SEQUENCE_END_EVENT: in_seq = 0; cur = NULL; break;
        case YAML_SCALAR_EVENT: {
            const char *s = (const char *)ev.data.scalar.value;
            if (depth == 0) {
                /* "---" with nothing after it is an empty document (a null scalar): an empty config */
                if (*s || ev.data.scalar.style != YAML_PLAIN_SCALAR_STYLE)
                    rc = conf_fail(msg, cap, path, &ev, NULL, "the config must be a mapping of option: value");
            } else if (cur) {
                rc = conf_apply(path, &ev, cur, s, apply, ctx, msg, cap);
                if (!in_seq) cur = NULL;
            } else {
                int i;
                for (i = 0; i < n_opts; i++)
                    if (opts[i].file_ok && !strcmp(opts[i].name, s)) break;
                if (i == n_opts)
                    rc = conf_fail(msg, cap, path, &ev, s, "unknown key (the keys are serve's long option names, see 'kvpark serve --help')");
                else if (seen[i]) rc = conf_fail(msg, cap, path, &ev, s, "duplicate key");
                else seen[i] = 1, cur = &opts[i];
            }
            break;
        }
        default: break;
        }
        yaml_event_delete(&ev);
        if (done) break;
    }
    yaml_parser_delete(&p);
    fclose(f);
    free(seen);
    return rc;
}

void conf_print_str(FILE *f, const char *s) {
    fputc('"', f);
    for (const unsigned char *q = (const unsigned char *)s; *q; q++) {
        if (*q == '"' || *q == '\\') fprintf(f, "\\%c", *q);
        else if (*q < 0x20 || *q == 0x7f) fprintf(f, "\\x%02x", *q);
        else fputc(*q, f);
    }
    fputc('"', f);
}
