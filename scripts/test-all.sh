#!/usr/bin/env bash
# The whole test suite: installs what the tests need (Debian packages, as root), checks
# formatting and lints, then runs every test in the workspace.
#
# Tests that need a tool (dig, dnsmasq, openssl, ip) or root (network namespaces) skip with a
# printed reason when it is missing, and fail instead when CI=true.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dig >/dev/null || need+=(dnsutils)
command -v dnsmasq >/dev/null || need+=(dnsmasq)
command -v openssl >/dev/null || need+=(openssl)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "== installing test tools: ${need[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
  else
    echo "== not root: cannot install ${need[*]}; the tests that need them will be skipped" >&2
  fi
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== deploy manifests (render with kubectl kustomize, strict schema check, references)"
deploy/validate.sh

echo "== tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
