"""Nanoseconds per packet of bpf/lb.c against a map-less XDP DNAT (not a pytest test).

Usage (root):
    .venv/bin/python tests/bench/xdp_cost.py
    .venv/bin/python tests/bench/xdp_cost.py --repeat 1000000 --rounds 5 --single 20000
    .venv/bin/python tests/bench/xdp_cost.py --per-cpu-lru         # conntrack: an LRU list per CPU
    .venv/bin/python tests/bench/xdp_cost.py --conntrack-size 32768  # a table that fits the caches

What it builds, and removes again in `finally` (also on Ctrl-C or SIGTERM):
the namespace `lbb-pkt` (a variant of tests/xdp_fixture.py's `lbt-pkt`, so a
test suite running at the same time is not disturbed) and the pinned maps
under /sys/fs/bpf/lb/lbb-xdp-cost. The program is built with the production
limits (M = 65537, conntrack 524288 flows; no flood guard, so that every new
flow of the new-flow rows makes its entry), never attached: every packet
runs through BPF_PROG_TEST_RUN with ingress_ifindex set, from a thread inside
the namespace, whose permanent neighbours make bpf_fib_lookup succeed.

The cases: an established flow's segment (the headline), its reply, a reply
of a flow with no entry (the ring finds its VIP), FIN and RST of established
flows, a packet for no VIP; then, a new 5-tuple each run: an ACK of no flow
(the ring decides, no entry is made: what a spoofed ACK flood costs), a SYN
that finds its half-open entry's target draining (rescheduled onto the ring,
entry replaced), and a SYN of a new flow, first while the half_open table
fills, then once it is full (each insert evicts). A SYN's entry is
half-open; the established flows are opened by a whole handshake (SYN, the
target's SYN-ACK, the ACK), which moves them to conntrack. Last, established
segments of a full conntrack, a different flow each run: the headline row
hits one flow whose entry never leaves the L1 cache, a new flow touches
tables of many megabytes, so the new-flow rows are also given against this
one (where their cost goes: docs/architecture.md,
"What a new flow costs").

How the cost is measured, and why not simply with repeat=1_000_000:

  BPF_PROG_TEST_RUN copies the frame in once and runs the program `repeat`
  times on the same buffer. A program that rewrites the frame therefore sees
  its own output from the second run on: after one DNAT the destination is
  no longer the VIP, and lb.c takes its "not a VIP" path for the other
  999 999 runs. The "naive" column shows that number and the verdict counters
  that prove it; it measures the pass path, not forwarding.

  "restored" (the headline): a tiny harness program rewrites the original
  54 bytes into the frame (immediate stores, no map), optionally gives the
  frame a new source port and address (a per-CPU counter: every run is then a
  new flow, so a real conntrack miss and, for a SYN, an LRU insert; the IPv4
  header checksum is computed again, or lb.c would drop the frame), and tail-calls
  the program under test, with repeat=1_000_000. The same harness tail-calling
  a program that only returns XDP_PASS is measured too and subtracted: the
  "net" figure is what the program itself costs per packet. lb's verdict
  counters are checked to show every run took the intended path.

  "single-shot" (a cross-check): repeat=1, thousands of separate syscalls
  (each copies a fresh frame in; for the miss case each frame is a new
  flow), median of the kernel's duration minus the median of an XDP_PASS
  program measured the same way (the timer's own floor). Colder caches than
  the loop above, so it reads higher, but it involves no harness at all.

The baseline (tests/bench/baseline_dnat.c, one target, no maps) is measured
on the established frame with the same ingress interface, harness and
subtraction. The forwarding modes get rows of their own: an established
flow of a full-NAT VIP and of a DSR VIP, each against the same baseline
built as that mode's stateless floor (full NAT: the source rewritten too, to
the address and port lb gave the flow; DSR: only the MACs), both checked to
emit the same frame as lb byte for byte. The same three over IPv6 (a
VIP's maps written directly, as the control plane writes them), each
against an IPv6 floor (tests/bench/baseline_dnat6.c) checked the same
way. Also timed: lb.maglev.build_table for N=1000 at M=65537 (best of
5) and a full Dataplane.apply of one VIP with 1000 targets at M=65537.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import platform
import shlex
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.inet6 import IPv6  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402
from scapy.packet import raw  # noqa: E402
from lb import maglev  # noqa: E402
from lb import netlink as nl  # noqa: E402
from lb.dataplane import libbpf  # noqa: E402
from lb.dataplane.dataplane import Dataplane, L4Service  # noqa: E402
from lb.dataplane.loader import Program, bpf_source_dir, purge_pins  # noqa: E402
from lb.dataplane.maps import Endpoint, Maps, VipAddr  # noqa: E402
from lb.dataplane.structs import (  # noqa: E402
    FWD_DSR,
    FWD_FULLNAT,
    FWD_NAT,
    IPPROTO_TCP,
    TARGET_F_ACTIVE,
    TARGET_F_IN_SERVICE,
    Counter,
    EndpointKey6,
    FlowKey,
    FlowKey6,
    FlowState,
    HalfOpenFlow,
    Limits,
    MapName,
    ReplyRoute6,
    ReplyVip6,
    Target6,
    VipKey6,
    VipMeta,
    ip6_to_net,
    ip_to_net,
    port_to_net,
)
from tests.xdp_fixture import ADDRESSES6, CLIENT_IF, MAC, NEIGHBORS, TARGET_IF  # noqa: E402

# "lbb", or LB_TEST_PREFIX + "b" (lbsb-...) so benchmarks of two worktrees can run at once.
PREFIX = os.environ["LB_TEST_PREFIX"] + "b" if os.environ.get("LB_TEST_PREFIX") else "lbb"
NETNS = f"{PREFIX}-pkt"
NAME = f"{PREFIX}-xdp-cost"  # pin directory /sys/fs/bpf/lb/lbb-xdp-cost
# Production limits (M = 65537, conntrack 524288 flows), but no flood guard:
# the new-flow rows run a million SYNs a second, each of which must make its
# entry. --per-cpu-lru swaps the conntrack map's shared LRU list for one per CPU.
LIMITS = Limits(new_flow_rate_limit=0)
BENCH_CPU = 1  # the measuring thread is pinned here (per-CPU LRU lists, stable caches)

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = range(5)
ACTIONS = {0: "ABORTED", 1: "DROP", 2: "PASS", 3: "TX", 4: "REDIRECT"}

CLIENT = "10.0.0.2"
VIP = "10.0.0.100"
VIP_PORT = 80
STALE_PORT = 81  # the VIP whose SYNs find stale entries
MODE_PORTS = {"full-nat": 82, "dsr": 83}  # a VIP port per forwarding mode (DSR: the targets' port too)
TARGET_PORT = 8080
TARGETS = ("10.0.1.11", "10.0.1.12", "10.0.1.13")
CLIENT_PORT = 40000
APPLY_VIP = "10.0.0.200"
GOAL_RATIO = 1.5
GOAL_NEW_FLOW_RATIO = 6.0
GOAL_MAGLEV_MS = 100.0
BASELINE_C = Path(__file__).resolve().parent / "baseline_dnat.c"
BASELINE6_C = Path(__file__).resolve().parent / "baseline_dnat6.c"
# IPv6 rows: an established flow per mode over IPv6, each against its own
# stateless IPv6 floor (baseline_dnat6.c). The IPv6 maps are written here
# directly (the struct layouts of lb.dataplane.structs), with ids at the top
# of the shared id spaces, which the IPv4 services never reach.
CLIENT6, VIP6, TARGET6, LB6 = "fd00::2", "fd00::100", "fd00:1::12", "fd00:1::1"
MODE6 = {"nat": (FWD_NAT, 80), "full-nat": (FWD_FULLNAT, 82), "dsr": (FWD_DSR, 83)}  # mode, VIP port

HARNESS_C = r"""
#include <uapi/linux/bpf.h>

BPF_PROG_ARRAY(next_prog, 1);
BPF_PERCPU_ARRAY(flow_seq, u64, 1);

/* Put the original frame back (it is rewritten by every run), optionally
 * make it a new flow, then run the program under test. */
int xdp_harness(struct xdp_md *ctx)
{
    void *data = (void *)(long)ctx->data;
    void *data_end = (void *)(long)ctx->data_end;
    if (data + FRAME_LEN > data_end)
        return XDP_ABORTED;
STORES
#ifdef NEW_FLOW_EACH_RUN
    u32 zero = 0;
    u64 *seq = flow_seq.lookup(&zero);
    if (!seq)
        return XDP_ABORTED;
    u64 n = *seq;
    *seq = n + 1;
    *(u16 *)(data + 34) = (u16)n;               /* TCP source port */
    *(u8 *)(data + 28) = (u8)(n >> 16);         /* source 10.0.X.2 */
    *(u8 *)(data + 27) = (u8)(n >> 24);         /* source 10.Y.X.2 */
    /* The IPv4 header checksum again (lb.c drops a wrong one). */
    *(u16 *)(data + 24) = 0;
    u32 sum = 0;
#pragma unroll
    for (int i = 0; i < 10; i++)
        sum += *(u16 *)(data + 14 + 2 * i);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    *(u16 *)(data + 24) = (u16)~sum;
#endif
    next_prog.call(ctx, 0);
    return XDP_ABORTED; /* the tail call failed */
}
"""

# --attribute: lb.c with one cost removed at a time, established path only.
# Each entry: (what, [(text in lb.c, replacement), ...]). Built from the
# current bpf/lb.c in memory (never written to disk), sharing the pinned maps.
NO_CSUM = ("if (!ipv4_header_csum_ok(pkt.ip)) {", "if (0) {")
NO_REPLY_BITS = ("return bits && (*bits >> (sport & 63)) & 1;", "return 0;")
NO_TCP_STATE = ("\t\t\tfollow_flow(pkt.flow.proto, pkt.tcp_flags, state, now, 1);", "\t\t\ttouch(state, now);")
NO_COUNT = ("u64 *value = counters.lookup(&slot);\n\tif (value)\n\t\t*value += 1;", "")
NO_STATS = ("\tif (!stats)\n\t\treturn;\n\tstats->packets", "\treturn;\n\tstats->packets")
NO_HOP_CACHE = ("\tstruct next_hop *hop = NEXT_HOP_CACHE_NS ? next_hops.lookup(&target_id) : NULL;",
                "\tstruct next_hop *hop = NULL;")
VARIANTS: list[tuple[str, list[tuple[str, str]]]] = [
    ("as shipped", []),
    ("no next-hop cache (bpf_fib_lookup every packet)", [NO_HOP_CACHE]),
    ("no IPv4 header checksum check", [NO_CSUM]),
    ("no reply_ports bit test", [NO_REPLY_BITS]),
    ("no TCP state (FIN/RST/SYN bytes)", [NO_TCP_STATE]),
    ("no counters / vip_stats / target_stats", [NO_COUNT, NO_STATS]),
    ("none of the four", [NO_CSUM, NO_REPLY_BITS, NO_TCP_STATE, NO_COUNT, NO_STATS]),
]

PASS_C = r"""
#include <uapi/linux/bpf.h>
int xdp_pass_only(struct xdp_md *ctx) { return XDP_PASS; }
"""


# --- frames ----------------------------------------------------------------------

def tcp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
    # A SYN-ACK's sequence number is 4999, so every ACK (5000) acknowledges it:
    # SYN, SYN-ACK, ACK completes a handshake (the flow moves to conntrack).
    ack = 0 if flags == "S" else 5000
    seq = 4999 if flags == "SA" else 1000
    pkt = Ether(src=src_mac, dst=dst_mac) / IP(src=src, dst=dst, ttl=64, id=7) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240)
    return raw(pkt)


def tcp_frame6(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, flags: str) -> bytes:
    ack = 0 if flags == "S" else 5000
    seq = 4999 if flags == "SA" else 1000
    pkt = Ether(src=src_mac, dst=dst_mac) / IPv6(src=src, dst=dst, hlim=64) / TCP(
        sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, window=64240)
    return raw(pkt)


def write_service6(maps: Maps, limits: Limits, vip_id: int, target_id: int, mode: int, port: int,
                   target_port: int) -> None:
    """One IPv6 VIP with one target, as the control plane writes it: targets6,
    the ring's live half, vips6; replies6 and the reply_ports bit for NAT;
    lb's source toward the target for full NAT."""
    flags = TARGET_F_ACTIVE | TARGET_F_IN_SERVICE
    maps.raw(MapName.TARGETS6).update(ctypes.c_uint32(target_id),
                                      Target6(ip6_to_net(TARGET6), port_to_net(target_port), flags))
    m = limits.ring_size
    slots = (ctypes.c_uint32 * m)(*range(vip_id * 2 * m, vip_id * 2 * m + m))
    maps.raw(MapName.RINGS).update_batch(slots, (ctypes.c_uint32 * m)(*([target_id] * m)), m)
    maps.raw(MapName.VIPS6).update(VipKey6(ip6_to_net(VIP6), port_to_net(port), IPPROTO_TCP),
                                   VipMeta(vip_id, 0, 0, mode))
    if mode == FWD_NAT:
        route = ReplyRoute6(target_id, 1)
        route.vips[0] = ReplyVip6(ip6_to_net(VIP6), port_to_net(port), 0, vip_id, 0)
        maps.raw(MapName.REPLIES6).update(EndpointKey6(ip6_to_net(TARGET6), port_to_net(target_port), IPPROTO_TCP),
                                          route)
        bits = maps.raw(MapName.REPLY_PORTS)
        word = bits.lookup(ctypes.c_uint32(target_port >> 6))
        value = (0 if word is None else int(word.value)) | (1 << (target_port & 63))
        bits.update(ctypes.c_uint32(target_port >> 6), ctypes.c_uint64(value))
    if mode == FWD_FULLNAT:
        maps.raw(MapName.FULLNAT_SOURCES6).update(ctypes.c_uint32(target_id), ip6_to_net(LB6))


def words6(macro: str, address: str) -> list[str]:
    return [f"-D{macro}_W{i}={w:#x}U" for i, w in enumerate(ip6_to_net(address).words)]


def new_flow_variant(frame: bytes, n: int) -> bytes:
    """The frame as the harness's NEW_FLOW_EACH_RUN makes it for counter value n."""
    b = bytearray(frame)
    b[34:36] = (n & 0xFFFF).to_bytes(2, "little")
    b[28] = (n >> 16) & 0xFF
    b[27] = (n >> 24) & 0xFF
    b[24:26] = b"\0\0"
    total = sum(int.from_bytes(b[14 + i:16 + i], "big") for i in range(0, 20, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    b[24:26] = (~total & 0xFFFF).to_bytes(2, "big")
    return bytes(b)


# --- the namespace (a variant of tests/xdp_fixture.py under our own name) ----------

def build_namespace() -> dict[str, int]:
    nl.remove_netns(NETNS)
    nl.create_netns(NETNS)
    with nl.iproute(NETNS) as ipr:
        nl.set_up(ipr, "lo")
        for ifname, address in ((CLIENT_IF, "10.0.0.1"), (TARGET_IF, "10.0.1.1")):
            nl.add_veth(ipr, ifname, ifname + "-peer", NETNS)
            nl.set_mac(ipr, ifname, MAC[ifname])
            nl.add_address(ipr, ifname, address, 24)
            nl.add_address(ipr, ifname, ADDRESSES6[ifname], 64, nodad=True)
            nl.set_up(ipr, ifname)
            nl.set_up(ipr, ifname + "-peer")
        for ifname, address, mac in NEIGHBORS:
            nl.add_neighbor(ipr, ifname, address, mac)
        ifindex = {ifname: nl.ifindex(ipr, ifname) for ifname in (CLIENT_IF, TARGET_IF)}
    nl.set_sysctl(NETNS, "net.ipv4.ip_forward", "1")  # else fib lookups answer FWD_DISABLED
    nl.set_sysctl(NETNS, "net.ipv6.conf.all.forwarding", "1")
    return ifindex


def in_bench_thread(fn: Callable[..., Any], *args: Any, cpu: int = BENCH_CPU, **kwargs: Any) -> Any:
    """Run fn in a thread inside NETNS, pinned to `cpu` (BENCH_CPU unless said)."""

    def pinned() -> Any:
        try:
            os.sched_setaffinity(0, {cpu})  # this thread only
        except OSError:
            pass
        return fn(*args, **kwargs)

    return nl.run_in_netns(NETNS, pinned)


# --- measuring ---------------------------------------------------------------------

@dataclass
class Harness:
    """A compiled harness for one frame; tail-calls whatever is in slot 0."""

    bpf: Any
    fd: int

    def target(self, prog_fd: int) -> None:
        self.bpf[b"next_prog"][ctypes.c_int(0)] = ctypes.c_int(prog_fd)

    def restart_flows(self) -> None:
        """The next run makes flow 0 again (NEW_FLOW_EACH_RUN): the same flows in the same order."""
        table = self.bpf[b"flow_seq"]
        table[ctypes.c_int(0)] = table.Leaf()  # zero on every CPU


def compile_harness(frame: bytes, new_flow: bool) -> Harness:
    from bcc import BPF

    stores = []
    off = 0
    for width, ctype in ((8, "u64"), (4, "u32"), (2, "u16"), (1, "u8")):
        while len(frame) - off >= width:
            value = int.from_bytes(frame[off:off + width], sys.byteorder)
            stores.append(f"    *({ctype} *)(data + {off}) = {value:#x}ULL;")
            off += width
    text = HARNESS_C.replace("STORES", "\n".join(stores))
    cflags = [f"-DFRAME_LEN={len(frame)}"] + (["-DNEW_FLOW_EACH_RUN"] if new_flow else [])
    bpf = BPF(text=text.encode(), cflags=cflags)
    fn = bpf.load_func(b"xdp_harness", BPF.XDP)
    return Harness(bpf, fn.fd)


def run_repeat(prog_fd: int, frame: bytes, ifindex: int, repeat: int, cpu: int = BENCH_CPU) -> libbpf.RunResult:
    return in_bench_thread(libbpf.prog_test_run, prog_fd, frame, ingress_ifindex=ifindex, repeat=repeat, cpu=cpu)


def single_shot(prog_fd: int, frames: list[bytes], ifindex: int) -> list[int]:
    """Kernel-reported ns of one run each, one syscall per frame."""

    def loop() -> list[int]:
        return [libbpf.prog_test_run(prog_fd, f, ingress_ifindex=ifindex, repeat=1).duration_ns for f in frames]

    return in_bench_thread(loop)


def counter_delta(maps: Maps, fn: Callable[[], Any]) -> tuple[Any, dict[str, int]]:
    before = maps.counters()
    result = fn()
    after = maps.counters()
    return result, {c.label: after[c] - before[c] for c in Counter if after[c] != before[c]}


def fmt_verdicts(delta: dict[str, int]) -> str:
    return ", ".join(f"{k} {v:,}" for k, v in delta.items()) or "-"


# --- the run -----------------------------------------------------------------------

@dataclass
class Row:
    case: str
    naive: float | None = None
    naive_verdicts: str = ""
    gross: float = 0.0
    net: float = 0.0
    verdicts: str = ""
    single: float = 0.0
    overhead: float = 0.0


@contextmanager
def bench_environment() -> Iterator[dict[str, int]]:
    purge_pins(NAME)
    try:
        yield build_namespace()
    finally:
        nl.remove_netns(NETNS)
        purge_pins(NAME)


def endpoints_1000() -> list[Endpoint]:
    """1000 distinct targets inside the namespace's own 10.0.1.0/24 (never sent to)."""
    return [Endpoint(ipaddress.IPv4Address(f"10.0.1.{20 + i // 10}"), 8000 + i % 10) for i in range(1000)]


MAIN_PID = os.getpid()


def on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C, so every `finally` cleans up. Only in this
    process: pyroute2 forks helpers (netns sockets) and stops them with
    SIGTERM; a helper that raised here would run our cleanup from its copy of
    the stack and tear the lab down under the parent."""
    if os.getpid() != MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt

def main() -> int:
    global LIMITS  # --per-cpu-lru, --half-open-* and --conntrack-size change the program's limits
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1_000_000, help="runs per BPF_PROG_TEST_RUN (default 1000000)")
    parser.add_argument("--rounds", type=int, default=5, help="measurements per case; the median is shown (default 5)")
    parser.add_argument("--single", type=int, default=20_000, help="single-shot syscalls per case (default 20000)")
    parser.add_argument("--attribute", action="store_true",
                        help="also rebuild lb.c (in memory) without one cost at a time and time the established path")
    parser.add_argument("--per-cpu-lru", action="store_true",
                        help="conntrack with an LRU list per CPU (each CPU holding the configured size), to compare "
                             "with the shared list lb uses")
    parser.add_argument("--half-open-per-cpu-lru", action="store_true",
                        help="half_open with an LRU list per CPU (each CPU holding the configured size; every CPU's "
                             "list is filled before the table-full row), to compare with the shared list lb uses")
    parser.add_argument("--half-open-size", type=int, default=LIMITS.half_open_size,
                        help=f"half-open flows (default {LIMITS.half_open_size}, lb's default); with a small "
                             "--conntrack-size too, the new-flow rows without cache misses")
    parser.add_argument("--conntrack-size", type=int, default=LIMITS.conntrack_size,
                        help=f"flows in the table (default {LIMITS.conntrack_size}, lb's default): a small one stays in "
                             "the CPU caches, which is what new flows cost apart from memory")
    args = parser.parse_args()
    LIMITS = replace(LIMITS, conntrack_per_cpu_lru=args.per_cpu_lru, conntrack_size=args.conntrack_size,
                     half_open_per_cpu_lru=args.half_open_per_cpu_lru, half_open_size=args.half_open_size)
    if os.geteuid() != 0:
        print("xdp_cost.py: needs root (BPF, network namespaces)", file=sys.stderr)
        return 1
    signal.signal(signal.SIGTERM, on_sigterm)

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"kernel:  {platform.system()} {platform.release()} {platform.version()} ({platform.machine()})")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"cpu:     {cpu}, {os.cpu_count()} CPUs; measuring thread pinned to CPU {BENCH_CPU}")
    print(f"limits:  {LIMITS}")
    print()

    with bench_environment() as ifindex, ExitStack() as stack:
        from bcc import BPF

        t0 = time.perf_counter()
        program = stack.enter_context(Program.load(NAME, LIMITS))
        maps = stack.enter_context(Maps(program.pin_dir, LIMITS))
        print(f"compiled and loaded bpf/lb.c in {time.perf_counter() - t0:.1f} s")
        dataplane = Dataplane(maps, source_of=lambda address: nl.source_toward(address, NETNS))
        vip = VipAddr(ipaddress.IPv4Address(VIP), VIP_PORT, "TCP")
        service = L4Service(vip, members=tuple((Endpoint(ipaddress.IPv4Address(a), TARGET_PORT), 1) for a in TARGETS))
        dataplane.apply([service])

        fx_client, fx_target = ifindex[CLIENT_IF], ifindex[TARGET_IF]

        def client_frame(sport: int, flags: str, dst: str = VIP, dport: int = VIP_PORT) -> bytes:
            return tcp_frame(MAC["client"], MAC["fxa"], CLIENT, dst, sport, dport, flags)

        syn, ack = client_frame(CLIENT_PORT, "S"), client_frame(CLIENT_PORT, "A")
        not_vip = client_frame(CLIENT_PORT, "A", dst="10.0.1.11", dport=22)
        miss_base = client_frame(1, "S")
        ack_base = client_frame(1, "A")  # a new flow each run, but no SYN: the ring decides, no entry is made

        def from_target(address: str, sport: int, flags: str = "A") -> bytes:
            return tcp_frame(MAC["t" + address.rsplit(".", 1)[1][-1]], MAC["fxb"], address, CLIENT, TARGET_PORT, sport,
                             flags)

        # Open the established flows (SYN, the target's SYN-ACK, ACK), and learn their targets.
        def open_flow(sport: int) -> str:
            first = run_repeat(program.fd, client_frame(sport, "S"), fx_client, 1)
            if first.retval != XDP_REDIRECT:
                raise SystemExit(f"the SYN was not redirected ({ACTIONS.get(first.retval)}): fib lookup failing?")
            target = str(ipaddress.IPv4Address(first.data[30:34]))
            run_repeat(program.fd, from_target(target, sport, "SA"), fx_target, 1)
            run_repeat(program.fd, client_frame(sport, "A"), fx_client, 1)
            flow = maps.flow("TCP", Endpoint(ipaddress.IPv4Address(CLIENT), sport),
                             Endpoint(ipaddress.IPv4Address(VIP), VIP_PORT))
            if flow is None or flow.half_open:
                raise SystemExit(f"the handshake of port {sport} did not complete: {flow}")
            return target

        target_addr = open_flow(CLIENT_PORT)
        reply = from_target(target_addr, CLIENT_PORT)
        fin = client_frame(CLIENT_PORT + 1, "FA")
        rst = client_frame(CLIENT_PORT + 2, "RA")
        open_flow(CLIENT_PORT + 1)
        open_flow(CLIENT_PORT + 2)
        # A reply of a flow with no entry: the ring's target for a port never opened.
        stray = 30000
        while True:
            probe = run_repeat(program.fd, client_frame(stray, "A"), fx_client, 1)
            if str(ipaddress.IPv4Address(probe.data[30:34])) == target_addr:
                break
            stray += 1
        reply_no_entry = from_target(target_addr, stray)
        print(f"established flow {CLIENT}:{CLIENT_PORT} -> {VIP}:{VIP_PORT} is on target {target_addr}:{TARGET_PORT}")

        pass_only = BPF(text=PASS_C.encode())
        pass_fd = pass_only.load_func(b"xdp_pass_only", BPF.XDP).fd
        stack.callback(pass_only.cleanup)
        baseline = BPF(src_file=str(BASELINE_C).encode(), cflags=[
            f"-I{bpf_source_dir()}", f"-DVIP_ADDR={ip_to_net(VIP):#x}U", f"-DSVC0_VIP_PORT={port_to_net(VIP_PORT):#x}",
            f"-DSVC0_TARGET_PORT={port_to_net(TARGET_PORT):#x}", "-DSVC0_N=1",
            f"-DSVC0_T0={ip_to_net(target_addr):#x}U",
        ])
        stack.callback(baseline.cleanup)
        baseline_fd = baseline.load_func(b"xdp_baseline", BPF.XDP).fd
        check = run_repeat(baseline_fd, ack, fx_client, 1)
        lb_check = run_repeat(program.fd, ack, fx_client, 1)
        if check.retval != XDP_REDIRECT or check.data != lb_check.data:
            raise SystemExit("baseline and lb do not emit the same frame for the established packet")
        print("baseline and lb emit the same frame for the established packet (byte for byte)")
        print()

        # kind: "same" (one frame, restored each run), "new" (a new flow each
        # run), "stale" (a SYN on an entry whose target left the ring), "fill"
        # (new flows: the table filling, then full). Cases that make entries run
        # last: they flood conntrack.
        cases = [
            ("established TCP (conntrack hit)", ack, fx_client, "same"),
            ("reverse-NAT reply (the flow's entry)", reply, fx_target, "same"),
            ("reply, flow with no entry (ring decides)", reply_no_entry, fx_target, "same"),
            ("FIN+ACK of an established flow", fin, fx_client, "same"),
            ("RST+ACK of a flow (closed entry)", rst, fx_client, "same"),
            ("non-VIP pass", not_vip, fx_client, "same"),
            ("ACK of no flow: ring, no entry made", ack_base, fx_client, "new"),
            ("ACK completing a handshake (half-open -> conntrack)", client_frame(1, "A"), fx_client, "promote"),
            ("SYN on a stale entry (target draining)", client_frame(1, "S", dport=STALE_PORT), fx_client, "stale"),
            ("new TCP flow (miss, table full: LRU evicts)", miss_base, fx_client, "fill"),
        ]
        harnesses: dict[str, Harness] = {}
        for name, frame, _, kind in cases:
            harnesses[name] = compile_harness(frame, kind != "same")
            stack.callback(harnesses[name].bpf.cleanup)

        def median_duration(prog_fd: int, frame: bytes, ifidx: int, repeat: int) -> float:
            return statistics.median(run_repeat(prog_fd, frame, ifidx, repeat).duration_ns for _ in range(args.rounds))

        def restored(h: Harness, prog_fd: int, frame: bytes, ifidx: int, repeat: int) -> float:
            h.target(prog_fd)
            return median_duration(h.fd, frame, ifidx, repeat)

        # Timer floors.
        floor_single = statistics.median(single_shot(pass_fd, [ack] * args.single, fx_client))
        floor_loop = median_duration(pass_fd, ack, fx_client, args.repeat)

        # The stale-SYN VIP: one target in its ring at a time; every round, the
        # other one takes its place and the first drains, so each SYN of the
        # round finds an entry (made by the round before) whose target is out
        # of service, and is rescheduled.
        stale_vip = VipAddr(ipaddress.IPv4Address(VIP), STALE_PORT, "TCP")
        stale_targets = [Endpoint(ipaddress.IPv4Address(a), STALE_PORT) for a in TARGETS[:2]]
        # A SYN's entry is half-open: the stale and new-flow rows fill half_open, not conntrack.
        per_cpu = LIMITS.half_open_size
        stale_repeat = max(1000, min(args.repeat, per_cpu // 4) // 1000 * 1000)

        def stale_round(h: Harness, prog_fd: int, frame: bytes, ifidx: int, turn: int) -> float:
            live, old = stale_targets[turn % 2], stale_targets[(turn + 1) % 2]
            dataplane.apply([service, L4Service(stale_vip, members=((live, 1),), draining=(old,))])
            h.target(prog_fd)
            h.restart_flows()
            return float(run_repeat(h.fd, frame, ifidx, stale_repeat).duration_ns)

        # The handshake-completing ACK: each run's flow must be half-open with
        # its SYN-ACK seen. The entries are written from here, for the flows
        # the harness will make (new_flow_variant), before each round.
        promote_repeat = max(1000, min(args.repeat, LIMITS.half_open_size // 2) // 1000 * 1000)
        vip_entry = next(e for e in maps.vips() if e.vip == vip)
        promote_target = next(t.target_id for t in maps.targets()
                              if str(t.endpoint.address) == target_addr and t.endpoint.port == TARGET_PORT)

        def half_open_flows(frame: bytes) -> Any:
            now = time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE, the program's clock
            state = FlowState(promote_target, vip_entry.vip_id, now, now, maps.vip_gen(vip_entry.vip_id), 1, 0, 0, 0)
            keys, values = (FlowKey * promote_repeat)(), (HalfOpenFlow * promote_repeat)()
            for n in range(promote_repeat):
                b = new_flow_variant(frame, n)
                keys[n] = FlowKey(*(int.from_bytes(b[a:z], "little") for a, z in ((26, 30), (30, 34), (34, 36),
                                                                                   (36, 38))), 6)
                values[n] = HalfOpenFlow(state, 4999, 1)  # the SYN-ACK's sequence number: ACKs say 5000
            maps.raw(MapName.HALF_OPEN).update_batch(keys, values, promote_repeat)
            return keys

        def promote_round(h: Harness, prog_fd: int, frame: bytes, ifidx: int) -> float:
            keys = half_open_flows(frame)
            h.target(prog_fd)
            h.restart_flows()
            duration = float(run_repeat(h.fd, frame, ifidx, promote_repeat).duration_ns)
            for key in keys:  # the next round promotes the same flows again, not hits them
                maps.raw(MapName.CONNTRACK).delete(key)
                maps.raw(MapName.HALF_OPEN).delete(key)
            return duration

        rows: list[Row] = []
        for name, frame, ifidx, kind in cases:
            h = harnesses[name]
            overhead = restored(h, pass_fd, frame, ifidx, args.repeat)
            if kind == "fill":
                # First while the LRU still has free entries (the runs fit in
                # it), then once it is full: the steady state of a busy table,
                # where each insert evicts a flow.
                fill_repeat = max(1000, per_cpu // (args.rounds + 1) // 1000 * 1000)
                row = Row(f"new TCP flow (miss, table filling; {fill_repeat // 1000}k runs)", overhead=overhead)
                fill_overhead = restored(h, pass_fd, frame, ifidx, fill_repeat)
                gross, delta = counter_delta(maps, lambda: restored(h, program.fd, frame, ifidx, fill_repeat))
                row.gross, row.net, row.verdicts = gross, gross - fill_overhead, fmt_verdicts(delta)
                row.overhead = fill_overhead
                row.single = float("nan")
                rows.append(row)
                h.target(program.fd)
                run_repeat(h.fd, frame, ifidx, LIMITS.half_open_size)  # fill the table
                if LIMITS.half_open_per_cpu_lru:
                    # Every CPU's list full, as in a flood spread over all RX
                    # queues (else the table's buckets are half empty, and
                    # its misses cheaper than they would be). Other clients
                    # (11.x.x.2, ...): a CPU's harness makes the same flows.
                    for cpu in sorted(os.sched_getaffinity(0) - {BENCH_CPU}):
                        other_frame = tcp_frame(MAC["client"], MAC["fxa"], f"{11 + cpu}.0.0.2", VIP, 1, VIP_PORT, "S")
                        other = compile_harness(other_frame, True)
                        stack.callback(other.bpf.cleanup)
                        other.target(program.fd)
                        run_repeat(other.fd, other_frame, ifidx, LIMITS.half_open_size, cpu=cpu)
            if kind == "promote":
                row = Row(f"{name} ({promote_repeat // 1000}k runs)")
                row.overhead = statistics.median(promote_round(h, pass_fd, frame, ifidx) for _ in range(args.rounds))
                grosses, before = [], maps.counters()
                for _ in range(args.rounds):
                    grosses.append(promote_round(h, program.fd, frame, ifidx))
                after = maps.counters()
                row.gross = statistics.median(grosses)
                row.net = row.gross - row.overhead
                row.verdicts = fmt_verdicts({c.label: after[c] - before[c] for c in Counter if after[c] != before[c]})
                row.single = float("nan")
                rows.append(row)
                continue
            if kind == "stale":
                row = Row(f"{name} ({stale_repeat // 1000}k runs)")
                row.overhead = statistics.median(stale_round(h, pass_fd, frame, ifidx, 0) for _ in range(args.rounds))
                dataplane.apply([service, L4Service(stale_vip, members=((stale_targets[1], 1),))])
                h.target(program.fd)
                h.restart_flows()
                run_repeat(h.fd, frame, ifidx, stale_repeat)  # the entries, all on the second target
                grosses, before = [], maps.counters()
                for turn in range(args.rounds):
                    grosses.append(stale_round(h, program.fd, frame, ifidx, turn))
                after = maps.counters()
                row.gross = statistics.median(grosses)
                row.net = row.gross - row.overhead
                row.verdicts = fmt_verdicts({c.label: after[c] - before[c] for c in Counter if after[c] != before[c]})
                row.single = float("nan")
                rows.append(row)
                dataplane.apply([service])
                continue
            row = Row(name, overhead=overhead)
            if kind == "same":
                naive, delta = counter_delta(maps, lambda: run_repeat(program.fd, frame, ifidx, args.repeat))
                row.naive, row.naive_verdicts = naive.duration_ns, fmt_verdicts(delta)
            gross, delta = counter_delta(maps, lambda: restored(h, program.fd, frame, ifidx, args.repeat))
            row.gross, row.net, row.verdicts = gross, gross - overhead, fmt_verdicts(delta)
            if kind != "same":
                # Flows the harness has not used (its counter stays far below 0xE00000).
                frames = [new_flow_variant(frame, 0xE00000 + n) for n in range(args.single)]
            else:
                frames = [frame] * args.single
            row.single = statistics.median(single_shot(program.fd, frames, ifidx)) - floor_single
            rows.append(row)

        # The headline established row hits one flow, whose entry stays in the
        # L1 cache; a new flow's lookups and insert land in tables of many
        # megabytes. For a like-for-like denominator: established segments of
        # a full conntrack (less min(4096, an eighth) of its entries, so the
        # batch write evicts none of its own), a different flow each run.
        # Written from here for the flows the harness makes; run last among
        # the rows, as it fills conntrack.
        n_cold = LIMITS.conntrack_size - min(4096, LIMITS.conntrack_size // 8)
        cold_repeat = min(args.repeat, n_cold)
        cold_keys, cold_values = (FlowKey * n_cold)(), (FlowState * n_cold)()
        now = time.clock_gettime_ns(6)  # CLOCK_MONOTONIC_COARSE, the program's clock
        cold_state = FlowState(promote_target, vip_entry.vip_id, now, now, maps.vip_gen(vip_entry.vip_id), 0, 0, 0, 0)
        vip_net, vip_port_net = ip_to_net(VIP), port_to_net(VIP_PORT)
        for n in range(n_cold):  # new_flow_variant's 5-tuple for counter value n
            cold_keys[n] = FlowKey(int.from_bytes(bytes((10, (n >> 24) & 0xFF, (n >> 16) & 0xFF, 2)), "little"),
                                   vip_net, n & 0xFFFF, vip_port_net, 6)
            cold_values[n] = cold_state
        maps.raw(MapName.CONNTRACK).update_batch(cold_keys, cold_values, n_cold)
        h = compile_harness(ack, True)
        stack.callback(h.bpf.cleanup)
        cold = Row(f"established TCP, {cold_repeat // 1000}k flows in turn (full table)")

        def cold_round(prog_fd: int) -> float:
            h.target(prog_fd)
            h.restart_flows()  # flows 0.. again: those written above
            return float(run_repeat(h.fd, ack, fx_client, cold_repeat).duration_ns)

        cold.overhead = statistics.median(cold_round(pass_fd) for _ in range(args.rounds))
        gross, delta = counter_delta(maps, lambda: statistics.median(cold_round(program.fd) for _ in range(args.rounds)))
        cold.gross, cold.net, cold.verdicts = gross, gross - cold.overhead, fmt_verdicts(delta)
        if delta.get(Counter.CONNTRACK_HIT.label) != cold_repeat * args.rounds:  # else it measured something else
            raise SystemExit(f"{cold.case}: not every run hit its entry ({cold.verdicts})")
        cold.single = float("nan")
        rows.append(cold)

        # Baseline on the established frame: same harness, same ingress.
        h = harnesses[cases[0][0]]
        base = Row("baseline DNAT (no maps), established frame")
        naive = run_repeat(baseline_fd, ack, fx_client, args.repeat)
        base.naive = naive.duration_ns
        base.naive_verdicts = f"1st run REDIRECT, then action {ACTIONS.get(naive.retval)}"
        overhead = restored(h, pass_fd, ack, fx_client, args.repeat)
        base.gross = restored(h, baseline_fd, ack, fx_client, args.repeat)
        base.net = base.gross - overhead
        base.single = statistics.median(single_shot(baseline_fd, [ack] * args.single, fx_client)) - floor_single
        base.overhead = overhead

        # Forwarding modes: an established flow each, against its own stateless floor.
        mode_rows: list[tuple[Row, Row]] = []

        def established_rows(what: str, mode_ack: bytes, lb_out: libbpf.RunResult, floor_c: Path, floor_func: bytes,
                             cflags: list[str], lb_title: str, floor_title: str) -> None:
            """lb's row for `mode_ack` (an established flow's packet) and its
            floor's (`floor_func` of `floor_c` built with `cflags`), timed by one
            harness; the floor must emit the frame lb did (`lb_out`)."""
            floor = BPF(src_file=str(floor_c).encode(), cflags=cflags)
            stack.callback(floor.cleanup)
            floor_fd = floor.load_func(floor_func, BPF.XDP).fd
            floor_out = run_repeat(floor_fd, mode_ack, fx_client, 1)
            if lb_out.retval != XDP_REDIRECT or floor_out.data != lb_out.data:
                raise SystemExit(f"{what}: its floor and lb do not emit the same frame for the established packet")
            h = compile_harness(mode_ack, False)
            stack.callback(h.bpf.cleanup)
            overhead = restored(h, pass_fd, mode_ack, fx_client, args.repeat)
            lb_row = Row(lb_title, overhead=overhead)
            gross, delta = counter_delta(maps, lambda: restored(h, program.fd, mode_ack, fx_client, args.repeat))
            lb_row.gross, lb_row.net, lb_row.verdicts = gross, gross - overhead, fmt_verdicts(delta)
            floor_row = Row(floor_title, overhead=overhead)
            floor_row.gross = restored(h, floor_fd, mode_ack, fx_client, args.repeat)
            floor_row.net = floor_row.gross - overhead
            mode_rows.append((lb_row, floor_row))

        for mode, port in MODE_PORTS.items():
            target_port = port if mode == "dsr" else TARGET_PORT
            endpoint = Endpoint(ipaddress.IPv4Address(target_addr), target_port)
            mode_vip = VipAddr(ipaddress.IPv4Address(VIP), port, "TCP")
            dataplane.apply([service, L4Service(mode_vip, members=((endpoint, 1),), mode=mode)])
            sport = CLIENT_PORT + 10
            first = run_repeat(program.fd, client_frame(sport, "S", dport=port), fx_client, 1)
            if mode == "full-nat":  # the target's SYN-ACK, to lb's address and the port it gave the flow
                snat_ip = str(ipaddress.IPv4Address(first.data[26:30]))
                snat_port = int.from_bytes(first.data[34:36], "big")
                synack = tcp_frame(MAC["t" + target_addr.rsplit(".", 1)[1][-1]], MAC["fxb"], target_addr, snat_ip,
                                   target_port, snat_port, "SA")
                run_repeat(program.fd, synack, fx_target, 1)
            mode_ack = client_frame(sport, "A", dport=port)
            run_repeat(program.fd, mode_ack, fx_client, 1)  # completes the handshake (DSR: unchecked)
            mode_flow = maps.flow("TCP", Endpoint(ipaddress.IPv4Address(CLIENT), sport),
                                  Endpoint(ipaddress.IPv4Address(VIP), port))
            if mode_flow is None or mode_flow.half_open:
                raise SystemExit(f"{mode}: the handshake of port {sport} did not complete: {mode_flow}")
            lb_out = run_repeat(program.fd, mode_ack, fx_client, 1)
            cflags = [f"-I{bpf_source_dir()}", f"-DVIP_ADDR={ip_to_net(VIP):#x}U",
                      f"-DSVC0_VIP_PORT={port_to_net(port):#x}", f"-DSVC0_TARGET_PORT={port_to_net(target_port):#x}",
                      "-DSVC0_N=1", f"-DSVC0_T0={ip_to_net(target_addr):#x}U"]
            if mode == "full-nat":
                cflags += [f"-DSNAT_ADDR={int.from_bytes(lb_out.data[26:30], 'little'):#x}U",
                           f"-DSNAT_PORT={int.from_bytes(lb_out.data[34:36], 'little'):#x}"]
            else:
                cflags.append("-DMAC_ONLY")
            established_rows(mode, mode_ack, lb_out, BASELINE_C, b"xdp_baseline", cflags,
                             f"established TCP, {mode} (conntrack hit)", f"stateless {mode} floor (no maps)")
        dataplane.apply([service])

        # IPv6: an established flow per mode, against its own IPv6 floor.
        for i, (mode, (fwd, port)) in enumerate(MODE6.items()):
            target_port = port if mode == "dsr" else TARGET_PORT
            write_service6(maps, LIMITS, LIMITS.max_vips - 1 - i, LIMITS.max_targets - 1 - i, fwd, port, target_port)
            sport = CLIENT_PORT + 20 + i
            mode_syn = tcp_frame6(MAC["client"], MAC["fxa"], CLIENT6, VIP6, sport, port, "S")
            first = run_repeat(program.fd, mode_syn, fx_client, 1)
            if first.retval != XDP_REDIRECT:
                raise SystemExit(f"IPv6 {mode}: the SYN was not redirected ({ACTIONS.get(first.retval)})")
            if mode != "dsr":  # the target's SYN-ACK (full NAT: to lb's address and the port it gave the flow)
                snat_port = int.from_bytes(first.data[54:56], "big")
                to, to_port = (LB6, snat_port) if mode == "full-nat" else (CLIENT6, sport)
                synack = tcp_frame6(MAC["t2"], MAC["fxb"], TARGET6, to, target_port, to_port, "SA")
                run_repeat(program.fd, synack, fx_target, 1)
            mode_ack = tcp_frame6(MAC["client"], MAC["fxa"], CLIENT6, VIP6, sport, port, "A")
            run_repeat(program.fd, mode_ack, fx_client, 1)  # completes the handshake
            key = FlowKey6(ip6_to_net(CLIENT6), ip6_to_net(VIP6), port_to_net(sport), port_to_net(port), IPPROTO_TCP)
            if maps.raw(MapName.CONNTRACK6).lookup(key) is None:
                raise SystemExit(f"IPv6 {mode}: the handshake of port {sport} did not complete")
            lb_out = run_repeat(program.fd, mode_ack, fx_client, 1)
            cflags = [f"-I{bpf_source_dir()}", *words6("VIP", VIP6), f"-DVIP_PORT={port_to_net(port):#x}",
                      *words6("T", TARGET6), f"-DTARGET_PORT={port_to_net(target_port):#x}"]
            if mode == "full-nat":
                cflags += [*words6("SNAT", LB6), f"-DSNAT_PORT={int.from_bytes(lb_out.data[54:56], 'little'):#x}"]
            elif mode == "dsr":
                cflags.append("-DMAC_ONLY")
            established_rows(f"IPv6 {mode}", mode_ack, lb_out, BASELINE6_C, b"xdp_baseline6", cflags,
                             f"established TCP/IPv6, {mode} (conntrack6 hit)", f"stateless IPv6 {mode} floor (no maps)")

        attribution: list[tuple[str, float | None]] = []
        if args.attribute:
            open_flow(CLIENT_PORT)  # the established flow again (the miss case flooded it out)
            h = harnesses[cases[0][0]]
            source = (bpf_source_dir() / "lb.c").read_text()
            for what, edits in VARIANTS:
                text = source
                if any(old not in text for old, _ in edits):
                    attribution.append((what, None))  # lb.c changed: this edit no longer applies
                    continue
                for old, new in edits:
                    text = text.replace(old, new.replace("VIP_PORT", str(VIP_PORT)))
                # Loaded against the same pinned maps (the established flow is in them).
                with Program.load(NAME, LIMITS, source=text) as variant:
                    overhead = restored(h, pass_fd, ack, fx_client, args.repeat)
                    attribution.append((what, restored(h, variant.fd, ack, fx_client, args.repeat) - overhead))

        # Control plane timings.
        pool = [(str(e), 1) for e in endpoints_1000()]
        builds = []
        for _ in range(5):
            t = time.perf_counter()
            maglev.build_table(pool, LIMITS.ring_size)
            builds.append(time.perf_counter() - t)
        big = L4Service(VipAddr(ipaddress.IPv4Address(APPLY_VIP), 80, "TCP"),
                        members=tuple((e, 1) for e in endpoints_1000()), end_flows_on_removal=True)
        applies, rebuilds, writes = [], [], []
        for i in range(5):
            t = time.perf_counter()
            report = dataplane.apply([service, big])
            applies.append(time.perf_counter() - t)
            assert len(report.targets_added) == 1000 and report.vips_added, report
            # A steady-state change: one target swapped, ring rebuilt into the idle half and flipped.
            members = list(big.members)
            members[i] = (Endpoint(ipaddress.IPv4Address("10.0.1.250"), 9000 + i), 1)
            t = time.perf_counter()
            dataplane.apply([service, L4Service(big.vip, members=tuple(members), end_flows_on_removal=True)])
            rebuilds.append(time.perf_counter() - t)
            entry = next(e for e in maps.vips() if e.vip == big.vip)
            ring = dataplane.ring(big.vip) if i == 0 else None
            if ring is not None:
                t = time.perf_counter()
                maps.write_ring(entry.vip_id, entry.ring ^ 1, ring)
                writes.append(time.perf_counter() - t)
            dataplane.apply([service])  # remove it again (retires 1000 targets)

    # --- report --------------------------------------------------------------------
    print(f"method: harness restores the frame, tail-calls the program; repeat={args.repeat:,}; "
          f"median of {args.rounds}; net = gross - harness->XDP_PASS")
    print(f"        single-shot: repeat=1 x {args.single:,} syscalls, median - timer floor "
          f"({floor_single:.0f} ns); XDP_PASS-only program at repeat={args.repeat:,}: {floor_loop:.1f} ns")
    print("columns (ns per packet): naive = the program alone at repeat=N on one buffer (valid only for frames it")
    print("does not rewrite, see the verdicts below); gross = harness + program; harness = harness + XDP_PASS;")
    print("net = gross - harness; x base = net / baseline net; single = single-shot median - timer floor")
    print()
    header = f"{'case':<48} {'naive':>7} {'gross':>7} {'harness':>8} {'net':>7} {'x base':>7} {'single':>7}"
    print(header)
    print("-" * len(header))
    for row in [*rows, base, *(r for pair in mode_rows for r in pair)]:
        ratio = row.net / base.net if base.net > 0 else float("nan")
        naive = f"{row.naive:7.1f}" if row.naive is not None else f"{'-':>7}"
        single = f"{row.single:7.0f}" if row.single == row.single else f"{'-':>7}"
        print(f"{row.case:<48} {naive} {row.gross:7.1f} {row.overhead:8.1f} {row.net:7.1f} {ratio:7.2f} {single}")
    print()
    print("verdicts seen (lb counters) during one restored measurement series and during the naive run:")
    for row in rows:
        print(f"  {row.case}:")
        print(f"      restored: {row.verdicts}")
        if row.naive is not None:
            print(f"      naive:    {row.naive_verdicts}")
    print(f"  {base.case}: naive: {base.naive_verdicts}")
    print()
    est = rows[0]
    ratio_net = est.net / base.net
    ratio_gross = est.gross / base.gross
    ratio_single = est.single / base.single if base.single else float("nan")
    verdict = "MET" if ratio_net <= GOAL_RATIO else "NOT MET"
    print(f"goal: established <= {GOAL_RATIO} x baseline: net {est.net:.1f} / {base.net:.1f} ns = {ratio_net:.2f}x "
          f"[{verdict}] (gross {ratio_gross:.2f}x, single-shot {ratio_single:.2f}x)")
    for row in (r for r in rows if r.case.startswith("new TCP flow")):
        ratio = row.net / est.net
        verdict = "MET" if ratio <= GOAL_NEW_FLOW_RATIO else "NOT MET"
        print(f"goal: new flow <= {GOAL_NEW_FLOW_RATIO} x established: {row.case}: net {row.net:.1f} / {est.net:.1f} "
              f"ns = {ratio:.2f}x [{verdict}]")
    cold = next(r for r in rows if r.case.startswith("established TCP, ") and "in turn" in r.case)
    for row in (r for r in rows if r.case.startswith("new TCP flow")):
        print(f"  the same against an established flow of a full table ({cold.case}): net {row.net:.1f} / "
              f"{cold.net:.1f} ns = {row.net / cold.net:.2f}x")
    for lb_row, floor_row in mode_rows:
        ratio = lb_row.net / floor_row.net if floor_row.net > 0 else float("nan")
        verdict = "MET" if ratio <= GOAL_RATIO else "NOT MET"
        print(f"goal: {lb_row.case} <= {GOAL_RATIO} x its floor: net {lb_row.net:.1f} / {floor_row.net:.1f} ns "
              f"= {ratio:.2f}x [{verdict}] (gross {lb_row.gross:.1f} / {floor_row.gross:.1f}; "
              f"restored verdicts: {lb_row.verdicts})")
    promote = next((r for r in rows if r.case.startswith("ACK completing")), None)
    filling = next((r for r in rows if r.case.startswith("new TCP flow (miss, table filling")), None)
    if promote is not None and filling is not None:  # what a connection costs the program beyond its SYN
        both = filling.net + promote.net
        print(f"a connection's first two client segments (SYN, then the ACK that completes it): {filling.net:.1f} + "
              f"{promote.net:.1f} = {both:.1f} ns = {both / est.net:.2f}x established")
    best_build = min(builds) * 1e3
    verdict = "MET" if best_build <= GOAL_MAGLEV_MS else "NOT MET"
    print(f"goal: Maglev build N=1000 M={LIMITS.ring_size} <= {GOAL_MAGLEV_MS:.0f} ms: best of 5 {best_build:.1f} ms "
          f"(median {statistics.median(builds) * 1e3:.1f} ms) [{verdict}]")
    print(f"Dataplane.apply, new VIP with 1000 targets at M={LIMITS.ring_size}: best {min(applies) * 1e3:.1f} ms, "
          f"median {statistics.median(applies) * 1e3:.1f} ms (1000 target writes + Maglev + batch ring write + VIP)")
    print(f"Dataplane.apply, same VIP with one target swapped (ring rebuilt and flipped): best "
          f"{min(rebuilds) * 1e3:.1f} ms, median {statistics.median(rebuilds) * 1e3:.1f} ms")
    if writes:
        print(f"  of which the batch write of {LIMITS.ring_size} ring slots alone: {writes[0] * 1e3:.1f} ms")
    if attribution:
        print()
        print(f"attribution, established path (net ns; baseline {base.net:.1f}):")
        full = attribution[0][1]
        for what, ns in attribution:
            if ns is None:
                print(f"  {what:<52} (edit no longer applies to bpf/lb.c)")
            else:
                delta = f"{ns - full:+6.1f}" if full is not None else ""
                print(f"  {what:<52} {ns:7.1f} {delta}  = {ns / base.net:.2f} x baseline")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; cleaned up", file=sys.stderr)
        sys.exit(130)
