#!/bin/sh
# The demo's recovery host (a qemu guest): runs `replicad target` with the
# replica as a thin volume in a dm-thin pool on its own disks (recovery
# points are thin snapshots), shows what it receives, and once the volume
# has been failed over to it, mounts the new primary and lists the files
# with their checksums (DEMO-SUM lines, compared by scripts/demo.sh).
#
# vm-disks: (given by scripts/demo.sh)
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

say() { echo "DEMO: $*"; }

check "network 10.0.0.2" ifconfig eth0 10.0.0.2 netmask 255.255.255.0 up
check "loopback up" ifconfig lo 127.0.0.1 up
# The pool: data on /dev/vda, metadata on /dev/vdb (new, zeroed disks);
# error_if_no_space so a full pool fails writes instead of hanging them.
check "thin pool (error_if_no_space)" dmsetup create pool --table \
	"0 $(cat /sys/block/vda/size) thin-pool /dev/vdb /dev/vda 128 0 1 error_if_no_space"
mkdir -p /srv /etc/dm-replica
cat >/etc/dm-replica/target.toml <<CFG
listen = "10.0.0.2:7700"
keys = "/etc/dm-replica/keys.toml"
state_dir = "/srv/state"
[tls]
ca = "/etc/dm-replica/pki/ca.pem"
cert = "/etc/dm-replica/pki/target-host.pem"
key = "/etc/dm-replica/pki/target-host.key"
[[volume]]
id = "db1"
size = $VOLUME_SIZE
allowed_sources = ["source-host"]
keep_points = 2
replica = { backend = "thin", pool = "pool", name = "db1-replica" }
CFG
chmod 600 /etc/dm-replica/keys.toml
replicad target --config /etc/dm-replica/target.toml 2>/srv/target.log &
tpid=$!
wait_for "replicad target listening on 10.0.0.2:7700" 60 test -s /srv/state/listen.addr
say "recovery host ready: waiting for the protected site"

# Report what arrives until the volume is failed over to this host.
deadline=$(($(date +%s) + ${DEMO_TIMEOUT:-1500}))
last=0
while ! replctl status --state-dir /srv/state --json 2>/dev/null | grep -q '"role": "Primary"'; do
	[ "$(date +%s)" -lt "$deadline" ] || fail "the volume was not failed over to this host in time"
	now=$(date +%s)
	if [ $((now - last)) -ge 20 ]; then
		replctl status --state-dir /srv/state 2>/dev/null | sed 's/^/DEMO: status: /'
		last=$now
	fi
	sleep 1
done

say "the volume was failed over to this host:"
replctl status --state-dir /srv/state | sed 's/^/DEMO: status: /'
replctl points --state-dir /srv/state --volume db1 | sed 's/^/DEMO: points: /'
kill $tpid
wait $tpid
dmsetup ls | sed 's/^/DEMO: dmsetup ls: /'
mkdir -p /mnt/db1
check "mount the new primary, /dev/mapper/db1-replica (the filesystem replays its journal)" \
	mount -t ext4 /dev/mapper/db1-replica /mnt/db1
say "files on the new primary:"
ls -l /mnt/db1 /mnt/db1/app 2>/dev/null | sed 's/^/DEMO: ls: /' | head -n 40
(cd /mnt/db1 && find . -type f | sort | while read -r f; do
	echo "DEMO-SUM $f $(sha256sum <"$f" | cut -d' ' -f1)"
done)
check "umount" umount /mnt/db1
check "e2fsck -fn: the filesystem is clean" e2fsck -fn /dev/mapper/db1-replica
say "recovery host done"
