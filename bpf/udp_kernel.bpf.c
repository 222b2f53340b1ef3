// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// ferry's in-kernel path for established UDP sessions (see src/udp/kernel.rs).
//
// Attached to the ingress of each interface. A datagram whose (source, destination)
// is a session's client -> listener address, or server -> session socket address, is
// rewritten as the session's socket would have sent it (server-bound) or as the
// listening socket would have (client-bound), counted, and sent on: delivered up the
// local stack, or redirected out of the interface facing its new destination. Anything
// else (other traffic, IP fragments, IPv4 options, IPv6 extension headers, a datagram
// of no known session) goes on untouched, so the sockets see it as before. IPv4 and IPv6
// have a map each (FLOWS, FLOWS6); a session is in one, as its four addresses are of one
// family.
//
// A datagram for this host is passed up only when it came in on loopback (both ends of
// that direction local); one for another host leaves through bpf_redirect_neigh, which
// finds the next hop's address as a sent datagram's would be found.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/udp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// A datagram's addresses, as on the wire (network byte order).
struct flow {
	__u32 src_ip;
	__u32 dst_ip;
	__u16 src_port;
	__u16 dst_port;
};

struct flow6 {
	__u32 src_ip[4];
	__u32 dst_ip[4];
	__u16 src_port;
	__u16 dst_port;
};

// An entry's counts.
struct tally {
	__u64 datagrams;
	__u64 bytes;
	// bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last one.
	__u64 last_ns;
};

// What a matching datagram becomes, and its counts. `to` first, then the same fields
// for both families.
#define REWRITE(name, flow_type)                                                            \
	struct name {                                                                       \
		flow_type to;                                                               \
		/* Where it goes: 1 (loopback) is up the local stack; any other, out of     \
		   that interface, to the neighbour its route names. */                      \
		__u32 ifindex;                                                              \
		/* Its listener's and direction's counts: an index into COUNTS. */          \
		__u32 counts;                                                               \
		/* The interface such datagrams come in on: elsewhere (a VLAN's parent, a   \
		   bridge port, a spoofed source) they are not the session's and go on      \
		   untouched. */                                                            \
		__u32 from_ifindex;                                                         \
		struct tally tally;                                                         \
	}

REWRITE(rewrite, struct flow);
REWRITE(rewrite6, struct flow6);

// The layouts src/udp/kernel.rs writes and reads (its `Flow4`, `Flow6`, `Entry<F>`).
_Static_assert(sizeof(struct flow) == 12, "struct flow");
_Static_assert(sizeof(struct flow6) == 36, "struct flow6");
_Static_assert(sizeof(struct rewrite) == 48, "struct rewrite");
_Static_assert(__builtin_offsetof(struct rewrite, tally) == 24, "rewrite.tally");
_Static_assert(sizeof(struct rewrite6) == 72, "struct rewrite6");
_Static_assert(__builtin_offsetof(struct rewrite6, tally) == 48, "rewrite6.tally");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__type(key, struct flow);
	__type(value, struct rewrite);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} FLOWS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__type(key, struct flow6);
	__type(value, struct rewrite6);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} FLOWS6 SEC(".maps");

// What the kernel relayed, per listener and direction (read at each metrics scrape).
struct counts {
	__u64 datagrams;
	__u64 bytes;
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 2048);
	__type(key, __u32);
	__type(value, struct counts);
} COUNTS SEC(".maps");

#define LOOPBACK 1
#define IP_CSUM (ETH_HLEN + offsetof(struct iphdr, check))
#define IP_SRC (ETH_HLEN + offsetof(struct iphdr, saddr))
#define IP_FRAG (ETH_HLEN + offsetof(struct iphdr, frag_off))
#define UDP_CSUM (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, check))
#define UDP_SRC (ETH_HLEN + sizeof(struct iphdr) + offsetof(struct udphdr, source))
#define IP6_SRC (ETH_HLEN + offsetof(struct ipv6hdr, saddr))
#define UDP6_CSUM (ETH_HLEN + sizeof(struct ipv6hdr) + offsetof(struct udphdr, check))
#define UDP6_SRC (ETH_HLEN + sizeof(struct ipv6hdr) + offsetof(struct udphdr, source))

#define IP_DF 0x4000

// Whether an entry's datagram may take the kernel's path out of `ifindex`. Delivered
// here, it must have come in on loopback: the stack would drop a datagram from a local
// address arriving on another interface as a martian. Such a one takes the sockets'
// path, as does one of an entry without an interface, or one too big for the way out
// (the sockets' path fragments it, as a sent datagram is).
static __always_inline int may_go(struct __sk_buff *skb, __u32 ifindex)
{
	if (ifindex == 0 || (ifindex == LOOPBACK && skb->ifindex != LOOPBACK))
		return 0;
	if (ifindex != LOOPBACK) {
		__u32 mtu = 0;
		if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
			return 0;
	}
	return 1;
}

// The datagrams in the packet (`*n`) and their payload bytes (`*len`), behind `headers`
// bytes of headers, in an IP packet whose header says `ip_payload` bytes follow it; 0
// when the UDP length is not that, or more than the packet holds (the stack's to judge
// and drop). Datagrams coalesced by GRO (or sent with GSO) are one packet with one
// header here, passed on whole: the stack splits them where it must, headers rewritten.
static __always_inline int measure(struct __sk_buff *skb, struct udphdr *udp, __u64 headers,
				   __u64 ip_payload, __u64 *n, __u64 *len)
{
	__u64 ulen = bpf_ntohs(udp->len);
	if (skb->gso_segs > 1) {
		*n = skb->gso_segs;
		*len = skb->len - headers;
		return 1;
	}
	if (ulen < sizeof(struct udphdr) || ulen != ip_payload ||
	    ulen > skb->len - headers + sizeof(struct udphdr))
		return 0;
	*n = 1;
	*len = ulen - sizeof(struct udphdr);
	return 1;
}

// Counts a rewritten packet and sends it on.
static __always_inline int relay(struct tally *t, __u32 slot, __u32 ifindex, __u64 n, __u64 len)
{
	__sync_fetch_and_add(&t->datagrams, n);
	__sync_fetch_and_add(&t->bytes, len);
	t->last_ns = bpf_ktime_get_ns();
	// Per CPU: no other CPU writes it.
	struct counts *c = bpf_map_lookup_elem(&COUNTS, &slot);
	if (c) {
		c->datagrams += n;
		c->bytes += len;
	}
	if (ifindex == LOOPBACK)
		return TC_ACT_OK;
	return bpf_redirect_neigh(ifindex, 0, 0, 0);
}

static __always_inline int ipv4(struct __sk_buff *skb, void *data, void *end)
{
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp = data + ETH_HLEN + sizeof(struct iphdr);

	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	if (ip->version != 4 || ip->protocol != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	// Options move the UDP header; a fragment is reassembled by the stack first.
	if (ip->ihl != 5 || (ip->frag_off & bpf_htons(0x3fff)))
		return TC_ACT_UNSPEC;

	struct flow from = {
		.src_ip = ip->saddr,
		.dst_ip = ip->daddr,
		.src_port = udp->source,
		.dst_port = udp->dest,
	};
	struct rewrite *r = bpf_map_lookup_elem(&FLOWS, &from);
	if (!r || r->from_ifindex != skb->ifindex)
		return TC_ACT_UNSPEC;

	struct flow to = r->to;
	__u32 ifindex = r->ifindex;
	__u32 slot = r->counts;
	__u64 n, len;
	__u64 ip_payload = bpf_ntohs(ip->tot_len) - (__u64)sizeof(struct iphdr);
	if (!measure(skb, udp, ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr), ip_payload,
		     &n, &len) ||
	    !may_go(skb, ifindex))
		return TC_ACT_UNSPEC;

	// A datagram without a checksum (IPv4 allows it) keeps none. From here on, a helper
	// that fails drops the datagram: it is partly rewritten (the sender retries).
	int sum = udp->check != 0;
	__u16 old_frag = ip->frag_off;
	if (bpf_skb_store_bytes(skb, IP_SRC, &to, 8, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, UDP_SRC, &to.src_port, 4, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_l3_csum_replace(skb, IP_CSUM, from.src_ip, to.src_ip, 4) < 0 ||
	    bpf_l3_csum_replace(skb, IP_CSUM, from.dst_ip, to.dst_ip, 4) < 0)
		return TC_ACT_SHOT;
	if (sum) {
		__u64 f = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
		__u64 p = BPF_F_MARK_MANGLED_0;
		if (bpf_l4_csum_replace(skb, UDP_CSUM, from.src_ip, to.src_ip, f | 4) < 0 ||
		    bpf_l4_csum_replace(skb, UDP_CSUM, from.dst_ip, to.dst_ip, f | 4) < 0 ||
		    bpf_l4_csum_replace(skb, UDP_CSUM, from.src_port, to.src_port, p | 2) < 0 ||
		    bpf_l4_csum_replace(skb, UDP_CSUM, from.dst_port, to.dst_port, p | 2) < 0)
			return TC_ACT_SHOT;
	}
	// Like ferry's sockets, which let the kernel fragment what they send: a router with a
	// smaller MTU further on fragments it rather than dropping it.
	if (old_frag & bpf_htons(IP_DF)) {
		__u16 new_frag = old_frag & ~bpf_htons(IP_DF);
		if (bpf_skb_store_bytes(skb, IP_FRAG, &new_frag, 2, 0) < 0 ||
		    bpf_l3_csum_replace(skb, IP_CSUM, old_frag, new_frag, 2) < 0)
			return TC_ACT_SHOT;
	}
	return relay(&r->tally, slot, ifindex, n, len);
}

static __always_inline int ipv6(struct __sk_buff *skb, void *data, void *end)
{
	struct ipv6hdr *ip = data + ETH_HLEN;
	struct udphdr *udp = data + ETH_HLEN + sizeof(struct ipv6hdr);

	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	// UDP right after the header: extension headers (a fragment's among them) are the
	// stack's.
	if (ip->version != 6 || ip->nexthdr != IPPROTO_UDP)
		return TC_ACT_UNSPEC;
	// IPv6 requires the checksum: a datagram without one is the stack's to drop.
	if (udp->check == 0)
		return TC_ACT_UNSPEC;

	struct flow6 from;
	__builtin_memcpy(from.src_ip, &ip->saddr, 16);
	__builtin_memcpy(from.dst_ip, &ip->daddr, 16);
	from.src_port = udp->source;
	from.dst_port = udp->dest;
	struct rewrite6 *r = bpf_map_lookup_elem(&FLOWS6, &from);
	if (!r || r->from_ifindex != skb->ifindex)
		return TC_ACT_UNSPEC;

	struct flow6 to = r->to;
	__u32 ifindex = r->ifindex;
	__u32 slot = r->counts;
	__u64 n, len;
	if (!measure(skb, udp, ETH_HLEN + sizeof(struct ipv6hdr) + sizeof(struct udphdr),
		     bpf_ntohs(ip->payload_len), &n, &len) ||
	    !may_go(skb, ifindex))
		return TC_ACT_UNSPEC;

	// The addresses are in the checksum through its pseudo-header; IPv6's header has none.
	__s64 diff = bpf_csum_diff(from.src_ip, 32, to.src_ip, 32, 0);
	if (diff < 0)
		return TC_ACT_UNSPEC;
	// From here on, a helper that fails drops the datagram: it is partly rewritten.
	//
	// The packet's own sum (CHECKSUM_COMPLETE, from a NIC that gives it) must follow the
	// new addresses: with the pseudo-header flag, the checksum update below takes the
	// address change out of it, as an IPv4 header's checksum would cancel it, and IPv6
	// has none. BPF_F_RECOMPUTE_CSUM puts it back (Linux 6.16's BPF_F_IPV6 says the same
	// to the update, on kernels that have it).
	if (bpf_skb_store_bytes(skb, IP6_SRC, &to, 32, BPF_F_RECOMPUTE_CSUM) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, UDP6_SRC, &to.src_port, 4, 0) < 0)
		return TC_ACT_SHOT;
	__u64 f = BPF_F_MARK_MANGLED_0;
	if (bpf_l4_csum_replace(skb, UDP6_CSUM, 0, diff, f | BPF_F_PSEUDO_HDR) < 0 ||
	    bpf_l4_csum_replace(skb, UDP6_CSUM, from.src_port, to.src_port, f | 2) < 0 ||
	    bpf_l4_csum_replace(skb, UDP6_CSUM, from.dst_port, to.dst_port, f | 2) < 0)
		return TC_ACT_SHOT;
	return relay(&r->tally, slot, ifindex, n, len);
}

SEC("classifier")
int udp_kernel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > end || skb->vlan_present)
		return TC_ACT_UNSPEC;
	if (skb->protocol == bpf_htons(ETH_P_IP) && eth->h_proto == bpf_htons(ETH_P_IP))
		return ipv4(skb, data, end);
	if (skb->protocol == bpf_htons(ETH_P_IPV6) && eth->h_proto == bpf_htons(ETH_P_IPV6))
		return ipv6(skb, data, end);
	return TC_ACT_UNSPEC;
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
