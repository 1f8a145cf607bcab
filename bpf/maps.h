/* maps.h: every map of the program, one comment each.
 *
 * All maps are pinned under PIN_DIR (/sys/fs/bpf/lb/<name>/) and reused by
 * the next load, so a restarted daemon adopts the live state: flows keep
 * their targets while the control plane is away. Userspace writes vips,
 * targets, rings and vip_gens; the program writes conntrack and the stats.
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

/* {addr, port, proto} -> VIP id, live ring half, generation (struct vip_meta). */
BPF_TABLE_PINNED("hash", struct vip_key, struct vip_meta, vips, MAX_VIPS, PIN_DIR "/vips");

/* target id -> {addr, port, flags}. Ids are never reused while a flow may
 * still point at them (the controller's job). */
BPF_TABLE_PINNED("array", u32, struct target, targets, MAX_TARGETS, PIN_DIR "/targets");

/* (vip id * 2 + half) * RING_SIZE + slot -> target id: each VIP's Maglev ring,
 * double-buffered. Userspace fills the idle half, then flips vip_meta.ring in
 * one update, so no packet ever sees a half-written ring. */
BPF_TABLE_PINNED("array", u32, u32, rings, MAX_VIPS * 2 * RING_SIZE, PIN_DIR "/rings");

/* 5-tuple -> flow state, both directions of every flow: a forward entry
 * (client -> VIP) naming the target, a reply entry (target -> client)
 * naming the VIP to restore. A flow stays on its target for its life.
 * LRU lists per CPU (no common lock on the fast path). */
BPF_TABLE_PINNED("lru_hash", struct flow_key, struct flow_state, conntrack, CONNTRACK_SIZE,
                 PIN_DIR "/conntrack", BPF_F_NO_COMMON_LRU);

/* vip id -> generation. Userspace bumps it when it deletes a VIP or gives
 * its id to another one, which makes every flow begun under the old
 * generation stale: its packets take the vips path again (and pass to the
 * kernel when the VIP is gone). An array lookup instead of a hash lookup
 * on every established packet. */
BPF_TABLE_PINNED("array", u32, u32, vip_gens, MAX_VIPS, PIN_DIR "/vip_gens");

/* vip id -> traffic. */
BPF_TABLE_PINNED("percpu_array", u32, struct traffic_stats, vip_stats, MAX_VIPS, PIN_DIR "/vip_stats");

/* target id -> traffic. */
BPF_TABLE_PINNED("percpu_array", u32, struct traffic_stats, target_stats, MAX_TARGETS,
                 PIN_DIR "/target_stats");

/* enum lb_counter -> packets: why each packet got its verdict. */
BPF_TABLE_PINNED("percpu_array", u32, u64, counters, CNT_MAX, PIN_DIR "/counters");

#endif /* LB_MAPS_H */
