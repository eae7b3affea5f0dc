"""myip over DNS: the lab's stand-in for OpenDNS's ``myip.opendns.com``.

The article finds a VM's public address with ``nslookup myip.opendns.com
resolver1.opendns.com``: OpenDNS answers an A query for that name with the address the
query came from.  This responder does the same in the lab's internet namespace (on
``SERVER`` port 53, beside whoami), so ``nslookup myip.opendns.com 198.51.100.2`` from any
lab backend prints the public address the gateway gave that backend.

It is not a resolver: every other name is REFUSED (RFC 1035 4.1.1 rcode 5), other types of
``myip.opendns.com`` get an empty NOERROR answer (no AAAA for an IPv4 client, as OpenDNS
does), anything but a standard query is NOTIMP, a message with other than one question is
FORMERR, and responses (QR set) or unparseable bytes are never answered, so two responders
can never ping-pong.  Messages are parsed and built with dnslib, not by hand.

UDP answers leave from the address they were sent to (IP_PKTINFO, as whoami's do); TCP
(RFC 1035 4.2.2, two-byte length prefix; RFC 7766) is served too, bounded: at most
:data:`MAX_TCP_CLIENTS` connections, :data:`MAX_TCP_QUERIES` queries each, and
:data:`TCP_IDLE` seconds of silence before a connection is closed.  Every answered query
is one JSON line in the log (``{"proto", "src", "sport", "dst", "dport", "name", "type",
"rcode", "answer", "ts"}``), so a test can assert on what the far side saw.

Run: ``python -m gateway.lab.dns --port 53 --log FILE``; the lab adds ``--daemon --pid-file
P`` (returns once the sockets are bound); SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from dnslib import QTYPE, RCODE, RR, A, DNSError, DNSRecord

from gateway.lab import service

MYIP_NAME = "myip.opendns.com."
DNS_PORT = 53
TTL = 0  # OpenDNS's own TTL for this name: the answer depends on who asks
MAX_TCP_CLIENTS = 64
MAX_TCP_QUERIES = 32
TCP_IDLE = 5.0
UDP_MAX = 4096  # larger than any query we answer; EDNS payload sizes above this are clamped
UDP_BATCH = 64  # datagrams per readiness callback before yielding to the loop
_LEN = struct.Struct("!H")

OPCODE_QUERY = 0
CLASS_IN = 1


@dataclass(frozen=True, slots=True)
class Answer:
    """What :func:`answer` decided: the wire bytes and, for the log, what was asked."""

    wire: bytes
    name: str
    qtype: str
    rcode: str
    address: str | None


def answer(query: bytes, client_ip: str) -> Answer | None:
    """The response to one DNS message that came from ``client_ip``, or None: send nothing.

    Pure (no sockets): the unit tests drive it with dnslib-built queries.
    """
    try:
        msg = DNSRecord.parse(query)
    except (DNSError, ValueError, IndexError, struct.error, UnicodeError):
        return None
    if msg.header.qr:
        return None
    reply = msg.reply(ra=0, aa=1)
    name = str(msg.q.qname) if msg.questions else ""
    qtype = QTYPE.get(msg.q.qtype, str(msg.q.qtype)) if msg.questions else ""
    address = None
    if msg.header.opcode != OPCODE_QUERY or len(msg.questions) != 1:
        reply.header.rcode = RCODE.NOTIMP if msg.header.opcode != OPCODE_QUERY else RCODE.FORMERR
        reply.header.aa = 0
        reply.questions = list(msg.questions)  # reply() would invent a "." question for none
    elif name.lower() != MYIP_NAME or msg.q.qclass != CLASS_IN:
        reply.header.rcode = RCODE.REFUSED
        reply.header.aa = 0  # not ours to speak for
    elif msg.q.qtype in (QTYPE.A, QTYPE.ANY):
        reply.add_answer(RR(msg.q.qname, QTYPE.A, rdata=A(client_ip), ttl=TTL))
        address = client_ip
    # else: another type of myip.opendns.com: NOERROR without answers (NODATA).
    return Answer(reply.pack(), name, str(qtype), str(RCODE.get(reply.header.rcode)), address)


@dataclass(slots=True)
class QueryLog(service.JsonLog):
    """One JSON line per answered query (None path: logging off)."""

    prog: ClassVar[str] = "dns"

    def write(self, proto: str, src: tuple[str, int], dst: tuple[str, int], ans: Answer) -> None:
        self.append({"proto": proto, "src": src[0], "sport": src[1], "dst": dst[0], "dport": dst[1],
                     "name": ans.name, "type": ans.qtype, "rcode": ans.rcode, "answer": ans.address})


@dataclass(slots=True)
class UdpResponder:
    """UDP side: one answer per query datagram, sent from the address it was sent to."""

    sock: socket.socket
    log: QueryLog

    def on_readable(self) -> None:
        port = int(self.sock.getsockname()[1])
        for _ in range(UDP_BATCH):
            try:
                data, anc, _flags, addr = self.sock.recvmsg(UDP_MAX, socket.CMSG_SPACE(service.PKTINFO.size))
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue  # e.g. a queued ICMP error: nothing to answer
            ans = answer(data, addr[0])
            if ans is None:
                continue
            local = service.pktinfo_local(anc)
            dst = socket.inet_ntoa(local) if local else str(self.sock.getsockname()[0])
            self.log.write("udp", (addr[0], int(addr[1])), (dst, port), ans)
            service.send_from(self.sock, ans.wire, addr, local)


def make_tcp_handler(
    log: QueryLog,
) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
    """The per-connection coroutine: length-prefixed queries, bounded in count, time and
    concurrent connections (the excess is closed at once)."""
    clients = [0]

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        clients[0] += 1
        try:
            peer = writer.get_extra_info("peername")
            local = writer.get_extra_info("sockname")
            if clients[0] > MAX_TCP_CLIENTS or not peer or not local:
                return
            src, dst = (str(peer[0]), int(peer[1])), (str(local[0]), int(local[1]))
            for _ in range(MAX_TCP_QUERIES):
                head = await asyncio.wait_for(reader.readexactly(_LEN.size), TCP_IDLE)
                data = await asyncio.wait_for(reader.readexactly(_LEN.unpack(head)[0]), TCP_IDLE)
                ans = answer(data, src[0])
                if ans is None:
                    return
                log.write("tcp", src, dst, ans)
                writer.write(_LEN.pack(len(ans.wire)) + ans.wire)
                await asyncio.wait_for(writer.drain(), TCP_IDLE)
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            clients[0] -= 1
            writer.close()
            with contextlib.suppress(TimeoutError, OSError):
                await asyncio.wait_for(writer.wait_closed(), TCP_IDLE)

    return handle


def bind_sockets(bind: str, port: int) -> tuple[socket.socket, socket.socket]:
    """Bind UDP and TCP up front (before daemonising) so that readiness means listening."""
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    udp.setsockopt(socket.IPPROTO_IP, service.IP_PKTINFO, 1)
    udp.bind((bind, port))
    udp.setblocking(False)
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    tcp.bind((bind, port))
    tcp.listen(64)
    tcp.setblocking(False)
    return udp, tcp


async def serve(udp: socket.socket, tcp: socket.socket, log: QueryLog) -> None:
    """Serve until SIGTERM/SIGINT."""
    await service.serve_until_signalled(
        tcp, make_tcp_handler(log), udp, lambda _loop: UdpResponder(udp, log).on_readable
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dns", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=DNS_PORT)
    service.add_arguments(p, "JSON-lines file of every answered query")
    args = p.parse_args(argv)

    log = QueryLog(Path(args.log) if args.log else None)
    return service.run(
        "dns", args, lambda: bind_sockets(args.bind, args.port), log, lambda socks: serve(*socks, log)
    )


if __name__ == "__main__":
    sys.exit(main())
