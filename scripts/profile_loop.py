"""The user-space half of one worker's per-packet cost, without the kernel's share.

No root, no lab: an AF_UNIX SOCK_SEQPACKET socketpair stands in for the netlink socket
(as in tests/unit/test_nfqueue_queue.py), carrying packet messages laid out as the
kernel lays out an in2out UDP packet (NFQA_PACKET_HDR, in/out interface indexes, mark,
hardware address, payload).  ``NetlinkQueue.receive`` drains them into the real table's
``in2out`` (the bench's config, one existing flow) and sends the verdicts back in one
``sendmsg``.  Timed per packet at several batch sizes (packets waiting per drain), with
the attribute walk (``parse_message``) or the shape cache (``ShapeCache.parse``).  The
wake-up itself is timed apart: ``selectors`` against ``select.epoll``.

    scripts/profile_loop.py [--packets 20000] [--repeats 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import select
import selectors
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.adapters.nfqueue import NetlinkQueue  # noqa: E402
from gateway.adapters.nfqueue.codec import parse_message  # noqa: E402
from gateway.core.table import TranslationTable  # noqa: E402

QUEUE = 0
POST_ROUTING = 4


def _nla(atype: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), atype) + value + b"\0" * ((-len(value)) & 3)


def packet_message(pid: int, payload: bytes) -> bytes:
    """An NFQNL_MSG_PACKET as nfqnl_build_packet_message lays out a forwarded packet."""
    attrs = (_nla(1, struct.pack(">IHB", pid, 0x0800, POST_ROUTING)) + _nla(4, struct.pack(">I", 2))
             + _nla(5, struct.pack(">I", 3)) + _nla(3, struct.pack(">I", 0x20000000))
             + _nla(9, struct.pack(">HHxx", 6, 0) + b"\x02\x00\x00\x00\x00\x01\x00\x00")
             + _nla(10, payload))
    body = struct.pack("=BBH", socket.AF_INET, 0, socket.htons(QUEUE)) + attrs
    return struct.pack("=IHHII", 16 + len(body), 0x300, 0, 0, 0) + body


def measure(packets: int, repeats: int, batches: Sequence[int]) -> dict[str, Any]:
    import bench

    table = TranslationTable(bench._model(0), 1000.0)
    tmpl = bytes(bench._udp(bench.SETUPS["default"].backend, bench.SERVER, 40000, 5201))
    table.in2out(bytearray(tmpl), 1000.0)
    msgs = [packet_message(i + 1, tmpl) for i in range(max(batches))]
    out: dict[str, Any] = {"packets": packets, "repeats": repeats, "per_packet_us": {}}

    def handler(payload: memoryview, hook: int, info: int) -> int:
        return table.in2out(payload, 1000.0)

    for mode in ("parse_message", "shapes"):
        for batch in batches:
            ours, kernel = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            kernel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            ours.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            q = NetlinkQueue.__new__(NetlinkQueue)
            q._attach(ours, QUEUE)
            if mode == "parse_message":
                q.shapes = SimpleNamespace(parse=parse_message, shapes=[], hits=0)  # type: ignore[assignment]
            best = float("inf")
            for _ in range(repeats):
                spent = 0.0
                done = 0
                while done < packets:
                    for m in msgs[:batch]:
                        kernel.send(m)
                    t0 = time.perf_counter()
                    done += q.receive(handler, 256)
                    spent += time.perf_counter() - t0
                    while True:  # the verdicts, off the clock
                        try:
                            kernel.recv(1 << 20, socket.MSG_DONTWAIT)
                        except BlockingIOError:
                            break
                best = min(best, spent / done)
            out["per_packet_us"][f"{mode}/batch {batch}"] = best * 1e6
            ours.close()
            kernel.close()
    out["wakeup_us"] = wakeups(20000)
    return out


def wakeups(n: int) -> dict[str, float]:
    """One ready-socket wait: selectors.DefaultSelector().select against epoll.poll."""
    a, b = socket.socketpair()
    b.send(b"x")
    sel = selectors.DefaultSelector()
    sel.register(a, selectors.EVENT_READ)
    ep = select.epoll()
    ep.register(a.fileno(), select.EPOLLIN)
    res = {}
    for name, fn in (("selectors", lambda: sel.select(0)), ("epoll", lambda: ep.poll(0))):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        res[name] = (time.perf_counter() - t0) / n * 1e6
    a.close()
    b.close()
    return res


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--packets", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default="")
    a = p.parse_args(argv)
    out = measure(a.packets, a.repeats, (1, 4, 16, 64, 256))
    for k, v in out["per_packet_us"].items():
        print(f"  {k:28} {v:6.2f} us per packet")
    for k, v in out["wakeup_us"].items():
        print(f"  wake-up, {k:19} {v:6.2f} us")
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
