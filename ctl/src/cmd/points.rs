//! `replctl points` (the recovery points a target recorded) and
//! `replctl point list/open/close` (the replica backend's snapshots).

use replica_store::replica::{PointAccess, ReplicaStore};

use crate::cli::{PointCmd, PointVolume, PointsArgs};
use crate::error::CtlError;

/// Runs `points`.
pub fn run(a: PointsArgs) -> Result<(), CtlError> {
    // A volume the target never had has no directory (a missing state
    // file alone is a volume with nothing received yet).
    let dir = a.state_dir.join("volumes").join(&a.volume);
    std::fs::read_dir(&dir).map_err(|e| CtlError::io("target volume", &dir, e))?;
    let st = replica_store::state::VolumeState::load(&dir.join("state.json"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&st.points)?);
        return Ok(());
    }
    println!(
        "{:>12}  {:<9} {:>10}  SOURCE TIME (UTC)",
        "RECORD", "KIND", "MARKER"
    );
    for p in &st.points {
        let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(p.source_time_ns))
            .map(|t| t.to_string())
            .unwrap_or_default();
        println!(
            "{:>12}  {:<9} {:>10}  {}",
            p.seq,
            format!("{:?}", p.kind).to_lowercase(),
            p.marker.map(|m| m.to_string()).unwrap_or_default(),
            t
        );
    }
    if let Some(since) = st.resync_since {
        println!("a resync is running since record {since}: the replica is inconsistent; fail over to a point above");
    }
    if let Some(p) = &st.promoted {
        println!(
            "failed over at record {} (epoch {}): the volume is {}",
            p.point_seq, p.epoch, p.device
        );
    }
    Ok(())
}

/// Runs a `point` command.
pub fn point(cmd: PointCmd) -> Result<(), CtlError> {
    match cmd {
        PointCmd::List { vol } => {
            for id in open_volume_replica(&vol)?.list_points()? {
                println!("{id}");
            }
        }
        PointCmd::Open(p) => {
            let path = open_volume_replica(&p.vol)?.open_point(p.point, access(p.writable))?;
            println!("{}", path.display());
        }
        PointCmd::Close(p) => {
            open_volume_replica(&p.vol)?.close_point(p.point, access(p.writable))?
        }
    }
    Ok(())
}

fn open_volume_replica(v: &PointVolume) -> Result<Box<dyn ReplicaStore>, CtlError> {
    let cfg = replica_config::TargetConfig::load(&v.config)?;
    let vc = cfg
        .volumes
        .iter()
        .find(|x| x.id == v.volume)
        .ok_or_else(|| CtlError::NoSuchVolume {
            volume: v.volume.clone(),
            config: v.config.clone(),
        })?;
    Ok(replicad::backend::open_replica(&cfg.state_dir, vc)?)
}

fn access(writable: bool) -> PointAccess {
    if writable {
        PointAccess::Writable
    } else {
        PointAccess::ReadOnly
    }
}
