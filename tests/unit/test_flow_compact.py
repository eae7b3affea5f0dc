"""The compact Flow (docs/decisions.md, "Compact flows"): derived and packed fields read
back what the flow was built from, and the per-packet slots hold shared objects."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.core.block import PORT_BYTES
from gateway.core.checksum import delta
from gateway.core.flow import INT16, MAX_WSCALE, Flow, TcpFlow, l4_deltas, new_flow
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP

ips = st.integers(0, 0xFFFFFFFF).map(lambda i: i.to_bytes(4, "big"))
ports = st.integers(0, 0xFFFF)


def _flow(proto: int, backend: bytes, public: bytes, remote: bytes, bp: int, pp: int, rp: int,
          inbound: bool = False) -> Flow:
    rp_b = b"\0\0" if proto == PROTO_ICMP else PORT_BYTES[rp]
    return new_flow(
        proto=proto, scenario=2, backend_b=backend, backend_port_b=PORT_BYTES[bp], public_b=public,
        public_port_b=PORT_BYTES[pp], remote_b=remote, remote_port_b=rp_b,
        inside_key=backend + remote + PORT_BYTES[bp] + rp_b,
        outside_key=remote + public + rp_b + PORT_BYTES[pp],
        block=None, now=1.0, timeout=30.0, decision=None, inbound=inbound,
    )  # fmt: skip


@settings(max_examples=200)
@given(st.sampled_from([PROTO_TCP, PROTO_UDP, PROTO_ICMP]), ips, ips, ips, ports, ports, ports, st.booleans())
def test_endpoints_read_off_the_keys_are_the_ones_given(
    proto: int, backend: bytes, public: bytes, remote: bytes, bp: int, pp: int, rp: int, inbound: bool
) -> None:
    """backend, public, remote, their ports, dest and the deltas are what new_flow was given."""
    f = _flow(proto, backend, public, remote, bp, pp, rp, inbound)
    rp = 0 if proto == PROTO_ICMP else rp
    assert (f.proto, f.scenario, f.inbound) == (proto, 2, inbound)
    want = tuple(int.from_bytes(b, "big") for b in (backend, public, remote))
    assert (f.backend, f.public, f.remote) == want
    assert (f.backend_port, f.public_port, f.remote_port) == (bp, pp, rp)
    assert (f.backend_port_b, f.public_port_b) == (PORT_BYTES[bp], PORT_BYTES[pp])
    assert f.dest == remote + PORT_BYTES[rp]
    assert (f.in2out_ip, f.out2in_ip) == (delta(backend, public), delta(public, backend))
    assert (f.in2out_l4, f.out2in_l4) == l4_deltas(proto, backend, PORT_BYTES[bp], public, PORT_BYTES[pp])
    assert isinstance(f, TcpFlow) == (proto == PROTO_TCP)


@given(st.integers(0, 6), st.integers(0, 3), st.integers(0, MAX_WSCALE), st.booleans())
def test_packed_fields_never_touch_each_other(state: int, fins: int, scale: int, live: bool) -> None:
    """Setting state, fins, window shift and liveness leaves protocol, scenario, direction alone."""
    f = _flow(PROTO_TCP, b"\n\0\0\1", b"\xc6\x33\x64\1", b"\1\2\3\4", 4000, 1025, 443, inbound=True)
    f.state, f.fins, f.trk_scale, f.live = state, fins, scale, live
    assert (f.state, f.fins, f.trk_scale, f.live) == (state, fins, scale, live)
    assert (f.proto, f.scenario, f.inbound) == (PROTO_TCP, 2, True)


def test_ports_and_deltas_are_shared_objects() -> None:
    """Two flows with the same port and deltas hold the same int objects (no int per flow)."""
    a = _flow(PROTO_UDP, b"\n\0\0\1", b"\xc6\x33\x64\1", b"\1\2\3\4", 40000, 50000, 443)
    b = _flow(PROTO_UDP, b"\n\0\0\1", b"\xc6\x33\x64\1", b"\1\2\3\5", 40000, 50000, 443)
    assert a.public_port is b.public_port is INT16[50000]
    assert a.backend_port is b.backend_port and a.in2out_ip is b.in2out_ip and a.out2in_l4 is b.out2in_l4
