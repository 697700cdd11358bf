//! What the drain shares with the sessions, the control commands and the
//! main loop, and the planned failover's precondition on it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use replica_ring::device::Device;
use replica_ring::RingError;

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
    /// The target's answers to chunk comparisons, for the drain.
    pub answers: Mutex<Vec<replica_proto::msg::Compared>>,
    /// What the target last said reads as zeros on its replica at a
    /// resync's BEGIN, for the drain.
    pub zeroes: Mutex<Option<replica_proto::msg::Zeroes>>,
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

    /// An answer of the target to a chunk comparison (kept for the drain;
    /// a drain that does not take them keeps the newest few thousand).
    pub fn answered(&self, c: replica_proto::msg::Compared) {
        let mut a = self.answers.lock().unwrap_or_else(|p| p.into_inner());
        if a.len() >= 4096 {
            a.remove(0);
        }
        a.push(c);
    }

    /// The target's zero ranges at a resync's BEGIN (the newest is kept).
    pub fn zeroes(&self, z: replica_proto::msg::Zeroes) {
        *self.zeroes.lock().unwrap_or_else(|p| p.into_inner()) = Some(z);
    }

    /// The zero ranges received since the last call.
    pub(super) fn take_zeroes(&self) -> Option<replica_proto::msg::Zeroes> {
        self.zeroes.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    /// The answers received since the last call.
    pub(super) fn take_answers(&self) -> Vec<replica_proto::msg::Compared> {
        std::mem::take(&mut *self.answers.lock().unwrap_or_else(|p| p.into_inner()))
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
    pub fn kernel_dirty_regions(&self) -> Result<Option<u64>, KernelDirtyError> {
        let Some((dev, index)) = &self.kernel_volume else {
            return Ok(None);
        };
        match dev.volume(*index)? {
            Some(v) => Ok(Some(v.dirty_regions)),
            None => Err(KernelDirtyError::NotInGroup(*index)),
        }
    }
}

/// Why the kernel's dirty regions of the volume cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum KernelDirtyError {
    /// The volume left its group.
    #[error("volume index {0} is no longer in its group")]
    NotInGroup(u32),
    /// The control device did not answer.
    #[error(transparent)]
    Ring(#[from] RingError),
}

/// Why a planned failover must not go on.
#[derive(Debug, thiserror::Error)]
pub enum PlannedRefusal {
    /// The stream lacks records: a resync is needed or running.
    #[error("the replica needs a resync (the stream stopped at record {since}): a planned failover would lose writes; let the resync finish, or fail over (unplanned) on the target")]
    NeedsResync {
        /// The first record the stream lacks.
        since: u64,
    },
    /// The kernel holds regions no resync has covered yet.
    #[error("the kernel holds {regions} dirty regions of the volume that no resync has resent yet (writes that failed or were not captured): a planned failover would lose them; let the resync they start finish, or fail over (unplanned) on the target")]
    KernelDirty {
        /// How many.
        regions: u64,
    },
    /// The kernel cannot say whether it holds any.
    #[error("cannot read the kernel's dirty regions of the volume ({0}): a planned failover cannot tell whether it would lose writes")]
    DirtyUnknown(#[source] KernelDirtyError),
}

/// Why a planned failover must not go on, if it must not: the stream lacks
/// records (a resync is needed or running since `needs_resync`), or the
/// kernel holds regions no resync has covered yet (or cannot say).
pub fn planned_failover_refusal(
    needs_resync: Option<u64>,
    kernel_dirty: Result<Option<u64>, KernelDirtyError>,
) -> Option<PlannedRefusal> {
    if let Some(since) = needs_resync {
        return Some(PlannedRefusal::NeedsResync { since });
    }
    match kernel_dirty {
        Ok(None | Some(0)) => None,
        Ok(Some(regions)) => Some(PlannedRefusal::KernelDirty { regions }),
        Err(e) => Some(PlannedRefusal::DirtyUnknown(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_planned_failover_is_refused_while_any_region_is_unresent() {
        assert!(planned_failover_refusal(None, Ok(None)).is_none());
        assert!(planned_failover_refusal(None, Ok(Some(0))).is_none());
        let r = planned_failover_refusal(Some(17), Ok(Some(0))).expect("needs resync");
        assert!(
            matches!(r, PlannedRefusal::NeedsResync { since: 17 }),
            "{r:?}"
        );
        let r = r.to_string();
        assert!(r.contains("needs a resync") && r.contains("17"), "{r}");
        let r = planned_failover_refusal(None, Ok(Some(4))).expect("kernel dirty");
        assert!(
            matches!(r, PlannedRefusal::KernelDirty { regions: 4 }),
            "{r:?}"
        );
        let r = r.to_string();
        assert!(r.contains("4 dirty regions"), "{r}");
        let enoent = RingError::Io {
            what: "describe a volume",
            source: std::io::Error::other("ENOENT"),
        };
        let r = planned_failover_refusal(None, Err(enoent.into())).expect("unknown");
        assert!(matches!(r, PlannedRefusal::DirtyUnknown(_)), "{r:?}");
        let r = r.to_string();
        assert!(r.contains("cannot read") && r.contains("ENOENT"), "{r}");
    }
}
