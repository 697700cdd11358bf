//! The keyring of a running daemon, reloadable on SIGHUP (after `replctl
//! keys rotate`): a new active key is used from the next segment on, without
//! interrupting the stream; every key in the file stays accepted.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use replica_proto::keys::{KeyError, KeyRing};

/// A reloadable keyring.
pub struct KeyStore {
    path: PathBuf,
    current: RwLock<Arc<KeyRing>>,
    version: AtomicU64,
}

impl KeyStore {
    /// Loads the keyring file.
    pub fn load(path: &Path) -> Result<Arc<Self>, KeyError> {
        let kr = KeyRing::load(path)?;
        Ok(Arc::new(Self {
            path: path.to_owned(),
            current: RwLock::new(Arc::new(kr)),
            version: AtomicU64::new(0),
        }))
    }

    /// The keyring in force.
    pub fn get(&self) -> Arc<KeyRing> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bumped at every successful reload.
    pub fn version(&self) -> u64 {
        self.version.load(Ordering::Acquire)
    }

    /// Reads the file again. On error the keys in force stay.
    pub fn reload(&self) -> Result<(), KeyError> {
        let kr = KeyRing::load(&self.path)?;
        tracing::info!(active = kr.active(), ids = ?kr.ids(), "keyring reloaded");
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(kr);
        self.version.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }
}
