"""Our own nfnetlink_queue client: :class:`NetlinkQueue`.

Why not the netfilterqueue library: it cannot set ``NFQA_CFG_F_GSO``, so the
kernel segments every GSO packet before queueing and TCP through the gateway
is capped at one Python round trip per 1448 payload bytes (docs/kernel.md,
"Whole GSO segments"); it also sends one verdict per ``sendmsg``. This client
asks for whole GSO super-packets (up to 64 KiB) and sends all the verdicts of
one drain in one ``sendmsg``.

Two modules, named after what they hold rather than after the protocol
(``nlqueue`` was both):

* :mod:`~gateway.adapters.nfqueue.codec`: the wire format, pure (bytes in,
  records out), testable and fuzzable without a kernel;
* :mod:`~gateway.adapters.nfqueue.queue`: the socket, the receive ring and
  the verdict batching.
"""

from gateway.adapters.nfqueue.queue import Handler, NetlinkQueue

__all__ = ["Handler", "NetlinkQueue"]
