"""The header check both per-packet paths start with.

It answers in one call, without raising, whether a queued packet is a whole
(unfragmented or reassembled) IPv4 packet whose transport header is all there, and where that
header starts. The thorough, slow reading of the same headers, for tools and
tests, is :mod:`gateway.core.packet`.
"""

from __future__ import annotations

import struct

from gateway.core.counters import Counter
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP

#: A packet as the adapters hand it over: writable, indexable, sliceable.
Buffer = bytearray | memoryview

#: Packers both paths rewrite fields with (struct's C code beats slicing ints).
H = struct.Struct("!H")
H_IP = struct.Struct("!H4s")
UDP_HEADER = struct.Struct("!HHHH")
#: A UDP header from the destination port on: port, length, checksum.
UDP_PORT_ON = struct.Struct("!HHH")
#: The 12-byte flow key of an IPv4 packet without options: addresses then ports.
KEY = struct.Struct("12s").unpack_from
#: The first 28 bytes of an IPv4 packet without options, in one call (memoryview
#: indexing costs about 30 ns a byte): version/IHL, flags/fragment offset, protocol,
#: header checksum, the flow key, UDP length and UDP checksum.
HEAD = struct.Struct("!B5xHxBH12sHH").unpack_from

#: Shortest transport header per IP protocol number (0: not looked at here).
_L4_MIN = [0] * 256
_L4_MIN[PROTO_TCP] = 20
_L4_MIN[PROTO_UDP] = 8
_L4_MIN[PROTO_ICMP] = 8

_MALFORMED = -Counter.DROP_MALFORMED.value
_FRAGMENT = -Counter.DROP_FRAGMENT.value


def l4_offset(buf: Buffer, n: int) -> int:
    """Where the transport header starts, or minus the drop counter that applies.

    An unfragmented IPv4 packet whose header and transport header fit in
    ``n`` bytes gives its header length (RFC 791 IHL); anything else is
    malformed or a fragment. The kernel reassembles fragments before the
    queue (docs/kernel.md, "Fragments"), so one that arrives here means
    reassembly is off; it is counted as a fragment whatever its length.
    """
    if n < 20 or buf[0] >> 4 != 4:
        return _MALFORMED
    if buf[6] & 0x3F or buf[7]:
        return _FRAGMENT
    ihl = (buf[0] & 15) << 2
    if ihl < 20 or n < 28 or n < ihl + _L4_MIN[buf[9]]:
        return _MALFORMED
    return ihl
