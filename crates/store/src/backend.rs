//! Opens a volume's replica backend from its configuration: the target
//! daemon at start-up and, when no daemon runs, `replctl point`. Opening
//! runs the backend's start-up recovery (the thin backend resumes a replica
//! left suspended, finishes an interrupted switch, deletes devices left for
//! later; the file backend deletes partial images), so one process at a
//! time may hold a replica open.

use std::path::Path;

use replica_config::{ReplicaConfig, TargetVolume};

use crate::replica::{FileReplica, ReplicaStore};
use crate::thin::{ThinOptions, ThinReplica};
use crate::StoreError;

/// Opens (creating if needed) the replica of volume `vc`, running the
/// backend's start-up recovery. `state_dir` is the target's state
/// directory: the file backend keeps its points under
/// `volumes/<id>/points/`, the thin backend its pools' ledgers under
/// `thin/`.
pub fn open_replica(
    state_dir: &Path,
    vc: &TargetVolume,
) -> Result<Box<dyn ReplicaStore>, StoreError> {
    let replica: Box<dyn ReplicaStore> = match &vc.replica {
        ReplicaConfig::File { path } => Box::new(FileReplica::open(
            path,
            vc.size,
            &state_dir.join("volumes").join(&vc.id).join("points"),
        )?),
        ReplicaConfig::Thin(t) => Box::new(ThinReplica::open(
            &ThinOptions {
                pool: t.pool.clone(),
                device_id: t.device_id,
                name: t.name(&vc.id),
                low_water_percent: t.low_water_percent,
            },
            &vc.id,
            vc.size,
            &state_dir.join("thin"),
        )?),
    };
    tracing::info!(volume = %vc.id, "replica opened (start-up recovery done)");
    Ok(replica)
}
