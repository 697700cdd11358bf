//! Errors of device-mapper calls: which operation, on which device, and the
//! errno the kernel returned.

use std::fmt;
use std::path::PathBuf;

use nix::errno::Errno;

use crate::request::{BadReply, Unencodable};

/// A device-mapper operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Creating a device (`DM_DEV_CREATE`, then its table and resume).
    Create,
    /// Loading a table into the inactive slot (`DM_TABLE_LOAD`).
    Load,
    /// Suspending (`DM_DEV_SUSPEND` with `DM_SUSPEND_FLAG`).
    Suspend,
    /// Resuming (`DM_DEV_SUSPEND`).
    Resume,
    /// Removing (`DM_DEV_REMOVE`).
    Remove,
    /// Reading a device's state (`DM_DEV_STATUS`).
    Info,
    /// Reading the live table (`DM_TABLE_STATUS` with
    /// `DM_STATUS_TABLE_FLAG`).
    Table,
    /// Reading the status (`DM_TABLE_STATUS`).
    Status,
    /// Sending a target message (`DM_TARGET_MSG`); the message.
    Message(String),
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create => f.write_str("create"),
            Op::Load => f.write_str("load table"),
            Op::Suspend => f.write_str("suspend"),
            Op::Resume => f.write_str("resume"),
            Op::Remove => f.write_str("remove"),
            Op::Info => f.write_str("info"),
            Op::Table => f.write_str("table"),
            Op::Status => f.write_str("status"),
            Op::Message(m) => write!(f, "message {m:?}"),
        }
    }
}

/// A failed device-mapper call: a [`DmErrorKind`], boxed (errors are the
/// cold path, and a `Result` carrying one stays small wherever it goes).
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DmError(Box<DmErrorKind>);

impl From<DmErrorKind> for DmError {
    fn from(kind: DmErrorKind) -> Self {
        Self(Box::new(kind))
    }
}

/// What failed in a device-mapper call.
#[derive(Debug, thiserror::Error)]
pub enum DmErrorKind {
    /// The control device could not be opened (no device-mapper, not
    /// root).
    #[error("device-mapper {op} {name}: cannot open {}: {source}", path.display())]
    Control {
        /// The operation.
        op: Op,
        /// The device.
        name: String,
        /// The control device.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the call.
    #[error("device-mapper {op} {name}: {source}")]
    Ioctl {
        /// The operation.
        op: Op,
        /// The device.
        name: String,
        /// The errno of the ioctl.
        #[source]
        source: Errno,
    },
    /// The request cannot be expressed in the kernel interface.
    #[error("device-mapper {op} {name}: {source}")]
    Unencodable {
        /// The operation.
        op: Op,
        /// The device.
        name: String,
        /// What is wrong.
        #[source]
        source: Unencodable,
    },
    /// The kernel's reply does not decode (or would not fit: a target
    /// message is never sent twice).
    #[error("device-mapper {op} {name}: malformed reply: {source}")]
    Reply {
        /// The operation.
        op: Op,
        /// The device.
        name: String,
        /// What is wrong.
        #[source]
        source: BadReply,
    },
    /// The device's node under the device directory could not be made.
    #[error("device-mapper {op} {name}: device node {}: {source}", path.display())]
    Node {
        /// The operation.
        op: Op,
        /// The device.
        name: String,
        /// The node.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl DmError {
    /// What failed.
    pub fn kind(&self) -> &DmErrorKind {
        &self.0
    }

    /// The errno of the failure, when the kernel (or the OS) gave one.
    pub fn errno(&self) -> Option<Errno> {
        match self.kind() {
            DmErrorKind::Ioctl { source, .. } => Some(*source),
            DmErrorKind::Control { source, .. } | DmErrorKind::Node { source, .. } => {
                source.raw_os_error().map(Errno::from_raw)
            }
            DmErrorKind::Unencodable { .. } | DmErrorKind::Reply { .. } => None,
        }
    }

    /// The operation that failed.
    pub fn op(&self) -> &Op {
        match self.kind() {
            DmErrorKind::Control { op, .. }
            | DmErrorKind::Ioctl { op, .. }
            | DmErrorKind::Unencodable { op, .. }
            | DmErrorKind::Reply { op, .. }
            | DmErrorKind::Node { op, .. } => op,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_errno_is_kept_and_shown_with_operation_and_device() {
        let e = DmError::from(DmErrorKind::Ioctl {
            op: Op::Message("create_snap 5 1".into()),
            name: "pool".into(),
            source: Errno::EEXIST,
        });
        assert_eq!(e.errno(), Some(Errno::EEXIST));
        assert_eq!(e.op(), &Op::Message("create_snap 5 1".into()));
        let text = e.to_string();
        assert!(
            text.contains("message \"create_snap 5 1\" pool") && text.contains("File exists"),
            "{text}"
        );
        let src = std::error::Error::source(&e).expect("source");
        assert_eq!(src.to_string(), Errno::EEXIST.to_string());
        let io = DmError::from(DmErrorKind::Control {
            op: Op::Info,
            name: "x".into(),
            path: "/dev/mapper/control".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOENT),
        });
        assert_eq!(io.errno(), Some(Errno::ENOENT));
        assert!(
            std::mem::size_of::<Result<(), DmError>>() <= 8,
            "a Result of it is a pointer"
        );
    }
}
