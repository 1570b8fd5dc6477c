/*
 * plot.h — the benchmarks' one way to draw a PNG: write a gnuplot script,
 * run /usr/bin/gnuplot on it, say clearly what happened.
 *
 * Why one helper: every benchmark that plots (serve, resume, codec) needs the
 * same fork/exec of gnuplot with stdin closed, the same fallback from the
 * cairo PNG terminal to the plain one (gnuplot-nox builds may lack cairo),
 * and the same rules for paths put inside a script.
 *
 * Contract
 *   - Plots are optional: a missing gnuplot is reported by the caller as a
 *     note (plot_available()), never a failure of the benchmark.
 *   - Paths and labels written into a script in single quotes must pass
 *     plot_quotable(): no quotes, backslashes or newlines.
 *   - No state; safe from any thread (fork + waitpid of its own child).
 */
#ifndef KP_BENCH_PLOT_H
#define KP_BENCH_PLOT_H

#include <stdbool.h>
#include <stddef.h>
#include <stdio.h>

#include "kernels/kp.h"

#define PLOT_GNUPLOT "/usr/bin/gnuplot"

/* true when PLOT_GNUPLOT is an executable. */
bool plot_available(void);

/* true when s can go inside a single-quoted gnuplot string as it is. */
bool plot_quotable(const char *s);

/* The file next to `path` with its extension `ext` (".csv", ".png"; kept
 * when path does not end with it) replaced by `new_ext`:
 * plot_sibling("out/serve.csv", ".csv", ".png", ...) = "out/serve.png". */
void plot_sibling(const char *path, const char *ext, const char *new_ext, char *out, size_t cap);

/* Run gnuplot on the script file (stdin /dev/null, stdout/stderr inherited):
 * 0 when it exits with status 0, -1 otherwise. */
int plot_run(const char *script);

/* Writes one version of the script to f for the PNG terminal `term`. */
typedef void (*plot_script_fn)(FILE *f, const char *term, void *ud);

/* Write the script (script(f, "pngcairo", ud)) to the file `gp` and run it;
 * when gnuplot fails, again with terminal "png". 0 on success; KP_EIO with
 * "cannot write 'GP': <why>" or "gnuplot failed (script left in GP)" in err
 * (the script stays for the user to run by hand). */
int plot_draw(const char *gp, plot_script_fn script, void *ud, kp_err *err);

#endif
