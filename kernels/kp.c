/*
 * kp.c — error formatting, the error table's names and messages, and the
 * clock (see kp.h).
 */
#define _POSIX_C_SOURCE 200809L
#include "kernels/kp.h"

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
#define KP_STRERROR_CASE(name, value, msg) case KP_##name: return msg;
    KP_ERRNO_MAP(KP_STRERROR_CASE)
#undef KP_STRERROR_CASE
    default: return "unknown error";
    }
}

const char *kp_err_name(int code) {
    switch (code) {
    case KP_OK: return "KP_OK";
#define KP_ERR_NAME_CASE(name, value, msg) case KP_##name: return "KP_" #name;
    KP_ERRNO_MAP(KP_ERR_NAME_CASE)
#undef KP_ERR_NAME_CASE
    default: return "KP_EUNKNOWN";
    }
}

double kp_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}
