#!/usr/bin/env python3
"""Hold N TLS connections open to HOST:PORT (127.0.0.0/8 only) and wait.

Each connection completes its TLS handshake (SNI --sni, no certificate check: the backend's
certificate is self-signed), then sends nothing. Prints `ready <n> <failed>` once all are
handled, then holds them until stdin closes or --hold seconds pass, whichever is first.
Everything is bounded: --timeout for the whole connect phase, --parallel handshakes at once.
"""

import argparse
import asyncio
import ipaddress
import resource
import ssl
import sys


async def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--sni", required=True)
    p.add_argument("-n", type=int, required=True)
    p.add_argument("--parallel", type=int, default=200)
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--hold", type=float, default=120.0)
    a = p.parse_args()
    if not ipaddress.ip_address(a.host).is_loopback:
        print(f"{a.host} is not a loopback address", file=sys.stderr)
        return 2
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = a.n + 1000
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))

    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    sem = asyncio.Semaphore(a.parallel)
    held = []
    failed = 0

    async def one() -> None:
        nonlocal failed
        async with sem:
            try:
                r, w = await asyncio.wait_for(
                    asyncio.open_connection(a.host, a.port, ssl=ctx, server_hostname=a.sni),
                    timeout=10,
                )
                held.append(w)
            except (OSError, asyncio.TimeoutError, ssl.SSLError):
                failed += 1

    try:
        await asyncio.wait_for(asyncio.gather(*(one() for _ in range(a.n))), timeout=a.timeout)
    except asyncio.TimeoutError:
        pass
    print(f"ready {len(held)} {failed}", flush=True)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(loop.run_in_executor(None, sys.stdin.read), timeout=a.hold)
    except asyncio.TimeoutError:
        pass
    for w in held:
        w.transport.abort()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
