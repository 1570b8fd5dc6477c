/*
 * bench_grammar.h — `kvpark bench grammar`: the per-decode-step cost of
 * constrained decoding (engine/grammar.h) on real vocabularies.
 *
 * Why it exists: the grammar mask runs on the scheduler thread before every
 * sampled token of a structured-output request, so it must stay a small
 * fraction of a decode step even on a 152K-token vocabulary (target: at most
 * 1 ms and 10 % of a 0.5B-shape decode step).
 *
 * Contract
 *   - bench_grammar_main(argc, argv), argv[0] = "grammar": options
 *     -m LIST (models, comma-separated; default
 *     ../shared/models/stories260K.gguf,../shared/models/tiny-gpt2.gguf,
 *     synthetic:qwen2.5-0.5b:Q8_0), -n STEPS per schema (default 300),
 *     --seed S, --decode-steps N (0 = do not time the model's decode step;
 *     default 8), -t THREADS for the decode timing, --csv FILE (default
 *     bench-out/grammar.csv).
 *   - For every model and schema (json_object, person, event, colors) it
 *     walks STEPS generation steps, each picking a uniformly random allowed
 *     token (restarting when the value is complete), and times one step's
 *     grammar work: gram_mask + gram_apply_mask + gram_state_accept_token.
 *     Prints a markdown table (median, p99, max in µs, the decode step in ms
 *     and the median as % of it) and writes the CSV
 *       model,n_vocab,schema,steps,median_us,p99_us,max_us,decode_ms
 *     (decode_ms 0 when not measured). Returns 0, 1 on a runtime error, 2 on
 *     bad usage.
 */
#ifndef KP_BENCH_GRAMMAR_H
#define KP_BENCH_GRAMMAR_H

int bench_grammar_main(int argc, char **argv);

#endif
