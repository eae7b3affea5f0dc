"""A flow: one translated 5-tuple with both of its keys, its port and its
lifetime (OUTBOUND_MODEL.md, "Words", "Idle timeout").

The TCP rules live here as tables, in one place: which state a FIN or RST
leads to and how long each state may stay idle before the port is freed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.block import PortBlock
from gateway.core.model import Timeouts

# Flow states. Non-TCP flows stay ACTIVE for their whole life.
ACTIVE = 0
TCP_SYN_SENT = 1
TCP_ESTABLISHED = 2
TCP_FIN_WAIT = 3
TCP_CLOSED = 4
TCP_RESET = 5

TCP_FIN = 0x01
TCP_SYN = 0x02
TCP_RST = 0x04
TCP_ACK = 0x10

#: Which ``Timeouts`` field bounds the idle time of each state.
STATE_TIMEOUT = {
    ACTIVE: "idle",
    TCP_SYN_SENT: "idle",
    TCP_ESTABLISHED: "idle",
    TCP_FIN_WAIT: "idle",
    TCP_CLOSED: "tcp_fin_linger",
    TCP_RESET: "tcp_rst_linger",
}

# Why a flow ended.
END_IDLE = "idle"
END_CLOSED = "closed"
END_RECLAIMED = "reclaimed"
END_REMOVED = "removed"

#: How the operator's view names each state (``snatgw flows``, metrics).
STATE_NAMES = {
    ACTIVE: "active",
    TCP_SYN_SENT: "syn_sent",
    TCP_ESTABLISHED: "established",
    TCP_FIN_WAIT: "fin_wait",
    TCP_CLOSED: "closed",
    TCP_RESET: "reset",
}


def timeout_for(state: int, timeouts: Timeouts) -> float:
    """Idle seconds allowed in ``state``."""
    t: float = getattr(timeouts, STATE_TIMEOUT[state])
    return t


def tcp_next_state(state: int, fins: int, flags: int, outbound: bool) -> tuple[int, int]:
    """The TCP state after a packet with ``flags``; returns (state, fins seen).

    ``fins`` has bit 1 for a FIN from the backend and bit 2 for one from the
    remote. FIN from both sides or any RST ends the flow after a linger; a
    bare SYN from the backend on a closed flow reopens it (the backend reused
    the same 4-tuple).
    """
    if flags & TCP_RST:
        return TCP_RESET, fins
    if state in (TCP_CLOSED, TCP_RESET):
        if outbound and flags & (TCP_SYN | TCP_ACK) == TCP_SYN:
            return TCP_SYN_SENT, 0
        return state, fins
    if flags & TCP_FIN:
        fins |= 1 if outbound else 2
        return (TCP_CLOSED if fins == 3 else TCP_FIN_WAIT), fins
    if state == TCP_SYN_SENT and not outbound and flags & TCP_SYN:
        return TCP_ESTABLISHED, fins
    return state, fins


@dataclass(slots=True, eq=False)
class Flow:
    """One translation. The flow owns both keys; the table adds or removes both at once.

    ``in_key`` is how an outbound packet names the flow (backend ip, remote
    ip, backend port, remote port as they sit in the IPv4 and transport
    headers), ``out_key`` how a return packet names it (remote ip, public
    ip, remote port, public port). ``d_*`` are the RFC 1624 checksum deltas
    for in2out, ``r_*`` for out2in, computed once here instead of per packet.
    """

    proto: int
    scenario: int
    backend: int
    bport: int
    public: int
    pport: int
    remote: int
    rport: int
    in_key: bytes
    out_key: bytes
    dest: bytes
    block: PortBlock | None
    public_b: bytes
    pport_b: bytes
    backend_b: bytes
    bport_b: bytes
    d_ip: int
    d_l4: int
    r_ip: int
    r_l4: int
    created: float
    last_seen: float
    timeout: float
    state: int = ACTIVE
    fins: int = 0
    pkts_out: int = 0
    pkts_in: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    wheel_slot: dict[Any, None] | None = None
    wheel_tick: int = 0
