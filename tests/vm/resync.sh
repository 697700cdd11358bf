#!/bin/sh
# Resync with the kernel ring: the volume already holds data when it is
# protected, so `replctl resync` copies every region to the (empty) replica
# while fio writes and verifies through the protected volume at the same
# time (later writes must win over the copy). Then the source is stopped,
# writes overflow the 2 MiB ring into the kernel's dirty bitmap, and a
# restarted source takes the bitmap over and resends only those regions by
# itself. After each phase the replica equals the volume.
#
# vm-disks: 48M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/rs

check "data on the volume before it is protected" dd if=/dev/urandom of=$DATA bs=1M count=48 oflag=direct status=none
SOURCE_DM=r0 setup_pair $W rs $size 127.0.0.1:7712 $W/target $W/replica.img 8 $DATA ring_mib=2 region_kib=64 overflow_wait_ms=2000
printf '[resync]\nwindow_bytes = 4194304\nchunk_kib = 64\n' >>$W/source.toml
spawn_target $W
spawn_source $W
wait_for "source attached" 30 consumer_attached r0

compare() { # what marker-id
	marker_applied r0 "$2" $W/target rs
	same_sha /dev/mapper/r0 $W/replica.img "$1: replica equals the volume"
}

step "initial copy (full resync) while fio writes through the volume"
fio --eta=never --name=during --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k \
	--blockalign=4k --ioengine=libaio --iodepth=4 --direct=1 --size=48M --io_size=12M \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio1.out &
fpid=$!
check "replctl resync --wait" replctl resync --state-dir $W/source --wait --timeout 900
wait $fpid
check_eq "fio with verify during the resync" 0 $?
replctl status --state-dir $W/source
replctl status --state-dir $W/target
check "no resync needed any more" json_has $W/source '"needs_resync": false'
check "the target is out of its resync" sh -c "! grep -q '\"resync_since\": [0-9]' $W/target/volumes/rs/state.json"
compare "after the initial copy" 1

step "ring overflow while the source is stopped"
stop_daemons $spid
check "fio 8 MiB into a 2 MiB ring with no consumer" fio --eta=never --name=over --filename=/dev/mapper/r0 \
	--rw=randwrite --bs=16k --ioengine=libaio --iodepth=4 --direct=1 --offset=8M --size=8M --io_size=8M \
	--randseed=7 --output=/tmp/fio2.out
dmsetup status r0
check "the ring overflowed" dm_status_has r0 ' overflow=1 '
: >$W/source.log
spawn_source $W
wait_for "the restarted source took the kernel's bitmap over" 120 grep -q "capture ring overflowed" $W/source.log
wait_for "the source resent the dirty regions" 600 grep -q "resync complete" $W/source.log
grep -E "overflowed|resync" $W/source.log | tail -n 5
total=$(grep -E "resync begins" $W/source.log | tail -n 1 | sed -n 's/.* chunks=\([0-9]*\).*/\1/p')
echo "regions resent after the overflow: $total of $((size / 65536))"
check "only the overflowed regions were resent" test "$total" -gt 0 -a "$total" -le $((8 * 1048576 / 65536 + 2))
compare "after the overflow resync" 2

step "shutdown"
stop_daemons
teardown r0
