/* agentd-run under the name agentd-shell: the `bash -c` drop-in (shell.c). */
#ifndef AGENTD_RUN_SHELL_H
#define AGENTD_RUN_SHELL_H

/* Whether argv[0] names agentd-shell. */
int invoked_as_shell(const char *argv0);

/* agentd-run's own arguments for `agentd-shell ARGS...` when it is a tool call (*run_argc set); otherwise it execs
 * plain bash and returns NULL only if that failed (or on no memory), having said why. */
char **shell_arguments(int argc, char **argv, int *run_argc);

#endif
