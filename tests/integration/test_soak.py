"""The soak's one-minute form (scripts/soak.py): thousands of flows per second through the
gateway across SIGTERM + start and SIGKILL + start, RSS flat after warm-up, no error."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

from gateway.lab.layout import LabNames

LAB_WHOAMI = False
SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("snatgw_soak", SOAK)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


def test_one_minute_soak_keeps_rss_flat_and_logs_no_error(lab: LabNames, tmp_path: Path) -> None:
    """60 s of churn with two restarts: restored flows, flat RSS, no error line, drop_internal 0."""
    soak = load_soak()
    report = soak.run_soak(lab, tmp_path, duration=60.0, udp_rate=2000)
    print(soak.summary(report))
    assert report["ok"], soak.summary(report)
    assert [g["ended"] for g in report["gateways"]][:2] == ["term rc=0", "kill"]
    assert all(g["restored"] for g in report["gateways"][1:])
    assert report["flows_per_second"] >= 1000
