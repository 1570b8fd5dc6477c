/*
 * synth.h — `synthetic:NAME` models: GGUF files with the exact tensor shapes
 * and metadata of a real model (Llama-3-8B, Llama-3.2-1B, Qwen2.5-0.5B, ...)
 * and seeded random weights, so that time and memory can be measured at real
 * sizes where no weights are available. Quality is never measured on them.
 *
 * Contract
 *   - synth_names() lists the known names ("llama-3-8b", "llama-3.2-1b",
 *     "qwen2.5-0.5b", "qwen2.5-7b", "gpt2-124m", "stories260k-shape", ...).
 *   - synth_write(name, type, seed, path) writes a complete, loadable GGUF
 *     (architecture keys, a byte-level or SPM vocabulary of the right size with
 *     synthetic token texts, all tensors) with weights of `type` (F32, F16,
 *     BF16, Q8_0, Q4_0, Q4_K, Q6_K; norms always F32), values ~ N(0, 0.02)
 *     (norm weights 1), deterministic for a seed. Large files are written
 *     tensor by tensor, never held whole in memory.
 *   - An unknown name is KP_ENOTFOUND with the list of known names.
 *   - A matrix whose row length is not a multiple of the type's block size
 *     gets a fallback type, as llama-quantize does (Q4_K -> Q4_0, Q6_K ->
 *     Q8_0 when the row is a multiple of 32, else F16): e.g. Qwen2.5-0.5B's
 *     896-wide rows at Q4_K.
 *   - "tiny-llama-256-shape", "tiny-qwen2-shape", "tiny-gpt2-shape" mirror
 *     the small models in ../shared/models (used by tests). Llama-3.2-1B's
 *     context_length is written as 8192 (the real 131072 only sizes the KV
 *     cache) and its rope-scaling tensor rope_freqs.weight is omitted.
 */
#ifndef KP_SYNTH_H
#define KP_SYNTH_H

#include <stdint.h>

#include "kernels/kp.h"

const char *const *synth_names(void); /* NULL-terminated */
int synth_write(const char *name, int type, uint64_t seed, const char *path, kp_err *err);
/* Estimated file size in bytes for name at type (for "will it fit" checks). */
int64_t synth_size(const char *name, int type);

#endif
