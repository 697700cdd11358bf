#!/bin/sh
# Unplanned failover: the source daemon is killed (-9) at a random moment of
# an fsync-heavy workload on ext4, three times (a volume each); the target
# is then failed over to its latest state. The promoted replica passes
# e2fsck (after journal replay) and holds, intact, every file whose fsync
# returned before the recovery point's record. The old source, back, is
# refused and demoted.
#
# vm-disks: 32M 32M 32M 640M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

W=/tmp/fu
T=/target
PORT=7714

target_disk /dev/vdd $T
setup_guest $W
size=$(($(cat /sys/block/vda/size) * 512))
{
	target_toml $W 127.0.0.1:$PORT $T/state
	for v in 1 2 3; do
		target_volume u$v $size $T/u$v.img 2
	done
} >$W/target.toml
spawn_target $W

round() { # n disk seed
	n=$1
	disk=$2
	sectors=$(cat /sys/block/$disk/size)
	step "round $n: protect /dev/$disk, write with fsync, kill the source"
	check "dmsetup create u$n" dmsetup create u$n --table "0 $sectors replica /dev/$disk u$n ring_mib=4 overflow_wait_ms=5000"
	{ source_toml $W u$n $size 127.0.0.1:$PORT $W/source$n; printf '[spool]\nlimit_percent = 1000\n'; } >$W/source$n.toml
	spawn_source $W source$n
	wait_for "source u$n connected" 60 json_has $W/source$n '"connection": "Connected"'
	check "mkfs.ext4" mkfs.ext4 -q -F -E nodiscard /dev/mapper/u$n
	mkdir -p /mnt/u$n
	check "mount" mount -t ext4 /dev/mapper/u$n /mnt/u$n
	: >/tmp/fsynced$n
	# Each line: file, checksum, and the ring's next sequence once its
	# fsync returned (every record of that fsync is below it).
	(
		i=0
		while :; do
			i=$((i + 1))
			dd if=/dev/urandom of=/mnt/u$n/f$i bs=4k count=$((1 + i % 8)) conv=fsync 2>/dev/null || exit 0
			prod=$(dmsetup status u$n | sed -n 's/.* prod_seq=\([0-9]*\) .*/\1/p')
			echo "f$i $(sha256sum </mnt/u$n/f$i | cut -d' ' -f1) $prod" >>/tmp/fsynced$n
		done
	) &
	wpid=$!
	kill_after=$(shuf -i 10-60 -n 1)
	wait_for "$kill_after files fsynced" 180 sh -c "test \$(wc -l </tmp/fsynced$n) -ge $kill_after"
	kill -9 $spid
	wait $spid
	kill $wpid
	wait $wpid
	umount -l /mnt/u$n
	echo "source killed after $(wc -l </tmp/fsynced$n) fsynced files"

	step "round $n: unplanned failover to the latest state"
	out=$(replctl failover --state-dir $T/state --volume u$n --point latest 2>&1) || fail "failover of u$n: $out"
	echo "$out"
	point=$(echo "$out" | sed -n 's/.*recovery point at record \([0-9]*\).*/\1/p')
	check "the failover names its point ($point)" test -n "$point"
	loop=/dev/loop$n
	check "the promoted volume replays its journal and passes e2fsck" sh -c "
		losetup $loop $T/u$n.img && mkdir -p /mnt/r$n && mount -t ext4 $loop /mnt/r$n && umount /mnt/r$n && e2fsck -fn $loop"
	check "mount the promoted volume" mount -t ext4 $loop /mnt/r$n
	bad=0
	covered=0
	while read -r name sum prod; do
		[ "$prod" -le $((point + 1)) ] || continue
		covered=$((covered + 1))
		got=$(sha256sum </mnt/r$n/$name 2>/dev/null | cut -d' ' -f1)
		[ "$got" = "$sum" ] || { echo "file $name (fsynced before record $prod) differs"; bad=$((bad + 1)); }
	done </tmp/fsynced$n
	echo "files fsynced before the point: $covered of $(wc -l </tmp/fsynced$n)"
	check_eq "every file fsynced before the point is intact" 0 $bad
	check "the point covers files" test $covered -gt 0
	umount /mnt/r$n
	losetup -d $loop

	step "round $n: the old source comes back"
	replicad source --config $W/source$n.toml 2>$W/source$n-back.log
	check_eq "refused and demoted (exit 3)" 3 $?
	check "it says it was failed over" grep -q "failed over" $W/source$n-back.log
	check "its volume is fenced (error table)" sh -c "dmsetup table u$n | grep -q ' error'"
	check "dmsetup remove u$n" dmsetup remove u$n
}

round 1 vda
round 2 vdb
round 3 vdc
stop_daemons $tpid
check "rmmod dm_replica" rmmod dm_replica
