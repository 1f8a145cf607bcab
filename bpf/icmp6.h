/* icmp6.h: ICMPv6 errors about tracked IPv6 flows, and "packet too big"
 * made by the program itself (icmp.h's twin).
 *
 * An ICMPv6 error quotes the packet it is about, as much of it as fits in
 * 1280 bytes: its fixed header, the ports and, most often, the whole TCP or
 * UDP header with its checksum, which is rewritten too. Unlike ICMP, the ICMPv6 checksum covers
 * a pseudo-header of the outer addresses as well as the message, and IPv6
 * has no header checksum: every field changed, outer addresses, quoted
 * addresses, ports and L4 checksum, is folded into the one ICMPv6 checksum. The maps are read in lb.c.
 */
#ifndef LB_ICMP6_H
#define LB_ICMP6_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <bcc/helpers.h>

#include "csum.h"
#include "parse.h"
#include "structs.h"

#ifndef barrier_var
/* The compiler forgets what it knew of var's value (libbpf's barrier_var). */
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

/* An ICMPv6 error and the packet it quotes. */
struct icmp6_error {
	struct icmp6hdr *icmp;
	struct ipv6hdr *inner;     /* the quoted IPv6 header (TCP or UDP right after it) */
	__be16 *inner_ports;       /* its source and destination ports */
	__sum16 *inner_l4_check;   /* the quoted TCP or UDP checksum; NULL when the quote ends before it */
};

/* Is the packet (pkt->ip6 parsed, ICMPv6 right after it) an error we
 * translate: destination unreachable, packet too big or time exceeded,
 * quoting a whole IPv6 header with TCP or UDP next and 8 bytes of it? 0:
 * yes, `err` filled and `back` the quoted 5-tuple reversed (the stack is
 * short on this path: no copy of the quote as it sits). */
static __always_inline int icmp6_error_parse(struct xdp_md *ctx, struct packet6 *pkt, struct icmp6_error *err,
                                             struct flow_key6 *back)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct icmp6hdr *icmp = (void *)(pkt->ip6 + 1);
	if ((void *)(icmp + 1) > data_end)
		return -1;
	if (icmp->icmp6_type != ICMPV6_DEST_UNREACH && icmp->icmp6_type != ICMPV6_PKT_TOOBIG &&
	    icmp->icmp6_type != ICMPV6_TIME_EXCEED)
		return -1;
	struct ipv6hdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > data_end || inner->version != 6)
		return -1;
	if (inner->nexthdr != IPPROTO_TCP && inner->nexthdr != IPPROTO_UDP)
		return -1;
	__be16 *ports = (void *)(inner + 1);
	if ((void *)(ports + 4) > data_end) /* 8 bytes: ports, and UDP's length and checksum */
		return -1;
	err->icmp = icmp;
	err->inner = inner;
	err->inner_ports = ports;
	__sum16 *l4_check = NULL;
	if (inner->nexthdr == IPPROTO_UDP)
		l4_check = (__sum16 *)&ports[3];
	else if ((void *)((struct tcphdr *)ports + 1) <= data_end)
		l4_check = &((struct tcphdr *)ports)->check;
	barrier_var(l4_check); /* the pointer is tested, not the protocol again (icmp.h) */
	err->inner_l4_check = l4_check;
	__builtin_memcpy(&back->src, &inner->daddr, sizeof(back->src));
	__builtin_memcpy(&back->dst, &inner->saddr, sizeof(back->dst));
	back->sport = ports[1];
	back->dport = ports[0];
	back->proto = inner->nexthdr;
	return 0;
}

/* The quoted packet's source (which = 0) or destination (1) becomes addr:port. */
static __always_inline void icmp6_quote_rewrite(struct icmp6_error *err, int which, const struct addr6 *addr,
                                                __be16 port)
{
	struct in6_addr *field = which ? &err->inner->daddr : &err->inner->saddr;
	struct addr6 old_addr;
	__be16 old_port = err->inner_ports[which & 1];
	__sum16 *l4 = err->inner_l4_check;

	__builtin_memcpy(&old_addr, field, sizeof(old_addr));
	__builtin_memcpy(field, addr, sizeof(*addr));
	csum_replace16(&err->icmp->icmp6_cksum, old_addr.words, addr->words);
	err->inner_ports[which & 1] = port;
	csum_replace2(&err->icmp->icmp6_cksum, old_port, port);
	if (l4) {
		__u16 old_l4_check = *l4;
		csum_replace16(l4, old_addr.words, addr->words);
		csum_replace2(l4, old_port, port);
		if (*l4 == 0 && err->inner->nexthdr == IPPROTO_UDP) /* UDP's 0 means "none" */
			*l4 = 0xffff;
		csum_replace2(&err->icmp->icmp6_cksum, old_l4_check, *l4);
	}
}

/* The error itself now comes from (which = 0) or goes to (1) `addr`, which
 * is in its checksum's pseudo-header. */
static __always_inline void icmp6_outer_rewrite(struct packet6 *pkt, struct icmp6_error *err, int which,
                                                const struct addr6 *addr)
{
	struct in6_addr *field = which ? &pkt->ip6->daddr : &pkt->ip6->saddr;
	struct addr6 old_addr;
	__builtin_memcpy(&old_addr, field, sizeof(old_addr));
	__builtin_memcpy(field, addr, sizeof(*addr));
	csum_replace16(&err->icmp->icmp6_cksum, old_addr.words, addr->words);
}

/* The quote of "packet too big": the packet's fixed header and the 8 bytes
 * that hold its ports, which is what a host needs to find the connection
 * (Linux reads no further). RFC 4443 asks for as much as fits in 1280
 * bytes; this keeps the checksum a fixed, unrolled sum, as icmp.h's does. */
#define ICMP6_TOO_BIG_QUOTE (sizeof(struct ipv6hdr) + 8)
#define ICMP6_TOO_BIG_HEADERS (sizeof(struct ipv6hdr) + sizeof(struct icmp6hdr))
#define ICMP6_TOO_BIG_LEN (sizeof(struct icmp6hdr) + ICMP6_TOO_BIG_QUOTE)

/* Turn the frame (an IPv6 packet of `pkt`'s 5-tuple, untouched) into
 * "packet too big, MTU `mtu`" back to its sender, from its destination (the
 * VIP), the MACs swapped: the caller sends it with XDP_TX. -1: the frame
 * could not be resized (the caller passes it). The packet's pointers are
 * invalid after. */
static __always_inline int icmp6_too_big(struct xdp_md *ctx, struct packet6 *pkt, __u32 mtu)
{
	unsigned char mac_src[ETH_ALEN], mac_dst[ETH_ALEN];
	__builtin_memcpy(mac_src, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac_dst, pkt->eth->h_dest, ETH_ALEN);
	struct addr6 saddr = pkt->flow.src, daddr = pkt->flow.dst;

	int keep = sizeof(struct ethhdr) + ICMP6_TOO_BIG_QUOTE;
	if (bpf_xdp_adjust_tail(ctx, keep - (int)pkt->len))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)ICMP6_TOO_BIG_HEADERS))
		return -1;

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct ipv6hdr *ip6 = (void *)(eth + 1);
	struct icmp6hdr *icmp = (void *)(ip6 + 1);
	if ((void *)(icmp + 1) + ICMP6_TOO_BIG_QUOTE > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, mac_src, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac_dst, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IPV6);

	*(__be32 *)ip6 = bpf_htonl(6 << 28); /* version 6, traffic class 0, no flow label */
	ip6->payload_len = bpf_htons(ICMP6_TOO_BIG_LEN);
	ip6->nexthdr = IPPROTO_ICMPV6;
	ip6->hop_limit = 64;
	__builtin_memcpy(&ip6->saddr, &daddr, sizeof(daddr));
	__builtin_memcpy(&ip6->daddr, &saddr, sizeof(saddr));

	icmp->icmp6_type = ICMPV6_PKT_TOOBIG;
	icmp->icmp6_code = 0;
	icmp->icmp6_cksum = 0;
	icmp->icmp6_mtu = bpf_htonl(mtu);

	/* The checksum: the pseudo-header (both addresses, the length, the next
	 * header) and the message, as 16-bit words. */
	__u32 sum = bpf_htons(ICMP6_TOO_BIG_LEN) + bpf_htons(IPPROTO_ICMPV6);
	const __u16 *words = (const __u16 *)&ip6->saddr;
#pragma unroll
	for (int i = 0; i < 16; i++) /* saddr and daddr */
		sum += words[i];
	words = (const __u16 *)icmp;
#pragma unroll
	for (int i = 0; i < (int)(ICMP6_TOO_BIG_LEN / 2); i++)
		sum += words[i];
	icmp->icmp6_cksum = ~csum_fold(sum);
	return 0;
}

#endif /* LB_ICMP6_H */
