"""The command line's conventions: --version, -c on every command, exit
statuses, one JSON shape for a target, the man page and completion."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import click
from click.testing import CliRunner

import lb
from lb import metrics
from lb.cli import cli
from lb.cli.common import JSON_SCHEMA, LAB_CONFIG, shaped
from lb.cli.manpage import completion, render
from lb.model import LoadBalancer
from tests.names import name

# Commands without a config: the lab (a namespace prefix), and the two that describe lb itself.
NO_CONFIG = {"lb lab up", "lb lab down", "lb lab status", "lb completion", "lb manpage"}


def leaves(group: click.Group, prefix: str = "lb") -> dict[str, click.Command]:
    out: dict[str, click.Command] = {}
    for cmd_name, command in group.commands.items():
        if isinstance(command, click.Group):
            out.update(leaves(command, f"{prefix} {cmd_name}"))
        else:
            out[f"{prefix} {cmd_name}"] = command
    return out


def test_version_everywhere() -> None:
    out = subprocess.run([sys.executable, "-m", "lb", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout == f"lb {lb.__version__}\n"
    assert CliRunner().invoke(cli, ["-V"]).output == f"lb {lb.__version__}\n"
    families = {f.name: f for f in metrics.Collector(lambda: LoadBalancer(name=name("nothing"))).collect()}
    [sample] = families["lb_build_info"].samples
    assert sample.labels == {"version": lb.__version__, "python": platform.python_version()} and sample.value == 1


def test_every_command_takes_c() -> None:
    commands = leaves(cli)
    assert "lb targets register" in commands and "lb validate" in commands
    for command_name, command in commands.items():
        options = {opt for param in command.params for opt in getattr(param, "opts", ())}
        assert ("-c" in options) == (command_name not in NO_CONFIG), command_name


def test_a_target_has_one_json_shape() -> None:
    assert shaped({"target": "10.0.1.11:9000", "slots": 3}) == {"target": {"address": "10.0.1.11", "port": 9000},
                                                                 "slots": 3}
    assert shaped([{"group": "web", "target": "10.0.1.11", "port": 80}]) == [
        {"group": "web", "target": {"address": "10.0.1.11", "port": 80}}]
    assert shaped({"reply": {"target": "[fd00::1]:80"}, "target": None}) == {
        "reply": {"target": {"address": "fd00::1", "port": 80}}, "target": None}
    result = CliRunner().invoke(cli, ["explain", "http", "-c", LAB_CONFIG, "--path", "/", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["schema"] == JSON_SCHEMA
    assert all(set(t["target"]) == {"address", "port"} for g in doc["target_groups"] for t in g["targets"])


def test_man_page_and_completion_cover_every_command() -> None:
    page = render(cli)
    for command_name in leaves(cli):
        if command_name != "lb manpage":
            assert f".B {command_name}" in page, command_name
    assert ".SH EXIT STATUS" in page and ".B 3" in page
    assert "_LB_COMPLETE=bash_complete" in completion(cli, "bash")


def test_register_without_a_daemon_exits_3(tmp_path: Path) -> None:
    config = tmp_path / "lb.toml"
    config.write_text(f'[load_balancer]\nname = "{name("nobody")}"\nadmin_socket = "{tmp_path}/none.sock"\n')
    for args in (["targets", "register", "web", "10.0.1.11"], ["targets", "deregister", "web", "10.0.1.11:80"]):
        result = CliRunner().invoke(cli, [*args, "-c", str(config)])
        assert result.exit_code == 3 and "no daemon" in result.output, result.output
    result = CliRunner().invoke(cli, ["targets", "register", "web", "10.0.1", "-c", str(config)])
    assert result.exit_code == 2 and "is not ADDRESS" in result.output
