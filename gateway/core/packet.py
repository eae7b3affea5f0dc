"""A descriptive IPv4 parser for tools, logs and tests.

The per-packet paths (:mod:`gateway.core.in2out`, :mod:`gateway.core.out2in`)
read headers inline and return drop reasons; this module is the slow, thorough reading of the same
headers, raising only :class:`~gateway.core.errors.PacketError` on any input
(a fuzz test holds it to that).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from gateway.core.checksum import checksum, ones_sum
from gateway.core.errors import PacketError
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP


@dataclass(frozen=True, slots=True)
class PacketSummary:
    """The fields a translation looks at. For ICMP echo, ``sport`` is the identifier."""

    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    length: int
    ihl: int
    icmp_type: int = -1


def _u16(b: bytes, at: int) -> int:
    return int.from_bytes(b[at : at + 2], "big")


def describe(data: bytes | bytearray | memoryview) -> PacketSummary:
    """Read an IPv4 packet's addresses, protocol and ports; raise PacketError if malformed."""
    b = bytes(data)
    if len(b) < 20:
        raise PacketError(f"{len(b)} bytes is shorter than an IPv4 header")
    if b[0] >> 4 != 4:
        raise PacketError(f"IP version {b[0] >> 4}, not 4")
    ihl = (b[0] & 15) * 4
    if ihl < 20 or ihl > len(b):
        raise PacketError(f"header length {ihl} does not fit {len(b)} bytes")
    total = _u16(b, 2)
    if total != len(b):
        raise PacketError(f"total length {total} but {len(b)} bytes")
    proto = b[9]
    src = str(ipaddress.IPv4Address(b[12:16]))
    dst = str(ipaddress.IPv4Address(b[16:20]))
    l4 = b[ihl:]
    if proto in (PROTO_TCP, PROTO_UDP):
        need = 20 if proto == PROTO_TCP else 8
        if len(l4) < need:
            raise PacketError(f"{len(l4)} bytes is shorter than the transport header")
        return PacketSummary(proto, src, dst, _u16(l4, 0), _u16(l4, 2), total, ihl)
    if proto == PROTO_ICMP:
        if len(l4) < 8:
            raise PacketError("ICMP message shorter than 8 bytes")
        return PacketSummary(proto, src, dst, _u16(l4, 4), 0, total, ihl, l4[0])
    return PacketSummary(proto, src, dst, 0, 0, total, ihl)


def checksums_ok(data: bytes | bytearray | memoryview) -> bool:
    """Whether the IPv4 header checksum and the TCP, UDP or ICMP checksum verify."""
    b = bytes(data)
    s = describe(b)
    if checksum(b[: s.ihl]) != 0:
        return False
    l4 = b[s.ihl :]
    if s.proto == PROTO_ICMP:
        return checksum(l4) == 0
    if s.proto not in (PROTO_TCP, PROTO_UDP):
        return True
    if s.proto == PROTO_UDP and _u16(l4, 6) == 0:
        return True
    pseudo = b[12:20] + bytes([0, s.proto]) + len(l4).to_bytes(2, "big")
    return checksum(l4, ones_sum(pseudo)) == 0


def fill_l4_checksum(buf: bytearray | memoryview) -> None:
    """Write a full TCP or UDP checksum into a packet whose checksum is partial.

    With ``NFQA_CFG_F_GSO`` the kernel queues small packets whose transport
    checksum is still only the pseudo-header sum, and sends them as written
    after a mangled verdict (docs/kernel.md, "Whole GSO segments"). Other protocols, and packets
    too short to carry the field, are left alone; never raises for them.
    """
    n = len(buf)
    if n < 20:
        return
    ihl = (buf[0] & 15) << 2
    proto = buf[9]
    if proto == PROTO_TCP:
        at = ihl + 16
    elif proto == PROTO_UDP:
        at = ihl + 6
    else:
        return
    if ihl < 20 or n < at + 2:
        return
    buf[at] = 0
    buf[at + 1] = 0
    pseudo = ones_sum(bytes(buf[12:20])) + proto + (n - ihl)
    c = checksum(memoryview(buf)[ihl:n], pseudo)
    if proto == PROTO_UDP and c == 0:
        c = 0xFFFF
    buf[at] = c >> 8
    buf[at + 1] = c & 0xFF
