//! The source's spool: outages longer than the ring, kills while spooling,
//! damaged spool tails, the spool limit and a full spool disk.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::Duration;

use replica_tests::*;
use replicad::status::VolumeStatus;

const VOL: &str = "sv";
const SIZE: usize = 2 << 20;
const REGION: u64 = 64 << 10;

/// A rig whose ring is small (256 descriptors, 1 MiB of data): outages
/// quickly outgrow it.
fn small_ring_rig(seed: u64, extra: &str) -> Rig {
    let mut r = Rig::new(VOL, SIZE, seed, None, 100_000, "", 256, 256);
    r.start_source(64 << 10, extra);
    r
}

/// The running source's status (waiting for a freshly started one to
/// publish its first).
fn status(r: &Rig) -> VolumeStatus {
    let mut out = None;
    wait_for(Duration::from_secs(20), "source status", || {
        out = r.source.as_ref().and_then(|s| s.status(VOL));
        out.is_some()
    });
    out.expect("status")
}

/// Waits until the source has drained the ring up to the last record
/// produced (into the spool or its map).
fn wait_drained(r: &Rig) {
    let want = r.src.last_seq + 1;
    wait_for(Duration::from_secs(30), "source to drain the ring", || {
        r.source
            .as_ref()
            .and_then(|s| s.status(VOL))
            .is_some_and(|s| s.captured_seq >= want)
    });
}

fn spool_files(sstate: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(sstate.join("spool"))
        .map(|rd| rd.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    v.retain(|p| p.extension().is_some_and(|e| e == "spool"));
    v.sort();
    v
}

#[test]
fn target_down_longer_than_the_ring_spool_absorbs_it_and_catches_up_with_every_point() {
    let mut r = small_ring_rig(21, "");
    r.write(50);
    r.src.apply(&Op::Flush);
    r.wait_applied(r.src.last_seq, Duration::from_secs(60));
    r.target.kill9();
    // Far more than the ring's 1 MiB while the target is unreachable.
    let ring_bytes = 1u64 << 20;
    let mut written = 0u64;
    while written < 6 * ring_bytes {
        let op = r.src.random_op(128);
        if let Op::Write { len, .. } = op {
            written += u64::from(len);
        }
        r.src.apply(&op);
    }
    r.src.apply(&Op::Flush);
    wait_drained(&r);
    let s = status(&r);
    assert!(!s.needs_resync, "the spool holds the outage: {s:?}");
    assert!(
        s.spool_bytes > 3 * ring_bytes,
        "the outage is in the spool: {} bytes",
        s.spool_bytes
    );
    assert!(s.lag_records > 0 && s.lag_seconds > 0.0, "{s:?}");
    assert_ne!(s.connection, replicad::status::Connection::Connected);
    r.restart_target();
    r.drain_and_check();
    // Every flush of the outage became a recovery point, in order.
    let st = r.target_state();
    let flushes: Vec<u64> = r.src.points.keys().copied().collect();
    let points: Vec<u64> = st.points.iter().map(|p| p.seq).collect();
    assert_eq!(points, flushes, "one point per flush, in order");
    wait_for(Duration::from_secs(30), "lag 0 and an empty spool", || {
        let s = status(&r);
        s.lag_records == 0 && s.spool_bytes == 0
    });
    assert!(spool_files(&r.sstate).len() <= 1);
}

#[test]
fn kill9_while_spooling_loses_and_duplicates_nothing() {
    for seed in [31u64, 32, 33, 34] {
        let mut r = small_ring_rig(
            seed,
            "[spool]\nfile_bytes = 1048576\nlimit_percent = 10000\n",
        );
        let mut rng = Rng::new(seed);
        r.target.kill9();
        for _round in 0..5 {
            r.write(50 + rng.below(250) as usize);
            if rng.below(3) == 0 {
                r.src.apply(&Op::Flush);
            }
            // Kill at a moment the drain is likely mid-chunk.
            r.source().kill9();
            r.write_while_down(rng.below(60) as usize);
            r.start_source(
                64 << 10 << rng.below(4),
                "[spool]\nfile_bytes = 1048576\nlimit_percent = 10000\n",
            );
        }
        r.src.apply(&Op::Flush);
        r.restart_target();
        r.drain_and_check();
        // Applied exactly once each: the target never restarted after it
        // first saw records, so its counter covers them all.
        let st = r.target.status(VOL).expect("target status");
        assert_eq!(
            st.applied_records,
            r.src.last_seq,
            "seed {seed}: records applied != records produced\n{}",
            r.logs()
        );
        let s = status(&r);
        assert!(!s.needs_resync, "seed {seed}: {s:?}");
    }
}

/// Moves the ring's consumer index back to `seq`, as if the source died
/// after writing records to the spool but before releasing them.
fn unrelease(ring: &Path, seq: u64) {
    let map = replica_ring::Mapping::open_file(ring, true).expect("map ring");
    let prev = map.read_desc(seq - 1);
    let h = map.header();
    h.cons_seq.store(seq, Ordering::Release);
    h.data_tail
        .store(prev.data_pos + u64::from(prev.granules), Ordering::Release);
}

/// The chunks of a spool file: (offset, first seq, last seq).
fn chunks(path: &Path) -> Vec<(u64, u64, u64)> {
    let b = std::fs::read(path).expect("spool file");
    let hdr = replicad::source::spool::CHUNK_HEADER_LEN as usize;
    let mut off = replicad::source::spool::FILE_HEADER_LEN as usize;
    let mut out = Vec::new();
    while off + hdr <= b.len() {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let plain = u32::from_le_bytes(b[off + 40..off + 44].try_into().expect("4")) as usize;
        out.push((off as u64, u64_at(off + 8), u64_at(off + 16)));
        off += hdr + plain;
    }
    out
}

#[test]
fn torn_spool_tail_with_the_records_still_in_the_ring_is_resent_from_the_ring() {
    let mut r = small_ring_rig(41, "");
    r.target.kill9();
    r.write(80);
    r.src.apply(&Op::Flush);
    wait_drained(&r);
    r.source().kill9();
    // Tear the last chunk in half and give its records back to the ring:
    // exactly what a kill in the middle of the chunk's write leaves.
    let last_file = spool_files(&r.sstate).pop().expect("a spool file");
    let (off, first, last) = *chunks(&last_file).last().expect("a chunk");
    assert_eq!(last, r.src.last_seq);
    let len = std::fs::metadata(&last_file).expect("stat").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&last_file)
        .expect("open");
    f.set_len(off + (len - off) / 2).expect("tear");
    drop(f);
    unrelease(&r.env.path("ring"), first);
    r.start_source(64 << 10, "");
    wait_drained(&r);
    let log = r.source().log_text();
    assert!(log.contains("torn"), "the cut is reported:\n{log}");
    assert!(!status(&r).needs_resync, "nothing was lost");
    r.restart_target();
    r.drain_and_check();
    let st = r.target.status(VOL).expect("target status");
    assert_eq!(st.applied_records, r.src.last_seq, "{}", r.logs());
}

#[test]
fn records_spooled_but_not_released_are_not_sent_twice() {
    let mut r = small_ring_rig(42, "");
    r.target.kill9();
    r.write(60);
    r.src.apply(&Op::Flush);
    wait_drained(&r);
    r.source().kill9();
    let files = spool_files(&r.sstate);
    let (_, first, _) = *chunks(files.last().expect("file")).last().expect("chunk");
    unrelease(&r.env.path("ring"), first);
    r.start_source(64 << 10, "");
    r.write(40);
    r.src.apply(&Op::Flush);
    r.restart_target();
    r.drain_and_check();
    let st = r.target.status(VOL).expect("target status");
    assert_eq!(st.applied_records, r.src.last_seq, "{}", r.logs());
}

#[test]
fn damaged_spool_is_cut_never_applied_wrong_and_the_lost_range_needs_a_resync() {
    let mut r = small_ring_rig(43, "");
    r.write(30);
    r.src.apply(&Op::Flush);
    r.wait_applied(r.src.last_seq, Duration::from_secs(60));
    let applied_before = r.src.last_seq;
    r.target.kill9();
    for _ in 0..6 {
        r.write(40);
        r.src.apply(&Op::Flush);
    }
    wait_drained(&r);
    r.source().kill9();
    // Flip a byte inside the last chunk's records (released from the ring
    // long ago): its records exist nowhere else.
    let last_file = spool_files(&r.sstate).pop().expect("a spool file");
    let (off, first, _) = *chunks(&last_file).last().expect("a chunk");
    let mut b = std::fs::read(&last_file).expect("read");
    let i = off as usize + replicad::source::spool::CHUNK_HEADER_LEN as usize + 20;
    b[i] ^= 0x10;
    std::fs::write(&last_file, &b).expect("write");
    r.start_source(64 << 10, "");
    wait_for(Duration::from_secs(30), "needs resync reported", || {
        r.source
            .as_ref()
            .and_then(|s| s.status(VOL))
            .is_some_and(|s| s.needs_resync)
    });
    let s = status(&r);
    assert_eq!(
        s.resync_since_seq, first,
        "the stream ends where the damage starts"
    );
    assert_eq!(s.replica, replicad::status::ReplicaState::Outdated);
    assert_eq!(s.health, replicad::status::Health::Warning);
    assert!(
        s.reasons
            .iter()
            .any(|x| x.message.contains("spool lost records")),
        "{s:?}"
    );
    // What the spool still holds is shipped; nothing after the damage is.
    r.restart_target();
    r.wait_applied(first - 1, Duration::from_secs(60));
    wait_for(Duration::from_secs(30), "source idle at the damage", || {
        status(&r).lag_records == 0
    });
    let st = r.target_state();
    assert_eq!(st.applied_seq, first - 1, "{}", r.logs());
    assert!(st.applied_seq > applied_before);
    assert!(r.check_points() >= 2);
    // A resync of the whole volume is recorded (the lost records' regions
    // are unknown).
    let rs = r
        .env
        .resync_state(&r.sstate, VOL)
        .expect("resync state saved");
    assert_eq!(rs.map.count(), rs.map.regions());
}

/// The 64 KiB regions of `ops` applied after sequence `after`.
fn regions_of(ops: &[(u64, Op)], after: u64) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    for (seq, op) in ops {
        if *seq <= after {
            continue;
        }
        let (sector, len) = match *op {
            Op::Write { sector, len, .. }
            | Op::Discard { sector, len }
            | Op::Zeroes { sector, len } => (sector, len),
            Op::Flush | Op::Marker(_) => continue,
        };
        let (a, b) = (sector * 512, sector * 512 + u64::from(len) - 1);
        set.extend(a / REGION..=b / REGION);
    }
    set
}

fn apply_logged(r: &mut Rig, ops: &mut Vec<(u64, Op)>, n: usize, max_sectors: u64) {
    for _ in 0..n {
        let op = r.src.random_op(max_sectors);
        r.src.apply(&op);
        ops.push((r.src.last_seq, op));
    }
}

/// Writes a few operations (up to `max_sectors` each) and a flush, waits
/// until the source knows them all durable (so a dirty map made later is
/// exact rather than a superset), then stops the target. Returns the last
/// durable record.
fn in_sync_then_target_down(r: &mut Rig, ops: &mut Vec<(u64, Op)>, max_sectors: u64) -> u64 {
    apply_logged(r, ops, 20, max_sectors);
    r.src.apply(&Op::Flush);
    r.wait_applied(r.src.last_seq, Duration::from_secs(60));
    wait_for(
        Duration::from_secs(30),
        "source sees everything durable",
        || status(r).lag_records == 0,
    );
    r.target.kill9();
    r.src.last_seq
}

#[test]
fn spool_limit_gives_needs_resync_with_exactly_the_regions_written() {
    // 16 MiB volume; the limit is 1% of it (about 168 KiB).
    const BIG: usize = 16 << 20;
    let mut r = Rig::new(VOL, BIG, 51, None, 100, "", 1024, 1024);
    r.start_source(64 << 10, "[spool]\nlimit_percent = 1\n");
    let mut ops = Vec::new();
    let durable = in_sync_then_target_down(&mut r, &mut ops, 8);
    // Small writes until the limit trips, then more in bitmap mode.
    while !status(&r).needs_resync {
        apply_logged(&mut r, &mut ops, 20, 8);
        wait_drained(&r);
    }
    apply_logged(&mut r, &mut ops, 300, 8);
    r.src.apply(&Op::Discard {
        sector: (BIG as u64 / 512) - 8,
        len: 4096,
    });
    ops.push((
        r.src.last_seq,
        Op::Discard {
            sector: (BIG as u64 / 512) - 8,
            len: 4096,
        },
    ));
    wait_drained(&r);
    let s = status(&r);
    assert!(s.needs_resync);
    assert_eq!(s.resync_since_seq, durable + 1);
    assert_eq!(s.replica, replicad::status::ReplicaState::Outdated);
    assert_eq!(s.spool_bytes, 0, "the spool was dropped");
    assert!(spool_files(&r.sstate).is_empty());
    assert!(s
        .reasons
        .iter()
        .any(|x| x.message.contains("spool reached its limit")));
    // The ring kept draining: the writes after the drop all completed
    // (apply() would have panicked on a ring that stays full).
    let rs = r
        .env
        .resync_state(&r.sstate, VOL)
        .expect("resync state saved");
    assert_eq!(rs.since_seq, durable + 1);
    assert_eq!(rs.map.region_bytes(), REGION);
    let got: BTreeSet<u64> = rs.map.iter().collect();
    let want = regions_of(&ops, durable);
    assert_eq!(
        got, want,
        "dirty map = regions written since the last durable record"
    );
    assert_eq!(s.dirty_regions, want.len() as u64);
    // It survives a restart, and keeps collecting.
    r.source().kill9();
    r.start_source(64 << 10, "[spool]\nlimit_percent = 1\n");
    apply_logged(&mut r, &mut ops, 50, 8);
    wait_drained(&r);
    r.source().stop();
    let rs = r.env.resync_state(&r.sstate, VOL).expect("saved");
    let got: BTreeSet<u64> = rs.map.iter().collect();
    assert_eq!(got, regions_of(&ops, durable));
    // The replica stays where it was: nothing after the limit is sent.
    r.restart_target();
    r.start_source(64 << 10, "[spool]\nlimit_percent = 1\n");
    wait_for(
        Duration::from_secs(30),
        "source connected, nothing to send",
        || {
            let s = status(&r);
            s.connection == replicad::status::Connection::Connected && s.lag_records == 0
        },
    );
    assert!(status(&r).needs_resync);
    assert_eq!(r.target_state().applied_seq, durable);
}

#[test]
fn full_spool_disk_turns_into_needs_resync_without_losing_a_write() {
    let mnt = Tmpfs::mount("3m");
    let mut r = Rig::new(VOL, 16 << 20, 61, None, 100, "", 512, 512);
    let spool = mnt.path().join("spool");
    r.start_source(
        64 << 10,
        &format!("[spool]\ndir = \"{}\"\n", spool.display()),
    );
    let mut ops = Vec::new();
    let durable = in_sync_then_target_down(&mut r, &mut ops, 16);
    // About 5 MiB into a 3 MiB spool disk.
    while !status(&r).needs_resync {
        apply_logged(&mut r, &mut ops, 50, 128);
        wait_drained(&r);
        assert!(ops.len() < 20_000, "the spool disk never filled");
    }
    apply_logged(&mut r, &mut ops, 50, 128);
    wait_drained(&r);
    let s = status(&r);
    assert!(
        s.reasons
            .iter()
            .any(|x| x.message.contains("spool disk full")),
        "{s:?}"
    );
    let rs = r.env.resync_state(&r.sstate, VOL).expect("saved");
    let got: BTreeSet<u64> = rs.map.iter().collect();
    assert_eq!(got, regions_of(&ops, durable));
    assert!(
        spool_files(mnt.path()).is_empty(),
        "the full spool was dropped"
    );
}
