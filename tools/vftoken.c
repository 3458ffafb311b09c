/*
 * vftoken: the SR-IOV VF token handshake between a PF's user and a VF's
 * user, using the kernel uAPI only.
 *
 *   vftoken PF VF UUID
 *
 * PF side (device cdev): /sys/bus/pci/devices/PF/vfio-dev/vfioN ->
 * /dev/vfio/devices/vfioN, VFIO_DEVICE_BIND_IOMMUFD to /dev/iommu, then
 * VFIO_DEVICE_FEATURE(PCI_VF_TOKEN | PROBE | SET) and (PCI_VF_TOKEN | SET)
 * with the 16 bytes of UUID. VF side (legacy group): /dev/vfio/vfio, the
 * VF's /dev/vfio/<group>, SET_CONTAINER, SET_IOMMU(TYPE1v2), then
 * VFIO_GROUP_GET_DEVICE_FD with "VF" (no token), "VF vf_token=<other uuid>"
 * (a wrong one) and "VF vf_token=UUID". Under fakedev the group's
 * GET_DEVICE_FD needs `fakedev run --supervise`.
 *
 * One result line per step on stdout ("tag: ..."):
 *   pf_bind, probe, set_token, param (vfio_pci enable_sriov), physfn (the
 *   VF's physfn link), set_container, set_iommu, missing, wrong, vf_open,
 *   vf_info, vf_feature (the token feature on the VF: ENOTTY), pf_bind2 (a
 *   second PF cdev bound without a token while the VF is open; 6.16+ only)
 * Exit status 0 when missing and wrong failed with EACCES and vf_open worked.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include "vfio-uapi.h"

static const char *ename(int e)
{
	switch (e) {
	case EPERM: return "EPERM";
	case ENOENT: return "ENOENT";
	case EACCES: return "EACCES";
	case EBUSY: return "EBUSY";
	case EINVAL: return "EINVAL";
	case ENODEV: return "ENODEV";
	case ENOTTY: return "ENOTTY";
	case EFAULT: return "EFAULT";
	default: return "E?";
	}
}

static void result(const char *tag, long rc)
{
	print_result(tag, rc, ename);
}

static int parse_uuid(const char *s, uint8_t out[16])
{
	if (strlen(s) != 36)
		return -1;
	int n = 0;
	for (int i = 0; i < 36; i++) {
		if (i == 8 || i == 13 || i == 18 || i == 23) {
			if (s[i] != '-')
				return -1;
			continue;
		}
		char hex[3] = {s[i], s[i + 1], 0};
		char *end;
		long v = strtol(hex, &end, 16);
		if (*end)
			return -1;
		out[n++] = (uint8_t)v;
		i++;
	}
	return n == 16 ? 0 : -1;
}

static int vfio_index(const char *bdf)
{
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/vfio-dev", bdf);
	DIR *d = opendir(path);
	if (!d)
		return -1;
	struct dirent *e;
	int found = -1;
	while ((e = readdir(d)) != NULL)
		if (strncmp(e->d_name, "vfio", 4) == 0 && e->d_name[4] >= '0' && e->d_name[4] <= '9')
			found = atoi(e->d_name + 4);
	closedir(d);
	return found;
}

static void print_link(const char *tag, const char *bdf, const char *name)
{
	char path[PATH_MAX], target[PATH_MAX];
	snprintf(path, sizeof(path), "/sys/bus/pci/devices/%s/%s", bdf, name);
	ssize_t n = readlink(path, target, sizeof(target) - 1);
	if (n < 0) {
		printf("%s: absent\n", tag);
		return;
	}
	target[n] = 0;
	const char *base = strrchr(target, '/');
	printf("%s: %s\n", tag, base ? base + 1 : target);
}

static void print_file(const char *tag, const char *path)
{
	char buf[64] = "";
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

/* Open the cdev of BDF and bind it to a new iommufd; token NULL: no token. */
static int bind_cdev(const char *bdf, const uint8_t *token, const char *tag)
{
	int idx = vfio_index(bdf);
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/dev/vfio/devices/vfio%d", idx);
	int dev = open(path, O_RDWR | O_CLOEXEC);
	int iommufd = open("/dev/iommu", O_RDWR | O_CLOEXEC);
	if (idx < 0 || dev < 0 || iommufd < 0) {
		printf("%s: open %s failed: %s\n", tag, path, strerror(errno));
		return -1;
	}
	struct vfio_device_bind_iommufd_token bind = {
		.argsz = sizeof(bind),
		.flags = token ? VFIO_DEVICE_BIND_FLAG_TOKEN : 0,
		.iommufd = iommufd,
		.token_uuid_ptr = (uint64_t)(uintptr_t)token,
	};
	int rc = ioctl(dev, VFIO_DEVICE_BIND_IOMMUFD, &bind);
	result(tag, rc);
	return rc < 0 ? -1 : dev;
}

static int get_device_fd(int group, const char *name, const char *tag)
{
	int fd = ioctl(group, VFIO_GROUP_GET_DEVICE_FD, name);
	if (fd < 0)
		result(tag, fd);
	else {
		printf("%s: ok\n", tag);
		fflush(stdout);
	}
	return fd;
}

int main(int argc, char **argv)
{
	if (argc != 4) {
		fprintf(stderr, "usage: %s PF VF UUID\n", argv[0]);
		return 2;
	}
	const char *pf = argv[1], *vf = argv[2], *text = argv[3];
	uint8_t token[16];
	if (parse_uuid(text, token) < 0) {
		fprintf(stderr, "not a UUID: %s\n", text);
		return 2;
	}

	int pfd = bind_cdev(pf, NULL, "pf_bind");
	if (pfd < 0)
		return 1;
	struct vfio_device_feature_token feat = {
		.argsz = sizeof(feat),
		.flags = VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | VFIO_DEVICE_FEATURE_PROBE |
			 VFIO_DEVICE_FEATURE_SET,
	};
	result("probe", ioctl(pfd, VFIO_DEVICE_FEATURE, &feat));
	feat.flags = VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | VFIO_DEVICE_FEATURE_SET;
	memcpy(feat.uuid, token, sizeof(token));
	result("set_token", ioctl(pfd, VFIO_DEVICE_FEATURE, &feat));

	print_file("param", "/sys/module/vfio_pci/parameters/enable_sriov");
	print_link("physfn", vf, "physfn");

	int gid = find_group(vf);
	char path[PATH_MAX];
	snprintf(path, sizeof(path), "/dev/vfio/%d", gid);
	int container = open("/dev/vfio/vfio", O_RDWR | O_CLOEXEC);
	int group = open(path, O_RDWR | O_CLOEXEC);
	if (gid < 0 || container < 0 || group < 0) {
		printf("group: open %s failed: %s\n", path, strerror(errno));
		return 1;
	}
	result("set_container", ioctl(group, VFIO_GROUP_SET_CONTAINER, &container));
	result("set_iommu", ioctl(container, VFIO_SET_IOMMU, VFIO_TYPE1v2_IOMMU));

	char name[128];
	int ok = 1;
	int fd = get_device_fd(group, vf, "missing");
	ok &= fd < 0 && errno == EACCES;
	/* the same UUID with its last digit changed */
	snprintf(name, sizeof(name), "%s vf_token=%.35s%c", vf, text, text[35] == '0' ? '1' : '0');
	fd = get_device_fd(group, name, "wrong");
	ok &= fd < 0 && errno == EACCES;
	snprintf(name, sizeof(name), "%s vf_token=%s", vf, text);
	int vfd = get_device_fd(group, name, "vf_open");
	ok &= vfd >= 0;
	if (vfd >= 0) {
		struct vfio_device_info info = {.argsz = sizeof(info)};
		if (ioctl(vfd, VFIO_DEVICE_GET_INFO, &info) < 0)
			result("vf_info", -1);
		else
			printf("vf_info: flags=0x%x regions=%u irqs=%u\n", info.flags, info.num_regions,
			       info.num_irqs);
		feat.flags = VFIO_DEVICE_FEATURE_PCI_VF_TOKEN | VFIO_DEVICE_FEATURE_PROBE |
			     VFIO_DEVICE_FEATURE_SET;
		result("vf_feature", ioctl(vfd, VFIO_DEVICE_FEATURE, &feat));
	}
	(void)bind_cdev(pf, NULL, "pf_bind2");
	return ok ? 0 : 1;
}
