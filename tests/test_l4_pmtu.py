"""Path MTU discovery through lb: the link from lb to backend1 has MTU 1280
(backend1's own side keeps 1500, so its SYN-ACK advertises a 1460-byte MSS
and only the path in between is narrow). A client uploading through the VIP
sends 1500-byte segments with DF; lb's XDP program answers the first with
"fragmentation needed" quoting it as the client sent it (client -> VIP), so
the client's stack lowers its path MTU and the transfer completes. Quoting
the rewritten packet (client -> backend1), as the kernel would if it were
left to forward it, makes the client ignore the error and the upload stall."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.dataplane.dataplane import L4Service
from lb.dataplane.maps import Endpoint
from lb.dataplane.structs import Counter
from lb.lab import Lab
from lb.model import XdpMode
from tests.l4_lab import L4Lab, answer_with_byte_count, l4_lab, link_mtu, tcp_server, tcp_vip, upload

pytestmark = pytest.mark.root

SINK_PORT = 9500
NARROW_MTU = 1280
UPLOAD = 2 * 1024 * 1024


@pytest.fixture(scope="module")
def narrow(lab: Lab) -> Iterator[L4Lab]:
    with link_mtu(lab.lb_ns, lab.backends[0].lb_ifname, NARROW_MTU), l4_lab(lab, XdpMode.NATIVE) as attached:
        yield attached


@pytest.fixture()
def sink(narrow: L4Lab) -> Iterator[None]:
    """On backend1, SINK_PORT: reads until EOF, answers with the byte count."""
    backend = narrow.lab.backends[0]
    with tcp_server(backend.netns, backend.address, SINK_PORT, answer_with_byte_count):
        yield


@pytest.mark.parametrize("mode", ["nat", "full-nat"])
def test_a_large_upload_completes_over_a_narrow_target_link(narrow: L4Lab, sink: None, mode: str) -> None:
    backend = narrow.lab.backends[0]
    target = Endpoint(ipaddress.IPv4Address(backend.address), SINK_PORT)
    narrow.dataplane.apply([L4Service(tcp_vip(SINK_PORT), members=((target, 1),), mode=mode)])
    nl.set_sysctl(narrow.lab.client_ns, "net.ipv4.route.flush", "1")  # forget the path MTU learnt before
    before = narrow.maps.counters()
    assert upload(narrow.lab.client_ns, labmod.VIP, SINK_PORT, UPLOAD) == str(UPLOAD)
    after = narrow.maps.counters()
    assert after[Counter.ICMP_TOO_BIG] > before[Counter.ICMP_TOO_BIG]
