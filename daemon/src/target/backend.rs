//! Opens a volume's replica backend from its configuration (the target
//! daemon and `replctl point` share this).

use std::path::Path;

use replica_store::replica::{FileReplica, ReplicaStore};
use replica_store::thin::{ThinOptions, ThinReplica};
use replica_store::StoreError;

use crate::config::{ReplicaConfig, TargetVolume};

/// Opens (creating if needed) the replica of volume `vc`. `state_dir` is
/// the target's state directory: the file backend keeps its points under
/// `volumes/<id>/points/`, the thin backend its pools' ledgers under
/// `thin/`.
pub fn open_replica(
    state_dir: &Path,
    vc: &TargetVolume,
) -> Result<Box<dyn ReplicaStore>, StoreError> {
    Ok(match &vc.replica {
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
    })
}
