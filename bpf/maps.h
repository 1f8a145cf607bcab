/* maps.h: every map of the program, one comment each.
 *
 * All maps are pinned under PIN_DIR (/sys/fs/bpf/lb/<name>/) and reused by
 * the next load, so a restarted daemon adopts the live state: flows keep
 * their targets while the control plane is away. Userspace writes vips,
 * targets, rings, vip_gens, replies and reply_ports (and their IPv6
 * counterparts vips6, targets6, replies6, fullnat_srcs6); the program
 * writes conntrack, half_open, fullnat_flows (conntrack6, half_open6,
 * fullnat_flows6), flood_guard, next_hops and the stats.
 *
 * Only declarations live here: bcc rewrites map calls (vips.lookup(...))
 * in the main file alone, so every function that touches a map is in lb.c.
 */
#ifndef LB_MAPS_H
#define LB_MAPS_H

#include <uapi/linux/bpf.h>
#include <bcc/helpers.h>

#include "consts.h"
#include "structs.h"

#ifndef PIN_DIR
#error "PIN_DIR must be set by the loader (-DPIN_DIR=\"/sys/fs/bpf/lb/<name>\")"
#endif

/* The maps themselves are made by the loader, not by bcc: it opens the ones
 * pinned in PIN_DIR by path, creates and pins those missing, and points the
 * compiled program at them before loading it (lb/dataplane/loader.py).
 * bcc's BPF_TABLE_PINNED would reopen a pinned map by id, which takes
 * CAP_SYS_ADMIN; a restart under deploy/lb.service has no such thing. So
 * what bcc makes of these declarations are placeholders: the loader compiles
 * with LB_MAP_ENTRIES(n) = 1. Type, key, value and flags here must match
 * map_specs() in lb/dataplane/structs.py (the loader checks). */
#ifndef LB_MAP_ENTRIES
#define LB_MAP_ENTRIES(n) (n)
#endif

/* {addr, port, proto} -> VIP id, live ring half, generation (struct vip_meta). */
BPF_TABLE("hash", struct vip_key, struct vip_meta, vips, LB_MAP_ENTRIES(MAX_VIPS));

/* target id -> {addr, port, flags}. Ids are never reused while a flow may
 * still point at them (the controller's job). */
BPF_TABLE("array", u32, struct target, targets, LB_MAP_ENTRIES(MAX_TARGETS));

/* (vip id * 2 + half) * RING_SIZE + slot -> target id: each VIP's Maglev ring,
 * double-buffered. Userspace fills the idle half, then flips vip_meta.ring in
 * one update, so no packet ever sees a half-written ring. */
BPF_TABLE("array", u32, u32, rings, LB_MAP_ENTRIES(MAX_VIPS * 2 * RING_SIZE));

/* client -> VIP 5-tuple -> flow state: the target, and where the TCP
 * connection is. One entry per flow, made only by a packet that starts one
 * (a TCP SYN, a UDP datagram), so a flood of other segments makes none;
 * the flow's replies find it through `replies`. One LRU list shared by all
 * CPUs unless CONNTRACK_LRU_FLAGS says otherwise (consts.h). */
BPF_F_TABLE("lru_hash", struct flow_key, struct flow_state, conntrack, LB_MAP_ENTRIES(CONNTRACK_SIZE),
            CONNTRACK_LRU_FLAGS);

/* client -> VIP 5-tuple -> a TCP flow whose handshake is not complete: made
 * by a SYN, moved to conntrack by the client's ACK of the target's SYN-ACK.
 * Its own LRU, so a SYN flood turns this table over, never conntrack. */
BPF_F_TABLE("lru_hash", struct flow_key, struct half_open_flow, half_open, LB_MAP_ENTRIES(HALF_OPEN_SIZE),
            HALF_OPEN_LRU_FLAGS);

/* target endpoint (source of its replies) -> its target id and the VIPs it
 * serves: a reply's source goes back to the VIP whose flow it belongs to,
 * known from that flow's entry, or from the ring when the flow has none. */
BPF_TABLE("hash", struct endpoint_key, struct reply_route, replies, LB_MAP_ENTRIES(MAX_TARGETS * 2));

/* port >> 6 -> 64 bits, one per port: set for the port of every target
 * endpoint in `replies`. A packet whose source port has no bit is no reply,
 * and goes straight to conntrack (an array load instead of a hash lookup on
 * every client packet). */
BPF_TABLE("array", u32, u64, reply_ports, LB_MAP_ENTRIES(1024));

/* vip id -> generation. Userspace bumps it when it deletes a VIP or gives
 * its id to another one, which makes every flow begun under the old
 * generation stale: its packets take the vips path again (and pass to the
 * kernel when the VIP is gone). An array lookup instead of a hash lookup
 * on every established packet. */
BPF_TABLE("array", u32, u32, vip_gens, LB_MAP_ENTRIES(MAX_VIPS));

/* target id -> its next hop, as this CPU last asked bpf_fib_lookup
 * (NEXT_HOP_CACHE_NS). Userspace empties a target's when it writes it. */
BPF_TABLE("percpu_array", u32, struct next_hop, next_hops, LB_MAP_ENTRIES(MAX_TARGETS));

/* target id -> lb's own address toward it (network order; 0: none): the
 * source of its full-NAT flows. Userspace writes it from the route to the
 * target (its preferred source), with the target. Read for new flows only. */
BPF_TABLE("array", u32, __be32, fullnat_sources, LB_MAP_ENTRIES(MAX_TARGETS));

/* Full NAT: a flow as its replies carry it (target -> lb address:allocated
 * port) -> the flow as its client sent it (client -> VIP), which is also
 * its conntrack key. An entry is a claimed port: made (BPF_NOEXIST) when
 * the flow's port is allocated, taken over when its owner is no longer
 * live, gone with the LRU. */
BPF_TABLE("lru_hash", struct flow_key, struct flow_key, fullnat_flows, LB_MAP_ENTRIES(CONNTRACK_SIZE));

/* vip id -> traffic. */
BPF_TABLE("percpu_array", u32, struct traffic_stats, vip_stats, LB_MAP_ENTRIES(MAX_VIPS));

/* target id -> traffic. */
BPF_TABLE("percpu_array", u32, struct traffic_stats, target_stats, LB_MAP_ENTRIES(MAX_TARGETS));

/* enum lb_counter -> packets: why each packet got its verdict. */
BPF_TABLE("percpu_array", u32, u64, counters, LB_MAP_ENTRIES(CNT_MAX));

/* TABLE_* -> what went into and out of that flow table, and its LRU evictions. */
BPF_TABLE("percpu_array", u32, struct table_stats, table_stats, LB_MAP_ENTRIES(TABLE_COUNT));

/* FILL_HELD(TABLE_*), FILL_REMOVED_BY_LB(TABLE_*) -> entries: how full each
 * flow table is, without walking it (consts.h). One cell for all CPUs. */
BPF_TABLE("array", u32, u64, table_fill, LB_MAP_ENTRIES(TABLE_COUNT * 2));

/* 0 -> this CPU's flood window: new entries made in the current second. */
BPF_TABLE("percpu_array", u32, struct flood_window, flood_guard, LB_MAP_ENTRIES(1));

/* ---- IPv6: the same roles, with 16-byte addresses (structs.h). VIP and
 * target ids are shared with IPv4 (one id space each), and so are rings,
 * vip_gens, reply_ports, next_hops, the stats, counters and flood_guard. */

/* {IPv6 addr, port, proto} -> VIP id, live ring half, generation, mode. */
BPF_TABLE("hash", struct vip_key6, struct vip_meta, vips6, LB_MAP_ENTRIES(MAX_VIPS));

/* target id -> {IPv6 addr, port, flags}: the entry of an IPv6 target (an
 * IPv6 VIP's ring holds only those). */
BPF_TABLE("array", u32, struct target6, targets6, LB_MAP_ENTRIES(MAX_TARGETS));

/* As conntrack, for IPv6 flows (CONNTRACK6_SIZE: small without an IPv6
 * TCP/UDP listener, consts.h). */
BPF_TABLE("lru_hash", struct flow_key6, struct flow_state6, conntrack6, LB_MAP_ENTRIES(CONNTRACK6_SIZE));

/* As half_open, for IPv6 flows (HALF_OPEN6_SIZE). */
BPF_TABLE("lru_hash", struct flow_key6, struct half_open_flow6, half_open6, LB_MAP_ENTRIES(HALF_OPEN6_SIZE));

/* As replies, for IPv6 target endpoints (their ports are in reply_ports too). */
BPF_TABLE("hash", struct endpoint_key6, struct reply_route6, replies6, LB_MAP_ENTRIES(MAX_TARGETS * 2));

/* target id -> lb's own IPv6 address toward it (all zero: none), as
 * fullnat_sources. Not "fullnat_sources6": a kernel map name holds 15
 * characters, and the kernel would cut it to the IPv4 map's name. */
BPF_TABLE("array", u32, struct addr6, fullnat_srcs6, LB_MAP_ENTRIES(MAX_TARGETS));

/* As fullnat_flows, for IPv6: target -> lb address:port 5-tuple -> client -> VIP 5-tuple. */
BPF_TABLE("lru_hash", struct flow_key6, struct flow_key6, fullnat_flows6, LB_MAP_ENTRIES(CONNTRACK6_SIZE));

#endif /* LB_MAPS_H */
