#!/usr/bin/env bash
# Smoke runs of every documented benchmark and long run at a tiny size, so
# they cannot rot: each must finish and print its table (the figures of so
# small a run mean nothing). A benchmark that cannot finish fails loudly
# (non-zero, with the reason) instead of waiting; this proves it still
# finishes when nothing is wrong.
#
#   scripts/bench-smoke.sh          all of them
#   scripts/bench-smoke.sh --host   host ones only (scripts/test.sh --host runs these)
#   scripts/bench-smoke.sh --vm     VM ones only (qemu; kernel and module cached)
#
# host: bench-pipeline.sh --smoke   16 MiB through source and target (debug build)
#       bench-capture.sh --smoke    16 MiB per round
#       bench-resync.sh --smoke     32 MiB, dm-replica vs rsync and b3sum
# vm:   bench-vm.sh --smoke         1 round, 1 s fio runs
#       bench-rpo.sh --smoke        3 s per steady load
#       bench-resync-vm.sh --smoke  64 MiB, DRBD and dm-replica
#       vm-stress.sh --smoke        2 cycles on the normal kernel
#
# Prints one PASS/FAIL line per run with its duration; exits non-zero if
# any failed (the failing run's output is shown).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

host=1 vm=1
case "${1:-}" in
--host) vm=0 ;;
--vm) host=0 ;;
"") ;;
*) echo "usage: $0 [--host|--vm]" >&2; exit 2 ;;
esac

runs=()
((host)) && runs+=("bench-pipeline.sh --smoke" "bench-capture.sh --smoke" "bench-resync.sh --smoke")
((vm)) && runs+=("bench-vm.sh --smoke" "bench-rpo.sh --smoke" "bench-resync-vm.sh --smoke" "vm-stress.sh --smoke")

logdir=$(mktemp -d /tmp/bench-smoke.XXXXXX)
results=() failed=0
for r in "${runs[@]}"; do
	name=${r%% *}
	log="$logdir/${name%.sh}.log"
	echo "==> smoke: scripts/$r"
	t0=$SECONDS
	# shellcheck disable=SC2086 # the run's arguments
	if bash scripts/$r >"$log" 2>&1; then
		results+=("$(printf 'PASS  %-28s %4d s' "$r" $((SECONDS - t0)))")
		tail -n 12 "$log"
	else
		rc=$?
		results+=("$(printf 'FAIL  %-28s %4d s (exit %d; log %s)' "$r" $((SECONDS - t0)) "$rc" "$log")")
		failed=$((failed + 1))
		tail -n 60 "$log"
	fi
done
echo
echo "benchmark smoke runs:"
printf '  %s\n' "${results[@]}"
((failed == 0)) || { echo "$failed failed" >&2; exit 1; }
rm -rf "$logdir"
