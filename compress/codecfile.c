/*
 * codecfile.c — write and read the codec file of the 'pca' and 'learned'
 * KV codecs (layout in codecfile.h): a GGUF container, so one reader
 * (engine/gguf.c, which bounds-checks everything) serves models and codecs.
 *
 * Why a whole-file checksum on top of GGUF: GGUF has none, and a codec file
 * with one flipped weight would silently decode every parked session wrong.
 * The checksum is the first key, so its value sits at a fixed offset (57:
 * 24-byte GGUF header + 8-byte key length + 21-byte key + 4-byte type).
 */
#include <errno.h>
#include <math.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define XXH_INLINE_ALL
#include <xxhash.h>

#include "compress/codecfile.h"
#include "engine/gguf.h"
#include "kernels/types.h"

#define CF_SUM_KEY "kvpark.codec.checksum"
#define CF_SUM_OFF 57

/* XXH64 of buf with the checksum's 8 value bytes read as zero (buf is
 * restored before returning). */
static uint64_t cf_checksum(uint8_t *buf, size_t len) {
    uint8_t saved[8];
    memcpy(saved, buf + CF_SUM_OFF, 8);
    memset(buf + CF_SUM_OFF, 0, 8);
    uint64_t h = XXH64(buf, len, 0);
    memcpy(buf + CF_SUM_OFF, saved, 8);
    return h;
}

/* Does buf hold the checksum key first, a u64, at CF_SUM_OFF? */
static int cf_sum_at_fixed_offset(const uint8_t *buf, size_t len) {
    const size_t kl = strlen(CF_SUM_KEY);
    if (len < CF_SUM_OFF + 8) return 0;
    uint64_t n;
    uint32_t t;
    memcpy(&n, buf + 24, 8);
    memcpy(&t, buf + 32 + kl, 4);
    return n == kl && memcmp(buf + 32, CF_SUM_KEY, kl) == 0 && t == GGUF_VT_UINT64;
}

/* The raw value of a u64 key (gguf_get_int cannot hold values above
 * INT64_MAX): the first "u64 length, key, u32 type 10" in the header. The
 * key is known to exist (gguf_find_key), and keys precede tensor data. */
static int cf_raw_u64(const uint8_t *buf, size_t len, const char *key, uint64_t *v) {
    const size_t kl = strlen(key);
    for (size_t p = 24; p + 8 + kl + 4 + 8 <= len; p++) {
        uint64_t n;
        uint32_t t;
        memcpy(&n, buf + p, 8);
        if (n != kl || memcmp(buf + p + 8, key, kl) != 0) continue;
        memcpy(&t, buf + p + 8 + kl, 4);
        if (t != GGUF_VT_UINT64) continue;
        memcpy(v, buf + p + 8 + kl + 4, 8);
        return 0;
    }
    return -1;
}

/* ---- write -------------------------------------------------------------- */

int codecfile_write(const codec *c, const char *path, kp_err *err) {
    const codec_learned *cl = (const codec_learned *)c;
    const codec_shape *s = &c->shape;
    int rc = KP_ENOMEM;
    uint8_t *buf = NULL;
    size_t len = 0;
    float *bits = NULL;
    char name[64], tmp[4096];
    gguf_writer *w = gguf_writer_new();
    if (!w) return kp_errf(err, KP_ENOMEM, "codec file: out of memory");
    int e = 0;
    e |= gguf_set_u64(w, CF_SUM_KEY, 0);
    e |= gguf_set_u32(w, "kvpark.codec.version", CODECFILE_VERSION);
    e |= gguf_set_str(w, "kvpark.codec.kind", cl->kind == CODEC_PCA ? "pca" : "learned");
    e |= gguf_set_u32(w, "kvpark.codec.ranges", (uint32_t)cl->ranges);
    e |= gguf_set_u64(w, "kvpark.codec.model_fingerprint", s->model_fingerprint);
    e |= gguf_set_u32(w, "kvpark.codec.n_layer", (uint32_t)s->n_layer);
    e |= gguf_set_u32(w, "kvpark.codec.n_kv_heads", (uint32_t)s->n_kv_heads);
    e |= gguf_set_u32(w, "kvpark.codec.head_dim", (uint32_t)s->head_dim);
    e |= gguf_set_u32(w, "kvpark.codec.n_rot", (uint32_t)s->n_rot);
    e |= gguf_set_u32(w, "kvpark.codec.rope_mode", (uint32_t)s->rope_mode);
    e |= gguf_set_f32(w, "kvpark.codec.rope_base", s->rope_base);
    e |= gguf_set_f32(w, "kvpark.codec.rope_freq_scale", s->rope_freq_scale);
    e |= gguf_set_u32(w, "kvpark.codec.chunk", (uint32_t)cl->chunk);
    e |= gguf_set_u32(w, "kvpark.codec.sink", (uint32_t)cl->sink);
    e |= gguf_set_u32(w, "kvpark.codec.window", (uint32_t)cl->window);
    e |= gguf_set_f32(w, "kvpark.codec.target_bits", cl->target_bits);
    e |= gguf_set_f32(w, "kvpark.codec.achieved_bits", cl->achieved_bits);
    if (e) {
        rc = kp_errf(err, KP_ENOMEM, "codec file: out of memory setting keys");
        goto done;
    }
    const int d = cl->d;
    bits = malloc((size_t)d * sizeof(float));
    if (!bits) goto done;
    for (int l = 0; l < s->n_layer; l++)
        for (int t = 0; t < 2; t++) {
            const lc_coder *cd = &cl->coders[2 * l + t];
            const char tc = t ? 'v' : 'k';
            for (int j = 0; j < cd->r; j++) bits[j] = cd->bits[j];
            int64_t ne_mean[1] = {d}, ne_enc[2] = {d, cd->r}, ne_dec[2] = {cd->r, d}, ne_b[1] = {cd->r};
            snprintf(name, sizeof name, "l.%d.%c.mean", l, tc);
            if ((rc = gguf_add_tensor(w, name, KP_TYPE_F32, 1, ne_mean, cd->mean, true, err))) goto done;
            snprintf(name, sizeof name, "l.%d.%c.enc", l, tc);
            if ((rc = gguf_add_tensor(w, name, KP_TYPE_F32, 2, ne_enc, cd->enc, true, err))) goto done;
            snprintf(name, sizeof name, "l.%d.%c.dec", l, tc);
            if ((rc = gguf_add_tensor(w, name, KP_TYPE_F32, 2, ne_dec, cd->dec, true, err))) goto done;
            snprintf(name, sizeof name, "l.%d.%c.bits", l, tc);
            if ((rc = gguf_add_tensor(w, name, KP_TYPE_F32, 1, ne_b, bits, false, err))) goto done;
        }
    if ((rc = gguf_writer_write_mem(w, &buf, &len, err))) goto done;
    if (!cf_sum_at_fixed_offset(buf, len)) {
        rc = kp_errf(err, KP_EINVAL, "codec file: the GGUF writer did not put %s first", CF_SUM_KEY);
        goto done;
    }
    uint64_t sum = cf_checksum(buf, len);
    memcpy(buf + CF_SUM_OFF, &sum, 8);

    /* temporary name, fsync, rename: a reader never sees half a file */
    if (snprintf(tmp, sizeof tmp, "%s.tmp", path) >= (int)sizeof tmp) {
        rc = kp_errf(err, KP_EINVAL, "codec file: path too long");
        goto done;
    }
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) {
        rc = kp_errf(err, KP_EIO, "codec file: cannot create %s: %s", tmp, strerror(errno));
        goto done;
    }
    size_t off = 0;
    while (off < len) {
        ssize_t k = write(fd, buf + off, len - off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) break;
        off += (size_t)k;
    }
    if (off != len || fsync(fd) != 0) {
        rc = kp_errf(err, KP_EIO, "codec file: cannot write %s: %s", tmp, strerror(errno));
        close(fd);
        unlink(tmp);
        goto done;
    }
    close(fd);
    if (rename(tmp, path) != 0) {
        rc = kp_errf(err, KP_EIO, "codec file: cannot rename %s to %s: %s", tmp, path, strerror(errno));
        unlink(tmp);
        goto done;
    }
    rc = 0;
done:
    if (rc == KP_ENOMEM && err && !err->msg[0]) kp_errf(err, KP_ENOMEM, "codec file: out of memory");
    free(bits);
    free(buf);
    gguf_writer_free(w);
    return rc;
}

/* ---- read --------------------------------------------------------------- */

static int cf_u32(const gguf_file *f, const char *path, const char *key, int64_t *v, kp_err *err) {
    int rc = gguf_get_int(f, key, v, err);
    if (rc == KP_ENOTFOUND)
        return kp_errf(err, KP_EFORMAT, "codec file %s: key %s is missing", path, key);
    if (rc) return rc;
    if (*v < 0 || *v > 1000000)
        return kp_errf(err, KP_EFORMAT, "codec file %s: key %s = %lld is out of range", path, key,
                       (long long)*v);
    return 0;
}

static int cf_f32(const gguf_file *f, const char *path, const char *key, double *v, kp_err *err) {
    int rc = gguf_get_float(f, key, v, err);
    if (rc == KP_ENOTFOUND)
        return kp_errf(err, KP_EFORMAT, "codec file %s: key %s is missing", path, key);
    return rc;
}

static const gguf_tensor *cf_tensor(const gguf_file *f, const char *path, int l, char t,
                                    const char *what, int64_t ne0, int64_t ne1, kp_err *err) {
    char name[64];
    snprintf(name, sizeof name, "l.%d.%c.%s", l, t, what);
    const gguf_tensor *g = gguf_find_tensor(f, name);
    if (!g) {
        kp_errf(err, KP_EFORMAT, "codec file %s: tensor %s is missing", path, name);
        return NULL;
    }
    if (g->type != KP_TYPE_F32 || g->ne[0] != ne0 || (ne1 > 0 && g->ne[1] != ne1) || g->ne[2] != 1 ||
        g->ne[3] != 1 || (ne1 <= 0 && g->ne[1] != 1)) {
        kp_errf(err, KP_EFORMAT, "codec file %s: tensor %s has the wrong type or shape", path, name);
        return NULL;
    }
    return g;
}

int codecfile_open(codec **out, const char *path, const codec_shape *shape, kp_err *err) {
    *out = NULL;
    FILE *fp = fopen(path, "rb");
    if (!fp) return kp_errf(err, errno == ENOENT ? KP_ENOTFOUND : KP_EIO, "codec file %s: %s", path, strerror(errno));
    uint8_t *buf = NULL;
    size_t len = 0, cap = 0;
    int rc = 0;
    for (;;) {
        if (len == cap) {
            cap = cap ? 2 * cap : 1 << 16;
            uint8_t *nb = realloc(buf, cap);
            if (!nb) {
                fclose(fp);
                free(buf);
                return kp_errf(err, KP_ENOMEM, "codec file %s: out of memory", path);
            }
            buf = nb;
        }
        size_t k = fread(buf + len, 1, cap - len, fp);
        len += k;
        if (k == 0) break;
    }
    int ioerr = ferror(fp);
    fclose(fp);
    if (ioerr) {
        free(buf);
        return kp_errf(err, KP_EIO, "codec file %s: read error", path);
    }
    rc = codecfile_open_mem(out, buf, len, path, shape, err);
    free(buf);
    return rc;
}

int codecfile_open_mem(codec **out, uint8_t *buf, size_t len, const char *path, const codec_shape *shape,
                       kp_err *err) {
    *out = NULL;
    gguf_file *f = NULL;
    codec *c = NULL;
    int *ranks = NULL;
    int rc = 0;
    if ((rc = gguf_open_mem(&f, buf, len, err))) {
        char m[KP_ERR_MAX];
        snprintf(m, sizeof m, "%s", err ? err->msg : "");
        rc = kp_errf(err, rc == KP_EUNSUP ? KP_EUNSUP : KP_EFORMAT,
                     "codec file %s is not a valid codec file (truncated or corrupt?): %s", path, m);
        goto done;
    }
    if (gguf_n_kv(f) < 1 || strcmp(gguf_key(f, 0), CF_SUM_KEY) != 0 || !cf_sum_at_fixed_offset(buf, len)) {
        rc = kp_errf(err, KP_EFORMAT, "codec file %s: first key is not %s (not a kvpark codec file?)",
                     path, CF_SUM_KEY);
        goto done;
    }
    uint64_t want;
    memcpy(&want, buf + CF_SUM_OFF, 8);
    uint64_t got = cf_checksum(buf, len);
    if (want != got) {
        rc = kp_errf(err, KP_EFORMAT,
                     "codec file %s: checksum mismatch (stored %016llx, computed %016llx): the file is "
                     "corrupt; run kvpark calibrate again", path, (unsigned long long)want,
                     (unsigned long long)got);
        goto done;
    }
    int64_t ver;
    uint64_t fp64 = 0;
    int64_t nl, nh, hd, nrot, rmode, chunk, sink, window;
    double rbase, rfs, tb, ab;
    if ((rc = cf_u32(f, path, "kvpark.codec.version", &ver, err))) goto done;
    if (ver != 1 && ver != CODECFILE_VERSION) {
        rc = kp_errf(err, KP_EUNSUP, "codec file %s: version %lld, this kvpark reads versions 1..%d", path,
                     (long long)ver, CODECFILE_VERSION);
        goto done;
    }
    int64_t ranges = 0; /* version 1: per-chunk ranges, the only kind it had */
    if (ver >= 2) {
        if ((rc = cf_u32(f, path, "kvpark.codec.ranges", &ranges, err))) goto done;
        if (ranges != 0 && ranges != 1) {
            rc = kp_errf(err, KP_EFORMAT, "codec file %s: kvpark.codec.ranges is %lld (must be 0 or 1)",
                         path, (long long)ranges);
            goto done;
        }
    }
    const char *kind;
    size_t kind_len;
    if ((rc = gguf_get_str(f, "kvpark.codec.kind", &kind, &kind_len, err))) {
        rc = kp_errf(err, KP_EFORMAT, "codec file %s: key kvpark.codec.kind is missing or not a string", path);
        goto done;
    }
    int kid = kind_len == 3 && memcmp(kind, "pca", 3) == 0       ? CODEC_PCA
              : kind_len == 7 && memcmp(kind, "learned", 7) == 0 ? CODEC_LEARNED
                                                                 : -1;
    if (kid < 0) {
        rc = kp_errf(err, KP_EFORMAT, "codec file %s: unknown kind '%.*s' (want pca or learned)", path,
                     (int)KP_MIN(kind_len, 32), kind);
        goto done;
    }
    int64_t fki = gguf_find_key(f, "kvpark.codec.model_fingerprint");
    if (fki < 0 || gguf_kv_type(f, fki) != GGUF_VT_UINT64 || cf_raw_u64(buf, len, "kvpark.codec.model_fingerprint", &fp64)) {
        rc = kp_errf(err, KP_EFORMAT, "codec file %s: key kvpark.codec.model_fingerprint is missing or not u64", path);
        goto done;
    }
    if ((rc = cf_u32(f, path, "kvpark.codec.n_layer", &nl, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.n_kv_heads", &nh, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.head_dim", &hd, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.n_rot", &nrot, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.rope_mode", &rmode, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.chunk", &chunk, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.sink", &sink, err)) ||
        (rc = cf_u32(f, path, "kvpark.codec.window", &window, err)) ||
        (rc = cf_f32(f, path, "kvpark.codec.rope_base", &rbase, err)) ||
        (rc = cf_f32(f, path, "kvpark.codec.rope_freq_scale", &rfs, err)) ||
        (rc = cf_f32(f, path, "kvpark.codec.target_bits", &tb, err)) ||
        (rc = cf_f32(f, path, "kvpark.codec.achieved_bits", &ab, err)))
        goto done;
    if ((uint64_t)fp64 != shape->model_fingerprint || nl != shape->n_layer ||
        nh != shape->n_kv_heads || hd != shape->head_dim || nrot != shape->n_rot ||
        rmode != shape->rope_mode || (float)rbase != shape->rope_base ||
        (float)rfs != shape->rope_freq_scale) {
        rc = kp_errf(err, KP_EMISMATCH,
                     "codec file %s was made for another model (fingerprint %016llx, %lld layers x "
                     "%lld kv heads x %lld dims; this model: %016llx, %d x %d x %d); run kvpark "
                     "calibrate with this model",
                     path, (unsigned long long)fp64, (long long)nl, (long long)nh, (long long)hd,
                     (unsigned long long)shape->model_fingerprint, shape->n_layer, shape->n_kv_heads,
                     shape->head_dim);
        goto done;
    }
    const int L = (int)nl, d = (int)(nh * hd);
    ranks = malloc(2 * (size_t)L * sizeof(int));
    if (!ranks) {
        rc = kp_errf(err, KP_ENOMEM, "codec file %s: out of memory", path);
        goto done;
    }
    for (int l = 0; l < L; l++)
        for (int t = 0; t < 2; t++) {
            char name[64];
            snprintf(name, sizeof name, "l.%d.%c.bits", l, t ? 'v' : 'k');
            const gguf_tensor *b = gguf_find_tensor(f, name);
            if (!b || b->type != KP_TYPE_F32 || b->n_dims != 1 || b->ne[0] < 1 || b->ne[0] > d) {
                rc = kp_errf(err, KP_EFORMAT, "codec file %s: tensor %s is missing or has a bad shape",
                             path, name);
                goto done;
            }
            ranks[2 * l + t] = (int)b->ne[0];
        }
    if ((rc = codec_learned_alloc(&c, shape, kid, ranks, err))) goto done;
    codec_learned *cl = (codec_learned *)c;
    cl->chunk = (int)chunk, cl->sink = (int)sink, cl->window = (int)window;
    cl->ranges = (int)ranges;
    cl->target_bits = (float)tb, cl->achieved_bits = (float)ab;
    for (int l = 0; l < L; l++)
        for (int t = 0; t < 2; t++) {
            lc_coder *cd = &cl->coders[2 * l + t];
            const char tc = t ? 'v' : 'k';
            const gguf_tensor *gm = cf_tensor(f, path, l, tc, "mean", d, 0, err);
            const gguf_tensor *ge = gm ? cf_tensor(f, path, l, tc, "enc", d, cd->r, err) : NULL;
            const gguf_tensor *gd = ge ? cf_tensor(f, path, l, tc, "dec", cd->r, d, err) : NULL;
            const gguf_tensor *gb = gd ? cf_tensor(f, path, l, tc, "bits", cd->r, 0, err) : NULL;
            if (!gb) {
                rc = KP_EFORMAT;
                goto done;
            }
            memcpy(cd->mean, gm->data, gm->nbytes);
            memcpy(cd->enc, ge->data, ge->nbytes);
            memcpy(cd->dec, gd->data, gd->nbytes);
            for (int j = 0; j < cd->r; j++) {
                float b;
                memcpy(&b, (const uint8_t *)gb->data + 4 * (size_t)j, 4);
                if (!(b >= 1 && b <= CODECFILE_MAX_BITS) || b != (float)(int)b) {
                    rc = kp_errf(err, KP_EFORMAT, "codec file %s: l.%d.%c.bits[%d] = %g (must be 1..8)",
                                 path, l, tc, j, (double)b);
                    goto done;
                }
                cd->bits[j] = (uint8_t)b;
            }
            for (size_t i = 0; i < (size_t)d * (1 + 2 * (size_t)cd->r); i++)
                if (!isfinite(cd->mean[i])) { /* mean, enc, dec are contiguous */
                    rc = kp_errf(err, KP_EFORMAT, "codec file %s: layer %d %c holds a non-finite weight",
                                 path, l, tc);
                    goto done;
                }
        }
    if ((rc = codec_learned_finish(c, err))) goto done;
    *out = c;
    c = NULL;
done:
    free(ranks);
    codec_free(c);
    if (f) gguf_close(f);
    return rc;
}
