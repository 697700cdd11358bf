#!/bin/sh
# Benchmark (not a test): replication lag (RPO) in one guest, both roles
# over loopback. Measures the pipeline's throughput with a full-speed write,
# then runs fio at half of it for BENCH_RUNTIME seconds while sampling the
# source's lag (age of the oldest record not yet durable on the target)
# twice a second, then times a planned failover. Prints BENCH-RPO lines that
# scripts/bench-rpo.sh turns into a table.
#
# vm-disks: 256M 640M
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
check "target disk" mkfs.ext4 -q -F /dev/vdb
mkdir -p $T
check "mount it" mount -t ext4 /dev/vdb $T
check "insmod dm_replica" insmod "$(module_path dm_replica)"
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA rpo ring_mib=64 overflow_wait_ms=10000"
mkdir -p $W
check "certificates" replctl certs generate --out $W/pki --host source-host --host target-host
check "data key" replctl keys generate --out $W/keys.toml
cat >$W/target.toml <<CFG
listen = "127.0.0.1:7720"
keys = "$W/keys.toml"
state_dir = "$T/state"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/target-host.pem"
key = "$W/pki/target-host.key"
[[volume]]
id = "rpo"
size = $size
allowed_sources = ["source-host"]
keep_points = 2
replica = { backend = "file", path = "$T/rpo.img" }
CFG
cat >$W/source.toml <<CFG
volume = "rpo"
volume_size = $size
ring = { group = "rpo" }
device = "/dev/mapper/r0"
target = "127.0.0.1:7720"
target_name = "target-host"
keys = "$W/keys.toml"
state_dir = "$W/source"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/source-host.pem"
key = "$W/pki/source-host.key"
[spool]
limit_percent = 1000
CFG
replicad target --config $W/target.toml 2>$W/target.log &
replicad source --config $W/source.toml 2>$W/source.log &
wait_for "source connected" 60 sh -c "replctl status --state-dir $W/source --json | grep -q '\"connection\": \"Connected\"'"

applied_marker() { # id: inserts a marker and waits until the target applied it
	out=$(dmsetup message r0 0 marker "$1")
	seq=$(echo "$out" | sed -n "s/^marker $1 seq \([0-9]*\)\$/\1/p")
	replctl wait --state-dir $T/state --volume rpo --applied "$seq" --timeout 900 >/dev/null ||
		fail "marker $1 not applied"
}

step "link throughput: 128 MiB written at full speed, until applied"
t0=$(cut -d' ' -f1 /proc/uptime)
check "fio 128 MiB sequential" fio --eta=never --name=tp --filename=/dev/mapper/r0 --rw=write --bs=1m \
	--ioengine=libaio --iodepth=8 --direct=1 --size=128M --output=/tmp/tp.out
applied_marker 1
t1=$(cut -d' ' -f1 /proc/uptime)
mibps=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", 128 / (b - a) }')
echo "BENCH-RPO link_mib_s $mibps"
half=$(awk -v m="$mibps" 'BEGIN { r = int(m * 1024 / 2); if (r < 64) r = 64; print r }')

step "steady load at half the link throughput (${half} KiB/s) for ${RUNTIME} s, lag sampled"
fio --eta=never --name=steady --filename=/dev/mapper/r0 --rw=randwrite --bsrange=4k-64k --blockalign=4k \
	--ioengine=libaio --iodepth=4 --direct=1 --rate="${half}k" --time_based --runtime="$RUNTIME" \
	--output=/tmp/steady.out &
fpid=$!
: >/tmp/lag
while kill -0 $fpid 2>/dev/null; do
	replctl status --state-dir $W/source --json | sed -n 's/.*"lag_seconds": *\([0-9.e+-]*\).*/\1/p' >>/tmp/lag
	sleep 0.5
done
wait $fpid
check_eq "fio steady" 0 $?
sort -g /tmp/lag | awk '{ v[NR] = $1 } END {
	if (NR == 0) { print "BENCH-RPO samples 0"; exit }
	p50 = v[int((NR - 1) * 0.50) + 1]; p99 = v[int((NR - 1) * 0.99) + 1]
	printf "BENCH-RPO samples %d\nBENCH-RPO lag_p50_s %.3f\nBENCH-RPO lag_p99_s %.3f\nBENCH-RPO lag_max_s %.3f\n", NR, p50, p99, v[NR] }'
applied_marker 2

step "planned failover (idle writers)"
t0=$(cut -d' ' -f1 /proc/uptime)
check "replctl failover --planned" replctl failover --planned --state-dir $W/source
t1=$(cut -d' ' -f1 /proc/uptime)
awk -v a="$t0" -v b="$t1" 'BEGIN { printf "BENCH-RPO failover_s %.2f\n", b - a }'
