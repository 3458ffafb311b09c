/* A test client for the fake kernel served through FUSE.
 * usage: client MOUNT MODE [ARGS]   (prints results on stdout, one per line)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#define VFIO_DEVICE_GET_INFO 0x3b6b
#define VFIO_DEVICE_SET_IRQS 0x3b6e
#define VFIO_DEVICE_RESET 0x3b6f
#define VFIO_DEVICE_PCI_HOT_RESET 0x3b71
#define VFIO_DEVICE_BIND_IOMMUFD 0x3b76
#define RETRY_CMD 0x3b9f /* unknown to fakedev's uapi table (tests/fuse/fakekernel.py) */

struct info { uint32_t argsz, flags, num_regions, num_irqs, cap_offset, pad; };
struct bind { uint32_t argsz, flags; int32_t iommufd; uint32_t out_devid; };
struct irqs { uint32_t argsz, flags, index, start, count; int32_t fds[2]; };
struct hot_reset { uint32_t argsz, flags, count; };

static const char *mnt;
static volatile sig_atomic_t signals;
static void on_signal(int sig) { (void)sig; signals++; }
static int xopen(const char *rel) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", mnt, rel);
    int fd = open(p, O_RDWR | O_CLOEXEC);
    if (fd < 0) { perror(p); exit(2); }
    return fd;
}
static int call(int fd, unsigned long cmd, void *arg) {
    return ioctl(fd, cmd, arg) < 0 ? errno : 0;
}

struct thr { int dev, iommu, iters, fails; };
static void *worker(void *p) {
    struct thr *t = p;
    for (int i = 0; i < t->iters; i++) {
        struct info in = { .argsz = sizeof in };
        if (ioctl(t->dev, VFIO_DEVICE_GET_INFO, &in) || in.num_regions != 9) t->fails++;
        struct bind b = { .argsz = 16, .iommufd = t->iommu };
        if (ioctl(t->dev, VFIO_DEVICE_BIND_IOMMUFD, &b) || b.out_devid < 1000) t->fails++;
        uint32_t v = 0;
        if (pread(t->dev, &v, 4, (7ULL << 40)) != 4 || v != 0x153a8086) t->fails++;
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    mnt = argv[1];
    const char *mode = argv[2];
    if (!strcmp(mode, "bind2")) {
        int dev = xopen("vfio/devices/vfio0");
        int i1 = xopen("iommu"), i2 = xopen("iommu");
        struct bind b = { .argsz = 16, .iommufd = i2 };
        int e = call(dev, VFIO_DEVICE_BIND_IOMMUFD, &b);
        printf("bind %d devid %u\n", e, b.out_devid);
        b.iommufd = i1; b.out_devid = 0;
        e = call(dev, VFIO_DEVICE_BIND_IOMMUFD, &b);
        printf("bind %d devid %u\n", e, b.out_devid);
        return 0;
    }
    if (!strcmp(mode, "errors")) {
        int dev = xopen("vfio/devices/vfio0");
        printf("null %d\n", call(dev, VFIO_DEVICE_GET_INFO, (void *)8));
        /* a struct that starts on a mapped page and runs into a PROT_NONE page */
        char *pg = mmap(NULL, 8192, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        mprotect(pg + 4096, 4096, PROT_NONE);
        struct info *straddle = (struct info *)(pg + 4096 - 8);
        straddle->argsz = 24;
        printf("straddle %d\n", call(dev, VFIO_DEVICE_GET_INFO, straddle));
        struct info ok = { .argsz = 24 };
        int rc = call(dev, VFIO_DEVICE_GET_INFO, &ok);
        printf("ok %d %u %u\n", rc, ok.num_regions, ok.num_irqs);
        struct info small = { .argsz = 4 };
        printf("einval %d\n", call(dev, VFIO_DEVICE_GET_INFO, &small));
        struct bind b = { .argsz = 16, .iommufd = 999 };
        printf("badfd %d\n", call(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
        int pfd[2];
        if (pipe(pfd)) return 3;
        b.iommufd = pfd[0];
        printf("pipe %d\n", call(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
        b.iommufd = dev; /* ours, but not an iommufd */
        printf("notiommu %d\n", call(dev, VFIO_DEVICE_BIND_IOMMUFD, &b));
        printf("boom %d\n", call(dev, VFIO_DEVICE_RESET, NULL));
        printf("unknown %d\n", call(dev, 0x3bff, NULL));
        printf("after %d\n", call(dev, VFIO_DEVICE_GET_INFO, &ok));
        return 0;
    }
    if (!strcmp(mode, "poll")) {
        int dev = xopen("vfio/devices/vfio0");
        struct pollfd p = { .fd = dev, .events = POLLIN };
        int n = poll(&p, 1, 10000);
        printf("poll %d %x\n", n, p.revents);
        fflush(stdout);
        uint32_t x = 0x55;  /* wait for a line on stdin, then poll until readable */
        char line[8];
        if (!fgets(line, sizeof line, stdin)) return 3;
        n = poll(&p, 1, 10000);
        printf("poll %d %x\n", n, p.revents);
        (void)x;
        return 0;
    }
    if (!strcmp(mode, "retry")) { /* an fd lookup the server did not expect */
        int dev = xopen("vfio/devices/vfio0"), io = xopen("iommu");
        int p[2];
        if (pipe(p)) return 3;
        printf("iommu %d\n", ioctl(dev, RETRY_CMD, &io));
        printf("dev %d\n", ioctl(dev, RETRY_CMD, &dev));
        printf("pipe %d\n", ioctl(dev, RETRY_CMD, &p[1]));
        return 0;
    }
    if (!strcmp(mode, "eventfd")) {
        int dev = xopen("vfio/devices/vfio0");
        int e1 = eventfd(0, EFD_CLOEXEC), e2 = eventfd(5, EFD_CLOEXEC);
        struct irqs s = { .argsz = sizeof s, .count = 2, .fds = { e1, e2 } };
        int e = call(dev, VFIO_DEVICE_SET_IRQS, &s);
        uint64_t v1 = 0, v2 = 0;
        if (read(e1, &v1, 8) != 8 || read(e2, &v2, 8) != 8) return 4;
        printf("irqs %d %llu %llu\n", e, (unsigned long long)v1, (unsigned long long)v2);
        return 0;
    }
    if (!strcmp(mode, "rw")) {
        int dev = xopen("vfio/devices/vfio0");
        uint32_t v = 0;
        ssize_t n = pread(dev, &v, 4, 7ULL << 40);
        printf("read %zd %08x\n", n, v);
        v = 0xdeadbeef;
        n = pwrite(dev, &v, 4, (7ULL << 40) + 0x10);
        uint32_t w = 0;
        pread(dev, &w, 4, (7ULL << 40) + 0x10);
        printf("write %zd %08x\n", n, w);
        n = pread(dev, &v, 4, 3ULL << 40);
        printf("badregion %d\n", n < 0 ? errno : 0);
        return 0;
    }
    if (!strcmp(mode, "threads")) {
        int nthreads = atoi(argv[3]), iters = atoi(argv[4]);
        int dev = xopen("vfio/devices/vfio0"), iommu = xopen("iommu");
        pthread_t th[64];
        struct thr t[64];
        for (int i = 0; i < nthreads; i++) {
            t[i] = (struct thr){ dev, iommu, iters, 0 };
            pthread_create(&th[i], NULL, worker, &t[i]);
        }
        int fails = 0;
        for (int i = 0; i < nthreads; i++) { pthread_join(th[i], NULL); fails += t[i].fails; }
        printf("fails %d\n", fails);
        return 0;
    }
    if (!strcmp(mode, "slowsig")) { /* a slow call interrupted by a handled signal */
        struct sigaction sa = { .sa_handler = on_signal };  /* no SA_RESTART */
        sigaction(SIGUSR1, &sa, NULL);
        int dev = xopen("vfio/devices/vfio0");
        printf("open\n");
        fflush(stdout);
        struct hot_reset h = { .argsz = sizeof h };
        int e = call(dev, VFIO_DEVICE_PCI_HOT_RESET, &h);
        printf("slow %d signals %d\n", e, (int)signals);
        return 0;
    }
    if (!strcmp(mode, "slow")) { /* a slow call, then another call */
        int dev = xopen("vfio/devices/vfio0");
        printf("open\n");
        fflush(stdout);
        struct hot_reset h = { .argsz = sizeof h };
        printf("slow %d\n", call(dev, VFIO_DEVICE_PCI_HOT_RESET, &h));
        fflush(stdout);
        struct info in = { .argsz = sizeof in };
        printf("next %d\n", call(dev, VFIO_DEVICE_GET_INFO, &in));
        return 0;
    }
    return 2;
}
