//! Which data keys a target still needs.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::error::Exit;

/// Why the keys a target needs could not be found out.
#[derive(Debug, thiserror::Error)]
pub enum NeededKeysError {
    /// The state directory has no readable `volumes` directory.
    #[error("{}: {source} (is this a target's state directory?)", path.display())]
    NotATarget {
        /// The `volumes` directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A volume's state or journal cannot be read.
    #[error(transparent)]
    Store(#[from] replica_store::StoreError),
}

impl NeededKeysError {
    /// The exit code.
    pub fn exit(&self) -> Exit {
        match self {
            Self::NotATarget { source, .. } => Exit::of_io(source),
            Self::Store(_) => Exit::Failed,
        }
    }
}

/// The key ids of every journaled segment, on every volume of the target
/// whose state directory is `state_dir`, that holds records not yet applied
/// (persisted): a restarted target replays exactly those and must be able
/// to open them.
pub fn needed_key_ids(state_dir: &Path) -> Result<BTreeSet<u32>, NeededKeysError> {
    let vols = state_dir.join("volumes");
    let not_a_target = |source| NeededKeysError::NotATarget {
        path: vols.clone(),
        source,
    };
    let rd = std::fs::read_dir(&vols).map_err(not_a_target)?;
    let mut needed = BTreeSet::new();
    for ent in rd {
        let dir = ent.map_err(not_a_target)?.path();
        let state = replica_store::state::VolumeState::load(&dir.join("state.json"))?;
        let journal = dir.join("journal");
        if !journal.exists() {
            continue;
        }
        for f in replica_store::journal::frames(&journal)? {
            if f.header.last_seq > state.applied_seq {
                needed.insert(f.header.key_id);
            }
        }
    }
    Ok(needed)
}
