#!/usr/bin/env bash
# gpu-check.sh — the GPU path run for real, in one command: build for the GPU
# found, run every GPU test and the golden checks on the device, then the GPU
# benchmarks; everything lands in OUTDIR.
#
# Why one script: GPU time is scarce (a lent machine, minutes). Everything
# that can go wrong before the first GPU call (arguments, the OUTDIR layout,
# finding the GPU, the -Dcuda=enabled build) is checked on a CPU machine
# (tests/test_gpu_check.sh), so a GPU run spends its minutes on the GPU.
#
# Usage: deploy/gpu-check.sh [options] OUTDIR
#   --build DIR     build tree to use (default build-gpu); an existing tree is
#                   reconfigured for the found GPU and rebuilt incrementally
#   --deadline S    stop starting new steps after S seconds (default 480)
#   --plan          print the steps and their commands, run nothing after the
#                   GPU probe (exit 0; with no GPU found, exit 77 as below)
#   --no-bench      stop after the tests and golden checks
# Env: KVPARK_SHARED (test data, default ../shared), NVIDIA_SMI (default
#      nvidia-smi), TMPDIR (synthetic models are written there: ~18 GB).
#
# Steps, in order (each one's output in OUTDIR/logs/STEP.log, a line per step
# in OUTDIR/summary.md):
#   build        meson release tree, -Dcuda=enabled -Dgpu_arch=<the GPU's cc>
#   tests        test_cuda_ops, test_codec_cuda (test_gpu_decode,
#                test_gpu_encode, test_gpu_pipeline, ...), test_bench_gpu; a
#                GPU case that skips on a GPU host is a failure
#   golden       greedy ids of every golden prompt of stories260K and
#                stories-hd64 with --device cuda; perplexity of stories260K
#                (ppl_excerpt, c 128: 3.7546) and stories-hd64 (eval text,
#                c 128: 6.5118) within 0.2 %
#   engine-1b    bench engine, synthetic:llama-3.2-1b:bf16 (pp512, tg128)
#   gpu          bench gpu: H2D, D2H, D2D ceilings; codec decode GB/s vs D2D
#   engine-8b    bench engine, synthetic:llama-3-8b:bf16
#   resume-4k    bench resume, llama-3-8b shape, 4096 tokens: hot, warm
#                (and pipelined), cold, re-prefill
#   resume-32k   the same at 32768 tokens
# CSVs and PNGs: OUTDIR/bench/. The script stops at the first failure, says
# which step failed and where its log is, and leaves everything it made.
# Exit status: 0 all passed; 1 a step failed; 2 bad usage; 77 no GPU found.
set -uo pipefail

# ---- the steps' bodies (called back by the step list below) --------------------

# --_build DIR CC: a release tree with the CUDA backend for sm_CC.
step_build() {
  local dir=$1 cc=$2 missing=()
  for p in libmicrohttpd jansson liblz4 libuv cmocka; do
    pkg-config --exists "$p" 2>/dev/null || missing+=("$p")
  done
  command -v meson >/dev/null && command -v ninja >/dev/null || missing+=(meson/ninja)
  if [ "${#missing[@]}" -gt 0 ]; then
    echo "gpu-check: build: missing ${missing[*]}; trying deploy/install-deps.sh"
    bash deploy/install-deps.sh || { echo "gpu-check: build: could not install ${missing[*]}"; return 1; }
  fi
  if ! command -v nvcc >/dev/null && [ ! -x /usr/local/cuda/bin/nvcc ]; then
    echo "gpu-check: build: nvcc not found (PATH, /usr/local/cuda/bin): install the CUDA toolkit"
    return 1
  fi
  if [ -f "$dir/build.ninja" ]; then
    meson configure "$dir" -Dbuildtype=release -Dcuda=enabled -Dgpu_arch="$cc" || return 1
  else
    meson setup "$dir" -Dbuildtype=release -Dcuda=enabled -Dgpu_arch="$cc" || return 1
  fi
  ninja -C "$dir" -j "$(nproc)"
}

# --_tests DIR OUT: every GPU test program; a GPU case that skips is a failure.
step_tests() {
  local dir=$1 out=$2 rc=0
  for t in test_cuda_ops test_codec_cuda test_bench_gpu; do
    if [ ! -x "$dir/tests/$t" ]; then echo "$t: not built in $dir/tests"; rc=1; continue; fi
    "$dir/tests/$t" >"$out/$t.log" 2>&1
    local st=$?
    echo "$t: exit $st; $(grep -E '^\[  (PASSED|FAILED|SKIPPED) \] [0-9]+ test' "$out/$t.log" | tr '\n' ' ')"
    if grep -qi "SKIP: no CUDA" "$out/$t.log"; then
      echo "$t: a GPU case skipped on a GPU host:"; grep -i "SKIP: no CUDA" "$out/$t.log"; rc=1
    fi
    [ "$st" -eq 0 ] || { tail -n 40 "$out/$t.log"; rc=1; }
  done
  return $rc
}

# --_golden KVPARK OUT: greedy ids and perplexities on the GPU against golden/.
step_golden() {
  [ -f "$KVPARK_SHARED/golden/stories260K/logits.json" ] || {
    echo "gpu-check: golden: no test data at $KVPARK_SHARED (set KVPARK_SHARED to the shared folder)"; return 1; }
  python3 - "$1" "$2" "$KVPARK_SHARED" <<'PY'
import json, os, re, subprocess, sys
kv, out, shared = sys.argv[1:4]
g = os.path.join(shared, "golden")
fails = 0
def log(name, text):
    open(os.path.join(out, name), "w").write(text)
for model, gold in (("stories260K", "stories260K"), ("stories-hd64", "stories-hd64")):
    mpath = os.path.join(shared, "models", model + ".gguf")
    cases = json.load(open(os.path.join(g, gold, "logits.json")))["cases"]
    for i, c in enumerate(cases):
        want = c["greedy"]["ids"]
        r = subprocess.run([kv, "run", "-m", mpath, "--device", "cuda", "--temp", "0", "--ignore-eos",
                            "--ids", "-n", str(len(want)), "-p", c["prompt"]], capture_output=True, text=True)
        log(f"{model}-{i}.log", r.stdout + r.stderr)
        got = [int(x) for x in r.stdout.split()] if r.returncode == 0 else []
        if got == want:
            print(f"PASS {model} greedy '{c['prompt']}': {len(want)} ids equal")
            continue
        k = next((j for j, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        margins = c["greedy"].get("margins")
        m = margins[k] if margins and k < len(margins) else None
        if r.returncode == 0 and m is not None and m < 1e-3:
            print(f"PASS {model} greedy '{c['prompt']}': equal up to step {k}, a near tie in the golden "
                  f"logits (margin {m:.2e}); the continuation differs after it")
            continue
        fails += 1
        print(f"FAIL {model} greedy '{c['prompt']}': exit {r.returncode}, first difference at step {k} "
              f"(got {got[k] if k < len(got) else None}, want {want[k] if k < len(want) else None}); "
              f"{(r.stderr or '').strip()[-300:]}")
for model, text, want in (("stories260K", os.path.join(g, "stories260K", "ppl_excerpt.txt"), 3.7546),
                          ("stories-hd64", os.path.join(shared, "data", "tinystories-valid-eval.txt"),
                           json.load(open(os.path.join(g, "stories-hd64", "ppl.json")))["eval_c128"])):
    r = subprocess.run([kv, "ppl", "-m", os.path.join(shared, "models", model + ".gguf"), "--device", "cuda",
                        "-c", "128", "-f", text], capture_output=True, text=True)
    log(f"{model}-ppl.log", r.stdout + r.stderr)
    m = re.findall(r"ppl = ([0-9.]+)", r.stdout + r.stderr)
    got = float(m[-1]) if m else None
    ok = got is not None and abs(got - want) <= 0.002 * want
    fails += not ok
    print(f"{'PASS' if ok else 'FAIL'} {model} ppl c128 on {os.path.basename(text)}: {got} (golden {want}, "
          f"within 0.2 %)")
print(f"golden: {fails} failed")
sys.exit(1 if fails else 0)
PY
}

case "${1:-}" in
  --_build) shift; step_build "$@"; exit $? ;;
  --_tests) shift; step_tests "$@"; exit $? ;;
  --_golden) shift; step_golden "$@"; exit $? ;;
esac

usage() {
  sed -n '/^# Usage:/,/^#      nvidia-smi/p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

build=build-gpu
deadline=480
plan=0
bench=1
outdir=
while [ $# -gt 0 ]; do
  case "$1" in
    --build) [ $# -ge 2 ] || usage; build=$2; shift 2 ;;
    --deadline)
      [ $# -ge 2 ] && [[ "$2" =~ ^[0-9]+$ ]] && [ "$2" -gt 0 ] || { echo "gpu-check: --deadline needs a number of seconds" >&2; usage; }
      deadline=$2; shift 2 ;;
    --plan) plan=1; shift ;;
    --no-bench) bench=0; shift ;;
    -h|--help) usage ;;
    -*) echo "gpu-check: unknown option: $1" >&2; usage ;;
    *) [ -z "$outdir" ] || { echo "gpu-check: one OUTDIR only (got '$outdir' and '$1')" >&2; usage; }
       outdir=$1; shift ;;
  esac
done
[ -n "$outdir" ] || { echo "gpu-check: OUTDIR is missing" >&2; usage; }

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 1
mkdir -p "$outdir/logs" "$outdir/tests" "$outdir/golden" "$outdir/bench" || {
  echo "gpu-check: cannot create $outdir" >&2; exit 1; }
outdir="$(cd "$outdir" && pwd)"
case "$build" in /*) ;; *) build="$repo/$build" ;; esac
export KVPARK_SHARED="${KVPARK_SHARED:-$(cd "$repo/.." && pwd)/shared}"
summary="$outdir/summary.md"
t_start=$SECONDS

{
  echo "# kvpark gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo
  echo "commit: $(git -C "$repo" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$repo" diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "build: $build"
  echo
} >"$summary"

# ---- the GPU ------------------------------------------------------------------
smi="${NVIDIA_SMI:-nvidia-smi}"
gpu_line=$("$smi" --query-gpu=name,compute_cap,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1)
smi_rc=$?
if [ "$smi_rc" -ne 0 ] || ! [[ "$gpu_line" =~ ,\ *[0-9]+\.[0-9]+\ *, ]]; then
  why=${gpu_line:-"$smi printed nothing"}
  command -v "$smi" >/dev/null 2>&1 || why="$smi not found"
  echo "gpu-check: SKIPPED: no NVIDIA GPU found ($why)" | tee -a "$summary" >&2
  echo "gpu-check: nothing was run; on a GPU host with the CUDA toolkit, run this again" >&2
  exit 77
fi
echo "$gpu_line" >"$outdir/gpu.txt"
cc=$(echo "$gpu_line" | awk -F', *' '{print $2}' | tr -d ' .')
nproc_=$(nproc)
echo "gpu: $gpu_line (sm_$cc), $nproc_ cores" >>"$summary"
echo >>"$summary"
echo "| step | result | seconds | log |" >>"$summary"
echo "|---|---|---:|---|" >>"$summary"

kv="$build/kvpark"
sh_="$KVPARK_SHARED"
b="$outdir/bench"
m8="synthetic:llama-3-8b:bf16"
m1="synthetic:llama-3.2-1b:bf16"

# name | default timeout (s) | command (run by bash -c, from the repository root)
steps=(
  "build|300|deploy/gpu-check.sh --_build '$build' '$cc'"
  "tests|180|deploy/gpu-check.sh --_tests '$build' '$outdir/tests'"
  "golden|180|deploy/gpu-check.sh --_golden '$kv' '$outdir/golden'"
)
if [ "$bench" -eq 1 ]; then
  steps+=(
    "engine-1b|150|'$kv' bench engine -m $m1 --device cuda -p 512 -n 128 -r 3 --threads-list 1 --csv '$b/engine-llama-3.2-1b.csv'"
    "gpu|150|'$kv' bench gpu -m $m1 --tokens 4096 -r 10 --csv '$b/gpu.csv' --plot '$b/gpu.png'"
    "engine-8b|240|'$kv' bench engine -m $m8 --device cuda -p 512 -n 128 -r 3 --threads-list 1 --csv '$b/engine-llama-3-8b.csv'"
    "resume-4k|240|'$kv' bench resume -m $m8 --device cuda --kv-type f16 --codec none,int8 --ctx 4096 --repeats 3 --csv '$b/resume-4k.csv' --plot '$b/resume-4k.png'"
    "resume-32k|300|'$kv' bench resume -m $m8 --device cuda --kv-type f16 --codec none,int8 --ctx 32768 --repeats 2 --csv '$b/resume-32k.csv' --plot '$b/resume-32k.png'"
  )
fi

if [ "$plan" -eq 1 ]; then
  echo "gpu-check: plan for sm_$cc (deadline ${deadline} s), nothing run:"
  for s in "${steps[@]}"; do
    IFS='|' read -r name tmo cmd <<<"$s"
    printf '  %-11s %4ss  %s\n' "$name" "$tmo" "$cmd"
  done
  exit 0
fi

fail() { # step, why
  echo "| $1 | FAIL | $2 | logs/$1.log |" >>"$summary"
  echo "gpu-check: FAILED at step '$1' ($3); log: $outdir/logs/$1.log" | tee -a "$summary" >&2
  tail -n 30 "$outdir/logs/$1.log" >&2
  echo "gpu-check: results so far are in $outdir" >&2
  exit 1
}

for s in "${steps[@]}"; do
  IFS='|' read -r name tmo cmd <<<"$s"
  left=$((deadline - (SECONDS - t_start)))
  if [ "$left" -le 5 ]; then
    : >"$outdir/logs/$name.log"
    fail "$name" 0 "the ${deadline} s deadline was reached before it started (--deadline)"
  fi
  [ "$tmo" -le "$left" ] || tmo=$left
  echo "gpu-check: $name (at most ${tmo} s)" >&2
  t0=$SECONDS
  timeout -k 10 "$tmo" bash -c "$cmd" >"$outdir/logs/$name.log" 2>&1
  rc=$?
  dt=$((SECONDS - t0))
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then fail "$name" "$dt" "timed out after ${tmo} s"; fi
  [ "$rc" -eq 0 ] || fail "$name" "$dt" "exit status $rc"
  echo "| $name | pass | $dt | logs/$name.log |" >>"$summary"
done
# the benchmark tables, for reading without opening the logs
for f in "$outdir"/logs/*.log; do
  grep -q '^|' "$f" 2>/dev/null || continue
  { echo; echo "## $(basename "$f" .log)"; echo; grep '^|' "$f"; } >>"$summary"
done
echo "gpu-check: all steps passed in $((SECONDS - t_start)) s; summary: $summary" >&2
exit 0
