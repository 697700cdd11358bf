#!/bin/sh
# replicad in kernel mode: `replicad source` attaches to the module's ring
# through /dev/dm-replica and ships captured writes over TLS (loopback) to
# `replicad target`, which journals and applies them to a file-backed
# replica. After fio (with verify) writes through the protected volume and
# a marker is applied on the target, the replica equals the volume, the
# source's lag is 0 and the ring is empty.
#
# vm-disks: 32M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/rep

step "keys, certificates and configuration"
setup_guest $W
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA rv ring_mib=8 overflow_wait_ms=10000"
# The target listens on a port of its choice: the source's configuration
# can only be written once it does.
{ target_toml $W 127.0.0.1:0 $W/target; target_volume rv $size $W/replica.img 2; } >$W/target.toml
spawn_target $W
wait_for "target listening" 30 test -s $W/target/listen.addr
{
	SOURCE_DM=r0 source_toml $W rv $size "$(cat $W/target/listen.addr)" $W/source
	# fio writes most of the volume faster than an emulated guest can ship
	# it: keep it all in the spool rather than falling back to a resync.
	printf '[spool]\nlimit_percent = 1000\n'
} >$W/source.toml
spawn_source $W
wait_for "source attached to the kernel ring" 30 consumer_attached r0

step "write through the protected volume"
check "fio randwrite with verify" fio --eta=never --name=rep --filename=/dev/mapper/r0 --rw=randwrite \
	--bsrange=4k-256k --blockalign=4k --ioengine=libaio --iodepth=8 --direct=1 --size=24M \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out
insert_marker r0 42
seq=$marker_seq
check "marker inserted (seq $seq)" test -n "$seq"
if ! target_applied $W/target rv "$seq" r0 240; then
	replctl status --state-dir $W/source
	tail -n 20 $W/source.log $W/target.log
	fail "target applied up to the marker"
fi
wait_for "source lag back to 0" 60 json_has $W/source '"lag_records": ?0,'
replctl status --state-dir $W/source
replctl status --state-dir $W/target
wait_for "ring released by the source" 60 dm_status_has r0 ' live=0 '

step "replica equals the volume"
same_sha /dev/mapper/r0 $W/replica.img "checksums"

step "shutdown"
stop_daemons
teardown r0
