/*
 * blob.c — writing and reading session blobs (format in blob.h).
 *
 * Writing streams the KV one chunk at a time (download -> LZ4 -> write) so the
 * only extra memory is one chunk, then writes the header region (whose chunk
 * table is only known at the end) at offset 0, fsyncs and renames.
 * Reading validates everything before the payloads in one pass over the
 * header region, then restores the KV in two passes: the first verifies every
 * chunk checksum, the second decompresses and uploads, so a corrupt file never
 * leaves half-written rows behind a reported failure of the checksum.
 */
#include "storage/fsutil.h"
#include "storage/blob.h"

#include <errno.h>
#include <fcntl.h>
#include <lz4.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>
#include <xxhash.h>

size_t blob_elem_size(int kv_type) {
    switch (kv_type) {
    case KP_TYPE_F32: return 4;
    case KP_TYPE_F16:
    case KP_TYPE_BF16: return 2;
    default: return 0;
    }
}

static uint64_t now_unix_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000u + (uint64_t)ts.tv_nsec / 1000000u;
}

/* Rows in chunk c of a blob with n_tokens rows and chunk_tokens per chunk. */
static int chunk_rows(int c, int chunk_tokens, int n_tokens) {
    int t0 = c * chunk_tokens;
    return KP_MIN(chunk_tokens, n_tokens - t0);
}

/* ---- writing ------------------------------------------------------------- */

int blob_write(const char *path, const blob_meta *meta, const int32_t *tokens,
               const void *extra, size_t extra_len, const kv_cache *kv, blob_stats *st,
               kp_err *err) {
    double t_start = kp_now();
    if (!path || !meta || !kv) return kp_errf(err, KP_EINVAL, "blob: write: NULL argument");
    const char *codec = meta->codec[0] ? meta->codec : "none";
    if (strnlen(meta->codec, BLOB_CODEC_MAX) >= BLOB_CODEC_MAX)
        return kp_errf(err, KP_EINVAL, "blob: codec name is not NUL-terminated within %d bytes",
                       BLOB_CODEC_MAX);
    if (strcmp(codec, "none") != 0)
        return kp_errf(err, KP_EUNSUP, "blob: codec '%s' is not supported (only \"none\")", codec);
    int n_tokens = meta->n_tokens;
    if (n_tokens != kv->n_pos)
        return kp_errf(err, KP_EINVAL,
                       "blob: meta says %d tokens but the KV cache holds %d rows; they must match",
                       n_tokens, kv->n_pos);
    if (n_tokens < 0 || n_tokens > BLOB_MAX_TOKENS)
        return kp_errf(err, KP_ERANGE, "blob: %d tokens is out of range (max %d)", n_tokens,
                       BLOB_MAX_TOKENS);
    if (n_tokens > 0 && !tokens) return kp_errf(err, KP_EINVAL, "blob: tokens is NULL");
    if (extra_len > 0 && !extra) return kp_errf(err, KP_EINVAL, "blob: extra is NULL");
    if (extra_len > BLOB_MAX_EXTRA)
        return kp_errf(err, KP_ERANGE, "blob: extra section of %zu bytes is too big (max %u)",
                       extra_len, BLOB_MAX_EXTRA);
    size_t esz = blob_elem_size(kv->kv_type);
    if (!esz) return kp_errf(err, KP_EINVAL, "blob: kv type %d is not f32/f16/bf16", kv->kv_type);
    if (kv->n_layer <= 0 || kv->n_layer > BLOB_MAX_LAYERS || kv->n_kv_heads <= 0 ||
        kv->n_kv_heads > BLOB_MAX_KV_HEADS || kv->head_dim <= 0 || kv->head_dim > BLOB_MAX_HEAD_DIM)
        return kp_errf(err, KP_ERANGE, "blob: KV shape (%d layers, %d kv heads, head_dim %d) is "
                       "out of range", kv->n_layer, kv->n_kv_heads, kv->head_dim);
    int chunk_tokens = meta->chunk_tokens ? meta->chunk_tokens : BLOB_CHUNK_TOKENS_DEFAULT;
    size_t row_bytes = (size_t)kv->n_kv_heads * kv->head_dim * esz;
    if (chunk_tokens < 1 || chunk_tokens > BLOB_MAX_CHUNK_TOKENS ||
        (uint64_t)chunk_tokens * row_bytes > LZ4_MAX_INPUT_SIZE)
        return kp_errf(err, KP_ERANGE, "blob: chunk of %d tokens x %zu bytes is out of range",
                       chunk_tokens, row_bytes);

    int chunks_per = (n_tokens + chunk_tokens - 1) / chunk_tokens;
    uint32_t n_chunks = (uint32_t)kv->n_layer * 2u * (uint32_t)chunks_per;
    size_t table_off = BLOB_HEADER_BYTES + (size_t)n_tokens * 4 + 4 + extra_len;
    size_t meta_bytes = table_off + (size_t)n_chunks * BLOB_CHUNK_ENTRY_BYTES + 8;

    size_t raw_max = (size_t)chunk_tokens * row_bytes;
    int bound = LZ4_compressBound((int)raw_max);
    uint8_t *hdr = calloc(1, meta_bytes);
    uint8_t *raw = malloc(raw_max ? raw_max : 1);
    uint8_t *comp = malloc((size_t)bound);
    char *tmp = malloc(strlen(path) + 5);
    if (!hdr || !raw || !comp || !tmp) {
        free(hdr); free(raw); free(comp); free(tmp);
        return kp_errf(err, KP_ENOMEM, "blob: out of memory (%zu byte header)", meta_bytes);
    }
    sprintf(tmp, "%s.tmp", path);

    int rc = 0;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) {
        rc = kp_errf(err, KP_EIO, "blob: cannot create '%s': %s", tmp, strerror(errno));
        goto out;
    }

    /* header */
    memcpy(hdr, BLOB_MAGIC, 8);
    kp_put_u32(hdr + 8, BLOB_VERSION);
    kp_put_u32(hdr + 12, BLOB_HEADER_BYTES);
    kp_put_u64(hdr + 16, meta->model_fingerprint);
    memcpy(hdr + 24, codec, strlen(codec));
    kp_put_u32(hdr + 40, (uint32_t)kv->kv_type);
    kp_put_u32(hdr + 44, (uint32_t)kv->n_layer);
    kp_put_u32(hdr + 48, (uint32_t)kv->n_kv_heads);
    kp_put_u32(hdr + 52, (uint32_t)kv->head_dim);
    kp_put_u32(hdr + 56, (uint32_t)chunk_tokens);
    kp_put_u32(hdr + 60, (uint32_t)n_tokens);
    kp_put_u64(hdr + 64, meta->created_unix_ms ? meta->created_unix_ms : now_unix_ms());
    kp_put_u32(hdr + 72, n_chunks);
    /* tokens, extra */
    for (int i = 0; i < n_tokens; i++) kp_put_u32(hdr + BLOB_HEADER_BYTES + 4 * (size_t)i, (uint32_t)tokens[i]);
    kp_put_u32(hdr + BLOB_HEADER_BYTES + (size_t)n_tokens * 4, (uint32_t)extra_len);
    if (extra_len) memcpy(hdr + BLOB_HEADER_BYTES + (size_t)n_tokens * 4 + 4, extra, extra_len);

    /* payloads, streamed; the table is filled as we go */
    uint64_t off = meta_bytes, stored_total = 0, raw_total = 0;
    uint32_t ci = 0;
    for (int l = 0; l < kv->n_layer; l++) {
        for (int kvsel = 0; kvsel < 2; kvsel++) {
            for (int c = 0; c < chunks_per; c++, ci++) {
                int rows = chunk_rows(c, chunk_tokens, n_tokens);
                size_t rb = (size_t)rows * row_bytes;
                if (kv_read_rows(kv, l, kvsel, c * chunk_tokens, rows, raw, NULL)) {
                    rc = kp_errf(err, KP_EIO, "blob: download of layer %d %s chunk %d failed", l,
                                 kvsel ? "V" : "K", c);
                    goto out;
                }
                int cn = LZ4_compress_default((const char *)raw, (char *)comp, (int)rb, bound);
                uint32_t flags = 0;
                const uint8_t *src = comp;
                size_t sn = (size_t)cn;
                if (cn <= 0 || (size_t)cn >= rb) {
                    flags = BLOB_CHUNK_FLAG_RAW;
                    src = raw;
                    sn = rb;
                }
                if (fs_pwrite_all(fd, src, sn, off)) {
                    rc = kp_errf(err, KP_EIO, "blob: write to '%s' failed: %s", tmp, strerror(errno));
                    goto out;
                }
                uint8_t *e = hdr + table_off + (size_t)ci * BLOB_CHUNK_ENTRY_BYTES;
                kp_put_u64(e, off);
                kp_put_u32(e + 8, (uint32_t)rb);
                kp_put_u32(e + 12, (uint32_t)sn);
                kp_put_u32(e + 16, flags);
                kp_put_u32(e + 20, 0);
                kp_put_u64(e + 24, XXH64(src, sn, 0));
                off += sn;
                stored_total += sn;
                raw_total += rb;
            }
        }
    }
    kp_put_u64(hdr + meta_bytes - 8, XXH64(hdr, meta_bytes - 8, 0));
    if (fs_pwrite_all(fd, hdr, meta_bytes, 0)) {
        rc = kp_errf(err, KP_EIO, "blob: write to '%s' failed: %s", tmp, strerror(errno));
        goto out;
    }
    if (fsync(fd)) {
        rc = kp_errf(err, KP_EIO, "blob: fsync of '%s' failed: %s", tmp, strerror(errno));
        goto out;
    }
    if (close(fd)) {
        fd = -1;
        rc = kp_errf(err, KP_EIO, "blob: close of '%s' failed: %s", tmp, strerror(errno));
        goto out;
    }
    fd = -1;
    if (rename(tmp, path)) {
        rc = kp_errf(err, KP_EIO, "blob: rename '%s' -> '%s' failed: %s", tmp, path, strerror(errno));
        goto out;
    }
    if (fs_fsync_parent_dir(path)) {
        /* The data is in place; only the directory entry may not be durable. */
        rc = kp_errf(err, KP_EIO, "blob: fsync of the directory of '%s' failed: %s", path,
                     strerror(errno));
        goto out;
    }
    if (st) {
        st->bytes_written = off;
        st->raw_fp16_bytes = (uint64_t)n_tokens * kv->n_layer * 2 * kv->n_kv_heads * kv->head_dim * 2;
        st->raw_kv_bytes = raw_total;
        st->stored_kv_bytes = stored_total;
        st->ms = (kp_now() - t_start) * 1e3;
    }
out:
    if (fd >= 0) close(fd);
    if (rc) unlink(tmp);
    free(hdr);
    free(raw);
    free(comp);
    free(tmp);
    return rc;
}

/* ---- reading ------------------------------------------------------------- */

typedef struct blob_chunk {
    uint64_t offset;
    uint32_t raw_bytes, stored_bytes, flags;
    uint64_t hash;
} blob_chunk;

typedef struct blob_parsed {
    blob_meta meta;
    uint8_t *region;   /* [0, meta_bytes) of the file */
    size_t tokens_off; /* into region */
    size_t extra_off;
    uint32_t extra_len;
    blob_chunk *chunks; /* [n_chunks] */
    uint32_t n_chunks;
    size_t row_bytes;
    int chunks_per;
} blob_parsed;

static void parsed_free(blob_parsed *b) {
    free(b->region);
    free(b->chunks);
    memset(b, 0, sizeof *b);
}

/* Read and validate everything before the payloads of an open blob. */
static int blob_parse(int fd, const char *path, blob_parsed *b, kp_err *err) {
    memset(b, 0, sizeof *b);
    struct stat sb;
    if (fstat(fd, &sb)) return kp_errf(err, KP_EIO, "blob: stat '%s': %s", path, strerror(errno));
    uint64_t fsize = (uint64_t)sb.st_size;
    uint8_t h[BLOB_HEADER_BYTES];
    if (fsize < BLOB_HEADER_BYTES)
        return kp_errf(err, KP_EFORMAT, "blob: '%s' is %llu bytes, shorter than the %d byte header "
                       "(truncated)", path, (unsigned long long)fsize, BLOB_HEADER_BYTES);
    if (fs_pread_all(fd, h, sizeof h, 0) != (ssize_t)sizeof h)
        return kp_errf(err, KP_EIO, "blob: read '%s': %s", path, strerror(errno));
    if (memcmp(h, BLOB_MAGIC, 8) != 0)
        return kp_errf(err, KP_EFORMAT, "blob: '%s' is not a session blob (bad magic)", path);
    uint32_t version = kp_get_u32(h + 8);
    if (version != BLOB_VERSION)
        return kp_errf(err, KP_EUNSUP, "blob: '%s' has format version %u; this build reads %d",
                       path, version, BLOB_VERSION);
    if (kp_get_u32(h + 12) != BLOB_HEADER_BYTES)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': header size %u, expected %d", path,
                       kp_get_u32(h + 12), BLOB_HEADER_BYTES);
    blob_meta *m = &b->meta;
    m->version = version;
    m->file_bytes = fsize;
    m->model_fingerprint = kp_get_u64(h + 16);
    memcpy(m->codec, h + 24, BLOB_CODEC_MAX);
    if (m->codec[BLOB_CODEC_MAX - 1] != 0)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': codec name is not NUL-terminated", path);
    uint32_t kv_type = kp_get_u32(h + 40), n_layer = kp_get_u32(h + 44), n_kv_heads = kp_get_u32(h + 48);
    uint32_t head_dim = kp_get_u32(h + 52), chunk_tokens = kp_get_u32(h + 56), n_tokens = kp_get_u32(h + 60);
    uint32_t n_chunks = kp_get_u32(h + 72);
    size_t esz = blob_elem_size((int)kv_type);
    if (!esz)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': kv type %u is not f32/f16/bf16", path, kv_type);
    if (n_layer < 1 || n_layer > BLOB_MAX_LAYERS || n_kv_heads < 1 || n_kv_heads > BLOB_MAX_KV_HEADS ||
        head_dim < 1 || head_dim > BLOB_MAX_HEAD_DIM || chunk_tokens < 1 ||
        chunk_tokens > BLOB_MAX_CHUNK_TOKENS || n_tokens > BLOB_MAX_TOKENS)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': shape out of range (layers %u, kv heads %u, "
                       "head_dim %u, chunk %u, tokens %u)", path, n_layer, n_kv_heads, head_dim,
                       chunk_tokens, n_tokens);
    size_t row_bytes = (size_t)n_kv_heads * head_dim * esz;
    if ((uint64_t)chunk_tokens * row_bytes > LZ4_MAX_INPUT_SIZE)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': chunk of %u rows x %zu bytes is too big", path,
                       chunk_tokens, row_bytes);
    uint32_t chunks_per = (n_tokens + chunk_tokens - 1) / chunk_tokens;
    if ((uint64_t)n_chunks != (uint64_t)n_layer * 2 * chunks_per)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': %u chunks in the table, expected %llu", path,
                       n_chunks, (unsigned long long)n_layer * 2 * chunks_per);
    m->kv_type = (int)kv_type;
    m->n_layer = (int)n_layer;
    m->n_kv_heads = (int)n_kv_heads;
    m->head_dim = (int)head_dim;
    m->chunk_tokens = (int)chunk_tokens;
    m->n_tokens = (int)n_tokens;
    m->created_unix_ms = kp_get_u64(h + 64);

    /* extra_len sits after the tokens; everything is bounded by the file size */
    uint64_t xl_off = BLOB_HEADER_BYTES + (uint64_t)n_tokens * 4;
    if (xl_off + 4 > fsize)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': %u tokens run past the end of the file "
                       "(truncated)", path, n_tokens);
    uint8_t xb[4];
    if (fs_pread_all(fd, xb, 4, xl_off) != 4)
        return kp_errf(err, KP_EIO, "blob: read '%s': %s", path, strerror(errno));
    uint32_t extra_len = kp_get_u32(xb);
    uint64_t table_off = xl_off + 4 + (uint64_t)extra_len;
    uint64_t meta_bytes = table_off + (uint64_t)n_chunks * BLOB_CHUNK_ENTRY_BYTES + 8;
    if (extra_len > BLOB_MAX_EXTRA || meta_bytes > fsize)
        return kp_errf(err, KP_EFORMAT, "blob: '%s': header region (%llu bytes, extra %u) runs past "
                       "the end of the file (%llu bytes; truncated)", path,
                       (unsigned long long)meta_bytes, extra_len, (unsigned long long)fsize);
    b->region = malloc((size_t)meta_bytes);
    b->chunks = malloc((size_t)(n_chunks ? n_chunks : 1) * sizeof *b->chunks);
    if (!b->region || !b->chunks) {
        parsed_free(b);
        return kp_errf(err, KP_ENOMEM, "blob: out of memory reading '%s'", path);
    }
    if (fs_pread_all(fd, b->region, (size_t)meta_bytes, 0) != (ssize_t)meta_bytes) {
        parsed_free(b);
        return kp_errf(err, KP_EIO, "blob: read '%s': %s", path, strerror(errno));
    }
    uint64_t want = kp_get_u64(b->region + meta_bytes - 8);
    uint64_t got = XXH64(b->region, (size_t)meta_bytes - 8, 0);
    if (want != got) {
        parsed_free(b);
        return kp_errf(err, KP_EFORMAT, "blob: '%s': header checksum mismatch (stored %016llx, "
                       "computed %016llx): the file is corrupt", path, (unsigned long long)want,
                       (unsigned long long)got);
    }
    /* chunk table: exact raw sizes, contiguous payloads, file ends after the last */
    uint64_t off = meta_bytes, stored_total = 0;
    for (uint32_t i = 0; i < n_chunks; i++) {
        const uint8_t *e = b->region + table_off + (size_t)i * BLOB_CHUNK_ENTRY_BYTES;
        blob_chunk *c = &b->chunks[i];
        c->offset = kp_get_u64(e);
        c->raw_bytes = kp_get_u32(e + 8);
        c->stored_bytes = kp_get_u32(e + 12);
        c->flags = kp_get_u32(e + 16);
        c->hash = kp_get_u64(e + 24);
        int ci = (int)(i % chunks_per);
        uint64_t raw_want = (uint64_t)chunk_rows(ci, (int)chunk_tokens, (int)n_tokens) * row_bytes;
        int bad = c->offset != off || c->raw_bytes != raw_want || (c->flags & ~BLOB_CHUNK_FLAG_RAW) ||
                  kp_get_u32(e + 20) != 0 ||
                  ((c->flags & BLOB_CHUNK_FLAG_RAW) ? c->stored_bytes != c->raw_bytes
                                                    : (c->stored_bytes == 0 ||
                                                       c->stored_bytes >= c->raw_bytes)) ||
                  off + c->stored_bytes > fsize;
        if (bad) {
            int l = (int)(i / (2 * chunks_per)), kvsel = (int)((i / chunks_per) % 2);
            blob_chunk bc = *c; /* c points into b->chunks, freed below */
            parsed_free(b);
            return kp_errf(err, KP_EFORMAT, "blob: '%s': chunk table entry for layer %d %s chunk %d "
                           "is inconsistent (offset %llu, raw %u, stored %u, flags %u; file %llu "
                           "bytes)", path, l, kvsel ? "V" : "K", ci,
                           (unsigned long long)bc.offset, bc.raw_bytes, bc.stored_bytes, bc.flags,
                           (unsigned long long)fsize);
        }
        off += c->stored_bytes;
        stored_total += c->stored_bytes;
    }
    if (off != fsize) {
        parsed_free(b);
        return kp_errf(err, KP_EFORMAT, "blob: '%s' is %llu bytes but its chunk table says %llu",
                       path, (unsigned long long)fsize, (unsigned long long)off);
    }
    m->stored_kv_bytes = stored_total;
    b->tokens_off = BLOB_HEADER_BYTES;
    b->extra_off = (size_t)xl_off + 4;
    b->extra_len = extra_len;
    b->n_chunks = n_chunks;
    b->row_bytes = row_bytes;
    b->chunks_per = (int)chunks_per;
    return 0;
}

static int open_blob(const char *path, kp_err *err) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return kp_errf(err, errno == ENOENT ? KP_ENOTFOUND : KP_EIO, "blob: cannot open '%s': %s",
                       path, strerror(errno));
    return fd;
}

int blob_read_meta(const char *path, blob_meta *meta, int32_t **tokens, void **extra,
                   size_t *extra_len, kp_err *err) {
    if (tokens) *tokens = NULL;
    if (extra) *extra = NULL;
    if (extra_len) *extra_len = 0;
    int fd = open_blob(path, err);
    if (fd < 0) return fd;
    blob_parsed b;
    int rc = blob_parse(fd, path, &b, err);
    close(fd);
    if (rc) return rc;
    int32_t *tk = NULL;
    uint8_t *ex = NULL;
    if (tokens) {
        tk = malloc((size_t)(b.meta.n_tokens ? b.meta.n_tokens : 1) * sizeof *tk);
        if (!tk) goto oom;
        for (int i = 0; i < b.meta.n_tokens; i++)
            tk[i] = (int32_t)kp_get_u32(b.region + b.tokens_off + 4 * (size_t)i);
    }
    if (extra) {
        ex = malloc(b.extra_len ? b.extra_len : 1);
        if (!ex) goto oom;
        memcpy(ex, b.region + b.extra_off, b.extra_len);
    }
    if (meta) *meta = b.meta;
    if (tokens) *tokens = tk;
    if (extra) *extra = ex;
    if (extra_len) *extra_len = b.extra_len;
    parsed_free(&b);
    return 0;
oom:
    free(tk);
    free(ex);
    parsed_free(&b);
    return kp_errf(err, KP_ENOMEM, "blob: out of memory reading '%s'", path);
}

int blob_read_kv(const char *path, uint64_t expect_fingerprint, kv_cache *kv, kp_err *err) {
    if (!path || !kv) return kp_errf(err, KP_EINVAL, "blob: read_kv: NULL argument");
    int fd = open_blob(path, err);
    if (fd < 0) return fd;
    blob_parsed b;
    int rc = blob_parse(fd, path, &b, err);
    if (rc) {
        close(fd);
        return rc;
    }
    const blob_meta *m = &b.meta;
    uint8_t *sbuf = NULL, *rbuf = NULL;
    if (m->model_fingerprint != expect_fingerprint) {
        rc = kp_errf(err, KP_EMISMATCH, "blob: '%s' was made with model %016llx, not the loaded "
                     "model %016llx: refusing to restore it", path,
                     (unsigned long long)m->model_fingerprint, (unsigned long long)expect_fingerprint);
        goto out;
    }
    if (strcmp(m->codec, "none") != 0) {
        rc = kp_errf(err, KP_EUNSUP, "blob: '%s' uses codec '%s'; this build reads only \"none\"",
                     path, m->codec);
        goto out;
    }
    if (m->kv_type != kv->kv_type || m->n_layer != kv->n_layer || m->n_kv_heads != kv->n_kv_heads ||
        m->head_dim != kv->head_dim) {
        rc = kp_errf(err, KP_EMISMATCH, "blob: '%s' holds a KV cache of type %d, %d layers, %d kv "
                     "heads, head_dim %d; the target is type %d, %d layers, %d kv heads, head_dim %d",
                     path, m->kv_type, m->n_layer, m->n_kv_heads, m->head_dim, kv->kv_type,
                     kv->n_layer, kv->n_kv_heads, kv->head_dim);
        goto out;
    }
    if (m->n_tokens > kv->n_ctx) {
        rc = kp_errf(err, KP_ERANGE, "blob: '%s' holds %d tokens but the KV cache has room for %d: "
                     "use a larger context", path, m->n_tokens, kv->n_ctx);
        goto out;
    }
    size_t raw_max = (size_t)m->chunk_tokens * b.row_bytes;
    sbuf = malloc(raw_max ? raw_max : 1); /* stored_bytes <= raw_bytes <= raw_max */
    rbuf = malloc(raw_max ? raw_max : 1);
    if (!sbuf || !rbuf) {
        rc = kp_errf(err, KP_ENOMEM, "blob: out of memory restoring '%s'", path);
        goto out;
    }
    /* pass 0 verifies every checksum; pass 1 verifies again, decodes and uploads */
    for (int pass = 0; pass < 2; pass++) {
        for (uint32_t i = 0; i < b.n_chunks; i++) {
            const blob_chunk *c = &b.chunks[i];
            int ci = (int)(i % b.chunks_per), l = (int)(i / (2 * b.chunks_per));
            int kvsel = (int)((i / b.chunks_per) % 2);
            if (fs_pread_all(fd, sbuf, c->stored_bytes, c->offset) != (ssize_t)c->stored_bytes) {
                rc = kp_errf(err, KP_EIO, "blob: '%s': reading layer %d %s chunk %d failed", path,
                             l, kvsel ? "V" : "K", ci);
                goto out;
            }
            if (XXH64(sbuf, c->stored_bytes, 0) != c->hash) {
                rc = kp_errf(err, KP_EFORMAT, "blob: '%s': checksum mismatch in layer %d %s chunk "
                             "%d: the file is corrupt", path, l, kvsel ? "V" : "K", ci);
                goto out;
            }
            if (pass == 0) continue;
            const uint8_t *src = sbuf;
            if (!(c->flags & BLOB_CHUNK_FLAG_RAW)) {
                int n = LZ4_decompress_safe((const char *)sbuf, (char *)rbuf, (int)c->stored_bytes,
                                            (int)c->raw_bytes);
                if (n < 0 || (uint32_t)n != c->raw_bytes) {
                    rc = kp_errf(err, KP_EFORMAT, "blob: '%s': layer %d %s chunk %d does not "
                                 "decompress to %u bytes", path, l, kvsel ? "V" : "K", ci,
                                 c->raw_bytes);
                    goto out;
                }
                src = rbuf;
            }
            if (kv_write_rows(kv, l, kvsel, ci * (int)m->chunk_tokens, (int)(c->raw_bytes / b.row_bytes), src, NULL)) {
                rc = kp_errf(err, KP_EIO, "blob: upload of layer %d %s chunk %d failed", l,
                             kvsel ? "V" : "K", ci);
                goto out;
            }
        }
    }
    kv_sync(kv);
    kv->n_pos = m->n_tokens;
out:
    close(fd);
    free(sbuf);
    free(rbuf);
    parsed_free(&b);
    return rc;
}
