#!/usr/bin/env python3
"""Side-by-side benchmarks: gateway vs nginx ssl_preread vs HAProxy req_ssl_sni vs direct;
dns vs knot vs dnsmasq (and through a dnsmasq forwarder); EDS at scale.

Run through run.sh (it installs the peers and builds the binaries). Everything listens on
127.0.0.1; every load run is bounded in time (and the helpers in count); only processes this
script started are ended, by PID. Temp files live in one mktemp directory, removed at exit.

Peers run interleaved: for each repetition, every scenario runs every peer, in an order that
rotates between repetitions. Ratios are taken within a repetition (ours / peer) and reported as
median (min-max) over repetitions, next to CPU time per unit of work read from /proc/<pid>/stat
(utime+stime of the process and its children, e.g. nginx's workers).
"""

import argparse
import datetime
import json
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
SNI = "httpbin.bar.global"
CLK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


def log(*a):
    print("==", *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- processes we own


class Procs:
    """Every process this script starts; ended by PID at exit (TERM, then KILL)."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.live = {}

    def start(self, name, argv, env=None, stdin=None):
        out = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        e = dict(os.environ)
        e.update(env or {})
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=e, stdin=stdin,
                             start_new_session=False)
        self.live[p.pid] = (name, p)
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.pid not in self.live:
            return
        if p.poll() is None:
            os.kill(p.pid, sig)
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(timeout=10)
        del self.live[p.pid]

    def stop_all(self):
        for pid, (_, p) in list(self.live.items()):
            self.stop(p, timeout=5)

    def logtail(self, name, n=20):
        path = os.path.join(self.tmp, f"{name}.log")
        try:
            with open(path, "rb") as f:
                return b"\n".join(f.read().splitlines()[-n:]).decode(errors="replace")
        except OSError:
            return ""


def tree(pid):
    """pid and its descendants (nginx master + workers)."""
    kids = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                s = f.read()
            ppid = int(s[s.rfind(")") + 2:].split()[1])
            kids.setdefault(ppid, []).append(int(d))
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def cpu_s(pids):
    """utime+stime in seconds, summed over pids."""
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/stat") as f:
                s = f.read()
            fields = s[s.rfind(")") + 2:].split()
            t += int(fields[11]) + int(fields[12])
        except (OSError, ValueError):
            pass
    return t / CLK


def rss_kib(pids):
    t = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/statm") as f:
                t += int(f.read().split()[1]) * PAGE_KIB
        except (OSError, ValueError):
            pass
    return t


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(pred, timeout, what):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out after {timeout}s waiting for {what}")


def tcp_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def http_ok(url):
    with urllib.request.urlopen(url, timeout=1) as r:
        return r.status == 200


def run(argv, timeout, **kw):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **kw)


def which(name):
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin:/sbin")


# ---------------------------------------------------------------- statistics


def pct(sorted_vals, p):
    if not sorted_vals:
        return float("nan")
    i = round(p / 100 * (len(sorted_vals) - 1))
    return sorted_vals[min(max(i, 0), len(sorted_vals) - 1)]


def summary(vals):
    vals = [v for v in vals if v == v]  # drop NaN
    if not vals:
        return "n/a"
    med = statistics.median(vals)
    if len(vals) == 1:
        return f"{med:.2f}"
    return f"{med:.2f} ({min(vals):.2f}-{max(vals):.2f})"


def fmt(v):
    if v != v:
        return "n/a"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.2f}"


# ---------------------------------------------------------------- gateway scenario


NGINX_BACKEND = """
user root;
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx-backend.pid;
error_log {tmp}/nginx-backend.err warn;
daemon off;
events {{ worker_connections 30000; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/nb-body; proxy_temp_path {tmp}/nb-proxy;
    fastcgi_temp_path {tmp}/nb-fcgi; uwsgi_temp_path {tmp}/nb-uwsgi; scgi_temp_path {tmp}/nb-scgi;
    keepalive_requests 1000000;
    keepalive_timeout 600s;
    client_header_timeout 600s;
    sendfile on;
    server {{
        listen 127.0.0.1:{port} ssl;
        server_name {sni};
        ssl_certificate {tmp}/cert.pem;
        ssl_certificate_key {tmp}/key.pem;
        ssl_session_cache off;
        ssl_session_tickets off;
        root {tmp}/www;
        location = /small {{ return 200 "ok\\n"; }}
    }}
}}
"""

NGINX_STREAM = """
load_module /usr/lib/nginx/modules/ngx_stream_module.so;
worker_processes 2;
worker_rlimit_nofile {nofile};
pid {tmp}/nginx-stream.pid;
error_log {tmp}/nginx-stream.err warn;
daemon off;
events {{ worker_connections 30000; }}
stream {{
    map $ssl_preread_server_name $upstream {{
        {sni} 127.0.0.1:{backend};
        default 127.0.0.1:9;
    }}
    server {{
        listen 127.0.0.1:{port};
        ssl_preread on;
        proxy_pass $upstream;
        proxy_timeout 1h;
    }}
}}
"""

HAPROXY = """
global
    maxconn {maxconn}
    nbthread 2
defaults
    mode tcp
    timeout connect 1s
    timeout client 1h
    timeout server 1h
frontend sni
    bind 127.0.0.1:{port}
    tcp-request inspect-delay 5s
    tcp-request content accept if {{ req_ssl_hello_type 1 }}
    use_backend httpbin if {{ req_ssl_sni -i {sni} }}
backend httpbin
    server s1 127.0.0.1:{backend}
"""

GATEWAY_CONFIG = """
apiVersion: v1
kind: Service
metadata: {{name: httpbin, namespace: bar}}
spec:
  ports: [{{name: http, port: 8000, targetPort: {backend}}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: httpbin-1, namespace: bar, labels: {{kubernetes.io/service-name: httpbin}}}}
addressType: IPv4
ports: [{{name: http, port: {backend}}}]
endpoints:
- addresses: ["127.0.0.1"]
  conditions: {{ready: true}}
---
apiVersion: multicluster.x-k8s.io/v1alpha1
kind: ServiceExport
metadata: {{name: httpbin, namespace: bar}}
"""


class GatewayBench:
    PEERS = ["gateway", "nginx", "haproxy", "direct"]

    def __init__(self, a, tmp, procs, bins):
        self.a, self.tmp, self.procs, self.bins = a, tmp, procs, bins
        self.ports = {}
        self.running = {}
        self.holds = 0

    # --- setup
    def setup(self):
        t = self.tmp
        os.makedirs(f"{t}/www", exist_ok=True)
        with open(f"{t}/www/bulk", "wb") as f:
            f.write(os.urandom(1 << 20))
        r = run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                 "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", f"{t}/key.pem", "-out",
                 f"{t}/cert.pem", "-days", "2", "-subj", f"/CN={SNI}", "-addext",
                 f"subjectAltName=DNS:{SNI}"], 30)
        if r.returncode:
            raise RuntimeError(f"openssl: {r.stderr}")
        with open(f"{t}/hosts", "w") as f:
            f.write(f"127.0.0.1 localhost\n127.0.0.1 {SNI}\n")
        self.ports["backend"] = free_port()
        self.ports["direct"] = self.ports["backend"]
        self.start_backend()

    def start_backend(self):
        t = self.tmp
        conf = f"{t}/nginx-backend.conf"
        with open(conf, "w") as f:
            f.write(NGINX_BACKEND.format(tmp=t, port=self.ports["backend"], sni=SNI,
                                       nofile=self.a.fd_limit))
        p = self.procs.start("nginx-backend", [which("nginx"), "-c", conf, "-p", t, "-e",
                                               f"{t}/nginx-backend.err"])
        wait_until(lambda: tcp_open(self.ports["backend"]), 20, "backend nginx")
        self.backend = p

    def start_peer(self, peer):
        t, b = self.tmp, self.ports["backend"]
        if peer == "direct":
            return None
        port = free_port()
        self.ports[peer] = port
        if peer == "gateway":
            d = f"{t}/gateway-config"
            os.makedirs(d, exist_ok=True)
            with open(f"{d}/mesh.yaml", "w") as f:
                f.write(GATEWAY_CONFIG.format(backend=b))
            status = free_port()
            # No per-connection access log (nginx stream and HAProxy log nothing by default).
            p = self.procs.start("gateway", [
                self.bins["gateway"], "--config-dir", d, "--listen", f"127.0.0.1:{port}",
                "--status-listen", f"127.0.0.1:{status}", "--metrics-listen", "127.0.0.1:0",
                "--admin-listen", "127.0.0.1:0", "--drain-duration", "0s",
                "--termination-deadline", "1s"], env={"RUST_LOG": "info,access=off"})
            wait_until(lambda: http_ok(f"http://127.0.0.1:{status}/healthz/ready"), 30,
                       "gateway ready")
        elif peer == "nginx":
            conf = f"{t}/nginx-stream.conf"
            with open(conf, "w") as f:
                f.write(NGINX_STREAM.format(tmp=t, port=port, backend=b, sni=SNI,
                                           nofile=self.a.fd_limit))
            p = self.procs.start("nginx-stream", [which("nginx"), "-c", conf, "-p", t, "-e",
                                                  f"{t}/nginx-stream.err"])
            wait_until(lambda: tcp_open(port), 20, "nginx stream")
        elif peer == "haproxy":
            conf = f"{t}/haproxy.cfg"
            with open(conf, "w") as f:
                f.write(HAPROXY.format(port=port, backend=b, sni=SNI, maxconn=self.a.fd_limit // 2 - 100))
            p = self.procs.start("haproxy", [which("haproxy"), "-db", "-f", conf])
            wait_until(lambda: tcp_open(port), 20, "haproxy")
        self.running[peer] = p
        return p

    def stop_peer(self, peer):
        p = self.running.pop(peer, None)
        if p:
            self.procs.stop(p)

    # --- load
    def wrk(self, port, path, conns, secs, close=False):
        argv = ["unshare", "-m", "sh", "-c",
                f'mount --bind "$0" /etc/hosts && exec "$@"', f"{self.tmp}/hosts",
                which("wrk"), "-t2", f"-c{conns}", f"-d{secs}s", "--latency", "--timeout", "5s"]
        if close:
            argv += ["-H", "Connection: close"]
        argv.append(f"https://{SNI}:{port}{path}")
        r = run(argv, secs + 60)
        if r.returncode:
            raise RuntimeError(f"wrk failed: {r.stderr or r.stdout}")
        w = parse_wrk(r.stdout)
        if w["non2xx"] or w["requests"] == 0:
            raise RuntimeError(f"wrk got {w['non2xx']} non-2xx of {w['requests']}: {r.stdout}")
        return w

    def measure(self, scen, peer):
        port = self.ports[peer]
        pids = tree(self.running[peer].pid) if peer in self.running else []
        secs = self.a.duration
        c0, t0 = cpu_s(pids), time.monotonic()
        if scen == "keepalive":
            w = self.wrk(port, "/small", 32, secs)
        elif scen == "newconn":
            w = self.wrk(port, "/small", 32, secs, close=True)
        else:
            w = self.wrk(port, "/bulk", 8, secs)
        cpu = cpu_s(pids) - c0 if pids else float("nan")
        w["cpu_s"] = cpu
        w["wall_s"] = time.monotonic() - t0
        if scen == "keepalive":
            w["cpu_us_per_unit"] = cpu / max(w["requests"], 1) * 1e6
        elif scen == "newconn":
            w["cpu_us_per_unit"] = cpu / max(w["requests"], 1) * 1e6
        else:
            gib = w["bytes"] / (1 << 30)
            w["cpu_s_per_gib"] = cpu / gib if gib else float("nan")
        return w

    def idle(self, peer, n):
        """RSS added per held-open TLS connection, on a freshly started proxy."""
        self.stop_peer(peer)
        self.start_peer(peer)
        port = self.ports[peer]
        # Warm up: one short run so lazily allocated per-worker state is there before the base.
        self.wrk(port, "/small", 4, 1)
        time.sleep(0.5)
        pids = tree(self.running[peer].pid)
        base = rss_kib(pids)
        self.holds += 1
        tag = f"hold-{peer}-{n}-{self.holds}"  # a fresh log per run: its `ready` line is ours
        h = self.procs.start(tag, [sys.executable, f"{HERE}/holdconns.py", "--host",
                                              "127.0.0.1", "--port", str(port), "--sni", SNI,
                                              "-n", str(n), "--timeout",
                                              str(self.a.idle_timeout), "--hold", "300"],
                             stdin=subprocess.PIPE)
        logf = os.path.join(self.tmp, f"{tag}.log")
        got = None
        end = time.monotonic() + self.a.idle_timeout + 30
        while time.monotonic() < end and h.poll() is None:
            with open(logf) as f:
                m = re.findall(r"ready (\d+) (\d+)", f.read())
            if m:
                got = (int(m[-1][0]), int(m[-1][1]))
                break
            time.sleep(0.2)
        if got is None:
            self.procs.stop(h)
            raise RuntimeError(f"holdconns did not report for {peer}")
        time.sleep(1.0)
        after = rss_kib(tree(self.running[peer].pid))
        h.stdin.close()
        try:
            h.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        self.procs.stop(h)
        held = got[0]
        return {"held": held, "failed": got[1], "rss_base_kib": base, "rss_after_kib": after,
                "kib_per_conn": (after - base) / held if held else float("nan")}

    def run(self, results, throughput=True, idle=True):
        self.setup()
        for p in self.PEERS:
            self.start_peer(p)
        scens = ["keepalive", "newconn", "bulk"] if throughput else []
        peers = list(self.PEERS)
        for rep in range(self.a.reps):
            for scen in scens:
                order = peers[rep % len(peers):] + peers[:rep % len(peers)]
                for peer in order:
                    log(f"gateway rep {rep + 1}/{self.a.reps} {scen} {peer}")
                    m = self.measure(scen, peer)
                    results.setdefault(scen, {}).setdefault(peer, []).append(m)
        for n in self.a.idle_conns if idle else []:
            proxies = ["gateway", "nginx", "haproxy"]
            for rep in range(self.a.idle_reps):
                order = proxies[rep % 3:] + proxies[:rep % 3]
                for peer in order:
                    log(f"idle {n} rep {rep + 1}/{self.a.idle_reps} {peer}")
                    m = self.idle(peer, n)
                    results.setdefault(f"idle{n}", {}).setdefault(peer, []).append(m)
        for p in list(self.running):
            self.stop_peer(p)
        self.procs.stop(self.backend)


UNITS = {"B": 1, "KB": 1 << 10, "MB": 1 << 20, "GB": 1 << 30, "TB": 1 << 40}
TIME = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def parse_wrk(out):
    def lat(label):
        m = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s|m)\s*$", out, re.M)
        return float(m.group(1)) * TIME[m.group(2)] if m else float("nan")

    m = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m), ([\d.]+)(B|KB|MB|GB|TB) read", out)
    if not m:
        raise RuntimeError(f"cannot parse wrk output:\n{out}")
    requests = int(m.group(1))
    secs = float(m.group(2)) * TIME[m.group(3)] / 1e3
    nbytes = float(m.group(4)) * UNITS[m.group(5)]
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"requests": requests, "secs": secs, "rps": requests / secs, "bytes": nbytes,
            "mib_s": nbytes / secs / (1 << 20), "p50_ms": lat("50"), "p99_ms": lat("99"),
            "errors": sum(int(x) for x in errs.groups()) if errs else 0,
            "non2xx": int(non2xx.group(1)) if non2xx else 0}


# ---------------------------------------------------------------- DNS scenario


def dns_query(name, qtype=1, qid=0x1234):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.rstrip(".").split("."):
        q += bytes([len(label)]) + label.encode()
    return q + b"\x00" + struct.pack(">HH", qtype, 1)


def dns_answers(port, name="s0.ns0.global"):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.5)
        s.sendto(dns_query(name), ("127.0.0.1", port))
        data, _ = s.recvfrom(4096)
        rcode = data[3] & 0xF
        ancount = struct.unpack(">H", data[6:8])[0]
        return rcode == 0 and ancount > 0


class DnsBench:
    def __init__(self, a, tmp, procs, bins):
        self.a, self.tmp, self.procs, self.bins = a, tmp, procs, bins
        self.ports, self.running = {}, {}
        self.peers = ["dns", "knot", "dnsmasq", "fwd-dns", "fwd-knot"]

    def names(self):
        return [(f"s{i}.ns{i % 50}.global", f"240.1.{i // 250}.{i % 250 + 1}")
                for i in range(self.a.dns_names)]

    def setup(self):
        t = self.tmp
        names = self.names()
        os.makedirs(f"{t}/dns-config", exist_ok=True)
        with open(f"{t}/dns-config/entries.yaml", "w") as f:
            for i, (n, ip) in enumerate(names):
                f.write(f"apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: "
                        f"{{name: s{i}, namespace: ns{i % 50}}}\nspec:\n  hosts: [{n}]\n"
                        f"  addresses: [{ip}]\n  location: MESH_INTERNAL\n  resolution: DNS\n"
                        f"  ports: [{{name: http, number: 8000, protocol: HTTP}}]\n---\n")
        os.makedirs(f"{t}/knot", exist_ok=True)
        with open(f"{t}/knot/global.zone", "w") as f:
            f.write("$ORIGIN global.\n$TTL 30\n@ SOA ns.global. hostmaster.global. 1 3600 600 "
                    "86400 30\n@ NS ns.global.\nns A 127.0.0.1\n")
            for n, ip in names:
                f.write(f"{n}. A {ip}\n")
        with open(f"{t}/dnsmasq.hosts", "w") as f:
            for n, ip in names:
                f.write(f"{ip} {n}\n")
        nx = max(1, len(names) // 9)  # ~10% of all queries
        queries = [f"{n} A" for n, _ in names] + [f"missing{i}.ns{i % 50}.global A"
                                                  for i in range(nx)]
        random.Random(7).shuffle(queries)
        with open(f"{t}/queries.txt", "w") as f:
            f.write("\n".join(queries) + "\n")

    def start(self, peer):
        t = self.tmp
        port = free_port()
        self.ports[peer] = port
        if peer == "dns":
            p = self.procs.start("dns", [
                self.bins["dns"], "--config-dir", f"{t}/dns-config", "--listen",
                f"127.0.0.1:{port}", "--status-listen", "127.0.0.1:0", "--metrics-listen",
                "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--drain-duration", "0s"],
                env={"RUST_LOG": "warn"})
        elif peer == "knot":
            conf = f"{t}/knot/knot.conf"
            with open(conf, "w") as f:
                f.write(f"server:\n  rundir: \"{t}/knot\"\n  listen: 127.0.0.1@{port}\n"
                        f"  udp-workers: 2\n  tcp-workers: 1\n  background-workers: 1\n"
                        f"database:\n  storage: \"{t}/knot\"\n"
                        f"log:\n  - target: stderr\n    any: warning\n"
                        f"template:\n  - id: default\n    storage: \"{t}/knot\"\n"
                        f"    semantic-checks: off\n    journal-content: none\n"
                        f"    zonefile-sync: -1\n"
                        f"zone:\n  - domain: global\n    file: global.zone\n")
            p = self.procs.start("knot", [which("knotd"), "-c", conf])
        elif peer == "dnsmasq":
            p = self.procs.start("dnsmasq", [
                which("dnsmasq"), "-k", "-C", "/dev/null", f"--port={port}",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                f"--addn-hosts={t}/dnsmasq.hosts", "--local=/global/", "--user=root",
                "--pid-file=", "--dns-forward-max=1000"])
        else:
            upstream = self.ports["dns" if peer == "fwd-dns" else "knot"]
            # A CoreDNS-style stub domain, cache off so every query reaches the upstream.
            p = self.procs.start(peer, [
                which("dnsmasq"), "-k", "-C", "/dev/null", f"--port={port}",
                "--listen-address=127.0.0.1", "--bind-interfaces", "--no-resolv", "--no-hosts",
                f"--server=/global/127.0.0.1#{upstream}", "--cache-size=0", "--user=root",
                "--pid-file=", "--dns-forward-max=1000"])
        self.running[peer] = p
        wait_until(lambda: dns_answers(port), 30, f"{peer} answering")

    def dnsperf(self, port, secs, qps=None, verbose=False):
        argv = [which("dnsperf"), "-s", "127.0.0.1", "-p", str(port), "-d",
                f"{self.tmp}/queries.txt", "-l", str(secs), "-c", "4", "-q", "200", "-t", "2"]
        if qps:
            argv += ["-Q", str(qps)]
        if verbose:
            argv.append("-v")
        r = run(argv, secs + 60)
        if r.returncode:
            raise RuntimeError(f"dnsperf failed: {r.stderr or r.stdout}")
        out = r.stdout
        g = lambda pat: float(re.search(pat, out).group(1))  # noqa: E731
        res = {"completed": int(g(r"Queries completed:\s+(\d+)")),
               "lost": int(g(r"Queries lost:\s+(\d+)")), "qps": g(r"Queries per second:\s+([\d.]+)"),
               "avg_ms": g(r"Average Latency \(s\):\s+([\d.]+)") * 1e3}
        if verbose:
            lat = sorted(float(x) * 1e3 for x in
                         re.findall(r"^> \S+ \S+ \S+ ([\d.]+)$", out, re.M))
            res.update({"samples": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99),
                        "p999_ms": pct(lat, 99.9)})
        return res

    def measure(self, scen, peer):
        pids = tree(self.running[peer].pid)
        if peer.startswith("fwd-"):
            pids += tree(self.running[peer[4:]].pid)
        fpids = tree(self.running[peer].pid)
        c0, f0 = cpu_s(pids), cpu_s(fpids)
        if scen == "dns_max":
            r = self.dnsperf(self.ports[peer], self.a.dns_duration)
        else:
            r = self.dnsperf(self.ports[peer], self.a.dns_duration, qps=self.a.dns_rate,
                             verbose=True)
        cpu = cpu_s(pids) - c0
        r["cpu_us_per_query"] = cpu / max(r["completed"], 1) * 1e6
        if peer.startswith("fwd-"):
            # The server behind the forwarder alone.
            r["upstream_cpu_us_per_query"] = (cpu - (cpu_s(fpids) - f0)) / max(
                r["completed"], 1) * 1e6
        return r

    def run(self, results):
        self.setup()
        for p in self.peers:
            self.start(p)
        for rep in range(self.a.reps):
            for scen in ["dns_max", "dns_rate"]:
                peers = self.peers
                order = peers[rep % len(peers):] + peers[:rep % len(peers)]
                for peer in order:
                    log(f"dns rep {rep + 1}/{self.a.reps} {scen} {peer}")
                    results.setdefault(scen, {}).setdefault(peer, []).append(
                        self.measure(scen, peer))
        for p in self.running.values():
            self.procs.stop(p)


# ---------------------------------------------------------------- report


def ratios(results, scen, key, ours, peer):
    a, b = results.get(scen, {}).get(ours, []), results.get(scen, {}).get(peer, [])
    out = []
    for x, y in zip(a, b):
        if y.get(key) and y[key] == y[key] and x.get(key) == x.get(key):
            out.append(x[key] / y[key])
    return out


def med(results, scen, peer, key):
    vals = [m[key] for m in results.get(scen, {}).get(peer, []) if m.get(key) == m.get(key)]
    return statistics.median(vals) if vals else float("nan")


def report(results, a):
    rows = []  # (section, metric, peer, ours median, peer median, ratio summary)

    def add(section, scen, key, label, peers, ours="gateway"):
        for p in peers:
            if scen not in results or p not in results[scen]:
                continue
            rows.append((section, label, p, fmt(med(results, scen, ours, key)),
                         fmt(med(results, scen, p, key)),
                         summary(ratios(results, scen, key, ours, p))))

    g = "gateway"
    add(g, "keepalive", "rps", "keep-alive req/s (32 conns)", ["nginx", "haproxy", "direct"])
    add(g, "keepalive", "p50_ms", "keep-alive p50 ms", ["nginx", "haproxy", "direct"])
    add(g, "keepalive", "p99_ms", "keep-alive p99 ms", ["nginx", "haproxy", "direct"])
    add(g, "keepalive", "cpu_us_per_unit", "proxy CPU us/request", ["nginx", "haproxy"])
    add(g, "newconn", "rps", "new TLS conns/s (Connection: close)", ["nginx", "haproxy", "direct"])
    add(g, "newconn", "cpu_us_per_unit", "proxy CPU us/connection", ["nginx", "haproxy"])
    add(g, "bulk", "mib_s", "bulk MiB/s (1 MiB bodies)", ["nginx", "haproxy", "direct"])
    add(g, "bulk", "cpu_s_per_gib", "proxy CPU s/GiB", ["nginx", "haproxy"])
    for n in a.idle_conns:
        add(g, f"idle{n}", "kib_per_conn", f"RSS KiB per idle TLS conn ({n})",
            ["nginx", "haproxy"])
    d = "dns"
    add(d, "dns_max", "qps", "max QPS (dnsperf)", ["knot", "dnsmasq"], ours="dns")
    add(d, "dns_max", "cpu_us_per_query", "server CPU us/query", ["knot", "dnsmasq"], ours="dns")
    add(d, "dns_max", "qps", "max QPS via dnsmasq forwarder", ["fwd-knot"], ours="fwd-dns")
    add(d, "dns_max", "upstream_cpu_us_per_query", "upstream CPU us/query via forwarder",
        ["fwd-knot"], ours="fwd-dns")
    for k, lab in [("p50_ms", "p50"), ("p99_ms", "p99"), ("p999_ms", "p99.9")]:
        add(d, "dns_rate", k, f"{lab} ms at {a.dns_rate} QPS", ["knot", "dnsmasq"], ours="dns")
    for k, lab in [("p99_ms", "p99"), ("p999_ms", "p99.9")]:
        add(d, "dns_rate", k, f"{lab} ms at {a.dns_rate} QPS via forwarder", ["fwd-knot"],
            ours="fwd-dns")
    add(d, "dns_rate", "cpu_us_per_query", f"server CPU us/query at {a.dns_rate} QPS",
        ["knot", "dnsmasq"], ours="dns")

    lines = ["| area | metric | vs | ours (median) | peer (median) | ratio ours/peer: median (min-max) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| " + " | ".join(r) + " |")
    return "\n".join(lines)


def machine():
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024
    return {"nproc": os.cpu_count(), "cpu": model, "mem_mib": mem,
            "kernel": platform.release(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}


def versions():
    v = {}
    for name, argv in [("nginx", ["nginx", "-v"]), ("haproxy", ["haproxy", "-v"]),
                       ("knot", ["knotd", "-V"]), ("dnsmasq", ["dnsmasq", "-v"]),
                       ("wrk", ["wrk", "-v"]), ("dnsperf", ["dnsperf", "-h"])]:
        exe = which(argv[0])
        if not exe:
            continue
        r = run([exe] + argv[1:], 10)
        text = (r.stdout + r.stderr).strip().splitlines()
        m = [line for line in text if re.search(r"\d+\.\d+", line)]
        v[name] = (m[0] if m else "").strip()[:80]
    return v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin-dir", required=True)
    ap.add_argument("--quick", action="store_true", help="a seconds-long smoke run")
    ap.add_argument("--only", default="gateway,idle,dns,eds",
                    help="gateway (throughput), idle (held-open connections), dns, eds")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=int, default=8, help="seconds per gateway load run")
    ap.add_argument("--idle-conns", default="1000,10000")
    ap.add_argument("--idle-reps", type=int, default=2)
    ap.add_argument("--idle-timeout", type=int, default=180)
    ap.add_argument("--dns-duration", type=int, default=8)
    ap.add_argument("--dns-rate", type=int, default=5000)
    ap.add_argument("--dns-names", type=int, default=1000)
    ap.add_argument("--eds-services", type=int, default=10000)
    ap.add_argument("--eds-streams", type=int, default=100)
    ap.add_argument("--eds-changes", type=int, default=10)
    ap.add_argument("--json", help="also write raw results here")
    a = ap.parse_args()
    if a.quick:
        a.reps, a.duration, a.idle_conns, a.idle_reps = 1, 1, "50", 1
        a.dns_duration, a.dns_rate, a.dns_names = 1, 500, 50
        a.eds_services, a.eds_streams, a.eds_changes = 200, 5, 2
        a.idle_timeout = 30
    a.idle_conns = [int(x) for x in str(a.idle_conns).split(",") if x]
    only = set(a.only.split(","))

    # Every held-open connection costs each proxy two descriptors (the gateway creates a pipe
    # pair only for a direction that turns bulk): the test needs about 2n. Raise the limit as
    # far as allowed and cap n to fit (a container may cap the hard limit), the same n for
    # every peer.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    a.fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    cap = a.fd_limit // 2 - 300
    if any(n > cap for n in a.idle_conns):
        log(f"descriptor limit {a.fd_limit}: held-open connections capped at {cap}")
        a.idle_conns = sorted({min(n, cap) for n in a.idle_conns})

    bins = {n: os.path.join(a.bin_dir, n) for n in ["gateway", "dns", "remote-secrets",
                                                     "eds-bench"]}
    tmp = tempfile.mkdtemp(prefix="bench.")
    procs = Procs(tmp)
    results, eds = {}, None
    started = time.monotonic()

    def on_signal(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    failed = []
    try:
        if "gateway" in only or "idle" in only:
            try:
                GatewayBench(a, tmp, procs, bins).run(results, "gateway" in only, "idle" in only)
            except Exception as e:  # report what was measured, and why the rest was not
                failed.append(f"gateway: {e}")
                log(f"gateway bench failed: {e}")
        if "dns" in only:
            try:
                DnsBench(a, tmp, procs, bins).run(results)
            except Exception as e:
                failed.append(f"dns: {e}")
                log(f"dns bench failed: {e}")
        if "eds" in only:
            log("eds")
            r = run([bins["eds-bench"], "--server", bins["remote-secrets"], "--services",
                     str(a.eds_services), "--streams", str(a.eds_streams), "--changes",
                     str(a.eds_changes)], 900)
            if r.returncode:
                failed.append(f"eds: {r.stderr[-2000:]}")
            else:
                eds = json.loads(r.stdout.strip().splitlines()[-1])
    finally:
        procs.stop_all()
        keep = os.environ.get("BENCH_KEEP_TMP")
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept {tmp}")

    m = machine()
    print(f"\n## Results ({m['date']}; {m['nproc']} CPUs, {m['cpu']}, {m['mem_mib']} MiB; "
          f"kernel {m['kernel']})\n")
    print(f"reps={a.reps} duration={a.duration}s dns_duration={a.dns_duration}s "
          f"quick={a.quick}; wall {time.monotonic() - started:.0f}s\n")
    print(report(results, a))
    if eds:
        print("\n### EDS\n")
        print("```\n" + json.dumps(eds, indent=1) + "\n```")
    print("\n### Peers\n")
    for k, v in versions().items():
        print(f"- {k}: {v}")
    if failed:
        print("\n### Failed\n")
        for f in failed:
            print(f"- {f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": m, "args": vars(a), "results": results, "eds": eds,
                       "failed": failed}, f, indent=1, default=str)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
