/* baseline_dnat6.c: baseline_dnat.c's floor for IPv6, as a yardstick for
 * bpf/lb.c's IPv6 path (tests/bench/xdp_cost.py's IPv6 rows).
 *
 * No maps. It parses Ethernet / IPv6 / TCP as far as lb.c does (no extension
 * header, the payload within the frame), rewrites [VIP]:port to a target
 * with the same incremental checksum helpers (bpf/csum.h; no IP header
 * checksum in IPv6), decrements the hop limit and sends the frame on with
 * the same bpf_fib_lookup (AF_INET6) + bpf_redirect/XDP_TX.
 *
 * Also tests/bench/l4_e2e.py's IPv6 "stateless XDP DNAT" ceiling (as
 * baseline_dnat.c is its IPv4 one): up to three targets picked by a 5-tuple
 * hash, a second service, and stateless reverse NAT of the replies.
 *
 * cflags: addresses as four words each, the integers whose memory holds the
 * address in network order (lb.dataplane.structs.ip6_to_net(...).words);
 * ports as port_to_net gives them:
 *
 *   VIP_W0..VIP_W3, VIP_PORT          the VIP
 *   T_W0..T_W3, TARGET_PORT           its target
 *   TARGETS_N (1..3), T1_W*, T2_W*    more targets: a 5-tuple hash picks one of TARGETS_N
 *   SVC1_VIP_PORT, SVC1_TARGET_PORT   optional second service on the VIP, toward the first target (T_W*)
 *   REVERSE_NAT                       also rewrite replies from a target's port back to
 *                                     [VIP]:port (stateless; the client is the next hop)
 *   SNAT_W0..SNAT_W3, SNAT_PORT       full NAT's floor: the source becomes lb's address and port too
 *   MAC_ONLY                          DSR's floor: nothing rewritten but the MACs (and the hop limit)
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>

#include "csum.h"

#ifndef AF_INET6
#define AF_INET6 10
#endif

#ifndef TARGETS_N
#define TARGETS_N 1
#endif
#ifndef T1_W0
#define T1_W0 T_W0
#define T1_W1 T_W1
#define T1_W2 T_W2
#define T1_W3 T_W3
#endif
#ifndef T2_W0
#define T2_W0 T_W0
#define T2_W1 T_W1
#define T2_W2 T_W2
#define T2_W3 T_W3
#endif

/* a[0..3] = P_W0..P_W3, element by element: an initialised array would be a
 * .rodata copy, which bcc does not load. */
#define SET6(a, P) do { (a)[0] = P##_W0; (a)[1] = P##_W1; (a)[2] = P##_W2; (a)[3] = P##_W3; } while (0)
#define IS6(a, P) ((a)[0] == P##_W0 && (a)[1] == P##_W1 && (a)[2] == P##_W2 && (a)[3] == P##_W3)

static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* baseline_dnat.c's murmur3-finalizer 5-tuple hash, over IPv6 addresses. */
static __always_inline __u32 tuple_hash6(__u32 *src, __u32 *dst, struct tcphdr *tcp)
{
	__u32 h = 0x6c620001;
	h = mix32(h ^ src[0]);
	h = mix32(h ^ src[1]);
	h = mix32(h ^ src[2]);
	h = mix32(h ^ src[3]);
	h = mix32(h ^ dst[0]);
	h = mix32(h ^ dst[1]);
	h = mix32(h ^ dst[2]);
	h = mix32(h ^ dst[3]);
	h = mix32(h ^ (((__u32)tcp->source << 16) | tcp->dest));
	return mix32(h ^ IPPROTO_TCP);
}

int xdp_baseline6(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IPV6))
		return XDP_PASS;
	ip6 = (void *)(eth + 1);
	if ((void *)(ip6 + 1) > data_end || ip6->version != 6 || ip6->nexthdr != IPPROTO_TCP)
		return XDP_PASS;
	tcp = (void *)(ip6 + 1);
	if ((void *)(tcp + 1) > data_end ||
	    sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len) > data_end - data)
		return XDP_PASS;

	__u32 *src = ip6->saddr.in6_u.u6_addr32;
	__u32 *dst = ip6->daddr.in6_u.u6_addr32;
	__u32 target[4];
	__be16 new_port;
	int forward = 1;

	if (IS6(dst, VIP) && tcp->dest == VIP_PORT) {
		__u32 i = TARGETS_N > 1 ? tuple_hash6(src, dst, tcp) % TARGETS_N : 0;
		if (i == 0)
			SET6(target, T);
		else if (i == 1)
			SET6(target, T1);
		else
			SET6(target, T2);
		new_port = TARGET_PORT;
#ifdef SVC1_VIP_PORT
	} else if (IS6(dst, VIP) && tcp->dest == SVC1_VIP_PORT) {
		SET6(target, T);
		new_port = SVC1_TARGET_PORT;
#endif
#ifdef REVERSE_NAT
	} else if (tcp->source == TARGET_PORT && (IS6(src, T) || IS6(src, T1) || IS6(src, T2))) {
		SET6(target, VIP); /* the new source */
		new_port = VIP_PORT;
		forward = 0;
#ifdef SVC1_VIP_PORT
	} else if (tcp->source == SVC1_TARGET_PORT && IS6(src, T)) {
		SET6(target, VIP);
		new_port = SVC1_VIP_PORT;
		forward = 0;
#endif
#endif
	} else {
		return XDP_PASS;
	}
	if (ip6->hop_limit <= 1)
		return XDP_DROP;

	if (forward) {
#ifndef MAC_ONLY
		__u32 old[4] = {dst[0], dst[1], dst[2], dst[3]};
		__builtin_memcpy(dst, target, sizeof(target));
		csum_replace16(&tcp->check, old, target);
		if (tcp->dest != new_port) {
			csum_replace2(&tcp->check, tcp->dest, new_port);
			tcp->dest = new_port;
		}
#ifdef SNAT_PORT
		__u32 snat[4];
		SET6(snat, SNAT);
		__u32 old_src[4] = {src[0], src[1], src[2], src[3]};
		__builtin_memcpy(src, snat, sizeof(snat));
		csum_replace16(&tcp->check, old_src, snat);
		csum_replace2(&tcp->check, tcp->source, SNAT_PORT);
		tcp->source = SNAT_PORT;
#endif
#endif
	} else {
		__u32 old[4] = {src[0], src[1], src[2], src[3]};
		__builtin_memcpy(src, target, sizeof(target));
		csum_replace16(&tcp->check, old, target);
		if (tcp->source != new_port) {
			csum_replace2(&tcp->check, tcp->source, new_port);
			tcp->source = new_port;
		}
	}

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = tcp->source;
	fib.dport = tcp->dest;
	fib.tot_len = sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
	if (forward)
		__builtin_memcpy(fib.ipv6_dst, target, sizeof(fib.ipv6_dst)); /* MAC_ONLY: still the VIP in the packet */
	else
		__builtin_memcpy(fib.ipv6_dst, &ip6->daddr, sizeof(fib.ipv6_dst));
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS; /* the kernel forwards the rewritten frame */

	ip6->hop_limit -= 1;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}
