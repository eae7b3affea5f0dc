"""Lab pieces that need no root: address schemes, whoami's parsing, the config builder,
waiting and stopping processes, and whoami itself on loopback high ports (a subprocess,
stopped by its pid)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.lab import layout as t
from gateway.lab import whoami as w
from gateway.lab.clients import iperf3_client, iperf3_json, parse_peer
from gateway.lab.gatewayproc import parse_metrics
from gateway.lab.netns import LabError
from gateway.lab.procs import (
    ProcessSet,
    WaitTimeout,
    close_pipes,
    poll_until,
    stop_process,
    wait_until,
)
from tests.integration import helpers as h


def test_extra_backend_scheme() -> None:
    """Extras are 10.10.100.1.., 250 per third octet, never .0 or the gateway."""
    extra = t.extra_backend_addresses(997)
    assert extra[0] == "10.10.100.1" and extra[249] == "10.10.100.250"
    assert extra[250] == "10.10.101.1" and extra[-1] == "10.10.103.247"
    assert len(set(extra)) == 997
    assert t.extra_backend_addresses(0) == ()
    with pytest.raises(ValueError):
        t.extra_backend_addresses(-1)
    with pytest.raises(ValueError):
        t.extra_backend_addresses(t.EXTRA_MAX + 1)
    assert t.extra_backend_addresses(t.EXTRA_MAX)[-1] == "10.10.255.250"


def test_backend_addresses_order_and_validation() -> None:
    """Pool members come first (10.10.1.1 is be0's primary); duplicates and outsiders refused."""
    addrs = t.backend_addresses(["10.10.100.1", "10.10.1.1"])
    assert addrs[:3] == t.POOL_MEMBERS and addrs[-1] == "10.10.100.1"
    assert len(addrs) == len(set(addrs)) == 7
    for bad in ("10.10.0.1", "10.11.0.1", "10.10.255.255", "not-an-ip"):
        with pytest.raises(ValueError):
            t.backend_addresses([bad])


def test_names() -> None:
    """Namespace names derive from the prefix; bad prefixes are refused."""
    assert t.names("sgt-x") == t.LabNames("sgt-x", "sgt-x-be", "sgt-x-gw", "sgt-x-inet")
    assert t.names().gw == "snatgw-gw"
    for bad in ("", "-x", "a/b", "x" * 21, "UPPER"):
        with pytest.raises(ValueError):
            t.names(bad)


@pytest.mark.parametrize(
    ("data", "delay"),
    [(b"PUSHLATER 5", 5.0), (b"PUSHLATER 0.25\n", 0.25), (b"PUSHLATER -3", 0.0),
     (b"PUSHLATER 1e9", w.MAX_PUSH_DELAY), (b"PUSHLATER", None), (b"PUSHLATER x", None),
     (b"PUSHLATERx 5", None), (b"hello", None), (b"PUSHLATER nan", None), (b"", None)],
)
def test_parse_push(data: bytes, delay: float | None) -> None:
    """PUSHLATER requests are recognised with their bounded delay."""
    assert w.parse_push(data) == delay


@given(st.binary(max_size=64))
def test_parse_push_never_raises(data: bytes) -> None:
    """Any datagram is either no push or a push with a delay in range."""
    d = w.parse_push(data)
    assert d is None or 0.0 <= d <= w.MAX_PUSH_DELAY


def test_http_response() -> None:
    """whoami answers GET with the peer's ip:port and refuses other methods."""
    resp = w.http_response(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "198.51.100.10", 1024)
    head, body = resp.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.0 200 OK") and b"Connection: close" in head
    assert body == b"198.51.100.10:1024\n" and b"Content-Length: 19" in head
    assert w.http_response(b"HEAD / HTTP/1.0\r\n\r\n", "1.2.3.4", 5).endswith(b"\r\n\r\n")
    assert w.http_response(b"POST / HTTP/1.0\r\n\r\n", "1.2.3.4", 5).startswith(b"HTTP/1.0 400")


def test_lab_config_round_trips_the_example() -> None:
    """With no overrides the builder reproduces deploy/examples/lab.toml exactly (as data)."""
    assert tomllib.loads(h.lab_config()) == h.lab_config_dict()
    cfg = tomllib.loads(h.lab_config(idle_timeout=3, extra_members=["10.10.100.1"],
                                     tcp_fin_linger=1))
    assert cfg["gateway"]["idle_timeout"] == 3 and cfg["gateway"]["tcp_fin_linger"] == 1
    assert cfg["pools"][0]["members"][-1] == "10.10.100.1"
    with pytest.raises(TypeError):
        h.lab_config(no_such_override=1)


def _free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture()
def whoami_local(tmp_path: Path) -> Iterator[tuple[int, int, Path]]:
    http_port, udp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_DGRAM)
    log = tmp_path / "whoami.log"
    pid_file = tmp_path / "whoami.pid"
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.lab.whoami", "--bind", "127.0.0.1",
         "--http-port", str(http_port), "--udp-port", str(udp_port), "--log", str(log),
         "--pid-file", str(pid_file)],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        assert h.wait_until(pid_file.exists, 10, what="whoami wrote its pid file"), "whoami did not start"
        yield http_port, udp_port, log
    finally:
        stop_process(proc, signal.SIGTERM, 5)
        close_pipes(proc)
    assert not pid_file.exists(), "whoami removes its pid file on SIGTERM"


def test_whoami_on_loopback(whoami_local: tuple[int, int, Path]) -> None:
    """HTTP and UDP answer with the peer; PUSHLATER answers twice; every peer is logged."""
    http_port, udp_port, log = whoami_local
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/", timeout=5) as resp:
        body = resp.read().decode()
        assert resp.headers["Connection"] == "close"
    assert body.startswith("127.0.0.1:")
    tcp_port = int(body.split(":")[1])
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(3)
        s.connect(("127.0.0.1", udp_port))
        s.send(b"hello")
        assert s.recv(100) == f"127.0.0.1:{s.getsockname()[1]}\n".encode()
        start = time.monotonic()
        s.send(b"PUSHLATER 0.3")
        assert s.recv(100).startswith(b"127.0.0.1:")
        assert s.recv(100) == f"late 127.0.0.1:{s.getsockname()[1]}\n".encode()
        assert time.monotonic() - start >= 0.25
        udp_local = s.getsockname()[1]
    recs = [json.loads(x) for x in log.read_text().splitlines()]
    assert recs[0] == {**recs[0], "proto": "tcp", "src": "127.0.0.1", "sport": tcp_port,
                       "dst": "127.0.0.1", "dport": http_port}
    assert [(r["proto"], r["sport"], r["dport"]) for r in recs[1:]] == [
        ("udp", udp_local, udp_port)] * 2


def test_wait_until_returns_the_value_or_names_what_did_not_happen() -> None:
    """wait_until hands back the first truthy value; a timeout names the condition and the detail."""
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), 2, interval=0.01) == 7
    start = time.monotonic()
    with pytest.raises(WaitTimeout, match=r"after 0.2 s waiting until the moon is up; seen: dark"):
        wait_until(lambda: False, 0.2, what="the moon is up", detail=lambda: "dark")
    assert 0.15 <= time.monotonic() - start < 2
    assert poll_until(lambda: None, 0.05) is None
    assert poll_until(lambda: False, 30, give_up=lambda: True) is None  # gives up at once


def test_stop_process_stops_by_pid_and_escalates() -> None:
    """A child that ignores SIGTERM is killed after the timeout; ProcessSet forgets what it stopped."""
    ignore = ("import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
              "print(1, flush=True); time.sleep(60)")
    procs = ProcessSet()
    proc = procs.add(subprocess.Popen([sys.executable, "-c", ignore], stdout=subprocess.PIPE))
    assert proc.stdout is not None and proc.stdout.readline() == b"1\n"  # handler installed
    start = time.monotonic()
    assert procs.stop(proc, signal.SIGTERM, 0.3) == -signal.SIGKILL
    assert time.monotonic() - start < 5 and procs.procs == []
    close_pipes(proc)
    assert stop_process(proc) == -signal.SIGKILL  # already reaped: no signal to a stale pid


def test_client_helpers_parse_and_build() -> None:
    """whoami answers, Prometheus text and iperf3 argv/JSON are read and written one way."""
    assert parse_peer("late 198.51.100.10:1024\n") == ("198.51.100.10", 1024)
    with pytest.raises(LabError):
        parse_peer("nope")
    text = '# HELP x\nsnatgw_x{b="2",a="1"} 3\nsnatgw_y 1.5\n'
    assert parse_metrics(text) == {'snatgw_x{a="1",b="2"}': 3.0, "snatgw_y": 1.5}
    assert iperf3_client("1.2.3.4", "10.0.0.1", 5201, 3.0, udp_length=64)[-7:] == [
        "-J", "-u", "-l", "64", "-b", "0", "--get-server-output"]
    assert iperf3_json(b'{"end": {}}', "x") == {"end": {}}
    with pytest.raises(LabError, match="iperf3: busy"):
        iperf3_json(b'{"error": "busy"}', "x")
