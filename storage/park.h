/*
 * park.h — park a sequence's KV cache into the chunk store and bring it back.
 * The bridge between the live KV (engine/kv.h), the codec
 * (compress/codec.h) and the content-addressed store (storage/cas.h).
 *
 * Layout (compress/layout.h layout_spans): rows [0, S) lossless, coded
 * chunks of C rows aligned at S + kC covering [S, n - W), rows [n - W, n)
 * lossless. Each span becomes ONE store object holding that token range for
 * all layers, K then V: per (layer, K/V) an encoded chunk (codec "none" for
 * lossless spans), each LZ4-compressed, with a small table of sizes — the
 * object format is documented in park.c.
 *
 * Content address of a span's object: XXH3-128 of (model fingerprint, codec
 * identity (name + codec file hash for learned/pca), kv_type, layout S/W/C,
 * span start, and the token ids [0, span end)). Two sessions sharing a prefix
 * (a system prompt) produce the same keys for the shared spans and the store
 * keeps one copy; the window span depends on n, so it is rarely shared.
 *
 * A manifest (the session's small record) lists the spans and their keys plus
 * the token ids; park_manifest_write/read give its checksummed, versioned
 * byte form (the session store keeps it in a file or a remote tier).
 *
 * Contract
 *   - park_save() encodes every span not already in the store (cas_has), puts
 *     it (durable or not), cas_ref()s every span's key, and fills the manifest.
 *     A failure leaves no extra references behind.
 *   - park_restore() fetches the spans in order, verifies, LZ4-decodes and
 *     codec-decodes them into kv rows, layer by layer, and sets kv->n_pos only
 *     after everything succeeded; a missing or corrupt object returns an error
 *     naming the span (and leaves n_pos as it was).
 *   - park_restore_begin/_layer/_end: the same restore split so a caller can
 *     use layer l while deeper layers decode (pipelined resume).
 *   - park_release() unrefs a manifest's keys (the session was deleted).
 *   - Thread-safe as far as cas is; the codec is immutable.
 */
#ifndef KP_PARK_H
#define KP_PARK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "compress/codec.h"
#include "compress/layout.h"
#include "engine/kv.h"
#include "storage/cas.h"

/* The parking layout (sink S, window W, chunk C) of a session. */
typedef layout park_layout;

/* A stored span: where it sits in the layout, and its object in the store. */
typedef struct park_span {
    layout_span span;   /* rows [start, start + n), coded or lossless */
    cas_key key;
    uint32_t bytes;     /* stored object size */
} park_span;

typedef struct park_manifest {
    uint64_t model_fingerprint;
    uint64_t scope;          /* whose spans (park_save_scoped); 0: shared by every saver */
    char codec[64];          /* codec name or file name as given */
    uint64_t codec_hash;     /* identity of the codec (file content hash; 0 for baselines) */
    int kv_type;
    park_layout layout;
    int n_tokens;
    int32_t *tokens;         /* [n_tokens] */
    park_span *spans;        /* [n_spans]; none: tokens only (park_manifest_write) */
    int n_spans;
} park_manifest;

typedef struct park_stats {
    uint64_t bytes_new;      /* bytes put into the store by this call */
    uint64_t bytes_total;    /* bytes of all the manifest's objects */
    uint64_t fp16_bytes;     /* n_tokens * n_layer * 2 * n_kv * head_dim * 2 */
    int spans_reused;        /* spans already in the store (shared prefix) */
    double ms;
} park_stats;

/* layout_default(). */
park_layout park_default_layout(void);
int park_save(cas *store, const codec *c, uint64_t codec_hash, const char *codec_name,
              uint64_t model_fingerprint, const park_layout *lay, const kv_cache *kv,
              const int32_t *tokens, int n_tokens, bool durable, park_manifest *out,
              park_stats *st, kp_err *err);
/* park_save with a scope (e.g. the owner of the session, 0 for none): the
 * scope is part of every span's content key, so sessions share stored spans
 * only within one scope — two tenants never do, and neither the bytes a save
 * adds nor its time tells one whether another holds the same prefix. Recorded
 * in the manifest (version 2; scope 0 writes version 1, as before). */
int park_save_scoped(cas *store, const codec *c, uint64_t codec_hash, const char *codec_name,
                     uint64_t model_fingerprint, uint64_t scope, const park_layout *lay, const kv_cache *kv,
                     const int32_t *tokens, int n_tokens, bool durable, park_manifest *out, park_stats *st,
                     kp_err *err);
int park_restore(cas *store, const codec *c, const park_manifest *m, kv_cache *kv,
                 park_stats *st, kp_err *err);

/* Layer-by-layer restore (what park_restore does in one call). begin()
 * fetches every span's object and verifies it completely (all I/O and
 * checksums happen here; m may be freed afterwards, c must stay open until
 * end()). layer(l) decodes layer l of every span into kv; call it for
 * l = 0, 1, ..., n_layer - 1 in order, from one thread. end() sets kv->n_pos
 * to the session's n_tokens and returns 0 if every layer was decoded, else
 * leaves n_pos alone and returns KP_ECANCELED (abandoned or failed midway:
 * some rows may have been overwritten); it always frees the handle. */
typedef struct park_restorer park_restorer;
int park_restore_begin(cas *store, const codec *c, const park_manifest *m, kv_cache *kv,
                       park_restorer **out, kp_err *err);
int park_restore_layer(park_restorer *r, int layer, kp_err *err);
int park_restore_end(park_restorer *r, park_stats *st);

int park_release(cas *store, const park_manifest *m);
/* Identity of a codec for park_save's codec_hash: XXH3-64 of the codec
 * file's bytes when name is a readable regular file, 0 for the built-in
 * codecs (a name, not a file) and when the file cannot be read. */
uint64_t park_codec_hash(const char *name);
void park_manifest_free(park_manifest *m);
/* Versioned, checksummed byte form (malloc'd). Its spans are exactly the
 * layout's for n_tokens, or none (tokens only: what the store keeps of a
 * session whose KV was lost; park_restore refuses it). */
int park_manifest_write(const park_manifest *m, uint8_t **out, size_t *len, kp_err *err);
int park_manifest_read(const uint8_t *buf, size_t len, park_manifest *m, kp_err *err);

#endif
