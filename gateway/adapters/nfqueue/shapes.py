"""Packet messages parsed by their shape: a cache in front of :func:`codec.parse_message`.

Why: the kernel builds every packet message of one queue from the same few
attributes in the same order (``nfqnl_build_packet_message``: NFQA_PACKET_HDR
first, NFQA_PAYLOAD last, in between the interface indexes, the mark, the
hardware address, the skb info), and for one stream of packets (same hook,
same devices, same mark) they differ only in the packet id and the payload.
Walking the attributes in Python cost 1.8 us per message on the bench VM, as
much as the translation itself (issue 11, "The per-packet floor").

A *shape* is what the walk learned from one message: where the payload
starts (``head``), the bytes between the packet id and the payload's
attribute header (the rest of NFQA_PACKET_HDR and every other attribute,
values included), and the hook and skb info that :func:`parse_message`
derived from them. A later message whose bytes there are equal, whose first
attribute is NFQA_PACKET_HDR, whose last attribute is NFQA_PAYLOAD and which
ends right after its payload gets exactly the result the walk would give: two
``startswith`` and two small unpacks instead of a loop per attribute. Anything
else goes to :func:`parse_message` and may become a shape. Shapes with
NFQA_CAP_LEN are never kept (whether a packet was truncated depends on its
length, not on the shape).
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from gateway.adapters.nfqueue.codec import Kind, Parsed, parse_message

__all__ = ["FIRST", "ID", "LEN_TYPE", "NLA", "TOP", "ShapeCache"]

LEN_TYPE = struct.Struct("=IH")
NLA = struct.Struct("=HH")
ID = struct.Struct(">I")
#: nla_len 11, nla_type 1 (NFQA_PACKET_HDR), native order, at offset 20.
FIRST = NLA.pack(11, 1)
#: nlmsg_len, nlmsg_type, the first attribute's header and the packet id (as stored,
#: big endian: ``socket.ntohl`` it) in one unpack.
TOP = struct.Struct("=IH14xHHI")
_NFQA_CAP_LEN = 13
_NFQA_PAYLOAD = 10
#: Shapes kept per queue: in2out and out2in packets on one queue differ in shape.
MAX_SHAPES = 4


class ShapeCache:
    """The shapes of one queue's recent packet messages; :meth:`parse` is ``parse_message``'s twin."""

    __slots__ = ("shapes", "hits", "misses")

    def __init__(self) -> None:
        #: (head, skeleton, hook, skbinfo), most recently learned first.
        self.shapes: list[tuple[int, bytes, int, int]] = []
        self.hits = 0
        self.misses = 0

    def parse(
        self,
        buf: bytearray,
        off: int,
        end: int,
        _lt: Callable[..., tuple[int, int]] = LEN_TYPE.unpack_from,
        _nla: Callable[..., tuple[int, int]] = NLA.unpack_from,
        _id: Callable[..., tuple[int]] = ID.unpack_from,
        _first: bytes = FIRST,
        _packet: Kind = Kind.PACKET,
    ) -> Parsed:
        """What ``parse_message(buf, off, end)`` returns, faster for a known shape.

        ``buf`` must be a bytearray or bytes (``startswith`` with an offset).
        Per-packet path: the trailing keyword parameters are bound constants.
        """
        if self.shapes and end - off >= 32:
            mlen, mtype = _lt(buf, off)
            if mtype == 0x300 and mlen <= end - off and buf.startswith(_first, off + 20):
                for head, skel, hook, info in self.shapes:
                    if head < mlen and buf.startswith(skel, off + 28):
                        alen, atype = _nla(buf, off + head - 4)
                        plen = alen - 4
                        # The payload attribute ends the message (only its padding follows).
                        if atype == _NFQA_PAYLOAD and plen > 0 and 0 <= mlen - head - plen < 4:
                            self.hits += 1
                            nxt = off + ((mlen + 3) & -4)
                            return (_packet, nxt if nxt < end else end, _id(buf, off + 24)[0],
                                    hook, info, off + head, plen)
        return self._learn(buf, off, end)

    def _learn(self, buf: bytearray, off: int, end: int) -> Parsed:
        """The full walk; a usable packet message whose layout qualifies becomes a shape."""
        self.misses += 1
        res = parse_message(buf, off, end)
        kind, nxt, _pid, hook, info, poff, plen = res
        if kind is not Kind.PACKET or end - off < 32 or not buf.startswith(FIRST, off + 20):
            return res
        mlen = LEN_TYPE.unpack_from(buf, off)[0]
        head = poff - off
        if not 32 <= head < mlen or not 0 <= mlen - head - plen < 4:
            return res
        a = off + 32  # past nlmsghdr, nfgenmsg and NFQA_PACKET_HDR (11 bytes, padded to 12)
        while a < poff - 4:
            alen, atype = NLA.unpack_from(buf, a)
            if atype & 0x3FFF == _NFQA_CAP_LEN or alen < 4:
                return res
            a += (alen + 3) & -4
        if a != poff - 4:
            return res
        shape = (head, bytes(buf[off + 28 : poff - 4]), hook, info)
        shapes = self.shapes
        if shape not in shapes:
            shapes.insert(0, shape)
            del shapes[MAX_SHAPES:]
        return res
