//! What the drain shares with the sessions, the control commands and the
//! main loop, and the planned failover's precondition on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use replica_ring::device::Device;

use crate::source::spool::Spool;

/// What the drain shares with the shipping sessions and the main loop.
pub struct Shared {
    /// The capture ring's generation.
    pub generation: [u8; 16],
    /// The spool.
    pub spool: Arc<Spool>,
    /// Last record the target has durably (the sessions raise it).
    pub durable: AtomicU64,
    /// A session is connected to the target (a resync starts only then).
    pub connected: AtomicBool,
    /// The ring is dead and everything it held is spooled.
    pub closed: AtomicBool,
    /// A non-recoverable drain error.
    pub fatal: Mutex<Option<String>>,
    /// A session found the spool damaged: the drain turns it into a resync.
    pub damaged: Mutex<Option<String>>,
    /// Set while a resync is needed: the first record the stream lacks.
    pub resync_since: Mutex<Option<u64>>,
    /// The kernel ring's control device and the volume's index, for the
    /// kernel's dirty count (none for a ring file).
    pub(super) kernel_volume: Option<(Arc<Device>, u32)>,
    /// A planned failover waiting for the session to hand over.
    pub planned: Mutex<Option<crate::source::failover::PlannedFailover>>,
    /// A planned failover is under way (from before the volume is fenced):
    /// the ring closing is expected, not a reason to stop.
    pub failing_over: AtomicBool,
    /// The target said it holds no consistent copy: the drain makes sure a
    /// full resync is pending or running.
    pub copy_required: AtomicBool,
    /// Last record the target said it applied (its welcome or last ack).
    pub target_applied: AtomicU64,
}

impl Shared {
    /// The drain's fatal error, if any.
    pub fn fatal(&self) -> Option<String> {
        self.fatal.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records the target's durable position (from an ack or a welcome).
    pub fn acknowledged(&self, durable: u64) {
        self.durable.fetch_max(durable, Ordering::AcqRel);
        if let Err(e) = self.spool.acknowledge(durable) {
            tracing::error!(error = %e, "cannot trim the spool");
            self.report_damage(e.to_string());
        }
    }

    /// A session could not read the spool.
    pub fn report_damage(&self, why: String) {
        *self.damaged.lock().unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Whether a resync is needed (or running): the first record the stream
    /// lacks.
    pub fn needs_resync(&self) -> Option<u64> {
        *self.resync_since.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn set_resync(&self, since: Option<u64>) {
        *self.resync_since.lock().unwrap_or_else(|p| p.into_inner()) = since;
    }

    /// Regions the kernel holds dirty for the volume (writes that failed or
    /// were made in overflow mode, not yet taken by a resync); `None` for a
    /// ring file.
    pub fn kernel_dirty_regions(&self) -> Result<Option<u64>, String> {
        let Some((dev, index)) = &self.kernel_volume else {
            return Ok(None);
        };
        match dev.volume(*index) {
            Ok(Some(v)) => Ok(Some(v.dirty_regions)),
            Ok(None) => Err(format!("volume index {index} is no longer in its group")),
            Err(e) => Err(e.to_string()),
        }
    }
}

/// Why a planned failover must not go on, if it must not: the stream lacks
/// records (a resync is needed or running since `needs_resync`), or the
/// kernel holds regions no resync has covered yet (or cannot say).
pub fn planned_failover_refusal(
    needs_resync: Option<u64>,
    kernel_dirty: Result<Option<u64>, String>,
) -> Option<String> {
    if let Some(since) = needs_resync {
        return Some(format!(
            "the replica needs a resync (the stream stopped at record {since}): a planned failover would lose writes; let the resync finish, or fail over (unplanned) on the target"
        ));
    }
    match kernel_dirty {
        Ok(None | Some(0)) => None,
        Ok(Some(n)) => Some(format!(
            "the kernel holds {n} dirty regions of the volume that no resync has resent yet (writes that failed or were not captured): a planned failover would lose them; let the resync they start finish, or fail over (unplanned) on the target"
        )),
        Err(e) => Some(format!(
            "cannot read the kernel's dirty regions of the volume ({e}): a planned failover cannot tell whether it would lose writes"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planned_failover_is_refused_while_any_region_is_unresent() {
        assert_eq!(planned_failover_refusal(None, Ok(None)), None);
        assert_eq!(planned_failover_refusal(None, Ok(Some(0))), None);
        let r = planned_failover_refusal(Some(17), Ok(Some(0))).expect("needs resync");
        assert!(r.contains("needs a resync") && r.contains("17"), "{r}");
        let r = planned_failover_refusal(None, Ok(Some(4))).expect("kernel dirty");
        assert!(r.contains("4 dirty regions"), "{r}");
        let r = planned_failover_refusal(None, Err("ENOENT".into())).expect("unknown");
        assert!(r.contains("cannot read") && r.contains("ENOENT"), "{r}");
    }
}
