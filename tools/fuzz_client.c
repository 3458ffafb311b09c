/* Fuzz and race client for a fakedev mount.
 *
 * usage: fuzz_client MOUNT fuzz SEED NCALLS   random and mutated calls on every node
 *        fuzz_client MOUNT deep SEED NCALLS   mostly valid bind/attach/reset sequences
 *        fuzz_client MOUNT race SEED MILLIS   open/bind/attach/hot reset/close loop on
 *                                             vfio/devices/vfio0 and vfio1 (one dev_set)
 *        fuzz_client MOUNT argsz SEED N       N times: IOMMU_IOAS_ALLOC and BIND_IOMMUFD with
 *                                             argsz 0xffffffff, the struct at the end of the
 *                                             mapping (the kernel: EFAULT, nothing allocated)
 *        fuzz_client MOUNT dma SEED NCALLS    half DMA-engine sequences (FUZZ_DMA), half fuzz
 *        fuzz_client MOUNT dmaloop SEED MILLIS  one DMA-engine set-up, then 1 MiB copies
 *                                             until MILLIS (for kills mid-DMA; a failed
 *                                             set-up is reported, the loop still runs;
 *                                             with no engine node: fuzz calls instead)
 *        fuzz_client MOUNT dmacheck SEED 1    one correct copy and fill, bytes checked:
 *                                             prints "dma ok" (or what went wrong)
 *        fuzz_client MOUNT chaos SEED MILLIS  arms and clears fault rules through the control
 *                                             file (ops of the race loop) until MILLIS
 *
 * An optional fifth argument caps the random argsz values (default: none).
 * Environment: FUZZ_CONTROL=N makes N of every 1000 fuzz/deep/dma steps a command
 * written to MOUNT/.fakedev/control (fault specs with random ops, nth, count, errno
 * and device, unplug, clear, faults, dma-read, dma-write, garbage; valid and mutated);
 * FUZZ_BDFS=a,b,... the tree's functions (for those commands); FUZZ_UNPLUG=N: an
 * unplug command or unplug fault names a real function N times in 1,000,000 (else
 * only functions the tree lacks), FUZZ_UNPLUG_ONLY=BDF then names that one;
 * FUZZ_DMA=vfio/devices/vfioN the DMA-engine node.
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
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#include "vfio-uapi.h"

#define CFG_OFF (7ULL << 40)

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

static void print_hist(void);
/* ---------------------------------------------------------------- control file */

static char ctl_path[700];
static int ctl_rate;            /* per 1000 steps */
static long unplug_ppm;         /* unplug commands naming a real function, per 1,000,000 */
static char bdfs[16][32];
static int nbdfs;
static int dma_node = -1;       /* the DMA engine's cdev node */

static const char *fault_ops[] = {
    "VFIO_DEVICE_PCI_HOT_RESET", "VFIO_DEVICE_GET_PCI_HOT_RESET_INFO", "VFIO_DEVICE_BIND_IOMMUFD",
    "VFIO_DEVICE_ATTACH_IOMMUFD_PT", "VFIO_DEVICE_DETACH_IOMMUFD_PT", "IOMMU_IOAS_ALLOC", "IOMMU_IOAS_MAP",
    "IOMMU_IOAS_MAP_FILE", "IOMMU_IOAS_UNMAP", "IOMMU_DESTROY", "VFIO_GROUP_SET_CONTAINER",
    "VFIO_GROUP_GET_DEVICE_FD", "VFIO_SET_IOMMU", "VFIO_IOMMU_MAP_DMA", "VFIO_DEVICE_SET_IRQS",
    "VFIO_DEVICE_RESET", "VFIO_DEVICE_GET_INFO", "open", "read", "write", "*", "*",
    "open", "read", "write", "*", "*", "IOMMU_IOAS_ALLOC", "VFIO_DEVICE_BIND_IOMMUFD", "IOMMU_IOAS_MAP",
    "VFIO_BOGUS", "", "OPEN",
};
static const char *fault_errnos[] = {
    "EIO", "ENOMEM", "EBUSY", "EAGAIN", "EINVAL", "EFAULT", "ENODEV", "EPERM", "ENOSPC", "EINTR",
    "E2BIG", "EBADF", "ERESTARTSYS", "EBOGUS", "eio", "5", "",
};
#define NELEM(a) ((uint32_t)(sizeof(a) / sizeof((a)[0])))

/* a function address: one of the tree's, a short form of one, or none of them */
static const char *unplug_only; /* real unplugs name only this function */
static const char *pick_bdf(int real_ok) {
    static char out[64];
    static const char *bogus[] = {"0000:0f:1f.7", "0000:01:00.8", "01:00", "zz:00.0", "0000:01:00.0x",
                                  "vfio0", "", "ffff:ff:1f.7"};
    if (nbdfs && real_ok && chance(85)) {
        const char *b = bdfs[below(nbdfs)];
        if (chance(20) && strlen(b) > 5) snprintf(out, sizeof out, "%s", b + 5); /* 01:00.0 */
        else snprintf(out, sizeof out, "%s", b);
        return out;
    }
    return bogus[below(NELEM(bogus))];
}

static int unplug_allowed(void) { return unplug_ppm > 0 && (long)below(1000000) < unplug_ppm; }
static const char *pick_unplug(void) {
    int real = unplug_allowed();
    return real && unplug_only ? unplug_only : pick_bdf(real);
}

static size_t fault_spec(char *o, size_t cap) {
    size_t n = 0;
    uint32_t k = below(100);
    if (k < 70) {
        n += (size_t)snprintf(o + n, cap - n, "call=%s", fault_ops[below(NELEM(fault_ops))]);
        if (chance(70)) n += (size_t)snprintf(o + n, cap - n, ",nth=%u", chance(60) ? 1 + below(4) : chance(90) ? 1 + below(40) : below(3) - 1);
        if (chance(40)) {
            if (chance(30)) n += (size_t)snprintf(o + n, cap - n, ",count=all");
            else n += (size_t)snprintf(o + n, cap - n, ",count=%u", chance(95) ? 1 + below(8) : 0);
        }
        if (chance(40)) n += (size_t)snprintf(o + n, cap - n, ",device=%s", pick_bdf(1));
        if (chance(80)) n += (size_t)snprintf(o + n, cap - n, ",errno=%s", fault_errnos[below(NELEM(fault_errnos))]);
    } else if (k < 80) {
        n += (size_t)snprintf(o + n, cap - n, "unplug=%s,after=%s", pick_unplug(),
                              fault_ops[below(NELEM(fault_ops))]);
        if (chance(60)) n += (size_t)snprintf(o + n, cap - n, ",nth=%u", 1 + below(50));
    } else {
        static const char *hooks[] = {"memory-lock-busy", "device-lock-busy", "reset-fails"};
        n += (size_t)snprintf(o + n, cap - n, "%s=%s", hooks[below(3)], pick_bdf(1));
        if (chance(40)) n += (size_t)snprintf(o + n, cap - n, ",errno=%s", fault_errnos[below(NELEM(fault_errnos))]);
    }
    return n < cap ? n : cap - 1;
}

static const char *iova_text(char *o, size_t cap) {
    switch (below(8)) {
    case 0: snprintf(o, cap, "0x%llx", (unsigned long long)rnd()); break;
    case 1: snprintf(o, cap, "%u", below(1u << 24)); break;
    case 2: snprintf(o, cap, "-1"); break;
    case 3: snprintf(o, cap, "0xzz"); break;
    default: snprintf(o, cap, "0x%llx", ((unsigned long long)below(16) << 20) + below(3 * PAGE)); break;
    }
    return o;
}

/* One command written to the control file: valid, mutated or garbage. */
static void control_step(void) {
    char cmd[6000];
    size_t n = 0, cap = sizeof cmd;
    uint32_t k = below(100);
    char a[64];
    if (k < 40) {
        n = (size_t)snprintf(cmd, cap, "fault ");
        n += fault_spec(cmd + n, cap - n);
    } else if (k < 50) {
        n = (size_t)snprintf(cmd, cap, chance(90) ? "clear" : "clear now");
    } else if (k < 54) {
        n = (size_t)snprintf(cmd, cap, "unplug %s", pick_unplug());
    } else if (k < 60) {
        n = (size_t)snprintf(cmd, cap, chance(50) ? "faults" : "help");
    } else if (k < 75) {
        const char *dev = dma_node >= 0 && chance(40) ? strrchr(nodes[dma_node], '/') + 1 : pick_bdf(1);
        uint32_t len = chance(80) ? 1 + below(8192) : (chance(50) ? 0 : (1u << 20) + 1);
        n = (size_t)snprintf(cmd, cap, "dma-read %s %s %u", dev, iova_text(a, sizeof a), len);
    } else if (k < 90) {
        const char *dev = dma_node >= 0 && chance(40) ? strrchr(nodes[dma_node], '/') + 1 : pick_bdf(1);
        n = (size_t)snprintf(cmd, cap, "dma-write %s %s ", dev, iova_text(a, sizeof a));
        uint32_t bytes = chance(90) ? below(200) : below(2000);
        for (uint32_t i = 0; i < bytes && n + 3 < cap; i++) n += (size_t)snprintf(cmd + n, cap - n, "%02x", below(256));
        if (chance(10)) cmd[n++] = chance(50) ? 'g' : '7'; /* not hex, or odd length */
    } else { /* garbage */
        uint32_t g = below(5);
        if (g == 0) { n = below(64); for (size_t i = 0; i < n; i++) cmd[i] = (char)rnd(); }
        else if (g == 1) { n = 4096 + below(1500); memset(cmd, 'f', n); }
        else if (g == 2) n = (size_t)snprintf(cmd, cap, "fault call=open\nclear\n");
        else if (g == 3) n = (size_t)snprintf(cmd, cap, "\n \n");
        else n = (size_t)snprintf(cmd, cap, "fault %s", chance(50) ? "" : "call=,,,=");
    }
    if (n >= cap) n = cap - 1;
    if (k < 90 && chance(15) && n > 2) { /* mutate one byte, or cut the command short */
        if (chance(50)) cmd[below((uint32_t)n)] = (char)(32 + below(95));
        else n = 1 + below((uint32_t)n - 1);
    }
    int fd = open(ctl_path, O_RDWR | O_CLOEXEC);
    count(fd);
    if (fd < 0) return;
    count((int)write(fd, cmd, n));
    if (chance(30)) { /* the reply */
        char r[512];
        count((int)pread(fd, r, sizeof r, 0));
    }
    close(fd);
}

/* ---------------------------------------------------------------- the DMA engine */

#define REG_SRC 0x08
#define REG_DST 0x10
#define REG_LEN 0x18
#define REG_PATTERN 0x1c
#define REG_COMMAND 0x20
#define REG_STATUS 0x24

static int reg_write(int d, uint32_t off, uint64_t v, size_t size) {
    int r = (int)pwrite(d, &v, size, (off_t)off);
    count(r);
    return r;
}
static uint64_t reg_read(int d, uint32_t off, size_t size) {
    uint64_t v = 0;
    count((int)pread(d, &v, size, (off_t)off));
    return v;
}

static unsigned char *dmabuf;      /* DMA_BUF bytes of our memory, mapped at IOVA 0x100000 */
#define DMA_BUF (2u << 20)
#define BUF_IOVA 0x100000ull
#define FILE_IOVA 0x800000ull
#define RO_IOVA 0xc00000ull

static uint64_t dma_iova(void) {
    switch (below(10)) {
    case 0: return rnd();
    case 1: return FILE_IOVA + below(5 * PAGE);      /* in a MAP_FILE mapping (or past it) */
    case 2: return RO_IOVA + below(2 * PAGE);        /* read-only */
    case 3: return (uint64_t)below(64) << 20;        /* mostly unmapped */
    default: return BUF_IOVA + below(DMA_BUF);
    }
}

/* Set up the engine behind our iommufd (fds returned), or -1. */
static int dma_setup(int *iommu_out, int *ioas_out, int *memfd_out) {
    int in = find_node("iommu");
    if (in < 0 || dma_node < 0) return -1;
    int i = open_node(in), d = open_node(dma_node);
    *iommu_out = i;
    if (d < 0) return -1;
    *memfd_out = -1;
    uint32_t a[3] = {12, 0, 0};
    xcall(i, IOMMU_IOAS_ALLOC, a);
    *ioas_out = (int)a[2];
    uint32_t b[4] = {16, 0, (uint32_t)i, 0};
    if (chance(97)) xcall(d, VFIO_DEVICE_BIND_IOMMUFD, b);
    uint32_t at[3] = {12, 0, chance(95) ? a[2] : below(8)};
    if (chance(95)) xcall(d, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
    uint32_t mm[10] = {40, 1 | (1u << 1) | (1u << 2), a[2], 0};
    uint64_t *q = (uint64_t *)&mm[4];
    q[0] = (uint64_t)(uintptr_t)dmabuf; q[1] = DMA_BUF; q[2] = BUF_IOVA;
    if (chance(90)) xcall(i, IOMMU_IOAS_MAP, mm);
    if (chance(50)) { /* a read-only mapping */
        mm[1] = 1 | (1u << 2);
        q[0] = (uint64_t)(uintptr_t)(dmabuf + PAGE); q[1] = 2 * PAGE; q[2] = RO_IOVA;
        xcall(i, IOMMU_IOAS_MAP, mm);
    }
    if (chance(50)) { /* a memfd through MAP_FILE: the server keeps its own copy of the fd */
        int mf = (int)syscall(SYS_memfd_create, "fuzz", 1u /* MFD_CLOEXEC */);
        if (mf >= 0 && ftruncate(mf, 4 * PAGE) == 0) {
            uint32_t mf_[10] = {40, 1 | (1u << 1) | (1u << 2), a[2], (uint32_t)mf};
            uint64_t *fq = (uint64_t *)&mf_[4];
            fq[0] = chance(90) ? 0 : PAGE; fq[1] = chance(90) ? 4 * PAGE : 8 * PAGE; fq[2] = FILE_IOVA;
            xcall(i, IOMMU_IOAS_MAP_FILE, mf_);
        }
        if (chance(50) && mf >= 0) { close(mf); mf = -1; }
        *memfd_out = mf;
    }
    if (chance(90)) { uint16_t cmdreg = chance(90) ? 0x6 : (uint16_t)rnd(); count((int)pwrite(d, &cmdreg, 2, (off_t)(CFG_OFF + 4))); }
    if (chance(30)) { /* an interrupt eventfd: INTx, MSI or MSI-X vector 0; or REQ */
        int e = eventfd(0, EFD_CLOEXEC);
        uint32_t idx = chance(25) ? VFIO_PCI_REQ_IRQ_INDEX : below(3);
        uint32_t irq[6] = {24, (1u << 2) | (1u << 5), idx, 0, 1, (uint32_t)e};
        xcall(d, VFIO_DEVICE_SET_IRQS, irq);
        remember(e, K_EVENTFD, -1);
    }
    return d;
}

static void dma_command(int d) {
    if (chance(80)) {
        reg_write(d, REG_SRC, dma_iova(), 8);
        reg_write(d, REG_DST, dma_iova(), 8);
        uint32_t len = chance(85) ? 1 + below(3 * PAGE) : (chance(50) ? (uint32_t)rnd() : below(2) * (16u << 20));
        reg_write(d, REG_LEN, len, 4);
        if (chance(30)) reg_write(d, REG_PATTERN, rnd(), 4);
        reg_write(d, REG_COMMAND, chance(90) ? 1 + below(2) : rnd(), 4);
    } else { /* random register bytes, the doorbell among them */
        unsigned char v[16];
        for (int i = 0; i < 16; i++) v[i] = (unsigned char)rnd();
        size_t sz = 1 + below(16);
        count((int)pwrite(d, v, sz, (off_t)below(0x48)));
    }
    if (chance(60)) reg_read(d, REG_STATUS, 4);
    if (chance(40)) reg_write(d, REG_STATUS, 0xffffffffu, 4);
    if (chance(10)) reg_read(d, below(0x40), 1 + below(8));
}

static void sequence_dma(void) {
    int i = -1, ioas = 0, mf = -1;
    if (chance(90)) /* mostly, our own earlier open of the engine (which holds its binding) goes first */
        for (int k = nfds - 1; k >= 0; k--)
            if (fds[k].node == dma_node && fds[k].kind == K_NODE) drop(k);
    int d = dma_setup(&i, &ioas, &mf);
    if (d < 0) { if (i >= 0) close(i); if (mf >= 0) close(mf); return; }
    int cmds = 1 + (int)below(8);
    for (int c = 0; c < cmds; c++) dma_command(d);
    if (chance(20)) { uint32_t um[6] = {24, (uint32_t)ioas}; uint64_t *q = (uint64_t *)&um[2]; q[0] = 0; q[1] = ~0ULL; xcall(i, IOMMU_IOAS_UNMAP, um); }
    if (chance(10)) count(ioctl(d, VFIO_DEVICE_RESET));
    if (chance(20)) dma_command(d);
    if (mf >= 0) close(mf);
    if (chance(15)) { remember(i, K_NODE, find_node("iommu")); remember(d, K_NODE, dma_node); }
    else { if (i >= 0) close(i); if (d >= 0) close(d); }
}

/* iommufd, IOAS, bind, attach, our buffer mapped, bus mastering on: 0 or an errno */
static int dma_plain(int *iout, int *dout) {
    int in = find_node("iommu");
    int i = *iout = open_node(in), d = *dout = open_node(dma_node);
    if (i < 0 || d < 0) return errno;
    uint32_t a[3] = {12, 0, 0};
    uint32_t b[4] = {16, 0, (uint32_t)i, 0};
    int e = xcall(i, IOMMU_IOAS_ALLOC, a);
    if (!e) e = xcall(d, VFIO_DEVICE_BIND_IOMMUFD, b);
    uint32_t at[3] = {12, 0, a[2]};
    if (!e) e = xcall(d, VFIO_DEVICE_ATTACH_IOMMUFD_PT, at);
    uint32_t mm[10] = {40, 1 | (1u << 1) | (1u << 2), a[2], 0};
    uint64_t *q = (uint64_t *)&mm[4];
    q[0] = (uint64_t)(uintptr_t)dmabuf; q[1] = DMA_BUF; q[2] = BUF_IOVA;
    if (!e) e = xcall(i, IOMMU_IOAS_MAP, mm);
    uint16_t cmdreg = 0x6;
    if (!e && pwrite(d, &cmdreg, 2, (off_t)(CFG_OFF + 4)) != 2) e = errno;
    return e;
}

/* dmaloop: one set-up, then big copies inside our buffer until the time is up */
static long now_ms(void);
static int dma_loop(long millis) {
    int i = -1, d = -1;
    if (dma_node < 0) return 2;
    int e = dma_plain(&i, &d);
    if (e) fprintf(stderr, "dma set-up failed: errno %d (the copies fail)\n", e);
    long end = now_ms() + millis;
    uint64_t n = 0, faults = 0;
    printf("go\n");
    fflush(stdout);
    while (now_ms() < end) {
        reg_write(d, REG_SRC, BUF_IOVA, 8);
        reg_write(d, REG_DST, BUF_IOVA + (DMA_BUF / 2), 8);
        reg_write(d, REG_LEN, DMA_BUF / 2, 4);
        reg_write(d, REG_COMMAND, 1, 4);
        uint32_t st = (uint32_t)reg_read(d, REG_STATUS, 4);
        if (st & 2) faults++;
        reg_write(d, REG_STATUS, 0xffffffffu, 4);
        n++;
    }
    printf("copies %llu\nfaults %llu\n", (unsigned long long)n, (unsigned long long)faults);
    close(d);
    close(i);
    return 0;
}

/* dmacheck: a copy and a fill checked byte for byte */
static int dma_check(void) {
    int i = -1, d = -1;
    if (dma_node < 0) { printf("dma: no engine node\n"); return 0; }
    int e = dma_plain(&i, &d);
    if (e) { printf("dma: set-up failed: errno %d\n", e); return 0; }
    for (uint32_t k = 0; k < 5000; k++) dmabuf[100 + k] = (unsigned char)(k * 7 + 3);
    memset(dmabuf + 3 * PAGE, 0, 8192);
    reg_write(d, REG_SRC, BUF_IOVA + 100, 8);
    reg_write(d, REG_DST, BUF_IOVA + 3 * PAGE + 37, 8);
    reg_write(d, REG_LEN, 5000, 4);
    reg_write(d, REG_COMMAND, 1, 4);
    uint32_t st = (uint32_t)reg_read(d, REG_STATUS, 4);
    if (st != 1 || memcmp(dmabuf + 100, dmabuf + 3 * PAGE + 37, 5000)) { printf("dma: copy status 0x%x\n", st); return 0; }
    reg_write(d, REG_STATUS, 0xffffffffu, 4);
    reg_write(d, REG_DST, BUF_IOVA + 6 * PAGE, 8);
    reg_write(d, REG_LEN, 10, 4);
    reg_write(d, REG_PATTERN, 0x44332211u, 4);
    reg_write(d, REG_COMMAND, 2, 4);
    st = (uint32_t)reg_read(d, REG_STATUS, 4);
    static const unsigned char want[10] = {0x11, 0x22, 0x33, 0x44, 0x11, 0x22, 0x33, 0x44, 0x11, 0x22};
    if (st != 1 || memcmp(dmabuf + 6 * PAGE, want, 10)) { printf("dma: fill status 0x%x\n", st); return 0; }
    close(d);
    close(i);
    printf("dma ok\n");
    return 0;
}

/* chaos: fault rules on the race loop's calls armed and cleared at random */
static int chaos(long millis) {
    static const char *specs[] = {
        "call=VFIO_DEVICE_PCI_HOT_RESET,nth=%u,errno=EBUSY", "call=VFIO_DEVICE_BIND_IOMMUFD,nth=%u,errno=ENOMEM",
        "call=VFIO_DEVICE_ATTACH_IOMMUFD_PT,nth=%u,count=3,errno=EINVAL", "call=IOMMU_IOAS_ALLOC,nth=%u,errno=ENOMEM",
        "call=open,nth=%u,count=2,errno=EAGAIN", "call=VFIO_DEVICE_GET_PCI_HOT_RESET_INFO,nth=%u,errno=EFAULT",
        "call=*,nth=%u,count=5,errno=EIO", "call=write,nth=%u,errno=EIO", "call=VFIO_DEVICE_PCI_HOT_RESET,nth=%u,count=all,device=%s",
        "memory-lock-busy=%s", "device-lock-busy=%s", "reset-fails=%s,errno=EIO",
    };
    long end = now_ms() + millis;
    uint64_t armed = 0, cleared = 0;
    printf("go\n");
    fflush(stdout);
    while (now_ms() < end) {
        char cmd[256];
        int n;
        if (chance(65)) {
            uint32_t s = below(NELEM(specs));
            char spec[200];
            const char *b = nbdfs ? bdfs[below(nbdfs)] : "0000:01:00.0";
            if (s >= 9) snprintf(spec, sizeof spec, specs[s], b);
            else snprintf(spec, sizeof spec, specs[s], 1 + below(20), b);
            n = snprintf(cmd, sizeof cmd, "fault %s", spec);
            armed++;
        } else {
            n = snprintf(cmd, sizeof cmd, "clear");
            cleared++;
        }
        int fd = open(ctl_path, O_RDWR | O_CLOEXEC);
        count(fd);
        if (fd >= 0) { count((int)write(fd, cmd, (size_t)n)); close(fd); }
        usleep(1000 * below(40));
    }
    int fd = open(ctl_path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) { count((int)write(fd, "clear", 5)); close(fd); }
    printf("armed %llu\ncleared %llu\n", (unsigned long long)armed, (unsigned long long)cleared);
    print_hist();
    return 0;
}

static void step(int mode) {
    int deep = mode == 1;
    if (ctl_rate && (int)below(1000) < ctl_rate) { control_step(); return; }
    if (mode == 2 && dma_node >= 0 && chance(50)) { sequence_dma(); return; }
    if (mode != 2 && dma_node >= 0 && (int)below(1000) < (deep ? 80 : 10)) { sequence_dma(); return; }
    uint32_t c = below(1000);
    if (deep ? c < 300 : c < 15) { sequence_cdev(); return; }
    if (deep ? c < 350 : c < 22) { sequence_group(); return; }
    if (c < 420) { fuzz_ioctl(); return; }
    if (c < 560) { fuzz_rw(); return; }
    if (c < 700) {
        if (nnodes) { int nd = (int)below(nnodes); remember(open_node(nd), K_NODE, nd); }
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
    if (in < 0 || (d0n < 0 && d1n < 0)) return 2;
    if (d0n < 0) d0n = d1n; /* one function unplugged: race on the other */
    if (d1n < 0) d1n = d0n;
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
        fprintf(stderr, "usage: %s MOUNT fuzz|deep|dma|race|dmaloop|dmacheck|chaos|argsz SEED N\n", argv[0]);
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
    snprintf(ctl_path, sizeof ctl_path, "%s/.fakedev/control", mnt);
    const char *env = getenv("FUZZ_CONTROL");
    ctl_rate = env ? atoi(env) : 0;
    env = getenv("FUZZ_UNPLUG");
    unplug_ppm = env ? atol(env) : 0;
    unplug_only = getenv("FUZZ_UNPLUG_ONLY");
    env = getenv("FUZZ_DMA");
    if (env && *env) dma_node = find_node(env);
    env = getenv("FUZZ_BDFS");
    if (env) {
        char tmp[1024];
        snprintf(tmp, sizeof tmp, "%s", env);
        for (char *tok = strtok(tmp, ","); tok && nbdfs < 16; tok = strtok(NULL, ","))
            snprintf(bdfs[nbdfs++], sizeof bdfs[0], "%s", tok);
    }
    dmabuf = mmap(NULL, DMA_BUF, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dmabuf == MAP_FAILED) return 2;
    if (!strcmp(mode, "race")) return race(n);
    if (!strcmp(mode, "dmaloop") && dma_node >= 0) return dma_loop(n);
    if (!strcmp(mode, "dmaloop")) { mode = "fuzz"; n = 100000000; } /* the engine is gone: random calls */
    if (!strcmp(mode, "dmacheck")) return dma_check();
    if (!strcmp(mode, "chaos")) return chaos(n);
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
    int smode = !strcmp(mode, "deep") ? 1 : !strcmp(mode, "dma") ? 2 : 0;
    if (!smode && strcmp(mode, "fuzz")) return 2;
    if (strtoull(argv[3], NULL, 0) % 3 == 0) {
        struct sigaction sa;
        memset(&sa, 0, sizeof sa);
        sa.sa_handler = on_alarm; /* no SA_RESTART: interrupted calls may give EINTR */
        sigaction(SIGALRM, &sa, NULL);
        struct itimerval it = {{0, 300}, {0, 300}};
        setitimer(ITIMER_REAL, &it, NULL);
    }
    long t0 = now_ms();
    { int nd = (int)below(nnodes); remember(open_node(nd), K_NODE, nd); }
    printf("go\n");
    fflush(stdout);
    while ((long)calls < n) step(smode);
    for (int s = nfds - 1; s >= 0; s--) drop(s);
    printf("calls %llu\nms %ld\n", (unsigned long long)calls, now_ms() - t0);
    print_hist();
    return 0;
}
