//! A stream of another ring generation taking a stream over (or the first
//! stream of a volume the target has no record of): the decision
//! ([`takeover_for`]), the accept path's request to the applier, and the
//! applier's part, which starts the journal over in the new sequence space
//! once every earlier segment is applied. The applier is the only writer of
//! the applied sequence, so the reset happens in its order, never behind
//! its back.

use std::time::Duration;

use replica_proto::msg::Hello;
use replica_store::state::VolumeState;
use replica_store::StoreError;

use super::apply::{Applier, ApplyMsg};
use super::points::resync_reason;
use super::refusal::Refusal;
use super::stream::Stream;
use crate::status::{ReasonKind, ReplicaState};

/// How long the accept path waits for the applier to take a new
/// generation over (it applies the old one's queued segments first); the
/// source retries after a refusal, and the queued takeover still happens.
const TAKEOVER_WAIT: Duration = Duration::from_secs(8);

/// What a takeover sets.
#[derive(Debug, Clone)]
pub(super) struct Takeover {
    /// The new ring generation, hex.
    pub(super) generation: String,
    /// The last record of the new generation taken as applied.
    pub(super) base: u64,
    /// The replica holds no consistent copy from here on: a full resync
    /// must end before it is consistent again.
    pub(super) needs_full_resync: bool,
}

/// Why the applier did not take the stream over.
#[derive(Debug, thiserror::Error)]
pub(super) enum TakeoverError {
    /// The stream is Critical.
    #[error("the volume is Critical: {0}")]
    Critical(String),
    /// The replica was promoted.
    #[error("the replica was promoted")]
    Promoted,
    /// Flushing the old generation or restarting the journal failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl TakeoverError {
    /// Whether trying again later may succeed (a full disk).
    pub(super) fn is_recoverable(&self) -> bool {
        match self {
            Self::Critical(_) | Self::Promoted => false,
            Self::Store(e) => e.is_recoverable(),
        }
    }
}

/// Whether a stream of generation `gen_hex` takes the stream over, and how.
pub(super) fn takeover_for(st: &VolumeState, gen_hex: &str, hello: &Hello) -> Option<Takeover> {
    let needs_full_resync = if st.generation.is_empty() {
        // No record of this volume: the replica is a copy of the source only
        // if the operator said so and the stream has every record of the
        // generation; otherwise the whole volume must be sent.
        !(hello.replica_seeded && hello.oldest_seq <= 1)
    } else if st.generation != gen_hex {
        // Another capture ring (the source host restarted, the table was
        // created anew): writes between the two may never have been
        // captured, so only a full resync makes the replica consistent.
        true
    } else {
        return None;
    };
    Some(Takeover {
        generation: gen_hex.to_owned(),
        base: hello.oldest_seq.saturating_sub(1),
        needs_full_resync,
    })
}

/// Asks the applier to take `stream` over and waits until it has. The
/// caller holds the stream's slot; no other stream gets in between (a later
/// one is refused while the takeover is pending).
pub(super) fn request(stream: &Stream, t: Takeover) -> Result<(), Refusal> {
    let (tx, rx) = crossbeam_channel::bounded(1);
    // Set before it is queued, cleared by the applier once done.
    stream.lock_state().takeover_pending = true;
    let msg = ApplyMsg::Takeover {
        takeover: t,
        reply: tx,
    };
    if stream.apply_tx.send_timeout(msg, TAKEOVER_WAIT).is_err() {
        stream.lock_state().takeover_pending = false;
        return Err(Refusal::TakeoverQueued);
    }
    match rx.recv_timeout(TAKEOVER_WAIT) {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(Refusal::Takeover(e)),
        Err(_) => Err(Refusal::TakeoverQueued),
    }
}

impl Applier {
    /// Takes the stream over for a new ring generation: everything queued
    /// before is applied and flushed, the journal starts over, and the
    /// state names the new generation, the base sequence and whether a
    /// full resync is needed, all saved before the first segment of the
    /// new generation is journaled. The takeover is no longer pending
    /// afterwards, done or not.
    pub(super) fn take_over(&mut self, t: &Takeover) -> Result<(), TakeoverError> {
        let r = self.reset_generation(t);
        self.stream.lock_state().takeover_pending = false;
        if let Err(e) = &r {
            tracing::error!(volume = %self.stream.id, error = %e, "takeover of a new ring generation failed");
        }
        r
    }

    fn reset_generation(&mut self, t: &Takeover) -> Result<(), TakeoverError> {
        {
            let st = self.stream.lock_state();
            if let Some(c) = &st.disk.critical {
                return Err(TakeoverError::Critical(c.clone()));
            }
            if st.disk.promoted.is_some() {
                return Err(TakeoverError::Promoted);
            }
            if st.disk.generation == t.generation {
                // Asked twice (the first answer timed out): done already.
                return Ok(());
            }
            if st.disk.generation.is_empty() {
                tracing::warn!(volume = %self.stream.id, generation = %t.generation, full_resync = t.needs_full_resync, "first stream of a volume this target has no record of");
            } else {
                tracing::warn!(volume = %self.stream.id, old = %st.disk.generation, new = %t.generation, "a new capture ring generation takes the volume over: the replica is inconsistent until a full resync ends");
            }
        }
        // The old generation's applied records are flushed and recorded:
        // its recovery points stay valid.
        self.persist_applied()?;
        // The journal first: a crash before the state is saved leaves the
        // old generation in the state and an empty journal (the source
        // takes over again); never new-generation state over old frames.
        self.stream.lock_journal().restart()?;
        let since = t.base.saturating_add(1);
        {
            let mut st = self.stream.lock_state();
            st.disk.generation = t.generation.clone();
            st.disk.applied_seq = t.base;
            st.disk.generation_base = t.base;
            st.disk.needs_full_resync = t.needs_full_resync;
            st.disk.resync_since = t.needs_full_resync.then_some(since);
            st.save()?;
            st.applied = t.base;
            st.published = t.base;
        }
        self.unflushed_segments = 0;
        self.board.update(&self.stream.id, |s| {
            s.generation = t.generation.clone();
            s.generation_base = t.base;
            s.applied_seq = t.base;
            s.durable_seq = t.base;
            s.clear_reason(ReasonKind::Resync);
            s.replica = ReplicaState::Inconsistent;
            if t.needs_full_resync {
                s.set_reason(ReasonKind::Resync, resync_reason(since, true));
            }
        });
        Ok(())
    }
}
