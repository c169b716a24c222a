#!/usr/bin/env bash
# One command for the side-by-side benchmarks (see BENCHMARKS.md):
#
#   kind-tests/bench/run.sh [--quick] [--only gateway,dns,eds] [--reps N] [--json FILE] ...
#
# Installs the peers from Debian packages (as root: nginx, HAProxy, knot, dnsmasq, wrk, dnsperf),
# builds gateway, dns, remote-secrets and eds-bench in release, then runs bench.py, which keeps all
# traffic on 127.0.0.1, bounds every run in time and count, ends only what it started (by PID),
# and prints the table of ratios. --quick is a seconds-long smoke run (tiny counts) that only
# checks the harness works; its numbers mean nothing. Other flags: `bench.py --help`.
set -euo pipefail
cd "$(dirname "$0")/../.."

need=()
have() { command -v "$1" >/dev/null 2>&1 || [ -x "/usr/sbin/$1" ]; }
have nginx || need+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || need+=(libnginx-mod-stream)
have haproxy || need+=(haproxy)
have knotd || need+=(knot)
have dnsmasq || need+=(dnsmasq)
have wrk || need+=(wrk)
have dnsperf || need+=(dnsperf)
have openssl || need+=(openssl)
have unshare || need+=(util-linux)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" != 0 ]; then
    echo "bench: need ${need[*]} and not root; install them or run as root" >&2
    exit 1
  fi
  echo "== installing peers: ${need[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
# The Debian packages start their own daemons on install; we never touch those (they listen on
# their default ports, we on free loopback ports), but say so if they are running.
for svc in nginx haproxy knot dnsmasq; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    echo "== note: the system's $svc service is running; it adds noise" >&2
  fi
done

if [ "${BENCH_NO_BUILD:-}" = "" ]; then
  echo "== cargo build --release" >&2
  # Two builds: `--bin` would restrict every selected package to that one binary.
  cargo build --release --quiet -p gateway -p dns -p remote-secrets
  cargo build --release --quiet -p kind-tests --bin eds-bench
fi
target=${BENCH_BIN_DIR:-$(cargo metadata --no-deps --format-version 1 |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release}

exec python3 kind-tests/bench/bench.py --bin-dir "$target" "$@"
