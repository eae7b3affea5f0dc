"""What the lab's own services share: whoami (:mod:`gateway.lab.whoami`, also the inbound
member listeners of :mod:`gateway.lab.inbound`) and the myip DNS responder
(:mod:`gateway.lab.dns`).

Each binds its sockets first, then (``--daemon``) detaches and tells the caller it is
ready only once it listens, writes its pid file, logs one JSON line per thing it saw (so a
test asserts on what the far side received), serves TCP with asyncio and UDP from a
reader callback until SIGTERM/SIGINT, and removes its pid file when it stops.  UDP
answers leave from the address the datagram was sent to (IP_PKTINFO), so a peer with a
connected socket, or a NAT checking the remote endpoint, accepts them.
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
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, TypeVar

IP_PKTINFO = int(getattr(socket, "IP_PKTINFO", 8))  # Linux value; Python 3.11 lacks the name
PKTINFO = struct.Struct("@I4s4s")  # struct in_pktinfo: ifindex, spec_dst, addr
#: asyncio's own default for a stream's buffer limit.
STREAM_LIMIT = 2**16

S = TypeVar("S")
TcpHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


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
class JsonLog:
    """Appends one flushed JSON line per record, stamped ``ts`` (None path: logging off).

    A service subclasses it with its own ``write`` (the record's fields) and ``prog``.
    """

    prog: ClassVar[str] = "lab"
    path: Path | None
    _fh: IO[str] | None = field(default=None, init=False)

    def open(self) -> None:
        if self.path is not None:
            self._fh = open(self.path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115

    def append(self, rec: dict[str, Any]) -> None:
        if self._fh is None:
            return
        rec["ts"] = round(time.time(), 6)
        try:
            self._fh.write(json.dumps(rec) + "\n")
            self._fh.flush()
        except OSError as exc:  # a full disk must not take the service down
            print(f"{self.prog}: log write failed: {exc}", file=sys.stderr)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def add_arguments(p: argparse.ArgumentParser, log_help: str) -> None:
    """The options every lab service takes after its ports."""
    p.add_argument("--bind", default="0.0.0.0", help="listen address (default: all)")
    p.add_argument("--log", default=None, help=log_help)
    p.add_argument("--pid-file", default=None)
    p.add_argument("--stderr", default=None, help="with --daemon: where stderr goes")
    p.add_argument("--daemon", action="store_true", help="detach once listening")


async def serve_until_signalled(
    tcp: socket.socket,
    handler: TcpHandler,
    udp: socket.socket,
    udp_reader: Callable[[asyncio.AbstractEventLoop], Callable[[], None]],
    limit: int = STREAM_LIMIT,
) -> None:
    """Serve TCP connections with ``handler`` and UDP readiness with the callback
    ``udp_reader(loop)`` makes, until SIGTERM/SIGINT."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = await asyncio.start_server(handler, sock=tcp, limit=limit)
    loop.add_reader(udp.fileno(), udp_reader(loop))
    try:
        await stop.wait()
    finally:
        loop.remove_reader(udp.fileno())
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


def run(
    prog: str,
    args: argparse.Namespace,
    bind: Callable[[], S],
    log: JsonLog,
    serve: Callable[[S], Coroutine[Any, Any, None]],
) -> int:
    """A service's life from :func:`add_arguments`' options: bind (exit 1 with one
    line if it cannot), detach if asked, open the log, write the pid file, say ready,
    serve, then close the log and remove the pid file if it is still ours."""
    try:
        socks = bind()
    except OSError as exc:
        print(f"{prog}: cannot bind: {exc}", file=sys.stderr)
        return 1
    ready_fd = daemonize(args.stderr) if args.daemon else None
    log.open()
    if args.pid_file:
        write_pid(args.pid_file)
    if ready_fd is not None:
        os.write(ready_fd, b"ok")
        os.close(ready_fd)
    try:
        asyncio.run(serve(socks))
    finally:
        log.close()
        if args.pid_file:
            with contextlib.suppress(OSError):
                if Path(args.pid_file).read_text().strip() == str(os.getpid()):
                    os.unlink(args.pid_file)
    return 0
