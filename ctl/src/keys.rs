//! Which data keys a target still needs.

use std::collections::BTreeSet;
use std::path::Path;

/// The key ids of every journaled segment, on every volume of the target
/// whose state directory is `state_dir`, that holds records not yet applied
/// (persisted): a restarted target replays exactly those and must be able
/// to open them.
pub fn needed_key_ids(state_dir: &Path) -> Result<BTreeSet<u32>, String> {
    let vols = state_dir.join("volumes");
    let rd = std::fs::read_dir(&vols).map_err(|e| {
        format!(
            "{}: {e} (is this a target's state directory?)",
            vols.display()
        )
    })?;
    let mut needed = BTreeSet::new();
    for ent in rd {
        let ent = ent.map_err(|e| format!("{}: {e}", vols.display()))?;
        let dir = ent.path();
        let state = replica_store::state::VolumeState::load(&dir.join("state.json"))
            .map_err(|e| e.to_string())?;
        let journal = dir.join("journal");
        if !journal.exists() {
            continue;
        }
        for f in replica_store::journal::frames(&journal).map_err(|e| e.to_string())? {
            if f.header.last_seq > state.applied_seq {
                needed.insert(f.header.key_id);
            }
        }
    }
    Ok(needed)
}
