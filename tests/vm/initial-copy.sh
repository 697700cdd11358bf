#!/bin/sh
# `replctl protect` and `replctl resync --wait` return only when the copy
# they started has been applied on the target: a disk with 56 MiB of random
# data in three places and zeros elsewhere (whose copy takes a while under
# emulation) is protected; the moment protect returns, the source needs no
# resync, the target says Consistent with a recovery point at the copy's
# END, and the replica equals the disk. The target's replica is a new
# (sparse) file: it says so at BEGIN, so the copy compares nothing, sends
# exactly the chunks holding data, and skips the zero ones. The same for an
# operator's full resync with --wait afterwards.
#
# vm-disks: 96M 640M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

W=/tmp/ic
C=/etc/dm-replica
T=/target
ADDR=127.0.0.1:7719
volume_vars /dev/vda

target_disk /dev/vdb $T
check "random data on the disk before protection (0-32 MiB)" dd if=/dev/urandom of=/dev/vda bs=1M count=32 oflag=direct
check "random data at 48-64 MiB" dd if=/dev/urandom of=/dev/vda bs=1M count=16 seek=48 oflag=direct
check "random data at 88-96 MiB" dd if=/dev/urandom of=/dev/vda bs=1M count=8 seek=88 oflag=direct
setup_guest $W
{ target_toml $W $ADDR $T/state; target_volume ic $size $T/ic.img 4; } >$W/target.toml
spawn_target $W
mkdir -p $C

# consistent_now: the source needs nothing, the target is Consistent at a
# point, and the replica equals the volume.
consistent_now() {
	replctl status --state-dir $W/source
	replctl status --state-dir $T/state
	check "the source needs no resync" json_has $W/source '"needs_resync": false'
	check "the target says Consistent" json_has $T/state '"replica": "Consistent"'
	check "the target has a recovery point" test -n "$(replctl points --state-dir $T/state --volume ic | awk '$1 ~ /^[0-9]+$/')"
	same_sha /dev/mapper/ic $T/ic.img "the replica equals the volume"
}

step "protect: returns when the initial copy is applied"
out=$(replctl protect /dev/vda --volume ic --target $ADDR --target-name target-host --ring-mib 4 \
	--config-dir $C --state-dir $W/source --keys $W/keys.toml --ca $W/pki/ca.pem \
	--cert $W/pki/source-host.pem --key $W/pki/source-host.key --spawn 2>&1) || fail "replctl protect: $out"
echo "$out"
check "protect says the target applied the copy" sh -c 'echo "$1" | grep -q "initial copy done: the target applied its end"' _ "$out"
consistent_now
# 96 MiB in 128 KiB chunks: 768, of which 448 hold data, 320 zeros.
check "the target named its replica's holes" grep -q "the target's replica reads zeros in chunks not yet compared" $W/source/replicad.log
check_eq "chunks compared" 0 "$(jnum compared_chunks)"
check_eq "chunks sent: those with data" 448 "$(jnum sent_chunks)"
check_eq "zero chunks neither compared nor sent" 320 "$(jnum zero_chunks)"

step "a full resync with --wait: returns when its END is applied"
# Under the replica target, so only a resync can bring it to the replica.
check "8 MiB changed on the disk behind the target's back" dd if=/dev/urandom of=/dev/vda bs=1M count=8 seek=40 oflag=direct
check_not "the replica differs from the volume now" sh -c "test \"\$(dd if=/dev/mapper/ic iflag=direct bs=1M 2>/dev/null | sha256sum)\" = \"\$(sha256sum <$T/ic.img)\""
out=$(replctl resync --state-dir $W/source --wait --timeout 900 2>&1) || fail "replctl resync --wait: $out"
echo "$out"
check "resync says its end was applied" sh -c 'echo "$1" | grep -q "resync done: the target applied its end"' _ "$out"
consistent_now

out=$(replctl unprotect ic --config-dir $C 2>&1) || fail "replctl unprotect: $out"
stop_daemons $tpid
check "rmmod dm_replica" rmmod dm_replica
