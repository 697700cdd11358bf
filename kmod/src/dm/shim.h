/* SPDX-License-Identifier: GPL-2.0 */
/*
 * C helpers for what bindgen cannot generate: static inline functions and
 * macros of the block, device-mapper, memory, wait-queue and workqueue
 * headers. Called only from src/dm/ (the unsafe layer of the module).
 */
#ifndef DM_REPLICA_SHIM_H
#define DM_REPLICA_SHIM_H

#include <linux/types.h>

struct bio;
struct block_device;
struct queue_limits;
struct vm_area_struct;
struct file;
struct poll_table_struct;
struct wait_queue_head;
struct workqueue_struct;
struct spinlock;

void dmr_bio_set_dev(struct bio *bio, struct block_device *bdev);
void *dmr_per_bio_data(struct bio *bio, size_t size);
size_t dmr_bio_copy_data(struct bio *bio, void *dst, size_t len);
void dmr_limits_set_stable_writes(struct queue_limits *limits);

unsigned long dmr_spin_lock_irqsave(struct spinlock *lock);
void dmr_spin_unlock_irqrestore(struct spinlock *lock, unsigned long flags);

void *dmr_vmalloc_user(unsigned long size);
void dmr_vfree(void *addr);
int dmr_mmap_vmalloc_readonly(struct vm_area_struct *vma, void *addr, unsigned long size);

void dmr_poll_wait(struct file *file, struct wait_queue_head *wq, struct poll_table_struct *pt);
void dmr_wake_up_all(struct wait_queue_head *wq);
void dmr_init_waitqueue_head(struct wait_queue_head *wq);

struct workqueue_struct *dmr_alloc_workqueue(const char *name);

u64 dmr_now_ns(void);

#ifdef DM_REPLICA_CORRUPT_READS
void dmr_bio_save_iter(struct bio *bio);
void dmr_bio_corrupt_first_byte(struct bio *bio);
#endif

#endif
