"""The TCP rules, as tables in one place: which state a FIN or RST leads to,
how long each state may stay idle before the port is freed (docs/decisions.md,
"TCP lingers"), and the backend's receive window a FIN or RST from the outside
must lie in (docs/decisions.md, "TCP tracking"). :mod:`gateway.core.flow`
re-exports every name, so callers import them from there as before.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import TYPE_CHECKING

from gateway.core.model import Timeouts

if TYPE_CHECKING:
    from gateway.core.flow import Flow


class TcpState(IntEnum):
    """Where a flow is in its life. Non-TCP flows stay ACTIVE throughout."""

    ACTIVE = 0
    SYN_SENT = 1
    ESTABLISHED = 2
    FIN_WAIT = 3
    CLOSED = 4
    RESET = 5
    #: A flow opened from the outside: the remote's SYN went to the backend, whose
    #: SYN-ACK has not been seen yet (docs/decisions.md, "TCP states of inbound flows").
    SYN_RECEIVED = 6


class TcpFlag(IntEnum):
    """The TCP header flags the state table looks at (RFC 9293, section 3.1)."""

    FIN = 0x01
    SYN = 0x02
    RST = 0x04
    ACK = 0x10


#: The flags and states as module names: an enum's class attribute costs ~75 ns a read
#: on Python 3.11, and the state changes read several per packet.
F_FIN, F_SYN, F_RST, F_ACK = int(TcpFlag.FIN), int(TcpFlag.SYN), int(TcpFlag.RST), int(TcpFlag.ACK)
S_ACTIVE, S_SYN_SENT, S_ESTABLISHED = TcpState.ACTIVE, TcpState.SYN_SENT, TcpState.ESTABLISHED
S_FIN_WAIT, S_CLOSED, S_RESET = TcpState.FIN_WAIT, TcpState.CLOSED, TcpState.RESET
S_SYN_RECEIVED = TcpState.SYN_RECEIVED

#: Which ``Timeouts`` field bounds the idle time of each state.
STATE_TIMEOUT: dict[TcpState, str] = {
    TcpState.ACTIVE: "idle",
    TcpState.SYN_SENT: "idle",
    TcpState.ESTABLISHED: "idle",
    TcpState.FIN_WAIT: "idle",
    TcpState.CLOSED: "tcp_fin_linger",
    TcpState.RESET: "tcp_rst_linger",
    TcpState.SYN_RECEIVED: "idle",
}

#: ``STATE_TIMEOUT`` by state number (no enum lookup on a state change).
_TIMEOUT_NAME: tuple[str, ...] = tuple(STATE_TIMEOUT[TcpState(v)] for v in range(len(TcpState)))

#: How the operator's view names each state (``snatgw flows``, metrics).
STATE_NAMES: dict[int, str] = {s.value: s.name.lower() for s in TcpState}

#: ``fins`` bits: a FIN seen in2out (from the backend) and out2in (from the remote).
FIN_IN2OUT = 1
FIN_OUT2IN = 2
_FIN_BOTH = FIN_IN2OUT | FIN_OUT2IN

_SYN_ACK = F_SYN | F_ACK


def timeout_for(state: int, timeouts: Timeouts, idle: float = 0.0) -> float:
    """Idle seconds allowed in ``state``; ``idle`` (when not 0) replaces the idle
    timeout (an LB rule's own ``idle_timeout`` on its inbound flows), never a linger."""
    name = _TIMEOUT_NAME[state] if 0 <= state < len(_TIMEOUT_NAME) else STATE_TIMEOUT[TcpState(state)]
    if idle and name == "idle":
        return idle
    t: float = getattr(timeouts, name)
    return t


def tcp_next_state(state: int, fins: int, flags: int, in2out: bool, inbound: bool = False) -> tuple[int, int]:
    """The TCP state after a packet with ``flags``; returns (state, fins seen).

    FIN from both sides or any RST ends the flow after a linger; a bare SYN
    from the side that opened the flow reopens a closed one (the same 4-tuple
    reused: RFC 5382 REQ-5 lets a NAT keep the mapping). The answering SYN
    establishes it: from the outside for a flow the backend opened, from the
    backend for one opened from the outside (``inbound``).
    """
    if flags & F_RST:
        return S_RESET, fins
    if state in (S_CLOSED, S_RESET):
        if flags & _SYN_ACK == F_SYN:
            if in2out:
                return S_SYN_SENT, 0
            if inbound:
                return S_SYN_RECEIVED, 0
        return state, fins
    if flags & F_FIN:
        fins |= FIN_IN2OUT if in2out else FIN_OUT2IN
        return (S_CLOSED if fins == _FIN_BOTH else S_FIN_WAIT), fins
    if flags & F_SYN:
        if state == S_SYN_SENT and not in2out:
            return S_ESTABLISHED, fins
        if state == S_SYN_RECEIVED and in2out and flags & F_ACK:
            return S_ESTABLISHED, fins
    return state, fins


#: From TCP header offset 4: sequence, acknowledgement, data offset byte, flags, window.
TCP_TRACK = struct.Struct("!IIBBH").unpack_from
#: From TCP header offset 8: acknowledgement, flags, window (the per-packet update).
TCP_ACK_WIN = struct.Struct("!IxBH").unpack_from

#: Sequence numbers are modulo 2**32 (RFC 9293, section 3.4).
SEQ_MASK = 0xFFFFFFFF
#: RFC 7323 section 2.3: the largest window shift; assumed when the SYN was not seen.
MAX_WSCALE = 14
#: ``trk_ack``/``trk_isn`` before the value is known.
UNKNOWN = -1


def syn_wscale(buf: bytes | bytearray | memoryview, ihl: int, doff: int) -> int:
    """The window shift a SYN's options announce (RFC 7323 section 2.2), 0 without the option.

    Walks the options between the fixed header and ``doff`` (or the end of
    the packet, if that comes first); a malformed option list ends the walk
    (never raises). Values above 14 count as 14.
    """
    i = ihl + 20
    end = min(ihl + doff, len(buf))
    while i < end:
        kind = buf[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 1 >= end:
            break
        ln = buf[i + 1]
        if ln < 2 or i + ln > end:
            break
        if kind == 3 and ln == 3:
            return min(buf[i + 2], MAX_WSCALE)
        i += ln
    return 0


def in_window(f: Flow, flags: int, seq: int, ack: int) -> bool:
    """Whether a FIN or RST from the outside lies in the backend's receive window.

    The window is what the backend itself said, never what the outside said:
    ``trk_ack`` is the last acknowledgement number the backend sent (its
    RCV.NXT as the gateway last saw it) and ``trk_win << trk_scale`` the
    largest window it advertised. A remote can only send up to an ack + window
    the backend sent, and the gateway saw that packet first, so a genuine
    segment is never above the bound.

    - RST: RCV.NXT <= SEG.SEQ <= RCV.NXT + RCV.WND (RFC 5961 section 3.2, as
      Linux conntrack applies it: a NAT cannot send the challenge ACK, so any
      in-window RST is taken, and one below the acknowledged data is not).
    - FIN: within one window either side of RCV.NXT (RFC 5961 section 4 asks
      the same of data; a retransmitted FIN may start below RCV.NXT).
    - Before the backend has acknowledged anything: in SYN-SENT a RST must
      acknowledge the backend's SYN (RFC 9293 section 3.10.7.3) and a FIN is
      refused; a flow picked up mid-connection is taken on trust (conntrack's
      "be liberal" until the window is known).
    """
    base = f.trk_ack
    if base < 0:
        if f.state == S_SYN_SENT and f.trk_isn >= 0:
            return bool(flags & F_RST and flags & F_ACK and ack == f.trk_isn)
        return True
    wnd = f.trk_win << f.trk_scale
    d = (seq - base) & SEQ_MASK
    if d <= wnd:
        return True
    return not flags & F_RST and SEQ_MASK + 1 - d <= wnd + 1


def first_state(flags: int) -> TcpState:
    """State of a TCP flow created by a packet with ``flags``: a bare SYN opens
    it; anything else joins a connection already under way (a gateway restart)."""
    return S_SYN_SENT if flags & _SYN_ACK == F_SYN else S_ESTABLISHED
