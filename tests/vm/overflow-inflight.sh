#!/bin/sh
# Overflow-mode writes still in flight when the source takes the kernel's
# dirty bitmap. Their bits are set when they are mapped (and cleared by the
# take) and set again when they complete; overflow-mode writes are not
# ordered against ring markers, so a resync may read their regions before
# they reach the disk. The source must take the bitmap again before its END
# and not end the resync while overflow-mode writes are in flight: at the
# end the replica equals the volume and the kernel holds no dirty region.
#
# dm-delay under the protected volume: writes to the first 4 MiB take 10 s,
# writes to the rest 3 s (reads are not delayed). 16 writes of 64 KiB at
# 4 MiB fill the 1 MiB ring with records still in flight; 32 writes of
# 64 KiB at 0 then wait 20 ms for space and go to the dirty bitmap
# (overflow). The source sees the overflow at once and takes the bitmap
# while those 32 writes wait in dm-delay; its resync reads their regions as
# soon as the 16 records complete, 7 s before the writes land.
#
# vm-disks: 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/ofi
slow=8192 # sectors: the first 4 MiB

SOURCE_DM=r0 setup_pair $W ofi $size 127.0.0.1:7714 $W/target $W/replica.img 8
check "dmsetup create dly (writes delayed 10 s / 3 s)" sh -c "printf '%s\n%s\n' \
	'0 $slow delay $DATA 0 0 $DATA 0 10000' \
	'$slow $((sectors - slow)) delay $DATA $slow 0 $DATA $slow 3000' | dmsetup create dly"
check "dmsetup create r0 over dly (1 MiB ring, 20 ms wait)" dmsetup create r0 \
	--table "0 $sectors replica /dev/mapper/dly ofi ring_mib=1 region_kib=64 overflow_wait_ms=20"
start_daemons $W $W/source
check "source attached" consumer_attached r0
marker_applied r0 1 $W/target ofi

step "16 records in flight fill the ring; 32 writes overflow behind them"
fio --eta=never --name=fill --filename=/dev/mapper/r0 --rw=write --bs=64k --offset=4M --size=1M \
	--ioengine=libaio --iodepth=16 --direct=1 --output=/tmp/fio-fill.out &
fill=$!
wait_for "the ring is full of records in flight" 30 dm_status_has r0 ' in_flight=16 '
fio --eta=never --name=late --filename=/dev/mapper/r0 --rw=write --bs=64k --offset=0 --size=2M \
	--ioengine=libaio --iodepth=32 --direct=1 --output=/tmp/fio-late.out &
late=$!
wait_for "the 32 writes went to the dirty bitmap" 30 dm_status_has r0 ' overflowed_writes=32 '
dmsetup status r0
wait_for "the source took the bitmap (overflow ended)" 30 dm_status_has r0 ' overflow=0 '
dmsetup status r0
wait $fill
check_eq "fio (ring-filling writes)" 0 $?
wait $late
check_eq "fio (overflow-mode writes)" 0 $?
echo "the overflow-mode writes have landed"
dmsetup status r0

step "the resync settles; a final marker is applied"
wait_for "no resync needed any more" 600 json_has $W/source '"needs_resync": false'
grep -E "overflow|resync" $W/source.log | tail -n 12
marker_applied r0 2 $W/target ofi
replctl status --state-dir $W/source
replctl status --state-dir $W/target
status=$(dmsetup status r0)
echo "$status"
same_sha /dev/mapper/r0 $W/replica.img "the replica equals the volume"
check "the kernel holds no dirty region" sh -c "echo '$status' | grep -q ' dirty_regions=0 '"
check "no overflow-mode write in flight" sh -c "echo '$status' | grep -q ' in_flight_overflow=0 '"
check "the source says the replica is up to date" json_has $W/source '"needs_resync": false'

step "shutdown"
stop_daemons
teardown r0 dly
