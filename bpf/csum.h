/* csum.h: incremental Internet checksum updates (RFC 1624, eqn. 3).
 *
 * HC' = ~(~HC + ~m + m'), folded. One's-complement sums do not depend on
 * byte order as long as every 16-bit word is read the same way, so the
 * fields are used exactly as they sit in the packet (network order).
 */
#ifndef LB_CSUM_H
#define LB_CSUM_H

#include <linux/types.h>

static __always_inline __u16 csum_fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

/* A 16-bit field of the checksummed data changed from `from` to `to`. */
static __always_inline void csum_replace2(__sum16 *check, __u16 from, __u16 to)
{
	__u32 sum = (__u16)~*check;
	sum += (__u16)~from;
	sum += to;
	*check = ~csum_fold(sum);
}

/* A 32-bit field (an address) changed from `from` to `to`. */
static __always_inline void csum_replace4(__sum16 *check, __u32 from, __u32 to)
{
	__u32 sum = (__u16)~*check;
	sum += (__u16)~(from & 0xffff);
	sum += (__u16)~(from >> 16);
	sum += to & 0xffff;
	sum += to >> 16;
	*check = ~csum_fold(sum);
}

#endif /* LB_CSUM_H */
