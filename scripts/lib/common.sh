# Shared settings and helpers for the scripts (kernel side, VM tests,
# fuzzing). Sourced, not run.
# shellcheck shell=bash
# shellcheck disable=SC2034 # variables used by the scripts that source this

REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
CACHE_ROOT="${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica"
DM_REPLICA_TOOLS="${DM_REPLICA_TOOLS:-$CACHE_ROOT/tools}"
BINDGEN_VERSION=0.69.5
BINDGEN="$DM_REPLICA_TOOLS/bin/bindgen"
# Debian's rustc-web: the kernel needs its matching core source, which the
# rustup toolchains do not ship. Always passed by absolute path.
KRUSTC=/usr/bin/rustc
KRUSTDOC=/usr/bin/rustdoc
KERNEL_SERIES=6.12
# fio for the guests, built statically from Debian's source package (the
# binary package pulls in 80 MB of libraries).
FIO_VERSION=3.33
FIO="$DM_REPLICA_TOOLS/fio-$FIO_VERSION/fio"
# cargo-fuzz for the fuzz targets (tests/fuzz, scripts/fuzz.sh), pinned.
CARGO_FUZZ_VERSION=0.13.2
CARGO_FUZZ="$DM_REPLICA_TOOLS/bin/cargo-fuzz"

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf '==> WARNING: %s\n' "$*" >&2; }
die() {
	printf '==> ERROR: %s\n' "$*" >&2
	exit 1
}

# Make variables every kernel make call needs, module builds included: the
# rustup proxy earlier on PATH would otherwise compile with another rustc.
kmake_vars() {
	printf '%s\n' "RUSTC=$KRUSTC" "RUSTDOC=$KRUSTDOC" "HOSTRUSTC=$KRUSTC" "BINDGEN=$BINDGEN"
}

# build_static_tools [CARGO_ARGS...]: builds the statically linked userspace
# tools the guests run (replicad, replctl, dmr-ring, dmr-peer, dmr-cost) and sets $rel to their
# directory. Every guest script builds this one set of packages and binaries,
# so one build serves them all (another set unifies features differently
# and rebuilds).
build_static_tools() {
	(cd "$REPO_ROOT" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release --locked \
		--target x86_64-unknown-linux-gnu -p replicad -p replctl -p replica-tests \
		--bin replicad --bin replctl --bin dmr-ring --bin dmr-peer --bin dmr-cost "$@")
	rel="$REPO_ROOT/target/x86_64-unknown-linux-gnu/release"
}

# Installs cargo-fuzz $CARGO_FUZZ_VERSION into the tools cache (from
# crates.io, --locked) unless it is there already.
ensure_cargo_fuzz() {
	if [[ "$("$CARGO_FUZZ" fuzz --version 2>/dev/null || true)" == "cargo-fuzz $CARGO_FUZZ_VERSION" ]]; then
		say "cargo-fuzz $CARGO_FUZZ_VERSION present at $CARGO_FUZZ"
		return
	fi
	command -v cargo >/dev/null || die "cargo not found: needed to install cargo-fuzz $CARGO_FUZZ_VERSION"
	say "installing cargo-fuzz $CARGO_FUZZ_VERSION into $DM_REPLICA_TOOLS"
	cargo install --locked --root "$DM_REPLICA_TOOLS" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
	[[ "$("$CARGO_FUZZ" fuzz --version)" == "cargo-fuzz $CARGO_FUZZ_VERSION" ]] ||
		die "cargo-fuzz at $CARGO_FUZZ does not report version $CARGO_FUZZ_VERSION"
}
