"""A bad configuration is refused with file, key and problem; a good one loads."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import ConfigError, load, parse

LAB = Path(__file__).resolve().parents[2] / "deploy" / "examples" / "lab.toml"
BASE = LAB.read_text()


def test_lab_example_loads() -> None:
    """The shipped lab configuration is valid and complete."""
    cfg = load(LAB)
    assert (cfg.inside, cfg.outside, cfg.queue) == ("in0", "out0", 0)
    assert cfg.model.timeouts.idle == 240
    assert len(cfg.model.public_addresses()) == 4


def test_every_shipped_example_loads() -> None:
    """Every example under deploy/examples is a valid configuration."""
    for path in LAB.parent.glob("*.toml"):
        load(path)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        (BASE + "\n[bogus]\n", "bogus"),
        (BASE.replace("queue = 0", "queue = 0\nspeed = 3"), "gateway.speed"),
        (BASE.replace('ip = "198.51.100.10"', 'ip = "198.51.100.300"'), "frontends[0].ip"),
        (BASE.replace('pool = "web"', 'pool = "nope"'), "lb_rules[0].pool"),
        (BASE.replace('frontend = "fe-web"', 'frontend = "nope"'), "lb_rules[0].frontend"),
        (BASE.replace('public = "198.51.100.20"', 'public = "198.51.100.10"'), "instance_ips[0].public"),
        (BASE.replace('protocol = "tcp"', 'protocol = "sctp"'), "lb_rules[0].protocol"),
        (BASE.replace("idle_timeout = 240", "idle_timeout = -1"), "gateway.idle_timeout"),
        (BASE.replace("frontend_port = 80", "frontend_port = 70000"), "lb_rules[0].frontend_port"),
        (BASE.replace('inside = "in0"', 'inside = "out0"'), "gateway.outside"),
        (BASE.replace("[gateway]", "[gateway"), "(syntax)"),
    ],
)
def test_bad_config_names_the_key(text: str, key: str) -> None:
    """Each kind of mistake is reported against the key that holds it."""
    with pytest.raises(ConfigError) as exc:
        parse(text, "/etc/snatgw/x.toml")
    assert exc.value.key == key
    assert str(exc.value).startswith("/etc/snatgw/x.toml: ")
    assert "\n" not in str(exc.value)


def test_pool_over_1000_members_is_refused() -> None:
    """More than 1000 backends behind one address is not allowed (docs/model.md)."""
    members = ", ".join(f'"10.20.{i // 250}.{i % 250 + 1}"' for i in range(1001))
    text = BASE.replace('members = ["10.10.1.1", "10.10.1.2", "10.10.1.3"]', f"members = [{members}]")
    with pytest.raises(ConfigError) as exc:
        parse(text, "x.toml")
    assert exc.value.key == "pools[0].members"


def test_two_pools_over_1000_on_one_frontend_are_refused() -> None:
    """The limit counts every backend sharing the frontend address, across pools."""
    a = ", ".join(f'"10.20.{i // 250}.{i % 250 + 1}"' for i in range(600))
    b = ", ".join(f'"10.30.{i // 250}.{i % 250 + 1}"' for i in range(600))
    text = BASE.replace('members = ["10.10.1.1", "10.10.1.2", "10.10.1.3"]', f"members = [{a}]")
    text += f'\n[[pools]]\nname = "b"\nmembers = [{b}]\n'
    text += '\n[[lb_rules]]\nname = "b"\nfrontend = "fe-web"\npool = "b"\nprotocol = "udp"\n'
    text += "frontend_port = 53\nbackend_port = 53\n"
    with pytest.raises(ConfigError) as exc:
        parse(text, "x.toml")
    assert exc.value.key == "frontends[fe-web]"


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing file is reported like any other configuration problem."""
    with pytest.raises(ConfigError) as exc:
        load(tmp_path / "missing.toml")
    assert exc.value.key == "(file)"


GW_LINE = "queue = 0"


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("high_water = 0", "gateway.high_water"),
        ("high_water = 1.5", "gateway.high_water"),
        ("high_water = true", "gateway.high_water"),
        ('control_socket = "relative.sock"', "gateway.control_socket"),
        (f'control_socket = "/{"x" * 120}"', "gateway.control_socket"),
        ('control_group = ""', "gateway.control_group"),
        ('metrics = "9469"', "gateway.metrics"),
        ('metrics = "127.0.0.1:99999"', "gateway.metrics"),
        ('metrics = ":9469"', "gateway.metrics"),
    ],
)
def test_bad_operator_keys_name_the_key(extra: str, key: str) -> None:
    """The operator's keys (high_water, control socket and group, metrics) are checked like the rest."""
    with pytest.raises(ConfigError) as exc:
        parse(BASE.replace(GW_LINE, f"{GW_LINE}\n{extra}"), "x.toml")
    assert exc.value.key == key


def test_operator_keys_load_with_their_defaults() -> None:
    """Without the keys: socket under /run/snatgw, root only, no metrics, 80% high water."""
    cfg = parse(BASE, "x.toml")
    assert cfg.control_socket == "/run/snatgw/snatgw.sock" and cfg.control_group is None
    assert cfg.metrics is None and cfg.model.high_water == 0.8
    extra = 'high_water = 0.5\ncontrol_group = "adm"\nmetrics = "[::1]:9469"\ncontrol_socket = "/run/x.sock"'
    cfg = parse(BASE.replace(GW_LINE, f"{GW_LINE}\n{extra}"), "x.toml")
    assert (cfg.model.high_water, cfg.control_group, cfg.metrics) == (0.5, "adm", ("::1", 9469))
    assert cfg.control_socket == "/run/x.sock"


def test_restart_keys_are_the_ones_a_reload_cannot_change() -> None:
    """A reload may change pools and timeouts, not interfaces, queue, socket or metrics."""
    old = parse(BASE, "x.toml")
    same = parse(BASE.replace("idle_timeout = 240", "idle_timeout = 60"), "x.toml")
    assert old.restart_keys(same) == []
    moved = parse(BASE.replace(GW_LINE, 'queue = 3\nmetrics = "127.0.0.1:1"'), "x.toml")
    assert old.restart_keys(moved) == ["gateway.queue", "gateway.metrics"]


_VALUES = st.one_of(
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.booleans(),
    st.lists(st.integers(0, 300), max_size=3),
)
_KEYS = st.sampled_from(
    ["inside", "queue", "queue_maxlen", "queue_client", "idle_timeout", "high_water", "control_socket",
     "control_group", "metrics", "exhaustion_event_interval", "members", "ip", "frontend_port", "ips"]
)  # fmt: skip


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(_KEYS, _VALUES), min_size=1, max_size=4))
def test_fuzzed_values_raise_only_config_errors(edits: list[tuple[str, object]]) -> None:
    """Whatever value a key gets, parse either accepts it or raises ConfigError, nothing else."""
    lines = BASE.splitlines()
    for key, value in edits:
        text = json.dumps(value) if not isinstance(value, float) or value == value else "nan"
        text = text.replace("Infinity", "inf")
        lines = [f"{key} = {text}" if ln.split(" = ")[0] == key else ln for ln in lines]
        if not any(ln.startswith(f"{key} = ") for ln in lines):
            lines.insert(1, f"{key} = {text}")
    with contextlib.suppress(ConfigError):
        parse("\n".join(lines), "x.toml")
