/* The reference fault handler of `tiermem bench fault`: the least a userfaultfd handler can do.
 *
 * It serves MISSING faults of one guest from a plain file: read the uffd message, pread the
 * page at (address - base), UFFDIO_COPY it (which wakes the faulting thread). Nothing else:
 * no index, no checksum, no threads. The benchmark builds it with the system compiler and runs
 * it on the uffd of a process guest of the same kind as the agent's, with the same CPU
 * placement, so the agent's fault latency can be read as a ratio to it.
 *
 * usage: ref_handler UFFD_FD BASE_ADDR PAGE_SIZE N_PAGES FILE GUEST_PID
 * Exits 0 when the guest process exits (a pidfd: the uffd itself stays quiet), printing
 * "served N" on stderr. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc != 7) {
        fprintf(stderr, "usage: %s UFFD_FD BASE_ADDR PAGE_SIZE N_PAGES FILE GUEST_PID\n", argv[0]);
        return 2;
    }
    int uffd = atoi(argv[1]);
    uint64_t base = strtoull(argv[2], NULL, 0), ps = strtoull(argv[3], NULL, 0), n = strtoull(argv[4], NULL, 0);
    int file = open(argv[5], O_RDONLY | O_CLOEXEC);
    int pidfd = (int)syscall(SYS_pidfd_open, atoi(argv[6]), 0);
    char *buf = aligned_alloc(4096, ps);
    if (file < 0 || pidfd < 0 || buf == NULL || ps == 0) {
        perror("ref_handler: setup");
        return 2;
    }
    long served = 0;
    struct uffd_msg msgs[16];
    for (;;) {
        struct pollfd p[2] = {{.fd = uffd, .events = POLLIN}, {.fd = pidfd, .events = POLLIN}};
        if (poll(p, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            perror("ref_handler: poll");
            return 1;
        }
        if (p[1].revents || p[0].revents & (POLLERR | POLLHUP))
            break;
        if (!(p[0].revents & POLLIN))
            continue;
        ssize_t got = read(uffd, msgs, sizeof msgs);
        if (got == 0)
            break;
        if (got < 0) {
            if (errno == EAGAIN || errno == EINTR)
                continue;
            perror("ref_handler: read");
            return 1;
        }
        for (ssize_t i = 0; i < got / (ssize_t)sizeof msgs[0]; i++) {
            if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                continue;
            uint64_t addr = msgs[i].arg.pagefault.address & ~(ps - 1);
            uint64_t page = (addr - base) / ps;
            if (addr < base || page >= n) {
                fprintf(stderr, "ref_handler: fault outside the guest at %#llx\n", (unsigned long long)addr);
                return 1;
            }
            if (pread(file, buf, ps, (off_t)(page * ps)) != (ssize_t)ps) {
                perror("ref_handler: pread");
                return 1;
            }
            struct uffdio_copy c = {.dst = addr, .src = (uint64_t)(uintptr_t)buf, .len = ps, .mode = 0};
            if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && errno != EEXIST) {
                perror("ref_handler: UFFDIO_COPY");
                return 1;
            }
            served++;
        }
    }
    fprintf(stderr, "served %ld\n", served);
    return 0;
}
