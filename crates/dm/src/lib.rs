//! Device-mapper for dm-replica: the few calls the thin backend, the
//! source's fencing and `replctl protect` make — create, load a table,
//! suspend and resume, remove, read the table and the status, send a
//! target message — straight to the kernel through the device-mapper ioctls
//! on `/dev/mapper/control`, with the kernel's errno kept in a typed
//! [`DmError`].
//!
//! [`DeviceMapper`] is the interface; [`Control`] implements it with the
//! kernel, and tests implement it in memory. Device nodes
//! (`/dev/mapper/<name>`) are there when `create` and `resume` return:
//! made by udev when it runs (waited for), by this crate otherwise.
//!
//! The only `unsafe` code is the ioctl call itself, in `sys`.
//!
//! Why not the `devicemapper` crate: its `devicemapper-sys` runs bindgen
//! (libclang) at build time and links libdevmapper through pkg-config,
//! which the statically linked daemon the test guests run cannot use, and
//! it brings a second `nix` and several crates more for the nine calls
//! made here.
#![warn(missing_docs)]

mod control;
mod device;
mod error;
mod node;
mod request;
mod sys;
mod table;

pub use control::Control;
pub use device::{block_sysfs, dm_name, DeviceError};
pub use error::{DmError, DmErrorKind, Op};
pub use nix::errno::Errno;
pub use request::{BadReply, Unencodable};
pub use table::{LineFault, Table, TableError, Target};

/// What `DM_DEV_STATUS` says about a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevInfo {
    /// Suspended (I/O is held).
    pub suspended: bool,
    /// Read-only.
    pub read_only: bool,
    /// It has a live table.
    pub live_table: bool,
    /// Openers.
    pub open_count: u32,
    /// Device number, major.
    pub major: u32,
    /// Device number, minor.
    pub minor: u32,
}

/// The device-mapper calls dm-replica makes, each on a device by name.
pub trait DeviceMapper: Send + Sync {
    /// The state of device `name`, `None` if there is none.
    fn info(&self, name: &str) -> Result<Option<DevInfo>, DmError>;

    /// The live table of `name`.
    fn table(&self, name: &str) -> Result<Table, DmError>;

    /// The status of `name`: one line per target, the target's status as
    /// its parameters.
    fn status(&self, name: &str) -> Result<Table, DmError>;

    /// Creates device `name` with `table` and activates it; its node is
    /// there when this returns. On failure no device is left.
    fn create(&self, name: &str, table: &Table, read_only: bool) -> Result<(), DmError>;

    /// Loads `table` as the inactive table of `name` (the next resume
    /// swaps it in).
    fn reload(&self, name: &str, table: &Table) -> Result<(), DmError>;

    /// Suspends `name`: outstanding I/O completes, new I/O waits (a
    /// filesystem on it is frozen first).
    fn suspend(&self, name: &str) -> Result<(), DmError>;

    /// Resumes `name`, with the table loaded last if there is one.
    fn resume(&self, name: &str) -> Result<(), DmError>;

    /// Removes device `name` (and the node this crate made for it).
    fn remove(&self, name: &str) -> Result<(), DmError>;

    /// Sends `message` to sector 0 of `name`; returns the target's answer,
    /// "" when it gave none.
    fn message(&self, name: &str, message: &str) -> Result<String, DmError>;
}
