//! Failover: the target's `failover` control command (unplanned: the
//! source is gone), the request to a stream's applier (planned ones come
//! from the stream's PROMOTE), and the applier's part — choosing the state
//! that becomes the primary, rolling back to a point if asked, promoting
//! the replica and recording the promotion and the epoch.
//!
//! A request is queued behind every segment before it, and is also
//! recorded in the stream's state ([`PendingFailover`]) from the start, so
//! an applier that retries a replica write (a full pool) knows one waits:
//! an unplanned failover makes it give up the retried segment and every
//! one queued after it (they stay journaled, unapplied) and promote the
//! replica as it is; a planned one, which needs every record applied, is
//! refused at once with the replica's error instead of waiting.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, SendTimeoutError};

use replica_control::{ErrorCode, PointChoice};
use replica_proto::msg;
use replica_store::state::{PointKind, Promotion};
use replica_store::StoreError;

use super::apply::{Applier, ApplyMsg};
use super::points::{point_id, record_point};
use super::stream::{Stream, StreamState};
use crate::status::{Connection, ReasonKind, ReplicaState, Role};

/// How long a failover may wait for the replica to catch up.
const PROMOTE_TIMEOUT: Duration = Duration::from_secs(600);

/// How often a requester waiting for the applier looks at its request.
const POLL: Duration = Duration::from_millis(50);

/// Numbers the failover requests, so the applier takes up only the one
/// still pending.
static REQUESTS: AtomicU64 = AtomicU64::new(1);

/// A failover request waiting for the applier, in the stream's state.
pub(super) struct PendingFailover {
    /// Which request.
    id: u64,
    /// Planned: every record up to the old primary's last must be applied.
    planned: bool,
    /// The applier's refusal of a planned one, for its requester.
    refused: Option<PromoteError>,
}

impl StreamState {
    /// An unplanned failover waits: a retrying applier gives way to it.
    pub(super) fn unplanned_failover_waiting(&self) -> bool {
        self.failover.as_ref().is_some_and(|f| !f.planned)
    }

    /// A planned failover waits and was not refused yet.
    pub(super) fn planned_failover_waiting(&self) -> bool {
        self.failover
            .as_ref()
            .is_some_and(|f| f.planned && f.refused.is_none())
    }

    /// Refuses the planned failover waiting, if any, with `e`.
    pub(super) fn refuse_planned_failover(&mut self, e: PromoteError) {
        if let Some(f) = self.failover.as_mut().filter(|f| f.planned) {
            f.refused.get_or_insert(e);
        }
    }

    /// The applier takes request `id` up: true if it is the one pending
    /// (and not refused); it is no longer pending then.
    pub(super) fn take_failover(&mut self, id: u64) -> bool {
        let ours = self
            .failover
            .as_ref()
            .is_some_and(|f| f.id == id && f.refused.is_none());
        if ours {
            self.failover = None;
        }
        ours
    }
}

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
    /// Another failover of the volume waits for the applier.
    #[error("a failover of this volume is already under way")]
    InProgress,
    /// A planned failover while the replica cannot be written: it needs
    /// every record applied, and the applier is retrying.
    #[error("the replica cannot be written ({what}: {source}); a planned failover needs every record applied: free space and run it again, or fail over unplanned on the target")]
    ReplicaFailing {
        /// What the applier retries.
        what: &'static str,
        /// The replica's (recoverable) error.
        #[source]
        source: StoreError,
    },
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
            | Self::NothingConsistent
            | Self::InProgress => ErrorCode::Refused,
            Self::NoSuchPoint { .. } => ErrorCode::NotFound,
            Self::ApplierGone
            | Self::Timeout(_)
            | Self::StreamDidNotStop
            | Self::PointGone(_)
            | Self::ReplicaFailing { .. }
            | Self::Store(_)
            | Self::Promote(_) => ErrorCode::Failed,
        }
    }

    /// Whether it is temporary (the replica's storage comes back, the
    /// other request ends): a source refused with it reconnects instead of
    /// stopping, and the replica is not blamed.
    pub(super) fn is_recoverable(&self) -> bool {
        matches!(self, Self::ReplicaFailing { .. } | Self::InProgress)
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
    let id = begin(stream, req.planned_upto.is_some())?;
    let r = ask_applier(stream, id, req, tick, &mut waiting);
    end(stream, id, r.is_err());
    r
}

/// Records a failover request in the stream's state: from now on no stream
/// is accepted and the applier knows it waits. One at a time.
fn begin(stream: &Stream, planned: bool) -> Result<u64, PromoteError> {
    let mut st = stream.lock_state();
    if st.failover.is_some() {
        return Err(PromoteError::InProgress);
    }
    let id = REQUESTS.fetch_add(1, Ordering::Relaxed);
    st.failover = Some(PendingFailover {
        id,
        planned,
        refused: None,
    });
    st.promoting = true;
    Ok(id)
}

/// Request `id` is over: no longer pending, and if it `failed` (and the
/// replica was not promoted after all) streams may come back.
fn end(stream: &Stream, id: u64, failed: bool) {
    let mut st = stream.lock_state();
    if st.failover.as_ref().is_some_and(|f| f.id == id) {
        st.failover = None;
    }
    if failed && st.disk.promoted.is_none() {
        st.promoting = false;
    }
}

/// The applier's refusal of request `id`, if it refused it.
fn refusal(stream: &Stream, id: u64) -> Option<PromoteError> {
    stream
        .lock_state()
        .failover
        .as_mut()
        .filter(|f| f.id == id)
        .and_then(|f| f.refused.take())
}

/// Withdraws request `id` if the applier has not taken it up (it then
/// ignores it when it gets to it); false if it has (it is promoting).
fn withdraw(stream: &Stream, id: u64) -> bool {
    let mut st = stream.lock_state();
    let pending = st.failover.as_ref().is_some_and(|f| f.id == id);
    if pending {
        st.failover = None;
    }
    pending
}

/// Queues request `id` behind what the applier has (its inbox may be
/// full) and waits for its answer, a refusal or PROMOTE_TIMEOUT; once the
/// applier has taken it up, until it answers. Calls `waiting` every
/// `tick` (at most [`POLL`]) meanwhile.
fn ask_applier(
    stream: &Stream,
    id: u64,
    req: PromoteReq,
    tick: Duration,
    waiting: &mut dyn FnMut(),
) -> Result<msg::Promoted, PromoteError> {
    let tick = tick.min(POLL);
    let deadline = Instant::now() + PROMOTE_TIMEOUT;
    let (tx, rx) = crossbeam_channel::bounded(1);
    let mut m = ApplyMsg::Promote { id, req, reply: tx };
    loop {
        if let Some(e) = refusal(stream, id) {
            return Err(e);
        }
        match stream.apply_tx.send_timeout(m, tick) {
            Ok(()) => break,
            Err(SendTimeoutError::Timeout(back)) if Instant::now() < deadline => {
                m = back;
                waiting();
            }
            Err(SendTimeoutError::Timeout(_)) => {
                return Err(PromoteError::Timeout(PROMOTE_TIMEOUT))
            }
            Err(SendTimeoutError::Disconnected(_)) => return Err(PromoteError::ApplierGone),
        }
    }
    loop {
        match rx.recv_timeout(tick) {
            Ok(r) => return r,
            // It dropped the request unanswered: refused, or gone.
            Err(RecvTimeoutError::Disconnected) => {
                return Err(refusal(stream, id).unwrap_or(PromoteError::ApplierGone))
            }
            Err(RecvTimeoutError::Timeout) => {
                waiting();
                if let Some(e) = refusal(stream, id) {
                    return Err(e);
                }
                if Instant::now() >= deadline && withdraw(stream, id) {
                    return Err(PromoteError::Timeout(PROMOTE_TIMEOUT));
                }
            }
        }
    }
}

/// An operator's failover of `stream` (the source is gone): the current
/// connection is stopped, what is journaled is applied, and the replica is
/// promoted at `point` (a recovery point's sequence) or at the latest
/// consistent state. An applier that retries a replica write meanwhile (a
/// full pool) gives way: it applies nothing more, and the replica is
/// promoted as it is.
fn unplanned_failover(stream: &Stream, point: Option<u64>) -> Result<msg::Promoted, PromoteError> {
    // Pending from here on: a connection blocked on the applier's full
    // inbox gets through once the applier gives way.
    let id = begin(stream, false)?;
    // End the stream that may be running and wait until it has (it may be
    // handing its last segments to a busy applier).
    stream.conn.supersede();
    let r = if stream.conn.wait_idle(Instant::now() + PROMOTE_TIMEOUT) {
        ask_applier(
            stream,
            id,
            PromoteReq {
                planned_upto: None,
                point,
                epoch: None,
            },
            POLL,
            &mut || {},
        )
    } else {
        Err(PromoteError::StreamDidNotStop)
    };
    end(stream, id, r.is_err());
    r
}

impl Applier {
    /// Promotes the replica (failover). Planned: every record up to the old
    /// primary's last one must be applied, and no resync may be running.
    /// Unplanned: the chosen recovery point, or the latest consistent state
    /// (the applied records, or the last point while a resync runs). An
    /// applier that gave way to it promotes the records applied, without
    /// the segment it was retrying and those behind it.
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
        let received = {
            let mut st = self.stream.lock_state();
            st.disk.epoch = epoch;
            st.disk.applied_seq = point_seq;
            st.disk.resync_since = None;
            st.disk.promoted = Some(promotion.clone());
            st.save()?;
            st.applied = point_seq;
            st.published = point_seq;
            self.stream.durable_with(&st)
        };
        // Records journaled here but not in the promoted volume (rolled
        // back to a point, or not applied: the replica could not be
        // written): never applied from now on.
        let left_out = if received > point_seq {
            format!(
                "; records {}..={received} received are not in it",
                point_seq + 1
            )
        } else {
            String::new()
        };
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
                    "failed over at record {point_seq} (epoch {epoch}); the volume is {}{left_out}",
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
