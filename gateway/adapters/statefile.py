"""The state file on disk: read at start, written at stop and every few seconds
(README, "Restarts and upgrades"; the format is :mod:`gateway.core.persist`).

Writing is atomic: the bytes go to a temporary file in the same directory,
which is fsynced and renamed over the old file (and the directory fsynced), so
a crash or a SIGKILL at any moment leaves either the old file or the new one.

The periodic snapshot never reads the table from its own thread: it asks the
packet loop (``PacketLoop.call``) to start a snapshot and then to copy it in
slices of :data:`SLICE` flows, each one short pause between two batches; the
encoding and the writing happen in the saver's thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from structlog.typing import FilteringBoundLogger

from gateway.adapters.loop import PacketLoop
from gateway.core import persist
from gateway.core import restore as reader
from gateway.core.errors import StateError
from gateway.core.table import TranslationTable

#: Flows copied per loop pause (about 2.5 ms per 5,000 flows on the lab machine).
SLICE = 5_000
#: Seconds the periodic saver sleeps after each encoded chunk. Encoding runs in
#: Python, and while it holds the interpreter a packet waits (up to the switch
#: interval, 5 ms); sleeping between ~0.5 ms chunks keeps that wait short and rare,
#: at the price of a longer save (100,000 flows: a few seconds).
YIELD = 0.002
#: The file name under systemd's ``$STATE_DIRECTORY`` when the config names none.
DEFAULT_NAME = "state.json"


def state_path(configured: str | None) -> Path | None:
    """Where the state lives: the configured path; unset, ``$STATE_DIRECTORY/state.json``
    (systemd's StateDirectory=); ``""`` or neither: nowhere (no state is kept)."""
    if configured is not None:
        return Path(configured) if configured else None
    directory = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
    return Path(directory) / DEFAULT_NAME if directory else None


def worker_path(path: Path | None, index: int, count: int) -> Path | None:
    """Worker ``index`` of ``count``'s own state file: the state path with a suffix naming
    both (docs/decisions.md, "Workers: processes and the supervisor"). Its flows hold ports
    of that worker's slice only, so a file written with another worker count is not read."""
    if path is None:
        return None
    return path.with_name(f"{path.name}.worker{index}of{count}")


def foreign_files(path: Path | None, count: int) -> list[Path]:
    """State files next to ``path`` written with a worker count other than ``count``
    (the plain file is one gateway's, ``.workerIofN`` an N-worker gateway's): ignored at
    start, and said so."""
    if path is None or not path.parent.is_dir():
        return []
    mine = {worker_path(path, i, count) for i in range(count)} if count > 1 else {path}
    found = [p for p in path.parent.glob(f"{path.name}.worker*of*") if p not in mine]
    if count > 1 and path.exists():
        found.append(path)
    return sorted(found)


def write_atomic(path: Path, chunks: Iterable[bytes], pause: float = 0.0) -> int:
    """Write ``chunks`` to ``path`` atomically (temp file, fsync, rename); returns the size.
    ``pause``: seconds to sleep after each chunk (the periodic save leaves the
    interpreter to the packet loop)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.tmp")
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
                size += len(chunk)
                if pause:
                    time.sleep(pause)  # pacing the save, not waiting for a condition
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return size


def restore(table: TranslationTable, path: Path | None, log: FilteringBoundLogger) -> None:
    """Put the flows of the state file back into the (fresh) table; one event either way.

    A missing, unreadable, corrupt or incompatible file is logged
    (``state_not_restored``) and the gateway starts with an empty table.
    """
    if path is None:
        return
    began = time.monotonic()
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        log.info("state_not_restored", path=str(path), reason="missing")
        return
    except OSError as e:
        log.warning("state_not_restored", path=str(path), reason=f"unreadable: {e}")
        return
    try:
        summary = reader.restore(table, data, time.monotonic(), time.time())
    except StateError as e:
        log.warning("state_not_restored", path=str(path), reason=f"refused: {e}")
        return
    took = round((time.monotonic() - began) * 1000, 1)
    log.info("state_restored", path=str(path), took_ms=took, **reader.summary_fields(summary))


class StateSaver:
    """Saves the table every ``interval`` seconds from a thread of its own, and once at stop."""

    def __init__(
        self,
        table: TranslationTable,
        loop: PacketLoop,
        log: FilteringBoundLogger,
        settings: Callable[[], tuple[Path | None, float]],
    ) -> None:
        self.table = table
        self.loop = loop
        self.log = log
        #: (path, interval) of the running configuration (a reload may change them).
        self.settings = settings
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._failing = False
        #: The longest single loop pause of the last periodic snapshot (ms), and its flows.
        self.last_pause_ms = 0.0
        self.last_flows = 0

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="snatgw-state", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            path, interval = self.settings()
            if self._stop.wait(interval):
                return
            if path is None:
                continue
            try:
                self._periodic(path)
            except TimeoutError:  # the loop is stopping (or stuck): the stop saves
                return
            except OSError as e:
                if not self._failing:
                    self.log.error("state_save_failed", path=str(path), problem=str(e))
                self._failing = True

    def _periodic(self, path: Path) -> None:
        loop = self.loop
        pauses: list[float] = []

        def timed(fn: Callable[[], object]) -> object:
            t0 = time.perf_counter()
            try:
                return fn()
            finally:
                pauses.append(time.perf_counter() - t0)

        snap: persist.Snapshot = loop.call(
            lambda: timed(lambda: persist.begin(self.table, time.monotonic(), time.time()))
        )
        while not loop.call(lambda: timed(lambda: snap.copy(SLICE))):
            if self._stop.is_set():
                return
        with self._lock:
            if self._stop.is_set():
                return
            write_atomic(path, persist.encode_chunks(snap), YIELD)
        self.last_pause_ms = round(max(pauses) * 1000, 2)
        self.last_flows = snap.copied
        if self._failing:
            self.log.info("state_save_recovered", path=str(path))
            self._failing = False

    def stop_and_save(self) -> None:
        """Stop the thread and write the table once more. For the loop's thread once the
        loop has ended (nothing else touches the table then)."""
        self._stop.set()
        path, _interval = self.settings()
        with self._lock:  # a periodic write in progress finishes first
            if path is None:
                return
            began = time.monotonic()
            snap = persist.snapshot(self.table, time.monotonic(), time.time())
            try:
                size = write_atomic(path, persist.encode_chunks(snap))
            except OSError as e:
                self.log.error("state_save_failed", path=str(path), problem=str(e))
                return
        took = round((time.monotonic() - began) * 1000, 1)
        self.log.info("state_saved", path=str(path), flows=snap.copied, bytes=size, took_ms=took)
