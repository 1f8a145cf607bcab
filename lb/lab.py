"""The namespace lab: the Vagrant topology built from network namespaces.

    client (10.0.0.2) ──eth0═══to-client── lb (10.0.0.1, VIP 10.0.0.100) ──to-backendN═══eth0── backendN (10.0.1.1N)
           (fd00::2)                            (fd00::1)                                            (fd00:1::1N)

One namespace per host, one veth pair per link, addresses from 10.0.0.0/16,
which exists only inside these namespaces (nothing in the root namespace is
touched, and no traffic leaves them). Every backend routes its replies back
through the lb namespace (default route via 10.0.1.1), as NAT forwarding
needs, and runs `lb.labserver` (HTTP on 80, HTTPS on 443, TCP and UDP echo on 9000).
IPv6 addresses (ULA, fd00::/16) sit alongside, the same shape: fd00::/64 on
the client link, fd00:1::1 on every lb-side backend veth with a host route
to the backend's fd00:1::1N, IPv6 forwarding on in lb. They are added
without duplicate address detection, so they are usable at once; the IPv4
side is as it was.

The veth settings come from docs/kernel-notes.md: the senders (client, backends) turn
TX checksum offload off, so XDP rewrites complete checksums, and turn GRO
on, so XDP_REDIRECTed frames into their peer are accepted in native mode;
each also gets an XDP program that passes everything, without which veth
never delivers the frames lb's program sends back with XDP_TX (an ICMP
"fragmentation needed" toward the client) until some other frame comes.

`Lab(prefix).up()` is idempotent and leaves nothing behind when it fails
half-way; `down()` removes every namespace (their veths go with them) and
kills every process still running inside them.
"""

from __future__ import annotations

import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from lb import netlink as nl
from lb.dataplane import libbpf

# --- topology (vagrant/Vagrantfile describes the same addresses) -------------

CLIENT_NET_PREFIXLEN = 24
CLIENT_ADDR = "10.0.0.2"
LB_CLIENT_ADDR = "10.0.0.1"
VIP = "10.0.0.100"
BACKEND_GATEWAY = "10.0.1.1"
BACKEND_NET_PREFIXLEN = 24
BACKEND_ADDRS = ("10.0.1.11", "10.0.1.12", "10.0.1.13")
CLIENT_NET6_PREFIXLEN = 64
CLIENT_ADDR6 = "fd00::2"
LB_CLIENT_ADDR6 = "fd00::1"
VIP6 = "fd00::100"  # an IPv6 VIP in the client link's subnet (not placed by the lab: `lb up` places it)
BACKEND_GATEWAY6 = "fd00:1::1"
BACKEND_NET6_PREFIXLEN = 64
BACKEND_ADDRS6 = ("fd00:1::11", "fd00:1::12", "fd00:1::13")
HTTP_PORT = 80
HTTPS_PORT = 443  # the same server behind TLS (a self-signed certificate), for HTTPS target groups
ECHO_PORT = 9000
LB_CLIENT_IF = "to-client"
HOST_IF = "eth0"  # the interface name inside client and backend namespaces

# Features for the sending ends of the veths (docs/kernel-notes.md).
SENDER_FEATURES = {"tx-checksum-ip-generic": False, "rx-gro": True}

SERVER_READY_TIMEOUT = 10.0


class LabError(RuntimeError):
    """The lab could not be built or torn down; the message says which step."""


@dataclass(frozen=True)
class Backend:
    name: str  # "backend1"
    address: str  # "10.0.1.11"
    netns: str  # "<prefix>-backend1"
    lb_ifname: str  # "to-backend1", the lb side of its link
    address6: str = ""  # "fd00:1::11"; "" in labs without IPv6


@dataclass(frozen=True)
class Lab:
    """The lab's names and addresses; methods build, inspect and remove it."""

    prefix: str = "lab"
    backend_count: int = 3
    backends: tuple[Backend, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 1 <= self.backend_count <= len(BACKEND_ADDRS):
            raise ValueError(f"backend_count must be 1..{len(BACKEND_ADDRS)}")
        backends = tuple(
            Backend(f"backend{i}", BACKEND_ADDRS[i - 1], f"{self.prefix}-backend{i}", f"to-backend{i}",
                    BACKEND_ADDRS6[i - 1])
            for i in range(1, self.backend_count + 1)
        )
        object.__setattr__(self, "backends", backends)

    @property
    def client_ns(self) -> str:
        return f"{self.prefix}-client"

    @property
    def lb_ns(self) -> str:
        return f"{self.prefix}-lb"

    @property
    def namespaces(self) -> tuple[str, ...]:
        return (self.client_ns, self.lb_ns, *(b.netns for b in self.backends))

    @property
    def lb_interfaces(self) -> tuple[str, ...]:
        return (LB_CLIENT_IF, *(b.lb_ifname for b in self.backends))

    # --- lifecycle -----------------------------------------------------------

    def up(self) -> bool:
        """Build the lab. Returns False when it was already complete (no-op)."""
        state = self.status()
        if state["complete"]:
            return False
        if state["namespaces"]:
            self.down()  # a half-built or damaged lab: start clean
        try:
            self._build()
        except BaseException as exc:
            self.down()
            if isinstance(exc, (OSError, LabError)) or type(exc).__module__.startswith("pyroute2"):
                raise LabError(f"lab up failed, rolled back: {exc}") from exc
            raise
        return True

    def down(self) -> list[str]:
        """Kill the lab's processes, remove its namespaces and its run
        directory (the servers' logs); returns the namespaces it removed."""
        removed = []
        for ns in self.namespaces:
            self._kill_processes(ns)
        _reap_children()
        for ns in self.namespaces:
            if nl.netns_exists(ns):
                nl.remove_netns(ns)
                removed.append(ns)
        shutil.rmtree(self.lab_run_dir, ignore_errors=True)
        return removed

    def status(self) -> dict[str, Any]:
        """What exists now: namespaces, links up, server processes alive."""
        present = [ns for ns in self.namespaces if nl.netns_exists(ns)]
        links: dict[str, bool] = {}
        if self.lb_ns in present:
            with nl.iproute(self.lb_ns) as ipr:
                links = {ifname: nl.link_is_up(ipr, ifname) for ifname in self.lb_interfaces}
        servers = {b.name: bool(self._server_pids(b)) for b in self.backends}
        complete = (
            len(present) == len(self.namespaces)
            and all(links.get(i, False) for i in self.lb_interfaces)
            and all(servers.values())
        )
        return {"prefix": self.prefix, "namespaces": present, "links": links, "servers": servers, "complete": complete}

    # --- building ------------------------------------------------------------

    def _build(self) -> None:
        for ns in self.namespaces:
            nl.create_netns(ns)
        with nl.iproute(self.lb_ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_veth(ipr, LB_CLIENT_IF, HOST_IF, self.client_ns)
            nl.add_address(ipr, LB_CLIENT_IF, LB_CLIENT_ADDR, CLIENT_NET_PREFIXLEN)
            nl.add_address(ipr, LB_CLIENT_IF, LB_CLIENT_ADDR6, CLIENT_NET6_PREFIXLEN, nodad=True)
            nl.set_up(ipr, LB_CLIENT_IF)
            for b in self.backends:
                # A point-to-point link per backend: the gateway address on
                # every lb-side veth, a host route to the backend behind it.
                nl.add_veth(ipr, b.lb_ifname, HOST_IF, b.netns)
                nl.add_address(ipr, b.lb_ifname, BACKEND_GATEWAY, 32)
                nl.set_up(ipr, b.lb_ifname)
                nl.add_route(ipr, f"{b.address}/32", oif=b.lb_ifname)
                nl.add_address(ipr, b.lb_ifname, BACKEND_GATEWAY6, 128, nodad=True)
                nl.add_route(ipr, f"{b.address6}/128", oif=b.lb_ifname)
        nl.set_sysctl(self.lb_ns, "net.ipv4.ip_forward", "1")
        nl.set_sysctl(self.lb_ns, "net.ipv6.conf.all.forwarding", "1")
        self._configure_host(self.client_ns, CLIENT_ADDR, CLIENT_NET_PREFIXLEN, LB_CLIENT_ADDR)
        self._configure_host6(self.client_ns, CLIENT_ADDR6, CLIENT_NET6_PREFIXLEN, LB_CLIENT_ADDR6)
        for b in self.backends:
            self._configure_host(b.netns, b.address, BACKEND_NET_PREFIXLEN, BACKEND_GATEWAY)
            self._configure_host6(b.netns, b.address6, BACKEND_NET6_PREFIXLEN, BACKEND_GATEWAY6)
        for b in self.backends:
            self.start_server(b)

    def _configure_host(self, ns: str, address: str, prefixlen: int, gateway: str) -> None:
        with nl.iproute(ns) as ipr:
            nl.set_up(ipr, "lo")
            nl.add_address(ipr, HOST_IF, address, prefixlen)
            nl.set_up(ipr, HOST_IF)
            nl.add_route(ipr, "default", gateway=gateway)
        nl.set_features(ns, HOST_IF, SENDER_FEATURES)
        attach_pass_program(ns, HOST_IF)

    @staticmethod
    def _configure_host6(ns: str, address: str, prefixlen: int, gateway: str) -> None:
        with nl.iproute(ns) as ipr:
            nl.add_address(ipr, HOST_IF, address, prefixlen, nodad=True)
            nl.add_route(ipr, "::/0", gateway=gateway)

    def start_server(self, backend: Backend) -> None:
        """Start a backend's lb.labserver and wait until it is ready."""
        log_path = self.log_path(backend)
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "lb.labserver", "--name", backend.name, "--netns", backend.netns,
                 "--http-port", str(HTTP_PORT), "--echo-port", str(ECHO_PORT), "--https-port", str(HTTPS_PORT)],
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `lb lab up`; `down` kills it by namespace
            )
        _CHILDREN.append(proc)
        assert proc.stdout is not None
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            ready = sel.select(SERVER_READY_TIMEOUT)
        line = proc.stdout.readline() if ready else b""
        proc.stdout.close()
        if line.strip() != b"ready":
            proc.kill()
            proc.wait()
            raise LabError(f"{backend.name}'s server did not start; see {log_path}")

    def stop_server(self, backend: Backend) -> None:
        """Kill a backend's server (its namespace and link stay): a dead target."""
        for pid in self._server_pids(backend):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5
        while self._server_pids(backend) and time.monotonic() < deadline:
            time.sleep(0.02)
        _reap_children()

    @property
    def lab_run_dir(self) -> str:
        """Where the lab keeps its files while it is up (the servers' logs)."""
        return f"/run/lb-lab/{self.prefix}"

    def log_path(self, backend: Backend) -> str:
        return f"{self.lab_run_dir}/{backend.name}.log"

    # --- processes -----------------------------------------------------------

    def _server_pids(self, backend: Backend) -> list[int]:
        pids = []
        for pid in nl.pids_in_netns(backend.netns):
            if not _alive(pid):
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"lb.labserver" in f.read():
                        pids.append(pid)
            except OSError:
                continue
        return pids

    @staticmethod
    def _kill_processes(ns: str, timeout: float = 5.0) -> None:
        """SIGTERM every process in the namespace, then SIGKILL what is left."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = nl.pids_in_netns(ns)
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.monotonic() + timeout
            while pids and time.monotonic() < deadline:
                pids = [p for p in pids if _alive(p)]
                time.sleep(0.02)
            if not pids:
                return


def attach_pass_program(ns: str, ifname: str) -> None:
    """An XDP program that passes every frame, natively on `ifname` in `ns`:
    veth flushes XDP_TX frames to a peer that has one (docs/kernel-notes.md)."""
    fd = libbpf.load_xdp_pass()
    try:
        with nl.iproute(ns) as ipr:
            nl.attach_xdp(ipr, ifname, fd, "native")
    finally:
        os.close(fd)


# Servers this process started: reaped in down() so none is left a zombie (or
# warned about by Popen.__del__) in a long-lived caller such as pytest.
_CHILDREN: list[subprocess.Popen[bytes]] = []


def _reap_children() -> None:
    for proc in list(_CHILDREN):
        if proc.poll() is not None:
            _CHILDREN.remove(proc)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, IndexError):
        return False
