"""A public address is never local to the gateway host while no rule queues it: at
start it joins the outside interface after the rules, at stop it leaves before the
guard replaces them, at a reload a new one joins after the swap (docs/kernel.md,
"Guard"). In such a moment the host's own services would answer on it.

A watcher in the gateway's namespace samples (address present, queue rule present,
address present) as fast as it can while gateways start, reload and stop; a sample
with the address there on both sides of a rule reading without the rule is a moment
the order got wrong.
"""

from __future__ import annotations

import json
import subprocess
from typing import Any

import pytest

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

LAB_WHOAMI = False
#: A default SNAT address the reload adds.
ADDED = "198.51.100.32"

WATCHER = r"""
import json, subprocess, sys, time
from pyroute2 import IPRoute
pubs = sys.argv[1].split(","); end = time.monotonic() + float(sys.argv[2])
ipr = IPRoute()
idx = ipr.link_lookup(ifname=sys.argv[3])[0]
def local():
    return {a.get_attr("IFA_ADDRESS") for a in ipr.get_addr(index=idx)}
samples, bad = 0, []
print("ready", flush=True)
while time.monotonic() < end:
    a1 = local()
    rules = subprocess.run(["iptables-save", "-t", "mangle"], capture_output=True, text=True).stdout
    a2 = local()
    samples += 1
    for p in pubs:
        if p in a1 and p in a2 and f"-d {p}/32" not in rules:
            bad.append(p)
print(json.dumps({"samples": samples, "bad": bad}), flush=True)
"""


def _with_added(cfg: dict[str, Any]) -> None:
    cfg["default_snat"]["ips"] = [*t.DEFAULT_SNAT, ADDED]


def test_a_public_address_is_never_local_while_nothing_queues_it(
    lab: LabNames, gateway: h.GatewayFactory, procs: ProcessSet
) -> None:
    """Three starts, a reload that adds an address and three stops, watched: no sample
    shows a public address on out0 while the mangle table has no rule queueing it."""
    pubs = [t.FRONTEND_IP, t.INSTANCE_PUBLIC, *t.DEFAULT_SNAT, ADDED]
    watcher = procs.start(
        lab.gw, [h.PYTHON, "-c", WATCHER, ",".join(pubs), "12", t.GW_OUT_IF],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert watcher.stdout is not None and watcher.stdout.readline().strip() == b"ready"
    for i in range(3):
        gw = gateway(h.lab_config())
        if i == 1:
            done = gw.reload(h.lab_config(mutate=_with_added))  # `snatgw reload`: answers when applied
            assert done is not None and done.returncode == 0, done
            assert ADDED in h.out_addresses(lab)
        assert gw.stop() == 0
        assert h.out_addresses(lab) == {t.OUTSIDE_GW}
    out, err = watcher.communicate(timeout=30)
    result = json.loads(out.decode().strip().splitlines()[-1])
    assert result["samples"] >= 100, (result, err.decode()[-500:])
    assert result["bad"] == [], f"public addresses local while nothing queued them: {result}"
