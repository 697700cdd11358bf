// SPDX-License-Identifier: GPL-2.0

//! Consistency groups: one capture ring per group, shared by the group's
//! volumes, and the registry that keeps groups alive across table reloads.
//!
//! A [`Group`] owns the ring memory (mapped read-only by the consumer), the
//! kernel's own copy of the producer state ([`Capture`]) under an
//! interrupt-safe lock, the per-volume dirty bitmaps, the bios held back
//! behind overlapping writes or waiting for ring space, and a work item that
//! submits those bios (held bios when their blockers complete, waiting ones
//! when space is released, or, after the bounded wait, in overflow mode).
//!
//! The [`Registry`] maps group names to groups. A group lives while a table
//! uses it: a reload builds the new table (a second reference) before the old
//! one goes, so the ring, its sequence and its consumer carry on. When the
//! last target goes, the group leaves the registry and its ring is marked
//! dead (the consumer sees POLLHUP); the memory is freed when the consumer
//! closes it.
//!
//! While a consumer is attached, a table for a volume the group does not
//! hold yet is refused with `EBUSY`, unless the consumer allowed joins
//! ([`abi::IOC_ALLOW_JOINS`]): the new volume's records would appear in a
//! stream the consumer replicates for other volumes. A table of a volume the
//! group holds (a reload, which dm builds before the old table goes) is
//! always accepted. The consumer slot and the allowance live under the
//! group's lock, so a table and an attach racing each other are ordered:
//! either the table sees the consumer and is refused, or the consumer finds
//! the new volume when it lists the group's volumes after attaching.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel::c_str;
use kernel::prelude::*;
use kernel::sync::{new_mutex, Arc, Mutex};
use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};

use crate::capture::{self, Capture, CaptureError, DescBody, Dirty, RecOp, Request, Reserved, Slot};
use crate::dm::sys::{self, header_offset, desc_field_offset, new_irq_spinlock, IrqSpinLock, RingMem, WaitQueue};
use crate::dm::{Bio, BioData, BioQueue, CtrError, HeldBio, Mapped};
use crate::ring_abi as abi;
use crate::table::NAME_MAX;

/// Most volumes one group can hold.
pub(crate) const MAX_VOLUMES: usize = 32;
/// First sequence of a new ring (0 is never a record).
const FIRST_SEQ: u64 = 1;
/// Largest bio the target accepts, in sectors (dm splits larger ones).
const MAX_IO_SECTORS: u64 = 2048;

/// A short name (volume id or group name), NUL-padded like the ABI.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) struct Name {
    bytes: [u8; abi::GROUP_NAME_LEN],
    len: u8,
}

impl Name {
    /// From validated bytes (at most [`NAME_MAX`]).
    pub(crate) fn new(b: &[u8]) -> Option<Self> {
        if b.len() > NAME_MAX {
            return None;
        }
        let mut bytes = [0u8; abi::GROUP_NAME_LEN];
        bytes.get_mut(..b.len())?.copy_from_slice(b);
        Some(Self {
            bytes,
            len: u8::try_from(b.len()).ok()?,
        })
    }

    /// The name's bytes.
    pub(crate) fn as_bytes(&self) -> &[u8] {
        self.bytes.get(..usize::from(self.len)).unwrap_or(&[])
    }

    /// NUL-padded, as in the ABI.
    pub(crate) fn padded(&self) -> &[u8; abi::GROUP_NAME_LEN] {
        &self.bytes
    }
}

impl core::fmt::Display for Name {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        // Names are validated ASCII.
        for &c in self.as_bytes() {
            f.write_char(char::from(c))?;
        }
        Ok(())
    }
}

/// What became of a bio in the target, kept in its per-bio data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum BioKind {
    /// Not captured (a read, an empty write).
    #[default]
    Passthrough = 0,
    /// Queued until ring space is released.
    Waiting = 1,
    /// Captured as record `seq`.
    Captured = 2,
    /// Not captured because the ring overflowed: dirty at map and completion.
    Overflow = 3,
}

/// The target's per-bio state. `repr(C)` with `kind` first: the
/// fault-injection build (`corrupt-reads`) keeps a saved iterator in the last
/// bytes of this area for reads, which must leave `kind` alone.
#[derive(Clone, Copy, Debug, Default)]
#[repr(C)]
pub(crate) struct PerBio {
    pub(crate) kind: BioKind,
    /// The payload copy failed: never ship the record.
    pub(crate) copy_failed: bool,
    pub(crate) op: u8,
    pub(crate) flags: u8,
    pub(crate) volume: u32,
    pub(crate) len: u32,
    pub(crate) seq: u64,
    pub(crate) sector: u64,
    pub(crate) submit_ns: u64,
}

impl PerBio {
    fn request(&self) -> Option<Request> {
        Some(Request {
            op: RecOp::from_abi(self.op)?,
            volume: self.volume,
            sector: self.sector,
            len: self.len,
        })
    }
}

/// A volume of a group.
struct Volume {
    id: Name,
    devt: u32,
    sectors: u64,
    region_kib: u32,
    dirty: Dirty<KVVec<u64>>,
    targets: u32,
    /// Data-changing bios of this volume submitted in overflow mode and not
    /// completed yet (each sets its regions dirty again when it completes).
    overflow_in_flight: u64,
}

/// Everything under the group's lock.
struct GroupState {
    cap: Capture<KVVec<Slot>, KVVec<u64>>,
    /// Bios held back, by descriptor slot.
    held: KVVec<Option<HeldBio<PerBio>>>,
    /// Bios waiting for ring space, in submission order.
    waiting: BioQueue<PerBio>,
    overflow_wait_ns: u64,
    /// `MAX_VOLUMES` entries, allocated with the group (on the heap: the
    /// state is moved through the stack while the group is built).
    volumes: KVec<Option<Volume>>,
    dirty_total: u64,
    targets: u32,
    /// Records that could not be captured or completed consistently (bugs
    /// reported instead of panicking); their regions are dirty.
    internal_errors: u64,
    /// A consumer is attached (the single consumer slot is taken).
    consumer: bool,
    /// The attached consumer lets new volumes join the group
    /// ([`abi::IOC_ALLOW_JOINS`]); cleared when it detaches.
    joins_allowed: bool,
}

impl GroupState {
    fn volume_mut(&mut self, index: u32) -> Option<&mut Volume> {
        self.volumes.get_mut(index as usize)?.as_mut()
    }

    /// Marks `[start, end)` of `volume` dirty.
    fn mark_dirty(&mut self, volume: u32, start: u64, end: u64) {
        let newly = self.volume_mut(volume).map_or(0, |v| v.dirty.mark(start, end));
        self.dirty_total = self.dirty_total.wrapping_add(newly);
    }

    fn mark_request_dirty(&mut self, req: &Request) {
        let end = req.sector.saturating_add(u64::from(req.len) >> 9);
        self.mark_dirty(req.volume, req.sector, end);
    }

    /// Counts a data-changing bio of `volume` submitted in overflow mode
    /// (`done`: one that completed). A count that would wrap is a bug,
    /// reported instead of panicking.
    fn count_overflow(&mut self, volume: u32, done: bool) {
        let ok = self.volume_mut(volume).is_some_and(|v| {
            let n = if done {
                v.overflow_in_flight.checked_sub(1)
            } else {
                v.overflow_in_flight.checked_add(1)
            };
            if let Some(n) = n {
                v.overflow_in_flight = n;
            }
            n.is_some()
        });
        if !ok {
            self.internal_errors = self.internal_errors.wrapping_add(1);
        }
    }
}

/// One consistency group and its ring.
#[pin_data]
pub(crate) struct Group {
    name: Name,
    generation: [u8; 16],
    geometry: abi::RingGeometry,
    mem: RingMem,
    ring_mib: u32,
    #[pin]
    state: IrqSpinLock<GroupState>,
    #[pin]
    wait: WaitQueue,
    #[pin]
    work: Work<Group>,
    /// Bumped on every completion, marker and state change; `poll` reports
    /// readable when it moved since the consumer's last look.
    events: AtomicU64,
    dead: AtomicBool,
}

impl_has_work! {
    impl HasWork<Self> for Group { self.work }
}

impl WorkItem for Group {
    type Pointer = Arc<Group>;

    fn run(this: Arc<Group>) {
        Group::process(&this);
    }
}

/// Snapshot for `dmsetup status`.
pub(crate) struct GroupStatus {
    stats: capture::Stats,
    prod_seq: u64,
    cons_seq: u64,
    live: u64,
    used_bytes: u64,
    overflow: bool,
    overflow_seq: u64,
    dirty: u64,
    in_flight: usize,
    in_flight_overflow: u64,
    held: usize,
    waiting: usize,
    internal_errors: u64,
    consumer: bool,
}

/// A volume's description, for the control device.
pub(crate) struct VolumeInfo {
    pub(crate) id: Name,
    pub(crate) sectors: u64,
    pub(crate) region_kib: u32,
    pub(crate) regions: u64,
    pub(crate) dirty: u64,
}

/// Result of a bitmap read-and-clear.
pub(crate) struct BitmapTaken {
    pub(crate) region_kib: u32,
    pub(crate) regions: u64,
    pub(crate) resume_seq: u64,
    /// Overflow-mode writes of the volume still in flight.
    pub(crate) in_flight_overflow: u64,
}

impl Group {
    fn new(name: Name, ring_mib: u32) -> Result<Arc<Self>> {
        let granules = u64::from(ring_mib) << (20 - abi::GRANULE_SHIFT);
        let desc_count = granules.max(256);
        let geometry = abi::geometry(desc_count, granules).ok_or(EINVAL)?;
        let n = usize::try_from(desc_count)?;
        let mem = RingMem::new(usize::try_from(geometry.total_size)?)?;
        let mut generation = [0u8; 16];
        sys::random_bytes(&mut generation);
        init_header(&mem, &geometry, &generation)?;

        let mut slots = KVVec::with_capacity(n, GFP_KERNEL)?;
        let mut inflight = KVVec::with_capacity(n, GFP_KERNEL)?;
        let mut held = KVVec::with_capacity(n, GFP_KERNEL)?;
        let mut volumes = KVec::with_capacity(MAX_VOLUMES, GFP_KERNEL)?;
        for _ in 0..MAX_VOLUMES {
            volumes.push(None, GFP_KERNEL)?;
        }
        for _ in 0..n {
            slots.push(Slot::default(), GFP_KERNEL)?;
            inflight.push(0u64, GFP_KERNEL)?;
            held.push(None, GFP_KERNEL)?;
        }
        let cap = Capture::new(geometry, slots, inflight, FIRST_SEQ, 0).ok_or(EINVAL)?;
        let state = GroupState {
            cap,
            held,
            waiting: BioQueue::new(),
            overflow_wait_ns: 0,
            volumes,
            dirty_total: 0,
            targets: 0,
            internal_errors: 0,
            consumer: false,
            joins_allowed: false,
        };
        Arc::pin_init(
            pin_init!(Group {
                name,
                generation,
                geometry,
                mem,
                ring_mib,
                state <- new_irq_spinlock!(state, "dm_replica_group"),
                wait <- WaitQueue::new(),
                work <- new_work!("dm_replica_group_work"),
                events: AtomicU64::new(0),
                dead: AtomicBool::new(false),
            }),
            GFP_KERNEL,
        )
    }

    /// The ring's generation id.
    pub(crate) fn generation(&self) -> &[u8; 16] {
        &self.generation
    }

    /// The group's name.
    pub(crate) fn name(&self) -> &Name {
        &self.name
    }

    /// Ring size in MiB.
    pub(crate) fn ring_mib(&self) -> u32 {
        self.ring_mib
    }

    /// Size of the mapping the consumer maps.
    pub(crate) fn map_size(&self) -> u64 {
        self.geometry.total_size
    }

    /// The ring memory (for the consumer's mapping).
    pub(crate) fn mem(&self) -> &RingMem {
        &self.mem
    }

    /// The wait queue `poll` waits on.
    pub(crate) fn wait_queue(&self) -> &WaitQueue {
        &self.wait
    }

    /// Largest bio, in sectors, the ring takes: 1 MiB, or a quarter of the
    /// data ring if that is smaller.
    pub(crate) fn max_io_sectors(&self) -> u64 {
        let quarter = (self.geometry.data_granules << abi::GRANULE_SHIFT) >> 11;
        MAX_IO_SECTORS.min(quarter.max(8))
    }

    /// Event counter for `poll`.
    pub(crate) fn events(&self) -> u64 {
        self.events.load(Ordering::Acquire)
    }

    /// Whether the last target went away.
    pub(crate) fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Claims the single consumer slot; new volumes are refused until the
    /// consumer allows joins.
    pub(crate) fn attach_consumer(&self) -> bool {
        let mut st = self.state.lock();
        if st.consumer {
            return false;
        }
        st.consumer = true;
        st.joins_allowed = false;
        true
    }

    /// Gives the consumer slot back (and ends its allowance of joins).
    pub(crate) fn detach_consumer(&self) {
        let mut st = self.state.lock();
        st.consumer = false;
        st.joins_allowed = false;
    }

    /// The attached consumer allows (or refuses again) tables of new
    /// volumes in the group.
    pub(crate) fn allow_joins(&self, allow: bool) {
        let mut st = self.state.lock();
        st.joins_allowed = allow;
        drop(st);
        pr_info!(
            "group {}: the consumer {} new volumes\n",
            self.name,
            if allow { "allows" } else { "refuses" }
        );
    }

    fn notify(&self) {
        self.events.fetch_add(1, Ordering::AcqRel);
        self.wait.wake_all();
    }

    fn kick(this: &Arc<Self>) {
        // Already queued is fine: the queued run sees the new state.
        let _ = sys::enqueue(this.clone());
    }

    // --- Shared memory ----------------------------------------------------------

    fn header_u64(&self, off: usize, v: u64) {
        if let Some(a) = self.mem.atomic_u64(off) {
            a.store(v, Ordering::Release);
        }
    }

    /// Mirrors the producer's indices and flags into the shared header.
    /// Called with the state lock held, so stores never go backwards.
    fn publish_header(&self, st: &GroupState) {
        self.header_u64(header_offset!(data_head), st.cap.data_head());
        self.header_u64(header_offset!(prod_seq), st.cap.prod_seq());
        self.header_u64(header_offset!(overflow_seq), st.cap.overflow_seq());
        self.header_u64(header_offset!(dirty_regions), st.dirty_total);
        let mut flags = 0;
        if st.cap.overflowing() {
            flags |= abi::RING_FLAG_OVERFLOW;
        }
        if self.is_dead() {
            flags |= abi::RING_FLAG_DEAD;
        }
        if let Some(a) = self.mem.atomic_u32(header_offset!(flags)) {
            a.store(flags, Ordering::Release);
        }
    }

    fn desc_offset(&self, seq: u64) -> usize {
        abi::desc_byte_offset(self.geometry.desc_offset, seq, self.geometry.desc_count) as usize
    }

    fn publish_stamp(&self, seq: u64, state: u64) {
        if let Some(a) = self.mem.atomic_u64(self.desc_offset(seq)) {
            abi::publish_stamp(a, seq, state);
        }
    }

    /// Writes a reserved record's descriptor fields (not its stamp) and, for
    /// a write, copies the payload from `bio`. Returns false if the payload
    /// could not be copied in full.
    fn fill_record(
        &self,
        r: &Reserved,
        pb: &PerBio,
        aux: u64,
        bio: Option<&impl BioData>,
    ) -> bool {
        let d = self.desc_offset(r.seq);
        let m = &self.mem;
        let body = DescBody {
            sector: pb.sector,
            data_pos: r.data_pos,
            submit_ns: pb.submit_ns,
            len: pb.len,
            granules: r.granules,
            volume: pb.volume,
            op: pb.op,
            flags: pb.flags,
            aux,
            complete_ns: 0,
        };
        let mut ok = m.write_words(d + desc_field_offset!(sector), &body.words());
        if r.granules > 0 {
            let off = abi::data_byte_offset(
                self.geometry.data_offset,
                r.data_pos,
                self.geometry.data_granules,
            ) as usize;
            let len = pb.len as usize;
            let room = (r.granules as usize) << abi::GRANULE_SHIFT;
            ok = ok
                && bio.is_some_and(|b| b.data_bytes() == len && m.copy_bio(off, b))
                && m.zero(off + len, room.saturating_sub(len));
        }
        ok
    }

    // --- Capture path (map) ---------------------------------------------------------

    /// Captures a data-changing bio or a flush of volume `volume`, already
    /// remapped to the data device, and says what map returns.
    pub(crate) fn capture(this: &Arc<Self>, mut bio: Bio<'_, PerBio>, req: Request, flags: u8) -> Mapped {
        let mut pb = PerBio {
            kind: BioKind::Passthrough,
            copy_failed: false,
            op: req.op.abi(),
            flags,
            volume: req.volume,
            len: req.len,
            seq: 0,
            sector: req.sector,
            submit_ns: sys::now_ns(),
        };
        let mut st = this.state.lock();
        if !st.waiting.is_empty() {
            // Writes already wait for space: queue behind them, in order.
            pb.kind = BioKind::Waiting;
            bio.set_per_bio(pb);
            let (held, mapped) = bio.hold();
            st.waiting.push_back(held);
            drop(st);
            Self::kick(this);
            return mapped;
        }
        if st.cap.overflowing() {
            Self::overflow_one(&mut st, &req, &mut pb);
            bio.set_per_bio(pb);
            return bio.remapped();
        }
        match st.cap.reserve(&req) {
            Ok(r) => {
                pb.kind = BioKind::Captured;
                pb.seq = r.seq;
                this.publish_header(&st);
                drop(st);
                pb.copy_failed = !this.fill_record(&r, &pb, 0, Some(&bio));
                bio.set_per_bio(pb);
                this.publish_stamp(r.seq, abi::STATE_PENDING);
                // Fault injection (harness check only): never hold back.
                let blocked = r.blocked && !cfg!(dm_replica_no_hold);
                if blocked {
                    let mut st = this.state.lock();
                    if st.cap.is_blocked(r.seq) && st.cap.set_held(r.seq).is_ok() {
                        let (held, mapped) = bio.hold();
                        let slot = abi::desc_slot(r.seq, this.geometry.desc_count) as usize;
                        match st.held.get_mut(slot) {
                            Some(s) => *s = Some(held),
                            // Cannot happen (one entry per slot); submitting
                            // is the safe fallback.
                            None => drop(held),
                        }
                        return mapped;
                    }
                }
                bio.remapped()
            }
            Err(CaptureError::Full) if st.overflow_wait_ns > 0 => {
                pb.kind = BioKind::Waiting;
                bio.set_per_bio(pb);
                let (held, mapped) = bio.hold();
                st.waiting.push_back(held);
                drop(st);
                Self::kick(this);
                mapped
            }
            Err(e) => {
                if e != CaptureError::Full {
                    st.internal_errors = st.internal_errors.wrapping_add(1);
                    pr_err!(
                        "group {}: cannot capture a request ({:?}); switching to the dirty bitmap\n",
                        this.name,
                        e
                    );
                }
                st.cap.enter_overflow();
                Self::overflow_one(&mut st, &req, &mut pb);
                this.publish_header(&st);
                drop(st);
                this.notify();
                bio.set_per_bio(pb);
                bio.remapped()
            }
        }
    }

    /// A request that is not captured because the ring overflowed: its
    /// regions become dirty now and again at completion.
    fn overflow_one(st: &mut GroupState, req: &Request, pb: &mut PerBio) {
        pb.kind = BioKind::Overflow;
        if req.op.changes_data() {
            st.mark_request_dirty(req);
            st.count_overflow(req.volume, false);
            st.cap.stats.overflowed = st.cap.stats.overflowed.wrapping_add(1);
        }
    }

    // --- Completion (end_io, maybe hard IRQ) -------------------------------------------

    /// Records the completion of a bio this target mapped.
    pub(crate) fn complete(this: &Arc<Self>, bio: &Bio<'_, PerBio>, ok: bool) {
        let pb = bio.per_bio();
        match pb.kind {
            BioKind::Captured => {
                let now = sys::now_ns();
                let shipped_ok = ok && !pb.copy_failed;
                let mut st = this.state.lock();
                // Only a region marked dirty changes the shared header here
                // (the indices move in map and release).
                let mut dirtied = true;
                let kick = match st.cap.complete(pb.seq, shipped_ok) {
                    Ok(c) => {
                        let d = this.desc_offset(pb.seq);
                        this.mem.write_words(d + desc_field_offset!(complete_ns), &[now]);
                        let state = if shipped_ok {
                            dirtied = false;
                            abi::STATE_COMMITTED
                        } else {
                            st.mark_dirty(c.volume, c.start, c.end);
                            abi::STATE_FAILED
                        };
                        // Under the lock: the slot cannot be released (and
                        // reused) before its final stamp is visible.
                        this.publish_stamp(pb.seq, state);
                        c.held_waiting
                    }
                    Err(_) => {
                        st.internal_errors = st.internal_errors.wrapping_add(1);
                        if let Some(req) = pb.request() {
                            st.mark_request_dirty(&req);
                        }
                        false
                    }
                };
                if dirtied {
                    this.publish_header(&st);
                }
                drop(st);
                this.notify();
                if kick {
                    Self::kick(this);
                }
            }
            BioKind::Overflow => {
                if let Some(req) = pb.request().filter(|r| r.op.changes_data()) {
                    let mut st = this.state.lock();
                    // Dirty again (a bitmap taken since map cleared it),
                    // and no longer in flight, in one step: a consumer sees
                    // either the write in flight or its regions set.
                    st.mark_request_dirty(&req);
                    st.count_overflow(req.volume, true);
                    this.publish_header(&st);
                }
            }
            BioKind::Passthrough | BioKind::Waiting => {}
        }
    }

    // --- Deferred work (process context) ---------------------------------------------------

    /// Submits held bios whose blockers completed and reserves space for
    /// waiting bios; after the bounded wait, switches to overflow. Loops
    /// (sleeping briefly) while bios wait for space.
    fn process(this: &Arc<Self>) {
        loop {
            this.submit_unblocked();
            let mut st = this.state.lock();
            let Some(front) = st.waiting.front_per_bio() else {
                return;
            };
            let Some(req) = front.request() else {
                // Cannot happen (per-bio data is written before queueing);
                // submit rather than strand the bio.
                st.internal_errors = st.internal_errors.wrapping_add(1);
                let b = st.waiting.pop_front();
                drop(st);
                drop(b);
                continue;
            };
            match st.cap.reserve(&req) {
                Ok(r) => {
                    let Some(mut bio) = st.waiting.pop_front() else {
                        continue;
                    };
                    let mut pb = front;
                    pb.kind = BioKind::Captured;
                    pb.seq = r.seq;
                    this.publish_header(&st);
                    drop(st);
                    pb.copy_failed = !this.fill_record(&r, &pb, 0, Some(&bio));
                    bio.set_per_bio(pb);
                    this.publish_stamp(r.seq, abi::STATE_PENDING);
                    if r.blocked && !cfg!(dm_replica_no_hold) {
                        let mut st = this.state.lock();
                        if st.cap.is_blocked(r.seq) && st.cap.set_held(r.seq).is_ok() {
                            let slot = abi::desc_slot(r.seq, this.geometry.desc_count) as usize;
                            if let Some(s) = st.held.get_mut(slot) {
                                *s = Some(bio);
                                continue;
                            }
                        }
                    }
                    bio.submit();
                }
                Err(CaptureError::Full)
                    if sys::now_ns().saturating_sub(front.submit_ns) < st.overflow_wait_ns =>
                {
                    drop(st);
                    sys::sleep_us(200, 1000);
                }
                Err(e) => {
                    // Out of time (or a request that can never fit): the
                    // ring overflows; every waiting bio goes to the bitmap.
                    if e != CaptureError::Full {
                        st.internal_errors = st.internal_errors.wrapping_add(1);
                    }
                    st.cap.enter_overflow();
                    let mut go = BioQueue::new();
                    while let Some(mut b) = st.waiting.pop_front() {
                        let mut pb = b.per_bio();
                        if let Some(req) = pb.request() {
                            Self::overflow_one(&mut st, &req, &mut pb);
                        } else {
                            pb.kind = BioKind::Passthrough;
                        }
                        b.set_per_bio(pb);
                        go.push_back(b);
                    }
                    this.publish_header(&st);
                    drop(st);
                    pr_warn!(
                        "group {}: capture ring full for {} ms; capture switched to the dirty bitmap (overflow), resync needed\n",
                        this.name,
                        this.overflow_wait_ms()
                    );
                    this.notify();
                    drop(go);
                }
            }
        }
    }

    fn overflow_wait_ms(&self) -> u64 {
        self.state.lock().overflow_wait_ns / 1_000_000
    }

    fn submit_unblocked(&self) {
        loop {
            let mut go = BioQueue::new();
            {
                let mut st = self.state.lock();
                while let Some(seq) = st.cap.next_unblocked_held() {
                    let slot = abi::desc_slot(seq, self.geometry.desc_count) as usize;
                    if let Some(b) = st.held.get_mut(slot).and_then(Option::take) {
                        go.push_back(b);
                    }
                }
            }
            if go.is_empty() {
                return;
            }
            drop(go);
        }
    }

    // --- Consumer requests --------------------------------------------------------------

    /// Applies the consumer's release of every record before `new_cons`.
    pub(crate) fn release(this: &Arc<Self>, new_cons: u64) -> Result {
        let mut st = this.state.lock();
        let tail = st.cap.release(new_cons).map_err(|e| match e {
            capture::ReleaseError::OutOfRange => EINVAL,
            capture::ReleaseError::InFlight => EBUSY,
        })?;
        this.header_u64(header_offset!(data_tail), tail);
        this.header_u64(header_offset!(cons_seq), st.cap.cons_seq());
        let waiting = !st.waiting.is_empty();
        drop(st);
        if waiting {
            Self::kick(this);
        }
        Ok(())
    }

    /// Inserts a MARKER record with id `id` about volume `volume` with
    /// record flags `flags`.
    pub(crate) fn marker(&self, volume: u32, flags: u8, id: u64) -> Result<u64> {
        let mut st = self.state.lock();
        if st.cap.overflowing() {
            return Err(EIO);
        }
        if !st.waiting.is_empty() {
            return Err(EAGAIN);
        }
        let req = Request {
            op: RecOp::Marker,
            volume,
            sector: 0,
            len: 0,
        };
        let r = st.cap.reserve(&req).map_err(|e| match e {
            CaptureError::Full => ENOSPC,
            _ => EIO,
        })?;
        let now = sys::now_ns();
        let pb = PerBio {
            kind: BioKind::Captured,
            op: abi::OP_MARKER,
            flags,
            volume,
            submit_ns: now,
            seq: r.seq,
            ..PerBio::default()
        };
        self.fill_record(&r, &pb, id, None::<&HeldBio<PerBio>>);
        self.mem
            .write_words(self.desc_offset(r.seq) + desc_field_offset!(complete_ns), &[now]);
        st.cap.complete(r.seq, true).map_err(|_| EIO)?;
        self.publish_stamp(r.seq, abi::STATE_COMMITTED);
        self.publish_header(&st);
        drop(st);
        self.notify();
        Ok(r.seq)
    }

    /// Describes volume `index`.
    pub(crate) fn volume_info(&self, index: u32) -> Option<VolumeInfo> {
        let mut st = self.state.lock();
        let v = st.volume_mut(index)?;
        Some(VolumeInfo {
            id: v.id,
            sectors: v.sectors,
            region_kib: v.region_kib,
            regions: v.dirty.regions(),
            dirty: v.dirty.dirty(),
        })
    }

    /// Reads and clears volume `index`'s dirty bitmap into `out` (exactly
    /// its word count), ends overflow, and returns where capture resumes.
    pub(crate) fn take_bitmap(&self, index: u32, out: &mut [u64]) -> Result<BitmapTaken> {
        let mut st = self.state.lock();
        let v = st.volume_mut(index).ok_or(ENOENT)?;
        let (region_kib, regions, before) = (v.region_kib, v.dirty.regions(), v.dirty.dirty());
        let in_flight_overflow = v.overflow_in_flight;
        if !v.dirty.take_into(out) {
            return Err(EAGAIN);
        }
        st.dirty_total = st.dirty_total.wrapping_sub(before);
        let resume_seq = st.cap.clear_overflow();
        self.publish_header(&st);
        drop(st);
        self.notify();
        Ok(BitmapTaken {
            region_kib,
            regions,
            resume_seq,
            in_flight_overflow,
        })
    }

    /// Gives back bits of a read-and-clear whose copy-out failed.
    pub(crate) fn untake_bitmap(&self, index: u32, words: &[u64]) {
        let mut st = self.state.lock();
        let newly = st.volume_mut(index).map_or(0, |v| v.dirty.or_in(words));
        st.dirty_total = st.dirty_total.wrapping_add(newly);
        self.publish_header(&st);
    }

    /// Status snapshot.
    pub(crate) fn status(&self, volume: u32) -> GroupStatus {
        let mut st = self.state.lock();
        let (dirty, in_flight_overflow) = st
            .volume_mut(volume)
            .map_or((0, 0), |v| (v.dirty.dirty(), v.overflow_in_flight));
        GroupStatus {
            stats: st.cap.stats,
            prod_seq: st.cap.prod_seq(),
            cons_seq: st.cap.cons_seq(),
            live: st.cap.live(),
            used_bytes: st.cap.granules_used() << abi::GRANULE_SHIFT,
            overflow: st.cap.overflowing(),
            overflow_seq: st.cap.overflow_seq(),
            dirty,
            in_flight: st.cap.in_flight(),
            in_flight_overflow,
            held: st.cap.held(),
            waiting: st.waiting.len(),
            internal_errors: st.internal_errors,
            consumer: st.consumer,
        }
    }

    /// Writes the status line of volume `volume`.
    pub(crate) fn write_status(&self, volume: u32, out: &mut impl Write) -> core::fmt::Result {
        let s = self.status(volume);
        write!(out, "generation=")?;
        for b in &self.generation {
            write!(out, "{b:02x}")?;
        }
        write!(
            out,
            " ring_bytes={} ring_used={} records={} bytes={} live={} prod_seq={} cons_seq={} \
             overflow={} overflow_seq={} overflows={} dirty_regions={} overflowed_writes={} \
             in_flight_overflow={} failed={} held_total={} in_flight={} held={} waiting={} consumer={} internal_errors={}",
            self.geometry.data_granules << abi::GRANULE_SHIFT,
            s.used_bytes,
            s.stats.records,
            s.stats.bytes,
            s.live,
            s.prod_seq,
            s.cons_seq,
            u8::from(s.overflow),
            s.overflow_seq,
            s.stats.overflows,
            s.dirty,
            s.stats.overflowed,
            s.in_flight_overflow,
            s.stats.failed,
            s.stats.held,
            s.in_flight,
            s.held,
            s.waiting,
            u8::from(s.consumer),
            s.internal_errors,
        )
    }
}

/// Writes the constant part of a new ring's header (nobody maps it yet).
fn init_header(mem: &RingMem, g: &abi::RingGeometry, generation: &[u8; 16]) -> Result {
    let ok = mem.write(header_offset!(magic), &abi::RING_MAGIC.to_ne_bytes())
        && mem.write(header_offset!(abi_version), &abi::RING_ABI_VERSION.to_ne_bytes())
        && mem.write(header_offset!(header_size), &(abi::HEADER_SIZE as u32).to_ne_bytes())
        && mem.write(header_offset!(generation), generation)
        && mem.write(header_offset!(desc_count), &g.desc_count.to_ne_bytes())
        && mem.write(header_offset!(data_granules), &g.data_granules.to_ne_bytes())
        && mem.write(header_offset!(desc_offset), &g.desc_offset.to_ne_bytes())
        && mem.write(header_offset!(data_offset), &g.data_offset.to_ne_bytes())
        && mem.write(header_offset!(first_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(prod_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(cons_seq), &FIRST_SEQ.to_ne_bytes())
        && mem.write(header_offset!(overflow_seq), &FIRST_SEQ.to_ne_bytes());
    if ok {
        Ok(())
    } else {
        Err(EINVAL)
    }
}

/// What a new table asks of its group.
pub(crate) struct Attach {
    pub(crate) group: Name,
    pub(crate) volume: Name,
    pub(crate) devt: u32,
    pub(crate) sectors: u64,
    pub(crate) ring_mib: Option<u32>,
    pub(crate) region_kib: u32,
    pub(crate) overflow_wait_ms: u32,
}

/// All groups, by name.
#[pin_data]
pub(crate) struct Registry {
    #[pin]
    groups: Mutex<KVec<Option<Arc<Group>>>>,
}

impl Registry {
    /// An empty registry.
    pub(crate) fn new() -> Result<Arc<Self>> {
        Arc::pin_init(
            pin_init!(Registry {
                groups <- new_mutex!(KVec::new(), "dm_replica_registry"),
            }),
            GFP_KERNEL,
        )
    }

    /// Looks up a live group by name.
    pub(crate) fn find(&self, name: &[u8]) -> Option<Arc<Group>> {
        let groups = self.groups.lock();
        groups.iter().flatten().find(|g| g.name.as_bytes() == name).cloned()
    }

    /// Adds a target's volume to its group (creating the group and its ring
    /// if needed). Returns the group and the volume's index in it.
    pub(crate) fn attach(&self, a: &Attach) -> Result<(Arc<Group>, u32), CtrError> {
        let mut groups = self.groups.lock();
        for g in groups.iter().flatten() {
            if g.name != a.group && g.has_volume(&a.volume) {
                pr_err!(
                    "table rejected: volume {} is already protected in group {}\n",
                    a.volume,
                    g.name
                );
                return Err(CtrError::invalid(c_str!(
                    "Volume id already in use in another group"
                )));
            }
        }
        let group = match groups.iter().flatten().find(|g| g.name == a.group) {
            Some(g) => {
                if let Some(mib) = a.ring_mib.filter(|&m| m != g.ring_mib) {
                    pr_err!(
                        "table rejected: group {} has a {} MiB ring, the table asks for {} MiB\n",
                        g.name,
                        g.ring_mib,
                        mib
                    );
                    return Err(CtrError::invalid(c_str!(
                        "Group exists with another ring size"
                    )));
                }
                g.clone()
            }
            None => {
                let mib = a.ring_mib.unwrap_or(crate::table::DEFAULT_RING_MIB);
                let g = Group::new(a.group, mib).map_err(|errno| {
                    pr_err!(
                        "table rejected: cannot allocate a {} MiB ring for group {} (error {})\n",
                        mib,
                        a.group,
                        errno.to_errno()
                    );
                    CtrError {
                        errno,
                        msg: c_str!("Cannot allocate the capture ring"),
                    }
                })?;
                match groups.iter_mut().find(|s| s.is_none()) {
                    Some(free) => *free = Some(g.clone()),
                    None => groups.push(Some(g.clone()), GFP_KERNEL).map_err(|_| CtrError {
                        errno: ENOMEM,
                        msg: c_str!("Cannot allocate the group registry entry"),
                    })?,
                }
                pr_info!(
                    "group {}: new {} MiB capture ring\n",
                    a.group,
                    mib
                );
                g
            }
        };
        let result = group.add_volume(a);
        if result.is_err() {
            // A group created for this table and left without volumes goes.
            let empty = group.state.lock().targets == 0;
            if empty {
                forget_group(&mut groups, &group);
                group.mark_dead();
            }
        }
        result.map(|idx| (group, idx))
    }

    /// Removes a target's volume reference; the last one removes the volume,
    /// the last target of the group removes the group (its ring is dead).
    pub(crate) fn detach(&self, group: &Arc<Group>, volume: u32) {
        let mut groups = self.groups.lock();
        let (removed, last) = {
            let mut st = group.state.lock();
            let removed = match st.volumes.get_mut(volume as usize) {
                Some(slot) => match slot {
                    Some(v) if v.targets > 1 => {
                        v.targets -= 1;
                        None
                    }
                    Some(_) => slot.take(),
                    None => None,
                },
                None => None,
            };
            if let Some(v) = &removed {
                st.dirty_total = st.dirty_total.wrapping_sub(v.dirty.dirty());
            }
            st.targets = st.targets.saturating_sub(1);
            group.publish_header(&st);
            (removed, st.targets == 0)
        };
        // Freed outside the spinlock (vfree may sleep).
        drop(removed);
        if last {
            forget_group(&mut groups, group);
            group.mark_dead();
            pr_info!("group {}: last target removed; capture ring closed\n", group.name);
        }
    }
}

/// Why a volume cannot be added to a group.
enum Refusal {
    /// The volume id is registered with other parameters (or the group is
    /// full): `EINVAL`.
    Conflict(&'static str),
    /// A new volume while a consumer that refuses joins is attached:
    /// `EBUSY`.
    Busy,
}

/// Removes `group` from the registry's slots.
fn forget_group(groups: &mut [Option<Arc<Group>>], group: &Arc<Group>) {
    for slot in groups.iter_mut() {
        if slot.as_ref().is_some_and(|g| Arc::ptr_eq(g, group)) {
            *slot = None;
        }
    }
}

impl Group {
    fn has_volume(&self, id: &Name) -> bool {
        let st = self.state.lock();
        st.volumes.iter().flatten().any(|v| v.id == *id)
    }

    fn mark_dead(&self) {
        self.dead.store(true, Ordering::Release);
        let st = self.state.lock();
        self.publish_header(&st);
        drop(st);
        self.notify();
    }

    fn add_volume(&self, a: &Attach) -> Result<u32, CtrError> {
        let region_shift = a.region_kib.trailing_zeros() + 1;
        let regions = capture::regions_for(a.sectors, region_shift);
        let words = usize::try_from(capture::words_for(regions)).map_err(|_| CtrError::invalid(c_str!("Volume too large")))?;
        let nomem = CtrError {
            errno: ENOMEM,
            msg: c_str!("Cannot allocate the dirty bitmap"),
        };
        let mut bits = KVVec::with_capacity(words, GFP_KERNEL).map_err(|_| nomem)?;
        for _ in 0..words {
            bits.push(0u64, GFP_KERNEL).map_err(|_| nomem)?;
        }
        let dirty = Dirty::new(region_shift, regions, bits).ok_or(CtrError::invalid(c_str!("Bad region size")))?;
        let mut fresh = Some(Volume {
            id: a.volume,
            devt: a.devt,
            sectors: a.sectors,
            region_kib: a.region_kib,
            dirty,
            targets: 1,
            overflow_in_flight: 0,
        });
        let mut st = self.state.lock();
        let existing = st
            .volumes
            .iter()
            .position(|v| v.as_ref().is_some_and(|v| v.id == a.volume));
        let result = match (existing, st.targets.checked_add(1)) {
            // Cannot happen (a u32 of tables).
            (_, None) => Err(Refusal::Conflict("too many tables")),
            // A volume of the group (a reload, or another table of it): its
            // records are already in the stream.
            (Some(i), Some(_)) => {
                let v = st.volumes.get_mut(i).and_then(Option::as_mut);
                match v {
                    Some(v) if v.devt != a.devt => Err(Refusal::Conflict("another data device")),
                    Some(v) if v.sectors != a.sectors => Err(Refusal::Conflict("another size")),
                    Some(v) if v.region_kib != a.region_kib => {
                        Err(Refusal::Conflict("another region size"))
                    }
                    Some(v) => match v.targets.checked_add(1) {
                        Some(n) => {
                            v.targets = n;
                            Ok(i)
                        }
                        None => Err(Refusal::Conflict("too many tables")),
                    },
                    None => Err(Refusal::Conflict("a vanished entry")),
                }
            }
            // A new member: not while a consumer that did not allow joins
            // is attached.
            (None, Some(_)) if st.consumer && !st.joins_allowed => Err(Refusal::Busy),
            (None, Some(_)) => match st.volumes.iter().position(Option::is_none) {
                Some(i) => {
                    if let Some(slot) = st.volumes.get_mut(i) {
                        *slot = fresh.take();
                    }
                    Ok(i)
                }
                None => Err(Refusal::Conflict("no free volume slot")),
            },
        };
        if result.is_ok() {
            st.targets = st.targets.saturating_add(1);
            st.overflow_wait_ns = u64::from(a.overflow_wait_ms) * 1_000_000;
        }
        drop(st);
        // An unused bitmap is freed outside the spinlock.
        drop(fresh);
        match result {
            Ok(i) => u32::try_from(i).map_err(|_| CtrError::invalid(c_str!("Bad volume index"))),
            Err(Refusal::Busy) => {
                pr_err!(
                    "table rejected: group {} has an attached consumer that does not accept new members: volume {} cannot join it while it is replicated (EBUSY; reloading a member's table still works)\n",
                    self.name,
                    a.volume
                );
                Err(CtrError {
                    errno: EBUSY,
                    msg: c_str!("Group has an attached consumer that does not accept new members"),
                })
            }
            Err(Refusal::Conflict(why)) => {
                pr_err!(
                    "table rejected: volume {} in group {} is already registered with {} (or the group is full: {} volumes)\n",
                    a.volume,
                    self.name,
                    why,
                    MAX_VOLUMES
                );
                Err(CtrError::invalid(c_str!(
                    "Volume already registered with other parameters"
                )))
            }
        }
    }
}
