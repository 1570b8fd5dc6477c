#!/usr/bin/env python3
"""check_k8s.py — an offline check of deploy/k8s (no cluster, no network).

kubectl's own validation needs an API server, so this checks what a server
would refuse, and what would deploy but not work:
  - every document: apiVersion, kind, metadata.name (a DNS-1123 name), known
    kinds only, each with its required fields (the subset of the
    Kubernetes API schema these kinds use);
  - the kustomization lists exactly the files there;
  - the Deployment's selector matches its pod labels; probes and Service
    targetPorts name container ports that exist; every volumeMount has a
    volume; every claim / ConfigMap it names is defined here (the Secret is
    created by the user, as the kustomization says); resources have requests
    and a memory limit; the container runs as non-root without privilege
    escalation; readiness and liveness probe /health;
  - the Service selects the Deployment's pods; the ServiceMonitor selects the
    Service and scrapes a port the Service has, at /metrics;
  - the file passed to --config is the ConfigMap's key mounted there, and
    the cold directory is on the sessions claim.
Prints one line per failure and exits 1 on any; prints the documents
checked otherwise. Usage: check_k8s.py DIR [--config-out FILE] (writes the
ConfigMap's config file out, for kvpark serve --config --print-config).
"""
import os
import re
import sys

import yaml

NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
KINDS = {
    ("v1", "ConfigMap"): ["data"],
    ("v1", "Service"): ["spec.selector", "spec.ports"],
    ("v1", "PersistentVolumeClaim"): ["spec.accessModes", "spec.resources.requests.storage"],
    ("apps/v1", "Deployment"): ["spec.selector.matchLabels", "spec.template.metadata.labels",
                                "spec.template.spec.containers"],
    ("monitoring.coreos.com/v1", "ServiceMonitor"): ["spec.selector.matchLabels", "spec.endpoints"],
}
errors = []


def err(msg):
    errors.append(msg)


def get(d, path):
    for p in path.split("."):
        if not isinstance(d, dict) or p not in d:
            return None
        d = d[p]
    return d


def main():
    d = sys.argv[1]
    config_out = sys.argv[3] if len(sys.argv) > 3 and sys.argv[2] == "--config-out" else None
    kust = yaml.safe_load(open(os.path.join(d, "kustomization.yaml")))
    files = sorted(f for f in os.listdir(d) if f.endswith(".yaml") and f != "kustomization.yaml")
    if sorted(kust.get("resources", [])) != files:
        err(f"kustomization resources {kust.get('resources')} are not the files here {files}")
    docs = []
    for f in files:
        for doc in yaml.safe_load_all(open(os.path.join(d, f))):
            if doc is None:
                continue
            key = (doc.get("apiVersion"), doc.get("kind"))
            name = get(doc, "metadata.name")
            where = f"{f}: {key[1]} {name}"
            if key not in KINDS:
                err(f"{where}: unknown apiVersion/kind {key}")
                continue
            if not isinstance(name, str) or not NAME.match(name) or len(name) > 63:
                err(f"{where}: metadata.name is not a DNS-1123 label")
            for req in KINDS[key]:
                if get(doc, req) in (None, [], {}):
                    err(f"{where}: missing {req}")
            docs.append((where, doc))
    by_kind = {}
    for where, doc in docs:
        by_kind.setdefault(doc["kind"], []).append((where, doc))
    names = {k: {get(doc, "metadata.name") for _, doc in v} for k, v in by_kind.items()}

    deps = by_kind.get("Deployment", [])
    if len(deps) != 1:
        err(f"want one Deployment, found {len(deps)}")
        return
    where, dep = deps[0]
    sel = get(dep, "spec.selector.matchLabels") or {}
    pod_labels = get(dep, "spec.template.metadata.labels") or {}
    if not sel or any(pod_labels.get(k) != v for k, v in sel.items()):
        err(f"{where}: selector {sel} does not match the pod labels {pod_labels}")
    pod = get(dep, "spec.template.spec")
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    sc = pod.get("securityContext", {})
    ports = set()
    config_path = None
    for c in pod["containers"]:
        cw = f"{where}: container {c.get('name')}"
        if not c.get("image"):
            err(f"{cw}: no image")
        cports = {p["name"]: p["containerPort"] for p in c.get("ports", []) if "name" in p}
        ports |= set(cports)
        for probe in ("readinessProbe", "livenessProbe"):
            hg = get(c, probe + ".httpGet")
            if not hg:
                err(f"{cw}: no {probe}.httpGet")
                continue
            if hg.get("path") != "/health":
                err(f"{cw}: {probe} does not probe /health")
            if hg.get("port") not in cports and hg.get("port") not in cports.values():
                err(f"{cw}: {probe} port {hg.get('port')} is not a container port")
        res = c.get("resources", {})
        if not res.get("requests") or not get(res, "limits.memory"):
            err(f"{cw}: resources need requests and a memory limit")
        csc = c.get("securityContext", {})
        if not (sc.get("runAsNonRoot") or csc.get("runAsNonRoot")):
            err(f"{cw}: not runAsNonRoot")
        if csc.get("allowPrivilegeEscalation") is not False:
            err(f"{cw}: allowPrivilegeEscalation is not false")
        mounts = {}
        for m in c.get("volumeMounts", []):
            if m["name"] not in volumes:
                err(f"{cw}: volumeMount {m['name']} has no volume")
            mounts[m["mountPath"]] = m
        cmd = c.get("command", []) + c.get("args", [])
        if "--config" in cmd:
            config_path = cmd[cmd.index("--config") + 1]
            m = mounts.get(config_path)
            v = volumes.get(m["name"]) if m else None
            if not m or not v or "configMap" not in v:
                err(f"{cw}: --config {config_path} is not a ConfigMap mount")
            else:
                cm_name = v["configMap"]["name"]
                cms = [doc for _, doc in by_kind.get("ConfigMap", []) if get(doc, "metadata.name") == cm_name]
                if not cms or m.get("subPath") not in cms[0].get("data", {}):
                    err(f"{cw}: ConfigMap {cm_name} has no key {m.get('subPath')}")
                else:
                    cfg = yaml.safe_load(cms[0]["data"][m["subPath"]])
                    if config_out:
                        with open(config_out, "w") as fo:
                            fo.write(cms[0]["data"][m["subPath"]])
                    cold = cfg.get("cold-dir")
                    cm = mounts.get(cold)
                    if not cm or "persistentVolumeClaim" not in volumes.get(cm["name"], {}):
                        err(f"{cw}: the cold dir {cold} is not on a PersistentVolumeClaim")
                    if str(cfg.get("port")) not in {str(p) for p in cports.values()}:
                        err(f"{cw}: config port {cfg.get('port')} is not a container port")
        else:
            err(f"{cw}: no --config in its command")
    for vname, v in volumes.items():
        claim = get(v, "persistentVolumeClaim.claimName")
        if claim and claim not in names.get("PersistentVolumeClaim", set()):
            err(f"{where}: volume {vname} claims {claim}, which is not defined here")
        cm = get(v, "configMap.name")
        if cm and cm not in names.get("ConfigMap", set()):
            err(f"{where}: volume {vname} uses ConfigMap {cm}, which is not defined here")

    svc_ports = set()
    svc_labels = {}
    for sw, svc in by_kind.get("Service", []):
        ssel = get(svc, "spec.selector") or {}
        if any(pod_labels.get(k) != v for k, v in ssel.items()):
            err(f"{sw}: selector {ssel} selects no pod of the Deployment")
        for p in get(svc, "spec.ports") or []:
            if isinstance(p.get("targetPort"), str) and p["targetPort"] not in ports:
                err(f"{sw}: targetPort {p['targetPort']} is not a container port")
            svc_ports.add(p.get("name"))
        svc_labels = get(svc, "metadata.labels") or {}
    for mw, mon in by_kind.get("ServiceMonitor", []):
        msel = get(mon, "spec.selector.matchLabels") or {}
        if not msel or any(svc_labels.get(k) != v for k, v in msel.items()):
            err(f"{mw}: selector {msel} selects no Service here")
        for e in get(mon, "spec.endpoints") or []:
            if e.get("port") not in svc_ports:
                err(f"{mw}: endpoint port {e.get('port')} is not a Service port")
            if e.get("path", "/metrics") != "/metrics":
                err(f"{mw}: endpoint path is not /metrics")
    for where, _ in docs:
        print("checked", where)


main()
for e in errors:
    print("error:", e)
sys.exit(1 if errors else 0)
