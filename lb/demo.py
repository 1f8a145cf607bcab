"""`sudo make demo`: bring up the lab, put an XDP program on the lb host, send
real traffic from the client, and print what the kernel saw.

This first version attaches a counting XDP program; the full demo (lb up,
VIPs, targets, draining) grows from here.
"""

from __future__ import annotations

import sys

from lb import lab as labmod
from lb import netlink as nl
from lb.lab import Lab

COUNTER_PROGRAM = rb"""
BPF_PERCPU_ARRAY(seen, u64, 1);

int xdp_count(struct xdp_md *ctx) {
    u32 slot = 0;
    u64 *packets = seen.lookup(&slot);
    if (packets)
        *packets += 1;
    return XDP_PASS;
}
"""


def main() -> int:
    import socket

    from bcc import BPF

    lab = Lab()
    print(f"lab: {'built' if lab.up() else 'already up'}: {', '.join(lab.namespaces)}")
    bpf = BPF(text=COUNTER_PROGRAM)
    try:
        fn = bpf.load_func(b"xdp_count", BPF.XDP)
        with nl.iproute(lab.lb_ns) as ipr:
            nl.attach_xdp(ipr, labmod.LB_CLIENT_IF, fn.fd, "native")
            try:
                mode, prog_id = nl.xdp_info(ipr, labmod.LB_CLIENT_IF)
                print(f"xdp: program {prog_id} attached to {lab.lb_ns}/{labmod.LB_CLIENT_IF} in {mode} mode")
                for backend in lab.backends:
                    def get(address: str = backend.address) -> bytes:
                        with socket.create_connection((address, labmod.HTTP_PORT), timeout=5) as sock:
                            sock.sendall(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
                            return b"".join(iter(lambda: sock.recv(65536), b""))
                    body = nl.run_in_netns(lab.client_ns, get).split(b"\r\n\r\n", 1)[1]
                    print(f"client -> {backend.address}:{labmod.HTTP_PORT}: {body.decode().strip()}")
                print(f"xdp: packets seen on {labmod.LB_CLIENT_IF}: {sum(bpf[b'seen'][0])}")
            finally:
                nl.detach_xdp(ipr, labmod.LB_CLIENT_IF, "native")
                print("xdp: detached")
    finally:
        bpf.cleanup()
    print("lab is still up: `sudo .venv/bin/lb lab down` removes it")
    return 0


if __name__ == "__main__":
    sys.exit(main())
