#!/bin/sh
# Write capture: every write through a `replica` target reaches the ring, in
# an order that reproduces the disk.
#
# The data disk starts with random content and is copied to a second disk.
# A ring consumer (dmr-ring) replays every record onto the copy while fio
# writes through the target with verification: random and sequential
# writes of 4 KiB to 1 MiB from two jobs on non-overlapping ranges, libaio
# at queue depth 16, then a read-back verify pass (crc32c). A marker ends
# the drain; the copy must then equal the data disk byte for byte, and the
# consumer checks that no record completed before an earlier record was
# submitted. Also checks /dev/dm-replica's mode and single-consumer rule,
# `dmsetup status` counters, and that removal and unload are clean.
#
# vm-disks: 96M 96M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

ring_disks

step "prepare: random data on $DATA, copied to $COPY"
check "fill $DATA with random data" dd if=/dev/urandom of=$DATA bs=1M count=$((sectors / 2048)) status=none
check "copy to $COPY" dd if=$DATA of=$COPY bs=1M status=none
check "copy equals data" same_content $DATA $COPY

step "load the module"
load_module
check "/dev/dm-replica exists" test -c /dev/dm-replica
check_eq "/dev/dm-replica is root-only (0600)" "crw-------" "$(ls -l /dev/dm-replica | cut -c1-10)"

step "create the protected volume"
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA vol0 ring_mib=16 overflow_wait_ms=10000"
check_eq "table reads back with every setting" \
	"0 $sectors replica $(cat /sys/block/vda/dev) vol0 group=vol0 ring_mib=16 region_kib=64 overflow_wait_ms=10000" \
	"$(dmsetup table r0)"
dm=dm-$(dmsetup info -c --noheadings -o minor r0 | tr -d ' ')
check_eq "stable writes on the mapped device ($dm)" 1 "$(cat /sys/block/$dm/queue/stable_writes)"
check "dmr-ring lists the volume" sh -c 'dmr-ring volumes --group vol0 | grep -q "id=vol0 sectors='"$sectors"'"'

step "replay the ring onto the copy while fio writes"
drain_start vol0 7 --image 0:$COPY --check-order --log /tmp/ring.log
wait_for "consumer attached" 20 consumer_attached r0
check_not "a second consumer is refused" dmr-ring volumes --group vol0
check "second consumer's error says busy" sh -c 'dmr-ring volumes --group vol0 2>&1 | grep -q "busy"'

half=$((size / 2))
for rw in randwrite write; do
	check "fio $rw with crc32c verify" fio --eta=never --name=cap --filename=/dev/mapper/r0 --rw=$rw \
		--bsrange=4k-1m --bs_unaligned=0 --blockalign=4k --ioengine=libaio --iodepth=16 --direct=1 \
		--numjobs=2 --size=$((half / 1048576))M --offset_increment=$((half / 1048576))M \
		--verify=crc32c --verify_fatal=1 --do_verify=1 --randrepeat=0 --group_reporting \
		--output=/tmp/fio-$rw.out
	grep -E "WRITE:|READ:" /tmp/fio-$rw.out
done
check "marker accepted" dmsetup message r0 0 marker 7
drain_wait "consumer reached the marker" 300 "consumer exit status"
check "records in ring order of completion (checked by the consumer)" grep -q "^drained " /tmp/drain.out
check "no failed records" grep -q " failed=0 " /tmp/drain.out

step "the replayed copy equals the disk"
check "copy equals the disk" same_content $DATA $COPY

step "status counters"
status=$(dmsetup status r0)
echo "$status"
records=$(echo "$status" | sed -n 's/.* records=\([0-9]*\).*/\1/p')
drained=$(sed -n 's/^drained records=\([0-9]*\).*/\1/p' /tmp/drain.out)
check_eq "every captured record was drained" "$records" "$drained"
check "ring empty after drain" dm_status_has r0 ' live=0 '
check "no overflow" dm_status_has r0 ' overflow=0 '
check "no internal errors" dm_status_has r0 ' internal_errors=0'

step "remove and unload"
teardown r0
