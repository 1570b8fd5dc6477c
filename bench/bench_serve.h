/*
 * bench_serve.h — `kvpark bench serve`: a load generator for the HTTP server,
 * measuring it the way vLLM's benchmark_serving does (TTFT, TPOT, inter-token
 * latency, request and output-token throughput at several concurrency levels).
 *
 * Why it exists: engine speed (bench engine) says little about what a client
 * sees once continuous batching, HTTP and SSE streaming are involved; this tool
 * measures the whole path with plain POSIX sockets (no extra dependency).
 *
 * Contract
 *   - bench_serve_main(argc, argv), argv[0] = "serve": parses options, starts
 *     `kvpark serve` itself on a free loopback port unless --url is given,
 *     runs every concurrency level, prints a markdown table, writes a CSV (and a
 *     PNG with gnuplot on --plot), stops the server it started. Returns 0, 1 on
 *     failure or when any request failed, 2 on bad usage.
 *   - Traffic only ever goes to 127.0.0.0/8 ("localhost" means 127.0.0.1):
 *     bench_url_parse() refuses every other host. Every socket has send and
 *     receive timeouts and the whole run has a deadline (--max-time).
 *   - The helpers below are exposed for the unit test.
 */
#ifndef KP_BENCH_SERVE_H
#define KP_BENCH_SERVE_H

#include <stddef.h>

#include "kernels/kp.h"

/* A parsed http://HOST:PORT[/PATH] URL whose host is a loopback address. */
typedef struct bench_url {
    char host[64];   /* dotted IPv4, always 127.x.y.z */
    int port;        /* 1..65535 (default 80 when the URL gives none) */
    char path[256];  /* endpoint path; "/v1/chat/completions" when none given */
} bench_url;

/* Parse url; refuses (KP_EINVAL, with a message) non-http schemes, hosts that
 * are not 127.0.0.0/8 or "localhost" (no DNS lookups are done), bad ports. */
int bench_url_parse(const char *url, bench_url *u, kp_err *err);

/* Incremental decoder for HTTP/1.1 chunked transfer encoding. Zero-initialise,
 * then feed bytes as they arrive. */
typedef struct bench_chunked {
    int state;          /* internal state (0 = expecting a chunk-size line) */
    int n_digits;       /* hex digits seen in the current size line */
    unsigned long long left; /* bytes left in the current chunk / size being read */
    int done;           /* 1 once the last chunk and trailers were read */
} bench_chunked;

/* Decode n bytes of in; writes the payload bytes to out (room for n bytes) and
 * returns how many, or KP_EFORMAT on malformed framing. Bytes after the end
 * are ignored. */
long bench_chunked_feed(bench_chunked *c, const char *in, size_t n, char *out, kp_err *err);

/* The p-th percentile (0..100) of v[0..n) with linear interpolation between
 * closest ranks (numpy's default). Sorts v in place. 0 when n == 0. */
double bench_percentile(double *v, int n, double p);

/* Entry point of `kvpark bench serve ...` (argv[0] = "serve"). */
int bench_serve_main(int argc, char **argv);

#endif
