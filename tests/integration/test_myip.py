"""Finding one's public address the article's way: ``nslookup myip.opendns.com <resolver>``
from a backend prints the address the gateway gives it (issue 10, "myip over DNS").

The lab's DNS responder (gateway.lab.dns) in the internet namespace answers with the
query's source; nslookup runs as the backend's uid, which the lab routes from that backend
address.  Each test also checks the responder's log: what the far side saw.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest

from gateway.lab import clients
from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from tests.integration import helpers as h

pytestmark = pytest.mark.integration

#: Backend -> the public addresses it may leave with on deploy/examples/lab.toml.
EXPECTED = {
    t.POOL_MEMBERS[0]: {t.FRONTEND_IP},  # scenario 2: pool web behind frontend fe-web
    t.POOL_MEMBERS[2]: {t.FRONTEND_IP},
    t.INSTANCE_BACKEND: {t.INSTANCE_PUBLIC},  # scenario 1: its instance public IP
    t.STANDALONE[0]: set(t.DEFAULT_SNAT),  # scenario 3: default SNAT
    t.STANDALONE[1]: set(t.DEFAULT_SNAT),
}


@pytest.fixture(scope="module")
def gw(module_gateway: h.GatewayFactory) -> Iterator[h.GatewayProc]:
    assert shutil.which("nslookup"), "nslookup missing (bind9-dnsutils; run `make setup`)"
    assert shutil.which("setpriv"), "setpriv missing (util-linux)"
    proc = module_gateway(h.lab_config())
    yield proc
    assert proc.stop() == 0, proc.log_text()[-3000:]


@pytest.fixture(scope="module")
def dns_log(lab: LabNames) -> h.WhoamiLog:
    """The responder's JSON-lines log (one record per answered query)."""
    return h.WhoamiLog(t.dns_log_path(lab.prefix))


def _myip(lab: LabNames, src: str, *options: str) -> str:
    res = clients.nslookup(lab.be, src, t.SERVER, options=options)
    out = res.stdout.decode()
    assert res.returncode == 0, (src, out, res.stderr.decode())
    found = clients.nslookup_addresses(out)
    assert len(found) == 1, (src, out)
    return found[0]


@pytest.mark.parametrize("src", list(EXPECTED))
def test_nslookup_myip_prints_the_backends_public_address(
    lab: LabNames, gw: h.GatewayProc, dns_log: h.WhoamiLog, src: str
) -> None:
    """Each scenario's backend is told the public address the resolver saw its query come from."""
    mark = dns_log.mark()
    public = _myip(lab, src)
    assert public in EXPECTED[src], (src, public)
    recs = dns_log.wait_for(lambda r: any(x["type"] == "A" for x in r), mark)
    a_queries = [r for r in recs if r["type"] == "A"]
    assert [(r["src"], r["answer"], r["dst"], r["dport"]) for r in a_queries] == [
        (public, public, t.SERVER, t.DNS_PORT)
    ], recs
    assert not any(r["src"].startswith("10.") for r in recs), recs


def test_nslookup_over_tcp_gives_the_same_address(
    lab: LabNames, gw: h.GatewayProc, dns_log: h.WhoamiLog
) -> None:
    """nslookup -vc (DNS over TCP, RFC 7766) through the gateway answers the same address."""
    mark = dns_log.mark()
    assert _myip(lab, t.INSTANCE_BACKEND, "-vc") == t.INSTANCE_PUBLIC
    recs = dns_log.wait_for(lambda r: any(x["type"] == "A" for x in r), mark)
    assert {(r["proto"], r["src"]) for r in recs if r["type"] == "A"} == {("tcp", t.INSTANCE_PUBLIC)}


def test_the_responder_is_no_resolver(lab: LabNames, gw: h.GatewayProc) -> None:
    """Any other name is refused: the lab's DNS answers only the myip question."""
    res = clients.nslookup(lab.be, t.STANDALONE[0], t.SERVER, "example.com")
    assert res.returncode != 0
    assert "REFUSED" in res.stdout.decode(), res.stdout.decode()
