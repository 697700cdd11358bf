//! Why the target refuses a connection or ends a stream: a typed reason
//! that keeps its cause, the code it is known by on the wire (the source
//! acts on some: `stale-epoch` and `promoted` demote it) and whether the
//! source should retry.

use replica_proto::frame::FrameError;
use replica_proto::handshake::HandshakeError;
use replica_proto::keys::KeyError;
use replica_proto::msg::ErrorCode;
use replica_store::StoreError;

use super::promote::PromoteError;
use super::takeover::TakeoverError;
use crate::link::LinkError;
use crate::retry::ErrorClass;

/// Why a connection is refused or its stream ended.
#[derive(Debug, thiserror::Error)]
pub(super) enum Refusal {
    /// The client certificate has no subject common name.
    #[error("client certificate has no subject common name")]
    NoIdentity,
    /// No hello in time.
    #[error("the hello and key confirmation did not come within the handshake deadline")]
    HelloTimeout,
    /// A protocol version this target does not speak.
    #[error("protocol version {0} not supported: this target speaks {v}; run the same dm-replica release on both sites", v = replica_proto::msg::PROTOCOL_VERSION)]
    ProtocolVersion(u32),
    /// The hello does not decode.
    #[error("malformed hello")]
    MalformedHello,
    /// The volume is not configured here.
    #[error("volume {0:?} is not configured on this target")]
    VolumeNotFound(String),
    /// The certificate may not replicate the volume.
    #[error("certificate subject {subject:?} is not allowed to replicate volume {volume}")]
    NotAuthorized {
        /// The certificate's subject common name.
        subject: String,
        /// The volume.
        volume: String,
    },
    /// An older connection did not let go in time.
    #[error("another connection is still streaming into this volume")]
    StillStreaming,
    /// No randomness for the stream id.
    #[error("{0}")]
    Random(#[source] KeyError),
    /// The volume is Critical.
    #[error("volume {volume} is Critical: {reason}")]
    Critical {
        /// The volume.
        volume: String,
        /// Why it is.
        reason: String,
    },
    /// The volume was failed over to this host.
    #[error("volume {volume} was failed over to this host at epoch {epoch} and is the primary now: the old source must reprotect")]
    Promoted {
        /// The volume.
        volume: String,
        /// The epoch it became the primary in.
        epoch: u64,
    },
    /// A failover is under way.
    #[error("volume {0} is being failed over")]
    FailingOver(String),
    /// A takeover by another stream is still being applied.
    #[error("a takeover of a new ring generation is still being applied")]
    TakeoverPending,
    /// This stream's takeover waits for the old generation to be applied.
    #[error("still applying the previous ring generation's journal")]
    TakeoverQueued,
    /// The stream's state changed while the connection was accepted.
    #[error("the volume changed while the stream was accepted")]
    ChangedDuringAccept,
    /// The source is at an older epoch: it was failed over.
    #[error("source is at epoch {source_epoch} but the target is at {target_epoch}: the source was failed over and must reprotect")]
    StaleEpoch {
        /// The source's epoch.
        source_epoch: u64,
        /// The target's.
        target_epoch: u64,
    },
    /// The source's oldest record is past what the target has.
    #[error("source starts at record {oldest} but the target has only up to {durable}: records are missing")]
    MissingRecords {
        /// The source's oldest record.
        oldest: u64,
        /// The target's last durable one.
        durable: u64,
    },
    /// The opening failed: a message out of turn, an unknown key id, or a
    /// key confirmation that does not verify (another secret under the
    /// same id, or a tag made on another connection).
    #[error("{}", opening_message(.0))]
    Opening(#[source] HandshakeError),
    /// The TLS session gave no keying material.
    #[error("TLS keying material export failed: {0}")]
    Exporter(#[source] LinkError),
    /// The connection failed.
    #[error("{0}")]
    Network(#[source] LinkError),
    /// The source sent nothing (not even a ping) for the peer timeout: the
    /// connection is dead.
    #[error("the source sent nothing for {secs} s (network.peer_timeout_secs): the connection is dead; the source reconnects")]
    SourceSilent {
        /// How long it was silent, s.
        secs: u64,
    },
    /// The source reported an error.
    #[error("source reported: {0}")]
    Peer(String),
    /// A message that has no place in a stream.
    #[error("unexpected message: {0}")]
    UnexpectedMessage(String),
    /// A planned failover failed.
    #[error("{0}")]
    PromoteFailed(#[source] PromoteError),
    /// A segment of an unsupported format or feature.
    #[error("{0}")]
    Unsupported(#[source] FrameError),
    /// A segment whose checksums hold but whose content is invalid: a
    /// sender that builds it is broken, resending helps not.
    #[error("{0}")]
    MalformedSegment(#[source] FrameError),
    /// A segment damaged on the way: the source resends.
    #[error("rejected segment: {0}")]
    CorruptSegment(#[source] FrameError),
    /// A segment of another volume.
    #[error("segment belongs to another volume (replayed or misrouted)")]
    WrongVolume,
    /// A segment of another connection's stream.
    #[error("segment belongs to another stream (replayed)")]
    WrongStream,
    /// A segment of another ring generation or epoch than the stream's.
    #[error("segment of another ring generation or epoch")]
    WrongGeneration,
    /// A segment counter out of order.
    #[error("segment counter {got} where {expected} was expected (replayed or reordered)")]
    Replay {
        /// The segment's counter.
        got: u64,
        /// The next one expected.
        expected: u64,
    },
    /// A segment sealed with a key the target does not have.
    #[error("segment sealed with unknown key id {key_id}")]
    UnknownSegmentKey {
        /// The key id.
        key_id: u32,
        /// Why it cannot be derived.
        #[source]
        cause: KeyError,
    },
    /// A segment that fails authentication.
    #[error("segment {first}..={last} failed authentication: the data keys differ between source and target")]
    Authentication {
        /// Its first record.
        first: u64,
        /// Its last record.
        last: u64,
    },
    /// A segment that starts past what the target has (and says no gap).
    #[error("segment starts at record {first} but the target has only up to {received}")]
    SequenceGap {
        /// Its first record.
        first: u64,
        /// The last record the target received.
        received: u64,
    },
    /// The target's storage failed.
    #[error("target storage: {0}")]
    Storage(#[source] StoreError),
    /// The takeover of a new ring generation failed.
    #[error("target storage: {0}")]
    Takeover(#[source] TakeoverError),
}

/// What an operator reads about a failed opening.
fn opening_message(e: &HandshakeError) -> String {
    match e {
        HandshakeError::Mismatch(m) => format!(
            "key confirmation failed for key id {id}: the source's key {id} is not this target's key {id}; copy the same key ring to both sites and reload (SIGHUP)",
            id = m.key_id
        ),
        HandshakeError::UnknownKey(id) => format!(
            "source confirms with key id {id} which this target does not have: copy the key ring the source uses to this host (same file on both sites) and reload the target (SIGHUP)"
        ),
        other => other.to_string(),
    }
}

impl Refusal {
    /// Its wire code.
    pub(super) fn code(&self) -> ErrorCode {
        use ErrorCode as C;
        match self {
            Self::NoIdentity => C::NoIdentity,
            Self::ProtocolVersion(_)
            | Self::MalformedHello
            | Self::UnexpectedMessage(_)
            | Self::Exporter(_) => C::Protocol,
            Self::Opening(e) => match e {
                HandshakeError::Mismatch(_) => C::KeyConfirmation,
                HandshakeError::UnknownKey(_) | HandshakeError::Key(_) => C::UnknownKey,
                HandshakeError::Unexpected { .. } | HandshakeError::Done => C::Protocol,
            },
            Self::HelloTimeout | Self::SourceSilent { .. } => C::Timeout,
            Self::VolumeNotFound(_) => C::VolumeNotFound,
            Self::NotAuthorized { .. } => C::NotAuthorized,
            Self::StillStreaming
            | Self::TakeoverPending
            | Self::TakeoverQueued
            | Self::ChangedDuringAccept => C::Busy,
            Self::Random(_) => C::Random,
            Self::Critical { .. } => C::Critical,
            Self::Promoted { .. } => C::Promoted,
            Self::FailingOver(_) => C::Failover,
            Self::StaleEpoch { .. } => C::StaleEpoch,
            Self::MissingRecords { .. } | Self::SequenceGap { .. } => C::SequenceGap,
            Self::UnknownSegmentKey { .. } => C::UnknownKey,
            Self::Network(_) => C::Network,
            Self::Peer(_) => C::Peer,
            Self::PromoteFailed(_) => C::PromoteFailed,
            Self::Unsupported(_) => C::Unsupported,
            Self::MalformedSegment(_) => C::MalformedSegment,
            Self::CorruptSegment(_) => C::CorruptSegment,
            Self::WrongVolume => C::WrongVolume,
            Self::WrongStream => C::WrongStream,
            Self::WrongGeneration => C::WrongGeneration,
            Self::Replay { .. } => C::Replay,
            Self::Authentication { .. } => C::Authentication,
            Self::Storage(_) | Self::Takeover(_) => C::TargetStorage,
        }
    }

    /// Whether a Fatal refusal of a running stream says something about
    /// its replica (and makes it Critical). A source that a reload no
    /// longer allows is refused, but the replica is as good as it was.
    pub(super) fn blames_replica(&self) -> bool {
        !matches!(self, Self::NotAuthorized { .. })
    }

    /// Whether the source should retry.
    pub(super) fn class(&self) -> ErrorClass {
        let recoverable = match self {
            Self::HelloTimeout
            | Self::StillStreaming
            | Self::Random(_)
            | Self::FailingOver(_)
            | Self::TakeoverPending
            | Self::TakeoverQueued
            | Self::ChangedDuringAccept
            | Self::Network(_)
            | Self::SourceSilent { .. }
            | Self::Peer(_)
            | Self::CorruptSegment(_) => true,
            Self::Storage(e) => e.is_recoverable(),
            Self::Takeover(e) => e.is_recoverable(),
            Self::PromoteFailed(e) => e.is_recoverable(),
            Self::NoIdentity
            | Self::ProtocolVersion(_)
            | Self::MalformedHello
            | Self::VolumeNotFound(_)
            | Self::NotAuthorized { .. }
            | Self::Critical { .. }
            | Self::Promoted { .. }
            | Self::StaleEpoch { .. }
            | Self::MissingRecords { .. }
            | Self::Opening(_)
            | Self::Exporter(_)
            | Self::UnexpectedMessage(_)
            | Self::Unsupported(_)
            | Self::MalformedSegment(_)
            | Self::WrongVolume
            | Self::WrongStream
            | Self::WrongGeneration
            | Self::Replay { .. }
            | Self::UnknownSegmentKey { .. }
            | Self::Authentication { .. }
            | Self::SequenceGap { .. } => false,
        };
        if recoverable {
            ErrorClass::Recoverable
        } else {
            ErrorClass::Fatal
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_the_source_demotes_itself_on_are_fatal_with_their_codes() {
        let stale = Refusal::StaleEpoch {
            source_epoch: 1,
            target_epoch: 2,
        };
        assert_eq!(stale.code().as_str(), "stale-epoch");
        assert_eq!(stale.class(), ErrorClass::Fatal);
        let promoted = Refusal::Promoted {
            volume: "v".into(),
            epoch: 2,
        };
        assert_eq!(promoted.code().as_str(), "promoted");
        assert_eq!(promoted.class(), ErrorClass::Fatal);
    }

    #[test]
    fn a_silent_source_is_a_recoverable_timeout() {
        let r = Refusal::SourceSilent { secs: 30 };
        assert_eq!(r.class(), ErrorClass::Recoverable);
        assert_eq!(r.code().as_str(), "timeout");
        assert!(r.to_string().contains("sent nothing for 30 s"), "{r}");
    }

    #[test]
    fn storage_refusals_are_recoverable_only_when_the_store_error_is() {
        let full = Refusal::Storage(StoreError::io(
            "append to journal",
            std::path::Path::new("j"),
            std::io::Error::from_raw_os_error(libc::ENOSPC),
        ));
        assert_eq!(full.class(), ErrorClass::Recoverable);
        assert_eq!(full.code().as_str(), "target-storage");
        let bad = Refusal::Storage(StoreError::Invalid("x".into()));
        assert_eq!(bad.class(), ErrorClass::Fatal);
        assert_eq!(bad.to_string(), "target storage: x");
    }

    #[test]
    fn a_planned_failover_refused_for_a_full_replica_is_recoverable_others_fatal() {
        let full = Refusal::PromoteFailed(PromoteError::ReplicaFailing {
            what: "apply",
            source: StoreError::io(
                "write replica",
                std::path::Path::new("r"),
                std::io::Error::from_raw_os_error(libc::ENOSPC),
            ),
        });
        assert_eq!(full.class(), ErrorClass::Recoverable);
        assert_eq!(full.code().as_str(), "promote-failed");
        assert!(full.to_string().contains("cannot be written"), "{full}");
        let busy = Refusal::PromoteFailed(PromoteError::InProgress);
        assert_eq!(busy.class(), ErrorClass::Recoverable);
        let behind = Refusal::PromoteFailed(PromoteError::NotCaughtUp {
            applied: 1,
            upto: 2,
        });
        assert_eq!(behind.class(), ErrorClass::Fatal);
    }
}
