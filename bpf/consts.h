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

/* Flows in the connection-tracking LRU: one entry per flow (replies find
 * it through the `replies` map). One LRU list for all CPUs, so the table
 * holds this many flows whichever CPUs they arrive on. */
#ifndef CONNTRACK_SIZE
#define CONNTRACK_SIZE 524288
#endif

/* TCP flows whose handshake is not complete yet (a SYN seen, not the
 * client's ACK of the target's SYN-ACK): their own LRU (maps.h: half_open),
 * so SYNs, spoofed ones too, never push an established flow out of
 * conntrack. A flow moves to conntrack when its handshake completes. */
#ifndef HALF_OPEN_SIZE
#define HALF_OPEN_SIZE 131072
#endif

/* The IPv6 flow tables: conntrack6 and fullnat_flows6 of CONNTRACK6_SIZE,
 * half_open6 of HALF_OPEN6_SIZE. The IPv4 sizes when the config has an IPv6
 * TCP/UDP listener; else a few entries a CPU, since nothing uses them
 * (the loader's cflags: lb.dataplane.structs.Limits.ipv6_flows). */
#ifndef CONNTRACK6_SIZE
#define CONNTRACK6_SIZE CONNTRACK_SIZE
#endif
#ifndef HALF_OPEN6_SIZE
#define HALF_OPEN6_SIZE HALF_OPEN_SIZE
#endif

/* CONNTRACK_LRU_FLAGS: 0, one LRU list shared by all CPUs (the default), or
 * BPF_F_NO_COMMON_LRU, a list per CPU, each of CONNTRACK_SIZE / possible CPUs
 * (the loader then makes the map CONNTRACK_SIZE x possible CPUs entries, so
 * each CPU still holds CONNTRACK_SIZE). Only tests/bench/xdp_cost.py asks
 * for the second, to compare. */
#ifndef CONNTRACK_LRU_FLAGS
#define CONNTRACK_LRU_FLAGS 0
#endif

/* HALF_OPEN_LRU_FLAGS: the same choice for half_open (the loader sizes the
 * map HALF_OPEN_SIZE x possible CPUs with BPF_F_NO_COMMON_LRU). Only
 * tests/bench/xdp_cost.py asks for the second: measured, no gain
 * (docs/architecture.md, "What a new flow costs"). */
#ifndef HALF_OPEN_LRU_FLAGS
#define HALF_OPEN_LRU_FLAGS 0
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

/* A half-open entry is forgotten after this long without a SYN from its
 * client (conntrack's SYN_RECV, 60 s); a client SYN retransmitted meanwhile
 * stays with its target. */
#ifndef TCP_SYN_NS
#define TCP_SYN_NS (60ULL * 1000000000ULL)
#endif

/* A TCP flow that saw a RST (conntrack's CLOSE, 10 s) or a FIN from both
 * sides (TIME_WAIT, 120 s) is forgotten after this long without a packet;
 * meanwhile a late segment still reaches its target, and a SYN replaces it. */
#ifndef TCP_CLOSED_NS
#define TCP_CLOSED_NS (10ULL * 1000000000ULL)
#endif
#ifndef TCP_TIME_WAIT_NS
#define TCP_TIME_WAIT_NS (120ULL * 1000000000ULL)
#endif

/* Flood guard: at most this many new conntrack entries per CPU per second
 * (Katran's max_conn_rate). A new flow over it is still forwarded by the
 * ring, without an entry (CNT_FLOOD_NO_ENTRY). 0: no limit. */
#ifndef NEW_FLOW_RATE_LIMIT
#define NEW_FLOW_RATE_LIMIT 20000
#endif

/* The forward path keeps, per CPU and target, what bpf_fib_lookup answered
 * (the next hop's MAC, the egress interface, the largest packet it let
 * through) for this long, instead of asking for every packet: the lookup
 * is most of what forwarding a packet costs (tests/bench/xdp_cost.py). A
 * route or neighbour change reaches a target's flows within this time; a
 * bigger packet than any let through is asked for again (the MTU). 0: ask
 * for every packet. */
#ifndef NEXT_HOP_CACHE_NS
#define NEXT_HOP_CACHE_NS 1000000000ULL
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

/* Most VIPs one target endpoint (address, port, protocol) can serve: the
 * reply path tries each of them (reply_route.vips). */
#define MAX_REPLY_VIPS 4

/* table_stats index: the flow tables whose fullness lb reports. table_fill
 * has two slots a table: FILL_HELD(t), entries the program put in less
 * those it took out (atomic adds), and FILL_REMOVED_BY_LB(t), entries lb
 * deleted (written by userspace only); the table holds the difference. */
#define TABLE_CONNTRACK  0
#define TABLE_HALF_OPEN  1
#define TABLE_CONNTRACK6 2
#define TABLE_HALF_OPEN6 3
#define TABLE_COUNT      4
#define FILL_HELD(t)          ((t) * 2)
#define FILL_REMOVED_BY_LB(t) ((t) * 2 + 1)

/* vip_meta.mode and flow_state.mode: how a VIP's packets reach a target
 * (docs/architecture.md, forwarding modes). */
#define FWD_NAT     0 /* destination rewritten to the target; the client's address kept */
#define FWD_FULLNAT 1 /* and the source rewritten to lb's address toward the target and a port of its own */
#define FWD_DSR     2 /* only the destination MAC rewritten: the target holds the VIP and answers directly */

/* Full NAT: the source ports lb allocates, per (lb address, target
 * endpoint, protocol), from FULLNAT_PORT_MIN to FULLNAT_PORT_MAX. The
 * default range lies below Linux's ephemeral ports (32768-60999), so no
 * connection lb's own kernel opens toward a target (health checks, the L7
 * proxy) can hold the same 5-tuple. A new flow tries FULLNAT_PORT_TRIES
 * hashed ports; with none free it is dropped (CNT_DROP_NO_PORT). */
#ifndef FULLNAT_PORT_MIN
#define FULLNAT_PORT_MIN 1024
#endif
#ifndef FULLNAT_PORT_MAX
#define FULLNAT_PORT_MAX 32767
#endif
#ifndef FULLNAT_PORT_TRIES
#define FULLNAT_PORT_TRIES 16
#endif

/* target.flags */
#define TARGET_F_ACTIVE     0x1 /* its flows may go on; a flow to an inactive target is re-hashed */
#define TARGET_F_IN_SERVICE 0x2 /* in the ring: a SYN may follow an entry to it (else the SYN takes the ring) */

/* Global counter slots (maps.h: counters). Each packet increments exactly one
 * "verdict" reason; the others (CNT_CONNTRACK_*) count events on the way. */
enum lb_counter {
	CNT_PASS_NOT_IPV4 = 0,   /* ARP, VLAN, anything neither IPv4 nor IPv6: pass */
	CNT_PASS_NOT_VIP,        /* IPv4 that is not TCP/UDP to a VIP, nor a reply: pass */
	CNT_PASS_PARSE_ERROR,    /* truncated header, bad IHL or total length: pass, the kernel drops it */
	CNT_PASS_IP_OPTIONS,     /* IPv4 options (IHL > 5): pass */
	CNT_PASS_FRAGMENT,       /* IPv4 fragment (no ports to hash): pass */
	CNT_PASS_FIB,            /* rewritten, but bpf_fib_lookup would not forward it: pass (CNT_FIB_* says why) */
	CNT_DROP_TTL,            /* TTL (IPv6: hop limit) <= 1 on a flow we would forward: drop */
	CNT_DROP_NO_TARGET,      /* VIP whose ring is empty: drop */
	CNT_REDIRECTED,          /* forwarded with bpf_redirect to another interface */
	CNT_TX,                  /* forwarded back out of the receiving interface (XDP_TX) */
	CNT_CONNTRACK_HIT,       /* forward packet of a known flow */
	CNT_CONNTRACK_MISS,      /* new flow (or forgotten one): hashed onto the ring */
	CNT_REVERSE_NAT,         /* reply from a target rewritten back to VIP:port */
	CNT_DROP_BAD_IP_CSUM,    /* IPv4 header checksum wrong: drop (the kernel would) */
	CNT_SYN_RESCHEDULED,     /* a SYN found an entry it must not follow (target out of service, entry
	                          * closed, expired or stale): hashed onto the ring, entry replaced */
	CNT_MISS_NO_ENTRY,       /* TCP segment, not a SYN, of no usable entry: forwarded by the ring, no entry
	                          * made (an evicted or untracked flow, or a stray or spoofed packet) */
	CNT_REPLY_NO_ENTRY,      /* reply of a flow with no entry (a half flow): rewritten, the ring sends that
	                          * flow to this target */
	CNT_FLOW_CLOSED,         /* TCP flow closed (RST, or FIN from both sides): short timeout, a SYN replaces it */
	CNT_FLOOD_NO_ENTRY,      /* new flow above NEW_FLOW_RATE_LIMIT: forwarded by the ring, no entry made */
	CNT_FLOW_ESTABLISHED,    /* the client acknowledged the target's SYN-ACK: the half-open entry moved to
	                          * conntrack */
	CNT_HANDSHAKE_MISMATCH,  /* an ACK of a half-open flow that does not acknowledge the target's SYN-ACK
	                          * (spoofed, or before it): forwarded, the flow stays half-open */
	CNT_FIB_NO_NEIGH,        /* CNT_PASS_FIB because the next hop's MAC is not known yet: the kernel resolves it */
	CNT_FIB_FWD_DISABLED,    /* ... because IPv4 forwarding is off on the receiving interface: the kernel drops it */
	CNT_FIB_BLACKHOLE,       /* ... because the route is a blackhole, unreachable or prohibit: the kernel drops it */
	CNT_FIB_FRAG_NEEDED,     /* ... because it is bigger than the egress MTU: the kernel fragments or answers ICMP */
	CNT_FIB_NO_ROUTE,        /* ... because there is no route (or the destination is local, or another answer) */
	CNT_DROP_NO_PORT,        /* full NAT: no free source port after FULLNAT_PORT_TRIES: drop (the client retries) */
	CNT_DROP_NO_SOURCE,      /* full NAT: lb has no address toward the target: drop */
	CNT_DROP_NO_ENTRY,       /* full NAT: a flow that may not get an entry (flood guard) cannot be forwarded: drop */
	CNT_FULLNAT_PORT_BUSY,   /* full NAT: a hashed port tried was held by a live flow (another is tried) */
	CNT_FULLNAT_REVERSE,     /* full NAT: a reply to lb's address:port rewritten back to VIP -> client */
	CNT_DSR,                 /* DSR: only the destination MAC rewritten toward the target */
	CNT_DROP_NO_NEIGH,       /* full NAT or DSR: no route or neighbour entry toward the target yet: drop
	                          * (the kernel could not forward such a packet; lb resolves targets' neighbours) */
	CNT_ICMP_TOO_BIG,        /* a packet with DF (IPv6: any) too big for the path to its target: "fragmentation
	                          * needed" (ICMPv6 "packet too big") sent back to its sender instead (XDP_TX) */
	CNT_ICMP_TO_CLIENT,      /* ICMP error about a packet lb sent toward a target: quote and addresses
	                          * rewritten back, sent to the client */
	CNT_ICMP_TO_TARGET,      /* ICMP error about a reply lb sent from a VIP: rewritten, sent to the target */
	CNT_PASS_IPV6,           /* IPv6 with no extension header, not ICMPv6, that is not TCP/UDP to an IPv6 VIP
	                          * nor a reply: pass */
	CNT_PASS_IPV6_EXT_HDR,   /* IPv6 with an extension header (hop-by-hop, routing, destination options, AH,
	                          * ESP, ...) after the fixed header: pass */
	CNT_PASS_IPV6_FRAGMENT,  /* IPv6 fragment (a fragment header first): pass */
	CNT_PASS_ICMPV6,         /* ICMPv6 (neighbour discovery, echo, errors of no tracked flow): pass, the
	                          * kernel answers it */
	CNT_IPV6_FORWARDED,      /* an IPv6 frame forwarded (toward a target, back to a client, an ICMPv6
	                          * error): an event; its verdict is counted too (CNT_REDIRECTED, CNT_TX) */
	CNT_MAX,
};

#endif /* LB_CONSTS_H */
