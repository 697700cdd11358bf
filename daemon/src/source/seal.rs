//! Sealing workers: compress and encrypt batches of records into segments
//! with the session's stream key (following key rotation).

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use replica_proto::frame::{self, SegmentHeader};
use replica_proto::keys::{Direction, StreamContext, StreamKey};

use crate::keystore::KeyStore;

/// A batch of records to seal.
pub(super) struct Job {
    pub(super) header: SegmentHeader,
    pub(super) plain: Vec<u8>,
}

/// Why a batch could not be sealed.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    /// The compressor could not be created.
    #[error("zstd: {0}")]
    Zstd(#[source] std::io::Error),
    /// The stream key could not be derived.
    #[error(transparent)]
    Key(#[from] replica_proto::keys::KeyError),
    /// Sealing the frame failed.
    #[error(transparent)]
    Frame(#[from] replica_proto::frame::FrameError),
    /// The records do not make one segment.
    #[error("records {first}..={last} do not make one segment")]
    TooMany {
        /// First record.
        first: u64,
        /// Last record.
        last: u64,
    },
}

/// The stream key of a session, following the active key of the keyring:
/// after a reload the next segment is sealed with the new key (same stream,
/// counter going on), so rotation does not interrupt replication.
pub(super) struct SessionKeys {
    pub(super) store: Arc<KeyStore>,
    pub(super) stream_id: [u8; 16],
    pub(super) volume: String,
    pub(super) epoch: u64,
    pub(super) cache: std::sync::Mutex<Option<(u64, Arc<StreamKey>)>>,
}

impl SessionKeys {
    pub(super) fn current(&self) -> Result<Arc<StreamKey>, replica_proto::keys::KeyError> {
        let v = self.store.version();
        let mut c = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((cv, k)) = c.as_ref() {
            if *cv == v {
                return Ok(k.clone());
            }
        }
        let kr = self.store.get();
        let ctx = StreamContext {
            stream_id: self.stream_id,
            volume: &self.volume,
            direction: Direction::Forward,
            epoch: self.epoch,
        };
        let k = Arc::new(StreamKey::derive(&kr, kr.active(), &ctx)?);
        *c = Some((v, k.clone()));
        Ok(k)
    }
}

pub(super) fn seal_worker(
    rx: Receiver<Job>,
    tx: Sender<(u64, Result<Vec<u8>, SealError>)>,
    key: &SessionKeys,
    level: i32,
    wake: &UnixStream,
) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send((0, Err(SealError::Zstd(e))));
            return;
        }
    };
    for job in rx {
        let c = job.header.counter;
        let r = key.current().map_err(SealError::Key).and_then(|k| {
            Ok(frame::seal_with(
                &mut compressor,
                job.header,
                &job.plain,
                level,
                &k,
            )?)
        });
        drop(job.plain);
        if tx.send((c, r)).is_err() {
            return;
        }
        let _ = (&*wake).write(&[1]);
    }
}
