"""A flow: one translated 5-tuple with both of its keys, its port and its
lifetime (docs/model.md, "Words", "Idle timeout").

The TCP rules live here as tables, in one place: which state a FIN or RST
leads to and how long each state may stay idle before the port is freed
(docs/decisions.md, "TCP lingers").

Vocabulary, used everywhere in the code: a packet goes **in2out** (from a
backend toward the outside) or **out2in** (a return packet toward a backend).
The **inside key** is how an in2out packet names its flow, the **outside
key** how an out2in packet does.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any

from gateway.core.block import PortBlock
from gateway.core.model import Timeouts


class TcpState(IntEnum):
    """Where a flow is in its life. Non-TCP flows stay ACTIVE throughout."""

    ACTIVE = 0
    SYN_SENT = 1
    ESTABLISHED = 2
    FIN_WAIT = 3
    CLOSED = 4
    RESET = 5


class TcpFlag(IntEnum):
    """The TCP header flags the state table looks at (RFC 9293, section 3.1)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    ACK = 0x10


class EndReason(StrEnum):
    """Why a flow ended; each has a ``flows_ended_<reason>`` counter."""

    IDLE = "idle"
    CLOSED = "closed"
    RECLAIMED = "reclaimed"
    REMOVED = "removed"


#: Which ``Timeouts`` field bounds the idle time of each state.
STATE_TIMEOUT: dict[TcpState, str] = {
    TcpState.ACTIVE: "idle",
    TcpState.SYN_SENT: "idle",
    TcpState.ESTABLISHED: "idle",
    TcpState.FIN_WAIT: "idle",
    TcpState.CLOSED: "tcp_fin_linger",
    TcpState.RESET: "tcp_rst_linger",
}

#: How the operator's view names each state (``snatgw flows``, metrics).
STATE_NAMES: dict[int, str] = {s.value: s.name.lower() for s in TcpState}

#: ``fins`` bits: a FIN seen in2out (from the backend) and out2in (from the remote).
FIN_IN2OUT = 1
FIN_OUT2IN = 2
_FIN_BOTH = FIN_IN2OUT | FIN_OUT2IN

_SYN_ACK = TcpFlag.SYN | TcpFlag.ACK


def timeout_for(state: int, timeouts: Timeouts) -> float:
    """Idle seconds allowed in ``state``."""
    t: float = getattr(timeouts, STATE_TIMEOUT[TcpState(state)])
    return t


def tcp_next_state(state: int, fins: int, flags: int, in2out: bool) -> tuple[int, int]:
    """The TCP state after a packet with ``flags``; returns (state, fins seen).

    FIN from both sides or any RST ends the flow after a linger; a bare SYN
    from the backend on a closed flow reopens it (the backend reused the same
    4-tuple, RFC 5382 REQ-5 lets a NAT keep the mapping).
    """
    if flags & TcpFlag.RST:
        return TcpState.RESET, fins
    if state in (TcpState.CLOSED, TcpState.RESET):
        if in2out and flags & _SYN_ACK == TcpFlag.SYN:
            return TcpState.SYN_SENT, 0
        return state, fins
    if flags & TcpFlag.FIN:
        fins |= FIN_IN2OUT if in2out else FIN_OUT2IN
        return (TcpState.CLOSED if fins == _FIN_BOTH else TcpState.FIN_WAIT), fins
    if state == TcpState.SYN_SENT and not in2out and flags & TcpFlag.SYN:
        return TcpState.ESTABLISHED, fins
    return state, fins


def first_state(flags: int) -> TcpState:
    """State of a TCP flow created by a packet with ``flags``: a bare SYN opens
    it; anything else joins a connection already under way (a gateway restart)."""
    return TcpState.SYN_SENT if flags & _SYN_ACK == TcpFlag.SYN else TcpState.ESTABLISHED


@dataclass(slots=True, eq=False)
class Flow:
    """One translation. The flow owns both keys; the table adds or removes both at once.

    ``inside_key`` is how an in2out packet names the flow (backend ip, remote
    ip, backend port, remote port, as they sit in the IPv4 and transport
    headers), ``outside_key`` how an out2in packet names it (remote ip,
    public ip, remote port, public port). ``in2out_ip``/``in2out_l4`` and
    ``out2in_ip``/``out2in_l4`` are the RFC 1624 checksum deltas of each
    direction, computed once here instead of per packet.
    """

    proto: int
    scenario: int
    inside_key: bytes
    outside_key: bytes
    #: The three endpoints as numbers (for the views) and as the bytes the
    #: per-packet path writes.
    backend: int
    backend_port: int
    backend_b: bytes
    backend_port_b: bytes
    public: int
    public_port: int
    public_b: bytes
    public_port_b: bytes
    remote: int
    remote_port: int
    #: Remote ip and port: what the block counts ports per destination by.
    dest: bytes
    block: PortBlock | None
    in2out_ip: int
    in2out_l4: int
    out2in_ip: int
    out2in_l4: int
    created: float
    last_seen: float
    timeout: float
    state: int = TcpState.ACTIVE
    fins: int = 0
    pkts_out: int = 0
    pkts_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    wheel_slot: dict[Any, None] | None = None
    wheel_tick: int = 0
