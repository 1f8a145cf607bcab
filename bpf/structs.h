/* structs.h: the structs shared with Python, and only those.
 *
 * Rules: fixed-width fields, explicit padding, no bitfields, every field
 * commented with its byte order. lb/dataplane/structs.py mirrors each one
 * with ctypes, and tests/test_structs.py checks sizes and offsets against
 * the types bcc decodes from this very program.
 */
#ifndef LB_STRUCTS_H
#define LB_STRUCTS_H

#include <linux/types.h>

#include "consts.h"

/* vips key: a VIP as packets address it. */
struct vip_key {
	__be32 addr;   /* IPv4 address, network order */
	__be16 port;   /* network order */
	__u8   proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;    /* zero */
};

/* vips value. */
struct vip_meta {
	__u32 vip_id;   /* host order; index into vip_stats and rings */
	__u32 ring;     /* host order; live half of the VIP's double-buffered ring: 0 or 1 */
	__u32 gen;      /* host order; vip_gens[vip_id] when this VIP was written */
	__u32 mode;     /* host order; FWD_NAT, FWD_FULLNAT or FWD_DSR (consts.h). Was
	                 * `reserved` (always 0, FWD_NAT) in earlier builds, so vips
	                 * maps pinned by them are adopted as they are */
};

/* targets value (array indexed by target id). */
struct target {
	__be32 addr;   /* IPv4 address, network order */
	__be16 port;   /* network order */
	__u16  flags;  /* host order; TARGET_F_* */
};

/* conntrack key: a 5-tuple exactly as the packet carries it, client -> VIP.
 * A flow has this one entry; its replies (target -> client) find it again
 * through the `replies` map, which gives the VIP to put back. */
struct flow_key {
	__be32 src;    /* network order */
	__be32 dst;    /* network order */
	__be16 sport;  /* network order */
	__be16 dport;  /* network order */
	__u8   proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3]; /* zero */
};

/* conntrack value: the flow's target and where its TCP connection is.
 * The four state bytes are each written by one event only (never read,
 * modified and written back), so two CPUs seeing the two FINs at once
 * cannot lose one. */
struct flow_state {
	__u32 target_id;     /* host order */
	__u32 vip_id;        /* host order */
	__u64 created_ns;    /* host order; bpf_ktime_get_coarse_ns() at the first packet */
	__u64 last_seen_ns;  /* host order; refreshed at most every LAST_SEEN_GRANULARITY_NS, and
	                      * at each state change */
	__u32 vip_gen;       /* host order; the VIP's generation when the flow began: a VIP
	                      * deleted (or its id reused) since makes the entry stale */
	__u8  syn_only;      /* 1: made by a SYN, no other client segment yet (TCP) */
	__u8  fin_client;    /* 1: the client sent a FIN */
	__u8  fin_target;    /* 1: the target sent a FIN */
	__u8  rst;           /* 1: either side sent a RST */
	__be32 snat_addr;    /* network order; full NAT: lb's address the flow leaves from; else 0 */
	__be16 snat_port;    /* network order; full NAT: the source port lb allocated; else 0 */
	__u8  mode;          /* FWD_* of the VIP when the flow began */
	__u8  pad;           /* zero */
};

/* half_open value: a TCP flow whose SYN was seen and whose handshake is not
 * complete. When the client acknowledges the target's SYN-ACK (ack number
 * target_isn + 1) it moves to conntrack as `flow`, established: a spoofed
 * SYN, answered to an address that cannot see the SYN-ACK, never gets there. */
struct half_open_flow {
	struct flow_state flow;  /* as it will be in conntrack; flow.syn_only is 1 */
	__u32 target_isn;        /* host order; the sequence number of the target's SYN-ACK */
	__u32 synack_seen;       /* host order; 1: target_isn is set */
};

/* replies key: a target endpoint as its replies carry it (source). */
struct endpoint_key {
	__be32 addr;   /* network order */
	__be16 port;   /* network order */
	__u8   proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;    /* zero */
};

/* One VIP a target endpoint serves: what a reply's source becomes. */
struct reply_vip {
	__be32 addr;   /* network order */
	__be16 port;   /* network order */
	__u16  pad;    /* zero */
	__u32  vip_id; /* host order */
	__u32  gen;    /* host order; the VIP's generation (an entry of another is stale) */
};

/* replies value: the target's id and the VIPs it serves (first `count`). */
struct reply_route {
	__u32 target_id;                      /* host order */
	__u32 count;                          /* host order; 1..MAX_REPLY_VIPS */
	struct reply_vip vips[MAX_REPLY_VIPS];
};

/* flood_guard value (per CPU): new entries made in the current second. */
struct flood_window {
	__u64 start_ns; /* host order; bpf_ktime_get_coarse_ns() when the window began */
	__u64 entries;  /* host order; entries made since */
};

/* table_stats value (per CPU; userspace sums): what went into and out of a
 * flow table. An insert into a table that table_fill says is full is
 * counted as an eviction: the LRU evicts silently. */
struct table_stats {
	__u64 inserts;    /* host order; new keys the program put in */
	__u64 removed;    /* host order; entries the program deleted */
	__u64 evictions;  /* host order; inserts that found the table full (the LRU made room) */
};

/* next_hops value (per CPU, by target id): what bpf_fib_lookup answered
 * for packets to that target arriving on `in_ifindex`. */
struct next_hop {
	__u64 expires_ns;  /* host order; bpf_ktime_get_coarse_ns() from which it is asked again; 0: empty */
	__u32 ifindex;     /* host order; egress interface */
	__u32 in_ifindex;  /* host order; the ingress interface it was asked for */
	__u16 max_len;     /* host order; the largest IP packet it let through (IPv4 total length,
	                    * IPv6 fixed header + payload length) */
	__u8  dmac[6];     /* the next hop's MAC */
	__u8  smac[6];     /* the egress interface's MAC */
	__u8  pad[2];      /* zero */
};

/* vip_stats and target_stats value (per CPU; userspace sums). */
struct traffic_stats {
	__u64 packets;       /* client -> target packets */
	__u64 bytes;         /* client -> target bytes (whole frames) */
	__u64 new_flows;     /* flows hashed onto the ring */
	__u64 reply_packets; /* target -> client packets (reverse NAT) */
	__u64 reply_bytes;   /* target -> client bytes */
};

/* ---- IPv6: maps of their own (docs/architecture.md, "IPv6 flows: one map
 * per family"), so the IPv4 maps' keys and values above stay as they are.
 * VIP ids and target ids are one id space for both families: rings,
 * vip_gens, vip_stats, target_stats, next_hops and reply_ports are shared. */

/* An IPv6 address as packets carry it (network order), as four words so the
 * program copies, compares and hashes it a word at a time. */
struct addr6 {
	__be32 words[4];  /* network order */
};

/* vips6 key: an IPv6 VIP as packets address it. Its value is a struct
 * vip_meta whose vip_id comes from the IPv4 VIPs' id space. */
struct vip_key6 {
	struct addr6 addr; /* network order */
	__be16 port;       /* network order */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;        /* zero */
};

/* targets6 value (array indexed by target id): an IPv6 target. A target id
 * is IPv4 (its entry in targets) or IPv6 (its entry here); the other map's
 * entry is zero (flags 0: never forwarded to). */
struct target6 {
	struct addr6 addr; /* network order */
	__be16 port;       /* network order */
	__u16  flags;      /* host order; TARGET_F_* */
};

/* conntrack6, half_open6 and fullnat_flows6 key: an IPv6 5-tuple exactly as
 * the packet carries it (client -> VIP; for fullnat_flows6, target -> lb). */
struct flow_key6 {
	struct addr6 src;  /* network order */
	struct addr6 dst;  /* network order */
	__be16 sport;      /* network order */
	__be16 dport;      /* network order */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3];     /* zero */
};

/* conntrack6 value: an IPv4 flow's state (the same TCP lifecycle, the same
 * code), and full NAT's IPv6 source. */
struct flow_state6 {
	struct flow_state flow;  /* as in conntrack; flow.snat_addr is 0 (snat_addr below) */
	struct addr6 snat_addr;  /* network order; full NAT: lb's address the flow leaves from; else zero */
};

/* half_open6 value: as half_open's, and full NAT's IPv6 source. */
struct half_open_flow6 {
	struct half_open_flow half;  /* as in half_open; half.flow.snat_addr is 0 */
	struct addr6 snat_addr;      /* network order; as flow_state6.snat_addr */
};

/* replies6 key: an IPv6 target endpoint as its replies carry it (source). */
struct endpoint_key6 {
	struct addr6 addr; /* network order */
	__be16 port;       /* network order */
	__u8   proto;      /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad;        /* zero */
};

/* One IPv6 VIP a target endpoint serves: what a reply's source becomes. */
struct reply_vip6 {
	struct addr6 addr; /* network order */
	__be16 port;       /* network order */
	__u16  pad;        /* zero */
	__u32  vip_id;     /* host order */
	__u32  gen;        /* host order; the VIP's generation (an entry of another is stale) */
};

/* replies6 value: the target's id and the VIPs it serves (first `count`). */
struct reply_route6 {
	__u32 target_id;                       /* host order */
	__u32 count;                           /* host order; 1..MAX_REPLY_VIPS */
	struct reply_vip6 vips[MAX_REPLY_VIPS];
};

#endif /* LB_STRUCTS_H */
