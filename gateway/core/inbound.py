"""Flows opened from the outside: LB rules, inbound NAT rules and instance IPs
(docs/model.md, "Inbound"), and the health of LB rule members that decides
where a new one goes (docs/model.md, "Health probes").

An unsolicited packet from the outside that no flow matches comes here from
:mod:`gateway.core.out2in` (and the destination half of a hairpinned packet,
:meth:`~gateway.core.table.TranslationTable.hairpin`). The index built at load
and reload says what serves ``(protocol, public address, port)``:

- an LB rule: a healthy member of its pool, picked by the rule's
  distribution (a CRC-32 of the 5-, 2- or 3-tuple modulo the healthy members
  in address order), at the rule's ``backend_port``;
- an inbound NAT rule: its one backend and port;
- otherwise an instance IP: its backend, 1:1 (same port or echo identifier).

Then the backend's security groups (or ``inbound_default``) decide, before
anything is taken; an admitted flow is an ordinary flow whose public address
and port are the ones the remote wrote (the frontend's or the instance IP's),
so every later packet, both ways, takes the usual per-packet path. An
inbound flow takes no port from any block: frontend ports are kept out of
every block (:func:`gateway.core.scenario.plan`), and an instance IP's
backend owns all of its ports.

Only a TCP SYN (without ACK) opens a TCP flow; anything else without a flow
stays ``drop_no_flow``. A UDP datagram and an ICMP echo request (instance IPs
only) open one.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, replace

from gateway.core.address import Backend, Scenario
from gateway.core.block import PORT_BYTES
from gateway.core.counters import Counter
from gateway.core.flow import EndReason, Flow, TcpState, new_flow
from gateway.core.health import probe_pairs
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Distribution, GatewayModel, Probe
from gateway.core.placement import Placement
from gateway.core.shard import backend_owner
from gateway.core.state import Buffer

_ZERO2 = b"\0\0"
_SYN_RECEIVED, _ACTIVE = TcpState.SYN_RECEIVED, TcpState.ACTIVE
_INSTANCE_IP, _LB = Scenario.INSTANCE_IP, Scenario.LB
_C_INBOUND_CREATED = Counter.INBOUND_FLOWS_CREATED.value
#: The IP protocols of an LB rule's ``protocol`` (Azure's "All" is TCP and UDP).
RULE_PROTOCOLS: dict[str, tuple[int, ...]] = {
    "tcp": (PROTO_TCP,),
    "udp": (PROTO_UDP,),
    "all": (PROTO_TCP, PROTO_UDP),
}


@dataclass(slots=True, eq=False)
class InboundTarget:
    """What serves one (protocol, public address, port): an LB rule (its pool's
    members) or an inbound NAT rule (one member, never probed)."""

    kind: str
    name: str
    proto: int
    public: int
    public_port: int
    backend_port: int
    #: Every member, lowest address first.
    members: tuple[int, ...]
    distribution: Distribution = Distribution.DEFAULT
    #: The health probe's name; "": every member counts as healthy.
    probe: str = ""
    #: The flows' idle timeout (an LB rule's ``idle_timeout``); 0: the table's.
    idle: float = 0.0
    #: A classic endpoint: open unless a group denies it.
    opening: bool = False
    #: The members up now (all of them without a probe), lowest address first.
    healthy: tuple[int, ...] = ()
    #: The healthy members this worker owns (all of ``healthy`` with one worker):
    #: the ones a flow opened here may go to (:mod:`gateway.core.dispatch`).
    mine: tuple[int, ...] = ()
    #: Bit ``k`` set: worker ``k`` owns a healthy member.
    up: int = 0


#: (protocol, public address, port) -> what serves it.
InboundIndex = dict[tuple[int, int, int], InboundTarget]


def build_index(model: GatewayModel) -> tuple[InboundIndex, dict[int, int]]:
    """The inbound index of a configuration, and its instance IPs (public -> private).

    The config refuses two rules on one frontend, port and protocol; should a
    model carry them anyway, the first wins.
    """
    fronts = {f.name: f.ip for f in model.frontends}
    pools = {p.name: tuple(sorted(set(p.members))) for p in model.pools}
    # Each rule's target with proto 0, then one copy per IP protocol of its ``protocol``.
    targets = [
        (r.protocol, InboundTarget(
            "lb_rule", r.name, 0, fronts.get(r.frontend, -1), r.frontend_port, r.backend_port,
            pools.get(r.pool, ()), r.distribution, r.probe, r.idle_timeout, r.opening,
        ))
        for r in model.lb_rules
    ] + [
        (n.protocol, InboundTarget(
            "inbound_nat_rule", n.name, 0, fronts.get(n.frontend, -1), n.frontend_port, n.backend_port,
            (n.backend,),
        ))
        for n in model.inbound_nat_rules
    ]  # fmt: skip
    index: InboundIndex = {}
    for protocol, target in targets:
        if target.public < 0:
            continue
        for proto in RULE_PROTOCOLS.get(protocol, ()):
            index.setdefault((proto, target.public, target.public_port), replace(target, proto=proto))
    instances = {i.public: i.private for i in model.instance_ips}
    return index, instances


def pick_member(
    healthy: tuple[int, ...], distribution: Distribution, proto: int, src: bytes, dst: bytes, ports: bytes
) -> int:
    """The member a new flow goes to: a CRC-32 of the 5-tuple (``default``), of
    source and destination address (``source_ip``) or of those and the protocol
    (``source_ip_protocol``), modulo the healthy members in address order.
    ``ports`` is the source then the destination port as on the wire.
    Deterministic (the same tuple and members pick the same member in every
    run), and one member is no hash at all."""
    n = len(healthy)
    if n == 1:
        return healthy[0]
    return healthy[distribution_hash(distribution, proto, src, dst, ports) % n]


def pick_own_member(t: InboundTarget, proto: int, src: bytes, dst: bytes, ports: bytes) -> int:
    """:func:`pick_member` for one of several workers, the rule's dispatch worker
    (:mod:`gateway.core.dispatch`): the member the hash names among **all**
    members when this worker owns it and it is up (so with every member up a
    flow goes where one worker would send it), else one of this worker's
    healthy members by the hash's quotient (its remainder is what sent the flow
    here, so it would pick the same one every time). ``t.mine`` is not empty."""
    members = t.members
    n = len(members)
    h = distribution_hash(t.distribution, proto, src, dst, ports) if n > 1 else 0
    m = members[h % n]
    mine = t.mine
    if m in mine:
        return m
    return mine[h // n % len(mine)]


def distribution_hash(distribution: Distribution, proto: int, src: bytes, dst: bytes, ports: bytes) -> int:
    """The CRC-32 :func:`pick_member` takes modulo the members (see there)."""
    if distribution == Distribution.SOURCE_IP:
        data = src + dst
    elif distribution == Distribution.SOURCE_IP_PROTOCOL:
        data = src + dst + PROTO_BYTES[proto]
    else:
        data = src + dst + ports + PROTO_BYTES[proto]
    return zlib.crc32(data)


PROTO_BYTES: tuple[bytes, ...] = tuple(bytes((p,)) for p in range(256))


class Inbound(Placement):
    """Opening flows from the outside; the health of LB rule members."""

    def reconfigure(self, model: GatewayModel, now: float) -> dict[str, int]:
        """:meth:`~gateway.core.reconfigure.Reconfigure.reconfigure`, then the inbound
        index and the probed pairs of the new configuration (pairs that stay keep
        their health). Inbound flows through a public address that went away end;
        the others keep running (docs/decisions.md, "Reload and live flows")."""
        before = set(self.addresses)
        summary = super().reconfigure(model, now)
        self.inbound_index, self.instance_inbound = build_index(model)
        self.health.reload(probe_pairs(model), now)
        self._refresh_healthy()
        gone = before - set(self.addresses)
        if gone:
            doomed = [f for fl in self.inside.values() for f in fl.values() if f.inbound and f.public in gone]
            for f in doomed:
                self.end_flow(f, EndReason.REMOVED)
            summary["flows_ended"] += len(doomed)
        return summary

    # ------------------------------------------------------------------ health

    def probe_targets(self) -> list[tuple[Probe, int]]:
        """Every (probe, member address) to probe: the members of each pool an LB rule
        with a probe names (docs/model.md, "Health probes"), each pair once."""
        return [(p, m) for (_name, m), p in self.health.probes.items()]

    def probe_result(self, probe: str, member: int, ok: bool, now: float) -> None:
        """One probe's outcome (the adapter's prober): down after ``number_of_probes``
        failures in a row, up after one success, ``member_health_changed`` on each
        change (:mod:`gateway.core.health`). A result for a pair no longer probed
        (it raced a reload) is ignored."""
        ev = self.health.record(probe, member, ok, now)
        if ev is not None:
            self.events.append(ev)
            self._refresh_healthy(probe)

    def _refresh_healthy(self, probe: str | None = None) -> None:
        """Recompute the healthy members of every target (of one probe's targets), and
        which of them each worker owns (every worker probes every member, so all
        of them agree on this, :mod:`gateway.core.dispatch`)."""
        up = self.health.is_up
        shard = self.shard
        for t in self.inbound_index.values():
            if probe is not None and t.probe != probe:
                continue
            if t.probe and t.probe in self.health.names:
                t.healthy = tuple(m for m in t.members if up(t.probe, m))
            else:
                t.healthy = t.members
            if shard.alone:
                t.mine, t.up = t.healthy, 1 if t.healthy else 0
            else:
                t.mine = tuple(m for m in t.healthy if backend_owner(m, shard.count) == shard.index)
                t.up = 0
                for m in t.healthy:
                    t.up |= 1 << backend_owner(m, shard.count)

    # ------------------------------------------------------------------ new inbound flows

    def _open_inbound(self, buf: Buffer, ihl: int, proto: int, key: bytes, now: float) -> Flow | None:
        """The flow for an unsolicited packet from the outside (``key``: its outside
        key), or None, counted: nothing serves its destination or a TCP segment
        that is not a SYN (``drop_no_flow``), every member down
        (``drop_no_healthy_member``), a security group or ``inbound_default``
        says no (``drop_security_denied``, before anything is taken), a flow cap
        refuses it, or the backend's side of the flow is taken."""
        c = self.counters
        remote_b, public_b = key[:4], key[4:8]  # the outside key starts with both addresses
        public = int.from_bytes(public_b, "big")
        if proto == PROTO_ICMP:
            port_b = key[10:12]
            remote_port_b = _ZERO2
            t = None
        else:
            if proto == PROTO_TCP and buf[ihl + 13] & 0x17 != 0x02:
                c[Counter.DROP_NO_FLOW] += 1
                return None
            remote_port_b = key[8:10]
            port_b = key[10:12]
            t = self.inbound_index.get((proto, public, int.from_bytes(port_b, "big")))
        if t is None:
            backend = self.instance_inbound.get(public, -1)
            if backend < 0:
                c[Counter.DROP_NO_FLOW] += 1
                return None
            backend_port_b, scenario, idle, opening = port_b, _INSTANCE_IP, 0.0, False
        else:
            healthy = t.mine
            if not healthy:
                c[Counter.DROP_NO_HEALTHY_MEMBER] += 1
                return None
            if self._sharded:
                backend = pick_own_member(t, proto, remote_b, public_b, key[8:12])
            else:
                backend = pick_member(healthy, t.distribution, proto, remote_b, public_b, key[8:12])
            backend_port_b, scenario, idle, opening = (
                PORT_BYTES[t.backend_port],
                _LB,
                t.idle,
                t.opening,
            )
        remote = int.from_bytes(remote_b, "big")
        remote_port = int.from_bytes(remote_port_b, "big")
        backend_port = int.from_bytes(backend_port_b, "big")
        decision = self.security.inbound(
            backend, proto, remote, remote_port, backend, backend_port, opening=opening
        )
        if not decision.allowed:
            self._deny(backend, decision, remote, backend_port, proto, now)
            return None
        be = self._inbound_owner(backend, now)
        if be is None or not self._admit(be, proto, now):
            return None
        backend_b = backend.to_bytes(4, "big")
        if proto == PROTO_ICMP:
            inside_key = backend_b + remote_b + backend_port_b + _ZERO2
        else:
            inside_key = backend_b + remote_b + backend_port_b + remote_port_b
        if inside_key in self.inside[proto]:
            # The backend already uses this 4-tuple for a flow of its own.
            c[Counter.DROP_NO_FLOW] += 1
            return None
        f = new_flow(
            proto=proto,
            scenario=scenario,
            backend_b=backend_b,
            backend_port_b=backend_port_b,
            public_b=public_b,
            public_port_b=port_b,
            remote_b=remote_b,
            remote_port_b=remote_port_b,
            inside_key=inside_key,
            outside_key=key,
            block=None,
            now=now,
            timeout=idle or self.timeouts.idle,
            decision=decision,
            inbound=True,
            idle=idle,
            state=_SYN_RECEIVED if proto == PROTO_TCP else _ACTIVE,
        )
        self._add_flow(f, be)
        c[_C_INBOUND_CREATED] += 1
        return f

    def _inbound_owner(self, backend: int, now: float) -> Backend | None:
        """The backend record an inbound flow counts against (flow caps, ``snatgw
        ports``). An inbound NAT rule's backend that is in no pool and has no
        instance IP is placed as a standalone backend (scenario 3), as its first
        outbound packet would place it: Azure gives a NAT rule's VM no outbound
        of its own either (docs/decisions.md, "Inbound NAT rule backends")."""
        be = self.backends.get(backend)
        if be is not None:
            return be
        be = self._add_standalone(backend)
        self._stamp_tier_changes(now)
        if be is None:
            self.counters[Counter.DROP_NO_PUBLIC_ADDRESS] += 1
        return be
