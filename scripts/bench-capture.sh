#!/usr/bin/env bash
# Host microbenchmark of the capture path: the module's own capture logic
# (kmod/src/capture.rs: reserve, complete, release) plus the payload copy
# into ring memory and the descriptor and stamp writes, next to a plain
# memcpy of the same buffers to the same places, in one run. Prints a table
# of ratios; asserts nothing. Goal: >= 0.8x memcpy.
#
#   scripts/bench-capture.sh [MiB per round, default $BENCH_MIB or 2048]
#   scripts/bench-capture.sh --smoke    # 16 MiB per round, debug build (CI)
#
# The loops are bounded (no waits); a broken ring logic panics, non-zero.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "${1:-}" == --smoke ]]; then
	exec cargo run --quiet --locked -p replica-capture --bin capture-bench -- 16
fi
cargo run --quiet --release --locked -p replica-capture --bin capture-bench -- "${1:-${BENCH_MIB:-2048}}"
