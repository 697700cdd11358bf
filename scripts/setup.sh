#!/usr/bin/env bash
# Install what the kernel-side build, the VM tests and the fuzz smoke run
# need, and nothing that is already there: Debian packages (kernel source,
# Debian's rustc with its core source, clang/llvm, qemu, busybox, dmsetup,
# drbd-utils, build tools), bindgen-cli at the exact version the kernel
# build uses, and cargo-fuzz (scripts/fuzz.sh).
#
# Idempotent: a second run only checks. Usable by CI on a fresh Debian 12.
#
# Environment:
#   DM_REPLICA_TOOLS  where bindgen and cargo-fuzz are installed
#                     (default: ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/tools)
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

PACKAGES=(
	# Kernel source and build tools.
	linux-source-6.12 bc bison flex libelf-dev libssl-dev pahole cpio kmod zstd
	xz-utils make gcc libc6-dev libncurses-dev
	# Rust for the kernel: Debian's rustc (the kernel needs its core source)
	# and libclang for bindgen.
	rustc-web rust-web-src libclang-dev clang llvm lld
	# Guest: emulator, initramfs contents (e2fsprogs for filesystem tests;
	# libaio-dev and zlib for the static fio build).
	qemu-system-x86 busybox-static dmsetup e2fsprogs libaio-dev zlib1g-dev
	# DRBD 8.4's tools (drbdsetup-84, drbdmeta) for the comparison in
	# scripts/bench-resync-vm.sh.
	drbd-utils
	# rsync and b3sum, next to which scripts/bench-resync.sh measures.
	rsync b3sum
	# Used by the scripts themselves.
	util-linux coreutils gzip
)

missing=()
for pkg in "${PACKAGES[@]}"; do
	status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
	if [[ "$status" != "install ok installed" ]]; then
		missing+=("$pkg")
	fi
done

if ((${#missing[@]} > 0)); then
	say "installing Debian packages: ${missing[*]}"
	if [[ $(id -u) -ne 0 ]]; then
		die "need root to install packages (run as root or install them: ${missing[*]})"
	fi
	export DEBIAN_FRONTEND=noninteractive
	apt-get update
	apt-get install -y --no-install-recommends "${missing[@]}"
else
	say "all ${#PACKAGES[@]} Debian packages present"
fi

# bindgen: the kernel needs >= 0.65.1; Debian 12's own bindgen is too old. We
# pin one version and install it into a private root so nothing else on PATH
# is picked up by accident.
if [[ "$("$BINDGEN" --version 2>/dev/null || true)" == "bindgen $BINDGEN_VERSION" ]]; then
	say "bindgen $BINDGEN_VERSION present at $BINDGEN"
else
	command -v cargo >/dev/null || die "cargo not found: needed to install bindgen-cli $BINDGEN_VERSION"
	say "installing bindgen-cli $BINDGEN_VERSION into $DM_REPLICA_TOOLS"
	cargo install --locked --root "$DM_REPLICA_TOOLS" bindgen-cli --version "$BINDGEN_VERSION"
	[[ "$("$BINDGEN" --version)" == "bindgen $BINDGEN_VERSION" ]] ||
		die "bindgen at $BINDGEN does not report version $BINDGEN_VERSION"
fi

# cargo-fuzz: builds the fuzz targets on the stable toolchain (no sanitizer).
ensure_cargo_fuzz

# fio: the guests need a self-contained binary. Built from Debian's source
# package (fetched with a private apt source list and state directory, so
# the system's package lists are left alone).
if [[ -x "$FIO" && "$("$FIO" --version 2>/dev/null)" == "fio-$FIO_VERSION" ]]; then
	say "fio $FIO_VERSION (static) present at $FIO"
else
	say "building fio $FIO_VERSION statically from Debian's source package"
	work=$(mktemp -d "$DM_REPLICA_TOOLS/.fio-build.XXXXXX" 2>/dev/null || { mkdir -p "$DM_REPLICA_TOOLS" && mktemp -d "$DM_REPLICA_TOOLS/.fio-build.XXXXXX"; })
	trap 'rm -rf "$work"' EXIT
	mkdir -p "$work/lists/partial" "$work/src"
	cat >"$work/sources.list" <<-SRC
		deb-src http://deb.debian.org/debian bookworm main
	SRC
	apt_src=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
		-o "Dir::State::Lists=$work/lists" -o APT::Sandbox::User=root)
	apt-get "${apt_src[@]}" update >"$work/apt.log" 2>&1 || { cat "$work/apt.log" >&2; die "cannot fetch Debian's source index"; }
	(cd "$work/src" && apt-get "${apt_src[@]}" source --download-only fio >>"$work/apt.log" 2>&1) ||
		{ cat "$work/apt.log" >&2; die "cannot download fio's source package"; }
	tar -xzf "$work/src/fio_$FIO_VERSION.orig.tar.gz" -C "$work/src"
	(
		cd "$work/src/fio-$FIO_VERSION"
		./configure --build-static --disable-native >"$work/configure.log" 2>&1
		make -j"$(nproc)" >"$work/make.log" 2>&1
	) || { tail -n 40 "$work"/*.log >&2; die "fio build failed"; }
	mkdir -p "$(dirname "$FIO")"
	install -m 0755 "$work/src/fio-$FIO_VERSION/fio" "$FIO"
	rm -rf "$work"
	trap - EXIT
	[[ "$("$FIO" --version)" == "fio-$FIO_VERSION" ]] || die "built fio does not report version $FIO_VERSION"
	say "fio $FIO_VERSION built: $FIO"
fi

# The kernel must be built with Debian's rustc, which ships the core source the
# kernel compiles; check it is the one we expect to find.
[[ -x "$KRUSTC" ]] || die "$KRUSTC missing after install"
[[ -d "$("$KRUSTC" --print sysroot)/lib/rustlib/src/rust/library/core" ]] ||
	die "core source for $KRUSTC not found (package rust-web-src)"
say "setup complete: $("$KRUSTC" --version), $("$BINDGEN" --version), $(qemu-system-x86_64 --version | head -n1)"
