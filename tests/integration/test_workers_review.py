"""Review of two workers (issue 11): reloads that add an instance IP, move it to a
backend of the other worker and remove it keep the steering on the owner (nothing
re-queued for it) and, with a SIGTERM stop at the end, no private source ever reaches
the far side while backends of both workers send all along.

With two workers 10.10.3.1 is worker 1's and 10.10.3.2 worker 0's (gateway/core/shard.py).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h
from tests.integration.test_workers import owner

pytestmark = pytest.mark.integration

LAB_EXTRA_BACKENDS = 4
NEW_PUBLIC = "198.51.100.21"
#: Anything from the inside's private space seen on the internet side.
PRIVATE_AT_FAR_SIDE = "ip and src net 10.0.0.0/8"


def _with_instance(extra: tuple[str, ...], private: str | None) -> str:
    """The two-worker config, plus an instance IP ``private`` -> NEW_PUBLIC when given."""

    def add(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["workers"] = 2
        if private is not None:
            cfg["instance_ips"] = [*cfg["instance_ips"], {"private": private, "public": NEW_PUBLIC}]

    return h.lab_config(extra_members=extra[:2], mutate=add)


@contextmanager
def _pings(lab: LabNames, sources: tuple[str, ...], seconds: int) -> Iterator[None]:
    """A steady ping (20 a second, bounded by ``-w``) from each of ``sources`` to the server."""
    procs = ProcessSet()
    try:
        for src in sources:
            procs.start(lab.be, ["ping", "-q", "-I", src, "-i", "0.05", "-w", str(seconds), t.SERVER],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        yield
    finally:
        procs.stop_all()


def _source(lab: LabNames, src: str) -> str:
    res = h.curl(lab, src, f"http://{t.SERVER}/", max_time=5)
    assert res.returncode == 0, res.stderr.decode()
    return h.parse_peer(res.stdout.decode())[0]


def _reload(g: h.GatewayProc, text: str) -> None:
    res = g.reload(text)
    assert res is not None
    assert res.returncode == 0, res.stderr.decode()


def _requeued(g: h.GatewayProc) -> int:
    return int(g.ask("stats")["counters"].get("requeued", 0))


def test_instance_ip_added_moved_and_removed_by_reload_stays_with_its_owner(
    lab: LabNames, lab_extra: tuple[str, ...], gateway: h.GatewayFactory
) -> None:
    """Reloads add an instance IP for a worker-1 backend, move it to a worker-0 backend and
    remove it: each time the backend leaves with the right address and its return traffic
    is steered straight to its owner (requeued does not grow); pings from backends of both
    workers run throughout, a SIGTERM stop ends it, and no private source reaches the far side."""
    a, b = t.STANDALONE  # worker 1, worker 0
    assert (owner(a), owner(b)) == (1, 0)
    g = gateway(_with_instance(lab_extra, None), ready_timeout=60)
    senders = (t.POOL_MEMBERS[0], t.POOL_MEMBERS[1], a, b, t.INSTANCE_BACKEND)
    with h.Capture(lab.inet, t.INET_IF, PRIVATE_AT_FAR_SIDE) as cap, _pings(lab, senders, 60):
        assert _source(lab, a) in t.DEFAULT_SNAT
        for private, others in ((a, b), (b, a)):
            _reload(g, _with_instance(lab_extra, private))
            before = _requeued(g)
            for _ in range(3):
                assert _source(lab, private) == NEW_PUBLIC
            assert _source(lab, others) in t.DEFAULT_SNAT
            assert _requeued(g) == before, "return traffic to the instance IP went to another worker"
            flows = [f for f in g.ask("flows") if f["backend"] == private and f["public_ip"] == NEW_PUBLIC]
            assert flows and all(f["worker"] == owner(private) for f in flows), flows
        _reload(g, _with_instance(lab_extra, None))
        assert NEW_PUBLIC not in h.out_addresses(lab)
        assert _source(lab, b) in t.DEFAULT_SNAT
        assert g.stop() == 0
        rules = h.iptables_save(lab)
        assert "NFQUEUE" not in rules and "SNATGW-GUARD" in rules, rules
        assert h.curl(lab, a, f"http://{t.SERVER}/", max_time=2).returncode != 0
    assert cap.lines == [], f"private sources at the far side: {cap.lines[:10]}"
