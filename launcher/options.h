/* agentd-run's command line (the flags of `agentctl run`) and environment. */
#ifndef AGENTD_RUN_OPTIONS_H
#define AGENTD_RUN_OPTIONS_H

#include <stdint.h>

#include "agentd.pb-c.h"

#define DEFAULT_JOIN_SOCKET "/run/agentd/join.sock"
#define MAX_LABELS 32 /* agentd's own limit (agentd/core/intents.py MAX_LABELS) */

struct label {
    char *key;
    char *value;
};

struct options {
    const char *session;
    const char *tool;
    int64_t expected_memory;
    int memory_class;
    int64_t memory_max;
    int cpu_class;
    int64_t cpu_max_millicores;
    int64_t pids_max;
    double timeout;
    int network;
    struct label labels[MAX_LABELS];
    size_t n_labels;
    const char *join_socket;
    const char *token;
    char **argv; /* the command: NULL-terminated */
    int argc;
};

/* 0: run o->argv; 1: --help was printed; -1: a usage error was printed. */
int parse_options(int argc, char **argv, struct options *o);
int parse_size(const char *text, int64_t *bytes);

#endif
