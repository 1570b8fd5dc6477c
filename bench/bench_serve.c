/*
 * bench_serve.c — `kvpark bench serve`: load generator for the HTTP server,
 * modelled on vLLM's benchmark_serving.
 *
 * For each concurrency level C, C client threads loop sending streaming chat
 * requests (POST /v1/chat/completions, "stream": true, usage requested) until
 * --requests are done. Per request we record, from the moment we connect:
 *   TTFT   time to the first non-empty content delta,
 *   ITL    gaps between successive content deltas,
 *   E2E    time to "data: [DONE]",
 *   TPOT   (E2E - TTFT) / (output tokens - 1),
 * output tokens from the usage chunk (or the number of deltas if the server
 * sent none), and errors (connect/recv failure, non-200, malformed SSE or
 * JSON, an "error" event, no [DONE]).
 *
 * HTTP is done by hand over POSIX sockets: HTTP/1.1 with "Connection: close",
 * chunked or Content-Length or read-to-EOF bodies. Only 127.0.0.0/8 is ever
 * contacted (bench_url_parse refuses anything else), every socket has
 * --idle-timeout (30 s) timeouts and the run has a global deadline, so it
 * always ends by itself.
 *
 * Without --url the tool starts `kvpark serve` as a child on a free port
 * (binary: /proc/self/exe or --server-bin), waits for GET /health = 200 and
 * stops it with SIGTERM at the end.
 */
#include "bench/bench_serve.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <jansson.h>
#include <math.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "bench/plot.h"
#include "tools/cli.h"

#define BENCH_MAX_LEVELS 16
#define BENCH_MAX_CLIENTS 1024
#define BENCH_IDLE_DEFAULT_S 30 /* --idle-timeout: no data for this long fails a request */
#define BENCH_MAX_HEADER 16384
#define BENCH_MAX_LINE (1 << 20) /* longest SSE line we accept */

/* ------------------------------------------------------------------ */
/* URL parsing: loopback only                                          */

int bench_url_parse(const char *url, bench_url *u, kp_err *err) {
    memset(u, 0, sizeof *u);
    if (!url || strncmp(url, "http://", 7) != 0)
        return kp_errf(err, KP_EINVAL,
                       "bench serve: --url must start with http:// (got '%s'); only plain "
                       "HTTP to this machine is supported", url ? url : "");
    const char *h = url + 7, *end = h + strcspn(h, ":/");
    size_t hl = (size_t)(end - h);
    if (hl == 0 || hl >= sizeof u->host)
        return kp_errf(err, KP_EINVAL, "bench serve: no host in --url '%s'", url);
    char host[64];
    memcpy(host, h, hl);
    host[hl] = 0;
    if (!strcasecmp(host, "localhost")) snprintf(host, sizeof host, "127.0.0.1");
    struct in_addr a;
    if (inet_pton(AF_INET, host, &a) != 1 || (ntohl(a.s_addr) >> 24) != 127)
        return kp_errf(err, KP_EINVAL,
                       "bench serve: refusing host '%s': this tool only sends traffic to "
                       "127.0.0.0/8 or localhost, never off the machine", host);
    snprintf(u->host, sizeof u->host, "%s", host);
    u->port = 80;
    const char *p = end;
    if (*p == ':') {
        char *e;
        errno = 0;
        long port = strtol(p + 1, &e, 10);
        if (errno || e == p + 1 || port < 1 || port > 65535 || (*e && *e != '/'))
            return kp_errf(err, KP_EINVAL, "bench serve: bad port in --url '%s'", url);
        u->port = (int)port;
        p = e;
    }
    if (*p == 0 || !strcmp(p, "/")) p = "/v1/chat/completions";
    if (strlen(p) >= sizeof u->path || strpbrk(p, " \r\n\t"))
        return kp_errf(err, KP_EINVAL, "bench serve: bad path in --url '%s'", url);
    snprintf(u->path, sizeof u->path, "%s", p);
    return 0;
}

/* ------------------------------------------------------------------ */
/* Chunked transfer decoding                                           */

enum {
    CH_SIZE = 0,   /* reading hex digits of a chunk-size line */
    CH_EXT,        /* skipping a chunk extension up to LF */
    CH_SIZE_LF,    /* saw CR after the size, want LF */
    CH_DATA,       /* copying chunk payload */
    CH_DATA_CR,    /* after payload, want CR (or bare LF) */
    CH_DATA_LF,    /* after payload CR, want LF */
    CH_TRAILER,    /* at the start of a trailer line */
    CH_TRAILER_LINE,
    CH_TRAILER_LF, /* saw CR on an empty trailer line, want LF */
    CH_DONE,
};

static int hexval(char ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* The size line ended: go to the payload, or to the trailers after size 0. */
static int chunk_size_done(bench_chunked *c, kp_err *err) {
    if (c->n_digits == 0) return kp_errf(err, KP_EFORMAT, "chunked: empty chunk-size line");
    c->state = c->left ? CH_DATA : CH_TRAILER;
    return 0;
}

long bench_chunked_feed(bench_chunked *c, const char *in, size_t n, char *out, kp_err *err) {
    size_t i = 0, o = 0;
    while (i < n && c->state != CH_DONE) {
        char ch = in[i];
        switch (c->state) {
        case CH_SIZE: {
            int d = hexval(ch);
            if (d >= 0) {
                if (++c->n_digits > 15) return kp_errf(err, KP_EFORMAT, "chunked: chunk size too large");
                c->left = c->left * 16 + (unsigned)d;
            } else if (ch == ';' || ch == ' ' || ch == '\t') {
                c->state = CH_EXT;
            } else if (ch == '\r') {
                c->state = CH_SIZE_LF;
            } else if (ch == '\n') {
                if (chunk_size_done(c, err)) return KP_EFORMAT;
            } else {
                return kp_errf(err, KP_EFORMAT, "chunked: bad byte 0x%02x in chunk size",
                               (unsigned char)ch);
            }
            i++;
            break;
        }
        case CH_EXT:
            if (ch == '\n' && chunk_size_done(c, err)) return KP_EFORMAT;
            i++;
            break;
        case CH_SIZE_LF:
            if (ch != '\n') return kp_errf(err, KP_EFORMAT, "chunked: CR without LF after size");
            if (chunk_size_done(c, err)) return KP_EFORMAT;
            i++;
            break;
        case CH_DATA: {
            size_t k = n - i;
            if (k > c->left) k = (size_t)c->left;
            memcpy(out + o, in + i, k);
            o += k;
            i += k;
            c->left -= k;
            if (c->left == 0) c->state = CH_DATA_CR;
            break;
        }
        case CH_DATA_CR:
        case CH_DATA_LF:
            if (ch == '\r' && c->state == CH_DATA_CR) c->state = CH_DATA_LF;
            else if (ch == '\n') {
                c->state = CH_SIZE;
                c->n_digits = 0;
                c->left = 0;
            } else return kp_errf(err, KP_EFORMAT, "chunked: missing CRLF after chunk data");
            i++;
            break;
        case CH_TRAILER:
            c->state = ch == '\r' ? CH_TRAILER_LF : ch == '\n' ? CH_DONE : CH_TRAILER_LINE;
            i++;
            break;
        case CH_TRAILER_LINE:
            if (ch == '\n') c->state = CH_TRAILER;
            i++;
            break;
        case CH_TRAILER_LF:
            if (ch != '\n') return kp_errf(err, KP_EFORMAT, "chunked: CR without LF at end");
            c->state = CH_DONE;
            i++;
            break;
        }
    }
    c->done = c->state == CH_DONE;
    return (long)o;
}

/* ------------------------------------------------------------------ */
/* Statistics                                                          */

static int cmp_double(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

double bench_percentile(double *v, int n, double p) {
    if (n <= 0) return 0;
    qsort(v, (size_t)n, sizeof *v, cmp_double);
    double r = p / 100.0 * (n - 1);
    int lo = (int)floor(r), hi = lo + 1 < n ? lo + 1 : lo;
    return v[lo] + (v[hi] - v[lo]) * (r - lo);
}

static double mean_of(const double *v, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += v[i];
    return n ? s / n : 0;
}

/* ------------------------------------------------------------------ */
/* Configuration and per-request results                               */

typedef struct bench_cfg {
    bench_url url;
    struct sockaddr_in addr;
    const char *model;      /* -m, also sent as "model" */
    int levels[BENCH_MAX_LEVELS], n_levels;
    int n_requests;         /* per level */
    int max_tokens;
    int prompt_tokens;      /* approximate target */
    double chars_per_token; /* calibrated by the warm-up request */
    double temp;
    const char *text;       /* prompt source text (file or built-in) */
    size_t text_len;
    double deadline;        /* kp_now() after which everything stops */
    int idle_s;             /* --idle-timeout: a request with no data for this long fails */
} bench_cfg;

typedef struct bench_req {
    double ttft, e2e;      /* seconds; ttft < 0 when no content came */
    int n_out, n_prompt;   /* output tokens; prompt tokens (-1: unknown) */
    double *itl;           /* [n_itl] gaps between content deltas, seconds */
    int n_itl, cap_itl;
    int ok;
    char err[160];
} bench_req;

/* State of one streaming response while it is being read. */
typedef struct bench_stream {
    bench_req *r;
    double t0, t_last;
    int n_deltas, usage_out, got_done, failed;
    char *line;            /* [cap] current SSE line */
    size_t len, cap;
} bench_stream;

static void req_fail(bench_req *r, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void req_fail(bench_req *r, const char *fmt, ...) {
    if (r->err[0]) return; /* keep the first reason */
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(r->err, sizeof r->err, fmt, ap);
    va_end(ap);
    r->ok = 0;
}

/* One "data:" payload of the event stream. */
static void stream_event(bench_stream *s, const char *data) {
    bench_req *r = s->r;
    if (!strcmp(data, "[DONE]")) {
        s->got_done = 1;
        return;
    }
    json_error_t je;
    json_t *j = json_loads(data, 0, &je);
    if (!j || !json_is_object(j)) {
        req_fail(r, "malformed JSON in SSE event: %s", je.text);
        s->failed = 1;
        json_decref(j);
        return;
    }
    json_t *e = json_object_get(j, "error");
    if (e && !json_is_null(e)) {
        json_t *m = json_is_object(e) ? json_object_get(e, "message") : NULL;
        req_fail(r, "error event: %s", json_is_string(m) ? json_string_value(m) : "(no message)");
        s->failed = 1;
    }
    json_t *ch = json_object_get(j, "choices");
    if (json_is_array(ch) && json_array_size(ch) > 0) {
        json_t *delta = json_object_get(json_array_get(ch, 0), "delta");
        json_t *content = json_is_object(delta) ? json_object_get(delta, "content") : NULL;
        if (json_is_string(content) && json_string_length(content) > 0) {
            double now = kp_now();
            if (s->n_deltas == 0) r->ttft = now - s->t0;
            else {
                if (r->n_itl == r->cap_itl) {
                    int cap = r->cap_itl ? 2 * r->cap_itl : 64;
                    double *p = realloc(r->itl, sizeof *p * (size_t)cap);
                    if (p) {
                        r->itl = p;
                        r->cap_itl = cap;
                    }
                }
                if (r->n_itl < r->cap_itl) r->itl[r->n_itl++] = now - s->t_last;
            }
            s->t_last = now;
            s->n_deltas++;
        }
    } else if (!json_is_array(ch) && !(e && !json_is_null(e))) {
        req_fail(r, "SSE event without \"choices\"");
        s->failed = 1;
    }
    json_t *u = json_object_get(j, "usage");
    if (json_is_object(u)) {
        json_t *ct = json_object_get(u, "completion_tokens"), *pt = json_object_get(u, "prompt_tokens");
        if (json_is_integer(ct)) s->usage_out = (int)json_integer_value(ct);
        if (json_is_integer(pt)) r->n_prompt = (int)json_integer_value(pt);
    }
    json_decref(j);
}

/* Body bytes of a 200 response: split into lines, handle "data:" lines. */
static void stream_bytes(bench_stream *s, const char *p, size_t n) {
    for (size_t i = 0; i < n && !s->failed; i++) {
        if (p[i] != '\n') {
            if (s->len + 1 >= s->cap) {
                size_t cap = s->cap ? 2 * s->cap : 4096;
                char *q = cap <= BENCH_MAX_LINE ? realloc(s->line, cap) : NULL;
                if (!q) {
                    req_fail(s->r, "SSE line longer than %d bytes", BENCH_MAX_LINE);
                    s->failed = 1;
                    return;
                }
                s->line = q;
                s->cap = cap;
            }
            s->line[s->len++] = p[i];
            continue;
        }
        if (s->len && s->line[s->len - 1] == '\r') s->len--;
        if (s->len == 0) continue; /* blank line ends an event; nothing to do */
        s->line[s->len] = 0;
        s->len = 0;
        if (strncmp(s->line, "data:", 5) != 0) continue; /* comments, event:, id: */
        const char *d = s->line + 5;
        if (*d == ' ') d++;
        if (s->got_done) {
            req_fail(s->r, "data after [DONE]");
            s->failed = 1;
            return;
        }
        stream_event(s, d);
    }
}

/* ------------------------------------------------------------------ */
/* Sockets                                                              */

static int sock_connect(const struct sockaddr_in *addr, int idle_s, char *why, size_t why_n) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        snprintf(why, why_n, "socket: %s", strerror(errno));
        return -1;
    }
    struct timeval tv = {.tv_sec = idle_s};
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    /* Belt and braces: the address was checked by bench_url_parse. */
    if ((ntohl(addr->sin_addr.s_addr) >> 24) != 127) {
        snprintf(why, why_n, "refusing non-loopback address");
        close(fd);
        return -1;
    }
    if (connect(fd, (const struct sockaddr *)addr, sizeof *addr) < 0) {
        snprintf(why, why_n, "connect: %s", strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

static int send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Parse the status line and the headers we care about. */
static int parse_head(const char *h, int *status, int *chunked, long long *clen) {
    int major, minor;
    if (sscanf(h, "HTTP/%d.%d %d", &major, &minor, status) != 3) return -1;
    *chunked = 0;
    *clen = -1;
    for (const char *l = strstr(h, "\r\n"); l && l[2]; l = strstr(l + 2, "\r\n")) {
        const char *f = l + 2;
        if (!strncasecmp(f, "Transfer-Encoding:", 18)) {
            const char *v = f + 18, *e = strstr(v, "\r\n");
            for (; v + 7 <= e; v++)
                if (!strncasecmp(v, "chunked", 7)) *chunked = 1;
        } else if (!strncasecmp(f, "Content-Length:", 15)) {
            *clen = strtoll(f + 15, NULL, 10);
        }
    }
    return 0;
}

/*
 * One HTTP exchange on a fresh connection. For status 200 the body goes to
 * the SSE parser s (if s != NULL); otherwise up to errbuf_n-1 bytes of it are
 * kept in errbuf. Returns the status, or -1 with why filled.
 */
static int http_exchange(const bench_cfg *cfg, const char *req, size_t req_len, bench_stream *s,
                         char *errbuf, size_t errbuf_n, char *why, size_t why_n) {
    int fd = sock_connect(&cfg->addr, cfg->idle_s, why, why_n);
    if (fd < 0) return -1;
    int status = -1, chunked = 0, in_body = 0;
    long long clen = -1, got = 0;
    size_t hlen = 0, elen = 0;
    char *head = malloc(BENCH_MAX_HEADER + 1), *buf = malloc(16384), *dec = malloc(16384);
    bench_chunked ch = {0};
    if (errbuf_n) errbuf[0] = 0;
    if (!head || !buf || !dec) {
        snprintf(why, why_n, "out of memory");
        goto fail;
    }
    if (send_all(fd, req, req_len)) {
        snprintf(why, why_n, "send: %s", strerror(errno));
        goto fail;
    }
    for (;;) {
        /* wait at most --idle-timeout for data, and never past the run deadline */
        double left = cfg->deadline - kp_now();
        struct pollfd pfd = {.fd = fd, .events = POLLIN};
        int pr = left > 0 ? poll(&pfd, 1, (int)(KP_MIN(left, (double)cfg->idle_s) * 1000) + 1) : 0;
        if (pr < 0 && errno == EINTR) continue;
        if (pr == 0) {
            if (kp_now() >= cfg->deadline) snprintf(why, why_n, "run deadline (--max-time) reached");
            else snprintf(why, why_n, "no data from the server for %d s (--idle-timeout)", cfg->idle_s);
            goto fail;
        }
        ssize_t k = recv(fd, buf, 16384, 0);
        if (k < 0 && errno == EINTR) continue;
        if (k < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                snprintf(why, why_n, "recv: no data for %d s (--idle-timeout)", cfg->idle_s);
            else snprintf(why, why_n, "recv: %s", strerror(errno));
            goto fail;
        }
        if (k == 0) { /* EOF */
            if (!in_body) {
                snprintf(why, why_n, "connection closed before the response headers");
                goto fail;
            }
            if (chunked && !ch.done) {
                snprintf(why, why_n, "connection closed inside a chunked body");
                goto fail;
            }
            if (clen >= 0 && got < clen) {
                snprintf(why, why_n, "connection closed after %lld of %lld body bytes", got, clen);
                goto fail;
            }
            break;
        }
        const char *p = buf;
        size_t n = (size_t)k;
        if (!in_body) {
            size_t take = n;
            if (hlen + take > BENCH_MAX_HEADER) take = BENCH_MAX_HEADER - hlen;
            memcpy(head + hlen, buf, take);
            head[hlen + take] = 0;
            char *eoh = strstr(head, "\r\n\r\n");
            if (!eoh) {
                hlen += take;
                if (hlen >= BENCH_MAX_HEADER) {
                    snprintf(why, why_n, "response headers larger than %d bytes", BENCH_MAX_HEADER);
                    goto fail;
                }
                continue;
            }
            size_t body_off = (size_t)(eoh + 4 - head) - hlen; /* offset inside buf */
            eoh[2] = 0;
            if (parse_head(head, &status, &chunked, &clen)) {
                snprintf(why, why_n, "malformed HTTP status line");
                goto fail;
            }
            in_body = 1;
            p = buf + body_off;
            n -= body_off;
        }
        /* body bytes p[0..n) */
        const char *payload = p;
        size_t pn = n;
        if (chunked) {
            kp_err e = {0};
            long d = bench_chunked_feed(&ch, p, n, dec, &e);
            if (d < 0) {
                snprintf(why, why_n, "%.150s", e.msg);
                goto fail;
            }
            payload = dec;
            pn = (size_t)d;
        } else if (clen >= 0 && got + (long long)pn > clen) {
            pn = (size_t)(clen - got);
        }
        got += (long long)pn;
        if (status == 200 && s) {
            stream_bytes(s, payload, pn);
            if (s->failed) break;
        } else if (elen + 1 < errbuf_n) {
            size_t c = KP_MIN(pn, errbuf_n - 1 - elen);
            memcpy(errbuf + elen, payload, c);
            errbuf[elen += c] = 0;
        }
        if ((chunked && ch.done) || (!chunked && clen >= 0 && got >= clen)) break;
    }
    free(head);
    free(buf);
    free(dec);
    close(fd);
    return status;
fail:
    free(head);
    free(buf);
    free(dec);
    close(fd);
    return -1;
}

/* GET path; returns the status or -1. */
static int http_get_status(const bench_cfg *cfg, const char *path) {
    char req[512], why[160], body[64];
    int n = snprintf(req, sizeof req, "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: close\r\n\r\n",
                     path, cfg->url.host, cfg->url.port);
    return http_exchange(cfg, req, (size_t)n, NULL, body, sizeof body, why, sizeof why);
}

/* ------------------------------------------------------------------ */
/* Prompts and requests                                                */

static const char bench_builtin_text[] =
    "Once upon a time, there was a little girl named Lily. She loved to play in the park "
    "with her red ball. One day, she saw a big dog under a tree. The dog was sad because "
    "it had lost its bone. Lily wanted to help, so she looked everywhere with the dog. "
    "At last they found the bone near the pond, and the dog wagged its tail. Lily and the "
    "dog became best friends and played together every day in the warm sun.\n";

/* Prompt i: about target_chars bytes of the source text, starting at a
 * request-dependent word, wrapping around; cut at a space. malloc'd. */
static char *make_prompt(const bench_cfg *cfg, long i, size_t target_chars) {
    const char *t = cfg->text;
    size_t L = cfg->text_len;
    if (target_chars < 1) target_chars = 1;
    char *p = malloc(target_chars + 64);
    if (!p) return NULL;
    size_t pos = (size_t)((unsigned long long)i * 104729ull % L);
    while (pos > 0 && t[pos - 1] != ' ' && t[pos - 1] != '\n') pos--; /* start of a word */
    size_t n = 0;
    while (n < target_chars) {
        char c = t[pos];
        p[n++] = c == '\n' || c == '\r' || c == '\t' ? ' ' : c;
        pos = (pos + 1) % L;
    }
    /* finish the current word (bounded), never cutting a UTF-8 sequence */
    for (int k = 0; k < 48 && t[pos] != ' ' && t[pos] != '\n'; k++) {
        p[n++] = t[pos];
        pos = (pos + 1) % L;
    }
    while (n > 0 && ((unsigned char)p[n - 1] & 0xC0) == 0x80) n--; /* drop a partial char */
    if (n > 0 && (unsigned char)p[n - 1] >= 0xC0) n--;
    p[n] = 0;
    return p;
}

/* The full HTTP request for a prompt; malloc'd, *len set. */
static char *make_request(const bench_cfg *cfg, const char *prompt, size_t *len) {
    json_t *msg = json_pack("{s:s, s:s}", "role", "user", "content", prompt);
    if (!msg) msg = json_pack("{s:s, s:s}", "role", "user", "content", "Once upon a time");
    const char *name = cfg->model ? strrchr(cfg->model, '/') : NULL;
    name = name ? name + 1 : cfg->model ? cfg->model : "default";
    json_t *body = json_pack("{s:s, s:[o], s:b, s:{s:b}, s:i, s:f}", "model", name,
                             "messages", msg, "stream", 1,
                             "stream_options", "include_usage", 1, "max_tokens", cfg->max_tokens,
                             "temperature", cfg->temp);
    char *js = body ? json_dumps(body, JSON_COMPACT) : NULL;
    json_decref(body);
    if (!js) return NULL;
    size_t bl = strlen(js);
    size_t cap = bl + strlen(cfg->url.path) + 256;
    char *req = malloc(cap);
    if (req) {
        int h = snprintf(req, cap,
                         "POST %s HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
                         "Accept: text/event-stream\r\nConnection: close\r\nContent-Length: %zu\r\n\r\n",
                         cfg->url.path, cfg->url.host, cfg->url.port, bl);
        memcpy(req + h, js, bl);
        *len = (size_t)h + bl;
    }
    free(js);
    return req;
}

/* Send request i and fill r. */
static void run_request(const bench_cfg *cfg, long i, bench_req *r) {
    memset(r, 0, sizeof *r);
    r->ttft = -1;
    r->n_prompt = -1;
    r->ok = 1;
    size_t chars = (size_t)(cfg->prompt_tokens * cfg->chars_per_token + 0.5);
    char *prompt = make_prompt(cfg, i, chars);
    size_t len = 0;
    char *req = prompt ? make_request(cfg, prompt, &len) : NULL;
    free(prompt);
    if (!req) {
        req_fail(r, "out of memory building the request");
        return;
    }
    bench_stream s = {.r = r};
    char ebody[256], why[160] = "";
    s.t0 = kp_now();
    int status = http_exchange(cfg, req, len, &s, ebody, sizeof ebody, why, sizeof why);
    double t_end = kp_now();
    free(req);
    free(s.line);
    if (status < 0) req_fail(r, "%s", why);
    else if (status != 200) {
        for (char *q = ebody; *q; q++)
            if (*q == '\n' || *q == '\r') *q = ' ';
        req_fail(r, "HTTP %d: %.100s", status, ebody);
    } else if (!s.failed && !s.got_done) req_fail(r, "stream ended without data: [DONE]");
    if (!r->ok) return;
    r->e2e = t_end - s.t0;
    r->n_out = s.usage_out > 0 ? s.usage_out : s.n_deltas;
}

/* ------------------------------------------------------------------ */
/* One concurrency level                                               */

typedef struct bench_level {
    const bench_cfg *cfg;
    bench_req *reqs;       /* [n_requests] */
    atomic_long next;      /* next request index to claim */
    long base;             /* request-id offset so levels use different prompts */
} bench_level;

static void *client_thread(void *arg) {
    bench_level *lv = arg;
    for (;;) {
        long i = atomic_fetch_add(&lv->next, 1);
        if (i >= lv->cfg->n_requests) break;
        bench_req *r = &lv->reqs[i];
        if (kp_now() > lv->cfg->deadline) {
            memset(r, 0, sizeof *r);
            r->ttft = -1;
            req_fail(r, "not sent: run deadline (--max-time) reached");
            continue;
        }
        run_request(lv->cfg, lv->base + i, r);
    }
    return NULL;
}

typedef struct bench_row {
    int clients, requests, completed, errors;
    double duration, req_s, tok_s, mean_prompt, mean_out;
    double ttft_mean, ttft_p50, ttft_p90, ttft_p99;
    double tpot_mean, tpot_p50, tpot_p99, itl_p50, itl_p99, e2e_p50, e2e_p99;
} bench_row;

static int run_level(const bench_cfg *cfg, int clients, long base, bench_row *row, kp_err *err) {
    int n = cfg->n_requests;
    bench_level lv = {.cfg = cfg, .base = base};
    atomic_init(&lv.next, 0);
    lv.reqs = calloc((size_t)n, sizeof *lv.reqs);
    pthread_t *th = calloc((size_t)clients, sizeof *th);
    if (!lv.reqs || !th) {
        free(lv.reqs);
        free(th);
        return kp_errf(err, KP_ENOMEM, "bench serve: out of memory for %d requests", n);
    }
    double t0 = kp_now();
    int started = 0;
    for (; started < clients; started++)
        if (pthread_create(&th[started], NULL, client_thread, &lv)) break;
    if (started == 0) client_thread(&lv); /* cannot happen in practice; stay correct */
    for (int i = 0; i < started; i++) pthread_join(th[i], NULL);
    double dur = kp_now() - t0;
    if (started < clients)
        fprintf(stderr, "kvpark: bench serve: only %d of %d client threads started\n", started, clients);

    double *ttft = malloc(sizeof(double) * (size_t)n), *tpot = malloc(sizeof(double) * (size_t)n);
    double *e2e = malloc(sizeof(double) * (size_t)n);
    long n_itl = 0;
    for (int i = 0; i < n; i++) n_itl += lv.reqs[i].n_itl;
    double *itl = malloc(sizeof(double) * (size_t)(n_itl + 1));
    int nt = 0, np = 0, ne = 0, shown = 0;
    long ni = 0, out_tokens = 0, prompt_tokens = 0, n_prompt = 0;
    memset(row, 0, sizeof *row);
    row->clients = clients;
    row->requests = n;
    for (int i = 0; i < n; i++) {
        bench_req *r = &lv.reqs[i];
        if (!r->ok) {
            row->errors++;
            if (shown++ < 3) fprintf(stderr, "kvpark: bench serve: request failed: %s\n", r->err);
            free(r->itl);
            continue;
        }
        row->completed++;
        out_tokens += r->n_out;
        if (r->n_prompt >= 0) {
            prompt_tokens += r->n_prompt;
            n_prompt++;
        }
        if (ttft && r->ttft >= 0) ttft[nt++] = r->ttft * 1e3;
        if (tpot && r->ttft >= 0 && r->n_out > 1) tpot[np++] = (r->e2e - r->ttft) / (r->n_out - 1) * 1e3;
        if (e2e) e2e[ne++] = r->e2e * 1e3;
        for (int k = 0; itl && k < r->n_itl; k++) itl[ni++] = r->itl[k] * 1e3;
        free(r->itl);
    }
    if (row->errors > 3)
        fprintf(stderr, "kvpark: bench serve: ... and %d more failed requests\n", row->errors - 3);
    row->duration = dur;
    row->req_s = row->completed / dur;
    row->tok_s = out_tokens / dur;
    row->mean_prompt = n_prompt ? (double)prompt_tokens / n_prompt : 0;
    row->mean_out = row->completed ? (double)out_tokens / row->completed : 0;
    if (ttft) {
        row->ttft_mean = mean_of(ttft, nt);
        row->ttft_p50 = bench_percentile(ttft, nt, 50);
        row->ttft_p90 = bench_percentile(ttft, nt, 90);
        row->ttft_p99 = bench_percentile(ttft, nt, 99);
    }
    if (tpot) {
        row->tpot_mean = mean_of(tpot, np);
        row->tpot_p50 = bench_percentile(tpot, np, 50);
        row->tpot_p99 = bench_percentile(tpot, np, 99);
    }
    if (itl) {
        row->itl_p50 = bench_percentile(itl, (int)ni, 50);
        row->itl_p99 = bench_percentile(itl, (int)ni, 99);
    }
    if (e2e) {
        row->e2e_p50 = bench_percentile(e2e, ne, 50);
        row->e2e_p99 = bench_percentile(e2e, ne, 99);
    }
    free(ttft);
    free(tpot);
    free(e2e);
    free(itl);
    free(lv.reqs);
    free(th);
    return 0;
}

/* ------------------------------------------------------------------ */
/* The server child                                                    */

static int free_port(void) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = 0};
    a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t al = sizeof a;
    int port = -1;
    if (!bind(fd, (struct sockaddr *)&a, sizeof a) && !getsockname(fd, (struct sockaddr *)&a, &al))
        port = ntohs(a.sin_port);
    close(fd);
    return port;
}

typedef struct bench_server {
    pid_t pid;
    char session_dir[64];
} bench_server;

static int server_start(bench_server *sv, const char *bin, const char *model_name, int parallel,
                        int port, kp_err *err) {
    snprintf(sv->session_dir, sizeof sv->session_dir, "/tmp/kvpark-bench-sessions-XXXXXX");
    if (!mkdtemp(sv->session_dir)) sv->session_dir[0] = 0;
    char port_s[16], par_s[16];
    snprintf(port_s, sizeof port_s, "%d", port);
    snprintf(par_s, sizeof par_s, "%d", parallel);
    const char *args[16];
    int na = 0;
    args[na++] = bin;
    args[na++] = "serve";
    if (model_name) {
        args[na++] = "-m";
        args[na++] = model_name;
    }
    args[na++] = "--host";
    args[na++] = "127.0.0.1";
    args[na++] = "--port";
    args[na++] = port_s;
    args[na++] = "--parallel";
    args[na++] = par_s;
    args[na++] = "--quiet";
    if (sv->session_dir[0]) {
        args[na++] = "--session-dir";
        args[na++] = sv->session_dir;
    }
    args[na] = NULL;
    fflush(stdout);
    fflush(stderr);
    pid_t ppid = getpid();
    pid_t pid = fork();
    if (pid < 0) return kp_errf(err, KP_EIO, "bench serve: fork: %s", strerror(errno));
    if (pid == 0) {
        prctl(PR_SET_PDEATHSIG, SIGTERM); /* never outlive the benchmark */
        if (getppid() != ppid) _exit(127);
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) {
            dup2(devnull, 0);
            dup2(2, 1); /* server chatter goes to stderr, keeping stdout for the table */
        }
        execv(bin, (char *const *)args);
        fprintf(stderr, "kvpark: bench serve: cannot run '%s': %s\n", bin, strerror(errno));
        _exit(127);
    }
    sv->pid = pid;
    return 0;
}

static void server_stop(bench_server *sv) {
    if (sv->pid > 0) {
        kill(sv->pid, SIGTERM);
        int st;
        double t0 = kp_now();
        while (waitpid(sv->pid, &st, WNOHANG) == 0) {
            if (kp_now() - t0 > 15) {
                fprintf(stderr, "kvpark: bench serve: server did not stop in 15 s, killing it\n");
                kill(sv->pid, SIGKILL);
                waitpid(sv->pid, &st, 0);
                break;
            }
            usleep(20000);
        }
        sv->pid = 0;
    }
    if (sv->session_dir[0]) rmdir(sv->session_dir); /* only if the server left it empty */
}

/* Poll GET /health until 200; fail if the child exits or after timeout_s. */
static int server_wait_ready(const bench_cfg *cfg, bench_server *sv, double timeout_s, kp_err *err) {
    double t0 = kp_now();
    for (;;) {
        if (sv->pid > 0) {
            int st;
            if (waitpid(sv->pid, &st, WNOHANG) == sv->pid) {
                sv->pid = 0;
                return kp_errf(err, KP_EIO, "bench serve: the server exited (%s %d) before it was ready",
                               WIFEXITED(st) ? "status" : "signal",
                               WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
            }
        }
        if (http_get_status(cfg, "/health") == 200) return 0;
        if (kp_now() - t0 > timeout_s)
            return kp_errf(err, KP_EIO, "bench serve: %s:%d/health not 200 after %.0f s",
                           cfg->url.host, cfg->url.port, timeout_s);
        usleep(100000);
    }
}

/* ------------------------------------------------------------------ */
/* Output                                                              */

static int mkdir_parent(const char *path) {
    char dir[1024];
    snprintf(dir, sizeof dir, "%s", path);
    for (char *p = dir + 1; *p; p++) {
        if (*p != '/') continue;
        *p = 0;
        mkdir(dir, 0755);
        *p = '/';
    }
    return 0;
}

static void write_csv_row(FILE *f, const char *model_name, const bench_row *r) {
    fprintf(f, "%s,%d,%d,%d,%d,%.3f,%.3f,%.1f,%.1f,%.1f,%.2f,%.2f,%.2f,%.2f,%.3f,%.3f,%.3f,%.3f,%.3f,"
               "%.2f,%.2f\n",
            model_name, r->clients, r->requests, r->completed, r->errors, r->duration, r->req_s, r->tok_s,
            r->mean_prompt, r->mean_out, r->ttft_mean, r->ttft_p50, r->ttft_p90, r->ttft_p99,
            r->tpot_mean, r->tpot_p50, r->tpot_p99, r->itl_p50, r->itl_p99, r->e2e_p50, r->e2e_p99);
    fflush(f);
}

typedef struct serve_plot {
    const char *png, *csv, *model;
} serve_plot;

/* columns: 2 clients, 8 output_tok_s, 12 ttft_p50_ms, 14 ttft_p99_ms */
static void serve_plot_script(FILE *f, const char *term, void *ud) {
    const serve_plot *p = ud;
    fprintf(f,
            "set terminal %s size 1200,450\n"
            "set output '%s'\n"
            "set datafile separator ','\n"
            "set multiplot layout 1,2 title 'kvpark bench serve: %s'\n"
            "set logscale x 2\nset yrange [0:*]\nset grid\nset key top left\n"
            "set xlabel 'concurrent clients'\nset ylabel 'TTFT (ms)'\n"
            "plot '%s' skip 1 using 2:12 with linespoints title 'TTFT p50', "
            "'' skip 1 using 2:14 with linespoints title 'TTFT p99'\n"
            "set ylabel 'output tokens/s'\n"
            "plot '%s' skip 1 using 2:8 with linespoints title 'output tok/s'\n"
            "unset multiplot\n",
            term, p->png, p->model, p->csv, p->csv);
}

/* TTFT p50/p99 and output tok/s vs clients, from the CSV: FILE.png next to it. */
static void write_plot(const char *csv, const char *model_name) {
    if (!plot_available()) {
        fprintf(stderr, "kvpark: bench serve: %s not found, skipping --plot\n", PLOT_GNUPLOT);
        return;
    }
    if (!plot_quotable(csv) || !plot_quotable(model_name)) {
        fprintf(stderr, "kvpark: bench serve: quote characters in the CSV path or model name, "
                        "skipping --plot\n");
        return;
    }
    char png[1100], gp[1100];
    plot_sibling(csv, ".csv", ".png", png, sizeof png);
    plot_sibling(csv, ".csv", ".gp", gp, sizeof gp);
    serve_plot p = {.png = png, .csv = csv, .model = model_name};
    kp_err err = {0};
    if (plot_draw(gp, serve_plot_script, &p, &err) == 0) fprintf(stderr, "kvpark: wrote %s\n", png);
    else fprintf(stderr, "kvpark: bench serve: %s\n", err.msg);
}

/* ------------------------------------------------------------------ */
/* Options and main                                                    */

static const char bench_serve_help[] =
    "usage: kvpark bench serve [-m MODEL | --url http://127.0.0.1:PORT] [options]\n"
    "Load generator for `kvpark serve`, like vLLM's benchmark_serving: for each\n"
    "concurrency level, that many clients stream chat completions until --requests\n"
    "are done; prints TTFT/TPOT/throughput and writes a CSV.\n"
    "  -m, --model PATH        model (for the server it starts; also sent as \"model\")\n"
    "      --url URL           use a running server (127.0.0.0/8 or localhost only);\n"
    "                          without it, `kvpark serve` is started on a free port\n"
    "      --parallel N        --parallel of the server it starts (default 4)\n"
    "      --server-bin PATH   kvpark binary to start (default: this program)\n"
    "      --clients LIST      concurrency levels (default 1,8,32)\n"
    "  -n, --requests N        requests per level (default 64, at least the clients)\n"
    "      --max-tokens N      max_tokens per request (default 64)\n"
    "      --prompt-tokens N   approximate prompt length in tokens (default 128)\n"
    "  -f, --file FILE         take prompts from this text (default: built-in story)\n"
    "      --temp T            temperature (default 0)\n"
    "      --csv FILE          CSV output (default bench-out/serve.csv)\n"
    "      --plot              also write FILE.png with gnuplot (TTFT and tok/s vs clients)\n"
    "      --max-time S        stop everything after S seconds (default 900)\n"
    "      --idle-timeout S    a request that gets no data for S seconds fails (default 30;\n"
    "                          raise it for a slow server or a long prompt)\n"
    "Exit status: 0, 1 on failure or if any request failed, 2 on bad usage.\n";

enum { OPT_URL = 256, OPT_CLIENTS, OPT_MAXTOK, OPT_PTOK, OPT_TEMP, OPT_CSV, OPT_PLOT, OPT_PAR,
       OPT_BIN, OPT_MAXTIME, OPT_IDLE };

static int bad_usage(const char *msg, const char *arg) {
    fprintf(stderr, "kvpark bench serve: %s%s%s (see 'kvpark bench serve --help')\n", msg,
            arg ? ": " : "", arg ? arg : "");
    return 2;
}

static char *read_text_file(const char *path, size_t *len, kp_err *err) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        kp_errf(err, KP_EIO, "bench serve: cannot open '%s': %s", path, strerror(errno));
        return NULL;
    }
    size_t cap = 1 << 16, n = 0, max = (size_t)64 << 20;
    char *buf = malloc(cap);
    while (buf) {
        if (n == cap) {
            if (cap >= max) break; /* 64 MiB of text is plenty */
            char *p = realloc(buf, cap * 2);
            if (!p) break;
            buf = p;
            cap *= 2;
        }
        size_t k = fread(buf + n, 1, cap - n, f);
        if (k == 0) break;
        n += k;
    }
    fclose(f);
    if (!buf) {
        kp_errf(err, KP_ENOMEM, "bench serve: out of memory reading '%s'", path);
        return NULL;
    }
    /* the prompt builder wants no NUL bytes */
    for (size_t i = 0; i < n; i++)
        if (buf[i] == 0) buf[i] = ' ';
    if (n < 16) {
        free(buf);
        kp_errf(err, KP_EINVAL, "bench serve: '%s' has too little text for prompts", path);
        return NULL;
    }
    *len = n;
    return buf;
}

int bench_serve_main(int argc, char **argv) {
    bench_cfg cfg = {.n_requests = 64, .max_tokens = 64, .prompt_tokens = 128,
                     .chars_per_token = 4.0, .temp = 0, .idle_s = BENCH_IDLE_DEFAULT_S};
    const char *url = NULL, *file = NULL, *csv = "bench-out/serve.csv", *bin = NULL;
    const char *clients = "1,8,32";
    long parallel = 4, max_time = 900, v;
    double dv;
    int plot = 0;
    static const struct option lo[] = {
        {"model", required_argument, 0, 'm'},       {"url", required_argument, 0, OPT_URL},
        {"clients", required_argument, 0, OPT_CLIENTS}, {"requests", required_argument, 0, 'n'},
        {"max-tokens", required_argument, 0, OPT_MAXTOK},
        {"prompt-tokens", required_argument, 0, OPT_PTOK}, {"file", required_argument, 0, 'f'},
        {"temp", required_argument, 0, OPT_TEMP},   {"csv", required_argument, 0, OPT_CSV},
        {"plot", no_argument, 0, OPT_PLOT},         {"parallel", required_argument, 0, OPT_PAR},
        {"server-bin", required_argument, 0, OPT_BIN},
        {"max-time", required_argument, 0, OPT_MAXTIME}, {"idle-timeout", required_argument, 0, OPT_IDLE},
        {"help", no_argument, 0, 'h'},
        {0, 0, 0, 0}};
    int c;
    optind = 1;
    while ((c = getopt_long(argc, argv, "m:n:f:h", lo, NULL)) != -1) {
        switch (c) {
        case 'm': cfg.model = optarg; break;
        case OPT_URL: url = optarg; break;
        case OPT_CLIENTS: clients = optarg; break;
        case 'n':
            if (cli_parse_long(optarg, 1, 1000000, &v)) return bad_usage("bad --requests", optarg);
            cfg.n_requests = (int)v;
            break;
        case OPT_MAXTOK:
            if (cli_parse_long(optarg, 1, 1 << 20, &v)) return bad_usage("bad --max-tokens", optarg);
            cfg.max_tokens = (int)v;
            break;
        case OPT_PTOK:
            if (cli_parse_long(optarg, 1, 1 << 20, &v)) return bad_usage("bad --prompt-tokens", optarg);
            cfg.prompt_tokens = (int)v;
            break;
        case 'f': file = optarg; break;
        case OPT_TEMP:
            if (cli_parse_float(optarg, 0, 100, &dv)) return bad_usage("bad --temp", optarg);
            cfg.temp = dv;
            break;
        case OPT_CSV: csv = optarg; break;
        case OPT_PLOT: plot = 1; break;
        case OPT_PAR:
            if (cli_parse_long(optarg, 1, 1024, &parallel)) return bad_usage("bad --parallel", optarg);
            break;
        case OPT_BIN: bin = optarg; break;
        case OPT_MAXTIME:
            if (cli_parse_long(optarg, 1, 7 * 86400, &max_time)) return bad_usage("bad --max-time", optarg);
            break;
        case OPT_IDLE:
            if (cli_parse_long(optarg, 1, 7 * 86400, &v)) return bad_usage("bad --idle-timeout", optarg);
            cfg.idle_s = (int)v;
            break;
        case 'h': fputs(bench_serve_help, stdout); return 0;
        default: return bad_usage("unknown option", NULL);
        }
    }
    if (optind < argc) return bad_usage("unexpected argument", argv[optind]);

    /* concurrency levels */
    char buf[256];
    snprintf(buf, sizeof buf, "%s", clients);
    for (char *save = NULL, *tok = strtok_r(buf, ",", &save); tok; tok = strtok_r(NULL, ",", &save)) {
        if (cfg.n_levels == BENCH_MAX_LEVELS) return bad_usage("too many --clients levels (max 16)", NULL);
        if (cli_parse_long(tok, 1, BENCH_MAX_CLIENTS, &v)) return bad_usage("bad --clients value (1..1024)", tok);
        cfg.levels[cfg.n_levels++] = (int)v;
    }
    if (cfg.n_levels == 0) return bad_usage("empty --clients", NULL);

    kp_err err = {0};
    char *text_owned = NULL;
    if (file) {
        if (!(text_owned = read_text_file(file, &cfg.text_len, &err))) {
            fprintf(stderr, "kvpark: %s\n", err.msg);
            return 1;
        }
        cfg.text = text_owned;
    } else {
        cfg.text = bench_builtin_text;
        cfg.text_len = sizeof bench_builtin_text - 1;
    }

    bench_server sv = {0};
    int rc = 0, any_err = 0;
    FILE *out = NULL;
    char exe[1024];
    cfg.deadline = kp_now() + (double)max_time;
    if (url) {
        if ((rc = bench_url_parse(url, &cfg.url, &err))) goto done;
    } else {
        if (!bin) {
            ssize_t k = readlink("/proc/self/exe", exe, sizeof exe - 1);
            if (k <= 0) {
                rc = kp_errf(&err, KP_EIO, "bench serve: cannot find this program (/proc/self/exe); "
                                           "pass --server-bin or --url");
                goto done;
            }
            exe[k] = 0;
            bin = exe;
        }
        int port = free_port();
        if (port <= 0) {
            rc = kp_errf(&err, KP_EIO, "bench serve: no free loopback port: %s", strerror(errno));
            goto done;
        }
        snprintf(buf, sizeof buf, "http://127.0.0.1:%d", port);
        if ((rc = bench_url_parse(buf, &cfg.url, &err))) goto done;
    }
    cfg.addr.sin_family = AF_INET;
    cfg.addr.sin_port = htons((uint16_t)cfg.url.port);
    inet_pton(AF_INET, cfg.url.host, &cfg.addr.sin_addr);

    /* CSV first, so a bad path fails before minutes of benchmarking */
    mkdir_parent(csv);
    if (!(out = fopen(csv, "w"))) {
        rc = kp_errf(&err, KP_EIO, "bench serve: cannot write '%s': %s", csv, strerror(errno));
        goto done;
    }
    fprintf(out, "model,clients,requests,completed,errors,duration_s,req_s,output_tok_s,"
                 "mean_prompt_tokens,mean_output_tokens,ttft_mean_ms,ttft_p50_ms,ttft_p90_ms,"
                 "ttft_p99_ms,tpot_mean_ms,tpot_p50_ms,tpot_p99_ms,itl_p50_ms,itl_p99_ms,"
                 "e2e_p50_ms,e2e_p99_ms\n");

    if (!url) {
        fprintf(stderr, "kvpark: bench serve: starting %s serve on %s:%d (--parallel %ld)\n", bin,
                cfg.url.host, cfg.url.port, parallel);
        if ((rc = server_start(&sv, bin, cfg.model, (int)parallel, cfg.url.port, &err))) goto done;
        if ((rc = server_wait_ready(&cfg, &sv, KP_MIN(120.0, (double)max_time), &err))) goto done;
    } else if (http_get_status(&cfg, "/health") != 200) {
        fprintf(stderr, "kvpark: bench serve: warning: %s:%d/health is not 200\n", cfg.url.host,
                cfg.url.port);
    }

    /* Warm-up (not counted): checks the setup and measures characters per
     * prompt token, so --prompt-tokens is close for any tokenizer. */
    {
        bench_req w;
        size_t probe_chars = 400;
        cfg.chars_per_token = 1.0;
        int saved = cfg.prompt_tokens;
        cfg.prompt_tokens = (int)probe_chars;
        run_request(&cfg, 0, &w);
        cfg.prompt_tokens = saved;
        free(w.itl);
        if (!w.ok) {
            rc = kp_errf(&err, KP_EIO, "bench serve: warm-up request failed: %s", w.err);
            goto done;
        }
        cfg.chars_per_token = w.n_prompt > 0 ? (double)probe_chars / w.n_prompt : 4.0;
        if (cfg.chars_per_token < 1) cfg.chars_per_token = 1;
    }

    const char *mname = cfg.model ? strrchr(cfg.model, '/') : NULL;
    mname = mname ? mname + 1 : cfg.model ? cfg.model : "server";
    printf("| clients | requests | req/s | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | errors |\n"
           "|---|---|---|---|---|---|---|---|\n");
    fflush(stdout);
    double mean_prompt = 0;
    int n_rows = 0;
    for (int li = 0; li < cfg.n_levels; li++) {
        int cl = cfg.levels[li];
        bench_cfg lc = cfg;
        if (lc.n_requests < cl) lc.n_requests = cl;
        if (kp_now() > cfg.deadline) {
            fprintf(stderr, "kvpark: bench serve: --max-time reached, skipping the remaining levels\n");
            any_err = 1;
            break;
        }
        bench_row row;
        if ((rc = run_level(&lc, cl, 1 + (long)li * 1000003L, &row, &err))) goto done;
        printf("| %d | %d | %.2f | %.1f | %.1f | %.1f | %.2f | %d |\n", row.clients, row.requests,
               row.req_s, row.tok_s, row.ttft_p50, row.ttft_p99, row.tpot_p50, row.errors);
        fflush(stdout);
        write_csv_row(out, mname, &row);
        if (row.errors) any_err = 1;
        mean_prompt += row.mean_prompt;
        n_rows++;
    }
    if (n_rows)
        printf("\nprompt ~%.0f tokens (server-counted; asked %d), max_tokens %d, temperature %g\n",
               mean_prompt / n_rows, cfg.prompt_tokens, cfg.max_tokens, cfg.temp);
    fclose(out);
    out = NULL;
    fprintf(stderr, "kvpark: wrote %s\n", csv);
    if (plot) write_plot(csv, mname);

done:
    if (out) fclose(out);
    server_stop(&sv);
    free(text_owned);
    if (rc) {
        fprintf(stderr, "kvpark: %s\n", err.msg[0] ? err.msg : kp_strerror(rc));
        return 1;
    }
    if (any_err) {
        fprintf(stderr, "kvpark: bench serve: some requests failed (see the errors column)\n");
        return 1;
    }
    return 0;
}
