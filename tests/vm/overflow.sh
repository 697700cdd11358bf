#!/bin/sh
# Ring overflow: with no consumer, writers are never blocked beyond the
# bounded wait; capture switches to the dirty bitmap, which must cover
# exactly the regions written after the ring filled. A consumer attaching
# later drains the records captured before, reads and clears the bitmap
# (which ends overflow and says where capture resumed), and new writes are
# captured again. Replaying the records and copying the dirty regions from
# the disk gives the disk exactly.
#
# vm-disks: 16M 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

setup_ring_guest
# 1 MiB ring: 256 data granules and 256 descriptors, so exactly 256 writes
# of 4 KiB fit.
check "dmsetup create r0 (1 MiB ring, 50 ms wait)" dmsetup create r0 \
	--table "0 $sectors replica $DATA of ring_mib=1 region_kib=64 overflow_wait_ms=50"

step "no consumer: write 4 MiB (4x the ring) in 4 KiB writes, one at a time"
check "1024 sequential 4 KiB O_DIRECT writes complete" fio --eta=never --name=seq --filename=/dev/mapper/r0 \
	--rw=write --bs=4k --size=4M --ioengine=psync --direct=1 --output=/tmp/fio.out
status=$(dmsetup status r0)
echo "$status"
check "overflow reported" sh -c "echo '$status' | grep -q ' overflow=1 '"
check "capture stopped at record 257 (overflow_seq)" sh -c "echo '$status' | grep -q ' overflow_seq=257 '"
check "768 writes went to the bitmap" sh -c "echo '$status' | grep -q ' overflowed_writes=768 '"
check "48 dirty regions (1 MiB - 4 MiB)" sh -c "echo '$status' | grep -q ' dirty_regions=48 '"
check "256 records wait in the ring" sh -c "echo '$status' | grep -q ' live=256 '"
check_not "a marker is refused while overflowing" dmsetup message r0 0 marker 5

step "a consumer drains the ring, then reads the bitmap"
check "drain the 256 records" sh -c "dmr-ring drain --group of --image 0:$COPY --until-empty >/tmp/drain.out"
cat /tmp/drain.out
check "256 writes replayed" grep -q "^drained records=256 writes=256 " /tmp/drain.out
dmr-ring bitmap --group of --volume 0 >/tmp/bitmap.out 2>&1
cat /tmp/bitmap.out
check "bitmap covers exactly regions 16-63" grep -q "dirty=48 set=16-63$" /tmp/bitmap.out
check "capture resumes at record 257" grep -q "resume_seq=257 " /tmp/bitmap.out
check "overflow ended" dm_status_has r0 ' overflow=0 '

step "capture resumed"
drain_start of 2 --image 0:$COPY
wait_for "consumer attached" 20 consumer_attached r0
check "write 512 KiB at 6 MiB" dio write /dev/mapper/r0 $((6 * 1048576)) $((512 * 1024)) 9
check "marker" dmsetup message r0 0 marker 2
drain_wait "drain reached the marker" 60 "drain exit status"
check "new write replicated" dio verify $COPY $((6 * 1048576)) $((512 * 1024)) 9
check_not "regions 16-63 differ before resync" same_content $DATA $COPY
check "resync regions 16-63 from the disk" dd if=$DATA of=$COPY bs=64k skip=16 seek=16 count=48 iflag=direct status=none
check "records + resynced regions give the disk exactly" same_content $DATA $COPY
teardown r0
