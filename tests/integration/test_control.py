"""The control socket under load and across users (issue 9, item 6): idle clients do not
delay `snatgw status`, a connection limit refuses extras with an error line, read-only
commands can be opened to a group while `reload` stays root-only (SO_PEERCRED)."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from typing import Any

import pytest

from gateway.lab.clients import idle_unix_clients, read_until_closed
from gateway.lab.gatewayproc import snatgw_argv
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

LAB_WHOAMI = False
IDLE = 100
NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]



def _closed_with(s: socket.socket) -> dict[str, Any]:
    """Everything the server sent before closing ``s``, as the one JSON line it must be."""
    reply: dict[str, Any] = json.loads(read_until_closed(s))
    return reply


def _with_gateway_keys(**keys: Any) -> str:
    return h.lab_config(mutate=lambda cfg: cfg["gateway"].update(keys))


def test_100_idle_clients_do_not_delay_status_and_are_closed_by_their_deadline(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """With 100 idle connections open, `snatgw status` answers; each idle one is closed with an error."""
    gw = gateway(h.lab_config())
    with idle_unix_clients(gw.socket, IDLE) as socks:
        began = time.monotonic()
        res = gw.cli("status", "--json", timeout=30)
        took = time.monotonic() - began
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        assert took < 5.0, f"status took {took:.1f} s with {IDLE} idle clients"
        st = json.loads(res.stdout)
        assert st["control"]["clients"] >= IDLE, st["control"]
        for s in socks:
            reply = _closed_with(s)
            assert reply["ok"] is False and "no request within" in reply["error"], reply
    control = h.wait_until(lambda: (c := gw.ask("status")["control"])["timed_out"] >= IDLE and c,
                           10, what="the idle clients are counted as timed out")
    assert control["refused"] == 0, control


def test_connections_over_the_limit_are_refused_at_once_with_an_error_line(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """control_max_clients = 10: the 11th connection gets 'too many control connections' and is counted."""
    gw = gateway(_with_gateway_keys(control_max_clients=10))
    with idle_unix_clients(gw.socket, 10):
        res = gw.cli("stats", timeout=30)
        assert res.returncode == 1, (res.returncode, res.stdout)
        assert "too many control connections (limit 10)" in res.stderr.decode(errors="replace")
    st = h.wait_until(lambda: (s := gw.ask("status"))["control"]["clients"] <= 1 and s, 10,
                      what="the idle clients are gone")
    assert st["control"]["refused"] == 1 and st["control"]["max_clients"] == 10, st["control"]


def test_a_group_may_read_but_only_root_may_reload(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """control_group = nogroup: uid nobody runs `snatgw status` but its `reload` is refused; root reloads."""
    gw = gateway(h.lab_config(control_group="nogroup"))
    st = os.stat(gw.socket)
    assert stat.S_IMODE(st.st_mode) == 0o660, oct(st.st_mode)
    argv = [*NOBODY, *snatgw_argv()]
    res = ns_run(lab.gw, [*argv, "status", "--json", "--socket", gw.socket], timeout=30, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert json.loads(res.stdout)["config"] == str(gw.config_path)
    res = ns_run(lab.gw, [*argv, "reload", "--socket", gw.socket], timeout=30, check=False)
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 1, (res.returncode, err)
    assert "reload changes the gateway and needs root; this client runs as uid 65534" in err, err
    assert not gw.events("config_reloaded"), "a refused reload must not run"
    res = gw.cli("reload")
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert gw.wait_event("config_reloaded", 5) is not None
    assert gw.ask("status")["control"]["denied"] == 1


def test_without_the_group_other_users_cannot_connect_and_control_mode_sets_the_bits(
    lab: LabNames, gateway: h.GatewayFactory
) -> None:
    """Default 0600: nobody cannot even connect; control_mode = "0666" opens reads to everyone."""
    gw = gateway(h.lab_config())
    argv = [*NOBODY, *snatgw_argv(), "status", "--socket", gw.socket]
    res = ns_run(lab.gw, argv, timeout=30, check=False)
    assert res.returncode == 1 and "cannot reach the gateway" in res.stderr.decode(errors="replace"), res
    assert gw.stop() == 0

    gw = gateway(_with_gateway_keys(control_mode="0666"))
    assert stat.S_IMODE(os.stat(gw.socket).st_mode) == 0o666
    argv = [*NOBODY, *snatgw_argv(), "stats", "--json", "--socket", gw.socket]
    res = ns_run(lab.gw, argv, timeout=30, check=False)
    assert res.returncode == 0, res.stderr.decode(errors="replace")
    assert "counters" in json.loads(res.stdout)
