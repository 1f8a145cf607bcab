/* nat.h: rewrite a parsed packet toward a target (forward) or back to the
 * VIP (reverse), keeping the IPv4 and TCP/UDP checksums right.
 */
#ifndef LB_NAT_H
#define LB_NAT_H

#include <linux/types.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>

#include "csum.h"
#include "parse.h"
#include "structs.h"

/* UDP's "no checksum" is 0 and must stay 0; a computed 0 is sent as 0xffff. */
static __always_inline void l4_csum_replace4(struct packet *pkt, __u32 from, __u32 to)
{
	if (pkt->flow.proto == IPPROTO_UDP) {
		if (*pkt->l4_check == 0)
			return;
		csum_replace4(pkt->l4_check, from, to);
		if (*pkt->l4_check == 0)
			*pkt->l4_check = 0xffff;
		return;
	}
	csum_replace4(pkt->l4_check, from, to);
}

static __always_inline void l4_csum_replace2(struct packet *pkt, __u16 from, __u16 to)
{
	if (pkt->flow.proto == IPPROTO_UDP) {
		if (*pkt->l4_check == 0)
			return;
		csum_replace2(pkt->l4_check, from, to);
		if (*pkt->l4_check == 0)
			*pkt->l4_check = 0xffff;
		return;
	}
	csum_replace2(pkt->l4_check, from, to);
}

/* DNAT: destination becomes the target's address and port. The address is
 * in the L4 pseudo-header, so both checksums change. */
static __always_inline void nat_forward(struct packet *pkt, const struct target *t)
{
	__be32 old_addr = pkt->ip->daddr;
	__be16 old_port = pkt->ports[1];

	pkt->ip->daddr = t->addr;
	csum_replace4(&pkt->ip->check, old_addr, t->addr);
	l4_csum_replace4(pkt, old_addr, t->addr);
	if (old_port != t->port) {
		pkt->ports[1] = t->port;
		l4_csum_replace2(pkt, old_port, t->port);
	}
}

/* Reverse: the target's reply leaves with the VIP as its source. */
static __always_inline void nat_reverse(struct packet *pkt, __be32 vip_addr, __be16 vip_port)
{
	__be32 old_addr = pkt->ip->saddr;
	__be16 old_port = pkt->ports[0];

	pkt->ip->saddr = vip_addr;
	csum_replace4(&pkt->ip->check, old_addr, vip_addr);
	l4_csum_replace4(pkt, old_addr, vip_addr);
	if (old_port != vip_port) {
		pkt->ports[0] = vip_port;
		l4_csum_replace2(pkt, old_port, vip_port);
	}
}

/* What a router does to a packet it forwards; the caller checked ttl > 1. */
static __always_inline void ip_decrease_ttl(struct iphdr *ip)
{
	__u16 *word = (__u16 *)&ip->ttl; /* ttl and protocol share one 16-bit word */
	__u16 old = *word;

	ip->ttl -= 1;
	csum_replace2(&ip->check, old, *word);
}

#endif /* LB_NAT_H */
