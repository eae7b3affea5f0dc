"""Shared builders for the core's unit tests: scapy makes packets, the core rewrites them."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from gateway.core.block import CHUNK_SHIFT, PortBlock
from gateway.core.model import (
    Direction,
    Frontend,
    GatewayModel,
    InstanceIp,
    LbRule,
    Pool,
    SecurityRule,
    Tag,
    Timeouts,
)
from gateway.core.packet import checksums_ok, describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK

POOL = ("10.10.1.1", "10.10.1.2", "10.10.1.3")
INSTANCE = "10.10.2.1"
STANDALONE = "10.10.3.1"
FRONTEND = "198.51.100.10"
INSTANCE_PUBLIC = "198.51.100.20"
DEFAULTS = ("198.51.100.30", "198.51.100.31")
SERVER = "198.51.100.2"
SERVER2 = "198.51.100.3"
#: A client on the internet opening flows from the outside.
CLIENT = "203.0.113.7"
ALL_PORTS = ((0, 65535),)


def first_port(block: PortBlock | None) -> int:
    """The first port of a block's first chunk (where a contiguous block starts)."""
    assert block is not None
    return block.chunks[0] << CHUNK_SHIFT


def holds(block: PortBlock | None, port: int) -> bool:
    """Whether ``port`` lies in one of the block's chunks."""
    assert block is not None
    return port >> CHUNK_SHIFT in block.chunks


def ip(s: str) -> int:
    return int(ipaddress.IPv4Address(s))


def lab_model(
    members: tuple[str, ...] = POOL,
    timeouts: Timeouts | None = None,
    defaults: tuple[str, ...] = DEFAULTS,
    random_ports: bool = False,
) -> GatewayModel:
    """The lab's model; ports in block order unless ``random_ports`` (tests pin port numbers)."""
    return GatewayModel(
        frontends=(Frontend("fe-web", ip(FRONTEND)),),
        pools=(Pool("web", tuple(ip(m) for m in members)),),
        lb_rules=(LbRule("http", "fe-web", "web", "tcp", 80, 8080),),
        instance_ips=(InstanceIp(ip(INSTANCE), ip(INSTANCE_PUBLIC)),),
        default_snat=tuple(ip(d) for d in defaults),
        timeouts=timeouts or Timeouts(),
        random_ports=random_ports,
    )


def udp(src: str, dst: str, sport: int, dport: int, payload: bytes = b"hello") -> bytearray:
    return bytearray(bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / payload))


def tcp(
    src: str, dst: str, sport: int, dport: int, flags: str = "S", payload: bytes = b"",
    seq: int = 0, ack: int | None = None, window: int = 8192,
    options: Sequence[tuple[str, object]] | None = None,
) -> bytearray:
    """A TCP segment. Without ``ack``, a segment with ACK acknowledges 1: the default
    SYN's sequence 0 + 1, as a genuine SYN-ACK or RST+ACK answering it would."""
    if ack is None:
        ack = 1 if "A" in flags else 0
    opts = list(options or ())
    seg = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=window, options=opts)
    return bytearray(bytes(IP(src=src, dst=dst) / seg / payload))


def echo(src: str, dst: str, ident: int, reply: bool = False) -> bytearray:
    return bytearray(bytes(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=ident, seq=1) / b"ping"))


def inbound_model(**kw: Any) -> GatewayModel:
    """The lab model, open to unsolicited inbound (``inbound_default = "allow"``) unless told."""
    kw.setdefault("inbound_default_allow", True)
    return replace(lab_model(), **kw)


def rule(
    name: str,
    priority: int,
    direction: Direction,
    allow: bool,
    proto: int = 0,
    src: Any = (Tag.ANY,),
    dports: Any = ALL_PORTS,
) -> SecurityRule:
    """A security rule from any source port to ``dports``."""
    return SecurityRule(name, priority, direction, allow, proto, src, ALL_PORTS, (Tag.ANY,), dports)


def deliver(t: TranslationTable, pkt: bytearray, now: float = 0.0) -> tuple[str, int]:
    """Send ``pkt`` from the outside; it must be delivered: its new (dst, dport)."""
    assert t.out2in(pkt, now) == ACCEPT_MODIFIED_MARK
    assert checksums_ok(pkt)
    s = describe(pkt)
    return s.dst, s.dport


def out(table: TranslationTable, pkt: bytearray, now: float = 0.0) -> tuple[int, str, int]:
    """Translate ``pkt`` in2out (it must be accepted, with valid checksums); its new sport, src, dport."""
    assert table.in2out(pkt, now) == ACCEPT_MODIFIED
    assert checksums_ok(pkt)
    s = describe(pkt)
    return s.sport, s.src, s.dport


@pytest.fixture
def table() -> TranslationTable:
    return TranslationTable(lab_model(), now=0.0)
