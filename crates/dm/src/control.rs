//! [`DeviceMapper`] through the kernel: ioctls on the control device.

use std::fs::{File, OpenOptions};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::errno::Errno;

use crate::error::{DmError, DmErrorKind, Op};
use crate::node::{self, Udev};
use crate::request::{BadReply, Request};
use crate::sys::{self, Cmd};
use crate::table::Table;
use crate::{DevInfo, DeviceMapper};

/// Room for a table or status reply at first; doubled while the kernel
/// says it did not fit.
const FIRST_ROOM: usize = 16 << 10;
/// Beyond this a reply is refused (a table of some 100 000 targets).
const MAX_ROOM: usize = 16 << 20;
/// Room for a target message's answer (the message is sent once: an answer
/// that does not fit is an error, never a second send).
const MESSAGE_ROOM: usize = 64 << 10;

/// The kernel's device-mapper, through `/dev/mapper/control`, which each
/// call opens (as each run of `dmsetup` did). Device nodes go to
/// `/dev/mapper`, made by udev when it runs and by this otherwise.
#[derive(Debug, Clone)]
pub struct Control {
    control: PathBuf,
    dev_dir: PathBuf,
    udev: Udev,
}

impl Default for Control {
    fn default() -> Self {
        Self {
            control: "/dev/mapper/control".into(),
            dev_dir: "/dev/mapper".into(),
            udev: Udev::detect(),
        }
    }
}

impl Control {
    /// The control device at `control`, device nodes in `dev_dir` and no
    /// udev (tests; a system with another `/dev`).
    pub fn with_paths(control: &Path, dev_dir: &Path) -> Self {
        Self {
            control: control.to_owned(),
            dev_dir: dev_dir.to_owned(),
            udev: Udev::Absent,
        }
    }

    /// The node of device `name`: `/dev/mapper/<name>`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dev_dir.join(name)
    }

    fn open(&self, op: &Op, name: &str) -> Result<File, DmError> {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.control)
            .map_err(|source| {
                DmError::from(DmErrorKind::Control {
                    op: op.clone(),
                    name: name.to_owned(),
                    path: self.control.clone(),
                    source,
                })
            })
    }

    /// Builds a request for `name` with `build` and runs `cmd` with it.
    fn call(
        &self,
        op: &Op,
        name: &str,
        cmd: Cmd,
        build: impl FnOnce(Request) -> Result<Request, crate::request::Unencodable>,
        flags: u32,
    ) -> Result<Request, DmError> {
        let mut req = Request::new(name, flags)
            .and_then(build)
            .map_err(|source| {
                DmError::from(DmErrorKind::Unencodable {
                    op: op.clone(),
                    name: name.to_owned(),
                    source,
                })
            })?;
        let f = self.open(op, name)?;
        sys::ioctl(f.as_fd(), cmd, req.bytes_mut()).map_err(|source| {
            DmError::from(DmErrorKind::Ioctl {
                op: op.clone(),
                name: name.to_owned(),
                source,
            })
        })?;
        Ok(req)
    }

    fn bad_reply(op: Op, name: &str, source: BadReply) -> DmError {
        DmErrorKind::Reply {
            op,
            name: name.to_owned(),
            source,
        }
        .into()
    }

    /// `DM_TABLE_STATUS`, growing the buffer until the reply fits.
    fn table_status(&self, op: Op, name: &str, flags: u32) -> Result<Table, DmError> {
        let mut room = FIRST_ROOM;
        loop {
            let r = self.call(&op, name, Cmd::TableStatus, |r| r.with_room(room), flags)?;
            if r.flags() & sys::BUFFER_FULL_FLAG == 0 {
                return r.targets().map_err(|e| Self::bad_reply(op, name, e));
            }
            if room >= MAX_ROOM {
                return Err(Self::bad_reply(op, name, BadReply::Full(room)));
            }
            room *= 2;
        }
    }

    fn node_error(op: Op, name: &str, path: PathBuf, source: std::io::Error) -> DmError {
        DmErrorKind::Node {
            op,
            name: name.to_owned(),
            path,
            source,
        }
        .into()
    }

    /// Resumes `name` and makes sure its node is there.
    fn resume_as(&self, op: Op, name: &str) -> Result<(), DmError> {
        let r = self.call(&op, name, Cmd::DevSuspend, Ok, 0)?;
        node::ensure(&self.dev_dir, name, r.dev(), self.udev)
            .map_err(|e| Self::node_error(op, name, self.path(name), e))?;
        Ok(())
    }

    fn load(&self, name: &str, table: &Table, flags: u32) -> Result<(), DmError> {
        self.call(
            &Op::Load,
            name,
            Cmd::TableLoad,
            |r| r.with_table(table),
            flags,
        )
        .map(drop)
    }
}

impl DeviceMapper for Control {
    fn info(&self, name: &str) -> Result<Option<DevInfo>, DmError> {
        let r = match self.call(&Op::Info, name, Cmd::DevStatus, Ok, 0) {
            Ok(r) => r,
            Err(e) if e.errno() == Some(Errno::ENXIO) => return Ok(None),
            Err(e) => return Err(e),
        };
        let flags = r.flags();
        let dev = r.dev();
        Ok(Some(DevInfo {
            suspended: flags & sys::SUSPEND_FLAG != 0,
            read_only: flags & sys::READONLY_FLAG != 0,
            live_table: flags & sys::ACTIVE_PRESENT_FLAG != 0,
            open_count: r.open_count().max(0) as u32,
            major: libc::major(dev as libc::dev_t),
            minor: libc::minor(dev as libc::dev_t),
        }))
    }

    fn table(&self, name: &str) -> Result<Table, DmError> {
        self.table_status(Op::Table, name, sys::STATUS_TABLE_FLAG)
    }

    fn status(&self, name: &str) -> Result<Table, DmError> {
        self.table_status(Op::Status, name, 0)
    }

    fn create(&self, name: &str, table: &Table, read_only: bool) -> Result<(), DmError> {
        self.call(&Op::Create, name, Cmd::DevCreate, Ok, 0)?;
        let flags = if read_only { sys::READONLY_FLAG } else { 0 };
        let activated = self
            .load(name, table, flags)
            .and_then(|()| self.resume_as(Op::Create, name));
        if activated.is_err() {
            // No empty device is left behind (libdevmapper does the same).
            // The error to report is the first; should this removal fail
            // too, the caller finds the empty device and removes it.
            let _ = self.remove(name);
        }
        activated
    }

    fn reload(&self, name: &str, table: &Table) -> Result<(), DmError> {
        self.load(name, table, 0)
    }

    fn suspend(&self, name: &str) -> Result<(), DmError> {
        self.call(&Op::Suspend, name, Cmd::DevSuspend, Ok, sys::SUSPEND_FLAG)
            .map(drop)
    }

    fn resume(&self, name: &str) -> Result<(), DmError> {
        self.resume_as(Op::Resume, name)
    }

    fn remove(&self, name: &str) -> Result<(), DmError> {
        let dev = self.info(name)?.map(|i| libc::makedev(i.major, i.minor));
        self.call(&Op::Remove, name, Cmd::DevRemove, Ok, 0)?;
        if let Some(dev) = dev {
            node::remove(&self.dev_dir, name, dev)
                .map_err(|e| Self::node_error(Op::Remove, name, self.path(name), e))?;
        }
        Ok(())
    }

    fn message(&self, name: &str, message: &str) -> Result<String, DmError> {
        let op = Op::Message(message.to_owned());
        let r = self.call(
            &op,
            name,
            Cmd::TargetMsg,
            |r| r.with_message(0, message, MESSAGE_ROOM),
            0,
        )?;
        if r.flags() & sys::BUFFER_FULL_FLAG != 0 {
            return Err(Self::bad_reply(op, name, BadReply::Full(MESSAGE_ROOM)));
        }
        r.message_reply()
            .map(|s| s.trim_end().to_owned())
            .map_err(|e| Self::bad_reply(op, name, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_control_device_is_a_clear_error() {
        let d = tempfile::tempdir().expect("tmp");
        let dm = Control::with_paths(&d.path().join("control"), d.path());
        let e = dm.status("x").expect_err("must fail");
        assert_eq!(e.errno(), Some(Errno::ENOENT));
        assert!(matches!(
            e.kind(),
            DmErrorKind::Control { op: Op::Status, .. }
        ));
        let text = e.to_string();
        assert!(
            text.contains("device-mapper status x") && text.contains("control"),
            "{text}"
        );
    }

    #[test]
    fn a_request_the_kernel_cannot_carry_is_refused_before_opening_anything() {
        let d = tempfile::tempdir().expect("tmp");
        let dm = Control::with_paths(&d.path().join("control"), d.path());
        let e = dm.message("pool", "a\0b").expect_err("must fail");
        assert!(matches!(e.kind(), DmErrorKind::Unencodable { .. }), "{e}");
        assert_eq!(e.errno(), None);
        let e = dm.info("a/b").expect_err("must fail");
        assert!(
            matches!(e.kind(), DmErrorKind::Unencodable { op: Op::Info, .. }),
            "{e}"
        );
    }

    #[test]
    fn the_kernels_errno_comes_back_typed() {
        // /dev/null is no control device: the kernel answers ENOTTY.
        let d = tempfile::tempdir().expect("tmp");
        let dm = Control::with_paths(Path::new("/dev/null"), d.path());
        let e = dm.info("v").expect_err("must fail");
        assert_eq!(e.errno(), Some(Errno::ENOTTY));
        assert!(
            matches!(e.kind(), DmErrorKind::Ioctl { op: Op::Info, .. }),
            "{e}"
        );
    }
}
