//! The daemon's own files (state, spool) must never live on a protected
//! volume: its writes would be captured and replicated, and a spool that
//! feeds its own ring never drains. At start-up the block devices under a
//! directory's filesystem are walked down through sysfs (partitions to their
//! disk, device-mapper and md devices to their slaves); a device-mapper
//! device with a `replica` target among them is refused.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::DaemonError;

/// Refuses `path` (configuration key `what`) if its filesystem sits on a
/// protected volume.
pub fn check_not_protected(path: &Path, what: &str) -> Result<(), DaemonError> {
    let mut p = path;
    let meta = loop {
        match std::fs::metadata(p) {
            Ok(m) => break m,
            Err(_) => match p.parent() {
                Some(parent) => p = parent,
                None => return Ok(()),
            },
        }
    };
    let dev = meta.dev();
    let (major, minor) = (libc::major(dev), libc::minor(dev));
    match find_protected(Path::new("/sys"), major, minor, &dm_table)? {
        None => Ok(()),
        Some(dm) => Err(DaemonError::Unsupported(format!(
            "{what} {} is on device-mapper device {dm}, which is a protected volume (a replica target): the daemon's state and spool must be on a disk that is not protected",
            path.display()
        ))),
    }
}

/// The table of device-mapper device `name`, as `dmsetup table` prints it.
fn dm_table(name: &str) -> Result<String, DaemonError> {
    replica_dm::DeviceMapper::table(&replica_dm::Control::default(), name)
        .map(|t| t.to_string())
        .map_err(|e| {
            DaemonError::Unsupported(format!(
                "cannot read the table of device-mapper device {name} (to check it is not protected): {e}"
            ))
        })
}

/// Whether a table has a `replica` target line.
fn has_replica_target(table: &str) -> bool {
    table
        .lines()
        .any(|l| l.split_whitespace().nth(2) == Some("replica"))
}

/// Walks down from block device `major:minor` under `sysfs`; returns the
/// name of the first device-mapper device whose table (read with `table`)
/// has a `replica` target.
pub fn find_protected(
    sysfs: &Path,
    major: u32,
    minor: u32,
    table: &dyn Fn(&str) -> Result<String, DaemonError>,
) -> Result<Option<String>, DaemonError> {
    if major == 0 {
        // tmpfs, overlay, btrfs subvolumes: no block device to walk.
        return Ok(None);
    }
    let start = sysfs.join(format!("dev/block/{major}:{minor}"));
    let Ok(start) = std::fs::canonicalize(&start) else {
        return Ok(None);
    };
    let mut todo: Vec<PathBuf> = vec![start];
    let mut seen = std::collections::HashSet::new();
    while let Some(d) = todo.pop() {
        if !seen.insert(d.clone()) || seen.len() > 256 {
            continue;
        }
        if let Ok(name) = std::fs::read_to_string(d.join("dm/name")) {
            let name = name.trim();
            if has_replica_target(&table(name)?) {
                return Ok(Some(name.to_owned()));
            }
        }
        // A partition's disk is its parent directory.
        if d.join("partition").exists() {
            if let Some(parent) = d.parent() {
                todo.push(parent.to_owned());
            }
        }
        if let Ok(rd) = std::fs::read_dir(d.join("slaves")) {
            for e in rd.flatten() {
                if let Ok(p) = std::fs::canonicalize(e.path()) {
                    todo.push(p);
                }
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// A fake sysfs: vda (disk) with partition vda1; dm-0 (LVM) on vda1;
    /// dm-1 (protected, replica) on dm-0; dm-2 (linear) on vdb; dm-3
    /// (LVM) on dm-1.
    fn fake() -> tempfile::TempDir {
        let t = tempfile::tempdir().expect("tmp");
        let r = t.path();
        let blk = r.join("devices/virtual/block");
        let pci = r.join("devices/pci/virtio1/block/vda");
        std::fs::create_dir_all(pci.join("vda1")).expect("mk");
        std::fs::write(pci.join("vda1/partition"), "1").expect("w");
        std::fs::create_dir_all(r.join("devices/pci/virtio2/block/vdb")).expect("mk");
        for (dm, name, slave) in [
            ("dm-0", "vg-root", pci.join("vda1")),
            ("dm-1", "db1", blk.join("dm-0")),
            ("dm-2", "plain", r.join("devices/pci/virtio2/block/vdb")),
            ("dm-3", "vg2-lv", blk.join("dm-1")),
        ] {
            std::fs::create_dir_all(blk.join(dm).join("dm")).expect("mk");
            std::fs::create_dir_all(blk.join(dm).join("slaves")).expect("mk");
            std::fs::write(blk.join(dm).join("dm/name"), format!("{name}\n")).expect("w");
            symlink(&slave, blk.join(dm).join("slaves").join("x")).expect("ln");
        }
        std::fs::create_dir_all(r.join("dev/block")).expect("mk");
        for (n, target) in [
            ("253:0", blk.join("dm-0")),
            ("253:1", blk.join("dm-1")),
            ("253:2", blk.join("dm-2")),
            ("253:3", blk.join("dm-3")),
            ("254:1", pci.join("vda1")),
            ("254:16", r.join("devices/pci/virtio2/block/vdb")),
        ] {
            symlink(target, r.join("dev/block").join(n)).expect("ln");
        }
        t
    }

    fn table(name: &str) -> Result<String, DaemonError> {
        Ok(match name {
            "vg-root" => "0 1000 linear 254:1 2048\n".into(),
            "db1" => "0 1000 replica 253:0 db1 ring_mib=64\n".into(),
            _ => "0 1000 linear 254:16 0\n".into(),
        })
    }

    #[test]
    fn finds_a_replica_target_anywhere_below_and_nothing_elsewhere() {
        let t = fake();
        let f = |maj, min| find_protected(t.path(), maj, min, &table).expect("walk");
        assert_eq!(f(253, 1), Some("db1".into()));
        assert_eq!(
            f(253, 3),
            Some("db1".into()),
            "a volume stacked on a protected one"
        );
        assert_eq!(f(253, 0), None, "the LVM volume under the protected one");
        assert_eq!(f(253, 2), None);
        assert_eq!(f(254, 1), None);
        assert_eq!(f(0, 42), None, "tmpfs");
        assert_eq!(f(8, 99), None, "unknown device");
    }

    #[test]
    fn unreadable_table_is_an_error_not_a_pass() {
        let t = fake();
        let bad = |_: &str| -> Result<String, DaemonError> {
            Err(DaemonError::Unsupported("no dmsetup".into()))
        };
        assert!(find_protected(t.path(), 253, 1, &bad).is_err());
    }

    #[test]
    fn table_lines_are_parsed_by_target_type() {
        assert!(has_replica_target("0 8 linear 8:0 0\n8 8 replica 8:1 v\n"));
        assert!(!has_replica_target("0 8 linear 8:0 0 replica\n"));
    }
}
