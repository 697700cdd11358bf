#!/bin/sh
# A write that fails on the source while replicating reaches a resync.
#
# dm-flakey under the protected volume fails one write while the target is
# down. The source must stop the stream there and need a resync (the failed
# write's regions are dirty in the kernel too); a marker inserted meanwhile
# must not become a recovery point. When the target is back the resync runs
# by itself; the target takes no recovery point between the last one before
# the failure and the resync's END. At the end the replica equals the
# volume and no dirty region is left in the kernel.
#
# vm-disks: 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
MIB=1048576
volume_vars $DATA
W=/tmp/fr

SOURCE_DM=r0 setup_pair $W fr $size 127.0.0.1:7715 $W/target $W/replica.img 8
healthy="0 $sectors flakey $DATA 0 3600 0"
failing="0 $sectors flakey $DATA 0 0 3600 1 error_writes"
check "dmsetup create flk (healthy)" dmsetup create flk --table "$healthy"
check "dmsetup create r0 over flk" \
	dmsetup create r0 --table "0 $sectors replica /dev/mapper/flk fr ring_mib=2 region_kib=64 overflow_wait_ms=10000"
start_daemons $W $W/source
check "source attached" consumer_attached r0

step "replicating"
check "write 1 MiB at 0" dio write /dev/mapper/r0 0 $MIB 1
marker_applied r0 1 $W/target fr
m1=$marker_seq

step "the target is down; one write fails on the source"
stop_daemons $tpid
check "flakey starts failing writes" sh -c "dmsetup load flk --table '$failing' && dmsetup resume flk"
check_not "write 256 KiB at 4 MiB fails" dio write /dev/mapper/r0 $((4 * MIB)) $((256 * 1024)) 2
check "flakey healthy again" sh -c "dmsetup load flk --table '$healthy' && dmsetup resume flk"
check "write 1 MiB at 2 MiB (healthy)" dio write /dev/mapper/r0 $((2 * MIB)) $MIB 4
dmsetup status r0
check "the kernel marked the failed write's 4 regions dirty" dm_status_has r0 ' dirty_regions=4 '
wait_for "the source needs a resync" 60 json_has $W/source '"needs_resync": true'
replctl status --state-dir $W/source
insert_marker r0 2
m2=$marker_seq
check "marker 2 inserted while the region is unresent (record $m2)" test -n "$m2"

step "the target is back: the resync runs by itself"
spawn_target $W
wait_for "the source resent the dirty regions" 300 grep -q "resync complete" $W/source.log
wait_for "no resync needed any more" 120 json_has $W/source '"needs_resync": false'
grep -E "failed|resync" $W/source.log | tail -n 8
check "the resync started without being asked" grep -q "resync begins" $W/source.log
end=$(replctl status --state-dir $W/source --json | sed -n 's/.*"resync_end_seq": *\([0-9]*\).*/\1/p')
check "the resync's END is after marker 2 ($end > $m2)" test "$end" -gt "$m2"
marker_applied r0 3 $W/target fr
replctl points --state-dir $W/target --volume fr | tee /tmp/points.out
check_not "marker 2 did not become a recovery point" awk '$1 ~ /^[0-9]+$/ && $3 == 2 { found = 1 } END { exit !found }' /tmp/points.out
check_not "no recovery point between marker 1 and the resync's END" \
	awk -v a="$m1" -v b="$end" '$1 ~ /^[0-9]+$/ && $1 > a && $1 < b { found = 1 } END { exit !found }' /tmp/points.out
check "a recovery point at the resync's END" awk -v b="$end" '$1 == b { found = 1 } END { exit !found }' /tmp/points.out

step "the replica equals the volume; nothing is left dirty"
status=$(dmsetup status r0)
echo "$status"
same_sha /dev/mapper/r0 $W/replica.img "the replica equals the volume"
check "the kernel holds no dirty region" sh -c "echo '$status' | grep -q ' dirty_regions=0 '"

step "shutdown"
stop_daemons
teardown r0 flk
