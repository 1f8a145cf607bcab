"""lb.hostnet's checks that need no namespace: full NAT's ports against the kernel's ephemeral ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from lb import config as configmod
from lb.hostnet import full_nat_port_clash

CONFIG = """
[load_balancer]
name = "h"
{range}
[[listeners]]
name = "tcp"
protocol = "TCP"
address = "10.0.0.100"
port = 9000
default_action = {{ type = "forward", target_group = "tcp" }}
[[target_groups]]
name = "tcp"
protocol = "TCP"
port = 9000
preserve_client_ip = {preserve}
targets = [{{ id = "10.0.1.11" }}]
"""


def ephemeral(tmp_path: Path, low: int, high: int) -> str:
    path = tmp_path / "ip_local_port_range"
    path.write_text(f"{low}\t{high}\n")
    return str(path)


@pytest.mark.parametrize("range_, preserve, low, high, clash", [
    ("", "false", 32768, 60999, False),  # the defaults: 1024-32767 below Linux's 32768-60999
    ("", "false", 30000, 60999, True),  # a host whose ephemeral ports start lower
    ("full_nat_port_range = [40000, 50000]", "false", 32768, 60999, True),
    ("full_nat_port_range = [40000, 50000]", "true", 32768, 60999, False),  # no full-NAT group: no matter
    ("full_nat_port_range = [61000, 65535]", "false", 32768, 60999, False),
])
def test_full_nat_ports_against_the_ephemeral_range(tmp_path: Path, range_: str, preserve: str, low: int, high: int,
                                                    clash: bool) -> None:
    config = configmod.loads(CONFIG.format(range=range_, preserve=preserve))
    warning = full_nat_port_clash(config, ephemeral(tmp_path, low, high))
    assert (warning is not None) == clash
    if warning:
        assert "full_nat_port_range" in warning and f"{low}-{high}" in warning


def test_an_unreadable_range_is_no_warning(tmp_path: Path) -> None:
    config = configmod.loads(CONFIG.format(range="", preserve="false"))
    assert full_nat_port_clash(config, str(tmp_path / "absent")) is None
