"""Start, stop, crash, restart and refusal: the gateway leaves the host as it found it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PUBLICS = {t.FRONTEND_IP, t.INSTANCE_PUBLIC, *t.DEFAULT_SNAT}


def assert_clean(lab: LabNames) -> None:
    """Nothing queued and no public address left; at most the guard (stopped = "block",
    the default: docs/kernel.md, "Guard") remains."""
    saved = h.iptables_save(lab)
    assert "NFQUEUE" not in saved and "notrack" not in saved, saved
    assert "SNATGW" not in saved or "-A SNATGW-GUARD -o out0" in saved, saved
    assert h.out_addresses(lab) == {t.OUTSIDE_GW}


def assert_fails_closed(lab: LabNames, why: str) -> None:
    """A backend cannot reach the internet, and nothing private appears on out0."""
    with h.Capture(lab.gw, t.GW_OUT_IF, "ip and src net 10.0.0.0/8") as leak:
        res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/", max_time=1.5)
    assert res.returncode != 0, f"{why}: traffic still flows"
    assert leak.lines == [], f"{why}: private sources on the outside: {leak.lines[:5]}"


def test_stop_removes_rules_and_addresses(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """SIGTERM: exit 0, counters logged, nothing queued (only the guard) and no public address
    left, no leak."""
    assert_clean(lab)
    gw = gateway(h.lab_config())
    assert "SNATGW" in h.iptables_save(lab), "the gateway installs its chains"
    assert h.out_addresses(lab) >= PUBLICS
    assert h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/").returncode == 0
    assert gw.stop() == 0
    assert_clean(lab)
    counters = gw.counters()
    assert {"drop_no_flow", "drop_exhausted"} <= counters.keys()
    assert all(isinstance(v, int) for v in counters.values()), counters
    assert sum(counters.values()) > 0, "the curl's packets were counted"
    assert_fails_closed(lab, "after a clean stop")


def test_restart_after_a_crash(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """SIGKILL fails closed (no leak); a new gateway starts over the debris, works, cleans up."""
    cfg = h.lab_config()
    first = gateway(cfg)
    assert h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/").returncode == 0
    first.kill()
    assert_fails_closed(lab, "after SIGKILL")

    second = gateway(cfg)
    res = h.curl(lab, "10.10.1.1", f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr
    assert h.parse_peer(res.stdout.decode())[0] == t.FRONTEND_IP
    assert second.stop() == 0
    assert_clean(lab)
    assert_fails_closed(lab, "after a restart following a crash and a clean stop")


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(cfg: dict[str, Any]) -> None:
        node: Any = cfg
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value

    return mutate


TOO_MANY = [f"10.10.{200 + i // 250}.{i % 250 + 1}" for i in range(1001)]

# (id, config text, every token the one error line must contain, any one of these too)
BAD_CONFIGS: list[tuple[str, str, tuple[str, ...], tuple[str, ...]]] = [
    ("unknown-key", h.lab_config(mutate=_set(("gateway", "bogus_knob"), 1)),
     ("bogus_knob",), ()),
    ("dangling-pool", h.lab_config(mutate=_set(("lb_rules", 0, "pool"), "nope")),
     ("nope",), ("pool",)),
    ("pool-over-1000", h.lab_config(pool_members=TOO_MANY),
     (), ("1000", "1001", "members")),
    ("duplicate-public", h.lab_config(mutate=_set(("instance_ips", 0, "public"), t.FRONTEND_IP)),
     (t.FRONTEND_IP,), ()),
    ("bad-ip", h.lab_config(pool_members=["10.10.1.1", "10.10.1.300"]),
     ("10.10.1.300",), ()),
    ("bad-type", h.lab_config(idle_timeout="soon"), ("idle_timeout",), ()),
    ("bad-protocol", h.lab_config(mutate=_set(("lb_rules", 0, "protocol"), "sctp")),
     (), ("protocol", "sctp")),
    ("not-toml", "[gateway\ninside = in0\n", (), ()),
]


@pytest.mark.parametrize(("text", "must", "any_of"),
                         [pytest.param(*c[1:], id=c[0]) for c in BAD_CONFIGS])
def test_a_bad_config_changes_nothing(
    lab: LabNames, gateway: h.GatewayFactory, text: str, must: tuple[str, ...],
    any_of: tuple[str, ...],
) -> None:
    """Exit 2, one stderr line naming the file and the key, and the namespace untouched."""
    before = h.gw_snapshot(lab)
    res = gateway.run_to_exit(text)
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, f"rc {res.returncode}: {res.stderr[-2000:]}"
    assert len(lines) == 1, f"expected one error line, got: {lines}"
    line = lines[0]
    assert str(res.config_path) in line, line
    for token in must:
        assert token in line, f"{token!r} not in {line!r}"
    if any_of:
        assert any(tok in line for tok in any_of), f"none of {any_of} in {line!r}"
    assert h.gw_snapshot(lab) == before
    assert "NFQUEUE" not in h.iptables_save(lab)
