"""The CLI's readable tables: one line per flow or backend, every number shown as is."""

from __future__ import annotations

import time

from gateway import show
from gateway.core import views
from gateway.core.table import TranslationTable
from tests.unit.conftest import POOL, SERVER, lab_model, udp
from tests.unit.conftest import ip as views_ip


def _table_with_flows() -> TranslationTable:
    t = TranslationTable(lab_model(), 0.0)
    for sport in (40000, 40001):
        t.in2out(udp(POOL[0], SERVER, sport, 5000), 1.0)
    return t


def test_table_aligns_columns_and_shows_none_as_dash() -> None:
    """Columns line up under their headers; a missing value prints as '-'."""
    out = show.table(["A", "LONGER"], [["x", None], ["yyyy", 3]]).splitlines()
    assert out == ["A     LONGER", "x     -", "yyyy  3"]


def test_flows_table_has_one_line_per_flow_with_both_endpoints() -> None:
    """`snatgw flows` shows backend and public ip:port of each flow and a count."""
    rows = views.flows(_table_with_flows(), 3.0)
    lines = show.flows(rows).splitlines()
    assert lines[0].split()[:4] == ["PROTO", "BACKEND", "PUBLIC", "REMOTE"]
    assert f"{POOL[0]}:40000" in lines[1] and "198.51.100.10:1024" in lines[1]
    assert lines[-1] == "2 flows"


def test_ports_table_shows_block_use_and_exhaustion_time() -> None:
    """`snatgw ports` shows the block range, ports in use and the last exhaustion as a date."""
    rows = views.ports(_table_with_flows(), 3.0, time.time())
    rows[0]["exhausted"], rows[0]["last_exhausted"] = 4, time.time() - 30
    lines = show.ports(rows).splitlines()
    first = lines[1]
    assert first.startswith(POOL[0]) and "1024-2047" in first and "198.51.100.2:5000/udp=2" in first
    assert "(30s ago)" in first
    assert any("own ports" in ln and " all " in ln for ln in lines), "an instance IP has no block"


def test_stats_status_and_reload_render() -> None:
    """stats, status and reload answers render without losing their numbers."""
    t = _table_with_flows()
    s = show.stats(views.stats(t))
    assert "attempted                2" in s and "flows live: 2" in s
    status = {
        **views.status(t), "config": "/etc/x.toml", "uptime": 12.5, "queue": 0, "tcp_queue": 1,
        "queue_client": "netlink", "inside": "in0", "outside": "out0", "control_socket": "/run/s",
        "metrics": None, "reloads": {"applied": 1, "rejected": 0},
    }  # fmt: skip
    text = show.status(status)
    assert "queue       0 (tcp 1), client netlink" in text and "metrics     off" in text
    assert "fe-web" in text and "web" in text
    assert show.reload({"applied": False, "config": "c", "key": "k", "problem": "p"}) == "rejected c: k: p"


def test_status_shows_the_control_socket_counters() -> None:
    """status names the control socket's clients, limit and refusals when the gateway sends them."""
    t = _table_with_flows()
    status = {
        **views.status(t), "config": "/etc/x.toml", "uptime": 1.0, "queue": 0, "tcp_queue": None,
        "queue_client": "netlink", "inside": "in0", "outside": "out0", "control_socket": "/run/s",
        "metrics": None, "reloads": {"applied": 0, "rejected": 0},
        "control": {"clients": 3, "max_clients": 256, "served": 9, "refused": 2, "timed_out": 1, "denied": 1},
    }  # fmt: skip
    line = "control     /run/s (clients 3/256, served 9, refused 2, timed out 1, denied 1)"
    assert line in show.status(status).splitlines()


def test_who_renders_the_holder_its_flows_or_why_nobody_holds_the_port() -> None:
    """`snatgw who` prints the holder and block, the flows on the port, or the reason for nobody."""
    t = _table_with_flows()
    port = next(iter(t.backends[views_ip(POOL[0])].flows)).public_port
    text = show.who(views.who(t, views_ip("198.51.100.10"), port, 3.0))
    lines = text.splitlines()
    head = f"198.51.100.10:{port} (frontend fe-web): held by {POOL[0]} (lb, pool web), block 1024-2047"
    assert lines[0] == head
    assert lines[1] == "1 live flows on this port" and lines[2].startswith("PROTO")
    assert f"198.51.100.10:{port}" in lines[3]
    nobody = show.who(views.who(t, views_ip("198.51.100.10"), 80, 3.0))
    assert nobody == (
        "198.51.100.10:80 (frontend fe-web): held by nobody now: "
        "frontend port of an LB rule: never in a block"
    )


def test_who_log_renders_the_interval_or_its_neighbours() -> None:
    """`snatgw who --at` prints who held the port from when until when, or who before and after."""
    held = {"backend": "10.10.3.1", "since": "T1", "until": "T2", "event": "port_block_allocated",
            "end_event": "port_block_released"}  # fmt: skip
    r = {"public_ip": "198.51.100.30", "port": 1500, "at": "T", "holder": held, "previous": None,
         "next": None, "intervals": 1}  # fmt: skip
    assert show.who_log(r) == (
        "198.51.100.30:1500 at T: held by 10.10.3.1 from T1 (port_block_allocated) "
        "until T2 (port_block_released)"
    )
    r = {**r, "holder": None, "previous": held, "next": {**held, "until": None}}
    lines = show.who_log(r).splitlines()
    assert lines[0].endswith("held by nobody, per the log")
    assert lines[1].startswith("  before: 10.10.3.1") and lines[2].endswith("and still at the end of the log")
