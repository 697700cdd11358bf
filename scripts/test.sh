#!/usr/bin/env bash
# The full test suite, as CI runs it:
#   1. installs what is missing (Debian packages, bindgen, cargo-fuzz) via
#      scripts/setup.sh;
#   2. builds the workspace and runs every host test (unit, property,
#      end-to-end over TLS on 127.0.0.1, fault injection), then a smoke run
#      of the host benchmarks (scripts/bench-smoke.sh --host, a few seconds)
#      and of the fuzz targets (scripts/fuzz.sh, 30 s each: about 5 minutes
#      with the build);
#   3. builds (or reuses the cached) Rust-enabled kernel and dm_replica.ko and
#      runs the VM tests in qemu, then a smoke run of the VM benchmarks and
#      the stress run (scripts/bench-smoke.sh --vm, about 3.5 minutes).
# Exits non-zero if anything fails or cannot run. Needs root (package
# installs, a size-limited tmpfs for the disk-full test).
#
#   scripts/test.sh            everything
#   scripts/test.sh --host     host tests only
#   scripts/test.sh --vm       VM tests only
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

host=1
vm=1
case "${1:-}" in
	--host) vm=0 ;;
	--vm) host=0 ;;
	"") ;;
	*) echo "usage: $0 [--host|--vm]" >&2; exit 2 ;;
esac

[[ $(id -u) -eq 0 ]] || { echo "test.sh: run as root (package installs, tmpfs mounts)" >&2; exit 2; }

bash scripts/setup.sh

if ((host)); then
	echo "==> host tests"
	cargo build --workspace --all-targets --locked
	cargo test --workspace --locked
	echo "==> benchmark smoke runs (host)"
	bash scripts/bench-smoke.sh --host
	echo "==> fuzz smoke runs (30 s per target)"
	bash scripts/fuzz.sh --time 30
fi
if ((vm)); then
	echo "==> VM tests"
	bash scripts/vm-test.sh
	echo "==> benchmark smoke runs (VM)"
	bash scripts/bench-smoke.sh --vm
fi
