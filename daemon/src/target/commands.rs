//! The target's control commands: which stream a request is about, the
//! unplanned `failover` (see `promote`), and `point-list`, `point-open`,
//! `point-close` on the replica the stream holds — opened once, at
//! start-up, so the backend's start-up recovery runs in this process only
//! (`replctl point` asks here instead of opening the replica itself).

use std::collections::HashMap;
use std::sync::Arc;

use replica_control::{Command, ErrorCode};
use replica_store::replica::PointAccess;
use replica_store::StoreError;

use super::promote::{failover_command, PromoteError};
use super::stream::Stream;
use crate::control::{CommandFailure, Reply};

/// Why a target's control command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommandError {
    /// No such volume here.
    #[error("no volume {0:?} here")]
    NoSuchVolume(String),
    /// No volume at all.
    #[error("no volume")]
    NoVolume,
    /// Several volumes and none named.
    #[error("several volumes: name one (--volume)")]
    WhichVolume,
    /// The failover did not happen.
    #[error(transparent)]
    Failover(#[from] PromoteError),
    /// The replica backend did not list, open or close a point.
    #[error("volume {volume}: {what}: {source}")]
    Point {
        /// The volume.
        volume: String,
        /// What was asked (`open point 7`, ...).
        what: String,
        /// The backend's error.
        #[source]
        source: StoreError,
    },
}

impl CommandFailure for CommandError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NoSuchVolume(_) | Self::NoVolume => ErrorCode::NotFound,
            Self::WhichVolume => ErrorCode::Refused,
            Self::Failover(e) => e.code(),
            Self::Point {
                source: StoreError::NoSuchPoint(_),
                ..
            } => ErrorCode::NotFound,
            Self::Point { .. } => ErrorCode::Failed,
        }
    }
}

/// Runs `command` about `volume` (default: the only one); `None` if it is
/// not a target's command.
pub(super) fn handle(
    streams: &HashMap<String, Arc<Stream>>,
    volume: Option<&str>,
    command: &Command,
) -> Option<Result<Reply, CommandError>> {
    let stream = || stream_for(streams, volume);
    Some(match *command {
        Command::Failover { point } => {
            stream().and_then(|s| Ok(Reply::Done(failover_command(s, point)?)))
        }
        Command::PointList => stream().and_then(list_points),
        Command::PointOpen { point, writable } => {
            stream().and_then(|s| open_point(s, point, writable))
        }
        Command::PointClose { point, writable } => {
            stream().and_then(|s| close_point(s, point, writable))
        }
        Command::Status
        | Command::Resync { .. }
        | Command::Verify { .. }
        | Command::InitialCopy
        | Command::FailoverPlanned
        | Command::Stop => return None,
    })
}

/// `point-list`: the snapshots the replica backend holds.
fn list_points(s: &Stream) -> Result<Reply, CommandError> {
    let points = s.volume().replica().list_points();
    points
        .map(Reply::Points)
        .map_err(|e| point_error(s, "list points".into(), e))
}

/// `point-open`: makes the point (or a writable copy) readable.
fn open_point(s: &Stream, point: u64, writable: bool) -> Result<Reply, CommandError> {
    let opened = s.volume().replica().open_point(point, access(writable));
    opened
        .map(Reply::Opened)
        .map_err(|e| point_error(s, format!("open {}", what(point, writable)), e))
}

/// `point-close`: undoes `point-open`.
fn close_point(s: &Stream, point: u64, writable: bool) -> Result<Reply, CommandError> {
    let closed = s.volume().replica().close_point(point, access(writable));
    closed
        .map(|()| Reply::Done(format!("{} of {} closed", what(point, writable), s.id)))
        .map_err(|e| point_error(s, format!("close {}", what(point, writable)), e))
}

/// The stream a request is about.
fn stream_for<'a>(
    streams: &'a HashMap<String, Arc<Stream>>,
    volume: Option<&str>,
) -> Result<&'a Stream, CommandError> {
    match volume {
        Some(v) => streams
            .get(v)
            .map(|s| &**s)
            .ok_or_else(|| CommandError::NoSuchVolume(v.to_owned())),
        None if streams.len() == 1 => streams
            .values()
            .next()
            .map(|s| &**s)
            .ok_or(CommandError::NoVolume),
        None if streams.is_empty() => Err(CommandError::NoVolume),
        None => Err(CommandError::WhichVolume),
    }
}

fn point_error(s: &Stream, what: String, source: StoreError) -> CommandError {
    CommandError::Point {
        volume: s.id.clone(),
        what,
        source,
    }
}

/// `point 7` or `the writable copy of point 7`.
fn what(point: u64, writable: bool) -> String {
    if writable {
        format!("the writable copy of point {point}")
    } else {
        format!("point {point}")
    }
}

fn access(writable: bool) -> PointAccess {
    if writable {
        PointAccess::Writable
    } else {
        PointAccess::ReadOnly
    }
}
