// SPDX-License-Identifier: GPL-2.0

//! A small safe interface to device-mapper for one bio-based target type,
//! and to the other kernel services the module uses ([`sys`], [`misc`]).
//!
//! This module, its submodules and its C shim (`shim.c`) are the only places
//! in the module with `unsafe` code. A target implements [`Target`];
//! [`Registration`] registers it with dm and unregisters it on drop. dm calls
//! back into the `extern "C"` trampolines below, which turn raw pointers into
//! the safe types [`Ctr`], [`Args`], [`Bio`], [`DeviceVisitor`] and
//! [`StatusWriter`], and convert results to kernel error codes exactly once,
//! at the boundary.
//!
//! A bio the target keeps past `map` (to submit later) is a [`HeldBio`]: an
//! owned handle that is submitted exactly once, by [`HeldBio::submit`] or,
//! failing that, when it is dropped, so a held write can never be lost.
//!
//! C header: [`include/linux/device-mapper.h`](srctree/include/linux/device-mapper.h)

pub(crate) mod misc;
pub(crate) mod sys;

use core::fmt;
use core::marker::PhantomData;
use core::ptr::NonNull;

use kernel::bindings;
use kernel::error::to_result;
use kernel::ffi::{c_char, c_int, c_uint, c_ulong, c_void};
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::Arc;

// The C side of the shim, compiled into the same module (see `shim.h`).
#[allow(improper_ctypes)]
extern "C" {
    fn dmr_bio_set_dev(bio: *mut bindings::bio, bdev: *mut bindings::block_device);
    fn dmr_per_bio_data(bio: *mut bindings::bio, size: usize) -> *mut c_void;
    fn dmr_bio_copy_data(bio: *mut bindings::bio, dst: *mut c_void, len: usize) -> usize;
    fn dmr_limits_set_stable_writes(limits: *mut bindings::queue_limits);
    fn dmr_spin_lock_irqsave(lock: *mut bindings::spinlock_t) -> c_ulong;
    fn dmr_spin_unlock_irqrestore(lock: *mut bindings::spinlock_t, flags: c_ulong);
    fn dmr_vmalloc_user(size: c_ulong) -> *mut c_void;
    fn dmr_vfree(addr: *mut c_void);
    fn dmr_mmap_vmalloc_readonly(
        vma: *mut bindings::vm_area_struct,
        addr: *mut c_void,
        size: c_ulong,
    ) -> c_int;
    fn dmr_poll_wait(
        file: *mut bindings::file,
        wq: *mut bindings::wait_queue_head,
        pt: *mut bindings::poll_table_struct,
    );
    fn dmr_wake_up_all(wq: *mut bindings::wait_queue_head);
    fn dmr_init_waitqueue_head(wq: *mut bindings::wait_queue_head);
    fn dmr_alloc_workqueue(name: *const c_char) -> *mut bindings::workqueue_struct;
    fn dmr_now_ns() -> u64;
    #[cfg(dm_replica_corrupt_reads)]
    fn dmr_bio_save_iter(bio: *mut bindings::bio);
    #[cfg(dm_replica_corrupt_reads)]
    fn dmr_bio_corrupt_first_byte(bio: *mut bindings::bio);
}

/// Size of a sector in bytes, as a shift (block layer sectors are 512 bytes).
pub(crate) const SECTOR_SHIFT: u32 = 9;

/// A constructor failure: the errno returned to dm and the message dm shows
/// as the table load error (`ti->error`). dm keeps the pointer after the
/// constructor returns, hence `'static`; details about the offending input
/// go to the kernel log.
#[derive(Clone, Copy, Debug)]
pub(crate) struct CtrError {
    /// Returned to dm, and from there to userspace (`dmsetup`).
    pub(crate) errno: Error,
    /// Shown in the kernel log with the device and target name.
    pub(crate) msg: &'static CStr,
}

impl CtrError {
    /// An `EINVAL` failure with the given message.
    pub(crate) const fn invalid(msg: &'static CStr) -> Self {
        Self { errno: EINVAL, msg }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MapResult {
    Remapped,
    Kill,
    Submitted,
}

/// What [`Target::map`] decided for a bio. Only obtainable from the bio
/// itself ([`Bio::remapped`], [`Bio::kill`], [`Bio::hold`]), so the answer
/// always matches what happened to it.
#[derive(Debug)]
#[must_use]
pub(crate) struct Mapped(MapResult);

/// Which status `dmsetup` asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum StatusType {
    /// `dmsetup status`: runtime information.
    Info,
    /// `dmsetup table`: the table arguments, in a form that can be loaded again.
    Table,
    /// Measurement for IMA: `key=value,` pairs.
    Ima,
}

/// A device-mapper target type.
///
/// An instance is the per-table-line state dm keeps in `ti->private`: built
/// by [`Target::ctr`], dropped when dm destroys the target.
#[vtable]
pub(crate) trait Target: Sized + Send + Sync {
    /// Target type name, as used in table lines.
    const NAME: &'static CStr;
    /// Target type version (major, minor, patch).
    const VERSION: [u32; 3];
    /// Ask the block layer to keep the pages of a write unchanged until the
    /// write completes (`BLK_FEAT_STABLE_WRITES`).
    const STABLE_WRITES: bool = false;

    /// State shared by every target of this type (given to
    /// [`Registration::new`]).
    type Shared: Send + Sync;
    /// Per-bio state, kept in the per-bio data dm reserves in every clone
    /// (`per_io_data_size`), written in `map` and read back in `end_io`.
    type PerBio: Copy + Default;

    /// Builds the target from its table arguments.
    fn ctr(ctr: &mut Ctr<'_>, shared: &Arc<Self::Shared>, args: Args<'_>)
        -> Result<Self, CtrError>;

    /// Maps a bio. Must not sleep or allocate.
    fn map(&self, bio: Bio<'_, Self::PerBio>) -> Mapped;

    /// Called when a remapped or submitted bio completes. May run in hard-IRQ
    /// context: must not sleep or allocate.
    fn end_io(&self, _bio: &mut Bio<'_, Self::PerBio>, _ok: bool) {
        kernel::build_error(kernel::error::VTABLE_DEFAULT_ERROR)
    }

    /// Reports every lower device range the target uses, so dm can stack the
    /// queue limits and check that the table fits the devices.
    fn iterate_devices(&self, visit: &mut DeviceVisitor<'_>) -> Result<(), VisitStop>;

    /// Writes the status line for `dmsetup status` / `dmsetup table`.
    fn status(&self, kind: StatusType, out: &mut StatusWriter<'_>) -> fmt::Result;

    /// Handles `dmsetup message <dev> <sector> <args...>`; `out` is shown to
    /// the caller.
    fn message(&self, _args: Args<'_>, _out: &mut StatusWriter<'_>) -> Result {
        kernel::build_error(kernel::error::VTABLE_DEFAULT_ERROR)
    }
}

/// The target being constructed: its place in the table and the settings a
/// constructor may change.
///
/// # Invariants
///
/// `ti` points to the `dm_target` being constructed, valid for `'a`.
pub(crate) struct Ctr<'a> {
    ti: NonNull<bindings::dm_target>,
    _p: PhantomData<&'a mut bindings::dm_target>,
}

impl<'a> Ctr<'a> {
    /// First sector of the target in the mapped device.
    pub(crate) fn begin(&self) -> u64 {
        // SAFETY: `ti` is valid (type invariant); dm set `begin` before ctr.
        unsafe { (*self.ti.as_ptr()).begin }
    }

    /// Length of the target in sectors.
    pub(crate) fn len(&self) -> u64 {
        // SAFETY: `ti` is valid (type invariant); dm set `len` before ctr.
        unsafe { (*self.ti.as_ptr()).len }
    }

    /// Opens a lower device by path or `major:minor`, in the table's mode.
    /// It is released when the returned [`TargetDev`] is dropped, which must
    /// happen before the target is destroyed: keep it in the target (or let
    /// it drop when the constructor fails), never anywhere else.
    pub(crate) fn get_device(&mut self, path: &CStr) -> Result<TargetDev> {
        let ti = self.ti.as_ptr();
        let mut dev: *mut bindings::dm_dev = core::ptr::null_mut();
        // SAFETY: `ti` is valid and under construction (type invariant), which
        // is when dm allows `dm_get_device`; `path` is NUL-terminated and
        // outlives the call; `dev` is a valid out-pointer.
        let ret = unsafe {
            let mode = bindings::dm_table_get_mode((*ti).table);
            bindings::dm_get_device(ti, path.as_char_ptr(), mode, &mut dev)
        };
        to_result(ret)?;
        let dev = NonNull::new(dev).ok_or(ENODEV)?;
        // INVARIANT: `dm_get_device` succeeded, so `dev` holds a reference
        // on the table's device list entry for `ti`.
        Ok(TargetDev { ti: self.ti, dev })
    }

    /// Number of empty flush bios dm sends to `map` for a flush request.
    pub(crate) fn set_num_flush_bios(&mut self, n: u32) {
        // SAFETY: `ti` is valid and exclusively ours during ctr (invariant).
        unsafe { (*self.ti.as_ptr()).num_flush_bios = n };
    }

    /// Number of discard bios dm sends to `map` for a discard request.
    pub(crate) fn set_num_discard_bios(&mut self, n: u32) {
        // SAFETY: as in `set_num_flush_bios`.
        unsafe { (*self.ti.as_ptr()).num_discard_bios = n };
    }

    /// Number of write-zeroes bios dm sends to `map` for such a request.
    pub(crate) fn set_num_write_zeroes_bios(&mut self, n: u32) {
        // SAFETY: as in `set_num_flush_bios`.
        unsafe { (*self.ti.as_ptr()).num_write_zeroes_bios = n };
    }

    /// Splits bios so that none crosses a boundary of `sectors` sectors.
    pub(crate) fn set_max_io_len(&mut self, sectors: u64) -> Result {
        // SAFETY: `ti` is valid and under construction (type invariant).
        to_result(unsafe { bindings::dm_set_target_max_io_len(self.ti.as_ptr(), sectors) })
    }
}

/// A lower device opened with `dm_get_device`, released on drop.
///
/// # Invariants
///
/// `dev` was returned by a successful `dm_get_device(ti, ..)` and has not
/// been put. `ti` outlives this value: a `TargetDev` is created in a
/// constructor and owned by that target's private data (or dropped when the
/// constructor fails), and dm destroys the private data before the target.
pub(crate) struct TargetDev {
    ti: NonNull<bindings::dm_target>,
    dev: NonNull<bindings::dm_dev>,
}

// SAFETY: A `TargetDev` is only read after construction (`bdev`, `name`),
// which is safe from any thread; dropping it calls `dm_put_device`, which dm
// allows from the destructor's thread whichever thread created it.
unsafe impl Send for TargetDev {}
// SAFETY: `&TargetDev` only gives read access to fields that do not change
// while the device is held.
unsafe impl Sync for TargetDev {}

impl TargetDev {
    fn bdev(&self) -> *mut bindings::block_device {
        // SAFETY: `dev` is valid while held (type invariant).
        unsafe { (*self.dev.as_ptr()).bdev }
    }

    fn as_ptr(&self) -> *mut bindings::dm_dev {
        self.dev.as_ptr()
    }

    /// The device number (`dev_t`) of the lower device.
    pub(crate) fn devt(&self) -> u32 {
        // SAFETY: `dev` is valid while held (type invariant), so its open
        // block device is too.
        unsafe { (*self.bdev()).bd_dev }
    }

    /// The device's `major:minor` name, as dm prints it in tables.
    pub(crate) fn name(&self) -> &CStr {
        // SAFETY: `dev` is valid while held (type invariant) and dm
        // NUL-terminates `name` when it opens the device; the array is not
        // modified while the device is held.
        let name = unsafe { &(*self.dev.as_ptr()).name };
        let bytes: &[u8] = name;
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(0);
        CStr::from_bytes_with_nul(bytes.get(..=len).unwrap_or(b"\0")).unwrap_or(kernel::c_str!("?"))
    }
}

impl Drop for TargetDev {
    fn drop(&mut self) {
        // SAFETY: `dev` came from `dm_get_device(ti, ..)` and is put exactly
        // once, here; `ti` is still alive (type invariant).
        unsafe { bindings::dm_put_device(self.ti.as_ptr(), self.dev.as_ptr()) };
    }
}

/// Arguments of a table line (after the target name) or of a message.
///
/// # Invariants
///
/// `argv` points to `argc` NUL-terminated strings valid for `'a`.
pub(crate) struct Args<'a> {
    argv: *const *const c_char,
    argc: usize,
    next: usize,
    _p: PhantomData<&'a CStr>,
}

impl<'a> Iterator for Args<'a> {
    type Item = &'a CStr;

    fn next(&mut self) -> Option<&'a CStr> {
        if self.next >= self.argc {
            return None;
        }
        // SAFETY: `next < argc`, so the element is in bounds and is a valid
        // NUL-terminated string for `'a` (type invariant).
        let arg = unsafe { CStr::from_char_ptr(*self.argv.add(self.next)) };
        self.next += 1;
        Some(arg)
    }
}

/// Block layer operation of a bio.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Op {
    /// Read data.
    Read,
    /// Write data (possibly with FUA).
    Write,
    /// Flush the volatile cache: an empty write with PREFLUSH (dm splits a
    /// flush-with-data into this and the data).
    Flush,
    /// Discard a range.
    Discard,
    /// Write zeroes to a range.
    WriteZeroes,
    /// Anything else (secure erase, zone management, driver-private).
    Other,
}

/// Read access to a bio's fields and data.
///
/// # Safety
///
/// Implementors guarantee that `raw_bio` returns a bio that is valid and
/// owned by the caller for as long as the implementing value lives. Only
/// [`Bio`] and [`HeldBio`] implement it.
pub(crate) unsafe trait BioData {
    /// The bio.
    fn raw_bio(&self) -> *mut bindings::bio;

    /// The bio's operation.
    fn op(&self) -> Op {
        // SAFETY: the bio is valid (trait contract).
        let (opf, size) = unsafe { ((*self.raw_bio()).bi_opf, (*self.raw_bio()).bi_iter.bi_size) };
        let op = opf & ((1u32 << bindings::REQ_OP_BITS) - 1);
        let preflush = opf & (1u32 << bindings::req_flag_bits___REQ_PREFLUSH) != 0;
        match op {
            bindings::req_op_REQ_OP_READ => Op::Read,
            bindings::req_op_REQ_OP_WRITE if size == 0 && preflush => Op::Flush,
            bindings::req_op_REQ_OP_WRITE => Op::Write,
            bindings::req_op_REQ_OP_FLUSH => Op::Flush,
            bindings::req_op_REQ_OP_DISCARD => Op::Discard,
            bindings::req_op_REQ_OP_WRITE_ZEROES => Op::WriteZeroes,
            _ => Op::Other,
        }
    }

    /// Whether the write has forced unit access (durable on completion).
    fn is_fua(&self) -> bool {
        // SAFETY: the bio is valid (trait contract).
        let opf = unsafe { (*self.raw_bio()).bi_opf };
        opf & (1u32 << bindings::req_flag_bits___REQ_FUA) != 0
    }

    /// Current first sector (of the mapped device before remapping, of the
    /// lower device after).
    fn sector(&self) -> u64 {
        // SAFETY: the bio is valid (trait contract).
        unsafe { (*self.raw_bio()).bi_iter.bi_sector }
    }

    /// Bytes the bio covers (0 for an empty flush).
    fn bytes(&self) -> u32 {
        // SAFETY: the bio is valid (trait contract).
        unsafe { (*self.raw_bio()).bi_iter.bi_size }
    }

    /// Length in sectors.
    fn sectors(&self) -> u32 {
        self.bytes() >> SECTOR_SHIFT
    }

    /// Bytes of data the bio carries: its size for a write, 0 otherwise
    /// (discard and write-zeroes have a size but no data pages).
    fn data_bytes(&self) -> usize {
        match self.op() {
            Op::Write => self.bytes() as usize,
            _ => 0,
        }
    }
}

/// Per-bio data of type `P` of a dm clone.
///
/// # Safety
///
/// `bio` must be a dm clone of a target whose per-bio data size is
/// `size_of::<P>()` (set by `ctr_callback` from `Target::PerBio`).
unsafe fn per_bio_ptr<P>(bio: *mut bindings::bio) -> *mut P {
    // SAFETY: per the function's contract.
    unsafe { dmr_per_bio_data(bio, core::mem::size_of::<P>()).cast::<P>() }
}

/// A bio handed to the target by dm (a clone of the submitted one), with
/// per-bio data of type `P`.
///
/// # Invariants
///
/// `bio` is valid and owned by the target for `'a` (the map or end_io call),
/// and it is a clone of a target whose per-bio data is a `P`.
pub(crate) struct Bio<'a, P> {
    bio: NonNull<bindings::bio>,
    _p: PhantomData<(&'a mut bindings::bio, P)>,
}

// SAFETY: the bio is valid and ours for `'a` (type invariant).
unsafe impl<P> BioData for Bio<'_, P> {
    fn raw_bio(&self) -> *mut bindings::bio {
        self.bio.as_ptr()
    }
}

impl<P: Copy + Default> Bio<'_, P> {
    fn raw(&self) -> *mut bindings::bio {
        self.bio.as_ptr()
    }

    /// The target's per-bio state (as last set; `P::default()`-initialised
    /// by nobody: set it in `map` before relying on it in `end_io`).
    pub(crate) fn per_bio(&self) -> P {
        // SAFETY: the per-bio area is a `P`-sized slot of this clone (type
        // invariant); unaligned read because dm only aligns it to 8 bytes.
        unsafe { per_bio_ptr::<P>(self.raw()).read_unaligned() }
    }

    /// Sets the target's per-bio state.
    pub(crate) fn set_per_bio(&mut self, v: P) {
        // SAFETY: as in `per_bio`; the bio is exclusively ours.
        unsafe { per_bio_ptr::<P>(self.raw()).write_unaligned(v) }
    }

    /// Sends the bio to `dev`, leaving its sector unchanged (for empty bios).
    pub(crate) fn set_dev(&mut self, dev: &TargetDev) {
        // SAFETY: the bio is valid and ours (type invariant); `bdev` is an
        // open block device while `dev` is held.
        unsafe { dmr_bio_set_dev(self.raw(), dev.bdev()) };
    }

    /// Sends the bio to `sector` of `dev`.
    pub(crate) fn remap(&mut self, dev: &TargetDev, sector: u64) {
        self.set_dev(dev);
        // SAFETY: the bio is valid and ours (type invariant).
        unsafe { (*self.raw()).bi_iter.bi_sector = sector };
    }

    /// `map`'s answer for a bio remapped with [`Bio::remap`]: dm submits it.
    pub(crate) fn remapped(self) -> Mapped {
        Mapped(MapResult::Remapped)
    }

    /// `map`'s answer that fails the bio with an I/O error.
    pub(crate) fn kill(self) -> Mapped {
        Mapped(MapResult::Kill)
    }

    /// Keeps the (already remapped) bio to submit it later: `map` returns
    /// the second value, the target keeps the first.
    pub(crate) fn hold(self) -> (HeldBio<P>, Mapped) {
        // INVARIANT: a bio for which map returns DM_MAPIO_SUBMITTED belongs
        // to the target until it submits it; dm keeps the original alive
        // until the clone completes.
        (
            HeldBio {
                bio: self.bio,
                _p: PhantomData,
            },
            Mapped(MapResult::Submitted),
        )
    }

    /// Fault injection: remember where the data starts (in the per-bio data;
    /// needs `PerBio` to be at least a `bvec_iter`).
    #[cfg(dm_replica_corrupt_reads)]
    pub(crate) fn save_iter(&mut self) {
        const { assert!(core::mem::size_of::<P>() >= core::mem::size_of::<bindings::bvec_iter>()) };
        // SAFETY: the bio is a dm clone with per-bio data of at least a
        // `bvec_iter` (checked above).
        unsafe { dmr_bio_save_iter(self.raw()) };
    }

    /// Fault injection: flip one bit of the first data byte, in end_io of a
    /// read whose iterator was saved with [`Bio::save_iter`].
    #[cfg(dm_replica_corrupt_reads)]
    pub(crate) fn corrupt_first_byte(&mut self) {
        // SAFETY: as in `save_iter`; the read completed, so its pages hold
        // data the target may modify before dm completes the original bio.
        unsafe { dmr_bio_corrupt_first_byte(self.raw()) };
    }
}

/// A remapped bio the target took ownership of in `map` and has not
/// submitted yet. Submitted by [`HeldBio::submit`], or when dropped (so it
/// is never lost). Submitting may recurse into the block layer: do it from
/// process context with no spinlock held.
///
/// # Invariants
///
/// `bio` is a valid dm clone with per-bio data `P`, owned by this value
/// until it is submitted.
pub(crate) struct HeldBio<P> {
    bio: NonNull<bindings::bio>,
    _p: PhantomData<P>,
}

// SAFETY: a held bio is owned by this value alone and may be submitted from
// any thread; `P` is plain per-bio data.
unsafe impl<P: Copy + Send> Send for HeldBio<P> {}

// SAFETY: the bio is valid and owned until submission (type invariant).
unsafe impl<P> BioData for HeldBio<P> {
    fn raw_bio(&self) -> *mut bindings::bio {
        self.bio.as_ptr()
    }
}

impl<P: Copy + Default> HeldBio<P> {
    /// The target's per-bio state.
    pub(crate) fn per_bio(&self) -> P {
        // SAFETY: the per-bio area is a `P` of this clone (type invariant).
        unsafe { per_bio_ptr::<P>(self.bio.as_ptr()).read_unaligned() }
    }

    /// Sets the target's per-bio state.
    pub(crate) fn set_per_bio(&mut self, v: P) {
        // SAFETY: as in `per_bio`; the bio is exclusively ours.
        unsafe { per_bio_ptr::<P>(self.bio.as_ptr()).write_unaligned(v) }
    }

    /// Submits the bio to the device it was remapped to.
    pub(crate) fn submit(self) {
        // Drop does the submission.
    }
}

impl<P> Drop for HeldBio<P> {
    fn drop(&mut self) {
        // SAFETY: the bio is a remapped dm clone we own (type invariant);
        // dm_submit_bio_remap submits it once and dm completes it through
        // the target's end_io.
        unsafe { bindings::dm_submit_bio_remap(self.bio.as_ptr(), core::ptr::null_mut()) };
    }
}

/// A FIFO of held bios, linked through the bios themselves (`bi_next`), so
/// queueing never allocates. Dropping a non-empty queue submits the bios.
///
/// # Invariants
///
/// `head` starts a chain of `len` held bios (owned by the queue) linked by
/// `bi_next` and ending at `tail`, whose `bi_next` is null.
pub(crate) struct BioQueue<P> {
    head: Option<NonNull<bindings::bio>>,
    tail: Option<NonNull<bindings::bio>>,
    len: usize,
    _p: PhantomData<P>,
}

// SAFETY: the queue owns its bios (like `HeldBio`, which is Send).
unsafe impl<P: Copy + Send> Send for BioQueue<P> {}

impl<P: Copy + Default> BioQueue<P> {
    /// An empty queue.
    pub(crate) const fn new() -> Self {
        Self {
            head: None,
            tail: None,
            len: 0,
            _p: PhantomData,
        }
    }

    /// Number of queued bios.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Whether the queue is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Appends a held bio.
    pub(crate) fn push_back(&mut self, bio: HeldBio<P>) {
        let ptr = bio.bio;
        core::mem::forget(bio);
        // SAFETY: we own the bio now (taken from the HeldBio without
        // submitting it); `bi_next` is free for the owner's use while the
        // bio is not submitted.
        unsafe { (*ptr.as_ptr()).bi_next = core::ptr::null_mut() };
        match self.tail {
            // SAFETY: `tail` is a bio owned by the queue (invariant).
            Some(t) => unsafe { (*t.as_ptr()).bi_next = ptr.as_ptr() },
            None => self.head = Some(ptr),
        }
        self.tail = Some(ptr);
        self.len += 1;
    }

    /// Removes the oldest bio.
    pub(crate) fn pop_front(&mut self) -> Option<HeldBio<P>> {
        let head = self.head?;
        // SAFETY: `head` is a bio owned by the queue (invariant).
        let next = unsafe { (*head.as_ptr()).bi_next };
        // SAFETY: as above; unlink it before handing it out.
        unsafe { (*head.as_ptr()).bi_next = core::ptr::null_mut() };
        self.head = NonNull::new(next);
        if self.head.is_none() {
            self.tail = None;
        }
        self.len -= 1;
        // INVARIANT: ownership moves from the queue to the HeldBio.
        Some(HeldBio {
            bio: head,
            _p: PhantomData,
        })
    }

    /// The per-bio state of the oldest bio.
    pub(crate) fn front_per_bio(&self) -> Option<P> {
        let head = self.head?;
        // SAFETY: `head` is a held clone with per-bio data `P` (invariant).
        Some(unsafe { per_bio_ptr::<P>(head.as_ptr()).read_unaligned() })
    }
}

impl<P> Drop for BioQueue<P> {
    fn drop(&mut self) {
        let mut cur = self.head.take();
        while let Some(b) = cur {
            // SAFETY: `b` is owned by the queue (invariant); read the link
            // before giving the bio away.
            cur = NonNull::new(unsafe { (*b.as_ptr()).bi_next });
            // SAFETY: as above.
            unsafe { (*b.as_ptr()).bi_next = core::ptr::null_mut() };
            drop(HeldBio::<P> {
                bio: b,
                _p: PhantomData,
            });
        }
    }
}

/// The non-zero value a dm callout returned: stops the iteration and is
/// passed back to dm unchanged.
#[derive(Clone, Copy, Debug)]
pub(crate) struct VisitStop(c_int);

/// dm's callback for [`Target::iterate_devices`].
pub(crate) struct DeviceVisitor<'a> {
    ti: *mut bindings::dm_target,
    callout: unsafe extern "C" fn(
        *mut bindings::dm_target,
        *mut bindings::dm_dev,
        bindings::sector_t,
        bindings::sector_t,
        *mut c_void,
    ) -> c_int,
    data: *mut c_void,
    _p: PhantomData<&'a mut c_void>,
}

impl DeviceVisitor<'_> {
    /// Reports that the target uses `len` sectors of `dev` from `start`.
    pub(crate) fn visit(&mut self, dev: &TargetDev, start: u64, len: u64) -> Result<(), VisitStop> {
        // SAFETY: dm gave us `callout`, `ti` and `data` for this iteration,
        // and `dev` is a device of this target, held while the target lives.
        let r = unsafe { (self.callout)(self.ti, dev.as_ptr(), start, len, self.data) };
        if r == 0 {
            Ok(())
        } else {
            Err(VisitStop(r))
        }
    }
}

/// Writes a status line into dm's buffer, always NUL-terminated, truncating
/// (and reporting `fmt::Error`) when full; dm then retries with a larger one.
pub(crate) struct StatusWriter<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl fmt::Write for StatusWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        // Keep one byte for the terminating NUL.
        let room = self.buf.len().saturating_sub(1).saturating_sub(self.len);
        let n = s.len().min(room);
        let dst = self.buf.get_mut(self.len..self.len + n).ok_or(fmt::Error)?;
        dst.copy_from_slice(s.as_bytes().get(..n).ok_or(fmt::Error)?);
        self.len += n;
        if let Some(nul) = self.buf.get_mut(self.len) {
            *nul = 0;
        }
        if n < s.len() {
            Err(fmt::Error)
        } else {
            Ok(())
        }
    }
}

impl StatusWriter<'_> {
    /// A writer over dm's buffer of `maxlen` bytes at `result`, emptied.
    ///
    /// # Safety
    ///
    /// `result` must be writable for `maxlen` bytes and not accessed by
    /// anything else for `'a`.
    unsafe fn from_raw<'a>(result: *mut c_char, maxlen: c_uint) -> Option<StatusWriter<'a>> {
        let maxlen = usize::try_from(maxlen).ok()?;
        if result.is_null() || maxlen == 0 {
            return None;
        }
        // SAFETY: per the function's contract.
        let buf = unsafe { core::slice::from_raw_parts_mut(result.cast::<u8>(), maxlen) };
        if let Some(first) = buf.first_mut() {
            *first = 0;
        }
        Some(StatusWriter { buf, len: 0 })
    }
}

/// The registered target type and the shared state its targets get, at a
/// fixed address. `tt` comes first, so dm's `ti->type` points at the whole.
#[repr(C)]
struct TypeBox<T: Target> {
    tt: kernel::types::Opaque<bindings::target_type>,
    shared: Arc<T::Shared>,
}

/// A registered target type; unregistered on drop.
///
/// # Invariants
///
/// `tb.tt` is registered with dm for the lifetime of the value.
pub(crate) struct Registration<T: Target> {
    tb: Pin<KBox<TypeBox<T>>>,
}

// SAFETY: The registration only keeps the `target_type` alive at a fixed
// address and unregisters it on drop; dm serialises its own accesses to it,
// and `dm_unregister_target` may be called from any thread. The shared state
// is Send + Sync.
unsafe impl<T: Target> Send for Registration<T> {}
// SAFETY: `&Registration` gives no access to the `target_type`.
unsafe impl<T: Target> Sync for Registration<T> {}

impl<T: Target> Registration<T> {
    /// Registers target type `T`, owned by `module` (dm holds a reference on
    /// the module while a table uses the target, so it cannot be unloaded).
    /// Every target's constructor gets `shared`.
    pub(crate) fn new(module: &'static ThisModule, shared: Arc<T::Shared>) -> Result<Self> {
        // SAFETY: `target_type` is a C struct of integers, pointers and
        // optional function pointers, for which all-zero is a valid value
        // (no callback, empty list head).
        let mut tt: bindings::target_type = unsafe { core::mem::zeroed() };
        tt.name = T::NAME.as_char_ptr();
        tt.module = module.as_ptr();
        tt.version = T::VERSION;
        tt.ctr = Some(ctr_callback::<T>);
        tt.dtr = Some(dtr_callback::<T>);
        tt.map = Some(map_callback::<T>);
        if T::HAS_END_IO {
            tt.end_io = Some(end_io_callback::<T>);
        }
        if T::HAS_MESSAGE {
            tt.message = Some(message_callback::<T>);
        }
        if T::STABLE_WRITES {
            tt.io_hints = Some(io_hints_callback::<T>);
        }
        tt.iterate_devices = Some(iterate_devices_callback::<T>);
        tt.status = Some(status_callback::<T>);

        let tb = KBox::pin(
            TypeBox::<T> {
                tt: kernel::types::Opaque::new(tt),
                shared,
            },
            GFP_KERNEL,
        )?;
        // SAFETY: `tt` is a fully initialised target type at a stable heap
        // address that stays allocated until `drop` unregisters it.
        to_result(unsafe { bindings::dm_register_target(tb.tt.get()) })?;
        // INVARIANT: registration succeeded.
        Ok(Self { tb })
    }
}

impl<T: Target> Drop for Registration<T> {
    fn drop(&mut self) {
        // SAFETY: `tt` is registered (type invariant). The module cannot be
        // unloading while tables use the target (dm holds a module reference
        // per target), so no target of this type exists any more.
        unsafe { bindings::dm_unregister_target(self.tb.tt.get()) };
    }
}

/// # Safety
///
/// Called by dm only, with a valid `ti` under construction (whose type is
/// our registered `TypeBox<T>`) and `argc` valid NUL-terminated strings in
/// `argv`.
unsafe extern "C" fn ctr_callback<T: Target>(
    ti: *mut bindings::dm_target,
    argc: c_uint,
    argv: *mut *mut c_char,
) -> c_int {
    let Some(ti_ptr) = NonNull::new(ti) else {
        return EINVAL.to_errno();
    };
    // SAFETY: `ti->type` is the target type we registered, the first field
    // of a `#[repr(C)] TypeBox<T>` that outlives every target of the type.
    let shared = unsafe { &(*(*ti).type_.cast::<TypeBox<T>>()).shared };
    // INVARIANT: dm passes a valid target under construction.
    let mut ctr = Ctr {
        ti: ti_ptr,
        _p: PhantomData,
    };
    let Ok(argc) = usize::try_from(argc) else {
        return EINVAL.to_errno();
    };
    let Ok(per_io) = u32::try_from(core::mem::size_of::<T::PerBio>()) else {
        return EINVAL.to_errno();
    };
    // SAFETY: `ti` is valid and ours during ctr. The per-bio data size must
    // be set here, before any bio reaches map: `Bio<T::PerBio>` relies on it.
    // The target submits bios it held with dm_submit_bio_remap, which does
    // the I/O accounting.
    unsafe {
        (*ti).per_io_data_size = per_io;
        (*ti).set_accounts_remapped_io(true);
    }
    // INVARIANT: dm passes `argc` valid strings that live through ctr.
    let args = Args {
        argv: argv as *const *const c_char,
        argc,
        next: 0,
        _p: PhantomData,
    };

    let result = T::ctr(&mut ctr, shared, args).and_then(|target| {
        KBox::new(target, GFP_KERNEL).map_err(|_| CtrError {
            errno: ENOMEM,
            msg: kernel::c_str!("Cannot allocate target context"),
        })
    });
    match result {
        Ok(target) => {
            // SAFETY: `ti` is valid; dm hands `private` back to the other
            // callbacks and to `dtr_callback`, which frees it.
            unsafe { (*ti).private = KBox::into_raw(target).cast() };
            0
        }
        Err(e) => {
            // SAFETY: `ti` is valid; `msg` is 'static, so dm may print it
            // after we return.
            unsafe { (*ti).error = e.msg.as_char_ptr().cast_mut() };
            e.errno.to_errno()
        }
    }
}

/// Borrows the target's private data.
///
/// # Safety
///
/// `ti` must be a target whose constructor succeeded and that dm has not
/// destroyed yet.
unsafe fn private<'a, T: Target>(ti: *mut bindings::dm_target) -> &'a T {
    // SAFETY: per the function's contract, `private` was set by
    // `ctr_callback` to a live `KBox<T>`, only freed by `dtr_callback`, which
    // dm never runs concurrently with other callbacks of the target.
    unsafe { &*(*ti).private.cast::<T>() }
}

/// # Safety
///
/// Called by dm only, once, for a target whose constructor succeeded.
unsafe extern "C" fn dtr_callback<T: Target>(ti: *mut bindings::dm_target) {
    // SAFETY: `private` came from `KBox::into_raw` in `ctr_callback` and dm
    // calls the destructor once, after all I/O to the target has finished.
    let target = unsafe { KBox::from_raw((*ti).private.cast::<T>()) };
    // SAFETY: `ti` is valid until the destructor returns.
    unsafe { (*ti).private = core::ptr::null_mut() };
    drop(target);
}

/// # Safety
///
/// Called by dm only, for a live target and a bio it owns during the call.
unsafe extern "C" fn map_callback<T: Target>(
    ti: *mut bindings::dm_target,
    bio: *mut bindings::bio,
) -> c_int {
    let Some(bio) = NonNull::new(bio) else {
        return bindings::DM_MAPIO_KILL as c_int;
    };
    // SAFETY: dm calls map for a constructed, live target.
    let target = unsafe { private::<T>(ti) };
    // INVARIANT: the bio is a clone of this target (per-bio data of
    // `T::PerBio`, set in ctr), valid and ours for the duration of map.
    let bio = Bio {
        bio,
        _p: PhantomData,
    };
    match target.map(bio).0 {
        MapResult::Remapped => bindings::DM_MAPIO_REMAPPED as c_int,
        MapResult::Kill => bindings::DM_MAPIO_KILL as c_int,
        MapResult::Submitted => bindings::DM_MAPIO_SUBMITTED as c_int,
    }
}

/// # Safety
///
/// Called by dm only, for a live target, a bio it remapped and a valid
/// status pointer.
unsafe extern "C" fn end_io_callback<T: Target>(
    ti: *mut bindings::dm_target,
    bio: *mut bindings::bio,
    error: *mut bindings::blk_status_t,
) -> c_int {
    let Some(bio) = NonNull::new(bio) else {
        return bindings::DM_ENDIO_DONE as c_int;
    };
    // SAFETY: dm passes a valid status pointer.
    let ok = unsafe { error.as_ref() }.map_or(false, |&e| e == 0);
    // SAFETY: dm calls end_io for a constructed, live target.
    let target = unsafe { private::<T>(ti) };
    // INVARIANT: the bio is a clone of this target, ours until end_io returns.
    let mut bio = Bio {
        bio,
        _p: PhantomData,
    };
    target.end_io(&mut bio, ok);
    bindings::DM_ENDIO_DONE as c_int
}

/// # Safety
///
/// Called by dm only, for a live target, with its callout and data.
unsafe extern "C" fn iterate_devices_callback<T: Target>(
    ti: *mut bindings::dm_target,
    callout: bindings::iterate_devices_callout_fn,
    data: *mut c_void,
) -> c_int {
    let Some(callout) = callout else {
        return 0;
    };
    // SAFETY: dm calls iterate_devices for a constructed, live target.
    let target = unsafe { private::<T>(ti) };
    let mut visitor = DeviceVisitor {
        ti,
        callout,
        data,
        _p: PhantomData,
    };
    match target.iterate_devices(&mut visitor) {
        Ok(()) => 0,
        Err(VisitStop(r)) => r,
    }
}

/// # Safety
///
/// Called by dm only, for a live target, with a writable buffer of `maxlen`
/// bytes at `result`.
unsafe extern "C" fn status_callback<T: Target>(
    ti: *mut bindings::dm_target,
    status_type: bindings::status_type_t,
    _status_flags: c_uint,
    result: *mut c_char,
    maxlen: c_uint,
) {
    // SAFETY: dm passes a writable buffer of `maxlen` bytes that nothing else
    // accesses during the call.
    let Some(mut out) = (unsafe { StatusWriter::from_raw(result, maxlen) }) else {
        return;
    };
    let kind = match status_type {
        bindings::status_type_t_STATUSTYPE_INFO => StatusType::Info,
        bindings::status_type_t_STATUSTYPE_TABLE => StatusType::Table,
        bindings::status_type_t_STATUSTYPE_IMA => StatusType::Ima,
        _ => return,
    };
    // SAFETY: dm calls status for a constructed, live target.
    let target = unsafe { private::<T>(ti) };
    // A full buffer is detected by dm from the string length; nothing to add.
    let _ = target.status(kind, &mut out);
}

/// # Safety
///
/// Called by dm only, for a live target, with `argc` valid strings in `argv`
/// and a writable buffer of `maxlen` bytes at `result`.
unsafe extern "C" fn message_callback<T: Target>(
    ti: *mut bindings::dm_target,
    argc: c_uint,
    argv: *mut *mut c_char,
    result: *mut c_char,
    maxlen: c_uint,
) -> c_int {
    let Ok(argc) = usize::try_from(argc) else {
        return EINVAL.to_errno();
    };
    // SAFETY: dm passes a writable result buffer of `maxlen` bytes.
    let Some(mut out) = (unsafe { StatusWriter::from_raw(result, maxlen) }) else {
        return EINVAL.to_errno();
    };
    // INVARIANT: dm passes `argc` valid strings that live through the call.
    let args = Args {
        argv: argv as *const *const c_char,
        argc,
        next: 0,
        _p: PhantomData,
    };
    // SAFETY: dm calls message for a constructed, live target.
    let target = unsafe { private::<T>(ti) };
    match target.message(args, &mut out) {
        // 1 tells dm the result buffer holds a reply for the caller.
        Ok(()) if out.len > 0 => 1,
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// # Safety
///
/// Called by dm only, for a live target and the limits being stacked.
unsafe extern "C" fn io_hints_callback<T: Target>(
    _ti: *mut bindings::dm_target,
    limits: *mut bindings::queue_limits,
) {
    if T::STABLE_WRITES && !limits.is_null() {
        // SAFETY: dm passes the target's limits, writable during the call.
        unsafe { dmr_limits_set_stable_writes(limits) };
    }
}
