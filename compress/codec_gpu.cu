/*
 * codec_gpu.cu — KV codec chunks decoded and encoded on the GPU
 * (compress/codec_gpu.h), and the host side of a pipelined restore.
 *
 * Design
 *
 *   Bitstream. The kernels read and write exactly the bytes of the CPU codec
 *   (compress/codec_baseline.c, codec_learned.c). Every per-value,
 *   per-group and per-byte computation is a function of
 *   compress/codec_gpu_math.h, compiled here for the device and in
 *   tests/test_codec_cuda.c for the host, where it is checked against
 *   codec_encode / codec_decode without a GPU. This file only decides who
 *   computes what (tiling, shared memory, launches) and moves bytes.
 *   Float arithmetic matches the CPU's (-fmad=false; same products and sums
 *   in the same order), so results are bit-equal; the one exception is the
 *   RoPE start angle (double cos/sin of pos0 * th_p: CUDA's vs glibc's, <= 2
 *   ulp in double), which can move a re-rotated key by one float ulp.
 *
 *   Context. codec_gpu_new uploads the codec's constant tables once: for
 *   pca/learned, per (layer, K/V) coder the decoder D^T [r][dpad] (ranges 1:
 *   with the quantiser folded in) and its offset, the encoder E^T [d][rpad],
 *   the mean, the fixed ranges, the bit widths and each latent's bit offset
 *   within a row, and the RoPE angles with their cos/sin; the baselines
 *   need nothing. Tables come from codec_learned_get_view
 *   (compress/codec_learned_impl.h), never from the CPU codec's layout.
 *
 *   Batches. A batch is any list of chunks of one codec (mixed layers, K/V,
 *   row counts, element types). The host turns it into a job list (one job
 *   per chunk: payload, rows, coder, pos0, n, element type, first block),
 *   copies it H2D from a pinned descriptor slot (a ring of CG_SLOTS, each
 *   reused only after the event recorded behind its last kernel), and
 *   launches ONE kernel; a block finds its chunk by binary search over the
 *   jobs' first blocks.
 *     decode, baselines   block = (chunk, CG_ROWS rows); a thread per value
 *                         (none: per byte) -> cg_baseline_value -> store.
 *     decode, pca/learned block = (chunk, CG_ROWS rows, a tile of CG_THREADS
 *                         output units). A unit is one column, or for keys
 *                         with RoPE one rotated pair of columns, so a thread
 *                         owns both halves of its pair and rotates in
 *                         registers. The rows' latents are unpacked CG_TILE
 *                         at a time into shared memory (every thread helps),
 *                         each thread accumulates D^T z for its unit over
 *                         all rows of the block (loads of D^T shared by 8
 *                         rows), adds the offset, rotates with the block's
 *                         cos/sin table (shared, built by the double chain),
 *                         converts and writes the cache rows.
 *     encode, baselines   block = (chunk, 32 rows = one KIVI token group);
 *                         a thread per value (none, fp16), per (token, head,
 *                         group) (int8, int4, kivi2 values) or per (head,
 *                         code byte) over the token group (kivi2 keys).
 *     encode, pca/learned three launches: project (block = (chunk, 8 rows,
 *                         CG_THREADS latents); the rows' RoPE-undone,
 *                         centred values staged in shared memory; ranges 1
 *                         quantises at once), ranges 0 only: per latent the
 *                         chunk's min/max -> fp16 lo/step -> codes, then
 *                         pack: a thread per payload byte gathers its bits
 *                         (no atomics, deterministic). Scratch is
 *                         stream-ordered (cudaMallocAsync / cudaFreeAsync).
 *
 *   Restore pipeline. codec_gpu_restore owns two streams: `copy` (H2D) and
 *   `compute` (decode), and up to CG_RESTORE_SLOTS staging slots, each a
 *   pinned host buffer from the caller's codec_gpu_staging pool plus a
 *   device buffer and two events (copied, decoded). Submitting layer l:
 *   check every chunk's header on the host; pack the payloads into a slot's
 *   pinned buffer (host memcpy; the slot is reused only after its previous
 *   copy event, so with 2 slots the host runs at most one layer ahead of the
 *   copies); the copy stream waits for the slot's previous decode (its
 *   device buffer is free), copies, records `copied`; the compute stream
 *   waits on `copied` only, decodes, records `decoded`; after the layer's
 *   last batch the compute stream records ready[l]. So while layer l
 *   decodes, layer l+1 is already copying. A caller polls
 *   (_layer_ready), blocks (_wait_layer) or makes its own stream wait on the
 *   device (_stream_wait) for "layer l is in the cache".
 *
 *   Limits: RoPE with more than CG_MAX_HALF pairs per head (head_dim >
 *   1024 fully rotated) is refused at codec_gpu_new; at most 65535 chunks
 *   per encode batch (grid.y). Errors return KP_E* with the CUDA message;
 *   nothing aborts.
 */
#include <cuda_runtime.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "compress/codec_gpu_math.h"
extern "C" {
#include "compress/codec_gpu.h"
#include "compress/codec_impl.h"
#include "compress/codec_learned_impl.h"
#include "kernels/cuda/cuda.h" /* kp_cuda_device_count */
}

#define CG_THREADS 128
#define CG_ROWS 8          /* rows per block: decode, learned projection */
#define CG_ENC_ROWS 32     /* rows per block: baseline encode (= the KIVI token group) */
#define CG_TILE 64         /* latents (decode) / dims (encode) staged in shared memory per step */
#define CG_MAX_HALF 512    /* RoPE pairs per head the kernels accept */
#define CG_SLOTS 8         /* descriptor ring */
#define CG_RESTORE_SLOTS 4 /* staging slots of one restore */

_Static_assert(CG_ENC_ROWS == CG_KIVI_TOKENS, "baseline encode blocks are KIVI token groups");

/* ---------------------------------------------------------------------- */
/* Device-side state                                                      */
/* ---------------------------------------------------------------------- */

/* One (layer, K/V) coder of pca/learned; pointers into the device tables. */
struct cg_coder {
    int r, B, rpad, dpad, rope;
    const float *dect;  /* [r][dpad] */
    const float *dmean; /* [d] */
    const float *enct;  /* [d][rpad] */
    const float *mean;  /* [d] */
    const float *qlo, *qstep; /* [r] */
    const uint8_t *bits; /* [r] */
    const int *off;      /* [r] bit of latent j within a row */
};

/* What the pca/learned kernels take by value. */
struct cg_lc {
    const cg_coder *coders; /* [2 * n_layer], index 2 * layer + is_v */
    const double *rope;     /* [3][half]: angle per position, its cos, its sin */
    int H, D, d, half, neox, ranges;
};

/* One chunk of a batch. */
struct cg_job {
    uint8_t *payload; /* device, after the header */
    void *rows;       /* device */
    float *z;         /* encode scratch, ranges 0: latents [n][r] */
    uint8_t *q;       /* encode scratch, pca/learned: codes [n][r] */
    int coder;        /* 2 * layer + is_v */
    int is_v, pos0, n, kv_type;
    int block0; /* first block (grid.x) of this chunk */
};

struct cg_slot {
    cg_job *host; /* pinned */
    cg_job *dev;
    int cap;
    cudaEvent_t done; /* recorded behind the last kernel that read dev */
};

struct codec_gpu_ctx {
    const codec *c;
    int id, device, learned;
    cg_geom geo;
    cudaStream_t stream;
    pthread_mutex_t mu; /* the descriptor ring */
    cg_slot slot[CG_SLOTS];
    int next_slot;
    /* pca / learned */
    cg_lc lc;
    void *tables;    /* device: every coder's arrays */
    cg_coder *coders_dev;
    cg_coder *coders_host; /* the same with device pointers, for the host's sizes */
    double *rope_dev;
    int max_r;
};

/* ---------------------------------------------------------------------- */
/* Errors                                                                 */
/* ---------------------------------------------------------------------- */

static int cg_cuda_err(kp_err *err, cudaError_t e, const char *what) {
    (void)cudaGetLastError();
    return kp_errf(err, KP_EIO, "codec gpu: %s: %s (%s)", what, cudaGetErrorString(e), cudaGetErrorName(e));
}

#define CG_TRY(call, what)                                \
    do {                                                  \
        cudaError_t e_ = (call);                          \
        if (e_ != cudaSuccess) return cg_cuda_err(err, e_, what); \
    } while (0)

static cudaStream_t cg_stream(codec_gpu_ctx *g, void *stream) {
    return stream ? (cudaStream_t)stream : g->stream;
}

static unsigned cg_div_up(size_t a, size_t b) { return (unsigned)((a + b - 1) / b); }

/* ---------------------------------------------------------------------- */
/* Kernels                                                                */
/* ---------------------------------------------------------------------- */

/* The job of block `block`: the last job whose first block is <= block. */
__device__ const cg_job *cg_job_of(const cg_job *jobs, int n_jobs, int block) {
    int lo = 0, hi = n_jobs - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (jobs[mid].block0 <= block) lo = mid;
        else hi = mid - 1;
    }
    return &jobs[lo];
}

/* cs, sn [CG_ROWS][half] of rows i0 .. i0+nr-1 of a chunk at pos0 (shared). */
__device__ void cg_rope_table(const cg_lc &L, int pos0, int i0, int nr, float *cs, float *sn) {
    for (int p = threadIdx.x; p < L.half; p += blockDim.x)
        cg_rope_rows(L.rope[p], L.rope[L.half + p], L.rope[2 * L.half + p], pos0, i0, nr, cs + p, sn + p, L.half);
    __syncthreads();
}

/* ---- baselines ---------------------------------------------------------- */

__global__ void __launch_bounds__(CG_THREADS) cg_base_decode_k(cg_geom g, const cg_job *jobs, int n_jobs) {
    const cg_job *jb = cg_job_of(jobs, n_jobs, blockIdx.x);
    const int i0 = (blockIdx.x - jb->block0) * CG_ROWS, nr = min(CG_ROWS, jb->n - i0);
    if (g.codec == CODEC_NONE) { /* the rows' bytes as they are */
        const size_t es = cg_elem_size(jb->kv_type), at = (size_t)i0 * g.R * es, bytes = (size_t)nr * g.R * es;
        for (size_t b = threadIdx.x; b < bytes; b += blockDim.x) ((uint8_t *)jb->rows)[at + b] = jb->payload[at + b];
        return;
    }
    const int64_t total = (int64_t)nr * g.R;
    for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
        const int i = i0 + (int)(e / g.R), hk = (int)(e % g.R);
        const float v = cg_baseline_value(&g, jb->is_v, jb->payload, jb->n, i, hk / g.D, hk % g.D);
        cg_store(jb->kv_type, jb->rows, (size_t)i * g.R + hk, v);
    }
}

__global__ void __launch_bounds__(CG_THREADS) cg_base_encode_k(cg_geom g, const cg_job *jobs, int n_jobs) {
    const cg_job *jb = cg_job_of(jobs, n_jobs, blockIdx.x);
    const int i0 = (blockIdx.x - jb->block0) * CG_ENC_ROWS, nr = min(CG_ENC_ROWS, jb->n - i0);
    const int kt = jb->kv_type, n = jb->n;
    uint8_t *p = jb->payload;
    const int64_t groups = (int64_t)nr * g.H * g.NG; /* (token, head, group) units */
    switch (g.codec) {
    case CODEC_NONE: {
        const size_t es = cg_elem_size(kt), at = (size_t)i0 * g.R * es, bytes = (size_t)nr * g.R * es;
        for (size_t b = threadIdx.x; b < bytes; b += blockDim.x) p[at + b] = ((const uint8_t *)jb->rows)[at + b];
        break;
    }
    case CODEC_FP16:
        for (int64_t e = threadIdx.x; e < (int64_t)nr * g.R; e += blockDim.x) {
            const size_t idx = (size_t)i0 * g.R + (size_t)e;
            cg_wr16(p + 2 * idx, cg_f2h(cg_load(kt, jb->rows, idx)));
        }
        break;
    case CODEC_INT8:
    case CODEC_INT4:
        for (int64_t e = threadIdx.x; e < groups; e += blockDim.x)
            cg_int_group(&g, kt, jb->rows, p, n, i0 + (int)(e / (g.H * g.NG)), (int)(e / g.NG % g.H), (int)(e % g.NG));
        break;
    default: /* CODEC_KIVI2 */
        if (jb->is_v) {
            for (int64_t e = threadIdx.x; e < groups; e += blockDim.x)
                cg_kivi_v_group(&g, kt, jb->rows, p, n, i0 + (int)(e / (g.H * g.NG)), (int)(e / g.NG % g.H),
                                (int)(e % g.NG));
        } else {
            const int DB = (g.D + 3) / 4;
            for (int e = threadIdx.x; e < g.H * DB; e += blockDim.x)
                cg_kivi_k_byte(&g, kt, jb->rows, p, n, i0 / CG_KIVI_TOKENS, e / DB, e % DB);
        }
        break;
    }
}

/* ---- pca / learned ------------------------------------------------------ */

/* grid (row blocks, unit tiles); dynamic shared: cs, sn [CG_ROWS][half]. */
__global__ void __launch_bounds__(CG_THREADS) cg_lc_decode_k(cg_lc L, const cg_job *jobs, int n_jobs) {
    extern __shared__ float cg_sh[];
    __shared__ float zs[CG_ROWS][CG_TILE];
    const cg_job *jb = cg_job_of(jobs, n_jobs, blockIdx.x);
    const cg_coder cd = L.coders[jb->coder];
    const int units = cg_lc_units(L.D, L.half, cd.rope);
    if (blockIdx.y * blockDim.x >= (unsigned)(L.H * units)) return; /* the whole block is idle */
    const int i0 = (blockIdx.x - jb->block0) * CG_ROWS, nr = min(CG_ROWS, jb->n - i0);

    /* this thread's unit: columns c0 (and c1, rotated pair p) of the row */
    const int unit = blockIdx.y * blockDim.x + threadIdx.x;
    const bool active = unit < L.H * units;
    int c0 = 0, c1 = -1, p = -1;
    if (active) {
        const int h = unit / units;
        cg_lc_unit_cols(unit % units, L.half, L.neox, cd.rope, &c0, &c1, &p);
        c0 += h * L.D;
        if (c1 >= 0) c1 += h * L.D;
    }
    float *cs = cg_sh, *sn = cg_sh + CG_ROWS * L.half;
    if (cd.rope) cg_rope_table(L, jb->pos0, i0, nr, cs, sn);

    const uint8_t *codes = jb->payload + (L.ranges ? 0 : 4 * (size_t)cd.r);
    const size_t ncode = ((size_t)jb->n * cd.B + 7) / 8;
    float acc0[CG_ROWS], acc1[CG_ROWS];
#pragma unroll
    for (int q = 0; q < CG_ROWS; q++) acc0[q] = acc1[q] = 0.0f;
    /* acc = sum over j = 0..r-1 in order of D^T[j][c] * z_j, CG_TILE latents at a time */
    for (int j0 = 0; j0 < cd.r; j0 += CG_TILE) {
        const int jn = min(CG_TILE, cd.r - j0);
        __syncthreads(); /* the previous tile has been used */
        for (int e = threadIdx.x; e < CG_ROWS * CG_TILE; e += blockDim.x) {
            const int q = e / CG_TILE, jj = e % CG_TILE, j = j0 + jj;
            float z = 0.0f;
            if (q < nr && jj < jn) {
                const size_t t = (size_t)(i0 + q) * cd.B + cd.off[j];
                z = cg_lc_latent(L.ranges, cg_code_at(codes, ncode, t, cd.bits[j]), jb->payload, cd.r, j);
            }
            zs[q][jj] = z;
        }
        __syncthreads();
        if (!active) continue;
        for (int jj = 0; jj < jn; jj++) {
            const float *w = cd.dect + (size_t)(j0 + jj) * cd.dpad;
            const float w0 = w[c0];
#pragma unroll
            for (int q = 0; q < CG_ROWS; q++) acc0[q] = acc0[q] + w0 * zs[q][jj];
            if (c1 >= 0) {
                const float w1 = w[c1];
#pragma unroll
                for (int q = 0; q < CG_ROWS; q++) acc1[q] = acc1[q] + w1 * zs[q][jj];
            }
        }
    }
    if (!active) return;
    for (int q = 0; q < nr; q++) {
        const size_t row = (size_t)(i0 + q) * L.d;
        const float x0 = cd.dmean[c0] + acc0[q];
        if (p < 0) {
            cg_store(jb->kv_type, jb->rows, row + c0, x0);
            continue;
        }
        float y0, y1;
        cg_rotate(x0, cd.dmean[c1] + acc1[q], cs[q * L.half + p], sn[q * L.half + p], 0, &y0, &y1);
        cg_store(jb->kv_type, jb->rows, row + c0, y0);
        cg_store(jb->kv_type, jb->rows, row + c1, y1);
    }
}

/* z = E (RoPE^-1(x) - mu) for CG_ROWS rows and CG_THREADS latents per
 * block; ranges 1: codes at once, ranges 0: z kept for the range pass. */
__global__ void __launch_bounds__(CG_THREADS) cg_lc_project_k(cg_lc L, const cg_job *jobs, int n_jobs) {
    extern __shared__ float cg_sh[];
    __shared__ float xs[CG_ROWS][CG_TILE];
    const cg_job *jb = cg_job_of(jobs, n_jobs, blockIdx.x);
    const cg_coder cd = L.coders[jb->coder];
    if (blockIdx.y * blockDim.x >= (unsigned)cd.r) return;
    const int i0 = (blockIdx.x - jb->block0) * CG_ROWS, nr = min(CG_ROWS, jb->n - i0);
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    const bool active = j < cd.r;
    float *cs = cg_sh, *sn = cg_sh + CG_ROWS * L.half;
    if (cd.rope) cg_rope_table(L, jb->pos0, i0, nr, cs, sn);

    float acc[CG_ROWS];
#pragma unroll
    for (int q = 0; q < CG_ROWS; q++) acc[q] = 0.0f;
    for (int k0 = 0; k0 < L.d; k0 += CG_TILE) {
        const int kn = min(CG_TILE, L.d - k0);
        __syncthreads();
        for (int e = threadIdx.x; e < CG_ROWS * CG_TILE; e += blockDim.x) {
            const int q = e / CG_TILE, kk = e % CG_TILE;
            float x = 0.0f;
            if (q < nr && kk < kn)
                x = cg_lc_enc_input(jb->kv_type, jb->rows, (size_t)(i0 + q) * L.d, k0 + kk, L.D, L.half, L.neox,
                                    cd.rope, cs + q * L.half, sn + q * L.half, cd.mean);
            xs[q][kk] = x;
        }
        __syncthreads();
        if (!active) continue;
        for (int kk = 0; kk < kn; kk++) {
            const float w = cd.enct[(size_t)(k0 + kk) * cd.rpad + j];
#pragma unroll
            for (int q = 0; q < CG_ROWS; q++) acc[q] = acc[q] + w * xs[q][kk];
        }
    }
    if (!active) return;
    const float qm = (float)((1 << cd.bits[j]) - 1);
    for (int q = 0; q < nr; q++) {
        const size_t at = (size_t)(i0 + q) * cd.r + j;
        if (L.ranges) jb->q[at] = (uint8_t)cg_lc_quant(acc[q], cd.qlo[j], cd.qstep[j], qm);
        else jb->z[at] = acc[q];
    }
}

/* ranges 0: grid (latent tiles, chunks): per latent the chunk's range ->
 * fp16 lo/step in the payload, then the codes. */
__global__ void __launch_bounds__(CG_THREADS) cg_lc_range_k(cg_lc L, const cg_job *jobs) {
    const cg_job *jb = &jobs[blockIdx.y];
    const cg_coder cd = L.coders[jb->coder];
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= cd.r) return;
    float mn = INFINITY, mx = -INFINITY;
    for (int i = 0; i < jb->n; i++) {
        const float v = jb->z[(size_t)i * cd.r + j];
        if (v < mn) mn = v;
        if (v > mx) mx = v;
    }
    uint16_t lh, sh;
    float lf, sf;
    cg_lc_range(mn, mx, cd.bits[j], &lh, &sh, &lf, &sf);
    cg_wr16(jb->payload + 2 * (size_t)j, lh);
    cg_wr16(jb->payload + 2 * (size_t)cd.r + 2 * (size_t)j, sh);
    const float qm = (float)((1 << cd.bits[j]) - 1);
    for (int i = 0; i < jb->n; i++)
        jb->q[(size_t)i * cd.r + j] = (uint8_t)cg_lc_quant(jb->z[(size_t)i * cd.r + j], lf, sf, qm);
}

/* grid (byte tiles, chunks): byte b of each chunk's code stream. */
__global__ void __launch_bounds__(CG_THREADS) cg_lc_pack_k(cg_lc L, const cg_job *jobs) {
    const cg_job *jb = &jobs[blockIdx.y];
    const cg_coder cd = L.coders[jb->coder];
    const size_t b = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= ((size_t)jb->n * cd.B + 7) / 8) return;
    jb->payload[(L.ranges ? 0 : 4 * (size_t)cd.r) + b] = cg_pack_byte(jb->q, jb->n, cd.r, cd.bits, cd.off, cd.B, b);
}

/* ---------------------------------------------------------------------- */
/* Context                                                                */
/* ---------------------------------------------------------------------- */

extern "C" int codec_gpu_available(const char **why) { return kp_cuda_device_count(why) > 0; }

static size_t cg_align(size_t x) { return (x + 15) & ~(size_t)15; }

/* Upload every coder of a pca/learned codec (see the design notes). */
static int cg_upload_learned(codec_gpu_ctx *g, kp_err *err) {
    const codec *c = g->c;
    const int n_coders = 2 * c->shape.n_layer;
    codec_learned_view v;
    size_t total = 0;
    int any_rope = 0;
    for (int i = 0; i < n_coders; i++) {
        int rc = codec_learned_get_view(c, i / 2, i % 2, &v, err);
        if (rc) return rc;
        if (v.rope && v.rope_half > CG_MAX_HALF)
            return kp_errf(err, KP_EUNSUP,
                           "codec gpu: RoPE over %d pairs per head; the GPU codec takes at most %d "
                           "(use the CPU codec)", v.rope_half, CG_MAX_HALF);
        /* dect, dmean, enct, mean, qlo, qstep, off, bits */
        total += cg_align((size_t)v.r * v.dpad * 4) + 2 * cg_align((size_t)v.d * 4) +
                 cg_align((size_t)v.d * v.rpad * 4) + 3 * cg_align((size_t)v.r * 4) + cg_align(v.r);
        g->max_r = KP_MAX(g->max_r, v.r);
        any_rope |= v.rope;
        g->lc.ranges = v.ranges, g->lc.neox = v.rope_neox, g->lc.d = v.d;
        g->lc.half = v.rope_half;
    }
    if (!any_rope) g->lc.half = 0; /* pca: no table, no shared memory for one */
    g->lc.H = c->shape.n_kv_heads, g->lc.D = c->shape.head_dim;
    g->coders_host = (cg_coder *)calloc(n_coders, sizeof(cg_coder));
    uint8_t *host = (uint8_t *)calloc(1, total);
    int *off = (int *)malloc((size_t)g->max_r * sizeof(int));
    double *rope = (double *)malloc(3 * (size_t)KP_MAX(g->lc.half, 1) * sizeof(double));
    if (!g->coders_host || !host || !off || !rope) {
        free(host), free(off), free(rope);
        return kp_errf(err, KP_ENOMEM, "codec gpu: out of memory (%zu bytes of tables)", total);
    }
    cudaError_t e = cudaMalloc(&g->tables, total ? total : 16);
    size_t at = 0;
    /* n bytes of src to the next aligned place of the tables; its device address */
    auto put = [&](const void *src, size_t n) -> const void * {
        memcpy(host + at, src, n);
        const void *d = (const uint8_t *)g->tables + at;
        at += cg_align(n);
        return d;
    };
    for (int i = 0; i < n_coders && e == cudaSuccess; i++) {
        codec_learned_get_view(c, i / 2, i % 2, &v, NULL);
        cg_coder *cd = &g->coders_host[i];
        cd->r = v.r, cd->B = v.bits_sum, cd->rpad = v.rpad, cd->dpad = v.dpad, cd->rope = v.rope;
        cd->dect = (const float *)put(v.dect, (size_t)v.r * v.dpad * 4);
        cd->dmean = (const float *)put(v.dmean, (size_t)v.d * 4);
        cd->enct = (const float *)put(v.enct, (size_t)v.d * v.rpad * 4);
        cd->mean = (const float *)put(v.mean, (size_t)v.d * 4);
        cd->qlo = (const float *)put(v.qlo, (size_t)v.r * 4);
        cd->qstep = (const float *)put(v.qstep, (size_t)v.r * 4);
        for (int j = 0, o = 0; j < v.r; j++) off[j] = o, o += v.bits[j]; /* prefix sums of the widths */
        cd->off = (const int *)put(off, (size_t)v.r * 4);
        cd->bits = (const uint8_t *)put(v.bits, (size_t)v.r);
    }
    if (e == cudaSuccess) e = cudaMemcpy(g->tables, host, total, cudaMemcpyHostToDevice);
    if (e == cudaSuccess) e = cudaMalloc((void **)&g->coders_dev, (size_t)n_coders * sizeof(cg_coder));
    if (e == cudaSuccess)
        e = cudaMemcpy(g->coders_dev, g->coders_host, (size_t)n_coders * sizeof(cg_coder), cudaMemcpyHostToDevice);
    if (e == cudaSuccess && g->lc.half > 0) {
        const int h = g->lc.half;
        codec_learned_get_view(c, 0, 0, &v, NULL);
        memcpy(rope, v.rope_th, (size_t)h * sizeof(double));
        memcpy(rope + h, v.rope_cos, (size_t)h * sizeof(double));
        memcpy(rope + 2 * h, v.rope_sin, (size_t)h * sizeof(double));
        e = cudaMalloc((void **)&g->rope_dev, 3 * (size_t)h * sizeof(double));
        if (e == cudaSuccess) e = cudaMemcpy(g->rope_dev, rope, 3 * (size_t)h * sizeof(double), cudaMemcpyHostToDevice);
    }
    free(host), free(off), free(rope);
    if (e != cudaSuccess) return cg_cuda_err(err, e, "upload the codec tables");
    g->lc.coders = g->coders_dev;
    g->lc.rope = g->rope_dev;
    return 0;
}

extern "C" void codec_gpu_free(codec_gpu_ctx *g) {
    if (!g) return;
    cudaSetDevice(g->device);
    if (g->stream) cudaStreamSynchronize(g->stream);
    for (int i = 0; i < CG_SLOTS; i++) {
        cg_slot *s = &g->slot[i];
        if (s->done) cudaEventSynchronize(s->done), cudaEventDestroy(s->done);
        cudaFreeHost(s->host);
        cudaFree(s->dev);
    }
    cudaFree(g->tables);
    cudaFree(g->coders_dev);
    cudaFree(g->rope_dev);
    free(g->coders_host);
    if (g->stream) cudaStreamDestroy(g->stream);
    (void)cudaGetLastError();
    pthread_mutex_destroy(&g->mu);
    free(g);
}

extern "C" int codec_gpu_new(codec_gpu_ctx **out, const codec *c, int device, kp_err *err) {
    if (!out) return kp_errf(err, KP_EINVAL, "codec_gpu_new: out is NULL");
    *out = NULL;
    if (!c) return kp_errf(err, KP_EINVAL, "codec_gpu_new: codec is NULL");
    const char *why = NULL;
    const int n_dev = kp_cuda_device_count(&why);
    if (n_dev <= 0)
        return kp_errf(err, KP_EUNSUP, "codec gpu: no CUDA device (%s): decode chunks on the CPU", why);
    if (device < 0 || device >= n_dev)
        return kp_errf(err, KP_EINVAL, "codec gpu: CUDA device %d does not exist (%d found)", device, n_dev);

    codec_gpu_ctx *g = (codec_gpu_ctx *)calloc(1, sizeof *g);
    if (!g) return kp_errf(err, KP_ENOMEM, "codec gpu: out of memory");
    g->c = c;
    g->id = codec_id_of(c);
    g->device = device;
    g->learned = codec_is_learned(c);
    g->geo = cg_geom_of(g->id, c->shape.n_kv_heads, c->shape.head_dim);
    pthread_mutex_init(&g->mu, NULL);
    cudaError_t e = cudaSetDevice(device);
    if (e == cudaSuccess) e = cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking);
    for (int i = 0; i < CG_SLOTS && e == cudaSuccess; i++)
        e = cudaEventCreateWithFlags(&g->slot[i].done, cudaEventDisableTiming);
    int rc = e != cudaSuccess ? cg_cuda_err(err, e, "start the device") : 0;
    if (!rc && g->learned) rc = cg_upload_learned(g, err);
    if (rc) {
        codec_gpu_free(g);
        return rc;
    }
    *out = g;
    return 0;
}

extern "C" int codec_gpu_sync(codec_gpu_ctx *g, void *stream, kp_err *err) {
    if (!g) return kp_errf(err, KP_EINVAL, "codec_gpu_sync: context is NULL");
    CG_TRY(cudaStreamSynchronize(cg_stream(g, stream)), "wait for the stream");
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Batches                                                                */
/* ---------------------------------------------------------------------- */

/* Jobs for n chunks (host), blocks of rows_per_block rows; checks every
 * chunk. *n_blocks: total blocks; for encode (scratch != NULL) also lays
 * out the scratch of each chunk from the device block `scratch` (NULL to
 * size it: *scratch_bytes). */
static int cg_make_jobs(codec_gpu_ctx *g, int n, const codec_gpu_chunk *ch, int rows_per_block, cg_job *jobs,
                        int64_t *n_blocks, size_t *max_ncode, uint8_t *scratch, size_t *scratch_bytes,
                        const char *what, kp_err *err) {
    const codec *c = g->c;
    int64_t blocks = 0;
    size_t sb = 0;
    *max_ncode = 0;
    for (int k = 0; k < n; k++) {
        const codec_chunk *d = &ch[k].desc;
        if (d->n < 1 || d->n > 65535)
            return kp_errf(err, KP_EINVAL, "codec gpu %s: chunk %d has %d rows (must be 1..65535)", what, k, d->n);
        if (d->kv_type != KP_TYPE_F32 && d->kv_type != KP_TYPE_F16 && d->kv_type != KP_TYPE_BF16)
            return kp_errf(err, KP_EUNSUP, "codec gpu %s: chunk %d: element type %d is not F32, F16 or BF16",
                           what, k, d->kv_type);
        if (!ch[k].payload || !ch[k].rows)
            return kp_errf(err, KP_EINVAL, "codec gpu %s: chunk %d: payload or rows is NULL", what, k);
        if (g->learned && (d->layer < 0 || d->layer >= c->shape.n_layer))
            return kp_errf(err, KP_EINVAL, "codec gpu %s: chunk %d: layer %d outside 0..%d", what, k, d->layer,
                           c->shape.n_layer - 1);
        cg_job *j = &jobs[k];
        memset(j, 0, sizeof *j);
        j->payload = (uint8_t *)ch[k].payload;
        j->rows = ch[k].rows;
        j->coder = g->learned ? 2 * d->layer + (d->is_v != 0) : (d->is_v != 0);
        j->is_v = d->is_v != 0, j->pos0 = d->pos0, j->n = d->n, j->kv_type = d->kv_type;
        j->block0 = (int)blocks;
        blocks += (d->n + rows_per_block - 1) / rows_per_block;
        if (g->learned) {
            const cg_coder *cd = &g->coders_host[j->coder];
            *max_ncode = KP_MAX(*max_ncode, ((size_t)d->n * cd->B + 7) / 8);
            const size_t nq = cg_align((size_t)d->n * cd->r), nz = g->lc.ranges ? 0 : cg_align((size_t)d->n * cd->r * 4);
            if (scratch) j->q = scratch + sb, j->z = nz ? (float *)(scratch + sb + nq) : NULL;
            sb += nq + nz;
        }
    }
    if (blocks > 0x7fffffff) return kp_errf(err, KP_ERANGE, "codec gpu %s: batch too large for one launch", what);
    *n_blocks = blocks;
    if (scratch_bytes) *scratch_bytes = sb;
    return 0;
}

/* A descriptor slot holding n jobs (g->mu held): waits for its last kernel. */
static int cg_slot_get(codec_gpu_ctx *g, int n, cg_slot **out, kp_err *err) {
    cg_slot *s = &g->slot[g->next_slot];
    g->next_slot = (g->next_slot + 1) % CG_SLOTS;
    CG_TRY(cudaEventSynchronize(s->done), "wait for a descriptor slot");
    if (s->cap < n) {
        cudaFreeHost(s->host);
        cudaFree(s->dev);
        s->host = s->dev = NULL;
        s->cap = 0;
        const int cap = KP_MAX(n, 64);
        CG_TRY(cudaMallocHost((void **)&s->host, (size_t)cap * sizeof(cg_job)), "allocate batch descriptors");
        CG_TRY(cudaMalloc((void **)&s->dev, (size_t)cap * sizeof(cg_job)), "allocate batch descriptors");
        s->cap = cap;
    }
    *out = s;
    return 0;
}

static int cg_launched(kp_err *err, const char *what) {
    CG_TRY(cudaGetLastError(), what);
    return 0;
}

/* Launch the kernels of a batch whose jobs are in s->dev (g->mu held). */
static int cg_launch(codec_gpu_ctx *g, int encode, int n, int64_t blocks, size_t max_ncode, const cg_slot *s,
                     cudaStream_t st, kp_err *err) {
    const size_t rope_sh = g->learned ? 2 * CG_ROWS * (size_t)g->lc.half * sizeof(float) : 0;
    if (!g->learned) {
        if (encode) cg_base_encode_k<<<(unsigned)blocks, CG_THREADS, 0, st>>>(g->geo, s->dev, n);
        else cg_base_decode_k<<<(unsigned)blocks, CG_THREADS, 0, st>>>(g->geo, s->dev, n);
        return cg_launched(err, encode ? "encode kernel" : "decode kernel");
    }
    if (!encode) {
        const dim3 grid((unsigned)blocks, cg_div_up((size_t)g->lc.H * g->lc.D, CG_THREADS));
        cg_lc_decode_k<<<grid, CG_THREADS, rope_sh, st>>>(g->lc, s->dev, n);
        return cg_launched(err, "decode kernel (pca/learned)");
    }
    const dim3 grid((unsigned)blocks, cg_div_up(g->max_r, CG_THREADS));
    cg_lc_project_k<<<grid, CG_THREADS, rope_sh, st>>>(g->lc, s->dev, n);
    int rc = cg_launched(err, "encode kernel (pca/learned projection)");
    if (!rc && !g->lc.ranges) {
        cg_lc_range_k<<<dim3(cg_div_up(g->max_r, CG_THREADS), (unsigned)n), CG_THREADS, 0, st>>>(g->lc, s->dev);
        rc = cg_launched(err, "encode kernel (pca/learned ranges)");
    }
    if (!rc) {
        cg_lc_pack_k<<<dim3(cg_div_up(max_ncode, CG_THREADS), (unsigned)n), CG_THREADS, 0, st>>>(g->lc, s->dev);
        rc = cg_launched(err, "encode kernel (pca/learned packing)");
    }
    return rc;
}

/* Build the jobs, copy them, launch (g->mu held). */
static int cg_batch_locked(codec_gpu_ctx *g, int encode, int n, const codec_gpu_chunk *ch, cudaStream_t st,
                           kp_err *err) {
    const char *what = encode ? "encode" : "decode";
    const int rows_pb = encode && !g->learned ? CG_ENC_ROWS : CG_ROWS;
    cg_slot *s = NULL;
    int rc = cg_slot_get(g, n, &s, err);
    if (rc) return rc;
    int64_t blocks;
    size_t max_ncode, scratch_bytes = 0;
    uint8_t *scratch = NULL;
    if (encode && g->learned) { /* size, allocate (stream-ordered), then lay out the scratch */
        rc = cg_make_jobs(g, n, ch, rows_pb, s->host, &blocks, &max_ncode, NULL, &scratch_bytes, what, err);
        if (rc) return rc;
        CG_TRY(cudaMallocAsync((void **)&scratch, scratch_bytes ? scratch_bytes : 16, st), "allocate encode scratch");
    }
    rc = cg_make_jobs(g, n, ch, rows_pb, s->host, &blocks, &max_ncode, scratch, NULL, what, err);
    cudaError_t e = rc ? cudaSuccess
                       : cudaMemcpyAsync(s->dev, s->host, (size_t)n * sizeof(cg_job), cudaMemcpyHostToDevice, st);
    if (!rc && e != cudaSuccess) rc = cg_cuda_err(err, e, "copy batch descriptors");
    if (!rc) {
        rc = cg_launch(g, encode, n, blocks, max_ncode, s, st, err);
        /* the slot's pinned jobs are being copied: mark it busy until then, whatever happened */
        e = cudaEventRecord(s->done, st);
        if (!rc && e != cudaSuccess) rc = cg_cuda_err(err, e, "record a batch event");
    }
    if (scratch) cudaFreeAsync(scratch, st);
    return rc;
}

static int cg_batch(codec_gpu_ctx *g, int encode, int n, const codec_gpu_chunk *ch, void *stream, kp_err *err) {
    if (!g || (n > 0 && !ch)) return kp_errf(err, KP_EINVAL, "codec gpu: context or chunks is NULL");
    if (n < 0) return kp_errf(err, KP_EINVAL, "codec gpu: %d chunks", n);
    if (n == 0) return 0;
    if (encode && n > 65535)
        return kp_errf(err, KP_ERANGE, "codec gpu encode: %d chunks in one batch (at most 65535)", n);
    cudaError_t e = cudaSetDevice(g->device);
    if (e != cudaSuccess) return cg_cuda_err(err, e, "select the device");
    pthread_mutex_lock(&g->mu);
    const int rc = cg_batch_locked(g, encode, n, ch, cg_stream(g, stream), err);
    pthread_mutex_unlock(&g->mu);
    return rc;
}

extern "C" int codec_gpu_decode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks, void *stream,
                                      kp_err *err) {
    return cg_batch(g, 0, n_chunks, chunks, stream, err);
}

extern "C" int codec_gpu_encode_batch(codec_gpu_ctx *g, int n_chunks, const codec_gpu_chunk *chunks, void *stream,
                                      kp_err *err) {
    return cg_batch(g, 1, n_chunks, chunks, stream, err);
}

extern "C" int codec_gpu_encode_to_host(codec_gpu_ctx *g, const codec_chunk *ch, const void *d_rows, uint8_t *out,
                                        size_t cap, size_t *out_len, kp_err *err) {
    if (!g || !ch || !d_rows || !out) return kp_errf(err, KP_EINVAL, "codec_gpu_encode_to_host: NULL argument");
    const codec *c = g->c;
    if (g->learned && (ch->layer < 0 || ch->layer >= c->shape.n_layer))
        return kp_errf(err, KP_EINVAL, "codec gpu encode: layer %d outside 0..%d", ch->layer, c->shape.n_layer - 1);
    const size_t total = codec_chunk_bytes_at(c, ch->n, ch->kv_type, ch->is_v, ch->layer);
    if (total == 0)
        return kp_errf(err, KP_EINVAL, "codec gpu encode: a chunk of %d rows of element type %d cannot be encoded",
                       ch->n, ch->kv_type);
    if (cap < total)
        return kp_errf(err, KP_ERANGE, "codec gpu encode: output holds %zu bytes, the chunk needs %zu", cap, total);
    const size_t plen = total - CODEC_CHUNK_HEADER_BYTES;
    CG_TRY(cudaSetDevice(g->device), "select the device");
    void *pay = NULL;
    CG_TRY(cudaMallocAsync(&pay, plen, g->stream), "allocate the payload");
    codec_gpu_chunk gc = {*ch, pay, (void *)d_rows};
    int rc = codec_gpu_encode_batch(g, 1, &gc, NULL, err);
    cudaError_t e = rc ? cudaSuccess : cudaMemcpyAsync(out + CODEC_CHUNK_HEADER_BYTES, pay, plen, cudaMemcpyDeviceToHost, g->stream);
    cudaFreeAsync(pay, g->stream);
    if (e == cudaSuccess) e = cudaStreamSynchronize(g->stream);
    if (rc) return rc;
    if (e != cudaSuccess) return cg_cuda_err(err, e, "download the payload");
    codec_gpu_seal_chunk(c, ch, out, plen);
    if (out_len) *out_len = total;
    return 0;
}

/* ---------------------------------------------------------------------- */
/* Pinned staging pool                                                    */
/* ---------------------------------------------------------------------- */

struct codec_gpu_staging {
    int n;
    size_t bytes;
    void **buf;        /* [n] pinned */
    unsigned char *out; /* [n] 1 while acquired */
    pthread_mutex_t mu;
};

extern "C" void codec_gpu_staging_free(codec_gpu_staging *s) {
    if (!s) return;
    for (int i = 0; i < s->n; i++) cudaFreeHost(s->buf[i]);
    (void)cudaGetLastError();
    pthread_mutex_destroy(&s->mu);
    free(s->buf);
    free(s->out);
    free(s);
}

extern "C" int codec_gpu_staging_new(codec_gpu_staging **out, int n_buffers, size_t buffer_bytes, kp_err *err) {
    if (!out) return kp_errf(err, KP_EINVAL, "codec_gpu_staging_new: out is NULL");
    *out = NULL;
    if (n_buffers < 1 || n_buffers > 1024 || buffer_bytes < 16)
        return kp_errf(err, KP_EINVAL, "codec gpu staging: %d buffers of %zu bytes (want 1..1024 of >= 16)",
                       n_buffers, buffer_bytes);
    const char *why = NULL;
    if (kp_cuda_device_count(&why) <= 0)
        return kp_errf(err, KP_EUNSUP, "codec gpu staging: no CUDA device (%s)", why);
    codec_gpu_staging *s = (codec_gpu_staging *)calloc(1, sizeof *s);
    if (!s) return kp_errf(err, KP_ENOMEM, "codec gpu staging: out of memory");
    pthread_mutex_init(&s->mu, NULL);
    s->bytes = buffer_bytes;
    s->buf = (void **)calloc(n_buffers, sizeof(void *));
    s->out = (unsigned char *)calloc(n_buffers, 1);
    if (!s->buf || !s->out) {
        codec_gpu_staging_free(s);
        return kp_errf(err, KP_ENOMEM, "codec gpu staging: out of memory");
    }
    for (; s->n < n_buffers; s->n++) {
        cudaError_t e = cudaMallocHost(&s->buf[s->n], buffer_bytes);
        if (e != cudaSuccess) {
            codec_gpu_staging_free(s);
            return cg_cuda_err(err, e, "allocate pinned staging memory");
        }
    }
    *out = s;
    return 0;
}

extern "C" size_t codec_gpu_staging_buffer_bytes(const codec_gpu_staging *s) { return s ? s->bytes : 0; }

extern "C" int codec_gpu_staging_n_free(codec_gpu_staging *s) {
    if (!s) return 0;
    pthread_mutex_lock(&s->mu);
    int n = 0;
    for (int i = 0; i < s->n; i++) n += !s->out[i];
    pthread_mutex_unlock(&s->mu);
    return n;
}

extern "C" int codec_gpu_staging_acquire(codec_gpu_staging *s, void **buf, kp_err *err) {
    if (!s || !buf) return kp_errf(err, KP_EINVAL, "codec_gpu_staging_acquire: NULL argument");
    *buf = NULL;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n && !*buf; i++)
        if (!s->out[i]) s->out[i] = 1, *buf = s->buf[i];
    pthread_mutex_unlock(&s->mu);
    if (!*buf)
        return kp_errf(err, KP_EBUSY, "codec gpu staging: all %d pinned buffers are in use; release one first", s->n);
    return 0;
}

extern "C" void codec_gpu_staging_release(codec_gpu_staging *s, void *buf) {
    if (!s || !buf) return;
    pthread_mutex_lock(&s->mu);
    for (int i = 0; i < s->n; i++)
        if (s->buf[i] == buf) s->out[i] = 0;
    pthread_mutex_unlock(&s->mu);
}

/* ---------------------------------------------------------------------- */
/* Pipelined restore                                                      */
/* ---------------------------------------------------------------------- */

struct cg_rslot {
    uint8_t *host; /* pinned, from the pool */
    void *dev;
    cudaEvent_t copied, decoded;
};

struct codec_gpu_restore {
    codec_gpu_ctx *g;
    codec_gpu_staging *pool;
    cudaStream_t copy, compute;
    int n_layers;
    cudaEvent_t *ready;       /* [n_layers] */
    unsigned char *submitted; /* [n_layers] */
    cg_rslot slot[CG_RESTORE_SLOTS];
    int n_slots, next;
    size_t cap;             /* bytes per slot */
    codec_gpu_chunk *batch; /* host scratch for decode_batch */
    int batch_cap;
};

extern "C" int codec_gpu_restore_end(codec_gpu_restore *r, kp_err *err) {
    if (!r) return 0;
    cudaSetDevice(r->g->device);
    cudaError_t e = cudaSuccess, e2;
    if (r->copy && (e2 = cudaStreamSynchronize(r->copy)) != cudaSuccess) e = e2;
    if (r->compute && (e2 = cudaStreamSynchronize(r->compute)) != cudaSuccess && e == cudaSuccess) e = e2;
    for (int i = 0; i < r->n_slots; i++) {
        cg_rslot *s = &r->slot[i];
        if (s->copied) cudaEventDestroy(s->copied);
        if (s->decoded) cudaEventDestroy(s->decoded);
        cudaFree(s->dev);
        codec_gpu_staging_release(r->pool, s->host);
    }
    for (int l = 0; r->ready && l < r->n_layers; l++)
        if (r->ready[l]) cudaEventDestroy(r->ready[l]);
    if (r->copy) cudaStreamDestroy(r->copy);
    if (r->compute) cudaStreamDestroy(r->compute);
    free(r->ready);
    free(r->submitted);
    free(r->batch);
    free(r);
    return e != cudaSuccess ? cg_cuda_err(err, e, "finish the restore") : 0;
}

extern "C" int codec_gpu_restore_begin(codec_gpu_restore **out, codec_gpu_ctx *g, codec_gpu_staging *pool,
                                       int max_buffers, kp_err *err) {
    if (!out || !g || !pool) return kp_errf(err, KP_EINVAL, "codec_gpu_restore_begin: NULL argument");
    *out = NULL;
    if (max_buffers < 1) return kp_errf(err, KP_EINVAL, "codec gpu restore: max_buffers %d (want >= 1)", max_buffers);
    CG_TRY(cudaSetDevice(g->device), "select the device");
    codec_gpu_restore *r = (codec_gpu_restore *)calloc(1, sizeof *r);
    if (!r) return kp_errf(err, KP_ENOMEM, "codec gpu restore: out of memory");
    r->g = g, r->pool = pool, r->cap = codec_gpu_staging_buffer_bytes(pool);
    r->n_layers = KP_MAX(g->c->shape.n_layer, 1);
    r->ready = (cudaEvent_t *)calloc(r->n_layers, sizeof(cudaEvent_t));
    r->submitted = (unsigned char *)calloc(r->n_layers, 1);
    int rc = 0;
    if (!r->ready || !r->submitted) rc = kp_errf(err, KP_ENOMEM, "codec gpu restore: out of memory");
    cudaError_t e = cudaSuccess;
    if (!rc) e = cudaStreamCreateWithFlags(&r->copy, cudaStreamNonBlocking);
    if (!rc && e == cudaSuccess) e = cudaStreamCreateWithFlags(&r->compute, cudaStreamNonBlocking);
    for (int l = 0; !rc && e == cudaSuccess && l < r->n_layers; l++)
        e = cudaEventCreateWithFlags(&r->ready[l], cudaEventDisableTiming);
    for (int i = 0; !rc && e == cudaSuccess && i < KP_MIN(max_buffers, CG_RESTORE_SLOTS); i++) {
        void *h = NULL;
        if (codec_gpu_staging_acquire(pool, &h, NULL)) break; /* fewer buffers free: use what is there */
        cg_rslot *s = &r->slot[r->n_slots++];
        s->host = (uint8_t *)h;
        e = cudaMalloc(&s->dev, r->cap);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s->copied, cudaEventDisableTiming);
        if (e == cudaSuccess) e = cudaEventCreateWithFlags(&s->decoded, cudaEventDisableTiming);
    }
    if (!rc && e != cudaSuccess) rc = cg_cuda_err(err, e, "start the restore");
    if (!rc && r->n_slots == 0)
        rc = kp_errf(err, KP_EBUSY, "codec gpu restore: no free staging buffer in the pool");
    if (rc) {
        codec_gpu_restore_end(r, NULL);
        return rc;
    }
    *out = r;
    return 0;
}

/* Copy slot s's first `bytes` bytes and decode its k chunks (r->batch). */
static int cg_restore_flush(codec_gpu_restore *r, cg_rslot *s, int k, size_t bytes, kp_err *err) {
    CG_TRY(cudaStreamWaitEvent(r->copy, s->decoded, 0), "order the copy after the slot's last decode");
    CG_TRY(cudaMemcpyAsync(s->dev, s->host, bytes, cudaMemcpyHostToDevice, r->copy), "copy payloads to the device");
    CG_TRY(cudaEventRecord(s->copied, r->copy), "record a copy event");
    CG_TRY(cudaStreamWaitEvent(r->compute, s->copied, 0), "order the decode after its copy");
    int rc = codec_gpu_decode_batch(r->g, k, r->batch, r->compute, err);
    if (rc) return rc;
    CG_TRY(cudaEventRecord(s->decoded, r->compute), "record a decode event");
    return 0;
}

extern "C" int codec_gpu_restore_layer(codec_gpu_restore *r, int layer, int n, const codec_gpu_host_chunk *chunks,
                                       kp_err *err) {
    if (!r || (n > 0 && !chunks) || n < 0) return kp_errf(err, KP_EINVAL, "codec_gpu_restore_layer: bad arguments");
    if (layer < 0 || layer >= r->n_layers)
        return kp_errf(err, KP_EINVAL, "codec gpu restore: layer %d outside 0..%d", layer, r->n_layers - 1);
    const codec *c = r->g->c;
    for (int k = 0; k < n; k++) {
        const codec_gpu_host_chunk *hc = &chunks[k];
        if (hc->desc.layer != layer)
            return kp_errf(err, KP_EINVAL, "codec gpu restore: chunk %d is for layer %d, submitted for layer %d", k,
                           hc->desc.layer, layer);
        int rc = codec_gpu_check_chunk(c, &hc->desc, hc->bytes, hc->len, err);
        if (rc) return rc;
        if (hc->len - CODEC_CHUNK_HEADER_BYTES > r->cap)
            return kp_errf(err, KP_ERANGE,
                           "codec gpu restore: a chunk of %zu bytes does not fit a staging buffer of %zu bytes",
                           hc->len, r->cap);
    }
    if (n > r->batch_cap) {
        codec_gpu_chunk *b = (codec_gpu_chunk *)realloc(r->batch, (size_t)n * sizeof *b);
        if (!b) return kp_errf(err, KP_ENOMEM, "codec gpu restore: out of memory");
        r->batch = b, r->batch_cap = n;
    }
    CG_TRY(cudaSetDevice(r->g->device), "select the device");
    cg_rslot *s = NULL;
    int k = 0;
    size_t used = 0;
    for (int i = 0; i < n; i++) {
        const size_t plen = chunks[i].len - CODEC_CHUNK_HEADER_BYTES;
        if (!s || used + plen > r->cap) {
            if (s) {
                int rc = cg_restore_flush(r, s, k, used, err);
                if (rc) return rc;
            }
            s = &r->slot[r->next];
            r->next = (r->next + 1) % r->n_slots;
            CG_TRY(cudaEventSynchronize(s->copied), "wait for a staging buffer"); /* its last copy is done */
            k = 0, used = 0;
        }
        memcpy(s->host + used, chunks[i].bytes + CODEC_CHUNK_HEADER_BYTES, plen);
        r->batch[k].desc = chunks[i].desc;
        r->batch[k].payload = (uint8_t *)s->dev + used;
        r->batch[k].rows = chunks[i].rows;
        k++, used += plen;
    }
    if (s) {
        int rc = cg_restore_flush(r, s, k, used, err);
        if (rc) return rc;
    }
    CG_TRY(cudaEventRecord(r->ready[layer], r->compute), "record the layer's event");
    r->submitted[layer] = 1;
    return 0;
}

static int cg_restore_check_layer(codec_gpu_restore *r, int layer, kp_err *err) {
    if (!r) return kp_errf(err, KP_EINVAL, "codec gpu restore: NULL restore");
    if (layer < 0 || layer >= r->n_layers || !r->submitted[layer])
        return kp_errf(err, KP_EINVAL, "codec gpu restore: layer %d was not submitted", layer);
    return 0;
}

extern "C" int codec_gpu_restore_layer_ready(codec_gpu_restore *r, int layer, kp_err *err) {
    int rc = cg_restore_check_layer(r, layer, err);
    if (rc) return rc;
    cudaError_t e = cudaEventQuery(r->ready[layer]);
    if (e == cudaErrorNotReady) {
        (void)cudaGetLastError();
        return 0;
    }
    if (e != cudaSuccess) return cg_cuda_err(err, e, "query a layer");
    return 1;
}

extern "C" int codec_gpu_restore_wait_layer(codec_gpu_restore *r, int layer, kp_err *err) {
    int rc = cg_restore_check_layer(r, layer, err);
    if (rc) return rc;
    CG_TRY(cudaEventSynchronize(r->ready[layer]), "wait for a layer");
    return 0;
}

extern "C" int codec_gpu_restore_stream_wait(codec_gpu_restore *r, int layer, void *stream, kp_err *err) {
    int rc = cg_restore_check_layer(r, layer, err);
    if (rc) return rc;
    CG_TRY(cudaStreamWaitEvent((cudaStream_t)stream, r->ready[layer], 0), "make a stream wait for a layer");
    return 0;
}
