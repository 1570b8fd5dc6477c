/*
 * gguf.c — GGUF v2/v3 reader (contract in gguf.h). The v3 writer is
 * gguf_write.c; the limits, value-type table and tensor size rule both halves
 * must agree on are in gguf_impl.h.
 *
 * Why it is written this way
 *   - A model file is untrusted input: a truncated download or a crafted file
 *     must be refused with a message, never crash the server. So gguf_open()
 *     validates the whole header in one pass (every length against the bytes
 *     left, every count against the file size BEFORE allocating for it) and
 *     the accessors can then trust what they index.
 *   - The file is memory-mapped read-only: tensor data is used in place and
 *     pages are shared with the page cache (a 16 GB model costs no copy).
 *   - Keys and tensor names are found through small open-addressing hash
 *     tables, so duplicate checks stay linear even for a hostile file with
 *     millions of entries.
 *
 * File layout (all little-endian):
 *   "GGUF" u32 version, u64 n_tensors, u64 n_kv,
 *   n_kv x { string key, u32 vtype, value },
 *   n_tensors x { string name, u32 n_dims, u64 ne[n_dims], u32 type, u64 offset },
 *   padding to the alignment, data section (tensor offsets are relative to it).
 *   string = u64 length + bytes (no NUL); array = u32 elem type, u64 n, elems.
 */
#include "engine/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/gguf_impl.h"
#include "kernels/types.h"

/* Smallest possible encodings, used to refuse counts that cannot fit. */
#define GGUF_MIN_KV_BYTES 14     /* u64 len + 1 key byte + u32 type + 1 value byte */
#define GGUF_MIN_TINFO_BYTES 33  /* u64 len + 1 name byte + u32 + u64 ne + u32 + u64 */

/* ------------------------------------------------------------------------ */
/* Value helpers                                                             */
/* ------------------------------------------------------------------------ */

static bool vtype_is_int(uint32_t t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_UINT16: case GGUF_VT_INT16:
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_UINT64: case GGUF_VT_INT64:
    case GGUF_VT_BOOL:
        return true;
    default:
        return false;
    }
}

/* FNV-1a; only used for the in-memory hash tables. */
static uint64_t hash_bytes(const void *s, size_t n) {
    const uint8_t *p = s;
    uint64_t h = 1469598103934665603ull;
    for (size_t i = 0; i < n; i++) h = (h ^ p[i]) * 1099511628211ull;
    return h;
}

/* Float to int64 without undefined behaviour: truncates, saturates, NaN -> 0. */
static int64_t f2i(double v) {
    if (v != v) return 0;
    if (v >= 9223372036854775807.0) return INT64_MAX;
    if (v <= -9223372036854775808.0) return INT64_MIN;
    return (int64_t)v;
}

/* Read a packed scalar of fixed-size type t at p as int64 / double. Values of
 * u64 above INT64_MAX wrap; callers that care check first. */
static int64_t load_int(uint32_t t, const uint8_t *p) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_BOOL: return p[0];
    case GGUF_VT_INT8: return (int8_t)p[0];
    case GGUF_VT_UINT16: { uint16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_VT_INT16: { int16_t v; memcpy(&v, p, 2); return v; }
    case GGUF_VT_UINT32: { uint32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_INT32: { int32_t v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); return (int64_t)v; }
    case GGUF_VT_INT64: { int64_t v; memcpy(&v, p, 8); return v; }
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); return f2i(v); }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); return f2i(v); }
    default: return 0;
    }
}

static double load_float(uint32_t t, const uint8_t *p) {
    switch (t) {
    case GGUF_VT_FLOAT32: { float v; memcpy(&v, p, 4); return v; }
    case GGUF_VT_FLOAT64: { double v; memcpy(&v, p, 8); return v; }
    case GGUF_VT_UINT64: { uint64_t v; memcpy(&v, p, 8); return (double)v; }
    default: return (double)load_int(t, p);
    }
}


/* ------------------------------------------------------------------------ */
/* Reader                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct gguf_kv {
    char *key;             /* NUL-terminated copy */
    size_t key_len;
    uint32_t type;         /* enum gguf_vtype */
    uint32_t arr_type;     /* element type when type == ARRAY */
    uint64_t arr_n;
    const uint8_t *val;    /* scalar: the value; string: its bytes; array: first element */
    uint64_t str_len;      /* string value length */
    uint64_t *str_offs;    /* array of strings: offset of element i's length field from val */
} gguf_kv;

struct gguf_file {
    const uint8_t *base;
    size_t size;
    bool mapped;
    char *path;            /* "" for memory buffers */
    uint32_t version;
    uint32_t alignment;
    int64_t n_kv;
    gguf_kv *kv;
    int64_t n_tensors;
    gguf_tensor *tensors;
    size_t data_offset;    /* start of the data section in the file */
    int64_t *kv_hash;      /* open addressing, -1 = empty; capacity is a power of two */
    size_t kv_hash_cap;
    int64_t *t_hash;
    size_t t_hash_cap;
};

typedef struct gguf_parser {
    gguf_file *f;
    const uint8_t *p;
    size_t size;
    size_t pos;
    kp_err *err;
} gguf_parser;

/* "gguf: PATH: <message>" */
static int perr(gguf_parser *ps, int code, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static int perr(gguf_parser *ps, int code, const char *fmt, ...) {
    char msg[KP_ERR_MAX];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return kp_errf(ps->err, code, "gguf: %s: %s", ps->f->path[0] ? ps->f->path : "<memory>", msg);
}

/* Printable excerpt of untrusted bytes for messages. */
static void show(char *dst, size_t cap, const uint8_t *s, size_t n) {
    size_t j = 0, lim = cap > 4 ? cap - 4 : 0;
    for (size_t i = 0; i < n && j < lim; i++) dst[j++] = (s[i] >= 32 && s[i] < 127) ? (char)s[i] : '?';
    if (j == lim && n > lim) { memcpy(dst + j, "...", 3); j += 3; }
    dst[j] = '\0';
}

static size_t left(const gguf_parser *ps) { return ps->size - ps->pos; }

static bool rd(gguf_parser *ps, void *dst, size_t n) {
    if (left(ps) < n) return false;
    memcpy(dst, ps->p + ps->pos, n);
    ps->pos += n;
    return true;
}

/* Read a GGUF string; `what` names it for messages ("kv 3 key"). */
static int rd_str(gguf_parser *ps, const char *what, const uint8_t **s, uint64_t *len) {
    uint64_t n;
    if (!rd(ps, &n, 8))
        return perr(ps, KP_EFORMAT, "%s: file ends inside the string length (offset %zu of %zu bytes): truncated file?",
                    what, ps->pos, ps->size);
    if (n > left(ps))
        return perr(ps, KP_EFORMAT, "%s: string length %llu exceeds the %zu bytes left in the file: corrupt or truncated file?",
                    what, (unsigned long long)n, left(ps));
    *s = ps->p + ps->pos;
    *len = n;
    ps->pos += n;
    return 0;
}

static size_t hash_cap_for(int64_t n) {
    size_t cap = 16;
    while (cap < (size_t)n * 2 + 1) cap *= 2;
    return cap;
}

/* Insert index i (name s/n) into table; returns the index of an existing
 * entry with the same name, or -1 after inserting. */
static int64_t hash_insert(int64_t *tab, size_t cap, const char *s, size_t n, int64_t i,
                           const char *(*name_of)(const gguf_file *, int64_t), const gguf_file *f) {
    size_t mask = cap - 1;
    for (size_t h = hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
        if (tab[h] < 0) { tab[h] = i; return -1; }
        const char *o = name_of(f, tab[h]);
        if (strlen(o) == n && memcmp(o, s, n) == 0) return tab[h];
    }
}

static int64_t hash_find(const int64_t *tab, size_t cap, const char *s,
                         const char *(*name_of)(const gguf_file *, int64_t), const gguf_file *f) {
    if (!tab || !s) return -1;
    size_t n = strlen(s), mask = cap - 1;
    for (size_t h = hash_bytes(s, n) & mask;; h = (h + 1) & mask) {
        if (tab[h] < 0) return -1;
        const char *o = name_of(f, tab[h]);
        if (strcmp(o, s) == 0) return tab[h];
    }
}

static const char *kv_name(const gguf_file *f, int64_t i) { return f->kv[i].key; }
static const char *tensor_name(const gguf_file *f, int64_t i) { return f->tensors[i].name; }

/* A name (key or tensor) must be non-empty and free of NUL bytes so that its
 * C-string copy means the same thing. Returns a malloc'd copy or NULL with
 * *rc set. */
static char *copy_name(gguf_parser *ps, const char *what, const uint8_t *s, uint64_t n, int *rc) {
    if (n == 0) { *rc = perr(ps, KP_EFORMAT, "%s is empty", what); return NULL; }
    if (memchr(s, 0, n)) {
        char sh[80];
        show(sh, sizeof sh, s, n);
        *rc = perr(ps, KP_EFORMAT, "%s '%s' contains a NUL byte", what, sh);
        return NULL;
    }
    char *c = malloc(n + 1);
    if (!c) { *rc = perr(ps, KP_ENOMEM, "%s: out of memory", what); return NULL; }
    memcpy(c, s, n);
    c[n] = '\0';
    *rc = 0;
    return c;
}

/* Parse one value of type t (after the type field) into kv. */
static int parse_value(gguf_parser *ps, gguf_kv *kv, const char *what) {
    uint32_t t = kv->type;
    if (t == GGUF_VT_STRING) {
        return rd_str(ps, what, &kv->val, &kv->str_len);
    }
    if (t != GGUF_VT_ARRAY) {
        size_t sz = vtype_size(t);
        if (left(ps) < sz)
            return perr(ps, KP_EFORMAT, "%s: file ends inside the %s value (offset %zu of %zu bytes): truncated file?",
                        what, vtype_name(t), ps->pos, ps->size);
        kv->val = ps->p + ps->pos;
        if (t == GGUF_VT_BOOL && kv->val[0] > 1)
            return perr(ps, KP_EFORMAT, "%s: bool value is %u (must be 0 or 1)", what, kv->val[0]);
        ps->pos += sz;
        return 0;
    }
    /* array */
    uint32_t et;
    uint64_t n;
    if (!rd(ps, &et, 4) || !rd(ps, &n, 8))
        return perr(ps, KP_EFORMAT, "%s: file ends inside the array header (offset %zu of %zu bytes): truncated file?",
                    what, ps->pos, ps->size);
    if (et == GGUF_VT_ARRAY)
        return perr(ps, KP_EFORMAT, "%s: nested array (array of arrays) is not supported", what);
    if (et >= GGUF_VT_COUNT)
        return perr(ps, KP_EFORMAT, "%s: unknown array element type %u (valid: 0..%d)", what, et,
                    GGUF_VT_COUNT - 1);
    kv->arr_type = et;
    kv->arr_n = n;
    kv->val = ps->p + ps->pos;
    if (et == GGUF_VT_STRING) {
        if (n > left(ps) / 8)
            return perr(ps, KP_EFORMAT, "%s: array count %llu of strings cannot fit in the %zu bytes left in the file: corrupt or truncated file?",
                        what, (unsigned long long)n, left(ps));
        kv->str_offs = malloc((n ? n : 1) * sizeof *kv->str_offs);
        if (!kv->str_offs) return perr(ps, KP_ENOMEM, "%s: out of memory for %llu string offsets", what, (unsigned long long)n);
        size_t start = ps->pos;
        for (uint64_t i = 0; i < n; i++) {
            kv->str_offs[i] = ps->pos - start;
            uint64_t len;
            if (!rd(ps, &len, 8))
                return perr(ps, KP_EFORMAT, "%s: file ends inside the length of array string %llu of %llu: truncated file?",
                            what, (unsigned long long)i, (unsigned long long)n);
            if (len > left(ps))
                return perr(ps, KP_EFORMAT, "%s: array string %llu has length %llu but only %zu bytes are left in the file: corrupt or truncated file?",
                            what, (unsigned long long)i, (unsigned long long)len, left(ps));
            ps->pos += len;
        }
        return 0;
    }
    size_t es = vtype_size(et);
    if (n > left(ps) / es)
        return perr(ps, KP_EFORMAT, "%s: array count %llu of %s (%zu bytes each) exceeds the %zu bytes left in the file: corrupt or truncated file?",
                    what, (unsigned long long)n, vtype_name(et), es, left(ps));
    if (et == GGUF_VT_BOOL) {
        for (uint64_t i = 0; i < n; i++)
            if (kv->val[i] > 1)
                return perr(ps, KP_EFORMAT, "%s: bool array element %llu is %u (must be 0 or 1)", what,
                            (unsigned long long)i, kv->val[i]);
    }
    ps->pos += (size_t)(n * es);
    return 0;
}

static int parse_kvs(gguf_parser *ps) {
    gguf_file *f = ps->f;
    for (int64_t i = 0; i < f->n_kv; i++) {
        gguf_kv *kv = &f->kv[i];
        char what[160];
        const uint8_t *ks = NULL;
        uint64_t kn = 0;
        snprintf(what, sizeof what, "kv %lld key", (long long)i);
        int rc = rd_str(ps, what, &ks, &kn);
        if (rc) return rc;
        kv->key = copy_name(ps, what, ks, kn, &rc);
        if (!kv->key) return rc;
        kv->key_len = kn;
        char sh[80];
        show(sh, sizeof sh, ks, kn);
        int64_t dup = hash_insert(f->kv_hash, f->kv_hash_cap, kv->key, kn, i, kv_name, f);
        if (dup >= 0)
            return perr(ps, KP_EFORMAT, "kv %lld: duplicate key '%s' (also kv %lld)", (long long)i, sh, (long long)dup);
        snprintf(what, sizeof what, "kv %lld ('%s')", (long long)i, sh);
        if (!rd(ps, &kv->type, 4))
            return perr(ps, KP_EFORMAT, "%s: file ends inside the value type (offset %zu of %zu bytes): truncated file?",
                        what, ps->pos, ps->size);
        if (kv->type >= GGUF_VT_COUNT)
            return perr(ps, KP_EFORMAT, "%s: unknown value type %u (valid: 0..%d)", what, kv->type, GGUF_VT_COUNT - 1);
        rc = parse_value(ps, kv, what);
        if (rc) return rc;
        if (strcmp(kv->key, "general.alignment") == 0) {
            if (kv->type != GGUF_VT_UINT32)
                return perr(ps, KP_EFORMAT, "%s: alignment must be a u32, not %s", what, vtype_name(kv->type));
            uint32_t a;
            memcpy(&a, kv->val, 4);
            if (a == 0 || (a & (a - 1)) != 0 || a > GGUF_MAX_ALIGNMENT)
                return perr(ps, KP_EFORMAT, "%s: alignment %u is not a power of two in 1..%u", what, a,
                            GGUF_MAX_ALIGNMENT);
            f->alignment = a;
        }
    }
    return 0;
}

static int parse_tensor_infos(gguf_parser *ps) {
    gguf_file *f = ps->f;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        char what[160], sh[80];
        const uint8_t *ns = NULL;
        uint64_t nn = 0;
        snprintf(what, sizeof what, "tensor %lld name", (long long)i);
        int rc = rd_str(ps, what, &ns, &nn);
        if (rc) return rc;
        char *name = copy_name(ps, what, ns, nn, &rc);
        if (!name) return rc;
        t->name = name;
        show(sh, sizeof sh, ns, nn);
        int64_t dup = hash_insert(f->t_hash, f->t_hash_cap, name, nn, i, tensor_name, f);
        if (dup >= 0)
            return perr(ps, KP_EFORMAT, "tensor %lld: duplicate tensor name '%s' (also tensor %lld)", (long long)i, sh,
                        (long long)dup);
        snprintf(what, sizeof what, "tensor %lld ('%s')", (long long)i, sh);

        uint32_t n_dims;
        if (!rd(ps, &n_dims, 4))
            return perr(ps, KP_EFORMAT, "%s: file ends inside n_dims (offset %zu of %zu bytes): truncated file?", what,
                        ps->pos, ps->size);
        if (n_dims < 1 || n_dims > GGUF_MAX_DIMS)
            return perr(ps, KP_EFORMAT, "%s: n_dims %u is not in 1..%d", what, n_dims, GGUF_MAX_DIMS);
        t->n_dims = (int)n_dims;
        int64_t nel = 1;
        for (int d = 0; d < GGUF_MAX_DIMS; d++) t->ne[d] = 1;
        for (uint32_t d = 0; d < n_dims; d++) {
            uint64_t v;
            if (!rd(ps, &v, 8))
                return perr(ps, KP_EFORMAT, "%s: file ends inside dim ne[%u] (offset %zu of %zu bytes): truncated file?",
                            what, d, ps->pos, ps->size);
            if (v == 0 || v > (uint64_t)INT64_MAX)
                return perr(ps, KP_EFORMAT, "%s: dim ne[%u] = %llu is not in 1..2^63-1", what, d, (unsigned long long)v);
            if ((int64_t)v > INT64_MAX / nel)
                return perr(ps, KP_EFORMAT, "%s: dims overflow: the product of ne[0..%u] does not fit in 64 bits", what, d);
            t->ne[d] = (int64_t)v;
            nel *= (int64_t)v;
        }
        t->n_elements = nel;
        uint32_t type;
        if (!rd(ps, &type, 4) || !rd(ps, &t->offset, 8))
            return perr(ps, KP_EFORMAT, "%s: file ends inside the type/offset fields (offset %zu of %zu bytes): truncated file?",
                        what, ps->pos, ps->size);
        if (type >= KP_TYPE_COUNT || kp_type_block((int)type) <= 0)
            return perr(ps, KP_EUNSUP, "%s: unknown or unsupported tensor type %u (a newer ggml type?)", what, type);
        t->type = (int)type;
        int blk = kp_type_block(t->type);
        if (t->ne[0] % blk != 0)
            return perr(ps, KP_EFORMAT, "%s: row length ne[0] = %lld is not a multiple of the %s block size %d",
                        what, (long long)t->ne[0], kp_type_name(t->type), blk);
        t->nbytes = tensor_nbytes(t->type, t->ne, ps->size);
        if (t->nbytes == 0)
            return perr(ps, KP_EFORMAT, "%s: data size of %lld %s elements is larger than the whole file (%zu bytes): corrupt dims?",
                        what, (long long)nel, kp_type_name(t->type), ps->size);
    }
    return 0;
}

/* Place the data section and check every tensor's offset against it. */
static int place_tensors(gguf_parser *ps) {
    gguf_file *f = ps->f;
    size_t a = f->alignment;
    size_t start = (ps->pos + a - 1) / a * a;
    if (start > ps->size) {
        if (f->n_tensors > 0)
            return perr(ps, KP_EFORMAT, "file ends (%zu bytes) before the data section (offset %zu): truncated file?",
                        ps->size, start);
        start = ps->size; /* vocabulary-only files may omit the final padding */
    }
    f->data_offset = start;
    size_t data_size = ps->size - start;
    for (int64_t i = 0; i < f->n_tensors; i++) {
        gguf_tensor *t = &f->tensors[i];
        char sh[80];
        show(sh, sizeof sh, (const uint8_t *)t->name, strlen(t->name));
        if (t->offset % a != 0)
            return perr(ps, KP_EFORMAT, "tensor %lld ('%s'): data offset %llu is not a multiple of the alignment %zu",
                        (long long)i, sh, (unsigned long long)t->offset, a);
        if (t->offset > data_size || t->nbytes > data_size - t->offset)
            return perr(ps, KP_EFORMAT,
                        "tensor %lld ('%s'): data [offset %llu, %zu bytes] runs past the end of the file (%zu bytes, data section %zu bytes at %zu): truncated file?",
                        (long long)i, sh, (unsigned long long)t->offset, t->nbytes, ps->size, data_size, start);
        t->data = f->base + start + t->offset;
    }
    return 0;
}

static int parse(gguf_parser *ps) {
    gguf_file *f = ps->f;
    uint8_t magic[4];
    if (!rd(ps, magic, 4))
        return perr(ps, KP_EFORMAT, "file is %zu bytes, too short for the GGUF magic: truncated or not a GGUF file",
                    ps->size);
    if (memcmp(magic, "GGUF", 4) != 0)
        return perr(ps, KP_EFORMAT, "bad magic %02x %02x %02x %02x (expected 47 47 55 46 = 'GGUF'): not a GGUF file",
                    magic[0], magic[1], magic[2], magic[3]);
    if (!rd(ps, &f->version, 4))
        return perr(ps, KP_EFORMAT, "file ends inside the header (version): truncated file?");
    if (f->version == 1)
        return perr(ps, KP_EUNSUP, "GGUF version 1 is not supported (only v2 and v3): re-convert the model with a current llama.cpp");
    if (f->version != 2 && f->version != 3) {
        uint32_t sw = __builtin_bswap32(f->version);
        return perr(ps, KP_EUNSUP, "GGUF version %u is not supported (only v2 and v3)%s", f->version,
                    (sw == 2 || sw == 3) ? ": this looks like a big-endian GGUF file" : "");
    }
    uint64_t n_tensors, n_kv;
    if (!rd(ps, &n_tensors, 8) || !rd(ps, &n_kv, 8))
        return perr(ps, KP_EFORMAT, "file ends inside the header (n_tensors/n_kv): truncated file?");
    if (n_tensors > left(ps) / GGUF_MIN_TINFO_BYTES)
        return perr(ps, KP_EFORMAT, "n_tensors %llu cannot fit in the %zu bytes left in the file (each tensor info takes >= %d bytes): corrupt or truncated file?",
                    (unsigned long long)n_tensors, left(ps), GGUF_MIN_TINFO_BYTES);
    if (n_kv > left(ps) / GGUF_MIN_KV_BYTES)
        return perr(ps, KP_EFORMAT, "n_kv %llu cannot fit in the %zu bytes left in the file (each key/value takes >= %d bytes): corrupt or truncated file?",
                    (unsigned long long)n_kv, left(ps), GGUF_MIN_KV_BYTES);
    if (n_tensors * GGUF_MIN_TINFO_BYTES + n_kv * GGUF_MIN_KV_BYTES > left(ps))
        return perr(ps, KP_EFORMAT, "n_tensors %llu and n_kv %llu together cannot fit in the %zu bytes left in the file: corrupt or truncated file?",
                    (unsigned long long)n_tensors, (unsigned long long)n_kv, left(ps));
    f->n_tensors = (int64_t)n_tensors;
    f->n_kv = (int64_t)n_kv;
    f->kv = calloc(n_kv ? n_kv : 1, sizeof *f->kv);
    f->tensors = calloc(n_tensors ? n_tensors : 1, sizeof *f->tensors);
    f->kv_hash_cap = hash_cap_for(f->n_kv);
    f->t_hash_cap = hash_cap_for(f->n_tensors);
    f->kv_hash = malloc(f->kv_hash_cap * sizeof *f->kv_hash);
    f->t_hash = malloc(f->t_hash_cap * sizeof *f->t_hash);
    if (!f->kv || !f->tensors || !f->kv_hash || !f->t_hash)
        return perr(ps, KP_ENOMEM, "out of memory for %llu keys and %llu tensors", (unsigned long long)n_kv,
                    (unsigned long long)n_tensors);
    memset(f->kv_hash, 0xff, f->kv_hash_cap * sizeof *f->kv_hash);
    memset(f->t_hash, 0xff, f->t_hash_cap * sizeof *f->t_hash);
    int rc = parse_kvs(ps);
    if (rc) return rc;
    rc = parse_tensor_infos(ps);
    if (rc) return rc;
    return place_tensors(ps);
}

static int open_common(gguf_file **out, gguf_file *f, kp_err *err) {
    gguf_parser ps = {.f = f, .p = f->base, .size = f->size, .pos = 0, .err = err};
    f->alignment = GGUF_DEFAULT_ALIGNMENT;
    int rc = parse(&ps);
    if (rc) {
        gguf_close(f);
        return rc;
    }
    *out = f;
    return 0;
}

int gguf_open_mem(gguf_file **out, const void *data, size_t size, kp_err *err) {
    if (!out) return kp_errf(err, KP_EINVAL, "gguf_open_mem: out is NULL");
    *out = NULL;
    if (!data && size) return kp_errf(err, KP_EINVAL, "gguf_open_mem: data is NULL");
    gguf_file *f = calloc(1, sizeof *f);
    if (!f) return kp_errf(err, KP_ENOMEM, "gguf: out of memory");
    f->path = strdup("");
    if (!f->path) { free(f); return kp_errf(err, KP_ENOMEM, "gguf: out of memory"); }
    static const uint8_t empty[1] = {0};
    f->base = data ? data : empty;
    f->size = size;
    return open_common(out, f, err);
}

int gguf_open(gguf_file **out, const char *path, kp_err *err) {
    if (!out || !path) return kp_errf(err, KP_EINVAL, "gguf_open: NULL argument");
    *out = NULL;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        return kp_errf(err, e == ENOENT ? KP_ENOTFOUND : KP_EIO, "gguf: cannot open '%s': %s", path, strerror(e));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return kp_errf(err, KP_EIO, "gguf: cannot stat '%s': %s", path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return kp_errf(err, KP_EIO, "gguf: '%s' is not a regular file", path);
    }
    if (st.st_size < 4) {
        close(fd);
        return kp_errf(err, KP_EFORMAT, "gguf: %s: file is %lld bytes, too short for a GGUF header: truncated or not a GGUF file",
                       path, (long long)st.st_size);
    }
    void *m = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);
    if (m == MAP_FAILED) return kp_errf(err, KP_EIO, "gguf: cannot mmap '%s': %s", path, strerror(e));
    gguf_file *f = calloc(1, sizeof *f);
    char *p = strdup(path);
    if (!f || !p) {
        free(f);
        free(p);
        munmap(m, (size_t)st.st_size);
        return kp_errf(err, KP_ENOMEM, "gguf: out of memory");
    }
    f->base = m;
    f->size = (size_t)st.st_size;
    f->mapped = true;
    f->path = p;
    return open_common(out, f, err);
}

void gguf_close(gguf_file *f) {
    if (!f) return;
    if (f->kv)
        for (int64_t i = 0; i < f->n_kv; i++) {
            free(f->kv[i].key);
            free(f->kv[i].str_offs);
        }
    if (f->tensors)
        for (int64_t i = 0; i < f->n_tensors; i++) free((char *)f->tensors[i].name);
    free(f->kv);
    free(f->tensors);
    free(f->kv_hash);
    free(f->t_hash);
    if (f->mapped) munmap((void *)f->base, f->size);
    free(f->path);
    free(f);
}

uint32_t gguf_version(const gguf_file *f) { return f->version; }
uint32_t gguf_alignment(const gguf_file *f) { return f->alignment; }
const char *gguf_path(const gguf_file *f) { return f->path; }
size_t gguf_file_size(const gguf_file *f) { return f->size; }

int64_t gguf_n_kv(const gguf_file *f) { return f->n_kv; }
int64_t gguf_find_key(const gguf_file *f, const char *key) {
    return hash_find(f->kv_hash, f->kv_hash_cap, key, kv_name, f);
}
const char *gguf_key(const gguf_file *f, int64_t i) {
    return (i >= 0 && i < f->n_kv) ? f->kv[i].key : NULL;
}
enum gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i) {
    return (i >= 0 && i < f->n_kv) ? (enum gguf_vtype)f->kv[i].type : GGUF_VT_COUNT;
}

/* Look a key up for a typed getter: NULL + KP_ENOTFOUND if absent. */
static const gguf_kv *getter_kv(const gguf_file *f, const char *key, int *rc, kp_err *err) {
    int64_t i = gguf_find_key(f, key);
    if (i < 0) {
        *rc = kp_errf(err, KP_ENOTFOUND, "gguf: %s: key '%s' not found", f->path[0] ? f->path : "<memory>",
                      key ? key : "(null)");
        return NULL;
    }
    *rc = 0;
    return &f->kv[i];
}

static int wrong_type(const gguf_file *f, const gguf_kv *kv, const char *want, kp_err *err) {
    return kp_errf(err, KP_EFORMAT, "gguf: %s: key '%s' has type %s%s%s, expected %s",
                   f->path[0] ? f->path : "<memory>", kv->key, vtype_name(kv->type),
                   kv->type == GGUF_VT_ARRAY ? " of " : "",
                   kv->type == GGUF_VT_ARRAY ? vtype_name(kv->arr_type) : "", want);
}

int gguf_get_int(const gguf_file *f, const char *key, int64_t *out, kp_err *err) {
    int rc;
    const gguf_kv *kv = getter_kv(f, key, &rc, err);
    if (!kv) return rc;
    if (!vtype_is_int(kv->type)) return wrong_type(f, kv, "an integer", err);
    if (kv->type == GGUF_VT_UINT64) {
        uint64_t v;
        memcpy(&v, kv->val, 8);
        if (v > (uint64_t)INT64_MAX)
            return kp_errf(err, KP_EFORMAT, "gguf: %s: key '%s' = %llu does not fit in int64",
                           f->path[0] ? f->path : "<memory>", key, (unsigned long long)v);
    }
    *out = load_int(kv->type, kv->val);
    return 0;
}

int gguf_get_float(const gguf_file *f, const char *key, double *out, kp_err *err) {
    int rc;
    const gguf_kv *kv = getter_kv(f, key, &rc, err);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_FLOAT32 && kv->type != GGUF_VT_FLOAT64 && !vtype_is_int(kv->type))
        return wrong_type(f, kv, "a number", err);
    *out = load_float(kv->type, kv->val);
    return 0;
}

int gguf_get_bool(const gguf_file *f, const char *key, bool *out, kp_err *err) {
    int rc;
    const gguf_kv *kv = getter_kv(f, key, &rc, err);
    if (!kv) return rc;
    if (!vtype_is_int(kv->type)) return wrong_type(f, kv, "a bool or integer", err);
    *out = load_int(kv->type, kv->val) != 0;
    return 0;
}

int gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len, kp_err *err) {
    int rc;
    const gguf_kv *kv = getter_kv(f, key, &rc, err);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_STRING) return wrong_type(f, kv, "a string", err);
    *s = (const char *)kv->val;
    *len = (size_t)kv->str_len;
    return 0;
}

char *gguf_get_str_dup(const gguf_file *f, const char *key) {
    const char *s;
    size_t n;
    if (gguf_get_str(f, key, &s, &n, NULL) != 0) return NULL;
    char *c = malloc(n + 1);
    if (!c) return NULL;
    memcpy(c, s, n);
    c[n] = '\0';
    return c;
}

int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out, kp_err *err) {
    int rc;
    const gguf_kv *kv = getter_kv(f, key, &rc, err);
    if (!kv) return rc;
    if (kv->type != GGUF_VT_ARRAY) return wrong_type(f, kv, "an array", err);
    out->type = (enum gguf_vtype)kv->arr_type;
    out->n = kv->arr_n;
    out->data = kv->val;
    out->f = f;
    out->kv_index = kv - f->kv;
    return 0;
}

int64_t gguf_arr_get_int(const gguf_arr *a, uint64_t i) {
    size_t es = vtype_size(a->type);
    return es ? load_int(a->type, a->data + i * es) : 0;
}

double gguf_arr_get_float(const gguf_arr *a, uint64_t i) {
    size_t es = vtype_size(a->type);
    return es ? load_float(a->type, a->data + i * es) : 0.0;
}

void gguf_arr_get_str(const gguf_arr *a, uint64_t i, const char **s, size_t *len) {
    const gguf_kv *kv = &a->f->kv[a->kv_index];
    if (a->type != GGUF_VT_STRING || !kv->str_offs) {
        *s = "";
        *len = 0;
        return;
    }
    const uint8_t *p = a->data + kv->str_offs[i];
    uint64_t n;
    memcpy(&n, p, 8);
    *s = (const char *)p + 8;
    *len = (size_t)n;
}

int64_t gguf_n_tensors(const gguf_file *f) { return f->n_tensors; }
const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i) {
    return (i >= 0 && i < f->n_tensors) ? &f->tensors[i] : NULL;
}
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name) {
    int64_t i = hash_find(f->t_hash, f->t_hash_cap, name, tensor_name, f);
    return i >= 0 ? &f->tensors[i] : NULL;
}
