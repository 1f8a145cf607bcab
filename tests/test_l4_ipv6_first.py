"""The first IPv6 listener on a running IPv4-only lb, through a real `lb up`
on the namespace lab:

- with no IPv6 TCP/UDP listener the IPv6 flow tables are small
  (unused_flow_table_entries), the IPv4 ones their full sizes;
- `lb reload` (and SIGHUP) of a config that adds one is refused, exit 1,
  saying to restart lb, not `lb down`;
- the restart (SIGTERM, `lb up` again) replaces the empty small tables,
  adopts every other map (an established IPv4 connection goes on, its
  conntrack entry the same), forwards IPv6, and the old tables are freed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from lb import lab as labmod
from lb.dataplane import libbpf
from lb.dataplane.libbpf import BpfMap
from lb.dataplane.pins import pin_dir
from lb.dataplane.structs import (
    FlowKey,
    FlowKey6,
    FlowState,
    FlowState6,
    MapName,
    VipKey6,
    VipMeta,
    ip_to_net,
    port_to_net,
    unused_flow_table_entries,
)
from lb.lab import Lab
from tests import labclient
from tests.daemon_fixture import CHECKS, RunningDaemon, StreamPump, forwarded, lab_config
from tests.names import name

pytestmark = pytest.mark.root

PORT = labmod.ECHO_PORT
IPV6_FLOW_TABLES = (MapName.CONNTRACK6, MapName.HALF_OPEN6, MapName.FULLNAT_FLOWS6)
INTERVAL = 5  # CHECKS


def pinned(daemon: RunningDaemon, map_name: MapName) -> BpfMap:
    key, value = {MapName.CONNTRACK: (FlowKey, FlowState), MapName.VIPS6: (VipKey6, VipMeta)}.get(
        map_name, (FlowKey6, FlowState6))
    return BpfMap.open_pinned(os.path.join(pin_dir(daemon.name), map_name.value), key, value)


def infos(daemon: RunningDaemon) -> dict[MapName, libbpf.MapInfo]:
    out = {}
    for map_name in MapName:
        fd = libbpf.obj_get(os.path.join(pin_dir(daemon.name), map_name.value))
        try:
            out[map_name] = libbpf.map_info(fd)
        finally:
            os.close(fd)
    return out


def map_exists(map_id: int) -> bool:
    fd = libbpf.map_fd_by_id(map_id)
    if fd is None:
        return False
    os.close(fd)
    return True


@pytest.fixture
def daemon(lab: Lab) -> Iterator[RunningDaemon]:
    running = RunningDaemon(lab, name("v6first"), lab_config(lab, name("v6first")))
    try:
        yield running
    finally:
        running.cleanup()


def test_the_first_ipv6_listener_takes_a_restart_that_keeps_the_ipv4_flows(lab: Lab, daemon: RunningDaemon) -> None:
    ipv4_text = lab_config(lab, daemon.name)
    daemon.start()
    for backend in lab.backends[:3]:
        daemon.wait_for("echo-tcp", backend.address, "healthy", timeout=INTERVAL * 2 + 3)
    before = infos(daemon)
    small = unused_flow_table_entries()
    assert [before[n].max_entries for n in IPV6_FLOW_TABLES] == [small, small, small]
    assert before[MapName.CONNTRACK].max_entries == 524288 and before[MapName.HALF_OPEN].max_entries == 131072

    stream = labclient.tcp_connect(lab.client_ns, labmod.VIP, PORT)
    pump = StreamPump(stream)
    try:
        assert labclient.read_line(stream) in {b.name for b in lab.backends[:3]}
        client, client_port = stream.getsockname()[:2]
        key = FlowKey(ip_to_net(client), ip_to_net(labmod.VIP), port_to_net(client_port), port_to_net(PORT), 6)
        with pinned(daemon, MapName.CONNTRACK) as conntrack:
            entry = conntrack.lookup(key)
        assert entry is not None
        pump.start()

        targets6 = "[" + ", ".join(f'{{ id = "{b.address6}" }}' for b in lab.backends) + "]"
        ipv6_text = ipv4_text + forwarded("echo6-tcp", "TCP", PORT, targets6, f"{{ {CHECKS} }}", address=labmod.VIP6)
        daemon.write_config(ipv6_text)
        refused = subprocess.run([sys.executable, "-m", "lb", "reload", "-c", daemon.config_path],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode == 1
        said = " ".join((refused.stdout + refused.stderr).split())
        assert ('listeners[1] ("echo6-tcp", fd00::100) is the first IPv6 TCP/UDP listener: the IPv6 flow tables '
                "(conntrack6, half_open6, fullnat_flows6) get their full sizes, which takes a restart: restart lb "
                "(`systemctl restart lb`, or stop it and `lb up` again), which keeps every flow; not `lb down`, "
                "which drops them; running config unchanged") in said, said
        assert "Traceback" not in said
        assert daemon.proc is not None
        daemon.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while daemon.logs().count("is the first IPv6 TCP/UDP listener") < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert daemon.logs().count("is the first IPv6 TCP/UDP listener") == 2, daemon.logs()
        with pinned(daemon, MapName.VIPS6) as vips6:  # the running config unchanged: no IPv6 VIP
            assert not any(True for _ in vips6.keys())
        assert infos(daemon) == before

        # The restart.
        assert daemon.stop(signal.SIGTERM) == 0
        gap = pump.exchanged
        time.sleep(0.5)  # no control plane: the kernel forwards on its own
        assert pump.exchanged > gap
        daemon.start()
        for backend in lab.backends:
            daemon.wait_for("echo6-tcp", backend.address6, "healthy", timeout=INTERVAL * 2 + 3)
        after = infos(daemon)
        assert [after[n].max_entries for n in IPV6_FLOW_TABLES] == [524288, 131072, 524288]
        assert all(after[n].map_id != before[n].map_id for n in IPV6_FLOW_TABLES)
        assert {n: i for n, i in after.items() if n not in IPV6_FLOW_TABLES} == \
               {n: i for n, i in before.items() if n not in IPV6_FLOW_TABLES}
        assert "replaced, max" in daemon.logs() and "it held no entries: no flow is lost" in daemon.logs()

        # IPv6 through the new tables: the program writes the ones pinned now.
        with labclient.tcp_connect(lab.client_ns, labmod.VIP6, PORT) as v6:
            assert labclient.read_line(v6) in {b.name for b in lab.backends}
            with pinned(daemon, MapName.CONNTRACK6) as conntrack6:
                assert sum(1 for _ in conntrack6.keys()) == 1
        exchanged = pump.exchanged
        time.sleep(0.5)
        assert pump.exchanged > exchanged and not pump.errors
        with pinned(daemon, MapName.CONNTRACK) as conntrack:
            kept = conntrack.lookup(key)
        assert kept is not None and (kept.target_id, kept.created_ns) == (entry.target_id, entry.created_ns)
    finally:
        pump.stop()
        stream.close()
    assert not pump.errors
    # The old tables went with the old program (replaced on the interfaces): not left beside the new ones.
    deadline = time.monotonic() + 5
    while any(map_exists(before[n].map_id) for n in IPV6_FLOW_TABLES) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(map_exists(before[n].map_id) for n in IPV6_FLOW_TABLES)
