#!/bin/sh
# Ordering under a filesystem: an fsync-heavy ext4 workload on a protected
# volume. The consumer checks, for every record, that no record after it in
# the ring had completed before it was submitted (completion and submission
# times are in the descriptors), so any prefix of the ring is a state the
# disk could have been in. The replayed copy must equal the disk, the copy
# must pass `e2fsck -fn`, and flushes must reach the ring as FLUSH records.
#
# vm-disks: 64M 64M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

setup_ring_guest
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA fs ring_mib=16 overflow_wait_ms=10000"
drain_start fs 1 --image 0:$COPY --check-order --log /tmp/ring.log
wait_for "consumer attached" 20 consumer_attached r0

step "ext4 with an fsync after every write"
check "mkfs.ext4" mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0,lazy_journal_init=0 /dev/mapper/r0
check "mount" mount -t ext4 -o data=ordered /dev/mapper/r0 /mnt
check "fio: 2 jobs of small random writes, fsync after each" fio --eta=never --name=fs --directory=/mnt \
	--rw=randwrite --bsrange=4k-32k --size=6M --numjobs=2 --fsync=1 --ioengine=psync \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio.out
i=0
while [ $i -lt 40 ]; do
	echo "file $i" >/mnt/small-$i
	check "fsync small-$i" fio --eta=never --name=f$i --filename=/mnt/small-$i --rw=write --bs=4k --size=4k \
		--fsync=1 --ioengine=psync --output=/dev/null
	i=$((i + 10))
done
check "umount" umount /mnt

step "drain and compare"
check "marker" dmsetup message r0 0 marker 1
drain_wait "drain reached the marker" 300 "drain exit status (includes the order check)"
flushes=$(sed -n 's/^drained .* flushes=\([0-9]*\).*/\1/p' /tmp/drain.out)
check "flushes were captured as FLUSH records ($flushes)" test "$flushes" -gt 20
fua=$(grep -c 'op=1 .* flags=1 ' /tmp/ring.log || true)
echo "writes with FUA: $fua"
check "the replayed copy equals the disk" same_content $DATA $COPY
check "the copy is a clean ext4 filesystem" e2fsck -fn $COPY
teardown r0
