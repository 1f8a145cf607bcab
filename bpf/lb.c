/* lb.c: the one XDP entry point.
 *
 * Attached to every interface that carries VIP traffic or replies from
 * targets. For each frame:
 *
 *   TCP/UDP to a VIP     -> conntrack hit, or Maglev ring on a miss -> DNAT -> out
 *   reply from a target  -> reverse entry -> source back to VIP:port -> out
 *   anything else        -> XDP_PASS, untouched
 *
 * "Out" is bpf_fib_lookup for the next hop and MACs, then bpf_redirect (or
 * XDP_TX on the receiving interface). Userspace computes (rings, targets);
 * this program only looks up.
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>

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

/* The target of a forward packet: its flow's, or a new one from the ring. */
static __always_inline struct target *pick_target(struct packet *pkt, struct vip_meta *vip,
                                                  __u32 *target_id, int *new_flow)
{
	__u64 now = bpf_ktime_get_ns();
	struct flow_state *state = conntrack.lookup(&pkt->flow);
	struct target *t;

	if (state && now - state->last_seen_ns < idle_timeout_ns(pkt->flow.proto)) {
		__u32 id = state->target_id;
		t = targets.lookup(&id);
		if (t && (t->flags & TARGET_F_ACTIVE)) {
			if (now - state->last_seen_ns > LAST_SEEN_GRANULARITY_NS)
				state->last_seen_ns = now;
			count(CNT_CONNTRACK_HIT);
			*target_id = id;
			*new_flow = 0;
			return t;
		}
	}

	/* Miss: a new flow, or one whose entry expired or whose target is gone. */
	count(CNT_CONNTRACK_MISS);
	__u32 slot = (vip->vip_id * 2 + (vip->ring & 1)) * RING_SIZE + flow_hash(&pkt->flow) % RING_SIZE;
	__u32 *ring_entry = rings.lookup(&slot);
	if (!ring_entry || *ring_entry == NO_TARGET)
		return NULL;
	__u32 id = *ring_entry;
	t = targets.lookup(&id);
	if (!t || !(t->flags & TARGET_F_ACTIVE))
		return NULL;

	struct flow_state new_state = {
		.target_id = id,
		.vip_id = vip->vip_id,
		.created_ns = now,
		.last_seen_ns = now,
	};
	conntrack.update(&pkt->flow, &new_state);

	struct flow_key back = {
		.src = t->addr,
		.dst = pkt->flow.src,
		.sport = t->port,
		.dport = pkt->flow.sport,
		.proto = pkt->flow.proto,
	};
	struct reverse_nat rev = {
		.vip_addr = pkt->flow.dst,
		.vip_port = pkt->flow.dport,
		.vip_id = vip->vip_id,
		.target_id = id,
	};
	reverse.update(&back, &rev);
	*target_id = id;
	*new_flow = 1;
	return t;
}

static __always_inline int forward(struct xdp_md *ctx, struct packet *pkt, struct vip_meta *vip)
{
	__u32 target_id = 0;
	int new_flow = 0;

	if (pkt->ip->ttl <= 1) {
		count(CNT_DROP_TTL);
		return XDP_DROP;
	}
	struct target *t = pick_target(pkt, vip, &target_id, &new_flow);
	if (!t) {
		count(CNT_DROP_NO_TARGET);
		return XDP_DROP;
	}
	__u32 vip_id = vip->vip_id;
	account(vip_stats.lookup(&vip_id), pkt->len, new_flow);
	account(target_stats.lookup(&target_id), pkt->len, new_flow);
	nat_forward(pkt, t);
	return send_out(ctx, pkt);
}

static __always_inline int reply(struct xdp_md *ctx, struct packet *pkt, struct reverse_nat *rev)
{
	if (pkt->ip->ttl <= 1) {
		count(CNT_DROP_TTL);
		return XDP_DROP;
	}
	__u32 vip_id = rev->vip_id;
	__u32 target_id = rev->target_id;
	struct traffic_stats *stats = vip_stats.lookup(&vip_id);
	if (stats) {
		stats->reply_packets += 1;
		stats->reply_bytes += pkt->len;
	}
	stats = target_stats.lookup(&target_id);
	if (stats) {
		stats->reply_packets += 1;
		stats->reply_bytes += pkt->len;
	}
	count(CNT_REVERSE_NAT);
	nat_reverse(pkt, rev);
	return send_out(ctx, pkt);
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

	struct vip_key vk = {
		.addr = pkt.flow.dst,
		.port = pkt.flow.dport,
		.proto = pkt.flow.proto,
	};
	struct vip_meta *vip = vips.lookup(&vk);
	if (vip)
		return forward(ctx, &pkt, vip);

	struct reverse_nat *rev = reverse.lookup(&pkt.flow);
	if (rev)
		return reply(ctx, &pkt, rev);

	count(CNT_PASS_NOT_VIP);
	return XDP_PASS;
}
