#!/bin/sh
# Daemon restarts on either side during replication: while fio writes with
# verification through the protected volume, `replicad source` and
# `replicad target` are killed (-9) and restarted, alternately, at random
# moments. Replication resumes by itself; nothing is lost or applied twice:
# after a final marker the replica equals the volume.
#
# vm-disks: 48M 256M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

volume_vars /dev/vda
W=/tmp/rs

setup_disk_pair $W rr $size 127.0.0.1:7716 4 /dev/vda ring_mib=4 overflow_wait_ms=10000
printf '[spool]\nlimit_percent = 1000\n' >>$W/source.toml
start_daemons $W $W/source

fio --eta=never --name=w --filename=/dev/mapper/rr --rw=randwrite --bsrange=4k-64k --blockalign=4k \
	--ioengine=libaio --iodepth=4 --direct=1 --size=48M --io_size=40M --verify=crc32c --do_verify=1 \
	--verify_fatal=1 --output=/tmp/fio.out &
fpid=$!
round=0
while kill -0 $fpid 2>/dev/null && [ $round -lt 6 ]; do
	round=$((round + 1))
	# A random moment: after some more records were captured.
	now=$(dmsetup status rr | sed -n 's/.* prod_seq=\([0-9]*\) .*/\1/p')
	more=$(shuf -i 20-200 -n 1)
	wait_for "round $round: $more more records" 300 sh -c "! kill -0 $fpid 2>/dev/null || [ \$(dmsetup status rr | sed -n 's/.* prod_seq=\([0-9]*\) .*/\1/p') -ge $((now + more)) ]"
	if [ $((round % 2)) = 1 ]; then
		kill -9 $spid
		wait $spid
		spawn_source $W
		echo "round $round: source killed and restarted"
	else
		kill -9 $tpid
		wait $tpid
		spawn_target $W
		echo "round $round: target killed and restarted"
	fi
done
wait $fpid
check_eq "fio with verify, through every restart" 0 $?
check "at least 4 restarts happened during the writes" test $round -ge 4
marker_applied rr 9 $T/state rr
same_sha /dev/mapper/rr $T/rr.img "the replica equals the volume"
check "no resync was needed" json_has $W/source '"needs_resync": false'
stop_daemons
teardown rr
