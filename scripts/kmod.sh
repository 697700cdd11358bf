#!/usr/bin/env bash
# Build dm_replica.ko out of tree against the cached test kernel.
#
#   scripts/kmod.sh [--flavour normal|debug] [--fault NAME | --broken] [--out DIR]
#
# Prints the path of the built dm_replica.ko on stdout.
#
# The sources (kmod/ and, when present, the shared ring ABI file the module
# includes) are copied to a build directory outside the source tree, so the
# work tree stays clean. Default build directory:
#   ${XDG_CACHE_HOME:-$HOME/.cache}/dm-replica/kmod/<kernel>/<variant>
# Any compiler warning fails the build.
#
#   --fault NAME  build a variant that is broken on purpose, to prove the VM
#                 tests can fail. Never install one.
#                   corrupt-reads  flips one byte of every read
#                   leak           leaks memory in every table constructor
#                                  (caught by kmemleak in the debug flavour)
#                   no-hold        submits overlapping writes at once instead
#                                  of holding them back
#   --broken      same as --fault corrupt-reads
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

flavour=normal
variant=normal
out=
while (($# > 0)); do
	case "$1" in
	--flavour) flavour=${2:?--flavour needs a value}; shift 2 ;;
	--flavour=*) flavour=${1#*=}; shift ;;
	--broken) variant=corrupt-reads; shift ;;
	--fault) variant=${2:?--fault needs a value}; shift 2 ;;
	--out) out=${2:?--out needs a value}; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done

tree=$("$REPO_ROOT/scripts/kernel.sh" --flavour "$flavour")
[[ -f "$tree/.dm-replica-complete" ]] || die "kernel tree $tree is incomplete"
out=${out:-$CACHE_ROOT/kmod/$(basename "$tree")/$variant}

mapfile -t vars < <(kmake_vars)
# Flavour-specific make variables recorded by kernel.sh (e.g. LLVM=1).
while IFS= read -r v; do
	[[ -n "$v" ]] && vars+=("$v")
done <"$tree/.dm-replica-make-vars"
case "$variant" in
normal) ;;
corrupt-reads) vars+=(DM_REPLICA_FAULT=corrupt-reads-destroys-data) ;;
leak) vars+=(DM_REPLICA_FAULT=leak-memory-per-table-line) ;;
no-hold) vars+=(DM_REPLICA_FAULT=no-overlap-hold-reorders) ;;
*) die "unknown fault '$variant' (corrupt-reads, leak or no-hold)" ;;
esac

mkdir -p "$out"
exec 8>"$out.lock"
flock 8

say "building dm_replica.ko ($variant) against $(basename "$tree") in $out"
rm -rf "$out/kmod" "$out/crates"
cp -r "$REPO_ROOT/kmod" "$out/kmod"
# The module includes the shared ring ABI by a relative #[path]; keep the
# same layout in the build directory.
ring_abi=crates/ring-abi/src/ring_abi.rs
if [[ -f "$REPO_ROOT/$ring_abi" ]]; then
	mkdir -p "$out/$(dirname "$ring_abi")"
	cp "$REPO_ROOT/$ring_abi" "$out/$ring_abi"
fi

log="$out/build.log"
if ! make -C "$tree" M="$out/kmod" "${vars[@]}" modules >"$log" 2>&1; then
	cat "$log" >&2
	die "module build failed (log: $log)"
fi
if grep -qiE '(^|[^a-z_])warning(\[|:)' "$log"; then
	cat "$log" >&2
	die "module build produced warnings (log: $log)"
fi
ko="$out/kmod/dm_replica.ko"
[[ -f "$ko" ]] || die "build succeeded but $ko is missing"
say "built $ko"
echo "$ko"
