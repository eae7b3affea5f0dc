"""``[gateway] workers``: "auto" or 1..16, refused with file, key and problem when the
queue client or the queue numbers cannot carry it; a restart key."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, auto_workers, parse

LAB = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "lab.toml"
BASE = LAB.read_text()


def _with(value: str, extra: str = "") -> str:
    return BASE.replace("workers = 1\n", f"workers = {value}\n{extra}", 1)


def test_lab_example_runs_one_worker() -> None:
    """The lab's config (what the integration tests start from) says one worker."""
    assert parse(BASE, "lab.toml").workers == 1


def test_explicit_count() -> None:
    """An integer from 1 to 16 is taken as it is."""
    assert parse(_with("4"), "x.toml").workers == 4
    assert parse(_with("16"), "x.toml").workers == 16


def test_auto_is_cpu_count_capped() -> None:
    """"auto" (and no key at all) is one worker per CPU, at most 16."""
    assert parse(_with('"auto"'), "x.toml", cpus=3).workers == 3
    assert parse(_with('"auto"'), "x.toml", cpus=64).workers == 16
    assert parse(BASE.replace("workers = 1\n", ""), "x.toml", cpus=2).workers == 2
    assert auto_workers(0) == 1


def test_auto_with_the_library_client_is_one() -> None:
    """"auto" with queue_client netfilterqueue (one queue, no steering) is one worker."""
    text = _with('"auto"', 'queue_client = "netfilterqueue"\n')
    assert parse(text, "x.toml", cpus=8).workers == 1


def test_auto_fits_the_queue_numbers() -> None:
    """"auto" never asks for queue numbers above 65535."""
    text = _with('"auto"').replace("queue = 0", "queue = 65530")
    assert parse(text, "x.toml", cpus=8).workers == 3


@pytest.mark.parametrize(
    ("value", "extra", "problem"),
    [
        ("0", "", "integer from 1 to 16"),
        ("17", "", "integer from 1 to 16"),
        ('"many"', "", "integer from 1 to 16"),
        ("true", "", "integer from 1 to 16"),
        ("2.0", "", "integer from 1 to 16"),
        ("2", 'queue_client = "netfilterqueue"\n', 'queue_client = "netlink"'),
    ],
)
def test_bad_values_name_the_key(value: str, extra: str, problem: str) -> None:
    """0, 17, a word, a bool, a float, or several workers with the library client: one
    error naming the file and gateway.workers."""
    with pytest.raises(ConfigError) as e:
        parse(_with(value, extra), "bad.toml")
    assert e.value.key == "gateway.workers"
    assert e.value.path == "bad.toml"
    assert problem in e.value.problem
    assert str(e.value).startswith("bad.toml: gateway.workers: ")


def test_queue_numbers_must_fit() -> None:
    """N workers need queues queue..queue+2N-1 below 65536."""
    with pytest.raises(ConfigError) as e:
        parse(_with("4").replace("queue = 0", "queue = 65530"), "bad.toml")
    assert e.value.key == "gateway.workers"
    assert "65537" in e.value.problem
    assert parse(_with("3").replace("queue = 0", "queue = 65530"), "ok.toml").workers == 3


def test_workers_is_a_restart_key() -> None:
    """A reload that changes the worker count is refused (it needs a restart)."""
    one = parse(_with("1"), "x.toml")
    two = parse(_with("2"), "x.toml")
    assert one.restart_keys(two) == ["gateway.workers"]
    assert one.restart_keys(one) == []
