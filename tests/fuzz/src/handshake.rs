//! `handshake`: the opening of a replication connection
//! (`replica_proto::handshake`), both roles' state machines fed what a
//! peer may send.
//!
//! Input: a 32-byte TLS exporter, a byte of choices, the fields of an
//! honest hello (epoch, oldest record, flags, a volume id), a byte offset
//! to damage, then the rest as a stream of messages a peer sends.
//!
//! - **Forgery**: the target's machine fed the peer's first two messages
//!   (with their bytes as received) accepts the second as a key
//!   confirmation only if it is exactly the tag the fixed key ring gives
//!   over those bytes on that exporter. Anything else is refused.
//! - **Honest opening**: a source with the fixed key ring and the hello
//!   from the input is accepted by the target, and the target's reply by
//!   the source; one byte changed in the hello as received, in the tag,
//!   or a different exporter, and the target refuses; another key ring and
//!   it refuses; a changed reply and the source refuses.
//! - **Source before confirmation**: the source's machine fed the peer's
//!   messages never reports a welcome or an acted-on refusal before a
//!   reply that verifies (which the fuzzer cannot forge): only
//!   `RefusedUnconfirmed` or an error, and nothing after an error.

use replica_proto::confirm::Confirmer;
use replica_proto::handshake::{HandshakeError, SourceSide, SourceStep, TargetSide};
use replica_proto::keys::KeyRing;
use replica_proto::msg::{Hello, Message, PROTOCOL_FEATURES, PROTOCOL_VERSION};

use crate::input::{Reader, Writer};

/// Largest allocation the target may make.
pub const ALLOC_LIMIT: usize = 1 << 20;

/// Another key ring with the same key id as [`crate::keys::KEYRING`].
const OTHER_KEYRING: &str = "active = 1\n\n[[key]]\nid = 1\nsecret = \"ff0102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n";

fn ring(text: &str) -> KeyRing {
    KeyRing::parse(text).expect("a fixed keyring parses")
}

/// The messages at the front of `bytes`, each with its bytes, until one
/// does not decode.
fn messages(mut bytes: &[u8]) -> Vec<(Message, Vec<u8>)> {
    let mut out = Vec::new();
    while let Ok(Some((m, used))) = Message::decode(bytes) {
        out.push((m, bytes[..used].to_vec()));
        bytes = &bytes[used..];
        if out.len() == 16 {
            break;
        }
    }
    out
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut r = Reader::new(data);
    let exporter: [u8; 32] = r.array();
    let choice = r.u8();
    let epoch = r.u64();
    let oldest = r.u64();
    let flags = r.u8();
    let volume_len = usize::from(r.u8() % 64);
    let volume = String::from_utf8_lossy(r.take(volume_len)).into_owned();
    let damage = r.u32() as usize;
    let peer = r.rest();
    let kr = ring(crate::keys::KEYRING);

    forgery(&kr, exporter, peer);
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        features: PROTOCOL_FEATURES,
        volume,
        generation: "00112233445566778899aabbccddeeff".into(),
        epoch,
        source_random: "0123456789abcdef0123456789abcdef".into(),
        oldest_seq: oldest,
        key_id: 1,
        resync: flags & 1 != 0,
        replica_seeded: flags & 2 != 0,
        ping_interval_ms: u64::from(choice),
    };
    honest(&kr, exporter, hello.clone(), damage, choice);
    source_before_confirmation(&kr, exporter, hello, peer);
}

fn forgery(kr: &KeyRing, exporter: [u8; 32], peer: &[u8]) {
    let msgs = messages(peer);
    let mut t = TargetSide::new(exporter);
    let Some((first, first_raw)) = msgs.first() else {
        return;
    };
    let hello = match t.hello(first.clone(), first_raw) {
        Ok(h) => h,
        Err(_) => {
            assert!(
                !matches!(first, Message::Hello(_)),
                "a hello is always taken first"
            );
            return;
        }
    };
    let Some((second, _)) = msgs.get(1) else {
        return;
    };
    let accepted = t.confirm(kr, second.clone());
    let honest_tag = Confirmer::new(kr, hello.key_id, &exporter, &hello.volume)
        .ok()
        .map(|c| c.source_tag(first_raw));
    match (&accepted, second) {
        (Ok(_), Message::Confirm(tag)) => {
            assert_eq!(
                Some(*tag),
                honest_tag,
                "a key confirmation accepted without the key"
            );
        }
        (Ok(_), other) => panic!("{} accepted as a key confirmation", other.kind()),
        (Err(_), Message::Confirm(tag)) => {
            assert_ne!(Some(*tag), honest_tag, "the honest tag refused");
        }
        (Err(_), _) => {}
    }
    // Over, whatever happened.
    assert!(matches!(
        t.confirm(kr, Message::Ping),
        Err(HandshakeError::Done)
    ));
}

fn honest(kr: &KeyRing, exporter: [u8; 32], hello: Hello, damage: usize, choice: u8) {
    let (mut s, [h, c]) = SourceSide::new(kr, &exporter, hello.clone()).expect("the key exists");
    let raw = h.to_bytes();
    let mut t = TargetSide::new(exporter);
    assert_eq!(*t.hello(h.clone(), &raw).expect("a hello"), hello);
    let reply = t
        .confirm(kr, c.clone())
        .expect("an honest source is confirmed");
    // The reply, changed, is refused; as sent, accepted.
    if let Message::Confirm(mut tag) = reply.clone() {
        tag[damage % 32] ^= 1 | choice;
        let (mut s2, _) = SourceSide::new(kr, &exporter, hello.clone()).expect("source");
        assert!(s2.receive(Message::Confirm(tag)).is_err());
    }
    assert!(matches!(
        s.receive(reply).expect("the reply verifies"),
        SourceStep::Confirmed
    ));
    assert!(s.confirmed());

    // One byte of the hello as received changed: refused.
    let mut bad = raw.clone();
    let i = damage % bad.len();
    bad[i] ^= 1 | choice;
    let mut t = TargetSide::new(exporter);
    t.hello(h.clone(), &bad).expect("a hello");
    assert!(
        t.confirm(kr, c.clone()).is_err(),
        "byte {i} of the hello changed"
    );
    // The tag changed, another session, another key ring: refused.
    if let Message::Confirm(mut tag) = c.clone() {
        tag[damage % 32] ^= 1 | choice;
        let mut t = TargetSide::new(exporter);
        t.hello(h.clone(), &raw).expect("a hello");
        assert!(t.confirm(kr, Message::Confirm(tag)).is_err());
    }
    let mut other_session = exporter;
    other_session[damage % 32] ^= 1 | choice;
    let mut t = TargetSide::new(other_session);
    t.hello(h.clone(), &raw).expect("a hello");
    assert!(
        t.confirm(kr, c.clone()).is_err(),
        "a tag of another session"
    );
    let mut t = TargetSide::new(exporter);
    t.hello(h, &raw).expect("a hello");
    assert!(t.confirm(&ring(OTHER_KEYRING), c).is_err(), "another key");
}

fn source_before_confirmation(kr: &KeyRing, exporter: [u8; 32], hello: Hello, peer: &[u8]) {
    let (mut s, _) = SourceSide::new(kr, &exporter, hello).expect("source");
    for (m, _) in messages(peer) {
        let before = s.confirmed();
        match s.receive(m) {
            Ok(SourceStep::Confirmed) => panic!("the target's key confirmation forged"),
            Ok(SourceStep::Welcome(_) | SourceStep::Refused(_)) => {
                assert!(before, "acted on before the target proved its key")
            }
            Ok(SourceStep::RefusedUnconfirmed(_)) => assert!(!before),
            Err(_) => {}
        }
        assert!(!s.confirmed() || before);
    }
}

/// The seed corpus: an honest opening's messages, a hello with a wrong
/// tag, messages out of turn.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let kr = ring(crate::keys::KEYRING);
    let exporter = [7u8; 32];
    let hello = Hello {
        protocol: PROTOCOL_VERSION,
        features: PROTOCOL_FEATURES,
        volume: "db1".into(),
        generation: "00112233445566778899aabbccddeeff".into(),
        epoch: 3,
        source_random: "0123456789abcdef0123456789abcdef".into(),
        oldest_seq: 1,
        key_id: 1,
        resync: false,
        replica_seeded: false,
        ping_interval_ms: 10_000,
    };
    let (_, [h, c]) = SourceSide::new(&kr, &exporter, hello).expect("source");
    let head = |peer: Vec<u8>| {
        Writer::new()
            .bytes(&exporter)
            .u8(3)
            .u64(3)
            .u64(1)
            .u8(1)
            .bytes(b"\x03db1")
            .u32(17)
            .bytes(&peer)
            .finish()
    };
    let honest = [h.to_bytes(), c.to_bytes()].concat();
    let wrong = [h.to_bytes(), Message::Confirm([0; 32]).to_bytes()].concat();
    let out_of_turn = [
        Message::Confirm([1; 32]).to_bytes(),
        h.to_bytes(),
        Message::Ping.to_bytes(),
    ]
    .concat();
    vec![
        ("honest".into(), head(honest)),
        ("wrong-tag".into(), head(wrong)),
        ("out-of-turn".into(), head(out_of_turn)),
    ]
}
