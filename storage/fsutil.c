/*
 * fsutil.c — POSIX file helpers shared by the storage modules (see fsutil.h).
 */
#include "storage/fsutil.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

int fs_pwrite_all(int fd, const void *buf, size_t n, uint64_t off) {
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = pwrite(fd, p, n, (off_t)off);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
        off += (uint64_t)w;
    }
    return 0;
}

int fs_write_all(int fd, const void *buf, size_t n) {
    const uint8_t *p = buf;
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

ssize_t fs_pread_all(int fd, void *buf, size_t n, uint64_t off) {
    uint8_t *p = buf;
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, p + got, n - got, (off_t)(off + got));
        if (r < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        if (r == 0) break;
        got += (size_t)r;
    }
    return (ssize_t)got;
}

int fs_fsync_dir(const char *dir) {
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0) return -1;
    int rc = fsync(fd);
    close(fd);
    return rc;
}

int fs_fsync_parent_dir(const char *path) {
    char dir[4096];
    const char *slash = strrchr(path, '/');
    if (!slash) {
        strcpy(dir, ".");
    } else if (slash == path) {
        strcpy(dir, "/");
    } else {
        size_t n = (size_t)(slash - path);
        if (n >= sizeof dir) {
            errno = ENAMETOOLONG;
            return -1;
        }
        memcpy(dir, path, n);
        dir[n] = 0;
    }
    return fs_fsync_dir(dir);
}

int fs_mkdir_p(const char *dir) {
    char *p = strdup(dir);
    if (!p) return -1;
    for (char *s = p + 1; *s; s++) {
        if (*s != '/') continue;
        *s = 0;
        if (mkdir(p, 0755) && errno != EEXIST) {
            free(p);
            return -1;
        }
        *s = '/';
    }
    int rc = (mkdir(p, 0755) && errno != EEXIST) ? -1 : 0;
    free(p);
    return rc;
}

bool fs_has_suffix(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

int fs_write_replace(const char *tmp, const char *path, const void *a, size_t na, const void *b, size_t nb,
                     const char **what) {
    *what = "create";
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0) return -1;
    const char *w = NULL;
    if (fs_write_all(fd, a, na) || fs_write_all(fd, b, nb)) w = "write";
    else if (fsync(fd)) w = "fsync";
    int e = errno;
    if (close(fd) && !w) {
        w = "close";
        e = errno;
    }
    if (!w && rename(tmp, path)) {
        w = "rename";
        e = errno;
    }
    if (w) {
        unlink(tmp);
        *what = w;
        errno = e;
        return -1;
    }
    *what = NULL;
    return 0;
}

int fs_move_aside(const char *qdir, const char *path, const char *name, uint64_t seq) {
    if (mkdir(qdir, 0755) && errno != EEXIST) return -1;
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    long long ms = (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
    size_t cap = strlen(qdir) + 260;
    char *to = malloc(cap);
    if (!to) return -1;
    struct stat sb;
    do snprintf(to, cap, "%s/%.200s.%lld.%llu", qdir, name, ms, (unsigned long long)seq++);
    while (lstat(to, &sb) == 0);
    int rc = rename(path, to);
    int e = errno;
    free(to);
    errno = e;
    return rc;
}

int fs_write_errcode(int e) { return (e == ENOSPC || e == EDQUOT || e == EFBIG) ? KP_ENOSPC : KP_EIO; }
