#!/usr/bin/env bash
# fuzz.sh — build the libFuzzer targets (tests/fuzz/) and run them.
# Usage: deploy/fuzz.sh [SECONDS] [TARGET...]     (from anywhere)
#   SECONDS  fuzzing time per target (default 60); 0 = only replay the inputs
#   TARGET   gguf, codec, ... (default: every target in tests/fuzz/meson.build)
# For each target: first every committed input (tests/fuzz/regress/TARGET/
# and tests/fuzz/corpus/TARGET/) is replayed once, then the target fuzzes
# for SECONDS on a scratch copy of its corpus (the committed corpus is never
# written; new inputs stay in the scratch dir, merge them by hand: README).
# Prints one line per target, "fuzz: TARGET: N executions in S s, C crashes: ok"
# (or FAILED), then "fuzz: P passed, F failed"; exits 1 on any crash, leak,
# timeout or sanitizer report. Crash inputs are saved in $OUTDIR (default
# BUILD/crashes) as TARGET-crash-<sha1> (libFuzzer's names); logs in BUILD/fuzz-logs.
# Environment: FUZZ_BUILD (default build-fuzz), OUTDIR, JOBS (ninja -j,
# default nproc), FUZZ_ARGS (extra libFuzzer flags, e.g. "-fork=2"),
# FUZZ_KEEP=1 (keep the scratch corpora, printed, for merging).
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
[ $# -gt 0 ] && shift
case "$secs" in ''|*[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number (got '$secs')" >&2; exit 2 ;; esac
build=${FUZZ_BUILD:-build-fuzz}
outdir=${OUTDIR:-$build/crashes}
jobs=${JOBS:-$(nproc)}
all=$(sed -n "s/^ *'\([a-z_0-9]*\)', *#.*/\1/p" tests/fuzz/meson.build)
targets=${*:-$all}
for t in $targets; do
  grep -qx "$t" <<<"$all" || { echo "fuzz.sh: unknown target '$t' (targets: $(echo $all))" >&2; exit 2; }
done

# Build (clang + libFuzzer, ASan + UBSan); setup only when the tree is missing.
if [ ! -f "$build/build.ninja" ]; then
  command -v clang >/dev/null || { echo "fuzz.sh: clang not found (deploy/install-deps.sh installs it)" >&2; exit 1; }
  CC=clang meson setup "$build" -Dfuzz=true -Dbuildtype=debugoptimized -Db_sanitize=address,undefined \
    -Db_lundef=false -Dcuda=disabled >/tmp/fuzz-setup.$$ 2>&1 || { cat /tmp/fuzz-setup.$$; rm -f /tmp/fuzz-setup.$$; exit 1; }
  mv /tmp/fuzz-setup.$$ "$build/setup.log"
fi
mkdir -p "$build/fuzz-logs" "$outdir"
bins=()
for t in $targets; do bins+=("tests/fuzz/fuzz_$t"); done
ninja -C "$build" -j "$jobs" "${bins[@]}" >"$build/fuzz-logs/ninja.log" 2>&1 || {
  tail -40 "$build/fuzz-logs/ninja.log"; echo "fuzz.sh: build failed"; exit 1; }

export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1}
export UBSAN_OPTIONS=halt_on_error=1:print_stacktrace=1 # a UBSan report is a crash
pass=0 fail=0
for t in $targets; do
  bin="$build/tests/fuzz/fuzz_$t"
  log="$build/fuzz-logs/$t.log"
  dict=()
  [ -f "tests/fuzz/$t.dict" ] && dict=("-dict=tests/fuzz/$t.dict")
  case $t in api_*) dict=("-dict=tests/fuzz/api.dict") ;; esac
  ok=1 why=""
  # 1. replay every committed input (regressions first), no fuzzing
  mapfile -t files < <(find "tests/fuzz/regress/$t" "tests/fuzz/corpus/$t" -type f ! -name '.*' 2>/dev/null | sort)
  if [ ${#files[@]} -gt 0 ]; then
    if ! "$bin" -runs=1 "${files[@]}" >"$build/fuzz-logs/$t.replay.log" 2>&1; then
      ok=0 why=" (replay of committed inputs failed: $build/fuzz-logs/$t.replay.log)"
    fi
  fi
  # 2. fuzz a scratch copy of the corpus
  execs=0 crashes=0
  if [ "$ok" -eq 1 ] && [ "$secs" -gt 0 ]; then
    scratch=$(mktemp -d "${TMPDIR:-/tmp}/kvpark-fuzz-$t.XXXXXX")
    [ -d "tests/fuzz/corpus/$t" ] && cp -r "tests/fuzz/corpus/$t/." "$scratch/"
    before=$(find "$outdir" -maxdepth 1 -name "$t-*" | wc -l)
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -print_final_stats=1 -timeout=10 -artifact_prefix="$outdir/$t-" \
      "${dict[@]}" ${FUZZ_ARGS:-} "$scratch" >"$log" 2>&1
    st=$?
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
    execs=${execs:-0}
    crashes=$(( $(find "$outdir" -maxdepth 1 -name "$t-*" | wc -l) - before ))
    if [ "$st" -ne 0 ] || [ "$crashes" -gt 0 ]; then
      ok=0
      [ "$crashes" -gt 0 ] || crashes=1
      why=" (exit $st; inputs in $outdir/$t-*, log $log)"
    fi
    if [ "${FUZZ_KEEP:-0}" = 1 ]; then why="$why [corpus: $scratch]"; else rm -rf "$scratch"; fi
  fi
  if [ "$ok" -eq 1 ]; then
    pass=$((pass + 1)); verdict=ok
  else
    fail=$((fail + 1)); verdict=FAILED
  fi
  echo "fuzz: $t: $execs executions in $secs s, $crashes crashes, ${#files[@]} inputs replayed: $verdict$why"
done
echo "fuzz: $pass passed, $fail failed"
[ "$fail" -eq 0 ]
