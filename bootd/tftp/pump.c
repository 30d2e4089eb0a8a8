/* bootd TFTP data pump: the data phase of read transfers of disk files, in C.
 *
 * bootd (bootd/tftp/server.py) keeps all policy in Python: request parsing, path confinement,
 * providers, option negotiation, limits and boot events. Once a transfer of a real file is set up it
 * passes, over the control socket (a SOCK_SEQPACKET socket whose fd number is argv[1]), one message:
 *
 *   'S' + START (see struct layout in pump.py: id, size, blksize, windowsize, retries, OACK length,
 *   first retransmission timeout, backoff cap, session timeout) + the OACK datagram (may be empty)
 *   with SCM_RIGHTS [session socket (connected to the client), file fd]
 *
 * and this process does what bootd/tftp/session.py's ReadSession does for the data phase, for all
 * sessions under one epoll loop: the OACK (retransmitted until ACK 0) or the first window, DATA
 * blocks of blksize read with preadv from the file, windowsize blocks in flight (RFC 7440), 16-bit
 * block numbers that roll over from 65535 to 0, ACKs inside a window (continue from there), duplicate
 * ACKs (never answered in lock-step; with a window the window is resent once, further repeats are
 * left to the timer: no Sorcerer's Apprentice), retransmission with exponential backoff, a give-up
 * after `retries` retransmissions or `session_timeout` without progress (ERROR to the client; the timer
 * never fires later than that, whatever `timeout` up to 255 s the client negotiated), an
 * ERROR from the client, an ICMP port unreachable, and the final short (possibly empty) block.
 *
 * Reads are plain preadv(2) in this loop: a read from a cold disk stalls the pump (never bootd's event
 * loop) for that long; boot files are in the page cache after the first client, and POSIX_FADV_SEQUENTIAL
 * widens the kernel's read-ahead for the rest.
 *
 * Speed: every session has a ring of 2*windowsize pre-built DATA packets (4-byte header + payload in
 * one buffer, allocated once per session). After a window is sent the next one is read ahead, so an
 * ACK costs one recv and one send (sendmmsg for a window). Timers are one lazy min-heap.
 *
 * When a session ends, one message goes back: 'E' + END (id, outcome, bytes acknowledged, end time on
 * CLOCK_MONOTONIC, retransmits, duplicate ACKs, blocks sent, ignored datagrams). When the control
 * socket closes (bootd stopping, or gone), every session gets ERROR "server shutting down" and the
 * process exits. Compiled at run time by bootd (gcc -O2) into its run directory.
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
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "cfds.h"

#define OP_DATA 3
#define OP_ACK 4
#define OP_ERROR 5

enum { OUT_COMPLETE = 0, OUT_TIMEOUT = 1, OUT_CLIENT_ERROR = 2, OUT_ABORTED = 3, OUT_UNREACHABLE = 4 };
enum { ST_WAIT_OACK_ACK = 1, ST_TRANSFER = 2, ST_DONE = 3 };

#define MAX_EVENTS 256
#define MAX_BATCH 64     /* datagrams per sendmmsg */
#define CTL_MAX 2048

/* START: little-endian, no padding ('<QQIIIIddd' in Python) */
#define START_LEN (8 + 8 + 4 + 4 + 4 + 4 + 8 + 8 + 8)
/* END: '<QIQdQQQQ' */
#define END_LEN (8 + 4 + 8 + 8 + 8 + 8 + 8 + 8)

struct sess {
    uint64_t id;
    int sock, file;
    uint64_t size;
    uint32_t blksize, window, max_retries;
    double rto_base, rto, max_timeout, session_timeout;
    int state;
    uint64_t base, next, last_block; /* absolute block numbers, never wrap */
    int dup_resent;
    uint32_t retries;
    double last_progress, deadline; /* deadline 0: none */
    uint8_t *oack;
    size_t oack_len;
    uint32_t nslots;
    size_t slot;     /* blksize + 4 */
    uint8_t *ring;   /* nslots packets */
    uint64_t *tag;   /* block held by each slot (0: none) */
    uint64_t bytes_acked, blocks_sent, retransmits, dup_acks, ignored;
    /* timer heap */
    int armed, heap_refs;
    double heap_at;
    int dead;
    struct sess *next_dead;
    int listed; /* on dead_list */
};

struct hent {
    double at;
    struct sess *s;
};

static int ep, ctl = -1, nsess;
static int ctl_marker;
static struct hent *heap;
static size_t heap_n, heap_cap;
static struct sess **all;    /* live sessions, for the shutdown */
static size_t all_n, all_cap;
static uint8_t *pending;     /* END messages the control socket could not take yet */
static size_t pending_n, pending_cap;
static uint8_t recvbuf[2048];
static struct sess *dead_list; /* finished this round: freed at its end unless the heap still points at them */

static double mono(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* -- timer heap (lazy: a later deadline leaves the entry alone; a stale entry is skipped) -------------- */
static void heap_push(double at, struct sess *s) {
    if (heap_n == heap_cap) {
        size_t cap = heap_cap ? heap_cap * 2 : 256;
        struct hent *h = realloc(heap, cap * sizeof *h);
        if (!h) {
            perror("tftp-pump: heap");
            exit(1);
        }
        heap = h;
        heap_cap = cap;
    }
    size_t i = heap_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (heap[p].at <= at)
            break;
        heap[i] = heap[p];
        i = p;
    }
    heap[i].at = at;
    heap[i].s = s;
    s->heap_refs++;
}

static struct hent heap_pop(void) {
    struct hent top = heap[0];
    struct hent last = heap[--heap_n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= heap_n)
            break;
        if (c + 1 < heap_n && heap[c + 1].at < heap[c].at)
            c++;
        if (last.at <= heap[c].at)
            break;
        heap[i] = heap[c];
        i = c;
    }
    if (heap_n)
        heap[i] = last;
    top.s->heap_refs--;
    return top;
}

static void set_deadline(struct sess *s, double d) {
    s->deadline = d;
    if (d > 0 && (!s->armed || d < s->heap_at)) {
        heap_push(d, s);
        s->heap_at = d;
        s->armed = 1;
    }
}

/* ReadSession._arm: the retransmission interval, but never past session_timeout after the last progress */
static void arm(struct sess *s, double now) {
    double retransmit_at = now + s->rto;
    double give_up_at = s->last_progress + s->session_timeout;
    set_deadline(s, retransmit_at < give_up_at ? retransmit_at : give_up_at);
}

/* -- control socket ------------------------------------------------------------------------------------- */
static void flush_pending(void) {
    size_t off = 0;
    while (off < pending_n && ctl >= 0) {
        ssize_t n = send(ctl, pending + off, 1 + END_LEN, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            break; /* bootd gone: the shutdown follows from the control socket's EOF */
        }
        off += 1 + END_LEN;
    }
    if (off) {
        memmove(pending, pending + off, pending_n - off);
        pending_n -= off;
    }
    struct epoll_event ev = {.events = EPOLLIN | (pending_n ? EPOLLOUT : 0), .data.ptr = &ctl_marker};
    if (ctl >= 0)
        epoll_ctl(ep, EPOLL_CTL_MOD, ctl, &ev);
}

static void put_u64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); } /* little-endian host (x86, arm64) */
static void put_u32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void put_f64(uint8_t *p, double v) { memcpy(p, &v, 8); }

static void report(struct sess *s, int outcome, double now) {
    if (ctl < 0)
        return;
    if (pending_n + 1 + END_LEN > pending_cap) {
        size_t cap = pending_cap ? pending_cap * 2 : 64 * (1 + END_LEN);
        uint8_t *p = realloc(pending, cap);
        if (!p) {
            perror("tftp-pump: report");
            exit(1);
        }
        pending = p;
        pending_cap = cap;
    }
    uint8_t *m = pending + pending_n;
    m[0] = 'E';
    put_u64(m + 1, s->id);
    put_u32(m + 9, (uint32_t)outcome);
    put_u64(m + 13, s->bytes_acked);
    put_f64(m + 21, now);
    put_u64(m + 29, s->retransmits);
    put_u64(m + 37, s->dup_acks);
    put_u64(m + 45, s->blocks_sent);
    put_u64(m + 53, s->ignored);
    pending_n += 1 + END_LEN;
}

/* -- sessions ------------------------------------------------------------------------------------------- */
static void sess_free(struct sess *s) {
    free(s->ring);
    free(s->tag);
    free(s->oack);
    free(s);
}

static void sess_finish(struct sess *s, int outcome, double now) {
    if (s->state == ST_DONE)
        return;
    s->state = ST_DONE;
    s->deadline = 0;
    epoll_ctl(ep, EPOLL_CTL_DEL, s->sock, NULL);
    close(s->sock);
    close(s->file);
    s->sock = s->file = -1;
    report(s, outcome, now);
    for (size_t i = 0; i < all_n; i++) {
        if (all[i] == s) {
            all[i] = all[--all_n];
            break;
        }
    }
    nsess--;
    s->dead = 1;
    s->listed = 1;
    s->next_dead = dead_list;
    dead_list = s;
}

static void send_error(struct sess *s, int code, const char *msg) {
    uint8_t pkt[128];
    size_t n = strlen(msg);
    if (n > sizeof pkt - 5)
        n = sizeof pkt - 5;
    pkt[0] = 0;
    pkt[1] = OP_ERROR;
    pkt[2] = (uint8_t)(code >> 8);
    pkt[3] = (uint8_t)code;
    memcpy(pkt + 4, msg, n);
    pkt[4 + n] = 0;
    send(s->sock, pkt, n + 5, MSG_DONTWAIT | MSG_NOSIGNAL);
}

static inline uint8_t *slot_of(struct sess *s, uint64_t block) { return s->ring + (block % s->nslots) * s->slot; }

static inline size_t payload_len(struct sess *s, uint64_t block) {
    uint64_t start = (block - 1) * s->blksize;
    if (start >= s->size)
        return 0;
    uint64_t left = s->size - start;
    return left < s->blksize ? (size_t)left : s->blksize;
}

/* Make sure blocks [from, to) are in the ring: one preadv per run of missing blocks. 0 or -1 (aborted). */
static int load(struct sess *s, uint64_t from, uint64_t to, double now) {
    struct iovec iov[MAX_BATCH];
    uint64_t b = from;
    while (b < to) {
        if (s->tag[b % s->nslots] == b) {
            b++;
            continue;
        }
        uint64_t first = b;
        int k = 0;
        size_t want = 0;
        while (b < to && k < MAX_BATCH && s->tag[b % s->nslots] != b) {
            size_t len = payload_len(s, b);
            iov[k].iov_base = slot_of(s, b) + 4;
            iov[k].iov_len = len;
            want += len;
            k++;
            b++;
        }
        size_t got = 0;
        while (got < want) {
            /* skip the iovecs already filled (a short read: rare) */
            struct iovec *v = iov;
            int vk = k;
            size_t skip = got;
            while (vk && skip >= v->iov_len) {
                skip -= v->iov_len;
                v++;
                vk--;
            }
            struct iovec save = *v;
            v->iov_base = (uint8_t *)v->iov_base + skip;
            v->iov_len -= skip;
            ssize_t n = preadv(s->file, v, vk, (off_t)((first - 1) * s->blksize + got));
            *v = save;
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                const char *why = n == 0 ? "file changed while being read" : "read error";
                if (n < 0)
                    fprintf(stderr, "tftp-pump: session %llu: read: %s\n", (unsigned long long)s->id,
                            strerror(errno));
                send_error(s, 0, why);
                sess_finish(s, OUT_ABORTED, now);
                return -1;
            }
            got += (size_t)n;
        }
        for (uint64_t x = first; x < b; x++) {
            uint8_t *p = slot_of(s, x);
            p[0] = 0;
            p[1] = OP_DATA;
            p[2] = (uint8_t)(x >> 8);
            p[3] = (uint8_t)x;
            s->tag[x % s->nslots] = x;
        }
    }
    return 0;
}

/* ReadSession._send: from `next` up to the window's end; then read the following window ahead.
 * Returns the number of datagrams handed to the kernel (>0: something was sent). */
static int send_window(struct sess *s, double now, int retransmit) {
    uint64_t limit = s->base + s->window;
    if (limit > s->last_block + 1)
        limit = s->last_block + 1;
    int total = 0;
    if (s->next < limit) {
        if (load(s, s->next, limit, now) < 0)
            return 0;
        uint64_t from = s->next;
        uint64_t count = limit - from;
        s->next = limit; /* like the Python session: counted as sent even if the kernel drops some */
        s->blocks_sent += count;
        if (retransmit)
            s->retransmits += count;
        arm(s, now);
        total = (int)count;
        int failed = 0;
        if (count == 1) {
            ssize_t n = send(s->sock, slot_of(s, from), 4 + payload_len(s, from), MSG_DONTWAIT | MSG_NOSIGNAL);
            if (n < 0)
                failed = errno;
        } else {
            struct mmsghdr msgs[MAX_BATCH];
            struct iovec iov[MAX_BATCH];
            uint64_t b = from;
            while (b < limit && !failed) {
                int k = 0;
                for (; b < limit && k < MAX_BATCH; b++, k++) {
                    iov[k].iov_base = slot_of(s, b);
                    iov[k].iov_len = 4 + payload_len(s, b);
                    memset(&msgs[k].msg_hdr, 0, sizeof msgs[k].msg_hdr);
                    msgs[k].msg_hdr.msg_iov = &iov[k];
                    msgs[k].msg_hdr.msg_iovlen = 1;
                }
                int done = 0;
                while (done < k) {
                    int n = sendmmsg(s->sock, msgs + done, (unsigned)(k - done), MSG_DONTWAIT | MSG_NOSIGNAL);
                    if (n < 0) {
                        if (errno == EINTR)
                            continue;
                        failed = errno;
                        break;
                    }
                    done += n;
                }
            }
        }
        if (failed == ECONNREFUSED) { /* ICMP port unreachable: the client's port is gone */
            sess_finish(s, OUT_UNREACHABLE, now);
            return total;
        }
        /* EAGAIN (socket buffer full) and others: the rest of the batch is lost, the timer covers it */
    } else if (s->next == s->base) {
        s->deadline = 0;
    }
    /* read the window the next ACK will release */
    uint64_t ahead = s->next + s->window;
    if (ahead > s->last_block + 1)
        ahead = s->last_block + 1;
    if (s->next < ahead)
        load(s, s->next, ahead, now);
    return total;
}

static void progress(struct sess *s, double now) {
    s->retries = 0;
    s->rto = s->rto_base;
    s->last_progress = now;
}

static int on_ack(struct sess *s, unsigned number, double now) {
    if (s->state == ST_WAIT_OACK_ACK) {
        if (number != 0) {
            s->ignored++;
            return 0;
        }
        s->state = ST_TRANSFER;
        progress(s, now);
        return send_window(s, now, 0);
    }
    uint64_t acked_before = s->base - 1;
    uint64_t block = acked_before + ((number - (unsigned)acked_before) & 0xFFFF);
    if (block > s->next - 1) {
        s->ignored++; /* not sent yet, or a stale number from 64 Ki blocks ago */
        return 0;
    }
    if (block == acked_before) {
        s->dup_acks++;
        /* lock-step: never answered. Window: the first packet of the window was lost; resend once. */
        if (s->window > 1 && !s->dup_resent && s->next > s->base) {
            s->dup_resent = 1;
            s->next = s->base;
            return send_window(s, now, 1);
        }
        return 0;
    }
    uint64_t acked = block * s->blksize;
    s->bytes_acked = acked < s->size ? acked : s->size;
    s->base = block + 1;
    s->dup_resent = 0;
    progress(s, now);
    if (block >= s->last_block) {
        sess_finish(s, OUT_COMPLETE, now);
        return 0;
    }
    s->next = s->base; /* an ACK inside the window (RFC 7440): continue from there */
    return send_window(s, now, 0);
}

/* one datagram from the client; >0 when something was sent */
static int receive(struct sess *s, const uint8_t *d, ssize_t n, double now) {
    if (s->state == ST_DONE || n < 4) {
        s->ignored++;
        return 0;
    }
    unsigned op = (unsigned)d[0] << 8 | d[1];
    unsigned number = (unsigned)d[2] << 8 | d[3];
    if (op == OP_ACK)
        return on_ack(s, number, now);
    if (op == OP_ERROR) {
        sess_finish(s, OUT_CLIENT_ERROR, now);
        return 0;
    }
    s->ignored++;
    return 0;
}

static void readable(struct sess *s, double now) {
    for (int i = 0; i < 32 && s->state != ST_DONE; i++) {
        ssize_t n = recv(s->sock, recvbuf, sizeof recvbuf, MSG_DONTWAIT);
        if (n < 0) {
            if (errno == ECONNREFUSED)
                sess_finish(s, OUT_UNREACHABLE, now);
            break; /* EAGAIN, EINTR, other errors: back to epoll */
        }
        /* sent something: back to epoll rather than a recv that would say EAGAIN (level-triggered) */
        if (receive(s, recvbuf, n, now) > 0)
            break;
    }
}

static void on_timer(struct sess *s, double now) {
    if (s->deadline == 0 || now < s->deadline || s->state == ST_DONE)
        return;
    if (s->retries >= s->max_retries || now >= s->last_progress + s->session_timeout) {
        send_error(s, 0, "timeout: no acknowledgement from client");
        sess_finish(s, OUT_TIMEOUT, now);
        return;
    }
    s->retries++;
    double cap = s->max_timeout > s->rto_base ? s->max_timeout : s->rto_base;
    s->rto = s->rto * 2 < cap ? s->rto * 2 : cap;
    if (s->state == ST_WAIT_OACK_ACK) {
        s->retransmits++;
        if (send(s->sock, s->oack, s->oack_len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == ECONNREFUSED) {
            sess_finish(s, OUT_UNREACHABLE, now);
            return;
        }
        arm(s, now);
        return;
    }
    s->next = s->base;
    send_window(s, now, 1);
}

static void run_timers(double now) {
    while (heap_n && heap[0].at <= now) {
        struct hent e = heap_pop();
        struct sess *s = e.s;
        if (s->dead) {
            if (s->heap_refs == 0 && !s->listed)
                sess_free(s);
            continue;
        }
        if (!s->armed || e.at != s->heap_at)
            continue; /* superseded by an earlier deadline */
        s->armed = 0;
        if (s->deadline == 0)
            continue;
        if (s->deadline > now) {
            set_deadline(s, s->deadline); /* moved later since: re-arm */
            continue;
        }
        on_timer(s, now);
    }
}

static double get_f64(const uint8_t *p) {
    double v;
    memcpy(&v, p, 8);
    return v;
}
static uint64_t get_u64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}
static uint32_t get_u32(const uint8_t *p) {
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static void start_session(const uint8_t *m, size_t len, int sock, int file, double now) {
    struct sess *s = calloc(1, sizeof *s);
    if (!s) {
        close(sock);
        close(file);
        return;
    }
    s->id = get_u64(m);
    s->size = get_u64(m + 8);
    s->blksize = get_u32(m + 16);
    s->window = get_u32(m + 20);
    s->max_retries = get_u32(m + 24);
    uint32_t oack_len = get_u32(m + 28);
    s->rto_base = s->rto = get_f64(m + 32);
    s->max_timeout = get_f64(m + 40);
    s->session_timeout = get_f64(m + 48);
    s->sock = sock;
    s->file = file;
    s->state = ST_TRANSFER;
    s->last_progress = now;
    nsess++;
    if (all_n == all_cap) {
        size_t cap = all_cap ? all_cap * 2 : 256;
        struct sess **a = realloc(all, cap * sizeof *a);
        if (!a) {
            perror("tftp-pump: sessions");
            exit(1);
        }
        all = a;
        all_cap = cap;
    }
    all[all_n++] = s;
    int ok = s->blksize >= 8 && s->blksize <= 65464 && s->window >= 1 && s->window <= 65535 &&
             START_LEN + (size_t)oack_len == len;
    if (ok) {
        s->last_block = s->size / s->blksize + 1;
        s->base = s->next = 1;
        s->nslots = 2 * s->window;
        s->slot = (size_t)s->blksize + 4;
        s->ring = malloc(s->nslots * s->slot);
        s->tag = calloc(s->nslots, sizeof *s->tag);
        if (oack_len) {
            s->oack = malloc(oack_len);
            if (s->oack)
                memcpy(s->oack, m + START_LEN, oack_len);
            s->oack_len = oack_len;
            s->state = ST_WAIT_OACK_ACK;
        }
        ok = s->ring && s->tag && (!oack_len || s->oack);
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = s};
    if (!ok || epoll_ctl(ep, EPOLL_CTL_ADD, sock, &ev) < 0) {
        send_error(s, 0, "server busy, retry later");
        sess_finish(s, OUT_ABORTED, now);
        return;
    }
    posix_fadvise(file, 0, 0, POSIX_FADV_SEQUENTIAL);
    if (s->state == ST_WAIT_OACK_ACK) {
        if (send(sock, s->oack, s->oack_len, MSG_DONTWAIT | MSG_NOSIGNAL) < 0 && errno == ECONNREFUSED) {
            sess_finish(s, OUT_UNREACHABLE, now);
            return;
        }
        arm(s, now);
        /* read the first window while the client answers the OACK */
        uint64_t ahead = 1 + s->window;
        if (ahead > s->last_block + 1)
            ahead = s->last_block + 1;
        load(s, 1, ahead, now);
    } else {
        send_window(s, now, 0);
    }
}

/* 0: go on; -1: the control socket closed */
static int read_ctl(double now) {
    static uint8_t buf[CTL_MAX];
    union {
        char b[CMSG_SPACE(sizeof(int) * 4)];
        struct cmsghdr align;
    } u;
    struct iovec iov = {.iov_base = buf, .iov_len = sizeof buf};
    struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = u.b, .msg_controllen = sizeof u.b};
    ssize_t n = recvmsg(ctl, &msg, MSG_CMSG_CLOEXEC | MSG_DONTWAIT);
    if (n < 0)
        return (errno == EAGAIN || errno == EINTR) ? 0 : -1;
    if (n == 0)
        return -1;
    int fds[4];
    int nfds = scm_fds(&msg, fds, 4);
    if (buf[0] == 'S' && nfds == 2 && n >= 1 + START_LEN && !(msg.msg_flags & (MSG_CTRUNC | MSG_TRUNC))) {
        start_session(buf + 1, (size_t)n - 1, fds[0], fds[1], now);
    } else {
        fprintf(stderr, "tftp-pump: malformed control message (%zd bytes, %d fds)\n", n, nfds);
        for (int i = 0; i < nfds; i++)
            close(fds[i]);
    }
    return 0;
}

/* The pump is a relay: every wake-up it waits for adds to each lock-step block's latency. Ask for nice
 * `nice` (as the NBD splicer gets) and, on EEVDF kernels (Linux >= 6.12), a short time slice: a task that
 * runs some microseconds per wake-up then lets its wake-up preempt a CPU-bound task instead of queueing
 * behind it. Best effort: without the privilege, or on older kernels, the defaults stay. */
static void latency_hints(int nice) {
#ifdef SYS_sched_setattr
    struct {
        uint32_t size, policy;
        uint64_t flags;
        int32_t nice;
        uint32_t priority;
        uint64_t runtime, deadline, period;
    } attr = {.size = 48, .policy = 0 /* SCHED_OTHER */, .nice = nice, .runtime = 100 * 1000 /* ns */};
    if (syscall(SYS_sched_setattr, 0, &attr, 0) == 0)
        return;
    errno = 0;
    int cur = getpriority(PRIO_PROCESS, 0);
    if (errno == 0) {
        attr.nice = cur;
        if (syscall(SYS_sched_setattr, 0, &attr, 0) == 0)
            return;
    }
#endif
    setpriority(PRIO_PROCESS, 0, nice);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s CONTROL-FD NICE\n", argv[0]);
        return 2;
    }
    latency_hints(atoi(argv[2]));
    signal(SIGPIPE, SIG_IGN);
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    ctl = atoi(argv[1]);
    int sndbuf = 1 << 20;
    setsockopt(ctl, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (ep < 0) {
        perror("epoll_create1");
        return 1;
    }
    struct epoll_event cev = {.events = EPOLLIN, .data.ptr = &ctl_marker};
    if (epoll_ctl(ep, EPOLL_CTL_ADD, ctl, &cev) < 0) {
        perror("control socket");
        return 1;
    }
    struct epoll_event evs[MAX_EVENTS];
    double now = mono();
    for (;;) {
        int timeout = -1;
        if (heap_n) {
            double ms = (heap[0].at - now) * 1000.0;
            timeout = ms <= 0 ? 0 : (int)ms + 1; /* never early: 1 ms granularity */
        }
        int n = epoll_wait(ep, evs, MAX_EVENTS, timeout);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            perror("epoll_wait");
            return 1;
        }
        now = mono();
        for (int i = 0; i < n; i++) {
            void *p = evs[i].data.ptr;
            if (p == &ctl_marker) {
                if (evs[i].events & EPOLLOUT)
                    flush_pending();
                if ((evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && read_ctl(now) < 0) {
                    /* bootd stopped or gone: like its stop(), every transfer ends with an ERROR */
                    epoll_ctl(ep, EPOLL_CTL_DEL, ctl, NULL);
                    close(ctl);
                    ctl = -1;
                    while (all_n) {
                        struct sess *s = all[all_n - 1];
                        send_error(s, 0, "server shutting down");
                        sess_finish(s, OUT_ABORTED, now);
                    }
                    return 0;
                }
                continue;
            }
            struct sess *s = p;
            if (s->state != ST_DONE)
                readable(s, now);
        }
        run_timers(now);
        while (dead_list) { /* those still in the heap are freed when their entry comes up */
            struct sess *s = dead_list;
            dead_list = s->next_dead;
            s->next_dead = NULL;
            s->listed = 0;
            if (s->heap_refs == 0)
                sess_free(s);
        }
        if (pending_n)
            flush_pending();
    }
}
