/*
 * noiommu: the VFIO no-IOMMU sequence a DPDK-like program runs on a machine
 * without an IOMMU (vfio loaded with enable_unsafe_noiommu_mode=1), using the
 * kernel uAPI only.
 *
 *   noiommu BDF
 *
 * Steps, one result line each on stdout ("tag: ..."):
 *   param     /sys/module/vfio/parameters/enable_unsafe_noiommu_mode
 *   ext       VFIO_CHECK_EXTENSION(VFIO_NOIOMMU_IOMMU) and (TYPE1v2) on a new container
 *   group     the iommu group from /sys/bus/pci/devices/BDF/iommu_group and its name
 *   status    VFIO_GROUP_GET_STATUS of /dev/vfio/noiommu-N
 *   set_container, set_iommu (VFIO_NOIOMMU_IOMMU)
 *   map_dma   VFIO_IOMMU_MAP_DMA on the container (refused: no translation)
 *   device    VFIO_GROUP_GET_DEVICE_FD (under fakedev: `fakedev run --supervise`)
 *   info      VFIO_DEVICE_GET_INFO; region0: VFIO_DEVICE_GET_REGION_INFO of BAR 0
 *   config    vendor:device read from the config region
 *   irqs      VFIO_DEVICE_SET_IRQS: one MSI-X vector to an eventfd, then disabled
 *   hr_info   VFIO_DEVICE_GET_PCI_HOT_RESET_INFO; hr_dev lines; hr_reset with the group fd
 *   cdev      the device's /dev/vfio/devices/vfioN, if its sysfs lists one; with
 *             one, VFIO_DEVICE_BIND_IOMMUFD with iommufd = -1
 * Exit status 0 when the noiommu path worked (set_iommu, device, info).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/vfio.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <unistd.h>

/* VFIO_DEVICE_BIND_IOMMUFD (6.6) is missing from older <linux/vfio.h> */
#include "vfio-uapi.h"

static const char *ename(int e)
{
	switch (e) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EBADF: return "EBADF";
	case EBUSY: return "EBUSY";
	case EINVAL: return "EINVAL";
	case ENODEV: return "ENODEV";
	case ENOTTY: return "ENOTTY";
	case ENXIO: return "ENXIO";
	case ENOSPC: return "ENOSPC";
	default: return "E?";
	}
}

static void result(const char *tag, long rc)
{
	print_result(tag, rc, ename);
}

static void print_file(const char *tag, const char *path)
{
	char buf[128] = "";
	FILE *f = fopen(path, "r");
	if (!f) {
		printf("%s: absent\n", tag);
		return;
	}
	if (!fgets(buf, sizeof(buf), f))
		buf[0] = 0;
	fclose(f);
	buf[strcspn(buf, "\n")] = 0;
	printf("%s: %s\n", tag, buf);
}

static void cdev_step(const char *bdf)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vfio-dev", bdf);
	DIR *d = opendir(path);
	struct dirent *e;
	char name[256] = "";
	while (d && (e = readdir(d)))
		if (!strncmp(e->d_name, "vfio", 4))
			snprintf(name, sizeof(name), "%s", e->d_name);
	if (d)
		closedir(d);
	if (!name[0]) {
		printf("cdev: none\n");
		return;
	}
	snprintf(path, sizeof(path), "/dev/vfio/devices/%s", name);
	int fd = open(path, O_RDWR);
	if (fd < 0) {
		printf("cdev: %s open -1 %s\n", name, ename(errno));
		return;
	}
	struct vfio_device_bind_iommufd b = { .argsz = sizeof(b), .iommufd = -1 };
	int rc = ioctl(fd, VFIO_DEVICE_BIND_IOMMUFD, &b);
	printf("cdev: %s bind(-1) %d%s%s\n", name, rc, rc < 0 ? " " : "", rc < 0 ? ename(errno) : "");
	close(fd);
}

int main(int argc, char **argv)
{
	if (argc != 2) {
		fprintf(stderr, "usage: %s BDF\n", argv[0]);
		return 2;
	}
	const char *bdf = argv[1];
	int ok = 1;

	print_file("param", "/sys/module/vfio/parameters/enable_unsafe_noiommu_mode");

	int container = open("/dev/vfio/vfio", O_RDWR);
	if (container < 0) {
		perror("/dev/vfio/vfio");
		return 1;
	}
	printf("ext: noiommu=%d type1v2=%d\n", ioctl(container, VFIO_CHECK_EXTENSION, VFIO_NOIOMMU_IOMMU),
	       ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU));

	int gid = find_group(bdf);
	char gpath[PATH_MAX], npath[PATH_MAX];
	snprintf(npath, sizeof(npath), "/sys/kernel/iommu_groups/%d/name", gid);
	char gname[128] = "";
	FILE *nf = fopen(npath, "r");
	if (nf) {
		if (!fgets(gname, sizeof(gname), nf))
			gname[0] = 0;
		fclose(nf);
		gname[strcspn(gname, "\n")] = 0;
	}
	printf("group: %d name=%s\n", gid, gname[0] ? gname : "-");
	snprintf(gpath, sizeof(gpath), "/dev/vfio/noiommu-%d", gid);
	int group = open(gpath, O_RDWR);
	if (group < 0) {
		printf("open: %s -1 %s\n", gpath, ename(errno));
		return 1;
	}

	struct vfio_group_status st = { .argsz = sizeof(st) };
	if (ioctl(group, VFIO_GROUP_GET_STATUS, &st) < 0)
		result("status", -1);
	else
		printf("status: flags=0x%x\n", st.flags);

	result("set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
	long rc = ioctl(container, VFIO_SET_IOMMU, VFIO_NOIOMMU_IOMMU);
	result("set_iommu", rc);
	ok &= rc == 0;

	static char page[4096] __attribute__((aligned(4096)));
	struct vfio_iommu_type1_dma_map map = {
		.argsz = sizeof(map),
		.flags = VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
		.vaddr = (uintptr_t)page, .iova = 0, .size = sizeof(page),
	};
	result("map_dma", ioctl(container, VFIO_IOMMU_MAP_DMA, &map));

	int dev = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, bdf);
	if (dev < 0) {
		result("device", -1);
		return 1;
	}
	printf("device: ok\n");

	struct vfio_device_info info = { .argsz = sizeof(info) };
	if (ioctl(dev, VFIO_DEVICE_GET_INFO, &info) < 0) {
		result("info", -1);
		ok = 0;
	} else {
		printf("info: flags=0x%x regions=%u irqs=%u\n", info.flags, info.num_regions, info.num_irqs);
	}

	struct vfio_region_info reg = { .argsz = sizeof(reg), .index = VFIO_PCI_BAR0_REGION_INDEX };
	if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &reg) < 0)
		result("region0", -1);
	else
		printf("region0: size=0x%llx flags=0x%x\n", (unsigned long long)reg.size, reg.flags);

	struct vfio_region_info cfg = { .argsz = sizeof(cfg), .index = VFIO_PCI_CONFIG_REGION_INDEX };
	uint16_t ids[2] = { 0, 0 };
	if (ioctl(dev, VFIO_DEVICE_GET_REGION_INFO, &cfg) < 0 ||
	    pread(dev, ids, sizeof(ids), (off_t)cfg.offset) != (ssize_t)sizeof(ids))
		result("config", -1);
	else
		printf("config: %04x:%04x\n", ids[0], ids[1]);

	int efd = eventfd(0, EFD_CLOEXEC);
	char irqbuf[sizeof(struct vfio_irq_set) + sizeof(int32_t)];
	struct vfio_irq_set *irq = (struct vfio_irq_set *)irqbuf;
	irq->argsz = sizeof(irqbuf);
	irq->flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER;
	irq->index = VFIO_PCI_MSIX_IRQ_INDEX;
	irq->start = 0;
	irq->count = 1;
	memcpy(irq->data, &efd, sizeof(int32_t));
	rc = ioctl(dev, VFIO_DEVICE_SET_IRQS, irq);
	struct vfio_irq_set off = {
		.argsz = sizeof(off), .flags = VFIO_IRQ_SET_DATA_NONE | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = VFIO_PCI_MSIX_IRQ_INDEX, .start = 0, .count = 0,
	};
	long rc2 = ioctl(dev, VFIO_DEVICE_SET_IRQS, &off);
	printf("irqs: msix=%ld off=%ld\n", rc, rc2);

	char hrbuf[sizeof(struct vfio_pci_hot_reset_info) + 8 * sizeof(struct vfio_pci_dependent_device)];
	struct vfio_pci_hot_reset_info *hr = (struct vfio_pci_hot_reset_info *)hrbuf;
	memset(hrbuf, 0, sizeof(hrbuf));
	hr->argsz = sizeof(hrbuf);
	if (ioctl(dev, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, hr) < 0) {
		result("hr_info", -1);
	} else {
		printf("hr_info: flags=0x%x count=%u\n", hr->flags, hr->count);
		for (uint32_t i = 0; i < hr->count && i < 8; i++) {
			struct vfio_pci_dependent_device *d = &hr->devices[i];
			printf("hr_dev: %04x:%02x:%02x.%x group=%u\n", d->segment, d->bus, d->devfn >> 3,
			       d->devfn & 7, d->group_id);
		}
	}
	char rbuf[sizeof(struct vfio_pci_hot_reset) + sizeof(int32_t)];
	struct vfio_pci_hot_reset *reset = (struct vfio_pci_hot_reset *)rbuf;
	reset->argsz = sizeof(rbuf);
	reset->flags = 0;
	reset->count = 1;
	memcpy(reset->group_fds, &group, sizeof(int32_t));
	result("hr_reset", ioctl(dev, VFIO_DEVICE_PCI_HOT_RESET, reset));

	cdev_step(bdf);

	close(efd);
	close(dev);
	close(group);
	close(container);
	return ok ? 0 : 1;
}
