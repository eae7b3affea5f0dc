"""Where one snatgw worker's time goes under the bench's UDP 64-byte load.

Run as root.  Builds a lab (prefix ``prof``), starts snatgw with the bench's config,
drives one iperf3 64-byte UDP sender through it for ``--duration`` seconds and meanwhile
samples the gateway with ``py-spy record`` (Python frames; ``--native`` adds C frames),
then prints the gateway's CPU per packet (utime/stime from /proc, as bench.py does) and
the top functions by self time.  bench.py calls :func:`run` (workers = 1) for its "where
one worker's time goes" section; this script is the same thing by hand, for one
experiment at a time:

    scripts/profile_worker.py --duration 8 [--native] [--extra 'workers = 1'] [--json out]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PY_SPY = Path(sys.executable).parent / "py-spy"


def py_spy() -> str | None:
    """The py-spy binary (the venv's, else one on PATH), or None."""
    if PY_SPY.exists():
        return str(PY_SPY)
    return shutil.which("py-spy")


def self_times(collapsed: str) -> tuple[Counter[str], int]:
    """Samples per leaf function from py-spy's raw (collapsed-stack) output, and the total.

    Each line is ``frame;frame;...;leaf COUNT``; a frame is ``function (file:line)``.  The
    leaf is where the sample landed (self time); the line number is dropped so that one
    function is one entry.
    """
    leaves: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.rsplit(";", 1)[-1]
        leaves[frame_name(leaf)] += int(count)
        total += int(count)
    return leaves, total


def frame_name(frame: str) -> str:
    """``in2out (gateway/core/in2out.py:123)`` -> ``in2out.in2out``; C frames stay as given."""
    name, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    if not path:
        return name
    return f"{Path(path).stem}.{name}"


def top_functions(collapsed: str, n: int = 12) -> list[dict[str, Any]]:
    """The ``n`` functions with most self samples, with their share of all samples."""
    leaves, total = self_times(collapsed)
    return [{"function": f, "share": c / total, "samples": c} for f, c in leaves.most_common(n)]


def profile_gateway(pid: int, seconds: float, *, native: bool = False, rate: int = 250,
                    raw: str = "", gil: bool = True) -> dict[str, Any]:
    """``py-spy record`` on ``pid`` for ``seconds``: the top functions by self time.

    ``--nonblocking``: the gateway is not paused per sample (its figures stay those of
    an unprofiled run, at the price of a few torn stacks).  ``--gil``: only samples of a
    thread holding the GIL, i.e. Python and the C it runs; py-spy's idle detection did
    not work on the bench VM (a loop waiting in epoll and the control threads waiting
    counted as busy), and a thread in a socket syscall releases the GIL, so the kernel's
    share is read from /proc (stime) instead.  ``raw``: also keep py-spy's collapsed
    stacks (with line numbers) in that file.
    """
    spy = py_spy()
    if spy is None:
        return {"error": "py-spy not installed (.venv/bin/pip install py-spy)"}
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        argv = [spy, "record", "-p", str(pid), "-d", str(max(1, int(seconds))), "-r", str(rate),
                "-f", "raw", "-o", out.name, "--nonblocking"] + (["--gil"] if gil else [])
        if native:
            argv.append("--native")
        res = subprocess.run(argv, capture_output=True, timeout=seconds + 60, check=False)
        text = Path(out.name).read_text(errors="replace")
    if raw:
        Path(raw).write_text(text)
    if res.returncode != 0 or not text.strip():
        return {"error": f"py-spy exited {res.returncode}: {res.stderr.decode(errors='replace')[-300:]}"}
    leaves, total = self_times(text)
    return {"samples": total, "rate_hz": rate, "seconds": seconds, "native": native, "gil_only": gil,
            "top": [{"function": f, "share": c / total} for f, c in leaves.most_common(12)]}


def run(args: argparse.Namespace, bench: Any) -> dict[str, Any]:
    """A lab, snatgw in it, the UDP load from one backend, py-spy (and perf) meanwhile.

    ``bench`` is scripts/bench.py as a module (its lab and load helpers and its process
    set, so that its clean-up also covers what started here).
    """
    out: dict[str, Any] = {}
    lab = bench.lab_up(args.prefix, whoami=False)
    tmp = Path(tempfile.mkdtemp(prefix="snatgw-prof-"))
    launcher = bench.GatewayLauncher(lab.gw, tmp, bench.PROCS)
    gw = None
    try:
        bench.start_servers(lab, 1)
        config = bench.gateway_config(queue=0)
        if args.extra:
            config = config.replace("queue = 0\n", "queue = 0\n" + "\n".join(args.extra) + "\n")
        for cmd in args.gw_cmd:
            bench.ns_run(lab.gw, cmd.split())
        if args.wrap:
            import gateway.lab.gatewayproc as gp

            gp.snatgw_argv = lambda: [sys.executable, args.wrap]  # type: ignore[assignment]
        gw = launcher.start(config, ready_timeout=30.0)
        src = bench.SETUPS[args.setup].backend
        ns = argparse.Namespace(duration=args.duration, udp_streams=1)
        prof: dict[str, Any] = {}
        if args.spy:
            def spy() -> None:
                time.sleep(0.5)
                prof.update(profile_gateway(gw.pid, args.duration - 1.0, native=args.native,
                                            raw=getattr(args, "raw", "")))

            t = threading.Thread(target=spy)
            t.start()
        perf = None
        if args.perf:
            perf = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-g", "-p", str(gw.pid),
                                     "-o", args.perf, "--", "sleep", str(args.duration - 1.0)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif getattr(args, "syscalls", False):  # how many packets one wake-up handles
            events = ",".join(f"syscalls:sys_enter_{c}" for c in ("epoll_wait", "recvfrom", "sendmsg"))
            perf = subprocess.Popen(["perf", "stat", "-x", ",", "-e", events, "-p", str(gw.pid), "--",
                                     "sleep", str(args.duration - 1.0)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        r = bench.measured(gw, lambda: bench.run_load("udp_pps", lab, src, ns))
        if perf is not None:
            _, err = perf.communicate(timeout=30)
            if err:
                out_sys = {ln.split(",")[2].rsplit("_", 1)[-1]: int(ln.split(",")[0])
                           for ln in err.decode().splitlines() if ln.count(",") >= 3 and ln[0].isdigit()}
                prof["syscalls"] = out_sys
        if args.spy:
            t.join()
        out = {"udp": {k: r[k] for k in ("delivered_pps", "sent_pps")}, "gateway": r["gateway"],
               "profile": prof}
    finally:
        if gw is not None:
            gw.stop(timeout=15.0)
        with contextlib.suppress(Exception):
            launcher.close()
        bench.PROCS.stop_all()
        bench.lab_down(args.prefix)
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench

    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--duration", type=float, default=8.0)
    p.add_argument("--setup", choices=tuple(bench.SETUPS), default="default")
    p.add_argument("--native", action="store_true", help="py-spy --native (C frames too)")
    p.add_argument("--raw", default="", help="keep py-spy's collapsed stacks in this file")
    p.add_argument("--no-spy", dest="spy", action="store_false", help="CPU per packet only")
    p.add_argument("--extra", action="append", default=[], help="a [gateway] line to add")
    p.add_argument("--perf", default="", help="also perf record -g the gateway into this file")
    p.add_argument("--syscalls", action="store_true",
                   help="count epoll_wait, recvfrom, sendmsg of the gateway (perf stat)")
    p.add_argument("--gw-cmd", action="append", default=[], help="command to run in the gateway netns first")
    p.add_argument("--wrap", default="", help="run this Python file instead of snatgw (experiments)")
    p.add_argument("--prefix", default="prof")
    p.add_argument("--json", default="")
    args = p.parse_args(argv)
    with bench.lab_lock(args.prefix):
        out = run(args, bench)
    g = out["gateway"]
    print(f"UDP {out['udp']['delivered_pps']:,.0f} pkt/s delivered of {out['udp']['sent_pps']:,.0f} "
          f"sent; gateway {g['cpu_us_per_packet']:.2f} us/pkt (user {g['user_us_per_packet']:.2f}, "
          f"system {g['system_us_per_packet']:.2f}) over {g['packets']:,} pkts, "
          f"queue full {g['nfqueue']['queue_dropped']:,}")
    prof = out.get("profile") or {}
    if prof.get("error"):
        print(f"profile: {prof['error']}")
    if prof.get("syscalls"):
        print(f"syscalls: {prof['syscalls']}")
    for t in prof.get("top", []):
        print(f"  {t['share']:6.1%}  {t['function']}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
