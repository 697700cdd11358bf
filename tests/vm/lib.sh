# Helpers for VM test scenarios, sourced by each scenario in the guest as
# /lib/vmtest/lib.sh (scripts/vm.sh puts it there). busybox sh.
# shellcheck shell=sh

# Fails the scenario: the reason goes to the console and to the result
# marker /init prints.
fail() {
	echo "FAIL: $*"
	echo "$*" >/tmp/vmtest-fail-reason
	exit 1
}

# Prints a heading for the next group of checks.
step() {
	echo "--- $*"
}

# check DESCRIPTION COMMAND...: runs COMMAND, fails the scenario if it fails.
check() {
	_desc=$1
	shift
	if "$@"; then
		echo "ok: $_desc"
	else
		fail "$_desc (command failed: $*)"
	fi
}

# check_not DESCRIPTION COMMAND...: fails the scenario if COMMAND succeeds.
check_not() {
	_desc=$1
	shift
	if "$@"; then
		fail "$_desc (command unexpectedly succeeded: $*)"
	else
		echo "ok: $_desc"
	fi
}

# check_eq DESCRIPTION EXPECTED ACTUAL
check_eq() {
	if [ "$2" = "$3" ]; then
		echo "ok: $1 ($3)"
	else
		fail "$1: expected '$2', got '$3'"
	fi
}

# wait_for DESCRIPTION SECONDS COMMAND...: polls COMMAND until it succeeds,
# failing the scenario if it still fails after SECONDS.
wait_for() {
	_desc=$1
	_deadline=$(($(cut -d. -f1 /proc/uptime) + $2))
	shift 2
	until "$@"; do
		if [ "$(cut -d. -f1 /proc/uptime)" -ge "$_deadline" ]; then
			fail "timed out waiting for: $_desc"
		fi
		sleep 0.1
	done
	echo "ok: $_desc"
}

# module_path NAME: the guest path of a module passed with --module.
module_path() {
	for _m in $VM_MODULES; do
		case "$_m" in
		*/"$1".ko)
			echo "$_m"
			return 0
			;;
		esac
	done
	fail "module $1 was not put in the guest"
}

# kernel_log_has TEXT: the kernel log (since the last clear_kernel_log)
# contains TEXT.
kernel_log_has() {
	dmesg | grep -qF -- "$1"
}

# Clears the kernel ring buffer (the console log on the host keeps it all).
clear_kernel_log() {
	dmesg -c >/dev/null
}

# dm_exists NAME: a device-mapper device of that name exists.
dm_exists() {
	dmsetup info "$1" >/dev/null 2>&1
}

# exited PID: process PID is gone (for use with wait_for).
exited() {
	! kill -0 "$1" 2>/dev/null
}

# consumer_attached DM_NAME: `dmsetup status` of DM_NAME shows a ring
# consumer attached (consumer=1).
consumer_attached() {
	dmsetup status "$1" | grep -q "consumer=1"
}

# dm_status_has DM_NAME PATTERN: `dmsetup status` of DM_NAME matches the
# basic regular expression PATTERN (e.g. ' overflow=0 ').
dm_status_has() {
	dmsetup status "$1" | grep -q -- "$2"
}

# load_module: loads dm_replica (check "insmod dm_replica").
load_module() {
	check "insmod dm_replica" insmod "$(module_path dm_replica)"
}

# teardown DM_NAME...: the end of a scenario: removes the device-mapper
# devices DM_NAME... (check "dmsetup remove DM_NAME..."), then unloads
# dm_replica (check "rmmod dm_replica").
teardown() {
	check "dmsetup remove $*" dmsetup remove "$@"
	check "rmmod dm_replica" rmmod dm_replica
}

# volume_vars DEV: sets $sectors and $size to the size of the block device
# DEV (/dev/vda or vda) in 512-byte sectors and in bytes.
volume_vars() {
	sectors=$(cat "/sys/block/${1##*/}/size")
	# shellcheck disable=SC2034 # for the scenarios
	size=$((sectors * 512))
}

# --- Scenarios whose ring consumer is dmr-ring ------------------------------

# ring_disks: sets DATA=/dev/vda (the disk under the protected volume),
# COPY=/dev/vdb (where the consumer replays the ring) and volume_vars $DATA.
ring_disks() {
	DATA=/dev/vda
	# shellcheck disable=SC2034 # for the scenarios
	COPY=/dev/vdb
	volume_vars $DATA
}

# setup_ring_guest: what a dmr-ring scenario does first: ring_disks, then
# load_module.
setup_ring_guest() {
	ring_disks
	load_module
}

# drain_start GROUP MARKER [OPTION...]: starts `dmr-ring drain` of GROUP
# until marker MARKER with the OPTIONs (e.g. --image 0:$COPY --check-order)
# in the background, its output in /tmp/drain.out; sets $drain_pid. Wait
# for it with `wait_for ... consumer_attached DM_NAME`.
drain_start() {
	_group=$1 _marker=$2
	shift 2
	dmr-ring drain --group "$_group" --until-marker "$_marker" "$@" >/tmp/drain.out 2>&1 &
	drain_pid=$!
}

# drain_wait WHAT SECONDS STATUS_WHAT: waits (wait_for WHAT) up to SECONDS
# for the consumer $drain_pid to exit, shows /tmp/drain.out and checks
# (check_eq STATUS_WHAT) that it exited with status 0.
drain_wait() {
	wait_for "$1" "$2" exited "$drain_pid"
	wait "$drain_pid"
	_rc=$?
	cat /tmp/drain.out
	check_eq "$3" 0 "$_rc"
}

# same_content A B: the two block devices (or files) hold the same bytes,
# read with O_DIRECT so no stale page cache can hide or invent a difference.
# On a mismatch, prints the first differing 4 KiB blocks.
same_content() {
	_a=$(dd if="$1" iflag=direct bs=1M 2>/dev/null | md5sum | cut -d' ' -f1)
	_b=$(dd if="$2" iflag=direct bs=1M 2>/dev/null | md5sum | cut -d' ' -f1)
	if [ "$_a" = "$_b" ]; then
		return 0
	fi
	echo "content differs: $1 $_a, $2 $_b"
	dd if="$1" iflag=direct bs=1M 2>/dev/null >/tmp/same_a
	dd if="$2" iflag=direct bs=1M 2>/dev/null >/tmp/same_b
	cmp -l /tmp/same_a /tmp/same_b | awk '{ b = int(($1 - 1) / 4096); if (b != last) { print "  differs in 4 KiB block " b; last = b; n++ } if (n >= 10) exit }'
	rm -f /tmp/same_a /tmp/same_b
	return 1
}

# --- Replication set-up shared by the scenarios -----------------------------

# repl_keys DIR: a private CA with certificates for source-host and
# target-host (DIR/pki) and a data key (DIR/keys.toml).
repl_keys() {
	mkdir -p "$1"
	check "certificates" replctl certs generate --out "$1/pki" --host source-host --host target-host
	check "data key" replctl keys generate --out "$1/keys.toml"
}

# target_disk DEV DIR: a fresh ext4 filesystem on DEV mounted on DIR (the
# target host's own disk for its state and file replicas).
target_disk() {
	check "target disk $1" mkfs.ext4 -q -F "$1"
	mkdir -p "$2"
	check "mount it on $2" mount -t ext4 "$1" "$2"
}

# target_toml DIR LISTEN STATE_DIR: prints the head of a target
# configuration using DIR's keys; add volumes with target_volume.
target_toml() {
	cat <<CFG
listen = "$2"
keys = "$1/keys.toml"
state_dir = "$3"
[tls]
ca = "$1/pki/ca.pem"
cert = "$1/pki/target-host.pem"
key = "$1/pki/target-host.key"
CFG
}

# target_volume ID SIZE REPLICA KEEP_POINTS: prints a [[volume]] block with
# REPLICA as the replica: a file's path, or a TOML inline table (`{ backend
# = "thin", ... }`) as it is.
target_volume() {
	case $3 in
	"{"*) _replica=$3 ;;
	*) _replica="{ backend = \"file\", path = \"$3\" }" ;;
	esac
	cat <<CFG
[[volume]]
id = "$1"
size = $2
allowed_sources = ["source-host"]
keep_points = $4
replica = $_replica
CFG
}

# source_toml DIR VOLUME SIZE TARGET STATE_DIR: prints a source configuration
# for the kernel ring of group VOLUME (/dev/mapper/VOLUME's device-mapper
# name given by $SOURCE_DM, default VOLUME), fast retries (every 0.2 s, or
# every $SOURCE_RETRY_SECS); append more settings after it (tables: [spool],
# [resync]).
source_toml() {
	cat <<CFG
volume = "$2"
volume_size = $3
ring = { group = "$2" }
device = "/dev/mapper/${SOURCE_DM:-$2}"
target = "$4"
target_name = "target-host"
keys = "$1/keys.toml"
state_dir = "$5"
# Guest disks and replicas start zeroed (a scenario that wants the initial
# copy sets SOURCE_INITIAL_COPY=true).
initial_copy = ${SOURCE_INITIAL_COPY:-false}
[tls]
ca = "$1/pki/ca.pem"
cert = "$1/pki/source-host.pem"
key = "$1/pki/source-host.key"
[retry]
schedule_secs = [${SOURCE_RETRY_SECS:-0.2}]
CFG
}

# setup_guest DIR: what every scenario with daemons does first: brings the
# loopback interface up, loads dm_replica and makes DIR's keys (repl_keys).
setup_guest() {
	check "loopback up" ifconfig lo 127.0.0.1 up
	load_module
	repl_keys "$1"
}

# setup_pair DIR VOLUME SIZE ADDR TARGET_STATE REPLICA KEEP_POINTS [DEV
# OPTION...]: the preamble of a scenario that replicates one volume in this
# guest. setup_guest DIR; with DEV, the protected volume: dm device
# ${SOURCE_DM:-VOLUME}, a replica target over the SIZE bytes of DEV with
# volume id VOLUME and the table OPTIONs; DIR/target.toml (target_toml DIR
# ADDR TARGET_STATE, target_volume VOLUME SIZE REPLICA KEEP_POINTS) and
# DIR/source.toml (source_toml DIR VOLUME SIZE ADDR DIR/source). Append
# more settings to either file afterwards, create a protected volume of
# another kind without DEV, then start_daemons.
setup_pair() {
	_dir=$1 _vol=$2 _size=$3 _addr=$4
	setup_guest "$_dir"
	{ target_toml "$_dir" "$_addr" "$5"; target_volume "$_vol" "$_size" "$6" "$7"; } >"$_dir/target.toml"
	source_toml "$_dir" "$_vol" "$_size" "$_addr" "$_dir/source" >"$_dir/source.toml"
	shift 7
	[ $# -gt 0 ] || return 0
	_dev=$1
	shift
	check "dmsetup create ${SOURCE_DM:-$_vol}" \
		dmsetup create "${SOURCE_DM:-$_vol}" --table "0 $((_size / 512)) replica $_dev $_vol${*:+ $*}"
}

# setup_disk_pair DIR VOLUME SIZE ADDR KEEP_POINTS [DEV OPTION...]: setup_pair
# for a target that keeps its state and its file replica on a disk of its
# own: a fresh filesystem on /dev/vdb mounted on T=/target (target_disk,
# sets $T), the target's state directory $T/state and the replica
# $T/VOLUME.img; the other arguments as for setup_pair.
setup_disk_pair() {
	T=/target
	target_disk /dev/vdb $T
	_pdir=$1 _pvol=$2 _psize=$3 _paddr=$4
	shift 4
	setup_pair "$_pdir" "$_pvol" "$_psize" "$_paddr" $T/state "$T/$_pvol.img" "$@"
}

# spawn_target DIR: starts `replicad target` with DIR/target.toml in the
# background (log appended to DIR/target.log) and sets $tpid.
spawn_target() {
	replicad target --config "$1/target.toml" 2>>"$1/target.log" &
	tpid=$!
}

# spawn_source DIR [NAME]: starts `replicad source` with DIR/NAME.toml (NAME
# default source) in the background (log appended to DIR/NAME.log) and sets
# $spid.
spawn_source() {
	replicad source --config "$1/${2:-source}.toml" 2>>"$1/${2:-source}.log" &
	spid=$!
}

# start_daemons DIR SOURCE_STATE: starts `replicad target` and `replicad
# source` with DIR/target.toml and DIR/source.toml (spawn_target,
# spawn_source), sets $tpid and $spid, and waits until the source (state
# directory SOURCE_STATE) is connected.
start_daemons() {
	spawn_target "$1"
	spawn_source "$1"
	wait_for "source connected" 60 json_has "$2" '"connection": "Connected"'
}

# stop_daemons [PID...]: stops the daemons PID... (default $spid and $tpid)
# with SIGTERM and waits until each has exited.
stop_daemons() {
	[ $# -gt 0 ] || set -- "$spid" "$tpid"
	kill "$@"
	for _pid in "$@"; do
		wait "$_pid"
	done
}

# json_has DIR PATTERN: the daemon with state directory DIR reports status
# JSON matching the extended regular expression PATTERN.
json_has() {
	replctl status --state-dir "$1" --json 2>/dev/null | grep -qE "$2"
}

# ring_gen DEV: the capture ring generation of dm device DEV (hex).
ring_gen() {
	dmsetup status "$1" | sed -n 's/.* generation=\([0-9a-f]*\).*/\1/p'
}

# insert_marker DEV ID: inserts marker ID on dm device DEV, shows the reply
# and sets $marker_seq to the marker's record sequence (empty if DEV gave
# none; $marker_reply holds the reply).
insert_marker() {
	marker_reply=$(dmsetup message "$1" 0 marker "$2" 2>&1)
	echo "$marker_reply"
	marker_seq=$(echo "$marker_reply" | sed -n "s/^marker $2 seq \([0-9]*\)\$/\1/p")
}

# target_applied TARGET_STATE VOLUME SEQ DEV SECONDS: the target (state
# directory TARGET_STATE) applies record SEQ of VOLUME, in the ring
# generation dm device DEV has now, within SECONDS (`replctl wait`).
target_applied() {
	replctl wait --state-dir "$1" --volume "$2" --applied "$3" --generation "$(ring_gen "$4")" --timeout "$5"
}

# marker_applied DEV ID TARGET_STATE VOLUME: inserts marker ID on DEV and
# waits until the target applied it (in DEV's ring generation); sets
# $marker_seq.
marker_applied() {
	insert_marker "$1" "$2"
	[ -n "$marker_seq" ] || fail "marker $2 on $1: $marker_reply"
	[ -n "$(ring_gen "$1")" ] || fail "no ring generation in dmsetup status $1"
	check "target applied marker $2 (record $marker_seq)" target_applied "$3" "$4" "$marker_seq" "$1" 600
}

# same_sha A B WHAT: the SHA-256 of A (read O_DIRECT) and of file B are
# equal.
same_sha() {
	_a=$(dd if="$1" iflag=direct bs=1M 2>/dev/null | sha256sum | cut -d' ' -f1)
	_b=$(sha256sum <"$2" | cut -d' ' -f1)
	echo "$1 $_a"
	echo "$2 $_b"
	check_eq "$3" "$_a" "$_b"
}

# daemon_up PID SOCKET LOG: the daemon PID answers on SOCKET; if it has
# died, its LOG is shown and the scenario fails (for use with wait_for).
daemon_up() {
	if ! kill -0 "$1" 2>/dev/null; then
		echo "the daemon (pid $1) exited; its log:"
		cat "$3"
		fail "daemon $1 exited"
	fi
	replctl status --socket "$2" >/dev/null 2>&1
}

# --- checksum resync scenarios (checksum-resync, resync-resume) ---

# cs_setup: a protected volume cs over /dev/vda (64 KiB chunks, a 4 MiB
# ring) replicated to a file replica on the target's own disk (T=/target),
# two recovery points kept (each is a copy of the image on ext4). Sets W,
# CHUNK, NCH (chunks of the volume), IMG (the replica image), marker; on
# failure the end of both daemons' logs is shown.
cs_setup() {
	W=/tmp/cs
	CHUNK=65536
	volume_vars /dev/vda
	NCH=$((size / CHUNK))
	SOURCE_INITIAL_COPY=true setup_disk_pair $W cs $size 127.0.0.1:7731 2 /dev/vda ring_mib=4 region_kib=64
	printf '[resync]\nchunk_kib = 64\nwindow_bytes = 4194304\n' >>$W/source.toml
	IMG=$T/cs.img
	marker=0
	trap '[ -s /tmp/vmtest-fail-reason ] && { echo "--- source log"; tail -n 60 $W/source.log; echo "--- target log"; tail -n 60 $W/target.log; }' EXIT
}

# piped COMMAND...: runs COMMAND with its output through a pipe (no
# terminal: progress in plain lines), shows it, and returns its status.
piped() {
	"$@" >/tmp/piped.out 2>&1
	_rc=$?
	cat /tmp/piped.out
	return $_rc
}

# jnum FIELD: the number FIELD of the source's resync progress (the
# running or last resync's).
jnum() {
	replctl status --state-dir $W/source --json 2>/dev/null | tr -d ' \n' |
		sed -n 's/.*"resync_progress":{\([^}]*\)}.*/\1/p' |
		sed -n "s/.*\"$1\":\([0-9][0-9]*\).*/\1/p"
}

# done_pct: how far the running resync is, percent of its chunks proven.
done_pct() {
	_t=$(jnum total_chunks) _r=$(jnum remaining_chunks)
	[ -n "$_t" ] && [ -n "$_r" ] && [ "$_t" -gt 0 ] || return 1
	echo $(((_t - _r) * 100 / _t))
}

# at_least PCT: the running resync proved at least PCT% of its chunks.
at_least() {
	json_has $W/source '"resync_running": true' || return 1
	_d=$(done_pct) || return 1
	[ "$_d" -ge "$1" ]
}

# garble N SEED: overwrites N distinct chunks of the replica image with
# random data (behind the target's back) and lists their offsets, sorted,
# in $garbled.
garble() {
	garbled=$(awk -v n="$1" -v seed="$2" -v max=$NCH 'BEGIN {
		srand(seed); c = 0
		while (c < n) { i = int(rand() * max); if (!(i in s)) { s[i] = 1; c++ } }
		for (i in s) print i }' | sort -n)
	for i in $garbled; do
		dd if=/dev/urandom of=$IMG bs=$CHUNK count=1 seek="$i" conv=notrunc status=none ||
			fail "garble chunk $i"
	done
	sync
}

# in_sync WHAT: a marker through the stream, applied, and the replica
# equals the volume.
in_sync() {
	marker=$((marker + 1))
	marker_applied /dev/mapper/cs $marker $T/state cs
	same_sha /dev/mapper/cs $IMG "$1"
}

# resync_done: the source finished its resync and the target is
# consistent again.
resync_done() {
	json_has $W/source '"needs_resync": false' && json_has $T/state '"replica": "Consistent"'
}

