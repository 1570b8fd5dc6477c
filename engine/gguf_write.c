/*
 * gguf_write.c — the GGUF v3 writer (gguf_writer_*, gguf_set_*,
 * gguf_add_tensor*; contract in gguf.h). The reader is gguf.c.
 *
 * Why a file of its own: the writer shares nothing with the reader's
 * validation and mapping machinery, only the format (gguf_impl.h), and it is
 * used by other callers (synthetic models, codec files, tests) than the
 * reader's (model loading).
 *
 * Why it is written this way
 *   - Key/values are encoded when set (exactly the bytes that follow the type
 *     field in the file), so writing is a plain copy and gguf_writer_size()
 *     is exact.
 *   - Tensor data can come from a callback at write time
 *     (gguf_add_tensor_cb), so synthetic 16 GB models stream to disk.
 *   - A file is written to PATH.tmp, fsynced, renamed and its directory
 *     fsynced: a crash leaves the old file or the new one, never a torn one.
 */
#include "engine/gguf.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/gguf_impl.h"
#include "kernels/types.h"

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
