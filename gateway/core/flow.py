"""A flow: one translated 5-tuple with both of its keys, its port and its
lifetime (docs/model.md, "Words", "Idle timeout"), kept compact
(docs/decisions.md, "Compact flows").

The TCP rules (states, lingers, the window check) are in :mod:`gateway.core.tcp`
and re-exported here.

Vocabulary, used everywhere in the code: a packet goes **in2out** (from a
backend toward the outside) or **out2in** (a return packet toward a backend).
The **inside key** is how an in2out packet names its flow, the **outside
key** how an out2in packet does.
"""

from __future__ import annotations

from enum import StrEnum
from typing import TYPE_CHECKING, Any

from gateway.core.block import PORT_BYTES, PortBlock
from gateway.core.checksum import delta
from gateway.core.model import Proto
from gateway.core.tcp import (
    FIN_IN2OUT,
    FIN_OUT2IN,
    MAX_WSCALE,
    SEQ_MASK,
    STATE_NAMES,
    STATE_TIMEOUT,
    TCP_ACK_WIN,
    TCP_TRACK,
    UNKNOWN,
    TcpFlag,
    TcpState,
    first_state,
    in_window,
    syn_wscale,
    tcp_next_state,
    timeout_for,
)

if TYPE_CHECKING:
    from gateway.core.security import Decision

__all__ = [
    "FIN_IN2OUT", "FIN_OUT2IN", "INBOUND_BIT", "INT16", "LIVE_BIT", "PROTO_OF",
    "MAX_WSCALE", "SEQ_MASK", "STATE_NAMES", "STATE_TIMEOUT",
    "TCP_ACK_WIN", "TCP_TRACK", "UNKNOWN", "EndReason", "Flow", "TcpFlag", "TcpFlow", "TcpState",
    "first_state", "in_window", "l4_deltas", "new_flow", "syn_wscale", "tcp_next_state", "timeout_for",
]  # fmt: skip

ICMP = Proto.ICMP
PROTO_TCP = int(Proto.TCP)


class EndReason(StrEnum):
    """Why a flow ended; each has a ``flows_ended_<reason>`` counter."""

    IDLE = "idle"
    CLOSED = "closed"
    RECLAIMED = "reclaimed"
    REMOVED = "removed"
    #: Ended to make room under a flow cap: it never saw a reply (conntrack's early drop).
    EARLY_DROP = "early_drop"


def l4_deltas(
    proto: int, backend_b: bytes, backend_port_b: bytes, public_b: bytes, public_port_b: bytes
) -> tuple[int, int]:
    """The transport checksum adjustments (in2out, out2in) of a flow (RFC 1624).

    TCP and UDP checksums cover the pseudo-header, so their adjustment spans
    the address and the port; ICMP's covers only the message, so only the
    echo identifier counts.
    """
    if proto == ICMP:
        return delta(backend_port_b, public_port_b), delta(public_port_b, backend_port_b)
    inside, outside = backend_b + backend_port_b, public_b + public_port_b
    return delta(inside, outside), delta(outside, inside)


#: Shared int objects for every 16-bit value (ports, checksum deltas, the packed
#: small fields): a flow stores a reference to one of these instead of an int
#: object of its own (28 bytes each above 256; docs/decisions.md, "Compact flows").
INT16: tuple[int, ...] = tuple(range(1 << 16))

# ``Flow._bits``: the small fields packed into one 16-bit number (always an INT16 object).
_PROTO_CODE: dict[int, int] = {int(ICMP): 1, int(Proto.TCP): 2, int(Proto.UDP): 3}
_PROTO_OF = PROTO_OF = (0, int(ICMP), int(Proto.TCP), int(Proto.UDP))
_SCEN_SHIFT, _STATE_SHIFT, _FINS_SHIFT, _SCALE_SHIFT = 2, 4, 7, 9
_INBOUND, _LIVE = INBOUND_BIT, LIVE_BIT = 1 << 13, 1 << 14
_STATE_MASK, _FINS_MASK, _SCALE_MASK = 7 << _STATE_SHIFT, 3 << _FINS_SHIFT, 15 << _SCALE_SHIFT


class Flow:
    """One translation. The flow owns both keys; the table adds or removes both at once.

    ``inside_key`` is how an in2out packet names the flow (backend ip, remote
    ip, backend port, remote port, as they sit in the IPv4 and transport
    headers), ``outside_key`` how an out2in packet names it (remote ip,
    public ip, remote port, public port). ``in2out_ip``/``in2out_l4`` and
    ``out2in_ip``/``out2in_l4`` are the RFC 1624 checksum deltas of each
    direction, computed once here instead of per packet.

    Compact (docs/decisions.md, "Compact flows"): the slots the per-packet
    paths read stay plain attributes; everything else is derived from the keys
    (``backend``, ``public``, ``remote``, ``remote_port``, ``dest``, the port
    bytes) or packed into ``_bits`` (protocol, scenario, TCP state, FINs seen,
    direction, window shift, liveness) behind properties of the same names.
    Ports and deltas are shared :data:`INT16` objects; ``public_b`` and
    ``backend_b`` are shared per address by the table (``_add_flow``).
    """

    # Out of mypy's sight: it would refuse ``f.trk_ack = ...`` on a ``Flow``, which the
    # TCP paths do on what is always a TcpFlow there (__new__ sees to it).
    if not TYPE_CHECKING:
        __slots__ = (
        "inside_key", "outside_key", "backend_b", "public_b", "backend_port", "public_port", "block",
        "in2out_ip", "in2out_l4", "out2in_ip", "out2in_l4", "created", "last_seen", "timeout",
        "pkts_out", "pkts_in", "bytes_out", "bytes_in", "wheel_slot", "decision", "idle", "_bits",
        )  # fmt: skip

    inside_key: bytes
    outside_key: bytes
    backend_b: bytes
    public_b: bytes
    backend_port: int
    public_port: int
    block: PortBlock | None
    in2out_ip: int
    in2out_l4: int
    out2in_ip: int
    out2in_l4: int
    created: float
    last_seen: float
    timeout: float
    pkts_out: int
    pkts_in: int
    bytes_out: int
    bytes_in: int
    #: The timer wheel's slot list holding the flow's current deadline (None: not armed).
    wheel_slot: list[Any] | None
    #: TCP tracking (:class:`TcpFlow` holds them; a UDP or ICMP flow reads these
    #: class-level values and has no slots for them).
    trk_ack: int = UNKNOWN
    trk_win: int = 0
    trk_isn: int = UNKNOWN
    #: The security verdict that admitted the flow (docs/model.md, "Security
    #: groups"): evaluated once, when the flow was made; None for a flow made
    #: before the table had a policy. Not saved: a restore evaluates it again.
    decision: Decision | None
    #: The flow's own idle timeout (an LB rule's ``idle_timeout``); 0: the table's.
    idle: float
    _bits: int

    def __new__(cls, *, proto: int, **_kw: Any) -> Flow:
        """A TCP flow is a :class:`TcpFlow` (three slots more), whoever builds it."""
        return object.__new__(TcpFlow if cls is Flow and proto == PROTO_TCP else cls)

    def __init__(
        self,
        *,
        proto: int,
        scenario: int,
        inside_key: bytes,
        outside_key: bytes,
        backend_b: bytes,
        backend_port: int,
        public_b: bytes,
        public_port: int,
        block: PortBlock | None,
        in2out_ip: int,
        in2out_l4: int,
        out2in_ip: int,
        out2in_l4: int,
        created: float,
        last_seen: float,
        timeout: float,
        state: int = TcpState.ACTIVE,
        fins: int = 0,
        pkts_out: int = 0,
        pkts_in: int = 0,
        bytes_out: int = 0,
        bytes_in: int = 0,
        trk_ack: int = UNKNOWN,
        trk_win: int = 0,
        trk_scale: int = MAX_WSCALE,
        trk_isn: int = UNKNOWN,
        inbound: bool = False,
        decision: Decision | None = None,
        idle: float = 0.0,
        **derived: object,
    ) -> None:
        """``derived``: the fields a state file also holds that are now read off the
        keys (``backend``, ``public``, ``remote``, ``remote_port``, ``dest``, the port
        bytes); restore checks them against the keys and passes them on, unused."""
        self.inside_key = inside_key
        self.outside_key = outside_key
        self.backend_b = backend_b
        self.public_b = public_b
        self.backend_port = INT16[backend_port]
        self.public_port = INT16[public_port]
        self.block = block
        self.in2out_ip = INT16[in2out_ip]
        self.in2out_l4 = INT16[in2out_l4]
        self.out2in_ip = INT16[out2in_ip]
        self.out2in_l4 = INT16[out2in_l4]
        self.created = created
        self.last_seen = last_seen
        self.timeout = timeout
        self.pkts_out = pkts_out
        self.pkts_in = pkts_in
        self.bytes_out = bytes_out
        self.bytes_in = bytes_in
        self.wheel_slot = None
        if proto == PROTO_TCP:
            self.trk_ack = trk_ack
            self.trk_win = trk_win
            self.trk_isn = trk_isn
        self.decision = decision
        self.idle = idle
        # Masked and clamped: a restored value out of its range cannot spill into another field.
        self._bits = INT16[
            _PROTO_CODE[proto] | (scenario & 3) << _SCEN_SHIFT | (state & 7) << _STATE_SHIFT
            | (fins & 3) << _FINS_SHIFT | max(0, min(trk_scale, MAX_WSCALE)) << _SCALE_SHIFT
            | (_INBOUND if inbound else 0)
        ]  # fmt: skip

    def __repr__(self) -> str:
        return (
            f"Flow(proto={self.proto}, backend={self.backend}:{self.backend_port}, "
            f"public={self.public}:{self.public_port}, remote={self.remote}:{self.remote_port}, "
            f"state={self.state})"
        )

    # The packed small fields.

    @property
    def proto(self) -> int:
        return _PROTO_OF[self._bits & 3]

    @property
    def scenario(self) -> int:
        return self._bits >> _SCEN_SHIFT & 3

    @property
    def state(self) -> int:
        return self._bits >> _STATE_SHIFT & 7

    @state.setter
    def state(self, v: int) -> None:
        self._bits = INT16[self._bits & ~_STATE_MASK | v << _STATE_SHIFT]

    @property
    def fins(self) -> int:
        """``FIN_IN2OUT`` / ``FIN_OUT2IN`` bits: the FINs seen so far."""
        return self._bits >> _FINS_SHIFT & 3

    @fins.setter
    def fins(self, v: int) -> None:
        self._bits = INT16[self._bits & ~_FINS_MASK | v << _FINS_SHIFT]

    @property
    def trk_scale(self) -> int:
        """The backend's window shift (14 until its SYN is seen)."""
        return self._bits >> _SCALE_SHIFT & 15

    @trk_scale.setter
    def trk_scale(self, v: int) -> None:
        self._bits = INT16[self._bits & ~_SCALE_MASK | min(v, MAX_WSCALE) << _SCALE_SHIFT]

    @property
    def inbound(self) -> bool:
        """Opened from the outside (an LB rule, an inbound NAT rule, an instance IP):
        the remote started it and the flow takes no port from any block."""
        return bool(self._bits & _INBOUND)

    @property
    def live(self) -> bool:
        """In the table: set by ``_add_flow``, cleared by ``end_flow``."""
        return bool(self._bits & _LIVE)

    @live.setter
    def live(self, v: bool) -> None:
        self._bits = INT16[self._bits | _LIVE if v else self._bits & ~_LIVE]

    # The endpoints, read off the keys (never on the per-packet path).

    @property
    def backend(self) -> int:
        return int.from_bytes(self.backend_b, "big")

    @property
    def public(self) -> int:
        return int.from_bytes(self.public_b, "big")

    @property
    def remote(self) -> int:
        return int.from_bytes(self.inside_key[4:8], "big")

    @property
    def remote_port(self) -> int:
        k = self.inside_key
        return k[10] << 8 | k[11]

    @property
    def dest(self) -> bytes:
        """Remote ip and port: what the block counts ports per destination by."""
        k = self.inside_key
        return k[4:8] + k[10:12]

    @property
    def backend_port_b(self) -> bytes:
        return PORT_BYTES[self.backend_port]

    @property
    def public_port_b(self) -> bytes:
        return PORT_BYTES[self.public_port]


class TcpFlow(Flow):
    """A TCP flow: the backend's window as the gateway saw it, learnt only from the
    backend's own packets so nothing from the outside can move it
    (:func:`in_window`): the last acknowledgement number the backend sent, the
    largest window it advertised (unscaled), its SYN's sequence + 1 (its window
    shift is :attr:`Flow.trk_scale`)."""

    __slots__ = ("trk_ack", "trk_win", "trk_isn")


def new_flow(
    *,
    proto: int,
    scenario: int,
    backend_b: bytes,
    backend_port_b: bytes,
    public_b: bytes,
    public_port_b: bytes,
    remote_b: bytes,
    remote_port_b: bytes,
    inside_key: bytes,
    outside_key: bytes,
    block: PortBlock | None,
    now: float,
    timeout: float,
    decision: Decision | None,
    inbound: bool = False,
    idle: float = 0.0,
    state: int = TcpState.ACTIVE,
) -> Flow:
    """A flow from its three endpoints as the wire writes them, with the RFC 1624
    deltas both directions apply computed once, here, for the one place each kind
    of flow starts (an outbound first packet,
    :meth:`~gateway.core.lifecycle.FlowLifecycle._create_flow`; an inbound one,
    :meth:`~gateway.core.inbound.Inbound._open_inbound`). Per new flow, never per
    packet. The keys are the caller's: each already has the one its packet carries
    (``remote_b``/``remote_port_b`` are in them; the flow keeps nothing else of them).
    ``state``: a TCP flow's first state (:func:`first_state`)."""
    # The four RFC 1624 deltas from two integers per side (``delta`` without its
    # bytes joins and conversions: this runs for every new flow).
    b = int.from_bytes(backend_b, "big")
    p = int.from_bytes(public_b, "big")
    bp = backend_port_b[0] << 8 | backend_port_b[1]
    pp = public_port_b[0] << 8 | public_port_b[1]
    # ``x % 0xFFFF or _delta_int(...)``: the call only in the rare case the difference folds to 0.
    if proto == ICMP:
        in2out_l4 = (pp - bp) % 0xFFFF or _delta_int(bp, pp, 0xFFFF)
        out2in_l4 = (bp - pp) % 0xFFFF or _delta_int(pp, bp, 0xFFFF)
    else:
        bi, pi = b << 16 | bp, p << 16 | pp
        in2out_l4 = (pi - bi) % 0xFFFF or _delta_int(bi, pi, _ONES48)
        out2in_l4 = (bi - pi) % 0xFFFF or _delta_int(pi, bi, _ONES48)
    f: Flow = _alloc(TcpFlow if proto == PROTO_TCP else Flow)
    # What ``Flow.__init__`` stores, without its keyword-argument dicts.
    f.inside_key = inside_key
    f.outside_key = outside_key
    f.backend_b = backend_b
    f.public_b = public_b
    f.backend_port = INT16[bp]
    f.public_port = INT16[pp]
    f.block = block
    f.in2out_ip = INT16[(p - b) % 0xFFFF or _delta_int(b, p, _ONES32)]
    f.in2out_l4 = INT16[in2out_l4]
    f.out2in_ip = INT16[(b - p) % 0xFFFF or _delta_int(p, b, _ONES32)]
    f.out2in_l4 = INT16[out2in_l4]
    f.created = now
    f.last_seen = now
    f.timeout = timeout
    f.pkts_out = f.pkts_in = f.bytes_out = f.bytes_in = 0
    f.wheel_slot = None
    if proto == PROTO_TCP:
        f.trk_ack = UNKNOWN
        f.trk_win = 0
        f.trk_isn = UNKNOWN
    f.decision = decision
    f.idle = idle
    f._bits = INT16[
        _PROTO_CODE[proto] | (scenario & 3) << _SCEN_SHIFT | (state & 7) << _STATE_SHIFT
        | MAX_WSCALE << _SCALE_SHIFT | (_INBOUND if inbound else 0)
    ]  # fmt: skip
    return f


_alloc = object.__new__
_ONES32 = (1 << 32) - 1
_ONES48 = (1 << 48) - 1


def _delta_int(old: int, new: int, ones: int) -> int:
    """:func:`~gateway.core.checksum.delta` of two equal-length fields given as
    integers (``ones``: the field's all-ones value)."""
    r = (new - old) % 0xFFFF
    if r:
        return r
    return 0 if old == ones and not new else 0xFFFF
