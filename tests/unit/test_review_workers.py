"""Review of the workers design (issue 11): the steering rules iptables.py renders,
evaluated rule by rule by a small interpreter on real packet bytes, send every packet
where the core's ownership functions (gateway.core.shard) and the test_shard harness say;
and the gateway of N tables stays one gateway when driven through those rendered rules."""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import shlex
import threading
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import pytest
import structlog
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway import merge
from gateway.adapters import hostside, supervisor
from gateway.adapters.control import RequestError
from gateway.adapters.iptables import ruleset
from gateway.adapters.kernel import Mark
from gateway.adapters.supervisor import Supervisor
from gateway.adapters.workerpool import WorkerHandle, WorkerPool
from gateway.config import load
from gateway.core import persist, restore, views
from gateway.core.address import ip_str
from gateway.core.model import PROTO_ICMP, PROTO_TCP, PROTO_UDP, Timeouts
from gateway.core.shard import Shard, backend_owner, port_owner, slice_ports
from gateway.core.table import TranslationTable
from gateway.core.verdict import Verdict
from tests.unit.conftest import DEFAULTS as LAB_DEFAULTS
from tests.unit.conftest import INSTANCE, POOL, SERVER, STANDALONE, echo, ip, lab_model, tcp, udp
from tests.unit.test_shard import BACKENDS, DEFAULTS, FE_API, FE_WEB, INST_PUBLIC, Gateway, reply_to
from tests.unit.test_shard_paths import icmp_error

LAB = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "lab.toml"
IN, OUT, QUEUE = "in0", "out0", 10
COUNTS = (2, 3, 4, 16)


def _u32(expr: str, pkt: bytes) -> bool:
    """One ``-m u32 --u32`` test (xt_u32 semantics: read a word, shift/mask, ``@`` moves
    the base to the value so far), with ``v1,v2`` and ``lo:hi`` value lists."""
    loc, _, values = expr.partition("=")
    base, val = 0, 0
    for k, part in enumerate(loc.split("@")):
        if k:
            base += val
        tokens = re.findall(r"(>>|<<|&|^)(0x[0-9a-fA-F]+|\d+)", part)
        first = int(tokens[0][1], 0)
        if base + first + 4 > len(pkt):
            return False
        val = int.from_bytes(pkt[base + first : base + first + 4], "big")
        for op, num in tokens[1:]:
            n = int(num, 0)
            val = val >> n if op == ">>" else (val << n) & 0xFFFFFFFF if op == "<<" else val & n
    for item in values.split(","):
        lo, _, hi = item.partition(":")
        if int(lo, 0) <= val <= int(hi or lo, 0):
            return True
    return False


@dataclass
class Pkt:
    """A packet at a mangle hook: its bytes, interfaces and mark."""

    data: bytes
    iif: str | None
    oif: str | None
    mark: int = 0
    local_dst: bool = False


def _match(opts: list[str], p: Pkt) -> bool:
    d = p.data
    ihl = (d[0] & 15) * 4
    proto = d[9]
    i = 0
    neg = False
    while i < len(opts):
        o = opts[i]
        if o == "!":
            neg = True
            i += 1
            continue
        ok = True
        if o == "-i":
            ok, i = p.iif == opts[i + 1], i + 2
        elif o == "-o":
            ok, i = p.oif == opts[i + 1], i + 2
        elif o in ("-d", "-s"):
            addr = d[16:20] if o == "-d" else d[12:16]
            ok, i = addr == ip(opts[i + 1].split("/")[0]).to_bytes(4, "big"), i + 2
        elif o == "-p":
            ok, i = proto == {"tcp": PROTO_TCP, "udp": PROTO_UDP, "icmp": PROTO_ICMP}[opts[i + 1]], i + 2
        elif o == "-m":
            i += 2
        elif o == "--dport":
            lo, _, hi = opts[i + 1].partition(":")
            dport = int.from_bytes(d[ihl + 2 : ihl + 4], "big")
            ok, i = int(lo) <= dport <= int(hi or lo), i + 2
        elif o == "--icmp-type":
            ok, i = d[ihl] == int(opts[i + 1]), i + 2
        elif o == "--mark":
            v, m = (int(x, 0) for x in opts[i + 1].split("/"))
            ok, i = p.mark & m == v, i + 2
        elif o == "--u32":
            ok, i = _u32(opts[i + 1], d), i + 2
        elif o == "--dst-type":
            ok, i = p.local_dst == (opts[i + 1] == "LOCAL"), i + 2
        elif o == "--syn":
            ok, i = d[ihl + 13] & 0x17 == 0x02, i + 1
        else:
            raise AssertionError(f"the interpreter does not know {o}")
        if ok == neg:
            return False
        neg = False
    return True


@functools.cache
def _chains(text: str) -> dict[str, list[list[str]]]:
    mangle = text.split("*mangle\n", 1)[1].split("COMMIT", 1)[0]
    chains: dict[str, list[list[str]]] = {}
    for line in mangle.splitlines():
        if line.startswith("-A "):
            parts = shlex.split(line)
            chains.setdefault(parts[1], []).append(parts[2:])
    return chains


def run_mangle(text: str, chain: str, p: Pkt) -> int | None:
    """The queue number the mangle rules of ``text`` send ``p`` to from ``chain`` (None:
    the chain ends, or DROP: -1), marks applied as it goes."""
    chains = _chains(text)

    def walk(name: str) -> int | None:
        for r in chains.get(name, []):
            j = r.index("-j")
            if not _match(r[:j], p):
                continue
            target = r[j + 1]
            if target == "NFQUEUE":
                return int(r[j + 3])
            if target == "MARK":
                v, m = (int(x, 0) for x in r[j + 3].split("/"))
                p.mark = (p.mark & ~m) ^ v
                continue
            if target == "DROP":
                return -1
            if target == "RETURN":
                return None
            got = walk(target)
            if got is not None:
                return got
        return None

    return walk(chain)


def render(n: int, owners: dict[int, int]) -> str:
    pubs = [ip(FE_WEB), ip(FE_API), ip(INST_PUBLIC), *(ip(d) for d in DEFAULTS)]
    return ruleset(IN, OUT, QUEUE, pubs, QUEUE + 1, workers=n, owners=owners, probes=True)


def worker_of(queue: int | None, proto: int) -> int:
    """Worker of a queue; a TCP packet must be on the TCP queue, the rest on the plain one."""
    assert queue is not None and queue >= QUEUE, f"not queued ({queue})"
    k, tcp_q = divmod(queue - QUEUE, 2)
    assert tcp_q == (proto == PROTO_TCP), "wrong queue kind"
    return k


def kernel_steer(text: str, way: str, pkt: bytearray) -> int:
    """The worker the rendered rules send ``pkt`` to on path ``way``."""
    d = bytes(pkt)
    if way == "in2out":
        # mangle PREROUTING marks it INSIDE (forwarded, not local), POSTROUTING queues it.
        p = Pkt(d, IN, None, local_dst=False)
        assert run_mangle(text, "SNATGW-PRE", p) is None
        p.iif, p.oif = None, OUT
        q = run_mangle(text, "SNATGW-POST", p)
    elif way == "hairpin":
        p = Pkt(d, IN, None, local_dst=True)
        q = run_mangle(text, "SNATGW-PRE", p)
        assert p.mark & Mark.HAIRPIN
    elif way == "local_out":
        q = run_mangle(text, "SNATGW-OUT", Pkt(d, None, OUT if d[9] == PROTO_ICMP else IN))
    else:
        q = run_mangle(text, "SNATGW-PRE", Pkt(d, OUT, None, local_dst=True))
    return worker_of(q, d[9])


class RenderedGateway(Gateway):
    """The test_shard gateway with the kernel's steering read off the rendered rules."""

    def __post_init__(self) -> None:
        super().__post_init__()
        owners = {a: backend_owner(b, self.n) for a, b in self.instances.items()}
        self.text = render(self.n, owners)

    def steer(self, way: str, pkt: bytearray) -> int:
        got = kernel_steer(self.text, way, pkt)
        assert got == super().steer(way, pkt), "the rendered rules and the harness disagree"
        return got


def _remotes(rng: Random, k: int) -> list[str]:
    return [f"203.0.113.{rng.randrange(1, 255)}" for _ in range(k)]


@pytest.mark.parametrize("n", COUNTS)
def test_rendered_rules_send_every_packet_to_the_owner_functions(n: int) -> None:
    """Rendered rules, interpreted: in2out and hairpin by backend_owner(src), TCP/UDP and
    echo replies to a PAT address by port_owner, other ports/errors by the remote's low bits,
    the instance IP whole to its backend's owner, host errors and probe SYNs to worker 0."""
    g = RenderedGateway(n)
    text = g.text
    inst_owner = backend_owner(g.instances[ip(INST_PUBLIC)], n)
    rng = Random(n)
    for src in [f"10.10.{a}.{b}" for a in (1, 3) for b in range(0, 40)]:
        for mk in (lambda s, d: tcp(s, d, 40000, 443), lambda s, d: udp(s, d, 5000, 53),
                   lambda s, d: echo(s, d, 77)):  # fmt: skip
            assert kernel_steer(text, "in2out", mk(src, "192.0.2.9")) == backend_owner(ip(src), n)
            assert kernel_steer(text, "hairpin", mk(src, FE_WEB)) == backend_owner(ip(src), n)
    edges = [p for i in range(n) for lo, hi in [slice_ports(i, n)] for p in (lo - 1, lo, hi, hi + 1)]
    ports = sorted({0, 1, 80, 1023, *range(1024, 65536, 2039), *(p for p in edges if 0 <= p <= 65535)})
    for pub in (FE_WEB, DEFAULTS[0]):
        for remote in _remotes(rng, 4):
            for port in ports:
                want = port_owner(port, n) if port >= 1024 else backend_owner(ip(remote), n)
                assert kernel_steer(text, "out2in", tcp(remote, pub, 443, port, "SA")) == want
                assert kernel_steer(text, "out2in", udp(remote, pub, 53, port)) == want
                assert kernel_steer(text, "out2in", echo(remote, pub, port, reply=True)) == want
            # An echo request and an error are steered by the remote.
            assert kernel_steer(text, "out2in", echo(remote, pub, 2000)) == backend_owner(ip(remote), n)
            err = icmp_error(remote, pub, udp(pub, "192.0.2.9", 30000, 53))
            assert kernel_steer(text, "out2in", err) == backend_owner(ip(remote), n)
    for remote in _remotes(rng, 8):
        for pkt in (tcp(remote, INST_PUBLIC, 1, 22), udp(remote, INST_PUBLIC, 9, 30000),
                    echo(remote, INST_PUBLIC, 5, reply=True)):  # fmt: skip
            assert kernel_steer(text, "out2in", pkt) == inst_owner
    err = icmp_error("192.0.2.1", "203.0.113.9", udp("203.0.113.9", "10.10.1.5", 53, 9))
    assert kernel_steer(text, "local_out", err) == 0
    # Probe SYNs: worker 0's plain queue (a local packet's checksum is completed there).
    syn = Pkt(bytes(tcp("10.10.0.1", "10.10.1.5", 40000, 8080, "S")), None, IN)
    assert run_mangle(text, "SNATGW-OUT", syn) == QUEUE


@pytest.mark.parametrize("n", COUNTS)
def test_flows_of_every_kind_meet_in_one_worker_through_the_rendered_rules(n: int) -> None:
    """Through the rendered rules (not a copy): outbound TCP/UDP/ICMP from every backend,
    inbound LB, NAT rule and instance IP, hairpin both ways and ICMP errors both ways
    reach the flow's owner (at most one REQUEUE), and both directions are translated."""
    g = RenderedGateway(n)
    rng = Random(7 * n)
    for b in BACKENDS:
        for proto, mk in (("tcp", lambda s: tcp(s, "192.0.2.9", 40000, 443)),
                          ("udp", lambda s: udp(s, "192.0.2.9", 40001, 53)),
                          ("icmp", lambda s: echo(s, "192.0.2.9", 4242))):  # fmt: skip
            pkt = mk(b)
            w, v = g.send("in2out", pkt)
            assert w == backend_owner(ip(b), n) and v != Verdict.DROP, (b, proto)
            back = reply_to(pkt)
            w2, v2 = g.send("out2in", back)
            assert w2 == w and v2 != Verdict.DROP, (b, proto)
            # An error from a router on the way about the outbound packet, both ways.
            err = icmp_error("192.0.2.200", _src(pkt), pkt)
            w3, v3 = g.send("out2in", err)
            assert w3 == w and v3 != Verdict.DROP
    for remote in _remotes(rng, 6):
        for pkt in (tcp(remote, FE_WEB, 50000, 80), udp(remote, FE_WEB, 50001, 5353),
                    tcp(remote, FE_API, 50002, 443), tcp(remote, FE_WEB, 50003, 2222),
                    tcp(remote, INST_PUBLIC, 50004, 22)):  # fmt: skip
            again = bytearray(pkt)
            w, v = g.send("out2in", pkt)
            assert v != Verdict.DROP
            back = reply_to(pkt)
            w2, v2 = g.send("in2out", back)
            assert w2 == w and v2 != Verdict.DROP
            w3, v3 = g.send("out2in", again)
            assert w3 == w and v3 != Verdict.DROP
    for a in BACKENDS[:6]:
        pkt = tcp(a, FE_WEB, 41000, 80)
        w, v = g.send("hairpin", pkt)
        assert v != Verdict.DROP
        back = reply_to(pkt)
        w2, v2 = g.send("hairpin", back)
        assert v2 != Verdict.DROP
    g.check()


def _src(pkt: bytearray) -> str:
    return ".".join(map(str, pkt[12:16]))


# ---------------------------------------------------------------- supervisor reload


def _supervisor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Supervisor, list[Any]]:
    """A two-worker Supervisor on the lab config with the host stubbed out: iptables,
    addresses and interfaces record what they are asked; no worker is forked."""
    text = LAB.read_text().replace("workers = 1\n", "workers = 2\n", 1)
    path = tmp_path / "gw.toml"
    path.write_text(text)
    calls: list[Any] = []
    monkeypatch.setattr(supervisor, "host_defaults", lambda cfg: cfg)
    monkeypatch.setattr(hostside, "host_defaults", lambda cfg: cfg)
    monkeypatch.setattr(supervisor.system, "interface_index", lambda name: 1)
    monkeypatch.setattr(supervisor.system, "add_addresses", lambda dev, a: calls.append(("add", list(a))))
    monkeypatch.setattr(supervisor.system, "remove_addresses", lambda dev, a: calls.append(("rm", list(a))))

    def apply(*args: Any, **kw: Any) -> int:
        calls.append(("rules", list(args[3])))
        return 0

    monkeypatch.setattr(supervisor.iptables, "apply", apply)
    sup = Supervisor(load(str(path)), structlog.get_logger())
    return sup, calls


def test_a_worker_refusing_the_new_model_rolls_the_reload_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reload one worker's table refuses (its answer is an error, RequestError) is
    rejected and rolled back: old rules, every worker back on the old model, addresses as
    before; it never escapes reload() (from SIGHUP that would stop the whole gateway)."""
    sup, calls = _supervisor(tmp_path, monkeypatch)
    old_cfg, old_publics = sup.cfg, list(sup.publics)
    asked: list[Any] = []

    def ask_all(command: str, args: dict[str, Any] | None = None, timeout: float = 0.0) -> list[Any]:
        asked.append((command, (args or {}).get("config")))
        if command == "reconfigure" and (args or {}).get("config") is not old_cfg:
            raise RequestError("worker 1: boom")
        return [{}, {}]

    monkeypatch.setattr(sup, "ask_all", ask_all)
    result = sup.reload("sighup")
    assert result["applied"] is False and sup.reloads["rejected"] == 1
    assert sup.cfg is old_cfg
    assert asked[-1] == ("reconfigure", old_cfg), "the workers go back to the old model"
    rules = [c for c in calls if c[0] == "rules"]
    assert rules[-1] == ("rules", old_publics), "the old rules are put back"


# ---------------------------------------------------------------- compact flows bookkeeping


def _books(t: TranslationTable) -> None:
    """Every count the compact flows keep agrees with the flows themselves: a backend's
    flow_count is its live flows, each live flow is in both maps and its backend's list,
    flows_live and the wheel's armed count are the table's flows."""
    live = [f for fl in t.inside.values() for f in fl.values()]
    assert all(f.live for f in live)
    assert sum(len(o) for o in t.outside.values()) == len(live) == t.flows_live == t.flow_count()
    wheel = t.wheel
    assert wheel.count == len(live)
    entries = sum(len(slot) for level in wheel.levels for slot in level)
    assert entries == wheel.count + wheel.stale and wheel.stale >= 0, "the wheel's stale count drifted"
    assert all(
        len(s) == len(k)
        for ls, lk in zip(wheel.levels, wheel.ticks, strict=True)
        for s, k in zip(ls, lk, strict=True)
    )
    per: dict[int, int] = {}
    for f in live:
        assert t.outside[f.proto][f.outside_key] is f
        per[f.backend] = per.get(f.backend, 0) + 1
        be = t.backends.get(f.backend)
        assert be is not None and f in be.flow_list, "a live flow its backend does not list"
    for bip, be in t.backends.items():
        assert be.flow_count == len(be.flows) == per.get(bip, 0), ip_str(bip)
        assert 0 <= be.drop_from <= len(be.flow_list)


_SOURCES = (*POOL, INSTANCE, STANDALONE, "10.10.3.2")
_OPS = st.lists(
    st.tuples(
        st.sampled_from(("udp",) * 6 + ("tcp",) * 6 + ("reply",) * 4 + ("fin", "rst", "fin", "rst", "time",
                         "drop_member", "restore_members", "drop_default", "timeouts", "persist")),
        st.integers(0, len(_SOURCES) - 1),
        st.integers(0, 7),
    ),
    min_size=10,
    max_size=80,
)  # fmt: skip


@settings(max_examples=120, deadline=None)
@given(_OPS, st.sampled_from((1, 2, 3)))
def test_flow_counts_never_drift_on_any_end_path(ops: list[tuple[str, int, int]], n: int) -> None:
    """Any mix of new flows, replies, FIN/RST, idle expiry, early drop at tight caps,
    reloads removing and re-adding a member or an address, changed timeouts and a persist
    round trip keeps every backend's flow_count, flows_live and the wheel's count equal
    to the live flows (each worker of N alike)."""
    base = dataclasses.replace(lab_model(), max_flows_per_backend=4, max_flows=9)
    now = 0.0
    shard = Shard(0, n)
    t = TranslationTable(base, now, Random(1), shard)
    sent: list[bytearray] = []
    for op, k, v in ops:
        now += 0.5
        src = _SOURCES[k]
        if op in ("udp", "tcp"):
            pkt = udp(src, SERVER, 30000 + v, 53) if op == "udp" else tcp(src, SERVER, 31000 + v, 443, "S")
            if t.in2out(pkt, now) != Verdict.DROP:
                sent.append(pkt)
        elif op in ("reply", "fin", "rst") and sent:
            out_pkt = sent[v % len(sent)]
            back = reply_to(out_pkt, {"reply": "SA", "fin": "FA", "rst": "R"}[op])
            t.out2in(back, now)
        elif op == "time":
            now += (1, 30, 300, 4000)[v % 4]
            t.handle_timer(now)
        elif op == "drop_member":
            t.reconfigure(lab_model(members=POOL[: 1 + v % 2]), now)
        elif op == "restore_members":
            t.reconfigure(base, now)
        elif op == "drop_default":
            t.reconfigure(lab_model(defaults=LAB_DEFAULTS[v % 2 :]), now)
        elif op == "timeouts":
            t.reconfigure(dataclasses.replace(base, timeouts=Timeouts(idle=10.0 + v)), now)
        elif op == "persist":
            t.handle_timer(now + 1.0)  # what is past its deadline ends here as restore would end it
            data = json.loads(persist.encode(persist.snapshot(t, now + 1.0, 1001.0 + now)))
            now += 1.0
            t2 = TranslationTable(t.model, now, Random(2), shard)
            restore.restore(t2, data, now, 1000.0 + now)
            assert t2.flow_count() == t.flow_count()
            t, sent = t2, []
        _books(t)


# ---------------------------------------------------------------- merged views


@pytest.mark.parametrize("n", (2, 3, 4))
def test_merged_who_and_ports_name_each_ports_owner_and_count_flows_once(n: int) -> None:
    """merge.who of every translated flow's public port names that flow's backend, from
    its owner, whichever worker is asked first; merge.ports gives each backend's row from
    its owner with its flow count; merge.stats adds up to the flows of every worker."""
    g = RenderedGateway(n)
    want: dict[tuple[int, int], int] = {}
    for i, b in enumerate(BACKENDS):
        for proto, pkt in (
            ("udp", udp(b, "192.0.2.9", 40000 + i, 53)),
            ("tcp", tcp(b, "192.0.2.9", 41000 + i, 443)),
        ):
            w, v = g.send("in2out", pkt)
            assert v != Verdict.DROP, (b, proto)
            want[(ip(_src(pkt)), int.from_bytes(pkt[20:22], "big"))] = ip(b)
    # Inbound through the instance IP and the LB frontend.
    g.send("out2in", tcp("203.0.113.40", INST_PUBLIC, 50000, 22))
    for (pub, port), backend in want.items():
        parts = [views.who(t, pub, port, 1.0) for t in g.tables]
        got = merge.who(parts)
        assert got["holder"] is not None and got["holder"]["backend"] == ip_str(backend)
        assert got["worker"] == backend_owner(backend, n)
        assert any(r["public_port"] == port for r in got["flows"])
        assert merge.who(parts[::-1])["holder"]["backend"] == ip_str(backend)
    inst = merge.who([views.who(t, ip(INST_PUBLIC), 22, 1.0) for t in g.tables])
    assert inst["holder"]["backend"] == "10.10.2.3" and inst["worker"] == backend_owner(ip("10.10.2.3"), n)
    rows = merge.ports([views.ports(t, 1.0, 1000.0) for t in g.tables])
    counts = {ip(r["backend"]): r["flows"] for r in rows}
    for _w, f in g.flows():
        assert counts[f.backend] == sum(1 for _w, x in g.flows() if x.backend == f.backend)
    total = merge.stats([views.stats(t) for t in g.tables])
    assert total["flows_total"] == len(g.flows())


class _Dead:
    """A worker handle whose process died (SIGKILL)."""

    index, pid, final = 1, 4242, None

    class process:  # noqa: N801 (the attribute WorkerHandle has)
        exitcode = -9

        @staticmethod
        def is_alive() -> bool:
            return False


def test_a_reload_under_way_when_a_worker_dies_never_undoes_the_guard(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker dies while a control-socket reload waits on the workers: the supervisor puts
    the guard in at once, and whatever that reload's rollback puts back (queue rules, public
    addresses) is taken away again: the guard is the last rule set, no address is left."""
    sup, calls = _supervisor(tmp_path, monkeypatch)
    old_cfg = sup.cfg
    inside = threading.Event()
    release = threading.Event()

    def guard(inside_if: str, outside_if: str) -> bool:
        calls.append(("guard", []))
        release.set()
        return True

    def ask_all(command: str, args: dict[str, Any] | None = None, timeout: float = 0.0) -> list[Any]:
        if command == "reconfigure" and (args or {}).get("config") is not old_cfg:
            inside.set()
            assert release.wait(10)
            raise RequestError("worker 1 is gone")
        return [{}, {}]

    reloader = threading.Thread(target=sup.reload, args=("control",))

    def watch() -> Any:
        reloader.start()
        assert inside.wait(10)
        return _Dead()

    class Control:
        def __init__(self, *a: Any) -> None: ...
        def start(self) -> None: ...
        def close(self) -> None: ...

    for name in ("set_sysctls", "enable_forwarding", "restore_forwarding", "restore_sysctls"):
        monkeypatch.setattr(supervisor.system, name, lambda *a: None)
    monkeypatch.setattr(supervisor.system, "hairpin_sysctls", lambda *a: {})
    monkeypatch.setattr(supervisor.system, "strict_rp_filter", lambda *a: False)
    monkeypatch.setattr(supervisor.iptables, "guard", guard)
    monkeypatch.setattr(supervisor, "ControlServer", Control)
    monkeypatch.setattr(sup.pool, "fork", lambda: None)
    monkeypatch.setattr(sup.pool, "await_ready", lambda stopping: True)
    monkeypatch.setattr(sup.pool, "stop", lambda: reloader.join(10))
    monkeypatch.setattr(sup, "ask_all", ask_all)
    monkeypatch.setattr(sup, "describe", lambda *a: {})
    monkeypatch.setattr(sup, "_watch", watch)
    sup.metrics = None
    assert sup.run() == 1
    reloader.join(10)
    host = [c for c in calls if c[0] in ("rules", "guard")]
    assert host[-1] == ("guard", []), f"the last rule change after the crash: {host[-3:]}"
    moves = [c for c in calls if c[0] in ("add", "rm") and c[1]]
    assert moves[-1][0] == "rm", moves[-3:]


def test_stopping_workers_that_never_got_ready_does_not_wait_for_their_readers() -> None:
    """A start-up that failed before every worker was ready stops the workers without
    waiting on pipe readers that were never started (2 s each, 32 s with 16 workers)."""
    waited: list[float] = []

    class Closed:
        def wait(self, timeout: float) -> bool:
            waited.append(timeout)
            return False

    class Proc:
        exitcode = 0

        def is_alive(self) -> bool:
            return False

        def join(self, timeout: float | None = None) -> None: ...

    pool = WorkerPool.__new__(WorkerPool)
    pool.log = structlog.get_logger()
    pool.workers = []
    for i in range(3):
        handle = WorkerHandle(i, Proc(), None)  # type: ignore[arg-type]
        handle.closed = Closed()  # type: ignore[assignment]
        pool.workers.append(handle)
    pool.stop()
    assert waited == []
