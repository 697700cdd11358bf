//! The kernel module's rings, through the control device `/dev/dm-replica`.
//!
//! [`Device::attach`] claims a group's ring (one consumer per ring), maps it
//! read-only and returns a [`Consumer`] whose releases are ioctls the kernel
//! validates. The same open device describes the group's volumes, waits for
//! new records with `poll` and reads and clears dirty-region bitmaps.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ring_abi::{
    AllowJoinsArg, AttachArg, BitmapArg, MarkerArg, ReleaseArg, VolumeArg, GROUP_NAME_LEN,
};

use crate::{Consumer, Mapping, Release, RingError};

/// Where the module's control device appears.
pub const CONTROL_DEVICE: &str = "/dev/dm-replica";

/// An open control device.
#[derive(Debug)]
pub struct Device {
    file: File,
}

/// One volume of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeInfo {
    /// Index within the group (the records' `volume` field).
    pub index: u32,
    /// Volume id from the table line.
    pub id: String,
    /// Size in 512-byte sectors.
    pub sectors: u64,
    /// Dirty-region size in KiB.
    pub region_kib: u32,
    /// Regions (bits) of its bitmap.
    pub regions: u64,
    /// Regions currently dirty.
    pub dirty_regions: u64,
}

/// A dirty-region bitmap read (and cleared) from the kernel.
#[derive(Debug, Clone)]
pub struct Bitmap {
    /// Region size in KiB.
    pub region_kib: u32,
    /// Number of regions (bits).
    pub regions: u64,
    /// The ring is complete from this sequence: every write before it that
    /// is not a record is in this bitmap (or will be set again when it
    /// completes, for one still in flight).
    pub resume_seq: u64,
    /// Writes made in overflow mode (not captured) that were still in
    /// flight when the bitmap was taken: each sets its regions again when it
    /// completes, and may reach the disk after anything read now. A resync
    /// is complete only after a take that returns no new region with this
    /// at 0.
    pub in_flight_overflow: u64,
    /// The bits, 64 regions per word.
    pub words: Vec<u64>,
}

impl Bitmap {
    /// Whether region `r` is dirty.
    pub fn is_set(&self, r: u64) -> bool {
        self.words
            .get((r / 64) as usize)
            .is_some_and(|w| w & (1 << (r % 64)) != 0)
    }

    /// The dirty regions, in order.
    pub fn regions_set(&self) -> impl Iterator<Item = u64> + '_ {
        (0..self.regions).filter(|&r| self.is_set(r))
    }
}

/// What a wait for records saw.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// Something changed (new records, completions, overflow).
    Ready,
    /// Nothing within the timeout.
    Timeout,
    /// The ring is dead: its last target was removed.
    Hangup,
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> RingError {
    move |source| RingError::Io { what, source }
}

impl Device {
    /// Opens the control device at `path` (normally [`CONTROL_DEVICE`]).
    pub fn open(path: &Path) -> Result<Self, RingError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(io("open the dm-replica control device"))?;
        Ok(Self { file })
    }

    fn ioctl<T>(&self, what: &'static str, cmd: u32, arg: &mut T) -> Result<(), RingError> {
        // SAFETY: `cmd` is one of the ABI's ioctls whose argument is a `T`
        // (the callers pair them), and `arg` is a valid, exclusively borrowed
        // `T` for the duration of the call; the kernel reads and writes at
        // most `size_of::<T>()` bytes of it (the size encoded in `cmd`).
        let r = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                cmd as libc::c_ulong,
                arg as *mut T,
            )
        };
        if r < 0 {
            return Err(RingError::Io {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Attaches this file to `group`'s ring and maps it read-only. The file
    /// stays the ring's only consumer until it is closed.
    pub fn attach(self, group: &str) -> Result<Consumer<DeviceRelease>, RingError> {
        let bytes = group.as_bytes();
        if bytes.is_empty() || bytes.len() >= GROUP_NAME_LEN {
            return Err(RingError::BadHeader("group name must be 1-63 bytes"));
        }
        let mut arg = AttachArg {
            group: [0; GROUP_NAME_LEN],
            map_size: 0,
            generation: [0; 16],
        };
        arg.group[..bytes.len()].copy_from_slice(bytes);
        self.ioctl("attach to the group's ring", ring_abi::IOC_ATTACH, &mut arg)?;
        let map = Mapping::from_fd(self.file.as_raw_fd(), arg.map_size, false)?;
        if map.generation() != arg.generation {
            return Err(RingError::BadHeader("generation differs from the attach reply"));
        }
        Consumer::new(
            map,
            DeviceRelease {
                dev: Arc::new(self),
            },
        )
    }

    /// Describes volume `index` of the attached group (`None` past the end).
    pub fn volume(&self, index: u32) -> Result<Option<VolumeInfo>, RingError> {
        let mut arg = VolumeArg {
            index,
            region_kib: 0,
            sectors: 0,
            regions: 0,
            dirty_regions: 0,
            id: [0; GROUP_NAME_LEN],
        };
        match self.ioctl("describe a volume", ring_abi::IOC_VOLUME, &mut arg) {
            Ok(()) => {}
            Err(RingError::Io { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
                return Ok(None)
            }
            Err(e) => return Err(e),
        }
        let len = arg.id.iter().position(|&c| c == 0).unwrap_or(GROUP_NAME_LEN);
        Ok(Some(VolumeInfo {
            index,
            id: String::from_utf8_lossy(&arg.id[..len]).into_owned(),
            sectors: arg.sectors,
            region_kib: arg.region_kib,
            regions: arg.regions,
            dirty_regions: arg.dirty_regions,
        }))
    }

    /// Every volume of the attached group. Indices may have gaps (a volume
    /// removed from a group keeps its index free).
    pub fn volumes(&self) -> Result<Vec<VolumeInfo>, RingError> {
        let mut out = Vec::new();
        for i in 0..ring_abi_max_volumes() {
            if let Some(v) = self.volume(i)? {
                out.push(v);
            }
        }
        Ok(out)
    }

    /// Reads and clears volume `index`'s dirty bitmap; this also ends the
    /// ring's overflow (capture resumes at [`Bitmap::resume_seq`]).
    pub fn take_bitmap(&self, index: u32) -> Result<Bitmap, RingError> {
        let info = self
            .volume(index)?
            .ok_or(RingError::BadHeader("no such volume in the group"))?;
        let mut words = vec![0u64; info.regions.div_ceil(64) as usize];
        let mut arg = BitmapArg {
            buf: words.as_mut_ptr() as u64,
            buf_len: (words.len() * 8) as u64,
            volume: index,
            region_kib: 0,
            regions: 0,
            resume_seq: 0,
            in_flight_overflow: 0,
        };
        self.ioctl("read the dirty bitmap", ring_abi::IOC_BITMAP, &mut arg)?;
        Ok(Bitmap {
            region_kib: arg.region_kib,
            regions: arg.regions,
            resume_seq: arg.resume_seq,
            in_flight_overflow: arg.in_flight_overflow,
            words,
        })
    }

    /// Inserts a MARKER record about volume `volume` with record `flags`
    /// (0 or `FLAG_RESYNC`) and id `aux` after every record reserved so far;
    /// returns its sequence. Refused while the ring overflows (`EIO`) or
    /// writers wait for space (`EAGAIN`).
    pub fn insert_marker(&self, volume: u32, flags: u8, aux: u64) -> Result<u64, RingError> {
        let mut arg = MarkerArg {
            volume,
            flags: u32::from(flags),
            aux,
            seq: 0,
        };
        self.ioctl("insert a marker", ring_abi::IOC_MARKER, &mut arg)?;
        Ok(arg.seq)
    }

    /// Lets tables of new volumes join the attached group while this file
    /// is attached (`true`), or refuses them again (`false`, the state at
    /// attach). Without it the kernel refuses them with `EBUSY`.
    pub fn allow_joins(&self, allow: bool) -> Result<(), RingError> {
        let mut arg = AllowJoinsArg {
            allow: u32::from(allow),
            _reserved: 0,
        };
        self.ioctl(
            "allow new volumes in the group",
            ring_abi::IOC_ALLOW_JOINS,
            &mut arg,
        )
    }

    fn release(&self, new_cons: u64) -> Result<(), RingError> {
        let mut arg = ReleaseArg {
            new_cons_seq: new_cons,
        };
        self.ioctl("release ring records", ring_abi::IOC_RELEASE, &mut arg)
    }

    /// Waits up to `timeout` for the ring to change.
    pub fn wait(&self, timeout: Duration) -> Result<Wake, RingError> {
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd, for the duration of the call.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Wake::Timeout);
            }
            return Err(RingError::Io {
                what: "poll the control device",
                source: e,
            });
        }
        if pfd.revents & libc::POLLHUP != 0 {
            Ok(Wake::Hangup)
        } else if pfd.revents & libc::POLLERR != 0 {
            Err(RingError::Corrupt("control device reports an error (not attached)"))
        } else if r > 0 {
            Ok(Wake::Ready)
        } else {
            Ok(Wake::Timeout)
        }
    }
}

impl AsRawFd for Device {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

/// Most volume indices a group can use (the module's limit).
const fn ring_abi_max_volumes() -> u32 {
    32
}

/// Releases through the control device (the kernel validates each one).
#[derive(Debug, Clone)]
pub struct DeviceRelease {
    dev: Arc<Device>,
}

impl DeviceRelease {
    /// The control device, for bitmaps, volumes and waits.
    pub fn device(&self) -> &Arc<Device> {
        &self.dev
    }
}

impl Release for DeviceRelease {
    fn release(&mut self, _map: &Mapping, new_cons: u64, _data_tail: u64) -> Result<(), RingError> {
        self.dev.release(new_cons)
    }

    fn wait(&mut self, _map: &Mapping, timeout: Duration) -> Result<(), RingError> {
        if self.dev.wait(timeout)? == Wake::Hangup {
            // A dead ring stays readable until drained; poll returns at once
            // now, so do not spin (the consumer checks `is_dead`).
            std::thread::sleep(timeout.min(Duration::from_millis(10)));
        }
        Ok(())
    }
}
