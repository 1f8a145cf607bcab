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

/* A 128-bit field (an IPv6 address, as four words) changed from `from` to
 * `to`. Sixteen 16-bit terms and the old checksum stay below 2^21: two folds
 * are enough. */
static __always_inline void csum_replace16(__sum16 *check, const __u32 *from, const __u32 *to)
{
	__u32 sum = (__u16)~*check;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		sum += (__u16)~(from[i] & 0xffff);
		sum += (__u16)~(from[i] >> 16);
		sum += to[i] & 0xffff;
		sum += to[i] >> 16;
	}
	*check = ~csum_fold(sum);
}

/* Is the IPv4 header's checksum right? `hdr` is a 20-byte header (no
 * options) that the caller has bounds-checked: the one's-complement sum of
 * its ten 16-bit words, checksum included, is 0xffff when it is. */
static __always_inline int ipv4_header_csum_ok(const void *hdr)
{
	const __u32 *word = hdr;
	__u64 sum = (__u64)word[0] + word[1] + word[2] + word[3] + word[4];

	sum = (sum & 0xffffffff) + (sum >> 32);
	sum = (sum & 0xffffffff) + (sum >> 32);
	return csum_fold((__u32)sum) == 0xffff;
}

#endif /* LB_CSUM_H */
