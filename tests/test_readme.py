"""The README's configuration reference cannot drift from the code."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from pathlib import Path

import pytest

from lb import config as configmod
from lb import model

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def reference_table(heading: str) -> dict[str, list[str]]:
    """key -> the other cells of its row, from the table under `### heading`."""
    section = README.split(f"### {heading}\n", 1)[1].split("\n### ", 1)[0].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        found = re.fullmatch(r"`(\w+)`", cells[0]) if line.startswith("|") else None
        if found:
            rows[found.group(1)] = cells[1:]
    return rows


@pytest.mark.parametrize("heading, keys", [
    ("`[load_balancer]`", configmod.LB_KEYS),
    ("`[[listeners]]`", configmod.LISTENER_KEYS),
    ("`[[target_groups]]`", configmod.GROUP_KEYS),
    ("`health_check`", configmod.HEALTH_KEYS),
    ("`access_log`", configmod.ACCESS_LOG_KEYS),
])
def test_every_key_is_documented_and_nothing_else(heading: str, keys: tuple[str, ...]) -> None:
    assert sorted(reference_table(heading)) == sorted(keys)


def literal(cell: str) -> object:
    return tomllib.loads(f"v = {cell.strip('`')}")["v"]


def test_load_balancer_defaults_match_the_model() -> None:
    table = reference_table("`[load_balancer]`")
    defaults = {f.name: f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(model.LoadBalancer)}
    for key, (default, _allowed) in table.items():
        if default == "required" or key in ("netns", "bgp"):  # none: no TOML literal
            continue
        want = plain(defaults[key])
        shown = [] if default.startswith("`[]`") else literal(default)
        assert shown == want, key


def plain(value: object) -> object:
    """A model value as TOML shows it: tuples as lists, enums as their values, dataclasses as tables."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    return getattr(value, "value", value)


def test_access_log_defaults_match_the_model() -> None:
    table = reference_table("`access_log`")
    want = plain(model.AccessLog())
    assert isinstance(want, dict)
    for key, (default, _allowed) in table.items():
        assert literal(default) == want[key], key


def test_group_and_health_check_defaults_match_the_config() -> None:
    text = """
[load_balancer]
name = "x"
[[target_groups]]
name = "h"
protocol = "HTTP"
port = 80
[[target_groups]]
name = "t"
protocol = "TCP"
port = 9000
"""
    lb = configmod.loads(text)
    http, tcp = lb.target_group("h"), lb.target_group("t")
    assert (tcp.unhealthy_connection_termination, tcp.deregistration_connection_termination) == (True, False)
    groups = reference_table("`[[target_groups]]`")
    for key in ("deregistration_delay", "slow_start", "algorithm", "unhealthy_connection_termination",
                "deregistration_connection_termination"):
        value = getattr(http, key)
        assert literal(groups[key][0]) == getattr(value, "value", value), key
    checks = reference_table("`health_check`")
    for key in ("enabled", "protocol", "path", "method", "interval", "timeout", "healthy_threshold",
                "unhealthy_threshold", "matcher"):
        for column, check in ((0, http.health_check), (1, tcp.health_check)):
            shown = checks[key][column]
            if shown == "–" or not shown.startswith("`") or " if " in shown:
                continue
            value = getattr(check, key)
            assert literal(shown) == getattr(value, "value", value), (key, column)


def test_the_two_commands_are_the_makefile_targets() -> None:
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    assert "sudo make demo" in README and "sudo make test" in README
    for target in ("demo", "test"):
        assert re.search(rf"^{target}: setup$", makefile, re.M), target
    assert re.search(r"^setup:\n\t\./deploy/install\.sh$", makefile, re.M)
