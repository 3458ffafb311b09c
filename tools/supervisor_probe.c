/*
 * Test program for fakedev.host.supervisor: makes the system calls the
 * supervisor traps, with raw syscall() so that the exact call is known, and
 * prints one "key value..." line per result.
 *
 *   supervisor_probe getfd NAME PATH      open PATH, ioctl(fd, 0x3b6a, NAME), use the new fd
 *   supervisor_probe fork-getfd NAME PATH the same in a forked child
 *   supervisor_probe other PATH           ioctls that are not trapped or not ours
 *   supervisor_probe stat PATH [LINK]     every stat variant on PATH (and LINK)
 *   supervisor_probe pending PATH         one GET_DEVICE_FD, then show the process still works
 *   supervisor_probe threads NAME PATH N  N threads call GET_DEVICE_FD at once
 *   supervisor_probe signal NAME PATH     GET_DEVICE_FD with an SA_RESTART SIGUSR1 handler
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <linux/stat.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysmacros.h>
#include <sys/wait.h>
#include <unistd.h>

#define GET_DEVICE_FD 0x3b6a

static void use_fd(int fd)
{
	char buf[16] = {0};
	int fl = fcntl(fd, F_GETFD);
	printf("cloexec %d\n", (fl & FD_CLOEXEC) ? 1 : 0);
	if (write(fd, "ping", 4) != 4)
		printf("write-errno %d\n", errno);
	lseek(fd, 0, SEEK_SET);
	ssize_t n = read(fd, buf, sizeof(buf) - 1);
	printf("read %zd %s\n", n, buf);
}

static int getfd(const char *name, const char *path)
{
	int gfd = open(path, O_RDWR);
	if (gfd < 0) {
		printf("open-errno %d\n", errno);
		return 1;
	}
	long r = syscall(SYS_ioctl, gfd, GET_DEVICE_FD, name);
	printf("getfd %ld %d\n", r, r < 0 ? errno : 0);
	printf("groupfd %d\n", gfd);
	if (r >= 0)
		use_fd((int)r);
	fflush(stdout);
	return 0;
}

static const char *g_name;
static int g_group;

static void *thread_getfd(void *arg)
{
	long r = syscall(SYS_ioctl, g_group, GET_DEVICE_FD, g_name);
	printf("thread%ld %ld %d\n", (long)arg, r, r < 0 ? errno : 0);
	return NULL;
}

static int threads(const char *name, const char *path, int n)
{
	pthread_t t[64];
	g_name = name;
	g_group = open(path, O_RDWR);
	for (long i = 0; i < n && i < 64; i++)
		pthread_create(&t[i], NULL, thread_getfd, (void *)i);
	for (int i = 0; i < n && i < 64; i++)
		pthread_join(t[i], NULL);
	return 0;
}

static volatile sig_atomic_t g_signals;

static void on_usr1(int sig)
{
	(void)sig;
	g_signals++;
}

static void show(const char *what, long r, struct stat *st)
{
	if (r < 0)
		printf("%s err %d\n", what, errno);
	else
		printf("%s mode %o rdev %u:%u size %lld\n", what, st->st_mode, major(st->st_rdev),
		       minor(st->st_rdev), (long long)st->st_size);
}

static void showx(const char *what, long r, struct statx *sx)
{
	if (r < 0)
		printf("%s err %d\n", what, errno);
	else
		printf("%s mode %o rdev %u:%u size %lld\n", what, sx->stx_mode, sx->stx_rdev_major,
		       sx->stx_rdev_minor, (long long)sx->stx_size);
}

static int do_stat(const char *path, const char *link)
{
	struct stat st;
	struct statx sx;
	int fd = open(path, O_RDONLY);
	char *copy = strdup(path);
	char *dir = dirname(copy);
	char *copy2 = strdup(path);
	char *base = basename(copy2);
	int dfd = open(dir, O_RDONLY | O_DIRECTORY);

	memset(&st, 0, sizeof(st));
	show("stat", syscall(SYS_stat, path, &st), &st);
	show("lstat", syscall(SYS_lstat, path, &st), &st);
	show("fstat", syscall(SYS_fstat, fd, &st), &st);
	show("newfstatat", syscall(SYS_newfstatat, AT_FDCWD, path, &st, 0), &st);
	show("newfstatat-empty", syscall(SYS_newfstatat, fd, "", &st, AT_EMPTY_PATH), &st);
	show("newfstatat-dirfd", syscall(SYS_newfstatat, dfd, base, &st, 0), &st);
	showx("statx", syscall(SYS_statx, AT_FDCWD, path, 0, STATX_BASIC_STATS, &sx), &sx);
	showx("statx-empty", syscall(SYS_statx, fd, "", AT_EMPTY_PATH, STATX_BASIC_STATS, &sx), &sx);
	show("libc-fstat", fstat(fd, &st), &st);
	show("libc-stat", stat(path, &st), &st);
	if (chdir(dir) == 0)
		show("relative", syscall(SYS_newfstatat, AT_FDCWD, base, &st, 0), &st);
	show("efault", syscall(SYS_fstat, fd, (void *)8), &st);
	char self[64];
	snprintf(self, sizeof(self), "/proc/self/fd/%d", fd);
	show("proc-self", syscall(SYS_stat, self, &st), &st);
	if (link) {
		show("link-stat", syscall(SYS_stat, link, &st), &st);
		show("link-lstat", syscall(SYS_lstat, link, &st), &st);
	}
	return 0;
}

static int other(const char *path)
{
	int p[2];
	int n = -1;
	if (pipe(p) < 0)
		return 1;
	if (write(p[1], "abc", 3) != 3)
		return 1;
	long fr = syscall(SYS_ioctl, p[0], FIONREAD, &n);
	printf("fionread %ld %d\n", fr, n);
	int fd = open(path, O_RDONLY);
	long r = syscall(SYS_ioctl, fd, 0x3b6b, 0);
	printf("other-vfio %ld %d\n", r, r < 0 ? errno : 0);
	r = syscall(SYS_ioctl, fd, GET_DEVICE_FD, "0000:01:00.0");
	printf("not-ours %ld %d\n", r, r < 0 ? errno : 0);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	if (argc >= 4 && !strcmp(argv[1], "getfd"))
		return getfd(argv[2], argv[3]);
	if (argc >= 4 && !strcmp(argv[1], "fork-getfd")) {
		pid_t pid = fork();
		if (pid == 0)
			_exit(getfd(argv[2], argv[3]));
		int status;
		waitpid(pid, &status, 0);
		printf("child-status %d\n", status);
		return 0;
	}
	if (argc >= 3 && !strcmp(argv[1], "other"))
		return other(argv[2]);
	if (argc >= 3 && !strcmp(argv[1], "stat"))
		return do_stat(argv[2], argc >= 4 ? argv[3] : NULL);
	if (argc >= 3 && !strcmp(argv[1], "pending")) {
		getfd("0000:01:00.0", argv[2]);
		struct stat st;
		show("after", syscall(SYS_fstat, 0, &st), &st);
		long r = syscall(SYS_ioctl, 0, GET_DEVICE_FD, "again");
		printf("again %ld %d\n", r, r < 0 ? errno : 0);
		printf("alive 1\n");
		return 0;
	}
	if (argc >= 5 && !strcmp(argv[1], "threads"))
		return threads(argv[2], argv[3], atoi(argv[4]));
	if (argc >= 4 && !strcmp(argv[1], "signal")) {
		struct sigaction sa;
		memset(&sa, 0, sizeof(sa));
		sa.sa_handler = on_usr1;
		sa.sa_flags = SA_RESTART;
		sigaction(SIGUSR1, &sa, NULL);
		getfd(argv[2], argv[3]);
		printf("signals %d\n", (int)g_signals);
		return 0;
	}
	fprintf(stderr, "usage: see the header of supervisor_probe.c\n");
	return 2;
}
