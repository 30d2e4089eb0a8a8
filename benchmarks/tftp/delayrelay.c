/* A LAN stand-in where netem is missing: two TAP devices whose frames are copied to each other after a
 * fixed delay each way. This machine's kernel has no sch_netem (CONFIG_NET_SCH_NETEM is not set), so the
 * benchmark builds a 0.5 ms-each-way link from this relay instead of `tc qdisc ... netem delay 0.5ms`.
 *
 *   delayrelay TAP_A TAP_B DELAY_US     creates both taps, prints READY, relays until SIGTERM
 *
 * Frames are queued in arrival order with their due time; ppoll() sleeps until the next one is due
 * (timer slack set to 1 us). A full queue drops frames, like a full qdisc would.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <time.h>
#include <unistd.h>

#define QN 4096
#define FMAX 2048

struct queue {
    uint64_t due[QN];
    uint16_t len[QN];
    unsigned char buf[QN][FMAX];
    unsigned head, tail; /* head: next to send; tail: next free */
    unsigned long dropped;
};

static struct queue q[2];
static volatile sig_atomic_t stop;

static void on_signal(int sig) { (void)sig; stop = 1; }

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int tap_open(const char *name) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) { perror("open /dev/net/tun"); exit(1); }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = IFF_TAP | IFF_NO_PI;
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) { perror("TUNSETIFF"); exit(1); }
    return fd;
}

int main(int argc, char **argv) {
    if (argc != 4) { fprintf(stderr, "usage: %s TAP_A TAP_B DELAY_US\n", argv[0]); return 2; }
    int fd[2] = { tap_open(argv[1]), tap_open(argv[2]) };
    uint64_t delay = (uint64_t)atol(argv[3]) * 1000ull;
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    printf("READY\n");
    fflush(stdout);
    while (!stop) {
        uint64_t now = now_ns();
        uint64_t next = UINT64_MAX;
        for (int i = 0; i < 2; i++) {
            struct queue *Q = &q[i];
            while (Q->head != Q->tail && Q->due[Q->head % QN] <= now) {
                unsigned k = Q->head % QN;
                if (write(fd[1 - i], Q->buf[k], Q->len[k]) < 0 && errno == EAGAIN)
                    break; /* the kernel side is busy: retry on the next turn */
                Q->head++;
            }
            if (Q->head != Q->tail && Q->due[Q->head % QN] < next)
                next = Q->due[Q->head % QN];
        }
        struct pollfd pfd[2] = { { fd[0], POLLIN, 0 }, { fd[1], POLLIN, 0 } };
        struct timespec ts, *tsp = NULL;
        if (next != UINT64_MAX) {
            uint64_t wait = next > now ? next - now : 0;
            ts.tv_sec = wait / 1000000000ull;
            ts.tv_nsec = wait % 1000000000ull;
            tsp = &ts;
        }
        int n = ppoll(pfd, 2, tsp, NULL);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("ppoll");
            return 1;
        }
        for (int i = 0; i < 2; i++) {
            if (!(pfd[i].revents & POLLIN)) continue;
            struct queue *Q = &q[i];
            for (;;) {
                if (Q->tail - Q->head >= QN) {
                    unsigned char scratch[FMAX];
                    if (read(fd[i], scratch, sizeof scratch) < 0) break;
                    Q->dropped++;
                    continue;
                }
                unsigned k = Q->tail % QN;
                ssize_t r = read(fd[i], Q->buf[k], FMAX);
                if (r <= 0) break;
                Q->len[k] = (uint16_t)r;
                Q->due[k] = now_ns() + delay;
                Q->tail++;
            }
        }
    }
    fprintf(stderr, "delayrelay: dropped %lu and %lu frames\n", q[0].dropped, q[1].dropped);
    return 0;
}
