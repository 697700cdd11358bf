#!/bin/sh
# Stress for the debug kernel (lockdep, KASAN, kmemleak, atomic-sleep
# checks): CYCLES (default 100) rounds of load module, create a protected
# volume, write with fio (verify), remove, unload. Alternate rounds run with
# a ring consumer (replaying and checking the copy) or without one (the
# ring overflows into the dirty bitmap); every fifth round reloads the
# table under load. The harness fails the run on any kernel report.
#
# Run with: scripts/vm-stress.sh (debug flavour; about 15 minutes)
#
# vm-disks: 32M 32M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
COPY=/dev/vdb
MOD=$(module_path dm_replica)
sectors=$(cat /sys/block/vda/size)
cycles=${CYCLES:-100}
table="0 $sectors replica $DATA cy ring_mib=4 overflow_wait_ms=20"

i=1
while [ $i -le $cycles ]; do
	step "cycle $i of $cycles"
	check "insmod ($i)" insmod "$MOD"
	check "create ($i)" dmsetup create r0 --table "$table"
	consumer=$((i % 2))
	if [ $consumer = 1 ]; then
		check "copy in sync before cycle $i" dd if=$DATA of=$COPY bs=1M iflag=direct oflag=direct status=none
		dmr-ring drain --group cy --image 0:$COPY --until-marker $i --check-order >/tmp/drain.out 2>&1 &
		dpid=$!
		wait_for "consumer attached ($i)" 60 sh -c 'dmsetup status r0 | grep -q "consumer=1"'
	fi
	fio --eta=never --name=c$i --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k \
		--blockalign=4k --ioengine=libaio --iodepth=8 --direct=1 --size=4M --randseed=$i \
		--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out &
	fpid=$!
	if [ $((i % 5)) = 0 ]; then
		check "reload under load ($i)" sh -c "dmsetup reload r0 --table '$table' && dmsetup resume r0"
	fi
	wait $fpid
	check_eq "fio with verify ($i)" 0 $?
	if [ $consumer = 1 ]; then
		check "marker ($i)" dmsetup message r0 0 marker $i
		wait_for "drain ($i)" 300 sh -c "! kill -0 $dpid 2>/dev/null"
		wait $dpid
		check_eq "drain exit status ($i)" 0 $?
		check "replayed copy equals the disk ($i)" same_content $DATA $COPY
	else
		check "no consumer: overflow or all captured ($i)" dmsetup status r0
	fi
	check "remove ($i)" dmsetup remove r0
	check "rmmod ($i)" rmmod dm_replica
	i=$((i + 1))
done
echo "cycles: $cycles rounds done"
