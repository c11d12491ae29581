/* agentd-run's command line: the flags of `agentctl run`, turned into a BeginToolCallRequest. */

#include "options.h"

#include <ctype.h>
#include <errno.h>
#include <getopt.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

struct choice {
    const char *name;
    int value;
};

static const struct choice CPU_CLASSES[] = {
    {"background", AGENTD__V1__CPU_CLASS__CPU_CLASS_BACKGROUND},
    {"normal", AGENTD__V1__CPU_CLASS__CPU_CLASS_NORMAL},
    {"interactive", AGENTD__V1__CPU_CLASS__CPU_CLASS_INTERACTIVE},
    {NULL, 0},
};
static const struct choice MEMORY_CLASSES[] = {
    {"low", AGENTD__V1__MEMORY_CLASS__MEMORY_CLASS_LOW},
    {"medium", AGENTD__V1__MEMORY_CLASS__MEMORY_CLASS_MEDIUM},
    {"high", AGENTD__V1__MEMORY_CLASS__MEMORY_CLASS_HIGH},
    {NULL, 0},
};
static const struct choice NETWORKS[] = {
    {"any", AGENTD__V1__NETWORK__NETWORK_ANY},
    {"none", AGENTD__V1__NETWORK__NETWORK_NONE},
    {NULL, 0},
};

enum { OPT_SESSION = 1, OPT_TOOL, OPT_MEMORY, OPT_MEMORY_MAX, OPT_CPU, OPT_CPU_MAX, OPT_PIDS_MAX, OPT_TIMEOUT,
       OPT_NETWORK, OPT_LABEL, OPT_JOIN_SOCKET, OPT_HELP };

static const struct option LONG_OPTIONS[] = {
    {"session", required_argument, NULL, OPT_SESSION},
    {"tool", required_argument, NULL, OPT_TOOL},
    {"memory", required_argument, NULL, OPT_MEMORY},
    {"memory-max", required_argument, NULL, OPT_MEMORY_MAX},
    {"cpu", required_argument, NULL, OPT_CPU},
    {"cpu-max", required_argument, NULL, OPT_CPU_MAX},
    {"pids-max", required_argument, NULL, OPT_PIDS_MAX},
    {"timeout", required_argument, NULL, OPT_TIMEOUT},
    {"network", required_argument, NULL, OPT_NETWORK},
    {"label", required_argument, NULL, OPT_LABEL},
    {"join-socket", required_argument, NULL, OPT_JOIN_SOCKET},
    {"help", no_argument, NULL, OPT_HELP},
    {NULL, 0, NULL, 0},
};

static const char USAGE[] =
    "usage: agentd-run [--session ID] [--tool NAME] [--memory SIZE|low|medium|high] [--memory-max SIZE]\n"
    "                  [--cpu background|normal|interactive] [--cpu-max CPUS] [--pids-max N] [--timeout SECONDS]\n"
    "                  [--network any|none] [--label KEY=VALUE]... [--join-socket PATH] -- COMMAND [ARGS...]\n"
    "Runs COMMAND as its own agentd tool call (session token: $AGENTD_SESSION_TOKEN; join socket:\n"
    "$AGENTD_JOIN_SOCKET, default " DEFAULT_JOIN_SOCKET ").\n";

static int bad(const char *flag, const char *value, const char *why) {
    fprintf(stderr, "agentd-run: --%s %s: %s\n", flag, value, why);
    return -1;
}

static int choose(const struct choice *choices, const char *name, int *value) {
    for (; choices->name; choices++) {
        if (strcasecmp(choices->name, name) == 0) {
            *value = choices->value;
            return 0;
        }
    }
    return -1;
}

/* Bytes from "4096", "512M", "2G", "1.5GiB" (binary suffixes K M G T P, optional "iB"/"B"), as agentd's units. */
int parse_size(const char *text, int64_t *bytes) {
    static const char UNITS[] = "KMGTP";
    char *end;
    while (isspace((unsigned char)*text)) text++;
    if (!isdigit((unsigned char)*text)) return -1;
    errno = 0;
    double number = strtod(text, &end);
    if (errno || end == text || end[-1] == '.') return -1;
    while (isspace((unsigned char)*end)) end++;
    const char *unit = *end ? strchr(UNITS, toupper((unsigned char)*end)) : NULL;
    if (unit) {
        number *= (double)(1ULL << (10 * (unit - UNITS + 1)));
        end++;
    }
    if (toupper((unsigned char)*end) == 'I' && toupper((unsigned char)end[1]) == 'B') end += 2;
    else if (toupper((unsigned char)*end) == 'B') end++;
    while (isspace((unsigned char)*end)) end++;
    if (*end || !isfinite(number) || number >= 9.2e18) return -1;
    *bytes = (int64_t)number;
    return 0;
}

static int parse_number(const char *text, double *value) {
    char *end;
    errno = 0;
    *value = strtod(text, &end);
    return (errno || end == text || *end || !isfinite(*value) || *value < 0) ? -1 : 0;
}

static int add_label(struct options *o, const char *item) {
    const char *eq = strchr(item, '=');
    if (!eq) return bad("label", item, "expects KEY=VALUE");
    if (o->n_labels == MAX_LABELS) return bad("label", item, "too many labels");
    struct label *l = &o->labels[o->n_labels++];
    l->key = strndup(item, (size_t)(eq - item));
    l->value = strdup(eq + 1);
    return l->key && l->value ? 0 : bad("label", item, "out of memory");
}

static int memory(struct options *o, const char *text) {
    int class;
    if (choose(MEMORY_CLASSES, text, &class) == 0) {
        o->memory_class = class;
        o->expected_memory = 0;
        return 0;
    }
    o->memory_class = 0;
    return parse_size(text, &o->expected_memory) == 0 ? 0 : bad("memory", text, "not a size or low|medium|high");
}

static int option(struct options *o, int which, const char *arg) {
    double number;
    int64_t size;
    switch (which) {
    case OPT_SESSION: o->session = arg; return 0;
    case OPT_TOOL: o->tool = arg; return 0;
    case OPT_MEMORY: return memory(o, arg);
    case OPT_MEMORY_MAX:
        if (parse_size(arg, &size)) return bad("memory-max", arg, "not a size (examples: 4096, 512M, 2G)");
        o->memory_max = size;
        return 0;
    case OPT_CPU: return choose(CPU_CLASSES, arg, &o->cpu_class) ? bad("cpu", arg, "background|normal|interactive") : 0;
    case OPT_CPU_MAX:
        if (parse_number(arg, &number)) return bad("cpu-max", arg, "not a number of CPUs");
        o->cpu_max_millicores = (int64_t)llround(number * 1000);
        return 0;
    case OPT_PIDS_MAX:
        if (parse_number(arg, &number) || number != floor(number)) return bad("pids-max", arg, "not a count");
        o->pids_max = (int64_t)number;
        return 0;
    case OPT_TIMEOUT: return parse_number(arg, &o->timeout) ? bad("timeout", arg, "not a number of seconds") : 0;
    case OPT_NETWORK: return choose(NETWORKS, arg, &o->network) ? bad("network", arg, "any|none") : 0;
    case OPT_LABEL: return add_label(o, arg);
    case OPT_JOIN_SOCKET: o->join_socket = arg; return 0;
    default: return -1;
    }
}

int parse_options(int argc, char **argv, struct options *o) {
    const char *env;
    memset(o, 0, sizeof *o);
    o->cpu_class = AGENTD__V1__CPU_CLASS__CPU_CLASS_NORMAL;
    o->network = AGENTD__V1__NETWORK__NETWORK_ANY;
    o->session = (env = getenv("AGENTD_SESSION")) ? env : "";
    o->join_socket = (env = getenv("AGENTD_JOIN_SOCKET")) && *env ? env : DEFAULT_JOIN_SOCKET;
    o->token = getenv("AGENTD_SESSION_TOKEN");
    opterr = 1;
    int which;
    while ((which = getopt_long(argc, argv, "+", LONG_OPTIONS, NULL)) != -1) {
        if (which == OPT_HELP) {
            fputs(USAGE, stdout);
            return 1;
        }
        if (which == '?' || option(o, which, optarg)) {
            fputs(USAGE, stderr);
            return -1;
        }
    }
    if (optind >= argc) {
        fputs("agentd-run: missing command (agentd-run [options] -- COMMAND ARGS...)\n", stderr);
        return -1;
    }
    o->argv = argv + optind;
    o->argc = argc - optind;
    return 0;
}
