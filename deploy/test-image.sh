#!/usr/bin/env bash
# test-image.sh — build the CPU container image (deploy/Dockerfile) with
# podman and show that it starts, answers a chat, and resumes a saved session
# after the container is replaced (the cold directory is a volume).
#
# Why: a Dockerfile nobody ran is a guess. Registries are not reachable here,
# so the base image is made locally: debootstrap a minimal Debian bookworm
# and `podman import` it as localhost/kvpark-base:bookworm (once; reused).
# The build then installs its packages from Debian's mirror, as any build of
# the Dockerfile does.
#
# Usage: deploy/test-image.sh [--keep]      (root, from anywhere)
#   env: KVPARK_SHARED (the test models, default ../shared), PORT (18555),
#        ROOTFS (debootstrap dir, default /var/tmp/kvpark-rootfs-bookworm)
# Needs podman and debootstrap (installed if missing: apt-get). Ends with
# "N passed, N failed"; exit status 1 on a failure. Not part of .ci/run (it
# downloads a Debian base system and builds for minutes); run it by hand.
#
# Inside an unprivileged container (as on this project's CI machines) podman
# needs: runc with the cgroupfs manager (crun refuses hybrid cgroups), host
# networking, and nofile/nproc limits at or below the caller's (the defaults
# are higher than such a container may set). They are chosen automatically
# when a plain `podman run` fails; PODMAN_FLAGS overrides.
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
shared="${KVPARK_SHARED:-$repo/../shared}"
port=${PORT:-18555}
rootfs=${ROOTFS:-/var/tmp/kvpark-rootfs-bookworm}
base=localhost/kvpark-base:bookworm
image=localhost/kvpark:cpu
keep=0
[ "${1:-}" = "--keep" ] && keep=1
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok - $what"; else fail=$((fail + 1)); echo "not ok - $what"; fi
}
finish() { echo "$pass passed, $fail failed"; [ "$fail" -eq 0 ]; exit $?; }
die() { echo "test-image: $*" >&2; fail=$((fail + 1)); finish; }

[ -f "$shared/models/stories260K.gguf" ] || die "no $shared/models/stories260K.gguf (set KVPARK_SHARED)"
missing=()
command -v podman >/dev/null || missing+=(podman runc uidmap)
command -v runc >/dev/null || missing+=(runc)
command -v debootstrap >/dev/null || missing+=(debootstrap)
command -v curl >/dev/null || missing+=(curl)
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null ||
    die "cannot install ${missing[*]}"
fi

# 1. the base image
if ! podman image exists "$base"; then
  if [ ! -x "$rootfs/bin/sh" ]; then
    echo "test-image: debootstrap bookworm into $rootfs" >&2
    debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >/tmp/kvpark-debootstrap.log 2>&1 ||
      die "debootstrap failed (log: /tmp/kvpark-debootstrap.log)"
  fi
  tar -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$base" >/dev/null || die "podman import failed"
fi
check "base image $base exists" podman image exists "$base"

# How podman runs containers here (see the top comment).
lim="--ulimit nofile=$(ulimit -Hn):$(ulimit -Hn) --ulimit nproc=4096:4096"
if [ -z "${PODMAN_FLAGS+x}" ]; then
  if podman run --rm "$base" true >/dev/null 2>&1; then
    PODMAN_FLAGS="" RUN_FLAGS="" BUILD_FLAGS=""
  else
    PODMAN_FLAGS="--runtime runc --cgroup-manager=cgroupfs"
    RUN_FLAGS="--network host $lim"
    BUILD_FLAGS="--network host $lim"
  fi
fi
P="podman ${PODMAN_FLAGS:-}"
RUN_FLAGS=${RUN_FLAGS:-} BUILD_FLAGS=${BUILD_FLAGS:-}
echo "test-image: podman flags: ${PODMAN_FLAGS:-none}; run: ${RUN_FLAGS:-none}" >&2

# 2. the image (docker format: OCI images have no HEALTHCHECK)
log=/tmp/kvpark-image-build.log
check "image builds (log: $log)" $P build $BUILD_FLAGS --format docker -f "$repo/deploy/Dockerfile" --target cpu \
  --build-arg BASE="$base" -t "$image" "$repo" >"$log" 2>&1 || finish
check "  ... runs as the unprivileged user kvpark" test "$($P image inspect "$image" --format '{{.Config.User}}')" = kvpark
check "  ... has a healthcheck on /health" sh -c "$P image inspect '$image' --format '{{json .Config.Healthcheck}}' | grep -q /health"
check "  ... declares the model and cold-dir volumes" sh -c "$P image inspect '$image' --format '{{json .Config.Volumes}}' | grep -q /var/lib/kvpark/sessions"

# 3. start it: the model read-only, the cold directory a host directory
sessions=$(mktemp -d /var/tmp/kvpark-image-sessions-XXXXXX)
chown 10001:10001 "$sessions"
cleanup() { $P rm -f kvpark-image-test >/dev/null 2>&1; [ "$keep" -eq 1 ] || rm -rf "$sessions"; }
trap cleanup EXIT
start() {
  $P rm -f kvpark-image-test >/dev/null 2>&1
  [ "$RUN_FLAGS" = "" ] && pub="-p 127.0.0.1:$port:$port" || pub=""
  $P run -d --name kvpark-image-test $RUN_FLAGS $pub -e KVPARK_PORT="$port" -v "$shared/models:/models:ro" \
    -v "$sessions:/var/lib/kvpark/sessions" "$image" -m /models/stories260K.gguf >/dev/null || return 1
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  $P logs kvpark-image-test >&2
  return 1
}
url=http://127.0.0.1:$port
check "container starts and /health answers" start || finish
check "  ... the healthcheck passes inside the container" sh -c "$P healthcheck run kvpark-image-test 2>/dev/null"
chat() { # body
  curl -fsS "$url/v1/chat/completions" -H 'content-type: application/json' -d "$1"
}
jget() { # python expression on the JSON document j, read from stdin
  python3 -c 'import json, sys; j = json.load(sys.stdin); print('"$1"')' 2>/dev/null
}
out=$(chat '{"messages":[{"role":"user","content":"Once upon a time"}],"max_tokens":12,"temperature":0}')
check "a chat is answered" test "$(printf '%s' "$out" | jget 'j["choices"][0]["finish_reason"]')" = length

# 4. a session saved, the container replaced, the session resumed
sid=$(curl -fsS -XPOST "$url/v1/sessions" | jget 'j["id"]')
check "a session is created" test -n "$sid"
turn1='{"session_id":"'$sid'","messages":[{"role":"user","content":"Tom had a red ball"}],"max_tokens":16,"temperature":0}'
r1=$(chat "$turn1")
reply=$(printf '%s' "$r1" | jget 'json.dumps(j["choices"][0]["message"]["content"])')
check "  ... and answered" test -n "$reply"
saved=$(curl -fsS -XPOST "$url/v1/sessions/$sid/save" | jget 'j["bytes"]')
check "  ... and saved (${saved:-no} bytes)" test "${saved:-0}" -gt 0
check "container stops cleanly (SIGTERM)" sh -c "$P stop -t 60 kvpark-image-test >/dev/null"
check "a new container starts on the same volume" start || finish
turn2='{"session_id":"'$sid'","messages":[{"role":"user","content":"Tom had a red ball"},{"role":"assistant","content":'"$reply"'},{"role":"user","content":"Where did it go?"}],"max_tokens":8,"temperature":0}'
r2=$(chat "$turn2")
cached=$(printf '%s' "$r2" | jget 'j["usage"]["prompt_tokens_details"]["cached_tokens"]')
check "  ... resumes the session from disk (cached_tokens ${cached:-none} > 0)" test "${cached:-0}" -gt 0
check "  ... and the session is hot again" test "$(curl -fsS "$url/v1/sessions/$sid" | jget 'j["tier"]')" = hot
finish
