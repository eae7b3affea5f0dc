"""No private source leaves on the outside at any moment: start, reload, clean stop,
SIGKILL and restart, under a steady 200/s UDP sender (docs/kernel.md, "Guard").

Every test captures on the gateway's outside link for sources in 10.0.0.0/8. The first
test is the control: with ``stopped = "remove"`` and forwarding on (as an operator may
have it), a stopped gateway lets the sender's packets out untranslated and the capture
sees them.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.netns import ns_run, sysctl
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

SENDER_SRC = t.POOL_MEMBERS[0]
LEAK = "ip and src net 10.0.0.0/8"
DELIVERED = f"udp and src host {t.FRONTEND_IP} and dst port {t.WHOAMI_UDP_PORT}"

#: One UDP datagram every 5 ms (200/s) from a backend, for at most 60 s; the socket stays
#: the same, so it is one flow (and one leak if anything goes out untranslated).
SENDER = r"""
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 0))
print(s.getsockname()[1], flush=True)
start = time.monotonic()
n = 0
while time.monotonic() - start < 60:
    try:
        s.sendto(b"tick %d" % n, (sys.argv[2], int(sys.argv[3])))
    except OSError:
        pass
    n += 1
    time.sleep(max(0.0, start + n * 0.005 - time.monotonic()))
"""


def _stopped(mode: str) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["stopped"] = mode

    return mutate


@pytest.fixture()
def sender(lab: LabNames) -> Iterator[subprocess.Popen[bytes]]:
    """The 200/s UDP sender, running for the test (stopped by its pid)."""
    procs = ProcessSet()
    try:
        proc = procs.start(lab.be, [h.PYTHON, "-c", SENDER, SENDER_SRC, t.SERVER, str(t.WHOAMI_UDP_PORT)],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert proc.stdout is not None and proc.stdout.readline().strip().isdigit()
        yield proc
    finally:
        procs.stop_all()


@pytest.fixture()
def operator_forwarding(lab: LabNames) -> Iterator[None]:
    """Forwarding on before snatgw starts (the operator's own setting), off again after."""
    sysctl(lab.gw, {"net.ipv4.ip_forward": 1})
    try:
        yield
    finally:
        sysctl(lab.gw, {"net.ipv4.ip_forward": 0})


def _forwarding(lab: LabNames) -> str:
    return ns_run(lab.gw, ["sysctl", "-n", "net.ipv4.ip_forward"]).stdout.decode().strip()


def _grows(cap: h.Capture, by: int, timeout: float, what: str) -> None:
    """Wait until the capture has ``by`` more packets than now."""
    start = len(cap.current())
    h.wait_until(lambda: len(cap.current()) >= start + by, timeout, what=what)


def test_control_stopped_remove_with_forwarding_on_lets_private_sources_out(
    lab: LabNames, gateway: h.GatewayFactory, operator_forwarding: None,
    sender: subprocess.Popen[bytes],
) -> None:
    """Control: stopped = "remove" takes every rule away and leaves forwarding on as the
    operator had it, so the running sender leaks its private source: the capture sees it."""
    gw = gateway(h.lab_config(mutate=_stopped("remove")))
    with h.Capture(lab.gw, t.GW_OUT_IF, LEAK) as leak:
        assert gw.stop() == 0
        assert "SNATGW" not in h.iptables_save(lab) and _forwarding(lab) == "1"
        h.wait_until(lambda: len(leak.current()) >= 20, 5, what="the sender's private source on out0")
    assert all(h.Capture.ip_source(ln) == SENDER_SRC for ln in leak.lines), leak.lines[:3]


def test_stopped_block_keeps_the_guard_and_a_new_start_replaces_it(
    lab: LabNames, gateway: h.GatewayFactory, operator_forwarding: None,
    sender: subprocess.Popen[bytes],
) -> None:
    """The default stopped = "block": after a clean stop with forwarding on, nothing leaves;
    only the guard rules remain (nothing queued); a new gateway takes over in one step."""
    # Started before the captures: until snatgw runs, the operator's forwarding is theirs.
    gw = gateway(h.lab_config())
    with h.Capture(lab.gw, t.GW_OUT_IF, LEAK) as leak, \
            h.Capture(lab.gw, t.GW_OUT_IF, f"udp and dst port {t.WHOAMI_UDP_PORT}", count=5000) as sent:
        _grows(sent, 20, 5, "translated datagrams")
        assert gw.stop() == 0
        saved = h.iptables_save(lab)
        assert "SNATGW-GUARD -o out0" in saved and "NFQUEUE" not in saved, saved
        assert _forwarding(lab) == "1", "forwarding is left as the operator had it"
        assert h.out_addresses(lab) == {t.OUTSIDE_GW}
        quiet = len(sent.current())
        # 200/s for a second: had anything got past the guard, the capture would show it.
        h.wait_until(lambda: gw.proc.poll() is not None, 5, what="the gateway gone")
        with h.Capture(lab.be, t.BE_IF, f"udp and src host {SENDER_SRC}", count=200) as tried:
            _grows(tried, 150, 5, "the sender still sending")
        assert len(sent.current()) == quiet, "packets left while the gateway was stopped"
        again = gateway(h.lab_config())
        _grows(sent, 20, 5, "translated datagrams after the new start")
        assert again.stop() == 0
    assert leak.lines == [], f"private sources on the outside: {leak.lines[:5]}"
    assert {h.Capture.ip_source(ln) for ln in sent.lines} == {t.FRONTEND_IP}


def test_sigkill_restart_reload_and_stop_under_traffic_leak_nothing(
    lab: LabNames, gateway: h.GatewayFactory, sender: subprocess.Popen[bytes]
) -> None:
    """200/s UDP across start, SIGHUP reload, SIGKILL + start, SIGTERM + start: not one
    datagram with a private source on out0, and traffic resumes after each restart."""
    cfg = h.lab_config()
    with h.Capture(lab.gw, t.GW_OUT_IF, LEAK) as leak, \
            h.Capture(lab.inet, t.INET_IF, DELIVERED, count=20000) as delivered:
        gw = gateway(cfg)
        _grows(delivered, 40, 5, "delivery after the first start")
        gw.reload(cfg, sighup=True)
        h.wait_until(lambda: gw.events("config_reloaded"), 5, what="config_reloaded")
        _grows(delivered, 40, 5, "delivery after a reload")
        for crash in (True, False, True):
            if crash:
                gw.kill()
            else:
                assert gw.stop() == 0
            gw = gateway(cfg)
            _grows(delivered, 40, 5, "delivery after a restart")
        assert gw.stop() == 0
    assert leak.lines == [], f"private sources on the outside: {leak.lines[:5]}"
    assert delivered.lines and {h.Capture.ip_source(ln) for ln in delivered.lines} == {t.FRONTEND_IP}
    print(json.dumps({"delivered": len(delivered.lines), "longest_gaps_s": _gaps(delivered.lines)[:4]}))


def _gaps(lines: list[str]) -> list[float]:
    """The longest pauses between two delivered datagrams (tcpdump's HH:MM:SS.us stamps)."""
    stamps = []
    for ln in lines:
        hh, mm, ss = ln.split()[0].split(":")
        stamps.append(int(hh) * 3600 + int(mm) * 60 + float(ss))
    return sorted((round(b - a, 3) for a, b in zip(stamps, stamps[1:], strict=False)), reverse=True)
