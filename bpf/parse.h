/* parse.h: Ethernet / IPv4 / IPv6 / TCP / UDP into a packet descriptor.
 *
 * Every read is bounds-checked against data_end before it happens. What the
 * parser cannot fully read it does not guess at: it returns a reason, and
 * lb.c passes such packets to the kernel untouched (the kernel's own checks
 * drop garbage), so XDP never forwards anything it did not parse. IPv6 has a
 * descriptor of its own (struct packet6), filled by parse_ipv6 only for an
 * IPv6 frame, so an IPv4 packet's descriptor and cost stay as they were.
 */
#ifndef LB_PARSE_H
#define LB_PARSE_H

#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/in6.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <bcc/helpers.h>

#include "structs.h"

#define IP_DF     0x4000
#define IP_MF     0x2000
#define IP_OFFSET 0x1fff

struct packet {
	struct ethhdr *eth;
	struct iphdr *ip;
	__be16 *ports;       /* source port, then destination port (TCP and UDP alike) */
	__sum16 *l4_check;   /* TCP or UDP checksum field */
	struct flow_key flow;
	__u32 len;           /* whole frame, bytes */
	__u8 tcp_flags;      /* TCP: byte 13 of the header (TCP_FLAG_* below); UDP: 0 */
};

/* The low byte of TCP's flags (byte 13 of the header). */
#define TCP_FLAG_FIN 0x01
#define TCP_FLAG_SYN 0x02
#define TCP_FLAG_RST 0x04
#define TCP_FLAG_ACK 0x10

enum parse_result {
	PARSE_OK = 0,
	PARSE_NOT_IPV4,      /* not an IPv4 frame */
	PARSE_TRUNCATED,     /* a header runs past the end of the frame, or lies about its length */
	PARSE_IP_OPTIONS,    /* IHL > 5 */
	PARSE_FRAGMENT,      /* MF set or a fragment offset */
	PARSE_NOT_L4,        /* IPv4, but neither TCP nor UDP */
	PARSE_ICMP,          /* ICMP: pkt->eth, ip and len are set (the caller reads the message) */
	PARSE_IPV6_FRAME,    /* the ethertype is IPv6: parse_ipv6 reads it into a struct packet6 */
	PARSE_IPV6,          /* IPv6 whose headers are whole, no extension header, neither TCP, UDP nor ICMPv6 */
	PARSE_IPV6_EXT_HDR,  /* IPv6, an extension header (other than a fragment header) first */
	PARSE_IPV6_FRAGMENT, /* IPv6, a fragment header first */
	PARSE_ICMPV6,        /* IPv6, ICMPv6 (neighbour discovery among it) first: pkt6->eth, ip6, len set */
};

/* An IPv6 TCP or UDP packet with no extension header (what the program forwards). */
struct packet6 {
	struct ethhdr *eth;
	struct ipv6hdr *ip6;
	__be16 *ports;       /* source port, then destination port */
	__sum16 *l4_check;   /* TCP or UDP checksum field */
	struct flow_key6 flow;
	__u32 len;           /* whole frame, bytes */
	__u8 tcp_flags;      /* TCP: byte 13 of the header (TCP_FLAG_*); UDP: 0 */
};

#ifndef IPPROTO_HIP
#define IPPROTO_HIP 139   /* Host Identity Protocol: an extension header (RFC 7401) */
#endif
#ifndef IPPROTO_SHIM6
#define IPPROTO_SHIM6 140 /* Shim6: an extension header (RFC 5533) */
#endif

/* The IPv6 packet's length: fixed header and payload (IPv4's total length). */
static __always_inline __u16 ipv6_len(struct packet6 *pkt)
{
	return sizeof(struct ipv6hdr) + bpf_ntohs(pkt->ip6->payload_len);
}

/* An IPv6 frame: TCP or UDP right after the fixed header is read into
 * `pkt` (PARSE_OK); anything else is classified, checked to be in the frame
 * as far as it is read, and left to the caller to pass. The payload length
 * is checked against the frame. A UDP datagram with a zero checksum (which
 * IPv6 forbids, RFC 8200 8.1) is a parse error: the kernel drops it. */
static __always_inline enum parse_result parse_ipv6(struct xdp_md *ctx, struct packet6 *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	pkt->len = data_end - data;
	pkt->eth = data;
	pkt->ip6 = (void *)(pkt->eth + 1);
	struct ipv6hdr *ip6 = pkt->ip6;
	if ((void *)(ip6 + 1) > data_end || ip6->version != 6)
		return PARSE_TRUNCATED;
	/* Scalars only (see parse_packet): Ethernet + fixed header + payload within the frame. */
	__u32 payload = bpf_ntohs(ip6->payload_len);
	if (sizeof(struct ethhdr) + sizeof(struct ipv6hdr) + payload > pkt->len)
		return PARSE_TRUNCATED;
	void *l4 = (void *)(ip6 + 1);
	switch (ip6->nexthdr) {
	case IPPROTO_TCP: {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || payload < sizeof(struct tcphdr))
			return PARSE_TRUNCATED;
		pkt->l4_check = &tcp->check;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
		break;
	}
	case IPPROTO_UDP: {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end || payload < sizeof(struct udphdr) || udp->check == 0)
			return PARSE_TRUNCATED;
		pkt->l4_check = &udp->check;
		break;
	}
	case IPPROTO_ICMPV6:
		return PARSE_ICMPV6;
	case IPPROTO_FRAGMENT:
		return PARSE_IPV6_FRAGMENT;
	case IPPROTO_HOPOPTS:
	case IPPROTO_ROUTING:
	case IPPROTO_DSTOPTS:
	case IPPROTO_AH:
	case IPPROTO_ESP:
	case IPPROTO_MH:
	case IPPROTO_HIP:
	case IPPROTO_SHIM6:
		return PARSE_IPV6_EXT_HDR;
	default:
		return PARSE_IPV6;
	}
	pkt->ports = l4;
	__builtin_memcpy(&pkt->flow.src, &ip6->saddr, sizeof(pkt->flow.src));
	__builtin_memcpy(&pkt->flow.dst, &ip6->daddr, sizeof(pkt->flow.dst));
	pkt->flow.sport = pkt->ports[0];
	pkt->flow.dport = pkt->ports[1];
	pkt->flow.proto = ip6->nexthdr;
	return PARSE_OK;
}

static __always_inline enum parse_result parse_packet(struct xdp_md *ctx, struct packet *pkt)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;

	pkt->len = data_end - data;
	pkt->eth = data;
	if ((void *)(pkt->eth + 1) > data_end)
		return PARSE_NOT_IPV4; /* too short to carry IPv4 at all */
	if (pkt->eth->h_proto != bpf_htons(ETH_P_IP)) {
		if (pkt->eth->h_proto == bpf_htons(ETH_P_IPV6))
			return PARSE_IPV6_FRAME;
		return PARSE_NOT_IPV4;
	}

	pkt->ip = (void *)(pkt->eth + 1);
	if ((void *)(pkt->ip + 1) > data_end)
		return PARSE_TRUNCATED;
	if (pkt->ip->ihl < 5 || pkt->ip->version != 4)
		return PARSE_TRUNCATED;
	if (pkt->ip->ihl != 5)
		return PARSE_IP_OPTIONS;
	if (pkt->ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
		return PARSE_FRAGMENT;
	if (pkt->ip->protocol == IPPROTO_ICMP) {
		if (sizeof(struct ethhdr) + bpf_ntohs(pkt->ip->tot_len) > pkt->len)
			return PARSE_TRUNCATED;
		return PARSE_ICMP;
	}
	if (pkt->ip->protocol != IPPROTO_TCP && pkt->ip->protocol != IPPROTO_UDP)
		return PARSE_NOT_L4;

	void *l4 = (void *)(pkt->ip + 1);
	__u16 tot_len = bpf_ntohs(pkt->ip->tot_len);
	if (pkt->ip->protocol == IPPROTO_TCP) {
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || tot_len < sizeof(struct iphdr) + sizeof(struct tcphdr))
			return PARSE_TRUNCATED;
		pkt->l4_check = &tcp->check;
		pkt->tcp_flags = ((__u8 *)tcp)[13];
	} else {
		struct udphdr *udp = l4;
		if ((void *)(udp + 1) > data_end || tot_len < sizeof(struct iphdr) + sizeof(struct udphdr))
			return PARSE_TRUNCATED;
		pkt->l4_check = &udp->check;
	}
	/* pkt->ip + tot_len > data_end, in scalars: pkt->ip is data plus the
	 * Ethernet header and pkt->len is data_end - data, so this is the same
	 * test. Debian 12's 6.1 verifier keeps no bounds through bpf_ntohs's byte
	 * swap, so it rejects adding tot_len to a packet pointer ("math between
	 * pkt pointer and register with unbounded min value"); comparing two
	 * scalars needs no bounds. */
	if (sizeof(struct ethhdr) + tot_len > pkt->len)
		return PARSE_TRUNCATED;

	pkt->ports = l4;
	pkt->flow.src = pkt->ip->saddr;
	pkt->flow.dst = pkt->ip->daddr;
	pkt->flow.sport = pkt->ports[0];
	pkt->flow.dport = pkt->ports[1];
	pkt->flow.proto = pkt->ip->protocol;
	return PARSE_OK;
}

#endif /* LB_PARSE_H */
