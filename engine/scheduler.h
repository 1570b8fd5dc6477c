/*
 * scheduler.h — the batch scheduler: one thread owns the model and steps every
 * running request together (continuous batching).
 *
 * Model
 *   - A sched_seq is a sequence the scheduler can run: a KV cache plus the
 *     token ids it holds (kv->n_pos == n_tokens after every step; between
 *     jobs a session may hold more ids than KV rows, when its stored KV was
 *     lost: only the rows the KV holds are reused, the rest prefilled). The
 *     server's sessions own sched_seqs; the scheduler also keeps a small pool
 *     of anonymous ones (one per parallel slot) used by requests without a
 *     session, and reuses whichever holds the longest common prefix with the
 *     new prompt (a prompt cache).
 *   - Tenants: a job and a sequence carry an owner (the API key's id). A
 *     prefix is reused only from a sequence whose owner equals the job's:
 *     another owner's sequence may be taken for the work, but its KV counts
 *     as empty (n_cached 0, the whole prompt is prefilled), so neither
 *     cached_tokens nor the time to first token tells one key anything about
 *     another key's prompts. The sequence then belongs to the job's owner.
 *   - A job = (sequence or none, full prompt token ids, sampling, limits,
 *     callbacks). On start the sequence keeps its longest common prefix with
 *     the prompt (cached_tokens) and only the rest is prefilled.
 *   - Each step: new jobs join (up to n_parallel running), every running job
 *     contributes its pending prompt tokens (prefill, at most n_batch tokens
 *     per step in all, so long prompts do not stall decoding) or its last
 *     sampled token; one model_forward() runs them all; each job that got
 *     logits samples its next token and its on_token callback runs.
 *   - A job ends when its callback returns non-zero (stop sequence), on an
 *     end-of-generation token, after max_tokens, when the context is full, or
 *     when canceled (client gone); on_done then runs exactly once with the
 *     reason, on the scheduler thread. After on_done the scheduler no longer
 *     touches the job or its sequence: the submitter may free them.
 *   - sched_submit() returns KP_EBUSY when the wait queue is full (HTTP 429).
 *   - Callbacks run on the scheduler thread: they must be quick (copy the
 *     token into a buffer, signal a condition variable).
 */
#ifndef KP_SCHEDULER_H
#define KP_SCHEDULER_H

#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>

#include "kernels/kp.h"
#include "engine/model.h"
#include "engine/grammar.h"
#include "engine/sample.h"

typedef struct sched_seq {
    kv_cache *kv;
    int32_t *tokens; /* [cap] ids held by kv (rows 0..n_tokens-1) */
    int n_tokens;
    int cap;
    bool busy;       /* a job is running on it (scheduler-owned flag) */
    double last_use; /* kp_now() of the last step */
    uint64_t owner;  /* whose tokens the KV holds (sched_job.owner of its last job;
                      * a session sets it to the session's owner) */
} sched_seq;

int sched_seq_new(sched_seq **out, const model *m, int kv_type, int n_ctx, kp_err *err);
void sched_seq_free(sched_seq *s);

enum sched_finish {
    SCHED_RUNNING = 0,
    SCHED_STOP = 1,      /* EOG token or the callback asked to stop */
    SCHED_LENGTH = 2,    /* max_tokens or the context is full */
    SCHED_CANCELED = 3,  /* canceled by the submitter */
    SCHED_ERROR = 4,     /* the forward pass failed (message in job->err) */
};

typedef struct sched_job sched_job;
struct sched_job {
    /* in: set by the submitter */
    sched_seq *seq;          /* NULL: use an anonymous slot (prefix cache) */
    uint64_t owner;          /* who asks (the API key's owner id; 0 without keys): a
                              * prefix is reused only from a sequence of this owner */
    const int32_t *prompt;   /* [n_prompt] full conversation so far */
    int n_prompt;
    int max_tokens;          /* > 0 */
    bool ignore_eos;
    sample_params sampling;
    const sample_bias *bias; /* [n_bias] logit biases (sample_set_bias); must outlive the job */
    int n_bias;
    /* Constrained decoding (engine/grammar.h), or NULL: only tokens the
     * grammar allows are sampled (the mask is applied to the logits the
     * callback sees, before the sampler's biases and chain); the job ends with
     * SCHED_STOP as soon as the value is complete (or on EOG, allowed only
     * when it is), SCHED_LENGTH at max_tokens, SCHED_ERROR if no token can
     * continue. Must outlive the job; its state is the scheduler's. */
    const gram *grammar;
    /* Called for each generated token with its logits ([n_vocab], valid only
     * during the call). Return 0 to continue, non-zero to stop (SCHED_STOP). */
    int (*on_token)(sched_job *job, int32_t id, const float *logits);
    void (*on_done)(sched_job *job);
    void *ud;
    atomic_bool cancel;      /* set from any thread to cancel */

    /* out: set by the scheduler */
    int n_cached;            /* prompt tokens reused from the sequence */
    int n_generated;
    int finish;              /* enum sched_finish, set before on_done */
    double t_submit, t_first_token, t_done;
    kp_err err;

    /* scheduler-private */
    sampler *smp;
    gram_state *gst;         /* grammar position (when grammar) */
    uint32_t *gmask;         /* [(n_vocab + 31) / 32] allowed tokens */
    int n_done_prompt;       /* prompt tokens already in the KV */
    int32_t last;            /* last sampled token, to feed next step */
    bool have_logits;
    float *logits;
    sched_job *next;
};

typedef struct sched_opts {
    int n_parallel;   /* running jobs at most (default 4) */
    int queue_max;    /* waiting jobs at most (default 64) */
    int n_batch;      /* tokens per step at most (default 512) */
    int n_ctx;        /* context of anonymous slots (default: model's, <= 4096) */
    int kv_type;      /* default F32 */
} sched_opts;

typedef struct sched sched;

sched_opts sched_default_opts(void);
int sched_new(sched **out, model *m, const sched_opts *o, kp_err *err);
/* Cancels running and waiting jobs (their on_done runs) and joins the
 * thread; afterwards sched_submit/sched_call answer KP_ECANCELED, so threads
 * still holding the pointer are safe until sched_free. Idempotent. */
void sched_stop(sched *s);
/* sched_stop, then release everything. */
void sched_free(sched *s);
/* Queue a job. KP_EBUSY if the queue is full, KP_EINVAL for a bad job
 * (message in err). The job and its prompt must stay valid until on_done. */
int sched_submit(sched *s, sched_job *job, kp_err *err);
void sched_stats(sched *s, int *running, int *waiting);
/* Run fn(ud) on the scheduler thread between steps and wait for it: the safe
 * way to touch a sched_seq (save it, restore it) while jobs are running. */
int sched_call(sched *s, void (*fn)(void *ud), void *ud);
/* True when the caller is s's scheduler thread (e.g. inside a callback or a
 * sched_call function). */
bool sched_on_thread(sched *s);
/* Run fn(ud) on the thread that owns the model and wait: directly when the
 * caller already is the scheduler thread (a sched_call from there would wait
 * on itself forever) or when s is NULL or its thread has been joined by
 * sched_stop (nobody else touches the model then); else through sched_call,
 * so any thread may call it. KP_ECANCELED while the scheduler is stopping. */
int sched_run(sched *s, void (*fn)(void *ud), void *ud);
/* kv_copy_rows (engine/kv.h) run by sched_run: every device copy of a
 * session's KV goes through here, so a device context is only ever used from
 * the scheduler thread (two host caches too: the staging path tested on the
 * CPU is the one a GPU takes). */
int sched_kv_copy(sched *s, kv_cache *dst, const kv_cache *src, int r0, int n, kp_err *err);

#endif
