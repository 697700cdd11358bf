#!/bin/sh
# Table reloads, suspend/resume, ring death and module unload around a
# live consumer.
#
# * `dmsetup reload` + resume while fio writes and a consumer drains: the
#   ring (generation, sequence, consumer) carries on and no record is lost
#   (the replayed copy equals the disk); a reload may change the wait bound
#   but not the ring size (refused, the old table keeps working).
# * `dmsetup suspend` while writing: waits for in-flight bios; nothing is
#   held or waiting while suspended.
# * Misuse of /dev/dm-replica is refused with the right errors.
# * Removing the last target with the consumer attached: the consumer gets
#   POLLHUP, drains what is left and exits.
# * The module cannot be unloaded while /dev/dm-replica is open.
#
# vm-disks: 64M 64M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

setup_ring_guest
table="0 $sectors replica $DATA lc ring_mib=8 overflow_wait_ms=10000"

check "dmsetup create r0" dmsetup create r0 --table "$table"
gen=$(dmsetup status r0 | sed -n 's/.* generation=\([0-9a-f]*\) .*/\1/p')
check "ring has a generation" test -n "$gen"
check "misuse of the control device is refused" dmr-ring misuse --group lc

step "reloads under load, consumer attached"
drain_start lc 3 --image 0:$COPY --check-order
wait_for "consumer attached" 20 consumer_attached r0
fio --eta=never --name=rl --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-256k --blockalign=4k \
	--ioengine=libaio --iodepth=8 --direct=1 --size=48M --verify=crc32c --do_verify=1 \
	--verify_fatal=1 --output=/tmp/fio.out &
fpid=$!
i=0
while [ $i -lt 6 ]; do
	check "reload $i" dmsetup reload r0 --table "$table"
	check "resume $i" dmsetup resume r0
	i=$((i + 1))
done
check "reload may change the wait bound" dmsetup reload r0 --table "${table%=*}=5000"
check "resume with the new wait bound" dmsetup resume r0
check "table shows it" sh -c 'dmsetup table r0 | grep -q "overflow_wait_ms=5000"'
check_not "reload with another ring size is refused" dmsetup reload r0 --table "${table/ring_mib=8/ring_mib=16}"
check "old table still active" sh -c 'dmsetup table r0 | grep -q "ring_mib=8"'
check "suspend while writing" dmsetup suspend r0
check "suspended: nothing in flight, held or waiting" dm_status_has r0 ' in_flight=0 held=0 waiting=0 '
check "resume" dmsetup resume r0
wait $fpid
check_eq "fio (with verify) across reloads" 0 $?
check "marker" dmsetup message r0 0 marker 3
drain_wait "drain reached the marker" 300 "drain exit status"
check_eq "same ring generation after reloads" "$gen" \
	"$(dmsetup status r0 | sed -n 's/.* generation=\([0-9a-f]*\) .*/\1/p')"
check "no record lost across reloads: copy equals disk" same_content $DATA $COPY

step "the ring dies with its last target; the consumer drains and exits"
drain_start lc 999 --image 0:$COPY
wait_for "consumer attached" 20 consumer_attached r0
check "write 1 MiB" dio write /dev/mapper/r0 0 1048576 5
check "dmsetup remove r0 with the consumer attached" dmsetup remove r0
drain_wait "consumer saw the ring die and exited" 30 "consumer exit status"
check "the last write was drained" dio verify $COPY 0 1048576 5

step "unload is refused while /dev/dm-replica is open"
exec 3<>/dev/dm-replica
check_not "rmmod refused" rmmod dm_replica
exec 3>&-
check "rmmod after close" rmmod dm_replica
