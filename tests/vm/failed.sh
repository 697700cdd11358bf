#!/bin/sh
# Failed writes are never shipped and their regions become dirty.
#
# dm-flakey sits under the protected volume. While it fails writes, writes
# through the target fail; their records must be FAILED (the consumer never
# applies them), their regions (and only theirs) must be dirty in `dmsetup
# status` and in the bitmap read through /dev/dm-replica, and the writes
# that succeeded before and after must replicate normally.
#
# vm-disks: 16M 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

MIB=1048576
setup_ring_guest
healthy="0 $sectors flakey $DATA 0 3600 0"
failing="0 $sectors flakey $DATA 0 0 3600 1 error_writes"
check "dmsetup create flk (healthy)" dmsetup create flk --table "$healthy"
check "dmsetup create r0 over flk" \
	dmsetup create r0 --table "0 $sectors replica /dev/mapper/flk fv region_kib=64 overflow_wait_ms=10000"
drain_start fv 1 --image 0:$COPY
wait_for "consumer attached" 20 consumer_attached r0

check "write 1 MiB at 0 (device healthy)" dio write /dev/mapper/r0 0 $MIB 1
check "flakey starts failing writes" sh -c "dmsetup load flk --table '$failing' && dmsetup resume flk"
check_not "write 256 KiB at 4 MiB fails" dio write /dev/mapper/r0 $((4 * MIB)) $((256 * 1024)) 2
check_not "write 8 KiB at 8 MiB + 4 KiB fails" dio write /dev/mapper/r0 $((8 * MIB + 4096)) 8192 3
check "flakey healthy again" sh -c "dmsetup load flk --table '$healthy' && dmsetup resume flk"
check "write 1 MiB at 2 MiB (healthy)" dio write /dev/mapper/r0 $((2 * MIB)) $MIB 4
check "marker" dmsetup message r0 0 marker 1
drain_wait "drain reached the marker" 120 "drain exit status"

failed=$(sed -n 's/^drained .* failed=\([0-9]*\).*/\1/p' /tmp/drain.out)
check "failed writes reached the ring as FAILED records ($failed)" test "$failed" -ge 2
check "the failed 256 KiB write is among them" grep -q "^failed 0 8192 262144$" /tmp/drain.out
check "the failed 8 KiB write is among them" grep -q "^failed 0 16392 8192$" /tmp/drain.out
check "nothing failed was applied: the copy equals the disk" same_content $DATA $COPY
check "dio pattern 1 replicated" dio verify $COPY 0 $MIB 1
check "dio pattern 4 replicated" dio verify $COPY $((2 * MIB)) $MIB 4

step "dirty regions: exactly those of the failed writes"
# 64 KiB regions: 4 MiB + 256 KiB -> regions 64-67; 8 MiB + 4 KiB (8 KiB) -> 128.
check "dmsetup status reports 5 dirty regions" dm_status_has r0 ' dirty_regions=5 '
dmr-ring bitmap --group fv --volume 0 >/tmp/bitmap.out 2>&1
cat /tmp/bitmap.out
check "bitmap holds exactly regions 64-67 and 128" grep -q "dirty=5 set=64-67,128$" /tmp/bitmap.out
check "read-and-clear emptied it" dm_status_has r0 ' dirty_regions=0 '
teardown r0 flk
