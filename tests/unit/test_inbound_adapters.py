"""Adapter glue for issue 10 without a kernel: the loop hands hairpin packets to the core's
hairpin and other threads' results to the core between batches; the host fills in
address_space and probe_source; sysctls are recorded once and put back."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from queue import SimpleQueue
from typing import Any

import pytest

from gateway.adapters import run, system
from gateway.adapters.kernel import Hook, SkbInfo
from gateway.adapters.loop import PacketLoop
from gateway.config import parse
from gateway.core.verdict import ACCEPT, ACCEPT_MODIFIED, DROP


class FakeTable:
    """Records which entry point each packet reached."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.internal = 0

    def in2out(self, buf: Any, now: float) -> int:
        self.seen.append("in2out")
        return ACCEPT

    def out2in(self, buf: Any, now: float) -> int:
        self.seen.append("out2in")
        return ACCEPT

    def local_out(self, buf: Any, now: float) -> int:
        self.seen.append("local_out")
        return ACCEPT

    def hairpin(self, buf: Any, now: float) -> int:
        self.seen.append("hairpin")
        return ACCEPT_MODIFIED

    def count_internal_error(self) -> None:
        self.internal += 1


def _loop(table: FakeTable) -> PacketLoop:
    """A PacketLoop with no queues bound (the per-packet handler and the call queue only)."""
    loop = PacketLoop.__new__(PacketLoop)
    loop.table = table  # type: ignore[assignment]
    loop.now = 0.0
    loop._calls = SimpleQueue()
    loop._wake_r, loop._wake_w = socket.socketpair()
    loop._closed = False
    return loop


def test_the_hairpin_hook_goes_to_hairpin_and_the_others_keep_their_paths() -> None:
    """PRE_ROUTING_HAIRPIN -> hairpin, PREROUTING -> out2in, POSTROUTING -> in2out, LOCAL_OUT -> local_out."""
    t = FakeTable()
    loop = _loop(t)
    buf = memoryview(bytearray(40))
    for hook in (Hook.PRE_ROUTING_HAIRPIN, Hook.PRE_ROUTING, Hook.POST_ROUTING, Hook.LOCAL_OUT):
        loop._nl_packet(buf, int(hook), 0)
    assert t.seen == ["hairpin", "out2in", "in2out", "local_out"]
    assert loop._nl_packet(buf, int(Hook.PRE_ROUTING_HAIRPIN), int(SkbInfo.GSO)) == ACCEPT_MODIFIED


def test_a_core_error_on_a_hairpin_packet_drops_and_counts() -> None:
    """An exception from hairpin drops the packet and counts drop_internal, as on the other paths."""
    t = FakeTable()

    def boom(buf: Any, now: float) -> int:
        raise ValueError("bug")

    t.hairpin = boom  # type: ignore[method-assign]
    assert _loop(t)._nl_packet(memoryview(bytearray(40)), int(Hook.PRE_ROUTING_HAIRPIN), 0) == DROP
    assert t.internal == 1


def test_posted_calls_run_in_order_in_the_loop_and_errors_are_counted() -> None:
    """post() queues without waiting; the loop runs the calls in order; a raising one counts drop_internal."""
    t = FakeTable()
    loop = _loop(t)
    got: list[int] = []
    loop.post(lambda: got.append(1))
    loop.post(lambda: 1 / 0)
    loop.post(lambda: got.append(2))
    assert got == []
    loop._run_calls()
    assert got == [1, 2] and t.internal == 1


CFG = '[gateway]\ninside = "in0"\noutside = "out0"\n'


def test_host_defaults_fill_address_space_and_probe_source_only_when_unset(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unset: the inside interface's prefixes and first address; set in the config: kept."""
    monkeypatch.setattr(system, "inside_prefixes", lambda name: ((0x0A0A0000, 0x0A0AFFFF),))
    monkeypatch.setattr(system, "first_address", lambda name: 0x0A0A0001)
    filled = run.host_defaults(parse(CFG, "x.toml"))
    assert filled.model.address_space == ((0x0A0A0000, 0x0A0AFFFF),)
    assert filled.model.probe_source == 0x0A0A0001
    own = parse(CFG + 'address_space = ["172.16.0.0/12"]\nprobe_source = "10.10.0.9"\n', "x.toml")
    kept = run.host_defaults(own)
    assert kept.model.address_space == own.model.address_space and kept.model.probe_source == 0x0A0A0009


def test_sysctls_are_recorded_before_the_first_change_and_put_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The host's values are recorded once (a crashed run's are not taken for the host's)
    and written back at stop; a key whose interface is gone is skipped."""
    conf = tmp_path / "conf"
    for key, value in (("all/send_redirects", "1"), ("in0/send_redirects", "1"), ("in0/accept_local", "0")):
        (conf / key).parent.mkdir(parents=True, exist_ok=True)
        (conf / key).write_text(value + "\n")
    monkeypatch.setattr(system, "_CONF", conf)
    state = tmp_path / "run"
    system.set_sysctls(state, system.hairpin_sysctls("in0"))
    assert (conf / "in0/accept_local").read_text() == "1\n"
    assert (conf / "all/send_redirects").read_text() == "0\n"
    system.set_sysctls(state, system.hairpin_sysctls("in0"))  # a restart after a crash
    (record,) = state.iterdir()
    assert json.loads(record.read_text())["in0/accept_local"] == "0"
    system.restore_sysctls(state)
    keys = ("all/send_redirects", "in0/send_redirects", "in0/accept_local")
    assert [(conf / k).read_text() for k in keys] == ["1\n", "1\n", "0\n"]
    assert not list(state.iterdir())


def test_strict_rp_filter_is_the_larger_of_all_and_the_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """1 on either all or the interface is strict; 2 anywhere makes it loose; 0 and 0 is off."""
    monkeypatch.setattr(system, "_CONF", tmp_path)
    for name in ("all", "in0"):
        (tmp_path / name).mkdir()
    for all_, dev, strict in (("0", "0", False), ("1", "0", True), ("0", "1", True), ("1", "2", False)):
        (tmp_path / "all/rp_filter").write_text(all_)
        (tmp_path / "in0/rp_filter").write_text(dev)
        assert system.strict_rp_filter("in0") is strict
