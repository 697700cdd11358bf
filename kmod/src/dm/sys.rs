// SPDX-License-Identifier: GPL-2.0

//! Kernel services the target needs beyond device-mapper, each behind a small
//! safe type: an interrupt-safe spinlock, ring memory that can be mapped into
//! userspace, a wait queue for `poll`, the module's workqueue, the clock,
//! random bytes and short sleeps.

use core::mem::offset_of;
use core::ptr::NonNull;
use core::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

use kernel::bindings;
use kernel::ffi::{c_char, c_ulong, c_void};
use kernel::prelude::*;
use kernel::sync::lock::{Backend, Lock};
use kernel::types::Opaque;
use kernel::workqueue::{Queue, RawWorkItem};

use super::{dmr_alloc_workqueue, dmr_now_ns, dmr_poll_wait, dmr_spin_lock_irqsave};
use super::{dmr_init_waitqueue_head, dmr_spin_unlock_irqrestore, dmr_vfree, dmr_vmalloc_user, dmr_wake_up_all};

// --- Interrupt-safe spinlock ---------------------------------------------------

/// A `spinlock_t` taken with `spin_lock_irqsave`: usable from process
/// context and from hard-IRQ completion handlers alike (6.12's `SpinLock`
/// has no irqsave form, and a plain spinlock taken in process context and in
/// an interrupt handler on the same CPU deadlocks).
pub(crate) struct IrqSpinLockBackend;

// SAFETY: `spin_lock_irqsave` provides mutual exclusion (and disables local
// interrupts while held, so an interrupt handler on the owner's CPU cannot
// spin on it); `unlock` restores exactly the flags `lock` saved; `relock`
// uses the default, which calls `lock` again.
unsafe impl Backend for IrqSpinLockBackend {
    type State = bindings::spinlock_t;
    type GuardState = c_ulong;

    unsafe fn init(ptr: *mut Self::State, name: *const c_char, key: *mut bindings::lock_class_key) {
        // SAFETY: the caller passes valid memory for the lock and a name and
        // key that live forever (trait contract).
        unsafe { bindings::__spin_lock_init(ptr, name, key) }
    }

    unsafe fn lock(ptr: *mut Self::State) -> Self::GuardState {
        // SAFETY: the lock was initialised (trait contract).
        unsafe { dmr_spin_lock_irqsave(ptr) }
    }

    unsafe fn unlock(ptr: *mut Self::State, flags: &Self::GuardState) {
        // SAFETY: the caller owns the lock and `flags` is what `lock` saved.
        unsafe { dmr_spin_unlock_irqrestore(ptr, *flags) }
    }
}

/// A spinlock safe to take in hard-IRQ context. Never sleep while holding it.
pub(crate) type IrqSpinLock<T> = Lock<T, IrqSpinLockBackend>;

/// Creates an [`IrqSpinLock`] initialiser with its own lockdep class.
macro_rules! new_irq_spinlock {
    ($inner:expr, $name:literal) => {
        $crate::dm::sys::IrqSpinLock::new(
            $inner,
            ::kernel::c_str!($name),
            ::kernel::static_lock_class!(),
        )
    };
}
pub(crate) use new_irq_spinlock;

// --- Ring memory ---------------------------------------------------------------

/// Zeroed, page-aligned kernel memory that can be mapped read-only into a
/// process (`vmalloc_user`), freed on drop.
///
/// All access goes through bounds-checked accessors: aligned atomics, and
/// volatile copies for plain bytes (a process may read the memory at any
/// time, so no Rust reference to plain data in it is ever created).
///
/// # Invariants
///
/// `ptr` points to `size` bytes from `vmalloc_user`, owned by this value.
pub(crate) struct RingMem {
    ptr: NonNull<u8>,
    size: usize,
}

// SAFETY: the memory is plain kernel memory owned by this value; shared
// mutable state in it is only accessed through atomics or through volatile
// copies whose ordering the ring protocol (and the caller's lock) provides.
unsafe impl Send for RingMem {}
// SAFETY: as for `Send`: `&RingMem` only allows atomics and volatile copies.
unsafe impl Sync for RingMem {}

impl RingMem {
    /// Allocates `size` zeroed bytes (rounded up to pages by the allocator).
    pub(crate) fn new(size: usize) -> Result<Self> {
        if size == 0 {
            return Err(EINVAL);
        }
        let size_ul = c_ulong::try_from(size).map_err(|_| EINVAL)?;
        // SAFETY: `vmalloc_user` has no preconditions; it returns zeroed
        // memory or NULL.
        let ptr = unsafe { dmr_vmalloc_user(size_ul) };
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or(ENOMEM)?;
        // INVARIANT: freshly allocated, `size` bytes.
        Ok(Self { ptr, size })
    }

    /// Size in bytes.
    pub(crate) fn size(&self) -> usize {
        self.size
    }

    fn range(&self, off: usize, len: usize) -> Option<*mut u8> {
        let end = off.checked_add(len)?;
        if end > self.size {
            return None;
        }
        // SAFETY: `off <= size`, so the result stays inside (or one past)
        // the allocation.
        Some(unsafe { self.ptr.as_ptr().add(off) })
    }

    /// The 64-bit atomic at byte offset `off` (8-byte aligned, in range).
    pub(crate) fn atomic_u64(&self, off: usize) -> Option<&AtomicU64> {
        if off % 8 != 0 {
            return None;
        }
        let p = self.range(off, 8)?;
        // SAFETY: in range, aligned (vmalloc memory is page aligned), and the
        // memory lives as long as `&self`; every access to this word, from
        // the kernel or a process, is atomic.
        Some(unsafe { AtomicU64::from_ptr(p.cast::<u64>()) })
    }

    /// The 32-bit atomic at byte offset `off` (4-byte aligned, in range).
    pub(crate) fn atomic_u32(&self, off: usize) -> Option<&AtomicU32> {
        if off % 4 != 0 {
            return None;
        }
        let p = self.range(off, 4)?;
        // SAFETY: as in `atomic_u64`.
        Some(unsafe { AtomicU32::from_ptr(p.cast::<u32>()) })
    }

    /// Copies `src` to byte offset `off`. Returns false if out of range.
    pub(crate) fn write(&self, off: usize, src: &[u8]) -> bool {
        let Some(p) = self.range(off, src.len()) else {
            return false;
        };
        for (i, b) in src.iter().enumerate() {
            // SAFETY: `[off, off + src.len())` is in range; volatile because
            // a process may have the memory mapped.
            unsafe { p.add(i).write_volatile(*b) };
        }
        true
    }

    /// Stores `words` at byte offset `off` (8-byte aligned), one volatile
    /// aligned word store each. Returns false if misaligned or out of range.
    pub(crate) fn write_words(&self, off: usize, words: &[u64]) -> bool {
        if off % 8 != 0 {
            return false;
        }
        let Some(bytes) = words.len().checked_mul(8) else {
            return false;
        };
        let Some(p) = self.range(off, bytes) else {
            return false;
        };
        let p = p.cast::<u64>();
        for (i, w) in words.iter().enumerate() {
            // SAFETY: `[off, off + 8 * words.len())` is in range and 8-byte
            // aligned (vmalloc memory is page aligned, `off % 8 == 0`);
            // volatile because a process may have the memory mapped.
            unsafe { p.add(i).write_volatile(*w) };
        }
        true
    }

    /// Zeroes `len` bytes at byte offset `off`. Returns false if out of range.
    pub(crate) fn zero(&self, off: usize, len: usize) -> bool {
        let Some(p) = self.range(off, len) else {
            return false;
        };
        // SAFETY: in range; the caller owns these bytes under the ring
        // protocol (reserved, not yet published).
        unsafe { core::ptr::write_bytes(p, 0, len) };
        true
    }

    /// Copies the data of a write bio to byte offset `off`. Returns false if
    /// it does not fit or the bio held less data than its size says.
    pub(crate) fn copy_bio(&self, off: usize, bio: &impl super::BioData) -> bool {
        let len = bio.data_bytes();
        let Some(p) = self.range(off, len) else {
            return false;
        };
        // SAFETY: the destination `[off, off + len)` is in range and reserved
        // for this record by the caller; the bio is valid (BioData contract)
        // and is a write whose pages the block layer keeps stable.
        let copied = unsafe { super::dmr_bio_copy_data(bio.raw_bio(), p.cast::<c_void>(), len) };
        copied == len
    }

    /// The raw address, for mapping into a process.
    pub(super) fn as_ptr(&self) -> *mut c_void {
        self.ptr.as_ptr().cast()
    }
}

impl Drop for RingMem {
    fn drop(&mut self) {
        // SAFETY: `ptr` came from `vmalloc_user` and is freed once. Every
        // process mapping holds the file that holds this memory's owner, so
        // no mapping outlives it.
        unsafe { dmr_vfree(self.ptr.as_ptr().cast()) };
    }
}

/// Byte offset of a field of the shared header, for [`RingMem`] accessors.
macro_rules! header_offset {
    ($field:ident) => {
        ::core::mem::offset_of!($crate::ring_abi::RingHeader, $field)
    };
}
pub(crate) use header_offset;

/// Byte offset of a field within a record descriptor.
macro_rules! desc_field_offset {
    ($field:ident) => {
        ::core::mem::offset_of!($crate::ring_abi::RecordDesc, $field)
    };
}
pub(crate) use desc_field_offset;

const _: () = assert!(offset_of!(crate::ring_abi::RecordDesc, stamp) == 0);

// --- Wait queue ------------------------------------------------------------------

/// A wait queue that `poll` can wait on and any context can wake.
#[pin_data]
pub(crate) struct WaitQueue {
    #[pin]
    wq: Opaque<bindings::wait_queue_head>,
}

// SAFETY: a wait queue head is designed for concurrent use from any thread
// and interrupt context; it has its own internal lock.
unsafe impl Send for WaitQueue {}
// SAFETY: as for `Send`.
unsafe impl Sync for WaitQueue {}

impl WaitQueue {
    /// An initialiser for a new wait queue.
    pub(crate) fn new() -> impl PinInit<Self> {
        pin_init!(Self {
            // SAFETY: `slot` is valid for writes during the call.
            wq <- Opaque::ffi_init(|slot| unsafe { dmr_init_waitqueue_head(slot) }),
        })
    }

    /// Wakes every waiter; call it after updating the state they wait for
    /// (a poller registered by [`misc::PollTable::wait_on`] then either is
    /// woken or sees the new state). Takes the queue's lock only when
    /// someone waits. Safe in any context, including hard IRQ.
    ///
    /// [`misc::PollTable::wait_on`]: super::misc::PollTable::wait_on
    pub(crate) fn wake_all(&self) {
        // SAFETY: the wait queue was initialised by `new`.
        unsafe { dmr_wake_up_all(self.wq.get()) };
    }

    pub(super) fn poll_wait(&self, file: *mut bindings::file, pt: *mut bindings::poll_table_struct) {
        // SAFETY: the wait queue was initialised and outlives the file's
        // poll registration: `poll` callers hold the file, which holds the
        // object this queue belongs to (see `misc::PollTable`).
        unsafe { dmr_poll_wait(file, self.wq.get(), pt) };
    }
}

// --- The module's workqueue -------------------------------------------------------

/// The module's workqueue, published for [`enqueue`] while the module is
/// loaded.
static WORKQUEUE: AtomicPtr<bindings::workqueue_struct> = AtomicPtr::new(core::ptr::null_mut());

/// Owns the module's workqueue. Created at module init; dropping it (at
/// module exit) drains and destroys the queue.
pub(crate) struct WorkQueue(NonNull<bindings::workqueue_struct>);

// SAFETY: a workqueue may be used and destroyed from any thread.
unsafe impl Send for WorkQueue {}
// SAFETY: as for `Send`.
unsafe impl Sync for WorkQueue {}

impl WorkQueue {
    /// Allocates the queue and makes it the one [`enqueue`] uses.
    pub(crate) fn new(name: &'static kernel::str::CStr) -> Result<Self> {
        // SAFETY: `name` is a static NUL-terminated string.
        let wq = unsafe { dmr_alloc_workqueue(name.as_char_ptr()) };
        let wq = NonNull::new(wq).ok_or(ENOMEM)?;
        WORKQUEUE
            .compare_exchange(
                core::ptr::null_mut(),
                wq.as_ptr(),
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .map_err(|_| {
                // SAFETY: just allocated and never published.
                unsafe { bindings::destroy_workqueue(wq.as_ptr()) };
                EBUSY
            })?;
        Ok(Self(wq))
    }
}

impl Drop for WorkQueue {
    fn drop(&mut self) {
        WORKQUEUE.store(core::ptr::null_mut(), Ordering::Release);
        // SAFETY: the queue was allocated in `new` and is destroyed once.
        // Nothing can queue new work any more: every object that queues work
        // is owned by a dm target or an open file, and both hold a reference
        // on the module, which is exiting. `destroy_workqueue` first drains
        // the items still queued (and what they queue in turn).
        unsafe { bindings::destroy_workqueue(self.0.as_ptr()) };
    }
}

/// Queues a work item on the module's workqueue (on the system workqueue
/// only if the module's is gone, which the module's lifetime rules out).
/// Safe from any context, including hard IRQ. Returns false if the item was
/// already queued.
pub(crate) fn enqueue<W>(w: W) -> bool
where
    W: RawWorkItem<0, EnqueueOutput = core::result::Result<(), W>> + Send + 'static,
{
    let wq = WORKQUEUE.load(Ordering::Acquire);
    let queue = if wq.is_null() {
        kernel::workqueue::system()
    } else {
        // SAFETY: a non-null pointer in `WORKQUEUE` is a live workqueue: it
        // is cleared before the queue is destroyed, and the queue is only
        // destroyed at module exit, when nothing can call this (see
        // `WorkQueue::drop`).
        unsafe { Queue::from_raw(wq) }
    };
    queue.enqueue(w).is_ok()
}

// --- Clock, randomness, sleeping ----------------------------------------------------

/// Wall-clock time in nanoseconds since the Unix epoch.
pub(crate) fn now_ns() -> u64 {
    // SAFETY: reading the clock has no preconditions and works in any context.
    unsafe { dmr_now_ns() }
}

/// Fills `buf` with random bytes.
pub(crate) fn random_bytes(buf: &mut [u8]) {
    // SAFETY: `buf` is valid for writes of its length.
    unsafe { bindings::get_random_bytes(buf.as_mut_ptr().cast(), buf.len()) };
}

/// Sleeps between `min_us` and `max_us` microseconds. Process context only.
pub(crate) fn sleep_us(min_us: u32, max_us: u32) {
    // SAFETY: called from process context (work items), where sleeping is
    // allowed; the state is a plain uninterruptible sleep.
    unsafe {
        bindings::usleep_range_state(
            min_us as c_ulong,
            max_us as c_ulong,
            bindings::TASK_UNINTERRUPTIBLE,
        )
    };
}
