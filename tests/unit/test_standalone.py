"""Standalone (scenario 3) backends give their block back after a silent idle
timeout, and a default address falls to a lower tier when enough of them go."""

from __future__ import annotations

from gateway.core.events import fields as event_fields
from gateway.core.model import Timeouts
from gateway.core.table import TranslationTable
from gateway.core.verdict import ACCEPT_MODIFIED_MARK, DROP
from tests.unit.conftest import DEFAULTS, POOL, SERVER, first_port, ip, lab_model, out, tcp, udp

IDLE = 240.0


def _events(t: TranslationTable, name: str) -> list[dict[str, object]]:
    return [event_fields(e) for e in t.events if e.name == name]


def test_silent_standalone_backend_is_released_after_the_idle_timeout() -> None:
    """Its flow idles out 240 s after its last packet; its block goes back 240 s after
    that (the vacancy clock starts when the last flow ended), with a ports_reclaimed
    event, and a later packet places it afresh."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    out(t, udp("10.10.3.1", SERVER, 40000, 5000), 10.0)
    be = t.backends[ip("10.10.3.1")]
    assert be.block is not None and first_port(be.block) == 1024
    t.handle_timer(10.0 + IDLE)
    assert t.flow_count() == 0 and ip("10.10.3.1") in t.backends, "the flow ended, the block stays"
    assert be.vacant_since == 10.0 + IDLE and t.get_timer() == 10.0 + 2 * IDLE
    t.handle_timer(10.0 + 2 * IDLE - 0.5)
    assert ip("10.10.3.1") in t.backends
    t.handle_timer(10.0 + 2 * IDLE)
    assert ip("10.10.3.1") not in t.backends
    assert _events(t, "ports_reclaimed") == [
        {"public_ip": DEFAULTS[0], "name": "", "reason": "backend_idle", "backends": 1, "ports": 1024,
         "flows_ended": 0}
    ]  # fmt: skip
    assert t.get_timer() is None
    assert out(t, udp("10.10.3.2", SERVER, 40000, 5000), 600.0)[:2] == (1024, DEFAULTS[0])
    assert out(t, udp("10.10.3.1", SERVER, 40000, 5000), 600.0)[:2] == (2048, DEFAULTS[0])


def test_release_waits_idle_timeout_after_the_last_flow_ended() -> None:
    """A reset TCP flow ends after its linger (at 7.0, even if the timer runs late at
    8.0); the backend goes only idle_timeout after that end, get_timer names that
    moment, and a new flow before it cancels it."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],), timeouts=Timeouts(tcp_rst_linger=1.0)), 0.0)
    out(t, tcp("10.10.3.1", SERVER, 40000, 80, "S"), 5.0)
    out(t, tcp("10.10.3.1", SERVER, 40000, 80, "R"), 6.0)
    t.handle_timer(8.0)
    assert t.flow_count() == 0 and ip("10.10.3.1") in t.backends
    assert t.get_timer() == 7.0 + IDLE
    t.handle_timer(7.0 + IDLE - 1)
    assert ip("10.10.3.1") in t.backends
    out(t, udp("10.10.3.1", SERVER, 40001, 5000), 7.0 + IDLE - 0.5)
    t.handle_timer(7.0 + IDLE)
    assert ip("10.10.3.1") in t.backends, "a backend that spoke again stays"


def test_default_address_falls_a_tier_and_grows_blocks_without_ending_flows() -> None:
    """51 standalone backends put the address in the 512-port tier; when one goes
    silent and is released, the other 50 grow back to 1024 ports and keep their flows."""
    t = TranslationTable(lab_model(defaults=(DEFAULTS[0],)), 0.0)
    for i in range(1, 52):
        out(t, udp(f"10.10.5.{i}", SERVER, 40000, 5000), 0.0 if i == 51 else 100.0)
    blocks = {be.ip: be.block for be in t.backends.values() if be.block is not None and be.scenario == 3}
    assert {b.size for b in blocks.values()} == {512}
    t.handle_timer(IDLE + 1)  # 10.10.5.51's flow idles out (at 240); its block stays for now
    assert ip("10.10.5.51") in t.backends
    for i in range(1, 51):  # the others keep talking
        out(t, udp(f"10.10.5.{i}", SERVER, 40000, 5000), IDLE + 1)
    t.handle_timer(2 * IDLE + 0.5)  # 240 s after its flow ended, 10.10.5.51 is released
    assert ip("10.10.5.51") not in t.backends
    kept = [be for be in t.backends.values() if be.scenario == 3]
    assert len(kept) == 50 and all(be.block is not None and be.block.size == 1024 for be in kept)
    assert t.counters_dict()["flows_ended_reclaimed"] == 0
    for be in kept:
        (f,) = be.flows
        back = udp(SERVER, DEFAULTS[0], 5000, f.public_port)
        assert t.out2in(back, 2 * IDLE + 0.6) == ACCEPT_MODIFIED_MARK
    tier = _events(t, "pool_tier_changed")
    assert [(e["old_block_size"], e["new_block_size"], e["backends"]) for e in tier][-1] == (512, 1024, 50)


def test_pool_members_and_instance_ip_backends_are_never_released() -> None:
    """Only standalone backends are released; configured ones keep their block forever."""
    t = TranslationTable(lab_model(), 0.0)
    out(t, udp(POOL[0], SERVER, 40000, 5000), 0.0)
    t.handle_timer(10 * IDLE)
    assert ip(POOL[0]) in t.backends and t.backends[ip(POOL[0])].block is not None
    assert t.get_timer() is None
    assert t.out2in(udp(SERVER, DEFAULTS[0], 5000, 1024), 10 * IDLE) == DROP
