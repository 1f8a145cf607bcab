"""vagrant/scale-out/: the router VM and two lb VMs of the scale-out lab,
checked statically (never booted here): a valid Vagrantfile, the topology of
`lb lab up --hosts 2` (lb/labhosts.py), provisioning scripts that parse, a
router BIRD config BIRD accepts, and an lb config per VM that lb accepts."""

from __future__ import annotations

import ipaddress
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from lb import config
from lb import lab as labmod
from lb.labhosts import LB_AS, ROUTER_AS, ScaleLab
from tests.test_vagrant import copy_of_vagrant_dir, run_vagrant_validate

SCALE_DIR = Path(__file__).resolve().parent.parent / "vagrant" / "scale-out"
SCRIPTS = {"client": "../provision/client.sh", "router": "provision/router.sh", "lb": "provision/lb.sh",
           "target": "../provision/web.sh"}
LAB = ScaleLab("x", hosts=2)


@pytest.fixture(scope="module")
def topology() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((SCALE_DIR / "topology.json").read_text())
    return data


def by_role(topology: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [h for h in topology["hosts"] if h["role"] == role]


def addresses(host: dict[str, Any]) -> dict[str, str]:
    return {nic["network"]: nic["address"] for nic in host["interfaces"]}


def test_vagrant_validate(tmp_path: Path) -> None:
    result = run_vagrant_validate(copy_of_vagrant_dir(tmp_path) / "scale-out")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Vagrantfile validated successfully" in result.stdout


def test_topology_is_the_namespace_scale_out_lab(topology: dict[str, Any]) -> None:
    assert topology["vip"] == labmod.VIP
    assert (topology["router_as"], topology["lb_as"]) == (ROUTER_AS, LB_AS)
    (router,) = by_role(topology, "router")
    assert addresses(router)["client"] == labmod.LB_CLIENT_ADDR
    lbs = by_role(topology, "lb")
    assert len(lbs) == len(LAB.lb_hosts)
    for vm, host in zip(lbs, LAB.lb_hosts, strict=True):
        uplink = f"uplink{host.index}"
        assert addresses(vm) == {uplink: host.address, "backend": host.gateway}
        assert addresses(router)[uplink] == host.router_address == topology["networks"][uplink]["gateway"]
    assert topology["networks"]["backend"]["gateway"].split() == [h.gateway for h in LAB.lb_hosts]
    assert [addresses(t)["backend"] for t in by_role(topology, "target")] == list(labmod.BACKEND_ADDRS)
    nets = {n: ipaddress.ip_network(f"{v['subnet']}/{v['prefixlen']}") for n, v in topology["networks"].items()}
    for host in topology["hosts"]:
        for nic in host["interfaces"]:
            assert ipaddress.ip_address(nic["address"]) in nets[nic["network"]], (host["name"], nic)


def test_vagrantfile_repeats_no_address() -> None:
    code = [line for line in (SCALE_DIR / "Vagrantfile").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert not [line for line in code if re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", line)]


def test_provisioning_scripts_exist_and_parse() -> None:
    vagrantfile = (SCALE_DIR / "Vagrantfile").read_text()
    for role, script in SCRIPTS.items():
        path = SCALE_DIR / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        assert f'"{role}" => "{script}"' in vagrantfile


def test_router_bird_config(topology: dict[str, Any], tmp_path: Path) -> None:
    text = (SCALE_DIR / "router-bird.conf").read_text()
    result = subprocess.run(["bird", "-p", "-c", str(SCALE_DIR / "router-bird.conf")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "merge paths on" in text and f"local as {ROUTER_AS}" in text
    peers = re.findall(r"neighbor (\S+) as (\d+);", text)
    assert peers == [(addresses(vm)[f"uplink{i}"], str(LB_AS)) for i, vm in enumerate(by_role(topology, "lb"), 1)]


def test_each_lb_vms_config_is_valid(topology: dict[str, Any]) -> None:
    """vagrant/lb.toml with the BGP table provision/lb.sh appends, for each VM."""
    base = (SCALE_DIR.parent / "lb.toml").read_text()
    template = (SCALE_DIR / "lb-bgp.toml.in").read_text()
    for index, vm in enumerate(by_role(topology, "lb"), 1):
        uplink = f"uplink{index}"
        values = {"ROUTER_ID": addresses(vm)[uplink], "NEIGHBOR": topology["networks"][uplink]["gateway"],
                  "ROUTER_AS": str(topology["router_as"]), "LB_AS": str(topology["lb_as"])}
        text = base + re.sub(r"@(\w+)@", lambda m: values[m.group(1)], template)
        lb = config.loads(text, f"{vm['name']}:/etc/lb/lb.toml")
        assert lb.bgp is not None
        assert str(lb.bgp.router_id) == values["ROUTER_ID"]
        assert [str(n.address) for n in lb.bgp.neighbors] == [values["NEIGHBOR"]]
        assert [str(a) for a in lb.bgp.announce] == [topology["vip"]]
