// SPDX-License-Identifier: GPL-2.0
/*
 * dio: write and verify a deterministic data pattern with O_DIRECT, so that
 * the data really goes through the block device under test (no page cache).
 *
 *   dio write  DEV OFFSET LENGTH SEED [PATTERN_OFFSET]
 *   dio verify DEV OFFSET LENGTH SEED [PATTERN_OFFSET]
 *   dio zero   DEV OFFSET LENGTH          (verify the range reads as zeroes)
 *
 * OFFSET and LENGTH are bytes, multiples of 512. Every 8-byte word of the
 * pattern is a hash of SEED and the word's position in the pattern
 * (PATTERN_OFFSET, default OFFSET, plus its index), so data written at the
 * wrong place, stale data and single flipped bits are all detected. A write
 * ends with fdatasync, which sends a flush down the stack.
 *
 * Exit status: 0 ok, 1 data mismatch, 2 usage or I/O error.
 * Built statically (gcc -static) to run in the test guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CHUNK (1024 * 1024)
#define ALIGN 4096

static uint64_t word_at(uint64_t seed, uint64_t pos)
{
	/* splitmix64 of (seed, position) */
	uint64_t z = seed * 0x9e3779b97f4a7c15ull + pos;

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void fill(unsigned char *buf, size_t len, uint64_t seed, uint64_t pos)
{
	for (size_t i = 0; i < len; i += 8) {
		uint64_t w = word_at(seed, (pos + i) / 8);

		memcpy(buf + i, &w, 8);
	}
}

static int parse_u64(const char *s, uint64_t *out)
{
	char *end;

	errno = 0;
	*out = strtoull(s, &end, 0);
	return errno || end == s || *end != '\0' || s[0] == '-' ? -1 : 0;
}

static int usage(void)
{
	fprintf(stderr, "usage: dio write|verify DEV OFFSET LENGTH SEED [PATTERN_OFFSET]\n"
			"       dio zero DEV OFFSET LENGTH\n");
	return 2;
}

int main(int argc, char **argv)
{
	uint64_t off, len, seed = 0, pat;
	unsigned char *buf, *want;
	const char *mode, *dev;
	uint64_t bad = 0, first_bad = 0;
	int fd, writing, zero;

	if (argc < 5)
		return usage();
	mode = argv[1];
	dev = argv[2];
	writing = !strcmp(mode, "write");
	zero = !strcmp(mode, "zero");
	if (!writing && !zero && strcmp(mode, "verify"))
		return usage();
	if ((zero && argc != 5) || (!zero && (argc < 6 || argc > 7)))
		return usage();
	if (parse_u64(argv[3], &off) || parse_u64(argv[4], &len) ||
	    (!zero && parse_u64(argv[5], &seed)))
		return usage();
	pat = off;
	if (argc == 7 && parse_u64(argv[6], &pat))
		return usage();
	if (off % 512 || len % 512 || pat % 8) {
		fprintf(stderr, "dio: OFFSET and LENGTH must be multiples of 512\n");
		return 2;
	}

	fd = open(dev, (writing ? O_WRONLY : O_RDONLY) | O_DIRECT);
	if (fd < 0) {
		fprintf(stderr, "dio: open %s: %s\n", dev, strerror(errno));
		return 2;
	}
	if (posix_memalign((void **)&buf, ALIGN, CHUNK) ||
	    posix_memalign((void **)&want, ALIGN, CHUNK)) {
		fprintf(stderr, "dio: out of memory\n");
		return 2;
	}

	for (uint64_t done = 0; done < len;) {
		size_t n = len - done < CHUNK ? len - done : CHUNK;
		ssize_t r;

		if (zero)
			memset(want, 0, n);
		else
			fill(want, n, seed, pat + done);
		if (writing)
			r = pwrite(fd, want, n, off + done);
		else
			r = pread(fd, buf, n, off + done);
		if (r < 0 || (size_t)r != n) {
			fprintf(stderr, "dio: %s %s at %" PRIu64 ": %s\n",
				writing ? "write" : "read", dev, off + done,
				r < 0 ? strerror(errno) : "short transfer");
			return 2;
		}
		if (!writing) {
			for (size_t i = 0; i < n; i++) {
				if (buf[i] == want[i])
					continue;
				if (!bad++)
					first_bad = off + done + i;
				if (bad <= 4)
					fprintf(stderr,
						"dio: %s: byte %" PRIu64 ": expected 0x%02x, read 0x%02x\n",
						dev, off + done + i, want[i], buf[i]);
			}
		}
		done += n;
	}
	if (writing && fdatasync(fd)) {
		fprintf(stderr, "dio: fdatasync %s: %s\n", dev, strerror(errno));
		return 2;
	}
	close(fd);
	if (bad) {
		fprintf(stderr,
			"dio: %s: pattern mismatch: %" PRIu64 " of %" PRIu64
			" bytes differ, first at byte %" PRIu64 "\n",
			dev, bad, len, first_bad);
		return 1;
	}
	printf("dio: %s %s bytes %" PRIu64 "..%" PRIu64 " ok\n", mode, dev, off, off + len);
	return 0;
}
