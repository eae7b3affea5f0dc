"""ICMP echo with a wrong checksum is dropped both ways (issue 9, item 2; RFC 792): the
incremental checksum update would otherwise carry the error on under a new header."""

from __future__ import annotations

from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import FRONTEND, POOL, SERVER, echo, lab_model, out


def test_echo_request_with_a_bad_checksum_is_dropped_and_opens_no_flow() -> None:
    """A request whose ICMP checksum is wrong: drop_bad_checksum, no flow, no port."""
    t = TranslationTable(lab_model(), 0.0)
    bad = echo(POOL[0], SERVER, 777)
    bad[-1] ^= 0x55
    assert t.in2out(bad, 0.0) == DROP
    assert t.counters_dict()["drop_bad_checksum"] == 1 and t.flow_count() == 0


def test_echo_reply_with_a_bad_checksum_is_dropped_and_refreshes_nothing() -> None:
    """A reply to a live echo flow with a wrong checksum is dropped; a good one passes."""
    t = TranslationTable(lab_model(), 0.0)
    ident = out(t, echo(POOL[0], SERVER, 777), 0.0)[0]
    bad = echo(SERVER, FRONTEND, ident, reply=True)
    bad[-1] ^= 0x55
    assert t.out2in(bad, 1.0) == DROP
    (f,) = t._icmp_inside.values()
    assert f.last_seen == 0.0 and f.pkts_in == 0
    assert t.counters_dict()["drop_bad_checksum"] == 1
    assert t.out2in(echo(SERVER, FRONTEND, ident, reply=True), 2.0) == ACCEPT_MODIFIED_MARK
