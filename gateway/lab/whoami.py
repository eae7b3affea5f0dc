"""whoami: the lab's "what is my public address" service, run in the internet namespace.

It answers with the source address and port *as the far side sees them*, which is the only
honest way to check a NAT, and it logs every peer it saw as one JSON line so tests can
assert on what actually reached the internet:

* TCP (HTTP/1.0 style): any request gets ``<src_ip>:<src_port>\\n`` and the connection is
  closed (``Connection: close``).  One log line per accepted connection.
* UDP: every datagram gets ``<src_ip>:<src_port>\\n`` back, sent *from the address it was
  sent to* (IP_PKTINFO), so a flow to the second server address gets its reply from that
  address and a NAT that checks the remote endpoint accepts it.  One log line per datagram.
* ``PUSHLATER <seconds>``: replied to at once, then again after the delay with
  ``late <src_ip>:<src_port>\\n`` to the same peer: a return packet that arrives after the
  flow may have expired.  At most 10 pending pushes per peer (and 10000 in all), delay
  capped at 600 s, so a misbehaving test cannot make the service flood anyone.

Log line: ``{"proto": "tcp"|"udp", "src": ip, "sport": n, "dst": ip, "dport": n, "ts": t}``.

``--show-local`` makes every answer ``<src_ip>:<src_port> at <local_ip>:<local_port>``: the
lab's inbound member listeners (:mod:`gateway.lab.inbound`) run whoami that way in the
backend namespace, one process per member address, so a client of a load-balanced port
sees which member answered and what source that member saw.

Run: ``python -m gateway.lab.whoami --http-port 80 --udp-port 5000 --log FILE``; the lab
adds ``--daemon --pid-file P``, which returns once the sockets are bound.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import select
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

IP_PKTINFO = int(getattr(socket, "IP_PKTINFO", 8))  # Linux value; Python 3.11 lacks the name
PKTINFO = struct.Struct("@I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr

MAX_PUSH_PER_PEER = 10
MAX_PUSH_TOTAL = 10_000
MAX_PUSH_DELAY = 600.0
HTTP_READ_TIMEOUT = 5.0
HTTP_MAX_REQUEST = 16 * 1024
UDP_MAX_DATAGRAM = 65535
UDP_BATCH = 256  # datagrams handled per readiness callback before yielding to the loop


def peer_text(ip: str, port: int, local: tuple[str, int] | None = None) -> bytes:
    """The answer body: the peer as this host sees it; with ``local`` (``--show-local``)
    also the address and port that answered, ``"ip:port at lip:lport"``, so a client of
    a load-balanced port can tell which member it reached."""
    if local is None:
        return f"{ip}:{port}\n".encode()
    return f"{ip}:{port} at {local[0]}:{local[1]}\n".encode()


def parse_push(data: bytes) -> float | None:
    """Delay in seconds if ``data`` is a ``PUSHLATER <seconds>`` request, else None.

    The delay is clamped to [0, MAX_PUSH_DELAY]; a malformed number is not a push.
    """
    if not data.startswith(b"PUSHLATER"):
        return None
    parts = data.split()
    if len(parts) < 2 or parts[0] != b"PUSHLATER":
        return None
    try:
        delay = float(parts[1])
    except ValueError:
        return None
    if delay != delay:  # NaN
        return None
    return min(max(delay, 0.0), MAX_PUSH_DELAY)


def http_response(
    request: bytes, ip: str, port: int, local: tuple[str, int] | None = None
) -> bytes:
    """A complete HTTP/1.0 response for ``request`` (GET/HEAD: 200, anything else: 400)."""
    body = peer_text(ip, port, local)
    method = request.split(b" ", 1)[0] if request else b""
    status = "200 OK" if method in (b"GET", b"HEAD") else "400 Bad Request"
    head = (
        f"HTTP/1.0 {status}\r\n"
        "Content-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode()
    return head if method == b"HEAD" else head + body


def pktinfo_local(anc: list[tuple[int, int, bytes]]) -> bytes | None:
    """The local address a datagram was sent to, from its IP_PKTINFO ancillary data."""
    for level, kind, payload in anc:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(payload) >= PKTINFO.size:
            _ifindex, _spec, addr = PKTINFO.unpack_from(payload)
            return bytes(addr)
    return None


def send_from(sock: socket.socket, payload: bytes, addr: tuple[str, int], local: bytes | None) -> None:
    """Send ``payload`` to ``addr`` from the local address ``local`` (the one the peer asked),
    so that a peer with a connected socket, or a NAT checking the remote endpoint, accepts it."""
    anc = []
    if local is not None:
        anc = [(socket.IPPROTO_IP, IP_PKTINFO, PKTINFO.pack(0, local, b"\0\0\0\0"))]
    # A full socket buffer or an unreachable peer loses this reply only (UDP semantics).
    with contextlib.suppress(OSError):
        sock.sendmsg([payload], anc, 0, addr)


@dataclass(slots=True)
class PeerLog:
    """Appends one flushed JSON line per seen peer (None path: logging off)."""

    path: Path | None
    _fh: IO[str] | None = field(default=None, init=False)

    def open(self) -> None:
        if self.path is not None:
            self._fh = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def write(self, proto: str, src: str, sport: int, dst: str, dport: int) -> None:
        if self._fh is None:
            return
        rec = {"proto": proto, "src": src, "sport": sport, "dst": dst, "dport": dport,
               "ts": round(time.time(), 6)}
        try:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk must not take the service down
            print(f"whoami: log write failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


@dataclass(slots=True)
class UdpEcho:
    """UDP side: echo the peer, log it, schedule bounded late pushes."""

    sock: socket.socket
    log: PeerLog
    loop: asyncio.AbstractEventLoop
    show_local: bool = False
    pending: dict[tuple[str, int], int] = field(default_factory=dict)
    pending_total: int = 0

    def start(self) -> None:
        self.loop.add_reader(self.sock.fileno(), self.on_readable)

    def stop(self) -> None:
        self.loop.remove_reader(self.sock.fileno())

    def on_readable(self) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(
                    UDP_MAX_DATAGRAM, socket.CMSG_SPACE(PKTINFO.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error: nothing to answer
            src, sport = addr[0], int(addr[1])
            local = pktinfo_local(anc)
            dst = socket.inet_ntoa(local) if local else self.sock.getsockname()[0]
            dport = int(self.sock.getsockname()[1])
            self.log.write("udp", src, sport, dst, dport)
            self._send(peer_text(src, sport, (dst, dport) if self.show_local else None), addr, local)
            delay = parse_push(data)
            if delay is not None:
                self._schedule_push(delay, (src, sport), local)

    def _send(self, payload: bytes, addr: tuple[str, int], local: bytes | None) -> None:
        send_from(self.sock, payload, addr, local)

    def _schedule_push(self, delay: float, peer: tuple[str, int], local: bytes | None) -> None:
        if self.pending.get(peer, 0) >= MAX_PUSH_PER_PEER or self.pending_total >= MAX_PUSH_TOTAL:
            return
        self.pending[peer] = self.pending.get(peer, 0) + 1
        self.pending_total += 1
        self.loop.call_later(delay, self._push, peer, local)

    def _push(self, peer: tuple[str, int], local: bytes | None) -> None:
        left = self.pending.get(peer, 1) - 1
        if left <= 0:
            self.pending.pop(peer, None)
        else:
            self.pending[peer] = left
        self.pending_total -= 1
        self._send(b"late " + peer_text(*peer), peer, local)


def make_http_handler(
    log: PeerLog, show_local: bool = False
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The per-connection coroutine for asyncio.start_server."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            peer = writer.get_extra_info("peername")
            local = writer.get_extra_info("sockname")
            if not peer or not local:
                return
            src, sport = str(peer[0]), int(peer[1])
            here = (str(local[0]), int(local[1]))
            log.write("tcp", src, sport, *here)
            try:
                request = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), timeout=HTTP_READ_TIMEOUT
                )
            except asyncio.IncompleteReadError as exc:
                request = exc.partial
                if not request:
                    return  # connect-and-close: logged, nothing to answer
            except (TimeoutError, asyncio.LimitOverrunError, OSError):
                request = b""
            writer.write(http_response(request, src, sport, here if show_local else None))
            await asyncio.wait_for(writer.drain(), timeout=HTTP_READ_TIMEOUT)
        except (TimeoutError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(writer.wait_closed(), timeout=HTTP_READ_TIMEOUT)

    return handle


def bind_sockets(bind: str, http_port: int, udp_port: int) -> tuple[socket.socket, socket.socket]:
    """Bind both sockets up front (before daemonising) so that readiness means listening."""
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((bind, http_port))
    tcp.listen(1024)
    tcp.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    with contextlib.suppress(OSError):
        udp.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
    udp.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
    udp.bind((bind, udp_port))
    udp.setblocking(False)
    return tcp, udp


async def serve(
    tcp: socket.socket, udp: socket.socket, log: PeerLog, show_local: bool = False
) -> None:
    """Serve until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(
        make_http_handler(log, show_local), sock=tcp, limit=HTTP_MAX_REQUEST
    )
    echo = UdpEcho(udp, log, loop, show_local)
    echo.start()
    try:
        await stop.wait()
    finally:
        echo.stop()
        server.close()


def daemonize(stderr_path: str | None) -> int:
    """Classic double fork; returns the write end of a pipe the ready signal goes to.

    The original process waits (bounded) for that signal and exits 0 only then, so the
    caller knows the service is listening when the command returns.
    """
    r, w = os.pipe()
    if os.fork() > 0:
        os.close(w)
        ready, _, _ = select.select([r], [], [], 10.0)
        data = os.read(r, 16) if ready else b""
        os._exit(0 if data == b"ok" else 1)
    os.close(r)
    os.setsid()
    if os.fork() > 0:
        os._exit(0)
    os.chdir("/")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    out = (
        os.open(stderr_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if stderr_path
        else devnull
    )
    os.dup2(out, 1)
    os.dup2(out, 2)
    return w


def write_pid(path: str) -> None:
    tmp = f"{path}.tmp"
    Path(tmp).write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="whoami", description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=5000)
    p.add_argument("--bind", default="0.0.0.0", help="listen address (default: all)")
    p.add_argument("--log", default=None, help="JSON-lines file of every seen peer")
    p.add_argument("--pid-file", default=None)
    p.add_argument("--stderr", default=None, help="with --daemon: where stderr goes")
    p.add_argument("--daemon", action="store_true", help="detach once listening")
    p.add_argument("--show-local", action="store_true",
                   help="answer 'ip:port at local_ip:local_port' (an inbound member listener)")
    args = p.parse_args(argv)

    try:
        tcp, udp = bind_sockets(args.bind, args.http_port, args.udp_port)
    except OSError as exc:
        print(f"whoami: cannot bind: {exc}", file=sys.stderr)
        return 1
    ready_fd = daemonize(args.stderr) if args.daemon else None
    log = PeerLog(Path(args.log) if args.log else None)
    log.open()
    if args.pid_file:
        write_pid(args.pid_file)
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    try:
        asyncio.run(serve(tcp, udp, log, args.show_local))
    finally:
        log.close()
        if args.pid_file:
            with contextlib.suppress(OSError):
                if Path(args.pid_file).read_text().strip() == str(os.getpid()):
                    os.unlink(args.pid_file)
    return 0


if __name__ == "__main__":
    sys.exit(main())
