"""State survives a restart: a live TCP connection keeps going, on the same public port,
across SIGTERM + start, SIGKILL + start and a reload (issue 9, item 5).

A line sender on a pool member writes ``<n>\\n`` every 0.2 s to a receiver in the internet
namespace, which logs the peer it accepted (the public address and port the far side saw)
and every line it got. Between stop and start the kernel drops what is queued; TCP
retransmits. Without the state file the same restart breaks the connection (the control).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

from gateway.lab import layout as t
from gateway.lab.layout import LabNames
from gateway.lab.procs import ProcessSet
from tests.integration import helpers as h

BACKEND = t.POOL_MEMBERS[0]
LINE_PORT = 7101
INTERVAL = 0.2
#: Lines the sender writes at most (60 s): every test ends its sender well before.
MAX_LINES = 300

_RECEIVER = r"""
import json, select, socket, sys, time
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind((host, port))
srv.listen(8)
deadline = time.monotonic() + 120
with open(path, "a", buffering=1) as log:
    log.write(json.dumps({"listening": True}) + "\n")
    conns = {}
    while time.monotonic() < deadline:
        ready, _, _ = select.select([srv, *conns], [], [], 0.5)
        for s in ready:
            if s is srv:
                c, peer = srv.accept()
                conns[c] = b""
                log.write(json.dumps({"peer": list(peer)}) + "\n")
                continue
            data = s.recv(65536)
            if not data:
                log.write(json.dumps({"eof": True}) + "\n")
                del conns[s]
                s.close()
                continue
            buf = conns[s] + data
            *lines, conns[s] = buf.split(b"\n")
            for line in lines:
                log.write(json.dumps({"line": line.decode()}) + "\n")
"""

_SENDER = r"""
import json, socket, sys, time
src, dst, port, count, interval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), \
    float(sys.argv[5])
s = socket.create_connection((dst, port), timeout=30, source_address=(src, 0))
print(json.dumps({"local": list(s.getsockname())}), flush=True)
try:
    for i in range(count):
        s.sendall(f"{i}\n".encode())
        time.sleep(interval)
    s.shutdown(socket.SHUT_WR)
    print(json.dumps({"done": count}), flush=True)
except OSError as e:
    print(json.dumps({"error": type(e).__name__, "sent": i}), flush=True)
    sys.exit(1)
"""


class LineConnection:
    """The receiver (internet side) and the sender (backend side) of one TCP connection."""

    def __init__(self, lab: LabNames, workdir: Path, port: int = LINE_PORT) -> None:
        self.procs = ProcessSet()
        self.log = workdir / f"lines-{port}.jsonl"
        self.receiver = self.procs.start(lab.inet, [h.PYTHON, "-c", _RECEIVER, t.SERVER, str(port),
                                                    str(self.log)])
        h.wait_listening(lab.inet, [port])
        self.sender = self.procs.start(
            lab.be, [h.PYTHON, "-c", _SENDER, BACKEND, t.SERVER, str(port), str(MAX_LINES),
                     str(INTERVAL)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def records(self) -> list[dict[str, Any]]:
        try:
            text = self.log.read_text()
        except FileNotFoundError:
            return []
        return [json.loads(x) for x in text.splitlines() if x.startswith("{")]

    def lines(self) -> list[int]:
        return [int(r["line"]) for r in self.records() if "line" in r]

    def peers(self) -> list[tuple[str, int]]:
        return [(r["peer"][0], r["peer"][1]) for r in self.records() if "peer" in r]

    def wait_lines(self, count: int, timeout: float) -> list[int]:
        """Wait until the far side has ``count`` lines; fails saying what it got."""
        h.wait_until(lambda: len(self.lines()) >= count, timeout,
                     what=f"the far side received {count} lines",
                     detail=lambda: f"{len(self.lines())} lines, peers {self.peers()}, "
                                    f"sender alive: {self.sender.poll() is None}")
        return self.lines()

    def close(self) -> None:
        self.procs.stop_all(timeout=3)
        for p in (self.sender, self.receiver):
            for fh in (p.stdout, p.stderr):
                if fh is not None:
                    fh.close()


def config(state: Path | None) -> str:
    """The lab config with a state file written every second (none: ``state_file = ""``)."""
    def mutate(cfg: dict[str, Any]) -> None:
        cfg["gateway"]["state_file"] = str(state) if state is not None else ""
        cfg["gateway"]["state_interval"] = 1

    return h.lab_config(mutate=mutate)


def warm_up_ports(lab: LabNames) -> None:
    """A few short connections first, so the long one does not sit on the block's first
    port, where a gateway that forgot it might put the connection again by chance."""
    for _ in range(3):
        res = h.curl(lab, BACKEND, f"http://{t.SERVER}/")
        assert res.returncode == 0, res.stderr


def tcp_public_ports(gw: h.GatewayProc) -> set[int]:
    rows = gw.ask("flows", "--backend", BACKEND, "--proto", "tcp")
    return {r["public_port"] for r in rows if r["remote_port"] == LINE_PORT}


def assert_one_connection_in_order(conn: LineConnection) -> tuple[str, int]:
    lines = conn.lines()
    assert lines == list(range(len(lines))), f"lines out of order or missing: {lines}"
    peers = conn.peers()
    assert len(peers) == 1, f"the far side saw {peers}"
    assert not any("eof" in r for r in conn.records()), "the connection was closed"
    return peers[0]


def test_sigterm_start_and_reload_keep_a_tcp_connection_on_its_public_port(
    lab: LabNames, gateway: h.GatewayFactory, tmp_path: Path
) -> None:
    """SIGTERM + start, then a reload: every line arrives in order on one connection, same port."""
    state = tmp_path / "state.json"
    cfg = config(state)
    gw = gateway(cfg)
    warm_up_ports(lab)
    conn = LineConnection(lab, tmp_path)
    try:
        conn.wait_lines(5, timeout=10)
        public, port = conn.peers()[0]
        assert public == t.FRONTEND_IP
        assert tcp_public_ports(gw) == {port}

        assert gw.stop() == 0
        saved = gw.event("state_saved")
        assert saved is not None and saved["flows"] >= 1, gw.log_text()[-2000:]
        before = len(conn.lines())
        gw2 = gateway(cfg)
        restored = gw2.event("state_restored")
        assert restored is not None and restored["restored"] >= 1, gw2.log_text()[-2000:]
        conn.wait_lines(before + 10, timeout=20)
        assert tcp_public_ports(gw2) == {port}

        res = gw2.reload(cfg)
        assert res is not None and res.returncode == 0, res
        after_reload = len(conn.lines())
        conn.wait_lines(after_reload + 5, timeout=10)
        assert tcp_public_ports(gw2) == {port}
        assert conn.sender.poll() is None, "the sender gave up"
        assert assert_one_connection_in_order(conn) == (t.FRONTEND_IP, port)
    finally:
        conn.close()


def test_sigkill_and_start_keep_a_tcp_connection_from_the_periodic_snapshot(
    lab: LabNames, gateway: h.GatewayFactory, tmp_path: Path
) -> None:
    """SIGKILL + start: the flow comes back from the last periodic snapshot; later lines arrive."""
    state = tmp_path / "state.json"
    cfg = config(state)
    gw = gateway(cfg)
    assert gw.event("state_not_restored")["reason"] == "missing"  # type: ignore[index]
    warm_up_ports(lab)
    conn = LineConnection(lab, tmp_path)
    try:
        conn.wait_lines(5, timeout=10)
        _public, port = conn.peers()[0]

        def snapshot_has_the_flow() -> bool:
            try:
                doc = json.loads(state.read_text())
            except (OSError, ValueError):
                return False
            i = doc["flow_fields"].index("public_port")
            j = doc["flow_fields"].index("remote_port")
            return any(r[i] == port and r[j] == LINE_PORT for r in doc["flows"])

        h.wait_until(snapshot_has_the_flow, 5, what="a periodic snapshot holds the connection")
        gw.kill()
        before = len(conn.lines())
        gw2 = gateway(cfg)
        restored = gw2.event("state_restored")
        assert restored is not None and restored["restored"] >= 1, gw2.log_text()[-2000:]
        conn.wait_lines(before + 10, timeout=25)
        assert tcp_public_ports(gw2) == {port}
        assert conn.sender.poll() is None, "the sender gave up"
        assert assert_one_connection_in_order(conn)[1] == port
    finally:
        conn.close()


def test_control_without_a_state_file_the_restart_breaks_the_connection(
    lab: LabNames, gateway: h.GatewayFactory, tmp_path: Path
) -> None:
    """Control: the same SIGTERM + start with no state file loses the flow; no later line arrives."""
    cfg = config(None)
    gw = gateway(cfg)
    warm_up_ports(lab)
    conn = LineConnection(lab, tmp_path, LINE_PORT + 1)
    try:
        conn.wait_lines(5, timeout=10)
        assert gw.stop() == 0
        assert gw.event("state_saved") is None
        before = len(conn.lines())
        gateway(cfg)
        # The sender's next segments get a fresh mapping; the far side answers them with
        # a RST or never sees them, so the lines written after the restart never arrive.
        got = h.poll_until(lambda: len(conn.lines()) >= before + 10, 8)
        assert not got, f"lines kept arriving without the state file: {len(conn.lines())}"
    finally:
        conn.close()


def test_a_corrupt_or_foreign_state_file_is_logged_once_and_ignored(
    gateway: h.GatewayFactory, tmp_path: Path
) -> None:
    """Garbage and another version: one state_not_restored event each, the gateway runs."""
    state = tmp_path / "state.json"
    for content, reason in ((b"{not json", "not JSON"),
                            (b'{"format": "snatgw-state", "version": 99}', "version 99")):
        state.write_bytes(content)
        gw = gateway(config(state))
        events = gw.events("state_not_restored")
        assert len(events) == 1 and reason in events[0]["reason"], events
        assert gw.events("state_restored") == []
        assert gw.stop() == 0
        doc = json.loads(state.read_text())  # the clean stop wrote a good file over it
        assert doc["version"] == 1 and doc["flows"] == []
