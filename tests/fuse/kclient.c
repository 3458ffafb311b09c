/* A client of the real kernel model served through FUSE (dual-function NIC).
 * usage: kclient MOUNT cdev|split|legacy   (one "key value..." line per step)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define VFIO_SET_IOMMU 0x3b66
#define VFIO_GROUP_GET_STATUS 0x3b67
#define VFIO_GROUP_SET_CONTAINER 0x3b68
#define VFIO_GROUP_GET_DEVICE_FD 0x3b6a
#define VFIO_DEVICE_GET_INFO 0x3b6b
#define VFIO_DEVICE_GET_PCI_HOT_RESET_INFO 0x3b70
#define VFIO_DEVICE_PCI_HOT_RESET 0x3b71
#define VFIO_DEVICE_BIND_IOMMUFD 0x3b76
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT 0x3b77
#define IOMMU_IOAS_ALLOC 0x3b81

static const char *mnt;
static int xopen(const char *rel) {
    char p[512];
    snprintf(p, sizeof p, "%s/%s", mnt, rel);
    int fd = open(p, O_RDWR | O_CLOEXEC);
    if (fd < 0) { perror(p); exit(2); }
    return fd;
}
static int call(int fd, unsigned long cmd, void *arg) { return ioctl(fd, cmd, arg) < 0 ? errno : 0; }

static void bind_attach(const char *name, int dev, int iommufd, uint32_t ioas) {
    uint32_t b[4] = { 16, 0, (uint32_t)iommufd, 0 };
    int e = call(dev, VFIO_DEVICE_BIND_IOMMUFD, b);
    printf("bind %s %d devid %u\n", name, e, b[3]);
    uint32_t a[3] = { 12, 0, ioas };
    printf("attach %s %d\n", name, call(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, a));
}
static uint32_t ioas_alloc(int iommufd) {
    uint32_t a[3] = { 12, 0, 0 };
    int e = call(iommufd, IOMMU_IOAS_ALLOC, a);
    printf("ioas %d\n", e);
    return a[2];
}
static void reset(int dev) {
    uint32_t info[3 + 2 * 8] = { 12 };
    int e = call(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info);
    printf("probe %d count %u\n", e, info[2]);
    uint32_t r[3] = { 12, 0, 0 };
    printf("reset %d\n", call(dev, VFIO_DEVICE_PCI_HOT_RESET, r));
}

int main(int argc, char **argv) {
    if (argc < 3) return 2;
    mnt = argv[1];
    const char *mode = argv[2];
    if (!strcmp(mode, "cdev") || !strcmp(mode, "split")) {
        int d0 = xopen("vfio/devices/vfio0"), d1 = xopen("vfio/devices/vfio1");
        int i1 = xopen("iommu"), i2 = xopen("iommu");
        int split = !strcmp(mode, "split");
        uint32_t ioas2 = ioas_alloc(i2), ioas1 = split ? ioas_alloc(i1) : ioas2;
        bind_attach("vfio0", d0, i2, ioas2);
        bind_attach("vfio1", d1, split ? i1 : i2, ioas1);
        uint32_t info[6] = { 24 };
        int e = call(d0, VFIO_DEVICE_GET_INFO, info);
        printf("info %d regions %u irqs %u\n", e, info[2], info[3]);
        uint32_t id = 0;
        ssize_t n = pread(d0, &id, 4, 7ULL << 40);
        printf("config %zd %08x\n", n, id);
        reset(d0);
        return 0;
    }
    if (!strcmp(mode, "legacy")) {
        int c = xopen("vfio/vfio"), g = xopen("vfio/13");
        uint32_t st[2] = { 8, 0 };
        int e = call(g, VFIO_GROUP_GET_STATUS, st);
        printf("status %d flags %u\n", e, st[1]);
        printf("set_container %d\n", call(g, VFIO_GROUP_SET_CONTAINER, &c));
        int bad = 999;
        printf("set_container_badfd %d\n", call(g, VFIO_GROUP_SET_CONTAINER, &bad));
        printf("set_iommu %d\n", ioctl(c, VFIO_SET_IOMMU, 3) < 0 ? errno : 0);
        e = call(g, VFIO_GROUP_GET_STATUS, st);
        printf("status %d flags %u\n", e, st[1]);
        printf("get_device_fd %d\n", call(g, VFIO_GROUP_GET_DEVICE_FD, "0000:01:00.0"));
        return 0;
    }
    return 2;
}
