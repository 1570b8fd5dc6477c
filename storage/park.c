/*
 * park.c — park a sequence's KV cache into the content-addressed store and
 * bring it back (contract in park.h).
 *
 * Why this shape: the store (cas.h) only knows opaque objects under 128-bit
 * keys; the codec (codec.h) only knows chunks of one layer's K or V. Parking
 * cuts the cache into spans (layout_spans, compress/layout.h: the same layout
 * calibration fits for and the quality evaluation measures), turns each span into one self-checking object holding
 * every layer's K and V for that token range, and names it by what produced
 * it, so two sessions that share a prefix share the objects of that prefix.
 *
 * ---- Content key of a span -------------------------------------------------
 * cas_key_of (XXH3-128) over this packed identity, little-endian:
 *    0  tag "KVPKSPK1"                        8 bytes
 *    8  model fingerprint                     u64
 *   16  codec_name(c) (the codec's own name,  32 bytes, NUL-padded
 *       not the path it was opened from)
 *   48  codec hash (codec file content hash)  u64
 *   56  codec id                              u32
 *   60  kv_type                               u32
 *   64  n_layer, n_kv_heads, head_dim         3 x u32
 *   76  layout sink, window, chunk            3 x u32
 *   88  span start, span rows, coded (0/1)    3 x u32
 *  100  token ids [0, span start + rows)      u32 each
 * Every span's key names the codec, even lossless ones (simpler to reason
 * about: one session, one codec; a mismatch is refused, never guessed).
 * A scoped save (park_save_scoped, scope != 0) writes fingerprint XOR
 * XXH64(scope) at offset 8 instead: another scope's keys, so no span is
 * shared across scopes (tenants); scope 0 keys are exactly the unscoped ones.
 *
 * ---- Object of a span (what goes into the store), little-endian ------------
 *    0  magic "KVPKSPN1"                      8 bytes
 *    8  version (1)                           u32
 *   12  n_layer                               u32
 *   16  span start                            u32
 *   20  span rows n                           u32
 *   24  kv_type                               u32
 *   28  codec id of the chunks                u32 (CODEC_NONE for lossless spans)
 *   32  flags: bit 0 = coded span             u32 (other bits zero)
 *   36  entries E (= 2 * n_layer)             u32
 *   40  row_bytes of the cache                u32
 *   44  reserved (0)                          u32
 *   48  entry table, E entries of 24 bytes, entry e = 2 * layer + is_v
 *       (layer 0 K, layer 0 V, layer 1 K, ...):
 *         +0  stored bytes                    u32
 *         +4  encoded bytes (codec chunk)     u32
 *         +8  flags: bit 0 = LZ4              u32 (0: stored raw because
 *                                                 LZ4 did not shrink it)
 *        +12  reserved (0)                    u32
 *        +16  XXH64 of the stored bytes       u64 (seed 0)
 *   48 + 24E  XXH64 of bytes [0, 48 + 24E)    u64 (seed 0)
 *   56 + 24E  payloads, in entry order, back to back
 * total = 56 + 24E + sum(stored bytes); anything else is refused.
 * Each payload is a whole codec chunk (its 16-byte header included, see
 * codec.c), encoded with the session's codec for coded spans and with codec
 * "none" (the cache's own bits, an internally opened codec of the same
 * shape) for lossless spans, then LZ4_compress_default'd when that shrinks it.
 *
 * ---- Manifest byte form, little-endian -------------------------------------
 *    0  magic "KVPKMAN1"                      8 bytes
 *    8  version (1, or 2 when scoped)         u32
 *   12  header bytes (128)                    u32
 *   16  model fingerprint                     u64
 *   24  codec as given                        64 bytes, NUL-terminated, NUL-padded
 *   88  codec hash                            u64
 *   96  kv_type                               u32
 *  100  sink, window, chunk                   3 x u32
 *  112  n_tokens                              u32
 *  116  n_spans                               u32
 *  120  version 1: reserved (0); version 2:    u64
 *       the scope (never 0)
 *  128  token ids                             n_tokens x u32
 *   ..  spans, 32 bytes each: start u32, n u32, flags u32 (bit 0 coded),
 *       stored bytes u32, key.hi u64, key.lo u64
 *   ..  XXH64 of every byte before it         u64 (seed 0)
 * total = 136 + 4 n_tokens + 32 n_spans. The reader checks the length, the
 * checksum, every field's range, and that the spans are exactly
 * layout_spans({sink, window, chunk}, n_tokens).
 *
 * ---- Restore ----------------------------------------------------------------
 * Phase 1 fetches every span's object and verifies it completely (header,
 * sizes, checksums of the header and of every payload, and the codec chunk
 * header inside each payload: codec, rows, K/V, element type) — nothing is
 * written to the cache yet (park_restore_begin). Phase 2 (park_restore_layer,
 * one layer at a time, in order) LZ4-decodes and codec-decodes that layer's
 * K and V payload of every span into a temporary row buffer and uploads it
 * with the backend's upload (a device cache works like a host one), so a
 * caller can use layer l while deeper layers still decode. n_pos is set to
 * n_tokens by park_restore_end only when every layer succeeded;
 * park_restore is begin + every layer + end. Phase 1 holds the compressed
 * session in RAM (its stored size), which is what makes "a corrupt object
 * harms nothing" true; a failure in phase 2 (a device upload error) may have
 * overwritten rows, but n_pos is left as it was.
 * The caller checks m->model_fingerprint against its model (the cache does
 * not know which model filled it).
 */
#include "storage/park.h"
#include "storage/fsutil.h"

#include <lz4.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <xxhash.h>

#define PARK_KEY_TAG "KVPKSPK1"
#define PARK_KEY_HDR 100
#define PARK_OBJ_MAGIC "KVPKSPN1"
#define PARK_OBJ_VERSION 1u
#define PARK_OBJ_HDR 48
#define PARK_OBJ_ENTRY 24
#define PARK_MAN_MAGIC "KVPKMAN1"
#define PARK_MAN_VERSION 1u
#define PARK_MAN_VERSION_SCOPED 2u
#define PARK_MAN_HDR 128
#define PARK_MAN_SPAN 32
#define PARK_MAX_TOKENS (1 << 24)
#define PARK_MAX_LAYERS 4096

park_layout park_default_layout(void) { return layout_default(); }

static bool park_type_ok(int t) {
    return t == KP_TYPE_F32 || t == KP_TYPE_F16 || t == KP_TYPE_BF16;
}

/* The spans of n rows under lay, malloc'd into *out (NULL when there are none). */
static int park_spans_of(int n, const park_layout *lay, layout_span **out, int *n_out,
                         kp_err *err) {
    *out = NULL;
    *n_out = 0;
    if (n < 0 || layout_check(lay, NULL))
        return kp_errf(err, KP_EINVAL, "park: bad layout (sink %d, window %d, chunk %d) for %d "
                       "tokens", lay->sink, lay->window, lay->chunk, n);
    return layout_spans_alloc(lay, n, out, n_out, err);
}

/* ---- content keys --------------------------------------------------------- */

/* The identity buffer: header + all token ids; park_key() fills the span part
 * of the header and hashes the prefix up to the span's end. */
typedef struct park_keyer {
    uint8_t *buf; /* [PARK_KEY_HDR + 4 * n_tokens] */
} park_keyer;

static int park_keyer_init(park_keyer *kr, uint64_t model_fp, uint64_t scope, const char *cname,
                           uint64_t codec_hash, int codec_id, int kv_type, int n_layer,
                           int n_kv_heads, int head_dim, const park_layout *lay,
                           const int32_t *tokens, int n_tokens, kp_err *err) {
    kr->buf = calloc(1, PARK_KEY_HDR + 4 * (size_t)n_tokens);
    if (!kr->buf) return kp_errf(err, KP_ENOMEM, "park: out of memory (%d tokens)", n_tokens);
    uint8_t *h = kr->buf;
    memcpy(h, PARK_KEY_TAG, 8);
    uint8_t sb[8];
    kp_put_u64(sb, scope);
    kp_put_u64(h + 8, scope ? model_fp ^ XXH64(sb, sizeof sb, 0x73636f7065ull /* "scope" */) : model_fp);
    memcpy(h + 16, cname, strnlen(cname, 31)); /* codec names are short ("learned") */
    kp_put_u64(h + 48, codec_hash);
    kp_put_u32(h + 56, (uint32_t)codec_id);
    kp_put_u32(h + 60, (uint32_t)kv_type);
    kp_put_u32(h + 64, (uint32_t)n_layer);
    kp_put_u32(h + 68, (uint32_t)n_kv_heads);
    kp_put_u32(h + 72, (uint32_t)head_dim);
    kp_put_u32(h + 76, (uint32_t)lay->sink);
    kp_put_u32(h + 80, (uint32_t)lay->window);
    kp_put_u32(h + 84, (uint32_t)lay->chunk);
    for (int i = 0; i < n_tokens; i++) kp_put_u32(h + PARK_KEY_HDR + 4 * (size_t)i, (uint32_t)tokens[i]);
    return 0;
}

static cas_key park_key(park_keyer *kr, int start, int n, bool coded) {
    kp_put_u32(kr->buf + 88, (uint32_t)start);
    kp_put_u32(kr->buf + 92, (uint32_t)n);
    kp_put_u32(kr->buf + 96, coded ? 1u : 0u);
    return cas_key_of(kr->buf, PARK_KEY_HDR + 4 * (size_t)(start + n));
}

/* ---- objects ---------------------------------------------------------------- */

/* Check an object against what the span must be; on success the payload of
 * entry e starts at buf + off[e]. Verifies every checksum and the codec chunk
 * header inside each payload (decompressing only its first 16 bytes), so a
 * passing object can be decoded without surprises. */
static int park_obj_check(const uint8_t *buf, size_t len, const kv_cache *kv, int start, int n,
                          bool coded, const codec *cc, size_t *off, int span_idx, kp_err *err) {
    const int codec_id = codec_id_of(cc);
#define PARK_BAD(...)                                                                      \
    do {                                                                                   \
        char why_[256];                                                                    \
        snprintf(why_, sizeof why_, __VA_ARGS__);                                          \
        return kp_errf(err, KP_EFORMAT, "park: span %d (tokens %d..%d): %s", span_idx,     \
                       start, start + n - 1, why_);                                        \
    } while (0)
    const uint32_t E = 2u * (uint32_t)kv->n_layer;
    const size_t table_end = PARK_OBJ_HDR + (size_t)E * PARK_OBJ_ENTRY;
    if (len < table_end + 8) PARK_BAD("object of %zu bytes is truncated", len);
    if (memcmp(buf, PARK_OBJ_MAGIC, 8) != 0) PARK_BAD("bad object magic");
    if (XXH64(buf, table_end, 0) != kp_get_u64(buf + table_end))
        PARK_BAD("object header checksum mismatch (corrupt object)");
    if (kp_get_u32(buf + 8) != PARK_OBJ_VERSION)
        PARK_BAD("object version %u is not supported (want %u)", kp_get_u32(buf + 8),
                 PARK_OBJ_VERSION);
    if (kp_get_u32(buf + 12) != (uint32_t)kv->n_layer || kp_get_u32(buf + 36) != E ||
        kp_get_u32(buf + 40) != (uint32_t)kv->row_bytes || kp_get_u32(buf + 24) != (uint32_t)kv->kv_type)
        PARK_BAD("object was made for another KV shape (%u layers, kv_type %u, row %u bytes)",
                 kp_get_u32(buf + 12), kp_get_u32(buf + 24), kp_get_u32(buf + 40));
    if (kp_get_u32(buf + 16) != (uint32_t)start || kp_get_u32(buf + 20) != (uint32_t)n ||
        kp_get_u32(buf + 32) != (coded ? 1u : 0u) || kp_get_u32(buf + 44) != 0)
        PARK_BAD("object holds another span (start %u, %u rows, flags %u)", kp_get_u32(buf + 16),
                 kp_get_u32(buf + 20), kp_get_u32(buf + 32));
    if (kp_get_u32(buf + 28) != (uint32_t)codec_id)
        PARK_BAD("object was coded with codec id %u, expected %d", kp_get_u32(buf + 28), codec_id);
    size_t pos = table_end + 8;
    for (uint32_t e = 0; e < E; e++) {
        const uint8_t *t = buf + PARK_OBJ_HDR + (size_t)e * PARK_OBJ_ENTRY;
        uint32_t stored = kp_get_u32(t), enc = kp_get_u32(t + 4), fl = kp_get_u32(t + 8);
        if ((fl & ~1u) || kp_get_u32(t + 12) != 0) PARK_BAD("entry %u has unknown flags", e);
        if (stored > len - pos) PARK_BAD("entry %u of %u bytes runs past the object end", e, stored);
        /* codec_chunk_bytes is the exact size for the baselines and the
         * largest over layers for per-layer codecs (learned); codec_decode
         * checks the exact size later. */
        if (enc < CODEC_CHUNK_HEADER_BYTES || enc > codec_chunk_bytes(cc, n, kv->kv_type, (int)(e % 2)) ||
            enc > LZ4_MAX_INPUT_SIZE || (!(fl & 1) && stored != enc))
            PARK_BAD("entry %u has a bad encoded size %u", e, enc);
        if (XXH64(buf + pos, stored, 0) != kp_get_u64(t + 16))
            PARK_BAD("layer %u %s checksum mismatch (corrupt object)", e / 2, e % 2 ? "V" : "K");
        uint8_t ch[CODEC_CHUNK_HEADER_BYTES];
        if (fl & 1) {
            int got = LZ4_decompress_safe_partial((const char *)buf + pos, (char *)ch, (int)stored,
                                                  CODEC_CHUNK_HEADER_BYTES, CODEC_CHUNK_HEADER_BYTES);
            if (got != CODEC_CHUNK_HEADER_BYTES) PARK_BAD("layer %u %s: bad LZ4 stream", e / 2, e % 2 ? "V" : "K");
        } else {
            memcpy(ch, buf + pos, CODEC_CHUNK_HEADER_BYTES);
        }
        codec_chunk_info hi;
        if (codec_chunk_peek(ch, sizeof ch, &hi, NULL) || hi.codec_id != (uint8_t)codec_id ||
            hi.kv_type != (uint8_t)kv->kv_type || hi.n != (uint16_t)n || hi.flags != (e % 2) ||
            hi.payload_bytes != enc - CODEC_CHUNK_HEADER_BYTES)
            PARK_BAD("layer %u %s: codec chunk header does not match the span", e / 2,
                     e % 2 ? "V" : "K");
        off[e] = pos;
        pos += stored;
    }
    if (pos != len) PARK_BAD("object has %zu trailing bytes", len - pos);
    return 0;
#undef PARK_BAD
}

/* Work buffers of a save or restore, sized for the largest span. */
typedef struct park_bufs {
    uint8_t *rows;   /* [chunk][row_bytes] */
    uint8_t *enc;    /* one encoded chunk */
    size_t enc_cap;
    uint8_t *obj;    /* one whole object (save) */
    size_t obj_cap;
} park_bufs;

static void park_bufs_free(park_bufs *b) {
    free(b->rows);
    free(b->enc);
    free(b->obj);
}

static int park_bufs_init(park_bufs *b, const codec *c, const codec *none, const kv_cache *kv,
                          int max_rows, bool with_obj, kp_err *err) {
    memset(b, 0, sizeof *b);
    if (max_rows < 1) max_rows = 1;
    size_t ec = codec_max_bytes(c, max_rows);
    size_t en = none ? codec_max_bytes(none, max_rows) : 0;
    b->enc_cap = KP_MAX(ec, en);
    if (b->enc_cap == 0 || b->enc_cap > (size_t)LZ4_MAX_INPUT_SIZE)
        return kp_errf(err, KP_ERANGE, "park: a chunk of %d rows (%zu encoded bytes) is too big "
                       "for LZ4; use a smaller chunk", max_rows, b->enc_cap);
    b->rows = malloc((size_t)max_rows * kv->row_bytes);
    b->enc = malloc(b->enc_cap);
    if (with_obj) {
        b->obj_cap = PARK_OBJ_HDR + 8 + (size_t)kv->n_layer * 2 *
                     (PARK_OBJ_ENTRY + (size_t)LZ4_compressBound((int)b->enc_cap));
        b->obj = malloc(b->obj_cap);
    }
    if (!b->rows || !b->enc || (with_obj && !b->obj)) {
        park_bufs_free(b);
        return kp_errf(err, KP_ENOMEM, "park: out of memory for %d-row buffers", max_rows);
    }
    return 0;
}

/* Encode span [start, start + n) of every layer into b->obj; *len its size. */
static int park_obj_build(park_bufs *b, const codec *cc, const kv_cache *kv, int start, int n,
                          bool coded, size_t *len, kp_err *err) {
    const uint32_t E = 2u * (uint32_t)kv->n_layer;
    const size_t table_end = PARK_OBJ_HDR + (size_t)E * PARK_OBJ_ENTRY;
    uint8_t *o = b->obj;
    memset(o, 0, table_end + 8);
    memcpy(o, PARK_OBJ_MAGIC, 8);
    kp_put_u32(o + 8, PARK_OBJ_VERSION);
    kp_put_u32(o + 12, (uint32_t)kv->n_layer);
    kp_put_u32(o + 16, (uint32_t)start);
    kp_put_u32(o + 20, (uint32_t)n);
    kp_put_u32(o + 24, (uint32_t)kv->kv_type);
    kp_put_u32(o + 28, (uint32_t)codec_id_of(cc));
    kp_put_u32(o + 32, coded ? 1u : 0u);
    kp_put_u32(o + 36, E);
    kp_put_u32(o + 40, (uint32_t)kv->row_bytes);
    size_t pos = table_end + 8;
    for (int l = 0; l < kv->n_layer; l++) {
        for (int is_v = 0; is_v < 2; is_v++) {
            int rc = kv_read_rows(kv, l, is_v, start, n, b->rows, NULL);
            if (rc)
                return kp_errf(err, rc, "park: cannot read layer %d %s rows %d..%d of the KV "
                               "cache", l, is_v ? "V" : "K", start, start + n - 1);
            codec_chunk ch = {.layer = l, .is_v = is_v, .pos0 = start, .n = n,
                              .kv_type = kv->kv_type};
            size_t enc_len = 0;
            if ((rc = codec_encode(cc, &ch, b->rows, b->enc, b->enc_cap, &enc_len, err))) return rc;
            int cap = (int)KP_MIN(b->obj_cap - pos, (size_t)LZ4_MAX_INPUT_SIZE);
            int z = LZ4_compress_default((const char *)b->enc, (char *)o + pos, (int)enc_len, cap);
            uint32_t flags = 1;
            if (z <= 0 || (size_t)z >= enc_len) {
                memcpy(o + pos, b->enc, enc_len);
                z = (int)enc_len;
                flags = 0;
            }
            uint8_t *t = o + PARK_OBJ_HDR + (size_t)(2 * l + is_v) * PARK_OBJ_ENTRY;
            kp_put_u32(t, (uint32_t)z);
            kp_put_u32(t + 4, (uint32_t)enc_len);
            kp_put_u32(t + 8, flags);
            kp_put_u64(t + 16, XXH64(o + pos, (size_t)z, 0));
            pos += (size_t)z;
        }
    }
    kp_put_u64(o + table_end, XXH64(o, table_end, 0));
    *len = pos;
    return 0;
}

/* ---- save ------------------------------------------------------------------- */

static void park_unref_all(cas *store, const park_span *sp, int n) {
    for (int i = 0; i < n; i++) cas_unref(store, sp[i].key);
}

int park_save(cas *store, const codec *c, uint64_t codec_hash, const char *codec_name_given,
              uint64_t model_fingerprint, const park_layout *lay, const kv_cache *kv,
              const int32_t *tokens, int n_tokens, bool durable, park_manifest *out,
              park_stats *st, kp_err *err) {
    return park_save_scoped(store, c, codec_hash, codec_name_given, model_fingerprint, 0, lay, kv, tokens,
                            n_tokens, durable, out, st, err);
}

int park_save_scoped(cas *store, const codec *c, uint64_t codec_hash, const char *codec_name_given,
                     uint64_t model_fingerprint, uint64_t scope, const park_layout *lay, const kv_cache *kv,
                     const int32_t *tokens, int n_tokens, bool durable, park_manifest *out, park_stats *st,
                     kp_err *err) {
    double t0 = kp_now();
    if (!store || !c || !lay || !kv || !out)
        return kp_errf(err, KP_EINVAL, "park: save: NULL argument");
    memset(out, 0, sizeof *out);
    if (st) memset(st, 0, sizeof *st);
    if (n_tokens < 0 || n_tokens > kv->n_pos || n_tokens > PARK_MAX_TOKENS)
        return kp_errf(err, KP_EINVAL, "park: save: %d tokens but the KV cache holds %d rows "
                       "(need 0 <= tokens <= rows, at most %d)", n_tokens, kv->n_pos,
                       PARK_MAX_TOKENS);
    if (n_tokens > 0 && !tokens) return kp_errf(err, KP_EINVAL, "park: save: tokens is NULL");
    if (!park_type_ok(kv->kv_type) || kv->n_layer < 1 || kv->n_layer > PARK_MAX_LAYERS)
        return kp_errf(err, KP_EINVAL, "park: save: KV cache of type %d with %d layers is not "
                       "supported", kv->kv_type, kv->n_layer);
    const char *given = codec_name_given ? codec_name_given : codec_name(c);
    if (strlen(given) >= sizeof out->codec)
        return kp_errf(err, KP_EINVAL, "park: codec name '%.40s...' is longer than %zu bytes",
                       given, sizeof out->codec - 1);

    layout_span *qs = NULL;
    int ns = 0;
    int rc = park_spans_of(n_tokens, lay, &qs, &ns, err);
    if (rc) return rc;

    codec_shape shape = {.n_layer = kv->n_layer, .n_kv_heads = kv->n_kv_heads,
                         .head_dim = kv->head_dim, .model_fingerprint = model_fingerprint};
    codec *none = NULL;
    park_keyer kr = {0};
    park_bufs b = {0};
    park_span *spans = calloc((size_t)(ns ? ns : 1), sizeof *spans);
    int32_t *toks = malloc((size_t)(n_tokens ? n_tokens : 1) * sizeof *toks);
    size_t *offs = malloc(2 * (size_t)kv->n_layer * sizeof *offs);
    int n_ref = 0;
    if (!spans || !toks || !offs) {
        rc = kp_errf(err, KP_ENOMEM, "park: out of memory (%d spans)", ns);
        goto fail;
    }
    if ((rc = codec_open(&none, "none", &shape, err))) goto fail;
    if ((rc = park_keyer_init(&kr, model_fingerprint, scope, codec_name(c), codec_hash, codec_id_of(c),
                              kv->kv_type, kv->n_layer, kv->n_kv_heads, kv->head_dim, lay,
                              tokens, n_tokens, err)))
        goto fail;
    int max_rows = 1;
    for (int i = 0; i < ns; i++) max_rows = KP_MAX(max_rows, qs[i].n);
    if ((rc = park_bufs_init(&b, c, none, kv, max_rows, true, err))) goto fail;

    for (int i = 0; i < ns; i++) {
        park_span *ps = &spans[i];
        const layout_span *sp = &ps->span;
        ps->span = qs[i];
        ps->key = park_key(&kr, sp->start, sp->n, sp->coded);
        /* Already stored (a shared prefix)? Take the reference first so a
         * concurrent collect cannot free it, then read it back: that gives
         * its size and proves it intact (a corrupt copy is quarantined by
         * cas_get and we store a fresh one). */
        if (cas_ref(store, ps->key) == 0) {
            void *data = NULL;
            size_t len = 0;
            if (cas_get(store, ps->key, &data, &len, NULL) == 0 && len <= UINT32_MAX) {
                /* A copy that is intact for the store but not a valid span
                 * object (garbage put under the key) cannot be replaced
                 * (objects are immutable): refuse rather than reference it. */
                rc = park_obj_check(data, len, kv, sp->start, sp->n, sp->coded,
                                    sp->coded ? c : none, offs, i, err);
                free(data);
                if (rc) {
                    cas_unref(store, ps->key);
                    goto fail;
                }
                ps->bytes = (uint32_t)len;
                n_ref++;
                if (st) st->spans_reused++, st->bytes_total += len;
                continue;
            }
            free(data);
            cas_unref(store, ps->key); /* may be gone already (quarantined) */
        }
        size_t len = 0;
        rc = park_obj_build(&b, sp->coded ? c : none, kv, sp->start, sp->n, sp->coded, &len, err);
        if (rc) goto fail_span;
        if (len > UINT32_MAX) {
            rc = kp_errf(err, KP_ERANGE, "park: span %d object of %zu bytes is too big", i, len);
            goto fail_span;
        }
        /* put and ref in one step: a collect cannot take the new object in between */
        if ((rc = cas_put_ref(store, ps->key, b.obj, len, durable, err))) goto fail_span;
        n_ref++;
        ps->bytes = (uint32_t)len;
        if (st) st->bytes_new += len, st->bytes_total += len;
        continue;
    fail_span: {
        kp_err inner = err ? *err : (kp_err){0};
        if (err)
            kp_errf(err, rc, "park: save of span %d (tokens %d..%d) failed: %s", i, sp->start,
                    sp->start + sp->n - 1, inner.msg);
        goto fail;
    }
    }

    if (n_tokens) memcpy(toks, tokens, (size_t)n_tokens * sizeof *toks);
    out->model_fingerprint = model_fingerprint;
    out->scope = scope;
    strcpy(out->codec, given);
    out->codec_hash = codec_hash;
    out->kv_type = kv->kv_type;
    out->layout = *lay;
    out->n_tokens = n_tokens;
    out->tokens = toks;
    out->spans = spans;
    out->n_spans = ns;
    if (st) {
        st->fp16_bytes = (uint64_t)n_tokens * (uint64_t)kv->n_layer * 2u *
                         (uint64_t)kv->n_kv_heads * (uint64_t)kv->head_dim * 2u;
        st->ms = (kp_now() - t0) * 1e3;
    }
    park_bufs_free(&b);
    free(kr.buf);
    codec_free(none);
    free(qs);
    free(offs);
    return 0;

fail:
    park_unref_all(store, spans, n_ref);
    park_bufs_free(&b);
    free(kr.buf);
    codec_free(none);
    free(qs);
    free(spans);
    free(toks);
    free(offs);
    return rc;
}

/* ---- restore ---------------------------------------------------------------- */

/* A restore in progress: every object fetched and verified (phase 1), then
 * decoded one layer at a time (phase 2). */
struct park_restorer {
    cas *store;
    const codec *c;        /* the session's codec (the caller's, kept open) */
    codec *none;           /* lossless spans */
    kv_cache *kv;
    int n_tokens;
    int ns;
    park_span *spans;      /* [ns] copy of the manifest's spans */
    uint8_t **objs;        /* [ns] verified objects */
    size_t *offs;          /* [ns][2 * n_layer] payload offsets */
    park_bufs b;
    int next_layer;        /* layers [0, next_layer) are decoded */
    bool failed;           /* a layer failed: n_pos must stay */
    uint64_t bytes_total;
    double t0;
};

static void park_restorer_free(park_restorer *r) {
    if (!r) return;
    if (r->objs)
        for (int i = 0; i < r->ns; i++) free(r->objs[i]);
    free(r->objs);
    free(r->offs);
    free(r->spans);
    park_bufs_free(&r->b);
    codec_free(r->none);
    free(r);
}

int park_restore_begin(cas *store, const codec *c, const park_manifest *m, kv_cache *kv,
                       park_restorer **out, kp_err *err) {
    double t0 = kp_now();
    if (out) *out = NULL;
    if (!store || !c || !m || !kv || !out)
        return kp_errf(err, KP_EINVAL, "park: restore: NULL argument");
    if (m->kv_type != kv->kv_type)
        return kp_errf(err, KP_EMISMATCH, "park: session was parked from a kv_type %d cache, "
                       "cannot restore into kv_type %d", m->kv_type, kv->kv_type);
    if (m->n_tokens < 0 || m->n_tokens > kv->n_ctx || (m->n_tokens > 0 && !m->tokens))
        return kp_errf(err, KP_ERANGE, "park: session of %d tokens does not fit a KV cache of %d "
                       "rows", m->n_tokens, kv->n_ctx);
    if (kv->n_layer < 1 || kv->n_layer > PARK_MAX_LAYERS)
        return kp_errf(err, KP_EINVAL, "park: restore: %d layers", kv->n_layer);
    if (m->n_tokens > 0 && m->n_spans == 0)
        return kp_errf(err, KP_ELOST, "park: the manifest holds %d token ids and no KV (tokens only)", m->n_tokens);

    layout_span *qs = NULL;
    int ns = 0;
    int rc = park_spans_of(m->n_tokens, &m->layout, &qs, &ns, err);
    if (rc) return rc;
    if (ns != m->n_spans || (ns > 0 && !m->spans)) {
        free(qs);
        return kp_errf(err, KP_EFORMAT, "park: manifest lists %d spans, its layout gives %d",
                       m->n_spans, ns);
    }
    for (int i = 0; i < ns; i++)
        if (m->spans[i].span.start != qs[i].start || m->spans[i].span.n != qs[i].n ||
            m->spans[i].span.coded != (qs[i].coded != 0)) {
            free(qs);
            return kp_errf(err, KP_EFORMAT, "park: manifest span %d does not follow its layout", i);
        }
    free(qs);

    const size_t E = 2u * (size_t)kv->n_layer;
    park_restorer *r = calloc(1, sizeof *r);
    if (!r) return kp_errf(err, KP_ENOMEM, "park: out of memory");
    r->store = store;
    r->c = c;
    r->kv = kv;
    r->n_tokens = m->n_tokens;
    r->ns = ns;
    r->t0 = t0;
    r->spans = malloc((size_t)(ns ? ns : 1) * sizeof *r->spans);
    r->objs = calloc((size_t)(ns ? ns : 1), sizeof *r->objs);
    r->offs = calloc((size_t)(ns ? ns : 1) * E, sizeof *r->offs);
    park_keyer kr = {0};
    if (!r->spans || !r->objs || !r->offs) {
        rc = kp_errf(err, KP_ENOMEM, "park: out of memory (%d spans)", ns);
        goto fail;
    }
    if (ns) memcpy(r->spans, m->spans, (size_t)ns * sizeof *r->spans);

    /* The keys must be what this codec, these tokens and this cache shape
     * give: that proves the session was parked with this codec. */
    codec_shape shape = {.n_layer = kv->n_layer, .n_kv_heads = kv->n_kv_heads,
                         .head_dim = kv->head_dim, .model_fingerprint = m->model_fingerprint};
    if ((rc = park_keyer_init(&kr, m->model_fingerprint, m->scope, codec_name(c), m->codec_hash,
                              codec_id_of(c), kv->kv_type, kv->n_layer, kv->n_kv_heads,
                              kv->head_dim, &m->layout, m->tokens, m->n_tokens, err)))
        goto fail;
    for (int i = 0; i < ns; i++) {
        const park_span *ps = &m->spans[i];
        const layout_span *sp = &ps->span;
        cas_key k = park_key(&kr, sp->start, sp->n, sp->coded);
        if (k.hi != ps->key.hi || k.lo != ps->key.lo) {
            rc = kp_errf(err, KP_EMISMATCH, "park: span %d (tokens %d..%d) was not parked with "
                         "codec '%s' for this KV shape (session codec '%s')", i, sp->start,
                         sp->start + sp->n - 1, codec_name(c), m->codec);
            goto fail;
        }
    }
    free(kr.buf);
    kr.buf = NULL;
    if ((rc = codec_open(&r->none, "none", &shape, err))) goto fail;
    int max_rows = 1;
    for (int i = 0; i < ns; i++) max_rows = KP_MAX(max_rows, m->spans[i].span.n);
    if ((rc = park_bufs_init(&r->b, c, r->none, kv, max_rows, false, err))) goto fail;

    /* Phase 1: fetch and verify everything. */
    for (int i = 0; i < ns; i++) {
        const park_span *ps = &m->spans[i];
        const layout_span *sp = &ps->span;
        void *data = NULL;
        size_t len = 0;
        kp_err e2 = {0};
        rc = cas_get(store, ps->key, &data, &len, &e2);
        if (rc) {
            char hex[33];
            cas_key_hex(ps->key, hex);
            rc = kp_errf(err, rc, "park: span %d (tokens %d..%d, object %s) cannot be read: %s",
                         i, sp->start, sp->start + sp->n - 1, hex, e2.msg);
            goto fail;
        }
        r->objs[i] = data;
        r->bytes_total += len;
        if ((rc = park_obj_check(r->objs[i], len, kv, sp->start, sp->n, sp->coded,
                                 sp->coded ? c : r->none, r->offs + (size_t)i * E, i, err)))
            goto fail;
    }
    *out = r;
    return 0;
fail:
    free(kr.buf);
    park_restorer_free(r);
    return rc;
}

int park_restore_layer(park_restorer *r, int l, kp_err *err) {
    if (!r) return kp_errf(err, KP_EINVAL, "park: restore layer: NULL handle");
    kv_cache *kv = r->kv;
    if (r->failed)
        return kp_errf(err, KP_EINVAL, "park: restore layer %d: an earlier layer failed", l);
    if (l != r->next_layer || l >= kv->n_layer)
        return kp_errf(err, KP_EINVAL, "park: restore layer %d out of order (expected %d of %d)",
                       l, r->next_layer, kv->n_layer);
    const size_t E = 2u * (size_t)kv->n_layer;
    int rc = 0;
    for (int i = 0; i < r->ns; i++) {
        const park_span *ps = &r->spans[i];
        const layout_span *sp = &ps->span;
        const codec *cc = sp->coded ? r->c : r->none;
        for (int is_v = 0; is_v < 2; is_v++) {
            size_t e = 2u * (size_t)l + (size_t)is_v;
            const uint8_t *t = r->objs[i] + PARK_OBJ_HDR + e * PARK_OBJ_ENTRY;
            uint32_t stored = kp_get_u32(t), enc = kp_get_u32(t + 4), fl = kp_get_u32(t + 8);
            const uint8_t *src = r->objs[i] + r->offs[(size_t)i * E + e];
            if (enc > r->b.enc_cap) {
                rc = kp_errf(err, KP_EFORMAT, "park: span %d (tokens %d..%d): chunk of %u bytes "
                             "exceeds the codec's bound", i, sp->start, sp->start + sp->n - 1, enc);
                goto fail;
            }
            if (fl & 1) {
                int got = LZ4_decompress_safe((const char *)src, (char *)r->b.enc, (int)stored,
                                              (int)enc);
                if (got != (int)enc) {
                    rc = kp_errf(err, KP_EFORMAT, "park: span %d (tokens %d..%d): bad LZ4 data",
                                 i, sp->start, sp->start + sp->n - 1);
                    goto fail;
                }
            } else {
                memcpy(r->b.enc, src, enc);
            }
            codec_chunk ch = {.layer = l, .is_v = is_v, .pos0 = sp->start, .n = sp->n,
                              .kv_type = kv->kv_type};
            kp_err e2 = {0};
            if ((rc = codec_decode(cc, &ch, r->b.enc, enc, r->b.rows, &e2))) {
                rc = kp_errf(err, rc, "park: span %d (tokens %d..%d): %s", i, sp->start,
                             sp->start + sp->n - 1, e2.msg);
                goto fail;
            }
            if ((rc = kv_write_rows(kv, l, is_v, sp->start, sp->n, r->b.rows, NULL))) {
                rc = kp_errf(err, rc, "park: span %d (tokens %d..%d): cannot write layer %d of "
                             "the KV cache", i, sp->start, sp->start + sp->n - 1, l);
                goto fail;
            }
        }
    }
    r->next_layer++;
    return 0;
fail:
    r->failed = true;
    return rc;
}

int park_restore_end(park_restorer *r, park_stats *st) {
    if (st) memset(st, 0, sizeof *st);
    if (!r) return KP_EINVAL;
    kv_cache *kv = r->kv;
    int rc = KP_ECANCELED;
    if (!r->failed && r->next_layer == kv->n_layer) {
        kv->n_pos = r->n_tokens;
        rc = 0;
    }
    if (st) {
        st->bytes_total = r->bytes_total;
        st->fp16_bytes = (uint64_t)r->n_tokens * (uint64_t)kv->n_layer * 2u *
                         (uint64_t)kv->n_kv_heads * (uint64_t)kv->head_dim * 2u;
        st->ms = (kp_now() - r->t0) * 1e3;
    }
    park_restorer_free(r);
    return rc;
}

int park_restore(cas *store, const codec *c, const park_manifest *m, kv_cache *kv,
                 park_stats *st, kp_err *err) {
    if (st) memset(st, 0, sizeof *st);
    park_restorer *r = NULL;
    int rc = park_restore_begin(store, c, m, kv, &r, err);
    if (rc) return rc;
    for (int l = 0; l < kv->n_layer && rc == 0; l++) rc = park_restore_layer(r, l, err);
    int end = park_restore_end(r, rc ? NULL : st);
    return rc ? rc : end;
}

/* ---- codec identity ------------------------------------------------------------- */

uint64_t park_codec_hash(const char *name) {
    if (!name) return 0;
    struct stat sb;
    if (stat(name, &sb) || !S_ISREG(sb.st_mode)) return 0;
    FILE *f = fopen(name, "rb");
    if (!f) return 0;
    XXH3_state_t *h = XXH3_createState();
    uint64_t r = 0;
    if (h && XXH3_64bits_reset(h) == XXH_OK) {
        char buf[65536];
        size_t got;
        while ((got = fread(buf, 1, sizeof buf, f)) > 0) XXH3_64bits_update(h, buf, got);
        if (!ferror(f)) r = XXH3_64bits_digest(h);
    }
    XXH3_freeState(h);
    fclose(f);
    return r;
}

int park_release(cas *store, const park_manifest *m) {
    if (!store || !m) return KP_EINVAL;
    int rc = 0;
    for (int i = 0; i < m->n_spans; i++) {
        int r = cas_unref(store, m->spans[i].key);
        if (r && !rc) rc = r;
    }
    return rc;
}

void park_manifest_free(park_manifest *m) {
    if (!m) return;
    free(m->tokens);
    free(m->spans);
    m->tokens = NULL;
    m->spans = NULL;
    m->n_tokens = 0;
    m->n_spans = 0;
}

/* ---- manifest bytes --------------------------------------------------------- */

int park_manifest_write(const park_manifest *m, uint8_t **out, size_t *len, kp_err *err) {
    if (!m || !out || !len) return kp_errf(err, KP_EINVAL, "park: manifest write: NULL argument");
    *out = NULL;
    *len = 0;
    if (m->n_tokens < 0 || m->n_tokens > PARK_MAX_TOKENS || m->n_spans < 0 ||
        m->n_spans > m->n_tokens + 3 || (m->n_tokens && !m->tokens) || (m->n_spans && !m->spans))
        return kp_errf(err, KP_EINVAL, "park: manifest with %d tokens and %d spans is invalid",
                       m->n_tokens, m->n_spans);
    if (strnlen(m->codec, sizeof m->codec) >= sizeof m->codec)
        return kp_errf(err, KP_EINVAL, "park: manifest codec name is not NUL-terminated");
    size_t n = PARK_MAN_HDR + 4 * (size_t)m->n_tokens + PARK_MAN_SPAN * (size_t)m->n_spans + 8;
    uint8_t *b = calloc(1, n);
    if (!b) return kp_errf(err, KP_ENOMEM, "park: out of memory (%zu byte manifest)", n);
    memcpy(b, PARK_MAN_MAGIC, 8);
    kp_put_u32(b + 8, m->scope ? PARK_MAN_VERSION_SCOPED : PARK_MAN_VERSION);
    kp_put_u32(b + 12, PARK_MAN_HDR);
    kp_put_u64(b + 16, m->model_fingerprint);
    memcpy(b + 24, m->codec, strlen(m->codec));
    kp_put_u64(b + 88, m->codec_hash);
    kp_put_u32(b + 96, (uint32_t)m->kv_type);
    kp_put_u32(b + 100, (uint32_t)m->layout.sink);
    kp_put_u32(b + 104, (uint32_t)m->layout.window);
    kp_put_u32(b + 108, (uint32_t)m->layout.chunk);
    kp_put_u32(b + 112, (uint32_t)m->n_tokens);
    kp_put_u32(b + 116, (uint32_t)m->n_spans);
    kp_put_u64(b + 120, m->scope);
    uint8_t *p = b + PARK_MAN_HDR;
    for (int i = 0; i < m->n_tokens; i++, p += 4) kp_put_u32(p, (uint32_t)m->tokens[i]);
    for (int i = 0; i < m->n_spans; i++, p += PARK_MAN_SPAN) {
        const park_span *s = &m->spans[i];
        kp_put_u32(p, (uint32_t)s->span.start);
        kp_put_u32(p + 4, (uint32_t)s->span.n);
        kp_put_u32(p + 8, s->span.coded ? 1u : 0u);
        kp_put_u32(p + 12, s->bytes);
        kp_put_u64(p + 16, s->key.hi);
        kp_put_u64(p + 24, s->key.lo);
    }
    kp_put_u64(p, XXH64(b, n - 8, 0));
    *out = b;
    *len = n;
    return 0;
}

int park_manifest_read(const uint8_t *buf, size_t len, park_manifest *out, kp_err *err) {
    if (!buf || !out) return kp_errf(err, KP_EINVAL, "park: manifest read: NULL argument");
    if (len < PARK_MAN_HDR + 8)
        return kp_errf(err, KP_EFORMAT, "park: manifest of %zu bytes is truncated (min %d)", len,
                       PARK_MAN_HDR + 8);
    if (memcmp(buf, PARK_MAN_MAGIC, 8) != 0)
        return kp_errf(err, KP_EFORMAT, "park: not a session manifest (bad magic)");
    uint32_t version = kp_get_u32(buf + 8);
    if (version != PARK_MAN_VERSION && version != PARK_MAN_VERSION_SCOPED)
        return kp_errf(err, KP_EUNSUP, "park: manifest version %u is not supported (want %u or %u)",
                       version, PARK_MAN_VERSION, PARK_MAN_VERSION_SCOPED);
    if (kp_get_u32(buf + 12) != PARK_MAN_HDR)
        return kp_errf(err, KP_EFORMAT, "park: manifest header size %u, expected %d",
                       kp_get_u32(buf + 12), PARK_MAN_HDR);
    uint32_t nt = kp_get_u32(buf + 112), nsp = kp_get_u32(buf + 116);
    if (nt > PARK_MAX_TOKENS || nsp > nt + 3)
        return kp_errf(err, KP_EFORMAT, "park: manifest claims %u tokens and %u spans", nt, nsp);
    size_t want = PARK_MAN_HDR + 4 * (size_t)nt + PARK_MAN_SPAN * (size_t)nsp + 8;
    if (len != want)
        return kp_errf(err, KP_EFORMAT, "park: manifest is %zu bytes, its counts say %zu "
                       "(truncated or padded)", len, want);
    if (XXH64(buf, len - 8, 0) != kp_get_u64(buf + len - 8))
        return kp_errf(err, KP_EFORMAT, "park: manifest checksum mismatch (corrupt)");
    park_manifest m = {0};
    m.model_fingerprint = kp_get_u64(buf + 16);
    if (strnlen((const char *)buf + 24, 64) >= 64)
        return kp_errf(err, KP_EFORMAT, "park: manifest codec name is not NUL-terminated");
    memcpy(m.codec, buf + 24, 64);
    m.codec_hash = kp_get_u64(buf + 88);
    m.kv_type = (int)kp_get_u32(buf + 96);
    m.layout.sink = (int)kp_get_u32(buf + 100);
    m.layout.window = (int)kp_get_u32(buf + 104);
    m.layout.chunk = (int)kp_get_u32(buf + 108);
    m.n_tokens = (int)nt;
    m.n_spans = (int)nsp;
    m.scope = kp_get_u64(buf + 120);
    if (!park_type_ok(m.kv_type))
        return kp_errf(err, KP_EFORMAT, "park: manifest kv_type %d is not f32/f16/bf16",
                       m.kv_type);
    if ((version == PARK_MAN_VERSION) != (m.scope == 0))
        return kp_errf(err, KP_EFORMAT, "park: manifest version %u with scope %llx (version 1 has none, "
                       "version 2 one)", version, (unsigned long long)m.scope);
    /* The spans must be exactly the layout's, or none at all: a tokens-only
     * manifest (a session whose KV was lost keeps its token ids, store.h). */
    layout_span *qs = NULL;
    int ns = 0;
    if (m.layout.sink < 0 || m.layout.window < 0 ||
        park_spans_of(m.n_tokens, &m.layout, &qs, &ns, NULL) != 0)
        return kp_errf(err, KP_EFORMAT, "park: manifest layout (sink %d, window %d, chunk %d) "
                       "is invalid", m.layout.sink, m.layout.window, m.layout.chunk);
    if (ns != m.n_spans && m.n_spans != 0) {
        free(qs);
        return kp_errf(err, KP_EFORMAT, "park: manifest lists %d spans, its layout gives %d",
                       m.n_spans, ns);
    }
    m.tokens = malloc((size_t)(nt ? nt : 1) * sizeof *m.tokens);
    m.spans = calloc((size_t)(nsp ? nsp : 1), sizeof *m.spans);
    if (!m.tokens || !m.spans) {
        free(qs);
        park_manifest_free(&m);
        return kp_errf(err, KP_ENOMEM, "park: out of memory (%u tokens)", nt);
    }
    const uint8_t *p = buf + PARK_MAN_HDR;
    for (uint32_t i = 0; i < nt; i++, p += 4) {
        uint32_t t = kp_get_u32(p);
        if (t > INT32_MAX) {
            free(qs);
            park_manifest_free(&m);
            return kp_errf(err, KP_EFORMAT, "park: manifest token %u has a bad id %u", i, t);
        }
        m.tokens[i] = (int32_t)t;
    }
    for (int i = 0; i < m.n_spans; i++, p += PARK_MAN_SPAN) {
        park_span *s = &m.spans[i];
        uint32_t fl = kp_get_u32(p + 8);
        s->span.start = (int)kp_get_u32(p);
        s->span.n = (int)kp_get_u32(p + 4);
        s->span.coded = fl & 1;
        s->bytes = kp_get_u32(p + 12);
        s->key.hi = kp_get_u64(p + 16);
        s->key.lo = kp_get_u64(p + 24);
        if ((fl & ~1u) || s->span.start != qs[i].start || s->span.n != qs[i].n ||
            s->span.coded != (qs[i].coded != 0)) {
            free(qs);
            park_manifest_free(&m);
            return kp_errf(err, KP_EFORMAT, "park: manifest span %d does not follow its layout",
                           i);
        }
    }
    free(qs);
    *out = m;
    return 0;
}
