#!/usr/bin/env bash
# Coverage-guided fuzzing of the parsers (tests/fuzz, libFuzzer via
# cargo-fuzz on the stable toolchain; see tests/fuzz/src/lib.rs).
#
#   scripts/fuzz.sh [--time SECS] [target...]
#
# Builds the fuzz targets, then runs each named target (default: all) for
# SECS seconds (default 30), one after the other, one process each, and
# prints a table: target, seconds, execs, exec/s, corpus size, crashes.
# Exits non-zero if a target crashed (a panic, an abort, an allocation
# above its bound, a timeout), naming the saved input; reproduce with
#   <target binary> <input>
# (the path is printed too).
#
# Installs cargo-fuzz if missing (cargo install --locked, from crates.io)
# into the tools cache, so later runs reuse it. Corpora grow across runs
# and live outside the repository; the seed corpus (tests/fuzz/seeds) is
# read, never written.
#
# Environment:
#   DM_REPLICA_TOOLS   where cargo-fuzz is installed
#                      (default: ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/tools)
#   DM_REPLICA_FUZZ    corpora, crash inputs and logs, one directory per target
#                      (default: ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/fuzz)
#   CARGO_TARGET_DIR   the build goes to $CARGO_TARGET_DIR/fuzz
#                      (default: target/fuzz of the repository)
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
SELF="$REPO_ROOT/scripts/fuzz.sh"
cd "$REPO_ROOT"

FUZZ_DIR=tests/fuzz
FUZZ_CACHE="${DM_REPLICA_FUZZ:-$CACHE_ROOT/fuzz}"
BUILD_DIR="${CARGO_TARGET_DIR:-$REPO_ROOT/target}/fuzz"

usage() {
	sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$SELF"
	exit "${1:-0}"
}

secs=30
targets=()
while (($#)); do
	case "$1" in
	--time)
		[[ $# -ge 2 && "$2" =~ ^[0-9]+$ && "$2" -gt 0 ]] || die "--time needs a number of seconds"
		secs=$2
		shift 2
		;;
	--time=*)
		secs=${1#--time=}
		[[ "$secs" =~ ^[0-9]+$ && "$secs" -gt 0 ]] || die "--time needs a number of seconds"
		shift
		;;
	-h | --help) usage ;;
	-*) usage 2 >&2 ;;
	*)
		targets+=("$1")
		shift
		;;
	esac
done

ensure_cargo_fuzz

mapfile -t all < <("$CARGO_FUZZ" fuzz list --fuzz-dir "$FUZZ_DIR")
((${#all[@]} > 0)) || die "no fuzz targets found in $FUZZ_DIR"
if ((${#targets[@]} == 0)); then
	targets=("${all[@]}")
fi
for t in "${targets[@]}"; do
	[[ " ${all[*]} " == *" $t "* ]] || die "unknown target '$t' (targets: ${all[*]})"
done

# The lock file is committed: refuse to build with anything else (cargo
# fuzz has no --locked).
cargo metadata --locked --format-version 1 --manifest-path "$FUZZ_DIR/Cargo.toml" >/dev/null ||
	die "$FUZZ_DIR/Cargo.lock is not up to date with $FUZZ_DIR/Cargo.toml"

# No sanitizer: every flag cargo-fuzz then passes is a stable one.
say "building the fuzz targets (${targets[*]})"
build=("$CARGO_FUZZ" fuzz build --fuzz-dir "$FUZZ_DIR" --sanitizer none --target-dir "$BUILD_DIR")
if ((${#targets[@]} == 1)); then
	"${build[@]}" "${targets[0]}"
else
	"${build[@]}"
fi
triple=$(rustc -vV | sed -n 's/^host: //p')
bindir="$BUILD_DIR/$triple/release"

# Longest input per target: the largest seeds with room to grow (file
# images and frames), or libFuzzer's default for short inputs.
max_len() {
	case "$1" in
	frame | spool | journal) echo 8192 ;;
	*) echo 4096 ;;
	esac
}

stat_of() { sed -n "s/^stat::$1: *//p" "$2" | tail -n1; }

rows=()
failed=0
for t in "${targets[@]}"; do
	dir="$FUZZ_CACHE/$t"
	mkdir -p "$dir/corpus" "$dir/artifacts"
	log="$dir/last.log"
	args=(
		-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048
		-max_len="$(max_len "$t")" -print_final_stats=1
		-artifact_prefix="$dir/artifacts/"
	)
	[[ -f "$FUZZ_DIR/dicts/$t.dict" ]] && args+=(-dict="$FUZZ_DIR/dicts/$t.dict")
	say "fuzzing $t for ${secs}s (corpus $dir/corpus, log $log)"
	start=$(date +%s)
	rc=0
	"$bindir/$t" "${args[@]}" "$dir/corpus" "$FUZZ_DIR/seeds/$t" >"$log" 2>&1 || rc=$?
	elapsed=$(($(date +%s) - start))
	execs=$(stat_of number_of_executed_units "$log")
	rate=$(stat_of average_exec_per_sec "$log")
	corpus=$(find "$dir/corpus" -type f | wc -l)
	crashes=0
	if ((rc != 0)); then
		crashes=1
		failed=1
		tail -n 40 "$log" >&2
		artifact=$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)
		if [[ -n "$artifact" ]]; then
			warn "$t crashed; input saved as $artifact (reproduce: $bindir/$t $artifact)"
		else
			warn "$t failed (exit $rc) without saving an input; see $log"
		fi
	fi
	rows+=("$(printf '%-10s %8s %12s %10s %8s %8s' "$t" "$elapsed" "${execs:-?}" "${rate:-?}" "$corpus" "$crashes")")
done

printf '%-10s %8s %12s %10s %8s %8s\n' target seconds execs exec/s corpus crashes
printf '%s\n' "${rows[@]}"
if ((failed)); then
	die "a fuzz target crashed (inputs under $FUZZ_CACHE/<target>/artifacts)"
fi
