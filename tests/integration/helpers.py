"""The integration tests' own pieces: the config builder, the pytest face of the gateway
launcher, and snapshots of the gateway namespace.

Processes, waiting, clients, captures and the gateway process live in ``gateway.lab`` (one
set shared with scripts/bench.py); they are imported here so that a test reads
``h.curl``, ``h.probe``, ``h.wait_until``.  Everything is bounded in time and count, and
every process is stopped by its own pid (never by name).  Tests assert on what the far
side received (the whoami log, a capture in the internet namespace), not on what the
gateway says it did.
"""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.capture import Capture
from gateway.lab.clients import ProbeProc, WhoamiLog, parse_peer, ping, probe, wait_listening
from gateway.lab.configtext import to_toml
from gateway.lab.gatewayproc import (
    SNATGW,
    GatewayError,
    GatewayLauncher,
    GatewayProc,
    RunResult,
    parse_metrics,
)
from gateway.lab.layout import LabNames
from gateway.lab.netns import ipv4_addresses, ns_run
from gateway.lab.procs import WaitTimeout, poll_until, stop_process, wait_until
from gateway.lab.topology import kernel_nat

REPO = Path(__file__).resolve().parents[2]
LAB_TOML = REPO / "deploy" / "examples" / "lab.toml"
PYTHON = sys.executable

# --------------------------------------------------------------------------- config


_GATEWAY_KEYS = (
    "inside", "outside", "queue", "idle_timeout", "tcp_fin_linger", "tcp_rst_linger", "queue_client",
    "high_water", "control_group", "exhaustion_event_interval", "metrics",
)
_SECTION_KEYS = ("frontends", "pools", "lb_rules", "instance_ips")


def lab_config_dict() -> dict[str, Any]:
    """deploy/examples/lab.toml as a dict: the single source of the lab's gateway config."""
    with LAB_TOML.open("rb") as fh:
        return tomllib.load(fh)


def lab_config(
    *,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> str:
    """TOML text equal to deploy/examples/lab.toml with ``overrides`` applied.

    Accepted overrides: any ``[gateway]`` key (inside, outside, queue, idle_timeout,
    tcp_fin_linger, tcp_rst_linger); ``pool_members`` (replaces pool "web"'s members);
    ``extra_members`` (appended to them); ``default_snat_ips``; and whole sections
    ``frontends``, ``pools``, ``lb_rules``, ``instance_ips`` (lists of tables).
    ``mutate`` gets the dict last, for anything else (used to build bad configs).
    """
    cfg = lab_config_dict()
    for key, value in overrides.items():
        if key in _GATEWAY_KEYS:
            cfg["gateway"][key] = value
        elif key == "pool_members":
            cfg["pools"][0]["members"] = list(value)
        elif key == "extra_members":
            cfg["pools"][0]["members"] = [*cfg["pools"][0]["members"], *value]
        elif key == "default_snat_ips":
            cfg["default_snat"]["ips"] = list(value)
        elif key in _SECTION_KEYS:
            cfg[key] = [dict(x) for x in value]
        else:
            raise TypeError(f"lab_config: unknown override {key!r}")
    if mutate is not None:
        mutate(cfg)
    return to_toml(cfg)


# --------------------------------------------------------------------------- gateway


class GatewayFactory(GatewayLauncher):
    """``gateway(config_toml_text) -> GatewayProc`` for the lab's gateway namespace.

    A gateway that does not become ready, or that runs on a config it had to refuse,
    fails the test with the gateway's own log instead of a traceback into the launcher.
    """

    def __init__(self, lab: LabNames, workdir: Path) -> None:
        super().__init__(lab.gw, workdir)
        self.lab = lab

    def start(
        self, config_text: str, *, wait_ready: bool = True, args: Sequence[str] = (),
        ready_timeout: float = 15.0,
    ) -> GatewayProc:
        try:
            return super().start(config_text, wait_ready=wait_ready, args=args,
                                 ready_timeout=ready_timeout)
        except GatewayError as exc:
            pytest.fail(str(exc), pytrace=False)

    __call__ = start

    def run_to_exit(self, config_text: str, timeout: float = 15.0) -> RunResult:
        try:
            return super().run_to_exit(config_text, timeout)
        except GatewayError as exc:
            pytest.fail(str(exc), pytrace=False)


# --------------------------------------------------------------------------- gateway ns state


def gw_snapshot(lab: LabNames) -> dict[str, str]:
    """What the gateway may change in its namespace, normalised for comparison."""
    rules = iptables_save(lab)
    rules = "\n".join(
        re.sub(r"\[\d+:\d+\]", "", ln) for ln in rules.splitlines() if not ln.startswith("#")
    )
    addrs = ns_run(lab.gw, ["ip", "-4", "-o", "addr", "show"], timeout=10).stdout.decode()
    addrs = "\n".join(sorted(re.sub(r"\s+", " ", ln).strip() for ln in addrs.splitlines()))
    fwd = ns_run(lab.gw, ["sysctl", "-n", "net.ipv4.ip_forward"], timeout=10).stdout.decode()
    return {"iptables": rules, "addresses": addrs, "ip_forward": fwd.strip()}


def out_addresses(lab: LabNames) -> set[str]:
    """The addresses on the gateway's outside interface (the lab's own plus snatgw's)."""
    return ipv4_addresses(lab.gw, t.GW_OUT_IF)


def iptables_save(lab: LabNames) -> str:
    return ns_run(lab.gw, ["iptables-save"], timeout=15).stdout.decode()


# --------------------------------------------------------------------------- traffic


def curl(
    lab: LabNames, src: str, url: str, *, max_time: float = 5, extra: Sequence[str] = ()
) -> subprocess.CompletedProcess[bytes]:
    """curl from backend address ``src`` (never raises; callers assert on returncode)."""
    return clients.curl(lab.be, src, url, max_time=max_time, extra=extra)


def kernel_masquerade(lab: LabNames) -> contextlib.AbstractContextManager[None]:
    """The kernel's own NAT in the gateway namespace; only for the lab's self-test."""
    return kernel_nat(lab, ["-j", "MASQUERADE"])


def kernel_forwarding(lab: LabNames) -> contextlib.AbstractContextManager[None]:
    """Forwarding without any NAT: private sources leave as they are (lab self-test only)."""
    return kernel_nat(lab)


def in_block(port: int, start: int, size: int) -> bool:
    return start <= port < start + size


__all__ = [
    "PYTHON",
    "SNATGW",
    "Capture",
    "GatewayFactory",
    "GatewayProc",
    "ProbeProc",
    "RunResult",
    "WaitTimeout",
    "WhoamiLog",
    "curl",
    "gw_snapshot",
    "in_block",
    "iptables_save",
    "kernel_forwarding",
    "kernel_masquerade",
    "lab_config",
    "lab_config_dict",
    "out_addresses",
    "parse_metrics",
    "parse_peer",
    "ping",
    "poll_until",
    "probe",
    "stop_process",
    "to_toml",
    "wait_listening",
    "wait_until",
]
