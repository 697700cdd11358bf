//! Failover: the target's `failover` control command (unplanned: the
//! source is gone), the request to a stream's applier (planned ones come
//! from the stream's PROMOTE), and the applier's part — choosing the state
//! that becomes the primary, rolling back to a point if asked, promoting
//! the replica and recording the promotion and the epoch.

use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, SendTimeoutError};
use replica_control::{ErrorCode, PointChoice};
use replica_proto::msg;
use replica_store::state::{PointKind, Promotion};
use replica_store::StoreError;

use super::apply::{Applier, ApplyMsg};
use super::points::{point_id, record_point};
use super::stream::Stream;
use crate::status::{Connection, ReasonKind, ReplicaState, Role};

/// How long a failover may wait for the replica to catch up.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// A failover request.
#[derive(Debug, Clone, Copy)]
pub(super) struct PromoteReq {
    /// Planned: the old primary's last record, which must be applied; the
    /// replica is promoted as it is then.
    pub(super) planned_upto: Option<u64>,
    /// Unplanned: a recovery point's sequence, or the latest consistent
    /// state (`None`).
    pub(super) point: Option<u64>,
    /// The epoch to move to (planned: the source's; else the current + 1).
    pub(super) epoch: Option<u64>,
}

/// Why a failover did not happen.
#[derive(Debug, thiserror::Error)]
pub(super) enum PromoteError {
    /// The applier is gone.
    #[error("the applier is not running")]
    ApplierGone,
    /// The applier did not answer in time.
    #[error("the replica did not catch up within {0:?}")]
    Timeout(Duration),
    /// The stream that ran did not end.
    #[error("the current stream did not stop")]
    StreamDidNotStop,
    /// Failed over already, at another epoch.
    #[error("already failed over (epoch {epoch}, at record {point_seq})")]
    AlreadyFailedOver {
        /// The epoch of that failover.
        epoch: u64,
        /// Where it promoted.
        point_seq: u64,
    },
    /// The epoch asked for is not newer than the replica's.
    #[error("failover to epoch {epoch} but the replica is at epoch {current} already")]
    EpochNotNewer {
        /// Asked for.
        epoch: u64,
        /// The replica's.
        current: u64,
    },
    /// The epoch cannot grow any more.
    #[error("the replica is at epoch {0}, the last one: it cannot be failed over again")]
    EpochExhausted(u64),
    /// A planned failover while a resync runs.
    #[error("a resync is running: the replica is not consistent")]
    ResyncRunning,
    /// A planned failover before the old primary's last record is applied.
    #[error("the replica has applied up to record {applied} but the primary ended at {upto}")]
    NotCaughtUp {
        /// Applied here.
        applied: u64,
        /// The old primary's last record.
        upto: u64,
    },
    /// No recovery point at the record asked for.
    #[error("no recovery point at record {seq} (points: {})", list(.points))]
    NoSuchPoint {
        /// Asked for.
        seq: u64,
        /// The points' records there are.
        points: Vec<u64>,
    },
    /// The recovery point to roll back to vanished.
    #[error("no recovery point at record {0}")]
    PointGone(u64),
    /// Nothing consistent to promote.
    #[error(
        "a resync is running and no recovery point exists: nothing consistent to fail over to"
    )]
    NothingConsistent,
    /// Flushing or recording failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The backend did not promote the replica.
    #[error("promote the replica: {0}")]
    Promote(#[source] StoreError),
}

fn list(points: &[u64]) -> String {
    points
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

impl PromoteError {
    /// The control code of a failover command that ended with it.
    pub(super) fn code(&self) -> ErrorCode {
        match self {
            Self::AlreadyFailedOver { .. }
            | Self::EpochNotNewer { .. }
            | Self::EpochExhausted(_)
            | Self::ResyncRunning
            | Self::NotCaughtUp { .. }
            | Self::NothingConsistent => ErrorCode::Refused,
            Self::NoSuchPoint { .. } => ErrorCode::NotFound,
            Self::ApplierGone
            | Self::Timeout(_)
            | Self::StreamDidNotStop
            | Self::PointGone(_)
            | Self::Store(_)
            | Self::Promote(_) => ErrorCode::Failed,
        }
    }
}

/// The `failover` control command (unplanned: the source is gone) on
/// `stream`, to `point` (default: the latest consistent state).
pub(super) fn failover_command(
    stream: &Stream,
    point: Option<PointChoice>,
) -> Result<String, PromoteError> {
    let point = match point {
        None | Some(PointChoice::Latest) => None,
        Some(PointChoice::Seq(seq)) => Some(seq),
    };
    let p = unplanned_failover(stream, point)?;
    Ok(format!(
        "volume {} failed over: primary at epoch {}, recovery point at record {}, volume {}",
        stream.id, p.epoch, p.point_seq, p.device
    ))
}

/// Asks `stream`'s applier to promote the replica (no stream is accepted
/// meanwhile) and waits for the answer, calling `waiting` every `tick`
/// (a planned failover's connection keeps its source hearing from it while
/// the replica catches up).
pub(super) fn request_promotion(
    stream: &Stream,
    req: PromoteReq,
    tick: Duration,
    mut waiting: impl FnMut(),
) -> Result<msg::Promoted, PromoteError> {
    stream.lock_state().promoting = true;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let r = queue(
        stream,
        ApplyMsg::Promote { req, reply: tx },
        tick,
        &mut waiting,
    )
    .and_then(|()| {
        let deadline = Instant::now() + PROMOTE_TIMEOUT;
        loop {
            match rx.recv_timeout(tick) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Timeout) if Instant::now() < deadline => waiting(),
                Err(_) => break Err(PromoteError::Timeout(PROMOTE_TIMEOUT)),
            }
        }
    });
    if r.is_err() {
        let mut st = stream.lock_state();
        if st.disk.promoted.is_none() {
            // Not failed over after all: streams may come back.
            st.promoting = false;
        }
    }
    r
}

/// Queues `m` to the applier within [`PROMOTE_TIMEOUT`], calling `waiting`
/// every `tick` while its queue is full.
fn queue(
    stream: &Stream,
    mut m: ApplyMsg,
    tick: Duration,
    waiting: &mut impl FnMut(),
) -> Result<(), PromoteError> {
    let deadline = Instant::now() + PROMOTE_TIMEOUT;
    loop {
        match stream.apply_tx.send_timeout(m, tick) {
            Ok(()) => return Ok(()),
            Err(SendTimeoutError::Timeout(back)) if Instant::now() < deadline => {
                m = back;
                waiting();
            }
            Err(_) => return Err(PromoteError::ApplierGone),
        }
    }
}

/// An operator's failover of `stream` (the source is gone): the current
/// connection is stopped, everything journaled is applied, and the replica
/// is promoted at `point` (a recovery point's sequence) or at the latest
/// consistent state.
fn unplanned_failover(stream: &Stream, point: Option<u64>) -> Result<msg::Promoted, PromoteError> {
    stream.lock_state().promoting = true;
    // End the stream that may be running and wait until it has (it may be
    // handing its last segments to a busy applier).
    stream.conn.supersede();
    if !stream.conn.wait_idle(Instant::now() + PROMOTE_TIMEOUT) {
        stream.lock_state().promoting = false;
        return Err(PromoteError::StreamDidNotStop);
    }
    request_promotion(
        stream,
        PromoteReq {
            planned_upto: None,
            point,
            epoch: None,
        },
        PROMOTE_TIMEOUT,
        || {},
    )
}

impl Applier {
    /// Promotes the replica (failover). Planned: every record up to the old
    /// primary's last one must be applied, and no resync may be running.
    /// Unplanned: the chosen recovery point, or the latest consistent state
    /// (the applied records, or the last point while a resync runs).
    pub(super) fn promote(&mut self, req: PromoteReq) -> Result<msg::Promoted, PromoteError> {
        let (epoch_now, resyncing, last_point, existing, applied) = {
            let st = self.stream.lock_state();
            (
                st.disk.epoch,
                st.disk.resync_since.is_some(),
                st.disk.points.last().map(|p| p.seq),
                st.disk.promoted.clone(),
                st.applied,
            )
        };
        if let Some(p) = existing {
            if req.epoch == Some(p.epoch) {
                // The source asked again (its first answer was lost).
                return Ok(msg::Promoted {
                    epoch: p.epoch,
                    point_seq: p.point_seq,
                    device: p.device,
                });
            }
            return Err(PromoteError::AlreadyFailedOver {
                epoch: p.epoch,
                point_seq: p.point_seq,
            });
        }
        let epoch = match req.epoch {
            Some(e) => e,
            None => epoch_now
                .checked_add(1)
                .ok_or(PromoteError::EpochExhausted(epoch_now))?,
        };
        if epoch <= epoch_now {
            return Err(PromoteError::EpochNotNewer {
                epoch,
                current: epoch_now,
            });
        }
        // Which state becomes the primary: `None` = as applied now.
        let rollback: Option<u64> = match (req.planned_upto, req.point) {
            (Some(upto), _) => {
                if resyncing {
                    return Err(PromoteError::ResyncRunning);
                }
                if applied < upto {
                    return Err(PromoteError::NotCaughtUp { applied, upto });
                }
                None
            }
            (None, Some(seq)) => {
                let st = self.stream.lock_state();
                if !st.disk.points.iter().any(|p| p.seq == seq) {
                    return Err(PromoteError::NoSuchPoint {
                        seq,
                        points: st.disk.points.iter().map(|p| p.seq).collect(),
                    });
                }
                (Some(seq) != last_point || resyncing || applied != seq).then_some(seq)
            }
            (None, None) if resyncing => match last_point {
                Some(seq) => Some(seq),
                None => return Err(PromoteError::NothingConsistent),
            },
            (None, None) => None,
        };
        let point_seq = match rollback {
            Some(seq) => seq,
            None => {
                // Mark the promoted state as a recovery point of its own.
                self.persist_applied()?;
                if last_point != Some(applied) && applied > 0 {
                    let id = point_id(&self.stream.lock_state().disk, applied);
                    let created = self.stream.volume().replica().create_point(id);
                    if let Err(e) = created {
                        // The promoted volume is what matters: a missing
                        // snapshot of it (no space) does not stop the failover.
                        tracing::warn!(volume = %self.stream.id, error = %e, "no recovery point at the failover; promoting anyway");
                        return self.finish_promotion(req, epoch, applied, None);
                    }
                    let mut st = self.stream.lock_state();
                    record_point(&mut st.disk, id, applied, PointKind::Failover, 0, None);
                    st.save()?;
                }
                applied
            }
        };
        self.finish_promotion(req, epoch, point_seq, rollback)
    }

    /// Promotes the replica at `point_seq`, rolled back to the point of
    /// sequence `rollback` if given, and records it.
    fn finish_promotion(
        &mut self,
        req: PromoteReq,
        epoch: u64,
        point_seq: u64,
        rollback: Option<u64>,
    ) -> Result<msg::Promoted, PromoteError> {
        let point_id = match rollback {
            Some(seq) => Some(
                self.stream
                    .lock_state()
                    .disk
                    .points
                    .iter()
                    .rfind(|p| p.seq == seq)
                    .map(|p| p.id)
                    .ok_or(PromoteError::PointGone(seq))?,
            ),
            None => None,
        };
        let device = self
            .stream
            .volume()
            .replica()
            .promote(point_id)
            .map_err(PromoteError::Promote)?;
        let promotion = Promotion {
            epoch,
            point_seq,
            planned: req.planned_upto.is_some(),
            device: device.display().to_string(),
            at_ns: super::now_ns(),
        };
        {
            let mut st = self.stream.lock_state();
            st.disk.epoch = epoch;
            st.disk.applied_seq = point_seq;
            st.disk.resync_since = None;
            st.disk.promoted = Some(promotion.clone());
            st.save()?;
            st.applied = point_seq;
            st.published = point_seq;
        }
        tracing::warn!(
            volume = %self.stream.id,
            epoch,
            point = point_seq,
            device = %promotion.device,
            planned = promotion.planned,
            "failed over: the replica is the primary volume now"
        );
        self.board.update(&self.stream.id, |s| {
            s.role = Role::Primary;
            s.connection = Connection::StandAlone;
            s.replica = ReplicaState::UpToDate;
            s.reasons.clear();
            s.set_reason(
                ReasonKind::Promoted,
                format!(
                    "failed over at record {point_seq} (epoch {epoch}); the volume is {}",
                    promotion.device
                ),
            );
            s.epoch = epoch;
            s.applied_seq = point_seq;
        });
        Ok(msg::Promoted {
            epoch,
            point_seq,
            device: promotion.device,
        })
    }
}
