#!/usr/bin/env bash
# run.sh — install what is missing, build kvpark, and run it on the default
# model (-m / $KVPARK_MODEL / models/*.gguf / ../shared/models/stories260K.gguf).
# Extra arguments go to `kvpark run`; without any, it tells a short story.
set -euo pipefail
cd "$(dirname "$0")/.."
bash deploy/install-deps.sh
[ -f build/build.ninja ] || meson setup build -Dbuildtype=release >/dev/null
ninja -C build >/dev/null
if [ $# -eq 0 ]; then
  set -- -p "Once upon a time" -n 128 --temp 0.8 --seed 42
fi
exec ./build/kvpark run "$@"
