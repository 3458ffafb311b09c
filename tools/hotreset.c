/*
 * hotreset: drive a VFIO PCI hot reset the way a VMM does, using only the
 * kernel uAPI (struct layouts and ioctl numbers are defined below, so the
 * program builds against any libc headers, including ones older than 6.6).
 *
 * cdev path (default), for each BDF given:
 *   /sys/bus/pci/devices/<BDF>/vfio-dev/vfioN -> open /dev/vfio/devices/vfioN,
 *   VFIO_DEVICE_BIND_IOMMUFD to /dev/iommu, IOMMU_IOAS_ALLOC (once per
 *   iommufd), VFIO_DEVICE_ATTACH_IOMMUFD_PT.
 * Then, on the first BDF: VFIO_DEVICE_GET_PCI_HOT_RESET_INFO with argsz 12
 * (expect ENOSPC and the count), again with room for every entry, and
 * VFIO_DEVICE_PCI_HOT_RESET with a zero-length group-fd array.
 *
 * legacy path (--legacy): /dev/vfio/vfio container, one /dev/vfio/<group>
 * per distinct iommu group, SET_CONTAINER, SET_IOMMU(TYPE1v2),
 * GROUP_GET_DEVICE_FD, then INFO and HOT_RESET with every group fd.
 *
 * Usage: hotreset [options] BDF [BDF...]
 *   --iommufd2 BDF     bind BDF to a second iommufd (repeatable)
 *   --count N          pass count N (cdev) / only the first N group fds (legacy)
 *   --no-attach        skip IOAS_ALLOC and ATTACH_IOMMUFD_PT
 *   --no-info          skip GET_PCI_HOT_RESET_INFO
 *   --no-reset         skip PCI_HOT_RESET
 *   --hold             print "ready", then wait for a line on stdin (or
 *                      SIGINT/SIGTERM) before closing everything
 *   --legacy           use groups + container instead of the cdev path
 *   --expect-bind E    expected errno of BIND_IOMMUFD on every device (default 0)
 *   --expect-info E    expected errno of the sized INFO call (default 0)
 *   --expect-reset E   expected errno of PCI_HOT_RESET (default 0)
 *   E is an errno name (EINVAL) or 0.
 *
 * Output, one event per line:
 *   bind: <BDF> vfioN devid=<id>        | bind: <BDF> vfioN -1 <ERRNO>
 *   attach: <BDF> pt_id=<id>
 *   group: <BDF> group=<G> viable=<0|1>  (legacy)
 *   probe: -1 ENOSPC flags=0x<f> count=<n>   (argsz 12 call)
 *   info: flags=0x<f> count=<n>          | info: -1 <ERRNO>
 *   dev: <BDF> devid=<id>|devid=OWNED|devid=NOT_OWNED|group=<G>
 *   reset: 0                             | reset: -1 <ERRNO>
 *   ready
 * Exit status: 0 when every result matched its expectation, 1 otherwise,
 * 2 on bad usage or when the environment is missing something.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vfio-uapi.h"

/* ---- errno names ---- */
static const struct {
	const char *name;
	int value;
} errnos[] = {
	{"EPERM", EPERM},     {"ENOENT", ENOENT},   {"EINTR", EINTR},
	{"EIO", EIO},         {"ENXIO", ENXIO},     {"E2BIG", E2BIG},
	{"EBADF", EBADF},     {"EAGAIN", EAGAIN},   {"ENOMEM", ENOMEM},
	{"EACCES", EACCES},   {"EFAULT", EFAULT},   {"EBUSY", EBUSY},
	{"EEXIST", EEXIST},   {"ENODEV", ENODEV},   {"EINVAL", EINVAL},
	{"ENOTTY", ENOTTY},   {"ENOSPC", ENOSPC},   {"ERANGE", ERANGE},
	{"ENOSYS", ENOSYS},   {"EBADFD", EBADFD},   {"EOPNOTSUPP", EOPNOTSUPP},
	{"ENOTCONN", ENOTCONN}, {"ECONNABORTED", ECONNABORTED},
	{"EADDRINUSE", EADDRINUSE}, {"EOVERFLOW", EOVERFLOW},
};

static const char *errname(int e)
{
	static char buf[16];
	for (size_t i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
		if (errnos[i].value == e)
			return errnos[i].name;
	snprintf(buf, sizeof(buf), "E%d", e);
	return buf;
}

static int parse_errno(const char *s)
{
	if (strcmp(s, "0") == 0)
		return 0;
	for (size_t i = 0; i < sizeof(errnos) / sizeof(errnos[0]); i++)
		if (strcmp(errnos[i].name, s) == 0)
			return errnos[i].value;
	fprintf(stderr, "hotreset: unknown errno name %s\n", s);
	exit(2);
}

/* ---- state ---- */
#define MAX_DEVS 64

struct dev {
	const char *bdf;
	int second;   /* bound to the second iommufd */
	int fd;       /* device fd */
	unsigned vfio; /* N of vfioN */
	int group;    /* iommu group id (legacy) */
};

static struct dev devs[MAX_DEVS];
static int ndevs;
static int failures;
static volatile sig_atomic_t stop;

static void check(const char *what, int err, int expected)
{
	if (err != expected) {
		fprintf(stderr, "hotreset: %s: got %s, expected %s\n", what,
			err ? errname(err) : "0",
			expected ? errname(expected) : "0");
		failures++;
	}
}

static void die_env(const char *what)
{
	fprintf(stderr, "hotreset: %s: %s\n", what, strerror(errno));
	exit(2);
}

static int parse_bdf(const char *bdf, unsigned *seg, unsigned *bus,
		     unsigned *devfn)
{
	unsigned d, f;
	if (sscanf(bdf, "%x:%x:%x.%x", seg, bus, &d, &f) != 4)
		return -1;
	*devfn = (d << 3) | f;
	return 0;
}

static const char *bdf_of(uint16_t seg, uint8_t bus, uint8_t devfn)
{
	static char buf[32];
	snprintf(buf, sizeof(buf), "%04x:%02x:%02x.%x", seg, bus, devfn >> 3,
		 devfn & 7);
	return buf;
}

static int ioas_alloc(int iommufd)
{
	struct iommu_ioas_alloc a = {.size = sizeof(a)};
	if (ioctl(iommufd, IOMMU_IOAS_ALLOC, &a) < 0) {
		printf("ioas: -1 %s\n", errname(errno));
		failures++;
		return -1;
	}
	printf("ioas: id=%u\n", a.out_ioas_id);
	return (int)a.out_ioas_id;
}

static void on_signal(int sig)
{
	(void)sig;
	stop = 1;
}

static void usage(void)
{
	fprintf(stderr,
		"usage: hotreset [--iommufd2 BDF]... [--count N] [--no-attach] "
		"[--no-info] [--no-reset] [--hold] [--legacy]\n"
		"                [--expect-bind E] [--expect-info E] "
		"[--expect-reset E] BDF [BDF...]\n");
	exit(2);
}

/* Two-pass GET_PCI_HOT_RESET_INFO on fd, as QEMU does. */
static void query_info(int fd, int legacy, int expect_info)
{
	struct vfio_pci_hot_reset_info hdr = {.argsz = sizeof(hdr)};
	int r = ioctl(fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, &hdr);
	int err = r < 0 ? errno : 0;
	if (r < 0 && err != ENOSPC) {
		printf("info: -1 %s\n", errname(err));
		check("GET_PCI_HOT_RESET_INFO", err, expect_info);
		fflush(stdout);
		return;
	}
	if (r < 0)
		printf("probe: -1 ENOSPC flags=0x%x count=%u\n", hdr.flags,
		       hdr.count);
	else
		printf("probe: 0 flags=0x%x count=%u\n", hdr.flags, hdr.count);

	uint32_t count = hdr.count;
	size_t size = sizeof(hdr) + count * sizeof(struct vfio_pci_dependent_device);
	struct vfio_pci_hot_reset_info *info = calloc(1, size);
	if (!info)
		die_env("calloc");
	info->argsz = (uint32_t)size;
	r = ioctl(fd, VFIO_DEVICE_GET_PCI_HOT_RESET_INFO, info);
	if (r < 0) {
		err = errno;
		printf("info: -1 %s\n", errname(err));
		check("GET_PCI_HOT_RESET_INFO", err, expect_info);
		free(info);
		fflush(stdout);
		return;
	}
	check("GET_PCI_HOT_RESET_INFO", 0, expect_info);
	printf("info: flags=0x%x count=%u\n", info->flags, info->count);
	struct vfio_pci_dependent_device *ent =
		(struct vfio_pci_dependent_device *)(info + 1);
	for (uint32_t i = 0; i < info->count && i < count; i++) {
		const char *bdf = bdf_of(ent[i].segment, ent[i].bus, ent[i].devfn);
		if (legacy)
			printf("dev: %s group=%u\n", bdf, ent[i].id);
		else if (ent[i].id == VFIO_PCI_DEVID_OWNED)
			printf("dev: %s devid=OWNED\n", bdf);
		else if (ent[i].id == VFIO_PCI_DEVID_NOT_OWNED)
			printf("dev: %s devid=NOT_OWNED\n", bdf);
		else
			printf("dev: %s devid=%u\n", bdf, ent[i].id);
	}
	free(info);
	fflush(stdout);
}

static void do_reset(int fd, const int32_t *fds, uint32_t count,
		     int expect_reset)
{
	size_t size = sizeof(struct vfio_pci_hot_reset) + count * sizeof(int32_t);
	struct vfio_pci_hot_reset *rst = calloc(1, size);
	if (!rst)
		die_env("calloc");
	rst->argsz = (uint32_t)size;
	rst->count = count;
	memcpy(rst + 1, fds, count * sizeof(int32_t));
	int r = ioctl(fd, VFIO_DEVICE_PCI_HOT_RESET, rst);
	int err = r < 0 ? errno : 0;
	if (r < 0)
		printf("reset: -1 %s\n", errname(err));
	else
		printf("reset: %d\n", r);
	check("PCI_HOT_RESET", err, expect_reset);
	free(rst);
	fflush(stdout);
}

static void hold(void)
{
	printf("ready\n");
	fflush(stdout);
	char line[64];
	while (!stop) {
		if (fgets(line, sizeof(line), stdin))
			break;
		if (feof(stdin) || (ferror(stdin) && errno != EINTR))
			break;
		clearerr(stdin);
	}
}

int main(int argc, char **argv)
{
	int do_attach = 1, do_info = 1, want_reset = 1, want_hold = 0;
	int legacy = 0;
	long count = -1;
	int expect_bind = 0, expect_info = 0, expect_reset = 0;

	setvbuf(stdout, NULL, _IOLBF, 0);
	for (int i = 1; i < argc; i++) {
		const char *a = argv[i];
		if (!strcmp(a, "--iommufd2") && i + 1 < argc) {
			if (ndevs == MAX_DEVS)
				usage();
			devs[ndevs].bdf = argv[++i];
			devs[ndevs++].second = 1;
		} else if (!strcmp(a, "--count") && i + 1 < argc) {
			count = strtol(argv[++i], NULL, 0);
		} else if (!strcmp(a, "--no-attach")) {
			do_attach = 0;
		} else if (!strcmp(a, "--no-info")) {
			do_info = 0;
		} else if (!strcmp(a, "--no-reset")) {
			want_reset = 0;
		} else if (!strcmp(a, "--hold")) {
			want_hold = 1;
		} else if (!strcmp(a, "--legacy")) {
			legacy = 1;
		} else if (!strcmp(a, "--expect-bind") && i + 1 < argc) {
			expect_bind = parse_errno(argv[++i]);
		} else if (!strcmp(a, "--expect-info") && i + 1 < argc) {
			expect_info = parse_errno(argv[++i]);
		} else if (!strcmp(a, "--expect-reset") && i + 1 < argc) {
			expect_reset = parse_errno(argv[++i]);
		} else if (a[0] == '-') {
			usage();
		} else {
			if (ndevs == MAX_DEVS)
				usage();
			devs[ndevs++].bdf = a;
		}
	}
	if (ndevs == 0)
		usage();
	for (int i = 0; i < ndevs; i++) {
		unsigned s, b, df;
		if (parse_bdf(devs[i].bdf, &s, &b, &df)) {
			fprintf(stderr, "hotreset: bad BDF %s\n", devs[i].bdf);
			return 2;
		}
	}

	struct sigaction sa = {.sa_handler = on_signal};
	sigaction(SIGINT, &sa, NULL);
	sigaction(SIGTERM, &sa, NULL);

	/* The device INFO and RESET are issued on: the first one of iommufd 1. */
	int primary = -1;
	for (int i = 0; i < ndevs; i++)
		if (!devs[i].second) {
			primary = i;
			break;
		}
	if (primary < 0)
		primary = 0;

	int32_t reset_fds[MAX_DEVS];
	uint32_t nreset_fds = 0;

	if (!legacy) {
		int iommufd[2] = {-1, -1};
		int ioas[2] = {-1, -1};
		for (int k = 0; k < 2; k++) {
			int needed = 0;
			for (int i = 0; i < ndevs; i++)
				needed |= devs[i].second == k;
			if (!needed)
				continue;
			iommufd[k] = open("/dev/iommu", O_RDWR | O_CLOEXEC);
			if (iommufd[k] < 0)
				die_env("open /dev/iommu");
			if (do_attach)
				ioas[k] = ioas_alloc(iommufd[k]);
		}
		for (int i = 0; i < ndevs; i++) {
			struct dev *d = &devs[i];
			char path[PATH_MAX];
			if (find_vfio_index(d->bdf, &d->vfio) < 0)
				die_env(d->bdf);
			snprintf(path, sizeof(path), "/dev/vfio/devices/vfio%u", d->vfio);
			d->fd = open(path, O_RDWR | O_CLOEXEC);
			if (d->fd < 0)
				die_env(path);
			struct vfio_device_bind_iommufd bind = {
				.argsz = sizeof(bind),
				.iommufd = iommufd[d->second],
			};
			if (ioctl(d->fd, VFIO_DEVICE_BIND_IOMMUFD, &bind) < 0) {
				int err = errno;
				printf("bind: %s vfio%u -1 %s\n", d->bdf, d->vfio,
				       errname(err));
				check("BIND_IOMMUFD", err, expect_bind);
				continue;
			}
			printf("bind: %s vfio%u devid=%u\n", d->bdf, d->vfio,
			       bind.out_devid);
			check("BIND_IOMMUFD", 0, expect_bind);
			if (do_attach && ioas[d->second] > 0) {
				struct vfio_device_attach_iommufd_pt at = {
					.argsz = sizeof(at),
					.pt_id = (uint32_t)ioas[d->second],
				};
				if (ioctl(d->fd, VFIO_DEVICE_ATTACH_IOMMUFD_PT, &at) < 0) {
					printf("attach: %s -1 %s\n", d->bdf,
					       errname(errno));
					failures++;
				} else {
					printf("attach: %s pt_id=%u\n", d->bdf, at.pt_id);
				}
			}
		}
		/* A non-zero count from a cdev device: fill with the iommufd. */
		if (count > 0) {
			for (long i = 0; i < count && i < MAX_DEVS; i++)
				reset_fds[nreset_fds++] = iommufd[0];
			if (count > MAX_DEVS) {
				fprintf(stderr, "hotreset: --count too large\n");
				return 2;
			}
		}
	} else {
		int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
		if (container < 0)
			die_env("open /dev/vfio/vfio");
		int api = ioctl(container, VFIO_GET_API_VERSION);
		int type1v2 = ioctl(container, VFIO_CHECK_EXTENSION, VFIO_TYPE1v2_IOMMU);
		printf("container: api=%d type1v2=%d\n", api, type1v2);
		/* a container that is not API 0 or lacks type1v2 cannot be used */
		if (api != VFIO_API_VERSION) {
			if (api >= 0)
				errno = EPROTO;
			die_env("VFIO_GET_API_VERSION");
		}
		if (type1v2 <= 0) {
			if (type1v2 == 0)
				errno = ENOTSUP;
			die_env("VFIO_CHECK_EXTENSION(TYPE1v2)");
		}
		int gids[MAX_DEVS], gfds[MAX_DEVS], ngroups = 0, iommu_set = 0;
		for (int i = 0; i < ndevs; i++) {
			struct dev *d = &devs[i];
			d->group = find_group(d->bdf);
			if (d->group < 0)
				die_env(d->bdf);
			int gfd = -1;
			for (int g = 0; g < ngroups; g++)
				if (gids[g] == d->group)
					gfd = gfds[g];
			if (gfd < 0) {
				char path[PATH_MAX];
				snprintf(path, sizeof(path), "/dev/vfio/%d", d->group);
				gfd = open(path, O_RDWR | O_CLOEXEC);
				if (gfd < 0)
					die_env(path);
				struct vfio_group_status st = {.argsz = sizeof(st)};
				if (ioctl(gfd, VFIO_GROUP_GET_STATUS, &st) < 0)
					die_env("GROUP_GET_STATUS");
				printf("group: %s group=%d viable=%d\n", d->bdf, d->group,
				       !!(st.flags & VFIO_GROUP_FLAGS_VIABLE));
				if (ioctl(gfd, VFIO_GROUP_SET_CONTAINER, &container) < 0)
					die_env("GROUP_SET_CONTAINER");
				if (!iommu_set) {
					if (ioctl(container, VFIO_SET_IOMMU,
						  VFIO_TYPE1v2_IOMMU) < 0)
						die_env("SET_IOMMU");
					iommu_set = 1;
				}
				gids[ngroups] = d->group;
				gfds[ngroups++] = gfd;
			}
			d->fd = ioctl(gfd, VFIO_GROUP_GET_DEVICE_FD, d->bdf);
			if (d->fd < 0)
				die_env("GROUP_GET_DEVICE_FD");
			printf("device: %s fd=%d\n", d->bdf, d->fd);
		}
		uint32_t n = count >= 0 ? (uint32_t)count : (uint32_t)ngroups;
		for (uint32_t g = 0; g < n && g < (uint32_t)ngroups; g++)
			reset_fds[nreset_fds++] = gfds[g];
		/* Asking for more fds than groups: pad with the container fd. */
		while (nreset_fds < n && nreset_fds < MAX_DEVS)
			reset_fds[nreset_fds++] = container;
	}

	int fd = devs[primary].fd;
	if (fd >= 0) {
		if (do_info)
			query_info(fd, legacy, expect_info);
		if (want_reset)
			do_reset(fd, reset_fds, nreset_fds, expect_reset);
	} else if (do_info || want_reset) {
		fprintf(stderr, "hotreset: %s has no usable device fd\n",
			devs[primary].bdf);
		failures++;
	}
	if (want_hold)
		hold();
	return failures ? 1 : 0;
}
