//! Property tests of the module's capture logic against a simulated disk.
//!
//! Writes, discards and flushes are captured in a random order of
//! submissions, completions (some failing), consumer releases, ring-full
//! overflows and bitmap read-and-clears. A write's data lands on the
//! simulated disk when it completes, in whatever order completions come, as
//! on a real device. The consumer replays committed records in ring order.
//! At the end, after resyncing the regions the dirty bitmaps name from the
//! disk, the replica must equal the disk exactly — which holds only if
//! overlapping writes reach the disk in ring order (the hold-back rule), no
//! record is lost or reordered, and every uncaptured or failed write left a
//! dirty bit.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;

use crate::capture::*;
use crate::ring_abi as abi;

const VOLUMES: usize = 2;
const SECTORS: u64 = 256;
/// 8-sector (4 KiB) regions.
const REGION_SHIFT: u32 = 3;

#[derive(Clone, Debug)]
enum Action {
    Write { vol: u8, sector: u64, sectors: u64 },
    Discard { vol: u8, sector: u64, sectors: u64 },
    Flush,
    Marker,
    Complete { pick: usize, ok: bool, lands: bool },
    Consume { max: usize },
    BogusRelease { ahead: u64 },
    TakeBitmap { vol: u8 },
}

fn action() -> impl Strategy<Value = Action> {
    prop_oneof![
        6 => (0u8..VOLUMES as u8, 0..SECTORS, 1u64..=32).prop_map(|(vol, sector, sectors)| Action::Write { vol, sector, sectors }),
        1 => (0u8..VOLUMES as u8, 0..SECTORS, 1u64..=64).prop_map(|(vol, sector, sectors)| Action::Discard { vol, sector, sectors }),
        1 => Just(Action::Flush),
        1 => Just(Action::Marker),
        7 => (any::<usize>(), prop::bool::weighted(0.93), any::<bool>()).prop_map(|(pick, ok, lands)| Action::Complete { pick, ok, lands }),
        3 => (1usize..12).prop_map(|max| Action::Consume { max }),
        1 => (0u64..3).prop_map(|ahead| Action::BogusRelease { ahead }),
        1 => (0u8..VOLUMES as u8).prop_map(|vol| Action::TakeBitmap { vol }),
    ]
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RecState {
    Pending,
    Committed,
    Failed,
}

#[derive(Clone, Copy, Debug)]
struct Rec {
    op: RecOp,
    vol: usize,
    start: u64,
    end: u64,
    /// Content written (a unique id; 0 for discards: zeroes).
    id: u64,
    state: RecState,
}

#[derive(Clone, Copy, Debug)]
struct Io {
    /// Ring sequence, `None` if not captured (overflow).
    seq: Option<u64>,
    op: RecOp,
    vol: usize,
    start: u64,
    end: u64,
    id: u64,
    /// Sent to the disk (not held back).
    submitted: bool,
}

struct Sim {
    cap: Capture<Vec<Slot>, Vec<u64>>,
    dirty: Vec<Dirty<Vec<u64>>>,
    disk: Vec<Vec<u64>>,
    replica: Vec<Vec<u64>>,
    ring: BTreeMap<u64, Rec>,
    ios: Vec<Io>,
    next_id: u64,
    /// Regions the test knows must be dirty (overflowed or failed writes),
    /// and everything taken out of the bitmaps so far.
    must_be_dirty: BTreeSet<(usize, u64)>,
    taken: BTreeSet<(usize, u64)>,
    consumed: u64,
}

fn regions_of(start: u64, end: u64) -> impl Iterator<Item = u64> {
    let last = (end - 1).min(SECTORS - 1) >> REGION_SHIFT;
    (start >> REGION_SHIFT)..=last
}

impl Sim {
    fn new(desc_count: u64, data_granules: u64, first_seq: u64, first_granule: u64) -> Self {
        let g = abi::geometry(desc_count, data_granules).expect("geometry");
        let n = desc_count as usize;
        let cap = Capture::new(g, vec![Slot::default(); n], vec![0; n], first_seq, first_granule)
            .expect("capture");
        let regions = regions_for(SECTORS, REGION_SHIFT);
        let dirty = (0..VOLUMES)
            .map(|_| {
                Dirty::new(REGION_SHIFT, regions, vec![0; words_for(regions) as usize]).expect("dirty")
            })
            .collect();
        Self {
            cap,
            dirty,
            disk: vec![vec![0; SECTORS as usize]; VOLUMES],
            replica: vec![vec![0; SECTORS as usize]; VOLUMES],
            ring: BTreeMap::new(),
            ios: Vec::new(),
            next_id: 1,
            must_be_dirty: BTreeSet::new(),
            taken: BTreeSet::new(),
            consumed: first_seq,
        }
    }

    fn mark(&mut self, vol: usize, start: u64, end: u64) {
        self.dirty[vol].mark(start, end);
        for r in regions_of(start, end) {
            self.must_be_dirty.insert((vol, r));
        }
    }

    /// Checks the hold-back rule when `io` is sent to the disk: no earlier
    /// overlapping captured write of the same volume may still be on its way.
    fn submit(&mut self, idx: usize) {
        let io = self.ios[idx];
        if let Some(seq) = io.seq {
            for other in &self.ios {
                if let Some(os) = other.seq {
                    if other.submitted
                        && os != seq
                        && seq_before(os, seq)
                        && other.vol == io.vol
                        && other.start < io.end
                        && io.start < other.end
                    {
                        panic!("record {seq} submitted while earlier overlapping {os} is in flight");
                    }
                }
            }
        }
        self.ios[idx].submitted = true;
    }

    fn capture_io(&mut self, op: RecOp, vol: usize, start: u64, sectors: u64) {
        let end = (start + sectors).min(SECTORS);
        let id = if op == RecOp::Write {
            self.next_id += 1;
            self.next_id
        } else {
            0
        };
        let req = Request {
            op,
            volume: vol as u32,
            sector: start,
            len: ((end - start) * 512) as u32,
        };
        let mut io = Io {
            seq: None,
            op,
            vol,
            start,
            end,
            id,
            submitted: false,
        };
        if !self.cap.overflowing() {
            match self.cap.reserve(&req) {
                Ok(r) => {
                    io.seq = Some(r.seq);
                    self.ring.insert(
                        r.seq,
                        Rec {
                            op,
                            vol,
                            start,
                            end,
                            id,
                            state: RecState::Pending,
                        },
                    );
                    self.ios.push(io);
                    let idx = self.ios.len() - 1;
                    if r.blocked && self.cap.is_blocked(r.seq) {
                        self.cap.set_held(r.seq).expect("set_held");
                    } else {
                        self.submit(idx);
                    }
                    return;
                }
                Err(CaptureError::Full) => self.cap.enter_overflow(),
                Err(e) => panic!("reserve failed: {e:?}"),
            }
        }
        // Overflow: not captured; dirty now (and again at completion).
        self.mark(vol, start, end);
        io.submitted = true;
        self.ios.push(io);
    }

    fn non_data(&mut self, op: RecOp) {
        if self.cap.overflowing() {
            return;
        }
        let req = Request {
            op,
            volume: 0,
            sector: 0,
            len: 0,
        };
        match self.cap.reserve(&req) {
            Ok(r) => {
                assert!(!r.blocked, "flushes and markers never wait");
                self.ring.insert(
                    r.seq,
                    Rec {
                        op,
                        vol: 0,
                        start: 0,
                        end: 0,
                        id: 0,
                        state: RecState::Pending,
                    },
                );
                if op == RecOp::Marker {
                    self.cap.complete(r.seq, true).expect("marker completes");
                    self.ring.get_mut(&r.seq).expect("rec").state = RecState::Committed;
                } else {
                    self.ios.push(Io {
                        seq: Some(r.seq),
                        op,
                        vol: 0,
                        start: 0,
                        end: 0,
                        id: 0,
                        submitted: true,
                    });
                }
            }
            Err(CaptureError::Full) => {}
            Err(e) => panic!("reserve failed: {e:?}"),
        }
    }

    fn complete(&mut self, pick: usize, ok: bool, lands: bool) {
        let submitted: Vec<usize> = (0..self.ios.len()).filter(|&i| self.ios[i].submitted).collect();
        if submitted.is_empty() {
            return;
        }
        let idx = submitted[pick % submitted.len()];
        let io = self.ios.remove(idx);
        if io.op.changes_data() && (ok || lands) {
            for s in io.start..io.end {
                self.disk[io.vol][s as usize] = io.id;
            }
        }
        match io.seq {
            Some(seq) => {
                let c = self.cap.complete(seq, ok).expect("complete");
                assert_eq!((c.volume as usize, c.start, c.end), (io.vol, io.start, io.end));
                let rec = self.ring.get_mut(&seq).expect("record");
                rec.state = if ok { RecState::Committed } else { RecState::Failed };
                if !ok && io.op.changes_data() {
                    self.mark(io.vol, io.start, io.end);
                }
            }
            None => {
                if !ok {
                    self.mark(io.vol, io.start, io.end);
                } else {
                    self.dirty[io.vol].mark(io.start, io.end);
                }
            }
        }
        // Held writes whose blockers are gone go to the disk now.
        while let Some(seq) = self.cap.next_unblocked_held() {
            let i = self
                .ios
                .iter()
                .position(|x| x.seq == Some(seq))
                .expect("held io exists");
            assert!(!self.ios[i].submitted, "held io was already submitted");
            self.submit(i);
        }
    }

    /// The consumer: replays done records in order, then releases them.
    fn consume(&mut self, max: usize) {
        let mut seq = self.consumed;
        let mut n = 0;
        while n < max {
            let Some(rec) = self.ring.get(&seq).copied() else { break };
            if rec.state == RecState::Pending {
                // Releasing a pending record must be refused.
                assert_eq!(
                    self.cap.release(seq.wrapping_add(1)),
                    Err(ReleaseError::InFlight)
                );
                break;
            }
            if rec.state == RecState::Committed && rec.op.changes_data() {
                for s in rec.start..rec.end {
                    self.replica[rec.vol][s as usize] = rec.id;
                }
            }
            self.ring.remove(&seq);
            seq = seq.wrapping_add(1);
            n += 1;
        }
        if seq != self.consumed {
            self.cap.release(seq).expect("release of done records");
            self.consumed = seq;
        }
        assert!(self.cap.live() <= 16 * 1024);
    }

    fn take_bitmap(&mut self, vol: usize) {
        let mut out = vec![0u64; words_for(self.dirty[vol].regions()) as usize];
        assert!(self.dirty[vol].take_into(&mut out));
        assert_eq!(self.dirty[vol].dirty(), 0);
        for r in 0..self.dirty[vol].regions() {
            if out[(r / 64) as usize] & (1 << (r % 64)) != 0 {
                self.taken.insert((vol, r));
            }
        }
        self.cap.clear_overflow();
    }

    fn finish(&mut self) {
        // Complete everything (held writes are released as blockers finish).
        let mut guard = 0;
        while !self.ios.is_empty() {
            self.complete(0, true, true);
            guard += 1;
            assert!(guard < 100_000, "in-flight writes never drain: held forever?");
        }
        assert_eq!(self.cap.held(), 0);
        assert_eq!(self.cap.in_flight(), 0);
        self.consume(usize::MAX);
        assert!(self.ring.is_empty(), "records left unconsumed");
        assert_eq!(self.cap.live(), 0);
        assert_eq!(self.cap.granules_used(), 0, "data ring not empty after full release");
        for vol in 0..VOLUMES {
            self.take_bitmap(vol);
        }
        // Every region that had to become dirty did.
        let missing: Vec<_> = self.must_be_dirty.difference(&self.taken).collect();
        assert!(missing.is_empty(), "regions not marked dirty: {missing:?}");
        // Resync the dirty regions from the disk; the replica must then be
        // the disk exactly.
        for &(vol, r) in &self.taken {
            let a = (r << REGION_SHIFT) as usize;
            let b = (((r + 1) << REGION_SHIFT) as usize).min(SECTORS as usize);
            let src = self.disk[vol][a..b].to_vec();
            self.replica[vol][a..b].copy_from_slice(&src);
        }
        for vol in 0..VOLUMES {
            for s in 0..SECTORS as usize {
                assert_eq!(
                    self.replica[vol][s], self.disk[vol][s],
                    "volume {vol} sector {s}: replica has write {}, disk has write {}",
                    self.replica[vol][s], self.disk[vol][s]
                );
            }
        }
    }

    fn run(&mut self, actions: &[Action]) {
        for a in actions {
            match *a {
                Action::Write { vol, sector, sectors } => {
                    self.capture_io(RecOp::Write, vol as usize, sector, sectors)
                }
                Action::Discard { vol, sector, sectors } => {
                    self.capture_io(RecOp::Discard, vol as usize, sector, sectors)
                }
                Action::Flush => self.non_data(RecOp::Flush),
                Action::Marker => self.non_data(RecOp::Marker),
                Action::Complete { pick, ok, lands } => self.complete(pick, ok, lands),
                Action::Consume { max } => self.consume(max),
                Action::BogusRelease { ahead } => {
                    let bad = self.cap.prod_seq().wrapping_add(1 + ahead);
                    assert_eq!(self.cap.release(bad), Err(ReleaseError::OutOfRange));
                    let back = self.cap.cons_seq().wrapping_sub(1 + ahead);
                    assert_eq!(self.cap.release(back), Err(ReleaseError::OutOfRange));
                }
                Action::TakeBitmap { vol } => self.take_bitmap(vol as usize),
            }
            assert!(self.cap.live() <= 64);
            assert!(self.cap.granules_used() <= 64);
        }
        self.finish();
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// A roomy ring: overlaps and holds, occasional failures, no overflow
    /// unless the consumer lags.
    #[test]
    fn replay_matches_disk(actions in prop::collection::vec(action(), 1..300)) {
        Sim::new(64, 64, 1, 0).run(&actions);
    }

    /// A tiny ring near the end of the 64-bit index space: full rings,
    /// overflow, padding at the data ring's end and index wrap.
    #[test]
    fn replay_matches_disk_tiny_ring_at_index_wrap(actions in prop::collection::vec(action(), 1..300)) {
        Sim::new(8, 8, u64::MAX - 40, u64::MAX - 50).run(&actions);
    }
}

#[test]
fn overlapping_write_is_held_until_the_earlier_one_completes() {
    let mut s = Sim::new(16, 16, 1, 0);
    s.capture_io(RecOp::Write, 0, 0, 8);
    s.capture_io(RecOp::Write, 0, 4, 8);
    s.capture_io(RecOp::Write, 0, 100, 8);
    assert_eq!(s.cap.held(), 1, "the second write overlaps the first");
    assert!(!s.ios[1].submitted && s.ios[2].submitted);
    s.complete(0, true, true);
    assert_eq!(s.cap.held(), 0, "released when the first completed");
    assert!(s.ios.iter().all(|io| io.submitted));
    s.finish();
}

#[test]
fn overflow_marks_exactly_the_uncaptured_regions() {
    let mut s = Sim::new(4, 4, 1, 0);
    for i in 0..10u64 {
        s.capture_io(RecOp::Write, 0, i * 8, 8);
    }
    assert!(s.cap.overflowing());
    assert_eq!(s.cap.overflow_seq(), 5, "4 records fit, the 5th overflowed");
    let dirty: Vec<u64> = (0..32).filter(|&r| s.dirty[0].is_dirty(r)).collect();
    assert_eq!(dirty, (4..10).collect::<Vec<_>>());
    s.finish();
}

#[test]
fn sequence_order_wraps() {
    assert!(seq_before(u64::MAX, 0));
    assert!(seq_before(5, 6));
    assert!(!seq_before(6, 5));
    assert!(!seq_before(7, 7));
}

#[test]
fn dirty_marks_whole_words_and_clips_to_the_volume() {
    let regions = 200;
    let mut d = Dirty::new(3, regions, vec![0; words_for(regions) as usize]).expect("dirty");
    assert_eq!(d.mark(0, 8 * 200 + 1000), 200, "clipped to the last region");
    assert_eq!(d.mark(0, 8), 0, "already dirty");
    assert_eq!(d.dirty(), 200);
    let mut out = vec![0; 4];
    assert!(d.take_into(&mut out));
    assert_eq!(d.dirty(), 0);
    assert_eq!(out[0], u64::MAX);
    assert_eq!(out[3], (1 << 8) - 1);
    assert_eq!(d.or_in(&out), 200);
    assert!(d.is_dirty(199) && !d.is_dirty(200));
}

#[test]
fn invalid_requests_are_refused_not_panicking() {
    let mut s = Sim::new(8, 8, 1, 0);
    let huge = Request {
        op: RecOp::Write,
        volume: 0,
        sector: 0,
        len: 9 * 4096,
    };
    assert_eq!(s.cap.reserve(&huge), Err(CaptureError::Invalid));
    let overflowing_range = Request {
        op: RecOp::Discard,
        volume: 0,
        sector: u64::MAX,
        len: 4096,
    };
    assert_eq!(s.cap.reserve(&overflowing_range), Err(CaptureError::Invalid));
    assert_eq!(s.cap.complete(12345, true), Err(CaptureError::Internal));
    assert_eq!(s.cap.set_held(77), Err(CaptureError::Internal));
}

#[test]
fn descriptor_body_words_follow_the_abi_layout() {
    let body = DescBody {
        sector: 0x1111_2222_3333_4444,
        data_pos: 0x55,
        submit_ns: 0x66_0000_0077,
        len: 0x0001_0000,
        granules: 16,
        volume: 3,
        op: abi::OP_WRITE,
        flags: abi::FLAG_FUA,
        aux: 0xdead_beef,
        complete_ns: 0x99,
    };
    let w = body.words();
    assert_eq!(w.len() * 8 + 8, abi::DESC_SIZE as usize);
    // RecordDesc: stamp | sector | data_pos | submit_ns | len granules |
    // volume op flags reserved | aux | complete_ns.
    let pair = |lo: [u8; 4], hi: [u8; 4]| {
        let mut b = [0u8; 8];
        b[..4].copy_from_slice(&lo);
        b[4..].copy_from_slice(&hi);
        u64::from_ne_bytes(b)
    };
    assert_eq!(w[0], body.sector);
    assert_eq!(w[1], body.data_pos);
    assert_eq!(w[2], body.submit_ns);
    assert_eq!(w[3], pair(body.len.to_ne_bytes(), body.granules.to_ne_bytes()));
    assert_eq!(w[4], pair(body.volume.to_ne_bytes(), [abi::OP_WRITE, abi::FLAG_FUA, 0, 0]));
    assert_eq!(w[5], body.aux);
    assert_eq!(w[6], body.complete_ns);
}
