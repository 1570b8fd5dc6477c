/*
 * cuda.h — what kernels/backend.c needs from the CUDA backend.
 *
 * Plain C, no CUDA headers: backend.c is compiled by the C compiler and only
 * sees these extern "C" entry points, which exist when the build defines
 * KP_HAVE_CUDA (meson found nvcc and -Dcuda is not disabled).
 *
 * Contract
 *   - kp_cuda_device_count() never crashes: without a driver (no libcuda.so)
 *     or without a GPU the CUDA runtime returns an error code and this
 *     returns 0; *why (may be NULL) then points to the runtime's message.
 *   - kp_cuda_init(be, device, err) fills be->impl with the backend's state
 *     (device, one stream, a cuBLAS handle bound to that stream, scratch
 *     buffers) and be->ops with &kp_cuda_ops. KP_EUNSUP when there is no
 *     such device, with a message saying to use the CPU backend.
 *     cuBLAS is not linked: kp_cuda_init loads it (dlopen, kernels/cuda/blas.cu)
 *     and fails with KP_EUNSUP and a message naming the library when it
 *     cannot. kp_cuda_blas_load(&path, err) does only that loading (any
 *     thread, once per process; no device needed) and gives the file opened.
 *   - kp_cuda_release(be) frees everything kp_cuda_init made (safe on a
 *     half-initialised backend).
 *   - kp_cuda_ops follows kernels.h: ops are queued on the backend's stream
 *     and ops->sync waits for them. Buffers and weights are device memory;
 *     the small index arrays (get_rows ids, rope pos) may be host memory, as
 *     the engine passes them, or device memory. An op that cannot run (a
 *     CUDA error, an unsupported type) prints a message and aborts, as the
 *     CPU backend does: ops return void.
 */
#ifndef KP_CUDA_H
#define KP_CUDA_H

#include "kernels/kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

extern const kp_ops kp_cuda_ops;

int kp_cuda_device_count(const char **why);
int kp_cuda_init(kp_backend *be, int device, kp_err *err);
void kp_cuda_release(kp_backend *be);
int kp_cuda_blas_load(const char **path, kp_err *err);

/* ---- the device's copy ceilings (kernels/cuda/copybench.cu), for
 * `kvpark bench gpu` ----------------------------------------------------------
 *   - kp_cuda_device_info: name (cap bytes, NUL-terminated), compute
 *     capability and global memory of `device`; any out pointer may be NULL.
 *   - kp_cuda_copy_times: ms[0..repeats) = the time of one copy of `bytes`
 *     bytes of `kind` (H2D and D2H from page-locked host memory, D2D between
 *     two device buffers), measured with CUDA events on a stream of its own
 *     after one untimed warm-up copy. Allocates and frees its own buffers.
 *   - Both return KP_EUNSUP "no CUDA device: ..." without a device or
 *     driver, KP_EINVAL for a device that does not exist, KP_ENOMEM when the
 *     buffers cannot be allocated, KP_EIO on any other CUDA error; never
 *     abort. Not for concurrent use with other work on the device (it would
 *     share the bandwidth it measures). */
enum { KP_CUDA_COPY_H2D = 0, KP_CUDA_COPY_D2H = 1, KP_CUDA_COPY_D2D = 2 };
int kp_cuda_device_info(int device, char *name, size_t cap, int *cc_major, int *cc_minor,
                        size_t *mem_bytes, kp_err *err);
int kp_cuda_copy_times(int device, int kind, size_t bytes, int repeats, double *ms, kp_err *err);

#ifdef __cplusplus
}
#endif

#endif
