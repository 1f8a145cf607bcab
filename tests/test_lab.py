"""The namespace lab: idempotent up, clean down, backends that name themselves."""

from __future__ import annotations

import os

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.lab import Lab
from tests.labclient import http_get, tcp_connect, udp_socket
from tests.names import name

pytestmark = pytest.mark.root


def test_backends_answer_http_with_their_names(lab: Lab) -> None:
    for backend in lab.backends:
        status, headers, body = http_get(lab.client_ns, backend.address, labmod.HTTP_PORT)
        assert (status, body) == (200, f"{backend.name}\n".encode())
        assert headers["x-backend"] == backend.name


def test_backends_echo_tcp_and_udp(lab: Lab) -> None:
    for backend in lab.backends:
        with tcp_connect(lab.client_ns, backend.address, labmod.ECHO_PORT) as sock:
            assert sock.recv(64) == f"{backend.name}\n".encode()
            sock.sendall(b"ping")
            assert sock.recv(64) == b"ping"
        with udp_socket(lab.client_ns) as sock:
            sock.sendto(b"ping", (backend.address, labmod.ECHO_PORT))
            data, _ = sock.recvfrom(64)
            assert data == f"{backend.name} ping".encode()


def test_veth_settings_from_lab_notes(lab: Lab) -> None:
    for ns in (lab.client_ns, *(b.netns for b in lab.backends)):
        features = nl.get_features(ns, labmod.HOST_IF)
        assert features["tx-checksum-ip-generic"] is False, ns
        assert features["rx-gro"] is True, ns
    assert nl.get_sysctl(lab.lb_ns, "net.ipv4.ip_forward") == "1"


def test_up_twice_is_a_noop_and_down_removes_everything() -> None:
    the_lab = Lab(name("idem"), backend_count=1)
    try:
        assert the_lab.up() is True
        before = {ns: nl.netns_inode(ns) for ns in the_lab.namespaces}
        server_pids = nl.pids_in_netns(the_lab.backends[0].netns)
        assert the_lab.up() is False
        assert {ns: nl.netns_inode(ns) for ns in the_lab.namespaces} == before
        assert nl.pids_in_netns(the_lab.backends[0].netns) == server_pids
    finally:
        the_lab.down()
    assert not any(nl.netns_exists(ns) for ns in the_lab.namespaces)
    assert not any(nl.pids_in_netns(ns) for ns in the_lab.namespaces)
    assert the_lab.status()["namespaces"] == []
    assert not os.path.exists(the_lab.lab_run_dir)  # the servers' logs go with the lab


def test_half_built_lab_is_rolled_back(monkeypatch: pytest.MonkeyPatch) -> None:
    the_lab = Lab(name("half"), backend_count=2)

    def fail(self: Lab, backend: labmod.Backend) -> None:
        if backend.name == "backend2":
            raise labmod.LabError("injected failure starting backend2")
        original(self, backend)

    original = Lab.start_server
    monkeypatch.setattr(Lab, "start_server", fail)
    try:
        with pytest.raises(labmod.LabError, match="rolled back"):
            the_lab.up()
        assert the_lab.status()["namespaces"] == []
    finally:
        the_lab.down()


def test_down_after_a_crash_leaves_nothing() -> None:
    """A lab whose builder died half-way (namespaces, links and a server left) is
    cleaned by down(), and up() on such a lab rebuilds it from scratch."""
    the_lab = Lab(name("crash"), backend_count=1)
    try:
        nl.create_netns(the_lab.lb_ns)
        nl.create_netns(the_lab.client_ns)
        with nl.iproute(the_lab.lb_ns) as ipr:
            nl.add_veth(ipr, labmod.LB_CLIENT_IF, labmod.HOST_IF, the_lab.client_ns)
        assert the_lab.status()["complete"] is False
        assert the_lab.up() is True
        assert the_lab.status()["complete"] is True
    finally:
        the_lab.down()
    assert not any(nl.netns_exists(ns) for ns in the_lab.namespaces)
