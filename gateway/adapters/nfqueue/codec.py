"""The nfnetlink_queue wire format: bytes in, records out; records in, bytes out.

Pure: no sockets, no clock, no select, so every function here can be tested
(and fuzzed) without a kernel. :mod:`gateway.adapters.nfqueue.queue` does the
I/O.

Protocol facts (``linux/netfilter/nfnetlink.h``,
``linux/netfilter/nfnetlink_queue.h``, checked against the 6.x UAPI headers;
docs/kernel.md, "Diverting packets"):

* message type = ``NFNL_SUBSYS_QUEUE (3) << 8 | nfqnl_msg_types``
  (``NFQNL_MSG_PACKET`` 0, ``_VERDICT`` 1, ``_CONFIG`` 2, ``_VERDICT_BATCH`` 3);
* every message starts with ``struct nlmsghdr`` (host byte order) and
  ``struct nfgenmsg`` (family u8, version u8, ``res_id`` __be16 = queue);
* attribute headers (``struct nlattr``) are host byte order, attribute
  *values* of nfnetlink_queue are big endian (``__be32`` etc.);
* messages are padded to 4 bytes (``NLMSG_ALIGN``), attributes too
  (``NLA_ALIGN``).

The verdict layouts are public :class:`struct.Struct` objects because the
queue's per-packet path packs them itself (one C call, no Python call in
between); the ``pack_*`` functions here use the very same structs and are
what the tests pin byte for byte.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable
from enum import IntEnum
from typing import NamedTuple

from gateway.core.verdict import Verdict

__all__ = [
    "MAX_COPY_RANGE",
    "NLM_F_ACK",
    "NLM_F_REQUEST",
    "T_VERDICT",
    "T_VERDICT_BATCH",
    "V_MANGLE",
    "V_MANGLE_MARK",
    "V_SIMPLE",
    "Kind",
    "Message",
    "Parsed",
    "error_seq",
    "pack_batch_into",
    "pack_bind",
    "pack_mangled_header_into",
    "pack_unbind",
    "pack_verdict",
    "pack_verdict_into",
    "packet_mark",
    "parse",
    "parse_message",
]

# --- numbers from the kernel UAPI headers ------------------------------------

NLM_F_REQUEST = 0x1  # linux/netlink.h
NLM_F_ACK = 0x4
NLMSG_ERROR = 0x2

NFNL_SUBSYS_QUEUE = 3  # linux/netfilter/nfnetlink.h
T_PACKET = NFNL_SUBSYS_QUEUE << 8 | 0  # NFQNL_MSG_PACKET
T_VERDICT = NFNL_SUBSYS_QUEUE << 8 | 1  # NFQNL_MSG_VERDICT
T_CONFIG = NFNL_SUBSYS_QUEUE << 8 | 2  # NFQNL_MSG_CONFIG
T_VERDICT_BATCH = NFNL_SUBSYS_QUEUE << 8 | 3  # NFQNL_MSG_VERDICT_BATCH

# enum nfqnl_attr_type
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14

# enum nfqnl_attr_config, nfqnl_msg_config_cmds, nfqnl_config_mode, NFQA_CFG_F_*
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2
#: The kernel clamps copy_range to 0xffff - NLA_HDRLEN (NFQNL_MAX_COPY_RANGE).
MAX_COPY_RANGE = 0xFFFF - 4

# --- structs -------------------------------------------------------------------

NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
NFGENMSG = struct.Struct("=BBH")  # family, version, res_id (pass it byte swapped)
NLATTR = struct.Struct("=HH")  # nla_len, nla_type
_NLMSG_LEN_TYPE = struct.Struct("=IH")
#: nlmsg_len, nlmsg_type, then (past the rest of nlmsghdr and nfgenmsg) the first nla_len, nla_type.
_NLMSG_LEN_TYPE_NLA = struct.Struct("=IH14xHH")
_PKT_HDR = struct.Struct(">IHB")  # packet_id, hw_protocol, hook
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")

# Verdict messages. Fields, in pack order: nlmsghdr (len, type, flags, seq,
# portid), nfgenmsg (family, version, res_id), NFQA_VERDICT_HDR attribute
# (nla_len 12, nla_type 2, verdict, id). res_id, verdict and id are big endian
# on the wire and are passed already swapped (socket.htons / htonl) because
# one native-order struct covers the whole header. The seq field carries the
# packet id (host order) so that an error reply can be matched to its packet.
#: nlmsghdr + nfgenmsg + NFQA_VERDICT_HDR: 32 bytes.
V_SIMPLE = struct.Struct("=IHHIIBBHHHII")
#: ... + NFQA_PAYLOAD attribute header (nla_len, nla_type); the payload follows: 36 bytes.
V_MANGLE = struct.Struct("=IHHIIBBHHHIIHH")
#: ... + NFQA_MARK attribute (8, 3, mark) before the NFQA_PAYLOAD header: 44 bytes.
V_MANGLE_MARK = struct.Struct("=IHHIIBBHHHIIHHIHH")

ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")
_htonl = socket.htonl
_AF_UNSPEC = socket.AF_UNSPEC


class Kind(IntEnum):
    """What :func:`parse_message` found at an offset."""

    #: A usable packet: id, hook, skb info and payload span are valid.
    PACKET = 0
    #: NLMSG_ERROR; the id field holds the positive errno, 0 for an ack.
    ERROR = 1
    #: Well formed, not for us (NLMSG_NOOP, NLMSG_DONE, ...).
    OTHER = 2
    #: Malformed; nothing usable, not even a packet id.
    BAD = 3
    #: Packet longer than copy_range (NFQA_CAP_LEN > payload): has an id, payload cut short.
    TRUNCATED = 4
    #: Packet header present but payload or attributes unusable: has an id.
    UNUSABLE = 5


#: ``(kind, next_off, packet_id, hook, skbinfo, payload_off, payload_len)``,
#: the fields of :class:`Message` as a plain tuple (cheapest to build per packet).
Parsed = tuple[Kind, int, int, int, int, int, int]


class Message(NamedTuple):
    """One parsed netlink message, with names (for code off the per-packet path)."""

    kind: Kind
    #: Offset of the next message; always ``> off`` and ``<= end``.
    next_off: int
    #: Packet id for PACKET / TRUNCATED / UNUSABLE, the errno for ERROR, else 0.
    packet_id: int
    #: Netfilter hook (:class:`gateway.adapters.kernel.Hook`); 0x100 added when
    #: the packet carries ``Mark.HAIRPIN``, 0x200 when it carries ``Mark.REQUEUED``.
    hook: int
    #: NFQA_SKB_INFO flags (:class:`gateway.adapters.kernel.SkbInfo`).
    skbinfo: int
    payload_off: int
    payload_len: int


def parse_message(
    buf: bytes | bytearray | memoryview,
    off: int,
    end: int,
    _hdr: Callable[..., tuple[int, int]] = _NLMSG_LEN_TYPE.unpack_from,
    _hdr_nla: Callable[..., tuple[int, int, int, int]] = _NLMSG_LEN_TYPE_NLA.unpack_from,
    _nla: Callable[..., tuple[int, int]] = NLATTR.unpack_from,
    _pkt: Callable[..., tuple[int, int, int]] = _PKT_HDR.unpack_from,
    _be32: Callable[..., tuple[int]] = _BE32.unpack_from,
    _errno: Callable[..., tuple[int]] = _ERRNO.unpack_from,
    _packet: Kind = Kind.PACKET,
    _error: Kind = Kind.ERROR,
    _other: Kind = Kind.OTHER,
    _bad: Kind = Kind.BAD,
    _truncated: Kind = Kind.TRUNCATED,
    _unusable: Kind = Kind.UNUSABLE,
) -> Parsed:
    """Parse the netlink message at ``buf[off:end]``; never raises.

    Returns the fields of :class:`Message` as a tuple. ``next_off`` is always
    ``> off`` and ``<= end`` so that a loop over a datagram terminates, even
    on garbage. For TRUNCATED / UNUSABLE the packet id is valid (the packet
    needs a verdict) but the payload must not be used.

    Layout of a packet message (nfnetlink_queue.h): nlmsghdr, nfgenmsg, then
    attributes; NFQA_PACKET_HDR (1) = {__be32 packet_id, __be16 hw_protocol,
    u8 hook}, NFQA_PAYLOAD (10) = the packet from its network header,
    NFQA_CAP_LEN (13) = original length when the payload was cut to
    copy_range, NFQA_SKB_INFO (14) = __be32 flags (only sent when non-zero),
    NFQA_MARK (3) = __be32 packet mark (only sent when non-zero). A packet whose
    mark has ``Mark.HAIRPIN`` (0x40000000) is reported with hook
    ``Hook.PRE_ROUTING_HAIRPIN`` (0x100 | hook): the handler's signature stays
    ``(payload, hook, skbinfo)`` and the loop's dispatch one integer compare
    (docs/kernel.md, "Hairpin"). Likewise ``Mark.REQUEUED`` (0x08000000: another
    worker handed the packet on) adds ``Hook.REQUEUED`` (0x200; docs/kernel.md,
    "Steering"); the whole mark is read again, off the per-packet path, by
    :func:`packet_mark` when a packet is handed on.

    This is the per-packet path: numbers are literals and the struct methods
    and kinds are bound as defaults (fast local lookups); the trailing
    keyword parameters are not part of the interface.
    """
    if off < 0 or end > len(buf) or end - off < 16:
        return (_bad, end if end > off else off + 1, 0, 0, 0, 0, 0)
    if end - off >= 24:  # one unpack for the header and the first attribute's header
        mlen, mtype, alen, atype = _hdr_nla(buf, off)
    else:
        mlen, mtype = _hdr(buf, off)
        alen = atype = 0
    if mlen < 16 or mlen > end - off:
        return (_bad, end, 0, 0, 0, 0, 0)
    nxt = off + ((mlen + 3) & -4)  # NLMSG_ALIGN
    if nxt > end:
        nxt = end
    if mtype == 0x300:  # T_PACKET
        mend = off + mlen
        a = off + 20  # past nlmsghdr + nfgenmsg
        pid = -1
        hook = info = poff = mark = 0
        plen = cap = -1
        ok = a <= mend
        # a + 4 <= mend implies mlen >= 24, so alen, atype hold the attribute at a
        while a + 4 <= mend:
            if alen < 4 or alen > mend - a:
                ok = False
                break
            atype &= 0x3FFF  # NLA_TYPE_MASK: strip NLA_F_NESTED / NLA_F_NET_BYTEORDER
            if atype == 10:  # NFQA_PAYLOAD
                poff = a + 4
                plen = alen - 4
            elif atype == 1:  # NFQA_PACKET_HDR
                if alen >= 11:
                    pid, _hw, hook = _pkt(buf, a + 4)
                else:
                    ok = False
            elif atype == 14:  # NFQA_SKB_INFO
                if alen >= 8:
                    info = _be32(buf, a + 4)[0]
                else:
                    ok = False
            elif atype == 13 and alen >= 8:  # NFQA_CAP_LEN
                cap = _be32(buf, a + 4)[0]
            elif atype == 3 and alen >= 8:  # NFQA_MARK (only sent when the mark is not 0)
                mark = _be32(buf, a + 4)[0]
            a += (alen + 3) & -4  # NLA_ALIGN
            if a + 4 <= mend:
                alen, atype = _nla(buf, a)
        if pid < 0:
            return (_bad, nxt, 0, 0, 0, 0, 0)
        if mark & 0x48000000:  # Mark.HAIRPIN | Mark.REQUEUED
            if mark & 0x40000000:  # Mark.HAIRPIN (only set in PREROUTING)
                hook |= 0x100  # Hook.PRE_ROUTING_HAIRPIN
            if mark & 0x08000000:  # Mark.REQUEUED
                hook |= 0x200  # Hook.REQUEUED
        if not ok or plen <= 0:
            return (_unusable, nxt, pid, hook, info, 0, 0)
        if cap > plen:
            return (_truncated, nxt, pid, hook, info, poff, plen)
        return (_packet, nxt, pid, hook, info, poff, plen)
    if mtype == 2:  # NLMSG_ERROR: struct nlmsgerr {int error; struct nlmsghdr msg}
        if mlen < 20:
            return (_bad, nxt, 0, 0, 0, 0, 0)
        return (_error, nxt, -_errno(buf, off + 16)[0], 0, 0, 0, 0)
    return (_other, nxt, 0, 0, 0, 0, 0)


def packet_mark(buf: bytes | bytearray | memoryview, off: int, end: int) -> int:
    """The NFQA_MARK of the packet message at ``buf[off:end]``, 0 when it has none.

    For the re-queue path, which must send the packet's own mark back with
    ``Mark.REQUEUED`` added (docs/kernel.md, "Steering"); :func:`parse_message`
    keeps only the bits the loop dispatches on. Never raises.
    """
    if off < 0 or end > len(buf) or end - off < 20:
        return 0
    mend = off + min(NLMSGHDR.unpack_from(buf, off)[0], end - off)
    a = off + 20
    while a + 4 <= mend:
        alen, atype = NLATTR.unpack_from(buf, a)
        if alen < 4 or alen > mend - a:
            return 0
        if atype & 0x3FFF == NFQA_MARK and alen >= 8:
            mark: int = _BE32.unpack_from(buf, a + 4)[0]
            return mark
        a += (alen + 3) & -4
    return 0


def parse(buf: bytes | bytearray | memoryview, off: int, end: int) -> Message:
    """:func:`parse_message` with field names, for code off the per-packet path."""
    return Message._make(parse_message(buf, off, end))


def error_seq(buf: bytes | bytearray | memoryview, off: int, next_off: int) -> int | None:
    """The seq of the request an NLMSG_ERROR at ``off`` answers, if it is there.

    ``struct nlmsgerr`` is ``int error`` followed by the request's nlmsghdr
    (seq at +8); with NETLINK_CAP_ACK only that header is echoed.
    """
    if next_off - off < 36:
        return None
    seq: int = NLMSGHDR.unpack_from(buf, off + 20)[3]
    return seq


# --- verdicts ------------------------------------------------------------------


def pack_verdict_into(buf: bytearray, off: int, queue: int, packet_id: int, verdict: int) -> int:
    """NFQNL_MSG_VERDICT for one packet (no payload) at ``buf[off:]``; return the end."""
    V_SIMPLE.pack_into(
        buf, off, 32, T_VERDICT, NLM_F_REQUEST, packet_id, 0, _AF_UNSPEC, 0, socket.htons(queue),
        12, NFQA_VERDICT_HDR, _htonl(verdict), _htonl(packet_id),
    )  # fmt: skip
    return off + 32


def pack_verdict(queue: int, packet_id: int, verdict: int) -> bytes:
    """NFQNL_MSG_VERDICT for one packet, e.g. ``Verdict.DROP``, as bytes."""
    buf = bytearray(32)
    pack_verdict_into(buf, 0, queue, packet_id, verdict)
    return bytes(buf)


def pack_batch_into(buf: bytearray, off: int, queue: int, last_id: int, verdict: int = Verdict.ACCEPT) -> int:
    """NFQNL_MSG_VERDICT_BATCH at ``buf[off:]``; return the end.

    The kernel applies it to every packet of the queue whose id is
    ``<= last_id`` (nfqnl_recv_verdict_batch), so it is only right when all
    of those have been read and none must get another verdict.
    """
    V_SIMPLE.pack_into(
        buf, off, 32, T_VERDICT_BATCH, NLM_F_REQUEST, last_id, 0, _AF_UNSPEC, 0,
        socket.htons(queue), 12, NFQA_VERDICT_HDR, _htonl(verdict), _htonl(last_id),
    )  # fmt: skip
    return off + 32


def pack_mangled_header_into(
    buf: bytearray | memoryview,
    off: int,
    queue: int,
    packet_id: int,
    payload_len: int,
    mark: int | None = None,
    verdict: int = Verdict.ACCEPT,
) -> int:
    """Header of a verdict carrying a new payload (and mark); return its size.

    ``verdict`` is NF_ACCEPT unless given (a re-queue passes
    :func:`gateway.adapters.kernel.requeue_verdict`). Writes nlmsghdr,
    nfgenmsg, NFQA_VERDICT_HDR, NFQA_MARK when
    ``mark`` is given, and the NFQA_PAYLOAD attribute header at ``buf[off:]``:
    36 or 44 bytes. ``payload_len`` bytes of payload must follow, then
    padding to 4 bytes. When ``off + size`` is where the payload already
    lies, the message is complete in place (how the queue sends a packet
    back without copying it).
    """
    qbe = socket.htons(queue)
    acc = _htonl(verdict)
    if mark is None:
        V_MANGLE.pack_into(
            buf, off, 36 + payload_len, T_VERDICT, NLM_F_REQUEST, packet_id, 0, _AF_UNSPEC, 0,
            qbe, 12, NFQA_VERDICT_HDR, acc, _htonl(packet_id), 4 + payload_len, NFQA_PAYLOAD,
        )  # fmt: skip
        return 36
    V_MANGLE_MARK.pack_into(
        buf, off, 44 + payload_len, T_VERDICT, NLM_F_REQUEST, packet_id, 0, _AF_UNSPEC, 0,
        qbe, 12, NFQA_VERDICT_HDR, acc, _htonl(packet_id), 8, NFQA_MARK, _htonl(mark),
        4 + payload_len, NFQA_PAYLOAD,
    )  # fmt: skip
    return 44


# --- configuration ---------------------------------------------------------------


def _attr(atype: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    return NLATTR.pack(4 + len(value), atype) + value + ZEROS[(-len(value)) & 3]


def _config(queue: int, seq: int, flags: int, attrs: bytes) -> bytes:
    return (
        NLMSGHDR.pack(20 + len(attrs), T_CONFIG, flags, seq, 0)
        + NFGENMSG.pack(_AF_UNSPEC, 0, socket.htons(queue))
        + attrs
    )


def pack_bind(
    queue: int,
    seq: int,
    *,
    copy_range: int,
    max_len: int,
    gso: bool = False,
    fail_open: bool = False,
) -> bytes:
    """One NFQNL_MSG_CONFIG that binds ``queue`` and configures it, asking for an ack.

    BIND command, copy parameters (NFQNL_COPY_PACKET, ``copy_range`` clamped
    to NFQNL_MAX_COPY_RANGE), queue length and flags (NFQA_CFG_F_GSO,
    NFQA_CFG_F_FAIL_OPEN, both under NFQA_CFG_MASK so that both are set or
    cleared) all in one message, so that the queue never exists in its
    default copy mode (NFQNL_COPY_NONE, in which the kernel drops queued
    packets). docs/kernel.md, "Whole GSO segments".
    """
    flags = (NFQA_CFG_F_GSO if gso else 0) | (NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
    attrs = (
        _attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_BIND, 0, 0))
        + _attr(NFQA_CFG_PARAMS, struct.pack(">IB", min(copy_range, MAX_COPY_RANGE), NFQNL_COPY_PACKET))
        + _attr(NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
        + _attr(NFQA_CFG_MASK, _BE32.pack(NFQA_CFG_F_GSO | NFQA_CFG_F_FAIL_OPEN))
        + _attr(NFQA_CFG_FLAGS, _BE32.pack(flags))
    )
    return _config(queue, seq, NLM_F_REQUEST | NLM_F_ACK, attrs)


def pack_unbind(queue: int, seq: int = 0) -> bytes:
    """NFQNL_MSG_CONFIG with NFQNL_CFG_CMD_UNBIND, no ack requested."""
    attrs = _attr(NFQA_CFG_CMD, struct.pack(">BBH", NFQNL_CFG_CMD_UNBIND, 0, 0))
    return _config(queue, seq, NLM_F_REQUEST, attrs)
