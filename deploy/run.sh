#!/usr/bin/env bash
# run.sh — install what is missing, build kvpark, and start the OpenAI-compatible
# server on the default model (-m / $KVPARK_MODEL / models/*.gguf /
# ../shared/models/stories260K.gguf) at http://127.0.0.1:8080.
# Extra arguments go to `kvpark serve` (e.g. --port 9000 --api-key KEY).
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release >/dev/null
ninja -C build >/dev/null
exec ./build/kvpark serve "$@"
