#!/usr/bin/env bash
# Install what the kernel-side build and the VM tests need, and nothing that is
# already there: Debian packages (kernel source, Debian's rustc with its core
# source, clang/llvm, qemu, busybox, dmsetup, build tools) and bindgen-cli at
# the exact version the kernel build uses.
#
# Idempotent: a second run only checks. Usable by CI on a fresh Debian 12.
#
# Environment:
#   DM_REPLICA_TOOLS  where bindgen is installed
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
	# Guest: emulator, initramfs contents.
	qemu-system-x86 busybox-static dmsetup
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

# The kernel must be built with Debian's rustc, which ships the core source the
# kernel compiles; check it is the one we expect to find.
[[ -x "$KRUSTC" ]] || die "$KRUSTC missing after install"
[[ -d "$("$KRUSTC" --print sysroot)/lib/rustlib/src/rust/library/core" ]] ||
	die "core source for $KRUSTC not found (package rust-web-src)"
say "setup complete: $("$KRUSTC" --version), $("$BINDGEN" --version), $(qemu-system-x86_64 --version | head -n1)"
