// SPDX-License-Identifier: GPL-2.0
/*
 * Wrappers around static inline helpers of <linux/bio.h> and
 * <linux/device-mapper.h>, which Rust cannot call directly.
 */
#include <linux/bio.h>
#include <linux/device-mapper.h>
#include <linux/highmem.h>

#include "shim.h"

/* Point a bio at another block device (also resets its blkcg association). */
void dmr_bio_set_dev(struct bio *bio, struct block_device *bdev)
{
	bio_set_dev(bio, bdev);
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
