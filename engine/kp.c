/*
 * kp.c — error formatting and the clock (see kp.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "kp.h"

#include <stdarg.h>
#include <stdio.h>
#include <time.h>

int kp_errf(kp_err *err, int code, const char *fmt, ...) {
    if (err) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(err->msg, sizeof err->msg, fmt, ap);
        va_end(ap);
        err->code = code;
    }
    return code;
}

const char *kp_strerror(int code) {
    switch (code) {
    case KP_OK: return "ok";
    case KP_EINVAL: return "invalid argument";
    case KP_ENOMEM: return "out of memory";
    case KP_EIO: return "I/O error";
    case KP_EFORMAT: return "malformed data";
    case KP_EUNSUP: return "not supported";
    case KP_ENOTFOUND: return "not found";
    case KP_ERANGE: return "out of range";
    case KP_EMISMATCH: return "mismatch";
    case KP_EBUSY: return "busy";
    case KP_ECANCELED: return "canceled";
    default: return "unknown error";
    }
}

double kp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
