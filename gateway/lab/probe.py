"""A tiny scripted UDP/TCP client, run inside a namespace: ``python -m gateway.lab.probe SPEC``.

SPEC is JSON: ``{"sockets": [...], "steps": [...]}``.  The probe prints one JSON line per
step as soon as the step is done, so a caller can react while it is still running
(:class:`gateway.lab.clients.ProbeProc`).  Everything is bounded: receive timeouts come
from the spec, a ``sleep`` step is capped at 30 s and ``many`` at 5000 sockets.

Sockets: ``{"src": ip, "sport": n, "reuse": bool, "connect": [ip, port]}`` (UDP).
Steps (lists):

* ``["send", i, dst, dport, text]``: from socket i (``dst`` None: to its connected peer);
* ``["recv", i, timeout]``: ``{"data", "from"}``, ``{"timeout": true}`` or ``{"error"}``;
* ``["sleep", s]``: pace the traffic (e.g. keepalives once a second);
* ``["tcp", src, dst, dport, timeout]``: one connect attempt, ``{"result": ...}``;
* ``["many", src, dst, dport, count, timeout, text]``: ``count`` new UDP flows at once,
  ``{"ports": [...], "replies": [text or None, ...]}``.
"""

from __future__ import annotations

import contextlib
import json
import select
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

MAX_SLEEP = 30.0
MAX_MANY = 5000


def out(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)


def open_sockets(specs: Sequence[dict[str, Any]]) -> list[socket.socket]:
    socks = []
    for s in specs:
        k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if s.get("reuse"):
            k.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        k.bind((s["src"], s.get("sport", 0)))
        if s.get("connect"):
            k.connect(tuple(s["connect"]))
        socks.append(k)
    return socks


def send(socks: list[socket.socket], i: int, dst: str | None, dport: int, payload: str) -> None:
    try:
        if dst is None:
            socks[i].send(payload.encode())
        else:
            socks[i].sendto(payload.encode(), (dst, dport))
        out({"op": "send"})
    except OSError as e:
        out({"op": "send", "error": type(e).__name__})


def recv(socks: list[socket.socket], i: int, timeout: float) -> None:
    socks[i].settimeout(timeout)
    try:
        data, addr = socks[i].recvfrom(65535)
        out({"op": "recv", "data": data.decode(errors="replace"), "from": [addr[0], addr[1]]})
    except TimeoutError:
        out({"op": "recv", "timeout": True})
    except OSError as e:
        out({"op": "recv", "error": type(e).__name__})


def tcp(src: str, dst: str, dport: int, timeout: float) -> None:
    k = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    k.settimeout(timeout)
    try:
        k.bind((src, 0))
        k.connect((dst, dport))
        res = "connected"
    except TimeoutError:
        res = "timeout"
    except OSError as e:
        res = type(e).__name__
    finally:
        k.close()
    out({"op": "tcp", "result": res})


def many(src: str, dst: str, dport: int, count: int, timeout: float, payload: str) -> None:
    count = min(int(count), MAX_MANY)
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            k = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            k.bind((src, 0))
            k.setblocking(False)
            socks.append(k)
        ports = [k.getsockname()[1] for k in socks]
        for k in socks:
            with contextlib.suppress(BlockingIOError):  # a full buffer loses this one
                k.sendto(payload.encode(), (dst, dport))
        replies: dict[int, str] = {}
        by_fd = {k.fileno(): n for n, k in enumerate(socks)}
        poller = select.poll()
        for k in socks:
            poller.register(k, select.POLLIN)
        deadline = time.monotonic() + timeout
        while len(replies) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for fd, _ev in poller.poll(left * 1000):
                n = by_fd[fd]
                try:
                    replies[n] = socks[n].recv(65535).decode(errors="replace")
                except OSError as e:
                    replies[n] = "error " + type(e).__name__
                poller.unregister(fd)
        out({"op": "many", "ports": ports, "replies": [replies.get(n) for n in range(count)]})
    finally:
        for k in socks:
            k.close()


def run(spec: dict[str, Any]) -> None:
    socks = open_sockets(spec.get("sockets", []))
    out({"op": "open", "ports": [k.getsockname()[1] for k in socks]})
    for step in spec.get("steps", []):
        op, args = step[0], step[1:]
        if op == "send":
            send(socks, *args)
        elif op == "recv":
            recv(socks, *args)
        elif op == "sleep":
            time.sleep(min(float(args[0]), MAX_SLEEP))  # pacing asked for by the spec
        elif op == "tcp":
            tcp(*args)
        elif op == "many":
            many(*args)
        else:
            raise ValueError(f"unknown probe step {op!r}")
    out({"op": "done"})


def main(argv: Sequence[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    run(json.loads(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
