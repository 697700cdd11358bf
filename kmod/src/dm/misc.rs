// SPDX-License-Identifier: GPL-2.0

//! A misc character device (`/dev/<name>`) whose open files are Rust objects.
//!
//! A type implementing [`FileOps`] is created on `open` (with the device's
//! shared state) and dropped on the last `close`; `ioctl`, `mmap` and `poll`
//! are its methods. The file operations name this module as their owner, so
//! the module cannot be unloaded while a file is open, and a process mapping
//! holds its file, so a file object outlives every mapping made through it.

use core::marker::PhantomData;
use core::ptr::NonNull;

use kernel::bindings;
use kernel::ffi::{c_int, c_uint, c_ulong, c_void};
use kernel::prelude::*;
use kernel::str::CStr;
use kernel::sync::Arc;
use kernel::uaccess::UserSlice;

use super::sys::{RingMem, WaitQueue};
use super::dmr_mmap_vmalloc_readonly;

/// `poll` result bits (uapi `POLL*` values).
pub(crate) mod poll_bits {
    /// Data to read.
    pub(crate) const IN: u32 = 0x0001;
    /// Error condition.
    pub(crate) const ERR: u32 = 0x0008;
    /// Hang-up: no more data will ever come.
    pub(crate) const HUP: u32 = 0x0010;
    /// Normal data to read.
    pub(crate) const RDNORM: u32 = 0x0040;
}

/// The behaviour of an open file of a misc device.
pub(crate) trait FileOps: Sized + Send + Sync {
    /// State shared by all files of the device.
    type Shared: Send + Sync;

    /// Called on `open`; the returned object lives until the last `close`.
    fn open(shared: &Arc<Self::Shared>) -> Result<Self>;

    /// `ioctl(cmd, arg)`; `arg` is usually a user pointer (see [`user_arg`]).
    fn ioctl(&self, cmd: u32, arg: usize) -> Result<i32>;

    /// `mmap`: map something into `vma` or fail.
    fn mmap(&self, vma: &mut Vma<'_>) -> Result;

    /// `poll`: register with the wait queue(s) through `table` and return
    /// the ready bits ([`poll_bits`]).
    fn poll(&self, table: &mut PollTable<'_>) -> u32;
}

/// The user buffer of an ioctl argument of type `T` at `arg`.
pub(crate) fn user_arg<T>(arg: usize) -> UserSlice {
    UserSlice::new(arg, core::mem::size_of::<T>())
}

/// A process mapping being created by `mmap`.
///
/// # Invariants
///
/// `vma` is the area being set up by the `mmap` call this value lives in.
pub(crate) struct Vma<'a> {
    vma: NonNull<bindings::vm_area_struct>,
    _p: PhantomData<&'a mut bindings::vm_area_struct>,
}

impl Vma<'_> {
    /// Maps `mem` read-only from offset 0. Refuses a writable mapping
    /// (`EPERM`), a non-zero offset or a mapping larger than `mem`
    /// (`EINVAL`); the mapping can never be made writable later.
    ///
    /// `mem` must be owned (directly or through an `Arc`) by the file
    /// object: the mapping holds the file, so the memory then outlives it.
    pub(crate) fn map_readonly(&mut self, mem: &RingMem) -> Result {
        let size = c_ulong::try_from(mem.size()).map_err(|_| EINVAL)?;
        // SAFETY: `vma` is being set up by this mmap call (invariant); `mem`
        // is vmalloc_user memory of `size` bytes that the caller's file
        // object keeps alive for as long as the mapping exists (it holds the
        // file; see the method's contract).
        let r = unsafe { dmr_mmap_vmalloc_readonly(self.vma.as_ptr(), mem.as_ptr(), size) };
        kernel::error::to_result(r)
    }
}

/// A `poll` call in progress.
pub(crate) struct PollTable<'a> {
    file: *mut bindings::file,
    pt: *mut bindings::poll_table_struct,
    _p: PhantomData<&'a mut bindings::poll_table_struct>,
}

impl PollTable<'_> {
    /// Registers the caller on `wq`; a wake-up on it re-polls the file.
    /// Ordered before every later read of the polled state (a full barrier
    /// pairs with [`WaitQueue::wake_all`]), so read that state after this.
    /// `wq` must be owned (directly or through an `Arc`) by the file object,
    /// so it outlives the registration, which ends before the file is freed.
    pub(crate) fn wait_on(&mut self, wq: &WaitQueue) {
        wq.poll_wait(self.file, self.pt);
    }
}

/// The device's registration data at a fixed address: the `miscdevice`, its
/// file operations and the shared state.
#[repr(C)]
struct Inner<F: FileOps> {
    misc: bindings::miscdevice,
    fops: bindings::file_operations,
    shared: Arc<F::Shared>,
}

/// A registered misc device; deregistered on drop.
///
/// # Invariants
///
/// `inner.misc` is registered for the lifetime of the value and points to
/// `inner.fops`; `inner` never moves.
pub(crate) struct MiscRegistration<F: FileOps> {
    inner: Pin<KBox<Inner<F>>>,
}

// SAFETY: the registration only keeps the C structures alive at a fixed
// address; the misc core serialises its own accesses, and `misc_deregister`
// may be called from any thread. `F::Shared` is Send + Sync.
unsafe impl<F: FileOps> Send for MiscRegistration<F> {}
// SAFETY: `&MiscRegistration` gives no access to anything.
unsafe impl<F: FileOps> Sync for MiscRegistration<F> {}

impl<F: FileOps> MiscRegistration<F> {
    /// Registers `/dev/<name>` with the given mode, owned by `module`.
    pub(crate) fn register(
        module: &'static ThisModule,
        name: &'static CStr,
        mode: u16,
        shared: Arc<F::Shared>,
    ) -> Result<Self> {
        // SAFETY: both are C structs of integers, pointers and optional
        // function pointers, for which all-zero is valid (no callbacks).
        let (mut misc, mut fops): (bindings::miscdevice, bindings::file_operations) =
            unsafe { (core::mem::zeroed(), core::mem::zeroed()) };
        fops.owner = module.as_ptr();
        fops.open = Some(open_callback::<F>);
        fops.release = Some(release_callback::<F>);
        fops.unlocked_ioctl = Some(ioctl_callback::<F>);
        fops.mmap = Some(mmap_callback::<F>);
        fops.poll = Some(poll_callback::<F>);
        fops.llseek = Some(bindings::noop_llseek);
        misc.minor = bindings::MISC_DYNAMIC_MINOR as c_int;
        misc.name = name.as_char_ptr();
        misc.mode = mode;
        let mut inner = KBox::pin(Inner::<F> { misc, fops, shared }, GFP_KERNEL)?;
        // SAFETY: we only set a field of the pinned value, we do not move it.
        let raw = unsafe { inner.as_mut().get_unchecked_mut() };
        raw.misc.fops = &raw.fops;
        // SAFETY: `misc` is fully initialised, at a stable heap address, and
        // points to `fops` in the same allocation; both stay until `drop`
        // deregisters.
        kernel::error::to_result(unsafe { bindings::misc_register(&mut raw.misc) })?;
        // INVARIANT: registered, pointing at `fops`.
        Ok(Self { inner })
    }
}

impl<F: FileOps> Drop for MiscRegistration<F> {
    fn drop(&mut self) {
        // SAFETY: registered (invariant). No file can be open: each holds a
        // reference on the module, which is being unloaded.
        unsafe {
            let raw = self.inner.as_mut().get_unchecked_mut();
            bindings::misc_deregister(&mut raw.misc);
        }
    }
}

/// Borrows the file's Rust object.
///
/// # Safety
///
/// `file` must be a file of this device opened by [`open_callback`] and not
/// yet released.
unsafe fn file_obj<'a, F: FileOps>(file: *mut bindings::file) -> &'a F {
    // SAFETY: `open_callback` stored a `KBox<F>` in `private_data`, which
    // `release_callback` frees only after all other file operations ended.
    unsafe { &*(*file).private_data.cast::<F>() }
}

/// # Safety
///
/// Called by the VFS only, through the misc core, which has set
/// `file->private_data` to our `miscdevice`.
unsafe extern "C" fn open_callback<F: FileOps>(
    _inode: *mut bindings::inode,
    file: *mut bindings::file,
) -> c_int {
    // SAFETY: misc_open stores the registered miscdevice in private_data;
    // ours is the first field of a `#[repr(C)] Inner<F>`, which stays
    // registered (and therefore alive) while files can be opened.
    let inner = unsafe { &*(*file).private_data.cast::<Inner<F>>() };
    match F::open(&inner.shared).and_then(|obj| Ok(KBox::new(obj, GFP_KERNEL)?)) {
        Ok(obj) => {
            // SAFETY: `file` is valid and being opened; from now on
            // private_data is our object, freed by release_callback.
            unsafe { (*file).private_data = KBox::into_raw(obj).cast::<c_void>() };
            0
        }
        Err(e) => e.to_errno(),
    }
}

/// # Safety
///
/// Called by the VFS only, once, on the last close of a file that
/// [`open_callback`] opened successfully.
unsafe extern "C" fn release_callback<F: FileOps>(
    _inode: *mut bindings::inode,
    file: *mut bindings::file,
) -> c_int {
    // SAFETY: private_data is the `KBox<F>` from open_callback; no other file
    // operation runs during or after release.
    let obj = unsafe { KBox::from_raw((*file).private_data.cast::<F>()) };
    drop(obj);
    // SAFETY: `file` is valid until release returns.
    unsafe { (*file).private_data = core::ptr::null_mut() };
    0
}

/// # Safety
///
/// Called by the VFS only, for an open file of this device.
unsafe extern "C" fn ioctl_callback<F: FileOps>(
    file: *mut bindings::file,
    cmd: c_uint,
    arg: c_ulong,
) -> kernel::ffi::c_long {
    // SAFETY: an open file of this device (function contract).
    let obj = unsafe { file_obj::<F>(file) };
    // `c_ulong` is `usize` in the kernel's C types.
    let arg: usize = arg;
    match obj.ioctl(cmd, arg) {
        Ok(v) => v as kernel::ffi::c_long,
        Err(e) => e.to_errno() as kernel::ffi::c_long,
    }
}

/// # Safety
///
/// Called by the VFS only, for an open file of this device and a VMA being
/// set up for it.
unsafe extern "C" fn mmap_callback<F: FileOps>(
    file: *mut bindings::file,
    vma: *mut bindings::vm_area_struct,
) -> c_int {
    let Some(vma) = NonNull::new(vma) else {
        return EINVAL.to_errno();
    };
    // SAFETY: an open file of this device (function contract).
    let obj = unsafe { file_obj::<F>(file) };
    // INVARIANT: the VMA being set up by this call.
    let mut vma = Vma {
        vma,
        _p: PhantomData,
    };
    match obj.mmap(&mut vma) {
        Ok(()) => 0,
        Err(e) => e.to_errno(),
    }
}

/// # Safety
///
/// Called by the VFS only, for an open file of this device.
unsafe extern "C" fn poll_callback<F: FileOps>(
    file: *mut bindings::file,
    pt: *mut bindings::poll_table_struct,
) -> bindings::__poll_t {
    // SAFETY: an open file of this device (function contract).
    let obj = unsafe { file_obj::<F>(file) };
    let mut table = PollTable {
        file,
        pt,
        _p: PhantomData,
    };
    obj.poll(&mut table)
}
