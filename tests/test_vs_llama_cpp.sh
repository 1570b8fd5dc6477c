#!/usr/bin/env bash
# test_vs_llama_cpp.sh — bench/vs-llama-cpp.sh without llama.cpp: a fake
# llama-bench that answers in llama-bench's CSV format (the columns v0.5.0
# writes) with known rates per round, and the real kvpark (wrapped to log
# its calls) on stories260K. Checks: the two engines alternate who goes
# first, every test x depth x threads row is there, the llama.cpp column is
# the median over rounds, the ratio is kvpark / llama.cpp, bad options are
# usage errors.
# Ends with "N passed, N failed"; exit status 1 on any failure.
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KVPARK_BIN:-$repo/build/kvpark}"
shared="${KVPARK_SHARED:-$repo/../shared}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kvpark-vs-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok - $what"; else fail=$((fail + 1)); echo "not ok - $what"; fi
}
model="$shared/models/stories260K.gguf"
if [ ! -f "$model" ]; then echo "not ok - no $model (set KVPARK_SHARED)"; echo "0 passed, 1 failed"; exit 1; fi

# fake llama-bench: rate = 1000 * round for pp, 100 * round for tg (+ depth),
# so over rounds 1, 2, 3 the medians are 2000 and 200 (+ depth)
cat >"$tmp/llama-bench" <<'FAKE'
#!/usr/bin/env bash
log="$(dirname "$0")/calls"
case " $* " in *" -n 0 "*) exit 0 ;; esac # the script's probe run: not a round
echo "llama $*" >>"$log"
round=$(grep -c '^llama' "$log")
while [ $# -gt 0 ]; do
  case $1 in -p) p=$2;; -n) n=$2;; -d) d=$2;; -t) t=$2;; esac; shift
done
echo 'build_commit,build_number,cpu_info,gpu_info,backends,model_filename,model_type,model_size,model_n_params,n_batch,n_ubatch,n_threads,cpu_mask,cpu_strict,poll,type_k,type_v,n_gpu_layers,n_cpu_moe,split_mode,main_gpu,no_kv_offload,flash_attn,devices,tensor_split,tensor_buft_overrides,load_mode,lazy_mode,embeddings,no_op_offload,no_host,fit_target,fit_min_ctx,n_prompt,n_gen,n_depth,test_time,avg_ns,stddev_ns,avg_ts,stddev_ts'
for th in ${t//,/ }; do for dd in ${d//,/ }; do
  for pp in ${p//,/ }; do echo "\"x\",\"1\",\"cpu\",\"\",\"CPU\",\"m\",\"t\",\"1\",\"1\",\"2048\",\"512\",\"$th\",\"0x0\",\"0\",\"50\",\"f16\",\"f16\",\"-1\",\"0\",\"layer\",\"0\",\"0\",\"-1\",\"auto\",\"0.00\",\"none\",\"auto\",\"auto\",\"0\",\"0\",\"0\",\"0\",\"0\",\"$pp\",\"0\",\"$dd\",\"now\",\"1\",\"0\",\"$((1000 * round + dd)).000000\",\"0\""; done
  for tg in ${n//,/ }; do echo "\"x\",\"1\",\"cpu\",\"\",\"CPU\",\"m\",\"t\",\"1\",\"1\",\"2048\",\"512\",\"$th\",\"0x0\",\"0\",\"50\",\"f16\",\"f16\",\"-1\",\"0\",\"layer\",\"0\",\"0\",\"-1\",\"auto\",\"0.00\",\"none\",\"auto\",\"auto\",\"0\",\"0\",\"0\",\"0\",\"0\",\"0\",\"$tg\",\"$dd\",\"now\",\"1\",\"0\",\"$((100 * round + dd)).000000\",\"0\""; done
done; done
FAKE
cat >"$tmp/kvpark" <<FAKE
#!/usr/bin/env bash
[ "\$1" = bench ] && echo "kvpark \$*" >>"$tmp/calls"
exec "$bin" "\$@"
FAKE
chmod +x "$tmp/llama-bench" "$tmp/kvpark"

vs="$repo/bench/vs-llama-cpp.sh"
bash "$vs" -m "$model" -t 1 -p 16 -n 4 -d 0,8 -r 3 --kvpark "$tmp/kvpark" --llama-bench "$tmp/llama-bench" \
  --out "$tmp/out" >"$tmp/table" 2>"$tmp/err"
st=$?
check "runs (status $st)" test "$st" -eq 0 || { cat "$tmp/err"; }
order=$(cut -d' ' -f1 "$tmp/calls" | tr '\n' ' ')
check "engines alternate who goes first (order: $order)" test "$order" = "llama kvpark kvpark llama llama kvpark "
csv="$tmp/out/vs-llama-cpp.csv"
check "CSV written with its header" test "$(head -1 "$csv" 2>/dev/null)" = "model,test,depth,threads,rounds,llama_cpp_tok_s,kvpark_tok_s,ratio"
check "one row per test x depth x threads" test "$(tail -n +2 "$csv" | cut -d, -f2-4 | tr '\n' ' ')" = "pp16,0,1 pp16,8,1 tg4,0,1 tg4,8,1 "
# the medians of the fake rates, and the ratio from the two medians
check "llama.cpp column is the median over rounds" test "$(tail -n +2 "$csv" | cut -d, -f6 | tr '\n' ' ')" = "2000.00 2008.00 200.00 208.00 "
check "every row has 3 rounds" test "$(tail -n +2 "$csv" | cut -d, -f5 | sort -u)" = 3
check "ratio = kvpark / llama.cpp" python3 -c '
import csv, sys
rows = list(csv.DictReader(open(sys.argv[1])))
assert rows and all(float(r["kvpark_tok_s"]) > 0 for r in rows)
assert all(abs(float(r["ratio"]) - float(r["kvpark_tok_s"]) / float(r["llama_cpp_tok_s"])) < 2e-3 for r in rows)' "$csv"
check "markdown table printed" grep -q '^| stories260K.gguf | tg4 | 8 | 1 |' "$tmp/table"

bash "$vs" -r 0 --llama-bench "$tmp/llama-bench" >/dev/null 2>&1
check "-r 0 is a usage error (2)" test $? -eq 2
bash "$vs" -t 1,x --llama-bench "$tmp/llama-bench" >/dev/null 2>&1
check "a bad list is a usage error (2)" test $? -eq 2
bash "$vs" --frobnicate >/dev/null 2>&1
check "an unknown option is a usage error (2)" test $? -eq 2

# a llama-bench that dies of SIGILL (AMX listed but not enabled) on the probe
printf '#!/bin/sh\nkill -ILL $$\n' >"$tmp/sigill-bench"
chmod +x "$tmp/sigill-bench"
bash "$vs" -m "$model" -r 1 --kvpark "$tmp/kvpark" --llama-bench "$tmp/sigill-bench" --out "$tmp/o2" >/dev/null 2>"$tmp/err2"
st=$?
check "a given llama-bench that dies of SIGILL: status 1 and why" sh -c "test $st -eq 1 && grep -q 'SIGILL' '$tmp/err2'"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
