/* Fuzz and race client for a fakedev mount.
 *
 * usage: fuzz_client MOUNT fuzz SEED NCALLS   random and mutated calls on every node
 *        fuzz_client MOUNT deep SEED NCALLS   mostly valid bind/attach/reset sequences
 *        fuzz_client MOUNT race SEED MILLIS   open/bind/attach/hot reset/close loop on
 *                                             vfio/devices/vfio0 and vfio1 (one dev_set)
 *        fuzz_client MOUNT argsz SEED N       N times: IOMMU_IOAS_ALLOC and BIND_IOMMUFD with
 *                                             argsz 0xffffffff, the struct at the end of the
 *                                             mapping (the kernel: EFAULT, nothing allocated)
 *
 * An optional fifth argument caps the random argsz values (default: none).
 * With a SEED divisible by 3, fuzz and deep also run a 300 us SIGALRM timer with
 * an empty handler, so calls are interrupted (FUSE_INTERRUPT) mid-flight.
 * The calls made depend only on SEED and on the answers received. A line "go" is
 * printed (and flushed) once the first node is open; at the end a summary:
 *   calls N / ms N / errno E COUNT (E = 0: success)   (fuzz, deep)
 *   iterations N / reset_ok N / reset_fail N / split_reset_ok N / errno ...   (race)
 * Exit status 0 unless the mount could not be used at all.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <poll.h>
#include <signal.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define VFIO_SET_IOMMU 0x3b66
#define VFIO_GROUP_SET_CONTAINER 0x3b68
#define VFIO_GROUP_GET_DEVICE_FD 0x3b6a
#define VFIO_DEVICE_SET_IRQS 0x3b6e
#define VFIO_DEVICE_GET_PCI_HOT_RESET_INFO 0x3b70
#define VFIO_DEVICE_PCI_HOT_RESET 0x3b71
#define VFIO_IOMMU_MAP_DMA 0x3b71
#define VFIO_DEVICE_BIND_IOMMUFD 0x3b76
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT 0x3b77
#define VFIO_DEVICE_DETACH_IOMMUFD_PT 0x3b78
#define IOMMU_DESTROY 0x3b80
#define IOMMU_IOAS_ALLOC 0x3b81
#define IOMMU_IOAS_MAP 0x3b85
#define IOMMU_IOAS_UNMAP 0x3b86

#define PAGE 4096
#define MAXNODES 64
#define MAXFDS 32

enum { K_NODE, K_EVENTFD, K_CLOSED, K_PIPE, K_NULL };

static uint64_t rng;
static uint64_t rnd(void) { /* xorshift64* */
    rng ^= rng >> 12; rng ^= rng << 25; rng ^= rng >> 27;
    return rng * 2685821657736338717ULL;
}
static uint32_t below(uint32_t n) { return n ? (uint32_t)(rnd() % n) : 0; }
static int chance(int pct) { return (int)below(100) < pct; }

static const char *mnt;
static char nodes[MAXNODES][600];
static int nnodes;
static struct { int fd, kind, node; } fds[MAXFDS];
static int nfds;
static uint64_t hist[512], calls;
static unsigned char *edge; /* a page followed by an unmapped page */
static unsigned char *buf;  /* 4 pages, all mapped */

static void count(int ret) {
    calls++;
    int e = ret < 0 ? errno : 0;
    hist[e >= 0 && e < 512 ? e : 511]++;
}

static void add_node(const char *rel) {
    if (nnodes < MAXNODES) snprintf(nodes[nnodes++], sizeof nodes[0], "%s", rel);
}
static void scan(const char *rel, int devices) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", mnt, rel);
    DIR *d = opendir(p);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d))) {
        if (e->d_name[0] == '.' || (!devices && !strcmp(e->d_name, "devices"))) continue;
        char r[600];
        snprintf(r, sizeof r, "%s/%s", rel, e->d_name);
        add_node(r);
    }
    closedir(d);
}
static int find_node(const char *rel) {
    for (int i = 0; i < nnodes; i++) if (!strcmp(nodes[i], rel)) return i;
    return -1;
}
static int open_node(int i) {
    char p[1200];
    snprintf(p, sizeof p, "%s/%s", mnt, nodes[i]);
    int fd = open(p, O_RDWR | O_CLOEXEC);
    count(fd);
    return fd;
}

static void drop(int slot) {
    if (fds[slot].kind != K_CLOSED) close(fds[slot].fd);
    fds[slot] = fds[--nfds];
}
static void remember(int fd, int kind, int node) {
    if (fd < 0) return;
    if (nfds == MAXFDS) {
        int s = (int)below(MAXFDS);
        if (fds[s].kind != K_CLOSED) close(fds[s].fd);
        fds[s] = fds[--nfds];
    }
    fds[nfds].fd = fd; fds[nfds].kind = kind; fds[nfds].node = node; nfds++;
}
static int any_fd(void) {
    if (!nfds || chance(5)) return chance(50) ? -1 : (int)below(1024);
    return fds[below(nfds)].fd;
}

/* A pointer for an ioctl argument holding `len` meaningful bytes copied from `src`. */
static uintptr_t place(const void *src, size_t len) {
    uint32_t c = below(100);
    if (c < 70) { memcpy(buf, src, len); return (uintptr_t)buf; }
    if (c < 88) { /* the struct runs off the end of the mapping */
        size_t keep = below((uint32_t)len + 1);
        memcpy(edge + PAGE - keep, src, keep);
        return (uintptr_t)(edge + PAGE - keep);
    }
    if (c < 92) return 0;
    if (c < 95) return (uintptr_t)(edge + PAGE); /* unmapped */
    if (c < 97) return 0xffff888000000000ULL;    /* a kernel address */
    return (uintptr_t)rnd();
}

static uint32_t field(void) {
    switch (below(12)) {
    case 0: return 0;
    case 1: return 0xffffffffu;
    case 2: return 1u << below(32);
    case 3: case 4: return (uint32_t)any_fd();
    case 5: return below(16);
    case 6: return below(4096);
    case 7: return 0x80000000u;
    case 8: return 8 * below(8);
    default: return (uint32_t)rnd();
    }
}
static uint32_t max_argsz = 0xffffffffu;
static uint32_t argsz_raw(void) {
    static const uint32_t common[] = {0, 4, 8, 12, 16, 20, 24, 32, 40, 48, 64, 128, 4096};
    switch (below(6)) {
    case 0: return (uint32_t)rnd();
    case 1: return below(512);
    case 2: return 0xffffffffu - below(8);
    default: return common[below(sizeof common / sizeof common[0])];
    }
}
static uint32_t argsz(void) {
    uint32_t a = argsz_raw();
    return a > max_argsz ? a % (max_argsz + 1) : a;
}
static unsigned long fuzz_cmd(void) {
    uint32_t c = below(100);
    if (c < 75) return 0x3b64 + below(0x3b92 - 0x3b64 + 1);
    if (c < 85) return 0x3b00 + below(256);
    if (c < 90) return 0x3b64 + below(0x2f) + ((unsigned long)below(4) << 30) + ((unsigned long)below(64) << 16);
    return (unsigned long)(uint32_t)rnd() & ~0xff00ul; /* never another type's ';' */
}

static void fuzz_ioctl(void) {
    if (!nfds) return;
    int s = (int)below(nfds);
    unsigned long cmd = fuzz_cmd();
    if (fds[s].kind != K_NODE) cmd = 0x3b00 | (cmd & 0xff); /* keep other files safe */
    uint32_t st[64];
    for (int i = 0; i < 64; i++) st[i] = field();
    st[0] = argsz();
    if (chance(30)) st[1] = 0;
    if (chance(20)) st[2] = below(4); /* counts, ids */
    uintptr_t arg;
    if (chance(12)) arg = field(); /* an int argument (SET_IOMMU, CHECK_EXTENSION) */
    else if (chance(10)) { /* a string (GET_DEVICE_FD) */
        static const char *names[] = {"0000:01:00.0", "0000:01:00.1", "0000:00:1c.0", "", "x"};
        arg = place(names[below(5)], 13);
    } else arg = place(st, 4 * (4 + below(60)));
    count(ioctl(fds[s].fd, cmd, arg));
}

static void fuzz_rw(void) {
    if (!nfds) return;
    int s = (int)below(nfds);
    if (fds[s].kind != K_NODE) s = (int)below(nfds);
    if (fds[s].kind != K_NODE && fds[s].kind != K_CLOSED) return; /* never drain an eventfd */
    off_t off = ((off_t)below(11) << 40) + (chance(70) ? below(0x100) : below(0x40000));
    if (chance(5)) off = (off_t)(rnd() & 0x7fffffffffffffffULL);
    size_t sz = chance(80) ? (size_t)1 << below(4) : below(8200);
    unsigned char *p = chance(15) ? edge + PAGE - below(16) : buf;
    if (p == buf && sz > 4 * PAGE) sz = 4 * PAGE;
    if (p != buf) sz = sz > PAGE ? PAGE : sz;
    if (chance(50)) count((int)pread(fds[s].fd, p, sz, off));
    else {
        if (p == buf) for (size_t i = 0; i < sz && i < 64; i++) buf[i] = (unsigned char)rnd();
        count((int)pwrite(fds[s].fd, p, sz, off));
    }
}

static int xcall(int fd, unsigned long cmd, void *arg) {
    int r = ioctl(fd, cmd, arg);
    count(r);
    return r < 0 ? errno : 0;
}

/* A valid (or nearly valid) cdev sequence: iommufd, IOAS, bind, attach, hot reset. */
static void sequence_cdev(void) {
    int d0n = find_node("vfio/devices/vfio0"), d1n = find_node("vfio/devices/vfio1");
    int in = find_node("iommu");
    if (d0n < 0 || in < 0) return;
    int i1 = open_node(in), i2 = chance(20) ? open_node(in) : i1;
    int d0 = open_node(d0n), d1 = d1n >= 0 ? open_node(d1n) : -1;
    uint32_t a[3] = {12, 0, 0};
    xcall(i1, IOMMU_IOAS_ALLOC, a);
    uint32_t ioas = a[2];
    uint32_t b[4] = {16, 0, (uint32_t)i1, 0};
    xcall(d0, VFIO_DEVICE_BIND_IOMMUFD, b);
    uint32_t b2[4] = {16, 0, (uint32_t)(chance(50) ? i1 : i2), 0};
    if (d1 >= 0) xcall(d1, VFIO_DEVICE_BIND_IOMMUFD, b2);
    uint32_t at[3] = {12, 0, chance(90) ? ioas : below(8)};
    xcall(d0, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
    if (d1 >= 0) xcall(d1, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
    if (chance(40)) { /* map some of our memory */
        memset(buf + 2 * PAGE, 0xa5, PAGE);
        uint32_t mm[10] = {40, 3 | (chance(50) ? 0 : 1), ioas, 0};
        uint64_t *q = (uint64_t *)&mm[4];
        q[0] = (uint64_t)(uintptr_t)(buf + 2 * PAGE); q[1] = PAGE; q[2] = (uint64_t)below(16) << 12;
        xcall(i1, IOMMU_IOAS_MAP, mm);
    }
    uint32_t info[3 + 2 * 8] = {chance(50) ? 12u : (uint32_t)sizeof info};
    xcall(d0, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info);
    uint32_t r[5] = {12, 0, 0, 0, 0};
    if (chance(20)) { r[0] = 20; r[2] = 2; r[3] = (uint32_t)any_fd(); r[4] = (uint32_t)any_fd(); }
    xcall(chance(50) ? d0 : (d1 >= 0 ? d1 : d0), VFIO_DEVICE_PCI_HOT_RESET, r);
    if (chance(30)) { uint32_t dt[2] = {8, 0}; xcall(d0, VFIO_DEVICE_DETACH_IOMMUFD_PT, dt); }
    if (chance(20)) { uint32_t de[2] = {8, ioas}; xcall(i1, IOMMU_DESTROY, de); }
    if (chance(30)) { /* an eventfd trigger on MSI-X */
        int e = eventfd(0, EFD_CLOEXEC);
        uint32_t irq[6] = {24, (1u << 2) | (1u << 5), 2, 0, 1, (uint32_t)e};
        xcall(d0, VFIO_DEVICE_SET_IRQS, irq);
        remember(e, K_EVENTFD, -1);
    }
    int keep = chance(50);
    int all[4] = {i1, i2, d0, d1};
    int nodes_of[4] = {in, in, d0n, d1n};
    for (int k = 0; k < 4; k++) {
        if (all[k] < 0 || (k == 1 && i2 == i1)) continue;
        if (keep) remember(all[k], K_NODE, nodes_of[k]);
        else close(all[k]);
    }
}

/* The legacy path: container, group, SET_CONTAINER, SET_IOMMU, GET_DEVICE_FD, MAP_DMA. */
static void sequence_group(void) {
    int cn = find_node("vfio/vfio");
    int gn = -1;
    for (int i = 0; i < nnodes; i++)
        if (!strncmp(nodes[i], "vfio/", 5) && nodes[i][5] >= '0' && nodes[i][5] <= '9') {
            if (gn < 0 || chance(50)) gn = i;
        }
    if (cn < 0 || gn < 0) return;
    int c = open_node(cn), g = open_node(gn);
    if (c >= 0 && g >= 0) {
        xcall(g, VFIO_GROUP_SET_CONTAINER, &c);
        count(ioctl(c, VFIO_SET_IOMMU, chance(80) ? 1 : below(12)));
        xcall(g, VFIO_GROUP_GET_DEVICE_FD, "0000:01:00.0");
        uint32_t m[8] = {32, 3, 0, 0};
        uint64_t *q = (uint64_t *)&m[2];
        q[0] = (uint64_t)(uintptr_t)buf; q[1] = (uint64_t)below(16) << 12; q[2] = PAGE;
        xcall(c, VFIO_IOMMU_MAP_DMA, m);
    }
    if (chance(50)) { remember(c, K_NODE, cn); remember(g, K_NODE, gn); }
    else { if (c >= 0) close(c); if (g >= 0) close(g); }
}

static void step(int deep) {
    uint32_t c = below(1000);
    if (deep ? c < 300 : c < 15) { sequence_cdev(); return; }
    if (deep ? c < 350 : c < 22) { sequence_group(); return; }
    if (c < 420) { fuzz_ioctl(); return; }
    if (c < 560) { fuzz_rw(); return; }
    if (c < 700) {
        if (nnodes) remember(open_node((int)below(nnodes)), K_NODE, -1);
        return;
    }
    if (c < 850 && nfds) { /* close, but sometimes keep the number as a stale fd */
        int s = (int)below(nfds);
        if (fds[s].kind == K_CLOSED) { fds[s] = fds[--nfds]; return; }
        close(fds[s].fd);
        if (chance(30)) fds[s].kind = K_CLOSED; else fds[s] = fds[--nfds];
        return;
    }
    if (c < 900) { remember(eventfd(0, EFD_CLOEXEC), K_EVENTFD, -1); return; }
    if (c < 915) { int p[2]; if (!pipe2(p, O_CLOEXEC)) { remember(p[0], K_PIPE, -1); close(p[1]); } return; }
    if (c < 925) { remember(open("/dev/null", O_RDWR | O_CLOEXEC), K_NULL, -1); return; }
    if (c < 945 && nfds) { /* poll, sometimes waiting a little (FUSE_POLL with a wakeup) */
        struct pollfd p = {fds[below(nfds)].fd, POLLIN | POLLOUT | POLLPRI, 0};
        count(poll(&p, 1, (int)below(3)));
        return;
    }
    fuzz_ioctl();
}

static void on_alarm(int sig) { (void)sig; }

static long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000L + t.tv_nsec / 1000000L;
}

static void print_hist(void) {
    for (int e = 0; e < 512; e++) if (hist[e]) printf("errno %d %llu\n", e, (unsigned long long)hist[e]);
}

static int race(long millis) {
    int in = find_node("iommu"), d0n = find_node("vfio/devices/vfio0"), d1n = find_node("vfio/devices/vfio1");
    if (in < 0 || d0n < 0 || d1n < 0) return 2;
    uint64_t iters = 0, ok = 0, fail = 0, split_ok = 0;
    long end = now_ms() + millis;
    printf("go\n");
    fflush(stdout);
    while (now_ms() < end) {
        iters++;
        int first = chance(50);
        int i1 = open_node(in);
        int split = chance(15);
        int i2 = split ? open_node(in) : i1;
        int d0 = open_node(first ? d0n : d1n), d1 = open_node(first ? d1n : d0n);
        uint32_t a[3] = {12, 0, 0};
        xcall(i1, IOMMU_IOAS_ALLOC, a);
        uint32_t b[4] = {16, 0, (uint32_t)i1, 0};
        xcall(d0, VFIO_DEVICE_BIND_IOMMUFD, b);
        if (chance(5)) usleep(below(300));
        uint32_t b2[4] = {16, 0, (uint32_t)i2, 0};
        if (chance(95)) xcall(d1, VFIO_DEVICE_BIND_IOMMUFD, b2);
        uint32_t at[3] = {12, 0, a[2]};
        if (chance(80)) xcall(d0, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
        if (chance(80)) xcall(d1, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
        uint32_t info[3 + 2 * 4] = {sizeof info};
        if (chance(50)) xcall(d0, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info);
        uint32_t r[3] = {12, 0, 0};
        int e = xcall(chance(50) ? d0 : d1, VFIO_DEVICE_PCI_HOT_RESET, r);
        if (e == 0) { ok++; if (split) split_ok++; } else fail++;
        int order[4] = {i1, i2 != i1 ? i2 : -1, d0, d1}; /* closed in a random order */
        for (int k = 3; k > 0; k--) {
            int j = (int)below((uint32_t)k + 1), t = order[k];
            order[k] = order[j]; order[j] = t;
        }
        for (int k = 0; k < 4; k++) if (order[k] >= 0) close(order[k]);
    }
    printf("iterations %llu\nreset_ok %llu\nreset_fail %llu\nsplit_reset_ok %llu\n",
           (unsigned long long)iters, (unsigned long long)ok, (unsigned long long)fail,
           (unsigned long long)split_ok);
    print_hist();
    return 0;
}

int main(int argc, char **argv) {
    if (argc < 5) {
        fprintf(stderr, "usage: %s MOUNT fuzz|deep|race SEED N\n", argv[0]);
        return 2;
    }
    mnt = argv[1];
    const char *mode = argv[2];
    rng = strtoull(argv[3], NULL, 0) * 0x9E3779B97F4A7C15ULL + 1;
    long n = strtol(argv[4], NULL, 0);
    if (argc > 5) max_argsz = (uint32_t)strtoul(argv[5], NULL, 0);
    setvbuf(stdout, NULL, _IOFBF, 1 << 16);
    edge = mmap(NULL, 2 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    buf = mmap(NULL, 4 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (edge == MAP_FAILED || buf == MAP_FAILED) return 2;
    munmap(edge + PAGE, PAGE);
    add_node("iommu");
    scan("vfio", 0);
    scan("vfio/devices", 1);
    if (nnodes <= 2) { fprintf(stderr, "no nodes under %s\n", mnt); return 2; }
    if (!strcmp(mode, "race")) return race(n);
    if (!strcmp(mode, "argsz")) {
        int in = find_node("iommu"), dn = find_node("vfio/devices/vfio0");
        int i = in >= 0 ? open_node(in) : -1, d = dn >= 0 ? open_node(dn) : -1;
        if (i < 0 || d < 0) return 2;
        for (long k = 0; k < n; k++) {
            uint32_t a[3] = {0xffffffffu, 0, 0};
            memcpy(edge + PAGE - sizeof a, a, sizeof a);
            int r = ioctl(i, IOMMU_IOAS_ALLOC, edge + PAGE - sizeof a);
            printf("ioas_alloc %d\n", r < 0 ? errno : 0);
            uint32_t b[4] = {0xffffffffu, 0, (uint32_t)i, 0};
            memcpy(edge + PAGE - sizeof b, b, sizeof b);
            r = ioctl(d, VFIO_DEVICE_BIND_IOMMUFD, edge + PAGE - sizeof b);
            printf("bind %d\n", r < 0 ? errno : 0);
        }
        return 0;
    }
    int deep = !strcmp(mode, "deep");
    if (!deep && strcmp(mode, "fuzz")) return 2;
    if (strtoull(argv[3], NULL, 0) % 3 == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm; /* no SA_RESTART: interrupted calls may give EINTR */
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval it = {{0, 300}, {0, 300}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    long t0 = now_ms();
    remember(open_node((int)below(nnodes)), K_NODE, -1);
    printf("go\n");
    fflush(stdout);
    while ((long)calls < n) step(deep);
    for (int s = nfds - 1; s >= 0; s--) drop(s);
    printf("calls %llu\nms %ld\n", (unsigned long long)calls, now_ms() - t0);
    print_hist();
    return 0;
}
