#!/bin/sh
# The protected host restarts while the recovery host keeps running: the
# source daemon stops, the table is removed, the module reloaded, the table
# created again (a new capture ring generation, sequences from 1 again, far
# below what the target applied of the old one) and the daemon started. The
# target takes the new generation over only after applying the old one's
# segments, demands a full resync and stays Inconsistent until its END.
# Writes go on during the resync. Afterwards the replica equals the volume
# and the newest recovery point (at a marker) equals the volume at the
# marker; `replctl wait` for a sequence of the new generation is not fooled
# by the old one's higher sequences.
#
# vm-disks: 48M 256M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/tk
table() { dmsetup create tk --table "0 $sectors replica $DATA tk ring_mib=4 overflow_wait_ms=10000"; }

setup_disk_pair $W tk $size 127.0.0.1:7718 8
check "dmsetup create tk" table
# A small resync window: the resync takes a while, the writes below overlap it.
printf '[spool]\nlimit_percent = 1000\n[resync]\nwindow_bytes = 2097152\n' >>$W/source.toml
start_daemons $W $W/source

step "first generation: many records"
fio --eta=never --name=w --filename=/dev/mapper/tk --rw=randwrite --bsrange=4k-16k --blockalign=4k \
	--ioengine=libaio --iodepth=4 --direct=1 --size=48M --io_size=16M --randseed=1 --output=/tmp/fio1.out
check_eq "fio (first generation)" 0 $?
marker_applied tk 1 $T/state tk
old_seq=$marker_seq
gen1=$(ring_gen tk)
echo "generation $gen1 applied up to record $old_seq"

step "the protected host restarts; the target keeps running"
stop_daemons $spid
teardown tk
load_module
check "dmsetup create tk (a new ring)" table
gen2=$(ring_gen tk)
check "a new ring generation" test "$gen1" != "$gen2"
spawn_source $W
wait_for "the source needs a resync of the new ring" 60 json_has $W/source '"needs_resync": true'

step "writes while the resync runs"
fio --eta=never --name=w --filename=/dev/mapper/tk --rw=randwrite --bsrange=4k-64k --blockalign=4k \
	--ioengine=libaio --iodepth=4 --direct=1 --size=48M --io_size=12M --randseed=2 --output=/tmp/fio2.out &
fpid=$!
wait_for "the target took the new generation over" 120 json_has $T/state "\"generation\": \"$gen2\""
check "the target is Inconsistent during the resync" json_has $T/state '"replica": "Inconsistent"'
wait $fpid
check_eq "fio during the resync" 0 $?
# The new generation's first marker comes far below the old one's records:
# a wait for it in the old generation's terms would return at once.
insert_marker tk 2
early=$marker_seq
check "a marker of the new generation below the old one's (record $early < $old_seq)" test "$early" -lt "$old_seq"
out=$(replctl wait --state-dir $T/state --volume tk --applied "$early" --generation "$gen1" --timeout 2 2>&1) &&
	fail "a wait for record $early of the old generation returned: $out"
echo "$out"
check "a wait for it in the old generation's terms does not return" sh -c 'echo "$1" | grep -q "did not reach record"' _ "$out"
wait_for "the resync ended on the source" 900 json_has $W/source '"needs_resync": false'
marker_applied tk 3 $T/state tk
last=$marker_seq
wait_for "the target is Consistent again" 60 json_has $T/state '"replica": "Consistent"'
replctl status --state-dir $W/source
replctl status --state-dir $T/state

step "the replica and the newest point equal the volume"
same_sha /dev/mapper/tk $T/tk.img "the replica equals the volume"
newest=$(replctl points --state-dir $T/state --volume tk | awk '$1 ~ /^[0-9]+$/ { s = $1 } END { print s }')
check_eq "the newest recovery point is the marker" "$last" "$newest"
same_sha /dev/mapper/tk "$T/state/volumes/tk/points/$(printf '%020d' "$last").img" "the newest point equals the volume at its marker"

stop_daemons
teardown tk
