#!/bin/sh
# A host with an allowed certificate but another key ring says a hello that
# asks for everything (the last epoch, a takeover by a new ring generation
# with a resync) while the real source replicates a kernel-captured
# volume. The target refuses it at the key confirmation: its state file is
# byte for byte what it was, nothing is Critical, and the real source is
# neither demoted nor fenced (its table stays `replica`, writes go on and
# reach the replica).
#
# vm-disks: 32M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
volume_vars $DATA
W=/tmp/imp
PORT=7716

step "a volume replicated by the real source"
setup_pair $W rv $size 127.0.0.1:$PORT $W/target $W/replica.img 2 $DATA ring_mib=8 overflow_wait_ms=10000
start_daemons $W $W/source
check "write through the protected volume" dd if=/dev/urandom of=/dev/mapper/rv bs=64k count=64 oflag=direct
marker_applied rv 1 $W/target rv
STATE=$W/target/volumes/rv/state.json
check "the target saved the volume's state" test -s $STATE
cp $STATE /tmp/state.before

step "the impostor: an allowed certificate, another key ring"
check "another key ring" replctl keys generate --out $W/other-keys.toml
out=$(dmr-peer hello --target 127.0.0.1:$PORT --ca $W/pki/ca.pem --cert $W/pki/source-host.pem \
	--key $W/pki/source-host.key --keys $W/other-keys.toml --volume rv \
	--epoch 18446744073709551615 --resync --generation eeeeeeeeeeeeeeeeeeeeeeeeeeeeeeee)
echo "$out"
case $out in
"refused key-confirmation: "*"key id 1"*) echo "ok: refused at the key confirmation" ;;
*) fail "the impostor was not refused at the key confirmation: $out" ;;
esac
check "the target's state file is byte for byte what it was" cmp /tmp/state.before $STATE
check_not "the target's volume is not Critical" json_has $W/target '"health": "Critical"'
check "the source's volume is not fenced (its table is replica, not error)" sh -c "dmsetup table rv | grep -q \" replica \""
check_not "the source is not Critical" json_has $W/source '"health": "Critical"'
check "the source is connected" json_has $W/source '"connection": "Connected"'

step "the real source replicates on"
check "more writes" dd if=/dev/urandom of=/dev/mapper/rv bs=64k count=64 seek=128 oflag=direct
marker_applied rv 2 $W/target rv
same_sha /dev/mapper/rv $W/replica.img "the replica equals the volume"
check "the source's epoch is still 1" json_has $W/source '"epoch": ?1,'

step "shutdown"
stop_daemons
teardown rv
