// SPDX-License-Identifier: GPL-2.0
/*
 * joins: make the consumer attached to a dm-replica ring, in another
 * process, allow (or refuse again) new volumes joining its group.
 *
 *   joins PID 1|0
 *   joins misuse PID
 *
 * `replicad source` never allows joins itself (groups of more than one
 * volume are not replicated yet), so the test takes the daemon's own open
 * file of /dev/dm-replica with pidfd_getfd(2) -- the same open file, so the
 * same attached consumer -- and issues IOC_ALLOW_JOINS on it. Every file of
 * PID that is /dev/dm-replica is tried; files not attached to a ring answer
 * ENOTCONN and are skipped.
 *
 * `misuse` checks the refusals instead: IOC_ALLOW_JOINS on a file that is
 * not attached is ENOTCONN; on PID's attached file, `allow` other than 0
 * or 1, or a non-zero reserved field, is EINVAL.
 *
 * The ioctl number and argument mirror crates/ring-abi/src/ring_abi.rs
 * (`IOC_ALLOW_JOINS`, `AllowJoinsArg`).
 *
 * Exit status: 0 done (misuse: every refusal as expected), 1 no attached
 * file found, the ioctl failed or a refusal was wrong, 2 usage error. Built statically (gcc -static) to run in the test guest.
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

struct allow_joins_arg {
	uint32_t allow;
	uint32_t reserved;
};

#define IOC_ALLOW_JOINS _IOW('R', 6, struct allow_joins_arg)

/* An ioctl that must fail with `want`; prints the outcome. */
static int refused(const char *what, int fd, struct allow_joins_arg *arg, int want)
{
	int r = ioctl(fd, IOC_ALLOW_JOINS, arg);
	int e = errno;
	if (r == 0 || e != want) {
		fprintf(stderr, "joins: %s: got %s, want %s\n", what, r == 0 ? "success" : strerror(e),
			strerror(want));
		return 0;
	}
	printf("joins: %s: refused (%s)\n", what, strerror(e));
	return 1;
}

/* Applies `arg` to PID's attached file (misuse: checks its refusals). */
static int on_consumer(int pid, struct allow_joins_arg arg, int misuse)
{
	char dir[64];
	snprintf(dir, sizeof(dir), "/proc/%d/fd", pid);
	DIR *d = opendir(dir);
	if (!d) {
		fprintf(stderr, "joins: %s: %s\n", dir, strerror(errno));
		return 1;
	}
	int pidfd = (int)syscall(SYS_pidfd_open, pid, 0);
	if (pidfd < 0) {
		fprintf(stderr, "joins: pidfd_open(%d): %s\n", pid, strerror(errno));
		return 1;
	}
	int done = 0, tried = 0;
	struct dirent *e;
	while ((e = readdir(d)) != NULL) {
		if (e->d_name[0] == '.')
			continue;
		char link[384], target[256];
		snprintf(link, sizeof(link), "%s/%s", dir, e->d_name);
		ssize_t n = readlink(link, target, sizeof(target) - 1);
		if (n < 0)
			continue;
		target[n] = 0;
		if (strcmp(target, "/dev/dm-replica") != 0)
			continue;
		tried++;
		int fd = (int)syscall(SYS_pidfd_getfd, pidfd, atoi(e->d_name), 0);
		if (fd < 0) {
			fprintf(stderr, "joins: pidfd_getfd(%d, %s): %s\n", pid, e->d_name,
				strerror(errno));
			continue;
		}
		if (misuse) {
			/* Only the attached file answers anything but ENOTCONN. */
			struct allow_joins_arg probe = { .allow = 0, .reserved = 1 };
			if (ioctl(fd, IOC_ALLOW_JOINS, &probe) != 0 && errno == ENOTCONN) {
				close(fd);
				continue;
			}
			struct allow_joins_arg two = { .allow = 2, .reserved = 0 };
			struct allow_joins_arg rsv = { .allow = 1, .reserved = 1 };
			if (refused("allow=2 on the consumer's file", fd, &two, EINVAL) &&
			    refused("reserved!=0 on the consumer's file", fd, &rsv, EINVAL))
				done++;
			else
				done = -1000;
		} else if (ioctl(fd, IOC_ALLOW_JOINS, &arg) == 0) {
			printf("joins: consumer file %s of pid %d: joins %s\n", e->d_name, pid,
			       arg.allow ? "allowed" : "refused");
			done++;
		} else if (errno != ENOTCONN) {
			fprintf(stderr, "joins: IOC_ALLOW_JOINS on file %s of pid %d: %s\n",
				e->d_name, pid, strerror(errno));
		}
		close(fd);
	}
	closedir(d);
	close(pidfd);
	if (done == 0)
		fprintf(stderr, "joins: no attached /dev/dm-replica file in pid %d (%d tried)\n",
			pid, tried);
	return done > 0 ? 0 : 1;
}

int main(int argc, char **argv)
{
	if (argc == 3 && strcmp(argv[1], "misuse") == 0) {
		int fd = open("/dev/dm-replica", O_RDWR);
		if (fd < 0) {
			fprintf(stderr, "joins: /dev/dm-replica: %s\n", strerror(errno));
			return 1;
		}
		struct allow_joins_arg arg = { .allow = 1, .reserved = 0 };
		int ok = refused("allow on a file that is not attached", fd, &arg, ENOTCONN);
		close(fd);
		struct allow_joins_arg none = { 0, 0 };
		return ok && on_consumer(atoi(argv[2]), none, 1) == 0 ? 0 : 1;
	}
	if (argc != 3 || (strcmp(argv[2], "0") != 0 && strcmp(argv[2], "1") != 0)) {
		fprintf(stderr, "usage: joins PID 1|0 | joins misuse PID\n");
		return 2;
	}
	struct allow_joins_arg arg = { .allow = (uint32_t)atoi(argv[2]), .reserved = 0 };
	return on_consumer(atoi(argv[1]), arg, 0);
}
