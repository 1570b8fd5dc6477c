#!/usr/bin/env bash
# vs-llama-cpp.sh — kvpark's engine next to llama.cpp's llama-bench on the
# same GGUF file, on this machine, in one run.
#
# Why: the engine's speed only means something next to the best peer's on
# the same file and CPU. Each round runs llama-bench once and
# `kvpark bench engine` once (-r 1 each), swapping which goes first every
# round, so a noisy machine (another job, turbo, thermal) hurts both alike;
# the table gives the median over rounds of each and the ratio
# kvpark / llama.cpp (above 1: kvpark is faster).
#
# llama.cpp is only a reference to measure against: it is built from the
# source tag v0.5.0 shipped in the npm package node-llama-cpp (a git bundle
# in its llama/ folder), in a scratch directory outside the repository
# ($KVPARK_LLAMA_DIR, default ~/.cache/kvpark-llama.cpp), CPU only, native.
# None of its code is part of kvpark. Needs npm, git, cmake and a C++
# compiler for that build (once), python3 for the table.
#
# Usage: bench/vs-llama-cpp.sh [-m MODEL]... [-t 1,2] [-p 128,512] [-n 128]
#            [-d 0] [-r 5] [--kv-type f16] [--kvpark PATH] [--llama-bench PATH]
#            [--out DIR]
#   MODEL: a GGUF path or synthetic:NAME[:TYPE] (the file kvpark writes for it
#   is handed to both engines). Default: synthetic:llama-3.2-1b:q8_0.
# Writes DIR/vs-llama-cpp.csv (default bench-out/) and prints a markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."

models=() threads=1,2 pp=128,512 tg=128 depth=0 rounds=5 kvt=f16 out=bench-out
kvpark=${KVPARK_BIN:-} llama_bench=${LLAMA_BENCH:-}
NLC_VERSION=3.22.1 # node-llama-cpp whose llama/ bundle holds llama.cpp tag v0.5.0
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit "${1:-0}"; }
while [ $# -gt 0 ]; do
  case $1 in
    -m) models+=("$2"); shift 2 ;;
    -t) threads=$2; shift 2 ;;
    -p) pp=$2; shift 2 ;;
    -n) tg=$2; shift 2 ;;
    -d) depth=$2; shift 2 ;;
    -r) rounds=$2; shift 2 ;;
    --kv-type) kvt=$2; shift 2 ;;
    --kvpark) kvpark=$2; shift 2 ;;
    --llama-bench) llama_bench=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    -h|--help) usage 0 ;;
    *) echo "vs-llama-cpp: unknown option '$1' (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#models[@]} -gt 0 ] || models=(synthetic:llama-3.2-1b:q8_0)
case $rounds in ''|*[!0-9]*|0) echo "vs-llama-cpp: -r wants a positive number" >&2; exit 2 ;; esac
for l in "$threads" "$pp" "$tg" "$depth"; do
  case $l in ''|*[!0-9,]*) echo "vs-llama-cpp: bad list '$l' (numbers separated by commas)" >&2; exit 2 ;; esac
done

if [ -z "$kvpark" ]; then
  for b in build/kvpark build-test/kvpark; do [ -x "$b" ] && { kvpark=$b; break; }; done
fi
[ -n "$kvpark" ] && [ -x "$kvpark" ] || { echo "vs-llama-cpp: no kvpark binary (build it, or --kvpark PATH)" >&2; exit 1; }

# llama-bench: given, found in the scratch build, or built there now.
# build_llama [noamx]: "noamx" builds a second copy without AMX code, for a
# CPU that lists AMX but whose kernel or hypervisor does not let programs
# use it (llama.cpp's AMX kernels then die of SIGILL on quantised weights).
build_llama() {
  local dir=${KVPARK_LLAMA_DIR:-$HOME/.cache/kvpark-llama.cpp}
  local bdir=build extra=()
  if [ "${1:-}" = noamx ]; then
    bdir=build-noamx
    extra=("-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
           "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16")
  fi
  local bin=$dir/llama.cpp/$bdir/bin/llama-bench
  if [ ! -x "$bin" ]; then
    echo "vs-llama-cpp: building llama-bench (llama.cpp from node-llama-cpp $NLC_VERSION) in $dir" >&2
    mkdir -p "$dir"
    ( cd "$dir"
      [ -f "node-llama-cpp-$NLC_VERSION.tgz" ] || npm pack --silent "node-llama-cpp@$NLC_VERSION" >/dev/null
      rm -rf package && tar xzf "node-llama-cpp-$NLC_VERSION.tgz"
      grep -q '"tag": "v0.5.0"' package/llama/llama.cpp.info.json ||
        echo "vs-llama-cpp: warning: node-llama-cpp $NLC_VERSION does not say llama.cpp tag v0.5.0" >&2
      [ -d llama.cpp ] || git clone -q package/llama/gitRelease.bundle llama.cpp
      cmake -S llama.cpp -B "llama.cpp/$bdir" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
        -DLLAMA_CURL=OFF -DGGML_CUDA=OFF "${extra[@]}" >"cmake-$bdir.log" 2>&1
      cmake --build "llama.cpp/$bdir" --target llama-bench -j "$(nproc)" >"build-$bdir.log" 2>&1
    ) || { echo "vs-llama-cpp: the llama.cpp build failed (logs in $dir)" >&2; exit 1; }
  fi
  llama_bench=$bin
}
[ -n "$llama_bench" ] || build_llama
[ -x "$llama_bench" ] || { echo "vs-llama-cpp: '$llama_bench' is not an executable" >&2; exit 1; }

# The GGUF file of each model (kvpark writes a synthetic model's file once).
files=()
for m in "${models[@]}"; do
  case $m in
    synthetic:*)
      spec=${m#synthetic:} name=${spec%%:*} type=f32
      [ "$name" != "$spec" ] && type=${spec#*:}
      type=$(printf '%s' "$type" | tr 'A-Z' 'a-z')
      "$kvpark" tokenize -m "$m" "x" >/dev/null || { echo "vs-llama-cpp: cannot make $m" >&2; exit 1; }
      f=${TMPDIR:-/tmp}/kvpark-synthetic-$name-$type.gguf ;;
    *) f=$m ;;
  esac
  [ -f "$f" ] || { echo "vs-llama-cpp: no model file '$f'" >&2; exit 1; }
  files+=("$f")
done

# A CPU that advertises AMX but does not allow it: llama.cpp's AMX kernels
# fault (SIGILL, status 132) on the first quantised matmul. Then use a build
# without AMX code, which is the best llama.cpp can do on this machine.
probe=0
"$llama_bench" -m "${files[0]}" -p 32 -n 0 -t 1 -r 1 -o csv >/dev/null 2>&1 || probe=$?
if [ "$probe" -eq 132 ]; then
  if [ -n "${LLAMA_BENCH:-}" ] || [[ "$llama_bench" != */llama.cpp/build/bin/llama-bench ]]; then
    echo "vs-llama-cpp: $llama_bench dies of SIGILL (AMX not usable here?): build it without AMX" >&2
    exit 1
  fi
  echo "vs-llama-cpp: llama.cpp's AMX kernels fault on this CPU (AMX listed, not enabled): using a build without AMX" >&2
  build_llama noamx
elif [ "$probe" -ne 0 ]; then
  echo "vs-llama-cpp: $llama_bench fails on ${files[0]} (status $probe)" >&2
  exit 1
fi

mkdir -p "$out"
raw=$(mktemp -d)
trap 'rm -rf "$raw"' EXIT
echo "vs-llama-cpp: $rounds rounds; kvpark: $kvpark; llama.cpp: $llama_bench" >&2
for ((r = 1; r <= rounds; r++)); do
  for fi in "${!files[@]}"; do
    f=${files[$fi]}
    order=(llama kvpark)
    [ $((r % 2)) -eq 0 ] && order=(kvpark llama)
    for e in "${order[@]}"; do
      echo "vs-llama-cpp: round $r/$rounds: $e on $(basename "$f")" >&2
      if [ "$e" = llama ]; then
        "$llama_bench" -m "$f" -p "$pp" -n "$tg" -d "$depth" -t "$threads" -r 1 \
          -ctk "$kvt" -ctv "$kvt" -o csv >"$raw/llama-$fi-$r.csv" 2>"$raw/llama.err" ||
          { cat "$raw/llama.err" >&2; exit 1; }
      else
        "$kvpark" bench engine -m "$f" -p "$pp" -n "$tg" -d "$depth" --threads-list "$threads" \
          -r 1 --kv-type "$kvt" --csv "$raw/kvpark-$fi-$r.csv" >/dev/null 2>"$raw/kvpark.err" ||
          { cat "$raw/kvpark.err" >&2; exit 1; }
      fi
    done
  done
done

python3 - "$raw" "$out/vs-llama-cpp.csv" "${files[@]}" <<'PY'
import csv, glob, os, statistics, sys
raw, out_csv, files = sys.argv[1], sys.argv[2], sys.argv[3:]
rows = {}  # (file index, test, depth, threads) -> {"llama": [...], "kvpark": [...]}
for fi, f in enumerate(files):
    for p in glob.glob(f"{raw}/llama-{fi}-*.csv"):
        for r in csv.DictReader(open(p)):
            npr, ngen = int(r["n_prompt"]), int(r["n_gen"])
            test = f"pp{npr}" if ngen == 0 else f"tg{ngen}"
            key = (fi, test, int(r.get("n_depth", 0) or 0), int(r["n_threads"]))
            rows.setdefault(key, {"llama": [], "kvpark": []})["llama"].append(float(r["avg_ts"]))
    for p in glob.glob(f"{raw}/kvpark-{fi}-*.csv"):
        for r in csv.DictReader(open(p)):
            test = r["test"].split(" @ ")[0]
            key = (fi, test, int(r["depth"]), int(r["threads"]))
            rows.setdefault(key, {"llama": [], "kvpark": []})["kvpark"].append(float(r["median_tok_s"]))
order = lambda k: (k[0], k[1][:2] != "pp", int(k[1][2:]), k[2], k[3])
print("| model | test | depth | threads | llama.cpp tok/s | kvpark tok/s | kvpark / llama.cpp |")
print("|---|---|---:|---:|---:|---:|---:|")
with open(out_csv, "w", newline="") as fo:
    w = csv.writer(fo, lineterminator="\n")
    w.writerow(["model", "test", "depth", "threads", "rounds", "llama_cpp_tok_s", "kvpark_tok_s", "ratio"])
    for k in sorted(rows, key=order):
        v = rows[k]
        if not v["llama"] or not v["kvpark"]:
            continue
        a, b = statistics.median(v["llama"]), statistics.median(v["kvpark"])
        name = os.path.basename(files[k[0]])
        print(f"| {name} | {k[1]} | {k[2]} | {k[3]} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
        w.writerow([name, k[1], k[2], k[3], min(len(v["llama"]), len(v["kvpark"])), f"{a:.2f}", f"{b:.2f}", f"{b / a:.3f}"])
print(f"\n(medians of each engine's per-round figures; wrote {out_csv})", file=sys.stderr)
PY
