//! The bytes of one ioctl: a `struct dm_ioctl` header and what follows it
//! (target specs with their parameters, a target message), and the decoding
//! of the kernel's reply. Plain byte work at the offsets of the layouts in
//! [`crate::sys`]; no `unsafe`.

use std::mem::offset_of;

use crate::sys::{DmIoctl, DmTargetMsg, DmTargetSpec, HEADER, MAX_TYPE_NAME, NAME_LEN, VERSION};
use crate::table::{Table, Target};

/// What the kernel interface cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unencodable {
    /// A device name that is empty, too long or has a NUL or `/`.
    #[error("invalid device name (1 to {} bytes, no NUL or '/')", NAME_LEN - 1)]
    Name,
    /// A target type name that is empty, too long or has a NUL.
    #[error("invalid target type {0:?} (1 to {max} bytes, no NUL)", max = MAX_TYPE_NAME - 1)]
    TargetType(String),
    /// A string (parameters, message) with a NUL byte in it.
    #[error("a NUL byte in {0:?}")]
    Nul(String),
    /// More than the 32-bit sizes of the interface.
    #[error("request too large")]
    TooLarge,
}

/// Why a reply cannot be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadReply {
    /// `data_start`/`data_size` outside the buffer.
    #[error("data offsets outside the buffer")]
    Offsets,
    /// A target spec (or its `next` link) outside the data.
    #[error("target {0} outside the data")]
    Target(u32),
    /// A string without its terminating NUL.
    #[error("unterminated string")]
    Unterminated,
    /// The answer did not fit the buffer given.
    #[error("the answer does not fit in {0} bytes")]
    Full(usize),
}

/// One ioctl's buffer.
#[derive(Debug, Clone)]
pub struct Request {
    buf: Vec<u8>,
}

fn put_u32(buf: &mut [u8], at: usize, v: u32) {
    buf[at..at + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put_u64(buf: &mut [u8], at: usize, v: u64) {
    buf[at..at + 8].copy_from_slice(&v.to_ne_bytes());
}

fn get_u32(buf: &[u8], at: usize) -> Option<u32> {
    let b = buf.get(at..at + 4)?;
    Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
}

fn get_u64(buf: &[u8], at: usize) -> Option<u64> {
    let b: [u8; 8] = buf.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_ne_bytes(b))
}

/// The string up to its NUL in `bytes`.
fn c_str(bytes: &[u8]) -> Result<String, BadReply> {
    let end = bytes
        .iter()
        .position(|&b| b == 0)
        .ok_or(BadReply::Unterminated)?;
    Ok(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

fn align8(n: usize) -> usize {
    n.next_multiple_of(8)
}

fn check_no_nul(s: &str) -> Result<(), Unencodable> {
    if s.as_bytes().contains(&0) {
        return Err(Unencodable::Nul(s.to_owned()));
    }
    Ok(())
}

impl Request {
    /// A request for device `name` with `flags`, and no data yet.
    pub fn new(name: &str, flags: u32) -> Result<Self, Unencodable> {
        if name.is_empty() || name.len() >= NAME_LEN || name.contains(['\0', '/']) {
            return Err(Unencodable::Name);
        }
        let mut buf = vec![0u8; HEADER];
        for (i, v) in VERSION.iter().enumerate() {
            put_u32(&mut buf, offset_of!(DmIoctl, version) + 4 * i, *v);
        }
        put_u32(&mut buf, offset_of!(DmIoctl, data_start), HEADER as u32);
        put_u32(&mut buf, offset_of!(DmIoctl, flags), flags);
        let at = offset_of!(DmIoctl, name);
        buf[at..at + name.len()].copy_from_slice(name.as_bytes());
        let mut r = Self { buf };
        r.sync_size()?;
        Ok(r)
    }

    fn sync_size(&mut self) -> Result<(), Unencodable> {
        let n = u32::try_from(self.buf.len()).map_err(|_| Unencodable::TooLarge)?;
        put_u32(&mut self.buf, offset_of!(DmIoctl, data_size), n);
        Ok(())
    }

    /// Appends the targets of `table` (for `DM_TABLE_LOAD`).
    pub fn with_table(mut self, table: &Table) -> Result<Self, Unencodable> {
        for t in &table.targets {
            if t.target_type.is_empty()
                || t.target_type.len() >= MAX_TYPE_NAME
                || t.target_type.contains('\0')
            {
                return Err(Unencodable::TargetType(t.target_type.clone()));
            }
            check_no_nul(&t.params)?;
            let start = self.buf.len();
            let size = align8(size_of::<DmTargetSpec>() + t.params.len() + 1);
            self.buf.resize(start + size, 0);
            let b = &mut self.buf[start..];
            put_u64(b, offset_of!(DmTargetSpec, sector_start), t.start);
            put_u64(b, offset_of!(DmTargetSpec, length), t.length);
            // On load, `next` is the distance to the next spec.
            put_u32(b, offset_of!(DmTargetSpec, next), size as u32);
            let ty = offset_of!(DmTargetSpec, target_type);
            b[ty..ty + t.target_type.len()].copy_from_slice(t.target_type.as_bytes());
            let p = size_of::<DmTargetSpec>();
            b[p..p + t.params.len()].copy_from_slice(t.params.as_bytes());
        }
        let n = u32::try_from(table.targets.len()).map_err(|_| Unencodable::TooLarge)?;
        put_u32(&mut self.buf, offset_of!(DmIoctl, target_count), n);
        self.sync_size()?;
        Ok(self)
    }

    /// Appends a message to sector `sector` (for `DM_TARGET_MSG`) and room
    /// for at least `reply_room` bytes of answer.
    pub fn with_message(
        mut self,
        sector: u64,
        message: &str,
        reply_room: usize,
    ) -> Result<Self, Unencodable> {
        check_no_nul(message)?;
        let start = self.buf.len();
        let size = align8(size_of::<DmTargetMsg>() + message.len() + 1).max(reply_room);
        self.buf.resize(start + size, 0);
        put_u64(
            &mut self.buf[start..],
            offset_of!(DmTargetMsg, sector),
            sector,
        );
        let m = start + size_of::<DmTargetMsg>();
        self.buf[m..m + message.len()].copy_from_slice(message.as_bytes());
        self.sync_size()?;
        Ok(self)
    }

    /// Adds `room` zero bytes for the kernel to answer in.
    pub fn with_room(mut self, room: usize) -> Result<Self, Unencodable> {
        self.buf.resize(self.buf.len() + room, 0);
        self.sync_size()?;
        Ok(self)
    }

    /// The bytes handed to the kernel (which it overwrites with its reply).
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.buf
    }

    /// The bytes of the request or reply.
    #[cfg(test)]
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// The reply's flags.
    pub fn flags(&self) -> u32 {
        get_u32(&self.buf, offset_of!(DmIoctl, flags)).unwrap_or(0)
    }

    /// The reply's device number (`huge_encode_dev` of the kernel, which
    /// is glibc's encoding).
    pub fn dev(&self) -> u64 {
        get_u64(&self.buf, offset_of!(DmIoctl, dev)).unwrap_or(0)
    }

    /// The reply's count of openers.
    pub fn open_count(&self) -> i32 {
        get_u32(&self.buf, offset_of!(DmIoctl, open_count)).unwrap_or(0) as i32
    }

    /// The reply's data: from `data_start` to `data_size`.
    fn data(&self) -> Result<&[u8], BadReply> {
        let start = get_u32(&self.buf, offset_of!(DmIoctl, data_start)).ok_or(BadReply::Offsets)?;
        let size = get_u32(&self.buf, offset_of!(DmIoctl, data_size)).ok_or(BadReply::Offsets)?;
        self.buf
            .get(start as usize..size as usize)
            .ok_or(BadReply::Offsets)
    }

    /// The targets of a `DM_TABLE_STATUS` reply (their parameters are the
    /// table's or the status's).
    pub fn targets(&self) -> Result<Table, BadReply> {
        let data = self.data()?;
        let count = get_u32(&self.buf, offset_of!(DmIoctl, target_count)).unwrap_or(0);
        let mut targets = Vec::new();
        let mut at = 0usize;
        for i in 0..count {
            let spec = data
                .get(at..at + size_of::<DmTargetSpec>())
                .ok_or(BadReply::Target(i))?;
            let field = |off| get_u64(spec, off).ok_or(BadReply::Target(i));
            let ty = offset_of!(DmTargetSpec, target_type);
            let target_type = c_str(&spec[ty..ty + MAX_TYPE_NAME])?;
            let params = c_str(&data[at + size_of::<DmTargetSpec>()..])?;
            targets.push(Target {
                start: field(offset_of!(DmTargetSpec, sector_start))?,
                length: field(offset_of!(DmTargetSpec, length))?,
                target_type,
                params,
            });
            // On status, `next` is the offset of the next spec from the
            // start of the data.
            let next = get_u32(spec, offset_of!(DmTargetSpec, next)).ok_or(BadReply::Target(i))?;
            if i + 1 < count && (next as usize) <= at {
                return Err(BadReply::Target(i + 1));
            }
            at = next as usize;
        }
        Ok(Table { targets })
    }

    /// The answer of a `DM_TARGET_MSG` reply ("" when the target wrote
    /// none).
    pub fn message_reply(&self) -> Result<String, BadReply> {
        if self.flags() & crate::sys::DATA_OUT_FLAG == 0 {
            return Ok(String::new());
        }
        c_str(self.data()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u32_at(b: &[u8], at: usize) -> u32 {
        get_u32(b, at).expect("in range")
    }

    #[test]
    fn a_request_carries_version_name_flags_and_its_size() {
        let r = Request::new("pool", 0x12).expect("request");
        let b = r.bytes();
        assert_eq!(b.len(), HEADER);
        assert_eq!(u32_at(b, 0), 4, "major version");
        assert_eq!(u32_at(b, offset_of!(DmIoctl, data_size)), HEADER as u32);
        assert_eq!(u32_at(b, offset_of!(DmIoctl, data_start)), HEADER as u32);
        assert_eq!(u32_at(b, offset_of!(DmIoctl, flags)), 0x12);
        let n = offset_of!(DmIoctl, name);
        assert_eq!(&b[n..n + 5], b"pool\0");
        for bad in ["", "a/b", "a\0b", &"x".repeat(NAME_LEN)] {
            assert_eq!(
                Request::new(bad, 0).err(),
                Some(Unencodable::Name),
                "{bad:?}"
            );
        }
        assert!(Request::new(&"x".repeat(NAME_LEN - 1), 0).is_ok());
    }

    #[test]
    fn a_table_is_laid_out_as_the_kernel_reads_it() {
        let table: Table = "0 8 linear 8:0 0\n8 16 error".parse().expect("table");
        let r = Request::new("v", 0)
            .and_then(|r| r.with_table(&table))
            .expect("request");
        let b = r.bytes();
        assert_eq!(u32_at(b, offset_of!(DmIoctl, target_count)), 2);
        assert_eq!(u32_at(b, offset_of!(DmIoctl, data_size)) as usize, b.len());
        let first = &b[HEADER..];
        assert_eq!(get_u64(first, 0), Some(0));
        assert_eq!(get_u64(first, 8), Some(8));
        let next = u32_at(first, offset_of!(DmTargetSpec, next)) as usize;
        assert_eq!(next % 8, 0, "specs are 8-byte aligned");
        assert_eq!(next, align8(40 + "8:0 0".len() + 1));
        assert_eq!(&first[16 + 8..16 + 8 + 7], b"linear\0");
        assert_eq!(&first[40..46], b"8:0 0\0");
        let second = &first[next..];
        assert_eq!(get_u64(second, 0), Some(8));
        assert_eq!(get_u64(second, 8), Some(16));
        assert_eq!(&second[24..30], b"error\0");
        assert_eq!(second[40], 0, "empty parameters");
        let long = Table::from(Target::new(0, 1, &"t".repeat(MAX_TYPE_NAME), ""));
        assert!(matches!(
            Request::new("v", 0).and_then(|r| r.with_table(&long)),
            Err(Unencodable::TargetType(_))
        ));
        let nul = Table::from(Target::new(0, 1, "linear", "a\0b"));
        assert!(matches!(
            Request::new("v", 0).and_then(|r| r.with_table(&nul)),
            Err(Unencodable::Nul(_))
        ));
    }

    #[test]
    fn a_message_has_its_sector_text_and_room_for_the_answer() {
        let r = Request::new("pool", 0)
            .and_then(|r| r.with_message(0, "create_snap 5 1", 4096))
            .expect("request");
        let b = r.bytes();
        assert_eq!(b.len(), HEADER + 4096);
        assert_eq!(u32_at(b, offset_of!(DmIoctl, data_size)) as usize, b.len());
        assert_eq!(get_u64(b, HEADER), Some(0));
        assert_eq!(&b[HEADER + 8..HEADER + 8 + 16], b"create_snap 5 1\0");
    }

    /// Writes a reply the way the kernel does: the header's counts and
    /// offsets, specs whose `next` counts from the start of the data.
    fn status_reply(targets: &[(u64, u64, &str, &str)], flags: u32) -> Request {
        let mut r = Request::new("pool", 0)
            .and_then(|r| r.with_room(1024))
            .expect("request");
        let data_start = HEADER + 8; // The kernel may start the data later.
        let b = r.bytes_mut();
        put_u32(b, offset_of!(DmIoctl, data_start), data_start as u32);
        put_u32(b, offset_of!(DmIoctl, target_count), targets.len() as u32);
        put_u32(b, offset_of!(DmIoctl, flags), flags);
        let mut at = 0;
        for (start, len, ty, params) in targets {
            let s = &mut b[data_start + at..];
            put_u64(s, 0, *start);
            put_u64(s, 8, *len);
            s[24..24 + ty.len()].copy_from_slice(ty.as_bytes());
            s[40..40 + params.len()].copy_from_slice(params.as_bytes());
            s[40 + params.len()] = 0;
            at = align8(at + 40 + params.len() + 1);
            put_u32(s, offset_of!(DmTargetSpec, next), at as u32);
        }
        put_u32(b, offset_of!(DmIoctl, data_size), (data_start + at) as u32);
        r
    }

    #[test]
    fn table_status_replies_decode_into_targets() {
        let r = status_reply(
            &[
                (0, 8192, "thin-pool", "1 12/1024 0/64 - rw"),
                (8192, 8, "error", ""),
            ],
            0,
        );
        let t = r.targets().expect("decode");
        assert_eq!(
            t.targets,
            vec![
                Target::new(0, 8192, "thin-pool", "1 12/1024 0/64 - rw"),
                Target::new(8192, 8, "error", ""),
            ]
        );
        assert_eq!(
            status_reply(&[], 0).targets().expect("empty").targets,
            vec![]
        );
        // A count the data cannot hold is an error, not a guess.
        let mut r = status_reply(&[(0, 8, "error", "")], 0);
        put_u32(r.bytes_mut(), offset_of!(DmIoctl, target_count), 3);
        assert!(matches!(r.targets(), Err(BadReply::Target(_))));
    }

    #[test]
    fn a_message_reply_is_read_only_when_the_kernel_flags_one() {
        let mut r = Request::new("r0", 0)
            .and_then(|r| r.with_message(0, "marker 7", 256))
            .expect("request");
        // Without DM_DATA_OUT_FLAG the buffer still holds the message.
        assert_eq!(r.message_reply().expect("none"), "");
        let b = r.bytes_mut();
        b[HEADER..HEADER + 17].copy_from_slice(b"marker 7 seq 42\n\0");
        put_u32(b, offset_of!(DmIoctl, flags), crate::sys::DATA_OUT_FLAG);
        assert_eq!(r.message_reply().expect("reply"), "marker 7 seq 42\n");
        put_u32(r.bytes_mut(), offset_of!(DmIoctl, data_start), 1 << 30);
        assert_eq!(r.message_reply(), Err(BadReply::Offsets));
    }
}
