/*
 * test_sched.c — continuous batching: jobs running together produce what each
 * produces alone (greedy), sessions reuse their prefix, cancel / stop /
 * length / queue-full behave as scheduler.h says; sched_run / sched_kv_copy
 * run on the scheduler thread (directly when already there); a prefix is
 * reused only by its owner (tenant isolation).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "engine/scheduler.h"
#include "tests/testutil.h"

typedef struct out_buf {
    int32_t ids[512];
    int n;
    int stop_after; /* callback asks to stop after this many tokens (0: never) */
    bool hold;      /* the callback blocks (holding the scheduler) while set */
    pthread_t tid;  /* the thread the callback ran on */
    sched *s;       /* set: the first callback tries sched_run from there */
    bool tried;
    int run_rc;
    pthread_t run_tid;
    bool on_thread; /* sched_on_thread() inside the callback */
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool done;
} out_buf;

typedef struct tid_rec {
    pthread_t tid;
    int calls;
} tid_rec;

static void rec_tid(void *ud) {
    tid_rec *r = ud;
    r->tid = pthread_self();
    r->calls++;
}

static int on_token(sched_job *j, int32_t id, const float *logits) {
    (void)logits;
    out_buf *o = j->ud;
    if (o->s && !o->tried) { /* on the scheduler thread: sched_run must not wait on itself */
        tid_rec r = {0};
        o->tried = true;
        o->on_thread = sched_on_thread(o->s);
        o->run_rc = sched_run(o->s, rec_tid, &r);
        o->run_tid = r.tid;
    }
    pthread_mutex_lock(&o->mu);
    o->tid = pthread_self();
    if (o->n < (int)KP_ARRAY_LEN(o->ids)) o->ids[o->n] = id;
    o->n++;
    pthread_cond_broadcast(&o->cv);
    while (o->hold) pthread_cond_wait(&o->cv, &o->mu);
    pthread_mutex_unlock(&o->mu);
    return o->stop_after && o->n >= o->stop_after;
}

/* Wait until the job has produced at least one token (it is running). */
static void wait_first_token(out_buf *o) {
    pthread_mutex_lock(&o->mu);
    while (o->n == 0 && !o->done) pthread_cond_wait(&o->cv, &o->mu);
    pthread_mutex_unlock(&o->mu);
}

static void release(out_buf *o) {
    pthread_mutex_lock(&o->mu);
    o->hold = false;
    pthread_cond_broadcast(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

static void on_done(sched_job *j) {
    out_buf *o = j->ud;
    pthread_mutex_lock(&o->mu);
    o->done = true;
    pthread_cond_signal(&o->cv);
    pthread_mutex_unlock(&o->mu);
}

static void wait_done(out_buf *o) {
    pthread_mutex_lock(&o->mu);
    while (!o->done) pthread_cond_wait(&o->cv, &o->mu);
    pthread_mutex_unlock(&o->mu);
}

static void init_job(sched_job *j, out_buf *o, const int32_t *prompt, int n, int max_tokens) {
    memset(j, 0, sizeof *j);
    memset(o, 0, sizeof *o);
    pthread_mutex_init(&o->mu, NULL);
    pthread_cond_init(&o->cv, NULL);
    j->prompt = prompt;
    j->n_prompt = n;
    j->max_tokens = max_tokens;
    j->ignore_eos = true;
    j->sampling = sample_default_params();
    j->sampling.temperature = 0;
    j->on_token = on_token;
    j->on_done = on_done;
    j->ud = o;
    atomic_init(&j->cancel, false);
}

static model *load_stories(void) {
    char *p = tu_shared_path("models/stories260K.gguf");
    model *m = NULL;
    kp_err err = {0};
    if (model_load(&m, p, NULL, &err)) fail_msg("%s", err.msg);
    free(p);
    return m;
}

/* One job reproduces llama.cpp's greedy continuation. */
static void test_single_matches_golden(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    json_t *g = tu_load_json("golden/stories260K/logits.json");
    sched *s = NULL;
    kp_err err = {0};
    assert_int_equal(sched_new(&s, m, NULL, &err), 0);
    for (size_t ci = 0; ci < json_array_size(json_object_get(g, "cases")); ci++) {
        json_t *c = json_array_get(json_object_get(g, "cases"), ci);
        json_t *ids = json_object_get(c, "ids"), *gen = json_object_get(json_object_get(c, "greedy"), "ids");
        int32_t prompt[64];
        int n = (int)json_array_size(ids);
        for (int i = 0; i < n; i++) prompt[i] = (int32_t)json_integer_value(json_array_get(ids, i));
        sched_job j;
        out_buf o;
        init_job(&j, &o, prompt, n, 64);
        assert_int_equal(sched_submit(s, &j, &err), 0);
        wait_done(&o);
        assert_int_equal(j.finish, SCHED_LENGTH);
        assert_int_equal(o.n, 64);
        for (int i = 0; i < 64; i++)
            assert_int_equal(o.ids[i], json_integer_value(json_array_get(gen, i)));
        assert_true(j.t_first_token >= j.t_submit && j.t_done >= j.t_first_token);
    }
    sched_free(s);
    json_decref(g);
    model_free(m);
}

/* 10 jobs on 4 parallel slots with a small token budget (prefill chunks
 * interleave with decoding): each equals the single-job result. */
static void test_concurrent_equals_alone(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    enum { N = 10 };
    int32_t prompts[N][40];
    int lens[N];
    uint64_t r = 99;
    for (int i = 0; i < N; i++) {
        lens[i] = 1 + i * 4;
        prompts[i][0] = 1;
        for (int t = 1; t < lens[i]; t++) {
            r = r * 6364136223846793005ull + 1442695040888963407ull;
            prompts[i][t] = (int32_t)(3 + (r >> 33) % 500);
        }
    }
    kp_err err = {0};
    /* alone, one at a time */
    static out_buf alone[N], together[N];
    static sched_job ja[N], jt[N];
    sched *s = NULL;
    sched_opts o1 = sched_default_opts();
    o1.n_parallel = 1;
    assert_int_equal(sched_new(&s, m, &o1, &err), 0);
    for (int i = 0; i < N; i++) {
        init_job(&ja[i], &alone[i], prompts[i], lens[i], 20);
        assert_int_equal(sched_submit(s, &ja[i], &err), 0);
        wait_done(&alone[i]);
    }
    sched_free(s);
    sched_opts o4 = sched_default_opts();
    o4.n_parallel = 4;
    o4.n_batch = 16;
    assert_int_equal(sched_new(&s, m, &o4, &err), 0);
    for (int i = 0; i < N; i++) {
        init_job(&jt[i], &together[i], prompts[i], lens[i], 20);
        assert_int_equal(sched_submit(s, &jt[i], &err), 0);
    }
    for (int i = 0; i < N; i++) {
        wait_done(&together[i]);
        assert_int_equal(jt[i].finish, SCHED_LENGTH);
        assert_int_equal(together[i].n, alone[i].n);
        assert_memory_equal(together[i].ids, alone[i].ids, sizeof(int32_t) * (size_t)alone[i].n);
    }
    sched_free(s);
    model_free(m);
}

/* A session continues: the second turn reuses the cached prefix and gives
 * the same tokens as a fresh run of the whole conversation. */
static void test_session_prefix_reuse(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    kp_err err = {0};
    sched *s = NULL;
    assert_int_equal(sched_new(&s, m, NULL, &err), 0);
    sched_seq *seq = NULL;
    assert_int_equal(sched_seq_new(&seq, m, KP_TYPE_F32, 256, &err), 0);
    int32_t conv[128] = {1, 403, 407, 261, 378};
    int n = 5;
    sched_job j;
    out_buf o;
    init_job(&j, &o, conv, n, 10);
    j.seq = seq;
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_done(&o);
    assert_int_equal(j.n_cached, 0);
    /* turn 2: conversation = prompt + answer + a new user part */
    memcpy(conv + n, o.ids, sizeof(int32_t) * (size_t)o.n);
    n += o.n;
    conv[n++] = 410;
    conv[n++] = 376;
    init_job(&j, &o, conv, n, 10);
    j.seq = seq;
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_done(&o);
    assert_int_equal(j.n_cached, 5 + 9); /* the last answer token was never fed */
    out_buf fresh;
    sched_job jf;
    init_job(&jf, &fresh, conv, n, 10);
    assert_int_equal(sched_submit(s, &jf, &err), 0);
    wait_done(&fresh);
    assert_memory_equal(fresh.ids, o.ids, sizeof(int32_t) * 10);
    assert_int_equal(seq->kv->n_pos, seq->n_tokens);
    sched_free(s);
    sched_seq_free(seq);
    model_free(m);
}

/* Tenants: a prefix is reused only from a sequence of the job's own owner.
 * Two anonymous slots; owner A (7) runs a prompt twice (the second run hits),
 * owner B (9) runs the same prompt: nothing cached, not even BOS, although
 * A's slot holds it; A's next repeat still hits, B's own repeat hits. A
 * session sequence of A used by a job of B counts as empty too. */
static void test_owner_isolation(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    kp_err err = {0};
    sched *s = NULL;
    sched_opts so = sched_default_opts();
    so.n_parallel = 2;
    assert_int_equal(sched_new(&s, m, &so, &err), 0);
    int32_t secret[12] = {1, 403, 407, 261, 378, 290, 311, 444, 265, 300, 420, 333};
    enum { N = 12 };
    const uint64_t A = 7, B = 9;
    struct { uint64_t owner; int cached; } runs[] = {
        {A, 0}, {A, N - 1}, {B, 0}, {A, N - 1}, {B, N - 1}, {A, N - 1},
    };
    for (size_t i = 0; i < KP_ARRAY_LEN(runs); i++) {
        sched_job j;
        out_buf o;
        init_job(&j, &o, secret, N, 4);
        j.owner = runs[i].owner;
        assert_int_equal(sched_submit(s, &j, &err), 0);
        wait_done(&o);
        assert_int_equal(j.finish, SCHED_LENGTH);
        if (j.n_cached != runs[i].cached)
            fail_msg("run %zu (owner %llu): %d tokens cached, want %d", i, (unsigned long long)runs[i].owner,
                     j.n_cached, runs[i].cached);
    }
    /* A session sequence holding A's prompt, used by B: empty for B */
    sched_seq *seq = NULL;
    assert_int_equal(sched_seq_new(&seq, m, KP_TYPE_F32, 256, &err), 0);
    seq->owner = A;
    uint64_t owners[] = {A, B, B};
    int want[] = {0, 0, N - 1};
    for (int i = 0; i < 3; i++) {
        sched_job j;
        out_buf o;
        init_job(&j, &o, secret, N, 4);
        j.seq = seq;
        j.owner = owners[i];
        assert_int_equal(sched_submit(s, &j, &err), 0);
        wait_done(&o);
        assert_int_equal(j.n_cached, want[i]);
        assert_int_equal(seq->owner, owners[i]);
    }
    sched_free(s);
    sched_seq_free(seq);
    model_free(m);
}

static void test_stop_cancel_busy(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    kp_err err = {0};
    sched *s = NULL;
    sched_opts so = sched_default_opts();
    so.n_parallel = 1;
    so.queue_max = 1;
    so.n_ctx = 64;
    assert_int_equal(sched_new(&s, m, &so, &err), 0);
    int32_t prompt[] = {1, 403, 407, 261, 378};
    /* callback stop */
    sched_job j;
    out_buf o;
    init_job(&j, &o, prompt, 5, 50);
    o.stop_after = 3;
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_done(&o);
    assert_int_equal(j.finish, SCHED_STOP);
    assert_int_equal(o.n, 3);
    /* context full -> length */
    init_job(&j, &o, prompt, 5, 1000);
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_done(&o);
    assert_int_equal(j.finish, SCHED_LENGTH);
    assert_true(o.n >= 58 && o.n <= 60);
    /* a full queue -> KP_EBUSY; cancel running and waiting jobs. The first
     * job blocks inside its callback so it is surely running meanwhile. */
    static sched_job jb[3];
    static out_buf ob[3];
    for (int i = 0; i < 3; i++) init_job(&jb[i], &ob[i], prompt, 5, 1000);
    ob[0].hold = true;
    assert_int_equal(sched_submit(s, &jb[0], &err), 0);
    wait_first_token(&ob[0]);
    assert_int_equal(sched_submit(s, &jb[1], &err), 0); /* waits */
    assert_int_equal(sched_submit(s, &jb[2], &err), KP_EBUSY);
    assert_non_null(strstr(err.msg, "busy"));
    int running = -1, waiting = -1;
    sched_stats(s, &running, &waiting);
    assert_int_equal(running, 1);
    assert_int_equal(waiting, 1);
    atomic_store(&jb[0].cancel, true);
    atomic_store(&jb[1].cancel, true);
    release(&ob[0]);
    wait_done(&ob[0]);
    assert_int_equal(jb[0].finish, SCHED_CANCELED);
    wait_done(&ob[1]);
    assert_int_equal(jb[1].finish, SCHED_CANCELED);
    assert_int_equal(ob[1].n, 0);
    /* prompt longer than the context -> error, not a crash */
    int32_t big[100];
    for (int i = 0; i < 100; i++) big[i] = 5;
    init_job(&j, &o, big, 100, 5);
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_done(&o);
    assert_int_equal(j.finish, SCHED_ERROR);
    assert_non_null(strstr(j.err.msg, "context"));
    /* bad jobs refused at submit */
    init_job(&j, &o, prompt, 0, 5);
    assert_int_equal(sched_submit(s, &j, &err), KP_EINVAL);
    sched_free(s);
    model_free(m);
}

/* Shutting down with jobs running and waiting: every on_done runs. */
static void test_shutdown(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    kp_err err = {0};
    sched *s = NULL;
    sched_opts so = sched_default_opts();
    so.n_parallel = 2;
    assert_int_equal(sched_new(&s, m, &so, &err), 0);
    int32_t prompt[] = {1, 403};
    static sched_job j[5];
    static out_buf o[5];
    for (int i = 0; i < 5; i++) {
        init_job(&j[i], &o[i], prompt, 2, 100000);
        assert_int_equal(sched_submit(s, &j[i], &err), 0);
    }
    sched_free(s);
    for (int i = 0; i < 5; i++) {
        assert_true(o[i].done);
        assert_true(j[i].finish == SCHED_CANCELED || j[i].finish == SCHED_LENGTH);
    }
    model_free(m);
}

typedef struct copy_thr {
    sched *s;
    kv_cache *dst, *src;
    int n, rc;
    kp_err err;
    atomic_bool done;
} copy_thr;

static void *copy_main(void *ud) {
    copy_thr *c = ud;
    c->rc = sched_kv_copy(c->s, c->dst, c->src, 0, c->n, &c->err);
    atomic_store(&c->done, true);
    return NULL;
}

/* Device copies of a KV run on the scheduler thread, between steps: a copy
 * asked for while a callback holds the scheduler waits for it; sched_run
 * from a callback runs at once; after sched_stop the caller runs it. */
static void test_copies_on_sched_thread(void **state) {
    (void)state;
    TU_SKIP_UNLESS_SHARED("models/stories260K.gguf");
    model *m = load_stories();
    kp_err err = {0};
    sched *s = NULL;
    sched_opts so = sched_default_opts();
    so.n_ctx = 64;
    assert_int_equal(sched_new(&s, m, &so, &err), 0);
    assert_false(sched_on_thread(s));
    int32_t prompt[] = {1, 403, 407};
    sched_job j;
    out_buf o;
    init_job(&j, &o, prompt, 3, 8);
    o.hold = true;
    o.s = s;
    assert_int_equal(sched_submit(s, &j, &err), 0);
    wait_first_token(&o); /* the scheduler is now blocked in the callback */

    sched_seq *q = NULL;
    assert_int_equal(sched_seq_new(&q, m, KP_TYPE_F32, 16, &err), 0);
    kv_cache *d = q->kv, *h = NULL;
    assert_int_equal(kv_new(&h, model_backend(m), KP_TYPE_F16, d->n_layer, 16, d->n_kv_heads, d->head_dim, &err),
                     0);
    size_t row = (size_t)d->n_kv_heads * d->head_dim;
    uint64_t rng = 3;
    for (int l = 0; l < d->n_layer; l++) { /* the CPU backend: host memory the test may fill */
        tu_rand_floats(d->k[l], 16 * row, 2.0f, &rng);
        tu_rand_floats(d->v[l], 16 * row, 2.0f, &rng);
    }
    copy_thr c = {.s = s, .dst = h, .src = d, .n = 10};
    atomic_init(&c.done, false);
    pthread_t th;
    assert_int_equal(pthread_create(&th, NULL, copy_main, &c), 0);
    usleep(100 * 1000);
    assert_false(atomic_load(&c.done)); /* waits for the scheduler thread */
    release(&o);
    pthread_join(th, NULL);
    assert_int_equal(c.rc, 0);
    kv_cache *back = NULL;
    assert_int_equal(kv_new(&back, model_backend(m), KP_TYPE_F32, d->n_layer, 16, d->n_kv_heads, d->head_dim, &err),
                     0);
    assert_int_equal(sched_kv_copy(s, back, h, 0, 10, &err), 0);
    for (int l = 0; l < d->n_layer; l++) {
        assert_true(tu_max_rel_err(back->k[l], d->k[l], 10 * row, 1e-3) < 2e-3);
        assert_true(tu_max_rel_err(back->v[l], d->v[l], 10 * row, 1e-3) < 2e-3);
    }

    tid_rec r = {0};
    assert_int_equal(sched_run(s, rec_tid, &r), 0);
    assert_int_equal(r.calls, 1);
    wait_done(&o);
    assert_true(pthread_equal(r.tid, o.tid));
    assert_false(pthread_equal(r.tid, pthread_self()));
    assert_true(o.tried);
    assert_true(o.on_thread);
    assert_int_equal(o.run_rc, 0);
    assert_true(pthread_equal(o.run_tid, o.tid));

    sched_stop(s); /* joined: nobody else owns the model, the caller runs it */
    memset(&r, 0, sizeof r);
    assert_int_equal(sched_run(s, rec_tid, &r), 0);
    assert_true(pthread_equal(r.tid, pthread_self()));
    assert_int_equal(sched_run(NULL, rec_tid, &r), 0);
    assert_int_equal(r.calls, 2);
    kv_free(back);
    kv_free(h);
    sched_seq_free(q);
    sched_free(s);
    model_free(m);
}

int main(int argc, char **argv) {
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_single_matches_golden),
        cmocka_unit_test(test_concurrent_equals_alone),
        cmocka_unit_test(test_session_prefix_reuse),
        cmocka_unit_test(test_owner_isolation),
        cmocka_unit_test(test_stop_cancel_busy),
        cmocka_unit_test(test_shutdown),
        cmocka_unit_test(test_copies_on_sched_thread),
    };
    tu_apply_filter_args(argc, argv);
    return cmocka_run_group_tests_name("sched", tests, NULL, NULL);
}
