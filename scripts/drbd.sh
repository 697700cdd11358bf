#!/usr/bin/env bash
# Build DRBD 8.4 (the kernel's own drivers/block/drbd) and lib/lru_cache.c
# as out-of-tree modules against the cached test kernel, for side-by-side
# benchmarks (scripts/bench-resync-vm.sh). The kernel configuration is left
# alone: the test kernel has CONFIG_BLK_DEV_DRBD and CONFIG_LRU_CACHE off,
# but everything else DRBD needs (INET, PROC_FS, CRYPTO_HASH, LIBCRC32C)
# is built in.
#
#   scripts/drbd.sh [--flavour normal|debug]
#
# Prints two lines on stdout: the path of lru_cache.ko, then of drbd.ko
# (load them in that order).
#
# The sources are copied out of the kernel tree into
#   ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/drbd/<kernel>/
# (the cached tree is never written to); a complete build there is reused.
# Any compiler warning fails the build.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

# Bump when the recipe below changes the result.
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

tree=$("$REPO_ROOT/scripts/kernel.sh" --flavour "$flavour")
[[ -f "$tree/.dm-replica-complete" ]] || die "kernel tree $tree is incomplete"
[[ -f "$tree/drivers/block/drbd/drbd_main.c" && -f "$tree/lib/lru_cache.c" ]] ||
	die "kernel tree $tree has no DRBD sources (drivers/block/drbd, lib/lru_cache.c)"
grep -qx 'CONFIG_BLK_DEV_DRBD=y' "$tree/.config" &&
	die "kernel tree $tree has DRBD built in already: no module needed"
for opt in INET PROC_FS CRYPTO_HASH LIBCRC32C; do
	grep -qx "CONFIG_$opt=y" "$tree/.config" ||
		die "kernel tree $tree lacks CONFIG_$opt=y, which out-of-tree DRBD needs"
done

out="$CACHE_ROOT/drbd/$(basename "$tree")"
lru_ko="$out/lru_cache/lru_cache.ko"
drbd_ko="$out/drbd/drbd.ko"
stamp="$out/.complete-$RECIPE_VERSION"

mkdir -p "$out"
exec 8>"$out.lock"
flock 8

if [[ -f "$stamp" && -f "$drbd_ko" ]]; then
	say "DRBD modules cached: $out"
else
	mapfile -t vars < <(kmake_vars)
	while IFS= read -r v; do
		[[ -n "$v" ]] && vars+=("$v")
	done <"$tree/.dm-replica-make-vars"
	rm -rf "$out/lru_cache" "$out/drbd" "$out"/.complete-*
	mkdir -p "$out/lru_cache" "$out/drbd"
	log="$out/build.log"
	: >"$log"

	build() { # DIR [MAKE_VARS...]
		local dir=$1
		shift
		make -C "$tree" M="$dir" "${vars[@]}" "$@" -j2 modules >>"$log" 2>&1 || {
			tail -n 60 "$log" >&2
			die "module build in $dir failed (log: $log)"
		}
	}

	# lru_cache: built in the kernel only when something selects it.
	if grep -qx 'CONFIG_LRU_CACHE=y' "$tree/.config"; then
		lru_ko=
	else
		say "building lru_cache.ko against $(basename "$tree")"
		cp "$tree/lib/lru_cache.c" "$out/lru_cache/"
		echo 'obj-m := lru_cache.o' >"$out/lru_cache/Kbuild"
		build "$out/lru_cache"
	fi

	say "building drbd.ko (DRBD $(sed -n 's/^#define REL_VERSION "\(.*\)"/\1/p' "$tree/include/linux/drbd_config.h")) against $(basename "$tree")"
	cp "$tree"/drivers/block/drbd/*.[ch] "$out/drbd/"
	# The in-tree Makefile is a Kbuild file keyed on CONFIG_BLK_DEV_DRBD.
	cp "$tree/drivers/block/drbd/Makefile" "$out/drbd/Kbuild"
	extra=(CONFIG_BLK_DEV_DRBD=m)
	[[ -n "$lru_ko" ]] && extra+=("KBUILD_EXTRA_SYMBOLS=$out/lru_cache/Module.symvers")
	build "$out/drbd" "${extra[@]}"

	if grep -qiE '(^|[^a-z_])warning(\[|:)' "$log"; then
		cat "$log" >&2
		die "DRBD module build produced warnings (log: $log)"
	fi
	[[ -f "$drbd_ko" ]] || die "build succeeded but $drbd_ko is missing"
	touch "$stamp"
	say "built $drbd_ko"
fi

[[ -f "$lru_ko" ]] && echo "$lru_ko"
echo "$drbd_ko"
