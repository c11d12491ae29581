// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Process lifecycle of the cgroups agentd manages: exec events of agent leaves (auto-capture) and exit events
 * of tool calls (a call's exit status) through a ring buffer, per-cgroup fork/exec/exit counters, and a count
 * of events lost to a full ring buffer. Everything else is only counted: nobody reads a fork event, an exec in
 * a tool call or an exit in an agent leaf, each would cost agentd a callback and a decode (a build execs
 * thousands of processes), and a fork bomb's events would crowd out the exits agentd needs.
 *
 * Only cgroup ids present in the `managed` map are reported; everything else is dropped here after one
 * hash lookup. Threads are ignored: forks count new processes (child pid == tgid) and exits count
 * thread-group leaders. The layouts below are decoded by agentd/kernel/bpf/lifecycle.py.
 *
 * Waking the consumer costs more than everything else here (an irq_work self-IPI, expensive in VMs, and
 * a context switch), so only execs in agent leaves that auto-capture may act on wake it at once: those
 * whose basename (the exec'd filename's last path component, as reported) has its key in `wake_names`,
 * which agentd fills from its capture rules (until it sets `wake_filter`, every exec in an agent leaf
 * wakes). A key is the basename's first WAKE_NAME_LEN - 1 bytes, zero padded, so a longer basename shares
 * the key of its prefix: a spurious wakeup at worst, never a missed one. All other events, other
 * agent-leaf execs included, wait for the consumer's next read, or wake it once WAKEUP_BYTES are pending.
 */
#include "vmlinux.h"
#include <bpf/bpf_core_read.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_tracing.h>

char LICENSE[] SEC("license") = "Dual BSD/GPL";

#define TASK_COMM_LEN 16
#define FILENAME_LEN 256
#define ARGS_LEN 256
#define WAKEUP_BYTES (64 << 10)
#define WAKE_NAME_LEN 16 /* key size of wake_names: up to 15 bytes of a basename and a NUL */
#define CGROUP_AGENT_LEAF 1 /* in managed_cgroup.flags: its execs are reported */
#define CGROUP_TOOL_CALL 2 /* in managed_cgroup.flags: its exits are reported */
/*
 * Capacity of `managed`: every session's agent/ leaf and every running tool call (spares are not added). A
 * full map makes agentd log an error and run those cgroups untracked; agentd_bpf_map_entries/_capacity show
 * the use. Raise it here and rebuild (make -C bpf) for more than ~8,000 sessions plus running calls.
 */
#define MANAGED_MAX_ENTRIES 8192

enum event_type { EV_EXEC = 2, EV_EXIT = 3 }; /* 1 was fork, no longer reported */

/* Value of `managed`: flags set by agentd, counters updated here with atomic adds. */
struct managed_cgroup {
	__u32 flags;
	__u32 _pad;
	__u64 forks;
	__u64 execs;
	__u64 exits;
};

struct event {
	__u8 type;
	__u8 _pad[3];
	__u32 cgroup_flags;
	__u64 ts_ns; /* bpf_ktime_get_ns(): CLOCK_MONOTONIC */
	__u64 cgroup_id;
	__u32 pid;
	__u32 tgid;
	__u32 ppid; /* real_parent's tgid */
	__u32 exit_code; /* exit: task->exit_code, a wait(2) status; else 0 */
	char comm[TASK_COMM_LEN];
	char parent_comm[TASK_COMM_LEN];
};

struct exec_event {
	struct event base;
	__u32 args_size; /* full size of the NUL-separated argv; at most ARGS_LEN bytes are copied */
	__u32 _pad;
	char filename[FILENAME_LEN];
	char args[ARGS_LEN];
};

_Static_assert(sizeof(struct event) == 72, "python decoder expects 72 bytes");
_Static_assert(sizeof(struct exec_event) == 72 + 8 + FILENAME_LEN + ARGS_LEN, "python decoder layout");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, MANAGED_MAX_ENTRIES);
	__type(key, __u64);
	__type(value, struct managed_cgroup);
} managed SEC(".maps");

/* Basenames whose exec in an agent leaf wakes the consumer at once; the value is unused. */
struct wake_name {
	char name[WAKE_NAME_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct wake_name);
	__type(value, __u8);
} wake_names SEC(".maps");

/* Entry 0: nonzero once agentd has filled wake_names; until then every exec in an agent leaf wakes. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u32);
} wake_filter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 20);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, __u64);
} lost_events SEC(".maps");

static __always_inline void *reserve(__u64 size)
{
	void *record = bpf_ringbuf_reserve(&events, size, 0);

	if (!record) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&lost_events, &zero);

		if (lost)
			__sync_fetch_and_add(lost, 1);
	}
	return record;
}

static __always_inline void submit(void *record, bool urgent)
{
	bool backlog = bpf_ringbuf_query(&events, BPF_RB_AVAIL_DATA) >= WAKEUP_BYTES;

	bpf_ringbuf_submit(record, urgent || backlog ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

static __always_inline void fill(struct event *e, __u8 type, struct task_struct *task, __u64 cgroup_id,
				 __u32 cgroup_flags)
{
	struct task_struct *parent = BPF_CORE_READ(task, real_parent);

	e->type = type;
	e->_pad[0] = e->_pad[1] = e->_pad[2] = 0;
	e->cgroup_flags = cgroup_flags;
	e->ts_ns = bpf_ktime_get_ns();
	e->cgroup_id = cgroup_id;
	e->pid = BPF_CORE_READ(task, pid);
	e->tgid = BPF_CORE_READ(task, tgid);
	e->ppid = BPF_CORE_READ(parent, tgid);
	e->exit_code = 0;
	BPF_CORE_READ_STR_INTO(&e->comm, task, comm);
	BPF_CORE_READ_STR_INTO(&e->parent_comm, parent, comm);
}

SEC("tp_btf/sched_process_fork")
int BPF_PROG(on_fork, struct task_struct *parent, struct task_struct *child)
{
	if (BPF_CORE_READ(child, pid) != BPF_CORE_READ(child, tgid))
		return 0; /* a new thread */

	/* The child's cgroup, not current's: clone3(CLONE_INTO_CGROUP) places it elsewhere. */
	__u64 cgroup_id = BPF_CORE_READ(child, cgroups, dfl_cgrp, kn, id);
	struct managed_cgroup *m = bpf_map_lookup_elem(&managed, &cgroup_id);

	if (m)
		__sync_fetch_and_add(&m->forks, 1);
	return 0;
}

/*
 * Whether the basename of filename, a string of size bytes (NUL included) in the event, has its key in
 * wake_names (true while wake_filter is off). The scan runs backwards from the end, so the verifier
 * follows one index rather than every position of the last '/'.
 */
static __always_inline bool wakes(const char *filename, long size)
{
	struct wake_name key = {};
	__u32 zero = 0;
	__u32 *filter = bpf_map_lookup_elem(&wake_filter, &zero);
	long start = 0;

	if (!filter || !*filter)
		return true;
	if (size < 2 || size > FILENAME_LEN)
		return false;
	for (long i = size - 2; i >= 0; i--) {
		if (filename[i & (FILENAME_LEN - 1)] == '/') {
			start = i + 1;
			break;
		}
	}
	/* The first WAKE_NAME_LEN - 1 bytes, NUL-terminated; the rest of key stays zero. */
	bpf_probe_read_kernel_str(key.name, sizeof(key.name), filename + (start & (FILENAME_LEN - 1)));
	return bpf_map_lookup_elem(&wake_names, &key) != NULL;
}

SEC("tp_btf/sched_process_exec")
int BPF_PROG(on_exec, struct task_struct *task, pid_t old_pid, struct linux_binprm *bprm)
{
	__u64 cgroup_id = bpf_get_current_cgroup_id();
	struct managed_cgroup *m = bpf_map_lookup_elem(&managed, &cgroup_id);

	if (!m)
		return 0;
	__sync_fetch_and_add(&m->execs, 1);
	if (!(m->flags & CGROUP_AGENT_LEAF))
		return 0;

	struct exec_event *e = reserve(sizeof(*e));

	if (!e)
		return 0;
	fill(&e->base, EV_EXEC, task, cgroup_id, m->flags);
	e->_pad = 0;
	long filename_size =
		bpf_probe_read_kernel_str(e->filename, sizeof(e->filename), BPF_CORE_READ(bprm, filename));

	/* argv was just copied onto the new stack, so the pages are present. */
	unsigned long arg_start = BPF_CORE_READ(task, mm, arg_start);
	unsigned long arg_end = BPF_CORE_READ(task, mm, arg_end);
	__u64 size = arg_end - arg_start; /* 64-bit, so the verifier sees the clamp on the passed register */

	e->args_size = size;
	if (size > ARGS_LEN)
		size = ARGS_LEN;
	if (bpf_probe_read_user(e->args, size, (void *)arg_start))
		e->args_size = 0;
	submit(e, wakes(e->filename, filename_size));
	return 0;
}

SEC("tp_btf/sched_process_exit")
int BPF_PROG(on_exit, struct task_struct *task)
{
	if (BPF_CORE_READ(task, pid) != BPF_CORE_READ(task, tgid))
		return 0; /* a thread other than the leader */

	/* The old leader killed by a non-leader thread's execve (de_thread) is not a process exit. */
	if (bpf_core_field_exists(task->signal->group_exec_task)) {
		struct task_struct *exec_task = BPF_CORE_READ(task, signal, group_exec_task);

		if (exec_task && exec_task != task)
			return 0;
	}

	__u64 cgroup_id = bpf_get_current_cgroup_id();
	struct managed_cgroup *m = bpf_map_lookup_elem(&managed, &cgroup_id);

	if (!m)
		return 0;
	__sync_fetch_and_add(&m->exits, 1);
	if (!(m->flags & CGROUP_TOOL_CALL))
		return 0;

	struct event *e = reserve(sizeof(*e));

	if (!e)
		return 0;
	fill(e, EV_EXIT, task, cgroup_id, m->flags);
	e->exit_code = BPF_CORE_READ(task, exit_code);
	submit(e, false);
	return 0;
}
