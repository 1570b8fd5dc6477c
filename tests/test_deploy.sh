#!/usr/bin/env bash
# test_deploy.sh — the deploy files that can be checked offline, without
# root services or a registry: the systemd unit (systemd-analyze verify and
# an offline security review), and [when present] the Kubernetes manifests
# and the compose file. The container image itself is built and run by
# deploy/test-image.sh (minutes, by hand).
# Ends with "N passed, N failed"; exit status 1 on any failure.
set -u
repo="$(cd "$(dirname "$0")/.." && pwd)"
bin="${KVPARK_BIN:-$repo/build/kvpark}"
tmp="$(mktemp -d "${TMPDIR:-/tmp}/kvpark-deploy-XXXXXX")"
trap 'rm -rf "$tmp"' EXIT
pass=0 fail=0
check() { # description, command...
  local what=$1; shift
  if "$@"; then pass=$((pass + 1)); echo "ok - $what"; else fail=$((fail + 1)); echo "not ok - $what"; fi
}
quiet_ok() { # command...: succeeds with no output at all
  "$@" >"$tmp/out" 2>&1
  local st=$?
  [ "$st" -eq 0 ] && [ ! -s "$tmp/out" ] || { echo "  status $st:"; sed 's/^/  | /' "$tmp/out"; return 1; }
}

# --- systemd unit ------------------------------------------------------------
unit="$repo/deploy/kvpark.service"
if command -v systemd-analyze >/dev/null; then
  # verify checks that ExecStart's binary exists: point it at the built one
  sed "s#/usr/local/bin/kvpark#$bin#" "$unit" >"$tmp/kvpark.service"
  check "kvpark.service: systemd-analyze verify is silent" quiet_ok systemd-analyze verify "$tmp/kvpark.service"
  # exposure 0..10 (lower is safer); 2.0 or less is "OK" in systemd's words
  status_ok() { "$@" >"$tmp/out" 2>&1 || { echo "  status $?:"; tail -5 "$tmp/out" | sed 's/^/  | /'; return 1; }; }
  check "kvpark.service: security exposure <= 2.0" \
    status_ok systemd-analyze security --offline=yes --threshold=20 --no-pager "$tmp/kvpark.service"
  for k in DynamicUser=yes ProtectSystem=strict StateDirectory=kvpark NoNewPrivileges=yes; do
    check "kvpark.service: $k" grep -qx "$k" "$unit"
  done
  check "kvpark.service: the cold dir is the state directory" grep -q -- '--cold-dir ${STATE_DIRECTORY}/sessions' "$unit"
else
  fail=$((fail + 1)); echo "not ok - systemd-analyze is missing (deploy/install-deps.sh installs systemd)"
fi

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
