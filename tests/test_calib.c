/*
 * test_calib.c — the fitted KV codecs 'learned' and 'pca':
 * calibration of stories260K on the calibration text, codec files written
 * and re-opened, and round trips of REAL KV from the evaluation text (never
 * the calibration text): weighted error falls as bits rise, keys' is small
 * at 4 bits, and 'learned' beats 'pca' at equal bits on the weighted key
 * error; the Jacobi solver against known matrices; a deterministic
 * bitstream and a deterministic calibration; damaged chunks and damaged,
 * truncated or foreign codec files refused cleanly. The fit's own claims:
 * refinement never raises the held-out KL (checked again by re-running the
 * written codecs on the held-out slice); the bit allocator gives more bits
 * to a coder (or a layer, end to end) made more sensitive; --max-dppl's
 * codec meets its bound on the held-out slice.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tests/testutil.h"

#include <stdatomic.h>
#include <unistd.h>

#include "compress/calib.h"
#include "compress/codec.h"
#include "compress/codecfile.h" /* codec_chunk_bytes_at */
#include "compress/quality.h"
#include "engine/model.h"
#include "kernels/types.h"

#define MODEL_REL "models/stories260K.gguf"
#define CALIB_REL "data/tinystories-train-calib.txt"
#define EVAL_REL "data/tinystories-valid-eval.txt"
#define N_CALIB 16384
#define N_EVAL 2048
#define CTX 256

typedef struct fx {
    model *m;
    codec_shape shape;
    int32_t *cal, *ev;
    size_t n_cal, n_ev;
    char *dir;
    char path[7][512]; /* learned 1, 2, 4 bits; pca 2, 4 bits; learned 2 bits again;
                          learned 2 bits with per-chunk ranges */
    calib_report rep[7];
} fx;

#define N_FX 7
static const double k_bits[N_FX] = {1, 2, 4, 2, 4, 2, 2};
static const int k_kind[N_FX] = {CODEC_LEARNED, CODEC_LEARNED, CODEC_LEARNED, CODEC_PCA, CODEC_PCA,
                                 CODEC_LEARNED, CODEC_LEARNED};

static int32_t *tokens_of(model *m, const char *rel, size_t max_bytes, size_t want, size_t *n) {
    char *p = tu_shared_path(rel);
    size_t len = 0;
    char *txt = tu_read_file(p, &len);
    free(p);
    assert_non_null(txt);
    int32_t *ids = NULL;
    kp_err err = {0};
    assert_int_equal(tok_encode(model_vocab(m), txt, KP_MIN(len, max_bytes), true, false, &ids, n, &err), 0);
    free(txt);
    assert_true(*n >= want);
    *n = want;
    return ids;
}

static int fx_setup(void **state) {
    if (!tu_shared_exists(MODEL_REL) || !tu_shared_exists(CALIB_REL) || !tu_shared_exists(EVAL_REL)) {
        *state = NULL;
        return 0;
    }
    fx *f = calloc(1, sizeof *f);
    kp_err err = {0};
    char *mp = tu_shared_path(MODEL_REL);
    model_opts mo = model_default_opts();
    mo.n_threads = 1; /* a tiny model: one thread is as fast and leaves the other core alone */
    if (model_load(&f->m, mp, &mo, &err)) {
        fprintf(stderr, "%s\n", err.msg);
        return -1;
    }
    free(mp);
    const model_hparams *hp = model_hp(f->m);
    f->shape = (codec_shape){hp->n_layer, hp->n_kv_heads, hp->head_dim, hp->n_rot, hp->rope_mode,
                             hp->rope_base, hp->rope_freq_scale, model_fingerprint(f->m)};
    f->cal = tokens_of(f->m, CALIB_REL, 200000, N_CALIB, &f->n_cal);
    f->ev = tokens_of(f->m, EVAL_REL, 40000, N_EVAL, &f->n_ev);
    f->dir = tu_tmpdir();
    for (int i = 0; i < N_FX; i++) {
        calib_opts o = calib_default_opts();
        o.bits = k_bits[i];
        o.kind = k_kind[i];
        o.ranges = i == 6 ? 0 : 1;
        o.sens = i != 6; /* the older per-chunk ranges: the k-weight prior (keeps the test short) */
        snprintf(f->path[i], sizeof f->path[i], "%s/c%d.gguf", f->dir, i);
        if (calib_run(f->m, f->cal, f->n_cal, &o, f->path[i], &f->rep[i], &err)) {
            fprintf(stderr, "calib_run: %s\n", err.msg);
            return -1;
        }
        printf("# %s target %.1f bits: achieved %.3f bits/value, held-out rel err K %.4f V %.4f, %.2f s\n",
               k_kind[i] == CODEC_PCA ? "pca    " : "learned", k_bits[i], f->rep[i].bits_per_value,
               f->rep[i].rel_err_k, f->rep[i].rel_err_v, f->rep[i].seconds);
    }
    *state = f;
    return 0;
}

static int fx_teardown(void **state) {
    fx *f = *state;
    if (!f) return 0;
    for (int i = 0; i < N_FX; i++) unlink(f->path[i]);
    rmdir(f->dir);
    free(f->dir), free(f->cal), free(f->ev);
    model_free(f->m);
    free(f);
    return 0;
}

#define NEED_FX(f)                                 \
    fx *f = *state;                                \
    do {                                           \
        if (!f) {                                  \
            TU_SKIP_UNLESS_SHARED(MODEL_REL);      \
            TU_SKIP_UNLESS_SHARED(CALIB_REL);      \
            TU_SKIP_UNLESS_SHARED(EVAL_REL);       \
        }                                          \
    } while (0)

static codec *open_ok(const char *path, const codec_shape *s) {
    codec *c = NULL;
    kp_err err = {0};
    int rc = codec_open(&c, path, s, &err);
    if (rc) fprintf(stderr, "codec_open: %s\n", err.msg);
    assert_int_equal(rc, 0);
    return c;
}

/* ---- Jacobi ------------------------------------------------------------- */

static void test_jacobi_known(void **state) {
    (void)state;
    double a[9] = {2, 1, 0, 1, 2, 0, 0, 0, 5}, ev[3], V[9];
    calib_jacobi_eig(a, 3, ev, V);
    assert_true(fabs(ev[0] - 5) < 1e-12 && fabs(ev[1] - 3) < 1e-12 && fabs(ev[2] - 1) < 1e-12);
    /* eigenvector of 5 is e3; of 3 is (1,1,0)/sqrt2 (sign: largest entry positive) */
    assert_true(fabs(V[2 * 3 + 0] - 1) < 1e-12);
    assert_true(fabs(V[0 * 3 + 1] - M_SQRT1_2) < 1e-12 && fabs(V[1 * 3 + 1] - M_SQRT1_2) < 1e-12);

    /* random symmetric 24 x 24: V diag(ev) V^T == A, V^T V == I, sorted */
    enum { N = 24 };
    static double A[N * N], B[N * N], W[N * N], e[N];
    uint64_t st = 7;
    float r[N * N];
    tu_rand_floats(r, N * N, 1.0f, &st);
    for (int i = 0; i < N; i++)
        for (int j = 0; j <= i; j++) A[i * N + j] = A[j * N + i] = r[i * N + j];
    memcpy(B, A, sizeof A);
    calib_jacobi_eig(B, N, e, W);
    for (int i = 0; i + 1 < N; i++) assert_true(e[i] >= e[i + 1]);
    for (int i = 0; i < N; i++)
        for (int j = 0; j < N; j++) {
            double s = 0, o = 0;
            for (int k = 0; k < N; k++) {
                s += W[i * N + k] * e[k] * W[j * N + k];
                o += W[k * N + i] * W[k * N + j];
            }
            assert_true(fabs(s - A[i * N + j]) < 1e-10);
            assert_true(fabs(o - (i == j)) < 1e-10);
        }
}

/* ---- quality on evaluation text -------------------------------------------- */

static void test_quality(void **state) {
    NEED_FX(f);
    double ek[6], evv[6];
    kp_err err = {0};
    for (int i = 0; i < 5; i++) {
        codec *c = open_ok(f->path[i], &f->shape);
        assert_int_equal(codec_id_of(c), k_kind[i]);
        assert_int_equal(calib_codec_error(f->m, c, f->ev, f->n_ev, CTX, 64, &ek[i], &evv[i], &err), 0);
        printf("# eval: %s %.0f bits (achieved %.3f): weighted rel err K %.5f V %.5f\n",
               codec_name(c), k_bits[i], f->rep[i].bits_per_value, ek[i], evv[i]);
        /* stored bits per value: exact per-layer payloads (no padding, no
         * header, before LZ4) equal the achieved bits the calibration reports */
        const int d = f->shape.n_kv_heads * f->shape.head_dim;
        double stored = 0;
        for (int l = 0; l < f->shape.n_layer; l++)
            for (int t = 0; t < 2; t++)
                stored += 8.0 * (double)(codec_chunk_bytes_at(c, 64, KP_TYPE_F32, t, l) - 16);
        stored /= 64.0 * d * 2 * f->shape.n_layer;
        printf("#   stored (no header, no LZ4) %.3f bits/value\n", stored);
        assert_true(fabs(stored - f->rep[i].bits_per_value) < 8.0 / (64.0 * d) + 1e-9);
        /* achieved bits never exceed the target and come close to it */
        assert_true(f->rep[i].bits_per_value <= k_bits[i] + 1e-9);
        assert_true(f->rep[i].bits_per_value >= 0.85 * k_bits[i]);
        codec_free(c);
    }
    /* more bits, less error (learned 1 -> 2 -> 4) */
    assert_true(ek[0] > ek[1] && ek[1] > ek[2]);
    assert_true(evv[0] > evv[1] && evv[1] > evv[2]);
    /* ~4 bits/value: keys' error small; values' larger, because the
     * measured sensitivity sends most bits to the keys (values move the
     * next-token KL ~50x less per unit of relative error on this model) */
    assert_true(ek[2] < 0.05 && evv[2] < 0.25);
    /* learned beats pca at equal bits on the weighted key error (2 and 4 bits) */
    assert_true(ek[1] < ek[3]);
    assert_true(ek[2] < ek[4]);
    /* per-chunk ranges (the older scheme, still read and written): every
     * chunk carries 4 bytes per latent, the chunk is still exact per layer;
     * at equal bits its errors are sane but higher than the fixed ranges'
     * (measured: K 0.034 V 0.19 against K 0.012 V 0.061) */
    {
        codec *c = open_ok(f->path[6], &f->shape);
        double k6, v6;
        assert_int_equal(calib_codec_error(f->m, c, f->ev, f->n_ev, CTX, 64, &k6, &v6, &err), 0);
        printf("# eval: learned 2 bits, per-chunk ranges (achieved %.3f): weighted rel err K %.5f V %.5f\n",
               f->rep[6].bits_per_value, k6, v6);
        assert_true(k6 > ek[1]); /* (values: another allocation, see fx_setup) */
        assert_true(k6 < 0.1 && v6 < 0.4);
        codec *c1 = open_ok(f->path[1], &f->shape);
        const codec_learned *l6 = (const codec_learned *)c, *l1 = (const codec_learned *)c1;
        assert_int_equal(l6->ranges, 0);
        assert_int_equal(l1->ranges, 1);
        for (int l = 0; l < f->shape.n_layer; l++)
            for (int t = 0; t < 2; t++) {
                const lc_coder *cd = &l6->coders[2 * l + t];
                assert_int_equal(codec_chunk_bytes_at(c, 64, KP_TYPE_F32, t, l),
                                 16 + 4 * (size_t)cd->r + (64 * (size_t)cd->bits_sum + 7) / 8);
                cd = &l1->coders[2 * l + t];
                assert_int_equal(codec_chunk_bytes_at(c1, 64, KP_TYPE_F32, t, l),
                                 16 + (64 * (size_t)cd->bits_sum + 7) / 8);
            }
        codec_free(c1);
        codec_free(c);
    }
    /* the held-out error reported by calibration is in the same range */
    assert_true(f->rep[2].rel_err_k < 0.05 && f->rep[2].rel_err_v < 0.25);
}

/* ---- chunks: determinism, types, damage -------------------------------------- */

static kv_cache *eval_kv(fx *f) {
    kv_cache *kv = NULL;
    kp_err err = {0};
    assert_int_equal(model_kv_new(f->m, &kv, KP_TYPE_F32, CTX, &err), 0);
    model_seq s = {.kv = kv, .tokens = f->ev, .n_tokens = CTX};
    assert_int_equal(model_forward(f->m, &s, 1, &err), 0);
    return kv;
}

static void test_chunks(void **state) {
    NEED_FX(f);
    kp_err err = {0};
    codec *c1 = open_ok(f->path[1], &f->shape), *c2 = open_ok(f->path[1], &f->shape);
    kv_cache *kv = eval_kv(f);
    const int d = f->shape.n_kv_heads * f->shape.head_dim, n = 64;
    size_t cap = codec_max_bytes(c1, n);
    uint8_t *a = malloc(cap), *b = malloc(cap);
    float *out = malloc((size_t)n * d * sizeof(float)), *out2 = malloc((size_t)n * d * sizeof(float));
    uint16_t *h16 = malloc((size_t)n * d * 2), *o16 = malloc((size_t)n * d * 2);
    for (int l = 0; l < f->shape.n_layer; l++)
        for (int t = 0; t < 2; t++) {
            const float *rows = (const float *)(t ? kv->v[l] : kv->k[l]) + (size_t)128 * d;
            codec_chunk ch = {.layer = l, .is_v = t, .pos0 = 128, .n = n, .kv_type = KP_TYPE_F32};
            size_t la, lb;
            assert_int_equal(codec_encode(c1, &ch, rows, a, cap, &la, &err), 0);
            assert_int_equal(codec_encode(c2, &ch, rows, b, cap, &lb, &err), 0);
            assert_int_equal(la, lb);
            assert_int_equal(la, codec_chunk_bytes_at(c1, n, KP_TYPE_F32, t, l));
            assert_true(la <= codec_chunk_bytes(c1, n, KP_TYPE_F32, t)); /* largest layer */
            /* a chunk decoded as another layer (other size) is a mismatch */
            codec_chunk other = ch;
            other.layer = (l + 1) % f->shape.n_layer;
            if (codec_chunk_bytes_at(c1, n, KP_TYPE_F32, t, other.layer) != la)
                assert_int_equal(codec_decode(c1, &other, a, la, out2, &err), KP_EMISMATCH);
            other.layer = f->shape.n_layer;
            assert_int_equal(codec_decode(c1, &other, a, la, out2, &err), KP_EINVAL);
            assert_memory_equal(a, b, la); /* deterministic bitstream */
            assert_int_equal(codec_decode(c1, &ch, a, la, out, &err), 0);
            /* F16 rows give the same latents up to the input rounding */
            for (int i = 0; i < n * d; i++) h16[i] = kp_f32_to_fp16(rows[i]);
            codec_chunk c16 = ch;
            c16.kv_type = KP_TYPE_F16;
            assert_int_equal(codec_encode(c1, &c16, h16, b, cap, &lb, &err), 0);
            assert_int_equal(codec_decode(c1, &c16, b, lb, o16, &err), 0);
            double num = 0, den = 0, num16 = 0;
            for (int i = 0; i < n * d; i++) {
                num += (out[i] - rows[i]) * (double)(out[i] - rows[i]);
                num16 += (kp_fp16_to_f32(o16[i]) - rows[i]) * (double)(kp_fp16_to_f32(o16[i]) - rows[i]);
                den += (double)rows[i] * rows[i];
            }
            /* 2 bits, unweighted: keys sane. Values are fitted for W_O's
             * metric and the layers whose values matter least keep a few
             * latents only (see test_quality), so their unweighted error
             * says little (up to ~1.1 measured: W_O all but ignores some
             * directions); for them F16 rows must match F32 rows. */
            print_message("# chunk layer %d %c: unweighted rel err %.4f (F16 rows %.4f)\n", l,
                          t ? 'V' : 'K', num / den, num16 / den);
            if (!t) assert_true(num / den < 0.25 && num16 / den < 0.25);
            assert_true(isfinite(num) && fabs(num16 - num) <= 0.05 * num + 1e-6 * den);

            /* damage: every 7th byte flipped in turn, and truncation */
            for (int i = 0; i < n * d; i++) out2[i] = -1234.5f;
            for (size_t k = 0; k < la; k += 7) {
                a[k] ^= 0x10;
                assert_int_equal(codec_decode(c1, &ch, a, la, out2, &err), KP_EFORMAT);
                a[k] ^= 0x10;
            }
            assert_int_equal(codec_decode(c1, &ch, a, la - 1, out2, &err), KP_EFORMAT);
            for (int i = 0; i < n * d; i++) assert_true(out2[i] == -1234.5f);
        }
    /* 'pca' at 4 bits (int8 latents, post-RoPE keys): unweighted error of
     * the rows as stored is moderate; it keeps fewer dims than learned */
    codec *cp = open_ok(f->path[4], &f->shape);
    cap = codec_max_bytes(cp, n);
    free(a);
    a = malloc(cap);
    for (int l = 0; l < f->shape.n_layer; l++)
        for (int t = 0; t < 2; t++) {
            const float *rows = (const float *)(t ? kv->v[l] : kv->k[l]) + (size_t)128 * d;
            codec_chunk ch = {.layer = l, .is_v = t, .pos0 = 128, .n = n, .kv_type = KP_TYPE_F32};
            size_t la;
            assert_int_equal(codec_encode(cp, &ch, rows, a, cap, &la, &err), 0);
            assert_int_equal(codec_decode(cp, &ch, a, la, out, &err), 0);
            double num = 0, den = 0;
            for (int i = 0; i < n * d; i++) {
                num += (out[i] - rows[i]) * (double)(out[i] - rows[i]);
                den += (double)rows[i] * rows[i];
            }
            assert_true(num / den < 0.5);
        }
    codec_free(cp);
    kv_free(kv);
    free(a), free(b), free(out), free(out2), free(h16), free(o16);
    codec_free(c1), codec_free(c2);
}

/* ---- codec files ------------------------------------------------------------- */

static void test_file_damage(void **state) {
    NEED_FX(f);
    size_t len = 0;
    char *buf = tu_read_file(f->path[1], &len);
    assert_non_null(buf);
    char p[600];
    snprintf(p, sizeof p, "%s/bad.gguf", f->dir);
    kp_err err = {0};
    codec *c = NULL;
    /* flipped bytes: header, keys, tensor metadata, padding, data */
    size_t step = len / 61 + 1;
    for (size_t k = 0; k < len; k += step) {
        buf[k] ^= 0x04;
        FILE *fp = fopen(p, "wb");
        fwrite(buf, 1, len, fp);
        fclose(fp);
        int rc = codec_open(&c, p, &f->shape, &err);
        assert_true(rc == KP_EFORMAT || rc == KP_EUNSUP);
        assert_null(c);
        buf[k] ^= 0x04;
    }
    /* truncated */
    for (size_t cut = 0; cut < len; cut += len / 13 + 1) {
        FILE *fp = fopen(p, "wb");
        fwrite(buf, 1, cut, fp);
        fclose(fp);
        assert_int_equal(codec_open(&c, p, &f->shape, &err), KP_EFORMAT);
        assert_null(c);
    }
    /* intact copy opens */
    FILE *fp = fopen(p, "wb");
    fwrite(buf, 1, len, fp);
    fclose(fp);
    c = open_ok(p, &f->shape);
    codec_free(c);
    /* the same bytes from memory (codecfile_open_mem, the fuzz target's entry):
     * they open and are unchanged afterwards; a flipped byte is refused */
    char *copy = malloc(len);
    assert_non_null(copy);
    memcpy(copy, buf, len);
    c = NULL;
    assert_int_equal(codecfile_open_mem(&c, (uint8_t *)buf, len, "mem", &f->shape, &err), 0);
    assert_non_null(c);
    codec_free(c);
    assert_memory_equal(buf, copy, len);
    buf[len / 2] ^= 0x04;
    c = NULL;
    assert_int_equal(codecfile_open_mem(&c, (uint8_t *)buf, len, "mem", &f->shape, &err), KP_EFORMAT);
    assert_null(c);
    buf[len / 2] ^= 0x04;
    free(copy);
    /* another model's fingerprint */
    codec_shape other = f->shape;
    other.model_fingerprint ^= 1;
    c = NULL;
    assert_int_equal(codec_open(&c, p, &other, &err), KP_EMISMATCH);
    assert_non_null(strstr(err.msg, "another model"));
    assert_null(c);
    /* bare names need a file */
    assert_int_equal(codec_open(&c, "learned", &f->shape, &err), KP_EINVAL);
    assert_int_equal(codec_open(&c, "/nonexistent/x.gguf", &f->shape, &err), KP_ENOTFOUND);
    unlink(p);
    free(buf);
}

static void test_calib_deterministic(void **state) {
    NEED_FX(f);
    size_t la = 0, lb = 0;
    char *a = tu_read_file(f->path[1], &la), *b = tu_read_file(f->path[5], &lb);
    assert_non_null(a);
    assert_non_null(b);
    assert_int_equal(la, lb);
    assert_memory_equal(a, b, la);
    free(a), free(b);
}

/* ---- the fast unpacker against a plain one ------------------------------------ */

/* The plain reading of the bit stream (codec_learned.c): code j of row i
 * starts at stream bit t = i B + sum of bits before j, bit k of the code is
 * bit ((t + k) & 7) of byte (t + k) >> 3. */
static uint32_t ref_code(const uint8_t *codes, size_t t, int b) {
    uint32_t q = 0;
    for (int k = 0; k < b; k++) q |= (uint32_t)((codes[(t + k) >> 3] >> ((t + k) & 7)) & 1) << k;
    return q;
}

/* Random shapes, ranks, bit widths (1..8 per dim), row counts and payloads,
 * both range kinds: the decoded V rows (no RoPE, float32) equal, bit for
 * bit, dmean + sum over j in order of dect[j] * z_j with z from the plain
 * unpacker (the decoder's contract in codec_learned.c). */
static void test_unpack_reference(void **state) {
    (void)state;
    uint64_t st = 99;
    for (int cfg = 0; cfg < 24; cfg++) {
        float u[4];
        tu_rand_floats(u, 4, 1.0f, &st);
        const int nkv = 1 + (int)(fabsf(u[0]) * 3.99f), hd = 2 * (1 + (int)(fabsf(u[1]) * 19.99f));
        const int d = nkv * hd, ranges = cfg % 2;
        codec_shape s = {2, nkv, hd, hd, 0, 10000.0f, 1.0f, 0};
        int ranks[4];
        for (int i = 0; i < 4; i++) {
            float v;
            tu_rand_floats(&v, 1, 1.0f, &st);
            ranks[i] = 1 + (int)(fabsf(v) * (d - 1));
        }
        codec *c = NULL;
        kp_err err = {0};
        assert_int_equal(codec_learned_alloc(&c, &s, cfg % 4 < 2 ? CODEC_LEARNED : CODEC_PCA, ranks, &err), 0);
        codec_learned *cl = (codec_learned *)c;
        cl->ranges = ranges;
        const int maxb = 1 + cfg % 8; /* narrow and wide mixes */
        for (int i = 0; i < 4; i++) {
            lc_coder *cd = &cl->coders[i];
            tu_rand_floats(cd->mean, d, 1.0f, &st);
            tu_rand_floats(cd->enc, (size_t)d * cd->r, 1.0f, &st);
            tu_rand_floats(cd->dec, (size_t)d * cd->r, 1.0f, &st);
            for (int j = 0; j < cd->r; j++) {
                float v;
                tu_rand_floats(&v, 1, 1.0f, &st);
                cd->bits[j] = (uint8_t)(1 + (int)(fabsf(v) * (maxb - 0.01f)));
            }
        }
        assert_int_equal(codec_learned_finish(c, &err), 0);
        for (int rep = 0; rep < 4; rep++) {
            float v[2];
            tu_rand_floats(v, 2, 1.0f, &st);
            const int n = rep == 0 ? 64 : 1 + (int)(fabsf(v[0]) * 99), layer = v[1] > 0;
            const lc_coder *cd = &cl->coders[2 * layer + 1];
            const size_t pl = codec_learned_payload(c, n, 1, layer);
            uint8_t *pay = malloc(pl);
            float *out = malloc((size_t)n * d * sizeof(float)), *ref = malloc((size_t)n * d * sizeof(float));
            float *z = malloc((size_t)cd->r * sizeof(float));
            for (size_t k = 0; k < pl; k++) {
                st = st * 6364136223846793005ULL + 1442695040888963407ULL;
                pay[k] = (uint8_t)(st >> 56);
            }
            if (!ranges) /* sane lo and step (fp16) ahead of the codes */
                for (int j = 0; j < cd->r; j++) {
                    float lh[2];
                    tu_rand_floats(lh, 2, 1.0f, &st);
                    const uint16_t a = kp_f32_to_fp16(lh[0]), b = kp_f32_to_fp16(0.1f + 0.05f * lh[1]);
                    pay[2 * j] = (uint8_t)a, pay[2 * j + 1] = (uint8_t)(a >> 8);
                    pay[2 * cd->r + 2 * j] = (uint8_t)b, pay[2 * cd->r + 2 * j + 1] = (uint8_t)(b >> 8);
                }
            codec_chunk ch = {.layer = layer, .is_v = 1, .pos0 = 7, .n = n, .kv_type = KP_TYPE_F32};
            assert_int_equal(c->ops->decode(c, &ch, pay, out, &err), 0);
            const uint8_t *codes = pay + (ranges ? 0 : 4 * (size_t)cd->r);
            size_t t = 0;
            for (int i = 0; i < n; i++) {
                for (int j = 0; j < cd->r; j++) {
                    const uint32_t q = ref_code(codes, t, cd->bits[j]);
                    t += cd->bits[j];
                    if (ranges)
                        z[j] = (float)q;
                    else {
                        const float lo = kp_fp16_to_f32((uint16_t)(pay[2 * j] | pay[2 * j + 1] << 8));
                        const float sp = kp_fp16_to_f32((uint16_t)(pay[2 * cd->r + 2 * j] | pay[2 * cd->r + 2 * j + 1] << 8));
                        z[j] = (float)q * sp + lo;
                    }
                }
                for (int k = 0; k < d; k++) {
                    float acc = 0;
                    for (int j = 0; j < cd->r; j++) acc += cd->dect[(size_t)j * cd->dpad + k] * z[j];
                    ref[(size_t)i * d + k] = cd->dmean[k] + acc;
                }
            }
            assert_int_equal(t, (size_t)n * cd->bits_sum);
            assert_memory_equal(out, ref, (size_t)n * d * sizeof(float));
            free(pay), free(out), free(ref), free(z);
        }
        codec_free(c);
    }
}

/* ---- the fit's claims ---------------------------------------------------------- */

/* Held-out quality of a codec file, measured here (not by calibration):
 * the options calib_run's held-out runs use. */
static quality_result heldout_quality(fx *f, const char *path, const calib_report *rep) {
    codec *c = open_ok(path, &f->shape);
    calib_opts co = calib_default_opts();
    /* the file carries the layout it was calibrated with (the server parks with it) */
    int lc = 0, ls = -1, lw = -1;
    assert_int_equal(codec_layout(c, &lc, &ls, &lw), 0);
    assert_int_equal(lc, co.chunk);
    assert_int_equal(ls, co.sink);
    assert_int_equal(lw, co.window);
    quality_opts qo = quality_default_opts();
    qo.n_ctx = CTX, qo.park_every = co.park_every, qo.chunk = co.chunk, qo.sink = co.sink;
    qo.window = co.window, qo.kv_type = KP_TYPE_F16;
    quality_result r;
    kp_err err = {0};
    assert_true(rep->heldout_start > 0 && rep->heldout_tokens >= CTX);
    assert_true(rep->heldout_start + rep->heldout_tokens <= (int64_t)f->n_cal);
    assert_int_equal(quality_eval(f->m, c, f->cal + rep->heldout_start, rep->heldout_tokens, &qo, &r, &err), 0);
    codec_free(c);
    return r;
}

/* Refinement (unbiased decoder refit, encoder step) is kept only where it
 * lowers the held-out KL: at the same bits it never does worse than the
 * PCA start (--no-refine), and the reports are what the written codecs
 * really do on the held-out slice. */
static void test_refine_never_worse(void **state) {
    NEED_FX(f);
    calib_opts o = calib_default_opts();
    o.bits = 2;
    o.refine = 0;
    char p[600];
    snprintf(p, sizeof p, "%s/norefine.gguf", f->dir);
    calib_report nr;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &nr, &err), 0);
    const calib_report *rr = &f->rep[1]; /* learned 2 bits, refined (the default) */
    quality_result qr = heldout_quality(f, f->path[1], rr), qn = heldout_quality(f, p, &nr);
    print_message("# held-out KL: PCA start %.6f, refined %.6f (reported %.6f / %.6f); weighted rel err "
                  "K %.4f -> %.4f, V %.4f -> %.4f\n", qn.kl, qr.kl, nr.heldout_kl, rr->heldout_kl,
                  rr->rel_err_k_pca, rr->rel_err_k, rr->rel_err_v_pca, rr->rel_err_v);
    assert_true(fabs(qr.kl - rr->heldout_kl) < 1e-9 && fabs(qn.kl - nr.heldout_kl) < 1e-9);
    assert_true(fabs(100.0 * (qr.ppl - qr.ppl_ref) / qr.ppl_ref - rr->heldout_dppl) < 1e-9);
    assert_true(qr.kl <= qn.kl + 1e-12);
    /* same allocation: the PCA start the refinement began from is the
     * --no-refine codec, and its error is what the refined run reports */
    assert_true(fabs(nr.rel_err_k - rr->rel_err_k_pca) < 1e-12 && fabs(nr.rel_err_v - rr->rel_err_v_pca) < 1e-12);
    assert_true(nr.rel_err_k_pca == nr.rel_err_k && nr.rel_err_v_pca == nr.rel_err_v);
    assert_true(fabs(nr.bits_per_value - rr->bits_per_value) < 1e-9);
    unlink(p);
}

/* The allocator alone: equal coders share the bits evenly; making one
 * coder more sensitive moves bits to it, monotonically, within budget. */
static void test_allocate_sensitive(void **state) {
    (void)state;
    enum { NC = 4, D = 16, C = 64 };
    double lam[NC * D], sens[NC] = {1, 1, 1, 1};
    uint8_t bits[NC * D];
    for (int c = 0; c < NC; c++) {
        double t = 0;
        for (int j = 0; j < D; j++) t += lam[c * D + j] = pow(0.7, j);
        for (int j = 0; j < D; j++) lam[c * D + j] /= t;
    }
    int sum[NC], prev = 0;
    for (int step = 0; step < 5; step++) {
        sens[2] = pow(3.0, step); /* 1, 3, 9, 27, 81 */
        calib_allocate_bits(lam, sens, NC, D, C, 2.0, bits);
        int tot = 0;
        for (int c = 0; c < NC; c++) {
            sum[c] = 0;
            for (int j = 0; j < D; j++) {
                sum[c] += bits[c * D + j];
                assert_true(bits[c * D + j] <= CODECFILE_MAX_BITS);
            }
            assert_true(bits[c * D] >= 1); /* every coder keeps a latent */
            tot += sum[c];
        }
        print_message("# sens[2] %g: bits per coder %d %d %d %d\n", sens[2], sum[0], sum[1], sum[2], sum[3]);
        assert_true(tot <= 2 * D * NC && tot >= 2 * D * NC - 1); /* the budget, used */
        if (step == 0) /* equal coders: equal shares (up to one tie-broken step) */
            for (int c = 1; c < NC; c++) assert_true(abs(sum[c] - sum[0]) <= 1);
        else {
            assert_true(sum[2] >= prev);
            for (int c = 0; c < NC; c++)
                if (c != 2) assert_true(sum[2] > sum[c]);
        }
        prev = sum[2];
    }
    assert_true(sum[2] >= sum[0] + 8); /* 81x as sensitive: a clear shift */
    /* within a coder, bits never go to a weaker latent before a stronger one */
    for (int c = 0; c < NC; c++)
        for (int j = 1; j < D; j++) assert_true(bits[c * D + j] <= bits[c * D + j - 1]);
}

/* End to end: calibration with layer 2's measured sensitivity scaled 16x
 * gives layer 2 more bits than the plain calibration at the same target. */
static void test_sensitive_layer(void **state) {
    NEED_FX(f);
    const int L = f->shape.n_layer;
    double *scale = malloc(2 * (size_t)L * sizeof(double));
    for (int i = 0; i < 2 * L; i++) scale[i] = i / 2 == 2 ? 16.0 : 1.0;
    calib_opts o = calib_default_opts();
    o.bits = 2;
    o.sens_scale = scale;
    char p[600];
    snprintf(p, sizeof p, "%s/boost.gguf", f->dir);
    calib_report rep;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), 0);
    codec *cb = open_ok(p, &f->shape), *c0 = open_ok(f->path[1], &f->shape);
    const codec_learned *lb = (const codec_learned *)cb, *l0 = (const codec_learned *)c0;
    int bb[16] = {0}, b0[16] = {0};
    for (int ci = 0; ci < 2 * L && ci < 16; ci++) bb[ci] = lb->coders[ci].bits_sum, b0[ci] = l0->coders[ci].bits_sum;
    print_message("# layer 2 K+V bits per row: %d plain, %d with sensitivity x16\n", b0[4] + b0[5], bb[4] + bb[5]);
    assert_true(bb[4] + bb[5] > b0[4] + b0[5]);
    assert_true(bb[4] >= b0[4] && bb[5] >= b0[5]);
    assert_true(rep.bits_per_value <= 2.0 + 1e-9 && fabs(rep.bits_per_value - f->rep[1].bits_per_value) < 0.02);
    codec_free(cb), codec_free(c0);
    unlink(p);
    free(scale);
}

/* --ratio is end to end: a parked CTX-token cache, every stored byte counted
 * (lossless sink and window rows through "none", headers, scales, codes), is
 * R times smaller than fp16 -- checked by really encoding such a cache span
 * by span, not by the formula calibration used. A ratio the layout's
 * lossless rows forbid is refused with what is reachable. */
static void test_ratio_end_to_end(void **state) {
    NEED_FX(f);
    const double want = 6.0;
    calib_opts o = calib_default_opts();
    o.ratio = want, o.sink = 0, o.window = 8, o.sens = 0, o.refine = 0;
    char p[600];
    snprintf(p, sizeof p, "%s/ratio.gguf", f->dir);
    calib_report rep;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), 0);
    assert_int_equal(rep.n_ctx, CTX);
    codec *c = open_ok(p, &f->shape), *none = open_ok("none", &f->shape);
    /* park a CTX-row F16 cache of random rows under the codec file's layout */
    int chunk, sink, window;
    assert_int_equal(codec_layout(c, &chunk, &sink, &window), 0);
    assert_true(sink == 0 && window == 8);
    const layout lay = {.sink = sink, .window = window, .chunk = chunk};
    layout_span sp[64];
    int n_sp = layout_spans(&lay, CTX, sp, 64);
    assert_true(n_sp > 0 && n_sp <= 64);
    const size_t rv = (size_t)f->shape.n_kv_heads * f->shape.head_dim;
    uint16_t *rows = malloc((size_t)chunk * rv * sizeof *rows);
    uint8_t *out = malloc(codec_max_bytes(c, chunk) + codec_max_bytes(none, chunk));
    uint64_t x = 88172645463325252ull;
    double stored = 0;
    for (int l = 0; l < f->shape.n_layer; l++)
        for (int kv = 0; kv < 2; kv++)
            for (int i = 0; i < n_sp; i++) {
                for (size_t j = 0; j < (size_t)sp[i].n * rv; j++) {
                    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
                    rows[j] = kp_f32_to_fp16((float)((double)(x >> 11) / 9007199254740992.0 - 0.5));
                }
                codec_chunk ch = {.layer = l, .is_v = kv, .pos0 = sp[i].start, .n = sp[i].n,
                                  .kv_type = KP_TYPE_F16};
                const codec *by = sp[i].coded ? c : none;
                size_t len = 0;
                assert_int_equal(codec_encode(by, &ch, rows, out, codec_max_bytes(by, chunk), &len, &err), 0);
                stored += (double)len;
            }
    const double fp16 = 2.0 * CTX * (double)rv * 2.0 * f->shape.n_layer, got = fp16 / stored;
    print_message("# --ratio %.1f: parked %d tokens end to end %.3fx (reported %.3fx), %.3f coded bits/value\n",
                  want, CTX, got, rep.ratio_e2e, rep.bits_per_value);
    assert_true(fabs(got - rep.ratio_e2e) < 1e-9 * got);
    assert_true(fabs(got / want - 1) < 0.03);
    free(rows), free(out);
    codec_free(c), codec_free(none);
    unlink(p);
    /* the default layout keeps 68 of 256 rows lossless: at most ~3.7x */
    o = calib_default_opts();
    o.ratio = 8, o.sens = 0, o.refine = 0;
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), KP_ERANGE);
    assert_non_null(strstr(err.msg, "cannot be reached with sink 4 and window 64"));
    assert_false(tu_file_exists(p));
}

/* A window as long as the context: no query meets a row coded, so there
 * are no attention weights; the fit falls back to unweighted rows. */
static void test_window_covers_context(void **state) {
    NEED_FX(f);
    calib_opts o = calib_default_opts();
    o.window = 4 * CTX, o.sens = 0, o.refine = 0, o.bits = 2;
    char p[600];
    snprintf(p, sizeof p, "%s/wide.gguf", f->dir);
    calib_report rep;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), 0);
    assert_true(rep.bits_per_value <= 2.0 + 1e-9 && rep.bits_per_value > 1.8);
    assert_true(isfinite(rep.rel_err_k) && rep.rel_err_k < 0.1);
    codec_free(open_ok(p, &f->shape));
    unlink(p);
}

/* --max-dppl: the search writes a codec that meets its bound on the
 * held-out slice (measured again here), smaller than 8 bits/value, and the
 * report's numbers are that codec's; a slightly smaller budget (the step
 * below the search's resolution) misses the bound there. */
static void test_max_dppl(void **state) {
    NEED_FX(f);
    calib_opts o = calib_default_opts();
    o.max_dppl = 1.0;
    o.sens = 0, o.refine = 0; /* the search alone (each step one held-out run): keeps the test short */
    char p[600];
    snprintf(p, sizeof p, "%s/maxdppl.gguf", f->dir);
    calib_report rep;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), 0);
    quality_result q = heldout_quality(f, p, &rep);
    const double dp = 100.0 * (q.ppl - q.ppl_ref) / q.ppl_ref;
    print_message("# max-dppl 1%%: %d steps, chose %.4f bits/value (coded %.4f): held-out ratio %.3f "
                  "Δppl %+.4f%% (reported %+.4f%%)\n", rep.search_steps, rep.target_bits, rep.bits_per_value,
                  q.ratio, dp, rep.heldout_dppl);
    assert_true(dp <= 1.0);
    assert_true(fabs(dp - rep.heldout_dppl) < 1e-9 && fabs(q.ratio - rep.heldout_ratio) < 1e-9);
    assert_true(rep.search_steps >= 4);
    assert_true(rep.target_bits < CODECFILE_MAX_BITS && rep.bits_per_value <= rep.target_bits + 1e-9);
    unlink(p);
    calib_opts o2 = o;
    o2.max_dppl = 0, o2.bits = rep.target_bits / 1.1;
    calib_report r2;
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o2, p, &r2, &err), 0);
    print_message("# %.4f bits/value: held-out Δppl %+.4f%%\n", o2.bits, r2.heldout_dppl);
    assert_true(r2.heldout_dppl > 1.0);
    unlink(p);
    /* a bound no codec can meet is an error, not a silent best effort */
    o.max_dppl = 1e-9;
    o.window = 0, o.sink = 0;
    int rc = calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err);
    if (rc == 0) { /* 8 bits/value might really be lossless enough: then it must say so */
        assert_true(rep.heldout_dppl <= 1e-9);
        unlink(p);
    } else {
        assert_int_equal(rc, KP_ERANGE);
        assert_non_null(strstr(err.msg, "held-out"));
    }
}

/* --max-kl: the search's bound is the held-out KL (measured again here);
 * progress is reported for every long step; a set cancel flag stops the
 * run with KP_ECANCELED and writes nothing. */
typedef struct prog_log {
    int calls, search_steps, collect;
    atomic_int *cancel_at_collect; /* set the flag on the first collect call */
} prog_log;

static void on_prog(void *ud, const char *what, int64_t done, int64_t total, double eta) {
    prog_log *pl = ud;
    (void)eta;
    assert_true(done >= 0 && done <= total);
    pl->calls++;
    if (strstr(what, "search")) pl->search_steps++;
    if (strstr(what, "collecting")) {
        pl->collect++;
        if (pl->cancel_at_collect) atomic_store(pl->cancel_at_collect, 1);
    }
}

static void test_max_kl_cancel_progress(void **state) {
    NEED_FX(f);
    calib_opts o = calib_default_opts();
    o.max_kl = 0.01;
    o.sens = 0, o.refine = 0; /* the search alone: keeps the test short */
    prog_log pl = {0};
    o.on_progress = on_prog, o.progress_ud = &pl;
    char p[600];
    snprintf(p, sizeof p, "%s/maxkl.gguf", f->dir);
    calib_report rep;
    kp_err err = {0};
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o, p, &rep, &err), 0);
    quality_result q = heldout_quality(f, p, &rep);
    print_message("# max-kl 0.01: %d steps, chose %.4f bits/value: held-out KL %.4g (reported %.4g), ratio %.3f\n",
                  rep.search_steps, rep.target_bits, q.kl, rep.heldout_kl, q.ratio);
    assert_true(q.kl <= 0.01);
    assert_true(fabs(q.kl - rep.heldout_kl) < 1e-12);
    assert_true(rep.search_steps >= 4 && rep.target_bits < CODECFILE_MAX_BITS);
    assert_int_equal(pl.search_steps, rep.search_steps);
    assert_true(pl.collect >= 1 && pl.calls > pl.search_steps);
    unlink(p);
    /* one bound at a time */
    calib_opts o3 = o;
    o3.max_dppl = 1;
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o3, p, &rep, &err), KP_EINVAL);
    /* canceled during the statistics: no file */
    atomic_int cancel = 0;
    prog_log pc = {.cancel_at_collect = &cancel};
    calib_opts o2 = calib_default_opts();
    o2.on_progress = on_prog, o2.progress_ud = &pc, o2.cancel = &cancel;
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o2, p, &rep, &err), KP_ECANCELED);
    assert_int_equal(access(p, F_OK), -1);
    /* canceled before it starts */
    assert_int_equal(calib_run(f->m, f->cal, f->n_cal, &o2, p, &rep, &err), KP_ECANCELED);
    assert_int_equal(access(p, F_OK), -1);
}

int main(int argc, char **argv) {
    tu_apply_filter_args(argc, argv);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_jacobi_known),
        cmocka_unit_test(test_unpack_reference),
        cmocka_unit_test(test_quality),
        cmocka_unit_test(test_chunks),
        cmocka_unit_test(test_file_damage),
        cmocka_unit_test(test_calib_deterministic),
        cmocka_unit_test(test_allocate_sensitive),
        cmocka_unit_test(test_refine_never_worse),
        cmocka_unit_test(test_sensitive_layer),
        cmocka_unit_test(test_max_dppl),
        cmocka_unit_test(test_max_kl_cancel_progress),
        cmocka_unit_test(test_window_covers_context),
        cmocka_unit_test(test_ratio_end_to_end),
    };
    return cmocka_run_group_tests(tests, fx_setup, fx_teardown);
}
