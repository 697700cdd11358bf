//! A hand-driven source connection that seals and sends frames itself.

use std::time::{Duration, Instant};

use crate::{Env, TARGET_CN};

/// A hand-driven source connection, for feeding the target frames a real
/// source never sends (corrupted, replayed, misrouted, wrongly keyed).
pub struct RawClient {
    /// The connection.
    pub link: replicad::link::Link,
    /// Stream id agreed at the handshake.
    pub stream_id: [u8; 16],
    /// What the target said.
    pub welcome: replica_proto::msg::Welcome,
    /// Volume.
    pub volume: String,
    /// Generation announced.
    pub generation: [u8; 16],
    /// Next counter.
    pub counter: u64,
    /// The key confirmation tag this client sent.
    pub source_tag: [u8; 32],
    /// What the target sent since the connection opened, in order: the
    /// applied record of each ack, and its answers to hash records.
    pub heard: Vec<Heard>,
}

/// A message a [`RawClient`] heard from the target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Heard {
    /// An ack saying this record applied.
    Applied(u64),
    /// An answer to a hash record.
    Compared(replica_proto::msg::Compared),
    /// What the replica read as zeros at a resync's BEGIN.
    Zeroes(replica_proto::msg::Zeroes),
}

/// A TLS connection to `addr` with the material `tls`, the target named
/// `name`, handshaken within `timeout`; nothing said yet.
pub fn tls_link(
    tls: &replicad::config::TlsConfig,
    addr: &str,
    name: &str,
    timeout: Duration,
) -> Result<replicad::link::Link, String> {
    let cfg = replicad::tls::client_config(tls).map_err(|e| e.to_string())?;
    let sock = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    let name =
        rustls_pki_types::ServerName::try_from(name.to_owned()).map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(cfg, name).map_err(|e| e.to_string())?;
    let mut link = replicad::link::Link::new(
        sock,
        rustls::Connection::Client(conn),
        &replicad::link::Liveness::default(),
    )
    .map_err(|e| e.to_string())?;
    link.handshake(timeout).map_err(|e| e.to_string())?;
    Ok(link)
}

/// The target's answer to an opening already sent on `link`, within
/// `timeout`: its welcome, or its refusal (before or after it proved its
/// key); `Err` if the link fails or the target's key confirmation does not
/// verify.
pub fn answer(
    link: &mut replicad::link::Link,
    opening: &mut replica_proto::handshake::SourceSide,
    timeout: Duration,
) -> Result<Result<Box<replica_proto::msg::Welcome>, replica_proto::msg::ErrorMsg>, String> {
    use replica_proto::handshake::SourceStep;
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(m) = link.recv().map_err(|e| e.to_string())? {
            match opening.receive(m).map_err(|e| format!("target: {e}"))? {
                SourceStep::Confirmed => link.authenticated(),
                SourceStep::Welcome(w) => return Ok(Ok(w)),
                SourceStep::Refused(e) | SourceStep::RefusedUnconfirmed(e) => return Ok(Err(e)),
            }
        }
        if Instant::now() > deadline {
            return Err("no welcome".into());
        }
        link.pump(Duration::from_millis(50), None)
            .map_err(|e| e.to_string())?;
    }
}

/// What a [`RawClient`] sends after its hello.
#[derive(Debug, Clone, Copy, Default)]
pub enum ConfirmWith {
    /// The tag of its key ring's key on this connection.
    #[default]
    Own,
    /// A tag taken from another connection (a replay).
    Replayed([u8; 32]),
    /// Nothing (an old or broken peer).
    Nothing,
}

/// Flags of a [`RawClient`]'s hello and its key confirmation.
#[derive(Debug, Clone)]
pub struct HelloOpts {
    /// The stream starts with a resync.
    pub resync: bool,
    /// The replica is declared a copy of the volume before record 1 (test
    /// volumes and replicas start zeroed).
    pub replica_seeded: bool,
    /// The protocol version announced.
    pub protocol: u32,
    /// The epoch announced.
    pub epoch: u64,
    /// The key id announced and confirmed with.
    pub key_id: u32,
    /// The key ring to confirm with (default: the test's `keys.toml`).
    pub keyring: Option<std::path::PathBuf>,
    /// The source's random half (default: fresh).
    pub source_random: Option<[u8; 16]>,
    /// What follows the hello.
    pub confirm: ConfirmWith,
}

impl Default for HelloOpts {
    fn default() -> Self {
        Self {
            resync: false,
            replica_seeded: true,
            protocol: replica_proto::msg::PROTOCOL_VERSION,
            epoch: 1,
            key_id: 1,
            keyring: None,
            source_random: None,
            confirm: ConfirmWith::Own,
        }
    }
}

impl RawClient {
    /// Connects as `cert` (dir, name) and says hello for `volume` (the
    /// replica declared seeded: test volumes start zeroed).
    pub fn connect(
        env: &Env,
        addr: &str,
        cert: (&str, &str),
        volume: &str,
        generation: [u8; 16],
        oldest_seq: u64,
    ) -> Result<Self, String> {
        Self::connect_with(
            env,
            addr,
            cert,
            volume,
            generation,
            oldest_seq,
            HelloOpts::default(),
        )
    }

    /// [`RawClient::connect`] with the hello's flags.
    pub fn connect_with(
        env: &Env,
        addr: &str,
        cert: (&str, &str),
        volume: &str,
        generation: [u8; 16],
        oldest_seq: u64,
        opts: HelloOpts,
    ) -> Result<Self, String> {
        let HelloOpts {
            resync,
            replica_seeded,
            protocol,
            epoch,
            key_id,
            keyring,
            source_random,
            confirm,
        } = opts;
        use replica_proto::msg::{Hello, Message};
        let mut link = Self::tls(env, addr, cert)?;
        let src_rand = match source_random {
            Some(r) => r,
            None => replica_proto::keys::random16().map_err(|e| e.to_string())?,
        };
        let hello = Hello {
            protocol,
            features: replica_proto::msg::PROTOCOL_FEATURES,
            volume: volume.to_owned(),
            generation: hex::encode(generation),
            epoch,
            source_random: hex::encode(src_rand),
            oldest_seq,
            key_id,
            resync,
            replica_seeded,
            ping_interval_ms: 0,
        };
        let ring =
            replica_proto::keys::KeyRing::load(&keyring.unwrap_or_else(|| env.path("keys.toml")))
                .map_err(|e| e.to_string())?;
        use replica_proto::confirm;
        use replica_proto::handshake::SourceSide;
        let mut exporter = [0u8; confirm::EXPORTER_LEN];
        link.export(confirm::EXPORTER_LABEL, &mut exporter)
            .map_err(|e| e.to_string())?;
        let (mut opening, [hello, own]) =
            SourceSide::new(&ring, &exporter, hello).map_err(|e| e.to_string())?;
        link.send(&hello);
        let source_tag = match confirm {
            ConfirmWith::Own => opening.tag(),
            ConfirmWith::Replayed(t) => t,
            ConfirmWith::Nothing => [0; 32],
        };
        match confirm {
            ConfirmWith::Own => link.send(&own),
            ConfirmWith::Replayed(t) => link.send(&Message::Confirm(t)),
            ConfirmWith::Nothing => {}
        }
        let w = match answer(&mut link, &mut opening, Duration::from_secs(10))? {
            Ok(w) => w,
            Err(e) => return Err(format!("{}: {}", e.code, e.message)),
        };
        let mut t = [0u8; 16];
        hex::decode_to_slice(&w.target_random, &mut t).map_err(|e| e.to_string())?;
        Ok(Self {
            link,
            stream_id: replica_proto::keys::stream_id(&src_rand, &t),
            welcome: *w,
            volume: volume.to_owned(),
            generation,
            counter: 0,
            source_tag,
            heard: Vec::new(),
        })
    }

    /// A TLS connection as `cert` (dir, name), nothing said yet.
    pub fn tls(env: &Env, addr: &str, cert: (&str, &str)) -> Result<replicad::link::Link, String> {
        let tls = replicad::config::TlsConfig {
            ca: env.path("pki/ca.pem"),
            cert: env.path(&format!("{}/{}.pem", cert.0, cert.1)),
            key: env.path(&format!("{}/{}.key", cert.0, cert.1)),
        };
        tls_link(&tls, addr, TARGET_CN, Duration::from_secs(10))
    }

    /// Seals records `first..` (a write of `data` at sector 0 for each
    /// even sequence, a flush for each odd one) under this stream's key from
    /// `keys` with master key `key_id`, as the next segment.
    pub fn seal(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        key_id: u32,
        first: u64,
        n: u64,
        data: &[u8],
    ) -> Vec<u8> {
        use replica_proto::frame;
        let mut plain = Vec::new();
        for seq in first..first + n {
            if seq % 2 == 0 {
                frame::encode_record_parts(
                    &mut plain,
                    seq,
                    frame::ring_op::WRITE,
                    0,
                    0,
                    0,
                    data.len() as u32,
                    0,
                    0,
                    data,
                );
            } else {
                frame::encode_record_parts(
                    &mut plain,
                    seq,
                    frame::ring_op::FLUSH,
                    0,
                    0,
                    0,
                    0,
                    0,
                    0,
                    &[],
                );
            }
        }
        self.seal_plain(keys, key_id, first, n, 0, &plain)
    }

    /// Seals records given as (seq, op, flags, sector, aux, data) into the
    /// next frame of this stream, with segment `features`.
    #[allow(clippy::type_complexity)]
    pub fn seal_records(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        features: u32,
        records: &[(u64, u8, u8, u64, u64, &[u8])],
    ) -> Vec<u8> {
        let mut plain = Vec::new();
        for &(seq, op, flags, sector, aux, data) in records {
            let len = if op == replica_proto::frame::ring_op::WRITE
                || op == replica_proto::frame::OP_CHUNK_HASHES
            {
                data.len() as u32
            } else {
                0
            };
            replica_proto::frame::encode_record_parts(
                &mut plain, seq, op, flags, 0, sector, len, 0, aux, data,
            );
        }
        let first = records.first().map_or(0, |r| r.0);
        self.seal_plain(
            keys,
            keys.active(),
            first,
            records.len() as u64,
            features,
            &plain,
        )
    }

    fn seal_plain(
        &mut self,
        keys: &replica_proto::keys::KeyRing,
        key_id: u32,
        first: u64,
        n: u64,
        features: u32,
        plain: &[u8],
    ) -> Vec<u8> {
        use replica_proto::frame;
        let ctx = replica_proto::keys::StreamContext {
            stream_id: self.stream_id,
            volume: &self.volume,
            direction: replica_proto::keys::Direction::Forward,
            epoch: 1,
        };
        let key = replica_proto::keys::StreamKey::derive(keys, key_id, &ctx).expect("derive");
        let h = frame::SegmentHeader {
            features,
            key_id,
            stream_id: self.stream_id,
            generation: self.generation,
            volume_tag: replica_proto::keys::volume_tag(&self.volume),
            epoch: 1,
            counter: self.counter,
            first_seq: first,
            last_seq: first + n - 1,
            record_count: n as u32,
            plain_len: 0,
            cipher_len: 0,
            zstd_level: 1,
            source_time_ns: 0,
        };
        self.counter += 1;
        frame::seal(h, plain, 1, &key).expect("seal")
    }

    /// Sends a frame and returns the target's answer to it: the first ack
    /// that covers it, or an error (or a closed connection).
    pub fn send_frame(&mut self, f: Vec<u8>) -> Result<replica_proto::msg::Ack, String> {
        use replica_proto::msg::Message;
        // A damaged frame covers nothing: only an error answers it.
        let covers =
            replica_proto::frame::SegmentHeader::decode(&f).map_or(u64::MAX, |(h, _)| h.last_seq);
        // Acks that answered earlier frames are stale now.
        let _ = self.link.pump(Duration::ZERO, None);
        loop {
            match self.link.recv() {
                Ok(Some(Message::Ack(a))) => self.heard.push(Heard::Applied(a.applied_seq)),
                Ok(Some(Message::Compared(c))) => self.heard.push(Heard::Compared(c)),
                Ok(Some(Message::Zeroes(z))) => self.heard.push(Heard::Zeroes(z)),
                _ => break,
            }
        }
        self.link.send(&Message::Segment(f));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.link.recv() {
                Ok(Some(Message::Ack(a))) if a.durable_seq >= covers => {
                    self.heard.push(Heard::Applied(a.applied_seq));
                    return Ok(a);
                }
                Ok(Some(Message::Ack(a))) => self.heard.push(Heard::Applied(a.applied_seq)),
                Ok(Some(Message::Compared(c))) => self.heard.push(Heard::Compared(c)),
                Ok(Some(Message::Zeroes(z))) => self.heard.push(Heard::Zeroes(z)),
                Ok(Some(Message::Error(e))) => return Err(format!("{}: {}", e.code, e.message)),
                Ok(Some(m)) => return Err(format!("unexpected {m:?}")),
                Ok(None) => {}
                Err(e) => return Err(format!("link: {e}")),
            }
            if Instant::now() > deadline {
                return Err("no answer".into());
            }
            if let Err(e) = self.link.pump(Duration::from_millis(50), None) {
                return Err(format!("link: {e}"));
            }
        }
    }

    /// Listens until the target answered hash record `seq` (sending pings
    /// so it acks), and returns the answer.
    pub fn answer_for(&mut self, seq: u64) -> Result<replica_proto::msg::Compared, String> {
        self.listen_for(seq, |h| match h {
            Heard::Compared(c) if c.seq == seq => Some(c.clone()),
            _ => None,
        })
    }

    /// Listens until the target sent its zero ranges for the resync BEGIN
    /// `seq` (sending pings so it acks), and returns them.
    pub fn zeroes_for(&mut self, seq: u64) -> Result<replica_proto::msg::Zeroes, String> {
        self.listen_for(seq, |h| match h {
            Heard::Zeroes(z) if z.seq == seq => Some(z.clone()),
            _ => None,
        })
    }

    /// Listens (sending pings so the target acks) until `want` finds what
    /// it looks for in what was heard; about record `seq`.
    fn listen_for<T>(&mut self, seq: u64, want: impl Fn(&Heard) -> Option<T>) -> Result<T, String> {
        use replica_proto::msg::Message;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(c) = self.heard.iter().find_map(&want) {
                return Ok(c);
            }
            match self.link.recv() {
                Ok(Some(Message::Ack(a))) => self.heard.push(Heard::Applied(a.applied_seq)),
                Ok(Some(Message::Compared(c))) => self.heard.push(Heard::Compared(c)),
                Ok(Some(Message::Zeroes(z))) => self.heard.push(Heard::Zeroes(z)),
                Ok(Some(Message::Error(e))) => return Err(format!("{}: {}", e.code, e.message)),
                Ok(Some(m)) => return Err(format!("unexpected {m:?}")),
                Ok(None) => {
                    if Instant::now() > deadline {
                        return Err(format!(
                            "no answer for record {seq}: heard {:?}",
                            self.heard
                        ));
                    }
                    self.link.send(&Message::Ping);
                    if let Err(e) = self.link.pump(Duration::from_millis(50), None) {
                        return Err(format!("link: {e}"));
                    }
                }
                Err(e) => return Err(format!("link: {e}")),
            }
        }
    }

    /// Sends a frame the target must refuse: waits for its error (acks of
    /// earlier frames are ignored). Returns the error, or a description of
    /// what came instead.
    pub fn send_bad_frame(&mut self, f: Vec<u8>) -> Result<String, String> {
        use replica_proto::msg::Message;
        self.link.send(&Message::Segment(f));
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.link.recv() {
                Ok(Some(Message::Error(e))) => return Ok(format!("{}: {}", e.code, e.message)),
                Ok(Some(Message::Ack(_))) | Ok(None) => {}
                Ok(Some(m)) => return Err(format!("unexpected {m:?}")),
                Err(e) => return Err(format!("link closed without an error message: {e}")),
            }
            if Instant::now() > deadline {
                return Err("the target accepted the frame (no error within 10 s)".into());
            }
            if let Err(e) = self.link.pump(Duration::from_millis(50), None) {
                return Err(format!("link: {e}"));
            }
        }
    }
}
