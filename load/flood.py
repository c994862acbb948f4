#!/usr/bin/env python3
"""flood.py flood PORT DIR SECONDS: handshakes with an untrusted certificate, as fast as one
client can, for SECONDS, from 127.0.0.2 (the devices come from 127.0.0.1); prints how many it
made (nginx answers them with an HTTP 400 after the handshake, the edge refuses them in it).
flood.py probe PORT DIR N: N requests by a valid device, each on a new connection (handshake
included); prints p50 and p95 in ms."""
import socket
import ssl
import sys
import time

mode, port, d, arg = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]


def context(cert, key):
    ctx = ssl.create_default_context(cafile=f"{d}/edge-ca.pem")
    ctx.check_hostname = False
    ctx.load_cert_chain(cert, key)
    return ctx


if mode == "flood":
    ctx = context(f"{d}/fleet-b-device.pem", f"{d}/fleet-b-device.key")
    end, made = time.time() + float(arg), 0
    while time.time() < end:
        made += 1
        try:
            with socket.create_connection(("127.0.0.1", port), source_address=("127.0.0.2", 0)) as s, ctx.wrap_socket(
                s, server_hostname="localhost"
            ) as t:
                t.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
                t.recv(1)
        except (ssl.SSLError, OSError):
            pass
    print(made)
else:
    ctx = context(f"{d}/device.pem", f"{d}/device.key")
    times = []
    for _ in range(int(arg)):
        t0 = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with ctx.wrap_socket(s, server_hostname="localhost") as t:
                t.sendall(b"GET /files/manifest.json?size=512 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
                while t.recv(65536):
                    pass
        times.append((time.perf_counter() - t0) * 1000)
        time.sleep(0.02)
    times.sort()
    print(f"{times[len(times) // 2]:.1f} {times[int(len(times) * 0.95)]:.1f}")
