/*
 * test_config.c — the YAML loader of `kvpark serve --config` (tools/config.h)
 * against a small option table of its own, in process: what reaches the apply
 * function (the text a flag would carry, in file order, one call per list
 * item, flags only when true) and every refusal with the file, line and key
 * in its message. The serve table itself is exercised end to end in
 * tests/integration/config.test.mjs.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"
#include "tools/config.h"

enum { C_PORT = 1, C_KEY, C_QUIET, C_HELP, C_MODEL };

static const conf_opt opts[] = {
    {"port", required_argument, C_PORT, 0, 1, "8080"},
    {"api-key", required_argument, C_KEY, 1, 1, NULL},
    {"quiet", no_argument, C_QUIET, 0, 1, "false"},
    {"model", required_argument, C_MODEL, 0, 1, NULL},
    {"help", no_argument, C_HELP, 0, 0, NULL}, /* command line only */
};
#define N_OPTS ((int)(sizeof opts / sizeof opts[0]))

/* What the loader applied, as "code=value;" in order ("code=-;" for a flag). */
typedef struct rec {
    char log[1024];
    int calls;
} rec;

static int rec_apply(void *ctx, int code, const char *arg, char *msg, size_t cap) {
    rec *r = ctx;
    if (code == C_PORT && arg && strspn(arg, "0123456789") != strlen(arg)) {
        snprintf(msg, cap, "bad port '%s'", arg);
        return -1;
    }
    if (arg && !strcmp(arg, CONF_REDACTED)) {
        snprintf(msg, cap, "a redacted value");
        return -1;
    }
    size_t n = strlen(r->log);
    snprintf(r->log + n, sizeof r->log - n, "%d=%s;", code, arg ? arg : "-");
    r->calls++;
    return 0;
}

static char *dir;

static int setup(void **state) {
    (void)state;
    dir = tu_tmpdir();
    return dir ? 0 : -1;
}

static int teardown(void **state) {
    (void)state;
    tu_rm_rf(dir);
    free(dir);
    return 0;
}

/* Load text as a file; rc, the record and the message. */
static int load(const char *text, rec *r, char *msg, size_t cap, char *path, size_t pcap) {
    static int n;
    snprintf(path, pcap, "%s/c%d.yaml", dir, n++);
    tu_write_file(path, text, strlen(text));
    memset(r, 0, sizeof *r);
    msg[0] = 0;
    return conf_load(path, opts, N_OPTS, rec_apply, r, msg, cap);
}

/* Values arrive as flags would carry them: in file order, a list item per call,
 * a true flag once (yes/on/1 too), a false flag not at all; quoting is YAML's. */
static void test_values(void **state) {
    (void)state;
    rec r;
    char msg[512], path[512];
    assert_int_equal(load("port: 9090\napi-key: [k1, \"k 2\"]\nquiet: yes\nmodel: 'a b.gguf'\n", &r, msg,
                          sizeof msg, path, sizeof path), 0);
    assert_string_equal(r.log, "1=9090;2=k1;2=k 2;3=-;5=a b.gguf;");
    assert_int_equal(load("api-key:\n  - one\n  - two\nquiet: off\n", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_string_equal(r.log, "2=one;2=two;");
    assert_int_equal(load("api-key: single\nquiet: TRUE\n", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_string_equal(r.log, "2=single;3=-;");
    /* an empty file, a comment-only file, an empty document are empty configs */
    assert_int_equal(load("", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_int_equal(r.calls, 0);
    assert_int_equal(load("# nothing\n", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_int_equal(load("---\n...\n", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_int_equal(load("---\n", &r, msg, sizeof msg, path, sizeof path), 0);
    assert_int_equal(r.calls, 0);
}

/* Every refusal names the file, the line and (where there is one) the key. */
static void test_errors(void **state) {
    (void)state;
    static const struct { const char *text, *want; } cases[] = {
        {"port: 1\nnope: 2\n", ":2: nope: unknown key"},
        {"port: 1\nport: 2\n", ":2: port: duplicate key"},
        {"help: true\n", ":1: help: unknown key"}, /* command-line-only options are not keys */
        {"port: [1, 2]\n", ":1: port: takes one value, not a list"},
        {"api-key: [[a]]\n", ":1: api-key: nested lists are not allowed"},
        {"port:\n  a: 1\n", ":2: port: nested mappings are not allowed"},
        {"api-key: [{a: 1}]\n", "api-key: nested mappings are not allowed"},
        {"quiet: maybe\n", ":1: quiet: 'maybe' is not a boolean"},
        {"port:\n", ":1: port: empty value"},
        {"port: 80x\n", ":1: port: bad port '80x'"},
        {"api-key: \"<redacted>\"\n", ":1: api-key: a redacted value"},
        {"port: &a 1\nmodel: *a\n", "anchors and aliases are not supported"},
        {"- port\n", ":1: the config must be a mapping"},
        {"just text\n", ":1: the config must be a mapping"},
        {"\"\"\n", ":1: the config must be a mapping"},
        {"port: 1\n---\nport: 2\n", "only one YAML document is allowed"},
        {"port: \"open\n", ": YAML error: "},
        {"quiet: true\napi-key: [1\n", ":3: YAML error: "},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        rec r;
        char msg[512], path[512];
        int rc = load(cases[i].text, &r, msg, sizeof msg, path, sizeof path);
        if (rc != -1 || !strstr(msg, cases[i].want) || strncmp(msg, path, strlen(path)))
            fail_msg("case %zu (%s): rc %d, message '%s', want '%s' after the path", i, cases[i].text, rc, msg,
                     cases[i].want);
    }
}

/* A file that cannot be read says which and why; a directory is not a config. */
static void test_unreadable(void **state) {
    (void)state;
    rec r = {0};
    char msg[512], path[512];
    snprintf(path, sizeof path, "%s/missing.yaml", dir);
    assert_int_equal(conf_load(path, opts, N_OPTS, rec_apply, &r, msg, sizeof msg), -1);
    assert_non_null(strstr(msg, "cannot open config file"));
    assert_non_null(strstr(msg, "missing.yaml"));
    assert_int_equal(conf_load(dir, opts, N_OPTS, rec_apply, &r, msg, sizeof msg), -1);
    assert_true(strlen(msg) > 0);
    assert_int_equal(r.calls, 0);
}

/* conf_print_str writes a double-quoted scalar that the loader reads back as the same string. */
static void test_print_round_trip(void **state) {
    (void)state;
    const char *vals[] = {"plain", "with \"quotes\" and \\", "tab\there", "colon: hash # x", "ünï"};
    for (size_t i = 0; i < sizeof vals / sizeof vals[0]; i++) {
        char path[512], msg[512];
        snprintf(path, sizeof path, "%s/rt%zu.yaml", dir, i);
        FILE *f = fopen(path, "w");
        assert_non_null(f);
        fputs("model: ", f);
        conf_print_str(f, vals[i]);
        fputc('\n', f);
        fclose(f);
        rec r = {0};
        assert_int_equal(conf_load(path, opts, N_OPTS, rec_apply, &r, msg, sizeof msg), 0);
        char want[256];
        snprintf(want, sizeof want, "%d=%s;", C_MODEL, vals[i]);
        assert_string_equal(r.log, want);
    }
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_values),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_unreadable),
        cmocka_unit_test(test_print_round_trip),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("config", tests, setup, teardown);
}
