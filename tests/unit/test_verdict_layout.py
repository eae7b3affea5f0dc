"""VerdictWriter.mangled packs its verdict header from per-queue constants; the bytes are codec's."""

from __future__ import annotations

import socket

from hypothesis import given
from hypothesis import strategies as st

from gateway.adapters.nfqueue.codec import NLM_F_REQUEST, T_VERDICT, V_MANGLE, V_MANGLE_MARK
from gateway.adapters.nfqueue.verdicts import BE_ACCEPT, VerdictWriter


@given(
    queue=st.integers(0, 0xFFFF),
    pid=st.integers(1, 0xFFFFFFFF),
    plen=st.integers(1, 1500),
    mark=st.integers(0, 0xFFFFFFFF),
    marked=st.booleans(),
)
def test_mangled_header_is_codec_layout(queue: int, pid: int, plen: int, mark: int, marked: bool) -> None:
    """mangled() writes in front of the payload exactly codec.V_MANGLE(_MARK) for that verdict."""
    a, b = socket.socketpair()
    try:
        ring = bytearray(4096)
        w = VerdictWriter(a, memoryview(ring), queue, 1 << 20)
        w.set_mark(mark)
        w.in_run = False
        poff = 100
        w.mangled(pid, 0, poff, plen, marked)
        qbe, hp = socket.htons(queue), socket.htonl(pid)
        if marked:
            be_mark = socket.htonl(mark)
            want = V_MANGLE_MARK.pack(44 + plen, T_VERDICT, NLM_F_REQUEST, pid, 0, socket.AF_UNSPEC, 0, qbe,
                                      12, 2, BE_ACCEPT, hp, 8, 3, be_mark, 4 + plen, 10)  # fmt: skip
        else:
            want = V_MANGLE.pack(36 + plen, T_VERDICT, NLM_F_REQUEST, pid, 0, socket.AF_UNSPEC, 0, qbe,
                                 12, 2, BE_ACCEPT, hp, 4 + plen, 10)  # fmt: skip
        assert bytes(ring[poff - len(want) : poff]) == want
    finally:
        a.close()
        b.close()
