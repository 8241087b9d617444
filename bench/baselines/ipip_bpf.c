// SPDX-License-Identifier: GPL-2.0
/* An in-kernel IPIP (RFC 2003) datapath from eBPF, the "kernel IPIP" baseline
 * on kernels without the ipip module. kernel_ipip.py builds it per (node, peer)
 * with -DLOCAL_IP, -DPEER_IP, -DNODE_NET, -DNODE_MASK (host byte order) and loads
 *   lwt_xmit: `ip route add <peer pod CIDR> encap bpf xmit ... headroom 20`
 *   tc:       clsact ingress, direct action, on the underlay */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/pkt_cls.h>
#include <stddef.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define IP_DF 0x4000
#define IP_MF_OFFSET 0x3fff
#ifndef BPF_F_ADJ_ROOM_DECAP_L3_IPV4
#define BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (1ULL << 7) /* the running kernel has it; Debian's 6.1 uapi lacks it */
#endif

static __always_inline __u16 ip_checksum(const struct iphdr *ip)
{
	const __u16 *w = (const __u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)sizeof(*ip) / 2; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

SEC("lwt_xmit")
int ipip_encap(struct __sk_buff *skb)
{
	struct iphdr inner, outer = {};
	if (bpf_skb_load_bytes(skb, 0, &inner, sizeof(inner)) < 0 || inner.version != 4)
		return BPF_DROP;
	outer.version = 4;
	outer.ihl = 5;
	outer.tot_len = bpf_htons(bpf_ntohs(inner.tot_len) + sizeof(outer));
	outer.id = inner.id;
	outer.frag_off = inner.frag_off & bpf_htons(IP_DF);
	outer.ttl = inner.ttl;
	outer.protocol = IPPROTO_IPIP;
	outer.saddr = bpf_htonl(LOCAL_IP);
	outer.daddr = bpf_htonl(PEER_IP);
	outer.check = ip_checksum(&outer);
	/* Quirk (seen on 6.18): lwt_bpf's GSO branch accepts IPv4-in-IPv4 only
	 * when the pushed protocol is 0, else every TSO packet fails with
	 * -EPROTONOSUPPORT. Push 0, then write 4: the checksum was computed for 4. */
	outer.protocol = 0;
	if (bpf_lwt_push_encap(skb, BPF_LWT_ENCAP_IP, &outer, sizeof(outer)))
		return BPF_DROP;
	__u8 proto = IPPROTO_IPIP;
	if (bpf_skb_store_bytes(skb, offsetof(struct iphdr, protocol), &proto, 1, 0))
		return BPF_DROP;
	return BPF_LWT_REROUTE; /* route the outer header to the peer on the underlay */
}

SEC("tc")
int ipip_decap(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP) || bpf_skb_pull_data(skb, ETH_HLEN + sizeof(struct iphdr) + 1))
		return TC_ACT_OK;
	void *data = (void *)(long)skb->data, *end = (void *)(long)skb->data_end;
	struct iphdr *ip = data + ETH_HLEN;
	__u8 *inner = (__u8 *)(ip + 1);
	if ((void *)(inner + 1) > end)
		return TC_ACT_OK;
	/* IPIP to this node from a node on the underlay, unfragmented, IPv4 inside */
	if (ip->protocol != IPPROTO_IPIP || ip->ihl != 5 || ip->daddr != bpf_htonl(LOCAL_IP) ||
	    (ip->saddr & bpf_htonl(NODE_MASK)) != bpf_htonl(NODE_NET) || (ip->frag_off & bpf_htons(IP_MF_OFFSET)) ||
	    *inner >> 4 != 4)
		return TC_ACT_OK;
	if (bpf_skb_adjust_room(skb, -(int)sizeof(*ip), BPF_ADJ_ROOM_MAC,
				BPF_F_ADJ_ROOM_FIXED_GSO | BPF_F_ADJ_ROOM_DECAP_L3_IPV4))
		return TC_ACT_SHOT;
	return TC_ACT_OK;
}

char _license[] SEC("license") = "GPL";
