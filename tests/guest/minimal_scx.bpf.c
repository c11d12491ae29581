// SPDX-License-Identifier: GPL-2.0
/*
 * The smallest sched_ext scheduler: a name and no callbacks, so the kernel queues every task on its global
 * FIFO. tests/guest/test_testbed_kernel.py registers it to show that the kernel's sched_ext class really
 * works (the file /sys/kernel/sched_ext/state alone only says that the class is compiled in).
 *
 * Only the member it sets is declared: libbpf matches struct_ops members to the kernel's BTF by name, so no
 * vmlinux.h is needed (and compiling stays quick under TCG).
 */

struct sched_ext_ops {
	char name[128];
};

__attribute__((section(".struct_ops.link"), used))
struct sched_ext_ops agentd_minimal = {
	.name = "agentd_minimal",
};

char _license[] __attribute__((section("license"), used)) = "GPL";
