/*
 * cpu.h — what kernels/backend.c needs from the CPU backend, and the layout
 * of struct kp_backend that every backend shares.
 *
 * A backend is a table of ops plus private state. The CPU backend keeps a
 * thread pool and per-thread scratch buffers in it; a CUDA backend (later)
 * keeps its device, stream and cuBLAS handle in `impl` and may keep a pool
 * for host-side work. Nothing here is global: two backends never share
 * state.
 */
#ifndef KP_CPU_H
#define KP_CPU_H

#include "kernels/kernels.h"
#include "kernels/cpu/pool.h"

struct kp_backend {
    const kp_ops *ops;
    int n_threads; /* CPU threads used by this backend's host-side work */
    kp_pool *pool; /* NULL when n_threads == 1 */
    void *impl;    /* backend-private state (kp_cpu_state for "cpu") */
};

/* The CPU op table (kernels/cpu/ops.c). */
extern const kp_ops kp_cpu_ops;

/* Create / destroy the CPU backend's private state (be->impl): scratch
 * buffers for every thread of be->pool. be->n_threads must be set. */
int kp_cpu_init(kp_backend *be, kp_err *err);
void kp_cpu_release(kp_backend *be);

/* Threads to use when the caller asks for "all cores" (CPU affinity aware). */
int kp_cpu_count(void);

#endif
