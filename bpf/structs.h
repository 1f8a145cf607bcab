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
	__u32 reserved; /* zero; the program never reads it. Once `mode`, whose
	                 * only value was FWD_NAT (0). Kept so the size and layout
	                 * stay those of the vips maps already pinned (a map of
	                 * another size is refused on restart) */
};

/* targets value (array indexed by target id). */
struct target {
	__be32 addr;   /* IPv4 address, network order */
	__be16 port;   /* network order */
	__u16  flags;  /* host order; TARGET_F_* */
};

/* conntrack key: a 5-tuple exactly as the packet carries it. A flow has
 * two entries: client -> VIP (forward) and target -> client (reply). */
struct flow_key {
	__be32 src;    /* network order */
	__be32 dst;    /* network order */
	__be16 sport;  /* network order */
	__be16 dport;  /* network order */
	__u8   proto;  /* IPPROTO_TCP or IPPROTO_UDP */
	__u8   pad[3]; /* zero */
};

/* conntrack value. One lookup serves both directions of an established
 * flow, before (and instead of) the vips lookup. */
struct flow_state {
	__u32 target_id;     /* host order */
	__u32 vip_id;        /* host order */
	__u64 created_ns;    /* host order; bpf_ktime_get_coarse_ns() at the first packet */
	__u64 last_seen_ns;  /* host order; refreshed at most every LAST_SEEN_GRANULARITY_NS */
	__u32 vip_gen;       /* host order; the VIP's generation when the flow began: a VIP
	                      * deleted (or its id reused) since makes the entry stale */
	__be32 vip_addr;     /* network order; FLOW_REPLY: the source to put back */
	__be16 vip_port;     /* network order; FLOW_REPLY: the source port to put back */
	__u8  kind;          /* FLOW_FORWARD or FLOW_REPLY */
	__u8  pad[5];        /* zero */
};

/* vip_stats and target_stats value (per CPU; userspace sums). */
struct traffic_stats {
	__u64 packets;       /* client -> target packets */
	__u64 bytes;         /* client -> target bytes (whole frames) */
	__u64 new_flows;     /* flows hashed onto the ring */
	__u64 reply_packets; /* target -> client packets (reverse NAT) */
	__u64 reply_bytes;   /* target -> client bytes */
};

#endif /* LB_STRUCTS_H */
