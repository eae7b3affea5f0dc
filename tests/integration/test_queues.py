"""Both queue clients translate: netlink (TCP on its own GSO queue) and netfilterqueue."""

from __future__ import annotations

import hashlib

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

PAYLOAD_MB = 8


def _bulk_transfer(lab: LabNames, src: str) -> tuple[str, str]:
    """Send PAYLOAD_MB of data from ``src`` with nc; return (sha sent, sha the server got)."""
    data = hashlib.sha256(b"seed").digest() * (PAYLOAD_MB * 32768)
    got = clients.nc_transfer(lab.be, src, lab.inet, t.SERVER, 7001, data)
    return hashlib.sha256(data).hexdigest(), got


def test_tcp_uses_the_gso_queue_and_data_arrives_intact(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """With the netlink client (the default) TCP is queued on queue + 1 and 8 MB arrive intact."""
    gateway(h.lab_config(queue=4))
    rules = h.iptables_save(lab)
    assert "-p tcp -j NFQUEUE --queue-num 5" in rules
    assert "-j NFQUEUE --queue-num 4" in rules
    sent, got = _bulk_transfer(lab, t.POOL_MEMBERS[0])
    assert sent == got


def test_netfilterqueue_client_on_one_queue(lab: LabNames, gateway: h.GatewayFactory) -> None:
    """With queue_client = netfilterqueue all traffic uses the one queue and translates intact."""
    gateway(h.lab_config(queue=4, queue_client="netfilterqueue"))
    rules = h.iptables_save(lab)
    assert "--queue-num 5" not in rules
    res = h.curl(lab, t.STANDALONE[0], f"http://{t.SERVER}/")
    assert res.returncode == 0, res.stderr
    assert h.parse_peer(res.stdout.decode())[0] in t.DEFAULT_SNAT
    sent, got = _bulk_transfer(lab, t.POOL_MEMBERS[1])
    assert sent == got
