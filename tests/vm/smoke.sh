#!/bin/sh
# Smoke test of dm_replica.ko: the `replica` target's table and I/O path.
#
# Loads the module; checks that bad table lines (every argument, and group
# conflicts) are rejected with a clear error and leave nothing behind, and
# that groups come and go with their targets; creates a replica over a
# virtio disk;
# writes known patterns through it with O_DIRECT and reads them back through
# the target and directly from the disk; checks sector mapping at the end of
# the disk and for a target that does not start at sector 0; passes a discard
# through; removes the target and unloads the module, twice.
#
# vm-disks: 64M 8M
# shellcheck source=tests/vm/lib.sh
. /lib/vmtest/lib.sh
set -u

DATA=/dev/vda
OTHER=/dev/vdb
MOD=$(module_path dm_replica)
MIB=1048576

sectors=$(cat /sys/block/vda/size)
devnum=$(cat /sys/block/vda/dev)
bytes=$((sectors * 512))
check "data disk present ($sectors sectors)" test "$sectors" -gt 0

step "load the module"
check "insmod dm_replica" insmod "$MOD"
check "module listed" grep -q '^dm_replica ' /proc/modules
check "target type 'replica' registered" sh -c 'dmsetup targets | grep -q "^replica "'
check_eq "module unused" 0 "$(cat /sys/module/dm_replica/refcnt)"

step "bad table lines are rejected"
# reject DESCRIPTION TABLE EXPECTED_KERNEL_LOG_TEXT
reject() {
	clear_kernel_log
	check_not "$1: dmsetup create fails" dmsetup create bad --table "$2"
	check_not "$1: no device left behind" dm_exists bad
	check_not "$1: no /dev/mapper node" test -e /dev/mapper/bad
	check "$1: kernel log says '$3'" kernel_log_has "$3"
}
reject "no data device" "0 $sectors replica" "replica: Missing argument"
reject "no volume id" "0 $sectors replica $DATA" "missing argument <volume_id>"
reject "nonexistent device" "0 $sectors replica /dev/nonexistent v0" \
	"replica: Cannot open data device"
reject "nonexistent device (detail)" "0 $sectors replica /dev/nonexistent v0" \
	"cannot open data device '/dev/nonexistent'"
reject "extra argument" "0 $sectors replica $DATA v0 extra" "replica: Too many arguments"
reject "unknown option" "0 $sectors replica $DATA v0 foo=4" "unknown option 'foo=4'"
reject "bad volume id" "0 $sectors replica $DATA v/0" "invalid volume id 'v/0'"
reject "bad group name" "0 $sectors replica $DATA v0 group=" "invalid group name 'group='"
reject "ring size not a power of two" "0 $sectors replica $DATA v0 ring_mib=3" \
	"invalid value in 'ring_mib=3': a power of two from 1 to 4096"
reject "ring size too large" "0 $sectors replica $DATA v0 ring_mib=8192" "invalid value in 'ring_mib=8192'"
reject "region too small" "0 $sectors replica $DATA v0 region_kib=2" "invalid value in 'region_kib=2'"
reject "wait too long" "0 $sectors replica $DATA v0 overflow_wait_ms=10001" \
	"invalid value in 'overflow_wait_ms=10001'"
reject "not a number" "0 $sectors replica $DATA v0 overflow_wait_ms=1x" "invalid value in 'overflow_wait_ms=1x'"
reject "option twice" "0 $sectors replica $DATA v0 region_kib=64 region_kib=64" \
	"option 'region_kib=64' given twice"
reject "target longer than the disk" "0 $((sectors + 8)) replica $DATA v0" \
	"too small for target"
check_not "no ring left behind by rejected tables" dmr-ring volumes --group v0

step "groups: conflicting tables are rejected, nothing leaks"
check "dmsetup create ga (group g, 4 MiB ring)" \
	dmsetup create ga --table "0 2048 replica $OTHER va group=g ring_mib=4"
reject "same group, other ring size" "0 $sectors replica $DATA vb group=g ring_mib=8" \
	"group g has a 4 MiB ring, the table asks for 8 MiB"
reject "volume id already in another group" "0 $sectors replica $DATA va group=h" \
	"volume va is already protected in group g"
reject "same volume id, other device" "0 $sectors replica $DATA va group=g" \
	"already registered with another data device"
check "second volume joins group g" dmsetup create gb --table "0 2048 replica $DATA vb group=g"
check "group g lists both volumes" sh -c 'dmr-ring volumes --group g | grep -q "id=va" && dmr-ring volumes --group g | grep -q "id=vb"'
check "dmsetup remove ga gb" dmsetup remove ga gb
check_not "group g is gone with its last target" dmr-ring volumes --group g
check_eq "failed constructors hold no module reference" 0 \
	"$(cat /sys/module/dm_replica/refcnt)"

step "create a replica over $DATA"
check "dmsetup create r0" dmsetup create r0 --table "0 $sectors replica $DATA vol0"
check "/dev/mapper/r0 exists" test -b /dev/mapper/r0
check_eq "table reads back with the device number" \
	"0 $sectors replica $devnum vol0 group=vol0 ring_mib=64 region_kib=64 overflow_wait_ms=100" \
	"$(dmsetup table r0)"
check_eq "size" "$sectors" "$(blockdev --getsz /dev/mapper/r0)"
check_eq "logical block size stacked from the disk" \
	"$(blockdev --getss $DATA)" "$(blockdev --getss /dev/mapper/r0)"
dmname=dm-$(dmsetup info -c --noheadings -o minor r0 | tr -d ' ')
check "r0 is $dmname in sysfs" test -d "/sys/block/$dmname"
check "discard limits stacked from the disk" \
	test "$(cat "/sys/block/$dmname/queue/discard_max_bytes")" -gt 0
check_not "module cannot be unloaded while in use" rmmod dm_replica

step "write through the target, read back through both"
check "write pattern 1 over the whole target" dio write /dev/mapper/r0 0 $bytes 1
check "read back through the target" dio verify /dev/mapper/r0 0 $bytes 1
check "read back from the disk directly" dio verify $DATA 0 $bytes 1
check "target and disk contents identical" sh -c \
	"dd if=/dev/mapper/r0 iflag=direct bs=1M 2>/dev/null | cmp - $DATA"
check "odd-sized write at sector 12345" dio write /dev/mapper/r0 $((12345 * 512)) 1536 2
check "  lands at sector 12345 of the disk" dio verify $DATA $((12345 * 512)) 1536 2
check "  neighbours untouched" dio verify $DATA $((12344 * 512)) 512 1
check "  neighbours untouched" dio verify $DATA $((12348 * 512)) 512 1
check "write to the last sector" dio write /dev/mapper/r0 $((bytes - 512)) 512 3
check "  lands on the last sector of the disk" dio verify $DATA $((bytes - 512)) 512 3
check "write below the target" dio write $DATA $MIB $((64 * 1024)) 4
check "  is read through the target" dio verify /dev/mapper/r0 $MIB $((64 * 1024)) 4

step "discard passes through"
check "blkdiscard 1 MiB at 2 MiB" blkdiscard -o $((2 * MIB)) -l $MIB /dev/mapper/r0
check "  range reads as zeroes on the disk" dio zero $DATA $((2 * MIB)) $MIB
check "  data around it untouched" dio verify $DATA $((3 * MIB)) $MIB 1

step "a replica target that starts at sector 2048 of its device"
printf '0 2048 linear %s 0\n2048 %s replica %s vol1\n' $OTHER "$sectors" $DATA >/tmp/table
check "dmsetup create r1 (linear + replica)" dmsetup create r1 /tmp/table
check_eq "size" $((2048 + sectors)) "$(blockdev --getsz /dev/mapper/r1)"
check "write across the boundary between the targets" \
	dio write /dev/mapper/r1 $((2040 * 512)) $((16 * 512)) 5
check "  first half on $OTHER" dio verify $OTHER $((2040 * 512)) 4096 5 $((2040 * 512))
check "  second half at sector 0 of $DATA" dio verify $DATA 0 4096 5 $((2048 * 512))
check "write 4 MiB at 1 MiB into the replica part" \
	dio write /dev/mapper/r1 $(((2048 * 512) + MIB)) $((4 * MIB)) 6 0
check "  lands at 1 MiB of $DATA" dio verify $DATA $MIB $((4 * MIB)) 6 0
check "dmsetup remove r1" dmsetup remove r1

step "remove and unload"
check "dmsetup remove r0" dmsetup remove r0
check_not "r0 gone" dm_exists r0
check_eq "module unused again" 0 "$(cat /sys/module/dm_replica/refcnt)"
check "rmmod dm_replica" rmmod dm_replica
check_not "module gone" grep -q '^dm_replica ' /proc/modules
check_not "target type gone" sh -c 'dmsetup targets | grep -q "^replica "'

step "load, use and unload a second time"
check "insmod again" insmod "$MOD"
check "dmsetup create r2" dmsetup create r2 --table "0 $sectors replica $DATA vol2"
check "data from before is still there" dio verify /dev/mapper/r2 $MIB $((4 * MIB)) 6 0
check "dmsetup remove r2" dmsetup remove r2
check "rmmod again" rmmod dm_replica
echo "smoke: all checks passed"
