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
//!
//! The group's code is split by concern, one `impl Group` each:
//! * this file: the types, the group's state and its construction;
//! * [`ring`]: the shared ring memory (header, descriptors, record payloads);
//! * [`io`]: the bio path: capture in `map`, completion in `end_io`, and the
//!   deferred work that submits held and waiting bios or enters overflow;
//! * [`consumer`]: the consumer slot and the requests about the stream and
//!   the dirty bitmaps (release, markers, volume descriptions, bitmaps);
//! * [`status`]: the `dmsetup status` line;
//! * [`registry`]: the [`Registry`] of groups and the volumes' membership.

mod consumer;
mod io;
mod registry;
mod ring;
mod status;

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use kernel::prelude::*;
use kernel::sync::Arc;
use kernel::workqueue::{impl_has_work, new_work, Work, WorkItem};

use crate::capture::{self, Capture, Dirty, RecOp, Request, Slot};
use crate::dm::sys::{self, new_irq_spinlock, IrqSpinLock, RingMem, WaitQueue};
use crate::dm::{BioQueue, HeldBio};
use crate::ring_abi as abi;
use crate::table::NAME_MAX;

pub(crate) use registry::{Attach, Registry};

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

// Expands to an `unsafe impl HasWork for Group` written by the kernel
// crate's macro, sound by construction (it takes the offset of the named
// field and only compiles if that field is a `Work<Group>`). The crate's
// `deny(unsafe_code)` does not see it: rustc reports no lint inside the
// expansion of another crate's macro (the same holds for `pin_init!`,
// `new_work!` and `module!`), and an `allow` on a macro call is ignored.
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
        ring::init_header(&mem, &geometry, &generation)?;

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

    fn notify(&self) {
        self.events.fetch_add(1, Ordering::AcqRel);
        self.wait.wake_all();
    }

    fn kick(this: &Arc<Self>) {
        // Already queued is fine: the queued run sees the new state.
        let _ = sys::enqueue(this.clone());
    }
}
