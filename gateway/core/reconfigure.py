"""Changing the table's shape while flows live: reload, tier moves, excluded
ports and the release of silent standalone backends (docs/model.md, "Resizing").

Every change keeps the flows it does not affect. A move into a higher tier
halves every block on the address and ends the flows on the reclaimed ports;
a move into a lower tier grows every block and ends nothing. Whatever ends
is said in one ``ports_reclaimed`` event per address and reason, and every
block that is allocated, resized or released in one ``port_block_*`` event
(port-block logging, RFC 6888 section 4 and RFC 7422).

Tier moves are rate-limited per address (docs/decisions.md, "Tier changes
are rate-limited"): a move into a higher tier happens whenever a new backend
needs it, but a move back into a lower tier (growing every block) waits
until the address has held its tier for ``idle_timeout``. The standalone
backends whose release would cause it stay vacant until then, so backends
that come and go, or spoofed sources that provoke placements, cannot make
an address flap and halve everyone's blocks more than once per period.
"""

from __future__ import annotations

from gateway.core.address import AddressKind, Backend, PublicAddress, Scenario, ip_str
from gateway.core.block import CHUNK, CHUNK_SHIFT, BlockLayout, PortBlock
from gateway.core.counters import END_COUNTER
from gateway.core.events import (
    FlowCreated,
    FlowEnded,
    PoolTierChanged,
    PortBlockAllocated,
    PortBlockReleased,
    PortBlockResized,
    PortsReclaimed,
    Ranges,
    ReclaimReason,
)
from gateway.core.flow import EndReason, Flow, timeout_for
from gateway.core.lifecycle import FlowLifecycle
from gateway.core.model import PROTO_NAMES, GatewayModel
from gateway.core.scenario import AddressPlan, Plan, plan
from gateway.core.security import SecurityPolicy
from gateway.core.shard import slice_chunks
from gateway.core.tier import MAX_BACKENDS_PER_ADDRESS, ports_per_backend

#: Keys of the summary :meth:`Reconfigure.reconfigure` returns (``config_reloaded``).
SUMMARY_KEYS = ("addresses_added", "addresses_removed", "backends_added", "backends_removed", "tier_changes")
#: What an instance IP's backend holds: every port of its own address (no translation).
ALL_PORTS: Ranges = ((0, 65535),)


def block_ranges(block: PortBlock | None) -> Ranges:
    """The ports ``block`` holds as (first, last) ranges; an instance IP (no block) holds all."""
    return ALL_PORTS if block is None else tuple(block.ranges())


def block_size(block: PortBlock | None) -> int:
    return 65536 if block is None else block.size


def _flow_keys(f: Flow) -> tuple[str, str, int, str, int, str, int]:
    """The endpoints of ``f`` as the flow events log them."""
    return (
        PROTO_NAMES[f.proto], ip_str(f.backend), f.backend_port, ip_str(f.public), f.public_port,
        ip_str(f.remote), f.remote_port,
    )  # fmt: skip


class Reconfigure(FlowLifecycle):
    """Applying a configuration, and every resize it or a standalone backend causes."""

    #: One of several workers (:mod:`gateway.core.shard`): the ownership checks run,
    #: on the paths where a flow lookup missed only.
    _sharded: bool = False
    #: Configured backends other workers own (they get no block here).
    _foreign: frozenset[int] = frozenset()

    def reconfigure(self, model: GatewayModel, now: float) -> dict[str, int]:
        """Apply a (new) configuration, keeping every flow it does not affect.

        Raises :class:`~gateway.core.errors.ModelError` before changing
        anything when the model is not valid. Otherwise, in this order:
        public addresses that go end all their flows; backends that leave or
        change scenario or address end theirs; each PAT address moves to the
        tier of its new member count; new backends get blocks; changed
        timeouts re-arm live flows; the security groups are compiled afresh
        (hit counts of rules that stay carry over) and every inbound path no
        rule opens that was not reported yet is (``inbound_not_opened``).
        Returns counts for ``config_reloaded``.
        """
        p = plan(model)
        security = SecurityPolicy(model, previous=getattr(self, "security", None))
        shard = self.shard
        self._sharded = not shard.alone
        owned = {b for b in p.placements if shard.owns_backend(b)}
        self._foreign = frozenset(p.placements.keys() - owned)
        before = self._ended_total()
        summary = dict.fromkeys(SUMMARY_KEYS, 0)
        for ip, addr in list(self.addresses.items()):
            ap = p.addresses.get(ip)
            if ap is None or ap.kind != addr.kind:
                summary["backends_removed"] += self._remove_address(addr)
                summary["addresses_removed"] += 1
            else:
                addr.name = ap.name
        gone: dict[int, list[Backend]] = {}
        for bip, be in self.backends.items():
            pl = p.placements.get(bip)
            if be.scenario == Scenario.DEFAULT:
                stale = pl is not None
            else:
                stale = pl is None or pl.scenario != be.scenario or pl.public_ip != be.address.ip
            if stale:
                gone.setdefault(be.address.ip, []).append(be)
            elif pl is not None:
                be.pool = pl.pool
        for ip, bes in gone.items():
            self._drop_backends(self.addresses[ip], bes, ReclaimReason.BACKEND_REMOVED)
            summary["backends_removed"] += len(bes)
        for ip, ap in p.addresses.items():
            if ip not in self.addresses:
                if ap.kind == AddressKind.INSTANCE_IP:
                    self.addresses[ip] = PublicAddress(ip, ap.kind)
                else:
                    self.addresses[ip] = self._new_pat_address(ap, p, owned)
                summary["addresses_added"] += 1
        for ip, addr in self.addresses.items():
            if addr.layout is None:
                continue
            ap = p.addresses[ip]
            if ap.excluded != addr.layout.excluded:
                self._exclude(addr, ap.excluded)
            if addr.kind == AddressKind.FRONTEND:
                count = p.tier_count(ip)
                size = self._tier_size(addr.layout, count, sum(1 for b in p.members(ip) if b in owned))
            else:
                count = len(addr.members)
                size = self._default_size(addr, count)
            if self._resize(addr, size, count, now):
                summary["tier_changes"] += 1
        for bip in sorted(owned):
            if bip in self.backends:
                continue
            pl = p.placements[bip]
            addr = self.addresses[pl.public_ip]
            block = None
            if pl.scenario != Scenario.INSTANCE_IP and addr.layout is not None:
                block = PortBlock(addr.ip, addr.layout.take(addr.layout.size >> CHUNK_SHIFT) or [])
            self._add_backend(Backend(bip, pl.scenario, addr, block, pl.pool))
            summary["backends_added"] += 1
        self.defaults = [self.addresses[ip] for ip in p.defaults]
        self.pool_frontend = p.pool_frontend
        if model.timeouts != self.timeouts:
            for flows in self.inside.values():
                for f in flows.values():
                    f.timeout = timeout_for(f.state, model.timeouts, f.idle)
                    self.wheel.schedule(f, f.last_seen + f.timeout)
        # New rules apply to new flows; live flows keep the decision that admitted
        # them (Azure's behaviour; docs/decisions.md, "Reload and live flows").
        self.security = security
        unopened = security.unopened()
        self.events += [e for e in unopened if e not in self._unopened]
        self._unopened = frozenset(unopened)
        self.model = model
        self.timeouts = model.timeouts
        summary["flows_ended"] = self._ended_total() - before
        return summary

    def _new_pat_address(self, ap: AddressPlan, p: Plan, owned: set[int]) -> PublicAddress:
        """A PAT address (frontend or default SNAT) with an empty layout, laid in this
        worker's slice, in the tier :meth:`_tier_size` gives it."""
        shard = self.shard
        if shard.alone:
            layout = BlockLayout(ports_per_backend(p.tier_count(ap.ip)), ap.excluded)
        else:
            layout = BlockLayout(1024, ap.excluded, span=slice_chunks(shard.index, shard.count))
            if ap.kind == AddressKind.FRONTEND:
                own = sum(1 for b in p.members(ap.ip) if b in owned)
                layout.size = self._tier_size(layout, p.tier_count(ap.ip), own)
        return PublicAddress(ap.ip, ap.kind, ap.name, layout)

    def _tier_size(self, layout: BlockLayout, count: int, own: int) -> int:
        """The block size of a layout: the tier of ``count`` backends (docs/model.md,
        "Preallocation by pool size"); with several workers, shrunk to the largest
        tier whose ``own`` blocks (this worker's backends there) fit its slice
        (docs/decisions.md, "Workers": slices and tiers). One worker: the tier."""
        size = ports_per_backend(count)
        if self._sharded and own:
            room = layout.room()
            while size > CHUNK and own * (size >> CHUNK_SHIFT) > room:
                size >>= 1
        return size

    def _default_size(self, addr: PublicAddress, local: int) -> int:
        """The block size on default SNAT address ``addr`` for ``local`` standalone
        backends of this worker: the tier of ``local`` times the worker count
        (every worker places its own share of the sources there), fitted to the
        slice (:meth:`_tier_size`)."""
        layout = addr.layout
        assert layout is not None
        return self._tier_size(layout, min(local * self.shard.count, MAX_BACKENDS_PER_ADDRESS), local)

    # ---------------------------------------------------------- per-flow logging (optional)
    # ``log_flows`` wraps the two places every flow starts and ends; off, it costs one
    # attribute test per flow start and end, nothing per packet.

    def _add_flow(self, f: Flow, be: Backend) -> None:
        """:meth:`FlowLifecycle._add_flow`, and ``flow_created`` when ``log_flows`` is on."""
        super()._add_flow(f, be)
        if self.model.log_flows:
            self.events.append(FlowCreated(*_flow_keys(f)))

    def end_flow(self, f: Flow, reason: EndReason, now: float | None = None) -> None:
        """:meth:`FlowLifecycle.end_flow`, and ``flow_ended`` when ``log_flows`` is on
        (and the flow was live: ending it twice logs once)."""
        logged = self.model.log_flows and self.inside[f.proto].get(f.inside_key) is f
        super().end_flow(f, reason, now)
        if logged:
            self.events.append(
                FlowEnded(
                    *_flow_keys(f), str(reason), round(f.last_seen - f.created, 3), f.pkts_out, f.bytes_out,
                    f.pkts_in, f.bytes_in,
                )
            )  # fmt: skip

    def _ended_total(self) -> int:
        return sum(self.counters[c] for c in END_COUNTER.values())

    def _add_backend(self, be: Backend) -> None:
        """Make ``be`` a member of its address, with a ``port_block_allocated`` event
        (not for a PAT backend whose block is laid out later: a state restore, which
        ends with :meth:`announce_blocks`)."""
        be.address.members[be.ip] = be
        self.backends[be.ip] = be
        if be.block is not None or be.address.layout is None:
            self.events.append(self._allocated(be))

    def _allocated(self, be: Backend) -> PortBlockAllocated:
        return PortBlockAllocated(
            ip_str(be.ip), ip_str(be.address.ip), block_ranges(be.block), block_size(be.block),
            be.scenario.label, be.pool,
        )  # fmt: skip

    def announce_blocks(self) -> None:
        """Replace the port-block events not yet drained by one ``port_block_allocated``
        per backend as its block stands now.

        For the adapter after a state restore, which lays blocks out again
        without events: the log then says what this run really holds (the
        ``snatgw who --at`` lookup starts afresh at each ``gateway_ready``).
        """
        kinds = (PortBlockAllocated, PortBlockResized, PortBlockReleased)
        self.events[:] = [e for e in self.events if not isinstance(e, kinds)]
        self.events += [self._allocated(be) for be in sorted(self.backends.values(), key=lambda b: b.ip)]

    def _remove_backend(self, be: Backend, reason: ReclaimReason) -> int:
        """End every flow of ``be`` and give its block back (``port_block_released``);
        returns how many flows ended."""
        ended = len(be.flows)
        for f in list(be.flows):
            self.end_flow(f, EndReason.REMOVED)
        addr = be.address
        if be.block is not None and addr.layout is not None:
            addr.layout.give(be.block.chunks)
        addr.members.pop(be.ip, None)
        self.backends.pop(be.ip, None)
        self.events.append(
            PortBlockReleased(
                ip_str(be.ip), ip_str(addr.ip), block_ranges(be.block), block_size(be.block), reason
            )
        )
        return ended

    def _block_resized(self, be: Backend, old: Ranges, old_size: int, reason: ReclaimReason) -> None:
        block = be.block
        assert block is not None
        self.events.append(
            PortBlockResized(
                ip_str(be.ip), ip_str(be.address.ip), block_ranges(block), block.size, old, old_size, reason
            )
        )

    def _drop_backends(self, addr: PublicAddress, backends: list[Backend], reason: ReclaimReason) -> None:
        """Remove ``backends`` of ``addr`` (their flows end, their blocks go back) and
        say so in one ``ports_reclaimed`` event."""
        flows = ports = 0
        for be in backends:
            ports += be.block.size if be.block is not None else 0
            flows += self._remove_backend(be, reason)
        self._reclaimed(addr, reason, flows, ports, len(backends))

    def _remove_address(self, addr: PublicAddress) -> int:
        """End every flow through ``addr`` and forget it; returns how many backends it had."""
        backends = list(addr.members.values())
        self._drop_backends(addr, backends, ReclaimReason.ADDRESS_REMOVED)
        del self.addresses[addr.ip]
        self._tier_changed.pop(addr.ip, None)  # a later address of that IP starts afresh
        return len(backends)

    def _reclaimed(
        self, addr: PublicAddress, reason: ReclaimReason, flows: int, ports: int, backends: int
    ) -> None:
        self.events.append(PortsReclaimed(ip_str(addr.ip), addr.name, reason, backends, ports, flows))

    def _end_on_chunks(self, be: Backend, chunks: set[int]) -> int:
        """End ``be``'s flows on ports of ``chunks`` (reclaimed); returns how many."""
        block = be.block
        doomed = [f for f in be.flows if f.block is block and f.public_port >> CHUNK_SHIFT in chunks]
        for f in doomed:
            self.end_flow(f, EndReason.RECLAIMED)
        return len(doomed)

    def _resize(self, addr: PublicAddress, size: int, backends: int, now: float | None = None) -> bool:
        """Move ``addr`` to the tier whose block size is ``size``; False if it is there.

        Smaller blocks keep their first chunks and the flows there; larger
        ones append chunks, next to the block when they are free. ``now``
        (None: a placement, stamped by :meth:`_stamp_tier_changes`) is
        remembered for the rate limit on moves into a lower tier.
        """
        layout = addr.layout
        assert layout is not None
        old = layout.size
        if size == old:
            return False
        layout.size = size
        self.tier_changes += 1
        if now is None:
            self._tier_unstamped.append(addr.ip)
        else:
            self._tier_changed[addr.ip] = now
        want = size >> CHUNK_SHIFT
        flows = ports = 0
        members = sorted(addr.members.values(), key=lambda b: b.ip)
        for be in members:
            block = be.block
            if block is None:
                continue
            before, before_size = block_ranges(block), block.size
            if len(block.chunks) > want:
                leaving = block.chunks[want:]
                flows += self._end_on_chunks(be, set(leaving))
                block.retile(block.chunks[:want])
                layout.give(leaving)
                ports += len(leaving) << CHUNK_SHIFT
            elif len(block.chunks) < want:
                extra = layout.take(want - len(block.chunks), block.chunks[-1] if block.chunks else -1)
                if extra is not None:
                    block.retile(block.chunks + extra)
            if block.size != before_size:
                self._block_resized(be, before, before_size, ReclaimReason.TIER_CHANGE)
        self.events.append(
            PoolTierChanged(ip_str(addr.ip), addr.name, addr.kind, backends, old, size, addr.tier)
        )
        if size < old:
            self._reclaimed(addr, ReclaimReason.TIER_CHANGE, flows, ports, len(members))
        return True

    def _exclude(self, addr: PublicAddress, excluded: frozenset[int]) -> None:
        """New excluded ports (an LB rule's frontend port) take their chunk out of
        any block holding it; the block gets a free chunk in its place."""
        layout = addr.layout
        assert layout is not None
        newly = layout.set_excluded(excluded)
        flows = ports = backends = 0
        for be in addr.members.values():
            block = be.block
            if block is None:
                continue
            hit = newly & set(block.chunks)
            if not hit:
                continue
            backends += 1
            before, before_size = block_ranges(block), block.size
            flows += self._end_on_chunks(be, hit)
            ports += len(hit) << CHUNK_SHIFT
            kept = [c for c in block.chunks if c not in hit]
            block.retile(kept + (layout.take(len(hit)) or []))
            self._block_resized(be, before, before_size, ReclaimReason.PORT_EXCLUDED)
        if ports:
            self._reclaimed(addr, ReclaimReason.PORT_EXCLUDED, flows, ports, backends)

    def _stamp_tier_changes(self, now: float) -> None:
        """Give tier moves made by a placement (no clock of their own) the time ``now``
        (placement calls this right after it placed a standalone backend)."""
        for ip in self._tier_unstamped:
            self._tier_changed[ip] = now
        self._tier_unstamped.clear()

    def _release_vacant(self, now: float) -> None:
        """Give the blocks of long-silent standalone backends back to their default
        address, which may then fall to a lower tier and grow every other block
        (a shrinking pool ends no flow). A backend that speaks again later is
        placed afresh, like a new one.

        Rate limit: when the releases due on an address would move it into a
        lower tier less than ``idle_timeout`` after its last tier change, they
        wait (still vacant) until that much time has passed."""
        self._stamp_tier_changes(now)
        idle = self.timeouts.idle
        released: dict[int, list[Backend]] = {}
        due = float("inf")
        for ip, be in list(self._vacant.items()):
            since = be.vacant_since
            if be.flows or since is None or self.backends.get(ip) is not be:
                del self._vacant[ip]
                be.vacant_since = None
            elif since + idle <= now:
                del self._vacant[ip]
                released.setdefault(be.address.ip, []).append(be)
            else:
                due = min(due, since + idle)
        for ip, bes in released.items():
            addr = self.addresses[ip]
            hold_until = self._grow_allowed_at(addr, len(addr.members) - len(bes))
            if now < hold_until:
                for be in bes:
                    self._vacant[be.ip] = be
                due = min(due, hold_until)
                continue
            self._drop_backends(addr, bes, ReclaimReason.BACKEND_IDLE)
            if addr.layout is not None:
                count = len(addr.members)
                self._resize(addr, self._default_size(addr, count), count, now)
        self._vacant_due = due

    def _grow_allowed_at(self, addr: PublicAddress, count: int) -> float:
        """When ``addr`` may move to the tier of ``count`` backends: at once unless that is
        a lower tier (larger blocks), then ``idle_timeout`` after its last tier change."""
        layout = addr.layout
        if layout is None or self._default_size(addr, count) <= layout.size:
            return float("-inf")
        return self._tier_changed.get(addr.ip, float("-inf")) + self.timeouts.idle
