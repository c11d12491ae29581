/*
 * agentd-shell, native: agentd-run started under the name agentd-shell (a link or a copy) is the drop-in for the
 * agent's `bash -c CMD` that agentd/data/agentd-shell is as a script, without a shell's start-up before the
 * launcher's (~0.6 ms per command, bench/launch.py). Same rules: with a session token, outside a tool call, `-c CMD
 * [ARGS...]` runs `bash -c CMD [ARGS...]` as its own tool call, with the script's optional hints taken from
 * AGENTD_MEMORY, AGENTD_MEMORY_MAX, AGENTD_TIMEOUT, AGENTD_NETWORK, AGENTD_CPU and AGENTD_TOOL; anything else is
 * plain bash ($AGENTD_BASH, default /bin/bash).
 */
#define _GNU_SOURCE
#include "shell.h"

#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define SHELL_NAME "agentd-shell"
#define DEFAULT_BASH "/bin/bash"

/* The script's hints: environment variable -> agentd-run flag (set and non-empty: passed, never evaluated). */
static const char *const HINTS[][2] = {
    {"AGENTD_MEMORY", "--memory"},   {"AGENTD_MEMORY_MAX", "--memory-max"}, {"AGENTD_TIMEOUT", "--timeout"},
    {"AGENTD_NETWORK", "--network"}, {"AGENTD_CPU", "--cpu"},
};

/* The variable's value when set and non-empty (the script's ${NAME:-}), else `otherwise`. */
static const char *set(const char *name, const char *otherwise) {
    const char *value = getenv(name);
    return value && *value ? value : otherwise;
}

int invoked_as_shell(const char *argv0) {
    const char *base = strrchr(argv0, '/');
    return strcmp(base ? base + 1 : argv0, SHELL_NAME) == 0;
}

char **shell_arguments(int argc, char **argv, int *run_argc) {
    const char *bash = set("AGENTD_BASH", DEFAULT_BASH);
    if (argc < 2 || strcmp(argv[1], "-c") != 0 || !set("AGENTD_SESSION_TOKEN", NULL) ||
        set("AGENTD_IN_TOOL_CALL", NULL)) {
        argv[0] = (char *)bash;
        execv(bash, argv);
        int failed = errno; /* the caller's exit code tells ENOENT (127) from the rest (126), as a shell does */
        fprintf(stderr, SHELL_NAME ": %s: %s\n", bash, strerror(failed));
        errno = failed;
        return NULL;
    }
    size_t hints = sizeof HINTS / sizeof HINTS[0];
    /* agentd-run --tool T [hint flags] -- bash -c ARGS... NULL */
    char **run = calloc(3 + 2 * hints + 3 + (size_t)argc, sizeof *run);
    if (!run) {
        fputs(SHELL_NAME ": out of memory\n", stderr);
        errno = ENOMEM;
        return NULL;
    }
    int n = 0;
    run[n++] = argv[0];
    run[n++] = "--tool";
    run[n++] = (char *)set("AGENTD_TOOL", "bash");
    for (size_t i = 0; i < hints; i++) {
        const char *hint = set(HINTS[i][0], NULL);
        if (hint) {
            run[n++] = (char *)HINTS[i][1];
            run[n++] = (char *)hint;
        }
    }
    run[n++] = "--";
    run[n++] = (char *)bash;
    for (int i = 1; i < argc; i++) run[n++] = argv[i]; /* -c CMD ARGS... */
    run[n] = NULL;
    if (setenv("AGENTD_IN_TOOL_CALL", "1", 1)) {
        fputs(SHELL_NAME ": out of memory\n", stderr);
        errno = ENOMEM;
        return NULL;
    }
    *run_argc = n;
    return run;
}
