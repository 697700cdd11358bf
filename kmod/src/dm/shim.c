// SPDX-License-Identifier: GPL-2.0
/*
 * Wrappers around static inline helpers of <linux/bio.h> and
 * <linux/device-mapper.h>, which Rust cannot call directly.
 */
#include <linux/bio.h>
#include <linux/blkdev.h>
#include <linux/device-mapper.h>
#include <linux/highmem.h>
#include <linux/mm.h>
#include <linux/poll.h>
#include <linux/spinlock.h>
#include <linux/timekeeping.h>
#include <linux/vmalloc.h>
#include <linux/wait.h>
#include <linux/workqueue.h>

#include "shim.h"

/* Point a bio at another block device (also resets its blkcg association). */
void dmr_bio_set_dev(struct bio *bio, struct block_device *bdev)
{
	bio_set_dev(bio, bdev);
}

/* The target's per-bio data of `size` bytes in a dm clone. */
void *dmr_per_bio_data(struct bio *bio, size_t size)
{
	return dm_per_bio_data(bio, size);
}

/*
 * Copy the data of a write bio (from its current iterator position) into
 * `dst`, which has room for `len` bytes. Copies at most `len` bytes and
 * returns how many were copied; the caller checks it equals the bio size.
 * Does not sleep and does not allocate.
 */
size_t dmr_bio_copy_data(struct bio *bio, void *dst, size_t len)
{
	struct bio_vec bv;
	struct bvec_iter iter;
	size_t done = 0;

	bio_for_each_segment(bv, bio, iter) {
		size_t n = bv.bv_len;
		void *src;

		if (n > len - done)
			n = len - done;
		if (!n)
			break;
		src = bvec_kmap_local(&bv);
		memcpy((u8 *)dst + done, src, n);
		kunmap_local(src);
		done += n;
	}
	return done;
}

/* Pages of writes must not change between the copy and the DMA. */
void dmr_limits_set_stable_writes(struct queue_limits *limits)
{
	limits->features |= BLK_FEAT_STABLE_WRITES;
}

unsigned long dmr_spin_lock_irqsave(struct spinlock *lock)
{
	unsigned long flags;

	spin_lock_irqsave(lock, flags);
	return flags;
}

void dmr_spin_unlock_irqrestore(struct spinlock *lock, unsigned long flags)
{
	spin_unlock_irqrestore(lock, flags);
}

/* Zeroed, page-aligned memory that may be mapped into userspace. */
void *dmr_vmalloc_user(unsigned long size)
{
	return vmalloc_user(size);
}

void dmr_vfree(void *addr)
{
	vfree(addr);
}

/*
 * Map `size` bytes of vmalloc_user() memory at `addr` into `vma`, read-only:
 * a writable mapping is refused and the mapping can never be made writable
 * later (VM_MAYWRITE cleared). The whole area must be mapped from offset 0.
 */
int dmr_mmap_vmalloc_readonly(struct vm_area_struct *vma, void *addr, unsigned long size)
{
	unsigned long len = vma->vm_end - vma->vm_start;

	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	if (vma->vm_pgoff != 0 || len > PAGE_ALIGN(size))
		return -EINVAL;
	vm_flags_clear(vma, VM_MAYWRITE);
	return remap_vmalloc_range(vma, addr, 0);
}

/*
 * Register a poller on `wq`. The barrier orders the registration before
 * the caller's read of the state it polls, pairing with the one in
 * wq_has_sleeper() in dmr_wake_up_all(): either the waker sees the poller
 * on the queue, or the poller sees the waker's new state.
 */
void dmr_poll_wait(struct file *file, struct wait_queue_head *wq, struct poll_table_struct *pt)
{
	if (!poll_does_not_wait(pt)) {
		poll_wait(file, wq, pt);
		smp_mb();
	}
}

void dmr_init_waitqueue_head(struct wait_queue_head *wq)
{
	init_waitqueue_head(wq);
}

/*
 * Wake every waiter, after the caller updated the state they wait for. Most
 * completions find nobody waiting (the consumer is busy draining), so the
 * queue's lock is only taken when someone is there; see dmr_poll_wait().
 */
void dmr_wake_up_all(struct wait_queue_head *wq)
{
	if (wq_has_sleeper(wq))
		wake_up_all(wq);
}

/*
 * The module's own workqueue: deferred resubmission and ring-space waits
 * may sleep briefly, and destroying it at unload drains every queued item.
 */
struct workqueue_struct *dmr_alloc_workqueue(const char *name)
{
	return alloc_workqueue("%s", WQ_MEM_RECLAIM, 0, name);
}

/* Wall-clock time in nanoseconds since the Unix epoch. */
u64 dmr_now_ns(void)
{
	return ktime_get_real_ns();
}

#ifdef DM_REPLICA_CORRUPT_READS
/*
 * Fault injection (never in a normal build): remember where a read's data
 * starts, in the per-bio data dm reserves for the target, so end_io can find
 * it after the lower device has advanced the bio's iterator.
 */
void dmr_bio_save_iter(struct bio *bio)
{
	struct bvec_iter *saved = dm_per_bio_data(bio, sizeof(*saved));

	*saved = bio->bi_iter;
}

/* Flip the lowest bit of the first data byte of a completed read. */
void dmr_bio_corrupt_first_byte(struct bio *bio)
{
	struct bvec_iter *saved = dm_per_bio_data(bio, sizeof(*saved));
	struct bio_vec bv;
	u8 *p;

	if (!saved->bi_size)
		return;
	bv = bio_iter_iovec(bio, *saved);
	p = kmap_local_page(bv.bv_page);
	p[bv.bv_offset] ^= 1;
	kunmap_local(p);
}
#endif
