#!/usr/bin/env bash
# Checksum resync benchmark (not a test): dm-replica's chunk comparison of
# two images of one volume (1% of the chunks differ) next to
# `rsync -I --no-whole-file --inplace` and `b3sum` over the same two images,
# in one run; then a sweep of chunk sizes. Prints tables of ratios with the
# goals; asserts nothing about the figures, but fails if an image is left
# different.
#
#   scripts/bench-resync.sh [--size-mib N] [--chunk-kib K] [--changed-permille P]
#                           [--work DIR] [--no-sweep]
#   scripts/bench-resync.sh --smoke    # 32 MiB with the debug build (CI)
#
# Defaults: 1024 MiB, 128 KiB chunks, 10 per mille changed, work directory
# /dev/shm (needs about 4x the size in free memory). Needs rsync and b3sum.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in rsync b3sum; do
	command -v "$tool" >/dev/null || { echo "bench-resync: $tool is required (apt-get install $tool)" >&2; exit 2; }
done
profile=release
for a in "$@"; do
	[[ "$a" == --smoke ]] && profile=debug
done
if [[ $profile == release ]]; then
	cargo build --release --locked -p replica-tests --bin resync-bench
else
	cargo build --locked -p replica-tests --bin resync-bench
fi
exec "target/$profile/resync-bench" "$@"
