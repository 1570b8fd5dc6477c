/*
 * test_bench_serve.c — `kvpark bench serve`: the loopback-only URL check, the
 * chunked transfer decoder (every split point, extensions, trailers, malformed
 * framing), percentiles against numpy's values, and two end-to-end runs:
 * against a scripted mock server on 127.0.0.1 (good streams, HTTP 500,
 * malformed JSON and truncated streams must be counted exactly, usage must be
 * preferred over delta counts), and against the real `kvpark serve` with
 * stories260K started by the tool itself.
 */
#include "tests/testutil.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#include "bench/bench_serve.h"

/* ------------------------------------------------------------------ */

static void test_url(void **state) {
    (void)state;
    bench_url u;
    kp_err e = {0};
    assert_int_equal(bench_url_parse("http://127.0.0.1:8080", &u, &e), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 8080);
    assert_string_equal(u.path, "/v1/chat/completions");
    assert_int_equal(bench_url_parse("http://localhost:9/", &u, &e), 0);
    assert_string_equal(u.host, "127.0.0.1");
    assert_int_equal(u.port, 9);
    assert_int_equal(bench_url_parse("http://127.1.2.3:81/x/chat", &u, &e), 0);
    assert_string_equal(u.path, "/x/chat");
    assert_int_equal(bench_url_parse("http://127.0.0.1", &u, &e), 0);
    assert_int_equal(u.port, 80);

    const char *bad[] = {"http://10.0.0.1:80", "http://example.com:80", "http://0.0.0.0:80",
                         "http://128.0.0.1:80", "https://127.0.0.1:80", "127.0.0.1:80",
                         "http://[::1]:80", "http://127.0.0.1:0", "http://127.0.0.1:70000",
                         "http://127.0.0.1:80x", "http://:80", "http://127.0.0.1.evil.com:80",
                         "http://127.0.0.1:80/a b"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        e.msg[0] = 0;
        assert_int_equal(bench_url_parse(bad[i], &u, &e), KP_EINVAL);
        assert_true(e.msg[0] != 0);
    }
    assert_non_null(strstr((bench_url_parse("http://8.8.8.8:80", &u, &e), e.msg), "refusing"));
}

/* ------------------------------------------------------------------ */

static const char chunked_wire[] =
    "7\r\ndata: a\r\n"
    "1A;name=val\r\n" /* extension, upper-case hex */
    "\n\ndata: {\"x\":1234567890}\n\n\r\n"
    "3\r\nxyz\r\n"
    "0\r\n"
    "Trailer: yes\r\n"
    "\r\n"
    "GARBAGE AFTER END";
static const char chunked_payload[] = "data: a\n\ndata: {\"x\":1234567890}\n\nxyz";

static void decode_split(const char *wire, size_t n, size_t cut, int bytewise, char *out,
                         size_t *out_len, int *done) {
    bench_chunked c = {0};
    kp_err e = {0};
    size_t o = 0;
    if (bytewise) {
        for (size_t i = 0; i < n; i++) {
            long k = bench_chunked_feed(&c, wire + i, 1, out + o, &e);
            assert_true(k >= 0);
            o += (size_t)k;
        }
    } else {
        long k = bench_chunked_feed(&c, wire, cut, out, &e);
        assert_true(k >= 0);
        o += (size_t)k;
        k = bench_chunked_feed(&c, wire + cut, n - cut, out + o, &e);
        assert_true(k >= 0);
        o += (size_t)k;
    }
    *out_len = o;
    *done = c.done;
}

static void test_chunked(void **state) {
    (void)state;
    size_t n = strlen(chunked_wire), plen = strlen(chunked_payload), ol;
    char out[256];
    int done;
    for (size_t cut = 0; cut <= n; cut++) {
        decode_split(chunked_wire, n, cut, 0, out, &ol, &done);
        assert_int_equal(ol, plen);
        assert_memory_equal(out, chunked_payload, plen);
        assert_true(done);
    }
    decode_split(chunked_wire, n, 0, 1, out, &ol, &done);
    assert_int_equal(ol, plen);
    assert_memory_equal(out, chunked_payload, plen);
    assert_true(done);

    /* bare LF line endings are tolerated */
    const char *lf = "2\nab\n0\n\n";
    decode_split(lf, strlen(lf), 3, 0, out, &ol, &done);
    assert_int_equal(ol, 2);
    assert_memory_equal(out, "ab", 2);
    assert_true(done);

    /* not finished yet */
    decode_split("5\r\nhel", 6, 4, 0, out, &ol, &done);
    assert_int_equal(ol, 3);
    assert_false(done);

    const char *bad[] = {"zz\r\n", "\r\n", "5\r\nhelloX\r\n", "1234567890abcdef0\r\n",
                         "2\rab\r\n", "0\r\n\rX"};
    for (size_t i = 0; i < sizeof bad / sizeof *bad; i++) {
        bench_chunked c = {0};
        kp_err e = {0};
        assert_int_equal(bench_chunked_feed(&c, bad[i], strlen(bad[i]), out, &e), KP_EFORMAT);
        assert_true(e.msg[0] != 0);
    }
}

/* ------------------------------------------------------------------ */

static void test_percentile(void **state) {
    (void)state;
    /* numpy.percentile([5,1,4,2,3,10,7,6,9,8], p) for p = 0, 50, 90, 99, 100 */
    double v[10] = {5, 1, 4, 2, 3, 10, 7, 6, 9, 8};
    assert_float_equal(bench_percentile(v, 10, 0), 1.0, 1e-12);
    assert_float_equal(bench_percentile(v, 10, 50), 5.5, 1e-12);
    assert_float_equal(bench_percentile(v, 10, 90), 9.1, 1e-12);
    assert_float_equal(bench_percentile(v, 10, 99), 9.91, 1e-12);
    assert_float_equal(bench_percentile(v, 10, 100), 10.0, 1e-12);
    double one = 3.5;
    assert_float_equal(bench_percentile(&one, 1, 99), 3.5, 1e-12);
    assert_float_equal(bench_percentile(NULL, 0, 50), 0.0, 0);
}

/* ------------------------------------------------------------------ */
/* A scripted mock server: chat request k (1-based, counting the warm-up)
 * gets mode k % 4: 1 good stream, 2 HTTP 500, 3 malformed JSON, 0 stream cut
 * before [DONE]. A good stream has 2 content deltas but reports 5 completion
 * tokens in its usage chunk, split over odd chunk boundaries. With
 * all_good every chat request gets the good stream, after silent_ms of
 * silence (a slow server). */

typedef struct mock_srv {
    int lfd, port;
    atomic_int stop;
    int n_chat, n_health, n_bad;
    int all_good, silent_ms;
    pthread_t th;
} mock_srv;

static void mock_send(int fd, const char *s) { (void)!send(fd, s, strlen(s), MSG_NOSIGNAL); }

static void mock_chunk(int fd, const char *s, size_t n) {
    char h[32];
    snprintf(h, sizeof h, "%zx\r\n", n);
    mock_send(fd, h);
    (void)!send(fd, s, n, MSG_NOSIGNAL);
    mock_send(fd, "\r\n");
}

static void mock_handle(mock_srv *m, int fd) {
    char req[65536];
    size_t n = 0;
    char *eoh = NULL;
    while (n < sizeof req - 1) {
        ssize_t k = recv(fd, req + n, sizeof req - 1 - n, 0);
        if (k <= 0) return;
        n += (size_t)k;
        req[n] = 0;
        if ((eoh = strstr(req, "\r\n\r\n"))) {
            char *cl = strstr(req, "Content-Length: ");
            size_t want = (size_t)(eoh + 4 - req) + (cl ? strtoul(cl + 16, NULL, 10) : 0);
            if (n >= want) break;
        }
    }
    if (!strncmp(req, "GET /health", 11)) {
        m->n_health++;
        mock_send(fd, "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        return;
    }
    /* checked by the main thread: cmocka asserts must not fire here */
    if (strncmp(req, "POST /v1/chat/completions HTTP/1.1\r\n", 36) ||
        !strstr(req, "\"stream\":true") || !strstr(req, "\"include_usage\":true") ||
        !strstr(req, "\"max_tokens\":7") || !strstr(req, "\"model\":\"mock.gguf\""))
        m->n_bad++;
    int mode = ++m->n_chat % 4;
    if (m->all_good) {
        mode = 1;
        usleep((useconds_t)m->silent_ms * 1000);
    }
    if (mode == 2) {
        mock_send(fd, "HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/json\r\n"
                      "Content-Length: 33\r\nConnection: close\r\n\r\n{\"error\":{\"message\":\"mock 500\"}}");
        return;
    }
    mock_send(fd, "HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                  "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n");
    const char *body =
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\"Once\"}}]}\n\n"
        "data: {\"choices\":[{\"index\":0,\"delta\":{\"content\":\" upon\"}}]}\n\n"
        "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":11,\"completion_tokens\":5}}\n\n";
    if (mode == 3) body = "data: {\"choices\":[{\"delta\":{\"content\":\"x\"}}\n\n"; /* bad JSON */
    size_t bl = strlen(body);
    for (size_t off = 0, step = 13; off < bl; off += step, step = step * 7 % 61 + 1)
        mock_chunk(fd, body + off, KP_MIN(step, bl - off));
    if (mode == 0) return; /* cut: no [DONE], no last chunk */
    const char *done = "data: [DONE]\n\n";
    mock_chunk(fd, done, strlen(done));
    mock_send(fd, "0\r\n\r\n");
}

static void *mock_thread(void *arg) {
    mock_srv *m = arg;
    while (!atomic_load(&m->stop)) {
        struct pollfd p = {.fd = m->lfd, .events = POLLIN};
        if (poll(&p, 1, 50) <= 0) continue;
        int fd = accept(m->lfd, NULL, NULL);
        if (fd < 0) continue;
        mock_handle(m, fd);
        close(fd);
    }
    return NULL;
}

static void mock_start(mock_srv *m, int all_good, int silent_ms) {
    memset(m, 0, sizeof *m);
    m->all_good = all_good, m->silent_ms = silent_ms;
    m->lfd = socket(AF_INET, SOCK_STREAM, 0);
    assert_true(m->lfd >= 0);
    struct sockaddr_in a = {.sin_family = AF_INET};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    assert_int_equal(bind(m->lfd, (struct sockaddr *)&a, sizeof a), 0);
    assert_int_equal(listen(m->lfd, 64), 0);
    assert_int_equal(getsockname(m->lfd, (struct sockaddr *)&a, &al), 0);
    m->port = ntohs(a.sin_port);
    atomic_init(&m->stop, 0);
    assert_int_equal(pthread_create(&m->th, NULL, mock_thread, m), 0);
}

static void mock_stop(mock_srv *m) {
    atomic_store(&m->stop, 1);
    pthread_join(m->th, NULL);
    close(m->lfd);
}

/* Rows of the CSV (header skipped): fields split on commas. */
static int read_csv(const char *path, char rows[][32][32], int max_rows) {
    char *txt = tu_read_file(path, NULL);
    assert_non_null(txt);
    int r = -1;
    for (char *save = NULL, *line = strtok_r(txt, "\n", &save); line;
         line = strtok_r(NULL, "\n", &save), r++) {
        if (r < 0) continue; /* header */
        assert_true(r < max_rows);
        int f = 0;
        for (char *s2 = NULL, *fld = strtok_r(line, ",", &s2); fld && f < 32;
             fld = strtok_r(NULL, ",", &s2))
            snprintf(rows[r][f++], 32, "%s", fld);
        assert_int_equal(f, 21);
    }
    free(txt);
    return r < 0 ? 0 : r;
}

static void test_mock_server(void **state) {
    (void)state;
    mock_srv m;
    mock_start(&m, 0, 0);
    char *dir = tu_tmpdir();
    char csv[512], url[64];
    snprintf(csv, sizeof csv, "%s/out/serve.csv", dir);
    snprintf(url, sizeof url, "http://127.0.0.1:%d", m.port);
    char *argv[] = {"serve", "--url", url, "--clients", "1,2", "-n", "8", "--max-tokens", "7",
                    "--prompt-tokens", "20", "--csv", csv, "-m", "/x/mock.gguf", NULL};
    int rc = bench_serve_main((int)(sizeof argv / sizeof *argv) - 1, argv);
    mock_stop(&m);
    assert_int_equal(rc, 1); /* some requests failed */
    assert_int_equal(m.n_chat, 1 + 8 + 8);
    assert_true(m.n_health >= 1);
    assert_int_equal(m.n_bad, 0);
    char rows[4][32][32];
    assert_int_equal(read_csv(csv, rows, 4), 2);
    /* level 1: chat requests 2..9 -> modes 2,3,0,1,2,3,0,1: 2 good */
    assert_string_equal(rows[0][0], "mock.gguf");
    assert_string_equal(rows[0][1], "1");
    assert_string_equal(rows[0][2], "8");
    assert_string_equal(rows[0][3], "2");
    assert_string_equal(rows[0][4], "6");
    assert_float_equal(atof(rows[0][9]), 5.0, 1e-9);  /* usage wins over 2 deltas */
    assert_float_equal(atof(rows[0][8]), 11.0, 1e-9); /* mean prompt tokens */
    assert_true(atof(rows[0][11]) > 0);               /* TTFT p50 */
    /* level 2: requests 10..17 -> 2 good whatever the interleaving */
    assert_string_equal(rows[1][1], "2");
    assert_string_equal(rows[1][3], "2");
    assert_string_equal(rows[1][4], "6");

    /* refused before any traffic */
    char *argv2[] = {"serve", "--url", "http://192.168.1.1:80", "--csv", csv, NULL};
    assert_int_equal(bench_serve_main(5, argv2), 1);
    char *argv3[] = {"serve", "--clients", "0", NULL};
    assert_int_equal(bench_serve_main(3, argv3), 2);
    unlink(csv);
    snprintf(csv, sizeof csv, "%s/out", dir);
    rmdir(csv);
    rmdir(dir);
    free(dir);
}

/* A server that thinks 1.5 s before each answer: --idle-timeout 1 fails
 * every request, --idle-timeout 4 waits and all succeed. */
static void test_idle_timeout(void **state) {
    (void)state;
    char *dir = tu_tmpdir();
    char csv[512], url[64];
    snprintf(csv, sizeof csv, "%s/serve.csv", dir);
    for (int k = 0; k < 2; k++) {
        mock_srv m;
        mock_start(&m, 1, 1500);
        snprintf(url, sizeof url, "http://127.0.0.1:%d", m.port);
        char *argv[] = {"serve", "--url", url, "--clients", "1", "-n", "2", "--max-tokens", "7",
                        "--prompt-tokens", "20", "--csv", csv, "-m", "/x/mock.gguf", "--idle-timeout",
                        k == 0 ? "1" : "4", NULL};
        int rc = bench_serve_main((int)(sizeof argv / sizeof *argv) - 1, argv);
        mock_stop(&m);
        assert_int_equal(m.n_bad, 0);
        if (k == 0) {
            assert_int_equal(rc, 1);
        } else {
            assert_int_equal(rc, 0);
            char rows[2][32][32];
            assert_int_equal(read_csv(csv, rows, 2), 1);
            assert_string_equal(rows[0][3], "2"); /* both requests good */
        }
        unlink(csv);
    }
    char *bad[] = {"serve", "--idle-timeout", "0", NULL};
    assert_int_equal(bench_serve_main(3, bad), 2);
    rmdir(dir);
    free(dir);
}

/* ------------------------------------------------------------------ */

static void test_real_server(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    const char *bin = getenv("KVPARK_BIN");
    if (!bin || access(bin, X_OK) != 0) {
        print_message("SKIP: $KVPARK_BIN (the kvpark binary) not set\n");
        skip();
    }
    char *model = tu_shared_path("models/stories260K.gguf");
    char *text = tu_shared_path("data/tinystories-valid-eval.txt");
    char *dir = tu_tmpdir();
    char csv[512];
    snprintf(csv, sizeof csv, "%s/serve.csv", dir);
    char *argv[] = {"serve", "-m", model, "--server-bin", (char *)bin, "--parallel", "4",
                    "--clients", "1,4", "-n", "12", "--max-tokens", "16", "--prompt-tokens", "48",
                    "-f", text, "--csv", csv, "--max-time", "120", NULL};
    int rc = bench_serve_main((int)(sizeof argv / sizeof *argv) - 1, argv);
    assert_int_equal(rc, 0);
    char rows[4][32][32];
    assert_int_equal(read_csv(csv, rows, 4), 2);
    for (int r = 0; r < 2; r++) {
        assert_string_equal(rows[r][0], "stories260K.gguf");
        assert_string_equal(rows[r][3], "12"); /* completed */
        assert_string_equal(rows[r][4], "0");  /* errors */
        double mean_prompt = atof(rows[r][8]), mean_out = atof(rows[r][9]);
        assert_true(mean_prompt > 24 && mean_prompt < 96); /* ~48 asked */
        assert_true(mean_out >= 1 && mean_out <= 16);
        assert_true(atof(rows[r][7]) > 0); /* output tok/s */
        double p50 = atof(rows[r][11]), p99 = atof(rows[r][13]);
        assert_true(p50 > 0 && p50 <= p99);
    }
    unlink(csv);
    rmdir(dir);
    free(model);
    free(text);
    free(dir);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url),
        cmocka_unit_test(test_chunked),
        cmocka_unit_test(test_percentile),
        cmocka_unit_test(test_mock_server),
        cmocka_unit_test(test_idle_timeout),
        cmocka_unit_test(test_real_server),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
