//! A model of a checksum resync end to end: a source volume written while
//! the run goes on, the ring with its markers, a drain that reads the volume
//! late (writes made after a marker may already be there), a stream to a
//! target that applies in order and compares at hash records, answers that
//! may be lost, and the target's zero ranges at BEGIN (chunks that read as
//! zeros there are read late at DATA markers and skipped when zeros on the
//! source too). Whatever the interleaving, the replica at END equals the
//! source at END.

use std::collections::VecDeque;

use super::*;

/// A tiny deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

const CHUNK: u64 = 65536;

#[derive(Debug, Clone)]
enum Ev {
    Write { seq: u64, chunk: u64, val: u64 },
    Hash { seq: u64, region: u64, count: u32 },
    Data { region: u64, count: u64 },
    End { seq: u64 },
}

#[derive(Debug, Clone)]
enum Rec {
    /// The resync's BEGIN: the target says which chunks read as zeros.
    Begin,
    Write {
        chunk: u64,
        val: u64,
    },
    Hashes {
        seq: u64,
        region: u64,
        vals: Vec<u64>,
    },
    End,
}

enum Msg {
    Answer(Compared),
    Applied(u64),
    Zeroes(Vec<(u64, u64)>),
}

/// How a model run starts (chunk values: 0 reads as zeros).
#[derive(Debug, Clone, Copy, Default)]
struct Setup {
    /// Chunks of the volume.
    n: u64,
    /// Percent of chunks the replica holds another value for.
    differ_percent: u64,
    /// Only the differing chunks and some others are in the map.
    dirty_only: bool,
    /// Every chunk is sent, none compared.
    send_all: bool,
    /// Percent of the replica's chunks that read as zeros (holes).
    replica_zero_percent: u64,
    /// Percent of the volume's chunks that are zeros (and of writes).
    volume_zero_percent: u64,
}

impl Setup {
    fn new(n: u64, differ_percent: u64) -> Self {
        Self {
            n,
            differ_percent,
            ..Self::default()
        }
    }
}

struct Sim {
    rng: Rng,
    volume: Vec<u64>,
    replica: Vec<u64>,
    ring: VecDeque<Ev>,
    seq: u64,
    stream: VecDeque<(u64, Rec)>,
    to_source: VecDeque<Msg>,
    st: ResyncState,
    chunks: Chunks,
    in_ring: u32,
    at_end: Option<Vec<u64>>,
    end_applied: bool,
    lose_percent: u64,
    /// Percent of writes that write zeros.
    zero_writes: u64,
}

impl Sim {
    fn new(seed: u64, n: u64, differ_percent: u64, dirty_only: bool, send_all: bool) -> Self {
        Self::with(
            seed,
            Setup {
                dirty_only,
                send_all,
                ..Setup::new(n, differ_percent)
            },
        )
    }

    fn with(seed: u64, set: Setup) -> Self {
        let n = set.n;
        let mut rng = Rng(seed | 1);
        let mut volume: Vec<u64> = (0..n).map(|_| rng.next()).collect();
        let mut replica = volume.clone();
        let mut map = DirtyMap::new(n * CHUNK, CHUNK);
        for (c, v) in replica.iter_mut().enumerate() {
            if rng.chance(set.differ_percent) {
                *v = rng.next();
                map.set_region(c as u64);
            } else if !set.dirty_only || rng.chance(10) {
                map.set_region(c as u64);
            }
        }
        if set.replica_zero_percent > 0 || set.volume_zero_percent > 0 {
            for c in 0..n as usize {
                if rng.chance(set.replica_zero_percent) {
                    replica[c] = 0;
                }
                if rng.chance(set.volume_zero_percent) {
                    volume[c] = 0;
                }
                if replica[c] != volume[c] {
                    map.set_region(c as u64);
                }
            }
        }
        let mut st = ResyncState::new([1; 16], 1, "test".into(), map);
        if set.send_all {
            for r in 0..n {
                if st.map.is_set(r) {
                    st.differ.set_region(r);
                }
            }
        }
        let chunks = Chunks::new(&st, false);
        let mut stream = VecDeque::new();
        stream.push_back((0, Rec::Begin));
        Self {
            rng,
            volume,
            replica,
            ring: VecDeque::new(),
            seq: 10,
            stream,
            to_source: VecDeque::new(),
            st,
            chunks,
            in_ring: 0,
            at_end: None,
            end_applied: false,
            lose_percent: 10,
            zero_writes: set.volume_zero_percent,
        }
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    fn write(&mut self) {
        let chunk = self.rng.below(self.volume.len() as u64);
        let val = if self.zero_writes > 0 && self.rng.chance(self.zero_writes) {
            0
        } else {
            self.rng.next()
        };
        self.volume[chunk as usize] = val;
        let seq = self.next_seq();
        self.ring.push_back(Ev::Write { seq, chunk, val });
    }

    /// The source's resync step: markers while few are in the ring.
    fn step(&mut self) {
        if self.at_end.is_some() {
            return;
        }
        while self.in_ring < 4 {
            if let Some((region, count)) = self
                .chunks
                .next_data(&self.st, 3)
                .or_else(|| self.chunks.next_zero(&self.st, 3))
            {
                self.next_seq();
                self.ring.push_back(Ev::Data { region, count });
            } else if let Some((region, count)) = self.chunks.next_hash(&self.st, 5) {
                let seq = self.next_seq();
                self.chunks.hashing(seq, region, count as u32);
                self.ring.push_back(Ev::Hash {
                    seq,
                    region,
                    count: count as u32,
                });
            } else if self.st.map.count() == 0 && self.chunks.idle() {
                let seq = self.next_seq();
                // Every write before END is in `volume` now; none after.
                self.at_end = Some(self.volume.clone());
                self.ring.push_back(Ev::End { seq });
                return;
            } else {
                return;
            }
            self.in_ring += 1;
        }
    }

    /// The drain takes one ring event (reading the volume as it is now).
    fn drain(&mut self) {
        let Some(ev) = self.ring.pop_front() else {
            return;
        };
        match ev {
            Ev::Write { seq, chunk, val } => {
                self.stream.push_back((seq, Rec::Write { chunk, val }))
            }
            Ev::Hash { seq, region, count } => {
                self.in_ring -= 1;
                let vals = (region..region + u64::from(count))
                    .map(|c| self.volume[c as usize])
                    .collect();
                self.stream
                    .push_back((seq, Rec::Hashes { seq, region, vals }));
            }
            Ev::Data { region, count } => {
                self.in_ring -= 1;
                for c in region..region + count {
                    let val = self.volume[c as usize];
                    if val == 0 && self.chunks.zero_proves(&self.st, c) {
                        self.chunks.zeroed(&mut self.st, c, 1);
                    } else {
                        self.stream.push_back((0, Rec::Write { chunk: c, val }));
                        self.chunks.spooled(&mut self.st, c, 1);
                    }
                }
            }
            Ev::End { seq } => self.stream.push_back((seq, Rec::End)),
        }
    }

    /// The target applies one record.
    fn apply(&mut self) {
        let Some((seq, rec)) = self.stream.pop_front() else {
            return;
        };
        match rec {
            Rec::Begin => {
                let zeros = (0..self.replica.len() as u64)
                    .filter(|&c| self.replica[c as usize] == 0)
                    .map(|c| (c * CHUNK, CHUNK))
                    .collect();
                if !self.rng.chance(self.lose_percent) {
                    self.to_source.push_back(Msg::Zeroes(zeros));
                }
            }
            Rec::Write { chunk, val } => self.replica[chunk as usize] = val,
            Rec::Hashes { seq, region, vals } => {
                let differs: Vec<bool> = vals
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.replica[region as usize + i] != *v)
                    .collect();
                if !self.rng.chance(self.lose_percent) {
                    self.to_source.push_back(Msg::Answer(
                        Compared::new([1; 16], seq, &differs).expect("answer"),
                    ));
                }
            }
            Rec::End => {
                assert_eq!(
                    Some(&self.replica),
                    self.at_end.as_ref(),
                    "the replica at END differs from the source at END"
                );
                self.end_applied = true;
            }
        }
        if seq != 0 {
            self.to_source.push_back(Msg::Applied(seq));
        }
    }

    /// The source hears one message.
    fn hear(&mut self) {
        match self.to_source.pop_front() {
            Some(Msg::Answer(c)) => {
                self.chunks.answer(&mut self.st, &c, |_| false);
            }
            Some(Msg::Applied(seq)) => {
                self.chunks.lost(seq, |_| false);
            }
            Some(Msg::Zeroes(ranges)) => {
                self.chunks.zeroes_at_begin(&self.st, &ranges);
            }
            None => {}
        }
    }

    /// Runs to END applied, writing while it goes (`write_percent` of the
    /// steps until END).
    fn run(&mut self, write_percent: u64) {
        for _ in 0..2_000_000 {
            if self.end_applied {
                return;
            }
            match self.rng.below(5) {
                0 if self.at_end.is_none() && self.rng.chance(write_percent) => self.write(),
                0 | 1 => self.step(),
                2 => self.drain(),
                3 => self.apply(),
                _ => self.hear(),
            }
        }
        panic!("the run did not end");
    }
}

#[test]
fn a_replica_equals_the_source_at_end_whatever_the_interleaving() {
    for seed in 1..300u64 {
        let mut s = Sim::new(seed, 40, 20, seed % 3 == 0, false);
        s.run(30);
        assert!(
            s.st.map.count() == 0 && s.st.differ.count() == 0,
            "seed {seed}"
        );
    }
}

#[test]
fn sending_every_chunk_without_comparing_ends_equal_too() {
    for seed in 1..100u64 {
        let mut s = Sim::new(seed, 30, 20, false, true);
        s.run(30);
        assert_eq!(s.chunks.tally.compared, 0, "seed {seed}: nothing compared");
        assert!(s.chunks.tally.sent >= 30, "seed {seed}");
    }
}

#[test]
fn without_writes_exactly_the_differing_chunks_are_sent() {
    for seed in 1..50u64 {
        let mut s = Sim::new(seed, 400, 1, false, false);
        let differing = s
            .volume
            .iter()
            .zip(&s.replica)
            .filter(|(a, b)| a != b)
            .count() as u64;
        s.lose_percent = 0;
        s.run(0);
        let t = s.chunks.tally;
        assert_eq!(t.sent, differing, "seed {seed}");
        assert_eq!(t.differing, differing, "seed {seed}");
        assert_eq!(t.compared, 400, "seed {seed}: every chunk compared once");
        assert_eq!(t.rehashed, 0);
        assert_eq!(t.equal + t.differing, t.compared);
    }
}

#[test]
fn lost_answers_are_compared_again() {
    let mut s = Sim::new(7, 200, 5, false, false);
    s.lose_percent = 50;
    s.run(0);
    assert!(s.chunks.tally.rehashed > 0);
    assert!(s.chunks.tally.compared >= 200);
}

#[test]
fn zero_ranges_at_begin_keep_the_replica_equal_whatever_the_interleaving() {
    for seed in 1..300u64 {
        let mut s = Sim::with(
            seed,
            Setup {
                replica_zero_percent: 40,
                volume_zero_percent: 30,
                dirty_only: seed % 4 == 0,
                ..Setup::new(40, 20)
            },
        );
        s.run(30);
        assert!(s.st.map.count() == 0, "seed {seed}");
    }
}

/// A run (`send_all`: a full resend) of `n` chunks, half of them zeros,
/// to a replica that reads zeros everywhere, whose zero ranges reached the
/// source before anything was compared; no answer is lost.
fn to_empty_replica(seed: u64, n: u64, send_all: bool) -> Sim {
    let mut s = Sim::with(
        seed,
        Setup {
            send_all,
            replica_zero_percent: 100,
            volume_zero_percent: 50,
            ..Setup::new(n, 0)
        },
    );
    s.lose_percent = 0;
    // BEGIN applied, its zero ranges heard.
    s.apply();
    s.hear();
    s
}

#[test]
fn an_empty_replica_compares_nothing_and_zeros_are_not_sent() {
    for seed in 1..50u64 {
        let mut s = to_empty_replica(seed, 300, false);
        let zeros = s.volume.iter().filter(|v| **v == 0).count() as u64;
        s.run(0);
        let t = s.chunks.tally;
        assert_eq!(t.compared, 0, "seed {seed}: nothing compared");
        assert_eq!(
            t.zero, zeros,
            "seed {seed}: the volume's zero chunks are not sent"
        );
        assert_eq!(
            t.sent,
            300 - zeros,
            "seed {seed}: every other chunk is sent"
        );
    }
}

#[test]
fn chunks_the_kernel_adds_are_compared_whatever_the_target_said() {
    // Writes the kernel marks (failed, or made in overflow mode) are not
    // records: after it adds chunks, the zero ranges prove nothing.
    let mut s = to_empty_replica(9, 100, false);
    assert!(s.chunks.next_zero(&s.st, 1).is_some());
    s.chunks.unissue(0, 100);
    s.chunks.forget_zeroes();
    assert_eq!(s.chunks.next_zero(&s.st, 100), None);
    s.run(0);
    assert_eq!(s.chunks.tally.zero, 0);
    assert_eq!(s.chunks.tally.compared, 100, "every chunk compared");
}

#[test]
fn first_masked_finds_a_word_at_a_time_what_next_run_would() {
    let mut rng = Rng(77);
    for _ in 0..200 {
        let n = 1 + rng.below(700);
        let mk = |rng: &mut Rng, p: u64| {
            let mut m = DirtyMap::new(n * CHUNK, CHUNK);
            for r in 0..n {
                if rng.chance(p) {
                    m.set_region(r);
                }
            }
            m
        };
        let (a, b, c) = (mk(&mut rng, 60), mk(&mut rng, 50), mk(&mut rng, 30));
        let from = rng.below(n);
        let to = from + rng.below(n - from + 1);
        let slow = (from..to).find(|&r| a.is_set(r) && b.is_set(r) && !c.is_set(r));
        assert_eq!(a.first_masked(&[&b], &[&c], from, to), slow);
    }
}

#[test]
fn a_full_resend_sends_zero_chunks_too() {
    let mut s = to_empty_replica(5, 100, true);
    s.run(0);
    assert_eq!(s.chunks.tally.zero, 0);
    assert_eq!(s.chunks.tally.sent, 100);
}

#[test]
fn next_run_skips_issued_and_wraps() {
    let mut a = DirtyMap::new(100 * CHUNK, CHUNK);
    let mut b = DirtyMap::new(100 * CHUNK, CHUNK);
    for r in [3, 4, 5, 6, 50, 90] {
        a.set_region(r);
    }
    b.set_region(5);
    assert_eq!(next_run(&a, &[], &[&b], 0, 10), Some((3, 2)));
    assert_eq!(next_run(&a, &[], &[&b], 5, 10), Some((6, 1)));
    assert_eq!(next_run(&a, &[], &[&b], 91, 10), Some((3, 2)), "wraps");
    assert_eq!(next_run(&a, &[], &[&b], 50, 10), Some((50, 1)));
    // Only regions also set in `and`.
    assert_eq!(next_run(&a, &[&b], &[], 0, 10), Some((5, 1)));
    let empty = DirtyMap::new(100 * CHUNK, CHUNK);
    assert_eq!(next_run(&empty, &[], &[], 0, 10), None);
}
