#!/usr/bin/env bash
# Build (or find in the cache) a Rust-enabled 6.12 kernel for the VM tests.
#
#   scripts/kernel.sh [--flavour normal|debug] [--quiet]
#
# Prints the path of the built kernel tree on stdout (bzImage at
# arch/x86/boot/bzImage; out-of-tree modules build against it with
# scripts/kmod.sh).
#
# The kernel comes from Debian's linux-source-6.12 with the project's config
# fragment(s) from kmod/config/ and the bindings additions from
# kmod/kernel/bindings_helper.h. The result is cached under
#   ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/kernel/<flavour>-<key>
# where <key> hashes everything that goes into the build (kernel version,
# fragments, bindings additions, flavour, toolchain versions, recipe version),
# so a warm run returns at once. Builds are serialised with a lock and done in
# a temporary directory that is renamed into place only when complete.
#
# Flavours:
#   normal  gcc-built, what CI runs.
#   debug   adds PROVE_LOCKING, DEBUG_ATOMIC_SLEEP, KASAN, KMEMLEAK,
#           DM_FLAKEY; built with clang (LLVM=1) because Rust with KASAN
#           requires a clang-built kernel.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# Bump when the build recipe below changes in a way that changes the result.
RECIPE_VERSION=1

flavour=normal
while (($# > 0)); do
	case "$1" in
	--flavour) flavour=${2:?--flavour needs a value}; shift 2 ;;
	--flavour=*) flavour=${1#*=}; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done

fragments=("$REPO_ROOT/kmod/config/dm-replica.config")
extra_make=()
case "$flavour" in
normal) ;;
debug)
	fragments+=("$REPO_ROOT/kmod/config/debug.config")
	extra_make+=(LLVM=1)
	;;
*) die "unknown flavour '$flavour' (normal or debug)" ;;
esac
bindings_add="$REPO_ROOT/kmod/kernel/bindings_helper.h"

# --- Check the toolchain is there (scripts/setup.sh installs it). ---
tarball=/usr/src/linux-source-$KERNEL_SERIES.tar.xz
src_version=$(dpkg-query -W -f='${Version}' "linux-source-$KERNEL_SERIES" 2>/dev/null || true)
[[ -n "$src_version" && -f "$tarball" ]] ||
	die "linux-source-$KERNEL_SERIES is not installed: run scripts/setup.sh"
[[ -x "$KRUSTC" ]] || die "$KRUSTC missing: run scripts/setup.sh"
[[ "$("$BINDGEN" --version 2>/dev/null || true)" == "bindgen $BINDGEN_VERSION" ]] ||
	die "bindgen $BINDGEN_VERSION not found at $BINDGEN: run scripts/setup.sh"
toolchain="$("$KRUSTC" --version) / $("$BINDGEN" --version) / $(gcc --version | head -n1)"
if [[ "$flavour" == debug ]]; then
	toolchain+=" / $(clang --version | head -n1)"
fi

# --- Cache key. ---
key=$(
	{
		echo "recipe $RECIPE_VERSION"
		echo "linux-source-$KERNEL_SERIES $src_version"
		echo "flavour $flavour"
		echo "make ${extra_make[*]}"
		echo "toolchain $toolchain"
		for f in "${fragments[@]}" "$bindings_add"; do
			echo "file $(basename "$f")"
			cat "$f"
		done
	} | sha256sum | cut -c1-16
)
kcache="$CACHE_ROOT/kernel"
tree="$kcache/$flavour-$key"

if [[ -f "$tree/.dm-replica-complete" ]]; then
	say "kernel ($flavour) cached: $tree"
	echo "$tree"
	exit 0
fi

mkdir -p "$kcache"
exec 9>"$kcache/.lock"
if ! flock -n 9; then
	say "another kernel build holds $kcache/.lock; waiting for it"
	flock 9
fi
# Someone else may have built it while we waited.
if [[ -f "$tree/.dm-replica-complete" ]]; then
	say "kernel ($flavour) cached: $tree"
	echo "$tree"
	exit 0
fi

# We hold the lock: any temporary tree left over is from an interrupted build.
rm -rf "$kcache"/.tmp-* "$tree"
tmp="$kcache/.tmp-$flavour-$key"
mkdir -p "$tmp"
log="$kcache/$flavour-$key.log"
: >"$log"
say "building kernel ($flavour, key $key) in $tmp; log: $log"
start=$SECONDS

say "extracting $tarball ($src_version)"
tar -xf "$tarball" -C "$tmp" --strip-components=1

say "adding bindings from $(basename "$bindings_add")"
{
	echo
	echo "/* dm-replica additions */"
	cat "$bindings_add"
} >>"$tmp/rust/bindings/bindings_helper.h"

mapfile -t vars < <(kmake_vars)
vars+=("${extra_make[@]}")
kmake() {
	make -C "$tmp" "${vars[@]}" "$@" >>"$log" 2>&1 || {
		tail -n 60 "$log" >&2
		die "kernel build failed at 'make $*' (full log: $log)"
	}
}

say "configuring: tinyconfig + kvm_guest.config + ${fragments[*]##*/}"
kmake tinyconfig
kmake kvm_guest.config
for f in "${fragments[@]}"; do
	cp "$f" "$tmp/kernel/configs/dm-replica-$(basename "$f")"
	kmake "dm-replica-$(basename "$f")"
done
kmake olddefconfig

# Every option the fragments ask for must have stuck: Kconfig silently drops
# what it cannot satisfy (e.g. RUST when a dependency is missing).
bad=0
while IFS= read -r line; do
	if [[ "$line" =~ ^(CONFIG_[A-Za-z0-9_]+)=(.*)$ ]]; then
		want="${BASH_REMATCH[1]}=${BASH_REMATCH[2]}"
	elif [[ "$line" =~ ^#\ (CONFIG_[A-Za-z0-9_]+)\ is\ not\ set$ ]]; then
		want="# ${BASH_REMATCH[1]} is not set"
		grep -qx "${BASH_REMATCH[1]}=.*" "$tmp/.config" || continue
	else
		continue
	fi
	if ! grep -qxF "$want" "$tmp/.config"; then
		warn "config: wanted '$want', got '$(grep -E "(^|# )${BASH_REMATCH[1]}[= ]" "$tmp/.config" || echo unset)'"
		bad=1
	fi
done < <(cat "${fragments[@]}")
((bad == 0)) || die "kernel configuration does not match the fragments (see above)"

say "building bzImage and modules_prepare (make -j2; several minutes)"
kmake -j2 bzImage modules_prepare
# A 'modules' pass writes Module.symvers; without it every out-of-tree module
# fails in modpost with undefined symbols.
say "building in-tree modules (Module.symvers)"
kmake -j2 modules

# Make variables out-of-tree module builds must repeat (one per line).
for v in "${extra_make[@]}"; do echo "$v"; done >"$tmp/.dm-replica-make-vars"
{
	echo "flavour=$flavour"
	echo "key=$key"
	echo "source=linux-source-$KERNEL_SERIES $src_version"
	echo "toolchain=$toolchain"
	echo "build_seconds=$((SECONDS - start))"
} >"$tmp/.dm-replica-complete"
mv "$tmp" "$tree"
# Older builds of this flavour (about 2 GB each) and their logs are
# superseded.
for old in "$kcache/$flavour"-*; do
	[[ "$old" != "$tree" && "$old" != "$log" ]] || continue
	say "removing superseded $(basename "$old")"
	rm -rf "$old" "$CACHE_ROOT/kmod/$(basename "$old")"
done
say "kernel ($flavour) built in $((SECONDS - start)) s: $tree"
echo "$tree"
