/*
 * pool.c — the persistent thread pool behind the CPU kernels (see pool.h).
 *
 * Why it looks like this: a forward step of a tiny model (stories260K,
 * dim 64) is ~20 matrix products of a few microseconds each, so handing work
 * to threads must cost well under a microsecond when the pool is busy. A run
 * therefore publishes (fn, arg) and bumps an atomic generation counter;
 * workers that are spinning on that counter pick the job up at once. A
 * worker that has seen no job for a while (KP_POOL_SPIN polls, roughly a
 * few hundred microseconds) goes to sleep on a condition variable so an idle
 * server burns no CPU; the caller wakes sleepers only when there are any.
 *
 * Synchronisation (C11 atomics). One 64-bit word `job` holds the run's
 * generation (high half) and the next unclaimed ith (low half):
 *   caller:  fn,arg = ...; done = 0; job = (gen+1, 1); wake sleepers if any;
 *            runs ith 0, then claims (CAS on job) any ith no worker has
 *            taken yet, then waits until done == nth-1
 *   worker:  sees the generation change; claims ith's by CAS while the
 *            generation is unchanged and ith < nth; runs them; done++
 * Claiming by CAS tied to the generation means a worker that wakes late can
 * never run a job of a finished run, and a caller whose workers are asleep
 * does not wait for them to wake up (~150 us on a VM): it runs their share
 * itself. A worker goes to sleep only after incrementing n_sleeping and
 * re-checking the generation under the mutex, so a wake-up cannot be lost
 * (either the caller sees n_sleeping > 0 and broadcasts under the mutex, or
 * the worker sees the new generation before waiting).
 */
#include "kernels/cpu/pool.h"

#include "kernels/kp.h"

#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define kp_pool_pause() _mm_pause()
#elif defined(__aarch64__)
#define kp_pool_pause() __asm__ __volatile__("yield")
#else
#define kp_pool_pause() ((void)0)
#endif

/* Polls of the generation counter before a worker sleeps (~50 ns each). */
#define KP_POOL_SPIN 8192
/* Polls of the completion counter before the caller starts yielding. */
#define KP_POOL_WAIT_SPIN 4096

typedef struct kp_pool_worker {
    kp_pool *pool;
    pthread_t thread;
} kp_pool_worker;

struct kp_pool {
    int n_threads;
    kp_pool_worker *workers; /* [n_threads - 1] */
    uint32_t gen;            /* generation of the last run (caller only) */

    /* The job being run: written by the caller before `job` is stored. */
    kp_pool_fn fn;
    void *arg;

    /* Separate cache lines: the counters are hammered by different threads. */
    _Alignas(64) _Atomic uint64_t job; /* generation << 32 | next unclaimed ith */
    _Alignas(64) atomic_int done;      /* ith > 0 finished in this run */
    _Alignas(64) atomic_int n_sleeping;
    atomic_int stop;

    pthread_mutex_t mu;
    pthread_cond_t cv;
};

static uint32_t kp_pool_gen_of(uint64_t job) { return (uint32_t)(job >> 32); }

/* Claim and run ith's of generation g until none is left; returns how many
 * this thread ran. */
static int kp_pool_claim(kp_pool *p, uint32_t g) {
    int ran = 0;
    uint64_t s = atomic_load(&p->job);
    while (kp_pool_gen_of(s) == g && (uint32_t)s < (uint32_t)p->n_threads) {
        if (!atomic_compare_exchange_weak(&p->job, &s, s + 1)) continue; /* s reloaded */
        p->fn(p->arg, (int)(uint32_t)s, p->n_threads);
        ran++;
        s = atomic_load(&p->job);
    }
    return ran;
}

static void *kp_pool_main(void *p_) {
    kp_pool_worker *w = p_;
    kp_pool *p = w->pool;
    uint32_t seen = 0; /* generation 0 is "no run yet"; runs may start before we do */

    for (;;) {
        /* Wait for a new generation: spin first, then sleep. */
        uint32_t g = kp_pool_gen_of(atomic_load_explicit(&p->job, memory_order_acquire));
        for (int spin = 0; g == seen && spin < KP_POOL_SPIN; spin++) {
            kp_pool_pause();
            g = kp_pool_gen_of(atomic_load_explicit(&p->job, memory_order_acquire));
        }
        if (g == seen) {
            pthread_mutex_lock(&p->mu);
            atomic_fetch_add(&p->n_sleeping, 1);
            while ((g = kp_pool_gen_of(atomic_load(&p->job))) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            atomic_fetch_sub(&p->n_sleeping, 1);
            pthread_mutex_unlock(&p->mu);
        }
        seen = g;
        if (atomic_load(&p->stop)) break;

        int ran = kp_pool_claim(p, g);
        if (ran) atomic_fetch_add_explicit(&p->done, ran, memory_order_acq_rel);
    }
    return NULL;
}

static void kp_pool_wake(kp_pool *p) {
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

static void kp_pool_stop(kp_pool *p, int n_started) {
    atomic_store(&p->stop, 1);
    if (++p->gen == 0) p->gen = 1;
    atomic_store(&p->job, (uint64_t)p->gen << 32 | (uint32_t)p->n_threads); /* nothing to claim */
    kp_pool_wake(p);
    for (int i = 0; i < n_started; i++) pthread_join(p->workers[i].thread, NULL);
}

int kp_pool_new(kp_pool **out, int n_threads) {
    *out = NULL;
    if (n_threads < 1) n_threads = 1;
    kp_pool *p = calloc(1, sizeof *p);
    if (!p) return KP_ENOMEM;
    p->n_threads = n_threads;
    atomic_init(&p->job, 0);
    atomic_init(&p->done, 0);
    atomic_init(&p->n_sleeping, 0);
    atomic_init(&p->stop, 0);
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);

    if (n_threads > 1) {
        p->workers = calloc((size_t)n_threads - 1, sizeof *p->workers);
        if (!p->workers) {
            kp_pool_free(p);
            return KP_ENOMEM;
        }
        for (int i = 0; i < n_threads - 1; i++) {
            p->workers[i].pool = p;
            if (pthread_create(&p->workers[i].thread, NULL, kp_pool_main, &p->workers[i])) {
                kp_pool_stop(p, i);
                p->n_threads = 1; /* nothing left to stop */
                kp_pool_free(p);
                return KP_ENOMEM;
            }
        }
    }
    *out = p;
    return 0;
}

void kp_pool_free(kp_pool *p) {
    if (!p) return;
    if (p->n_threads > 1) kp_pool_stop(p, p->n_threads - 1);
    pthread_cond_destroy(&p->cv);
    pthread_mutex_destroy(&p->mu);
    free(p->workers);
    free(p);
}

int kp_pool_threads(const kp_pool *p) { return p ? p->n_threads : 1; }

void kp_pool_run(kp_pool *p, kp_pool_fn fn, void *arg) {
    if (!p || p->n_threads == 1) {
        fn(arg, 0, 1);
        return;
    }
    p->fn = fn;
    p->arg = arg;
    atomic_store(&p->done, 0);
    if (++p->gen == 0) p->gen = 1; /* 0 means "no run yet" to a new worker */
    atomic_store(&p->job, (uint64_t)p->gen << 32 | 1u); /* publishes fn, arg (seq_cst) */
    if (atomic_load(&p->n_sleeping) > 0) kp_pool_wake(p);

    fn(arg, 0, p->n_threads);
    int mine = kp_pool_claim(p, p->gen); /* whatever the workers have not started */

    const int want = p->n_threads - 1 - mine;
    for (int spin = 0; atomic_load_explicit(&p->done, memory_order_acquire) != want; spin++) {
        if (spin < KP_POOL_WAIT_SPIN) {
            kp_pool_pause();
        } else {
            sched_yield(); /* a worker was preempted: give it the core */
        }
    }
}

void kp_pool_range(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi) {
    if (nth < 1) nth = 1;
    if (n < 0) n = 0;
    *lo = n * ith / nth;
    *hi = n * (ith + 1) / nth;
}
