"""Placing a new inside source: a configured backend keeps the scenario the
configuration gave it; any other source becomes a standalone backend on a
default SNAT address (docs/model.md, "Scenarios", scenario 3).

The scenario policy for configured backends is :func:`gateway.core.scenario.plan`,
applied at load and reload by :mod:`gateway.core.reconfigure`. Here is what
happens at packet time, when an unknown source opens its first flow.
"""

from __future__ import annotations

from gateway.core.address import Backend, Scenario
from gateway.core.block import CHUNK_SHIFT, PortBlock
from gateway.core.counters import Counter
from gateway.core.flow import Flow
from gateway.core.reconfigure import Reconfigure
from gateway.core.scenario import pick_default
from gateway.core.state import Buffer
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS


class Placement(Reconfigure):
    """Which backend an in2out packet without a flow belongs to."""

    def _new_flow(self, buf: Buffer, ihl: int, proto: int, key: bytes, now: float) -> Flow | None:
        """Create the flow for a first in2out packet; None (counted) when its
        security groups deny it (before any port or placement is taken), there
        is no public address for its source or no port for its destination.

        ``key`` carries the ports (an echo's identifier as the source port, 0 as
        the destination's) the outbound rules look at."""
        src = int.from_bytes(buf[12:16], "big")
        dst = int.from_bytes(buf[16:20], "big")
        dport = key[10] << 8 | key[11]
        decision = self.security.outbound(src, proto, src, key[8] << 8 | key[9], dst, dport)
        if not decision.allowed:
            self._deny(src, decision, dst, dport, proto, now)
            return None
        be = self.backends.get(src)
        if be is None:
            be = self._add_standalone(src)
            self._stamp_tier_changes(now)  # a tier move it caused happened now (rate limit)
            if be is None:
                self.counters[Counter.DROP_NO_PUBLIC_ADDRESS] += 1
                return None
        return self._create_flow(buf, ihl, proto, key, be, now, decision)

    def _add_standalone(self, src: int) -> Backend | None:
        """Give a source seen for the first time a default SNAT address and a block.

        The address's tier counts the standalone backends on it; when this one
        pushes it into a higher tier every block there halves first
        (docs/model.md, "Resizing"). With several workers only the source's
        owner places it, and each worker counts its own standalone backends
        there: at most 1000 / workers each, in the tier of that count times the
        workers (:meth:`~gateway.core.reconfigure.Reconfigure._default_size`).
        """
        shard = self.shard
        if not shard.owns_backend(src):
            return None
        addr = pick_default(self.defaults, MAX_BACKENDS_PER_ADDRESS // shard.count)
        if addr is None or addr.layout is None:
            return None
        count = len(addr.members) + 1
        self._resize(addr, self._default_size(addr, count), count)
        chunks = addr.layout.take(addr.layout.size >> CHUNK_SHIFT)
        if chunks is None:
            return None
        be = Backend(src, Scenario.DEFAULT, addr, PortBlock(addr.ip, chunks))
        self._add_backend(be)
        return be
