#!/usr/bin/env bash
# Long stress run of dm_replica.ko on the debug kernel (lockdep, KASAN,
# kmemleak, atomic-sleep checks): 100 cycles of load / create / fio with
# verify / remove / unload (tests/vm/stress/cycles.sh), with and without a
# ring consumer, reloads under load. Not part of scripts/test.sh: the debug
# kernel takes about 25 minutes to build cold and the run about 40 more.
#
#   scripts/vm-stress.sh [--cycles N] [--flavour debug|normal]
#   scripts/vm-stress.sh --smoke     # 2 cycles (one of each kind), normal kernel
#
# Exits non-zero on any failure or kernel report, and when the guest hangs
# (killed at 60 s per cycle + 300 s; every wait in the guest has its own
# deadline and names what it waited for).
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

cycles=100
flavour=debug
while (($# > 0)); do
	case "$1" in
	--cycles) cycles=${2:?--cycles needs a value}; shift 2 ;;
	--flavour) flavour=${2:?--flavour needs a value}; shift 2 ;;
	--smoke) cycles=2 flavour=normal; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done
[[ "$cycles" =~ ^[0-9]+$ ]] || die "--cycles wants a number"
exec "$REPO_ROOT/scripts/vm-test.sh" --flavour "$flavour" --timeout $((cycles * 60 + 300)) \
	--env "CYCLES=$cycles" "$REPO_ROOT/tests/vm/stress/cycles.sh"
