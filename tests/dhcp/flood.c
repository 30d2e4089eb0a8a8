/* A DHCP flood for tests: valid-looking DISCOVERs from ever new MACs and malformed packets, at a fixed
 * rate, broadcast on one interface (run inside a test's own client namespace).
 *
 *   flood IFNAME PPS SECONDS [TARGET]    (TARGET: unicast to this address; default: broadcast)
 *
 * Half the packets are DISCOVERs (a new chaddr each; every other one says PXEClient with an arch), the
 * other half are malformed: cut inside the BOOTP header, an option running past the end, a BOOTREPLY,
 * random bytes behind the magic cookie. Python cannot send 15 000 packets a second; this can.
 * Prints one line: "sent N errors E seconds S".
 */
#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static uint32_t rnd_state = 2463534242u;
static uint32_t rnd(void) { /* xorshift32: reproducible, no libc state */
    rnd_state ^= rnd_state << 13;
    rnd_state ^= rnd_state >> 17;
    rnd_state ^= rnd_state << 5;
    return rnd_state;
}

/* Builds packet number n into buf; returns its length. */
static size_t build(unsigned char *buf, uint64_t n) {
    memset(buf, 0, 600);
    buf[0] = 1; buf[1] = 1; buf[2] = 6;                       /* BOOTREQUEST, ethernet, hlen 6 */
    uint32_t xid = rnd();
    memcpy(buf + 4, &xid, 4);
    buf[10] = 0x80;                                           /* broadcast flag */
    buf[28] = 0x02;                                           /* locally administered, new each packet */
    buf[29] = (n >> 32) & 0xff; buf[30] = (n >> 24) & 0xff; buf[31] = (n >> 16) & 0xff;
    buf[32] = (n >> 8) & 0xff; buf[33] = n & 0xff;
    memcpy(buf + 236, "\x63\x82\x53\x63", 4);
    size_t i = 240;
    buf[i++] = 53; buf[i++] = 1; buf[i++] = 1;                /* DISCOVER */
    if (n % 4 == 0) {
        const char *vc = "PXEClient:Arch:00000:UNDI:002001";
        buf[i++] = 60; buf[i++] = (unsigned char)strlen(vc);
        memcpy(buf + i, vc, strlen(vc)); i += strlen(vc);
        buf[i++] = 93; buf[i++] = 2; buf[i++] = 0; buf[i++] = 0;
    }
    buf[i++] = 55; buf[i++] = 4; buf[i++] = 1; buf[i++] = 3; buf[i++] = 66; buf[i++] = 67;
    buf[i++] = 255;
    if (i < 300) i = 300;
    switch (n % 8) {
    case 1: return 20 + rnd() % 200;                          /* cut inside the header */
    case 3: buf[240] = 53; buf[241] = 200; return 250;        /* option longer than the packet */
    case 5: buf[0] = 2; return i;                             /* a reply, not a request */
    case 7:                                                   /* garbage behind the cookie */
        for (size_t k = 240; k < 400; k++) buf[k] = rnd() & 0xff;
        return 400;
    default: return i;                                        /* a valid-looking DISCOVER */
    }
}

int main(int argc, char **argv) {
    if (argc != 4 && argc != 5) {
        fprintf(stderr, "usage: %s IFNAME PPS SECONDS [TARGET]\n", argv[0]);
        return 2;
    }
    double pps = atof(argv[2]), seconds = atof(argv[3]);
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1;
    if (s < 0 || setsockopt(s, SOL_SOCKET, SO_BROADCAST, &one, sizeof one) < 0 ||
        setsockopt(s, SOL_SOCKET, SO_BINDTODEVICE, argv[1], strlen(argv[1])) < 0) {
        perror("socket");
        return 1;
    }
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(67)};
    to.sin_addr.s_addr = argc == 5 ? inet_addr(argv[4]) : htonl(INADDR_BROADCAST);
    unsigned char buf[600];
    uint64_t sent = 0, errors = 0, n = 0;
    double t0 = now(), t;
    struct timespec nap = {0, 200000};
    while ((t = now() - t0) < seconds) {
        uint64_t due = (uint64_t)(t * pps);
        while (sent + errors < due) {
            size_t len = build(buf, n++);
            if (sendto(s, buf, len, 0, (struct sockaddr *)&to, sizeof to) < 0)
                errors++;
            else
                sent++;
        }
        nanosleep(&nap, NULL);
    }
    printf("sent %llu errors %llu seconds %.2f\n", (unsigned long long)sent, (unsigned long long)errors, now() - t0);
    return 0;
}
