#!/bin/sh
# A long outage with a tiny spool: the target is down while fio writes far
# more than the spool may hold; writers never block, the source switches to
# a dirty-region map (needs resync); when the target is back the dirty
# regions are resent by themselves and the replica converges (checksums
# equal). A second outage: the target is failed over while that resync is
# running, and the promoted replica is its last recovery point (before the
# outage), byte for byte.
#
# vm-disks: 48M 320M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

volume_vars /dev/vda
W=/tmp/out

setup_disk_pair $W ov $size 127.0.0.1:7715 4 /dev/vda ring_mib=2 overflow_wait_ms=5000
cat >>$W/source.toml <<CFG
[spool]
limit_bytes = 2097152
[resync]
window_bytes = 1048576
max_write_bytes = 65536
CFG
start_daemons $W $W/source
check "fio 8 MiB while connected" fio --eta=never --name=a --filename=/dev/mapper/ov --rw=randwrite \
	--bs=64k --ioengine=libaio --iodepth=4 --direct=1 --size=8M --randseed=1 --output=/tmp/fio.out
marker_applied ov 1 $T/state ov
same_sha /dev/mapper/ov $T/ov.img "in sync before the outage"

# target_down WHAT SEED: stops the target, writes 24 MiB (check WHAT) with
# fio's random SEED and waits until the source needs a resync.
target_down() {
	stop_daemons $tpid
	check "$1" fio --eta=never --name=w$2 --filename=/dev/mapper/ov \
		--rw=randwrite --bsrange=4k-128k --blockalign=4k --ioengine=libaio --iodepth=4 --direct=1 --size=48M \
		--io_size=24M --randseed="$2" --output=/tmp/fio.out
	wait_for "the source needs a resync" 60 json_has $W/source '"needs_resync": true'
}

step "outage: the target is down, writers keep going past the spool limit"
target_down "fio 24 MiB with the target down (no hang)" 2
replctl status --state-dir $W/source
check "the ring did not overflow (the spool took it, then the map)" dm_status_has ov ' overflow=0 '

step "the target is back: the dirty regions are resent by themselves"
spawn_target $W
wait_for "resync complete" 600 json_has $W/source '"needs_resync": false'
grep -E "resync" $W/source.log | tail -n 3
marker_applied ov 2 $T/state ov
same_sha /dev/mapper/ov $T/ov.img "the replica converged after the resync"
point_sum=$(sha256sum <$T/ov.img | cut -d' ' -f1)
point_seq=$marker_seq

step "second outage; failover while its resync runs"
target_down "fio 24 MiB with the target down" 3
spawn_target $W
wait_for "the target is in the middle of the resync" 300 grep -qE '"resync_since": [0-9]' $T/state/volumes/ov/state.json
kill -9 $spid
wait $spid
out=$(replctl failover --state-dir $T/state --volume ov --point latest 2>&1) || fail "failover: $out"
echo "$out"
check "the failover used the last recovery point ($point_seq), not the half-resent replica" \
	sh -c "echo '$out' | grep -q 'recovery point at record $point_seq'"
check_eq "the promoted replica is that point, byte for byte" "$point_sum" "$(sha256sum <$T/ov.img | cut -d' ' -f1)"
stop_daemons $tpid
teardown ov
