/*
 * kp.h — the few things every kvpark module shares: error codes and the error
 * message carrier.
 *
 * Contract
 *   - Every fallible function returns 0 on success or a negative KP_E* code.
 *   - Functions that can fail for a reason a user can act on take a `kp_err *`
 *     (may be NULL) and fill it with one line of text saying what was wrong and,
 *     where possible, what to do ("gguf: tensor 'blk.0.attn_q.weight': data
 *     offset 123456 + size 4096 is past the end of the file (100000 bytes);
 *     the file is truncated").
 *   - kp_errf() formats the message and returns the code, so error paths read
 *       return kp_errf(err, KP_EFORMAT, "gguf: bad magic %08x", magic);
 *   - No global mutable state lives here.
 */
#ifndef KP_H
#define KP_H

#include <stddef.h>
#include <stdint.h>

enum {
    KP_OK = 0,
    KP_EINVAL = -1,    /* bad argument or option value                        */
    KP_ENOMEM = -2,    /* allocation failed                                   */
    KP_EIO = -3,       /* read/write/mmap/open failed (errno in the message)  */
    KP_EFORMAT = -4,   /* a file or stream is malformed, truncated or corrupt */
    KP_EUNSUP = -5,    /* well-formed but not supported (type, arch, version) */
    KP_ENOTFOUND = -6, /* a key, tensor, token, session or file is missing    */
    KP_ERANGE = -7,    /* a value is out of range (context overflow, ...)     */
    KP_EMISMATCH = -8, /* data made for another model / codec                 */
    KP_EBUSY = -9,     /* queue full, resource in use                         */
    KP_ECANCELED = -10,
};

#define KP_ERR_MAX 512

typedef struct kp_err {
    int code;
    char msg[KP_ERR_MAX];
} kp_err;

/* Format a message into *err (if err != NULL) and return code. */
int kp_errf(kp_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A short, static name for a code: "invalid argument", "bad format", ... */
const char *kp_strerror(int code);

/* Monotonic wall clock in seconds. */
double kp_now(void);

#define KP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define KP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KP_MAX(a, b) ((a) > (b) ? (a) : (b))

#endif
