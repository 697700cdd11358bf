//! The source's control commands: `resync`, `initial-copy`, `stop` and the
//! planned failover (stop writes, wait until the target has every record,
//! hand over, demote this side).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use replica_control::{Command, ErrorCode};

use super::drain::{PlannedRefusal, Shared};
use super::failover::FailoverError;
use crate::control::{CommandFailure, Reply, ResyncTicket};

/// How long the drain may take to pick up a resync request.
const DRAIN_ANSWER: Duration = Duration::from_secs(30);

/// How long a planned failover waits for the last record to be drained.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

/// How long a planned failover waits for the target to take over.
const TAKEOVER_TIMEOUT: Duration = Duration::from_secs(900);

/// What the source's control commands (`resync`, `failover-planned`) act
/// on; the drain's shared state once it runs.
pub(super) struct Commands {
    pub(super) volume: String,
    pub(super) state_dir: std::path::PathBuf,
    pub(super) device: Option<std::path::PathBuf>,
    pub(super) volume_size: u64,
    pub(super) kernel_ring: bool,
    /// The ring file (development mode).
    pub(super) ring_file: Option<std::path::PathBuf>,
    /// The epoch this source is at.
    pub(super) epoch: AtomicU64,
    pub(super) requests: crate::source::drain::Requests,
    pub(super) shared: std::sync::OnceLock<Arc<Shared>>,
    pub(super) stop: Arc<AtomicBool>,
    /// One planned failover at a time.
    pub(super) failing_over: std::sync::Mutex<()>,
}

/// Why a source's control command did not do what it was asked.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The request names another volume.
    #[error("this source replicates {this}, not {asked}")]
    NotThisVolume {
        /// This source's volume.
        this: String,
        /// The one asked for.
        asked: String,
    },
    /// The drain has not started (the ring is not attached yet).
    #[error("the source is not replicating yet")]
    NotReplicating,
    /// A verify cannot start.
    #[error("verify refused: {0}")]
    VerifyRefused(#[source] crate::source::drain::VerifyRefusal),
    /// The drain did not pick up a resync request.
    #[error("the capture drain did not take the resync request within {} s (is the ring attached?); it stays queued", .0.as_secs())]
    DrainDidNotAnswer(Duration),
    /// One planned failover at a time.
    #[error("a planned failover is already under way")]
    AlreadyFailingOver,
    /// A planned failover needs the target.
    #[error("not connected to the target")]
    NotConnected,
    /// A planned failover would lose writes.
    #[error(transparent)]
    Refused(#[from] PlannedRefusal),
    /// A planned failover would lose writes, found once writes were
    /// suspended; the volume was resumed, or could not be.
    #[error("planned failover refused ({device} {}): {refusal}", match .resume_failed { None => "resumed".to_owned(), Some(e) => format!("stays suspended: {e}") })]
    RefusedSuspended {
        /// The protected volume's device-mapper name.
        device: String,
        /// Why it could not be resumed, if it could not.
        resume_failed: Option<FailoverError>,
        /// Why the failover was refused.
        refusal: PlannedRefusal,
    },
    /// The configuration names no protected device.
    #[error("`device` (the protected volume) is not configured")]
    NoDevice,
    /// The configuration names no ring file.
    #[error("no ring file configured")]
    NoRingFile,
    /// The source's role file.
    #[error("this source's role: {0}")]
    Role(#[source] FailoverError),
    /// The protected volume is not a device-mapper device, or could not be
    /// suspended.
    #[error(transparent)]
    Device(FailoverError),
    /// The final marker or the error table did not go in.
    #[error("cannot stop writes on {device}: {why}")]
    Fence {
        /// The protected volume's device-mapper name.
        device: String,
        /// What device-mapper said.
        #[source]
        why: FailoverError,
    },
    /// The ring file.
    #[error("ring file: {0}")]
    Ring(#[from] replica_ring::RingError),
    /// The stream broke off before the last record.
    #[error("planned failover not completed: the replica needs a resync (the stream stopped at record {since}, before the last record {upto}); the source volume stays fenced; fail over (unplanned) on the target")]
    StreamBroke {
        /// The first record the stream lacks.
        since: u64,
        /// The old primary's last record.
        upto: u64,
    },
    /// The epoch cannot grow any more.
    #[error("this source is at epoch {0}, the last one: it cannot fail over")]
    EpochExhausted(u64),
    /// The last record never left the ring.
    #[error("record {0} was never drained from the ring")]
    NeverDrained(u64),
    /// The target did not answer the hand-over.
    #[error("planned failover not completed: the target did not take over within {} minutes; the source volume stays fenced; `replctl failover --planned` again to retry", .0.as_secs() / 60)]
    TargetTimeout(Duration),
    /// The target refused the hand-over, or the session to it ended.
    #[error("planned failover not completed: {0}; the source volume stays fenced; `replctl failover --planned` again to retry")]
    HandOver(String),
}

impl CommandFailure for CommandError {
    fn code(&self) -> ErrorCode {
        match self {
            Self::NotThisVolume { .. } => ErrorCode::NotFound,
            Self::NotReplicating
            | Self::AlreadyFailingOver
            | Self::NotConnected
            | Self::Refused(_)
            | Self::VerifyRefused(_)
            | Self::EpochExhausted(_)
            | Self::RefusedSuspended { .. } => ErrorCode::Refused,
            Self::DrainDidNotAnswer(_)
            | Self::NoDevice
            | Self::NoRingFile
            | Self::Role(_)
            | Self::Device(_)
            | Self::Fence { .. }
            | Self::Ring(_)
            | Self::StreamBroke { .. }
            | Self::NeverDrained(_)
            | Self::TargetTimeout(_)
            | Self::HandOver(_) => ErrorCode::Failed,
        }
    }
}

impl Commands {
    /// Runs `command` about `volume` (default: this source's); `None` if
    /// it is not a source's command.
    pub(super) fn handle(
        &self,
        volume: Option<&str>,
        command: &Command,
    ) -> Option<Result<Reply, CommandError>> {
        if !matches!(
            command,
            Command::Resync { .. }
                | Command::Verify { .. }
                | Command::InitialCopy
                | Command::FailoverPlanned
                | Command::Stop
        ) {
            return None;
        }
        if let Some(v) = volume.filter(|v| *v != self.volume) {
            return Some(Err(CommandError::NotThisVolume {
                this: self.volume.clone(),
                asked: v.to_owned(),
            }));
        }
        Some(match command {
            Command::Stop => {
                tracing::info!(volume = %self.volume, "stop requested on the control socket");
                self.stop.store(true, Ordering::Release);
                Ok(Reply::Done(format!(
                    "replicad source for {} is stopping",
                    self.volume
                )))
            }
            Command::Resync { full } => self.resync(false, *full),
            Command::InitialCopy => self.resync(true, false),
            Command::Verify { resync, max_rate } => self.verify(*resync, *max_rate),
            _ => self.planned_failover().map(Reply::Done),
        })
    }

    /// A full resync (`ensure`: unless one that reaches the target is
    /// pending or running already, as for an initial copy): handed to the
    /// drain, which answers with a ring position the resync's END comes
    /// after; the reply names it, so a wait sees this resync through to its
    /// END on the target.
    pub(super) fn resync(&self, ensure: bool, send_all: bool) -> Result<Reply, CommandError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.requests
            .resync
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(crate::source::drain::ResyncRequest {
                why: if ensure {
                    "initial copy".into()
                } else {
                    "resync requested by an operator".into()
                },
                reply: tx,
                ensure,
                send_all,
            });
        let from_seq = rx
            .recv_timeout(DRAIN_ANSWER)
            .map_err(|_| CommandError::DrainDidNotAnswer(DRAIN_ANSWER))?;
        let generation = self
            .shared
            .get()
            .map(|s| hex::encode(s.generation))
            .ok_or(CommandError::NotReplicating)?;
        Ok(Reply::Resync {
            message: format!(
                "resync of {} scheduled at record {from_seq}: {}; the replica is inconsistent until the target applies its end (its last recovery point stays)",
                self.volume,
                if send_all {
                    "every chunk will be resent"
                } else {
                    "every chunk will be compared with the replica's and those that differ resent"
                }
            ),
            ticket: ResyncTicket {
                generation,
                from_seq,
            },
        })
    }

    /// An online verify, handed to the drain.
    pub(super) fn verify(
        &self,
        resync: bool,
        max_rate: Option<u64>,
    ) -> Result<Reply, CommandError> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.requests
            .verify
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(crate::source::drain::VerifyRequest {
                resync,
                max_rate,
                reply: tx,
            });
        let from_seq = rx
            .recv_timeout(DRAIN_ANSWER)
            .map_err(|_| CommandError::DrainDidNotAnswer(DRAIN_ANSWER))?
            .map_err(CommandError::VerifyRefused)?;
        Ok(Reply::Done(format!(
            "verify of {} started at record {from_seq}{}",
            self.volume,
            match max_rate {
                Some(r) => format!(", at most {} MiB/s", r >> 20),
                None => String::new(),
            }
        )))
    }

    /// Planned failover: stop writes (suspend, final marker, error table),
    /// wait until the target has every record, hand over, demote this side.
    pub(super) fn planned_failover(&self) -> Result<String, CommandError> {
        let _one = self
            .failing_over
            .try_lock()
            .map_err(|_| CommandError::AlreadyFailingOver)?;
        let shared = self
            .shared
            .get()
            .ok_or(CommandError::NotReplicating)?
            .clone();
        // The kernel's dirty regions are checked once writes are suspended
        // (a retry after the fence finds the volume gone from the kernel).
        if let Some(why) =
            crate::source::drain::planned_failover_refusal(shared.needs_resync(), Ok(None))
        {
            return Err(why.into());
        }
        if !shared.connected.load(Ordering::Acquire) {
            return Err(CommandError::NotConnected);
        }
        // Before anything is fenced: the next epoch must exist.
        let now = self.epoch.load(Ordering::Acquire);
        if now.checked_add(1).is_none() {
            return Err(CommandError::EpochExhausted(now));
        }
        shared.failing_over.store(true, Ordering::Release);
        let r = self.hand_over(&shared);
        if r.is_err() {
            shared.failing_over.store(false, Ordering::Release);
        }
        r
    }

    /// The planned failover once it may start (see [`Self::planned_failover`]).
    pub(super) fn hand_over(&self, shared: &Arc<Shared>) -> Result<String, CommandError> {
        let mut role = crate::source::failover::SourceRole::load(&self.state_dir)
            .map_err(CommandError::Role)?;
        let upto = if self.kernel_ring {
            let dev = self.device.as_ref().ok_or(CommandError::NoDevice)?;
            let name = crate::source::failover::dm_name(dev)
                .map_err(|e| CommandError::Device(e.into()))?;
            match role.failing_over {
                Some(upto) if crate::source::failover::is_fenced(&name) => upto,
                _ => {
                    crate::source::failover::suspend(&name).map_err(CommandError::Device)?;
                    // Writes are stopped and every one in flight completed:
                    // no region can become dirty any more. Every region the
                    // kernel marked must have reached a resync (the fence
                    // removes the volume, and its bitmap, from the kernel).
                    if let Some(refusal) = crate::source::drain::planned_failover_refusal(
                        shared.needs_resync(),
                        shared.kernel_dirty_regions(),
                    ) {
                        let resume_failed = crate::source::failover::resume(&name).err();
                        tracing::warn!(volume = %self.volume, device = %name, "planned failover refused after suspending writes: {refusal}");
                        return Err(CommandError::RefusedSuspended {
                            device: name,
                            resume_failed,
                            refusal,
                        });
                    }
                    let fenced = crate::source::failover::marker(
                        &name,
                        0xFA11_0000_0000_0000 | self.epoch.load(Ordering::Acquire),
                    )
                    .and_then(|seq| {
                        crate::source::failover::fence(&name, self.volume_size / 512).map(|()| seq)
                    });
                    let upto = match fenced {
                        Ok(seq) => seq,
                        Err(why) => {
                            let _ = crate::source::failover::resume(&name);
                            return Err(CommandError::Fence { device: name, why });
                        }
                    };
                    tracing::warn!(volume = %self.volume, device = %name, upto, "planned failover: writes stopped (error table), last record {upto}");
                    role.failing_over = Some(upto);
                    role.save(&self.state_dir).map_err(CommandError::Role)?;
                    upto
                }
            }
        } else {
            // A ring file: the writers must have stopped; the last record
            // produced is the last one.
            let path = self.ring_file.as_ref().ok_or(CommandError::NoRingFile)?;
            let map = replica_ring::Mapping::open_file(path, false)?;
            map.header()
                .prod_seq
                .load(Ordering::Acquire)
                .wrapping_sub(1)
        };
        // Everything up to `upto` spooled, then durable on the target and
        // applied there (the target checks), then the target takes over.
        let deadline = Instant::now() + DRAIN_TIMEOUT;
        while (shared.spool.next_seq().wrapping_sub(upto) as i64) <= 0 {
            if let Some(since) = shared.needs_resync() {
                return Err(CommandError::StreamBroke { since, upto });
            }
            if Instant::now() > deadline {
                return Err(CommandError::NeverDrained(upto));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let now = self.epoch.load(Ordering::Acquire);
        let epoch = now
            .checked_add(1)
            .ok_or(CommandError::EpochExhausted(now))?;
        let (tx, rx) = crossbeam_channel::bounded(1);
        *shared.planned.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::source::failover::PlannedFailover {
                upto,
                epoch,
                sent: false,
                reply: tx,
            });
        let answer = rx
            .recv_timeout(TAKEOVER_TIMEOUT)
            .map_err(|_| CommandError::TargetTimeout(TAKEOVER_TIMEOUT))
            .and_then(|r| r.map_err(CommandError::HandOver));
        shared
            .planned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let p = answer?;
        role.epoch = p.epoch;
        role.failing_over = None;
        role.demoted = Some(format!(
            "planned failover: the target became the primary at epoch {} (record {})",
            p.epoch, p.point_seq
        ));
        role.save(&self.state_dir).map_err(CommandError::Role)?;
        self.epoch.store(p.epoch, Ordering::Release);
        tracing::warn!(volume = %self.volume, epoch = p.epoch, point = p.point_seq, "planned failover complete; this source is demoted and stops");
        self.stop.store(true, Ordering::Release);
        Ok(format!(
            "planned failover of {} complete: no write lost (every record up to {upto} is on the target); the target is the primary at epoch {}, volume {} on the target host; this source is fenced and stopped",
            self.volume, p.epoch, p.device
        ))
    }
}
