"""A bad configuration is refused with file, key and problem; a good one loads."""

from __future__ import annotations

from pathlib import Path

import pytest

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
    """More than 1000 backends behind one address is not allowed (OUTBOUND_MODEL.md)."""
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
