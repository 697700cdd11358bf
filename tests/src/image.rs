//! The reference model of the source volume: a userspace ring producer
//! that writes exactly the kernel's ring ABI, the image (and recovery
//! points) the replica must match, workloads and their generator.

use std::path::Path;
use std::time::{Duration, Instant};

use replica_ring::{DescFields, Producer, RingError, RingParams};
use ring_abi::{OP_DISCARD, OP_FLUSH, OP_MARKER, OP_WRITE, OP_WRITE_ZEROES};

/// A small deterministic generator (xorshift64*), so every seed replays.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded generator.
    pub fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    /// Next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    /// Uniform in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    /// Fills a buffer.
    pub fn fill(&mut self, b: &mut [u8]) {
        for c in b.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            c.copy_from_slice(&v[..c.len()]);
        }
    }
}

/// One operation of a workload.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write `len` bytes of fresh data at `sector`; `ok = false` makes the
    /// write fail on the "source disk" (never applied, never shipped).
    Write {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
        /// Succeeds on the source.
        ok: bool,
    },
    /// Flush (a recovery point on the target).
    Flush,
    /// Discard.
    Discard {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Write zeroes.
    Zeroes {
        /// Sector.
        sector: u64,
        /// Bytes.
        len: u32,
    },
    /// Marker.
    Marker(u64),
}

/// The source volume as the kernel would see it, plus the ring producer.
pub struct Source {
    /// Producer into the ring file.
    pub producer: Producer,
    /// Current content of the source volume.
    pub image: Vec<u8>,
    /// Bytes whose content is unspecified (discarded since last written).
    pub masked: Vec<bool>,
    /// Image (and mask) as of each flush or marker, by record sequence.
    pub points: std::collections::BTreeMap<u64, (Vec<u8>, Vec<bool>)>,
    /// Last record sequence produced.
    pub last_seq: u64,
    /// Failed writes (sector, len).
    pub failed: Vec<(u64, u32)>,
    rng: Rng,
    keep_points: bool,
}

impl Source {
    /// A fresh ring file and a zeroed volume of `size` bytes.
    pub fn create(
        ring: &Path,
        size: usize,
        desc_count: u64,
        data_granules: u64,
        seed: u64,
    ) -> Self {
        let producer = Producer::create(
            ring,
            RingParams {
                desc_count,
                data_granules,
                generation: replica_proto::keys::random16().expect("rand"),
                first_seq: 1,
                first_granule: 0,
            },
        )
        .expect("create ring");
        Self {
            producer,
            image: vec![0; size],
            masked: vec![false; size],
            points: Default::default(),
            last_seq: 0,
            failed: Vec::new(),
            rng: Rng::new(seed),
            keep_points: true,
        }
    }

    /// Do not keep images per flush (large workloads).
    pub fn without_point_images(mut self) -> Self {
        self.keep_points = false;
        self
    }

    /// Reserves a record, waiting (up to a deadline) while the ring is full
    /// unless `nowait`.
    fn reserve(&mut self, f: DescFields, payload: &[u8], nowait: bool) -> Option<u64> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.producer.reserve(f, payload) {
                Ok(s) => return Some(s),
                Err(RingError::Full) if nowait => return None,
                Err(RingError::Full) => {
                    assert!(
                        Instant::now() < deadline,
                        "ring stayed full for 60 s: the source daemon is not draining"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                Err(e) => panic!("reserve: {e}"),
            }
        }
    }

    /// Applies one operation to the model and the ring, waiting for ring
    /// space.
    pub fn apply(&mut self, op: &Op) {
        self.apply_inner(op, false);
    }

    /// Applies one operation if the ring has room now; returns false (and
    /// changes nothing) if it is full.
    pub fn try_apply(&mut self, op: &Op) -> bool {
        self.apply_inner(op, true)
    }

    fn apply_inner(&mut self, op: &Op, nowait: bool) -> bool {
        let submit_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        // What the kernel would capture: one record, completed at once.
        let mut data = Vec::new();
        let (fields, ok) = match *op {
            Op::Write { sector, len, ok } => {
                data = vec![0u8; len as usize];
                self.rng.fill(&mut data);
                (
                    DescFields {
                        op: OP_WRITE,
                        sector,
                        len,
                        ..Default::default()
                    },
                    ok,
                )
            }
            Op::Flush => (
                DescFields {
                    op: OP_FLUSH,
                    ..Default::default()
                },
                true,
            ),
            Op::Marker(aux) => (
                DescFields {
                    op: OP_MARKER,
                    aux,
                    ..Default::default()
                },
                true,
            ),
            Op::Discard { sector, len } => (
                DescFields {
                    op: OP_DISCARD,
                    sector,
                    len,
                    ..Default::default()
                },
                true,
            ),
            Op::Zeroes { sector, len } => (
                DescFields {
                    op: OP_WRITE_ZEROES,
                    sector,
                    len,
                    ..Default::default()
                },
                true,
            ),
        };
        let Some(seq) = self.reserve(
            DescFields {
                submit_ns,
                ..fields
            },
            &data,
            nowait,
        ) else {
            return false;
        };
        self.producer.complete(seq, ok);
        self.last_seq = seq;
        // The model of the source volume.
        let range =
            (fields.sector * 512) as usize..(fields.sector * 512) as usize + fields.len as usize;
        match *op {
            Op::Write {
                sector,
                len,
                ok: false,
            } => self.failed.push((sector, len)),
            Op::Write { .. } => {
                self.image[range.clone()].copy_from_slice(&data);
                self.masked[range].fill(false);
            }
            Op::Flush | Op::Marker(_) => {
                if self.keep_points {
                    self.points
                        .insert(seq, (self.image.clone(), self.masked.clone()));
                }
            }
            Op::Discard { .. } => {
                self.image[range.clone()].fill(0);
                self.masked[range].fill(true);
            }
            Op::Zeroes { .. } => self.image[range].fill(0),
        }
        true
    }

    /// A random operation within a volume of `size` bytes.
    pub fn random_op(&mut self, max_len_sectors: u64) -> Op {
        let sectors = self.image.len() as u64 / 512;
        let len = (1 + self.rng.below(max_len_sectors)).min(sectors);
        let sector = self.rng.below(sectors - len + 1);
        let len = (len * 512) as u32;
        match self.rng.below(100) {
            0..=74 => Op::Write {
                sector,
                len,
                ok: true,
            },
            75..=84 => Op::Flush,
            85..=90 => Op::Discard { sector, len },
            91..=95 => Op::Zeroes { sector, len },
            _ => Op::Marker(self.rng.next_u64()),
        }
    }
}

/// Compares `got` with `want`, ignoring masked bytes; returns the first
/// differing offset.
pub fn first_difference(got: &[u8], want: &[u8], masked: &[bool]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    (0..got.len()).find(|&i| got[i] != want[i] && !masked[i])
}
