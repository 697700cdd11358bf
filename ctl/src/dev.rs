//! Development mode: without the kernel module, a ring file written by a
//! userspace producer stands in for `/dev/dm-replica`. `replctl dev feed`
//! captures the difference between two images of a volume as ring records,
//! exactly as the `replica` target would have captured the writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use replica_ring::{DescFields, Producer, RingError, RingParams};

use crate::error::Exit;

/// Why feeding the ring failed.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The ring file cannot be opened or created.
    #[error("{}: {source}", path.display())]
    Ring {
        /// The ring file.
        path: PathBuf,
        /// The ring's error.
        #[source]
        source: RingError,
    },
    /// A record cannot be reserved.
    #[error("capture ring: {0}")]
    Reserve(#[source] RingError),
    /// The ring stayed full until the deadline.
    #[error("ring stayed full for {0:?}: is replicad source running?")]
    Full(Duration),
    /// No random generation for a new ring.
    #[error(transparent)]
    Random(#[from] replica_proto::keys::KeyError),
}

impl DevError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::Ring {
                source: RingError::Io { source, .. },
                ..
            } => Exit::of_io(source),
            _ => Exit::Failed,
        }
    }
}

/// Block size compared and written.
const BLOCK: usize = 64 << 10;

/// Opens the ring file, or creates it (`desc_count` descriptors,
/// `data_mib` of data) if it does not exist.
pub fn open_or_create(ring: &Path, desc_count: u64, data_mib: u64) -> Result<Producer, DevError> {
    let ring_error = |source| DevError::Ring {
        path: ring.to_owned(),
        source,
    };
    if ring.exists() {
        Producer::open(ring).map_err(ring_error)
    } else {
        let generation = replica_proto::keys::random16()?;
        Producer::create(
            ring,
            RingParams {
                desc_count,
                data_granules: (data_mib << 20) / 4096,
                generation,
                first_seq: 1,
                first_granule: 0,
            },
        )
        .map_err(ring_error)
    }
}

/// Writes every block of `new` that differs from `base` (all of it when
/// there is no base) into the ring, then a flush. Waits while the ring is
/// full (the daemon drains it). Returns (records, bytes).
pub fn feed(
    p: &mut Producer,
    base: Option<&[u8]>,
    new: &[u8],
    timeout: Duration,
) -> Result<(u64, u64), DevError> {
    let now = || {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0)
    };
    let deadline = Instant::now() + timeout;
    let put = |p: &mut Producer, f: DescFields, data: &[u8]| -> Result<(), DevError> {
        loop {
            match p.reserve(f, data) {
                Ok(seq) => {
                    p.complete(seq, true);
                    return Ok(());
                }
                Err(RingError::Full) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(RingError::Full) => return Err(DevError::Full(timeout)),
                Err(e) => return Err(DevError::Reserve(e)),
            }
        }
    };
    let (mut records, mut bytes) = (0u64, 0u64);
    for (i, chunk) in new.chunks(BLOCK).enumerate() {
        let off = i * BLOCK;
        if base.is_some_and(|b| b.get(off..off + chunk.len()) == Some(chunk)) {
            continue;
        }
        let f = DescFields {
            op: ring_abi::OP_WRITE,
            sector: (off / 512) as u64,
            len: chunk.len() as u32,
            submit_ns: now(),
            ..Default::default()
        };
        put(p, f, chunk)?;
        records += 1;
        bytes += chunk.len() as u64;
    }
    put(
        p,
        DescFields {
            op: ring_abi::OP_FLUSH,
            submit_ns: now(),
            ..Default::default()
        },
        &[],
    )?;
    Ok((records + 1, bytes))
}
