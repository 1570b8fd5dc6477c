/*
 * store_remote.c — the session store's side of the remote tier (Redis,
 * storage/remote.h): what goes up, what comes down, and when.
 *
 * Why a file of its own: store.c is the local store (index, records,
 * budgets); this is the small policy that lays the shared tier below it,
 * written against the internals in store_impl.h.
 *
 *   up      store_remote_push: a version's record (the very bytes of the local
 *           record file) and its span objects, queued on the remote writer
 *           (remote_enqueue_save: objects first, record last, retried while
 *           Redis is down; never blocks the caller). Called by a save under
 *           the write-through policy, and by the cold-budget evictor under
 *           write-back (the session leaves this replica for Redis).
 *   down    store_remote_adopt: an id the index lacks is looked up in Redis;
 *           its record is checked (envelope by remote.c, then the record
 *           format, model, KV type and codec here) and indexed as a
 *           remote-only entry: tier "remote", no objects local, no references.
 *           store_remote_fetch: the first restore of such an entry brings its
 *           objects into the chunk store (warm, referenced) and the entry
 *           becomes an ordinary local (warm, not yet durable) session.
 *
 * State of an entry with respect to the remote tier:
 *   (absent)       --adopt: record read-->          remote-only
 *   remote-only    --fetch: objects read-->         local (warm)
 *   remote-only    --fetch: object missing/bad-->   tokens only (store.h "KV lost":
 *                                                    the record is kept, KP_ELOST,
 *                                                    the server recomputes the KV)
 *   remote-only    --save-->                        local (the save replaces it)
 *   local          --delete-->                      (absent; delete queued for Redis)
 * Redis unreachable: adopt and fetch fail with KP_EUNAVAIL and change nothing
 * (the server answers 503 + Retry-After); local sessions never wait on it.
 *
 * Content keys are the chunk store's (cas.h), so a prefix shared by many
 * sessions (a system prompt) is one object in Redis too, uploaded once
 * (the writer skips objects Redis already has). Keys carry the owner scope
 * (park_save_scoped), so tenants share nothing there either.
 */
#include "storage/fsutil.h"
#include "storage/store.h"
#include "storage/store_impl.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <sodium.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xxhash.h>

uint64_t store_remote_codec_hash(const store_opts *o) {
    const char *name = o && o->codec && o->codec[0] ? o->codec : "none";
    char ident[96];
    if (store_codec_builtin(name)) {
        snprintf(ident, sizeof ident, "builtin:%s:kv%d", name, o ? o->kv_type : 0);
    } else {
        uint64_t h = park_codec_hash(name);
        if (!h) return 0;
        snprintf(ident, sizeof ident, "file:%016llx:kv%d", (unsigned long long)h, o->kv_type);
    }
    uint64_t h = XXH64(ident, strlen(ident), 0x6b767072);
    return h ? h : 1;
}

void store_remote_push(store *s, const char *id, const park_manifest *m, const uint8_t *extra,
                       size_t extra_len, int64_t mtime, bool with_objects) {
    if (!s->o.remote) return;
    kp_err err = {0};
    uint8_t *rec = NULL;
    size_t rec_len = 0;
    if (store_rec_build(m, extra, extra_len, mtime, &rec, &rec_len, &err)) {
        store_logf(s, "store: session '%s' not sent to the remote tier: %s", id, err.msg);
        return;
    }
    int n = with_objects ? m->n_spans : 0;
    remote_obj *objs = calloc((size_t)(n ? n : 1), sizeof *objs);
    int got = 0, rc = objs ? 0 : KP_ENOMEM;
    for (int i = 0; i < n && !rc; i++) {
        void *d = NULL;
        size_t len = 0;
        if (remote_known(s->o.remote, m->spans[i].key)) { /* there already: by key, no copy (a prefix of the last save) */
            objs[got++] = (remote_obj){.key = m->spans[i].key, .data = NULL, .len = m->spans[i].bytes};
            continue;
        }
        rc = cas_get(s->cas, m->spans[i].key, &d, &len, &err);
        if (rc) break;
        objs[got++] = (remote_obj){.key = m->spans[i].key, .data = d, .len = len};
    }
    if (rc)
        store_logf(s, "store: session '%s' not sent to the remote tier (reading its objects): %s", id,
                   rc == KP_ENOMEM && !err.msg[0] ? "out of memory" : err.msg);
    else /* the job takes copies; a refused one (queue full) is logged and counted by remote.c */
        remote_enqueue_save(s->o.remote, id, objs, got, rec, rec_len);
    for (int i = 0; i < got; i++) free((void *)objs[i].data);
    free(objs);
    free(rec);
}

int store_remote_adopt(store *s, const char *id, kp_err *err) {
    if (!s->o.remote) return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    void *b = NULL;
    size_t len = 0;
    kp_err e2 = {0};
    int rc = remote_get_record(s->o.remote, id, &b, &len, NULL, &e2);
    if (rc == KP_ENOTFOUND) return kp_errf(err, KP_ENOTFOUND, "store: no session '%s'", id);
    if (rc == KP_EBUSY)
        return kp_errf(err, KP_EUNAVAIL, "store: session '%s' is not on this replica and the remote tier "
                       "cannot be asked now: %s", id, e2.msg);
    if (rc) return kp_errf(err, rc == KP_ENOMEM ? KP_ENOMEM : KP_EFORMAT, "store: session '%s' in the remote tier: %s",
                           id, e2.msg);
    park_manifest m;
    uint8_t *extra = NULL;
    size_t extra_len = 0;
    int64_t mtime = 0;
    rc = store_rec_parse(b, len, &m, &extra, &extra_len, &mtime, &e2);
    free(b);
    if (rc) {
        store_logf(s, "store: session '%s' in the remote tier has a bad record, ignored: %s", id, e2.msg);
        return kp_errf(err, rc == KP_ENOMEM ? KP_ENOMEM : KP_EFORMAT,
                       "store: session '%s' in the remote tier has a bad record: %s", id, e2.msg);
    }
    pthread_mutex_lock(&s->mu);
    const codec *cc = NULL;
    static const char *const whys[] = {NULL, "another model", "another KV type", "a codec this server was not given"};
    const char *why = whys[store_foreign(s, &m, &cc)];
    store_sess *e = why ? NULL : store_sess_acquire(s, id, true);
    if (!why && !e) {
        pthread_mutex_unlock(&s->mu);
        park_manifest_free(&m);
        free(extra);
        return kp_errf(err, KP_ENOMEM, "store: out of memory adding session '%s'", id);
    }
    if (e && e->has_data) { /* a save or another adopt got there first: theirs stands */
        store_sess_release(s, e);
        pthread_mutex_unlock(&s->mu);
        park_manifest_free(&m);
        free(extra);
        return 0;
    }
    if (e) {
        uint64_t bytes = 0;
        for (int i = 0; i < m.n_spans; i++) bytes += m.spans[i].bytes;
        e->has_data = true;
        e->remote_only = true;
        e->man = m;
        e->cc = cc;
        e->extra = extra;
        e->extra_len = extra_len;
        e->durable = false;
        e->obj_bytes = bytes;
        e->rec_bytes = len;
        e->mtime_ms = mtime;
        e->lru = ++s->tick;
        store_sess_release(s, e);
    }
    pthread_mutex_unlock(&s->mu);
    if (why) {
        park_manifest_free(&m);
        free(extra);
        return kp_errf(err, KP_EFORMAT, "store: session '%s' in the remote tier was made with %s", id, why);
    }
    return 0;
}

int store_remote_fetch(store *s, store_sess *e, kp_err *err) {
    const park_manifest *m = &e->man;
    int rc = 0, done = 0;
    kp_err e2 = {0};
    for (; done < m->n_spans; done++) {
        cas_key k = m->spans[done].key;
        if (cas_ref(s->cas, k) == 0) continue; /* a local session shares it */
        void *d = NULL;
        size_t len = 0;
        rc = remote_get_object(s->o.remote, k, &d, &len, &e2);
        if (!rc && len != m->spans[done].bytes)
            rc = kp_errf(&e2, KP_EFORMAT, "an object of %zu bytes where its manifest says %u", len,
                         (unsigned)m->spans[done].bytes);
        if (!rc) rc = cas_put_ref(s->cas, k, d, len, false, &e2);
        free(d);
        if (rc) break;
    }
    if (rc == KP_EBUSY) rc = KP_EUNAVAIL; /* Redis unreachable */
    if (rc) {
        for (int i = 0; i < done; i++) cas_unref(s->cas, m->spans[i].key);
        cas_collect(s->cas);
        const layout_span *sp = &m->spans[done].span;
        return kp_errf(err, rc, "store: session '%s': span %d (tokens %d..%d) from the remote tier: %s", e->id, done,
                       sp->start, sp->start + sp->n - 1, e2.msg);
    }
    pthread_mutex_lock(&s->mu);
    e->remote_only = false;
    pthread_mutex_unlock(&s->mu);
    return 0;
}

/* 1 if DIR/sessions holds a session record (or DIR a legacy blob). */
static int dir_has_sessions(const char *dir) {
    char path[STORE_PATH_MAX];
    snprintf(path, sizeof path, "%s/sessions", dir);
    const char *dirs[2] = {path, dir};
    const char *exts[2] = {STORE_REC_EXT, STORE_LEGACY_EXT};
    for (int k = 0; k < 2; k++) {
        DIR *dh = opendir(dirs[k]);
        if (!dh) continue;
        struct dirent *de;
        int found = 0;
        while (!found && (de = readdir(dh)) != NULL) found = fs_has_suffix(de->d_name, exts[k]);
        closedir(dh);
        if (found) return 1;
    }
    return 0;
}

int store_secret_share(const char *dir, remote *r, kp_err *err) {
    uint8_t mine[STORE_SECRET_BYTES], theirs[STORE_SECRET_BYTES];
    int rc = store_secret(dir, mine, err);
    if (rc) return rc;
    kp_err e2 = {0};
    rc = remote_share_secret(r, mine, sizeof mine, theirs, &e2);
    if (rc) {
        sodium_memzero(mine, sizeof mine);
        return kp_errf(err, rc, "the replicas agree on their owner secret through the remote tier at start, and it "
                       "cannot be read: %s", e2.msg);
    }
    int same = sodium_memcmp(mine, theirs, sizeof mine) == 0;
    sodium_memzero(mine, sizeof mine);
    if (same) {
        sodium_memzero(theirs, sizeof theirs);
        return 0;
    }
    if (dir_has_sessions(dir)) {
        sodium_memzero(theirs, sizeof theirs);
        return kp_errf(err, KP_EMISMATCH,
                       "the cold dir '%s' holds sessions whose owners are keyed with its own secret (%s/%s), "
                       "not the deployment's in Redis (key %s): start this replica on an empty --cold-dir, "
                       "or, if this Redis is new and this replica's sessions are the ones to keep, delete "
                       "that key in Redis so this replica's secret is shared",
                       dir, dir, STORE_SECRET_FILE, REMOTE_SECRET_KEY);
    }
    /* nothing keyed with ours yet: take the deployment's (tmp + fsync + rename) */
    char path[STORE_PATH_MAX], tmp[STORE_PATH_MAX];
    snprintf(path, sizeof path, "%s/%s", dir, STORE_SECRET_FILE);
    snprintf(tmp, sizeof tmp, "%s/%s.%ld%s", dir, STORE_SECRET_FILE, (long)getpid(), STORE_TMP_EXT);
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
    int e = 0;
    if (fd < 0 || fs_write_all(fd, theirs, sizeof theirs) || fsync(fd)) e = errno;
    if (fd >= 0) close(fd);
    sodium_memzero(theirs, sizeof theirs);
    if (!e && rename(tmp, path)) e = errno;
    if (e) {
        unlink(tmp);
        return kp_errf(err, fs_write_errcode(e), "store: cannot write the deployment's owner secret to '%s': %s", path,
                       strerror(e));
    }
    fs_fsync_dir(dir);
    return 0;
}
