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
    pub(super) fn current(&self) -> Result<Arc<StreamKey>, String> {
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
        let k = Arc::new(StreamKey::derive(&kr, kr.active(), &ctx).map_err(|e| e.to_string())?);
        *c = Some((v, k.clone()));
        Ok(k)
    }
}

pub(super) fn seal_worker(
    rx: Receiver<Job>,
    tx: Sender<(u64, Result<Vec<u8>, String>)>,
    key: &SessionKeys,
    level: i32,
    wake: &UnixStream,
) {
    let mut compressor = match zstd::bulk::Compressor::new(level) {
        Ok(c) => c,
        Err(e) => {
            let _ = tx.send((0, Err(format!("zstd: {e}"))));
            return;
        }
    };
    for job in rx {
        let c = job.header.counter;
        let r = key.current().and_then(|k| {
            frame::seal_with(&mut compressor, job.header, &job.plain, level, &k)
                .map_err(|e| e.to_string())
        });
        drop(job.plain);
        if tx.send((c, r)).is_err() {
            return;
        }
        let _ = (&*wake).write(&[1]);
    }
}
