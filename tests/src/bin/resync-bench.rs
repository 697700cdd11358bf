//! Checksum resync benchmark: dm-replica's chunk comparison between two
//! images of one volume next to `rsync -I --no-whole-file --inplace` and
//! `b3sum` over the same two images, in one run. Prints tables; asserts
//! nothing about the figures (timing claims are never tests), but fails if
//! the images differ after the dm-replica pass. Run it through
//! scripts/bench-resync.sh.
//!
//! The dm-replica pass runs the resync's data path of both hosts on this
//! one: the source's chunk hashes of image A and the target's of image B
//! (`replicad::chunkio::hash_chunks`, keyed BLAKE3, parallel reads, the two
//! sides at once as on two hosts), the hash records sealed into segments,
//! the answers, the differing chunks read from A, compressed and sealed as
//! the source ships them, opened and written into B as the target applies
//! them. Bytes sent are the sealed segments and answers as they would go
//! on the wire (TLS framing aside). What it leaves out: the capture ring,
//! the spool and the network.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use replica_proto::chunk::{ChunkKey, ChunkSpan, MAX_CHUNKS_PER_RECORD};
use replica_proto::frame::{self, SegmentHeader};
use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};
use replica_tests::Rng;

struct Args {
    size_mib: u64,
    chunk_kib: u64,
    changed_permille: u64,
    work: PathBuf,
    sweep: bool,
}

fn args() -> Args {
    let mut a = Args {
        size_mib: 1024,
        chunk_kib: 128,
        changed_permille: 10,
        work: PathBuf::from("/dev/shm"),
        sweep: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || {
            it.next()
                .unwrap_or_else(|| die(&format!("{k} needs a value")))
        };
        match k.as_str() {
            "--size-mib" => a.size_mib = val().parse().unwrap_or_else(|_| die("--size-mib N")),
            "--chunk-kib" => a.chunk_kib = val().parse().unwrap_or_else(|_| die("--chunk-kib N")),
            "--changed-permille" => {
                a.changed_permille = val()
                    .parse()
                    .unwrap_or_else(|_| die("--changed-permille N"))
            }
            "--work" => a.work = PathBuf::from(val()),
            "--no-sweep" => a.sweep = false,
            "--smoke" => {
                a.size_mib = 32;
                a.sweep = false;
            }
            _ => die(&format!("unknown argument {k}")),
        }
    }
    a
}

fn die(msg: &str) -> ! {
    eprintln!("resync-bench: {msg}");
    std::process::exit(2)
}

/// A sealer of segments as the source makes them.
struct Sealer {
    key: StreamKey,
    counter: u64,
    seq: u64,
}

impl Sealer {
    fn new(ring: &KeyRing) -> Self {
        let ctx = StreamContext {
            stream_id: [7; 16],
            volume: "bench",
            direction: Direction::Forward,
            epoch: 1,
        };
        Self {
            key: StreamKey::derive(ring, ring.active(), &ctx).expect("stream key"),
            counter: 0,
            seq: 1,
        }
    }

    /// Seals one segment of `records` (op, sector, aux, data) and returns it.
    fn seal(&mut self, records: &[(u8, u64, u64, &[u8])]) -> Vec<u8> {
        let mut plain = Vec::new();
        let first = self.seq;
        for &(op, sector, aux, data) in records {
            frame::encode_record_parts(
                &mut plain,
                self.seq,
                op,
                frame::RECORD_FLAG_RESYNC,
                0,
                sector,
                data.len() as u32,
                0,
                aux,
                data,
            );
            self.seq += 1;
        }
        let h = SegmentHeader {
            features: 0,
            key_id: self.key.key_id(),
            stream_id: [7; 16],
            generation: [1; 16],
            volume_tag: replica_proto::keys::volume_tag("bench"),
            epoch: 1,
            counter: self.counter,
            first_seq: first,
            last_seq: self.seq - 1,
            record_count: records.len() as u32,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 1,
            source_time_ns: 0,
        };
        self.counter += 1;
        frame::seal(h, &plain, 1, &self.key).expect("seal")
    }
}

/// What one dm-replica pass did.
struct Pass {
    secs: f64,
    sent: u64,
    differing: u64,
    chunks: u64,
}

/// dm-replica's comparison of `a` (the source) with `b` (the replica) in
/// chunks of `chunk` bytes; `b` is brought to equal `a`.
fn dm_replica(a: &Path, b: &Path, size: u64, chunk: u64, ring: &KeyRing) -> Pass {
    let key = ChunkKey::derive(ring, ring.active(), "bench").expect("chunk key");
    let fa = File::open(a).expect("open A");
    let fb = OpenOptions::new()
        .read(true)
        .write(true)
        .open(b)
        .expect("open B");
    let chunks = size.div_ceil(chunk);
    let per = u64::from(MAX_CHUNKS_PER_RECORD).min(chunks);
    let mut sealer = Sealer::new(ring);
    let mut sent = 0u64;
    let mut differing = 0u64;
    let t = Instant::now();
    let mut first = 0u64;
    while first < chunks {
        let count = per.min(chunks - first);
        let span = ChunkSpan {
            start: first * chunk,
            chunk_bytes: chunk,
            count: count as u32,
        };
        // Both hosts hash their side at once, sharing this machine's cores
        // (each would have its own).
        let per_side = (replicad::chunkio::default_workers() / 2).max(1);
        let (ha, hb) = std::thread::scope(|s| {
            let ta =
                s.spawn(|| replicad::chunkio::hash_chunks_with(&fa, &key, &span, size, per_side));
            let hb = replicad::chunkio::hash_chunks_with(&fb, &key, &span, size, per_side);
            (ta.join().expect("source side"), hb)
        });
        let (ha, hb) = (ha.expect("hash A"), hb.expect("hash B"));
        // The hash record, sealed as the source ships it.
        let payload: Vec<u8> = ha.iter().flatten().copied().collect();
        sent += 5 + sealer
            .seal(&[(frame::OP_CHUNK_HASHES, span.start / 512, chunk, &payload)])
            .len() as u64;
        // The target's answer: type, length, generation, seq, count, bits.
        sent += 5 + 28 + count.div_ceil(8);
        let diff: Vec<u64> = (0..count)
            .filter(|&i| ha[i as usize] != hb[i as usize])
            .collect();
        differing += diff.len() as u64;
        // The differing chunks: read on the source, sealed (runs of up to
        // 1 MiB per write, as `resync.max_write_bytes`), opened and
        // written on the target.
        let mut i = 0;
        while i < diff.len() {
            let mut j = i + 1;
            while j < diff.len()
                && diff[j] == diff[j - 1] + 1
                && (j - i + 1) as u64 * chunk <= 1 << 20
            {
                j += 1;
            }
            let off = (first + diff[i]) * chunk;
            let len = ((j - i) as u64 * chunk).min(size - off);
            let mut data = vec![0u8; len as usize];
            fa.read_exact_at(&mut data, off).expect("read A");
            let seg = sealer.seal(&[(frame::ring_op::WRITE, off / 512, 0, &data)]);
            sent += 5 + seg.len() as u64;
            let (h, _) = SegmentHeader::decode(&seg).expect("header");
            let plain = frame::open(&h, &seg, &sealer.key).expect("open");
            let recs = frame::decode_records(&h, &plain).expect("records");
            for r in recs {
                fb.write_all_at(r.data, r.sector * 512).expect("write B");
            }
            i = j;
        }
        first += count;
    }
    fb.sync_data().expect("sync B");
    Pass {
        secs: t.elapsed().as_secs_f64(),
        sent,
        differing,
        chunks,
    }
}

/// BLAKE3 of a whole file (not timed: the check that the pass worked).
fn digest(p: &Path) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    let mut f = File::open(p).expect("open");
    std::io::copy(&mut f, &mut h).expect("hash file");
    *h.finalize().as_bytes()
}

fn copy(from: &Path, to: &Path) {
    std::fs::copy(from, to).unwrap_or_else(|e| die(&format!("copy {}: {e}", from.display())));
}

/// Runs `cmd` and returns its wall time and standard output.
fn timed(cmd: &mut Command) -> (f64, String) {
    let t = Instant::now();
    let out = cmd
        .output()
        .unwrap_or_else(|e| die(&format!("{cmd:?}: {e}")));
    let secs = t.elapsed().as_secs_f64();
    if !out.status.success() {
        die(&format!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    (secs, String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes image A (random) and B (A with `changed` random `unit`-byte
/// blocks overwritten); returns the bytes changed.
fn images(a: &Path, b: &Path, size: u64, unit: u64, changed: u64, seed: u64) -> u64 {
    let mut rng = Rng::new(seed);
    let mut f = File::create(a).expect("create A");
    let mut buf = vec![0u8; 1 << 20];
    let mut left = size;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        rng.fill(&mut buf[..n]);
        f.write_all(&buf[..n]).expect("write A");
        left -= n as u64;
    }
    f.sync_all().expect("sync A");
    copy(a, b);
    let fb = OpenOptions::new().write(true).open(b).expect("open B");
    let units = size / unit;
    let mut picked = std::collections::BTreeSet::new();
    while (picked.len() as u64) < changed.min(units) {
        picked.insert(rng.below(units));
    }
    let mut blk = vec![0u8; unit as usize];
    for u in &picked {
        rng.fill(&mut blk);
        fb.write_all_at(&blk, u * unit).expect("change B");
    }
    fb.sync_all().expect("sync B");
    picked.len() as u64 * unit
}

fn main() {
    let a = args();
    for tool in ["rsync", "b3sum"] {
        if Command::new(tool).arg("--version").output().is_err() {
            die(&format!("{tool} is required (apt-get install {tool})"));
        }
    }
    let size = a.size_mib << 20;
    let chunk = a.chunk_kib << 10;
    let dir = tempfile::Builder::new()
        .prefix("resync-bench")
        .tempdir_in(&a.work)
        .unwrap_or_else(|e| die(&format!("work directory in {}: {e}", a.work.display())));
    let (pa, pb, pb0, pr) = (
        dir.path().join("a.img"),
        dir.path().join("b.img"),
        dir.path().join("b0.img"),
        dir.path().join("r.img"),
    );
    let ring = KeyRing::generate().expect("keys");
    let units = size / chunk;
    let changed_units = (units * a.changed_permille).div_ceil(1000);
    let changed = images(&pa, &pb0, size, chunk, changed_units, 42);
    println!(
        "volume {} MiB, {} of {} chunks of {} KiB changed at random ({:.1} MiB); work directory {} (page cache warm)",
        a.size_mib,
        changed_units,
        units,
        a.chunk_kib,
        changed as f64 / 1048576.0,
        a.work.display()
    );

    copy(&pb0, &pb);
    let d = dm_replica(&pa, &pb, size, chunk, &ring);
    if digest(&pa) != digest(&pb) {
        die("the replica image differs from the source after the dm-replica pass");
    }
    copy(&pb0, &pr);
    let (rsync_secs, rsync_out) = timed(
        Command::new("rsync")
            .args(["-I", "--no-whole-file", "--inplace", "--stats"])
            .arg(&pa)
            .arg(&pr),
    );
    let rsync_sent: u64 = rsync_out
        .lines()
        .find_map(|l| l.strip_prefix("Total bytes sent: "))
        .map(|v| v.replace(',', "").trim().parse().unwrap_or(0))
        .unwrap_or(0);
    if digest(&pa) != digest(&pr) {
        die("rsync left the images different");
    }
    let (b3_secs, _) = timed(Command::new("b3sum").arg(&pa).arg(&pb0));

    // Keyed BLAKE3 on one core, in memory.
    let key = ChunkKey::derive(&ring, ring.active(), "bench").expect("key");
    let buf = vec![0x5au8; chunk as usize];
    let t = Instant::now();
    let mut n = 0u64;
    let mut acc = 0u8;
    while n < (1 << 30) {
        acc ^= key.hash(n, &buf)[0];
        n += chunk;
    }
    let per_core = (n as f64 / (1u64 << 30) as f64) / t.elapsed().as_secs_f64();
    std::hint::black_box(acc);

    let mib = |s: f64| size as f64 / 1048576.0 / s;
    println!();
    println!(
        "{:<34} {:>8} {:>9} {:>14} {:>13}",
        "", "time s", "MiB/s", "bytes sent", "sent/changed"
    );
    println!(
        "{:<34} {:>8.2} {:>9.0} {:>14} {:>13.3}",
        format!("dm-replica ({} differing)", d.differing),
        d.secs,
        mib(d.secs),
        d.sent,
        d.sent as f64 / changed as f64
    );
    println!(
        "{:<34} {:>8.2} {:>9.0} {:>14} {:>13.3}",
        "rsync -I --no-whole-file --inplace",
        rsync_secs,
        mib(rsync_secs),
        rsync_sent,
        rsync_sent as f64 / changed as f64
    );
    println!(
        "{:<34} {:>8.2} {:>9.0}",
        "b3sum of both images",
        b3_secs,
        mib(b3_secs) * 2.0
    );
    println!();
    println!("{:<44} {:>8} {:>8}", "ratio", "value", "goal");
    println!(
        "{:<44} {:>8.3} {:>8}",
        "bytes sent / bytes changed",
        d.sent as f64 / changed as f64,
        "<= 1.1"
    );
    println!(
        "{:<44} {:>8.3} {:>8}",
        "time / rsync's",
        d.secs / rsync_secs,
        "<= 0.333"
    );
    println!(
        "{:<44} {:>8.3} {:>8}",
        "time / b3sum of both images",
        d.secs / b3_secs,
        "<= 1.5"
    );
    println!(
        "{:<44} {:>8.2} {:>8}",
        "keyed BLAKE3, GiB/s on one core", per_core, ""
    );
    println!(
        "(chunks compared: {}; {} cores)",
        d.chunks,
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );

    if a.sweep {
        // The same changes (1% of 64 KiB blocks) at every chunk size: larger
        // chunks hash fewer times but send more around each change.
        println!();
        println!(
            "chunk size sweep: {} of 64 KiB blocks changed",
            a.changed_permille as f64 / 10.0
        );
        println!(
            "{:>10} {:>8} {:>9} {:>14} {:>13}",
            "chunk KiB", "time s", "MiB/s", "bytes sent", "sent/changed"
        );
        let units = size / 65536;
        let changed = images(
            &pa,
            &pb0,
            size,
            65536,
            (units * a.changed_permille).div_ceil(1000),
            43,
        );
        for kib in [64u64, 128, 256, 512, 1024] {
            copy(&pb0, &pb);
            let d = dm_replica(&pa, &pb, size, kib << 10, &ring);
            if digest(&pa) != digest(&pb) {
                die("the replica image differs from the source after a sweep pass");
            }
            println!(
                "{:>10} {:>8.2} {:>9.0} {:>14} {:>13.3}",
                kib,
                d.secs,
                mib(d.secs),
                d.sent,
                d.sent as f64 / changed as f64
            );
        }
    }
}
