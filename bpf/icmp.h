/* icmp.h: ICMP errors about tracked flows, and "fragmentation needed" made
 * by the program itself.
 *
 * An ICMP error quotes the IP header and the first 8 bytes (the ports) of
 * the packet it is about. A quote of a rewritten packet means nothing to
 * the party that sent the original, so the quote is rewritten back (and
 * the outer addresses with it) before the error goes on. The ICMP checksum
 * covers the quote: every field changed inside it, the quoted IP and UDP
 * checksums included, is folded into it. The maps are read in lb.c.
 */
#ifndef LB_ICMP_H
#define LB_ICMP_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/udp.h>
#include <bcc/helpers.h>

#include "csum.h"
#include "parse.h"
#include "structs.h"

#ifndef barrier_var
/* The compiler forgets what it knew of var's value (libbpf's barrier_var). */
#define barrier_var(var) asm volatile("" : "+r"(var))
#endif

/* An ICMP error and the packet it quotes. */
struct icmp_error {
	struct icmphdr *icmp;
	struct iphdr *inner;      /* the quoted IPv4 header (no options) */
	__be16 *inner_ports;      /* its source and destination ports */
	__sum16 *inner_udp_check; /* the quoted UDP checksum; NULL for TCP (beyond the 8 bytes) */
	struct flow_key quoted;   /* the quoted packet's 5-tuple, as it sits there */
};

/* Is the packet (pkt->ip parsed, protocol ICMP) an error we translate:
 * destination unreachable (fragmentation needed among them) or time
 * exceeded, quoting a whole TCP or UDP header start? 0: yes, `err` filled. */
static __always_inline int icmp_error_parse(struct xdp_md *ctx, struct packet *pkt, struct icmp_error *err)
{
	void *data_end = (void *)(long)ctx->data_end;
	struct icmphdr *icmp = (void *)(pkt->ip + 1);
	if ((void *)(icmp + 1) > data_end)
		return -1;
	if (icmp->type != ICMP_DEST_UNREACH && icmp->type != ICMP_TIME_EXCEEDED)
		return -1;
	struct iphdr *inner = (void *)(icmp + 1);
	if ((void *)(inner + 1) > data_end || inner->version != 4 || inner->ihl != 5)
		return -1;
	if (inner->protocol != IPPROTO_TCP && inner->protocol != IPPROTO_UDP)
		return -1;
	__be16 *ports = (void *)(inner + 1);
	if ((void *)(ports + 4) > data_end) /* 8 bytes: ports, and UDP's length and checksum */
		return -1;
	err->icmp = icmp;
	err->inner = inner;
	err->inner_ports = ports;
	__sum16 *udp_check = inner->protocol == IPPROTO_UDP ? (__sum16 *)&ports[3] : NULL;
	/* The compiler would test the quoted protocol again where the pointer is
	 * tested (the two agree), and Debian 12's 6.1 verifier, which keeps no
	 * value for a byte spilled to the stack, then follows a "UDP" path with a
	 * NULL pointer and refuses the program: let it forget the correlation. */
	barrier_var(udp_check);
	err->inner_udp_check = udp_check;
	err->quoted.src = inner->saddr;
	err->quoted.dst = inner->daddr;
	err->quoted.sport = ports[0];
	err->quoted.dport = ports[1];
	err->quoted.proto = inner->protocol;
	return 0;
}

/* A checksum inside the quote went from `from` to its current value: the ICMP checksum follows. */
static __always_inline void icmp_follow(struct icmp_error *err, __u16 from, __u16 to)
{
	csum_replace2(&err->icmp->checksum, from, to);
}

/* The quoted packet's source (which = 0) or destination (1) becomes addr:port. */
static __always_inline void icmp_quote_rewrite(struct icmp_error *err, int which, __be32 addr, __be16 port)
{
	__be32 *field = which ? &err->inner->daddr : &err->inner->saddr;
	__be32 old_addr = *field;
	__be16 old_port = err->inner_ports[which & 1];
	__u16 old_ip_check = err->inner->check;
	__sum16 *udp = err->inner_udp_check;
	__u16 old_udp_check = udp ? *udp : 0;

	*field = addr;
	csum_replace4(&err->icmp->checksum, old_addr, addr);
	csum_replace4(&err->inner->check, old_addr, addr);
	icmp_follow(err, old_ip_check, err->inner->check);
	err->inner_ports[which & 1] = port;
	csum_replace2(&err->icmp->checksum, old_port, port);
	if (udp && old_udp_check) { /* a zero UDP checksum stays "none" */
		csum_replace4(udp, old_addr, addr);
		csum_replace2(udp, old_port, port);
		if (*udp == 0)
			*udp = 0xffff;
		icmp_follow(err, old_udp_check, *udp);
	}
}

/* The error itself (outer header) now goes from `src` to `dst`. */
static __always_inline void icmp_outer_rewrite(struct packet *pkt, __be32 src, __be32 dst)
{
	__be32 old_src = pkt->ip->saddr, old_dst = pkt->ip->daddr;

	pkt->ip->saddr = src;
	csum_replace4(&pkt->ip->check, old_src, src);
	pkt->ip->daddr = dst;
	csum_replace4(&pkt->ip->check, old_dst, dst);
}

/* The Internet checksum of `words` 16-bit words at `start` (a constant
 * count, so the loop unrolls into fixed offsets the caller has bounds-checked). */
static __always_inline __u16 icmp_csum(const __u16 *start, const int words)
{
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < words; i++)
		sum += start[i];
	return ~csum_fold(sum);
}

#define ICMP_TOO_BIG_QUOTE (sizeof(struct iphdr) + 8)
#define ICMP_TOO_BIG_HEADERS (sizeof(struct iphdr) + sizeof(struct icmphdr))

/* Turn the frame (an IPv4 packet with DF of `pkt`'s 5-tuple, untouched) into
 * "fragmentation needed, next-hop MTU `mtu`" back to its sender, quoting its
 * IP header and 8 bytes, from its destination (the VIP) and with the MACs
 * swapped: the caller sends it with XDP_TX. -1: the frame could not be
 * resized (the caller passes it). The packet's pointers are invalid after. */
static __always_inline int icmp_too_big(struct xdp_md *ctx, struct packet *pkt, __u16 mtu)
{
	unsigned char mac_src[ETH_ALEN], mac_dst[ETH_ALEN];
	__builtin_memcpy(mac_src, pkt->eth->h_source, ETH_ALEN);
	__builtin_memcpy(mac_dst, pkt->eth->h_dest, ETH_ALEN);
	__be32 saddr = pkt->ip->saddr, daddr = pkt->ip->daddr;

	int keep = sizeof(struct ethhdr) + ICMP_TOO_BIG_QUOTE;
	if (bpf_xdp_adjust_tail(ctx, keep - (int)pkt->len))
		return -1;
	if (bpf_xdp_adjust_head(ctx, -(int)ICMP_TOO_BIG_HEADERS))
		return -1;

	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = (void *)(eth + 1);
	struct icmphdr *icmp = (void *)(ip + 1);
	if ((void *)(icmp + 1) + ICMP_TOO_BIG_QUOTE > data_end)
		return -1;
	__builtin_memcpy(eth->h_dest, mac_src, ETH_ALEN);
	__builtin_memcpy(eth->h_source, mac_dst, ETH_ALEN);
	eth->h_proto = bpf_htons(ETH_P_IP);

	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0xc0; /* internetwork control, as the kernel sends its ICMP errors */
	ip->tot_len = bpf_htons(ICMP_TOO_BIG_HEADERS + ICMP_TOO_BIG_QUOTE);
	ip->id = 0;
	ip->frag_off = 0;
	ip->ttl = 64;
	ip->protocol = IPPROTO_ICMP;
	ip->check = 0;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = icmp_csum((const __u16 *)ip, sizeof(struct iphdr) / 2);

	icmp->type = ICMP_DEST_UNREACH;
	icmp->code = ICMP_FRAG_NEEDED;
	icmp->checksum = 0;
	icmp->un.frag.__unused = 0;
	icmp->un.frag.mtu = bpf_htons(mtu);
	icmp->checksum = icmp_csum((const __u16 *)icmp, (sizeof(struct icmphdr) + ICMP_TOO_BIG_QUOTE) / 2);
	return 0;
}

#endif /* LB_ICMP_H */
