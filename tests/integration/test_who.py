"""`snatgw who` (issue 9, item 7): the live holder of a public port a backend is using,
and the holder at a past time from the gateway's port-block log lines."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

BACKEND = t.STANDALONE[0]  # 10.10.3.1: a default-SNAT backend, placed at its first packet


def _who(*args: str, stdin: bytes | None = None) -> dict[str, Any]:
    res = subprocess.run([str(h.SNATGW), "who", *args, "--json"], capture_output=True, timeout=30,
                         check=False, input=stdin)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    out: dict[str, Any] = json.loads(res.stdout)
    return out


def test_who_names_the_backend_using_a_port_live_and_from_the_log(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """A UDP flow from 10.10.3.1: `who IP:PORT` (as whoami saw it) names 10.10.3.1 and the flow, live
    and from the log at a time after its first packet; before it, nobody held the port."""
    gw = gateway(h.lab_config())
    before = time.time()
    assert _who(f"{t.DEFAULT_SNAT[0]}:1024", "--at", str(before), "--log", str(gw.log_path))["holder"] is None
    mark = whoami_log.mark()
    steps: list[list[Any]] = [["send", 0, t.SERVER, 5000, "who"], ["recv", 0, 3], ["sleep", 20]]
    holder = h.ProbeProc(lab.be, {"sockets": [{"src": BACKEND}], "steps": steps})
    try:
        opened = holder.next(timeout=15)
        local = opened["ports"][0]
        holder.next(timeout=15)  # the send
        answer = holder.next(timeout=15)
        assert "data" in answer, answer
        pub_ip, pub_port = h.parse_peer(answer["data"])
        recs = whoami_log.wait_for(lambda r: len(r) >= 1, mark)
        assert (recs[0]["src"], recs[0]["sport"]) == (pub_ip, pub_port), recs
        assert pub_ip in t.DEFAULT_SNAT

        res = gw.cli("who", f"{pub_ip}:{pub_port}", "--json")
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        live = json.loads(res.stdout)
        assert live["kind"] == "default_snat" and live["holder"]["backend"] == BACKEND, live
        flows = live["flows"]
        assert [(f["backend_port"], f["remote"], f["remote_port"]) for f in flows] == [
            (local, t.SERVER, 5000)
        ], flows
        text = gw.cli("who", f"{pub_ip}:{pub_port}").stdout.decode()
        assert f"held by {BACKEND} (default)" in text and f"{BACKEND}:{local}" in text, text

        block = gw.wait_event("port_block_allocated", 5)
        assert block is not None
        allocated = [e for e in gw.events("port_block_allocated") if e["backend"] == BACKEND]
        assert len(allocated) == 1 and allocated[0]["public_ip"] == pub_ip, allocated
        assert any(lo <= pub_port <= hi for lo, hi in allocated[0]["ranges"]), allocated

        now = str(time.time())
        logged = _who(f"{pub_ip}:{pub_port}", "--at", now, "--log", str(gw.log_path))
        assert logged["holder"]["backend"] == BACKEND and logged["holder"]["until"] is None, logged
        piped = _who(f"{pub_ip}:{pub_port}", "--at", now, "--log", "-", stdin=gw.log_path.read_bytes())
        assert piped == logged
        earlier = _who(f"{pub_ip}:{pub_port}", "--at", str(before), "--log", str(gw.log_path))
        assert earlier["holder"] is None and earlier["next"]["backend"] == BACKEND, earlier
    finally:
        holder.close()

    start = _who(f"{t.FRONTEND_IP}:1024", "--log", str(gw.log_path))  # --at defaults to now
    assert start["holder"]["backend"] == t.POOL_MEMBERS[0], "blocks given at start are logged after ready"
    frontend = gw.cli("who", f"{t.FRONTEND_IP}:80", "--json")
    assert json.loads(frontend.stdout)["reason"].startswith("frontend port of an LB rule"), frontend.stdout
    bad = gw.cli("who", "not-an-endpoint")
    assert bad.returncode == 2 and "PUBLIC_IP:PORT" in bad.stderr.decode(), bad


def test_who_from_the_log_follows_a_block_across_a_restart_with_a_state_file(
    lab: LabNames, gateway: h.GatewayFactory, tmp_path: Path
) -> None:
    """A standalone backend's block, restored after SIGTERM+start, is logged again by the new run,
    so `who --at` after the restart still names it (without the re-announcement: nobody)."""
    state = tmp_path / "state.json"
    config = h.lab_config(mutate=lambda cfg: cfg["gateway"].update(state_file=str(state), idle_timeout=600))
    gw = gateway(config)
    steps: list[list[Any]] = [["send", 0, t.SERVER, 5000, "one"], ["recv", 0, 3]]
    out = h.probe(lab.be, {"sockets": [{"src": BACKEND}], "steps": steps}, timeout=20)
    pub_ip, pub_port = h.parse_peer(next(r for r in out if r["op"] == "recv")["data"])
    assert gw.stop() == 0
    log = tmp_path / "both-runs.log"
    first = gw.log_path.read_bytes()

    gw2 = gateway(config)
    h.wait_until(lambda: any(e["backend"] == BACKEND for e in gw2.events("port_block_allocated")), 10,
                 what="the restored block is logged by the new run")
    log.write_bytes(first + gw2.log_path.read_bytes())
    after = _who(f"{pub_ip}:{pub_port}", "--at", str(time.time()), "--log", str(log))
    assert after["holder"] is not None and after["holder"]["backend"] == BACKEND, after
    assert after["previous"]["backend"] == BACKEND and after["previous"]["end_event"] == "gateway_stopped"
    live = json.loads(gw2.cli("who", f"{pub_ip}:{pub_port}", "--json").stdout)
    assert live["holder"]["backend"] == BACKEND and len(live["flows"]) == 1, live
