//! The one place that touches the ring's shared memory through raw pointers.
//!
//! Everything above this module works with safe, bounds-checked accessors:
//! [`Mapping`] validates the header once, then hands out atomics by reference
//! and copies plain fields in and out with volatile accesses (the memory is
//! shared with another process or the kernel, so the compiler must not cache
//! or invent reads and writes).

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::AtomicU64;

use ring_abi::{RecordDesc, RingGeometry, RingHeader, DESC_SIZE, GRANULE_SIZE, HEADER_SIZE};

use crate::RingError;

/// A plain copy of a descriptor's non-atomic fields.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DescFields {
    /// First sector.
    pub sector: u64,
    /// First payload granule (free-running).
    pub data_pos: u64,
    /// Submission time, ns since the epoch.
    pub submit_ns: u64,
    /// Bytes affected.
    pub len: u32,
    /// Payload granules.
    pub granules: u32,
    /// Volume index.
    pub volume: u32,
    /// `OP_*`.
    pub op: u8,
    /// `FLAG_*`.
    pub flags: u8,
    /// Marker id for markers.
    pub aux: u64,
    /// Completion time, ns since the epoch (0 while pending).
    pub complete_ns: u64,
}

/// A shared mapping of a ring.
///
/// # Invariants
///
/// `ptr` points to `len` bytes mapped with `mmap` for the lifetime of the
/// value, page aligned; `len >= geometry.total_size`, and `geometry` was
/// validated from the header, so every descriptor slot and data granule
/// computed from it lies inside the mapping. If `writable` is false the
/// mapping is read-only and the write accessors refuse to run.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
    writable: bool,
    geometry: RingGeometry,
    generation: [u8; 16],
    first_seq: u64,
}

// SAFETY: the mapping is plain shared memory; all shared mutable state in it
// is accessed either through atomics or, for descriptor fields and payloads,
// under the ring's publication protocol (a slot is only written by the
// producer before it publishes it and after the consumer released it). The
// raw pointer itself is never freed before drop.
unsafe impl Send for Mapping {}
// SAFETY: as for Send; `&Mapping` only exposes atomics and volatile copies.
unsafe impl Sync for Mapping {}

fn map_fd(fd: i32, len: usize, writable: bool) -> Result<NonNull<u8>, RingError> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of `len` bytes of an open file descriptor
    // at a kernel-chosen address; no existing memory is affected.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), len, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(RingError::Io {
            what: "mmap ring",
            source: std::io::Error::last_os_error(),
        });
    }
    NonNull::new(p.cast::<u8>()).ok_or(RingError::Io {
        what: "mmap ring",
        source: std::io::Error::other("null mapping"),
    })
}

impl Mapping {
    /// Creates a ring file of the given geometry and maps it read-write. The
    /// header is initialised by [`crate::Producer`].
    pub(crate) fn create_file(
        path: &Path,
        geometry: RingGeometry,
    ) -> Result<(Self, File), RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| RingError::Io {
                what: "create ring file",
                source,
            })?;
        file.set_len(geometry.total_size)
            .map_err(|source| RingError::Io {
                what: "size ring file",
                source,
            })?;
        let len = usize::try_from(geometry.total_size)
            .map_err(|_| RingError::BadHeader("ring too large"))?;
        let ptr = map_fd(file.as_raw_fd(), len, true)?;
        // INVARIANT: the file was sized to the geometry just computed.
        Ok((
            Self {
                ptr,
                len,
                writable: true,
                geometry,
                generation: [0; 16],
                first_seq: 0,
            },
            file,
        ))
    }

    /// Maps an existing ring file and validates its header.
    pub fn open_file(path: &Path, writable: bool) -> Result<Self, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| RingError::Io {
                what: "open ring file",
                source,
            })?;
        let size = file
            .metadata()
            .map_err(|source| RingError::Io {
                what: "stat ring file",
                source,
            })?
            .len();
        Self::from_fd(file.as_raw_fd(), size, writable)
    }

    /// Maps `size` bytes of `fd` (a ring file or the control device) and
    /// validates the header.
    pub fn from_fd(fd: i32, size: u64, writable: bool) -> Result<Self, RingError> {
        if size < HEADER_SIZE {
            return Err(RingError::BadHeader("mapping smaller than the header"));
        }
        let len = usize::try_from(size).map_err(|_| RingError::BadHeader("ring too large"))?;
        let ptr = map_fd(fd, len, writable)?;
        let mut m = Self {
            ptr,
            len,
            writable,
            geometry: RingGeometry {
                desc_count: 0,
                data_granules: 0,
                desc_offset: 0,
                data_offset: 0,
                total_size: 0,
            },
            generation: [0; 16],
            first_seq: 0,
        };
        // SAFETY: the mapping is at least HEADER_SIZE bytes and page aligned,
        // so a RingHeader fits at offset 0; the fields read here are written
        // once before the ring is shared and never change afterwards.
        let (
            magic,
            version,
            desc_count,
            data_granules,
            desc_offset,
            data_offset,
            generation,
            first_seq,
        ) = unsafe {
            let h = m.ptr.as_ptr().cast::<RingHeader>();
            (
                std::ptr::addr_of!((*h).magic).read_volatile(),
                std::ptr::addr_of!((*h).abi_version).read_volatile(),
                std::ptr::addr_of!((*h).desc_count).read_volatile(),
                std::ptr::addr_of!((*h).data_granules).read_volatile(),
                std::ptr::addr_of!((*h).desc_offset).read_volatile(),
                std::ptr::addr_of!((*h).data_offset).read_volatile(),
                std::ptr::addr_of!((*h).generation).read_volatile(),
                std::ptr::addr_of!((*h).first_seq).read_volatile(),
            )
        };
        if magic != ring_abi::RING_MAGIC {
            return Err(RingError::BadHeader("bad magic"));
        }
        if version != ring_abi::RING_ABI_VERSION {
            return Err(RingError::Version(version));
        }
        let geometry = ring_abi::geometry(desc_count, data_granules)
            .ok_or(RingError::BadHeader("bad ring geometry"))?;
        if geometry.desc_offset != desc_offset || geometry.data_offset != data_offset {
            return Err(RingError::BadHeader("unexpected area offsets"));
        }
        if geometry.total_size > size {
            return Err(RingError::BadHeader("mapping smaller than the ring"));
        }
        // INVARIANT: geometry validated against the mapping's size.
        m.geometry = geometry;
        m.generation = generation;
        m.first_seq = first_seq;
        Ok(m)
    }

    /// The validated geometry.
    pub fn geometry(&self) -> RingGeometry {
        self.geometry
    }

    /// The ring's generation id.
    pub fn generation(&self) -> [u8; 16] {
        self.generation
    }

    /// The first sequence of this generation.
    pub fn first_seq(&self) -> u64 {
        self.first_seq
    }

    fn header_ptr(&self) -> *mut RingHeader {
        self.ptr.as_ptr().cast::<RingHeader>()
    }

    /// Writes a fresh header (producer only, before the ring is shared).
    pub(crate) fn init_header(&mut self, generation: [u8; 16], first_seq: u64, first_granule: u64) {
        assert!(self.writable, "init_header on a read-only mapping");
        let g = self.geometry;
        // SAFETY: the mapping is writable, at least HEADER_SIZE bytes and page
        // aligned; nobody else has it mapped yet (we just created the file).
        unsafe {
            let h = self.header_ptr();
            std::ptr::write_bytes(h.cast::<u8>(), 0, HEADER_SIZE as usize);
            std::ptr::addr_of_mut!((*h).magic).write_volatile(ring_abi::RING_MAGIC);
            std::ptr::addr_of_mut!((*h).abi_version).write_volatile(ring_abi::RING_ABI_VERSION);
            std::ptr::addr_of_mut!((*h).header_size).write_volatile(HEADER_SIZE as u32);
            std::ptr::addr_of_mut!((*h).generation).write_volatile(generation);
            std::ptr::addr_of_mut!((*h).desc_count).write_volatile(g.desc_count);
            std::ptr::addr_of_mut!((*h).data_granules).write_volatile(g.data_granules);
            std::ptr::addr_of_mut!((*h).desc_offset).write_volatile(g.desc_offset);
            std::ptr::addr_of_mut!((*h).data_offset).write_volatile(g.data_offset);
            std::ptr::addr_of_mut!((*h).first_seq).write_volatile(first_seq);
        }
        self.header()
            .prod_seq
            .store(first_seq, std::sync::atomic::Ordering::Release);
        self.header()
            .cons_seq
            .store(first_seq, std::sync::atomic::Ordering::Release);
        self.header()
            .data_head
            .store(first_granule, std::sync::atomic::Ordering::Release);
        self.header()
            .data_tail
            .store(first_granule, std::sync::atomic::Ordering::Release);
        // Stamps of a fresh ring must not match any sequence the first lap
        // will use: stamp 0 is "seq 0, no state", and state 0 is never
        // published, so an all-zero slot reads as "not yet published".
        self.generation = generation;
        self.first_seq = first_seq;
    }

    /// The header, for its atomics and constant fields.
    pub fn header(&self) -> &RingHeader {
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page aligned and
        // lives as long as `self`; the header's mutable fields are atomics, and
        // its plain fields never change once the ring is shared.
        unsafe { &*self.header_ptr() }
    }

    fn desc_ptr(&self, seq: u64) -> *mut RecordDesc {
        let off =
            ring_abi::desc_byte_offset(self.geometry.desc_offset, seq, self.geometry.desc_count);
        debug_assert!(off + DESC_SIZE <= self.geometry.total_size);
        // SAFETY: by the invariant, every slot offset lies inside the mapping.
        unsafe { self.ptr.as_ptr().add(off as usize).cast::<RecordDesc>() }
    }

    /// The stamp of the slot that holds `seq`.
    pub fn stamp(&self, seq: u64) -> &AtomicU64 {
        // SAFETY: the slot lies inside the mapping (invariant) and is 8-byte
        // aligned (64-byte slots at a page-aligned offset); the stamp is only
        // ever accessed atomically.
        unsafe { &*std::ptr::addr_of!((*self.desc_ptr(seq)).stamp) }
    }

    /// Copies the plain fields of the slot that holds `seq`. Only meaningful
    /// after an acquire load of its stamp showed `seq`.
    pub fn read_desc(&self, seq: u64) -> DescFields {
        let d = self.desc_ptr(seq);
        // SAFETY: the slot lies inside the mapping (invariant); volatile reads
        // of plain integers cannot produce invalid values, and the protocol
        // guarantees the producer does not write them while they are read.
        unsafe {
            DescFields {
                sector: std::ptr::addr_of!((*d).sector).read_volatile(),
                data_pos: std::ptr::addr_of!((*d).data_pos).read_volatile(),
                submit_ns: std::ptr::addr_of!((*d).submit_ns).read_volatile(),
                len: std::ptr::addr_of!((*d).len).read_volatile(),
                granules: std::ptr::addr_of!((*d).granules).read_volatile(),
                volume: std::ptr::addr_of!((*d).volume).read_volatile(),
                op: std::ptr::addr_of!((*d).op).read_volatile(),
                flags: std::ptr::addr_of!((*d).flags).read_volatile(),
                aux: std::ptr::addr_of!((*d).aux).read_volatile(),
                complete_ns: std::ptr::addr_of!((*d).complete_ns).read_volatile(),
            }
        }
    }

    /// Writes the plain fields of the slot for `seq` (producer only, before
    /// publishing it).
    pub(crate) fn write_desc(&self, seq: u64, f: &DescFields) {
        assert!(self.writable, "write_desc on a read-only mapping");
        let d = self.desc_ptr(seq);
        // SAFETY: the slot lies inside the writable mapping (invariant) and
        // the consumer released it, so nobody reads these fields until the
        // stamp is published after this.
        unsafe {
            std::ptr::addr_of_mut!((*d).sector).write_volatile(f.sector);
            std::ptr::addr_of_mut!((*d).data_pos).write_volatile(f.data_pos);
            std::ptr::addr_of_mut!((*d).submit_ns).write_volatile(f.submit_ns);
            std::ptr::addr_of_mut!((*d).len).write_volatile(f.len);
            std::ptr::addr_of_mut!((*d).granules).write_volatile(f.granules);
            std::ptr::addr_of_mut!((*d).volume).write_volatile(f.volume);
            std::ptr::addr_of_mut!((*d).op).write_volatile(f.op);
            std::ptr::addr_of_mut!((*d).flags).write_volatile(f.flags);
            std::ptr::addr_of_mut!((*d).aux).write_volatile(f.aux);
            std::ptr::addr_of_mut!((*d)._reserved0).write_volatile(0);
            std::ptr::addr_of_mut!((*d).complete_ns).write_volatile(f.complete_ns);
        }
    }

    fn data_range(&self, pos: u64, len: usize) -> Result<usize, RingError> {
        let g = self.geometry;
        let off = ring_abi::data_byte_offset(g.data_offset, pos, g.data_granules);
        let end = off
            .checked_add(len as u64)
            .ok_or(RingError::Corrupt("payload offset overflow"))?;
        // A payload never straddles the end of the data ring.
        if end > g.total_size || (len as u64) > g.data_granules * GRANULE_SIZE {
            return Err(RingError::Corrupt(
                "payload crosses the end of the data ring",
            ));
        }
        Ok(off as usize)
    }

    /// Copies `out.len()` payload bytes starting at granule `pos`.
    pub fn read_data(&self, pos: u64, out: &mut [u8]) -> Result<(), RingError> {
        let off = self.data_range(pos, out.len())?;
        // SAFETY: `data_range` checked `[off, off + out.len())` lies inside the
        // mapping; the protocol keeps the payload stable until it is released;
        // `out` is a distinct, exclusively borrowed buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(off), out.as_mut_ptr(), out.len())
        };
        Ok(())
    }

    /// Zeroes `len` bytes starting `byte_off` bytes into the payload that
    /// starts at granule `pos` (producer only).
    pub(crate) fn zero_data(&self, pos: u64, byte_off: usize, len: usize) -> Result<(), RingError> {
        assert!(self.writable, "zero_data on a read-only mapping");
        let off = self.data_range(pos, byte_off + len)?;
        // SAFETY: `data_range` checked `[off, off + byte_off + len)` lies
        // inside the writable mapping; the granules are reserved, unpublished.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(off + byte_off), 0, len) };
        Ok(())
    }

    /// Sets the completion time of the slot for `seq` (producer only, before
    /// publishing its final state).
    pub(crate) fn set_complete_ns(&self, seq: u64, ns: u64) {
        assert!(self.writable, "set_complete_ns on a read-only mapping");
        let d = self.desc_ptr(seq);
        // SAFETY: the slot lies inside the writable mapping (invariant); the
        // record is PENDING, so the consumer does not read this field until
        // the final state is published after this store.
        unsafe { std::ptr::addr_of_mut!((*d).complete_ns).write_volatile(ns) };
    }

    /// Copies `src` into the data ring at granule `pos` (producer only).
    pub(crate) fn write_data(&self, pos: u64, src: &[u8]) -> Result<(), RingError> {
        assert!(self.writable, "write_data on a read-only mapping");
        let off = self.data_range(pos, src.len())?;
        // SAFETY: `data_range` checked the range lies inside the writable
        // mapping; the granules were reserved by the producer and released by
        // the consumer, so nobody reads them until the record is published.
        unsafe {
            std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.as_ptr().add(off), src.len())
        };
        Ok(())
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping created in `map_fd`,
        // and no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
