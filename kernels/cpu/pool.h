/*
 * pool.h — a persistent thread pool for the CPU kernels.
 *
 * Contract
 *   - kp_pool_new(n) starts n-1 worker threads; the calling thread is thread 0.
 *   - kp_pool_run(p, fn, arg) calls fn(arg, ith, nth) once for every ith in
 *     0..nth-1 (ith 0 on the caller) and returns when all have returned.
 *     Workers spin briefly, then sleep on a condition variable, so a run costs
 *     microseconds while busy and no CPU while idle. An ith whose worker has
 *     not picked it up by the time the caller finished ith 0 is run by the
 *     caller itself, so fn must not wait for another ith (no barriers).
 *   - Not re-entrant: one kp_pool_run at a time per pool (the engine's
 *     scheduler thread owns the pool). fn must not call kp_pool_run.
 */
#ifndef KP_POOL_H
#define KP_POOL_H

#include <stdint.h>

typedef struct kp_pool kp_pool;
typedef void (*kp_pool_fn)(void *arg, int ith, int nth);

int kp_pool_new(kp_pool **out, int n_threads);
void kp_pool_free(kp_pool *p);
int kp_pool_threads(const kp_pool *p);
void kp_pool_run(kp_pool *p, kp_pool_fn fn, void *arg);
/* Split [0, n) into nth nearly equal ranges; range of thread ith. */
void kp_pool_range(int64_t n, int ith, int nth, int64_t *lo, int64_t *hi);

#endif
