"""One bound NFQUEUE queue over an ``AF_NETLINK`` / ``NETLINK_NETFILTER`` socket.

The I/O half of the client; the wire format is in
:mod:`gateway.adapters.nfqueue.codec`. One :meth:`NetlinkQueue.receive` call
drains many packets and sends all their verdicts in one ``sendmsg``
(scatter/gather: several netlink messages, no copy).

The per-packet path allocates almost nothing: datagrams are received with
``recv_into`` into one preallocated ring buffer and the handler gets a
``memoryview`` of the payload inside that ring, which it may modify in place.
The verdict for a modified packet is built in place in front of its payload
(over the packet message's own header and attributes) and sent straight from
the ring; plain verdicts are packed into a second preallocated buffer.
:class:`~gateway.adapters.nfqueue.verdicts.VerdictWriter` keeps that bookkeeping
out of the receive loop.
"""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import time
from collections.abc import Callable, Sequence

from gateway.adapters.kernel import Mark, requeue_verdict
from gateway.adapters.nfqueue.codec import (
    Kind,
    error_seq,
    pack_bind,
    pack_unbind,
    pack_verdict,
    packet_mark,
    parse,
)
from gateway.adapters.nfqueue.shapes import NLA, TOP, ShapeCache
from gateway.adapters.nfqueue.verdicts import BE_ACCEPT, BE_DROP, VerdictWriter
from gateway.core.verdict import Verdict

__all__ = ["Handler", "NetlinkQueue"]

#: ``handler(payload, hook, skbinfo) -> Verdict``. ``payload`` is a writable
#: view of the packet (IP header first), valid only during the call; modify it
#: in place and return ACCEPT_MODIFIED(_MARK) to have it sent back.
Handler = Callable[[memoryview, int, int], int]

_NETLINK_NETFILTER = 12  # linux/netlink.h
_SOL_NETLINK = 270  # linux/socket.h
_NETLINK_NO_ENOBUFS = 5  # linux/netlink.h
_NETLINK_CAP_ACK = 10  # linux/netlink.h: errors echo only the header
_SO_SNDBUFFORCE = 32  # asm-generic/socket.h
_SO_RCVBUFFORCE = 33

#: Largest datagram the kernel sends for one packet: a 65531-byte payload
#: attribute plus the other attributes (well under 4 KiB).
_MAX_DGRAM = 65536 + 4096
#: Receive ring: payloads of mangled packets stay here until their verdicts are
#: sent, so it holds ~15 GSO super-packets or thousands of small packets.
_RING_SIZE = 1 << 20
_SNDBUF = 4 << 20
#: Datagrams start on these boundaries in the ring (``NetlinkQueue._tails``).
_SLOT = 256


class NetlinkQueue:
    """One bound NFQUEUE queue.

    Typical loop: ``select``/``epoll`` on :meth:`fileno`, then
    ``q.receive(handler)``. The handler returns a :class:`Verdict`: DROP,
    ACCEPT (unchanged), ACCEPT_MODIFIED (payload modified in place: sent
    back; same length) or ACCEPT_MODIFIED_MARK (as ACCEPT_MODIFIED and set
    the packet mark to :attr:`mark`, default ``Mark.TRANSLATED``). The
    payload view is only valid during the call.

    Checksums with ``gso=True`` (docs/kernel.md, "Checksums, offloads,
    sizes" and "Whole GSO segments"): the kernel no longer completes partial
    checksums before queueing. A packet with SkbInfo.GSO that is sent back
    gets its TCP checksums recomputed by the kernel when it is segmented
    (only the IPv4 header checksum must be right); a non-GSO packet with
    SkbInfo.CSUMNOTREADY holds only the pseudo-header sum in its L4 checksum
    field, and if sent back modified it goes out exactly as written, so it
    needs a full L4 checksum.

    Counters (plain ints, for the caller's metrics): ``errors`` (malformed
    messages, kernel error replies to our verdicts, failed verdict sends),
    ``dropped`` (packets this class dropped without asking the handler:
    unusable or truncated messages, packets that arrived while binding),
    ``truncated`` (of those, packets longer than copy_range), ``enobufs``
    (socket overruns: the kernel lost packet messages; those packets were
    dropped by the kernel), ``misrouted`` (REQUEUE verdicts not followed:
    the packet had been handed on once already, or names no worker; dropped).

    Re-queue (several workers, docs/kernel.md "Steering"): a handler result
    ``Verdict.REQUEUE + k`` hands the packet, with its payload as rewritten
    and its mark plus ``Mark.REQUEUED``, to queue ``requeue_to[k]`` (worker
    k's queue of the same kind as this one) with an ``NF_QUEUE`` verdict.
    """

    _sock: socket.socket | None
    _writer: VerdictWriter
    _errors: int
    dropped: int
    truncated: int
    enobufs: int
    misrouted: int
    queue_num: int
    requeue_to: tuple[int, ...]

    def __init__(
        self,
        queue_num: int,
        *,
        gso: bool = False,
        max_len: int = 4096,
        copy_range: int = 0xFFFF,
        rcvbuf: int = 16 << 20,
        fail_open: bool = False,
        requeue_to: Sequence[int] = (),
    ) -> None:
        """Open a netlink socket, bind it to ``queue_num`` and configure it.

        ``requeue_to[k]`` is the queue a ``REQUEUE + k`` verdict hands a packet
        to (empty with one worker: such a verdict drops the packet).

        One config message binds and configures (:func:`codec.pack_bind`).
        The PF_BIND/PF_UNBIND commands are no-ops since Linux 3.8 and are not
        sent. Raises OSError if the kernel refuses (EPERM/EBUSY: queue bound
        by another socket in this network namespace; EOPNOTSUPP: flag unknown;
        docs/kernel.md, "Pitfalls").
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
            self.requeue_to = tuple(requeue_to)
            self._seq += 1
            msg = pack_bind(queue_num, self._seq, copy_range=copy_range, max_len=max_len, gso=gso,
                            fail_open=fail_open)  # fmt: skip
            err = self._request(msg, self._seq)
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
        self._errors = 0
        self.dropped = 0
        self.truncated = 0
        self.enobufs = 0
        self.misrouted = 0
        self.requeue_to = ()
        self._ring = bytearray(_RING_SIZE)
        self._ring_mv = memoryview(self._ring)
        #: The ring from every 256-byte boundary on, made once: a datagram is received
        #: at one of them (no memoryview slice per recv).
        self._tails = [self._ring_mv[i:] for i in range(0, _RING_SIZE, _SLOT)]
        #: Packet messages parsed by their shape (shapes.py): 0.6 us instead of 1.2-1.8.
        self.shapes = ShapeCache()
        try:
            sndbuf = sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        except OSError:
            sndbuf = 212992
        # netlink_sendmsg() refuses a message larger than sk_sndbuf - 32.
        send_cap = max(min(sndbuf - 1024, _RING_SIZE), 70000)
        self._writer = VerdictWriter(sock, self._ring_mv, queue_num, send_cap)
        self.mark = Mark.TRANSLATED
        self._seq = 0

    @property
    def mark(self) -> int:
        """Mark set on packets whose handler returned ACCEPT_MODIFIED_MARK."""
        return self._writer.mark

    @mark.setter
    def mark(self, value: int) -> None:
        self._writer.set_mark(value)

    @property
    def errors(self) -> int:
        """Malformed messages, kernel error replies to our verdicts, failed verdict sends."""
        return self._errors + self._writer.send_failures

    def fileno(self) -> int:
        """The netlink socket's descriptor, for select/poll/epoll (-1 once closed)."""
        return self._sock.fileno() if self._sock is not None else -1

    def _request(self, msg: bytes, seq: int, timeout: float = 5.0) -> int:
        """Send a config message that asks for an ack (seq ``seq``) and wait; return its errno."""
        sock = self._sock
        assert sock is not None
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
                m = parse(ring, off, n)
                if m.kind is Kind.ERROR:
                    if error_seq(ring, off, m.next_off) == seq:
                        return m.packet_id
                elif m.kind in (Kind.PACKET, Kind.TRUNCATED, Kind.UNUSABLE):
                    # A packet queued between BIND and our ack: fail closed.
                    sock.send(pack_verdict(self.queue_num, m.packet_id, Verdict.DROP))
                    self.dropped += 1
                off = m.next_off

    def receive(self, handler: Handler, limit: int = 256) -> int:
        """Drain up to ``limit`` packets available now and verdict them.

        Non-blocking: returns as soon as the socket is empty (use
        :meth:`fileno` with select/epoll to wait). Calls
        ``handler(payload, hook, skbinfo)`` for each packet and sends all
        verdicts in as few ``sendmsg`` calls as possible; returns the number
        of packets handled. Never raises for a single bad message (counted in
        ``errors`` / ``dropped``); ENOBUFS from recv is counted in
        ``enobufs`` and the drain goes on. If the handler raises, its packet
        is dropped, the verdicts gathered so far are sent, and the exception
        propagates. ``REQUEUE + k`` hands the packet to ``requeue_to[k]``
        (see the class); any other result than ACCEPT, ACCEPT_MODIFIED,
        ACCEPT_MODIFIED_MARK drops the packet.

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
        * a mangled packet's verdict is built in place in the receive ring
          (:meth:`VerdictWriter.mangled`), or, with no room in front of the
          payload, from a header in the scratch buffer plus the payload;
        * pending verdicts are sent early when the ring is nearly full (its
          slices must go out before it is reused), when the payload bytes
          would exceed what one sendmsg may carry, when the iovec count
          reaches UIO_MAXIOV, or when the scratch buffer is full.
        """
        sock = self._sock
        if sock is None:
            raise OSError(errno.EBADF, "NetlinkQueue is closed")
        recv_into = sock.recv_into
        ring = self._ring
        rmv = self._ring_mv
        tails = self._tails
        wr = self._writer
        cache = self.shapes
        parse_ = cache.parse  # parse_message's answer, by the message's shape
        # ShapeCache.parse's hit test, inline (a call and a 7-tuple less per packet);
        # a message it does not settle goes to parse_. The list is only changed in place.
        known = cache.shapes
        top, nla, sw, ntohl = TOP.unpack_from, NLA.unpack_from, ring.startswith, socket.ntohl
        fast = 0
        ring_limit = len(ring) - _MAX_DGRAM
        dontwait = socket.MSG_DONTWAIT
        packet, error, bad, other, truncated = Kind.PACKET, Kind.ERROR, Kind.BAD, Kind.OTHER, Kind.TRUNCATED
        acc, drp = BE_ACCEPT, BE_DROP
        wr.reset()
        handled = 0
        roff = 0  # where the next datagram goes in the ring
        while handled < limit:
            if roff > ring_limit:
                wr.flush()
                roff = 0
            try:
                n = recv_into(tails[roff >> 8], 0, dontwait)
            except BlockingIOError:
                break
            except OSError as e:
                if e.errno == errno.ENOBUFS:
                    self.enobufs += 1
                    continue
                wr.flush()
                raise
            off = roff
            end = roff + n
            keep = False  # a verdict slice of this datagram is pending: keep it in the ring
            while off < end:
                moff = off
                kind = None
                if known and end - off >= 32:
                    mlen, mtype, alen, atype, pid = top(ring, off)
                    if mtype == 0x300 and mlen <= end - off and alen == 11 and atype == 1:  # NFQA_PACKET_HDR
                        for head, skel, hook, info in known:  # noqa: B007 (kept after the break)
                            if head < mlen and sw(skel, off + 28):
                                alen, atype = nla(ring, off + head - 4)
                                plen = alen - 4
                                if atype == 10 and plen > 0 and 0 <= mlen - head - plen < 4:  # NFQA_PAYLOAD
                                    kind = packet
                                    pid = ntohl(pid)
                                    poff = off + head
                                    off += (mlen + 3) & -4
                                    if off > end:
                                        off = end
                                    fast += 1
                                    break
                if kind is None:
                    kind, off, pid, hook, info, poff, plen = parse_(ring, off, end)
                if kind is packet:
                    handled += 1
                    try:
                        r = handler(rmv[poff : poff + plen], hook, info)
                    except BaseException:
                        wr.verdict(pid, drp)
                        wr.flush()
                        raise
                    if r == 2 or r == 3:  # ACCEPT_MODIFIED, ACCEPT_MODIFIED_MARK
                        wr.mangled(pid, moff, poff, plen, r == 3)
                        keep = True
                    elif r == 1 and wr.in_run:
                        wr.run_last = pid
                    elif r > 3:  # Verdict.REQUEUE + k: a packet this worker does not own
                        keep = self._requeue(pid, moff, off, hook, poff, plen, r) or keep
                    else:
                        wr.verdict(pid, acc if r == 1 else drp)
                elif kind is error:
                    if pid:  # 0 is an ack; ENOENT: the id is already gone, harmless
                        self._errors += 1
                        if pid != errno.ENOENT:
                            wr.forbid_batch()
                elif kind is bad:
                    self._errors += 1
                    wr.forbid_batch()
                elif kind is not other:  # TRUNCATED, UNUSABLE: has an id, fail closed
                    self.dropped += 1
                    if kind is truncated:
                        self.truncated += 1
                    else:
                        self._errors += 1
                    wr.verdict(pid, drp)
            if keep:
                roff = (end + _SLOT - 1) & -_SLOT
        cache.hits += fast
        wr.flush()
        return handled

    def _requeue(self, pid: int, moff: int, mend: int, hook: int, poff: int, plen: int, r: int) -> bool:
        """Hand packet ``pid`` to worker ``r - REQUEUE``'s queue; True when its verdict
        uses the ring (the payload goes with it), False when it was dropped instead.

        Never twice: a packet that already carries ``Mark.REQUEUED`` (``Hook.REQUEUED``
        in its hook) is dropped, as is one naming no worker (fail closed).
        """
        k = r - Verdict.REQUEUE
        if hook & 0x200 or k >= len(self.requeue_to):  # Hook.REQUEUED
            self.misrouted += 1
            self._writer.verdict(pid, BE_DROP)
            return False
        mark = packet_mark(self._ring, moff, mend) | Mark.REQUEUED
        self._writer.requeue(pid, moff, poff, plen, requeue_verdict(self.requeue_to[k]), mark)
        return True

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
            sock.send(pack_unbind(self.queue_num))
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
