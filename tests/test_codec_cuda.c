/*
 * test_codec_cuda.c — the GPU KV codec (compress/codec_gpu.h,
 * compress/codec_gpu.cu) against the CPU codec (codec_encode/codec_decode).
 *
 * Runs everywhere (no GPU needed):
 *   - view reference: a plain scalar decoder and encoder written here from
 *     the learned-codec view (compress/codec_learned_impl.h) reproduce
 *     codec_decode's rows and codec_encode's bytes, for synthetic pca and
 *     learned codecs (odd shapes, normal/NeoX/partial RoPE, 1..8 bits, both
 *     range kinds) and for codec files calibrated on stories260K: the
 *     bitstream reading the kernels rely on is the CPU codec's.
 *   - emulated kernels: the kernels' own per-element arithmetic
 *     (compress/codec_gpu_math.h, compiled here for the host) composed as
 *     the kernels compose it, against codec_decode (rows) and codec_encode
 *     (bytes), for every codec, element type, K/V and odd row counts.
 *   - header helpers: codec_gpu_seal_chunk writes codec_encode's header;
 *     codec_gpu_check_chunk answers codec_decode's code for intact, damaged
 *     and mismatched chunks.
 *   - the API without a device says KP_EUNSUP with a message.
 * With a CUDA device (otherwise "SKIP: ..." and skipped):
 *   - GPU decode of CPU-encoded chunks (one batch mixing layers, K/V, row
 *     counts, unaligned payloads) into NaN-poisoned rows vs codec_decode;
 *   - GPU encode vs codec_encode's bytes, and CPU decode of GPU chunks;
 *   - the staging pool and the pipelined restore of a multi-layer session.
 * Floats are compared with a relative bound (one ulp of the output type);
 * NaN never passes.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

#include "compress/calib.h"
#include "compress/codec.h"
#include "compress/codec_gpu.h"
#include "compress/codec_gpu_math.h"
#include "compress/codec_learned_impl.h"
#include "compress/codecfile.h" /* codec_learned_alloc/finish: synthetic codecs */
#include "engine/model.h"
#include "kernels/kernels.h"
#include "kernels/types.h"

#define MODEL_REL "models/stories260K.gguf"
#define CALIB_REL "data/tinystories-train-calib.txt"
#define N_CALIB 2048

/* ---- the codecs under test -------------------------------------------------- */

#define MAX_CODECS 32

typedef struct fx {
    codec *c[MAX_CODECS];
    char what[MAX_CODECS][96];
    int n;
    int n_calibrated; /* codec files from stories260K among them */
    char *dir;
    char path[2][512];
} fx;

static const int k_types[] = {KP_TYPE_F32, KP_TYPE_F16, KP_TYPE_BF16};
static const int k_rows[] = {64, 1, 37, 100};

static size_t esz(int t) { return t == KP_TYPE_F32 ? 4 : 2; }
static int dim_of(const codec *c) { return c->shape.n_kv_heads * c->shape.head_dim; }

static float frand(uint64_t *st) {
    float v;
    tu_rand_floats(&v, 1, 1.0f, st);
    return v;
}

static codec *make_learned(int L, int H, int D, int n_rot, int mode, int kind, int ranges, uint64_t *st) {
    codec_shape s = {L, H, D, n_rot, mode, 10000.0f, 1.0f, 0x1234};
    return tu_learned_codec(&s, kind, ranges, st);
}

static void add_codec(fx *f, codec *c, const char *what) {
    assert_true(f->n < MAX_CODECS);
    f->c[f->n] = c;
    snprintf(f->what[f->n], sizeof f->what[f->n], "%s", what);
    f->n++;
}

/* Calibrate pca and learned on stories260K (a small slice of the calibration
 * text: the bitstream, not the quality, is under test here). A failure to
 * calibrate is calib.c's business (tests/test_calib.c): it is reported and
 * the synthetic codecs are still tested. */
static void add_calibrated(fx *f) {
    if (!tu_shared_exists(MODEL_REL) || !tu_shared_exists(CALIB_REL)) {
        printf("# no %s / %s: calibrated codecs not tested (synthetic ones are)\n", MODEL_REL, CALIB_REL);
        return;
    }
    kp_err err = {0};
    char *mp = tu_shared_path(MODEL_REL), *tp = tu_shared_path(CALIB_REL);
    model_opts mo = model_default_opts();
    mo.n_threads = 2;
    model *m = NULL;
    size_t len = 0, n_ids = 0;
    char *txt = tu_read_file(tp, &len);
    int32_t *ids = NULL;
    if (model_load(&m, mp, &mo, &err) || !txt ||
        tok_encode(model_vocab(m), txt, KP_MIN(len, (size_t)40000), true, false, &ids, &n_ids, &err) ||
        n_ids < N_CALIB) {
        printf("# cannot read %s / %s (%s): calibrated codecs not tested\n", MODEL_REL, CALIB_REL, err.msg);
        goto done;
    }
    const model_hparams *hp = model_hp(m);
    const codec_shape shape = {hp->n_layer, hp->n_kv_heads, hp->head_dim, hp->n_rot, hp->rope_mode,
                               hp->rope_base, hp->rope_freq_scale, model_fingerprint(m)};
    f->dir = tu_tmpdir();
    const int kinds[2] = {CODEC_LEARNED, CODEC_PCA};
    for (int i = 0; i < 2; i++) {
        calib_opts o = calib_default_opts();
        o.kind = kinds[i];
        o.bits = 3;
        snprintf(f->path[i], sizeof f->path[i], "%s/c%d.gguf", f->dir, i);
        calib_report rep;
        codec *c = NULL;
        if (calib_run(m, ids, N_CALIB, &o, f->path[i], &rep, &err) || codec_open(&c, f->path[i], &shape, &err)) {
            printf("# CALIBRATION FAILED (%s): calibrated %s codec not tested\n", err.msg, i ? "pca" : "learned");
            continue;
        }
        char w[96];
        snprintf(w, sizeof w, "%s file (stories260K, %.2f bits)", i ? "pca" : "learned", rep.bits_per_value);
        add_codec(f, c, w);
        f->n_calibrated++;
    }
done:
    free(mp), free(tp), free(txt), free(ids);
    model_free(m);
}

static int fx_setup(void **state) {
    fx *f = calloc(1, sizeof *f);
    kp_err err = {0};
    static const char *const base[] = {"none", "fp16", "int8", "int4", "kivi2"};
    static const int shapes[][2] = {{4, 8}, {8, 128}, {2, 80}, {3, 6}, {1, 5}};
    for (size_t s = 0; s < KP_ARRAY_LEN(shapes); s++)
        for (size_t b = 0; b < KP_ARRAY_LEN(base); b++) {
            if (s >= 2 && b < 2) continue; /* none/fp16 do not care about groups */
            codec_shape sh = {2, shapes[s][0], shapes[s][1], shapes[s][1], KP_ROPE_NORMAL, 10000.0f, 1.0f, 0};
            codec *c = NULL;
            if (codec_open(&c, base[b], &sh, &err)) return -1;
            char w[96];
            snprintf(w, sizeof w, "%s H=%d D=%d", base[b], shapes[s][0], shapes[s][1]);
            if (f->n < MAX_CODECS - 8) add_codec(f, c, w);
            else codec_free(c);
        }
    uint64_t st = 77;
    add_codec(f, make_learned(2, 2, 16, 16, KP_ROPE_NORMAL, CODEC_LEARNED, 1, &st), "learned H=2 D=16 rope normal, fixed ranges");
    add_codec(f, make_learned(2, 2, 24, 16, KP_ROPE_NEOX, CODEC_LEARNED, 0, &st), "learned H=2 D=24 partial NeoX rope, per-chunk ranges");
    add_codec(f, make_learned(2, 3, 10, 10, KP_ROPE_NORMAL, CODEC_PCA, 0, &st), "pca H=3 D=10");
    add_codec(f, make_learned(1, 4, 64, 64, KP_ROPE_NEOX, CODEC_LEARNED, 1, &st), "learned H=4 D=64 NeoX, fixed ranges");
    add_codec(f, make_learned(1, 1, 7, 6, KP_ROPE_NORMAL, CODEC_LEARNED, 0, &st), "learned H=1 D=7 odd, per-chunk ranges");
    add_calibrated(f);
    *state = f;
    return 0;
}

static int fx_teardown(void **state) {
    fx *f = *state;
    for (int i = 0; i < f->n; i++) codec_free(f->c[i]);
    for (int i = 0; i < 2 && f->dir; i++) unlink(f->path[i]);
    if (f->dir) rmdir(f->dir);
    free(f->dir);
    free(f);
    return 0;
}

/* ---- data --------------------------------------------------------------------------- */

/* x [n][R] random in [-2, 2) with outliers: channel k % 16 == 3 of every
 * head 20x larger, every 7th token 4x, token 2 all zero (constant groups). */
static void make_random(float *x, int n, int H, int D, uint64_t *st) {
    const size_t R = (size_t)H * D;
    tu_rand_floats(x, (size_t)n * R, 2.0f, st);
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < R; k++) {
            float *v = &x[(size_t)i * R + k];
            if (k % (size_t)D % 16 == 3) *v = *v * 20.0f + 3.0f;
            if (i % 7 == 5) *v *= 4.0f;
            if (i == 2) *v = 0.0f;
        }
}

static void store_rows(int t, void *rows, const float *x, size_t n) {
    for (size_t i = 0; i < n; i++) cg_store(t, rows, i, x[i]);
}

/* A payload of random codes for a pca/learned chunk (ranges 0: sane fp16
 * lo and step ahead of them), sealed into a whole chunk. */
static uint8_t *random_learned_chunk(const codec *c, const codec_chunk *ch, size_t *len, uint64_t *st) {
    *len = codec_chunk_bytes_at(c, ch->n, ch->kv_type, ch->is_v, ch->layer);
    uint8_t *b = malloc(*len);
    for (size_t k = 16; k < *len; k++) {
        *st = *st * 6364136223846793005ULL + 1442695040888963407ULL;
        b[k] = (uint8_t)(*st >> 56);
    }
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    if (!v.ranges)
        for (int j = 0; j < v.r; j++) {
            cg_wr16(b + 16 + 2 * j, kp_f32_to_fp16(-1.0f + 0.5f * frand(st)));
            cg_wr16(b + 16 + 2 * v.r + 2 * j, kp_f32_to_fp16(0.1f + 0.05f * frand(st)));
        }
    codec_gpu_seal_chunk(c, ch, b, *len - 16);
    return b;
}

/* Rows of chunk ch for codec c, kind 0 random, 1 structured: for pca and
 * learned the decoding of random codes (rows the codec can represent, RoPE'd
 * at their positions) with 1% noise; for the baselines smooth per-channel
 * ramps plus noise. Returns [n][R] of ch->kv_type. */
static void *make_rows(const codec *c, const codec_chunk *ch, int kind, uint64_t *st) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, n = ch->n;
    const size_t nv = (size_t)n * H * D;
    float *x = malloc(nv * sizeof(float));
    if (kind == 0) {
        make_random(x, n, H, D, st);
    } else if (codec_is_learned(c)) {
        codec_chunk cf = *ch;
        cf.kv_type = KP_TYPE_F32;
        size_t len;
        uint8_t *b = random_learned_chunk(c, &cf, &len, st);
        kp_err err = {0};
        assert_int_equal(codec_decode(c, &cf, b, len, x, &err), 0);
        free(b);
        for (size_t i = 0; i < nv; i++) x[i] *= 1.0f + 0.01f * frand(st);
    } else {
        for (int i = 0; i < n; i++)
            for (int k = 0; k < H * D; k++)
                x[(size_t)i * H * D + k] = sinf(0.1f * (float)(i + ch->pos0) + (float)k) * (1.0f + (float)(k % 5)) +
                                           0.05f * frand(st);
    }
    void *rows = malloc(nv * esz(ch->kv_type));
    store_rows(ch->kv_type, rows, x, nv);
    free(x);
    return rows;
}

static uint8_t *cpu_encode(const codec *c, const codec_chunk *ch, const void *rows, size_t *len) {
    size_t cap = codec_max_bytes(c, ch->n);
    uint8_t *b = malloc(cap);
    kp_err err = {0};
    if (codec_encode(c, ch, rows, b, cap, len, &err)) fail_msg("codec_encode: %s", err.msg);
    return b;
}

static void *cpu_decode(const codec *c, const codec_chunk *ch, const uint8_t *b, size_t len) {
    size_t bytes = (size_t)ch->n * dim_of(c) * esz(ch->kv_type);
    void *rows = malloc(bytes);
    memset(rows, 0xff, bytes); /* NaN in every element type */
    kp_err err = {0};
    if (codec_decode(c, ch, b, len, rows, &err)) fail_msg("codec_decode: %s", err.msg);
    return rows;
}

/* Fail unless got and want (n values of kv_type) agree within one ulp of
 * the type (relative) + atol; NaN never passes. Returns the number of values
 * that differ at all (for information). */
static size_t check_rows(const char *what, int t, const void *got, const void *want, size_t n, double atol) {
    const double rtol = t == KP_TYPE_F32 ? 1e-6 : t == KP_TYPE_F16 ? 0x1p-10 : 0x1p-7;
    size_t differ = 0;
    for (size_t i = 0; i < n; i++) {
        const double g = cg_load(t, got, i), w = cg_load(t, want, i);
        const double tol = atol + rtol * fabs(w);
        if (isnan(g) || isnan(w) || !(fabs(g - w) <= tol)) {
            print_message("%s: value %zu: got %.9g, want %.9g (|diff| %.3g > %.3g)\n", what, i, g, w,
                          fabs(g - w), tol);
            fail();
        }
        differ += g != w;
    }
    return differ;
}

/* ---- a scalar decoder and encoder written from the view (no shared code) ---- */

static uint32_t ref_bits(const uint8_t *s, size_t t, int b) {
    uint32_t q = 0;
    for (int k = 0; k < b; k++) q |= (uint32_t)((s[(t + k) >> 3] >> ((t + k) & 7)) & 1) << k;
    return q;
}

static float ref_half(const uint8_t *p) { return kp_fp16_to_f32((uint16_t)(p[0] | p[1] << 8)); }

/* cos/sin of every pair at row i (position pos0 + i), by the documented chain. */
static void ref_angles(const codec_learned_view *v, int pos0, int i, float *cs, float *sn) {
    for (int p = 0; p < v->rope_half; p++) {
        double c = cos(v->rope_th[p] * pos0), s = sin(v->rope_th[p] * pos0);
        for (int k = 0; k < i; k++) {
            const double cn = c * v->rope_cos[p] - s * v->rope_sin[p];
            s = s * v->rope_cos[p] + c * v->rope_sin[p];
            c = cn;
        }
        cs[p] = (float)c, sn[p] = (float)s;
    }
}

static void ref_pair(const codec_learned_view *v, int p, int *j0, int *j1) {
    *j0 = v->rope_neox ? p : 2 * p;
    *j1 = v->rope_neox ? p + v->rope_half : 2 * p + 1;
}

static void ref_decode(const codec *c, const codec_chunk *ch, const uint8_t *pay, void *rows) {
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    const int d = v.d, r = v.r, D = c->shape.head_dim, H = c->shape.n_kv_heads;
    const uint8_t *codes = pay + (v.ranges ? 0 : 4 * (size_t)r);
    float *z = malloc(r * sizeof(float)), *x = malloc(d * sizeof(float));
    float cs[4096], sn[4096];
    size_t t = 0;
    for (int i = 0; i < ch->n; i++) {
        for (int j = 0; j < r; j++) {
            const uint32_t q = ref_bits(codes, t, v.bits[j]);
            t += v.bits[j];
            z[j] = v.ranges ? (float)q : (float)q * ref_half(pay + 2 * r + 2 * j) + ref_half(pay + 2 * j);
        }
        for (int k = 0; k < d; k++) {
            float acc = 0.0f;
            for (int j = 0; j < r; j++) acc += v.dect[(size_t)j * v.dpad + k] * z[j];
            x[k] = v.dmean[k] + acc;
        }
        if (v.rope) {
            ref_angles(&v, ch->pos0, i, cs, sn);
            for (int h = 0; h < H; h++)
                for (int p = 0; p < v.rope_half; p++) {
                    int j0, j1;
                    ref_pair(&v, p, &j0, &j1);
                    float *xh = x + (size_t)h * D;
                    const float x0 = xh[j0], x1 = xh[j1];
                    xh[j0] = x0 * cs[p] - x1 * sn[p];
                    xh[j1] = x0 * sn[p] + x1 * cs[p];
                }
        }
        store_rows(ch->kv_type, (uint8_t *)rows + (size_t)i * d * esz(ch->kv_type), x, d);
    }
    assert_int_equal(t, (size_t)ch->n * v.bits_sum);
    free(z), free(x);
}

/* The payload codec_encode would write (the view's contract, bit by bit). */
static void ref_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *pay) {
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    const int d = v.d, r = v.r, D = c->shape.head_dim, H = c->shape.n_kv_heads, n = ch->n;
    float *z = malloc((size_t)n * r * sizeof(float)), *x = malloc(d * sizeof(float));
    float *lo = malloc(r * sizeof(float)), *st = malloc(r * sizeof(float));
    float cs[4096], sn[4096];
    for (int i = 0; i < n; i++) {
        for (int k = 0; k < d; k++) x[k] = cg_load(ch->kv_type, rows, (size_t)i * d + k);
        if (v.rope) {
            ref_angles(&v, ch->pos0, i, cs, sn);
            for (int h = 0; h < H; h++)
                for (int p = 0; p < v.rope_half; p++) {
                    int j0, j1;
                    ref_pair(&v, p, &j0, &j1);
                    float *xh = x + (size_t)h * D;
                    const float x0 = xh[j0], x1 = xh[j1], s = -sn[p];
                    xh[j0] = x0 * cs[p] - x1 * s;
                    xh[j1] = x0 * s + x1 * cs[p];
                }
        }
        for (int k = 0; k < d; k++) x[k] -= v.mean[k];
        for (int j = 0; j < r; j++) {
            float acc = 0.0f;
            for (int k = 0; k < d; k++) acc += v.enc[(size_t)j * d + k] * x[k];
            z[(size_t)i * r + j] = acc;
        }
    }
    for (int j = 0; j < r; j++) {
        if (v.ranges) {
            lo[j] = v.qlo[j], st[j] = v.qstep[j];
            continue;
        }
        float mn = INFINITY, mx = -INFINITY;
        for (int i = 0; i < n; i++) { /* comparisons, not fminf: the sign of a zero minimum matters */
            if (z[(size_t)i * r + j] < mn) mn = z[(size_t)i * r + j];
            if (z[(size_t)i * r + j] > mx) mx = z[(size_t)i * r + j];
        }
        if (!isfinite(mn) || !isfinite(mx)) mn = mx = 0;
        uint16_t l16 = kp_f32_to_fp16(mn), s16;
        lo[j] = kp_fp16_to_f32(l16);
        if (!isfinite(lo[j])) l16 = 0, lo[j] = 0;
        s16 = kp_f32_to_fp16((mx - lo[j]) / (float)((1 << v.bits[j]) - 1));
        st[j] = kp_fp16_to_f32(s16);
        if (!isfinite(st[j]) || st[j] < 0) s16 = 0, st[j] = 0;
        pay[2 * j] = (uint8_t)l16, pay[2 * j + 1] = (uint8_t)(l16 >> 8);
        pay[2 * r + 2 * j] = (uint8_t)s16, pay[2 * r + 2 * j + 1] = (uint8_t)(s16 >> 8);
    }
    uint8_t *codes = pay + (v.ranges ? 0 : 4 * (size_t)r);
    memset(codes, 0, ((size_t)n * v.bits_sum + 7) / 8);
    size_t t = 0;
    for (int i = 0; i < n; i++)
        for (int j = 0; j < r; j++) {
            const float qm = (float)((1 << v.bits[j]) - 1);
            uint32_t q = 0;
            if (st[j] > 0) {
                float u = (z[(size_t)i * r + j] - lo[j]) / st[j];
                u = u > 0 ? u : 0;
                u = u < qm ? u : qm;
                q = (uint32_t)floorf(u + 0.5f);
            }
            for (int k = 0; k < v.bits[j]; k++, t++) codes[t >> 3] |= (uint8_t)(((q >> k) & 1) << (t & 7));
        }
    free(z), free(x), free(lo), free(st);
}

/* ---- the kernels' arithmetic (codec_gpu_math.h), composed as codec.cu does ---- */

static int *bit_offsets(const codec_learned_view *v) {
    int *off = malloc(((size_t)v->r + 1) * sizeof(int));
    for (int j = 0, o = 0; j < v->r; j++) off[j] = o, o += v->bits[j];
    return off;
}

static void emu_decode(const codec *c, const codec_chunk *ch, const uint8_t *p, void *rows) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, n = ch->n, t = ch->kv_type;
    if (!codec_is_learned(c)) { /* cg_base_decode_k: a value per thread */
        const cg_geom g = cg_geom_of(codec_id_of(c), H, D);
        if (g.codec == CODEC_NONE) {
            memcpy(rows, p, (size_t)n * g.R * esz(t));
            return;
        }
        for (int i = 0; i < n; i++)
            for (int hk = 0; hk < g.R; hk++)
                cg_store(t, rows, (size_t)i * g.R + hk, cg_baseline_value(&g, ch->is_v, p, n, i, hk / D, hk % D));
        return;
    }
    /* cg_lc_decode_k: a thread per unit (column or rotated pair) */
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    int *off = bit_offsets(&v);
    const uint8_t *codes = p + (v.ranges ? 0 : 4 * (size_t)v.r);
    const size_t ncode = ((size_t)n * v.bits_sum + 7) / 8;
    const int half = v.rope_half, units = cg_lc_units(D, half, v.rope);
    float *z = malloc(v.r * sizeof(float)), *cs = malloc((half + 1) * sizeof(float)), *sn = malloc((half + 1) * sizeof(float));
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < v.r; j++)
            z[j] = cg_lc_latent(v.ranges, cg_code_at(codes, ncode, (size_t)i * v.bits_sum + off[j], v.bits[j]), p, v.r, j);
        if (v.rope)
            for (int q = 0; q < half; q++)
                cg_rope_rows(v.rope_th[q], v.rope_cos[q], v.rope_sin[q], ch->pos0, i, 1, cs + q, sn + q, half);
        for (int u = 0; u < H * units; u++) {
            int c0, c1, pr;
            cg_lc_unit_cols(u % units, half, v.rope_neox, v.rope, &c0, &c1, &pr);
            c0 += u / units * D;
            c1 += c1 >= 0 ? u / units * D : 0;
            float a0 = 0.0f, a1 = 0.0f;
            for (int j = 0; j < v.r; j++) {
                a0 = a0 + v.dect[(size_t)j * v.dpad + c0] * z[j];
                if (c1 >= 0) a1 = a1 + v.dect[(size_t)j * v.dpad + c1] * z[j];
            }
            const size_t row = (size_t)i * v.d;
            if (pr < 0) {
                cg_store(t, rows, row + c0, v.dmean[c0] + a0);
                continue;
            }
            float y0, y1;
            cg_rotate(v.dmean[c0] + a0, v.dmean[c1] + a1, cs[pr], sn[pr], 0, &y0, &y1);
            cg_store(t, rows, row + c0, y0);
            cg_store(t, rows, row + c1, y1);
        }
    }
    free(off), free(z), free(cs), free(sn);
}

static void emu_encode(const codec *c, const codec_chunk *ch, const void *rows, uint8_t *p) {
    const int H = c->shape.n_kv_heads, D = c->shape.head_dim, n = ch->n, t = ch->kv_type;
    if (!codec_is_learned(c)) { /* cg_base_encode_k */
        const cg_geom g = cg_geom_of(codec_id_of(c), H, D);
        switch (g.codec) {
        case CODEC_NONE: memcpy(p, rows, (size_t)n * g.R * esz(t)); break;
        case CODEC_FP16:
            for (size_t k = 0; k < (size_t)n * g.R; k++) cg_wr16(p + 2 * k, cg_f2h(cg_load(t, rows, k)));
            break;
        case CODEC_INT8:
        case CODEC_INT4:
            for (int i = 0; i < n; i++)
                for (int h = 0; h < H; h++)
                    for (int gi = 0; gi < g.NG; gi++) cg_int_group(&g, t, rows, p, n, i, h, gi);
            break;
        default:
            if (ch->is_v) {
                for (int i = 0; i < n; i++)
                    for (int h = 0; h < H; h++)
                        for (int gi = 0; gi < g.NG; gi++) cg_kivi_v_group(&g, t, rows, p, n, i, h, gi);
            } else {
                for (int ug = 0; ug * CG_KIVI_TOKENS < n; ug++)
                    for (int h = 0; h < H; h++)
                        for (int kb = 0; kb < (D + 3) / 4; kb++) cg_kivi_k_byte(&g, t, rows, p, n, ug, h, kb);
            }
        }
        return;
    }
    /* cg_lc_project_k, cg_lc_range_k, cg_lc_pack_k */
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    int *off = bit_offsets(&v);
    const int half = v.rope_half, r = v.r, d = v.d;
    float *z = malloc((size_t)n * r * sizeof(float)), *x = malloc(d * sizeof(float));
    float *cs = malloc((half + 1) * sizeof(float)), *sn = malloc((half + 1) * sizeof(float));
    uint8_t *q = malloc((size_t)n * r);
    for (int i = 0; i < n; i++) {
        if (v.rope)
            for (int k = 0; k < half; k++)
                cg_rope_rows(v.rope_th[k], v.rope_cos[k], v.rope_sin[k], ch->pos0, i, 1, cs + k, sn + k, half);
        for (int k = 0; k < d; k++)
            x[k] = cg_lc_enc_input(t, rows, (size_t)i * d, k, D, half, v.rope_neox, v.rope, cs, sn, v.mean);
        for (int j = 0; j < r; j++) {
            float acc = 0.0f;
            for (int k = 0; k < d; k++) acc = acc + v.enct[(size_t)k * v.rpad + j] * x[k];
            z[(size_t)i * r + j] = acc;
            if (v.ranges) q[(size_t)i * r + j] = (uint8_t)cg_lc_quant(acc, v.qlo[j], v.qstep[j], (float)((1 << v.bits[j]) - 1));
        }
    }
    for (int j = 0; j < r && !v.ranges; j++) {
        float mn = INFINITY, mx = -INFINITY, lf, sf;
        for (int i = 0; i < n; i++) {
            const float u = z[(size_t)i * r + j];
            if (u < mn) mn = u;
            if (u > mx) mx = u;
        }
        uint16_t lh, sh;
        cg_lc_range(mn, mx, v.bits[j], &lh, &sh, &lf, &sf);
        cg_wr16(p + 2 * j, lh);
        cg_wr16(p + 2 * r + 2 * j, sh);
        for (int i = 0; i < n; i++)
            q[(size_t)i * r + j] = (uint8_t)cg_lc_quant(z[(size_t)i * r + j], lf, sf, (float)((1 << v.bits[j]) - 1));
    }
    const size_t ncode = ((size_t)n * v.bits_sum + 7) / 8;
    for (size_t b = 0; b < ncode; b++) p[(v.ranges ? 0 : 4 * (size_t)r) + b] = cg_pack_byte(q, n, r, v.bits, off, v.bits_sum, b);
    free(off), free(z), free(x), free(cs), free(sn), free(q);
}

/* ---- chunks of a codec: every layer (learned) / two, K and V, odd row counts -- */

typedef struct tchunk {
    codec_chunk ch;
    void *rows;     /* host rows that were encoded */
    uint8_t *bytes; /* CPU encoding */
    size_t len;
} tchunk;

/* The chunk list of codec c for element type t (kind: 0 random, 1 structured). */
static tchunk *make_chunks(const codec *c, int t, int kind, int *n_out, uint64_t *st) {
    const int L = codec_is_learned(c) ? c->shape.n_layer : 1;
    const int big = dim_of(c) >= 512; /* keep the CPU references quick */
    tchunk *v = calloc((size_t)L * 2 * KP_ARRAY_LEN(k_rows), sizeof *v);
    int n = 0;
    for (int l = 0; l < L; l++)
        for (int is_v = 0; is_v < 2; is_v++)
            for (size_t ri = 0; ri < KP_ARRAY_LEN(k_rows); ri++) {
                if (big && k_rows[ri] > 40) continue;
                tchunk *x = &v[n++];
                x->ch = (codec_chunk){.layer = l, .is_v = is_v, .pos0 = (int)(ri * 997 + (size_t)l * 64), .n = k_rows[ri], .kv_type = t};
                x->rows = make_rows(c, &x->ch, kind, st);
                x->bytes = cpu_encode(c, &x->ch, x->rows, &x->len);
            }
    *n_out = n;
    return v;
}

static void free_chunks(tchunk *v, int n) {
    for (int i = 0; i < n; i++) free(v[i].rows), free(v[i].bytes);
    free(v);
}

static void describe(char *buf, size_t cap, const fx *f, int ci, const tchunk *x, int kind) {
    snprintf(buf, cap, "%s, %s, %s, layer %d, %d rows at %d, %s input", f->what[ci], kp_type_name(x->ch.kv_type),
             x->ch.is_v ? "V" : "K", x->ch.layer, x->ch.n, x->ch.pos0, kind ? "structured" : "random");
}

/* ---- CPU tests ------------------------------------------------------------------ */

static void test_view_reference(void **state) {
    fx *f = *state;
    uint64_t st = 5;
    int n_cases = 0;
    size_t n_vals = 0, n_differ = 0;
    for (int ci = 0; ci < f->n; ci++) {
        const codec *c = f->c[ci];
        if (!codec_is_learned(c)) continue;
        codec_learned_view v;
        kp_err err = {0};
        assert_int_equal(codec_learned_get_view(c, -1, 0, &v, &err), KP_EINVAL);
        for (size_t ti = 0; ti < KP_ARRAY_LEN(k_types); ti++)
            for (int kind = 0; kind < 3; kind++) { /* random rows, structured rows, random codes */
                int n;
                tchunk *cs = make_chunks(c, k_types[ti], kind == 1, &n, &st);
                for (int k = 0; k < n; k++) {
                    tchunk *x = &cs[k];
                    char what[256];
                    describe(what, sizeof what, f, ci, x, kind == 1);
                    if (kind == 2) { /* every code pattern, not only what the encoder makes */
                        free(x->bytes);
                        x->bytes = random_learned_chunk(c, &x->ch, &x->len, &st);
                    }
                    const size_t nv = (size_t)x->ch.n * dim_of(c), bytes = nv * esz(x->ch.kv_type);
                    void *want = cpu_decode(c, &x->ch, x->bytes, x->len), *got = malloc(bytes);
                    memset(got, 0xff, bytes);
                    ref_decode(c, &x->ch, x->bytes + 16, got);
                    n_differ += check_rows(what, x->ch.kv_type, got, want, nv, 1e-6);
                    n_vals += nv;
                    if (kind < 2) { /* the encoder: the same bytes */
                        uint8_t *pay = malloc(x->len);
                        memset(pay, 0xa5, x->len);
                        ref_encode(c, &x->ch, x->rows, pay);
                        if (memcmp(pay, x->bytes + 16, x->len - 16)) fail_msg("%s: reference encoder bytes differ", what);
                        free(pay);
                    }
                    free(want), free(got);
                    n_cases++;
                }
                free_chunks(cs, n);
            }
    }
    printf("# view reference: %d chunks, %zu values, %zu not bit-identical\n", n_cases, n_vals, n_differ);
    assert_true(n_cases > 100);
}

static void test_emulated_kernels(void **state) {
    fx *f = *state;
    uint64_t st = 11;
    int n_cases = 0;
    size_t n_differ = 0;
    for (int ci = 0; ci < f->n; ci++) {
        const codec *c = f->c[ci];
        for (size_t ti = 0; ti < KP_ARRAY_LEN(k_types); ti++)
            for (int kind = 0; kind < 2; kind++) {
                int n;
                tchunk *cs = make_chunks(c, k_types[ti], kind, &n, &st);
                for (int k = 0; k < n; k++) {
                    tchunk *x = &cs[k];
                    char what[256];
                    describe(what, sizeof what, f, ci, x, kind);
                    const size_t nv = (size_t)x->ch.n * dim_of(c), bytes = nv * esz(x->ch.kv_type);
                    void *want = cpu_decode(c, &x->ch, x->bytes, x->len), *got = malloc(bytes);
                    memset(got, 0xff, bytes);
                    emu_decode(c, &x->ch, x->bytes + 16, got);
                    n_differ += check_rows(what, x->ch.kv_type, got, want, nv, 1e-6);
                    uint8_t *pay = malloc(x->len);
                    memset(pay, 0xa5, x->len);
                    emu_encode(c, &x->ch, x->rows, pay);
                    if (memcmp(pay, x->bytes + 16, x->len - 16)) {
                        size_t b = 0;
                        while (pay[b] == x->bytes[16 + b]) b++;
                        fail_msg("%s: emulated encoder: payload byte %zu of %zu is %02x, codec_encode wrote %02x", what,
                                 b, x->len - 16, pay[b], x->bytes[16 + b]);
                    }
                    free(pay), free(want), free(got);
                    n_cases++;
                }
                free_chunks(cs, n);
            }
    }
    printf("# emulated kernels: %d chunks over %d codecs, %zu decoded values not bit-identical\n", n_cases, f->n,
           n_differ);
}

static void test_header_helpers(void **state) {
    fx *f = *state;
    uint64_t st = 3;
    for (int ci = 0; ci < f->n; ci++) {
        const codec *c = f->c[ci];
        const codec_chunk ch = {.layer = c->shape.n_layer - 1, .is_v = ci & 1, .pos0 = 3, .n = 5, .kv_type = KP_TYPE_F16};
        void *rows = make_rows(c, &ch, 0, &st);
        size_t len;
        uint8_t *b = cpu_encode(c, &ch, rows, &len);
        uint8_t *sealed = malloc(len);
        memcpy(sealed, b, len);
        memset(sealed, 0, 16);
        codec_gpu_seal_chunk(c, &ch, sealed, len - 16);
        assert_memory_equal(sealed, b, 16);
        kp_err err = {0};
        assert_int_equal(codec_gpu_check_chunk(c, &ch, b, len, &err), 0);
        void *out = malloc((size_t)ch.n * dim_of(c) * 2);
        /* every single-byte flip (header and payload), every truncation of the header */
        for (size_t i = 0; i < len; i += i < 16 ? 1 : 1 + len / 64) {
            b[i] ^= 0x10;
            const int want = codec_decode(c, &ch, b, len, out, NULL);
            assert_int_not_equal(want, 0);
            assert_int_equal(codec_gpu_check_chunk(c, &ch, b, len, &err), want);
            b[i] ^= 0x10;
        }
        for (size_t l = 0; l < 20 && l < len; l++)
            assert_int_equal(codec_gpu_check_chunk(c, &ch, b, l, NULL), codec_decode(c, &ch, b, l, out, NULL));
        /* intact but not what the caller expects */
        codec_chunk m[5] = {ch, ch, ch, ch, ch};
        m[0].n = 6, m[1].is_v = !ch.is_v, m[2].kv_type = KP_TYPE_BF16, m[3].layer = 99, m[4].n = 0;
        for (int k = 0; k < 5; k++) {
            if (k == 3 && !codec_is_learned(c)) continue; /* the baselines have no per-layer size */
            const int want = codec_decode(c, &m[k], b, len, out, NULL);
            assert_int_not_equal(want, 0);
            assert_int_equal(codec_gpu_check_chunk(c, &m[k], b, len, &err), want);
            assert_true(strlen(err.msg) > 10);
        }
        free(rows), free(b), free(sealed), free(out);
    }
}

static void test_without_device(void **state) {
    fx *f = *state;
    const char *why = NULL;
    const int avail = codec_gpu_available(&why);
    assert_non_null(why);
    kp_err err = {0};
    codec_gpu_ctx *g = (codec_gpu_ctx *)&err;
    codec_gpu_staging *s = (codec_gpu_staging *)&err;
    if (avail) {
        printf("# CUDA device present (%s): codec_gpu_new must work\n", why);
        for (int i = 0; i < f->n; i++) {
            if (codec_gpu_new(&g, f->c[i], 0, &err)) fail_msg("codec_gpu_new(%s): %s", f->what[i], err.msg);
            codec_gpu_free(g);
        }
        assert_int_equal(codec_gpu_new(&g, f->c[0], 4096, &err), KP_EINVAL);
        assert_null(g);
        return;
    }
    printf("# no CUDA device (%s): the GPU codec must say so\n", why);
    assert_int_equal(codec_gpu_new(&g, f->c[0], 0, &err), KP_EUNSUP);
    assert_null(g);
    assert_true(strstr(err.msg, "CUDA") != NULL);
    assert_int_equal(codec_gpu_staging_new(&s, 2, 4096, &err), KP_EUNSUP);
    assert_null(s);
    codec_gpu_chunk gc = {{0}, NULL, NULL};
    assert_int_not_equal(codec_gpu_decode_batch(NULL, 1, &gc, NULL, &err), 0);
}

/* ---- GPU tests ------------------------------------------------------------------ */

#define REQUIRE_GPU()                                                                   \
    do {                                                                                \
        const char *why_ = NULL;                                                        \
        if (!codec_gpu_available(&why_)) {                                              \
            print_message("SKIP: no CUDA device for the GPU codec (%s)\n", why_);       \
            skip();                                                                     \
        }                                                                               \
    } while (0)

typedef struct dev {
    kp_backend *be;
    const kp_ops *o;
} dev;

static dev dev_open(void) {
    dev d;
    kp_err err = {0};
    if (kp_backend_new(&d.be, "cuda", 0, &err)) fail_msg("cuda backend: %s", err.msg);
    d.o = kp_backend_ops(d.be);
    return d;
}

static void *dev_alloc(dev *d, size_t bytes, int fill) {
    void *p = d->o->alloc(d->be, bytes);
    assert_non_null(p);
    uint8_t *h = malloc(bytes);
    memset(h, fill, bytes);
    assert_int_equal(d->o->upload(d->be, p, h, bytes), 0);
    free(h);
    return p;
}

/* Device copies of a chunk list: payloads packed back to back at odd
 * offsets (a staging buffer's layout), rows at 16-byte offsets. */
typedef struct dbatch {
    uint8_t *pay;
    uint8_t *rows;
    size_t *pay_at, *rows_at;
    codec_gpu_chunk *gc;
} dbatch;

static dbatch dbatch_new(dev *d, const codec *c, const tchunk *v, int n, int upload_rows) {
    dbatch b;
    b.pay_at = calloc(n + 1, sizeof(size_t));
    b.rows_at = calloc(n + 1, sizeof(size_t));
    b.gc = calloc(n, sizeof *b.gc);
    for (int k = 0; k < n; k++) {
        b.pay_at[k + 1] = b.pay_at[k] + v[k].len - 16 + 1; /* + 1: the next payload is misaligned */
        b.rows_at[k + 1] = b.rows_at[k] + (((size_t)v[k].ch.n * dim_of(c) * esz(v[k].ch.kv_type) + 15) & ~(size_t)15);
    }
    b.pay = dev_alloc(d, b.pay_at[n], 0xab);
    b.rows = dev_alloc(d, b.rows_at[n], 0xff); /* NaN */
    for (int k = 0; k < n; k++) {
        assert_int_equal(d->o->upload(d->be, b.pay + b.pay_at[k], v[k].bytes + 16, v[k].len - 16), 0);
        if (upload_rows)
            assert_int_equal(d->o->upload(d->be, b.rows + b.rows_at[k], v[k].rows,
                                          (size_t)v[k].ch.n * dim_of(c) * esz(v[k].ch.kv_type)), 0);
        b.gc[k] = (codec_gpu_chunk){v[k].ch, b.pay + b.pay_at[k], b.rows + b.rows_at[k]};
    }
    return b;
}

static void dbatch_free(dev *d, dbatch *b) {
    d->o->free(d->be, b->pay);
    d->o->free(d->be, b->rows);
    free(b->pay_at), free(b->rows_at), free(b->gc);
}

static void test_gpu_decode(void **state) {
    REQUIRE_GPU();
    fx *f = *state;
    dev d = dev_open();
    uint64_t st = 21;
    size_t n_vals = 0, n_differ = 0;
    for (int ci = 0; ci < f->n; ci++) {
        const codec *c = f->c[ci];
        codec_gpu_ctx *g = NULL;
        kp_err err = {0};
        if (codec_gpu_new(&g, c, 0, &err)) fail_msg("codec_gpu_new(%s): %s", f->what[ci], err.msg);
        for (size_t ti = 0; ti < KP_ARRAY_LEN(k_types); ti++)
            for (int kind = 0; kind < 2; kind++) {
                int n;
                tchunk *v = make_chunks(c, k_types[ti], kind, &n, &st);
                dbatch b = dbatch_new(&d, c, v, n, 0);
                /* one launch for the whole mixed batch */
                if (codec_gpu_decode_batch(g, n, b.gc, NULL, &err) || codec_gpu_sync(g, NULL, &err))
                    fail_msg("decode_batch(%s): %s", f->what[ci], err.msg);
                for (int k = 0; k < n; k++) {
                    char what[256];
                    describe(what, sizeof what, f, ci, &v[k], kind);
                    const size_t nv = (size_t)v[k].ch.n * dim_of(c), bytes = nv * esz(v[k].ch.kv_type);
                    void *got = malloc(bytes), *want = cpu_decode(c, &v[k].ch, v[k].bytes, v[k].len);
                    assert_int_equal(d.o->download(d.be, got, b.rows + b.rows_at[k], bytes), 0);
                    n_differ += check_rows(what, v[k].ch.kv_type, got, want, nv, 1e-6);
                    n_vals += nv;
                    free(got), free(want);
                }
                dbatch_free(&d, &b);
                free_chunks(v, n);
            }
        codec_gpu_free(g);
    }
    printf("# GPU decode: %zu values, %zu not bit-identical to codec_decode\n", n_vals, n_differ);
    kp_backend_free(d.be);
}

/* Codes of two payloads of a pca/learned chunk: at most 0.1% differ, by one
 * step (the RoPE start angle may differ by an ulp); ranges 0 lo/step by at
 * most one fp16 ulp. Returns the number of differing codes. */
static size_t compare_learned_payloads(const char *what, const codec *c, const codec_chunk *ch, const uint8_t *a,
                                       const uint8_t *b) {
    codec_learned_view v;
    assert_int_equal(codec_learned_get_view(c, ch->layer, ch->is_v, &v, NULL), 0);
    for (int j = 0; j < 2 * v.r && !v.ranges; j++)
        if (abs((int)cg_rd16(a + 2 * j) - (int)cg_rd16(b + 2 * j)) > 1) fail_msg("%s: lo/step %d differ", what, j);
    const uint8_t *ca = a + (v.ranges ? 0 : 4 * (size_t)v.r), *cb = b + (v.ranges ? 0 : 4 * (size_t)v.r);
    size_t t = 0, differ = 0;
    for (int i = 0; i < ch->n; i++)
        for (int j = 0; j < v.r; j++) {
            const int qa = (int)ref_bits(ca, t, v.bits[j]), qb = (int)ref_bits(cb, t, v.bits[j]);
            t += v.bits[j];
            if (abs(qa - qb) > 1) fail_msg("%s: row %d latent %d: code %d vs %d", what, i, j, qa, qb);
            differ += qa != qb;
        }
    if (differ * 1000 > (size_t)ch->n * v.r + 1000) fail_msg("%s: %zu codes differ", what, differ);
    return differ;
}

static void test_gpu_encode(void **state) {
    REQUIRE_GPU();
    fx *f = *state;
    dev d = dev_open();
    uint64_t st = 31;
    size_t n_chunks = 0, n_code_diff = 0;
    for (int ci = 0; ci < f->n; ci++) {
        const codec *c = f->c[ci];
        codec_gpu_ctx *g = NULL;
        kp_err err = {0};
        if (codec_gpu_new(&g, c, 0, &err)) fail_msg("codec_gpu_new(%s): %s", f->what[ci], err.msg);
        for (size_t ti = 0; ti < KP_ARRAY_LEN(k_types); ti++)
            for (int kind = 0; kind < 2; kind++) {
                int n;
                tchunk *v = make_chunks(c, k_types[ti], kind, &n, &st);
                dbatch b = dbatch_new(&d, c, v, n, 1);
                if (codec_gpu_encode_batch(g, n, b.gc, NULL, &err) || codec_gpu_sync(g, NULL, &err))
                    fail_msg("encode_batch(%s): %s", f->what[ci], err.msg);
                for (int k = 0; k < n; k++) {
                    char what[256];
                    describe(what, sizeof what, f, ci, &v[k], kind);
                    uint8_t *chunk = malloc(v[k].len);
                    assert_int_equal(d.o->download(d.be, chunk + 16, b.pay + b.pay_at[k], v[k].len - 16), 0);
                    codec_gpu_seal_chunk(c, &v[k].ch, chunk, v[k].len - 16);
                    /* the CPU decodes it, to what it decodes its own encoding to */
                    void *mine = cpu_decode(c, &v[k].ch, chunk, v[k].len);
                    void *ref = cpu_decode(c, &v[k].ch, v[k].bytes, v[k].len);
                    if (!codec_is_learned(c)) {
                        if (memcmp(chunk, v[k].bytes, v[k].len)) fail_msg("%s: GPU encoding differs from codec_encode", what);
                        check_rows(what, v[k].ch.kv_type, mine, ref, (size_t)v[k].ch.n * dim_of(c), 1e-6);
                    } else {
                        n_code_diff += compare_learned_payloads(what, c, &v[k].ch, chunk + 16, v[k].bytes + 16);
                    }
                    /* and the one-chunk path (encode, download the payload, seal on the host) */
                    if (k % 3 == 0) {
                        uint8_t *one = malloc(v[k].len);
                        size_t one_len = 0;
                        if (codec_gpu_encode_to_host(g, &v[k].ch, b.rows + b.rows_at[k], one, v[k].len, &one_len, &err))
                            fail_msg("encode_to_host(%s): %s", what, err.msg);
                        assert_int_equal(one_len, v[k].len);
                        assert_memory_equal(one, chunk, one_len);
                        assert_int_equal(codec_gpu_encode_to_host(g, &v[k].ch, b.rows + b.rows_at[k], one, v[k].len - 1,
                                                                  &one_len, &err), KP_ERANGE);
                        free(one);
                    }
                    free(chunk), free(mine), free(ref);
                    n_chunks++;
                }
                dbatch_free(&d, &b);
                free_chunks(v, n);
            }
        codec_gpu_free(g);
    }
    printf("# GPU encode: %zu chunks; pca/learned codes differing from codec_encode: %zu\n", n_chunks, n_code_diff);
    kp_backend_free(d.be);
}

/* A session of n_layer layers x K/V x 3 chunks of 64 rows (positions 0,
 * 64, 128) restored through the pipeline into per-layer device caches. */
static void restore_session(const fx *f, int ci, dev *d, uint64_t *st) {
    const codec *c = f->c[ci];
    const int L = c->shape.n_layer, d_row = dim_of(c), T = KP_TYPE_F16, NCH = 3, N = 64;
    kp_err err = {0};
    codec_gpu_ctx *g = NULL;
    if (codec_gpu_new(&g, c, 0, &err)) fail_msg("codec_gpu_new: %s", err.msg);
    codec_gpu_host_chunk *hc = calloc((size_t)L * 2 * NCH, sizeof *hc);
    uint8_t **cache = calloc((size_t)L * 2, sizeof *cache); /* device [3 * 64][d] per layer and K/V */
    size_t biggest = 0, layer_bytes = 0;
    const size_t cache_bytes = (size_t)NCH * N * d_row * esz(T);
    for (int l = 0; l < L; l++) {
        size_t lb = 0;
        for (int kv = 0; kv < 2; kv++) {
            cache[2 * l + kv] = dev_alloc(d, cache_bytes, 0xff);
            for (int k = 0; k < NCH; k++) {
                codec_gpu_host_chunk *h = &hc[(2 * l + kv) * NCH + k];
                h->desc = (codec_chunk){.layer = l, .is_v = kv, .pos0 = k * N, .n = N, .kv_type = T};
                void *rows = make_rows(c, &h->desc, 1, st);
                h->bytes = cpu_encode(c, &h->desc, rows, &h->len);
                free(rows);
                h->rows = cache[2 * l + kv] + (size_t)k * N * d_row * esz(T);
                biggest = KP_MAX(biggest, h->len);
                lb += h->len;
            }
        }
        layer_bytes = KP_MAX(layer_bytes, lb);
    }
    /* buffers of about a third of a layer: every layer takes several batches */
    const size_t buf = KP_MAX(biggest, layer_bytes / 3);
    codec_gpu_staging *pool = NULL;
    if (codec_gpu_staging_new(&pool, 3, buf, &err)) fail_msg("staging: %s", err.msg);
    assert_int_equal(codec_gpu_staging_buffer_bytes(pool), buf);
    void *held = NULL;
    assert_int_equal(codec_gpu_staging_acquire(pool, &held, &err), 0); /* someone else holds one */
    assert_int_equal(codec_gpu_staging_n_free(pool), 2);
    codec_gpu_restore *r = NULL;
    if (codec_gpu_restore_begin(&r, g, pool, 4, &err)) fail_msg("restore_begin: %s", err.msg);
    assert_int_equal(codec_gpu_staging_n_free(pool), 0); /* it took the 2 free ones */
    void *none = NULL;
    assert_int_equal(codec_gpu_staging_acquire(pool, &none, &err), KP_EBUSY);
    assert_int_equal(codec_gpu_restore_layer_ready(r, 0, &err), KP_EINVAL); /* not submitted */
    /* a damaged chunk is refused before anything is queued */
    uint8_t *bad = malloc(hc[0].len);
    memcpy(bad, hc[0].bytes, hc[0].len);
    bad[hc[0].len - 1] ^= 1;
    codec_gpu_host_chunk hb = hc[0];
    hb.bytes = bad;
    assert_int_equal(codec_gpu_restore_layer(r, 0, 1, &hb, &err), KP_EFORMAT);
    hb.desc.layer = 1;
    assert_int_equal(codec_gpu_restore_layer(r, 0, 1, &hb, &err), KP_EINVAL);
    free(bad);
    /* submit every layer (copies of l+1 overlap the decode of l), then check each */
    const double t0 = kp_now();
    for (int l = 0; l < L; l++)
        if (codec_gpu_restore_layer(r, l, 2 * NCH, &hc[2 * l * NCH], &err)) fail_msg("restore_layer %d: %s", l, err.msg);
    const double t_submit = kp_now() - t0;
    assert_int_equal(codec_gpu_restore_stream_wait(r, L - 1, NULL, &err), 0);
    for (int l = 0; l < L; l++) {
        if (codec_gpu_restore_wait_layer(r, l, &err)) fail_msg("wait_layer %d: %s", l, err.msg);
        assert_int_equal(codec_gpu_restore_layer_ready(r, l, &err), 1);
        for (int kv = 0; kv < 2; kv++) {
            void *got = malloc(cache_bytes);
            assert_int_equal(d->o->download(d->be, got, cache[2 * l + kv], cache_bytes), 0);
            for (int k = 0; k < NCH; k++) {
                const codec_gpu_host_chunk *h = &hc[(2 * l + kv) * NCH + k];
                void *want = cpu_decode(c, &h->desc, h->bytes, h->len);
                char what[200];
                snprintf(what, sizeof what, "restore %s layer %d %s chunk %d", f->what[ci], l, kv ? "V" : "K", k);
                check_rows(what, T, (uint8_t *)got + (size_t)k * N * d_row * esz(T), want, (size_t)N * d_row, 1e-6);
                free(want);
            }
            free(got);
        }
    }
    printf("# restore %s: %d layers, staging buffers of %zu bytes, submit %.2f ms, total %.2f ms\n", f->what[ci], L,
           buf, t_submit * 1e3, (kp_now() - t0) * 1e3);
    assert_int_equal(codec_gpu_restore_end(r, &err), 0);
    assert_int_equal(codec_gpu_staging_n_free(pool), 2); /* the restore gave its buffers back */
    codec_gpu_staging_release(pool, held);
    assert_int_equal(codec_gpu_staging_n_free(pool), 3);
    codec_gpu_staging_free(pool);
    for (int i = 0; i < L * 2 * NCH; i++) free((void *)hc[i].bytes);
    for (int i = 0; i < 2 * L; i++) d->o->free(d->be, cache[i]);
    free(hc), free(cache);
    codec_gpu_free(g);
}

static void test_gpu_pipeline(void **state) {
    REQUIRE_GPU();
    fx *f = *state;
    dev d = dev_open();
    uint64_t st = 41;
    for (int ci = 0; ci < f->n; ci++) {
        const int id = codec_id_of(f->c[ci]);
        /* int8 and kivi2 of a Llama-like shape, every pca/learned codec */
        if (codec_is_learned(f->c[ci]) || ((id == CODEC_INT8 || id == CODEC_KIVI2) && f->c[ci]->shape.head_dim == 128))
            restore_session(f, ci, &d, &st);
    }
    kp_backend_free(d.be);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_view_reference),
        cmocka_unit_test(test_emulated_kernels),
        cmocka_unit_test(test_header_helpers),
        cmocka_unit_test(test_without_device),
        cmocka_unit_test(test_gpu_decode),
        cmocka_unit_test(test_gpu_encode),
        cmocka_unit_test(test_gpu_pipeline),
    };
    return cmocka_run_group_tests(tests, fx_setup, fx_teardown);
}
