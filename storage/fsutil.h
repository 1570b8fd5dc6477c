/*
 * fsutil.h — the few POSIX file helpers every storage module needs, written
 * once: complete reads and writes (retrying EINTR and short transfers),
 * directory fsync (a rename is durable only after its directory is synced),
 * mkdir -p, a suffix test for directory scans, the atomic file replace
 * (tmp, fsync, rename) and moving a corrupt file aside into quarantine. (The
 * little-endian field accessors of the on-disk formats are the base's:
 * kp_put_u32 / kp_get_u32 ... in kernels/kp.h.)
 *
 * Contract: 0 (or a byte count) on success, -1 with errno set on failure.
 */
#ifndef KP_FSUTIL_H
#define KP_FSUTIL_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "kernels/kp.h"

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
/* Write a then b (either may be empty) to tmp, fsync, close, rename over
 * path: the atomic replace every durable write here uses (the caller fsyncs
 * the directory). On failure tmp is removed, *what names the step that
 * failed ("create", "write", "fsync", "close", "rename") and errno is set. */
int fs_write_replace(const char *tmp, const char *path, const void *a, size_t na, const void *b, size_t nb,
                     const char **what);
/* The KP code of a failed write's errno: KP_ENOSPC when the storage is full
 * (ENOSPC, EDQUOT) or a file-size limit was hit (EFBIG), so a caller can say
 * "insufficient storage" (HTTP 507) rather than a generic I/O error; KP_EIO
 * for anything else. */
int fs_write_errcode(int e);
/* Move path (whose file name is name) into directory qdir (created if
 * needed) as NAME.<unix ms>.<n>, n counting up from seq past any existing
 * file: corrupt files are kept as evidence, never overwritten. */
int fs_move_aside(const char *qdir, const char *path, const char *name, uint64_t seq);

#endif
