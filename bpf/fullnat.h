/* fullnat.h: full NAT's rewrites and its source-port choice.
 *
 * A full-NAT flow leaves lb as (lb address, allocated port) -> target, so the
 * target answers lb, whatever its routes; the reply is rewritten back to
 * VIP -> client. The maps (fullnat_sources, fullnat_flows) are read in lb.c,
 * where bcc rewrites map calls; this header holds the pure parts.
 */
#ifndef LB_FULLNAT_H
#define LB_FULLNAT_H

#include <linux/types.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <bcc/helpers.h>

#include "consts.h"
#include "csum.h"
#include "nat.h"
#include "parse.h"
#include "structs.h"

#define FULLNAT_PORT_RANGE (FULLNAT_PORT_MAX - FULLNAT_PORT_MIN + 1)

/* The `attempt`-th port tried for a flow whose hash is `h`: independent
 * hashes rather than h, h+1, ..., so the ports of many flows do not pile
 * up into runs that make every later probe of the run collide. Network order. */
static __always_inline __be16 fullnat_port(__u32 h, __u32 attempt)
{
	__u32 x = h ^ (attempt * 0x9e3779b9U);
	x ^= x >> 16;
	x *= 0x7feb352dU;
	x ^= x >> 15;
	x *= 0x846ca68bU;
	x ^= x >> 16;
	return bpf_htons((__u16)(FULLNAT_PORT_MIN + x % FULLNAT_PORT_RANGE));
}

/* The source becomes lb's (addr, port); nat_forward has already put the target in the destination. */
static __always_inline void fullnat_source(struct packet *pkt, __be32 addr, __be16 port)
{
	__be32 old_addr = pkt->ip->saddr;
	__be16 old_port = pkt->ports[0];

	pkt->ip->saddr = addr;
	csum_replace4(&pkt->ip->check, old_addr, addr);
	l4_csum_replace4(pkt, old_addr, addr);
	if (old_port != port) {
		pkt->ports[0] = port;
		l4_csum_replace2(pkt, old_port, port);
	}
}

/* A reply (target -> lb address:port) goes back as VIP -> client: `fwd` is
 * the flow as its client sent it. */
static __always_inline void fullnat_reverse(struct packet *pkt, const struct flow_key *fwd)
{
	nat_reverse(pkt, fwd->dst, fwd->dport);

	__be32 old_addr = pkt->ip->daddr;
	__be16 old_port = pkt->ports[1];
	pkt->ip->daddr = fwd->src;
	csum_replace4(&pkt->ip->check, old_addr, fwd->src);
	l4_csum_replace4(pkt, old_addr, fwd->src);
	if (old_port != fwd->sport) {
		pkt->ports[1] = fwd->sport;
		l4_csum_replace2(pkt, old_port, fwd->sport);
	}
}

#endif /* LB_FULLNAT_H */
