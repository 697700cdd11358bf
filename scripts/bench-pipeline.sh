#!/usr/bin/env bash
# Userspace pipeline benchmark (not a test): source and target roles on this
# machine next to plain zstd and a zstd|openssl pipe, on the same generated
# data, in one run. Prints a table of ratios.
#
#   scripts/bench-pipeline.sh [--size-mib N] [--work DIR]
#
# Defaults: 1024 MiB, work directory on /dev/shm (tmpfs; needs about
# 2.5x the size in free memory).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
for tool in zstd openssl; do
	command -v "$tool" >/dev/null || { echo "bench-pipeline: $tool is required (apt-get install $tool)" >&2; exit 2; }
done
cargo build --release --locked -p replicad -p replica-tests --bins
exec target/release/pipeline-bench --bin-dir target/release "$@"
