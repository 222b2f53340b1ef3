// SPDX-License-Identifier: (MIT OR GPL-2.0)
//
// ferry's in-kernel path for established UDP sessions (see src/udp/kernel.rs).
//
// Attached to the ingress of each interface. A datagram whose (source, destination)
// is a session's client -> listener address, or server -> session socket address, is
// rewritten as the session's socket would have sent it (server-bound) or as the
// listening socket would have (client-bound), counted, and sent on: delivered up the
// local stack, or redirected out of the interface facing its new destination. Anything
// else (other traffic, IP fragments, IP options, a datagram of no known session) goes on
// untouched, so the sockets see it as before.
//
// A datagram for this host is passed up only when it came in on loopback (both ends of
// that direction local); one for another host leaves through bpf_redirect_neigh, which
// finds the next hop's address as a sent datagram's would be found.

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
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

// What a matching datagram becomes, and its counts.
struct rewrite {
	struct flow to;
	// Where it goes: 1 (loopback) is up the local stack; any other, out of that
	// interface, to the neighbour its route names.
	__u32 ifindex;
	// Its listener's and direction's counts: an index into COUNTS.
	__u32 counts;
	// The interface such datagrams come in on: elsewhere (a VLAN's parent, a bridge
	// port, a spoofed source) they are not the session's and go on untouched.
	__u32 from_ifindex;
	__u64 datagrams;
	__u64 bytes;
	// bpf_ktime_get_ns (CLOCK_MONOTONIC) of the last one.
	__u64 last_ns;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1 << 18);
	__type(key, struct flow);
	__type(value, struct rewrite);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} FLOWS SEC(".maps");

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

#define IP_DF 0x4000

SEC("classifier")
int udp_kernel(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + ETH_HLEN;
	struct udphdr *udp = data + ETH_HLEN + sizeof(struct iphdr);

	if ((void *)(udp + 1) > end)
		return TC_ACT_UNSPEC;
	if (skb->protocol != bpf_htons(ETH_P_IP) || eth->h_proto != bpf_htons(ETH_P_IP) ||
	    skb->vlan_present)
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
	// Delivered here, it must have come in on loopback: the stack would drop a datagram
	// from a local address arriving on another interface as a martian. Such a one
	// takes the sockets' path, as does one of an entry without an interface.
	if (ifindex == 0 || (ifindex == LOOPBACK && skb->ifindex != LOOPBACK))
		return TC_ACT_UNSPEC;

	// Datagrams coalesced by GRO (or sent with GSO) are one packet with one header here,
	// passed on whole: the stack splits them where it must, headers rewritten.
	__u64 n = 1;
	__u64 ulen = bpf_ntohs(udp->len);
	__u64 headers = ETH_HLEN + sizeof(struct iphdr) + sizeof(struct udphdr);
	__u64 len;
	if (skb->gso_segs > 1) {
		n = skb->gso_segs;
		len = skb->len - headers;
	} else {
		// A length the packet does not hold is the stack's to judge.
		if (ulen < sizeof(struct udphdr) || ulen > skb->len - ETH_HLEN - sizeof(struct iphdr))
			return TC_ACT_UNSPEC;
		len = ulen - sizeof(struct udphdr);
	}
	// Too big for the way out (the sockets' path fragments it, as a sent datagram is).
	if (ifindex != LOOPBACK) {
		__u32 mtu = 0;
		if (bpf_check_mtu(skb, ifindex, &mtu, 0, 0) != BPF_MTU_CHK_RET_SUCCESS)
			return TC_ACT_UNSPEC;
	}

	// A datagram without a checksum (IPv4 allows it) keeps none.
	int sum = udp->check != 0;
	__u16 old_frag = ip->frag_off;
	if (bpf_skb_store_bytes(skb, IP_SRC, &to, 8, 0) < 0)
		return TC_ACT_SHOT;
	if (bpf_skb_store_bytes(skb, UDP_SRC, &to.src_port, 4, 0) < 0)
		return TC_ACT_SHOT;
	bpf_l3_csum_replace(skb, IP_CSUM, from.src_ip, to.src_ip, 4);
	bpf_l3_csum_replace(skb, IP_CSUM, from.dst_ip, to.dst_ip, 4);
	if (sum) {
		__u64 f = BPF_F_PSEUDO_HDR | BPF_F_MARK_MANGLED_0;
		bpf_l4_csum_replace(skb, UDP_CSUM, from.src_ip, to.src_ip, f | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM, from.dst_ip, to.dst_ip, f | 4);
		bpf_l4_csum_replace(skb, UDP_CSUM, from.src_port, to.src_port, BPF_F_MARK_MANGLED_0 | 2);
		bpf_l4_csum_replace(skb, UDP_CSUM, from.dst_port, to.dst_port, BPF_F_MARK_MANGLED_0 | 2);
	}
	// Like ferry's sockets, which let the kernel fragment what they send: a router with a
	// smaller MTU further on fragments it rather than dropping it.
	if (old_frag & bpf_htons(IP_DF)) {
		__u16 new_frag = old_frag & ~bpf_htons(IP_DF);
		if (bpf_skb_store_bytes(skb, IP_FRAG, &new_frag, 2, 0) < 0)
			return TC_ACT_SHOT;
		bpf_l3_csum_replace(skb, IP_CSUM, old_frag, new_frag, 2);
	}

	__sync_fetch_and_add(&r->datagrams, n);
	__sync_fetch_and_add(&r->bytes, len);
	r->last_ns = bpf_ktime_get_ns();
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

char LICENSE[] SEC("license") = "Dual MIT/GPL";
