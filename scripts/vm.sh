#!/usr/bin/env bash
# Boot one qemu guest from a busybox initramfs, run a scenario script in it,
# and report the scenario's result as the exit code.
#
#   scripts/vm.sh --kernel BZIMAGE --scenario SCRIPT [options]
#
# Options (all repeatable ones may be given several times):
#   --module FILE       kernel module, put in /lib/modules/ in the guest
#                       (the scenario loads it; its path is in $VM_MODULES)
#   --bin FILE[:NAME]   executable put in /bin as NAME; a dynamically linked
#                       one brings the libraries ldd lists
#   --file SRC:DEST     any other file, at absolute path DEST in the guest
#   --disk SIZE         a new sparse raw disk of SIZE (truncate -s syntax);
#                       disks appear as /dev/vda, /dev/vdb, ... in order
#   --disk-file FILE    an existing raw image as the next disk (kept)
#   --env NAME=VALUE    exported to the scenario
#   --qemu-arg ARG      passed to qemu as is, e.g. a socket netdev linking
#                       two guests: -netdev socket,id=n0,listen=127.0.0.1:PORT
#   --append ARGS       extra kernel command line
#   --name NAME         guest name for messages and files (default: scenario)
#   --workdir DIR       initramfs, disks and log go here
#                       (default: <repo>/out/vm/<name>)
#   --log FILE          console log (default: <workdir>/console.log)
#   --timeout SECONDS   kill the guest after this long (default 300)
#   --mem MIB, --smp N  guest memory (default 1024) and CPUs (default 2)
#   --cpu MODEL         qemu CPU model and features (default max)
#   --accel ACCEL       qemu accelerator (default tcg; kvm only where it works)
#   --expect-fail       the caller expects the scenario to fail: report a
#                       failure calmly (the exit code is the same)
#   --verdict LOG       boot nothing: judge an existing console log the way
#                       a run's log is judged, and exit accordingly (used by
#                       the harness self-check)
#
# The guest's /init mounts the usual filesystems, runs the scenario with
# /lib/vmtest/lib.sh available (see tests/vm/lib.sh), checks kmemleak when the
# kernel has it, prints a result marker and powers off. The console is shown
# on the terminal and written to the log.
#
# Exit status: 0 PASS; 1 FAIL (the scenario failed, the guest crashed or gave
# no result, or the log holds a kernel warning, BUG, Oops, KASAN, lockdep or
# kmemleak report); 2 the guest was killed at the timeout; 3 usage or
# harness error.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

usage_error() {
	printf '==> ERROR: %s (see --help)\n' "$*" >&2
	exit 3
}

kernel='' scenario='' name='' workdir='' log='' append='' verdict_log=''
timeout=300 mem=1024 smp=2 cpu=max accel=tcg expect_fail=0
modules=() bins=() files=() disks=() envs=() qemu_args=()
while (($# > 0)); do
	opt=$1
	case "$opt" in
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	--expect-fail) expect_fail=1; shift; continue ;;
	esac
	(($# >= 2)) || usage_error "$opt needs a value"
	val=$2
	shift 2
	case "$opt" in
	--kernel) kernel=$val ;;
	--scenario) scenario=$val ;;
	--module) modules+=("$val") ;;
	--bin) bins+=("$val") ;;
	--file) files+=("$val") ;;
	--disk) disks+=("new:$val") ;;
	--disk-file) disks+=("file:$val") ;;
	--env) envs+=("$val") ;;
	--qemu-arg) qemu_args+=("$val") ;;
	--append) append=$val ;;
	--name) name=$val ;;
	--workdir) workdir=$val ;;
	--log) log=$val ;;
	--timeout) timeout=$val ;;
	--mem) mem=$val ;;
	--smp) smp=$val ;;
	--cpu) cpu=$val ;;
	--accel) accel=$val ;;
	--verdict) verdict_log=$val ;;
	*) usage_error "unknown option: $opt" ;;
	esac
done

# --- Verdict. ---
# verdict LOG QEMU_STATUS: exit status for a finished guest (see the header).
verdict() {
	local log=$1 qemu_status=$2 reports marker status=0
	# Kernel reports that fail any test, whatever the scenario said.
	local report_re='(WARNING:|BUG:|Oops|general protection fault|Kernel panic|kernel BUG|Unable to handle|UBSAN:|KASAN|possible circular locking|possible recursive locking|inconsistent lock state|suspicious RCU usage|unreferenced object|suspected memory leak|panicked at|Call Trace:)'
	reports=$(grep -a -nE "$report_re" "$log" || true)
	marker=$(grep -a -oE 'VMTEST-RESULT: (PASS|FAIL.*)' "$log" | tail -n1 | tr -d '\r' || true)
	if [[ -n "$reports" ]]; then
		verdict_fail "kernel reports in the console log:"$'\n'"$reports"
		status=1
	fi
	case "$marker" in
	"VMTEST-RESULT: PASS")
		if ((qemu_status != 0)); then
			verdict_fail "guest reported PASS but qemu exited with status $qemu_status"
			status=1
		fi
		;;
	"VMTEST-RESULT: FAIL"*)
		verdict_fail "scenario: ${marker#VMTEST-RESULT: FAIL: }"
		status=1
		;;
	*)
		verdict_fail "guest gave no result (crashed or powered off early; qemu status $qemu_status)"
		status=1
		;;
	esac
	if ((status == 0)); then
		say "[$name] PASS"
	fi
	return "$status"
}

verdict_fail() {
	if ((expect_fail)); then
		say "[$name] FAIL (expected): $*"
	else
		printf '\n==> [%s] FAIL: %s\n' "$name" "$*" >&2
	fi
}

if [[ -n "$verdict_log" ]]; then
	[[ -f "$verdict_log" ]] || usage_error "--verdict: no such log: $verdict_log"
	name=${name:-$(basename "$verdict_log")}
	status=0
	verdict "$verdict_log" 0 || status=$?
	exit "$status"
fi

[[ -n "$kernel" ]] || usage_error "--kernel is required"
[[ -f "$kernel" ]] || usage_error "kernel image not found: $kernel"
[[ -n "$scenario" ]] || usage_error "--scenario is required"
[[ -f "$scenario" ]] || usage_error "scenario not found: $scenario"
[[ "$timeout" =~ ^[0-9]+$ ]] || usage_error "--timeout must be a number of seconds"
for tool in qemu-system-x86_64 cpio busybox dmsetup ldd truncate timeout; do
	command -v "$tool" >/dev/null || usage_error "$tool not found: run scripts/setup.sh"
done
busybox_bin=$(command -v busybox)
! ldd "$busybox_bin" >/dev/null 2>&1 ||
	usage_error "$busybox_bin is dynamically linked: install busybox-static"

name=${name:-$(basename "$scenario" .sh)}
workdir=${workdir:-$REPO_ROOT/out/vm/$name}
log=${log:-$workdir/console.log}
rm -rf "$workdir/initramfs" "$workdir/initramfs.cpio" "$workdir"/disk*.img
mkdir -p "$workdir" "$(dirname "$log")"
root="$workdir/initramfs"

# --- Initramfs. ---
say "[$name] building initramfs in $root"
mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,lib/modules,lib/vmtest,etc,proc,sys,dev,tmp,run,mnt}
cp "$busybox_bin" "$root/bin/busybox"

# Copies an executable and, if it is dynamically linked, the libraries and
# loader ldd lists, at the same paths.
add_exec() {
	local src=$1 dest=$2 lib
	install -D -m 0755 "$src" "$root$dest"
	if ldd "$src" >/dev/null 2>&1; then
		while read -r lib; do
			[[ -e "$root$lib" ]] || install -D -m 0755 "$lib" "$root$lib"
		done < <(ldd "$src" | grep -oE '/[^ ]+' | sort -u)
	fi
}

add_exec "$(command -v dmsetup)" /sbin/dmsetup
for spec in "${bins[@]}"; do
	src=${spec%%:*}
	dest_name=$(basename "$src")
	[[ "$spec" == *:* ]] && dest_name=${spec#*:}
	[[ -f "$src" && -x "$src" ]] || usage_error "--bin: not an executable file: $src"
	add_exec "$src" "/bin/$dest_name"
done
module_paths=()
for m in "${modules[@]}"; do
	[[ -f "$m" ]] || usage_error "--module: not found: $m"
	cp "$m" "$root/lib/modules/"
	module_paths+=("/lib/modules/$(basename "$m")")
done
for spec in "${files[@]}"; do
	[[ "$spec" == *:/* ]] || usage_error "--file wants SRC:/absolute/dest, got $spec"
	src=${spec%%:*}
	[[ -f "$src" ]] || usage_error "--file: not found: $src"
	install -D -m 0644 "$src" "$root${spec#*:}"
done
install -m 0644 "$REPO_ROOT/tests/vm/lib.sh" "$root/lib/vmtest/lib.sh"
install -m 0755 "$scenario" "$root/scenario.sh"

{
	printf 'export VM_NAME=%q\n' "$name"
	printf 'export VM_MODULES=%q\n' "${module_paths[*]}"
	for e in "${envs[@]}"; do
		[[ "$e" =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || usage_error "--env wants NAME=VALUE, got $e"
		printf 'export %s=%q\n' "${e%%=*}" "${e#*=}"
	done
} >"$root/etc/vmtest.env"

cat >"$root/init" <<'INIT'
#!/bin/busybox sh
# Guest init: prepare the system, run /scenario.sh, report, power off.
/bin/busybox --install -s
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
mount -t tmpfs tmpfs /run
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
# dmsetup creates its own /dev/mapper nodes; there is no udev.
export DM_DISABLE_UDEV=1
. /etc/vmtest.env
echo "vmtest: /init started at $(cut -d' ' -f1 /proc/uptime) s uptime"

kmemleak=/sys/kernel/debug/kmemleak
if [ -w "$kmemleak" ]; then
	# Suspects from boot predate the scenario; clear them so only leaks of
	# what the scenario exercised are reported.
	echo scan >"$kmemleak"
	echo clear >"$kmemleak"
fi

result=PASS
reason=
if sh /scenario.sh; then
	echo "vmtest: scenario passed"
else
	rc=$?
	result=FAIL
	reason=$(cat /tmp/vmtest-fail-reason 2>/dev/null || echo "scenario exited with status $rc")
fi

if [ -w "$kmemleak" ]; then
	# kmemleak reports an object only if it is older than 5 s and unchanged
	# over two scans: scan until both hold for everything the scenario
	# allocated (deadline 60 s).
	done_at=$(cut -d. -f1 /proc/uptime)
	scans=0
	while :; do
		echo scan >"$kmemleak"
		scans=$((scans + 1))
		now=$(cut -d. -f1 /proc/uptime)
		if [ "$scans" -ge 2 ] && [ "$now" -ge $((done_at + 6)) ]; then
			break
		fi
		if [ "$now" -ge $((done_at + 60)) ]; then
			result=FAIL
			reason="${reason:+$reason; }kmemleak scans did not finish within 60 s"
			break
		fi
		sleep 1
	done
	# debugfs files have no size: read the report to see if there is one.
	leaks=$(cat "$kmemleak")
	if [ -n "$leaks" ]; then
		echo "vmtest: kmemleak report:"
		echo "$leaks"
		result=FAIL
		reason="${reason:+$reason; }kmemleak reported leaks"
	else
		echo "vmtest: kmemleak: no leaks after $scans scans"
	fi
fi

sync
if [ "$result" = PASS ]; then
	echo "VMTEST-RESULT: PASS"
else
	echo "VMTEST-RESULT: FAIL: $reason"
fi
poweroff -f
INIT
chmod 0755 "$root/init"

(cd "$root" && find . -print0 | cpio --null -o -H newc -R 0:0 --quiet) >"$workdir/initramfs.cpio"

# --- Disks. ---
drive_args=()
n=0
for d in "${disks[@]}"; do
	case "$d" in
	new:*)
		img="$workdir/disk$n.img"
		truncate -s "${d#new:}" "$img"
		;;
	file:*)
		img=${d#file:}
		[[ -f "$img" ]] || usage_error "--disk-file: not found: $img"
		;;
	esac
	drive_args+=(-drive "file=$img,if=virtio,format=raw,cache=unsafe,discard=unmap")
	n=$((n + 1))
done

# --- Boot. ---
cmdline="console=ttyS0 panic=-1 oops=panic acpi=noirq rdinit=/init${append:+ $append}"
qemu=(qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -m "$mem" -smp "$smp"
	-nographic -no-reboot
	-kernel "$kernel" -initrd "$workdir/initramfs.cpio" -append "$cmdline"
	"${drive_args[@]}" "${qemu_args[@]}")
say "[$name] booting: ${qemu[*]}"
say "[$name] console log: $log (timeout ${timeout}s)"
start=$(date +%s.%N)
set +e
timeout --kill-after=10 "$timeout" "${qemu[@]}" </dev/null 2>&1 | tee "$log"
statuses=("${PIPESTATUS[@]}")
set -e
elapsed=$(awk -v s="$start" -v e="$(date +%s.%N)" 'BEGIN { printf "%.1f", e - s }')
qemu_status=${statuses[0]}

if ((qemu_status == 124 || qemu_status == 137)); then
	msg="TIMEOUT: guest killed after $timeout s; the scenario did not finish"
	printf '\nvm.sh: %s\n' "$msg" >>"$log"
	printf '\n==> [%s] %s (log: %s)\n' "$name" "$msg" "$log" >&2
	exit 2
fi

init_at=$(grep -a -m1 -oE 'vmtest: /init started at [0-9.]+' "$log" | awk '{ print $NF }' || true)
say "[$name] guest ran ${elapsed} s wall clock; /init reached at ${init_at:-?} s guest uptime"
status=0
verdict "$log" "$qemu_status" || status=$?
exit "$status"
