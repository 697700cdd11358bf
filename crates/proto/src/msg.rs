//! Messages on the replication connection (inside TLS).
//!
//! Every message is `type: u8`, `len: u32 LE`, then `len` bytes. Control
//! messages (hello, welcome, error) are JSON so they can grow fields without
//! a new protocol version; segments are the binary frames of
//! [`crate::frame`]; acks are 16 bytes.

use serde::{Deserialize, Serialize};

/// Protocol version spoken by this build; peers must speak the same one (the
/// target refuses another in the hello, the source in the welcome).
///
/// 5: the target's [`Message::Zeroes`] (what its replica holds as zeros when
/// a resync begins).
///
/// 4: checksum resync and verify (hash records in segments, the target's
/// [`Message::Compared`] answers).
///
/// 1: segment format 1. 2: segment format 2 (the AEAD authenticates the
/// segment header bytes as sent, reserved bytes included; sequence ranges
/// are checked without wrapping). 3: key confirmation (a [`Message::Confirm`]
/// from each side, bound to the TLS session, before either acts on what
/// the other said), [`Message::Ping`], per-type message bounds.
pub const PROTOCOL_VERSION: u32 = 5;
/// Feature bits this build offers in the handshake.
pub const PROTOCOL_FEATURES: u64 = FEATURE_ZSTD_SEGMENTS;
/// Feature: segments are zstd-compressed.
pub const FEATURE_ZSTD_SEGMENTS: u64 = 1;
/// Largest message accepted (a segment; every other type is far smaller,
/// see [`max_body`]).
pub const MAX_MESSAGE: usize = (crate::frame::MAX_PLAIN_LEN as usize) + 64 * 1024;
/// Largest hello body: a volume id, two hex strings and a few numbers.
pub const MAX_HELLO: usize = 2048;
/// Largest body of the other JSON control messages (welcome, error,
/// promote, promoted).
pub const MAX_CONTROL: usize = 8192;
/// Bytes of a message header (`type`, `len`).
pub const HEADER_LEN: usize = 5;

const T_HELLO: u8 = 1;
const T_WELCOME: u8 = 2;
const T_SEGMENT: u8 = 3;
const T_ACK: u8 = 4;
const T_ERROR: u8 = 5;
const T_PROMOTE: u8 = 6;
const T_PROMOTED: u8 = 7;
const T_CONFIRM: u8 = 8;
const T_PING: u8 = 9;
const T_COMPARED: u8 = 10;
const T_ZEROES: u8 = 11;
/// Bytes of a [`Compared`] before its bitmap.
const COMPARED_HEAD: usize = 28;
/// Bytes of a [`Zeroes`] before its ranges (16 bytes each).
const ZEROES_HEAD: usize = 28;
/// Most byte ranges one [`Zeroes`] names (a replica with more holes than
/// this names the first ones: saying less is always safe).
pub const MAX_ZERO_RANGES: usize = 4096;

/// The largest body a message of type `t` may have, or `None` for a type
/// this build does not know. Checked on the header, before any of the
/// body is buffered.
pub fn max_body(t: u8) -> Option<usize> {
    match t {
        T_HELLO => Some(MAX_HELLO),
        T_WELCOME | T_ERROR | T_PROMOTE | T_PROMOTED => Some(MAX_CONTROL),
        T_SEGMENT => Some(MAX_MESSAGE),
        T_ACK => Some(ACK_LEN),
        T_CONFIRM => Some(crate::confirm::TAG_LEN),
        T_PING => Some(0),
        T_COMPARED => Some(COMPARED_HEAD + crate::chunk::MAX_CHUNKS_PER_RECORD as usize / 8),
        T_ZEROES => Some(ZEROES_HEAD + MAX_ZERO_RANGES * 16),
        _ => None,
    }
}

/// Target → source: which chunks of the hash record at `seq` differ on the
/// replica, compared when the target's apply order reached it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Compared {
    /// The ring generation of the hash record (an answer about another
    /// generation's record of the same sequence proves nothing).
    pub generation: [u8; 16],
    /// The hash record.
    pub seq: u64,
    /// Chunks it named.
    count: u32,
    /// One bit per chunk, set: differs.
    bits: Vec<u8>,
}

impl Compared {
    /// The answer for the hash record `seq` whose chunk `i` differs when
    /// `differs[i]`; `None` for no chunk or more than a record names.
    pub fn new(generation: [u8; 16], seq: u64, differs: &[bool]) -> Option<Self> {
        let count = u32::try_from(differs.len()).ok()?;
        if count == 0 || count > crate::chunk::MAX_CHUNKS_PER_RECORD {
            return None;
        }
        let mut bits = vec![0u8; differs.len().div_ceil(8)];
        for (i, d) in differs.iter().enumerate() {
            if *d {
                bits[i / 8] |= 1 << (i % 8);
            }
        }
        Some(Self {
            generation,
            seq,
            count,
            bits,
        })
    }

    /// Chunks it answers for.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// Whether chunk `i` differs.
    pub fn differs(&self, i: u32) -> bool {
        i < self.count
            && self
                .bits
                .get((i / 8) as usize)
                .is_some_and(|b| b & (1 << (i % 8)) != 0)
    }

    /// The chunks that differ, in order.
    pub fn differing(&self) -> impl Iterator<Item = u32> + '_ {
        (0..self.count).filter(|&i| self.differs(i))
    }
}

/// Target → source: byte ranges the replica reads as zeros (a hole of a
/// file replica, thin blocks never provisioned) when the target's apply
/// order reached the resync BEGIN at `seq`, every earlier record applied.
///
/// The source needs no comparison for a chunk inside them: every later
/// write reaches both sides in order, so a chunk the source reads as zeros
/// at a later ring position is zeros on the replica there too, and any
/// other chunk is sent. Ranges are sorted, non-empty and do not overlap or
/// touch; at most [`MAX_ZERO_RANGES`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Zeroes {
    /// The ring generation of the BEGIN.
    pub generation: [u8; 16],
    /// The BEGIN record.
    pub seq: u64,
    ranges: Vec<(u64, u64)>,
}

impl Zeroes {
    /// The claim for BEGIN `seq` over `ranges` (`(start, length)` in bytes):
    /// sorted and merged here; empty ones dropped; beyond
    /// [`MAX_ZERO_RANGES`] the rest are left out.
    pub fn new(generation: [u8; 16], seq: u64, mut ranges: Vec<(u64, u64)>) -> Self {
        ranges.retain(|r| r.1 > 0);
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
        for (start, len) in ranges {
            let end = start.saturating_add(len);
            match merged.last_mut() {
                Some(last) if start <= last.0 + last.1 => {
                    last.1 = end.max(last.0 + last.1) - last.0;
                }
                _ => merged.push((start, end - start)),
            }
        }
        merged.truncate(MAX_ZERO_RANGES);
        Self {
            generation,
            seq,
            ranges: merged,
        }
    }

    /// The ranges, `(start, length)` in bytes, ascending.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}

/// Source → target, planned failover: every record up to `upto` has been
/// sent and the source's volume takes no more writes; once the replica has
/// applied `upto`, the target becomes the primary at `epoch`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promote {
    /// Last record of the old primary.
    pub upto: u64,
    /// The new epoch (the old one + 1).
    pub epoch: u64,
}

/// Target → source: the replica is the primary now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Promoted {
    /// Its epoch.
    pub epoch: u64,
    /// The recovery point it was promoted at (record sequence).
    pub point_seq: u64,
    /// Where the new primary volume is on the target host.
    pub device: String,
}

/// Source's opening message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Protocol version.
    pub protocol: u32,
    /// Feature bits offered.
    pub features: u64,
    /// Volume (or group) id.
    pub volume: String,
    /// Ring generation, hex.
    pub generation: String,
    /// Epoch the source believes in.
    pub epoch: u64,
    /// Source's half of the stream id, hex.
    pub source_random: String,
    /// Oldest record sequence the source can still send.
    pub oldest_seq: u64,
    /// Key id the source will seal with.
    pub key_id: u32,
    /// The stream starts with a resync (after a gap): a target that has
    /// another ring generation (the source host restarted) may take this one
    /// over, inconsistent until the resync ends.
    #[serde(default)]
    pub resync: bool,
    /// The operator declared that the replica already holds what the volume
    /// held before record 1 of this ring generation (both new and zeroed,
    /// or seeded): a target with no record of the volume then takes a
    /// stream that starts at record 1 without a full resync. Otherwise such
    /// a target demands one.
    #[serde(default)]
    pub replica_seeded: bool,
    /// How often the source pings a stream it has nothing to send on, ms
    /// (0: not said). The target waits at least three of them before it
    /// calls a silent source dead, whatever its own peer timeout.
    #[serde(default)]
    pub ping_interval_ms: u64,
}

/// Target's answer when it accepts the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    /// Protocol version chosen.
    pub protocol: u32,
    /// Feature bits agreed.
    pub features: u64,
    /// Target's half of the stream id, hex.
    pub target_random: String,
    /// Last record sequence durable in the target's journal (0: none).
    pub durable_seq: u64,
    /// Last record sequence applied to the replica.
    pub applied_seq: u64,
    /// Epoch the target is at.
    pub epoch: u64,
    /// The replica holds no consistent copy of the volume: the source must
    /// resend every region (a resync whose BEGIN says `full`). The replica
    /// stays Inconsistent until that resync's END is applied.
    #[serde(default)]
    pub resync_required: bool,
    /// The replica is not consistent now (a resync runs or is needed).
    #[serde(default)]
    pub inconsistent: bool,
}

/// Acknowledgement: everything up to `durable_seq` is durable in the
/// target's journal; `applied_seq` is applied to the replica; what the
/// replica is good for as of that applied record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// Last durable record.
    pub durable_seq: u64,
    /// Last applied record.
    pub applied_seq: u64,
    /// [`ACK_INCONSISTENT`], [`ACK_NEEDS_FULL_RESYNC`].
    pub flags: u64,
}

/// Ack flag: the replica is inconsistent (a resync runs or is needed); a
/// source must not call a resync done while its target says this.
pub const ACK_INCONSISTENT: u64 = 1;
/// Ack flag: the replica holds no consistent copy; only a full resync
/// (BEGIN says full) that reaches this target makes it consistent.
pub const ACK_NEEDS_FULL_RESYNC: u64 = 2;
const ACK_LEN: usize = 24;

/// Whether the sender should retry later.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Retry on the backoff schedule (disk full, busy, transient).
    Recoverable,
    /// Stop and go Critical (authentication, sequence gap, wrong epoch...).
    Fatal,
}

/// The code of an `ERROR` message: why the peer refused or ended the
/// stream. Sent as a kebab-case string; a code this build does not know
/// (a newer peer's) reads as [`ErrorCode::Other`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ErrorCode {
    /// The client certificate names nobody.
    NoIdentity,
    /// The peer does not speak the protocol.
    Protocol,
    /// No such volume here.
    VolumeNotFound,
    /// The certificate may not replicate the volume.
    NotAuthorized,
    /// Another connection or a takeover is in the way: retry.
    Busy,
    /// No randomness for the handshake.
    Random,
    /// The volume is Critical.
    Critical,
    /// The volume was failed over to this host.
    Promoted,
    /// A failover is under way.
    Failover,
    /// The source is at an older epoch.
    StaleEpoch,
    /// Records are missing between what the target has and what comes.
    SequenceGap,
    /// A key id the target does not have.
    UnknownKey,
    /// The peer could not prove it holds the key its hello names.
    KeyConfirmation,
    /// The connection failed.
    Network,
    /// The peer said nothing in time.
    Timeout,
    /// The source reported an error.
    Peer,
    /// A planned failover failed.
    PromoteFailed,
    /// A segment of an unsupported format or feature.
    Unsupported,
    /// A segment whose checksums hold but whose content is invalid.
    MalformedSegment,
    /// A segment damaged on the way.
    CorruptSegment,
    /// A segment of another volume.
    WrongVolume,
    /// A segment of another connection's stream.
    WrongStream,
    /// A segment of another ring generation or epoch.
    WrongGeneration,
    /// A segment counter out of order.
    Replay,
    /// A segment that fails authentication.
    Authentication,
    /// The target's storage failed.
    TargetStorage,
    /// A code this build does not know.
    #[serde(other)]
    Other,
}

impl ErrorCode {
    /// The code as sent.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoIdentity => "no-identity",
            Self::Protocol => "protocol",
            Self::VolumeNotFound => "volume-not-found",
            Self::NotAuthorized => "not-authorized",
            Self::Busy => "busy",
            Self::Random => "random",
            Self::Critical => "critical",
            Self::Promoted => "promoted",
            Self::Failover => "failover",
            Self::StaleEpoch => "stale-epoch",
            Self::SequenceGap => "sequence-gap",
            Self::UnknownKey => "unknown-key",
            Self::KeyConfirmation => "key-confirmation",
            Self::Network => "network",
            Self::Timeout => "timeout",
            Self::Peer => "peer",
            Self::PromoteFailed => "promote-failed",
            Self::Unsupported => "unsupported",
            Self::MalformedSegment => "malformed-segment",
            Self::CorruptSegment => "corrupt-segment",
            Self::WrongVolume => "wrong-volume",
            Self::WrongStream => "wrong-stream",
            Self::WrongGeneration => "wrong-generation",
            Self::Replay => "replay",
            Self::Authentication => "authentication",
            Self::TargetStorage => "target-storage",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error reported by the peer before it closes the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ErrorMsg {
    /// Retry or not.
    pub class: ErrorClass,
    /// Machine-readable code.
    pub code: ErrorCode,
    /// Human explanation.
    pub message: String,
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Source hello.
    Hello(Hello),
    /// Target welcome.
    Welcome(Welcome),
    /// A segment frame.
    Segment(Vec<u8>),
    /// An ack.
    Ack(Ack),
    /// An error.
    Error(ErrorMsg),
    /// Planned failover request.
    Promote(Promote),
    /// Planned failover done.
    Promoted(Promoted),
    /// Key confirmation: proof that the sender holds the master key the
    /// hello names, bound to this TLS session (see [`crate::confirm`]).
    Confirm([u8; crate::confirm::TAG_LEN]),
    /// Source → target: are you there? Sent on a stream the source has
    /// sent nothing on for a while (its `ping_interval_ms`); the target
    /// answers every one with an ack of its current state, so each end
    /// hears from the other while the stream is idle and silence means a
    /// dead connection.
    Ping,
    /// Target → source: the outcome of comparing a hash record's chunks.
    Compared(Compared),
    /// Target → source: what the replica holds as zeros at a resync's
    /// BEGIN.
    Zeroes(Zeroes),
}

/// Message decoding errors.
#[derive(Debug, thiserror::Error)]
pub enum MsgError {
    /// Unknown message type.
    #[error("unknown message type {0}")]
    UnknownType(u8),
    /// Message larger than allowed.
    #[error("message of {0} bytes exceeds the limit")]
    TooLarge(usize),
    /// Bad JSON body.
    #[error("malformed control message: {0}")]
    Json(#[from] serde_json::Error),
    /// Bad ack body.
    #[error("malformed ack")]
    BadAck,
    /// Bad compared body.
    #[error("malformed chunk comparison")]
    BadCompared,
    /// Bad zeroes body.
    #[error("malformed zero ranges")]
    BadZeroes,
    /// A body of the wrong size for its type.
    #[error("message type {kind} with a body of {len} bytes (limit {max})")]
    BadLength {
        /// The type.
        kind: u8,
        /// Its declared length.
        len: usize,
        /// The bound for the type.
        max: usize,
    },
}

fn put(out: &mut Vec<u8>, t: u8, body: &[u8]) {
    out.push(t);
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(body);
}

/// The 5-byte message header of a segment of `len` bytes (so a frame can be
/// queued without copying it into a message buffer).
pub fn segment_header(len: usize) -> [u8; 5] {
    let mut h = [T_SEGMENT, 0, 0, 0, 0];
    h[1..].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

impl Message {
    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Message::Hello(h) => put(out, T_HELLO, &serde_json::to_vec(h).unwrap_or_default()),
            Message::Welcome(w) => put(out, T_WELCOME, &serde_json::to_vec(w).unwrap_or_default()),
            Message::Segment(f) => put(out, T_SEGMENT, f),
            Message::Ack(a) => {
                let mut b = [0u8; ACK_LEN];
                b[..8].copy_from_slice(&a.durable_seq.to_le_bytes());
                b[8..16].copy_from_slice(&a.applied_seq.to_le_bytes());
                b[16..].copy_from_slice(&a.flags.to_le_bytes());
                put(out, T_ACK, &b)
            }
            Message::Error(e) => put(out, T_ERROR, &serde_json::to_vec(e).unwrap_or_default()),
            Message::Promote(p) => put(out, T_PROMOTE, &serde_json::to_vec(p).unwrap_or_default()),
            Message::Promoted(p) => {
                put(out, T_PROMOTED, &serde_json::to_vec(p).unwrap_or_default())
            }
            Message::Confirm(tag) => put(out, T_CONFIRM, tag),
            Message::Ping => put(out, T_PING, &[]),
            Message::Compared(c) => {
                let mut b = Vec::with_capacity(COMPARED_HEAD + c.bits.len());
                b.extend_from_slice(&c.generation);
                b.extend_from_slice(&c.seq.to_le_bytes());
                b.extend_from_slice(&c.count.to_le_bytes());
                b.extend_from_slice(&c.bits);
                put(out, T_COMPARED, &b)
            }
            Message::Zeroes(z) => {
                let mut b = Vec::with_capacity(ZEROES_HEAD + z.ranges.len() * 16);
                b.extend_from_slice(&z.generation);
                b.extend_from_slice(&z.seq.to_le_bytes());
                b.extend_from_slice(&(z.ranges.len() as u32).to_le_bytes());
                for (start, len) in &z.ranges {
                    b.extend_from_slice(&start.to_le_bytes());
                    b.extend_from_slice(&len.to_le_bytes());
                }
                put(out, T_ZEROES, &b)
            }
        }
    }

    /// What it is, for messages about it: its type, and a segment's length
    /// (never a peer's bytes, which may be large or crafted).
    pub fn kind(&self) -> String {
        match self {
            Message::Hello(_) => "hello".into(),
            Message::Welcome(_) => "welcome".into(),
            Message::Segment(f) => format!("a segment of {} bytes", f.len()),
            Message::Ack(_) => "ack".into(),
            Message::Error(e) => format!("error {}", e.code),
            Message::Promote(_) => "promote".into(),
            Message::Promoted(_) => "promoted".into(),
            Message::Confirm(_) => "key confirmation".into(),
            Message::Ping => "ping".into(),
            Message::Compared(_) => "chunk comparison".into(),
            Message::Zeroes(_) => "zero ranges".into(),
        }
    }

    /// Encodes into a fresh buffer.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        self.encode(&mut v);
        v
    }

    /// The whole length (header included) of the message whose header is
    /// at the front of `buf`, once its type and declared length are known
    /// to be acceptable: `Ok(None)` if the header is incomplete. A caller
    /// that buffers input reads no more than this.
    pub fn wanted(buf: &[u8]) -> Result<Option<usize>, MsgError> {
        if buf.len() < HEADER_LEN {
            return Ok(None);
        }
        let t = buf[0];
        let len = crate::le::u32_at(buf, 1) as usize;
        let max = max_body(t).ok_or(MsgError::UnknownType(t))?;
        if len > max {
            return Err(if t == T_SEGMENT {
                MsgError::TooLarge(len)
            } else {
                MsgError::BadLength { kind: t, len, max }
            });
        }
        let exact = match t {
            T_ACK => Some(ACK_LEN),
            T_CONFIRM => Some(crate::confirm::TAG_LEN),
            T_PING => Some(0),
            _ => None,
        };
        if exact.is_some_and(|n| n != len) {
            return Err(if t == T_ACK {
                MsgError::BadAck
            } else {
                MsgError::BadLength { kind: t, len, max }
            });
        }
        Ok(Some(HEADER_LEN + len))
    }

    /// Decodes one message from the front of `buf`: `Ok(None)` if more bytes
    /// are needed, else the message and the bytes it used.
    pub fn decode(buf: &[u8]) -> Result<Option<(Message, usize)>, MsgError> {
        let Some(total) = Self::wanted(buf)? else {
            return Ok(None);
        };
        if buf.len() < total {
            return Ok(None);
        }
        let body = &buf[HEADER_LEN..total];
        let m = match buf[0] {
            T_HELLO => Message::Hello(serde_json::from_slice(body)?),
            T_WELCOME => Message::Welcome(serde_json::from_slice(body)?),
            T_SEGMENT => Message::Segment(body.to_vec()),
            T_PROMOTE => Message::Promote(serde_json::from_slice(body)?),
            T_PROMOTED => Message::Promoted(serde_json::from_slice(body)?),
            T_ACK => {
                let word = |i: usize| crate::le::u64_at(body, i * 8);
                let flags = word(2);
                if flags & !(ACK_INCONSISTENT | ACK_NEEDS_FULL_RESYNC) != 0 {
                    return Err(MsgError::BadAck);
                }
                Message::Ack(Ack {
                    durable_seq: word(0),
                    applied_seq: word(1),
                    flags,
                })
            }
            T_CONFIRM => {
                let mut tag = [0u8; crate::confirm::TAG_LEN];
                tag.copy_from_slice(body);
                Message::Confirm(tag)
            }
            T_PING => Message::Ping,
            T_COMPARED => {
                if body.len() < COMPARED_HEAD {
                    return Err(MsgError::BadCompared);
                }
                let mut generation = [0u8; 16];
                generation.copy_from_slice(&body[..16]);
                let seq = crate::le::u64_at(body, 16);
                let count = crate::le::u32_at(body, 24);
                let bits = &body[COMPARED_HEAD..];
                let ok = (1..=crate::chunk::MAX_CHUNKS_PER_RECORD).contains(&count)
                    && bits.len() == (count as usize).div_ceil(8)
                    && (count.is_multiple_of(8)
                        || bits.last().is_some_and(|b| b >> (count % 8) == 0));
                if !ok {
                    return Err(MsgError::BadCompared);
                }
                Message::Compared(Compared {
                    generation,
                    seq,
                    count,
                    bits: bits.to_vec(),
                })
            }
            T_ZEROES => Message::Zeroes(decode_zeroes(body).ok_or(MsgError::BadZeroes)?),
            _ => Message::Error(serde_json::from_slice(body)?),
        };
        Ok(Some((m, total)))
    }
}

/// A [`Zeroes`] body: the count must match, and the ranges must be what
/// [`Zeroes::new`] makes (sorted, non-empty, apart, no overflow).
fn decode_zeroes(body: &[u8]) -> Option<Zeroes> {
    if body.len() < ZEROES_HEAD {
        return None;
    }
    let mut generation = [0u8; 16];
    generation.copy_from_slice(&body[..16]);
    let seq = crate::le::u64_at(body, 16);
    let n = crate::le::u32_at(body, 24) as usize;
    if n > MAX_ZERO_RANGES || body.len() != ZEROES_HEAD + n * 16 {
        return None;
    }
    let mut ranges = Vec::with_capacity(n);
    let mut after = 0u64;
    for i in 0..n {
        let at = ZEROES_HEAD + i * 16;
        let start = crate::le::u64_at(body, at);
        let len = crate::le::u64_at(body, at + 8);
        let end = start.checked_add(len)?;
        if len == 0 || (i > 0 && start <= after) {
            return None;
        }
        after = end;
        ranges.push((start, len));
    }
    Some(Zeroes {
        generation,
        seq,
        ranges,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_codes_are_sent_as_their_names_and_unknown_ones_read_as_other() {
        for c in [
            ErrorCode::StaleEpoch,
            ErrorCode::Promoted,
            ErrorCode::SequenceGap,
            ErrorCode::TargetStorage,
        ] {
            let json = serde_json::to_string(&c).expect("encode");
            assert_eq!(json, format!("\"{}\"", c.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).expect("decode"), c);
        }
        assert_eq!(
            serde_json::from_str::<ErrorCode>("\"a-code-of-a-newer-peer\"").expect("decode"),
            ErrorCode::Other
        );
    }

    #[test]
    fn round_trip_and_partial_input() {
        let msgs = vec![
            Message::Ack(Ack {
                durable_seq: 7,
                applied_seq: 5,
                flags: ACK_INCONSISTENT,
            }),
            Message::Error(ErrorMsg {
                class: ErrorClass::Fatal,
                code: ErrorCode::SequenceGap,
                message: "x".into(),
            }),
            Message::Segment(vec![1, 2, 3]),
            Message::Promote(Promote { upto: 99, epoch: 2 }),
            Message::Promoted(Promoted {
                epoch: 2,
                point_seq: 99,
                device: "/dev/mapper/db1-replica".into(),
            }),
        ];
        let mut buf = Vec::new();
        for m in &msgs {
            m.encode(&mut buf);
        }
        for cut in 0..buf.len() {
            // A prefix never decodes into something wrong.
            if let Some((m, used)) = Message::decode(&buf[..cut]).expect("decode") {
                assert_eq!(m, msgs[0]);
                assert!(used <= cut);
            }
        }
        let mut p = 0;
        for m in &msgs {
            let (d, used) = Message::decode(&buf[p..]).expect("ok").expect("whole");
            assert_eq!(&d, m);
            p += used;
        }
        assert!(Message::decode(&[10, 0, 0, 0, 0]).is_err());
        assert!(Message::decode(&[3, 0xff, 0xff, 0xff, 0xff]).is_err());
    }

    #[test]
    fn confirm_and_ping_round_trip() {
        for m in [Message::Confirm([7; 32]), Message::Ping] {
            let b = m.to_bytes();
            let (d, used) = Message::decode(&b).expect("decode").expect("whole");
            assert_eq!((d, used), (m, b.len()));
        }
    }

    #[test]
    fn compared_round_trips_and_malformed_bodies_are_refused() {
        let mut d = vec![false; 1024];
        d[0] = true;
        d[9] = true;
        d[1023] = true;
        for c in [
            Compared::new([5; 16], 42, &d).expect("1024"),
            Compared::new([6; 16], 7, &[false, true, false]).expect("3"),
        ] {
            let m = Message::Compared(c.clone());
            let b = m.to_bytes();
            let (got, used) = Message::decode(&b).expect("decode").expect("whole");
            assert_eq!((got, used), (m, b.len()));
        }
        let c = Compared::new([5; 16], 42, &d).expect("1024");
        assert_eq!(c.differing().collect::<Vec<_>>(), vec![0, 9, 1023]);
        assert!(!c.differs(1024));
        assert!(Compared::new([0; 16], 1, &[]).is_none());
        assert!(Compared::new([0; 16], 1, &vec![false; 1025]).is_none());
        let body = |seq: u64, count: u32, bits: &[u8]| {
            let mut b = vec![9u8; 16];
            b.extend_from_slice(&seq.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            b.extend_from_slice(bits);
            let mut m = vec![T_COMPARED];
            m.extend_from_slice(&(b.len() as u32).to_le_bytes());
            m.extend_from_slice(&b);
            m
        };
        assert!(Message::decode(&body(1, 3, &[0b101])).is_ok());
        // Padding bits set, a bitmap of the wrong length, no chunk, too many.
        for bad in [
            body(1, 3, &[0b1101]),
            body(1, 3, &[0, 0]),
            body(1, 0, &[]),
            body(1, 1025, &[0; 129]),
            body(1, 9, &[0]),
        ] {
            assert!(
                matches!(
                    Message::decode(&bad),
                    Err(MsgError::BadCompared) | Err(MsgError::BadLength { .. })
                ),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn zeroes_round_trip_merged_and_malformed_bodies_are_refused() {
        let z = Zeroes::new(
            [3; 16],
            77,
            vec![(8192, 4096), (0, 4096), (4096, 4096), (1 << 20, 0)],
        );
        // Sorted, touching ranges merged, the empty one dropped.
        assert_eq!(z.ranges(), &[(0, 12288)]);
        let z = Zeroes::new(
            [3; 16],
            77,
            vec![(1 << 30, 1 << 20), (0, 65536), (u64::MAX - 10, 100)],
        );
        assert_eq!(
            z.ranges(),
            &[(0, 65536), (1 << 30, 1 << 20), (u64::MAX - 10, 10)]
        );
        for z in [z, Zeroes::new([1; 16], 2, Vec::new())] {
            let m = Message::Zeroes(z);
            let b = m.to_bytes();
            let (got, used) = Message::decode(&b).expect("decode").expect("whole");
            assert_eq!((got, used), (m, b.len()));
        }
        let many: Vec<(u64, u64)> = (0..MAX_ZERO_RANGES as u64 + 5)
            .map(|i| (i * 10, 5))
            .collect();
        let z = Zeroes::new([0; 16], 1, many);
        assert_eq!(z.ranges().len(), MAX_ZERO_RANGES);
        assert!(Message::decode(&Message::Zeroes(z).to_bytes()).is_ok());
        let body = |count: u32, ranges: &[(u64, u64)]| {
            let mut b = vec![9u8; 16];
            b.extend_from_slice(&5u64.to_le_bytes());
            b.extend_from_slice(&count.to_le_bytes());
            for (s, l) in ranges {
                b.extend_from_slice(&s.to_le_bytes());
                b.extend_from_slice(&l.to_le_bytes());
            }
            let mut m = vec![T_ZEROES];
            m.extend_from_slice(&(b.len() as u32).to_le_bytes());
            m.extend_from_slice(&b);
            m
        };
        assert!(Message::decode(&body(2, &[(0, 10), (11, 5)])).is_ok());
        // Touching, overlapping, unsorted, empty, overflowing, a count
        // that does not match, a truncated range.
        let mut truncated = body(1, &[(0, 10)]);
        truncated.truncate(truncated.len() - 1);
        let n = (truncated.len() - 5) as u32;
        truncated[1..5].copy_from_slice(&n.to_le_bytes());
        for bad in [
            body(2, &[(0, 10), (10, 5)]),
            body(2, &[(0, 10), (5, 10)]),
            body(2, &[(20, 1), (0, 10)]),
            body(1, &[(0, 0)]),
            body(1, &[(u64::MAX, 2)]),
            body(2, &[(0, 10)]),
            body(0, &[(0, 10)]),
            truncated,
        ] {
            assert!(
                matches!(Message::decode(&bad), Err(MsgError::BadZeroes)),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_declared_length_over_its_types_bound_is_refused_on_the_header() {
        // Only the 5 header bytes: the refusal comes before any body.
        let header = |t: u8, len: u32| {
            let mut h = vec![t];
            h.extend_from_slice(&len.to_le_bytes());
            h
        };
        for (t, len) in [
            (T_HELLO, MAX_HELLO as u32 + 1),
            (T_WELCOME, MAX_CONTROL as u32 + 1),
            (T_ERROR, u32::MAX),
            (T_SEGMENT, u32::MAX),
            (T_SEGMENT, MAX_MESSAGE as u32 + 1),
            (T_ACK, 25),
            (T_ACK, 23),
            (T_CONFIRM, 31),
            (T_PING, 1),
        ] {
            assert!(
                Message::wanted(&header(t, len)).is_err(),
                "type {t} length {len}"
            );
            assert!(Message::decode(&header(t, len)).is_err());
        }
        assert_eq!(
            Message::wanted(&header(T_HELLO, 100)).expect("ok"),
            Some(105)
        );
        assert_eq!(Message::wanted(&[T_HELLO, 1]).expect("ok"), None);
    }

    #[test]
    fn an_old_peers_hello_parses_so_the_target_can_refuse_its_version() {
        assert_eq!(PROTOCOL_VERSION, 5);
        // A protocol 1 source's hello, as it sends it.
        let body = br#"{"protocol":1,"features":1,"volume":"db1","generation":"00","epoch":1,"source_random":"00","oldest_seq":1,"key_id":1}"#;
        let mut buf = vec![T_HELLO];
        buf.extend_from_slice(&(body.len() as u32).to_le_bytes());
        buf.extend_from_slice(body);
        let (m, used) = Message::decode(&buf).expect("decode").expect("whole");
        assert_eq!(used, buf.len());
        let Message::Hello(h) = m else {
            panic!("not a hello: {m:?}")
        };
        assert_eq!(h.protocol, 1);
        assert_ne!(h.protocol, PROTOCOL_VERSION);
    }
}
