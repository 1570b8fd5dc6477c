/*
 * bench_resume.h — `kvpark bench resume`: time-to-first-token of one new user
 * turn when a session of L tokens is re-prefilled from text, still hot in
 * memory, parked in the warm (RAM) tier, or parked in the cold (disk) tier
 * (the number this product exists for).
 *
 * Why it exists: parking only pays if resuming a session (fetch + decode its
 * KV, then prefill the new turn) beats recomputing it; this measures all four
 * paths on the same model, codecs and context lengths, plus the disk read
 * bandwidth seen in the same run, and derives the bandwidth below which a
 * smaller (but slower to decode) codec resumes faster than `none`.
 *
 * Contract
 *   - bench_resume_main(argc, argv), argv[0] = "resume": parses options,
 *     prints a markdown table on stdout, writes the CSV (--csv) and a PNG
 *     (--plot, with gnuplot when present). Returns 0, 1 on a runtime error
 *     (message on stderr), 2 on bad usage. May run more than once in a
 *     process (getopt is reset). Temporary cold-tier directories it creates
 *     are removed before it returns.
 *   - CSV columns (one row per context length and codec), in this order:
 *       model,ctx,codec,bytes_total,bytes_per_token,prefill_ms,hot_ms,warm_ms,
 *       cold_ms,speedup_hot,speedup_warm,speedup_cold,restore_warm_ms,
 *       restore_cold_ms,disk_read_mbps,cold_resident_pages,prefill_token,
 *       hot_token,warm_token,cold_token
 *     (*_token: greedy argmax of the first new token's logits on that path).
 */
#ifndef KP_BENCH_RESUME_H
#define KP_BENCH_RESUME_H

/* Entry point of `kvpark bench resume ...` (argv[0] = "resume"). */
int bench_resume_main(int argc, char **argv);

#endif
