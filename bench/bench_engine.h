/*
 * bench_engine.h — `kvpark bench engine`: prefill and decode speed of the
 * engine alone, like llama-bench.
 *
 * Why it exists: the engine's own tokens/s, comparable with llama-bench's pp
 * and tg tests on the same model and machine, before HTTP, batching and
 * sessions add their costs.
 *
 * Contract
 *   - bench_engine_main(argc, argv), argv[0] = "engine": parses options
 *     (-m, -p LIST, -n LIST, -d LIST (depths: tokens already in the context,
 *     prefilled untimed, like llama-bench's -d; default 0), -r 1..1000, --threads-list LIST, --kv-type,
 *     --device, --csv FILE; default CSV bench-out/engine.csv), loads the
 *     model once per thread count, prints a markdown table of
 *     pN / tgN tokens/s ("ppN @ dD" at a depth; median, min, max of -r repeats after a warm-up)
 *     and writes the CSV
 *       model,test,threads,kv_type,tokens,repeats,median_tok_s,min_tok_s,max_tok_s,depth
 *     Returns 0, 1 on a runtime error (message on stderr), 2 on bad usage.
 */
#ifndef KP_BENCH_ENGINE_H
#define KP_BENCH_ENGINE_H

/* Entry point of `kvpark bench engine ...` (argv[0] = "engine"). */
int bench_engine_main(int argc, char **argv);

#endif
