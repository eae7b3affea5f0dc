"""In-place rewrites leave every checksum exactly as a full recomputation would."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP

from gateway.core.table import TranslationTable
from gateway.core.verdict import DROP
from tests.unit.conftest import INSTANCE, POOL, STANDALONE, lab_model

backends = st.sampled_from((*POOL, INSTANCE, STANDALONE, "10.10.7.7"))
remotes = st.integers(0x0B000001, 0xDF000000).map(
    lambda i: ".".join(str(i >> s & 255) for s in (24, 16, 8, 0))
)
ports = st.integers(1, 65535)
payloads = st.binary(max_size=64)


def recomputed(pkt: bytes) -> bytes:
    """The same packet with every checksum recomputed from scratch by scapy."""
    p = IP(pkt)
    del p.chksum
    for layer in (TCP, UDP, ICMP):
        if layer in p and not (layer is UDP and p[UDP].chksum == 0):
            del p[layer].chksum
    return bytes(p)


@settings(max_examples=300, deadline=None)
@given(
    backends,
    remotes,
    ports,
    ports,
    payloads,
    st.sampled_from(("tcp", "udp", "icmp")),
    st.integers(0, 255),
    st.booleans(),
)
def test_in2out_and_out2in_checksums_equal_recomputation(
    src: str, dst: str, sport: int, dport: int, data: bytes, proto: str, tos: int, zero_udp: bool
) -> None:
    """For any backend, remote, ports, payload and TOS, both directions' checksums match."""
    ip = IP(src=src, dst=dst, tos=tos, id=sport)
    if proto == "tcp":
        pkt = ip / TCP(sport=sport, dport=dport, flags="PA" if data else "S", seq=dport) / data
    elif proto == "udp":
        pkt = ip / UDP(sport=sport, dport=dport, chksum=0 if zero_udp else None) / data
    else:
        pkt = ip / ICMP(type=8, id=sport, seq=dport) / data
    t = TranslationTable(lab_model(), 0.0)
    buf = bytearray(bytes(pkt))
    assert t.in2out(buf, 0.0) != DROP
    assert bytes(buf) == recomputed(bytes(buf))
    sent = IP(bytes(buf))
    if proto == "tcp":
        back = IP(src=dst, dst=sent.src) / TCP(sport=dport, dport=sent[TCP].sport, flags="A") / data
    elif proto == "udp":
        back = IP(src=dst, dst=sent.src) / UDP(sport=dport, dport=sent[UDP].sport) / data
    else:
        back = IP(src=dst, dst=sent.src) / ICMP(type=0, id=sent[ICMP].id, seq=dport) / data
    rbuf = bytearray(bytes(back))
    assert t.out2in(rbuf, 0.1) != DROP
    assert bytes(rbuf) == recomputed(bytes(rbuf))
    assert IP(bytes(rbuf)).dst == src
