#!/usr/bin/env bash
# dm-replica quick demo, host only (development mode: a userspace capture ring
# stands in for the kernel module). Builds what it needs, then:
#   1. makes a private CA, host certificates and a data key;
#   2. creates an ext4 "source volume" with files;
#   3. starts replicad target and replicad source (TLS 1.3, mutual certs,
#      127.0.0.1 only);
#   4. protects the volume: its blocks are captured and replicated;
#   5. changes files while replicating and ships the changes;
#   6. shows status on both sides;
#   7. test failover: checks the newest recovery point with e2fsck and reads
#      the changed files back from it; compares replica and source.
# Exits 0 and prints PASS when every check holds.
#
#   scripts/demo-host.sh [--keep]     (--keep leaves the work directory)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

keep=0
[[ "${1:-}" == "--keep" ]] && keep=1
step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
fail() { printf '\n\033[1;31mFAIL: %s\033[0m\n' "$*"; exit 1; }

for tool in mkfs.ext4 debugfs e2fsck sha256sum; do
	command -v "$tool" >/dev/null || fail "$tool is required (apt-get install e2fsprogs coreutils)"
done

step "building replicad and replctl (release)"
cargo build --release --locked -p replicad -p replctl
bin=target/release

W=$(mktemp -d "${TMPDIR:-/tmp}/dm-replica-demo.XXXXXX")
pids=()
cleanup() {
	for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
	wait 2>/dev/null || true
	if ((keep)); then echo "work directory kept: $W"; else rm -rf "$W"; fi
}
trap cleanup EXIT
echo "work directory: $W"

step "private CA, host certificates, data key"
$bin/replctl certs generate --out "$W/pki" --host source-host --host target-host
$bin/replctl keys generate --out "$W/keys.toml"

step "source volume: 64 MiB ext4 with files"
mkdir -p "$W/files/app"
echo "hello from the protected site" >"$W/files/hello.txt"
head -c 4M /dev/urandom >"$W/files/app/blob.bin"
seq 1 20000 | sed 's/^/order /' >"$W/files/app/orders.log"
mkfs.ext4 -q -F -b 4096 -d "$W/files" -L demo "$W/source.img" 64M
ls -l "$W/source.img"

step "starting replicad target (listens on 127.0.0.1, file-backed replica)"
cat >"$W/target.toml" <<EOF
listen = "127.0.0.1:0"
keys = "$W/keys.toml"
state_dir = "$W/target"
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/target-host.pem"
key = "$W/pki/target-host.key"
[[volume]]
id = "demo"
size = $((64 << 20))
allowed_sources = ["source-host"]
keep_points = 8
replica = { backend = "file", path = "$W/replica.img" }
EOF
$bin/replicad target --config "$W/target.toml" 2>"$W/target.log" &
pids+=($!)
for _ in $(seq 1 200); do [[ -s "$W/target/listen.addr" ]] && break; sleep 0.05; done
[[ -s "$W/target/listen.addr" ]] || fail "target did not start: $(cat "$W/target.log")"
addr=$(cat "$W/target/listen.addr")
echo "target listening on $addr"

step "protecting the volume: replicad source ships captured writes"
cat >"$W/source.toml" <<EOF
volume = "demo"
volume_size = $((64 << 20))
ring = { file = "$W/ring" }
target = "$addr"
target_name = "target-host"
keys = "$W/keys.toml"
state_dir = "$W/source"
# The ring file's first records write the whole image onto a zeroed
# replica (development mode has no kernel resync).
initial_copy = false
[tls]
ca = "$W/pki/ca.pem"
cert = "$W/pki/source-host.pem"
key = "$W/pki/source-host.key"
[retry]
schedule_secs = [0.5, 1, 2]
EOF
# The ring must exist before the daemon attaches (the kernel module makes
# it at table load; here the first feed does).
out=$($bin/replctl dev feed --ring "$W/ring" --image "$W/source.img")
echo "initial copy: $out"
first=$(sed -n 's/.*up to sequence \([0-9]*\) .*/\1/p' <<<"$out")
gen=$(sed -n 's/.* of generation \([0-9a-f]*\)$/\1/p' <<<"$out")
$bin/replicad source --config "$W/source.toml" 2>"$W/source.log" &
pids+=($!)
$bin/replctl wait --state-dir "$W/target" --volume demo --applied "$first" --generation "$gen" --timeout 120
$bin/replctl status --state-dir "$W/target"

step "changing files while replicating"
cp "$W/source.img" "$W/source.before"
echo "written after protection started" >"$W/late.txt"
debugfs -w -R "write $W/late.txt /late.txt" "$W/source.img" >/dev/null 2>&1
debugfs -w -R "rm /app/orders.log" "$W/source.img" >/dev/null 2>&1
out=$($bin/replctl dev feed --ring "$W/ring" --base "$W/source.before" --image "$W/source.img")
echo "$out"
last=$(sed -n 's/.*up to sequence \([0-9]*\) .*/\1/p' <<<"$out")
[[ -n "$last" ]] || fail "could not read the last sequence"
$bin/replctl wait --state-dir "$W/target" --volume demo --applied "$last" --generation "$gen" --timeout 120

step "status (source, then target)"
$bin/replctl status --state-dir "$W/source"
$bin/replctl status --state-dir "$W/target"

step "test failover: open the newest recovery point"
point=$(ls -1 "$W"/target/volumes/demo/points/*.img | tail -n 1)
echo "recovery point image: $point"
cp "$point" "$W/failover.img"
e2fsck -fn "$W/failover.img" || fail "recovery point does not pass e2fsck"
echo "--- /hello.txt:"
debugfs -R "cat /hello.txt" "$W/failover.img" 2>/dev/null
echo "--- /late.txt:"
late=$(debugfs -R "cat /late.txt" "$W/failover.img" 2>/dev/null)
echo "$late"
[[ "$late" == "written after protection started" ]] || fail "late.txt missing from the recovery point"
if debugfs -R "stat /app/orders.log" "$W/failover.img" 2>&1 | grep -q "Inode:"; then
	fail "orders.log was deleted on the source but is still in the recovery point"
fi

step "replica vs source checksums"
src=$(sha256sum <"$W/source.img" | cut -d' ' -f1)
rep=$(sha256sum <"$W/replica.img" | cut -d' ' -f1)
pt=$(sha256sum <"$point" | cut -d' ' -f1)
printf 'source   %s\nreplica  %s\npoint    %s\n' "$src" "$rep" "$pt"
[[ "$src" == "$rep" && "$src" == "$pt" ]] || fail "replica differs from the source"

printf '\n\033[1;32mPASS\033[0m: volume protected, changes replicated, recovery point verified (e2fsck clean, files intact, checksums equal)\n'
