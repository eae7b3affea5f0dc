"""Arbitrary bytes never make the parsers or the per-packet path raise."""

from __future__ import annotations

import contextlib

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, UDP

from gateway.core.errors import PacketError
from gateway.core.packet import describe
from gateway.core.table import TranslationTable
from gateway.core.verdict import DROP
from tests.unit.conftest import POOL, SERVER, lab_model

packets = st.one_of(
    st.binary(max_size=120),
    st.builds(
        lambda head, tail: bytes([0x45]) + head + tail,
        st.binary(min_size=19, max_size=19),
        st.binary(max_size=80),
    ),
)


@settings(max_examples=500, deadline=None)
@given(packets)
def test_describe_raises_only_packet_error(data: bytes) -> None:
    """describe() returns a summary or raises PacketError, nothing else."""
    with contextlib.suppress(PacketError):
        describe(data)


@settings(max_examples=500, deadline=None)
@given(packets, st.booleans())
def test_table_never_raises_on_garbage(data: bytes, in2out: bool) -> None:
    """in2out and out2in answer every input with a verdict; malformed input is dropped."""
    t = TranslationTable(lab_model(), 0.0)
    seed = bytearray(bytes(IP(src=POOL[0], dst=SERVER) / UDP(sport=1, dport=2)))
    t.in2out(seed, 0.0)
    buf = bytearray(data)
    verdict = t.in2out(buf, 1.0) if in2out else t.out2in(buf, 1.0)
    assert verdict in (0, 2, 3)
    if len(data) < 20:
        assert verdict == DROP
