/*
 * vfio-uapi.h: the VFIO and iommufd uAPI the C clients in tools/ use
 * (include/uapi/linux/vfio.h and iommufd.h as of 6.6, plus the 6.16 bind
 * layout), and the small sysfs and printing helpers they share.
 *
 * Debian 12's linux-libc-dev (6.1) has no iommufd.h and no cdev ioctls, so
 * the clients carry these definitions themselves. A client that includes
 * <linux/vfio.h> before this header keeps that header's definitions of what
 * 6.1 already has; only the newer ones below are added.
 *
 * Include it after the system headers (and after _GNU_SOURCE is defined).
 * Only definitions and static inline functions live here: no state.
 */
#ifndef FAKEDEV_VFIO_UAPI_H
#define FAKEDEV_VFIO_UAPI_H

#include <dirent.h>
#include <errno.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* _IO(';', nr): every VFIO and iommufd ioctl number is a plain _IO. */
#define VFIO_UAPI_IO(nr) ((unsigned long)((0x3b << 8) | (nr)))

/* ---- what <linux/vfio.h> 6.1 has too ---- */
#ifndef VFIO_H

#define VFIO_TYPE 0x3b
#define VFIO_BASE 100

#define VFIO_GET_API_VERSION VFIO_UAPI_IO(100 + 0)
#define VFIO_CHECK_EXTENSION VFIO_UAPI_IO(100 + 1)
#define VFIO_SET_IOMMU VFIO_UAPI_IO(100 + 2)
#define VFIO_GROUP_GET_STATUS VFIO_UAPI_IO(100 + 3)
#define VFIO_GROUP_SET_CONTAINER VFIO_UAPI_IO(100 + 4)
#define VFIO_GROUP_GET_DEVICE_FD VFIO_UAPI_IO(100 + 6)
#define VFIO_DEVICE_GET_INFO VFIO_UAPI_IO(100 + 7)
#define VFIO_DEVICE_GET_REGION_INFO VFIO_UAPI_IO(100 + 8)
#define VFIO_DEVICE_SET_IRQS VFIO_UAPI_IO(100 + 10)
#define VFIO_DEVICE_RESET VFIO_UAPI_IO(100 + 11)
#define VFIO_DEVICE_GET_PCI_HOT_RESET_INFO VFIO_UAPI_IO(100 + 12)
#define VFIO_DEVICE_PCI_HOT_RESET VFIO_UAPI_IO(100 + 13)
#define VFIO_IOMMU_MAP_DMA VFIO_UAPI_IO(100 + 13)
#define VFIO_DEVICE_FEATURE VFIO_UAPI_IO(100 + 17)

#define VFIO_API_VERSION 0
#define VFIO_TYPE1v2_IOMMU 3
#define VFIO_GROUP_FLAGS_VIABLE (1u << 0)
#define VFIO_PCI_CONFIG_REGION_INDEX 7
#define VFIO_PCI_INTX_IRQ_INDEX 0
#define VFIO_PCI_MSI_IRQ_INDEX 1
#define VFIO_PCI_REQ_IRQ_INDEX 4
#define VFIO_IRQ_SET_DATA_EVENTFD (1u << 2)
#define VFIO_IRQ_SET_ACTION_TRIGGER (1u << 5)
#define VFIO_DMA_MAP_FLAG_READ (1u << 0)
#define VFIO_DMA_MAP_FLAG_WRITE (1u << 1)
#define VFIO_DEVICE_FEATURE_GET (1u << 16)
#define VFIO_DEVICE_FEATURE_SET (1u << 17)
#define VFIO_DEVICE_FEATURE_PROBE (1u << 18)
#define VFIO_DEVICE_FEATURE_PCI_VF_TOKEN 0u

struct vfio_group_status {
	uint32_t argsz;
	uint32_t flags;
};

struct vfio_device_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t num_regions;
	uint32_t num_irqs;
	uint32_t cap_offset;
	uint32_t pad;
};

struct vfio_region_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t cap_offset;
	uint64_t size;
	uint64_t offset;
};

struct vfio_irq_set {
	uint32_t argsz;
	uint32_t flags;
	uint32_t index;
	uint32_t start;
	uint32_t count;
	int32_t data[1]; /* one eventfd */
};

struct vfio_iommu_type1_dma_map {
	uint32_t argsz;
	uint32_t flags;
	uint64_t vaddr;
	uint64_t iova;
	uint64_t size;
};

struct vfio_pci_dependent_device {
	uint32_t id; /* group_id or devid */
	uint16_t segment;
	uint8_t bus;
	uint8_t devfn;
};

struct vfio_pci_hot_reset_info {
	uint32_t argsz;
	uint32_t flags;
	uint32_t count;
	/* struct vfio_pci_dependent_device devices[]; */
};

struct vfio_pci_hot_reset {
	uint32_t argsz;
	uint32_t flags;
	uint32_t count;
	/* int32_t group_fds[]; */
};

_Static_assert(sizeof(struct vfio_device_info) == 24, "device_info size");
_Static_assert(sizeof(struct vfio_region_info) == 32, "region size");
_Static_assert(sizeof(struct vfio_irq_set) == 24, "irq_set size");
_Static_assert(sizeof(struct vfio_iommu_type1_dma_map) == 32, "dma_map size");
_Static_assert(sizeof(struct vfio_pci_dependent_device) == 8, "dep size");
_Static_assert(sizeof(struct vfio_pci_hot_reset_info) == 12, "info size");
_Static_assert(sizeof(struct vfio_pci_hot_reset) == 12, "reset size");

#endif /* VFIO_H */

/* ---- newer than 6.1: device cdev (6.6), iommufd ---- */
#define IOMMUFD_CMD_BASE 0x80

#define VFIO_DEVICE_BIND_IOMMUFD VFIO_UAPI_IO(100 + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT VFIO_UAPI_IO(100 + 19)
#define VFIO_DEVICE_DETACH_IOMMUFD_PT VFIO_UAPI_IO(100 + 20)
#define IOMMU_DESTROY VFIO_UAPI_IO(0x80 + 0x00)
#define IOMMU_IOAS_ALLOC VFIO_UAPI_IO(0x80 + 0x01)
#define IOMMU_IOAS_MAP VFIO_UAPI_IO(0x80 + 0x05)
#define IOMMU_IOAS_UNMAP VFIO_UAPI_IO(0x80 + 0x06)
#define IOMMU_IOAS_MAP_FILE VFIO_UAPI_IO(0x80 + 0x0f)

#define VFIO_PCI_DEVID_OWNED 0u
#define VFIO_PCI_DEVID_NOT_OWNED 0xffffffffu
#define VFIO_DEVICE_BIND_FLAG_TOKEN (1u << 0)
#define IOMMU_IOAS_MAP_FIXED_IOVA (1u << 0)
#define IOMMU_IOAS_MAP_WRITEABLE (1u << 1)
#define IOMMU_IOAS_MAP_READABLE (1u << 2)

/* The 6.6 layout (6.16+ kernels accept it: argsz below the token field). */
struct vfio_device_bind_iommufd {
	uint32_t argsz;
	uint32_t flags;
	int32_t iommufd;
	uint32_t out_devid;
};

/* The 6.16+ layout; 6.6-6.15 kernels read the first 16 bytes (flags must be 0) */
struct vfio_device_bind_iommufd_token {
	uint32_t argsz;
	uint32_t flags;
	int32_t iommufd;
	uint32_t out_devid;
	uint64_t token_uuid_ptr;
};

struct vfio_device_attach_iommufd_pt {
	uint32_t argsz;
	uint32_t flags;
	uint32_t pt_id;
};

/* struct vfio_device_feature followed by the 16 bytes of a PCI_VF_TOKEN. */
struct vfio_device_feature_token {
	uint32_t argsz;
	uint32_t flags;
	uint8_t uuid[16];
};

struct iommu_ioas_alloc {
	uint32_t size;
	uint32_t flags;
	uint32_t out_ioas_id;
};

struct iommu_ioas_map {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	uint32_t __reserved;
	uint64_t user_va;
	uint64_t length;
	uint64_t iova;
};

struct iommu_ioas_map_file {
	uint32_t size;
	uint32_t flags;
	uint32_t ioas_id;
	int32_t fd;
	uint64_t start;
	uint64_t length;
	uint64_t iova;
};

_Static_assert(sizeof(struct vfio_device_bind_iommufd) == 16, "bind size");
_Static_assert(sizeof(struct vfio_device_bind_iommufd_token) == 24, "bind token size");
_Static_assert(sizeof(struct vfio_device_attach_iommufd_pt) == 12, "attach size");
_Static_assert(sizeof(struct vfio_device_feature_token) == 24, "feature token size");
_Static_assert(sizeof(struct iommu_ioas_alloc) == 12, "ioas size");
_Static_assert(sizeof(struct iommu_ioas_map) == 40, "map size");
_Static_assert(sizeof(struct iommu_ioas_map_file) == 40, "map_file size");

/* ---- helpers ---- */

/* Find N such that /sys/bus/pci/devices/<BDF>/vfio-dev/vfioN exists. */
static inline int find_vfio_index(const char *bdf, unsigned *index)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vfio-dev", bdf);
	DIR *d = opendir(path);
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while ((e = readdir(d))) {
		if (sscanf(e->d_name, "vfio%u", index) == 1) {
			found = 0;
			break;
		}
	}
	closedir(d);
	if (found)
		errno = ENOENT;
	return found;
}

/* The group number of <BDF> from its iommu_group link; -1 without one. */
static inline int find_group(const char *bdf)
{
	char path[PATH_MAX], target[PATH_MAX];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/iommu_group", bdf);
	ssize_t n = readlink(path, target, sizeof(target) - 1);
	if (n < 0)
		return -1;
	target[n] = 0;
	const char *base = strrchr(target, '/');
	return atoi(base ? base + 1 : target);
}

/* "tag: rc", or "tag: -1 NAME" with NAME = errno_name(errno); then flush. */
static inline void print_result(const char *tag, long rc, const char *(*errno_name)(int))
{
	if (rc < 0)
		printf("%s: -1 %s\n", tag, errno_name(errno));
	else
		printf("%s: %ld\n", tag, rc);
	fflush(stdout);
}

#endif /* FAKEDEV_VFIO_UAPI_H */
