// SPDX-License-Identifier: (MIT OR GPL-2.0)
/*
 * Bulwark egress filter (DESIGN.md "Layers of defense", item 4).
 *
 * Attached to one Wasm container's cgroup (cgroup v2), these four programs decide every
 * connect() and unconnected sendmsg() of IPv4/IPv6 sockets in that cgroup: a TCP connect to an
 * exact (address, port) in GRANTS is allowed (return 1); everything else, including every UDP
 * connect/sendmsg, is refused with EPERM (return 0). Every decision is counted in COUNTS and
 * every denial is reported through the EVENTS ring buffer. An empty GRANTS denies everything.
 *
 * Self-contained on purpose (no libbpf headers, no skeleton, no global variables): the shim
 * loads it with aya from the bytes of the object, and the maps are plain BTF-defined maps in
 * ".maps" that aya finds by name. Build (shim/build.rs runs the same into OUT_DIR):
 *   clang -O2 -g -target bpf -I/usr/include/x86_64-linux-gnu -c shim/bpf/egress.bpf.c -o egress.bpf.o
 * The layouts below are mirrored by shim/src/egress/bpf.rs (GrantKey, DenialEvent): change both.
 *
 * Not covered by these hooks: raw and ICMP "ping" sockets (no cgroup sock_addr hook runs for
 * them); the workload has no CAP_NET_RAW and its seccomp filter is the layer for those.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/types.h>

#define SEC(name) __attribute__((section(name), used))
#undef __always_inline /* linux/stddef.h defines it as a bare __inline__ */
#define __always_inline inline __attribute__((always_inline))
/* BTF map definition helpers, as libbpf's bpf_helpers.h spells them. */
#define __uint(name, val) int (*name)[val]
#define __type(name, val) typeof(val) *name

/* Helpers by their fixed ids from linux/bpf.h. */
static void *(*bpf_map_lookup_elem)(void *map, const void *key) = (void *)BPF_FUNC_map_lookup_elem;
static __u64 (*bpf_get_current_pid_tgid)(void) = (void *)BPF_FUNC_get_current_pid_tgid;
static void *(*bpf_ringbuf_reserve)(void *ringbuf, __u64 size, __u64 flags) =
	(void *)BPF_FUNC_ringbuf_reserve;
static void (*bpf_ringbuf_submit)(void *data, __u64 flags) = (void *)BPF_FUNC_ringbuf_submit;

#define FAMILY_INET 2   /* AF_INET */
#define FAMILY_INET6 10 /* AF_INET6 */
#define TYPE_STREAM 1   /* SOCK_STREAM */
#define TYPE_DGRAM 2    /* SOCK_DGRAM */

#define COUNT_ALLOWED 0
#define COUNT_DENIED 1
#define COUNT_DROPPED 2

/* 24 bytes, no padding. addr holds the address in network byte order: an IPv4 address in
 * addr[0..4] with the rest zero. port is in host byte order. */
struct grant_key {
	__u32 family;
	__u32 port;
	__u8 addr[16];
};

/* 32 bytes, no padding. One per denial. */
struct denial_event {
	__u32 family;
	__u32 port;
	__u8 addr[16];
	__u32 type; /* SOCK_STREAM, SOCK_DGRAM, ... */
	__u32 pid;  /* thread group id of the caller */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct grant_key);
	__type(value, __u8);
	__uint(max_entries, 256);
} GRANTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 3);
} COUNTS SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 64 * 1024);
} EVENTS SEC(".maps");

static __always_inline void count(__u32 index)
{
	__u64 *value = bpf_map_lookup_elem(&COUNTS, &index);
	if (value)
		__sync_fetch_and_add(value, 1);
}

static __always_inline __u32 port_of(struct bpf_sock_addr *ctx)
{
	/* user_port holds the 16-bit port in network byte order in its first two bytes. */
	__u16 port = (__u16)ctx->user_port;
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
	port = __builtin_bswap16(port);
#endif
	return port;
}

/* The decision, shared by all four programs once the key is filled in. */
static __always_inline int decide(struct bpf_sock_addr *ctx, struct grant_key *key)
{
	__u32 type = ctx->type;

	if (type == TYPE_STREAM && ctx->protocol == IPPROTO_TCP &&
	    bpf_map_lookup_elem(&GRANTS, key)) {
		count(COUNT_ALLOWED);
		return 1;
	}

	count(COUNT_DENIED);
	struct denial_event *event = bpf_ringbuf_reserve(&EVENTS, sizeof(*event), 0);
	if (!event) {
		count(COUNT_DROPPED);
		return 0;
	}
	event->family = key->family;
	event->port = key->port;
	__builtin_memcpy(event->addr, key->addr, sizeof(event->addr));
	event->type = type;
	event->pid = bpf_get_current_pid_tgid() >> 32;
	bpf_ringbuf_submit(event, 0);
	return 0;
}

static __always_inline int check4(struct bpf_sock_addr *ctx)
{
	struct grant_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.family = FAMILY_INET;
	key.port = port_of(ctx);
	__u32 ip4 = ctx->user_ip4;
	__builtin_memcpy(key.addr, &ip4, 4);
	return decide(ctx, &key);
}

static __always_inline int check6(struct bpf_sock_addr *ctx)
{
	struct grant_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.port = port_of(ctx);
	__u32 w0 = ctx->user_ip6[0], w1 = ctx->user_ip6[1];
	__u32 w2 = ctx->user_ip6[2], w3 = ctx->user_ip6[3];
	/* ::ffff:a.b.c.d reaches an IPv4 host: it must match the IPv4 grant, nothing else. The
	 * words are in network byte order, so compare bytes, not host-order integers. */
	__u8 *b2 = (__u8 *)&w2;
	if (w0 == 0 && w1 == 0 && b2[0] == 0 && b2[1] == 0 && b2[2] == 0xff && b2[3] == 0xff) {
		key.family = FAMILY_INET;
		__builtin_memcpy(key.addr, &w3, 4);
	} else {
		key.family = FAMILY_INET6;
		__builtin_memcpy(key.addr, &w0, 4);
		__builtin_memcpy(key.addr + 4, &w1, 4);
		__builtin_memcpy(key.addr + 8, &w2, 4);
		__builtin_memcpy(key.addr + 12, &w3, 4);
	}
	return decide(ctx, &key);
}

SEC("cgroup/connect4")
int egress_connect4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/connect6")
int egress_connect6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

/* Unconnected UDP sends: never granted, but counted and reported like a connect. */
SEC("cgroup/sendmsg4")
int egress_sendmsg4(struct bpf_sock_addr *ctx)
{
	return check4(ctx);
}

SEC("cgroup/sendmsg6")
int egress_sendmsg6(struct bpf_sock_addr *ctx)
{
	return check6(ctx);
}

char LICENSE[] SEC("license") = "Dual MIT/GPL";
