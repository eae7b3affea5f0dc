"""What the operator sees: ``snatgw flows|ports|stats|status``, the metrics endpoint, the
control socket's permissions, and the CLI without a gateway behind it.

Every number the gateway reports is checked against what the far side (whoami) saw.
"""

from __future__ import annotations

import grp
import os
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

METRICS_PORT = 9469
BACKEND = t.POOL_MEMBERS[0]  # 10.10.1.1, first member of pool "web"
# 3 lab members + 198 addresses that exist nowhere: 201 members -> 128-port blocks.
FAKE_MEMBERS = tuple(f"10.10.200.{i}" for i in range(1, 199))
BIG_POOL = (*t.POOL_MEMBERS, *FAKE_MEMBERS)
BLOCK = 128


def _label_key(name: str, **labels: str) -> str:
    return name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"


def _one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected one line, got {lines!r}"
    return lines[0]


def _ports_row(gw: h.GatewayProc) -> dict[str, Any]:
    rows = gw.ask("ports", "--backend", BACKEND)
    assert isinstance(rows, list) and len(rows) == 1, rows
    row: dict[str, Any] = rows[0]
    assert row["backend"] == BACKEND
    return row


def test_flows_lists_each_udp_flow_as_the_server_saw_it(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """`snatgw flows --backend --proto udp` lists exactly the live flows, as the public ip:port whoami saw."""
    gw = gateway(h.lab_config())
    mark = whoami_log.mark()
    out = h.probe(lab.be, {
        "sockets": [{"src": BACKEND}, {"src": BACKEND}],
        "steps": [["send", 0, t.SERVER, 5000, "one"], ["recv", 0, 3],
                  ["send", 1, t.SERVER, 5000, "two"], ["recv", 1, 3]],
    }, timeout=20)
    assert out[0]["op"] == "open"
    local_ports = out[0]["ports"]
    answers = [r for r in out if r["op"] == "recv"]
    assert len(answers) == 2 and all("data" in r for r in answers), answers
    peers = [h.parse_peer(r["data"]) for r in answers]
    assert all(ip == t.FRONTEND_IP for ip, _ in peers), peers
    recs = whoami_log.wait_for(lambda r: len(r) >= 2, mark)
    assert sorted((r["src"], r["sport"]) for r in recs) == sorted(peers), recs

    rows = gw.ask("flows", "--backend", BACKEND, "--proto", "udp")
    assert len(rows) == 2, rows
    by_port = {r["backend_port"]: r for r in rows}
    assert set(by_port) == set(local_ports), rows
    for local, (pub_ip, pub_port) in zip(local_ports, peers, strict=True):
        row = by_port[local]
        assert row["protocol"] == "udp" and row["backend"] == BACKEND, row
        assert (row["public_ip"], row["public_port"]) == (pub_ip, pub_port), row
        assert (row["remote"], row["remote_port"]) == (t.SERVER, 5000), row
        assert row["scenario"] == "lb" and row["state"] == "active", row
        assert row["packets_out"] == 1 and row["packets_in"] == 1, row
        assert row["bytes_out"] > 0 and row["bytes_in"] > 0, row

    assert gw.ask("flows", "--backend", BACKEND, "--proto", "tcp") == []

    res = gw.cli("flows", "--backend", BACKEND, "--proto", "udp")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    text = res.stdout.decode()
    lines = text.splitlines()
    assert lines and lines[0].startswith("PROTO"), text
    for local, (pub_ip, pub_port) in zip(local_ports, peers, strict=True):
        assert any(f"{BACKEND}:{local}" in ln and f"{pub_ip}:{pub_port}" in ln for ln in lines), text


def test_port_use_and_exhaustion_in_the_cli_metrics_and_log(
    lab: LabNames, gateway: h.GatewayFactory, whoami_log: h.WhoamiLog
) -> None:
    """201 members -> 128-port blocks: 60 then 80 more UDP flows show use, peak and 12 exhaustions."""
    gw = gateway(h.lab_config(pool_members=BIG_POOL, exhaustion_event_interval=1),
                 args=["--metrics", f"127.0.0.1:{METRICS_PORT}"])
    used_key = _label_key("snatgw_used_snat_ports", backend=BACKEND, protocol="udp", public_ip=t.FRONTEND_IP)
    alloc_key = _label_key("snatgw_allocated_snat_ports", backend=BACKEND, public_ip=t.FRONTEND_IP)
    exh_key = _label_key("snatgw_snat_port_exhaustion_total", backend=BACKEND, public_ip=t.FRONTEND_IP)
    failed_key = _label_key("snatgw_snat_connections_total", state="failed")

    mark = whoami_log.mark()
    # The first 60 flows come from sockets the probe keeps bound, so the next 80 cannot reuse
    # one of their local ports (that would be the same flow, not a new one).
    first = 60
    steps: list[list[Any]] = [["send", i, t.SERVER, 5000, f"a{i}"] for i in range(first)]
    steps += [["recv", i, 3] for i in range(first)] + [["sleep", 30]]
    holder = h.ProbeProc(lab.be, {"sockets": [{"src": BACKEND}] * first, "steps": steps})
    try:
        opened = holder.next(timeout=15)
        assert opened["op"] == "open" and len(opened["ports"]) == first, opened
        results = [holder.next(timeout=15) for _ in range(2 * first)]
        answers = [r for r in results if r["op"] == "recv"]
        assert len(answers) == first and all("data" in r for r in answers), answers
        first_peers = {h.parse_peer(r["data"]) for r in answers}
        assert {ip for ip, _ in first_peers} == {t.FRONTEND_IP} and len(first_peers) == first

        row = _ports_row(gw)
        assert row["allocated"] == BLOCK, row
        assert row["in_use"].get("udp") == first, row
        assert row["peak"].get("udp", 0) >= first, row
        assert row["top_destinations"], row
        top = row["top_destinations"][0]
        assert top["destination"] == f"{t.SERVER}:5000" and top["ports"] == first, row
        assert top["protocol"] == "udp", row
        assert row["exhausted"] == 0 and row["last_exhausted"] is None, row
        samples: dict[str, float] = {}

        def metrics_show(used: float) -> bool:
            samples.update(gw.metrics(METRICS_PORT))
            return samples.get(used_key) == used

        assert h.poll_until(lambda: metrics_show(first), 10, interval=0.2), {
            k: v for k, v in samples.items() if BACKEND in k
        }
        assert samples.get(alloc_key) == BLOCK, samples.get(alloc_key)
        assert samples.get(exh_key) == 0, samples.get(exh_key)

        more = 80
        out = h.probe(lab.be, {"steps": [["many", BACKEND, t.SERVER, 5000, more, 3, "b"]]}, timeout=30)
        local = set(out[-1]["ports"])
        assert not local & set(opened["ports"]), "the held sockets keep their local ports"
        answered = [r for r in out[-1]["replies"] if r]
        second_peers = {h.parse_peer(r) for r in answered}
        assert len(answered) == BLOCK - first, f"{len(answered)} of {more} new flows got through"
        assert not second_peers & first_peers
    finally:
        holder.close()

    expected_fail = first + more - BLOCK
    all_ports = {p for _, p in first_peers | second_peers}
    assert len(all_ports) == BLOCK and max(all_ports) - min(all_ports) == BLOCK - 1, sorted(all_ports)
    recs = whoami_log.wait_for(
        lambda r: len({x["sport"] for x in r if x["src"] == t.FRONTEND_IP}) >= BLOCK, mark, timeout=5
    )
    seen = {r["sport"] for r in recs if r["src"] == t.FRONTEND_IP and r["dst"] == t.SERVER}
    assert seen == all_ports, f"server saw {len(seen)} source ports, expected the whole block"

    row = _ports_row(gw)
    assert row["in_use"].get("udp") == BLOCK, row
    assert row["peak"].get("udp", 0) >= BLOCK, row
    assert row["exhausted"] >= expected_fail, row
    assert row["last_exhausted"] is not None, row
    assert row["top_destinations"][0]["ports"] == BLOCK, row

    stats = gw.ask("stats")
    assert stats["snat_connections"]["failed"] >= expected_fail, stats["snat_connections"]
    assert stats["counters"]["drop_exhausted"] >= expected_fail, stats["counters"]

    assert h.poll_until(lambda: metrics_show(BLOCK), 10, interval=0.2), {
        k: v for k, v in samples.items() if BACKEND in k
    }
    assert samples.get(exh_key, 0) >= expected_fail, samples.get(exh_key)
    assert samples.get(failed_key, 0) >= expected_fail, samples.get(failed_key)
    assert samples.get(alloc_key) == BLOCK, samples.get(alloc_key)

    exhausted = gw.wait_event("snat_port_exhausted", 5)
    assert exhausted is not None, "exhaustion must be logged"
    assert exhausted["backend"] == BACKEND and exhausted["public_ip"] == t.FRONTEND_IP, exhausted
    assert exhausted["block_size"] == BLOCK, exhausted
    high = gw.wait_event("snat_ports_high_water", 5)
    assert high is not None, "crossing the high-water mark must be logged"
    assert high["backend"] == BACKEND and high["protocol"] == "udp", high
    assert high["block_size"] == BLOCK and high["ports_in_use"] >= 0.8 * BLOCK, high

    res = gw.cli("ports", "--backend", BACKEND)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    lines = res.stdout.decode().splitlines()
    assert len(lines) == 2, lines
    head, data = lines
    assert "EXHAUSTED" in head.split(), head
    col = head.index("EXHAUSTED")
    assert data.startswith(BACKEND), data
    assert data[col:].split()[0] == str(row["exhausted"]), (head, data)

    assert gw.stop() == 0
    assert gw.counters()["drop_exhausted"] >= expected_fail


def test_status_and_stats_describe_the_running_gateway(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """`snatgw status --json` names the config, uptime, queue, the frontend's tier and the pool."""
    gw = gateway(h.lab_config())
    st = gw.ask("status")
    assert st["config"] == str(gw.config_path), st["config"]
    assert st["uptime"] > 0 and st["queue"] == 0, st
    assert st["control_socket"] == gw.socket, st
    assert st["metrics"] is None, st
    fronts = [a for a in st["addresses"] if a["public_ip"] == t.FRONTEND_IP]
    assert len(fronts) == 1, st["addresses"]
    fe = fronts[0]
    assert fe["kind"] == "frontend" and fe["name"] == "fe-web", fe
    assert fe["tier"] == 1 and fe["block_size"] == 1024 and fe["backends"] == 3, fe
    pools = [p for p in st["pools"] if p["pool"] == "web"]
    assert len(pools) == 1, st["pools"]
    pool = pools[0]
    assert pool["frontend"] == "fe-web" and pool["public_ip"] == t.FRONTEND_IP, pool
    assert pool["members"] == 3 and pool["tier"] == 1, pool

    res = gw.cli("stats")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert "attempted" in res.stdout.decode(), res.stdout.decode()


def test_control_socket_permissions_and_metrics_off_by_default(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """The control socket is 0600 root, or 0660 with control_group; removed on stop; no TCP listener."""
    try:
        daemon_gid = grp.getgrnam("daemon").gr_gid
    except KeyError:
        pytest.fail("this test needs a group named 'daemon' on the host (Debian has one)", pytrace=False)

    gw = gateway(h.lab_config())
    st = os.stat(gw.socket)
    assert stat.S_ISSOCK(st.st_mode), oct(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)
    assert st.st_uid == 0, st
    listeners = ns_run(lab.gw, ["ss", "-Hltn"], timeout=10).stdout.decode()
    assert listeners.strip() == "", f"without --metrics nothing may listen:\n{listeners}"
    assert gw.stop() == 0
    assert not os.path.exists(gw.socket), "the control socket must be removed on stop"

    gw = gateway(h.lab_config(control_group="daemon"))
    st = os.stat(gw.socket)
    assert stat.S_ISSOCK(st.st_mode), oct(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    assert st.st_uid == 0 and st.st_gid == daemon_gid, st
    assert gw.ask("stats")["flows_total"] == 0
    assert gw.stop() == 0
    assert not os.path.exists(gw.socket), "the control socket must be removed on stop"

    before = h.gw_snapshot(lab)
    res = gateway.run_to_exit(h.lab_config(control_group="no-such-group-snatgw"))
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "gateway.control_group" in _one_line(res.stderr), res.stderr
    assert h.gw_snapshot(lab) == before, "a refused config must not touch the system"


def test_cli_without_a_gateway_says_it_cannot_reach_it(tmp_path: Path) -> None:
    """No gateway behind the socket (missing file or stale socket): exit 1 and one line saying so."""
    missing = tmp_path / "none.sock"
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # a socket file nobody listens on, as a crashed gateway leaves
    for path in (missing, stale):
        res = subprocess.run([str(h.SNATGW), "stats", "--socket", str(path)], capture_output=True,
                             timeout=30, check=False, stdin=subprocess.DEVNULL)
        err = res.stderr.decode(errors="replace")
        assert res.returncode == 1, (res.returncode, err)
        line = _one_line(err)
        assert "cannot reach the gateway" in line and str(path) in line, line
        assert res.stdout == b"", res.stdout
