#!/usr/bin/env bash
# run.sh — run the kvpark integration tests (a real `kvpark serve` driven by
# the official OpenAI Node SDK and raw HTTP) and print one summary line:
#     integration: N passed, N failed
#
# Why a script: it is the one command CI and people run; it installs the npm
# dependencies when missing, points the tests at the binary and the test data,
# bounds the total time, and turns node's TAP summary into a stable line.
#
# Usage: tests/integration/run.sh [FILE.test.mjs ...]   (default: all)
# Env:   KVPARK_BIN     kvpark binary              (default: build/kvpark)
#        KVPARK_SHARED  shared test-data folder     (default: ../shared)
#        KVPARK_IT_TIMEOUT  seconds for the whole run (default: 600)
# Relative paths are read from the repository root.
set -u

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
cd "$repo" || exit 1

if ! command -v node >/dev/null 2>&1; then
    echo "integration: node is not installed; install Node.js 20+ (Debian: apt-get install nodejs npm)" >&2
    exit 1
fi
node_major="$(node -p 'process.versions.node.split(".")[0]')"
if [ "$node_major" -lt 18 ]; then
    echo "integration: node $(node --version) is too old; Node.js 18+ is needed" >&2
    exit 1
fi

if [ ! -d "$here/node_modules/openai" ]; then
    if ! command -v npm >/dev/null 2>&1; then
        echo "integration: npm is missing and $here/node_modules is not installed (apt-get install npm)" >&2
        exit 1
    fi
    echo "integration: installing npm dependencies (npm ci)" >&2
    (cd "$here" && npm ci --no-audit --no-fund) || { echo "integration: npm ci failed" >&2; exit 1; }
fi

abs() { case "$1" in /*) printf '%s\n' "$1" ;; *) printf '%s\n' "$repo/$1" ;; esac; }
KVPARK_BIN="$(abs "${KVPARK_BIN:-build/kvpark}")"
KVPARK_SHARED="$(abs "${KVPARK_SHARED:-../shared}")"
export KVPARK_BIN KVPARK_SHARED

if [ ! -x "$KVPARK_BIN" ]; then
    echo "integration: no kvpark binary at $KVPARK_BIN (build it: ninja -C build, or set KVPARK_BIN)" >&2
    exit 1
fi
if [ ! -f "$KVPARK_SHARED/models/stories260K.gguf" ]; then
    echo "integration: test data not found: $KVPARK_SHARED/models/stories260K.gguf (set KVPARK_SHARED)" >&2
    exit 1
fi

if [ "$#" -gt 0 ]; then files=("$@"); else files=("$here"/*.test.mjs); fi

log="$(mktemp "${TMPDIR:-/tmp}/kvpark-integration.XXXXXX")"
trap 'rm -f "$log"' EXIT

# One test file at a time: each starts its own servers, and the queue and
# concurrency tests need the (2-core) machine to themselves.
timeout -k 10 "${KVPARK_IT_TIMEOUT:-600}" \
    node --test --test-reporter=tap --test-concurrency=1 --test-timeout=180000 "${files[@]}" 2>&1 | tee "$log"
status="${PIPESTATUS[0]}"

count() { grep -E "^# $1 [0-9]+$" "$log" | tail -n 1 | awk '{print $3}'; }
pass="$(count pass)"; fail="$(count fail)"; cancelled="$(count cancelled)"
pass="${pass:-0}"; fail="${fail:-0}"; cancelled="${cancelled:-0}"
failed=$((fail + cancelled))
if [ "$status" -ne 0 ] && [ "$failed" -eq 0 ]; then
    failed=1   # node died or timed out before printing its summary
    echo "integration: the test run ended with status $status before its summary" >&2
fi
# Repeat what each failure said (its assertion, expected/actual, stack top)
# just above the summary, where a CI excerpt of the last lines will show it.
if [ "$failed" -ne 0 ]; then
    echo "integration: what the failures said:"
    awk '/^[ ]*not ok /{on=1; n=0} on{print; n++; if ($0 ~ /^[ ]*\.\.\.$/ || n >= 40) on=0}' "$log" | head -n 200
fi
echo "integration: $pass passed, $failed failed"
[ "$status" -eq 0 ] && [ "$failed" -eq 0 ]
