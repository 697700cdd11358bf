#!/bin/sh
# Checksum resync and online verify with the kernel ring (64 KiB chunks):
#  * a target that already holds a copy with 1% of its chunks different:
#    the initial copy compares every chunk and sends exactly those;
#  * verify on an intact replica finds nothing, also while fio writes to
#    the volume (a chunk written while the source read it is compared
#    again, not reported); after chunks of the replica
#    were overwritten behind the daemon's back it finds exactly those (count
#    and offsets), `verify --resync` repairs them, the replica equals the
#    volume;
#  * writes during a resync (fio with verify, two seeds) to chunks already
#    compared, being compared and not yet: replica equals volume.
#
# vm-disks: 64M 480M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

cs_setup

step "a seeded replica: 1% of its chunks differ from the volume"
check "random data on the volume" dd if=/dev/urandom of=/dev/vda bs=1M count=$((size >> 20)) oflag=direct status=none
check "the replica image is a copy of it" dd if=/dev/vda of=$IMG bs=1M iflag=direct status=none
garble $((NCH / 100)) 11
seeded=$(echo "$garbled" | wc -l)
spawn_target $W
spawn_source $W
wait_for "the initial copy is done" 600 resync_done
grep -E "resync (begins|complete)" $W/source.log
compared=$(jnum compared_chunks) sent=$(jnum sent_chunks) sent_bytes=$(jnum sent_bytes)
echo "chunks: $NCH, seeded different: $seeded, compared: $compared, sent: $sent ($sent_bytes bytes)"
check_eq "every chunk was compared" $NCH "$compared"
check_eq "exactly the differing chunks were sent" "$seeded" "$sent"
check_eq "bytes sent are theirs" $((seeded * CHUNK)) "$sent_bytes"
in_sync "after the initial copy"

step "verify: an intact replica"
out=$(replctl verify --state-dir $W/source --wait --timeout 600 2>&1) || fail "verify: $out"
echo "$out"
check "identical" sh -c 'echo "$1" | grep -q "identical"' _ "$out"

step "verify while the application writes: no false differences"
fio --eta=never --name=busy --filename=/dev/mapper/cs --rw=randwrite --bs=16k --ioengine=libaio \
	--iodepth=2 --direct=1 --size=$size --io_size=8M --rate=2m --randseed=9 --output=/tmp/fio-busy.out &
fpid=$!
out=$(replctl verify --state-dir $W/source --wait --timeout 600 2>&1) || fail "verify under writes: $out"
wait $fpid
echo "$out"
check "identical while written" sh -c 'echo "$1" | grep -q "identical"' _ "$out"
in_sync "after the writes"

step "verify: chunks overwritten behind the daemon's back"
garble 3 23
want=$(for i in $garbled; do printf '0x%x\n' $((i * CHUNK)); done)
if out=$(replctl verify --state-dir $W/source --wait --timeout 600 2>&1); then
	fail "verify said nothing differs: $out"
fi
echo "$out"
got=$(echo "$out" | grep -o '0x[0-9a-f]*' | sort -u)
check_eq "verify found exactly the overwritten chunks" "$(echo "$want" | sort -u)" "$got"
check "the status keeps the result" json_has $W/source '"differing_chunks": 3'
check "health says so" json_has $W/source '"kind": "verify"'
out=$(replctl verify --state-dir $W/source --resync --max-rate 64 --wait --timeout 600 2>&1) ||
	fail "verify --resync: $out"
echo "$out"
in_sync "after verify --resync"
out=$(replctl verify --state-dir $W/source --wait --timeout 600 2>&1) || fail "verify after the repair: $out"
check "identical after the repair" sh -c 'echo "$1" | grep -q "identical"' _ "$out"

for seed in 3 4; do
	step "writes during a resync (fio seed $seed)"
	garble $((NCH / 5)) $((seed * 7))
	fio --eta=never --name=during --filename=/dev/mapper/cs --rw=randwrite --bsrange=4k-128k \
		--blockalign=4k --ioengine=libaio --iodepth=4 --direct=1 --size=$size --io_size=24M \
		--randseed=$seed --verify=crc32c --do_verify=1 --verify_fatal=1 --output=/tmp/fio$seed.out &
	fpid=$!
	check "replctl resync --wait" piped replctl resync --state-dir $W/source --wait --timeout 150
	wait $fpid
	check_eq "fio with verify during the resync" 0 $?
	in_sync "after the resync with writes (seed $seed)"
done

step "shutdown"
stop_daemons
teardown cs
