/*
 * codec.c — opening a KV codec by name, the self-describing chunk header
 * every codec writes, its checksum, and dispatch to the codec's payload
 * functions (codec_baseline.c for none/fp16/int8/int4/kivi2).
 *
 * Why a header per chunk: a chunk travels alone (host RAM, disk, remote
 * tier, shared between sessions by content address), so it must say what it
 * is and prove it is intact before anyone writes decoded rows into a live
 * KV cache.
 *
 * Chunk = 16-byte header + payload. All integers little-endian.
 *
 *   offset size  field
 *        0    2  magic        'K' 'C' (0x4b 0x43)
 *        2    1  codec id     enum codec_id (0 none, 1 fp16, 2 int8, 3 int4, 4 kivi2)
 *        3    1  kv_type      element type of the rows: 0 F32, 1 F16, 30 BF16
 *        4    2  n            rows (tokens) in the chunk, 1..65535
 *        6    2  flags        bit 0: 1 = values, 0 = keys (codec_chunk.is_v);
 *                             bits 1..15 are zero (a reader refuses others)
 *        8    4  payload      bytes after the header; the chunk is 16 + payload bytes
 *       12    4  checksum     XXH32(payload, seed = XXH32(bytes 0..11, seed 0)):
 *                             covers the header's first 12 bytes AND the payload,
 *                             so any flipped byte of the chunk is caught
 *       16    .  payload      layout per codec, documented in codec_baseline.c
 *
 * Decode checks, in this order, and writes no output unless all pass:
 *   length >= 16, magic, 16 + payload == length, checksum   -> KP_EFORMAT
 *   unknown flag bits                                        -> KP_EFORMAT
 *   codec id, kv_type, n, is_v against the codec and ch      -> KP_EMISMATCH
 *   payload size against what this codec's shape expects    -> KP_EMISMATCH
 *   (for pca/learned the size depends on ch->layer: the layer's coder has
 *   its own rank and bits, and no padding is stored)
 * (a chunk that is intact but was made by another codec, for another row
 * count or another shape, is a mismatch, not damage).
 */
#include "compress/codec_impl.h"
#include "compress/codecfile.h"

#include <stdlib.h>
#include <string.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "kernels/types.h"

#define CODEC_MAX_ROWS 65535
#define CODEC_FLAG_V 1u

_Static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
               "codec payloads store fp16/int8 arrays in host order: little-endian hosts only");

static const codec_ops *const codec_table[] = {
    &codec_ops_none, &codec_ops_fp16, &codec_ops_int8, &codec_ops_int4, &codec_ops_kivi2,
};

#define CODEC_NAMES "none, fp16, int8, int4, kivi2, or a codec file path (pca, learned)"

static uint32_t codec_checksum(const uint8_t *hdr, const uint8_t *payload, size_t len) {
    return XXH32(payload, len, XXH32(hdr, 12, 0));
}

size_t codec_elem_size(int kv_type) {
    switch (kv_type) {
    case KP_TYPE_F32: return 4;
    case KP_TYPE_F16:
    case KP_TYPE_BF16: return 2;
    default: return 0;
    }
}

/* ---- open / free / accessors -------------------------------------------- */

int codec_open(codec **out, const char *name, const codec_shape *shape, kp_err *err) {
    if (!out) return kp_errf(err, KP_EINVAL, "codec_open: out is NULL");
    *out = NULL;
    if (!name || !name[0])
        return kp_errf(err, KP_EINVAL, "codec: no codec name given; use one of: %s", CODEC_NAMES);
    if (!shape) return kp_errf(err, KP_EINVAL, "codec '%s': shape is NULL", name);

    const codec_ops *ops = NULL;
    for (size_t i = 0; i < KP_ARRAY_LEN(codec_table); i++)
        if (strcmp(name, codec_table[i]->name) == 0) ops = codec_table[i];
    if (!ops) {
        if (strcmp(name, "pca") == 0 || strcmp(name, "learned") == 0)
            return kp_errf(err, KP_EINVAL,
                           "codec '%s' is fitted per model: give the path of its codec file "
                           "(make one with: kvpark calibrate -m MODEL -f TEXT -o FILE --kind %s)",
                           name, name);
        if (strchr(name, '/') || strchr(name, '.')) return codecfile_open(out, name, shape, err);
        return kp_errf(err, KP_EINVAL, "codec: unknown codec '%s'; use one of: %s", name,
                       CODEC_NAMES);
    }
    /* The header has no room for the shape: it is the codec's, so it must be sane. */
    if (shape->n_kv_heads < 1 || shape->head_dim < 1 || shape->n_kv_heads > 4096 ||
        shape->head_dim > 4096)
        return kp_errf(err, KP_EINVAL,
                       "codec '%s': bad KV shape n_kv_heads=%d head_dim=%d (each must be 1..4096)",
                       name, shape->n_kv_heads, shape->head_dim);

    codec *c = calloc(1, sizeof *c);
    if (!c) return kp_errf(err, KP_ENOMEM, "codec '%s': out of memory", name);
    c->ops = ops;
    c->shape = *shape;
    c->group = KP_MIN(32, shape->head_dim);
    c->n_groups = (shape->head_dim + c->group - 1) / c->group;
    *out = c;
    return 0;
}

void codec_free(codec *c) { free(c); }

int codec_layout(const codec *c, int *chunk, int *sink, int *window) {
    if (!c || (c->ops->id != CODEC_LEARNED && c->ops->id != CODEC_PCA)) return KP_ENOTFOUND;
    const codec_learned *l = (const codec_learned *)c;
    if (l->chunk <= 0) return KP_ENOTFOUND;
    *chunk = l->chunk;
    *sink = l->sink;
    *window = l->window;
    return 0;
}

const char *codec_name(const codec *c) { return c ? c->ops->name : "(null)"; }

int codec_id_of(const codec *c) { return c ? c->ops->id : -1; }

size_t codec_chunk_bytes(const codec *c, int n, int kv_type, int is_v) {
    if (!c || n < 1 || n > CODEC_MAX_ROWS || codec_elem_size(kv_type) == 0) return 0;
    size_t p = c->ops->payload_bytes(c, n, kv_type, is_v != 0);
    if (p == 0 || p > UINT32_MAX) return 0;
    return CODEC_CHUNK_HEADER_BYTES + p;
}

size_t codec_chunk_bytes_at(const codec *c, int n, int kv_type, int is_v, int layer) {
    if (!c || !c->layer_payload_bytes) return codec_chunk_bytes(c, n, kv_type, is_v);
    if (n < 1 || n > CODEC_MAX_ROWS || codec_elem_size(kv_type) == 0 || layer < 0 ||
        layer >= c->shape.n_layer)
        return 0;
    size_t p = c->layer_payload_bytes(c, n, kv_type, is_v != 0, layer);
    if (p == 0 || p > UINT32_MAX) return 0;
    return CODEC_CHUNK_HEADER_BYTES + p;
}

size_t codec_max_bytes(const codec *c, int n) {
    size_t m = 0;
    static const int types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};
    for (size_t t = 0; t < KP_ARRAY_LEN(types); t++)
        for (int is_v = 0; is_v < 2; is_v++) m = KP_MAX(m, codec_chunk_bytes(c, n, types[t], is_v));
    return m;
}

/* ---- encode / decode ------------------------------------------------------ */

static int codec_check_chunk(const codec *c, const codec_chunk *ch, const char *what, kp_err *err) {
    if (!c || !ch) return kp_errf(err, KP_EINVAL, "codec %s: codec or chunk is NULL", what);
    if (ch->n < 1 || ch->n > CODEC_MAX_ROWS)
        return kp_errf(err, KP_EINVAL, "codec '%s' %s: chunk of %d rows (must be 1..%d)",
                       c->ops->name, what, ch->n, CODEC_MAX_ROWS);
    if (codec_elem_size(ch->kv_type) == 0)
        return kp_errf(err, KP_EUNSUP, "codec '%s' %s: KV element type %d is not F32, F16 or BF16",
                       c->ops->name, what, ch->kv_type);
    return 0;
}

int codec_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *out, size_t cap,
                 size_t *out_len, kp_err *err) {
    int rc = codec_check_chunk(c, ch, "encode", err);
    if (rc) return rc;
    if (!rows || !out) return kp_errf(err, KP_EINVAL, "codec '%s' encode: rows or out is NULL", c->ops->name);
    if (c->layer_payload_bytes && (ch->layer < 0 || ch->layer >= c->shape.n_layer))
        return kp_errf(err, KP_EINVAL, "codec '%s' encode: layer %d outside 0..%d", c->ops->name,
                       ch->layer, c->shape.n_layer - 1);
    size_t total = codec_chunk_bytes_at(c, ch->n, ch->kv_type, ch->is_v, ch->layer);
    if (total == 0)
        return kp_errf(err, KP_ERANGE, "codec '%s' encode: a chunk of %d rows of %d x %d is too large",
                       c->ops->name, ch->n, c->shape.n_kv_heads, c->shape.head_dim);
    if (cap < total)
        return kp_errf(err, KP_ERANGE,
                       "codec '%s' encode: output buffer holds %zu bytes, the chunk needs %zu "
                       "(allocate codec_max_bytes())",
                       c->ops->name, cap, total);
    uint8_t *payload = out + CODEC_CHUNK_HEADER_BYTES;
    rc = c->ops->encode(c, ch, rows, payload, err);
    if (rc) return rc;

    codec_chunk_seal(c, ch, out, total - CODEC_CHUNK_HEADER_BYTES);
    if (out_len) *out_len = total;
    return 0;
}

int codec_chunk_peek(const uint8_t *in, size_t len, codec_chunk_info *out, kp_err *err) {
    if (!in || len < CODEC_CHUNK_HEADER_BYTES)
        return kp_errf(err, KP_EFORMAT, "codec: chunk of %zu bytes is shorter than its 16-byte header (truncated)",
                       in ? len : 0);
    if (in[0] != 'K' || in[1] != 'C')
        return kp_errf(err, KP_EFORMAT, "codec: bad chunk magic %02x %02x (want 'KC')", in[0], in[1]);
    if (out)
        *out = (codec_chunk_info){.codec_id = in[2], .kv_type = in[3], .n = kp_get_u16(in + 4),
                                  .flags = kp_get_u16(in + 6), .payload_bytes = kp_get_u32(in + 8),
                                  .checksum = kp_get_u32(in + 12)};
    return 0;
}

void codec_chunk_seal(const codec *c, const codec_chunk *ch, uint8_t *chunk, size_t payload_len) {
    chunk[0] = 'K';
    chunk[1] = 'C';
    chunk[2] = (uint8_t)c->ops->id;
    chunk[3] = (uint8_t)ch->kv_type;
    kp_put_u16(chunk + 4, (uint16_t)ch->n);
    kp_put_u16(chunk + 6, ch->is_v ? CODEC_FLAG_V : 0);
    kp_put_u32(chunk + 8, (uint32_t)payload_len);
    kp_put_u32(chunk + 12, codec_checksum(chunk, chunk + CODEC_CHUNK_HEADER_BYTES, payload_len));
}

int codec_chunk_verify(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len, const char *what,
                       kp_err *err) {
    int rc = codec_check_chunk(c, ch, what, err);
    if (rc) return rc;
    const char *nm = c->ops->name;
    if (!in || len < CODEC_CHUNK_HEADER_BYTES)
        return kp_errf(err, KP_EFORMAT, "codec '%s' %s: chunk of %zu bytes is shorter than its "
                       "16-byte header (truncated)", nm, what, in ? len : 0);
    if (in[0] != 'K' || in[1] != 'C')
        return kp_errf(err, KP_EFORMAT, "codec '%s' %s: bad chunk magic %02x %02x (want 'KC')",
                       nm, what, in[0], in[1]);
    uint32_t plen = kp_get_u32(in + 8);
    if ((size_t)plen != len - CODEC_CHUNK_HEADER_BYTES)
        return kp_errf(err, KP_EFORMAT,
                       "codec '%s' %s: chunk is %zu bytes but its header says 16 + %u "
                       "(truncated or padded)", nm, what, len, plen);
    uint32_t want = kp_get_u32(in + 12), got = codec_checksum(in, in + CODEC_CHUNK_HEADER_BYTES, plen);
    if (want != got)
        return kp_errf(err, KP_EFORMAT,
                       "codec '%s' %s: chunk checksum mismatch (stored %08x, computed %08x); "
                       "the chunk is corrupt", nm, what, want, got);
    uint16_t flags = kp_get_u16(in + 6);
    if (flags & ~CODEC_FLAG_V)
        return kp_errf(err, KP_EFORMAT, "codec '%s' %s: unknown chunk flags %04x", nm, what, flags);

    if (in[2] != c->ops->id)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' %s: chunk was written by codec id %u, "
                       "this codec is id %d", nm, what, in[2], c->ops->id);
    if (in[3] != ch->kv_type)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' %s: chunk holds KV type %u, caller expects %d",
                       nm, what, in[3], ch->kv_type);
    if (kp_get_u16(in + 4) != ch->n)
        return kp_errf(err, KP_EMISMATCH, "codec '%s' %s: chunk holds %u rows, caller expects %d",
                       nm, what, kp_get_u16(in + 4), ch->n);
    if (((flags & CODEC_FLAG_V) != 0) != (ch->is_v != 0))
        return kp_errf(err, KP_EMISMATCH, "codec '%s' %s: chunk holds %s, caller expects %s", nm, what,
                       (flags & CODEC_FLAG_V) ? "values" : "keys", ch->is_v ? "values" : "keys");
    if (c->layer_payload_bytes && (ch->layer < 0 || ch->layer >= c->shape.n_layer))
        return kp_errf(err, KP_EINVAL, "codec '%s' %s: layer %d outside 0..%d", nm, what, ch->layer,
                       c->shape.n_layer - 1);
    size_t expect = codec_chunk_bytes_at(c, ch->n, ch->kv_type, ch->is_v, ch->layer);
    if (expect != len)
        return kp_errf(err, KP_EMISMATCH,
                       "codec '%s' %s: chunk is %zu bytes, %d rows of %d heads x %d dims need %zu "
                       "(made for another KV shape?)",
                       nm, what, len, ch->n, c->shape.n_kv_heads, c->shape.head_dim, expect);
    return 0;
}

int codec_decode(const codec *c, const codec_chunk *ch, const uint8_t *in, size_t len, void *rows,
                 kp_err *err) {
    int rc = codec_check_chunk(c, ch, "decode", err);
    if (rc) return rc;
    const char *nm = c->ops->name;
    if (!rows) return kp_errf(err, KP_EINVAL, "codec '%s' decode: rows is NULL", nm);
    if ((rc = codec_chunk_verify(c, ch, in, len, "decode", err))) return rc;
    return c->ops->decode(c, ch, in + CODEC_CHUNK_HEADER_BYTES, rows, err);
}
