//! `message`: the replication connection's messages
//! (`replica_proto::msg::Message::decode`), as a peer's bytes arrive.
//!
//! The input is a byte stream decoded message after message, as the
//! connection's reader does. For every message decoded: it used at least
//! its 5-byte header and no more than the buffer; every shorter prefix of
//! it asks for more bytes (`Ok(None)`), never decodes to something or
//! fails; and it encodes to bytes that decode back to the same message.
//! Where decoding stops (more needed, or an error), the outcome must not
//! depend on bytes past the message's declared end.

use replica_proto::msg::{
    Ack, ErrorClass, ErrorCode, ErrorMsg, Hello, Message, Promote, Promoted, Welcome,
};

/// Largest allocation the target may make (messages are copied out of the
/// input, never sized from a declared length).
pub const ALLOC_LIMIT: usize = 1 << 20;

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut p = 0usize;
    // Every decoded message uses at least 5 bytes: this ends.
    while p < data.len() {
        let buf = &data[p..];
        match Message::decode(buf) {
            Ok(Some((m, used))) => {
                assert!(
                    (5..=buf.len()).contains(&used),
                    "used {used} of {}",
                    buf.len()
                );
                check_prefixes(buf, used);
                // Bytes after the message do not change it.
                let alone = Message::decode(&buf[..used]).expect("the message alone");
                assert_eq!(alone, Some((m.clone(), used)));
                let again = m.to_bytes();
                match Message::decode(&again) {
                    Ok(Some((back, n))) => {
                        assert_eq!(back, m, "re-encoded message decodes differently");
                        assert_eq!(n, again.len());
                    }
                    other => panic!("re-encoded {m:?} does not decode: {other:?}"),
                }
                p += used;
            }
            Ok(None) => {
                // More is needed: a header not yet whole, or a body not yet
                // in; never a length beyond the limit or an unknown type
                // (those are errors at once).
                assert!(buf.len() < 5 || declared(buf) > buf.len() - 5);
                break;
            }
            Err(_) => {
                // An error is decided by the header (type, length) or the
                // body; never by what follows the body.
                if buf.len() >= 5 && declared(buf) <= buf.len() - 5 {
                    let end = 5 + declared(buf);
                    assert!(Message::decode(&buf[..end]).is_err());
                }
                break;
            }
        }
    }
}

fn declared(buf: &[u8]) -> usize {
    u32::from_le_bytes([buf[1], buf[2], buf[3], buf[4]]) as usize
}

/// Every proper prefix of a whole message asks for more (checked at the
/// header's edges and a few points of the body, not all, to stay fast).
fn check_prefixes(buf: &[u8], used: usize) {
    let mut cuts = vec![0, 1, 4, 5, used / 2, used - 1];
    cuts.retain(|&c| c < used);
    for c in cuts {
        match Message::decode(&buf[..c]) {
            Ok(None) => {}
            other => panic!("a {c}-byte prefix of a {used}-byte message gave {other:?}"),
        }
    }
}

/// Seed inputs: one stream of every message type, and each alone.
pub fn seeds() -> Vec<(String, Vec<u8>)> {
    let msgs = [
        (
            "hello",
            Message::Hello(Hello {
                protocol: replica_proto::msg::PROTOCOL_VERSION,
                features: replica_proto::msg::PROTOCOL_FEATURES,
                volume: "db1".into(),
                generation: "00112233445566778899aabbccddeeff".into(),
                epoch: 1,
                source_random: "0123456789abcdef0123456789abcdef".into(),
                oldest_seq: 1,
                key_id: 1,
                resync: true,
                replica_seeded: false,
                ping_interval_ms: 10_000,
            }),
        ),
        (
            "welcome",
            Message::Welcome(Welcome {
                protocol: replica_proto::msg::PROTOCOL_VERSION,
                features: 1,
                target_random: "fedcba9876543210fedcba9876543210".into(),
                durable_seq: 41,
                applied_seq: 40,
                epoch: 1,
                resync_required: false,
                inconsistent: true,
            }),
        ),
        (
            "segment",
            Message::Segment(b"DMRS\x02\x00\x88\x00".to_vec()),
        ),
        (
            "ack",
            Message::Ack(Ack {
                durable_seq: 42,
                applied_seq: 40,
                flags: replica_proto::msg::ACK_INCONSISTENT,
            }),
        ),
        (
            "error",
            Message::Error(ErrorMsg {
                class: ErrorClass::Recoverable,
                code: ErrorCode::Busy,
                message: "another connection holds the volume".into(),
            }),
        ),
        ("promote", Message::Promote(Promote { upto: 42, epoch: 2 })),
        (
            "promoted",
            Message::Promoted(Promoted {
                epoch: 2,
                point_seq: 42,
                device: "/dev/mapper/db1".into(),
            }),
        ),
        (
            "compared",
            Message::Compared(
                replica_proto::msg::Compared::new([7; 16], 43, &[false, true, false, false, true])
                    .expect("answer"),
            ),
        ),
        (
            "zeroes",
            Message::Zeroes(replica_proto::msg::Zeroes::new(
                [7; 16],
                44,
                vec![(0, 65536), (1 << 20, 1 << 30)],
            )),
        ),
    ];
    let mut stream = Vec::new();
    let mut out = Vec::new();
    for (name, m) in &msgs {
        let b = m.to_bytes();
        stream.extend_from_slice(&b);
        out.push((name.to_string(), b));
    }
    // A stream cut inside its last message.
    let cut = stream.len() - 3;
    out.push(("stream".into(), stream.clone()));
    out.push(("stream-cut".into(), stream[..cut].to_vec()));
    out
}
