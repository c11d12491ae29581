/* The native floor: bench/launch_floor.py's server in C. The same system calls per `agentd-run -- true` call, in
 * the same order (see that file's docstring), from a process with next to no user-space cost of its own: its CPU
 * per call is about what the kernel work alone costs, the least any daemon placing calls this way can spend.
 *
 *   launch-floor-native SOCKET CGROUP_DIR RECORDS [null]    # prints "ready", serves until SIGTERM
 *
 * With `null` it answers without any of the kernel work (the pidfd is closed, nothing placed): what is left is the
 * launcher's own cost, its extra process and its two round trips, which no daemon can take away.
 *
 * Built by bench/launch.py (cc, protobuf-c as for the launcher). A bench tool: no validation, one call per
 * connection, a protocol error ends it. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <sys/xattr.h>
#include <unistd.h>

#include "agentd.pb-c.h"

enum { BEGUN = 129, RESULT = 130, SPARES = 2, MAX_FDS = 4096, READ_SIZE = 66560 };
#define CALL_ID "0123456789abcdef"

static char call_label[420], result_label[700];
static const char started_label[] = "1764745200.123456 12345";

struct spare { char path[4096]; ino_t id; };
struct connection { int sock, events; pid_t sender; struct spare cgroup; };

static int epoll_fd, listener, records;
static const char *root;
static unsigned long made;
static struct spare spares[SPARES];
static int free_spares;
static struct connection *by_fd[MAX_FDS]; /* connections by socket; events fds map to NULL (no-op) */
static volatile sig_atomic_t running = 1;
static int null_mode;

static void die(const char *what) { perror(what); exit(1); }

static void read_small(const char *path) {
    char buffer[4096];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return;
    if (read(fd, buffer, sizeof buffer) < 0) { /* gone meanwhile: as the Python floor, ignored */ }
    close(fd);
}

static void write_small(const char *path, const char *text) {
    int fd = open(path, O_WRONLY | O_CLOEXEC);
    if (fd < 0) die(path);
    if (write(fd, text, strlen(text)) < 0) die(path);
    close(fd);
}

static struct spare make_spare(void) {
    struct spare s;
    struct stat st;
    snprintf(s.path, sizeof s.path, "%s/tc-%lu", root, ++made);
    if (mkdir(s.path, 0755) || stat(s.path, &st)) die(s.path);
    s.id = st.st_ino;
    return s;
}

static void watch(int fd, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.fd = fd};
    if (epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &ev)) die("epoll_ctl");
}

static void send_frame(int sock, int kind, const ProtobufCMessage *message) {
    uint8_t data[4096];
    size_t length = protobuf_c_message_pack(message, data + 5);
    uint32_t size = (uint32_t)length + 1;
    data[0] = size >> 24; data[1] = size >> 16; data[2] = size >> 8; data[3] = size; data[4] = (uint8_t)kind;
    if (send(sock, data, length + 5, MSG_NOSIGNAL) < 0) perror("send");
}

static void accept_one(void) {
    int sock = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (sock < 0) return;
    struct ucred cred;
    socklen_t size = sizeof cred;
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &cred, &size)) die("SO_PEERCRED");
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/cgroup", cred.pid);
    if (!null_mode) read_small(path);
    if (sock >= MAX_FDS) die("too many descriptors");
    struct connection *c = calloc(1, sizeof *c);
    c->sock = sock, c->events = -1, c->sender = cred.pid;
    by_fd[sock] = c;
    watch(sock, EPOLLIN);
}

static void begin(struct connection *c, const uint8_t *payload, size_t length, int pidfd) {
    Agentd__V1__BeginToolCallResponse response = AGENTD__V1__BEGIN_TOOL_CALL_RESPONSE__INIT;
    response.call_id = CALL_ID;
    if (null_mode) {
        close(pidfd);
        send_frame(c->sock, BEGUN, &response.base);
        return;
    }
    Agentd__V1__BeginToolCallRequest *request = agentd__v1__begin_tool_call_request__unpack(NULL, length, payload);
    if (request == NULL) die("BEGIN payload");
    agentd__v1__begin_tool_call_request__free_unpacked(request, NULL);
    char path[4200], info[4096];
    snprintf(path, sizeof path, "/proc/self/fdinfo/%d", pidfd);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    ssize_t got = fd < 0 ? -1 : read(fd, info, sizeof info - 1);
    if (fd >= 0) close(fd);
    char *pid_line = got > 0 ? (info[got] = 0, strstr(info, "\nPid:")) : NULL;
    if (pid_line == NULL) die("pidfd fdinfo");
    pid_t pid = (pid_t)strtol(pid_line + 5, NULL, 10);
    close(pidfd);
    pid_t who[2] = {c->sender, pid};
    for (int i = 0; i < 2; i++) {
        snprintf(path, sizeof path, "/proc/%d/cgroup", who[i]);
        read_small(path);
    }
    c->cgroup = free_spares ? spares[--free_spares] : make_spare(); /* concurrent calls: made now */
    if (setxattr(c->cgroup.path, "trusted.agentd.call", call_label, sizeof call_label, 0)) die("setxattr");
    snprintf(path, sizeof path, "%s/cgroup.events", c->cgroup.path);
    c->events = open(path, O_RDONLY | O_CLOEXEC);
    if (c->events < 0 || c->events >= MAX_FDS) die(path);
    watch(c->events, EPOLLPRI);
    char text[32];
    snprintf(path, sizeof path, "%s/cgroup.procs", c->cgroup.path);
    snprintf(text, sizeof text, "%d", pid);
    write_small(path, text);
    if (pread(c->events, info, sizeof info, 0) < 0) die("pread cgroup.events");
    snprintf(path, sizeof path, "/proc/%d/oom_score_adj", pid);
    write_small(path, "0");
    if (setxattr(c->cgroup.path, "trusted.agentd.started", started_label, sizeof started_label - 1, 0)) die("setxattr");
    send_frame(c->sock, BEGUN, &response.base);
}

static void end(struct connection *c) {
    Agentd__V1__ToolCallResult result = AGENTD__V1__TOOL_CALL_RESULT__INIT;
    result.call_id = CALL_ID;
    result.outcome = AGENTD__V1__OUTCOME__OUTCOME_OK;
    if (null_mode) {
        send_frame(c->sock, RESULT, &result.base);
        return;
    }
    char path[4200];
    snprintf(path, sizeof path, "%s/cpu.stat", c->cgroup.path);
    read_small(path);
    if (setxattr(c->cgroup.path, "trusted.agentd.result", result_label, sizeof result_label, 0)) die("setxattr");
    send_frame(c->sock, RESULT, &result.base);
    char line[sizeof result_label + 1];
    memcpy(line, result_label, sizeof result_label);
    line[sizeof result_label] = '\n';
    if (write(records, line, sizeof line) < 0) die("records");
    epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->events, NULL);
    close(c->events);
    c->events = -1;
    if (rmdir(c->cgroup.path)) die("rmdir");
    if (free_spares < SPARES) spares[free_spares++] = make_spare();
}

static void readable(struct connection *c) {
    static uint8_t data[READ_SIZE];
    char control[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {data, sizeof data};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
    ssize_t got = recvmsg(c->sock, &msg, MSG_CMSG_CLOEXEC);
    if (got < 0 && errno == EAGAIN) return;
    if (got <= 0) {
        epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c->sock, NULL);
        close(c->sock);
        by_fd[c->sock] = NULL;
        free(c);
        return;
    }
    const uint8_t *last = NULL;
    size_t last_length = 0;
    for (size_t at = 0; at + 5 <= (size_t)got;) { /* the last complete frame is the request (HELLO comes first) */
        size_t size = (size_t)data[at] << 24 | (size_t)data[at + 1] << 16 | (size_t)data[at + 2] << 8 | data[at + 3];
        if (size == 0 || at + 4 + size > (size_t)got) break;
        last = data + at + 5, last_length = size - 1;
        at += 4 + size;
    }
    struct cmsghdr *cmsg = CMSG_FIRSTHDR(&msg);
    if (cmsg != NULL && cmsg->cmsg_type == SCM_RIGHTS) {
        int pidfd;
        memcpy(&pidfd, CMSG_DATA(cmsg), sizeof pidfd);
        if (last == NULL) die("BEGIN without a frame");
        begin(c, last, last_length, pidfd);
    } else {
        end(c);
    }
}

static void stop(int sig) { (void)sig; running = 0; }

int main(int argc, char **argv) {
    if (argc != 4 && !(argc == 5 && strcmp(argv[4], "null") == 0)) {
        fprintf(stderr, "usage: %s SOCKET CGROUP_DIR RECORDS [null]\n", argv[0]);
        return 2;
    }
    null_mode = argc == 5;
    root = argv[2];
    memset(call_label, 'c', sizeof call_label);
    memset(result_label, 'r', sizeof result_label);
    records = open(argv[3], O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (records < 0) die(argv[3]);
    epoll_fd = epoll_create1(EPOLL_CLOEXEC);
    listener = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    struct sockaddr_un address = {.sun_family = AF_UNIX};
    snprintf(address.sun_path, sizeof address.sun_path, "%s", argv[1]);
    if (bind(listener, (struct sockaddr *)&address, sizeof address) || listen(listener, 256)) die(argv[1]);
    watch(listener, EPOLLIN);
    for (free_spares = 0; free_spares < SPARES && !null_mode; free_spares++) spares[free_spares] = make_spare();
    struct sigaction action = {.sa_handler = stop};
    sigaction(SIGTERM, &action, NULL);
    printf("ready\n");
    fflush(stdout);
    struct epoll_event events[64];
    while (running) {
        int n = epoll_wait(epoll_fd, events, 64, 1000);
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) accept_one();
            else if (fd < MAX_FDS && by_fd[fd] != NULL) readable(by_fd[fd]);
        }
    }
    for (int i = 0; i < free_spares; i++) rmdir(spares[i].path);
    return 0;
}
