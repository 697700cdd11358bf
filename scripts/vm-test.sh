#!/usr/bin/env bash
# Run the VM test scenarios of tests/vm/ against dm_replica.ko in qemu.
#
#   scripts/vm-test.sh [options] [SCENARIO...]
#
# With no SCENARIO, runs every tests/vm/*.sh scenario and then the harness
# checks, which prove the harness can fail:
#   broken-module   the smoke scenario against a module built to corrupt one
#                   byte of every read must FAIL with a data mismatch
#   no-hold         the overlap scenario against a module built not to hold
#                   back overlapping writes must FAIL: the replayed ring then
#                   differs from the disk
#   log-verdict     console logs with a kernel WARNING, BUG, kmemleak report,
#                   a FAIL marker or no marker must be judged FAIL
#   timeout         a guest that hangs must be killed at its timeout
#   kmemleak        (debug flavour only, the normal kernel has no kmemleak)
#                   the smoke scenario against a module built to leak memory
#                   in every constructor must FAIL with a kmemleak report
# Each passes when the failure is detected. A SCENARIO is a name (smoke) or
# a path; naming scenarios skips the harness checks.
#
# Options:
#   --flavour normal|debug  kernel flavour (default normal; debug adds
#                           lockdep, KASAN, kmemleak, DM_FLAKEY)
#   --broken-module         run only the broken-module check
#   --harness-checks        run only the harness checks (all of them)
#   --no-harness-checks     skip the harness checks in a full run
#   --bin FILE[:NAME]       extra executable for every guest (repeatable),
#                           e.g. statically linked replicad / replctl
#   --timeout SECONDS       per-guest timeout (default 300, 900 for debug)
#   --env NAME=VALUE        exported to every scenario (repeatable)
#
# Builds what is missing first (kernel and module are cached; see
# scripts/kernel.sh and scripts/kmod.sh). Each scenario declares its disks
# in a `# vm-disks: SIZE...` line. Console logs go to
#   <repo>/out/vm/<flavour>/<scenario>/console.log
# Prints one PASS/FAIL line per scenario and a final line
# `N passed, N failed`; exits non-zero if anything failed or could not run.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

flavour=normal
scenarios_on=1
broken_check=1
harness_checks=1
timeout=
bins=()
envs=()
scenarios=()
while (($# > 0)); do
	case "$1" in
	--flavour) flavour=${2:?--flavour needs a value}; shift 2 ;;
	--flavour=*) flavour=${1#*=}; shift ;;
	--broken-module) scenarios_on=0 harness_checks=0 broken_check=1; shift ;;
	--harness-checks) scenarios_on=0 harness_checks=1 broken_check=1; shift ;;
	--no-harness-checks) harness_checks=0 broken_check=0; shift ;;
	--bin) bins+=("${2:?--bin needs a value}"); shift 2 ;;
	--env) envs+=(--env "${2:?--env needs a value}"); shift 2 ;;
	--timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	-*) die "unknown option: $1" ;;
	*) scenarios+=("$1"); shift ;;
	esac
done
case "$flavour" in
normal) timeout=${timeout:-300} hang_timeout=20 ;;
debug) timeout=${timeout:-900} hang_timeout=120 ;;
*) die "unknown flavour '$flavour' (normal or debug)" ;;
esac

# Resolve scenario names to files.
scenario_dir="$REPO_ROOT/tests/vm"
files=()
if ((!scenarios_on)); then
	:
elif ((${#scenarios[@]} == 0)); then
	for f in "$scenario_dir"/*.sh; do
		[[ "$(basename "$f")" == lib.sh ]] || files+=("$f")
	done
	((${#files[@]} > 0)) || die "no scenarios found in $scenario_dir"
else
	broken_check=0 harness_checks=0
	for s in "${scenarios[@]}"; do
		if [[ -f "$s" ]]; then
			files+=("$s")
		elif [[ -f "$scenario_dir/$s.sh" ]]; then
			files+=("$scenario_dir/$s.sh")
		else
			die "no such scenario: $s"
		fi
	done
fi

started=$SECONDS
results=()
passed=0
failed=0
record() { # record PASS|FAIL NAME DETAIL
	results+=("$(printf '%-4s  %-24s %s' "$1" "$2" "$3")")
	if [[ "$1" == PASS ]]; then
		passed=$((passed + 1))
	else
		failed=$((failed + 1))
	fi
}
summary() {
	echo
	echo "VM test summary ($flavour kernel, $((SECONDS - started)) s):"
	for r in "${results[@]}"; do
		echo "  $r"
	done
	echo "$passed passed, $failed failed"
}

# --- Build: kernel, module(s), guest tools. ---
if ! kernel_tree=$("$REPO_ROOT/scripts/kernel.sh" --flavour "$flavour"); then
	record FAIL build "kernel ($flavour) could not be built"
	summary
	exit 1
fi
bzimage="$kernel_tree/arch/x86/boot/bzImage"
ko=
if ((${#files[@]} > 0)) && ! ko=$("$REPO_ROOT/scripts/kmod.sh" --flavour "$flavour"); then
	record FAIL build "dm_replica.ko could not be built"
	summary
	exit 1
fi
broken_ko=
if ((broken_check)) && ! broken_ko=$("$REPO_ROOT/scripts/kmod.sh" --flavour "$flavour" --fault corrupt-reads); then
	record FAIL build "fault-injection (corrupt-reads) dm_replica.ko could not be built"
	summary
	exit 1
fi
nohold_ko=
if ((harness_checks)) && ! nohold_ko=$("$REPO_ROOT/scripts/kmod.sh" --flavour "$flavour" --fault no-hold); then
	record FAIL build "fault-injection (no-hold) dm_replica.ko could not be built"
	summary
	exit 1
fi
leak_ko=
if ((harness_checks)) && [[ "$flavour" == debug ]] &&
	! leak_ko=$("$REPO_ROOT/scripts/kmod.sh" --flavour "$flavour" --fault leak); then
	record FAIL build "fault-injection (leak) dm_replica.ko could not be built"
	summary
	exit 1
fi

tools_out="$REPO_ROOT/out/vm/tools"
mkdir -p "$tools_out"
tool_bins=()
for src in "$scenario_dir"/tools/*.c; do
	[[ -e "$src" ]] || continue
	exe="$tools_out/$(basename "$src" .c)"
	say "compiling guest tool $(basename "$src") (static)"
	if ! gcc -static -O2 -Wall -Wextra -Werror -o "$exe" "$src"; then
		record FAIL build "guest tool $(basename "$src") did not compile"
		summary
		exit 1
	fi
	tool_bins+=(--bin "$exe")
done
# Userspace tools the scenarios use, self-contained: the project's own
# binaries linked statically, fio built statically by setup.sh, and
# e2fsprogs (small; vm.sh copies their libraries).
# The daemon the guests run has the test hooks (tests/vm/thin.sh crashes
# it with REPLICAD_TEST_CRASH); a production build has none.
say "building static userspace tools (replicad with test hooks, replctl, dmr-ring, dmr-peer)"
if ! build_static_tools --features replicad/test-hooks; then
	record FAIL build "static userspace tools did not build"
	summary
	exit 1
fi
for b in replicad replctl dmr-ring dmr-peer; do
	tool_bins+=(--bin "$rel/$b")
done
[[ -x "$FIO" ]] || die "fio not found at $FIO: run scripts/setup.sh"
tool_bins+=(--bin "$FIO")
for t in mkfs.ext4 e2fsck; do
	tool_bins+=(--bin "$(command -v "$t")")
done
for b in "${bins[@]}"; do
	tool_bins+=(--bin "$b")
done

# run_guest NAME SCENARIO_FILE MODULE [vm.sh options...]
run_guest() {
	local name=$1 file=$2 module=$3
	shift 3
	local disks=() d
	read -r -a disks < <(sed -n 's/^# vm-disks:[[:space:]]*//p' "$file" | head -n1)
	local disk_args=()
	for d in "${disks[@]}"; do
		disk_args+=(--disk "$d")
	done
	"$REPO_ROOT/scripts/vm.sh" --kernel "$bzimage" --scenario "$file" --name "$name" \
		--workdir "$REPO_ROOT/out/vm/$flavour/$name" --timeout "$timeout" \
		--module "$module" "${tool_bins[@]}" "${disk_args[@]}" "${envs[@]}" "$@"
}

# --- Scenarios. ---
for f in "${files[@]}"; do
	name=$(basename "$f" .sh)
	say "=== scenario $name ($flavour)"
	t0=$SECONDS
	rc=0
	run_guest "$name" "$f" "$ko" || rc=$?
	case $rc in
	0)
		record PASS "$name" "($((SECONDS - t0)) s)"
		# A passed scenario keeps its console log; its disks and initramfs
		# (gigabytes over a full run) go.
		rm -rf "$REPO_ROOT/out/vm/$flavour/$name"/disk*.img \
			"$REPO_ROOT/out/vm/$flavour/$name/initramfs" "$REPO_ROOT/out/vm/$flavour/$name/initramfs.cpio"
		;;
	2) record FAIL "$name" "TIMEOUT after ${timeout} s (log: out/vm/$flavour/$name/console.log)" ;;
	*) record FAIL "$name" "exit $rc (log: out/vm/$flavour/$name/console.log)" ;;
	esac
done

# --- The harness must be able to fail: a module that corrupts reads. ---
if ((broken_check)); then
	name=broken-module
	say "=== broken-module check: smoke scenario against a module that corrupts reads (must FAIL)"
	t0=$SECONDS
	rc=0
	run_guest "$name" "$scenario_dir/smoke.sh" "$broken_ko" --expect-fail || rc=$?
	log="$REPO_ROOT/out/vm/$flavour/$name/console.log"
	if ((rc == 1)) && grep -aq 'pattern mismatch' "$log"; then
		record PASS "$name" "smoke FAILED on corrupted data, as it must ($((SECONDS - t0)) s)"
	elif ((rc == 0)); then
		record FAIL "$name" "smoke PASSED with a module that corrupts reads: the harness cannot detect corruption"
	elif ((rc == 1)); then
		record FAIL "$name" "smoke failed, but not on a data mismatch (log: out/vm/$flavour/$name/console.log)"
	else
		record FAIL "$name" "guest did not complete (exit $rc; log: out/vm/$flavour/$name/console.log)"
	fi
fi

# --- The overlap test must catch writes that reach the disk out of ring order. ---
if [[ -n "$nohold_ko" ]]; then
	name=no-hold
	say "=== harness check: overlap scenario against a module that does not hold back overlapping writes (must FAIL)"
	t0=$SECONDS
	rc=0
	run_guest "$name" "$scenario_dir/overlap.sh" "$nohold_ko" --expect-fail || rc=$?
	log="$REPO_ROOT/out/vm/$flavour/$name/console.log"
	if ((rc == 1)) && grep -aq 'content differs' "$log"; then
		record PASS "$name" "overlap FAILED on a replay that differs from the disk, as it must ($((SECONDS - t0)) s)"
	elif ((rc == 0)); then
		record FAIL "$name" "overlap PASSED without hold-back: the test cannot see reordered overlapping writes"
	else
		record FAIL "$name" "overlap did not fail on a content mismatch (exit $rc; log: out/vm/$flavour/$name/console.log)"
	fi
fi

# --- The log verdict must catch kernel reports and missing results. ---
if ((harness_checks)); then
	name='log-verdict'
	say "=== harness check: log verdicts"
	dir="$REPO_ROOT/out/vm/$flavour/$name"
	rm -rf "$dir"
	mkdir -p "$dir"
	pass='VMTEST-RESULT: PASS'
	printf '[    1.000000] booted\n%s\n' "$pass" >"$dir/pass.log"
	printf '[    1.0] WARNING: CPU: 1 PID: 7 at drivers/md/dm.c:1 x+0x1/0x2\n%s\n' "$pass" >"$dir/warning.log"
	printf '[    1.0] BUG: kernel NULL pointer dereference, address: 0000000000000008\n%s\n' "$pass" >"$dir/bug.log"
	printf '[    1.0] BUG: KASAN: slab-use-after-free in x+0x1/0x2\n%s\n' "$pass" >"$dir/kasan.log"
	printf 'vmtest: kmemleak report:\nunreferenced object 0xffff888003e4a000 (size 64):\n%s\n' "$pass" >"$dir/kmemleak.log"
	printf '[    1.0] WARNING: possible circular locking dependency detected\n%s\n' "$pass" >"$dir/lockdep.log"
	printf 'dm_replica: panicked at src/target.rs:1:1:\n%s\n' "$pass" >"$dir/rust-panic.log"
	printf 'VMTEST-RESULT: FAIL: something\n' >"$dir/fail-marker.log"
	printf '[    1.0] Kernel panic - not syncing: Fatal exception\n' >"$dir/no-marker.log"
	bad=()
	for l in "$dir"/*.log; do
		want=1
		[[ "$l" == */pass.log ]] && want=0
		rc=0
		"$REPO_ROOT/scripts/vm.sh" --verdict "$l" --expect-fail >/dev/null 2>&1 || rc=$?
		((rc == want)) || bad+=("$(basename "$l") judged $rc, want $want")
	done
	if ((${#bad[@]} == 0)); then
		record PASS "$name" "$(find "$dir" -name '*.log' | wc -l) synthetic logs judged correctly"
	else
		record FAIL "$name" "${bad[*]}"
	fi

	name=timeout
	say "=== harness check: a hanging guest is killed at its timeout (must TIMEOUT)"
	t0=$SECONDS
	rc=0
	"$REPO_ROOT/scripts/vm.sh" --kernel "$bzimage" --scenario "$scenario_dir/selftest/hang.sh" \
		--name "$name" --workdir "$REPO_ROOT/out/vm/$flavour/$name" --timeout "$hang_timeout" || rc=$?
	if ((rc == 2)) && grep -aq 'hang: blocking' "$REPO_ROOT/out/vm/$flavour/$name/console.log"; then
		record PASS "$name" "hanging guest killed and reported as TIMEOUT ($((SECONDS - t0)) s)"
	else
		record FAIL "$name" "hanging guest not reported as TIMEOUT (exit $rc)"
	fi
fi

# --- kmemleak must catch a leaking module (debug kernels only). ---
if [[ -n "$leak_ko" ]]; then
	name=kmemleak
	say "=== harness check: smoke scenario against a module that leaks memory (must FAIL)"
	t0=$SECONDS
	rc=0
	run_guest "$name" "$scenario_dir/smoke.sh" "$leak_ko" --expect-fail || rc=$?
	log="$REPO_ROOT/out/vm/$flavour/$name/console.log"
	if ((rc == 1)) && grep -aq 'VMTEST-RESULT: FAIL: kmemleak reported leaks' "$log" &&
		grep -aq 'unreferenced object' "$log"; then
		record PASS "$name" "smoke FAILED on the kmemleak report, as it must ($((SECONDS - t0)) s)"
	elif ((rc == 0)); then
		record FAIL "$name" "smoke PASSED with a module that leaks: kmemleak reports are not caught"
	else
		record FAIL "$name" "smoke did not fail on a kmemleak report (exit $rc; log: out/vm/$flavour/$name/console.log)"
	fi
fi

summary
((failed == 0))
