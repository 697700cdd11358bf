#!/bin/sh
# Planned failover under an active writer, both roles in one guest (the
# target's state and replica on their own disk). An ext4 filesystem on the
# protected volume is written file by file with fsync while
# `replctl failover --planned` runs: the writer gets an error (no hang),
# the source daemon hands over and stops, and the replica holds every byte
# of the source volume (checksums equal) and every file whose fsync
# returned; e2fsck is clean. The old primary, demoted, does not start; one
# that lost its state and comes back at the old epoch is refused by the new
# primary and fences its own volume (no split brain).
#
# vm-disks: 64M 320M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/fo

SOURCE_DM=r0 setup_disk_pair $W fo $size 127.0.0.1:7713 2 $DATA ring_mib=4 overflow_wait_ms=5000
printf '[spool]\nlimit_percent = 1000\n' >>$W/source.toml
start_daemons $W $W/source

step "a filesystem written with fsync while replicating"
check "mkfs.ext4 on the protected volume" mkfs.ext4 -q -F -E nodiscard /dev/mapper/r0
mkdir -p /mnt/src
check "mount it" mount -t ext4 /dev/mapper/r0 /mnt/src
: >/tmp/fsynced
(
	i=0
	while :; do
		i=$((i + 1))
		dd if=/dev/urandom of=/mnt/src/f$i bs=4k count=$((1 + i % 16)) conv=fsync 2>/dev/null || exit 0
		echo "f$i $(sha256sum </mnt/src/f$i | cut -d' ' -f1)" >>/tmp/fsynced
	done
) &
wpid=$!
wait_for "30 files written and fsynced" 120 sh -c 'test $(wc -l </tmp/fsynced) -ge 30'

step "planned failover while the writer runs"
check "replctl failover --planned" replctl failover --planned --state-dir $W/source
wait_for "the writer got an error and stopped (no hang)" 60 exited $wpid
echo "files fsynced before the failover: $(wc -l </tmp/fsynced)"
check "the source volume is fenced (error table)" sh -c 'dmsetup table r0 | grep -q " error"'
wait $spid
check_eq "the source daemon stopped by itself" 0 $?
check "the source recorded its demotion" grep -q demoted $W/source/role.json
umount -l /mnt/src

step "the replica is the volume, byte for byte"
a=$(dd if=$DATA iflag=direct bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
b=$(sha256sum <$T/fo.img | cut -d' ' -f1)
echo "source data device $a"
echo "replica            $b"
check_eq "no write lost" "$a" "$b"
replctl status --state-dir $T/state
replctl points --state-dir $T/state --volume fo
check "the target is the primary" json_has $T/state '"role": "Primary"'

step "the files on the target"
stop_daemons $tpid
check "the promoted volume passes e2fsck after journal replay" sh -c "
	losetup /dev/loop0 $T/fo.img && mkdir -p /mnt/rep && mount -t ext4 /dev/loop0 /mnt/rep && umount /mnt/rep && e2fsck -fn /dev/loop0"
check "mount the promoted volume" mount -t ext4 /dev/loop0 /mnt/rep
bad=0
while read -r name sum; do
	got=$(sha256sum </mnt/rep/$name | cut -d' ' -f1)
	[ "$got" = "$sum" ] || { echo "file $name differs"; bad=$((bad + 1)); }
done </tmp/fsynced
check_eq "every fsynced file is on the promoted volume" 0 $bad
ls /mnt/rep | head -n 5
umount /mnt/rep
losetup -d /dev/loop0
# What the new primary holds now (mounting it replayed its journal).
b=$(sha256sum <$T/fo.img | cut -d' ' -f1)

step "the old primary comes back"
spawn_target $W
replicad source --config $W/source.toml 2>$W/source2.log
check_eq "a demoted source does not start (exit 2)" 2 $?
check "it says why" grep -q "demoted" $W/source2.log
# Its state lost (restored from an old backup): it protects the volume
# again and tries to replicate at the old epoch.
check "the old primary's volume is back under a replica table" sh -c "dmsetup load r0 --table '0 $sectors replica $DATA fo ring_mib=4' && dmsetup resume r0"
rm -f $W/source/role.json
replicad source --config $W/source.toml 2>$W/source3.log
check_eq "refused by the new primary (Critical, exit 3)" 3 $?
check "the reason says it was failed over" grep -q "failed over" $W/source3.log
check "and it fenced its volume again (error table)" sh -c 'dmsetup table r0 | grep -q " error"'
check "the old primary changed nothing on the new one" sh -c "test \"\$(sha256sum <$T/fo.img | cut -d' ' -f1)\" = $b"
stop_daemons $tpid
teardown r0
