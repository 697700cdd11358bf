// SPDX-License-Identifier: GPL-2.0 OR MIT

//! The capture logic of the `replica` target, free of kernel and `unsafe`.
//!
//! [`Capture`] is the producer side of one group's ring, as the kernel keeps
//! it (its own copy; it never trusts memory a process can write):
//!
//! * reservation of a sequence and data granules in submission order
//!   ([`Capture::reserve`]);
//! * the set of data-changing records still in flight, and whether a new one
//!   overlaps an earlier one (then it is *held* and submitted only when every
//!   earlier overlapping write has completed, so the disk's order of
//!   overlapping writes is the ring's order);
//! * completion ([`Capture::complete`]), the consumer's validated release
//!   ([`Capture::release`]) and the overflow flag;
//! * per-volume dirty-region bitmaps ([`Dirty`]).
//!
//! Storage is supplied by the caller (any `DerefMut<Target = [_]>`: a kernel
//! `KVVec` in the module, a `Vec` in host tests), so this file needs nothing
//! beyond `core` and compiles with both toolchains. Every index computation
//! is wrapping or checked: the kernel builds Rust with overflow checks.

use core::ops::DerefMut;

use crate::ring_abi as abi;

/// The kind of a captured record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecOp {
    /// Data written; payload in the ring.
    Write,
    /// Cache flush (no data).
    Flush,
    /// Discard (no payload).
    Discard,
    /// Zeroes written (no payload).
    WriteZeroes,
    /// Marker requested by the administrator (no data).
    Marker,
}

impl RecOp {
    /// The ABI's `OP_*` value.
    pub(crate) const fn abi(self) -> u8 {
        match self {
            RecOp::Write => abi::OP_WRITE,
            RecOp::Flush => abi::OP_FLUSH,
            RecOp::Discard => abi::OP_DISCARD,
            RecOp::WriteZeroes => abi::OP_WRITE_ZEROES,
            RecOp::Marker => abi::OP_MARKER,
        }
    }

    /// From the ABI's `OP_*` value.
    pub(crate) const fn from_abi(op: u8) -> Option<Self> {
        match op {
            abi::OP_WRITE => Some(RecOp::Write),
            abi::OP_FLUSH => Some(RecOp::Flush),
            abi::OP_DISCARD => Some(RecOp::Discard),
            abi::OP_WRITE_ZEROES => Some(RecOp::WriteZeroes),
            abi::OP_MARKER => Some(RecOp::Marker),
            _ => None,
        }
    }

    /// Whether the operation changes data on the volume (and so takes part
    /// in overlap ordering and dirty tracking).
    pub(crate) const fn changes_data(self) -> bool {
        matches!(self, RecOp::Write | RecOp::Discard | RecOp::WriteZeroes)
    }
}

/// A request to capture one operation.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Request {
    /// What it is.
    pub(crate) op: RecOp,
    /// Volume index within the group.
    pub(crate) volume: u32,
    /// First sector on the volume.
    pub(crate) sector: u64,
    /// Bytes affected (0 for flush and marker).
    pub(crate) len: u32,
}

impl Request {
    /// Sector range `[start, end)` it affects, or `None` if the range
    /// overflows (never for a valid bio).
    fn range(&self) -> Option<(u64, u64)> {
        let sectors = u64::from(self.len) >> 9;
        Some((self.sector, self.sector.checked_add(sectors)?))
    }

    /// Data granules its payload takes.
    pub(crate) fn granules(&self) -> u64 {
        match self.op {
            RecOp::Write => abi::granules_for(self.len),
            _ => 0,
        }
    }
}

/// Every field of a record descriptor after its stamp, as the producer
/// writes them before publishing the stamp.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DescBody {
    /// First sector on the volume.
    pub(crate) sector: u64,
    /// First data granule (free-running).
    pub(crate) data_pos: u64,
    /// Submission time, ns since the Unix epoch.
    pub(crate) submit_ns: u64,
    /// Bytes affected.
    pub(crate) len: u32,
    /// Payload granules.
    pub(crate) granules: u32,
    /// Volume index.
    pub(crate) volume: u32,
    /// `OP_*`.
    pub(crate) op: u8,
    /// `FLAG_*`.
    pub(crate) flags: u8,
    /// Marker id for a marker, else 0.
    pub(crate) aux: u64,
    /// Completion time (0 until completed).
    pub(crate) complete_ns: u64,
}

/// Number of 64-bit words of a descriptor after the stamp.
pub(crate) const DESC_BODY_WORDS: usize = (abi::DESC_SIZE as usize - 8) / 8;

// The layout `DescBody::words` writes (the ABI's `RecordDesc`).
const _: () = {
    use core::mem::offset_of;
    assert!(offset_of!(abi::RecordDesc, stamp) == 0);
    assert!(offset_of!(abi::RecordDesc, sector) == 8);
    assert!(offset_of!(abi::RecordDesc, data_pos) == 16);
    assert!(offset_of!(abi::RecordDesc, submit_ns) == 24);
    assert!(offset_of!(abi::RecordDesc, len) == 32);
    assert!(offset_of!(abi::RecordDesc, granules) == 36);
    assert!(offset_of!(abi::RecordDesc, volume) == 40);
    assert!(offset_of!(abi::RecordDesc, op) == 44);
    assert!(offset_of!(abi::RecordDesc, flags) == 45);
    assert!(offset_of!(abi::RecordDesc, _reserved0) == 46);
    assert!(offset_of!(abi::RecordDesc, aux) == 48);
    assert!(offset_of!(abi::RecordDesc, complete_ns) == 56);
    assert!(DESC_BODY_WORDS == 7);
};

/// Two 4-byte native-endian fields as the word they share in memory.
const fn pack(lo: [u8; 4], hi: [u8; 4]) -> u64 {
    u64::from_ne_bytes([lo[0], lo[1], lo[2], lo[3], hi[0], hi[1], hi[2], hi[3]])
}

impl DescBody {
    /// The descriptor bytes `[8, DESC_SIZE)` as native-endian words, to be
    /// stored at byte offset 8 of the descriptor: seven aligned word stores
    /// instead of one store per field.
    pub(crate) const fn words(&self) -> [u64; DESC_BODY_WORDS] {
        [
            self.sector,
            self.data_pos,
            self.submit_ns,
            pack(self.len.to_ne_bytes(), self.granules.to_ne_bytes()),
            pack(self.volume.to_ne_bytes(), [self.op, self.flags, 0, 0]),
            self.aux,
            self.complete_ns,
        ]
    }
}

/// State of a descriptor slot in the kernel's copy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) enum SlotState {
    /// Not reserved (released, or never used).
    #[default]
    Free,
    /// Reserved and published PENDING; the I/O has not completed.
    Pending,
    /// Completed (COMMITTED or FAILED): the consumer may release it.
    Done,
}

/// The kernel's private copy of one descriptor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Slot {
    seq: u64,
    state: SlotState,
    op_changes_data: bool,
    /// Not yet submitted: waiting for earlier overlapping writes.
    held: bool,
    volume: u32,
    start: u64,
    end: u64,
    data_pos: u64,
    granules: u32,
    /// Position in the in-flight list while in flight and data-changing.
    inflight_pos: u32,
}

/// Where a reserved record goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Reserved {
    /// Its sequence.
    pub(crate) seq: u64,
    /// First data granule (free-running).
    pub(crate) data_pos: u64,
    /// Payload granules.
    pub(crate) granules: u32,
    /// It overlaps an earlier write still in flight: hold it back.
    pub(crate) blocked: bool,
}

/// A completed record's identity, for dirty tracking of failures.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Completed {
    /// Volume index.
    pub(crate) volume: u32,
    /// First sector.
    pub(crate) start: u64,
    /// End sector (exclusive).
    pub(crate) end: u64,
    /// Whether held records are waiting (some may now be submittable).
    pub(crate) held_waiting: bool,
}

/// Why a capture operation was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CaptureError {
    /// No room for the record in the descriptor or data ring.
    Full,
    /// The request itself is invalid (range overflow, payload larger than
    /// the data ring, empty write).
    Invalid,
    /// An internal invariant does not hold (a bug; reported, never a panic).
    Internal,
}

/// Why a release was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ReleaseError {
    /// Backwards, or past what was produced.
    OutOfRange,
    /// A record in the range is still in flight.
    InFlight,
}

/// Counters for status reporting.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Stats {
    /// Records captured.
    pub(crate) records: u64,
    /// Payload bytes captured.
    pub(crate) bytes: u64,
    /// Writes held back behind an overlapping in-flight write.
    pub(crate) held: u64,
    /// Writes that failed on the data device.
    pub(crate) failed: u64,
    /// Data-changing requests not captured because the ring overflowed.
    pub(crate) overflowed: u64,
    /// Times the ring overflowed.
    pub(crate) overflows: u64,
}

/// The producer side of one ring.
///
/// # Invariants
///
/// * `slots.len() == desc_count`, `inflight.len() == desc_count`, both
///   powers of two (checked by [`Capture::new`]).
/// * Slots of sequences in `[cons_seq, prod_seq)` are Pending or Done and
///   carry their sequence; all others are Free.
/// * `inflight[..n_inflight]` lists exactly the Pending data-changing
///   records, and each one's `inflight_pos` is its index there.
/// * `n_held` counts the slots with `held` set, all of them in flight.
pub(crate) struct Capture<S, I> {
    desc_count: u64,
    data_granules: u64,
    prod_seq: u64,
    cons_seq: u64,
    data_head: u64,
    data_tail: u64,
    slots: S,
    inflight: I,
    n_inflight: usize,
    n_held: usize,
    overflow: bool,
    overflow_seq: u64,
    /// Counters.
    pub(crate) stats: Stats,
}

/// `a` comes before `b` in the free-running sequence space.
#[inline]
pub(crate) const fn seq_before(a: u64, b: u64) -> bool {
    let d = b.wrapping_sub(a);
    d != 0 && d < (1 << 63)
}

impl<S, I> Capture<S, I>
where
    S: DerefMut<Target = [Slot]>,
    I: DerefMut<Target = [u64]>,
{
    /// A producer over empty storage: `slots` and `inflight` must each have
    /// `desc_count` entries (default slots). Sequences start at `first_seq`,
    /// data granules at `first_granule`.
    pub(crate) fn new(
        geometry: abi::RingGeometry,
        slots: S,
        inflight: I,
        first_seq: u64,
        first_granule: u64,
    ) -> Option<Self> {
        let n = usize::try_from(geometry.desc_count).ok()?;
        if slots.len() != n || inflight.len() != n || !geometry.desc_count.is_power_of_two() {
            return None;
        }
        u32::try_from(geometry.desc_count).ok()?;
        Some(Self {
            desc_count: geometry.desc_count,
            data_granules: geometry.data_granules,
            prod_seq: first_seq,
            cons_seq: first_seq,
            data_head: first_granule,
            data_tail: first_granule,
            slots,
            inflight,
            n_inflight: 0,
            n_held: 0,
            overflow: false,
            overflow_seq: first_seq,
            stats: Stats::default(),
        })
    }

    /// Next sequence to be reserved.
    pub(crate) fn prod_seq(&self) -> u64 {
        self.prod_seq
    }

    /// Oldest sequence not released.
    pub(crate) fn cons_seq(&self) -> u64 {
        self.cons_seq
    }

    /// Next data granule to be reserved.
    pub(crate) fn data_head(&self) -> u64 {
        self.data_head
    }

    /// Oldest data granule not released.
    #[allow(dead_code)] // Used by the host tests.
    pub(crate) fn data_tail(&self) -> u64 {
        self.data_tail
    }

    /// Records reserved and not released.
    pub(crate) fn live(&self) -> u64 {
        abi::records_live(self.prod_seq, self.cons_seq)
    }

    /// Data granules in use (including padding).
    pub(crate) fn granules_used(&self) -> u64 {
        self.data_head.wrapping_sub(self.data_tail)
    }

    /// Data-changing records in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.n_inflight
    }

    /// Records held back.
    pub(crate) fn held(&self) -> usize {
        self.n_held
    }

    /// Whether capture has overflowed (writes go to the dirty bitmap only).
    pub(crate) fn overflowing(&self) -> bool {
        self.overflow
    }

    /// While overflowing: the first sequence not captured.
    pub(crate) fn overflow_seq(&self) -> u64 {
        self.overflow_seq
    }

    /// Switches to overflow: from now on nothing is captured until
    /// [`Self::clear_overflow`].
    pub(crate) fn enter_overflow(&mut self) {
        if !self.overflow {
            self.overflow = true;
            self.overflow_seq = self.prod_seq;
            self.stats.overflows = self.stats.overflows.wrapping_add(1);
        }
    }

    /// Ends overflow (a resync starts): capture resumes at the returned
    /// sequence.
    pub(crate) fn clear_overflow(&mut self) -> u64 {
        self.overflow = false;
        self.prod_seq
    }

    fn slot_index(&self, seq: u64) -> usize {
        // The mask keeps it below desc_count, which fits usize (checked in new).
        abi::desc_slot(seq, self.desc_count) as usize
    }

    fn slot(&self, seq: u64) -> Option<&Slot> {
        self.slots.get(self.slot_index(seq))
    }

    fn slot_mut(&mut self, seq: u64) -> Option<&mut Slot> {
        let i = self.slot_index(seq);
        self.slots.get_mut(i)
    }

    /// Whether an in-flight data-changing record before `seq` overlaps
    /// `[start, end)` of `volume`.
    fn overlaps_earlier(&self, volume: u32, start: u64, end: u64, seq: u64) -> bool {
        let live = self.inflight.get(..self.n_inflight).unwrap_or(&[]);
        live.iter().any(|&other| {
            if !seq_before(other, seq) {
                return false;
            }
            match self.slot(other) {
                Some(s) => s.volume == volume && s.start < end && start < s.end,
                None => false,
            }
        })
    }

    /// Reserves the next sequence (and payload granules for a write).
    pub(crate) fn reserve(&mut self, req: &Request) -> Result<Reserved, CaptureError> {
        let (start, end) = req.range().ok_or(CaptureError::Invalid)?;
        let need = req.granules();
        if need > self.data_granules || (req.op == RecOp::Write && req.len == 0) {
            return Err(CaptureError::Invalid);
        }
        let granules = u32::try_from(need).map_err(|_| CaptureError::Invalid)?;
        if !abi::desc_has_room(self.prod_seq, self.cons_seq, self.desc_count) {
            return Err(CaptureError::Full);
        }
        let (data_pos, new_head) =
            abi::reserve_data(self.data_head, self.data_tail, self.data_granules, need)
                .ok_or(CaptureError::Full)?;
        let seq = self.prod_seq;
        let changes = req.op.changes_data();
        let blocked = changes && self.overlaps_earlier(req.volume, start, end, seq);
        let pos = self.n_inflight;
        let pos32 = u32::try_from(pos).map_err(|_| CaptureError::Internal)?;
        if changes {
            // There is always room: every in-flight record holds a slot.
            *self.inflight.get_mut(pos).ok_or(CaptureError::Internal)? = seq;
        }
        let slot = self.slot_mut(seq).ok_or(CaptureError::Internal)?;
        if slot.state != SlotState::Free {
            return Err(CaptureError::Internal);
        }
        *slot = Slot {
            seq,
            state: SlotState::Pending,
            op_changes_data: changes,
            held: false,
            volume: req.volume,
            start,
            end,
            data_pos,
            granules,
            inflight_pos: pos32,
        };
        if changes {
            self.n_inflight = pos.wrapping_add(1);
        }
        self.prod_seq = seq.wrapping_add(1);
        self.data_head = new_head;
        self.stats.records = self.stats.records.wrapping_add(1);
        if req.op == RecOp::Write {
            self.stats.bytes = self.stats.bytes.wrapping_add(u64::from(req.len));
        }
        Ok(Reserved {
            seq,
            data_pos,
            granules,
            blocked,
        })
    }

    /// Whether the in-flight record `seq` still has to wait for an earlier
    /// overlapping write.
    pub(crate) fn is_blocked(&self, seq: u64) -> bool {
        match self.slot(seq) {
            Some(s) if s.seq == seq && s.state == SlotState::Pending && s.op_changes_data => {
                self.overlaps_earlier(s.volume, s.start, s.end, seq)
            }
            _ => false,
        }
    }

    /// Marks the in-flight record `seq` as held (its bio parked until
    /// [`Self::next_unblocked_held`] returns it).
    pub(crate) fn set_held(&mut self, seq: u64) -> Result<(), CaptureError> {
        let slot = self.slot_mut(seq).ok_or(CaptureError::Internal)?;
        if slot.seq != seq || slot.state != SlotState::Pending || slot.held {
            return Err(CaptureError::Internal);
        }
        slot.held = true;
        self.n_held = self.n_held.wrapping_add(1);
        self.stats.held = self.stats.held.wrapping_add(1);
        Ok(())
    }

    /// A held record that no earlier in-flight write blocks any more; it is
    /// no longer held (the caller submits it).
    pub(crate) fn next_unblocked_held(&mut self) -> Option<u64> {
        if self.n_held == 0 {
            return None;
        }
        let live = self.inflight.get(..self.n_inflight)?;
        let found = live.iter().copied().find(|&seq| match self.slot(seq) {
            Some(s) if s.held => !self.overlaps_earlier(s.volume, s.start, s.end, seq),
            _ => false,
        })?;
        if let Some(s) = self.slot_mut(found) {
            s.held = false;
        }
        self.n_held = self.n_held.wrapping_sub(1);
        Some(found)
    }

    /// Records the completion of `seq` (`ok` false: the I/O failed).
    pub(crate) fn complete(&mut self, seq: u64, ok: bool) -> Result<Completed, CaptureError> {
        let slot = self.slot_mut(seq).ok_or(CaptureError::Internal)?;
        if slot.seq != seq || slot.state != SlotState::Pending || slot.held {
            return Err(CaptureError::Internal);
        }
        slot.state = SlotState::Done;
        let done = *slot;
        if done.op_changes_data {
            self.remove_inflight(done.inflight_pos)?;
        }
        if !ok {
            self.stats.failed = self.stats.failed.wrapping_add(1);
        }
        Ok(Completed {
            volume: done.volume,
            start: done.start,
            end: done.end,
            held_waiting: self.n_held > 0,
        })
    }

    fn remove_inflight(&mut self, pos: u32) -> Result<(), CaptureError> {
        let pos = pos as usize;
        let last = self.n_inflight.checked_sub(1).ok_or(CaptureError::Internal)?;
        if pos > last {
            return Err(CaptureError::Internal);
        }
        let moved = *self.inflight.get(last).ok_or(CaptureError::Internal)?;
        *self.inflight.get_mut(pos).ok_or(CaptureError::Internal)? = moved;
        self.n_inflight = last;
        if pos != last {
            let p32 = u32::try_from(pos).map_err(|_| CaptureError::Internal)?;
            self.slot_mut(moved).ok_or(CaptureError::Internal)?.inflight_pos = p32;
        }
        Ok(())
    }

    /// Validates and applies the consumer's release of every record before
    /// `new_cons`. Returns the new data tail.
    pub(crate) fn release(&mut self, new_cons: u64) -> Result<u64, ReleaseError> {
        if !abi::release_is_valid(self.cons_seq, self.prod_seq, new_cons) {
            return Err(ReleaseError::OutOfRange);
        }
        if new_cons == self.cons_seq {
            return Ok(self.data_tail);
        }
        let mut s = self.cons_seq;
        while s != new_cons {
            match self.slot(s) {
                Some(slot) if slot.seq == s && slot.state == SlotState::Done => {}
                _ => return Err(ReleaseError::InFlight),
            }
            s = s.wrapping_add(1);
        }
        let last = self.slot(new_cons.wrapping_sub(1)).copied().unwrap_or_default();
        let tail = last.data_pos.wrapping_add(u64::from(last.granules));
        let mut s = self.cons_seq;
        while s != new_cons {
            if let Some(slot) = self.slot_mut(s) {
                *slot = Slot::default();
            }
            s = s.wrapping_add(1);
        }
        self.cons_seq = new_cons;
        self.data_tail = tail;
        Ok(tail)
    }
}

/// A volume's dirty-region bitmap: one bit per region of `1 << region_shift`
/// sectors, words supplied by the caller.
pub(crate) struct Dirty<B> {
    region_shift: u32,
    regions: u64,
    bits: B,
    dirty: u64,
}

/// Words needed for `regions` bits.
pub(crate) const fn words_for(regions: u64) -> u64 {
    regions.div_ceil(64)
}

/// Regions of `region_shift`-sector regions needed for `sectors` sectors.
pub(crate) const fn regions_for(sectors: u64, region_shift: u32) -> u64 {
    let r = sectors >> region_shift;
    if sectors & ((1u64 << region_shift) - 1) != 0 {
        r + 1
    } else {
        r
    }
}

impl<B: DerefMut<Target = [u64]>> Dirty<B> {
    /// A clear bitmap for `regions` regions over zeroed `bits`, which must
    /// hold [`words_for`]`(regions)` words.
    pub(crate) fn new(region_shift: u32, regions: u64, bits: B) -> Option<Self> {
        if region_shift >= 63 || bits.len() as u64 != words_for(regions) {
            return None;
        }
        let dirty = bits.iter().map(|w| u64::from(w.count_ones())).sum();
        Some(Self {
            region_shift,
            regions,
            bits,
            dirty,
        })
    }

    /// Regions (bits).
    pub(crate) fn regions(&self) -> u64 {
        self.regions
    }

    /// Region size as a shift of sectors.
    #[allow(dead_code)] // Used by the host tests.
    pub(crate) fn region_shift(&self) -> u32 {
        self.region_shift
    }

    /// Regions marked dirty.
    pub(crate) fn dirty(&self) -> u64 {
        self.dirty
    }

    /// Marks the regions touching sectors `[start, end)` dirty (clipped to
    /// the volume). Returns how many were newly marked.
    pub(crate) fn mark(&mut self, start: u64, end: u64) -> u64 {
        if end <= start || self.regions == 0 {
            return 0;
        }
        let first = start >> self.region_shift;
        let last = ((end - 1) >> self.region_shift).min(self.regions - 1);
        let mut newly = 0u64;
        let mut r = first;
        // A word at a time: a large discard marks many regions at once.
        while r <= last {
            let w = r / 64;
            let b = r % 64;
            let span_end = last.min(w * 64 + 63);
            let nbits = span_end - r + 1;
            let mask = if nbits >= 64 {
                u64::MAX
            } else {
                ((1u64 << nbits) - 1) << b
            };
            if let Some(word) = self.bits.get_mut(w as usize) {
                newly += u64::from((mask & !*word).count_ones());
                *word |= mask;
            }
            r = span_end + 1;
        }
        self.dirty = self.dirty.wrapping_add(newly);
        newly
    }

    /// Moves the bitmap into `out` (same word count) and clears it.
    pub(crate) fn take_into(&mut self, out: &mut [u64]) -> bool {
        if out.len() != self.bits.len() {
            return false;
        }
        for (o, w) in out.iter_mut().zip(self.bits.iter_mut()) {
            *o = core::mem::take(w);
        }
        self.dirty = 0;
        true
    }

    /// Ors `words` back into the bitmap (a read-and-clear whose copy-out
    /// failed gives its bits back). Returns how many were newly marked.
    pub(crate) fn or_in(&mut self, words: &[u64]) -> u64 {
        let mut newly = 0u64;
        for (w, add) in self.bits.iter_mut().zip(words.iter()) {
            newly += u64::from((add & !*w).count_ones());
            *w |= add;
        }
        self.dirty = self.dirty.wrapping_add(newly);
        newly
    }

    /// Whether region `r` is dirty.
    #[allow(dead_code)] // Used by the host tests.
    pub(crate) fn is_dirty(&self, r: u64) -> bool {
        self.bits
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1u64 << (r % 64)) != 0)
    }
}
