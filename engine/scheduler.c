/*
 * scheduler.c — continuous batching on one scheduler thread (see scheduler.h).
 *
 * The thread loops:  wait for work -> run queued calls -> admit queued jobs
 * into free slots -> one step (a single model_forward over every running
 * job's pending tokens) -> sample, call back, retire finished jobs.
 * The mutex guards only the queue, the call list and the counters; the model,
 * the running jobs and the sequences are touched by the scheduler thread
 * alone.
 */
#include "engine/scheduler.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

typedef struct sched_call_rec {
    void (*fn)(void *ud);
    void *ud;
    bool done;
    struct sched_call_rec *next;
} sched_call_rec;

struct sched {
    model *m;
    sched_opts o;
    pthread_t thread;
    pthread_mutex_t mu;
    pthread_cond_t cv;      /* work arrived (scheduler waits) */
    pthread_cond_t call_cv; /* a call finished (callers wait) */
    bool stop;
    sched_job *queue;       /* waiting jobs, FIFO */
    int n_waiting;
    sched_call_rec *calls;
    atomic_int n_running_pub;
    atomic_int n_waiting_pub;
    bool joined;            /* sched_stop has joined the thread */

    /* scheduler-thread state */
    sched_job **running;    /* [n_parallel] */
    int n_running;
    sched_seq **slots;      /* [n_parallel] anonymous sequences */
    model_seq *batch;       /* [n_parallel] */
    sched_job **batch_job;  /* [n_parallel] */
    gram_vocab *gv;         /* token trie for grammar jobs, built on first use */
};

/* ------------------------------------------------------------------ */

int sched_seq_new(sched_seq **out, const model *m, int kv_type, int n_ctx, kp_err *err) {
    *out = NULL;
    sched_seq *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "sched: out of memory");
    int rc = model_kv_new(m, &s->kv, kv_type, n_ctx, err);
    if (rc) {
        free(s);
        return rc;
    }
    s->cap = s->kv->n_ctx;
    s->tokens = malloc(sizeof *s->tokens * (size_t)s->cap);
    if (!s->tokens) {
        sched_seq_free(s);
        return kp_errf(err, KP_ENOMEM, "sched: out of memory");
    }
    *out = s;
    return 0;
}

void sched_seq_free(sched_seq *s) {
    if (!s) return;
    kv_free(s->kv);
    free(s->tokens);
    free(s);
}

sched_opts sched_default_opts(void) {
    sched_opts o = {.n_parallel = 4, .queue_max = 64, .n_batch = 512, .n_ctx = 0,
                    .kv_type = KP_TYPE_F32};
    return o;
}

/* ------------------------------------------------------------------ */
/* job lifecycle (scheduler thread)                                    */

/* What admission allocated for a job (sampler, logits, grammar state and
 * mask): freed when it ends or when admission fails half-way. */
static void job_free_buffers(sched_job *j) {
    sample_free(j->smp);
    j->smp = NULL;
    free(j->logits);
    j->logits = NULL;
    gram_state_free(j->gst);
    j->gst = NULL;
    free(j->gmask);
    j->gmask = NULL;
}

static void finish_job(sched *s, int idx, int reason) {
    sched_job *j = s->running[idx];
    j->finish = reason;
    j->t_done = kp_now();
    if (j->seq) {
        j->seq->busy = false;
        j->seq->last_use = j->t_done;
    }
    job_free_buffers(j);
    s->running[idx] = s->running[--s->n_running];
    atomic_store(&s->n_running_pub, s->n_running);
    if (j->on_done) j->on_done(j);
}

static int common_prefix(const int32_t *a, int na, const int32_t *b, int nb) {
    int n = KP_MIN(na, nb), i = 0;
    while (i < n && a[i] == b[i]) i++;
    return i;
}

/* The prefix of q's tokens job j may reuse: none unless q last held j's
 * owner's tokens (another key's prompt must not show, neither in n_cached
 * nor in the time the prefill takes), and only rows its KV holds (a session
 * whose KV was lost keeps its token ids with an empty KV: recomputed here). */
static int reusable_prefix(const sched_seq *q, const sched_job *j) {
    if (q->owner != j->owner) return 0;
    return common_prefix(q->tokens, KP_MIN(q->n_tokens, q->kv->n_pos), j->prompt, j->n_prompt);
}

/* Pick the idle anonymous slot with the longest prefix the job may reuse
 * (ties: least recently used). NULL if all are busy. */
static sched_seq *pick_slot(sched *s, const sched_job *j) {
    sched_seq *best = NULL;
    int best_lcp = -1;
    for (int i = 0; i < s->o.n_parallel; i++) {
        sched_seq *q = s->slots[i];
        if (q->busy) continue;
        int l = reusable_prefix(q, j);
        if (l > best_lcp || (l == best_lcp && best && q->last_use < best->last_use)) {
            best = q;
            best_lcp = l;
        }
    }
    return best;
}

/* Move a job into the running set. Returns 0, or the finish reason to end it
 * with at once (the caller runs on_done). */
static int start_job(sched *s, sched_job *j) {
    const model_hparams *hp = model_hp(s->m);
    sched_seq *q = j->seq;
    if (q->kv->n_ctx < j->n_prompt + 1) {
        kp_errf(&j->err, KP_ERANGE,
                "the prompt has %d tokens but the context holds %d (at least one must be left to "
                "generate)",
                j->n_prompt, q->kv->n_ctx);
        return SCHED_ERROR;
    }
    int lcp = reusable_prefix(q, j);
    if (lcp == j->n_prompt) lcp--; /* re-run the last token to get its logits */
    kv_truncate(q->kv, lcp);
    q->n_tokens = lcp;
    j->n_cached = lcp;
    j->n_done_prompt = lcp;
    j->n_generated = 0;
    j->have_logits = false;
    j->logits = malloc(sizeof(float) * (size_t)hp->n_vocab);
    if (!j->logits || sample_new(&j->smp, &j->sampling, hp->n_vocab, &j->err) ||
        sample_set_bias(j->smp, j->bias, j->n_bias, &j->err)) {
        if (!j->err.msg[0]) kp_errf(&j->err, KP_ENOMEM, "sched: out of memory");
        job_free_buffers(j);
        return SCHED_ERROR;
    }
    if (j->grammar) {
        if ((!s->gv && gram_vocab_new(&s->gv, model_vocab(s->m), &j->err)) ||
            gram_state_new(&j->gst, j->grammar, s->gv, &j->err) ||
            !(j->gmask = calloc((size_t)(KP_MAX(hp->n_vocab, gram_vocab_n(s->gv)) + 31) / 32, sizeof(uint32_t)))) {
            if (!j->err.msg[0]) kp_errf(&j->err, KP_ENOMEM, "sched: out of memory");
            job_free_buffers(j);
            return SCHED_ERROR;
        }
    }
    for (int i = 0; i < j->n_prompt; i++) sample_accept(j->smp, j->prompt[i]);
    q->busy = true;
    q->owner = j->owner; /* from now on the KV holds this owner's tokens */
    s->running[s->n_running++] = j;
    atomic_store(&s->n_running_pub, s->n_running);
    return 0;
}

/* Admit waiting jobs into free slots, in order; a job whose session is busy
 * (another request on the same conversation) waits its turn. */
static void admit(sched *s) {
    sched_job **pp = &s->queue;
    while (*pp && s->n_running < s->o.n_parallel) {
        sched_job *j = *pp;
        if (atomic_load(&j->cancel)) {
            *pp = j->next;
            s->n_waiting--;
            j->finish = SCHED_CANCELED;
            j->t_done = kp_now();
            pthread_mutex_unlock(&s->mu);
            if (j->on_done) j->on_done(j);
            pthread_mutex_lock(&s->mu);
            pp = &s->queue; /* the list may have changed while unlocked */
            continue;
        }
        sched_seq *q = j->seq ? (j->seq->busy ? NULL : j->seq) : pick_slot(s, j);
        if (!q) {
            pp = &j->next;
            continue;
        }
        *pp = j->next;
        s->n_waiting--;
        bool anon = j->seq == NULL;
        j->seq = q;
        int reason = start_job(s, j);
        if (reason) {
            if (anon) j->seq = NULL;
            j->finish = reason;
            j->t_done = kp_now();
            pthread_mutex_unlock(&s->mu);
            if (j->on_done) j->on_done(j);
            pthread_mutex_lock(&s->mu);
            pp = &s->queue;
        }
    }
    atomic_store(&s->n_waiting_pub, s->n_waiting);
}

/* One batched step over every running job. */
static void step(sched *s) {
    /* retire canceled jobs and jobs whose context is full */
    for (int i = 0; i < s->n_running;) {
        sched_job *j = s->running[i];
        if (atomic_load(&j->cancel)) finish_job(s, i, SCHED_CANCELED);
        else if (j->seq->n_tokens + 1 > j->seq->kv->n_ctx) finish_job(s, i, SCHED_LENGTH);
        else i++;
    }
    if (s->n_running == 0) return;

    /* decoding jobs first (one token each), then prompt chunks in the rest of
     * the token budget */
    int n = 0, budget = s->o.n_batch;
    for (int pass = 0; pass < 2; pass++) {
        for (int i = 0; i < s->n_running; i++) {
            sched_job *j = s->running[i];
            bool prefill = j->n_done_prompt < j->n_prompt;
            if ((pass == 0) == prefill) continue;
            model_seq *ms = &s->batch[n];
            if (!prefill) {
                *ms = (model_seq){.kv = j->seq->kv, .tokens = &j->last, .n_tokens = 1,
                                  .logits = j->logits};
                budget--;
            } else {
                int left = j->n_prompt - j->n_done_prompt;
                int room = j->seq->kv->n_ctx - j->seq->n_tokens;
                int take = KP_MIN(KP_MIN(left, KP_MAX(budget, 0)), room);
                if (take <= 0) continue;
                bool completes = take == left;
                *ms = (model_seq){.kv = j->seq->kv, .tokens = j->prompt + j->n_done_prompt,
                                  .n_tokens = take, .logits = completes ? j->logits : NULL};
                budget -= take;
            }
            s->batch_job[n++] = j;
        }
    }
    if (n == 0) return;
    kp_err err = {0};
    int rc = model_forward(s->m, s->batch, n, &err);
    double now = kp_now();
    for (int b = 0; b < n; b++) {
        sched_job *j = s->batch_job[b];
        sched_seq *q = j->seq;
        if (rc) {
            j->err = err;
            continue;
        }
        /* the tokens just run are now in the KV */
        memcpy(q->tokens + q->n_tokens, s->batch[b].tokens, sizeof(int32_t) * (size_t)s->batch[b].n_tokens);
        q->n_tokens += s->batch[b].n_tokens;
        q->last_use = now;
        if (j->n_done_prompt < j->n_prompt) j->n_done_prompt += s->batch[b].n_tokens;
        j->have_logits = s->batch[b].logits != NULL;
    }
    /* sample and call back; finish_job reorders s->running, so walk by job */
    for (int b = 0; b < n; b++) {
        sched_job *j = s->batch_job[b];
        int idx = -1;
        for (int i = 0; i < s->n_running; i++)
            if (s->running[i] == j) idx = i;
        if (idx < 0) continue;
        if (rc) {
            finish_job(s, idx, SCHED_ERROR);
            continue;
        }
        if (!j->have_logits) continue;
        if (j->gst) { /* constrained: mask, then the usual chain */
            int na = gram_mask(j->gst, j->gmask);
            if (na <= 0) {
                kp_errf(&j->err, na < 0 ? na : KP_EINVAL, "grammar: %s",
                        na < 0 ? "out of memory for the token mask" : "no token can continue the output");
                finish_job(s, idx, SCHED_ERROR);
                continue;
            }
            gram_apply_mask(j->gmask, j->logits, model_hp(s->m)->n_vocab);
        }
        int32_t next = sample_next(j->smp, j->logits);
        sample_accept(j->smp, next);
        if (j->gst && gram_state_accept_token(j->gst, next)) {
            kp_errf(&j->err, KP_EINVAL, "grammar: sampled token %d is not allowed", (int)next);
            finish_job(s, idx, SCHED_ERROR);
            continue;
        }
        if (j->n_generated == 0) j->t_first_token = now;
        if (!j->ignore_eos && tok_is_eog(model_vocab(s->m), next)) {
            finish_job(s, idx, SCHED_STOP);
            continue;
        }
        j->n_generated++;
        int stop = j->on_token ? j->on_token(j, next, j->logits) : 0;
        if (stop || (j->gst && gram_state_complete(j->gst))) finish_job(s, idx, SCHED_STOP);
        else if (j->n_generated >= j->max_tokens) finish_job(s, idx, SCHED_LENGTH);
        else j->last = next;
    }
}

/* ------------------------------------------------------------------ */

static void *sched_main(void *arg) {
    sched *s = arg;
    pthread_mutex_lock(&s->mu);
    for (;;) {
        while (!s->stop && !s->calls && s->n_running == 0 &&
               (!s->queue || s->n_running >= s->o.n_parallel))
            pthread_cond_wait(&s->cv, &s->mu);
        if (s->stop) break;
        while (s->calls) {
            sched_call_rec *c = s->calls;
            s->calls = c->next;
            pthread_mutex_unlock(&s->mu);
            c->fn(c->ud);
            pthread_mutex_lock(&s->mu);
            c->done = true;
            pthread_cond_broadcast(&s->call_cv);
        }
        admit(s);
        pthread_mutex_unlock(&s->mu);
        step(s);
        pthread_mutex_lock(&s->mu);
        /* a queue that cannot be admitted (all its sessions busy) must not spin */
        if (s->n_running == 0 && s->queue && !s->calls && !s->stop) {
            bool any = false;
            for (sched_job *j = s->queue; j && !any; j = j->next)
                any = !j->seq || !j->seq->busy || atomic_load(&j->cancel);
            if (!any) pthread_cond_wait(&s->cv, &s->mu);
        }
    }
    /* shutting down: cancel everything */
    sched_job *q = s->queue;
    s->queue = NULL;
    s->n_waiting = 0;
    while (s->calls) { /* run pending calls so callers do not hang */
        sched_call_rec *c = s->calls;
        s->calls = c->next;
        pthread_mutex_unlock(&s->mu);
        c->fn(c->ud);
        pthread_mutex_lock(&s->mu);
        c->done = true;
        pthread_cond_broadcast(&s->call_cv);
    }
    pthread_mutex_unlock(&s->mu);
    while (s->n_running > 0) finish_job(s, s->n_running - 1, SCHED_CANCELED);
    while (q) {
        sched_job *j = q;
        q = q->next;
        j->finish = SCHED_CANCELED;
        j->t_done = kp_now();
        if (j->on_done) j->on_done(j);
    }
    return NULL;
}

int sched_new(sched **out, model *m, const sched_opts *opts, kp_err *err) {
    *out = NULL;
    sched_opts o = opts ? *opts : sched_default_opts();
    if (o.n_parallel <= 0 || o.n_parallel > 1024)
        return kp_errf(err, KP_EINVAL, "sched: --parallel must be 1..1024 (got %d)", o.n_parallel);
    if (o.queue_max < 0) return kp_errf(err, KP_EINVAL, "sched: --queue must be >= 0");
    if (o.n_batch <= 0) o.n_batch = 512;
    if (o.n_ctx <= 0) o.n_ctx = KP_MIN(model_hp(m)->n_ctx_train, 4096);
    sched *s = calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "sched: out of memory");
    s->m = m;
    s->o = o;
    s->running = calloc((size_t)o.n_parallel, sizeof *s->running);
    s->slots = calloc((size_t)o.n_parallel, sizeof *s->slots);
    s->batch = calloc((size_t)o.n_parallel, sizeof *s->batch);
    s->batch_job = calloc((size_t)o.n_parallel, sizeof *s->batch_job);
    int rc = 0;
    if (!s->running || !s->slots || !s->batch || !s->batch_job) {
        rc = kp_errf(err, KP_ENOMEM, "sched: out of memory");
        goto fail;
    }
    for (int i = 0; i < o.n_parallel; i++)
        if ((rc = sched_seq_new(&s->slots[i], m, o.kv_type, o.n_ctx, err))) goto fail;
    pthread_mutex_init(&s->mu, NULL);
    pthread_cond_init(&s->cv, NULL);
    pthread_cond_init(&s->call_cv, NULL);
    if (pthread_create(&s->thread, NULL, sched_main, s) != 0) {
        rc = kp_errf(err, KP_ENOMEM, "sched: cannot start the scheduler thread");
        pthread_mutex_destroy(&s->mu);
        pthread_cond_destroy(&s->cv);
        pthread_cond_destroy(&s->call_cv);
        goto fail;
    }
    *out = s;
    return 0;
fail:
    if (s->slots)
        for (int i = 0; i < o.n_parallel; i++) sched_seq_free(s->slots[i]);
    free(s->slots);
    free(s->running);
    free(s->batch);
    free(s->batch_job);
    free(s);
    return rc;
}

void sched_stop(sched *s) {
    if (!s || s->joined) return;
    pthread_mutex_lock(&s->mu);
    s->stop = true;
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    pthread_join(s->thread, NULL);
    pthread_mutex_lock(&s->mu);
    s->joined = true;
    pthread_mutex_unlock(&s->mu);
}

void sched_free(sched *s) {
    if (!s) return;
    sched_stop(s);
    for (int i = 0; i < s->o.n_parallel; i++) sched_seq_free(s->slots[i]);
    free(s->slots);
    free(s->running);
    free(s->batch);
    free(s->batch_job);
    gram_vocab_free(s->gv);
    pthread_mutex_destroy(&s->mu);
    pthread_cond_destroy(&s->cv);
    pthread_cond_destroy(&s->call_cv);
    free(s);
}

int sched_submit(sched *s, sched_job *j, kp_err *err) {
    if (!j->prompt || j->n_prompt <= 0)
        return kp_errf(err, KP_EINVAL, "sched: the prompt is empty");
    if (j->max_tokens <= 0) return kp_errf(err, KP_EINVAL, "sched: max_tokens must be > 0");
    int rc = sample_check_params(&j->sampling, err);
    if (rc) return rc;
    j->finish = SCHED_RUNNING;
    j->t_submit = kp_now();
    j->t_first_token = j->t_done = 0;
    j->err.msg[0] = 0;
    j->next = NULL;
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        return kp_errf(err, KP_ECANCELED, "sched: shutting down");
    }
    /* capacity = running slots + queue; n_running_pub is updated under this
     * mutex when a job is admitted, so a burst cannot overshoot */
    if (atomic_load(&s->n_running_pub) + s->n_waiting >= s->o.n_parallel + s->o.queue_max) {
        pthread_mutex_unlock(&s->mu);
        return kp_errf(err, KP_EBUSY, "the server is busy: %d requests running and %d waiting",
                       atomic_load(&s->n_running_pub), s->n_waiting);
    }
    sched_job **pp = &s->queue;
    while (*pp) pp = &(*pp)->next;
    *pp = j;
    s->n_waiting++;
    atomic_store(&s->n_waiting_pub, s->n_waiting);
    pthread_cond_broadcast(&s->cv);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

void sched_stats(sched *s, int *running, int *waiting) {
    if (running) *running = atomic_load(&s->n_running_pub);
    if (waiting) *waiting = atomic_load(&s->n_waiting_pub);
}

int sched_call(sched *s, void (*fn)(void *ud), void *ud) {
    sched_call_rec c = {.fn = fn, .ud = ud};
    pthread_mutex_lock(&s->mu);
    if (s->stop) {
        pthread_mutex_unlock(&s->mu);
        return KP_ECANCELED;
    }
    c.next = s->calls;
    s->calls = &c;
    pthread_cond_broadcast(&s->cv);
    while (!c.done) pthread_cond_wait(&s->call_cv, &s->mu);
    pthread_mutex_unlock(&s->mu);
    return 0;
}

bool sched_on_thread(sched *s) {
    if (!s) return false;
    pthread_mutex_lock(&s->mu);
    bool on = !s->joined && pthread_equal(pthread_self(), s->thread);
    pthread_mutex_unlock(&s->mu);
    return on;
}

int sched_run(sched *s, void (*fn)(void *ud), void *ud) {
    bool direct = !s;
    if (s) {
        pthread_mutex_lock(&s->mu);
        direct = s->joined || pthread_equal(pthread_self(), s->thread);
        pthread_mutex_unlock(&s->mu);
    }
    if (direct) {
        fn(ud);
        return 0;
    }
    return sched_call(s, fn, ud);
}

typedef struct kv_copy_call {
    kv_cache *dst;
    const kv_cache *src;
    int r0, n, rc;
    kp_err *err;
} kv_copy_call;

static void kv_copy_on_sched(void *ud) {
    kv_copy_call *c = ud;
    c->rc = kv_copy_rows(c->dst, c->src, c->r0, c->n, c->err);
}

int sched_kv_copy(sched *s, kv_cache *dst, const kv_cache *src, int r0, int n, kp_err *err) {
    kv_copy_call c = {.dst = dst, .src = src, .r0 = r0, .n = n, .err = err};
    int rc = sched_run(s, kv_copy_on_sched, &c);
    if (rc) return kp_errf(err, rc, "cannot copy the KV cache: the server is shutting down");
    return c.rc;
}
