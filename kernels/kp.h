/*
 * kp.h — the base every kvpark layer stands on: error codes with their names
 * and messages (one table), the error message carrier, the clock, and the
 * little-endian field accessors of every on-disk format.
 *
 * It lives in kernels/, the bottom layer, so that every layer may include it
 * ("kernels/kp.h") while looking only down; it depends on nothing but libc.
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
 *   - kp_err_name() gives the code's name ("KP_EFORMAT"), kp_strerror() its
 *     short message ("malformed data"); both come from KP_ERRNO_MAP below, the
 *     one place a code is defined (as libuv's UV_ERRNO_MAP).
 *   - No global mutable state lives here.
 */
#ifndef KP_H
#define KP_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

/* XX(NAME, value, message): every error code, once. */
#define KP_ERRNO_MAP(XX)                                                                            \
    XX(EINVAL, -1, "invalid argument")  /* bad argument or option value                        */   \
    XX(ENOMEM, -2, "out of memory")     /* allocation failed                                   */   \
    XX(EIO, -3, "I/O error")            /* read/write/mmap/open failed (errno in the message)  */   \
    XX(EFORMAT, -4, "malformed data")   /* a file or stream is malformed, truncated or corrupt */   \
    XX(EUNSUP, -5, "not supported")     /* well-formed but not supported (type, arch, version) */   \
    XX(ENOTFOUND, -6, "not found")      /* a key, tensor, token, session or file is missing    */   \
    XX(ERANGE, -7, "out of range")      /* a value is out of range (context overflow, ...)     */   \
    XX(EMISMATCH, -8, "mismatch")       /* data made for another model / codec                 */   \
    XX(EBUSY, -9, "busy")               /* queue full, resource in use                         */   \
    XX(ECANCELED, -10, "canceled")      /* shut down or abandoned before it finished           */   \
    XX(ENOSPC, -11, "no space left")    /* disk full, quota or file-size limit (HTTP 507)      */   \
    XX(EUNAVAIL, -12, "unavailable")    /* a peer (the remote tier) cannot be reached now (503) */   \
    XX(ELOST, -13, "KV lost")           /* a stored session's KV is gone, its token ids remain:    \
                                         * recompute the KV from them (a re-prefill)            */

enum {
    KP_OK = 0,
#define KP_ERRNO_ENUM(name, value, msg) KP_##name = (value),
    KP_ERRNO_MAP(KP_ERRNO_ENUM)
#undef KP_ERRNO_ENUM
};

#define KP_ERR_MAX 512

typedef struct kp_err {
    int code;
    char msg[KP_ERR_MAX];
} kp_err;

/* Format a message into *err (if err != NULL) and return code. */
int kp_errf(kp_err *err, int code, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* A short, static message for a code: "invalid argument", "malformed data", ...
 * ("ok" for 0, "unknown error" for a code not in the table). */
const char *kp_strerror(int code);

/* The code's name: "KP_EINVAL", ... ("KP_OK" for 0, "KP_EUNKNOWN" otherwise). */
const char *kp_err_name(int code);

/* Monotonic wall clock in seconds. */
double kp_now(void);

#define KP_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define KP_MIN(a, b) ((a) < (b) ? (a) : (b))
#define KP_MAX(a, b) ((a) > (b) ? (a) : (b))

/* Little-endian fields of the on-disk formats (codec chunks, codec files,
 * sampler state, blobs, cas objects, park objects and manifests, session
 * records): byte by byte, so they are right on any host and never read
 * unaligned. */
static inline void kp_put_u16(uint8_t *p, uint16_t v) {
    p[0] = (uint8_t)v;
    p[1] = (uint8_t)(v >> 8);
}
static inline void kp_put_u32(uint8_t *p, uint32_t v) {
    for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline void kp_put_u64(uint8_t *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static inline uint16_t kp_get_u16(const uint8_t *p) { return (uint16_t)(p[0] | (p[1] << 8)); }
static inline uint32_t kp_get_u32(const uint8_t *p) {
    uint32_t v = 0;
    for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
static inline uint64_t kp_get_u64(const uint8_t *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
    return v;
}
/* A float as the little-endian bits of its IEEE-754 binary32 value. */
static inline void kp_put_f32(uint8_t *p, float f) {
    uint32_t v;
    memcpy(&v, &f, 4);
    kp_put_u32(p, v);
}
static inline float kp_get_f32(const uint8_t *p) {
    uint32_t v = kp_get_u32(p);
    float f;
    memcpy(&f, &v, 4);
    return f;
}

#endif
