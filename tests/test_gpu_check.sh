#!/usr/bin/env bash
# test_gpu_check.sh — deploy/gpu-check.sh up to its first GPU call, on a
# machine without one: usage errors, the clean skip when no GPU is found, the
# OUTDIR layout and the step plan for a GPU it is told about (a fake
# nvidia-smi), the deadline, and the golden checker's verdicts (a fake
# kvpark that answers the golden ids, then a wrong one).
# Why: GPU time is minutes per task; a typo in this script must not cost it.
# Ends with "N passed, N failed"; exit status 1 on any failure.
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
script="$repo/deploy/gpu-check.sh"
shared="${KVPARK_SHARED:-$repo/../shared}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kvpark-gpu-check-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok - $what"; else fail=$((fail + 1)); echo "not ok - $what"; fi
}
status_is() { # want, command...: run it, keep its output in $tmp/out
  local want=$1; shift
  "$@" >"$tmp/out" 2>&1
  local st=$?
  [ "$st" -eq "$want" ] || { echo "  status $st, want $want:"; sed 's/^/  | /' "$tmp/out"; return 1; }
}
out_has() { grep -q -- "$1" "$tmp/out" || { echo "  no '$1' in:"; sed 's/^/  | /' "$tmp/out"; return 1; }; }

# usage
check "no OUTDIR: status 2 and the usage" status_is 2 bash "$script"
check "  ... says OUTDIR is missing" out_has "OUTDIR is missing"
check "unknown option: status 2" status_is 2 bash "$script" --frobnicate "$tmp/o"
check "bad --deadline: status 2" status_is 2 bash "$script" --deadline soon "$tmp/o"
check "two OUTDIRs: status 2" status_is 2 bash "$script" "$tmp/a" "$tmp/b"

# no GPU: a clean skip, status 77, nothing built
check "no nvidia-smi: status 77" status_is 77 env NVIDIA_SMI="$tmp/no-such-smi" bash "$script" --build "$tmp/b" "$tmp/o1"
check "  ... says why" out_has "SKIPPED: no NVIDIA GPU found"
check "  ... OUTDIR laid out" test -d "$tmp/o1/logs" -a -d "$tmp/o1/bench" -a -d "$tmp/o1/golden" -a -f "$tmp/o1/summary.md"
check "  ... summary says skipped" grep -q "SKIPPED" "$tmp/o1/summary.md"
check "  ... no build started" test ! -e "$tmp/b"
printf '#!/bin/sh\necho "NVIDIA-SMI has failed because it could not communicate with the NVIDIA driver." >&2\nexit 9\n' >"$tmp/smi-broken"
chmod +x "$tmp/smi-broken"
check "nvidia-smi without a driver: status 77" status_is 77 env NVIDIA_SMI="$tmp/smi-broken" bash "$script" "$tmp/o2"

# a GPU it is told about: the plan, with that GPU's compute capability
printf '#!/bin/sh\necho "NVIDIA H200, 9.0, 143771 MiB, 570.86.15"\n' >"$tmp/smi"
chmod +x "$tmp/smi"
check "--plan with an H200: status 0" status_is 0 env NVIDIA_SMI="$tmp/smi" bash "$script" --plan --build "$tmp/b" "$tmp/o3"
check "  ... builds for sm_90" out_has "--_build '$tmp/b' '90'"
for s in build tests golden engine-1b gpu engine-8b resume-4k resume-32k; do
  check "  ... has step $s" out_has "^  $s "
done
check "  ... gpu.txt written" grep -q "H200" "$tmp/o3/gpu.txt"
check "--plan --no-bench: no bench steps" status_is 0 env NVIDIA_SMI="$tmp/smi" bash "$script" --plan --no-bench "$tmp/o4"
check "  ... (none listed)" bash -c "! grep -q 'engine-1b' '$tmp/out'"
check "deadline reached: status 1, names the step" \
  status_is 1 env NVIDIA_SMI="$tmp/smi" bash "$script" --deadline 1 --build "$tmp/b" "$tmp/o5"
check "  ... says deadline" out_has "FAILED at step 'build'.*deadline"

# the tests step: a GPU case that skips on a GPU host is a failure
mkdir -p "$tmp/fb/tests" "$tmp/t"
for t in test_cuda_ops test_codec_cuda test_bench_gpu; do
  printf '#!/bin/sh\necho "[  PASSED  ] 3 test(s)."\n' >"$tmp/fb/tests/$t"
  chmod +x "$tmp/fb/tests/$t"
done
check "tests step: all GPU programs pass" status_is 0 bash "$script" --_tests "$tmp/fb" "$tmp/t"
printf '#!/bin/sh\necho "SKIP: no CUDA device for the GPU codec (no driver)"\necho "[  PASSED  ] 2 test(s)."\n' >"$tmp/fb/tests/test_codec_cuda"
check "tests step: a skipped GPU case fails it" status_is 1 bash "$script" --_tests "$tmp/fb" "$tmp/t"
check "  ... and says which" out_has "test_codec_cuda: a GPU case skipped on a GPU host"
printf '#!/bin/sh\necho "[  PASSED  ] 3 test(s)."\n' >"$tmp/fb/tests/test_codec_cuda"
rm "$tmp/fb/tests/test_bench_gpu"
check "tests step: a missing program fails it" status_is 1 bash "$script" --_tests "$tmp/fb" "$tmp/t"
check "  ... and says so" out_has "test_bench_gpu: not built"

# the golden checker: a fake kvpark answering the golden ids and perplexities
if [ -f "$shared/golden/stories260K/logits.json" ] && [ -f "$shared/golden/stories-hd64/logits.json" ]; then
  cat >"$tmp/fake-kv" <<EOF
#!/usr/bin/env python3
import json, os, sys
a = sys.argv[1:]
mode = os.environ.get("FAKE_MODE", "good")
if a[0] == "ppl":
    m = a[a.index("-m") + 1]
    print("ppl = %s" % ("3.7546" if "stories260K" in m else "6.5118") if mode == "good" else "ppl = 9.9")
    sys.exit(0)
m, p = a[a.index("-m") + 1], a[a.index("-p") + 1]
g = "stories260K" if "stories260K" in m else "stories-hd64"
for c in json.load(open(os.path.join("$shared", "golden", g, "logits.json")))["cases"]:
    if c["prompt"] == p:
        ids = list(c["greedy"]["ids"])
        if mode == "bad": ids[5] = (ids[5] + 1) % 512
        print(" ".join(map(str, ids)))
EOF
  chmod +x "$tmp/fake-kv"
  mkdir -p "$tmp/g"
  check "golden checker: golden answers pass" status_is 0 env KVPARK_SHARED="$shared" FAKE_MODE=good bash "$script" --_golden "$tmp/fake-kv" "$tmp/g"
  check "  ... every case and both ppl listed" bash -c "[ \$(grep -c '^PASS' '$tmp/out') -eq 10 ]"
  check "golden checker: a wrong id and ppl fail" status_is 1 env KVPARK_SHARED="$shared" FAKE_MODE=bad bash "$script" --_golden "$tmp/fake-kv" "$tmp/g"
  check "  ... names the first difference" out_has "FAIL stories260K greedy 'Once upon a time': exit 0, first difference at step 5"
  check "  ... and the perplexity" out_has "FAIL stories260K ppl c128"
else
  echo "ok - golden checker # SKIP no golden data at $shared"
fi
echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
