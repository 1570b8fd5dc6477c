/*
 * copybench.cu — the physical copy ceilings of a CUDA device, for
 * `kvpark bench gpu` (bench/bench_gpu.c): host-to-device and device-to-host
 * from page-locked host memory, and device-to-device, each timed with CUDA
 * events on a stream of its own; plus the device's name and capability for
 * the benchmark's report.
 *
 * Why here: these are the numbers every restore path is judged against (a
 * warm resume cannot beat its bytes over H2D; a decode kernel is compared
 * with D2D), and only the backend may talk to the CUDA runtime. Nothing
 * here aborts: every CUDA error comes back as a KP_E* code with the
 * runtime's message, and every buffer is freed on every path.
 */
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda_impl.h"

static int kp_cb_err(kp_err *err, cudaError_t e, const char *what) {
    const int code = e == cudaErrorMemoryAllocation ? KP_ENOMEM : KP_EIO;
    return kp_errf(err, code, "cuda copy bench: %s: %s (%s)", what, cudaGetErrorString(e),
                   cudaGetErrorName(e));
}

/* 0, or KP_EUNSUP / KP_EINVAL with a message when `device` cannot be used. */
static int kp_cb_device(int device, kp_err *err) {
    const char *why = NULL;
    const int n = kp_cuda_device_count(&why);
    if (n <= 0)
        return kp_errf(err, KP_EUNSUP,
                       "no CUDA device: %s (run on a machine with an NVIDIA GPU and driver)", why);
    if (device < 0 || device >= n)
        return kp_errf(err, KP_EINVAL, "CUDA device %d does not exist (%d found: 0..%d)", device, n,
                       n - 1);
    cudaError_t e = cudaSetDevice(device);
    return e == cudaSuccess ? 0 : kp_cb_err(err, e, "select the device");
}

extern "C" int kp_cuda_device_info(int device, char *name, size_t cap, int *cc_major, int *cc_minor,
                                   size_t *mem_bytes, kp_err *err) {
    int rc = kp_cb_device(device, err);
    if (rc) return rc;
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return kp_cb_err(err, e, "read the device properties");
    if (name && cap) snprintf(name, cap, "%s", p.name);
    if (cc_major) *cc_major = p.major;
    if (cc_minor) *cc_minor = p.minor;
    if (mem_bytes) *mem_bytes = p.totalGlobalMem;
    return 0;
}

extern "C" int kp_cuda_copy_times(int device, int kind, size_t bytes, int repeats, double *ms,
                                  kp_err *err) {
    if (kind < KP_CUDA_COPY_H2D || kind > KP_CUDA_COPY_D2D || bytes == 0 || repeats < 1 || !ms)
        return kp_errf(err, KP_EINVAL, "cuda copy bench: bad arguments (kind %d, %zu bytes, %d repeats)",
                       kind, bytes, repeats);
    int rc = kp_cb_device(device, err);
    if (rc) return rc;
    void *host = NULL, *dev_a = NULL, *dev_b = NULL;
    cudaStream_t st = NULL;
    cudaEvent_t ev0 = NULL, ev1 = NULL;
    cudaError_t e = cudaSuccess;
    const char *what = "";
#define KP_CB_TRY(call, w)                                                                         \
    do {                                                                                           \
        if ((e = (call)) != cudaSuccess) {                                                         \
            what = (w);                                                                            \
            goto out;                                                                              \
        }                                                                                          \
    } while (0)
    KP_CB_TRY(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking), "create a stream");
    KP_CB_TRY(cudaEventCreate(&ev0), "create an event");
    KP_CB_TRY(cudaEventCreate(&ev1), "create an event");
    KP_CB_TRY(cudaMalloc(&dev_a, bytes), "allocate device memory");
    KP_CB_TRY(cudaMemsetAsync(dev_a, 0x5a, bytes, st), "fill device memory");
    if (kind == KP_CUDA_COPY_D2D) {
        KP_CB_TRY(cudaMalloc(&dev_b, bytes), "allocate device memory");
        KP_CB_TRY(cudaMemsetAsync(dev_b, 0, bytes, st), "fill device memory");
    } else {
        KP_CB_TRY(cudaMallocHost(&host, bytes), "allocate pinned host memory");
        memset(host, 0xa5, bytes); /* every page touched before timing */
    }
    for (int i = -1; i < repeats; i++) { /* i = -1: warm-up, not reported */
        KP_CB_TRY(cudaEventRecord(ev0, st), "record an event");
        if (kind == KP_CUDA_COPY_H2D)
            KP_CB_TRY(cudaMemcpyAsync(dev_a, host, bytes, cudaMemcpyHostToDevice, st), "copy H2D");
        else if (kind == KP_CUDA_COPY_D2H)
            KP_CB_TRY(cudaMemcpyAsync(host, dev_a, bytes, cudaMemcpyDeviceToHost, st), "copy D2H");
        else
            KP_CB_TRY(cudaMemcpyAsync(dev_b, dev_a, bytes, cudaMemcpyDeviceToDevice, st), "copy D2D");
        KP_CB_TRY(cudaEventRecord(ev1, st), "record an event");
        KP_CB_TRY(cudaEventSynchronize(ev1), "wait for a copy");
        float t = 0;
        KP_CB_TRY(cudaEventElapsedTime(&t, ev0, ev1), "read an event time");
        if (i >= 0) ms[i] = t;
    }
#undef KP_CB_TRY
out:
    if (st) cudaStreamSynchronize(st);
    if (host) cudaFreeHost(host);
    if (dev_a) cudaFree(dev_a);
    if (dev_b) cudaFree(dev_b);
    if (ev0) cudaEventDestroy(ev0);
    if (ev1) cudaEventDestroy(ev1);
    if (st) cudaStreamDestroy(st);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return kp_cb_err(err, e, what);
    }
    return 0;
}
