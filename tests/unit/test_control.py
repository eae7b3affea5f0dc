"""The control socket serves clients concurrently, with per-client deadlines, a
connection limit and root-only changes (gateway/adapters/control.py)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.adapters import control
from gateway.adapters.control import ControlServer, RequestError, request, socket_mode
from gateway.lab.clients import idle_unix_clients, read_until_closed
from gateway.lab.procs import wait_until


def _handler(req: dict[str, Any]) -> Any:
    if req["command"] == "boom":
        raise RequestError("refused")
    return {"echo": req["command"]}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    srv = ControlServer(str(tmp_path / "c.sock"), _handler, max_clients=20, request_timeout=2.0)
    srv.start()
    try:
        yield srv
    finally:
        srv.close()


def _clients(server: ControlServer, n: int) -> None:
    wait_until(lambda: server.stats()["clients"] == n, 5, what=f"{n} open control clients",
               detail=server.stats)


def test_idle_clients_do_not_delay_a_request_and_are_closed_by_their_deadline(
    server: ControlServer,
) -> None:
    """15 idle clients are open, yet a request is answered at once; each idle one is told and closed."""
    with idle_unix_clients(server.path, 15, timeout=5) as idle:
        _clients(server, 15)
        began = time.monotonic()
        assert request(server.path, "status", timeout=3) == {"echo": "status"}
        assert time.monotonic() - began < 1.5, "the answer must not wait for the idle clients' deadline"
        for s in idle:
            reply = json.loads(read_until_closed(s))
            assert reply["ok"] is False and "no request within" in reply["error"], reply
        _clients(server, 0)
        assert server.stats()["timed_out"] == 15


def test_connections_over_the_limit_get_an_error_line_and_are_counted(server: ControlServer) -> None:
    """With 20 open, the 21st is answered with 'too many control connections' and closed at once."""
    with idle_unix_clients(server.path, 20, timeout=5):
        _clients(server, 20)
        with pytest.raises(RequestError, match="too many control connections"):
            request(server.path, "status", timeout=0.4)
        assert server.stats()["refused"] == 1
    _clients(server, 0)
    assert request(server.path, "stats") == {"echo": "stats"}


def test_reload_is_refused_to_a_non_root_peer(server: ControlServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer whose SO_PEERCRED uid is not 0 may read but not reload; root may reload."""
    assert request(server.path, "reload") == {"echo": "reload"}
    monkeypatch.setattr(control, "peer_uid", lambda conn: 65534)
    assert request(server.path, "flows") == {"echo": "flows"}
    with pytest.raises(RequestError, match="reload changes the gateway and needs root.*uid 65534"):
        request(server.path, "reload")
    assert server.stats()["denied"] == 1


def test_bad_requests_and_handler_errors_are_answered_not_fatal(server: ControlServer) -> None:
    """Garbage, a refused command and a half-sent request get an error line; the server goes on."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        s.sendall(b"not json\n")
        assert json.loads(read_until_closed(s))["ok"] is False
    with pytest.raises(RequestError, match="refused"):
        request(server.path, "boom")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(server.path)
        s.sendall(b'{"command": "st')
        s.shutdown(socket.SHUT_WR)
        assert json.loads(read_until_closed(s))["ok"] is False
    assert request(server.path, "status") == {"echo": "status"}


def test_socket_mode_follows_group_and_mode(tmp_path: Path) -> None:
    """0600 by default, 0660 with a group, and control_mode when it is set."""
    assert socket_mode(None, None) == 0o600
    assert socket_mode("snatgw", None) == 0o660
    assert socket_mode(None, 0o666) == 0o666
    srv = ControlServer(str(tmp_path / "m.sock"), _handler, mode=0o640)
    try:
        assert stat.S_IMODE(os.stat(srv.path).st_mode) == 0o640
    finally:
        srv.close()
    assert not (tmp_path / "m.sock").exists()


def _cfg(extra: str) -> str:
    return f'[gateway]\ninside = "in0"\noutside = "out0"\n{extra}\n'


def test_config_takes_control_mode_max_clients_and_log_flows_and_refuses_bad_values() -> None:
    """control_mode (text or TOML octal), control_max_clients and log_flows parse; bad ones name their key."""
    from gateway.config import ConfigError, parse

    cfg = parse(_cfg('control_mode = "0660"\ncontrol_max_clients = 10\nlog_flows = true'), "x.toml")
    assert (cfg.control_mode, cfg.control_max_clients, cfg.model.log_flows) == (0o660, 10, True)
    assert parse(_cfg("control_mode = 0o666"), "x.toml").control_mode == 0o666
    default = parse(_cfg(""), "x.toml")
    assert (default.control_mode, default.control_max_clients, default.model.log_flows) == (None, 256, False)
    for bad, key in (('control_mode = "0460"', "control_mode"), ('control_mode = "rw"', "control_mode"),
                     ("control_mode = 0o1777", "control_mode"),
                     ("control_max_clients = 0", "control_max_clients"),
                     ('log_flows = "yes"', "log_flows")):  # fmt: skip
        with pytest.raises(ConfigError) as e:
            parse(_cfg(bad), "x.toml")
        assert e.value.key == f"gateway.{key}", bad
    assert default.restart_keys(parse(_cfg('control_mode = "0600"'), "x.toml")) == ["gateway.control_mode"]
