/* lb.c: the one XDP entry point.
 *
 * Attached to every interface that carries VIP traffic or replies from
 * targets. For each frame:
 *
 *   bad IPv4 header sum  -> drop (the kernel would: it must not make state)
 *   a tracked flow       -> conntrack hit: DNAT to its target, or (a reply
 *                           from a target) source back to VIP:port -> out
 *   TCP/UDP to a VIP     -> Maglev ring picks the target, both directions
 *                           remembered -> DNAT -> out
 *   anything else        -> XDP_PASS, untouched
 *
 * Conntrack comes first, so an established packet costs one hash lookup
 * whichever way it goes; the vips lookup is only for new flows.
 *
 * "Out" is bpf_fib_lookup for the next hop and MACs, then bpf_redirect (or
 * XDP_TX on the receiving interface). Userspace computes (rings, targets);
 * this program only looks up.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <linux/in.h>
#include <bcc/helpers.h>

/* Each header includes what it uses and compiles on its own
 * (tests/test_bpf_headers.py): the order below is free. bcc's prelude
 * (bcc/helpers.h; the kernel's compiler_types.h, for __always_inline) comes
 * before every file; headers that use bcc's names (BPF_TABLE_PINNED,
 * bpf_htons) include bcc/helpers.h anyway, to say where they come from. */
#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "parse.h"
#include "csum.h"
#include "nat.h"

#ifndef AF_INET
#define AF_INET 2
#endif

/* Why the packet got its verdict (and events on the way): enum lb_counter. */
static __always_inline void count(enum lb_counter reason)
{
	u32 slot = reason;
	u64 *value = counters.lookup(&slot);
	if (value)
		*value += 1;
}

/* murmur3's finalizer over the 5-tuple: cheap, and it spreads the bits of
 * every field into the slot index. */
static __always_inline __u32 mix32(__u32 h)
{
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline __u32 flow_hash(const struct flow_key *flow)
{
	__u32 h = FLOW_HASH_SEED;
	h = mix32(h ^ flow->src);
	h = mix32(h ^ flow->dst);
	h = mix32(h ^ (((__u32)flow->sport << 16) | flow->dport));
	return mix32(h ^ flow->proto);
}

static __always_inline void account(struct traffic_stats *stats, __u32 len, int new_flow)
{
	if (!stats)
		return;
	stats->packets += 1;
	stats->bytes += len;
	stats->new_flows += new_flow;
}

static __always_inline void account_reply(struct traffic_stats *stats, __u32 len)
{
	if (!stats)
		return;
	stats->reply_packets += 1;
	stats->reply_bytes += len;
}

/* Next hop for the rewritten packet; on success the frame leaves now. */
static __always_inline int send_out(struct xdp_md *ctx, struct packet *pkt)
{
	struct bpf_fib_lookup fib = {};
	int rc;

	fib.family = AF_INET;
	fib.tos = pkt->ip->tos;
	fib.l4_protocol = pkt->ip->protocol;
	fib.sport = pkt->ports[0];
	fib.dport = pkt->ports[1];
	fib.tot_len = bpf_ntohs(pkt->ip->tot_len);
	fib.ipv4_src = pkt->ip->saddr;
	fib.ipv4_dst = pkt->ip->daddr;
	fib.ifindex = ctx->ingress_ifindex;

	rc = bpf_fib_lookup(ctx, &fib, sizeof(fib), 0);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS) {
		/* No neighbour entry yet (or no route): the kernel forwards the
		 * already rewritten packet and resolves the neighbour for the next. */
		count(CNT_PASS_FIB);
		return XDP_PASS;
	}
	ip_decrease_ttl(pkt->ip);
	__builtin_memcpy(pkt->eth->h_dest, fib.dmac, ETH_ALEN);
	__builtin_memcpy(pkt->eth->h_source, fib.smac, ETH_ALEN);
	if (fib.ifindex == ctx->ingress_ifindex) {
		count(CNT_TX);
		return XDP_TX;
	}
	count(CNT_REDIRECTED);
	return bpf_redirect(fib.ifindex, 0);
}

static __always_inline __u64 idle_timeout_ns(__u8 proto)
{
	return proto == IPPROTO_TCP ? TCP_IDLE_NS : UDP_IDLE_NS;
}

/* Is this conntrack entry still good: not idle past its timeout, and begun
 * under the VIP's current generation (the VIP was not deleted since)? */
static __always_inline int flow_is_live(struct packet *pkt, struct flow_state *state, __u64 now)
{
	if (now - state->last_seen_ns >= idle_timeout_ns(pkt->flow.proto))
		return 0;
	__u32 vip_id = state->vip_id;
	__u32 *gen = vip_gens.lookup(&vip_id);
	return gen && *gen == state->vip_gen;
}

static __always_inline void touch(struct flow_state *state, __u64 now)
{
	if (now - state->last_seen_ns > LAST_SEEN_GRANULARITY_NS)
		state->last_seen_ns = now;
}

static __always_inline int ttl_ok(struct packet *pkt)
{
	if (pkt->ip->ttl > 1)
		return 1;
	count(CNT_DROP_TTL);
	return 0;
}

/* DNAT toward `t` and out; the stats say whether this packet began the flow. */
static __always_inline int to_target(struct xdp_md *ctx, struct packet *pkt, struct target *t,
                                     __u32 vip_id, __u32 target_id, int new_flow)
{
	account(vip_stats.lookup(&vip_id), pkt->len, new_flow);
	account(target_stats.lookup(&target_id), pkt->len, new_flow);
	nat_forward(pkt, t);
	return send_out(ctx, pkt);
}

/* An established flow, either direction: one conntrack hit decides it. */
static __always_inline int established(struct xdp_md *ctx, struct packet *pkt, struct flow_state *state,
                                       __u64 now, int *done)
{
	__u32 vip_id = state->vip_id;
	__u32 target_id = state->target_id;

	if (state->kind == FLOW_REPLY) {
		*done = 1;
		if (!ttl_ok(pkt))
			return XDP_DROP;
		touch(state, now);
		account_reply(vip_stats.lookup(&vip_id), pkt->len);
		account_reply(target_stats.lookup(&target_id), pkt->len);
		count(CNT_REVERSE_NAT);
		nat_reverse(pkt, state->vip_addr, state->vip_port);
		return send_out(ctx, pkt);
	}
	struct target *t = targets.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE))
		return XDP_PASS; /* its target left: *done stays 0, the flow is hashed again */
	*done = 1;
	if (!ttl_ok(pkt))
		return XDP_DROP;
	touch(state, now);
	count(CNT_CONNTRACK_HIT);
	return to_target(ctx, pkt, t, vip_id, target_id, 0);
}

/* A packet to a VIP with no live flow: a slot of the VIP's ring picks the
 * target, and both directions of the flow are remembered. */
static __always_inline int new_flow(struct xdp_md *ctx, struct packet *pkt, struct vip_meta *vip, __u64 now)
{
	if (!ttl_ok(pkt))
		return XDP_DROP;
	count(CNT_CONNTRACK_MISS);
	__u32 slot = (vip->vip_id * 2 + (vip->ring & 1)) * RING_SIZE + flow_hash(&pkt->flow) % RING_SIZE;
	__u32 *ring_entry = rings.lookup(&slot);
	__u32 target_id = ring_entry ? *ring_entry : NO_TARGET;
	struct target *t = target_id == NO_TARGET ? NULL : targets.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE)) {
		count(CNT_DROP_NO_TARGET);
		return XDP_DROP;
	}

	struct flow_state state = {
		.target_id = target_id,
		.vip_id = vip->vip_id,
		.created_ns = now,
		.last_seen_ns = now,
		.vip_gen = vip->gen,
		.kind = FLOW_FORWARD,
	};
	conntrack.update(&pkt->flow, &state);

	struct flow_key back = {
		.src = t->addr,
		.dst = pkt->flow.src,
		.sport = t->port,
		.dport = pkt->flow.sport,
		.proto = pkt->flow.proto,
	};
	state.vip_addr = pkt->flow.dst;
	state.vip_port = pkt->flow.dport;
	state.kind = FLOW_REPLY;
	conntrack.update(&back, &state);

	return to_target(ctx, pkt, t, vip->vip_id, target_id, 1);
}

int xdp_lb(struct xdp_md *ctx)
{
	struct packet pkt = {};

	switch (parse_packet(ctx, &pkt)) {
	case PARSE_OK:
		break;
	case PARSE_NOT_IPV4:
		count(CNT_PASS_NOT_IPV4);
		return XDP_PASS;
	case PARSE_IP_OPTIONS:
		count(CNT_PASS_IP_OPTIONS);
		return XDP_PASS;
	case PARSE_FRAGMENT:
		count(CNT_PASS_FRAGMENT);
		return XDP_PASS;
	case PARSE_NOT_L4:
		count(CNT_PASS_NOT_VIP);
		return XDP_PASS;
	default:
		count(CNT_PASS_PARSE_ERROR);
		return XDP_PASS;
	}
	if (!ipv4_header_csum_ok(pkt.ip)) {
		count(CNT_DROP_BAD_IP_CSUM);
		return XDP_DROP;
	}

	/* Established flows first: one lookup for both directions. The clock
	 * is read only for packets that touch a flow. */
	__u64 now = 0;
	struct flow_state *state = conntrack.lookup(&pkt.flow);
	if (state) {
		now = bpf_ktime_get_coarse_ns();
		if (flow_is_live(&pkt, state, now)) {
			int done = 0;
			int action = established(ctx, &pkt, state, now, &done);
			if (done)
				return action;
		}
	}

	struct vip_key vk = {
		.addr = pkt.flow.dst,
		.port = pkt.flow.dport,
		.proto = pkt.flow.proto,
	};
	struct vip_meta *vip = vips.lookup(&vk);
	if (vip)
		return new_flow(ctx, &pkt, vip, now ? now : bpf_ktime_get_coarse_ns());

	count(CNT_PASS_NOT_VIP);
	return XDP_PASS;
}
