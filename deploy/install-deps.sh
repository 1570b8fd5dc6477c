#!/usr/bin/env bash
# install-deps.sh — install what kvpark needs to build and test on Debian/Ubuntu.
# Idempotent: installs only what is missing. Run as root (or with sudo).
#   build:  gcc, meson, ninja, pkg-config, libmicrohttpd, jansson, liblz4, libuv, xxhash,
#           libsodium, libyaml (the `kvpark serve --config` file), hiredis (the client of
#           the shared Redis tier, storage/remote.c)
#   tests:  cmocka, redis-server (tests/test_remote.c starts a real one), gnuplot (benchmark
#           plots), prometheus (for promtool, which
#           validates the /metrics output), nodejs + npm (integration tests),
#           clang + libclang-rt-dev (libFuzzer: the fuzz targets, deploy/fuzz.sh),
#           deploy-file checks (tests/test_deploy.sh; nothing is started): systemd
#           (systemd-analyze), python3-yaml (tests/check_k8s.py), docker-compose (the
#           compose schema), nginx-light (nginx -t)
# The CUDA Toolkit is not installed here: kvpark builds the CUDA backend when
# /usr/local/cuda/bin/nvcc (or nvcc on PATH) exists, and without it otherwise.
set -euo pipefail
pkgs=(gcc meson ninja-build pkg-config libmicrohttpd-dev libjansson-dev liblz4-dev libuv1-dev
      libxxhash-dev libsodium-dev libyaml-dev libcmocka-dev gnuplot-nox prometheus curl clang
      libclang-rt-dev systemd python3-yaml docker-compose nginx-light libhiredis-dev redis-server)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# Node.js + npm drive the integration tests (the official OpenAI SDK); any
# node >= 18 already on PATH is used as it is.
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)
if [ ${#missing[@]} -eq 0 ]; then
  echo "install-deps: all packages present"
  exit 0
fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
echo "install-deps: installing ${missing[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
echo "install-deps: done"
