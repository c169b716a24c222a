#!/usr/bin/env python3
"""Cross-reference checks on rendered manifests, the part a schema validator cannot see.

Usage: check-references.py [--crds FILE] [--mesh] [--external Kind/ns/name ...] RENDERED.yaml

Each RENDERED file is one set applied together (one `kubectl kustomize` output, or one plain
file). Checks that every reference resolves inside the set (or is a declared --external object,
created outside kustomize, like the `cacerts` Secret): ServiceAccounts, ConfigMaps, Secrets and
their keys, volume mounts, probe and Service target ports, env listen ports, file paths under
mounts, RBAC roleRefs and subjects, PodDisruptionBudget selectors, custom kinds against the CRDs;
and the hardening every container must have. With --mesh, also the per-cluster consistency of
the mesh (cluster id, network labels, meshNetworks). Prints one line per problem; exit 1 if any.
"""

import argparse
import re
import sys

import yaml

WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "Job"}
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition"}
WELL_KNOWN_NS = {"default", "kube-system"}
DURATION = re.compile(r"^(\d+)(ms|s|m|h)?$")


def seconds(text):
    m = DURATION.match(text.strip())
    if not m:
        raise ValueError(f"not a duration: {text!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return n * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]


class Checker:
    def __init__(self, docs, crds, external, mesh):
        self.docs = [d for d in docs if d]
        self.crds = crds
        self.external = external
        self.mesh = mesh
        self.problems = []
        self.checked = 0
        self.index = {}
        for d in self.docs:
            d["metadata"].setdefault("name", d["metadata"].get("generateName", ""))
            key = (d["kind"], self.ns(d), d["metadata"]["name"])
            if key in self.index:
                self.fail(f"{self.name(d)} is defined twice")
            self.index[key] = d

    def ns(self, d):
        if d["kind"] in CLUSTER_SCOPED:
            return ""
        return d["metadata"].get("namespace", "default")

    def name(self, d):
        ns = self.ns(d)
        return f"{d['kind']}/{ns + '/' if ns else ''}{d['metadata']['name']}"

    def fail(self, msg):
        self.problems.append(msg)

    def check(self, ok, msg):
        self.checked += 1
        if not ok:
            self.fail(msg)
        return ok

    def exists(self, kind, ns, name):
        return (kind, ns, name) in self.index or f"{kind}/{ns}/{name}" in self.external

    def get(self, kind, ns, name):
        return self.index.get((kind, ns, name))

    def workloads(self):
        return [d for d in self.docs if d["kind"] in WORKLOADS]

    def run(self):
        for d in self.docs:
            ns = self.ns(d)
            if ns:
                self.check(
                    ns in WELL_KNOWN_NS or self.exists("Namespace", "", ns),
                    f"{self.name(d)}: namespace {ns} is not in the set",
                )
            if "." in d["apiVersion"].split("/")[0] and not d["apiVersion"].startswith(
                ("apps/", "batch/", "policy/", "rbac.authorization.k8s.io/",
                 "apiextensions.k8s.io/", "discovery.k8s.io/")
            ):
                self.custom(d)
        for w in self.workloads():
            self.workload(w)
        for d in self.docs:
            {"Service": self.service, "PodDisruptionBudget": self.pdb,
             "RoleBinding": self.binding, "ClusterRoleBinding": self.binding,
             "Secret": self.secret}.get(d["kind"], lambda _: None)(d)
        if self.mesh:
            self.mesh_checks()

    def custom(self, d):
        group, _, version = d["apiVersion"].rpartition("/")
        served = self.crds.get((group, d["kind"]), set())
        self.check(version in served,
                   f"{self.name(d)}: no CRD in deploy/crds serves {d['apiVersion']} {d['kind']}")

    def selected(self, ns, selector):
        return [w for w in self.workloads() if self.ns(w) == ns
                and selector.items() <= pod_spec_labels(w).items()]

    def workload(self, w):
        ns, wn = self.ns(w), self.name(w)
        spec = w["spec"]
        if "selector" in spec:
            sel = spec["selector"].get("matchLabels", {})
            self.check(sel and sel.items() <= pod_spec_labels(w).items(),
                       f"{wn}: selector {sel} does not match the pod template's labels")
        pod = spec["template"]["spec"]
        sa = pod.get("serviceAccountName")
        if sa:
            self.check(self.exists("ServiceAccount", ns, sa), f"{wn}: ServiceAccount {sa} missing")
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        mounted = set()
        psc = pod.get("securityContext", {})
        for c in pod["containers"]:
            cn = f"{wn} container {c['name']}"
            self.check(":" in c["image"] and not c["image"].endswith(":latest"),
                       f"{cn}: image {c['image']} has no fixed tag")
            sc = c.get("securityContext", {})
            self.check(sc.get("allowPrivilegeEscalation") is False, f"{cn}: allowPrivilegeEscalation not false")
            self.check(sc.get("readOnlyRootFilesystem") is True, f"{cn}: readOnlyRootFilesystem not true")
            self.check("ALL" in sc.get("capabilities", {}).get("drop", []), f"{cn}: capabilities not dropped (ALL)")
            self.check(sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True, f"{cn}: runAsNonRoot not true")
            self.check("requests" in c.get("resources", {}), f"{cn}: no resource requests")
            ports = {}
            for p in c.get("ports", []):
                ports.setdefault(p["containerPort"], set()).add(p.get("protocol", "TCP"))
                if "name" in p:
                    ports.setdefault(p["name"], set()).add(p.get("protocol", "TCP"))
            c["_ports"] = ports
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                pr = c.get(probe)
                if pr:
                    action = pr.get("httpGet") or pr.get("tcpSocket")
                    if action:
                        self.check(action["port"] in ports,
                                   f"{cn}: {probe} port {action['port']} is not a container port")
            env = {e["name"]: e for e in c.get("env", [])}
            for e in env.values():
                ref = e.get("valueFrom", {})
                for kind, field in (("ConfigMap", "configMapKeyRef"), ("Secret", "secretKeyRef")):
                    if field in ref:
                        self.ref_key(cn, kind, ns, ref[field]["name"], ref[field]["key"])
            for ef in c.get("envFrom", []):
                for kind, field in (("ConfigMap", "configMapRef"), ("Secret", "secretRef")):
                    if field in ef:
                        self.check(self.exists(kind, ns, ef[field]["name"]),
                                   f"{cn}: envFrom {kind} {ef[field]['name']} missing")
            values = {k: v.get("value", "") for k, v in env.items()}
            for k, v in values.items():
                if k.endswith("LISTEN"):
                    host, _, port = v.rpartition(":")
                    if host.startswith("127.") or host == "[::1]":
                        continue
                    self.check(int(port) in ports, f"{cn}: {k}={v} is not a container port")
            ready = c.get("readinessProbe", {}).get("httpGet")
            for k, v in values.items():
                if k.endswith("_STATUS_LISTEN") and ready:
                    self.check(str(ready["port"]) == v.rpartition(":")[2],
                               f"{cn}: readinessProbe port {ready['port']} is not {k}={v}")
            drain = sum(seconds(v) for k, v in values.items()
                        if k.endswith(("_DRAIN_DURATION", "_TERMINATION_DEADLINE")))
            if drain:
                grace = pod.get("terminationGracePeriodSeconds", 30)
                self.check(grace > drain, f"{cn}: terminationGracePeriodSeconds {grace} is not above "
                           f"drain + termination deadline ({drain}s)")
            mounts = c.get("volumeMounts", [])
            for m in mounts:
                mounted.add(m["name"])
                self.check(m["name"] in volumes, f"{cn}: volumeMount {m['name']} has no volume")
            for k, v in values.items():
                if v.startswith("/etc/"):
                    self.file_under_mount(cn, k, v, mounts, volumes, ns)
        for name, v in volumes.items():
            self.check(name in mounted, f"{wn}: volume {name} is not mounted")
            for kind, field, key in (("ConfigMap", "configMap", "name"), ("Secret", "secret", "secretName")):
                if field in v:
                    src = v[field][key]
                    if self.check(self.exists(kind, ns, src), f"{wn}: volume {name}: {kind} {src} missing"):
                        for item in v[field].get("items", []):
                            self.ref_key(wn, kind, ns, src, item["key"])

    def ref_key(self, who, kind, ns, name, key):
        if not self.check(self.exists(kind, ns, name), f"{who}: {kind} {name} missing"):
            return
        obj = self.get(kind, ns, name)
        if obj is None:  # external: its keys are not known here
            return
        keys = set(obj.get("data", {}) or {}) | set(obj.get("stringData", {}) or {})
        self.check(key in keys, f"{who}: {kind} {name} has no key {key}")

    def file_under_mount(self, cn, env, path, mounts, volumes, ns):
        for m in mounts:
            root = m["mountPath"].rstrip("/") + "/"
            if path.startswith(root):
                rel = path[len(root):]
                v = volumes.get(m["name"], {})
                src = v.get("configMap") or v.get("secret") or {}
                items = [i["path"] for i in src.get("items", [])]
                if items:
                    self.check(rel in items, f"{cn}: {env}={path}: {rel} is not projected into {m['name']}")
                return
        self.check(False, f"{cn}: {env}={path} is not under any volumeMount")

    def service(self, s):
        ns, sn = self.ns(s), self.name(s)
        sel = s["spec"].get("selector")
        if not sel:
            return
        pods = self.selected(ns, sel)
        if not self.check(pods, f"{sn}: selector {sel} selects no workload in the set"):
            return
        for p in s["spec"]["ports"]:
            target = p.get("targetPort", p["port"])
            proto = p.get("protocol", "TCP")
            for w in pods:
                found = any(proto in c["_ports"].get(target, set())
                            for c in w["spec"]["template"]["spec"]["containers"])
                self.check(found, f"{sn}: port {p.get('name', p['port'])} targets {target}/{proto}, "
                           f"which {self.name(w)} does not expose")

    def pdb(self, d):
        sel = d["spec"]["selector"].get("matchLabels", {})
        pods = self.selected(self.ns(d), sel)
        if self.check(pods, f"{self.name(d)}: selects no workload"):
            for w in pods:
                replicas = w["spec"].get("replicas", 1)
                self.check(d["spec"].get("minAvailable", 0) < replicas,
                           f"{self.name(d)}: minAvailable blocks every eviction of {self.name(w)} "
                           f"({replicas} replicas)")

    def binding(self, b):
        ref = b["roleRef"]
        ns = "" if ref["kind"] == "ClusterRole" else self.ns(b)
        self.check(self.exists(ref["kind"], ns, ref["name"]), f"{self.name(b)}: {ref['kind']} {ref['name']} missing")
        for s in b.get("subjects", []):
            if s["kind"] == "ServiceAccount":
                self.check(self.exists("ServiceAccount", s["namespace"], s["name"]),
                           f"{self.name(b)}: subject ServiceAccount {s['namespace']}/{s['name']} missing")

    def secret(self, s):
        sa = s["metadata"].get("annotations", {}).get("kubernetes.io/service-account.name")
        if s.get("type") == "kubernetes.io/service-account-token":
            self.check(sa and self.exists("ServiceAccount", self.ns(s), sa),
                       f"{self.name(s)}: token for a missing ServiceAccount {sa}")

    def mesh_checks(self):
        env = {}
        for w in self.workloads():
            for c in w["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    env[e["name"]] = e.get("value")
        cluster, network = env.get("REMOTE_SECRETS_CLUSTER_ID"), env.get("REMOTE_SECRETS_NETWORK")
        if not self.check(cluster and network, "mesh: remote-secrets has no cluster id or network"):
            return
        self.check(env.get("GATEWAY_CLUSTER_ID") == cluster,
                   f"mesh: gateway cluster id {env.get('GATEWAY_CLUSTER_ID')} != remote-secrets' {cluster}")
        for d in self.docs:
            label = d["metadata"].get("labels", {}).get("topology.istio.io/network")
            if d["kind"] in ("Namespace", "Service") and label is not None:
                self.check(label == network, f"mesh: {self.name(d)} is labelled network {label}, not {network}")
        lbs = [s for s in self.docs if s["kind"] == "Service" and s["spec"].get("type") == "LoadBalancer"]
        for s in lbs:
            self.check(s["metadata"].get("labels", {}).get("topology.istio.io/network") == network,
                       f"mesh: {self.name(s)} lacks topology.istio.io/network={network}")
        # meshNetworks: the file remote-secrets reads, from the ConfigMap mounted there.
        path = env.get("REMOTE_SECRETS_MESH_NETWORKS", "")
        text = None
        for w in self.workloads():
            pod = w["spec"]["template"]["spec"]
            vols = {v["name"]: v for v in pod.get("volumes", [])}
            for c in pod["containers"]:
                for m in c.get("volumeMounts", []):
                    root = m["mountPath"].rstrip("/") + "/"
                    cm = vols.get(m["name"], {}).get("configMap")
                    if path.startswith(root) and cm:
                        obj = self.get("ConfigMap", self.ns(w), cm["name"]) or {}
                        key = next((i["key"] for i in cm.get("items", []) if i["path"] == path[len(root):]),
                                   path[len(root):])
                        text = (obj.get("data") or {}).get(key)
        if not self.check(text is not None, f"mesh: no meshNetworks file at {path}"):
            return
        networks = (yaml.safe_load(text) or {}).get("networks") or {}
        mine = networks.get(network)
        if not self.check(mine, f"mesh: meshNetworks has no network {network}"):
            return
        self.check({"fromRegistry": cluster} in mine.get("endpoints", []),
                   f"mesh: meshNetworks network {network} does not hold fromRegistry {cluster}")
        self.check(len(networks) >= 2, "mesh: meshNetworks names fewer than two networks")
        for net, spec in networks.items():
            for gw in spec.get("gateways", []):
                fqdn = gw.get("registryServiceName")
                if not fqdn:
                    continue
                name, ns = fqdn.split(".")[:2]
                svc = self.get("Service", ns, name)
                ok = svc is not None and svc["spec"].get("type") == "LoadBalancer" and any(
                    p["port"] == gw["port"] for p in svc["spec"]["ports"])
                self.check(ok, f"mesh: network {net} gateway {fqdn}:{gw['port']} is not a LoadBalancer "
                           "Service port of this set (every cluster deploys the same gateway Service)")


def pod_spec_labels(w):
    return w["spec"]["template"]["metadata"].get("labels", {})


def load_crds(path):
    served = {}
    with open(path) as f:
        for d in yaml.safe_load_all(f):
            if d and d["kind"] == "CustomResourceDefinition":
                key = (d["spec"]["group"], d["spec"]["names"]["kind"])
                served[key] = {v["name"] for v in d["spec"]["versions"] if v.get("served")}
    return served


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crds")
    ap.add_argument("--mesh", action="store_true")
    ap.add_argument("--external", action="append", default=[])
    ap.add_argument("file")
    args = ap.parse_args()
    crds = load_crds(args.crds) if args.crds else {}
    with open(args.file) as f:
        docs = list(yaml.safe_load_all(f))
    c = Checker(docs, crds, set(args.external), args.mesh)
    c.run()
    for p in c.problems:
        print(f"{args.file}: {p}")
    print(f"{args.file}: {c.checked} reference checks, {len(c.problems)} problems")
    sys.exit(1 if c.problems else 0)


if __name__ == "__main__":
    main()
