#!/usr/bin/env bash
# The dm-replica demo: two qemu guests, a protected host and a recovery
# host, linked by a private network (qemu socket networking bound to
# 127.0.0.1 only), each with its own virtio disks.
#
#   1. builds what is missing (Debian packages, the Rust-enabled kernel and
#      dm_replica.ko are cached; static replicad/replctl/fio);
#   2. makes a private CA, host certificates and a data key;
#   3. recovery host: starts `replicad target` (replica on its own disk);
#   4. protected host: an ext4 filesystem with files is protected with
#      `replctl protect` (kernel capture, initial copy with progress);
#      files are changed and an application writes with fsync while it
#      replicates; `replctl status` is shown;
#   5. planned failover while the application writes: writes stop with an
#      error (no hang), everything reaches the recovery host, which becomes
#      the primary; it mounts the volume and lists the files;
#   6. summary: every file the application was told is on disk is on the
#      recovery host with the same checksum; e2fsck is clean.
# Exits 0 only when all of it holds.
#
#   scripts/demo.sh [--timeout SECONDS]
#
# Under software emulation (no KVM) it takes about 5-10 minutes once the
# kernel is built (the first run builds it: about 10 minutes more).
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

timeout=1800
while (($# > 0)); do
	case "$1" in
	--timeout) timeout=${2:?--timeout needs a value}; shift 2 ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done

bold() { printf '\n\033[1m%s\033[0m\n' "$*"; }
bold "dm-replica demo: a protected host and a recovery host, a planned failover"

bold "[1/4] setting up (cached after the first run)"
[[ $(id -u) -eq 0 ]] || die "run as root (package installs)"
bash "$REPO_ROOT/scripts/setup.sh" 2>&1 | sed 's/^/    /'
tree=$("$REPO_ROOT/scripts/kernel.sh")
ko=$("$REPO_ROOT/scripts/kmod.sh")
say "building static replicad and replctl"
build_static_tools

W="$REPO_ROOT/out/demo"
rm -rf "$W"
mkdir -p "$W"

bold "[2/4] private CA, host certificates and data key"
"$rel/replctl" certs generate --out "$W/pki" --host source-host --host target-host | sed 's/^/    /'
"$rel/replctl" keys generate --out "$W/keys.toml" | sed 's/^/    /'

size_mib=96
common=(--kernel "$tree/arch/x86/boot/bzImage" --module "$ko" --bin "$rel/replicad" --bin "$rel/replctl"
	--bin "$(command -v mkfs.ext4)" --bin "$(command -v e2fsck)"
	--file "$W/pki/ca.pem:/etc/dm-replica/pki/ca.pem" --file "$W/keys.toml:/etc/dm-replica/keys.toml"
	--env "VOLUME_SIZE=$((size_mib << 20))" --env "DEMO_TIMEOUT=$timeout" --timeout "$((timeout + 120))")
# A free port on 127.0.0.1 for the guests' link.
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

bold "[3/4] the recovery host and the protected host (qemu guests linked over 127.0.0.1:$port)"
"$REPO_ROOT/scripts/vm.sh" "${common[@]}" --name demo-target --workdir "$W/target" \
	--scenario "$REPO_ROOT/scripts/demo/target-host.sh" --disk 512M --disk 16M \
	--file "$W/pki/target-host.pem:/etc/dm-replica/pki/target-host.pem" \
	--file "$W/pki/target-host.key:/etc/dm-replica/pki/target-host.key" \
	--qemu-arg -netdev --qemu-arg "socket,id=n0,listen=127.0.0.1:$port" \
	--qemu-arg -device --qemu-arg "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:02" \
	>"$W/target.out" 2>&1 &
tpid=$!
# The listening side first.
for _ in $(seq 1 100); do
	grep -q "Booting from ROM\|Linux version" "$W/target/console.log" 2>/dev/null && break
	sleep 0.2
done
"$REPO_ROOT/scripts/vm.sh" "${common[@]}" --name demo-source --workdir "$W/source" \
	--scenario "$REPO_ROOT/scripts/demo/source-host.sh" --disk "${size_mib}M" \
	--file "$W/pki/source-host.pem:/etc/dm-replica/pki/source-host.pem" \
	--file "$W/pki/source-host.key:/etc/dm-replica/pki/source-host.key" \
	--qemu-arg -netdev --qemu-arg "socket,id=n0,connect=127.0.0.1:$port" \
	--qemu-arg -device --qemu-arg "virtio-net-pci,netdev=n0,mac=52:54:00:12:34:01" \
	>"$W/source.out" 2>&1 &
spid=$!

# Narration: the guests' steps, checks and DEMO lines as they happen.
narrate() { # log prefix
	tail -n +1 -F "$1" 2>/dev/null | tr -d '\r' | grep --line-buffered -E '^(--- |ok: |FAIL|DEMO: |resync: |vmtest: scenario)' |
		sed -u "s/^DEMO: //; s/^/$2 /"
}
narrate "$W/target/console.log" "  [recovery ]" &
n1=$!
narrate "$W/source/console.log" "  [protected]" &
n2=$!
cleanup() { kill "$n1" "$n2" "$tpid" "$spid" 2>/dev/null || true; }
trap cleanup EXIT

src_rc=0 tgt_rc=0
wait "$spid" || src_rc=$?
wait "$tpid" || tgt_rc=$?
sleep 0.5 # let the narration catch the last lines (it only prints)
kill "$n1" "$n2" 2>/dev/null || true

bold "[4/4] summary"
grep -a '^DEMO-SUM ' "$W/source/console.log" | tr -d '\r' | sort -u >"$W/acked.sums" || true
grep -a '^DEMO-SUM ' "$W/target/console.log" | tr -d '\r' | sort -u >"$W/target.sums" || true
acked=$(wc -l <"$W/acked.sums")
missing=$(comm -23 "$W/acked.sums" "$W/target.sums" | wc -l)
failover=$(grep -a 'failover took' "$W/source/console.log" | tr -d '\r' | sed 's/.*failover took //' | tail -n 1)
printf '    protected host:   %s\n' "$( ((src_rc == 0)) && echo PASS || echo "FAIL (log: $W/source/console.log)")"
printf '    recovery host:    %s\n' "$( ((tgt_rc == 0)) && echo PASS || echo "FAIL (log: $W/target/console.log)")"
printf '    planned failover: %s\n' "${failover:-n/a}"
printf '    files acknowledged on the protected host: %s; on the new primary with the same checksum: %s\n' \
	"$acked" "$((acked - missing))"
if ((src_rc == 0 && tgt_rc == 0 && acked > 0 && missing == 0)); then
	printf '\n\033[1;32mPASS\033[0m: protected, replicated, failed over with no acknowledged write lost\n'
	exit 0
fi
comm -23 "$W/acked.sums" "$W/target.sums" | head -n 5 | sed 's/^/    missing or different: /'
printf '\n\033[1;31mFAIL\033[0m\n'
exit 1
