/* baseline_dnat.c: the least an XDP DNAT can do, as a yardstick for bpf/lb.c.
 *
 * No maps at all. It parses Ethernet / IPv4 / TCP exactly as far as lb.c does
 * (bounds checks, IHL 5, no fragments), rewrites VIP:port to a target with
 * the same incremental checksum helpers (bpf/csum.h), decrements the TTL,
 * and sends the frame on with the same bpf_fib_lookup + bpf_redirect/XDP_TX.
 * What lb.c adds on top of this is its maps: the VIP hash, conntrack,
 * the Maglev ring, targets, reverse entries, per-CPU statistics.
 *
 * Used by tests/bench/xdp_cost.py (one service, one target, no reverse NAT:
 * the per-packet floor) and tests/bench/l4_e2e.py (the "stateless XDP DNAT"
 * ceiling: two services, a 5-tuple hash over up to three targets, and
 * stateless reverse NAT of the replies).
 *
 * Everything is configured with cflags; addresses and ports are given as
 * the integers whose memory holds them in network order (what Python's
 * lb.dataplane.structs.ip_to_net / port_to_net return), so no byte swapping
 * happens at run time:
 *
 *   VIP_ADDR                         the VIP
 *   SVC0_VIP_PORT, SVC0_TARGET_PORT  service 0: VIP:port -> target:port
 *   SVC0_N (1..3), SVC0_T0..T2       its targets (a 5-tuple hash picks one when N > 1)
 *   SVC1_...                         optional second service, same fields
 *   REVERSE_NAT                      also rewrite replies from target:port
 *                                    back to VIP:vip_port (stateless)
 *   SNAT_ADDR, SNAT_PORT             full NAT's floor: the forward packet's source
 *                                    becomes SNAT_ADDR:SNAT_PORT too (one fixed port)
 *   MAC_ONLY                         DSR's floor: nothing rewritten but the MACs
 *                                    (and the TTL); the next hop is the target's
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "csum.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

#ifndef SVC0_N
#define SVC0_N 1
#endif
#ifndef SVC0_T1
#define SVC0_T1 SVC0_T0
#endif
#ifndef SVC0_T2
#define SVC0_T2 SVC0_T0
#endif
#ifdef SVC1_VIP_PORT
#ifndef SVC1_N
#define SVC1_N 1
#endif
#ifndef SVC1_T1
#define SVC1_T1 SVC1_T0
#endif
#ifndef SVC1_T2
#define SVC1_T2 SVC1_T0
#endif
#endif

static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The same murmur3 finalizer lb.c hashes flows with. */
static __always_inline __u32 tuple_hash(struct iphdr *ip, struct tcphdr *tcp)
{
	__u32 h = 0x6c620001;
	h = mix32(h ^ ip->saddr);
	h = mix32(h ^ ip->daddr);
	h = mix32(h ^ (((__u32)tcp->source << 16) | tcp->dest));
	return mix32(h ^ ip->protocol);
}

static __always_inline __u32 pick(__u32 n, __u32 h, __u32 t0, __u32 t1, __u32 t2)
{
	if (n <= 1)
		return t0;
	__u32 i = h % n;
	return i == 0 ? t0 : i == 1 ? t1 : t2;
}

int xdp_baseline(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end || ip->version != 4 || ip->ihl != 5)
		return XDP_PASS;
	if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET) || ip->protocol != IPPROTO_TCP)
		return XDP_PASS;
	tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end || (void *)ip + bpf_ntohs(ip->tot_len) > data_end)
		return XDP_PASS;

	__be32 old_addr, new_addr;
	__be16 old_port, new_port;
	int forward;

	if (ip->daddr == VIP_ADDR && tcp->dest == SVC0_VIP_PORT) {
		new_addr = pick(SVC0_N, SVC0_N > 1 ? tuple_hash(ip, tcp) : 0, SVC0_T0, SVC0_T1, SVC0_T2);
		new_port = SVC0_TARGET_PORT;
		forward = 1;
#ifdef SVC1_VIP_PORT
	} else if (ip->daddr == VIP_ADDR && tcp->dest == SVC1_VIP_PORT) {
		new_addr = pick(SVC1_N, SVC1_N > 1 ? tuple_hash(ip, tcp) : 0, SVC1_T0, SVC1_T1, SVC1_T2);
		new_port = SVC1_TARGET_PORT;
		forward = 1;
#endif
#ifdef REVERSE_NAT
	} else if (tcp->source == SVC0_TARGET_PORT &&
	           (ip->saddr == SVC0_T0 || ip->saddr == SVC0_T1 || ip->saddr == SVC0_T2)) {
		new_addr = VIP_ADDR;
		new_port = SVC0_VIP_PORT;
		forward = 0;
#ifdef SVC1_VIP_PORT
	} else if (tcp->source == SVC1_TARGET_PORT &&
	           (ip->saddr == SVC1_T0 || ip->saddr == SVC1_T1 || ip->saddr == SVC1_T2)) {
		new_addr = VIP_ADDR;
		new_port = SVC1_VIP_PORT;
		forward = 0;
#endif
#endif
	} else {
		return XDP_PASS;
	}
	if (ip->ttl <= 1)
		return XDP_DROP;

	__be32 next = new_addr;
#ifdef MAC_ONLY
	if (!forward) {
#endif
	if (forward) {
		old_addr = ip->daddr;
		old_port = tcp->dest;
		ip->daddr = new_addr;
		tcp->dest = new_port;
	} else {
		old_addr = ip->saddr;
		old_port = tcp->source;
		ip->saddr = new_addr;
		tcp->source = new_port;
	}
	csum_replace4(&ip->check, old_addr, new_addr);
	csum_replace4(&tcp->check, old_addr, new_addr);
	if (old_port != new_port)
		csum_replace2(&tcp->check, old_port, new_port);
#ifdef SNAT_ADDR
	if (forward) {
		old_addr = ip->saddr;
		old_port = tcp->source;
		ip->saddr = SNAT_ADDR;
		tcp->source = SNAT_PORT;
		csum_replace4(&ip->check, old_addr, SNAT_ADDR);
		csum_replace4(&tcp->check, old_addr, SNAT_ADDR);
		csum_replace2(&tcp->check, old_port, SNAT_PORT);
	}
#endif
#ifdef MAC_ONLY
	}
#endif
	next = forward ? next : ip->daddr;

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.tos = ip->tos;
	fib.l4_protocol = ip->protocol;
	fib.sport = tcp->source;
	fib.dport = tcp->dest;
	fib.tot_len = bpf_ntohs(ip->tot_len);
	fib.ipv4_src = ip->saddr;
	fib.ipv4_dst = next;
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS; /* the kernel forwards the rewritten frame */

	__u16 *word = (__u16 *)&ip->ttl; /* ttl and protocol share one 16-bit word */
	__u16 old = *word;
	ip->ttl -= 1;
	csum_replace2(&ip->check, old, *word);
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}
