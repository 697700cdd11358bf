//! Key confirmation: each end of a replication connection proves that it
//! holds the master key its hello names before the other end acts on
//! anything it said (epoch, generation, resync, takeover, sequences).
//!
//! TLS with mutual certificates says *who* is on the other end; the data
//! key says *whose data* it is. A certificate alone must not be enough to
//! change a replica's state: a host with an allowed certificate and the
//! wrong key ring (a misconfiguration, or a copied certificate) could
//! otherwise announce a newer epoch or a takeover before its first segment
//! fails to open.
//!
//! Both ends derive a confirmation key from the master key with HKDF-SHA256,
//! salted with keying material exported from this TLS session (RFC 8446
//! §7.5, label [`EXPORTER_LABEL`]), so a tag is worth nothing on any other
//! connection:
//!
//! ```text
//! K   = HKDF-SHA256(salt = exporter(32), ikm = master[key_id],
//!                   info = LABEL | len(volume) | volume | key_id)
//! S   = HMAC-SHA256(K, "source" | len(hello) | hello)          source → target
//! T   = HMAC-SHA256(K, "target" | len(hello) | hello | S)      target → source
//! ```
//!
//! `hello` is the hello message as sent and received, byte for byte (header
//! and JSON body), not a re-encoding of what the target parsed. The
//! source sends its hello and `S`; the target checks the hello's identity
//! and key id, verifies `S` and only then looks at the stream's state; it
//! answers `T` before its welcome (or its refusal). The source acts on
//! nothing the target says (the welcome's sequences, a stale-epoch or
//! promoted refusal that would demote it) before `T` verifies. After both
//! tags, TLS carries the rest of the connection between the same two ends.

use ring::{hkdf, hmac};

use crate::keys::{KeyError, KeyRing};

/// The TLS exporter label (RFC 8446 §7.5) of the confirmation salt.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-dm-replica key confirmation v3";
/// Bytes of exporter output used as the salt.
pub const EXPORTER_LEN: usize = 32;
/// Bytes of a confirmation tag.
pub const TAG_LEN: usize = 32;

const KDF_LABEL: &[u8] = b"dm-replica key confirmation v3";

/// The tag did not verify: the peer holds another key under this id, or
/// the tag was made on another TLS session or over another hello.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("key confirmation failed for key id {key_id}")]
pub struct Mismatch {
    /// The key id the hello named.
    pub key_id: u32,
}

/// The confirmation key of one connection.
pub struct Confirmer {
    key: hmac::Key,
    key_id: u32,
}

impl std::fmt::Debug for Confirmer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Confirmer")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl Confirmer {
    /// Derives the confirmation key of master key `key_id` for `volume` on
    /// the TLS session whose exporter output is `exporter`.
    pub fn new(
        ring: &KeyRing,
        key_id: u32,
        exporter: &[u8; EXPORTER_LEN],
        volume: &str,
    ) -> Result<Self, KeyError> {
        let master = ring.master(key_id)?;
        let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, exporter).extract(master);
        let vol_len = (volume.len() as u32).to_le_bytes();
        let kid = key_id.to_le_bytes();
        let info: [&[u8]; 4] = [KDF_LABEL, &vol_len, volume.as_bytes(), &kid];
        let okm = prk
            .expand(&info, hmac::HMAC_SHA256)
            .map_err(|_| KeyError::UnknownKey(key_id))?;
        Ok(Self {
            key: hmac::Key::from(okm),
            key_id,
        })
    }

    /// The key id it was derived from.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// What a tag covers: the side, the hello, and for the target the
    /// source's tag.
    fn transcript(side: &[u8], hello: &[u8], source_tag: Option<&[u8; TAG_LEN]>) -> Vec<u8> {
        let mut t = Vec::with_capacity(side.len() + 8 + hello.len() + TAG_LEN);
        t.extend_from_slice(side);
        t.extend_from_slice(&(hello.len() as u64).to_le_bytes());
        t.extend_from_slice(hello);
        if let Some(s) = source_tag {
            t.extend_from_slice(s);
        }
        t
    }

    fn sign(&self, transcript: &[u8]) -> [u8; TAG_LEN] {
        let mut out = [0u8; TAG_LEN];
        out.copy_from_slice(hmac::sign(&self.key, transcript).as_ref());
        out
    }

    fn verify(&self, transcript: &[u8], got: &[u8; TAG_LEN]) -> Result<(), Mismatch> {
        // ring compares in constant time.
        hmac::verify(&self.key, transcript, got).map_err(|_| Mismatch {
            key_id: self.key_id,
        })
    }

    /// The source's tag over its encoded hello.
    pub fn source_tag(&self, hello: &[u8]) -> [u8; TAG_LEN] {
        self.sign(&Self::transcript(b"source", hello, None))
    }

    /// The target's tag over the hello and the source's tag.
    pub fn target_tag(&self, hello: &[u8], source_tag: &[u8; TAG_LEN]) -> [u8; TAG_LEN] {
        self.sign(&Self::transcript(b"target", hello, Some(source_tag)))
    }

    /// Checks the source's tag.
    pub fn verify_source(&self, hello: &[u8], got: &[u8; TAG_LEN]) -> Result<(), Mismatch> {
        self.verify(&Self::transcript(b"source", hello, None), got)
    }

    /// Checks the target's tag.
    pub fn verify_target(
        &self,
        hello: &[u8],
        source_tag: &[u8; TAG_LEN],
        got: &[u8; TAG_LEN],
    ) -> Result<(), Mismatch> {
        self.verify(&Self::transcript(b"target", hello, Some(source_tag)), got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring_with(secret: u8) -> KeyRing {
        let hexkey = hex::encode([secret; 32]);
        KeyRing::parse(&format!(
            "active = 1\n[[key]]\nid = 1\nsecret = \"{hexkey}\"\n"
        ))
        .expect("keyring")
    }

    #[test]
    fn both_tags_verify_with_the_same_key_session_and_hello() {
        let kr = ring_with(7);
        let a = Confirmer::new(&kr, 1, &[1; 32], "db1").expect("derive");
        let b = Confirmer::new(&kr, 1, &[1; 32], "db1").expect("derive");
        let s = a.source_tag(b"hello");
        b.verify_source(b"hello", &s).expect("source tag");
        let t = b.target_tag(b"hello", &s);
        a.verify_target(b"hello", &s, &t).expect("target tag");
        assert_ne!(s, t, "the two directions' tags differ");
    }

    #[test]
    fn a_tag_fails_with_another_key_session_volume_hello_or_direction() {
        let kr = ring_with(7);
        let me = Confirmer::new(&kr, 1, &[1; 32], "db1").expect("derive");
        let s = me.source_tag(b"hello");
        let others = [
            Confirmer::new(&ring_with(8), 1, &[1; 32], "db1").expect("derive"),
            Confirmer::new(&kr, 1, &[2; 32], "db1").expect("derive"),
            Confirmer::new(&kr, 1, &[1; 32], "db2").expect("derive"),
        ];
        for o in &others {
            assert_eq!(o.verify_source(b"hello", &s), Err(Mismatch { key_id: 1 }));
        }
        assert!(me.verify_source(b"hellO", &s).is_err());
        // A source tag is not a target tag (no reflection).
        assert!(me.verify_target(b"hello", &s, &s).is_err());
        let mut flipped = s;
        flipped[31] ^= 1;
        assert!(me.verify_source(b"hello", &flipped).is_err());
    }

    #[test]
    fn an_unknown_key_id_is_an_error() {
        assert!(matches!(
            Confirmer::new(&ring_with(7), 9, &[1; 32], "db1"),
            Err(KeyError::UnknownKey(9))
        ));
    }
}
