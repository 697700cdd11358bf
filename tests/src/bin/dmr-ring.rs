//! `dmr-ring`: a ring consumer for the VM tests of `dm_replica.ko`.
//!
//! It attaches to a group's ring through `/dev/dm-replica`, drains it in
//! order, replays every committed record onto image files (one per volume
//! index) and releases the records, exactly as the daemon would but without
//! shipping anything. The tests then compare the replayed image with the
//! protected disk byte for byte. Writes of a volume without an image are
//! released without reading their payload.
//!
//! ```text
//! dmr-ring drain --group G --image 0:/dev/vdb [--until-marker ID | --until-empty]
//!                [--log FILE] [--check-order] [--expect-failed N]
//! dmr-ring bitmap --group G [--volume N]
//! dmr-ring volumes --group G
//! ```
//!
//! `drain` stops after applying marker `ID` (insert it with `dmsetup
//! message <dev> 0 marker ID` once the workload finished), or, with
//! `--until-empty`, as soon as nothing more is published, or when the ring
//! dies (its last target removed) and is drained. It prints a summary line
//! `drained records=.. writes=.. bytes=.. flushes=.. failed=.. markers=..`.
//! `--check-order` verifies that no record completed before an earlier
//! record was submitted (the ring is in submission order). FAILED records
//! are never applied; their extents are printed as `failed <vol> <sector>
//! <len>`.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use replica_ring::device::{Device, DeviceRelease, CONTROL_DEVICE};
use replica_ring::{Consumer, Peek};

#[derive(Parser)]
#[command(about = "Ring consumer for the dm_replica VM tests")]
struct Cli {
    /// Control device.
    #[arg(long, default_value = CONTROL_DEVICE)]
    device: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Drain the ring, replaying records onto images.
    Drain {
        /// Group whose ring to drain.
        #[arg(long)]
        group: String,
        /// `INDEX:PATH`: replay volume INDEX onto PATH (repeatable).
        #[arg(long = "image", value_parser = parse_image)]
        images: Vec<(u32, PathBuf)>,
        /// Stop after applying this marker id.
        #[arg(long, conflicts_with = "until_empty")]
        until_marker: Option<u64>,
        /// Stop when nothing more is published.
        #[arg(long)]
        until_empty: bool,
        /// Write one line per record to this file.
        #[arg(long)]
        log: Option<PathBuf>,
        /// Verify the ring's order against completion times.
        #[arg(long)]
        check_order: bool,
        /// Give up after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Read and clear a volume's dirty bitmap (ends overflow).
    Bitmap {
        #[arg(long)]
        group: String,
        #[arg(long, default_value_t = 0)]
        volume: u32,
    },
    /// List the group's volumes.
    Volumes {
        #[arg(long)]
        group: String,
    },
    /// Try every misuse of the control device; each must be refused with
    /// the right error and change nothing.
    Misuse {
        #[arg(long)]
        group: String,
    },
}

fn parse_image(s: &str) -> Result<(u32, PathBuf), String> {
    let (i, p) = s.split_once(':').ok_or("expected INDEX:PATH")?;
    Ok((i.parse().map_err(|e| format!("index: {e}"))?, PathBuf::from(p)))
}

fn attach(device: &Path, group: &str) -> Result<Consumer<DeviceRelease>, String> {
    Device::open(device)
        .and_then(|d| d.attach(group))
        .map_err(|e| format!("attach to group {group}: {e}"))
}

/// Prints ranges of set regions compactly: `0-15,40,42-43`.
fn ranges(regions: impl Iterator<Item = u64>) -> String {
    let mut out = String::new();
    let mut run: Option<(u64, u64)> = None;
    let flush = |out: &mut String, (a, b): (u64, u64)| {
        if !out.is_empty() {
            out.push(',');
        }
        if a == b {
            out.push_str(&a.to_string());
        } else {
            out.push_str(&format!("{a}-{b}"));
        }
    };
    for r in regions {
        run = match run {
            Some((a, b)) if b + 1 == r => Some((a, r)),
            Some(prev) => {
                flush(&mut out, prev);
                Some((r, r))
            }
            None => Some((r, r)),
        };
    }
    if let Some(prev) = run {
        flush(&mut out, prev);
    }
    if out.is_empty() {
        out.push('-');
    }
    out
}

#[derive(Default)]
struct Counts {
    records: u64,
    writes: u64,
    bytes: u64,
    flushes: u64,
    discards: u64,
    zeroes: u64,
    failed: u64,
    markers: u64,
}

#[allow(clippy::too_many_arguments)]
fn drain(
    device: &Path,
    group: &str,
    images: &[(u32, PathBuf)],
    until_marker: Option<u64>,
    until_empty: bool,
    log: Option<&Path>,
    check_order: bool,
    timeout: Duration,
) -> Result<(), String> {
    let mut c = attach(device, group)?;
    let mut files: HashMap<u32, File> = HashMap::new();
    for (i, p) in images {
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(p)
            .map_err(|e| format!("open image {}: {e}", p.display()))?;
        files.insert(*i, f);
    }
    let mut log = match log {
        Some(p) => Some(std::io::BufWriter::new(
            File::create(p).map_err(|e| format!("create {}: {e}", p.display()))?,
        )),
        None => None,
    };
    let deadline = Instant::now() + timeout;
    let mut n = Counts::default();
    let mut payload = Vec::new();
    let zeroes = vec![0u8; 1 << 20];
    let mut max_submit: u64 = 0;
    let mut max_submit_seq: u64 = 0;
    let mut unreleased = 0u32;
    loop {
        let peek = c.peek().map_err(|e| format!("ring: {e}"))?;
        let (rec, ok) = match peek {
            Peek::Committed(r) => (r, true),
            Peek::Failed(r) => (r, false),
            Peek::Pending | Peek::Empty => {
                if unreleased > 0 {
                    c.release(c.next_seq()).map_err(|e| format!("release: {e}"))?;
                    unreleased = 0;
                }
                let idle = peek == Peek::Empty && c.producer_seq() == c.next_seq();
                if idle && (until_empty || c.is_dead()) {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(format!(
                        "timed out at seq {} (producer at {}, {:?})",
                        c.next_seq(),
                        c.producer_seq(),
                        peek
                    ));
                }
                c.wait(Duration::from_millis(100))
                    .map_err(|e| format!("wait: {e}"))?;
                continue;
            }
        };
        let d = rec.desc;
        n.records += 1;
        if let Some(l) = log.as_mut() {
            writeln!(
                l,
                "{} op={} vol={} sector={} len={} flags={} submit={} complete={} state={}",
                rec.seq,
                d.op,
                d.volume,
                d.sector,
                d.len,
                d.flags,
                d.submit_ns,
                d.complete_ns,
                if ok { "committed" } else { "failed" }
            )
            .map_err(|e| format!("log: {e}"))?;
        }
        if check_order {
            // The ring is in submission order: a record cannot have
            // completed before an earlier record was submitted.
            if d.complete_ns < max_submit {
                return Err(format!(
                    "order violated: record {} completed at {} before record {} was submitted at {}",
                    rec.seq, d.complete_ns, max_submit_seq, max_submit
                ));
            }
            if d.submit_ns > max_submit {
                max_submit = d.submit_ns;
                max_submit_seq = rec.seq;
            }
            if d.complete_ns < d.submit_ns {
                return Err(format!("record {} completed before it was submitted", rec.seq));
            }
        }
        let offset = d.sector * 512;
        if !ok {
            n.failed += 1;
            println!("failed {} {} {}", d.volume, d.sector, d.len);
        } else {
            match d.op {
                ring_abi::OP_WRITE => {
                    // Without an image for the volume the payload is not
                    // read at all (the benchmark's releasing-only consumer).
                    if let Some(f) = files.get(&d.volume) {
                        c.read_payload(&rec, &mut payload)
                            .map_err(|e| format!("payload of {}: {e}", rec.seq))?;
                        f.write_all_at(&payload, offset)
                            .map_err(|e| format!("apply {}: {e}", rec.seq))?;
                    }
                    n.writes += 1;
                    n.bytes += u64::from(d.len);
                }
                ring_abi::OP_DISCARD | ring_abi::OP_WRITE_ZEROES => {
                    if let Some(f) = files.get(&d.volume) {
                        let mut left = u64::from(d.len);
                        let mut at = offset;
                        while left > 0 {
                            let k = left.min(zeroes.len() as u64) as usize;
                            f.write_all_at(&zeroes[..k], at)
                                .map_err(|e| format!("apply {}: {e}", rec.seq))?;
                            left -= k as u64;
                            at += k as u64;
                        }
                    }
                    if d.op == ring_abi::OP_DISCARD {
                        n.discards += 1;
                    } else {
                        n.zeroes += 1;
                    }
                }
                ring_abi::OP_FLUSH => n.flushes += 1,
                ring_abi::OP_MARKER => n.markers += 1,
                op => return Err(format!("record {} has unknown op {op}", rec.seq)),
            }
        }
        c.advance(&rec);
        unreleased += 1;
        if unreleased >= 64 {
            c.release(c.next_seq()).map_err(|e| format!("release: {e}"))?;
            unreleased = 0;
        }
        if ok && d.op == ring_abi::OP_MARKER && Some(d.aux) == until_marker {
            break;
        }
    }
    c.release(c.next_seq()).map_err(|e| format!("release: {e}"))?;
    for f in files.values() {
        f.sync_all().map_err(|e| format!("sync image: {e}"))?;
    }
    if let Some(mut l) = log {
        l.flush().map_err(|e| format!("log: {e}"))?;
    }
    println!(
        "drained records={} writes={} bytes={} flushes={} discards={} zeroes={} failed={} markers={} next_seq={} dirty_regions={} overflow={}",
        n.records,
        n.writes,
        n.bytes,
        n.flushes,
        n.discards,
        n.zeroes,
        n.failed,
        n.markers,
        c.next_seq(),
        c.dirty_regions(),
        u8::from(c.overflowing())
    );
    Ok(())
}

/// Runs an ioctl with a raw argument and returns its errno (0 on success).
fn raw_ioctl<T>(fd: i32, cmd: u32, arg: &mut T) -> i32 {
    // SAFETY: `arg` is a valid, exclusively borrowed `T` for the call; the
    // kernel accesses at most the size encoded in `cmd`, which the callers
    // pair with the right type (or deliberately with a smaller buffer the
    // kernel must refuse to overrun, see `misuse`).
    let r = unsafe { libc::ioctl(fd, cmd as libc::c_ulong, arg as *mut T) };
    if r < 0 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
    } else {
        0
    }
}

fn misuse(device: &Path, group: &str) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    let mut failures = Vec::new();
    let mut expect = |what: &str, got: i32, want: i32| {
        if got == want {
            println!("misuse: {what}: refused with errno {got} as expected");
        } else {
            failures.push(format!("{what}: got errno {got}, want {want}"));
        }
    };
    // Before attaching: nothing but attach works.
    let dev = Device::open(device).map_err(|e| e.to_string())?;
    let fd = dev.as_raw_fd();
    let mut rel = ring_abi::ReleaseArg { new_cons_seq: 1 };
    expect("release before attach", raw_ioctl(fd, ring_abi::IOC_RELEASE, &mut rel), libc::ENOTCONN);
    // SAFETY: mapping a file descriptor read-only at a kernel-chosen address.
    let m = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    expect(
        "mmap before attach",
        if m == libc::MAP_FAILED { std::io::Error::last_os_error().raw_os_error().unwrap_or(-1) } else { 0 },
        libc::ENOTCONN,
    );
    let mut bad = ring_abi::AttachArg { group: [0; ring_abi::GROUP_NAME_LEN], map_size: 0, generation: [0; 16] };
    bad.group[..5].copy_from_slice(b"no/pe");
    expect("attach with an invalid name", raw_ioctl(fd, ring_abi::IOC_ATTACH, &mut bad), libc::EINVAL);
    bad.group = [0; ring_abi::GROUP_NAME_LEN];
    bad.group[..7].copy_from_slice(b"nothere");
    expect("attach to a missing group", raw_ioctl(fd, ring_abi::IOC_ATTACH, &mut bad), libc::ENOENT);
    let mut unknown = [0u8; 8];
    expect("unknown ioctl", raw_ioctl(fd, ring_abi::ioc(1, ring_abi::IOC_TYPE, 99, 8), &mut unknown), libc::ENOTTY);

    let c = dev.attach(group).map_err(|e| format!("attach: {e}"))?;
    let dev = c.releaser().device().clone();
    let fd = dev.as_raw_fd();
    let prod = c.producer_seq();
    let cons = c.released_seq();
    let mut again = ring_abi::AttachArg { group: [0; ring_abi::GROUP_NAME_LEN], map_size: 0, generation: [0; 16] };
    again.group[..group.len()].copy_from_slice(group.as_bytes());
    expect("second attach on the same file", raw_ioctl(fd, ring_abi::IOC_ATTACH, &mut again), libc::EISCONN);
    let mut rel = ring_abi::ReleaseArg { new_cons_seq: prod.wrapping_add(1) };
    expect("release past the producer", raw_ioctl(fd, ring_abi::IOC_RELEASE, &mut rel), libc::EINVAL);
    let mut rel = ring_abi::ReleaseArg { new_cons_seq: cons.wrapping_sub(1) };
    expect("release backwards", raw_ioctl(fd, ring_abi::IOC_RELEASE, &mut rel), libc::EINVAL);
    let mut vol = ring_abi::VolumeArg { index: 99, region_kib: 0, sectors: 0, regions: 0, dirty_regions: 0, id: [0; ring_abi::GROUP_NAME_LEN] };
    expect("describe a missing volume", raw_ioctl(fd, ring_abi::IOC_VOLUME, &mut vol), libc::ENOENT);
    let mut small = [0u64; 1];
    let mut bm = ring_abi::BitmapArg { buf: small.as_mut_ptr() as u64, buf_len: 0, volume: 0, region_kib: 0, regions: 0, resume_seq: 0, in_flight_overflow: 0 };
    expect("bitmap into a too small buffer", raw_ioctl(fd, ring_abi::IOC_BITMAP, &mut bm), libc::EMSGSIZE);
    let mut bm = ring_abi::BitmapArg { buf: 8, buf_len: 1 << 20, volume: 0, region_kib: 0, regions: 0, resume_seq: 0, in_flight_overflow: 0 };
    expect("bitmap into an unmapped address", raw_ioctl(fd, ring_abi::IOC_BITMAP, &mut bm), libc::EFAULT);
    let size = c.mapping().geometry().total_size as usize;
    for (what, prot, off, len, want) in [
        ("writable mmap", libc::PROT_READ | libc::PROT_WRITE, 0, 4096, libc::EPERM),
        ("mmap at an offset", libc::PROT_READ, 4096, 4096, libc::EINVAL),
        ("mmap larger than the ring", libc::PROT_READ, 0, size + 4096, libc::EINVAL),
    ] {
        // SAFETY: a new shared mapping at a kernel-chosen address.
        let m = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, off) };
        let errno = if m == libc::MAP_FAILED {
            std::io::Error::last_os_error().raw_os_error().unwrap_or(-1)
        } else {
            // SAFETY: unmapping what was just mapped.
            unsafe { libc::munmap(m, len) };
            0
        };
        expect(what, errno, want);
    }
    // A read-only mapping cannot be made writable afterwards.
    // SAFETY: a new read-only shared mapping at a kernel-chosen address.
    let m = unsafe { libc::mmap(std::ptr::null_mut(), 4096, libc::PROT_READ, libc::MAP_SHARED, fd, 0) };
    if m == libc::MAP_FAILED {
        failures.push("read-only mmap failed".into());
    } else {
        // SAFETY: changing the protection of our own mapping.
        let r = unsafe { libc::mprotect(m, 4096, libc::PROT_READ | libc::PROT_WRITE) };
        let errno = if r < 0 { std::io::Error::last_os_error().raw_os_error().unwrap_or(-1) } else { 0 };
        expect("mprotect to writable", errno, libc::EACCES);
        // SAFETY: unmapping what was just mapped.
        unsafe { libc::munmap(m, 4096) };
    }
    if c.producer_seq() != prod || c.releaser().device().volume(0).map_err(|e| e.to_string())?.is_none() {
        failures.push("the ring changed under misuse".into());
    }
    if failures.is_empty() {
        println!("misuse: every misuse refused");
        Ok(())
    } else {
        Err(failures.join("; "))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match &cli.cmd {
        Cmd::Drain {
            group,
            images,
            until_marker,
            until_empty,
            log,
            check_order,
            timeout,
        } => drain(
            &cli.device,
            group,
            images,
            *until_marker,
            *until_empty,
            log.as_deref(),
            *check_order,
            Duration::from_secs(*timeout),
        ),
        Cmd::Bitmap { group, volume } => attach(&cli.device, group).and_then(|c| {
            let b = c
                .releaser()
                .device()
                .take_bitmap(*volume)
                .map_err(|e| format!("bitmap: {e}"))?;
            println!(
                "bitmap volume={} region_kib={} regions={} resume_seq={} in_flight_overflow={} dirty={} set={}",
                volume,
                b.region_kib,
                b.regions,
                b.resume_seq,
                b.in_flight_overflow,
                b.regions_set().count(),
                ranges(b.regions_set())
            );
            Ok(())
        }),
        Cmd::Misuse { group } => misuse(&cli.device, group),
        Cmd::Volumes { group } => attach(&cli.device, group).and_then(|c| {
            let vols = c
                .releaser()
                .device()
                .volumes()
                .map_err(|e| format!("volumes: {e}"))?;
            println!(
                "group={} generation={} first_seq={}",
                group,
                hex::encode(c.mapping().generation()),
                c.mapping().first_seq()
            );
            for v in vols {
                println!(
                    "volume index={} id={} sectors={} region_kib={} regions={} dirty={}",
                    v.index, v.id, v.sectors, v.region_kib, v.regions, v.dirty_regions
                );
            }
            Ok(())
        }),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dmr-ring: {e}");
            ExitCode::FAILURE
        }
    }
}
