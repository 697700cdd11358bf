//! The fixed key every target that opens segments uses, so that the seed
//! corpus (sealed with it) authenticates and the fuzzer reaches what lies
//! behind the AEAD.

use std::sync::OnceLock;

use replica_proto::keys::{Direction, KeyRing, StreamContext, StreamKey};

/// The keyring file text of the fixed key (id 1, a constant secret).
pub const KEYRING: &str = "active = 1\n\n[[key]]\nid = 1\nsecret = \"000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f\"\n";

/// The volume the fixed stream key is bound to.
pub const VOLUME: &str = "fuzz";

/// The stream id of the fixed stream key.
pub const STREAM_ID: [u8; 16] = [0x5a; 16];

/// The fixed stream key (derived once).
pub fn stream_key() -> &'static StreamKey {
    static KEY: OnceLock<StreamKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let ring = KeyRing::parse(KEYRING).expect("the fixed keyring parses");
        StreamKey::derive(
            &ring,
            1,
            &StreamContext {
                stream_id: STREAM_ID,
                volume: VOLUME,
                direction: Direction::Forward,
                epoch: 1,
            },
        )
        .expect("derive the fixed stream key")
    })
}
