"""Fixtures for the integration tests: a lab per module and gateways started on demand.

Nothing here skips: missing root or a missing tool is a failure with a clear message,
because a skipped integration suite looks green while proving nothing.

Fixture API
-----------
``lab`` (module)           LabNames of a fresh lab; prefix ``sgt-<module>``; module
                           attributes ``LAB_EXTRA_BACKENDS`` (int) and ``LAB_WHOAMI`` (bool)
                           tune it.  Held under the lab's lock (another session using the
                           same prefix is waited for, up to LAB_LOCK_WAIT s) and torn down
                           by a finalizer even when tests fail.
``lab_extra`` (module)     the extra backend addresses of that lab (tuple of str).
``whoami_log`` (module)    WhoamiLog of the lab (``mark()``, ``records(since)``, ``wait_for``).
``gateway`` (function)     GatewayFactory: ``gateway(toml_text) -> GatewayProc`` waits for
                           gateway_ready (15 s); ``gateway.run_to_exit(toml_text)`` for
                           configs that must be refused.  Every gateway is stopped
                           (SIGTERM, 10 s, then SIGKILL) by the finalizer.
``module_gateway`` (module) same factory, for a gateway shared by a module's tests.
``lab_config`` (session)   the helpers.lab_config builder.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.procs import ProcessSet, close_pipes
from gateway.lab.topology import lab_down, lab_lock, lab_up
from tests.integration import helpers as h

REQUIRED_TOOLS = ("ip", "iptables", "iptables-save", "iperf3", "ping", "tcpdump", "curl", "nc",
                  "sysctl", "ss")

#: How long a module waits for another test session (or a bench) using the same lab prefix.
LAB_LOCK_WAIT = 600.0

_created_prefixes: set[str] = set()


@pytest.fixture(scope="session", autouse=True)
def _preflight() -> Iterator[None]:
    """Fail (never skip) when the suite cannot run; remove every lab it made at the end."""
    problems = []
    if os.geteuid() != 0:
        problems.append("integration tests need root (network namespaces, iptables)")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        problems.append(f"missing tools: {', '.join(missing)} (run `make setup`)")
    if not h.SNATGW.exists():
        problems.append(f"{h.SNATGW} not found (run `make setup`)")
    if problems:
        pytest.fail("; ".join(problems), pytrace=False)
    yield
    # Safety net; each lab's own finalizer has normally done it.  Every lab is tried even
    # if one fails to go away, and the first failure is reported at the end.
    failures = []
    for prefix in sorted(_created_prefixes):
        try:
            lab_down(prefix)
        except Exception as exc:
            failures.append(f"{prefix}: {exc}")
    if failures:
        pytest.fail("labs left behind: " + "; ".join(failures), pytrace=False)


def _module_prefix(request: pytest.FixtureRequest) -> str:
    name = request.module.__name__.rsplit(".", 1)[-1]
    name = re.sub(r"^test_", "", name)
    name = re.sub(r"[^a-z0-9]", "", name.lower())[:10] or "x"
    return f"sgt-{name}"


@pytest.fixture(scope="module")
def lab(request: pytest.FixtureRequest) -> Iterator[LabNames]:
    """A fresh lab for this module (extra backends from the module's LAB_EXTRA_BACKENDS)."""
    prefix = _module_prefix(request)
    extra = t.extra_backend_addresses(int(getattr(request.module, "LAB_EXTRA_BACKENDS", 0)))
    whoami = bool(getattr(request.module, "LAB_WHOAMI", True))
    with lab_lock(prefix, wait=LAB_LOCK_WAIT):
        _created_prefixes.add(prefix)
        names = lab_up(prefix, extra_backends=extra, whoami=whoami)
        try:
            yield names
        finally:
            lab_down(prefix)


@pytest.fixture(scope="module")
def lab_extra(request: pytest.FixtureRequest, lab: LabNames) -> tuple[str, ...]:
    """Extra backend addresses present in this module's lab."""
    return t.extra_backend_addresses(int(getattr(request.module, "LAB_EXTRA_BACKENDS", 0)))


@pytest.fixture(scope="module")
def whoami_log(lab: LabNames) -> h.WhoamiLog:
    """Reader of this module's whoami log (what the internet host received)."""
    return h.WhoamiLog(t.whoami_log_path(lab.prefix))


@pytest.fixture()
def gateway(lab: LabNames, tmp_path: Any) -> Iterator[h.GatewayFactory]:
    """Gateways for one test; each is stopped by its pid when the test ends, pass or fail."""
    factory = h.GatewayFactory(lab, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_gateway(
    lab: LabNames, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[h.GatewayFactory]:
    """Gateways shared by a module's tests; stopped by pid when the module ends."""
    factory = h.GatewayFactory(lab, tmp_path_factory.mktemp("gateway"))
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="session")
def lab_config() -> Callable[..., str]:
    """The config builder (deploy/examples/lab.toml with overrides)."""
    return h.lab_config


@pytest.fixture()
def procs() -> Iterator[ProcessSet]:
    """Processes a test starts in the lab; each is stopped by its pid, also when the test fails."""
    ps = ProcessSet()
    try:
        yield ps
    finally:
        for proc in list(ps.procs):
            ps.stop(proc, timeout=3)
            close_pipes(proc)
