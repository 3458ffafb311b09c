/*
 * dmatest: drive fakedev's "dma-engine" device (fixtures/dma-engine.toml) the
 * way a user-space driver does, using only the kernel uAPI (definitions
 * below, so it builds against libc headers older than 6.6), and check that
 * the device's DMA really moved the bytes.
 *
 * cdev path (default): /sys/bus/pci/devices/<BDF>/vfio-dev/vfioN ->
 *   open /dev/vfio/devices/vfioN, VFIO_DEVICE_BIND_IOMMUFD to /dev/iommu,
 *   IOMMU_IOAS_ALLOC, IOMMU_IOAS_MAP of a source buffer (read-only) at
 *   SRC_IOVA and a destination buffer at DST_IOVA, VFIO_DEVICE_ATTACH_IOMMUFD_PT.
 * legacy path (--legacy): /dev/vfio/vfio, /dev/vfio/<group>, SET_CONTAINER,
 *   SET_IOMMU(TYPE1v2), GROUP_GET_DEVICE_FD, VFIO_IOMMU_MAP_DMA of the same
 *   buffers (needs `fakedev run --supervise`).
 * Then: GET_REGION_INFO for BAR0 and config, Bus Master Enable in the command
 * register (pwrite of config), an eventfd for MSI vector 0 (--intx: INTx)
 * through VFIO_DEVICE_SET_IRQS, the engine's ID register, and a COPY of LEN
 * bytes programmed by pwrite on BAR0 (SRC, DST, LEN, COMMAND); wait for the
 * eventfd; STATUS; compare.
 *
 * Options:
 *   --legacy      the group/container path
 *   --intx        use INTx instead of MSI
 *   --map-file    also IOMMU_IOAS_MAP_FILE a memfd at FILE_IOVA and copy into it
 *                 (cdev path; IOMMU_IOAS_MAP_FILE exists from Linux 6.13)
 *   --fault       also copy to an unmapped IOVA and report the fault registers
 *   --hold        print "ready", wait for a line on stdin, then print the
 *                 first 16 bytes of the destination buffer ("dst: <hex>"):
 *                 lets another program DMA into it meanwhile
 *
 * Output, one event per line:
 *   bind: <BDF> vfioN devid=<id> | device: <BDF> fd=<fd> (legacy)
 *   map: src iova=0x.. len=N | map: dst ... | map: file ...
 *   attach: pt_id=<id>
 *   id: 0x45414d44
 *   copy: status=0x1 irq=<count> ok | copy: status=0x.. irq=.. MISMATCH at <off>
 *   file: status=0x1 irq=<count> ok
 *   fill: status=0x1 ok
 *   fault: status=0x3 reason=<r> iova=0x<iova>
 *   ready / dst: <hex>
 * Exit status: 0 when every check passed, 1 when one failed, 2 when the
 * environment is missing something (a node, an ioctl that must work).
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "vfio-uapi.h"

/* ---- the engine (fakedev/kernel/vfio/pci/dma_engine.py) ---- */
#define REG_ID 0x00
#define REG_SRC 0x08
#define REG_DST 0x10
#define REG_LEN 0x18
#define REG_PATTERN 0x1c
#define REG_COMMAND 0x20
#define REG_STATUS 0x24
#define REG_FAULT_IOVA 0x28
#define REG_FAULT_REASON 0x30
#define CMD_COPY 1
#define CMD_FILL 2
#define STATUS_DONE 1u

#define PAGE 4096
#define BUF_SIZE (4 * PAGE)
#define SRC_IOVA 0x100000ull
#define DST_IOVA 0x200000ull
#define FILE_IOVA 0x300000ull
#define HOLE_IOVA 0x700000ull
#define LEN 5000u
#define SRC_OFF 100u
#define DST_OFF 37u

static int failures;
static int dev_fd = -1;
static uint64_t bar0_off, cfg_off;
static int irq_fd = -1;

static void die_env(const char *what)
{
	fprintf(stderr, "dmatest: %s: %s\n", what, strerror(errno));
	exit(2);
}

static uint64_t region_offset(uint32_t index)
{
	struct vfio_region_info r = {.argsz = sizeof(r), .index = index};
	if (ioctl(dev_fd, VFIO_DEVICE_GET_REGION_INFO, &r) < 0)
		die_env("GET_REGION_INFO");
	return r.offset;
}

static void reg_write(uint32_t reg, uint64_t value, size_t size)
{
	if (pwrite(dev_fd, &value, size, (off_t)(bar0_off + reg)) != (ssize_t)size)
		die_env("BAR0 pwrite");
}

static uint64_t reg_read(uint32_t reg, size_t size)
{
	uint64_t v = 0;
	if (pread(dev_fd, &v, size, (off_t)(bar0_off + reg)) != (ssize_t)size)
		die_env("BAR0 pread");
	return v;
}

/* Wait (at most 5 s) for the interrupt eventfd; its count, 0 on timeout. */
static uint64_t wait_irq(void)
{
	struct pollfd p = {.fd = irq_fd, .events = POLLIN};
	if (poll(&p, 1, 5000) <= 0)
		return 0;
	uint64_t n = 0;
	if (read(irq_fd, &n, sizeof(n)) != sizeof(n))
		die_env("eventfd read");
	return n;
}

/* Program one command; returns STATUS (then cleared) and stores the irq count. */
static uint32_t run(uint32_t cmd, uint64_t src, uint64_t dst, uint32_t len, uint64_t *irqs)
{
	reg_write(REG_SRC, src, 8);
	reg_write(REG_DST, dst, 8);
	reg_write(REG_LEN, len, 4);
	reg_write(REG_COMMAND, cmd, 4);
	*irqs = wait_irq();
	uint32_t status = (uint32_t)reg_read(REG_STATUS, 4);
	reg_write(REG_STATUS, 0xffffffffu, 4);
	return status;
}

static void compare(const char *tag, uint32_t status, uint64_t irqs, const unsigned char *got,
		    const unsigned char *want, size_t n)
{
	size_t i;
	for (i = 0; i < n && got[i] == want[i]; i++)
		;
	int ok = i == n && status == STATUS_DONE && irqs == 1;
	if (i == n)
		printf("%s: status=0x%x irq=%llu %s\n", tag, status, (unsigned long long)irqs,
		       ok ? "ok" : "BAD");
	else
		printf("%s: status=0x%x irq=%llu MISMATCH at %zu\n", tag, status,
		       (unsigned long long)irqs, i);
	if (!ok)
		failures++;
}

static void iommufd_map(int iommufd, uint32_t ioas, void *va, uint64_t iova, uint32_t flags,
			const char *tag)
{
	struct iommu_ioas_map m = {
		.size = sizeof(m),
		.flags = flags | IOMMU_IOAS_MAP_FIXED_IOVA,
		.ioas_id = ioas,
		.user_va = (uint64_t)(uintptr_t)va,
		.length = BUF_SIZE,
		.iova = iova,
	};
	if (ioctl(iommufd, IOMMU_IOAS_MAP, &m) < 0)
		die_env("IOMMU_IOAS_MAP");
	printf("map: %s iova=0x%llx len=%u\n", tag, (unsigned long long)iova, BUF_SIZE);
}

static void type1_map(int container, void *va, uint64_t iova, uint32_t flags, const char *tag)
{
	struct vfio_iommu_type1_dma_map m = {
		.argsz = sizeof(m),
		.flags = flags,
		.vaddr = (uint64_t)(uintptr_t)va,
		.iova = iova,
		.size = BUF_SIZE,
	};
	if (ioctl(container, VFIO_IOMMU_MAP_DMA, &m) < 0)
		die_env("VFIO_IOMMU_MAP_DMA");
	printf("map: %s iova=0x%llx len=%u\n", tag, (unsigned long long)iova, BUF_SIZE);
}

int main(int argc, char **argv)
{
	int legacy = 0, intx = 0, map_file = 0, fault = 0, hold = 0;
	const char *bdf = NULL;
	for (int i = 1; i < argc; i++) {
		if (!strcmp(argv[i], "--legacy"))
			legacy = 1;
		else if (!strcmp(argv[i], "--intx"))
			intx = 1;
		else if (!strcmp(argv[i], "--map-file"))
			map_file = 1;
		else if (!strcmp(argv[i], "--fault"))
			fault = 1;
		else if (!strcmp(argv[i], "--hold"))
			hold = 1;
		else if (argv[i][0] != '-' && !bdf)
			bdf = argv[i];
		else {
			fprintf(stderr, "usage: dmatest [--legacy] [--intx] [--map-file] [--fault] "
					"[--hold] BDF\n");
			return 2;
		}
	}
	if (!bdf || (legacy && map_file)) {
		fprintf(stderr, "dmatest: give one BDF (--map-file needs the cdev path)\n");
		return 2;
	}
	setvbuf(stdout, NULL, _IOLBF, 0);

	unsigned char *src = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				  -1, 0);
	unsigned char *dst = mmap(NULL, BUF_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				  -1, 0);
	if (src == MAP_FAILED || dst == MAP_FAILED)
		die_env("mmap");
	for (unsigned i = 0; i < BUF_SIZE; i++)
		src[i] = (unsigned char)(i * 7 + 3);

	int iommufd = -1, memfd = -1;
	uint32_t ioas = 0;
	unsigned char *file_view = NULL;
	if (!legacy) {
		unsigned index;
		char path[64];
		if (find_vfio_index(bdf, &index) < 0)
			die_env("find vfio-dev");
		snprintf(path, sizeof(path), "/dev/vfio/devices/vfio%u", index);
		dev_fd = open(path, O_RDWR | O_CLOEXEC);
		if (dev_fd < 0)
			die_env(path);
		iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
		if (iommufd < 0)
			die_env("/dev/iommu");
		struct vfio_device_bind_iommufd b = {.argsz = sizeof(b), .iommufd = iommufd};
		if (ioctl(dev_fd, VFIO_DEVICE_BIND_IOMMUFD, &b) < 0)
			die_env("BIND_IOMMUFD");
		printf("bind: %s vfio%u devid=%u\n", bdf, index, b.out_devid);
		struct iommu_ioas_alloc a = {.size = sizeof(a)};
		if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &a) < 0)
			die_env("IOAS_ALLOC");
		ioas = a.out_ioas_id;
		iommufd_map(iommufd, ioas, src, SRC_IOVA, IOMMU_IOAS_MAP_READABLE, "src");
		iommufd_map(iommufd, ioas, dst, DST_IOVA,
			    IOMMU_IOAS_MAP_READABLE | IOMMU_IOAS_MAP_WRITEABLE, "dst");
		if (map_file) {
			memfd = (int)syscall(SYS_memfd_create, "dmatest", 0u);
			if (memfd < 0 || ftruncate(memfd, BUF_SIZE) < 0)
				die_env("memfd");
			file_view = mmap(NULL, BUF_SIZE, PROT_READ, MAP_SHARED, memfd, 0);
			if (file_view == MAP_FAILED)
				die_env("mmap memfd");
			struct iommu_ioas_map_file mf = {
				.size = sizeof(mf),
				.flags = IOMMU_IOAS_MAP_FIXED_IOVA | IOMMU_IOAS_MAP_READABLE |
					 IOMMU_IOAS_MAP_WRITEABLE,
				.ioas_id = ioas,
				.fd = memfd,
				.start = 0,
				.length = BUF_SIZE,
				.iova = FILE_IOVA,
			};
			if (ioctl(iommufd, IOMMU_IOAS_MAP_FILE, &mf) < 0)
				die_env("IOMMU_IOAS_MAP_FILE");
			printf("map: file iova=0x%llx len=%u\n", (unsigned long long)FILE_IOVA,
			       BUF_SIZE);
		}
		struct vfio_device_attach_iommufd_pt at = {.argsz = sizeof(at), .pt_id = ioas};
		if (ioctl(dev_fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at) < 0)
			die_env("ATTACH_IOMMUFD_PT");
		printf("attach: pt_id=%u\n", at.pt_id);
	} else {
		char path[64];
		int group = find_group(bdf);
		if (group < 0)
			die_env("find iommu_group");
		int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
		if (container < 0)
			die_env("/dev/vfio/vfio");
		snprintf(path, sizeof(path), "/dev/vfio/%d", group);
		int gfd = open(path, O_RDWR | O_CLOEXEC);
		if (gfd < 0)
			die_env(path);
		if (ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &container) < 0)
			die_env("SET_CONTAINER");
		if (ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU) < 0)
			die_env("SET_IOMMU");
		dev_fd = ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, bdf);
		if (dev_fd < 0)
			die_env("GROUP_GET_DEVICE_FD");
		printf("device: %s fd=%d\n", bdf, dev_fd);
		type1_map(container, src, SRC_IOVA, VFIO_DMA_MAP_FLAG_READ, "src");
		type1_map(container, dst, DST_IOVA, VFIO_DMA_MAP_FLAG_READ | VFIO_DMA_MAP_FLAG_WRITE,
			  "dst");
	}

	bar0_off = region_offset(0);
	cfg_off = region_offset(VFIO_PCI_CONFIG_REGION_INDEX);
	uint16_t command = 0;
	if (pread(dev_fd, &command, 2, (off_t)(cfg_off + 4)) != 2)
		die_env("config pread");
	command |= 0x4; /* PCI_COMMAND_MASTER */
	if (pwrite(dev_fd, &command, 2, (off_t)(cfg_off + 4)) != 2)
		die_env("config pwrite");

	irq_fd = eventfd(0, EFD_CLOEXEC);
	if (irq_fd < 0)
		die_env("eventfd");
	struct vfio_irq_set irq = {
		.argsz = sizeof(irq),
		.flags = VFIO_IRQ_SET_DATA_EVENTFD | VFIO_IRQ_SET_ACTION_TRIGGER,
		.index = intx ? VFIO_PCI_INTX_IRQ_INDEX : VFIO_PCI_MSI_IRQ_INDEX,
		.start = 0,
		.count = 1,
		.data = {irq_fd},
	};
	if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &irq) < 0)
		die_env("SET_IRQS");

	printf("id: 0x%08llx\n", (unsigned long long)reg_read(REG_ID, 4));

	uint64_t irqs;
	uint32_t st = run(CMD_COPY, SRC_IOVA + SRC_OFF, DST_IOVA + DST_OFF, LEN, &irqs);
	compare("copy", st, irqs, dst + DST_OFF, src + SRC_OFF, LEN);
	if (intx) {
		/* INTx automasks on delivery: unmasking is the driver's job */
		struct vfio_irq_set um = {.argsz = 20, .flags = 1u | (1u << 4), .index = 0,
					  .start = 0, .count = 1};
		if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &um) < 0)
			die_env("INTx unmask");
	}

	if (map_file) {
		st = run(CMD_COPY, SRC_IOVA, FILE_IOVA + PAGE, 2 * PAGE, &irqs);
		compare("file", st, irqs, file_view + PAGE, src, 2 * PAGE);
	}

	unsigned char want[64];
	for (unsigned i = 0; i < sizeof(want); i++)
		want[i] = (unsigned char)(0x11 * ((i % 4) + 1));
	reg_write(REG_PATTERN, 0x44332211u, 4);
	st = run(CMD_FILL, 0, DST_IOVA + 2 * PAGE, sizeof(want), &irqs);
	compare("fill", st, irqs, dst + 2 * PAGE, want, sizeof(want));
	if (intx) {
		struct vfio_irq_set um = {.argsz = 20, .flags = 1u | (1u << 4), .index = 0,
					  .start = 0, .count = 1};
		if (ioctl(dev_fd, VFIO_DEVICE_SET_IRQS, &um) < 0)
			die_env("INTx unmask");
	}

	if (fault) {
		reg_write(REG_SRC, SRC_IOVA, 8);
		reg_write(REG_DST, HOLE_IOVA, 8);
		reg_write(REG_LEN, 16, 4);
		reg_write(REG_COMMAND, CMD_COPY, 4);
		wait_irq();
		printf("fault: status=0x%llx reason=%llu iova=0x%llx\n",
		       (unsigned long long)reg_read(REG_STATUS, 4),
		       (unsigned long long)reg_read(REG_FAULT_REASON, 4),
		       (unsigned long long)reg_read(REG_FAULT_IOVA, 8));
		reg_write(REG_STATUS, 0xffffffffu, 4);
	}

	if (hold) {
		char line[64];
		printf("ready\n");
		if (!fgets(line, sizeof(line), stdin))
			line[0] = 0;
		printf("dst: ");
		for (int i = 0; i < 16; i++)
			printf("%02x", dst[i]);
		printf("\n");
	}
	return failures ? 1 : 0;
}
