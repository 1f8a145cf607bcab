"""First contact with the kernel: a bcc-compiled XDP program on a lab veth."""

from __future__ import annotations

import pytest

from lb import lab as labmod
from lb import netlink as nl
from lb.lab import Lab
from tests.labclient import http_get

pytestmark = pytest.mark.root

COUNTER_PROGRAM = r"""
BPF_PERCPU_ARRAY(seen, u64, 1);

int xdp_count(struct xdp_md *ctx) {
    u32 slot = 0;
    u64 *packets = seen.lookup(&slot);
    if (packets)
        *packets += 1;
    return XDP_PASS;
}
"""


def test_xdp_counter_sees_real_traffic_in_native_mode(lab: Lab) -> None:
    from bcc import BPF

    bpf = BPF(text=COUNTER_PROGRAM.encode())
    try:
        fn = bpf.load_func(b"xdp_count", BPF.XDP)
        with nl.iproute(lab.lb_ns) as ipr:
            nl.attach_xdp(ipr, labmod.LB_CLIENT_IF, fn.fd, "native")
            try:
                assert nl.xdp_info(ipr, labmod.LB_CLIENT_IF)[0] == "native"
                backend = lab.backends[0]
                for _ in range(5):
                    status, _, body = http_get(lab.client_ns, backend.address, labmod.HTTP_PORT)
                    assert (status, body) == (200, b"backend1\n")
                # Each request is at least SYN, ACK, request, ACK of the reply, FIN.
                assert sum(bpf[b"seen"][0]) >= 5 * 5
            finally:
                nl.detach_xdp(ipr, labmod.LB_CLIENT_IF, "native")
            assert nl.xdp_info(ipr, labmod.LB_CLIENT_IF) == (None, None)
    finally:
        bpf.cleanup()
    # Traffic still flows once the program is gone.
    assert http_get(lab.client_ns, lab.backends[0].address)[0] == 200


def test_run_in_netns_enters_only_the_calling_thread(lab: Lab) -> None:
    import os

    here = os.readlink("/proc/thread-self/ns/net")
    there = nl.run_in_netns(lab.client_ns, os.readlink, "/proc/thread-self/ns/net")
    assert there == f"net:[{nl.netns_inode(lab.client_ns)}]"
    assert os.readlink("/proc/thread-self/ns/net") == here
