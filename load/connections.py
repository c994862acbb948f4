#!/usr/bin/env python3
"""Holds N TLS connections with a device certificate open against one server: the first half
send a whole request, read the answer and stay idle on keep-alive; the other half send half a
request header and stop. Prints READY when all are open, then every second how many are still
open, until stdin closes.  connections.py PORT N DIR"""
import asyncio
import os
import resource
import ssl
import sys

port, n, d = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
# MODE: mixed (half and half), idle (all after a request) or half (all with half a header).
mode = os.environ.get("MODE", "mixed")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
ctx = ssl.create_default_context(cafile=f"{d}/edge-ca.pem")
ctx.load_cert_chain(f"{d}/device.pem", f"{d}/device.key")
ctx.check_hostname = False
held = []
failed = 0


async def one(i, gate):
    global failed
    async with gate:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="localhost")
            if mode == "idle" or (mode == "mixed" and i % 2 == 0):
                w.write(b"GET /files/manifest.json?size=512 HTTP/1.1\r\nHost: localhost\r\n\r\n")
                await w.drain()
                head = await r.readuntil(b"\r\n\r\n")
                length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n") if l.lower().startswith(b"content-length"))
                await r.readexactly(length)
            else:
                w.write(b"GET /files/manifest.json HTTP/1.1\r\nHost: localhost\r\nX-Slow: ")
                await w.drain()
            held.append((r, w))
        except Exception as e:  # noqa: BLE001 - counted and reported
            failed += 1
            if failed <= 3:
                print(f"connection {i}: {e!r}", file=sys.stderr, flush=True)


async def main():
    gate = asyncio.Semaphore(64)
    await asyncio.gather(*(one(i, gate) for i in range(n)))
    print(f"READY open={len(held)} failed={failed}", flush=True)
    loop = asyncio.get_running_loop()
    done = loop.run_in_executor(None, sys.stdin.read)
    while not done.done():
        await asyncio.sleep(1)
        alive = sum(1 for r, _ in held if not r.at_eof())
        print(f"alive={alive}", flush=True)
    for _, w in held:
        w.close()


asyncio.run(main())
