#!/usr/bin/env bash
# test.sh — install dependencies, build, and run every test: once in a release
# build and once under AddressSanitizer + UndefinedBehaviorSanitizer.
# Ends with the line "N passed, N failed[, N skipped]"; the fuzz targets
# (deploy/fuzz.sh, FUZZ_SECONDS each, default 10) count one test each.
# Usage: deploy/test.sh            (from the repository root)
# Logs: build-test/ and build-asan/ each keep setup.log, ninja.log,
# integration.log and meson-logs/testlog.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh || { echo "0 passed, 1 failed"; exit 1; }
export KVPARK_SHARED="${KVPARK_SHARED:-$(cd .. && pwd)/shared}"
jobs=$(nproc)
fail_build=0
# Logs stay inside each build directory: $dir/setup.log, $dir/ninja.log and
# $dir/integration.log (meson's own are in $dir/meson-logs/).
build() { # dir, extra meson args...
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    # meson setup creates the directory: log to a temporary file, then move it in
    local log st
    log=$(mktemp) || return 1
    meson setup "$dir" "$@" >"$log" 2>&1
    st=$?
    if [ -d "$dir" ] && mv "$log" "$dir/setup.log"; then log="$dir/setup.log"; fi
    [ "$st" -eq 0 ] || { cat "$log"; return 1; }
  fi
  ninja -C "$dir" -j "$jobs" >"$dir/ninja.log" 2>&1 || { tail -50 "$dir/ninja.log"; return 1; }
}
build build-test -Dbuildtype=release || fail_build=1
build build-asan -Dbuildtype=debugoptimized -Db_sanitize=address,undefined -Db_lundef=false || fail_build=1
if [ "$fail_build" -ne 0 ]; then
  echo "build failed"
  echo "0 passed, 1 failed"
  exit 1
fi
export ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:halt_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
rc=0
for dir in build-test build-asan; do
  echo "=== tests in $dir ==="
  meson test -C "$dir" --print-errorlogs --num-processes "$jobs" || rc=1
done
# Integration tests: the real server driven by the OpenAI Node SDK and raw
# HTTP, once with the release binary and once with the ASan/UBSan one.
for dir in build-test build-asan; do
  echo "=== integration tests with $dir/kvpark ==="
  KVPARK_BIN="$dir/kvpark" KVPARK_IT_TIMEOUT="${KVPARK_IT_TIMEOUT:-1500}" bash tests/integration/run.sh 2>&1 | tee "$dir/integration.log" | grep -E "^(not ok|integration:)" || true
done
# Fuzz targets (tests/fuzz, clang + libFuzzer, ASan/UBSan): every committed
# regression and corpus input replayed, then each target fuzzed for
# FUZZ_SECONDS (default 10) from its seed corpus; one test per target.
echo "=== fuzz targets (deploy/fuzz.sh ${FUZZ_SECONDS:-10}) ==="
JOBS=$jobs bash deploy/fuzz.sh "${FUZZ_SECONDS:-10}" >build-test/fuzz.log 2>&1
grep -E "^fuzz: " build-test/fuzz.log || tail -20 build-test/fuzz.log
# What each failed integration test said, repeated here at the end so that
# a CI excerpt of the last lines shows the cause, not only "not ok".
for dir in build-test build-asan; do
  if grep -q "^integration: what the failures said:" "$dir/integration.log" 2>/dev/null; then
    echo "=== integration failures with $dir/kvpark ==="
    sed -n '/^integration: what the failures said:/,/^integration: [0-9]* passed/p' "$dir/integration.log" | head -n 80
  fi
done
# Count individual cmocka test cases from meson's JSON logs; a program that
# crashed or failed without cmocka's summary counts as one failure.
python3 - <<'PY' || rc=1
import json, re, sys
p = f = s = 0
for d in ("build-test", "build-asan"):
    try:
        lines = open(f"{d}/meson-logs/testlog.json").read().splitlines()
    except FileNotFoundError:
        f += 1
        continue
    for line in lines:
        r = json.loads(line)
        out = (r.get("stdout", "") or "") + (r.get("stderr", "") or "")
        def count(tag):
            m = re.findall(r"\[\s*" + tag + r"\s*\] (\d+) test", out)
            return int(m[-1]) if m else 0
        cp, cf, cs = count("PASSED"), count("FAILED"), count("SKIPPED")
        if r["result"] not in ("OK", "SKIP") and cf == 0:
            cf = 1
        if cp + cf + cs == 0:
            if r["result"] == "OK": cp = 1
            elif r["result"] == "SKIP": cs = 1
        p, f, s = p + cp, f + cf, s + cs
for d in ("build-test", "build-asan"):
    try:
        runs = re.findall(r"^integration: (\d+) passed, (\d+) failed", open(f"{d}/integration.log").read(), re.M)
    except FileNotFoundError:
        runs = []
    if len(runs) != 1:
        f += 1  # the integration run did not finish
    for ip, ifl in runs:
        p, f = p + int(ip), f + int(ifl)
# Fuzz targets: one line per target from deploy/fuzz.sh, then its summary;
# no summary means the fuzz build failed (one failure).
try:
    fz = open("build-test/fuzz.log").read()
except FileNotFoundError:
    fz = ""
for verdict in re.findall(r"^fuzz: [a-z_0-9]+: .*: (ok|FAILED)", fz, re.M):
    if verdict == "ok": p += 1
    else: f += 1
if not re.search(r"^fuzz: \d+ passed, \d+ failed$", fz, re.M):
    f += 1
print(f"{p} passed, {f} failed, {s} skipped")
sys.exit(1 if f else 0)
PY
exit $rc
