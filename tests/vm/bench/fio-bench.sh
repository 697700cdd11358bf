#!/bin/sh
# Benchmark (not a test): fio on `linear` vs `replica` over the same disk,
# in one guest, alternating. Prints one `BENCH-JSON <config> <workload>
# <round> <fio json>` line per run and, for the replica configurations, a
# `BENCH-STATUS <config> <workload> <round> overflow=<0|1>` line (a ring
# that overflowed stopped capturing part-way, so that run does not measure
# the capture path to the end); scripts/bench-vm.sh turns them into a table
# of ratios. Configurations:
#   linear         dm-linear over the disk
#   replica-drain  replica, a consumer releasing records as they commit
#   replica-ship   replica, replicad source shipping to replicad target in
#                  the same guest (TLS on loopback, file replica on tmpfs)
#
# vm-disks: 320M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
sectors=$(cat /sys/block/vda/size)
size=$((sectors * 512))
RUNTIME=${BENCH_RUNTIME:-6}
ROUNDS=${BENCH_ROUNDS:-2}
W=/tmp/bench

check "loopback up" ifconfig lo 127.0.0.1 up
check "insmod dm_replica" insmod "$(module_path dm_replica)"
check "fill the disk (no sparse reads)" dd if=/dev/zero of=$DATA bs=1M oflag=direct status=none count=$((sectors / 2048))

mkdir -p $W
check "certificates" replctl certs generate --out $W/pki --host source-host --host target-host
check "data key" replctl keys generate --out $W/keys.toml

run_fio() { # config workload round
	case $2 in
	seq1m-qd1) args="--rw=write --bs=1m --iodepth=1" ;;
	seq1m-qd32) args="--rw=write --bs=1m --iodepth=32" ;;
	rand4k-qd1) args="--rw=randwrite --bs=4k --iodepth=1" ;;
	rand4k-qd32) args="--rw=randwrite --bs=4k --iodepth=32" ;;
	esac
	# shellcheck disable=SC2086
	fio --name=b --filename=/dev/mapper/b --ioengine=libaio --direct=1 $args \
		--size=256M --time_based --runtime=$RUNTIME --ramp_time=1 --randrepeat=0 \
		--norandommap --output-format=json --output=/tmp/b.json >/dev/null 2>&1 ||
		fail "fio $1 $2 failed"
	echo "BENCH-JSON $1 $2 $3 $(tr -d '\n' </tmp/b.json)"
}

start_ship() {
	rm -rf $W/target $W/source $W/replica.img
	cat >$W/target.toml <<CFG
listen = "127.0.0.1:0"
keys = "$W/keys.toml"
state_dir = "$W/target"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/target-host.pem"
key = "$W/pki/target-host.key"
[[volume]]
id = "bv"
size = $size
allowed_sources = ["source-host"]
keep_points = 1
replica = { backend = "file", path = "$W/replica.img" }
CFG
	replicad target --config $W/target.toml 2>$W/target.log &
	tpid=$!
	wait_for "target listening" 30 test -s $W/target/listen.addr
	cat >$W/source.toml <<CFG
volume = "bv"
volume_size = $size
ring = { group = "bv" }
target = "$(cat $W/target/listen.addr)"
target_name = "target-host"
keys = "$W/keys.toml"
state_dir = "$W/source"
initial_copy = false
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/source-host.pem"
key = "$W/pki/source-host.key"
CFG
	replicad source --config $W/source.toml 2>$W/source.log &
	spid=$!
	wait_for "source attached" 30 sh -c 'dmsetup status b | grep -q "consumer=1"'
}

r=1
while [ $r -le $ROUNDS ]; do
	for wl in seq1m-qd1 seq1m-qd32 rand4k-qd1 rand4k-qd32; do
		for cfg in linear replica-drain replica-ship; do
			case $cfg in
			linear) check "create linear" dmsetup create b --table "0 $sectors linear $DATA 0" ;;
			*) check "create replica" dmsetup create b --table "0 $sectors replica $DATA bv ring_mib=64 overflow_wait_ms=10000" ;;
			esac
			case $cfg in
			replica-drain)
				dmr-ring drain --group bv --until-marker 1 >/tmp/drain.out 2>&1 &
				dpid=$!
				wait_for "consumer attached" 30 sh -c 'dmsetup status b | grep -q "consumer=1"'
				;;
			replica-ship) start_ship ;;
			esac
			run_fio $cfg $wl $r
			ovf=0
			if [ $cfg != linear ]; then
				# A ring that overflowed stopped capturing: the run did not
				# measure the capture path to the end. Reported, not hidden.
				ovf=$(dmsetup status b | sed -n 's/.* overflow=\([01]\) .*/\1/p')
				echo "BENCH-STATUS $cfg $wl $r overflow=$ovf"
			fi
			case $cfg in
			replica-drain)
				if [ "$ovf" = 0 ]; then
					check "marker" dmsetup message b 0 marker 1
					wait_for "drain" 120 sh -c "! kill -0 $dpid 2>/dev/null"
				else
					kill $dpid
				fi
				wait $dpid
				;;
			replica-ship)
				kill $spid $tpid
				wait $spid $tpid
				;;
			esac
			check "remove" dmsetup remove b
		done
	done
	r=$((r + 1))
done
check "rmmod" rmmod dm_replica
