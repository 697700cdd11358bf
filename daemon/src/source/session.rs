//! One connection to the target: connect (TLS), handshake (hello and
//! welcome: where the stream resumes, whether the target needs a copy) and
//! the threads of a session (batcher, sealing workers, the pump).

use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::bounded;
use replica_proto::confirm::{EXPORTER_LABEL, EXPORTER_LEN};
use replica_proto::frame::SegmentHeader;
use replica_proto::handshake::{HandshakeError, SourceSide, SourceStep};
use replica_proto::keys::{self};
use replica_proto::msg::{self, ErrorClass as WireClass, ErrorCode, Hello, Message};

use super::batch::BatchCtx;
use super::drain::Shared;
use super::seal::{seal_worker, Job, SealError, SessionKeys};
use super::Source;
use crate::link::{CertificateFailure, Link, LinkError, Liveness};
use crate::retry::{Backoff, ErrorClass};
use crate::status::{Connection, ReasonKind};

/// Stop pulling sealed segments while this much is queued for the socket.
pub(super) const MAX_QUEUED_BYTES: usize = 16 << 20;

/// Why a session ended. Its [`class`](SessionError::class) decides between
/// a retry on the schedule and Critical.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The target's address does not resolve.
    #[error("resolve {target}: {source}")]
    Resolve {
        /// The configured address.
        target: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// No address of the target accepted the connection.
    #[error("connect {target}: {}", .source.as_ref().map_or_else(|| "no address".to_owned(), ToString::to_string))]
    Connect {
        /// The configured address.
        target: String,
        /// The last address's error.
        #[source]
        source: Option<std::io::Error>,
    },
    /// `target_name` is not a valid TLS server name.
    #[error("target_name {name:?}: {source}")]
    TargetName {
        /// The configured name.
        name: String,
        /// Why.
        #[source]
        source: rustls_pki_types::InvalidDnsNameError,
    },
    /// The TLS client could not be set up.
    #[error("TLS setup: {0}")]
    TlsSetup(#[source] rustls::Error),
    /// This source refused the target's certificate.
    #[error("certificate refused: {0}")]
    Certificate(#[source] LinkError),
    /// The target says it refused this source's certificate (a TLS alert,
    /// which anyone on the path could send: retried, not Critical).
    #[error("the target refused this source's certificate ({0}): check that it is signed by the CA the target trusts, not expired, and that its name is in the target's allowed_sources; retrying")]
    CertificateRefused(#[source] LinkError),
    /// The connection failed.
    #[error(transparent)]
    Link(LinkError),
    /// The operating system refused a resource (a thread, a pipe, random
    /// bytes).
    #[error("{what}: {source}")]
    Resource {
        /// What was being set up.
        what: &'static str,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Random bytes for the handshake could not be drawn.
    #[error("{0}")]
    Random(#[source] replica_proto::keys::KeyError),
    /// The target did not answer the hello in time.
    #[error("no welcome from target")]
    NoWelcome,
    /// The target sent nothing (not even an ack of a ping) for the peer
    /// timeout: the connection is dead.
    #[error("the target sent nothing for {secs} s (network.peer_timeout_secs): the connection is dead; reconnecting")]
    TargetSilent {
        /// The peer timeout, s.
        secs: u64,
    },
    /// The target could not confirm the key this source holds: the key
    /// rings differ.
    #[error("the target refused key id {key_id}: this source's key {key_id} is not the target's key {key_id} (the key rings differ). Copy the same key ring file to both sites, then reload both daemons (SIGHUP); target said: {message}")]
    KeyRefused {
        /// The key id this source confirmed with.
        key_id: u32,
        /// What the target said.
        message: String,
    },
    /// The target could not prove that it holds this source's key: another
    /// key ring, or not the real target.
    #[error("the target did not prove it holds key id {key_id}: its key ring differs from this source's, or the address does not reach the real target; nothing it said was used")]
    TargetUnconfirmed {
        /// The key id.
        key_id: u32,
    },
    /// The target said something out of turn before it proved its key.
    #[error(
        "the target answered out of turn before proving its key ({0}); nothing it said was used"
    )]
    Unconfirmed(String),
    /// The target refused the stream before the welcome.
    #[error("target {}: {message} ({code})", if *.class == WireClass::Fatal { "refused" } else { "busy" })]
    Refused {
        /// Whether the target says to retry.
        class: WireClass,
        /// Its code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The target ended the stream with an error.
    #[error("target: {message} ({code})")]
    Ended {
        /// Whether the target says to retry.
        class: WireClass,
        /// Its code.
        code: ErrorCode,
        /// Its explanation.
        message: String,
    },
    /// The volume was failed over without this source: it is demoted.
    #[error("{0}")]
    Demoted(String),
    /// The target said something this source does not expect.
    #[error("{0}")]
    Protocol(String),
    /// The target has records this source's spool no longer holds.
    #[error("sequence gap: the target has records up to {durable} but this source's spool starts at {oldest}: not the same source, or the target lost data")]
    SequenceGap {
        /// The target's durable record.
        durable: u64,
        /// The spool's oldest record.
        oldest: u64,
    },
    /// The spool could not be read.
    #[error("spool: {0}")]
    Spool(#[source] super::spool::SpoolError),
    /// The stream key could not be derived.
    #[error("{0}")]
    Key(#[source] replica_proto::keys::KeyError),
    /// A segment could not be sealed.
    #[error("sealing failed: {0}")]
    Seal(#[source] super::seal::SealError),
    /// The drain stopped for a non-recoverable error.
    #[error("{0}")]
    Drain(String),
    /// The capture ring closed and everything it held is on the target.
    #[error("capture ring closed: the protected volume's table was removed; everything captured is durable on the target; protect it again to resume")]
    RingClosed,
}

impl SessionError {
    /// Retry on the schedule, or Critical.
    pub fn class(&self) -> ErrorClass {
        match self {
            Self::Resolve { .. }
            | Self::Connect { .. }
            | Self::Link(_)
            | Self::Resource { .. }
            | Self::Random(_)
            | Self::NoWelcome
            | Self::TargetSilent { .. }
            | Self::TargetUnconfirmed { .. }
            | Self::Unconfirmed(_)
            | Self::CertificateRefused(_)
            | Self::Spool(_) => ErrorClass::Recoverable,
            Self::Refused { class, .. } | Self::Ended { class, .. } => match class {
                WireClass::Fatal => ErrorClass::Fatal,
                WireClass::Recoverable => ErrorClass::Recoverable,
            },
            Self::TargetName { .. }
            | Self::TlsSetup(_)
            | Self::Certificate(_)
            | Self::Demoted(_)
            | Self::KeyRefused { .. }
            | Self::Protocol(_)
            | Self::SequenceGap { .. }
            | Self::Key(_)
            | Self::Seal(_)
            | Self::Drain(_)
            | Self::RingClosed => ErrorClass::Fatal,
        }
    }

    /// A link error: a certificate this source refused is a configuration
    /// problem; one the target says it refused is reported and retried.
    pub(super) fn link(e: LinkError) -> Self {
        match e.certificate_failure() {
            Some(CertificateFailure::PeerRefusedHere) => Self::Certificate(e),
            Some(CertificateFailure::OursRefusedThere) => Self::CertificateRefused(e),
            None => Self::Link(e),
        }
    }
}

impl Source {
    pub(super) fn connect(&self) -> Result<Link, SessionError> {
        let cfg = self.cfg();
        let addrs: Vec<_> = cfg
            .target
            .to_socket_addrs()
            .map_err(|source| SessionError::Resolve {
                target: cfg.target.clone(),
                source,
            })?
            .collect();
        let timeout = Duration::from_secs(cfg.network.handshake_timeout_secs);
        let mut last = None;
        let mut sock = None;
        for a in addrs {
            match TcpStream::connect_timeout(&a, timeout) {
                Ok(s) => {
                    sock = Some(s);
                    break;
                }
                Err(e) => last = Some(e),
            }
        }
        let sock = sock.ok_or_else(|| SessionError::Connect {
            target: cfg.target.clone(),
            source: last,
        })?;
        let name =
            rustls_pki_types::ServerName::try_from(cfg.target_name.clone()).map_err(|source| {
                SessionError::TargetName {
                    name: cfg.target_name.clone(),
                    source,
                }
            })?;
        let conn =
            rustls::ClientConnection::new(self.tls.get(), name).map_err(SessionError::TlsSetup)?;
        let mut link = Link::new(
            sock,
            rustls::Connection::Client(conn),
            &Liveness::new(&cfg.network),
        )
        .map_err(SessionError::link)?;
        link.handshake(timeout).map_err(SessionError::link)?;
        Ok(link)
    }

    /// One connection's life.
    pub(super) fn session(
        &self,
        shared: &Arc<Shared>,
        backoff: &mut Backoff,
    ) -> Result<(), SessionError> {
        let cfg = self.cfg();
        let mut link = self.connect()?;
        let welcome = self.handshake(&mut link, shared)?;
        backoff.reset();
        let vol = cfg.volume.clone();
        self.board.update(&vol, |s| {
            s.connection = Connection::Connected;
            s.clear_reason(ReasonKind::Session);
            s.retries = 0;
            s.sessions += 1;
            s.durable_seq = welcome.durable;
        });
        let key = Arc::new(SessionKeys {
            store: self.keys.clone(),
            stream_id: welcome.stream_id,
            volume: cfg.volume.clone(),
            epoch: self.epoch(),
            cache: std::sync::Mutex::new(None),
        });
        key.current().map_err(SessionError::Key)?;

        let session_stop = Arc::new(AtomicBool::new(false));
        let (job_tx, job_rx) = bounded::<Job>(cfg.segment.queue);
        let (out_tx, out_rx) =
            bounded::<(u64, Result<Vec<u8>, SealError>)>(cfg.segment.queue + cfg.segment.workers);
        let (wake_rx, wake_tx) = UnixStream::pair().map_err(|source| SessionError::Resource {
            what: "wake pipe",
            source,
        })?;
        let _ = wake_rx.set_nonblocking(true);
        let _ = wake_tx.set_nonblocking(true);
        let wake_tx = Arc::new(wake_tx);

        let mut workers = Vec::new();
        for i in 0..cfg.segment.workers {
            let rx = job_rx.clone();
            let tx = out_tx.clone();
            let key = key.clone();
            let wake = wake_tx.clone();
            let level = cfg.segment.zstd_level;
            workers.push(
                std::thread::Builder::new()
                    .name(format!("seal-{i}"))
                    .spawn(move || seal_worker(rx, tx, &key, level, &wake))
                    .ok(),
            );
        }
        drop(job_rx);
        drop(out_tx);

        let batcher = {
            let ctx = BatchCtx {
                header: SegmentHeader {
                    features: 0,
                    key_id: 0, // set by seal
                    stream_id: welcome.stream_id,
                    generation: shared.generation,
                    volume_tag: keys::volume_tag(&cfg.volume),
                    epoch: self.epoch(),
                    counter: 0,
                    first_seq: 0,
                    last_seq: 0,
                    record_count: 0,
                    plain_len: 0,
                    cipher_len: 0,
                    zstd_level: 0,
                    source_time_ns: 0,
                },
                max_bytes: cfg.segment.max_bytes,
                resume: welcome.durable.wrapping_add(1),
                gap: false,
                shared: shared.clone(),
                stop: session_stop.clone(),
                global_stop: self.stop.clone(),
            };
            std::thread::Builder::new()
                .name("batch".into())
                .spawn(move || ctx.run(job_tx))
                .map_err(|source| SessionError::Resource {
                    what: "cannot start a thread",
                    source,
                })?
        };

        shared.connected.store(true, Ordering::Release);
        let io_result = self.pump(&mut link, &out_rx, &wake_rx, shared);
        shared.connected.store(false, Ordering::Release);
        session_stop.store(true, Ordering::Release);
        shared.spool.wake();
        drop(out_rx);
        let batch_result = match batcher.join() {
            Ok(r) => r,
            Err(_) => {
                tracing::error!("batching thread panicked");
                std::process::abort();
            }
        };
        for w in workers.into_iter().flatten() {
            let _ = w.join();
        }
        if io_result.is_ok() {
            link.close(Duration::from_secs(2));
        }
        // The batcher's error (a damaged spool) outranks the link's.
        match (batch_result, io_result) {
            (Err(e), _) => Err(e),
            (Ok(()), r) => r,
        }
    }

    pub(super) fn handshake(
        &self,
        link: &mut Link,
        shared: &Shared,
    ) -> Result<Welcomed, SessionError> {
        let cfg = self.cfg();
        let src_rand = keys::random16().map_err(SessionError::Random)?;
        let oldest = shared.spool.oldest_seq();
        let ring = self.keys.get();
        let key_id = ring.active();
        let hello = Hello {
            protocol: msg::PROTOCOL_VERSION,
            features: msg::PROTOCOL_FEATURES,
            volume: cfg.volume.clone(),
            generation: hex::encode(shared.generation),
            epoch: self.epoch(),
            source_random: hex::encode(src_rand),
            oldest_seq: oldest,
            key_id,
            resync: shared.needs_resync().is_some(),
            replica_seeded: !cfg.initial_copy,
            ping_interval_ms: u64::try_from(
                Liveness::new(&cfg.network).ping_interval().as_millis(),
            )
            .unwrap_or(u64::MAX),
        };
        // Key confirmation (replica_proto::confirm): our tag over the hello
        // on this TLS session, then the target's over both, before
        // anything the target says is used.
        let mut exporter = [0u8; EXPORTER_LEN];
        link.export(EXPORTER_LABEL, &mut exporter)
            .map_err(SessionError::link)?;
        let (mut opening, first) = SourceSide::new(&ring, &exporter, hello).map_err(|e| {
            SessionError::Protocol(format!("cannot open with key id {key_id}: {e}"))
        })?;
        for m in &first {
            link.send(m);
        }
        let deadline = Instant::now() + Duration::from_secs(cfg.network.handshake_timeout_secs);
        let w = loop {
            let confirmed = opening.confirmed();
            let step = opening
                .receive(recv_handshake(link, deadline)?)
                .map_err(|e| match e {
                    HandshakeError::Mismatch(_) => SessionError::TargetUnconfirmed { key_id },
                    // Whoever answers before proving the key cannot stop
                    // this source: retried on the schedule.
                    other if !confirmed => SessionError::Unconfirmed(other.to_string()),
                    other => SessionError::Protocol(other.to_string()),
                })?;
            match step {
                SourceStep::Confirmed => link.authenticated(),
                // Refused before the target proved its key: nothing in it
                // is acted on (a stale-epoch or promoted from here does
                // not demote this source).
                SourceStep::RefusedUnconfirmed(e) if e.code == ErrorCode::KeyConfirmation => {
                    return Err(SessionError::KeyRefused {
                        key_id,
                        message: e.message,
                    })
                }
                // A real target confirms before it refuses for anything
                // but the opening itself (protocol, key): only those may
                // stop this source; anything else is retried.
                SourceStep::RefusedUnconfirmed(e) => {
                    let class = match e.code {
                        ErrorCode::Protocol | ErrorCode::UnknownKey => e.class,
                        _ => WireClass::Recoverable,
                    };
                    return Err(SessionError::Refused {
                        class,
                        code: e.code,
                        message: e.message,
                    });
                }
                SourceStep::Refused(e) => {
                    if e.class == WireClass::Fatal
                        && matches!(e.code, ErrorCode::StaleEpoch | ErrorCode::Promoted)
                    {
                        return Err(SessionError::Demoted(self.demote(&e.message)));
                    }
                    return Err(SessionError::Refused {
                        class: e.class,
                        code: e.code,
                        message: e.message,
                    });
                }
                SourceStep::Welcome(w) => break w,
            }
        };
        if w.protocol != msg::PROTOCOL_VERSION {
            return Err(SessionError::Protocol(format!(
                "target speaks protocol {}",
                w.protocol
            )));
        }
        let mut tgt_rand = [0u8; 16];
        hex::decode_to_slice(&w.target_random, &mut tgt_rand)
            .map_err(|_| SessionError::Protocol("malformed welcome".into()))?;
        // Resume right after what the target has durably, which the spool
        // must still hold (or not have reached yet).
        let resume = w.durable_seq.wrapping_add(1);
        let oldest = shared.spool.oldest_seq();
        if (resume.wrapping_sub(oldest) as i64) < 0 {
            return Err(SessionError::SequenceGap {
                durable: w.durable_seq,
                oldest,
            });
        }
        shared.acknowledged(w.durable_seq);
        // This target's figures, not the highest ever seen: a target that
        // started over (a new replica) is behind.
        shared
            .target_applied
            .store(w.applied_seq, Ordering::Release);
        self.board.update(&cfg.volume, |s| {
            s.durable_seq = w.durable_seq;
            s.applied_seq = w.applied_seq;
            s.target_inconsistent = w.inconsistent || w.resync_required;
        });
        if w.resync_required {
            tracing::warn!(volume = %cfg.volume, "the target holds no consistent copy of the volume: a full resync follows");
            shared.copy_required.store(true, Ordering::Release);
        }
        tracing::info!(volume = %cfg.volume, durable = w.durable_seq, "connected");
        Ok(Welcomed {
            stream_id: keys::stream_id(&src_rand, &tgt_rand),
            durable: w.durable_seq,
        })
    }
}

/// The next message of the handshake, until `deadline`.
fn recv_handshake(link: &mut Link, deadline: Instant) -> Result<Message, SessionError> {
    loop {
        if let Some(m) = link.recv().map_err(SessionError::link)? {
            return Ok(m);
        }
        let left = deadline
            .checked_duration_since(Instant::now())
            .ok_or(SessionError::NoWelcome)?;
        link.pump(left.min(Duration::from_millis(100)), None)
            .map_err(SessionError::link)?;
    }
}

pub(super) struct Welcomed {
    pub(super) stream_id: [u8; 16],
    pub(super) durable: u64,
}
