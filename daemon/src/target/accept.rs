//! Serving one connection: TLS, the source's identity and hello, the
//! checks that decide whether it may stream (authorisation, Critical,
//! promoted, failover, epoch), the takeover of an older connection, the
//! welcome; and refusing, with the reason on the wire and in the status.

use std::collections::HashMap;
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use replica_proto::confirm::{EXPORTER_LABEL, EXPORTER_LEN};
use replica_proto::handshake::TargetSide;
use replica_proto::keys;
use replica_proto::msg::{self, ErrorMsg, Hello, Message, Welcome};

use super::door::Ticket;
use super::receive::{Heartbeat, Session};
use super::refusal::Refusal;
use super::stream::{self, Stream};
use super::takeover::{self, Takeover};
use super::PUMP_INTERVAL;
use crate::keystore::KeyStore;
use crate::link::{Link, LinkError, Liveness};
use crate::retry::ErrorClass;
use crate::status::{Connection, ReasonKind, StatusBoard};

/// What a connection's thread shares with the target.
pub(super) struct ConnCtx {
    /// Every stream, by volume id.
    pub(super) streams: HashMap<String, Arc<Stream>>,
    /// The data keys.
    pub(super) keys: Arc<KeyStore>,
    /// The TLS configuration in force when the connection came.
    pub(super) tls: Arc<rustls::ServerConfig>,
    /// Status.
    pub(super) board: Arc<StatusBoard>,
    /// Set when the daemon stops.
    pub(super) stop: Arc<AtomicBool>,
    /// The TLS handshake, hello and key confirmation must be done within it.
    pub(super) handshake_timeout: Duration,
    /// When a connection's peer counts as gone.
    pub(super) liveness: Liveness,
}

/// A refused connection, with the stream when the refusal says something
/// about its replica (a Fatal one then makes the stream Critical);
/// refusals of the caller (unknown volume, not authorised, stale epoch)
/// leave the stream alone.
struct Refused {
    refusal: Refusal,
    replica: Option<Arc<Stream>>,
}

impl From<Refusal> for Refused {
    fn from(refusal: Refusal) -> Self {
        Self {
            refusal,
            replica: None,
        }
    }
}

/// What the welcome tells the source.
struct Entry {
    durable: u64,
    applied: u64,
    epoch: u64,
    resync_required: bool,
    inconsistent: bool,
}

impl ConnCtx {
    /// Serves the connection on `sock`, accepted at `accepted`, until it
    /// ends. The TLS handshake, the hello, the key confirmation and the
    /// takeover of an older connection share one deadline.
    pub(super) fn serve(self, sock: TcpStream, accepted: Instant, mut ticket: Ticket) {
        let deadline = accepted + self.handshake_timeout;
        let conn = match rustls::ServerConnection::new(self.tls.clone()) {
            Ok(c) => rustls::Connection::Server(c),
            Err(e) => {
                tracing::error!(error = %e, "TLS setup");
                return;
            }
        };
        let mut link = match Link::new(sock, conn, &self.liveness) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "connection setup");
                return;
            }
        };
        if let Err(e) = link.handshake(deadline.saturating_duration_since(Instant::now())) {
            // A refused certificate is logged (the client sees the
            // alert); a peer that said nothing or left is not worth a
            // warning each (a scan, a flood: the door reports those).
            match e {
                LinkError::Timeout(_) | LinkError::Closed => {
                    tracing::debug!(error = %e, "TLS handshake did not finish")
                }
                _ => tracing::warn!(error = %e, "TLS handshake failed"),
            }
            return;
        }
        let mut session = match self.accept(&mut link, deadline, &mut ticket) {
            Ok(s) => s,
            Err(r) => {
                self.refuse(&mut link, r.replica.as_ref(), &r.refusal);
                return;
            }
        };
        let stream = session.stream.clone();
        self.board.update(&stream.id, |s| {
            s.connection = Connection::Connected;
            s.clear_reason(ReasonKind::Session);
            s.sessions += 1;
        });
        let result = self.receive(&mut link, &mut session);
        // Still the stream's connection: it is not connected any more, and
        // why. Published while it holds the stream's slot, so a newer
        // connection's Connected always comes after.
        if stream.conn.is_current(session.id) {
            self.board
                .update(&stream.id, |s| s.connection = Connection::StandAlone);
            if let Err(r) = &result {
                self.report(&stream, r);
            }
        } else if let Some(r) = result
            .as_ref()
            .err()
            .filter(|r| r.class() == ErrorClass::Fatal)
        {
            // Taken over, but what it found says something about the replica.
            self.report(&stream, r);
        }
        // Nothing more goes to the journal from here: a newer connection
        // may take the stream over while this one says goodbye (which a
        // dead path makes wait for its deadline).
        drop(session);
        match result {
            Ok(()) => link.close(Duration::from_secs(1)),
            Err(r) => {
                tracing::warn!(volume = %stream.id, code = r.code().as_str(), class = ?r.class(), "{r}");
                self.tell(&mut link, &r);
            }
        }
    }

    /// Tells the peer why it is refused and closes; a Fatal refusal that
    /// names `stream` makes it Critical, a Recoverable one a Warning.
    fn refuse(&self, link: &mut Link, stream: Option<&Arc<Stream>>, r: &Refusal) {
        tracing::warn!(code = r.code().as_str(), class = ?r.class(), "{r}");
        if let Some(s) = stream {
            self.report(s, r);
        }
        self.tell(link, r);
    }

    /// What refusal `r` means for `stream`: a Fatal one that says
    /// something about the replica makes it Critical; any other one is a
    /// Warning of its session (a source a reload no longer allows: its
    /// replication stopped, the replica is fine).
    fn report(&self, stream: &Stream, r: &Refusal) {
        let message = r.to_string();
        if r.class() == ErrorClass::Fatal && r.blames_replica() {
            stream.go_critical(&self.board, &message);
        } else {
            self.board.update(&stream.id, |st| {
                st.set_reason(ReasonKind::Session, message);
            });
        }
    }

    /// Sends the peer refusal `r` and closes the connection.
    fn tell(&self, link: &mut Link, r: &Refusal) {
        link.send(&Message::Error(ErrorMsg {
            class: r.class(),
            code: r.code(),
            message: r.to_string(),
        }));
        link.close(Duration::from_secs(2));
    }

    /// Checks the peer, its hello and its key confirmation, and only then
    /// the stream: takes it over from an older connection and welcomes the
    /// source. Nothing the hello says reaches the stream's state before the
    /// source proved its key on this TLS session.
    fn accept(
        &self,
        link: &mut Link,
        deadline: Instant,
        ticket: &mut Ticket,
    ) -> Result<Session, Refused> {
        let cn = link
            .tls()
            .peer_certificates()
            .and_then(|c| c.first())
            .and_then(crate::tls::subject_cn)
            .ok_or(Refusal::NoIdentity)?;
        let mut exporter = [0u8; EXPORTER_LEN];
        link.export(EXPORTER_LABEL, &mut exporter)
            .map_err(Refusal::Exporter)?;
        let mut opening = TargetSide::new(exporter);
        let ring = self.keys.get();
        let (first, raw) = recv_raw(link, deadline)?;
        let hello = opening.hello(first, &raw).map_err(Refusal::Opening)?;
        if hello.protocol != msg::PROTOCOL_VERSION {
            return Err(Refusal::ProtocolVersion(hello.protocol).into());
        }
        // Key confirmation (replica_proto::confirm) before anything else:
        // a refusal here touches no stream, the peer has proved nothing;
        // every refusal after it comes from a target the source can trust.
        let reply = opening
            .confirm(&ring, recv(link, deadline)?)
            .map_err(Refusal::Opening)?;
        link.send(&reply);
        link.authenticated();
        let stream = self
            .streams
            .get(&hello.volume)
            .cloned()
            .ok_or_else(|| Refusal::VolumeNotFound(hello.volume.clone()))?;
        if !stream.settings.allows(&cn) {
            return Err(Refusal::NotAuthorized {
                subject: cn,
                volume: stream.id.clone(),
            }
            .into());
        }
        // From here on the source holds the stream's key.
        ticket.authenticated();
        let (id, slot) = stream::claim(&stream, deadline).ok_or(Refusal::StillStreaming)?;
        let generation = decode16(&hello.generation)?;
        let src_rand = decode16(&hello.source_random)?;
        let target_rand = keys::random16().map_err(Refusal::Random)?;
        let stream_id = keys::stream_id(&src_rand, &target_rand);
        let gen_hex = hex::encode(generation);
        if let Some(t) = admit(&stream, &hello, &gen_hex)? {
            // Queued behind every segment of the old generation: the
            // applier applies them, then starts the new sequence space.
            // A takeover the applier failed says something about the
            // replica; one that did not get its turn does not.
            takeover::request(&stream, t).map_err(|r| match r {
                Refusal::Takeover(_) => blame(&stream, r),
                other => other.into(),
            })?;
        }
        let entry = enter(&stream, &hello, &gen_hex)?;
        link.send(&Message::Welcome(Welcome {
            protocol: msg::PROTOCOL_VERSION,
            features: hello.features & msg::PROTOCOL_FEATURES,
            target_random: hex::encode(target_rand),
            durable_seq: entry.durable,
            applied_seq: entry.applied,
            epoch: entry.epoch,
            resync_required: entry.resync_required,
            inconsistent: entry.inconsistent,
        }));
        tracing::info!(volume = %stream.id, source = %cn, durable = entry.durable, resync_required = entry.resync_required, "stream accepted");
        self.board.update(&stream.id, |s| {
            s.generation = gen_hex.clone();
            s.epoch = entry.epoch;
        });
        Ok(Session::new(
            stream,
            slot,
            id,
            cn,
            stream_id,
            entry.durable,
            self.keys.clone(),
            Heartbeat::new(&self.liveness, hello.ping_interval_ms),
        ))
    }
}

/// A refusal that says something about `stream`'s replica.
fn blame(stream: &Arc<Stream>, refusal: Refusal) -> Refused {
    Refused {
        refusal,
        replica: Some(stream.clone()),
    }
}

/// 16 bytes from hex.
fn decode16(s: &str) -> Result<[u8; 16], Refusal> {
    let mut b = [0u8; 16];
    hex::decode_to_slice(s, &mut b).map_err(|_| Refusal::MalformedHello)?;
    Ok(b)
}

/// Whether the source of `hello` may stream into `stream` now (not
/// Critical, not promoted or being failed over, no takeover pending, not
/// at an older epoch), and whether its stream of generation `gen_hex`
/// takes the stream over.
fn admit(stream: &Stream, hello: &Hello, gen_hex: &str) -> Result<Option<Takeover>, Refusal> {
    let st = stream.lock_state();
    if let Some(c) = &st.disk.critical {
        return Err(Refusal::Critical {
            volume: stream.id.clone(),
            reason: c.clone(),
        });
    }
    if let Some(p) = &st.disk.promoted {
        return Err(Refusal::Promoted {
            volume: stream.id.clone(),
            epoch: p.epoch,
        });
    }
    if st.promoting {
        return Err(Refusal::FailingOver(stream.id.clone()));
    }
    if st.takeover_pending {
        return Err(Refusal::TakeoverPending);
    }
    if hello.epoch < st.disk.epoch {
        return Err(Refusal::StaleEpoch {
            source_epoch: hello.epoch,
            target_epoch: st.disk.epoch,
        });
    }
    Ok(takeover::takeover_for(&st.disk, gen_hex, hello))
}

/// Enters the source's epoch in the stream's state and reads what the
/// welcome says; refuses a source whose oldest record is past what the
/// target has.
fn enter(stream: &Arc<Stream>, hello: &Hello, gen_hex: &str) -> Result<Entry, Refused> {
    let mut st = stream.lock_state();
    if st.disk.generation != gen_hex || st.disk.critical.is_some() || st.disk.promoted.is_some() {
        // The applier refused the takeover (Critical, promoted) or
        // another one got in between.
        return Err(Refusal::ChangedDuringAccept.into());
    }
    st.disk.epoch = hello.epoch;
    st.save().map_err(Refusal::Storage)?;
    let durable = stream.durable_with(&st);
    if hello.oldest_seq > durable.saturating_add(1) {
        return Err(blame(
            stream,
            Refusal::MissingRecords {
                oldest: hello.oldest_seq,
                durable,
            },
        ));
    }
    Ok(Entry {
        durable,
        applied: st.published,
        epoch: st.disk.epoch,
        resync_required: st.disk.needs_full_resync,
        inconsistent: st.inconsistent(),
    })
}

/// Waits for the next message of the handshake until `deadline`.
fn recv(link: &mut Link, deadline: Instant) -> Result<Message, Refusal> {
    recv_raw(link, deadline).map(|(m, _)| m)
}

/// [`recv`], with the message's bytes as received.
fn recv_raw(link: &mut Link, deadline: Instant) -> Result<(Message, Vec<u8>), Refusal> {
    loop {
        if let Some(m) = link.recv_raw().map_err(Refusal::Network)? {
            return Ok(m);
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(Refusal::HelloTimeout)?;
        link.pump(left.min(PUMP_INTERVAL), None)
            .map_err(Refusal::Network)?;
    }
}
