//! The kernel's device-mapper ioctl interface (`linux/dm-ioctl.h`): the
//! layouts, the request codes and flags, and the one `unsafe` call.
//!
//! The layouts are declared `repr(C)` only to take their sizes and field
//! offsets from the compiler; [`crate::request`] reads and writes them as
//! bytes at those offsets, so nothing here is ever transmuted.

use std::os::fd::{AsRawFd, BorrowedFd};

use nix::errno::Errno;

/// Interface version this crate speaks. The kernel accepts a request whose
/// major number equals its own and whose minor is not above its own; 4.0.0
/// is accepted by every 4.x kernel and every call used here exists since.
pub const VERSION: [u32; 3] = [4, 0, 0];

/// `DM_NAME_LEN`: a device name, NUL included.
pub const NAME_LEN: usize = 128;
/// `DM_UUID_LEN`.
pub const UUID_LEN: usize = 129;
/// `DM_MAX_TYPE_NAME`: a target type name, NUL included.
pub const MAX_TYPE_NAME: usize = 16;

/// `struct dm_ioctl`: the header of every request and reply.
#[repr(C)]
#[allow(dead_code)] // Read and written through offset_of!, never by field.
pub struct DmIoctl {
    pub version: [u32; 3],
    pub data_size: u32,
    pub data_start: u32,
    pub target_count: u32,
    pub open_count: i32,
    pub flags: u32,
    pub event_nr: u32,
    pub padding: u32,
    pub dev: u64,
    pub name: [u8; NAME_LEN],
    pub uuid: [u8; UUID_LEN],
    pub data: [u8; 7],
}

/// `struct dm_target_spec`: one target of a table, followed by its
/// NUL-terminated parameter string.
#[repr(C)]
#[allow(dead_code)] // Read and written through offset_of!, never by field.
pub struct DmTargetSpec {
    pub sector_start: u64,
    pub length: u64,
    pub status: i32,
    pub next: u32,
    pub target_type: [u8; MAX_TYPE_NAME],
}

/// `struct dm_target_msg`: the sector, followed by the NUL-terminated
/// message.
#[repr(C)]
#[allow(dead_code)] // Read and written through offset_of!, never by field.
pub struct DmTargetMsg {
    pub sector: u64,
}

const _: () = assert!(std::mem::size_of::<DmIoctl>() == 312);
const _: () = assert!(std::mem::size_of::<DmTargetSpec>() == 40);
const _: () = assert!(std::mem::size_of::<DmTargetMsg>() == 8);

/// Size of the header; also where the data starts (it is a multiple of 8,
/// the alignment the kernel keeps for what follows).
pub const HEADER: usize = std::mem::size_of::<DmIoctl>();
const _: () = assert!(HEADER.is_multiple_of(8));

/// Read-only table / device (`DM_READONLY_FLAG`).
pub const READONLY_FLAG: u32 = 1 << 0;
/// Suspend rather than resume; in a reply, the device is suspended.
pub const SUSPEND_FLAG: u32 = 1 << 1;
/// Table status: the table rather than the status.
pub const STATUS_TABLE_FLAG: u32 = 1 << 4;
/// In a reply: the device has a live table.
pub const ACTIVE_PRESENT_FLAG: u32 = 1 << 5;
/// In a reply: the data did not fit the buffer.
pub const BUFFER_FULL_FLAG: u32 = 1 << 8;
/// In a reply to a target message: the target wrote an answer.
pub const DATA_OUT_FLAG: u32 = 1 << 16;

/// The ioctl commands used (`DM_*_CMD`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cmd {
    /// `DM_DEV_CREATE`.
    DevCreate = 3,
    /// `DM_DEV_REMOVE`.
    DevRemove = 4,
    /// `DM_DEV_SUSPEND` (suspend or resume).
    DevSuspend = 6,
    /// `DM_DEV_STATUS` (the device's state, no table).
    DevStatus = 7,
    /// `DM_TABLE_LOAD` (into the inactive slot).
    TableLoad = 9,
    /// `DM_TABLE_STATUS` (status lines, or the table with
    /// [`STATUS_TABLE_FLAG`]).
    TableStatus = 12,
    /// `DM_TARGET_MSG`.
    TargetMsg = 14,
}

/// `DM_IOCTL`, the ioctl type of device-mapper.
const DM_IOCTL: u8 = 0xfd;

impl Cmd {
    /// The request code: `_IOWR(DM_IOCTL, cmd, struct dm_ioctl)`.
    fn request(self) -> nix::sys::ioctl::ioctl_num_type {
        nix::request_code_readwrite!(DM_IOCTL, self as u8, HEADER) as _
    }
}

/// Runs `cmd` on the control device with `buf` as request and reply.
/// `buf` must start with a header whose `data_size` is at most
/// `buf.len()` ([`crate::request::Request`] keeps them equal).
pub fn ioctl(control: BorrowedFd<'_>, cmd: Cmd, buf: &mut [u8]) -> Result<(), Errno> {
    let data_size = buf
        .get(std::mem::offset_of!(DmIoctl, data_size)..)
        .and_then(|b| b.get(..4))
        .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize);
    if buf.len() < HEADER || data_size.is_none_or(|n| n > buf.len() || n < HEADER) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: the kernel reads and writes at most `data_size` bytes from the
    // pointer (it copies the header, takes `data_size` from it and copies
    // that much in and, after the call, back out), and `buf` is a live,
    // exclusively borrowed buffer of at least that many bytes (checked
    // above). The fd is open for the duration of the borrow. The kernel
    // does not keep the pointer after the call returns.
    let r = unsafe { libc::ioctl(control.as_raw_fd(), cmd.request(), buf.as_mut_ptr()) };
    Errno::result(r).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::unnecessary_cast)] // ioctl_num_type is a c_int with musl.
    fn request_codes_are_the_kernels() {
        // From linux/dm-ioctl.h on x86_64: _IOWR(0xfd, n, struct dm_ioctl).
        assert_eq!(Cmd::DevCreate.request() as u64, 0xc138_fd03);
        assert_eq!(Cmd::TableStatus.request() as u64, 0xc138_fd0c);
        assert_eq!(Cmd::TargetMsg.request() as u64, 0xc138_fd0e);
    }

    #[test]
    fn a_buffer_shorter_than_its_header_says_is_refused_before_the_kernel() {
        let f = std::fs::File::open("/dev/null").expect("null");
        use std::os::fd::AsFd;
        let mut short = vec![0u8; HEADER - 1];
        assert_eq!(
            ioctl(f.as_fd(), Cmd::DevStatus, &mut short),
            Err(Errno::EINVAL)
        );
        let mut lying = vec![0u8; HEADER];
        let at = std::mem::offset_of!(DmIoctl, data_size);
        lying[at..at + 4].copy_from_slice(&((HEADER as u32) + 1).to_ne_bytes());
        assert_eq!(
            ioctl(f.as_fd(), Cmd::DevStatus, &mut lying),
            Err(Errno::EINVAL)
        );
    }
}
