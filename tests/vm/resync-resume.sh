#!/bin/sh
# An interrupted checksum resync resumes from its cursor: the source daemon
# killed (SIGKILL) at ~30% and ~70% of a resync of every chunk resumes where
# its cursor says (chunks proven before the kill are not sent again); a
# tampered cursor is refused and the resync starts over; a daemon stopped
# during a verify keeps what it found different (resynced after the
# restart). Each ends with the replica equal to the volume.
#
# vm-disks: 64M 480M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

cs_setup
check "random data on the volume" dd if=/dev/urandom of=/dev/vda bs=1M count=$((size >> 20)) oflag=direct status=none
spawn_target $W
spawn_source $W
wait_for "the initial copy is done" 600 resync_done
in_sync "after the initial copy"

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

# verify_compared N: the running verify has answers for N chunks.
verify_compared() {
	json_has $W/source '"verify": true' || return 1
	_c=$(jnum compared_chunks)
	[ -n "$_c" ] && [ "$_c" -ge "$1" ]
}

step "the daemon stopped during a verify: what it found different is resynced after the restart"
for i in 1 2 3; do
	check "chunk $i of the replica overwritten" dd if=/dev/urandom of=$IMG bs=$CHUNK count=1 seek=$i conv=notrunc status=none
done
sync
check "replctl verify (slow)" replctl verify --state-dir $W/source --max-rate 2
wait_for "the verify compared the first chunks" 300 verify_compared 16
stop_daemons $spid
check "the findings were saved as needing a resync" grep -q "saved as needing a resync" $W/source.log
check "the report says the verify was abandoned" grep -q '"abandoned": "the daemon stopped"' $W/source/verify.json
: >$W/source.log
spawn_source $W
wait_for "the resync after the restart is done" 600 sh -c "grep -q 'resync complete' $W/source.log"
wait_for "the resync is done" 600 resync_done
check_eq "it resent exactly the three chunks" 3 "$(jnum sent_chunks)"
in_sync "after the resync of the verify's findings"

step "shutdown"
stop_daemons
teardown cs
