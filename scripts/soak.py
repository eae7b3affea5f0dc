"""snatgw soak: thousands of flows per second opened and closed through the gateway, with
restarts in between; reports the gateway's RSS over time and checks that it stays flat.

Run as root: ``.venv/bin/python scripts/soak.py`` (10 minutes, lab prefix ``soak``), or
``--duration 60`` for the one-minute form that ``make test`` runs
(tests/integration/test_soak.py).  Not in CI in its long form.

What runs, all in a lab of its own (``gateway.lab``), each process stopped by its pid:

* a server in the internet namespace: UDP echo on :data:`UDP_PORTS`, and a TCP server that
  answers one byte and closes once the client has closed;
* a churn client in the backend namespace: ``--udp-rate`` new UDP flows per second (a new
  socket, one datagram, its echo, close) from six sources (pool members, the instance IP's
  backend, standalone backends) to eight ports, and short TCP connections (connect, one
  byte each way, close) as fast as one thread makes them;
* the gateway with short timeouts (flows idle out after 6 s, closed TCP lingers 1 s), so
  flows end as fast as they start, and a state file written every 2 s (the idle timeout
  stays above the state file's age at a SIGKILL restart: up to one interval plus the
  start-up, else every saved one-datagram flow would be expired on restore);
* restarts: SIGTERM + start, and one SIGKILL + start, spread over the run.

Checks (exit status 1 and the reason when one fails): the gateway's RSS (VmRSS of
/proc/PID/status, sampled every second) stays flat after the warm-up in every process that
lived long enough: the median of the last quarter of its samples is within
:data:`RSS_TOLERANCE` of the median of the first quarter (single samples may spike while a
state save is encoded; the band is reported); no log line of level
error or critical and no traceback; the ``drop_internal`` counter (an exception in the
core) is 0 in every process; every restart restored flows from the state file; the
clients got most of their answers (the gateway kept up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gateway.lab import layout as t  # noqa: E402
from gateway.lab.gatewayproc import GatewayLauncher, GatewayProc  # noqa: E402
from gateway.lab.layout import LabNames  # noqa: E402
from gateway.lab.procs import ProcessSet, wait_until  # noqa: E402

UDP_PORTS = tuple(range(6000, 6008))
TCP_PORT = 6100
SOURCES = (*t.POOL_MEMBERS, t.INSTANCE_BACKEND, *t.STANDALONE)
#: RSS after the warm-up may exceed the process's own post-warm-up minimum by this much.
RSS_TOLERANCE = 0.05
#: Seconds of a gateway process's life that do not count toward the RSS check.
WARMUP = 15.0
#: Longest a client runs, whatever it is told (a soak that hangs must still end).
CLIENT_MAX = 3600.0

CONFIG = """\
[gateway]
inside = "{inside}"
outside = "{outside}"
queue = 0
idle_timeout = 6
tcp_fin_linger = 1
tcp_rst_linger = 1
state_file = "{state}"
state_interval = 2

[[frontends]]
name = "fe-web"
ip = "{frontend}"

[[pools]]
name = "web"
members = [{members}]

[[lb_rules]]
name = "http"
frontend = "fe-web"
pool = "web"
protocol = "tcp"
frontend_port = 80
backend_port = 8080

[[instance_ips]]
private = "{instance}"
public = "{instance_public}"

[default_snat]
ips = [{defaults}]
"""


def config_text(state: Path) -> str:
    return CONFIG.format(
        inside=t.GW_IN_IF, outside=t.GW_OUT_IF, state=state, frontend=t.FRONTEND_IP,
        members=", ".join(f'"{m}"' for m in t.POOL_MEMBERS), instance=t.INSTANCE_BACKEND,
        instance_public=t.INSTANCE_PUBLIC, defaults=", ".join(f'"{d}"' for d in t.DEFAULT_SNAT),
    )


# --------------------------------------------------------------------------- roles in the lab


def serve(bind: str, duration: float) -> int:
    """UDP echo on UDP_PORTS and a one-byte TCP answer on TCP_PORT, until SIGTERM or ``duration``."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sel = selectors.DefaultSelector()
    for port in UDP_PORTS:
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        u.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        u.bind((bind, port))
        u.setblocking(False)
        sel.register(u, selectors.EVENT_READ, "udp")
    ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((bind, TCP_PORT))
    ls.listen(4096)
    ls.setblocking(False)
    sel.register(ls, selectors.EVENT_READ, "listen")
    end = time.monotonic() + min(duration, CLIENT_MAX)
    while time.monotonic() < end:
        for key, _ in sel.select(0.5):
            s: Any = key.fileobj
            if key.data == "udp":
                for _ in range(256):
                    try:
                        data, peer = s.recvfrom(2048)
                    except (BlockingIOError, InterruptedError):
                        break
                    with contextlib.suppress(OSError):
                        s.sendto(data, peer)
            elif key.data == "listen":
                for _ in range(64):
                    try:
                        conn, _peer = s.accept()
                    except OSError:
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "conn")
            else:
                try:
                    data = s.recv(2048)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    with contextlib.suppress(OSError):
                        s.send(b"k")
                else:  # the client closed first: TIME_WAIT stays on its side
                    sel.unregister(s)
                    s.close()
    return 0


@dataclass
class Tally:
    udp_sent: int = 0
    udp_answered: int = 0
    tcp_tried: int = 0
    tcp_done: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, e: BaseException) -> None:
        name = type(e).__name__
        self.errors[name] = self.errors.get(name, 0) + 1


def _tcp_loop(dst: str, stop: threading.Event, tally: Tally) -> None:
    rng = random.Random(2)
    while not stop.is_set():
        tally.tcp_tried += 1
        try:
            with socket.create_connection((dst, TCP_PORT), timeout=2,
                                          source_address=(rng.choice(SOURCES), 0)) as c:
                c.sendall(b"x")
                if c.recv(1) == b"k":
                    tally.tcp_done += 1
        except OSError as e:
            tally.error(e)


def churn(dst: str, duration: float, rate: int) -> int:
    """New UDP flows at ``rate`` per second and short TCP connections, for ``duration``;
    one JSON tally per second on stdout, the last one with ``"final": true``."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    duration = min(duration, CLIENT_MAX)
    tally = Tally()
    stop = threading.Event()
    tcp = threading.Thread(target=_tcp_loop, args=(dst, stop, tally), daemon=True)
    tcp.start()
    rng = random.Random(1)
    tick = 0.05
    per_tick = max(1, round(rate * tick))
    start = time.monotonic()
    pending: list[tuple[float, socket.socket]] = []
    sel = selectors.DefaultSelector()
    next_tick = start
    next_report = start + 1
    try:
        while time.monotonic() - start < duration:
            now = time.monotonic()
            if now >= next_tick:
                next_tick += tick
                for _ in range(per_tick):
                    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                    try:
                        s.bind((rng.choice(SOURCES), 0))
                        s.setblocking(False)
                        s.sendto(b"soak", (dst, rng.choice(UDP_PORTS)))
                        tally.udp_sent += 1
                    except OSError as e:
                        tally.error(e)
                        s.close()
                        continue
                    sel.register(s, selectors.EVENT_READ)
                    pending.append((now + 1.0, s))
            for key, _ in sel.select(max(0.0, min(next_tick, next_report) - time.monotonic())):
                s = key.fileobj  # type: ignore[assignment]
                with contextlib.suppress(OSError):
                    if s.recv(64):
                        tally.udp_answered += 1
                sel.unregister(s)
                s.close()
            now = time.monotonic()
            while pending and (pending[0][0] <= now or pending[0][1].fileno() < 0):
                _, s = pending.pop(0)
                if s.fileno() >= 0:
                    sel.unregister(s)
                    s.close()
            if now >= next_report:
                next_report += 1
                print(json.dumps({"t": round(now - start, 1), **tally.__dict__}), flush=True)
    finally:
        stop.set()
        tcp.join(timeout=3)
        for _, s in pending:
            if s.fileno() >= 0:
                s.close()
    print(json.dumps({"final": True, "t": round(time.monotonic() - start, 1), **tally.__dict__}),
          flush=True)
    return 0


# --------------------------------------------------------------------------- the soak


def rss_kb(pid: int) -> int | None:
    """VmRSS of ``pid`` in KiB (None if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


@dataclass
class Segment:
    """One gateway process of the soak: its RSS samples and how it ended."""

    gw: GatewayProc
    started: float
    ended: str = ""
    samples: list[tuple[float, int]] = field(default_factory=list)
    restored: int | None = None
    drop_internal: int | None = None


def restart_plan(duration: float) -> list[tuple[float, str]]:
    """When to restart and how: SIGTERM + start, with one SIGKILL + start in the middle.

    A short soak (the one-minute form) restarts at half and three quarters, so that its
    first gateway lives long enough past the warm-up for the RSS check."""
    if duration < 240:
        return [(duration * 0.5, "term"), (duration * 0.75, "kill")]
    count = int(duration // 120)
    times = [duration * (i + 1) / (count + 1) for i in range(count)]
    kill = count // 2 if count > 2 else 1
    return [(at, "kill" if i == kill else "term") for i, at in enumerate(times)]


def run_soak(lab: LabNames, workdir: Path, duration: float = 600.0, udp_rate: int = 2000,
             log: Any = None) -> dict[str, Any]:
    """Run the soak in ``lab`` (up, with no gateway) and return the report (``ok``, ``problems``)."""
    say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    procs = ProcessSet()
    launcher = GatewayLauncher(lab.gw, workdir, procs)
    state = workdir / "state.json"
    cfg = config_text(state)
    segments: list[Segment] = []
    problems: list[str] = []
    tallies: list[dict[str, Any]] = []
    me = str(Path(__file__).resolve())
    try:
        server = procs.start(lab.inet, [sys.executable, me, "--role", "serve", "--bind", t.SERVER,
                                        "--duration", str(duration + 60)])
        wait_until(lambda: _listening(lab, server), 10, what="the soak server listens")
        seg = Segment(launcher.start(cfg), time.monotonic())
        segments.append(seg)
        client = procs.start(lab.be, [sys.executable, me, "--role", "churn", "--dst", t.SERVER,
                                      "--duration", str(duration), "--rate", str(udp_rate)],
                             stdout=subprocess.PIPE)
        began = time.monotonic()
        plan = restart_plan(duration)
        say(f"soak: {duration:.0f} s, {udp_rate} UDP flows/s + TCP, restarts {plan}")
        next_sample = began
        while client.poll() is None and time.monotonic() - began < duration + 30:
            now = time.monotonic()
            if plan and now - began >= plan[0][0]:
                _at, how = plan.pop(0)
                seg = _restart(launcher, seg, how, cfg, problems)
                segments.append(seg)
                say(f"soak: {now - began:5.1f} s  {how} + start, restored {seg.restored} flows")
            if now >= next_sample:
                next_sample += 1.0
                kb = rss_kb(seg.gw.pid)
                if kb is not None:
                    seg.samples.append((round(now - began, 1), kb))
            time.sleep(max(0.0, min(next_sample, began + duration + 30) - time.monotonic()))
        assert client.stdout is not None
        try:
            out, _ = client.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            procs.stop(client)
            out = client.stdout.read() if client.stdout else b""
            problems.append("the churn client did not finish")
        for line in out.decode(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                tallies.append(json.loads(line))
        seg.drop_internal = _drop_internal(seg.gw)
        rc = seg.gw.stop()
        seg.ended = f"term rc={rc}"
        if rc != 0:
            problems.append(f"the last gateway exited with {rc}")
    finally:
        launcher.close()
        procs.stop_all()
    return _report(segments, tallies, problems, duration, udp_rate)


def _listening(lab: LabNames, server: subprocess.Popen[bytes]) -> bool:
    from gateway.lab.clients import wait_listening

    if server.poll() is not None:
        raise RuntimeError(f"the soak server exited with {server.returncode}")
    with contextlib.suppress(Exception):
        wait_listening(lab.inet, [TCP_PORT], timeout=0.5)
        return True
    return False


def _drop_internal(gw: GatewayProc) -> int | None:
    with contextlib.suppress(Exception):
        return int(gw.ask("stats")["counters"]["drop_internal"])
    return None


def _restart(launcher: GatewayLauncher, seg: Segment, how: str, cfg: str,
             problems: list[str]) -> Segment:
    seg.drop_internal = _drop_internal(seg.gw)
    if how == "kill":
        seg.gw.kill()
        seg.ended = "kill"
    else:
        rc = seg.gw.stop()
        seg.ended = f"term rc={rc}"
        if rc != 0:
            problems.append(f"gateway {seg.gw.pid} exited with {rc} on SIGTERM")
    new = Segment(launcher.start(cfg), time.monotonic())
    ev = new.gw.event("state_restored")
    new.restored = ev.get("restored") if ev else None
    if not new.restored:
        problems.append(f"{how} + start restored no flows: "
                        f"{new.gw.event('state_not_restored') or ev}")
    return new


def _report(segments: list[Segment], tallies: list[dict[str, Any]], problems: list[str],
            duration: float, udp_rate: int) -> dict[str, Any]:
    procs_out: list[dict[str, Any]] = []
    for seg in segments:
        records = seg.gw.records()
        bad = [r for r in records if r.get("level") in ("error", "critical", "exception")]
        text = seg.gw.log_text()
        if bad:
            problems.append(f"gateway {seg.gw.pid}: {len(bad)} error lines, first {bad[0]}")
        if "Traceback" in text:
            problems.append(f"gateway {seg.gw.pid}: a traceback in {seg.gw.log_path}")
        if seg.drop_internal:
            problems.append(f"gateway {seg.gw.pid}: drop_internal = {seg.drop_internal}")
        if seg.drop_internal is None:
            problems.append(f"gateway {seg.gw.pid}: its counters could not be read")
        t0 = seg.samples[0][0] if seg.samples else 0.0
        late = [kb for at, kb in seg.samples if at - t0 >= WARMUP]
        flat = None
        if len(late) >= 8:
            # The level, not single samples: a save or a burst lifts one sample by a
            # few MB for a second; a leak lifts the level. First and last quarter's
            # medians must be within RSS_TOLERANCE; the band (max/min) is reported.
            q = max(2, len(late) // 4)
            first, last = statistics.median(late[:q]), statistics.median(late[-q:])
            flat = round(last / first - 1, 4)
            if flat > RSS_TOLERANCE:
                problems.append(f"gateway {seg.gw.pid}: RSS level grew {flat:.1%} after the warm-up "
                                f"({first:.0f} -> {last:.0f} KiB, median of first and last quarter)")
        procs_out.append({
            "pid": seg.gw.pid, "ended": seg.ended, "restored": seg.restored,
            "drop_internal": seg.drop_internal, "rss_kib": seg.samples,
            "rss_after_warmup": {"min": min(late), "max": max(late), "growth": flat,
                                 "band": round(max(late) / min(late) - 1, 4)} if late else None,
            "warnings": sum(1 for r in records if r.get("level") == "warning"),
        })
    checked = [p for p in procs_out if p["rss_after_warmup"] and p["rss_after_warmup"]["growth"] is not None]
    if not checked:
        problems.append("no gateway process lived past the warm-up long enough to check its RSS")
    final = next((x for x in reversed(tallies) if x.get("final")), tallies[-1] if tallies else {})
    if not final:
        problems.append("the churn client reported nothing")
    else:
        secs = max(1.0, float(final.get("t", duration)))
        if final["udp_sent"] < 0.5 * udp_rate * secs:
            problems.append(f"the client sent only {final['udp_sent']} UDP flows in {secs:.0f} s")
        if final["udp_answered"] < 0.8 * final["udp_sent"]:
            problems.append(f"only {final['udp_answered']} of {final['udp_sent']} UDP flows answered")
        if final["tcp_done"] < 0.5 * final["tcp_tried"]:
            problems.append(f"only {final['tcp_done']} of {final['tcp_tried']} TCP connections done")
    return {
        "ok": not problems,
        "problems": problems,
        "duration": duration,
        "udp_rate": udp_rate,
        "client": final,
        "flows_per_second": round((final.get("udp_sent", 0) + final.get("tcp_tried", 0))
                                  / max(1.0, float(final.get("t", duration) or duration)), 1),
        "gateways": procs_out,
    }


def summary(report: dict[str, Any]) -> str:
    """The report as a few lines for a terminal or a test failure."""
    lines = [f"soak {'ok' if report['ok'] else 'FAILED'}: {report['duration']:.0f} s, "
             f"{report['flows_per_second']} flows/s, client {report['client']}"]
    for g in report["gateways"]:
        rss, w = g["rss_kib"], g["rss_after_warmup"]
        head = f"  gateway {g['pid']} ({g['ended']}, restored {g['restored']}): "
        start = rss[0][1] if rss else "?"
        if w:
            growth = "too few samples" if w["growth"] is None else f"level {w['growth']:+.1%}"
            lines.append(head + f"RSS {start} KiB at start; after warm-up {w['min']}-{w['max']} KiB"
                         f" (band {w['band']:.1%}, {growth}; {len(rss)} samples)")
        else:
            lines.append(head + f"RSS {start} KiB at start, {len(rss)} samples (too short to check)")
    lines += [f"  problem: {p}" for p in report["problems"]]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--role", choices=("soak", "serve", "churn"), default="soak")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--rate", type=int, default=2000, help="new UDP flows per second")
    ap.add_argument("--prefix", default="soak", help="lab prefix (its own lab, torn down after)")
    ap.add_argument("--json", type=Path, help="write the whole report here")
    ap.add_argument("--bind", default=t.SERVER)
    ap.add_argument("--dst", default=t.SERVER)
    args = ap.parse_args(argv)
    if args.role == "serve":
        return serve(args.bind, args.duration)
    if args.role == "churn":
        return churn(args.dst, args.duration, args.rate)
    from gateway.lab.topology import lab_down, lab_lock, lab_up

    if os.geteuid() != 0:
        print("soak: needs root (network namespaces, iptables)", file=sys.stderr)
        return 2
    with lab_lock(args.prefix, wait=60), tempfile.TemporaryDirectory(prefix="snatgw-soak-") as tmp:
        lab = lab_up(args.prefix, whoami=False)
        try:
            report = run_soak(lab, Path(tmp), args.duration, args.rate)
        finally:
            lab_down(args.prefix)
    print(summary(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
