/*
 * gguf.c — GGUF v2/v3 reader and v3 writer (contract in gguf.h).
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
 *   - The writer can take tensor data from a callback at write time
 *     (gguf_add_tensor_cb), so synthetic 16 GB models stream to disk.
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

#include "kernels/types.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c reads GGUF's little-endian fields with memcpy: little-endian hosts only"
#endif

#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_ALIGNMENT (1u << 20)
#define GGUF_MAX_DIMS 4
/* Smallest possible encodings, used to refuse counts that cannot fit. */
#define GGUF_MIN_KV_BYTES 14     /* u64 len + 1 key byte + u32 type + 1 value byte */
#define GGUF_MIN_TINFO_BYTES 33  /* u64 len + 1 name byte + u32 + u64 ne + u32 + u64 */

/* ------------------------------------------------------------------------ */
/* Shared helpers                                                            */
/* ------------------------------------------------------------------------ */

static const char *const gguf_vtype_names[GGUF_VT_COUNT] = {
    "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
};

static const char *vtype_name(uint32_t t) {
    return t < GGUF_VT_COUNT ? gguf_vtype_names[t] : "unknown";
}

/* Bytes of one element of a fixed-size type; 0 for string/array/unknown. */
static size_t vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64: case GGUF_VT_INT64: case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

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

/* Tensor byte size: 0 if ne[0] is not a multiple of the block size, the type
 * is unknown or the size does not fit in `limit` bytes (so nothing here can
 * overflow: every block takes at least one byte). */
static size_t tensor_nbytes(int type, const int64_t ne[4], uint64_t limit) {
    int blk = kp_type_block(type);
    if (blk <= 0 || ne[0] % blk != 0) return 0;
    if ((uint64_t)(ne[0] / blk) > limit) return 0;
    size_t row = kp_type_row_bytes(type, ne[0]);
    if (row == 0 || row > limit) return 0;
    uint64_t rows = (uint64_t)ne[1] * (uint64_t)ne[2] * (uint64_t)ne[3]; /* checked by caller */
    if (rows > limit / row) return 0;
    return (size_t)(rows * row);
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

/* ------------------------------------------------------------------------ */
/* Writer                                                                    */
/* ------------------------------------------------------------------------ */

typedef struct gguf_wkv {
    char *key;
    uint32_t type;
    uint8_t *val;      /* encoded value as it appears after the type field */
    size_t val_len;
} gguf_wkv;

typedef struct gguf_wtensor {
    char *name;
    int type;
    int n_dims;
    int64_t ne[4];
    size_t nbytes;
    size_t row_bytes;
    const void *data;  /* borrowed or == owned; NULL when fill is used */
    void *owned;
    gguf_fill_fn fill;
    void *fill_ctx;
    uint64_t offset;   /* assigned at write time */
} gguf_wtensor;

struct gguf_writer {
    gguf_wkv *kv;
    size_t n_kv, cap_kv;
    gguf_wtensor *t;
    size_t n_t, cap_t;
};

gguf_writer *gguf_writer_new(void) { return calloc(1, sizeof(gguf_writer)); }

void gguf_writer_free(gguf_writer *w) {
    if (!w) return;
    for (size_t i = 0; i < w->n_kv; i++) {
        free(w->kv[i].key);
        free(w->kv[i].val);
    }
    for (size_t i = 0; i < w->n_t; i++) {
        free(w->t[i].name);
        free(w->t[i].owned);
    }
    free(w->kv);
    free(w->t);
    free(w);
}

/* Set key to an already encoded value (takes ownership of val). */
static int wset(gguf_writer *w, const char *key, uint32_t type, uint8_t *val, size_t val_len) {
    if (!w || !key || !key[0]) {
        free(val);
        return KP_EINVAL;
    }
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, key) == 0) {
            free(w->kv[i].val);
            w->kv[i].type = type;
            w->kv[i].val = val;
            w->kv[i].val_len = val_len;
            return 0;
        }
    }
    if (w->n_kv == w->cap_kv) {
        size_t cap = w->cap_kv ? w->cap_kv * 2 : 16;
        gguf_wkv *nk = realloc(w->kv, cap * sizeof *nk);
        if (!nk) { free(val); return KP_ENOMEM; }
        w->kv = nk;
        w->cap_kv = cap;
    }
    char *k = strdup(key);
    if (!k) { free(val); return KP_ENOMEM; }
    w->kv[w->n_kv++] = (gguf_wkv){.key = k, .type = type, .val = val, .val_len = val_len};
    return 0;
}

int gguf_set_val(gguf_writer *w, const char *key, enum gguf_vtype type, const void *v) {
    size_t sz = vtype_size(type);
    if (sz == 0 || !v) return KP_EINVAL;
    if (type == GGUF_VT_BOOL && *(const uint8_t *)v > 1) return KP_EINVAL;
    uint8_t *val = malloc(sz);
    if (!val) return KP_ENOMEM;
    memcpy(val, v, sz);
    return wset(w, key, type, val, sz);
}

int gguf_set_u32(gguf_writer *w, const char *key, uint32_t v) { return gguf_set_val(w, key, GGUF_VT_UINT32, &v); }
int gguf_set_i32(gguf_writer *w, const char *key, int32_t v) { return gguf_set_val(w, key, GGUF_VT_INT32, &v); }
int gguf_set_u64(gguf_writer *w, const char *key, uint64_t v) { return gguf_set_val(w, key, GGUF_VT_UINT64, &v); }
int gguf_set_f32(gguf_writer *w, const char *key, float v) { return gguf_set_val(w, key, GGUF_VT_FLOAT32, &v); }
int gguf_set_bool(gguf_writer *w, const char *key, bool v) {
    uint8_t b = v ? 1 : 0;
    return gguf_set_val(w, key, GGUF_VT_BOOL, &b);
}

int gguf_set_str(gguf_writer *w, const char *key, const char *v) {
    if (!v) return KP_EINVAL;
    uint64_t n = strlen(v);
    uint8_t *val = malloc(8 + n);
    if (!val) return KP_ENOMEM;
    memcpy(val, &n, 8);
    memcpy(val + 8, v, n);
    return wset(w, key, GGUF_VT_STRING, val, 8 + n);
}

int gguf_set_arr(gguf_writer *w, const char *key, enum gguf_vtype type, const void *data, uint64_t n) {
    size_t es = vtype_size(type);
    if (es == 0 || (n && !data) || n > (SIZE_MAX - 12) / es) return KP_EINVAL;
    if (type == GGUF_VT_BOOL)
        for (uint64_t i = 0; i < n; i++)
            if (((const uint8_t *)data)[i] > 1) return KP_EINVAL;
    uint8_t *val = malloc(12 + n * es);
    if (!val) return KP_ENOMEM;
    uint32_t et = type;
    memcpy(val, &et, 4);
    memcpy(val + 4, &n, 8);
    if (n) memcpy(val + 12, data, n * es);
    return wset(w, key, GGUF_VT_ARRAY, val, 12 + n * es);
}

int gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n) {
    if (n && !v) return KP_EINVAL;
    size_t total = 12;
    for (uint64_t i = 0; i < n; i++) {
        if (!v[i]) return KP_EINVAL;
        total += 8 + strlen(v[i]);
    }
    uint8_t *val = malloc(total), *p = val;
    if (!val) return KP_ENOMEM;
    uint32_t et = GGUF_VT_STRING;
    memcpy(p, &et, 4);
    memcpy(p + 4, &n, 8);
    p += 12;
    for (uint64_t i = 0; i < n; i++) {
        uint64_t len = strlen(v[i]);
        memcpy(p, &len, 8);
        memcpy(p + 8, v[i], len);
        p += 8 + len;
    }
    return wset(w, key, GGUF_VT_ARRAY, val, total);
}

/* Validate and append a tensor entry (data fields filled by the callers). */
static gguf_wtensor *add_tensor_common(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne,
                                       kp_err *err, int *rc) {
    *rc = KP_EINVAL;
    if (!w || !name || !name[0] || !ne) {
        kp_errf(err, KP_EINVAL, "gguf_add_tensor: NULL writer, name or ne, or empty name");
        return NULL;
    }
    if (n_dims < 1 || n_dims > GGUF_MAX_DIMS) {
        kp_errf(err, KP_EINVAL, "gguf_add_tensor: '%s': n_dims %d is not in 1..4", name, n_dims);
        return NULL;
    }
    int64_t full[4] = {1, 1, 1, 1}, nel = 1;
    for (int d = 0; d < n_dims; d++) {
        if (ne[d] < 1 || ne[d] > INT64_MAX / nel) {
            kp_errf(err, KP_EINVAL, "gguf_add_tensor: '%s': dim ne[%d] = %lld is < 1 or overflows", name, d, (long long)ne[d]);
            return NULL;
        }
        full[d] = ne[d];
        nel *= ne[d];
    }
    int blk = kp_type_block(type);
    if (blk <= 0) {
        *rc = kp_errf(err, KP_EUNSUP, "gguf_add_tensor: '%s': unknown tensor type %d", name, type);
        return NULL;
    }
    if (full[0] % blk != 0) {
        kp_errf(err, KP_EINVAL, "gguf_add_tensor: '%s': row length %lld is not a multiple of the %s block size %d",
                name, (long long)full[0], kp_type_name(type), blk);
        return NULL;
    }
    size_t nbytes = tensor_nbytes(type, full, (uint64_t)INT64_MAX);
    if (nbytes == 0) {
        kp_errf(err, KP_EINVAL, "gguf_add_tensor: '%s': data size overflows", name);
        return NULL;
    }
    for (size_t i = 0; i < w->n_t; i++)
        if (strcmp(w->t[i].name, name) == 0) {
            kp_errf(err, KP_EINVAL, "gguf_add_tensor: duplicate tensor name '%s'", name);
            return NULL;
        }
    if (w->n_t == w->cap_t) {
        size_t cap = w->cap_t ? w->cap_t * 2 : 64;
        gguf_wtensor *nt = realloc(w->t, cap * sizeof *nt);
        if (!nt) {
            *rc = kp_errf(err, KP_ENOMEM, "gguf_add_tensor: out of memory");
            return NULL;
        }
        w->t = nt;
        w->cap_t = cap;
    }
    char *nm = strdup(name);
    if (!nm) {
        *rc = kp_errf(err, KP_ENOMEM, "gguf_add_tensor: out of memory");
        return NULL;
    }
    gguf_wtensor *t = &w->t[w->n_t++];
    *t = (gguf_wtensor){.name = nm, .type = type, .n_dims = n_dims, .nbytes = nbytes,
                        .row_bytes = kp_type_row_bytes(type, full[0])};
    memcpy(t->ne, full, sizeof full);
    *rc = 0;
    return t;
}

int gguf_add_tensor(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne, const void *data,
                    bool borrow, kp_err *err) {
    if (!data) return kp_errf(err, KP_EINVAL, "gguf_add_tensor: '%s': data is NULL", name ? name : "(null)");
    int rc;
    gguf_wtensor *t = add_tensor_common(w, name, type, n_dims, ne, err, &rc);
    if (!t) return rc;
    if (borrow) {
        t->data = data;
    } else {
        t->owned = malloc(t->nbytes);
        if (!t->owned) {
            free(t->name);
            w->n_t--;
            return kp_errf(err, KP_ENOMEM, "gguf_add_tensor: '%s': out of memory copying %zu bytes", name, t->nbytes);
        }
        memcpy(t->owned, data, t->nbytes);
        t->data = t->owned;
    }
    return 0;
}

int gguf_add_tensor_cb(gguf_writer *w, const char *name, int type, int n_dims, const int64_t *ne, gguf_fill_fn fill,
                       void *ctx, kp_err *err) {
    if (!fill) return kp_errf(err, KP_EINVAL, "gguf_add_tensor_cb: '%s': fill is NULL", name ? name : "(null)");
    int rc;
    gguf_wtensor *t = add_tensor_common(w, name, type, n_dims, ne, err, &rc);
    if (!t) return rc;
    t->fill = fill;
    t->fill_ctx = ctx;
    return 0;
}

/* Output sink: a FILE or a pre-sized memory buffer. */
typedef struct gguf_out {
    FILE *fp;
    uint8_t *buf;
    size_t pos;
    size_t cap;
} gguf_out;

static int out_put(gguf_out *o, const void *src, size_t n, kp_err *err) {
    if (o->fp) {
        if (n && fwrite(src, 1, n, o->fp) != n)
            return kp_errf(err, KP_EIO, "gguf: write failed: %s", strerror(errno));
    } else {
        if (n > o->cap - o->pos) return kp_errf(err, KP_EIO, "gguf: internal error: buffer overrun");
        memcpy(o->buf + o->pos, src, n);
    }
    o->pos += n;
    return 0;
}

static int out_pad(gguf_out *o, size_t align, kp_err *err) {
    static const uint8_t zeros[64] = {0};
    while (o->pos % align) {
        size_t n = KP_MIN(align - o->pos % align, sizeof zeros);
        int rc = out_put(o, zeros, n, err);
        if (rc) return rc;
    }
    return 0;
}

/* Alignment from general.alignment (u32, power of two) or the default. */
static int writer_alignment(const gguf_writer *w, size_t *align, kp_err *err) {
    *align = GGUF_DEFAULT_ALIGNMENT;
    for (size_t i = 0; i < w->n_kv; i++) {
        if (strcmp(w->kv[i].key, "general.alignment") != 0) continue;
        if (w->kv[i].type != GGUF_VT_UINT32)
            return kp_errf(err, KP_EINVAL, "gguf: general.alignment must be a u32, not %s", vtype_name(w->kv[i].type));
        uint32_t a;
        memcpy(&a, w->kv[i].val, 4);
        if (a == 0 || (a & (a - 1)) != 0 || a > GGUF_MAX_ALIGNMENT)
            return kp_errf(err, KP_EINVAL, "gguf: general.alignment %u is not a power of two in 1..%u", a,
                           GGUF_MAX_ALIGNMENT);
        *align = a;
    }
    return 0;
}

/* Assign tensor offsets; return header size (before padding) and total size. */
static int writer_layout(gguf_writer *w, size_t *align, uint64_t *header, uint64_t *total, kp_err *err) {
    int rc = writer_alignment(w, align, err);
    if (rc) return rc;
    uint64_t h = 4 + 4 + 8 + 8;
    for (size_t i = 0; i < w->n_kv; i++) h += 8 + strlen(w->kv[i].key) + 4 + w->kv[i].val_len;
    uint64_t off = 0;
    for (size_t i = 0; i < w->n_t; i++) {
        gguf_wtensor *t = &w->t[i];
        h += 8 + strlen(t->name) + 4 + 8 * (uint64_t)t->n_dims + 4 + 8;
        t->offset = off;
        off += (t->nbytes + *align - 1) / *align * *align;
    }
    *header = h;
    *total = (h + *align - 1) / *align * *align + off;
    return 0;
}

int gguf_writer_size(gguf_writer *w, uint64_t *size, kp_err *err) {
    size_t align;
    uint64_t header;
    return writer_layout(w, &align, &header, size, err);
}

static int put_str(gguf_out *o, const char *s, kp_err *err) {
    uint64_t n = strlen(s);
    int rc = out_put(o, &n, 8, err);
    return rc ? rc : out_put(o, s, n, err);
}

/* Stream tensor t's bytes through its fill callback in whole-row chunks. */
static int write_filled(gguf_out *o, gguf_wtensor *t, int64_t index, kp_err *err) {
    if (!o->fp) { /* memory: fill in place */
        int rc = t->fill(t->fill_ctx, index, o->buf + o->pos, 0, t->nbytes, err);
        if (rc) return rc;
        o->pos += t->nbytes;
        return 0;
    }
    const size_t target = (size_t)4 << 20;
    size_t rows_per = KP_MAX((size_t)1, target / t->row_bytes);
    size_t chunk = KP_MIN(rows_per * t->row_bytes, t->nbytes);
    uint8_t *buf = malloc(chunk);
    if (!buf) return kp_errf(err, KP_ENOMEM, "gguf: out of memory for a %zu-byte write buffer", chunk);
    int rc = 0;
    for (size_t off = 0; off < t->nbytes && rc == 0; off += chunk) {
        size_t n = KP_MIN(chunk, t->nbytes - off);
        rc = t->fill(t->fill_ctx, index, buf, off, n, err);
        if (rc == 0) rc = out_put(o, buf, n, err);
    }
    free(buf);
    return rc;
}

static int writer_emit(gguf_writer *w, gguf_out *o, size_t align, kp_err *err) {
    int rc;
    uint32_t version = 3;
    uint64_t n_t = w->n_t, n_kv = w->n_kv;
    if ((rc = out_put(o, "GGUF", 4, err)) || (rc = out_put(o, &version, 4, err)) ||
        (rc = out_put(o, &n_t, 8, err)) || (rc = out_put(o, &n_kv, 8, err)))
        return rc;
    for (size_t i = 0; i < w->n_kv; i++) {
        const gguf_wkv *kv = &w->kv[i];
        if ((rc = put_str(o, kv->key, err)) || (rc = out_put(o, &kv->type, 4, err)) ||
            (rc = out_put(o, kv->val, kv->val_len, err)))
            return rc;
    }
    for (size_t i = 0; i < w->n_t; i++) {
        const gguf_wtensor *t = &w->t[i];
        uint32_t nd = (uint32_t)t->n_dims, type = (uint32_t)t->type;
        if ((rc = put_str(o, t->name, err)) || (rc = out_put(o, &nd, 4, err)) ||
            (rc = out_put(o, t->ne, 8 * (size_t)nd, err)) || (rc = out_put(o, &type, 4, err)) ||
            (rc = out_put(o, &t->offset, 8, err)))
            return rc;
    }
    if ((rc = out_pad(o, align, err))) return rc;
    size_t data_start = o->pos;
    for (size_t i = 0; i < w->n_t; i++) {
        gguf_wtensor *t = &w->t[i];
        if (o->pos - data_start != t->offset) return kp_errf(err, KP_EIO, "gguf: internal error: offset mismatch");
        rc = t->fill ? write_filled(o, t, (int64_t)i, err) : out_put(o, t->data, t->nbytes, err);
        if (rc) return rc;
        if ((rc = out_pad(o, align, err))) return rc;
    }
    return 0;
}

int gguf_writer_write_mem(gguf_writer *w, uint8_t **out, size_t *size, kp_err *err) {
    if (!w || !out || !size) return kp_errf(err, KP_EINVAL, "gguf_writer_write_mem: NULL argument");
    size_t align;
    uint64_t header, total;
    int rc = writer_layout(w, &align, &header, &total, err);
    if (rc) return rc;
    if (total > SIZE_MAX) return kp_errf(err, KP_ENOMEM, "gguf: %llu bytes do not fit in memory", (unsigned long long)total);
    gguf_out o = {.buf = malloc(total ? total : 1), .cap = total};
    if (!o.buf) return kp_errf(err, KP_ENOMEM, "gguf: out of memory for a %llu-byte file", (unsigned long long)total);
    rc = writer_emit(w, &o, align, err);
    if (rc) {
        free(o.buf);
        return rc;
    }
    *out = o.buf;
    *size = o.pos;
    return 0;
}

/* fsync the directory holding path so the rename is durable. */
static int fsync_dir_of(const char *path, kp_err *err) {
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir) return kp_errf(err, KP_ENOMEM, "gguf: out of memory");
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int rc = 0;
    if (fd < 0 || fsync(fd) != 0)
        rc = kp_errf(err, KP_EIO, "gguf: cannot fsync directory '%s': %s", dir, strerror(errno));
    if (fd >= 0) close(fd);
    free(dir);
    return rc;
}

int gguf_writer_write(gguf_writer *w, const char *path, kp_err *err) {
    if (!w || !path) return kp_errf(err, KP_EINVAL, "gguf_writer_write: NULL argument");
    size_t align;
    uint64_t header, total;
    int rc = writer_layout(w, &align, &header, &total, err);
    if (rc) return rc;
    size_t plen = strlen(path);
    char *tmp = malloc(plen + 5);
    if (!tmp) return kp_errf(err, KP_ENOMEM, "gguf: out of memory");
    memcpy(tmp, path, plen);
    memcpy(tmp + plen, ".tmp", 5);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = kp_errf(err, KP_EIO, "gguf: cannot create '%s': %s", tmp, strerror(errno));
        free(tmp);
        return rc;
    }
    FILE *fp = fdopen(fd, "wb");
    if (!fp) {
        rc = kp_errf(err, KP_EIO, "gguf: fdopen '%s': %s", tmp, strerror(errno));
        close(fd);
        unlink(tmp);
        free(tmp);
        return rc;
    }
    setvbuf(fp, NULL, _IOFBF, (size_t)1 << 20);
    gguf_out o = {.fp = fp};
    rc = writer_emit(w, &o, align, err);
    if (rc == 0 && fflush(fp) != 0) rc = kp_errf(err, KP_EIO, "gguf: writing '%s': %s", tmp, strerror(errno));
    if (rc == 0 && fsync(fd) != 0) rc = kp_errf(err, KP_EIO, "gguf: fsync '%s': %s", tmp, strerror(errno));
    if (fclose(fp) != 0 && rc == 0) rc = kp_errf(err, KP_EIO, "gguf: closing '%s': %s", tmp, strerror(errno));
    if (rc == 0 && rename(tmp, path) != 0)
        rc = kp_errf(err, KP_EIO, "gguf: rename '%s' -> '%s': %s", tmp, path, strerror(errno));
    if (rc != 0) {
        unlink(tmp); /* keep the first error message; just remove the partial file */
        free(tmp);
        return rc;
    }
    free(tmp);
    return fsync_dir_of(path, err);
}
