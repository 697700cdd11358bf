//! The stream loop of an accepted connection: each segment is verified
//! (header, volume, connection stream, the stream's generation and epoch,
//! counter, authentication) and appended to the journal; after a batch, one
//! fsync (group commit), one ack, then the hand-over to the applier. A
//! PROMOTE (planned failover) is handed to the applier in stream order.
//! Every PING is answered with an ack, and the source hears an ack at least
//! as often as it pings even while this end is busy; a source that sent
//! nothing for the peer timeout is gone and its stream ends (see
//! [`Heartbeat`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::SendTimeoutError;

use replica_proto::frame::{self, FrameError};
use replica_proto::msg::{self, Ack, Message};
use replica_store::journal::FramePos;

use super::accept::ConnCtx;
use super::apply::ApplyMsg;
use super::keys::KeyCache;
use super::promote::{request_promotion, PromoteReq};
use super::refusal::Refusal;
use super::stream::{SlotGuard, Stream, StreamState};
use super::PUMP_INTERVAL;
use crate::keystore::KeyStore;
use crate::link::{Link, LinkError, Liveness};
use crate::status::{Connection, ReasonKind};

/// The longest a source's silence is waited out, whatever its pings say.
const MAX_SILENCE: Duration = Duration::from_secs(3600);

/// How a stream's connection tells a live source from a dead one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Heartbeat {
    /// The source sent nothing for this long: it is gone.
    pub(super) silence: Duration,
    /// The source hears from the connection at least this often, an
    /// unchanged ack if nothing else (a large segment still arriving on a
    /// slow link, the applier's queue full, a planned failover catching
    /// up), so that it does not take a busy target for a dead one.
    pub(super) keepalive: Duration,
}

impl Heartbeat {
    /// From this target's settings and the ping interval the source's hello
    /// announced (ms, 0: not said). A source that pings less often than a
    /// third of this target's peer timeout (its own timeout is longer) is
    /// given three of its intervals: a quiet stream of it is not dead.
    pub(super) fn new(own: &Liveness, source_ping_ms: u64) -> Self {
        let source_ping = (source_ping_ms > 0).then(|| Duration::from_millis(source_ping_ms));
        let silence = source_ping.map_or(own.peer_timeout, |p| {
            own.peer_timeout.max(p.saturating_mul(3).min(MAX_SILENCE))
        });
        let keepalive = source_ping
            .map_or(own.ping_interval(), |p| p.min(own.ping_interval()))
            .max(PUMP_INTERVAL);
        Self { silence, keepalive }
    }
}

/// A segment appended to the journal, with its authenticated payload.
type Journaled = (FramePos, Vec<u8>);

/// One accepted connection streaming into a stream. What it holds is its
/// own (the connection's keying stream, its counter, what it appended);
/// the stream's state — generation, epoch, durable and applied sequence —
/// it reads from the stream each time.
pub(super) struct Session {
    /// The stream it feeds.
    pub(super) stream: Arc<Stream>,
    _slot: SlotGuard,
    /// Its session number in the stream's slot.
    pub(super) id: u64,
    /// The subject common name of the source's certificate: the session
    /// ends once a configuration reload no longer allows it.
    cn: String,
    /// The connection's keying stream id (agreed at the handshake).
    stream_id: [u8; 16],
    next_counter: u64,
    /// Last record this connection appended to the journal (durable at the
    /// next sync).
    received: u64,
    /// The stream keys its segments are sealed with.
    keys: KeyCache,
    /// When its source counts as gone.
    heartbeat: Heartbeat,
}

impl Session {
    /// A session of the source named `cn` that holds `slot` as session
    /// `id`, starting after record `durable`, opening segments with the data
    /// keys `keys`, its source live while `heartbeat` says so.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        stream: Arc<Stream>,
        slot: SlotGuard,
        id: u64,
        cn: String,
        stream_id: [u8; 16],
        durable: u64,
        keys: Arc<KeyStore>,
        heartbeat: Heartbeat,
    ) -> Self {
        Self {
            stream,
            _slot: slot,
            id,
            cn,
            stream_id,
            next_counter: 0,
            received: durable,
            keys: KeyCache::new(keys),
            heartbeat,
        }
    }
}

/// What an ack says about the replica's state.
pub(super) fn ack_flags(st: &StreamState) -> u64 {
    let mut f = 0;
    if st.inconsistent() {
        f |= msg::ACK_INCONSISTENT;
    }
    if st.disk.needs_full_resync {
        f |= msg::ACK_NEEDS_FULL_RESYNC;
    }
    f
}

/// The ack the stream's state calls for: durable and applied record and
/// what the replica is good for, read together under the stream's lock
/// (the applier clears a resync before it publishes its END as applied, so
/// "consistent" never comes with an applied record the replica was not
/// consistent at).
fn ack(stream: &Stream) -> Ack {
    let st = stream.lock_state();
    Ack {
        durable_seq: stream.durable_with(&st),
        applied_seq: st.published,
        flags: ack_flags(&st),
    }
}

/// Tells the source this target is alive while the connection waits: an
/// ack of the current state, handed to the socket at once.
fn keep_alive(link: &mut Link, stream: &Stream) {
    send_ack(link, stream, ack(stream));
    // A dead socket shows at the next read.
    let _ = link.pump(Duration::ZERO, None);
}

/// Sends ack `a` (read from the stream's state before this call), after
/// every chunk comparison answered so far: a record is published as
/// applied only once its answer is queued, so the source hears the answer
/// to a hash record before any ack that reports it applied, and takes a
/// record applied without an answer for a lost answer.
fn send_ack(link: &mut Link, stream: &Stream, a: Ack) {
    for a in stream.answers.take() {
        link.send(&a.into_message());
    }
    link.send(&Message::Ack(a));
}

impl ConnCtx {
    /// Receives segments until the peer closes, a newer connection takes
    /// the stream over, the daemon stops, the source goes silent, a
    /// segment is refused, or a configuration reload no longer allows the
    /// source (checked before each batch, so within a pump interval).
    pub(super) fn receive(&self, link: &mut Link, s: &mut Session) -> Result<(), Refusal> {
        let mut last_sent = ack(&s.stream);
        loop {
            if let Some(end) = self.ending(link, s) {
                return end;
            }
            link.pump(PUMP_INTERVAL, None).map_err(Refusal::Network)?;
            let mut appended: Vec<Journaled> = Vec::new();
            // An ack is owed even if nothing changed (a duplicate segment,
            // a ping).
            let mut must_ack = false;
            let mut pings = 0u64;
            let mut failure = None;
            loop {
                let m = match link.recv() {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(LinkError::Closed) if appended.is_empty() => return Ok(()),
                    Err(LinkError::Closed) => break,
                    Err(e) => {
                        failure = Some(Refusal::Network(e));
                        break;
                    }
                };
                match m {
                    Message::Segment(f) => match self.segment(s, f) {
                        Ok(Some(a)) => appended.push(a),
                        Ok(None) => must_ack = true,
                        Err(r) => {
                            failure = Some(r);
                            break;
                        }
                    },
                    Message::Ping => {
                        must_ack = true;
                        pings += 1;
                    }
                    Message::Error(e) => return Err(Refusal::Peer(e.message)),
                    Message::Promote(p) => {
                        // Everything before it in the stream is journaled
                        // and queued: the applier promotes after it.
                        let stream = s.stream.clone();
                        let r = request_promotion(
                            &s.stream,
                            PromoteReq {
                                planned_upto: Some(p.upto),
                                point: None,
                                epoch: Some(p.epoch),
                            },
                            s.heartbeat.keepalive,
                            || keep_alive(link, &stream),
                        );
                        match r {
                            Ok(done) => {
                                link.send(&Message::Promoted(done));
                                link.close(Duration::from_secs(5));
                                return Ok(());
                            }
                            Err(e) => {
                                failure = Some(Refusal::PromoteFailed(e));
                                break;
                            }
                        }
                    }
                    other => {
                        failure = Some(Refusal::UnexpectedMessage(other.kind()));
                        break;
                    }
                }
            }
            // Group commit: one fsync for everything that arrived, then ack.
            if !appended.is_empty() {
                let durable = s.stream.lock_journal().sync().map_err(Refusal::Storage)?;
                self.board
                    .update(&s.stream.id, |st| st.durable_seq = durable);
            }
            if pings > 0 {
                self.board.update(&s.stream.id, |st| st.pings += pings);
            }
            // Acknowledged as soon as it is durable, before the (bounded)
            // hand-over to the applier, which may wait for a slow replica.
            // Also when the source heard nothing for a ping interval (a
            // large segment still arriving on a slow link): it must not
            // take a busy target for a dead one.
            // (The ack is read before the answers are taken: see
            // `send_ack`.)
            let a = ack(&s.stream);
            if must_ack
                || a != last_sent
                || link.quiet_for() >= s.heartbeat.keepalive
                || s.stream.answers.waiting()
            {
                send_ack(link, &s.stream, a);
                let _ = link.pump(Duration::ZERO, None);
                last_sent = a;
            }
            // Every journaled segment reaches the applier in order, even
            // when the session ends meanwhile (it would leave a gap).
            let mut end = None;
            for (pos, body) in appended {
                let e = self.to_applier(
                    link,
                    s,
                    ApplyMsg::Segment {
                        pos,
                        body: Some(body),
                    },
                );
                end = end.or(e);
            }
            if let Some(r) = failure {
                return Err(r);
            }
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Whether the session must end now: quietly (`Ok`: the daemon stops,
    /// a newer connection took the stream over) or with a refusal (a
    /// reload no longer allows the source, the source went silent).
    fn ending(&self, link: &Link, s: &Session) -> Option<Result<(), Refusal>> {
        if self.stop.load(Ordering::Acquire) {
            return Some(Ok(()));
        }
        if !s.stream.conn.is_current(s.id) {
            tracing::info!(volume = %s.stream.id, "a newer connection took over this volume");
            return Some(Ok(()));
        }
        if !s.stream.settings.allows(&s.cn) {
            // Everything of an earlier batch is journaled, acknowledged
            // and queued: the session ends between batches.
            return Some(Err(Refusal::NotAuthorized {
                subject: s.cn.clone(),
                volume: s.stream.id.clone(),
            }));
        }
        if link.silent_for() >= s.heartbeat.silence {
            return Some(Err(Refusal::SourceSilent {
                secs: s.heartbeat.silence.as_secs(),
            }));
        }
        None
    }

    /// Hands `m` to the applier in stream order, waiting while its queue is
    /// full (a slow replica pushes back on the source); the source hears
    /// from this target meanwhile. Returns when the applier has it, or is
    /// gone (the daemon stops). While it waits, what would end the session
    /// is watched ([`Self::ending`], a dead link): the segment must still
    /// reach the applier, but the source is no longer told this target is
    /// alive and the volume is shown not connected with the reason at once;
    /// the session ends once the segment is handed over (the returned end).
    fn to_applier(
        &self,
        link: &mut Link,
        s: &Session,
        mut m: ApplyMsg,
    ) -> Option<Result<(), Refusal>> {
        let mut end: Option<Result<(), Refusal>> = None;
        loop {
            match s.stream.apply_tx.send_timeout(m, s.heartbeat.keepalive) {
                Ok(()) | Err(SendTimeoutError::Disconnected(_)) => return end,
                Err(SendTimeoutError::Timeout(back)) => {
                    m = back;
                    if end.is_some() {
                        continue;
                    }
                    end = self.ending(link, s);
                    if end.is_none() {
                        send_ack(link, &s.stream, ack(&s.stream));
                        if let Err(e) = link.pump(Duration::ZERO, None) {
                            end = Some(Err(Refusal::Network(e)));
                        }
                    }
                    if let Some(Err(r)) = &end {
                        if s.stream.conn.is_current(s.id) {
                            let why = r.to_string();
                            tracing::warn!(volume = %s.stream.id, "{why}; the segment received last still goes to the replica first");
                            self.board.update(&s.stream.id, |st| {
                                st.connection = Connection::StandAlone;
                                st.set_reason(ReasonKind::Session, why);
                            });
                        }
                    }
                }
            }
        }
    }

    /// Verifies one segment and appends it to the journal. `Ok(None)` for
    /// a duplicate of what is already durable.
    fn segment(&self, s: &mut Session, f: Vec<u8>) -> Result<Option<Journaled>, Refusal> {
        let h = frame::check(&f).map_err(|e| match e {
            FrameError::Unsupported(_) => Refusal::Unsupported(e),
            // Its checksums hold, so it was not damaged on the way: a
            // sender that builds such headers is broken, resending helps not.
            FrameError::Malformed(_) => Refusal::MalformedSegment(e),
            _ => Refusal::CorruptSegment(e),
        })?;
        if h.volume_tag != s.stream.tag {
            return Err(Refusal::WrongVolume);
        }
        if h.stream_id != s.stream_id {
            return Err(Refusal::WrongStream);
        }
        let current = {
            let st = s.stream.lock_state();
            h.epoch == st.disk.epoch && hex::encode(h.generation) == st.disk.generation
        };
        if !current {
            return Err(Refusal::WrongGeneration);
        }
        if h.counter != s.next_counter {
            return Err(Refusal::Replay {
                got: h.counter,
                expected: s.next_counter,
            });
        }
        let key = s
            .keys
            .get(&s.stream.id, &h)
            .map_err(|e| Refusal::UnknownSegmentKey {
                key_id: h.key_id,
                cause: e,
            })?;
        // Authenticate here (the second AES-GCM pass after TLS); the
        // applier decompresses and checks the records, on its own thread.
        let body = frame::authenticate(&h, &f, key).map_err(|e| match e {
            FrameError::Authentication => Refusal::Authentication {
                first: h.first_seq,
                last: h.last_seq,
            },
            other => Refusal::MalformedSegment(other),
        })?;
        s.next_counter += 1;
        self.board.update(&s.stream.id, |st| {
            st.segments += 1;
            st.record_bytes += u64::from(h.plain_len);
            st.frame_bytes += f.len() as u64;
        });
        if h.last_seq <= s.received {
            // Everything in it is already journaled: acknowledge, keep once.
            return Ok(None);
        }
        if h.first_seq > s.received + 1 && h.features & frame::FEATURE_RESYNC_GAP == 0 {
            return Err(Refusal::SequenceGap {
                first: h.first_seq,
                received: s.received,
            });
        }
        let pos = s
            .stream
            .lock_journal()
            .append(&f, &h)
            .map_err(Refusal::Storage)?;
        s.received = h.last_seq;
        Ok(Some((pos, body)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own(peer_timeout_secs: u64) -> Liveness {
        Liveness {
            peer_timeout: Duration::from_secs(peer_timeout_secs),
            keepalive: None,
        }
    }

    #[test]
    fn a_source_is_dead_after_the_peer_timeout_or_three_of_its_rarer_pings() {
        // Same settings on both ends (or the source's not said).
        let h = Heartbeat::new(&own(30), 10_000);
        assert_eq!(h.silence, Duration::from_secs(30));
        assert_eq!(h.keepalive, Duration::from_secs(10));
        assert_eq!(Heartbeat::new(&own(30), 0), h);
        // A source that pings more often: this target's timeout holds, and
        // it hears from the target as often as it pings.
        let h = Heartbeat::new(&own(30), 1_000);
        assert_eq!(h.silence, Duration::from_secs(30));
        assert_eq!(h.keepalive, Duration::from_secs(1));
        // One with a longer timeout pings less often: its quiet stream is
        // not dead here.
        let h = Heartbeat::new(&own(3), 20_000);
        assert_eq!(h.silence, Duration::from_secs(60));
        assert_eq!(h.keepalive, Duration::from_secs(1));
        // Whatever it says, within bounds.
        let h = Heartbeat::new(&own(3), u64::MAX);
        assert_eq!(h.silence, MAX_SILENCE);
        assert_eq!(Heartbeat::new(&own(3), 1).keepalive, PUMP_INTERVAL);
    }
}
