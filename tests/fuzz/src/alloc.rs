//! An allocator that aborts on any single allocation above a bound.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's allocator hooks,
//! which a stable build without a sanitizer does not have; this wrapper of
//! the system allocator gives the same check. A parser that sizes a buffer
//! from a length it read, before checking that length against the bytes it
//! has, aborts here (a crash with its input saved) instead of passing
//! because the machine happened to have the memory.
//!
//! Each target sets its bound at start ([`install`], from its
//! `ALLOC_LIMIT`: inputs are a few KiB, so 1 MiB is already far above
//! anything sized from the input itself) and raises it only around a call
//! that may allocate what a checked, bounded length says ([`allowing`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

static LIMIT: AtomicUsize = AtomicUsize::new(usize::MAX);

/// Sets the bound (bytes per allocation).
pub fn set_limit(bytes: usize) {
    LIMIT.store(bytes, Ordering::Relaxed);
}

/// Sets the bound and lifts it while a panic is reported (printing the
/// backtrace allocates more than a target may).
pub fn install(bytes: usize) {
    set_limit(bytes);
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        set_limit(usize::MAX);
        report(info);
    }));
}

/// Runs `f` with the bound raised by `extra` bytes.
pub fn allowing<T>(extra: usize, f: impl FnOnce() -> T) -> T {
    let was = LIMIT.load(Ordering::Relaxed);
    LIMIT.store(was.saturating_add(extra), Ordering::Relaxed);
    let out = f();
    LIMIT.store(was, Ordering::Relaxed);
    out
}

/// The system allocator with a ceiling per allocation (none until
/// [`set_limit`]).
#[derive(Debug)]
pub struct Bounded;

impl Bounded {
    fn check(&self, size: usize) {
        let limit = LIMIT.load(Ordering::Relaxed);
        if size > limit {
            too_big(size, limit);
        }
    }
}

/// Writes the sizes to stderr without allocating, then aborts.
#[cold]
fn too_big(size: usize, limit: usize) -> ! {
    fn put(buf: &mut [u8; 128], at: &mut usize, s: &[u8]) {
        for &b in s {
            if *at < buf.len() {
                buf[*at] = b;
                *at += 1;
            }
        }
    }
    fn num(buf: &mut [u8; 128], at: &mut usize, mut n: usize) {
        let mut d = [0u8; 20];
        let mut i = d.len();
        loop {
            i -= 1;
            d[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        put(buf, at, &d[i..]);
    }
    let mut buf = [0u8; 128];
    let mut at = 0;
    put(&mut buf, &mut at, b"replica-fuzz: allocation of ");
    num(&mut buf, &mut at, size);
    put(&mut buf, &mut at, b" bytes exceeds the limit of ");
    num(&mut buf, &mut at, limit);
    put(&mut buf, &mut at, b"\n");
    // SAFETY: writes `at` initialised bytes of a live stack buffer to fd 2.
    unsafe { libc::write(2, buf.as_ptr().cast(), at) };
    std::process::abort()
}

// SAFETY: every method forwards to `System` with the same arguments after a
// check that either returns or aborts; the layout contract is `System`'s.
unsafe impl GlobalAlloc for Bounded {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        // SAFETY: the caller's contract for `alloc`, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.check(layout.size());
        // SAFETY: as for `alloc`.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` (through this wrapper)
        // with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.check(new_size);
        // SAFETY: as for `dealloc`; `new_size` is the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}
