/*
 * store_legacy.c — the import of legacy v1 session blobs (DIR/ID.kvps, the
 * format of storage/blob.h) into the session store, once, at store_open.
 *
 * Why apart from store.c: it is the one path that still reads the old
 * whole-KV blob, converts its element type and re-saves it through the
 * current park/cas format; nothing else in the store knows about v1.
 * A blob that is damaged is quarantined, one from another model is left in
 * place (counted as foreign), one imported before a crash is removed, and a
 * good one becomes a durable session whose blob is then unlinked.
 *
 * The KVs here are host memory of the store's own CPU backend (never the
 * model's device), so the type conversion is a host kv_copy_rows on the
 * opening thread and needs no scheduler.
 */
#include "storage/store_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "kernels/kernels.h"
#include "storage/blob.h"
#include "storage/fsutil.h"

/* Import DIR/ID.kvps (a v1 blob) as a durable session, then remove it. */
static void import_one(store *s, const char *id, const char *path, kp_backend **be, open_ctx *oc) {
    blob_meta bm;
    int32_t *tokens = NULL;
    void *extra = NULL;
    size_t extra_len = 0;
    kp_err e2 = {0};
    kv_cache *kv = NULL, *kv2 = NULL;
    int rc = blob_read_meta(path, &bm, &tokens, &extra, &extra_len, &e2);
    if (rc == KP_EFORMAT || rc == KP_EUNSUP) {
        char name[STORE_ID_MAX + 16];
        snprintf(name, sizeof name, "%s%s", id, STORE_LEGACY_EXT);
        if (store_quarantine_file(s, path, name) == 0) {
            s->st.quarantined++;
            store_logf(s, "store: legacy blob '%s' moved to %s: %s", path, s->q_dir, e2.msg);
        }
        return;
    }
    if (rc) {
        store_logf(s, "store: legacy blob '%s' not imported: %s", path, e2.msg);
        return;
    }
    const codec_shape *sh = &s->o.shape;
    if (bm.model_fingerprint != sh->model_fingerprint || bm.n_layer != sh->n_layer ||
        bm.n_kv_heads != sh->n_kv_heads || bm.head_dim != sh->head_dim) {
        s->st.foreign++;
        oc->foreign_model++;
        goto out;
    }
    if (bm.n_tokens < 1 || extra_len > STORE_EXTRA_MAX) {
        s->st.foreign++;
        store_logf(s, "store: legacy blob '%s' cannot be imported (%d tokens, %zu extra bytes; a "
                   "session needs >= 1 token and <= %u extra bytes); left in place", path,
                   bm.n_tokens, extra_len, STORE_EXTRA_MAX);
        goto out;
    }
    if (store_find(s, id)) {
        /* imported before, and the crash came before the unlink */
        if (unlink(path) == 0) fs_fsync_dir(s->dir);
        store_logf(s, "store: legacy blob '%s' was already imported; removed", path);
        goto out;
    }
    if (!*be && (rc = kp_backend_new(be, "cpu", 1, &e2))) goto fail;
    if ((rc = kv_new(&kv, *be, bm.kv_type, bm.n_layer, bm.n_tokens, bm.n_kv_heads, bm.head_dim,
                     &e2)))
        goto fail;
    rc = blob_read_kv(path, sh->model_fingerprint, kv, &e2);
    if (rc == KP_EFORMAT) {
        char name[STORE_ID_MAX + 16];
        snprintf(name, sizeof name, "%s%s", id, STORE_LEGACY_EXT);
        if (store_quarantine_file(s, path, name) == 0) {
            s->st.quarantined++;
            store_logf(s, "store: legacy blob '%s' moved to %s: %s", path, s->q_dir, e2.msg);
        }
        goto out;
    }
    if (rc) goto fail;
    const kv_cache *src = kv;
    if (bm.kv_type != s->o.kv_type) {
        if ((rc = kv_new(&kv2, *be, s->o.kv_type, bm.n_layer, bm.n_tokens, bm.n_kv_heads,
                         bm.head_dim, &e2)))
            goto fail;
        /* both caches are host memory of the store's own CPU backend (never
         * the model's device): a host copy on this thread, no scheduler */
        if ((rc = kv_copy_rows(kv2, kv, 0, kv->n_pos, &e2))) goto fail;
        kv2->n_pos = kv->n_pos;
        src = kv2;
    }
    store_item it = {.tokens = tokens, .n_tokens = bm.n_tokens, .extra = extra,
                     .extra_len = extra_len, .kv = src};
    if ((rc = store_save_impl(s, id, &it, true, NULL, &e2))) goto fail;
    s->st.saves--; /* an import, not a save */
    s->st.imported++;
    if (unlink(path) == 0) fs_fsync_dir(s->dir);
    else store_logf(s, "store: legacy blob '%s' imported but could not be removed: %s", path,
                    strerror(errno));
    store_logf(s, "store: imported legacy session '%s' (%d tokens) from '%s'", id, bm.n_tokens,
               path);
    goto out;
fail:
    store_logf(s, "store: legacy blob '%s' not imported (left in place): %s", path, e2.msg);
out:
    kv_free(kv);
    kv_free(kv2);
    free(tokens);
    free(extra);
}

void store_import_legacy(store *s, open_ctx *oc) {
    DIR *dh = opendir(s->dir);
    if (!dh) return;
    /* names first: importing writes into DIR while we read it */
    char (*ids)[STORE_ID_MAX + 1] = NULL;
    size_t n = 0, cap = 0;
    struct dirent *de;
    while ((de = readdir(dh)) != NULL) {
        char id[STORE_ID_MAX + 1];
        struct stat sb;
        if (fstatat(dirfd(dh), de->d_name, &sb, AT_SYMLINK_NOFOLLOW) || !S_ISREG(sb.st_mode))
            continue;
        if (fs_has_suffix(de->d_name, STORE_LEGACY_EXT STORE_TMP_EXT)) {
            if (unlinkat(dirfd(dh), de->d_name, 0) == 0) s->st.tmp_removed++;
            continue;
        }
        if (!store_id_of(de->d_name, STORE_LEGACY_EXT, id)) continue;
        if (n == cap) {
            size_t nc = cap ? 2 * cap : 16;
            void *p = realloc(ids, nc * sizeof *ids);
            if (!p) break;
            ids = p;
            cap = nc;
        }
        memcpy(ids[n++], id, sizeof id);
    }
    closedir(dh);
    kp_backend *be = NULL;
    for (size_t i = 0; i < n; i++) {
        char path[STORE_PATH_MAX];
        snprintf(path, sizeof path, "%s/%s%s", s->dir, ids[i], STORE_LEGACY_EXT);
        import_one(s, ids[i], path, &be, oc);
    }
    if (be) kp_backend_free(be);
    free(ids);
}
