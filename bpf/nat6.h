/* nat6.h: IPv6 rewrites of a parsed packet6: toward a target (NAT and full
 * NAT), back to the VIP (replies), and the hop limit, keeping the TCP/UDP
 * checksum right (IPv6 has no header checksum; the addresses are in the L4
 * pseudo-header). The address helpers work a word at a time (struct addr6).
 */
#ifndef LB_NAT6_H
#define LB_NAT6_H

#include <linux/types.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ipv6.h>

#include "csum.h"
#include "parse.h"
#include "structs.h"

static __always_inline int addr6_equal(const struct addr6 *a, const struct addr6 *b)
{
	return ((a->words[0] ^ b->words[0]) | (a->words[1] ^ b->words[1]) | (a->words[2] ^ b->words[2]) |
	        (a->words[3] ^ b->words[3])) == 0;
}

static __always_inline int addr6_is_zero(const struct addr6 *a)
{
	return (a->words[0] | a->words[1] | a->words[2] | a->words[3]) == 0;
}

static __always_inline int flow_key6_equal(const struct flow_key6 *a, const struct flow_key6 *b)
{
	return addr6_equal(&a->src, &b->src) && addr6_equal(&a->dst, &b->dst) && a->sport == b->sport &&
	       a->dport == b->dport && a->proto == b->proto;
}

/* The packet's TCP/UDP checksum after an address of its pseudo-header or a
 * port changed. IPv6 UDP always has a checksum (the parser refused 0); a
 * computed 0 is sent as 0xffff. */
static __always_inline void l4_csum6_addr(struct packet6 *pkt, const struct addr6 *from, const struct addr6 *to)
{
	csum_replace16(pkt->l4_check, from->words, to->words);
	if (pkt->flow.proto == IPPROTO_UDP && *pkt->l4_check == 0)
		*pkt->l4_check = 0xffff;
}

static __always_inline void l4_csum6_port(struct packet6 *pkt, __be16 from, __be16 to)
{
	csum_replace2(pkt->l4_check, from, to);
	if (pkt->flow.proto == IPPROTO_UDP && *pkt->l4_check == 0)
		*pkt->l4_check = 0xffff;
}

/* The packet's source (which = 0) or destination (1) becomes addr:port. */
static __always_inline void nat6_rewrite(struct packet6 *pkt, int which, const struct addr6 *addr, __be16 port)
{
	struct in6_addr *field = which ? &pkt->ip6->daddr : &pkt->ip6->saddr;
	struct addr6 old_addr;
	__be16 old_port = pkt->ports[which & 1];

	__builtin_memcpy(&old_addr, field, sizeof(old_addr));
	__builtin_memcpy(field, addr, sizeof(*addr));
	l4_csum6_addr(pkt, &old_addr, addr);
	if (old_port != port) {
		pkt->ports[which & 1] = port;
		l4_csum6_port(pkt, old_port, port);
	}
}

/* DNAT: the destination becomes the target's address and port. */
static __always_inline void nat6_forward(struct packet6 *pkt, const struct target6 *t)
{
	nat6_rewrite(pkt, 1, &t->addr, t->port);
}

/* Reverse: the target's reply leaves with the VIP as its source. */
static __always_inline void nat6_reverse(struct packet6 *pkt, const struct addr6 *vip_addr, __be16 vip_port)
{
	nat6_rewrite(pkt, 0, vip_addr, vip_port);
}

/* Full NAT: a reply (target -> lb address:port) goes back as VIP -> client;
 * `fwd` is the flow as its client sent it. */
static __always_inline void fullnat6_reverse(struct packet6 *pkt, const struct flow_key6 *fwd)
{
	nat6_rewrite(pkt, 0, &fwd->dst, fwd->dport);
	nat6_rewrite(pkt, 1, &fwd->src, fwd->sport);
}

#endif /* LB_NAT6_H */
