#!/usr/bin/env bash
# The real-cluster test: two kind clusters, each on its own network, joined only by their
# gateways' LoadBalancer addresses; a client in cluster-1 calls httpbin.bar.global and must be
# answered by a pod of cluster-2, through cluster-2's gateway (the path of one call in
# shared/DESIGN.md, with the manifests of deploy/ as a user would apply them).
#
# Needs Docker (a running engine), kind, kubectl, python3 and network access to pull the
# base images and MetalLB's manifest. Usage and knobs: kind-tests/kind/README.md.
#
#   kind-tests/kind/run.sh            # create, test, delete the clusters
#   KEEP_CLUSTERS=1 kind-tests/kind/run.sh   # leave them running to look around
set -euo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PREFIX=${KIND_PREFIX:-mesh}
KEEP_CLUSTERS=${KEEP_CLUSTERS:-0}
REUSE_CLUSTERS=${REUSE_CLUSTERS:-0}
METALLB_VERSION=${METALLB_VERSION:-v0.14.9}
KIND_NODE_IMAGE=${KIND_NODE_IMAGE:-}
TOOLS_IMAGE=mesh-gateway-test-tools:0.1.0 # as in manifests/*.yaml
CALLS=6                                   # --count in manifests/client.yaml
IDS=(cluster-1 cluster-2)

die() {
  echo >&2
  echo "kind-tests/kind/run.sh: FAILED: $*" >&2
  exit 1
}
step() { echo; echo "== $*"; }
kname() { echo "$PREFIX-$1"; }             # kind cluster name of cluster-N
ctx() { echo "kind-$PREFIX-$1"; }          # its kubectl context
k() { local c=$1; shift; kubectl --context "$(ctx "$c")" "$@"; }

# ---- preflight: say exactly what is missing, and fail -------------------------------------
missing=()
for tool in docker kind kubectl python3; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  die "cannot run the kind test: not installed: ${missing[*]}.
This test needs Docker (with a running engine), kind (https://kind.sigs.k8s.io), kubectl and
python3; see kind-tests/kind/README.md. The network-namespace tests (scripts/test-all.sh)
cover the same path without them."
fi
if ! docker info >/dev/null 2>&1; then
  die "cannot run the kind test: docker is installed but its engine is not reachable
('docker info' failed: is the daemon running, and may this user use it?)."
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/mesh-kind.XXXXXX")
chmod 700 "$WORK"

diagnose() {
  for c in "${IDS[@]}"; do
    echo "---- $c: pods" >&2
    k "$c" get pods -A -o wide >&2 || true
    for d in mesh-gateway mesh-dns remote-secrets; do
      echo "---- $c: logs of $d (last 40 lines)" >&2
      k "$c" -n istio-system logs "deploy/$d" --tail=40 >&2 || true
    done
  done
}

cleanup() {
  local rc=$?
  if [ "$rc" != 0 ]; then diagnose; fi
  if [ "$KEEP_CLUSTERS" = 1 ]; then
    echo "KEEP_CLUSTERS=1: clusters kept (contexts $(ctx cluster-1), $(ctx cluster-2)); work dir $WORK"
  else
    for c in "${IDS[@]}"; do kind delete cluster --name "$(kname "$c")" >/dev/null 2>&1 || true; done
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT

# The image reference the overlays deploy (images: in deploy/overlays/*/kustomization.yaml).
IMAGE=$(kubectl kustomize "$ROOT/deploy/overlays/cluster-1" | awk '$1 == "image:" { print $2; exit }')
[ -n "$IMAGE" ] || die "could not read the image from deploy/overlays/cluster-1"

# Run one of our binaries from the image, as the current user, with $WORK mounted at /work.
in_image() {
  docker run --rm -u "$(id -u):$(id -g)" -v "$WORK:/work" "$IMAGE" "$@"
}

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...: until COMMAND succeeds
  local limit=$1 what=$2; shift 2
  local start=$SECONDS
  until "$@" >/dev/null 2>&1; do
    [ $((SECONDS - start)) -lt "$limit" ] || die "timed out after ${limit}s waiting for $what"
    sleep 2
  done
}

# ---- 1. clusters -----------------------------------------------------------------------------
step "kind clusters $(kname cluster-1) and $(kname cluster-2) (distinct pod subnets, not routed)"
for c in "${IDS[@]}"; do
  if kind get clusters 2>/dev/null | grep -qx "$(kname "$c")"; then
    [ "$REUSE_CLUSTERS" = 1 ] || die "kind cluster $(kname "$c") exists already; delete it \
(kind delete cluster --name $(kname "$c")), set KIND_PREFIX, or set REUSE_CLUSTERS=1"
    echo "reusing $(kname "$c")"
  else
    kind create cluster --name "$(kname "$c")" --config "$HERE/$c.kind.yaml" --wait 180s \
      ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
  fi
done

# ---- 2. images -------------------------------------------------------------------------------
step "build $IMAGE and $TOOLS_IMAGE (deploy/Dockerfile), load them into both clusters"
DOCKER_BUILDKIT=1 docker build -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$ROOT"
DOCKER_BUILDKIT=1 docker build -f "$ROOT/deploy/Dockerfile" --target test-tools -t "$TOOLS_IMAGE" "$ROOT"
for c in "${IDS[@]}"; do
  kind load docker-image "$IMAGE" "$TOOLS_IMAGE" --name "$(kname "$c")"
done

# ---- 3. MetalLB: LoadBalancer addresses on the kind Docker network ---------------------------
step "MetalLB $METALLB_VERSION"
subnet=$(docker network inspect kind -f '{{range .IPAM.Config}}{{.Subnet}} {{end}}' |
  tr ' ' '\n' | grep -E '^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/' | head -n1)
[ -n "$subnet" ] || die "the kind Docker network has no IPv4 subnet"
base=$(echo "$subnet" | cut -d. -f1-2) # e.g. 172.18 of 172.18.0.0/16
i=0
for c in "${IDS[@]}"; do
  k "$c" apply -f "https://raw.githubusercontent.com/metallb/metallb/$METALLB_VERSION/config/manifests/metallb-native.yaml"
  k "$c" -n metallb-system rollout status deploy/controller --timeout=180s
  k "$c" -n metallb-system wait --for=condition=ready pod -l app=metallb --timeout=180s
  first=$((200 + i * 10)); last=$((first + 9)); i=$((i + 1))
  cat >"$WORK/metallb-$c.yaml" <<EOF
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata:
  name: kind
  namespace: metallb-system
spec:
  addresses:
  - $base.255.$first-$base.255.$last
---
apiVersion: metallb.io/v1beta1
kind: L2Advertisement
metadata:
  name: kind
  namespace: metallb-system
EOF
  # The webhook may take a moment after the pods are ready.
  wait_for 60 "MetalLB's webhook in $c" k "$c" apply -f "$WORK/metallb-$c.yaml"
  echo "$c: LoadBalancer addresses $base.255.$first-$base.255.$last"
done

# ---- 4. CRDs and the overlays ----------------------------------------------------------------
step "CRDs (deploy/crds) and overlays (deploy/overlays/<cluster>)"
for c in "${IDS[@]}"; do
  k "$c" apply -k "$ROOT/deploy/crds"
  k "$c" wait --for condition=established --timeout=60s crd -l app.kubernetes.io/part-of=mesh-gateway
  k "$c" apply -k "$ROOT/deploy/overlays/$c"
done

# ---- 5. certificates: one shared root, one intermediate per cluster (our own subcommand) -----
step "certificates: remote-secrets certs root / intermediate / workload"
in_image /usr/local/bin/remote-secrets certs root --out-dir /work/root
for c in "${IDS[@]}"; do
  in_image /usr/local/bin/remote-secrets certs intermediate --cluster "$c" \
    --root-dir /work/root --out-dir "/work/$c" --print-secret >"$WORK/cacerts-$c.yaml"
  k "$c" apply -f "$WORK/cacerts-$c.yaml"
  in_image /usr/local/bin/remote-secrets certs workload \
    --spiffe spiffe://cluster.local/ns/istio-system/sa/remote-secrets \
    --ca-dir "/work/$c" --out-dir "/work/$c/xds" \
    --dns remote-secrets.istio-system.svc --dns remote-secrets.istio-system.svc.cluster.local
  k "$c" -n istio-system create secret generic remote-secrets-xds-tls \
    --from-file="$WORK/$c/xds/cert-chain.pem" --from-file="$WORK/$c/xds/key.pem" \
    --from-file="$WORK/$c/xds/root-cert.pem" --dry-run=client -o yaml | k "$c" apply -f -
done

# ---- 6. remote secrets: each control plane watches the other cluster -------------------------
step "remote secrets: remote-secrets create-remote-secret, each cluster into the other"
for c in "${IDS[@]}"; do
  wait_for 60 "the mesh-reader token in $c" \
    sh -c "kubectl --context $(ctx "$c") -n istio-system get secret mesh-reader-token -o jsonpath='{.data.token}' | grep -q ."
  k "$c" -n istio-system get secret mesh-reader-token -o jsonpath='{.data.token}' | base64 -d >"$WORK/$c-token"
  k "$c" -n istio-system get secret mesh-reader-token -o jsonpath='{.data.ca\.crt}' | base64 -d >"$WORK/$c-ca.crt"
  # The API server as the other cluster's pods reach it: the control-plane node on the kind
  # network (its serving certificate names that address).
  ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$(kname "$c")-control-plane")
  in_image /usr/local/bin/remote-secrets create-remote-secret --name "$c" \
    --server "https://$ip:6443" --token-file "/work/$c-token" --ca-file "/work/$c-ca.crt" \
    >"$WORK/remote-secret-$c.yaml"
done
k cluster-1 apply -f "$WORK/remote-secret-cluster-2.yaml"
k cluster-2 apply -f "$WORK/remote-secret-cluster-1.yaml"

# ---- 7. CoreDNS: the `global` stub domain (deploy/coredns/Corefile.global) -------------------
step "CoreDNS stub domain for .global -> mesh-dns"
for c in "${IDS[@]}"; do
  dns_ip=$(k "$c" -n istio-system get svc mesh-dns -o jsonpath='{.spec.clusterIP}')
  k "$c" -n kube-system get configmap coredns -o jsonpath='{.data.Corefile}' >"$WORK/Corefile-$c"
  if ! grep -q '^global:53' "$WORK/Corefile-$c"; then
    { echo; sed "s/<dns-service-ip>/$dns_ip/" "$ROOT/deploy/coredns/Corefile.global"; } >>"$WORK/Corefile-$c"
  fi
  k "$c" -n kube-system create configmap coredns --from-file=Corefile="$WORK/Corefile-$c" \
    --dry-run=client -o yaml | k "$c" replace -f -
  k "$c" -n kube-system rollout restart deploy/coredns
  k "$c" -n kube-system rollout status deploy/coredns --timeout=120s
done

# ---- 8. the mesh is up -----------------------------------------------------------------------
step "mesh rollouts and gateway addresses"
for c in "${IDS[@]}"; do
  for d in mesh-gateway mesh-dns remote-secrets; do
    k "$c" -n istio-system rollout status "deploy/$d" --timeout=240s
  done
  wait_for 120 "a LoadBalancer address for $c's mesh-gateway" \
    sh -c "kubectl --context $(ctx "$c") -n istio-system get svc mesh-gateway -o jsonpath='{.status.loadBalancer.ingress[0].ip}' | grep -q ."
  echo "$c gateway: $(k "$c" -n istio-system get svc mesh-gateway -o jsonpath='{.status.loadBalancer.ingress[0].ip}'):15443"
done

# ---- 9. workloads: httpbin in cluster-2 only, its .global name in both -----------------------
step "httpbin (echo pods) in cluster-2, the client's identity in cluster-1"
for c in "${IDS[@]}"; do
  k "$c" apply -f "$HERE/manifests/mesh-names.yaml"
done
k cluster-2 -n bar create configmap mesh-cluster --from-literal=cluster=cluster-2 \
  --dry-run=client -o yaml | k cluster-2 apply -f -
in_image /usr/local/bin/remote-secrets certs workload --spiffe spiffe://cluster.local/ns/bar/sa/default \
  --ca-dir /work/cluster-2 --out-dir /work/cluster-2/httpbin --dns httpbin.bar.svc.cluster.local
k cluster-2 -n bar create secret generic httpbin-identity --from-file="$WORK/cluster-2/httpbin/" \
  --dry-run=client -o yaml | k cluster-2 apply -f -
k cluster-2 apply -f "$HERE/manifests/httpbin.yaml"
k cluster-2 -n bar rollout status deploy/httpbin --timeout=180s

k cluster-1 create namespace sample --dry-run=client -o yaml | k cluster-1 apply -f -
in_image /usr/local/bin/remote-secrets certs workload --spiffe spiffe://cluster.local/ns/sample/sa/default \
  --ca-dir /work/cluster-1 --out-dir /work/cluster-1/client
k cluster-1 -n sample create secret generic client-identity --from-file="$WORK/cluster-1/client/" \
  --dry-run=client -o yaml | k cluster-1 apply -f -
kube_dns=$(k cluster-1 -n kube-system get svc kube-dns -o jsonpath='{.spec.clusterIP}')
xds=$(k cluster-1 -n istio-system get svc remote-secrets -o jsonpath='{.spec.clusterIP}')
k cluster-1 -n sample create configmap mesh-client --from-literal=DNS_ADDR="$kube_dns:53" \
  --from-literal=XDS_ADDR="$xds:15010" --from-literal=NETWORK=network-1 \
  --dry-run=client -o yaml | k cluster-1 apply -f -

# ---- 10. the check: cluster-1 -> httpbin.bar.global -> cluster-2's gateway -> a cluster-2 pod --
step "cross-cluster call from cluster-1 to httpbin.bar.global"
gw2=$(k cluster-2 -n istio-system get svc mesh-gateway -o jsonpath='{.status.loadBalancer.ingress[0].ip}')
check_report() { # stdin: the client's log; every call answered by a cluster-2 httpbin pod via gw2
  python3 - "$gw2" "$CALLS" <<'PY'
import json, sys
gateway, calls = sys.argv[1], int(sys.argv[2])
report = None
for line in sys.stdin:
    line = line.strip()
    if line.startswith("{") and '"calls"' in line:
        report = json.loads(line)
if report is None:
    sys.exit("no JSON report from mesh-client")
print(json.dumps(report, indent=2))
problems = []
if not report["vip"]:
    problems.append("httpbin.bar.global did not resolve")
eds = [e["address"] for e in report["eds"]]
if not eds or any(not a.startswith(gateway + ":") for a in eds):
    problems.append(f"EDS should hold only cluster-2's gateway {gateway}:15443, got {eds}")
if len(report["calls"]) != calls:
    problems.append(f"expected {calls} calls, got {len(report['calls'])}")
for i, c in enumerate(report["calls"]):
    a = c.get("answer") or {}
    if c.get("error") or a.get("cluster") != "cluster-2" or not a.get("pod", "").startswith("httpbin-"):
        problems.append(f"call {i}: {c}")
if problems:
    sys.exit("\n".join(problems))
PY
}
job_finished() { # the Job succeeded or failed
  [ -n "$(k cluster-1 -n sample get "$1" -o jsonpath='{.status.succeeded}{.status.failed}')" ]
}
ok=0
for attempt in $(seq 1 20); do
  job=$(k cluster-1 create -f "$HERE/manifests/client.yaml" -o name)
  start=$SECONDS
  until job_finished "$job" || [ $((SECONDS - start)) -ge 75 ]; do sleep 2; done
  k cluster-1 -n sample logs "$job" >"$WORK/client.log" 2>&1 || true
  if check_report <"$WORK/client.log"; then
    ok=1
    break
  fi
  echo "attempt $attempt: not yet (EDS or DNS may still be converging); last lines of $job:"
  tail -n 5 "$WORK/client.log" || true
  sleep 5
done
[ "$ok" = 1 ] || die "the cross-cluster call never succeeded (20 attempts)"

# ---- 11. and no other way: cluster-2's pods are not reachable from cluster-1 directly --------
step "cluster-2's pod addresses are unreachable from cluster-1"
pod_ip=$(k cluster-2 -n bar get pods -l app=httpbin -o jsonpath='{.items[0].status.podIP}')
probe=direct-$RANDOM
k cluster-1 -n sample run "$probe" --restart=Never --image="$TOOLS_IMAGE" \
  --image-pull-policy=IfNotPresent --command -- /usr/local/bin/mesh-client connect "$pod_ip:8443"
wait_for 60 "the probe pod $probe to finish" sh -c \
  "kubectl --context $(ctx cluster-1) -n sample get pod $probe -o jsonpath='{.status.phase}' | grep -qx Succeeded"
direct=$(k cluster-1 -n sample logs "$probe" 2>&1 || true)
k cluster-1 -n sample delete pod "$probe" --wait=false >/dev/null
echo "connect $pod_ip:8443 from cluster-1: $direct"
case "$direct" in
  *connected*) die "cluster-1 reached cluster-2's pod $pod_ip directly: the networks are not separate" ;;
  *error*) ;;
  *) die "unexpected output from the direct connection probe: $direct" ;;
esac

echo
echo "kind test: 2 passed, 0 failed"
