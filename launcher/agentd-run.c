/*
 * agentd-run: run a command as its own agentd tool call, the fast way (docs/api.md, "Join socket: framed protocol").
 *
 * It forks the process that will exec the command and holds it on a pipe; sends BEGIN (the API's
 * BeginToolCallRequest, with the child's pidfd) on the join socket; once agentd answers BEGUN the child is in
 * its call's cgroup and is released to exec the command (every signal at its default disposition, none
 * blocked, as from a shell). SIGHUP, SIGINT, SIGQUIT and SIGTERM sent to agentd-run go on to the command
 * through its pidfd, once (a terminal's Ctrl-C already reached it: not again). When the command has exited,
 * END reports its wait status and agentd answers with the ToolCallResult; its feedback goes to stderr when
 * the call did not end OK, and agentd-run exits with the command's code (128 + signal when killed).
 *
 * Exit codes of its own (the command never ran): see EXIT_* below and docs/api.md.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#include "agentd.pb-c.h"
#include "options.h"
#include "shell.h"

enum {
    EXIT_USAGE = 2,        /* bad flags (as agentctl) */
    EXIT_NO_DAEMON = 121,  /* the join socket cannot be reached, or agentd went away before answering */
    EXIT_BAD_TOKEN = 122,  /* no session token, or agentd does not accept it (PERMISSION_DENIED) */
    EXIT_REFUSED = 125,    /* agentd refused the call or failed (as agentctl's EXIT_AGENTD) */
    EXIT_NOT_STARTED = 126 /* the process could not be placed, or could not exec (as a shell; 127: not found) */
};

/* The framed protocol (proto/agentd.proto, above JoinHello). */
enum { FRAME_VERSION = 1, MAX_FRAME = 64 * 1024, HEADER = 5 };
enum { HELLO = 1, BEGIN = 2, END = 3, BEGUN = 129, RESULT = 130, ERROR = 255 };
#define MAX_RECORDED_ARGV_BYTES (32 * 1024) /* argv is for the record only: cut to fit a frame */

static const int FORWARDED[] = {SIGHUP, SIGINT, SIGQUIT, SIGTERM};

struct frame {
    int kind;
    uint8_t *payload;
    size_t length;
};

/* ----- frames ------------------------------------------------------------------------------------------ */

static size_t put_frame(uint8_t *out, int kind, const ProtobufCMessage *message) {
    size_t length = protobuf_c_message_pack(message, out + HEADER);
    uint32_t total = (uint32_t)length + 1;
    out[0] = (uint8_t)(total >> 24);
    out[1] = (uint8_t)(total >> 16);
    out[2] = (uint8_t)(total >> 8);
    out[3] = (uint8_t)total;
    out[4] = (uint8_t)kind;
    return HEADER + length;
}

/* Send bytes with a descriptor attached (SCM_RIGHTS) when fd >= 0. */
static int send_all(int sock, const uint8_t *data, size_t length, int fd) {
    char control[CMSG_SPACE(sizeof(int))];
    while (length) {
        struct iovec iov = {(void *)data, length};
        struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
        if (fd >= 0) {
            memset(control, 0, sizeof control);
            msg.msg_control = control;
            msg.msg_controllen = sizeof control;
            struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
            cmsg->cmsg_level = SOL_SOCKET;
            cmsg->cmsg_type = SCM_RIGHTS;
            cmsg->cmsg_len = CMSG_LEN(sizeof(int));
            memcpy(CMSG_DATA(cmsg), &fd, sizeof(int));
        }
        ssize_t sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        data += sent;
        length -= (size_t)sent;
        fd = -1; /* the descriptor went with the first bytes */
    }
    return 0;
}

static int read_exactly(int sock, uint8_t *buffer, size_t length) {
    while (length) {
        ssize_t got = read(sock, buffer, length);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) return -1;
        buffer += got;
        length -= (size_t)got;
    }
    return 0;
}

/* One frame from agentd (payload malloc'd). A connection agentd refused at once gets a line ("ERR CODE why"):
 * it is turned into an ERROR frame's text in *line. */
static int read_frame(int sock, struct frame *f, char *line, size_t line_size) {
    uint8_t header[HEADER];
    if (read_exactly(sock, header, HEADER)) return -1;
    if (memcmp(header, "ERR ", 4) == 0) {
        size_t n = 0;
        line[n++] = (char)header[4];
        while (n + 1 < line_size && read(sock, line + n, 1) == 1 && line[n] != '\n') n++;
        line[n] = '\0';
        f->kind = -1;
        return 0;
    }
    uint32_t length = (uint32_t)header[0] << 24 | (uint32_t)header[1] << 16 | (uint32_t)header[2] << 8 | header[3];
    if (length < 1 || length > MAX_FRAME) return -1;
    f->kind = header[4];
    f->length = length - 1;
    f->payload = malloc(f->length + 1);
    if (!f->payload || read_exactly(sock, f->payload, f->length)) return -1;
    return 0;
}

/* ----- the held child -------------------------------------------------------------------------------------- */

/* Every signal's disposition back to default, through the kernel directly: glibc's sigaction refuses its two
 * internal signals, and an ignored signal would stay ignored across exec. */
static void default_signals(void) {
    struct { void *handler; unsigned long flags; void *restorer; unsigned long mask; } action = {0};
    for (int sig = 1; sig <= 64; sig++) {
        if (sig != SIGKILL && sig != SIGSTOP) syscall(SYS_rt_sigaction, sig, &action, NULL, sizeof action.mask);
    }
    unsigned long none = 0;
    syscall(SYS_rt_sigprocmask, SIG_SETMASK, &none, NULL, sizeof none);
}

static void child(int go, char **argv) {
    default_signals();
    char answer = 0;
    ssize_t got;
    do got = read(go, &answer, 1); while (got < 0 && errno == EINTR);
    if (got != 1 || answer != 'g') _exit(EXIT_NOT_STARTED); /* agentd refused: never run the command */
    close(go);
    execvp(argv[0], argv);
    int error = errno;
    dprintf(STDERR_FILENO, "agentd-run: %s: %s\n", argv[0], strerror(error));
    _exit(error == ENOENT ? 127 : EXIT_NOT_STARTED);
}

/* ----- signals ------------------------------------------------------------------------------------------ */

static int block_forwarded(sigset_t *set) {
    sigemptyset(set);
    for (size_t i = 0; i < sizeof FORWARDED / sizeof *FORWARDED; i++) sigaddset(set, FORWARDED[i]);
    if (sigprocmask(SIG_BLOCK, set, NULL)) return -1;
    return signalfd(-1, set, SFD_CLOEXEC | SFD_NONBLOCK);
}

/* The terminal sends SIGINT and SIGQUIT to its whole foreground group: the command, still in ours, had it. */
static int should_forward(const struct signalfd_siginfo *info, pid_t pid) {
    int keyboard = info->ssi_signo == SIGINT || info->ssi_signo == SIGQUIT;
    return !(keyboard && info->ssi_code == SI_KERNEL && getpgid(pid) == getpgrp());
}

static void relay(int sigfd, int pidfd, pid_t pid) {
    struct signalfd_siginfo info;
    while (read(sigfd, &info, sizeof info) == sizeof info) {
        if (should_forward(&info, pid)) syscall(SYS_pidfd_send_signal, pidfd, info.ssi_signo, NULL, 0);
    }
}

/* Wait until `fd` is readable (fd < 0: only the child's exit), relaying signals meanwhile. Returns 1 when fd is
 * readable, 0 when the child exited first. */
static int wait_relaying(int fd, int sigfd, int pidfd, pid_t pid) {
    struct pollfd fds[3] = {{pidfd, POLLIN, 0}, {sigfd, POLLIN, 0}, {fd, POLLIN, 0}};
    for (;;) {
        if (poll(fds, fd >= 0 ? 3 : 2, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (fds[1].revents) relay(sigfd, pidfd, pid);
        if (fd >= 0 && fds[2].revents) return 1;
        if (fds[0].revents) return 0;
    }
}

/* ----- results ------------------------------------------------------------------------------------------ */

static void format_size(int64_t bytes, char *out, size_t size) {
    static const char *UNITS[] = {"B", "KiB", "MiB", "GiB", "TiB"};
    if (bytes < 0) {
        snprintf(out, size, "n/a");
        return;
    }
    double value = (double)bytes;
    for (int i = 0; i < 5; i++) {
        if (value < 1024 || i == 4) {
            snprintf(out, size, (i == 0 || value >= 100) ? "%.0f %s" : "%.1f %s", value, UNITS[i]);
            return;
        }
        value /= 1024;
    }
}

static void print_feedback(const Agentd__V1__ToolCallResult *result) {
    const ProtobufCEnumValue *outcome = protobuf_c_enum_descriptor_get_value(&agentd__v1__outcome__descriptor,
                                                                             (int)result->outcome);
    const char *name = outcome ? outcome->name : "UNKNOWN";
    if (strncmp(name, "OUTCOME_", 8) == 0) name += 8;
    char peak[32];
    format_size(result->memory_peak_bytes, peak, sizeof peak);
    fprintf(stderr, "agentd: tool call %s %s (peak memory %s, %.2f s)\nagentd: %s\n", result->call_id, name, peak,
            result->duration_seconds, result->feedback);
}

static int shell_code(int status) {
    return WIFSIGNALED(status) ? 128 + WTERMSIG(status) : WEXITSTATUS(status);
}

/* ----- the call ----------------------------------------------------------------------------------------- */

struct call {
    struct options *o;
    int sock, sigfd, pidfd, go;
    pid_t pid;
    char *call_id;
};

static int connect_join(const char *path) {
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof address.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(address.sun_path, path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    if (connect(sock, (struct sockaddr *)&address, sizeof address)) {
        int error = errno;
        close(sock);
        errno = error;
        return -1;
    }
    return sock;
}

static size_t recorded_argc(char **argv, int argc) {
    size_t total = 0;
    for (int i = 0; i < argc; i++) {
        total += strlen(argv[i]) + 2;
        if (total > MAX_RECORDED_ARGV_BYTES) return (size_t)i;
    }
    return (size_t)argc;
}

/* HELLO and BEGIN in one message, the child's pidfd attached. */
static int send_begin(struct call *c) {
    struct options *o = c->o;
    Agentd__V1__Intent__LabelsEntry entries[MAX_LABELS], *labels[MAX_LABELS];
    for (size_t i = 0; i < o->n_labels; i++) {
        agentd__v1__intent__labels_entry__init(&entries[i]);
        entries[i].key = o->labels[i].key;
        entries[i].value = o->labels[i].value;
        labels[i] = &entries[i];
    }
    const char *base = strrchr(o->argv[0], '/');
    Agentd__V1__Intent intent = AGENTD__V1__INTENT__INIT;
    intent.tool = (char *)(o->tool && *o->tool ? o->tool : base ? base + 1 : o->argv[0]);
    intent.n_argv = recorded_argc(o->argv, o->argc);
    intent.argv = o->argv;
    intent.expected_memory_bytes = o->expected_memory;
    intent.memory_class = o->memory_class;
    intent.memory_max_bytes = o->memory_max;
    intent.cpu_class = o->cpu_class;
    intent.cpu_max_millicores = o->cpu_max_millicores;
    intent.pids_max = o->pids_max;
    intent.timeout_seconds = o->timeout;
    intent.network = o->network;
    intent.n_labels = o->n_labels;
    intent.labels = labels;
    Agentd__V1__BeginToolCallRequest request = AGENTD__V1__BEGIN_TOOL_CALL_REQUEST__INIT;
    request.session_id = (char *)o->session;
    request.intent = &intent;
    request.report_exit = 1;
    Agentd__V1__JoinHello hello = AGENTD__V1__JOIN_HELLO__INIT;
    hello.version = FRAME_VERSION;
    hello.session_token = (char *)o->token;
    size_t room = 2 * HEADER + protobuf_c_message_get_packed_size(&hello.base) +
                  protobuf_c_message_get_packed_size(&request.base);
    if (room > MAX_FRAME) {
        fprintf(stderr, "agentd-run: the declared intent is too large (%zu bytes)\n", room);
        return -1;
    }
    uint8_t *data = malloc(room);
    if (!data) return -1;
    size_t length = put_frame(data, HELLO, &hello.base);
    length += put_frame(data + length, BEGIN, &request.base);
    int failed = send_all(c->sock, data, length, c->pidfd);
    free(data);
    return failed;
}

/* The exit code for an ERROR frame answering BEGIN; prints why. */
static int refused(const uint8_t *payload, size_t length, const char *line) {
    if (line) {
        fprintf(stderr, "agentd-run: agentd refused the connection: %s\n", line);
        return EXIT_REFUSED;
    }
    Agentd__V1__JoinError *error = agentd__v1__join_error__unpack(NULL, length, payload);
    if (!error) {
        fputs("agentd-run: agentd answered with an undecodable error\n", stderr);
        return EXIT_REFUSED;
    }
    int code = EXIT_REFUSED;
    if (error->placement_refused) {
        fprintf(stderr, "agentd-run: could not place the tool call's process: %s: %s\n", error->code, error->message);
        code = EXIT_NOT_STARTED;
    } else {
        fprintf(stderr, "agentd-run: %s: %s\n", error->code, error->message);
        if (strcmp(error->code, "PERMISSION_DENIED") == 0) code = EXIT_BAD_TOKEN;
        if (strcmp(error->code, "UNAVAILABLE") == 0) code = EXIT_NO_DAEMON;
    }
    agentd__v1__join_error__free_unpacked(error, NULL);
    return code;
}

/* The child never ran: stop it (it reads EOF) and say what a shell would. */
static int not_started(struct call *c, int code) {
    int status;
    close(c->go);
    c->go = -1;
    while (waitpid(c->pid, &status, 0) < 0 && errno == EINTR) {}
    if (WIFSIGNALED(status)) {
        fprintf(stderr, "agentd-run: the command was stopped by signal %d before it ran\n", WTERMSIG(status));
        return shell_code(status);
    }
    return code;
}

/* BEGIN -> BEGUN: the child is placed. Returns 0, or the exit code when the command will never run. */
static int begin(struct call *c) {
    if (send_begin(c)) {
        fprintf(stderr, "agentd-run: could not send BEGIN to agentd: %s\n", strerror(errno));
        return not_started(c, EXIT_NO_DAEMON);
    }
    if (!wait_relaying(c->sock, c->sigfd, c->pidfd, c->pid)) return not_started(c, EXIT_NOT_STARTED);
    struct frame f = {0};
    char line[512];
    if (read_frame(c->sock, &f, line, sizeof line)) {
        fputs("agentd-run: agentd closed the join connection without answering\n", stderr);
        return not_started(c, EXIT_NO_DAEMON);
    }
    int code = 0;
    if (f.kind == BEGUN) {
        Agentd__V1__BeginToolCallResponse *begun = agentd__v1__begin_tool_call_response__unpack(NULL, f.length,
                                                                                              f.payload);
        if (begun) {
            c->call_id = strdup(begun->call_id);
            agentd__v1__begin_tool_call_response__free_unpacked(begun, NULL);
        }
        if (!c->call_id) code = not_started(c, EXIT_REFUSED);
    } else {
        code = not_started(c, refused(f.payload, f.length, f.kind == -1 ? line : NULL));
    }
    free(f.payload);
    return code;
}

static void release(struct call *c) {
    ssize_t sent;
    do sent = write(c->go, "g", 1); while (sent < 0 && errno == EINTR);
    close(c->go); /* a child killed meanwhile: EPIPE (ignored); its wait status tells */
    c->go = -1;
}

/* END with the wait status -> RESULT; prints the feedback unless the call ended OK. */
static void end(struct call *c, int status) {
    Agentd__V1__EndToolCallRequest request = AGENTD__V1__END_TOOL_CALL_REQUEST__INIT;
    request.call_id = c->call_id;
    request.has_exit_status = 1;
    request.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : 0;
    request.exit_signal = WIFSIGNALED(status) ? WTERMSIG(status) : 0;
    uint8_t data[HEADER + 512];
    if (protobuf_c_message_get_packed_size(&request.base) > sizeof data - HEADER) return;
    size_t length = put_frame(data, END, &request.base);
    struct frame f = {0};
    char line[512];
    if (send_all(c->sock, data, length, -1) || read_frame(c->sock, &f, line, sizeof line) || f.kind == -1) {
        fputs("agentd-run: could not report the end to agentd (its record has the exit status from the kernel)\n",
              stderr);
    } else if (f.kind == RESULT) {
        Agentd__V1__ToolCallResult *result = agentd__v1__tool_call_result__unpack(NULL, f.length, f.payload);
        if (result && result->outcome != AGENTD__V1__OUTCOME__OUTCOME_OK &&
            result->outcome != AGENTD__V1__OUTCOME__OUTCOME_EXITED)
            print_feedback(result);
        if (result) agentd__v1__tool_call_result__free_unpacked(result, NULL);
    } else {
        refused(f.payload, f.length, NULL);
    }
    free(f.payload);
}

static int start(struct call *c) {
    int go[2];
    if (pipe2(go, O_CLOEXEC)) return -1;
    c->pid = fork();
    if (c->pid < 0) return -1;
    if (c->pid == 0) {
        close(go[1]);
        child(go[0], c->o->argv);
    }
    close(go[0]);
    c->go = go[1];
    c->pidfd = (int)syscall(SYS_pidfd_open, c->pid, 0);
    return c->pidfd < 0 ? -1 : 0;
}

int main(int argc, char **argv) {
    if (invoked_as_shell(argv[0])) {
        argv = shell_arguments(argc, argv, &argc); /* or it became plain bash */
        if (!argv) return errno == ENOENT ? 127 : EXIT_NOT_STARTED;
    }
    struct options o;
    int parsed = parse_options(argc, argv, &o);
    if (parsed) return parsed > 0 ? 0 : EXIT_USAGE;
    if (!o.token || !*o.token) {
        fputs("agentd-run: no session token ($AGENTD_SESSION_TOKEN)\n", stderr);
        return EXIT_BAD_TOKEN;
    }
    struct call c = {.o = &o, .go = -1, .pidfd = -1};
    c.sock = connect_join(o.join_socket);
    if (c.sock < 0) {
        fprintf(stderr, "agentd-run: cannot reach agentd's join socket %s: %s\n", o.join_socket, strerror(errno));
        return EXIT_NO_DAEMON;
    }
    sigset_t forwarded;
    c.sigfd = block_forwarded(&forwarded);
    if (c.sigfd < 0 || start(&c)) {
        fprintf(stderr, "agentd-run: cannot start the command: %s\n", strerror(errno));
        return c.pid > 0 ? not_started(&c, EXIT_NOT_STARTED) : EXIT_NOT_STARTED;
    }
    int code = begin(&c);
    if (code) return code;
    release(&c);
    wait_relaying(-1, c.sigfd, c.pidfd, c.pid);
    int status;
    while (waitpid(c.pid, &status, 0) < 0 && errno == EINTR) {}
    end(&c, status);
    return shell_code(status);
}
