// SPDX-License-Identifier: GPL-2.0

//! The control device `/dev/dm-replica`: how the daemon consumes a ring.
//!
//! An open file attaches to one group's ring ([`abi::IOC_ATTACH`]; one
//! consumer per ring), maps it read-only, waits for records with `poll`
//! (POLLHUP once the ring is dead), describes the group's volumes
//! ([`abi::IOC_VOLUME`]), gives space back with [`abi::IOC_RELEASE`]
//! (validated against the kernel's own copy of the ring) and reads and
//! clears a volume's dirty bitmap with [`abi::IOC_BITMAP`], which also ends
//! overflow and says from which sequence the ring is complete again. While
//! it is attached, tables for new volumes of the group are refused unless it
//! allows them with [`abi::IOC_ALLOW_JOINS`].
//! Closing the file detaches the consumer; the ring and its memory stay as
//! long as the group's targets (or the file's mappings) need them.

use core::mem::{offset_of, size_of};
use core::sync::atomic::{AtomicU64, Ordering};

use kernel::prelude::*;
use kernel::sync::{new_spinlock, Arc, SpinLock};
use kernel::uaccess::UserSlice;

use crate::dm::misc::{poll_bits, user_arg, FileOps, PollTable, Vma};
use crate::group::{Group, Registry};
use crate::ring_abi as abi;

/// An open control file.
///
/// `attached` is set once by `attach` and only read afterwards. It is a
/// spinlock, and never held across a user copy: `mmap` reads it with the
/// process's `mmap_lock` held, and a user copy may take `mmap_lock`.
pub(crate) struct ControlFile {
    registry: Arc<Registry>,
    attached: Pin<KBox<SpinLock<Option<Arc<Group>>>>>,
    /// The group's event counter at the last `poll` that reported data.
    seen: AtomicU64,
}

impl ControlFile {
    fn group(&self) -> Result<Arc<Group>> {
        self.attached.lock().clone().ok_or_else(errno::not_connected)
    }

    fn attach(&self, arg: usize) -> Result<i32> {
        let (mut r, mut w) = user_arg::<abi::AttachArg>(arg).reader_writer();
        let mut buf = [0u8; size_of::<abi::AttachArg>()];
        r.read_slice(&mut buf)?;
        let name_field = buf.get(..abi::GROUP_NAME_LEN).ok_or(EINVAL)?;
        let len = name_field.iter().position(|&c| c == 0).unwrap_or(name_field.len());
        let name = name_field.get(..len).ok_or(EINVAL)?;
        if !crate::table::valid_name(name) {
            return Err(EINVAL);
        }
        if self.attached.lock().is_some() {
            return Err(errno::already_connected());
        }
        let group = self.registry.find(name).ok_or(ENOENT)?;
        if !group.attach_consumer() {
            return Err(EBUSY);
        }
        put_u64(&mut buf, offset_of!(abi::AttachArg, map_size), group.map_size());
        let gen_off = offset_of!(abi::AttachArg, generation);
        if let Some(g) = buf.get_mut(gen_off..gen_off + 16) {
            g.copy_from_slice(group.generation());
        }
        if let Err(e) = w.write_slice(&buf) {
            group.detach_consumer();
            return Err(e);
        }
        self.seen.store(group.events().wrapping_sub(1), Ordering::Release);
        let mut slot = self.attached.lock();
        if slot.is_some() {
            // A concurrent attach on the same file won.
            drop(slot);
            group.detach_consumer();
            return Err(errno::already_connected());
        }
        *slot = Some(group);
        Ok(0)
    }

    fn release(&self, arg: usize) -> Result<i32> {
        let mut buf = [0u8; size_of::<abi::ReleaseArg>()];
        user_arg::<abi::ReleaseArg>(arg).reader().read_slice(&mut buf)?;
        let new_cons = get_u64(&buf, offset_of!(abi::ReleaseArg, new_cons_seq)).ok_or(EINVAL)?;
        Group::release(&self.group()?, new_cons)?;
        Ok(0)
    }

    fn volume(&self, arg: usize) -> Result<i32> {
        let (mut r, mut w) = user_arg::<abi::VolumeArg>(arg).reader_writer();
        let mut buf = [0u8; size_of::<abi::VolumeArg>()];
        r.read_slice(&mut buf)?;
        let index = get_u32(&buf, offset_of!(abi::VolumeArg, index)).ok_or(EINVAL)?;
        let v = self.group()?.volume_info(index).ok_or(ENOENT)?;
        put_u32(&mut buf, offset_of!(abi::VolumeArg, region_kib), v.region_kib);
        put_u64(&mut buf, offset_of!(abi::VolumeArg, sectors), v.sectors);
        put_u64(&mut buf, offset_of!(abi::VolumeArg, regions), v.regions);
        put_u64(&mut buf, offset_of!(abi::VolumeArg, dirty_regions), v.dirty);
        let id_off = offset_of!(abi::VolumeArg, id);
        if let Some(id) = buf.get_mut(id_off..id_off + abi::GROUP_NAME_LEN) {
            id.copy_from_slice(v.id.padded());
        }
        w.write_slice(&buf)?;
        Ok(0)
    }

    fn marker(&self, arg: usize) -> Result<i32> {
        let (mut r, mut w) = user_arg::<abi::MarkerArg>(arg).reader_writer();
        let mut buf = [0u8; size_of::<abi::MarkerArg>()];
        r.read_slice(&mut buf)?;
        let volume = get_u32(&buf, offset_of!(abi::MarkerArg, volume)).ok_or(EINVAL)?;
        let flags = get_u32(&buf, offset_of!(abi::MarkerArg, flags)).ok_or(EINVAL)?;
        let aux = get_u64(&buf, offset_of!(abi::MarkerArg, aux)).ok_or(EINVAL)?;
        // Only the flags a consumer may ask for.
        let flags = match u8::try_from(flags) {
            Ok(f) if f & !abi::FLAG_RESYNC == 0 => f,
            _ => return Err(EINVAL),
        };
        let group = self.group()?;
        group.volume_info(volume).ok_or(ENOENT)?;
        let seq = group.marker(volume, flags, aux)?;
        put_u64(&mut buf, offset_of!(abi::MarkerArg, seq), seq);
        w.write_slice(&buf)?;
        Ok(0)
    }

    fn allow_joins(&self, arg: usize) -> Result<i32> {
        // Only the attached consumer: the allowance is its own and ends
        // when it detaches.
        let group = self.group()?;
        let mut buf = [0u8; size_of::<abi::AllowJoinsArg>()];
        user_arg::<abi::AllowJoinsArg>(arg).reader().read_slice(&mut buf)?;
        let allow = match get_u32(&buf, offset_of!(abi::AllowJoinsArg, allow)) {
            Some(0) => false,
            Some(1) => true,
            _ => return Err(EINVAL),
        };
        if get_u32(&buf, offset_of!(abi::AllowJoinsArg, _reserved)) != Some(0) {
            return Err(EINVAL);
        }
        group.allow_joins(allow);
        Ok(0)
    }

    fn bitmap(&self, arg: usize) -> Result<i32> {
        let (mut r, mut w) = user_arg::<abi::BitmapArg>(arg).reader_writer();
        let mut buf = [0u8; size_of::<abi::BitmapArg>()];
        r.read_slice(&mut buf)?;
        let ubuf = get_u64(&buf, offset_of!(abi::BitmapArg, buf)).ok_or(EINVAL)?;
        let ulen = get_u64(&buf, offset_of!(abi::BitmapArg, buf_len)).ok_or(EINVAL)?;
        let index = get_u32(&buf, offset_of!(abi::BitmapArg, volume)).ok_or(EINVAL)?;
        let group = self.group()?;
        let info = group.volume_info(index).ok_or(ENOENT)?;
        let words = usize::try_from(crate::capture::words_for(info.regions))?;
        let bytes = words.checked_mul(8).ok_or(EINVAL)?;
        if usize::try_from(ulen)? < bytes {
            return Err(errno::message_size());
        }
        // Allocated before taking the ring's lock.
        let mut snap = KVVec::with_capacity(words, GFP_KERNEL)?;
        for _ in 0..words {
            snap.push(0u64, GFP_KERNEL)?;
        }
        let taken = group.take_bitmap(index, &mut snap)?;
        let copied = copy_words_out(usize::try_from(ubuf)?, &snap).and_then(|()| {
            put_u32(&mut buf, offset_of!(abi::BitmapArg, region_kib), taken.region_kib);
            put_u64(&mut buf, offset_of!(abi::BitmapArg, regions), taken.regions);
            put_u64(&mut buf, offset_of!(abi::BitmapArg, resume_seq), taken.resume_seq);
            put_u64(
                &mut buf,
                offset_of!(abi::BitmapArg, in_flight_overflow),
                taken.in_flight_overflow,
            );
            w.write_slice(&buf)
        });
        if let Err(e) = copied {
            // The caller did not get the bits: keep them dirty.
            group.untake_bitmap(index, &snap);
            return Err(e);
        }
        Ok(0)
    }
}

/// Copies bitmap words to a user buffer, a chunk at a time.
fn copy_words_out(addr: usize, words: &[u64]) -> Result {
    let mut w = UserSlice::new(addr, words.len().checked_mul(8).ok_or(EINVAL)?).writer();
    let mut chunk = [0u8; 512];
    let mut n = 0;
    for word in words {
        if let Some(dst) = chunk.get_mut(n..n + 8) {
            dst.copy_from_slice(&word.to_ne_bytes());
        }
        n += 8;
        if n == chunk.len() {
            w.write_slice(&chunk)?;
            n = 0;
        }
    }
    if n > 0 {
        w.write_slice(chunk.get(..n).ok_or(EINVAL)?)?;
    }
    Ok(())
}

/// Error codes `kernel::error::code` does not name.
mod errno {
    use kernel::bindings;
    use kernel::error::Error;

    fn code(e: u32) -> Error {
        Error::from_errno(-(e as i32))
    }

    /// The file is not attached to a ring.
    pub(super) fn not_connected() -> Error {
        code(bindings::ENOTCONN)
    }

    /// The file is attached already.
    pub(super) fn already_connected() -> Error {
        code(bindings::EISCONN)
    }

    /// The caller's buffer is too small.
    pub(super) fn message_size() -> Error {
        code(bindings::EMSGSIZE)
    }
}

fn get_u64(buf: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(buf.get(off..off + 8)?.try_into().ok()?))
}

fn get_u32(buf: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(buf.get(off..off + 4)?.try_into().ok()?))
}

fn put_u64(buf: &mut [u8], off: usize, v: u64) {
    if let Some(d) = buf.get_mut(off..off + 8) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

fn put_u32(buf: &mut [u8], off: usize, v: u32) {
    if let Some(d) = buf.get_mut(off..off + 4) {
        d.copy_from_slice(&v.to_ne_bytes());
    }
}

impl FileOps for ControlFile {
    type Shared = Registry;

    fn open(registry: &Arc<Registry>) -> Result<Self> {
        Ok(Self {
            registry: registry.clone(),
            attached: KBox::pin_init(new_spinlock!(None, "dm_replica_control_file"), GFP_KERNEL)?,
            seen: AtomicU64::new(0),
        })
    }

    fn ioctl(&self, cmd: u32, arg: usize) -> Result<i32> {
        match cmd {
            abi::IOC_ATTACH => self.attach(arg),
            abi::IOC_RELEASE => self.release(arg),
            abi::IOC_VOLUME => self.volume(arg),
            abi::IOC_BITMAP => self.bitmap(arg),
            abi::IOC_MARKER => self.marker(arg),
            abi::IOC_ALLOW_JOINS => self.allow_joins(arg),
            _ => Err(ENOTTY),
        }
    }

    fn mmap(&self, vma: &mut Vma<'_>) -> Result {
        // The file keeps the group (and so the ring memory) while mapped.
        let group = self.group()?;
        vma.map_readonly(group.mem())
    }

    fn poll(&self, table: &mut PollTable<'_>) -> u32 {
        let Ok(group) = self.group() else {
            return poll_bits::ERR;
        };
        table.wait_on(group.wait_queue());
        let mut bits = 0;
        let ev = group.events();
        if self.seen.swap(ev, Ordering::AcqRel) != ev {
            bits |= poll_bits::IN | poll_bits::RDNORM;
        }
        if group.is_dead() {
            bits |= poll_bits::HUP;
        }
        bits
    }
}

impl Drop for ControlFile {
    fn drop(&mut self) {
        let group = self.attached.lock().take();
        // Outside the spinlock: this may drop the last reference to the ring.
        if let Some(g) = group {
            g.detach_consumer();
        }
    }
}
