/* A minimal FUSE server in C (libfuse3 low-level API), the baseline for
 * benchmarks/fuse_roundtrip.py. It serves the same three calls as the
 * benchmark's Python kernel, doing the same work per call:
 *   - "dev": GET_INFO-like ioctl (process_vm_readv argsz, process_vm_writev
 *     the struct), BIND-like ioctl (read the struct, pidfd_open the caller's
 *     thread group + pidfd_getfd the fd in it, statx st_dev against the mount,
 *     the identity ioctl on the copy to learn its fh, write out_devid back),
 *     4-byte pread of a register at region 7;
 *   - "iommu": an open that BIND refers to.
 * Build: gcc -O2 -o c_fuse_server c_fuse_server.c $(pkg-config --cflags --libs fuse3)
 * Run:   ./c_fuse_server MOUNTPOINT      (multi-threaded loop; unmount to stop)
 */
#define FUSE_USE_VERSION 35
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <fuse_lowlevel.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#define GET_INFO 0x3b6b
#define BIND 0x3b76
#define IDENTITY 0xe701

enum { INO_ROOT = 1, INO_DEV = 2, INO_IOMMU = 3 };
static unsigned dev_major, dev_minor;
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static unsigned long next_fh = 1;
static int fh_is_iommu[1 << 16];
static unsigned char regs[4096] = { 0x86, 0x80, 0x3a, 0x15 };

static void fill_attr(fuse_ino_t ino, struct stat *st) {
    memset(st, 0, sizeof *st);
    st->st_ino = ino;
    st->st_nlink = 1;
    st->st_mode = ino == INO_ROOT ? (S_IFDIR | 0755) : (S_IFREG | 0666);
}

static void op_lookup(fuse_req_t req, fuse_ino_t parent, const char *name) {
    struct fuse_entry_param e = { 0 };
    if (parent != INO_ROOT) { fuse_reply_err(req, ENOENT); return; }
    if (!strcmp(name, "dev")) e.ino = INO_DEV;
    else if (!strcmp(name, "iommu")) e.ino = INO_IOMMU;
    else { fuse_reply_err(req, ENOENT); return; }
    e.attr_timeout = e.entry_timeout = 60;
    fill_attr(e.ino, &e.attr);
    fuse_reply_entry(req, &e);
}

static void op_getattr(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    struct stat st;
    (void)fi;
    fill_attr(ino, &st);
    fuse_reply_attr(req, &st, 60);
}

static void op_open(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    pthread_mutex_lock(&lock);
    fi->fh = next_fh++ & 0xffff;
    fh_is_iommu[fi->fh] = ino == INO_IOMMU;
    pthread_mutex_unlock(&lock);
    fi->direct_io = 1;
    fi->noflush = 1;
    fuse_reply_open(req, fi);
}

static void op_read(fuse_req_t req, fuse_ino_t ino, size_t size, off_t off, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    unsigned long long o = (unsigned long long)off & ((1ULL << 40) - 1);
    if (((unsigned long long)off >> 40) != 7 || o + size > sizeof regs) { fuse_reply_err(req, EINVAL); return; }
    fuse_reply_buf(req, (const char *)regs + o, size);
}

static int user_read(pid_t tid, void *dst, unsigned long addr, size_t n) {
    struct iovec l = { dst, n }, r = { (void *)addr, n };
    return process_vm_readv(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : EFAULT;
}

static int user_write(pid_t tid, const void *src, unsigned long addr, size_t n) {
    struct iovec l = { (void *)src, n }, r = { (void *)addr, n };
    return process_vm_writev(tid, &l, 1, &r, 1, 0) == (ssize_t)n ? 0 : EFAULT;
}

static pid_t tgid_of(pid_t tid) {
    char p[64], line[256];
    snprintf(p, sizeof p, "/proc/%d/status", tid);
    FILE *f = fopen(p, "r");
    pid_t tgid = -1;
    if (!f) return -1;
    while (fgets(line, sizeof line, f))
        if (!strncmp(line, "Tgid:", 5)) { tgid = atoi(line + 5); break; }
    fclose(f);
    return tgid;
}

/* fget(): -1 EBADF, else the fh of our open behind the caller's fd */
static long resolve_fd(pid_t tid, int fd) {
    pid_t tgid = tgid_of(tid);
    if (tgid < 0) return -1;
    int pidfd = syscall(SYS_pidfd_open, tgid, 0);
    if (pidfd < 0) return -1;
    int copy = syscall(SYS_pidfd_getfd, pidfd, fd, 0);
    close(pidfd);
    if (copy < 0) return -1;
    struct statx sx;
    long fh = -1;
    if (statx(copy, "", AT_EMPTY_PATH | AT_STATX_DONT_SYNC, 0, &sx) == 0 &&
        sx.stx_dev_major == dev_major && sx.stx_dev_minor == dev_minor)
        fh = ioctl(copy, IDENTITY, 0);
    close(copy);
    return fh;
}

static void op_ioctl(fuse_req_t req, fuse_ino_t ino, unsigned int cmd, void *arg,
                     struct fuse_file_info *fi, unsigned flags, const void *in_buf,
                     size_t in_bufsz, size_t out_bufsz) {
    (void)ino; (void)flags; (void)in_buf; (void)in_bufsz; (void)out_bufsz;
    pid_t tid = fuse_req_ctx(req)->pid;
    unsigned long a = (unsigned long)arg;
    if (cmd == IDENTITY) {
        char p[64];
        snprintf(p, sizeof p, "/proc/self/task/%d", tid);
        if (access(p, F_OK)) { fuse_reply_err(req, ENOTTY); return; }
        fuse_reply_ioctl(req, (int)fi->fh, NULL, 0);
        return;
    }
    if (cmd == GET_INFO) {
        unsigned hdr[2];
        int e = user_read(tid, hdr, a, 8);
        if (e) { fuse_reply_err(req, e); return; }
        if (hdr[0] < 16) { fuse_reply_err(req, EINVAL); return; }
        unsigned out[4] = { 24, 2, 9, 5 };
        e = user_write(tid, out, a, 16);
        if (e) fuse_reply_err(req, e); else fuse_reply_ioctl(req, 0, NULL, 0);
        return;
    }
    if (cmd == BIND) {
        unsigned b[4];
        int e = user_read(tid, b, a, 16);
        if (e) { fuse_reply_err(req, e); return; }
        if (b[0] < 16 || b[1]) { fuse_reply_err(req, EINVAL); return; }
        long fh = resolve_fd(tid, (int)b[2]);
        if (fh < 0 || fh >= (1 << 16) || !fh_is_iommu[fh]) { fuse_reply_err(req, EBADF); return; }
        unsigned devid = 1000 + (unsigned)fh;
        e = user_write(tid, &devid, a + 12, 4);
        if (e) fuse_reply_err(req, e); else fuse_reply_ioctl(req, 0, NULL, 0);
        return;
    }
    fuse_reply_err(req, ENOTTY);
}

static void op_release(fuse_req_t req, fuse_ino_t ino, struct fuse_file_info *fi) {
    (void)ino; (void)fi;
    fuse_reply_err(req, 0);
}

static const struct fuse_lowlevel_ops ops = {
    .lookup = op_lookup, .getattr = op_getattr, .open = op_open, .read = op_read,
    .ioctl = op_ioctl, .release = op_release,
};

static void find_dev(const char *mnt) {
    char line[4096], mp[4096];
    unsigned ma, mi;
    FILE *f = fopen("/proc/self/mountinfo", "r");
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "%*d %*d %u:%u %*s %4095s", &ma, &mi, mp) == 3 && !strcmp(mp, mnt)) {
            dev_major = ma;
            dev_minor = mi;
        }
    if (f) fclose(f);
}

int main(int argc, char **argv) {
    if (argc != 2) { fprintf(stderr, "usage: %s MOUNTPOINT\n", argv[0]); return 2; }
    char *fargv[] = { argv[0], "-o", "allow_other", NULL };
    struct fuse_args args = FUSE_ARGS_INIT(3, fargv);
    struct fuse_session *se = fuse_session_new(&args, &ops, sizeof ops, NULL);
    char real[4096]; /* before mounting: a stat of our own mount would wait for us */
    if (!realpath(argv[1], real)) strcpy(real, argv[1]);
    if (!se || fuse_session_mount(se, real)) return 1;
    find_dev(real);
    fuse_set_signal_handlers(se);
    printf("ready\n");
    fflush(stdout);
    struct fuse_loop_config cfg = { .clone_fd = 0, .max_idle_threads = 16 };
    int rc = fuse_session_loop_mt(se, &cfg);
    fuse_remove_signal_handlers(se);
    fuse_session_unmount(se);
    fuse_session_destroy(se);
    return rc ? 1 : 0;
}
