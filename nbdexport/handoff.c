/* bootd NBD hand-off: preloaded into qemu-storage-daemon (LD_PRELOAD) so that a connection bootd's
 * gatekeeper has negotiated goes on inside the daemon on the client's own TCP socket: no relay hop.
 *
 * Why: qemu-storage-daemon 7.2 lists every export to any client and cannot tie an export to a client,
 * so bootd does each NBD handshake itself (nbdexport/gatekeeper.py), between the client's TCP socket
 * and a unix connection to the daemon. When the handshake ends both are at the start of the
 * transmission phase. Instead of relaying the two (splicer.c: one more process wake-up per request),
 * bootd gives the client's socket to this library, and the daemon's end of the unix connection is
 * replaced by it (dup3 onto the same fd number) at the daemon's read that brings bootd's token. From then
 * on qemu reads and writes the client's socket itself.
 *
 * The exchange, all from bootd (nbdexport/handoff.py):
 *   1. connect to <dir>/handoff.sock (SOCK_SEQPACKET, made here at load) and send 16 bytes (u64 id,
 *      u32 counter slot or ~0, u32 0) with the client's socket in SCM_RIGHTS;
 *   2. add 1 to the u64 at offset 0 of <dir>/handoff.gen (both map it): "look at handoff.sock";
 *   3. write the 16-byte token "BOOTDSWP" + id into its end of the unix connection and close it.
 * The daemon's coroutine for that connection reads its first request there: it may have started that
 * read before the token came (qemu reads as soon as it has sent the reply to NBD_OPT_GO, while bootd is
 * still relaying that reply), so the token is recognised in what a read returned, never decided before
 * the read (a check before it races with bootd: the token can arrive between the check and the read).
 * A read of a unix connection that returns the token of a pending connection (bootd wrote it alone, in
 * one write, after the socket and the generation: so the socket is pending by then, or on handoff.sock)
 * swaps the fd, and the read is made again on the client's socket, now on the same fd number. A token is
 * never an NBD request (their magic is 0x25609513), and only bootd writes into the daemon's unix
 * connections. Pending sockets not claimed within 30 s are closed.
 *
 * qemu's event loop watches fds by number (poll) or through epoll (above 64 fds); the hand-off happens
 * while the coroutine runs, when qemu has no handler on that fd, and epoll_ctl() is tracked here so a
 * registration that does exist is moved to the new socket.
 *
 * Counting (qemu 7.2's query-blockstats has nothing for NBD exports): each handed connection has a
 * slot in <dir>/handoff.counters (made by bootd, 128 bytes each: bytes and requests read and written,
 * state, export name). What the daemon reads from the client goes through nbdcount.h's parser (the
 * splicer's too); close() marks the slot ended, and bootd folds its counts.
 *
 * Without BOOTD_NBD_HANDOFF in the environment the library does nothing but pass calls through.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include "cfds.h"
#include "nbdcount.h"

#define TOKEN_MAGIC "BOOTDSWP"
#define TOKEN_LEN 16
#define MAX_FD 65536
#define MAX_PENDING 1024
#define PENDING_TTL 30

enum { SLOT_FREE = 0, SLOT_HANDED = 1, SLOT_LIVE = 2, SLOT_ENDED = 3 };

struct slot { /* handoff.py's SLOT */
    uint64_t io[4]; /* nbdcount.h's IO_* order */
    uint32_t state, pad;
    char name[88];
};

struct fdst {
    struct slot *slot; /* a handed connection: counted */
    struct nbd_parse parse;
    int ep; /* the epoll fd it is registered in, or -1 */
    struct epoll_event ev;
};

struct pending {
    uint64_t id;
    int fd;
    int64_t slot;
    time_t t;
};

static ssize_t (*real_recvmsg)(int, struct msghdr *, int);
static int (*real_close)(int);
static int (*real_epoll_ctl)(int, int, int, struct epoll_event *);

static int active, lfd = -1;
static volatile uint64_t *gen;
static uint64_t seen;
static struct slot *slots;
static size_t nslots;
static char dir[4096];
static struct fdst *fds[MAX_FD];
static struct pending pend[MAX_PENDING];
static int npend;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static void *map_file(const char *name, size_t min, int create, size_t *size) {
    char path[4200];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    int fd = open(path, O_RDWR | O_CLOEXEC | (create ? O_CREAT : 0), 0600);
    if (fd < 0)
        return NULL;
    struct stat st;
    if (fstat(fd, &st) < 0 || (st.st_size < (off_t)min && (!create || ftruncate(fd, (off_t)min) < 0))) {
        real_close(fd);
        return NULL;
    }
    size_t len = st.st_size < (off_t)min ? min : (size_t)st.st_size;
    void *m = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    real_close(fd);
    if (m == MAP_FAILED)
        return NULL;
    if (size)
        *size = len;
    return m;
}

static void map_counters(void) {
    if (slots)
        return;
    size_t len = 0;
    slots = map_file("handoff.counters", sizeof(struct slot), 0, &len);
    nslots = slots ? len / sizeof(struct slot) : 0;
}

__attribute__((constructor)) static void init(void) {
    real_recvmsg = dlsym(RTLD_NEXT, "recvmsg");
    real_close = dlsym(RTLD_NEXT, "close");
    real_epoll_ctl = dlsym(RTLD_NEXT, "epoll_ctl");
    const char *d = getenv("BOOTD_NBD_HANDOFF");
    if (!d || !real_recvmsg || !real_close || !real_epoll_ctl || strlen(d) >= sizeof dir - 32)
        return;
    strcpy(dir, d);
    unsetenv("LD_PRELOAD"); /* nothing the daemon starts needs it */
    gen = map_file("handoff.gen", 4096, 1, NULL);
    if (!gen)
        return;
    seen = *gen;
    map_counters();
    for (size_t i = 0; i < nslots; i++) /* a previous daemon's connections ended with it */
        if (slots[i].state == SLOT_HANDED || slots[i].state == SLOT_LIVE)
            __atomic_store_n(&slots[i].state, SLOT_ENDED, __ATOMIC_RELEASE);
    struct sockaddr_un a = {.sun_family = AF_UNIX};
    /* a relative path: the daemon runs in the run directory, and sun_path holds only 107 bytes */
    if (snprintf(a.sun_path, sizeof a.sun_path, "handoff.sock") >= (int)sizeof a.sun_path)
        return;
    char full[4200];
    snprintf(full, sizeof full, "%s/handoff.sock", dir);
    int s = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (s < 0)
        return;
    int cwd = open(".", O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (cwd < 0 || chdir(dir) < 0) {
        real_close(s);
        if (cwd >= 0)
            real_close(cwd);
        return;
    }
    unlink("handoff.sock");
    int ok = bind(s, (struct sockaddr *)&a, sizeof a) == 0 && chmod("handoff.sock", 0600) == 0 && listen(s, 512) == 0;
    if (fchdir(cwd) < 0)
        ok = 0;
    real_close(cwd);
    if (!ok) {
        real_close(s);
        return;
    }
    lfd = s;
    active = 1;
}

static struct fdst *st_get(int fd, int make) {
    if (fd < 0 || fd >= MAX_FD)
        return NULL;
    if (!fds[fd] && make) {
        fds[fd] = calloc(1, sizeof(struct fdst));
        if (fds[fd])
            fds[fd]->ep = -1;
    }
    return fds[fd];
}

static void slot_state(int64_t no, uint32_t state) {
    if (no >= 0 && (size_t)no < nslots)
        __atomic_store_n(&slots[no].state, state, __ATOMIC_RELEASE);
}

static void drop_pending(int i) {
    real_close(pend[i].fd);
    slot_state(pend[i].slot, SLOT_ENDED);
    pend[i] = pend[--npend];
}

#define MAX_WAITING 64
static int waiting[MAX_WAITING], nwait;

/* Read one hand-off message from control connection c. 1: done with c (closed), 0: nothing there yet. */
static int take_message(int c) {
    unsigned char b[16];
    union {
        char buf[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = b, .iov_len = sizeof b};
    struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.buf, .msg_controllen = sizeof u.buf};
    ssize_t n = real_recvmsg(c, &m, MSG_DONTWAIT | MSG_CMSG_CLOEXEC);
    if (n < 0 && (errno == EAGAIN || errno == EINTR))
        return 0; /* accepted before bootd's message arrived: look again at the next generation */
    int got[4];
    int ng = n >= 0 ? scm_fds(&m, got, 4) : 0;
    if (n == 16 && ng == 1 && npend < MAX_PENDING && !(m.msg_flags & MSG_CTRUNC)) {
        uint64_t id;
        uint32_t slot;
        memcpy(&id, b, 8);
        memcpy(&slot, b + 8, 4);
        pend[npend++] = (struct pending){id, got[0], slot == 0xFFFFFFFFu ? -1 : (int64_t)slot, time(NULL)};
    } else {
        for (int k = 0; k < ng; k++)
            real_close(got[k]);
    }
    real_close(c);
    return 1;
}

/* Take the hand-off messages queued on handoff.sock (bootd adds to the generation after each send, so
 * a connection accepted before its message came is read at a later call). Called with mu held. */
static void drain(void) {
    map_counters();
    for (int i = nwait - 1; i >= 0; i--)
        if (take_message(waiting[i]))
            waiting[i] = waiting[--nwait];
    for (;;) {
        int c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (c < 0)
            break;
        if (!take_message(c)) {
            if (nwait < MAX_WAITING)
                waiting[nwait++] = c;
            else
                real_close(c);
        }
    }
}

/* Sockets nobody claimed (bootd died between its message and its token): closed, so the client
 * reconnects. Called with mu held. */
static void expire(void) {
    time_t now = time(NULL);
    for (int i = npend - 1; i >= 0; i--)
        if (now - pend[i].t > PENDING_TTL)
            drop_pending(i);
}

/* Put pending connection i's socket on fd number `fd` (the daemon's end of the unix connection the
 * handshake went through). 0, or -1 (the connection is dropped). Called with mu held. */
static int swap_in(int fd, int i) {
    struct fdst *s = st_get(fd, 1);
    if (!s) {
        drop_pending(i);
        return -1;
    }
    int ep = s->ep;
    if (ep >= 0)
        real_epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
    if (dup3(pend[i].fd, fd, O_CLOEXEC) < 0) {
        if (ep >= 0)
            real_epoll_ctl(ep, EPOLL_CTL_ADD, fd, &s->ev);
        drop_pending(i);
        return -1;
    }
    if (ep >= 0 && real_epoll_ctl(ep, EPOLL_CTL_ADD, fd, &s->ev) < 0)
        s->ep = -1;
    real_close(pend[i].fd);
    s->slot = (pend[i].slot >= 0 && (size_t)pend[i].slot < nslots) ? &slots[pend[i].slot] : NULL;
    s->parse = (struct nbd_parse){.parsing = s->slot != NULL};
    slot_state(pend[i].slot, SLOT_LIVE);
    pend[i] = pend[--npend];
    return 0;
}

/* The daemon's read of `fd` returned `n` bytes that begin with the token magic. The token is taken out
 * of the daemon's hands here, after the read, and never before it: a check made before the read races
 * with bootd, whose token can arrive between the check and the read (the daemon's NBD server starts
 * reading the unix connection as soon as it has sent the reply to NBD_OPT_GO, while bootd is still
 * relaying that reply), and the daemon would then take the token for the start of an NBD request,
 * wait for the rest of it on a connection bootd has closed, and drop the connection, leaving the client
 * with no answer. Returns -2 when these bytes are not a hand-off token (the read stands as it was),
 * else the result of the daemon's read on the client's socket now on `fd` (errno set when -1), or 0
 * (end of file) for a token whose connection is not pending. */
static ssize_t claim(int fd, struct msghdr *msg, int flags, ssize_t n) {
    unsigned char t[TOKEN_LEN];
    size_t got = 0;
    for (size_t i = 0; i < (size_t)msg->msg_iovlen && got < (size_t)n && got < TOKEN_LEN; i++) {
        size_t k = msg->msg_iov[i].iov_len;
        if (k > (size_t)n - got)
            k = (size_t)n - got;
        if (k > TOKEN_LEN - got)
            k = TOKEN_LEN - got;
        memcpy(t + got, msg->msg_iov[i].iov_base, k);
        got += k;
    }
    if (got < 8 || memcmp(t, TOKEN_MAGIC, 8) != 0 || (size_t)n > TOKEN_LEN)
        return -2; /* bootd writes the token alone, in one write, and nothing after it */
    int dom = 0;
    socklen_t dl = sizeof dom;
    if (getsockopt(fd, SOL_SOCKET, SO_DOMAIN, &dom, &dl) < 0 || dom != AF_UNIX)
        return -2; /* a client's TCP stream: never a token, whatever its bytes (the id is 64 random bits anyway) */
    if (got < TOKEN_LEN) { /* a read shorter than the token: the rest came in the same write */
        struct iovec iov = {.iov_base = t + got, .iov_len = TOKEN_LEN - got};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1};
        if (real_recvmsg(fd, &m, MSG_DONTWAIT | MSG_WAITALL) != (ssize_t)(TOKEN_LEN - got))
            return 0;
    }
    uint64_t id;
    memcpy(&id, t + 8, 8);
    pthread_mutex_lock(&mu);
    seen = *gen; /* bootd sent the socket and then added to the generation before it wrote the token */
    drain();
    int found = -1;
    for (int i = 0; i < npend; i++)
        if (pend[i].id == id)
            found = i;
    int ok = found >= 0 && swap_in(fd, found) == 0;
    pthread_mutex_unlock(&mu);
    if (!ok)
        return 0; /* the connection is lost (its message never came, or no fd): the daemon closes it */
    return real_recvmsg(fd, msg, flags);
}

ssize_t recvmsg(int fd, struct msghdr *msg, int flags) {
    if (!real_recvmsg)
        real_recvmsg = dlsym(RTLD_NEXT, "recvmsg");
    if (active && (*gen != seen || npend > 0)) {
        pthread_mutex_lock(&mu);
        if (*gen != seen) {
            seen = *gen;
            drain();
        }
        if (npend > 0)
            expire();
        pthread_mutex_unlock(&mu);
    }
    ssize_t n = real_recvmsg(fd, msg, flags);
    if (active && n >= 8 && !(flags & MSG_PEEK) && msg->msg_iovlen > 0 && msg->msg_iov[0].iov_len >= 8 &&
        memcmp(msg->msg_iov[0].iov_base, TOKEN_MAGIC, 8) == 0) {
        ssize_t r = claim(fd, msg, flags, n);
        if (r != -2)
            n = r;
    }
    struct fdst *s;
    if (n > 0 && !(flags & MSG_PEEK) && fd >= 0 && fd < MAX_FD && (s = fds[fd]) != NULL && s->parse.parsing) {
        size_t left = (size_t)n;
        for (size_t i = 0; i < (size_t)msg->msg_iovlen && left > 0; i++) {
            size_t k = msg->msg_iov[i].iov_len < left ? msg->msg_iov[i].iov_len : left;
            nbd_count(&s->parse, s->slot->io, msg->msg_iov[i].iov_base, k);
            left -= k;
        }
    }
    return n;
}

int close(int fd) {
    if (!real_close)
        real_close = dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAX_FD && fds[fd]) {
        struct fdst *s = fds[fd];
        if (s->slot)
            __atomic_store_n(&s->slot->state, SLOT_ENDED, __ATOMIC_RELEASE);
        s->slot = NULL;
        s->parse.parsing = 0;
        s->ep = -1;
    }
    return real_close(fd);
}

int epoll_ctl(int epfd, int op, int fd, struct epoll_event *ev) {
    if (!real_epoll_ctl)
        real_epoll_ctl = dlsym(RTLD_NEXT, "epoll_ctl");
    int r = real_epoll_ctl(epfd, op, fd, ev);
    if (r == 0 && active) {
        struct fdst *s = st_get(fd, op != EPOLL_CTL_DEL);
        if (s) {
            if (op == EPOLL_CTL_DEL) {
                s->ep = -1;
            } else if (ev) {
                s->ep = epfd;
                s->ev = *ev;
            }
        }
    }
    return r;
}
