#!/usr/bin/env bash
# test_deploy.sh — the deploy files that can be checked offline, without
# root services or a registry: the systemd unit (systemd-analyze verify and
# an offline security review), the Kubernetes manifests (tests/check_k8s.py),
# and the compose stack's files (docker-compose config, nginx -t, promtool,
# the Grafana dashboard's queries against a running kvpark's /metrics). The container image itself is built and run by
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

status_ok() { # command...: succeeds (its output kept in $tmp/out, shown on failure)
  "$@" >"$tmp/out" 2>&1 || { echo "  status $?:"; tail -5 "$tmp/out" | sed 's/^/  | /'; return 1; }
}

# --- systemd unit ------------------------------------------------------------
unit="$repo/deploy/kvpark.service"
if command -v systemd-analyze >/dev/null; then
  # verify checks that ExecStart's binary exists: point it at the built one
  sed "s#/usr/local/bin/kvpark#$bin#" "$unit" >"$tmp/kvpark.service"
  check "kvpark.service: systemd-analyze verify is silent" quiet_ok systemd-analyze verify "$tmp/kvpark.service"
  # exposure 0..10 (lower is safer); 2.0 or less is "OK" in systemd's words
  check "kvpark.service: security exposure <= 2.0" \
    status_ok systemd-analyze security --offline=yes --threshold=20 --no-pager "$tmp/kvpark.service"
  for k in DynamicUser=yes ProtectSystem=strict StateDirectory=kvpark NoNewPrivileges=yes; do
    check "kvpark.service: $k" grep -qx "$k" "$unit"
  done
  check "kvpark.service: the cold dir is the state directory" grep -q -- '--cold-dir ${STATE_DIRECTORY}/sessions' "$unit"
else
  fail=$((fail + 1)); echo "not ok - systemd-analyze is missing (deploy/install-deps.sh installs systemd)"
fi

# --- Kubernetes -----------------------------------------------------------------
# kubectl validates only against a live API server; tests/check_k8s.py checks
# the fields and cross-references a server and the pods would need.
py=python3
[ -x /usr/bin/python3 ] && /usr/bin/python3 -c 'import yaml' 2>/dev/null && py=/usr/bin/python3
check "k8s manifests: required fields and cross-references (check_k8s.py)" \
  status_ok "$py" "$repo/tests/check_k8s.py" "$repo/deploy/k8s" --config-out "$tmp/k8s-config.yaml"
check "  ... the ConfigMap's config file is one kvpark serve --config accepts" \
  status_ok "$bin" serve --config "$tmp/k8s-config.yaml" --print-config
# the checker is not blind: a Service that selects nothing is caught
mkdir -p "$tmp/k8s-bad" && cp "$repo"/deploy/k8s/*.yaml "$tmp/k8s-bad/"
sed -i 's/selector: {app.kubernetes.io\/name: kvpark}/selector: {app.kubernetes.io\/name: nothing}/' "$tmp/k8s-bad/service.yaml"
"$py" "$repo/tests/check_k8s.py" "$tmp/k8s-bad" >"$tmp/out" 2>&1
check "  ... and refuses a Service that selects no pod" sh -c "test $? -eq 1 && grep -q 'selects no pod' '$tmp/out'"

# --- compose: the file, nginx, Prometheus, the Grafana dashboard ---------------
check "compose.yaml: docker-compose config accepts it" status_ok docker-compose -f "$repo/deploy/compose.yaml" config -q
sed 's/^  nginx:$/  nginx:\n    frobnicate: yes/' "$repo/deploy/compose.yaml" >"$tmp/bad-compose.yaml"
check "  ... and refuses an unknown service key" sh -c "! docker-compose -f '$tmp/bad-compose.yaml' config -q >/dev/null 2>&1"
# the upstream names resolve only inside compose: check the rest with loopback
sed 's/kvpark-[ab]:8080/127.0.0.1:8080/' "$repo/deploy/compose/nginx.conf" >"$tmp/nginx.conf"
check "compose/nginx.conf: nginx -t" status_ok nginx -t -q -p "$tmp" -c "$tmp/nginx.conf" -g "pid $tmp/nginx.pid; error_log stderr;"
check "compose/nginx.conf: affinity on X-Session-Id" grep -q 'hash $kvpark_affinity consistent' "$repo/deploy/compose/nginx.conf"
check "compose/prometheus.yml: promtool check config" status_ok promtool check config "$repo/deploy/compose/prometheus.yml"
# every metric and label the dashboard queries is one kvpark exports
model="${KVPARK_SHARED:-$repo/../shared}/models/stories260K.gguf"
port=$((20000 + RANDOM % 20000))
"$bin" serve -m "$model" --port "$port" --cold-dir "$tmp/sessions" --quiet >"$tmp/serve.log" 2>&1 &
spid=$!
for _ in $(seq 1 100); do curl -fsS "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break; sleep 0.1; done
curl -fsS "http://127.0.0.1:$port/metrics" >"$tmp/metrics" 2>/dev/null
kill "$spid" 2>/dev/null; wait "$spid" 2>/dev/null
check "the dashboard queries only metrics and labels kvpark exports" status_ok "$py" - "$repo/deploy/compose/grafana/dashboards/kvpark.json" "$tmp/metrics" <<'PY'
import json, re, sys
dash = json.load(open(sys.argv[1]))
have = {}
for line in open(sys.argv[2]):
    m = re.match(r"^([a-z_]+)(\{([^}]*)\})? ", line)
    if m:
        labels = set(re.findall(r'([a-z_]+)="', m.group(3) or ""))
        have.setdefault(m.group(1), set()).update(labels)
bad = []
for p in dash["panels"]:
    for t in p["targets"]:
        e = t["expr"]
        for name in set(re.findall(r"\bkvpark_[a-z0-9_]+", e)):
            if name not in have:
                bad.append(f"panel '{p['title']}': no metric {name}")
                continue
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            for grp in re.findall(r"by \(([^)]*)\)", e):
                for lab in (x.strip() for x in grp.split(",")):
                    if lab != "le" and lab not in have[name] | have.get(base, set()):
                        bad.append(f"panel '{p['title']}': {name} has no label {lab}")
for b in bad: print(b)
sys.exit(1 if bad else 0)
PY

# --- Slurm job script: run as plain bash on stories260K, the built binary -----
sb="$repo/deploy/slurm/kvpark-resume.sbatch"
check "slurm job: #SBATCH asks for a GPU" grep -q '^#SBATCH --gres=gpu:1' "$sb"
MODEL="$model" CODECS=none,int8 CTX=32,64 REPEATS=1 OUT="$tmp/slurm" BUILD="$(dirname "$bin")" \
  PORT=$((port + 1)) DEVICE=cpu bash "$sb" >"$tmp/slurm.out" 2>&1
st=$?
check "slurm job: runs to the end outside Slurm (status $st)" sh -c "test $st -eq 0 || { tail -20 '$tmp/slurm.out'; exit 1; }"
check "  ... the server on the node answered a chat" grep -q '"finish_reason"' "$tmp/slurm/chat.json"
check "  ... the resume benchmark wrote a row per ctx x codec" \
  test "$(tail -n +2 "$tmp/slurm/resume.csv" 2>/dev/null | wc -l)" -eq 4
check "  ... and its plot" test -s "$tmp/slurm/resume.png"

echo "$pass passed, $fail failed"
[ "$fail" -eq 0 ]
