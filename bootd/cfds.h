/* Shared by bootd's C helpers (tftp/pump.c, nbdexport/splicer.c, nbdexport/handoff.c), compiled in through
 * build_c_program's `headers`: the file descriptors a received message carries (SCM_RIGHTS). */
#ifndef BOOTD_CFDS_H
#define BOOTD_CFDS_H
#include <string.h>
#include <sys/socket.h>

/* The fds in `msg`'s control data, at most `max` into `fds` (the caller closes them, or uses them);
 * how many. A truncated control part (MSG_CTRUNC) is the caller's to refuse. */
static int scm_fds(struct msghdr *msg, int *fds, int max) {
    int n = 0;
    for (struct cmsghdr *cm = CMSG_FIRSTHDR(msg); cm; cm = CMSG_NXTHDR(msg, cm)) {
        if (cm->cmsg_level != SOL_SOCKET || cm->cmsg_type != SCM_RIGHTS)
            continue;
        int k = (int)((cm->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        for (int i = 0; i < k && n < max; i++)
            memcpy(&fds[n++], CMSG_DATA(cm) + i * sizeof(int), sizeof(int));
    }
    return n;
}
#endif
