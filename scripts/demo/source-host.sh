#!/bin/sh
# The demo's protected host (a qemu guest): an ext4 filesystem with files
# on /dev/vda is protected with `replctl protect` (initial copy to the
# recovery host, with a progress bar), written while it replicates, and
# then failed over (planned) to the recovery host while an application
# keeps writing. Prints the checksum of every file whose write was
# acknowledged (DEMO-SUM lines, compared by scripts/demo.sh).
#
# vm-disks: (given by scripts/demo.sh)
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

say() { echo "DEMO: $*"; }

check "network 10.0.0.1" ifconfig eth0 10.0.0.1 netmask 255.255.255.0 up
check "loopback up" ifconfig lo 127.0.0.1 up
chmod 600 /etc/dm-replica/keys.toml

step "an existing filesystem with data (before protection)"
check "mkfs.ext4 /dev/vda" mkfs.ext4 -q -F -L db1 /dev/vda
mkdir -p /mnt/db1
check "mount" mount -t ext4 /dev/vda /mnt/db1
mkdir -p /mnt/db1/app
echo "hello from the protected site" >/mnt/db1/hello.txt
dd if=/dev/urandom of=/mnt/db1/app/blob.bin bs=1M count=8 2>/dev/null
seq 1 20000 | sed 's/^/order /' >/mnt/db1/app/orders.log
check "umount (protection puts /dev/mapper/db1 in front of the disk)" umount /mnt/db1
say "/dev/vda holds ext4 with hello.txt, app/blob.bin (8 MiB), app/orders.log"

step "protect /dev/vda: replica table, replicad source, initial copy"
insmod "$(module_path dm_replica)" || fail "insmod dm_replica"
wait_for "the recovery host answers" 120 sh -c 'ping -c 1 -W 1 10.0.0.2 >/dev/null'
check "replctl protect" sh -c "set -o pipefail; replctl protect /dev/vda --volume db1 --target 10.0.0.2:7700 \
	--target-name target-host --config-dir /etc/dm-replica --state-dir /var/lib/replicad/db1 \
	--ca /etc/dm-replica/pki/ca.pem --cert /etc/dm-replica/pki/source-host.pem \
	--key /etc/dm-replica/pki/source-host.key --spawn 2>/tmp/protect.err | sed 's/^/DEMO: /'"
replctl status --state-dir /var/lib/replicad/db1 | sed 's/^/DEMO: status: /'

step "use the protected volume while it replicates"
check "mount /dev/mapper/db1" mount -t ext4 /dev/mapper/db1 /mnt/db1
echo "written after protection started" >/mnt/db1/late.txt
rm /mnt/db1/app/orders.log
check "sync" sync
: >/tmp/acked
# The application: each record file is written and fsynced; only then is it
# counted as acknowledged.
(
	i=0
	while :; do
		i=$((i + 1))
		f=app/record-$i.bin
		dd if=/dev/urandom of=/mnt/db1/$f bs=4k count=$((1 + i % 8)) conv=fsync 2>/dev/null || exit 0
		echo "DEMO-SUM ./$f $(sha256sum </mnt/db1/$f | cut -d' ' -f1)" >>/tmp/acked
	done
) &
app=$!
wait_for "the application has written 40 records" 300 sh -c 'test $(wc -l </tmp/acked) -ge 40'
replctl status --state-dir /var/lib/replicad/db1 | sed 's/^/DEMO: status: /'

step "planned failover while the application writes"
for f in ./hello.txt ./late.txt ./app/blob.bin; do
	echo "DEMO-SUM $f $(sha256sum </mnt/db1/$f | cut -d' ' -f1)" >>/tmp/acked
done
check "replctl failover --planned" sh -c "set -o pipefail; replctl failover --planned --state-dir /var/lib/replicad/db1 | sed 's/^/DEMO: /'"
check "the failover completed" sh -c "grep -q demoted /var/lib/replicad/db1/role.json"
wait_for "the application got an I/O error instead of hanging" 60 sh -c "! kill -0 $app 2>/dev/null"
say "the application wrote $(wc -l </tmp/acked) acknowledged files before the failover stopped it"
check "this volume is fenced (error table)" sh -c 'dmsetup table db1 | grep -q " error"'
umount -l /mnt/db1
# What the application was told is on disk (checksums taken after each
# fsync returned).
cat /tmp/acked
say "protected host done"
