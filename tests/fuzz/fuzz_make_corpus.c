/*
 * fuzz_make_corpus.c — writes the seed corpora of the fuzz targets,
 * tests/fuzz/corpus/TARGET/NAME, from kvpark's own writers: GGUF files from
 * gguf_writer_write_mem, chunks from codec_encode, codec files from
 * codecfile_write, manifests and span objects from park_save, object files
 * from cas_put, session records from store_save, legacy blobs from
 * blob_write, and a few request bodies.
 * Each seed carries its target's selector bytes (fuzz_util.h). The output
 * is deterministic (but for the save time in session records), so
 * regenerating shows up in git only when a writer's format changed.
 *
 * Usage (from the repository root, after building with -Dfuzz=true):
 *   build-fuzz/tests/fuzz/fuzz_make_corpus tests/fuzz/corpus
 */
#include <dirent.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "engine/gguf.h"
#include "storage/blob.h"
#include "storage/store.h"
#include "tests/fuzz/fuzz_park_fixture.h"

static const char *g_out;

static void die(const char *what, const char *msg) {
    fprintf(stderr, "fuzz_make_corpus: %s: %s\n", what, msg);
    exit(1);
}

/* Write pre[0..npre) + b[0..n) as OUT/target/name. */
static void seed(const char *target, const char *name, const uint8_t *pre, size_t npre,
                 const void *b, size_t n) {
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", g_out, target);
    if (mkdir(path, 0755) && errno != EEXIST) die(path, strerror(errno));
    snprintf(path, sizeof path, "%s/%s/%s", g_out, target, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(pre, 1, npre, f) != npre || (n && fwrite(b, 1, n, f) != n) || fclose(f))
        die(path, strerror(errno));
}

static uint8_t *slurp(const char *path, size_t *n) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path, strerror(errno));
    uint8_t *b = malloc(1 << 20);
    if (!b) die(path, "out of memory");
    *n = fread(b, 1, 1 << 20, f);
    fclose(f);
    return b;
}

static void gguf_seeds(void) {
    kp_err err = {0};
    for (int v = 0; v < 2; v++) {
        gguf_writer *w = gguf_writer_new();
        gguf_set_str(w, "general.architecture", "llama");
        gguf_set_u32(w, "llama.block_count", 2);
        if (v) {
            gguf_set_i32(w, "a.i32", -5);
            gguf_set_u64(w, "a.u64", 1ull << 40);
            gguf_set_f32(w, "a.f32", 0.5f);
            gguf_set_bool(w, "a.bool", true);
            const int32_t ints[3] = {1, -2, 3};
            gguf_set_arr(w, "a.ints", GGUF_VT_INT32, ints, 3);
            const char *strs[3] = {"<s>", "</s>", "a"};
            gguf_set_arr_str(w, "tokenizer.ggml.tokens", strs, 3);
            float t[8] = {1, 2, 3, 4, 5, 6, 7, 8};
            const int64_t ne2[2] = {4, 2}, ne1[1] = {8};
            if (gguf_add_tensor(w, "w.f32", KP_TYPE_F32, 2, ne2, t, false, &err)) die("gguf", err.msg);
            uint16_t h[8] = {0x3c00, 0x4000, 0, 0x8000, 0x7c00, 0x3555, 1, 2};
            if (gguf_add_tensor(w, "w.f16", KP_TYPE_F16, 1, ne1, h, false, &err)) die("gguf", err.msg);
        }
        uint8_t *b = NULL;
        size_t n = 0;
        if (gguf_writer_write_mem(w, &b, &n, &err)) die("gguf", err.msg);
        seed("gguf", v ? "tensors.gguf" : "keys.gguf", NULL, 0, b, n);
        free(b);
        gguf_writer_free(w);
    }
}

static void codec_seeds(void) {
    const int d = FZ_NKV * FZ_HD;
    static const int rows[3] = {1, 5, 16};
    uint64_t st = 42;
    float x[16 * FZ_NKV * FZ_HD];
    for (int i = 0; i < 16 * d; i++) x[i] = 1.5f * fz_rand(&st);
    uint8_t *buf = malloc(1 << 16);
    for (int ci = 0; ci < FZ_N_CODECS; ci++)
        for (int v = 0; v < 2; v++) {
            const int ti = (ci + v) % 3, n = rows[(ci + v) % 3], layer = v;
            /* the rows in the cache's type: F32 as is; F16 / BF16 through the backend */
            uint8_t src[16 * FZ_NKV * FZ_HD * 4];
            const fz_park *P = fz_park_fixture();
            kp_backend_ops(P->be)->kv_store(P->be, src, fz_kv_type(ti), x, n, d);
            codec_chunk ch = {.layer = layer, .is_v = v, .pos0 = 7, .n = n, .kv_type = fz_kv_type(ti)};
            size_t len = 0;
            kp_err err = {0};
            if (codec_encode(fz_codec(ci), &ch, src, buf, 1 << 16, &len, &err)) die("codec_encode", err.msg);
            uint8_t pre[6] = {FZ_FIX, (uint8_t)ci, (uint8_t)(ti | v << 2 | layer << 3), (uint8_t)(n - 1), 7, 0};
            char name[64];
            snprintf(name, sizeof name, "%s-%s-%d", fz_codec_names[ci], v ? "v" : "k", n);
            seed("codec", name, pre, sizeof pre, buf, len);
        }
    free(buf);
}

static void codecfile_seeds(const char *tmp) {
    for (int ci = 5; ci < 7; ci++) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s.codec", tmp, fz_codec_names[ci]);
        kp_err err = {0};
        if (codecfile_write(fz_codec(ci), path, &err)) die("codecfile_write", err.msg);
        size_t n;
        uint8_t *b = slurp(path, &n);
        const uint8_t pre[1] = {FZ_FIX};
        seed("codecfile", fz_codec_names[ci], pre, 1, b, n);
        free(b);
        unlink(path);
    }
}

static void park_seeds(void) {
    const fz_park *P = fz_park_fixture();
    uint8_t *b = NULL;
    size_t n = 0;
    kp_err err = {0};
    if (park_manifest_write(&P->man, &b, &n, &err)) die("park_manifest_write", err.msg);
    const uint8_t pre[1] = {FZ_FIX};
    seed("park_manifest", "int8-48", pre, 1, b, n);
    free(b);
    park_manifest scoped = P->man; /* a scoped manifest is version 2 */
    scoped.scope = 0x5eed5eed5eedull;
    if (park_manifest_write(&scoped, &b, &n, &err)) die("park_manifest_write", err.msg);
    seed("park_manifest", "int8-48-scoped", pre, 1, b, n);
    free(b);
    for (int i = 0; i < P->man.n_spans; i++) {
        char name[32];
        snprintf(name, sizeof name, "span%d", i);
        const uint8_t p2[2] = {FZ_FIX, (uint8_t)i};
        seed("park_object", name, p2, 2, P->obj[i], P->obj_len[i]);
    }
}

static void cas_seeds(const char *tmp) {
    cas_opts o = cas_default_opts();
    char dir[512];
    snprintf(dir, sizeof dir, "%s/cas", tmp);
    o.dir = dir;
    cas *c = NULL;
    kp_err err = {0};
    if (cas_open(&c, &o, &err)) die("cas_open", err.msg);
    static const char *const payloads[2] = {"", "the bytes of one parked span"};
    for (int i = 0; i < 2; i++) {
        cas_key k = cas_key_of(payloads[i], strlen(payloads[i]) + 1);
        if (cas_put(c, k, payloads[i], strlen(payloads[i]), true, &err)) die("cas_put", err.msg);
        char hex[33], path[1024];
        cas_key_hex(k, hex);
        snprintf(path, sizeof path, "%s/objects/%.2s/%s.kvo", dir, hex, hex);
        size_t n;
        uint8_t *b = slurp(path, &n);
        const uint8_t pre[1] = {FZ_FIX | FZ_CAS_NAME};
        seed("cas_object", i ? "small" : "empty", pre, 1, b, n);
        free(b);
        unlink(path);
    }
    cas_close(c);
}

static void store_seeds(const char *tmp) {
    const fz_park *P = fz_park_fixture();
    store_opts o = store_default_opts();
    char dir[512];
    snprintf(dir, sizeof dir, "%s/store", tmp);
    o.dir = dir;
    o.shape = fz_shape();
    o.kv_type = KP_TYPE_F16;
    o.codec = FZ_PARK_CODEC;
    o.layout = (park_layout){.sink = FZ_PARK_SINK, .window = FZ_PARK_WINDOW, .chunk = FZ_PARK_CHUNK};
    store *s = NULL;
    kp_err err = {0};
    if (store_open(&s, &o, &err)) die("store_open", err.msg);
    static const char extra[] = "sampler state";
    for (int i = 0; i < 3; i++) { /* the third: scoped to an owner (a version 2 record) */
        const char *id = i == 2 ? "scoped" : i ? "with-extra" : "plain";
        store_item it = {.tokens = P->tokens, .n_tokens = i ? FZ_PARK_TOKENS : 3,
                         .extra = i ? extra : NULL, .extra_len = i ? sizeof extra : 0, .kv = P->src,
                         .scope = i == 2 ? 0x5eed5eed5eedull : 0};
        kv_cache *kv = P->src;
        kv->n_pos = it.n_tokens;
        if (store_save(s, id, &it, true, NULL, &err)) die("store_save", err.msg);
        kv->n_pos = FZ_PARK_TOKENS;
        char path[1024];
        snprintf(path, sizeof path, "%s/sessions/%s.kvpm", dir, id);
        size_t n;
        uint8_t *b = slurp(path, &n);
        const uint8_t pre[1] = {FZ_FIX};
        seed("store_record", id, pre, 1, b, n);
        free(b);
    }
    store_close(s);
}

static void blob_seeds(const char *tmp) {
    const fz_park *P = fz_park_fixture();
    static const char extra[] = "sampler";
    for (int i = 0; i < 2; i++) {
        char path[512];
        snprintf(path, sizeof path, "%s/s%d.kvps", tmp, i);
        kv_cache *kv = P->src;
        kv->n_pos = i ? FZ_PARK_TOKENS : 5;
        blob_meta m = {.model_fingerprint = FZ_FP, .codec = "none", .chunk_tokens = 16,
                       .n_tokens = kv->n_pos, .created_unix_ms = 1};
        kp_err err = {0};
        if (blob_write(path, &m, P->tokens, i ? extra : NULL, i ? sizeof extra : 0, kv, NULL, &err))
            die("blob_write", err.msg);
        kv->n_pos = FZ_PARK_TOKENS;
        size_t n;
        uint8_t *b = slurp(path, &n);
        const uint8_t pre[1] = {FZ_FIX};
        seed("blob", i ? "full" : "short", pre, 1, b, n);
        free(b);
        unlink(path);
    }
}

static void api_seeds(void) {
    static const char *const chat[] = {
        "{\"messages\":[{\"role\":\"user\",\"content\":\"Once upon a time\"}],\"max_tokens\":24,"
        "\"temperature\":0}",
        "{\"model\":\"m\",\"messages\":[{\"role\":\"system\",\"content\":\"Be brief.\"},{\"role\":"
        "\"user\",\"content\":[{\"type\":\"text\",\"text\":\"hi\"},{\"type\":\"text\",\"text\":"
        "\"there\"}]},{\"role\":\"assistant\",\"content\":null}],\"stream\":true,\"stream_options\":"
        "{\"include_usage\":true},\"stop\":[\"\\n\",\"END\"],\"seed\":-3,\"top_p\":0.5,\"top_k\":3,"
        "\"min_p\":0.1,\"presence_penalty\":-1.5,\"frequency_penalty\":2,\"logprobs\":true,"
        "\"top_logprobs\":2,\"session_id\":\"abc_DEF-1\",\"n\":1,\"user\":\"u\"}",
        "{\"messages\":[{\"role\":\"developer\",\"content\":\"caf\\u00e9 \\ud83d\\ude00\"}],"
        "\"max_completion_tokens\":5,\"stop\":\"x\",\"ignore_eos\":true,\"repeat_penalty\":1.1}",
    };
    static const char *const compl[] = {
        "{\"prompt\":\"Once upon a time\",\"max_tokens\":16,\"temperature\":0}",
        "{\"prompt\":[1,15043,3186],\"logprobs\":3,\"echo\":false,\"stream\":true}",
        "{\"prompt\":[\"one prompt\"],\"logprobs\":true,\"stop\":null,\"session_id\":\"s1\"}",
        "{\"prompt\":[[1,2,3]],\"max_tokens\":1,\"seed\":18446744073709551615}",
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(chat); i++) {
        char name[16];
        snprintf(name, sizeof name, "chat%zu.json", i);
        seed("api_chat", name, NULL, 0, chat[i], strlen(chat[i]));
    }
    for (size_t i = 0; i < KP_ARRAY_LEN(compl); i++) {
        char name[16];
        snprintf(name, sizeof name, "compl%zu.json", i);
        seed("api_completion", name, NULL, 0, compl[i], strlen(compl[i]));
    }
}

int main(int argc, char **argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: %s OUTDIR (tests/fuzz/corpus)\n", argv[0]);
        return 2;
    }
    g_out = argv[1];
    if (mkdir(g_out, 0755) && errno != EEXIST) die(g_out, strerror(errno));
    char tmp[] = "/tmp/kvpark-corpus-XXXXXX";
    if (!mkdtemp(tmp)) die("mkdtemp", strerror(errno));
    gguf_seeds();
    codec_seeds();
    codecfile_seeds(tmp);
    park_seeds();
    cas_seeds(tmp);
    store_seeds(tmp);
    blob_seeds(tmp);
    api_seeds();
    fz_rm_tree(tmp);
    printf("fuzz_make_corpus: seeds written under %s\n", g_out);
    return 0;
}
