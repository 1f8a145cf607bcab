/* lb.c: the one XDP entry point.
 *
 * Attached to every interface that carries VIP traffic or replies from
 * targets. For each frame:
 *
 *   bad IPv4 header checksum -> drop
 *   a reply from a target    -> source back to the VIP of its flow -> out
 *   a tracked flow           -> conntrack hit: DNAT to its target -> out
 *   TCP/UDP to a VIP         -> Maglev ring picks the target (a SYN or a UDP
 *                               datagram also makes the flow's entry) -> DNAT -> out
 *   IPv6                     -> the same steps over the IPv6 maps (xdp_lb6); an
 *                               extension header, a fragment, ICMPv6 that is no
 *                               error of a tracked flow (ND) -> XDP_PASS, counted
 *   anything else            -> XDP_PASS, untouched
 *
 * A flow has one conntrack entry, keyed by its client -> VIP 5-tuple and
 * made only by a packet that starts a flow (TCP SYN, UDP datagram), under a
 * per-CPU rate limit: a flood of other segments makes no state, and a flow
 * whose segment misses takes the ring (stateless, like Katran). Replies
 * need no entry of their own: `replies` maps the target endpoint to the
 * VIPs it serves, and the flow's entry (or, with none, the ring) says which.
 * A SYN's entry is half-open, in a table of its own (half_open): the flow
 * moves to conntrack only when the client acknowledges the target's SYN-ACK,
 * so a SYN flood never pushes an established flow out of conntrack.
 * The entry follows TCP: FIN both ways or RST closes it (short timeout),
 * and a SYN does not follow an entry that is closed or whose target left
 * the ring: it takes the ring and replaces the entry (docs/architecture.md).
 *
 * "Out" is bpf_fib_lookup for the next hop and MACs (toward a target: what
 * this CPU's last lookup for it said, for up to NEXT_HOP_CACHE_NS), then
 * bpf_redirect (or XDP_TX on the receiving interface). Userspace computes (rings, targets,
 * replies); this program only looks up, and writes conntrack.
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
#include "fullnat.h"
#include "icmp.h"
#include "nat6.h"
#include "icmp6.h"

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef AF_INET6
#define AF_INET6 10
#endif

/* Why the packet got its verdict (and events on the way): enum lb_counter. */
static __always_inline void count(enum lb_counter reason)
{
	u32 slot = reason;
	u64 *value = counters.lookup(&slot);
	if (value)
		*value += 1;
}

/* A flow table's bookkeeping (table_stats, table_fill) for a new key or a
 * deleted entry: rc is what the map update or delete returned. A new key in
 * a table already full took an evicted entry's place: the count stays. Two
 * CPUs inserting at the last free entry may both count it (table_fill then
 * reads one over the size; userspace clamps). */
static __always_inline void table_inserted(__u32 table, __u64 size, long rc)
{
	struct table_stats *stats = table_stats.lookup(&table);
	__u32 held_slot = FILL_HELD(table), lb_slot = FILL_REMOVED_BY_LB(table);
	__u64 *held = table_fill.lookup(&held_slot);
	__u64 *by_lb = table_fill.lookup(&lb_slot);
	if (!stats || !held || !by_lb || rc != 0)
		return;
	stats->inserts += 1;
	if ((__s64)(*held - *by_lb) >= (__s64)size) /* signed: lb may have deleted entries made before table_fill */
		stats->evictions += 1;
	else
		__sync_fetch_and_add(held, 1);
}

static __always_inline void table_removed(__u32 table, long rc)
{
	struct table_stats *stats = table_stats.lookup(&table);
	__u32 held_slot = FILL_HELD(table);
	__u64 *held = table_fill.lookup(&held_slot);
	if (!stats || !held || rc != 0)
		return;
	stats->removed += 1;
	__sync_fetch_and_add(held, -1);
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

/* The same over an IPv6 5-tuple, a word at a time (lb explain flow has its twin). */
static __always_inline __u32 flow_hash6(const struct flow_key6 *flow)
{
	__u32 h = FLOW_HASH_SEED;
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ flow->src.words[i]);
#pragma unroll
	for (int i = 0; i < 4; i++)
		h = mix32(h ^ flow->dst.words[i]);
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

/* The next hop of the packet as it will leave: its own protocol, from
 * saddr:sport to daddr:dport. */
static __always_inline int fib_lookup(struct xdp_md *ctx, struct packet *pkt, struct bpf_fib_lookup *fib,
                                      __be32 saddr, __be16 sport, __be32 daddr, __be16 dport)
{
	fib->family = AF_INET;
	fib->tos = pkt->ip->tos;
	fib->l4_protocol = pkt->ip->protocol;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = bpf_ntohs(pkt->ip->tot_len);
	fib->ipv4_src = saddr;
	fib->ipv4_dst = daddr;
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* The same for an IPv6 packet: its flow label and traffic class as it
 * carries them, its length the fixed header and the payload. */
static __always_inline int fib_lookup6(struct xdp_md *ctx, struct packet6 *pkt, struct bpf_fib_lookup *fib,
                                       const struct addr6 *saddr, __be16 sport, const struct addr6 *daddr,
                                       __be16 dport)
{
	fib->family = AF_INET6;
	fib->flowinfo = *(__be32 *)pkt->ip6 & bpf_htonl(0x0fffffff); /* IPV6_FLOWINFO_MASK */
	fib->l4_protocol = pkt->flow.proto;
	fib->sport = sport;
	fib->dport = dport;
	fib->tot_len = ipv6_len(pkt);
	__builtin_memcpy(fib->ipv6_src, saddr, sizeof(fib->ipv6_src));
	__builtin_memcpy(fib->ipv6_dst, daddr, sizeof(fib->ipv6_dst));
	fib->ifindex = ctx->ingress_ifindex;
	return bpf_fib_lookup(ctx, fib, sizeof(*fib), 0);
}

/* The frame leaves now, to next hop `dmac` from interface `ifindex`. */
static __always_inline int send_frame(struct xdp_md *ctx, struct ethhdr *eth, __u32 ifindex,
                                      const unsigned char *dmac, const unsigned char *smac)
{
	__builtin_memcpy(eth->h_dest, dmac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, smac, ETH_ALEN);
	if (ifindex == ctx->ingress_ifindex) {
		count(CNT_TX);
		return XDP_TX;
	}
	count(CNT_REDIRECTED);
	return bpf_redirect(ifindex, 0);
}

/* The rewritten packet leaves now, to next hop `dmac` from interface `ifindex`. */
static __always_inline int send_via(struct xdp_md *ctx, struct packet *pkt, __u32 ifindex,
                                    const unsigned char *dmac, const unsigned char *smac)
{
	ip_decrease_ttl(pkt->ip);
	return send_frame(ctx, pkt->eth, ifindex, dmac, smac);
}

/* The same for IPv6: the hop limit goes down (no header checksum to follow). */
static __always_inline int send_via6(struct xdp_md *ctx, struct packet6 *pkt, __u32 ifindex,
                                     const unsigned char *dmac, const unsigned char *smac)
{
	pkt->ip6->hop_limit -= 1;
	count(CNT_IPV6_FORWARDED);
	return send_frame(ctx, pkt->eth, ifindex, dmac, smac);
}

/* Why bpf_fib_lookup would not forward a packet, one counter a cause. */
static __always_inline void count_fib_failure(int rc)
{
	switch (rc) {
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		count(CNT_FIB_NO_NEIGH);
		break;
	case BPF_FIB_LKUP_RET_FWD_DISABLED:
		count(CNT_FIB_FWD_DISABLED);
		break;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		count(CNT_FIB_BLACKHOLE);
		break;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		count(CNT_FIB_FRAG_NEEDED);
		break;
	default:
		count(CNT_FIB_NO_ROUTE);
	}
}

/* bpf_fib_lookup would not forward the rewritten packet: no neighbour
 * entry yet (the kernel forwards it and resolves the neighbour for the
 * next), or the kernel will not forward it either: counted by cause. */
static __always_inline int fib_failed(int rc)
{
	count(CNT_PASS_FIB);
	count_fib_failure(rc);
	return XDP_PASS;
}

/* The rewritten packet leaves now, by what fib_lookup answered. */
static __always_inline int send_by(struct xdp_md *ctx, struct packet *pkt, struct bpf_fib_lookup *fib, int rc)
{
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return fib_failed(rc);
	return send_via(ctx, pkt, fib->ifindex, fib->dmac, fib->smac);
}

static __always_inline int send_by6(struct xdp_md *ctx, struct packet6 *pkt, struct bpf_fib_lookup *fib, int rc)
{
	if (rc != BPF_FIB_LKUP_RET_SUCCESS)
		return fib_failed(rc);
	return send_via6(ctx, pkt, fib->ifindex, fib->dmac, fib->smac);
}

static __always_inline int is_tcp(struct packet *pkt)
{
	return pkt->flow.proto == IPPROTO_TCP;
}

/* A bare SYN: the first segment of a connection (not a SYN-ACK, not a RST).
 * The flow logic below takes the protocol and TCP flags, not a packet, so
 * both families share it. */
static __always_inline int syn_segment(__u8 proto, __u8 flags)
{
	return proto == IPPROTO_TCP && (flags & (TCP_FLAG_SYN | TCP_FLAG_ACK | TCP_FLAG_RST)) == TCP_FLAG_SYN;
}

static __always_inline int is_syn(struct packet *pkt)
{
	return syn_segment(pkt->flow.proto, pkt->tcp_flags);
}

/* The TCP header of a TCP packet. The parser checked it is all in the
 * frame, but the verifier keeps only the shorter UDP bound past the parser,
 * so this checks again. */
static __always_inline struct tcphdr *tcp_header(struct xdp_md *ctx, struct packet *pkt)
{
	struct tcphdr *tcp = (void *)pkt->ports;
	if ((void *)(tcp + 1) > (void *)(long)ctx->data_end)
		return NULL;
	return tcp;
}

/* Closed: RST seen, or FIN from both sides. A SYN does not follow it. */
static __always_inline int flow_closed(struct flow_state *state)
{
	return state->rst || (state->fin_client && state->fin_target);
}

/* How long this entry lives without a packet: its TCP state's timeout, else the protocol's. */
static __always_inline __u64 timeout_ns(__u8 proto, struct flow_state *state)
{
	if (proto != IPPROTO_TCP)
		return UDP_IDLE_NS;
	if (state->rst)
		return TCP_CLOSED_NS;
	if (state->fin_client && state->fin_target)
		return TCP_TIME_WAIT_NS;
	return TCP_IDLE_NS;
}

/* Was this flow begun under the VIP's current generation (the VIP was not deleted since)? */
static __always_inline int flow_is_current(struct flow_state *state)
{
	__u32 vip_id = state->vip_id;
	__u32 *gen = vip_gens.lookup(&vip_id);
	return gen && *gen == state->vip_gen;
}

/* Is this conntrack entry still good: not idle past its timeout, and begun
 * under the VIP's current generation? */
static __always_inline int flow_is_live(__u8 proto, struct flow_state *state, __u64 now)
{
	if (now - state->last_seen_ns >= timeout_ns(proto, state))
		return 0;
	return flow_is_current(state);
}

/* Is this half-open entry still good: a SYN within TCP_SYN_NS, the VIP's generation? */
static __always_inline int half_open_is_live(struct half_open_flow *half, __u64 now)
{
	if (now - half->flow.last_seen_ns >= TCP_SYN_NS)
		return 0;
	return flow_is_current(&half->flow);
}

static __always_inline void touch(struct flow_state *state, __u64 now)
{
	if (now - state->last_seen_ns > LAST_SEEN_GRANULARITY_NS)
		state->last_seen_ns = now;
}

/* A TCP segment's FIN or RST (`flags`) moves the entry's TCP state on;
 * `from_client` says which side sent it. Each byte has one writer, and is
 * written only when it changes. The entry's clock restarts when it closes. */
static __always_inline void follow_tcp(__u8 flags, struct flow_state *state, __u64 now, int from_client)
{
	if (from_client && state->syn_only && !(flags & TCP_FLAG_SYN))
		state->syn_only = 0;
	if (!(flags & (TCP_FLAG_FIN | TCP_FLAG_RST))) {
		touch(state, now);
		return;
	}
	int was_closed = flow_closed(state);
	if (flags & TCP_FLAG_RST) {
		if (!state->rst)
			state->rst = 1;
	} else if (from_client) {
		if (!state->fin_client)
			state->fin_client = 1;
	} else if (!state->fin_target) {
		state->fin_target = 1;
	}
	if (!was_closed && flow_closed(state)) {
		count(CNT_FLOW_CLOSED);
		state->last_seen_ns = now;
	} else {
		touch(state, now);
	}
}

/* A packet of a flow moves its entry on: TCP's state, else only its clock. */
static __always_inline void follow_flow(__u8 proto, __u8 flags, struct flow_state *state, __u64 now,
                                        int from_client)
{
	if (proto == IPPROTO_TCP)
		follow_tcp(flags, state, now, from_client);
	else
		touch(state, now);
}

static __always_inline int hops_left(__u8 ttl)
{
	if (ttl > 1)
		return 1;
	count(CNT_DROP_TTL);
	return 0;
}

static __always_inline int ttl_ok(struct packet *pkt)
{
	return hops_left(pkt->ip->ttl);
}

static __always_inline int hop_limit_ok(struct packet6 *pkt)
{
	return hops_left(pkt->ip6->hop_limit);
}

static __always_inline int same_mac(const unsigned char *a, const unsigned char *b)
{
	return ((a[0] ^ b[0]) | (a[1] ^ b[1]) | (a[2] ^ b[2]) | (a[3] ^ b[3]) | (a[4] ^ b[4]) | (a[5] ^ b[5])) == 0;
}

/* May this CPU's remembered next hop be used (for a packet no bigger than its max_len)? */
static __always_inline int next_hop_fresh(struct xdp_md *ctx, struct next_hop *hop, __u64 now)
{
	return now < hop->expires_ns && hop->in_ifindex == ctx->ingress_ifindex;
}

/* bpf_fib_lookup's successful answer for a packet of `len` bytes, remembered. */
static __always_inline void next_hop_remember(struct xdp_md *ctx, struct next_hop *hop, int fresh,
                                              struct bpf_fib_lookup *fib, __u16 len, __u64 now)
{
	if (fresh && hop->ifindex == fib->ifindex && same_mac(hop->dmac, fib->dmac)) {
		hop->max_len = len; /* the same next hop takes bigger packets */
		return;
	}
	hop->expires_ns = now + NEXT_HOP_CACHE_NS;
	hop->ifindex = fib->ifindex;
	hop->in_ifindex = ctx->ingress_ifindex;
	hop->max_len = len;
	__builtin_memcpy(hop->dmac, fib->dmac, ETH_ALEN);
	__builtin_memcpy(hop->smac, fib->smac, ETH_ALEN);
}

/* The next hop toward target `target_id` of this packet once rewritten
 * (from saddr:sport to daddr:dport): this CPU's remembered one while it is
 * fresh, was asked for this ingress and let a packet this big through
 * (*use, and BPF_FIB_LKUP_RET_SUCCESS); else bpf_fib_lookup's answer in
 * `fib` (remembered when it is one). Asked before the packet is rewritten,
 * so a packet too big for the path can still be quoted as its sender sent it. */
static __always_inline int target_next_hop(struct xdp_md *ctx, struct packet *pkt, __u32 target_id,
                                           __be32 saddr, __be16 sport, __be32 daddr, __be16 dport, __u64 now,
                                           struct bpf_fib_lookup *fib, struct next_hop **use)
{
	struct next_hop *hop = NEXT_HOP_CACHE_NS ? next_hops.lookup(&target_id) : NULL;
	if (!hop)
		return fib_lookup(ctx, pkt, fib, saddr, sport, daddr, dport);
	__u16 len = bpf_ntohs(pkt->ip->tot_len);
	int fresh = next_hop_fresh(ctx, hop, now);
	if (fresh && len <= hop->max_len) {
		*use = hop;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	int rc = fib_lookup(ctx, pkt, fib, saddr, sport, daddr, dport);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		next_hop_remember(ctx, hop, fresh, fib, len, now);
	return rc;
}

/* The same for an IPv6 packet (next_hops is by target id: one id space). */
static __always_inline int target_next_hop6(struct xdp_md *ctx, struct packet6 *pkt, __u32 target_id,
                                            const struct addr6 *saddr, __be16 sport, const struct addr6 *daddr,
                                            __be16 dport, __u64 now, struct bpf_fib_lookup *fib,
                                            struct next_hop **use)
{
	struct next_hop *hop = NEXT_HOP_CACHE_NS ? next_hops.lookup(&target_id) : NULL;
	if (!hop)
		return fib_lookup6(ctx, pkt, fib, saddr, sport, daddr, dport);
	__u16 len = ipv6_len(pkt);
	int fresh = next_hop_fresh(ctx, hop, now);
	if (fresh && len <= hop->max_len) {
		*use = hop;
		return BPF_FIB_LKUP_RET_SUCCESS;
	}
	int rc = fib_lookup6(ctx, pkt, fib, saddr, sport, daddr, dport);
	if (rc == BPF_FIB_LKUP_RET_SUCCESS)
		next_hop_remember(ctx, hop, fresh, fib, len, now);
	return rc;
}

/* The packet (untouched) is too big for the path to its target and may not
 * be fragmented: "fragmentation needed" goes back to its sender, quoting it
 * as it was sent (so the sender's stack finds the connection and lowers its
 * path MTU), out of the receiving interface. */
static __always_inline int too_big(struct xdp_md *ctx, struct packet *pkt, __u16 mtu)
{
	if (icmp_too_big(ctx, pkt, mtu)) {
		count(CNT_PASS_PARSE_ERROR); /* the frame could not be resized: the kernel has it */
		return XDP_PASS;
	}
	count(CNT_ICMP_TOO_BIG);
	count(CNT_TX);
	return XDP_TX;
}

/* How a flow's packets are rewritten toward its target: the VIP's mode
 * when it began, and for full NAT the source lb gave it. */
struct fwd_how {
	__u8 mode;         /* FWD_* */
	__be32 snat_addr;  /* network order; FWD_FULLNAT only */
	__be16 snat_port;  /* network order; FWD_FULLNAT only */
};

/* Rewritten toward `t` as `how` says (DNAT; and SNAT for full NAT; only
 * the MACs for DSR) and out; the stats say whether this packet began the flow. */
static __always_inline int to_target(struct xdp_md *ctx, struct packet *pkt, struct target *t,
                                     __u32 vip_id, __u32 target_id, int new_flow, __u64 now,
                                     const struct fwd_how *how)
{
	int fullnat = how->mode == FWD_FULLNAT, dsr = how->mode == FWD_DSR;
	struct bpf_fib_lookup fib = {};
	struct next_hop *hop = NULL;
	int rc = target_next_hop(ctx, pkt, target_id, fullnat ? how->snat_addr : pkt->ip->saddr,
	                         fullnat ? how->snat_port : pkt->ports[0], t->addr, dsr ? pkt->ports[1] : t->port,
	                         now, &fib, &hop);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED && (pkt->ip->frag_off & bpf_htons(IP_DF)))
		return too_big(ctx, pkt, fib.mtu_result);

	account(vip_stats.lookup(&vip_id), pkt->len, new_flow);
	account(target_stats.lookup(&target_id), pkt->len, new_flow);
	if (dsr) {
		count(CNT_DSR);
	} else {
		nat_forward(pkt, t);
		if (fullnat)
			fullnat_source(pkt, how->snat_addr, how->snat_port);
	}
	if (hop)
		return send_via(ctx, pkt, hop->ifindex, hop->dmac, hop->smac);
	/* The kernel can forward a NAT packet whose next hop has no neighbour
	 * entry yet (and resolves it), but not these: a full-NAT packet's source
	 * is lb's own address (a martian to the kernel), a DSR packet's
	 * destination the VIP (delivered locally). Userspace resolves every such
	 * target's neighbour when it writes the target. */
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && how->mode != FWD_NAT) {
		count(CNT_DROP_NO_NEIGH);
		return XDP_DROP;
	}
	return send_by(ctx, pkt, &fib, rc);
}

/* The target in the VIP's live ring at the slot of flow hash `h` (NO_TARGET: none). */
static __always_inline __u32 ring_slot_target(struct vip_meta *vip, __u32 h)
{
	__u32 slot = (vip->vip_id * 2 + (vip->ring & 1)) * RING_SIZE + h % RING_SIZE;
	__u32 *ring_entry = rings.lookup(&slot);
	return ring_entry ? *ring_entry : NO_TARGET;
}

/* The target the VIP's ring gives this client -> VIP flow (NO_TARGET: none). */
static __always_inline __u32 ring_target(struct vip_meta *vip, struct flow_key *flow)
{
	return ring_slot_target(vip, flow_hash(flow));
}

/* The target's answer to a half-open flow (NAT's and full NAT's reply
 * paths, both families): a SYN-ACK's sequence number is what the client's
 * ACK must acknowledge to establish the flow; a RST ends it (refused: the
 * next SYN takes the ring). */
static __always_inline int target_answers_half_open(struct half_open_flow *half, __u8 flags, struct tcphdr *tcp)
{
	if (flags & TCP_FLAG_RST) {
		count(CNT_FLOW_CLOSED);
		return 1; /* the caller deletes the entry */
	}
	if ((flags & TCP_FLAG_ACK) && tcp) {
		__u32 isn = bpf_ntohl(tcp->seq);
		if (!half->synack_seen || half->target_isn != isn) {
			half->target_isn = isn;
			half->synack_seen = 1;
		}
	}
	return 0;
}

/* Is this conntrack entry the live flow of a reply from `target_id` to the
 * VIP (`vip_id`, generation `gen`)? */
static __always_inline int reply_owns(struct flow_state *s, __u32 target_id, __u32 vip_id, __u32 gen, __u8 proto,
                                      __u64 now)
{
	return s->target_id == target_id && s->vip_id == vip_id && s->vip_gen == gen &&
	       now - s->last_seen_ns < timeout_ns(proto, s);
}

/* The same for a half-open entry: the SYN-ACK or RST of its handshake. */
static __always_inline int reply_owns_half_open(struct half_open_flow *h, __u32 target_id, __u32 vip_id,
                                                __u32 gen, __u64 now)
{
	return h->flow.target_id == target_id && h->flow.vip_id == vip_id && h->flow.vip_gen == gen &&
	       now - h->flow.last_seen_ns < TCP_SYN_NS;
}

/* A reply, if the packet is one: from a target endpoint, to a client of a
 * flow of one of the VIPs it serves. That flow is the one whose entry names
 * this target, else (a flow with no entry: evicted, forwarded by the ring
 * without one, or begun elsewhere) the one the ring gives this target. A
 * SYN-ACK or RST of a flow whose handshake is not complete finds it in
 * half_open: the SYN-ACK's sequence number is what the client's ACK must
 * acknowledge, a RST ends it. The source goes back to that VIP. Returns -1
 * when the packet is no such reply
 * (the caller goes on with it): a target answering lb's own address (a
 * health check) is not one, whatever the ring says. */
static __always_inline int reply(struct xdp_md *ctx, struct packet *pkt)
{
	struct endpoint_key ek = {
		.addr = pkt->flow.src,
		.port = pkt->flow.sport,
		.proto = pkt->flow.proto,
	};
	struct reply_route *route = replies.lookup(&ek);
	if (!route)
		return -1;

	/* The flow as its client sent it: client -> VIP, for each VIP in turn. */
	struct flow_key fwd = {
		.src = pkt->flow.dst,
		.sport = pkt->flow.dport,
		.proto = pkt->flow.proto,
	};
	struct flow_state *state = NULL;
	__u64 now = bpf_ktime_get_coarse_ns();
	int found = -1;
	__u32 count_vips = route->count;
#pragma unroll
	for (int i = 0; i < MAX_REPLY_VIPS; i++) {
		if (i >= count_vips || found >= 0)
			break;
		fwd.dst = route->vips[i].addr;
		fwd.dport = route->vips[i].port;
		struct flow_state *s = conntrack.lookup(&fwd);
		if (s && reply_owns(s, route->target_id, route->vips[i].vip_id, route->vips[i].gen, fwd.proto, now)) {
			found = i;
			state = s;
		}
	}
	struct half_open_flow *half = NULL;
	if (found < 0 && is_tcp(pkt) && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST))) {
#pragma unroll
		for (int i = 0; i < MAX_REPLY_VIPS; i++) {
			if (i >= count_vips || found >= 0)
				break;
			fwd.dst = route->vips[i].addr;
			fwd.dport = route->vips[i].port;
			struct half_open_flow *h = half_open.lookup(&fwd);
			if (h && reply_owns_half_open(h, route->target_id, route->vips[i].vip_id, route->vips[i].gen, now)) {
				found = i;
				half = h;
			}
		}
	}
	if (found < 0) {
#pragma unroll
		for (int i = 0; i < MAX_REPLY_VIPS; i++) {
			if (i >= count_vips || found >= 0)
				break;
			struct vip_key vk = {
				.addr = route->vips[i].addr,
				.port = route->vips[i].port,
				.proto = pkt->flow.proto,
			};
			struct vip_meta *vip = vips.lookup(&vk);
			if (!vip)
				continue;
			fwd.dst = vk.addr;
			fwd.dport = vk.port;
			if (ring_target(vip, &fwd) == route->target_id)
				found = i;
		}
	}
	if (found < 0 || found >= MAX_REPLY_VIPS)
		return -1;

	__be32 vip_addr = route->vips[found].addr;
	__be16 vip_port = route->vips[found].port;
	__u32 vip_id = route->vips[found].vip_id;
	__u32 target_id = route->target_id;

	/* Where it would go with the VIP as its source: a local address is lb's
	 * own traffic with the target (health checks, the L7 proxy), not a reply. */
	struct bpf_fib_lookup fib = {};
	int rc = fib_lookup(ctx, pkt, &fib, vip_addr, vip_port, pkt->ip->daddr, pkt->ports[1]);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return -1;
	if (!ttl_ok(pkt))
		return XDP_DROP;
	if (state) {
		follow_flow(pkt->flow.proto, pkt->tcp_flags, state, now, 0);
	} else if (half) {
		if (target_answers_half_open(half, pkt->tcp_flags, tcp_header(ctx, pkt)))
			table_removed(TABLE_HALF_OPEN, half_open.delete(&fwd));
	} else {
		count(CNT_REPLY_NO_ENTRY);
	}
	account_reply(vip_stats.lookup(&vip_id), pkt->len);
	account_reply(target_stats.lookup(&target_id), pkt->len);
	count(CNT_REVERSE_NAT);
	nat_reverse(pkt, vip_addr, vip_port);
	return send_by(ctx, pkt, &fib, rc);
}

/* Full NAT: does this entry leave from lb's port `port` (and `same_addr`: its address)? */
static __always_inline int fullnat_holds(struct flow_state *state, __be16 port, int same_addr)
{
	return state->mode == FWD_FULLNAT && state->snat_port == port && same_addr;
}

/* Full NAT: is the flow `owner`, which holds port rev->dport toward a
 * target, still using it? Only its live entry, still naming that address
 * and port, keeps the port; a flow gone, expired, moved or of a deleted VIP
 * gives it up. */
static __always_inline int fullnat_owner_live(struct flow_key *owner, const struct flow_key *rev, __u64 now)
{
	struct flow_state *state = conntrack.lookup(owner);
	if (state)
		return fullnat_holds(state, rev->dport, state->snat_addr == rev->dst) &&
		       flow_is_live(owner->proto, state, now);
	/* A flow whose handshake is not complete holds its port in half_open. */
	struct half_open_flow *half = owner->proto == IPPROTO_TCP ? half_open.lookup(owner) : NULL;
	return half && fullnat_holds(&half->flow, rev->dport, half->flow.snat_addr == rev->dst) &&
	       half_open_is_live(half, now);
}

/* Full NAT: a source port for flow `fwd` (client -> VIP) from lb's address
 * `src` toward target `t`, claimed in fullnat_flows: hashed ports are tried
 * in turn, a port is taken when no entry holds it (BPF_NOEXIST) or when its
 * holder is this very flow or no longer live. Returns the port (network
 * order), or 0 when FULLNAT_PORT_TRIES ports were all held. */
static __always_inline __be16 fullnat_claim(struct flow_key *fwd, const struct target *t, __be32 src, __u64 now)
{
	struct flow_key rev = {
		.src = t->addr,
		.dst = src,
		.sport = t->port,
		.proto = fwd->proto,
	};
	__u32 h = flow_hash(fwd);

	for (__u32 attempt = 0; attempt < FULLNAT_PORT_TRIES; attempt++) {
		rev.dport = fullnat_port(h, attempt);
		if (fullnat_flows.insert(&rev, fwd) == 0)
			return rev.dport;
		struct flow_key *owner = fullnat_flows.lookup(&rev);
		if (!owner)
			continue; /* evicted between the two calls: the next port */
		int mine = owner->src == fwd->src && owner->dst == fwd->dst && owner->sport == fwd->sport &&
		           owner->dport == fwd->dport && owner->proto == fwd->proto;
		if (mine || !fullnat_owner_live(owner, &rev, now)) {
			fullnat_flows.update(&rev, fwd);
			return rev.dport;
		}
		count(CNT_FULLNAT_PORT_BUSY);
	}
	count(CNT_DROP_NO_PORT);
	return 0;
}

/* Full NAT: a reply, if the packet is one: addressed to lb's address and a
 * port a flow holds (fullnat_flows). It goes back as VIP -> client. The
 * flow's entry, when it still holds this port, follows the target's FIN or
 * RST; an entry that moved on (a new port, a deleted VIP) makes the packet
 * none of lb's business (-1: the kernel answers it). With no entry at all
 * (ended, evicted) the packet is still the flow's: a target's RST reaches
 * the client. */
static __always_inline int fullnat_reply(struct xdp_md *ctx, struct packet *pkt)
{
	struct flow_key *held = fullnat_flows.lookup(&pkt->flow);
	if (!held)
		return -1;
	struct flow_key fwd = *held;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_state *state = conntrack.lookup(&fwd);
	if (state && !(fullnat_holds(state, pkt->flow.dport, state->snat_addr == pkt->flow.dst) &&
	               flow_is_live(fwd.proto, state, now)))
		return -1;
	/* No entry in conntrack: the handshake may not be complete (half_open). */
	struct half_open_flow *half = NULL;
	if (!state && is_tcp(pkt)) {
		half = half_open.lookup(&fwd);
		if (half && !(fullnat_holds(&half->flow, pkt->flow.dport, half->flow.snat_addr == pkt->flow.dst) &&
		              half_open_is_live(half, now)))
			half = NULL;
	}

	struct bpf_fib_lookup fib = {};
	int rc = fib_lookup(ctx, pkt, &fib, fwd.dst, fwd.dport, fwd.src, fwd.sport);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return -1;
	if (!ttl_ok(pkt))
		return XDP_DROP;
	if (state) {
		follow_flow(pkt->flow.proto, pkt->tcp_flags, state, now, 0);
		__u32 vip_id = state->vip_id;
		__u32 target_id = state->target_id;
		account_reply(vip_stats.lookup(&vip_id), pkt->len);
		account_reply(target_stats.lookup(&target_id), pkt->len);
	} else if (half) {
		if (target_answers_half_open(half, pkt->tcp_flags, tcp_header(ctx, pkt)))
			table_removed(TABLE_HALF_OPEN, half_open.delete(&fwd));
		__u32 vip_id = half->flow.vip_id;
		__u32 target_id = half->flow.target_id;
		account_reply(vip_stats.lookup(&vip_id), pkt->len);
		account_reply(target_stats.lookup(&target_id), pkt->len);
	} else {
		count(CNT_REPLY_NO_ENTRY);
	}
	count(CNT_FULLNAT_REVERSE);
	fullnat_reverse(pkt, &fwd);
	return send_by(ctx, pkt, &fib, rc);
}

/* An ICMP error, rewritten, leaves toward its new destination. */
static __always_inline int send_icmp(struct xdp_md *ctx, struct packet *pkt)
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET;
	fib.tos = pkt->ip->tos;
	fib.l4_protocol = IPPROTO_ICMP;
	fib.tot_len = bpf_ntohs(pkt->ip->tot_len);
	fib.ipv4_src = pkt->ip->saddr;
	fib.ipv4_dst = pkt->ip->daddr;
	fib.ifindex = ctx->ingress_ifindex;
	return send_by(ctx, pkt, &fib, bpf_fib_lookup(ctx, &fib, sizeof(fib), 0));
}

/* An error about a reply lb sent from a VIP (a router toward the client
 * could not deliver it, or it was too big for that path) is the target's
 * business: the quote becomes what the target sent (its address and port;
 * for full NAT, to lb's address and port), and the error goes to the target
 * (for full NAT, from lb's address: the target knows no client). */
static __always_inline int icmp_to_target(struct xdp_md *ctx, struct packet *pkt, struct icmp_error *err,
                                          struct flow_state *state)
{
	__u32 target_id = state->target_id;
	struct target *t = targets.lookup(&target_id);
	if (!t)
		return -1;
	if (!ttl_ok(pkt))
		return XDP_DROP;
	if (state->mode == FWD_FULLNAT) {
		icmp_quote_rewrite(err, 1, state->snat_addr, state->snat_port);
		icmp_quote_rewrite(err, 0, t->addr, t->port);
		icmp_outer_rewrite(pkt, state->snat_addr, t->addr);
	} else {
		icmp_quote_rewrite(err, 0, t->addr, t->port);
		icmp_outer_rewrite(pkt, pkt->ip->saddr, t->addr);
	}
	count(CNT_ICMP_TO_TARGET);
	return send_icmp(ctx, pkt);
}

/* An error about a packet lb sent toward a target (from the target, or a
 * router on the way) is the client's: the quote becomes what the client
 * sent (client -> VIP), the error goes to the client, from the VIP when the
 * target itself sent it. `fwd` is the client's flow; `fullnat`: the quote's
 * source was lb's address and port. */
static __always_inline int icmp_to_client(struct xdp_md *ctx, struct packet *pkt, struct icmp_error *err,
                                          struct flow_key *fwd, int fullnat)
{
	if (!ttl_ok(pkt))
		return XDP_DROP;
	__be32 outer_src = pkt->ip->saddr == err->quoted.dst ? fwd->dst : pkt->ip->saddr;
	if (fullnat)
		icmp_quote_rewrite(err, 0, fwd->src, fwd->sport);
	icmp_quote_rewrite(err, 1, fwd->dst, fwd->dport);
	icmp_outer_rewrite(pkt, outer_src, fwd->src);
	count(CNT_ICMP_TO_CLIENT);
	return send_icmp(ctx, pkt);
}

/* An ICMP error about a tracked flow, if the packet is one: its quote,
 * reversed, is a client's flow (an error about a reply from a VIP) or a
 * full-NAT reply's 5-tuple; else the quote is a NAT flow's packet to a
 * target endpoint, whose VIP `replies` and the flow's entry give. -1: none
 * of these (the caller passes it). DSR flows' errors never reach lb. */
static __always_inline int icmp_in(struct xdp_md *ctx, struct packet *pkt)
{
	struct icmp_error err = {};
	if (icmp_error_parse(ctx, pkt, &err))
		return -1;
	struct flow_key back = {
		.src = err.quoted.dst,
		.dst = err.quoted.src,
		.sport = err.quoted.dport,
		.dport = err.quoted.sport,
		.proto = err.quoted.proto,
	};
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_state *state = conntrack.lookup(&back);
	if (state && state->mode != FWD_DSR && flow_is_live(back.proto, state, now))
		return icmp_to_target(ctx, pkt, &err, state);

	struct flow_key *held = fullnat_flows.lookup(&back);
	if (held) {
		struct flow_key fwd = *held;
		return icmp_to_client(ctx, pkt, &err, &fwd, 1);
	}

	struct endpoint_key ek = {
		.addr = err.quoted.dst,
		.port = err.quoted.dport,
		.proto = err.quoted.proto,
	};
	struct reply_route *route = replies.lookup(&ek);
	if (!route)
		return -1;
	struct flow_key fwd = {
		.src = err.quoted.src,
		.sport = err.quoted.sport,
		.proto = err.quoted.proto,
	};
	int found = -1;
	__u32 count_vips = route->count;
#pragma unroll
	for (int i = 0; i < MAX_REPLY_VIPS; i++) {
		if (i >= count_vips || found >= 0)
			break;
		fwd.dst = route->vips[i].addr;
		fwd.dport = route->vips[i].port;
		struct flow_state *s = conntrack.lookup(&fwd);
		if (!s && fwd.proto == IPPROTO_TCP) { /* an error about a SYN: the flow is half-open */
			struct half_open_flow *half = half_open.lookup(&fwd);
			s = half ? &half->flow : NULL;
		}
		if (s && s->target_id == route->target_id && s->vip_gen == route->vips[i].gen)
			found = i;
	}
	if (found < 0)
		return -1;
	return icmp_to_client(ctx, pkt, &err, &fwd, 0);
}

/* May this flow get a new entry now? Per CPU, at most NEW_FLOW_RATE_LIMIT a
 * second (a flood of SYNs cannot churn the table faster). */
static __always_inline int flood_guard_allows(__u64 now)
{
	if (NEW_FLOW_RATE_LIMIT == 0)
		return 1;
	u32 zero = 0;
	struct flood_window *window = flood_guard.lookup(&zero);
	if (!window)
		return 1;
	if (now - window->start_ns >= 1000000000ULL) {
		window->start_ns = now;
		window->entries = 0;
	}
	if (window->entries >= NEW_FLOW_RATE_LIMIT)
		return 0;
	window->entries += 1;
	return 1;
}

/* What an existing entry does for this packet. */
enum entry_use {
	ENTRY_DECIDES,    /* the packet goes to the entry's target */
	ENTRY_REPLACE,    /* the ring decides, and its answer replaces the entry */
	ENTRY_BYPASS,     /* the ring decides; the entry stays as it is (a closed TCP flow: only a SYN reopens it) */
};

/* What a conntrack entry found for a client packet (`proto`, `flags`) does
 * with it: `target_flags` are its target's (0 when the entry is not live or
 * names no target). */
static __always_inline enum entry_use entry_use_for(struct flow_state *state, __u16 target_flags, __u8 proto,
                                                    __u8 flags)
{
	/* A SYN follows its entry only to a target still in the ring, and only
	 * while the entry is open: a retransmitted SYN stays with its target;
	 * one after a close or to a target out of service takes the ring. */
	int syn = syn_segment(proto, flags);
	if ((target_flags & TARGET_F_ACTIVE) &&
	    (!syn || ((target_flags & TARGET_F_IN_SERVICE) && !flow_closed(state))))
		return ENTRY_DECIDES;
	if (proto == IPPROTO_TCP && !syn && flow_closed(state))
		return ENTRY_BYPASS; /* a late segment does not bring a closed flow back */
	return ENTRY_REPLACE;
}

/* Does a packet the ring decides (`proto`, `flags`, to a VIP of `mode`)
 * write an entry? 1: yes, 0: no, -1: it is dropped (a full-NAT flow that may
 * not have one). A SYN or a UDP datagram starts a flow and gets one (under
 * the flood guard); a packet whose entry could not decide replaces it (it
 * was there: no table growth); any other TCP segment goes without one. */
static __always_inline int ring_writes_entry(__u8 proto, __u8 flags, __u32 mode, enum entry_use existing,
                                             int had_entry, int had_half_open, __u64 now)
{
	int starts = proto != IPPROTO_TCP || syn_segment(proto, flags);
	if ((had_entry || had_half_open) && syn_segment(proto, flags))
		count(CNT_SYN_RESCHEDULED);
	/* A full-NAT packet needs its flow's entry (its source port lives
	 * there): any packet without a usable one makes it, so a segment of a
	 * flow whose entry went reaches the target, which answers with a RST. */
	int fullnat = mode == FWD_FULLNAT;
	if (!(starts || fullnat || (had_entry && existing == ENTRY_REPLACE))) {
		count(CNT_MISS_NO_ENTRY);
		return 0;
	}
	if (!had_entry && !had_half_open && !flood_guard_allows(now)) {
		count(CNT_FLOOD_NO_ENTRY);
		if (fullnat) {
			count(CNT_DROP_NO_ENTRY);
			return -1;
		}
		return 0;
	}
	return 1;
}

/* A new entry for a flow the ring sent to `target_id` (its source for full
 * NAT is the caller's to add). */
static __always_inline void new_flow_state(struct flow_state *state, struct vip_meta *vip, __u32 target_id,
                                           __u8 proto, __u8 flags, __u64 now)
{
	state->target_id = target_id;
	state->vip_id = vip->vip_id;
	state->created_ns = now;
	state->last_seen_ns = now;
	state->vip_gen = vip->gen;
	state->syn_only = syn_segment(proto, flags);
	state->mode = vip->mode;
	if (proto == IPPROTO_TCP && (flags & TCP_FLAG_RST))
		state->rst = 1;
	else if (proto == IPPROTO_TCP && (flags & TCP_FLAG_FIN))
		state->fin_client = 1;
}

/* How a client segment moves a half-open entry on. */
enum half_open_step {
	HALF_OPEN_STAYS,        /* a retransmitted SYN, a segment before the handshake completes */
	HALF_OPEN_CLOSED,       /* a RST from the client: the entry goes */
	HALF_OPEN_ESTABLISHED,  /* the ACK of the target's SYN-ACK: the flow moves to conntrack as `established` */
};

static __always_inline enum half_open_step follow_handshake(struct half_open_flow *half, __u8 flags,
                                                            struct tcphdr *tcp, __u64 now,
                                                            struct flow_state *established)
{
	if (syn_segment(IPPROTO_TCP, flags)) {
		half->flow.last_seen_ns = now;
		return HALF_OPEN_STAYS;
	}
	if (flags & TCP_FLAG_RST) {
		count(CNT_FLOW_CLOSED);
		return HALF_OPEN_CLOSED;
	}
	if ((flags & (TCP_FLAG_ACK | TCP_FLAG_SYN)) != TCP_FLAG_ACK)
		return HALF_OPEN_STAYS;
	/* A DSR target's SYN-ACK never crosses lb: the client's first ACK
	 * completes the handshake as far as lb can know. */
	int dsr = half->flow.mode == FWD_DSR;
	if (!dsr && !(half->synack_seen && tcp && bpf_ntohl(tcp->ack_seq) == half->target_isn + 1)) {
		count(CNT_HANDSHAKE_MISMATCH);
		return HALF_OPEN_STAYS;
	}
	*established = half->flow;
	established->syn_only = 0;
	established->last_seen_ns = now;
	if (flags & TCP_FLAG_FIN)
		established->fin_client = 1;
	count(CNT_FLOW_ESTABLISHED);
	return HALF_OPEN_ESTABLISHED;
}

/* A packet to a VIP, decided by the ring: a SYN or a UDP datagram starts a
 * flow and gets an entry (under the flood guard; a SYN's is half-open); a
 * packet whose entry could not decide replaces it (it was there: no table
 * growth); any other TCP segment is forwarded without one. */
static __always_inline int by_ring(struct xdp_md *ctx, struct packet *pkt, struct vip_meta *vip, __u64 now,
                                   enum entry_use existing, int had_entry, int had_half_open)
{
	if (!ttl_ok(pkt))
		return XDP_DROP;
	count(CNT_CONNTRACK_MISS);
	__u32 target_id = ring_target(vip, &pkt->flow);
	struct target *t = target_id == NO_TARGET ? NULL : targets.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE)) {
		count(CNT_DROP_NO_TARGET);
		return XDP_DROP;
	}

	int starts = !is_tcp(pkt) || is_syn(pkt);
	int write = ring_writes_entry(pkt->flow.proto, pkt->tcp_flags, vip->mode, existing, had_entry, had_half_open,
	                              now);
	if (write < 0)
		return XDP_DROP;
	struct fwd_how how = { .mode = vip->mode };
	if (how.mode == FWD_FULLNAT) {
		__be32 *src = fullnat_sources.lookup(&target_id);
		if (!src || !*src) {
			count(CNT_DROP_NO_SOURCE);
			return XDP_DROP;
		}
		how.snat_addr = *src;
		how.snat_port = fullnat_claim(&pkt->flow, t, how.snat_addr, now);
		if (!how.snat_port)
			return XDP_DROP;
	}
	if (write) {
		struct flow_state state = {
			.snat_addr = how.snat_addr,
			.snat_port = how.snat_port,
		};
		new_flow_state(&state, vip, target_id, pkt->flow.proto, pkt->tcp_flags, now);
		if (is_syn(pkt) && !had_entry) {
			struct half_open_flow half = {.flow = state};
			long rc = half_open.update(&pkt->flow, &half);
			if (!had_half_open)
				table_inserted(TABLE_HALF_OPEN, HALF_OPEN_SIZE, rc);
		} else {
			long rc = conntrack.update(&pkt->flow, &state);
			if (!had_entry)
				table_inserted(TABLE_CONNTRACK, CONNTRACK_SIZE, rc);
		}
	}
	return to_target(ctx, pkt, t, vip->vip_id, target_id, starts, now, &how);
}

/* A segment of a flow with a half-open entry and none in conntrack. The
 * entry decides while it is live and its target active (for a SYN, a
 * retransmission: in service); returns -1 when it does not (the ring
 * decides). The client's ACK of the target's SYN-ACK moves the flow to
 * conntrack; a RST from the client ends it. */
static __always_inline int follow_half_open(struct xdp_md *ctx, struct packet *pkt, struct half_open_flow *half,
                                            __u64 now)
{
	if (!half_open_is_live(half, now))
		return -1;
	__u32 target_id = half->flow.target_id;
	__u32 vip_id = half->flow.vip_id;
	struct target *t = targets.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE))
		return -1;
	if (is_syn(pkt) && !(t->flags & TARGET_F_IN_SERVICE))
		return -1;
	if (!ttl_ok(pkt))
		return XDP_DROP;
	/* Read before the entry may be deleted below. */
	struct fwd_how how = {
		.mode = half->flow.mode,
		.snat_addr = half->flow.snat_addr,
		.snat_port = half->flow.snat_port,
	};

	struct flow_state established;
	switch (follow_handshake(half, pkt->tcp_flags, tcp_header(ctx, pkt), now, &established)) {
	case HALF_OPEN_CLOSED:
		table_removed(TABLE_HALF_OPEN, half_open.delete(&pkt->flow));
		break;
	case HALF_OPEN_ESTABLISHED:
		table_inserted(TABLE_CONNTRACK, CONNTRACK_SIZE, conntrack.update(&pkt->flow, &established));
		table_removed(TABLE_HALF_OPEN, half_open.delete(&pkt->flow));
		break;
	default:
		break;
	}
	count(CNT_CONNTRACK_HIT);
	return to_target(ctx, pkt, t, vip_id, target_id, 0, now, &how);
}

/* May the packet be a reply: does some target endpoint (either family) use
 * its source port? An array load instead of a hash lookup on every client
 * packet. */
static __always_inline int reply_port(__be16 port)
{
	__u16 sport = bpf_ntohs(port);
	__u32 word = sport >> 6;
	__u64 *bits = reply_ports.lookup(&word);
	return bits && (*bits >> (sport & 63)) & 1;
}

/* ---- IPv6 ----------------------------------------------------------------
 *
 * The same paths as IPv4's above, over the IPv6 maps (vips6, targets6,
 * conntrack6, half_open6, replies6, fullnat_*6) and a struct packet6. What a
 * flow's entry does is decided by the shared helpers (entry_use_for,
 * ring_writes_entry, new_flow_state, follow_handshake, follow_flow,
 * target_answers_half_open, reply_owns, fullnat_holds); what is here is the
 * family's maps, addresses and rewrites. VIP and target ids are shared with
 * IPv4, and so are rings, vip_gens, the stats and next_hops.
 */

/* How an IPv6 flow's packets are rewritten toward its target (fwd_how's twin). */
struct fwd_how6 {
	__u8 mode;                /* FWD_* */
	struct addr6 snat_addr;   /* network order; FWD_FULLNAT only */
	__be16 snat_port;         /* network order; FWD_FULLNAT only */
};

static __always_inline struct tcphdr *tcp_header6(struct xdp_md *ctx, struct packet6 *pkt)
{
	struct tcphdr *tcp = (void *)pkt->ports;
	if ((void *)(tcp + 1) > (void *)(long)ctx->data_end)
		return NULL;
	return tcp;
}

static __always_inline __u32 ring_target6(struct vip_meta *vip, struct flow_key6 *flow)
{
	return ring_slot_target(vip, flow_hash6(flow));
}

/* The packet (untouched) is too big for the path to its target: "packet
 * too big" goes back to its sender, quoting it as it was sent (too_big's twin). */
static __always_inline int too_big6(struct xdp_md *ctx, struct packet6 *pkt, __u16 mtu)
{
	if (icmp6_too_big(ctx, pkt, mtu)) {
		count(CNT_PASS_PARSE_ERROR); /* the frame could not be resized: the kernel has it */
		return XDP_PASS;
	}
	count(CNT_ICMP_TOO_BIG);
	count(CNT_IPV6_FORWARDED);
	count(CNT_TX);
	return XDP_TX;
}

/* Rewritten toward `t` as `how` says and out (to_target's twin). */
static __always_inline int to_target6(struct xdp_md *ctx, struct packet6 *pkt, struct target6 *t, __u32 vip_id,
                                      __u32 target_id, int new_flow, __u64 now, const struct fwd_how6 *how)
{
	int fullnat = how->mode == FWD_FULLNAT, dsr = how->mode == FWD_DSR;
	struct bpf_fib_lookup fib = {};
	struct next_hop *hop = NULL;
	int rc = target_next_hop6(ctx, pkt, target_id, fullnat ? &how->snat_addr : &pkt->flow.src,
	                          fullnat ? how->snat_port : pkt->ports[0], &t->addr, dsr ? pkt->ports[1] : t->port,
	                          now, &fib, &hop);
	if (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED) /* IPv6 routers never fragment */
		return too_big6(ctx, pkt, fib.mtu_result);

	account(vip_stats.lookup(&vip_id), pkt->len, new_flow);
	account(target_stats.lookup(&target_id), pkt->len, new_flow);
	if (dsr) {
		count(CNT_DSR);
	} else {
		nat6_forward(pkt, t);
		if (fullnat)
			nat6_rewrite(pkt, 0, &how->snat_addr, how->snat_port);
	}
	if (hop)
		return send_via6(ctx, pkt, hop->ifindex, hop->dmac, hop->smac);
	if (rc != BPF_FIB_LKUP_RET_SUCCESS && how->mode != FWD_NAT) { /* see to_target */
		count(CNT_DROP_NO_NEIGH);
		return XDP_DROP;
	}
	return send_by6(ctx, pkt, &fib, rc);
}

/* A reply from an IPv6 target endpoint (reply's twin: replies6, then the
 * flow's entry, its half-open entry, or the ring, say which VIP). */
static __always_inline int reply6(struct xdp_md *ctx, struct packet6 *pkt)
{
	struct endpoint_key6 ek = {
		.addr = pkt->flow.src,
		.port = pkt->flow.sport,
		.proto = pkt->flow.proto,
	};
	struct reply_route6 *route = replies6.lookup(&ek);
	if (!route)
		return -1;

	struct flow_key6 fwd = {
		.src = pkt->flow.dst,
		.sport = pkt->flow.dport,
		.proto = pkt->flow.proto,
	};
	struct flow_state *state = NULL;
	__u64 now = bpf_ktime_get_coarse_ns();
	int found = -1;
	__u32 count_vips = route->count;
#pragma unroll
	for (int i = 0; i < MAX_REPLY_VIPS; i++) {
		if (i >= count_vips || found >= 0)
			break;
		fwd.dst = route->vips[i].addr;
		fwd.dport = route->vips[i].port;
		struct flow_state6 *s = conntrack6.lookup(&fwd);
		if (s && reply_owns(&s->flow, route->target_id, route->vips[i].vip_id, route->vips[i].gen, fwd.proto,
		                    now)) {
			found = i;
			state = &s->flow;
		}
	}
	struct half_open_flow *half = NULL;
	if (found < 0 && pkt->flow.proto == IPPROTO_TCP && (pkt->tcp_flags & (TCP_FLAG_SYN | TCP_FLAG_RST))) {
#pragma unroll
		for (int i = 0; i < MAX_REPLY_VIPS; i++) {
			if (i >= count_vips || found >= 0)
				break;
			fwd.dst = route->vips[i].addr;
			fwd.dport = route->vips[i].port;
			struct half_open_flow6 *h = half_open6.lookup(&fwd);
			if (h && reply_owns_half_open(&h->half, route->target_id, route->vips[i].vip_id,
			                              route->vips[i].gen, now)) {
				found = i;
				half = &h->half;
			}
		}
	}
	if (found < 0) {
#pragma unroll
		for (int i = 0; i < MAX_REPLY_VIPS; i++) {
			if (i >= count_vips || found >= 0)
				break;
			struct vip_key6 vk = {
				.addr = route->vips[i].addr,
				.port = route->vips[i].port,
				.proto = pkt->flow.proto,
			};
			struct vip_meta *vip = vips6.lookup(&vk);
			if (!vip)
				continue;
			fwd.dst = vk.addr;
			fwd.dport = vk.port;
			if (ring_target6(vip, &fwd) == route->target_id)
				found = i;
		}
	}
	if (found < 0 || found >= MAX_REPLY_VIPS)
		return -1;

	struct addr6 vip_addr = route->vips[found].addr;
	__be16 vip_port = route->vips[found].port;
	__u32 vip_id = route->vips[found].vip_id;
	__u32 target_id = route->target_id;

	/* A local destination once rewritten is lb's own traffic with the target, not a reply. */
	struct bpf_fib_lookup fib = {};
	int rc = fib_lookup6(ctx, pkt, &fib, &vip_addr, vip_port, &pkt->flow.dst, pkt->flow.dport);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return -1;
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	if (state) {
		follow_flow(pkt->flow.proto, pkt->tcp_flags, state, now, 0);
	} else if (half) {
		if (target_answers_half_open(half, pkt->tcp_flags, tcp_header6(ctx, pkt)))
			table_removed(TABLE_HALF_OPEN6, half_open6.delete(&fwd));
	} else {
		count(CNT_REPLY_NO_ENTRY);
	}
	account_reply(vip_stats.lookup(&vip_id), pkt->len);
	account_reply(target_stats.lookup(&target_id), pkt->len);
	count(CNT_REVERSE_NAT);
	nat6_reverse(pkt, &vip_addr, vip_port);
	return send_by6(ctx, pkt, &fib, rc);
}

/* Full NAT: is `owner` (client -> VIP) still the live flow holding lb's
 * address and port `rev->dst`:`rev->dport` (fullnat_owner_live's twin)? */
static __always_inline int fullnat_owner_live6(struct flow_key6 *owner, const struct flow_key6 *rev, __u64 now)
{
	struct flow_state6 *state = conntrack6.lookup(owner);
	if (state)
		return fullnat_holds(&state->flow, rev->dport, addr6_equal(&state->snat_addr, &rev->dst)) &&
		       flow_is_live(owner->proto, &state->flow, now);
	struct half_open_flow6 *half = owner->proto == IPPROTO_TCP ? half_open6.lookup(owner) : NULL;
	return half && fullnat_holds(&half->half.flow, rev->dport, addr6_equal(&half->snat_addr, &rev->dst)) &&
	       half_open_is_live(&half->half, now);
}

/* Full NAT: a source port for `fwd` from lb's `src` toward `t`, claimed in
 * fullnat_flows6 (fullnat_claim's twin); 0 when all tries were held. */
static __always_inline __be16 fullnat_claim6(struct flow_key6 *fwd, const struct target6 *t,
                                             const struct addr6 *src, __u64 now)
{
	struct flow_key6 rev = {
		.src = t->addr,
		.dst = *src,
		.sport = t->port,
		.proto = fwd->proto,
	};
	__u32 h = flow_hash6(fwd);

	for (__u32 attempt = 0; attempt < FULLNAT_PORT_TRIES; attempt++) {
		rev.dport = fullnat_port(h, attempt);
		if (fullnat_flows6.insert(&rev, fwd) == 0)
			return rev.dport;
		struct flow_key6 *owner = fullnat_flows6.lookup(&rev);
		if (!owner)
			continue;
		if (flow_key6_equal(owner, fwd) || !fullnat_owner_live6(owner, &rev, now)) {
			fullnat_flows6.update(&rev, fwd);
			return rev.dport;
		}
		count(CNT_FULLNAT_PORT_BUSY);
	}
	count(CNT_DROP_NO_PORT);
	return 0;
}

/* Full NAT: a reply to lb's address and a port a flow holds, back as VIP ->
 * client (fullnat_reply's twin); -1: not one. */
static __always_inline int fullnat_reply6(struct xdp_md *ctx, struct packet6 *pkt)
{
	struct flow_key6 *held = fullnat_flows6.lookup(&pkt->flow);
	if (!held)
		return -1;
	struct flow_key6 fwd = *held;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_state6 *entry = conntrack6.lookup(&fwd);
	struct flow_state *state = entry ? &entry->flow : NULL;
	if (entry && !(fullnat_holds(state, pkt->flow.dport, addr6_equal(&entry->snat_addr, &pkt->flow.dst)) &&
	               flow_is_live(fwd.proto, state, now)))
		return -1;
	struct half_open_flow *half = NULL;
	if (!entry && pkt->flow.proto == IPPROTO_TCP) {
		struct half_open_flow6 *h = half_open6.lookup(&fwd);
		if (h && fullnat_holds(&h->half.flow, pkt->flow.dport, addr6_equal(&h->snat_addr, &pkt->flow.dst)) &&
		    half_open_is_live(&h->half, now))
			half = &h->half;
	}

	struct bpf_fib_lookup fib = {};
	int rc = fib_lookup6(ctx, pkt, &fib, &fwd.dst, fwd.dport, &fwd.src, fwd.sport);
	if (rc == BPF_FIB_LKUP_RET_NOT_FWDED)
		return -1;
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	if (state) {
		follow_flow(pkt->flow.proto, pkt->tcp_flags, state, now, 0);
		__u32 vip_id = state->vip_id;
		__u32 target_id = state->target_id;
		account_reply(vip_stats.lookup(&vip_id), pkt->len);
		account_reply(target_stats.lookup(&target_id), pkt->len);
	} else if (half) {
		if (target_answers_half_open(half, pkt->tcp_flags, tcp_header6(ctx, pkt)))
			table_removed(TABLE_HALF_OPEN6, half_open6.delete(&fwd));
		__u32 vip_id = half->flow.vip_id;
		__u32 target_id = half->flow.target_id;
		account_reply(vip_stats.lookup(&vip_id), pkt->len);
		account_reply(target_stats.lookup(&target_id), pkt->len);
	} else {
		count(CNT_REPLY_NO_ENTRY);
	}
	count(CNT_FULLNAT_REVERSE);
	fullnat6_reverse(pkt, &fwd);
	return send_by6(ctx, pkt, &fib, rc);
}

/* A packet to an IPv6 VIP decided by the ring (by_ring's twin). */
static __always_inline int by_ring6(struct xdp_md *ctx, struct packet6 *pkt, struct vip_meta *vip, __u64 now,
                                    enum entry_use existing, int had_entry, int had_half_open)
{
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	count(CNT_CONNTRACK_MISS);
	__u32 target_id = ring_target6(vip, &pkt->flow);
	struct target6 *t = target_id == NO_TARGET ? NULL : targets6.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE)) {
		count(CNT_DROP_NO_TARGET);
		return XDP_DROP;
	}

	__u8 proto = pkt->flow.proto, flags = pkt->tcp_flags;
	int syn = syn_segment(proto, flags);
	int write = ring_writes_entry(proto, flags, vip->mode, existing, had_entry, had_half_open, now);
	if (write < 0)
		return XDP_DROP;
	struct fwd_how6 how = { .mode = vip->mode };
	if (how.mode == FWD_FULLNAT) {
		struct addr6 *src = fullnat_srcs6.lookup(&target_id);
		if (!src || addr6_is_zero(src)) {
			count(CNT_DROP_NO_SOURCE);
			return XDP_DROP;
		}
		how.snat_addr = *src;
		how.snat_port = fullnat_claim6(&pkt->flow, t, &how.snat_addr, now);
		if (!how.snat_port)
			return XDP_DROP;
	}
	if (write && syn && !had_entry) {
		struct half_open_flow6 half = { .snat_addr = how.snat_addr };
		new_flow_state(&half.half.flow, vip, target_id, proto, flags, now);
		half.half.flow.snat_port = how.snat_port;
		long rc = half_open6.update(&pkt->flow, &half);
		if (!had_half_open)
			table_inserted(TABLE_HALF_OPEN6, HALF_OPEN6_SIZE, rc);
	} else if (write) {
		struct flow_state6 state = { .snat_addr = how.snat_addr };
		new_flow_state(&state.flow, vip, target_id, proto, flags, now);
		state.flow.snat_port = how.snat_port;
		long rc = conntrack6.update(&pkt->flow, &state);
		if (!had_entry)
			table_inserted(TABLE_CONNTRACK6, CONNTRACK6_SIZE, rc);
	}
	return to_target6(ctx, pkt, t, vip->vip_id, target_id, proto != IPPROTO_TCP || syn, now, &how);
}

/* A segment of an IPv6 flow with a half-open entry (follow_half_open's twin);
 * -1: the entry does not decide (the ring does). */
static __always_inline int follow_half_open6(struct xdp_md *ctx, struct packet6 *pkt, struct half_open_flow6 *h6,
                                             __u64 now)
{
	struct half_open_flow *half = &h6->half;
	if (!half_open_is_live(half, now))
		return -1;
	__u32 target_id = half->flow.target_id;
	__u32 vip_id = half->flow.vip_id;
	struct target6 *t = targets6.lookup(&target_id);
	if (!t || !(t->flags & TARGET_F_ACTIVE))
		return -1;
	if (syn_segment(pkt->flow.proto, pkt->tcp_flags) && !(t->flags & TARGET_F_IN_SERVICE))
		return -1;
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	/* Read before the entry may be deleted below. */
	struct fwd_how6 how = {
		.mode = half->flow.mode,
		.snat_addr = h6->snat_addr,
		.snat_port = half->flow.snat_port,
	};
	struct flow_state6 established = { .snat_addr = h6->snat_addr };
	switch (follow_handshake(half, pkt->tcp_flags, tcp_header6(ctx, pkt), now, &established.flow)) {
	case HALF_OPEN_CLOSED:
		table_removed(TABLE_HALF_OPEN6, half_open6.delete(&pkt->flow));
		break;
	case HALF_OPEN_ESTABLISHED:
		table_inserted(TABLE_CONNTRACK6, CONNTRACK6_SIZE, conntrack6.update(&pkt->flow, &established));
		table_removed(TABLE_HALF_OPEN6, half_open6.delete(&pkt->flow));
		break;
	default:
		break;
	}
	count(CNT_CONNTRACK_HIT);
	return to_target6(ctx, pkt, t, vip_id, target_id, 0, now, &how);
}

/* An ICMPv6 error, rewritten, leaves toward its new destination. */
static __always_inline int send_icmp6(struct xdp_md *ctx, struct packet6 *pkt)
{
	struct bpf_fib_lookup fib = {};
	fib.family = AF_INET6;
	fib.flowinfo = *(__be32 *)pkt->ip6 & bpf_htonl(0x0fffffff);
	fib.l4_protocol = IPPROTO_ICMPV6;
	fib.tot_len = ipv6_len(pkt);
	__builtin_memcpy(fib.ipv6_src, &pkt->ip6->saddr, sizeof(fib.ipv6_src));
	__builtin_memcpy(fib.ipv6_dst, &pkt->ip6->daddr, sizeof(fib.ipv6_dst));
	fib.ifindex = ctx->ingress_ifindex;
	return send_by6(ctx, pkt, &fib, bpf_fib_lookup(ctx, &fib, sizeof(fib), 0));
}

/* An ICMPv6 error about a reply lb sent from a VIP goes to the target,
 * quoting what the target sent (icmp_to_target's twin). */
static __always_inline int icmp_to_target6(struct xdp_md *ctx, struct packet6 *pkt, struct icmp6_error *err,
                                           struct flow_state6 *entry)
{
	__u32 target_id = entry->flow.target_id;
	struct target6 *t = targets6.lookup(&target_id);
	if (!t)
		return -1;
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	if (entry->flow.mode == FWD_FULLNAT) {
		icmp6_quote_rewrite(err, 1, &entry->snat_addr, entry->flow.snat_port);
		icmp6_outer_rewrite(pkt, err, 0, &entry->snat_addr);
	}
	icmp6_quote_rewrite(err, 0, &t->addr, t->port);
	icmp6_outer_rewrite(pkt, err, 1, &t->addr);
	count(CNT_ICMP_TO_TARGET);
	return send_icmp6(ctx, pkt);
}

/* An ICMPv6 error about a packet lb sent toward a target goes to the
 * client, quoting client -> VIP, from the VIP when the target itself sent
 * it (icmp_to_client's twin). */
static __always_inline int icmp_to_client6(struct xdp_md *ctx, struct packet6 *pkt, struct icmp6_error *err,
                                           const struct flow_key6 *fwd, int fullnat)
{
	if (!hop_limit_ok(pkt))
		return XDP_DROP;
	if (addr6_equal((struct addr6 *)&pkt->ip6->saddr, (struct addr6 *)&err->inner->daddr))
		icmp6_outer_rewrite(pkt, err, 0, &fwd->dst);
	if (fullnat)
		icmp6_quote_rewrite(err, 0, &fwd->src, fwd->sport);
	icmp6_quote_rewrite(err, 1, &fwd->dst, fwd->dport);
	icmp6_outer_rewrite(pkt, err, 1, &fwd->src);
	count(CNT_ICMP_TO_CLIENT);
	return send_icmp6(ctx, pkt);
}

/* An ICMPv6 error about a tracked IPv6 flow, if the packet is one (icmp_in's
 * twin); -1: none (the caller passes it, neighbour discovery among them). */
static __always_inline int icmp6_in(struct xdp_md *ctx, struct packet6 *pkt)
{
	struct icmp6_error err = {};
	struct flow_key6 key = {}; /* the quote reversed, then the client's flow */
	if (icmp6_error_parse(ctx, pkt, &err, &key))
		return -1;
	__u64 now = bpf_ktime_get_coarse_ns();
	struct flow_state6 *entry = conntrack6.lookup(&key);
	if (entry && entry->flow.mode != FWD_DSR && flow_is_live(key.proto, &entry->flow, now))
		return icmp_to_target6(ctx, pkt, &err, entry);

	struct flow_key6 *held = fullnat_flows6.lookup(&key);
	if (held)
		return icmp_to_client6(ctx, pkt, &err, held, 1);

	/* A NAT flow's packet to a target endpoint: the quote's destination. */
	struct endpoint_key6 ek = {
		.addr = key.src,
		.port = key.sport,
		.proto = key.proto,
	};
	struct reply_route6 *route = replies6.lookup(&ek);
	if (!route)
		return -1;
	key.src = key.dst; /* the quote's source: the client */
	key.sport = key.dport;
	int found = -1;
	__u32 count_vips = route->count;
#pragma unroll
	for (int i = 0; i < MAX_REPLY_VIPS; i++) {
		if (i >= count_vips || found >= 0)
			break;
		key.dst = route->vips[i].addr;
		key.dport = route->vips[i].port;
		struct flow_state6 *e = conntrack6.lookup(&key);
		struct flow_state *s = e ? &e->flow : NULL;
		if (!s && key.proto == IPPROTO_TCP) { /* an error about a SYN: the flow is half-open */
			struct half_open_flow6 *half = half_open6.lookup(&key);
			s = half ? &half->half.flow : NULL;
		}
		if (s && s->target_id == route->target_id && s->vip_gen == route->vips[i].gen)
			found = i;
	}
	if (found < 0)
		return -1;
	return icmp_to_client6(ctx, pkt, &err, &key, 0);
}

/* An IPv6 frame: TCP/UDP to a VIP or a reply is forwarded, the rest passed
 * (counted by kind). xdp_lb's IPv4 path, step for step. */
static __always_inline int xdp_lb6(struct xdp_md *ctx)
{
	struct packet6 pkt = {};

	switch (parse_ipv6(ctx, &pkt)) {
	case PARSE_OK:
		break;
	case PARSE_IPV6:
		count(CNT_PASS_IPV6);
		return XDP_PASS;
	case PARSE_IPV6_EXT_HDR:
		count(CNT_PASS_IPV6_EXT_HDR);
		return XDP_PASS;
	case PARSE_IPV6_FRAGMENT:
		count(CNT_PASS_IPV6_FRAGMENT);
		return XDP_PASS;
	case PARSE_ICMPV6: {
		int action = icmp6_in(ctx, &pkt);
		if (action >= 0)
			return action;
		count(CNT_PASS_ICMPV6);
		return XDP_PASS;
	}
	default:
		count(CNT_PASS_PARSE_ERROR);
		return XDP_PASS;
	}

	if (reply_port(pkt.flow.sport)) {
		int action = reply6(ctx, &pkt);
		if (action >= 0)
			return action;
	}

	__u64 now = 0;
	enum entry_use use = ENTRY_REPLACE;
	struct flow_state6 *entry = conntrack6.lookup(&pkt.flow);
	if (entry) {
		struct flow_state *state = &entry->flow;
		now = bpf_ktime_get_coarse_ns();
		int live = flow_is_live(pkt.flow.proto, state, now);
		__u32 target_id = state->target_id;
		struct target6 *t = live ? targets6.lookup(&target_id) : NULL;
		use = entry_use_for(state, t ? t->flags : 0, pkt.flow.proto, pkt.tcp_flags);
		if (use == ENTRY_DECIDES && t) {
			if (!hop_limit_ok(&pkt))
				return XDP_DROP;
			follow_flow(pkt.flow.proto, pkt.tcp_flags, state, now, 1);
			count(CNT_CONNTRACK_HIT);
			struct fwd_how6 how = {
				.mode = state->mode,
				.snat_addr = entry->snat_addr,
				.snat_port = state->snat_port,
			};
			return to_target6(ctx, &pkt, t, state->vip_id, target_id, 0, now, &how);
		}
	} else {
		__u16 dport = bpf_ntohs(pkt.flow.dport);
		if (dport >= FULLNAT_PORT_MIN && dport <= FULLNAT_PORT_MAX) {
			int action = fullnat_reply6(ctx, &pkt);
			if (action >= 0)
				return action;
		}
	}

	struct vip_key6 vk = {
		.addr = pkt.flow.dst,
		.port = pkt.flow.dport,
		.proto = pkt.flow.proto,
	};
	struct vip_meta *vip = vips6.lookup(&vk);
	if (!vip) {
		count(CNT_PASS_IPV6);
		return XDP_PASS;
	}
	if (!now)
		now = bpf_ktime_get_coarse_ns();

	int had_half_open = 0;
	if (!entry && pkt.flow.proto == IPPROTO_TCP) {
		struct half_open_flow6 *half = half_open6.lookup(&pkt.flow);
		if (half) {
			int action = follow_half_open6(ctx, &pkt, half, now);
			if (action >= 0)
				return action;
			had_half_open = 1;
		}
	}
	return by_ring6(ctx, &pkt, vip, now, use, entry != NULL, had_half_open);
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
	case PARSE_IPV6_FRAME:
		return xdp_lb6(ctx);
	case PARSE_IP_OPTIONS:
		count(CNT_PASS_IP_OPTIONS);
		return XDP_PASS;
	case PARSE_FRAGMENT:
		count(CNT_PASS_FRAGMENT);
		return XDP_PASS;
	case PARSE_NOT_L4:
		count(CNT_PASS_NOT_VIP);
		return XDP_PASS;
	case PARSE_ICMP: {
		if (!ipv4_header_csum_ok(pkt.ip)) {
			count(CNT_DROP_BAD_IP_CSUM);
			return XDP_DROP;
		}
		int action = icmp_in(ctx, &pkt);
		if (action >= 0)
			return action;
		count(CNT_PASS_NOT_VIP);
		return XDP_PASS;
	}
	default:
		count(CNT_PASS_PARSE_ERROR);
		return XDP_PASS;
	}
	if (!ipv4_header_csum_ok(pkt.ip)) {
		count(CNT_DROP_BAD_IP_CSUM);
		return XDP_DROP;
	}

	/* Replies first, but only from a port some target endpoint uses. */
	if (reply_port(pkt.flow.sport)) {
		int action = reply(ctx, &pkt);
		if (action >= 0)
			return action;
	}

	/* Established flows: one lookup. The clock is read only for packets
	 * that touch a flow. */
	__u64 now = 0;
	enum entry_use use = ENTRY_REPLACE;
	struct flow_state *state = conntrack.lookup(&pkt.flow);
	if (state) {
		now = bpf_ktime_get_coarse_ns();
		int live = flow_is_live(pkt.flow.proto, state, now);
		__u32 target_id = state->target_id;
		struct target *t = live ? targets.lookup(&target_id) : NULL;
		use = entry_use_for(state, t ? t->flags : 0, pkt.flow.proto, pkt.tcp_flags);
		if (use == ENTRY_DECIDES && t) {
			if (!ttl_ok(&pkt))
				return XDP_DROP;
			follow_flow(pkt.flow.proto, pkt.tcp_flags, state, now, 1);
			count(CNT_CONNTRACK_HIT);
			struct fwd_how how = {
				.mode = state->mode,
				.snat_addr = state->snat_addr,
				.snat_port = state->snat_port,
			};
			return to_target(ctx, &pkt, t, state->vip_id, target_id, 0, now, &how);
		}
	} else {
		/* No flow of a client: perhaps a full-NAT reply, which is
		 * addressed to one of lb's ports (checked after conntrack, so
		 * established client packets pay nothing for it). */
		__u16 dport = bpf_ntohs(pkt.flow.dport);
		if (dport >= FULLNAT_PORT_MIN && dport <= FULLNAT_PORT_MAX) {
			int action = fullnat_reply(ctx, &pkt);
			if (action >= 0)
				return action;
		}
	}

	struct vip_key vk = {
		.addr = pkt.flow.dst,
		.port = pkt.flow.dport,
		.proto = pkt.flow.proto,
	};
	struct vip_meta *vip = vips.lookup(&vk);
	if (!vip) {
		count(CNT_PASS_NOT_VIP);
		return XDP_PASS;
	}
	if (!now)
		now = bpf_ktime_get_coarse_ns();

	/* None in conntrack: a TCP flow to a VIP may be half-open (its handshake not complete). */
	int had_half_open = 0;
	if (!state && is_tcp(&pkt)) {
		struct half_open_flow *half = half_open.lookup(&pkt.flow);
		if (half) {
			int action = follow_half_open(ctx, &pkt, half, now);
			if (action >= 0)
				return action;
			had_half_open = 1;
		}
	}
	/* A flag set in its branch, not `half != NULL`: with no flood guard clang
	 * ORs the two pointers for by_ring's test, which the verifier refuses. */
	return by_ring(ctx, &pkt, vip, now, use, state != NULL, had_half_open);
}
