#!/bin/sh
# Resync with the kernel ring: the volume already holds data when it is
# protected, so `replctl resync` copies every region to the (empty) replica
# while fio writes and verifies through the protected volume at the same
# time (later writes must win over the copy). Then the source is stopped,
# writes overflow the 2 MiB ring into the kernel's dirty bitmap, and a
# restarted source takes the bitmap over and resends only those regions by
# itself. After each phase the replica equals the volume.
#
# vm-disks: 48M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
sectors=$(cat /sys/block/vda/size)
size=$((sectors * 512))
W=/tmp/rs
PORT=7712

check "loopback up" ifconfig lo 127.0.0.1 up
check "data on the volume before it is protected" dd if=/dev/urandom of=$DATA bs=1M count=48 oflag=direct status=none
check "insmod dm_replica" insmod "$(module_path dm_replica)"
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA rs ring_mib=2 region_kib=64 overflow_wait_ms=2000"

mkdir -p $W
check "certificates" replctl certs generate --out $W/pki --host source-host --host target-host
check "data key" replctl keys generate --out $W/keys.toml
cat >$W/target.toml <<CFG
listen = "127.0.0.1:$PORT"
keys = "$W/keys.toml"
state_dir = "$W/target"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/target-host.pem"
key = "$W/pki/target-host.key"
[[volume]]
id = "rs"
size = $size
allowed_sources = ["source-host"]
keep_points = 8
replica = { backend = "file", path = "$W/replica.img" }
CFG
cat >$W/source.toml <<CFG
volume = "rs"
volume_size = $size
ring = { group = "rs" }
device = "/dev/mapper/r0"
target = "127.0.0.1:$PORT"
target_name = "target-host"
keys = "$W/keys.toml"
state_dir = "$W/source"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/source-host.pem"
key = "$W/pki/source-host.key"
[retry]
schedule_secs = [0.2]
[resync]
window_bytes = 4194304
CFG
replicad target --config $W/target.toml 2>$W/target.log &
tpid=$!
replicad source --config $W/source.toml 2>$W/source.log &
spid=$!
wait_for "source attached" 30 sh -c 'dmsetup status r0 | grep -q "consumer=1"'

compare() { # what
	out=$(dmsetup message r0 0 marker "$2")
	seq=$(echo "$out" | sed -n "s/^marker $2 seq \([0-9]*\)\$/\1/p")
	check "marker $2 inserted (seq $seq)" test -n "$seq"
	check "target applied up to the marker" replctl wait --state-dir $W/target --volume rs --applied "$seq" --timeout 300
	a=$(dd if=/dev/mapper/r0 iflag=direct bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
	b=$(sha256sum <$W/replica.img | cut -d' ' -f1)
	echo "volume  $a"
	echo "replica $b"
	check_eq "$1: replica equals the volume" "$a" "$b"
}

step "initial copy (full resync) while fio writes through the volume"
fio --eta=never --name=during --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k \
	--blockalign=4k --ioengine=libaio --iodepth=4 --direct=1 --size=48M --io_size=12M \
	--verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio1.out &
fpid=$!
check "replctl resync --wait" replctl resync --state-dir $W/source --wait --timeout 900
wait $fpid
check_eq "fio with verify during the resync" 0 $?
replctl status --state-dir $W/source
replctl status --state-dir $W/target
check "no resync needed any more" sh -c "replctl status --state-dir $W/source --json | grep -qE '\"needs_resync\": ?false'"
check "the target is out of its resync" sh -c "! grep -q '\"resync_since\": [0-9]' $W/target/volumes/rs/state.json"
compare "after the initial copy" 1

step "ring overflow while the source is stopped"
kill $spid
wait $spid
check "fio 8 MiB into a 2 MiB ring with no consumer" fio --eta=never --name=over --filename=/dev/mapper/r0 \
	--rw=randwrite --bs=16k --ioengine=libaio --iodepth=4 --direct=1 --offset=8M --size=8M --io_size=8M \
	--randseed=7 --output=/tmp/fio2.out
dmsetup status r0
check "the ring overflowed" sh -c 'dmsetup status r0 | grep -q " overflow=1 "'
: >$W/source.log
replicad source --config $W/source.toml 2>$W/source.log &
spid=$!
wait_for "the restarted source took the kernel's bitmap over" 120 grep -q "capture ring overflowed" $W/source.log
wait_for "the source resent the dirty regions" 600 grep -q "resync complete" $W/source.log
grep -E "overflowed|resync" $W/source.log | tail -n 5
total=$(grep -E "resync begins" $W/source.log | tail -n 1 | sed -n 's/.*regions=\([0-9]*\).*/\1/p')
echo "regions resent after the overflow: $total of $((size / 65536))"
check "only the overflowed regions were resent" test "$total" -gt 0 -a "$total" -le $((8 * 1048576 / 65536 + 2))
compare "after the overflow resync" 2

step "shutdown"
kill $spid $tpid
wait $spid
wait $tpid
check "dmsetup remove r0" dmsetup remove r0
check "rmmod dm_replica" rmmod dm_replica
