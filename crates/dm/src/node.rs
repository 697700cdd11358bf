//! The `/dev/mapper/<name>` nodes of devices.
//!
//! With udev running, udev makes them (a symlink to `../dm-N`) from the
//! uevent of the resume; a caller opens the path right after, so we wait
//! for it (with a deadline). Without udev (an initramfs, a test VM, or
//! `DM_DISABLE_UDEV` set, as libdevmapper honours it) we make it ourselves,
//! as `dmsetup mknodes` would: a block node with the device's number.

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::stat::{Mode, SFlag};

/// Who makes the nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Udev {
    /// udev does; wait this long for it before making the node ourselves.
    Running(Duration),
    /// Nobody else does.
    Absent,
}

/// How long udev gets to make a node before we make it.
const UDEV_WAIT: Duration = Duration::from_secs(10);

/// Between looks at a node udev is making.
const POLL: Duration = Duration::from_millis(10);

impl Udev {
    /// As libdevmapper decides: running when its control socket exists,
    /// unless `DM_DISABLE_UDEV` is set.
    pub fn detect() -> Self {
        if std::env::var_os("DM_DISABLE_UDEV").is_none() && Path::new("/run/udev/control").exists()
        {
            Udev::Running(UDEV_WAIT)
        } else {
            Udev::Absent
        }
    }
}

/// Whether `path` (followed through symlinks) is block device `dev`.
fn is_node_of(path: &Path, dev: u64) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.file_type().is_block_device() && m.rdev() == dev)
}

/// Makes sure `dir/name` is block device `dev`: waits for udev, or (then)
/// makes the node, replacing a stale one left by an earlier device of that
/// name.
pub fn ensure(dir: &Path, name: &str, dev: u64, udev: Udev) -> io::Result<PathBuf> {
    let path = dir.join(name);
    if let Udev::Running(wait) = udev {
        let deadline = Instant::now() + wait;
        while !is_node_of(&path, dev) && Instant::now() < deadline {
            std::thread::sleep(POLL);
        }
    }
    if is_node_of(&path, dev) {
        return Ok(path);
    }
    std::fs::create_dir_all(dir)?;
    // Made aside and renamed over, so the path is never missing or wrong
    // for someone who looks at it meanwhile.
    let tmp = dir.join(format!(".{name}.{}.new", std::process::id()));
    match std::fs::remove_file(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    nix::sys::stat::mknod(
        &tmp,
        SFlag::S_IFBLK,
        Mode::S_IRUSR | Mode::S_IWUSR,
        dev as libc::dev_t,
    )?;
    std::fs::rename(&tmp, &path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })?;
    Ok(path)
}

/// After device `dev` is removed: deletes `dir/name` if it is a node of
/// that device we (or dmsetup) made; udev's symlinks are udev's to remove.
pub fn remove(dir: &Path, name: &str, dev: u64) -> io::Result<()> {
    let path = dir.join(name);
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_block_device() && m.rdev() == dev => {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            }
        }
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    //! These make block device nodes: they need CAP_MKNOD (the test suite
    //! runs as root).
    use super::*;

    fn dev(major: u32, minor: u32) -> u64 {
        libc::makedev(major, minor)
    }

    #[test]
    fn a_missing_node_is_made_and_a_stale_one_replaced() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().join("mapper");
        let p = ensure(&dir, "rep", dev(253, 7), Udev::Absent).expect("mknod (needs root)");
        assert_eq!(p, dir.join("rep"));
        let m = std::fs::metadata(&p).expect("stat");
        assert!(m.file_type().is_block_device());
        assert_eq!(m.rdev(), dev(253, 7));
        // A node of an earlier device of the same name is replaced.
        ensure(&dir, "rep", dev(253, 9), Udev::Absent).expect("replace");
        assert_eq!(std::fs::metadata(&p).expect("stat").rdev(), dev(253, 9));
        assert_eq!(
            std::fs::read_dir(&dir).expect("dir").count(),
            1,
            "no temporary left"
        );
        // Removing a device deletes its node, not another device's.
        remove(&dir, "rep", dev(253, 7)).expect("other device");
        assert!(p.exists());
        remove(&dir, "rep", dev(253, 9)).expect("remove");
        assert!(!p.exists());
        remove(&dir, "rep", dev(253, 9)).expect("already gone");
    }

    #[test]
    fn a_node_udev_made_is_used_as_it_is() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path();
        nix::sys::stat::mknod(
            &dir.join("dm-3"),
            SFlag::S_IFBLK,
            Mode::S_IRUSR,
            dev(253, 3) as libc::dev_t,
        )
        .expect("mknod (needs root)");
        let mapper = dir.join("mapper");
        std::fs::create_dir(&mapper).expect("mkdir");
        std::os::unix::fs::symlink("../dm-3", mapper.join("v")).expect("symlink");
        let p = ensure(&mapper, "v", dev(253, 3), Udev::Running(Duration::ZERO)).expect("ok");
        assert!(std::fs::symlink_metadata(&p)
            .expect("lstat")
            .file_type()
            .is_symlink());
        // Its symlink is udev's to remove.
        remove(&mapper, "v", dev(253, 3)).expect("remove");
        assert!(std::fs::symlink_metadata(&p).is_ok());
    }

    #[test]
    fn a_node_udev_makes_while_we_wait_is_taken() {
        let d = tempfile::tempdir().expect("tmp");
        let dir = d.path().to_owned();
        let maker = {
            let dir = dir.clone();
            std::thread::spawn(move || {
                // Stands in for udev: the node appears whenever this
                // thread gets to run, before or while `ensure` looks.
                nix::sys::stat::mknod(
                    &dir.join("late"),
                    SFlag::S_IFBLK,
                    Mode::S_IRUSR,
                    dev(253, 5) as libc::dev_t,
                )
            })
        };
        let p = ensure(
            &dir,
            "late",
            dev(253, 5),
            Udev::Running(Duration::from_secs(30)),
        )
        .expect("ensure");
        maker.join().expect("join").expect("mknod (needs root)");
        let m = std::fs::metadata(&p).expect("stat");
        assert_eq!(m.rdev(), dev(253, 5));
        assert_eq!(m.mode() & 0o777, 0o400, "udev's node, not ours (0600)");
    }
}
