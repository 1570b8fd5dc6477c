/*
 * bench_codec.h — `kvpark bench codec`: size and quality of every KV codec
 * on the same model and text, as `kvpark ppl --codec` measures one.
 *
 * Why it exists: choosing a codec is a trade of stored bytes against what a
 * parked-and-resumed conversation loses; this puts the baselines and the
 * calibrated learned/pca codecs in one table, with where their bits go.
 *
 * Contract
 *   - bench_codec_main(argc, argv), argv[0] = "codec":
 *     `-f EVALTEXT [--calib CALIBTEXT] [--bits 1,1.25,1.5,2,3,4,8]
 *     [--max-dppl P] [--csv FILE] [--plot FILE.png]` plus the quality
 *     options of tools/cli.h (-m, -c, --chunks, --park-every, --sink,
 *     --window, --chunk, --kv-type, -t), with its own defaults (why:
 *     bench_codec.c): -c min(512, the model's training context), --window 8,
 *     --sink 0, --kv-type f16 (llama.cpp's default cache; lossless rows are
 *     stored at the cache's type, so the ratio vs fp16 of codec "none" is
 *     ~1). Prints a markdown table (bits/value, ratio vs fp16, delta ppl %,
 *     top-1 agreement, KL, encode and decode GB/s), a table of where the
 *     stored bits go (lossless rows, coded chunks, headers, LZ4 savings),
 *     writes the CSV and a gnuplot PNG of KL vs ratio (log scales) when asked.
 *     --help prints the usage. Returns 0, 1 on a runtime error (message on
 *     stderr), 2 on bad usage. getopt is fully reset first.
 */
#ifndef KP_BENCH_CODEC_H
#define KP_BENCH_CODEC_H

/* Entry point of `kvpark bench codec ...` (argv[0] = "codec"). */
int bench_codec_main(int argc, char **argv);

#endif
