/*
 * gguf_impl.h — what the GGUF reader (gguf.c) and writer (gguf_write.c)
 * share: the format's limits, the metadata value-type table and the tensor
 * size rule. Internal to engine/gguf*.c; the contract is gguf.h.
 *
 * Why a header: the two halves must agree on these exactly (a file the writer
 * produces must pass the reader's checks), so they are written once. Small
 * and pure, hence static inline.
 */
#ifndef KP_GGUF_IMPL_H
#define KP_GGUF_IMPL_H

#include <stddef.h>
#include <stdint.h>

#include "engine/gguf.h"
#include "kernels/types.h"

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "gguf.c and gguf_write.c read and write GGUF's little-endian fields with memcpy: little-endian hosts only"
#endif

#define GGUF_DEFAULT_ALIGNMENT 32u
#define GGUF_MAX_ALIGNMENT (1u << 20)
#define GGUF_MAX_DIMS 4

/* Name of a metadata value type, for messages. */
static inline const char *vtype_name(uint32_t t) {
    static const char *const gguf_vtype_names[GGUF_VT_COUNT] = {
        "u8", "i8", "u16", "i16", "u32", "i32", "f32", "bool", "string", "array", "u64", "i64", "f64",
    };
    return t < GGUF_VT_COUNT ? gguf_vtype_names[t] : "unknown";
}

/* Bytes of one element of a fixed-size type; 0 for string/array/unknown. */
static inline size_t vtype_size(uint32_t t) {
    switch (t) {
    case GGUF_VT_UINT8: case GGUF_VT_INT8: case GGUF_VT_BOOL: return 1;
    case GGUF_VT_UINT16: case GGUF_VT_INT16: return 2;
    case GGUF_VT_UINT32: case GGUF_VT_INT32: case GGUF_VT_FLOAT32: return 4;
    case GGUF_VT_UINT64: case GGUF_VT_INT64: case GGUF_VT_FLOAT64: return 8;
    default: return 0;
    }
}

/* Tensor byte size: 0 if ne[0] is not a multiple of the block size, the type
 * is unknown or the size does not fit in `limit` bytes (so nothing here can
 * overflow: every block takes at least one byte). */
static inline size_t tensor_nbytes(int type, const int64_t ne[4], uint64_t limit) {
    int blk = kp_type_block(type);
    if (blk <= 0 || ne[0] % blk != 0) return 0;
    if ((uint64_t)(ne[0] / blk) > limit) return 0;
    size_t row = kp_type_row_bytes(type, ne[0]);
    if (row == 0 || row > limit) return 0;
    uint64_t rows = (uint64_t)ne[1] * (uint64_t)ne[2] * (uint64_t)ne[3]; /* checked by caller */
    if (rows > limit / row) return 0;
    return (size_t)(rows * row);
}

#endif
