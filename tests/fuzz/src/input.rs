//! Splitting one fuzz input into the fields and sections a target needs.
//!
//! Targets that take more than one byte string (several files, a control
//! block and a payload) read them with a [`Reader`]: fixed-size fields, then
//! sections framed as `len: u32 LE` followed by up to `len` bytes. A short
//! input reads as zeros and empty sections, so every input means something
//! and the mutator can change a length without making the rest unreadable.
//! [`Writer`] builds the same layout (for the seed corpus).

/// Reads fields and sections from the front of a fuzz input.
#[derive(Debug, Clone)]
pub struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    /// A reader over `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self { rest: data }
    }

    /// `N` bytes, zero-padded if the input ends first.
    pub fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut a = [0u8; N];
        let n = N.min(self.rest.len());
        a[..n].copy_from_slice(&self.rest[..n]);
        self.rest = &self.rest[n..];
        a
    }

    /// One byte (0 past the end).
    pub fn u8(&mut self) -> u8 {
        self.array::<1>()[0]
    }

    /// A little-endian `u32` (zero-padded).
    pub fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.array())
    }

    /// A little-endian `u64` (zero-padded).
    pub fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.array())
    }

    /// A section: a `u32` length, then that many bytes (fewer if the input
    /// ends first).
    pub fn section(&mut self) -> &'a [u8] {
        let len = self.u32() as usize;
        self.take(len)
    }

    /// Up to `n` bytes.
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let n = n.min(self.rest.len());
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        a
    }

    /// Everything not read yet.
    pub fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.rest)
    }

    /// Whether the input is used up.
    pub fn is_empty(&self) -> bool {
        self.rest.is_empty()
    }
}

/// Builds an input in the layout [`Reader`] reads.
#[derive(Debug, Default, Clone)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty input.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends raw bytes (fixed-size fields).
    pub fn bytes(mut self, b: &[u8]) -> Self {
        self.buf.extend_from_slice(b);
        self
    }

    /// Appends one byte.
    pub fn u8(self, v: u8) -> Self {
        self.bytes(&[v])
    }

    /// Appends a little-endian `u32`.
    pub fn u32(self, v: u32) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    pub fn u64(self, v: u64) -> Self {
        self.bytes(&v.to_le_bytes())
    }

    /// Appends a section (its length, then its bytes).
    pub fn section(self, b: &[u8]) -> Self {
        let len = u32::try_from(b.len()).expect("section larger than 4 GiB");
        self.u32(len).bytes(b)
    }

    /// The input.
    pub fn finish(self) -> Vec<u8> {
        self.buf
    }
}

/// A scratch directory for targets that need files, on tmpfs when the
/// host has `/dev/shm` (the file-backed targets then cost no disk I/O).
pub fn scratch_dir() -> tempfile::TempDir {
    let shm = std::path::Path::new("/dev/shm");
    let b = tempfile::Builder::new()
        .prefix("replica-fuzz.")
        .tempdir_in(shm);
    match b {
        Ok(d) => d,
        Err(_) => tempfile::Builder::new()
            .prefix("replica-fuzz.")
            .tempdir()
            .expect("create a scratch directory"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_short_input_reads_as_zeros_and_empty_sections() {
        let data = Writer::new()
            .u8(7)
            .section(b"abc")
            .u32(100)
            .bytes(b"xy")
            .finish();
        let mut r = Reader::new(&data);
        assert_eq!(r.u8(), 7);
        assert_eq!(r.section(), b"abc");
        // Declares 100 bytes, holds 2.
        assert_eq!(r.section(), b"xy");
        assert!(r.is_empty());
        assert_eq!(r.u64(), 0);
        assert_eq!(r.section(), b"");
    }
}
