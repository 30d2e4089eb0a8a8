/* bootd NBD splicer: the data path of NBD connections after bootd's gatekeeper has done the handshake,
 * when they are not handed into the storage daemon itself (handoff.c: the default; this is the fallback).
 *
 * bootd (nbdexport/gatekeeper.py) negotiates each NBD connection in Python, then passes the two file
 * descriptors (client TCP socket, qemu-storage-daemon unix socket) over the control socket (a
 * SOCK_SEQPACKET socket whose fd number is argv[1]) with SCM_RIGHTS. From then on this process moves
 * the bytes both ways, non-blocking under one edge-triggered epoll, so the data never enters Python.
 * Each direction is copied through a buffer of its own (recv + send: measured here as fast as or faster
 * than splice(2) through a pipe, and it lets the requests be counted); splice through pipes is the
 * fallback when a buffer cannot be allocated. A connection ends (both sockets closed) when either side
 * closes or fails; bytes already read from the closing side are delivered first.
 *
 * Per-export I/O counts (qemu 7.2's query-blockstats has none for NBD exports): the NBD request headers
 * of the client->daemon direction are parsed on the way (28 bytes: magic, flags, type, handle, offset,
 * length; a WRITE's payload follows), and the bytes and requests of READ and WRITE are added to the
 * connection's slot in a shared counter array (a memfd bootd passes as argv[2], 32 bytes per slot,
 * written only here, read by bootd). When a connection ends its slot number goes back to bootd on the
 * control socket (4 bytes), so bootd folds the final counts into the export's totals.
 *
 * When the control socket closes (bootd stopped or was killed) no new connections come; the process
 * keeps serving the ones it has and exits when the last one ends. Compiled at run time by bootd
 * (gcc -O2) into the disks run directory.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include "cfds.h"
#include "nbdcount.h"

#define PIPE_SIZE (1 << 20)
#define MAX_EVENTS 256
#define C2S_BUF (128 * 1024)
#define S2C_BUF (256 * 1024)

struct slot { /* one per connection in the shared counter array; bootd reads it */
    uint64_t io[4]; /* nbdcount.h's IO_* order */
};
static struct slot *slots;
static size_t nslots;

struct conn;
struct end {
    struct conn *c; /* NULL: the control socket */
    int side;
};
struct conn {
    int fd[2];      /* 0: client, 1: storage daemon */
    int pr[2], pw[2]; /* pipe of direction d (fd[d] -> fd[1-d]): read end, write end */
    size_t pend[2]; /* bytes in the pipe of direction d */
    size_t cap;
    int dead;
    /* both directions are copied through a buffer (client -> daemon: so the NBD requests can be counted);
     * splice() through the pipes is the fallback when a buffer cannot be had */
    unsigned char *buf[2];
    size_t blen[2], boff[2];
    struct slot *slot; /* NULL: not counted */
    long slot_no;
    struct nbd_parse parse; /* the client's requests, counted into slot */
    struct end e[2];
    int armed[2]; /* EPOLLOUT asked for on fd[i]: only while data waits for it (see arm()) */
    struct conn *next_dead;
};

static int ep, ctl = -1, nconns;
static struct conn *dead_list;
static struct end ctl_end = {NULL, 0};

static void conn_close(struct conn *c) {
    if (c->dead)
        return;
    c->dead = 1;
    for (int i = 0; i < 2; i++) {
        epoll_ctl(ep, EPOLL_CTL_DEL, c->fd[i], NULL);
        close(c->fd[i]);
        close(c->pr[i]);
        close(c->pw[i]);
    }
    nconns--;
    if (c->slot_no >= 0 && ctl >= 0) {
        uint32_t no = (uint32_t)c->slot_no;
        send(ctl, &no, sizeof no, MSG_DONTWAIT | MSG_NOSIGNAL);
    }
    free(c->buf[0]);
    free(c->buf[1]);
    c->buf[0] = c->buf[1] = NULL;
    c->next_dead = dead_list;
    dead_list = c;
}

/* Move what can be moved in direction d now. 0: would block, -1: EOF or error (end the connection). */
static int pump(struct conn *c, int d) {
    int in = c->fd[d], out = c->fd[1 - d];
    for (;;) {
        if (c->pend[d] > 0) {
            ssize_t n = splice(c->pr[d], NULL, out, NULL, c->pend[d], SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (n > 0) {
                c->pend[d] -= (size_t)n;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && errno == EAGAIN)
                return 0; /* backpressure: EPOLLOUT on `out` brings us back */
            return -1;
        }
        ssize_t n = splice(in, NULL, c->pw[d], NULL, c->cap, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
        if (n > 0) {
            c->pend[d] += (size_t)n;
            continue;
        }
        if (n == 0)
            return -1; /* EOF, the pipe is empty: everything read was delivered */
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            return 0;
        return -1;
    }
}

/* Direction d through its buffer (client -> daemon counted). Same contract as pump(). Unless `drain`,
 * a short read that was all sent ends the turn without the recv that would only say EAGAIN: a short read
 * of a stream socket took all there was, and whatever comes later (data or the end) is a new edge. */
static int pump_buf(struct conn *c, int d, int drain) {
    int in = c->fd[d], out = c->fd[1 - d];
    size_t cap = d == 0 ? C2S_BUF : S2C_BUF;
    for (;;) {
        if (c->blen[d] > c->boff[d]) {
            ssize_t w = send(out, c->buf[d] + c->boff[d], c->blen[d] - c->boff[d], MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w > 0) {
                c->boff[d] += (size_t)w;
                continue;
            }
            if (w < 0 && errno == EINTR)
                continue;
            if (w < 0 && errno == EAGAIN)
                return 0;
            return -1;
        }
        c->blen[d] = c->boff[d] = 0;
        ssize_t n = recv(in, c->buf[d], cap, MSG_DONTWAIT);
        if (n > 0) {
            if (d == 0 && c->slot)
                nbd_count(&c->parse, c->slot->io, c->buf[0], (size_t)n);
            c->blen[d] = (size_t)n;
            ssize_t w = send(out, c->buf[d], (size_t)n, MSG_DONTWAIT | MSG_NOSIGNAL);
            if (w == n && (size_t)n < cap && !drain) {
                c->blen[d] = 0;
                return 0;
            }
            if (w > 0)
                c->boff[d] = (size_t)w;
            else if (w < 0 && errno != EAGAIN && errno != EINTR)
                return -1;
            continue;
        }
        if (n == 0)
            return -1;
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN)
            return 0;
        return -1;
    }
}

static int pending(struct conn *c, int d) { return c->buf[d] ? c->blen[d] > c->boff[d] : c->pend[d] > 0; }

/* EPOLLOUT on fd[i] only while data waits for it. A unix socket signals "writable" each time its peer
 * reads (qemu-storage-daemon, once per request), so asking for it all the time would wake this process
 * once more per request for nothing. Arming with EPOLL_CTL_MOD re-checks readiness: no edge is lost. */
static void arm(struct conn *c, int i, int on) {
    if (c->armed[i] == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET | (on ? EPOLLOUT : 0), .data.ptr = &c->e[i]};
    if (epoll_ctl(ep, EPOLL_CTL_MOD, c->fd[i], &ev) == 0)
        c->armed[i] = on;
}

static int move(struct conn *c, int d, int drain) {
    int r = c->buf[d] ? pump_buf(c, d, drain) : pump(c, d);
    if (r == 0 && pending(c, d))
        arm(c, 1 - d, 1); /* the other side is full: come back when it can take more */
    return r;
}

static void service(struct conn *c) {
    if (c->dead)
        return;
    if (move(c, 0, 1) < 0 || move(c, 1, 1) < 0)
        conn_close(c);
}

static void set_nonblock(int fd) {
    int fl = fcntl(fd, F_GETFL);
    if (fl >= 0)
        fcntl(fd, F_SETFL, fl | O_NONBLOCK);
}

static void add_conn(int a, int b, long slot_no) {
    struct conn *c = calloc(1, sizeof *c);
    if (!c)
        goto fail;
    c->slot_no = -1;
    c->buf[0] = malloc(C2S_BUF);
    c->buf[1] = malloc(S2C_BUF);
    if (c->buf[0] && slot_no >= 0 && (size_t)slot_no < nslots) {
        c->slot_no = slot_no;
        c->slot = &slots[slot_no];
        memset(c->slot, 0, sizeof *c->slot);
        c->parse.parsing = 1;
    }
    c->fd[0] = a;
    c->fd[1] = b;
    c->pr[0] = c->pr[1] = c->pw[0] = c->pw[1] = -1;
    for (int d = 0; d < 2; d++) {
        int p[2];
        if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
            for (int i = 0; i < d; i++) {
                close(c->pr[i]);
                close(c->pw[i]);
            }
            free(c->buf[0]);
            free(c->buf[1]);
            free(c);
            goto fail;
        }
        c->pr[d] = p[0];
        c->pw[d] = p[1];
        fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE); /* best effort; the size actually got is read below */
    }
    int sz = fcntl(c->pw[0], F_GETPIPE_SZ);
    int sz1 = fcntl(c->pw[1], F_GETPIPE_SZ);
    c->cap = (size_t)(sz > 0 && sz1 > 0 ? (sz < sz1 ? sz : sz1) : 65536);
    nconns++;
    for (int i = 0; i < 2; i++) {
        set_nonblock(c->fd[i]);
        c->e[i].c = c;
        c->e[i].side = i;
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | EPOLLET, .data.ptr = &c->e[i]};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd[i], &ev) < 0) {
            conn_close(c);
            return;
        }
    }
    service(c);
    return;
fail:
    close(a);
    close(b);
}

/* One message from bootd: 'c' (not counted) or 's' + u32 slot (little-endian), with SCM_RIGHTS
 * [client fd, daemon fd]. 0: go on, -1: control closed. */
static int read_ctl(void) {
    unsigned char byte[8];
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = byte, .iov_len = sizeof byte};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (n == 0)
        return -1;
    int fds[4];
    int nfds = scm_fds(&msg, fds, 4);
    long slot_no = -1;
    if (n == 5 && byte[0] == 's')
        slot_no = (long)((uint32_t)byte[1] | (uint32_t)byte[2] << 8 | (uint32_t)byte[3] << 16 | (uint32_t)byte[4] << 24);
    if (nfds == 2 && !(msg.msg_flags & MSG_CTRUNC)) {
        add_conn(fds[0], fds[1], slot_no);
    } else {
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
    }
    return 0;
}

int main(int argc, char **argv) {
    if (argc != 2 && argc != 3) {
        fprintf(stderr, "usage: %s CONTROL-FD [COUNTERS-FD]\n", argv[0]);
        return 2;
    }
    if (argc == 3) {
        int cfd = atoi(argv[2]);
        struct stat st;
        if (fstat(cfd, &st) == 0 && st.st_size >= (off_t)sizeof(struct slot)) {
            void *m = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, cfd, 0);
            if (m != MAP_FAILED) {
                slots = m;
                nslots = (size_t)st.st_size / sizeof(struct slot);
            } else {
                perror("counters");
            }
        }
        close(cfd);
    }
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    ctl = atoi(argv[1]);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = &ctl_end};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, ctl, &cev) < 0) {
        perror("control socket");
        return 1;
    }
    struct epoll_event evs[MAX_EVENTS];
    for (;;) {
        if (ctl < 0 && nconns == 0)
            return 0;
        int n = epoll_wait(ep, evs, MAX_EVENTS, -1);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        for (int i = 0; i < n; i++) {
            struct end *e = evs[i].data.ptr;
            if (e->c == NULL) {
                if (ctl >= 0 && read_ctl() < 0) { /* bootd gone: serve what we have, then exit */
                    epoll_ctl(ep, EPOLL_CTL_DEL, ctl, NULL);
                    close(ctl);
                    ctl = -1;
                }
                continue;
            }
            struct conn *c = e->c;
            uint32_t ev = evs[i].events;
            int s = e->side;
            if (c->dead)
                continue;
            /* readable (or closing): move fd[s]'s data on; writable: finish what waits for fd[s] */
            int r = 0;
            if (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
                r = move(c, s, (ev & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) != 0);
            if (r == 0 && (ev & EPOLLOUT)) {
                if (pending(c, 1 - s))
                    r = move(c, 1 - s, 1);
                if (r == 0 && !pending(c, 1 - s))
                    arm(c, s, 0);
            }
            if (r < 0 || (ev & (EPOLLERR | EPOLLHUP)))
                conn_close(c);
        }
        while (dead_list) {
            struct conn *c = dead_list;
            dead_list = c->next_dead;
            free(c);
        }
    }
}
