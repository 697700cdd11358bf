//! The source's control commands: `resync`, `initial-copy`, `stop` and the
//! planned failover (stop writes, wait until the target has every record,
//! hand over, demote this side).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::drain::Shared;

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
    pub(super) resync_request: crate::source::drain::ResyncRequests,
    pub(super) shared: std::sync::OnceLock<Arc<Shared>>,
    pub(super) stop: Arc<AtomicBool>,
    /// One planned failover at a time.
    pub(super) failing_over: std::sync::Mutex<()>,
}

impl Commands {
    pub(super) fn handle(
        &self,
        r: &crate::control::Request,
    ) -> Option<Result<crate::control::Reply, String>> {
        if !matches!(
            r.command.as_str(),
            "resync" | "initial-copy" | "failover-planned" | "stop"
        ) {
            return None;
        }
        if r.volume.as_ref().is_some_and(|v| v != &self.volume) {
            return Some(Err(format!(
                "this source replicates {}, not {}",
                self.volume,
                r.volume.as_deref().unwrap_or_default()
            )));
        }
        Some(match r.command.as_str() {
            "stop" => {
                tracing::info!(volume = %self.volume, "stop requested on the control socket");
                self.stop.store(true, Ordering::Release);
                Ok(format!("replicad source for {} is stopping", self.volume).into())
            }
            "resync" => self.resync(false),
            "initial-copy" => self.resync(true),
            _ => self.planned_failover().map(Into::into),
        })
    }

    /// A full resync (`ensure`: unless one that reaches the target is
    /// pending or running already, as for an initial copy): handed to the
    /// drain, which answers with a ring position the resync's END comes
    /// after; the reply names it, so a wait sees this resync through to its
    /// END on the target.
    pub(super) fn resync(&self, ensure: bool) -> Result<crate::control::Reply, String> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.resync_request
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(crate::source::drain::ResyncRequest {
                why: if ensure {
                    "initial copy".into()
                } else {
                    "full resync requested by an operator".into()
                },
                reply: tx,
                ensure,
            });
        let from_seq = rx.recv_timeout(Duration::from_secs(30)).map_err(|_| {
            "the capture drain did not take the resync request within 30 s (is the ring attached?); it stays queued".to_string()
        })?;
        let generation = self
            .shared
            .get()
            .map(|s| hex::encode(s.generation))
            .ok_or("the source is not replicating yet")?;
        Ok(crate::control::Reply {
            message: format!(
                "full resync of {} scheduled at record {from_seq}: every region will be resent; the replica is inconsistent until the target applies its end (its last recovery point stays)",
                self.volume
            ),
            resync: Some(crate::control::ResyncTicket {
                generation,
                from_seq,
            }),
        })
    }

    /// Planned failover: stop writes (suspend, final marker, error table),
    /// wait until the target has every record, hand over, demote this side.
    pub(super) fn planned_failover(&self) -> Result<String, String> {
        let _one = self
            .failing_over
            .try_lock()
            .map_err(|_| "a planned failover is already under way".to_string())?;
        let shared = self
            .shared
            .get()
            .ok_or("the source is not replicating yet")?
            .clone();
        // The kernel's dirty regions are checked once writes are suspended
        // (a retry after the fence finds the volume gone from the kernel).
        if let Some(why) =
            crate::source::drain::planned_failover_refusal(shared.needs_resync(), Ok(None))
        {
            return Err(why);
        }
        if !shared.connected.load(Ordering::Acquire) {
            return Err("not connected to the target".into());
        }
        shared.failing_over.store(true, Ordering::Release);
        let r = self.hand_over(&shared);
        if r.is_err() {
            shared.failing_over.store(false, Ordering::Release);
        }
        r
    }

    /// The planned failover once it may start (see [`Self::planned_failover`]).
    pub(super) fn hand_over(&self, shared: &Arc<Shared>) -> Result<String, String> {
        let mut role = crate::source::failover::SourceRole::load(&self.state_dir)?;
        let upto = if self.kernel_ring {
            let dev = self
                .device
                .as_ref()
                .ok_or("`device` (the protected volume) is not configured")?;
            let name = crate::source::failover::dm_name(dev)?;
            match role.failing_over {
                Some(upto) if crate::source::failover::is_fenced(&name) => upto,
                _ => {
                    crate::source::failover::suspend(&name)?;
                    // Writes are stopped and every one in flight completed:
                    // no region can become dirty any more. Every region the
                    // kernel marked must have reached a resync (the fence
                    // removes the volume, and its bitmap, from the kernel).
                    if let Some(why) = crate::source::drain::planned_failover_refusal(
                        shared.needs_resync(),
                        shared.kernel_dirty_regions(),
                    ) {
                        let resumed = crate::source::failover::resume(&name)
                            .map(|()| format!("{name} resumed"))
                            .unwrap_or_else(|e| format!("{name} stays suspended: {e}"));
                        tracing::warn!(volume = %self.volume, device = %name, "planned failover refused after suspending writes: {why}");
                        return Err(format!("planned failover refused ({resumed}): {why}"));
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
                        Err(e) => {
                            let _ = crate::source::failover::resume(&name);
                            return Err(format!("cannot stop writes on {name}: {e}"));
                        }
                    };
                    tracing::warn!(volume = %self.volume, device = %name, upto, "planned failover: writes stopped (error table), last record {upto}");
                    role.failing_over = Some(upto);
                    role.save(&self.state_dir)?;
                    upto
                }
            }
        } else {
            // A ring file: the writers must have stopped; the last record
            // produced is the last one.
            let path = self.ring_file.as_ref().ok_or("no ring file configured")?;
            let map = replica_ring::Mapping::open_file(path, false).map_err(|e| e.to_string())?;
            map.header()
                .prod_seq
                .load(Ordering::Acquire)
                .wrapping_sub(1)
        };
        // Everything up to `upto` spooled, then durable on the target and
        // applied there (the target checks), then the target takes over.
        let deadline = Instant::now() + Duration::from_secs(600);
        while (shared.spool.next_seq().wrapping_sub(upto) as i64) <= 0 {
            if let Some(since) = shared.needs_resync() {
                return Err(format!(
                    "planned failover not completed: the replica needs a resync (the stream stopped at record {since}, before the last record {upto}); the source volume stays fenced; fail over (unplanned) on the target"
                ));
            }
            if Instant::now() > deadline {
                return Err(format!("record {upto} was never drained from the ring"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let epoch = self.epoch.load(Ordering::Acquire) + 1;
        let (tx, rx) = crossbeam_channel::bounded(1);
        *shared.planned.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(crate::source::failover::PlannedFailover {
                upto,
                epoch,
                sent: false,
                reply: tx,
            });
        let answer = rx
            .recv_timeout(Duration::from_secs(900))
            .map_err(|_| "the target did not take over within 15 minutes".to_string())
            .and_then(|r| r);
        shared
            .planned
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let p = answer.map_err(|e| {
            format!("planned failover not completed: {e}; the source volume stays fenced; `replctl failover --planned` again to retry")
        })?;
        role.epoch = p.epoch;
        role.failing_over = None;
        role.demoted = Some(format!(
            "planned failover: the target became the primary at epoch {} (record {})",
            p.epoch, p.point_seq
        ));
        role.save(&self.state_dir)?;
        self.epoch.store(p.epoch, Ordering::Release);
        tracing::warn!(volume = %self.volume, epoch = p.epoch, point = p.point_seq, "planned failover complete; this source is demoted and stops");
        self.stop.store(true, Ordering::Release);
        Ok(format!(
            "planned failover of {} complete: no write lost (every record up to {upto} is on the target); the target is the primary at epoch {}, volume {} on the target host; this source is fenced and stopped",
            self.volume, p.epoch, p.device
        ))
    }
}
