#!/bin/sh
# Stress for the debug kernel (lockdep, KASAN, kmemleak, atomic-sleep
# checks): CYCLES (default 100) rounds of load module, create a protected
# volume, write with fio (verify), remove, unload. Alternate rounds run with
# a ring consumer (replaying onto a copy, which must then equal the disk)
# or without one: fio writes three times the ring, which must overflow into
# the dirty bitmap; a consumer then drains what was captured and reads and
# clears the bitmap, and the replayed copy plus the dirty regions copied
# from the disk must equal the disk. Every fifth round reloads the table
# under load. The harness fails the run on any kernel report.
#
# Run with: scripts/vm-stress.sh (debug flavour; about 40 minutes)
#
# vm-disks: 32M 32M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

ring_disks
MOD=$(module_path dm_replica)
cycles=${CYCLES:-100}
table="0 $sectors replica $DATA cy ring_mib=4 overflow_wait_ms=20"

# status_field NAME: the value of NAME=... in the target's status line.
status_field() {
	dmsetup status r0 | tr ' ' '\n' | sed -n "s/^$1=//p"
}

# resync_regions SET: copies the 64 KiB regions listed in SET (dmr-ring's
# "a-b,c,..." form) from the data disk to the copy.
resync_regions() {
	for _r in $(echo "$1" | tr ',' ' '); do
		_a=${_r%-*}
		_b=${_r#*-}
		dd if=$DATA of=$COPY bs=64k skip=$_a seek=$_a count=$((_b - _a + 1)) \
			iflag=direct oflag=direct status=none || return 1
	done
}

i=1
while [ $i -le $cycles ]; do
	step "cycle $i of $cycles"
	check "insmod ($i)" insmod "$MOD"
	check "create ($i)" dmsetup create r0 --table "$table"
	consumer=$((i % 2))
	if [ $i = 1 ]; then
		# Every cycle ends with the copy equal to the disk.
		check "copy in sync" dd if=$DATA of=$COPY bs=1M iflag=direct oflag=direct status=none
	fi
	if [ $consumer = 1 ]; then
		drain_start cy $i --image 0:$COPY --check-order
		wait_for "consumer attached ($i)" 60 consumer_attached r0
		size=4M
	else
		# Three times the ring: it must overflow.
		size=12M
	fi
	fio --eta=never --name=c$i --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k \
		--blockalign=4k --ioengine=libaio --iodepth=8 --direct=1 --size=$size --randseed=$i \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out &
	fpid=$!
	if [ $((i % 5)) = 0 ]; then
		check "reload under load ($i)" sh -c "dmsetup reload r0 --table '$table' && dmsetup resume r0"
	fi
	wait $fpid
	check_eq "fio with verify ($i)" 0 $?
	if [ $consumer = 1 ]; then
		check "marker ($i)" dmsetup message r0 0 marker $i
		drain_wait "drain ($i)" 300 "drain exit status ($i)"
		check "replayed copy equals the disk ($i)" same_content $DATA $COPY
	else
		dmsetup status r0
		check_eq "no consumer: the ring overflowed ($i)" 1 "$(status_field overflow)"
		check_not "no consumer: writes went to the bitmap ($i)" test "$(status_field overflowed_writes)" = 0
		check_not "no consumer: dirty regions ($i)" test "$(status_field dirty_regions)" = 0
		check "drain what was captured ($i)" sh -c \
			"dmr-ring drain --group cy --image 0:$COPY --until-empty --check-order >/tmp/drain.out 2>&1"
		check "read and clear the bitmap ($i)" sh -c "dmr-ring bitmap --group cy >/tmp/bitmap.out 2>&1"
		cat /tmp/bitmap.out
		dirty_set=$(sed -n 's/.* set=\([0-9,-]*\)$/\1/p' /tmp/bitmap.out)
		check_not "bitmap not empty ($i)" test -z "$dirty_set"
		check_eq "overflow ended ($i)" 0 "$(status_field overflow)"
		check "resync the dirty regions ($i)" resync_regions "$dirty_set"
		check "records + resynced regions equal the disk ($i)" same_content $DATA $COPY
	fi
	check_eq "no failed records ($i)" 0 "$(status_field failed)"
	check_eq "no internal errors ($i)" 0 "$(status_field internal_errors)"
	check "remove ($i)" dmsetup remove r0
	check "rmmod ($i)" rmmod dm_replica
	i=$((i + 1))
done
echo "cycles: $cycles rounds done"
