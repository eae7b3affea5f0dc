"""Verdict batching for :class:`~gateway.adapters.nfqueue.queue.NetlinkQueue`.

Split from the queue so that the receive loop reads as "parse, call the
handler, hand the result to the writer": this module owns what one drain's
verdicts look like on the way out (the leading run of plain accepts as one
NFQNL_MSG_VERDICT_BATCH, the pending iovecs, when to flush). Wire layouts
come from :mod:`gateway.adapters.nfqueue.codec`.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable

from gateway.adapters.nfqueue.codec import (
    NLM_F_REQUEST,
    T_VERDICT,
    V_SIMPLE,
    ZEROS,
    pack_batch_into,
    pack_mangled_header_into,
)
from gateway.core.verdict import Verdict

__all__ = ["BE_ACCEPT", "BE_DROP", "VerdictWriter"]

#: Scratch buffer for verdict headers (32 or 44 bytes per packet).
_OUT_SIZE = 1 << 16
_OUT_LIMIT = _OUT_SIZE - 256
#: Linux UIO_MAXIOV is 1024 buffers per sendmsg.
_IOV_LIMIT = 1000

_AF_UNSPEC = socket.AF_UNSPEC
#: Kernel verdicts as they go on the wire (``NF_ACCEPT`` / ``NF_DROP``, big endian).
BE_ACCEPT = socket.htonl(Verdict.ACCEPT)
BE_DROP = socket.htonl(Verdict.DROP)

#: codec.V_MANGLE / V_MANGLE_MARK with the per-queue constant runs as byte strings:
#: nlmsg_len, (type, flags), seq, (portid, nfgenmsg, NFQA_VERDICT_HDR header and
#: verdict), packet id, [NFQA_MARK attribute,] NFQA_PAYLOAD header.
_MANGLE = struct.Struct("=I4sI16sIHH")
_MANGLE_MARK = struct.Struct("=I4sI16sI8sHH")
_TF = struct.Struct("=HH")
_FIXED = struct.Struct("=IBBHHHI")
_NLA_U32 = struct.Struct("=HHI")


class VerdictWriter:
    """The verdicts of one drain, gathered for as few ``sendmsg`` calls as possible.

    One per queue, reset after every flush. Pending output is an iovec list
    (``segs``: slices of ``out`` and of the receive ring, in packet order)
    plus ``out[seg_start:w]``, the plain verdicts written since the last
    ring slice. A leading run of plain accepts is held back as ``run_last``
    and sent as one NFQNL_MSG_VERDICT_BATCH when the run ends; it only
    starts while ``batch`` allows it (see :meth:`forbid_batch`).
    """

    __slots__ = (
        "_sock", "_out", "_out_mv", "_ring_mv", "queue", "_qbe", "mark", "be_mark", "send_cap", "_fixed",
        "_mark_attr",
        "segs", "w", "seg_start", "pend", "in_run", "run_last", "batch", "send_failures",
    )  # fmt: skip

    def __init__(self, sock: socket.socket, ring_mv: memoryview, queue: int, send_cap: int) -> None:
        self._sock = sock
        self._out = bytearray(_OUT_SIZE)
        self._out_mv = memoryview(self._out)
        self._ring_mv = ring_mv
        self.queue = queue
        self._qbe = socket.htons(queue)
        #: A mangled verdict's bytes that are the same for every packet of this queue:
        #: nlmsg_type and flags, then portid, nfgenmsg and NFQA_VERDICT_HDR up to the id.
        self._fixed = (_TF.pack(T_VERDICT, NLM_F_REQUEST),
                       _FIXED.pack(0, _AF_UNSPEC, 0, self._qbe, 12, 2, BE_ACCEPT))  # fmt: skip
        self.set_mark(0)
        #: Most payload bytes in one sendmsg (netlink refuses more than sk_sndbuf - 32).
        self.send_cap = send_cap
        #: Batch accepts cover every queued id up to the last one: only safe
        #: while no packet can have been left without a verdict. Cleared for good.
        self.batch = True
        self.send_failures = 0
        self.segs: list[memoryview | bytes] = []
        self.reset()

    def set_mark(self, mark: int) -> None:
        """The mark ACCEPT_MODIFIED_MARK verdicts set (and its NFQA_MARK attribute, packed once)."""
        self.mark = mark
        self.be_mark = socket.htonl(mark)
        self._mark_attr = _NLA_U32.pack(8, 3, self.be_mark)

    def reset(self) -> None:
        """Forget what was sent: empty iovecs, empty ``out``, a new run may start."""
        self.segs = []
        self.w = self.seg_start = self.pend = 0
        self.run_last = -1
        self.in_run = self.batch

    def _end_run(self) -> None:
        """The leading run of accepts is over: write its batch verdict, if any."""
        if self.run_last >= 0:
            self.w = pack_batch_into(self._out, self.w, self.queue, self.run_last)
            self.run_last = -1
        self.in_run = False

    def forbid_batch(self) -> None:
        """A packet may now sit in the queue without a verdict: a later batch accept
        would let it through unexamined, so there will be none (the run so far is kept)."""
        self.batch = False
        self._end_run()

    # The two methods below run once per packet: struct methods and constants
    # are bound as defaults (fast local lookups); those parameters are not
    # part of the interface.

    def verdict(
        self,
        pid: int,
        be_verdict: int,
        _pack: Callable[..., None] = V_SIMPLE.pack_into,
        _htonl: Callable[[int], int] = socket.htonl,
        _t: int = T_VERDICT,
        _req: int = NLM_F_REQUEST,
        _af: int = _AF_UNSPEC,
    ) -> None:
        """A verdict without payload (``be_verdict`` already htonl'ed), after the run."""
        if self.w > _OUT_LIMIT:
            self.flush()
        if self.in_run:
            self._end_run()
        w = self.w
        _pack(self._out, w, 32, _t, _req, pid, 0, _af, 0, self._qbe, 12, 2, be_verdict, _htonl(pid))
        self.w = w + 32

    def mangled(
        self,
        pid: int,
        moff: int,
        poff: int,
        plen: int,
        marked: bool,
        _pack: Callable[..., None] = _MANGLE.pack_into,
        _pack_mark: Callable[..., None] = _MANGLE_MARK.pack_into,
        _htonl: Callable[[int], int] = socket.htonl,
    ) -> None:
        """Accept with the payload at ``ring[poff:poff + plen]`` (message at ``moff``).

        The verdict's nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR (2), (NFQA_MARK
        (3),) and NFQA_PAYLOAD (10) header overwrite the packet message's own
        header and attributes, which end right where the payload starts, so
        the whole verdict is one contiguous slice of the ring (no copy) and
        the netlink padding after the payload is the message's own slot. The
        bytes that never change are packed once (``_fixed``, ``_mark_attr``):
        the same layout as codec.V_MANGLE(_MARK), from 7 or 8 arguments instead of 14 or 17.
        """
        segs = self.segs
        if self.pend + plen > self.send_cap or len(segs) >= _IOV_LIMIT:
            self.flush()
            segs = self.segs
        if self.in_run:
            self._end_run()
        w = self.w
        if w > self.seg_start:
            segs.append(self._out_mv[self.seg_start : w])
            self.seg_start = w
        ring = self._ring_mv
        tf, fixed = self._fixed
        if marked:
            h = poff - 44
            if h >= moff:  # true when any attribute besides NFQA_PACKET_HDR was sent
                _pack_mark(ring, h, 44 + plen, tf, pid, fixed, _htonl(pid), self._mark_attr, 4 + plen, 10)
                segs.append(ring[h : (poff + plen + 3) & -4])
                self.pend += plen
                return
        else:
            h = poff - 36
            if h >= moff:  # always true for messages built by the kernel
                _pack(ring, h, 36 + plen, tf, pid, fixed, _htonl(pid), 4 + plen, 10)
                segs.append(ring[h : (poff + plen + 3) & -4])
                self.pend += plen
                return
        self._mangled_fallback(pid, poff, plen, self.mark if marked else None)

    def requeue(self, pid: int, moff: int, poff: int, plen: int, verdict: int, mark: int) -> None:
        """Hand the packet at ``ring[poff:poff + plen]`` (message at ``moff``) on,
        with its payload as rewritten so far and the mark ``mark``.

        ``verdict`` is ``NF_QUEUE`` with the target queue in its upper bits
        (:func:`gateway.adapters.kernel.requeue_verdict`), host order. The
        message is laid out like a marked :meth:`mangled` one, in place. Only
        for packets a worker does not own (docs/kernel.md, "Steering"), so it
        is written for clarity rather than per-packet speed.
        """
        segs = self.segs
        if self.pend + plen > self.send_cap or len(segs) >= _IOV_LIMIT:
            self.flush()
            segs = self.segs
        if self.in_run:
            self._end_run()
        if self.w > self.seg_start:
            segs.append(self._out_mv[self.seg_start : self.w])
            self.seg_start = self.w
        h = poff - 44
        if h < moff:
            self._mangled_fallback(pid, poff, plen, mark, verdict)
            return
        pack_mangled_header_into(self._ring_mv, h, self.queue, pid, plen, mark, verdict)
        segs.append(self._ring_mv[h : (poff + plen + 3) & -4])
        self.pend += plen

    def _mangled_fallback(
        self, pid: int, poff: int, plen: int, mark: int | None, verdict: int = Verdict.ACCEPT
    ) -> None:
        """Header in ``out``, payload as its own iovec, then padding.

        For a well-formed message with too little room in front of its
        payload; the kernel never builds one, the tests do.
        """
        if self.w > _OUT_LIMIT:
            self.flush()
        w = self.w
        size = pack_mangled_header_into(self._out, w, self.queue, pid, plen, mark, verdict)
        segs = self.segs
        segs.append(self._out_mv[w : w + size])
        segs.append(self._ring_mv[poff : poff + plen])
        if plen & 3:
            segs.append(ZEROS[(-plen) & 3])
        self.w = self.seg_start = w + size
        self.pend += plen

    def flush(self) -> None:
        """Send everything pending (the run's batch verdict included), then reset.

        A failed send is retried once (ENOBUFS/ENOMEM under memory pressure),
        then given up: the packets stay queued (dropped when the queue is
        closed), so batch accepts are forbidden from then on.
        """
        if self.run_last >= 0:
            self._end_run()
        segs = self.segs
        w = self.w
        if w > self.seg_start:
            if segs:
                segs.append(self._out_mv[self.seg_start : w])
            else:
                segs = [self._out_mv[self.seg_start : w]]
        if segs:
            try:
                self._sock.sendmsg(segs)
            except OSError:
                self.send_failures += 1
                self.batch = False
                with contextlib.suppress(OSError):
                    self._sock.sendmsg(segs)
        self.reset()
