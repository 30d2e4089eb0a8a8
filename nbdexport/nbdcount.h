/* Shared by nbdexport/splicer.c and nbdexport/handoff.c (compiled in through build_c_program's
 * `headers`): per-export I/O counts from the NBD request headers a client sends, since qemu 7.2's
 * query-blockstats has none for NBD exports. The stream starts at a request header (the handshake is
 * over); each header is 28 bytes (magic, flags, type, handle, offset, length) and a WRITE's payload
 * follows it. */
#ifndef BOOTD_NBDCOUNT_H
#define BOOTD_NBDCOUNT_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define NBD_REQUEST_MAGIC 0x25609513u
#define NBD_CMD_READ 0
#define NBD_CMD_WRITE 1

enum { IO_RD_BYTES, IO_WR_BYTES, IO_RD_OPS, IO_WR_OPS }; /* a slot's counters, as bootd reads them */

struct nbd_parse {
    unsigned char hdr[28];
    size_t hlen;
    uint64_t skip; /* payload bytes of a WRITE still to pass */
    int parsing;   /* 0 after anything that is not an NBD request: no more counting */
};

static uint32_t nbd_be32(const unsigned char *p) {
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

/* single writer (this process), read by bootd: plain stores, never torn on x86-64 */
static void nbd_add(uint64_t *c, uint64_t v) { __atomic_store_n(c, *c + v, __ATOMIC_RELAXED); }

/* Count the READ and WRITE requests in the next n bytes of the client's stream into io[4]. */
static void nbd_count(struct nbd_parse *s, uint64_t io[4], const unsigned char *p, size_t n) {
    while (n > 0 && s->parsing) {
        if (s->skip > 0) {
            size_t k = n < s->skip ? n : (size_t)s->skip;
            s->skip -= k;
            p += k;
            n -= k;
            continue;
        }
        size_t k = sizeof s->hdr - s->hlen;
        if (k > n)
            k = n;
        memcpy(s->hdr + s->hlen, p, k);
        s->hlen += k;
        p += k;
        n -= k;
        if (s->hlen < sizeof s->hdr)
            return;
        s->hlen = 0;
        if (nbd_be32(s->hdr) != NBD_REQUEST_MAGIC) { /* extended headers or garbage: stop counting */
            s->parsing = 0;
            return;
        }
        unsigned type = (unsigned)s->hdr[6] << 8 | s->hdr[7];
        uint32_t len = nbd_be32(s->hdr + 24);
        if (type == NBD_CMD_READ) {
            nbd_add(&io[IO_RD_BYTES], len);
            nbd_add(&io[IO_RD_OPS], 1);
        } else if (type == NBD_CMD_WRITE) {
            nbd_add(&io[IO_WR_BYTES], len);
            nbd_add(&io[IO_WR_OPS], 1);
            s->skip = len;
        }
    }
}
#endif
