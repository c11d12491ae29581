// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Outbound network policy per cgroup: connect(2) and unconnected sendmsg(2) on IPv4/IPv6 sockets fail
 * with EPERM for tasks whose cgroup has a deny policy in `policies`; tasks in other cgroups are allowed.
 *
 * Attached once (BPF links are always multi-attach on cgroups) at a cgroup whose subtree holds the
 * policed cgroups; these hooks run for sockets created inside that subtree. The policy is looked up by
 * the calling task's own cgroup id, so it covers exactly that (leaf) cgroup. agentd creates the
 * `denials` entry with the policy; denied attempts are counted there.
 */
#include "vmlinux.h"
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define VERDICT_ALLOW 1
#define VERDICT_DENY 0 /* the syscall fails with EPERM */

enum policy { POLICY_DENY_ALL = 1, POLICY_DENY_EXCEPT_LOOPBACK = 2 };

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u32);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 8192);
	__type(key, __u64);
	__type(value, __u64);
} denials SEC(".maps");

static __always_inline int decide(bool loopback)
{
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	__u32 *policy = bpf_map_lookup_elem(&policies, &cgroup_id);

	if (!policy || (loopback && *policy == POLICY_DENY_EXCEPT_LOOPBACK))
		return VERDICT_ALLOW;

	__u64 *count = bpf_map_lookup_elem(&denials, &cgroup_id);

	if (count)
		__sync_fetch_and_add(count, 1);
	return VERDICT_DENY;
}

static __always_inline bool ip4_loopback(__u32 addr)
{
	return (bpf_ntohl(addr) >> 24) == 127; /* 127.0.0.0/8 */
}

static __always_inline bool ip6_loopback(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip6[0] || ctx->user_ip6[1])
		return false;
	if (!ctx->user_ip6[2])
		return ctx->user_ip6[3] == bpf_htonl(1); /* ::1 */
	return ctx->user_ip6[2] == bpf_htonl(0xffff) && ip4_loopback(ctx->user_ip6[3]); /* ::ffff:127.x */
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
	return decide(ip4_loopback(ctx->user_ip4));
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
	return decide(ip6_loopback(ctx));
}

SEC("cgroup/sendmsg4")
int sendmsg4(struct bpf_sock_addr *ctx)
{
	return decide(ip4_loopback(ctx->user_ip4));
}

SEC("cgroup/sendmsg6")
int sendmsg6(struct bpf_sock_addr *ctx)
{
	return decide(ip6_loopback(ctx));
}
