/*
 * blas.cu — cuBLAS, loaded with dlopen when a CUDA backend starts rather
 * than linked into the program.
 *
 * Why: libcublas and libcublasLt are several hundred MB of shared objects.
 * Linking them made every kvpark process, `kvpark --version` or a CPU-only
 * server included, start at ~150 MB resident before doing anything (the
 * dynamic loader's relocations touch their data pages). The CUDA runtime
 * (libcudart, 1.5 MB, which itself loads the driver only on first use)
 * stays linked; cuBLAS is opened by kp_cuda_init, i.e. only by a process
 * that really runs on a GPU. tests/test_cuda_ops.c checks that a process
 * has no libcublas mapped until then.
 *
 * Where from: the toolkit's lib64 the build used (KP_CUDA_LIBDIR, set by
 * kernels/meson.build), then the loader's search path (the program's
 * RUNPATH, LD_LIBRARY_PATH, ld.so.cache), each under the soname of the
 * headers we were compiled with (libcublas.so.<CUBLAS_VER_MAJOR>), then
 * the unversioned name.
 *
 * The function table is process-wide: filled once (pthread_once) and
 * never written again, so any thread may read it; the library is never
 * unloaded (cuBLAS keeps its own global state). Only the six entry
 * points backend.cu calls are resolved; their types are checked against
 * cublas_api.h at compile time without referencing the symbols.
 */
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

#include "kernels/cuda/cuda_impl.h"

#ifndef KP_CUDA_LIBDIR
#define KP_CUDA_LIBDIR "/usr/local/cuda/lib64"
#endif

#define KP_CU_STR2(x) #x
#define KP_CU_STR(x) KP_CU_STR2(x)
#define KP_CU_BLAS_SONAME "libcublas.so." KP_CU_STR(CUBLAS_VER_MAJOR)

/* Each pointer type must be exactly what the header declares (sizeof: an
 * unevaluated operand, so no reference to the symbol reaches the linker). */
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::create)>(&cublasCreate_v2)) > 0, "");
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::destroy)>(&cublasDestroy_v2)) > 0, "");
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::set_stream)>(&cublasSetStream_v2)) > 0, "");
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::set_math_mode)>(&cublasSetMathMode)) > 0, "");
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::sgemm)>(&cublasSgemm_v2)) > 0, "");
static_assert(sizeof(static_cast<decltype(kp_cu_blas_api::gemm_ex)>(&cublasGemmEx)) > 0, "");

static pthread_once_t blas_once = PTHREAD_ONCE_INIT;
static kp_cu_blas_api blas_api;   /* valid when blas_ok */
static int blas_ok;
static char blas_path[512];       /* the file opened */
static char blas_why[768];        /* why it could not be, when !blas_ok */

static void blas_load_once(void) {
    static const char *const names[] = {KP_CUDA_LIBDIR "/" KP_CU_BLAS_SONAME, KP_CU_BLAS_SONAME,
                                        "libcublas.so"};
    void *h = NULL;
    size_t used = 0;
    for (size_t i = 0; i < sizeof names / sizeof names[0] && !h; i++) {
        h = dlopen(names[i], RTLD_NOW | RTLD_LOCAL);
        if (h) {
            snprintf(blas_path, sizeof blas_path, "%s", names[i]);
        } else if (used < sizeof blas_why) {
            const char *e = dlerror();
            int k = snprintf(blas_why + used, sizeof blas_why - used, "%s%s", used ? "; " : "",
                             e ? e : names[i]);
            if (k > 0) used += (size_t)k;
        }
    }
    if (!h) return;
    struct { void **slot; const char *sym; } syms[] = {
        {(void **)&blas_api.create, "cublasCreate_v2"},
        {(void **)&blas_api.destroy, "cublasDestroy_v2"},
        {(void **)&blas_api.set_stream, "cublasSetStream_v2"},
        {(void **)&blas_api.set_math_mode, "cublasSetMathMode"},
        {(void **)&blas_api.sgemm, "cublasSgemm_v2"},
        {(void **)&blas_api.gemm_ex, "cublasGemmEx"},
    };
    for (size_t i = 0; i < sizeof syms / sizeof syms[0]; i++) {
        *syms[i].slot = dlsym(h, syms[i].sym);
        if (!*syms[i].slot) {
            snprintf(blas_why, sizeof blas_why, "%s has no symbol %s (a cuBLAS older than the "
                     "headers kvpark was built with?)", blas_path, syms[i].sym);
            return; /* h stays open: harmless, and dlclose of cuBLAS is not safe */
        }
    }
    blas_ok = 1;
}

const kp_cu_blas_api *kp_cu_blas(kp_err *err) {
    pthread_once(&blas_once, blas_load_once);
    if (blas_ok) return &blas_api;
    kp_errf(err, KP_EUNSUP,
            "backend: cannot load cuBLAS (%s): install the CUDA toolkit's cuBLAS (%s), put its "
            "directory in LD_LIBRARY_PATH, or use --device cpu",
            blas_why, KP_CU_BLAS_SONAME);
    return NULL;
}

extern "C" int kp_cuda_blas_load(const char **path, kp_err *err) {
    if (path) *path = NULL;
    if (!kp_cu_blas(err)) return KP_EUNSUP;
    if (path) *path = blas_path;
    return 0;
}
