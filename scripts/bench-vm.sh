#!/usr/bin/env bash
# Benchmark of the write path in a qemu guest: fio on dm-linear vs the
# `replica` target over the same virtio disk, alternating in one run, as a
# table of ratios (throughput and p99 completion latency). Sequential 1 MiB
# and random 4 KiB writes at queue depth 1 and 32. The replica is measured
# with a consumer that only releases records (the capture path alone) and
# with replicad source shipping to replicad target in the same guest.
#
#   scripts/bench-vm.sh [--runtime SECONDS] [--rounds N] [--accel tcg|kvm]
#   scripts/bench-vm.sh --smoke     # 1 round of 1 s runs: it still finishes
#
# Software emulation (tcg) inflates every CPU cost in the guest (the copy
# into the ring, zstd, AES-GCM), so absolute numbers mean little; the ratios
# are what to compare. Prints the table; asserts nothing about the figures,
# but fails (non-zero, with the guest's reason and log) when the guest
# fails, hangs past its timeout, or a run printed no result.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

runtime=6 rounds=2 accel=tcg
while (($# > 0)); do
	case "$1" in
	--runtime) runtime=${2:?}; shift 2 ;;
	--rounds) rounds=${2:?}; shift 2 ;;
	--accel) accel=${2:?}; shift 2 ;;
	--smoke) runtime=1 rounds=1; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done

tree=$("$REPO_ROOT/scripts/kernel.sh")
ko=$("$REPO_ROOT/scripts/kmod.sh")
say "building static userspace tools"
build_static_tools
out="$REPO_ROOT/out/bench/vm"
mkdir -p "$out"
"$REPO_ROOT/scripts/vm.sh" --kernel "$tree/arch/x86/boot/bzImage" \
	--scenario "$REPO_ROOT/tests/vm/bench/fio-bench.sh" --name bench-vm --workdir "$out" \
	--module "$ko" --bin "$rel/replicad" --bin "$rel/replctl" --bin "$rel/dmr-ring" --bin "$FIO" \
	--disk 320M --mem 2048 --accel "$accel" --timeout $((rounds * 12 * (runtime + 12) + 300)) \
	--env "BENCH_RUNTIME=$runtime" --env "BENCH_ROUNDS=$rounds" >"$out/run.log" 2>&1 ||
	{ tail -n 40 "$out/run.log"; die "benchmark guest failed (log: $out/console.log)"; }

python3 - "$out/console.log" "$accel" <<'PY'
import json, sys, statistics
runs = {}
overflowed = {}
for line in open(sys.argv[1], errors="replace"):
    if line.startswith("BENCH-STATUS "):
        _, cfg, wl, rnd, st = line.split()
        if st == "overflow=1":
            overflowed[(wl, cfg)] = overflowed.get((wl, cfg), 0) + 1
        continue
    if not line.startswith("BENCH-JSON "):
        continue
    _, cfg, wl, rnd, js = line.rstrip("\r\n").split(" ", 4)
    j = json.loads(js)["jobs"][0]["write"]
    p99 = j["clat_ns"]["percentile"].get("99.000000", 0) / 1000.0
    runs.setdefault((wl, cfg), []).append((j["bw"] / 1024.0, j["iops"], p99))
wls = ["seq1m-qd1", "seq1m-qd32", "rand4k-qd1", "rand4k-qd32"]
missing = [f"{wl} {cfg}" for wl in wls for cfg in ["linear", "replica-drain", "replica-ship"] if (wl, cfg) not in runs]
if missing:
    sys.exit(f"bench-vm: no fio result for: {', '.join(missing)} (log: {sys.argv[1]})")
print(f"fio in a qemu guest ({sys.argv[2]}), linear vs replica on the same disk, median of rounds")
print(f"{'workload':<12} {'config':<14} {'MiB/s':>8} {'IOPS':>8} {'p99 us':>9} {'tput ratio':>10} {'p99 ratio':>10}  note")
for wl in wls:
    base = runs.get((wl, "linear"))
    if not base:
        continue
    bmib = statistics.median(r[0] for r in base)
    bp99 = statistics.median(r[2] for r in base)
    for cfg in ["linear", "replica-drain", "replica-ship"]:
        rs = runs.get((wl, cfg))
        if not rs:
            continue
        mib = statistics.median(r[0] for r in rs)
        iops = statistics.median(r[1] for r in rs)
        p99 = statistics.median(r[2] for r in rs)
        n = overflowed.get((wl, cfg), 0)
        note = f"ring overflowed in {n} of {len(rs)} rounds" if n else ""
        print(f"{wl:<12} {cfg:<14} {mib:>8.1f} {iops:>8.0f} {p99:>9.0f} {mib / bmib:>10.2f} {p99 / bp99 if bp99 else 0:>10.2f}  {note}".rstrip())
print("goal: replica-drain >= 0.97x throughput and <= 1.05x p99 of linear")
if overflowed:
    print("a ring that overflowed stopped capturing after the bounded wait (writes went to the")
    print("dirty bitmap): those rounds did not measure the capture path to the end")
PY
