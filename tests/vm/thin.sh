#!/bin/sh
# The dm-thin replica backend: `replicad target` keeps the replica as a thin
# device in a dm-thin pool and its recovery points as thin snapshots, while
# `replicad source` ships the writes of a protected volume (kernel ring,
# TLS over 127.0.0.1). Shows:
#  * a pool without error_if_no_space is refused at start, with the reason;
#  * a new thin replica is named as zeros at the initial copy's BEGIN
#    (nothing provisioned): no chunk of it is compared;
#  * the replica equals the source after a marker is applied, and each
#    point is a thin snapshot holding the source as of its marker (write A,
#    marker, write B, marker: the first point has A only);
#  * a writable copy of a point (test failover) changes neither the point
#    nor the replica, and goes away when closed;
#  * keep_points pruning deletes the snapshots from the pool;
#  * a snapshot left by a crash between create_snap and its record (test
#    hook REPLICAD_TEST_CRASH=after-create-snap) is deleted at start-up, the
#    replica left suspended by the crash is resumed, replication goes on;
#  * the low-water mark gives a Warning with the pool's figures;
#  * an exhausted pool gives a recoverable Warning, the applier does not
#    hang or mark unwritten records applied, and after the pool is extended
#    replication resumes by itself and the replica is correct.
#  * an online verify compares with the thin replica (read O_DIRECT) and
#    finds it identical;
#  * an unplanned failover to an older point swaps a copy of that point in
#    as the replica (same name), and the old replica leaves the pool.
#
# vm-disks: 16M 8M 64M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

SRC=/dev/vda   # the protected volume
META=/dev/vdb  # pool metadata
DATA=/dev/vdc  # pool data (a linear device over part of it, extended later)
volume_vars $SRC
W=/tmp/thin
LEDGER=$W/target/thin/pool.ledger
POOL_BLOCK=128                # sectors (64 KiB)
DATA_SECTORS=$((16 * 2048))   # 16 MiB at first: 256 blocks
BIG_SECTORS=$((64 * 2048))    # after the extension: 1024 blocks

# status_has PATTERN: the target's status (JSON) matches PATTERN. The
# whole output is read first: `replctl ... | grep -q` would close the pipe
# under replctl, which then dies of the broken pipe.
status_has() {
	_st=$(replctl status --state-dir $W/target --json 2>/dev/null)
	echo "$_st" | grep -q -- "$1"
}

# status_field NAME: a numeric field of the volume's status.
status_field() {
	replctl status --state-dir $W/target --json 2>/dev/null | sed -n "s/^ *\"$1\": \([0-9]*\),\{0,1\}$/\1/p" | head -n1
}

# marker N: inserts marker N on the source (check "marker N (seq S)") and
# sets $seq to its record sequence S.
marker() {
	insert_marker r0 "$1"
	seq=$marker_seq
	check "marker $1 (seq $seq)" test -n "$seq"
}

# write_at FILE OFFSET_MIB: writes FILE at OFFSET_MIB of the protected volume.
write_at() {
	dd if="$1" of=/dev/mapper/r0 bs=1M seek="$2" oflag=direct conv=notrunc 2>/dev/null
}

# random_file FILE MIB
random_file() {
	dd if=/dev/urandom of="$1" bs=1M count="$2" 2>/dev/null
}

# write_marked WHAT MIB OFFSET_MIB N: writes MIB MiB of random data at
# OFFSET_MIB of the protected volume (check WHAT), then marker N.
write_marked() {
	random_file /tmp/marked "$2"
	check "$1" write_at /tmp/marked "$3"
	marker "$4"
}

# wait_applied SEQ: the target applied record SEQ.
wait_applied() {
	check "target applied record $1" target_applied $W/target tv "$1" r0 180
}

# point_dev SEQ: the thin device id of point SEQ, from the pool's ledger.
point_dev() {
	grep "\"kind\":\"point\",\"point\":$1[,}]" "$LEDGER" | sed -n 's/^{"id":\([0-9]*\),.*/\1/p'
}

# thin_exists ID: thin device ID exists in the pool (activating it works).
thin_exists() {
	if dmsetup create probe --readonly --table "0 8 thin /dev/mapper/pool $1" 2>/dev/null; then
		dmsetup remove probe
		return 0
	fi
	! dm_exists probe || dmsetup remove probe
	return 1
}

# vol_sum DEVICE: checksum of a device's whole content (O_DIRECT).
vol_sum() {
	dd if="$1" iflag=direct bs=1M 2>/dev/null | md5sum | cut -d' ' -f1
}

# start_target [ENV=VALUE]: starts replicad target (with that environment)
# and waits until it serves.
start_target() {
	_n=$(grep -c 'target ready' $W/target.log 2>/dev/null)
	env "$@" replicad target --config $W/target.toml 2>>$W/target.log &
	tpid=$!
	wait_for "target ready" 60 sh -c "[ \$(grep -c 'target ready' $W/target.log) -gt ${_n:-0} ]"
}

SOURCE_INITIAL_COPY=true SOURCE_DM=r0 SOURCE_RETRY_SECS=1 setup_pair $W tv $size 127.0.0.1:7710 $W/target \
	'{ backend = "thin", pool = "pool", name = "rep", low_water_percent = 50 }' 2 $SRC ring_mib=8 overflow_wait_ms=10000
printf '[spool]\nlimit_percent = 1000\n' >>$W/source.toml

step "thin pool (first without error_if_no_space)"
check "pool data device" dmsetup create pooldata --table "0 $DATA_SECTORS linear $DATA 0"
check "pool without error_if_no_space" dmsetup create pool \
	--table "0 $DATA_SECTORS thin-pool $META /dev/mapper/pooldata $POOL_BLOCK 0 0"

check "configuration valid" replicad check target --config $W/target.toml
check_not "target refuses a pool that queues when full" replicad target --config $W/target.toml 2>$W/refused.log
cat $W/refused.log
check "refusal names error_if_no_space" grep -q "error_if_no_space" $W/refused.log
check_not "no replica device created" dm_exists rep

check "reload the pool with error_if_no_space" dmsetup reload pool \
	--table "0 $DATA_SECTORS thin-pool $META /dev/mapper/pooldata $POOL_BLOCK 0 1 error_if_no_space"
check "resume the pool" dmsetup resume pool
dmsetup table pool

step "start replication"
start_target
check "replica device created" dm_exists rep
dmsetup table rep
rep_id=$(sed -n 's/^{"id":\([0-9]*\),"volume":"tv","kind":"replica".*/\1/p' "$LEDGER")
check "replica's id in the ledger ($rep_id)" test -n "$rep_id"
check "replica is thin device $rep_id of the pool, $sectors sectors" \
	sh -c "dmsetup table rep | grep -qE '^0 $sectors thin [0-9]+:[0-9]+ $rep_id\$'"
spawn_source $W
wait_for "source attached to the kernel ring" 30 consumer_attached r0

step "initial copy to the new thin replica"
# Nothing of it is provisioned: the target says at BEGIN that all of it
# reads as zeros, and the volume (a new disk) is zeros too: nothing is
# compared, nothing sent.
wait_for "initial copy done" 120 json_has $W/source '"needs_resync": false'
wait_for "target Consistent" 60 status_has '"replica": "Consistent"'
check "the target named the whole new thin replica as zeros" grep -q "zero_bytes=$size " $W/target.log
check_eq "chunks compared" 0 "$(jnum compared_chunks)"
check_eq "chunks sent" 0 "$(jnum sent_chunks)"
check_eq "zero chunks neither compared nor sent" "$((size / 131072))" "$(jnum zero_chunks)"

step "write A, marker; write B, marker"
write_marked "write A" 1 0 1
seq1=$seq
sum1=$(vol_sum /dev/mapper/r0)
write_marked "write B" 1 2 2
seq2=$seq
sum2=$(vol_sum /dev/mapper/r0)
check "A and B changed the volume" test "$sum1" != "$sum2"
wait_applied "$seq2"
check "replica equals the source" same_content /dev/mapper/r0 /dev/mapper/rep

step "recovery points are thin snapshots with the source as of their marker"
PT="--config $W/target.toml --volume tv"
points=$(replctl point list $PT | tr '\n' ' ')
echo "points: $points"
check "point $seq1 listed" sh -c "echo ' $points' | grep -q ' $seq1 '"
check "point $seq2 listed" sh -c "echo ' $points' | grep -q ' $seq2 '"
dev1=$(point_dev "$seq1")
dev2=$(point_dev "$seq2")
check "points have thin device ids ($dev1, $dev2)" test -n "$dev1" -a -n "$dev2" -a "$dev1" != "$dev2"
p1=$(replctl point open $PT --point "$seq1")
check "point $seq1 opened ($p1)" test -b "$p1"
check "point $seq1 is read-only thin device $dev1" \
	sh -c "dmsetup table rep-point-$seq1 | grep -qE ' thin [0-9]+:[0-9]+ $dev1\$' && dmsetup info rep-point-$seq1 | grep -q READ-ONLY"
check_eq "point $seq1 holds A only" "$sum1" "$(vol_sum "$p1")"
p2=$(replctl point open $PT --point "$seq2")
check_eq "point $seq2 holds A and B" "$sum2" "$(vol_sum "$p2")"

step "test failover: a writable copy of a point"
c1=$(replctl point open $PT --point "$seq1" --writable)
check "copy of point $seq1 opened ($c1)" test -b "$c1"
check "write to the copy" sh -c "dd if=/dev/urandom of=$c1 bs=1M count=1 seek=5 oflag=direct conv=notrunc 2>/dev/null"
check "the copy differs" test "$(vol_sum "$c1")" != "$sum1"
check_eq "point $seq1 unchanged" "$sum1" "$(vol_sum "$p1")"
check "replica unchanged" same_content /dev/mapper/r0 /dev/mapper/rep
check "copy closed" replctl point close $PT --point "$seq1" --writable
check_not "copy device gone" dm_exists "rep-test-$seq1"
check_not "copy's id gone from the ledger" grep -q '"kind":"clone"' "$LEDGER"
check "point $seq1 closed" replctl point close $PT --point "$seq1"
check "point $seq2 closed" replctl point close $PT --point "$seq2"
check_not "point device gone" dm_exists "rep-point-$seq1"

step "keep_points = 2: the oldest snapshot is deleted from the pool"
check "snapshot $dev1 exists before pruning" thin_exists "$dev1"
write_marked "write C" 1 4 3
seq3=$seq
wait_applied "$seq3"
points=$(replctl point list $PT | tr '\n' ' ')
echo "points: $points"
check_not "point $seq1 pruned" sh -c "echo ' $points' | grep -q ' $seq1 '"
check "point $seq3 listed" sh -c "echo ' $points' | grep -q ' $seq3 '"
check_eq "point $seq1 gone from the ledger" "" "$(point_dev "$seq1")"
check_not "snapshot $dev1 deleted from the pool" thin_exists "$dev1"
check "snapshot $dev2 still there" thin_exists "$dev2"

step "crash between create_snap and the record: the snapshot is deleted at start-up"
stop_daemons $tpid
start_target REPLICAD_TEST_CRASH=after-create-snap
write_marked "write D" 1 6 4
seq4=$seq
wait_for "target aborted by the test hook" 120 exited $tpid
wait $tpid
echo "target exit status $?"
check "the hook fired after create_snap" grep -q "aborting after create_snap" $W/target.log
dev4=$(point_dev "$seq4")
check "the intent for point $seq4 is in the ledger (device $dev4)" test -n "$dev4"
check "snapshot $dev4 exists" thin_exists "$dev4"
check "the crash left the replica suspended" sh -c "dmsetup info rep | grep -q SUSPENDED"
start_target
check "start-up deleted the unrecorded snapshot" grep -q "deleting unrecorded snapshot" $W/target.log
check_not "snapshot $dev4 deleted from the pool" thin_exists "$dev4"
check_eq "point $seq4 gone from the ledger" "" "$(point_dev "$seq4")"
check_not "replica resumed" sh -c "dmsetup info rep | grep -q SUSPENDED"
dd if=/dev/zero of=/tmp/e4k bs=4096 count=1 2>/dev/null
write_marked "write E" 1 8 5
seq5=$seq
wait_applied "$seq5"
check "replica equals the source" same_content /dev/mapper/r0 /dev/mapper/rep

step "a discard reads back as zeroes on the replica (whole pool blocks unmapped, partial ones zeroed)"
# Inside E (8 MiB .. 9 MiB), starting and ending inside 64 KiB pool blocks.
check "discard through the protected volume" blkdiscard -o $((8 * 1048576 + 4096)) -l $((1048576 - 8192)) /dev/mapper/r0
marker 50
seqd=$seq
wait_applied "$seqd"
zeroes=$(dd if=/dev/zero bs=4096 count=254 2>/dev/null | md5sum | cut -d' ' -f1)
check_eq "the discarded range of the replica reads as zeroes" "$zeroes" \
	"$(dd if=/dev/mapper/rep iflag=direct bs=4096 skip=$((8 * 256 + 1)) count=254 2>/dev/null | md5sum | cut -d' ' -f1)"
check "replica equals the source" same_content /dev/mapper/r0 /dev/mapper/rep
check_not "the edges of E are kept" sh -c "dd if=/dev/mapper/rep iflag=direct bs=4096 skip=$((8 * 256)) count=1 2>/dev/null | cmp -s - /tmp/e4k"

step "low-water mark (50%)"
check "health OK before the low-water test" status_has '"health": "OK"'
dmsetup status pool
write_marked "write F (5 MiB)" 5 10 6
seq6=$seq
sum6=$(vol_sum /dev/mapper/r0)
wait_applied "$seq6"
dmsetup status pool
wait_for "Warning: pool above its low-water mark, with figures" 60 \
	status_has 'thin pool pool is above its low-water mark of 50%: data [0-9]*/256 blocks'
replctl status --state-dir $W/target

step "pool exhaustion: Warning, no hang, nothing applied that was not written"
write_marked "overwrite the whole volume (16 MiB, more than the pool has left)" 16 0 7
seq7=$seq
sum7=$(vol_sum /dev/mapper/r0)
wait_for "pool out of data space" 120 sh -c "dmsetup status pool | grep -q out_of_data_space"
wait_for "Warning: replica apply retried on a full pool" 120 \
	status_has 'No space left on device'
wait_for "Warning: the pool's state, with figures" 60 \
	status_has 'thin pool pool is out of data space (data [0-9]*/256 blocks'
replctl status --state-dir $W/target
check "target still running" kill -0 $tpid
applied=$(status_field applied_seq)
check "marker 7 not applied while the pool is full (applied $applied < $seq7)" test "$applied" -lt "$seq7"
check_not "no Critical" status_has Critical

step "extend the pool: replication resumes by itself"
check "grow the data device" dmsetup reload pooldata --table "0 $BIG_SECTORS linear $DATA 0"
check "resume the data device" dmsetup resume pooldata
check "reload the pool, larger" dmsetup reload pool \
	--table "0 $BIG_SECTORS thin-pool $META /dev/mapper/pooldata $POOL_BLOCK 0 1 error_if_no_space"
check "resume the pool" dmsetup resume pool
dmsetup status pool
wait_applied "$seq7"
wait_for "health back to OK" 60 status_has '"health": "OK"'
replctl status --state-dir $W/target
check "replica equals the source" same_content /dev/mapper/r0 /dev/mapper/rep
p7=$(replctl point open $PT --point "$seq7")
check_eq "point $seq7 holds the source as of marker 7" "$sum7" "$(vol_sum "$p7")"
check "point $seq7 closed" replctl point close $PT --point "$seq7"

step "online verify reads the thin replica (O_DIRECT): identical"
out=$(replctl verify --state-dir $W/source --wait --timeout 300 2>&1) || fail "verify: $out"
echo "$out"
check "verify says identical" sh -c 'echo "$1" | grep -q "identical"' _ "$out"

step "unplanned failover to an older point: a copy of it becomes the replica"
stop_daemons $spid
out=$(replctl failover --state-dir $W/target --volume tv --point "$seq6") || fail "failover: $out"
echo "$out"
check_eq "the promoted replica holds the source as of marker 6" "$sum6" "$(vol_sum /dev/mapper/rep)"
new_id=$(sed -n 's/^{"id":\([0-9]*\),"volume":"tv","kind":"replica".*/\1/p' "$LEDGER")
check "the replica is another thin device now ($new_id, was $rep_id)" test -n "$new_id" -a "$new_id" != "$rep_id"
check "rep maps thin device $new_id" sh -c "dmsetup table rep | grep -qE ' thin [0-9]+:[0-9]+ $new_id\$'"
check_not "the old replica (thin device $rep_id) is deleted from the pool" thin_exists "$rep_id"
check "point $seq6 is still a snapshot in the pool" thin_exists "$(point_dev "$seq6")"

step "shutdown"
stop_daemons $tpid
teardown r0
