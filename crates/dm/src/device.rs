//! Finding a block device's device-mapper name through sysfs.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// Why a path does not name a (device-mapper) block device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The path cannot be examined.
    #[error("{}: {source}", path.display())]
    Stat {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a block device.
    #[error("{} is not a block device", .0.display())]
    NotBlock(PathBuf),
    /// A block device, but not one of device-mapper.
    #[error("{} is not a device-mapper device", .0.display())]
    NotDm(PathBuf),
}

/// The sysfs directory (`/sys/dev/block/<major>:<minor>`) of the block
/// device at `device`.
pub fn block_sysfs(device: &Path) -> Result<PathBuf, DeviceError> {
    let meta = std::fs::metadata(device).map_err(|source| DeviceError::Stat {
        path: device.to_owned(),
        source,
    })?;
    if !meta.file_type().is_block_device() {
        return Err(DeviceError::NotBlock(device.to_owned()));
    }
    let rdev = meta.rdev();
    Ok(PathBuf::from(format!(
        "/sys/dev/block/{}:{}",
        libc::major(rdev),
        libc::minor(rdev)
    )))
}

/// The device-mapper name of the block device at `device` (a
/// `/dev/mapper/...` path or any node of a dm device).
pub fn dm_name(device: &Path) -> Result<String, DeviceError> {
    std::fs::read_to_string(block_sysfs(device)?.join("dm/name"))
        .map(|s| s.trim().to_owned())
        .map_err(|_| DeviceError::NotDm(device.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_is_not_a_block_device_and_a_missing_path_says_so() {
        let d = tempfile::tempdir().expect("tmp");
        let f = d.path().join("f");
        std::fs::write(&f, b"x").expect("w");
        assert!(matches!(dm_name(&f), Err(DeviceError::NotBlock(p)) if p == f));
        let gone = d.path().join("gone");
        let e = block_sysfs(&gone).expect_err("missing");
        assert!(
            matches!(&e, DeviceError::Stat { path, .. } if *path == gone),
            "{e}"
        );
    }
}
