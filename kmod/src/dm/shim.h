/* SPDX-License-Identifier: GPL-2.0 */
/*
 * C helpers for what bindgen cannot generate: static inline functions of the
 * block and device-mapper headers. Called only from src/dm/ (the unsafe
 * layer of the module).
 */
#ifndef DM_REPLICA_SHIM_H
#define DM_REPLICA_SHIM_H

struct bio;
struct block_device;

void dmr_bio_set_dev(struct bio *bio, struct block_device *bdev);

#ifdef DM_REPLICA_CORRUPT_READS
void dmr_bio_save_iter(struct bio *bio);
void dmr_bio_corrupt_first_byte(struct bio *bio);
#endif

#endif
