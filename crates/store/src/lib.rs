//! Target-side storage of dm-replica: the segment journal, replica
//! backends with recovery points, and persistent volume state.

pub mod backend;
pub mod journal;
pub mod replica;
pub mod state;
pub mod thin;
mod uring;

use std::path::{Path, PathBuf};

use replica_dm::Errno;

/// Storage errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O operation failed.
    #[error(transparent)]
    Io(#[from] replica_fs::IoError),
    /// Stored data is damaged.
    #[error("{}: damaged at offset {offset}: {why}", path.display())]
    Corrupt {
        /// File.
        path: PathBuf,
        /// Where.
        offset: u64,
        /// What is wrong.
        why: String,
    },
    /// The replica has no recovery point (snapshot) of this id.
    #[error("no recovery point {0}")]
    NoSuchPoint(u64),
    /// A request that cannot be honoured.
    #[error("{0}")]
    Invalid(String),
    /// A device-mapper call failed (its errno is in it).
    #[error(transparent)]
    Dm(#[from] replica_dm::DmError),
    /// The journal's current file has the last file number there is (a
    /// watermark named it): no file can follow it.
    #[error("{}: journal file {file} is the last file number there is; no file can follow it", dir.display())]
    JournalFileNumbers {
        /// The journal directory.
        dir: PathBuf,
        /// Its current file.
        file: u64,
    },
}

impl StoreError {
    /// Wraps an OS error with context.
    pub fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        Self::Io(replica_fs::IoError::new(what, path, source))
    }

    /// Whether retrying later can succeed (full disk or thin pool, out of
    /// memory, interrupted); everything else is non-recoverable.
    pub fn is_recoverable(&self) -> bool {
        match self {
            StoreError::Io(replica_fs::IoError { source, .. }) => {
                matches!(
                    source.raw_os_error(),
                    Some(libc::ENOSPC)
                        | Some(libc::EDQUOT)
                        | Some(libc::ENOMEM)
                        | Some(libc::EAGAIN)
                        | Some(libc::EINTR)
                ) || source.kind() == std::io::ErrorKind::StorageFull
            }
            StoreError::Dm(e) => matches!(
                e.errno(),
                Some(Errno::ENOSPC) | Some(Errno::ENOMEM) | Some(Errno::EAGAIN)
            ),
            _ => false,
        }
    }
}
