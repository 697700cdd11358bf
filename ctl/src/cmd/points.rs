//! `replctl points` (the recovery points a target recorded) and
//! `replctl point list/open/close` (the replica backend's snapshots, through
//! the target daemon that holds the replica; directly only when none runs).

use std::path::PathBuf;
use std::time::Duration;

use replica_control::{Command, ControlError, Request, Response};
use replica_store::replica::PointAccess;

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

/// How long a point command may take in the daemon (a writable copy on
/// the file backend is a whole copy of the volume where the filesystem has
/// no reflinks).
const POINT_TIMEOUT: Duration = Duration::from_secs(1800);

/// What a point command gave.
enum PointAnswer {
    /// `list`: snapshot ids, ascending.
    Points(Vec<u64>),
    /// `open`: the device or file.
    Opened(PathBuf),
    /// `close`.
    Closed,
}

/// Runs a `point` command: through the target daemon that holds the
/// replica, or, when none answers on its control socket, on the replica
/// opened here (and says so).
pub fn point(cmd: PointCmd) -> Result<(), CtlError> {
    let vol = match &cmd {
        PointCmd::List { vol } => vol,
        PointCmd::Open(p) | PointCmd::Close(p) => &p.vol,
    };
    let cfg = replica_config::TargetConfig::load(&vol.config)?;
    let sock = cfg
        .control_socket
        .clone()
        .unwrap_or_else(|| replica_control::default_path(&cfg.state_dir));
    let req = Request::new(command(&cmd)).for_volume(Some(&vol.volume));
    let answer = match replica_control::send(&sock, &req, POINT_TIMEOUT) {
        Ok(r) => from_daemon(&cmd, r)?,
        Err(ControlError::NotRunning { .. }) => {
            eprintln!(
                "replctl: no target daemon answers on {}: opening the replica directly",
                sock.display()
            );
            directly(&cfg, vol, &cmd)?
        }
        Err(e) => return Err(e.into()),
    };
    match answer {
        PointAnswer::Points(ids) => {
            for id in ids {
                println!("{id}");
            }
        }
        PointAnswer::Opened(path) => println!("{}", path.display()),
        PointAnswer::Closed => {}
    }
    Ok(())
}

/// The control command of a point command.
fn command(cmd: &PointCmd) -> Command {
    match cmd {
        PointCmd::List { .. } => Command::PointList,
        PointCmd::Open(p) => Command::PointOpen {
            point: p.point,
            writable: p.writable,
        },
        PointCmd::Close(p) => Command::PointClose {
            point: p.point,
            writable: p.writable,
        },
    }
}

/// What the daemon's answer says.
fn from_daemon(cmd: &PointCmd, r: Response) -> Result<PointAnswer, CtlError> {
    let incomplete = |field| CtlError::Incomplete {
        command: command(cmd).name(),
        field,
    };
    Ok(match cmd {
        PointCmd::List { .. } => PointAnswer::Points(r.points.ok_or(incomplete("points"))?),
        PointCmd::Open(_) => PointAnswer::Opened(r.path.ok_or(incomplete("path"))?),
        PointCmd::Close(_) => PointAnswer::Closed,
    })
}

/// Runs a point command on the replica opened here (no daemon holds it).
fn directly(
    cfg: &replica_config::TargetConfig,
    v: &PointVolume,
    cmd: &PointCmd,
) -> Result<PointAnswer, CtlError> {
    let vc = cfg
        .volumes
        .iter()
        .find(|x| x.id == v.volume)
        .ok_or_else(|| CtlError::NoSuchVolume {
            volume: v.volume.clone(),
            config: v.config.clone(),
        })?;
    // Owned here while it is open: a daemon starting meanwhile waits for
    // it (up to replicad's STATE_LOCK_WAIT), and one that runs but did not
    // answer is not raced.
    let _owned = replica_fs::DirLock::try_lock(&cfg.state_dir)?
        .ok_or_else(|| CtlError::StateDirBusy(cfg.state_dir.join(replica_fs::LOCK_FILE)))?;
    let mut replica = replica_store::backend::open_replica(&cfg.state_dir, vc)?;
    Ok(match cmd {
        PointCmd::List { .. } => PointAnswer::Points(replica.list_points()?),
        PointCmd::Open(p) => PointAnswer::Opened(replica.open_point(p.point, access(p.writable))?),
        PointCmd::Close(p) => {
            replica.close_point(p.point, access(p.writable))?;
            PointAnswer::Closed
        }
    })
}

fn access(writable: bool) -> PointAccess {
    if writable {
        PointAccess::Writable
    } else {
        PointAccess::ReadOnly
    }
}
