#!/bin/sh
# Checksum resync and online verify with the kernel ring (64 KiB chunks):
#  * a target that already holds a copy with 1% of its chunks different:
#    the initial copy compares every chunk and sends exactly those;
#  * verify on an intact replica finds nothing; after chunks of the replica
#    were overwritten behind the daemon's back it finds exactly those (count
#    and offsets), `verify --resync` repairs them, the replica equals the
#    volume;
#  * writes during a resync (fio with verify, two seeds) to chunks already
#    compared, being compared and not yet: replica equals volume;
#  * the source daemon killed at ~30% and ~70% of a resync resumes from its
#    cursor (chunks proven before the kill are not sent again), a tampered
#    cursor is refused and the resync starts over; each ends with the
#    replica equal to the volume.
#
# vm-disks: 64M 320M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

W=/tmp/cs
ADDR=127.0.0.1:7731
CHUNK=65536
volume_vars /dev/vda
NCH=$((size / CHUNK))
SOURCE_INITIAL_COPY=true setup_disk_pair $W cs $size $ADDR 8 /dev/vda ring_mib=4 region_kib=64
printf '[resync]\nchunk_kib = 64\nwindow_bytes = 4194304\n' >>$W/source.toml
IMG=$T/cs.img
marker=0

# jnum FIELD: the number FIELD of the source's resync progress (the
# running or last resync's).
jnum() {
	replctl status --state-dir $W/source --json 2>/dev/null | tr -d ' \n' |
		sed -n 's/.*"resync_progress":{\([^}]*\)}.*/\1/p' |
		sed -n "s/.*\"$1\":\([0-9][0-9]*\).*/\1/p"
}

# done_pct: how far the running resync is, percent of its chunks proven.
done_pct() {
	_t=$(jnum total_chunks) _r=$(jnum remaining_chunks)
	[ -n "$_t" ] && [ -n "$_r" ] && [ "$_t" -gt 0 ] || return 1
	echo $(((_t - _r) * 100 / _t))
}

# at_least PCT: the running resync proved at least PCT% of its chunks.
at_least() {
	json_has $W/source '"resync_running": true' || return 1
	_d=$(done_pct) || return 1
	[ "$_d" -ge "$1" ]
}

# garble N SEED: overwrites N distinct chunks of the replica image with
# random data (behind the target's back) and lists their offsets, sorted,
# in $garbled.
garble() {
	garbled=$(awk -v n="$1" -v seed="$2" -v max=$NCH 'BEGIN {
		srand(seed); c = 0
		while (c < n) { i = int(rand() * max); if (!(i in s)) { s[i] = 1; c++ } }
		for (i in s) print i }' | sort -n)
	for i in $garbled; do
		dd if=/dev/urandom of=$IMG bs=$CHUNK count=1 seek="$i" conv=notrunc status=none ||
			fail "garble chunk $i"
	done
	sync
}

# in_sync WHAT: a marker through the stream, applied, and the replica
# equals the volume.
in_sync() {
	marker=$((marker + 1))
	marker_applied /dev/mapper/cs $marker $T/state cs
	same_sha /dev/mapper/cs $IMG "$1"
}

# resync_done: the source finished its resync and the target is
# consistent again.
resync_done() {
	json_has $W/source '"needs_resync": false' && json_has $T/state '"replica": "Consistent"'
}

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
	check "replctl resync --wait" replctl resync --state-dir $W/source --wait --timeout 900
	wait $fpid
	check_eq "fio with verify during the resync" 0 $?
	in_sync "after the resync with writes (seed $seed)"
done

for pct in 30 70; do
	step "the source killed at ~$pct% of a resync resumes from its cursor"
	check "replctl resync --full" replctl resync --state-dir $W/source --full
	wait_for "the resync reached $pct%" 600 at_least $pct
	kill -9 $spid
	wait $spid
	killed_at=$(done_pct || echo "?")
	echo "killed at about $killed_at% (status of the last publication)"
	check "the cursor was saved" test -s $W/source/resync.state
	: >$W/source.log
	spawn_source $W
	wait_for "the resync is done after the restart" 900 resync_done
	grep -E "resum|resync (begins|complete)" $W/source.log
	check "it resumed from its cursor" grep -q "resync resumes from its saved cursor" $W/source.log
	before=$(jnum done_before) sent=$(jnum sent_chunks)
	echo "after the restart: $before chunks proven before the kill, $sent sent again"
	check "chunks proven before the kill were not sent again" test "$before" -gt $((NCH * (pct - 15) / 100))
	check "what was sent after the restart is the rest" test "$sent" -le $((NCH - before))
	in_sync "after the resumed resync ($pct%)"
done

step "a tampered cursor is refused and the resync starts over"
check "replctl resync --full" replctl resync --state-dir $W/source --full
wait_for "the resync reached 40%" 600 at_least 40
stop_daemons $spid
check "the cursor was saved" test -s $W/source/resync.state
check "one byte of it changed" sh -c "printf 'Z' | dd of=$W/source/resync.state bs=1 seek=80 conv=notrunc status=none"
: >$W/source.log
spawn_source $W
wait_for "the resync is done after the restart" 900 resync_done
grep -E "refused|resum|resync (begins|complete)" $W/source.log
check "the cursor was refused" grep -q "resync state refused" $W/source.log
check_not "it did not resume from it" grep -q "resync resumes from its saved cursor" $W/source.log
check_eq "it started over: nothing proven before" 0 "$(jnum done_before)"
in_sync "after the restarted resync"

step "shutdown"
stop_daemons
teardown cs
