//! The opening of a replication connection as two state machines, one per
//! side, free of sockets and TLS (the caller moves the messages and gives
//! the TLS exporter output), so that every order of messages a peer can
//! send is handled in one place and can be tested and fuzzed on its own.
//!
//! ```text
//! source                                   target
//!   Hello, Confirm(S)          ─────────▶    Hello: the caller checks version,
//!                                            volume, certificate (refusals
//!                                            here change nothing)
//!                                            Confirm(S) verified, else refused
//!                              ◀─────────    Confirm(T)
//!   T verified, else nothing                 from here the caller may act on
//!   the target says is used                  the hello (epoch, takeover, ...)
//!                              ◀─────────    Welcome | Error
//! ```
//!
//! See [`crate::confirm`] for the tags.

use crate::confirm::{Confirmer, Mismatch, EXPORTER_LEN, TAG_LEN};
use crate::keys::{KeyError, KeyRing};
use crate::msg::{ErrorMsg, Hello, Message, Welcome};

/// Why an opening failed.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// A message out of turn.
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the state machine waited for.
        expected: &'static str,
        /// What came ([`Message::kind`]).
        got: String,
    },
    /// The hello names a key this side does not have.
    #[error("unknown key id {0}")]
    UnknownKey(u32),
    /// The key could not be derived.
    #[error("{0}")]
    Key(#[source] KeyError),
    /// The peer's tag did not verify.
    #[error(transparent)]
    Mismatch(#[from] Mismatch),
    /// The opening is over; nothing more is expected.
    #[error("the handshake is over")]
    Done,
}

/// The confirmation key of the key `hello` names.
fn derive(
    ring: &KeyRing,
    exporter: &[u8; EXPORTER_LEN],
    hello: &Hello,
) -> Result<Confirmer, HandshakeError> {
    Confirmer::new(ring, hello.key_id, exporter, &hello.volume).map_err(|e| match e {
        KeyError::UnknownKey(id) => HandshakeError::UnknownKey(id),
        other => HandshakeError::Key(other),
    })
}

/// The target's side of an opening.
#[derive(Debug)]
pub struct TargetSide {
    exporter: [u8; EXPORTER_LEN],
    state: TargetState,
}

#[derive(Debug)]
enum TargetState {
    Hello,
    Confirm {
        hello: Box<Hello>,
        transcript: Vec<u8>,
    },
    Done,
}

impl TargetSide {
    /// A target opening on a TLS session with exporter output `exporter`.
    pub fn new(exporter: [u8; EXPORTER_LEN]) -> Self {
        Self {
            exporter,
            state: TargetState::Hello,
        }
    }

    /// Takes the source's first message, which must be its hello, and its
    /// bytes as received (`raw`: header and body, what the source's tag
    /// covers). Check what may be checked without trusting it (the
    /// protocol version): nothing in it is proven yet.
    pub fn hello(&mut self, m: Message, raw: &[u8]) -> Result<Box<Hello>, HandshakeError> {
        match std::mem::replace(&mut self.state, TargetState::Done) {
            TargetState::Hello => {
                let Message::Hello(hello) = m else {
                    return Err(HandshakeError::Unexpected {
                        expected: "hello",
                        got: m.kind(),
                    });
                };
                let hello = Box::new(hello);
                self.state = TargetState::Confirm {
                    transcript: raw.to_vec(),
                    hello: hello.clone(),
                };
                Ok(hello)
            }
            TargetState::Confirm { .. } => Err(HandshakeError::Unexpected {
                expected: "key confirmation",
                got: m.kind(),
            }),
            TargetState::Done => Err(HandshakeError::Done),
        }
    }

    /// Takes the source's second message, which must be its key
    /// confirmation over the hello; returns the target's, to send. Only
    /// then may the target act on the hello.
    pub fn confirm(&mut self, ring: &KeyRing, m: Message) -> Result<Message, HandshakeError> {
        match std::mem::replace(&mut self.state, TargetState::Done) {
            TargetState::Confirm { hello, transcript } => {
                let Message::Confirm(tag) = m else {
                    return Err(HandshakeError::Unexpected {
                        expected: "key confirmation",
                        got: m.kind(),
                    });
                };
                let confirmer = derive(ring, &self.exporter, &hello)?;
                confirmer.verify_source(&transcript, &tag)?;
                Ok(Message::Confirm(confirmer.target_tag(&transcript, &tag)))
            }
            TargetState::Hello => Err(HandshakeError::Unexpected {
                expected: "hello",
                got: m.kind(),
            }),
            TargetState::Done => Err(HandshakeError::Done),
        }
    }
}

/// The source's side of an opening.
#[derive(Debug)]
pub struct SourceSide {
    confirmer: Confirmer,
    transcript: Vec<u8>,
    tag: [u8; TAG_LEN],
    state: SourceState,
    /// The target's tag verified.
    proven: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceState {
    Confirm,
    Welcome,
    Done,
}

/// What the source learnt from a message.
#[derive(Debug)]
pub enum SourceStep {
    /// The target proved its key: what it says next can be acted on.
    Confirmed,
    /// The target refused before it proved its key: report it, act on
    /// nothing in it (a stale-epoch here must not demote the source).
    RefusedUnconfirmed(ErrorMsg),
    /// The proven target welcomes the stream.
    Welcome(Box<Welcome>),
    /// The proven target refuses the stream: act on it.
    Refused(ErrorMsg),
}

impl SourceSide {
    /// A source opening: `hello` sealed with the key it names, on a TLS
    /// session with exporter output `exporter`. Returns the side and the
    /// two messages to send.
    pub fn new(
        ring: &KeyRing,
        exporter: &[u8; EXPORTER_LEN],
        hello: Hello,
    ) -> Result<(Self, [Message; 2]), HandshakeError> {
        let confirmer = derive(ring, exporter, &hello)?;
        let hello = Message::Hello(hello);
        let transcript = hello.to_bytes();
        let tag = confirmer.source_tag(&transcript);
        Ok((
            Self {
                confirmer,
                transcript,
                tag,
                state: SourceState::Confirm,
                proven: false,
            },
            [hello, Message::Confirm(tag)],
        ))
    }

    /// The key id it confirms with.
    pub fn key_id(&self) -> u32 {
        self.confirmer.key_id()
    }

    /// The tag it sent.
    pub fn tag(&self) -> [u8; TAG_LEN] {
        self.tag
    }

    /// Whether the target has proved its key (what it says from now on
    /// may be acted on).
    pub fn confirmed(&self) -> bool {
        self.proven
    }

    /// Takes the next message from the target.
    pub fn receive(&mut self, m: Message) -> Result<SourceStep, HandshakeError> {
        let state = std::mem::replace(&mut self.state, SourceState::Done);
        match (state, m) {
            (SourceState::Confirm, Message::Confirm(t)) => {
                self.confirmer
                    .verify_target(&self.transcript, &self.tag, &t)?;
                self.proven = true;
                self.state = SourceState::Welcome;
                Ok(SourceStep::Confirmed)
            }
            (SourceState::Confirm, Message::Error(e)) => Ok(SourceStep::RefusedUnconfirmed(e)),
            (SourceState::Welcome, Message::Welcome(w)) => Ok(SourceStep::Welcome(Box::new(w))),
            (SourceState::Welcome, Message::Error(e)) => Ok(SourceStep::Refused(e)),
            (SourceState::Done, _) => Err(HandshakeError::Done),
            (s, got) => Err(HandshakeError::Unexpected {
                expected: if s == SourceState::Confirm {
                    "the target's key confirmation"
                } else {
                    "welcome"
                },
                got: got.kind(),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::{ErrorClass, ErrorCode};

    fn ring(secret: u8) -> KeyRing {
        KeyRing::parse(&format!(
            "active = 1\n[[key]]\nid = 1\nsecret = \"{}\"\n",
            hex::encode([secret; 32])
        ))
        .expect("keyring")
    }

    fn hello() -> Hello {
        Hello {
            protocol: crate::msg::PROTOCOL_VERSION,
            features: 1,
            volume: "db1".into(),
            generation: "00".repeat(16),
            epoch: 3,
            source_random: "11".repeat(16),
            oldest_seq: 1,
            key_id: 1,
            resync: false,
            replica_seeded: false,
            ping_interval_ms: 0,
        }
    }

    fn welcome() -> Welcome {
        Welcome {
            protocol: crate::msg::PROTOCOL_VERSION,
            features: 1,
            target_random: "22".repeat(16),
            durable_seq: 0,
            applied_seq: 0,
            epoch: 3,
            resync_required: false,
            inconsistent: false,
        }
    }

    #[test]
    fn an_honest_opening_confirms_both_sides() {
        let kr = ring(1);
        let (mut s, [h, c]) = SourceSide::new(&kr, &[9; 32], hello()).expect("source");
        let mut t = TargetSide::new([9; 32]);
        let raw = h.to_bytes();
        assert_eq!(*t.hello(h, &raw).expect("hello"), hello());
        let reply = t.confirm(&kr, c).expect("confirm");
        assert!(matches!(
            s.receive(reply).expect("reply"),
            SourceStep::Confirmed
        ));
        assert!(matches!(
            s.receive(Message::Welcome(welcome())).expect("welcome"),
            SourceStep::Welcome(_)
        ));
        assert!(matches!(
            s.receive(Message::Ping),
            Err(HandshakeError::Done)
        ));
        assert!(matches!(
            t.confirm(&kr, Message::Ping),
            Err(HandshakeError::Done)
        ));
        assert!(matches!(
            t.hello(Message::Ping, &[]),
            Err(HandshakeError::Done)
        ));
    }

    #[test]
    fn another_key_another_session_or_a_changed_hello_is_refused() {
        let (_, [h, c]) = SourceSide::new(&ring(1), &[9; 32], hello()).expect("source");
        for (kr, exporter) in [(ring(2), [9; 32]), (ring(1), [8; 32])] {
            let mut t = TargetSide::new(exporter);
            t.hello(h.clone(), &h.to_bytes()).expect("hello");
            assert!(matches!(
                t.confirm(&kr, c.clone()),
                Err(HandshakeError::Mismatch(Mismatch { key_id: 1 }))
            ));
        }
        let mut changed = hello();
        changed.epoch = u64::MAX;
        let kr = ring(1);
        let mut t = TargetSide::new([9; 32]);
        let changed = Message::Hello(changed);
        t.hello(changed.clone(), &changed.to_bytes())
            .expect("hello");
        assert!(matches!(
            t.confirm(&kr, c),
            Err(HandshakeError::Mismatch(_))
        ));
    }

    #[test]
    fn a_target_that_cannot_prove_the_key_is_not_believed() {
        let kr = ring(1);
        let (mut s, [h, c]) = SourceSide::new(&kr, &[9; 32], hello()).expect("source");
        // The target's tag from another key.
        let other = ring(2);
        let mut t = TargetSide::new([9; 32]);
        t.hello(h.clone(), &h.to_bytes()).expect("hello");
        assert!(t.confirm(&other, c.clone()).is_err());
        // A reflected source tag is not a target tag.
        assert!(matches!(s.receive(c), Err(HandshakeError::Mismatch(_))));
        assert!(!s.confirmed(), "a failed opening proved nothing");
        // A refusal before confirmation is marked as such.
        let (mut s, _) = SourceSide::new(&kr, &[9; 32], hello()).expect("source");
        let e = ErrorMsg {
            class: ErrorClass::Fatal,
            code: ErrorCode::StaleEpoch,
            message: "x".into(),
        };
        assert!(matches!(
            s.receive(Message::Error(e)).expect("error"),
            SourceStep::RefusedUnconfirmed(_)
        ));
        // A welcome before confirmation is out of turn.
        let (mut s, _) = SourceSide::new(&kr, &[9; 32], hello()).expect("source");
        assert!(matches!(
            s.receive(Message::Welcome(welcome())),
            Err(HandshakeError::Unexpected { .. })
        ));
    }

    #[test]
    fn messages_out_of_turn_are_refused() {
        let kr = ring(1);
        let mut t = TargetSide::new([9; 32]);
        assert!(matches!(
            t.hello(Message::Confirm([0; 32]), &[]),
            Err(HandshakeError::Unexpected { .. })
        ));
        let mut t = TargetSide::new([9; 32]);
        assert!(matches!(
            t.confirm(&kr, Message::Confirm([0; 32])),
            Err(HandshakeError::Unexpected { .. })
        ));
        let mut t = TargetSide::new([9; 32]);
        t.hello(Message::Hello(hello()), &Message::Hello(hello()).to_bytes())
            .expect("hello");
        assert!(matches!(
            t.confirm(&kr, Message::Hello(hello())),
            Err(HandshakeError::Unexpected { .. })
        ));
        let mut h = hello();
        h.key_id = 7;
        let mut t = TargetSide::new([9; 32]);
        let h = Message::Hello(h);
        t.hello(h.clone(), &h.to_bytes()).expect("hello");
        assert!(matches!(
            t.confirm(&kr, Message::Confirm([0; 32])),
            Err(HandshakeError::UnknownKey(7))
        ));
    }
}
