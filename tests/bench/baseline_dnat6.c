/* baseline_dnat6.c: baseline_dnat.c's floor for IPv6, as a yardstick for
 * bpf/lb.c's IPv6 path (tests/bench/xdp_cost.py's IPv6 rows).
 *
 * No maps. It parses Ethernet / IPv6 / TCP as far as lb.c does (no extension
 * header, the payload within the frame), rewrites [VIP]:port to one target
 * with the same incremental checksum helpers (bpf/csum.h; no IP header
 * checksum in IPv6), decrements the hop limit and sends the frame on with
 * the same bpf_fib_lookup (AF_INET6) + bpf_redirect/XDP_TX.
 *
 * cflags: addresses as four words each, the integers whose memory holds the
 * address in network order (lb.dataplane.structs.ip6_to_net(...).words);
 * ports as port_to_net gives them:
 *
 *   VIP_W0..VIP_W3, VIP_PORT          the VIP
 *   T_W0..T_W3, TARGET_PORT           its one target
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

	__u32 *dst = ip6->daddr.in6_u.u6_addr32;
	if (dst[0] != VIP_W0 || dst[1] != VIP_W1 || dst[2] != VIP_W2 || dst[3] != VIP_W3 || tcp->dest != VIP_PORT)
		return XDP_PASS;
	if (ip6->hop_limit <= 1)
		return XDP_DROP;

	/* Element by element: an initialised array would be a .rodata copy, which bcc does not load. */
	__u32 target[4];
	target[0] = T_W0;
	target[1] = T_W1;
	target[2] = T_W2;
	target[3] = T_W3;
#ifndef MAC_ONLY
	__u32 old[4] = {dst[0], dst[1], dst[2], dst[3]};
	__builtin_memcpy(dst, target, sizeof(target));
	csum_replace16(&tcp->check, old, target);
	if (tcp->dest != TARGET_PORT) {
		csum_replace2(&tcp->check, tcp->dest, TARGET_PORT);
		tcp->dest = TARGET_PORT;
	}
#ifdef SNAT_PORT
	__u32 *src = ip6->saddr.in6_u.u6_addr32;
	__u32 snat[4];
	snat[0] = SNAT_W0;
	snat[1] = SNAT_W1;
	snat[2] = SNAT_W2;
	snat[3] = SNAT_W3;
	__u32 old_src[4] = {src[0], src[1], src[2], src[3]};
	__builtin_memcpy(src, snat, sizeof(snat));
	csum_replace16(&tcp->check, old_src, snat);
	csum_replace2(&tcp->check, tcp->source, SNAT_PORT);
	tcp->source = SNAT_PORT;
#endif
#endif

	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)ip6 & bpf_htonl(0x0fffffff);
	fib.l4_protocol = IPPROTO_TCP;
	fib.sport = tcp->source;
	fib.dport = tcp->dest;
	fib.tot_len = sizeof(struct ipv6hdr) + bpf_ntohs(ip6->payload_len);
	__builtin_memcpy(fib.ipv6_src, &ip6->saddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, target, sizeof(fib.ipv6_dst));
	fib.ifindex = ctx->ingress_ifindex;
	if (bpf_fib_lookup(ctx, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS)
		return XDP_PASS;

	ip6->hop_limit -= 1;
	__builtin_memcpy(eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(fib.ifindex, 0);
}
