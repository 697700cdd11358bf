#!/bin/sh
# Overlapping writes in flight together reach the disk in ring order.
#
# The `overlap` tool submits batches of 32 concurrent O_DIRECT writes (Linux
# AIO) of 4-64 KiB at random offsets in a 256 KiB window, from two threads,
# so nearly every write overlaps others still in flight. The target must
# hold back a write that overlaps an earlier one in flight until that one
# completes; then replaying the ring onto a copy of the original disk gives
# exactly the disk's final content, whatever order the device completed
# writes in. Several seeds; the status must show that writes were held.
#
# vm-disks: 16M 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

setup_ring_guest
check "copy equals data at start" same_content $DATA $COPY
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA ov ring_mib=8 overflow_wait_ms=10000"

marker=0
for seed in 1 2 3 4 5; do
	step "seed $seed"
	marker=$((marker + 1))
	drain_start ov $marker --image 0:$COPY --check-order
	wait_for "consumer attached" 20 consumer_attached r0
	check "overlapping writes (seed $seed)" overlap /dev/mapper/r0 $seed 40 256 2
	check "marker $marker" dmsetup message r0 0 marker $marker
	drain_wait "drain reached marker $marker" 120 "drain exit status"
	check "replayed copy equals the disk (seed $seed)" same_content $DATA $COPY
done

status=$(dmsetup status r0)
echo "$status"
held=$(echo "$status" | sed -n 's/.* held_total=\([0-9]*\).*/\1/p')
check "writes were held back behind overlapping ones (held_total=$held)" test "$held" -gt 0
check "nothing left held or in flight" dm_status_has r0 ' in_flight=0 held=0 waiting=0 '
check "no overflow" dm_status_has r0 ' overflow=0 '
teardown r0
