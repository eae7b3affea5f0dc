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
import socket
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from gateway.lab import service

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


@dataclass(slots=True)
class PeerLog(service.JsonLog):
    """One JSON line per seen peer (None path: logging off)."""

    prog: ClassVar[str] = "whoami"

    def write(self, proto: str, src: str, sport: int, dst: str, dport: int) -> None:
        self.append({"proto": proto, "src": src, "sport": sport, "dst": dst, "dport": dport})


@dataclass(slots=True)
class UdpEcho:
    """UDP side: echo the peer, log it, schedule bounded late pushes."""

    sock: socket.socket
    log: PeerLog
    loop: asyncio.AbstractEventLoop
    show_local: bool = False
    pending: dict[tuple[str, int], int] = field(default_factory=dict)
    pending_total: int = 0

    def on_readable(self) -> None:
        for _ in range(UDP_BATCH):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(
                    UDP_MAX_DATAGRAM, socket.CMSG_SPACE(service.PKTINFO.size)
                )
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error: nothing to answer
            src, sport = addr[0], int(addr[1])
            local = service.pktinfo_local(anc)
            dst = socket.inet_ntoa(local) if local else self.sock.getsockname()[0]
            dport = int(self.sock.getsockname()[1])
            self.log.write("udp", src, sport, dst, dport)
            self._send(peer_text(src, sport, (dst, dport) if self.show_local else None), addr, local)
            delay = parse_push(data)
            if delay is not None:
                self._schedule_push(delay, (src, sport), local)

    def _send(self, payload: bytes, addr: tuple[str, int], local: bytes | None) -> None:
        service.send_from(self.sock, payload, addr, local)

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
    udp.setsockopt(socket.IPPROTO_IP, service.IP_PKTINFO, 1)
    udp.bind((bind, udp_port))
    udp.setblocking(False)
    return tcp, udp


async def serve(
    tcp: socket.socket, udp: socket.socket, log: PeerLog, show_local: bool = False
) -> None:
    """Serve until SIGTERM/SIGINT."""
    await service.serve_until_signalled(
        tcp,
        make_http_handler(log, show_local),
        udp,
        lambda loop: UdpEcho(udp, log, loop, show_local).on_readable,
        limit=HTTP_MAX_REQUEST,
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="whoami", description=__doc__.splitlines()[0])
    p.add_argument("--http-port", type=int, default=80)
    p.add_argument("--udp-port", type=int, default=5000)
    service.add_arguments(p, "JSON-lines file of every seen peer")
    p.add_argument("--show-local", action="store_true",
                   help="answer 'ip:port at local_ip:local_port' (an inbound member listener)")
    args = p.parse_args(argv)

    log = PeerLog(Path(args.log) if args.log else None)
    return service.run(
        "whoami",
        args,
        lambda: bind_sockets(args.bind, args.http_port, args.udp_port),
        log,
        lambda socks: serve(*socks, log, args.show_local),
    )


if __name__ == "__main__":
    sys.exit(main())
