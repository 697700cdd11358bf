// SPDX-License-Identifier: GPL-2.0 OR MIT
//! dm-replica capture ring ABI, version 3.
//!
//! This one file is the single source of truth for the memory layout and the
//! index rules of the ring that the `replica` device-mapper target fills and
//! `replicad` drains. It is `core`-only and dependency-free: the kernel module
//! includes it with `#[path]`, the `ring-abi` crate re-exports it for
//! userspace. It must build with both the kernel's rustc and the userspace
//! toolchain, so it uses nothing beyond stable `core`.
//!
//! # Layout
//!
//! One ring per consistency group, one contiguous mapping:
//!
//! ```text
//! offset 0               RingHeader (one 4 KiB page)
//! desc_offset            desc_count x RecordDesc (64 bytes each), page aligned
//! data_offset            data_granules x 4 KiB data ring, page aligned
//! ```
//!
//! `desc_count` and `data_granules` are powers of two.
//!
//! # Indices
//!
//! All indices are 64-bit and free-running; they only ever grow (wrapping at
//! 2^64, which every rule below tolerates by using wrapping arithmetic):
//!
//! * a record's *sequence* is its descriptor index; the descriptor lives in
//!   slot `seq & (desc_count - 1)`. Records of all volumes of the group share
//!   one sequence space, in submission order, so every prefix of the ring is
//!   a crash-consistent state of the whole group.
//! * `prod_seq` is the next sequence the producer will reserve; `cons_seq` is
//!   the oldest sequence not yet released by the consumer. Records in
//!   `[cons_seq, prod_seq)` are live; `prod_seq - cons_seq <= desc_count`.
//! * `data_head` / `data_tail` count 4 KiB granules of the data ring the same
//!   way. A record's payload occupies granules `[data_pos, data_pos +
//!   granules)`, contiguous in memory. When a payload would cross the end of
//!   the data ring, the producer starts it at the next lap instead; the
//!   skipped granules are padding and are released together with that record.
//!   (Padding is implicit in `data_pos`, so it consumes no sequence number and
//!   no descriptor.)
//!
//! # Publication protocol (acquire/release)
//!
//! The producer reserves a sequence and data space (under its own lock),
//! writes every plain field of the descriptor and the payload, then publishes
//! the record with a **release** store of `stamp = stamp(seq, PENDING)`; when
//! the write to the data device completes it release-stores `stamp(seq,
//! COMMITTED)` or `stamp(seq, FAILED)`. `prod_seq` is advanced with a release
//! store after the reservation and is a hint only: a consumer must always
//! check the stamp.
//!
//! The consumer, for the sequence it expects next, **acquire**-loads the
//! stamp. If the stamp's sequence is not the expected one, the record is not
//! published yet (the slot still holds an older lap). Otherwise PENDING means
//! "wait" (the write is in flight; order must be kept, so later records wait
//! too), FAILED means "skip and mark the region dirty", COMMITTED means the
//! descriptor fields and the payload may be read. After using records up to
//! and including `seq`, the consumer releases them: `cons_seq = seq + 1` and
//! `data_tail = data_pos + granules` of that record. With the kernel the
//! consumer asks for this with an ioctl that the kernel validates
//! ([`release_is_valid`]) and applies from its own copy of the descriptors;
//! the kernel never trusts memory the consumer can write (the consumer's
//! mapping is read-only).
//!
//! A slot is only reused after the consumer released it, so once the consumer
//! has seen its expected sequence in a stamp, the descriptor and payload stay
//! stable until it releases them.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// `"DMRRING1"` read as a little-endian u64.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"DMRRING1");
/// ABI version; bumped on any incompatible layout or rule change. A new
/// ioctl that a consumer of this version never needs to issue (an old
/// consumer keeps working with it, a new one gets `ENOTTY` from an old
/// module) is not one: [`IOC_ALLOW_JOINS`] came without a bump. Version 3:
/// [`BitmapArg`] reports [`BitmapArg::in_flight_overflow`] (a larger
/// argument, so another [`IOC_BITMAP`] number), and a consumer that resyncs
/// takes the bitmap again until it returns no region and no overflow-mode
/// write is in flight before it calls the resync done.
pub const RING_ABI_VERSION: u32 = 3;
/// Size of the header page.
pub const HEADER_SIZE: u64 = 4096;
/// Size of one descriptor.
pub const DESC_SIZE: u64 = 64;
/// log2 of the data granule.
pub const GRANULE_SHIFT: u32 = 12;
/// Data ring granule: payloads are stored in whole 4 KiB granules.
pub const GRANULE_SIZE: u64 = 1 << GRANULE_SHIFT;
/// Page size assumed for alignment of the areas.
pub const PAGE_SIZE: u64 = 4096;
/// Size of a sector in the `sector` field.
pub const SECTOR_SIZE: u64 = 512;

// Record operations (`RecordDesc::op`).
/// Data written to `[sector, sector + len)`; payload present.
pub const OP_WRITE: u8 = 1;
/// Cache flush: every write completed before it was submitted is durable.
pub const OP_FLUSH: u8 = 2;
/// Discard of `[sector, sector + len)`; no payload.
pub const OP_DISCARD: u8 = 3;
/// Zeroes written to `[sector, sector + len)`; no payload.
pub const OP_WRITE_ZEROES: u8 = 4;
/// Marker inserted on request (`dmsetup message ... marker <id>`, whose
/// `volume` is the index of the volume the message was sent to, or
/// [`IOC_MARKER`]); `aux` is the marker id; no payload.
pub const OP_MARKER: u8 = 5;

// Record flags (`RecordDesc::flags`).
/// The write had forced unit access (REQ_FUA): durable when it completed.
pub const FLAG_FUA: u8 = 1;
/// The write was preceded by a flush (REQ_PREFLUSH) that dm split off.
pub const FLAG_PREFLUSH: u8 = 2;
/// A resync marker inserted by the consumer ([`IOC_MARKER`]): its `aux`
/// names what the consumer does at this point of the stream.
pub const FLAG_RESYNC: u8 = 4;

// Record states, the low two bits of the stamp.
/// Reserved and published; the write to the data device is in flight.
pub const STATE_PENDING: u64 = 1;
/// The write completed successfully on the source; ship it.
pub const STATE_COMMITTED: u64 = 2;
/// The write failed on the source; never ship it, its region is dirty.
pub const STATE_FAILED: u64 = 3;
const STATE_MASK: u64 = 3;

// Ring flags (`RingHeader::flags`).
/// The ring filled up and capture switched to the dirty bitmap.
pub const RING_FLAG_OVERFLOW: u32 = 1;
/// The last target of the group went away; no more records will come.
pub const RING_FLAG_DEAD: u32 = 2;

/// The ring header, at offset 0 of the mapping. Producer-written and
/// consumer-written fields sit on separate cache lines.
#[repr(C)]
pub struct RingHeader {
    /// [`RING_MAGIC`].
    pub magic: u64,
    /// [`RING_ABI_VERSION`].
    pub abi_version: u32,
    /// [`HEADER_SIZE`].
    pub header_size: u32,
    /// Random id of this ring instance; a new ring is a new generation and
    /// sequences of different generations are unrelated.
    pub generation: [u8; 16],
    /// Number of descriptors, a power of two.
    pub desc_count: u64,
    /// Number of data granules, a power of two.
    pub data_granules: u64,
    /// Byte offset of the descriptor ring in the mapping.
    pub desc_offset: u64,
    /// Byte offset of the data ring in the mapping.
    pub data_offset: u64,

    // --- producer cache line (offset 64) ---
    /// Next sequence the producer will reserve.
    pub prod_seq: AtomicU64,
    /// Next data granule the producer will reserve.
    pub data_head: AtomicU64,
    /// `RING_FLAG_*`.
    pub flags: AtomicU32,
    /// Reserved, zero.
    pub _reserved0: u32,
    /// While [`RING_FLAG_OVERFLOW`] is set: the first sequence captured after
    /// the ring filled (records before it are complete; what was written
    /// while overflowing is only in the dirty bitmap).
    pub overflow_seq: AtomicU64,
    /// Sequence of the first record of this generation.
    pub first_seq: u64,
    /// Regions currently marked dirty in the group's bitmaps (failed writes
    /// and writes made while overflowing); read them with [`IOC_BITMAP`].
    pub dirty_regions: AtomicU64,
    /// Reserved, zero.
    pub _reserved1: [u64; 2],

    // --- consumer cache line (offset 128) ---
    /// Oldest sequence not yet released by the consumer.
    pub cons_seq: AtomicU64,
    /// Oldest data granule not yet released by the consumer.
    pub data_tail: AtomicU64,
    /// Reserved, zero.
    pub _reserved2: [u64; 6],
}

/// One record descriptor.
#[repr(C)]
pub struct RecordDesc {
    /// `seq << 2 | state`; see [`stamp`]. Published with release ordering.
    pub stamp: AtomicU64,
    /// First 512-byte sector affected on the volume.
    pub sector: u64,
    /// Free-running granule index where the payload starts.
    pub data_pos: u64,
    /// Wall-clock time of submission, nanoseconds since the Unix epoch.
    pub submit_ns: u64,
    /// Bytes affected on the volume (0 for FLUSH and MARKER).
    pub len: u32,
    /// Payload granules (0 unless OP_WRITE).
    pub granules: u32,
    /// Volume index within the group.
    pub volume: u32,
    /// `OP_*`.
    pub op: u8,
    /// `FLAG_*`.
    pub flags: u8,
    /// Reserved, zero.
    pub _reserved0: u16,
    /// Operation-specific: the marker id for OP_MARKER.
    pub aux: u64,
    /// Wall-clock time the write completed on the source, nanoseconds since
    /// the Unix epoch; valid once the state is COMMITTED or FAILED.
    pub complete_ns: u64,
}

const _: () = assert!(core::mem::size_of::<RingHeader>() == 192);
const _: () = assert!(core::mem::size_of::<RecordDesc>() as u64 == DESC_SIZE);

/// Builds a stamp from a sequence and a state.
#[inline]
pub const fn stamp(seq: u64, state: u64) -> u64 {
    (seq << 2) | (state & STATE_MASK)
}

/// The state in a stamp.
#[inline]
pub const fn stamp_state(stamp: u64) -> u64 {
    stamp & STATE_MASK
}

/// Whether a stamp belongs to sequence `seq` (compared modulo 2^62, far more
/// than any ring holds).
#[inline]
pub const fn stamp_is_for(stamp: u64, seq: u64) -> bool {
    (stamp >> 2) == (seq & (u64::MAX >> 2))
}

/// Descriptor slot of a sequence.
#[inline]
pub const fn desc_slot(seq: u64, desc_count: u64) -> u64 {
    seq & desc_count.wrapping_sub(1)
}

/// Byte offset of a descriptor slot in the mapping.
#[inline]
pub const fn desc_byte_offset(hdr_desc_offset: u64, seq: u64, desc_count: u64) -> u64 {
    hdr_desc_offset.wrapping_add(desc_slot(seq, desc_count).wrapping_mul(DESC_SIZE))
}

/// Byte offset of a (free-running) data granule in the mapping.
#[inline]
pub const fn data_byte_offset(hdr_data_offset: u64, pos: u64, data_granules: u64) -> u64 {
    hdr_data_offset.wrapping_add((pos & data_granules.wrapping_sub(1)) << GRANULE_SHIFT)
}

/// Granules needed for a payload of `len` bytes.
#[inline]
pub const fn granules_for(len: u32) -> u64 {
    ((len as u64) + GRANULE_SIZE - 1) >> GRANULE_SHIFT
}

/// Rounds `x` up to a multiple of the page size (saturating).
#[inline]
pub const fn page_align(x: u64) -> u64 {
    match x.checked_add(PAGE_SIZE - 1) {
        Some(v) => v & !(PAGE_SIZE - 1),
        None => !(PAGE_SIZE - 1),
    }
}

/// Offsets and total size of a ring mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingGeometry {
    /// Number of descriptors (power of two).
    pub desc_count: u64,
    /// Number of data granules (power of two).
    pub data_granules: u64,
    /// Byte offset of the descriptor ring.
    pub desc_offset: u64,
    /// Byte offset of the data ring.
    pub data_offset: u64,
    /// Total size of the mapping in bytes.
    pub total_size: u64,
}

/// Computes the layout for the given counts, or `None` if a count is not a
/// non-zero power of two or the size overflows.
pub const fn geometry(desc_count: u64, data_granules: u64) -> Option<RingGeometry> {
    if !desc_count.is_power_of_two() || !data_granules.is_power_of_two() {
        return None;
    }
    let desc_offset = HEADER_SIZE;
    let desc_bytes = match desc_count.checked_mul(DESC_SIZE) {
        Some(v) => v,
        None => return None,
    };
    let data_offset = match desc_offset.checked_add(page_align(desc_bytes)) {
        Some(v) => v,
        None => return None,
    };
    let data_bytes = match data_granules.checked_mul(GRANULE_SIZE) {
        Some(v) => v,
        None => return None,
    };
    let total_size = match data_offset.checked_add(data_bytes) {
        Some(v) => v,
        None => return None,
    };
    Some(RingGeometry {
        desc_count,
        data_granules,
        desc_offset,
        data_offset,
        total_size,
    })
}

/// Where a payload of `need` granules goes, given the producer's data head
/// and the consumer's data tail: `Some((data_pos, new_head))`, or `None` if
/// the data ring lacks room. A payload never straddles the end of the ring:
/// if it would, it starts at the next lap and the skipped granules are
/// padding.
#[inline]
pub const fn reserve_data(
    head: u64,
    tail: u64,
    data_granules: u64,
    need: u64,
) -> Option<(u64, u64)> {
    if need > data_granules {
        return None;
    }
    let off = head & data_granules.wrapping_sub(1);
    let start = if off + need > data_granules {
        head.wrapping_add(data_granules - off)
    } else {
        head
    };
    let end = start.wrapping_add(need);
    if end.wrapping_sub(tail) > data_granules {
        None
    } else {
        Some((start, end))
    }
}

/// Whether one more descriptor can be reserved.
#[inline]
pub const fn desc_has_room(prod_seq: u64, cons_seq: u64, desc_count: u64) -> bool {
    prod_seq.wrapping_sub(cons_seq) < desc_count
}

/// Number of live records.
#[inline]
pub const fn records_live(prod_seq: u64, cons_seq: u64) -> u64 {
    prod_seq.wrapping_sub(cons_seq)
}

/// Whether a consumer may move `cons_seq` from `cons` to `new_cons` while the
/// producer is at `prod`: it may not go backwards nor pass the producer.
/// (The kernel additionally checks that every released record is no longer
/// PENDING.)
#[inline]
pub const fn release_is_valid(cons: u64, prod: u64, new_cons: u64) -> bool {
    new_cons.wrapping_sub(cons) <= prod.wrapping_sub(cons)
}

/// Loads a descriptor's stamp (`RecordDesc::stamp`) with acquire ordering
/// (consumer side).
#[inline]
pub fn load_stamp(stamp: &AtomicU64) -> u64 {
    stamp.load(Ordering::Acquire)
}

/// Publishes a descriptor's stamp with release ordering (producer side).
#[inline]
pub fn publish_stamp(slot: &AtomicU64, seq: u64, state: u64) {
    slot.store(stamp(seq, state), Ordering::Release)
}

// --- Control device (/dev/dm-replica) ioctls ---------------------------------

/// ioctl type byte of the control device.
pub const IOC_TYPE: u32 = b'R' as u32;
const IOC_WRITE: u32 = 1;
const IOC_READ: u32 = 2;

/// Linux `_IOC` encoding.
pub const fn ioc(dir: u32, ty: u32, nr: u32, size: u32) -> u32 {
    (dir << 30) | (size << 16) | (ty << 8) | nr
}

/// Maximum length of a group name, including the NUL padding.
pub const GROUP_NAME_LEN: usize = 64;

/// Argument of [`IOC_ATTACH`]: attach this file to the ring of a group.
#[repr(C)]
pub struct AttachArg {
    /// Group name, NUL-padded.
    pub group: [u8; GROUP_NAME_LEN],
    /// Out: total size of the mapping to `mmap`.
    pub map_size: u64,
    /// Out: the ring's generation.
    pub generation: [u8; 16],
}

/// Argument of [`IOC_RELEASE`]: release records up to `new_cons_seq`
/// (exclusive).
#[repr(C)]
pub struct ReleaseArg {
    /// The new `cons_seq`.
    pub new_cons_seq: u64,
}

/// Argument of [`IOC_BITMAP`]: read and clear the dirty bitmap.
#[repr(C)]
pub struct BitmapArg {
    /// User address of a buffer for the bitmap (one bit per region).
    pub buf: u64,
    /// Size of that buffer in bytes.
    pub buf_len: u64,
    /// Volume index within the group.
    pub volume: u32,
    /// Out: region size in KiB.
    pub region_kib: u32,
    /// Out: number of regions (bits) of the volume.
    pub regions: u64,
    /// Out: the sequence from which the ring is complete again.
    pub resume_seq: u64,
    /// Out: writes of this volume made in overflow mode (not captured) that
    /// had not completed when the bitmap was taken. Each sets its regions
    /// again when it completes, after this read cleared them, and may reach
    /// the disk after anything the consumer reads now: until a later read
    /// reports 0 here, the bitmap must be read again and its regions resent.
    pub in_flight_overflow: u64,
}

/// Argument of [`IOC_VOLUME`]: describe one volume of the attached group.
#[repr(C)]
pub struct VolumeArg {
    /// Volume index within the group (the `volume` field of records).
    pub index: u32,
    /// Out: region size of the dirty bitmap in KiB.
    pub region_kib: u32,
    /// Out: volume size in 512-byte sectors.
    pub sectors: u64,
    /// Out: number of regions (bits) of the volume's dirty bitmap.
    pub regions: u64,
    /// Out: regions currently marked dirty.
    pub dirty_regions: u64,
    /// Out: volume id from the table line, NUL-padded.
    pub id: [u8; GROUP_NAME_LEN],
}

/// Argument of [`IOC_MARKER`]: insert a MARKER record into the attached
/// group's ring, after every record reserved so far.
#[repr(C)]
pub struct MarkerArg {
    /// Volume index within the group the marker is about.
    pub volume: u32,
    /// Record flags: 0 or [`FLAG_RESYNC`].
    pub flags: u32,
    /// The marker's `aux` (its id).
    pub aux: u64,
    /// Out: the marker's sequence.
    pub seq: u64,
}

/// Argument of [`IOC_ALLOW_JOINS`].
#[repr(C)]
pub struct AllowJoinsArg {
    /// 1: tables for new volumes of the group are accepted while this
    /// consumer is attached; 0: they are refused with `EBUSY` (the state
    /// at attach). Any other value is `EINVAL`.
    pub allow: u32,
    /// Reserved, zero.
    pub _reserved: u32,
}

/// Attach to a group's ring.
pub const IOC_ATTACH: u32 = ioc(
    IOC_READ | IOC_WRITE,
    IOC_TYPE,
    1,
    core::mem::size_of::<AttachArg>() as u32,
);
/// Release consumed records.
pub const IOC_RELEASE: u32 = ioc(
    IOC_WRITE,
    IOC_TYPE,
    2,
    core::mem::size_of::<ReleaseArg>() as u32,
);
/// Read and clear the dirty bitmap.
pub const IOC_BITMAP: u32 = ioc(
    IOC_READ | IOC_WRITE,
    IOC_TYPE,
    3,
    core::mem::size_of::<BitmapArg>() as u32,
);
/// Describe a volume of the attached group (`ENOENT` past the last one).
pub const IOC_VOLUME: u32 = ioc(
    IOC_READ | IOC_WRITE,
    IOC_TYPE,
    4,
    core::mem::size_of::<VolumeArg>() as u32,
);
/// Insert a marker record (`EIO` while the ring overflows, `EAGAIN` while
/// writers wait for space, `ENOSPC` when the ring is full).
pub const IOC_MARKER: u32 = ioc(
    IOC_READ | IOC_WRITE,
    IOC_TYPE,
    5,
    core::mem::size_of::<MarkerArg>() as u32,
);
/// Let new volumes join the attached group, or refuse them again. While a
/// consumer is attached, a table for a volume id the group does not hold
/// yet is refused with `EBUSY` unless the consumer allowed joins (a new
/// volume's records would appear in a stream the consumer may not be able
/// to carry); reloading the table of a volume the group holds always works.
/// The allowance ends when the consumer detaches. `ENOTCONN` if the file
/// is not attached.
pub const IOC_ALLOW_JOINS: u32 = ioc(
    IOC_WRITE,
    IOC_TYPE,
    6,
    core::mem::size_of::<AllowJoinsArg>() as u32,
);
