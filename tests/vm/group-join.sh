#!/bin/sh
# A volume cannot join a consistency group that is being replicated.
#
# Volume g (table ga, group g) replicates with `replicad source` attached to
# the group's ring and `replicad target` applying to a file replica. While
# the source is attached:
# * `dmsetup create gb` of a new volume id in group g is refused (EBUSY,
#   "group g has an attached consumer that does not accept new members"),
#   and leaves nothing behind;
# * `dmsetup reload` + `resume` of ga's own table (same volume id) works and
#   keeps the ring;
# * writes to ga still replicate and the replica equals ga: gb never got in.
# Then the consumer allows joins (IOC_ALLOW_JOINS on the daemon's own open
# file, taken with the `joins` guest tool), gb is created and 4 MiB are
# written to it: the source, on meeting a record of volume index 1 while it
# replicates index 0, stops (Critical, exit 3) with an error naming the
# volume index, and nothing of gb is applied: the target's applied record
# and the replica stay what they were, equal to ga. The ioctl is refused
# on a file that is not attached and with bad values, and the allowance
# ends with its consumer: the next consumer refuses new members again.
#
# vm-disks: 16M 8M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

A=/dev/vda
B=/dev/vdb
MIB=1048576
volume_vars $A
sb=$(cat /sys/block/vdb/size)
W=/tmp/gj

# src_has PATTERN: the source's status (JSON; the last published one once
# the daemon stopped) matches PATTERN.
src_has() {
	_st=$(replctl status --state-dir $W/source --json 2>/dev/null)
	echo "$_st" | grep -q -- "$1"
}

# applied: the target's applied record of volume g.
applied() {
	replctl status --state-dir $W/target --json 2>/dev/null |
		sed -n 's/^ *"applied_seq": \([0-9]*\),\{0,1\}$/\1/p' | head -n1
}

# generation: the ring generation dmsetup status of ga shows.
generation() {
	dmsetup status ga | sed -n 's/.* generation=\([0-9a-f]*\) .*/\1/p'
}

setup_guest $W
check "dmsetup create ga (volume g, group g)" \
	dmsetup create ga --table "0 $sectors replica $A g group=g ring_mib=8 overflow_wait_ms=10000"

step "volume g replicates"
# The target listens on a port of its choice, written to the source's
# configuration once it does.
{ target_toml $W 127.0.0.1:0 $W/target; target_volume g $size $W/replica.img 2; } >$W/target.toml
spawn_target $W
wait_for "target listening" 30 test -s $W/target/listen.addr
SOURCE_DM=ga source_toml $W g $size "$(cat $W/target/listen.addr)" $W/source >$W/source.toml
spawn_source $W
wait_for "source attached to the kernel ring" 30 consumer_attached ga
check "write 4 MiB to ga" dio write /dev/mapper/ga 0 $((4 * MIB)) 1
marker_applied ga 1 $W/target g
same_sha /dev/mapper/ga $W/replica.img "replica equals ga"
gen=$(generation)
check "ring generation known ($gen)" test -n "$gen"

step "a new volume cannot join group g while the source is attached"
clear_kernel_log
out=$(dmsetup create gb --table "0 $sb replica $B gb group=g" 2>&1)
rc=$?
echo "$out"
check_not "dmsetup create gb (new volume id gb, group g) fails (exit $rc)" test "$rc" -eq 0
check "dmsetup says the device is busy (EBUSY)" sh -c 'echo "$1" | grep -qi "busy"' sh "$out"
check_not "no device gb left behind" dm_exists gb
check "kernel log says why" kernel_log_has "group g has an attached consumer that does not accept new members"
check "table error in the kernel log" kernel_log_has "replica: Group has an attached consumer that does not accept new members"
dmesg | tail -n 5
check "the source is still attached" consumer_attached ga

step "reloading ga's own table works while attached"
table=$(dmsetup table ga)
check "dmsetup reload ga (same volume id)" dmsetup reload ga --table "$table"
check "dmsetup resume ga" dmsetup resume ga
check_eq "same ring after the reload" "$gen" "$(generation)"
check "the source is still attached" consumer_attached ga

step "ga keeps replicating; gb never got in"
check "write 4 MiB more to ga" dio write /dev/mapper/ga $((4 * MIB)) $((4 * MIB)) 2
marker_applied ga 2 $W/target g
same_sha /dev/mapper/ga $W/replica.img "replica equals ga"
check "source healthy" src_has '"health": "OK"'

step "joins allowed: a record of another volume stops the stream, nothing applied"
before=$(sha256sum <$W/replica.img | cut -d' ' -f1)
applied_before=$(applied)
check "target applied up to record $applied_before" test -n "$applied_before"
check "IOC_ALLOW_JOINS misuse refused (not attached; bad values)" joins misuse $spid
check "the source's consumer allows joins" joins $spid 1
check "the source's consumer refuses joins again" joins $spid 0
check_not "dmsetup create gb refused again" dmsetup create gb --table "0 $sb replica $B gb group=g"
check "the source's consumer allows joins" joins $spid 1
check "dmsetup create gb (group g) now accepted" dmsetup create gb --table "0 $sb replica $B gb group=g"
check "write 4 MiB to gb" dio write /dev/mapper/gb 0 $((4 * MIB)) 3
wait_for "the source stopped" 120 exited $spid
wait $spid
rc=$?
check_eq "source exit status (3: Critical)" 3 "$rc"
tail -n 5 $W/source.log
check "source log names the volume index" grep -q "volume index 1" $W/source.log
check "source status Critical" src_has '"health": "Critical"'
check "status reason names the volume index" src_has "volume index 1"
replctl status --state-dir $W/source 2>/dev/null
sleep 2
check_eq "target applied nothing more" "$applied_before" "$(applied)"
check_eq "replica unchanged" "$before" "$(sha256sum <$W/replica.img | cut -d' ' -f1)"
same_sha /dev/mapper/ga $W/replica.img "replica still equals ga"

step "the allowance ended with the consumer: a new one refuses joins"
drain_start g 77
wait_for "a new consumer attached" 30 consumer_attached ga
check_not "dmsetup create gc (group g) refused" dmsetup create gc --table "0 $sb replica $B gc group=g"
check_not "no device gc left behind" dm_exists gc
kill $drain_pid
wait $drain_pid

step "shutdown"
stop_daemons $tpid
teardown gb ga
