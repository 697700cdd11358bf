// SPDX-License-Identifier: GPL-2.0
/*
 * overlap: issue many concurrent, overlapping O_DIRECT writes, so that the
 * block layer sees writes to the same sectors in flight at the same time.
 *
 *   overlap DEV SEED ROUNDS WINDOW_KIB THREADS
 *
 * Each of THREADS threads, ROUNDS times, submits a batch of 32 writes with
 * Linux AIO (io_submit, all in flight together), at random 4 KiB-aligned
 * offsets inside the first WINDOW_KIB KiB of DEV, of 4 to 64 KiB, each
 * filled with a value unique to the write, then waits for the batch. With a
 * small window almost every write overlaps others in flight. The final
 * content is whatever order the device applied them in; the test compares
 * it with a replay of the capture ring.
 *
 * Exit status: 0 ok, 2 usage or I/O error.
 * Built statically (gcc -static) to run in the test guest.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/aio_abi.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define BATCH 32
#define MAXLEN (64 * 1024)
#define ALIGN 4096

static const char *dev;
static uint64_t seed;
static long rounds;
static uint64_t window;

static uint64_t next(uint64_t *s)
{
	/* splitmix64 */
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);

	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

static void *worker(void *arg)
{
	long id = (long)arg;
	uint64_t rng = seed * 1000003 + (uint64_t)id;
	aio_context_t ctx = 0;
	struct iocb cbs[BATCH], *ptrs[BATCH];
	struct io_event ev[BATCH];
	unsigned char *bufs[BATCH];
	int fd = open(dev, O_RDWR | O_DIRECT);

	if (fd < 0 || syscall(SYS_io_setup, BATCH, &ctx) < 0) {
		perror("overlap: open/io_setup");
		exit(2);
	}
	for (int i = 0; i < BATCH; i++) {
		if (posix_memalign((void **)&bufs[i], ALIGN, MAXLEN)) {
			fprintf(stderr, "overlap: out of memory\n");
			exit(2);
		}
	}
	for (long r = 0; r < rounds; r++) {
		for (int i = 0; i < BATCH; i++) {
			uint64_t len = ALIGN * (1 + next(&rng) % (MAXLEN / ALIGN));
			uint64_t slots = (window - len) / ALIGN + 1;
			uint64_t off = ALIGN * (next(&rng) % slots);
			/* A value unique to (thread, round, write). */
			memset(bufs[i], (int)((id * 131 + r * 37 + i * 7 + seed) & 0xff), len);
			((uint64_t *)bufs[i])[0] = ((uint64_t)id << 48) | ((uint64_t)r << 16) | (uint64_t)i;
			memset(&cbs[i], 0, sizeof(cbs[i]));
			cbs[i].aio_fildes = fd;
			cbs[i].aio_lio_opcode = IOCB_CMD_PWRITE;
			cbs[i].aio_buf = (uint64_t)(uintptr_t)bufs[i];
			cbs[i].aio_nbytes = len;
			cbs[i].aio_offset = (int64_t)off;
			ptrs[i] = &cbs[i];
		}
		long done = 0;
		long n = syscall(SYS_io_submit, ctx, BATCH, ptrs);

		if (n != BATCH) {
			fprintf(stderr, "overlap: io_submit returned %ld (%s)\n", n, strerror(errno));
			exit(2);
		}
		while (done < BATCH) {
			long got = syscall(SYS_io_getevents, ctx, 1, BATCH, ev, NULL);

			if (got < 0) {
				if (errno == EINTR)
					continue;
				perror("overlap: io_getevents");
				exit(2);
			}
			for (long k = 0; k < got; k++) {
				struct iocb *cb = (struct iocb *)(uintptr_t)ev[k].obj;

				if (ev[k].res != (int64_t)cb->aio_nbytes) {
					fprintf(stderr, "overlap: write failed: %lld\n", (long long)ev[k].res);
					exit(2);
				}
			}
			done += got;
		}
	}
	syscall(SYS_io_destroy, ctx);
	close(fd);
	return NULL;
}

int main(int argc, char **argv)
{
	pthread_t t[16];
	long threads;

	if (argc != 6) {
		fprintf(stderr, "usage: overlap DEV SEED ROUNDS WINDOW_KIB THREADS\n");
		return 2;
	}
	dev = argv[1];
	seed = strtoull(argv[2], NULL, 0);
	rounds = strtol(argv[3], NULL, 0);
	window = strtoull(argv[4], NULL, 0) * 1024;
	threads = strtol(argv[5], NULL, 0);
	if (rounds <= 0 || window < MAXLEN || threads < 1 || threads > 16) {
		fprintf(stderr, "overlap: bad arguments\n");
		return 2;
	}
	for (long i = 0; i < threads; i++)
		if (pthread_create(&t[i], NULL, worker, (void *)i)) {
			fprintf(stderr, "overlap: pthread_create failed\n");
			return 2;
		}
	for (long i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	printf("overlap: %ld threads x %ld rounds x %d writes in %llu KiB done\n",
	       threads, rounds, BATCH, (unsigned long long)(window / 1024));
	return 0;
}
