#!/bin/sh
# replctl protect / activate / unprotect: an ext4 filesystem with a file is
# protected (replica table over the disk, source configuration, activation
# entry, the daemon started, the whole volume copied to the target); after
# the table is removed as at a reboot, `replctl activate` re-creates it from
# the activation entry and the filesystem mounts from /dev/mapper again;
# `replctl unprotect` stops the daemon and removes the table, the entry, the
# configuration and the state, leaving the data on the disk.
#
# vm-disks: 32M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

W=/tmp/pr
C=/etc/dm-replica
ADDR=127.0.0.1:7717
volume_vars /dev/vda

check "ext4 with a file, before protection" mkfs.ext4 -q -F /dev/vda
mkdir -p /mnt/v
check "mount" mount -t ext4 /dev/vda /mnt/v
echo "the data stays" >/mnt/v/keep.txt
check "umount" umount /mnt/v
setup_guest $W
{ target_toml $W $ADDR $W/target; target_volume pv $size $W/pv.img 2; } >$W/target.toml
spawn_target $W
mkdir -p $C

step "protect"
check_not "a file is not a block device" replctl protect $W/keys.toml --volume x --target $ADDR \
	--config-dir $C --keys $W/keys.toml --ca $W/pki/ca.pem --cert $W/pki/source-host.pem --key $W/pki/source-host.key
# elapsed_since T0: whole seconds since uptime T0.
elapsed_since() { echo $(($(cut -d. -f1 /proc/uptime) - $1)); }
# protect_with STATE_DIR KEYS: replctl protect /dev/vda as pv, spawned.
protect_with() {
	replctl protect /dev/vda --volume pv --target $ADDR --target-name target-host --ring-mib 4 \
		--config-dir $C --state-dir "$1" --keys "$2" --ca $W/pki/ca.pem \
		--cert $W/pki/source-host.pem --key $W/pki/source-host.key --spawn 2>&1
}
t0=$(cut -d. -f1 /proc/uptime)
out=$(protect_with $W/source $W/missing-keys.toml) && fail "protect with a missing key file succeeded: $out"
echo "$out"
check "a missing key file is refused, naming it" sh -c 'echo "$1" | grep -qF "cannot start: key file $2: No such file"' _ "$out" $W/missing-keys.toml
check "at once (not after waiting for the daemon)" test "$(elapsed_since "$t0")" -lt 20
check_not "nothing was created: no table" dm_exists pv
check_not "no activation entry" test -e $C/protected/pv.toml
check_not "no configuration" test -e $C/source-pv.toml
# What only the daemon itself refuses (a demoted source's state): protect
# starts it, sees it exit and shows its reason at once.
mkdir -p $W/demoted
echo '{"epoch": 1, "demoted": "a test"}' >$W/demoted/role.json
t0=$(cut -d. -f1 /proc/uptime)
out=$(protect_with $W/demoted $W/keys.toml) && fail "protect over a demoted source's state succeeded: $out"
echo "$out"
check "the daemon's exit and its reason are shown" sh -c 'echo "$1" | grep -q "replicad source exited (exit status: 2)" && echo "$1" | grep -q "demoted"' _ "$out"
check "at once (not after the 60 s wait for its socket)" test "$(elapsed_since "$t0")" -lt 20
out=$(replctl unprotect pv --config-dir $C 2>&1) || fail "replctl unprotect: $out"
out=$(replctl protect /dev/vda --volume pv --target $ADDR --target-name target-host --ring-mib 4 \
	--config-dir $C --state-dir $W/source --keys $W/keys.toml --ca $W/pki/ca.pem \
	--cert $W/pki/source-host.pem --key $W/pki/source-host.key --spawn 2>&1) || fail "replctl protect: $out"
echo "$out"
check "the replica table is over the disk" sh -c 'dmsetup table pv | grep -qE " replica [0-9]+:[0-9]+ pv "'
check "activation entry" test -f $C/protected/pv.toml
check "source configuration" replicad check source --config $C/source-pv.toml
check "the initial copy made the replica equal the disk" sh -c "test \"\$(dd if=/dev/mapper/pv iflag=direct bs=1M 2>/dev/null | sha256sum)\" = \"\$(sha256sum <$W/pv.img)\""
check_not "protecting it twice is refused" replctl protect /dev/vda --volume pv --target $ADDR \
	--config-dir $C --state-dir $W/source2 --keys $W/keys.toml --ca $W/pki/ca.pem \
	--cert $W/pki/source-host.pem --key $W/pki/source-host.key --no-start
check "mount /dev/mapper/pv" mount -t ext4 /dev/mapper/pv /mnt/v
check "the file is there" grep -q "the data stays" /mnt/v/keep.txt
check "umount" umount /mnt/v

step "boot: the table is gone, replctl activate re-creates it"
check "stop the daemon" sh -c "replctl status --state-dir $W/source >/dev/null && kill \$(pidof replicad | tr ' ' '\n' | grep -v $tpid)"
wait_for "the source daemon is gone" 30 sh -c "! replctl status --socket $W/source/replicad.sock >/dev/null 2>&1"
check "dmsetup remove pv (as after a reboot)" dmsetup remove pv
out=$(replctl activate --config-dir $C 2>&1) || fail "replctl activate: $out"
echo "$out"
check "the table is back" sh -c 'dmsetup table pv | grep -qE " replica [0-9]+:[0-9]+ pv "'
out=$(replctl activate --config-dir $C 2>&1) || fail "replctl activate again: $out"
check "activating twice changes nothing" sh -c "echo '$out' | grep -q 'already active'"
check "mount /dev/mapper/pv again" mount -t ext4 /dev/mapper/pv /mnt/v
check "the file is there" grep -q "the data stays" /mnt/v/keep.txt

step "unprotect"
replicad source --config $C/source-pv.toml 2>$W/source2.log &
wait_for "the source daemon runs again" 60 daemon_up $! $W/source/replicad.sock $W/source2.log
check_not "unprotect refuses while the volume is mounted" replctl unprotect pv --config-dir $C
check "umount" umount /mnt/v
out=$(replctl unprotect pv --config-dir $C 2>&1) || fail "replctl unprotect: $out"
echo "$out"
check_not "the table is gone" dm_exists pv
check_not "the activation entry is gone" test -e $C/protected/pv.toml
check_not "the configuration is gone" test -e $C/source-pv.toml
check_not "the state is gone" test -e $W/source
check "the disk itself holds the filesystem" mount -t ext4 /dev/vda /mnt/v
check "the file is there" grep -q "the data stays" /mnt/v/keep.txt
check "umount" umount /mnt/v
stop_daemons $tpid
check "rmmod dm_replica" rmmod dm_replica
