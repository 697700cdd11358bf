#!/bin/sh
# Benchmark (not a test): replication lag (RPO) in one guest, both roles
# over loopback. Measures the pipeline's throughput with a full-speed write
# of the steady load's kind (4-64 KiB random writes, until applied), then
# runs fio at half of it for BENCH_RUNTIME seconds while sampling the
# source's lag (age of the oldest record not yet durable on the target)
# twice a second, then times a planned failover. Prints BENCH-RPO lines that
# scripts/bench-rpo.sh turns into a table.
#
# vm-disks: 256M 640M 16M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
sectors=$(cat /sys/block/vda/size)
size=$((sectors * 512))
W=/tmp/rpo
T=/target
RUNTIME=${BENCH_RUNTIME:-60}

check "loopback up" ifconfig lo 127.0.0.1 up
# The replica: a thin volume in a pool (data /dev/vdb, metadata /dev/vdc).
check "thin pool" dmsetup create pool --table \
	"0 $(cat /sys/block/vdb/size) thin-pool /dev/vdc /dev/vdb 128 0 1 error_if_no_space"
mkdir -p $T
check "insmod dm_replica" insmod "$(module_path dm_replica)"
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA rpo ring_mib=64 overflow_wait_ms=10000"
repl_keys $W
{
	target_toml $W 127.0.0.1:7720 $T/state
	target_volume rpo $size $T/unused 2 | sed 's|^replica = .*|replica = { backend = "thin", pool = "pool", name = "rpo-replica" }|'
} >$W/target.toml
{ SOURCE_DM=r0 source_toml $W rpo $size 127.0.0.1:7720 $W/source; printf '[spool]\nlimit_percent = 1000\n'; } >$W/source.toml
replicad target --config $W/target.toml 2>$W/target.log &
replicad source --config $W/source.toml 2>$W/source.log &
wait_for "source connected" 60 json_has $W/source '"connection": "Connected"'

step "link throughput: 64 MiB of the steady load's writes at full speed, until applied"
t0=$(cut -d' ' -f1 /proc/uptime)
check "fio 64 MiB, 4-64 KiB random writes" fio --eta=never --name=tp --filename=/dev/mapper/r0 \
	--rw=randwrite --bsrange=4k-64k --blockalign=4k --ioengine=libaio --iodepth=4 --direct=1 \
	--size=256M --io_size=64M --output=/tmp/tp.out
marker_applied r0 1 $T/state rpo
t1=$(cut -d' ' -f1 /proc/uptime)
mibps=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", 64 / (b - a) }')
echo "BENCH-RPO link_mib_s $mibps"
half=$(awk -v m="$mibps" 'BEGIN { r = int(m * 1024 / 2); if (r < 64) r = 64; print r }')

# steady FRACTION_NAME KIB_PER_S MARKER: fio at that rate for RUNTIME s,
# the source's lag sampled twice a second, then a marker applied.
steady() {
	step "steady load at $1 of the link throughput (${2} KiB/s) for ${RUNTIME} s, lag sampled"
	fio --eta=never --name=steady --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k --blockalign=4k \
		--ioengine=libaio --iodepth=4 --direct=1 --rate="${2}k" --time_based --runtime="$RUNTIME" \
		--output=/tmp/steady.out &
	fpid=$!
	: >/tmp/lag
	while kill -0 $fpid 2>/dev/null; do
		replctl status --state-dir $W/source --json | sed -n 's/.*"lag_seconds": *\([0-9.e+-]*\).*/\1/p' >>/tmp/lag
		sleep 0.5
	done
	wait $fpid
	check_eq "fio steady" 0 $?
	sort -g /tmp/lag | awk -v f="$1" '{ v[NR] = $1 } END {
		if (NR == 0) { print "BENCH-RPO " f "_samples 0"; exit }
		p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
		printf "BENCH-RPO %s_samples %d\nBENCH-RPO %s_lag_p50_s %.3f\nBENCH-RPO %s_lag_p99_s %.3f\nBENCH-RPO %s_lag_max_s %.3f\n", f, NR, f, p50, f, p99, f, v[NR] }'
	marker_applied r0 "$3" $T/state rpo
}
steady half "$half" 2
steady quarter "$((half / 2))" 3

step "planned failover (idle writers)"
t0=$(cut -d' ' -f1 /proc/uptime)
check "replctl failover --planned" replctl failover --planned --state-dir $W/source
t1=$(cut -d' ' -f1 /proc/uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "BENCH-RPO failover_s %.2f\n", b - a }'
