#!/usr/bin/env bash
# Benchmark of the initial full copy in one qemu guest: DRBD's full sync of
# a disk of random data to an empty peer against dm-replica's initial copy
# of the same disk (`replctl protect`), as a table of MiB/s and ratios.
# Everything runs in one guest over 127.0.0.1; see
# tests/vm/bench/sync-bench.sh for what is measured exactly.
#
#   scripts/bench-resync-vm.sh [--mib N] [--drbd "CONFIG..."] [--no-verify]
#                              [--accel tcg|kvm] [--cpu MODEL]
#   scripts/bench-resync-vm.sh --smoke     # 64 MiB: still finishes quickly
#
#   --mib N        size of the data disk in MiB (default 1024)
#   --drbd LIST    DRBD configurations, space separated, of default,
#                  rate-max, tuned (default: all three; "" for none)
#   --no-verify    do not compare each copy with the data afterwards
#   --cpu MODEL    the guest's qemu CPU model (default max,-avx2: software
#                  emulation runs AVX2 code several times slower than the
#                  SSE code of the same libraries, the reverse of hardware;
#                  dmr-cost shows the difference, see below)
#
# Before the copies, dmr-cost measures in the same guest what each per-byte
# stage of the data path costs on one core (memcpy, crc32c, chunk hash,
# segment seal and open, zstd, the daemons' TLS both ways); the table ends
# with the bound those costs put on any copy that seals, sends over TLS,
# receives and opens every byte (DRBD ships plaintext), and how close
# dm-replica came to it.
#
# DRBD is the kernel's own 8.4 driver built as an out-of-tree module against
# the test kernel (scripts/drbd.sh) with drbd-utils' 8.4 tools
# (drbdsetup-84, drbdmeta; scripts/setup.sh installs drbd-utils). When
# either cannot be had, the DRBD rows are skipped with the reason, loudly.
#
# Software emulation (tcg) inflates every CPU cost in the guest, so absolute
# numbers mean little; the ratio is what to compare. Prints the table;
# asserts nothing about the figures, but fails (non-zero, with the guest's
# reason and log) when the guest fails, hangs past its timeout, or a run
# printed no result.
set -euo pipefail

# shellcheck source=scripts/lib/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

mib=1024 drbd_configs="default rate-max tuned" verify=1 accel=tcg cpu=max,-avx2
while (($# > 0)); do
	case "$1" in
	--mib) mib=${2:?--mib needs a value}; shift 2 ;;
	--drbd) drbd_configs=${2?--drbd needs a value}; shift 2 ;;
	--no-verify) verify=0; shift ;;
	--accel) accel=${2:?--accel needs a value}; shift 2 ;;
	--cpu) cpu=${2:?--cpu needs a value}; shift 2 ;;
	--smoke) mib=64; shift ;;
	-h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
	*) die "unknown argument: $1" ;;
	esac
done
[[ "$mib" =~ ^[1-9][0-9]*$ ]] || die "--mib wants a whole number of MiB, got '$mib'"
for c in $drbd_configs; do
	case "$c" in
	default | rate-max | tuned) ;;
	*) die "unknown DRBD configuration '$c' (default, rate-max or tuned)" ;;
	esac
done

tree=$("$REPO_ROOT/scripts/kernel.sh")
ko=$("$REPO_ROOT/scripts/kmod.sh")
say "building static userspace tools"
build_static_tools

# DRBD: modules and the 8.4 tools, or a loud skip.
drbd_args=() drbd_skip=
if [[ -n "$drbd_configs" ]]; then
	drbdsetup84=/lib/drbd/drbdsetup-84
	drbdmeta=$(command -v drbdmeta || echo /sbin/drbdmeta)
	if [[ ! -x "$drbdsetup84" || ! -x "$drbdmeta" ]]; then
		drbd_skip="drbd-utils' 8.4 tools ($drbdsetup84, drbdmeta) are not installed: run scripts/setup.sh"
	elif ! mods=$("$REPO_ROOT/scripts/drbd.sh"); then
		drbd_skip="the DRBD modules could not be built against the test kernel (scripts/drbd.sh failed, see above)"
	else
		while IFS= read -r m; do drbd_args+=(--module "$m"); done <<<"$mods"
		drbd_args+=(--bin "$drbdsetup84" --bin "$drbdmeta")
	fi
	if [[ -n "$drbd_skip" ]]; then
		warn "DRBD SKIPPED: $drbd_skip"
		drbd_configs=
	fi
fi

out="$REPO_ROOT/out/bench/resync-vm"
mkdir -p "$out"
data="$out/random-data.img"
# The disk images (sparse, but the data and the copies are real: about four
# times --mib on the host) go when the run ends.
cleanup() { rm -f "$data" "$out"/disk*.img; }
trap cleanup EXIT
cleanup
say "writing $mib MiB of random data to $data"
head -c "$((mib * 1048576))" /dev/urandom >"$data"

nruns=$(($(wc -w <<<"$drbd_configs") + 1))
# At worst 1 MiB/s per run, copies verified, plus boot and set-up.
timeout=$((nruns * (mib + mib / 4) + 600))
start=$SECONDS
say "booting the benchmark guest ($mib MiB, DRBD: ${drbd_configs:-none}; timeout ${timeout}s; log $out/run.log)"
"$REPO_ROOT/scripts/vm.sh" --kernel "$tree/arch/x86/boot/bzImage" \
	--scenario "$REPO_ROOT/tests/vm/bench/sync-bench.sh" --name bench-resync-vm --workdir "$out" \
	--module "$ko" "${drbd_args[@]}" --bin "$rel/replicad" --bin "$rel/replctl" --bin "$rel/dmr-cost" --bin "$(command -v mkfs.ext4)" \
	--disk-file "$data" --disk "${mib}M" --disk 8M --disk "$((2 * mib + 256))M" \
	--mem 3072 --accel "$accel" --cpu "$cpu" --timeout "$timeout" \
	--env "BENCH_DRBD=$drbd_configs" --env "BENCH_VERIFY=$verify" >"$out/run.log" 2>&1 ||
	{ tail -n 40 "$out/run.log"; die "benchmark guest failed (log: $out/console.log)"; }
runtime=$((SECONDS - start))

python3 - "$out/console.log" "$accel" "$drbd_configs" "$drbd_skip" "$runtime" "$cpu" <<'PY'
import sys
log, accel, configs, skip, runtime, cpu = sys.argv[1:7]
runs, info, skips = {}, {}, []
for line in open(log, errors="replace"):
    line = line.rstrip("\r\n")
    if line.startswith("BENCH-SYNC "):
        f = line.split()
        extra = dict(kv.split("=", 1) for kv in f[5:] if "=" in kv)
        runs[(f[1], f[2])] = (int(f[3]), float(f[4]), extra)
    elif line.startswith("BENCH-INFO "):
        _, k, v = line.split(" ", 2)
        info[k] = v
    elif line.startswith("BENCH-SKIP "):
        skips.append(line.split(" ", 2)[1:])
want = [("drbd", c) for c in configs.split()] + [("dm-replica", "initial-copy")]
missing = [f"{s} {c}" for s, c in want if (s, c) not in runs]
if missing:
    sys.exit(f"bench-resync-vm: no result for: {', '.join(missing)} (log: {log})")
def mibs(r):
    return r[0] / 1048576 / r[1] if r[1] > 0 else float("inf")
ours = runs[("dm-replica", "initial-copy")]
size = ours[0] / 1048576
print(f"initial full sync of {size:.0f} MiB of random data to an empty peer, one qemu guest ({accel}, "
      f"CPU {cpu}, {info.get('cpus', '?')} CPUs), over 127.0.0.1")
label = {
    ("drbd", "default"): "DRBD, drbdsetup defaults (dynamic controller)",
    ("drbd", "rate-max"): "DRBD, fixed resync-rate at the maximum",
    ("drbd", "tuned"): "DRBD, rate max + max-buffers/max-epoch 8000",
    ("dm-replica", "initial-copy"): "dm-replica, replctl protect (file replica on ext4)",
}
print(f"{'run':<52} {'seconds':>8} {'MiB/s':>8} {'dm-replica/this':>16}")
for key in want:
    r = runs.get(key)
    if r is None:
        continue
    note = ""
    if key[0] == "dm-replica":
        note = f"  (whole protect call {float(r[2].get('protect_sec', 'nan')):.1f} s)"
    elif "drbd_says_sec" in r[2]:
        note = f"  (DRBD's log: {r[2]['drbd_says_sec']} s)"
    print(f"{label[key]:<52} {r[1]:>8.1f} {mibs(r):>8.1f} {mibs(ours) / mibs(r):>16.2f}{note}")
if skip:
    print(f"drbd: SKIPPED, no comparison: {skip}")
else:
    for s, why in skips:
        print(f"{s}: SKIPPED: {why}")
if "compared_chunks" in info:
    print(f"dm-replica's copy: {info.get('compared_chunks')} chunks compared, {info.get('sent_chunks')} sent, "
          f"{info.get('zero_chunks')} zero on both sides (not sent)")
if "cpu_busy_pct" in info:
    print(f"during protect: CPUs {info['cpu_busy_pct']}% busy; CPU seconds: source daemon "
          f"{info.get('source_cpu_sec', '?')}, target daemon {info.get('target_cpu_sec', '?')}")
cost = {}
for k, v in info.items():
    if k.startswith("cost_"):
        try:
            cost[k[5:]] = float(v)
        except ValueError:
            pass
if "cost_tls-suite" in info:
    print(f"TLS cipher suite: {info['cost_tls-suite']}")
if cost:
    print("one core of this guest, MiB/s: " + ", ".join(f"{k} {v:.0f}" for k, v in cost.items()))
    crypto = ["seal", "tls-send", "tls-receive", "open"]
    if all(cost.get(k, 0) > 0 for k in crypto):
        cpus = int(info.get("cpus", "1"))
        bound = cpus / sum(1 / cost[k] for k in crypto)
        print(f"bound of the crypto alone (segment seal, TLS out, TLS in, segment open: AES-256-GCM "
              f"four times) on {cpus} CPUs: {bound:.1f} MiB/s; dm-replica reached "
              f"{mibs(ours) / bound:.2f} of it (DRBD ships plaintext)")
if "drbd_version" in info:
    print(f"DRBD {info['drbd_version']} (the kernel's drivers/block/drbd as a module); goal: dm-replica/this >= 1")
print(f"benchmark run took {int(runtime)} s wall clock")
PY
