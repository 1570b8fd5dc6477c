/*
 * bench_gpu.h — `kvpark bench gpu`: the device's physical copy ceilings and
 * the fused codec decode kernel's throughput next to them.
 *
 * Why it exists: a warm resume is bounded by the host-to-device copy of the
 * compressed bytes plus the decode kernel that expands them in the KV cache.
 * This measures both against what the hardware can do at all (H2D, D2H and
 * D2D cudaMemcpy from page-locked memory), so a resume time can be read as
 * "x % of the ceiling" rather than as a bare number.
 *
 * Contract
 *   - bench_gpu_main(argc, argv), argv[0] = "gpu": options
 *     [-m MODEL] [--codec fp16,int8,int4,kivi2,FILE...] [--tokens 4096]
 *     [--kv-type f16|bf16|f32] [--copy-bytes 256M] [-r 10] [--gpu 0]
 *     [--csv FILE] [--plot FILE.png]; --help prints the usage.
 *   - The model is loaded on the CPU (its weights are not used: only the KV
 *     shape, for the codec). For each codec, --tokens rows of every layer's
 *     K and V (deterministic pseudo-random values) are encoded on the CPU in
 *     the default parking chunks (LAYOUT_DEFAULT_CHUNK rows), the payloads
 *     are uploaded once, and ONE codec_gpu_decode_batch launch decoding all
 *     of them into the cache is timed (host clock around launch + sync,
 *     median of -r after a warm-up). The first repeat's output is checked
 *     against codec_decode on the CPU (every chunk, byte for byte for the
 *     baselines, a relative bound for pca/learned); a mismatch fails the run.
 *   - GB/s: copies count bytes copied per second; "traffic" counts bytes
 *     read plus bytes written (2x the bytes for a copy, payload + rows for a
 *     decode), and "vs D2D" is a decode's traffic over the D2D copy's.
 *   - Prints a markdown table, writes the CSV (default bench-out/gpu.csv)
 *       device,test,codec,kv_type,tokens,bytes_in,bytes_out,repeats,
 *       median_ms,min_ms,max_ms,gbps,traffic_gbps,vs_d2d,check
 *     and, with --plot, a bar chart of traffic GB/s (gnuplot).
 *   - Returns 0; 1 on a runtime error, including "no CUDA device" (a build
 *     without CUDA, or no GPU: the message says which); 2 on bad usage.
 *     Usage is checked before any device call.
 */
#ifndef KP_BENCH_GPU_H
#define KP_BENCH_GPU_H

/* Entry point of `kvpark bench gpu ...` (argv[0] = "gpu"). */
int bench_gpu_main(int argc, char **argv);

#endif
