//! Userspace side of the dm-replica capture ring.
//!
//! * [`Consumer`] drains a ring in sequence order: it waits on PENDING
//!   records, reports FAILED ones and hands out COMMITTED records with their
//!   payload; it releases space explicitly, never past what it has read.
//! * [`Producer`] writes exactly the kernel's ABI into a ring file. It is used
//!   by the tests and by `replicad`'s development mode, where a ring file on
//!   tmpfs stands in for the kernel module.
//!
//! The raw memory accesses live in [`map`]; this module is safe Rust.

pub mod device;
pub mod map;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use ring_abi::{RingGeometry, GRANULE_SIZE};

pub use map::{DescFields, Mapping};

/// Ring errors.
#[derive(Debug, thiserror::Error)]
pub enum RingError {
    /// An I/O operation on the ring file or device failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The ring header is not a valid ring.
    #[error("not a dm-replica ring: {0}")]
    BadHeader(&'static str),
    /// The ring speaks another ABI version.
    #[error("ring ABI version {0} is not supported (this build speaks {v})", v = ring_abi::RING_ABI_VERSION)]
    Version(u32),
    /// A descriptor or index violates the ABI.
    #[error("ring corrupt: {0}")]
    Corrupt(&'static str),
    /// No room in the ring.
    #[error("ring full")]
    Full,
    /// A release that is not allowed.
    #[error("invalid release to sequence {0}")]
    InvalidRelease(u64),
    /// A record of a volume other than the one the consumer takes records
    /// of (a consumer of one volume of a group met another member's).
    #[error(
        "record {seq} belongs to volume index {volume} of the group, not to the replicated volume (index {expected}): groups of more than one volume are not replicated yet"
    )]
    OtherVolume {
        /// The record's sequence.
        seq: u64,
        /// Its volume index.
        volume: u32,
        /// The volume index the consumer takes.
        expected: u32,
    },
}

/// What the consumer sees at its next sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peek {
    /// Nothing published at this sequence yet.
    Empty,
    /// Published, but the write is still in flight on the source.
    Pending,
    /// The write failed on the source: never ship it; its region is dirty.
    Failed(Record),
    /// Ready: descriptor copied, payload readable with [`Consumer::read_payload`].
    Committed(Record),
}

/// A record's descriptor, validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    /// Sequence number.
    pub seq: u64,
    /// Descriptor fields.
    pub desc: DescFields,
}

impl Record {
    /// Payload length in bytes (only writes carry one).
    pub fn payload_len(&self) -> usize {
        if self.desc.op == ring_abi::OP_WRITE {
            self.desc.len as usize
        } else {
            0
        }
    }
}

/// How a consumer gives space back to the producer.
pub trait Release: Send {
    /// Moves the consumer index to `new_cons` (exclusive), with the data
    /// tail at `data_tail`.
    fn release(&mut self, map: &Mapping, new_cons: u64, data_tail: u64) -> Result<(), RingError>;

    /// Waits up to `timeout` for the producer to publish something. The
    /// default (a ring file, whose producer cannot wake anyone) sleeps
    /// briefly.
    fn wait(&mut self, _map: &Mapping, timeout: Duration) -> Result<(), RingError> {
        std::thread::sleep(timeout.min(Duration::from_millis(1)));
        Ok(())
    }
}

impl Release for Box<dyn Release> {
    fn release(&mut self, map: &Mapping, new_cons: u64, data_tail: u64) -> Result<(), RingError> {
        (**self).release(map, new_cons, data_tail)
    }

    fn wait(&mut self, map: &Mapping, timeout: Duration) -> Result<(), RingError> {
        (**self).wait(map, timeout)
    }
}

/// Release for a ring file shared with a userspace producer: the consumer
/// writes the consumer indices itself.
#[derive(Debug, Default)]
pub struct FileRelease;

impl Release for FileRelease {
    fn release(&mut self, map: &Mapping, new_cons: u64, data_tail: u64) -> Result<(), RingError> {
        let h = map.header();
        // Data tail first: the producer checks descriptor room, then data
        // room; both only ever grow.
        h.data_tail.store(data_tail, Ordering::Release);
        h.cons_seq.store(new_cons, Ordering::Release);
        Ok(())
    }
}

/// Drains a ring in order.
pub struct Consumer<R: Release = FileRelease> {
    map: Mapping,
    releaser: R,
    /// Next sequence to look at.
    next: u64,
    /// Sequence and data tail up to which records were released.
    released: u64,
    /// Data tail that goes with `next` (end of the last record looked at).
    tail_after_next: u64,
}

impl Consumer<FileRelease> {
    /// Opens a ring file written by a userspace [`Producer`].
    pub fn open_file(path: &Path) -> Result<Self, RingError> {
        Self::new(Mapping::open_file(path, true)?, FileRelease)
    }
}

impl<R: Release> Consumer<R> {
    /// A consumer over a mapping, starting at the ring's current consumer
    /// index.
    pub fn new(map: Mapping, releaser: R) -> Result<Self, RingError> {
        let h = map.header();
        let cons = h.cons_seq.load(Ordering::Acquire);
        let tail = h.data_tail.load(Ordering::Acquire);
        let prod = h.prod_seq.load(Ordering::Acquire);
        if !ring_abi::release_is_valid(cons, prod, prod)
            || ring_abi::records_live(prod, cons) > map.geometry().desc_count
        {
            return Err(RingError::Corrupt("consumer index ahead of producer"));
        }
        Ok(Self {
            map,
            releaser,
            next: cons,
            released: cons,
            tail_after_next: tail,
        })
    }

    /// The mapping.
    pub fn mapping(&self) -> &Mapping {
        &self.map
    }

    /// The next sequence this consumer will look at.
    pub fn next_seq(&self) -> u64 {
        self.next
    }

    /// Oldest sequence not yet released.
    pub fn released_seq(&self) -> u64 {
        self.released
    }

    /// The producer's index (a hint; stamps decide).
    pub fn producer_seq(&self) -> u64 {
        self.map.header().prod_seq.load(Ordering::Acquire)
    }

    /// Submission time (ns since the epoch) of a record the consumer has
    /// not released yet, if it is published.
    pub fn submit_ns(&self, seq: u64) -> Option<u64> {
        let prod = self.producer_seq();
        if !ring_abi::release_is_valid(self.released, prod, seq) || seq == prod {
            return None;
        }
        let st = ring_abi::load_stamp(self.map.stamp(seq));
        ring_abi::stamp_is_for(st, seq).then(|| self.map.read_desc(seq).submit_ns)
    }

    /// Bytes of the data ring holding records not yet released.
    pub fn data_bytes_in_use(&self) -> u64 {
        let h = self.map.header();
        h.data_head
            .load(Ordering::Acquire)
            .wrapping_sub(h.data_tail.load(Ordering::Acquire))
            .min(self.map.geometry().data_granules)
            * ring_abi::GRANULE_SIZE
    }

    /// Ring flags (`RING_FLAG_*`).
    pub fn flags(&self) -> u32 {
        self.map.header().flags.load(Ordering::Acquire)
    }

    /// Whether the producer overflowed (writes went to the dirty bitmap).
    pub fn overflowing(&self) -> bool {
        self.flags() & ring_abi::RING_FLAG_OVERFLOW != 0
    }

    /// Whether the ring is dead (no more records will come). Records
    /// already in it can still be read.
    pub fn is_dead(&self) -> bool {
        self.flags() & ring_abi::RING_FLAG_DEAD != 0
    }

    /// Regions the producer has marked dirty (failed writes, overflow).
    pub fn dirty_regions(&self) -> u64 {
        self.map.header().dirty_regions.load(Ordering::Acquire)
    }

    /// Waits up to `timeout` for the producer to publish something.
    pub fn wait(&mut self, timeout: Duration) -> Result<(), RingError> {
        self.releaser.wait(&self.map, timeout)
    }

    /// The release mechanism (for a kernel ring: the control device).
    pub fn releaser(&self) -> &R {
        &self.releaser
    }

    /// The same consumer with its release mechanism boxed, so consumers of
    /// ring files and of the kernel's rings have one type.
    pub fn boxed(self) -> Consumer<Box<dyn Release>>
    where
        R: 'static,
    {
        Consumer {
            map: self.map,
            releaser: Box::new(self.releaser),
            next: self.next,
            released: self.released,
            tail_after_next: self.tail_after_next,
        }
    }

    /// Looks at the record at the next sequence without consuming it.
    pub fn peek(&self) -> Result<Peek, RingError> {
        let seq = self.next;
        let prod = self.producer_seq();
        if prod == seq || !ring_abi::release_is_valid(seq, prod, prod) {
            // Not reserved yet (or the producer index is from the future,
            // which a valid producer never shows).
            return Ok(Peek::Empty);
        }
        let st = ring_abi::load_stamp(self.map.stamp(seq));
        if !ring_abi::stamp_is_for(st, seq) {
            return Ok(Peek::Empty);
        }
        let state = ring_abi::stamp_state(st);
        if state == ring_abi::STATE_PENDING {
            return Ok(Peek::Pending);
        }
        if state != ring_abi::STATE_COMMITTED && state != ring_abi::STATE_FAILED {
            return Ok(Peek::Empty);
        }
        let desc = self.map.read_desc(seq);
        self.validate(&desc)?;
        let rec = Record { seq, desc };
        Ok(if state == ring_abi::STATE_COMMITTED {
            Peek::Committed(rec)
        } else {
            Peek::Failed(rec)
        })
    }

    fn validate(&self, d: &DescFields) -> Result<(), RingError> {
        let g = self.map.geometry();
        let want_granules = match d.op {
            ring_abi::OP_WRITE => ring_abi::granules_for(d.len),
            ring_abi::OP_FLUSH | ring_abi::OP_MARKER => {
                if d.len != 0 {
                    return Err(RingError::Corrupt("flush or marker with a length"));
                }
                0
            }
            ring_abi::OP_DISCARD | ring_abi::OP_WRITE_ZEROES => 0,
            _ => return Err(RingError::Corrupt("unknown record operation")),
        };
        if u64::from(d.granules) != want_granules {
            return Err(RingError::Corrupt(
                "payload granules do not match the length",
            ));
        }
        if u64::from(d.len) % ring_abi::SECTOR_SIZE != 0 {
            return Err(RingError::Corrupt(
                "length not a multiple of the sector size",
            ));
        }
        // The payload must start at or after the end of the previous record,
        // at most one padding lap away, and not cross the end of the ring.
        let gap = d.data_pos.wrapping_sub(self.tail_after_next);
        if gap >= g.data_granules || want_granules > g.data_granules {
            return Err(RingError::Corrupt("payload outside the live data ring"));
        }
        let off = d.data_pos & (g.data_granules - 1);
        if off + want_granules > g.data_granules {
            return Err(RingError::Corrupt(
                "payload crosses the end of the data ring",
            ));
        }
        Ok(())
    }

    /// Copies the payload of a committed record into `out` (resized to the
    /// payload length).
    pub fn read_payload(&self, rec: &Record, out: &mut Vec<u8>) -> Result<(), RingError> {
        out.resize(rec.payload_len(), 0);
        if !out.is_empty() {
            self.map.read_data(rec.desc.data_pos, out)?;
        }
        Ok(())
    }

    /// Appends the payload of a committed record to `out` (one copy, from
    /// the ring into the caller's buffer).
    pub fn append_payload(&self, rec: &Record, out: &mut Vec<u8>) -> Result<(), RingError> {
        let start = out.len();
        out.resize(start + rec.payload_len(), 0);
        if rec.payload_len() > 0 {
            self.map.read_data(rec.desc.data_pos, &mut out[start..])?;
        }
        Ok(())
    }

    /// Moves the read position back (or forward) to `seq`, which must lie
    /// between the released position and the current read position: after
    /// a reconnect, records the target did not acknowledge are read again.
    pub fn rewind(&mut self, seq: u64) -> Result<(), RingError> {
        if !ring_abi::release_is_valid(self.released, self.next, seq) {
            return Err(RingError::InvalidRelease(seq));
        }
        self.tail_after_next = if seq == self.released {
            self.map.header().data_tail.load(Ordering::Acquire)
        } else {
            let d = self.map.read_desc(seq.wrapping_sub(1));
            d.data_pos.wrapping_add(u64::from(d.granules))
        };
        self.next = seq;
        Ok(())
    }

    /// Steps past the record at the next sequence (after [`Self::peek`]
    /// returned it as committed or failed). Its space stays reserved until
    /// [`Self::release`].
    pub fn advance(&mut self, rec: &Record) {
        debug_assert_eq!(rec.seq, self.next);
        self.next = self.next.wrapping_add(1);
        self.tail_after_next = rec.desc.data_pos.wrapping_add(u64::from(rec.desc.granules));
    }

    /// Releases every record before `upto` (exclusive) back to the producer.
    /// `upto` must not pass what this consumer has advanced over.
    pub fn release(&mut self, upto: u64) -> Result<(), RingError> {
        if !ring_abi::release_is_valid(self.released, self.next, upto) {
            return Err(RingError::InvalidRelease(upto));
        }
        if upto == self.released {
            return Ok(());
        }
        // The last released record is still ours (not yet released), so its
        // descriptor is stable; the data tail is the end of its payload.
        let last = self.map.read_desc(upto.wrapping_sub(1));
        let tail = last.data_pos.wrapping_add(u64::from(last.granules));
        self.releaser.release(&self.map, upto, tail)?;
        self.released = upto;
        Ok(())
    }
}

/// A userspace producer that writes exactly the kernel's ring ABI into a
/// ring file. It reserves in order and completes in any order, like the
/// kernel does with in-flight bios.
pub struct Producer {
    map: Mapping,
    next_seq: u64,
    head: u64,
    geometry: RingGeometry,
}

/// Wall-clock time in ns since the Unix epoch (0 if the clock is before it).
pub fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Parameters of a new ring.
#[derive(Debug, Clone, Copy)]
pub struct RingParams {
    /// Descriptors (power of two).
    pub desc_count: u64,
    /// Data granules (power of two).
    pub data_granules: u64,
    /// Generation id.
    pub generation: [u8; 16],
    /// First sequence.
    pub first_seq: u64,
    /// First data granule index (tests start near 2^64 to exercise wrap).
    pub first_granule: u64,
}

impl Producer {
    /// Creates a ring file with a fresh header.
    pub fn create(path: &Path, params: RingParams) -> Result<Self, RingError> {
        let geometry = ring_abi::geometry(params.desc_count, params.data_granules)
            .ok_or(RingError::BadHeader("counts must be powers of two"))?;
        let (mut map, _file) = Mapping::create_file(path, geometry)?;
        map.init_header(params.generation, params.first_seq, params.first_granule);
        Ok(Self {
            map,
            next_seq: params.first_seq,
            head: params.first_granule,
            geometry,
        })
    }

    /// Reattaches to an existing ring file (e.g. a restarted test producer).
    pub fn open(path: &Path) -> Result<Self, RingError> {
        let map = Mapping::open_file(path, true)?;
        let h = map.header();
        let next_seq = h.prod_seq.load(Ordering::Acquire);
        let head = h.data_head.load(Ordering::Acquire);
        let geometry = map.geometry();
        Ok(Self {
            map,
            next_seq,
            head,
            geometry,
        })
    }

    /// The generation id.
    pub fn generation(&self) -> [u8; 16] {
        self.map.generation()
    }

    /// Next sequence to be reserved.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Records reserved and not yet released by the consumer.
    pub fn live(&self) -> u64 {
        ring_abi::records_live(
            self.next_seq,
            self.map.header().cons_seq.load(Ordering::Acquire),
        )
    }

    /// Sets or clears ring flags.
    pub fn set_flags(&self, set: u32, clear: u32) {
        let h = self.map.header();
        h.flags.fetch_or(set, Ordering::AcqRel);
        h.flags.fetch_and(!clear, Ordering::AcqRel);
    }

    /// Reserves and publishes (PENDING) a record. `payload` must be empty
    /// unless `op` is `OP_WRITE`, where its length must equal `len`.
    pub fn reserve(&mut self, mut fields: DescFields, payload: &[u8]) -> Result<u64, RingError> {
        let h = self.map.header();
        let cons = h.cons_seq.load(Ordering::Acquire);
        if !ring_abi::desc_has_room(self.next_seq, cons, self.geometry.desc_count) {
            return Err(RingError::Full);
        }
        let need = ring_abi::granules_for(payload.len() as u32);
        let tail = h.data_tail.load(Ordering::Acquire);
        let (pos, new_head) =
            ring_abi::reserve_data(self.head, tail, self.geometry.data_granules, need)
                .ok_or(RingError::Full)?;
        fields.data_pos = pos;
        fields.granules = need as u32;
        let seq = self.next_seq;
        self.map.write_desc(seq, &fields);
        if !payload.is_empty() {
            self.map.write_data(pos, payload)?;
            // Zero the rest of the last granule so stale bytes never linger.
            let rem = payload.len() as u64 % GRANULE_SIZE;
            if rem != 0 {
                self.map
                    .zero_data(pos, payload.len(), (GRANULE_SIZE - rem) as usize)?;
            }
        }
        ring_abi::publish_stamp(self.map.stamp(seq), seq, ring_abi::STATE_PENDING);
        self.next_seq = seq.wrapping_add(1);
        self.head = new_head;
        h.data_head.store(new_head, Ordering::Release);
        h.prod_seq.store(self.next_seq, Ordering::Release);
        Ok(seq)
    }

    /// Marks a reserved record COMMITTED (`ok`) or FAILED.
    pub fn complete(&self, seq: u64, ok: bool) {
        self.map.set_complete_ns(seq, now_ns());
        let state = if ok {
            ring_abi::STATE_COMMITTED
        } else {
            ring_abi::STATE_FAILED
        };
        ring_abi::publish_stamp(self.map.stamp(seq), seq, state);
    }
}
