"""What a conntrack hit costs with IPv4's 16-byte key against a family-tagged
40-byte one (16-byte addresses), the choice IPv6 on the XDP path must make
(not a pytest test).

Usage (root):
    .venv/bin/python tests/bench/flow_key_width.py
    .venv/bin/python tests/bench/flow_key_width.py --entries 524288 --rounds 7

Three XDP programs, built by bcc, never attached, run through
BPF_PROG_TEST_RUN (repeat=1_000_000, median of the rounds) on one IPv4 TCP
frame; none rewrites the frame, so every run sees the same packet:

  parse   Ethernet/IPv4/TCP bounds checks, the 5-tuple read; no lookup (the floor)
  key16   + a lookup in an lru_hash keyed by today's struct flow_key
            (16 B: IPv4 addresses): one map per family keeps this for IPv4
  key40   + a lookup in an lru_hash keyed by a family-tagged key (40 B:
            the IPv4 addresses as IPv4-mapped IPv6, a family byte): one map
            for both families

Both tables hold --entries flows (the frame's among them, so every lookup
hits; the verdict proves it: XDP_PASS on a hit, XDP_DROP on a miss). The
"net" column is the row minus `parse`: what the lookup itself costs. The
programs are loaded and unloaded with this process; no pin, no namespace.
"""

from __future__ import annotations

import argparse
import ctypes
import ipaddress
import os
import socket
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bcc import BPF  # noqa: E402
from scapy.compat import raw  # noqa: E402
from scapy.layers.inet import IP, TCP  # noqa: E402
from scapy.layers.l2 import Ether  # noqa: E402

from lb.dataplane import libbpf  # noqa: E402

BENCH_CPU = 1
CLIENT, VIP, SPORT, DPORT = "10.0.0.2", "10.0.0.100", 40000, 80
XDP_DROP, XDP_PASS = 1, 2

SOURCE = r"""
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

struct key16 {          /* struct flow_key (bpf/structs.h) */
	__be32 src, dst;
	__be16 sport, dport;
	__u8 proto, pad[3];
};

struct key40 {          /* family-tagged: 16-byte addresses */
	__be32 src[4], dst[4];
	__be16 sport, dport;
	__u8 proto, family, pad[2];
};

BPF_TABLE("lru_hash", struct key16, __u64, flows16, KEY_BENCH_ENTRIES);
BPF_TABLE("lru_hash", struct key40, __u64, flows40, KEY_BENCH_ENTRIES);

static __always_inline struct iphdr *parse(struct xdp_md *ctx, struct tcphdr **tcp)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return NULL;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->protocol != IPPROTO_TCP)
		return NULL;
	*tcp = (void *)(ip + 1);
	if ((void *)(*tcp + 1) > end)
		return NULL;
	return ip;
}

int parse_only(struct xdp_md *ctx)
{
	struct tcphdr *tcp;
	struct iphdr *ip = parse(ctx, &tcp);
	if (!ip)
		return XDP_ABORTED;
	volatile __u32 sink = ip->saddr ^ ip->daddr ^ tcp->source ^ tcp->dest;
	(void)sink;
	return XDP_PASS;
}

int lookup16(struct xdp_md *ctx)
{
	struct tcphdr *tcp;
	struct iphdr *ip = parse(ctx, &tcp);
	if (!ip)
		return XDP_ABORTED;
	struct key16 k = {.src = ip->saddr, .dst = ip->daddr, .sport = tcp->source, .dport = tcp->dest,
	                  .proto = ip->protocol};
	return flows16.lookup(&k) ? XDP_PASS : XDP_DROP;
}

int lookup40(struct xdp_md *ctx)
{
	struct tcphdr *tcp;
	struct iphdr *ip = parse(ctx, &tcp);
	if (!ip)
		return XDP_ABORTED;
	struct key40 k = {};
	k.src[2] = bpf_htonl(0xffff);
	k.src[3] = ip->saddr;
	k.dst[2] = bpf_htonl(0xffff);
	k.dst[3] = ip->daddr;
	k.sport = tcp->source;
	k.dport = tcp->dest;
	k.proto = ip->protocol;
	k.family = 4;
	return flows40.lookup(&k) ? XDP_PASS : XDP_DROP;
}
"""


def net32(address: str) -> int:
    """An IPv4 address as the u32 a little- or big-endian host reads from the wire."""
    return int.from_bytes(ipaddress.IPv4Address(address).packed, sys.byteorder)


def net16(port: int) -> int:
    return socket.htons(port)


def fill(bpf: BPF, entries: int) -> None:
    """`entries` flows in each table, the frame's flow (client port SPORT) among them."""
    t16, t40 = bpf["flows16"], bpf["flows40"]
    mapped = socket.htonl(0xFFFF)
    flows = [(str(ipaddress.IPv4Address(CLIENT) + 1 + i // 50000), 1024 + i % 50000) for i in range(entries - 1)]
    flows.append((CLIENT, SPORT))  # last: the most recently used, never what an LRU table evicts
    for i, (client, sport) in enumerate(flows):
        k16 = t16.Key(src=net32(client), dst=net32(VIP), sport=net16(sport), dport=net16(DPORT), proto=6)
        t16[k16] = ctypes.c_ulonglong(i)
        k40 = t40.Key()
        k40.src[2], k40.src[3] = mapped, net32(client)
        k40.dst[2], k40.dst[3] = mapped, net32(VIP)
        k40.sport, k40.dport, k40.proto, k40.family = net16(sport), net16(DPORT), 6, 4
        t40[k40] = ctypes.c_ulonglong(i)


def measure(fd: int, frame: bytes, repeat: int, rounds: int, want: int) -> float:
    """Median nanoseconds per run over `rounds` runs of `repeat`."""
    figures = []
    for _ in range(rounds):
        result = libbpf.prog_test_run(fd, frame, repeat=repeat)
        if result.retval != want:
            raise SystemExit(f"verdict {result.retval}, wanted {want}: the lookup did not hit")
        figures.append(result.duration_ns)
    return statistics.median(figures)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--entries", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    if args.entries < 1:
        parser.error("--entries: at least 1")

    os.sched_setaffinity(0, {BENCH_CPU})
    frame = raw(Ether() / IP(src=CLIENT, dst=VIP) / TCP(sport=SPORT, dport=DPORT, flags="A"))
    bpf = BPF(text=SOURCE, cflags=[f"-DKEY_BENCH_ENTRIES={args.entries}"])
    try:
        fill(bpf, args.entries)
        fds = {name: bpf.load_func(name, BPF.XDP).fd for name in ("parse_only", "lookup16", "lookup40")}
        floor = measure(fds["parse_only"], frame, args.repeat, args.rounds, XDP_PASS)
        k16 = measure(fds["lookup16"], frame, args.repeat, args.rounds, XDP_PASS)
        k40 = measure(fds["lookup40"], frame, args.repeat, args.rounds, XDP_PASS)
    finally:
        bpf.cleanup()
    print(f"conntrack-hit lookup, {args.entries} entries, repeat {args.repeat}, median of {args.rounds}, "
          f"cpu {BENCH_CPU}")
    print(f"{'row':<8} {'ns/pkt':>8} {'net ns':>8}")
    print(f"{'parse':<8} {floor:>8.1f} {0:>8.1f}")
    print(f"{'key16':<8} {k16:>8.1f} {k16 - floor:>8.1f}")
    print(f"{'key40':<8} {k40:>8.1f} {k40 - floor:>8.1f}")
    net16_, net40 = k16 - floor, k40 - floor
    if net16_ > 0:
        print(f"key40 / key16 (net lookup): {net40 / net16_:.2f}x")


if __name__ == "__main__":
    main()
