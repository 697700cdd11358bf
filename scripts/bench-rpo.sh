#!/usr/bin/env bash
# Benchmark of replication lag (RPO) and planned failover time, in a qemu
# guest with both roles over loopback (the replica a thin volume): the pipeline's throughput is measured
# first, then fio writes at half of it, then at a quarter, for --runtime
# seconds each, while the source's lag (age of the oldest record not yet durable on the target) is
# sampled twice a second; then a planned failover is timed. Prints a table;
# asserts nothing. Software emulation (tcg) makes every CPU cost larger, so
# the throughput is the emulated guest's, and lag figures are relative to it.
#
#   scripts/bench-rpo.sh [--runtime SECONDS] [--accel tcg|kvm]
#   scripts/bench-rpo.sh --smoke     # 3 s per steady load: it still finishes
#
# Fails (non-zero, with the guest's reason and log) when the guest fails,
# hangs past its timeout, or a measure is missing from its output.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

runtime=60 accel=tcg timeout=
while (($# > 0)); do
	case "$1" in
	--runtime) runtime=${2:?}; shift 2 ;;
	--accel) accel=${2:?}; shift 2 ;;
	--smoke) runtime=3 timeout=600; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done

tree=$("$REPO_ROOT/scripts/kernel.sh")
ko=$("$REPO_ROOT/scripts/kmod.sh")
say "building static userspace tools"
build_static_tools
out="$REPO_ROOT/out/bench/rpo"
mkdir -p "$out"
"$REPO_ROOT/scripts/vm.sh" --kernel "$tree/arch/x86/boot/bzImage" \
	--scenario "$REPO_ROOT/tests/vm/bench/rpo.sh" --name bench-rpo --workdir "$out" \
	--module "$ko" --bin "$rel/replicad" --bin "$rel/replctl" --bin "$FIO" --bin "$(command -v mkfs.ext4)" \
	--disk 256M --disk 640M --disk 16M --mem 2048 --accel "$accel" --timeout "${timeout:-$((2 * runtime + 1800))}" \
	--env "BENCH_RUNTIME=$runtime" >"$out/run.log" 2>&1 ||
	{ tail -n 40 "$out/run.log"; die "benchmark guest failed (log: $out/console.log)"; }

get() { grep -a "^BENCH-RPO $1 " "$out/console.log" | tr -d '\r' | awk '{ print $3 }' | tail -n 1; }
for m in link_mib_s half_samples half_lag_p50_s quarter_samples quarter_lag_p50_s failover_s; do
	[[ -n "$(get $m)" ]] || die "the guest printed no BENCH-RPO $m (log: $out/console.log)"
done
printf 'replication lag in a qemu guest (%s), both roles over loopback, thin replica\n' "$accel"
printf '%-44s %12s\n' "measure" "value"
printf '%-44s %12s\n' "pipeline throughput (MiB/s, 4-64 KiB writes)" "$(get link_mib_s)"
for f in half quarter; do
	printf '%-44s %12s\n' "steady load at $f of it: lag samples" "$(get ${f}_samples)"
	printf '%-44s %12s\n' "  lag p50 (s)" "$(get ${f}_lag_p50_s)"
	printf '%-44s %12s\n' "  lag p99 (s)" "$(get ${f}_lag_p99_s)"
	printf '%-44s %12s\n' "  lag max (s)" "$(get ${f}_lag_max_s)"
done
printf '%-44s %12s\n' "planned failover, idle writers (s)" "$(get failover_s)"
