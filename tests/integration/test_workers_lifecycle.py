"""Two workers (README, "Workers"): a reload keeps every flow in its worker, a worker's
crash fails the gateway closed, a killed supervisor takes its workers with it while its
rules keep dropping, and each worker's state file survives a restart.

With two workers, backend ``ip`` belongs to worker ``(ip & 15) % 2``
(gateway/core/shard.py): 10.10.1.2 is worker 0's, 10.10.1.1 worker 1's.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h
from tests.integration.test_workers import FROM_GATEWAY, config, owner

pytestmark = pytest.mark.integration

LAB_EXTRA_BACKENDS = 4


def test_reload_keeps_flows_and_refuses_a_new_worker_count(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """A reload with two workers keeps every flow (same public port, same worker); changing
    the worker count is refused (it needs a restart)."""
    g = gateway(config(lab_extra), ready_timeout=60)
    srcs = (t.POOL_MEMBERS[1], t.POOL_MEMBERS[0])
    procs = [clients.ProbeProc(lab.be, {
        "sockets": [{"src": s, "connect": [t.SERVER, t.WHOAMI_UDP_PORT]}],
        "steps": [["send", 0, None, 0, "before"], ["recv", 0, 3], ["sleep", 5.0],
                  ["send", 0, None, 0, "after"], ["recv", 0, 5]],
    }) for s in srcs]  # fmt: skip
    try:
        before = {}
        for s, p in zip(srcs, procs, strict=True):
            assert p.next()["op"] == "open"
            assert p.next() == {"op": "send"}
            got = p.next(5)
            assert "data" in got, got
            before[s] = h.parse_peer(got["data"])
        flows_before = {
            (f["backend"], f["public_port"], f["worker"]) for f in g.ask("flows", "--proto", "udp")
        }
        res = g.reload(config(lab_extra, idle_timeout=250))
        assert res is not None and res.returncode == 0, res.stderr.decode() if res else None
        g.reload(config(lab_extra, idle_timeout=260), sighup=True)
        h.wait_until(lambda: len(g.events("config_reloaded")) == 2, 10, what="SIGHUP reload")
        flows_after = {
            (f["backend"], f["public_port"], f["worker"]) for f in g.ask("flows", "--proto", "udp")
        }
        assert flows_before <= flows_after
        after = {}
        for s, p in zip(srcs, procs, strict=True):
            assert p.next(10) == {"op": "send"}
            got = p.next(8)
            assert "data" in got, got
            after[s] = h.parse_peer(got["data"])
    finally:
        for p in procs:
            p.close()
    assert after == before
    assert {owner(s) for s in srcs} == {0, 1}

    def three(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["workers"] = 3

    refused = g.reload(h.lab_config(extra_members=lab_extra[:2], mutate=three))
    assert refused is not None and refused.returncode == 2
    rejected = g.events("config_rejected")
    assert rejected and rejected[-1]["key"] == "gateway.workers"
    assert g.stop() == 0


def test_worker_crash_fails_closed(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory
) -> None:
    """SIGKILL one worker: the supervisor logs worker_died, puts the guard in place, stops
    the other worker, removes the public addresses and exits non-zero; traffic from a
    backend of the surviving worker then reaches nobody."""
    g = gateway(config(lab_extra), ready_timeout=60)
    survivor_src = t.POOL_MEMBERS[1]  # worker 0
    assert h.curl(lab, survivor_src, f"http://{t.SERVER}/").returncode == 0
    workers = g.ask("status")["workers"]
    victim = next(w for w in workers if w["index"] == 1)
    os.kill(victim["pid"], signal.SIGKILL)
    h.wait_until(lambda: not g.alive(), 30, what="the supervisor exits after a worker died")
    assert g.proc.returncode not in (0, None)
    died = g.event("worker_died")
    assert died is not None
    assert (died["worker"], died["pid"], died.get("signal")) == (1, victim["pid"], "SIGKILL")
    rules = h.iptables_save(lab)
    assert "SNATGW-GUARD" in rules and "NFQUEUE" not in rules, rules
    assert not (h.out_addresses(lab) & {t.FRONTEND_IP, t.INSTANCE_PUBLIC, *t.DEFAULT_SNAT})
    other = next(w for w in workers if w["index"] == 0)
    h.wait_until(lambda: not _alive(other["pid"]), 20, what="the surviving worker stops")
    with h.Capture(lab.inet, t.INET_IF, FROM_GATEWAY) as cap:
        assert h.curl(lab, survivor_src, f"http://{t.SERVER}/", max_time=2).returncode != 0
        out = h.probe(
            lab.be,
            {
                "sockets": [{"src": survivor_src, "connect": [t.SERVER, t.WHOAMI_UDP_PORT]}],
                "steps": [["send", 0, None, 0, "after the crash"], ["recv", 0, 1.5]],
            },
        )
        assert out[2].get("timeout") is True or "error" in out[2], out
        assert h.ping(lab.be, survivor_src, t.SERVER, count=2, interval=0.2, wait=1).returncode != 0
    assert cap.lines == [], f"the far side received packets after the crash: {cap.lines[:10]}"


def test_supervisor_killed_workers_exit_rules_stay(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory
) -> None:
    """SIGKILL the supervisor: its workers notice and exit, the queue rules stay and
    drop (nothing reaches the far side), as a single gateway's crash leaves them."""
    g = gateway(config(lab_extra), ready_timeout=60)
    pids = [w["pid"] for w in g.ask("status")["workers"]]
    g.kill()
    h.wait_until(lambda: not any(_alive(p) for p in pids), 30, what="the workers exit")
    assert "NFQUEUE" in h.iptables_save(lab)
    with h.Capture(lab.inet, t.INET_IF, FROM_GATEWAY) as cap:
        for src in (t.POOL_MEMBERS[0], t.POOL_MEMBERS[1]):
            assert h.curl(lab, src, f"http://{t.SERVER}/", max_time=2).returncode != 0
    assert cap.lines == [], cap.lines[:10]
    # The next run replaces what the dead one left.
    g2 = gateway(config(lab_extra), ready_timeout=60)
    assert h.curl(lab, t.POOL_MEMBERS[1], f"http://{t.SERVER}/").returncode == 0
    assert g2.stop() == 0


def _alive(pid: int) -> bool:
    """Whether ``pid`` is still a live (not zombie) process."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_worker_keeps_its_state_across_a_restart(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory, tmp_path: Any
) -> None:
    """Each worker saves its flows to its own file (state path + .workerIofN) at stop and
    restores them at start, same public port in the same worker; a file written with
    another worker count is ignored, and said so."""
    state = tmp_path / "state.json"
    state.write_bytes(b"{}")  # a one-worker gateway's file: not for two workers

    def two(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["workers"] = 2
        cfg["gateway"]["state_file"] = str(state)

    text = h.lab_config(extra_members=lab_extra[:2], mutate=two)
    g = gateway(text, ready_timeout=60)
    ignored = g.events("state_ignored")
    assert [e["path"] for e in ignored] == [str(state)]
    for src in (t.POOL_MEMBERS[1], t.POOL_MEMBERS[0]):
        out = h.probe(lab.be, {"sockets": [{"src": src, "connect": [t.SERVER, t.WHOAMI_UDP_PORT]}],
                               "steps": [["send", 0, None, 0, "keep me"], ["recv", 0, 3]]})  # fmt: skip
        assert "data" in out[2], out
    before = {(f["backend"], f["public_port"], f["worker"]) for f in g.ask("flows", "--proto", "udp")}
    assert {w for _, _, w in before} == {0, 1}
    assert g.stop() == 0
    saved = {e["worker"]: e["path"] for e in g.events("state_saved")}
    assert saved == {0: f"{state}.worker0of2", 1: f"{state}.worker1of2"}
    g2 = gateway(text, ready_timeout=60)
    restored = {e["worker"]: e for e in g2.events("state_restored")}
    assert set(restored) == {0, 1}, g2.events("state_not_restored")
    after = {(f["backend"], f["public_port"], f["worker"]) for f in g2.ask("flows", "--proto", "udp")}
    assert before <= after
    assert g2.stop() == 0
