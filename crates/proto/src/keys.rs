//! Data keys: the keyring file and per-stream key derivation.
//!
//! The keyring is a small TOML file (mode 0600) shared by source and target:
//!
//! ```toml
//! active = 2
//! [[key]]
//! id = 1
//! secret = "<64 hex digits>"
//! [[key]]
//! id = 2
//! secret = "<64 hex digits>"
//! ```
//!
//! The `active` key seals new segments; every listed key is accepted for
//! opening. Segment keys are never the master keys themselves: each stream
//! derives its own AES-256-GCM key with HKDF-SHA256 from the master key, the
//! random stream id agreed at the handshake, the volume id, the direction and
//! the epoch (see [`StreamKey::derive`]). Nonces are a per-stream counter, so
//! a (key, nonce) pair can only repeat if a stream id repeats.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ring::aead;
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use zeroize::Zeroizing;

/// Key errors.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("key file {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The key file does not parse.
    #[error("key file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The key file can be read by others.
    #[error(
        "key file {path} has mode {mode:o}; it must not be readable by group or others (chmod 600)"
    )]
    Permissions {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
    /// No key with this id.
    #[error("unknown key id {0}")]
    UnknownKey(u32),
    /// The system random generator failed.
    #[error("random number generator failed")]
    Random,
}

/// Direction of a stream, bound into its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Protected site to recovery site.
    Forward = 1,
    /// Recovery site back to the protected site (reverse replication).
    Reverse = 2,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    active: u32,
    key: Vec<KeyEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyEntry {
    id: u32,
    secret: String,
}

/// Master keys by id, zeroized on drop.
pub struct KeyRing {
    active: u32,
    keys: BTreeMap<u32, Zeroizing<[u8; 32]>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("active", &self.active)
            .field("ids", &self.ids())
            .finish()
    }
}

impl KeyRing {
    /// Loads and checks a keyring file.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(io)?);
        Self::parse(&text).map_err(|message| KeyError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    /// Parses keyring text.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: KeyFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut keys = BTreeMap::new();
        for k in file.key {
            let secret = Zeroizing::new(k.secret);
            let mut bytes = Zeroizing::new([0u8; 32]);
            hex::decode_to_slice(secret.as_bytes(), &mut bytes[..])
                .map_err(|_| format!("key {}: secret must be 64 hex digits", k.id))?;
            if keys.insert(k.id, bytes).is_some() {
                return Err(format!("key id {} listed twice", k.id));
            }
        }
        if !keys.contains_key(&file.active) {
            return Err(format!("active key id {} is not in the file", file.active));
        }
        Ok(Self {
            active: file.active,
            keys,
        })
    }

    /// The id of the key that seals new segments.
    pub fn active(&self) -> u32 {
        self.active
    }

    /// All key ids.
    pub fn ids(&self) -> Vec<u32> {
        self.keys.keys().copied().collect()
    }

    pub(crate) fn master(&self, id: u32) -> Result<&[u8; 32], KeyError> {
        self.keys
            .get(&id)
            .map(|k| &**k)
            .ok_or(KeyError::UnknownKey(id))
    }

    /// Serialises the keyring (secrets included).
    pub fn to_toml(&self) -> Zeroizing<String> {
        let mut s = Zeroizing::new(format!(
            "# dm-replica data keys. Keep identical on both sites; mode 0600.\nactive = {}\n",
            self.active
        ));
        for (id, k) in &self.keys {
            s.push_str(&format!(
                "\n[[key]]\nid = {id}\nsecret = \"{}\"\n",
                hex::encode(&k[..])
            ));
        }
        s
    }

    /// A new keyring holding one random key with id 1.
    pub fn generate() -> Result<Self, KeyError> {
        let mut kr = Self {
            active: 0,
            keys: BTreeMap::new(),
        };
        kr.rotate()?;
        Ok(kr)
    }

    /// Adds a new random key with the next id and makes it active; the
    /// previous keys stay accepted. Returns the new id.
    pub fn rotate(&mut self) -> Result<u32, KeyError> {
        let mut k = Zeroizing::new([0u8; 32]);
        SystemRandom::new()
            .fill(&mut k[..])
            .map_err(|_| KeyError::Random)?;
        let id = self.keys.keys().next_back().map_or(1, |m| m + 1);
        self.keys.insert(id, k);
        self.active = id;
        Ok(id)
    }

    /// Removes every key but the active one and those in `needed`; returns
    /// the ids removed (their secrets are zeroized as they are dropped).
    pub fn retire(&mut self, needed: &std::collections::BTreeSet<u32>) -> Vec<u32> {
        let active = self.active;
        let gone: Vec<u32> = self
            .keys
            .keys()
            .copied()
            .filter(|id| *id != active && !needed.contains(id))
            .collect();
        for id in &gone {
            self.keys.remove(id);
        }
        gone
    }

    /// Writes the keyring to `path` with mode 0600 (atomically, via a
    /// temporary file). Refuses to overwrite unless `overwrite`.
    pub fn save(&self, path: &Path, overwrite: bool) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        if !overwrite && path.exists() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "refusing to overwrite",
            )));
        }
        // A temporary file of mode 0600, synced, renamed over the keyring,
        // the directory synced: a crash leaves the old keyring or the new.
        replica_fs::write_atomic_private(path, self.to_toml().as_bytes()).map_err(|e| {
            KeyError::Io {
                path: e.path,
                source: e.source,
            }
        })
    }
}

/// What a stream key is bound to.
#[derive(Debug, Clone, Copy)]
pub struct StreamContext<'a> {
    /// Random stream id agreed at the handshake.
    pub stream_id: [u8; 16],
    /// Volume or group id.
    pub volume: &'a str,
    /// Direction.
    pub direction: Direction,
    /// Replication epoch.
    pub epoch: u64,
}

/// An AES-256-GCM key for one stream.
pub struct StreamKey {
    key: aead::LessSafeKey,
    key_id: u32,
}

impl std::fmt::Debug for StreamKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

const KDF_LABEL: &[u8] = b"dm-replica segment key v1";

impl StreamKey {
    /// Derives the stream key for master key `key_id`.
    pub fn derive(ring: &KeyRing, key_id: u32, ctx: &StreamContext<'_>) -> Result<Self, KeyError> {
        let master = ring.master(key_id)?;
        let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, &ctx.stream_id);
        let prk = salt.extract(master);
        let vol_len = (ctx.volume.len() as u32).to_le_bytes();
        let dir = [ctx.direction as u8];
        let epoch = ctx.epoch.to_le_bytes();
        let kid = key_id.to_le_bytes();
        let info: [&[u8]; 6] = [
            KDF_LABEL,
            &vol_len,
            ctx.volume.as_bytes(),
            &dir,
            &epoch,
            &kid,
        ];
        let okm = prk
            .expand(&info, &aead::AES_256_GCM)
            .map_err(|_| KeyError::UnknownKey(key_id))?;
        // The derived key material lives only inside ring's key schedule;
        // `UnboundKey::from(okm)` never exposes it.
        let key = aead::LessSafeKey::new(aead::UnboundKey::from(okm));
        Ok(Self { key, key_id })
    }

    /// The master key id it was derived from.
    pub fn key_id(&self) -> u32 {
        self.key_id
    }

    /// Encrypts `buf` in place and appends the tag.
    pub fn seal(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut Vec<u8>,
    ) -> Result<(), ring::error::Unspecified> {
        self.key
            .seal_in_place_append_tag(nonce(counter), aead::Aad::from(aad), buf)
    }

    /// Decrypts `buf` (ciphertext + tag) in place; returns the plaintext
    /// length on success.
    pub fn open(
        &self,
        counter: u64,
        aad: &[u8],
        buf: &mut [u8],
    ) -> Result<usize, ring::error::Unspecified> {
        self.key
            .open_in_place(nonce(counter), aead::Aad::from(aad), buf)
            .map(|p| p.len())
    }
}

fn nonce(counter: u64) -> aead::Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_be_bytes());
    aead::Nonce::assume_unique_for_key(n)
}

/// 16 random bytes.
pub fn random16() -> Result<[u8; 16], KeyError> {
    let mut b = [0u8; 16];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| KeyError::Random)?;
    Ok(b)
}

/// The stream id both ends agree on: a hash of both ends' random halves, so
/// neither side alone can make a stream id (and thus a key) repeat.
pub fn stream_id(source_random: &[u8; 16], target_random: &[u8; 16]) -> [u8; 16] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"dm-replica stream id v1");
    ctx.update(source_random);
    ctx.update(target_random);
    let d = ctx.finish();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

/// A 16-byte tag naming a volume in segment headers.
pub fn volume_tag(volume: &str) -> [u8; 16] {
    let d = ring::digest::digest(&ring::digest::SHA256, volume.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&d.as_ref()[..16]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_keeps_old_keys_and_activates_new() {
        let mut kr = KeyRing::generate().expect("generate");
        assert_eq!(kr.active(), 1);
        assert_eq!(kr.rotate().expect("rotate"), 2);
        assert_eq!(kr.ids(), vec![1, 2]);
        let back = KeyRing::parse(&kr.to_toml()).expect("parse");
        assert_eq!(back.active(), 2);
        assert_eq!(back.master(1).expect("k1"), kr.master(1).expect("k1"));
    }

    #[test]
    fn retire_keeps_the_active_key_and_the_needed_ones() {
        let mut kr = KeyRing::generate().expect("generate");
        for _ in 0..3 {
            kr.rotate().expect("rotate");
        }
        let k2 = *kr.master(2).expect("k2");
        let needed = [2u32, 9].into_iter().collect();
        assert_eq!(kr.retire(&needed), vec![1, 3]);
        assert_eq!(kr.ids(), vec![2, 4]);
        assert_eq!(kr.active(), 4);
        assert_eq!(*kr.master(2).expect("k2"), k2);
        assert!(kr.retire(&Default::default()) == vec![2]);
        assert_eq!(kr.ids(), vec![4]);
    }

    #[test]
    fn bad_keyrings_are_rejected_with_the_reason() {
        assert!(
            KeyRing::parse("active = 1\n[[key]]\nid = 1\nsecret = \"zz\"\n")
                .expect_err("must fail")
                .contains("64 hex")
        );
        assert!(KeyRing::parse("active = 2\n[[key]]\nid = 1\nsecret = \"00\"\n").is_err());
        let e = KeyRing::parse("active = 1\nsecrets = 3\n").expect_err("must fail");
        assert!(e.contains("secrets"), "{e}");
    }

    #[test]
    fn derived_keys_differ_by_every_input() {
        let kr = KeyRing::generate().expect("generate");
        let base = StreamContext {
            stream_id: [1; 16],
            volume: "v",
            direction: Direction::Forward,
            epoch: 1,
        };
        let seal = |ctx: &StreamContext<'_>| {
            let k = StreamKey::derive(&kr, 1, ctx).expect("derive");
            let mut b = b"same plaintext".to_vec();
            k.seal(0, b"", &mut b).expect("seal");
            b
        };
        let a = seal(&base);
        assert_eq!(a, seal(&base));
        assert_ne!(
            a,
            seal(&StreamContext {
                stream_id: [2; 16],
                ..base
            })
        );
        assert_ne!(
            a,
            seal(&StreamContext {
                volume: "w",
                ..base
            })
        );
        assert_ne!(
            a,
            seal(&StreamContext {
                direction: Direction::Reverse,
                ..base
            })
        );
        assert_ne!(a, seal(&StreamContext { epoch: 2, ..base }));
    }

    #[test]
    fn key_file_permissions_are_enforced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("keys.toml");
        KeyRing::generate()
            .expect("gen")
            .save(&p, false)
            .expect("save");
        assert_eq!(
            std::fs::metadata(&p).expect("meta").permissions().mode() & 0o777,
            0o600
        );
        KeyRing::load(&p).expect("load 0600");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        assert!(matches!(
            KeyRing::load(&p),
            Err(KeyError::Permissions { .. })
        ));
        assert!(
            KeyRing::generate().expect("gen").save(&p, false).is_err(),
            "must not overwrite"
        );
    }
}
