/*
 * backend.c — creating and destroying backends by name (see kernels.h).
 *
 * "cpu" is always built: an op table in kernels/cpu/ops.c running on a
 * persistent thread pool (kernels/cpu/pool.c). "cuda" (kernels/cuda) exists
 * when the build defines KP_HAVE_CUDA (meson found nvcc); without it, or
 * without a device at run time, asking for it is KP_EUNSUP with a message
 * saying what to do. For "cuda", n_threads is the device index. To add a
 * backend: give it an op table and init/release functions that fill
 * be->impl, and a branch in kp_backend_new.
 */
#include "kernels/kernels.h"

#include <stdlib.h>
#include <string.h>

#include "kernels/cpu/cpu.h"
#ifdef KP_HAVE_CUDA
#include "kernels/cuda/cuda.h"
#endif

int kp_backend_new(kp_backend **out, const char *name, int n_threads, kp_err *err) {
    *out = NULL;
    if (!name) name = "cpu";

    if (strcmp(name, "cuda") == 0) {
#ifdef KP_HAVE_CUDA
        kp_backend *cb = calloc(1, sizeof *cb);
        if (!cb) return kp_errf(err, KP_ENOMEM, "backend: out of memory");
        cb->n_threads = 1; /* host-side work of the CUDA backend: the caller's thread */
        int crc = kp_cuda_init(cb, n_threads > 0 ? n_threads : 0, err);
        if (crc) {
            kp_cuda_release(cb);
            free(cb);
            return crc;
        }
        *out = cb;
        return 0;
#else
        return kp_errf(err, KP_EUNSUP,
                       "backend: this build has no CUDA backend (rebuild with -Dcuda=enabled)");
#endif
    }
    if (strcmp(name, "cpu") != 0)
        return kp_errf(err, KP_EINVAL, "backend: unknown backend '%s' (use \"cpu\" or \"cuda\")",
                       name);

    kp_backend *be = calloc(1, sizeof *be);
    if (!be) return kp_errf(err, KP_ENOMEM, "backend: out of memory");
    be->ops = &kp_cpu_ops;
    be->n_threads = n_threads > 0 ? n_threads : kp_cpu_count();
    if (be->n_threads > 1) {
        int rc = kp_pool_new(&be->pool, be->n_threads);
        if (rc) {
            int n = be->n_threads;
            free(be);
            return kp_errf(err, rc, "backend: cannot start %d CPU threads (try fewer)", n);
        }
    }
    int rc = kp_cpu_init(be, err);
    if (rc) {
        kp_backend_free(be);
        return rc;
    }
    *out = be;
    return 0;
}

void kp_backend_free(kp_backend *be) {
    if (!be) return;
    if (be->ops == &kp_cpu_ops) kp_cpu_release(be);
#ifdef KP_HAVE_CUDA
    else if (be->ops == &kp_cuda_ops) kp_cuda_release(be);
#endif
    kp_pool_free(be->pool);
    free(be);
}

const kp_ops *kp_backend_ops(const kp_backend *be) { return be ? be->ops : NULL; }

int kp_backend_threads(const kp_backend *be) { return be ? be->n_threads : 0; }

int kp_cuda_available(void) {
#ifdef KP_HAVE_CUDA
    return kp_cuda_device_count(NULL) > 0;
#else
    return 0;
#endif
}
