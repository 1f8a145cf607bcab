"""vagrant/: a valid Vagrantfile describing the namespace lab's topology, running its config.

`vagrant validate` needs Debian's vagrant and a provider plugin for the
default provider (vagrant-libvirt; no libvirt daemon, box or network):
deploy/install.sh installs both. It runs on a copy of vagrant/, so no
.vagrant/ directory is left in the work tree.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lb import config
from lb import lab as labmod
from lb.lab import Lab

REPO = Path(__file__).resolve().parent.parent
VAGRANT_DIR = REPO / "vagrant"
TOPOLOGY = VAGRANT_DIR / "topology.json"
SCRIPTS = {"client": "client.sh", "lb": "lb.sh", "target": "web.sh"}


@pytest.fixture(scope="module")
def topology() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(TOPOLOGY.read_text())
    return data


def hosts(topology: dict[str, Any], role: str) -> list[dict[str, Any]]:
    return [h for h in topology["hosts"] if h["role"] == role]


def address_on(host: dict[str, Any], network: str) -> str:
    (address,) = [nic["address"] for nic in host["interfaces"] if nic["network"] == network]
    return str(address)


# --- vagrant validate ------------------------------------------------------------------


def run_vagrant_validate(vagrant_dir: Path, **settings: str) -> subprocess.CompletedProcess[str]:
    """`vagrant validate`; `settings`: LB_VAGRANT_* variables (none from the caller's environment)."""
    vagrant = shutil.which("vagrant")
    if vagrant is None:
        pytest.skip("the vagrant binary is missing (deploy/install.sh installs Debian's vagrant)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_VAGRANT_")}
    env |= {"VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1", **settings}
    return subprocess.run([vagrant, "validate"], cwd=vagrant_dir, env=env, capture_output=True, text=True,
                          timeout=120)


def copy_of_vagrant_dir(tmp_path: Path) -> Path:
    """vagrant/ under a stand-in repo root (the Vagrantfile syncs its parent)."""
    copy = tmp_path / "repo" / "vagrant"
    shutil.copytree(VAGRANT_DIR, copy, ignore=shutil.ignore_patterns(".vagrant"))
    return copy


def test_vagrant_validate(tmp_path: Path) -> None:
    result = run_vagrant_validate(copy_of_vagrant_dir(tmp_path))
    output = result.stdout + result.stderr
    hint = "\n(no usable provider? deploy/install.sh installs vagrant-libvirt)" if "provider" in output else ""
    assert result.returncode == 0, output + hint
    assert "Vagrantfile validated successfully" in result.stdout


def test_vagrant_validate_reads_topology_json(tmp_path: Path) -> None:
    """A broken topology.json breaks the Vagrantfile: it really is the source."""
    copy = copy_of_vagrant_dir(tmp_path)
    data = json.loads((copy / "topology.json").read_text())
    data["hosts"][0]["role"] = "no-such-role"
    (copy / "topology.json").write_text(json.dumps(data))
    result = run_vagrant_validate(copy)
    assert result.returncode != 0
    assert "unknown role" in result.stdout + result.stderr


def test_vagrant_validate_with_the_tests_settings(tmp_path: Path) -> None:
    """What vagrant/test/run.sh sets: an offline box, a prefix, TCG, its own management network."""
    wheelhouse = tmp_path / "wheelhouse"
    wheelhouse.mkdir()
    result = run_vagrant_validate(copy_of_vagrant_dir(tmp_path), LB_VAGRANT_BOX="lb/bookworm64-test",
                                  LB_VAGRANT_PREFIX="lbg-vt", LB_VAGRANT_ACCEL="tcg",
                                  LB_VAGRANT_MGMT_NET="192.168.120.0/24", LB_VAGRANT_DISK_CACHE="unsafe",
                                  LB_VAGRANT_WHEELHOUSE=str(wheelhouse))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name, value, message", [
    ("LB_VAGRANT_ACCEL", "hvf", "kvm or tcg"),
    ("LB_VAGRANT_PREFIX", "lb lab", "letters, digits and '-' only"),
])
def test_vagrant_validate_refuses_bad_settings(tmp_path: Path, name: str, value: str, message: str) -> None:
    result = run_vagrant_validate(copy_of_vagrant_dir(tmp_path), **{name: value})
    assert result.returncode != 0
    assert message in result.stdout + result.stderr


def test_vagrantfile_repeats_no_address() -> None:
    code = [line for line in (VAGRANT_DIR / "Vagrantfile").read_text().splitlines()
            if not line.lstrip().startswith("#")]
    assert "topology.json" in "\n".join(code)
    literals = [line for line in code if re.search(r"\b\d{1,3}(\.\d{1,3}){3}\b", line)]
    assert not literals, "addresses belong in topology.json"


def test_provisioning_scripts_exist_and_parse() -> None:
    for script in SCRIPTS.values():
        path = VAGRANT_DIR / "provision" / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    for role, script in SCRIPTS.items():
        assert f'"{role}" => "{script}"' in vagrantfile


# --- the lab booted as a test (sudo make vagrant-test) --------------------------------------


def test_lab_test_scripts_exist_and_parse() -> None:
    for script in ("test/run.sh", "box/build.sh", "wheelhouse.sh"):
        path = VAGRANT_DIR / script
        assert os.access(path, os.X_OK), f"{path} is not executable"
        result = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_box_and_kernel_guest_share_their_debian_root_steps() -> None:
    """vagrant/box/build.sh and tests/kernels/rootfs.sh both debootstrap a
    Debian root: one copy of those steps (deploy/debian-root.sh), sourced by
    both and part of both caches' keys, so a change to it rebuilds both."""
    library = REPO / "deploy" / "debian-root.sh"
    result = subprocess.run(["bash", "-n", str(library)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for builder in (VAGRANT_DIR / "box" / "build.sh", REPO / "tests" / "kernels" / "rootfs.sh"):
        script = builder.read_text()
        assert re.search(r'^\. "\$(here/\.\./\.\.|repo)/deploy/debian-root\.sh"', script, re.M), builder
        assert re.search(r'cat "\$0" "\$debian_root_lib"', script), f"{builder}: the library is not in its cache key"
        assert not re.search(r"^\s*step \S+ debootstrap ", script, re.M), f"{builder} runs debootstrap itself"
        result = subprocess.run(["bash", "-n", str(builder)], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr


def test_lab_test_is_not_part_of_make_test() -> None:
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"^vagrant-test: setup-vagrant\n\t\./vagrant/test/run\.sh$", makefile, re.M)
    (test_rule,) = re.findall(r"^test:(.*)$", makefile, re.M)
    assert "vagrant" not in test_rule
    pyproject = (REPO / "pyproject.toml").read_text()
    assert 'testpaths = ["tests"]' in pyproject  # so pytest never collects vagrant/test/


def test_walkthrough_skips_without_a_lab() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LB_VAGRANT_")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             str(VAGRANT_DIR / "test" / "test_walkthrough.py")],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"\b\d+ skipped\b", result.stdout) and "passed" not in result.stdout, result.stdout


def test_lb_vm_uses_the_wheelhouse_when_given_one() -> None:
    vagrantfile = (VAGRANT_DIR / "Vagrantfile").read_text()
    assert '"LAB_WHEELHOUSE" =>' in vagrantfile
    script = (VAGRANT_DIR / "provision" / "lb.sh").read_text()
    assert 'export PIP_NO_INDEX=1 PIP_FIND_LINKS="$LAB_WHEELHOUSE"' in script
    assert script.index("PIP_NO_INDEX") < script.index("deploy/install.sh\" --system")


# --- the same topology as lb/lab.py ------------------------------------------------------


def test_topology_has_the_labs_hosts(topology: dict[str, Any]) -> None:
    assert topology["box"] == "debian/bookworm64"
    assert len(hosts(topology, "client")) == 1
    assert len(hosts(topology, "lb")) == 1  # two later, for ECMP
    targets = hosts(topology, "target")
    assert [h["name"] for h in targets] == ["web1", "web2", "web3"]
    assert [h["lab_name"] for h in targets] == [b.name for b in Lab().backends]
    assert hosts(topology, "client")[0]["lab_name"] == "client"
    assert hosts(topology, "lb")[0]["lab_name"] == "lb"
    assert {h["role"] for h in topology["hosts"]} == set(SCRIPTS)


def test_topology_addresses_match_the_namespace_lab(topology: dict[str, Any]) -> None:
    (client,) = hosts(topology, "client")
    (lb,) = hosts(topology, "lb")
    targets = hosts(topology, "target")
    assert address_on(client, "client") == labmod.CLIENT_ADDR
    assert address_on(lb, "client") == labmod.LB_CLIENT_ADDR
    assert address_on(lb, "backend") == labmod.BACKEND_GATEWAY
    assert tuple(address_on(t, "backend") for t in targets) == labmod.BACKEND_ADDRS
    assert topology["vip"] == labmod.VIP
    assert topology["ports"] == {"http": labmod.HTTP_PORT, "echo": labmod.ECHO_PORT}
    networks = topology["networks"]
    assert networks["client"]["prefixlen"] == labmod.CLIENT_NET_PREFIXLEN
    assert networks["backend"]["prefixlen"] == labmod.BACKEND_NET_PREFIXLEN
    assert networks["client"]["gateway"] == labmod.LB_CLIENT_ADDR
    assert networks["backend"]["gateway"] == labmod.BACKEND_GATEWAY


def test_topology_addresses_lie_in_their_networks(topology: dict[str, Any]) -> None:
    nets = {name: ipaddress.ip_network(f"{n['subnet']}/{n['prefixlen']}") for name, n in topology["networks"].items()}
    assert ipaddress.ip_address(topology["vip"]) in nets["client"]
    for name, net in topology["networks"].items():
        assert ipaddress.ip_address(net["gateway"]) in nets[name]
    seen = []
    for host in topology["hosts"]:
        ifnames = [nic["ifname"] for nic in host["interfaces"]]
        # Vagrant adds private networks after the management NIC eth0, in order.
        assert ifnames == [f"eth{i}" for i in range(1, len(ifnames) + 1)], host["name"]
        for nic in host["interfaces"]:
            assert ipaddress.ip_address(nic["address"]) in nets[nic["network"]], (host["name"], nic)
            seen.append(nic["address"])
    assert len(seen) == len(set(seen)), "an address is used twice"


# --- the same config as lb/data/default.toml -----------------------------------------------


def test_vagrant_config_serves_the_labs_listeners_and_groups(topology: dict[str, Any]) -> None:
    vm = config.load(VAGRANT_DIR / "lb.toml")
    lab = config.load_default()

    def endpoints(lb: Any) -> list[tuple[str, str, str, int]]:
        return [(x.name, x.protocol.value, str(x.address), x.port) for x in lb.listeners]

    def groups(lb: Any) -> list[tuple[str, list[str]]]:
        return [(g.name, [f"{t.address}:{t.port or g.port}" for t in g.targets]) for g in lb.target_groups]

    assert endpoints(vm) == endpoints(lab)
    assert groups(vm) == groups(lab)
    # Word for word: rules, actions, health checks and timers too.
    assert vm.listeners == lab.listeners
    assert vm.target_groups == lab.target_groups
    assert {str(x.address) for x in vm.listeners} == {topology["vip"]}


def test_vagrant_config_runs_on_the_lb_vms_nics(topology: dict[str, Any]) -> None:
    vm = config.load(VAGRANT_DIR / "lb.toml")
    (lb,) = hosts(topology, "lb")
    assert vm.netns is None, "lb runs in the VM's own namespace"
    assert list(vm.interfaces) == [nic["ifname"] for nic in lb["interfaces"]]
    # provision/lb.sh rewrites this one line to the NICs that carry lb's addresses.
    lines = [line for line in (VAGRANT_DIR / "lb.toml").read_text().splitlines() if line.startswith("interfaces = ")]
    assert len(lines) == 1
