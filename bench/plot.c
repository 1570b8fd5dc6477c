/*
 * plot.c — run gnuplot for the benchmarks (contract in plot.h).
 *
 * gnuplot is a separate program, not a library: fork + execl with stdin on
 * /dev/null (a script that waits for input must not hang a benchmark), and
 * the exit status says whether the PNG was written. The script is a file,
 * not a pipe, so a failed plot leaves something to rerun and debug.
 */
#include "bench/plot.h"

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

bool plot_available(void) { return access(PLOT_GNUPLOT, X_OK) == 0; }

bool plot_quotable(const char *s) { return !strpbrk(s, "'\"\\\n"); }

void plot_sibling(const char *path, const char *ext, const char *new_ext, char *out, size_t cap) {
    size_t l = strlen(path), e = strlen(ext);
    if (l > e && !strcmp(path + l - e, ext)) l -= e;
    snprintf(out, cap, "%.*s%s", (int)l, path, new_ext);
}

int plot_run(const char *script) {
    pid_t pid = fork();
    if (pid < 0) return -1;
    if (pid == 0) {
        int devnull = open("/dev/null", O_RDWR);
        if (devnull >= 0) dup2(devnull, 0);
        execl(PLOT_GNUPLOT, "gnuplot", script, (char *)NULL);
        _exit(127);
    }
    int st;
    if (waitpid(pid, &st, 0) != pid) return -1;
    return WIFEXITED(st) && WEXITSTATUS(st) == 0 ? 0 : -1;
}

int plot_draw(const char *gp, plot_script_fn script, void *ud, kp_err *err) {
    static const char *const terms[] = {"pngcairo", "png"};
    for (size_t i = 0; i < KP_ARRAY_LEN(terms); i++) {
        FILE *f = fopen(gp, "w");
        if (!f) return kp_errf(err, KP_EIO, "cannot write '%s': %s", gp, strerror(errno));
        script(f, terms[i], ud);
        fclose(f);
        if (plot_run(gp) == 0) return 0;
    }
    return kp_errf(err, KP_EIO, "gnuplot failed (script left in %s)", gp);
}
