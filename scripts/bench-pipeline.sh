#!/usr/bin/env bash
# Userspace pipeline benchmark (not a test): source and target roles on this
# machine next to plain zstd and a zstd|openssl pipe, on the same generated
# data, in one run. Prints a table of ratios.
#
#   scripts/bench-pipeline.sh [--size-mib N] [--work DIR] [--stall-secs S] [--keep]
#   scripts/bench-pipeline.sh --smoke    # 16 MiB with the debug build (CI)
#
# Defaults: 1024 MiB (or $BENCH_MIB), work directory on /dev/shm (tmpfs;
# needs about 3x the size in free memory: the data, the spool, the replica).
# It never waits forever: it fails, non-zero, with the reason and the end of
# both daemons' logs when a daemon exits, reports Critical or needs a
# resync, when nothing moves for --stall-secs (default 60), or at an overall
# deadline. --smoke uses the debug build scripts/test.sh already made and
# takes a few seconds.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in zstd openssl; do
	command -v "$tool" >/dev/null || { echo "bench-pipeline: $tool is required (apt-get install $tool)" >&2; exit 2; }
done
profile=release
for a in "$@"; do
	[[ "$a" == --smoke ]] && profile=debug
done
if [[ $profile == release ]]; then
	cargo build --release --locked -p replicad -p replica-tests --bins
else
	cargo build --locked -p replicad -p replica-tests --bins
fi
exec "target/$profile/pipeline-bench" --bin-dir "target/$profile" "$@"
