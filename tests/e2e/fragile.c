/*
 * fragile: a small VFIO cdev client with deliberate bugs in its error paths,
 * for testing `fakedev sweep`. It makes six calls, in this order:
 *   1 open /dev/iommu   2 IOMMU_IOAS_ALLOC   3 open /dev/vfio/devices/vfio0
 *   4 VFIO_DEVICE_BIND_IOMMUFD   5 VFIO_DEVICE_ATTACH_IOMMUFD_PT
 *   6 VFIO_DEVICE_GET_INFO
 * A failure of any of them makes it exit 1, except:
 *   - a failed VFIO_DEVICE_GET_INFO: it uses the info through a NULL pointer
 *     (SIGSEGV);
 *   - with --hang-on-bind, a failed VFIO_DEVICE_BIND_IOMMUFD: it waits forever.
 * Success prints "regions N irqs M" and exits 0.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#define IO_NR(nr) ((unsigned long)((0x3b << 8) | (nr)))
#define VFIO_DEVICE_GET_INFO IO_NR(100 + 7)
#define VFIO_DEVICE_BIND_IOMMUFD IO_NR(100 + 18)
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT IO_NR(100 + 19)
#define IOMMU_IOAS_ALLOC IO_NR(0x80 + 1)

struct vfio_device_info {
	uint32_t argsz, flags, num_regions, num_irqs, cap_offset, pad;
};
struct vfio_device_bind_iommufd {
	uint32_t argsz, flags;
	int32_t iommufd;
	uint32_t out_devid;
};
struct vfio_device_attach_iommufd_pt {
	uint32_t argsz, flags, pt_id;
};
struct iommu_ioas_alloc {
	uint32_t size, flags, out_ioas_id;
};

static int fail(const char *what)
{
	printf("%s: %s\n", what, strerror(errno));
	return 1;
}

int main(int argc, char **argv)
{
	int hang_on_bind = argc > 1 && strcmp(argv[1], "--hang-on-bind") == 0;
	int iommufd = open("/dev/iommu", O_RDWR);
	if (iommufd < 0)
		return fail("open /dev/iommu");
	struct iommu_ioas_alloc ioas = {.size = sizeof(ioas)};
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &ioas) < 0)
		return fail("IOAS_ALLOC");
	int dev = open("/dev/vfio/devices/vfio0", O_RDWR);
	if (dev < 0)
		return fail("open vfio0");
	struct vfio_device_bind_iommufd bind = {.argsz = sizeof(bind), .iommufd = iommufd};
	if (ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0) {
		if (hang_on_bind) {
			printf("bind failed, waiting\n");
			fflush(stdout);
			for (;;)
				pause();
		}
		return fail("BIND_IOMMUFD");
	}
	struct vfio_device_attach_iommufd_pt attach = {.argsz = sizeof(attach), .pt_id = ioas.out_ioas_id};
	if (ioctl(dev, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &attach) < 0)
		return fail("ATTACH_IOMMUFD_PT");
	struct vfio_device_info buf = {.argsz = sizeof(buf)};
	struct vfio_device_info *volatile info = &buf;
	if (ioctl(dev, VFIO_DEVICE_GET_INFO, &buf) < 0)
		info = NULL; /* the bug: the error path goes on with no info */
	printf("regions %u irqs %u\n", info->num_regions, info->num_irqs);
	close(dev);
	close(iommufd);
	return 0;
}
