#!/bin/sh
# Benchmark (not a test): the full initial sync of a disk of random data to
# an empty peer, DRBD against dm-replica, in one guest. The data disk is
# the same for every run; scripts/bench-resync-vm.sh fills it with random
# data on the host and turns the output into a table.
#
# Disks:
#   /dev/vda  the data (BENCH_MIB MiB of random data)
#   /dev/vdb  DRBD's peer backing device (BENCH_MIB MiB, empty)
#   /dev/vdc  DRBD's metadata: two flexible external metadata areas
#   /dev/vdd  the dm-replica target's own disk (ext4: state, file replica)
#
# DRBD (modules lru_cache.ko and drbd.ko given with --module; drbdsetup-84
# and drbdmeta on PATH): two resources in this guest over 127.0.0.1,
# primary vda and secondary vdb, fresh metadata on both, then `primary
# --force`, which starts a full sync. Timed from `primary --force` (both
# sides already connected, Inconsistent) until /proc/drbd shows both
# UpToDate. One run per configuration in BENCH_DRBD (space separated):
#   default   drbdsetup's defaults (the dynamic resync controller)
#   rate-max  a fixed resync rate at the maximum (c-plan-ahead 0,
#             resync-rate 4 GiB/s)
#   tuned     rate-max plus max-buffers and max-epoch-size 8000 (deeper
#             pipeline, as in LINBIT's tuning advice)
# Without the modules or the tools DRBD is skipped with a BENCH-SKIP line.
#
# dm-replica: replicad target in this guest (file replica on ext4 on vdd,
# TLS over 127.0.0.1), then `replctl protect /dev/vda --spawn`, which
# starts replicad source and returns once the target applied the initial
# copy's end. Timed from protect's "initial copy:" line (the daemon is up
# and the copy requested) until its "initial copy done" line; the whole
# protect call is reported too.
#
# Before it, dmr-cost measures what each per-byte stage costs on one core
# of this guest (BENCH-INFO cost_<stage> MiB/s).
#
# Output, one line per run:
#   BENCH-SYNC <system> <config> <bytes> <seconds> [<key>=<value>...]
#   BENCH-SKIP <system> <reason>
#   BENCH-INFO <key> <value>
# With BENCH_VERIFY=1 (default) every run's copy is compared with the data.
#
# vm-disks: 64M 64M 8M 256M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
PEER=/dev/vdb
META=/dev/vdc
TDISK=/dev/vdd
volume_vars $DATA
BYTES=$size
KIB=$((size / 1024))
DRBD_CONFIGS=${BENCH_DRBD-default rate-max tuned}
VERIFY=${BENCH_VERIFY:-1}
W=/tmp/sb

now() { cut -d' ' -f1 /proc/uptime; }
# cpu_ticks: busy and total clock ticks of all CPUs since boot.
cpu_ticks() { awk '/^cpu / { t = 0; for (i = 2; i <= NF; i++) t += $i; print t - $5 - $6, t }' /proc/stat; }
# proc_secs PID: CPU seconds (user + system, in USER_HZ = 100 ticks) process PID used so far.
proc_secs() { awk '{ printf "%.2f", ($14 + $15) / 100 }' "/proc/$1/stat"; }
# secs T0 T1: T1 - T0 with two decimals.
secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# fresh_caches: nothing of the data is in the guest's page cache.
fresh_caches() {
	sync
	echo 3 >/proc/sys/vm/drop_caches
}

check "loopback up" ifconfig lo 127.0.0.1 up
echo "BENCH-INFO data_bytes $BYTES"
echo "BENCH-INFO cpus $(grep -c ^processor /proc/cpuinfo)"

# --- DRBD -------------------------------------------------------------------

D=drbdsetup-84
drbd_missing=
for m in lru_cache drbd; do
	case " $VM_MODULES " in
	*/"$m.ko "*) ;;
	*) drbd_missing="${drbd_missing:+$drbd_missing, }module $m.ko not given" ;;
	esac
done
for t in $D drbdmeta; do
	command -v "$t" >/dev/null || drbd_missing="${drbd_missing:+$drbd_missing, }$t not on PATH"
done

# drbd_both PATTERN: both lines of /proc/drbd (minors 0 and 1) match the
# extended regular expression PATTERN.
drbd_both() {
	[ "$(grep -cE "^ *[01]: .*$1" /proc/drbd)" = 2 ]
}

# drbd_run CONFIG: one full sync of the data disk to the empty peer with
# CONFIG's settings; prints BENCH-SYNC drbd CONFIG.
drbd_run() {
	case $1 in
	default) dopts="" nopts="" ;;
	rate-max) dopts="--c-plan-ahead=0 --resync-rate=4194304" nopts="" ;;
	tuned) dopts="--c-plan-ahead=0 --resync-rate=4194304" nopts="--max-buffers=8000 --max-epoch-size=8000" ;;
	*) fail "unknown DRBD configuration '$1' (default, rate-max or tuned)" ;;
	esac
	step "DRBD, $1: full sync of $((KIB / 1024)) MiB"
	# An empty peer: discard it (the host image becomes sparse again)
	# where the disk allows, and forget its old metadata either way.
	blkdiscard $PEER 2>/dev/null || true
	check "clear the metadata disk" dd if=/dev/zero of=$META bs=1M oflag=direct status=none count=$(($(cat /sys/block/vdc/size) / 2048))
	for r in 0 1; do
		check "new-resource r$r" $D new-resource r$r
		check "new-minor $r" $D new-minor r$r $r 0
		check "metadata of minor $r" dmsetup create md$r --table "0 $MD_SECTORS linear $META $((r * MD_SECTORS))"
		check "create-md $r" drbdmeta --force $r v08 /dev/mapper/md$r flex-external create-md
	done
	# shellcheck disable=SC2086 # option lists
	check "attach 0 (data)" $D attach 0 $DATA /dev/mapper/md0 flexible $dopts
	# shellcheck disable=SC2086
	check "attach 1 (peer)" $D attach 1 $PEER /dev/mapper/md1 flexible $dopts
	# shellcheck disable=SC2086
	check "connect r0" $D connect r0 ipv4:127.0.0.1:7789 ipv4:127.0.0.1:7790 --protocol=C $nopts
	# shellcheck disable=SC2086
	check "connect r1" $D connect r1 ipv4:127.0.0.1:7790 ipv4:127.0.0.1:7789 --protocol=C $nopts
	wait_for "both connected, both Inconsistent" 120 drbd_both 'cs:Connected .*ds:Inconsistent/Inconsistent'
	fresh_caches
	clear_kernel_log
	t0=$(now)
	check "primary --force on r0 (starts the full sync)" $D primary 0 --force
	wait_for "both UpToDate" $((KIB / 1024 + 600)) drbd_both 'cs:Connected .*ds:UpToDate/UpToDate'
	t1=$(now)
	cat /proc/drbd
	check "it was a full sync ($KIB KiB)" kernel_log_has "will sync $KIB KB"
	echo "BENCH-SYNC drbd $1 $BYTES $(secs "$t0" "$t1") $(dmesg | sed -n 's/.* drbd0: Resync done (total \([0-9]*\) sec.*/drbd_says_sec=\1/p' | head -n1)"
	if [ "$VERIFY" = 1 ]; then
		check "the peer holds the data" same_content $DATA $PEER
	fi
	for r in 0 1; do
		check "down r$r" $D down r$r
		check "remove md$r" dmsetup remove md$r
	done
}

if [ -z "$DRBD_CONFIGS" ]; then
	echo "BENCH-SKIP drbd no configurations asked for (BENCH_DRBD empty)"
elif [ -n "$drbd_missing" ]; then
	echo "BENCH-SKIP drbd $drbd_missing"
else
	mkdir -p /var/lib/drbd /var/lock /run/drbd/lock
	check "insmod lru_cache" insmod "$(module_path lru_cache)"
	# No drbdadm in the guest: the state-change helpers do nothing.
	check "insmod drbd" insmod "$(module_path drbd)" usermode_helper=/bin/true
	echo "BENCH-INFO drbd_version $(sed -n 's/^version: \([^ ]*\).*/\1/p' /proc/drbd)"
	MD_SECTORS=$(($(cat /sys/block/vdc/size) / 2))
	for c in $DRBD_CONFIGS; do
		drbd_run "$c"
	done
	check "rmmod drbd" rmmod drbd
	check "rmmod lru_cache" rmmod lru_cache
fi

# --- the cost of each stage ------------------------------------------------

# The per-byte CPU cost of the data path's stages on one core of this guest
# (dmr-cost: memcpy, chunk hash, seal, open, zstd), printed as BENCH-INFO.
if command -v dmr-cost >/dev/null; then
	dmr-cost --mib 32 2>/dev/null | while read -r _ stage mibs; do echo "BENCH-INFO cost_$stage $mibs"; done
else
	echo "BENCH-SKIP cost dmr-cost not given"
fi

# --- dm-replica -------------------------------------------------------------

step "dm-replica: initial copy of $((KIB / 1024)) MiB"
C=/etc/dm-replica
T=/target
ADDR=127.0.0.1:7719
target_disk $TDISK $T
setup_guest $W
{ target_toml $W $ADDR $T/state; target_volume rb $BYTES $T/rb.img 1; } >$W/target.toml
spawn_target $W
wait_for "target listening" 60 test -s $T/state/listen.addr
mkdir -p $C
fresh_caches
# Every line of protect's output with the guest uptime in front.
ticks0=$(cpu_ticks)
tcpu0=$(proc_secs $tpid)
t0=$(now)
{
	replctl protect $DATA --volume rb --target $ADDR --target-name target-host \
		--config-dir $C --state-dir $W/source --keys $W/keys.toml --ca $W/pki/ca.pem \
		--cert $W/pki/source-host.pem --key $W/pki/source-host.key --spawn 2>&1
	echo "protect-exit $?"
} | while IFS= read -r line; do echo "$(now) $line"; done >$W/protect.out
t1=$(now)
ticks1=$(cpu_ticks)
tcpu1=$(proc_secs $tpid)
spid=$(pidof replicad | tr ' ' '\n' | grep -vx "$tpid" | head -n1)
cat $W/protect.out
grep -q '^[0-9.]* protect-exit 0$' $W/protect.out || fail "replctl protect failed (output above)"
c0=$(sed -n 's/^\([0-9.]*\) initial copy: .*/\1/p' $W/protect.out | head -n1)
c1=$(sed -n 's/^\([0-9.]*\) initial copy done.*/\1/p' $W/protect.out | head -n1)
[ -n "$c0" ] && [ -n "$c1" ] ||
	fail "replctl protect printed no 'initial copy:' / 'initial copy done' line"
replctl status --state-dir $T/state
check "the target says Consistent" json_has $T/state '"replica": "Consistent"'
echo "BENCH-SYNC dm-replica initial-copy $BYTES $(secs "$c0" "$c1") protect_sec=$(secs "$t0" "$t1")"
# Where the CPU went during protect: busy share of all CPUs, and each
# daemon's CPU seconds (the source's since it started, within protect).
echo "$ticks0 $ticks1" | awk '{ printf "BENCH-INFO cpu_busy_pct %.0f\n", 100 * ($3 - $1) / ($4 - $2) }'
echo "BENCH-INFO target_cpu_sec $(awk -v a="$tcpu0" -v b="$tcpu1" 'BEGIN { printf "%.1f", b - a }')"
[ -n "$spid" ] && echo "BENCH-INFO source_cpu_sec $(proc_secs "$spid")"
# Per thread (names as the daemons give them), for where the time went.
for p in $tpid $spid; do
	for t in /proc/$p/task/*; do
		echo "BENCH-THREAD $p $(cat $t/comm) $(proc_secs ${t#/proc/}) $(awk '{ printf "user=%.2f sys=%.2f", $14 / 100, $15 / 100 }' $t/stat)"
	done
done
# When the target began and ended the copy (after END comes a recovery
# point: for a file replica, a copy of the image).
grep -E "resync started|resync complete" $W/target.log | tail -n 4
# What the copy did: chunks compared, sent, and zero on both sides.
for f in compared_chunks sent_chunks zero_chunks; do
	echo "BENCH-INFO $f $(jnum $f)"
done
if [ "$VERIFY" = 1 ]; then
	same_sha /dev/mapper/rb $T/rb.img "the replica holds the data"
fi
out=$(replctl unprotect rb --config-dir $C 2>&1) || fail "replctl unprotect: $out"
stop_daemons $tpid
check "rmmod dm_replica" rmmod dm_replica
