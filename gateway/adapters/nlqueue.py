"""Minimal pure-Python NFQUEUE client speaking nfnetlink_queue directly.

Why not netfilterqueue: it cannot set ``NFQA_CFG_F_GSO``, so the kernel
segments every GSO packet before queueing and TCP through the gateway is
capped at one Python round trip per 1448 payload bytes (see
``shared/spec/KERNEL_NOTES.md``, "Whole GSO segments"). It also sends one
verdict per ``sendmsg``. This module talks the nfnetlink_queue protocol over
an ``AF_NETLINK`` / ``NETLINK_NETFILTER`` socket so that

* a queue can ask for whole GSO super-packets (up to 64 KiB), and
* one :meth:`NetlinkQueue.receive` call drains many packets and sends all
  their verdicts in one ``sendmsg`` (several netlink messages in one buffer).

Protocol facts (from ``linux/netfilter/nfnetlink.h`` and
``linux/netfilter/nfnetlink_queue.h``; numbers checked against the 6.x UAPI
headers):

* message type = ``NFNL_SUBSYS_QUEUE (3) << 8 | nfqnl_msg_types``
  (``NFQNL_MSG_PACKET`` 0, ``_VERDICT`` 1, ``_CONFIG`` 2, ``_VERDICT_BATCH`` 3);
* every message starts with ``struct nlmsghdr`` (host byte order) and
  ``struct nfgenmsg`` (family u8, version u8, ``res_id`` __be16 = queue);
* attribute headers (``struct nlattr``) are host byte order, attribute
  *values* of nfnetlink_queue are big endian (``__be32`` etc.).

The per-packet path allocates almost nothing: datagrams are received with
``recv_into`` into one preallocated ring buffer, attributes are read with
``struct.unpack_from`` and the handler gets a ``memoryview`` of the payload
inside that ring, which it may modify in place. The verdict for a modified
packet is built in place in front of its payload (over the packet message's
own header and attributes) and sent straight from the ring; plain verdicts
are packed into a second preallocated buffer; one ``sendmsg`` (scatter/gather,
no copy) carries them all.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import time
from collections.abc import Callable

__all__ = [
    "HOOK_POST_ROUTING",
    "HOOK_PRE_ROUTING",
    "KIND_BAD",
    "KIND_ERROR",
    "KIND_OTHER",
    "KIND_PACKET",
    "KIND_TRUNCATED",
    "KIND_UNUSABLE",
    "MARK_TRANSLATED",
    "RESULT_ACCEPT",
    "RESULT_ACCEPT_MANGLED",
    "RESULT_ACCEPT_MANGLED_MARK",
    "RESULT_DROP",
    "SKBINFO_CSUMNOTREADY",
    "SKBINFO_CSUM_NOTVERIFIED",
    "SKBINFO_GSO",
    "VERDICT_ACCEPT",
    "VERDICT_DROP",
    "Handler",
    "NetlinkQueue",
    "parse_message",
]

# --- public constants --------------------------------------------------------

#: Kernel verdict values (``NF_DROP`` / ``NF_ACCEPT``, linux/netfilter.h).
VERDICT_DROP = 0
VERDICT_ACCEPT = 1

#: ``NFQA_SKB_INFO`` flags (nfnetlink_queue.h: NFQA_SKB_CSUMNOTREADY,
#: NFQA_SKB_GSO, NFQA_SKB_CSUM_NOTVERIFIED).
SKBINFO_CSUMNOTREADY = 1
SKBINFO_GSO = 2
SKBINFO_CSUM_NOTVERIFIED = 4

#: Netfilter hook numbers as found in ``NFQA_PACKET_HDR`` (enum nf_inet_hooks).
HOOK_PRE_ROUTING = 0
HOOK_POST_ROUTING = 4

#: Default mark put on packets whose handler returned RESULT_ACCEPT_MANGLED_MARK.
MARK_TRANSLATED = 0x5A70

#: Handler return values.
RESULT_DROP = 0
RESULT_ACCEPT = 1
RESULT_ACCEPT_MANGLED = 2
RESULT_ACCEPT_MANGLED_MARK = 3

#: ``handler(payload, hook, skbinfo) -> result``. ``payload`` is a writable view
#: of the packet (IP header first) valid only during the call; modify it in
#: place and return RESULT_ACCEPT_MANGLED(_MARK) to have it sent back.
Handler = Callable[[memoryview, int, int], int]

#: parse_message() result kinds.
KIND_PACKET = 0  # usable packet
KIND_ERROR = 1  # NLMSG_ERROR; third field is the (positive) errno, 0 = ack
KIND_OTHER = 2  # well formed, not for us (NOOP, DONE, ...)
KIND_BAD = 3  # malformed; next offset is the end of the datagram
KIND_TRUNCATED = 4  # packet longer than copy_range: has an id, payload cut short
KIND_UNUSABLE = 5  # packet header present but payload/attributes unusable

# --- protocol constants (kernel UAPI headers) -------------------------------

_NETLINK_NETFILTER = 12  # linux/netlink.h
_SOL_NETLINK = 270  # linux/socket.h
_NETLINK_NO_ENOBUFS = 5  # linux/netlink.h
_NETLINK_CAP_ACK = 10  # linux/netlink.h: errors echo only the header
_SO_SNDBUFFORCE = 32  # asm-generic/socket.h
_SO_RCVBUFFORCE = 33

_NLM_F_REQUEST = 0x1  # linux/netlink.h
_NLM_F_ACK = 0x4
_NLMSG_ERROR = 0x2

_NFNL_SUBSYS_QUEUE = 3  # linux/netfilter/nfnetlink.h
_T_PACKET = _NFNL_SUBSYS_QUEUE << 8 | 0  # NFQNL_MSG_PACKET
_T_VERDICT = _NFNL_SUBSYS_QUEUE << 8 | 1  # NFQNL_MSG_VERDICT
_T_CONFIG = _NFNL_SUBSYS_QUEUE << 8 | 2  # NFQNL_MSG_CONFIG
_T_VERDICT_BATCH = _NFNL_SUBSYS_QUEUE << 8 | 3  # NFQNL_MSG_VERDICT_BATCH

# enum nfqnl_attr_type
_NFQA_PACKET_HDR = 1
_NFQA_VERDICT_HDR = 2
_NFQA_MARK = 3
_NFQA_PAYLOAD = 10
_NFQA_CAP_LEN = 13
_NFQA_SKB_INFO = 14
_NLA_TYPE_MASK = 0x3FFF  # strip NLA_F_NESTED / NLA_F_NET_BYTEORDER

# enum nfqnl_attr_config, nfqnl_msg_config_cmds, nfqnl_config_mode, flags
_NFQA_CFG_CMD = 1
_NFQA_CFG_PARAMS = 2
_NFQA_CFG_QUEUE_MAXLEN = 3
_NFQA_CFG_MASK = 4
_NFQA_CFG_FLAGS = 5
_NFQNL_CFG_CMD_BIND = 1
_NFQNL_CFG_CMD_UNBIND = 2
_NFQNL_COPY_PACKET = 2
_NFQA_CFG_F_FAIL_OPEN = 1 << 0
_NFQA_CFG_F_GSO = 1 << 2
#: The kernel clamps copy_range to 0xffff - NLA_HDRLEN (NFQNL_MAX_COPY_RANGE).
_MAX_COPY_RANGE = 0xFFFF - 4

# --- buffer sizing -----------------------------------------------------------

#: Largest datagram the kernel sends for one packet: a 65531-byte payload
#: attribute plus the other attributes (well under 4 KiB).
_MAX_DGRAM = 65536 + 4096
#: Receive ring: payloads of mangled packets stay here until their verdicts are
#: sent, so it holds ~15 GSO super-packets or thousands of small packets.
_RING_SIZE = 1 << 20
#: Scratch buffer for verdict headers (44 bytes + 3 pad per packet at most).
_OUT_SIZE = 1 << 16
_OUT_LIMIT = _OUT_SIZE - 256
#: Linux UIO_MAXIOV is 1024 buffers per sendmsg.
_IOV_LIMIT = 1000
_SNDBUF = 4 << 20

# --- structs -----------------------------------------------------------------

_NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
_NLMSG_LEN_TYPE = struct.Struct("=IH")
_NLATTR = struct.Struct("=HH")  # nla_len, nla_type
_PKT_HDR = struct.Struct(">IHB")  # packet_id, hw_protocol, hook
_BE32 = struct.Struct(">I")
_ERRNO = struct.Struct("=i")
# nlmsghdr + nfgenmsg + VERDICT_HDR attribute; res_id and the verdict header
# values are passed already byte swapped (socket.htons / htonl).
_V_SIMPLE = struct.Struct("=IHHIIBBHHHII")  # 32 bytes

# ... + NFQA_PAYLOAD attribute header (payload follows in the next iovec)
_V_MANGLE = struct.Struct("=IHHIIBBHHHIIHH")  # 36 bytes
# ... + NFQA_MARK attribute + NFQA_PAYLOAD attribute header
_V_MANGLE_MARK = struct.Struct("=IHHIIBBHHHIIHHIHH")  # 44 bytes
_ZEROS = (b"", b"\0", b"\0\0", b"\0\0\0")

_htonl = socket.htonl
_BE_ACCEPT = socket.htonl(VERDICT_ACCEPT)
_BE_DROP = socket.htonl(VERDICT_DROP)


def _pack_batch(out: bytearray, w: int, last_id: int, qbe: int) -> int:
    """Write one NFQNL_MSG_VERDICT_BATCH accepting every queued id up to ``last_id``
    at ``out[w:]``; return the position after it."""
    _V_SIMPLE.pack_into(
        out, w, 32, _T_VERDICT_BATCH, _NLM_F_REQUEST, last_id, 0, socket.AF_UNSPEC, 0, qbe,
        12, 2, _BE_ACCEPT, _htonl(last_id),
    )  # fmt: skip
    return w + 32


ParseResult = tuple[int, int, int, int, int, int, int]


def parse_message(
    buf: bytes | bytearray | memoryview,
    off: int,
    end: int,
    _hdr: Callable[..., tuple[int, int]] = _NLMSG_LEN_TYPE.unpack_from,
    _nla: Callable[..., tuple[int, int]] = _NLATTR.unpack_from,
    _pkt: Callable[..., tuple[int, int, int]] = _PKT_HDR.unpack_from,
    _be32: Callable[..., tuple[int]] = _BE32.unpack_from,
    _errno: Callable[..., tuple[int]] = _ERRNO.unpack_from,
) -> ParseResult:
    """Parse the netlink message at ``buf[off:end]`` without raising.

    Returns ``(kind, next_off, packet_id, hook, skbinfo, payload_off,
    payload_len)``. ``next_off`` is always ``> off`` and ``<= end`` so a loop
    over a datagram terminates. For ``KIND_ERROR`` the third field is the
    positive errno carried by ``NLMSG_ERROR`` (0 for an ack). For
    ``KIND_TRUNCATED`` / ``KIND_UNUSABLE`` the packet id is valid (the packet
    needs a verdict) but the payload must not be used.

    Layout of a packet message (nfnetlink_queue.h): nlmsghdr, nfgenmsg, then
    attributes; NFQA_PACKET_HDR (1) = {__be32 packet_id, __be16 hw_protocol,
    u8 hook}, NFQA_PAYLOAD (10) = the packet from its network header,
    NFQA_CAP_LEN (13) = original length when the payload was cut to
    copy_range, NFQA_SKB_INFO (14) = __be32 flags (only sent when non-zero).

    This is the per-packet hot path: numbers are literals and the struct
    methods are bound as defaults (fast local lookups). The trailing keyword
    parameters are not part of the interface.
    """
    if off < 0 or end > len(buf) or end - off < 16:
        return (3, end if end > off else off + 1, 0, 0, 0, 0, 0)  # KIND_BAD
    mlen, mtype = _hdr(buf, off)
    if mlen < 16 or mlen > end - off:
        return (3, end, 0, 0, 0, 0, 0)  # KIND_BAD
    nxt = off + ((mlen + 3) & -4)  # NLMSG_ALIGN
    if nxt > end:
        nxt = end
    if mtype == 0x300:  # NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
        mend = off + mlen
        a = off + 20  # past nlmsghdr + nfgenmsg
        pid = -1
        hook = info = poff = 0
        plen = cap = -1
        ok = a <= mend
        while a + 4 <= mend:
            alen, atype = _nla(buf, a)
            if alen < 4 or alen > mend - a:
                ok = False
                break
            atype &= 0x3FFF  # NLA_TYPE_MASK
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
            a += (alen + 3) & -4  # NLA_ALIGN
        if pid < 0:
            return (3, nxt, 0, 0, 0, 0, 0)  # KIND_BAD
        if not ok or plen <= 0:
            return (5, nxt, pid, hook, info, 0, 0)  # KIND_UNUSABLE
        if cap > plen:
            return (4, nxt, pid, hook, info, poff, plen)  # KIND_TRUNCATED
        return (0, nxt, pid, hook, info, poff, plen)  # KIND_PACKET
    if mtype == 2:  # NLMSG_ERROR: struct nlmsgerr {int error; struct nlmsghdr msg}
        if mlen < 20:
            return (3, nxt, 0, 0, 0, 0, 0)
        return (1, nxt, -_errno(buf, off + 16)[0], 0, 0, 0, 0)  # KIND_ERROR
    return (2, nxt, 0, 0, 0, 0, 0)  # KIND_OTHER


def _attr(atype: int, value: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes (only used for config)."""
    return _NLATTR.pack(4 + len(value), atype) + value + _ZEROS[(-len(value)) & 3]


class NetlinkQueue:
    """One bound NFQUEUE queue.

    Typical loop: ``select``/``epoll`` on :meth:`fileno`, then
    ``q.receive(handler)``. The handler returns 0 (drop), 1 (accept
    unchanged), 2 (accept, payload modified in place: sent back; same length)
    or 3 (as 2 and set the packet mark to ``self.mark``, default
    MARK_TRANSLATED). The payload view is only valid during the call.

    Checksums with ``gso=True`` (KERNEL_NOTES.md, "Whole GSO segments"): the
    kernel no longer completes partial checksums before queueing. A packet
    with SKBINFO_GSO that is sent back gets its TCP checksums recomputed by
    the kernel when it is segmented (only the IPv4 header checksum must be
    right); a non-GSO packet with SKBINFO_CSUMNOTREADY holds only the
    pseudo-header sum in its L4 checksum field, and if sent back modified it
    goes out exactly as written, so it needs a full L4 checksum.

    Counters (plain ints, for the caller's metrics): ``errors`` (malformed
    messages, kernel error replies to our verdicts, failed verdict sends),
    ``dropped`` (packets this class dropped without asking the handler:
    unusable or truncated messages, packets that arrived while binding),
    ``truncated`` (of those, packets longer than copy_range), ``enobufs``
    (socket overruns: the kernel lost packet messages; those packets were
    dropped by the kernel).
    """

    _sock: socket.socket | None
    errors: int
    dropped: int
    truncated: int
    enobufs: int
    mark: int
    queue_num: int

    def __init__(
        self,
        queue_num: int,
        *,
        gso: bool = False,
        max_len: int = 4096,
        copy_range: int = 0xFFFF,
        rcvbuf: int = 16 << 20,
        fail_open: bool = False,
    ) -> None:
        """Open a netlink socket, bind it to ``queue_num`` and configure it.

        One NFQNL_MSG_CONFIG message carries the BIND command, the copy
        parameters (NFQNL_COPY_PACKET, ``copy_range``), the queue length and
        the flags (NFQA_CFG_F_GSO, NFQA_CFG_F_FAIL_OPEN), so that the queue
        never exists in its default copy mode (NFQNL_COPY_NONE, in which the
        kernel drops queued packets). The PF_BIND/PF_UNBIND commands are
        no-ops since Linux 3.8 and are not sent.

        Raises OSError if the kernel refuses (EPERM/EBUSY: queue bound by
        another socket in this network namespace; EOPNOTSUPP: flag unknown).
        """
        if not 0 <= queue_num <= 0xFFFF:
            raise ValueError(f"queue number out of range: {queue_num}")
        if max_len <= 0 or copy_range <= 0:
            raise ValueError("max_len and copy_range must be positive")
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_NETFILTER)
        try:
            sock.bind((0, 0))
            _set_buffer(sock, _SO_RCVBUFFORCE, socket.SO_RCVBUF, rcvbuf)
            _set_buffer(sock, _SO_SNDBUFFORCE, socket.SO_SNDBUF, _SNDBUF)
            # Overruns must not surface as ENOBUFS from recv: the lost packets
            # are gone either way and the loop should just go on.
            sock.setsockopt(_SOL_NETLINK, _NETLINK_NO_ENOBUFS, 1)
            # An error reply to a 64 KiB mangled verdict should not echo it.
            with contextlib.suppress(OSError):
                sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
            self._attach(sock, queue_num)
            flags = (_NFQA_CFG_F_GSO if gso else 0) | (_NFQA_CFG_F_FAIL_OPEN if fail_open else 0)
            attrs = (
                _attr(_NFQA_CFG_CMD, struct.pack(">BBH", _NFQNL_CFG_CMD_BIND, 0, 0))
                + _attr(
                    _NFQA_CFG_PARAMS,
                    struct.pack(">IB", min(copy_range, _MAX_COPY_RANGE), _NFQNL_COPY_PACKET),
                )
                + _attr(_NFQA_CFG_QUEUE_MAXLEN, _BE32.pack(max_len))
                + _attr(_NFQA_CFG_MASK, _BE32.pack(_NFQA_CFG_F_GSO | _NFQA_CFG_F_FAIL_OPEN))
                + _attr(_NFQA_CFG_FLAGS, _BE32.pack(flags))
            )
            err = self._request(attrs)
            if err:
                if err in (errno.EPERM, errno.EBUSY):
                    why = "already bound by another process or socket in this network namespace"
                elif err == errno.EOPNOTSUPP:
                    why = "a requested queue flag is not supported by this kernel"
                else:
                    why = "the kernel refused the bind/config request"
                raise OSError(err, f"NFQUEUE {queue_num}: {why} ({errno.errorcode.get(err, err)})")
        except BaseException:
            self._sock = None
            sock.close()
            raise

    def _attach(self, sock: socket.socket, queue_num: int) -> None:
        """Set up buffers and counters around an open socket (also used by tests)."""
        self._sock = sock
        self.queue_num = queue_num
        self._qbe = socket.htons(queue_num)
        self.mark = MARK_TRANSLATED
        self.errors = 0
        self.dropped = 0
        self.truncated = 0
        self.enobufs = 0
        self._ring = bytearray(_RING_SIZE)
        self._ring_mv = memoryview(self._ring)
        self._out = bytearray(_OUT_SIZE)
        self._out_mv = memoryview(self._out)
        try:
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            sndbuf = 212992
        # netlink_sendmsg() refuses a message larger than sk_sndbuf - 32.
        self._send_cap = max(min(sndbuf - 1024, _RING_SIZE), 70000)
        self._seq = 0
        # Batch accepts cover every queued id up to the last one, which is
        # only safe while no packet can have been left without a verdict;
        # cleared for good after anything that could leave one behind.
        self._batch = True

    def fileno(self) -> int:
        """The netlink socket's descriptor, for select/poll/epoll (-1 once closed)."""
        return self._sock.fileno() if self._sock is not None else -1

    def _request(self, attrs: bytes, timeout: float = 5.0) -> int:
        """Send one config message with NLM_F_ACK and wait for its ack; return errno."""
        sock = self._sock
        assert sock is not None
        self._seq += 1
        seq = self._seq
        msg = (
            _NLMSGHDR.pack(20 + len(attrs), _T_CONFIG, _NLM_F_REQUEST | _NLM_F_ACK, seq, 0)
            + struct.pack("=BBH", socket.AF_UNSPEC, 0, self._qbe)
            + attrs
        )
        sock.send(msg)
        deadline = time.monotonic() + timeout
        ring = self._ring
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return errno.ETIMEDOUT
            readable, _, _ = select.select([sock], [], [], left)
            if not readable:
                continue
            try:
                n = sock.recv_into(ring, 0, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                raise
            off = 0
            while off < n:
                kind, nxt, val, _h, _i, _po, _pl = parse_message(ring, off, n)
                if kind == KIND_ERROR:
                    # nlmsgerr: int error, then the request's nlmsghdr (seq at +8).
                    if nxt - off >= 36 and _NLMSGHDR.unpack_from(ring, off + 20)[3] == seq:
                        return val
                elif kind in (KIND_PACKET, KIND_TRUNCATED, KIND_UNUSABLE):
                    # A packet queued between BIND and our ack: fail closed.
                    sock.send(self._simple(_T_VERDICT, _BE_DROP, val))
                    self.dropped += 1
                off = nxt

    def _simple(self, mtype: int, be_verdict: int, pid: int) -> bytes:
        return _V_SIMPLE.pack(
            32, mtype, _NLM_F_REQUEST, pid, 0, socket.AF_UNSPEC, 0, self._qbe,
            12, _NFQA_VERDICT_HDR, be_verdict, _htonl(pid),
        )  # fmt: skip

    def _send(self, segs: list[memoryview | bytes], seg_start: int, w: int) -> None:
        """Send pending verdicts: ``segs`` then ``out[seg_start:w]``."""
        sock = self._sock
        assert sock is not None
        try:
            if segs:
                if w > seg_start:
                    segs.append(self._out_mv[seg_start:w])
                sock.sendmsg(segs)
            elif w > seg_start:
                sock.send(self._out_mv[seg_start:w])
        except OSError:
            # Retry once (ENOBUFS/ENOMEM under memory pressure), then give up:
            # the packets stay queued (dropped when the queue is closed).
            self.errors += 1
            self._batch = False
            with contextlib.suppress(OSError):
                if segs:
                    sock.sendmsg(segs)
                else:
                    sock.send(self._out_mv[seg_start:w])

    def receive(self, handler: Handler, limit: int = 256) -> int:
        """Drain up to ``limit`` packets available now and verdict them.

        Non-blocking: returns as soon as the socket is empty (use
        :meth:`fileno` with select/epoll to wait). Calls
        ``handler(payload, hook, skbinfo)`` for each packet and sends all
        verdicts in as few ``sendmsg`` calls as possible; returns the number
        of packets handled. Never raises for a single bad message (counted in
        ``errors`` / ``dropped``). If the handler raises, its packet is
        dropped, the verdicts gathered so far are sent, and the exception
        propagates. A handler result other than 1, 2, 3 drops the packet.

        Verdicts, in packet order:

        * a leading run of plain accepts is one NFQNL_MSG_VERDICT_BATCH
          (accepts every queued id <= the last one; all of those have been
          read by us, since the kernel assigns ids and delivers the messages
          in order under the queue lock, and the others already got theirs);
        * after the first other verdict, one NFQNL_MSG_VERDICT per packet
          (and always, once anything happened that could leave a packet in
          the queue without a verdict: a malformed packet message, a refused
          verdict, a failed send; a batch accept would let such a packet
          through unexamined);
        * a mangled packet's verdict is built in place in the receive ring:
          its nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR, (NFQA_MARK,) and the
          NFQA_PAYLOAD header overwrite the packet message's own header and
          attributes, which end right where the payload starts, so the whole
          verdict is one contiguous slice of the ring (no copy) and the
          netlink padding after the payload is the message's own slot.
        """
        sock = self._sock
        if sock is None:
            raise OSError(errno.EBADF, "NetlinkQueue is closed")
        recv_into = sock.recv_into
        ring = self._ring
        rmv = self._ring_mv
        out = self._out
        out_mv = self._out_mv
        qbe = self._qbe
        simple_into = _V_SIMPLE.pack_into
        mangle_into = _V_MANGLE.pack_into
        htonl = _htonl
        parse = parse_message
        send_cap = self._send_cap
        ring_limit = len(ring) - _MAX_DGRAM
        iov_limit = _IOV_LIMIT
        dontwait = socket.MSG_DONTWAIT
        # verdict message fields shared by every pack below (see _V_SIMPLE)
        v_t, req, af = _T_VERDICT, _NLM_F_REQUEST, socket.AF_UNSPEC
        acc, drp = _BE_ACCEPT, _BE_DROP

        handled = 0
        roff = 0  # where the next datagram goes in the ring
        w = 0  # write position in out (simple verdicts)
        seg_start = 0  # start of the out region not yet appended to segs
        segs: list[memoryview | bytes] = []  # pending iovecs, in order
        pend = 0  # bytes pending in ring segments
        # -1: nothing yet; >=0: leading accept run up to this id; -2: run over
        run_max = -1 if self._batch else -2

        while handled < limit:
            if roff > ring_limit:  # ring full of pending mangled packets
                if run_max >= 0:
                    w = _pack_batch(out, w, run_max, qbe)
                self._send(segs, seg_start, w)
                segs = []
                w = seg_start = pend = roff = 0
                run_max = -1 if self._batch else -2
            try:
                n = recv_into(rmv[roff:] if roff else rmv, 0, dontwait)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                if run_max >= 0:
                    w = _pack_batch(out, w, run_max, qbe)
                self._send(segs, seg_start, w)
                raise
            off = roff
            end = roff + n
            keep = False
            while off < end:
                moff = off
                kind, off, pid, hook, info, poff, plen = parse(ring, off, end)
                if kind == 0:  # KIND_PACKET
                    handled += 1
                    try:
                        r = handler(rmv[poff : poff + plen], hook, info)
                    except BaseException:
                        if run_max >= 0:
                            w = _pack_batch(out, w, run_max, qbe)
                        simple_into(out, w, 32, v_t, req, pid, 0, af, 0, qbe, 12, 2, drp,
                                    htonl(pid))  # fmt: skip
                        w += 32
                        self._send(segs, seg_start, w)
                        raise
                    if r == 1:
                        if run_max != -2:
                            run_max = pid
                            continue
                        be_verdict = acc
                    elif r in (2, 3):
                        if pend + plen > send_cap or len(segs) >= iov_limit:
                            if run_max >= 0:
                                w = _pack_batch(out, w, run_max, qbe)
                            self._send(segs, seg_start, w)
                            segs = []
                            w = seg_start = pend = 0
                        elif run_max >= 0:
                            w = _pack_batch(out, w, run_max, qbe)
                        run_max = -2
                        if w > seg_start:
                            segs.append(out_mv[seg_start:w])
                            seg_start = w
                        if r == 2:
                            h = poff - 36
                            if h >= moff:  # always true for kernel messages
                                mangle_into(ring, h, 36 + plen, v_t, req, pid, 0, af, 0, qbe,
                                            12, 2, acc, htonl(pid), 4 + plen, 10)  # fmt: skip
                                segs.append(rmv[h : (poff + plen + 3) & -4])
                                pend += plen
                                keep = True
                                continue
                        else:
                            h = poff - 44
                            if h >= moff:  # true when any other attribute was present
                                _V_MANGLE_MARK.pack_into(
                                    ring, h, 44 + plen, v_t, req, pid, 0, af, 0, qbe, 12, 2, acc,
                                    htonl(pid), 8, 3, htonl(self.mark), 4 + plen, 10,
                                )  # fmt: skip
                                segs.append(rmv[h : (poff + plen + 3) & -4])
                                pend += plen
                                keep = True
                                continue
                        # No room in front of the payload (not produced by the
                        # kernel): header in out, payload as its own iovec.
                        w += self._mangled_fallback(segs, w, pid, r, rmv[poff : poff + plen])
                        seg_start = w
                        pend += plen
                        keep = True
                        continue
                    else:
                        be_verdict = drp
                elif kind == 2 or (kind == 1 and not pid):  # KIND_OTHER, ack
                    continue
                elif kind == 1 or kind == 3:  # KIND_ERROR: a verdict refused; KIND_BAD
                    self.errors += 1
                    if kind == 3 or pid != errno.ENOENT:  # ENOENT: id already gone, harmless
                        # A packet may now sit in the queue without a verdict:
                        # a later batch accept must not let it through.
                        self._batch = False
                        if run_max >= 0:
                            w = _pack_batch(out, w, run_max, qbe)
                        run_max = -2
                    continue
                else:  # KIND_TRUNCATED / KIND_UNUSABLE: has an id, fail closed
                    self.dropped += 1
                    if kind == KIND_TRUNCATED:
                        self.truncated += 1
                    else:
                        self.errors += 1
                    be_verdict = drp
                # one verdict without payload into out (accept after the run, drop)
                if w > _OUT_LIMIT:
                    self._send(segs, seg_start, w)
                    segs = []
                    w = seg_start = pend = 0
                if run_max >= 0:
                    w = _pack_batch(out, w, run_max, qbe)
                run_max = -2
                simple_into(out, w, 32, v_t, req, pid, 0, af, 0, qbe, 12, 2, be_verdict,
                            htonl(pid))  # fmt: skip
                w += 32
            if keep:
                roff = (end + 7) & -8

        if run_max >= 0:
            w = _pack_batch(out, w, run_max, qbe)
        if w > seg_start or segs:
            self._send(segs, seg_start, w)
        return handled

    def _mangled_fallback(
        self, segs: list[memoryview | bytes], w: int, pid: int, r: int, payload: memoryview
    ) -> int:
        """Mangled verdict whose header does not fit in front of the payload.

        Never the case for messages built by the kernel; kept so that any
        well-formed message gets a correct verdict. Packs the header at
        ``out[w:]``, appends header, payload and padding to ``segs`` and
        returns the header size (the caller advances ``w`` by it).
        """
        plen = len(payload)
        if r == 3:
            size = 44
            _V_MANGLE_MARK.pack_into(
                self._out, w, 44 + plen, _T_VERDICT, _NLM_F_REQUEST, pid, 0, socket.AF_UNSPEC,
                0, self._qbe, 12, _NFQA_VERDICT_HDR, _BE_ACCEPT, _htonl(pid),
                8, _NFQA_MARK, _htonl(self.mark), 4 + plen, _NFQA_PAYLOAD,
            )  # fmt: skip
        else:
            size = 36
            _V_MANGLE.pack_into(
                self._out, w, 36 + plen, _T_VERDICT, _NLM_F_REQUEST, pid, 0, socket.AF_UNSPEC,
                0, self._qbe, 12, _NFQA_VERDICT_HDR, _BE_ACCEPT, _htonl(pid),
                4 + plen, _NFQA_PAYLOAD,
            )  # fmt: skip
        segs.append(self._out_mv[w : w + size])
        segs.append(payload)
        if plen & 3:
            segs.append(_ZEROS[(-plen) & 3])
        return size

    def close(self) -> None:
        """Unbind the queue and close the socket; idempotent.

        Closing the socket alone would do (the kernel destroys the queue
        instances of a released netlink port and drops their pending
        packets), the explicit NFQNL_CFG_CMD_UNBIND just makes it immediate.
        """
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        try:
            attrs = _attr(_NFQA_CFG_CMD, struct.pack(">BBH", _NFQNL_CFG_CMD_UNBIND, 0, 0))
            sock.send(
                _NLMSGHDR.pack(20 + len(attrs), _T_CONFIG, _NLM_F_REQUEST, 0, 0)
                + struct.pack("=BBH", socket.AF_UNSPEC, 0, self._qbe)
                + attrs
            )
        except OSError:
            pass
        finally:
            sock.close()

    def __enter__(self) -> NetlinkQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _set_buffer(sock: socket.socket, force_opt: int, opt: int, size: int) -> None:
    """Set a socket buffer size, beyond the sysctl max when we have CAP_NET_ADMIN."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, force_opt, size)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, opt, size)
