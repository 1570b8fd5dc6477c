/*
 * fsutil.h — the few POSIX file helpers every storage module needs, written
 * once: complete reads and writes (retrying EINTR and short transfers),
 * directory fsync (a rename is durable only after its directory is synced),
 * mkdir -p, and a suffix test for directory scans.
 *
 * Contract: 0 (or a byte count) on success, -1 with errno set on failure.
 */
#ifndef KP_FSUTIL_H
#define KP_FSUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/* Write all n bytes at the file offset (pwrite) or the current position (write). */
int fs_pwrite_all(int fd, const void *buf, size_t n, uint64_t off);
int fs_write_all(int fd, const void *buf, size_t n);
/* Read up to n bytes at off; short only at end of file. Bytes read or -1. */
ssize_t fs_pread_all(int fd, void *buf, size_t n, uint64_t off);
/* fsync a directory / the directory that holds path. */
int fs_fsync_dir(const char *dir);
int fs_fsync_parent_dir(const char *path);
/* mkdir -p with mode 0755. */
int fs_mkdir_p(const char *dir);
bool fs_has_suffix(const char *s, const char *suffix);

#endif
