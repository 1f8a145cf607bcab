/* consts.h: limits, flags and reasons shared by the whole program.
 *
 * Every limit can be overridden at compile time: the loader passes them as
 * cflags (-DRING_SIZE=...), never by editing this text. lb/dataplane/structs.py
 * names the same values; tests/test_structs.py checks they agree.
 */
#ifndef LB_CONSTS_H
#define LB_CONSTS_H

/* Maglev table size M (a prime). Each VIP owns 2*M slots: a live ring and
 * the one being written (see maps.h: rings). */
#ifndef RING_SIZE
#define RING_SIZE 65537
#endif

/* Most VIPs (address, port, protocol) the program serves at once. */
#ifndef MAX_VIPS
#define MAX_VIPS 64
#endif

/* Most targets across all target groups. */
#ifndef MAX_TARGETS
#define MAX_TARGETS 1024
#endif

/* Entries in the connection-tracking LRU: two per flow (its forward entry
 * and its reply entry), so 524288 tracks 262144 flows. */
#ifndef CONNTRACK_SIZE
#define CONNTRACK_SIZE 524288
#endif

/* A flow idle longer than this is forgotten and may be re-hashed (ELB: TCP
 * 350 s, UDP 120 s). Nanoseconds of bpf_ktime_get_coarse_ns(), which ticks
 * every jiffy and costs a fraction of bpf_ktime_get_ns() (no TSC read). */
#ifndef TCP_IDLE_NS
#define TCP_IDLE_NS (350ULL * 1000000000ULL)
#endif
#ifndef UDP_IDLE_NS
#define UDP_IDLE_NS (120ULL * 1000000000ULL)
#endif

/* last_seen is written back at most this often per flow, so an established
 * flow's fast path is read-only on the conntrack entry. */
#ifndef LAST_SEEN_GRANULARITY_NS
#define LAST_SEEN_GRANULARITY_NS 1000000000ULL
#endif

/* Seed mixed into the flow hash; every lb host sharing VIPs (ECMP) must use
 * the same one so a flow lands on the same ring slot whichever host gets it. */
#ifndef FLOW_HASH_SEED
#define FLOW_HASH_SEED 0x6c620001
#endif

/* A ring slot with no target (empty target group). */
#define NO_TARGET 0xffffffffU

/* flow_state.kind: which way a conntrack entry's packets go. */
#define FLOW_FORWARD 0 /* client -> VIP: DNAT to the target */
#define FLOW_REPLY   1 /* target -> client: source back to VIP:port */

/* target.flags */
#define TARGET_F_ACTIVE 0x1 /* may carry traffic; a flow to an inactive target is re-hashed */

/* Global counter slots (maps.h: counters). Each packet increments exactly one
 * "verdict" reason; the others (CNT_CONNTRACK_*) count events on the way. */
enum lb_counter {
	CNT_PASS_NOT_IPV4 = 0,   /* ARP, IPv6, VLAN, anything not IPv4: pass */
	CNT_PASS_NOT_VIP,        /* IPv4 that is not TCP/UDP to a VIP, nor a reply: pass */
	CNT_PASS_PARSE_ERROR,    /* truncated header, bad IHL or total length: pass, the kernel drops it */
	CNT_PASS_IP_OPTIONS,     /* IPv4 options (IHL > 5): pass */
	CNT_PASS_FRAGMENT,       /* IPv4 fragment (no ports to hash): pass */
	CNT_PASS_FIB,            /* rewritten, but no route/neighbour yet: pass, the kernel forwards it */
	CNT_DROP_TTL,            /* TTL <= 1 on a flow we would forward: drop */
	CNT_DROP_NO_TARGET,      /* VIP whose ring is empty: drop */
	CNT_REDIRECTED,          /* forwarded with bpf_redirect to another interface */
	CNT_TX,                  /* forwarded back out of the receiving interface (XDP_TX) */
	CNT_CONNTRACK_HIT,       /* forward packet of a known flow */
	CNT_CONNTRACK_MISS,      /* new flow (or forgotten one): hashed onto the ring */
	CNT_REVERSE_NAT,         /* reply from a target rewritten back to VIP:port */
	CNT_DROP_BAD_IP_CSUM,    /* IPv4 header checksum wrong: drop (the kernel would) */
	CNT_MAX,
};

#endif /* LB_CONSTS_H */
