//! One replication connection: a non-blocking socket driven by `poll`,
//! rustls in the middle, and length-prefixed messages on top. A single
//! thread reads and writes, so neither direction can stall the other.
//!
//! A link keeps the times it last heard from its peer and last queued
//! something for it: the roles end a connection whose peer went silent
//! (see [`Liveness`]), and the source pings a stream it has nothing to
//! send on. Its socket carries TCP keepalive, so the kernel also fails an
//! idle connection whose path went dead. It does not set
//! `TCP_USER_TIMEOUT`: Linux aborts a connection whose peer keeps a zero
//! window for that long, and a live target that stops reading (its
//! applier retries against a full pool) must not be cut off; the
//! application's silence check covers a dead path with data in flight.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use replica_proto::msg::{Message, MsgError};

use crate::config::NetworkConfig;

/// How a connection notices that its peer is gone (the `[network]`
/// settings both roles share).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    /// A peer that sent nothing for this long is dead.
    pub peer_timeout: Duration,
    /// TCP keepalive: idle time before the first probe (probes then every
    /// third of it, at least 1 s; 3 unanswered close the socket). `None`:
    /// off.
    pub keepalive: Option<Duration>,
}

impl Liveness {
    /// From the `[network]` configuration.
    pub fn new(n: &NetworkConfig) -> Self {
        Self {
            peer_timeout: Duration::from_secs(n.peer_timeout_secs),
            keepalive: (n.keepalive_secs > 0).then(|| Duration::from_secs(n.keepalive_secs)),
        }
    }

    /// How long the source lets a stream go without sending before it
    /// pings: a third of the peer timeout, so that a live peer is heard
    /// from well within it.
    pub fn ping_interval(&self) -> Duration {
        self.peer_timeout / 3
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Self::new(&NetworkConfig::default())
    }
}

/// Keepalive probes unanswered before the kernel closes the socket.
const KEEPALIVE_PROBES: u32 = 3;

/// Sets what makes the kernel notice a dead path on `sock`: TCP keepalive
/// (`SO_KEEPALIVE`, `TCP_KEEPIDLE`, `TCP_KEEPINTVL`, `TCP_KEEPCNT`; off
/// without [`Liveness::keepalive`]). Not `TCP_USER_TIMEOUT` (see the
/// module's documentation).
pub fn tune_socket(sock: &TcpStream, l: &Liveness) -> std::io::Result<()> {
    use nix::sys::socket::{setsockopt, sockopt};
    setsockopt(sock, sockopt::KeepAlive, &l.keepalive.is_some())?;
    if let Some(k) = l.keepalive {
        let idle = u32::try_from(k.as_secs()).unwrap_or(u32::MAX).max(1);
        setsockopt(sock, sockopt::TcpKeepIdle, &idle)?;
        setsockopt(sock, sockopt::TcpKeepInterval, &(idle / 3).max(1))?;
        setsockopt(sock, sockopt::TcpKeepCount, &KEEPALIVE_PROBES)?;
    }
    Ok(())
}

/// Connection errors.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Socket error.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// TLS error (certificate refused, handshake failure, bad record).
    #[error("TLS: {0}")]
    Tls(#[from] rustls::Error),
    /// The peer closed the connection.
    #[error("connection closed by peer")]
    Closed,
    /// The peer sent something that is not a message.
    #[error("protocol: {0}")]
    Msg(#[from] MsgError),
    /// Deadline passed.
    #[error("timed out {0}")]
    Timeout(&'static str),
}

/// Whose certificate a TLS failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CertificateFailure {
    /// This side checked the peer's certificate and refused it: a fact.
    PeerRefusedHere,
    /// The peer says it refused ours (an alert): possibly true, but an
    /// alert can be sent by anyone on the path before the peer has proved
    /// who it is.
    OursRefusedThere,
}

impl LinkError {
    /// Whether, and whose, certificate the error says was refused.
    pub fn certificate_failure(&self) -> Option<CertificateFailure> {
        use rustls::AlertDescription as A;
        match self {
            LinkError::Tls(rustls::Error::InvalidCertificate(_))
            | LinkError::Tls(rustls::Error::NoCertificatesPresented) => {
                Some(CertificateFailure::PeerRefusedHere)
            }
            LinkError::Tls(rustls::Error::AlertReceived(a)) => matches!(
                a,
                // DecryptError is what rustls sends when a certificate's
                // signature does not verify (e.g. a look-alike CA).
                A::DecryptError
                    | A::BadCertificate
                    | A::UnsupportedCertificate
                    | A::CertificateRevoked
                    | A::CertificateExpired
                    | A::CertificateUnknown
                    | A::UnknownCA
                    | A::AccessDenied
                    | A::CertificateRequired
            )
            .then_some(CertificateFailure::OursRefusedThere),
            _ => None,
        }
    }
}

/// Stop reading the socket while this much received data waits to be
/// processed (TCP then pushes back on the sender).
const MAX_INBUF: usize = 8 << 20;
/// What a link buffers before the peer has confirmed its key: a hello or
/// a welcome and a confirmation, nothing more.
const HANDSHAKE_INBUF: usize = 16 << 10;

/// A TLS connection carrying messages.
pub struct Link {
    sock: TcpStream,
    conn: rustls::Connection,
    inbuf: Vec<u8>,
    outq: VecDeque<Vec<u8>>,
    out_off: usize,
    closed: bool,
    /// The largest message body accepted now (small until the peer has
    /// confirmed its key).
    max_body: usize,
    /// Stop reading while this much input waits.
    inbuf_limit: usize,
    /// When the peer was last heard from (or this end last stopped reading
    /// because its input was full).
    last_heard: Instant,
    /// When something was last queued for the peer.
    last_queued: Instant,
}

impl Link {
    /// Wraps a connected socket, with keepalive and user timeout set from
    /// `liveness` ([`tune_socket`]).
    pub fn new(
        sock: TcpStream,
        conn: rustls::Connection,
        liveness: &Liveness,
    ) -> Result<Self, LinkError> {
        sock.set_nonblocking(true)?;
        sock.set_nodelay(true)?;
        tune_socket(&sock, liveness)?;
        let now = Instant::now();
        Ok(Self {
            sock,
            conn,
            inbuf: Vec::new(),
            outq: VecDeque::new(),
            out_off: 0,
            closed: false,
            max_body: replica_proto::msg::MAX_CONTROL,
            inbuf_limit: HANDSHAKE_INBUF,
            last_heard: now,
            last_queued: now,
        })
    }

    /// How long nothing came from the peer. Not counted while this end
    /// does not read (its input is full of what the peer sent): the wait
    /// is then this end's, not the peer's.
    pub fn silent_for(&self) -> Duration {
        self.last_heard.elapsed()
    }

    /// How long nothing was queued for the peer.
    pub fn quiet_for(&self) -> Duration {
        self.last_queued.elapsed()
    }

    /// The peer proved its key: accept messages of every size (segments)
    /// and buffer more input.
    pub fn authenticated(&mut self) {
        self.max_body = replica_proto::msg::MAX_MESSAGE;
        self.inbuf_limit = MAX_INBUF;
    }

    /// Keying material exported from the TLS session (RFC 8446 §7.5).
    pub fn export(&self, label: &[u8], out: &mut [u8]) -> Result<(), LinkError> {
        self.conn.export_keying_material(out, label, None)?;
        Ok(())
    }

    /// The TLS connection (peer certificates etc.).
    pub fn tls(&self) -> &rustls::Connection {
        &self.conn
    }

    /// Drives the handshake to completion.
    pub fn handshake(&mut self, timeout: Duration) -> Result<(), LinkError> {
        let deadline = Instant::now() + timeout;
        while self.conn.is_handshaking() {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or(LinkError::Timeout("in TLS handshake"))?;
            self.pump(left, None)?;
            if self.closed {
                return Err(LinkError::Closed);
            }
        }
        // Flush the last handshake flight.
        self.flush_tls()?;
        Ok(())
    }

    /// Queues a message for sending.
    pub fn send(&mut self, m: &Message) {
        self.outq.push_back(m.to_bytes());
        self.last_queued = Instant::now();
    }

    /// Queues bytes as they are, framed or not (tests of hostile input).
    #[doc(hidden)]
    pub fn send_raw(&mut self, bytes: Vec<u8>) {
        self.outq.push_back(bytes);
    }

    /// Queues a segment frame without copying it.
    pub fn send_segment(&mut self, frame: Vec<u8>) {
        self.outq
            .push_back(replica_proto::msg::segment_header(frame.len()).to_vec());
        self.outq.push_back(frame);
        self.last_queued = Instant::now();
    }

    /// Bytes queued and not yet handed to TLS.
    pub fn queued(&self) -> usize {
        self.outq.iter().map(Vec::len).sum::<usize>() - self.out_off
    }

    /// Whether everything queued has been written to the socket.
    pub fn drained(&self) -> bool {
        self.outq.is_empty() && !self.conn.wants_write()
    }

    /// Takes the next whole message received, if any.
    pub fn recv(&mut self) -> Result<Option<Message>, LinkError> {
        Ok(self.recv_raw()?.map(|(m, _)| m))
    }

    /// [`Link::recv`], with the message's bytes as received (header
    /// included): what a key confirmation tag covers.
    pub fn recv_raw(&mut self) -> Result<Option<(Message, Vec<u8>)>, LinkError> {
        self.wanted()?;
        match Message::decode(&self.inbuf)? {
            Some((m, used)) => Ok(Some((m, self.inbuf.drain(..used).collect()))),
            None if self.closed => Err(LinkError::Closed),
            None => Ok(None),
        }
    }

    /// Bytes the message at the front of the input still needs, once its
    /// header is known to be acceptable (its type known, its length within
    /// the type's bound and what this link accepts now).
    fn wanted(&self) -> Result<usize, MsgError> {
        let Some(total) = Message::wanted(&self.inbuf)? else {
            return Ok(replica_proto::msg::HEADER_LEN - self.inbuf.len());
        };
        let body = total - replica_proto::msg::HEADER_LEN;
        if body > self.max_body {
            return Err(MsgError::TooLarge(body));
        }
        Ok(total.saturating_sub(self.inbuf.len()))
    }

    /// Whether to read more: below the buffer bound, or the message at the
    /// front is still incomplete (a segment may exceed the bound). Not
    /// while the front holds a header to refuse: nothing of its body is
    /// buffered, [`Link::recv`] reports it.
    fn want_input(&self) -> bool {
        match self.wanted() {
            Ok(more) => self.inbuf.len() < self.inbuf_limit || more > 0,
            Err(_) => false,
        }
    }

    fn feed_tls(&mut self) -> Result<(), LinkError> {
        while let Some(front) = self.outq.front() {
            let n = self.conn.writer().write(&front[self.out_off..])?;
            if n == 0 {
                break;
            }
            self.out_off += n;
            if self.out_off == front.len() {
                self.outq.pop_front();
                self.out_off = 0;
            }
        }
        Ok(())
    }

    fn flush_tls(&mut self) -> Result<(), LinkError> {
        while self.conn.wants_write() {
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_socket(&mut self) -> Result<(), LinkError> {
        while self.want_input() {
            match self.conn.read_tls(&mut self.sock) {
                Ok(0) => {
                    self.closed = true;
                    break;
                }
                Ok(_) => {
                    self.last_heard = Instant::now();
                    let st = self.conn.process_new_packets();
                    if let Err(e) = st {
                        // Send the alert that explains the failure, then fail.
                        let _ = self.flush_tls();
                        return Err(e.into());
                    }
                    let mut tmp = [0u8; 64 * 1024];
                    loop {
                        match self.conn.reader().read(&mut tmp) {
                            Ok(0) => {
                                self.closed = true;
                                break;
                            }
                            Ok(n) => self.inbuf.extend_from_slice(&tmp[..n]),
                            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e.into()),
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Moves bytes: hands queued messages to TLS, writes what the socket
    /// takes, waits up to `timeout` for the socket (or `wake`) to be ready,
    /// and reads what arrived. Returns true if `wake` became readable.
    pub fn pump(
        &mut self,
        timeout: Duration,
        wake: Option<BorrowedFd<'_>>,
    ) -> Result<bool, LinkError> {
        self.write_out()?;
        if self.closed {
            return Ok(false);
        }
        let mut flags = PollFlags::empty();
        if self.want_input() {
            flags |= PollFlags::POLLIN;
        } else {
            // Not listening: the peer's silence is not counted.
            self.last_heard = Instant::now();
        }
        if self.conn.wants_write() || !self.outq.is_empty() {
            flags |= PollFlags::POLLOUT;
        }
        let sock_fd = self.sock.as_fd();
        let mut fds = vec![PollFd::new(sock_fd, flags)];
        if let Some(w) = wake {
            fds.push(PollFd::new(w, PollFlags::POLLIN));
        }
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        match poll(
            &mut fds,
            PollTimeout::try_from(ms).unwrap_or(PollTimeout::MAX),
        ) {
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => return Ok(false),
            Err(e) => return Err(std::io::Error::from(e).into()),
        }
        let sock_ready = fds[0].revents().unwrap_or(PollFlags::empty());
        let woke = fds
            .get(1)
            .and_then(|f| f.revents())
            .is_some_and(|r| r.contains(PollFlags::POLLIN));
        drop(fds);
        if sock_ready.intersects(PollFlags::POLLIN | PollFlags::POLLHUP | PollFlags::POLLERR) {
            self.read_socket()?;
        }
        self.write_out()?;
        Ok(woke)
    }

    /// Hands queued messages to TLS and TLS records to the socket until
    /// the queue is empty or the socket would block.
    fn write_out(&mut self) -> Result<(), LinkError> {
        loop {
            if !self.conn.is_handshaking() {
                self.feed_tls()?;
            }
            if !self.conn.wants_write() {
                return Ok(());
            }
            match self.conn.write_tls(&mut self.sock) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends queued messages and a TLS close, best effort, within `timeout`.
    pub fn close(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.drained() && Instant::now() < deadline {
            if self.pump(Duration::from_millis(20), None).is_err() {
                break;
            }
        }
        self.conn.send_close_notify();
        let _ = self.flush_tls();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::sys::socket::{getsockopt, sockopt};
    use std::net::TcpListener;

    fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let c = TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        let (s, _) = l.accept().expect("accept");
        (c, s)
    }

    #[test]
    fn sockets_get_keepalive_and_no_user_timeout_from_the_network_settings() {
        let (c, _s) = pair();
        let l = Liveness::new(&NetworkConfig {
            peer_timeout_secs: 30,
            keepalive_secs: 10,
            ..NetworkConfig::default()
        });
        tune_socket(&c, &l).expect("tune");
        assert!(getsockopt(&c, sockopt::KeepAlive).expect("keepalive"));
        assert_eq!(getsockopt(&c, sockopt::TcpKeepIdle).expect("idle"), 10);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepInterval).expect("intvl"), 3);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepCount).expect("cnt"), 3);
        // A zero window for long (a busy target) must not abort it.
        assert_eq!(
            getsockopt(&c, sockopt::TcpUserTimeout).expect("user timeout"),
            0
        );
        assert_eq!(l.ping_interval(), Duration::from_secs(10));
    }

    #[test]
    fn a_short_keepalive_probes_every_second_and_zero_turns_it_off() {
        let (c, s) = pair();
        let short = Liveness::new(&NetworkConfig {
            peer_timeout_secs: 3,
            keepalive_secs: 1,
            ..NetworkConfig::default()
        });
        tune_socket(&c, &short).expect("tune");
        assert_eq!(getsockopt(&c, sockopt::TcpKeepIdle).expect("idle"), 1);
        assert_eq!(getsockopt(&c, sockopt::TcpKeepInterval).expect("intvl"), 1);
        let off = Liveness::new(&NetworkConfig {
            keepalive_secs: 0,
            ..NetworkConfig::default()
        });
        assert_eq!(off.keepalive, None);
        setsockopt_on(&s);
        tune_socket(&s, &off).expect("tune");
        assert!(!getsockopt(&s, sockopt::KeepAlive).expect("keepalive"));
    }

    /// Keepalive on first, so that turning it off is seen.
    fn setsockopt_on(s: &TcpStream) {
        nix::sys::socket::setsockopt(s, sockopt::KeepAlive, &true).expect("on");
        assert!(getsockopt(s, sockopt::KeepAlive).expect("keepalive"));
    }
}
