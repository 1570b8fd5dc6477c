/*
 * gguf.h — read and write GGUF files (v2 and v3), the llama.cpp ecosystem's
 * model container. kvpark also uses GGUF for its own codec files.
 *
 * Reader contract
 *   - gguf_open() memory-maps the file read-only; gguf_open_mem() parses a
 *     caller-owned buffer (tests, fuzzing). Either validates EVERYTHING before
 *     returning: magic, version (2 or 3), counts, every string length, every
 *     metadata type and array length, nesting (arrays of arrays are refused
 *     unless ...), the alignment key (u32, power of two, <= 1 MiB), every
 *     tensor's name, n_dims (1..4), dims (>0, product fits int64), type (a
 *     known ggml type), row size divisible by the block size, offset aligned
 *     and offset+size inside the data section. A bad file is refused with a
 *     message naming the field (and the key or tensor) and KP_EFORMAT
 *     (KP_EUNSUP for a valid but unknown tensor type or version).
 *   - After a successful open, accessors cannot fail on bounds: every pointer
 *     they hand out points inside the mapping and the lengths are exact.
 *   - Strings in the file are NOT NUL-terminated; accessors return
 *     (pointer, length) pairs. gguf_get_str_dup() gives a malloc'd C string.
 *   - Numeric array data may be unaligned inside the mapping: read elements
 *     with gguf_arr_get_*() helpers or memcpy, never by casting.
 *
 * Writer contract
 *   - gguf_writer collects key/values and tensors (data copied or borrowed),
 *     then gguf_writer_write() writes a v3 file to PATH.tmp, fsyncs, renames
 *     to PATH. Alignment 32 unless general.alignment is set.
 */
#ifndef KP_GGUF_H
#define KP_GGUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "kernels/kp.h"

/* Metadata value types, numbered as in the GGUF spec. */
enum gguf_vtype {
    GGUF_VT_UINT8 = 0,
    GGUF_VT_INT8 = 1,
    GGUF_VT_UINT16 = 2,
    GGUF_VT_INT16 = 3,
    GGUF_VT_UINT32 = 4,
    GGUF_VT_INT32 = 5,
    GGUF_VT_FLOAT32 = 6,
    GGUF_VT_BOOL = 7,
    GGUF_VT_STRING = 8,
    GGUF_VT_ARRAY = 9,
    GGUF_VT_UINT64 = 10,
    GGUF_VT_INT64 = 11,
    GGUF_VT_FLOAT64 = 12,
    GGUF_VT_COUNT
};

typedef struct gguf_file gguf_file;

/* One tensor's description; `data` points into the mapping. ne[0] is the
 * fastest-varying (row length), as in ggml. Unused dims are 1. */
typedef struct gguf_tensor {
    const char *name; /* NUL-terminated copy owned by the gguf_file */
    int type;         /* a kp_type (kernels/types.h), same numbers as ggml_type */
    int n_dims;
    int64_t ne[4];
    int64_t n_elements;
    uint64_t offset;  /* from the start of the data section */
    size_t nbytes;
    const void *data;
} gguf_tensor;

int gguf_open(gguf_file **out, const char *path, kp_err *err);
int gguf_open_mem(gguf_file **out, const void *data, size_t size, kp_err *err);
void gguf_close(gguf_file *f);

uint32_t gguf_version(const gguf_file *f);
uint32_t gguf_alignment(const gguf_file *f);
const char *gguf_path(const gguf_file *f); /* "" for gguf_open_mem */
size_t gguf_file_size(const gguf_file *f);

/* --- metadata --------------------------------------------------------- */
int64_t gguf_n_kv(const gguf_file *f);
int64_t gguf_find_key(const gguf_file *f, const char *key); /* -1 if absent */
const char *gguf_key(const gguf_file *f, int64_t i);       /* NUL-terminated */
enum gguf_vtype gguf_kv_type(const gguf_file *f, int64_t i);

/* Typed getters by key. Return 0, KP_ENOTFOUND if the key is absent, or
 * KP_EFORMAT (with a message naming key and actual type) on a type that
 * cannot be converted: get_int accepts every integer type and bool, get_float
 * accepts f32/f64 and integers, get_bool accepts bool and integers. */
int gguf_get_int(const gguf_file *f, const char *key, int64_t *out, kp_err *err);
int gguf_get_float(const gguf_file *f, const char *key, double *out, kp_err *err);
int gguf_get_bool(const gguf_file *f, const char *key, bool *out, kp_err *err);
int gguf_get_str(const gguf_file *f, const char *key, const char **s, size_t *len,
                 kp_err *err);
char *gguf_get_str_dup(const gguf_file *f, const char *key); /* NULL if absent/not str */

/* Arrays. gguf_get_arr gives element type and count; elements are read with
 * the helpers below (i < n is the caller's job; they do not re-check). */
typedef struct gguf_arr {
    enum gguf_vtype type; /* element type (never ARRAY) */
    uint64_t n;
    const uint8_t *data;  /* numeric: packed elements; string: see below */
    const gguf_file *f;
    int64_t kv_index;
} gguf_arr;
int gguf_get_arr(const gguf_file *f, const char *key, gguf_arr *out, kp_err *err);
int64_t gguf_arr_get_int(const gguf_arr *a, uint64_t i);    /* integer/bool element */
double gguf_arr_get_float(const gguf_arr *a, uint64_t i);   /* f32/f64/integer element */
void gguf_arr_get_str(const gguf_arr *a, uint64_t i, const char **s, size_t *len);

/* --- tensors ---------------------------------------------------------- */
int64_t gguf_n_tensors(const gguf_file *f);
const gguf_tensor *gguf_tensor_at(const gguf_file *f, int64_t i);
const gguf_tensor *gguf_find_tensor(const gguf_file *f, const char *name); /* NULL if absent */

/* --- writer ----------------------------------------------------------- */
typedef struct gguf_writer gguf_writer;

gguf_writer *gguf_writer_new(void);
void gguf_writer_free(gguf_writer *w);
/* Setters replace an existing key of the same name. */
int gguf_set_u32(gguf_writer *w, const char *key, uint32_t v);
int gguf_set_i32(gguf_writer *w, const char *key, int32_t v);
int gguf_set_u64(gguf_writer *w, const char *key, uint64_t v);
int gguf_set_f32(gguf_writer *w, const char *key, float v);
int gguf_set_bool(gguf_writer *w, const char *key, bool v);
int gguf_set_str(gguf_writer *w, const char *key, const char *v);
/* Numeric arrays: `data` holds n packed elements of `type`. */
int gguf_set_arr(gguf_writer *w, const char *key, enum gguf_vtype type, const void *data,
                 uint64_t n);
int gguf_set_arr_str(gguf_writer *w, const char *key, const char *const *v, uint64_t n);
/* Add a tensor. The data (nbytes as implied by type and ne) is copied unless
 * `borrow` is true, in which case it must stay valid until write/free.
 * ne[0] is the row length; n_dims 1..4. */
int gguf_add_tensor(gguf_writer *w, const char *name, int type, int n_dims,
                    const int64_t *ne, const void *data, bool borrow, kp_err *err);
/* Any fixed-size scalar type (u8 .. f64, bool): `v` points at one value of
 * that type. The typed setters above are shorthands for it. */
int gguf_set_val(gguf_writer *w, const char *key, enum gguf_vtype type, const void *v);
/* Add a tensor whose data is produced at write time, so that files larger
 * than memory can be written (synthetic models). fill() is called with
 * consecutive byte ranges [offset, offset+nbytes) of the tensor, each made of
 * whole rows (a row = ne[0] elements), in order; it returns 0 or a KP_E* code
 * (and fills err). tensor_index is the tensor's position in the writer. */
typedef int (*gguf_fill_fn)(void *ctx, int64_t tensor_index, void *dst, uint64_t offset,
                            size_t nbytes, kp_err *err);
int gguf_add_tensor_cb(gguf_writer *w, const char *name, int type, int n_dims,
                       const int64_t *ne, gguf_fill_fn fill, void *ctx, kp_err *err);
/* Exact size in bytes of the file gguf_writer_write() would write now. */
int gguf_writer_size(gguf_writer *w, uint64_t *size, kp_err *err);
int gguf_writer_write(gguf_writer *w, const char *path, kp_err *err);
/* Serialise to a malloc'd buffer (tests, fuzz seeds). */
int gguf_writer_write_mem(gguf_writer *w, uint8_t **out, size_t *size, kp_err *err);

#endif
