#!/bin/sh
# The source's spool with the kernel ring: while the target is unreachable,
# fio writes 16x the ring's size through the protected volume; the drain
# keeps the ring from overflowing (the spool holds the outage). When the
# target comes up, the replica catches up and equals the volume. Also: a
# state directory on the protected volume itself is refused at start.
#
# vm-disks: 64M 64M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/spool
ADDR=127.0.0.1:7711

step "keys, certificates and configuration"
# 1 MiB ring; a writer that found it full would wait 10 s and then switch
# the ring to overflow, which this test must never see.
SOURCE_DM=r0 setup_pair $W sp $size $ADDR $W/target $W/replica.img 4 $DATA ring_mib=1 overflow_wait_ms=10000

step "a state directory on a protected volume is refused"
# Another protected volume (its own group, nobody draining it).
check "dmsetup create r1" dmsetup create r1 --table "0 $(cat /sys/block/vdb/size) replica /dev/vdb other overflow_wait_ms=0"
check "mkfs.ext4 on it" mkfs.ext4 -q -F /dev/mapper/r1
mkdir -p /mnt/p
check "mount it" mount -t ext4 /dev/mapper/r1 /mnt/p
SOURCE_DM=r0 source_toml $W sp $size $ADDR /mnt/p/state >$W/bad.toml
replicad source --config $W/bad.toml 2>$W/bad.log
check_eq "replicad refuses to start (exit 2)" 2 $?
cat $W/bad.log
check "the reason names the protected volume" grep -q "r1, which is a protected volume" $W/bad.log
check "umount" umount /mnt/p
check "dmsetup remove r1" dmsetup remove r1

step "target unreachable: the spool takes 16x the ring"
spawn_source $W
wait_for "source attached to the kernel ring" 30 consumer_attached r0
check "fio 16 MiB with verify" fio --eta=never --name=sp --filename=/dev/mapper/r0 --rw=randwrite \
	--bsrange=4k-128k --blockalign=4k --ioengine=libaio --iodepth=8 --direct=1 --size=16M \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out
dmsetup status r0
check "the ring never overflowed" dm_status_has r0 ' overflow=0 '
insert_marker r0 7
seq=$marker_seq
check "marker inserted (seq $seq)" test -n "$seq"
wait_for "marker spooled" 60 json_has $W/source "\"spooled_seq\": ?$((seq + 1)),"
replctl status --state-dir $W/source
spool=$(replctl status --state-dir $W/source --json | sed -n 's/.*"spool_bytes": *\([0-9]*\).*/\1/p')
echo "spool holds $spool bytes"
check "the spool holds more than 8x the ring" test "$spool" -gt $((8 << 20))
check "no resync needed" json_has $W/source '"needs_resync": ?false'

step "target back: the replica catches up"
spawn_target $W
check "target applied up to the marker" target_applied $W/target sp "$seq" r0 300
wait_for "source lag back to 0 and spool empty" 60 json_has $W/source '"spool_bytes": ?0,'
replctl status --state-dir $W/source
replctl status --state-dir $W/target
same_sha /dev/mapper/r0 $W/replica.img "checksums"

step "shutdown"
stop_daemons
teardown r0
